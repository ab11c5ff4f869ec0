//! Image decoding with limits checked before any pixel is decoded.

use crate::error::{invalid, Result};
use image::{ImageReader, RgbImage};
use std::io::Cursor;

/// Decodes encoded image bytes (PNG, JPEG, TIFF, BMP, WebP) to 8-bit RGB. Grayscale, alpha and
/// 16-bit images are converted (alpha dropped, 16-bit scaled to 8-bit). `field` names the
/// request field in errors; `max_pixels` bounds width x height, read from the header first.
pub fn decode_rgb(bytes: &[u8], field: &str, max_pixels: u64) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(invalid(field, "image bytes are empty"));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(field, format!("cannot read image: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(invalid(field, "not a recognised image format (expected PNG, JPEG, TIFF, BMP or WebP)"));
    };
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| invalid(field, format!("corrupt {format:?} header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(invalid(field, format!("image is {w}x{h}: zero-sized")));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(invalid(field, format!("image is {w}x{h} = {pixels} pixels, over the limit of {max_pixels}")));
    }
    if format == image::ImageFormat::Jpeg && !jpeg_has_end_marker(bytes) {
        // The JPEG decoder fills a cut-off scan with grey instead of failing: catch it here.
        return Err(invalid(field, "truncated JPEG image: no end-of-image marker after the last scan"));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Room for the largest decoded form (16-bit RGBA) of an image within the pixel limit.
    limits.max_alloc = Some(pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| invalid(field, format!("corrupt or truncated {format:?} image: {e}")))?;
    Ok(img.into_rgb8())
}

/// True when an EOI marker (FF D9) follows the last start-of-scan marker (FF DA). Both cannot
/// occur inside entropy-coded data, where 0xFF bytes are stuffed.
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        (None, Some(_)) => true,
        _ => false,
    }
}
