//! Box branch at inference: multi-scale RoIAlign, two-MLP head, predictor and
//! post-processing, as torchvision's `MultiScaleRoIAlign`, `TwoMLPHead`,
//! `FastRCNNPredictor` and `RoIHeads.postprocess_detections`.

use tch::{nn, Kind, Tensor};

use crate::model::ops::{self, BoxCoder};

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
        let pooled = ops::roi_align(
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
    /// Creates the predictor under `p` (torchvision `roi_heads.box_predictor`).
    pub fn new(p: &nn::Path, in_features: i64, num_classes: i64) -> Self {
        Self {
            cls_score: nn::linear(p / "cls_score", in_features, num_classes, Default::default()),
            bbox_pred: nn::linear(p / "bbox_pred", in_features, num_classes * 4, Default::default()),
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

/// Selects the same rows of three tensors.
pub(crate) fn select3(a: &Tensor, b: &Tensor, c: &Tensor, index: &Tensor) -> (Tensor, Tensor, Tensor) {
    (
        a.index_select(0, index),
        b.index_select(0, index),
        c.index_select(0, index),
    )
}
