//! SSD MobileNetV2 throughput: attrstream against OpenCV DNN running the same TF frozen graph,
//! same images and thread count, one after the other in one run.
//!
//! Run: `scripts/bench-ssd` (or `cargo bench --bench ssd`). Environment: `BENCH_THREADS`
//! (default 2), `BENCH_ROUNDS` (passes over the images, default 20). Both sides decode
//! nothing inside the timed loop and run one image per pass, including resizing and
//! post-processing. Needs `scripts/setup --test`.

use std::process::Command;
use std::time::Instant;

use attrstream::model::ssd_mobilenet_v2::SsdMobileNetV2;
use tch::Device;

mod common;

use common::{env_or, python, root, sample_paths, sample_tensors};

fn main() {
    let root = root();
    let threads = env_or("BENCH_THREADS", 2);
    let rounds = env_or("BENCH_ROUNDS", 20);
    let python = python();
    let weights_file = root.join("models/ssd_mobilenet_v2_coco.safetensors");
    if !weights_file.exists() {
        eprintln!("{} not found: run `scripts/setup`", weights_file.display());
        std::process::exit(2);
    }
    let images = sample_paths();
    let out = Command::new(&python)
        .arg(root.join("benches/opencv_ssd.py"))
        .arg(root.join(".cache/ssd_mobilenet_v2"))
        .arg(threads.to_string())
        .arg(rounds.to_string())
        .args(&images)
        .output()
        .expect("run OpenCV benchmark");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let reference: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("OpenCV benchmark prints JSON");
    let theirs = reference["imgs_per_s"].as_f64().unwrap_or(f64::NAN);

    tch::set_num_threads(threads as i32);
    let (_vs, model) = SsdMobileNetV2::load(&weights_file, Device::Cpu).expect("load SSD weights");
    let tensors = sample_tensors();
    for t in &tensors {
        model.detect(std::slice::from_ref(t));
    }
    let start = Instant::now();
    for _ in 0..rounds {
        for t in &tensors {
            model.detect(std::slice::from_ref(t));
        }
    }
    let ours = (rounds * tensors.len()) as f64 / start.elapsed().as_secs_f64();
    println!(
        "threads {threads}, {rounds} rounds over {} images, OpenCV {}",
        tensors.len(),
        reference["opencv"]
    );
    println!("{:>16} {:>16} {:>8}", "opencv imgs/s", "attrstream imgs/s", "ratio");
    println!("{theirs:>16.2} {ours:>16.2} {:>8.3}", ours / theirs);
}
