//! Box branch: multi-scale RoIAlign, two-MLP head, predictor and post-processing, as
//! torchvision's `MultiScaleRoIAlign`, `TwoMLPHead`, `FastRCNNPredictor` and
//! `RoIHeads.postprocess_detections`; for training, proposal sampling and the classifier and
//! box losses (`RoIHeads.select_training_samples`, `fastrcnn_loss`).

use tch::{nn, Kind, Reduction, Tensor};

use super::rpn::SMOOTH_L1_BETA;
use super::sampling::{Matcher, Sampler, StageStats, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS};
use crate::model::ops::{self, BoxCoder};

/// An RoIAlign implementation: [`ops::roi_align`] (inference) or
/// [`ops::roi_align_for_training`] (same values, a memory-light backward).
pub type RoiAlignFn = fn(&Tensor, &Tensor, (i64, i64), f64, i64, bool) -> Tensor;

/// RoIAlign output side (7x7 bins).
pub const ROI_OUTPUT_SIZE: i64 = 7;
/// Bilinear samples per bin and axis.
pub const ROI_SAMPLING_RATIO: i64 = 2;
/// Width of the box head's hidden layers.
pub const REPRESENTATION_SIZE: i64 = 1024;
/// Smallest detection side kept (torchvision hard-codes 1e-2).
const MIN_DETECTION_SIZE: f64 = 1e-2;

/// Assigns each RoI to an FPN level by its size (Feature Pyramid Network paper, eq. 1).
#[derive(Debug, Clone, Copy)]
pub struct LevelMapper {
    k_min: i64,
    k_max: i64,
}

impl LevelMapper {
    /// Canonical box size that maps to level 4.
    const CANONICAL_SCALE: f64 = 224.0;
    const CANONICAL_LEVEL: f64 = 4.0;
    const EPS: f64 = 1e-6;

    /// Level index (0-based, into the pooled levels) for every box of `[K, 4]`.
    pub fn levels(&self, boxes: &Tensor) -> Tensor {
        let s = ops::box_area(boxes).sqrt();
        let target = ((s / Self::CANONICAL_SCALE).log2() + Self::CANONICAL_LEVEL + Self::EPS).floor();
        target.clamp(self.k_min as f64, self.k_max as f64).to_kind(Kind::Int64) - self.k_min
    }
}

/// RoIAlign over FPN levels "0".."3", each RoI from the level its size maps to.
pub fn multiscale_roi_align(features: &[Tensor], proposals: &[Tensor], image_sizes: &[(i64, i64)]) -> Tensor {
    multiscale_roi_align_with(features, proposals, image_sizes, ops::roi_align)
}

/// [`multiscale_roi_align`] with a chosen RoIAlign implementation.
pub fn multiscale_roi_align_with(
    features: &[Tensor],
    proposals: &[Tensor],
    image_sizes: &[(i64, i64)],
    align: RoiAlignFn,
) -> Tensor {
    let max_h = image_sizes.iter().map(|s| s.0).max().unwrap_or(1);
    // torchvision infers each level's scale as the power of two nearest to
    // feature height / largest image height.
    let scales: Vec<f64> = features
        .iter()
        .map(|f| {
            let approx = f.size()[2] as f64 / max_h as f64;
            2f64.powf((approx as f32).log2().round() as f64)
        })
        .collect();
    let k_min = (-(scales[0] as f32).log2()) as i64;
    let k_max = (-(scales[scales.len() - 1] as f32).log2()) as i64;
    let mapper = LevelMapper { k_min, k_max };
    let device = features[0].device();
    let batch_ids: Vec<Tensor> = proposals
        .iter()
        .enumerate()
        .map(|(i, p)| Tensor::full([p.size()[0], 1], i as f64, (p.kind(), device)))
        .collect();
    let boxes = Tensor::cat(proposals, 0);
    let rois = Tensor::cat(&[Tensor::cat(&batch_ids, 0), boxes.shallow_clone()], 1);
    let levels = mapper.levels(&boxes);
    let channels = features[0].size()[1];
    let result = Tensor::zeros(
        [rois.size()[0], channels, ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE],
        (features[0].kind(), device),
    );
    for (level, (feature, &scale)) in features.iter().zip(&scales).enumerate() {
        let idx = levels.eq(level as i64).nonzero().select(1, 0);
        if idx.size()[0] == 0 {
            continue;
        }
        let pooled = align(
            feature,
            &rois.index_select(0, &idx),
            (ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE),
            scale,
            ROI_SAMPLING_RATIO,
            false,
        );
        let _ = result.shallow_clone().index_copy_(0, &idx, &pooled);
    }
    result
}

/// Two fully connected layers with ReLU (torchvision `TwoMLPHead`).
#[derive(Debug)]
pub struct TwoMlpHead {
    fc6: nn::Linear,
    fc7: nn::Linear,
}

impl TwoMlpHead {
    /// Creates `fc6` and `fc7` under `p` (torchvision `roi_heads.box_head`).
    pub fn new(p: &nn::Path, in_features: i64, hidden: i64) -> Self {
        Self {
            fc6: nn::linear(p / "fc6", in_features, hidden, Default::default()),
            fc7: nn::linear(p / "fc7", hidden, hidden, Default::default()),
        }
    }

    /// `[K, C, 7, 7]` pooled features to `[K, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.flatten(1, -1).apply(&self.fc6).relu_().apply(&self.fc7).relu_()
    }
}

/// Class scores and per-class box deltas (torchvision `FastRCNNPredictor`).
#[derive(Debug)]
pub struct FastRcnnPredictor {
    cls_score: nn::Linear,
    bbox_pred: nn::Linear,
}

impl FastRcnnPredictor {
    /// Creates the predictor under `p` (torchvision `roi_heads.box_predictor`), initialised
    /// as torchvision's `nn.Linear` (weights and biases uniform in `±1/sqrt(in_features)`),
    /// which is what a new label set starts from when fine-tuning.
    pub fn new(p: &nn::Path, in_features: i64, num_classes: i64) -> Self {
        // kaiming_uniform_(a = sqrt(5)) bounds the weights at 1/sqrt(fan_in), as the bias.
        let bound = 1.0 / (in_features as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let cfg = nn::LinearConfig {
            ws_init: init,
            bs_init: Some(init),
            bias: true,
        };
        Self {
            cls_score: nn::linear(p / "cls_score", in_features, num_classes, cfg),
            bbox_pred: nn::linear(p / "bbox_pred", in_features, num_classes * 4, cfg),
        }
    }

    /// Returns `(class_logits [K, C], box_regression [K, 4C])`.
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        (x.apply(&self.cls_score), x.apply(&self.bbox_pred))
    }
}

/// Post-processing limits for final detections.
#[derive(Debug, Clone, Copy)]
pub struct DetectionLimits {
    /// Minimum class score.
    pub score_thresh: f64,
    /// Per-class NMS IoU threshold.
    pub nms_thresh: f64,
    /// Maximum detections per image.
    pub detections_per_img: i64,
}

/// Raw detections of one image in resized-image coordinates.
#[derive(Debug)]
pub struct RawDetections {
    /// `[D, 4]` boxes.
    pub boxes: Tensor,
    /// `[D]` scores.
    pub scores: Tensor,
    /// `[D]` int64 class indices (never 0, the background).
    pub labels: Tensor,
}

/// Box head, predictor and post-processing.
#[derive(Debug)]
pub struct RoiHeads {
    /// Two-MLP head on pooled features.
    pub box_head: TwoMlpHead,
    /// Final classifier and regressor.
    pub box_predictor: FastRcnnPredictor,
    /// Box coder with weights (10, 10, 5, 5).
    pub box_coder: BoxCoder,
}

impl RoiHeads {
    /// Creates the heads under `p` (torchvision `roi_heads`).
    pub fn new(p: &nn::Path, channels: i64, num_classes: i64) -> Self {
        let in_features = channels * ROI_OUTPUT_SIZE * ROI_OUTPUT_SIZE;
        Self {
            box_head: TwoMlpHead::new(&(p / "box_head"), in_features, REPRESENTATION_SIZE),
            box_predictor: FastRcnnPredictor::new(&(p / "box_predictor"), REPRESENTATION_SIZE, num_classes),
            box_coder: BoxCoder::new([10.0, 10.0, 5.0, 5.0]),
        }
    }

    /// Classifies and refines proposals, then filters them into detections per image.
    pub fn detect(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
        limits: DetectionLimits,
    ) -> Vec<RawDetections> {
        let pooled = multiscale_roi_align(&features[..4], proposals, image_sizes);
        let hidden = self.box_head.forward(&pooled);
        let (class_logits, box_regression) = self.box_predictor.forward(&hidden);
        self.postprocess(&class_logits, &box_regression, proposals, image_sizes, limits)
    }

    /// Decodes per-class boxes, applies softmax, drops background, low scores and tiny
    /// boxes, runs per-class NMS and keeps the best `detections_per_img`.
    fn postprocess(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
        limits: DetectionLimits,
    ) -> Vec<RawDetections> {
        let device = class_logits.device();
        let num_classes = class_logits.size()[1];
        let all_proposals = Tensor::cat(proposals, 0);
        let pred_boxes = self.box_coder.decode(box_regression, &all_proposals);
        let pred_scores = class_logits.softmax(-1, Kind::Float);
        let mut start = 0;
        proposals
            .iter()
            .zip(image_sizes)
            .map(|(p, &size)| {
                let n = p.size()[0];
                let boxes = ops::clip_boxes_to_image(&pred_boxes.narrow(0, start, n), size);
                let scores = pred_scores.narrow(0, start, n);
                start += n;
                let labels = Tensor::arange(num_classes, (Kind::Int64, device))
                    .view([1, -1])
                    .expand_as(&scores);
                let boxes = boxes.narrow(1, 1, num_classes - 1).reshape([-1, 4]);
                let scores = scores.narrow(1, 1, num_classes - 1).reshape([-1]);
                let labels = labels.narrow(1, 1, num_classes - 1).reshape([-1]);
                let keep = scores.gt(limits.score_thresh).nonzero().select(1, 0);
                let (boxes, scores, labels) = select3(&boxes, &scores, &labels, &keep);
                let keep = ops::remove_small_boxes(&boxes, MIN_DETECTION_SIZE);
                let (boxes, scores, labels) = select3(&boxes, &scores, &labels, &keep);
                let keep = ops::batched_nms(&boxes, &scores, &labels, limits.nms_thresh);
                let keep = keep.narrow(0, 0, keep.size()[0].min(limits.detections_per_img));
                let (boxes, scores, labels) = select3(&boxes, &scores, &labels, &keep);
                RawDetections { boxes, scores, labels }
            })
            .collect()
    }
}

/// How the box head picks proposals for its losses (torchvision's `RoIHeads` training
/// arguments; defaults in [`super::FasterRcnnConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct BoxTrainingConfig {
    /// Proposal matching: foreground at IoU >= 0.5, background below 0.5, no low-quality
    /// matches.
    pub matcher: Matcher,
    /// Proposals sampled per image (512).
    pub batch_size_per_image: i64,
    /// Fraction of them that may be positive (0.25).
    pub positive_fraction: f64,
}

/// The box head's training losses for a batch.
#[derive(Debug)]
pub struct BoxLosses {
    /// Cross-entropy of the sampled proposals' class logits (torchvision `loss_classifier`).
    pub classifier: Tensor,
    /// Smooth L1 of the positive proposals' deltas for their ground-truth class, summed and
    /// divided by the number of sampled proposals (torchvision `loss_box_reg`).
    pub box_reg: Tensor,
    /// Per image: proposals (ground-truth boxes included) available and sampled.
    pub stats: Vec<StageStats>,
}

/// The proposals of one image chosen for the losses, with their targets.
struct SampledProposals {
    boxes: Tensor,
    labels: Tensor,
    matched_gt_boxes: Tensor,
    stats: StageStats,
}

impl RoiHeads {
    /// The classifier and box-regression losses for (detached) RPN `proposals` against
    /// ground-truth boxes `[M_i, 4]` (resized-image coordinates) and labels `[M_i]` (int64,
    /// `1..num_classes`) per image, as torchvision's `RoIHeads.forward` in training. The
    /// ground-truth boxes join the proposals; an image without boxes contributes background
    /// samples only.
    pub fn losses(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
        gt: (&[Tensor], &[Tensor]),
        cfg: BoxTrainingConfig,
        sampler: &mut Sampler,
    ) -> BoxLosses {
        let (gt_boxes, gt_labels) = gt;
        let samples: Vec<SampledProposals> = proposals
            .iter()
            .zip(gt_boxes.iter().zip(gt_labels))
            .map(|(p, (boxes, labels))| sample_proposals(p, boxes, labels, cfg, sampler))
            .collect();
        let boxes: Vec<Tensor> = samples.iter().map(|s| s.boxes.shallow_clone()).collect();
        let matched: Vec<&Tensor> = samples.iter().map(|s| &s.matched_gt_boxes).collect();
        let regression_targets = self
            .box_coder
            .encode(&Tensor::cat(&matched, 0), &Tensor::cat(&boxes, 0));
        let labels = Tensor::cat(&samples.iter().map(|s| &s.labels).collect::<Vec<_>>(), 0);

        let pooled = multiscale_roi_align_with(&features[..4], &boxes, image_sizes, ops::roi_align_for_training);
        let hidden = self.box_head.forward(&pooled);
        let (class_logits, box_regression) = self.box_predictor.forward(&hidden);

        let classifier = class_logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
        let positive = labels.gt(0).nonzero().select(1, 0);
        let num_classes = class_logits.size()[1];
        // Row (proposal, ground-truth class) of the [K * num_classes, 4] deltas.
        let rows = &positive * num_classes + labels.index_select(0, &positive);
        let box_reg = box_regression.reshape([-1, 4]).index_select(0, &rows).smooth_l1_loss(
            &regression_targets.index_select(0, &positive),
            Reduction::Sum,
            SMOOTH_L1_BETA,
        ) / labels.size()[0] as f64;
        BoxLosses {
            classifier,
            box_reg,
            stats: samples.into_iter().map(|s| s.stats).collect(),
        }
    }
}

/// Adds the ground-truth boxes to one image's proposals, labels them by their best match
/// and samples them (torchvision's `add_gt_proposals`, `assign_targets_to_proposals`,
/// `subsample`).
fn sample_proposals(
    proposals: &Tensor,
    gt_boxes: &Tensor,
    gt_labels: &Tensor,
    cfg: BoxTrainingConfig,
    sampler: &mut Sampler,
) -> SampledProposals {
    let device = proposals.device();
    let gt_boxes = gt_boxes.to_kind(proposals.kind());
    let proposals = Tensor::cat(&[proposals, &gt_boxes], 0);
    let n = proposals.size()[0];
    let (matched_idxs, labels) = if gt_boxes.size()[0] == 0 {
        (
            Tensor::zeros([n], (Kind::Int64, device)),
            Tensor::zeros([n], (Kind::Int64, device)),
        )
    } else {
        let matches = cfg.matcher.matches(&ops::box_iou(&gt_boxes, &proposals));
        let clamped = matches.clamp_min(0);
        let labels = gt_labels
            .index_select(0, &clamped)
            .to_kind(Kind::Int64)
            .masked_fill(&matches.eq(BELOW_LOW_THRESHOLD), 0)
            .masked_fill(&matches.eq(BETWEEN_THRESHOLDS), -1);
        (clamped, labels)
    };
    let sampled = sampler.sample(&labels, cfg.batch_size_per_image, cfg.positive_fraction);
    let keep = sampled.positive.logical_or(&sampled.negative).nonzero().select(1, 0);
    let gt_or_placeholder = if gt_boxes.size()[0] == 0 {
        Tensor::zeros([1, 4], (proposals.kind(), device))
    } else {
        gt_boxes
    };
    SampledProposals {
        boxes: proposals.index_select(0, &keep),
        labels: labels.index_select(0, &keep),
        matched_gt_boxes: gt_or_placeholder.index_select(0, &matched_idxs.index_select(0, &keep)),
        stats: sampled.stats,
    }
}

/// Selects the same rows of three tensors.
pub(crate) fn select3(a: &Tensor, b: &Tensor, c: &Tensor, index: &Tensor) -> (Tensor, Tensor, Tensor) {
    (
        a.index_select(0, index),
        b.index_select(0, index),
        c.index_select(0, index),
    )
}
