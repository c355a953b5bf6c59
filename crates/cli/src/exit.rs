//! Fixed exit codes and the error type that carries one.
//!
//! Commands return `anyhow::Result`; an error that should end with a
//! specific code is a [`Failure`] (possibly wrapped in context), which
//! [`code_of`] finds. Anything else exits with [`GENERIC`].

use std::fmt;

/// Success.
pub const OK: u8 = 0;
/// Generic failure.
pub const GENERIC: u8 = 1;
/// Bad input: stack file errors, bad flags or arguments.
pub const BAD_INPUT: u8 = 2;
/// No server running, or cannot connect to it.
pub const NO_SERVER: u8 = 3;
/// Stack or service not found.
pub const NOT_FOUND: u8 = 4;
/// `up -d` or a rollout (deploy, rollback, env) failed: unhealthy, failed,
/// or timed out.
pub const UP_FAILED: u8 = 5;
/// Second Ctrl-C.
pub const INTERRUPTED: u8 = 130;

/// An error with a chosen exit code. Its message is already user-facing.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// What to print.
    pub message: String,
}

impl Failure {
    /// A failure with this code and message.
    pub fn with_code(code: u8, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Failure {
            code,
            message: message.into(),
        })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code an error should end the process with.
pub fn code_of(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map_or(GENERIC, |f| f.code)
}
