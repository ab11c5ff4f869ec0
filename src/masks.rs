//! Mask encodings for responses: single-channel PNG and COCO-style uncompressed RLE.

use crate::error::{Error, Result};
use image::ImageEncoder;

/// 0/1 row-major mask -> 8-bit grey PNG with 0 and 255.
pub fn to_png(mask: &[u8], height: u32, width: u32) -> Result<Vec<u8>> {
    let px: Vec<u8> = mask.iter().map(|&v| if v != 0 { 255 } else { 0 }).collect();
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(&mut out, image::codecs::png::CompressionType::Fast, image::codecs::png::FilterType::NoFilter)
        .write_image(&px, width, height, image::ExtendedColorType::L8)
        .map_err(|e| Error::Internal(format!("PNG encoding: {e}")))?;
    Ok(out)
}

/// COCO uncompressed RLE: column-major (Fortran order) run lengths, starting with zeros.
pub fn to_rle(mask: &[u8], height: usize, width: usize) -> Vec<u32> {
    let mut counts = Vec::new();
    let mut current = 0u8;
    let mut run = 0u32;
    for x in 0..width {
        for y in 0..height {
            let v = u8::from(mask[y * width + x] != 0);
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

/// Inverse of [`to_rle`] (for clients and tests).
pub fn from_rle(counts: &[u32], height: usize, width: usize) -> Vec<u8> {
    if height == 0 || width == 0 {
        return Vec::new();
    }
    let mut mask = vec![0u8; height * width];
    let (mut i, mut v) = (0usize, 0u8);
    for &c in counts {
        for _ in 0..c {
            let (x, y) = (i / height, i % height);
            if x < width {
                mask[y * width + x] = v;
            }
            i += 1;
        }
        v ^= 1;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_is_column_major_and_starts_with_zeros() {
        // 2x3 (rows: 0 1 0 / 0 1 1).
        let mask = [0, 1, 0, 0, 1, 1];
        // Column-major: 0 0 | 1 1 | 0 1.
        assert_eq!(to_rle(&mask, 2, 3), vec![2, 2, 1, 1]);
        assert_eq!(from_rle(&to_rle(&mask, 2, 3), 2, 3), mask.to_vec());
        assert_eq!(to_rle(&[1, 1], 1, 2), vec![0, 2]);
    }

    #[test]
    fn png_round_trips() {
        let mask = [0, 1, 1, 0, 0, 1];
        let png = to_png(&mask, 2, 3).unwrap();
        let img = image::load_from_memory(&png).unwrap().into_luma8();
        assert_eq!(img.as_raw(), &vec![0, 255, 255, 0, 0, 255]);
    }
}
