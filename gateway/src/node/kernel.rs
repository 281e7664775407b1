//! Reading and writing the node's kernel state through rtnetlink (being written).
