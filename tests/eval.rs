//! Evaluation building blocks without a server: the prompt simulation's distribution, the
//! metrics on hand-computed cases, aggregation, the statistics against scipy's values, the
//! dataset reader's error cases and the report files.

mod common;
use skinsam::eval::dataset::{BinaryMask, Dataset};
use skinsam::eval::prompts::{box_ellipse, draw, image_rng, simulate, PromptMode, SimParams};
use skinsam::eval::scores::{score, ImageScores, Stat, Summary};
use skinsam::eval::stats::{bootstrap_ci, erfc, paired, wilcoxon_signed_rank};
use std::path::Path;

/// A w x h mask with a filled rectangle [x0, x1] x [y0, y1] (inclusive).
fn rect_mask(w: u32, h: u32, x0: u32, y0: u32, x1: u32, y1: u32) -> BinaryMask {
    let mut data = vec![0u8; (w * h) as usize];
    for y in y0..=y1 {
        for x in x0..=x1 {
            data[(y * w + x) as usize] = 1;
        }
    }
    BinaryMask { width: w, height: h, data }
}

#[test]
fn box_simulation_respects_margin_shift_and_scale() {
    // Far from the borders, so that no box is clipped.
    let m = rect_mask(600, 450, 200, 150, 399, 299);
    let p = SimParams::default();
    let (mut min_dx, mut max_dx, mut sum_dx, mut min_s, mut max_s) = (f32::MAX, f32::MIN, 0.0, f32::MAX, f32::MIN);
    let n = 2000;
    for seed in 0..n {
        let b = simulate(&m, PromptMode::Box, &p, seed, "img").bbox.unwrap();
        // Unperturbed box: [180, 130, 419, 319], centre (299.5, 224.5), size 239 x 189.
        let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
        let (sw, sh) = ((b[2] - b[0]) / 239.0, (b[3] - b[1]) / 189.0);
        assert!((cx - 299.5).abs() <= 30.0 + 1e-3 && (cy - 224.5).abs() <= 30.0 + 1e-3, "shift within 30 px: {b:?}");
        assert!((sw - sh).abs() < 1e-4, "one scale for width and height");
        assert!((0.9 - 1e-4..=1.1 + 1e-4).contains(&sw), "scale within 10%: {sw}");
        let dx = cx - 299.5;
        min_dx = min_dx.min(dx);
        max_dx = max_dx.max(dx);
        sum_dx += dx;
        min_s = min_s.min(sw);
        max_s = max_s.max(sw);
    }
    // Uniform over the whole range, centred.
    assert!(min_dx < -28.0 && max_dx > 28.0, "shifts cover +-30: {min_dx} {max_dx}");
    assert!(min_s < 0.905 && max_s > 1.095, "scales cover 0.9..1.1: {min_s} {max_s}");
    assert!((sum_dx / n as f32).abs() < 1.5, "mean shift near 0: {}", sum_dx / n as f32);
}

#[test]
fn reference_width_scales_the_offsets() {
    // A 200-px copy of a 600-px original: margin 20 -> 6.67 px, shift 30 -> 10 px.
    let m = rect_mask(200, 150, 60, 50, 139, 99);
    let p = SimParams { reference_width: 600, max_shift: 0.0, max_scale: 0.0, ..SimParams::default() };
    let b = simulate(&m, PromptMode::Box, &p, 3, "x").bbox.unwrap();
    let want = [60.0 - 20.0 / 3.0, 50.0 - 20.0 / 3.0, 139.0 + 20.0 / 3.0, 99.0 + 20.0 / 3.0];
    for (g, w) in b.iter().zip(want) {
        assert!((g - w).abs() < 1e-3, "{b:?} vs {want:?}");
    }
    let p = SimParams { reference_width: 600, ..SimParams::default() };
    for seed in 0..500 {
        let b = simulate(&m, PromptMode::Box, &p, seed, "x").bbox.unwrap();
        assert!(((b[0] + b[2]) / 2.0 - 99.5).abs() <= 10.0 + 1e-3, "shift within 10 px at 200 px: {b:?}");
    }
}

#[test]
fn point_is_inside_the_mask_and_box_is_clipped() {
    // An L-shaped mask touching the image border.
    let mut m = rect_mask(50, 40, 0, 0, 9, 39);
    for y in 30..40 {
        for x in 0..50 {
            m.data[y * 50 + x] = 1;
        }
    }
    for seed in 0..500 {
        let s = simulate(&m, PromptMode::BoxPoint, &SimParams::default(), seed, "L");
        let [x, y] = s.point.unwrap();
        assert_eq!(m.data[y as usize * 50 + x as usize], 1, "point {x},{y} inside the mask");
        let b = s.bbox.unwrap();
        assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 49.0 && b[3] <= 39.0, "clipped to the image: {b:?}");
    }
    // Every foreground pixel can be drawn (uniform over the mask): both arms of the L are hit.
    let (mut arm_v, mut arm_h) = (0, 0);
    for seed in 0..300 {
        let [x, y] = simulate(&m, PromptMode::Point, &SimParams::default(), seed, "L").point.unwrap();
        if y < 30.0 {
            arm_v += 1;
        } else if x >= 10.0 {
            arm_h += 1;
        }
        let _ = x;
    }
    assert!(arm_v > 30 && arm_h > 30, "{arm_v} {arm_h}");
}

#[test]
fn prompts_are_deterministic_per_seed_and_image_and_shared_between_modes() {
    let m = rect_mask(100, 80, 20, 20, 70, 60);
    let p = SimParams::default();
    let a = simulate(&m, PromptMode::BoxPoint, &p, 7, "ISIC_1");
    assert_eq!(a, simulate(&m, PromptMode::BoxPoint, &p, 7, "ISIC_1"));
    assert_ne!(a, simulate(&m, PromptMode::BoxPoint, &p, 8, "ISIC_1"));
    assert_ne!(a, simulate(&m, PromptMode::BoxPoint, &p, 7, "ISIC_2"));
    assert_eq!(simulate(&m, PromptMode::Box, &p, 7, "ISIC_1").bbox, a.bbox);
    assert_eq!(simulate(&m, PromptMode::Point, &p, 7, "ISIC_1").point, a.point);
    let none = simulate(&m, PromptMode::None, &p, 7, "ISIC_1");
    assert!(none.bbox.is_none() && none.point.is_none());
    // An empty mask gives no prompt at all.
    let empty = BinaryMask { width: 10, height: 10, data: vec![0; 100] };
    assert_eq!(draw(&empty, &p, &mut image_rng(0, "e")), (None, None));
}

#[test]
fn metrics_on_hand_computed_cases() {
    let s = score(&[1, 1, 0, 0], &[1, 0, 1, 0]);
    assert_eq!(s, ImageScores { accuracy: 0.5, dice: 0.5, iou: 1.0 / 3.0 });
    let s = score(&[1, 1, 1, 0], &[1, 1, 0, 0]);
    assert!((s.dice - 0.8).abs() < 1e-12 && (s.iou - 2.0 / 3.0).abs() < 1e-12 && (s.accuracy - 0.75).abs() < 1e-12);
    // Empty cases, as documented: both empty agree perfectly; one empty scores 0.
    assert_eq!(score(&[0, 0, 0], &[0, 0, 0]), ImageScores { accuracy: 1.0, dice: 1.0, iou: 1.0 });
    assert_eq!(score(&[0, 0, 0, 0], &[0, 1, 1, 0]), ImageScores { accuracy: 0.5, dice: 0.0, iou: 0.0 });
    assert_eq!(score(&[1, 1, 1, 1], &[0, 0, 0, 0]), ImageScores { accuracy: 0.0, dice: 0.0, iou: 0.0 });
}

#[test]
fn aggregation_mean_variance_median_interval() {
    let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(s.mean, 2.5);
    assert!((s.variance - 5.0 / 3.0).abs() < 1e-12);
    assert_eq!(s.median, 2.5);
    assert!((s.p2_5 - 1.075).abs() < 1e-12 && (s.p97_5 - 3.925).abs() < 1e-12);
    assert_eq!(Stat::of(&[0.7]).variance, 0.0);
    let rows = [
        (Some("nv"), ImageScores { accuracy: 1.0, dice: 0.8, iou: 0.6 }),
        (Some("nv"), ImageScores { accuracy: 0.5, dice: 0.6, iou: 0.4 }),
        (Some("mel"), ImageScores { accuracy: 0.9, dice: 0.9, iou: 0.8 }),
        (None, ImageScores { accuracy: 0.0, dice: 0.0, iou: 0.0 }),
    ];
    let s = Summary::of(rows);
    assert_eq!(s.overall.n, 4);
    assert!((s.overall.dice.mean - 0.575).abs() < 1e-12);
    assert_eq!(s.by_label["nv"].n, 2);
    assert!((s.by_label["nv"].dice.mean - 0.7).abs() < 1e-12);
    assert!((s.by_label["nv"].dice.variance - 0.02).abs() < 1e-12);
    assert_eq!(s.by_label["mel"].iou.mean, 0.8);
    assert_eq!(s.by_label["unlabelled"].n, 1);
}

#[test]
fn statistics_match_scipy() {
    // scipy.stats.wilcoxon(d) -> statistic 24.0, pvalue 0.041259765625 (exact).
    let d = [6.0, 8.0, 14.0, 16.0, 23.0, 24.0, 28.0, 29.0, 41.0, -48.0, 49.0, 56.0, 60.0, -67.0, 75.0];
    assert!((wilcoxon_signed_rank(&d) - 0.041259765625).abs() < 1e-12);
    // Tied magnitudes and a zero: scipy.stats.wilcoxon(t, correction=True) -> 0.02152119464256303.
    let t = [0.5, 0.5, -0.5, 1.0, 1.0, 1.5, 2.0, -2.0, 2.5, 3.0, 3.0, 3.0, 0.0, 4.0, -1.0];
    assert!((wilcoxon_signed_rank(&t) - 0.02152119464256303).abs() < 1e-9, "{}", wilcoxon_signed_rank(&t));
    // All differences zero: no evidence at all.
    assert_eq!(wilcoxon_signed_rank(&[0.0, 0.0]), 1.0);
    // scipy.special.erfc.
    for (x, want) in [(0.1, 0.8875370839817152), (0.3, 0.6713732405408726), (0.5, 0.4795001221869535), (1.0, 0.15729920705028516), (2.0, 0.004677734981047266), (3.5, 7.430983723414129e-07), (5.0, 1.5374597944280347e-12), (-1.0, 1.8427007929497148)] {
        assert!(((erfc(x) - want) / want).abs() < 1e-9, "erfc({x}) = {} vs {want}", erfc(x));
    }
}

#[test]
fn paired_comparison_and_bootstrap() {
    let a: Vec<f64> = (0..200).map(|i| 0.7 + 0.001 * (i % 50) as f64).collect();
    let b: Vec<f64> = a.iter().enumerate().map(|(i, x)| x + if i % 4 == 0 { 0.0 } else { 0.05 }).collect();
    let p = paired(&a, &b, 1);
    assert_eq!((p.wins, p.ties, p.losses, p.n), (150, 50, 0, 200));
    assert!((p.mean_diff - 0.0375).abs() < 1e-12);
    assert!(p.ci95_low < 0.0375 && p.ci95_high > 0.0375 && p.ci95_low > 0.03 && p.ci95_high < 0.045, "{p:?}");
    assert!(p.wilcoxon_p < 1e-20);
    assert_eq!(paired(&a, &b, 1), p, "seeded");
    // A wider spread gives a wider interval.
    let wide: Vec<f64> = (0..200).map(|i| if i % 2 == 0 { 0.3 } else { -0.2 }).collect();
    let (lo, hi) = bootstrap_ci(&wide, 2000, 0);
    assert!(lo < 0.05 && hi > 0.05 && hi - lo > 0.05);
}

#[test]
fn box_ellipse_is_the_inscribed_ellipse() {
    let m = box_ellipse(Some([10.0, 20.0, 110.0, 80.0]), 200, 100);
    let area = m.area() as f64;
    let want = std::f64::consts::PI * 50.0 * 30.0;
    assert!((area - want).abs() / want < 0.01, "{area} vs {want}");
    assert_eq!(m.data[50 * 200 + 60], 1, "centre inside");
    assert_eq!(m.data[20 * 200 + 10], 0, "box corner outside");
    assert_eq!(box_ellipse(None, 4, 4).area(), 0);
    // Box coordinates are pixel indices: [10, 10, 20, 20] spans pixels 10..=20, and its circle
    // (radius 5 about pixel 15) is symmetric within them: 81 pixels, 10 and 20 included.
    let c = box_ellipse(Some([10.0, 10.0, 20.0, 20.0]), 32, 32);
    assert_eq!(c.area(), 81);
    let at = |x: usize, y: usize| c.data[y * 32 + x];
    assert!(at(10, 15) == 1 && at(20, 15) == 1 && at(15, 10) == 1 && at(15, 20) == 1);
    assert!(at(9, 15) == 0 && at(21, 15) == 0 && at(15, 9) == 0 && at(15, 21) == 0);
    for y in 0..32 {
        for x in 0..=30 {
            assert_eq!(at(x, y), at(30 - x, y), "mirror symmetric about pixel 15");
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn reader_reads_the_ham10000_layout() {
    let ds = Dataset::open(&common::fixtures().join("ham_mini")).unwrap();
    assert_eq!(ds.layout, "ham10000");
    assert_eq!(ds.items.len(), 9);
    assert!(ds.problems.is_empty());
    let mut labels: Vec<_> = ds.items.iter().filter_map(|i| i.label.clone()).collect();
    labels.sort();
    labels.dedup();
    assert_eq!(labels, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]);
    assert!(ds.items.iter().all(|i| i.group.as_deref().is_some_and(|g| g.starts_with("HAM_"))));
    let mut f = ds.clone();
    f.filter(&["mel".into()], 0);
    assert_eq!(f.items.len(), 2);
    let mut s = ds.clone();
    s.shard(1, 3);
    assert_eq!(s.items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), [ds.items[1].id.clone(), ds.items[4].id.clone(), ds.items[7].id.clone()]);
}

#[test]
fn reader_error_cases() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    copy_dir(&common::fixtures().join("ham_mini"), &root);
    // A missing mask is reported and the item skipped; the others stay.
    let first = Dataset::open(&root).unwrap().items[0].clone();
    std::fs::remove_file(&first.mask).unwrap();
    let ds = Dataset::open(&root).unwrap();
    assert_eq!(ds.items.len(), 8);
    assert_eq!(ds.problems.len(), 1);
    assert!(ds.problems[0].message.contains("no mask"), "{:?}", ds.problems);
    // The filters select the unusable images as they select the others: shards list each once,
    // and a run over other labels or ids does not list it.
    let listed = |f: &dyn Fn(&mut Dataset)| {
        let mut d = ds.clone();
        f(&mut d);
        d.problems.len()
    };
    assert_eq!(listed(&|d| d.shard(0, 2)) + listed(&|d| d.shard(1, 2)), 1);
    let label = first.label.clone().unwrap();
    let other = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"].into_iter().find(|l| *l != label).unwrap();
    assert_eq!(listed(&|d| d.filter(std::slice::from_ref(&label), 0)), 1);
    assert_eq!(listed(&|d| d.filter(&[other.to_owned()], 0)), 0);
    assert_eq!(listed(&|d| d.keep_ids(std::slice::from_ref(&first.id), 0)), 1);
    assert_eq!(listed(&|d| d.keep_ids(&[ds.items[0].id.clone()], 0)), 0);
    // A metadata CSV without the needed columns names them.
    std::fs::write(root.join("HAM10000_metadata.csv"), "lesion,image,diagnosis\nHAM_1,ISIC_1,nv\n").unwrap();
    let e = Dataset::open(&root).unwrap_err().to_string();
    assert!(e.contains("image_id") && e.contains("dx"), "{e}");
    // HAM10000's lesion_id is required: without it a split by lesion would silently be random.
    std::fs::write(root.join("HAM10000_metadata.csv"), "image_id,dx\nISIC_1,nv\n").unwrap();
    let e = Dataset::open(&root).unwrap_err().to_string();
    assert!(e.contains("lesion_id"), "{e}");
    // No masks folder, no dataset.
    let e = Dataset::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    // Generic layout: stems paired, labels optional.
    let g = dir.path().join("generic");
    std::fs::create_dir_all(g.join("images")).unwrap();
    std::fs::create_dir_all(g.join("masks")).unwrap();
    std::fs::copy(common::fixtures().join("images/ISIC_0024311.png"), g.join("images/a.png")).unwrap();
    std::fs::copy(common::fixtures().join("images/ISIC_0024311_segmentation.png"), g.join("masks/a_mask.png")).unwrap();
    let ds = Dataset::open(&g).unwrap();
    assert_eq!((ds.layout, ds.items.len(), ds.items[0].label.clone()), ("generic", 1, None));
    std::fs::write(g.join("labels.csv"), "image_id,label\na,mel\n").unwrap();
    assert_eq!(Dataset::open(&g).unwrap().items[0].label.as_deref(), Some("mel"));
}

#[test]
fn nearest_resize_keeps_masks_binary() {
    let m = rect_mask(600, 450, 300, 0, 599, 449);
    let r = m.resize_nearest(200, 150);
    assert!(r.data.iter().all(|&v| v <= 1));
    assert_eq!(r.area(), 100 * 150);
}

#[test]
fn a_report_with_unreadable_or_different_overlay_images_is_still_written() {
    use skinsam::eval::report::{write_report, RunInfo};
    use skinsam::eval::runner::{ImageResult, ModelResult};
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (20u32, 10u32);
    let row = |index: usize, id: &str, dice: f64| ImageResult {
        index,
        id: id.into(),
        label: Some("nv".into()),
        group: None,
        width: w,
        height: h,
        mask_resized: false,
        prompt: Default::default(),
        results: vec![ModelResult {
            model: "m".into(),
            scores: ImageScores { accuracy: dice, dice, iou: dice },
            predicted_iou: 0.9,
            mask_rle: Some(skinsam::masks::to_rle(&vec![1u8; (w * h) as usize], h as usize, w as usize)),
        }],
    };
    // Two best and two worst overlays are drawn for five images: "unreadable" and "other_size"
    // are among them.
    let rows = vec![row(0, "same", 0.9), row(1, "unreadable", 0.8), row(2, "fine", 0.7), row(3, "also_fine", 0.6), row(4, "other_size", 0.5)];
    let info = RunInfo { dataset: "d".into(), models: vec!["m".into()], settings: serde_json::json!({}), skipped: vec![] };
    // A stale overlay of an earlier report in the same folder.
    std::fs::create_dir_all(dir.path().join("overlays")).unwrap();
    std::fs::write(dir.path().join("overlays/m_best_old_dice0.100.png"), b"old").unwrap();
    let load = |id: &str| -> anyhow::Result<(image::RgbImage, BinaryMask)> {
        let size = if id == "other_size" { (2 * w, 2 * h) } else { (w, h) };
        anyhow::ensure!(id != "unreadable", "not in the local dataset");
        Ok((image::RgbImage::new(size.0, size.1), BinaryMask { width: size.0, height: size.1, data: vec![1; (size.0 * size.1) as usize] }))
    };
    write_report(dir.path(), &info, &rows, 1, Some(&load)).expect("the report is written");
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("No overlay for 2 image(s)") && md.contains("other_size (here 40x20, scored at 20x10)") && md.contains("unreadable"), "{md}");
    let overlays: Vec<String> = std::fs::read_dir(dir.path().join("overlays")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut drawn: Vec<&str> = overlays.iter().map(|n| n.split('_').nth(2).unwrap()).collect();
    drawn.sort();
    assert_eq!(drawn, ["also", "same"], "{overlays:?}");
}
