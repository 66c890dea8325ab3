//! Faster R-CNN training parity with torchvision 0.28: the same weights, images and targets
//! must give the same four losses (1e-4 relative) and parameter gradients (1e-3 relative)
//! with deterministic sampling, the same sampling counts and (libtorch's generator seeded
//! alike) losses with random sampling, and the same trainable parameters with
//! `trainable_backbone_layers = 3`.
//!
//! The golden values come from `tests/reference/training_reference.py`, run by the test with
//! the reference Python environment (`scripts/setup --test`) and cached under
//! `target/test-reference/`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use attrstream::model::faster_rcnn::fine_tune::{checkpoint_num_classes, BOX_PREDICTOR_PREFIX};
use attrstream::model::faster_rcnn::{
    trainable_variables, FasterRcnn, FasterRcnnConfig, Sampler, Target, TrainingError, TrainingLosses,
};
use attrstream::model::ops;
use attrstream::model::weights::WeightsError;
use attrstream::preprocess::{decode_image, to_tensor, DEFAULT_MAX_PIXELS};
use serde::Deserialize;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Losses: |ours - theirs| <= LOSS_REL * |theirs| (+ a float-rounding floor for zeros).
const LOSS_REL: f64 = 1e-4;
/// Gradients: max |ours - theirs| / max |theirs|.
const GRAD_REL: f64 = 1e-3;

#[derive(Debug, Deserialize)]
struct TargetSpec {
    boxes: Vec<[f32; 4]>,
    labels: Vec<i64>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    targets: Vec<TargetSpec>,
    losses: HashMap<String, f64>,
    /// Per image: positive candidates, negative candidates, sampled positives, negatives.
    rpn_counts: Vec<[i64; 4]>,
    roi_counts: Vec<[i64; 4]>,
    /// Probed parameters torchvision gave no gradient.
    no_grad: Vec<String>,
    rpn_batch_size_per_image: i64,
    rpn_positive_fraction: f64,
    box_batch_size_per_image: i64,
    box_positive_fraction: f64,
    deterministic: bool,
    /// `torch.manual_seed` of a random case.
    seed: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct Summary {
    num_classes: i64,
    trainable_backbone_layers: u8,
    min_size: i64,
    max_size: i64,
    images: Vec<PathBuf>,
    trainable: Vec<String>,
    probes: Vec<String>,
    cases: Vec<Case>,
}

fn reference_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::cached_reference("tests/reference/training_reference.py", "training", &[]))
}

fn summary() -> &'static Summary {
    static SUMMARY: OnceLock<Summary> = OnceLock::new();
    SUMMARY.get_or_init(|| {
        let text = std::fs::read_to_string(reference_dir().join("cases.json")).expect("cases.json");
        serde_json::from_str(&text).expect("cases.json parses")
    })
}

fn case(name: &str) -> &'static Case {
    summary()
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("reference case {name}"))
}

fn weights_file() -> PathBuf {
    reference_dir().join("weights.safetensors")
}

fn config(case: &Case) -> FasterRcnnConfig {
    let s = summary();
    FasterRcnnConfig {
        num_classes: s.num_classes,
        min_size: s.min_size,
        max_size: s.max_size,
        rpn_batch_size_per_image: case.rpn_batch_size_per_image,
        rpn_positive_fraction: case.rpn_positive_fraction,
        box_batch_size_per_image: case.box_batch_size_per_image,
        box_positive_fraction: case.box_positive_fraction,
        ..Default::default()
    }
}

/// The reference model, loaded through the fine-tuning constructor (same class count:
/// everything loads strictly) with torchvision's trainable layers.
fn model(case: &Case) -> (VarStore, FasterRcnn) {
    let (vs, model, report) = FasterRcnn::load_for_fine_tuning(
        &weights_file(),
        Device::Cpu,
        config(case),
        summary().trainable_backbone_layers,
    )
    .expect("weights load for fine-tuning");
    assert!(!report.predictor_replaced);
    assert!(report.load.left_initialized.is_empty());
    (vs, model)
}

fn images() -> Vec<Tensor> {
    summary()
        .images
        .iter()
        .map(|p| {
            let bytes = std::fs::read(reference_dir().join(p)).expect("read image");
            to_tensor(&decode_image(&bytes, DEFAULT_MAX_PIXELS).expect("decode"), Device::Cpu)
        })
        .collect()
}

fn targets(case: &Case) -> Vec<Target> {
    case.targets.iter().map(|t| Target::new(&t.boxes, &t.labels)).collect()
}

/// Training steps share libtorch's global generator and both CPU cores: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn counts(stats: &[attrstream::model::faster_rcnn::sampling::StageStats]) -> Vec<[i64; 4]> {
    stats
        .iter()
        .map(|s| [s.positive_candidates, s.negative_candidates, s.positives, s.negatives])
        .collect()
}

fn check_counts(case: &Case, losses: &TrainingLosses) {
    assert_eq!(
        counts(&losses.sampling.rpn),
        case.rpn_counts,
        "{}: RPN sampling counts",
        case.name
    );
    assert_eq!(
        counts(&losses.sampling.roi),
        case.roi_counts,
        "{}: box-head sampling counts",
        case.name
    );
}

fn check_losses(case: &Case, losses: &TrainingLosses) {
    for (name, value) in losses.values() {
        let expected = case.losses[name];
        let diff = (value - expected).abs();
        eprintln!("{}: {name} ours {value:.7} torchvision {expected:.7}", case.name);
        assert!(
            diff <= LOSS_REL * expected.abs() + 1e-7,
            "{}: {name} is {value} but torchvision's is {expected} (relative error {:.2e})",
            case.name,
            diff / expected.abs().max(1e-12)
        );
    }
}

fn check_gradients(case: &Case, vs: &VarStore) {
    let golden = common::load_tensors(&reference_dir().join(format!("case_{}.safetensors", case.name)));
    let variables = vs.variables();
    for name in &summary().probes {
        let grad = variables[name].grad();
        if case.no_grad.contains(name) {
            assert!(!grad.defined(), "{}: frozen {name} got a gradient", case.name);
            continue;
        }
        assert!(grad.defined(), "{}: {name} got no gradient", case.name);
        let err = common::max_relative_error(&grad, &golden[&format!("grad.{name}")]);
        eprintln!("{}: gradient of {name}: max relative error {err:.2e}", case.name);
        assert!(
            err <= GRAD_REL,
            "{}: gradient of {name} differs by {err:.2e}",
            case.name
        );
    }
}

/// Runs a deterministic case and compares losses, counts and (optionally) gradients.
fn check_first_k_case(name: &str, gradients: bool) {
    let case = case(name);
    assert!(case.deterministic);
    let _serial = serial();
    let (vs, model) = model(case);
    let losses = model
        .training_losses(&images(), &targets(case), &mut Sampler::first_k())
        .expect("training step");
    check_counts(case, &losses);
    check_losses(case, &losses);
    if gradients {
        losses.total().backward();
        check_gradients(case, &vs);
    }
}

#[test]
fn default_sampler_sizes_give_torchvisions_losses_and_gradients() {
    check_first_k_case("default_first_k", true);
}

#[test]
fn binding_positive_caps_take_the_first_samples_like_torchvision() {
    check_first_k_case("small_batches_first_k", false);
}

#[test]
fn batch_without_any_box_trains_on_background_like_torchvision() {
    check_first_k_case("all_empty_first_k", false);
}

#[test]
fn seeded_random_sampling_draws_torchvisions_samples_and_repeats() {
    let case = case("default_random");
    assert!(!case.deterministic);
    let _serial = serial();
    let (_vs, model) = model(case);
    let (images, targets) = (images(), targets(case));
    let step = |seed: i64| {
        tch::manual_seed(seed);
        tch::no_grad(|| model.training_losses(&images, &targets, &mut Sampler::random())).expect("training step")
    };
    let seed = case.seed.expect("the random case has a seed");
    let a = step(seed);
    check_counts(case, &a);
    // libtorch's generator, seeded alike, draws torchvision's samples.
    check_losses(case, &a);
    let b = step(seed);
    assert_eq!(a.values(), b.values(), "the same seed gives the same losses");
    // Random negatives, not the first ones.
    let first = summary()
        .cases
        .iter()
        .find(|c| c.name == "default_first_k")
        .map(|c| c.losses["loss_classifier"])
        .expect("reference case default_first_k");
    assert!(
        (a.values()[0].1 - first).abs() > 1e-4,
        "random sampling took the first samples"
    );
    assert!(a.total().requires_grad(), "losses keep gradients even under no_grad");
}

#[test]
fn three_trainable_layers_train_exactly_torchvisions_parameters() {
    let _serial = serial();
    let (vs, _model) = model(case("default_first_k"));
    let ours: Vec<String> = trainable_variables(&vs).into_iter().map(|(n, _)| n).collect();
    let mut theirs = summary().trainable.clone();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn new_label_set_gets_a_fresh_predictor_and_loads_everything_else() {
    let _serial = serial();
    let file = weights_file();
    assert_eq!(checkpoint_num_classes(&file).unwrap(), Some(summary().num_classes));
    let cfg = FasterRcnnConfig {
        num_classes: 3,
        ..Default::default()
    };
    tch::manual_seed(1);
    let (vs, _model, report) = FasterRcnn::load_for_fine_tuning(&file, Device::Cpu, cfg.clone(), 2).unwrap();
    assert!(report.predictor_replaced);
    assert_eq!(report.checkpoint_num_classes, Some(summary().num_classes));
    let mut fresh = report.load.left_initialized.clone();
    fresh.sort();
    assert_eq!(
        fresh,
        [
            "roi_heads.box_predictor.bbox_pred.bias",
            "roi_heads.box_predictor.bbox_pred.weight",
            "roi_heads.box_predictor.cls_score.bias",
            "roi_heads.box_predictor.cls_score.weight"
        ]
    );
    let golden = common::load_tensors(&file);
    let vars = vs.variables();
    for (name, var) in &vars {
        if name.starts_with(BOX_PREDICTOR_PREFIX) {
            continue;
        }
        assert!(var.equal(&golden[name]), "{name} loaded unchanged");
    }
    // torchvision's nn.Linear(1024, n) initialisation: uniform in ±1/sqrt(1024).
    let bound = 1.0 / 32.0;
    for (name, rows) in [("cls_score", 3), ("bbox_pred", 12)] {
        let w = &vars[&format!("{BOX_PREDICTOR_PREFIX}{name}.weight")];
        let b = &vars[&format!("{BOX_PREDICTOR_PREFIX}{name}.bias")];
        assert_eq!(w.size(), [rows, 1024]);
        assert_eq!(b.size(), [rows]);
        for t in [w, b] {
            let max = t.abs().max().double_value(&[]);
            assert!(max <= bound && max > 0.9 * bound, "{name}: max |value| {max}");
        }
        assert!(w.requires_grad());
    }
    // trainable_backbone_layers = 2: layer3 and layer4 train, layer2 does not.
    let names: Vec<String> = trainable_variables(&vs).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.starts_with("backbone.body.layer3.")));
    assert!(!names.iter().any(|n| n.starts_with("backbone.body.layer2.")));
    // The same seed gives the same fresh predictor.
    tch::manual_seed(1);
    let (vs2, _, _) = FasterRcnn::load_for_fine_tuning(&file, Device::Cpu, cfg, 2).unwrap();
    let key = format!("{BOX_PREDICTOR_PREFIX}cls_score.weight");
    assert!(vs2.variables()[&key].equal(&vars[&key]));
}

#[test]
fn fine_tuning_setup_reports_bad_input_instead_of_panicking() {
    let _serial = serial();
    let file = weights_file();
    let cfg = config(case("default_first_k"));
    let err = FasterRcnn::load_for_fine_tuning(&file, Device::Cpu, cfg.clone(), 6).unwrap_err();
    assert!(err.to_string().contains("between 0 and 5"), "{err}");
    let err = FasterRcnn::load_for_fine_tuning(Path::new("/nonexistent.safetensors"), Device::Cpu, cfg.clone(), 3)
        .unwrap_err();
    assert!(matches!(
        err,
        attrstream::model::faster_rcnn::FineTuneError::Weights(WeightsError::Io { .. })
    ));

    let (_vs, mut model) = model(case("default_first_k"));
    let images = images();
    let step = |model: &FasterRcnn, targets: Vec<Target>| {
        model
            .training_losses(&images[..1], &targets, &mut Sampler::first_k())
            .unwrap_err()
    };
    let inverted = Target::new(&[[50.0, 50.0, 40.0, 60.0]], &[1]);
    assert!(matches!(
        step(&model, vec![inverted]),
        TrainingError::DegenerateBox { box_index: 0, .. }
    ));
    let background_label = Target::new(&[[5.0, 5.0, 40.0, 60.0]], &[0]);
    let err = step(&model, vec![background_label]);
    assert!(err.to_string().contains("1..5"), "{err}");
    let too_high = Target::new(&[[5.0, 5.0, 40.0, 60.0]], &[5]);
    assert!(matches!(step(&model, vec![too_high]), TrainingError::BadTarget { .. }));
    let missing_label = Target {
        boxes: Tensor::from_slice(&[5.0f32, 5.0, 40.0, 60.0]).view([1, 4]),
        labels: Tensor::from_slice::<i64>(&[]),
    };
    assert!(matches!(
        step(&model, vec![missing_label]),
        TrainingError::BadTarget { .. }
    ));
    assert!(matches!(
        step(&model, vec![Target::empty(), Target::empty()]),
        TrainingError::CountMismatch { images: 1, targets: 2 }
    ));
    let nan = Target::new(&[[f32::NAN, 5.0, 40.0, 60.0]], &[1]);
    assert!(matches!(step(&model, vec![nan]), TrainingError::DegenerateBox { .. }));
    let bytes = images[0].to_kind(Kind::Uint8);
    let err = model
        .training_losses(&[bytes], &[Target::empty()], &mut Sampler::first_k())
        .unwrap_err();
    assert!(matches!(err, TrainingError::BadImage { index: 0, .. }));
    model.optimize_for_inference();
    assert_eq!(
        step(&model, vec![Target::empty()]),
        TrainingError::OptimizedForInference
    );
}

#[test]
fn training_roi_align_matches_torchvision_values_and_input_gradients() {
    let golden = common::load_tensors(&reference_dir().join("roi_align.safetensors"));
    let rois = &golden["rois"];
    for ratio in [2i64, 0] {
        for aligned in [false, true] {
            let key = format!("{ratio}.{}", aligned as i32);
            let input = golden["input"].copy().set_requires_grad(true);
            let out = ops::roi_align_for_training(&input, rois, (7, 7), 0.25, ratio, aligned);
            let err = common::max_relative_error(&out.detach(), &golden[&format!("out.{key}")]);
            assert!(err <= 1e-5, "roi_align {key}: values differ by {err:.2e}");
            (out * &golden[&format!("grad_output.{key}")])
                .sum(Kind::Float)
                .backward();
            let err = common::max_relative_error(&input.grad(), &golden[&format!("grad_input.{key}")]);
            assert!(err <= 1e-5, "roi_align {key}: input gradients differ by {err:.2e}");
            // Same values as the inference RoIAlign.
            let inference = ops::roi_align(&input.detach(), rois, (7, 7), 0.25, ratio, aligned);
            let err = common::max_relative_error(&out_values(&input, rois, ratio, aligned), &inference);
            assert!(
                err <= 1e-5,
                "roi_align {key}: training and inference paths differ by {err:.2e}"
            );
        }
    }
}

fn out_values(input: &Tensor, rois: &Tensor, ratio: i64, aligned: bool) -> Tensor {
    tch::no_grad(|| ops::roi_align_for_training(&input.detach(), rois, (7, 7), 0.25, ratio, aligned))
}
