//! Detections → product attributes: the detection records of the output, each label once,
//! the object the photo is about, and the dominant colours inside each detection's box.
//!
//! Everything here is plain, deterministic CPU code on one decoded image: the same image
//! and detections always give the same record (consumers de-duplicate and diff records, so
//! randomness would show up as spurious changes). Colours are clustered in CIE Lab, where
//! Euclidean distance roughly follows perceived difference, and named by the nearest entry
//! of a fixed palette ([`PALETTE`]) under CIEDE2000.
//!
//! Cost: at most [`ColourConfig::max_samples`] pixels per box, converted with a lookup
//! table and clustered by a few Lloyd iterations, so a box costs a fraction of a
//! millisecond however large it is.

use std::sync::OnceLock;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::detection::ImageDetections;
use crate::events::types::{
    AggregatedAttributes, BoxRecord, DetectionRecord, DominantColour, LabelSummary, MainObject, ObjectColours,
};

/// Most k-means (Lloyd) iterations per box; it usually converges in fewer.
const MAX_KMEANS_ITERATIONS: usize = 20;

/// k-means stops once no centre moves by more than this (ΔE76): a tenth of a
/// just-noticeable difference (about 2.3). Textured boxes otherwise spend many iterations
/// drifting centres by invisible amounts.
const KMEANS_TOLERANCE: f32 = 0.25;

/// With at least `COARSE_STRIDE × COARSE_MIN_SAMPLES` samples, k-means first converges on
/// every `COARSE_STRIDE`th sample, then runs at most `FINE_ITERATIONS` iterations on all of
/// them (centres from a quarter of the samples are as good; the fractions need them all).
/// On photos this changes fractions by under 1% and halves the cost.
const COARSE_STRIDE: usize = 4;
const COARSE_MIN_SAMPLES: usize = 256;
const FINE_ITERATIONS: usize = 2;

/// Largest `k` accepted (more clusters than this only splits shades of the same colour).
const MAX_K: usize = 32;

/// Weight of the centre bonus in [`main_object`]: a box centred in the image scores up to
/// 10% more than one in a corner.
const CENTRE_BONUS: f32 = 0.1;

/// How the dominant colours of each detection are computed: the `[attributes]` section of
/// the service's configuration.
///
/// The defaults suit product photos: a few colours per object, enough samples for stable
/// fractions (±1%) while costing well under a millisecond per box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColourConfig {
    /// Colour clusters per box (the `k` of k-means, 1 to 32). Three usually captures the
    /// product's main colour, a secondary colour and what is left of background or shadow.
    pub k: usize,
    /// Most pixels sampled per box, on a regular grid (at least 1). Larger boxes are
    /// subsampled so the cost per box is bounded; 4096 keeps fractions within about 1%.
    pub max_samples: usize,
    /// Clusters with a smaller share of the sampled pixels are not reported (in `[0, 1]`);
    /// they are usually edges, highlights or JPEG noise.
    pub min_fraction: f32,
    /// Fraction of the box's width (height) ignored at the left and right (top and bottom)
    /// sides, in `[0, 0.5)`. Detector boxes are loose, so their border is mostly background.
    pub box_margin: f32,
    /// Colours are computed for at most this many detections, best scores first (0 turns
    /// colours off). Bounds the cost of crowded images.
    pub max_objects: usize,
}

impl Default for ColourConfig {
    fn default() -> Self {
        Self {
            k: 3,
            max_samples: 4096,
            min_fraction: 0.05,
            box_margin: 0.1,
            max_objects: 10,
        }
    }
}

impl ColourConfig {
    /// Checks that the values make sense; the error names the offending field. (The
    /// computation clamps out-of-range values rather than panicking, but a configuration
    /// file with them is a mistake worth reporting at start-up.)
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(bool, &str); 4] = [
            ((1..=MAX_K).contains(&self.k), "k must be between 1 and 32"),
            (self.max_samples >= 1, "max_samples must be at least 1"),
            (
                (0.0..=1.0).contains(&self.min_fraction),
                "min_fraction must be in [0, 1]",
            ),
            ((0.0..0.5).contains(&self.box_margin), "box_margin must be in [0, 0.5)"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, message)) => Err(format!("[attributes] {message}")),
            None => Ok(()),
        }
    }
}

/// The detector's detections as output records, in the detector's order (best score
/// first), so that `detection_index` fields elsewhere in the record index into them.
pub fn detection_records(dets: &ImageDetections) -> Vec<DetectionRecord> {
    dets.detections
        .iter()
        .map(|d| DetectionRecord {
            label: d.label.clone(),
            label_id: d.label_id.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
            score: d.score,
            box_px: box_record(d.box_px),
            box_norm: box_record(d.box_norm),
        })
        .collect()
}

fn box_record(b: [f32; 4]) -> BoxRecord {
    BoxRecord {
        x_min: b[0],
        y_min: b[1],
        x_max: b[2],
        y_max: b[3],
    }
}

/// Everything the output record says about an image beyond its raw detections: label
/// summary, main object and the dominant colours of the first `cfg.max_objects` detections.
///
/// `image` is the decoded image the detections were computed on; if its size differs from
/// `dets.width × dets.height` the boxes are rescaled to it.
pub fn aggregate(image: &RgbImage, dets: &ImageDetections, cfg: &ColourConfig) -> AggregatedAttributes {
    let sx = if dets.width > 0 {
        image.width() as f32 / dets.width as f32
    } else {
        1.0
    };
    let sy = if dets.height > 0 {
        image.height() as f32 / dets.height as f32
    } else {
        1.0
    };
    let object_colours = dets
        .detections
        .iter()
        .take(cfg.max_objects)
        .enumerate()
        .map(|(i, d)| {
            let b = d.box_px;
            ObjectColours {
                detection_index: i as i32,
                label: d.label.clone(),
                colours: dominant_colours(image, [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], cfg),
            }
        })
        .collect();
    AggregatedAttributes {
        labels: label_summaries(dets),
        main_object: main_object(dets),
        object_colours,
    }
}

/// Each distinct label once with its best score and its count, best score first (ties by
/// label, so the order is stable): "what is in this photo" for search and filtering.
pub fn label_summaries(dets: &ImageDetections) -> Vec<LabelSummary> {
    let mut labels: Vec<LabelSummary> = Vec::new();
    for d in &dets.detections {
        match labels.iter_mut().find(|l| l.label == d.label) {
            Some(l) => {
                l.count += 1;
                l.max_score = l.max_score.max(d.score);
            }
            None => labels.push(LabelSummary {
                label: d.label.clone(),
                max_score: d.score,
                count: 1,
            }),
        }
    }
    labels.sort_by(|a, b| b.max_score.total_cmp(&a.max_score).then_with(|| a.label.cmp(&b.label)));
    labels
}

/// The detection the photo is most likely about, or `None` without detections.
///
/// Product photos show one large object, usually centred, with props and background
/// objects around it. The highest score alone picks a small, crisp prop (a cup on the
/// table) and the largest box alone picks low-confidence background (the table), so the
/// choice maximises `score × sqrt(area_fraction)`: confident *and* large. The square root
/// keeps area from dominating (a box 4× larger needs only half the score to win). A small
/// bonus, up to 10%, goes to boxes whose centre is near the image centre. Ties go to the
/// earlier (higher-scored) detection.
pub fn main_object(dets: &ImageDetections) -> Option<MainObject> {
    let (w, h) = (dets.width as f32, dets.height as f32);
    let mut best: Option<(usize, f32, f32)> = None; // (index, key, area fraction)
    for (i, d) in dets.detections.iter().enumerate() {
        let [x1, y1, x2, y2] = d.box_px;
        let (cx1, cx2) = (x1.clamp(0.0, w), x2.clamp(0.0, w));
        let (cy1, cy2) = (y1.clamp(0.0, h), y2.clamp(0.0, h));
        let area = if w > 0.0 && h > 0.0 {
            ((cx2 - cx1).max(0.0) * (cy2 - cy1).max(0.0) / (w * h)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let centre_distance = if w > 0.0 && h > 0.0 {
            let dx = (cx1 + cx2) / (2.0 * w) - 0.5;
            let dy = (cy1 + cy2) / (2.0 * h) - 0.5;
            (dx.hypot(dy) / 0.5f32.hypot(0.5)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        // `max(0.0)` also maps NaN (a NaN score or box) to 0.
        let key = (d.score * area.sqrt() * (1.0 + CENTRE_BONUS * (1.0 - centre_distance))).max(0.0);
        let area = if area.is_nan() { 0.0 } else { area };
        if best.is_none_or(|(_, k, _)| key > k) {
            best = Some((i, key, area));
        }
    }
    best.map(|(i, _, area_fraction)| {
        let d = &dets.detections[i];
        MainObject {
            label: d.label.clone(),
            score: d.score,
            detection_index: i as i32,
            area_fraction,
        }
    })
}

/// The dominant colours inside `box_px` (`x1, y1, x2, y2` in pixels of `image`), largest
/// share first; empty when the box has no area inside the image.
///
/// The box is clipped to the image and shrunk by `cfg.box_margin` per side; at most
/// `cfg.max_samples` pixels are taken on a regular grid (centres of equal cells), converted
/// to CIE Lab (D65) and clustered by k-means (`cfg.k` clusters, squared ΔE76 distance, at
/// most 20 Lloyd iterations, converging on a quarter of the samples before refining on all).
/// Initialisation is deterministic and robust to stray pixels: the samples are binned into
/// Lab cells of 10 units; the most populous cell's mean is the first centre, and each next
/// one is the cell mean maximising `cell population × squared distance to the nearest
/// centre` (a deterministic k-means++: far from the centres so far *and* common, so a
/// single specular highlight does not take a cluster). Clusters below
/// `cfg.min_fraction` are dropped; each reported colour is its cluster's Lab mean converted
/// back to sRGB and named with [`colour_name`].
pub fn dominant_colours(image: &RgbImage, box_px: [f32; 4], cfg: &ColourConfig) -> Vec<DominantColour> {
    let Some(samples) = sample_box(image, box_px, cfg) else {
        return Vec::new();
    };
    let n = samples.len() as f32;
    let mut clusters = kmeans(&samples, cfg.k.clamp(1, MAX_K));
    clusters.retain(|c| c.count > 0 && c.count as f32 / n >= cfg.min_fraction);
    // Stable: equal counts keep the deterministic centre order.
    clusters.sort_by_key(|c| std::cmp::Reverse(c.count));
    clusters
        .iter()
        .map(|c| {
            let [r, g, b] = lab_to_srgb(c.mean);
            DominantColour {
                name: colour_name(c.mean).to_string(),
                r,
                g,
                b,
                fraction: c.count as f32 / n,
            }
        })
        .collect()
}

/// `[lo, hi)` in pixels of an axis of `limit` pixels for a non-empty interval inside
/// `[0, limit]`: the pixels whose centres lie inside, or the one under its middle when the
/// interval is narrower than a pixel.
fn pixel_span(lo: f32, hi: f32, limit: u32) -> (u32, u32) {
    let (mut start, mut end) = (lo.round(), hi.round());
    if end <= start {
        start = ((lo + hi) / 2.0).floor();
        end = start + 1.0;
    }
    let start = (start.max(0.0) as u32).min(limit - 1);
    let end = (end.max(0.0) as u32).clamp(start + 1, limit);
    (start, end)
}

/// The Lab values of the grid-sampled pixels of a box, or `None` for a box with no area
/// inside the image (or non-finite coordinates).
fn sample_box(image: &RgbImage, box_px: [f32; 4], cfg: &ColourConfig) -> Option<Points> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 || box_px.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let [x1, y1, x2, y2] = box_px;
    let (x1, x2) = (x1.clamp(0.0, w as f32), x2.clamp(0.0, w as f32));
    let (y1, y2) = (y1.clamp(0.0, h as f32), y2.clamp(0.0, h as f32));
    if x2 <= x1 || y2 <= y1 {
        return None;
    }
    let margin = if cfg.box_margin.is_nan() {
        0.0
    } else {
        cfg.box_margin.clamp(0.0, 0.49)
    };
    let (mx, my) = ((x2 - x1) * margin, (y2 - y1) * margin);
    let (px0, px1) = pixel_span(x1 + mx, x2 - mx, w);
    let (py0, py1) = pixel_span(y1 + my, y2 - my, h);
    let (bw, bh) = ((px1 - px0) as usize, (py1 - py0) as usize);

    // Grid of nx × ny ≤ max_samples cells with the box's aspect ratio; one sample per cell.
    let max_samples = cfg.max_samples.max(1);
    let (nx, ny) = if bw * bh <= max_samples {
        (bw, bh)
    } else {
        let scale = (max_samples as f64 / (bw * bh) as f64).sqrt();
        let ny = ((bh as f64 * scale).floor() as usize).clamp(1, bh.min(max_samples));
        let nx = (max_samples / ny).clamp(1, bw);
        (nx, ny)
    };
    let xs: Vec<usize> = (0..nx).map(|i| px0 as usize + (2 * i + 1) * bw / (2 * nx)).collect();
    let lut = srgb_lut();
    let raw = image.as_raw();
    let stride = w as usize * 3;
    // Linear RGB first (table lookups), then Lab over whole arrays (vectorises).
    let mut points = Points::with_capacity(nx * ny);
    for j in 0..ny {
        let y = py0 as usize + (2 * j + 1) * bh / (2 * ny);
        let row = &raw[y * stride..(y + 1) * stride];
        for &x in &xs {
            let p = &row[x * 3..x * 3 + 3];
            points.push([lut[p[0] as usize], lut[p[1] as usize], lut[p[2] as usize]]);
        }
    }
    for ((r, g), b) in points.l.iter_mut().zip(points.a.iter_mut()).zip(points.b.iter_mut()) {
        [*r, *g, *b] = lab_from_linear([*r, *g, *b]);
    }
    Some(points)
}

/// Samples in structure-of-arrays layout, so the per-sample loops vectorise: Lab values
/// (linear RGB while [`sample_box`] fills them in).
struct Points {
    l: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Points {
    fn with_capacity(n: usize) -> Self {
        Points {
            l: Vec::with_capacity(n),
            a: Vec::with_capacity(n),
            b: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, p: [f32; 3]) {
        self.l.push(p[0]);
        self.a.push(p[1]);
        self.b.push(p[2]);
    }

    fn get(&self, i: usize) -> [f32; 3] {
        [self.l[i], self.a[i], self.b[i]]
    }

    fn len(&self) -> usize {
        self.l.len()
    }

    /// Every `step`th point.
    fn strided(&self, step: usize) -> Self {
        let mut out = Points::with_capacity(self.len().div_ceil(step));
        for i in (0..self.len()).step_by(step) {
            out.push(self.get(i));
        }
        out
    }
}

/// `sum / n` as f32 Lab.
fn mean_of(sum: &[f64; 3], n: usize) -> [f32; 3] {
    let n = n as f64;
    [(sum[0] / n) as f32, (sum[1] / n) as f32, (sum[2] / n) as f32]
}

/// One k-means cluster: how many samples it holds and their mean Lab value.
struct Cluster {
    count: usize,
    mean: [f32; 3],
}

fn dist2(a: &[f32; 3], b: &[f32; 3]) -> f32 {
    let (d0, d1, d2) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    d0 * d0 + d1 * d1 + d2 * d2
}

/// Lab cell of the initialisation histogram: 10 units per side over the sRGB gamut
/// (L 0..100, a -86..98, b -108..95).
const CELL: f32 = 10.0;
const CELLS_L: usize = 11;
const CELLS_A: usize = 20;
const CELLS_B: usize = 21;

fn cell_of(p: &[f32; 3]) -> usize {
    const INV: f32 = 1.0 / CELL;
    // Clamped as floats first (NaN becomes the lower bound), so the casts are plain.
    let index = |v: f32, cells: usize| v.max(0.0).min((cells - 1) as f32) as usize;
    let l = index(p[0] * INV, CELLS_L);
    let a = index((p[1] + 90.0) * INV, CELLS_A);
    let b = index((p[2] + 110.0) * INV, CELLS_B);
    (l * CELLS_A + a) * CELLS_B + b
}

/// Deterministic initial centres (see [`dominant_colours`]): at most `k`, fewer when the
/// samples occupy fewer cells.
fn initial_centres(points: &Points, k: usize) -> Vec<[f32; 3]> {
    // Occupied cells in order of first appearance (so ties resolve the same way every
    // time), with their populations and sums; `slot` maps a cell to its entry.
    let mut slot = vec![u16::MAX; CELLS_L * CELLS_A * CELLS_B];
    let mut cells: Vec<(usize, [f64; 3])> = Vec::new();
    for i in 0..points.len() {
        let p = points.get(i);
        let c = cell_of(&p);
        if slot[c] == u16::MAX {
            slot[c] = cells.len() as u16;
            cells.push((0, [0.0; 3]));
        }
        let (n, s) = &mut cells[slot[c] as usize];
        *n += 1;
        s[0] += f64::from(p[0]);
        s[1] += f64::from(p[1]);
        s[2] += f64::from(p[2]);
    }
    let cells: Vec<(f32, [f32; 3])> = cells.iter().map(|(n, s)| (*n as f32, mean_of(s, *n))).collect();
    let mut centres: Vec<[f32; 3]> = Vec::with_capacity(k);
    // Squared distance of each cell's mean to its nearest centre so far.
    let mut nearest = vec![f32::INFINITY; cells.len()];
    while centres.len() < k {
        let mut best: Option<(usize, f32)> = None;
        for (i, (n, _)) in cells.iter().enumerate() {
            let weight = if centres.is_empty() { *n } else { n * nearest[i] };
            if weight > 0.0 && best.is_none_or(|(_, w)| weight > w) {
                best = Some((i, weight));
            }
        }
        let Some((i, _)) = best else {
            break; // every cell coincides with a centre
        };
        let centre = cells[i].1;
        for (d, (_, m)) in nearest.iter_mut().zip(&cells) {
            *d = d.min(dist2(m, &centre));
        }
        centres.push(centre);
    }
    centres
}

/// Lloyd's k-means on Lab samples from [`initial_centres`]; empty clusters are returned
/// with count 0.
///
/// At most [`MAX_KMEANS_ITERATIONS`] iterations in all, stopping early once no centre
/// moves by more than [`KMEANS_TOLERANCE`]. With many samples the centres first converge
/// on every [`COARSE_STRIDE`]th sample and are then refined on all of them for at most
/// [`FINE_ITERATIONS`] iterations.
fn kmeans(points: &Points, k: usize) -> Vec<Cluster> {
    let mut centres = initial_centres(points, k);
    let mut budget = MAX_KMEANS_ITERATIONS;
    if points.len() >= COARSE_STRIDE * COARSE_MIN_SAMPLES {
        let (iterations, _) = lloyd(&points.strided(COARSE_STRIDE), &mut centres, budget - 1);
        budget -= iterations;
    }
    let (_, counts) = lloyd(points, &mut centres, budget.min(FINE_ITERATIONS));
    centres
        .into_iter()
        .zip(counts)
        .map(|(mean, count)| Cluster { count, mean })
        .collect()
}

/// Up to `max_iterations` Lloyd iterations (at least one) from `centres`, which end as the
/// means of their clusters (unchanged when empty). Returns the iterations done and the
/// final cluster sizes.
fn lloyd(points: &Points, centres: &mut [[f32; 3]], max_iterations: usize) -> (usize, Vec<usize>) {
    let n = points.len();
    let (l, a, b) = (&points.l[..n], &points.a[..n], &points.b[..n]);
    let mut labels = vec![0u32; n];
    let mut best = vec![f32::INFINITY; n];
    let mut counts = vec![0usize; centres.len()];
    let tol2 = KMEANS_TOLERANCE * KMEANS_TOLERANCE;
    for iteration in 1..=max_iterations.max(1) {
        // Assignment, one centre at a time over all points (vectorises; ties keep the
        // earlier centre).
        best.fill(f32::INFINITY);
        for (j, c) in centres.iter().enumerate() {
            let j = j as u32;
            let lab = l.iter().zip(a).zip(b);
            for (((&pl, &pa), &pb), (best, label)) in lab.zip(best.iter_mut().zip(labels.iter_mut())) {
                let (dl, da, db) = (pl - c[0], pa - c[1], pb - c[2]);
                let d = dl * dl + da * da + db * db;
                // Unconditional stores (`min`, select) keep the loop vectorised.
                *label = if d < *best { j } else { *label };
                *best = best.min(d);
            }
        }
        // Update: sums in f64 and in point order (deterministic; a cluster of identical
        // colours gets exactly that colour back).
        let mut sums = vec![[0f64; 3]; centres.len()];
        counts.fill(0);
        for i in 0..n {
            let j = labels[i] as usize;
            counts[j] += 1;
            let s = &mut sums[j];
            s[0] += f64::from(l[i]);
            s[1] += f64::from(a[i]);
            s[2] += f64::from(b[i]);
        }
        let mut shift = 0f32;
        for ((c, s), &count) in centres.iter_mut().zip(&sums).zip(&counts) {
            if count > 0 {
                let mean = mean_of(s, count);
                shift = shift.max(dist2(&mean, c));
                *c = mean;
            }
        }
        if shift <= tol2 {
            return (iteration, counts);
        }
    }
    (max_iterations.max(1), counts)
}

// ---------------------------------------------------------------------------------------
// Colour science: sRGB ↔ CIE Lab (D65) and CIEDE2000.
// ---------------------------------------------------------------------------------------

/// Linear RGB → XYZ for sRGB primaries and D65 (IEC 61966-2-1 as given by Lindbloom),
/// rows divided by the D65 white point so that white maps to `X/Xn = Y/Yn = Z/Zn = 1`.
const XN: f64 = 0.95047;
const ZN: f64 = 1.08883;
const RGB_TO_XYZ_N: [[f32; 3]; 3] = [
    [
        (0.4124564 / XN) as f32,
        (0.3575761 / XN) as f32,
        (0.1804375 / XN) as f32,
    ],
    [0.2126729f64 as f32, 0.7151522f64 as f32, 0.0721750f64 as f32],
    [
        (0.0193339 / ZN) as f32,
        (0.1191920 / ZN) as f32,
        (0.9503041 / ZN) as f32,
    ],
];

/// XYZ → linear RGB (the inverse of the matrix above, before normalisation).
const XYZ_TO_RGB: [[f64; 3]; 3] = [
    [3.2404542, -1.5371385, -0.4985314],
    [-0.9692660, 1.8760108, 0.0415560],
    [0.0556434, -0.2040259, 1.0572252],
];

/// CIE's ε = (6/29)³ and the slope 1/(3 (6/29)²) of Lab's linear segment.
const LAB_EPSILON: f64 = 216.0 / 24389.0;
const LAB_SLOPE: f64 = 24389.0 / 27.0 / 116.0;

/// sRGB component in `[0, 1]` → linear light (the sRGB transfer function, not a 2.2 gamma).
fn srgb_to_linear(c: f64) -> f64 {
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// Linear light → sRGB component, both in `[0, 1]`.
fn linear_to_srgb(c: f64) -> f64 {
    if c <= 0.0031308 {
        12.92 * c
    } else {
        1.055 * c.powf(1.0 / 2.4) - 0.055
    }
}

/// Linear light of each 8-bit sRGB value (so the per-pixel cost is three lookups).
fn srgb_lut() -> &'static [f32; 256] {
    static LUT: OnceLock<[f32; 256]> = OnceLock::new();
    LUT.get_or_init(|| std::array::from_fn(|i| srgb_to_linear(i as f64 / 255.0) as f32))
}

/// Cube root for `x` in Lab's range (`ε < x ≲ 1.1`): a bit-level first guess refined by two
/// Halley steps, accurate to a few f32 ulps and several times faster than `cbrtf`, which
/// dominated the per-pixel cost. Plain IEEE arithmetic, so identical on every platform.
fn cbrt_fast(x: f32) -> f32 {
    let mut y = f32::from_bits(x.to_bits() / 3 + 709_921_077);
    for _ in 0..2 {
        let y3 = y * y * y;
        y *= (y3 + 2.0 * x) / (2.0 * y3 + x);
    }
    y
}

/// Lab's companding function. Both branches are computed and one selected, so loops over
/// samples vectorise; the cube root's argument is clamped to its branch's domain, which
/// also keeps black pixels off the slow subnormal arithmetic.
fn lab_f(t: f32) -> f32 {
    let cube_root = cbrt_fast(t.max(LAB_EPSILON as f32));
    let linear = LAB_SLOPE as f32 * t + 4.0 / 29.0;
    if t > LAB_EPSILON as f32 {
        cube_root
    } else {
        linear
    }
}

fn lab_f_inverse(t: f64) -> f64 {
    if t > 6.0 / 29.0 {
        t * t * t
    } else {
        (t - 4.0 / 29.0) / LAB_SLOPE
    }
}

/// Linear sRGB → Lab: the per-pixel hot path (written out: `array::map` is not inlined).
#[inline]
fn lab_from_linear([r, g, b]: [f32; 3]) -> [f32; 3] {
    let m = &RGB_TO_XYZ_N;
    let fx = lab_f(m[0][0] * r + m[0][1] * g + m[0][2] * b);
    let fy = lab_f(m[1][0] * r + m[1][1] * g + m[1][2] * b);
    let fz = lab_f(m[2][0] * r + m[2][1] * g + m[2][2] * b);
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// 8-bit sRGB → CIE L\*a\*b\* (D65, 2° observer): the space colours are clustered and named
/// in, exposed so tests and tools can check it against reference implementations.
/// White is `(100, 0, 0)`; sRGB red is about `(53.24, 80.09, 67.20)`.
pub fn srgb_to_lab(rgb: [u8; 3]) -> [f32; 3] {
    let lut = srgb_lut();
    lab_from_linear(rgb.map(|c| lut[c as usize]))
}

/// CIE L\*a\*b\* (D65) → 8-bit sRGB, clamping colours outside the sRGB gamut: how cluster
/// means are reported. Inverse of [`srgb_to_lab`] for in-gamut colours.
pub fn lab_to_srgb(lab: [f32; 3]) -> [u8; 3] {
    let fy = (f64::from(lab[0]) + 16.0) / 116.0;
    let fx = fy + f64::from(lab[1]) / 500.0;
    let fz = fy - f64::from(lab[2]) / 200.0;
    let xyz = [lab_f_inverse(fx) * XN, lab_f_inverse(fy), lab_f_inverse(fz) * ZN];
    XYZ_TO_RGB.map(|row| {
        let linear = row[0] * xyz[0] + row[1] * xyz[1] + row[2] * xyz[2];
        (linear_to_srgb(linear.clamp(0.0, 1.0)) * 255.0).round() as u8
    })
}

/// CIEDE2000 colour difference (Sharma, Wu & Dalal 2005) between two Lab colours: the
/// perceptual distance used to name colours. Unlike plain Euclidean ΔE76 it does not
/// over-weight differences among saturated colours or misplace blues and greys.
pub fn ciede2000(lab1: [f32; 3], lab2: [f32; 3]) -> f32 {
    let [l1, a1, b1] = lab1.map(f64::from);
    let [l2, a2, b2] = lab2.map(f64::from);
    const POW25_7: f64 = 6_103_515_625.0; // 25⁷
    let c_bar = (a1.hypot(b1) + a2.hypot(b2)) / 2.0;
    let c_bar7 = c_bar.powi(7);
    let g = 0.5 * (1.0 - (c_bar7 / (c_bar7 + POW25_7)).sqrt());
    let (a1p, a2p) = ((1.0 + g) * a1, (1.0 + g) * a2);
    let (c1p, c2p) = (a1p.hypot(b1), a2p.hypot(b2));
    let hue = |b: f64, a: f64| {
        if a == 0.0 && b == 0.0 {
            0.0
        } else {
            b.atan2(a).to_degrees().rem_euclid(360.0)
        }
    };
    let (h1p, h2p) = (hue(b1, a1p), hue(b2, a2p));
    let chroma_product = c1p * c2p;

    let delta_l = l2 - l1;
    let delta_c = c2p - c1p;
    let delta_h_angle = if chroma_product == 0.0 {
        0.0
    } else {
        let d = h2p - h1p;
        if d > 180.0 {
            d - 360.0
        } else if d < -180.0 {
            d + 360.0
        } else {
            d
        }
    };
    let delta_h = 2.0 * chroma_product.sqrt() * (delta_h_angle.to_radians() / 2.0).sin();

    let l_bar = (l1 + l2) / 2.0;
    let c_bar_p = (c1p + c2p) / 2.0;
    let h_bar = if chroma_product == 0.0 {
        h1p + h2p
    } else if (h1p - h2p).abs() <= 180.0 {
        (h1p + h2p) / 2.0
    } else if h1p + h2p < 360.0 {
        (h1p + h2p + 360.0) / 2.0
    } else {
        (h1p + h2p - 360.0) / 2.0
    };
    let t = 1.0 - 0.17 * (h_bar - 30.0).to_radians().cos()
        + 0.24 * (2.0 * h_bar).to_radians().cos()
        + 0.32 * (3.0 * h_bar + 6.0).to_radians().cos()
        - 0.20 * (4.0 * h_bar - 63.0).to_radians().cos();
    let delta_theta = 30.0 * (-((h_bar - 275.0) / 25.0).powi(2)).exp();
    let c_bar_p7 = c_bar_p.powi(7);
    let r_c = 2.0 * (c_bar_p7 / (c_bar_p7 + POW25_7)).sqrt();
    let l50 = (l_bar - 50.0).powi(2);
    let s_l = 1.0 + 0.015 * l50 / (20.0 + l50).sqrt();
    let s_c = 1.0 + 0.045 * c_bar_p;
    let s_h = 1.0 + 0.015 * c_bar_p * t;
    let r_t = -(2.0 * delta_theta).to_radians().sin() * r_c;
    let (dl, dc, dh) = (delta_l / s_l, delta_c / s_c, delta_h / s_h);
    (dl * dl + dc * dc + dh * dh + r_t * dc * dh).max(0.0).sqrt() as f32
}

/// The colour names reported, with a representative sRGB value each: common fashion and
/// product colour words, so consumers can filter on a small fixed vocabulary. A colour is
/// named after the entry nearest to it (see [`colour_name`]).
///
/// Values start from the web colours of the same names, moved where nearest-neighbour
/// naming of photographed products needed it (checked on a list of everyday shades: sky
/// blue, denim, charcoal, camel, burgundy, coral, mint, …): `blue` is a royal blue rather
/// than the violet-leaning pure primary, `navy` the colour of navy cloth rather than pure
/// dark blue, `orange` is web "dark orange", and `light blue`, `light green` and
/// `charcoal` exist because without them pale blues became `silver`, bright greens `khaki`
/// and blue-greys `blue`.
pub const PALETTE: [(&str, [u8; 3]); 27] = [
    ("black", [0, 0, 0]),
    ("white", [255, 255, 255]),
    ("grey", [128, 128, 128]),
    ("charcoal", [60, 64, 70]),
    ("silver", [192, 192, 192]),
    ("red", [255, 0, 0]),
    ("maroon", [128, 0, 0]),
    ("orange", [255, 140, 0]),
    ("brown", [139, 69, 19]),
    ("beige", [235, 220, 185]),
    ("tan", [210, 180, 140]),
    ("yellow", [255, 255, 0]),
    ("gold", [255, 215, 0]),
    ("olive", [128, 128, 0]),
    ("green", [0, 128, 0]),
    ("light green", [144, 238, 144]),
    ("teal", [0, 128, 128]),
    ("cyan", [0, 255, 255]),
    ("navy", [20, 30, 100]),
    ("blue", [30, 80, 220]),
    ("light blue", [150, 200, 235]),
    ("purple", [128, 0, 128]),
    ("lavender", [190, 160, 220]),
    ("pink", [255, 192, 203]),
    ("magenta", [255, 0, 255]),
    ("cream", [255, 253, 208]),
    ("khaki", [189, 183, 107]),
];

fn palette_lab() -> &'static [[f32; 3]; PALETTE.len()] {
    static LAB: OnceLock<[[f32; 3]; PALETTE.len()]> = OnceLock::new();
    LAB.get_or_init(|| PALETTE.map(|(_, rgb)| srgb_to_lab(rgb)))
}

/// The [`PALETTE`] name nearest to a Lab colour under CIEDE2000 (ties: the earlier entry).
pub fn colour_name(lab: [f32; 3]) -> &'static str {
    let mut best = (0, f32::INFINITY);
    for (i, p) in palette_lab().iter().enumerate() {
        let d = ciede2000(lab, *p);
        if d < best.1 {
            best = (i, d);
        }
    }
    PALETTE[best.0].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::Detection;
    use image::Rgb;

    const RED: [u8; 3] = [255, 0, 0];
    const NAVY: [u8; 3] = [0, 0, 128];
    const WHITE: [u8; 3] = [255, 255, 255];
    const GREEN: [u8; 3] = [0, 128, 0];

    fn det(label: &str, score: f32, b: [f32; 4], w: u32, h: u32) -> Detection {
        Detection {
            label: label.to_string(),
            label_id: 1,
            score,
            box_px: b,
            box_norm: [b[0] / w as f32, b[1] / h as f32, b[2] / w as f32, b[3] / h as f32],
        }
    }

    fn dets(w: u32, h: u32, list: &[(&str, f32, [f32; 4])]) -> ImageDetections {
        ImageDetections {
            width: w,
            height: h,
            detections: list.iter().map(|&(l, s, b)| det(l, s, b, w, h)).collect(),
        }
    }

    fn fill(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, c: [u8; 3]) {
        for y in y0..y1 {
            for x in x0..x1 {
                img.put_pixel(x, y, Rgb(c));
            }
        }
    }

    fn assert_lab(rgb: [u8; 3], expected: [f32; 3]) {
        let lab = srgb_to_lab(rgb);
        for (a, e) in lab.iter().zip(&expected) {
            assert!((a - e).abs() < 1e-2, "{rgb:?} → {lab:?}, expected {expected:?}");
        }
    }

    #[test]
    fn lab_matches_reference_values() {
        // Reference values: Lindbloom's calculator / skimage.color.rgb2lab (D65, 2°).
        assert_lab(WHITE, [100.0, 0.0, 0.0]);
        assert_lab([0, 0, 0], [0.0, 0.0, 0.0]);
        assert_lab(RED, [53.2408, 80.0925, 67.2032]);
        assert_lab([0, 255, 0], [87.7347, -86.1827, 83.1793]);
        assert_lab([0, 0, 255], [32.2970, 79.1875, -107.8602]);
        assert_lab([128, 128, 128], [53.5850, 0.0, 0.0]);
    }

    #[test]
    fn fast_cube_root_is_accurate() {
        let mut worst = 0f64;
        let mut t = LAB_EPSILON as f32;
        while t < 1.2 {
            let exact = f64::from(t).cbrt();
            worst = worst.max((f64::from(cbrt_fast(t)) - exact).abs() / exact);
            t = f32::from_bits(t.to_bits() + 97);
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    /// The textbook conversion in f64, to check the f32 fast path against.
    fn lab_f64(rgb: [u8; 3]) -> [f64; 3] {
        let m = [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ];
        let white = [0.95047, 1.0, 1.08883];
        let lin = rgb.map(|c| srgb_to_linear(f64::from(c) / 255.0));
        let f = |i: usize| {
            let t = (m[i][0] * lin[0] + m[i][1] * lin[1] + m[i][2] * lin[2]) / white[i];
            if t > LAB_EPSILON {
                t.cbrt()
            } else {
                LAB_SLOPE * t + 4.0 / 29.0
            }
        };
        let (fx, fy, fz) = (f(0), f(1), f(2));
        [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
    }

    #[test]
    fn fast_lab_matches_the_f64_formula() {
        let mut worst = 0f64;
        for r in (0..=255u8).step_by(3) {
            for g in (0..=255u8).step_by(3) {
                for b in (0..=255u8).step_by(3) {
                    let fast = srgb_to_lab([r, g, b]);
                    let exact = lab_f64([r, g, b]);
                    for (x, e) in fast.iter().zip(&exact) {
                        worst = worst.max((f64::from(*x) - e).abs());
                    }
                }
            }
        }
        assert!(worst < 1e-3, "max |ΔLab| {worst}");
    }

    #[test]
    fn lab_round_trips_to_the_same_srgb() {
        for r in (0..=255u8).step_by(5) {
            for g in (0..=255u8).step_by(5) {
                for b in (0..=255u8).step_by(5) {
                    assert_eq!(lab_to_srgb(srgb_to_lab([r, g, b])), [r, g, b]);
                }
            }
        }
    }

    #[test]
    fn ciede2000_matches_sharma_test_data() {
        // Pairs 1, 7, 17, 19 and 25 of Sharma, Wu & Dalal (2005), table 1.
        let pairs: [([f32; 3], [f32; 3], f32); 5] = [
            ([50.0, 2.6772, -79.7751], [50.0, 0.0, -82.7485], 2.0425),
            ([50.0, 0.0, 0.0], [50.0, -1.0, 2.0], 2.3669),
            ([50.0, 2.5, 0.0], [73.0, 25.0, -18.0], 27.1492),
            ([50.0, 2.5, 0.0], [56.0, -27.0, -3.0], 31.9030),
            ([60.2574, -34.0099, 36.2677], [60.4626, -34.1751, 39.4387], 1.2644),
        ];
        for (a, b, expected) in pairs {
            let d = ciede2000(a, b);
            assert!((d - expected).abs() < 1e-4, "{a:?} {b:?}: {d} != {expected}");
            assert!((ciede2000(b, a) - expected).abs() < 1e-4, "not symmetric");
        }
        assert_eq!(ciede2000([40.0, 10.0, -5.0], [40.0, 10.0, -5.0]), 0.0);
    }

    #[test]
    fn every_palette_colour_names_itself() {
        for (name, rgb) in PALETTE {
            assert_eq!(colour_name(srgb_to_lab(rgb)), name);
        }
        // Everyday shades as products show them.
        for (rgb, name) in [
            ([20, 20, 24], "black"),
            ([245, 245, 245], "white"),
            ([200, 20, 30], "red"),
            ([128, 0, 32], "maroon"),   // burgundy
            ([64, 64, 64], "charcoal"), // dark grey
            ([135, 206, 235], "light blue"),
            ([21, 96, 189], "blue"),  // denim
            ([193, 154, 107], "tan"), // camel
            ([50, 205, 50], "light green"),
            ([34, 139, 34], "green"),
            ([255, 182, 193], "pink"),
            ([80, 50, 30], "brown"),
            ([40, 53, 83], "navy"), // night sky
        ] {
            assert_eq!(colour_name(srgb_to_lab(rgb)), name, "{rgb:?}");
        }
    }

    /// Grey background with a box whose left half is red and right half navy.
    fn red_navy_image() -> (RgbImage, [f32; 4]) {
        let mut img = RgbImage::from_pixel(200, 160, Rgb([128, 128, 128]));
        fill(&mut img, 40, 30, 100, 130, RED);
        fill(&mut img, 100, 30, 160, 130, NAVY);
        (img, [40.0, 30.0, 160.0, 130.0])
    }

    #[test]
    fn half_red_half_navy_gives_two_colours_of_half_each() {
        let (img, b) = red_navy_image();
        let colours = dominant_colours(&img, b, &ColourConfig::default());
        assert_eq!(colours.len(), 2, "{colours:?}");
        let mut names: Vec<&str> = colours.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["navy", "red"]);
        for c in &colours {
            assert!((c.fraction - 0.5).abs() < 0.02, "{c:?}");
            let expected = if c.name == "red" { RED } else { NAVY };
            assert_eq!([c.r, c.g, c.b], expected);
        }
    }

    #[test]
    fn subsampling_keeps_fractions() {
        // A 1000 × 800 box (800 000 pixels) sampled down to 4096: 30% green, 70% white.
        let mut img = RgbImage::from_pixel(1000, 800, Rgb(WHITE));
        fill(&mut img, 0, 0, 300, 800, GREEN);
        let cfg = ColourConfig {
            box_margin: 0.0,
            ..ColourConfig::default()
        };
        let colours = dominant_colours(&img, [0.0, 0.0, 1000.0, 800.0], &cfg);
        assert_eq!(colours.len(), 2, "{colours:?}");
        assert_eq!((colours[0].name.as_str(), colours[1].name.as_str()), ("white", "green"));
        assert!((colours[1].fraction - 0.3).abs() < 0.01, "{colours:?}");
        let sampled = sample_box(&img, [0.0, 0.0, 1000.0, 800.0], &cfg).unwrap().len();
        assert!(sampled <= 4096 && sampled > 3900, "{sampled}");
    }

    #[test]
    fn solid_white_box_is_white() {
        let img = RgbImage::from_pixel(64, 48, Rgb(WHITE));
        let colours = dominant_colours(&img, [5.0, 5.0, 50.0, 40.0], &ColourConfig::default());
        assert_eq!(
            colours,
            [DominantColour {
                name: "white".into(),
                r: 255,
                g: 255,
                b: 255,
                fraction: 1.0
            }]
        );
    }

    #[test]
    fn box_margin_excludes_the_border() {
        // 100 × 100 box: a green frame 8 px wide around a white inside.
        let mut img = RgbImage::from_pixel(100, 100, Rgb(GREEN));
        fill(&mut img, 8, 8, 92, 92, WHITE);
        let b = [0.0, 0.0, 100.0, 100.0];
        let with_margin = dominant_colours(&img, b, &ColourConfig::default());
        let names: Vec<&str> = with_margin.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["white"], "{with_margin:?}");
        let without = dominant_colours(
            &img,
            b,
            &ColourConfig {
                box_margin: 0.0,
                ..ColourConfig::default()
            },
        );
        let names: Vec<&str> = without.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["white", "green"], "{without:?}");
        assert!((without[1].fraction - (1.0 - 0.84 * 0.84)).abs() < 0.01);
    }

    #[test]
    fn min_fraction_drops_small_clusters() {
        // 2% of the box is red: dropped at the default 5%, kept at 1%.
        let mut img = RgbImage::from_pixel(100, 100, Rgb(WHITE));
        fill(&mut img, 20, 20, 22, 80, RED); // 120 px of the 80 × 80 inside = 1.9%
        let cfg = ColourConfig::default();
        let names = |cfg: &ColourConfig| -> Vec<String> {
            dominant_colours(&img, [0.0, 0.0, 100.0, 100.0], cfg)
                .into_iter()
                .map(|c| c.name)
                .collect()
        };
        assert_eq!(names(&cfg), ["white"]);
        let cfg = ColourConfig {
            min_fraction: 0.01,
            ..cfg
        };
        assert_eq!(names(&cfg), ["white", "red"]);
    }

    #[test]
    fn degenerate_boxes_give_no_colours() {
        let img = RgbImage::from_pixel(50, 40, Rgb(WHITE));
        let cfg = ColourConfig::default();
        for b in [
            [10.0, 10.0, 10.0, 30.0],        // zero width
            [10.0, 30.0, 20.0, 10.0],        // inverted
            [60.0, 10.0, 80.0, 30.0],        // right of the image
            [-30.0, -30.0, -1.0, -1.0],      // above and left
            [f32::NAN, 0.0, 10.0, 10.0],     // not a number
            [0.0, 0.0, f32::INFINITY, 10.0], // infinite
        ] {
            assert!(dominant_colours(&img, b, &cfg).is_empty(), "{b:?}");
        }
        // Sub-pixel but positive area: the pixel under it.
        assert_eq!(dominant_colours(&img, [3.1, 3.1, 3.3, 3.3], &cfg).len(), 1);
        // Boxes reaching past the image are clipped.
        assert_eq!(dominant_colours(&img, [-100.0, -5.0, 1e9, 1e9], &cfg)[0].fraction, 1.0);
        // An empty image and extreme configurations do not panic either.
        assert!(dominant_colours(&RgbImage::new(0, 0), [0.0, 0.0, 1.0, 1.0], &cfg).is_empty());
        let odd = ColourConfig {
            k: 0,
            max_samples: 0,
            min_fraction: f32::NAN,
            box_margin: f32::NAN,
            max_objects: 1,
        };
        let _ = dominant_colours(&img, [0.0, 0.0, 50.0, 40.0], &odd);
        let huge_k = ColourConfig {
            k: 1000,
            ..ColourConfig::default()
        };
        assert_eq!(dominant_colours(&img, [0.0, 0.0, 50.0, 40.0], &huge_k).len(), 1);
    }

    #[test]
    fn thin_boxes_stay_within_the_sample_budget() {
        let img = RgbImage::from_pixel(10_000, 3, Rgb(WHITE));
        let cfg = ColourConfig {
            max_samples: 100,
            box_margin: 0.0,
            ..ColourConfig::default()
        };
        let n = sample_box(&img, [0.0, 0.0, 10_000.0, 3.0], &cfg).unwrap().len();
        assert!((1..=100).contains(&n), "{n}");
        let tall = RgbImage::from_pixel(1, 5000, Rgb(WHITE));
        let n = sample_box(&tall, [0.0, 0.0, 1.0, 5000.0], &cfg).unwrap().len();
        assert!((1..=100).contains(&n), "{n}");
    }

    #[test]
    fn main_object_prefers_large_and_confident() {
        let d = dets(
            640,
            480,
            &[
                ("cup", 0.95, [10.0, 10.0, 30.0, 30.0]),        // tiny, most confident
                ("handbag", 0.90, [120.0, 60.0, 520.0, 440.0]), // large
                ("person", 0.20, [0.0, 0.0, 640.0, 480.0]),     // everything, unsure
            ],
        );
        let main = main_object(&d).unwrap();
        assert_eq!(main.label, "handbag");
        assert_eq!(main.detection_index, 1);
        assert_eq!(main.score, 0.90);
        assert!((main.area_fraction - 400.0 * 380.0 / (640.0 * 480.0)).abs() < 1e-6);
        assert!(main_object(&dets(640, 480, &[])).is_none());
        // Boxes are clipped before their area counts; a lone degenerate box still wins.
        let d = dets(100, 100, &[("cup", 0.5, [50.0, 50.0, 500.0, 500.0])]);
        assert_eq!(main_object(&d).unwrap().area_fraction, 0.25);
        let d = dets(100, 100, &[("cup", f32::NAN, [5.0, 5.0, 5.0, 5.0])]);
        assert_eq!(main_object(&d).unwrap().area_fraction, 0.0);
    }

    #[test]
    fn labels_are_aggregated_with_count_and_max_score() {
        let d = dets(
            100,
            100,
            &[
                ("cup", 0.9, [0.0, 0.0, 10.0, 10.0]),
                ("bottle", 0.9, [0.0, 0.0, 10.0, 10.0]),
                ("cup", 0.7, [0.0, 0.0, 10.0, 10.0]),
                ("book", 0.6, [0.0, 0.0, 10.0, 10.0]),
                ("cup", 0.3, [0.0, 0.0, 10.0, 10.0]),
            ],
        );
        let labels = label_summaries(&d);
        let got: Vec<(&str, f32, i32)> = labels
            .iter()
            .map(|l| (l.label.as_str(), l.max_score, l.count))
            .collect();
        assert_eq!(got, [("bottle", 0.9, 1), ("cup", 0.9, 3), ("book", 0.6, 1)]);
    }

    #[test]
    fn detection_records_keep_order_and_boxes() {
        let d = dets(
            200,
            100,
            &[
                ("cup", 0.9, [10.0, 20.0, 30.0, 40.0]),
                ("book", 0.5, [0.0, 0.0, 200.0, 100.0]),
            ],
        );
        let records = detection_records(&d);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].label, "cup");
        assert_eq!(records[0].label_id, 1);
        assert_eq!(
            records[0].box_px,
            BoxRecord {
                x_min: 10.0,
                y_min: 20.0,
                x_max: 30.0,
                y_max: 40.0
            }
        );
        assert_eq!(records[0].box_norm.x_max, 0.15);
        assert_eq!(records[1].label, "book");
    }

    #[test]
    fn aggregate_is_deterministic_and_respects_max_objects() {
        // A noisy photo-like image: gradients plus a pseudo-random pattern.
        let mut img = RgbImage::new(320, 240);
        let mut state = 12345u32;
        for (x, y, p) in img.enumerate_pixels_mut() {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (state >> 24) as u8 / 4;
            *p = Rgb([(x % 256) as u8 / 2 + noise, (y % 200) as u8 + noise / 2, 200 - noise]);
        }
        let boxes: Vec<(&str, f32, [f32; 4])> = (0..12)
            .map(|i| {
                (
                    "thing",
                    0.9 - i as f32 * 0.05,
                    [i as f32 * 10.0, 5.0, 150.0 + i as f32 * 10.0, 230.0],
                )
            })
            .collect();
        let d = dets(320, 240, &boxes);
        let cfg = ColourConfig::default();
        let a = aggregate(&img, &d, &cfg);
        let b = aggregate(&img, &d, &cfg);
        assert_eq!(a, b);
        assert_eq!(a.object_colours.len(), 10);
        assert!(a.object_colours.iter().all(|o| !o.colours.is_empty()));
        for o in &a.object_colours {
            let total: f32 = o.colours.iter().map(|c| c.fraction).sum();
            assert!(total <= 1.0 + 1e-6);
            assert!(o.colours.windows(2).all(|w| w[0].fraction >= w[1].fraction));
        }
        assert_eq!(a.labels.len(), 1);
        assert_eq!(a.labels[0].count, 12);
        assert!(a.main_object.is_some());
        // Serialized output identical too (what consumers diff).
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    }

    #[test]
    fn aggregate_rescales_boxes_to_the_image() {
        // Detections on a 400 × 320 image, colours taken from a half-size copy.
        let (img, b) = red_navy_image();
        let d = dets(400, 320, &[("bag", 0.9, b.map(|v| v * 2.0))]);
        let a = aggregate(&img, &d, &ColourConfig::default());
        let names: Vec<&str> = a.object_colours[0].colours.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"red") && names.contains(&"navy"));
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg = ColourConfig::default();
        assert_eq!((cfg.k, cfg.max_samples, cfg.max_objects), (3, 4096, 10));
        assert!(cfg.validate().is_ok());
        let bad = ColourConfig {
            box_margin: 0.5,
            ..ColourConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("box_margin"));
        let bad = ColourConfig { k: 0, ..cfg };
        assert!(bad.validate().unwrap_err().contains("k must"));
        // Unknown keys are rejected, missing ones take defaults.
        let partial: ColourConfig = serde_json::from_str(r#"{"k": 4}"#).unwrap();
        assert_eq!(
            partial,
            ColourConfig {
                k: 4,
                ..ColourConfig::default()
            }
        );
        assert!(serde_json::from_str::<ColourConfig>(r#"{"kk": 4}"#).is_err());
    }

    /// Rough timing in whatever profile the tests run in: `cargo test --release --lib
    /// attributes::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        let mut img = RgbImage::new(1024, 1024);
        let mut state = 1u32;
        for (x, y, p) in img.enumerate_pixels_mut() {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let n = (state >> 26) as u8;
            *p = Rgb([(x / 4) as u8 + n, (y / 4) as u8 + n, ((x + y) / 8) as u8 + n]);
        }
        let (photo, _) = red_navy_image();
        let cfg = ColourConfig::default();
        let b = [10.0, 10.0, 1000.0, 1000.0];
        // Best of several batches: the machine is shared.
        let best = |f: &dyn Fn()| {
            (0..10)
                .map(|_| {
                    let start = std::time::Instant::now();
                    for _ in 0..50 {
                        f();
                    }
                    start.elapsed() / 50
                })
                .min()
                .unwrap()
        };
        let noisy = best(&|| {
            std::hint::black_box(dominant_colours(&img, b, &cfg));
        });
        let sampling = best(&|| {
            std::hint::black_box(sample_box(&img, b, &cfg));
        });
        let two = best(&|| {
            std::hint::black_box(dominant_colours(&photo, [40.0, 30.0, 160.0, 130.0], &cfg));
        });
        println!("noisy box: {noisy:?} (sampling {sampling:?}); two-colour box {two:?}");
    }
}
