//! Faster R-CNN ResNet-50 FPN (Ren et al., 2015; Lin et al., 2017), equal to torchvision's
//! `fasterrcnn_resnet50_fpn` (v1).
//!
//! One file per part, named as in torchvision: [`transform`], [`backbone`] (ResNet-50 body),
//! [`fpn`], [`anchors`], [`rpn`], [`roi_heads`]. Variable paths equal torchvision's
//! state-dict keys, so a torchvision state dict converted to safetensors loads unchanged.
//! Training: [`training`] (the losses), [`sampling`] (matcher and balanced sampler),
//! [`fine_tune`] (frozen layers, a new label set, trainable variables).

pub mod anchors;
pub mod backbone;
pub mod config;
pub mod fine_tune;
pub mod fpn;
pub mod roi_heads;
pub mod rpn;
pub mod sampling;
pub mod training;
pub mod transform;

use tch::{nn, Tensor};

pub use config::FasterRcnnConfig;
pub use fine_tune::{
    freeze_backbone_layers, trainable_variables, FineTuneError, FineTuneReport, DEFAULT_TRAINABLE_BACKBONE_LAYERS,
};
pub use sampling::Sampler;
pub use training::{SamplingStats, Target, TrainingError, TrainingLosses};

use anchors::{AnchorGenerator, DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS};
use backbone::{ResNetBody, RESNET50_STAGE_CHANNELS};
use fpn::{Fpn, FPN_CHANNELS};
use roi_heads::{DetectionLimits, RawDetections, RoiHeads};
use rpn::{ProposalLimits, RegionProposalNetwork, RpnHead};
use transform::Transform;

use crate::model::ops::BoxCoder;

/// Detections of one image, in original-image pixel coordinates.
#[derive(Debug)]
pub struct Detections {
    /// `[D, 4]` float boxes `(x1, y1, x2, y2)`.
    pub boxes: Tensor,
    /// `[D]` float scores, descending.
    pub scores: Tensor,
    /// `[D]` int64 class indices into the label map.
    pub labels: Tensor,
}

/// Everything an inference pass computed, for parity tests and debugging.
#[derive(Debug)]
pub struct InferenceTrace {
    /// FPN outputs "0", "1", "2", "3", "pool" of the padded batch.
    pub features: Vec<Tensor>,
    /// RPN proposals per image, in resized-image coordinates.
    pub proposals: Vec<Tensor>,
    /// Final detections per image, in original-image coordinates.
    pub detections: Vec<Detections>,
}

/// The detector. Build it with a [`nn::Path`] at the root of a `VarStore`, load weights,
/// then, for serving, call [`FasterRcnn::optimize_for_inference`] once.
#[derive(Debug)]
pub struct FasterRcnn {
    cfg: FasterRcnnConfig,
    transform: Transform,
    body: ResNetBody,
    fpn: Fpn,
    rpn: RegionProposalNetwork,
    roi_heads: RoiHeads,
    /// Set by [`FasterRcnn::optimize_for_inference`]: inputs are made channels-last.
    channels_last: bool,
}

impl FasterRcnn {
    /// Creates all variables under `root` with torchvision's names.
    pub fn new(root: &nn::Path, cfg: FasterRcnnConfig) -> Self {
        let backbone = root / "backbone";
        let anchor_generator = AnchorGenerator::new(&DEFAULT_ANCHOR_SIZES, &DEFAULT_ASPECT_RATIOS);
        let num_anchors = anchor_generator.num_anchors_per_location();
        Self {
            transform: Transform::new(&cfg),
            body: ResNetBody::resnet50(&(&backbone / "body"), cfg.frozen_bn_eps),
            fpn: Fpn::new(&(&backbone / "fpn"), &RESNET50_STAGE_CHANNELS),
            rpn: RegionProposalNetwork {
                head: RpnHead::new(&(root / "rpn" / "head"), FPN_CHANNELS, num_anchors),
                anchor_generator,
                box_coder: BoxCoder::new([1.0, 1.0, 1.0, 1.0]),
            },
            roi_heads: RoiHeads::new(&(root / "roi_heads"), FPN_CHANNELS, cfg.num_classes),
            channels_last: false,
            cfg,
        }
    }

    /// Builds the model on `device` and loads a weights file into it (strict key and shape
    /// checks). `fast` switches to the fast inference path
    /// ([`FasterRcnn::optimize_for_inference`]). The `VarStore` owns the tensors: keep it alive.
    pub fn load(
        path: &std::path::Path,
        device: tch::Device,
        cfg: FasterRcnnConfig,
        fast: bool,
    ) -> Result<(nn::VarStore, Self), crate::model::weights::WeightsError> {
        let mut vs = nn::VarStore::new(device);
        let mut model = Self::new(&vs.root(), cfg);
        crate::model::weights::load_into(&mut vs, path, &Default::default())?;
        if fast {
            model.optimize_for_inference();
        }
        Ok((vs, model))
    }

    /// Initialises a model built from scratch as torchvision initialises `fasterrcnn_resnet50_fpn`
    /// without pretrained weights (ResNet convolutions Kaiming-normal with fan-out, FPN
    /// Kaiming-uniform with a = 1, RPN head normal with std 0.01, biases 0; the box head
    /// keeps `nn.Linear`'s default), then calibrates the frozen batch norms on `calibration`
    /// images (`[3, H, W]` floats in `[0, 1]`) so that every one normalizes its input.
    /// Seed with `tch::manual_seed` first for a repeatable model.
    ///
    /// For training from scratch and for tests; fine-tuning a pretrained checkpoint (e.g.
    /// `model fetch fasterrcnn_resnet50_fpn_coco`) learns far faster.
    pub fn initialise_from_scratch(&self, vs: &nn::VarStore, calibration: &[Tensor]) {
        let _guard = tch::no_grad_guard();
        let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut t) in variables {
            let is_weight = name.ends_with(".weight") && t.dim() == 4;
            let is_bias = name.ends_with(".bias");
            if name.starts_with("backbone.body.") && is_weight {
                let fan_out = t.size()[0] * t.size()[2] * t.size()[3];
                let _ = t.normal_(0.0, (2.0 / fan_out as f64).sqrt());
            } else if name.starts_with("backbone.fpn.") && is_weight {
                let fan_in = t.size()[1] * t.size()[2] * t.size()[3];
                let bound = (3.0 / fan_in as f64).sqrt();
                let _ = t.uniform_(-bound, bound);
            } else if name.starts_with("backbone.fpn.") && is_bias {
                let _ = t.zero_();
            } else if name.starts_with("rpn.head.") && is_weight {
                let _ = t.normal_(0.0, 0.01);
            } else if name.starts_with("rpn.head.") && is_bias {
                let _ = t.zero_();
            }
        }
        if !calibration.is_empty() {
            let batch = self.transform.batch(calibration);
            self.body.calibrate_batch_norm(&batch.tensors);
        }
    }

    /// The configuration this model was built with.
    pub fn config(&self) -> &FasterRcnnConfig {
        &self.cfg
    }

    /// Switches to the fast inference path: frozen batch norm folded into the convolutions
    /// and every convolution run channels-last. Call after loading weights; do not train
    /// the model afterwards.
    ///
    /// Without it the model performs torchvision's operations in torchvision's order and
    /// matches it to float rounding (the parity tests' tolerances). With it, results differ
    /// from torchvision by about 1e-5 relative in the features (different but equally
    /// valid rounding), which moves boxes by hundredths of a pixel; `benches/detector.rs`
    /// measures what it gains.
    pub fn optimize_for_inference(&mut self) {
        self.body.fuse();
        self.fpn.weights_to_channels_last();
        self.rpn.head.weights_to_channels_last();
        self.channels_last = true;
    }

    /// Detects objects in `[3, H, W]` float RGB images in `[0, 1]`, all on the model's
    /// device; images may differ in size and are batched in one forward pass.
    pub fn detect(&self, images: &[Tensor]) -> Vec<Detections> {
        self.detect_traced(images).detections
    }

    /// [`FasterRcnn::detect`], also returning the FPN features and RPN proposals.
    pub fn detect_traced(&self, images: &[Tensor]) -> InferenceTrace {
        let _guard = tch::no_grad_guard();
        if images.is_empty() {
            return InferenceTrace {
                features: vec![],
                proposals: vec![],
                detections: vec![],
            };
        }
        let original_sizes: Vec<(i64, i64)> = images.iter().map(|t| (t.size()[1], t.size()[2])).collect();
        let mut batch = self.transform.batch(images);
        if self.channels_last {
            batch.tensors = backbone::to_channels_last(&batch.tensors);
        }
        let padded = (batch.tensors.size()[2], batch.tensors.size()[3]);
        let features = self.fpn.forward(&self.body.forward(&batch.tensors));
        let limits = ProposalLimits {
            pre_nms_top_n: self.cfg.rpn_pre_nms_top_n_test,
            post_nms_top_n: self.cfg.rpn_post_nms_top_n_test,
            nms_thresh: self.cfg.rpn_nms_thresh,
            score_thresh: self.cfg.rpn_score_thresh,
        };
        let rpn = self.rpn.forward(&features, padded, &batch.image_sizes, limits);
        let raw = self.roi_heads.detect(
            &features,
            &rpn.proposals,
            &batch.image_sizes,
            DetectionLimits {
                score_thresh: self.cfg.box_score_thresh,
                nms_thresh: self.cfg.box_nms_thresh,
                detections_per_img: self.cfg.box_detections_per_img,
            },
        );
        let detections = raw
            .into_iter()
            .zip(batch.image_sizes.iter().zip(&original_sizes))
            .map(
                |(RawDetections { boxes, scores, labels }, (&resized, &original))| Detections {
                    boxes: Transform::boxes_to_original(&boxes, resized, original),
                    scores,
                    labels,
                },
            )
            .collect();
        InferenceTrace {
            features,
            proposals: rpn.proposals,
            detections,
        }
    }
}
