//! How a failed command ends: every error is an `anyhow::Error`, and the
//! exit code comes from what it wraps. An [`ApiError`] from the node knows
//! its own code (2 for bad usage or input, 1 for a failure); a
//! [`UsageError`] raised by the CLI itself is 2; anything else is 1.

use std::fmt;

use weft_node::api::ApiError;

/// Bad usage or bad input detected by the CLI itself (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand for returning a [`UsageError`].
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// The exit code the contract gives this error.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            return api.exit_code();
        }
        if cause.is::<UsageError>() {
            return 2;
        }
    }
    1
}

/// Whether the error is only that whoever read our stdout went away
/// (`weft watch | head`): not worth a message.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(exit_code(&usage("bad")), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("boom")), 1);
        assert_eq!(exit_code(&anyhow::Error::new(ApiError::usage("x"))), 2);
        assert_eq!(exit_code(&anyhow::Error::new(ApiError::failed("x"))), 1);
        let wrapped = anyhow::Error::new(ApiError::usage("x")).context("while sending");
        assert_eq!(exit_code(&wrapped), 2);
    }

    #[test]
    fn broken_pipe() {
        let err = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
