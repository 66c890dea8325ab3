//! One Faster R-CNN training step: attrstream against torchvision, same seeded weights, same
//! batch, same trainable layers, optimizer and thread count, steps alternating between the
//! two in one run.
//!
//! A step is what torchvision's reference training loop does per batch: zero the gradients,
//! the four training losses (forward), backward of their sum, one SGD step (momentum 0.9,
//! weight decay 1e-4, learning rate 0.0025). Ours: `FasterRcnn::training_losses` with
//! `Sampler::random()` (NCHW activations, torchvision's own operations: the default), the
//! same with `ActivationLayout::ChannelsLast`, then `TrainingLosses::total().backward()` and
//! `train::sgd::Sgd::step` over `trainable_variables`. Theirs:
//! `benches/torchvision_train_step.py`, a server process that builds the training parity
//! test's seeded model (FrozenBatchNorm2d ResNet-50, `_resnet_fpn_extractor(body, layers)`,
//! 5 classes), writes its weights for us (`FasterRcnn::load_for_fine_tuning` loads them) and
//! runs one step per request. Both sides seed libtorch's generator alike before each step,
//! so their first steps sample the same anchors and proposals: the losses of the first
//! warm-up step are compared (both sides must do the same work) and the run fails when they
//! differ by more than 1e-3 relative.
//!
//! The batch: `BENCH_BATCH` seeded synthetic images (`train::synthetic`, 640×480, 1–4 boxes
//! each, 4 classes) written as PNG files that both sides read. After `BENCH_WARMUP` rounds,
//! `BENCH_REPS` rounds are timed; each round runs one step of every side, in an order that
//! rotates from round to round, so that all sides meet the same machine load. Both models
//! train all the while; the two layouts of ours take turns on one model and optimizer.
//!
//! Subnormal floats are flushed to zero on both sides (`torch.set_flush_denormal(True)` and
//! the same MXCSR bits here) unless `BENCH_FLUSH_DENORMAL=0`: after a few steps on this
//! batch some gradients become subnormal and the backward pass of both sides slows down by
//! 2–3x, which would make the figures depend on how far training has gone.
//!
//! Printed: per side the median, min and max seconds per step, the median CPU seconds, the
//! ratio to torchvision (goal ≤ 0.9) and the peak RSS of the process; then the median time
//! of each stage (transform, ResNet body, FPN, RPN, box head, the whole forward, backward,
//! optimizer; torchvision's from forward hooks, ours from `TrainingLosses::timings`); and a
//! JSON result (`BENCH_JSON`, default `target/bench/train_step.json`).
//!
//! Run: `scripts/bench-train` (or `cargo bench --bench train_step`). Environment:
//! `BENCH_SIZE` (min_size, default 512), `BENCH_MAX_SIZE` (default 1333), `BENCH_BATCH`
//! (images per step, default 2), `BENCH_LAYERS` (trainable backbone layers 0–5, default 3),
//! `BENCH_REPS` (timed steps per side, default 5), `BENCH_WARMUP` (default 1),
//! `BENCH_THREADS` (libtorch threads of each side, default 2), `BENCH_FLUSH_DENORMAL`
//! (default 1), `BENCH_TRAINER=1` (also time `train::trainer::Trainer::step`, what
//! `attrstream train` runs, with flips off and no clipping, on a third model), `BENCH_JSON`.
//! Needs the reference Python environment (`scripts/setup --test`). Figures and what they
//! mean: docs/bench-train.md.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use attrstream::model::faster_rcnn::training::ActivationLayout;
use attrstream::model::faster_rcnn::{trainable_variables, FasterRcnn, FasterRcnnConfig, Sampler, Target};
use attrstream::preprocess::{decode_image, to_tensor, DEFAULT_MAX_PIXELS};
use attrstream::train::sgd::{Decay, LrSchedule, Sgd, SgdConfig};
use attrstream::train::synthetic::{generate, SynthConfig, CLASSES};
use attrstream::train::trainer::{TrainExample, TrainSettings, Trainer};
use serde_json::{json, Value};
use tch::{nn::VarStore, Device, Tensor};

#[allow(dead_code)]
mod common;

use common::{env_or, python, root};

/// Learning rate of both optimizers: torchvision's recipe (0.02 for 16 images) scaled to a
/// batch of 2, small enough that the random weights do not diverge during the run.
const LR: f64 = 0.0025;
/// Seed of the synthetic batch.
const DATA_SEED: u64 = 5;
/// libtorch's generator is seeded with `STEP_SEED + round` before each step, on every side.
const STEP_SEED: i64 = 1000;
/// Largest relative difference allowed between the two sides' first losses.
const LOSS_AGREEMENT: f64 = 1e-3;

/// The benchmark's knobs.
struct Settings {
    min_size: i64,
    max_size: i64,
    batch: usize,
    layers: u8,
    reps: usize,
    warmup: usize,
    threads: usize,
    flush_denormal: bool,
    trainer: bool,
    json: PathBuf,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let s = Self {
            min_size: env_or("BENCH_SIZE", 512) as i64,
            max_size: env_or("BENCH_MAX_SIZE", 1333) as i64,
            batch: env_or("BENCH_BATCH", 2),
            layers: env_or("BENCH_LAYERS", 3) as u8,
            reps: env_or("BENCH_REPS", 5),
            warmup: env_or("BENCH_WARMUP", 1),
            threads: env_or("BENCH_THREADS", 2),
            flush_denormal: env_or("BENCH_FLUSH_DENORMAL", 1) != 0,
            trainer: env_or("BENCH_TRAINER", 0) != 0,
            json: std::env::var_os("BENCH_JSON")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target/bench/train_step.json")),
        };
        ensure!(s.batch >= 1, "BENCH_BATCH must be at least 1");
        ensure!(s.reps >= 1, "BENCH_REPS must be at least 1");
        ensure!(
            s.warmup >= 1,
            "BENCH_WARMUP must be at least 1 (the first step's losses are compared)"
        );
        ensure!(s.threads >= 1, "BENCH_THREADS must be at least 1");
        ensure!(s.layers <= 5, "BENCH_LAYERS must be between 0 and 5");
        ensure!(
            s.min_size >= 32 && s.max_size >= s.min_size,
            "BENCH_SIZE must be at least 32 and BENCH_MAX_SIZE at least BENCH_SIZE"
        );
        Ok(s)
    }
}

/// One labelled image of the batch, as both sides read it.
struct BatchImage {
    path: PathBuf,
    boxes: Vec<[f32; 4]>,
    labels: Vec<i64>,
}

/// Writes `n` seeded synthetic images (640×480, 1–4 objects of 48–160 px) as PNG files into
/// `dir`.
fn write_batch(dir: &Path, n: usize) -> Result<Vec<BatchImage>> {
    let mut cfg = SynthConfig::new(n, DATA_SEED);
    cfg.width = 640;
    cfg.height = 480;
    cfg.min_object = 48;
    cfg.max_object = 160;
    cfg.max_objects = 4;
    let images = generate(&cfg)?
        .map(|s| {
            let path = dir.join(s.file_name());
            s.image
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(BatchImage {
                path,
                boxes: s.objects.iter().map(|o| o.bbox.map(|v| v as f32)).collect(),
                labels: s.objects.iter().map(|o| o.class as i64 + 1).collect(),
            })
        })
        .collect();
    images
}

/// The stages of a step as printed, with torchvision's name for each (from the hooks of
/// benches/torchvision_train_step.py; `None`: torchvision has no separate figure). Ours
/// split the RPN into proposal selection and the loss. The forward includes zeroing the
/// gradients on both sides.
const STAGES: [(&str, Option<&str>); 10] = [
    ("transform", Some("transform")),
    ("backbone", Some("backbone.body")),
    ("fpn", Some("backbone.fpn")),
    ("rpn", Some("rpn")),
    ("  rpn proposals", None),
    ("  rpn loss", None),
    ("box head", Some("roi_heads")),
    ("forward", Some("forward")),
    ("backward", Some("backward")),
    ("optimizer", Some("optimizer")),
];

/// What one side reports for one step.
struct Step {
    /// The whole step (zero_grad, forward, backward, optimizer), seconds.
    seconds: f64,
    /// CPU seconds the process used during the step (all threads; less sensitive to other
    /// work on the machine than the wall time, but it counts OpenMP's spin-waiting).
    cpu_seconds: f64,
    /// The four losses by torchvision's names, sorted by name.
    losses: Vec<(String, f64)>,
    /// Seconds per stage, in the order of [`STAGES`] (NaN where a side has no figure).
    stages: Vec<f64>,
    /// Share of the step's wall time in which some task on the machine waited for a CPU
    /// (Linux PSI, set by [`timed`]): near 0 when nothing else ran.
    stall: f64,
}

/// Runs one step and records how much the machine's CPUs were contended meanwhile.
fn timed(step: impl FnOnce() -> Result<Step>) -> Result<Step> {
    let (stall_start, start) = (cpu_stall_seconds(), Instant::now());
    let mut step = step()?;
    step.stall = (cpu_stall_seconds() - stall_start) / start.elapsed().as_secs_f64();
    Ok(step)
}

/// Cumulative seconds in which some task waited for a CPU (`/proc/pressure/cpu`, "some"
/// total), NaN where PSI is unavailable.
fn cpu_stall_seconds() -> f64 {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("some"))
                .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |us| us / 1e6)
}

/// Steps during which other work stalled the CPUs for at most this share of the time count
/// as quiet.
const QUIET_STALL: f64 = 0.05;

/// The torchvision server process (benches/torchvision_train_step.py).
struct Reference {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Reference {
    /// Starts the server; returns once it has written the weights and reported ready.
    fn start(weights: &Path, spec: &Path, threads: usize) -> Result<(Self, Value)> {
        let script = root().join("benches/torchvision_train_step.py");
        let mut child = Command::new(python())
            .arg(&script)
            .arg(weights)
            .arg(spec)
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("the torchvision process has no pipes");
        };
        let mut reference = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let ready = reference.read_reply()?;
        Ok((reference, ready))
    }

    fn read_reply(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the torchvision process exited early (its error is printed above)");
        }
        let reply: Value =
            serde_json::from_str(&line).with_context(|| format!("the torchvision process replied {line:?}"))?;
        if let Some(error) = reply.get("error") {
            bail!("torchvision process: {error}");
        }
        Ok(reply)
    }

    fn request(&mut self, command: &str) -> Result<Value> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.read_reply()
    }

    /// One timed step.
    fn step(&mut self, seed: i64) -> Result<Step> {
        let reply = self.request(&format!("step {seed}"))?;
        let seconds = reply["seconds"]
            .as_f64()
            .with_context(|| format!("no seconds in torchvision's reply {reply}"))?;
        let stage = |name: &str| reply["stages"][name].as_f64().unwrap_or(f64::NAN);
        let mut losses: Vec<(String, f64)> = reply["losses"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
                    .collect()
            })
            .unwrap_or_default();
        losses.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Step {
            seconds,
            cpu_seconds: reply["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
            losses,
            stages: STAGES
                .iter()
                .map(|(_, theirs)| theirs.map_or(f64::NAN, stage))
                .collect(),
            stall: f64::NAN,
        })
    }

    /// Peak RSS in MB; ends the process.
    fn quit(mut self) -> Result<f64> {
        let reply = self.request("quit")?;
        let _ = self.child.wait();
        Ok(reply["peak_rss_mb"].as_f64().unwrap_or(f64::NAN))
    }
}

/// Our model, optimizer and batch: the core training step.
struct Ours {
    _vs: VarStore,
    model: FasterRcnn,
    params: Vec<(String, Tensor)>,
    sgd: Sgd,
    images: Vec<Tensor>,
    targets: Vec<Target>,
}

impl Ours {
    fn load(weights: &Path, cfg: &FasterRcnnConfig, layers: u8, batch: &[BatchImage]) -> Result<Self> {
        let (vs, model, _) = FasterRcnn::load_for_fine_tuning(weights, Device::Cpu, cfg.clone(), layers)?;
        let params = trainable_variables(&vs);
        let images = batch.iter().map(|b| read_image(&b.path)).collect::<Result<Vec<_>>>()?;
        let targets = batch.iter().map(|b| Target::new(&b.boxes, &b.labels)).collect();
        Ok(Self {
            _vs: vs,
            model,
            params,
            sgd: Sgd::new(SgdConfig::default()),
            images,
            targets,
        })
    }

    /// The losses of a forward pass only (no backward, no update), seeded with `seed`.
    fn losses(&self, seed: i64, layout: ActivationLayout) -> Result<Vec<(String, f64)>> {
        tch::manual_seed(seed);
        let losses =
            self.model
                .training_losses_with_layout(&self.images, &self.targets, &mut Sampler::random(), layout)?;
        let mut values: Vec<(String, f64)> = losses.values().iter().map(|(k, v)| (k.to_string(), *v)).collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(values)
    }

    /// One timed step with the activations in `layout`.
    fn step(&mut self, seed: i64, layout: ActivationLayout) -> Result<Step> {
        tch::manual_seed(seed);
        let cpu_start = process_cpu_seconds();
        let start = Instant::now();
        for (_, p) in &self.params {
            p.shallow_clone().zero_grad();
        }
        let losses =
            self.model
                .training_losses_with_layout(&self.images, &self.targets, &mut Sampler::random(), layout)?;
        let total = losses.total();
        let forward_done = Instant::now();
        total.backward();
        let backward_done = Instant::now();
        self.sgd.step(&self.params, LR);
        let end = Instant::now();
        let cpu_seconds = process_cpu_seconds() - cpu_start;
        let mut values: Vec<(String, f64)> = losses.values().iter().map(|(k, v)| (k.to_string(), *v)).collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        let t = losses.timings;
        let secs = |d: Duration| d.as_secs_f64();
        let stages = vec![
            secs(t.transform),
            secs(t.backbone),
            secs(t.fpn),
            secs(t.rpn_proposals + t.rpn_loss),
            secs(t.rpn_proposals),
            secs(t.rpn_loss),
            secs(t.box_head),
            secs(forward_done - start),
            secs(backward_done - forward_done),
            secs(end - backward_done),
        ];
        Ok(Step {
            seconds: secs(end - start),
            cpu_seconds,
            losses: values,
            stages,
            stall: f64::NAN,
        })
    }
}

fn read_image(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(to_tensor(&decode_image(&bytes, DEFAULT_MAX_PIXELS)?, Device::Cpu))
}

/// `attrstream train`'s step (`Trainer::step`) on its own model, flips off, no clipping.
struct TrainerSide {
    trainer: Trainer,
    examples: Vec<TrainExample>,
}

impl TrainerSide {
    fn load(weights: &Path, cfg: &FasterRcnnConfig, s: &Settings, batch: &[BatchImage]) -> Result<Self> {
        let settings = TrainSettings {
            batch_size: s.batch,
            steps: u64::MAX,
            schedule: LrSchedule {
                base_lr: LR,
                warmup_steps: 0,
                warmup_factor: 1.0,
                decay: Decay::Constant,
                total_steps: u64::MAX,
            },
            sgd: SgdConfig::default(),
            hflip_prob: 0.0,
            clip_grad_norm: None,
            seed: DATA_SEED,
            deterministic_sampling: false,
        };
        let layers = s.layers;
        let trainer = Trainer::new(
            &[Device::Cpu],
            |device| {
                let (vs, model, _) = FasterRcnn::load_for_fine_tuning(weights, device, cfg.clone(), layers)?;
                Ok((vs, model))
            },
            settings,
        )?;
        let examples = batch
            .iter()
            .map(|b| {
                let target = Target::new(&b.boxes, &b.labels);
                Ok(TrainExample {
                    image: read_image(&b.path)?,
                    boxes: target.boxes,
                    labels: target.labels,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { trainer, examples })
    }

    /// One timed step (wall and CPU time only: the trainer reports no stages).
    fn step(&mut self) -> Result<Step> {
        let cpu_start = process_cpu_seconds();
        let start = Instant::now();
        let stats = self.trainer.step(&self.examples.iter().collect::<Vec<_>>())?;
        Ok(Step {
            seconds: start.elapsed().as_secs_f64(),
            cpu_seconds: process_cpu_seconds() - cpu_start,
            losses: vec![
                ("loss_box_reg".into(), stats.box_reg),
                ("loss_classifier".into(), stats.classifier),
                ("loss_objectness".into(), stats.objectness),
                ("loss_rpn_box_reg".into(), stats.rpn_box_reg),
            ],
            stages: vec![f64::NAN; STAGES.len()],
            stall: f64::NAN,
        })
    }
}

/// The sides of the comparison, in the printed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Torchvision,
    Ours,
    OursChannelsLast,
    Trainer,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Torchvision => "torchvision",
            Side::Ours => "attrstream",
            Side::OursChannelsLast => "attrstream NHWC",
            Side::Trainer => "attrstream Trainer",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Side::Torchvision => "torchvision",
            Side::Ours => "attrstream",
            Side::OursChannelsLast => "attrstream_channels_last",
            Side::Trainer => "attrstream_trainer",
        }
    }
}

/// Median, min and max.
fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// CPU time this process has used, user and system, all threads (Linux `/proc/self/stat`,
/// in clock ticks of 10 ms); NaN elsewhere.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // The fields after the parenthesised command name start with field 3 (state); utime is
    // field 14, stime 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    match (ticks(14), ticks(15)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

/// This process's peak resident memory in MB (Linux `VmHWM`), NaN elsewhere.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Largest relative difference between two sets of named losses.
fn loss_difference(ours: &[(String, f64)], theirs: &[(String, f64)]) -> Result<f64> {
    ensure!(
        ours.iter().map(|(k, _)| k).eq(theirs.iter().map(|(k, _)| k)),
        "the two sides report different losses: {ours:?} vs {theirs:?}"
    );
    Ok(ours
        .iter()
        .zip(theirs)
        .map(|((_, a), (_, b))| (a - b).abs() / b.abs().max(1e-6))
        .fold(0.0, f64::max))
}

/// The 1-minute load average and the share of the last 60 s in which some task waited for a
/// CPU (Linux PSI), to judge how quiet the machine was.
fn machine_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().next().unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into());
    let pressure = std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("avg60=").map(str::to_string))
            })
        })
        .unwrap_or_else(|| "?".into());
    format!("load average {load}, CPU pressure {pressure}% over 60 s")
}

/// Sets flush-to-zero and denormals-are-zero (MXCSR bits 15 and 6) on this thread, as
/// `torch.set_flush_denormal(True)` does; libtorch's OpenMP threads, created later by this
/// thread, inherit it. Returns whether it is supported (x86-64 only).
fn flush_denormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr store and load the SSE control register through a valid,
        // aligned u32; setting FTZ and DAZ only changes how subnormal floats are treated.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= 0x8040;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly));
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn run() -> Result<()> {
    let s = Settings::from_env()?;
    // Before any libtorch work, so that its OpenMP threads inherit the setting.
    let flushing = s.flush_denormal && flush_denormals();
    ensure!(
        flushing == s.flush_denormal,
        "this CPU cannot flush denormals here: run with BENCH_FLUSH_DENORMAL=0"
    );
    tch::set_num_threads(s.threads as i32);
    let dir = tempfile::tempdir()?;
    let batch = write_batch(dir.path(), s.batch)?;
    let num_classes = CLASSES.len() as i64 + 1;
    let spec = json!({
        "images": batch.iter().map(|b| json!({"path": b.path, "boxes": b.boxes, "labels": b.labels})).collect::<Vec<_>>(),
        "num_classes": num_classes,
        "min_size": s.min_size,
        "max_size": s.max_size,
        "trainable_layers": s.layers,
        "lr": LR,
        "momentum": SgdConfig::default().momentum,
        "weight_decay": SgdConfig::default().weight_decay,
        "flush_denormal": flushing,
    });
    let spec_file = dir.path().join("spec.json");
    std::fs::write(&spec_file, serde_json::to_vec_pretty(&spec)?)?;
    let weights = dir.path().join("weights.safetensors");
    let boxes: Vec<usize> = batch.iter().map(|b| b.boxes.len()).collect();
    eprintln!(
        "train step: {} synthetic 640x480 images ({boxes:?} boxes), min_size {}, max_size {}, {} trainable backbone \
         layers, {} threads, {} warm-up + {} timed rounds, denormals {}",
        s.batch,
        s.min_size,
        s.max_size,
        s.layers,
        s.threads,
        s.warmup,
        s.reps,
        if flushing { "flushed to zero" } else { "kept" }
    );
    let load_before = machine_load();
    eprintln!("before: {load_before}");

    let (mut theirs, ready) = Reference::start(&weights, &spec_file, s.threads)?;
    let cfg = FasterRcnnConfig {
        num_classes,
        min_size: s.min_size,
        max_size: s.max_size,
        ..Default::default()
    };
    let mut ours = Ours::load(&weights, &cfg, s.layers, &batch)?;
    let our_params: i64 = ours.params.iter().map(|(_, p)| p.numel()).sum::<usize>() as i64;
    let their_params = ready["trainable_parameters"].as_i64().unwrap_or(-1);
    ensure!(
        our_params == their_params,
        "trainable parameters differ: ours {our_params}, torchvision's {their_params}"
    );
    eprintln!("trainable parameters: {our_params} on both sides");
    let mut trainer = if s.trainer {
        Some(TrainerSide::load(&weights, &cfg, &s, &batch)?)
    } else {
        None
    };
    let mut sides = vec![Side::Torchvision, Side::Ours, Side::OursChannelsLast];
    if trainer.is_some() {
        sides.push(Side::Trainer);
    }

    // The NHWC path's losses on the starting weights, compared with torchvision's first step
    // below (forward only: the weights stay as they are).
    let nhwc_first = ours.losses(STEP_SEED, ActivationLayout::ChannelsLast)?;
    let mut run_step = |side: Side, seed: i64| -> Result<Step> {
        timed(|| match side {
            Side::Torchvision => theirs.step(seed),
            Side::Ours => ours.step(seed, ActivationLayout::Nchw),
            Side::OursChannelsLast => ours.step(seed, ActivationLayout::ChannelsLast),
            Side::Trainer => match trainer.as_mut() {
                Some(t) => t.step(),
                None => bail!("no trainer side"),
            },
        })
    };

    // Warm-up; the first round runs torchvision then ours (NCHW) from the same weights with
    // the same seed, and their losses are compared.
    let (mut difference, mut difference_nhwc) = (f64::NAN, f64::NAN);
    for round in 0..s.warmup {
        let seed = STEP_SEED + round as i64;
        let mut line = format!("warm-up {round}:");
        let mut first: Vec<Vec<(String, f64)>> = Vec::new();
        for &side in &sides {
            let step = run_step(side, seed)?;
            line += &format!(" {} {:.3} s,", side.name(), step.seconds);
            first.push(step.losses);
        }
        eprintln!("{}", line.trim_end_matches(','));
        if round == 0 {
            difference = loss_difference(&first[1], &first[0])?;
            for ((name, a), (_, b)) in first[1].iter().zip(&first[0]) {
                eprintln!("first step {name}: ours {a:.6} torchvision {b:.6}");
            }
            difference_nhwc = loss_difference(&nhwc_first, &first[0])?;
            eprintln!("first step: largest relative loss difference {difference:.1e}, NHWC path {difference_nhwc:.1e}");
            ensure!(
                difference <= LOSS_AGREEMENT,
                "the first step's losses differ by {difference:.2e} (relative): the two sides do not compute \
                 the same step"
            );
            // NHWC rounds differently (docs/bench-train.md): a looser bound.
            ensure!(
                difference_nhwc <= 10.0 * LOSS_AGREEMENT,
                "the NHWC path's first losses differ from torchvision's by {difference_nhwc:.2e} (relative)"
            );
        }
    }

    let mut steps: Vec<Vec<Step>> = sides.iter().map(|_| Vec::new()).collect();
    for round in 0..s.reps {
        let seed = STEP_SEED + (s.warmup + round) as i64;
        let mut line = format!("round {round}:");
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            let step = run_step(sides[i], seed)?;
            line += &format!(
                " {} {:.3} s ({:.2} CPU s, stall {:.0}%),",
                sides[i].name(),
                step.seconds,
                step.cpu_seconds,
                100.0 * step.stall
            );
            steps[i].push(step);
        }
        eprintln!("{}", line.trim_end_matches(','));
    }
    let their_rss = theirs.quit()?;
    let our_rss = peak_rss_mb();
    let load_after = machine_load();

    // Per side: all timed steps, and the quiet ones (little CPU contention from other work).
    let quiet: Vec<Vec<&Step>> = steps
        .iter()
        .map(|v| v.iter().filter(|x| x.stall <= QUIET_STALL).collect())
        .collect();
    let seconds = |v: &[&Step]| summary(&v.iter().map(|x| x.seconds).collect::<Vec<_>>());
    let all: Vec<Vec<&Step>> = steps.iter().map(|v| v.iter().collect()).collect();
    let medians: Vec<(f64, f64, f64)> = all.iter().map(|v| seconds(v)).collect();
    let quiet_medians: Vec<f64> = quiet.iter().map(|v| seconds(v).0).collect();
    let cpu: Vec<f64> = steps
        .iter()
        .map(|v| summary(&v.iter().map(|x| x.cpu_seconds).collect::<Vec<_>>()).0)
        .collect();
    let rss = |side: Side| match side {
        Side::Torchvision => their_rss,
        _ => our_rss,
    };
    println!(
        "{:<19} {:>7} {:>7} {:>7} {:>6} | {:>5} {:>7} {:>6} | {:>6} {:>7}",
        "side", "s/step", "min", "max", "ratio", "quiet", "s/step", "ratio", "CPU s", "RSS MB"
    );
    for (i, side) in sides.iter().enumerate() {
        let (median, min, max) = medians[i];
        println!(
            "{:<19} {median:>7.3} {min:>7.3} {max:>7.3} {:>6.3} | {:>5} {:>7.3} {:>6.3} | {:>6.2} {:>7.0}",
            side.name(),
            median / medians[0].0,
            quiet[i].len(),
            quiet_medians[i],
            quiet_medians[i] / quiet_medians[0],
            cpu[i],
            rss(*side)
        );
    }
    println!(
        "(medians over all {} timed steps per side, then over the quiet ones: CPU stall by other work <= {:.0}% \
         of the step; the attrstream sides share one process, so one peak RSS)",
        s.reps,
        100.0 * QUIET_STALL
    );
    let ratio = medians[1].0 / medians[0].0;
    let ratio_channels_last = medians[2].0 / medians[0].0;
    let quiet_ratio = quiet_medians[1] / quiet_medians[0];
    let quiet_ratio_channels_last = quiet_medians[2] / quiet_medians[0];
    let verdict = |r: f64| match r {
        r if r.is_nan() => "no figure",
        r if r <= 0.9 => "met",
        _ => "MISSED",
    };
    println!(
        "ratio attrstream / torchvision: {ratio:.3} ({}), quiet steps {quiet_ratio:.3} ({}); goal <= 0.9",
        verdict(ratio),
        verdict(quiet_ratio)
    );
    println!(
        "with NHWC activations: {ratio_channels_last:.3} ({}), quiet steps {quiet_ratio_channels_last:.3} ({})",
        verdict(ratio_channels_last),
        verdict(quiet_ratio_channels_last)
    );

    // Stage medians over the quiet steps when every compared side has some, else over all.
    let use_quiet = quiet[..3].iter().all(|v| !v.is_empty());
    let basis = if use_quiet { &quiet } else { &all };
    let stage_medians: Vec<Vec<f64>> = basis
        .iter()
        .map(|v| {
            (0..STAGES.len())
                .map(|j| summary(&v.iter().map(|x| x.stages[j]).collect::<Vec<_>>()).0)
                .collect()
        })
        .collect();
    println!(
        "\nmedian seconds per stage ({} steps):",
        if use_quiet { "quiet" } else { "all" }
    );
    print!("{:<18}", "stage");
    for side in &sides[..3] {
        print!(" {:>16}", side.name());
    }
    println!();
    for (j, (name, _)) in STAGES.iter().enumerate() {
        print!("{name:<18}");
        for stage in &stage_medians[..3] {
            let v = stage[j];
            let cell = if v.is_nan() { "-".to_string() } else { format!("{v:.3}") };
            print!(" {cell:>16}");
        }
        println!();
    }
    println!("before: {load_before}; after: {load_after}");

    let mut result = json!({
        "settings": {
            "min_size": s.min_size, "max_size": s.max_size, "batch": s.batch,
            "trainable_backbone_layers": s.layers, "reps": s.reps, "warmup": s.warmup,
            "threads": s.threads, "lr": LR, "images": "synthetic 640x480", "boxes": boxes,
            "flush_denormal": flushing, "quiet_stall": QUIET_STALL,
        },
        "ratio": ratio,
        "ratio_channels_last": ratio_channels_last,
        "quiet_ratio": quiet_ratio,
        "quiet_ratio_channels_last": quiet_ratio_channels_last,
        "goal_met": ratio <= 0.9,
        "first_step_loss_relative_difference": difference,
        "first_step_loss_relative_difference_channels_last": difference_nhwc,
        "stage_medians_over": if use_quiet { "quiet" } else { "all" },
        "machine_before": load_before,
        "machine_after": load_after,
    });
    for (i, side) in sides.iter().enumerate() {
        let stages: serde_json::Map<String, Value> = STAGES
            .iter()
            .zip(&stage_medians[i])
            .filter(|(_, v)| !v.is_nan())
            .map(|((name, _), v)| (name.trim().replace(' ', "_"), json!(v)))
            .collect();
        result[side.key()] = json!({
            "median_s": medians[i].0, "min_s": medians[i].1, "max_s": medians[i].2,
            "quiet_steps": quiet[i].len(), "quiet_median_s": quiet_medians[i],
            "steps_s": steps[i].iter().map(|x| x.seconds).collect::<Vec<_>>(),
            "steps_stall": steps[i].iter().map(|x| x.stall).collect::<Vec<_>>(),
            "median_cpu_s": cpu[i], "peak_rss_mb": rss(*side), "stage_medians_s": stages,
        });
    }
    if let Some(parent) = s.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&s.json, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("writing {}", s.json.display()))?;
    println!("JSON: {}", s.json.display());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train_step benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
