//! What `serve` and `demo` share: configuration from the command line, the detector
//! workers built from `[model]`, and the shutdown signal.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tch::Device;

use crate::cli::ConfigArgs;
use crate::config::{available_cores, Config};
use crate::detection::{resolve_default_weights, Detector};
use crate::events::ModelRef;
use crate::model::faster_rcnn::FasterRcnnConfig;
use crate::model::weights;
use crate::pipeline::Inference;
use crate::workers::{BackendFactory, DetectorBackend, InferenceBackend};

/// Loads the configuration: file, environment, then the command line's shorthands and `--set`s.
pub fn load_config(args: &ConfigArgs) -> Result<Config> {
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
    let mut config = Config::load(args.config.as_deref(), &overrides)?;
    for (k, v) in &args.kafka_options {
        config.kafka.options.insert(k.clone(), v.clone());
    }
    config.validate()?;
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
/// CPU workers share the cores: each gets `model.threads_per_worker` intra-op threads, by
/// default cores ÷ CPU workers, because libtorch slows down sharply when oversubscribed.
pub fn detector_inference(config: &Config) -> Result<(Inference, ModelRef)> {
    let devices = configured_devices(config)?;
    let weights_path = match &config.model.weights {
        Some(p) => p.clone(),
        None => resolve_default_weights()?,
    };
    let model = model_ref(config, &weights_path)?;
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
    let shared_model = model.clone();
    let devices_for_factory = devices.clone();
    let factory: BackendFactory = Arc::new(move |index| {
        let device = devices_for_factory[index];
        if device == Device::Cpu {
            tch::set_num_threads(threads as i32);
        }
        let detector = Detector::load(&weights_path, device, cfg.clone(), exact)?;
        tracing::info!(
            worker = index,
            device = %crate::device::device_name(device),
            architecture = detector.architecture(),
            "model loaded"
        );
        Ok(Box::new(DetectorBackend::new(detector, shared_model.clone())) as Box<dyn InferenceBackend>)
    });
    Ok((Inference::new(devices.len(), factory), model))
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
