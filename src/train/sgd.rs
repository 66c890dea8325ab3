//! SGD with momentum and weight decay, and the learning-rate schedule (linear warm-up, then
//! step or cosine decay), as torchvision's detection reference recipe uses them.
//!
//! Written here rather than taken from `tch::nn::Optimizer` because a killed run must resume
//! exactly: the momentum buffers are ours, so a checkpoint can save and restore them.
//! The update is `torch.optim.SGD`'s (dampening 0, no Nesterov):
//! `d = g + wd·p; buf = d` on the first step, else `buf = momentum·buf + d`; `p -= lr·buf`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// SGD hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum factor (torchvision's recipe: 0.9).
    pub momentum: f64,
    /// L2 penalty added to every trained parameter's gradient (recipe: 1e-4).
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 1e-4,
        }
    }
}

/// The optimizer state: one momentum buffer per trained parameter, by variable name.
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    momentum: BTreeMap<String, Tensor>,
}

impl Sgd {
    /// A fresh optimizer (no momentum yet).
    pub fn new(config: SgdConfig) -> Self {
        Self {
            config,
            momentum: BTreeMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` to every named parameter that has a
    /// gradient; parameters without one (frozen) are left alone, as torch does.
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) {
        let _guard = tch::no_grad_guard();
        for (name, p) in params {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            let mut d = if self.config.weight_decay != 0.0 {
                &grad + p * self.config.weight_decay
            } else {
                grad.shallow_clone()
            };
            if self.config.momentum != 0.0 {
                match self.momentum.get_mut(name) {
                    Some(buf) => {
                        let _ = buf.g_mul_scalar_(self.config.momentum).g_add_(&d);
                        d = buf.shallow_clone();
                    }
                    None => {
                        let buf = d.detach().copy();
                        d = buf.shallow_clone();
                        self.momentum.insert(name.clone(), buf);
                    }
                }
            }
            let mut p = p.shallow_clone();
            let _ = p.g_sub_(&(d * lr));
        }
    }

    /// The momentum buffers, for a checkpoint (keys are variable names).
    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.momentum
    }

    /// Restores momentum buffers saved by [`Sgd::state`], moved to `device`.
    pub fn load_state(&mut self, state: Vec<(String, Tensor)>, device: tch::Device) {
        self.momentum = state.into_iter().map(|(k, t)| (k, t.to_device(device))).collect();
    }
}

/// Scales all gradients so that their joint L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping.
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    let total = grads
        .iter()
        .map(|g| g.to_kind(tch::Kind::Double).square().sum(tch::Kind::Double))
        .fold(Tensor::from(0.0f64), |acc, s| acc + s.to_device(tch::Device::Cpu))
        .sqrt()
        .double_value(&[]);
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for mut g in grads {
            let _ = g.g_mul_scalar_(coef);
        }
    }
    total
}

/// How the learning rate decays after warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decay {
    /// Multiply by `gamma` at each milestone step (torch `MultiStepLR`).
    Step {
        /// Steps at which the rate drops.
        milestones: Vec<u64>,
        /// Factor per milestone (recipe: 0.1).
        gamma: f64,
    },
    /// Cosine from the base rate down to `min_lr` at the last step (torch `CosineAnnealingLR`).
    Cosine {
        /// Rate at the end of training.
        min_lr: f64,
    },
    /// No decay.
    Constant,
}

/// Learning rate as a function of the step: linear warm-up from `warmup_factor × base_lr`
/// over `warmup_steps` (torch `LinearLR`, as torchvision's reference), times the decay.
///
/// The two factors multiply. That equals torch's chained `LinearLR` + `MultiStepLR` and
/// `LinearLR` + `CosineAnnealingLR` with `eta_min = 0` (checked in tests/train_trainer.rs);
/// with a cosine `min_lr > 0` during warm-up torch's recursive chaining differs slightly
/// (about 1 %), and this closed form is the intended schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The rate after warm-up, before decay.
    pub base_lr: f64,
    /// Steps of warm-up (0: none).
    pub warmup_steps: u64,
    /// Starting fraction of the rate during warm-up (recipe: 0.001).
    pub warmup_factor: f64,
    /// Decay after warm-up.
    pub decay: Decay,
    /// Total steps of the run (the cosine's period).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate used for step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = if step < self.warmup_steps {
            let alpha = step as f64 / self.warmup_steps as f64;
            self.warmup_factor * (1.0 - alpha) + alpha
        } else {
            1.0
        };
        let decayed = match &self.decay {
            Decay::Constant => self.base_lr,
            Decay::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| step >= m).count() as i32;
                self.base_lr * gamma.powi(passed)
            }
            Decay::Cosine { min_lr } => {
                let t = (step as f64 / self.total_steps.max(1) as f64).min(1.0);
                min_lr + (self.base_lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
        };
        decayed * warm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    #[test]
    fn sgd_matches_torchs_update_rule() {
        // Hand-computed torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01) on loss = sum(p²).
        let mut p = param(&[1.0, -2.0]);
        let params = vec![("w".to_string(), p.shallow_clone())];
        let mut sgd = Sgd::new(SgdConfig {
            momentum: 0.9,
            weight_decay: 0.01,
        });
        let mut expected = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        for step in 0..3 {
            p.zero_grad();
            (&p * &p).sum(Kind::Float).backward();
            sgd.step(&params, 0.1);
            for i in 0..2 {
                let d = 2.0 * expected[i] + 0.01 * expected[i];
                buf[i] = if step == 0 { d } else { 0.9 * buf[i] + d };
                expected[i] -= 0.1 * buf[i];
            }
            let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] as f64 - expected[i]).abs() < 1e-5,
                    "step {step}: {got:?} vs {expected:?}"
                );
            }
        }
    }

    #[test]
    fn frozen_parameters_are_not_touched() {
        let frozen = Tensor::from_slice(&[3.0f32]);
        let params = vec![("f".to_string(), frozen.shallow_clone())];
        let mut sgd = Sgd::new(SgdConfig::default());
        sgd.step(&params, 1.0);
        assert_eq!(frozen.double_value(&[0]), 3.0);
        assert!(sgd.state().is_empty());
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = param(&[1.0, 1.0]);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward(); // grad = [3, 4]
        let params = vec![("p".to_string(), p.shallow_clone())];
        let norm = clip_grad_norm(&params, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped: Vec<f32> = Vec::try_from(&p.grad()).unwrap();
        assert!(
            (clipped[0] - 0.6).abs() < 1e-5 && (clipped[1] - 0.8).abs() < 1e-5,
            "{clipped:?}"
        );
    }

    #[test]
    fn warmup_then_step_and_cosine() {
        let mut s = LrSchedule {
            base_lr: 0.02,
            warmup_steps: 10,
            warmup_factor: 0.001,
            decay: Decay::Step {
                milestones: vec![20, 30],
                gamma: 0.1,
            },
            total_steps: 40,
        };
        assert!((s.lr_at(0) - 0.02 * 0.001).abs() < 1e-12);
        assert!((s.lr_at(5) - 0.02 * (0.001 * 0.5 + 0.5)).abs() < 1e-12);
        assert!((s.lr_at(10) - 0.02).abs() < 1e-12);
        assert!((s.lr_at(25) - 0.002).abs() < 1e-12);
        assert!((s.lr_at(35) - 0.0002).abs() < 1e-12);
        s.decay = Decay::Cosine { min_lr: 0.0 };
        s.warmup_steps = 0;
        assert!((s.lr_at(0) - 0.02).abs() < 1e-12);
        assert!((s.lr_at(20) - 0.01).abs() < 1e-12);
        assert!(s.lr_at(40).abs() < 1e-12);
    }
}
