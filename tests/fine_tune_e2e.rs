//! The improvement loop end to end, on CPU, with the real binary and a real Kafka protocol
//! (librdkafka's in-process mock cluster):
//!
//! 1. `synth-labels` makes a labelled data set (shapes on varied backgrounds, known boxes);
//!    `publish-labels` puts it on a topic.
//! 2. `model init` makes the starting model (from scratch, no pretrained weights exist
//!    offline); it is published to a model registry and made production.
//! 3. A serve pipeline runs from the registry's production version, following it.
//! 4. `attrstream train` replays the topic, fine-tunes, evaluates the starting model and the
//!    candidate on the same leak-free validation split, publishes and promotes the candidate.
//! 5. The running service switches to the new version mid-stream: every event gets exactly one
//!    output, none fails, and the records name the version that produced them.
//!
//! Asserted: the training loss falls, the candidate's validation AP50 beats the starting
//! model's by a clear margin, the candidate is promoted, and the hot swap loses nothing.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attrstream::config::Config;
use attrstream::embedded_broker::EmbeddedBroker;
use attrstream::events::codec::{decode_attributes, encode_event, product_attributes_schema};
use attrstream::events::wire::{frame, unframe};
use attrstream::events::{ImageSource, ProductAttributes, ProductImageEvent};
use attrstream::pipeline::run;
use attrstream::serve::{detector_inference, follow_registry};
use common::kafka::*;
use common::pipeline::Running;
use serde_json::Value;

const LABELS: &str = "labelled-images";
const IN: &str = "images";
const OUT: &str = "attributes";
const DLQ: &str = "dead-letters";
/// Image side: small, so that a CPU trains in CI time.
const SIZE: &str = "128";

fn cli(args: &[&str]) -> (String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_attrstream"));
    command.args(args);
    run_ok(command)
}

/// Runs `command`, asserts it succeeded, and returns its stdout and stderr.
fn run_ok(mut command: Command) -> (String, String) {
    let started = Instant::now();
    let out = command.output().expect("run attrstream");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{command:?} failed:\n{stderr}");
    let name = command
        .get_args()
        .next()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    eprintln!("attrstream {name} took {:.0?}", started.elapsed());
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// `attrstream train` on the labelled topic from the registry's production version, as CI's CPU
/// allows (small images, frozen backbone), evaluated on the validation side of a 25 %
/// product-hash split and promoted if better; `extra` adds the run's own flags.
fn train_command(brokers: &str, registry: &str, out: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_attrstream"));
    command
        .args([
            "train",
            "--topic",
            LABELS,
            "--brokers",
            brokers,
            "--model-registry",
            registry,
        ])
        .args([
            "--base-version",
            "production",
            "--devices",
            "cpu",
            "--min-size",
            SIZE,
            "--max-size",
            SIZE,
        ])
        .args(["--trainable-backbone-layers", "0", "--batch-size", "4", "--seed", "1"])
        .args(["--validation-fraction", "0.25", "--promote", "--no-progress", "--out"])
        .arg(out)
        .args(extra);
    command
}

fn serve_config(brokers: &str, registry: &Path, cache: &Path) -> Config {
    let mut c = Config::default();
    c.kafka.bootstrap_servers = brokers.to_string();
    c.kafka.group_id = "g-serve".into();
    c.kafka.input_topic = IN.into();
    c.kafka.output_topic = OUT.into();
    c.kafka.dead_letter_topic = DLQ.into();
    c.kafka.commit_interval = Duration::from_millis(200);
    c.schemas.input_schema_id = Some(1);
    c.schemas.output_schema_id = Some(2);
    c.schemas.dead_letter_schema_id = Some(3);
    c.batch.max_wait = Duration::from_millis(5);
    c.model.registry = Some(registry.to_str().unwrap().to_string());
    c.model.registry_cache_dir = cache.to_path_buf();
    c.model.registry_poll_interval = Duration::from_millis(500);
    c.model.devices = vec!["cpu".into()];
    c.model.threads_per_worker = 1;
    c.pipeline.shutdown_deadline = Duration::from_secs(30);
    c.validate().unwrap();
    c
}

/// The serve pipeline, following the registry, on its own thread.
fn start_serving(config: Config) -> Running {
    let (mut inference, model) = detector_inference(&config).expect("serve starts from the registry");
    Running::spawn(move |shutdown| async move {
        inference.updates = follow_registry(&config, &model).await?;
        run(config, inference, shutdown).await
    })
}

/// Product-image events for the synthetic images, inline.
fn image_events(dir: &Path, prefix: &str, count: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .cycle()
        .take(count)
        .enumerate()
        .map(|(i, path)| {
            let e = ProductImageEvent {
                event_id: format!("{prefix}-{i}"),
                product_id: format!("{prefix}-{i}"),
                image: ImageSource::Inline(std::fs::read(path).unwrap()),
                content_type: Some("image/png".into()),
                metadata: BTreeMap::new(),
                event_time_ms: None,
            };
            (e.product_id.clone().into_bytes(), frame(1, &encode_event(&e)))
        })
        .collect()
}

/// The attribute records on the output topic: until `count` arrived or `timeout` passed.
fn outputs(brokers: &str, count: usize, timeout: Duration) -> Vec<ProductAttributes> {
    let schema = product_attributes_schema();
    read_topics(brokers, &[OUT], count, timeout)
        .iter()
        .map(|r| {
            let (_, body) = unframe(&r.value).unwrap();
            decode_attributes(body, schema).unwrap()
        })
        .collect()
}

#[test]
fn fine_tuning_improves_the_model_and_serve_switches_to_it_without_losing_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic");
    let registry = dir.path().join("registry");
    let base = dir.path().join("base.safetensors");
    let broker = EmbeddedBroker::start(1, &[(LABELS, 2), (IN, 2), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();

    // 1. Labelled data on a topic.
    cli(&[
        "synth-labels",
        "--out",
        data.to_str().unwrap(),
        "--images",
        "160",
        "--seed",
        "5",
        "--width",
        SIZE,
        "--height",
        SIZE,
    ]);
    let annotations = data.join("annotations.json");
    cli(&[
        "publish-labels",
        "--annotations",
        annotations.to_str().unwrap(),
        "--product-id-field",
        "product_id",
        "--brokers",
        &brokers,
        "--topic",
        LABELS,
        "--schema-id",
        "5",
    ]);

    // 2. The starting model, production version 1.
    let classes = "red_circle,blue_square,green_triangle,yellow_star";
    cli(&[
        "model",
        "init",
        "--classes",
        classes,
        "--calibration-images",
        data.join("images").to_str().unwrap(),
        "--min-size",
        SIZE,
        "--max-size",
        SIZE,
        "--seed",
        "3",
        "--output",
        base.to_str().unwrap(),
    ]);
    let reg = registry.to_str().unwrap();
    let published: Value = serde_json::from_str(
        &cli(&[
            "model",
            "registry",
            "--registry",
            reg,
            "publish",
            "--weights",
            base.to_str().unwrap(),
        ])
        .0,
    )
    .unwrap();
    let v1 = published["version"].as_str().unwrap().to_string();
    cli(&[
        "model",
        "registry",
        "--registry",
        reg,
        "promote",
        &v1,
        "--force",
        "--note",
        "first version",
    ]);

    // 3. Serving from the registry, with a trickle of events all along.
    let serving = start_serving(serve_config(&brokers, &registry, &dir.path().join("serve-cache")));
    let stop_feeding = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (brokers, data, stop) = (brokers.clone(), data.clone(), stop_feeding.clone());
        std::thread::spawn(move || {
            // One event every two seconds: within what one CPU thread serves while training runs.
            let events = image_events(&data, "evt", 10_000);
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) && sent < events.len() {
                produce_raw(&brokers, IN, &events[sent..sent + 1]);
                sent += 1;
                std::thread::sleep(Duration::from_secs(2));
            }
            sent
        })
    };
    let early = outputs(&brokers, 4, Duration::from_secs(120));
    assert_eq!(early.len(), 4, "serve answers");
    assert!(early.iter().all(|o| o.model.version == v1), "served by version 1 first");

    // 4. Fine-tune, evaluate, publish, promote.
    let out_dir = dir.path().join("run");
    let (stdout, stderr) = run_ok(train_command(
        &brokers,
        reg,
        &out_dir,
        &[
            "--steps",
            "60",
            "--lr",
            "0.02",
            "--warmup-steps",
            "6",
            "--clip-grad-norm",
            "10",
            "--checkpoint-every",
            "20",
        ],
    ));
    eprintln!("{stderr}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let losses: Vec<f64> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            ["classifier", "box_reg", "objectness", "rpn_box_reg"]
                .iter()
                .map(|k| s[k].as_f64().unwrap())
                .sum()
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[losses.len() - 10..]));
    assert!(
        last < 0.7 * first,
        "training loss fell: first 10 steps {first:.3}, last 10 {last:.3}"
    );
    let (base_ap50, cand_ap50) = (
        summary["base_ap50"].as_f64().unwrap(),
        summary["candidate_ap50"].as_f64().unwrap(),
    );
    assert!(
        cand_ap50 > base_ap50 + 0.15,
        "the candidate beats the starting model clearly on validation: AP50 {cand_ap50:.3} vs {base_ap50:.3}"
    );
    // The split kept products apart and both sides are reported.
    assert!(report["split"]["validation"]["images"].as_u64().unwrap() > 10);
    assert_eq!(summary["promoted"], Value::Bool(true), "promoted: {stderr}");
    let v2 = summary["version"].as_str().unwrap().to_string();
    assert!(out_dir.join("pr_curve.png").exists());
    // `attrstream eval` on the same validation side of the topic gives the trainer's number.
    let eval_dir = dir.path().join("eval");
    let model = out_dir.join("model.safetensors");
    cli(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--topic",
        LABELS,
        "--brokers",
        &brokers,
        "--validation-fraction",
        "0.25",
        "--devices",
        "cpu",
        "--out",
        eval_dir.to_str().unwrap(),
    ]);
    let evaluated: Value = serde_json::from_slice(&std::fs::read(eval_dir.join("metrics.json")).unwrap()).unwrap();
    let eval_ap50 = evaluated["stats"]["ap50"].as_f64().unwrap();
    assert!(
        (eval_ap50 - cand_ap50).abs() < 1e-9,
        "eval {eval_ap50} vs train {cand_ap50}"
    );

    // 5. The service switches to v2 while events keep coming.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = outputs(&brokers, usize::MAX, Duration::from_secs(2));
        if seen.iter().filter(|o| o.model.version == v2).count() >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "serve did not switch to {v2}");
        std::thread::sleep(Duration::from_secs(1));
    }
    stop_feeding.store(true, Ordering::SeqCst);
    let sent = feeder.join().unwrap();
    // Serve may lag behind while training takes the CPU: let it catch up, then stop it.
    let all = outputs(&brokers, sent, Duration::from_secs(300));
    let report = serving.stop();
    let dead = read_topics(&brokers, &[DLQ], 1, Duration::from_secs(2));
    assert!(dead.is_empty(), "no event failed during the swap");
    let ids: HashSet<&str> = all.iter().map(|o| o.event_id.as_str()).collect();
    assert_eq!(ids.len(), sent, "every event has its output: {report:?}");
    let versions: HashSet<&str> = all.iter().map(|o| o.model.version.as_str()).collect();
    assert_eq!(versions, HashSet::from([v1.as_str(), v2.as_str()]));
    // Once an event of v2 came out of a partition, later events of that partition are v2 too.
    let by_id: BTreeMap<usize, &str> = all
        .iter()
        .map(|o| {
            (
                o.event_id.trim_start_matches("evt-").parse::<usize>().unwrap(),
                o.model.version.as_str(),
            )
        })
        .collect();
    let first_v2 = by_id.iter().find(|(_, v)| **v == v2).map(|(i, _)| *i).unwrap();
    let stragglers = by_id.range(first_v2 + 8..).filter(|(_, v)| **v == v1).count();
    assert_eq!(stragglers, 0, "after the switch only the new version serves");

    // 6. A promotion the registry refuses is exit code 1 with the reason, and production stays.
    let refused_dir = dir.path().join("refused");
    let cache = out_dir.join("cache");
    let extra = [
        "--steps",
        "1",
        "--min-improvement",
        "1",
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let out = train_command(&brokers, reg, &refused_dir, &extra)
        .output()
        .expect("run attrstream train");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a refused promotion exits 1: {stderr}");
    assert!(stderr.contains("not promoted"), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["promoted"], Value::Bool(false));
    let production = cli(&["model", "registry", "--registry", reg, "show", "production"]).0;
    assert!(production.contains(&v2), "production is still {v2}: {production}");
}
