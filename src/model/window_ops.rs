//! Two memory-bound steps of the windowed attention blocks, done in one pass on the CPU.
//!
//! In libtorch the relative-position bias of each window is a broadcast addition,
//! (R, 14, 1) + (R, 1, 14), whose 14-wide inner axis barely vectorises, and padding the qkv
//! tokens to whole windows and partitioning them are two copies. Here each is one pass that
//! writes its output once, shared over the intra-op threads. Timed alone in PyTorch on the AVX2
//! build machine they looked like 38 and 17 + 16 ms of a vit_b windowed block; inside the
//! embedding the gain was about 2% (BENCHMARKS.md, sixteenth session). Inference only: tensors
//! tracked by autograd are declined (None), and the caller takes libtorch's ops.

use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// `a[..., :, None] + b[..., None, :]`: a (R, h) and b (R, w) fp32 give (R, h, w), each sum
/// rounded once as libtorch's addition rounds it (the results are bit for bit the same). None
/// where it does not apply: not fp32 contiguous CPU tensors of agreeing shapes, or autograd.
pub fn outer_sum(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    let ((r, h), (rb, w)) = (a.size2().ok()?, b.size2().ok()?);
    let fits = |t: &Tensor| super::rel_pos_softmax::fits(t, Kind::Float);
    if rb != r || !fits(a) || !fits(b) || r == 0 || h == 0 || w == 0 {
        return None;
    }
    let (r, h, w) = (r as usize, h as usize, w as usize);
    let out = Tensor::empty([r as i64, h as i64, w as i64], (Kind::Float, Device::Cpu));
    // SAFETY: a, b and out are contiguous fp32 CPU tensors of r * h, r * w and r * h * w
    // elements (data_ptr includes any storage offset); out is new, so it overlaps neither.
    let (av, bv, ov) = unsafe {
        (
            std::slice::from_raw_parts(a.data_ptr() as *const f32, r * h),
            std::slice::from_raw_parts(b.data_ptr() as *const f32, r * w),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, r * h * w),
        )
    };
    let rows_per_thread = r.div_ceil(threads());
    let parts = ov.chunks_mut(rows_per_thread * h * w).zip(av.chunks(rows_per_thread * h)).zip(bv.chunks(rows_per_thread * w));
    share_out(parts.collect(), |((ov, av), bv)| {
        for ((out_row, a_row), b_row) in ov.chunks_exact_mut(h * w).zip(av.chunks_exact(h)).zip(bv.chunks_exact(w)) {
            for (o, &ai) in out_row.chunks_exact_mut(w).zip(a_row) {
                for (x, &bj) in o.iter_mut().zip(b_row) {
                    *x = ai + bj;
                }
            }
        }
    });
    Some(out)
}

/// x (B, H, W, C) -> (B * nWindows, ws, ws, C) windows of ws x ws tokens, H and W padded up to
/// multiples of ws with the token `fill` (C,): what padding with `fill` and then partitioning
/// give, in one copy. Any kind whose element is 2 or 4 bytes (fp32, bf16, fp16). None where it
/// does not apply: not contiguous CPU tensors of one kind, `fill` not C long, or x tracked by
/// autograd.
pub fn partition_padded(x: &Tensor, ws: i64, fill: &Tensor) -> Option<Tensor> {
    let (b, h, w, c) = x.size4().ok()?;
    let kind = x.kind();
    let fits = |t: &Tensor| t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous();
    let elt = kind.elt_size_in_bytes();
    // Only x's autograd state counts: `fill` is a parameter (which requires grad even in
    // inference), and when a gradient could reach it, x, which is computed from it, has one too.
    if ws <= 0 || fill.size() != [c] || !fits(x) || !fits(fill) || x.requires_grad() || !(elt == 2 || elt == 4) || b * h * w * c == 0 {
        return None;
    }
    let (nh, nw) = ((h + ws - 1) / ws, (w + ws - 1) / ws);
    let out = Tensor::empty([b * nh * nw, ws, ws, c], (kind, Device::Cpu));
    let [b, h, w, nh, nw, ws] = [b, h, w, nh, nw, ws].map(|v| v as usize);
    let token = c as usize * elt;
    let out_tokens = b * nh * nw * ws * ws;
    // SAFETY: contiguous CPU tensors of these byte lengths (data_ptr includes any storage
    // offset); out is new, so it overlaps neither input.
    let (xs, fs, os) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const u8, b * h * w * token),
            std::slice::from_raw_parts(fill.data_ptr() as *const u8, token),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut u8, out_tokens * token),
        )
    };
    let tokens_per_thread = out_tokens.div_ceil(threads());
    share_out(os.chunks_mut(tokens_per_thread * token).enumerate().collect(), |(part, os)| {
        for (i, dst) in os.chunks_exact_mut(token).enumerate() {
            // Output token t is (image, window row, window column, row, column) in that order,
            // each index running over its size.
            let t = part * tokens_per_thread + i;
            let (col, t) = (t % ws, t / ws);
            let (row, t) = (t % ws, t / ws);
            let (win_x, t) = (t % nw, t / nw);
            let (win_y, image) = (t % nh, t / nh);
            let (y, x) = (win_y * ws + row, win_x * ws + col);
            let src = if y < h && x < w {
                let start = ((image * h + y) * w + x) * token;
                &xs[start..start + token]
            } else {
                fs
            };
            dst.copy_from_slice(src);
        }
    });
    Some(out)
}

/// Threads to share a pass over: libtorch's intra-op count for this thread (1 inside the
/// attention's per-head threads and the decoder threads, which set it so).
fn threads() -> usize {
    tch::get_num_threads().max(1) as usize
}

/// Runs `work` on each part: the first on the calling thread, the others on scoped threads
/// (inline where the OS will not start one, as the attention's head threads do).
fn share_out<T: Send>(parts: Vec<T>, work: impl Fn(T) + Sync) {
    let slots: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let run = |slot: &Mutex<Option<T>>| {
        if let Some(part) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            work(part)
        }
    };
    let run = &run;
    let Some((first, rest)) = slots.split_first() else {
        return;
    };
    std::thread::scope(|scope| {
        for slot in rest {
            // A thread that did not start left its part in the slot.
            if std::thread::Builder::new().spawn_scoped(scope, move || run(slot)).is_err() {
                run(slot);
            }
        }
        run(first);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_sum_is_the_broadcast_addition_bit_for_bit() {
        tch::manual_seed(5);
        let f = (Kind::Float, Device::Cpu);
        for (r, h, w) in [(1, 1, 1), (7, 14, 14), (301, 5, 9)] {
            let (a, b) = (Tensor::randn([r, h], f), Tensor::randn([r, w], f) * 1e-3);
            let want = a.unsqueeze(-1) + b.unsqueeze(-2);
            let got = outer_sum(&a, &b).expect("applies");
            assert!(got.equal(&want), "({r}, {h}, {w})");
        }
        assert!(outer_sum(&Tensor::ones([2, 3], f), &Tensor::ones([3, 3], f)).is_none(), "rows differ");
        assert!(outer_sum(&Tensor::ones([2, 3], (Kind::BFloat16, Device::Cpu)), &Tensor::ones([2, 3], (Kind::BFloat16, Device::Cpu))).is_none());
        let tracked = Tensor::ones([2, 3], f).set_requires_grad(true);
        assert!(outer_sum(&tracked, &Tensor::ones([2, 3], f)).is_none(), "autograd");
        assert!(outer_sum(&Tensor::ones([3, 2], f).transpose(0, 1), &Tensor::ones([2, 3], f)).is_none(), "strided");
    }

    /// What the encoder did before: pad with the fill token, then partition (libtorch's ops).
    fn pad_then_partition(x: &Tensor, ws: i64, fill: &Tensor) -> Tensor {
        let (b, h, w, c) = x.size4().unwrap();
        let (hp, wp) = ((h + ws - 1) / ws * ws, (w + ws - 1) / ws * ws);
        let padded = fill.view([1, 1, 1, c]).expand([b, hp, wp, c], false).contiguous();
        padded.narrow(1, 0, h).narrow(2, 0, w).copy_(x);
        padded.view([b, hp / ws, ws, wp / ws, ws, c]).permute([0, 1, 3, 2, 4, 5]).reshape([-1, ws, ws, c])
    }

    #[test]
    fn partition_padded_equals_padding_then_partitioning() {
        tch::manual_seed(6);
        for kind in [Kind::Float, Kind::BFloat16] {
            let opts = (kind, Device::Cpu);
            // vit_b's shape scaled down (64 -> 70 with windows of 14), one without padding, one
            // padded in one direction only, and two images.
            for (b, h, w, c, ws) in [(1, 9, 9, 6, 4), (2, 8, 8, 3, 4), (1, 5, 8, 5, 4), (2, 16, 16, 2, 14)] {
                let x = Tensor::randn([b, h, w, c], opts);
                let fill = Tensor::randn([c], opts);
                let got = partition_padded(&x, ws, &fill).expect("applies");
                let want = pad_then_partition(&x, ws, &fill);
                assert_eq!(got.size(), want.size());
                assert!(got.equal(&want), "{kind:?} ({b}, {h}, {w}, {c}) ws {ws}");
            }
        }
        let f = (Kind::Float, Device::Cpu);
        let x = Tensor::ones([1, 4, 4, 3], f);
        assert!(partition_padded(&x, 3, &Tensor::ones([2], f)).is_none(), "fill of the wrong length");
        assert!(partition_padded(&x, 3, &Tensor::ones([3], (Kind::Double, Device::Cpu))).is_none(), "another kind");
        let tracked = Tensor::ones([1, 4, 4, 3], f).set_requires_grad(true);
        assert!(partition_padded(&tracked, 3, &Tensor::ones([3], f)).is_none(), "autograd");
        let parameter = Tensor::ones([3], f).set_requires_grad(true);
        assert!(partition_padded(&x, 3, &parameter).is_some(), "a parameter as the fill, x outside autograd");
    }
}
