//! The process's exit codes: one meaning per number, the same for every subcommand, so
//! scripts, CI jobs and Kubernetes can tell "fix the command" from "try again later".
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the job ran, and some inputs failed or an outcome was refused (an unreadable image in `detect`, a promotion refused) |
//! | 2 | usage or configuration error: a bad flag, an unknown configuration key, a bad value (clap exits 2 for its own checks) |
//! | 3 | runtime failure: a registry, database, model or broker unreachable or invalid, a produce that never succeeds |
//!
//! Commands return [`std::process::ExitCode`] for 0 and 1, and errors for 2 and 3. An error is
//! a usage error when something on its chain is a [`UsageError`] (made with [`usage`] or
//! [`UsageContext::usage`]); every other error is a runtime failure.

use std::process::ExitCode;

/// Exit code of a run where everything succeeded.
pub const SUCCESS: u8 = 0;
/// Exit code of a run that finished but where some inputs failed or an outcome was refused.
pub const SOME_INPUTS_FAILED: u8 = 1;
/// Exit code of a bad command line or configuration (the same number clap uses).
pub const USAGE: u8 = 2;
/// Exit code of a failure while running: something the command needs is unreachable or invalid.
pub const RUNTIME: u8 = 3;

/// Marks an error as the user's to fix in the flags or the configuration (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct UsageError(anyhow::Error);

/// Wraps `error` as a usage error (exit code 2); its message is unchanged.
pub fn usage(error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(UsageError(error.into()))
}

/// `.usage()` on results, beside anyhow's `.context()`.
pub trait UsageContext<T> {
    /// Marks the error, if any, as a usage error (exit code 2).
    fn usage(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> UsageContext<T> for Result<T, E> {
    fn usage(self) -> anyhow::Result<T> {
        self.map_err(usage)
    }
}

/// The exit code for an error that ended a command: [`USAGE`] or [`RUNTIME`].
pub fn code_for(error: &anyhow::Error) -> u8 {
    let marked = error.downcast_ref::<UsageError>().is_some() || error.chain().any(|e| e.is::<UsageError>());
    if marked {
        USAGE
    } else {
        RUNTIME
    }
}

/// [`code_for`] as an [`ExitCode`].
pub fn exit_code_for(error: &anyhow::Error) -> ExitCode {
    ExitCode::from(code_for(error))
}

#[cfg(test)]
mod tests {
    use anyhow::{anyhow, Context};

    use super::*;

    #[test]
    fn errors_are_runtime_failures_unless_marked() {
        assert_eq!(code_for(&anyhow!("broker unreachable")), RUNTIME);
        assert_eq!(code_for(&usage(anyhow!("unknown key"))), USAGE);
    }

    #[test]
    fn the_mark_survives_context_and_keeps_the_message() {
        let marked: anyhow::Result<()> = Err(anyhow!("batch.max_batch_size must be at least 1")).usage();
        let error = marked.context("loading the configuration").unwrap_err();
        assert_eq!(code_for(&error), USAGE);
        assert_eq!(
            format!("{error:#}"),
            "loading the configuration: batch.max_batch_size must be at least 1"
        );
        let runtime = Err::<(), _>(anyhow!("refused")).context("connecting").unwrap_err();
        assert_eq!(code_for(&runtime), RUNTIME);
    }
}
