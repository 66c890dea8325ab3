//! SSD MobileNetV2 (Liu et al., 2016; Sandler et al., 2018) as trained by the TensorFlow
//! Object Detection API (`ssd_mobilenet_v2_coco_2018_03_29`), with its batch norms folded
//! into the convolutions by `scripts/ssd/convert_ssd_mobilenet_v2.py`.
//!
//! Variable names are the TF scope names with `/` replaced by `.`, so the converted weights
//! load without renaming. Convolutions use TF's "SAME" padding, which pads one pixel more
//! at the bottom/right than at the top/left when a stride-2 window does not fit evenly.

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::model::ops;
use crate::model::weights::{self, LoadPolicy, WeightsError};

/// Settings of the SSD MobileNetV2 COCO model (values from its pipeline config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsdConfig {
    /// Input side: images are resized to `input_size` x `input_size`.
    pub input_size: i64,
    /// Classes including background (index 0).
    pub num_classes: i64,
    /// Smallest anchor scale (relative to the image), on the first feature map.
    pub min_scale: f64,
    /// Largest anchor scale, on the last feature map.
    pub max_scale: f64,
    /// Aspect ratios (width / height) of the anchors on every map but the first.
    pub aspect_ratios: Vec<f64>,
    /// Box coder scales `(y, x, h, w)`.
    pub box_coder_scales: [f64; 4],
    /// Minimum class score of a detection.
    pub score_thresh: f64,
    /// IoU above which a detection of the same class is suppressed.
    pub nms_thresh: f64,
    /// Maximum detections per class before the final cut.
    pub max_detections_per_class: i64,
    /// Maximum detections per image.
    pub max_detections: i64,
}

impl Default for SsdConfig {
    fn default() -> Self {
        Self {
            input_size: 300,
            num_classes: 91,
            min_scale: 0.2,
            max_scale: 0.95,
            // 0.3333, not 1/3: the value in the model's pipeline config.
            aspect_ratios: vec![1.0, 2.0, 0.5, 3.0, 0.3333],
            box_coder_scales: [10.0, 10.0, 5.0, 5.0],
            score_thresh: 0.3,
            nms_thresh: 0.6,
            max_detections_per_class: 100,
            max_detections: 100,
        }
    }
}

impl SsdConfig {
    /// Reads the model-defining settings from the `config` metadata written by
    /// `scripts/ssd/convert_ssd_mobilenet_v2.py` (values found in the frozen graph); fields it
    /// lacks keep their defaults.
    pub fn from_weights_config(config: &serde_json::Value) -> Self {
        let mut cfg = Self::default();
        let f = |path: &[&str]| path.iter().try_fold(config, |v, k| v.get(k)).and_then(|v| v.as_f64());
        if let Some(v) = f(&["input_size"]) {
            cfg.input_size = v as i64;
        }
        if let Some(v) = f(&["num_classes"]) {
            cfg.num_classes = v as i64;
        }
        if let Some(v) = f(&["anchor_generator", "min_scale"]) {
            cfg.min_scale = v;
        }
        if let Some(v) = f(&["anchor_generator", "max_scale"]) {
            cfg.max_scale = v;
        }
        if let Some(ratios) = config
            .pointer("/anchor_generator/aspect_ratios")
            .and_then(|v| v.as_array())
        {
            cfg.aspect_ratios = ratios.iter().filter_map(|r| r.as_f64()).collect();
        }
        for (i, key) in ["y_scale", "x_scale", "height_scale", "width_scale"].iter().enumerate() {
            if let Some(v) = f(&["box_coder", key]) {
                cfg.box_coder_scales[i] = v;
            }
        }
        if let Some(v) = f(&["postprocessor", "score_threshold"]) {
            cfg.score_thresh = v;
        }
        if let Some(v) = f(&["postprocessor", "iou_threshold"]) {
            cfg.nms_thresh = v;
        }
        if let Some(v) = f(&["postprocessor", "max_detections_per_class"]) {
            cfg.max_detections_per_class = v as i64;
        }
        if let Some(v) = f(&["postprocessor", "max_total_detections"]) {
            cfg.max_detections = v as i64;
        }
        cfg
    }
}

/// Pads like TF "SAME": total padding `max((ceil(n / s) - 1) * s + k - n, 0)`, the smaller
/// half before, the larger after.
fn same_padding(size: i64, kernel: i64, stride: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let total = ((out - 1) * stride + kernel - size).max(0);
    (total / 2, total - total / 2)
}

/// A convolution with folded batch norm and TF "SAME" padding, optionally followed by ReLU6.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    groups: i64,
    relu6: bool,
}

impl Conv {
    fn new(p: nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64, depthwise: bool, relu6: bool) -> Self {
        let groups = if depthwise { cin } else { 1 };
        Self {
            weight: p.zeros_no_train("weight", &[cout, cin / groups, kernel, kernel]),
            bias: p.zeros_no_train("bias", &[cout]),
            stride,
            groups,
            relu6,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let k = self.weight.size()[2];
        let (h, w) = (x.size()[2], x.size()[3]);
        let (top, bottom) = same_padding(h, k, self.stride);
        let (left, right) = same_padding(w, k, self.stride);
        // The symmetric part of the padding is the convolution's own; only the extra row and
        // column TF adds at the bottom/right need an explicit pad.
        let x = if bottom > top || right > left {
            x.constant_pad_nd([0, right - left, 0, bottom - top])
        } else {
            x.shallow_clone()
        };
        let mut y = x.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride],
            [top, left],
            [1],
            self.groups,
        );
        if self.relu6 {
            y.clamp_(0.0, 6.0)
        } else {
            y
        }
    }
}

/// MobileNetV2 inverted residual block: expand (1x1), depthwise (3x3), project (1x1).
#[derive(Debug)]
struct InvertedResidual {
    expand: Option<Conv>,
    depthwise: Conv,
    project: Conv,
    residual: bool,
}

impl InvertedResidual {
    fn new(p: &nn::Path, cin: i64, cout: i64, stride: i64, expansion: i64) -> Self {
        let hidden = cin * expansion;
        Self {
            expand: (expansion != 1).then(|| Conv::new(p / "expand", cin, hidden, 1, 1, false, true)),
            depthwise: Conv::new(p / "depthwise", hidden, hidden, 3, stride, true, true),
            project: Conv::new(p / "project", hidden, cout, 1, 1, false, false),
            residual: stride == 1 && cin == cout,
        }
    }

    /// Returns the block output and the expansion output (SSD taps one of them).
    fn forward(&self, x: &Tensor) -> (Tensor, Option<Tensor>) {
        let expanded = self.expand.as_ref().map(|e| e.forward(x));
        let h = self.depthwise.forward(expanded.as_ref().unwrap_or(x));
        let mut out = self.project.forward(&h);
        if self.residual {
            out += x;
        }
        (out, expanded)
    }
}

/// `(out channels, stride, expansion)` of MobileNetV2's 17 inverted residual blocks.
const BLOCKS: [(i64, i64, i64); 17] = [
    (16, 1, 1),
    (24, 2, 6),
    (24, 1, 6),
    (32, 2, 6),
    (32, 1, 6),
    (32, 1, 6),
    (64, 2, 6),
    (64, 1, 6),
    (64, 1, 6),
    (64, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (160, 2, 6),
    (160, 1, 6),
    (160, 1, 6),
    (320, 1, 6),
];

/// Extra SSD layers after MobileNetV2: `(1x1 reduction channels, output channels)`; each
/// is a 1x1 convolution, then a depthwise-separable 3x3 stride-2 convolution.
const EXTRA_LAYERS: [(i64, i64); 4] = [(256, 512), (128, 256), (128, 256), (64, 128)];

/// MobileNetV2 + SSD extra layers: returns the six feature maps the predictors use.
#[derive(Debug)]
struct FeatureExtractor {
    stem: Conv,
    blocks: Vec<InvertedResidual>,
    head: Conv,
    /// Per extra layer: 1x1 reduction, 3x3 stride-2 depthwise, 1x1 expansion.
    extras: Vec<[Conv; 3]>,
}

impl FeatureExtractor {
    fn new(p: &nn::Path) -> Self {
        let m = p / "MobilenetV2";
        let stem = Conv::new(&m / "Conv", 3, 32, 3, 2, false, true);
        let mut cin = 32;
        let blocks = BLOCKS
            .iter()
            .enumerate()
            .map(|(i, &(cout, stride, expansion))| {
                let name = if i == 0 {
                    "expanded_conv".to_string()
                } else {
                    format!("expanded_conv_{i}")
                };
                let block = InvertedResidual::new(&(&m / name), cin, cout, stride, expansion);
                cin = cout;
                block
            })
            .collect();
        let head = Conv::new(&m / "Conv_1", 320, 1280, 1, 1, false, true);
        let mut cin = 1280;
        let extras = EXTRA_LAYERS
            .iter()
            .enumerate()
            .map(|(i, &(c1, c2))| {
                let n = i + 2;
                let reduce = Conv::new(
                    &m / format!("layer_19_1_Conv2d_{n}_1x1_{c1}"),
                    cin,
                    c1,
                    1,
                    1,
                    false,
                    true,
                );
                let name = format!("layer_19_2_Conv2d_{n}_3x3_s2_{c2}");
                let depthwise = Conv::new(&m / format!("{name}_depthwise"), c1, c1, 3, 2, true, true);
                let pointwise = Conv::new(&m / name, c1, c2, 1, 1, false, true);
                cin = c2;
                [reduce, depthwise, pointwise]
            })
            .collect();
        Self {
            stem,
            blocks,
            head,
            extras,
        }
    }

    fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let mut x = self.stem.forward(x);
        let mut maps = Vec::with_capacity(6);
        for (i, block) in self.blocks.iter().enumerate() {
            let (out, expanded) = block.forward(&x);
            // SSD's first map is the expansion output of block 13 ("layer_15/expansion_output").
            if i == 13 {
                maps.push(expanded.unwrap_or_else(|| out.shallow_clone()));
            }
            x = out;
        }
        x = self.head.forward(&x);
        maps.push(x.shallow_clone());
        for [reduce, depthwise, pointwise] in &self.extras {
            x = pointwise.forward(&depthwise.forward(&reduce.forward(&x)));
            maps.push(x.shallow_clone());
        }
        maps
    }
}

/// Channels of the six feature maps.
const MAP_CHANNELS: [i64; 6] = [576, 1280, 512, 256, 256, 128];

/// Number of anchors per location on each map (the first map uses three reduced boxes).
fn anchors_per_location(layer: usize, aspect_ratios: &[f64]) -> i64 {
    if layer == 0 {
        3
    } else {
        aspect_ratios.len() as i64 + 1
    }
}

/// Per-map box and class predictors.
#[derive(Debug)]
struct BoxPredictor {
    box_encoding: Conv,
    class: Conv,
    anchors: i64,
}

/// SSD anchors in `(ymin, xmin, ymax, xmax)` normalized coordinates, TF's
/// `multiple_grid_anchor_generator` order: map, row, column, anchor. Computed in float32 in
/// the graph's order, so they equal the frozen graph's anchors exactly.
pub fn ssd_anchors(cfg: &SsdConfig, map_sizes: &[(i64, i64)]) -> Tensor {
    let n = map_sizes.len();
    let scales: Vec<f32> = (0..n)
        .map(|i| (cfg.min_scale + (cfg.max_scale - cfg.min_scale) * i as f64 / (n - 1).max(1) as f64) as f32)
        .chain(std::iter::once(1.0))
        .collect();
    let mut all = Vec::new();
    for (layer, &(size, _)) in map_sizes.iter().enumerate() {
        // (scale, aspect ratio) pairs of this layer; the lowest layer uses three reduced boxes.
        let boxes: Vec<(f32, f32)> = if layer == 0 {
            vec![(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        } else {
            let mut b: Vec<(f32, f32)> = cfg.aspect_ratios.iter().map(|&r| (scales[layer], r as f32)).collect();
            b.push(((scales[layer] * scales[layer + 1]).sqrt(), 1.0));
            b
        };
        let stride = 1.0f32 / size as f32;
        let offset = 0.5f32 * stride;
        for y in 0..size {
            for x in 0..size {
                let cy = y as f32 * stride + offset;
                let cx = x as f32 * stride + offset;
                for &(scale, ratio) in &boxes {
                    let sqrt_r = ratio.sqrt();
                    let (h, w) = (scale / sqrt_r, scale * sqrt_r);
                    all.extend_from_slice(&[cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w]);
                }
            }
        }
    }
    Tensor::from_slice(&all).view([-1, 4])
}

/// Raw SSD outputs before post-processing, for parity tests.
#[derive(Debug)]
pub struct SsdRaw {
    /// `[N, A, 4]` box encodings `(ty, tx, th, tw)`.
    pub box_encodings: Tensor,
    /// `[N, A, num_classes]` class scores after the sigmoid.
    pub class_scores: Tensor,
    /// `[A, 4]` anchors `(ymin, xmin, ymax, xmax)`, normalized.
    pub anchors: Tensor,
}

/// Detections of one image in original-image pixels.
#[derive(Debug)]
pub struct SsdDetections {
    /// `[D, 4]` boxes `(x1, y1, x2, y2)`.
    pub boxes: Tensor,
    /// `[D]` scores.
    pub scores: Tensor,
    /// `[D]` class ids (COCO category ids; 0 is background and never reported).
    pub labels: Tensor,
}

/// The SSD MobileNetV2 detector.
#[derive(Debug)]
pub struct SsdMobileNetV2 {
    cfg: SsdConfig,
    features: FeatureExtractor,
    predictors: Vec<BoxPredictor>,
}

impl SsdMobileNetV2 {
    /// Creates the variables under `root` with the converted weights' names.
    pub fn new(root: &nn::Path, cfg: SsdConfig) -> Self {
        let predictors = MAP_CHANNELS
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let p = root / format!("BoxPredictor_{i}");
                let anchors = anchors_per_location(i, &cfg.aspect_ratios);
                BoxPredictor {
                    box_encoding: Conv::new(&p / "BoxEncodingPredictor", c, anchors * 4, 3, 1, false, false),
                    class: Conv::new(&p / "ClassPredictor", c, anchors * cfg.num_classes, 3, 1, false, false),
                    anchors,
                }
            })
            .collect();
        Self {
            features: FeatureExtractor::new(&(root / "FeatureExtractor")),
            predictors,
            cfg,
        }
    }

    /// Loads converted weights (`scripts/ssd/convert_ssd_mobilenet_v2.py`) onto `device`,
    /// with the settings from their metadata. The `VarStore` owns the tensors: keep it alive.
    pub fn load(path: &std::path::Path, device: tch::Device) -> Result<(nn::VarStore, Self), WeightsError> {
        let meta = weights::read_metadata(path)?;
        let cfg = meta
            .config
            .as_ref()
            .map(SsdConfig::from_weights_config)
            .unwrap_or_default();
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(&vs.root(), cfg);
        weights::load_into(&mut vs, path, &LoadPolicy::default())?;
        Ok((vs, model))
    }

    /// The configuration.
    pub fn config(&self) -> &SsdConfig {
        &self.cfg
    }

    /// Changes the score threshold (the graph's own is 0.3).
    pub fn set_score_threshold(&mut self, threshold: f64) {
        self.cfg.score_thresh = threshold;
    }

    /// Runs the network on a preprocessed `[N, 3, S, S]` batch in `[-1, 1]` (see
    /// [`SsdMobileNetV2::preprocess`]): box encodings, class scores and anchors.
    pub fn forward_raw(&self, x: &Tensor) -> SsdRaw {
        let _guard = tch::no_grad_guard();
        let maps = self.features.forward(x);
        let n = x.size()[0];
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        let mut sizes = Vec::new();
        for (map, pred) in maps.iter().zip(&self.predictors) {
            let (h, w) = (map.size()[2], map.size()[3]);
            sizes.push((h, w));
            let b = pred
                .box_encoding
                .forward(map)
                .permute([0, 2, 3, 1])
                .reshape([n, h * w * pred.anchors, 4]);
            let c =
                pred.class
                    .forward(map)
                    .permute([0, 2, 3, 1])
                    .reshape([n, h * w * pred.anchors, self.cfg.num_classes]);
            boxes.push(b);
            scores.push(c.sigmoid());
        }
        SsdRaw {
            box_encodings: Tensor::cat(&boxes, 1),
            class_scores: Tensor::cat(&scores, 1),
            anchors: ssd_anchors(&self.cfg, &sizes).to_device(x.device()),
        }
    }

    /// Decodes `[A, 4]` encodings `(ty, tx, th, tw)` against the anchors into
    /// `(ymin, xmin, ymax, xmax)`, in the frozen graph's order of operations.
    pub fn decode(&self, encodings: &Tensor, anchors: &Tensor) -> Tensor {
        let [sy, sx, sh, sw] = self.cfg.box_coder_scales;
        let ha = anchors.select(1, 2) - anchors.select(1, 0);
        let wa = anchors.select(1, 3) - anchors.select(1, 1);
        let ya = anchors.select(1, 0) + &ha / 2.0;
        let xa = anchors.select(1, 1) + &wa / 2.0;
        let w = (encodings.select(1, 3) / sw).exp() * &wa;
        let h = (encodings.select(1, 2) / sh).exp() * &ha;
        let yc = encodings.select(1, 0) / sy * &ha + ya;
        let xc = encodings.select(1, 1) / sx * &wa + xa;
        Tensor::stack(&[&yc - &h / 2.0, &xc - &w / 2.0, &yc + &h / 2.0, &xc + &w / 2.0], 1)
    }

    /// Detects objects in `[3, H, W]` float RGB images in `[0, 1]`: resize, network,
    /// decode, then TF's post-processing (per class: score threshold, clip to the image,
    /// drop empty boxes, NMS, at most `max_detections_per_class`; then the best
    /// `max_detections` overall). Boxes are returned in original-image pixels.
    pub fn detect(&self, images: &[Tensor]) -> Vec<SsdDetections> {
        let sizes: Vec<(i64, i64)> = images.iter().map(|img| (img.size()[1], img.size()[2])).collect();
        self.detect_preprocessed(&self.preprocess(images), &sizes)
    }

    /// [`SsdMobileNetV2::detect`] for an already preprocessed batch; `original_sizes` are the
    /// `(height, width)` the boxes are scaled to.
    pub fn detect_preprocessed(&self, input: &Tensor, original_sizes: &[(i64, i64)]) -> Vec<SsdDetections> {
        let raw = self.forward_raw(input);
        original_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let decoded = self.decode(&raw.box_encodings.get(i as i64), &raw.anchors);
                self.postprocess(&decoded, &raw.class_scores.get(i as i64), size)
            })
            .collect()
    }

    /// Resizes `[3, H, W]` float RGB images in `[0, 1]` to `[N, 3, S, S]` in `[-1, 1]` the way
    /// OpenCV's `blobFromImage` does for this model: bilinear with half-pixel centres,
    /// rounded to 8-bit values, then scaled by 2/255 and shifted by -1.
    pub fn preprocess(&self, images: &[Tensor]) -> Tensor {
        let s = self.cfg.input_size;
        let batch: Vec<Tensor> = images
            .iter()
            .map(|img| {
                (img.to_kind(Kind::Float) * 255.0)
                    .round()
                    .unsqueeze(0)
                    .upsample_bilinear2d([s, s], false, None, None)
                    .round()
                    .clamp(0.0, 255.0)
                    .squeeze_dim(0)
            })
            .collect();
        Tensor::stack(&batch, 0) * (2.0 / 255.0) - 1.0
    }

    fn postprocess(&self, decoded: &Tensor, scores: &Tensor, (height, width): (i64, i64)) -> SsdDetections {
        let classes = self.cfg.num_classes - 1; // class 0 (background) never competes
        let clipped = decoded.clamp(0.0, 1.0);
        let area = (clipped.select(1, 2) - clipped.select(1, 0)) * (clipped.select(1, 3) - clipped.select(1, 1));
        // All (anchor, class) pairs above the threshold whose clipped box is not empty.
        let class_scores = scores.narrow(1, 1, classes);
        let pairs = class_scores
            .gt(self.cfg.score_thresh)
            .logical_and(&area.gt(0.0).unsqueeze(1))
            .nonzero();
        let anchor = pairs.select(1, 0);
        let class = pairs.select(1, 1);
        let boxes = clipped.index_select(0, &anchor);
        let scores = class_scores
            .reshape([-1])
            .index_select(0, &(&anchor * classes + &class));
        let labels = class + 1;
        // Per-class NMS (exact in normalized coordinates), kept indices by decreasing score.
        let keep = ops::batched_nms_per_class(&boxes, &scores, &labels, self.cfg.nms_thresh);
        let keep = self.cap_per_class(&keep, &labels);
        let (boxes, scores, labels) = (
            boxes.index_select(0, &keep),
            scores.index_select(0, &keep),
            labels.index_select(0, &keep),
        );
        // (ymin, xmin, ymax, xmax) normalized -> (x1, y1, x2, y2) pixels.
        let (w, h) = (width as f64, height as f64);
        let pixels = Tensor::stack(
            &[
                boxes.select(1, 1) * w,
                boxes.select(1, 0) * h,
                boxes.select(1, 3) * w,
                boxes.select(1, 2) * h,
            ],
            1,
        );
        SsdDetections {
            boxes: pixels,
            scores,
            labels,
        }
    }

    /// Keeps at most `max_detections_per_class` per class and `max_detections` in all, from
    /// indices already sorted by decreasing score.
    fn cap_per_class(&self, keep: &Tensor, labels: &Tensor) -> Tensor {
        let keep_v = Vec::<i64>::try_from(&keep.to_device(tch::Device::Cpu)).unwrap_or_default();
        let labels_v = Vec::<i64>::try_from(&labels.to_device(tch::Device::Cpu)).unwrap_or_default();
        let mut per_class = std::collections::HashMap::<i64, i64>::new();
        let capped: Vec<i64> = keep_v
            .into_iter()
            .filter(|&k| {
                let n = per_class.entry(labels_v[k as usize]).or_insert(0);
                *n += 1;
                *n <= self.cfg.max_detections_per_class
            })
            .take(self.cfg.max_detections.max(0) as usize)
            .collect();
        Tensor::from_slice(&capped).to_device(keep.device())
    }
}
