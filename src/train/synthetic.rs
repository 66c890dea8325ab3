//! A seeded synthetic labelled data set that looks enough like product photos to prove the
//! fine-tuning path end to end without downloading anything: a few simple coloured objects
//! with colour and texture variation on varied backgrounds, with exact, tight boxes.
//!
//! * Classes ([`CLASSES`]): `red_circle`, `blue_square`, `green_triangle`, `yellow_star`.
//!   Each object's colour is jittered around its class colour, and it is filled flat, shaded
//!   or striped; squares, triangles and stars are rotated, circles may be slightly elliptic.
//! * Backgrounds: linear gradients, smooth value noise, stripes and checkers, in muted colours,
//!   plus a little per-pixel noise over the whole image.
//! * 1–3 non-overlapping objects per image, each between `min_object` and `max_object` pixels
//!   across. Boxes are computed from the painted pixels (no anti-aliasing), so they are tight:
//!   `x1, y1` is the top-left edge of the first painted pixel, `x2, y2` the bottom-right edge of
//!   the last one (COCO `bbox` = `[x1, y1, x2 - x1, y2 - y1]`).
//! * Products: consecutive images are grouped into products of 1..=`max_images_per_product`
//!   photos, with ids `synth-s<seed>-p<n>` (the seed is part of the id so data sets made with
//!   different seeds never share a product).
//!
//! Everything comes from one seed through SplitMix64 (a fixed, documented generator, not a
//! library RNG whose stream may change between versions), so a seed names the same data set
//! on every machine and version. [`write_coco`] writes it as a COCO folder
//! (`annotations.json` + `images/*.png`) that `attrstream publish-labels` imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::{Rgb, RgbImage};
use serde::Serialize;

/// The class names, in COCO category order (category id = index + 1).
pub const CLASSES: [&str; 4] = ["red_circle", "blue_square", "green_triangle", "yellow_star"];

/// Name of the annotation file [`write_coco`] writes into the output folder.
pub const ANNOTATIONS_FILE: &str = "annotations.json";

/// Name of the image sub-folder [`write_coco`] writes (COCO `file_name`s are relative to it).
pub const IMAGES_DIR: &str = "images";

/// The field of each COCO image entry that holds its product id (for `publish-labels
/// --product-id-field`).
pub const PRODUCT_ID_FIELD: &str = "product_id";

/// What to generate. [`SynthConfig::new`] gives the defaults (160×160 images, objects
/// 24–80 px, 1–3 objects, up to 3 photos per product).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SynthConfig {
    /// Number of images.
    pub images: usize,
    /// Seed of every random choice; the same seed gives the same data set.
    pub seed: u64,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Smallest object extent (the side of the square the shape is drawn in), pixels.
    pub min_object: u32,
    /// Largest object extent, pixels (at most the image's shorter side).
    pub max_object: u32,
    /// Most objects per image (at least one is always placed).
    pub max_objects: usize,
    /// Most photos of one product; product sizes are drawn from 1..=this.
    pub max_images_per_product: usize,
}

impl SynthConfig {
    /// The defaults for `images` images from `seed`.
    pub fn new(images: usize, seed: u64) -> Self {
        Self {
            images,
            seed,
            width: 160,
            height: 160,
            min_object: 24,
            max_object: 80,
            max_objects: 3,
            max_images_per_product: 3,
        }
    }

    /// Checks the settings, naming the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.width >= 16 && self.height >= 16,
            "image size must be at least 16x16 pixels"
        );
        ensure!(
            u64::from(self.width) * u64::from(self.height) <= 64_000_000,
            "image size {}x{} is too large for a synthetic data set (at most 64 megapixels)",
            self.width,
            self.height
        );
        ensure!(self.min_object >= 4, "min object size must be at least 4 pixels");
        ensure!(
            self.min_object <= self.max_object,
            "min object size {} is larger than max object size {}",
            self.min_object,
            self.max_object
        );
        ensure!(
            self.max_object <= self.width.min(self.height),
            "max object size {} does not fit into {}x{} images",
            self.max_object,
            self.width,
            self.height
        );
        ensure!(self.max_objects >= 1, "max objects per image must be at least 1");
        ensure!(
            self.max_images_per_product >= 1,
            "max images per product must be at least 1"
        );
        Ok(())
    }
}

/// One generated object: its class and tight box.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthObject {
    /// Index into [`CLASSES`].
    pub class: usize,
    /// Tight box in pixels `[x1, y1, x2, y2]` (edges of the painted pixels).
    pub bbox: [u32; 4],
    /// Number of painted pixels (COCO `area`).
    pub area: u32,
}

impl SynthObject {
    /// The class name.
    pub fn label(&self) -> &'static str {
        CLASSES[self.class]
    }
}

/// One generated image with its objects.
#[derive(Debug, Clone)]
pub struct SynthImage {
    /// Position in the data set (0-based); also the file name's number.
    pub index: usize,
    /// The product this photo belongs to (several consecutive images share one).
    pub product_id: String,
    /// The pixels.
    pub image: RgbImage,
    /// The objects painted onto it, in painting order (they never overlap).
    pub objects: Vec<SynthObject>,
}

impl SynthImage {
    /// The PNG file name inside [`IMAGES_DIR`].
    pub fn file_name(&self) -> String {
        format!("{:06}.png", self.index)
    }
}

/// What [`write_coco`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthSummary {
    /// The output folder.
    pub out: PathBuf,
    /// The annotation file.
    pub annotations: PathBuf,
    /// Images written.
    pub images: usize,
    /// Boxes written.
    pub boxes: usize,
    /// Distinct products.
    pub products: usize,
    /// Boxes per class name.
    pub per_class: BTreeMap<String, usize>,
}

/// The images of the data set, generated lazily one by one (each from its own seeded stream,
/// so image `i` does not depend on how many images are asked for).
pub fn generate(config: &SynthConfig) -> Result<impl Iterator<Item = SynthImage> + '_> {
    config.validate()?;
    let products = product_plan(config);
    Ok((0..config.images).map(move |index| render(config, index, &products[index])))
}

/// The product id of every image: consecutive runs of 1..=max_images_per_product images.
fn product_plan(config: &SynthConfig) -> Vec<String> {
    let mut rng = Rng::new(config.seed, u64::MAX);
    let mut ids = Vec::with_capacity(config.images);
    let mut product = 0usize;
    while ids.len() < config.images {
        let run = rng.range(1, config.max_images_per_product as u32) as usize;
        let id = format!("synth-s{}-p{product:05}", config.seed);
        ids.extend(std::iter::repeat_n(id, run.min(config.images - ids.len())));
        product += 1;
    }
    ids
}

/// Writes the data set as a COCO folder: `out/annotations.json` and `out/images/NNNNNN.png`.
/// Refuses to overwrite an existing `annotations.json` unless `force` is set.
pub fn write_coco(config: &SynthConfig, out: &Path, force: bool) -> Result<SynthSummary> {
    config.validate()?;
    let annotations_path = out.join(ANNOTATIONS_FILE);
    ensure!(
        force || !annotations_path.exists(),
        "{} already exists: choose an empty folder, or pass --force to overwrite",
        annotations_path.display()
    );
    let images_dir = out.join(IMAGES_DIR);
    std::fs::create_dir_all(&images_dir).with_context(|| format!("cannot create {}", images_dir.display()))?;

    let mut images = Vec::with_capacity(config.images);
    let mut annotations = Vec::new();
    let mut per_class: BTreeMap<String, usize> = CLASSES.iter().map(|c| (c.to_string(), 0)).collect();
    let mut products = BTreeSet::new();
    for synth in generate(config)? {
        let path = images_dir.join(synth.file_name());
        synth
            .image
            .save_with_format(&path, image::ImageFormat::Png)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let image_id = synth.index + 1;
        images.push(serde_json::json!({
            "id": image_id,
            "file_name": synth.file_name(),
            "width": synth.image.width(),
            "height": synth.image.height(),
            PRODUCT_ID_FIELD: synth.product_id,
        }));
        for o in &synth.objects {
            let [x1, y1, x2, y2] = o.bbox;
            annotations.push(serde_json::json!({
                "id": annotations.len() + 1,
                "image_id": image_id,
                "category_id": o.class + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": o.area,
                "iscrowd": 0,
            }));
            *per_class.entry(o.label().to_string()).or_default() += 1;
        }
        products.insert(synth.product_id);
    }
    let categories: Vec<_> = CLASSES
        .iter()
        .enumerate()
        .map(|(i, name)| serde_json::json!({"id": i + 1, "name": name, "supercategory": "shape"}))
        .collect();
    let boxes = annotations.len();
    let coco = serde_json::json!({
        "info": {
            "description": "attrstream synthetic shapes (attrstream synth-labels)",
            "version": "1",
            "seed": config.seed,
            "config": config,
        },
        "licenses": [],
        "categories": categories,
        "images": images,
        "annotations": annotations,
    });
    let text = serde_json::to_vec_pretty(&coco).context("serializing the COCO annotations")?;
    std::fs::write(&annotations_path, text).with_context(|| format!("cannot write {}", annotations_path.display()))?;
    Ok(SynthSummary {
        out: out.to_path_buf(),
        annotations: annotations_path,
        images: config.images,
        boxes,
        products: products.len(),
        per_class,
    })
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

fn render(config: &SynthConfig, index: usize, product_id: &str) -> SynthImage {
    let mut rng = Rng::new(config.seed, index as u64);
    let (w, h) = (config.width, config.height);
    let mut image = background(&mut rng, w, h);
    let count = rng.range(1, config.max_objects as u32) as usize;
    let mut objects: Vec<SynthObject> = Vec::with_capacity(count);
    'objects: for _ in 0..count {
        for _attempt in 0..50 {
            let shape = Shape::random(&mut rng, config);
            let Some(mask) = shape.mask(w, h) else { continue };
            // Two pixels of background between objects keep every box tight and unoccluded.
            let clear = objects.iter().all(|o| {
                mask.bbox[0] >= o.bbox[2] + 2
                    || o.bbox[0] >= mask.bbox[2] + 2
                    || mask.bbox[1] >= o.bbox[3] + 2
                    || o.bbox[1] >= mask.bbox[3] + 2
            });
            if !clear {
                continue;
            }
            paint(&mut image, &mask, &shape, &mut rng);
            objects.push(SynthObject {
                class: shape.class,
                bbox: mask.bbox,
                area: mask.area,
            });
            continue 'objects;
        }
        break;
    }
    sensor_noise(&mut image, &mut rng);
    SynthImage {
        index,
        product_id: product_id.to_string(),
        image,
        objects,
    }
}

/// An object to draw: class, centre, extent, rotation and colour.
struct Shape {
    class: usize,
    cx: f32,
    cy: f32,
    /// Half the extent (the radius of the shape's bounding circle for rotated shapes).
    radius: f32,
    /// Circle only: vertical radius factor (slight ellipse).
    aspect: f32,
    angle: f32,
    colour: [f32; 3],
}

/// The painted pixels of a shape.
struct Mask {
    /// Row-major `w * h` coverage.
    inside: Vec<bool>,
    bbox: [u32; 4],
    area: u32,
}

impl Shape {
    fn random(rng: &mut Rng, config: &SynthConfig) -> Shape {
        let class = rng.range(0, CLASSES.len() as u32 - 1) as usize;
        let extent = rng.range(config.min_object, config.max_object) as f32;
        let radius = extent / 2.0;
        let cx = radius + rng.unit() * (config.width as f32 - extent);
        let cy = radius + rng.unit() * (config.height as f32 - extent);
        let base: [f32; 3] = match class {
            0 => [225.0, 30.0, 30.0],
            1 => [30.0, 75.0, 215.0],
            2 => [35.0, 185.0, 45.0],
            _ => [240.0, 215.0, 25.0],
        };
        let brightness = 0.8 + 0.35 * rng.unit();
        let colour = base.map(|c| (c * brightness + rng.signed() * 25.0).clamp(0.0, 255.0));
        Shape {
            class,
            cx,
            cy,
            radius,
            aspect: 0.85 + 0.15 * rng.unit(),
            angle: rng.unit() * std::f32::consts::TAU,
            colour,
        }
    }

    /// Whether the pixel centre `(x, y)` is inside the shape.
    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (s, c) = (-self.angle).sin_cos();
        let (rx, ry) = (dx * c - dy * s, dx * s + dy * c);
        let r = self.radius;
        match self.class {
            0 => (dx / r).powi(2) + (dy / (r * self.aspect)).powi(2) <= 1.0,
            1 => {
                // A rotated square whose corners touch the bounding circle.
                let half = r / std::f32::consts::SQRT_2;
                rx.abs() <= half && ry.abs() <= half
            }
            2 => inside_polygon(rx, ry, &regular_polygon(3, r, r)),
            _ => inside_polygon(rx, ry, &regular_polygon(5, r, r * 0.45)),
        }
    }

    fn mask(&self, w: u32, h: u32) -> Option<Mask> {
        let mut inside = vec![false; (w * h) as usize];
        let (mut x1, mut y1, mut x2, mut y2, mut area) = (u32::MAX, u32::MAX, 0, 0, 0u32);
        let lo_x = (self.cx - self.radius - 1.0).floor().max(0.0) as u32;
        let hi_x = ((self.cx + self.radius + 1.0).ceil() as u32).min(w);
        let lo_y = (self.cy - self.radius - 1.0).floor().max(0.0) as u32;
        let hi_y = ((self.cy + self.radius + 1.0).ceil() as u32).min(h);
        for y in lo_y..hi_y {
            for x in lo_x..hi_x {
                if self.contains(x as f32 + 0.5, y as f32 + 0.5) {
                    inside[(y * w + x) as usize] = true;
                    x1 = x1.min(x);
                    y1 = y1.min(y);
                    x2 = x2.max(x + 1);
                    y2 = y2.max(y + 1);
                    area += 1;
                }
            }
        }
        (area > 0).then_some(Mask {
            inside,
            bbox: [x1, y1, x2, y2],
            area,
        })
    }
}

/// Vertices of a regular polygon (`points` outer vertices, alternating with inner ones when
/// `inner < outer`: a star), the first pointing up.
fn regular_polygon(points: usize, outer: f32, inner: f32) -> Vec<(f32, f32)> {
    let star = inner < outer;
    let n = if star { points * 2 } else { points };
    (0..n)
        .map(|i| {
            let r = if star && i % 2 == 1 { inner } else { outer };
            let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::TAU / n as f32;
            (r * a.cos(), r * a.sin())
        })
        .collect()
}

/// Even-odd ray casting.
fn inside_polygon(x: f32, y: f32, vertices: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = vertices.len() - 1;
    for i in 0..vertices.len() {
        let (xi, yi) = vertices[i];
        let (xj, yj) = vertices[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Fills the mask flat, shaded along a direction, or with darker stripes.
fn paint(image: &mut RgbImage, mask: &Mask, shape: &Shape, rng: &mut Rng) {
    let texture = rng.range(0, 2);
    let (s, c) = (rng.unit() * std::f32::consts::TAU).sin_cos();
    let period = rng.range(4, 9) as f32;
    let w = image.width();
    let [x1, y1, x2, y2] = mask.bbox;
    for y in y1..y2 {
        for x in x1..x2 {
            if !mask.inside[(y * w + x) as usize] {
                continue;
            }
            let (dx, dy) = (x as f32 - shape.cx, y as f32 - shape.cy);
            let along = (dx * c + dy * s) / shape.radius;
            let factor = match texture {
                0 => 1.0,
                1 => 1.0 + 0.25 * along,
                _ => {
                    if (dx * c + dy * s).rem_euclid(period) < period / 2.0 {
                        0.7
                    } else {
                        1.0
                    }
                }
            };
            image.put_pixel(x, y, Rgb(shape.colour.map(|v| (v * factor).clamp(0.0, 255.0) as u8)));
        }
    }
}

/// A muted random colour: a grey level with a little tint.
fn muted(rng: &mut Rng) -> [f32; 3] {
    let grey = 40.0 + rng.unit() * 180.0;
    [0, 1, 2].map(|_| (grey + rng.signed() * 40.0).clamp(0.0, 255.0))
}

fn background(rng: &mut Rng, w: u32, h: u32) -> RgbImage {
    let (a, b) = (muted(rng), muted(rng));
    let (s, c) = (rng.unit() * std::f32::consts::TAU).sin_cos();
    let lerp = |t: f32| Rgb([0, 1, 2].map(|i| (a[i] + (b[i] - a[i]) * t.clamp(0.0, 1.0)) as u8));
    match rng.range(0, 3) {
        // Linear gradient.
        0 => {
            let span = (w as f32 * c.abs() + h as f32 * s.abs()).max(1.0);
            let offset = (w as f32 * c).min(0.0) + (h as f32 * s).min(0.0);
            RgbImage::from_fn(w, h, |x, y| lerp((x as f32 * c + y as f32 * s - offset) / span))
        }
        // Smooth value noise: random values on a coarse grid, bilinearly interpolated.
        1 => {
            let cell = rng.range(8, 32) as f32;
            let (gw, gh) = ((w as f32 / cell) as usize + 2, (h as f32 / cell) as usize + 2);
            let grid: Vec<f32> = (0..gw * gh).map(|_| rng.unit()).collect();
            RgbImage::from_fn(w, h, |x, y| {
                let (fx, fy) = (x as f32 / cell, y as f32 / cell);
                let (ix, iy) = (fx as usize, fy as usize);
                let (tx, ty) = (fx - ix as f32, fy - iy as f32);
                let g = |i: usize, j: usize| grid[j * gw + i];
                let top = g(ix, iy) * (1.0 - tx) + g(ix + 1, iy) * tx;
                let bottom = g(ix, iy + 1) * (1.0 - tx) + g(ix + 1, iy + 1) * tx;
                lerp(top * (1.0 - ty) + bottom * ty)
            })
        }
        // Stripes at an angle.
        2 => {
            let period = rng.range(6, 20) as f32;
            RgbImage::from_fn(w, h, |x, y| {
                let t = (x as f32 * c + y as f32 * s).rem_euclid(period) / period;
                lerp(if t < 0.5 { 0.0 } else { 1.0 })
            })
        }
        // Checkers.
        _ => {
            let cell = rng.range(8, 24);
            RgbImage::from_fn(w, h, |x, y| lerp(((x / cell + y / cell) % 2) as f32))
        }
    }
}

/// ±6 levels of uniform noise on every channel of every pixel.
fn sensor_noise(image: &mut RgbImage, rng: &mut Rng) {
    for p in image.pixels_mut() {
        for v in &mut p.0 {
            let n = (rng.next_u64() % 13) as i16 - 6;
            *v = (i16::from(*v) + n).clamp(0, 255) as u8;
        }
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny generator with a fixed, documented
/// output stream, seeded per image from `(seed, stream)`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }

    /// Uniform integer in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next_u64() % u64::from(hi - lo + 1)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(images: usize, seed: u64) -> SynthConfig {
        SynthConfig::new(images, seed)
    }

    #[test]
    fn the_same_seed_gives_the_same_images() {
        let a: Vec<_> = generate(&small(6, 7)).unwrap().collect();
        let b: Vec<_> = generate(&small(6, 7)).unwrap().collect();
        let c: Vec<_> = generate(&small(6, 8)).unwrap().collect();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.image, y.image);
            assert_eq!(x.objects, y.objects);
            assert_eq!(x.product_id, y.product_id);
        }
        assert!(a.iter().zip(&c).any(|(x, y)| x.image != y.image));
        // Image i does not depend on how many images were asked for.
        let longer: Vec<_> = generate(&small(9, 7)).unwrap().collect();
        assert_eq!(longer[5].image, a[5].image);
    }

    #[test]
    fn boxes_are_tight_around_the_painted_pixels_and_in_range() {
        let config = small(40, 3);
        let mut seen = BTreeSet::new();
        for synth in generate(&config).unwrap() {
            assert!((1..=3).contains(&synth.objects.len()));
            for o in &synth.objects {
                let shape_pixels = o.area;
                let [x1, y1, x2, y2] = o.bbox;
                assert!(x1 < x2 && y1 < y2 && x2 <= config.width && y2 <= config.height);
                let (w, h) = (x2 - x1, y2 - y1);
                assert!(
                    w.max(h) <= config.max_object && w.max(h) >= config.min_object / 2,
                    "{o:?}"
                );
                assert!(shape_pixels <= w * h && shape_pixels * 4 >= w * h, "{o:?}");
                seen.insert(o.class);
            }
            // Boxes do not overlap.
            for (i, a) in synth.objects.iter().enumerate() {
                for b in &synth.objects[i + 1..] {
                    let overlap = a.bbox[0] < b.bbox[2]
                        && b.bbox[0] < a.bbox[2]
                        && a.bbox[1] < b.bbox[3]
                        && b.bbox[1] < a.bbox[3];
                    assert!(!overlap, "{a:?} {b:?}");
                }
            }
        }
        assert_eq!(seen.len(), CLASSES.len(), "every class appears in 40 images");
    }

    #[test]
    fn every_box_edge_touches_a_painted_pixel() {
        // Tightness on the mask itself: the first and last row and column of each box hold a
        // painted pixel, and the mask's pixel count is the area.
        let config = small(10, 11);
        let mut rng = Rng::new(1, 1);
        for _ in 0..200 {
            let shape = Shape::random(&mut rng, &config);
            let mask = shape.mask(config.width, config.height).unwrap();
            let [x1, y1, x2, y2] = mask.bbox;
            let at = |x: u32, y: u32| mask.inside[(y * config.width + x) as usize];
            assert!((y1..y2).any(|y| at(x1, y)) && (y1..y2).any(|y| at(x2 - 1, y)));
            assert!((x1..x2).any(|x| at(x, y1)) && (x1..x2).any(|x| at(x, y2 - 1)));
            let count = (0..config.height)
                .flat_map(|y| (0..config.width).map(move |x| (x, y)))
                .filter(|&(x, y)| at(x, y))
                .count();
            assert_eq!(count as u32, mask.area);
        }
    }

    #[test]
    fn several_images_share_a_product() {
        let images: Vec<_> = generate(&small(30, 5)).unwrap().collect();
        let products: BTreeSet<_> = images.iter().map(|i| i.product_id.clone()).collect();
        assert!(
            products.len() < images.len() && products.len() >= 10,
            "{}",
            products.len()
        );
        assert!(products.iter().all(|p| p.starts_with("synth-s5-p")));
    }

    #[test]
    fn coco_folder_lists_every_image_and_box() {
        let dir = tempfile::tempdir().unwrap();
        let config = small(5, 1);
        let summary = write_coco(&config, dir.path(), false).unwrap();
        let coco: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(ANNOTATIONS_FILE)).unwrap()).unwrap();
        assert_eq!(coco["images"].as_array().unwrap().len(), 5);
        assert_eq!(coco["annotations"].as_array().unwrap().len(), summary.boxes);
        assert_eq!(summary.per_class.values().sum::<usize>(), summary.boxes);
        for image in coco["images"].as_array().unwrap() {
            let path = dir.path().join(IMAGES_DIR).join(image["file_name"].as_str().unwrap());
            let decoded = image::open(&path).unwrap().to_rgb8();
            assert_eq!(decoded.width(), 160);
        }
        let again = write_coco(&config, dir.path(), false).unwrap_err();
        assert!(again.to_string().contains("--force"), "{again}");
        write_coco(&config, dir.path(), true).unwrap();
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let mut c = small(1, 1);
        c.max_object = 200;
        assert!(c.validate().unwrap_err().to_string().contains("does not fit"));
        let mut c = small(1, 1);
        c.min_object = 90;
        assert!(c.validate().unwrap_err().to_string().contains("larger than"));
    }
}
