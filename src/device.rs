//! Device selection: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".

use crate::error::{invalid, Result};
use tch::Device;

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => cuda(n),
            None => Err(invalid("device", format!("{s:?} is not auto, cpu, cuda or cuda:N"))),
        },
    }
}

fn cuda(n: usize) -> Result<Device> {
    let count = tch::Cuda::device_count() as usize;
    if n >= count {
        return Err(invalid("device", format!("cuda:{n} requested but {count} CUDA device(s) are available")));
    }
    Ok(Device::Cuda(n))
}

/// Used and total memory of CUDA device `index` in bytes (device-wide, as nvidia-smi shows it),
/// from cudaMemGetInfo. The CUDA runtime is opened with dlopen: libtorch has already loaded it
/// when a model runs on CUDA, and CPU-only machines need no CUDA library at all.
pub fn cuda_memory(index: usize) -> Option<(u64, u64)> {
    use std::sync::OnceLock;
    static CUDART: OnceLock<Option<libloading::Library>> = OnceLock::new();
    let lib = CUDART
        .get_or_init(|| {
            ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
                .iter()
                // SAFETY: loading the CUDA runtime runs only its own initialisers.
                .find_map(|name| unsafe { libloading::Library::new(name) }.ok())
        })
        .as_ref()?;
    // SAFETY: both signatures are those of the CUDA runtime API (cudaError_t is a C int).
    unsafe {
        let set_device: libloading::Symbol<unsafe extern "C" fn(i32) -> i32> = lib.get(b"cudaSetDevice\0").ok()?;
        let mem_get_info: libloading::Symbol<unsafe extern "C" fn(*mut usize, *mut usize) -> i32> =
            lib.get(b"cudaMemGetInfo\0").ok()?;
        if set_device(i32::try_from(index).ok()?) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        if mem_get_info(&mut free, &mut total) != 0 {
            return None;
        }
        Some(((total - free) as u64, total as u64))
    }
}

/// The CUDA index of a model's device as the registry shows it ("cuda(0)"), if it is one.
pub fn cuda_index(device: &str) -> Option<usize> {
    device.strip_prefix("cuda(")?.strip_suffix(')')?.parse().ok()
}

/// Keeps freed memory in the process instead of handing it back to the kernel at once. libtorch
/// allocates and frees tensors of megabytes per layer; with glibc's defaults each one came back
/// from the kernel as fresh pages, page fault by page fault: for vit_b's encoder that was 14-18 s
/// of system time per two embeddings on 2 cores, against under 2 s with these settings. The price
/// is a resident size that stays near its peak after a burst (the peak itself did not grow).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists, and the values are within glibc's documented ranges.
    unsafe {
        // No mmap'd blocks at all: glibc caps the mmap threshold at 32 MiB, and vit_b's MLP and
        // qkv outputs (45-50 MB) would still be mapped and faulted in afresh every block. A
        // request no thread arena can hold falls back to the main heap.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // Trim the heap's free top only past 1 GiB, and grow it 64 MiB at a time.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// libtorch's per-thread intra-op thread count setters: OpenMP's `omp_set_num_threads` (the
/// calling thread's nthreads-var) and MKL's `MKL_Set_Num_Threads_Local` (the C entry point that
/// mkl_service.h maps `mkl_set_num_threads_local` to; the lower-case symbol is the Fortran one,
/// which takes a pointer). Looked up in the libraries already loaded; None where either is
/// missing (another OpenMP runtime, no MKL).
type OmpSetThreads = unsafe extern "C" fn(libc::c_int);
type MklSetThreadsLocal = unsafe extern "C" fn(libc::c_int) -> libc::c_int;
fn thread_local_setters() -> Option<&'static (OmpSetThreads, MklSetThreadsLocal)> {
    static SETTERS: std::sync::OnceLock<Option<(OmpSetThreads, MklSetThreadsLocal)>> = std::sync::OnceLock::new();
    SETTERS
        .get_or_init(|| {
            #[cfg(unix)]
            {
                // SAFETY: dlopen(NULL) only returns the handle of what is already loaded; the two
                // symbols have these C signatures. The handle is leaked so the pointers stay valid.
                unsafe {
                    let this = Box::leak(Box::new(libloading::os::unix::Library::this()));
                    let omp = *this.get::<OmpSetThreads>(b"omp_set_num_threads\0").ok()?;
                    let mkl = *this.get::<MklSetThreadsLocal>(b"MKL_Set_Num_Threads_Local\0").ok()?;
                    Some((omp, mkl))
                }
            }
            #[cfg(not(unix))]
            None
        })
        .as_ref()
}

/// Whether [`set_intra_op_threads_for_this_thread`] works here: the setters are found, and in a
/// throwaway thread they do change what libtorch then uses (found once). A setter from another
/// OpenMP runtime than libtorch's would leave it unchanged, and callers would oversubscribe.
pub fn thread_local_intra_op_available() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        thread_local_setters().is_some()
            && std::thread::spawn(|| {
                let target = if tch::get_num_threads() == 1 { 2 } else { 1 };
                apply_intra_op_threads(target)
            })
            .join()
            .unwrap_or(false)
    })
}

/// Sets libtorch's intra-op parallelism for the calling thread only. `tch::set_num_threads` would
/// also change the process-wide count that every thread started later (a model loaded later, say)
/// takes as its own. Returns false, changing nothing, where the setters are not found.
pub fn set_intra_op_threads_for_this_thread(n: i32) -> bool {
    thread_local_intra_op_available() && apply_intra_op_threads(n)
}

fn apply_intra_op_threads(n: i32) -> bool {
    let Some((omp, mkl)) = thread_local_setters() else { return false };
    // libtorch sets a thread's count from the process-wide one on the thread's first parallel
    // op; have that happen now, so that it does not undo what follows.
    let _ = tch::get_num_threads();
    // SAFETY: both take a thread count and act on the calling thread only.
    unsafe {
        omp(n);
        mkl(n);
    }
    tch::get_num_threads() == n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_intra_op_count_is_its_own() {
        if !thread_local_intra_op_available() {
            eprintln!("no OpenMP/MKL setters in this libtorch: the encoder does not split heads");
            return;
        }
        let before = tch::get_num_threads();
        let inside = std::thread::spawn(|| {
            let set = set_intra_op_threads_for_this_thread(1);
            // A parallel op afterwards must not reset it (libtorch's lazy per-thread init).
            let _ = tch::Tensor::ones([1000, 1000], (tch::Kind::Float, Device::Cpu)).sum(tch::Kind::Float);
            (set, tch::get_num_threads())
        })
        .join()
        .unwrap();
        assert_eq!(inside, (true, 1));
        assert_eq!(tch::get_num_threads(), before, "the calling thread keeps its count");
        // A thread started afterwards still starts from the process-wide count.
        let fresh = std::thread::spawn(tch::get_num_threads).join().unwrap();
        assert_eq!(fresh, before);
    }
}
