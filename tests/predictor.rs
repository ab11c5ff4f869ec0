//! Predictor behaviour beyond the golden cases: batching, ordering, micro-batched encoding.

mod common;
use skinsam::image_io::decode_rgb;
use skinsam::predictor::{PointPrompt, Prompt};

fn prompts() -> Vec<Prompt> {
    let pt = |x, y, label| PointPrompt { x, y, label };
    vec![
        Prompt { bbox: Some([60.0, 2.0, 169.0, 139.0]), ..Default::default() },
        Prompt { points: vec![pt(110.0, 71.0, 1)], ..Default::default() },
        Prompt { bbox: Some([10.0, 10.0, 100.0, 90.0]), points: vec![pt(50.0, 50.0, 1)], ..Default::default() },
        Prompt::default(),
        Prompt { bbox: Some([20.0, 30.0, 150.0, 120.0]), ..Default::default() },
        Prompt { points: vec![pt(30.0, 40.0, 1), pt(5.0, 5.0, 0)], ..Default::default() },
        // A second no-prompt case: the decoder gives one output for any number of them.
        Prompt::default(),
    ]
}

#[test]
fn mixed_batch_keeps_order_and_equals_one_by_one() {
    let p = common::tiny_predictor();
    let img = decode_rgb(&common::fixture_bytes("ISIC_0024306.png"), "image", u64::MAX).unwrap();
    let emb = p.set_image(&img).unwrap();
    let all = p.predict(&emb, &prompts(), true).unwrap();
    assert_eq!(all.len(), prompts().len());
    for (i, prompt) in prompts().iter().enumerate() {
        let one = p.predict(&emb, std::slice::from_ref(prompt), true).unwrap().remove(0);
        let d = (&one.low_res_logits - &all[i].low_res_logits).abs().max().double_value(&[]);
        assert!(d < 1e-4, "prompt {i}: batched result differs by {d}");
        assert_eq!(one.masks.size(), vec![3, 150, 200]);
        let best = one.iou_predictions.iter().cloned().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
        assert_eq!(one.best, best, "best is the highest predicted IoU");
    }
}

#[test]
fn single_mask_output_has_one_mask() {
    let p = common::tiny_predictor();
    let img = decode_rgb(&common::fixture_bytes("ISIC_0024306.png"), "image", u64::MAX).unwrap();
    let emb = p.set_image(&img).unwrap();
    let r = p.predict(&emb, &prompts()[..1], false).unwrap();
    assert_eq!(r[0].masks.size(), vec![1, 150, 200]);
    assert_eq!(r[0].iou_predictions.len(), 1);
    assert_eq!(r[0].low_res_logits.size(), vec![1, 256, 256]);
    assert_eq!(r[0].best, 0);
}

#[test]
fn micro_batched_encoding_equals_one_by_one() {
    let p = common::tiny_predictor();
    let a = decode_rgb(&common::fixture_bytes("ISIC_0024306.png"), "image", u64::MAX).unwrap();
    let b = decode_rgb(&common::fixture_bytes("ISIC_0024311.png"), "image", u64::MAX).unwrap();
    let batch = p.set_images(&[&a, &b]).unwrap();
    for (img, e) in [&a, &b].into_iter().zip(&batch) {
        let single = p.set_image(img).unwrap();
        assert_eq!(single.input_size, e.input_size);
        assert_eq!(single.original_size, e.original_size);
        let d = (&single.features - &e.features).abs().max().double_value(&[]);
        assert!(d < 1e-4, "batched embedding differs by {d}");
    }
}

#[test]
fn mask_input_refines_a_previous_prediction() {
    let p = common::tiny_predictor();
    let img = decode_rgb(&common::fixture_bytes("ISIC_0024306.png"), "image", u64::MAX).unwrap();
    let emb = p.set_image(&img).unwrap();
    let first = p.predict(&emb, &prompts()[..1], true).unwrap().remove(0);
    let logits = Vec::<f32>::try_from(first.low_res_logits.get(first.best as i64).flatten(0, -1)).unwrap();
    let again = Prompt { mask_input: Some(logits), ..prompts()[0].clone() };
    let second = p.predict(&emb, &[again], true).unwrap().remove(0);
    let d = (&second.low_res_logits - &first.low_res_logits).abs().max().double_value(&[]);
    assert!(d > 1e-3, "the mask prompt changed nothing");
}

#[test]
fn best_only_post_processing_gives_the_best_of_all() {
    let p = common::tiny_predictor();
    let img = decode_rgb(&common::fixture_bytes("ISIC_0024311.png"), "image", u64::MAX).unwrap();
    let emb = p.set_image(&img).unwrap();
    let all = p.predict(&emb, &prompts(), true).unwrap();
    let best = p.predict_masks(&emb, &prompts(), true, skinsam::predictor::Masks::Best).unwrap();
    for (a, b) in all.iter().zip(&best) {
        assert_eq!(b.masks.size(), vec![1, 450, 600]);
        assert_eq!(a.best, b.best);
        assert!(a.best_mask().equal(&b.best_mask()));
    }
}

/// The decoder prefix cached with an embedding, and a channels-last layout, are shortcuts: the
/// results equal those of an embedding without either. The default model (8 decoder heads) also
/// takes the folded-projection attention path, which the tiny model's 4 narrow heads do not.
#[test]
fn cached_decoder_prefix_and_layout_change_nothing() {
    use skinsam::model::{Sam, SamVariant};
    use skinsam::predictor::{ImageEmbedding, Predictor};
    let default_model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/skinsam_tiny.safetensors");
    let sam = Sam::load(SamVariant::SkinsamTiny, &default_model, tch::Device::Cpu)
        .unwrap()
        .0;
    for p in [common::tiny_predictor(), Predictor::new(sam)] {
        let img = decode_rgb(
            &common::fixture_bytes("ISIC_0024311.png"),
            "image",
            u64::MAX,
        )
        .unwrap();
        let emb = p.set_image(&img).unwrap();
        assert!(emb.prefix.is_some(), "set_image computes the prefix");
        let plain = ImageEmbedding {
            features: emb.features.contiguous(),
            prefix: None,
            ..emb.shallow_clone()
        };
        let a = p.predict(&emb, &prompts(), true).unwrap();
        let b = p.predict(&plain, &prompts(), true).unwrap();
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            let d = (&a.low_res_logits - &b.low_res_logits)
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-4, "prompt {i}: logits differ by {d}");
            assert_eq!(a.iou_predictions.len(), b.iou_predictions.len());
            for (x, y) in a.iou_predictions.iter().zip(&b.iou_predictions) {
                assert!((x - y).abs() < 1e-5, "prompt {i}: IoU {x} vs {y}");
            }
        }
    }
}

/// Post-processing up-samples only the un-padded part; it must equal the official
/// up-sample-crop-resize exactly.
#[test]
fn cropped_post_processing_equals_the_official_order() {
    let p = common::tiny_predictor();
    let low = tch::Tensor::randn([2, 3, 256, 256], (tch::Kind::Float, tch::Device::Cpu));
    for (input, original) in [
        ((768, 1024), (450, 600)),
        ((1024, 683), (3000, 2000)),
        ((1024, 1024), (1000, 1000)),
    ] {
        let got = p.sam.postprocess_masks(&low, input, original);
        let up = low
            .upsample_bilinear2d([1024, 1024], false, None, None)
            .narrow(2, 0, input.0)
            .narrow(3, 0, input.1);
        let want = up.upsample_bilinear2d([original.0, original.1], false, None, None);
        assert!(got.equal(&want), "{input:?} -> {original:?}");
    }
}
