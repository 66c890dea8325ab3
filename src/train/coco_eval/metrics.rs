//! What an evaluation reports: pycocotools' 12 summary numbers, per-class AP and the
//! precision-recall curves, serializable to JSON and printable as tables.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{iou_thresholds, recall_thresholds, CocoEvaluation, AREA_RANGES, MAX_DETS, NUM_IOU_THRESHOLDS};

/// The result of [`super::evaluate`]: everything a promotion decision or a report needs.
/// Undefined values (no ground truth to find) are -1, as in pycocotools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoMetrics {
    /// The 12 numbers of pycocotools' `summarize()`.
    pub stats: CocoStats,
    /// Per category, sorted by id.
    pub classes: Vec<ClassMetrics>,
    /// Precision against recall, for plotting.
    pub pr_curves: PrCurves,
    /// What was evaluated.
    pub counts: EvalCounts,
}

/// pycocotools' `COCOeval.stats`, by name. AP is averaged over IoU .50:.95 unless named
/// otherwise, AR over the same thresholds; areas: small < 32², medium < 96², large above.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CocoStats {
    /// AP @[IoU=.50:.95, all areas, 100 detections]: "COCO mAP", the number to compare.
    pub ap: f64,
    /// AP @[IoU=.50] (PASCAL VOC style).
    pub ap50: f64,
    /// AP @[IoU=.75] (strict localisation).
    pub ap75: f64,
    /// AP of small objects.
    pub ap_small: f64,
    /// AP of medium objects.
    pub ap_medium: f64,
    /// AP of large objects.
    pub ap_large: f64,
    /// AR with 1 detection per image.
    pub ar1: f64,
    /// AR with 10 detections per image.
    pub ar10: f64,
    /// AR with 100 detections per image.
    pub ar100: f64,
    /// AR of small objects (100 detections).
    pub ar_small: f64,
    /// AR of medium objects (100 detections).
    pub ar_medium: f64,
    /// AR of large objects (100 detections).
    pub ar_large: f64,
}

impl CocoStats {
    /// In pycocotools' `stats` order.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }
}

/// One category's result (all areas, 100 detections per image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// The category id.
    pub category_id: i64,
    /// The category name.
    pub name: String,
    /// AP @[IoU=.50:.95]; -1 without ground truth.
    pub ap: f64,
    /// AP @[IoU=.50]; -1 without ground truth.
    pub ap50: f64,
    /// Ground-truth objects (crowd regions not counted).
    pub ground_truth: usize,
    /// Detections of this category.
    pub detections: usize,
}

/// Interpolated precision at the 101 recall thresholds (all areas, 100 detections per image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrCurves {
    /// The recall thresholds 0, 0.01, …, 1 (the x axis).
    pub recall: Vec<f64>,
    /// At IoU .50.
    pub iou50: PrCurve,
    /// At IoU .75.
    pub iou75: PrCurve,
}

/// Precision curves at one IoU threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrCurve {
    /// The IoU threshold.
    pub iou_threshold: f64,
    /// Mean over the classes that have ground truth, per recall threshold (-1 if none has).
    pub all_classes: Vec<f64>,
    /// One curve per class that has ground truth, sorted by category id.
    pub classes: Vec<ClassCurve>,
}

/// One class's precision curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassCurve {
    /// The category id.
    pub category_id: i64,
    /// The category name.
    pub name: String,
    /// AP at this IoU threshold: the mean of `precision`.
    pub ap: f64,
    /// Precision per recall threshold.
    pub precision: Vec<f64>,
}

/// The size of the evaluation, to tell an empty or mismatched run from a bad model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalCounts {
    /// Images in the ground truth.
    pub images: usize,
    /// Categories in the ground truth.
    pub categories: usize,
    /// Annotations, crowd regions included.
    pub annotations: usize,
    /// Crowd annotations.
    pub crowd_annotations: usize,
    /// Detections given.
    pub detections: usize,
    /// Detections skipped because their category is not in the ground truth (as pycocotools).
    pub ignored_detections: usize,
}

/// pycocotools' `summarize()` and the per-class numbers, from the accumulated arrays.
pub(super) fn summarize(e: &CocoEvaluation) -> CocoMetrics {
    let all = 0;
    let last_m = MAX_DETS.len() - 1;
    let thr = |v: f64| iou_thresholds().iter().position(|&x| x == v);
    let ap = |iou: Option<Option<usize>>, a: usize, m: usize| mean_defined(precision_values(e, iou, None, a, m));
    let ar = |iou: Option<Option<usize>>, a: usize, m: usize| mean_defined(recall_values(e, iou, a, m));
    let stats = CocoStats {
        ap: ap(None, all, last_m),
        ap50: ap(Some(thr(0.5)), all, last_m),
        ap75: ap(Some(thr(0.75)), all, last_m),
        ap_small: ap(None, 1, last_m),
        ap_medium: ap(None, 2, last_m),
        ap_large: ap(None, 3, last_m),
        ar1: ar(None, all, 0),
        ar10: ar(None, all, 1),
        ar100: ar(None, all, last_m),
        ar_small: ar(None, 1, last_m),
        ar_medium: ar(None, 2, last_m),
        ar_large: ar(None, 3, last_m),
    };
    let classes = e
        .categories
        .iter()
        .enumerate()
        .map(|(k, c)| ClassMetrics {
            category_id: c.id,
            name: c.name.clone(),
            ap: mean_defined(precision_values(e, None, Some(k), all, last_m)),
            ap50: mean_defined(precision_values(e, Some(thr(0.5)), Some(k), all, last_m)),
            ground_truth: e.class_counts[k].0,
            detections: e.class_counts[k].1,
        })
        .collect();
    let curve = |t: usize| {
        let iou_threshold = iou_thresholds()[t];
        let at = |r: usize, k: usize| e.precision[super::precision_index(t, r, k, all, last_m, e.categories.len())];
        let all_classes = (0..recall_thresholds().len())
            .map(|r| mean_defined((0..e.categories.len()).map(|k| at(r, k)).collect()))
            .collect();
        let classes = e
            .categories
            .iter()
            .enumerate()
            .filter(|&(k, _)| at(0, k) > -1.0)
            .map(|(k, c)| {
                let precision: Vec<f64> = (0..recall_thresholds().len()).map(|r| at(r, k)).collect();
                ClassCurve {
                    category_id: c.id,
                    name: c.name.clone(),
                    ap: mean_defined(precision.clone()),
                    precision,
                }
            })
            .collect();
        PrCurve {
            iou_threshold,
            all_classes,
            classes,
        }
    };
    let pr_curves = PrCurves {
        recall: recall_thresholds().to_vec(),
        iou50: curve(0),
        iou75: curve(5),
    };
    CocoMetrics {
        stats,
        classes,
        pr_curves,
        counts: e.counts.clone(),
    }
}

/// `precision[t, :, k, a, m]` in numpy's C order (t, then r, then k). `iou`: `None` for all
/// thresholds, `Some(None)` for a threshold that does not exist (pycocotools then averages
/// nothing); `k`: `None` for all classes.
fn precision_values(e: &CocoEvaluation, iou: Option<Option<usize>>, k: Option<usize>, a: usize, m: usize) -> Vec<f64> {
    let k_len = e.categories.len();
    let ts: Vec<usize> = match iou {
        None => (0..NUM_IOU_THRESHOLDS).collect(),
        Some(t) => t.into_iter().collect(),
    };
    let ks: Vec<usize> = match k {
        None => (0..k_len).collect(),
        Some(k) => vec![k],
    };
    let mut out = Vec::with_capacity(ts.len() * recall_thresholds().len() * ks.len());
    for &t in &ts {
        for r in 0..recall_thresholds().len() {
            for &k in &ks {
                out.push(e.precision[super::precision_index(t, r, k, a, m, k_len)]);
            }
        }
    }
    out
}

/// `recall[t, k, a, m]` in C order (t, then k).
fn recall_values(e: &CocoEvaluation, iou: Option<Option<usize>>, a: usize, m: usize) -> Vec<f64> {
    let k_len = e.categories.len();
    let ts: Vec<usize> = match iou {
        None => (0..NUM_IOU_THRESHOLDS).collect(),
        Some(t) => t.into_iter().collect(),
    };
    ts.iter()
        .flat_map(|&t| (0..k_len).map(move |k| (t, k)))
        .map(|(t, k)| e.recall[super::recall_index(t, k, a, m, k_len)])
        .collect()
}

/// `np.mean(s[s > -1])`, or -1 when nothing is defined.
fn mean_defined(mut values: Vec<f64>) -> f64 {
    values.retain(|&v| v > -1.0);
    if values.is_empty() {
        -1.0
    } else {
        numpy_sum(&values) / values.len() as f64
    }
}

/// numpy's pairwise summation (`pairwise_sum` in numpy's loops), so that means round exactly
/// as pycocotools' `np.mean` does: plain sums below 8 values, eight interleaved accumulators
/// up to 128, halves (at multiples of 8) above.
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |acc, &v| acc + v)
    } else if n <= 128 {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        let mut i = 8;
        while i < full {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[full..] {
            res += v;
        }
        res
    } else {
        let mut half = n / 2;
        half -= half % 8;
        numpy_sum(&a[..half]) + numpy_sum(&a[half..])
    }
}

impl CocoMetrics {
    /// The 12 lines pycocotools' `summarize()` prints, in its format.
    pub fn summary_table(&self) -> String {
        let s = &self.stats;
        let rows: [(bool, &str, &str, usize, f64); 12] = [
            (true, "0.50:0.95", "all", 100, s.ap),
            (true, "0.50", "all", 100, s.ap50),
            (true, "0.75", "all", 100, s.ap75),
            (true, "0.50:0.95", "small", 100, s.ap_small),
            (true, "0.50:0.95", "medium", 100, s.ap_medium),
            (true, "0.50:0.95", "large", 100, s.ap_large),
            (false, "0.50:0.95", "all", 1, s.ar1),
            (false, "0.50:0.95", "all", 10, s.ar10),
            (false, "0.50:0.95", "all", 100, s.ar100),
            (false, "0.50:0.95", "small", 100, s.ar_small),
            (false, "0.50:0.95", "medium", 100, s.ar_medium),
            (false, "0.50:0.95", "large", 100, s.ar_large),
        ];
        debug_assert!(rows.iter().all(|r| AREA_RANGES.iter().any(|a| a.0 == r.2)));
        let mut out = String::new();
        for (is_ap, iou, area, max_dets, value) in rows {
            let (title, kind) = if is_ap {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            let _ = writeln!(
                out,
                " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {value:.3}"
            );
        }
        out
    }

    /// Per-class AP @[.50:.95] and AP50 with object and detection counts, one row per class;
    /// "n/a" where a class has no ground truth.
    pub fn per_class_table(&self) -> String {
        let name_width = self
            .classes
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0)
            .max(8);
        let fmt = |v: f64| {
            if v > -1.0 {
                format!("{v:.3}")
            } else {
                "n/a".to_string()
            }
        };
        let mut out = format!(
            "{:>8}  {:<name_width$}  {:>6}  {:>6}  {:>7}  {:>10}\n",
            "id", "category", "AP", "AP50", "objects", "detections"
        );
        for c in &self.classes {
            let _ = writeln!(
                out,
                "{:>8}  {:<name_width$}  {:>6}  {:>6}  {:>7}  {:>10}",
                c.category_id,
                c.name,
                fmt(c.ap),
                fmt(c.ap50),
                c.ground_truth,
                c.detections
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums whose rounding differs between naive and pairwise order pin the numpy order;
    /// the expected bits were computed with numpy 2.4 (`np.add.reduce`).
    #[test]
    fn pairwise_sum_rounds_like_numpy() {
        let values: Vec<f64> = (0..1000).map(|i| 1.0 / (i as f64 + 3.0)).collect();
        let naive: f64 = values.iter().sum();
        let pairwise = numpy_sum(&values);
        assert_eq!(
            pairwise.to_bits(),
            NUMPY_SUM_1000_BITS,
            "naive {naive:e}, pairwise {pairwise:e}"
        );
    }

    /// `np.add.reduce(1.0 / (np.arange(1000) + 3.0))`, as `struct.unpack("<Q", struct.pack("<d", x))`.
    const NUMPY_SUM_1000_BITS: u64 = 4_618_427_307_939_424_128;

    #[test]
    fn summary_table_matches_pycocotools_format() {
        let stats = CocoStats {
            ap: 0.5,
            ap50: -1.0,
            ap75: 0.25,
            ap_small: 0.0,
            ap_medium: 0.0,
            ap_large: 0.0,
            ar1: 0.0,
            ar10: 0.0,
            ar100: 0.0,
            ar_small: 0.0,
            ar_medium: 0.0,
            ar_large: 0.0,
        };
        let m = CocoMetrics {
            stats,
            classes: vec![],
            pr_curves: PrCurves {
                recall: vec![],
                iou50: PrCurve {
                    iou_threshold: 0.5,
                    all_classes: vec![],
                    classes: vec![],
                },
                iou75: PrCurve {
                    iou_threshold: 0.75,
                    all_classes: vec![],
                    classes: vec![],
                },
            },
            counts: EvalCounts {
                images: 0,
                categories: 0,
                annotations: 0,
                crowd_annotations: 0,
                detections: 0,
                ignored_detections: 0,
            },
        };
        let table = m.summary_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 12);
        // Copied from pycocotools' output.
        assert_eq!(
            lines[0],
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.500"
        );
        assert_eq!(
            lines[1],
            " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = -1.000"
        );
        assert_eq!(
            lines[6],
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.000"
        );
    }
}
