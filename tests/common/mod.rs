//! Shared helpers of the integration tests: the Python reference environment, golden-file
//! generation, and tensor comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// The project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The reference Python (torch + torchvision), installed by `scripts/setup --test`.
/// `ATTRSTREAM_PYTHON` overrides. Panics with instructions when it is missing: parity tests
/// must not pass silently without their reference.
pub fn python() -> PathBuf {
    let path = std::env::var_os("ATTRSTREAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "reference Python {} not found: run `scripts/setup --test` (installs torch 2.13 + torchvision 0.28 into .venv)",
        path.display()
    );
    path
}

/// Runs a reference script with arguments; panics with its stderr on failure.
pub fn run_python(script: &Path, args: &[&str]) {
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Golden outputs of torchvision's Faster R-CNN, generated once per test process.
pub fn faster_rcnn_reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("target/test-reference/faster_rcnn");
        std::fs::create_dir_all(&dir).expect("create reference dir");
        let script = root().join("tests/reference/faster_rcnn_reference.py");
        run_python(&script, &[dir.to_str().expect("utf-8 path")]);
        dir
    })
}

/// Loads a safetensors file into a name -> tensor map.
pub fn load_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// `max |a - b| / max |b|`: the relative error of a whole tensor.
pub fn max_relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let a = actual.to_device(Device::Cpu).to_kind(Kind::Double);
    let e = expected.to_device(Device::Cpu).to_kind(Kind::Double);
    let diff = (a - &e).abs().max().double_value(&[]);
    let scale = e.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

/// Rows of a `[N, 4]` tensor as arrays.
pub fn boxes(t: &Tensor) -> Vec<[f64; 4]> {
    let v = Vec::<f64>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Double).contiguous().view(-1))
        .expect("boxes as f64");
    v.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

/// Largest coordinate difference between two boxes.
pub fn box_distance(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Matches every expected box to a distinct actual box, greedily by distance. Returns for
/// each expected box the index of its match and the distance, or `None` when no unmatched
/// actual box is left.
pub fn match_boxes(actual: &[[f64; 4]], expected: &[[f64; 4]]) -> Vec<Option<(usize, f64)>> {
    let mut used = vec![false; actual.len()];
    expected
        .iter()
        .map(|e| {
            let best = actual
                .iter()
                .enumerate()
                .filter(|(i, _)| !used[*i])
                .map(|(i, a)| (i, box_distance(a, e)))
                .min_by(|x, y| x.1.total_cmp(&y.1));
            if let Some((i, _)) = best {
                used[i] = true;
            }
            best
        })
        .collect()
}
