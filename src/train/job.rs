//! A whole fine-tuning job, as `attrstream train` runs it: replay the labelled topic, split
//! it without leaks, fine-tune from the starting model, evaluate the starting model and the
//! candidate on the same validation set, write the candidate and its report, and (with a
//! registry) publish it as a new version and promote it only if it is better.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::config::Config;
use crate::detection::Detector;
use crate::model::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
use crate::model::weights::{self, WeightsMetadata};
use crate::progress::{Progress, ProgressOptions};
use crate::train::coco_eval::CocoMetrics;
use crate::train::evaluate::{evaluate_detector, validation_fingerprint};
use crate::train::registry::{
    resolve_model, EvalMetrics, ModelRegistry, NewVersion, PartitionRange, PromotionDecision, PromotionPolicy,
    TrainingData, VersionId,
};
use crate::train::replay::{read_snapshot, snapshot_blocking, Example, ReplayOptions, ReplayRanges, ReplayReport};
use crate::train::split::{split, split_explicit, SplitReport, SplitStrategy};
use crate::train::trainer::{StepStats, TrainExample, TrainSettings, Trainer};

/// Where the validation examples come from.
#[derive(Debug, Clone)]
pub enum ValidationSource {
    /// Split the training topic (by product hash, split hint or offset ranges).
    Split(SplitStrategy),
    /// A separate topic (products also found there are removed from training).
    Topic {
        /// The validation topic.
        topic: String,
        /// Which of its records.
        ranges: ReplayRanges,
    },
}

/// The model training starts from.
#[derive(Debug, Clone)]
pub enum BaseModel {
    /// A local weights file (from `model import/fetch/init` or an earlier run).
    Weights(PathBuf),
    /// A version of the job's model registry: `production` or a version id.
    Registry(String),
}

/// Everything a job needs.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Kafka, schema-registry and fetch settings (the service configuration).
    pub config: Config,
    /// The labelled-image topic to replay.
    pub topic: String,
    /// Which records of it.
    pub ranges: ReplayRanges,
    /// Where validation examples come from.
    pub validation: ValidationSource,
    /// Decoded examples are cached here across epochs and runs.
    pub cache_dir: PathBuf,
    /// The starting model.
    pub base: BaseModel,
    /// Model registry location; with it the candidate is published as a new version.
    pub registry: Option<String>,
    /// Class names (without the background); default: the sorted names in the training data.
    pub classes: Option<Vec<String>>,
    /// Resize bounds of the network's input (torchvision `min_size`, `max_size`).
    pub min_size: i64,
    /// See `min_size`.
    pub max_size: i64,
    /// ResNet stages that train, 0–5 (torchvision's `trainable_backbone_layers`).
    pub trainable_backbone_layers: u8,
    /// One replica per device (data-parallel).
    pub devices: Vec<Device>,
    /// Optimizer, schedule, batch, steps, augmentation, seed.
    pub settings: TrainSettings,
    /// Run folder: checkpoints, the candidate's weights, report.json, pr_curve.png.
    pub out_dir: PathBuf,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Images per evaluation batch.
    pub eval_batch_size: usize,
    /// Promote the published candidate under this policy (needs `registry`).
    pub promote: Option<PromotionPolicy>,
    /// Show a progress bar on stderr (false: progress goes to periodic log lines only).
    pub progress: bool,
    /// Where each step's figures go as OpenTelemetry metrics (`attrstream_train_*`), if anywhere.
    pub metrics: Option<crate::telemetry::TrainMetrics>,
}

/// What a job did; also written to `report.json` in the run folder.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    /// Replay of the training topic.
    pub replay: ReplayReport,
    /// Replay of the validation topic, if one was used.
    pub validation_replay: Option<ReplayReport>,
    /// Split sizes.
    pub split: SplitReport,
    /// Classes in label-map order (index 1 onwards).
    pub classes: Vec<String>,
    /// Figures of every step run by this process.
    pub steps: Vec<StepStats>,
    /// The step a checkpoint resumed at, if any.
    pub resumed_at: Option<u64>,
    /// The starting model on the validation set.
    pub base_metrics: CocoMetrics,
    /// The candidate on the validation set.
    pub candidate_metrics: CocoMetrics,
    /// The validation set's fingerprint (both metrics were measured on it).
    pub validation_fingerprint: String,
    /// The candidate's weights file.
    pub weights: PathBuf,
    /// The registry version it was published as.
    pub version: Option<VersionId>,
    /// The promotion decision, if promotion was asked for.
    pub promotion: Option<PromotionDecision>,
    /// Wall time of the training steps.
    pub training_seconds: f64,
}

/// Runs the job on a runtime of its own (blocking).
pub fn run(job: TrainJob) -> Result<TrainOutcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the training runtime")?;
    runtime.block_on(run_async(job))
}

async fn replay_topic(
    config: &Config,
    topic: &str,
    ranges: &ReplayRanges,
    cache: &Path,
) -> Result<(Vec<Example>, ReplayReport)> {
    let mut options = ReplayOptions::from_config(config, topic)?;
    options.ranges = ranges.clone();
    options.cache_dir = Some(cache.to_path_buf());
    let snapshot = snapshot_blocking(options.clone())
        .await
        .with_context(|| format!("fixing the offsets of `{topic}` to replay"))?;
    let replay = read_snapshot(&options, &snapshot)
        .await
        .with_context(|| format!("replaying `{topic}`"))?;
    Ok((replay.examples, replay.report))
}

async fn run_async(job: TrainJob) -> Result<TrainOutcome> {
    std::fs::create_dir_all(&job.out_dir).with_context(|| format!("creating {}", job.out_dir.display()))?;
    let (examples, replay_report) = replay_topic(&job.config, &job.topic, &job.ranges, &job.cache_dir).await?;
    tracing::info!(
        examples = examples.len(),
        skipped = replay_report.skipped.len(),
        "training topic replayed"
    );
    let (mut data, validation_replay) = match &job.validation {
        ValidationSource::Split(strategy) => (split(examples, strategy)?, None),
        ValidationSource::Topic { topic, ranges } => {
            let (validation, report) = replay_topic(&job.config, topic, ranges, &job.cache_dir).await?;
            (split_explicit(examples, validation), Some(report))
        }
    };
    if data.train.is_empty() {
        bail!("no training examples after the split: check the topic, its ranges and the split settings");
    }
    if data.validation.is_empty() {
        bail!(
            "no validation examples after the split: raise the validation fraction, check the split hints, \
             or give a validation topic"
        );
    }
    let classes = match &job.classes {
        Some(c) => c.clone(),
        None => {
            let mut names: Vec<String> = data.train.iter().flat_map(|e| e.labels.iter().cloned()).collect();
            names.sort();
            names.dedup();
            names
        }
    };
    if classes.is_empty() {
        bail!("the training examples have no boxes: nothing to learn");
    }
    let registry = match &job.registry {
        Some(location) => Some(ModelRegistry::open(location)?),
        None => None,
    };
    let weights_cache = job.out_dir.join("registry-cache");
    let (base_path, parent) = match &job.base {
        BaseModel::Weights(path) => (path.clone(), None),
        BaseModel::Registry(reference) => {
            let registry = registry
                .as_ref()
                .context("a registry base model needs --model-registry (or model.registry)")?;
            let resolved = resolve_model(registry, reference, &weights_cache).await?;
            (resolved.weights, Some(resolved.version))
        }
    };
    let fingerprint = validation_fingerprint(&data.validation);
    let eval_batch = job.eval_batch_size;
    let eval_cfg = inference_config(job.min_size, job.max_size);

    // The starting model on the validation set, measured now so both numbers share one set.
    let base_metrics = {
        let (path, validation, classes, cfg) = (
            base_path.clone(),
            data.validation.clone(),
            classes.clone(),
            eval_cfg.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let detector = Detector::load(&path, Device::Cpu, cfg, true)?;
            evaluate_detector(&detector, &validation, &classes, eval_batch)
        })
        .await??
    };
    tracing::info!(
        map = base_metrics.stats.ap,
        ap50 = base_metrics.stats.ap50,
        "starting model evaluated"
    );

    let labels: Vec<String> = std::iter::once("__background__".to_string())
        .chain(classes.iter().cloned())
        .collect();
    // Labels are checked against the label map now, before any step runs.
    for e in &data.train {
        if let Some(l) = e.labels.iter().find(|l| !classes.contains(l)) {
            bail!("label `{l}` of {} is not in the label map {classes:?}", e.product_id);
        }
    }
    let train_examples = std::mem::take(&mut data.train);
    let model_cfg = FasterRcnnConfig {
        num_classes: labels.len() as i64,
        ..inference_config(job.min_size, job.max_size)
    };
    let (steps, resumed_at, training_seconds, candidate_path) = {
        let job = job.clone();
        let base_path = base_path.clone();
        let labels = labels.clone();
        tokio::task::spawn_blocking(move || train_loop(&job, &base_path, &model_cfg, &labels, &train_examples))
            .await??
    };

    let candidate_metrics = {
        let (path, validation, classes, cfg) = (
            candidate_path.clone(),
            data.validation.clone(),
            classes.clone(),
            eval_cfg,
        );
        tokio::task::spawn_blocking(move || {
            let detector = Detector::load(&path, Device::Cpu, cfg, true)?;
            evaluate_detector(&detector, &validation, &classes, eval_batch)
        })
        .await??
    };
    tracing::info!(
        map = candidate_metrics.stats.ap,
        ap50 = candidate_metrics.stats.ap50,
        "candidate evaluated"
    );
    std::fs::write(
        job.out_dir.join("metrics.json"),
        serde_json::to_vec_pretty(&candidate_metrics)?,
    )?;
    crate::train::pr_plot::write_pr_plot(&candidate_metrics, &job.out_dir.join("pr_curve.png"))
        .context("writing the precision-recall plot")?;

    let (version, promotion) = match &registry {
        Some(registry) => {
            let mut new = NewVersion::new(&candidate_path);
            new.labels = Some(labels.clone());
            new.parent = parent.clone();
            new.training_data = Some(training_data(&job.topic, &replay_report));
            new.training_config = Some(serde_json::to_value(&job.settings)?);
            new.metrics = Some(eval_metrics(&candidate_metrics, &fingerprint, data.validation.len()));
            new.parent_metrics = Some(eval_metrics(&base_metrics, &fingerprint, data.validation.len()));
            let version = registry.publish(new).await.context("publishing the candidate")?;
            tracing::info!(version = %version.as_str(), "candidate published");
            let promotion = match &job.promote {
                Some(policy) => Some(
                    registry
                        .promote(&version, policy)
                        .await
                        .context("promoting the candidate")?,
                ),
                None => None,
            };
            (Some(version), promotion)
        }
        None => (None, None),
    };
    let outcome = TrainOutcome {
        replay: replay_report,
        validation_replay,
        split: data.report,
        classes,
        steps,
        resumed_at,
        base_metrics,
        candidate_metrics,
        validation_fingerprint: fingerprint,
        weights: candidate_path,
        version,
        promotion,
        training_seconds,
    };
    std::fs::write(job.out_dir.join("report.json"), serde_json::to_vec_pretty(&outcome)?)?;
    Ok(outcome)
}

/// Inference settings for evaluation at the training resolution.
fn inference_config(min_size: i64, max_size: i64) -> FasterRcnnConfig {
    FasterRcnnConfig {
        min_size,
        max_size,
        ..Default::default()
    }
}

/// The metrics a registry version records.
fn eval_metrics(m: &CocoMetrics, fingerprint: &str, images: usize) -> EvalMetrics {
    EvalMetrics {
        validation_fingerprint: fingerprint.to_string(),
        map: m.stats.ap.max(0.0),
        ap50: m.stats.ap50.max(0.0),
        ap75: m.stats.ap75.max(0.0),
        per_class_ap: m.classes.iter().map(|c| (c.name.clone(), c.ap)).collect(),
        images: Some(images as u64),
    }
}

/// The offsets a model was trained on.
fn training_data(topic: &str, report: &ReplayReport) -> TrainingData {
    TrainingData {
        topic: topic.to_string(),
        partitions: report
            .snapshot
            .partitions
            .iter()
            .map(|p| PartitionRange {
                partition: p.partition,
                start_offset: p.start,
                end_offset: p.end,
            })
            .collect(),
    }
}

/// An example as tensors with class indices (1-based) over `classes`.
fn to_train_example(e: &Example, classes: &[String]) -> Result<TrainExample> {
    let labels = e
        .labels
        .iter()
        .map(|l| {
            classes
                .iter()
                .position(|c| c == l)
                .map(|i| i as i64 + 1)
                .with_context(|| format!("label `{l}` of {} is not in the label map {classes:?}", e.product_id))
        })
        .collect::<Result<Vec<i64>>>()?;
    let flat: Vec<f32> = e.boxes.iter().flatten().copied().collect();
    Ok(TrainExample {
        image: e.to_tensor(Device::Cpu),
        boxes: Tensor::from_slice(&flat).view([-1, 4]).to_kind(Kind::Float),
        labels: Tensor::from_slice(&labels),
    })
}

/// Builds the trainer, resumes from a checkpoint if there is one, runs the remaining steps
/// with a progress bar, and writes the candidate's weights.
fn train_loop(
    job: &TrainJob,
    base: &Path,
    model_cfg: &FasterRcnnConfig,
    labels: &[String],
    examples: &[Example],
) -> Result<(Vec<StepStats>, Option<u64>, f64, PathBuf)> {
    let build = |device: Device| -> Result<(VarStore, FasterRcnn)> {
        let (store, model, report) =
            FasterRcnn::load_for_fine_tuning(base, device, model_cfg.clone(), job.trainable_backbone_layers)
                .with_context(|| format!("loading {} for fine-tuning", base.display()))?;
        if report.predictor_replaced {
            tracing::info!(classes = labels.len(), "new label set: the box predictor starts fresh");
        }
        Ok((store, model))
    };
    let mut trainer = Trainer::new(&job.devices, build, job.settings.clone())?;
    let checkpoints = job.out_dir.join("checkpoints");
    let resumed_at = trainer.resume(&checkpoints)?;
    if let Some(step) = resumed_at {
        tracing::info!(step, "resumed from a checkpoint");
    }
    let total = job.settings.steps;
    let bar = progress(job.progress, total, trainer.next_step());
    let started = Instant::now();
    let mut stats = Vec::new();
    while trainer.next_step() < total {
        let indices = trainer.batch_indices(examples.len(), trainer.next_step());
        // Tensors are made per batch: the data set stays in memory as RGB bytes (a quarter of floats).
        let tensors = indices
            .iter()
            .map(|&i| to_train_example(&examples[i], &labels[1..]))
            .collect::<Result<Vec<_>>>()?;
        let batch: Vec<&TrainExample> = tensors.iter().collect();
        let s = trainer.step(&batch)?;
        if let Some(metrics) = &job.metrics {
            metrics.step(&s, batch.len());
        }
        bar.set_position(s.step + 1);
        bar.set_message(format!(
            "loss {:.3} (cls {:.3} box {:.3} obj {:.3} rpn {:.3}) lr {:.2e} {:.1} img/s",
            s.total(),
            s.classifier,
            s.box_reg,
            s.objectness,
            s.rpn_box_reg,
            s.lr,
            s.images_per_sec
        ));
        tracing::debug!(
            step = s.step,
            loss = s.total(),
            classifier = s.classifier,
            box_reg = s.box_reg,
            objectness = s.objectness,
            rpn_box_reg = s.rpn_box_reg,
            lr = s.lr,
            images_per_sec = s.images_per_sec,
            grad_norm = s.grad_norm,
            "training step"
        );
        stats.push(s);
        if job.checkpoint_every > 0 && trainer.next_step() % job.checkpoint_every == 0 && trainer.next_step() < total {
            trainer.save_checkpoint(&checkpoints, 2)?;
        }
    }
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    trainer.save_checkpoint(&checkpoints, 2)?;
    let out = job.out_dir.join("model.safetensors");
    let (store, model) = trainer.model();
    let mut tensors: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = WeightsMetadata {
        architecture: Some(crate::detection::FASTERRCNN_RESNET50_FPN.to_string()),
        labels: Some(labels.to_vec()),
        source: Some(format!("attrstream train on {} ({} steps)", job.topic, total)),
        source_sha256: None,
        config: Some(serde_json::to_value(model.config())?),
    };
    weights::save(&out, &tensors, &metadata).context("writing the candidate's weights")?;
    Ok((stats, resumed_at, seconds, out))
}

/// The steps' progress, with the step figures as its message: a bar on a terminal unless
/// `bar` is false (`--no-progress`), else periodic log lines.
fn progress(bar: bool, total: u64, position: u64) -> Progress {
    let options = ProgressOptions {
        start: position,
        bar,
        ..ProgressOptions::default()
    };
    Progress::with_options("train", Some(total), options)
}
