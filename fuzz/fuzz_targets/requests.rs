//! Request conversion under arbitrary input. The first byte picks what the rest is:
//! - 0-4: the wire bytes of a request message (Segment, Embed, LoadModel, Evaluate, Train),
//!   decoded by prost and converted as the handlers do; an inline image is decoded too;
//! - 5: a prompt built field by field (any f32 bit pattern, any label, any mask-input length)
//!   checked against an image geometry, as the predictor does before decoding;
//! - 6: prompt-simulation parameters and a mask, validated, then a box and point drawn.
//!
//! A conversion may refuse its input, but only with INVALID_ARGUMENT naming a field; what it
//! accepts must be usable (finite prompts inside the model's input frame, boxes inside the image).
#![no_main]

use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use skinsam::engine::Source;
use skinsam::eval::dataset::BinaryMask;
use skinsam::eval::prompts::{draw, SimParams};
use skinsam::grpc::convert::{precision_from_pb, prompt_from_pb, segment_request_from_pb, tensor_format_from_pb, variant_from_pb};
use skinsam::grpc::evaluation::request_from_pb;
use skinsam::grpc::pb;
use skinsam::grpc::training::recipe_from_pb;
use skinsam::image_io::decode_rgb;
use skinsam::predictor::{preprocess_shape, validate_prompt, PointPrompt, Prompt};
use skinsam::Error;

/// Small enough that a decode stays fast, large enough for real fixtures.
const MAX_PIXELS: u64 = 1 << 16;
/// vit_*'s input side and low-res mask side, and the default model's.
const GEOMETRIES: [(i64, i64); 2] = [(1024, 256), (256, 64)];

/// An error must be a clear INVALID_ARGUMENT that names its field.
fn refused<T>(r: skinsam::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(Error::InvalidArgument { field, message }) => {
            assert!(!field.is_empty() && !message.is_empty(), "an error without a field or message");
            None
        }
        Err(e) => panic!("conversion gave {e:?}, not INVALID_ARGUMENT"),
    }
}

fn image(bytes: &[u8]) {
    if let Some(img) = refused(decode_rgb(bytes, "image", MAX_PIXELS)) {
        assert!(u64::from(img.width()) * u64::from(img.height()) <= MAX_PIXELS && img.width() > 0 && img.height() > 0);
    }
}

/// Checks a converted prompt against every geometry, for an image of `h` x `w`.
fn check_prompt(p: &Prompt, h: i64, w: i64) {
    for (side, low_res) in GEOMETRIES {
        let input = preprocess_shape(h, w, side);
        let Some((q, _clipped)) = refused(validate_prompt(p, "prompts[0]", (h, w), input, low_res)) else { continue };
        let inside = |x: f32, y: f32| x.is_finite() && y.is_finite() && (0.0..=input.1 as f32).contains(&x) && (0.0..=input.0 as f32).contains(&y);
        assert!(q.points.iter().all(|pt| inside(pt.x, pt.y)), "{q:?} leaves the {input:?} input frame");
        if let Some(b) = q.bbox {
            assert!(inside(b[0], b[1]) && inside(b[2], b[3]) && b[0] <= b[2] && b[1] <= b[3], "{b:?} leaves the {input:?} input frame");
        }
        if let Some(m) = &q.mask_input {
            assert_eq!(m.len() as i64, low_res * low_res);
        }
    }
}

fn check_draw(params: &SimParams, mask: &BinaryMask, seed: u64) {
    let (bbox, point) = draw(mask, params, &mut skinsam::eval::prompts::image_rng(seed, "fuzz"));
    let (w, h) = (mask.width as f32, mask.height as f32);
    if let Some(b) = bbox {
        assert!(b.iter().all(|v| v.is_finite()) && b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= w - 1.0 && b[3] <= h - 1.0, "{b:?} outside {w}x{h}");
    }
    if let Some([x, y]) = point {
        let i = y as usize * mask.width as usize + x as usize;
        assert_eq!(mask.data[i], 1, "the point ({x}, {y}) is not on the mask");
    }
}

fn small_mask(u: &mut Unstructured) -> AResult<BinaryMask> {
    let (width, height) = (u.int_in_range(1..=40u32)?, u.int_in_range(1..=40u32)?);
    let data = (0..width * height).map(|_| u.arbitrary::<bool>().map(u8::from)).collect::<AResult<Vec<u8>>>()?;
    Ok(BinaryMask { width, height, data })
}

fn structured_prompt(u: &mut Unstructured) -> AResult<()> {
    let h = u.int_in_range(1..=8192i64)?;
    let w = u.int_in_range(1..=8192i64)?;
    let points = (0..u.int_in_range(0..=3usize)?)
        .map(|_| Ok(PointPrompt { x: f32::from_bits(u.arbitrary()?), y: f32::from_bits(u.arbitrary()?), label: u.int_in_range(-3..=3i64)? }))
        .collect::<AResult<Vec<_>>>()?;
    let mut coord = || u.arbitrary::<u32>().map(f32::from_bits);
    let bbox = [coord()?, coord()?, coord()?, coord()?];
    let bbox = u.arbitrary::<bool>()?.then_some(bbox);
    let mask_input = match u.int_in_range(0..=3u8)? {
        0 => None,
        1 => Some(vec![f32::from_bits(u.arbitrary()?); 256 * 256]),
        2 => Some(vec![0.5; 64 * 64]),
        _ => Some(vec![1.0; u.int_in_range(1..=300usize)?]),
    };
    check_prompt(&Prompt { points, bbox, mask_input }, h, w);
    Ok(())
}

fn structured_sim(u: &mut Unstructured) -> AResult<()> {
    let params = SimParams {
        margin: f32::from_bits(u.arbitrary()?),
        max_shift: f32::from_bits(u.arbitrary()?),
        max_scale: f32::from_bits(u.arbitrary()?),
        reference_width: u.int_in_range(0..=2000u32)?,
    };
    let mask = small_mask(u)?;
    if refused(params.validate("prompts")).is_some() {
        check_draw(&params, &mask, u.arbitrary()?);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let toy_mask = BinaryMask { width: 7, height: 5, data: (0..35).map(|i| u8::from(i % 3 == 0)).collect() };
    match kind % 7 {
        0 => {
            let Ok(r) = pb::SegmentRequest::decode(rest) else { return };
            if let Some((source, prompts, _)) = refused(segment_request_from_pb(&r)) {
                assert_eq!(prompts.len(), r.prompts.len());
                if let Source::Image(bytes) = source {
                    image(&bytes);
                }
                for p in &prompts {
                    check_prompt(p, 450, 600);
                    check_prompt(p, 1, 1);
                }
            }
        }
        1 => {
            let Ok(r) = pb::EmbedRequest::decode(rest) else { return };
            let _ = refused(tensor_format_from_pb(r.return_embedding, "return_embedding"));
            image(&r.image);
        }
        2 => {
            let Ok(r) = pb::LoadModelRequest::decode(rest) else { return };
            let _ = refused(variant_from_pb(r.variant, "variant"));
            let _ = refused(precision_from_pb(r.precision, "precision"));
        }
        3 => {
            let Ok(r) = pb::EvaluateRequest::decode(rest) else { return };
            let settings = r.settings.unwrap_or_default();
            if let Some(req) = refused(request_from_pb(&settings, MAX_PIXELS)) {
                if refused(req.params.validate("settings.prompts")).is_some() {
                    check_draw(&req.params, &toy_mask, req.seed);
                }
            }
        }
        4 => {
            let Ok(r) = pb::TrainRequest::decode(rest) else { return };
            if let Some(recipe) = refused(recipe_from_pb(&r.recipe.unwrap_or_default())) {
                check_draw(&recipe.params, &toy_mask, recipe.prompt_seed);
            }
        }
        5 => {
            let _ = structured_prompt(&mut Unstructured::new(rest));
        }
        _ => {
            let _ = structured_sim(&mut Unstructured::new(rest));
        }
    }
    // Prompts as the proto gives them, whatever the message around them.
    if let Ok(p) = pb::Prompt::decode(rest) {
        if let Some(p) = refused(prompt_from_pb(&p, "prompts[0]")) {
            check_prompt(&p, 150, 200);
        }
    }
});
