//! Every knob of torchvision's `fasterrcnn_resnet50_fpn` that matters, with its defaults.

use serde::{Deserialize, Serialize};

/// Configuration of a Faster R-CNN ResNet-50 FPN detector.
///
/// Defaults equal torchvision 0.28's `fasterrcnn_resnet50_fpn` (read from its source), so a
/// default-configured model gives torchvision's answers for the same weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FasterRcnnConfig {
    /// Number of classes including background (91 for COCO, with "N/A" gaps).
    pub num_classes: i64,
    /// Epsilon of the frozen batch norm: torchvision's default 1e-5, but its COCO_V1
    /// checkpoint was trained with 0 (torchvision calls `overwrite_eps(model, 0.0)`).
    /// Weights files carry the right value in their metadata.
    pub frozen_bn_eps: f64,
    /// Shorter image side after resizing (torchvision `min_size`).
    pub min_size: i64,
    /// Upper bound of the longer image side after resizing (torchvision `max_size`).
    pub max_size: i64,
    /// Per-channel mean subtracted from RGB values in `[0, 1]`.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation dividing RGB values after the mean is subtracted.
    pub image_std: [f64; 3],
    /// Batched images are zero-padded to a multiple of this many pixels.
    pub size_divisible: i64,
    /// Proposals kept per FPN level before the RPN's NMS, at inference.
    pub rpn_pre_nms_top_n_test: i64,
    /// Proposals kept per image after the RPN's NMS, at inference.
    pub rpn_post_nms_top_n_test: i64,
    /// Proposals kept per FPN level before the RPN's NMS, in training.
    pub rpn_pre_nms_top_n_train: i64,
    /// Proposals kept per image after the RPN's NMS, in training.
    pub rpn_post_nms_top_n_train: i64,
    /// IoU above which the RPN suppresses a proposal.
    pub rpn_nms_thresh: f64,
    /// Minimum objectness probability of a proposal.
    pub rpn_score_thresh: f64,
    /// Minimum class score of a final detection (torchvision `box_score_thresh`).
    pub box_score_thresh: f64,
    /// IoU above which a detection of the same class is suppressed.
    pub box_nms_thresh: f64,
    /// Maximum detections returned per image.
    pub box_detections_per_img: i64,
    /// RPN: anchors with IoU at least this are foreground (training).
    pub rpn_fg_iou_thresh: f64,
    /// RPN: anchors with IoU below this are background (training).
    pub rpn_bg_iou_thresh: f64,
    /// RPN: anchors sampled per image for the loss (training).
    pub rpn_batch_size_per_image: i64,
    /// RPN: fraction of sampled anchors that are positive (training).
    pub rpn_positive_fraction: f64,
    /// Box head: proposals with IoU at least this are foreground (training).
    pub box_fg_iou_thresh: f64,
    /// Box head: proposals with IoU below this are background (training).
    pub box_bg_iou_thresh: f64,
    /// Box head: proposals sampled per image for the loss (training).
    pub box_batch_size_per_image: i64,
    /// Box head: fraction of sampled proposals that are positive (training).
    pub box_positive_fraction: f64,
}

impl Default for FasterRcnnConfig {
    fn default() -> Self {
        Self {
            num_classes: 91,
            frozen_bn_eps: 1e-5,
            min_size: 800,
            max_size: 1333,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
            size_divisible: 32,
            rpn_pre_nms_top_n_test: 1000,
            rpn_post_nms_top_n_test: 1000,
            rpn_pre_nms_top_n_train: 2000,
            rpn_post_nms_top_n_train: 2000,
            rpn_nms_thresh: 0.7,
            rpn_score_thresh: 0.0,
            box_score_thresh: 0.05,
            box_nms_thresh: 0.5,
            box_detections_per_img: 100,
            rpn_fg_iou_thresh: 0.7,
            rpn_bg_iou_thresh: 0.3,
            rpn_batch_size_per_image: 256,
            rpn_positive_fraction: 0.5,
            box_fg_iou_thresh: 0.5,
            box_bg_iou_thresh: 0.5,
            box_batch_size_per_image: 512,
            box_positive_fraction: 0.25,
        }
    }
}

impl FasterRcnnConfig {
    /// Takes the fields that define the trained network (class count, batch-norm epsilon,
    /// input resolution) from the `config` metadata of a weights file; inference knobs stay
    /// as they are.
    pub fn apply_weights_config(&mut self, config: &serde_json::Value) {
        if let Some(n) = config.get("num_classes").and_then(|v| v.as_i64()) {
            self.num_classes = n;
        }
        if let Some(eps) = config.get("frozen_bn_eps").and_then(|v| v.as_f64()) {
            self.frozen_bn_eps = eps;
        }
        // A model fine-tuned at one resolution is served at it.
        if let Some(v) = config.get("min_size").and_then(|v| v.as_i64()) {
            self.min_size = v;
        }
        if let Some(v) = config.get("max_size").and_then(|v| v.as_i64()) {
            self.max_size = v;
        }
    }

    /// Checks that the values make sense; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(bool, &str); 9] = [
            (
                self.num_classes >= 2,
                "num_classes must be at least 2 (background + one class)",
            ),
            (self.min_size > 0, "min_size must be positive"),
            (self.max_size >= self.min_size, "max_size must be at least min_size"),
            (self.size_divisible > 0, "size_divisible must be positive"),
            (
                (0.0..=1.0).contains(&self.box_score_thresh),
                "box_score_thresh must be in [0, 1]",
            ),
            (
                (0.0..=1.0).contains(&self.box_nms_thresh),
                "box_nms_thresh must be in [0, 1]",
            ),
            (
                (0.0..=1.0).contains(&self.rpn_nms_thresh),
                "rpn_nms_thresh must be in [0, 1]",
            ),
            (
                self.box_detections_per_img > 0,
                "box_detections_per_img must be positive",
            ),
            (
                self.rpn_pre_nms_top_n_test > 0 && self.rpn_post_nms_top_n_test > 0,
                "rpn_pre_nms_top_n_test and rpn_post_nms_top_n_test must be positive",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, message)) => Err(format!("invalid Faster R-CNN config: {message}")),
            None => Ok(()),
        }
    }
}
