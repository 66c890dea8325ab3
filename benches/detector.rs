//! Detector throughput: attrstream's Faster R-CNN against torchvision eager, same weights,
//! images and thread count, one after the other in one run.
//!
//! Run: `scripts/bench-detector` (or `cargo bench --bench detector`). Environment:
//! `BENCH_THREADS` (default 2), `BENCH_ROUNDS` (passes over the images, default 2).
//! Prints imgs/s of torchvision and of our two inference paths, `exact` (torchvision's
//! operations in order) and `fast` (the default: folded batch norm, channels-last
//! convolutions), with the ratios ours / torchvision, for min_size 512 and 800, batch 1
//! and 4. Needs the reference Python environment (`scripts/setup --test`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use attrstream::model::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
use tch::{Device, Tensor};

mod common;

use common::{env_or, python, root, sample_paths, sample_tensors};

fn main() {
    let root = root();
    let threads = env_or("BENCH_THREADS", 2);
    let rounds = env_or("BENCH_ROUNDS", 2);
    let python = python();
    let images = sample_paths();
    let dir = tempfile::tempdir().expect("temp dir");
    let weights_file = dir.path().join("weights.safetensors");

    eprintln!(
        "torchvision: {threads} threads, {rounds} rounds over {} images",
        images.len()
    );
    let out = Command::new(&python)
        .arg(root.join("benches/torchvision_detector.py"))
        .arg(&weights_file)
        .arg(threads.to_string())
        .arg(rounds.to_string())
        .args(&images)
        .output()
        .expect("run torchvision benchmark");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let reference: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();

    tch::set_num_threads(threads as i32);
    let tensors = sample_tensors();
    println!(
        "{:<9} {:>5} {:>14} {:>14} {:>8} {:>14} {:>8}",
        "min_size", "batch", "torchvision/s", "exact/s", "ratio", "fast/s", "ratio"
    );
    for r in reference {
        let min_size = r["min_size"].as_i64().unwrap_or(800);
        let batch = r["batch"].as_u64().unwrap_or(1) as usize;
        let theirs = r["imgs_per_s"].as_f64().unwrap_or(f64::NAN);
        let exact = measure(&weights_file, min_size, batch, rounds, &tensors, false);
        let fast = measure(&weights_file, min_size, batch, rounds, &tensors, true);
        println!(
            "{min_size:<9} {batch:>5} {theirs:>14.3} {exact:>14.3} {:>8.3} {fast:>14.3} {:>8.3}",
            exact / theirs,
            fast / theirs
        );
    }
}

/// imgs/s of our detector for one setting (one warm-up batch, then `rounds` passes).
fn measure(weights_file: &Path, min_size: i64, batch: usize, rounds: usize, images: &[Tensor], fast: bool) -> f64 {
    let cfg = FasterRcnnConfig {
        min_size,
        max_size: 1333,
        box_score_thresh: 0.05,
        ..Default::default()
    };
    let (_vs, model) = FasterRcnn::load(weights_file, Device::Cpu, cfg, fast).expect("load weights");
    let batches: Vec<&[Tensor]> = images.chunks(batch).collect();
    model.detect(batches[0]);
    let start = Instant::now();
    let mut count = 0;
    for _ in 0..rounds {
        for b in &batches {
            model.detect(b);
            count += b.len();
        }
    }
    count as f64 / start.elapsed().as_secs_f64()
}
