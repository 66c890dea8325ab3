//! `attrstream serve`: the streaming service until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::ServeArgs;
use crate::config::redact;
use crate::config::Config;
use crate::serve::{
    configured_devices, detector_inference, follow_registry, load_config, load_unvalidated, runtime, shutdown_signal,
};
use crate::telemetry::http::HttpServer;
use crate::telemetry::{device_memory, Telemetry};

/// Loads the configuration, starts the workers and runs the pipeline until a signal.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    if args.print_config {
        return print_config(&args);
    }
    let config = load_config(&args.config)?;
    tracing::info!(
        brokers = %config.kafka.bootstrap_servers,
        group = %config.kafka.group_id,
        input = %config.kafka.input_topic,
        output = %config.kafka.output_topic,
        dead_letters = %config.kafka.dead_letter_topic,
        options = ?redact(&config.kafka.options),
        "starting"
    );
    let (mut inference, model) = detector_inference(&config)?;
    tracing::info!(model = %model.name, version = %model.version, workers = inference.workers, "model");
    let telemetry = Telemetry::for_command(&config.telemetry)?;
    let listen = config.telemetry.listen_addr()?;
    let _device_memory = device_memory::watch(&configured_devices(&config)?, telemetry.metrics());
    let report = runtime()?.block_on(async {
        // Up before the models load: probes answer (alive, not ready) during a slow start.
        let _server = match listen {
            Some(addr) => Some(HttpServer::start(telemetry.clone(), addr).await?),
            None => None,
        };
        inference.updates = follow_registry(&config, &model).await?;
        crate::pipeline::run_with_telemetry(config, inference, telemetry.clone(), shutdown_signal()).await
    });
    telemetry.finish();
    let report = report?;
    tracing::info!(
        consumed = report.consumed,
        produced = report.produced,
        dead_lettered = ?report.dead_lettered,
        abandoned = report.abandoned,
        mean_batch = format!("{:.2}", report.batches.mean_batch_size()),
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// `--print-config`: the effective configuration with secrets redacted, printed even when it
/// fails validation (then followed by the validation error, exit code 2), so a user sees what
/// the layers added up to.
fn print_config(args: &ServeArgs) -> Result<ExitCode> {
    let config = load_unvalidated(&args.config)?;
    println!("{}", toml::to_string_pretty(&redacted(&config))?);
    config.validate()?;
    Ok(ExitCode::SUCCESS)
}

/// `config` with every secret replaced by `<redacted>`.
fn redacted(config: &Config) -> Config {
    let mut shown = config.clone();
    shown.kafka.options = redact(&shown.kafka.options);
    shown.kafka.consumer_options = redact(&shown.kafka.consumer_options);
    shown.kafka.producer_options = redact(&shown.kafka.producer_options);
    if shown.schemas.registry_password.is_some() {
        shown.schemas.registry_password = Some("<redacted>".into());
    }
    shown.database = shown.database.redacted();
    shown
}
