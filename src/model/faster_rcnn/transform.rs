//! Input transform, as torchvision's `GeneralizedRCNNTransform`: normalize, resize so the
//! short side is `min_size` (long side at most `max_size`), zero-pad a batch to a multiple of
//! `size_divisible`, scale training targets with their images, and map detected boxes back
//! to the original image size.

use tch::{Kind, Tensor};

use super::config::FasterRcnnConfig;

/// A padded batch of images plus the size each image had before padding.
#[derive(Debug)]
pub struct ImageBatch {
    /// `[N, 3, H, W]` normalized, resized, zero-padded images.
    pub tensors: Tensor,
    /// `(height, width)` of each resized image inside the padding.
    pub image_sizes: Vec<(i64, i64)>,
}

/// Normalizes, resizes and batches images; scales boxes back afterwards.
#[derive(Debug, Clone)]
pub struct Transform {
    min_size: i64,
    max_size: i64,
    mean: [f32; 3],
    std: [f32; 3],
    size_divisible: i64,
}

impl Transform {
    /// Builds the transform from the detector configuration.
    pub fn new(cfg: &FasterRcnnConfig) -> Self {
        Self {
            min_size: cfg.min_size,
            max_size: cfg.max_size,
            mean: cfg.image_mean.map(|v| v as f32),
            std: cfg.image_std.map(|v| v as f32),
            size_divisible: cfg.size_divisible,
        }
    }

    /// The resized `(height, width)` of an image of `(height, width)`: torchvision's scale
    /// `min(min_size / short, max_size / long)` in double precision, then `floor(side * scale)`.
    pub fn resized_size(&self, (h, w): (i64, i64)) -> (i64, i64) {
        let short = h.min(w) as f64;
        let long = h.max(w) as f64;
        let scale = (self.min_size as f64 / short).min(self.max_size as f64 / long);
        (((h as f64) * scale).floor() as i64, ((w as f64) * scale).floor() as i64)
    }

    /// `(image - mean) / std` per channel, for a `[3, H, W]` float image in `[0, 1]`.
    fn normalize(&self, image: &Tensor) -> Tensor {
        let device = image.device();
        let mean = Tensor::from_slice(&self.mean).to_device(device).view([3, 1, 1]);
        let std = Tensor::from_slice(&self.std).to_device(device).view([3, 1, 1]);
        (image - mean) / std
    }

    /// Bilinear resize (align_corners = false) to [`Transform::resized_size`].
    fn resize(&self, image: &Tensor) -> Tensor {
        let (_, h, w) = image.size3().unwrap_or((3, 0, 0));
        let (nh, nw) = self.resized_size((h, w));
        image
            .unsqueeze(0)
            .upsample_bilinear2d([nh, nw], false, None, None)
            .squeeze_dim(0)
    }

    /// Normalizes, resizes and pads a list of `[3, H, W]` float images in `[0, 1]`.
    pub fn batch(&self, images: &[Tensor]) -> ImageBatch {
        let resized: Vec<Tensor> = images
            .iter()
            .map(|img| self.resize(&self.normalize(&img.to_kind(Kind::Float))))
            .collect();
        let image_sizes: Vec<(i64, i64)> = resized
            .iter()
            .map(|t| {
                let s = t.size();
                (s[1], s[2])
            })
            .collect();
        let round_up = |v: i64| (v + self.size_divisible - 1) / self.size_divisible * self.size_divisible;
        let max_h = round_up(image_sizes.iter().map(|s| s.0).max().unwrap_or(0));
        let max_w = round_up(image_sizes.iter().map(|s| s.1).max().unwrap_or(0));
        let device = images.first().map(|t| t.device()).unwrap_or(tch::Device::Cpu);
        let tensors = Tensor::zeros([images.len() as i64, 3, max_h, max_w], (Kind::Float, device));
        for (i, img) in resized.iter().enumerate() {
            let (h, w) = image_sizes[i];
            tensors.get(i as i64).narrow(1, 0, h).narrow(2, 0, w).copy_(img);
        }
        ImageBatch { tensors, image_sizes }
    }

    /// Scales `[N, 4]` ground-truth boxes from an image's original `(height, width)` to its
    /// resized size, as torchvision's `resize_boxes` does to training targets (float32
    /// ratios `resized / original`).
    pub fn resize_boxes(boxes: &Tensor, original: (i64, i64), resized: (i64, i64)) -> Tensor {
        let ratio_h = resized.0 as f32 / original.0 as f32;
        let ratio_w = resized.1 as f32 / original.1 as f32;
        let ratios = Tensor::from_slice(&[ratio_w, ratio_h, ratio_w, ratio_h]).to_device(boxes.device());
        boxes * ratios.view([1, 4])
    }

    /// Scales `[N, 4]` boxes from a resized size back to the original size, with
    /// torchvision's float32 ratios.
    pub fn boxes_to_original(boxes: &Tensor, resized: (i64, i64), original: (i64, i64)) -> Tensor {
        let ratio_h = original.0 as f32 / resized.0 as f32;
        let ratio_w = original.1 as f32 / resized.1 as f32;
        let ratios = Tensor::from_slice(&[ratio_w, ratio_h, ratio_w, ratio_h]).to_device(boxes.device());
        boxes * ratios.view([1, 4])
    }
}
