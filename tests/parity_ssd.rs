//! SSD MobileNetV2 against OpenCV DNN running the same TF frozen graph
//! (`tests/reference/ssd_reference.py`): raw box encodings and class scores before NMS, and
//! the detections above the graph's score threshold, on the sample photos and on two
//! synthetic images; plus sensible labels on real photos no test was tuned on.
//!
//! Needs the converted weights (`scripts/setup`) and the reference environment
//! (`scripts/setup --test`).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use attrstream::model::ssd_mobilenet_v2::{SsdDetections, SsdMobileNetV2};
use attrstream::preprocess::{decode_image, to_tensor, DEFAULT_MAX_PIXELS};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The graph's own score threshold; detections are compared above it.
const SCORE_THRESHOLD: f64 = 0.3;
/// Reference detections this close to the threshold may fall on either side of it.
const THRESHOLD_MARGIN: f64 = 0.01;

const CASES: [&str; 6] = [
    "coffee",
    "chelsea",
    "astronaut",
    "rocket",
    "synthetic_shapes",
    "synthetic_noise",
];

fn weights_file() -> PathBuf {
    let path = common::root().join("models/ssd_mobilenet_v2_coco.safetensors");
    assert!(
        path.exists(),
        "{} not found: run `scripts/setup` (converts the SSD weights)",
        path.display()
    );
    path
}

fn reference_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        weights_file();
        let samples = common::root().join("assets/samples");
        let images: Vec<String> = ["coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg"]
            .iter()
            .map(|f| samples.join(f).to_string_lossy().into_owned())
            .collect();
        let args: Vec<&str> = images.iter().map(String::as_str).collect();
        common::cached_reference("tests/reference/ssd_reference.py", "ssd", &args)
    })
}

fn model() -> (VarStore, SsdMobileNetV2) {
    SsdMobileNetV2::load(&weights_file(), Device::Cpu).expect("SSD weights load")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
}

/// (label, score, box) rows.
fn rows(labels: &Tensor, scores: &Tensor, boxes: &Tensor) -> Vec<(i64, f64, [f64; 4])> {
    let labels = Vec::<i64>::try_from(&labels.to_kind(Kind::Int64)).unwrap();
    let scores = Vec::<f64>::try_from(&scores.to_kind(Kind::Double)).unwrap();
    let boxes = common::boxes(boxes);
    labels
        .into_iter()
        .zip(scores)
        .zip(boxes)
        .map(|((l, s), b)| (l, s, b))
        .collect()
}

/// Every detection above the threshold on one side has a counterpart of the same label on
/// the other, with IoU and score within the tolerances.
fn assert_same_detections(
    case: &str,
    ours: &SsdDetections,
    golden: &std::collections::HashMap<String, Tensor>,
    min_iou: f64,
    max_score_diff: f64,
) {
    let ours = rows(&ours.labels, &ours.scores, &ours.boxes);
    let theirs = rows(
        &golden["detection_labels"],
        &golden["detection_scores"],
        &golden["detection_boxes"],
    );
    // OpenCV does not clip boxes; TF's post-processing (ours) clips them to the image.
    let (h, w) = (golden["image"].size()[0] as f64, golden["image"].size()[1] as f64);
    let clip = |b: [f64; 4]| {
        [
            b[0].clamp(0.0, w),
            b[1].clamp(0.0, h),
            b[2].clamp(0.0, w),
            b[3].clamp(0.0, h),
        ]
    };
    for (side, a, b) in [("reference", &theirs, &ours), ("ours", &ours, &theirs)] {
        for &(label, score, bx) in a.iter().filter(|r| r.1 > SCORE_THRESHOLD + THRESHOLD_MARGIN) {
            let best = b
                .iter()
                .filter(|r| r.0 == label)
                .map(|r| (iou(&clip(r.2), &clip(bx)), (r.1 - score).abs()))
                .max_by(|x, y| x.0.total_cmp(&y.0));
            let (overlap, ds) = best.unwrap_or_else(|| {
                panic!("{case}: {side} detection label {label} score {score:.3} has no counterpart")
            });
            assert!(
                overlap >= min_iou,
                "{case}: {side} label {label}: IoU {overlap:.4} < {min_iou}"
            );
            assert!(
                ds <= max_score_diff,
                "{case}: {side} label {label}: score differs by {ds:.4}"
            );
        }
    }
}

#[test]
fn raw_tensors_and_detections_match_opencv_on_the_same_input() {
    let (_vs, model) = model();
    for case in CASES {
        let golden = common::load_tensors(&reference_dir().join(format!("ssd_{case}.safetensors")));
        // OpenCV's blob (RGB 0..255 after its resize) scaled as the graph does.
        let input = &golden["input"] * (2.0 / 255.0) - 1.0;
        let raw = model.forward_raw(&input);
        let boxes = max_abs_diff(&raw.box_encodings.get(0), &golden["box_encodings"]);
        let scores = max_abs_diff(&raw.class_scores.get(0), &golden["class_scores"]);
        assert!(boxes <= 1e-3, "{case}: box encodings differ by {boxes:.3e}");
        assert!(scores <= 1e-4, "{case}: class scores differ by {scores:.3e}");
        // OpenCV's priors for aspect ratio 0.3333 were written with a slightly different
        // ratio in its pbtxt (up to 3.7e-4 off); ours equal the frozen graph's.
        let anchors = max_abs_diff(&raw.anchors, &golden["anchors"]);
        assert!(anchors <= 5e-4, "{case}: anchors differ by {anchors:.3e}");
        let size = golden["image"].size();
        let detections = model.detect_preprocessed(&input, &[(size[0], size[1])]);
        assert_same_detections(case, &detections[0], &golden, 0.98, 0.01);
    }
}

#[test]
fn our_preprocessing_gives_opencvs_detections() {
    let (_vs, model) = model();
    for case in CASES {
        let golden = common::load_tensors(&reference_dir().join(format!("ssd_{case}.safetensors")));
        // The decoded RGB image, resized by our own code.
        let image = golden["image"].permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
        let detections = model.detect(&[image]);
        // Our float bilinear resize (rounded to 8 bits) differs from OpenCV's fixed-point
        // uint8 resize by at most one grey level, which moves scores by up to about 0.02.
        assert_same_detections(case, &detections[0], &golden, 0.95, 0.025);
    }
}

#[test]
fn real_photos_get_sensible_labels() {
    let (_vs, model) = model();
    let labels = attrstream::model::labels::coco_labels();
    for (file, expected) in [
        ("coffee.png", "cup"),
        ("chelsea.png", "cat"),
        ("astronaut.png", "person"),
    ] {
        let bytes = std::fs::read(common::root().join("assets/samples").join(file)).unwrap();
        let image = to_tensor(&decode_image(&bytes, DEFAULT_MAX_PIXELS).unwrap(), Device::Cpu);
        let d = &model.detect(&[image])[0];
        let top = d.labels.int64_value(&[0]);
        assert_eq!(labels[top as usize], expected, "{file}: top detection");
        assert!(d.scores.double_value(&[0]) > 0.7, "{file}: confident top detection");
    }
}
