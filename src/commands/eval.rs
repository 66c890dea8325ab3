//! `attrstream eval`: COCO metrics of detections against ground truth, printed and written as
//! `metrics.json` and `pr_curve.png`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::EvalArgs;
use crate::train::coco_eval::{self, CocoMetrics, GroundTruth};
use crate::train::pr_plot;

/// File name of the metrics written into `--out`.
pub const METRICS_FILE: &str = "metrics.json";
/// File name of the precision-recall plot written into `--out`.
pub const PLOT_FILE: &str = "pr_curve.png";

/// Evaluates a COCO results file against COCO ground truth.
pub fn run(args: EvalArgs) -> Result<ExitCode> {
    let Some(detections_path) = &args.detections else {
        bail!(
            "--detections RESULTS.json is required: `attrstream eval` evaluates a COCO results file \
             (evaluating a model over a labelled validation topic is not available yet)"
        );
    };
    let gt = GroundTruth::from_coco_json(&args.ground_truth)?;
    let detections = coco_eval::load_results_json(detections_path)?;
    let metrics = coco_eval::evaluate(&gt, &detections)?;
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
