//! Strict checkpoint loading: official .pth (torch.save'd state_dict) and safetensors.

mod common;
use skinsam::model::{checkpoint, CheckpointError, Sam, SamVariant};
use std::collections::HashMap;
use tch::{Device, Tensor};

fn tiny_tensors() -> HashMap<String, Tensor> {
    let (sam, _) = Sam::load(SamVariant::Tiny, &common::tiny_checkpoint(), Device::Cpu).unwrap();
    sam.vs.variables()
}

fn write(dir: &tempfile::TempDir, name: &str, tensors: &HashMap<String, Tensor>) -> std::path::PathBuf {
    let path = dir.path().join(name);
    let v: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    Tensor::write_safetensors(&v, &path).unwrap();
    path
}

#[test]
fn official_pth_loads_with_every_key_and_a_checksum() {
    let (sam, ckpt) = Sam::load(SamVariant::Tiny, &common::tiny_checkpoint(), Device::Cpu).unwrap();
    assert_eq!(ckpt.num_tensors, sam.vs.variables().len());
    assert_eq!(ckpt.sha256.len(), 64);
    assert_eq!(ckpt.sha256, checkpoint::sha256_file(&common::tiny_checkpoint()).unwrap());
    // Key names are the official ones.
    let vars = sam.vs.variables();
    for key in [
        "image_encoder.blocks.0.attn.rel_pos_h",
        "image_encoder.neck.0.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
        "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
        "mask_decoder.iou_prediction_head.layers.0.weight",
    ] {
        assert!(vars.contains_key(key), "{key}");
    }
}

#[test]
fn fp16_safetensors_are_smaller_and_load_back_close() {
    let dir = tempfile::tempdir().unwrap();
    let (sam, _) = Sam::load(SamVariant::Tiny, &common::tiny_checkpoint(), Device::Cpu).unwrap();
    let (full, half) = (dir.path().join("f.safetensors"), dir.path().join("h.safetensors"));
    checkpoint::save_safetensors(&sam.vs, &full).unwrap();
    checkpoint::save_safetensors_as(&sam.vs, &half, tch::Kind::Half).unwrap();
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len() as f64;
    // The tiny model has many small tensors (kept fp32); a full-size model comes close to half.
    assert!(size(&half) < 0.7 * size(&full), "{} vs {}", size(&half), size(&full));
    let stored = Tensor::read_safetensors(&half).unwrap();
    let kind_of = |k: &str| stored.iter().find(|(n, _)| n == k).unwrap().1.kind();
    assert_eq!(kind_of("image_encoder.patch_embed.proj.weight"), tch::Kind::Half);
    assert_eq!(kind_of("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"), tch::Kind::Float, "small tensors stay fp32");
    let (again, _) = Sam::load(SamVariant::Tiny, &half, Device::Cpu).unwrap();
    let a = sam.vs.variables();
    for (k, t) in again.vs.variables() {
        assert_eq!(t.kind(), tch::Kind::Float, "{k} loads as fp32");
        let d = (&t - &a[&k]).abs().max().double_value(&[]);
        let m = a[&k].abs().max().double_value(&[]).max(1e-3);
        assert!(d <= m * 1e-3, "{k}: {d} vs max {m}");
    }
}

#[test]
fn safetensors_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (sam, _) = Sam::load(SamVariant::Tiny, &common::tiny_checkpoint(), Device::Cpu).unwrap();
    let out = dir.path().join("tiny.safetensors");
    checkpoint::save_safetensors(&sam.vs, &out).unwrap();
    assert!(!dir.path().join("tiny.safetensors.tmp").exists(), "temporary file renamed away");
    let (again, ckpt) = Sam::load(SamVariant::Tiny, &out, Device::Cpu).unwrap();
    assert_eq!(ckpt.format, checkpoint::CheckpointFormat::Safetensors);
    let a = sam.vs.variables();
    for (k, t) in again.vs.variables() {
        assert!(t.equal(&a[&k]), "{k} differs after round trip");
    }
}

#[test]
fn wrong_variant_is_named() {
    let err = Sam::load(SamVariant::VitB, &common::tiny_checkpoint(), Device::Cpu).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::WrongVariant { .. }), "{msg}");
    assert!(msg.contains("tiny") && msg.contains("vit_b"), "{msg}");
}

#[test]
fn missing_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny_tensors();
    t.remove("mask_decoder.iou_token.weight");
    let err = Sam::load(SamVariant::Tiny, &write(&dir, "m.safetensors", &t), Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("missing key mask_decoder.iou_token.weight"), "{err}");
}

#[test]
fn unexpected_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny_tensors();
    t.insert("mask_decoder.extra.weight".into(), Tensor::zeros([2], (tch::Kind::Float, Device::Cpu)));
    let err = Sam::load(SamVariant::Tiny, &write(&dir, "u.safetensors", &t), Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("unexpected key mask_decoder.extra.weight"), "{err}");
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny_tensors();
    t.insert("mask_decoder.iou_token.weight".into(), Tensor::zeros([1, 31], (tch::Kind::Float, Device::Cpu)));
    let err = Sam::load(SamVariant::Tiny, &write(&dir, "s.safetensors", &t), Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("mask_decoder.iou_token.weight has shape [1, 31], expected [1, 32]"), "{err}");
}

#[test]
fn corrupt_truncated_missing_and_unknown_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pth");
    std::fs::write(&garbage, b"this is not a zip file").unwrap();
    let e = Sam::load(SamVariant::Tiny, &garbage, Device::Cpu).err().unwrap();
    assert!(matches!(e, CheckpointError::Format { .. }), "{e}");

    let bytes = std::fs::read(common::tiny_checkpoint()).unwrap();
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Sam::load(SamVariant::Tiny, &truncated, Device::Cpu).is_err());

    let bad_st = dir.path().join("bad.safetensors");
    std::fs::write(&bad_st, b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson").unwrap();
    let e = Sam::load(SamVariant::Tiny, &bad_st, Device::Cpu).err().unwrap();
    assert!(matches!(e, CheckpointError::Format { .. }), "{e}");

    let e = Sam::load(SamVariant::Tiny, &dir.path().join("absent.pth"), Device::Cpu).err().unwrap();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");

    let e = Sam::load(SamVariant::Tiny, &dir.path().join("weights.onnx"), Device::Cpu).err().unwrap();
    assert!(matches!(e, CheckpointError::Extension { .. }), "{e}");
}

#[test]
fn a_failed_write_is_an_internal_error_not_the_requests_fault() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder/w.safetensors");
    let e = checkpoint::write_safetensors_atomic(&[("t", Tensor::zeros([2], (tch::Kind::Float, Device::Cpu)))], &missing, &missing.with_extension("tmp"))
        .unwrap_err();
    assert!(matches!(e, CheckpointError::Write { .. }), "{e}");
    assert!(!missing.exists());
    let status = skinsam::grpc::to_status(e.into());
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(!status.message().contains("no-such-folder"), "paths stay in the log: {status:?}");
}

#[test]
fn variants_have_the_official_sizes() {
    // Parameter counts of build_sam's models (sam-facts.md: 93.7 M, 312.3 M, 641.1 M).
    for (v, millions) in [(SamVariant::VitB, 93.7), (SamVariant::VitL, 312.3), (SamVariant::VitH, 641.1)] {
        let sam = tch::no_grad(|| Sam::new(v, Device::Cpu));
        let m = sam.num_parameters() as f64 / 1e6;
        assert!((m - millions).abs() < 0.1, "{v}: {m:.1} M parameters, expected {millions}");
    }
}
