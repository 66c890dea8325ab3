//! The README's main command and the two helper commands, run as a user runs them:
//! `attrstream demo` (in-process broker, real SSD model, sample photos) prints attribute
//! records and dead letters and writes annotated images; `attrstream tail` prints the records
//! of a topic as JSON.

mod common;

use std::process::Command;

use attrstream::embedded_broker::EmbeddedBroker;
use attrstream::events::codec::encode_attributes;
use attrstream::events::wire::frame;
use attrstream::events::{ModelRef, ProductAttributes, StageTimings};

#[test]
fn demo_prints_attribute_records_and_dead_letters() {
    let out = tempfile::tempdir().unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_attrstream"))
        .args(["demo", "--out"])
        .arg(out.path())
        .args(["--devices", "cpu"])
        .env("RUST_LOG", "warn")
        .current_dir(common::root())
        .output()
        .expect("run attrstream demo");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let line = |product: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().any(|t| t == product))
            .unwrap_or_else(|| panic!("no line for {product}:\n{stdout}"))
            .to_string()
    };
    assert!(
        line("coffee").starts_with("attributes") && line("coffee").contains("cup"),
        "{stdout}"
    );
    assert!(line("chelsea").contains("cat"), "{stdout}");
    assert!(line("astronaut").contains("person"), "{stdout}");
    assert!(line("broken-upload").starts_with("dead letter") && line("broken-upload").contains("corrupt_image"));
    assert!(line("internal-url").contains("blocked_address"), "{stdout}");
    let records = std::fs::read_to_string(out.path().join("records.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 6, "4 photos + 2 broken events");
    for product in ["coffee", "chelsea", "astronaut", "rocket"] {
        assert!(
            out.path().join(format!("{product}.png")).exists(),
            "annotated {product}.png"
        );
    }
    assert!(stderr.contains("4 attribute records, 2 dead letters"), "{stderr}");
}

#[test]
fn tail_prints_records_as_json() {
    let broker = EmbeddedBroker::start(1, &[("attrs", 1)]).unwrap();
    let record = ProductAttributes {
        event_id: "e-1".into(),
        product_id: "p-1".into(),
        model: ModelRef {
            name: "m".into(),
            version: "v".into(),
        },
        image_width: 10,
        image_height: 20,
        detections: vec![],
        attributes: Default::default(),
        timings: StageTimings::default(),
        event_time_ms: None,
        processed_time_ms: 1,
        metadata: Default::default(),
    };
    common::kafka::produce_raw(
        broker.bootstrap_servers(),
        "attrs",
        &[(b"p-1".to_vec(), frame(2, &encode_attributes(&record)))],
    );
    let result = Command::new(env!("CARGO_BIN_EXE_attrstream"))
        .args([
            "tail",
            "--brokers",
            broker.bootstrap_servers(),
            "--topic",
            "attrs",
            "--max",
            "1",
        ])
        .args([
            "--set",
            "schemas.input_schema_id=1",
            "--set",
            "schemas.output_schema_id=2",
        ])
        .args(["--set", "schemas.dead_letter_schema_id=3", "--idle-exit-secs", "20"])
        .output()
        .expect("run attrstream tail");
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let json: serde_json::Value = serde_json::from_slice(&result.stdout).expect("one JSON record");
    assert_eq!(json["event_id"], "e-1");
    assert_eq!(json["image_height"], 20);
}
