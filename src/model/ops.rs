//! Detection ops that libtorch lacks, with torchvision's exact semantics.
//!
//! torchvision implements `nms` and `roi_align` as C++/CUDA extensions that are not part of
//! libtorch, so they are written here. Every function documents the torchvision function it
//! mirrors; `tests/ops_parity.rs` checks them against `torchvision.ops` on random inputs,
//! ties, degenerate boxes and empty inputs.

use tch::{Device, Kind, Tensor};

/// Area of `[N, 4]` boxes in `(x1, y1, x2, y2)` form, as `torchvision.ops.box_area`.
pub fn box_area(boxes: &Tensor) -> Tensor {
    let w = boxes.select(1, 2) - boxes.select(1, 0);
    let h = boxes.select(1, 3) - boxes.select(1, 1);
    w * h
}

/// Pairwise IoU `[N, M]` of two box sets, as `torchvision.ops.box_iou` (no +1 pixel).
pub fn box_iou(boxes1: &Tensor, boxes2: &Tensor) -> Tensor {
    let area1 = box_area(boxes1);
    let area2 = box_area(boxes2);
    let b1 = boxes1.unsqueeze(1);
    let lt = b1.narrow(2, 0, 2).maximum(&boxes2.narrow(1, 0, 2));
    let rb = b1.narrow(2, 2, 2).minimum(&boxes2.narrow(1, 2, 2));
    let wh = (rb - lt).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    let union = area1.unsqueeze(1) + area2 - &inter;
    inter / union
}

/// Clamps box coordinates into an image of `(height, width)`, as
/// `torchvision.ops.clip_boxes_to_image`.
pub fn clip_boxes_to_image(boxes: &Tensor, (height, width): (i64, i64)) -> Tensor {
    let shape = boxes.size();
    let b = boxes.reshape([-1, 4]);
    let x1 = b.select(1, 0).clamp(0.0, width as f64);
    let y1 = b.select(1, 1).clamp(0.0, height as f64);
    let x2 = b.select(1, 2).clamp(0.0, width as f64);
    let y2 = b.select(1, 3).clamp(0.0, height as f64);
    Tensor::stack(&[x1, y1, x2, y2], 1).reshape(shape)
}

/// Indices of boxes whose width and height are both at least `min_size`, as
/// `torchvision.ops.remove_small_boxes`.
pub fn remove_small_boxes(boxes: &Tensor, min_size: f64) -> Tensor {
    let ws = boxes.select(1, 2) - boxes.select(1, 0);
    let hs = boxes.select(1, 3) - boxes.select(1, 1);
    let keep = ws.ge(min_size).logical_and(&hs.ge(min_size));
    keep.nonzero().select(1, 0)
}

/// Copies a float tensor to a `Vec<f32>` on the CPU.
fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view(-1);
    Vec::<f32>::try_from(&t).unwrap_or_default()
}

/// Greedy non-maximum suppression, as `torchvision.ops.nms`: boxes are visited in
/// descending score order (a stable sort, so ties keep index order); a box is dropped when
/// its IoU with an already kept box is strictly greater than `iou_threshold`. Returns the
/// kept indices (int64) sorted by decreasing score, on the boxes' device.
///
/// The arithmetic is done in f32 in the same order as torchvision's CPU kernel so that
/// borderline overlaps are decided the same way.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    let device = boxes.device();
    let n = boxes.size()[0];
    if n == 0 {
        return Tensor::empty([0], (Kind::Int64, device));
    }
    let (_, order) = scores.sort_stable(true, 0, true);
    let order = Vec::<i64>::try_from(&order.to_device(Device::Cpu)).unwrap_or_default();
    let b = to_vec_f32(boxes);
    let threshold = iou_threshold as f32;
    let n = n as usize;
    let area: Vec<f32> = (0..n)
        .map(|i| (b[4 * i + 2] - b[4 * i]) * (b[4 * i + 3] - b[4 * i + 1]))
        .collect();
    let mut suppressed = vec![false; n];
    let mut keep = Vec::with_capacity(n);
    for (pos, &i) in order.iter().enumerate() {
        let i = i as usize;
        if suppressed[i] {
            continue;
        }
        keep.push(i as i64);
        let (ix1, iy1, ix2, iy2) = (b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]);
        for &j in &order[pos + 1..] {
            let j = j as usize;
            if suppressed[j] {
                continue;
            }
            let xx1 = ix1.max(b[4 * j]);
            let yy1 = iy1.max(b[4 * j + 1]);
            let xx2 = ix2.min(b[4 * j + 2]);
            let yy2 = iy2.min(b[4 * j + 3]);
            let w = (xx2 - xx1).max(0.0);
            let h = (yy2 - yy1).max(0.0);
            let inter = w * h;
            let iou = inter / (area[i] + area[j] - inter);
            if iou > threshold {
                suppressed[j] = true;
            }
        }
    }
    Tensor::from_slice(&keep).to_device(device)
}

/// Class-aware NMS, as `torchvision.ops.batched_nms`: boxes with different `idxs` never
/// suppress each other. Like torchvision, small inputs use the coordinate-offset trick and
/// large ones (more than 4,000 coordinates on CPU, 100,000 on GPU) run NMS per class, so
/// the float rounding of the two paths matches torchvision's choice.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    let device = boxes.device();
    let limit = if device == Device::Cpu { 4000 } else { 100_000 };
    if boxes.numel() == 0 {
        return Tensor::empty([0], (Kind::Int64, device));
    }
    if boxes.numel() > limit {
        batched_nms_per_class(boxes, scores, idxs, iou_threshold)
    } else {
        let max_coordinate = boxes.max();
        let offsets = idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0);
        let shifted = boxes + offsets.unsqueeze(1);
        nms(&shifted, scores, iou_threshold)
    }
}

/// Class-aware NMS by running [`nms`] on each class separately (torchvision's
/// `_batched_nms_vanilla`, the large-input path of [`batched_nms`]); exact for any
/// coordinate range. Returns the kept indices sorted by decreasing score.
pub fn batched_nms_per_class(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou: f64) -> Tensor {
    let device = boxes.device();
    let keep_mask = Tensor::zeros([scores.size()[0]], (Kind::Bool, device));
    let classes = idxs.unique_dim(0, true, false, false).0;
    for class_id in Vec::<i64>::try_from(&classes.to_device(Device::Cpu)).unwrap_or_default() {
        let indices = idxs.eq(class_id).nonzero().select(1, 0);
        let kept = nms(&boxes.index_select(0, &indices), &scores.index_select(0, &indices), iou);
        let kept_global = indices.index_select(0, &kept);
        let _ = keep_mask.shallow_clone().index_fill_(0, &kept_global, 1i64);
    }
    let keep = keep_mask.nonzero().select(1, 0);
    let (_, order) = scores.index_select(0, &keep).sort(0, true);
    keep.index_select(0, &order)
}

/// RoIAlign, as `torchvision.ops.roi_align`.
///
/// * `input`: `[N, C, H, W]` features.
/// * `rois`: `[K, 5]` rows of `(batch_index, x1, y1, x2, y2)` in input-image coordinates.
/// * `spatial_scale` maps image coordinates to feature coordinates.
/// * `sampling_ratio > 0` takes that many bilinear samples per bin and axis; `<= 0` takes
///   `ceil(roi_size / output_size)` like torchvision's adaptive mode.
/// * `aligned = false` is torchvision's default (and Faster R-CNN's): no half-pixel shift,
///   and RoIs are at least one feature pixel wide.
///
/// Returns `[K, C, output_h, output_w]`.
///
/// How: RoIs are grouped by image and by sample-grid size. For each group, libtorch's
/// vectorized `grid_sampler_2d` (bilinear, border padding, parallel over RoIs) takes the
/// samples from the image's feature map, expanded without a copy to one view per RoI;
/// samples torchvision treats as outside the map (beyond one pixel) are zeroed; an average
/// pool reduces each bin's samples. This is exact torchvision semantics: border padding is
/// torchvision's clamp of coordinates in `[-1, 0]` and `[size - 1, size]`.
pub fn roi_align(
    input: &Tensor,
    rois: &Tensor,
    (pooled_h, pooled_w): (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let (_, c, height, width) = input.size4().unwrap_or((0, 0, 0, 0));
    let k = rois.size()[0];
    let device = input.device();
    let kind = input.kind();
    if k == 0 {
        return Tensor::zeros([0, c, pooled_h, pooled_w], (kind, device));
    }
    let rois = rois.to_kind(kind);
    let offset = if aligned { 0.5 } else { 0.0 };
    let start_w = rois.select(1, 1) * spatial_scale - offset;
    let start_h = rois.select(1, 2) * spatial_scale - offset;
    let end_w = rois.select(1, 3) * spatial_scale - offset;
    let end_h = rois.select(1, 4) * spatial_scale - offset;
    let mut roi_w = &end_w - &start_w;
    let mut roi_h = &end_h - &start_h;
    if !aligned {
        roi_w = roi_w.clamp_min(1.0);
        roi_h = roi_h.clamp_min(1.0);
    }
    let geometry = RoiGeometry {
        start_h,
        start_w,
        bin_h: &roi_h / pooled_h as f64,
        bin_w: &roi_w / pooled_w as f64,
    };

    // Group RoIs by (image, grid_h, grid_w).
    let to_vec = |t: Tensor| Vec::<i64>::try_from(&t.to_device(Device::Cpu)).unwrap_or_default();
    let batch = to_vec(rois.select(1, 0).to_kind(Kind::Int64));
    let (grid_h, grid_w) = if sampling_ratio > 0 {
        (vec![sampling_ratio; k as usize], vec![sampling_ratio; k as usize])
    } else {
        (
            to_vec((&roi_h / pooled_h as f64).ceil().to_kind(Kind::Int64)),
            to_vec((&roi_w / pooled_w as f64).ceil().to_kind(Kind::Int64)),
        )
    };
    let mut groups: std::collections::BTreeMap<(i64, i64, i64), Vec<i64>> = Default::default();
    for i in 0..k as usize {
        // An adaptive grid of zero samples (an empty, aligned RoI) pools to zero, as in
        // torchvision: such RoIs keep the zeros they start with.
        if grid_h[i] > 0 && grid_w[i] > 0 {
            groups
                .entry((batch[i], grid_h[i], grid_w[i]))
                .or_default()
                .push(i as i64);
        }
    }
    let output = Tensor::zeros([k, c, pooled_h, pooled_w], (kind, device));
    for ((image, gh, gw), members) in groups {
        // Bound the sampled tensor to about 2^24 values per chunk.
        let per_roi = (pooled_h * gh * pooled_w * gw * c).max(1);
        let chunk = ((1i64 << 24) / per_roi).max(1) as usize;
        for part in members.chunks(chunk) {
            let index = Tensor::from_slice(part).to_device(device);
            let g = geometry.select(&index);
            let pooled = sample_and_pool(&input.get(image), &g, (height, width), (pooled_h, pooled_w), (gh, gw));
            let _ = output.shallow_clone().index_copy_(0, &index, &pooled);
        }
    }
    output
}

/// RoIAlign for training: the values of [`roi_align`] (torchvision's), with a gradient with
/// respect to `input` whose memory is proportional to the input, not to the RoI count.
///
/// [`roi_align`] samples a per-RoI view of the feature map with `grid_sampler_2d`, whose
/// backward materializes a full feature-map gradient for every RoI: far too much for the
/// hundreds of RoIs of a training step. Here each bin is a weighted sum of feature-map
/// pixels: every sample's four bilinear neighbours with torchvision's weights (zero for a
/// sample more than one pixel outside the map), divided by the sample count. One
/// `embedding_bag` per bin-grid size computes the sums over the map laid out as
/// `[N * H * W, C]` rows, and its backward scatters into a single map, exactly like
/// torchvision's `roi_align` backward. Arguments and result are those of [`roi_align`];
/// `rois` get no gradient (torchvision gives them none either). `tests/parity_training.rs`
/// checks values and input gradients against `torchvision.ops.roi_align`.
pub fn roi_align_for_training(
    input: &Tensor,
    rois: &Tensor,
    (pooled_h, pooled_w): (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let (n, c, height, width) = input.size4().unwrap_or((0, 0, 0, 0));
    let k = rois.size()[0];
    let device = input.device();
    let kind = input.kind();
    let output = Tensor::zeros([k, c, pooled_h, pooled_w], (kind, device));
    if k == 0 || n == 0 || height == 0 || width == 0 {
        return output;
    }
    let rois = rois.detach().to_kind(kind);
    let offset = if aligned { 0.5 } else { 0.0 };
    let start_w = rois.select(1, 1) * spatial_scale - offset;
    let start_h = rois.select(1, 2) * spatial_scale - offset;
    let end_w = rois.select(1, 3) * spatial_scale - offset;
    let end_h = rois.select(1, 4) * spatial_scale - offset;
    let mut roi_w = &end_w - &start_w;
    let mut roi_h = &end_h - &start_h;
    if !aligned {
        roi_w = roi_w.clamp_min(1.0);
        roi_h = roi_h.clamp_min(1.0);
    }
    let geometry = RoiGeometry {
        start_h,
        start_w,
        bin_h: &roi_h / pooled_h as f64,
        bin_w: &roi_w / pooled_w as f64,
    };
    // Row of pixel (b, y, x) in the embedding table: (b * H + y) * W + x.
    let table = input.permute([0, 2, 3, 1]).reshape([n * height * width, c]);
    let image_base = rois.select(1, 0).to_kind(Kind::Int64) * (height * width);

    let to_vec = |t: Tensor| Vec::<i64>::try_from(&t.to_device(Device::Cpu)).unwrap_or_default();
    let (grid_h, grid_w) = if sampling_ratio > 0 {
        (vec![sampling_ratio; k as usize], vec![sampling_ratio; k as usize])
    } else {
        (
            to_vec((&roi_h / pooled_h as f64).ceil().to_kind(Kind::Int64)),
            to_vec((&roi_w / pooled_w as f64).ceil().to_kind(Kind::Int64)),
        )
    };
    let mut groups: std::collections::BTreeMap<(i64, i64), Vec<i64>> = Default::default();
    for i in 0..k as usize {
        // A grid of zero samples (an empty, aligned RoI) pools to zero, as in torchvision.
        if grid_h[i] > 0 && grid_w[i] > 0 {
            groups.entry((grid_h[i], grid_w[i])).or_default().push(i as i64);
        }
    }
    for ((gh, gw), members) in groups {
        let index = Tensor::from_slice(&members).to_device(device);
        let g = geometry.select(&index);
        let m = members.len() as i64;
        // Per axis: neighbour indices, weights and validity, [m, pooled, grid].
        let ys = BilinearAxis::new(&sample_positions(&g.start_h, &g.bin_h, pooled_h, gh), height);
        let xs = BilinearAxis::new(&sample_positions(&g.start_w, &g.bin_w, pooled_w, gw), width);
        // Broadcast to [m, pooled_h, pooled_w, grid_h, grid_w]: bins, then samples in
        // torchvision's order (iy outer, ix inner), then the four corners.
        let y = |t: &Tensor| t.reshape([m, pooled_h, 1, gh, 1]);
        let x = |t: &Tensor| t.reshape([m, 1, pooled_w, 1, gw]);
        let base = image_base.index_select(0, &index).view([m, 1, 1, 1, 1]);
        let row = |yi: &Tensor, xi: &Tensor| &base + y(yi) * width + x(xi);
        let valid = y(&ys.valid) * x(&xs.valid);
        let indices = Tensor::stack(
            &[
                row(&ys.low, &xs.low),
                row(&ys.low, &xs.high),
                row(&ys.high, &xs.low),
                row(&ys.high, &xs.high),
            ],
            5,
        );
        let weights = Tensor::stack(
            &[
                y(&ys.w_low) * x(&xs.w_low),
                y(&ys.w_low) * x(&xs.w_high),
                y(&ys.w_high) * x(&xs.w_low),
                y(&ys.w_high) * x(&xs.w_high),
            ],
            5,
        ) * valid.unsqueeze(5);
        let bag = gh * gw * 4;
        let bags = m * pooled_h * pooled_w;
        let offsets = Tensor::arange(bags, (Kind::Int64, device)) * bag;
        let (sums, _, _, _) = Tensor::embedding_bag(
            &table,
            &indices.reshape([-1]),
            &offsets,
            false,
            0, // sum
            false,
            Some(weights.reshape([-1])),
            false,
        );
        let pooled = (sums / (gh * gw) as f64)
            .view([m, pooled_h, pooled_w, c])
            .permute([0, 3, 1, 2]);
        let _ = output.shallow_clone().index_copy_(0, &index, &pooled);
    }
    output
}

/// Bilinear interpolation along one axis, as torchvision's `bilinear_interpolate`: for
/// sample coordinates `[m, pooled * grid]`, the low and high neighbour indices, their
/// weights, and whether the sample lies within one pixel of the map (1.0) or not (0.0).
struct BilinearAxis {
    low: Tensor,
    high: Tensor,
    w_low: Tensor,
    w_high: Tensor,
    valid: Tensor,
}

impl BilinearAxis {
    fn new(v: &Tensor, size: i64) -> Self {
        let valid = v.ge(-1.0).logical_and(&v.le(size as f64)).to_kind(v.kind());
        let v = v.clamp_min(0.0);
        let low = v.floor().clamp_max((size - 1) as f64);
        let at_edge = low.ge((size - 1) as f64);
        // At the last pixel both neighbours are that pixel and the coordinate snaps to it.
        let v = v.where_self(&at_edge.logical_not(), &low);
        let high = (&low + 1.0).clamp_max((size - 1) as f64);
        let w_high = &v - &low;
        let w_low = w_high.ones_like() - &w_high;
        Self {
            low: low.to_kind(Kind::Int64),
            high: high.to_kind(Kind::Int64),
            w_low,
            w_high,
            valid,
        }
    }
}

/// Per-RoI bin geometry in feature coordinates, `[K]` each.
struct RoiGeometry {
    start_h: Tensor,
    start_w: Tensor,
    bin_h: Tensor,
    bin_w: Tensor,
}

impl RoiGeometry {
    fn select(&self, index: &Tensor) -> RoiGeometry {
        RoiGeometry {
            start_h: self.start_h.index_select(0, index),
            start_w: self.start_w.index_select(0, index),
            bin_h: self.bin_h.index_select(0, index),
            bin_w: self.bin_w.index_select(0, index),
        }
    }
}

/// Sample positions along one axis, `[K, pooled * grid]`, computed in torchvision's
/// operation order: `start + p * bin + (i + 0.5) * bin / grid`.
fn sample_positions(start: &Tensor, bin: &Tensor, pooled: i64, grid: i64) -> Tensor {
    let device = start.device();
    let kind = start.kind();
    let p = Tensor::arange(pooled, (kind, device))
        .repeat_interleave_self_int(grid, 0, None)
        .unsqueeze(0);
    let i = (Tensor::arange(grid, (kind, device)) + 0.5)
        .repeat([pooled])
        .unsqueeze(0);
    let bin = bin.unsqueeze(1);
    start.unsqueeze(1) + &p * &bin + (&i * &bin) / grid as f64
}

/// Samples one image's `[C, H, W]` features at every RoI's bilinear sample points and
/// averages each bin: `[K, C, pooled_h, pooled_w]`.
fn sample_and_pool(
    feature: &Tensor,
    g: &RoiGeometry,
    (height, width): (i64, i64),
    (pooled_h, pooled_w): (i64, i64),
    (grid_h, grid_w): (i64, i64),
) -> Tensor {
    let k = g.start_h.size()[0];
    let c = feature.size()[0];
    let ys = sample_positions(&g.start_h, &g.bin_h, pooled_h, grid_h); // [K, SY]
    let xs = sample_positions(&g.start_w, &g.bin_w, pooled_w, grid_w); // [K, SX]
    let (sy, sx) = (ys.size()[1], xs.size()[1]);
    // torchvision: a sample more than one pixel outside the map contributes zero.
    let inside = |v: &Tensor, size: i64| v.ge(-1.0).logical_and(&v.le(size as f64)).to_kind(v.kind());
    let mask = inside(&ys, height).view([k, 1, sy, 1]) * inside(&xs, width).view([k, 1, 1, sx]);
    // grid_sampler_2d with align_corners maps -1..1 to pixel centres 0..size-1. A map one
    // pixel wide or high has nothing to interpolate along that axis: any value maps to it.
    let normalize = |v: &Tensor, size: i64| {
        if size > 1 {
            v * (2.0 / (size - 1) as f64) - 1.0
        } else {
            v.zeros_like()
        }
    };
    let gy = normalize(&ys, height).view([k, sy, 1]).expand([k, sy, sx], false);
    let gx = normalize(&xs, width).view([k, 1, sx]).expand([k, sy, sx], false);
    let grid = Tensor::stack(&[gx, gy], 3);
    let input = feature.unsqueeze(0).expand([k, c, height, width], false);
    // interpolation 0 = bilinear, padding 1 = border.
    let samples = input.grid_sampler_2d(&grid, 0, 1, true) * mask;
    samples.avg_pool2d([grid_h, grid_w], [grid_h, grid_w], [0, 0], false, true, None::<i64>)
}

/// Encodes and decodes box regression targets, as torchvision's `det_utils.BoxCoder`.
#[derive(Debug, Clone, Copy)]
pub struct BoxCoder {
    /// Weights `(wx, wy, ww, wh)` dividing the regression deltas.
    pub weights: [f64; 4],
    /// Upper clamp on `dw`/`dh` before `exp`, so huge deltas cannot overflow.
    pub bbox_xform_clip: f64,
}

impl BoxCoder {
    /// A coder with torchvision's default clamp, `log(1000 / 16)`.
    pub fn new(weights: [f64; 4]) -> Self {
        Self {
            weights,
            bbox_xform_clip: (1000.0f64 / 16.0).ln(),
        }
    }

    /// Applies `rel_codes` `[K, 4 * C]` to reference `boxes` `[K, 4]`; returns `[K, C, 4]`.
    pub fn decode(&self, rel_codes: &Tensor, boxes: &Tensor) -> Tensor {
        let boxes = boxes.to_kind(rel_codes.kind());
        let k = boxes.size()[0];
        let widths = boxes.select(1, 2) - boxes.select(1, 0);
        let heights = boxes.select(1, 3) - boxes.select(1, 1);
        let ctr_x = boxes.select(1, 0) + &widths * 0.5;
        let ctr_y = boxes.select(1, 1) + &heights * 0.5;
        let [wx, wy, ww, wh] = self.weights;
        // `-1` cannot be inferred for zero boxes: take the per-box count from the last dimension.
        let per_box = if k > 0 {
            -1
        } else {
            rel_codes.size().last().copied().unwrap_or(4) / 4
        };
        let codes = rel_codes.view([k, per_box, 4]);
        let dx = codes.select(2, 0) / wx;
        let dy = codes.select(2, 1) / wy;
        let dw = (codes.select(2, 2) / ww).clamp_max(self.bbox_xform_clip);
        let dh = (codes.select(2, 3) / wh).clamp_max(self.bbox_xform_clip);
        let widths = widths.unsqueeze(1);
        let heights = heights.unsqueeze(1);
        let pred_ctr_x = dx * &widths + ctr_x.unsqueeze(1);
        let pred_ctr_y = dy * &heights + ctr_y.unsqueeze(1);
        let pred_w = dw.exp() * widths;
        let pred_h = dh.exp() * heights;
        let half_w = pred_w * 0.5;
        let half_h = pred_h * 0.5;
        Tensor::stack(
            &[
                &pred_ctr_x - &half_w,
                &pred_ctr_y - &half_h,
                pred_ctr_x + half_w,
                pred_ctr_y + half_h,
            ],
            2,
        )
    }

    /// Regression targets `[K, 4]` that turn `proposals` into `reference_boxes`
    /// (torchvision's `encode_single`).
    pub fn encode(&self, reference_boxes: &Tensor, proposals: &Tensor) -> Tensor {
        let [wx, wy, ww, wh] = self.weights;
        let p = proposals;
        let r = reference_boxes;
        let ex_w = p.select(1, 2) - p.select(1, 0);
        let ex_h = p.select(1, 3) - p.select(1, 1);
        let ex_x = p.select(1, 0) + &ex_w * 0.5;
        let ex_y = p.select(1, 1) + &ex_h * 0.5;
        let gt_w = r.select(1, 2) - r.select(1, 0);
        let gt_h = r.select(1, 3) - r.select(1, 1);
        let gt_x = r.select(1, 0) + &gt_w * 0.5;
        let gt_y = r.select(1, 1) + &gt_h * 0.5;
        let dx = (gt_x - ex_x) * wx / &ex_w;
        let dy = (gt_y - ex_y) * wy / &ex_h;
        let dw = (gt_w / ex_w).log() * ww;
        let dh = (gt_h / ex_h).log() * wh;
        Tensor::stack(&[dx, dy, dw, dh], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_no_boxes_gives_no_boxes() {
        let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
        let boxes = Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu));
        let codes = Tensor::zeros([0, 5 * 4], (Kind::Float, tch::Device::Cpu));
        assert_eq!(coder.decode(&codes, &boxes).size(), vec![0, 5, 4]);
    }
}
