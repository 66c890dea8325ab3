//! Anchor generator, as torchvision's `AnchorGenerator` with Faster R-CNN FPN's defaults:
//! one size per level (32, 64, 128, 256, 512) and aspect ratios 0.5, 1, 2.

use tch::{Device, Kind, Tensor};

/// Anchor sizes per FPN level, as in torchvision's `_default_anchorgen`.
pub const DEFAULT_ANCHOR_SIZES: [f64; 5] = [32.0, 64.0, 128.0, 256.0, 512.0];
/// Aspect ratios (height / width) used at every level.
pub const DEFAULT_ASPECT_RATIOS: [f64; 3] = [0.5, 1.0, 2.0];

/// Generates anchors for every location of every feature map.
#[derive(Debug)]
pub struct AnchorGenerator {
    /// Zero-centred anchors `[A, 4]` per level (torchvision's `cell_anchors`).
    cell_anchors: Vec<Tensor>,
}

impl AnchorGenerator {
    /// Builds the cell anchors: `w = size / sqrt(ratio)`, `h = size * sqrt(ratio)`, rounded.
    pub fn new(sizes: &[f64], aspect_ratios: &[f64]) -> Self {
        let cell_anchors = sizes
            .iter()
            .map(|&size| {
                let ratios = Tensor::from_slice(&aspect_ratios.iter().map(|&r| r as f32).collect::<Vec<_>>());
                let scales = Tensor::from_slice(&[size as f32]);
                let h_ratios = ratios.sqrt();
                let w_ratios = h_ratios.reciprocal();
                let ws = (w_ratios.unsqueeze(1) * scales.unsqueeze(0)).view(-1);
                let hs = (h_ratios.unsqueeze(1) * scales.unsqueeze(0)).view(-1);
                (Tensor::stack(&[-&ws, -&hs, ws, hs], 1) / 2.0).round()
            })
            .collect();
        Self { cell_anchors }
    }

    /// Anchors per location at each level (3 by default).
    pub fn num_anchors_per_location(&self) -> i64 {
        self.cell_anchors.first().map(|a| a.size()[0]).unwrap_or(0)
    }

    /// All anchors `[sum(H_l * W_l * A), 4]` for a padded batch of `image_size` whose
    /// feature maps have `grid_sizes`; the order is level, then row, column, anchor.
    pub fn anchors(&self, image_size: (i64, i64), grid_sizes: &[(i64, i64)], device: Device) -> Tensor {
        let per_level: Vec<Tensor> = grid_sizes
            .iter()
            .zip(&self.cell_anchors)
            .map(|(&(gh, gw), base)| {
                let stride_h = image_size.0 / gh;
                let stride_w = image_size.1 / gw;
                let shifts_x = Tensor::arange(gw, (Kind::Int64, device)) * stride_w;
                let shifts_y = Tensor::arange(gh, (Kind::Int64, device)) * stride_h;
                let grid = Tensor::meshgrid_indexing(&[shifts_y, shifts_x], "ij");
                let sy = grid[0].reshape([-1]);
                let sx = grid[1].reshape([-1]);
                let shifts = Tensor::stack(&[&sx, &sy, &sx, &sy], 1).to_kind(Kind::Float);
                (shifts.view([-1, 1, 4]) + base.to_device(device).view([1, -1, 4])).reshape([-1, 4])
            })
            .collect();
        Tensor::cat(&per_level, 0)
    }
}
