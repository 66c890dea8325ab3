//! One Faster R-CNN training step: attrstream against torchvision, same seeded weights, same
//! batch, same trainable layers, optimizer and thread count, steps alternating between the
//! two in one run.
//!
//! A step is what torchvision's reference training loop does per batch: zero the gradients,
//! the four training losses (forward), backward of their sum, one SGD step (momentum 0.9,
//! weight decay 1e-4). Ours: `FasterRcnn::training_losses` with `Sampler::random()`,
//! `TrainingLosses::total().backward()`, `train::sgd::Sgd::step` over
//! `trainable_variables`. Theirs: `benches/torchvision_train_step.py`, a server process
//! that builds the training parity test's seeded model (FrozenBatchNorm2d ResNet-50,
//! `_resnet_fpn_extractor(body, layers)`), writes its weights for us
//! (`FasterRcnn::load_for_fine_tuning` loads them) and runs a step per request. Both seed
//! libtorch's generator alike before each step, so the first steps sample the same anchors and
//! proposals; the losses of the first warm-up step are compared (a check that both sides do
//! the same work) and the run fails when they differ by more than 1e-3 relative.
//!
//! The batch: `BENCH_BATCH` seeded synthetic images (`train::synthetic`, 640×480, 1–4 boxes
//! each, 4 classes) written as PNG files that both sides read. After `BENCH_WARMUP` steps
//! each, `BENCH_REPS` timed steps alternate (torchvision first on even repetitions, ours
//! first on odd ones) so that both meet the same machine load. Printed: median (and min,
//! max) seconds per step of each side, the ratio ours / torchvision (goal ≤ 0.9), the peak
//! RSS of each process, the median time of each stage of a step on both sides (transform,
//! ResNet body, FPN, RPN, box head, the whole forward, backward, optimizer; torchvision's
//! from forward hooks, ours from `TrainingLosses::timings`), and a JSON result
//! (`BENCH_JSON`, default `target/bench/train_step.json`).
//!
//! Run: `scripts/bench-train` (or `cargo bench --bench train_step`). Environment:
//! `BENCH_SIZE` (min_size, default 512), `BENCH_MAX_SIZE` (default 1333), `BENCH_BATCH`
//! (images per step, default 2), `BENCH_LAYERS` (trainable backbone layers 0–5, default 3),
//! `BENCH_REPS` (timed steps per side, default 5), `BENCH_WARMUP` (default 1),
//! `BENCH_THREADS` (libtorch threads of each side, default 2), `BENCH_TRAINER=1` (also time `train::trainer::Trainer::step`, what
//! `attrstream train` runs, with flips off and no clipping). Needs the reference Python
//! environment (`scripts/setup --test`). Figures and what they mean: docs/bench-train.md.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
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
/// batch of 2, small enough that random weights do not diverge during the run.
const LR: f64 = 0.0025;
/// Seed of the synthetic batch.
const DATA_SEED: u64 = 5;
/// Seed of libtorch's generator before step `i` is `STEP_SEED + i` on both sides.
const STEP_SEED: i64 = 1000;
/// Largest relative difference between the two sides' first losses.
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
        ensure!(s.warmup >= 1, "BENCH_WARMUP must be at least 1 (its losses are compared)");
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

/// Writes `n` seeded synthetic images (640×480, 1–4 objects of 48–160 px) as PNG files into `dir`.
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
            s.image.save(&path).with_context(|| format!("writing {}", path.display()))?;
            Ok(BatchImage {
                path,
                boxes: s.objects.iter().map(|o| o.bbox.map(|v| v as f32)).collect(),
                labels: s.objects.iter().map(|o| o.class as i64 + 1).collect(),
            })
        })
        .collect();
    images
}

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
            serde_json::from_str(&line).with_context(|| format!("torchvision process replied {line:?}"))?;
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
        let stages = STAGES
            .iter()
            .map(|&(ours, theirs)| (ours, theirs.map_or(f64::NAN, stage)))
            .collect();
        Ok(Step {
            seconds,
            cpu_seconds: reply["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
            losses: losses(&reply),
            stages,
        })
    }

    /// Peak RSS in MB; ends the process.
    fn quit(mut self) -> Result<f64> {
        let reply = self.request("quit")?;
        let _ = self.child.wait();
        Ok(reply["peak_rss_mb"].as_f64().unwrap_or(f64::NAN))
    }
}

fn losses(reply: &Value) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = reply["losses"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN))).collect())
        .unwrap_or_default();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
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
    stages: Vec<(&'static str, f64)>,
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

    /// One timed step.
    fn step(&mut self, seed: i64) -> Result<Step> {
        tch::manual_seed(seed);
        let cpu_start = process_cpu_seconds();
        let start = Instant::now();
        for (_, p) in &self.params {
            p.shallow_clone().zero_grad();
        }
        let losses = self
            .model
            .training_losses(&self.images, &self.targets, &mut Sampler::random())?;
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
        let secs = |d: std::time::Duration| d.as_secs_f64();
        let stages = vec![
            ("transform", secs(t.transform)),
            ("backbone", secs(t.backbone)),
            ("fpn", secs(t.fpn)),
            ("rpn", secs(t.rpn_proposals + t.rpn_loss)),
            ("  rpn proposals", secs(t.rpn_proposals)),
            ("  rpn loss", secs(t.rpn_loss)),
            ("box head", secs(t.box_head)),
            ("forward", secs(forward_done - start)),
            ("backward", secs(backward_done - forward_done)),
            ("optimizer", secs(end - backward_done)),
        ];
        Ok(Step {
            seconds: secs(end - start),
            cpu_seconds,
            losses: values,
            stages,
        })
    }
}

fn read_image(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(to_tensor(&decode_image(&bytes, DEFAULT_MAX_PIXELS)?, Device::Cpu))
}

/// `attrstream train`'s step (`Trainer::step`) on the same batch, flips off, no clipping.
fn trainer(weights: &Path, cfg: &FasterRcnnConfig, s: &Settings) -> Result<Trainer> {
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
    Trainer::new(
        &[Device::Cpu],
        |device| {
            let (vs, model, _) = FasterRcnn::load_for_fine_tuning(weights, device, cfg.clone(), s.layers)?;
            Ok((vs, model))
        },
        settings,
    )
}

fn train_examples(batch: &[BatchImage]) -> Result<Vec<TrainExample>> {
    batch
        .iter()
        .map(|b| {
            let target = Target::new(&b.boxes, &b.labels);
            Ok(TrainExample {
                image: read_image(&b.path)?,
                boxes: target.boxes,
                labels: target.labels,
            })
        })
        .collect()
}

/// Median, min and max.
fn summary(times: &[f64]) -> (f64, f64, f64) {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len();
    let median = if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    };
    (median, t[0], t[n - 1])
}

/// CPU time this process has used, user and system, all threads (Linux `/proc/self/stat`,
/// in clock ticks of 10 ms); NaN elsewhere.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
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

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Sets flush-to-zero and denormals-are-zero (MXCSR bits 15 and 6) on this thread, as
/// `torch.set_flush_denormal(True)` does; libtorch's OpenMP threads, created later by this
/// thread, inherit it. Returns whether it is supported (x86-64 only).
fn flush_denormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr read and write the SSE control register through a valid,
        // aligned u32; setting FTZ and DAZ only changes how subnormal floats are rounded.
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
        "train step: batch {} synthetic 640x480 images ({boxes:?} boxes), min_size {}, max_size {}, {} trainable backbone layers, {} threads, {} warm-up + {} timed steps per side, denormals {}",
        s.batch, s.min_size, s.max_size, s.layers, s.threads, s.warmup, s.reps,
        if flushing { "flushed to zero" } else { "kept" }
    );
    eprintln!("load average before: {}", load_average());

    let (mut theirs, ready) = Reference::start(&weights, &spec_file, s.threads)?;
    let cfg = FasterRcnnConfig {
        num_classes,
        min_size: s.min_size,
        max_size: s.max_size,
        ..Default::default()
    };
    let mut ours = Ours::load(&weights, &cfg, s.layers, &batch)?;
    let our_params: i64 = ours.params.iter().map(|(_, p)| p.numel() as i64).sum();
    let their_params = ready["trainable_parameters"].as_i64().unwrap_or(-1);
    ensure!(
        our_params == their_params,
        "trainable parameters differ: ours {our_params}, torchvision's {their_params}"
    );
    let mut trainer = if s.trainer {
        Some((trainer(&weights, &cfg, &s)?, train_examples(&batch)?))
    } else {
        None
    };

    let mut first = None;
    for i in 0..s.warmup {
        let seed = STEP_SEED + i as i64;
        let t = theirs.step(seed)?;
        let o = ours.step(seed)?;
        eprintln!("warm-up {i}: torchvision {:.3} s, ours {:.3} s", t.seconds, o.seconds);
        if i == 0 {
            first = Some((o.losses, t.losses));
        }
        if let Some((t, examples)) = trainer.as_mut() {
            t.step(&examples.iter().collect::<Vec<_>>())?;
        }
    }
    let (first_ours, first_theirs) = first.context("no warm-up step ran")?;
    let difference = loss_difference(&first_ours, &first_theirs)?;
    for ((name, a), (_, b)) in first_ours.iter().zip(&first_theirs) {
        eprintln!("first step {name}: ours {a:.6} torchvision {b:.6}");
    }
    ensure!(
        difference <= LOSS_AGREEMENT,
        "the first step's losses differ by {difference:.2e} (relative): the two sides do not compute the same step"
    );

    let (mut ours_steps, mut theirs_steps, mut trainer_t) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..s.reps {
        let seed = STEP_SEED + (s.warmup + r) as i64;
        if r % 2 == 0 {
            theirs_steps.push(theirs.step(seed)?);
            ours_steps.push(ours.step(seed)?);
        } else {
            ours_steps.push(ours.step(seed)?);
            theirs_steps.push(theirs.step(seed)?);
        }
        if std::env::var_os("BENCH_AB").is_some() {
            // EXPERIMENT (temporary): ours with ATTRSTREAM_EXP_CL set.
            std::env::set_var("ATTRSTREAM_EXP_CL", "1");
            let b = ours.step(seed)?;
            std::env::remove_var("ATTRSTREAM_EXP_CL");
            eprintln!("   B: {:.3} s ({:.2} CPU s) stages {:?}", b.seconds, b.cpu_seconds, b.stages);
            eprintln!("   A: stages {:?}", ours_steps[r].stages);
            trainer_t.push(b.seconds);
        }
        if let Some((t, examples)) = trainer.as_mut() {
            let start = Instant::now();
            t.step(&examples.iter().collect::<Vec<_>>())?;
            trainer_t.push(start.elapsed().as_secs_f64());
        }
        eprintln!(
            "step {r}: torchvision {:.3} s ({:.2} CPU s), ours {:.3} s ({:.2} CPU s){}",
            theirs_steps[r].seconds,
            theirs_steps[r].cpu_seconds,
            ours_steps[r].seconds,
            ours_steps[r].cpu_seconds,
            trainer_t.get(r).map(|t| format!(", Trainer::step {t:.3} s")).unwrap_or_default()
        );
    }
    let their_rss = theirs.quit()?;
    let our_rss = peak_rss_mb();
    let load_after = load_average();

    let ours_t: Vec<f64> = ours_steps.iter().map(|x| x.seconds).collect();
    let theirs_t: Vec<f64> = theirs_steps.iter().map(|x| x.seconds).collect();
    let ours_cpu = summary(&ours_steps.iter().map(|x| x.cpu_seconds).collect::<Vec<_>>()).0;
    let theirs_cpu = summary(&theirs_steps.iter().map(|x| x.cpu_seconds).collect::<Vec<_>>()).0;
    let (ours_med, ours_min, ours_max) = summary(&ours_t);
    let (theirs_med, theirs_min, theirs_max) = summary(&theirs_t);
    let trainer_summary = (!trainer_t.is_empty()).then(|| summary(&trainer_t));
    let ratio = ours_med / theirs_med;
    println!(
        "{:<20} {:>10} {:>8} {:>8} {:>10} {:>12}",
        "side", "s/step", "min", "max", "CPU s/step", "peak RSS MB"
    );
    println!(
        "{:<20} {theirs_med:>10.3} {theirs_min:>8.3} {theirs_max:>8.3} {theirs_cpu:>10.2} {their_rss:>12.0}",
        "torchvision"
    );
    println!(
        "{:<20} {ours_med:>10.3} {ours_min:>8.3} {ours_max:>8.3} {ours_cpu:>10.2} {our_rss:>12.0}",
        "attrstream"
    );
    if let Some((med, min, max)) = trainer_summary {
        println!("{:<20} {med:>10.3} {min:>8.3} {max:>8.3}", "attrstream Trainer");
    }
    println!(
        "ratio ours / torchvision: {ratio:.3} (goal <= 0.9: {}); CPU time ratio {:.3}",
        if ratio <= 0.9 { "met" } else { "MISSED" },
        ours_cpu / theirs_cpu
    );
    if let Some((med, _, _)) = trainer_summary {
        println!("ratio Trainer::step / torchvision: {:.3}", med / theirs_med);
    }
    let stage_medians = |steps: &[Step]| -> Vec<f64> {
        (0..STAGES.len())
            .map(|i| summary(&steps.iter().map(|x| x.stages[i].1).collect::<Vec<_>>()).0)
            .collect()
    };
    let (ours_stages, theirs_stages) = (stage_medians(&ours_steps), stage_medians(&theirs_steps));
    println!("\nmedian seconds per stage:");
    println!("{:<20} {:>12} {:>10} {:>8}", "stage", "torchvision", "ours", "ratio");
    for (i, (name, _)) in STAGES.iter().enumerate() {
        let (t, o) = (theirs_stages[i], ours_stages[i]);
        let cell = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.3}") };
        println!("{name:<20} {:>12} {:>10} {:>8}", cell(t), cell(o), cell(o / t));
    }
    println!("load average after: {load_after}");

    let stage_json = |medians: &[f64]| -> serde_json::Map<String, Value> {
        STAGES
            .iter()
            .zip(medians)
            .filter(|(_, v)| !v.is_nan())
            .map(|((name, _), v)| (name.trim().to_string(), json!(v)))
            .collect()
    };
    let result = json!({
        "settings": {
            "min_size": s.min_size, "max_size": s.max_size, "batch": s.batch,
            "trainable_backbone_layers": s.layers, "reps": s.reps, "warmup": s.warmup,
            "threads": s.threads, "lr": LR, "images": "synthetic 640x480", "boxes": boxes,
            "flush_denormal": flushing,
        },
        "torchvision": {
            "median_s": theirs_med, "min_s": theirs_min, "max_s": theirs_max, "steps_s": theirs_t,
            "median_cpu_s": theirs_cpu, "peak_rss_mb": their_rss, "stage_medians_s": stage_json(&theirs_stages),
        },
        "attrstream": {
            "median_s": ours_med, "min_s": ours_min, "max_s": ours_max, "steps_s": ours_t,
            "median_cpu_s": ours_cpu, "peak_rss_mb": our_rss, "stage_medians_s": stage_json(&ours_stages),
        },
        "trainer": trainer_summary.map(|(med, min, max)| json!({"median_s": med, "min_s": min, "max_s": max, "steps_s": trainer_t})),
        "ratio": ratio,
        "cpu_ratio": ours_cpu / theirs_cpu,
        "goal_met": ratio <= 0.9,
        "first_step_loss_relative_difference": difference,
        "load_average_after": load_after,
    });
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
