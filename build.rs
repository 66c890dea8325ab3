//! Link-time settings for libtorch.
//!
//! * An rpath to libtorch's `lib/` folder, so binaries and tests run without LD_LIBRARY_PATH.
//! * The libtorch version (from its headers), the git commit and whether the `cuda` feature is
//!   on, for `attrstream --version` and `attrstream info`.
//! * With the `cuda` feature, `libtorch_cuda` is linked with `--no-as-needed`: the default
//!   link drops it (nothing references it directly) and CUDA would then be invisible.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-env=ATTRSTREAM_GIT_COMMIT={}", git_commit());
    let cuda = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        "on"
    } else {
        "off"
    };
    println!("cargo:rustc-env=ATTRSTREAM_CUDA_FEATURE={cuda}");
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
        println!("cargo:rustc-env=ATTRSTREAM_LIBTORCH_VERSION=unknown");
    }
}

/// The commit being built: `ATTRSTREAM_GIT_COMMIT` when set (image builds without `.git`), else
/// `git rev-parse --short=12 HEAD`, else "unknown". Reruns when HEAD moves.
fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=ATTRSTREAM_GIT_COMMIT");
    if let Ok(commit) = std::env::var("ATTRSTREAM_GIT_COMMIT") {
        if !commit.trim().is_empty() {
            return commit.trim().to_string();
        }
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // HEAD names a branch whose ref changes on each commit (or a commit, when detached); the
    // ref is a loose file or a line of packed-refs. Only existing files are watched: cargo
    // reruns a build script on every build while a watched file is missing.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
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
