//! Fuzz-style test of request conversion (seeded, bounded): arbitrary bytes decoded as request
//! messages, and arbitrary field values (NaN, huge, negative coordinates, out-of-range enums,
//! odd mask sizes) through conversion and the predictor. Every outcome must be Ok or a clear
//! InvalidArgument, never a panic.
//! The coverage-guided search is `scripts/fuzz.sh` (cargo-fuzz, fuzz/fuzz_targets/requests.rs),
//! a one-minute session of which `make test` runs; this seeded test keeps `cargo test` covering
//! the same ground without it.

mod common;
use prost::Message;
use skinsam::grpc::convert::{mask_format, precision_from_pb, prompt_from_pb, tensor_format_from_pb, variant_from_pb};
use skinsam::grpc::pb;
use skinsam::Error;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn coord(&mut self) -> f32 {
        match self.below(8) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => -1e30,
            3 => 1e30,
            4 => -(self.below(100) as f32),
            _ => (self.below(700) as f32) - 50.0 + 0.25,
        }
    }
    fn enum_value(&mut self) -> i32 {
        match self.below(4) {
            0 => -1 - self.below(5) as i32,
            1 => 100 + self.below(5) as i32,
            _ => self.below(5) as i32,
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic_the_decoders() {
    let mut rng = Rng(0x5eed);
    for _ in 0..20_000 {
        let len = rng.below(200) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Ok(r) = pb::SegmentRequest::decode(bytes.as_slice()) {
            for (i, p) in r.prompts.iter().enumerate() {
                let _ = prompt_from_pb(p, &format!("prompts[{i}]"));
            }
            let _ = mask_format(r.mask_format, "mask_format");
        }
        if let Ok(r) = pb::EmbedRequest::decode(bytes.as_slice()) {
            let _ = tensor_format_from_pb(r.return_embedding, "return_embedding");
        }
        if let Ok(r) = pb::LoadModelRequest::decode(bytes.as_slice()) {
            let _ = variant_from_pb(r.variant, "variant");
            let _ = precision_from_pb(r.precision, "precision");
        }
    }
}

#[test]
fn arbitrary_prompts_get_ok_or_invalid_argument() {
    let predictor = common::tiny_predictor();
    let img = image::RgbImage::from_pixel(120, 90, image::Rgb([150, 90, 70]));
    let emb = predictor.set_image(&img).unwrap();
    let mut rng = Rng(42);
    let (mut ok, mut invalid) = (0, 0);
    for _ in 0..400 {
        let n_points = rng.below(4) as usize;
        let p = pb::Prompt {
            points: (0..n_points).map(|_| pb::Point { x: rng.coord(), y: rng.coord(), label: rng.enum_value() }).collect(),
            r#box: (rng.below(2) == 0).then(|| pb::Box { x0: rng.coord(), y0: rng.coord(), x1: rng.coord(), y1: rng.coord() }),
            mask_input: match rng.below(6) {
                0 => vec![0.5; 256 * 256],
                1 => vec![f32::NAN; 256 * 256],
                2 => vec![1.0; rng.below(1000) as usize + 1],
                _ => vec![],
            },
        };
        let result = prompt_from_pb(&p, "prompts[0]").and_then(|prompt| predictor.predict(&emb, &[prompt], rng.below(2) == 0));
        match result {
            Ok(r) => {
                assert_eq!(r.len(), 1);
                assert_eq!(&r[0].masks.size()[1..], &[90, 120]);
                ok += 1;
            }
            Err(Error::InvalidArgument { field, .. }) => {
                assert!(field.starts_with("prompts[0]"), "{field}");
                invalid += 1;
            }
            Err(e) => panic!("unexpected error {e:?} for {p:?}"),
        }
    }
    assert!(ok > 20 && invalid > 20, "ok {ok}, invalid {invalid}");
}
