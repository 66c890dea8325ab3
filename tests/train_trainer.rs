//! Proofs about the fine-tuning trainer (`src/train/trainer.rs`) and its optimizer
//! (`src/train/sgd.rs`):
//!
//! 1. Data parallelism: two CPU replicas compute the same update as one replica on the whole
//!    batch (equal and unequal shards), the loss figures agree, and the shard-size weighting
//!    that makes this exact is checked against a wrong weighting the tolerance would catch.
//! 2. Resume: a run killed after a checkpoint and resumed continues exactly as an
//!    uninterrupted run (random sampling and flips on); a checkpoint of other settings is
//!    refused; a half-written checkpoint folder is ignored.
//! 3. Frozen layers stay bitwise frozen; trained ones move.
//! 4. SGD (momentum, weight decay, clipping) and the learning-rate schedules equal
//!    `torch.optim.SGD`, `clip_grad_norm_`, `LinearLR` + `CosineAnnealingLR` / `MultiStepLR`
//!    (golden values from `tests/reference/sgd_reference.py`).
//!
//! The detector is a seeded random Faster R-CNN ResNet-50 FPN (one trainable backbone layer),
//! written once per test as a base weights file and scaled so that its losses are of order 1
//! (see `write_base_weights`), on 96-pixel synthetic images with smaller sampler batches and
//! proposal counts, so that a step takes well under a second per image. These are
//! equivalence tests, not learning tests.
//!
//! Found on the way (fixed in `Trainer::resume`): a checkpoint whose settings hold a float
//! that serde_json's default parser does not read back exactly was refused as "written by a
//! run with other settings"; `a_killed_run_resumes_exactly` uses such a learning rate.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use attrstream::model::faster_rcnn::{trainable_variables, FasterRcnn, FasterRcnnConfig, Sampler, Target};
use attrstream::model::weights::{self, WeightsMetadata};
use attrstream::preprocess::to_tensor;
use attrstream::train::sgd::{clip_grad_norm, Decay, LrSchedule, Sgd, SgdConfig};
use attrstream::train::synthetic::{generate, SynthConfig, CLASSES};
use attrstream::train::trainer::{StepStats, TrainExample, TrainSettings, Trainer};
use serde::Deserialize;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Side of the square synthetic images; the model's `min_size = max_size` (no resizing, and a
/// multiple of 32, so batches are not padded whatever their split).
const SIZE: u32 = 96;
/// Backbone layers that train (`layer4`), as `trainable_backbone_layers`.
const LAYERS: u8 = 1;
/// Seed of the random base model.
const BASE_SEED: i64 = 20;

/// Data parallel vs one replica, per trained tensor after every step:
/// `max |p_dp − p_one| ≤ UPDATE_REL · max |Δ_one| + ULPS · ε_f32 · max |p_one|`, where Δ is the
/// change of the tensor since the start; the momentum buffers to `UPDATE_REL` of their
/// largest value, with no other allowance.
///
/// Both runs compute the same mathematical update; what differs is float32 summation order
/// (each replica sums its shard's weight gradients over its own images, then the shard sums
/// are weighted and added, instead of one sum over the batch). That moves gradients by about
/// 2e-6 of their largest value and the momentum buffers after three steps by 5e-6
/// (measured), so `UPDATE_REL = 1e-4` leaves a margin of about 20 and is still three orders
/// of magnitude below what a wrong shard weighting does (measured in `check_shard_weighting`:
/// 0.17 and more). Independently, a parameter is stored in float32 after `p + Δ`, and an
/// update much smaller than the parameter (layer4's is ~1e-5 of its weights) lands on one of
/// two neighbouring floats depending on its last bits: each step may leave the runs one unit
/// in the last place apart, hence `ULPS` (3 steps + 1). That allowance is why the momentum
/// buffers, which carry the same gradients without it, are compared too.
///
/// The forward passes are bitwise equal for shards of 2 images or more: libtorch's
/// convolutions give the same bits for an image in any batch of 2 or more. A shard of one
/// image is computed differently (~1e-6 apart, measured), which puts the figures of the 2 + 1
/// step ~1e-6 apart instead of ~3e-7; that is why [`check_shard_weighting`], which isolates
/// the weighting arithmetic, uses shards of 3 + 2.
const UPDATE_REL: f64 = 1e-4;
/// See [`UPDATE_REL`].
const ULPS: f64 = 4.0;
/// Loss figures and gradient norms (before clipping) of data parallel vs one replica
/// (relative): the same per-image values averaged in another order (measured: 3e-7, and 1e-6
/// with a one-image shard), 500 times below what equal shard weights give.
const LOSS_REL: f64 = 1e-4;
/// Gradients: shard-size-weighted shard gradients vs the full batch's, per tensor
/// (`max |error| / max |full|`); float32 summation order, as for [`UPDATE_REL`].
const GRAD_REL: f64 = 1e-4;

/// libtorch's random generator is global: the tests of this file take turns so that one test's
/// `manual_seed` cannot land between another's seed and draw.
///
/// They also run libtorch on one thread: these small tensors gain little from a second one,
/// and on a shared, busy machine OpenMP's spinning workers made the suite six times slower
/// (measured: 30 s instead of 5 s for the frozen-layers test on 2 loaded cores).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::set_num_threads(1);
    guard
}

/// The detector configuration of these tests: torchvision's defaults with 96-pixel inputs,
/// smaller sampler batches and proposal counts (cost), and the synthetic classes.
///
/// Exact data parallelism needs every image to sample the same number of anchors and
/// proposals (the losses average over all samples of the batch): 64 of an image's ~2300
/// anchors, and 32 of its up-to-100 proposals (+ its ground-truth boxes) always fill up.
/// `gradients` checks that this holds.
fn model_config() -> FasterRcnnConfig {
    FasterRcnnConfig {
        num_classes: CLASSES.len() as i64 + 1,
        min_size: SIZE as i64,
        max_size: SIZE as i64,
        rpn_pre_nms_top_n_train: 200,
        rpn_post_nms_top_n_train: 100,
        rpn_batch_size_per_image: 64,
        box_batch_size_per_image: 32,
        ..Default::default()
    }
}

/// Writes a seeded random model as the base weights file (what fine-tuning starts from).
///
/// tch's default initialisation with identity batch norms makes the body's outputs large
/// (FPN features with a standard deviation of hundreds), and with them every loss (hundreds)
/// and gradient. The body's convolutions have no biases, its frozen batch norms start as
/// (near) identities and the FPN's biases at zero, so between ReLUs and max pooling the
/// features scale exactly with the first convolution's weights: they are divided by the
/// features' standard deviation on a training image. The RPN head gets torchvision's
/// initialisation (normal, std 0.01, zero biases), so the proposals start near the anchors and
/// every image has plenty of them (see `model_config`).
fn write_base_weights(dir: &Path, calibration: &TrainExample) -> PathBuf {
    let path = dir.join("base.safetensors");
    let cfg = model_config();
    tch::manual_seed(BASE_SEED);
    let vs = VarStore::new(Device::Cpu);
    // Inference with few proposals: only the features are needed.
    let quick = FasterRcnnConfig {
        rpn_pre_nms_top_n_test: 10,
        rpn_post_nms_top_n_test: 10,
        ..cfg.clone()
    };
    let model = FasterRcnn::new(&vs.root(), quick);
    let variables = vs.variables();
    // Zero box deltas for this one pass: proposals are the anchors, never degenerate.
    let _ = tch::no_grad(|| variables["rpn.head.bbox_pred.weight"].shallow_clone().zero_());
    let features = model.detect_traced(&[calibration.image.shallow_clone()]).features;
    let scale = features[0].std(true).double_value(&[]);
    assert!(scale.is_finite() && scale > 0.0, "feature scale {scale}");
    // In name order: the random draws must not depend on a hash map's iteration order.
    let mut variables: Vec<(String, Tensor)> = variables.into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in variables {
            if name == "backbone.body.conv1.weight" {
                let _ = t.g_div_scalar_(scale);
            } else if name.starts_with("rpn.head.") && name.ends_with(".weight") {
                let _ = t.normal_(0.0, 0.01);
            } else if name.starts_with("rpn.head.") && name.ends_with(".bias") {
                let _ = t.zero_();
            }
        }
    });
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let labels = std::iter::once("__background__")
        .chain(CLASSES)
        .map(String::from)
        .collect();
    weights::save(
        &path,
        &tensors,
        &WeightsMetadata {
            architecture: Some("fasterrcnn_resnet50_fpn".into()),
            labels: Some(labels),
            source: Some("tests/train_trainer.rs seeded random model".into()),
            config: Some(serde_json::to_value(&cfg).expect("config as JSON")),
            ..Default::default()
        },
    )
    .expect("write the base weights");
    path
}

/// A replica as `Trainer::new` wants it: the base weights with `LAYERS` backbone layers
/// trainable.
fn build(base: &Path, device: Device) -> anyhow::Result<(VarStore, FasterRcnn)> {
    let (vs, model, _) = FasterRcnn::load_for_fine_tuning(base, device, model_config(), LAYERS)?;
    Ok((vs, model))
}

/// `n` synthetic training images (1–3 shapes each) of `SIZE` pixels.
fn examples(n: usize) -> Vec<TrainExample> {
    let mut cfg = SynthConfig::new(n, 11);
    cfg.width = SIZE;
    cfg.height = SIZE;
    cfg.min_object = 16;
    cfg.max_object = 48;
    generate(&cfg)
        .expect("synthetic data")
        .map(|s| {
            let flat: Vec<f32> = s.objects.iter().flat_map(|o| o.bbox.map(|v| v as f32)).collect();
            let labels: Vec<i64> = s.objects.iter().map(|o| o.class as i64 + 1).collect();
            TrainExample {
                image: to_tensor(&s.image, Device::Cpu),
                boxes: Tensor::from_slice(&flat).view([-1, 4]),
                labels: Tensor::from_slice(&labels),
            }
        })
        .collect()
}

/// Settings of these tests: a one-step warm-up and cosine decay, momentum and weight decay on
/// (so the second step uses the momentum buffers); `random` turns on random sampling and flips.
fn settings(batch_size: usize, steps: u64, random: bool, clip: Option<f64>) -> TrainSettings {
    TrainSettings {
        batch_size,
        steps,
        schedule: LrSchedule {
            base_lr: 0.01,
            warmup_steps: 1,
            warmup_factor: 0.5,
            decay: Decay::Cosine { min_lr: 0.0 },
            total_steps: steps,
        },
        sgd: SgdConfig {
            momentum: 0.9,
            weight_decay: 1e-4,
        },
        hflip_prob: if random { 0.5 } else { 0.0 },
        clip_grad_norm: clip,
        seed: 5,
        deterministic_sampling: !random,
    }
}

/// Runs `steps` steps on the batches the trainer picks from `data`.
fn run(trainer: &mut Trainer, data: &[TrainExample], steps: u64) -> Vec<StepStats> {
    (0..steps)
        .map(|_| {
            let indices = trainer.batch_indices(data.len(), trainer.next_step());
            let batch: Vec<&TrainExample> = indices.iter().map(|&i| &data[i]).collect();
            trainer
                .step(&batch)
                .unwrap_or_else(|e| panic!("step {}: {e:#}", trainer.next_step()))
        })
        .collect()
}

/// Copies of the trained parameters, by name.
fn trained(trainer: &Trainer) -> Vec<(String, Tensor)> {
    let vars = trainer.model().0.variables();
    trainer
        .trained_names()
        .into_iter()
        .map(|name| {
            let t = vars[&name].detach().copy();
            (name, t)
        })
        .collect()
}

/// Compares two runs' trained parameters by [`UPDATE_REL`]'s rule; returns the worst
/// ratio of difference to allowance (at most 1 passes), the tensor, and its difference
/// relative to its update.
fn worst_update_error(
    start: &[(String, Tensor)],
    ours: &[(String, Tensor)],
    reference: &[(String, Tensor)],
) -> (f64, String, f64) {
    assert_eq!(ours.len(), reference.len(), "different trained parameter sets");
    let max_abs = |t: &Tensor| t.abs().max().to_kind(Kind::Double).double_value(&[]);
    let mut worst = (-1.0f64, String::new(), 0.0);
    for (((name, s), (n1, a)), (n2, b)) in start.iter().zip(ours).zip(reference) {
        assert!(name == n1 && name == n2, "parameter order differs: {name} {n1} {n2}");
        let difference = max_abs(&(a - b));
        let update = max_abs(&(b - s));
        let allowed = UPDATE_REL * update + ULPS * f64::from(f32::EPSILON) * max_abs(b);
        let ratio = difference / allowed.max(f64::MIN_POSITIVE);
        if ratio > worst.0 {
            worst = (ratio, name.clone(), difference / update.max(f64::MIN_POSITIVE));
        }
    }
    worst
}

/// `|a − b| / |b|`, the relative difference of a scalar from its reference.
fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The figures of one step must agree (except speed); returns the largest relative difference.
fn assert_same_stats(dp: &StepStats, one: &StepStats, what: &str) -> f64 {
    assert_eq!(dp.step, one.step, "{what}");
    assert_eq!(dp.lr, one.lr, "{what}: learning rate");
    let pairs = [
        ("classifier", dp.classifier, one.classifier),
        ("box_reg", dp.box_reg, one.box_reg),
        ("objectness", dp.objectness, one.objectness),
        ("rpn_box_reg", dp.rpn_box_reg, one.rpn_box_reg),
        ("grad_norm", dp.grad_norm, one.grad_norm),
    ];
    let mut worst = 0.0f64;
    for (name, a, b) in pairs {
        assert!(a.is_finite() && b.is_finite(), "{what}: {name} not finite: {a} vs {b}");
        assert!(
            relative(a, b) <= LOSS_REL,
            "{what}: {name} {a} (2 replicas) vs {b} (1 replica), relative {:.2e}",
            relative(a, b)
        );
        worst = worst.max(relative(a, b));
    }
    worst
}

/// Runs the next step of both trainers on the same `batch` and compares their figures and
/// their parameters.
fn step_both(one: &mut Trainer, two: &mut Trainer, batch: &[&TrainExample], start: &[(String, Tensor)]) {
    let what = format!("step {} (batch of {})", one.next_step(), batch.len());
    let a = one.step(batch).unwrap_or_else(|e| panic!("{what}, one replica: {e:#}"));
    let b = two
        .step(batch)
        .unwrap_or_else(|e| panic!("{what}, two replicas: {e:#}"));
    let figures = assert_same_stats(&b, &a, &what);
    let (ratio, name, relative_to_update) = worst_update_error(start, &trained(two), &trained(one));
    eprintln!(
        "{what}: figures {figures:.1e} apart; worst tensor {name}: {ratio:.2} of the allowance \
         ({relative_to_update:.1e} of its update); one replica {a:?}"
    );
    assert!(
        ratio <= 1.0,
        "{what}: two replicas' {name} differs from one replica's by {relative_to_update:.2e} of its update, \
         {ratio:.1}x the tolerance"
    );
}

/// Gradients (zeros where a parameter got none) and the four losses of one forward and
/// backward pass on `batch` with deterministic sampling.
fn gradients(model: &FasterRcnn, params: &[(String, Tensor)], batch: &[&TrainExample]) -> (Vec<Tensor>, [f64; 4]) {
    for (_, p) in params {
        p.shallow_clone().zero_grad();
    }
    let images: Vec<Tensor> = batch.iter().map(|e| e.image.shallow_clone()).collect();
    let targets: Vec<Target> = batch
        .iter()
        .map(|e| Target {
            boxes: e.boxes.shallow_clone(),
            labels: e.labels.shallow_clone(),
        })
        .collect();
    let losses = model
        .training_losses(&images, &targets, &mut Sampler::first_k())
        .expect("training losses");
    // The precondition of exact shard weighting: every image samples a full batch of anchors
    // and of proposals, so each loss (a mean over all samples of the batch, or a sum divided
    // by their count) is the image-count-weighted mean of the shards' losses.
    let cfg = model_config();
    for (i, s) in losses.sampling.rpn.iter().enumerate() {
        assert_eq!(
            s.positives + s.negatives,
            cfg.rpn_batch_size_per_image,
            "image {i} anchors: {s:?}"
        );
        assert!(s.positives > 0, "image {i} has no positive anchor: {s:?}");
    }
    for (i, s) in losses.sampling.roi.iter().enumerate() {
        assert_eq!(
            s.positives + s.negatives,
            cfg.box_batch_size_per_image,
            "image {i} proposals: {s:?}"
        );
        assert!(s.positives > 0, "image {i} has no positive proposal: {s:?}");
    }
    let values = losses.values().map(|(_, v)| v);
    losses.total().backward();
    let grads = params
        .iter()
        .map(|(_, p)| {
            let g = p.grad();
            if g.defined() {
                g.copy()
            } else {
                p.zeros_like()
            }
        })
        .collect();
    (grads, values)
}

/// The largest per-tensor relative error of `w_a·a + w_b·b` against `full`.
fn worst_mix_error(a: &[Tensor], b: &[Tensor], (w_a, w_b): (f64, f64), full: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .zip(full)
        .map(|((a, b), full)| common::max_relative_error(&(a * w_a + b * w_b), full))
        .fold(0.0, f64::max)
}

/// Shards of 3 + 2 images weighted 3/5 and 2/5 (what the trainer does) give the full batch's
/// gradients and losses; a plain average of the two replicas (the classic data-parallel
/// mistake with unequal shards) is far outside the tolerances, so the comparisons of
/// [`step_both`] would catch it.
fn check_shard_weighting(model: &FasterRcnn, params: &[(String, Tensor)], batch: &[&TrainExample]) {
    assert_eq!(batch.len(), 5);
    let (full, full_losses) = gradients(model, params, batch);
    let (first, first_losses) = gradients(model, params, &batch[..3]);
    let (second, second_losses) = gradients(model, params, &batch[3..]);
    let weights = (3.0 / 5.0, 2.0 / 5.0);
    let right = worst_mix_error(&first, &second, weights, &full);
    let wrong = worst_mix_error(&first, &second, (0.5, 0.5), &full);
    eprintln!("gradients vs the full batch: shard-size weights {right:.2e}, equal weights {wrong:.2e}");
    assert!(
        right <= GRAD_REL,
        "shard-size-weighted gradients differ from the full batch's by {right:.2e}"
    );
    assert!(
        wrong > 100.0 * UPDATE_REL.max(GRAD_REL),
        "equal weighting is only {wrong:.2e} off the full batch: the tolerances could not tell it apart"
    );
    let (mut worst_equal_loss, mut worst_weighted_loss) = (0.0f64, 0.0f64);
    for (k, name) in ["classifier", "box_reg", "objectness", "rpn_box_reg"]
        .iter()
        .enumerate()
    {
        let weighted = first_losses[k] * weights.0 + second_losses[k] * weights.1;
        let equal = (first_losses[k] + second_losses[k]) / 2.0;
        assert!(
            relative(weighted, full_losses[k]) <= LOSS_REL,
            "{name}: shard-weighted {weighted} vs full batch {}",
            full_losses[k]
        );
        worst_equal_loss = worst_equal_loss.max(relative(equal, full_losses[k]));
        worst_weighted_loss = worst_weighted_loss.max(relative(weighted, full_losses[k]));
    }
    eprintln!(
        "losses vs the full batch: shard-size weights {worst_weighted_loss:.2e}, equal weights {worst_equal_loss:.2e}"
    );
    assert!(
        worst_equal_loss > 100.0 * LOSS_REL,
        "equal weighting of the losses is only {worst_equal_loss:.2e} off"
    );
}

#[test]
fn two_cpu_replicas_reproduce_the_single_replica_update() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = examples(5);
    let base = write_base_weights(dir.path(), &data[0]);
    // Deterministic sampling, no flips. Clipping bounds the updates of a random network; it
    // would hide a wrongly scaled gradient (a sum instead of a mean over replicas), but the
    // gradient norm before clipping is among the compared figures.
    let s = settings(4, 3, false, Some(10.0));
    let mut one = Trainer::new(&[Device::Cpu], |d| build(&base, d), s.clone()).expect("one replica");
    let mut two = Trainer::new(&[Device::Cpu, Device::Cpu], |d| build(&base, d), s).expect("two replicas");
    assert_eq!(one.trained_names(), two.trained_names());
    let start = trained(&one);
    // Steps 0 and 1: batches of 4 in shards of 2 + 2 (step 1 uses the momentum buffers).
    for _ in 0..2 {
        let indices = one.batch_indices(data.len(), one.next_step());
        assert_eq!(indices, two.batch_indices(data.len(), two.next_step()));
        let batch: Vec<&TrainExample> = indices.iter().map(|&i| &data[i]).collect();
        step_both(&mut one, &mut two, &batch, &start);
    }
    // Step 2: a batch of 3 in unequal shards of 2 + 1, exact only because the trainer weights
    // each shard's gradients and losses by its share of the batch.
    let batch: Vec<&TrainExample> = data[..3].iter().collect();
    step_both(&mut one, &mut two, &batch, &start);

    // The momentum buffers hold every step's (clipped, weight-decayed) gradient, and unlike
    // the parameters they are not a small update added to a large float: they must agree to
    // UPDATE_REL with no allowance for float32 storage.
    let one_momentum = common::load_tensors(
        &one.save_checkpoint(&dir.path().join("one"), 1)
            .unwrap()
            .join("optimizer.safetensors"),
    );
    let two_momentum = common::load_tensors(
        &two.save_checkpoint(&dir.path().join("two"), 1)
            .unwrap()
            .join("optimizer.safetensors"),
    );
    assert_eq!(
        one_momentum.len(),
        start.len(),
        "one momentum buffer per trained parameter"
    );
    let mut worst = (0.0f64, "");
    for (name, expected) in &one_momentum {
        let actual = two_momentum
            .get(name)
            .unwrap_or_else(|| panic!("no momentum for {name} with 2 replicas"));
        let error = common::max_relative_error(actual, expected);
        if error >= worst.0 {
            worst = (error, name);
        }
    }
    eprintln!(
        "momentum buffers: worst relative difference {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= UPDATE_REL,
        "momentum of {}: two replicas' is {:.2e} off one replica's",
        worst.1,
        worst.0
    );

    let (vs, model) = one.model();
    check_shard_weighting(model, &trainable_variables(vs), &data.iter().collect::<Vec<_>>());
}

/// Two checkpoint files hold the same names and bitwise-equal tensors.
fn assert_same_tensors(ours: &Path, reference: &Path) {
    let a = common::load_tensors(ours);
    let b = common::load_tensors(reference);
    let mut names: Vec<&String> = b.keys().collect();
    names.sort();
    assert_eq!(
        {
            let mut k: Vec<&String> = a.keys().collect();
            k.sort();
            k
        },
        names,
        "{} and {} hold different tensors",
        ours.display(),
        reference.display()
    );
    assert!(!names.is_empty(), "{} is empty", reference.display());
    for name in names {
        assert!(
            a[name].equal(&b[name]),
            "{name} differs between {} and {} (max relative {:.2e})",
            ours.display(),
            reference.display(),
            common::max_relative_error(&a[name], &b[name])
        );
    }
}

#[test]
fn a_killed_run_resumes_exactly() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    // 5 images, batch 2: the 4 steps cross epoch boundaries (new seeded orders).
    let data = examples(5);
    let base = write_base_weights(dir.path(), &data[0]);
    let mut s = settings(2, 4, true, Some(10.0));
    // A rate whose shortest decimal form serde_json's default float parser reads back one unit
    // in the last place off: the checkpoint's settings must still be recognised as this run's.
    s.schedule.base_lr = 0.009198811848645395;
    let devices = [Device::Cpu, Device::Cpu];
    let replica = |d| build(&base, d);

    let straight_dir = dir.path().join("straight");
    let mut straight = Trainer::new(&devices, replica, s.clone()).expect("trainer");
    let first_batch = straight.batch_indices(data.len(), 0);
    let straight_stats = run(&mut straight, &data, 4);
    let straight_ckpt = straight.save_checkpoint(&straight_dir, 1).expect("checkpoint");
    drop(straight);

    let ckpt_dir = dir.path().join("killed");
    {
        let mut first = Trainer::new(&devices, replica, s.clone()).expect("trainer");
        assert_eq!(first.resume(&ckpt_dir).expect("resume from nothing"), None);
        let stats = run(&mut first, &data, 2);
        assert_eq!(stats, {
            let mut expected = straight_stats[..2].to_vec();
            for (e, s) in expected.iter_mut().zip(&stats) {
                e.images_per_sec = s.images_per_sec;
            }
            expected
        });
        first.save_checkpoint(&ckpt_dir, 2).expect("checkpoint");
        // Dropped here: the process is killed after its checkpoint.
    }
    // Checkpoints that a killed process left half-written: the trainer's temporary folder
    // (with a plausible state.json) and a step folder without its state.json (written last).
    // Newer than the complete step-2 checkpoint, they must be passed over for it; alone in a
    // folder, they mean a fresh start.
    let good_state = String::from_utf8(std::fs::read(ckpt_dir.join("step-0000000002/state.json")).unwrap()).unwrap();
    assert!(good_state.contains("\"next_step\": 2"), "{good_state}");
    let only_partial = dir.path().join("only-partial");
    for folder in [&ckpt_dir, &only_partial] {
        for (name, with_state) in [(".step-0000000003.partial", true), ("step-0000000004", false)] {
            let path = folder.join(name);
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join("weights.safetensors"), b"half written").unwrap();
            if with_state {
                let state = good_state.replace("\"next_step\": 2", "\"next_step\": 3");
                std::fs::write(path.join("state.json"), state).unwrap();
            }
        }
    }

    let mut other_settings = s.clone();
    other_settings.seed += 1;
    let mut other = Trainer::new(&devices, replica, other_settings).expect("trainer");
    assert_eq!(
        other
            .resume(&only_partial)
            .expect("resume from half-written checkpoints"),
        None
    );
    assert_eq!(other.next_step(), 0);
    // Another run's settings must not resume from the folder with a complete checkpoint.
    let err = format!("{:#}", other.resume(&ckpt_dir).unwrap_err());
    assert!(
        err.contains("other settings") && err.contains("step-0000000002") && err.contains("--checkpoint-dir"),
        "unclear error: {err}"
    );
    // Randomness is really on: with another seed, the same first batch is flipped and
    // sampled differently.
    let batch: Vec<&TrainExample> = first_batch.iter().map(|&i| &data[i]).collect();
    let other_stats = other.step(&batch).expect("step");
    assert_ne!(
        other_stats.total(),
        straight_stats[0].total(),
        "the seed changes nothing"
    );
    drop(other);

    let mut resumed = Trainer::new(&devices, replica, s).expect("trainer");
    assert_eq!(resumed.resume(&ckpt_dir).expect("resume"), Some(2));
    assert_eq!(resumed.next_step(), 2);
    let stats = run(&mut resumed, &data, 2);
    for (a, b) in stats.iter().zip(&straight_stats[2..]) {
        assert_eq!(
            (a.step, a.total(), a.grad_norm, a.lr),
            (b.step, b.total(), b.grad_norm, b.lr),
            "resumed step differs"
        );
    }
    let resumed_ckpt = resumed.save_checkpoint(&ckpt_dir, 2).expect("checkpoint");
    assert_eq!(resumed_ckpt.file_name(), straight_ckpt.file_name());
    // Every variable (trained or frozen) and every momentum buffer, bitwise.
    assert_same_tensors(
        &resumed_ckpt.join("weights.safetensors"),
        &straight_ckpt.join("weights.safetensors"),
    );
    assert_same_tensors(
        &resumed_ckpt.join("optimizer.safetensors"),
        &straight_ckpt.join("optimizer.safetensors"),
    );
}

#[test]
fn frozen_layers_stay_frozen_and_trained_ones_move() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = examples(4);
    let base = write_base_weights(dir.path(), &data[0]);
    let mut trainer =
        Trainer::new(&[Device::Cpu], |d| build(&base, d), settings(2, 2, true, Some(10.0))).expect("trainer");
    let names = trainer.trained_names();
    // With one trainable backbone layer: layer4's convolutions and everything after the body.
    assert!(
        names.iter().any(|n| n.starts_with("backbone.body.layer4.")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("roi_heads.box_predictor.")),
        "{names:?}"
    );
    for frozen in [
        "backbone.body.conv1.",
        "backbone.body.layer1.",
        "backbone.body.layer2.",
        "backbone.body.layer3.",
    ] {
        assert!(
            !names.iter().any(|n| n.starts_with(frozen)),
            "{frozen} trains: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains(".bn") || n.contains("downsample.1")),
        "batch norm trains"
    );
    run(&mut trainer, &data, 2);

    let before = common::load_tensors(&base);
    let after = trainer.model().0.variables();
    assert_eq!(
        before.len(),
        after.len(),
        "the model has other variables than the base file"
    );
    let (mut frozen, mut moved) = (0, 0);
    for (name, initial) in &before {
        let now = &after[name];
        if names.contains(name) {
            assert!(!now.equal(initial), "trained parameter {name} did not change");
            moved += 1;
        } else {
            assert!(
                now.equal(initial),
                "frozen variable {name} changed (max relative {:.2e})",
                common::max_relative_error(now, initial)
            );
            frozen += 1;
        }
    }
    eprintln!("{moved} trained tensors moved, {frozen} frozen ones kept");
    assert!(frozen > 200 && moved == names.len(), "{frozen} frozen, {moved} trained");
}

/// Golden values written by `tests/reference/sgd_reference.py`.
#[derive(Debug, Deserialize)]
struct SgdReference {
    c: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<Vec<f32>>,
    f: Vec<f32>,
    cases: Vec<SgdCase>,
}

#[derive(Debug, Deserialize)]
struct SgdCase {
    name: String,
    schedule: LrSchedule,
    sgd: SgdConfig,
    clip: Option<f64>,
    steps: Vec<SgdStep>,
}

#[derive(Debug, Deserialize)]
struct SgdStep {
    x: Vec<f32>,
    y: Vec<f32>,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    params: HashMap<String, Vec<f64>>,
    momentum: HashMap<String, Vec<f64>>,
    f: Vec<f64>,
}

/// Values equal to torch's: `|a − b| ≤ 1e-6 · max(1, |b|)` element-wise.
fn assert_close(actual: &Tensor, expected: &[f64], what: &str) {
    let actual = Vec::<f64>::try_from(&actual.to_kind(Kind::Double).flatten(0, -1)).expect("values");
    assert_eq!(actual.len(), expected.len(), "{what}: lengths");
    for (i, (a, b)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{what}[{i}]: {a} vs torch {b}"
        );
    }
}

#[test]
fn sgd_and_schedules_match_torch() {
    let dir = common::cached_reference("tests/reference/sgd_reference.py", "sgd", &[]);
    let text = std::fs::read_to_string(dir.join("sgd.json")).expect("sgd.json");
    let reference: SgdReference = serde_json::from_str(&text).expect("sgd.json parses");
    assert_eq!(reference.cases.len(), 4);
    let c = Tensor::from_slice(&reference.c);
    // Some case must have gradient norms on both sides of its clipping limit.
    let mut partly_clipped = false;
    for case in &reference.cases {
        let name = &case.name;
        let w1 = Tensor::from_slice(&reference.w1).set_requires_grad(true);
        let flat: Vec<f32> = reference.w2.iter().flatten().copied().collect();
        let w2 = Tensor::from_slice(&flat).view([2, 3]).set_requires_grad(true);
        let f = Tensor::from_slice(&reference.f);
        // The frozen `f` is in the list on purpose: the optimizer must skip it, as torch does.
        let params = vec![
            ("f".to_string(), f.shallow_clone()),
            ("w1".to_string(), w1.shallow_clone()),
            ("w2".to_string(), w2.shallow_clone()),
        ];
        let mut sgd = Sgd::new(case.sgd);
        let mut clipped = 0;
        for (t, expected) in case.steps.iter().enumerate() {
            let what = format!("{name} step {t}");
            for (_, p) in &params {
                p.shallow_clone().zero_grad();
            }
            let x = Tensor::from_slice(&expected.x);
            let y = Tensor::from_slice(&expected.y);
            let loss = (w2.matmul(&x) - y).square().sum(Kind::Float)
                + (&c * &w1 * &w1).sum(Kind::Float) * 0.5
                + w1.sum(Kind::Float) * w2.sum(Kind::Float)
                + f.sum(Kind::Float) * w1.sum(Kind::Float);
            assert_close(
                &loss.detach(),
                &[expected.loss],
                &format!("{what}: loss (same toy problem)"),
            );
            loss.backward();
            let max_norm = case.clip.unwrap_or(f64::INFINITY);
            let norm = clip_grad_norm(&params, max_norm);
            clipped += usize::from(norm > max_norm);
            assert!(
                relative(norm, expected.grad_norm) <= 1e-6,
                "{what}: gradient norm {norm} vs torch {}",
                expected.grad_norm
            );
            let lr = case.schedule.lr_at(t as u64);
            assert!(
                relative(lr, expected.lr) <= 1e-6,
                "{what}: learning rate {lr} vs torch {}",
                expected.lr
            );
            sgd.step(&params, lr);
            assert_close(&w1.detach(), &expected.params["w1"], &format!("{what}: w1"));
            assert_close(&w2.detach(), &expected.params["w2"], &format!("{what}: w2"));
            assert_close(&f, &expected.f, &format!("{what}: frozen f"));
            if case.sgd.momentum == 0.0 {
                assert!(
                    sgd.state().is_empty() && expected.momentum.is_empty(),
                    "{what}: momentum kept"
                );
            } else {
                let state = sgd.state();
                assert_eq!(state.len(), 2, "{what}: momentum buffers {:?}", state.keys());
                assert_close(&state["w1"], &expected.momentum["w1"], &format!("{what}: momentum w1"));
                assert_close(&state["w2"], &expected.momentum["w2"], &format!("{what}: momentum w2"));
            }
        }
        if let Some(max) = case.clip {
            eprintln!("{name}: clipped {clipped} of {} steps at {max}", case.steps.len());
            assert!(clipped > 0, "{name}: clipping never engaged");
            partly_clipped |= clipped < case.steps.len();
        }
    }
    assert!(partly_clipped, "no case has steps below its clipping limit");
}
