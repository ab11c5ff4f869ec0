//! The shipped default model (models/skinsam_tiny.safetensors, MODEL_CARD.md) through the
//! server's built-in settings: it is what a fresh clone serves, it segments real lesions from
//! HAM10000 images of the run's validation split (never trained on), well above the box-ellipse
//! baseline, and with no prompt at all. Its outputs match the official modules (golden files from
//! scripts/make_golden.py on the shipped weights).

mod common;
use common::{channel, start};
use skinsam::grpc::pb::{self, evaluation_service_client::EvaluationServiceClient, model_service_client::ModelServiceClient};
use skinsam::model::Precision;
use skinsam::settings::Settings;

fn heldout() -> String {
    common::fixtures().join("ham_heldout").display().to_string()
}

/// Mean Dice of skinsam-tiny and (box modes) of the box-ellipse baseline, with the single-mask
/// output or the paper's protocol (three masks, the highest predicted IoU kept).
async fn mean_dice(url: &str, mode: pb::PromptMode, single_mask: bool) -> (f64, f64) {
    let boxed = matches!(mode, pb::PromptMode::BoxPoint | pb::PromptMode::Box);
    let ch = tonic::transport::Channel::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    let mut c = EvaluationServiceClient::new(ch);
    let settings = pb::EvaluateSettings {
        model_ids: if boxed { vec!["skinsam-tiny".into(), "box-ellipse".into()] } else { vec!["skinsam-tiny".into()] },
        prompts: Some(pb::PromptSimulation { mode: mode as i32, seed: 11, reference_width: 600, ..Default::default() }),
        single_mask,
        ..Default::default()
    };
    let mut stream = c.evaluate(pb::EvaluateRequest { settings: Some(settings), dataset: heldout() }).await.unwrap().into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(pb::evaluate_response::Event::Summary(s)) = m.event {
            last = Some(s);
        }
    }
    let s = last.expect("a final summary");
    assert!(s.r#final && s.skipped == 0 && s.images_done >= 8, "{s:?}");
    let dice = |id: &str| s.models.iter().find(|m| m.model_id == id).unwrap().overall.as_ref().unwrap().dice.as_ref().unwrap().mean;
    (dice("skinsam-tiny"), if boxed { dice("box-ellipse") } else { f64::NAN })
}

#[tokio::test]
async fn a_fresh_server_serves_the_trained_model_and_it_segments_lesions() {
    let mut settings = Settings::defaults();
    assert_eq!(settings.models.len(), 1);
    assert_eq!(settings.models[0].id, "skinsam-tiny");
    settings.eval.dataset_roots = vec![common::fixtures()];
    let s = start(settings, true).await;
    let models = ModelServiceClient::new(channel(&s).await).list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].variant, pb::Variant::SkinsamTiny as i32);

    let (model, ellipse) = mean_dice(&s.url, pb::PromptMode::BoxPoint, true).await;
    eprintln!("box+point: skinsam-tiny {model:.4}, box-ellipse {ellipse:.4}");
    assert!(model >= 0.88 && model > ellipse + 0.03, "box+point Dice {model} vs ellipse {ellipse}");
    // The multimask outputs and the IoU head are trained too: the paper's protocol works as well.
    let (model, ellipse) = mean_dice(&s.url, pb::PromptMode::BoxPoint, false).await;
    eprintln!("box+point, multimask: skinsam-tiny {model:.4}");
    assert!(model >= 0.88 && model > ellipse + 0.03, "box+point multimask Dice {model} vs ellipse {ellipse}");
    let (model, _) = mean_dice(&s.url, pb::PromptMode::None, true).await;
    eprintln!("no prompt: skinsam-tiny {model:.4}");
    assert!(model >= 0.75, "no-prompt Dice {model}");
}

#[test]
fn the_shipped_weights_match_the_official_modules() {
    let r = skinsam::parity::check_golden(&common::fixtures().join("golden_skinsam_tiny"), tch::Device::Cpu, Precision::Fp32).unwrap();
    assert!(r.cases.len() >= 18, "all golden cases ran: {}", r.cases.len());
    assert!(r.features_max_abs <= 1e-3, "embedding max abs diff {}", r.features_max_abs);
    assert!(r.low_res_max_abs <= 2e-3, "low-res logits max abs diff {}", r.low_res_max_abs);
    assert!(r.iou_max_abs <= 1e-3, "IoU prediction max abs diff {}", r.iou_max_abs);
    assert!(r.mask_iou_min >= 0.999, "mask IoU {}", r.mask_iou_min);
}
