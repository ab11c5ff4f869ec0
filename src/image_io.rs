//! Image decoding with limits checked before any pixel is decoded.

use crate::error::{invalid, Result};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;

/// Decodes encoded image bytes (PNG, JPEG, TIFF, BMP, WebP) to 8-bit RGB, turned as its EXIF
/// orientation says (as viewers show it, so that prompts drawn on it land where they were
/// drawn). Grayscale, alpha and 16-bit images are converted (alpha dropped, 16-bit scaled to
/// 8-bit). `field` names the request field in errors; `max_pixels` bounds width x height, read
/// from the header first.
pub fn decode_rgb(bytes: &[u8], field: &str, max_pixels: u64) -> Result<RgbImage> {
    Ok(decode_oriented(bytes, field, max_pixels)?.into_rgb8())
}

/// Decodes an image as [`decode_rgb`] does, keeping its pixel type (masks are read with it).
pub fn decode_oriented(bytes: &[u8], field: &str, max_pixels: u64) -> Result<DynamicImage> {
    guarded(field, || decode_unguarded(bytes, field, max_pixels))
}

/// A decoder that panics on crafted bytes fails that image, not the thread decoding it: a model's
/// thread counts the requests that panic, and a few in a row mark the model failed for everyone.
fn guarded<T>(field: &str, decode: impl FnOnce() -> Result<T> + std::panic::UnwindSafe) -> Result<T> {
    std::panic::catch_unwind(decode).unwrap_or_else(|_| Err(invalid(field, "the image decoder failed on these bytes (a corrupt or malformed image)")))
}

fn decode_unguarded(bytes: &[u8], field: &str, max_pixels: u64) -> Result<DynamicImage> {
    let (format, w, h) = header(bytes, field, max_pixels)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Room for the largest decoded form (16-bit RGBA) of an image within the pixel limit.
    let max_alloc = (u64::from(w) * u64::from(h)).saturating_mul(8).max(1 << 20);
    limits.max_alloc = Some(max_alloc);
    reader.limits(limits);
    let corrupt = |e: image::ImageError| invalid(field, format!("corrupt or truncated {format:?} image: {e}"));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    // Unreadable EXIF is no reason to refuse the pixels: they are taken as stored.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    if decoder.total_bytes() > max_alloc {
        return Err(invalid(field, format!("image decodes to {} bytes, over the limit of {max_alloc}", decoder.total_bytes())));
    }
    let jpeg = if format == ImageFormat::Jpeg { decode_jpeg(bytes, field, (w, h)) } else { None };
    let mut img = match jpeg {
        Some(img) => img?,
        None => DynamicImage::from_decoder(decoder).map_err(corrupt)?,
    };
    img.apply_orientation(orientation);
    Ok(img)
}

/// A JPEG decoded by libjpeg-turbo's decoder (in mozjpeg's build of it), the decoder Pillow uses,
/// so that the pixels the model sees are those the official pipeline sees: the image crate's own
/// JPEG decoder rounds differently (up to 3 levels on about 10% of the values of a
/// chroma-subsampled HAM10000 file). Grayscale stays one channel; YCbCr and RGB become RGB.
/// None for the colour spaces Pillow converts differently (CMYK, YCCK): the image crate decodes
/// those. `checked` is the (width, height) that [`header`] read and checked against the pixel
/// limit: libjpeg parses the header again, and crafted bytes can make the two parsers read
/// different frames (a restart marker before the frame has no length for libjpeg and one for
/// the image crate), so a frame of another size is refused before any pixel is allocated.
fn decode_jpeg(bytes: &[u8], field: &str, checked: (u32, u32)) -> Option<Result<DynamicImage>> {
    use mozjpeg::{ColorSpace, Decompress, NO_MARKERS};
    let decode = || -> std::io::Result<Option<DynamicImage>> {
        let jpeg = Decompress::with_markers(NO_MARKERS).from_mem(bytes)?;
        if (jpeg.width() as u64, jpeg.height() as u64) != (u64::from(checked.0), u64::from(checked.1)) {
            let msg = format!("the frame header reads {}x{} to libjpeg but {}x{} to the header check", jpeg.width(), jpeg.height(), checked.0, checked.1);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, msg));
        }
        let gray = match jpeg.color_space() {
            ColorSpace::JCS_GRAYSCALE => true,
            ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => false,
            _ => return Ok(None),
        };
        let mut started = if gray { jpeg.grayscale()? } else { jpeg.rgb()? };
        let (w, h) = (started.width() as u32, started.height() as u32);
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        let short = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "fewer rows than the header says");
        Ok(Some(if gray {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, pixels).ok_or_else(short)?)
        } else {
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, pixels).ok_or_else(short)?)
        }))
    };
    // libjpeg's fatal errors unwind (mozjpeg's error manager) with the message as the payload.
    let result = match std::panic::catch_unwind(decode) {
        Ok(Ok(Some(img))) => Ok(img),
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(payload.downcast::<String>().map_or_else(|_| "libjpeg failed".to_owned(), |s| *s)),
    };
    Some(result.map_err(|e| invalid(field, format!("corrupt or truncated JPEG image: {e}"))))
}

/// (width, height) of the image as [`decode_rgb`] returns it (its header's, swapped when its
/// EXIF orientation turns it a quarter), with the same checks, without decoding the pixels.
pub fn oriented_size(bytes: &[u8], field: &str, max_pixels: u64) -> Result<(u32, u32)> {
    guarded(field, || oriented_size_unguarded(bytes, field, max_pixels))
}

fn oriented_size_unguarded(bytes: &[u8], field: &str, max_pixels: u64) -> Result<(u32, u32)> {
    let (format, w, h) = header(bytes, field, max_pixels)?;
    let orientation = ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .and_then(|mut d| d.orientation())
        .unwrap_or(Orientation::NoTransforms);
    let quarter = matches!(orientation, Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH);
    Ok(if quarter { (h, w) } else { (w, h) })
}

/// The format and stored size from the header: refused when empty, unrecognised, zero-sized,
/// over `max_pixels`, or a JPEG cut off before its end.
fn header(bytes: &[u8], field: &str, max_pixels: u64) -> Result<(ImageFormat, u32, u32)> {
    if bytes.is_empty() {
        return Err(invalid(field, "image bytes are empty"));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(field, format!("cannot read image: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(invalid(field, "not a recognised image format (expected PNG, JPEG, TIFF, BMP or WebP)"));
    };
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Tiff | ImageFormat::Bmp | ImageFormat::WebP) {
        return Err(invalid(field, format!("{format:?} images are not supported (expected PNG, JPEG, TIFF, BMP or WebP)")));
    }
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| invalid(field, format!("corrupt {format:?} header: {e}")))?;
    if w == 0 || h == 0 {
        // Some decoders panic on a zero side (the BMP one does): refused before any decoding.
        return Err(invalid(field, format!("image is {w}x{h}: zero-sized")));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(invalid(field, format!("image is {w}x{h} = {pixels} pixels, over the limit of {max_pixels}")));
    }
    if format == ImageFormat::Jpeg {
        let data = jpeg_scan_data(bytes);
        if !jpeg_has_end_marker(data) {
            // The JPEG decoder fills a cut-off scan with grey instead of failing: catch it here.
            return Err(invalid(field, "truncated JPEG image: no end-of-image marker after the first scan"));
        }
        let scans = jpeg_scans(data);
        if scans > MAX_JPEG_SCANS {
            return Err(invalid(field, format!("JPEG image has {scans} scans, over the limit of {MAX_JPEG_SCANS} (each scan is another pass over the image)")));
        }
    }
    Ok((format, w, h))
}

/// Most scans a JPEG may have. A progressive JPEG can hold thousands of tiny scans, each of which
/// makes libjpeg pass over the whole image again (the "JPEG bomb" that libjpeg-turbo's scan limit
/// guards against): a small file, minutes of decoding. Encoders write 1-3 scans for a baseline
/// image and about 10 for a progressive one.
pub const MAX_JPEG_SCANS: usize = 100;

/// The offset of the first start-of-scan marker (FF DA), found by walking the header's segments
/// (an FF DA in an EXIF thumbnail does not count).
fn jpeg_first_scan(bytes: &[u8]) -> Option<usize> {
    let mut i = 2; // after SOI
    loop {
        // Fill bytes (any number of FF) may precede a marker.
        while i < bytes.len() && bytes[i] == 0xFF && bytes.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        match (bytes.get(i), bytes.get(i + 1)) {
            (Some(0xFF), Some(0xDA)) => return Some(i),
            // Markers without a length: TEM and RSTn.
            (Some(0xFF), Some(m)) if *m == 0x01 || (0xD0..=0xD7).contains(m) => i += 2,
            (Some(0xFF), Some(_)) => match (bytes.get(i + 2), bytes.get(i + 3)) {
                (Some(&hi), Some(&lo)) => i += 2 + usize::from(u16::from_be_bytes([hi, lo])),
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// The bytes from the first start-of-scan marker on (empty without one): what
/// [`jpeg_has_end_marker`] and [`jpeg_scans`] read, found by one walk.
fn jpeg_scan_data(bytes: &[u8]) -> &[u8] {
    jpeg_first_scan(bytes).map_or(&[], |sos| &bytes[sos..])
}

/// True when an EOI marker (FF D9) follows the first start-of-scan marker (an FF DA in trailing
/// bytes after a complete image does not count); `data` is [`jpeg_scan_data`]'s. Neither marker
/// occurs inside entropy-coded data, where 0xFF bytes are stuffed.
fn jpeg_has_end_marker(data: &[u8]) -> bool {
    data.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Start-of-scan markers in [`jpeg_scan_data`]'s `data` (entropy-coded data cannot hold one; a
/// table segment between scans could, by chance, which only counts a scan too many).
fn jpeg_scans(data: &[u8]) -> usize {
    data.windows(2).filter(|w| *w == [0xFF, 0xDA]).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    /// The JPEG with an EXIF APP1 segment (little-endian TIFF, one Orientation entry) after SOI.
    fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = b"II*\0".to_vec();
        tiff.extend(8u32.to_le_bytes()); // first IFD
        tiff.extend(1u16.to_le_bytes()); // one entry
        tiff.extend(0x0112u16.to_le_bytes()); // Orientation
        tiff.extend(3u16.to_le_bytes()); // SHORT
        tiff.extend(1u32.to_le_bytes());
        tiff.extend(orientation.to_le_bytes());
        tiff.extend([0, 0]);
        tiff.extend(0u32.to_le_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend([0xFF, 0xE1]);
        out.extend(((app1.len() + 2) as u16).to_be_bytes());
        out.extend(app1);
        out.extend(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_turns_the_image_as_viewers_show_it() {
        let plain = jpeg(40, 24);
        let stored = decode_rgb(&plain, "image", u64::MAX).unwrap();
        // 6: the stored frame is shown turned 90 degrees clockwise.
        let turned = with_orientation(&plain, 6);
        assert_eq!(oriented_size(&turned, "image", u64::MAX).unwrap(), (24, 40));
        let img = decode_rgb(&turned, "image", u64::MAX).unwrap();
        assert_eq!(img.dimensions(), (24, 40));
        assert_eq!(img, image::imageops::rotate90(&stored));
        // 1 and 3 keep the size; 3 is a half turn.
        assert_eq!(oriented_size(&with_orientation(&plain, 1), "image", u64::MAX).unwrap(), (40, 24));
        assert_eq!(decode_rgb(&with_orientation(&plain, 3), "image", u64::MAX).unwrap(), image::imageops::rotate180(&stored));
    }

    #[test]
    fn a_fatal_libjpeg_error_is_a_clear_error() {
        // The first component's quantisation table set to one never defined: the image crate
        // reads the header, libjpeg stops with a fatal error, which unwinds to here.
        let mut j = std::fs::read("tests/fixtures/images/ISIC_0024306.jpg").unwrap();
        let sof = j.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        j[sof + 12] = 3;
        match decode_rgb(&j, "image", u64::MAX).unwrap_err() {
            crate::Error::InvalidArgument { field, message } => {
                assert_eq!(field, "image");
                assert!(message.contains("corrupt or truncated JPEG image: libjpeg fatal error: Quantization table 0x03"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_jpeg_whose_frame_differs_from_the_checked_header_is_refused() {
        // As if crafted bytes had shown the header check a smaller frame than libjpeg decodes.
        let j = jpeg(40, 24);
        assert!(decode_jpeg(&j, "image", (40, 24)).unwrap().is_ok());
        let Some(Err(crate::Error::InvalidArgument { field, message })) = decode_jpeg(&j, "image", (16, 16)) else { panic!("not refused") };
        assert_eq!(field, "image");
        assert!(message.contains("reads 40x24 to libjpeg but 16x16"), "{message}");
    }

    /// Bytes crafted so that the header check and libjpeg read different frames: a restart
    /// marker right after SOI has a length for the image crate (which then skips to a 16x16
    /// frame hidden in a comment) and none for libjpeg (which reads a 4000x4000 frame). Without
    /// the size check in `decode_jpeg` this decoded 16 M pixels past a 65,536-pixel limit.
    #[test]
    fn a_jpeg_crafted_to_show_the_header_check_a_smaller_frame_is_refused() {
        let small = jpeg(16, 16);
        let sof = small.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let sof_len = usize::from(u16::from_be_bytes([small[sof + 2], small[sof + 3]])) + 2;
        let hidden = &small[sof..sof + sof_len];
        let mut big = hidden.to_vec();
        big[5..9].copy_from_slice(&[0x0F, 0xA0, 0x0F, 0xA0]); // height, width 4000
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xD0];
        j.extend(&big);
        // The image crate reads FF C0 as the restart marker's length: it resumes 0xFFC0 bytes
        // after the length's first byte (index 4), where the hidden frame starts.
        let resume = 4 + 0xFFC0;
        let com_data = resume + hidden.len() - (j.len() + 4);
        j.extend([0xFF, 0xFE]);
        j.extend(((com_data + 2) as u16).to_be_bytes());
        j.resize(resume, 0);
        j.extend(hidden);
        j.extend(&small[2..sof]); // the tables before the frame (APP0, DQT)
        j.extend(&small[sof + sof_len..]); // the rest: tables, scan, EOI
        let limit = 1 << 16;
        assert_eq!(oriented_size(&j, "image", limit).unwrap(), (16, 16), "the header check sees the small frame");
        match decode_rgb(&j, "image", limit) {
            Err(crate::Error::InvalidArgument { message, .. }) => assert!(message.contains("4000x4000 to libjpeg but 16x16"), "{message}"),
            other => panic!("not refused: {:?}", other.map(|i| i.dimensions())),
        }
    }

    #[test]
    fn a_jpeg_with_more_scans_than_the_limit_is_refused_before_decoding() {
        // The shipped progressive fixture, as an encoder writes one, decodes.
        let progressive = std::fs::read("tests/fixtures/images/jpeg/progressive.jpg").unwrap();
        let n = jpeg_scans(jpeg_scan_data(&progressive));
        assert!(n > 3 && n <= MAX_JPEG_SCANS, "{n} scans");
        assert!(decode_rgb(&progressive, "image", u64::MAX).is_ok());
        // The same image with its last scan repeated past the limit, as a "JPEG bomb" would.
        let last = progressive.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        let eoi = progressive.len() - 2;
        let mut bomb = progressive[..eoi].to_vec();
        for _ in 0..MAX_JPEG_SCANS + 1 - n {
            bomb.extend(&progressive[last..eoi]);
        }
        bomb.extend([0xFF, 0xD9]);
        assert_eq!(jpeg_scans(jpeg_scan_data(&bomb)), MAX_JPEG_SCANS + 1);
        match decode_rgb(&bomb, "image", u64::MAX) {
            Err(crate::Error::InvalidArgument { field, message }) => {
                assert_eq!(field, "image");
                assert!(message.contains("101 scans, over the limit of 100"), "{message}");
            }
            other => panic!("not refused: {:?}", other.map(|i| i.dimensions())),
        }
        // One scan fewer is within the limit: the repeated scans decode (libjpeg only warns).
        let mut within = progressive[..eoi].to_vec();
        for _ in 0..MAX_JPEG_SCANS - n {
            within.extend(&progressive[last..eoi]);
        }
        within.extend([0xFF, 0xD9]);
        assert_eq!(jpeg_scans(jpeg_scan_data(&within)), MAX_JPEG_SCANS);
        let decoded = decode_rgb(&within, "image", u64::MAX);
        assert!(decoded.is_ok(), "{:?}", decoded.err());
    }

    #[test]
    fn a_complete_jpeg_with_trailing_bytes_is_not_taken_for_a_truncated_one() {
        let mut j = jpeg(16, 16);
        assert!(jpeg_has_end_marker(jpeg_scan_data(&j)));
        // Trailing bytes that hold a start-of-scan marker but no end marker after it.
        j.extend([0x00, 0xFF, 0xDA, 0x12]);
        assert!(jpeg_has_end_marker(jpeg_scan_data(&j)));
        assert!(decode_rgb(&j, "image", u64::MAX).is_ok());
        // Cut inside the scan: refused.
        let j = jpeg(16, 16);
        assert!(!jpeg_has_end_marker(jpeg_scan_data(&j[..j.len() - 10])));
    }
}
