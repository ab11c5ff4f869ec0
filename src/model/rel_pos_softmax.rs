//! The global attention's bias-and-softmax step, fused into one pass over each query's logits
//! while they are in cache.
//!
//! bf16 on AVX-512 CPUs: for each query row of a chunk, libtorch needs three passes over the
//! chunk's bf16 logits (add the relative-position term of the key's row, add that of its column,
//! softmax), each one reading and writing the whole 2 MiB chunk and rounding to bf16 in between:
//! 0.74 of a vit_b head chunk's 1.55 ms on the 2-core build machine, more than the chunk's two
//! matrix products. Here one 4096-key row (8 KiB) at a time stays in L1 while it is biased,
//! exponentiated and normalised, in fp32, and is rounded to bf16 once.
//!
//! fp32 on AVX2 CPUs (every x86-64 SAM runs on in practice): the same step in both layouts the
//! attention uses, query rows ([`bias_softmax_f32_rows_`], products as matrix products) and keys
//! as rows ([`bias_softmax_f32_cols_`], products as 1x1 convolutions). libtorch's two broadcast
//! additions and its softmax over the keys, which in the second layout is a strided one, were
//! about 14% of a vit_b fp32 embedding on the AVX2 build machine (`perf`).

use tch::{Device, Kind, Tensor};

/// Turns `logits` (M, h * w) into softmax(logits + rel_h[:, key row] + rel_w[:, key column])
/// over the last axis, in place; rel_h is (M, h), rel_w (M, w), the keys laid out row-major on
/// the h x w grid. Returns false (leaving `logits` untouched) where this path does not apply:
/// not bf16 on the CPU, not contiguous, tracked by autograd, a row width that is not a multiple
/// of 16, or a CPU without AVX-512; the caller then takes libtorch's ops.
pub fn bias_softmax_bf16_(logits: &mut Tensor, rel_h: &Tensor, rel_w: &Tensor) -> bool {
    let (Ok((m, n)), Ok((mh, h)), Ok((mw, w))) = (logits.size2(), rel_h.size2(), rel_w.size2()) else {
        return false;
    };
    let applies = mh == m && mw == m && n == h * w && h > 0 && w > 0 && w % LANES == 0 && w <= MAX_ROW_WIDTH;
    let Some((out, rh, rw)) = kernel_slices::<u16>(Kind::BFloat16, applies && avx512_available(), logits, rel_h, rel_w) else {
        return false;
    };
    let (h, w) = (h as usize, w as usize);
    let mut row_buf = vec![0f32; h * w];
    for ((row, rh), rw) in out.chunks_exact_mut(h * w).zip(rh.chunks_exact(h)).zip(rw.chunks_exact(w)) {
        // SAFETY: AVX-512F was detected above; the slices have the lengths the kernel expects.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::bias_softmax_row(row, rh, rw, &mut row_buf)
        };
        // Elsewhere `avx512_available` is false, so kernel_slices was not asked.
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{:?}", (row.len(), rh.len(), rw.len(), row_buf.len()));
    }
    true
}

/// fp32, one query per row: `logits` (M, h * w) <- softmax(logits + rel_h[:, key row] +
/// rel_w[:, key column]) over the last axis, in place; rel_h is (M, h), rel_w (M, w). Returns
/// false (leaving `logits` untouched) where this path does not apply: not fp32 on the CPU, not
/// contiguous, tracked by autograd, shapes that do not agree, a row width that is not a multiple
/// of 8, or a CPU without AVX2 and FMA; the caller then takes libtorch's ops.
pub fn bias_softmax_f32_rows_(logits: &mut Tensor, rel_h: &Tensor, rel_w: &Tensor) -> bool {
    let (Ok((m, n)), Ok((mh, h)), Ok((mw, w))) = (logits.size2(), rel_h.size2(), rel_w.size2()) else {
        return false;
    };
    let applies = mh == m && mw == m && n == h * w && h > 0 && w > 0 && w % AVX2_LANES == 0;
    let Some((out, rh, rw)) = kernel_slices::<f32>(Kind::Float, applies && avx2_fma_available(), logits, rel_h, rel_w) else {
        return false;
    };
    let (h, w) = (h as usize, w as usize);
    for ((row, rh), rw) in out.chunks_exact_mut(h * w).zip(rh.chunks_exact(h)).zip(rw.chunks_exact(w)) {
        // SAFETY: AVX2 and FMA were detected (checked before kernel_slices); the lengths are the kernel's.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx2::bias_softmax_row(row, rh, rw)
        };
        // Elsewhere `avx2_fma_available` is false, so kernel_slices was not asked.
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{:?}", (row.len(), rh.len(), rw.len()));
    }
    true
}

/// fp32, one key per row: `logits` (h * w, M), keys row-major on the h x w grid by M queries,
/// <- softmax over the keys (axis 0) of logits + bias_h[key row, :] + bias_w[key column, :], in
/// place; bias_h is (h, M), bias_w (w, M). Declines as [`bias_softmax_f32_rows_`] does, with M
/// (not w) the width that must be a multiple of 8.
pub fn bias_softmax_f32_cols_(logits: &mut Tensor, bias_h: &Tensor, bias_w: &Tensor) -> bool {
    let (Ok((n, m)), Ok((h, mh)), Ok((w, mw))) = (logits.size2(), bias_h.size2(), bias_w.size2()) else {
        return false;
    };
    let applies = mh == m && mw == m && n == h * w && h > 0 && w > 0 && m % AVX2_LANES == 0;
    let Some((out, bh, bw)) = kernel_slices::<f32>(Kind::Float, applies && avx2_fma_available(), logits, bias_h, bias_w) else {
        return false;
    };
    // SAFETY: AVX2 and FMA were detected (checked before kernel_slices); the lengths are the kernel's.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx2::bias_softmax_cols(out, bh, bw, m as usize)
    };
    // Elsewhere `avx2_fma_available` is false, so kernel_slices was not asked.
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{:?}", (out.len(), bh.len(), bw.len(), m));
    true
}

/// Whether `t` is what the kernels read and write: a contiguous CPU tensor of `kind` outside
/// autograd (writing in place would corrupt a graph).
pub(super) fn fits(t: &Tensor, kind: Kind) -> bool {
    t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous() && !t.requires_grad()
}

/// The three tensors as slices of `T` (`kind`'s element: u16 for bf16, f32) when a kernel
/// applies: `applies` (the shapes and the CPU, checked by the caller), all three [`fits`], and
/// the output overlapping neither bias (a `&mut Tensor` does not own its storage, so views of
/// one storage could be passed: declined rather than trusted). None for an empty output too.
#[allow(clippy::type_complexity)]
fn kernel_slices<'a, T>(
    kind: Kind,
    applies: bool,
    out: &'a mut Tensor,
    a: &'a Tensor,
    b: &'a Tensor,
) -> Option<(&'a mut [T], &'a [T], &'a [T])> {
    debug_assert_eq!(kind.elt_size_in_bytes(), std::mem::size_of::<T>());
    if !(applies && fits(out, kind) && fits(a, kind) && fits(b, kind)) {
        return None;
    }
    let len = |t: &Tensor| t.size().iter().product::<i64>() as usize;
    let (n_out, n_a, n_b) = (len(out), len(a), len(b));
    if n_out == 0 {
        return None;
    }
    let range = |t: &Tensor, len: usize| {
        let start = t.data_ptr() as usize;
        start..start + std::mem::size_of::<T>() * len
    };
    let out_range = range(out, n_out);
    if [range(a, n_a), range(b, n_b)].iter().any(|r| r.start < out_range.end && out_range.start < r.end) {
        return None;
    }
    // SAFETY: contiguous CPU tensors of `kind`, whose elements are T-sized, of these element
    // counts (data_ptr includes the storage offset); the mutable slice overlaps neither of the
    // others (checked above), and the borrows keep the tensors alive for the slices' lifetime.
    unsafe {
        Some((
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut T, n_out),
            std::slice::from_raw_parts(a.data_ptr() as *const T, n_a),
            std::slice::from_raw_parts(b.data_ptr() as *const T, n_b),
        ))
    }
}

/// fp32 lanes per AVX2 register.
const AVX2_LANES: i64 = 8;

fn avx2_fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// fp32 lanes per AVX-512 register.
const LANES: i64 = 16;
/// Widest key row (w) the kernel keeps in registers' worth of stack: SAM's grids are 64 wide.
const MAX_ROW_WIDTH: i64 = 256;

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// bf16 bits -> f32 (exact: bf16 is the top half of an f32).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        let wide = _mm512_cvtepu16_epi32(unsafe { _mm256_loadu_si256(p as *const __m256i) });
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
    }

    /// f32 -> bf16 bits, rounded to nearest even as libtorch does (no NaN can reach here: the
    /// values are probabilities).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_bf16(p: *mut u16, x: __m512) {
        let bits = _mm512_castps_si512(x);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
        let halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(rounded));
        unsafe { _mm256_storeu_si256(p as *mut __m256i, halves) };
    }

    /// e^x for x <= 0 (Cephes' expf: range reduction by ln 2 in two parts, a degree-6
    /// polynomial, scaling by 2^n with vscalefps). x is clamped at -87 first, so e^x stays a
    /// normal float (about 1.6e-38 at the least), which rounds to 0 in bf16 after normalising.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_nonpositive(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(e, n)
    }

    /// One query row: `row` (h * w bf16 logits) <- softmax(row + rh[key row] + rw[key column]).
    /// `buf` holds the row in fp32 between the passes (h * w values).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bias_softmax_row(row: &mut [u16], rh: &[u16], rw: &[u16], buf: &mut [f32]) {
        let (h, w) = (rh.len(), rw.len());
        debug_assert!(row.len() == h * w && buf.len() == h * w && w % 16 == 0);
        let mut rw_f32 = [0f32; super::MAX_ROW_WIDTH as usize];
        for (dst, &b) in rw_f32.iter_mut().zip(rw) {
            *dst = f32::from_bits((b as u32) << 16);
        }
        let (rp, bp, wp) = (row.as_mut_ptr(), buf.as_mut_ptr(), rw_f32.as_ptr());
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        for kh in 0..h {
            let bias_h = _mm512_set1_ps(f32::from_bits((rh[kh] as u32) << 16));
            for j in (0..w).step_by(16) {
                let i = kh * w + j;
                // SAFETY: i + 16 <= h * w = row.len() = buf.len(), and j + 16 <= w.
                unsafe {
                    let s = _mm512_add_ps(_mm512_add_ps(load_bf16(rp.add(i)), bias_h), _mm512_loadu_ps(wp.add(j)));
                    _mm512_storeu_ps(bp.add(i), s);
                    vmax = _mm512_max_ps(vmax, s);
                }
            }
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        let mut vsum = _mm512_setzero_ps();
        for i in (0..h * w).step_by(16) {
            // SAFETY: i + 16 <= buf.len().
            unsafe {
                let e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(bp.add(i)), max));
                _mm512_storeu_ps(bp.add(i), e);
                vsum = _mm512_add_ps(vsum, e);
            }
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
        for i in (0..h * w).step_by(16) {
            // SAFETY: i + 16 <= buf.len() = row.len().
            unsafe { store_bf16(rp.add(i), _mm512_mul_ps(_mm512_loadu_ps(bp.add(i)), inv)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// e^x for x <= 0, as [`super::avx512`]'s (Cephes' expf), with 2^n built in the exponent
    /// bits. x is clamped at -87 first, so n >= -126, and lanes below -87 come out 0 (libtorch
    /// gives 0 below about -103.3 and tiny subnormals between; keeping subnormals out spares the
    /// next product slow arithmetic on them). A NaN passes the clamp (the constant is the first
    /// operand, which `max` gives back only for a number) and the mask (an unordered compare),
    /// and comes out NaN, so a NaN logit spoils its softmax as it does in libtorch.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_nonpositive(x: __m256) -> __m256 {
        let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_max_ps(_mm256_set1_ps(-87.0), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_and_ps(_mm256_mul_ps(e, _mm256_castsi256_ps(scale)), keep)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_max(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_add(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// One query row in place: `row` (h * w logits) <- softmax(row + rh[key row] + rw[key
    /// column]); the row (16 KiB for SAM's 64 x 64 grid) stays in L1 through the three passes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bias_softmax_row(row: &mut [f32], rh: &[f32], rw: &[f32]) {
        let (h, w) = (rh.len(), rw.len());
        debug_assert!(row.len() == h * w && w % 8 == 0);
        let (rp, wp) = (row.as_mut_ptr(), rw.as_ptr());
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        for (kh, &bias_h) in rh.iter().enumerate() {
            let bias_h = _mm256_set1_ps(bias_h);
            for j in (0..w).step_by(8) {
                // SAFETY: kh * w + j + 8 <= h * w = row.len(), and j + 8 <= w = rw.len().
                unsafe {
                    let p = rp.add(kh * w + j);
                    let s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), bias_h), _mm256_loadu_ps(wp.add(j)));
                    _mm256_storeu_ps(p, s);
                    vmax = _mm256_max_ps(vmax, s);
                }
            }
        }
        let max = _mm256_set1_ps(reduce_max(vmax));
        let mut vsum = _mm256_setzero_ps();
        for i in (0..h * w).step_by(8) {
            // SAFETY: i + 8 <= row.len().
            unsafe {
                let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(rp.add(i)), max));
                _mm256_storeu_ps(rp.add(i), e);
                vsum = _mm256_add_ps(vsum, e);
            }
        }
        let inv = _mm256_set1_ps(1.0 / reduce_add(vsum));
        for i in (0..h * w).step_by(8) {
            // SAFETY: i + 8 <= row.len().
            unsafe { _mm256_storeu_ps(rp.add(i), _mm256_mul_ps(_mm256_loadu_ps(rp.add(i)), inv)) };
        }
    }

    /// Keys as rows, in place: `lt` (h * w keys by m queries) <- its softmax over the keys, each
    /// key (kh, kw) biased by bh[kh, :] + bw[kw, :]. Three passes, each reading the key rows in
    /// memory order (all m queries of a row are contiguous), with the m running maxima and sums
    /// in two small buffers (1 KiB each for 256 queries, in L1). Walking the columns a vector's
    /// worth at a time instead touched one cache line per 1 KiB row stride, which maps a chunk's
    /// 4096 rows onto a few cache sets: every pass then came from beyond L2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bias_softmax_cols(lt: &mut [f32], bh: &[f32], bw: &[f32], m: usize) {
        let (h, w) = (bh.len() / m, bw.len() / m);
        let n = h * w;
        debug_assert!(lt.len() == n * m && bh.len() == h * m && bw.len() == w * m && m % 8 == 0);
        let mut max = vec![f32::NEG_INFINITY; m];
        let mut sum = vec![0f32; m];
        let (lp, hp, wp, xp, sp) = (lt.as_mut_ptr(), bh.as_ptr(), bw.as_ptr(), max.as_mut_ptr(), sum.as_mut_ptr());
        for kh in 0..h {
            for kw in 0..w {
                for q in (0..m).step_by(8) {
                    // SAFETY: (kh * w + kw) * m + q + 8 <= n * m = lt.len(), kh * m + q + 8 <=
                    // bh.len(), kw * m + q + 8 <= bw.len(), q + 8 <= m = max.len().
                    unsafe {
                        let p = lp.add((kh * w + kw) * m + q);
                        // In the fallback's order: (logit + row term) + column term.
                        let s = _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(hp.add(kh * m + q)));
                        let s = _mm256_add_ps(s, _mm256_loadu_ps(wp.add(kw * m + q)));
                        _mm256_storeu_ps(p, s);
                        _mm256_storeu_ps(xp.add(q), _mm256_max_ps(_mm256_loadu_ps(xp.add(q)), s));
                    }
                }
            }
        }
        for k in 0..n {
            for q in (0..m).step_by(8) {
                // SAFETY: k * m + q + 8 <= n * m; q + 8 <= m = max.len() = sum.len().
                unsafe {
                    let p = lp.add(k * m + q);
                    let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(xp.add(q))));
                    _mm256_storeu_ps(p, e);
                    _mm256_storeu_ps(sp.add(q), _mm256_add_ps(_mm256_loadu_ps(sp.add(q)), e));
                }
            }
        }
        for s in sum.iter_mut() {
            *s = 1.0 / *s;
        }
        let ip = sum.as_ptr();
        for k in 0..n {
            for q in (0..m).step_by(8) {
                // SAFETY: k * m + q + 8 <= n * m; q + 8 <= m = sum.len().
                unsafe {
                    let p = lp.add(k * m + q);
                    _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(ip.add(q))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same softmax by libtorch in fp32 from the same bf16 inputs.
    fn reference(logits: &Tensor, rel_h: &Tensor, rel_w: &Tensor) -> Tensor {
        let (m, h) = rel_h.size2().unwrap();
        let w = rel_w.size()[1];
        let s = logits.to_kind(Kind::Float).view([m, h, w])
            + rel_h.to_kind(Kind::Float).unsqueeze(-1)
            + rel_w.to_kind(Kind::Float).unsqueeze(1);
        s.view([m, h * w]).softmax(-1, Kind::Float)
    }

    #[test]
    fn fused_softmax_matches_libtorch_in_fp32() {
        if !avx512_available() {
            eprintln!("no AVX-512 on this CPU: the fused path is never taken, nothing to compare");
            return;
        }
        tch::manual_seed(7);
        let bf = (Kind::BFloat16, Device::Cpu);
        for (m, h, w) in [(3, 5, 16), (8, 64, 64), (2, 3, 48)] {
            // Wide logits (about +-35), so that keys far below the row's max (beyond the
            // clamp at -87 in e^x) are exercised, not only values near it.
            let logits = (Tensor::randn([m, h * w], (Kind::Float, Device::Cpu)) * 12.0).to_kind(Kind::BFloat16);
            let rel_h = Tensor::randn([m, h], bf);
            let rel_w = Tensor::randn([m, w], bf);
            let want = reference(&logits, &rel_h, &rel_w);
            let mut got = logits.copy();
            assert!(bias_softmax_bf16_(&mut got, &rel_h, &rel_w), "applies to ({m}, {h}, {w})");
            let got = got.to_kind(Kind::Float);
            // bf16 keeps 8 significant bits: a relative error of up to 2^-8 from the final
            // rounding (round to nearest; truncation would exceed it).
            let rel = ((&got - &want).abs() / (want.abs() + 1e-30)).max().double_value(&[]);
            assert!(rel <= 2f64.powi(-8), "({m}, {h}, {w}): max relative error {rel}");
            let row_sums = got.sum_dim_intlist(-1, false, Kind::Float);
            let off = (row_sums - 1.0).abs().max().double_value(&[]);
            assert!(off < 0.01, "rows sum to 1 within bf16 rounding: off by {off}");
        }
    }

    #[test]
    fn declines_what_it_cannot_do_and_leaves_the_logits_alone() {
        let bf = (Kind::BFloat16, Device::Cpu);
        let rel_h = Tensor::zeros([2, 4], bf);
        // A row width that is not a multiple of the vector width.
        let mut odd = Tensor::ones([2, 4 * 10], bf);
        assert!(!bias_softmax_bf16_(&mut odd, &rel_h, &Tensor::zeros([2, 10], bf)));
        assert_eq!(odd.sum(Kind::Float).double_value(&[]), 80.0);
        // fp32 logits, and shapes that do not agree.
        let mut fp32 = Tensor::ones([2, 64], (Kind::Float, Device::Cpu));
        assert!(!bias_softmax_bf16_(&mut fp32, &rel_h, &Tensor::zeros([2, 16], bf)));
        let mut mismatched = Tensor::ones([2, 64], bf);
        assert!(!bias_softmax_bf16_(&mut mismatched, &rel_h, &Tensor::zeros([3, 16], bf)));
        // Overlapping storage: rel_w a view into the logits themselves.
        let mut shared = Tensor::ones([2, 64], bf);
        let view = shared.view([-1]).narrow(0, 0, 32).view([2, 16]);
        assert!(!bias_softmax_bf16_(&mut shared, &rel_h, &view), "rel_w aliases the logits");
        assert_eq!(shared.sum(Kind::Float).double_value(&[]), 128.0);
        // Tracked by autograd: writing in place would corrupt the graph.
        let mut tracked = Tensor::ones([2, 64], bf).set_requires_grad(true);
        assert!(!bias_softmax_bf16_(&mut tracked, &rel_h, &Tensor::zeros([2, 16], bf)));
    }

    #[test]
    fn fp32_kernels_match_libtorch_in_both_layouts() {
        if !avx2_fma_available() {
            eprintln!("no AVX2/FMA on this CPU: the fp32 kernels are never taken, nothing to compare");
            return;
        }
        tch::manual_seed(11);
        let f = (Kind::Float, Device::Cpu);
        for (m, h, w) in [(8, 5, 16), (256, 64, 64), (16, 3, 40), (24, 7, 8)] {
            // Wide logits, so that keys below the clamp at -87 in e^x are exercised too.
            let logits = Tensor::randn([m, h * w], f) * 12.0;
            let rel_h = Tensor::randn([m, h], f);
            let rel_w = Tensor::randn([m, w], f);
            let want = reference(&logits, &rel_h, &rel_w);
            let close = |got: &Tensor, what: &str| {
                let abs = (got - &want).abs().max().double_value(&[]);
                // A few float roundings: e^x within about 1e-7 relative, and the 4096-term sum
                // taken in another order than libtorch's.
                assert!(abs <= 4e-6, "{what} ({m}, {h}, {w}): max abs error {abs}");
                let off = (got.sum_dim_intlist(-1, false, Kind::Float) - 1.0).abs().max().double_value(&[]);
                assert!(off < 1e-5, "{what}: rows sum to 1, off by {off}");
            };
            let mut rows = logits.copy();
            assert!(bias_softmax_f32_rows_(&mut rows, &rel_h, &rel_w), "rows apply to ({m}, {h}, {w})");
            close(&rows, "rows");
            // The same logits with keys as rows and the biases transposed to (h, M) and (w, M).
            let mut cols = logits.transpose(0, 1).contiguous();
            let (bias_h, bias_w) = (rel_h.transpose(0, 1).contiguous(), rel_w.transpose(0, 1).contiguous());
            assert!(bias_softmax_f32_cols_(&mut cols, &bias_h, &bias_w), "cols apply to ({m}, {h}, {w})");
            close(&cols.transpose(0, 1), "cols");
        }
    }

    /// softmax(logits) by both fp32 kernels with zero biases, in the logits' (M, h * w) layout.
    fn unbiased_in_both_layouts(logits: &Tensor, h: i64, w: i64) -> [(Tensor, &'static str); 2] {
        let m = logits.size()[0];
        let zeros = |rows, cols| Tensor::zeros([rows, cols], (Kind::Float, Device::Cpu));
        let mut rows = logits.copy();
        assert!(bias_softmax_f32_rows_(&mut rows, &zeros(m, h), &zeros(m, w)));
        let mut cols = logits.transpose(0, 1).contiguous();
        assert!(bias_softmax_f32_cols_(&mut cols, &zeros(h, m), &zeros(w, m)));
        [(rows, "rows"), (cols.transpose(0, 1).contiguous(), "cols")]
    }

    /// Keys far below the row's maximum (beyond the clamp at -87) get exactly 0, as libtorch
    /// gives them below about -103; between, both are within 1e-37 of 0.
    #[test]
    fn fp32_kernels_give_zero_far_below_the_maximum() {
        if !avx2_fma_available() {
            return;
        }
        let (m, h, w) = (8, 2, 8);
        let row = [0.0f32, -1000.0, -200.0, -104.0, -95.0, -87.5, -86.0, -1.0, 0.5, -3.0, -300.0, -88.0, 2.0, -50.0, -120.0, -10.0];
        let logits = Tensor::from_slice(&row).view([1, h * w]).expand([m, h * w], false).contiguous();
        let want = logits.softmax(-1, Kind::Float);
        for (got, what) in unbiased_in_both_layouts(&logits, h, w) {
            let got_row = Vec::<f32>::try_from(got.get(0)).unwrap();
            let want_row = Vec::<f32>::try_from(want.get(0)).unwrap();
            for (i, (&x, (&g, &wv))) in row.iter().zip(got_row.iter().zip(&want_row)).enumerate() {
                // The logits are relative to the row's maximum, 2.0.
                if x - 2.0 < -87.0 {
                    assert_eq!(g, 0.0, "{what}: key {i} ({x}) is exactly 0");
                    assert!(wv < 1e-37, "libtorch's is {wv}");
                } else {
                    assert!((g - wv).abs() <= 1e-6 * wv.max(1e-30) + 1e-12, "{what}: key {i}: {g} against {wv}");
                }
            }
        }
    }

    #[test]
    fn fp32_kernels_let_a_nan_through_as_libtorch_does() {
        if !avx2_fma_available() {
            return;
        }
        let f = (Kind::Float, Device::Cpu);
        let (m, h, w) = (8, 2, 8);
        let logits = Tensor::zeros([m, h * w], f);
        let _ = logits.get(3).get(5).fill_(f64::NAN);
        for (got, what) in unbiased_in_both_layouts(&logits, h, w) {
            let nan_rows = got.isnan().any_dim(-1, false);
            let want = Tensor::from_slice(&[false, false, false, true, false, false, false, false]);
            assert!(nan_rows.equal(&want), "{what}: only the row with the NaN is NaN: {nan_rows:?}");
            let rest = got.get(0).double_value(&[0]);
            assert!((rest - 1.0 / 16.0).abs() < 1e-7, "{what}: a clean row is uniform: {rest}");
        }
    }

    #[test]
    fn fp32_kernels_decline_what_they_cannot_do() {
        let f = (Kind::Float, Device::Cpu);
        // Row width (rows) or query count (cols) not a multiple of 8.
        let mut odd = Tensor::ones([2, 4 * 10], f);
        assert!(!bias_softmax_f32_rows_(&mut odd, &Tensor::zeros([2, 4], f), &Tensor::zeros([2, 10], f)));
        assert_eq!(odd.sum(Kind::Float).double_value(&[]), 80.0);
        let mut odd_cols = Tensor::ones([4 * 8, 6], f);
        assert!(!bias_softmax_f32_cols_(&mut odd_cols, &Tensor::zeros([4, 6], f), &Tensor::zeros([8, 6], f)));
        assert_eq!(odd_cols.sum(Kind::Float).double_value(&[]), 192.0);
        // bf16, shapes that do not agree, a non-contiguous output.
        let bf = (Kind::BFloat16, Device::Cpu);
        assert!(!bias_softmax_f32_rows_(&mut Tensor::ones([2, 64], bf), &Tensor::zeros([2, 4], bf), &Tensor::zeros([2, 16], bf)));
        assert!(!bias_softmax_f32_rows_(&mut Tensor::ones([2, 64], f), &Tensor::zeros([2, 4], f), &Tensor::zeros([3, 16], f)));
        let mut strided = Tensor::ones([64, 2], f).transpose(0, 1);
        assert!(!bias_softmax_f32_rows_(&mut strided, &Tensor::zeros([2, 4], f), &Tensor::zeros([2, 16], f)));
        // A bias that aliases the output; an output tracked by autograd.
        let mut shared = Tensor::ones([2, 64], f);
        let view = shared.view([-1]).narrow(0, 0, 32).view([2, 16]);
        assert!(!bias_softmax_f32_rows_(&mut shared, &Tensor::zeros([2, 4], f), &view), "rel_w aliases the logits");
        assert_eq!(shared.sum(Kind::Float).double_value(&[]), 128.0);
        let mut tracked = Tensor::ones([2, 64], f).set_requires_grad(true);
        assert!(!bias_softmax_f32_rows_(&mut tracked, &Tensor::zeros([2, 4], f), &Tensor::zeros([2, 16], f)));
    }
}
