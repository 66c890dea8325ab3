//! `attrstream model import|fetch|list|init`: getting weights `detect` can load (or a model
//! from scratch to train); `attrstream model registry …`: versions, promotion and rollback.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::cli::{ModelArgs, ModelCommand, ModelFetchArgs, ModelImportArgs, ModelListArgs};
use crate::detection::DEFAULT_MODEL_DIR;
use crate::model::fetch::{self, ExpectedHash, FetchOptions, KNOWN_CHECKPOINTS};
use crate::model::import::{self, ImportOptions};
use crate::model::weights;

/// Runs a `model` subcommand.
pub fn run(args: ModelArgs) -> Result<ExitCode> {
    match args.command {
        ModelCommand::Import(args) => run_import(args),
        ModelCommand::Fetch(args) => run_fetch(args),
        ModelCommand::List(args) => run_list(args),
        ModelCommand::Registry(args) => registry::run(args),
        ModelCommand::Init(args) => run_init(args),
    }
}

/// Converts a checkpoint and prints the import report as JSON.
fn run_import(args: ModelImportArgs) -> Result<ExitCode> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| import::default_output_path(&args.file, Path::new(DEFAULT_MODEL_DIR)));
    let mut options = ImportOptions::new(output);
    options.labels = args.labels.as_deref().map(import::read_labels).transpose()?;
    options.verify = !args.no_verify;
    options.frozen_bn_eps = args.frozen_bn_eps;
    let report = import::import_checkpoint(&args.file, &options)?;
    tracing::info!(output = %report.output.display(), tensors = report.tensors, "imported");
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Downloads and converts a checkpoint and prints the fetch report as JSON.
fn run_fetch(args: ModelFetchArgs) -> Result<ExitCode> {
    let options = FetchOptions {
        dir: args.dir,
        url: args.url,
        sha256: args.sha256,
        force: args.force,
        verify: !args.no_verify,
        ..FetchOptions::default()
    };
    let report = fetch::fetch(&args.name, &options)?;
    tracing::info!(output = %report.output.display(), downloaded = report.downloaded, "model ready");
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// One row of `model list`.
struct Row {
    name: String,
    status: String,
    path: PathBuf,
}

/// Prints the known checkpoints and the weights files in the folder as a table.
fn run_list(args: ModelListArgs) -> Result<ExitCode> {
    let mut rows: Vec<Row> = KNOWN_CHECKPOINTS
        .iter()
        .map(|known| {
            let path = fetch::weights_path(&args.dir, known.name);
            let status = if !path.exists() {
                "missing".to_string()
            } else {
                let expected = fetch::hub_hash_prefix(known.url).map(ExpectedHash::Prefix);
                match weights::read_metadata(&path) {
                    Ok(meta) => match (expected, meta.source_sha256) {
                        (Some(e), Some(sha)) if !e.matches(&sha) => "present (other source)".to_string(),
                        _ => "present".to_string(),
                    },
                    Err(_) => "unreadable".to_string(),
                }
            };
            Row {
                name: known.name.to_string(),
                status,
                path,
            }
        })
        .collect();
    rows.extend(other_weights(&args.dir)?);
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    println!("{:width$}  {:22}  PATH", "NAME", "STATUS");
    for row in &rows {
        println!("{:width$}  {:22}  {}", row.name, row.status, row.path.display());
    }
    if rows.iter().any(|r| r.status == "missing") {
        eprintln!("get missing weights with `attrstream model fetch NAME` (needs internet)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Weights files in `dir` that are not known checkpoints (imported ones).
fn other_weights(dir: &Path) -> Result<Vec<Row>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut rows = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("cannot list {}", dir.display()))?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let is_weights = path.extension().is_some_and(|e| e == "safetensors");
        if !is_weights || stem.starts_with('.') || KNOWN_CHECKPOINTS.iter().any(|k| k.name == stem) {
            continue;
        }
        let status = match weights::read_metadata(&path) {
            Ok(_) => "imported",
            Err(_) => "unreadable",
        };
        rows.push(Row {
            name: stem.to_string(),
            status: status.to_string(),
            path,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// `attrstream model registry list|show|promote|rollback|publish|download`.
mod registry {
    use std::path::Path;
    use std::process::ExitCode;

    use anyhow::{bail, Context, Result};
    use figment::providers::{Format, Toml};
    use figment::Figment;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use crate::cli::{
        RegistryArgs, RegistryCommand, RegistryDownloadArgs, RegistryPromoteArgs, RegistryPublishArgs, RegistryShowArgs,
    };
    use crate::exit::UsageContext;
    use crate::model::import;
    use crate::train::registry::{
        resolve_model, ModelRegistry, NewVersion, PromotionPolicy, VersionId, PRODUCTION_REF,
    };

    /// Opens the registry named by the arguments and runs the subcommand.
    pub fn run(args: RegistryArgs) -> Result<ExitCode> {
        let location = location(&args).usage()?;
        let mut registry = ModelRegistry::open(&location).usage()?;
        if let Some(by) = &args.by {
            registry = registry.with_actor(by.clone());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(async move {
            match args.command {
                RegistryCommand::List(a) => list(&registry, a.json).await,
                RegistryCommand::Show(a) => show(&registry, a).await,
                RegistryCommand::Promote(a) => promote(&registry, a).await,
                RegistryCommand::Rollback(a) => {
                    let version = VersionId::parse(&a.version).usage()?;
                    let production = registry.rollback(&version, a.note.as_deref()).await?;
                    println!("{}", serde_json::to_string(&production)?);
                    Ok(ExitCode::SUCCESS)
                }
                RegistryCommand::Publish(a) => publish(&registry, a).await,
                RegistryCommand::Download(a) => download(&registry, a).await,
            }
        })
    }

    /// `--registry` (or its environment variable), else `model.registry` of the config file.
    fn location(args: &RegistryArgs) -> Result<String> {
        if let Some(location) = &args.registry {
            return Ok(location.clone());
        }
        if let Some(path) = &args.config {
            if !path.exists() {
                bail!("config file {} not found", path.display());
            }
            let figment = Figment::from(Toml::file_exact(path));
            if let Ok(value) = figment.find_value("model.registry") {
                return value
                    .into_string()
                    .with_context(|| format!("model.registry in {} must be a string", path.display()));
            }
        }
        bail!(
            "no model registry given: pass --registry DIR|file:///dir|s3://bucket/prefix, set \
             ATTRSTREAM_MODEL__REGISTRY, or set model.registry in the --config file"
        )
    }

    fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid {what} JSON", path.display()))
    }

    /// A version id, or the production version for `production`.
    async fn version_ref(registry: &ModelRegistry, text: &str) -> Result<VersionId> {
        if text.trim() == PRODUCTION_REF {
            match registry.production().await? {
                Some(p) => Ok(p.version),
                None => bail!("{} has no production version yet", registry.location()),
            }
        } else {
            VersionId::parse(text.trim()).usage()
        }
    }

    async fn list(registry: &ModelRegistry, as_json: bool) -> Result<ExitCode> {
        let versions = registry.list().await?;
        let production = registry.production().await?.map(|p| p.version);
        if as_json {
            for v in &versions {
                println!("{}", serde_json::to_string(v)?);
            }
            return Ok(ExitCode::SUCCESS);
        }
        if versions.is_empty() {
            eprintln!(
                "no versions in {}; publish one with `attrstream model registry publish --weights FILE`",
                registry.location()
            );
            return Ok(ExitCode::SUCCESS);
        }
        let width = versions.iter().map(|v| v.version.as_str().len()).max().unwrap_or(7);
        println!(
            "  {:width$}  {:16}  {:23}  {:>7}  {:>6}  {:>6}  {:12}  PARENT",
            "VERSION", "CREATED (UTC)", "ARCHITECTURE", "CLASSES", "mAP", "AP50", "VALIDATION"
        );
        let metric = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
        for v in &versions {
            let mark = if production.as_ref() == Some(&v.version) {
                "*"
            } else {
                " "
            };
            let fingerprint: String = v.validation_fingerprint().unwrap_or("-").chars().take(12).collect();
            println!(
                "{mark} {:width$}  {:16}  {:23}  {:>7}  {:>6}  {:>6}  {:12}  {}",
                v.version.as_str(),
                v.created_at.format("%Y-%m-%d %H:%M").to_string(),
                v.architecture.as_str(),
                v.labels.len().saturating_sub(1),
                metric(v.metrics.as_ref().map(|m| m.map)),
                metric(v.metrics.as_ref().map(|m| m.ap50)),
                fingerprint,
                v.parent.as_ref().map_or("-", |p| p.as_str()),
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn show(registry: &ModelRegistry, args: RegistryShowArgs) -> Result<ExitCode> {
        let version = version_ref(registry, &args.version).await?;
        let manifest = registry.get(&version).await?;
        let production = registry.production().await?;
        let decisions = registry.decisions(Some(&version)).await?;
        let is_production = production.as_ref().is_some_and(|p| p.version == version);
        let shown = json!({
            "manifest": manifest,
            "production": is_production,
            "production_record": production.filter(|_| is_production),
            "decisions": decisions,
        });
        println!("{}", serde_json::to_string_pretty(&shown)?);
        Ok(ExitCode::SUCCESS)
    }

    async fn promote(registry: &ModelRegistry, args: RegistryPromoteArgs) -> Result<ExitCode> {
        let version = VersionId::parse(&args.version).usage()?;
        let policy = PromotionPolicy {
            force: args.force,
            metric: args.metric,
            min_improvement: args.min_improvement,
            note: args.note,
        };
        let decision = registry.promote(&version, &policy).await?;
        println!("{}", serde_json::to_string(&decision)?);
        if decision.promoted {
            eprintln!("promoted {version}: {}", decision.reason);
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!("not promoted: {}", decision.reason);
            Ok(ExitCode::from(1))
        }
    }

    async fn publish(registry: &ModelRegistry, args: RegistryPublishArgs) -> Result<ExitCode> {
        let mut candidate = NewVersion::new(&args.weights);
        candidate.architecture = args.architecture;
        candidate.labels = args.labels.as_deref().map(import::read_labels).transpose()?;
        candidate.parent = args.parent.as_deref().map(VersionId::parse).transpose().usage()?;
        candidate.metrics = args.metrics.as_deref().map(|p| read_json(p, "metrics")).transpose()?;
        candidate.parent_metrics = args
            .parent_metrics
            .as_deref()
            .map(|p| read_json(p, "parent metrics"))
            .transpose()?;
        candidate.training_config = args
            .training_config
            .as_deref()
            .map(|p| read_json(p, "training config"))
            .transpose()?;
        candidate.training_data = args
            .training_data
            .as_deref()
            .map(|p| read_json(p, "training data"))
            .transpose()?;
        candidate.notes = args.notes;
        let version = registry.publish(candidate).await?;
        let manifest = registry.get(&version).await?;
        println!("{}", serde_json::to_string(&manifest)?);
        eprintln!("published {version} to {}", registry.location());
        Ok(ExitCode::SUCCESS)
    }

    async fn download(registry: &ModelRegistry, args: RegistryDownloadArgs) -> Result<ExitCode> {
        let resolved = resolve_model(registry, &args.version, &args.cache_dir).await?;
        println!(
            "{}",
            json!({
                "version": resolved.version,
                "weights": resolved.weights,
                "sha256": resolved.manifest.weights.sha256,
                "architecture": resolved.architecture,
                "classes": resolved.labels.len().saturating_sub(1),
            })
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// `model init`: a from-scratch Faster R-CNN for a label set, calibrated on sample images.
fn run_init(args: crate::cli::ModelInitArgs) -> Result<ExitCode> {
    use crate::model::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
    use crate::model::weights::WeightsMetadata;
    if args.classes.iter().any(|c| c.trim().is_empty()) {
        anyhow::bail!("--classes has an empty name");
    }
    let labels: Vec<String> = std::iter::once("__background__".to_string())
        .chain(args.classes.iter().map(|c| c.trim().to_string()))
        .collect();
    let cfg = FasterRcnnConfig {
        num_classes: labels.len() as i64,
        min_size: args.min_size,
        max_size: args.max_size,
        ..Default::default()
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.calibration_images)
        .with_context(|| format!("cannot list --calibration-images {}", args.calibration_images.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    files.truncate(args.calibration_count.max(1));
    if files.is_empty() {
        anyhow::bail!(
            "no PNG or JPEG images in {}: batch norm needs sample images to calibrate on",
            args.calibration_images.display()
        );
    }
    let images = files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            let image = crate::preprocess::decode_image(&bytes, crate::preprocess::DEFAULT_MAX_PIXELS)
                .with_context(|| format!("cannot decode {}", p.display()))?;
            Ok(crate::preprocess::to_tensor(&image, tch::Device::Cpu))
        })
        .collect::<Result<Vec<_>>>()?;
    tch::manual_seed(args.seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = FasterRcnn::new(&vs.root(), cfg.clone());
    model.initialise_from_scratch(&vs, &images);
    let mut tensors: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = WeightsMetadata {
        architecture: Some(crate::detection::FASTERRCNN_RESNET50_FPN.to_string()),
        labels: Some(labels.clone()),
        source: Some(format!(
            "attrstream model init (seed {}, calibrated on {} images)",
            args.seed,
            images.len()
        )),
        source_sha256: None,
        config: Some(serde_json::to_value(&cfg)?),
    };
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::model::weights::save(&args.output, &tensors, &metadata)?;
    println!(
        "{}",
        serde_json::json!({"output": args.output, "labels": labels, "calibration_images": images.len(), "seed": args.seed})
    );
    Ok(ExitCode::SUCCESS)
}
