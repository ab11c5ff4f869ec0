//! Bad input gets a clear error naming the field, never a panic.

mod common;
use image::{ImageEncoder, Rgb, RgbImage};
use skinsam::image_io::decode_rgb;
use skinsam::predictor::{PointPrompt, Prompt};
use skinsam::Error;

fn png(img: image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn field_of(e: Error) -> (String, String) {
    match e {
        Error::InvalidArgument { field, message } => (field, message),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn empty_corrupt_and_truncated_images() {
    let (f, m) = field_of(decode_rgb(&[], "image", 1 << 30).unwrap_err());
    assert_eq!(f, "image");
    assert!(m.contains("empty"), "{m}");

    let (_, m) = field_of(decode_rgb(b"definitely not an image", "image", 1 << 30).unwrap_err());
    assert!(m.contains("not a recognised image format"), "{m}");
    // A format the image crate recognises but this server does not decode: named as such.
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
    let (_, m) = field_of(decode_rgb(gif, "image", 1 << 30).unwrap_err());
    assert!(m.contains("Gif images are not supported"), "{m}");

    let jpeg = common::fixture_bytes("ISIC_0024306.jpg");
    let (_, m) = field_of(decode_rgb(&jpeg[..jpeg.len() / 3], "image", 1 << 30).unwrap_err());
    assert!(m.contains("truncated"), "{m}");
    assert!(decode_rgb(&jpeg, "image", 1 << 30).is_ok());
    let png_bytes = common::fixture_bytes("ISIC_0024306.png");
    let (_, m) = field_of(decode_rgb(&png_bytes[..png_bytes.len() / 2], "image", 1 << 30).unwrap_err());
    assert!(m.contains("corrupt") || m.contains("truncated"), "{m}");
}

#[test]
fn zero_sized_image_is_rejected() {
    // A PNG header claiming 0x0 pixels (crafted: encoders refuse to write one).
    let mut bytes = png(image::DynamicImage::ImageRgb8(RgbImage::new(1, 1)));
    bytes[16..24].copy_from_slice(&[0; 8]);
    let (f, _) = field_of(decode_rgb(&bytes, "requests[0].image", 1 << 30).unwrap_err());
    assert_eq!(f, "requests[0].image");
}

#[test]
fn pixel_limit_is_checked_before_decoding() {
    let bytes = png(image::DynamicImage::ImageRgb8(RgbImage::new(300, 200)));
    let (_, m) = field_of(decode_rgb(&bytes, "image", 50_000).unwrap_err());
    assert!(m.contains("300x200") && m.contains("limit"), "{m}");
    assert!(decode_rgb(&bytes, "image", 60_000).is_ok());
}

#[test]
fn gray_rgba_and_16_bit_images_are_converted() {
    let gray = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(5, 4, image::Luma([200])));
    let rgb = decode_rgb(&png(gray), "image", 1 << 30).unwrap();
    assert_eq!((rgb.width(), rgb.height()), (5, 4));
    assert_eq!(rgb.get_pixel(2, 2), &Rgb([200, 200, 200]));

    let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(3, 3, image::Rgba([10, 20, 30, 0])));
    assert_eq!(decode_rgb(&png(rgba), "image", 1 << 30).unwrap().get_pixel(0, 0), &Rgb([10, 20, 30]));

    let mut out = Vec::new();
    let px: Vec<u8> = [65535u16, 0, 32896].iter().flat_map(|v| v.to_be_bytes()).collect();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&px, 1, 1, image::ExtendedColorType::Rgb16)
        .unwrap();
    assert_eq!(decode_rgb(&out, "image", 1 << 30).unwrap().get_pixel(0, 0), &Rgb([255, 0, 128]));
}

fn predict_err(prompt: Prompt) -> (String, String) {
    let p = common::tiny_predictor();
    let img = RgbImage::from_pixel(40, 30, Rgb([120, 80, 60]));
    let emb = p.set_image(&img).unwrap();
    let ok = Prompt { bbox: Some([1.0, 1.0, 20.0, 20.0]), ..Default::default() };
    field_of(p.predict(&emb, &[ok, prompt], true).err().expect("error"))
}

#[test]
fn non_finite_coordinates_are_rejected() {
    let (f, m) = predict_err(Prompt { points: vec![PointPrompt { x: f32::NAN, y: 3.0, label: 1 }], ..Default::default() });
    assert_eq!(f, "prompts[1].points[0]");
    assert!(m.contains("not finite"), "{m}");
    let (f, _) = predict_err(Prompt { bbox: Some([0.0, 0.0, f32::INFINITY, 4.0]), ..Default::default() });
    assert_eq!(f, "prompts[1].box");
}

#[test]
fn inverted_box_is_rejected() {
    let (f, m) = predict_err(Prompt { bbox: Some([20.0, 5.0, 10.0, 25.0]), ..Default::default() });
    assert_eq!(f, "prompts[1].box");
    assert!(m.contains("x1 < x0"), "{m}");
}

#[test]
fn unknown_point_label_is_rejected() {
    let (f, m) = predict_err(Prompt { points: vec![PointPrompt { x: 3.0, y: 3.0, label: 2 }], ..Default::default() });
    assert_eq!(f, "prompts[1].points[0].label");
    assert!(m.contains('2'), "{m}");
}

#[test]
fn wrong_mask_input_size_is_rejected() {
    let (f, m) = predict_err(Prompt { mask_input: Some(vec![0.0; 10]), ..Default::default() });
    assert_eq!(f, "prompts[1].mask_input");
    assert!(m.contains("256x256"), "{m}");
}

#[test]
fn prompts_outside_the_image_are_clipped_and_reported() {
    let p = common::tiny_predictor();
    let img = RgbImage::from_pixel(40, 30, Rgb([120, 80, 60]));
    let emb = p.set_image(&img).unwrap();
    let inside = Prompt { bbox: Some([0.0, 0.0, 40.0, 30.0]), ..Default::default() };
    let outside = Prompt { bbox: Some([-15.0, -5.0, 90.0, 31.0]), ..Default::default() };
    let r = p.predict(&emb, &[inside, outside], false).unwrap();
    assert!(!r[0].clipped);
    assert!(r[1].clipped);
    // Clipped to the image bounds, the two boxes are the same prompt.
    assert!(r[0].low_res_logits.equal(&r[1].low_res_logits));
    assert_eq!(r[1].masks.size(), vec![1, 30, 40]);
}
