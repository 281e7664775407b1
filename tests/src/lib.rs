//! Network-namespace harness (grows with issue #3).
