//! TrainingService in-process with the tiny model on 40 shipped HAM10000 images: validation Dice
//! improves, the best checkpoint is served and reloads to the same outputs, a resumed run equals
//! an uninterrupted one, the multimask outputs and the IoU head train only when asked, one run
//! per device, and bad requests.

mod common;
use common::{channel, start, tiny_settings, TestServer};
use skinsam::grpc::pb::{self, segmentation_service_client::SegmentationServiceClient, training_service_client::TrainingServiceClient};
use skinsam::settings::Settings;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

fn settings(dir: &Path) -> Settings {
    let mut s = tiny_settings();
    s.eval.dataset_roots = vec![common::fixtures()];
    s.eval.embedding_store = Some(dir.join("store"));
    s.train.output_dir = dir.join("runs");
    s
}

fn dataset() -> String {
    common::fixtures().join("ham_train").display().to_string()
}

fn request(run_id: &str, epochs: u32) -> pb::TrainRequest {
    pb::TrainRequest {
        base_model_id: "tiny-random".into(),
        dataset: dataset(),
        run_id: run_id.into(),
        resume: false,
        recipe: Some(pb::TrainRecipe {
            prompts: Some(pb::PromptSimulation { mode: pb::PromptMode::BoxPoint as i32, seed: 3, reference_width: 600, ..Default::default() }),
            // A random-weight starting point learns nothing at the paper's 1e-5 in a few epochs.
            learning_rate: Some(3e-3),
            batch_size: 8,
            epochs,
            patience: Some(100),
            ..Default::default()
        }),
    }
}

struct Run {
    epochs: Vec<pb::EpochResult>,
    started: Option<pb::RunStatus>,
    finished: Option<pb::TrainFinished>,
}

async fn run(s: &TestServer, req: pb::TrainRequest, stop_after_epoch: Option<u32>) -> Result<Run, tonic::Status> {
    let mut c = TrainingServiceClient::new(channel(s).await);
    let mut stream = c.train(req).await?.into_inner();
    let mut out = Run { epochs: vec![], started: None, finished: None };
    while let Some(ev) = stream.message().await? {
        match ev.event.unwrap() {
            pb::train_event::Event::Started(st) => out.started = Some(st),
            pb::train_event::Event::Progress(_) => {}
            pb::train_event::Event::Epoch(e) => {
                let stop = Some(e.epoch) == stop_after_epoch;
                out.epochs.push(e);
                if stop {
                    return Ok(out); // drops the stream: the client goes away
                }
            }
            pb::train_event::Event::Finished(f) => out.finished = Some(f),
        }
    }
    Ok(out)
}

async fn wait_idle(s: &TestServer, c: &mut TrainingServiceClient<tonic::transport::Channel>, run_id: &str) {
    for _ in 0..400 {
        let st = c.get_run(pb::GetRunRequest { run_id: run_id.into() }).await.unwrap().into_inner();
        if st.state != "running" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run_id} still running: {:?}", s.registry.list().len());
}

/// Waits until the model a finished run registered is loaded (its worker owns libtorch state: a
/// test that ended with it still loading would tear libtorch down under it).
async fn wait_ready(s: &TestServer, model_id: &str) {
    for _ in 0..200 {
        if s.registry.get(model_id).map(|m| m.state == skinsam::engine::ModelState::Ready).unwrap_or(false) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("model {model_id} did not become ready");
}

#[tokio::test]
async fn training_improves_validation_dice_and_the_best_checkpoint_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(settings(tmp.path()), true).await;
    let r = run(&s, request("t1", 6), None).await.unwrap();
    let st = r.started.unwrap();
    assert_eq!(st.train_images + st.val_images, 40);
    assert!(st.val_images >= 4 && st.val_images <= 12, "about 20% by lesion: {}", st.val_images);
    assert_eq!(r.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6]);
    let base = r.epochs[0].val.unwrap().dice;
    let f = r.finished.unwrap();
    assert!(f.best_val_dice > base + 0.05, "validation Dice improves: {base} -> {}", f.best_val_dice);
    assert!(r.epochs[1..].iter().all(|e| e.train_loss.is_finite() && (e.train_dice_loss + e.train_bce_loss - e.train_loss).abs() < 1e-5));
    assert!(!r.epochs[f.best_epoch as usize].val_by_label.is_empty(), "per lesion type");
    assert_eq!(f.stopped, "epochs");
    assert_eq!(f.model_id, "tiny-random-ft-t1");
    // The sidecar records the recipe, the base and the metrics per epoch.
    let side: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("runs/t1/best.json")).unwrap()).unwrap();
    assert_eq!(side["base"]["id"], "tiny-random");
    assert_eq!(side["epoch"], f.best_epoch);
    assert_eq!(side["history"].as_array().unwrap().len(), f.best_epoch as usize + 1);
    assert!(side["split"]["grouped_by_lesion"].as_bool().unwrap());

    // Served side by side with its base, and the checkpoint reloads to the same outputs.
    wait_ready(&s, &f.model_id).await;
    let img = std::fs::read(common::fixtures().join("ham_train/images").read_dir().unwrap().next().unwrap().unwrap().path()).unwrap();
    let prompt = pb::Prompt { r#box: Some(pb::Box { x0: 40.0, y0: 30.0, x1: 160.0, y1: 120.0 }), ..Default::default() };
    let mut seg = SegmentationServiceClient::new(channel(&s).await);
    let served = seg
        .segment(pb::SegmentRequest {
            model_id: f.model_id.clone(),
            source: Some(pb::segment_request::Source::Image(img.clone())),
            prompts: vec![prompt],
            mask_format: pb::MaskFormat::Rle as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (sam, _) = skinsam::model::Sam::load(skinsam::model::SamVariant::Tiny, Path::new(&f.best_checkpoint), tch::Device::Cpu).unwrap();
    let local = skinsam::predictor::Predictor::new(sam);
    let rgb = skinsam::image_io::decode_rgb(&img, "image", u64::MAX).unwrap();
    let emb = local.set_image(&rgb).unwrap();
    let p = skinsam::predictor::Prompt { bbox: Some([40.0, 30.0, 160.0, 120.0]), ..Default::default() };
    let pred = local.predict(&emb, &[p], false).unwrap().remove(0);
    let mask = Vec::<u8>::try_from(pred.best_mask().to_kind(tch::Kind::Uint8).flatten(0, -1)).unwrap();
    let rle = skinsam::masks::to_rle(&mask, rgb.height() as usize, rgb.width() as usize);
    assert_eq!(served.masks[0].rle.as_ref().unwrap().counts, rle, "the served model is the best checkpoint");
}

/// The default model's recipe options: a mix of prompt kinds (no prompt included), AdamW, a
/// warmed-up cosine schedule.
fn mixed(run_id: &str, epochs: u32) -> pb::TrainRequest {
    let mut req = request(run_id, epochs);
    let r = req.recipe.as_mut().unwrap();
    r.prompt_mix = [(pb::PromptMode::BoxPoint, 0.4), (pb::PromptMode::Box, 0.2), (pb::PromptMode::Point, 0.2), (pb::PromptMode::None, 0.2)]
        .into_iter()
        .map(|(m, weight)| pb::PromptKindWeight { mode: m as i32, weight })
        .collect();
    r.lr_schedule = pb::LrSchedule::Cosine as i32;
    r.warmup_steps = 3;
    r.weight_decay = 0.01;
    // The prompt encoder too: its box-corner and point embeddings go unused in some steps, which
    // a resumed run must handle as the uninterrupted one does.
    r.train_prompt_encoder = true;
    req
}

#[tokio::test]
async fn a_resumed_run_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(settings(tmp.path()), true).await;
    let whole = run(&s, mixed("whole", 4), None).await.unwrap();
    assert_eq!(whole.epochs.len(), 5);
    // The cosine schedule: the rate falls epoch by epoch, to zero at the last step.
    let lrs: Vec<f64> = whole.epochs[1..].iter().map(|e| e.learning_rate).collect();
    assert!(lrs.windows(2).all(|w| w[1] < w[0]), "{lrs:?}");
    assert!(lrs[3].abs() < 1e-9, "{lrs:?}");
    // Interrupted after epoch 2 (the client goes away), then resumed.
    let part = run(&s, mixed("parts", 4), Some(2)).await.unwrap();
    assert_eq!(part.epochs.last().unwrap().epoch, 2);
    let mut c = TrainingServiceClient::new(channel(&s).await);
    wait_idle(&s, &mut c, "parts").await;
    assert_eq!(c.get_run(pb::GetRunRequest { run_id: "parts".into() }).await.unwrap().into_inner().state, "cancelled");
    let mut again = mixed("parts", 4);
    again.resume = true;
    let rest = run(&s, again, None).await.unwrap();
    let first_new = rest.epochs.first().unwrap().epoch;
    assert!(first_new == 3 || first_new == 4, "continues after the last checkpoint: {first_new}");
    let read = |run: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(tmp.path().join(format!("runs/{run}/last.json"))).unwrap()).unwrap()
    };
    let (a, b) = (read("whole"), read("parts"));
    let key = |v: &serde_json::Value| {
        v["history"].as_array().unwrap().iter().map(|e| (e["epoch"].clone(), e["train_loss"].clone(), e["val"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(key(&a), key(&b), "same losses and validation scores, epoch by epoch");
    let curve = image::open(tmp.path().join("runs/whole/curve.png")).expect("the run's training curve is a PNG");
    assert!(curve.width() > 500 && curve.height() > 300);
    let wa = std::fs::read(tmp.path().join("runs/whole/last.safetensors")).unwrap();
    let wb = std::fs::read(tmp.path().join("runs/parts/last.safetensors")).unwrap();
    assert!(wa == wb, "the same final weights");
}

#[tokio::test]
async fn multimask_training_teaches_the_three_outputs_and_the_iou_head() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(settings(tmp.path()), true).await;
    let mut req = request("mm", 5);
    req.recipe.as_mut().unwrap().multimask = true;
    let r = run(&s, req, None).await.unwrap();
    let first = &r.epochs[0];
    assert!(first.val_multimask.is_some(), "epoch 0 validates the multimask outputs too");
    for e in &r.epochs[1..] {
        assert!(e.train_multimask_loss > 0.0 && e.train_iou_loss > 0.0, "{e:?}");
        let parts = e.train_dice_loss + e.train_bce_loss + e.train_multimask_loss + e.train_iou_loss;
        assert!((parts - e.train_loss).abs() < 1e-5, "the loss is the unweighted sum of its parts: {e:?}");
    }
    let last = r.epochs.last().unwrap();
    let (m0, m1) = (first.val_multimask.unwrap().dice, last.val_multimask.unwrap().dice);
    assert!(m1 > m0 + 0.05, "the multimask outputs learn: {m0} -> {m1}");
    // Without the option the multimask parts stay out of the loss and the report.
    let plain = run(&s, request("plain", 2), None).await.unwrap();
    wait_ready(&s, "tiny-random-ft-mm").await;
    wait_ready(&s, "tiny-random-ft-plain").await;
    assert!(plain.epochs.iter().all(|e| e.val_multimask.is_none() && e.train_multimask_loss == 0.0 && e.train_iou_loss == 0.0));
    // The IoU head and the multimask tokens' hypernetworks train with the option, and only with it.
    let weights = |path: &Path| skinsam::model::Sam::load(skinsam::model::SamVariant::Tiny, path, tch::Device::Cpu).unwrap().0.vs.variables();
    let base = weights(&common::tiny_checkpoint());
    let (mm, plain) = (weights(&tmp.path().join("runs/mm/last.safetensors")), weights(&tmp.path().join("runs/plain/last.safetensors")));
    for key in ["mask_decoder.iou_prediction_head.layers.0.weight", "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight"] {
        assert!(!base[key].equal(&mm[key]), "{key} trains with multimask");
        assert!(base[key].equal(&plain[key]), "{key} stays as it was without multimask");
    }
}

#[tokio::test]
async fn one_run_per_device_and_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let mut settings = settings(tmp.path());
    let mut random = settings.models[0].clone();
    random.id = "no-checkpoint".into();
    random.checkpoint = None;
    settings.models.push(random);
    let s = start(settings, true).await;
    for _ in 0..400 {
        if s.registry.list().iter().all(|m| m.state == skinsam::engine::ModelState::Ready) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = TrainingServiceClient::new(channel(&s).await);

    // A long run holds the CPU; a second one is refused until it ends.
    let mut long = c.train(request("long", 500)).await.unwrap().into_inner();
    long.message().await.unwrap().unwrap();
    let e = c.train(request("second", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("long"), "{}", e.message());
    // The same run cannot be started twice, even as a resume (its files are being written).
    let mut again = request("long", 1);
    again.resume = true;
    let e = c.train(again).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("is running"), "{}", e.message());
    drop(long);
    wait_idle(&s, &mut c, "long").await;
    let runs = c.list_runs(pb::ListRunsRequest {}).await.unwrap().into_inner().runs;
    assert!(runs.iter().any(|r| r.run_id == "long" && r.state == "cancelled"), "{runs:?}");

    let mut cases: Vec<(pb::TrainRequest, Code, &str)> = Vec::new();
    let mut r = request("x1", 1);
    r.base_model_id = "nope".into();
    cases.push((r, Code::NotFound, "nope"));
    let mut r = request("x2", 1);
    r.base_model_id = "no-checkpoint".into();
    cases.push((r, Code::FailedPrecondition, "random weights"));
    let mut r = request("x3", 1);
    r.dataset = std::env::temp_dir().display().to_string();
    cases.push((r, Code::InvalidArgument, "dataset_roots"));
    cases.push((request("bad id!", 1), Code::InvalidArgument, "run_id"));
    let mut r = request("x4", 1);
    r.recipe.as_mut().unwrap().augment = true;
    cases.push((r, Code::InvalidArgument, "augment"));
    let mut r = request("x5", 1);
    r.recipe.as_mut().unwrap().val_fraction = Some(1.5);
    cases.push((r, Code::InvalidArgument, "val_fraction"));
    let mut r = request("x5b", 1);
    r.recipe.as_mut().unwrap().batch_size = 1_000_000;
    cases.push((r, Code::InvalidArgument, "recipe.batch_size"));
    let mut r = request("x6", 1);
    r.recipe.as_mut().unwrap().learning_rate = Some(-1.0);
    cases.push((r, Code::InvalidArgument, "learning_rate"));
    let mut r = mixed("x7", 1);
    r.recipe.as_mut().unwrap().prompt_mix[1].weight = -1.0;
    cases.push((r, Code::InvalidArgument, "recipe.prompt_mix"));
    let mut r = mixed("x8", 1);
    r.recipe.as_mut().unwrap().prompt_mix[0].mode = 42;
    cases.push((r, Code::InvalidArgument, "recipe.prompt_mix.mode"));
    let mut r = mixed("x9", 1);
    r.recipe.as_mut().unwrap().weight_decay = 1.5;
    cases.push((r, Code::InvalidArgument, "recipe.weight_decay"));
    let mut r = mixed("x10", 1);
    r.recipe.as_mut().unwrap().lr_schedule = 9;
    cases.push((r, Code::InvalidArgument, "recipe.lr_schedule"));
    for (k, v) in [1.5, -0.5, f64::NAN].into_iter().enumerate() {
        let mut r = request(&format!("x10c{k}"), 1);
        r.recipe.as_mut().unwrap().class_balance = v;
        cases.push((r, Code::InvalidArgument, "recipe.class_balance"));
    }
    let mut r = request("x11", 1);
    let rec = r.recipe.as_mut().unwrap();
    (rec.multimask, rec.train_mask_decoder, rec.train_prompt_encoder) = (true, Some(false), true);
    cases.push((r, Code::InvalidArgument, "recipe.multimask"));
    let mut r = request("x12", 1);
    let rec = r.recipe.as_mut().unwrap();
    (rec.multimask, rec.loss_full_size) = (true, true);
    cases.push((r, Code::InvalidArgument, "recipe.multimask"));
    // A NaN or infinite shift used to reach the prompt simulation, whose random range then
    // panicked the training thread; margin and shift are now bounded as well as non-negative.
    for (i, (margin, shift, field)) in [(None, f32::NAN, "max_shift"), (None, f32::INFINITY, "max_shift"), (None, -1.0, "max_shift"), (Some(1e30), 30.0, "margin")].into_iter().enumerate() {
        let mut r = request(&format!("x13-{i}"), 1);
        r.recipe.as_mut().unwrap().prompts = Some(pb::PromptSimulation { margin, max_shift: Some(shift), ..Default::default() });
        cases.push((r, Code::InvalidArgument, field));
    }
    let mut r = request("x14", 1);
    r.recipe.as_mut().unwrap().patience = Some(0);
    cases.push((r, Code::InvalidArgument, "recipe.patience"));
    // Finite weights whose sum is not: the draw of a kind panicked the training thread.
    let mut r = mixed("x15", 1);
    r.recipe.as_mut().unwrap().prompt_mix[0].weight = f64::MAX;
    r.recipe.as_mut().unwrap().prompt_mix[1].weight = f64::MAX;
    cases.push((r, Code::InvalidArgument, "recipe.prompt_mix"));
    let mut r = request("x16", 1);
    r.recipe.as_mut().unwrap().prompts.as_mut().unwrap().mode = 99;
    cases.push((r, Code::InvalidArgument, "recipe.prompts.mode"));
    let mut r = request("never-ran", 1);
    r.resume = true;
    cases.push((r, Code::NotFound, "resume"));
    // A run with a saved epoch (its sidecar) cannot be started again.
    let done = tmp.path().join("runs/done");
    std::fs::create_dir_all(&done).unwrap();
    std::fs::write(done.join("last.json"), "{}").unwrap();
    cases.push((request("done", 1), Code::FailedPrecondition, "already exists"));
    for (req, code, needle) in cases {
        let e = c.train(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {}", e.message());
        assert!(e.message().contains(needle), "{needle:?} in {:?}", e.message());
    }
    // "long" was cancelled before it saved an epoch: its run id is free again, not stuck.
    let again = run(&s, request("long", 1), None).await.unwrap();
    assert_eq!(again.finished.expect("the new run finishes").stopped, "epochs");
    wait_ready(&s, "tiny-random-ft-long").await;
}

#[tokio::test]
async fn a_resume_of_an_ended_run_ends_at_once_and_inconsistent_resumes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(settings(tmp.path()), true).await;
    let first = run(&s, request("e", 2), None).await.unwrap();
    let first = first.finished.unwrap();
    assert_eq!(first.stopped, "epochs");
    wait_ready(&s, "tiny-random-ft-e").await;
    let resume = |dataset: Option<String>| {
        let mut r = request("e", 2);
        r.resume = true;
        if let Some(d) = dataset {
            r.dataset = d;
        }
        r
    };
    // All epochs done: the resume finishes without training.
    let r = run(&s, resume(None), None).await.unwrap();
    assert!(r.epochs.is_empty(), "{:?}", r.epochs);
    let fin = r.finished.unwrap();
    assert_eq!((fin.stopped.as_str(), fin.best_epoch), ("epochs", first.best_epoch));
    wait_ready(&s, "tiny-random-ft-e").await;
    let sidecar = tmp.path().join("runs/e/last.json");
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    let write = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = original.clone();
        edit(&mut v);
        std::fs::write(&sidecar, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    // Stopped early after epoch 1 (patience 100 reached), interrupted before the stream said so:
    // the resume ends as the uninterrupted run did.
    write(&|v| {
        v["epoch"] = 1.into();
        v["epochs_without_improvement"] = 100.into();
    });
    let r = run(&s, resume(None), None).await.unwrap();
    assert!(r.epochs.is_empty(), "{:?}", r.epochs);
    assert_eq!(r.finished.unwrap().stopped, "early_stopping");
    wait_ready(&s, "tiny-random-ft-e").await;
    // The optimizer state and the sidecar from different epochs (a run stopped while writing).
    write(&|v| {
        v["epoch"] = 1.into();
        v["adam_step"] = 1.into();
    });
    let e = run(&s, resume(None), None).await.err().expect("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("optimizer state"), "{}", e.message());
    // Another dataset: the split's ids would name other images.
    write(&|v| v["epoch"] = 1.into());
    let other = common::fixtures().join("ham_heldout").display().to_string();
    let e = run(&s, resume(Some(other)), None).await.err().expect("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("dataset"), "{}", e.message());
}

#[tokio::test]
async fn full_training_with_augmentation_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(settings(tmp.path()), true).await;
    let mut req = request("full", 1);
    let recipe = req.recipe.as_mut().unwrap();
    recipe.train_image_encoder = true;
    recipe.train_prompt_encoder = true;
    recipe.augment = true;
    recipe.image_encoder_learning_rate = Some(1e-4);
    recipe.max_train_images = 8;
    recipe.max_val_images = 4;
    recipe.progress_every = 1;
    let r = run(&s, req, None).await.unwrap();
    assert_eq!(r.epochs.len(), 2);
    assert!(r.epochs[1].train_loss.is_finite());
    assert_eq!(r.finished.unwrap().stopped, "epochs");
    // Full training writes no embeddings: nothing precomputed.
    assert!(!tmp.path().join("store").exists());
}

#[tokio::test]
async fn training_needs_the_admin_token() {
    let tmp = tempfile::tempdir().unwrap();
    let mut st = settings(tmp.path());
    st.auth.admin_token = Some("adm".into());
    let s = start(st, true).await;
    let mut c = TrainingServiceClient::new(channel(&s).await);
    let e = c.train(request("t", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c.list_runs(pb::ListRunsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn tiny_and_maskless_datasets_and_a_diverging_loss_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut st = settings(tmp.path());
    st.eval.dataset_roots.push(tmp.path().to_owned());
    let s = start(st, true).await;
    let mut c = TrainingServiceClient::new(channel(&s).await);
    let src = skinsam::eval::dataset::Dataset::open(&common::fixtures().join("ham_train")).unwrap();
    // One image: no split leaves both halves non-empty.
    let one = tmp.path().join("one");
    std::fs::create_dir_all(one.join("images")).unwrap();
    std::fs::create_dir_all(one.join("masks")).unwrap();
    std::fs::copy(&src.items[0].image, one.join("images/a.jpg")).unwrap();
    std::fs::copy(&src.items[0].mask, one.join("masks/a_segmentation.png")).unwrap();
    let mut r = request("one", 1);
    r.dataset = one.display().to_string();
    let e = c.train(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at least one of each"), "{}", e.message());
    // Images without masks.
    let nomask = tmp.path().join("nomask");
    std::fs::create_dir_all(nomask.join("images")).unwrap();
    std::fs::create_dir_all(nomask.join("masks")).unwrap();
    std::fs::copy(&src.items[0].image, nomask.join("images/a.jpg")).unwrap();
    let mut r = request("nomask", 1);
    r.dataset = nomask.display().to_string();
    let e = c.train(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("no image with a mask"), "{}", e.message());
    // An absurd learning rate makes the loss non-finite: a clear status, and no checkpoint with
    // non-finite weights is written.
    let mut r = request("diverge", 2);
    r.recipe.as_mut().unwrap().learning_rate = Some(1e30);
    let e = run(&s, r, None).await.err().expect("the run fails");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("non-finite"), "{}", e.message());
    assert!(!tmp.path().join("runs/diverge/last.safetensors").exists());
    let mut c2 = TrainingServiceClient::new(channel(&s).await);
    wait_idle(&s, &mut c2, "diverge").await;
    let st = c2.get_run(pb::GetRunRequest { run_id: "diverge".into() }).await.unwrap().into_inner();
    assert_eq!(st.state, "failed");
    assert!(st.error.contains("non-finite"));
}

#[test]
fn a_failed_checkpoint_write_leaves_the_previous_one_intact() {
    // A full disk, simulated: the temporary file cannot be created (a folder holds its name).
    let tmp = tempfile::tempdir().unwrap();
    let sam = skinsam::model::Sam::new(skinsam::model::SamVariant::Tiny, tch::Device::Cpu);
    let path = tmp.path().join("last.safetensors");
    skinsam::model::checkpoint::save_safetensors(&sam.vs, &path).unwrap();
    let before = std::fs::read(&path).unwrap();
    std::fs::create_dir(path.with_extension("safetensors.tmp")).unwrap();
    let other = skinsam::model::Sam::new(skinsam::model::SamVariant::Tiny, tch::Device::Cpu);
    assert!(skinsam::model::checkpoint::save_safetensors(&other.vs, &path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before, "the previous checkpoint is intact");
    // The same for the JSON sidecars and reports.
    let json = tmp.path().join("last.json");
    skinsam::eval::report::write_atomic(&json, b"{\"epoch\": 1}").unwrap();
    std::fs::create_dir(tmp.path().join(format!("last.json.tmp{}", std::process::id()))).unwrap();
    assert!(skinsam::eval::report::write_atomic(&json, b"{\"epoch\": 2}").is_err());
    assert_eq!(std::fs::read(&json).unwrap(), b"{\"epoch\": 1}");
}

#[test]
fn loading_the_data_stops_when_the_run_is_cancelled() {
    use skinsam::train::data;
    let ds = skinsam::eval::dataset::Dataset::open(&common::fixtures().join("ham_train")).unwrap();
    let split = data::split(&ds, &skinsam::train::Recipe::default());
    let sam = skinsam::model::Sam::load(skinsam::model::SamVariant::Tiny, &common::tiny_checkpoint(), tch::Device::Cpu).unwrap().0;
    let predictor = skinsam::predictor::Predictor::new(sam);
    // Cancelled after three images: no more are embedded.
    let checks = std::cell::Cell::new(0);
    let cancel_after_three = || {
        checks.set(checks.get() + 1);
        checks.get() > 3
    };
    assert!(data::load(&ds, &split, &predictor, true, None, &cancel_after_three).unwrap().is_none());
    assert_eq!(checks.get(), 4);
    let (train, val, skipped) = data::load(&ds, &split, &predictor, true, None, &|| false).unwrap().expect("not cancelled");
    assert_eq!(train.len() + val.len() + skipped.len(), 40);
}

#[tokio::test]
async fn the_sidecar_is_written_last_so_a_failed_best_checkpoint_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(settings(tmp.path()), true).await;
    // A full disk when the best checkpoint is written, simulated: a folder holds the name of its
    // temporary file. (A folder without a sidecar is free for a new run.)
    let dir = tmp.path().join("runs/b");
    std::fs::create_dir_all(dir.join("best.safetensors.tmp")).unwrap();
    let e = run(&s, request("b", 2), None).await.err().expect("the run fails");
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    // Epoch 1 is not committed: no sidecar names a best epoch whose weights are missing.
    assert!(!dir.join("last.json").exists());
    assert!(!dir.join("best.safetensors").exists());
    let mut resume = request("b", 2);
    resume.resume = true;
    assert_eq!(run(&s, resume, None).await.err().expect("nothing to resume").code(), Code::NotFound);
}

#[tokio::test]
async fn training_is_off_without_an_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let mut settings = settings(tmp.path());
    settings.train.output_dir = std::path::PathBuf::new();
    let s = start(settings, true).await;
    let e = run(&s, request("x", 1), None).await.err().expect("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("train.output_dir"), "{}", e.message());
}

#[tokio::test]
async fn the_shutdown_signal_ends_a_run_at_its_next_step_and_it_resumes_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let mut st = settings(tmp.path());
    // Far longer than the run takes to stop: serve returning sooner shows the run stopped at the
    // signal, not at the end of the grace period.
    st.limits.shutdown_grace_ms = 120_000;
    let mut s = start(st.clone(), true).await;
    let mut c = TrainingServiceClient::new(channel(&s).await);
    let mut req = request("interrupted", 50);
    req.recipe.as_mut().unwrap().progress_every = 1;
    let mut stream = c.train(req.clone()).await.unwrap().into_inner();
    // The signal once epoch 1 is saved, during epoch 2.
    let mut saved = 0;
    let mut server = None;
    let finished = loop {
        match stream.message().await.unwrap().expect("the stream ends with a final message").event.unwrap() {
            pb::train_event::Event::Epoch(e) => saved = e.epoch,
            pb::train_event::Event::Progress(p) if p.epoch == 2 && server.is_none() => server = Some(s.signal_shutdown()),
            pb::train_event::Event::Finished(f) => break f,
            _ => {}
        }
    };
    assert!(server.is_some(), "the run reached epoch 2 before it ended");
    assert_eq!(finished.stopped, "shutdown");
    assert!(finished.message.contains("resume"), "{}", finished.message);
    assert!(finished.model_id.is_empty(), "nothing registered on a server going away");
    // The signal reaches the run within a step or two; those steps may finish an epoch.
    assert!((1..10).contains(&saved), "ended soon after the signal, not after its 50 epochs: {saved}");
    let done = tokio::time::timeout(Duration::from_secs(60), server.unwrap()).await;
    done.expect("serve returned long before the grace period was over").unwrap().unwrap();
    drop(stream);
    // Another server resumes it after the last saved epoch.
    let s2 = start(st, true).await;
    req.resume = true;
    let rest = run(&s2, req, Some(saved + 1)).await.unwrap();
    assert_eq!(rest.started.unwrap().epochs_done, saved);
    assert_eq!(rest.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), [saved + 1]);
    let mut c2 = TrainingServiceClient::new(channel(&s2).await);
    wait_idle(&s2, &mut c2, "interrupted").await;
    // The cancelled run registers its best checkpoint: loaded before the test tears libtorch down.
    wait_ready(&s2, "tiny-random-ft-interrupted").await;
}
