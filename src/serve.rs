//! What `serve` and `demo` share: configuration from the command line, the detector
//! workers built from `[model]`, and the shutdown signal.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tch::Device;
use tokio::sync::mpsc;

use crate::cli::ConfigArgs;
use crate::config::{available_cores, Config};
use crate::detection::{resolve_default_weights, Detector};
use crate::events::ModelRef;
use crate::model::faster_rcnn::FasterRcnnConfig;
use crate::model::weights;
use crate::pipeline::{Inference, ModelUpdate};
use crate::train::registry::{resolve_model, resolve_model_blocking, ModelRegistry, ResolvedModel, PRODUCTION_REF};
use crate::workers::{BackendFactory, DetectorBackend, InferenceBackend};

/// Loads the configuration: file, environment, then the command line's shorthands and `--set`s.
/// Errors are usage errors (exit code 2). Applies `telemetry.log_format` to the process's logs.
pub fn load_config(args: &ConfigArgs) -> Result<Config> {
    let config = load_unvalidated(args)?;
    config.validate()?;
    Ok(config)
}

/// [`load_config`] for commands that do not serve (train, publish-labels): the serve topics'
/// schema ids are not required.
pub fn load_config_without_serve_schemas(args: &ConfigArgs) -> Result<Config> {
    let config = load_unvalidated(args)?;
    config.validate_without_serve_schemas()?;
    Ok(config)
}

/// The configuration before validation, for `serve --print-config`, which shows it even when
/// it is invalid.
pub fn load_unvalidated(args: &ConfigArgs) -> Result<Config> {
    let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut overrides: Vec<(String, String)> = Vec::new();
    let shorthands = [
        ("kafka.bootstrap_servers", &args.brokers),
        ("kafka.group_id", &args.group),
        ("kafka.input_topic", &args.input_topic),
        ("kafka.output_topic", &args.output_topic),
        ("kafka.dead_letter_topic", &args.dead_letter_topic),
        ("schemas.registry_url", &args.registry),
    ];
    for (key, value) in shorthands {
        if let Some(v) = value {
            overrides.push((key.to_string(), quoted(v)));
        }
    }
    if let Some(w) = &args.weights {
        overrides.push(("model.weights".into(), quoted(&w.to_string_lossy())));
    }
    if !args.devices.is_empty() {
        let list: Vec<String> = args.devices.iter().map(|d| quoted(d)).collect();
        overrides.push(("model.devices".into(), format!("[{}]", list.join(", "))));
    }
    overrides.extend(args.set.iter().cloned());
    let mut config = Config::load_unvalidated(args.config.as_deref(), &overrides)?;
    for (k, v) in &args.kafka_options {
        config.kafka.options.insert(k.clone(), v.clone());
    }
    crate::telemetry::logging::apply_configured_format(config.telemetry.log_format);
    Ok(config)
}

/// The devices of `[model] devices`, or the default (every CUDA device, else the CPU).
pub fn configured_devices(config: &Config) -> Result<Vec<Device>> {
    if config.model.devices.is_empty() {
        return Ok(crate::device::default_devices());
    }
    config
        .model
        .devices
        .iter()
        .map(|d| crate::device::parse_device(d).with_context(|| format!("model.devices entry `{d}`")))
        .collect()
}

/// Name and version written into output records for the configured weights.
pub fn model_ref(config: &Config, weights_path: &Path) -> Result<ModelRef> {
    let name = match &config.model.name {
        Some(n) => n.clone(),
        None => weights_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let version = match &config.model.version {
        Some(v) => v.clone(),
        None => {
            let meta = weights::read_metadata(weights_path)?;
            match meta.source_sha256 {
                Some(sha) if sha.len() >= 12 => sha[..12].to_string(),
                _ => {
                    let bytes = std::fs::read(weights_path)
                        .with_context(|| format!("cannot read {}", weights_path.display()))?;
                    hex::encode(Sha256::digest(&bytes))[..12].to_string()
                }
            }
        }
    };
    Ok(ModelRef { name, version })
}

/// One detector worker per configured device, each loading its own replica.
///
/// The weights come from `model.registry`'s production version when a registry is set (see
/// [`follow_registry`] for switching to later promotions), else from `model.weights`, else
/// from the default weights file.
///
/// CPU workers share the cores: each gets `model.threads_per_worker` intra-op threads, by
/// default cores ÷ CPU workers, because libtorch slows down sharply when oversubscribed.
pub fn detector_inference(config: &Config) -> Result<(Inference, ModelRef)> {
    let devices = configured_devices(config)?;
    let (weights_path, model) = match (&config.model.registry, &config.model.weights) {
        (Some(location), _) => {
            let resolved = resolve_model_blocking(location, PRODUCTION_REF, &config.model.registry_cache_dir)
                .with_context(|| format!("loading the production model of the registry {location}"))?;
            let model = registry_model_ref(config, &resolved);
            (resolved.weights, model)
        }
        (None, Some(path)) => (path.clone(), model_ref(config, path)?),
        (None, None) => {
            let path = resolve_default_weights()?;
            let model = model_ref(config, &path)?;
            (path, model)
        }
    };
    let factory = detector_factory(config, &devices, weights_path, model.clone());
    Ok((Inference::new(devices.len(), factory), model))
}

/// The name and version output records carry for a registry model.
fn registry_model_ref(config: &Config, resolved: &ResolvedModel) -> ModelRef {
    ModelRef {
        name: config
            .model
            .name
            .clone()
            .unwrap_or_else(|| resolved.architecture.as_str().to_string()),
        version: resolved.version.as_str().to_string(),
    }
}

/// Builds a detector backend from `weights_path` on worker `index`'s device.
fn detector_factory(config: &Config, devices: &[Device], weights_path: PathBuf, model: ModelRef) -> BackendFactory {
    let cpu_workers = devices.iter().filter(|d| **d == Device::Cpu).count().max(1);
    let threads = if config.model.threads_per_worker > 0 {
        config.model.threads_per_worker
    } else {
        (available_cores() / cpu_workers).max(1)
    };
    let cfg = FasterRcnnConfig {
        box_score_thresh: config.model.score_threshold as f64,
        ..Default::default()
    };
    let exact = config.model.exact;
    let devices = devices.to_vec();
    Arc::new(move |index| {
        let device = devices[index];
        if device == Device::Cpu {
            tch::set_num_threads(threads as i32);
        }
        let detector = Detector::load(&weights_path, device, cfg.clone(), exact)?;
        tracing::info!(
            worker = index,
            device = %crate::device::device_name(device),
            architecture = detector.architecture(),
            model = %model.name,
            version = %model.version,
            "model loaded"
        );
        Ok(Box::new(DetectorBackend::new(detector, model.clone())) as Box<dyn InferenceBackend>)
    })
}

/// Follows `model.registry`'s production version while serving: every promotion or rollback
/// after `current` becomes a [`ModelUpdate`] (weights downloaded and checked first), which the
/// pipeline swaps in without stopping. `None` when no registry is configured or
/// `model.registry_poll_interval` is 0. Call inside the runtime that runs the pipeline.
pub async fn follow_registry(config: &Config, current: &ModelRef) -> Result<Option<mpsc::Receiver<ModelUpdate>>> {
    let Some(location) = config.model.registry.clone() else {
        return Ok(None);
    };
    let interval = config.model.registry_poll_interval;
    if interval.is_zero() {
        return Ok(None);
    }
    let registry = ModelRegistry::open(&location)?;
    let mut watch = registry
        .watch(interval)
        .await
        .with_context(|| format!("watching the model registry {location}"))?;
    let (tx, rx) = mpsc::channel(1);
    let config = config.clone();
    let devices = configured_devices(&config)?;
    let mut serving = current.version.clone();
    tokio::spawn(async move {
        while let Some(state) = watch.next_change().await {
            let Some(production) = state else { continue };
            if production.version.as_str() == serving {
                continue;
            }
            let reference = production.version.as_str().to_string();
            let resolved = match resolve_model(&registry, &reference, &config.model.registry_cache_dir).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(version = %reference, error = %format!("{e:#}"),
                        "cannot fetch the newly promoted model; still serving the current one");
                    continue;
                }
            };
            let model = registry_model_ref(&config, &resolved);
            tracing::info!(version = %model.version, previous = %serving, "the registry promoted a new model");
            let update = ModelUpdate {
                factory: detector_factory(&config, &devices, resolved.weights.clone(), model.clone()),
                description: format!("registry version {}", model.version),
            };
            if tx.send(update).await.is_err() {
                return; // the pipeline stopped
            }
            serving = model.version;
        }
    });
    Ok(Some(rx))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = term => tracing::info!("received SIGTERM"),
    }
}

/// A multi-threaded tokio runtime for the async pipeline (inference runs on its own threads).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(available_cores().clamp(2, 8))
        .thread_name("attrstream-io")
        .build()
        .context("cannot start the async runtime")
}
