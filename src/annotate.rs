//! Draws detections onto an image: a coloured box per detection and a label tag with the
//! class name and score, in a built-in 8x8 bitmap font (no font files to ship).

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_hollow_rect_mut};
use imageproc::rect::Rect;

use crate::detection::Detection;

/// A palette of distinct, readable colours, picked by class id.
const PALETTE: [[u8; 3]; 10] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [0, 128, 128],
    [170, 110, 40],
];

/// Returns a copy of `image` with every detection drawn on it.
pub fn annotate(image: &RgbImage, detections: &[Detection]) -> RgbImage {
    let mut out = image.clone();
    let (w, h) = out.dimensions();
    // Scale line width and text with the image so tags stay legible on large photos.
    let scale = ((w.max(h) as f32 / 640.0).round() as u32).clamp(1, 4);
    let colour_of = |d: &Detection| Rgb(PALETTE[d.label_id.unsigned_abs() as usize % PALETTE.len()]);
    for d in detections {
        let [x1, y1, x2, y2] = d.box_px.map(|v| v.round() as i32);
        for t in 0..(2 * scale as i32) {
            let (bw, bh) = ((x2 - x1 - 2 * t).max(1) as u32, (y2 - y1 - 2 * t).max(1) as u32);
            draw_hollow_rect_mut(&mut out, Rect::at(x1 + t, y1 + t).of_size(bw, bh), colour_of(d));
        }
    }
    // Tags after all boxes, lowest score first, so the most confident tag ends up on top.
    for d in detections.iter().rev() {
        let [x1, y1, _, _] = d.box_px.map(|v| v.round() as i32);
        let text = format!("{} {:.2}", d.label, d.score);
        let glyph = 8 * scale;
        let tag_w = glyph * text.chars().count() as u32 + 2 * scale;
        let tag_h = glyph + 2 * scale;
        let tag_y = if y1 >= tag_h as i32 { y1 - tag_h as i32 } else { y1 };
        draw_filled_rect_mut(&mut out, Rect::at(x1, tag_y).of_size(tag_w, tag_h), colour_of(d));
        draw_text(
            &mut out,
            x1 + scale as i32,
            tag_y + scale as i32,
            scale,
            &text,
            Rgb([0, 0, 0]),
        );
    }
    out
}

/// Renders `text` with the 8x8 font at `scale` pixels per font pixel, clipped to the image.
fn draw_text(image: &mut RgbImage, x: i32, y: i32, scale: u32, text: &str, colour: Rgb<u8>) {
    let (w, h) = (image.width() as i32, image.height() as i32);
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0u8; 8]);
        let gx = x + (i as i32) * 8 * scale as i32;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale as i32 {
                    for dx in 0..scale as i32 {
                        let px = gx + col * scale as i32 + dx;
                        let py = y + row as i32 * scale as i32 + dy;
                        if (0..w).contains(&px) && (0..h).contains(&py) {
                            image.put_pixel(px as u32, py as u32, colour);
                        }
                    }
                }
            }
        }
    }
}
