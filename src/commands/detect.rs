//! `attrstream detect`: detections for image files, as JSON lines, plus annotated PNGs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use image::RgbImage;
use serde_json::json;

use crate::cli::DetectArgs;
use crate::detection::{resolve_default_weights, Detector};
use crate::exit::UsageContext;
use crate::model::faster_rcnn::FasterRcnnConfig;

/// Runs detection; a file that cannot be read or decoded is reported and skipped, and the
/// exit code is non-zero if any file failed.
pub fn run(args: DetectArgs) -> Result<ExitCode> {
    let device = crate::device::parse_device(&args.device).context("--device").usage()?;
    let cfg = FasterRcnnConfig {
        box_score_thresh: args.score_threshold,
        min_size: args.min_size,
        max_size: args.max_size,
        ..Default::default()
    };
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => resolve_default_weights()?,
    };
    let detector = Detector::load(&weights, device, cfg, args.exact)?;
    eprintln!(
        "attrstream: using {} ({}) on {}",
        weights.display(),
        detector.architecture(),
        crate::device::device_name(device)
    );
    if let Some(dir) = &args.annotate {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut failures = 0usize;
    let mut pending: Vec<(PathBuf, RgbImage)> = Vec::new();
    for path in &args.images {
        match load_image(path, args.max_pixels) {
            Ok(image) => pending.push((path.clone(), image)),
            Err(e) => {
                failures += 1;
                report_error(path, &e);
            }
        }
        if pending.len() >= args.batch_size.max(1) {
            failures += detect_batch(&detector, &mut pending, args.annotate.as_deref());
        }
    }
    failures += detect_batch(&detector, &mut pending, args.annotate.as_deref());
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(crate::preprocess::decode_image(&bytes, max_pixels)?)
}

fn report_error(path: &Path, e: &anyhow::Error) {
    eprintln!("error: {}: {e:#}", path.display());
    println!("{}", json!({ "image": path, "error": format!("{e:#}") }));
}

/// Detects on the pending images, prints their records, annotates; returns failures.
fn detect_batch(detector: &Detector, pending: &mut Vec<(PathBuf, RgbImage)>, annotate: Option<&Path>) -> usize {
    if pending.is_empty() {
        return 0;
    }
    let batch = std::mem::take(pending);
    let images: Vec<RgbImage> = batch.iter().map(|(_, im)| im.clone()).collect();
    let started = std::time::Instant::now();
    let results = match detector.detect(&images) {
        Ok(r) => r,
        Err(e) => {
            batch.iter().for_each(|(p, _)| report_error(p, &e));
            return batch.len();
        }
    };
    let per_image_ms = started.elapsed().as_secs_f64() * 1000.0 / batch.len() as f64;
    let mut failures = 0;
    for ((path, image), result) in batch.iter().zip(results) {
        let mut record = json!({
            "image": path,
            "model": detector.name(),
            "architecture": detector.architecture(),
            "width": result.width,
            "height": result.height,
            "detections": result.detections,
            "inference_ms": (per_image_ms * 10.0).round() / 10.0,
        });
        if let Some(dir) = annotate {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let out = dir.join(format!("{name}.png"));
            match crate::annotate::annotate(image, &result.detections).save(&out) {
                Ok(()) => record["annotated"] = json!(out),
                Err(e) => {
                    failures += 1;
                    eprintln!("error: cannot write {}: {e}", out.display());
                }
            }
        }
        println!("{record}");
    }
    failures
}
