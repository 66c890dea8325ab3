//! What the benchmarks share: settings from the environment, the sample photos, and the
//! reference Python.

use std::path::PathBuf;

use attrstream::preprocess::{decode_image, to_tensor, DEFAULT_MAX_PIXELS};
use tch::{Device, Tensor};

/// The photos every benchmark runs on (assets/samples).
const SAMPLES: [&str; 4] = ["coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg"];

/// The project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A numeric setting from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Paths of the sample photos.
pub fn sample_paths() -> Vec<PathBuf> {
    SAMPLES.iter().map(|s| root().join("assets/samples").join(s)).collect()
}

/// The sample photos as `[3, H, W]` float tensors in `[0, 1]` on the CPU.
pub fn sample_tensors() -> Vec<Tensor> {
    sample_paths()
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).expect("read sample");
            to_tensor(
                &decode_image(&bytes, DEFAULT_MAX_PIXELS).expect("decode sample"),
                Device::Cpu,
            )
        })
        .collect()
}

/// The reference Python (`ATTRSTREAM_PYTHON`, else `.venv/bin/python`); exits with
/// instructions when it is missing.
pub fn python() -> PathBuf {
    let python = std::env::var_os("ATTRSTREAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    if !python.exists() {
        eprintln!(
            "reference Python {} not found: run `scripts/setup --test`",
            python.display()
        );
        std::process::exit(2);
    }
    python
}
