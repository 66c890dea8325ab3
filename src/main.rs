//! The `attrstream` binary: parse the command line, set up logging, run the subcommand.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = attrstream::cli::Cli::parse();
    // Log lines on stderr (RUST_LOG), plus the slot through which commands that have
    // telemetry export `tracing` spans by OTLP.
    attrstream::telemetry::logging::init();
    match attrstream::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
