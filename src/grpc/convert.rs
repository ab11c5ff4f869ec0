//! Proto messages <-> engine types, with validation that names the offending field.

use super::pb;
use crate::engine::{EmbeddingFormat, MaskEncoding, ModelInfo, ModelState, Source};
use crate::error::{invalid, Result};
use crate::model::{Precision, SamVariant};
use crate::predictor::{PointPrompt, Prompt};

pub fn variant_from_pb(v: i32, field: &str) -> Result<SamVariant> {
    match pb::Variant::try_from(v) {
        Ok(pb::Variant::VitB) => Ok(SamVariant::VitB),
        Ok(pb::Variant::VitL) => Ok(SamVariant::VitL),
        Ok(pb::Variant::VitH) => Ok(SamVariant::VitH),
        Ok(pb::Variant::Tiny) => Ok(SamVariant::Tiny),
        Ok(pb::Variant::SkinsamTiny) => Ok(SamVariant::SkinsamTiny),
        Ok(pb::Variant::Unspecified) => Err(invalid(field, "VARIANT_UNSPECIFIED: name the SAM variant")),
        Err(_) => Err(invalid(field, format!("{v} is not a Variant value"))),
    }
}

pub fn variant_to_pb(v: SamVariant) -> pb::Variant {
    match v {
        SamVariant::VitB => pb::Variant::VitB,
        SamVariant::VitL => pb::Variant::VitL,
        SamVariant::VitH => pb::Variant::VitH,
        SamVariant::Tiny => pb::Variant::Tiny,
        SamVariant::SkinsamTiny => pb::Variant::SkinsamTiny,
    }
}

pub fn precision_from_pb(p: i32, field: &str) -> Result<Precision> {
    match pb::Precision::try_from(p) {
        Ok(pb::Precision::Unspecified | pb::Precision::Fp32) => Ok(Precision::Fp32),
        Ok(pb::Precision::Bf16) => Ok(Precision::Bf16),
        Ok(pb::Precision::Fp16) => Ok(Precision::Fp16),
        Err(_) => Err(invalid(field, format!("{p} is not a Precision value"))),
    }
}

pub fn precision_to_pb(p: Precision) -> pb::Precision {
    match p {
        Precision::Fp32 => pb::Precision::Fp32,
        Precision::Bf16 => pb::Precision::Bf16,
        Precision::Fp16 => pb::Precision::Fp16,
    }
}

pub fn model_info_to_pb(i: &ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        id: i.id.clone(),
        variant: variant_to_pb(i.variant) as i32,
        checkpoint: i.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        checkpoint_sha256: i.checkpoint_sha256.clone().unwrap_or_default(),
        device: i.device.clone(),
        precision: precision_to_pb(i.precision) as i32,
        state: match i.state {
            ModelState::Loading => pb::ModelState::Loading,
            ModelState::Ready => pb::ModelState::Ready,
            ModelState::Failed => pb::ModelState::Failed,
        } as i32,
        error: i.error.clone().unwrap_or_default(),
        num_parameters: i.num_parameters,
        image_size: i.image_size as i32,
        decoders: i.decoders as u32,
    }
}

pub fn tensor_format_from_pb(f: i32, field: &str) -> Result<EmbeddingFormat> {
    match pb::TensorFormat::try_from(f) {
        Ok(pb::TensorFormat::Unspecified) => Ok(EmbeddingFormat::None),
        Ok(pb::TensorFormat::Fp32) => Ok(EmbeddingFormat::Fp32),
        Ok(pb::TensorFormat::Fp16) => Ok(EmbeddingFormat::Fp16),
        Err(_) => Err(invalid(field, format!("{f} is not a TensorFormat value"))),
    }
}

pub fn prompt_from_pb(p: &pb::Prompt, field: &str) -> Result<Prompt> {
    let mut points = Vec::with_capacity(p.points.len());
    for (j, pt) in p.points.iter().enumerate() {
        let label = match pb::PointLabel::try_from(pt.label) {
            Ok(pb::PointLabel::Foreground) => 1,
            Ok(pb::PointLabel::Background) => 0,
            Ok(pb::PointLabel::Unspecified) => {
                return Err(invalid(format!("{field}.points[{j}].label"), "POINT_LABEL_UNSPECIFIED: say FOREGROUND or BACKGROUND"))
            }
            Err(_) => return Err(invalid(format!("{field}.points[{j}].label"), format!("{} is not a PointLabel value", pt.label))),
        };
        points.push(PointPrompt { x: pt.x, y: pt.y, label });
    }
    Ok(Prompt {
        points,
        bbox: p.r#box.as_ref().map(|b| [b.x0, b.y0, b.x1, b.y1]),
        mask_input: (!p.mask_input.is_empty()).then(|| p.mask_input.clone()),
    })
}

pub fn mask_format(f: i32, field: &str) -> Result<(bool, bool)> {
    match pb::MaskFormat::try_from(f) {
        Ok(pb::MaskFormat::Unspecified | pb::MaskFormat::Png) => Ok((true, false)),
        Ok(pb::MaskFormat::Rle) => Ok((false, true)),
        Ok(pb::MaskFormat::PngAndRle) => Ok((true, true)),
        Err(_) => Err(invalid(field, format!("{f} is not a MaskFormat value"))),
    }
}

/// A SegmentRequest's parts, checked: where the image comes from, the prompts, the mask encodings.
/// Longest `request_id` echoed back: every response (each chunk of a streamed embedding too)
/// repeats it, so an unbounded one could push responses over the message limit.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

pub fn check_request_id(id: &str) -> Result<()> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(invalid("request_id", format!("{} bytes, the limit is {MAX_REQUEST_ID_BYTES}", id.len())));
    }
    Ok(())
}

pub fn segment_request_from_pb(r: &pb::SegmentRequest) -> Result<(Source, Vec<Prompt>, MaskEncoding)> {
    if r.model_id.is_empty() {
        return Err(invalid("model_id", "is empty"));
    }
    check_request_id(&r.request_id)?;
    let source = match &r.source {
        Some(pb::segment_request::Source::EmbeddingHandle(h)) => Source::Handle(h.clone()),
        Some(pb::segment_request::Source::Image(b)) => Source::Image(b.clone()),
        None => return Err(invalid("source", "set embedding_handle or image")),
    };
    let prompts = r.prompts.iter().enumerate().map(|(i, p)| prompt_from_pb(p, &format!("prompts[{i}]"))).collect::<Result<Vec<_>>>()?;
    let (png, rle) = mask_format(r.mask_format, "mask_format")?;
    Ok((source, prompts, MaskEncoding { png, rle }))
}
