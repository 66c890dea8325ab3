//! Image decoding with limits, EXIF orientation, and conversion to model input tensors.
//!
//! Every image entering attrstream goes through [`decode_image`]: it refuses empty input,
//! unknown formats and images whose declared size exceeds the pixel limit *before* pixels
//! are allocated (decompression bombs), and applies the EXIF orientation so boxes match
//! what a person sees.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use tch::{Device, Kind, Tensor};

/// Default pixel limit: 50 megapixels (a 8660 x 5773 photo), far above product photos.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

/// Why an image could not be used. The variants are stable reasons for dead letters.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Zero bytes.
    #[error("image is empty (0 bytes)")]
    Empty,
    /// Not a format we can decode.
    #[error("not a supported image (png, jpeg, webp, gif, bmp, tiff): {0}")]
    UnknownFormat(String),
    /// Declared dimensions exceed the pixel limit.
    #[error("image declares {width}x{height} = {pixels} pixels, above the limit of {limit} (raise max_pixels if this is intended)")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// width x height.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// Corrupt or truncated data.
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
}

impl ImageError {
    /// A short machine-readable reason (for dead letters and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::Empty => "empty_image",
            ImageError::UnknownFormat(_) => "unknown_format",
            ImageError::TooLarge { .. } => "image_too_large",
            ImageError::Corrupt(_) => "corrupt_image",
        }
    }
}

/// Decodes encoded image bytes into RGB, refusing more than `max_pixels` pixels.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    // The declared size is checked from the header alone, before any decoder allocates:
    // some decoders read up to the pixel data before reporting dimensions.
    if let Ok(size) = imagesize::blob_size(bytes) {
        check_pixels(size.width as u64, size.height as u64, max_pixels)?;
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::UnknownFormat("unrecognised file signature".to_string()));
    }
    // Second guard for formats imagesize does not know: the decoder's own allocation limit.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (width, height) = decoder.dimensions();
    check_pixels(u64::from(width), u64::from(height), max_pixels)?;
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder).map_err(classify)?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(image.to_rgb8())
}

/// Refuses images above the pixel limit and images with no pixels.
fn check_pixels(width: u64, height: u64, max_pixels: u64) -> Result<(), ImageError> {
    let pixels = width.saturating_mul(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            width: width.min(u32::MAX as u64) as u32,
            height: height.min(u32::MAX as u64) as u32,
            pixels,
            limit: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(ImageError::Corrupt(format!("image declares {width}x{height} pixels")));
    }
    Ok(())
}

fn classify(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(u) => ImageError::UnknownFormat(u.to_string()),
        image::ImageError::Limits(l) => ImageError::Corrupt(format!("decoding would exceed the memory limit: {l}")),
        other => ImageError::Corrupt(other.to_string()),
    }
}

/// `[3, H, W]` float tensor in `[0, 1]` on `device`, as torchvision's `to_tensor`.
pub fn to_tensor(image: &RgbImage, device: Device) -> Tensor {
    let (w, h) = image.dimensions();
    Tensor::from_slice(image.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .to_device(device)
        .to_kind(Kind::Float)
        / 255.0
}
