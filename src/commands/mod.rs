//! The implementation of each subcommand; [`run`] dispatches.

mod completions;
mod demo;
mod detect;
mod eval;
mod info;
mod model;
mod publish;
mod publish_labels;
mod serve;
mod synth_labels;
mod tail;
mod train;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Runs the parsed command line; the exit code says whether every input succeeded, and an
/// error's code whether it was a usage or a runtime failure (see [`crate::exit`]).
pub fn run(cli: Cli) -> Result<ExitCode> {
    if cli.threads > 0 {
        tch::set_num_threads(cli.threads);
    }
    match cli.command {
        Command::Info => info::run(),
        Command::Detect(args) => detect::run(args),
        Command::Model(args) => model::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Publish(args) => publish::run(args),
        Command::Tail(args) => tail::run(args),
        Command::Train(args) => train::run(*args),
        Command::PublishLabels(args) => publish_labels::run(args),
        Command::SynthLabels(args) => synth_labels::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Completions(args) => completions::run(args),
    }
}
