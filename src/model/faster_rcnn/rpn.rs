//! Region Proposal Network at inference, as torchvision's `RPNHead` and
//! `RegionProposalNetwork.filter_proposals`.

use tch::{nn, Kind, Tensor};

use super::anchors::AnchorGenerator;
use super::roi_heads::select3;
use crate::model::ops::{self, BoxCoder};

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
