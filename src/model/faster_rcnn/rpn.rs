//! Region Proposal Network, as torchvision's `RPNHead` and `RegionProposalNetwork`:
//! proposals (`filter_proposals`) and, for training, the objectness and box losses
//! (`assign_targets_to_anchors`, `compute_loss`).

use tch::{nn, Kind, Reduction, Tensor};

use super::anchors::AnchorGenerator;
use super::roi_heads::select3;
use super::sampling::{Matcher, Sampler, StageStats, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS};
use crate::model::ops::{self, BoxCoder};

/// `beta` of the smooth L1 box losses of both stages (torchvision's `1 / 9`).
pub const SMOOTH_L1_BETA: f64 = 1.0 / 9.0;

/// Smallest proposal side kept (torchvision `RegionProposalNetwork.min_size`).
const MIN_PROPOSAL_SIZE: f64 = 1e-3;

/// Shared 3x3 convolution, then per-anchor objectness logits and box deltas.
#[derive(Debug)]
pub struct RpnHead {
    conv: nn::Conv2D,
    cls_logits: nn::Conv2D,
    bbox_pred: nn::Conv2D,
}

impl RpnHead {
    /// Creates the head under `p` (torchvision `rpn.head`).
    pub fn new(p: &nn::Path, channels: i64, num_anchors: i64) -> Self {
        let padded = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(p / "conv" / "0" / "0", channels, channels, 3, padded),
            cls_logits: nn::conv2d(p / "cls_logits", channels, num_anchors, 1, Default::default()),
            bbox_pred: nn::conv2d(p / "bbox_pred", channels, num_anchors * 4, 1, Default::default()),
        }
    }

    /// Stores the convolution weights channels-last (see [`super::backbone::to_channels_last`]).
    pub fn weights_to_channels_last(&mut self) {
        for conv in [&mut self.conv, &mut self.cls_logits, &mut self.bbox_pred] {
            conv.ws = super::backbone::to_channels_last(&conv.ws);
        }
    }

    /// Returns per-level objectness `[N, A, H, W]` and deltas `[N, 4A, H, W]`.
    pub fn forward(&self, features: &[Tensor]) -> (Vec<Tensor>, Vec<Tensor>) {
        features
            .iter()
            .map(|f| {
                let t = f.apply(&self.conv).relu_();
                (t.apply(&self.cls_logits), t.apply(&self.bbox_pred))
            })
            .unzip()
    }
}

/// `[N, A*C, H, W]` to `[N, H*W*A, C]`, torchvision's `permute_and_flatten`.
pub fn permute_and_flatten(layer: &Tensor, c: i64) -> Tensor {
    let (n, _, h, w) = layer.size4().unwrap_or((0, 0, 0, 0));
    layer
        .view([n, -1, c, h, w])
        .permute([0, 3, 4, 1, 2])
        .reshape([n, -1, c])
}

/// Knobs of proposal selection (inference or training values).
#[derive(Debug, Clone, Copy)]
pub struct ProposalLimits {
    /// Top-scoring anchors kept per level before NMS.
    pub pre_nms_top_n: i64,
    /// Proposals kept per image after NMS.
    pub post_nms_top_n: i64,
    /// NMS IoU threshold.
    pub nms_thresh: f64,
    /// Minimum objectness probability.
    pub score_thresh: f64,
}

/// The RPN: head, anchors, decoding and proposal selection.
#[derive(Debug)]
pub struct RegionProposalNetwork {
    /// Objectness and box-delta predictor.
    pub head: RpnHead,
    /// Anchor generator shared by all images.
    pub anchor_generator: AnchorGenerator,
    /// Box coder with weights (1, 1, 1, 1).
    pub box_coder: BoxCoder,
}

/// Raw RPN outputs for a batch, kept for the training losses.
#[derive(Debug)]
pub struct RpnOutput {
    /// Selected proposals per image, `[P_i, 4]` in resized-image coordinates.
    pub proposals: Vec<Tensor>,
    /// All anchors `[A_total, 4]` (same for every image of the batch).
    pub anchors: Tensor,
    /// Objectness logits `[N * A_total, 1]`.
    pub objectness: Tensor,
    /// Box deltas `[N * A_total, 4]`.
    pub pred_bbox_deltas: Tensor,
}

impl RegionProposalNetwork {
    /// Runs the head on the FPN levels and selects proposals per image.
    pub fn forward(
        &self,
        features: &[Tensor],
        padded_size: (i64, i64),
        image_sizes: &[(i64, i64)],
        limits: ProposalLimits,
    ) -> RpnOutput {
        let (objectness, deltas) = self.head.forward(features);
        let grid_sizes: Vec<(i64, i64)> = features.iter().map(|f| (f.size()[2], f.size()[3])).collect();
        let device = features[0].device();
        let anchors = self.anchor_generator.anchors(padded_size, &grid_sizes, device);
        let num_images = image_sizes.len() as i64;
        let num_anchors_per_level: Vec<i64> = objectness.iter().map(|o| o.size()[1..].iter().product()).collect();
        let objectness: Vec<Tensor> = objectness.iter().map(|o| permute_and_flatten(o, 1)).collect();
        let deltas: Vec<Tensor> = deltas.iter().map(|d| permute_and_flatten(d, 4)).collect();
        let objectness = Tensor::cat(&objectness, 1).flatten(0, -2);
        let pred_bbox_deltas = Tensor::cat(&deltas, 1).reshape([-1, 4]);
        let all_anchors = anchors.repeat([num_images, 1]);
        let proposals = self
            .box_coder
            .decode(&pred_bbox_deltas.detach(), &all_anchors)
            .view([num_images, -1, 4]);
        let proposals = self.filter_proposals(&proposals, &objectness, image_sizes, &num_anchors_per_level, limits);
        RpnOutput {
            proposals,
            anchors,
            objectness,
            pred_bbox_deltas,
        }
    }

    /// Top-n per level, clip, drop tiny and low-score boxes, per-level NMS, top-n overall.
    fn filter_proposals(
        &self,
        proposals: &Tensor,
        objectness: &Tensor,
        image_sizes: &[(i64, i64)],
        num_anchors_per_level: &[i64],
        limits: ProposalLimits,
    ) -> Vec<Tensor> {
        let device = proposals.device();
        let num_images = image_sizes.len() as i64;
        let objectness = objectness.detach().reshape([num_images, -1]);
        let mut top_idx = Vec::new();
        let mut top_levels = Vec::new();
        let mut offset = 0;
        for (level, &n) in num_anchors_per_level.iter().enumerate() {
            let k = limits.pre_nms_top_n.min(n);
            let (_, idx) = objectness.narrow(1, offset, n).topk(k, 1, true, true);
            top_idx.push(idx + offset);
            top_levels.push(Tensor::full([num_images, k], level as i64, (Kind::Int64, device)));
            offset += n;
        }
        let top_idx = Tensor::cat(&top_idx, 1);
        let levels = Tensor::cat(&top_levels, 1);
        let scores = objectness.gather(1, &top_idx, false).sigmoid();
        (0..num_images)
            .map(|i| {
                let idx = top_idx.get(i);
                let boxes = proposals.get(i).index_select(0, &idx);
                let boxes = ops::clip_boxes_to_image(&boxes, image_sizes[i as usize]);
                let (scores, lvl) = (scores.get(i), levels.get(i));
                let keep = ops::remove_small_boxes(&boxes, MIN_PROPOSAL_SIZE);
                let (boxes, scores, lvl) = select3(&boxes, &scores, &lvl, &keep);
                let keep = scores.ge(limits.score_thresh).nonzero().select(1, 0);
                let (boxes, scores, lvl) = select3(&boxes, &scores, &lvl, &keep);
                let keep = ops::batched_nms(&boxes, &scores, &lvl, limits.nms_thresh);
                let keep = keep.narrow(0, 0, keep.size()[0].min(limits.post_nms_top_n));
                boxes.index_select(0, &keep)
            })
            .collect()
    }
}

/// How the RPN picks anchors for its losses (torchvision's `RegionProposalNetwork` training
/// arguments; defaults in [`super::FasterRcnnConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct RpnTrainingConfig {
    /// Anchor matching: foreground at IoU >= 0.7, background below 0.3, low-quality
    /// matches allowed.
    pub matcher: Matcher,
    /// Anchors sampled per image (256).
    pub batch_size_per_image: i64,
    /// Fraction of them that may be positive (0.5).
    pub positive_fraction: f64,
}

/// The RPN's training losses for a batch.
#[derive(Debug)]
pub struct RpnLosses {
    /// Binary cross-entropy of the sampled anchors' objectness logits (torchvision
    /// `loss_objectness`).
    pub objectness: Tensor,
    /// Smooth L1 of the positive anchors' deltas, summed and divided by the number of
    /// sampled anchors (torchvision `loss_rpn_box_reg`).
    pub box_reg: Tensor,
    /// Per image: anchors available and sampled.
    pub stats: Vec<StageStats>,
}

impl RegionProposalNetwork {
    /// The objectness and box-regression losses of a forward pass ([`RegionProposalNetwork::forward`]
    /// run with gradients) against ground-truth boxes `[M_i, 4]` per image, in resized-image
    /// coordinates. An image without boxes contributes background anchors only.
    pub fn losses(
        &self,
        output: &RpnOutput,
        gt_boxes: &[Tensor],
        cfg: RpnTrainingConfig,
        sampler: &mut Sampler,
    ) -> RpnLosses {
        let anchors = &output.anchors;
        let num_anchors = anchors.size()[0];
        let device = anchors.device();
        let mut labels = Vec::with_capacity(gt_boxes.len());
        let mut matched_gt_boxes = Vec::with_capacity(gt_boxes.len());
        for gt in gt_boxes {
            if gt.size()[0] == 0 {
                // Background image: every anchor is a negative.
                labels.push(Tensor::zeros([num_anchors], (Kind::Float, device)));
                matched_gt_boxes.push(Tensor::zeros([num_anchors, 4], (Kind::Float, device)));
                continue;
            }
            let matches = cfg.matcher.matches(&ops::box_iou(gt, anchors));
            matched_gt_boxes.push(gt.index_select(0, &matches.clamp_min(0)));
            let image_labels = matches
                .ge(0)
                .to_kind(Kind::Float)
                .masked_fill(&matches.eq(BELOW_LOW_THRESHOLD), 0.0)
                .masked_fill(&matches.eq(BETWEEN_THRESHOLDS), -1.0);
            labels.push(image_labels);
        }
        let all_anchors = anchors.repeat([gt_boxes.len() as i64, 1]);
        let regression_targets = self.box_coder.encode(&Tensor::cat(&matched_gt_boxes, 0), &all_anchors);

        let mut positive_masks = Vec::with_capacity(labels.len());
        let mut negative_masks = Vec::with_capacity(labels.len());
        let mut stats = Vec::with_capacity(labels.len());
        for image_labels in &labels {
            let sampled = sampler.sample(image_labels, cfg.batch_size_per_image, cfg.positive_fraction);
            positive_masks.push(sampled.positive);
            negative_masks.push(sampled.negative);
            stats.push(sampled.stats);
        }
        let positive = Tensor::cat(&positive_masks, 0).nonzero().select(1, 0);
        let negative = Tensor::cat(&negative_masks, 0).nonzero().select(1, 0);
        let sampled = Tensor::cat(&[&positive, &negative], 0);
        let labels = Tensor::cat(&labels, 0);

        let box_reg = output.pred_bbox_deltas.index_select(0, &positive).smooth_l1_loss(
            &regression_targets.index_select(0, &positive),
            Reduction::Sum,
            SMOOTH_L1_BETA,
        ) / sampled.size()[0] as f64;
        let objectness = output
            .objectness
            .flatten(0, -1)
            .index_select(0, &sampled)
            .binary_cross_entropy_with_logits::<Tensor>(&labels.index_select(0, &sampled), None, None, Reduction::Mean);
        RpnLosses {
            objectness,
            box_reg,
            stats,
        }
    }
}
