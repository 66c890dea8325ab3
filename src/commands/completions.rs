//! `attrstream completions`: a shell completion script for every subcommand and flag.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};

/// Prints the completion script for the chosen shell on stdout (a closed pipe, as with
/// `| head`, ends it quietly).
pub fn run(args: CompletionsArgs) -> Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "attrstream", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        written => written
            .context("cannot write the completion script")
            .map(|()| ExitCode::SUCCESS),
    }
}
