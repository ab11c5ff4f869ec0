//! The gRPC server in-process on 127.0.0.1:0 with the tiny model: every RPC's happy path,
//! streaming order and chunking, limits, auth, health and hot load/unload.

mod common;
use common::{channel, start, tiny_settings};
use skinsam::grpc::server::{bind, serve};
use skinsam::engine::Registry;
use skinsam::grpc::pb::{self, embedding_service_client::EmbeddingServiceClient, model_service_client::ModelServiceClient,
    segmentation_service_client::SegmentationServiceClient};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

fn image() -> Vec<u8> {
    common::fixture_bytes("ISIC_0024306.jpg")
}

fn box_prompt() -> pb::Prompt {
    pb::Prompt {
        points: vec![pb::Point { x: 110.0, y: 71.0, label: pb::PointLabel::Foreground as i32 }],
        r#box: Some(pb::Box { x0: 60.0, y0: 2.0, x1: 169.0, y1: 139.0 }),
        mask_input: vec![],
    }
}

fn seg_req(source: pb::segment_request::Source, n_prompts: usize) -> pb::SegmentRequest {
    pb::SegmentRequest {
        model_id: "tiny-random".into(),
        source: Some(source),
        prompts: vec![box_prompt(); n_prompts],
        multimask_output: true,
        mask_format: pb::MaskFormat::PngAndRle as i32,
        return_low_res_logits: true,
        request_id: "r".into(),
    }
}

#[tokio::test]
async fn embed_then_segment_round_trip() {
    let s = start(tiny_settings(), true).await;
    let ch = channel(&s).await;
    let mut emb = EmbeddingServiceClient::new(ch.clone());
    let r = emb.embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: image(), ..Default::default() }).await.unwrap().into_inner();
    assert!(!r.cache_hit);
    assert_eq!((r.original_width, r.original_height), (200, 150));
    let again = emb.embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: image(), ..Default::default() }).await.unwrap().into_inner();
    assert!(again.cache_hit, "a repeated image is not re-encoded");
    assert_eq!(again.embedding_handle, r.embedding_handle);

    let mut seg = SegmentationServiceClient::new(ch);
    let by_handle = seg.segment(seg_req(pb::segment_request::Source::EmbeddingHandle(r.embedding_handle.clone()), 2)).await.unwrap().into_inner();
    assert_eq!(by_handle.masks.len(), 2);
    let m = &by_handle.masks[0];
    assert_eq!(m.scores.len(), 3);
    assert_eq!(m.low_res_logits.len(), 256 * 256);
    let png = image::load_from_memory(&m.png).unwrap().into_luma8();
    assert_eq!((png.width(), png.height()), (200, 150));
    let rle = m.rle.as_ref().unwrap();
    let from_rle = skinsam::masks::from_rle(&rle.counts, 150, 200);
    let from_png: Vec<u8> = png.as_raw().iter().map(|&v| u8::from(v > 127)).collect();
    assert_eq!(from_rle, from_png, "PNG and RLE carry the same mask");
    assert_eq!(m.area, from_png.iter().map(|&v| v as i64).sum::<i64>());
    assert!(by_handle.timing.is_some());

    let inline = seg.segment(seg_req(pb::segment_request::Source::Image(image()), 1)).await.unwrap().into_inner();
    assert_eq!(inline.embedding_handle, r.embedding_handle);
    assert_eq!(inline.masks[0].rle, by_handle.masks[0].rle, "inline image and handle give the same mask");
}

#[tokio::test]
async fn streams_keep_order_and_chunk_embeddings() {
    let mut settings = tiny_settings();
    settings.limits.max_message_bytes = 200_000; // the tiny embedding (512 KiB fp32) needs chunks
    let s = start(settings, true).await;
    let ch = channel(&s).await;
    let mut seg = SegmentationServiceClient::new(ch.clone());
    let reqs: Vec<pb::SegmentRequest> = (0..6)
        .map(|i| pb::SegmentRequest {
            request_id: format!("req-{i}"),
            return_low_res_logits: false,
            ..seg_req(pb::segment_request::Source::Image(image()), 1 + i % 3)
        })
        .collect();
    let mut out = seg.segment_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(r) = out.message().await.unwrap() {
        assert_eq!(r.masks.len(), 1 + ids.len() % 3);
        ids.push(r.request_id);
    }
    assert_eq!(ids, (0..6).map(|i| format!("req-{i}")).collect::<Vec<_>>());

    let mut emb = EmbeddingServiceClient::new(ch);
    let req = pb::EmbedRequest {
        model_id: "tiny-random".into(),
        image: image(),
        request_id: "e1".into(),
        return_embedding: pb::TensorFormat::Fp32 as i32,
    };
    let mut out = emb.embed_stream(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    let mut chunks = 0;
    while let Some(r) = out.message().await.unwrap() {
        assert_eq!(r.request_id, "e1");
        assert_eq!(r.embedding_shape, vec![1, 32, 64, 64]);
        bytes.extend_from_slice(&r.embedding_chunk);
        chunks += 1;
        if r.last_chunk {
            break;
        }
    }
    assert!(chunks >= 3, "{chunks} chunks");
    assert_eq!(bytes.len(), 32 * 64 * 64 * 4);
}

#[tokio::test]
async fn bad_requests_get_clear_statuses() {
    let mut settings = tiny_settings();
    settings.limits.max_prompts = 4;
    settings.limits.max_points = 3;
    // The 200x150 image: three prompts' masks fit, four do not.
    settings.limits.max_mask_pixels = 100_000;
    let s = start(settings, true).await;
    let mut seg = SegmentationServiceClient::new(channel(&s).await);
    let handle = |h: &str| pb::segment_request::Source::EmbeddingHandle(h.into());
    let check = |r: Result<tonic::Response<pb::SegmentResponse>, tonic::Status>, code: Code, text: &str| {
        let e = r.err().expect("an error");
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(text), "{:?} lacks {text:?}", e.message());
    };
    check(seg.segment(pb::SegmentRequest { model_id: "nope".into(), ..seg_req(handle("x/y"), 1) }).await, Code::NotFound, "nope");
    check(seg.segment(seg_req(handle("tiny-random/0123"), 1)).await, Code::NotFound, "no embedding");
    check(seg.segment(pb::SegmentRequest { source: None, ..seg_req(handle("x"), 1) }).await, Code::InvalidArgument, "source");
    check(seg.segment(seg_req(pb::segment_request::Source::Image(image()), 0)).await, Code::InvalidArgument, "prompts");
    check(seg.segment(seg_req(pb::segment_request::Source::Image(image()), 5)).await, Code::InvalidArgument, "limit is 4");
    check(seg.segment(seg_req(pb::segment_request::Source::Image(image()), 4)).await, Code::InvalidArgument, "max_mask_pixels");
    check(seg.segment(seg_req(pb::segment_request::Source::Image(b"garbage".to_vec()), 1)).await, Code::InvalidArgument, "image");
    check(
        seg.segment(pb::SegmentRequest { mask_format: 99, ..seg_req(pb::segment_request::Source::Image(image()), 1) }).await,
        Code::InvalidArgument,
        "mask_format",
    );
    let mut bad = seg_req(pb::segment_request::Source::Image(image()), 1);
    bad.prompts[0].points[0].label = 0;
    check(seg.segment(bad).await, Code::InvalidArgument, "prompts[0].points[0].label");
    let mut bad = seg_req(pb::segment_request::Source::Image(image()), 1);
    bad.prompts[0].r#box = Some(pb::Box { x0: 50.0, y0: 0.0, x1: 10.0, y1: 10.0 });
    check(seg.segment(bad).await, Code::InvalidArgument, "prompts[0].box");
    let mut bad = seg_req(pb::segment_request::Source::Image(image()), 1);
    bad.prompts[0].points[0].x = f32::NAN;
    check(seg.segment(bad).await, Code::InvalidArgument, "not finite");
    let mut bad = seg_req(pb::segment_request::Source::Image(image()), 2);
    let p = bad.prompts[1].points[0].clone();
    bad.prompts[1].points = vec![p; 4];
    check(seg.segment(bad).await, Code::InvalidArgument, "prompts[1].points");
    // Several no-prompt cases in one request are answered (they once crashed the model thread).
    let mut empty = seg_req(pb::segment_request::Source::Image(image()), 3);
    empty.prompts = vec![pb::Prompt::default(); 3];
    assert_eq!(seg.segment(empty).await.unwrap().into_inner().masks.len(), 3);
    // The server still serves after all that.
    assert!(seg.segment(seg_req(pb::segment_request::Source::Image(image()), 1)).await.is_ok());
}

#[tokio::test]
async fn a_response_over_the_message_limit_is_resource_exhausted() {
    let mut settings = tiny_settings();
    settings.limits.max_message_bytes = 40_000;
    let s = start(settings, true).await;
    let mut seg = SegmentationServiceClient::new(channel(&s).await);
    // Four prompts with their low-res logits (a 64x64 float grid each for the tiny model).
    let e = seg.segment(seg_req(pb::segment_request::Source::Image(image()), 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("message limit"), "{e:?}");
    // In a stream the same status ends it (not tonic's OUT_OF_RANGE); the server serves on.
    let small = pb::SegmentRequest { return_low_res_logits: false, ..seg_req(pb::segment_request::Source::Image(image()), 1) };
    let reqs = vec![seg_req(pb::segment_request::Source::Image(image()), 4), small.clone()];
    let mut out = seg.segment_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    assert_eq!(out.message().await.unwrap_err().code(), Code::ResourceExhausted);
    assert!(seg.segment(small).await.is_ok());
}

#[tokio::test]
async fn a_passed_deadline_is_deadline_exceeded_and_the_server_serves_on() {
    let s = start(tiny_settings(), true).await;
    let mut seg = SegmentationServiceClient::new(channel(&s).await);
    // A 600x450 PNG to decode and encode: far more than a millisecond of work.
    let source = || pb::segment_request::Source::Image(common::fixture_bytes("ISIC_0024311.png"));
    // A client deadline: tonic's client enforces it too and may answer first (CANCELLED).
    let mut req = tonic::Request::new(seg_req(source(), 1));
    req.set_timeout(Duration::from_millis(1));
    let e = seg.segment(req).await.unwrap_err();
    assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled), "{e:?}");
    assert!(seg.segment(seg_req(source(), 1)).await.is_ok());
    // The server's own limit, for a call without a deadline: only the server can answer.
    let mut settings = tiny_settings();
    settings.limits.request_timeout_ms = 1;
    let s = start(settings, true).await;
    let mut seg = SegmentationServiceClient::new(channel(&s).await);
    assert_eq!(seg.segment(seg_req(source(), 1)).await.unwrap_err().code(), Code::DeadlineExceeded);
}

#[tokio::test]
async fn a_bad_image_in_an_embed_batch_fails_alone() {
    let mut settings = tiny_settings();
    settings.limits.max_embed_batch = 8;
    let s = start(settings, true).await;
    let emb = EmbeddingServiceClient::new(channel(&s).await);
    // Decodes fine, but its short side resizes to nothing.
    let mut thin = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(3000, 1).write_to(&mut thin, image::ImageFormat::Png).unwrap();
    let thin = thin.into_inner();
    let other = common::fixture_bytes("ISIC_0024311.png");
    // A slow request first (a new 600x450 image, 48 prompts, 600x450 PNG masks), so that the
    // model thread finds the three embeds queued behind it and encodes them as one batch.
    let mut seg = SegmentationServiceClient::new(channel(&s).await);
    let slow_req = pb::SegmentRequest {
        return_low_res_logits: false,
        mask_format: pb::MaskFormat::Png as i32,
        ..seg_req(pb::segment_request::Source::Image(other), 48)
    };
    let slow = tokio::spawn(async move { seg.segment(slow_req).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let other = common::fixture_bytes("ISIC_0024311.png");
    let calls = [image(), thin, other].into_iter().map(|bytes| {
        let mut c = emb.clone();
        async move { c.embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: bytes, ..Default::default() }).await }
    });
    let results = futures::future::join_all(calls).await;
    slow.await.unwrap().unwrap();
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let e = results[1].as_ref().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("elongated"), "{e:?}");
}

#[tokio::test]
async fn evicted_handle_says_so() {
    let mut settings = tiny_settings();
    settings.cache.max_bytes = 600_000; // one tiny embedding (524288 bytes)
    let s = start(settings, true).await;
    let ch = channel(&s).await;
    let mut emb = EmbeddingServiceClient::new(ch.clone());
    let a = emb.embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: image(), ..Default::default() }).await.unwrap().into_inner();
    let other = common::fixture_bytes("ISIC_0024311.png");
    emb.embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: other, ..Default::default() }).await.unwrap();
    let mut seg = SegmentationServiceClient::new(ch);
    let e = seg.segment(seg_req(pb::segment_request::Source::EmbeddingHandle(a.embedding_handle), 1)).await.err().unwrap();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("evicted"), "{}", e.message());
}

#[tokio::test]
async fn full_queue_is_resource_exhausted_and_others_still_served() {
    let mut settings = tiny_settings();
    settings.limits.queue_depth = 1;
    let s = start(settings, true).await;
    let ch = channel(&s).await;
    let mut tasks = Vec::new();
    for i in 0..24u8 {
        let mut seg = SegmentationServiceClient::new(ch.clone());
        // Distinct images so that each request needs the encoder.
        let mut img = image::RgbImage::from_pixel(300, 200, image::Rgb([i * 10, 90, 80]));
        img.put_pixel(0, 0, image::Rgb([i, i, i]));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let req = seg_req(pb::segment_request::Source::Image(png.into_inner()), 1);
        tasks.push(tokio::spawn(async move { seg.segment(req).await.map(|_| ()) }));
    }
    let mut exhausted = 0;
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
}

#[tokio::test]
async fn bearer_tokens_guard_rpcs_and_admin_rpcs() {
    let mut settings = tiny_settings();
    settings.auth.token = Some("user-secret".into());
    settings.auth.admin_token = Some("admin-secret".into());
    let s = start(settings, true).await;
    let mut models = ModelServiceClient::new(channel(&s).await);
    fn with<T>(t: &str, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        r
    }
    let e = models.list_models(pb::ListModelsRequest {}).await.err().unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = models.list_models(with("wrong", pb::ListModelsRequest {})).await.err().unwrap();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(models.list_models(with("user-secret", pb::ListModelsRequest {})).await.unwrap().into_inner().models.len(), 1);
    let unload = pb::UnloadModelRequest { id: "tiny-random".into() };
    let e = models.unload_model(with("user-secret", unload.clone())).await.err().unwrap();
    assert!(matches!(e.code(), Code::PermissionDenied), "{e:?}");
    // The admin token passes the interceptor too, for user and admin RPCs alike.
    assert_eq!(models.list_models(with("admin-secret", pb::ListModelsRequest {})).await.unwrap().into_inner().models.len(), 1);
    models.unload_model(with("admin-secret", unload)).await.unwrap();
    assert!(models.list_models(with("user-secret", pb::ListModelsRequest {})).await.unwrap().into_inner().models.is_empty());
    // Health stays open for probes.
    let mut health = HealthClient::new(channel(&s).await);
    assert!(health.check(HealthCheckRequest { service: String::new() }).await.is_ok());
}

#[tokio::test]
async fn health_follows_hot_load_and_unload() {
    let mut settings = tiny_settings();
    settings.models.clear();
    let s = start(settings, false).await;
    let ch = channel(&s).await;
    let mut health = HealthClient::new(ch.clone());
    let status = |h: &mut HealthClient<Channel>| {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest { service: "skinsam.v1.SegmentationService".into() }).await.unwrap().into_inner().status
        }
    };
    assert_eq!(status(&mut health).await, ServingStatus::NotServing as i32);
    let mut models = ModelServiceClient::new(ch.clone());
    let ckpt = common::tiny_checkpoint().display().to_string();
    let info = models
        .load_model(pb::LoadModelRequest {
            id: "hot".into(),
            variant: pb::Variant::Tiny as i32,
            checkpoint: ckpt.clone(),
            device: "cpu".into(),
            decoders: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.state, info.decoders), (pb::ModelState::Loading as i32, 1));
    let mut ready = None;
    for _ in 0..600 {
        let m = models.get_model(pb::GetModelRequest { id: "hot".into() }).await.unwrap().into_inner();
        if m.state == pb::ModelState::Ready as i32 {
            ready = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = ready.expect("model became ready");
    assert_eq!(ready.checkpoint_sha256, skinsam::model::checkpoint::sha256_file(&common::tiny_checkpoint()).unwrap());
    assert_eq!(status(&mut health).await, ServingStatus::Serving as i32);
    let mut seg = SegmentationServiceClient::new(ch.clone());
    let req = pb::SegmentRequest { model_id: "hot".into(), ..seg_req(pb::segment_request::Source::Image(image()), 1) };
    assert!(seg.segment(req.clone()).await.is_ok());
    // Loading the same id twice, a bad variant and a missing checkpoint are refused.
    let dup = models.load_model(pb::LoadModelRequest { id: "hot".into(), variant: pb::Variant::Tiny as i32, ..Default::default() }).await;
    assert_eq!(dup.err().unwrap().code(), Code::FailedPrecondition);
    let bad = models.load_model(pb::LoadModelRequest { id: "x".into(), variant: 0, ..Default::default() }).await;
    assert!(bad.err().unwrap().message().contains("variant"));
    let bad = models.load_model(pb::LoadModelRequest { id: "x".into(), variant: pb::Variant::Tiny as i32, decoders: Some(1000), ..Default::default() }).await;
    let bad = bad.err().unwrap();
    assert!(bad.code() == Code::InvalidArgument && bad.message().contains("decoders"), "{bad:?}");
    let bad = models
        .load_model(pb::LoadModelRequest { id: "y".into(), variant: pb::Variant::Tiny as i32, checkpoint: "/no/such.pth".into(), ..Default::default() })
        .await;
    assert!(bad.err().unwrap().message().contains("checkpoint"));
    // A checkpoint of the wrong variant loads into FAILED with the reason, and does not serve.
    models
        .load_model(pb::LoadModelRequest { id: "wrong".into(), variant: pb::Variant::VitB as i32, checkpoint: ckpt, device: "cpu".into(), ..Default::default() })
        .await
        .unwrap();
    for _ in 0..200 {
        let m = models.get_model(pb::GetModelRequest { id: "wrong".into() }).await.unwrap().into_inner();
        if m.state == pb::ModelState::Failed as i32 {
            assert!(m.error.contains("tiny"), "{}", m.error);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = seg.segment(pb::SegmentRequest { model_id: "wrong".into(), ..req.clone() }).await.err().unwrap();
    assert_eq!(e.code(), Code::Unavailable);

    models.unload_model(pb::UnloadModelRequest { id: "hot".into() }).await.unwrap();
    assert_eq!(seg.segment(req).await.err().unwrap().code(), Code::NotFound);
    assert_eq!(status(&mut health).await, ServingStatus::NotServing as i32);
    assert_eq!(s.registry.list().len(), 1);
}

#[tokio::test]
async fn a_client_that_goes_away_stops_its_stream() {
    let s = start(tiny_settings(), true).await;
    let ch = channel(&s).await;
    // 12 images take the tiny model about 3 s to encode; the wait below is longer, so a server
    // that kept working would have cached the last one.
    let images: Vec<Vec<u8>> = (0..12u8)
        .map(|i| {
            let mut img = image::RgbImage::from_pixel(320, 240, image::Rgb([i, 100, 60]));
            img.put_pixel(1, 1, image::Rgb([i, i, 7]));
            let mut png = std::io::Cursor::new(Vec::new());
            img.write_to(&mut png, image::ImageFormat::Png).unwrap();
            png.into_inner()
        })
        .collect();
    let reqs: Vec<pb::SegmentRequest> = images.iter().map(|b| seg_req(pb::segment_request::Source::Image(b.clone()), 1)).collect();
    let mut seg = SegmentationServiceClient::new(ch.clone());
    let mut out = seg.segment_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    assert!(out.message().await.unwrap().is_some());
    drop(out);
    drop(seg);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Had the server kept working through the abandoned stream, the last image would be cached.
    let mut emb = EmbeddingServiceClient::new(ch);
    let last = emb
        .embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: images[11].clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!last.cache_hit, "the server went on encoding images of a stream whose client had gone");
}

#[tokio::test]
async fn tls_serves_only_tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut settings = tiny_settings();
    settings.tls.cert = Some(cert.clone());
    settings.tls.key = Some(key);
    let s = start(settings, true).await;
    let https = s.url.replace("http://127.0.0.1", "https://localhost");
    let conn = skinsam::cli::Conn { server: https, token: None, ca_cert: Some(cert.clone()) };
    let mut models = ModelServiceClient::new(conn.channel().await.unwrap());
    // A certificate authority with an http:// address would send the token in plaintext: refused.
    let http = skinsam::cli::Conn { server: s.url.clone(), token: Some("t".into()), ca_cert: Some(cert) };
    let e = http.channel().await.unwrap_err().to_string();
    assert!(e.contains("https://"), "{e}");
    assert_eq!(models.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models.len(), 1);
    // A plain-text client gets no answer from the TLS port.
    let plain = Channel::from_shared(s.url.clone()).unwrap().connect().await;
    if let Ok(ch) = plain {
        assert!(ModelServiceClient::new(ch).list_models(pb::ListModelsRequest {}).await.is_err());
    }
}

#[tokio::test]
async fn half_configured_tls_is_refused() {
    let mut settings = tiny_settings();
    settings.models.clear();
    settings.tls.cert = Some("cert.pem".into());
    let (listener, _) = bind("127.0.0.1:0").await.unwrap();
    let err = serve(Registry::new(settings), listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("tls.cert and tls.key"), "{err}");
}

#[tokio::test]
async fn an_overlong_request_id_is_refused_by_name() {
    let s = start(tiny_settings(), true).await;
    let ch = channel(&s).await;
    let long = "x".repeat(skinsam::grpc::convert::MAX_REQUEST_ID_BYTES + 1);
    let mut emb = EmbeddingServiceClient::new(ch.clone());
    let e = emb
        .embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: image(), request_id: long.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("request_id:"), "{}", e.message());
    let mut seg = SegmentationServiceClient::new(ch);
    let e = seg
        .segment(pb::SegmentRequest { request_id: long, ..seg_req(pb::segment_request::Source::Image(image()), 1) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("request_id:"), "{}", e.message());
    // At the limit it is echoed back.
    let id = "y".repeat(skinsam::grpc::convert::MAX_REQUEST_ID_BYTES);
    let r = emb.embed(pb::EmbedRequest { model_id: "tiny-random".into(), image: image(), request_id: id.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(r.into_inner().request_id, id);
}

#[tokio::test]
async fn shutdown_says_not_serving_and_closes_open_streams_after_the_grace_period() {
    let mut settings = tiny_settings();
    settings.limits.shutdown_grace_ms = 2000;
    let mut s = start(settings, true).await;
    let mut watch = HealthClient::new(channel(&s).await).watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    // A segmentation stream open across the signal.
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    let mut seg = SegmentationServiceClient::new(channel(&s).await);
    let mut responses = seg.segment_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    requests.send(seg_req(pb::segment_request::Source::Image(image()), 1)).await.unwrap();
    assert_eq!(responses.message().await.unwrap().unwrap().masks.len(), 1);
    let mut status = watch.message().await.unwrap().unwrap().status;
    for _ in 0..50 {
        if status == ServingStatus::Serving as i32 {
            break;
        }
        status = watch.message().await.unwrap().unwrap().status;
    }
    assert_eq!(status, ServingStatus::Serving as i32);
    let server = s.signal_shutdown();
    // Load balancers watching health are told first.
    let mut told = false;
    while let Ok(Some(m)) = watch.message().await {
        if m.status == ServingStatus::NotServing as i32 {
            told = true;
            break;
        }
    }
    assert!(told, "the watch saw NOT_SERVING");
    // The open stream takes no more work: its next message ends it with UNAVAILABLE.
    requests.send(seg_req(pb::segment_request::Source::Image(image()), 1)).await.unwrap();
    let refused = responses.message().await.expect_err("refused after the signal");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{}", refused.message());
    // The watch stays open (a health watch never ends by itself): the server closes it when the
    // grace period is over, and returns.
    let done = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(done.is_ok(), "serve returned within the grace period, the watch still open");
    done.unwrap().unwrap().unwrap();
    drop(watch);
}

#[tokio::test]
async fn the_load_generator_carries_the_token() {
    let mut settings = tiny_settings();
    settings.auth.token = Some("user-secret".into());
    let s = start(settings, true).await;
    let prompt = skinsam::predictor::Prompt {
        points: vec![skinsam::predictor::PointPrompt { x: 110.0, y: 71.0, label: 1 }],
        bbox: Some([60.0, 2.0, 169.0, 139.0]),
        mask_input: None,
    };
    let conn = |token: Option<&str>| skinsam::cli::Conn { server: s.url.clone(), token: token.map(str::to_owned), ca_cert: None };
    let r = skinsam::loadgen::segment_load(&conn(Some("user-secret")), "tiny-random", image(), &prompt, 1, 2, 4).await.unwrap();
    assert_eq!((r.requests, r.errors), (4, 0));
    let r = skinsam::loadgen::new_image_load(&conn(Some("user-secret")), "tiny-random", vec![image()], 1, Some(&prompt)).await.unwrap();
    assert_eq!((r.requests, r.errors), (1, 0));
    // Without it the server refuses the embedding the run starts with.
    let e = skinsam::loadgen::segment_load(&conn(None), "tiny-random", image(), &prompt, 1, 2, 4).await.err().expect("refused");
    assert!(e.to_string().contains("token") || e.to_string().contains("nauthenticated"), "{e}");
}
