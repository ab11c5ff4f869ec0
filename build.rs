//! Build script: bake libtorch's location into the binaries' run path, so that they find
//! libtorch (and the CUDA libraries beside it in the PyTorch wheel) without LD_LIBRARY_PATH.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    compile_protos();
    // Set by torch-sys (links = "tch"), which prints `cargo:libtorch_lib=...`.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // Canonicalise: the wheel's libraries find their CUDA siblings through $ORIGIN-relative
        // run paths, which break when libtorch is reached through a symlink.
        let dir = std::fs::canonicalize(PathBuf::from(&dir)).unwrap_or_else(|_| PathBuf::from(dir));
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        println!("cargo:rustc-env=SKINSAM_LIBTORCH_LIB={}", dir.display());
        // Nothing references libtorch_cuda's symbols directly, so --as-needed would drop it and
        // CUDA would never register: keep it as a dependency whenever the wheel has it.
        if dir.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-L{},-ltorch_cuda,--pop-state", dir.display());
        }
    }
}

/// gRPC code from proto/skinsam/v1, with a vendored protoc (no system install needed) and a
/// file descriptor set for server reflection.
fn compile_protos() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let files = ["common", "models", "embedding", "segmentation", "evaluation", "training"].map(|f| format!("proto/skinsam/v1/{f}.proto"));
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("skinsam_descriptor.bin"))
        .compile_protos(&files, &["proto".to_owned()])
        .expect("compiling protos");
}
