//! The `attrstream` binary: parse the command line, set up logging, run the subcommand, and
//! exit with one of the codes in [`attrstream::exit`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // clap exits with 2 on a usage error, 0 after --help and --version.
    let cli = attrstream::cli::Cli::parse();
    // Log lines on stderr, plus the slot through which commands that have telemetry export
    // `tracing` spans by OTLP.
    attrstream::telemetry::logging::init(cli.log_settings());
    if cli.quiet > 0 {
        attrstream::progress::set_enabled(false);
    }
    match attrstream::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = attrstream::exit::code_for(&e);
            if attrstream::telemetry::logging::is_json() {
                tracing::error!(exit_code = code, "{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}
