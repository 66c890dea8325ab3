//! Link-time settings for libtorch.
//!
//! * An rpath to libtorch's `lib/` folder, so binaries and tests run without LD_LIBRARY_PATH.
//! * The libtorch version (from its headers) for `attrstream info`.
//! * With the `cuda` feature, `libtorch_cuda` is linked with `--no-as-needed`: the default
//!   link drops it (nothing references it directly) and CUDA would then be invisible.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=ATTRSTREAM_LIBTORCH_VERSION={}", libtorch_version(&lib));
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    } else {
        println!("cargo:warning=torch-sys did not report its libtorch folder; binaries may need LD_LIBRARY_PATH");
    }
}

/// Reads `TORCH_VERSION_{MAJOR,MINOR,PATCH}` from libtorch's headers next to `lib/`.
fn libtorch_version(lib: &str) -> String {
    let root = std::path::Path::new(lib)
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let candidates = [
        root.join("include/torch/headeronly/version.h"),
        root.join("include/torch/csrc/api/include/torch/version.h"),
    ];
    for path in candidates {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let part = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("#define TORCH_VERSION_{name} ")))
                .map(|v| v.trim().to_string())
        };
        if let (Some(major), Some(minor), Some(patch)) = (part("MAJOR"), part("MINOR"), part("PATCH")) {
            return format!("{major}.{minor}.{patch}");
        }
    }
    "unknown".to_string()
}
