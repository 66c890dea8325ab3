//! The detection ops against `torchvision.ops` (golden values from
//! `tests/reference/ops_reference.py`): nms, batched_nms, box_iou, roi_align, the box coder,
//! clipping and small-box removal, on random inputs with ties, duplicates, degenerate boxes,
//! RoIs outside the map and empty inputs.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use attrstream::model::ops::{self, BoxCoder};
use tch::{Kind, Tensor};

/// The golden file, generated once per test process (tensors are not `Sync`, so each test
/// reads the file itself).
fn golden() -> HashMap<String, Tensor> {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let dir = PATH.get_or_init(|| common::cached_reference("tests/reference/ops_reference.py", "ops", &[]));
    common::load_tensors(&dir.join("ops.safetensors"))
}

thread_local! {
    static GOLDEN: HashMap<String, Tensor> = golden();
}

fn g(key: &str) -> Tensor {
    GOLDEN.with(|t| t.get(key).unwrap_or_else(|| panic!("golden key {key}")).shallow_clone())
}

fn ints(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.to_kind(Kind::Int64)).expect("int64 values")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn nms_keeps_the_same_indices_as_torchvision() {
    for thr in ["0.3", "0.5", "0.7"] {
        let keep = ops::nms(&g("nms.boxes"), &g("nms.scores"), thr.parse().unwrap());
        assert_eq!(ints(&keep), ints(&g(&format!("nms.keep.{thr}"))), "threshold {thr}");
    }
}

#[test]
fn nms_of_nothing_is_nothing() {
    let keep = ops::nms(
        &Tensor::zeros([0, 4], tch::kind::FLOAT_CPU),
        &Tensor::zeros([0], tch::kind::FLOAT_CPU),
        0.5,
    );
    assert_eq!(keep.size(), g("nms.empty_keep").size());
    assert_eq!(keep.kind(), Kind::Int64);
}

#[test]
fn batched_nms_matches_torchvision_on_both_paths() {
    for name in ["small", "large"] {
        let keep = ops::batched_nms(
            &g(&format!("batched.{name}.boxes")),
            &g(&format!("batched.{name}.scores")),
            &g(&format!("batched.{name}.idxs")),
            0.5,
        );
        let expected = ints(&g(&format!("batched.{name}.keep")));
        assert_eq!(ints(&keep).len(), expected.len(), "{name}: kept count");
        // Kept sets must be equal; order equal except among exactly tied scores.
        let mut a = ints(&keep);
        let mut b = expected.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: kept set");
        let scores = g(&format!("batched.{name}.scores"));
        let ordered = |k: &[i64]| -> Vec<f64> { k.iter().map(|&i| scores.double_value(&[i])).collect() };
        assert_eq!(ordered(&ints(&keep)), ordered(&expected), "{name}: score order");
    }
}

#[test]
fn box_iou_matches_torchvision_including_degenerate_boxes() {
    let ours = ops::box_iou(&g("iou.a"), &g("iou.b"));
    let theirs = g("iou.out");
    let nan_ours = ours.isnan();
    assert!(nan_ours.equal(&theirs.isnan()), "NaN pattern differs");
    let finite = nan_ours.logical_not();
    let diff = max_abs_diff(&ours.masked_select(&finite), &theirs.masked_select(&finite));
    assert!(diff <= 1e-6, "box_iou differs by {diff}");
}

#[test]
fn roi_align_matches_torchvision_for_every_mode() {
    for scale in ["0.25", "0.5"] {
        for ratio in [2i64, 0, -1] {
            for aligned in [false, true] {
                let key = format!("roi.out.{scale}.{ratio}.{}", aligned as i32);
                let ours = ops::roi_align(
                    &g("roi.input"),
                    &g("roi.rois"),
                    (7, 5),
                    scale.parse().unwrap(),
                    ratio,
                    aligned,
                );
                let diff = max_abs_diff(&ours, &g(&key));
                assert!(diff <= 1e-5, "{key}: max abs diff {diff:.3e}");
            }
        }
    }
}

#[test]
fn roi_align_of_no_rois_is_empty() {
    let ours = ops::roi_align(
        &g("roi.input"),
        &Tensor::zeros([0, 5], tch::kind::FLOAT_CPU),
        (7, 7),
        0.25,
        2,
        false,
    );
    assert_eq!(ours.size(), g("roi.empty").size());
}

#[test]
fn box_coder_matches_torchvision_including_the_clamp() {
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    let decoded = coder.decode(&g("coder.codes"), &g("coder.proposals"));
    let diff = max_abs_diff(&decoded, &g("coder.decoded"));
    assert!(diff <= 1e-3, "decode differs by {diff}");
    let encoded = coder.encode(&g("coder.gt"), &g("coder.proposals"));
    let diff = max_abs_diff(&encoded, &g("coder.encoded"));
    assert!(diff <= 1e-5, "encode differs by {diff}");
}

#[test]
fn clipping_and_small_box_removal_match_torchvision() {
    let clipped = ops::clip_boxes_to_image(&(g("nms.boxes") * 1.5 - 20.0), (90, 110));
    assert_eq!(max_abs_diff(&clipped, &g("clip.out")), 0.0);
    assert_eq!(
        ints(&ops::remove_small_boxes(&g("nms.boxes"), 5.0)),
        ints(&g("small.keep"))
    );
}
