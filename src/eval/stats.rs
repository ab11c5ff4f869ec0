//! Paired comparison of two models on the same images and prompts: mean difference with a
//! bootstrap 95% confidence interval, the Wilcoxon signed-rank test, win/tie/loss counts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Differences smaller than this count as ties (masks agreeing to float noise).
pub const TIE_EPS: f64 = 1e-9;
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub n: usize,
    /// Mean of (b - a).
    pub mean_diff: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    /// Two-sided p-value of the Wilcoxon signed-rank test (zero differences dropped).
    pub wilcoxon_p: f64,
    /// b better / equal / worse than a.
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
}

/// Compares paired values `a[i]`, `b[i]` (b - a).
pub fn paired(a: &[f64], b: &[f64], seed: u64) -> Paired {
    assert_eq!(a.len(), b.len(), "paired samples of different lengths");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let n = d.len();
    if n == 0 {
        return Paired { wilcoxon_p: f64::NAN, mean_diff: f64::NAN, ci95_low: f64::NAN, ci95_high: f64::NAN, ..Default::default() };
    }
    let (lo, hi) = bootstrap_ci(&d, BOOTSTRAP_RESAMPLES, seed);
    Paired {
        n,
        mean_diff: d.iter().sum::<f64>() / n as f64,
        ci95_low: lo,
        ci95_high: hi,
        wilcoxon_p: wilcoxon_signed_rank(&d),
        wins: d.iter().filter(|&&x| x > TIE_EPS).count(),
        ties: d.iter().filter(|&&x| x.abs() <= TIE_EPS).count(),
        losses: d.iter().filter(|&&x| x < -TIE_EPS).count(),
    }
}

/// Percentile bootstrap 95% interval of the mean.
pub fn bootstrap_ci(d: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = d.len();
    let mut means: Vec<f64> = (0..resamples).map(|_| (0..n).map(|_| d[rng.random_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    (super::scores::quantile(&means, 0.025), super::scores::quantile(&means, 0.975))
}

/// Two-sided p-value of the Wilcoxon signed-rank test on differences `d` (zeros dropped, as
/// Wilcoxon proposed). Exact null distribution for up to 50 non-zero differences without tied
/// magnitudes; otherwise the normal approximation with tie and continuity corrections (what
/// scipy.stats.wilcoxon computes with correction=True).
pub fn wilcoxon_signed_rank(d: &[f64]) -> f64 {
    let nz: Vec<f64> = d.iter().copied().filter(|x| x.abs() > TIE_EPS).collect();
    let n = nz.len();
    if n == 0 {
        return 1.0;
    }
    // Average ranks of |d|.
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&i, &j| nz[i].abs().total_cmp(&nz[j].abs()));
    let mut ranks = vec![0.0; n];
    let mut tie_term = 0.0;
    let mut has_ties = false;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && (nz[idx[j + 1]].abs() - nz[idx[i]].abs()).abs() <= TIE_EPS {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        if t > 1.0 {
            has_ties = true;
            tie_term += t * t * t - t;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let w_plus: f64 = nz.iter().zip(&ranks).filter(|(x, _)| **x > 0.0).map(|(_, r)| r).sum();
    let total = (n * (n + 1)) as f64 / 2.0;
    let w = w_plus.min(total - w_plus);
    if n <= 50 && !has_ties {
        // counts[s] = number of sign assignments whose positive ranks sum to s.
        let max = n * (n + 1) / 2;
        let mut counts = vec![0.0f64; max + 1];
        counts[0] = 1.0;
        for r in 1..=n {
            for s in (r..=max).rev() {
                counts[s] += counts[s - r];
            }
        }
        let tail: f64 = counts[..=(w.floor() as usize)].iter().sum();
        return (2.0 * tail / 2f64.powi(n as i32)).min(1.0);
    }
    let nf = n as f64;
    let mean = nf * (nf + 1.0) / 4.0;
    let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term / 48.0;
    if var <= 0.0 {
        return 1.0;
    }
    let z = ((w - mean).abs() - 0.5).max(0.0) / var.sqrt();
    (2.0 * normal_sf(z)).min(1.0)
}

/// Upper tail of the standard normal distribution.
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function (W. J. Cody's rational approximations, about 1e-15 relative).
pub fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < 0.5 {
        return 1.0 - erf_small(x);
    }
    if x < 4.0 {
        const P: [f64; 9] = [
            5.64188496988670089e-1, 8.88314979438837594, 6.61191906371416295e1, 2.98635138197400131e2, 8.81952221241769090e2,
            1.71204761263407058e3, 2.05107837782607147e3, 1.23033935479799725e3, 2.15311535474403846e-8,
        ];
        const Q: [f64; 8] = [
            1.57449261107098347e1, 1.17693950891312499e2, 5.37181101862009858e2, 1.62138957456669019e3, 3.29079923573345963e3,
            4.36261909014324716e3, 3.43936767414372164e3, 1.23033935480374942e3,
        ];
        let mut num = P[8] * x;
        let mut den = x;
        for i in 0..7 {
            num = (num + P[i]) * x;
            den = (den + Q[i]) * x;
        }
        return (-x * x).exp() * (num + P[7]) / (den + Q[7]);
    }
    const P: [f64; 6] = [3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2];
    const Q: [f64; 5] = [2.56852019228982242, 1.87295284992346725, 5.27905102951428412e-1, 6.05183413124413191e-2, 2.33520497626869185e-3];
    let z = 1.0 / (x * x);
    let mut num = P[5] * z;
    let mut den = z;
    for i in 0..4 {
        num = (num + P[i]) * z;
        den = (den + Q[i]) * z;
    }
    let r = z * (num + P[4]) / (den + Q[4]);
    (-x * x).exp() / x * ((1.0 / std::f64::consts::PI.sqrt()) - r)
}

fn erf_small(x: f64) -> f64 {
    const A: [f64; 5] = [3.16112374387056560, 1.13864154151050156e2, 3.77485237685302021e2, 3.20937758913846947e3, 1.85777706184603153e-1];
    const B: [f64; 4] = [2.36012909523441209e1, 2.44024637934444173e2, 1.28261652607737228e3, 2.84423683343917062e3];
    let z = x * x;
    let mut num = A[4] * z;
    let mut den = z;
    for i in 0..3 {
        num = (num + A[i]) * z;
        den = (den + B[i]) * z;
    }
    x * (num + A[3]) / (den + B[3])
}
