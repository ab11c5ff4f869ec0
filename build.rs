//! Build script: bake libtorch's location into the binaries' run path, so that they find
//! libtorch (and the CUDA libraries beside it in the PyTorch wheel) without LD_LIBRARY_PATH.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by torch-sys (links = "tch"), which prints `cargo:libtorch_lib=...`.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // Canonicalise: the wheel's libraries find their CUDA siblings through $ORIGIN-relative
        // run paths, which break when libtorch is reached through a symlink.
        let dir = std::fs::canonicalize(PathBuf::from(&dir)).unwrap_or_else(|_| PathBuf::from(dir));
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        println!("cargo:rustc-env=SKINSAM_LIBTORCH_LIB={}", dir.display());
    }
}
