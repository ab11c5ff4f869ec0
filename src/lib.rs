//! SkinSAM Serve: Segment Anything models for skin-lesion segmentation on libtorch.

pub mod error;
pub mod image_io;
pub mod model;
pub mod predictor;
pub mod postprocess;

pub use error::{Error, Result};
pub mod parity;
pub mod device;
pub mod bench;
pub mod resize;
pub mod engine;
pub mod metrics;
pub mod settings;
pub mod grpc;
pub mod cli;
pub mod loadgen;
pub mod masks;
pub mod eval;
pub mod train;
#[cfg(test)]
mod test_support;
