//! The fine-tuning loop: data-parallel Faster R-CNN training steps, checkpoints that a killed
//! run resumes from exactly, and the figures a progress bar and telemetry show.
//!
//! Data parallelism is the classic synchronous kind: one model replica per device, each step's
//! batch split into contiguous shards (one per replica), every replica computes its shard's
//! losses and gradients, the gradients are averaged into the first replica (weighted by shard
//! size, so the result is the full batch's gradient), one optimizer step runs there, and the
//! updated parameters are copied back to the other replicas. Replicas on distinct GPUs run
//! their shards in parallel; CPU replicas share the same cores and run one after another.
//!
//! Repeatability: the data order of each epoch, the flips and libtorch's generator are all
//! derived from `(seed, epoch)` or `(seed, step)`, never from what ran before, so a run
//! resumed from a checkpoint continues exactly as the uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::model::faster_rcnn::sampling::Sampler;
use crate::model::faster_rcnn::training::Target;
use crate::model::faster_rcnn::FasterRcnn;
use crate::train::sgd::{clip_grad_norm, LrSchedule, Sgd, SgdConfig};

/// One training image with its boxes, on the CPU.
#[derive(Debug)]
pub struct TrainExample {
    /// `[3, H, W]` float RGB in `[0, 1]`.
    pub image: Tensor,
    /// `[N, 4]` float boxes `(x1, y1, x2, y2)` in pixels of `image`.
    pub boxes: Tensor,
    /// `[N]` int64 class indices (1-based; 0 is background).
    pub labels: Tensor,
}

impl TrainExample {
    /// Another handle on the same tensors (no copy).
    pub fn shallow_clone(&self) -> TrainExample {
        TrainExample {
            image: self.image.shallow_clone(),
            boxes: self.boxes.shallow_clone(),
            labels: self.labels.shallow_clone(),
        }
    }

    /// The same example mirrored left-right (image and boxes).
    pub fn flipped(&self) -> TrainExample {
        let width = self.image.size()[2] as f64;
        let boxes = if self.boxes.size()[0] == 0 {
            self.boxes.shallow_clone()
        } else {
            let x1 = self.boxes.select(1, 0);
            let x2 = self.boxes.select(1, 2);
            Tensor::stack(
                &[
                    -&x2 + width,
                    self.boxes.select(1, 1),
                    -&x1 + width,
                    self.boxes.select(1, 3),
                ],
                1,
            )
        };
        TrainExample {
            image: self.image.flip([2]),
            boxes,
            labels: self.labels.shallow_clone(),
        }
    }
}

/// What a training run does, apart from the data and the starting model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Images per step, over all replicas together.
    pub batch_size: usize,
    /// Total optimizer steps of the run.
    pub steps: u64,
    /// Learning-rate schedule (warm-up and decay).
    pub schedule: LrSchedule,
    /// Momentum and weight decay.
    pub sgd: SgdConfig,
    /// Probability of mirroring an image left-right (torchvision's recipe: 0.5).
    pub hflip_prob: f64,
    /// Clip the gradients' joint L2 norm to this value (`None`: no clipping).
    pub clip_grad_norm: Option<f64>,
    /// Seed of every random choice (data order, flips, proposal sampling).
    pub seed: u64,
    /// Take proposals and anchors in index order instead of sampling them at random
    /// (for parity tests; training uses random sampling).
    pub deterministic_sampling: bool,
}

/// The losses and figures of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 0-based step index.
    pub step: u64,
    /// Classifier loss (Fast R-CNN head).
    pub classifier: f64,
    /// Box regression loss (Fast R-CNN head).
    pub box_reg: f64,
    /// RPN objectness loss.
    pub objectness: f64,
    /// RPN box regression loss.
    pub rpn_box_reg: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Images per second of this step.
    pub images_per_sec: f64,
}

impl StepStats {
    /// The sum of the four losses (what is minimised).
    pub fn total(&self) -> f64 {
        self.classifier + self.box_reg + self.objectness + self.rpn_box_reg
    }
}

/// One model replica on one device.
struct Replica {
    store: VarStore,
    model: FasterRcnn,
    device: Device,
    /// Trained parameters by name, in one fixed order shared by all replicas.
    params: Vec<(String, Tensor)>,
}

/// Synchronous data-parallel trainer over one replica per device.
pub struct Trainer {
    replicas: Vec<Replica>,
    optimizer: Sgd,
    settings: TrainSettings,
    /// The next step to run (a resumed run starts past 0).
    next_step: u64,
}

/// Trained parameters of a store, sorted by name.
fn trained_params(store: &VarStore) -> Vec<(String, Tensor)> {
    let mut params: Vec<(String, Tensor)> = store
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

impl Trainer {
    /// Builds one replica per device with `build` (which loads the starting weights and
    /// freezes the layers that must not train); every replica starts from the first one's
    /// values, so they are identical whatever `build` does.
    pub fn new(
        devices: &[Device],
        build: impl Fn(Device) -> Result<(VarStore, FasterRcnn)>,
        settings: TrainSettings,
    ) -> Result<Self> {
        if devices.is_empty() {
            bail!("training needs at least one device");
        }
        if settings.batch_size < devices.len() {
            bail!(
                "batch size {} is smaller than the {} devices: every replica needs at least one image per step",
                settings.batch_size,
                devices.len()
            );
        }
        let mut replicas = Vec::new();
        for &device in devices {
            let (store, model) = build(device).with_context(|| format!("building the replica on {device:?}"))?;
            let params = trained_params(&store);
            replicas.push(Replica {
                store,
                model,
                device,
                params,
            });
        }
        let names: Vec<&String> = replicas[0].params.iter().map(|(n, _)| n).collect();
        for r in &replicas[1..] {
            if r.params.iter().map(|(n, _)| n).collect::<Vec<_>>() != names {
                bail!("replicas disagree on which parameters train");
            }
        }
        if names.is_empty() {
            bail!("nothing to train: every parameter is frozen");
        }
        let mut trainer = Self {
            replicas,
            optimizer: Sgd::new(settings.sgd),
            settings,
            next_step: 0,
        };
        trainer.broadcast_all_variables();
        Ok(trainer)
    }

    /// The settings this trainer runs with.
    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// The next step [`Trainer::step`] will run.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    /// The first replica's model and store (they hold the trained weights).
    pub fn model(&self) -> (&VarStore, &FasterRcnn) {
        (&self.replicas[0].store, &self.replicas[0].model)
    }

    /// Names of the parameters being trained.
    pub fn trained_names(&self) -> Vec<String> {
        self.replicas[0].params.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Copies every variable (trained or not) of replica 0 into the others.
    fn broadcast_all_variables(&mut self) {
        let _guard = tch::no_grad_guard();
        let (first, rest) = self.replicas.split_at_mut(1);
        let source = first[0].store.variables();
        for r in rest {
            for (name, mut t) in r.store.variables() {
                if let Some(s) = source.get(&name) {
                    t.copy_(&s.to_device(r.device));
                }
            }
        }
    }

    /// The per-epoch order of `n` examples: a permutation seeded by `(seed, epoch)`.
    pub fn epoch_order(&self, n: usize, epoch: u64) -> Vec<usize> {
        tch::manual_seed(mix(self.settings.seed, 0x0e90c4 ^ epoch) as i64);
        let perm = Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu));
        Vec::<i64>::try_from(&perm)
            .unwrap_or_default()
            .into_iter()
            .map(|i| i as usize)
            .collect()
    }

    /// The examples of step `step` (0-based): the data is walked epoch by epoch in each
    /// epoch's order, `batch_size` images per step.
    pub fn batch_indices(&self, n: usize, step: u64) -> Vec<usize> {
        let b = self.settings.batch_size as u64;
        let n64 = n.max(1) as u64;
        let mut orders: std::collections::HashMap<u64, Vec<usize>> = Default::default();
        (0..b)
            .map(|k| {
                let position = step * b + k;
                let (epoch, index) = (position / n64, position % n64);
                orders.entry(epoch).or_insert_with(|| self.epoch_order(n, epoch))[index as usize]
            })
            .collect()
    }

    /// Runs one optimizer step on `batch` (given in the order of [`Trainer::batch_indices`]).
    pub fn step(&mut self, batch: &[&TrainExample]) -> Result<StepStats> {
        let started = Instant::now();
        let step = self.next_step;
        if batch.len() < self.replicas.len() {
            bail!(
                "a batch of {} images cannot feed {} replicas",
                batch.len(),
                self.replicas.len()
            );
        }
        // Flips are decided here, from (seed, step), so they do not depend on the replicas.
        tch::manual_seed(mix(self.settings.seed, 0xf11b ^ step) as i64);
        let coins = Vec::<f64>::try_from(&Tensor::rand([batch.len() as i64], (Kind::Double, Device::Cpu)))
            .context("drawing flips")?;
        let mut augmented: Vec<TrainExample> = batch
            .iter()
            .zip(coins)
            .map(|(example, coin)| {
                if coin < self.settings.hflip_prob {
                    example.flipped()
                } else {
                    example.shallow_clone()
                }
            })
            .collect();
        let shards = shard_ranges(augmented.len(), self.replicas.len());
        let mut shard_examples: Vec<Vec<TrainExample>> = Vec::new();
        for range in shards.iter().rev() {
            shard_examples.push(augmented.split_off(range.start));
        }
        shard_examples.reverse();
        let deterministic = self.settings.deterministic_sampling;
        let seeds: Vec<i64> = (0..self.replicas.len())
            .map(|r| mix(self.settings.seed, (step << 8) | r as u64) as i64)
            .collect();
        for r in &self.replicas {
            for (_, p) in &r.params {
                p.shallow_clone().zero_grad();
            }
        }
        // Distinct GPUs work at the same time; CPU replicas would only compete for the cores.
        let parallel = self.replicas.iter().all(|r| r.device != Device::Cpu) && self.replicas.len() > 1;
        let shard_losses: Vec<[f64; 4]> = if parallel {
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .replicas
                    .iter_mut()
                    .zip(shard_examples)
                    .zip(seeds)
                    .map(|((replica, examples), seed)| {
                        scope.spawn(move || replica_losses(replica, examples, seed, deterministic, step))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().map_err(|_| anyhow::anyhow!("a replica panicked"))?)
                    .collect::<Result<Vec<_>>>()
            })?
        } else {
            self.replicas
                .iter_mut()
                .zip(shard_examples)
                .zip(seeds)
                .map(|((replica, examples), seed)| replica_losses(replica, examples, seed, deterministic, step))
                .collect::<Result<Vec<_>>>()?
        };
        let weights: Vec<f64> = shards.iter().map(|s| s.len() as f64 / batch.len() as f64).collect();
        self.average_gradients(&weights);
        let lr = self.settings.schedule.lr_at(step);
        let params = &self.replicas[0].params;
        let grad_norm = match self.settings.clip_grad_norm {
            Some(max) => clip_grad_norm(params, max),
            None => clip_grad_norm(params, f64::INFINITY),
        };
        if !grad_norm.is_finite() {
            bail!(
                "step {step}: the gradient norm is {grad_norm}; the update was skipped to keep the weights \
                 intact. Lower --lr or set --clip-grad-norm, and resume from the last checkpoint"
            );
        }
        self.optimizer.step(params, lr);
        self.broadcast_params();
        self.next_step += 1;
        let mut losses = [0.0; 4];
        for (values, w) in shard_losses.iter().zip(&weights) {
            for (sum, v) in losses.iter_mut().zip(values) {
                *sum += v * w;
            }
        }
        Ok(StepStats {
            step,
            classifier: losses[0],
            box_reg: losses[1],
            objectness: losses[2],
            rpn_box_reg: losses[3],
            lr,
            grad_norm,
            images_per_sec: batch.len() as f64 / started.elapsed().as_secs_f64().max(1e-9),
        })
    }

    /// Replaces replica 0's gradients with the shard-size-weighted sum over all replicas.
    fn average_gradients(&self, weights: &[f64]) {
        if self.replicas.len() == 1 {
            return;
        }
        let _guard = tch::no_grad_guard();
        let device = self.replicas[0].device;
        for (i, (_, p0)) in self.replicas[0].params.iter().enumerate() {
            let mut sum: Option<Tensor> = None;
            for (replica, w) in self.replicas.iter().zip(weights) {
                let g = replica.params[i].1.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_device(device) * *w;
                sum = Some(match sum {
                    Some(s) => s + g,
                    None => g,
                });
            }
            if let Some(sum) = sum {
                let mut g0 = p0.grad();
                if g0.defined() {
                    g0.copy_(&sum);
                }
            }
        }
    }

    /// Copies replica 0's trained parameters into the other replicas.
    fn broadcast_params(&mut self) {
        let _guard = tch::no_grad_guard();
        let (first, rest) = self.replicas.split_at_mut(1);
        for r in rest {
            for ((_, source), (_, target)) in first[0].params.iter().zip(&r.params) {
                target.shallow_clone().copy_(&source.to_device(r.device));
            }
        }
    }

    /// Writes a checkpoint into `dir/step-<next step>` (weights of every variable, momentum
    /// buffers, the step and the settings) atomically: a temporary folder renamed into place.
    /// Keeps the newest `keep` checkpoints.
    pub fn save_checkpoint(&self, dir: &Path, keep: usize) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = format!("step-{:010}", self.next_step);
        let tmp = dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let mut vars: Vec<(String, Tensor)> = self.replicas[0].store.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&to_cpu(&vars), tmp.join("weights.safetensors"))
            .context("writing the checkpoint weights")?;
        let momentum: Vec<(String, Tensor)> = self
            .optimizer
            .state()
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        Tensor::write_safetensors(&to_cpu(&momentum), tmp.join("optimizer.safetensors"))
            .context("writing the optimizer state")?;
        let state = CheckpointState {
            next_step: self.next_step,
            settings: self.settings.clone(),
        };
        std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&state)?)?;
        let target = dir.join(&name);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(&tmp, &target).with_context(|| format!("publishing checkpoint {}", target.display()))?;
        let mut all = list_checkpoints(dir)?;
        while all.len() > keep.max(1) {
            let old = all.remove(0);
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(target)
    }

    /// Resumes from the newest checkpoint in `dir`, if any; returns the step it resumes at.
    /// Fails when the checkpoint was written with different settings (another run's folder).
    pub fn resume(&mut self, dir: &Path) -> Result<Option<u64>> {
        let Some(latest) = list_checkpoints(dir)?.pop() else {
            return Ok(None);
        };
        let recorded: serde_json::Value = serde_json::from_slice(
            &std::fs::read(latest.join("state.json")).with_context(|| format!("reading {}", latest.display()))?,
        )
        .with_context(|| format!("{}/state.json is not JSON", latest.display()))?;
        let state: CheckpointState = serde_json::from_value(recorded.clone())
            .with_context(|| format!("{}/state.json is not a checkpoint state", latest.display()))?;
        if !same_settings(&recorded["settings"], &self.settings)? {
            bail!(
                "checkpoint {} was written by a run with other settings; use a new --checkpoint-dir \
                 or the same settings to resume",
                latest.display()
            );
        }
        let weights = Tensor::read_safetensors(latest.join("weights.safetensors"))
            .with_context(|| format!("reading {}/weights.safetensors", latest.display()))?;
        {
            let _guard = tch::no_grad_guard();
            let vars = self.replicas[0].store.variables();
            for (name, t) in weights {
                let Some(var) = vars.get(&name) else {
                    bail!("checkpoint variable {name} does not exist in this model");
                };
                var.shallow_clone().copy_(&t.to_device(self.replicas[0].device));
            }
        }
        let momentum = Tensor::read_safetensors(latest.join("optimizer.safetensors"))
            .with_context(|| format!("reading {}/optimizer.safetensors", latest.display()))?;
        self.optimizer.load_state(momentum, self.replicas[0].device);
        self.broadcast_all_variables();
        self.next_step = state.next_step;
        Ok(Some(state.next_step))
    }
}

/// Forward and backward of one replica on its shard; returns the four loss values.
fn replica_losses(
    replica: &mut Replica,
    examples: Vec<TrainExample>,
    seed: i64,
    deterministic: bool,
    step: u64,
) -> Result<[f64; 4]> {
    tch::manual_seed(seed);
    let images: Vec<Tensor> = examples.iter().map(|e| e.image.to_device(replica.device)).collect();
    let targets: Vec<Target> = examples
        .iter()
        .map(|e| Target {
            boxes: e.boxes.to_device(replica.device).to_kind(Kind::Float),
            labels: e.labels.to_device(replica.device).to_kind(Kind::Int64),
        })
        .collect();
    let mut sampler = if deterministic {
        Sampler::first_k()
    } else {
        Sampler::random()
    };
    let losses = replica
        .model
        .training_losses(&images, &targets, &mut sampler)
        .with_context(|| format!("step {step}: computing the training losses"))?;
    let values = [
        losses.classifier.double_value(&[]),
        losses.box_reg.double_value(&[]),
        losses.objectness.double_value(&[]),
        losses.rpn_box_reg.double_value(&[]),
    ];
    if values.iter().any(|v| !v.is_finite()) {
        bail!("step {step}: a loss is not finite ({values:?}); lower the learning rate or set a gradient clip");
    }
    losses.total().backward();
    Ok(values)
}

/// What a checkpoint records besides tensors.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    next_step: u64,
    settings: TrainSettings,
}

/// Whether settings recorded in a checkpoint's `state.json` are `ours`. Both sides are
/// compared as JSON read from text: serde_json's default float parsing is not exact (about
/// one 17-digit value in ten comes back one unit in the last place off), so comparing the
/// parsed settings with ours would refuse the checkpoint of a run with the very same ones.
fn same_settings(recorded: &serde_json::Value, ours: &TrainSettings) -> Result<bool> {
    let ours: serde_json::Value = serde_json::from_str(&serde_json::to_string(ours)?)?;
    Ok(*recorded == ours)
}

/// Complete checkpoint folders in `dir`, oldest first.
fn list_checkpoints(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join("state.json").exists()
        })
        .collect();
    found.sort();
    Ok(found)
}

fn to_cpu(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.detach().to_device(Device::Cpu).contiguous()))
        .collect()
}

/// Contiguous shard ranges of `n` items over `parts` replicas, sizes differing by at most one.
fn shard_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let base = n / parts;
    let extra = n % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// A 64-bit mix of two values (splitmix64 finaliser) for deriving independent seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & (i64::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        assert_eq!(shard_ranges(5, 2), vec![0..3, 3..5]);
        assert_eq!(shard_ranges(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
    }

    #[test]
    fn flipping_mirrors_boxes() {
        let e = TrainExample {
            image: Tensor::zeros([3, 10, 20], (Kind::Float, Device::Cpu)),
            boxes: Tensor::from_slice(&[2.0f32, 1.0, 5.0, 4.0]).view([1, 4]),
            labels: Tensor::from_slice(&[1i64]),
        };
        let f = e.flipped();
        assert_eq!(
            Vec::<f32>::try_from(&f.boxes.view([-1])).unwrap(),
            vec![15.0, 1.0, 18.0, 4.0]
        );
    }
}
