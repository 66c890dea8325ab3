//! A loaded detector and the detections it reports, in the form users consume.
//!
//! [`Detector`] owns a model replica on one device together with its label map; it turns
//! decoded RGB images into [`ImageDetections`] with boxes in pixels and normalized to 0..1.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Tensor};

use crate::model::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
use crate::model::labels::{coco_labels, label_name};
use crate::model::ssd_mobilenet_v2::SsdMobileNetV2;
use crate::model::weights::{self, WeightsMetadata};
use crate::preprocess::to_tensor;

/// Architecture name of torchvision's Faster R-CNN ResNet-50 FPN (v1).
pub const FASTERRCNN_RESNET50_FPN: &str = "fasterrcnn_resnet50_fpn";

/// Architecture name of the TF Object Detection API's SSD MobileNetV2.
pub const SSD_MOBILENET_V2: &str = "ssd_mobilenet_v2";

/// Where `model fetch` and `model import` put weights unless told otherwise.
pub const DEFAULT_MODEL_DIR: &str = "models";

/// One detected object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Class name from the label map, e.g. `cup`.
    pub label: String,
    /// Class index predicted by the model.
    pub label_id: i64,
    /// Confidence in `[0, 1]`.
    pub score: f32,
    /// `(x1, y1, x2, y2)` in pixels of the original image.
    pub box_px: [f32; 4],
    /// `(x1, y1, x2, y2)` divided by the image width/height, in `[0, 1]`.
    pub box_norm: [f32; 4],
}

/// Detections of one image and the size they refer to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageDetections {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Detections, highest score first.
    pub detections: Vec<Detection>,
}

/// The network a weights file holds, chosen by its `architecture` metadata.
#[derive(Debug)]
enum Network {
    FasterRcnn(Box<FasterRcnn>),
    Ssd(Box<SsdMobileNetV2>),
}

/// A model replica on one device, with its label map.
pub struct Detector {
    network: Network,
    /// Owns the model's tensors; must live as long as `model`.
    _vs: VarStore,
    labels: Vec<String>,
    name: String,
    device: Device,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("name", &self.name)
            .field("device", &self.device)
            .finish()
    }
}

/// Default weights file of the official COCO checkpoint after `model fetch`.
pub fn default_weights_path() -> PathBuf {
    Path::new(DEFAULT_MODEL_DIR).join("fasterrcnn_resnet50_fpn_coco.safetensors")
}

/// The SSD MobileNetV2 COCO weights that `scripts/setup` converts (works offline).
pub fn ssd_weights_path() -> PathBuf {
    Path::new(DEFAULT_MODEL_DIR).join("ssd_mobilenet_v2_coco.safetensors")
}

/// The weights to use when none are named: the Faster R-CNN COCO checkpoint when it has
/// been fetched or imported, else the SSD MobileNetV2 COCO model the set-up converts.
pub fn resolve_default_weights() -> Result<PathBuf> {
    [default_weights_path(), ssd_weights_path()]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "no weights found ({} or {}): run `scripts/setup` (converts the offline SSD MobileNetV2 COCO \
                 model), `attrstream model fetch fasterrcnn_resnet50_fpn_coco` (needs internet) or \
                 `attrstream model import FILE.pth`",
                default_weights_path().display(),
                ssd_weights_path().display()
            )
        })
}

impl Detector {
    /// Loads weights written by `attrstream model import/fetch` (or any torchvision state dict
    /// saved as safetensors) onto `device`. `cfg` supplies inference knobs; the number of
    /// classes comes from the weights' label map when it has one. `exact` keeps
    /// torchvision's order of operations for Faster R-CNN (see [`FasterRcnn::optimize_for_inference`]);
    /// SSD has a single path.
    pub fn load(path: &Path, device: Device, mut cfg: FasterRcnnConfig, exact: bool) -> Result<Self> {
        if !path.exists() {
            bail!(
                "weights file {} not found: run `attrstream model fetch fasterrcnn_resnet50_fpn_coco` \
                 (needs internet) or `attrstream model import FILE.pth`",
                path.display()
            );
        }
        let meta = weights::read_metadata(path)?;
        let labels = meta.labels.clone().unwrap_or_else(coco_labels);
        let (vs, network) = match meta.architecture.as_deref().unwrap_or(FASTERRCNN_RESNET50_FPN) {
            FASTERRCNN_RESNET50_FPN => {
                cfg.num_classes = labels.len() as i64;
                if let Some(config) = &meta.config {
                    cfg.apply_weights_config(config);
                }
                cfg.validate().map_err(anyhow::Error::msg)?;
                let (vs, model) = FasterRcnn::load(path, device, cfg, !exact)?;
                (vs, Network::FasterRcnn(Box::new(model)))
            }
            SSD_MOBILENET_V2 => {
                let (vs, mut model) = SsdMobileNetV2::load(path, device)?;
                model.set_score_threshold(cfg.box_score_thresh);
                (vs, Network::Ssd(Box::new(model)))
            }
            other => bail!(
                "{} holds a `{other}` model; attrstream runs {FASTERRCNN_RESNET50_FPN} and {SSD_MOBILENET_V2}",
                path.display()
            ),
        };
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            network,
            _vs: vs,
            labels,
            name,
            device,
        })
    }

    /// Model name shown to users (the weights file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device this replica runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The architecture name, e.g. `fasterrcnn_resnet50_fpn`.
    pub fn architecture(&self) -> &'static str {
        match self.network {
            Network::FasterRcnn(_) => FASTERRCNN_RESNET50_FPN,
            Network::Ssd(_) => SSD_MOBILENET_V2,
        }
    }

    /// The label map (index = class id).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Detects objects in a batch of images in one forward pass.
    pub fn detect(&self, images: &[RgbImage]) -> Result<Vec<ImageDetections>> {
        let tensors: Vec<Tensor> = images.iter().map(|im| to_tensor(im, self.device)).collect();
        let raw: Vec<(Tensor, Tensor, Tensor)> = match &self.network {
            Network::FasterRcnn(m) => m
                .detect(&tensors)
                .into_iter()
                .map(|d| (d.boxes, d.scores, d.labels))
                .collect(),
            Network::Ssd(m) => m
                .detect(&tensors)
                .into_iter()
                .map(|d| (d.boxes, d.scores, d.labels))
                .collect(),
        };
        images
            .iter()
            .zip(raw)
            .map(|(img, (d_boxes, d_scores, d_labels))| {
                let (w, h) = img.dimensions();
                let boxes = Vec::<f32>::try_from(&d_boxes.to_device(Device::Cpu).contiguous().view(-1))
                    .context("reading boxes")?;
                let scores = Vec::<f32>::try_from(&d_scores.to_device(Device::Cpu)).context("reading scores")?;
                let labels = Vec::<i64>::try_from(&d_labels.to_device(Device::Cpu)).context("reading labels")?;
                let detections = scores
                    .iter()
                    .zip(&labels)
                    .enumerate()
                    .map(|(i, (&score, &label_id))| {
                        let b = [boxes[4 * i], boxes[4 * i + 1], boxes[4 * i + 2], boxes[4 * i + 3]];
                        let (fw, fh) = (w as f32, h as f32);
                        Detection {
                            label: label_name(&self.labels, label_id),
                            label_id,
                            score,
                            box_px: b,
                            box_norm: [b[0] / fw, b[1] / fh, b[2] / fw, b[3] / fh],
                        }
                    })
                    .collect();
                Ok(ImageDetections {
                    width: w,
                    height: h,
                    detections,
                })
            })
            .collect()
    }
}

/// Metadata for a COCO Faster R-CNN checkpoint imported from `source`.
pub fn coco_metadata(source: &str, sha256: &str) -> WeightsMetadata {
    WeightsMetadata {
        architecture: Some(FASTERRCNN_RESNET50_FPN.to_string()),
        labels: Some(coco_labels()),
        source: Some(source.to_string()),
        source_sha256: Some(sha256.to_string()),
        config: None,
    }
}
