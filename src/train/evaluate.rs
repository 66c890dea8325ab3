//! Evaluating a detector on labelled examples: ground truth and detections in COCO terms,
//! then [`coco_eval`](crate::train::coco_eval), so every model (a starting checkpoint with
//! another label map, a candidate, the production version) is measured the same way.
//!
//! Classes are matched by name: category `k` is `classes[k - 1]`, and a detection whose label
//! is not one of `classes` is ignored (a COCO model evaluated on a new label set scores 0 on
//! the classes it does not know, rather than failing).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::detection::Detector;
use crate::progress::Progress;
use crate::train::coco_eval::{self, Annotation, Category, CocoMetrics, DetectionResult, GroundTruth, Image};
use crate::train::replay::Example;

/// The ground truth of `examples` (image id = position in the slice) over `classes`.
/// Objects with a label outside `classes` are an error: the label map must cover the data.
pub fn ground_truth(examples: &[Example], classes: &[String]) -> Result<GroundTruth> {
    let images = examples
        .iter()
        .enumerate()
        .map(|(i, e)| Image {
            id: i as i64,
            width: e.width(),
            height: e.height(),
        })
        .collect();
    let categories = classes
        .iter()
        .enumerate()
        .map(|(i, name)| Category {
            id: i as i64 + 1,
            name: name.clone(),
        })
        .collect();
    let mut annotations = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        for (k, (b, label)) in e.boxes.iter().zip(&e.labels).enumerate() {
            let category = classes.iter().position(|c| c == label).with_context(|| {
                format!(
                    "example {i} ({}) has label `{label}`, which is not in the label map {classes:?}",
                    e.product_id
                )
            })?;
            let (w, h) = ((b[2] - b[0]) as f64, (b[3] - b[1]) as f64);
            annotations.push(Annotation {
                id: annotations.len() as i64 + 1,
                image_id: i as i64,
                category_id: category as i64 + 1,
                bbox: [b[0] as f64, b[1] as f64, w, h],
                area: w * h,
                iscrowd: e.iscrowd.get(k).copied().unwrap_or(false),
            });
        }
    }
    GroundTruth::new(images, categories, annotations).context("building the evaluation ground truth")
}

/// Runs `detector` over `examples` in batches of `batch_size` and returns its detections as
/// COCO results over `classes` (detections of other labels dropped), showing the images done.
pub fn detections(
    detector: &Detector,
    examples: &[Example],
    classes: &[String],
    batch_size: usize,
) -> Result<Vec<DetectionResult>> {
    let mut out = Vec::new();
    let progress = Progress::new("evaluate", Some(examples.len() as u64));
    for (chunk_index, chunk) in examples.chunks(batch_size.max(1)).enumerate() {
        let images: Vec<image::RgbImage> = chunk.iter().map(|e| e.image.clone()).collect();
        let found = tch::no_grad(|| detector.detect(&images)).context("running the detector for evaluation")?;
        for (j, image) in found.into_iter().enumerate() {
            let image_id = (chunk_index * batch_size.max(1) + j) as i64;
            for d in image.detections {
                let Some(category) = classes.iter().position(|c| *c == d.label) else {
                    continue;
                };
                let [x1, y1, x2, y2] = d.box_px.map(|v| v as f64);
                out.push(DetectionResult {
                    image_id,
                    category_id: category as i64 + 1,
                    bbox: [x1, y1, x2 - x1, y2 - y1],
                    score: d.score as f64,
                });
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    Ok(out)
}

/// COCO metrics of `detector` on `examples` over `classes`.
pub fn evaluate_detector(
    detector: &Detector,
    examples: &[Example],
    classes: &[String],
    batch_size: usize,
) -> Result<CocoMetrics> {
    let gt = ground_truth(examples, classes)?;
    let dets = detections(detector, examples, classes, batch_size)?;
    coco_eval::evaluate(&gt, &dets).context("evaluating detections")
}

/// A fingerprint of a validation set: sha256 over each example's source, product, pixels and
/// annotations, in order. Two metrics are comparable only if their fingerprints are equal.
pub fn validation_fingerprint(examples: &[Example]) -> String {
    let mut hash = Sha256::new();
    for e in examples {
        hash.update(e.source.topic.as_bytes());
        hash.update(e.source.partition.to_le_bytes());
        hash.update(e.source.offset.to_le_bytes());
        hash.update(e.product_id.as_bytes());
        hash.update(e.width().to_le_bytes());
        hash.update(e.height().to_le_bytes());
        hash.update(Sha256::digest(e.image.as_raw()));
        for (b, label) in e.boxes.iter().zip(&e.labels) {
            for v in b {
                hash.update(v.to_le_bytes());
            }
            hash.update(label.as_bytes());
            hash.update([0u8]);
        }
        hash.update([0xffu8]);
    }
    format!("sha256:{}", hex::encode(hash.finalize()))
}
