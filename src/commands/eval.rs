//! `attrstream eval`: COCO metrics of detections against ground truth, printed and written as
//! `metrics.json` and `pr_curve.png`.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};

use crate::cli::EvalArgs;
use crate::exit::{usage, UsageContext};
use crate::train::coco_eval::{self, CocoMetrics, GroundTruth};
use crate::train::pr_plot;

/// File name of the metrics written into `--out`.
pub const METRICS_FILE: &str = "metrics.json";
/// File name of the precision-recall plot written into `--out`.
pub const PLOT_FILE: &str = "pr_curve.png";

/// Evaluates a COCO results file against COCO ground truth (file mode), or a model over a
/// labelled topic (model mode).
pub fn run(args: EvalArgs) -> Result<ExitCode> {
    let metrics = match (&args.ground_truth, &args.detections, &args.model) {
        (Some(gt), Some(detections), None) => {
            // The two files are the command's arguments: unreadable or inconsistent ones are
            // usage errors (exit code 2).
            let gt = GroundTruth::from_coco_json(gt).usage()?;
            let detections = coco_eval::load_results_json(detections).usage()?;
            coco_eval::evaluate_with_progress(&gt, &detections, "evaluate categories").usage()?
        }
        (None, None, Some(model)) => evaluate_model(&args, model)?,
        _ => {
            return Err(usage(anyhow!(
                "say what to evaluate: --ground-truth GT.json --detections RESULTS.json (file mode), \
                 or --model WEIGHTS --topic LABELLED_TOPIC (model mode)"
            )))
        }
    };
    report(&metrics);

    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let metrics_path = args.out.join(METRICS_FILE);
    let json = serde_json::to_vec_pretty(&metrics).context("cannot serialize the metrics")?;
    std::fs::write(&metrics_path, json).with_context(|| format!("cannot write {}", metrics_path.display()))?;
    let plot_path = args.out.join(PLOT_FILE);
    pr_plot::write_pr_plot(&metrics, &plot_path)?;
    eprintln!(
        "attrstream: wrote {} and {}",
        metrics_path.display(),
        plot_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Model mode: replays the topic (bounded snapshot, no group commits), optionally keeps the
/// validation side of the product-hash split, runs the model and evaluates its detections.
fn evaluate_model(args: &EvalArgs, weights: &std::path::Path) -> Result<CocoMetrics> {
    use crate::model::faster_rcnn::FasterRcnnConfig;
    use crate::train::replay::{replay, ReplayOptions, ReplayRanges};
    use crate::train::split::{split, SplitStrategy};
    let config = crate::serve::load_config_without_serve_schemas(&args.config)?;
    let topic = args.topic.as_deref().context("--model needs --topic")?;
    let mut options = ReplayOptions::from_config(&config, topic)?;
    if !args.ranges.is_empty() {
        options.ranges = ReplayRanges::parse(&args.ranges).context("--range").usage()?;
    }
    let replayed = replay(&options).with_context(|| format!("replaying {topic}"))?;
    let mut examples = replayed.examples;
    if let Some(fraction) = args.validation_fraction {
        let strategy = SplitStrategy::ProductHash {
            validation_fraction: fraction,
            salt: args.split_salt.clone(),
        };
        examples = split(examples, &strategy)?.validation;
    }
    if examples.is_empty() {
        bail!("no labelled images to evaluate on in {topic} (check --range and --validation-fraction)");
    }
    let classes = match &args.classes {
        Some(c) => c.clone(),
        None => {
            let mut names: Vec<String> = examples.iter().flat_map(|e| e.labels.iter().cloned()).collect();
            names.sort();
            names.dedup();
            names
        }
    };
    let mut cfg = FasterRcnnConfig::default();
    if let Some(meta) = crate::model::weights::read_metadata(weights)?.config {
        cfg.apply_weights_config(&meta);
    }
    cfg.min_size = args.min_size.unwrap_or(cfg.min_size);
    cfg.max_size = args.max_size.unwrap_or(cfg.max_size);
    let detector = crate::detection::Detector::load(weights, config_device(&config)?, cfg, true)?;
    crate::train::evaluate::evaluate_detector(&detector, &examples, &classes, 4)
}

/// The first configured device (`--devices`), else the default one.
fn config_device(config: &crate::config::Config) -> Result<tch::Device> {
    Ok(crate::serve::configured_devices(config)?
        .first()
        .copied()
        .unwrap_or(tch::Device::Cpu))
}

/// Prints the summary and the per-class table to stdout, warnings to stderr.
fn report(metrics: &CocoMetrics) {
    let c = &metrics.counts;
    eprintln!(
        "attrstream: evaluated {} detections on {} images ({} objects, {} crowd regions, {} categories)",
        c.detections,
        c.images,
        c.annotations - c.crowd_annotations,
        c.crowd_annotations,
        c.categories
    );
    if c.ignored_detections > 0 {
        eprintln!(
            "attrstream: warning: {} detections have a category id the ground truth does not list and were \
             ignored (as pycocotools does); check that the model's label ids match the ground truth's",
            c.ignored_detections
        );
    }
    print!("{}", metrics.summary_table());
    println!();
    print!("{}", metrics.per_class_table());
}
