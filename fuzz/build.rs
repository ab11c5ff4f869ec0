//! The fuzz target links libtorch through the skinsam crate: bake its location into the run path
//! (as the main build script does), so the target runs without LD_LIBRARY_PATH.
fn main() {
    // Set by torch-sys (links = "tch"), a direct dependency for this reason.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}
