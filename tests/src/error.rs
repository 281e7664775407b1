//! One error type for the harness: a message that says what failed and what to look at.

use std::fmt;

/// A harness failure (a command that failed, a timeout, a socket error), with context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    msg: String,
}

/// Result with the harness error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with this message.
    pub fn msg(msg: impl Into<String>) -> Self {
        Self { msg: msg.into() }
    }

    /// The same error with `what` in front: `what: <original>`.
    #[must_use]
    pub fn context(self, what: impl fmt::Display) -> Self {
        Self {
            msg: format!("{what}: {}", self.msg),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::msg(e.to_string())
    }
}

/// `.context(..)` on any result whose error converts into [`Error`].
pub trait Context<T> {
    /// Prefix the error with `what`.
    fn context(self, what: impl fmt::Display) -> Result<T>;
    /// Prefix the error with a lazily built message.
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }

    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}

/// Return early with a formatted [`Error`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::msg(format!($($arg)*)))
    };
}
