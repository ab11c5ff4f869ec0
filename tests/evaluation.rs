//! EvaluationService in-process with the tiny model on the shipped HAM10000 miniature: order,
//! summaries and comparisons, uploads, persisted embeddings, cancellation, bad input; and the
//! online A/B alias.

mod common;
use common::{channel, start, tiny_settings};
use skinsam::engine::pick_route;
use skinsam::grpc::pb::{
    self, embedding_service_client::EmbeddingServiceClient, evaluation_service_client::EvaluationServiceClient,
    segmentation_service_client::SegmentationServiceClient,
};
use skinsam::settings::{AliasRoute, AliasSettings, ModelSettings, Settings};
use std::path::Path;
use std::time::Duration;
use tonic::Code;

fn settings_with_roots(store: Option<&Path>) -> Settings {
    let mut s = tiny_settings();
    s.eval.dataset_roots = vec![common::fixtures()];
    s.eval.embedding_store = store.map(Path::to_owned);
    s
}

fn eval_settings(models: &[&str]) -> pb::EvaluateSettings {
    pb::EvaluateSettings {
        model_ids: models.iter().map(|m| m.to_string()).collect(),
        prompts: Some(pb::PromptSimulation { mode: pb::PromptMode::BoxPoint as i32, seed: 5, reference_width: 600, ..Default::default() }),
        summary_every: 4,
        return_masks: true,
        ..Default::default()
    }
}

fn dataset() -> String {
    common::fixtures().join("ham_mini").display().to_string()
}

/// Equal ids, prompts, scores and masks (the baseline's predicted IoU is NaN, never equal).
fn same_results(a: &[pb::ImageResult], b: &[pb::ImageResult]) -> bool {
    let key = |v: &[pb::ImageResult]| {
        v.iter()
            .map(|i| (i.id.clone(), i.prompt, i.results.iter().map(|r| (r.dice, r.iou, r.accuracy, r.mask.clone())).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    };
    key(a) == key(b)
}

type Events = (Vec<pb::ImageResult>, Vec<pb::SkippedImage>, Vec<pb::EvaluationSummary>);

async fn collect(mut stream: tonic::Streaming<pb::EvaluateResponse>) -> Events {
    let (mut images, mut skipped, mut summaries) = (vec![], vec![], vec![]);
    while let Some(m) = stream.message().await.unwrap() {
        match m.event.unwrap() {
            pb::evaluate_response::Event::Image(i) => images.push(i),
            pb::evaluate_response::Event::Skipped(s) => skipped.push(s),
            pb::evaluate_response::Event::Summary(s) => summaries.push(s),
        }
    }
    (images, skipped, summaries)
}

async fn evaluate(url: &str, settings: pb::EvaluateSettings, dataset: String) -> Result<Events, tonic::Status> {
    let mut c = EvaluationServiceClient::new(tonic::transport::Channel::from_shared(url.to_owned()).unwrap().connect().await.unwrap());
    let stream = c.evaluate(pb::EvaluateRequest { settings: Some(settings), dataset }).await?.into_inner();
    Ok(collect(stream).await)
}

#[tokio::test]
async fn evaluate_streams_results_in_order_with_summaries_and_comparisons() {
    let s = start(settings_with_roots(None), true).await;
    let (images, skipped, summaries) = evaluate(&s.url, eval_settings(&["tiny-random", "box-ellipse"]), dataset()).await.unwrap();
    assert!(skipped.is_empty());
    assert_eq!(images.len(), 9);
    let ids: Vec<_> = images.iter().map(|i| i.id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "dataset order");
    for (k, i) in images.iter().enumerate() {
        assert_eq!(i.index as usize, k);
        assert!(i.mask_resized, "600x450 masks on 200x150 images");
        assert_eq!((i.width, i.height), (200, 150));
        let p = i.prompt.as_ref().unwrap();
        assert!(p.point.is_some() && p.r#box.is_some());
        assert_eq!(i.results.iter().map(|r| r.model_id.as_str()).collect::<Vec<_>>(), ["tiny-random", "box-ellipse"]);
        for r in &i.results {
            assert!((0.0..=1.0).contains(&r.dice) && (0.0..=1.0).contains(&r.iou) && (0.0..=1.0).contains(&r.accuracy));
            assert_eq!(r.mask.as_ref().unwrap().counts.iter().map(|&c| u64::from(c)).sum::<u64>(), 200 * 150);
        }
        assert!(i.results[1].predicted_iou.is_nan(), "no predicted IoU for the baseline");
    }
    // Two running summaries (after 4 and 8 images), then the final one.
    assert_eq!(summaries.iter().map(|s| (s.images_done, s.r#final)).collect::<Vec<_>>(), [(4, false), (8, false), (9, true)]);
    let f = summaries.last().unwrap();
    assert_eq!((f.images_total, f.skipped, f.masks_resized), (9, 0, 9));
    assert_eq!(f.models.len(), 2);
    let base = f.models[1].overall.as_ref().unwrap().dice.as_ref().unwrap().mean;
    assert!(base > 0.6, "the box-ellipse baseline scores well on real lesions: {base}");
    assert_eq!(f.models[0].by_label.len(), 7, "per lesion type");
    assert_eq!(f.comparisons.iter().map(|c| c.metric.as_str()).collect::<Vec<_>>(), ["dice", "iou", "accuracy"]);
    let c = &f.comparisons[0];
    assert_eq!((c.model_a.as_str(), c.model_b.as_str()), ("tiny-random", "box-ellipse"));
    let o = c.overall.unwrap();
    assert_eq!(o.wins + o.ties + o.losses, 9);
    assert!(o.ci95_low <= o.mean_diff && o.mean_diff <= o.ci95_high);
    // The settings in effect come back with the paper's defaults filled in.
    let p = f.settings.as_ref().unwrap().prompts.unwrap();
    assert_eq!((p.margin, p.max_shift, p.max_scale, p.reference_width), (Some(20.0), Some(30.0), Some(0.1), 600));

    // The same seed gives the same prompts and scores (a cached re-run); a filter keeps a subset.
    let (again, _, _) = evaluate(&s.url, eval_settings(&["tiny-random", "box-ellipse"]), dataset()).await.unwrap();
    assert!(same_results(&again, &images), "a re-run gives the same prompts and scores");
    let mut filtered = eval_settings(&["box-ellipse"]);
    filtered.labels = vec!["mel".into(), "nv".into()];
    filtered.limit = 3;
    let (sub, _, _) = evaluate(&s.url, filtered, dataset()).await.unwrap();
    assert_eq!(sub.len(), 3);
    assert!(sub.iter().all(|i| i.label == "mel" || i.label == "nv"));
    let first_mel = images.iter().find(|i| i.id == sub[0].id).unwrap();
    assert_eq!(sub[0].prompt, first_mel.prompt, "prompts depend on seed and image only");
}

#[tokio::test]
async fn evaluate_upload_scores_streamed_images_and_skips_bad_ones() {
    let s = start(tiny_settings(), true).await;
    let mut c = EvaluationServiceClient::new(channel(&s).await);
    let fx = common::fixtures().join("ham_mini");
    let ds = skinsam::eval::dataset::Dataset::open(&fx).unwrap();
    // A running summary after every scored image (and not again after skipped ones).
    let settings = pb::EvaluateSettings { summary_every: 1, ..eval_settings(&["tiny-random"]) };
    let mut msgs = vec![pb::EvaluateUploadRequest { item: Some(pb::evaluate_upload_request::Item::Settings(settings)) }];
    let mut empty_mask = Vec::new();
    image::GrayImage::new(600, 450).write_to(&mut std::io::Cursor::new(&mut empty_mask), image::ImageFormat::Png).unwrap();
    for (k, it) in ds.items.iter().take(5).enumerate() {
        let image = if k == 1 { b"not an image".to_vec() } else { std::fs::read(&it.image).unwrap() };
        // Items 3 and 4: an empty ground truth, from which no box or point can be drawn.
        let mask = if k >= 3 { empty_mask.clone() } else { std::fs::read(&it.mask).unwrap() };
        msgs.push(pb::EvaluateUploadRequest {
            item: Some(pb::evaluate_upload_request::Item::Image(pb::UploadedImage {
                id: it.id.clone(),
                image,
                mask,
                label: it.label.clone().unwrap(),
                group: String::new(),
            })),
        });
    }
    let stream = c.evaluate_upload(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    let (images, skipped, summaries) = collect(stream).await;
    assert_eq!(images.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), [ds.items[0].id.clone(), ds.items[2].id.clone()]);
    assert_eq!(skipped.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), [1, 3, 4].map(|k| ds.items[k].id.clone()));
    assert!(skipped[0].reason.contains("image"), "{}", skipped[0].reason);
    assert!(skipped[1].reason.contains("ground truth is empty"), "{}", skipped[1].reason);
    assert_eq!(summaries.len(), 3, "two running summaries and the final one: {summaries:?}");
    let f = summaries.last().unwrap();
    assert!(f.r#final && f.images_done == 2 && f.skipped == 3 && f.images_total == 0);

    // The first message must be the settings.
    let bad = vec![pb::EvaluateUploadRequest {
        item: Some(pb::evaluate_upload_request::Item::Image(pb::UploadedImage { id: "x".into(), ..Default::default() })),
    }];
    let e = c.evaluate_upload(tokio_stream::iter(bad)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("settings"), "{}", e.message());
}

#[tokio::test]
async fn an_upload_that_breaks_off_ends_the_run_with_an_error_not_a_final_summary() {
    let mut settings = tiny_settings();
    settings.limits.max_message_bytes = 200_000;
    let s = start(settings, true).await;
    let mut c = EvaluationServiceClient::new(channel(&s).await);
    let ds = skinsam::eval::dataset::Dataset::open(&common::fixtures().join("ham_mini")).unwrap();
    let image = |k: usize, bytes: Vec<u8>| pb::EvaluateUploadRequest {
        item: Some(pb::evaluate_upload_request::Item::Image(pb::UploadedImage {
            id: ds.items[k].id.clone(),
            image: bytes,
            mask: std::fs::read(&ds.items[k].mask).unwrap(),
            label: String::new(),
            group: String::new(),
        })),
    };
    let msgs = vec![
        pb::EvaluateUploadRequest { item: Some(pb::evaluate_upload_request::Item::Settings(eval_settings(&["tiny-random"]))) },
        image(0, std::fs::read(&ds.items[0].image).unwrap()),
        // Over the server's message limit: the stream breaks here.
        image(1, vec![0u8; 300_000]),
        image(2, std::fs::read(&ds.items[2].image).unwrap()),
    ];
    let mut stream = c.evaluate_upload(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    let mut finals = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => finals += usize::from(matches!(m.event, Some(pb::evaluate_response::Event::Summary(s)) if s.r#final)),
            Ok(None) => panic!("the run ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(finals, 0, "no final summary over part of the data");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("item"), "{status:?}");
}

#[tokio::test]
async fn a_run_waits_out_a_full_model_queue_instead_of_failing() {
    // One request in flight per model, three images in flight: the model answers
    // RESOURCE_EXHAUSTED to some of the run's own calls, which are retried.
    let mut settings = settings_with_roots(None);
    settings.limits.queue_depth = 1;
    let s = start(settings, true).await;
    let (images, skipped, summaries) = evaluate(&s.url, eval_settings(&["tiny-random"]), dataset()).await.unwrap();
    assert_eq!((images.len(), skipped.len()), (9, 0));
    assert!(summaries.last().unwrap().r#final);
}

#[tokio::test]
async fn evaluate_rejects_bad_requests_with_clear_statuses() {
    let s = start(settings_with_roots(None), true).await;
    let outside = std::env::temp_dir().display().to_string();
    let cases: Vec<(pb::EvaluateSettings, String, Code, &str)> = vec![
        (eval_settings(&["tiny-random"]), outside, Code::InvalidArgument, "dataset_roots"),
        (eval_settings(&["tiny-random"]), "/no/such/folder".into(), Code::InvalidArgument, "dataset"),
        (eval_settings(&["nope"]), dataset(), Code::NotFound, "nope"),
        (eval_settings(&[]), dataset(), Code::InvalidArgument, "model_ids"),
        (eval_settings(&["tiny-random", "tiny-random"]), dataset(), Code::InvalidArgument, "twice"),
        (
            pb::EvaluateSettings {
                prompts: Some(pb::PromptSimulation { mode: pb::PromptMode::Point as i32, ..Default::default() }),
                ..eval_settings(&["box-ellipse"])
            },
            dataset(),
            Code::InvalidArgument,
            "box",
        ),
        (
            pb::EvaluateSettings { prompts: Some(pb::PromptSimulation { mode: 42, ..Default::default() }), ..eval_settings(&["tiny-random"]) },
            dataset(),
            Code::InvalidArgument,
            "mode",
        ),
        (
            pb::EvaluateSettings {
                prompts: Some(pb::PromptSimulation { max_scale: Some(1.5), ..Default::default() }),
                ..eval_settings(&["tiny-random"])
            },
            dataset(),
            Code::InvalidArgument,
            "max_scale",
        ),
        (
            pb::EvaluateSettings {
                prompts: Some(pb::PromptSimulation { max_shift: Some(f32::NAN), ..Default::default() }),
                ..eval_settings(&["tiny-random"])
            },
            dataset(),
            Code::InvalidArgument,
            "prompts.max_shift",
        ),
        (pb::EvaluateSettings { shard_index: 3, shard_count: 2, ..eval_settings(&["tiny-random"]) }, dataset(), Code::InvalidArgument, "shard"),
        (pb::EvaluateSettings { shard_index: 1, shard_count: 0, ..eval_settings(&["tiny-random"]) }, dataset(), Code::InvalidArgument, "settings.shard_index"),
        // Filters that select nothing: an error naming the field (and the labels there are), not
        // an OK stream of empty summaries.
        (pb::EvaluateSettings { labels: vec!["MEL".into()], ..eval_settings(&["tiny-random"]) }, dataset(), Code::InvalidArgument, "settings.labels"),
        (pb::EvaluateSettings { labels: vec!["melanoma".into()], ..eval_settings(&["tiny-random"]) }, dataset(), Code::InvalidArgument, "akiec"),
        (pb::EvaluateSettings { ids: vec!["ISIC_nope".into()], ..eval_settings(&["tiny-random"]) }, dataset(), Code::InvalidArgument, "settings.ids"),
    ];
    for (settings, ds, code, needle) in cases {
        let e = evaluate(&s.url, settings.clone(), ds.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{settings:?} {ds}: {}", e.message());
        assert!(e.message().contains(needle), "{needle:?} in {:?}", e.message());
    }
}

/// A dataset of `copies` x the miniature (distinct ids), for longer runs.
fn big_dataset(root: &Path, copies: usize) {
    let src = skinsam::eval::dataset::Dataset::open(&common::fixtures().join("ham_mini")).unwrap();
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for c in 0..copies {
        for it in &src.items {
            // Distinct bytes too (one pixel changed), so each copy is a new image to encode.
            let mut img = image::open(&it.image).unwrap().to_rgb8();
            img.put_pixel(0, 0, image::Rgb([c as u8, 0, 0]));
            img.save(root.join(format!("images/{}_{c}.png", it.id))).unwrap();
            std::fs::copy(&it.mask, root.join(format!("masks/{}_{c}_segmentation.png", it.id))).unwrap();
        }
    }
}

fn count_files(dir: &Path) -> usize {
    walk(dir)
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()).map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()).unwrap_or(0)
}

#[tokio::test]
async fn embeddings_persist_across_servers_and_cancellation_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let data = tmp.path().join("data");
    big_dataset(&data, 20);
    let mut settings = settings_with_roots(Some(&store));
    settings.eval.dataset_roots.push(tmp.path().to_owned());

    // Persisted embeddings: a second server (empty memory cache) finds them on disk.
    let first = {
        let s = start(settings.clone(), true).await;
        let r = evaluate(&s.url, eval_settings(&["tiny-random"]), dataset()).await.unwrap();
        assert_eq!(count_files(&store), 9, "one stored embedding per image");
        r
    };
    let s = start(settings.clone(), true).await;
    let second = evaluate(&s.url, eval_settings(&["tiny-random"]), dataset()).await.unwrap();
    assert!(same_results(&second.0, &first.0), "the same results from stored embeddings");
    assert_eq!(count_files(&store), 9, "nothing encoded again");

    // Cancellation: read a few results of a 180-image run, then drop the stream.
    let mut c = EvaluationServiceClient::new(channel(&s).await);
    let req = pb::EvaluateRequest { settings: Some(eval_settings(&["tiny-random"])), dataset: data.display().to_string() };
    let mut stream = c.evaluate(req).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    drop(stream);
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_cancel = count_files(&store);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count_files(&store), after_cancel, "no more images encoded after the client went away");
    assert!(after_cancel < 9 + 60, "the run stopped early: {after_cancel} stored");
}

#[test]
fn alias_routes_by_weight_and_sticks_per_image() {
    let routes = vec![AliasRoute { model: "a".into(), weight: 90 }, AliasRoute { model: "b".into(), weight: 10 }];
    let n = 5000;
    let to_b = (0..n).filter(|i| pick_route(&routes, format!("image-{i}").as_bytes()) == "b").count();
    assert!((400..600).contains(&to_b), "about 10% to b: {to_b}");
    assert_eq!(pick_route(&routes, b"same"), pick_route(&routes, b"same"));
    let zero = vec![AliasRoute { model: "a".into(), weight: 0 }, AliasRoute { model: "b".into(), weight: 1 }];
    assert!((0..100).all(|i| pick_route(&zero, format!("{i}").as_bytes()) == "b"), "weight 0 gets nothing");
}

#[tokio::test]
async fn alias_serves_segment_requests_through_its_routes() {
    let mut settings = tiny_settings();
    let mut b = settings.models[0].clone();
    b.id = "tiny-b".into();
    settings.models.push(ModelSettings { ..b });
    settings.aliases = vec![AliasSettings {
        name: "lesion".into(),
        routes: vec![AliasRoute { model: "tiny-random".into(), weight: 1 }, AliasRoute { model: "tiny-b".into(), weight: 1 }],
    }];
    let s = start(settings, true).await;
    for _ in 0..200 {
        if s.registry.list().iter().all(|m| m.state == skinsam::engine::ModelState::Ready) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = SegmentationServiceClient::new(channel(&s).await);
    let seg = |image: Vec<u8>| pb::SegmentRequest {
        model_id: "lesion".into(),
        source: Some(pb::segment_request::Source::Image(image)),
        prompts: vec![pb::Prompt { r#box: Some(pb::Box { x0: 10.0, y0: 10.0, x1: 100.0, y1: 90.0 }), ..Default::default() }],
        mask_format: pb::MaskFormat::Rle as i32,
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    let mut images = Vec::new();
    let mut e = EmbeddingServiceClient::new(channel(&s).await);
    for k in 0..12u8 {
        let mut img = image::RgbImage::from_pixel(64, 48, image::Rgb([k, 90, 80]));
        img.put_pixel(1, 1, image::Rgb([200, k, 3]));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let png = png.into_inner();
        let h1 = c.segment(seg(png.clone())).await.unwrap().into_inner().embedding_handle;
        let h2 = c.segment(seg(png.clone())).await.unwrap().into_inner().embedding_handle;
        let model = h1.split_once('/').unwrap().0.to_owned();
        assert_eq!(h1, h2, "sticky per image");
        // Embed through the alias picks the same model for the same image.
        let embedded = e.embed(pb::EmbedRequest { model_id: "lesion".into(), image: png.clone(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(embedded.embedding_handle, h1, "Embed and Segment route an image alike");
        seen.insert(model);
        images.push(png);
    }
    assert_eq!(seen.len(), 2, "both routes used: {seen:?}");
    // With one route's model unloaded, its images go to the other instead of failing.
    s.registry.unload("tiny-b").unwrap();
    for png in &images {
        let h = c.segment(seg(png.clone())).await.unwrap().into_inner().embedding_handle;
        assert!(h.starts_with("tiny-random/"), "{h}");
    }
    // A model loaded under the alias's name would never be reached: refused.
    let mut ms = s.registry.settings().models[0].clone();
    ms.id = "lesion".into();
    match s.registry.load(ms) {
        Err(skinsam::error::Error::InvalidArgument { field, message }) => assert!(field == "id" && message.contains("alias"), "{field}: {message}"),
        other => panic!("{:?}", other.map(|i| i.id)),
    }
}

#[test]
fn cli_report_folder_and_sharded_merge_match_a_whole_run() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let s = rt.block_on(start(settings_with_roots(None), true));
    let tmp = tempfile::tempdir().unwrap();
    let conn = skinsam::cli::Conn { server: s.url.clone(), token: None, ca_cert: None };
    let run = |out: &Path, shard: (u32, u32), upload: bool| {
        skinsam::eval::client::eval(
            &conn,
            skinsam::eval::client::EvalArgs {
                models: vec!["tiny-random".into(), "box-ellipse".into()],
                dataset: common::fixtures().join("ham_mini"),
                upload,
                out: out.to_owned(),
                mode: skinsam::eval::prompts::PromptMode::BoxPoint,
                seed: 11,
                reference_width: 600,
                margin: None,
                max_shift: None,
                max_scale: None,
                limit: 0,
                labels: vec![],
                shard_index: shard.0,
                shard_count: shard.1,
                single_mask: false,
                summary_every: 0,
                quiet: true,
                ids: vec![],
            },
        )
        .unwrap();
    };
    let whole = tmp.path().join("whole");
    run(&whole, (0, 0), false);
    for f in ["results.csv", "summary.json", "report.md", "hist_dice.png", "hist_iou.png", "hist_accuracy.png"] {
        assert!(whole.join(f).is_file(), "{f} written");
    }
    let overlays = std::fs::read_dir(whole.join("overlays")).unwrap().count();
    assert_eq!(overlays, 12, "3 best and 3 worst per model");
    let md = std::fs::read_to_string(whole.join("report.md")).unwrap();
    for needle in ["akiec", "vasc", "**overall**", "Wilcoxon", "nearest-neighbour", "box-ellipse"] {
        assert!(md.contains(needle), "{needle} in the report");
    }
    // The same run with the images streamed from here gives the same numbers.
    let uploaded = tmp.path().join("uploaded");
    run(&uploaded, (0, 0), true);
    let summary = |dir: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap() };
    assert_eq!(summary(&uploaded)["summary"]["models"], summary(&whole)["summary"]["models"]);
    // Two shards merged give the whole run's summary.
    let (a, b, merged) = (tmp.path().join("s0"), tmp.path().join("s1"), tmp.path().join("merged"));
    run(&a, (0, 2), false);
    run(&b, (1, 2), false);
    skinsam::eval::client::merge_reports(&merged, &[a, b]).unwrap();
    let (m, w) = (summary(&merged), summary(&whole));
    assert_eq!(m["summary"]["images_done"], 9);
    for model in ["tiny-random", "box-ellipse"] {
        let (x, y) = (&m["summary"]["models"][model]["overall"]["dice"]["mean"], &w["summary"]["models"][model]["overall"]["dice"]["mean"]);
        assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-12, "{model}: {x} vs {y}");
    }
    drop(s);
}

#[tokio::test]
async fn the_shutdown_signal_ends_a_run_with_unavailable() {
    let mut st = tiny_settings();
    st.limits.shutdown_grace_ms = 120_000;
    let mut s = start(st, true).await;
    let mut c = EvaluationServiceClient::new(channel(&s).await);
    let ds = skinsam::eval::dataset::Dataset::open(&common::fixtures().join("ham_mini")).unwrap();
    let image = |k: usize| pb::EvaluateUploadRequest {
        item: Some(pb::evaluate_upload_request::Item::Image(pb::UploadedImage {
            id: ds.items[k].id.clone(),
            image: std::fs::read(&ds.items[k].image).unwrap(),
            mask: std::fs::read(&ds.items[k].mask).unwrap(),
            label: String::new(),
            group: String::new(),
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::EvaluateUploadRequest { item: Some(pb::evaluate_upload_request::Item::Settings(eval_settings(&["tiny-random"]))) }).await.unwrap();
    tx.send(image(0)).await.unwrap();
    let mut stream = c.evaluate_upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(pb::evaluate_response::Event::Image(_))), "{first:?}");
    let server = s.signal_shutdown();
    while !s.registry.shutting_down() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The upload goes on, but the run ends at its next image.
    tx.send(image(1)).await.unwrap();
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => assert!(!matches!(m.event, Some(pb::evaluate_response::Event::Summary(s)) if s.r#final), "no final summary"),
            Ok(None) => panic!("the run ended without a status"),
            Err(e) => break e,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down") && status.message().contains("after 1 scored"), "{status:?}");
    drop((tx, stream));
    let done = tokio::time::timeout(Duration::from_secs(60), server).await;
    done.expect("serve returned long before the grace period was over").unwrap().unwrap();
}
