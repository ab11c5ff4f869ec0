#![allow(dead_code)]
use skinsam::model::{Sam, SamVariant};
use skinsam::predictor::Predictor;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_checkpoint() -> PathBuf {
    fixtures().join("golden/sam_tiny.pth")
}

pub fn tiny_predictor() -> Predictor {
    let (sam, _) = Sam::load(SamVariant::Tiny, &tiny_checkpoint(), tch::Device::Cpu).expect("tiny checkpoint loads");
    Predictor::new(sam)
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).expect("fixture image")
}
