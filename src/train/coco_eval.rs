//! COCO box evaluation (mAP), equal to pycocotools' `COCOeval(gt, dt, iouType="bbox")`.
//!
//! A model is only promoted when it evaluates better, and "better" must mean what the rest of
//! the field means by COCO mAP. So this is a faithful port of pycocotools 2.0 `cocoeval.py`
//! (`evaluate`, `evaluateImg`, `accumulate`, `summarize`) and of `bbIou` in `maskApi.c`, with
//! the same parameters: IoU thresholds .50:.05:.95 and recall thresholds 0:.01:1 (computed as
//! `numpy.linspace` does), area ranges all/small/medium/large (0, 32², 96², 1e5² on the
//! annotation's `area`), maxDets 1/10/100. The semantics carried over:
//! * detections are ranked by score with a stable sort (numpy `mergesort`): ties keep file
//!   order per image, then image-id order across images; only the top 100 per image and class
//!   are matched;
//! * a crowd annotation is always "ignore"; its IoU is intersection over the detection's area,
//!   and it can absorb any number of detections, which are then ignored;
//!   annotations outside the area range are ignored too, and so are unmatched detections
//!   whose box area (`w * h`) is outside it. A JSON `"ignore"` key has no effect (pycocotools
//!   overwrites it with `iscrowd`);
//! * greedy matching in score order, each detection to the best-IoU unmatched annotation,
//!   preferring non-ignored annotations;
//! * precision is made monotone (the envelope) and read at each recall threshold with a
//!   left `searchsorted`; beyond the highest recall reached it is 0;
//! * -1 where a value is undefined (no non-ignored ground truth), and means skip the -1s;
//!   means use numpy's pairwise summation, so they are equal to pycocotools' bit for bit.
//!
//! Differences, all where pycocotools crashes or is silent: an empty detection list is
//! evaluated (pycocotools' `loadRes` raises), and bad input (unknown image, bad box, NaN score,
//! duplicate ids, annotation id 0) is refused with a message. `tests/coco_eval_reference.rs`
//! checks the results against pycocotools itself on randomized data.

mod dataset;
mod metrics;

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::progress::Progress;

pub use dataset::{load_results_json, Annotation, Category, CocoDataError, DetectionResult, GroundTruth, Image};
pub use metrics::{ClassCurve, ClassMetrics, CocoMetrics, CocoStats, EvalCounts, PrCurve, PrCurves};

/// Number of IoU thresholds (.50:.05:.95).
pub const NUM_IOU_THRESHOLDS: usize = 10;
/// Number of recall thresholds (0:.01:1).
pub const NUM_RECALL_THRESHOLDS: usize = 101;
/// The area ranges, in pycocotools' order: all, small, medium, large.
pub const AREA_RANGES: [(&str, f64, f64); 4] = [
    ("all", 0.0, 1e10),
    ("small", 0.0, 1024.0),
    ("medium", 1024.0, 9216.0),
    ("large", 9216.0, 1e10),
];
/// The detection budgets per image, in pycocotools' order.
pub const MAX_DETS: [usize; 3] = [1, 10, 100];

/// The IoU thresholds 0.50, 0.55, …, 0.95, computed as `numpy.linspace(.5, .95, 10)` does
/// (so that e.g. the threshold 0.65 is the same double as pycocotools').
pub fn iou_thresholds() -> [f64; NUM_IOU_THRESHOLDS] {
    linspace(0.5, 0.95)
}

/// The recall thresholds 0.00, 0.01, …, 1.00, computed as `numpy.linspace(0, 1, 101)` does.
pub fn recall_thresholds() -> [f64; NUM_RECALL_THRESHOLDS] {
    linspace(0.0, 1.0)
}

fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut out = [0.0; N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = i as f64 * step + start;
    }
    out[N - 1] = stop;
    out
}

/// Evaluates detections against ground truth; the metrics pycocotools' `summarize()` prints,
/// plus per-class AP and precision-recall curves. Fails on detections of images the ground
/// truth does not list (pycocotools asserts the same) and on bad boxes or scores.
pub fn evaluate(gt: &GroundTruth, dets: &[DetectionResult]) -> Result<CocoMetrics, CocoDataError> {
    Ok(accumulate(gt, dets)?.metrics())
}

/// [`evaluate`] showing its progress (categories matched) under `label`, for large data sets.
pub fn evaluate_with_progress(
    gt: &GroundTruth,
    dets: &[DetectionResult],
    label: &str,
) -> Result<CocoMetrics, CocoDataError> {
    let progress = Progress::new(label, Some(gt.categories().len() as u64));
    let evaluation = accumulate_counting(gt, dets, Some(&progress))?;
    progress.finish();
    Ok(evaluation.metrics())
}

/// The accumulated evaluation: pycocotools' `eval["precision"]` and `eval["recall"]` arrays,
/// for callers that need more than [`CocoMetrics`] (other area ranges or budgets, reports).
#[derive(Debug, Clone)]
pub struct CocoEvaluation {
    /// Categories sorted by id (the K axis).
    categories: Vec<Category>,
    /// `[T, R, K, A, M]` row-major; -1 where the class has no non-ignored ground truth.
    precision: Vec<f64>,
    /// `[T, K, A, M]` row-major; -1 likewise.
    recall: Vec<f64>,
    /// Input sizes, for the report.
    counts: EvalCounts,
    /// Per category (sorted by id): non-crowd annotations and evaluated detections.
    class_counts: Vec<(usize, usize)>,
}

impl CocoEvaluation {
    /// The categories in evaluation order (sorted by id): the `k` index of the arrays.
    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// Interpolated precision at IoU threshold `t`, recall threshold `r`, category `k`, area
    /// range `a` and budget `m` (indexes into [`iou_thresholds`], [`recall_thresholds`],
    /// [`CocoEvaluation::categories`], [`AREA_RANGES`], [`MAX_DETS`]); -1 when undefined.
    /// `None` when an index is out of range.
    pub fn precision(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> Option<f64> {
        let k_len = self.categories.len();
        if t >= NUM_IOU_THRESHOLDS || r >= NUM_RECALL_THRESHOLDS || k >= k_len || a >= 4 || m >= 3 {
            return None;
        }
        Some(self.precision[precision_index(t, r, k, a, m, k_len)])
    }

    /// Highest recall reached at IoU threshold `t`, category `k`, area range `a`, budget `m`;
    /// -1 when undefined, `None` when an index is out of range.
    pub fn recall(&self, t: usize, k: usize, a: usize, m: usize) -> Option<f64> {
        let k_len = self.categories.len();
        if t >= NUM_IOU_THRESHOLDS || k >= k_len || a >= 4 || m >= 3 {
            return None;
        }
        Some(self.recall[recall_index(t, k, a, m, k_len)])
    }

    /// The summary: the 12 standard numbers, per-class AP and the precision-recall curves.
    pub fn metrics(&self) -> CocoMetrics {
        metrics::summarize(self)
    }
}

fn precision_index(t: usize, r: usize, k: usize, a: usize, m: usize, k_len: usize) -> usize {
    (((t * NUM_RECALL_THRESHOLDS + r) * k_len + k) * 4 + a) * 3 + m
}

fn recall_index(t: usize, k: usize, a: usize, m: usize, k_len: usize) -> usize {
    ((t * k_len + k) * 4 + a) * 3 + m
}

/// Runs pycocotools' `evaluate()` and `accumulate()`.
pub fn accumulate(gt: &GroundTruth, dets: &[DetectionResult]) -> Result<CocoEvaluation, CocoDataError> {
    accumulate_counting(gt, dets, None)
}

/// [`accumulate`], counting each category matched on `progress`.
fn accumulate_counting(
    gt: &GroundTruth,
    dets: &[DetectionResult],
    progress: Option<&Progress>,
) -> Result<CocoEvaluation, CocoDataError> {
    // p.imgIds and p.catIds: sorted unique ids.
    let mut image_ids: Vec<i64> = gt.images().iter().map(|i| i.id).collect();
    image_ids.sort_unstable();
    let mut categories = gt.categories().to_vec();
    categories.sort_by_key(|c| c.id);
    let image_index: HashMap<i64, usize> = image_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let category_index: HashMap<i64, usize> = categories.iter().enumerate().map(|(k, c)| (c.id, k)).collect();
    let (num_images, num_classes) = (image_ids.len(), categories.len());

    // _prepare(): ground truth and detections per (image, category), in input order.
    let mut gts: HashMap<(usize, usize), Vec<&Annotation>> = HashMap::new();
    let mut class_counts = vec![(0usize, 0usize); num_classes];
    for ann in gt.annotations() {
        // GroundTruth guarantees both ids are known.
        if let (Some(&i), Some(&k)) = (image_index.get(&ann.image_id), category_index.get(&ann.category_id)) {
            gts.entry((i, k)).or_default().push(ann);
            if !ann.iscrowd {
                class_counts[k].0 += 1;
            }
        }
    }
    let mut dts: HashMap<(usize, usize), Vec<&DetectionResult>> = HashMap::new();
    let mut ignored_detections = 0;
    for (index, det) in dets.iter().enumerate() {
        det.validate(index)?;
        let Some(&i) = image_index.get(&det.image_id) else {
            return Err(CocoDataError::UnknownImage {
                record: format!("detection #{index}"),
                image_id: det.image_id,
            });
        };
        match category_index.get(&det.category_id) {
            Some(&k) => {
                dts.entry((i, k)).or_default().push(det);
                class_counts[k].1 += 1;
            }
            None => ignored_detections += 1,
        }
    }

    // evaluate(): one result per (category, area range, image), None where the image has
    // neither ground truth nor detections of the category.
    let iou_thrs = iou_thresholds();
    let max_det = MAX_DETS[2];
    let mut eval_imgs: Vec<Option<ImageEval>> = Vec::with_capacity(num_classes * 4 * num_images);
    for k in 0..num_classes {
        let per_image: Vec<Option<ImageCategory>> = (0..num_images)
            .map(|i| {
                let gts = gts.get(&(i, k)).cloned().unwrap_or_default();
                let dts = dts.get(&(i, k)).cloned().unwrap_or_default();
                if gts.is_empty() && dts.is_empty() {
                    return None;
                }
                let dts = top_by_score(dts, max_det);
                let ious = box_ious(&dts, &gts);
                Some(ImageCategory { gts, dts, ious })
            })
            .collect();
        for &(_, lo, hi) in &AREA_RANGES {
            for entry in &per_image {
                eval_imgs.push(entry.as_ref().map(|e| evaluate_image(e, (lo, hi), &iou_thrs)));
            }
        }
        if let Some(p) = progress {
            p.inc(1);
        }
    }

    let (precision, recall) = accumulate_arrays(&eval_imgs, num_classes, num_images);
    Ok(CocoEvaluation {
        categories,
        precision,
        recall,
        counts: EvalCounts {
            images: num_images,
            categories: num_classes,
            annotations: gt.annotations().len(),
            crowd_annotations: gt.annotations().iter().filter(|a| a.iscrowd).count(),
            detections: dets.len(),
            ignored_detections,
        },
        class_counts,
    })
}

/// Stable sort by descending score (numpy `argsort(-score, kind="mergesort")`), then the first
/// `max_det`.
fn top_by_score(mut dets: Vec<&DetectionResult>, max_det: usize) -> Vec<&DetectionResult> {
    // partial_cmp, not total_cmp: like numpy, -0.0 and 0.0 tie (scores are validated finite).
    dets.sort_by(|a, b| b.score.partial_cmp(&a.score).unwrap_or(Ordering::Equal));
    dets.truncate(max_det);
    dets
}

/// `maskApi.c` `bbIou`: IoU of every detection with every annotation, `[D][G]` row-major;
/// for a crowd annotation the union is the detection's area.
fn box_ious(dts: &[&DetectionResult], gts: &[&Annotation]) -> Vec<f64> {
    let mut out = vec![0.0; dts.len() * gts.len()];
    for (g_idx, g) in gts.iter().enumerate() {
        let gb = &g.bbox;
        let ga = gb[2] * gb[3];
        for (d_idx, d) in dts.iter().enumerate() {
            let db = &d.bbox;
            let da = db[2] * db[3];
            let w = (db[2] + db[0]).min(gb[2] + gb[0]) - db[0].max(gb[0]);
            if w <= 0.0 {
                continue;
            }
            let h = (db[3] + db[1]).min(gb[3] + gb[1]) - db[1].max(gb[1]);
            if h <= 0.0 {
                continue;
            }
            let inter = w * h;
            let union = if g.iscrowd { da } else { da + ga - inter };
            out[d_idx * gts.len() + g_idx] = inter / union;
        }
    }
    out
}

/// pycocotools' per-image result for one category and area range.
#[derive(Debug)]
struct ImageEval {
    /// Scores of the (at most 100) detections, highest first.
    scores: Vec<f64>,
    /// `[T][D]`: the detection matched an annotation at IoU threshold t.
    matched: Vec<bool>,
    /// `[T][D]`: the detection is ignored (matched an ignored annotation, or unmatched and
    /// outside the area range).
    ignored: Vec<bool>,
    /// Annotations that count (not crowd, inside the area range).
    num_gt: usize,
}

/// One image's ground truth and detections of one category, with their IoUs.
struct ImageCategory<'a> {
    /// Annotations in input order.
    gts: Vec<&'a Annotation>,
    /// The top detections, highest score first.
    dts: Vec<&'a DetectionResult>,
    /// `[D][G]` in those orders.
    ious: Vec<f64>,
}

/// `evaluateImg`: greedy matching at every IoU threshold for one area range.
fn evaluate_image(input: &ImageCategory, (lo, hi): (f64, f64), iou_thrs: &[f64; NUM_IOU_THRESHOLDS]) -> ImageEval {
    let (gts, dts, ious) = (&input.gts, &input.dts, &input.ious);
    let g_len = gts.len();
    let gt_ignore_orig: Vec<bool> = gts.iter().map(|g| g.iscrowd || g.area < lo || g.area > hi).collect();
    // Stable: annotations that count first, ignored ones last, each in input order.
    let mut order: Vec<usize> = (0..g_len).collect();
    order.sort_by_key(|&g| gt_ignore_orig[g]);
    let gt_ignore: Vec<bool> = order.iter().map(|&g| gt_ignore_orig[g]).collect();
    let crowd: Vec<bool> = order.iter().map(|&g| gts[g].iscrowd).collect();

    let d_len = dts.len();
    let mut matched = vec![false; NUM_IOU_THRESHOLDS * d_len];
    let mut ignored = vec![false; NUM_IOU_THRESHOLDS * d_len];
    if d_len > 0 && g_len > 0 {
        let mut gt_taken = vec![false; g_len];
        for (t, &thr) in iou_thrs.iter().enumerate() {
            gt_taken.iter_mut().for_each(|x| *x = false);
            for d in 0..d_len {
                let mut best_iou = thr.min(1.0 - 1e-10);
                let mut best: Option<usize> = None;
                for g in 0..g_len {
                    // An annotation is taken once, except a crowd region.
                    if gt_taken[g] && !crowd[g] {
                        continue;
                    }
                    // Matched to an annotation that counts and reached the ignored ones: stop.
                    if best.is_some_and(|m| !gt_ignore[m]) && gt_ignore[g] {
                        break;
                    }
                    let iou = ious[d * g_len + order[g]];
                    if iou < best_iou {
                        continue;
                    }
                    best_iou = iou;
                    best = Some(g);
                }
                if let Some(m) = best {
                    ignored[t * d_len + d] = gt_ignore[m];
                    matched[t * d_len + d] = true;
                    gt_taken[m] = true;
                }
            }
        }
    }
    // Unmatched detections outside the area range are ignored.
    for d in 0..d_len {
        let b = &dts[d].bbox;
        let area = b[2] * b[3];
        if area < lo || area > hi {
            for t in 0..NUM_IOU_THRESHOLDS {
                if !matched[t * d_len + d] {
                    ignored[t * d_len + d] = true;
                }
            }
        }
    }
    ImageEval {
        scores: dts.iter().map(|d| d.score).collect(),
        matched,
        ignored,
        num_gt: gt_ignore.iter().filter(|&&ig| !ig).count(),
    }
}

/// `accumulate()`: precision `[T, R, K, A, M]` and recall `[T, K, A, M]`.
fn accumulate_arrays(eval_imgs: &[Option<ImageEval>], num_classes: usize, num_images: usize) -> (Vec<f64>, Vec<f64>) {
    let rec_thrs = recall_thresholds();
    let mut precision = vec![-1.0; NUM_IOU_THRESHOLDS * NUM_RECALL_THRESHOLDS * num_classes * 4 * 3];
    let mut recall = vec![-1.0; NUM_IOU_THRESHOLDS * num_classes * 4 * 3];
    for k in 0..num_classes {
        for a in 0..AREA_RANGES.len() {
            let start = (k * AREA_RANGES.len() + a) * num_images;
            let images: Vec<&ImageEval> = eval_imgs[start..start + num_images].iter().flatten().collect();
            if images.is_empty() {
                continue;
            }
            let num_gt: usize = images.iter().map(|e| e.num_gt).sum();
            if num_gt == 0 {
                continue; // Nothing to find: precision and recall stay -1.
            }
            for (m, &max_det) in MAX_DETS.iter().enumerate() {
                // (image, detection) pairs in concatenation order, then stably by score.
                let mut entries: Vec<(usize, usize)> = images
                    .iter()
                    .enumerate()
                    .flat_map(|(e, img)| (0..img.scores.len().min(max_det)).map(move |d| (e, d)))
                    .collect();
                entries.sort_by(|&(e1, d1), &(e2, d2)| {
                    images[e2].scores[d2]
                        .partial_cmp(&images[e1].scores[d1])
                        .unwrap_or(Ordering::Equal)
                });
                let nd = entries.len();
                for t in 0..NUM_IOU_THRESHOLDS {
                    let (mut tp, mut fp) = (0.0f64, 0.0f64);
                    let mut rc = Vec::with_capacity(nd);
                    let mut pr = Vec::with_capacity(nd);
                    for &(e, d) in &entries {
                        let img = images[e];
                        let i = t * img.scores.len() + d;
                        if !img.ignored[i] {
                            if img.matched[i] {
                                tp += 1.0;
                            } else {
                                fp += 1.0;
                            }
                        }
                        rc.push(tp / num_gt as f64);
                        pr.push(tp / (fp + tp + f64::EPSILON));
                    }
                    recall[recall_index(t, k, a, m, num_classes)] = rc.last().copied().unwrap_or(0.0);
                    // The precision envelope: non-increasing from the right.
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &thr) in rec_thrs.iter().enumerate() {
                        let pos = rc.partition_point(|&x| x < thr);
                        precision[precision_index(t, r, k, a, m, num_classes)] = pr.get(pos).copied().unwrap_or(0.0);
                    }
                }
            }
        }
    }
    (precision, recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(anns: &[(i64, [f64; 4], bool)]) -> GroundTruth {
        GroundTruth::new(
            vec![
                Image {
                    id: 1,
                    width: 100,
                    height: 100,
                },
                Image {
                    id: 2,
                    width: 100,
                    height: 100,
                },
            ],
            vec![Category {
                id: 7,
                name: "cup".into(),
            }],
            anns.iter()
                .enumerate()
                .map(|(i, &(image_id, bbox, iscrowd))| Annotation {
                    id: i as i64 + 1,
                    image_id,
                    category_id: 7,
                    bbox,
                    area: bbox[2] * bbox[3],
                    iscrowd,
                })
                .collect(),
        )
        .unwrap()
    }

    fn det(image_id: i64, bbox: [f64; 4], score: f64) -> DetectionResult {
        DetectionResult {
            image_id,
            category_id: 7,
            bbox,
            score,
        }
    }

    #[test]
    fn thresholds_are_numpy_linspace() {
        let iou = iou_thresholds();
        assert_eq!(iou[0], 0.5);
        assert_eq!(iou[5], 0.75);
        assert_eq!(iou[9], 0.95);
        let rec = recall_thresholds();
        assert_eq!((rec[0], rec[100]), (0.0, 1.0));
    }

    #[test]
    fn perfect_detections_score_one_and_misses_lower_recall() {
        let g = gt(&[(1, [10.0, 10.0, 20.0, 20.0], false), (2, [0.0, 0.0, 50.0, 50.0], false)]);
        let m = evaluate(
            &g,
            &[
                det(1, [10.0, 10.0, 20.0, 20.0], 0.9),
                det(2, [0.0, 0.0, 50.0, 50.0], 0.8),
            ],
        )
        .unwrap();
        assert!((m.stats.ap - 1.0).abs() < 1e-12, "{}", m.stats.ap);
        assert_eq!(m.stats.ar100, 1.0);
        assert_eq!(m.stats.ap_large, -1.0, "no large objects");
        let only_one = evaluate(&g, &[det(1, [10.0, 10.0, 20.0, 20.0], 0.9)]).unwrap();
        assert_eq!(only_one.stats.ar100, 0.5);
        // Precision 1 up to recall .5, 0 beyond: 51 of 101 recall thresholds.
        assert!(
            (only_one.stats.ap50 - 51.0 / 101.0).abs() < 1e-12,
            "{}",
            only_one.stats.ap50
        );
    }

    #[test]
    fn crowd_absorbs_detections_without_false_positives() {
        let g = gt(&[
            (1, [10.0, 10.0, 20.0, 20.0], false),
            (1, [0.0, 0.0, 100.0, 100.0], true),
        ]);
        let dets = [
            det(1, [10.0, 10.0, 20.0, 20.0], 0.5),
            det(1, [60.0, 60.0, 10.0, 10.0], 0.9),
            det(1, [70.0, 70.0, 10.0, 10.0], 0.8),
        ];
        let m = evaluate(&g, &dets).unwrap();
        // The two high-scoring detections fall inside the crowd region: ignored, so AP is 1.
        assert!((m.stats.ap50 - 1.0).abs() < 1e-12, "{}", m.stats.ap50);
        assert_eq!(
            m.classes[0].ground_truth, 1,
            "the crowd region is not an object to find"
        );
    }

    #[test]
    fn refuses_unknown_images_and_skips_unknown_classes() {
        let g = gt(&[(1, [10.0, 10.0, 20.0, 20.0], false)]);
        let err = evaluate(&g, &[det(3, [0.0, 0.0, 1.0, 1.0], 0.5)]).unwrap_err();
        assert!(err.to_string().contains("detection #0 refers to image id 3"), "{err}");
        let mut other = det(1, [10.0, 10.0, 20.0, 20.0], 0.99);
        other.category_id = 99;
        let m = evaluate(&g, &[other, det(1, [10.0, 10.0, 20.0, 20.0], 0.5)]).unwrap();
        assert_eq!(m.counts.ignored_detections, 1);
        assert!((m.stats.ap - 1.0).abs() < 1e-12, "{}", m.stats.ap);
    }

    #[test]
    fn no_detections_give_zero_not_a_crash() {
        let g = gt(&[(1, [10.0, 10.0, 20.0, 20.0], false)]);
        let m = evaluate(&g, &[]).unwrap();
        assert_eq!((m.stats.ap, m.stats.ar100), (0.0, 0.0));
        let e = accumulate(&g, &[]).unwrap();
        assert_eq!(e.precision(0, 0, 0, 0, 2), Some(0.0));
        assert_eq!(e.precision(0, 0, 1, 0, 2), None);
    }
}
