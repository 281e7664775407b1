//! Privileged tests (being written).
