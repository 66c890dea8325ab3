//! COCO evaluation parity with pycocotools: on seeded random cases (many images and classes,
//! crowd regions, every area range, images without ground truth or detections, more than 100
//! detections on an image, tied scores, classes with ground truth but no detections and the
//! reverse), `coco_eval` must give pycocotools' precision and recall arrays, its 12 summary
//! numbers, per-class AP and the curves, to 1e-9. And `attrstream eval` must print them and
//! write metrics.json and a readable pr_curve.png.
//!
//! The cases and pycocotools' numbers come from `tests/reference/coco_eval_reference.py`, run
//! with the reference Python environment (`scripts/setup --test` installs pycocotools).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use attrstream::train::coco_eval::{
    self, iou_thresholds, recall_thresholds, CocoMetrics, GroundTruth, AREA_RANGES, MAX_DETS, NUM_IOU_THRESHOLDS,
    NUM_RECALL_THRESHOLDS,
};
use attrstream::train::pr_plot::{PLOT_HEIGHT, PLOT_WIDTH};
use serde::Deserialize;

/// pycocotools' results for one case; every float is an IEEE-754 bit pattern.
#[derive(Debug, Deserialize)]
struct Expected {
    stats: Vec<u64>,
    per_class: Vec<ExpectedClass>,
    curves: ExpectedCurves,
    category_ids: Vec<i64>,
    no_det_category: i64,
    no_gt_category: i64,
    iou_thresholds: Vec<u64>,
    recall_thresholds: Vec<u64>,
    precision_shape: Vec<usize>,
    precision: Vec<u64>,
    recall: Vec<u64>,
    num_detections: usize,
    max_detections_per_image: usize,
}

#[derive(Debug, Deserialize)]
struct ExpectedClass {
    category_id: i64,
    ap: u64,
    ap50: u64,
}

#[derive(Debug, Deserialize)]
struct ExpectedCurves {
    iou50: Vec<u64>,
    iou75: Vec<u64>,
}

const TOLERANCE: f64 = 1e-9;

/// The generated cases, once per test process (the tests share one generation folder).
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::cached_reference("tests/reference/coco_eval_reference.py", "coco_eval", &[]))
}

fn cases() -> Vec<String> {
    let text = std::fs::read_to_string(reference().join("cases.json")).expect("cases.json");
    serde_json::from_str(&text).expect("cases.json parses")
}

fn expected(case: &Path) -> Expected {
    let text = std::fs::read_to_string(case.join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn f(bits: u64) -> f64 {
    f64::from_bits(bits)
}

/// Compares and tracks the largest difference and how many values were bit-identical.
#[derive(Default)]
struct Comparison {
    max_diff: f64,
    compared: usize,
    identical: usize,
}

impl Comparison {
    fn check(&mut self, what: &str, actual: f64, expected: f64) {
        let diff = (actual - expected).abs();
        assert!(
            diff <= TOLERANCE,
            "{what}: ours {actual} vs pycocotools {expected} (diff {diff:e})"
        );
        self.max_diff = self.max_diff.max(diff);
        self.compared += 1;
        self.identical += usize::from(actual.to_bits() == expected.to_bits());
    }
}

#[test]
fn matches_pycocotools_on_randomized_cases() {
    let dir = reference();
    let names = cases();
    assert!(names.len() >= 4, "the reference generates several cases: {names:?}");
    let mut cmp = Comparison::default();
    for name in &names {
        let case = dir.join(name);
        let exp = expected(&case);
        let gt = GroundTruth::from_coco_json(&case.join("gt.json")).expect("ground truth loads");
        let dets = coco_eval::load_results_json(&case.join("results.json")).expect("results load");
        assert_eq!(dets.len(), exp.num_detections, "{name}: detections read");

        // The thresholds are the same doubles.
        let iou: Vec<u64> = iou_thresholds().iter().map(|v| v.to_bits()).collect();
        let rec: Vec<u64> = recall_thresholds().iter().map(|v| v.to_bits()).collect();
        assert_eq!(iou, exp.iou_thresholds, "IoU thresholds");
        assert_eq!(rec, exp.recall_thresholds, "recall thresholds");

        // Every cell of pycocotools' precision [T, R, K, A, M] and recall [T, K, A, M] arrays.
        let e = coco_eval::accumulate(&gt, &dets).expect("evaluation runs");
        let k_len = exp.category_ids.len();
        let cat_ids: Vec<i64> = e.categories().iter().map(|c| c.id).collect();
        assert_eq!(cat_ids, exp.category_ids, "{name}: categories in id order");
        assert_eq!(
            exp.precision_shape,
            vec![
                NUM_IOU_THRESHOLDS,
                NUM_RECALL_THRESHOLDS,
                k_len,
                AREA_RANGES.len(),
                MAX_DETS.len()
            ]
        );
        let mut index = 0;
        for t in 0..NUM_IOU_THRESHOLDS {
            for r in 0..NUM_RECALL_THRESHOLDS {
                for k in 0..k_len {
                    for a in 0..AREA_RANGES.len() {
                        for m in 0..MAX_DETS.len() {
                            let ours = e.precision(t, r, k, a, m).expect("index in range");
                            let what = format!("{name}: precision[t={t}, r={r}, k={k}, a={a}, m={m}]");
                            cmp.check(&what, ours, f(exp.precision[index]));
                            index += 1;
                        }
                    }
                }
            }
        }
        let mut index = 0;
        for t in 0..NUM_IOU_THRESHOLDS {
            for k in 0..k_len {
                for a in 0..AREA_RANGES.len() {
                    for m in 0..MAX_DETS.len() {
                        let ours = e.recall(t, k, a, m).expect("index in range");
                        cmp.check(
                            &format!("{name}: recall[t={t}, k={k}, a={a}, m={m}]"),
                            ours,
                            f(exp.recall[index]),
                        );
                        index += 1;
                    }
                }
            }
        }

        // The 12 summary numbers, per-class AP and the all-classes curves.
        let metrics = e.metrics();
        let names12 = [
            "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
        ];
        for ((label, ours), theirs) in names12.iter().zip(metrics.stats.to_array()).zip(&exp.stats) {
            cmp.check(&format!("{name}: {label}"), ours, f(*theirs));
        }
        assert_eq!(metrics.classes.len(), exp.per_class.len());
        for (ours, theirs) in metrics.classes.iter().zip(&exp.per_class) {
            assert_eq!(ours.category_id, theirs.category_id);
            cmp.check(
                &format!("{name}: AP of class {}", ours.category_id),
                ours.ap,
                f(theirs.ap),
            );
            cmp.check(
                &format!("{name}: AP50 of class {}", ours.category_id),
                ours.ap50,
                f(theirs.ap50),
            );
        }
        for (curve, theirs, label) in [
            (&metrics.pr_curves.iou50, &exp.curves.iou50, "IoU .50"),
            (&metrics.pr_curves.iou75, &exp.curves.iou75, "IoU .75"),
        ] {
            assert_eq!(curve.all_classes.len(), NUM_RECALL_THRESHOLDS);
            for (r, (ours, theirs)) in curve.all_classes.iter().zip(theirs).enumerate() {
                cmp.check(
                    &format!("{name}: all-classes curve {label} at r={r}"),
                    *ours,
                    f(*theirs),
                );
            }
        }

        // The case covers what it claims to.
        let class = |id: i64| metrics.classes.iter().find(|c| c.category_id == id).expect("class");
        assert_eq!(class(exp.no_gt_category).ap, -1.0, "{name}: class without ground truth");
        assert_eq!(class(exp.no_gt_category).ground_truth, 0);
        assert!(class(exp.no_gt_category).detections > 0);
        assert_eq!(class(exp.no_det_category).detections, 0);
        assert_eq!(class(exp.no_det_category).ap, 0.0, "{name}: class without detections");
        assert!(metrics.counts.crowd_annotations > 0, "{name}: has crowd regions");
        assert!(metrics.stats.ap > 0.05, "{name}: the case is not degenerate");
    }
    let dense = expected(&dir.join("dense"));
    assert!(
        dense.max_detections_per_image > 100,
        "an image has more than maxDets detections"
    );
    eprintln!(
        "compared {} values with pycocotools: {} bit-identical, largest difference {:e}",
        cmp.compared, cmp.identical, cmp.max_diff
    );
}

#[test]
fn eval_cli_writes_metrics_and_plot() {
    let case = reference().join("many_classes");
    let exp = expected(&case);
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_attrstream"))
        .arg("eval")
        .arg("--ground-truth")
        .arg(case.join("gt.json"))
        .arg("--detections")
        .arg(case.join("results.json"))
        .arg("--out")
        .arg(out.path().join("report"))
        .output()
        .expect("run attrstream eval");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "attrstream eval failed:\n{stderr}");

    // The summary in pycocotools' format, and one row per class.
    let first = format!(
        " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {:.3}",
        f(exp.stats[0])
    );
    assert!(stdout.contains(&first), "summary line {first:?} in:\n{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.contains("] = ")).count(), 12, "{stdout}");
    for c in &exp.per_class {
        assert!(
            stdout.contains(&format!("class_{}", c.category_id)),
            "class {} in the per-class table:\n{stdout}",
            c.category_id
        );
    }
    assert!(
        stderr.contains("were ignored"),
        "warns about unknown categories:\n{stderr}"
    );

    let report = out.path().join("report");
    let metrics: CocoMetrics =
        serde_json::from_slice(&std::fs::read(report.join("metrics.json")).expect("metrics.json written"))
            .expect("metrics.json is CocoMetrics");
    for (ours, theirs) in metrics.stats.to_array().iter().zip(&exp.stats) {
        assert!((ours - f(*theirs)).abs() <= TOLERANCE, "{ours} vs {}", f(*theirs));
    }
    assert_eq!(metrics.classes.len(), exp.per_class.len());
    assert_eq!(metrics.pr_curves.recall.len(), NUM_RECALL_THRESHOLDS);

    let png = std::fs::read(report.join("pr_curve.png")).expect("pr_curve.png written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let image = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .expect("pr_curve.png decodes")
        .to_rgb8();
    assert_eq!(image.dimensions(), (PLOT_WIDTH, PLOT_HEIGHT));
    // Not blank: a white page with dark text and axes, and coloured curves.
    let dark = image.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
    let coloured = image
        .pixels()
        .filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 80)
        .count();
    assert!(
        dark > 2_000,
        "text, axes and the all-classes curves are drawn ({dark} dark pixels)"
    );
    assert!(
        coloured > 2_000,
        "per-class curves are drawn ({coloured} coloured pixels)"
    );
}

#[test]
fn eval_cli_explains_bad_input() {
    let case = reference().join("small");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"image_id": 987654, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}]"#,
    )
    .unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_attrstream"))
            .arg("eval")
            .args(args)
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()
            .expect("run attrstream eval")
    };
    let gt = case.join("gt.json");
    let output = run(&[
        "--ground-truth".as_ref(),
        gt.as_os_str(),
        "--detections".as_ref(),
        bad.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("detection #0 refers to image id 987654"), "{stderr}");
    assert!(
        !dir.path().join("out/metrics.json").exists(),
        "nothing written on bad input"
    );

    let output = run(&["--ground-truth".as_ref(), gt.as_os_str()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("required arguments were not provided") && stderr.contains("--detections"),
        "{stderr}"
    );
}
