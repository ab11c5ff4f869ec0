//! Per-image metrics as the paper defines them, and their aggregation (its Table 1 format plus
//! median and a 95% interval).
//!
//! Empty masks: when prediction and ground truth are both empty, Dice and IoU are 1 (they agree
//! exactly); when only one is empty they are 0. Pixel accuracy is always defined.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    pub accuracy: f64,
    pub dice: f64,
    pub iou: f64,
}

/// Scores of a predicted mask against the ground truth (0/1 values, the same length).
pub fn score(pred: &[u8], truth: &[u8]) -> ImageScores {
    assert_eq!(pred.len(), truth.len(), "masks of different sizes");
    let (mut inter, mut p, mut g, mut equal) = (0u64, 0u64, 0u64, 0u64);
    for (&a, &b) in pred.iter().zip(truth) {
        let (a, b) = (a != 0, b != 0);
        inter += u64::from(a && b);
        p += u64::from(a);
        g += u64::from(b);
        equal += u64::from(a == b);
    }
    let union = p + g - inter;
    let (dice, iou) = if p + g == 0 { (1.0, 1.0) } else { (2.0 * inter as f64 / (p + g) as f64, inter as f64 / union as f64) };
    let accuracy = if pred.is_empty() { 1.0 } else { equal as f64 / pred.len() as f64 };
    ImageScores { accuracy, dice, iou }
}

/// One metric over a set of images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    /// Sample variance (n - 1 in the denominator; 0 for one image).
    pub variance: f64,
    pub median: f64,
    /// 2.5th and 97.5th percentiles (linear interpolation between order statistics).
    pub p2_5: f64,
    pub p97_5: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self { mean: f64::NAN, variance: f64::NAN, median: f64::NAN, p2_5: f64::NAN, p97_5: f64::NAN };
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        let mut s = values.to_vec();
        s.sort_by(f64::total_cmp);
        Self { mean, variance, median: quantile(&s, 0.5), p2_5: quantile(&s, 0.025), p97_5: quantile(&s, 0.975) }
    }
}

/// Quantile of sorted values, linear between order statistics (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub n: usize,
    pub accuracy: Stat,
    pub dice: Stat,
    pub iou: Stat,
}

impl GroupSummary {
    pub fn of(scores: &[ImageScores]) -> Self {
        let col = |f: fn(&ImageScores) -> f64| scores.iter().map(f).collect::<Vec<_>>();
        Self { n: scores.len(), accuracy: Stat::of(&col(|s| s.accuracy)), dice: Stat::of(&col(|s| s.dice)), iou: Stat::of(&col(|s| s.iou)) }
    }
}

/// Overall and per-label summaries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub overall: GroupSummary,
    pub by_label: BTreeMap<String, GroupSummary>,
}

/// Label used for items without one.
pub const UNLABELLED: &str = "unlabelled";

impl Summary {
    pub fn of<'a>(rows: impl IntoIterator<Item = (Option<&'a str>, ImageScores)>) -> Self {
        let mut all = Vec::new();
        let mut groups: BTreeMap<String, Vec<ImageScores>> = BTreeMap::new();
        for (label, s) in rows {
            all.push(s);
            groups.entry(label.unwrap_or(UNLABELLED).to_owned()).or_default().push(s);
        }
        Self { overall: GroupSummary::of(&all), by_label: groups.into_iter().map(|(k, v)| (k, GroupSummary::of(&v))).collect() }
    }
}
