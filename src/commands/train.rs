//! `attrstream train`: the command-line face of [`crate::train::job`].

use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::{ScheduleKind, SplitKind, TrainArgs};
use crate::exit::UsageContext;
use crate::serve::load_config_without_serve_schemas;
use crate::telemetry::Telemetry;
use crate::train::job::{self, BaseModel, TrainJob, ValidationSource};
use crate::train::registry::PromotionPolicy;
use crate::train::replay::ReplayRanges;
use crate::train::sgd::{Decay, LrSchedule, SgdConfig};
use crate::train::split::SplitStrategy;
use crate::train::trainer::TrainSettings;

/// Runs the job and prints its outcome; exits 0 when it trained (and, with `--promote`, the
/// candidate was promoted), 1 when the promotion was refused (the reason is printed and
/// recorded in the registry), 2 for bad flags or configuration (see [`crate::exit`]).
pub fn run(args: TrainArgs) -> Result<ExitCode> {
    let mut job = job_from_args(args).usage()?;
    // Step figures go out by OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set; tracing spans too.
    let telemetry = Telemetry::for_command(&job.config.telemetry)?;
    job.metrics = Some(telemetry.train_metrics());
    let outcome = {
        let _span = tracing::info_span!("train", topic = %job.topic, steps = job.settings.steps).entered();
        job::run(job)
    };
    telemetry.finish();
    let outcome = outcome?;
    let first = outcome.steps.first().map(|s| s.total());
    let last = outcome.steps.last().map(|s| s.total());
    eprintln!(
        "attrstream: trained {} steps in {:.0} s ({} train / {} validation images); loss {} -> {}",
        outcome.steps.len(),
        outcome.training_seconds,
        outcome.split.train.images,
        outcome.split.validation.images,
        first.map_or("-".into(), |v| format!("{v:.3}")),
        last.map_or("-".into(), |v| format!("{v:.3}")),
    );
    eprintln!(
        "attrstream: validation mAP {:.4} (AP50 {:.4}) for the candidate, {:.4} (AP50 {:.4}) for the starting model",
        outcome.candidate_metrics.stats.ap,
        outcome.candidate_metrics.stats.ap50,
        outcome.base_metrics.stats.ap,
        outcome.base_metrics.stats.ap50,
    );
    if let Some(v) = &outcome.version {
        eprintln!("attrstream: published as registry version {}", v.as_str());
    }
    if let Some(d) = &outcome.promotion {
        eprintln!(
            "attrstream: {}: {}",
            if d.promoted { "promoted" } else { "not promoted" },
            d.reason
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "weights": outcome.weights,
            "version": outcome.version.as_ref().map(|v| v.as_str().to_string()),
            "promoted": outcome.promotion.as_ref().map(|d| d.promoted),
            "candidate_map": outcome.candidate_metrics.stats.ap,
            "candidate_ap50": outcome.candidate_metrics.stats.ap50,
            "base_map": outcome.base_metrics.stats.ap,
            "base_ap50": outcome.base_metrics.stats.ap50,
            "first_loss": first,
            "last_loss": last,
        })
    );
    Ok(match &outcome.promotion {
        Some(decision) if !decision.promoted => ExitCode::from(crate::exit::SOME_INPUTS_FAILED),
        _ => ExitCode::SUCCESS,
    })
}

/// Turns the arguments into a job, checking them with messages that name the flag.
fn job_from_args(args: TrainArgs) -> Result<TrainJob> {
    let config = load_config_without_serve_schemas(&args.config)?;
    let registry = args.model_registry.clone().or_else(|| config.model.registry.clone());
    let base = match (&args.base, &args.base_version) {
        (Some(path), _) => BaseModel::Weights(path.clone()),
        (None, Some(version)) => BaseModel::Registry(version.clone()),
        (None, None) if registry.is_some() => BaseModel::Registry("production".into()),
        (None, None) => bail!(
            "say which model to start from: --base WEIGHTS.safetensors, or --base-version production|VERSION \
             with --model-registry"
        ),
    };
    if args.promote && registry.is_none() {
        bail!("--promote needs a model registry: --model-registry LOCATION or model.registry");
    }
    let ranges = parse_ranges(&args.ranges).context("--range")?;
    let validation = match (&args.validation_topic, args.split) {
        (Some(topic), _) => ValidationSource::Topic {
            topic: topic.clone(),
            ranges: parse_ranges(&args.validation_ranges).context("--validation-range")?,
        },
        (None, SplitKind::ProductHash) => ValidationSource::Split(SplitStrategy::ProductHash {
            validation_fraction: args.validation_fraction,
            salt: args.split_salt.clone(),
        }),
        (None, SplitKind::Hint) => ValidationSource::Split(SplitStrategy::Hint),
        (None, SplitKind::Offsets) => {
            if args.validation_offsets.is_empty() {
                bail!("--split offsets needs at least one --validation-offsets PARTITION:START..END");
            }
            let ranges = args
                .validation_offsets
                .iter()
                .map(|s| parse_offset_range(s))
                .collect::<Result<Vec<_>>>()?;
            ValidationSource::Split(SplitStrategy::OffsetRanges(ranges))
        }
    };
    if !(0.0..=1.0).contains(&args.hflip) {
        bail!("--hflip must be a probability between 0 and 1, got {}", args.hflip);
    }
    if args.batch_size == 0 || args.steps == 0 {
        bail!("--batch-size and --steps must be at least 1");
    }
    let devices = crate::serve::configured_devices(&config)?;
    let decay = match args.schedule {
        ScheduleKind::Cosine => Decay::Cosine { min_lr: args.min_lr },
        ScheduleKind::Constant => Decay::Constant,
        ScheduleKind::Step => Decay::Step {
            milestones: if args.milestones.is_empty() {
                vec![args.steps * 2 / 3, args.steps * 8 / 9]
            } else {
                args.milestones.clone()
            },
            gamma: args.gamma,
        },
    };
    let settings = TrainSettings {
        batch_size: args.batch_size,
        steps: args.steps,
        schedule: LrSchedule {
            base_lr: args.lr,
            warmup_steps: args.warmup_steps.min(args.steps),
            warmup_factor: args.warmup_factor,
            decay,
            total_steps: args.steps,
        },
        sgd: SgdConfig {
            momentum: args.momentum,
            weight_decay: args.weight_decay,
        },
        hflip_prob: args.hflip,
        clip_grad_norm: args.clip_grad_norm,
        seed: args.seed,
        deterministic_sampling: false,
    };
    let promote = if args.promote {
        Some(PromotionPolicy {
            force: args.force,
            metric: args.metric.parse().map_err(|e| anyhow::anyhow!("--metric: {e}"))?,
            min_improvement: args.min_improvement,
            note: Some(format!("attrstream train on {}", args.topic)),
        })
    } else {
        None
    };
    Ok(TrainJob {
        config,
        topic: args.topic.clone(),
        ranges,
        validation,
        cache_dir: args.cache_dir.clone().unwrap_or_else(|| args.out.join("cache")),
        base,
        registry,
        classes: args.classes.clone(),
        min_size: args.min_size,
        max_size: args.max_size,
        trainable_backbone_layers: args.trainable_backbone_layers,
        devices,
        settings,
        out_dir: args.out.clone(),
        checkpoint_every: args.checkpoint_every,
        eval_batch_size: args.eval_batch_size.max(1),
        promote,
        progress: !args.no_progress,
        metrics: None,
    })
}

fn parse_ranges(specs: &[String]) -> Result<ReplayRanges> {
    if specs.is_empty() {
        Ok(ReplayRanges::everything())
    } else {
        ReplayRanges::parse(specs)
    }
}

/// `PARTITION:START..END` (end exclusive).
fn parse_offset_range(spec: &str) -> Result<(i32, std::ops::Range<i64>)> {
    let bad = || format!("--validation-offsets `{spec}`: expected PARTITION:START..END, e.g. 0:100..200");
    let (partition, range) = spec.split_once(':').with_context(bad)?;
    let (start, end) = range.split_once("..").with_context(bad)?;
    let partition: i32 = partition.trim().parse().with_context(bad)?;
    let start: i64 = start.trim().parse().with_context(bad)?;
    let end: i64 = end.trim().parse().with_context(bad)?;
    if end <= start {
        bail!("{}: the end must be above the start", bad());
    }
    Ok((partition, start..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_ranges_parse_and_reject_nonsense() {
        assert_eq!(parse_offset_range("2:10..20").unwrap(), (2, 10..20));
        assert!(parse_offset_range("2:20..10").is_err());
        assert!(parse_offset_range("10..20")
            .unwrap_err()
            .to_string()
            .contains("PARTITION:START..END"));
    }
}
