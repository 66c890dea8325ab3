//! Labelled training data end to end: the LabelledImage Avro contract against its .avsc file and
//! an independent implementation (Python fastavro), then `synth-labels` → `publish-labels` →
//! replay against librdkafka's in-process Kafka broker: exactly the annotation file comes back
//! (boxes, labels, pixel-equal images), snapshots are bounded (later records are not read;
//! offset and timestamp ranges select the right records), no consumer-group offsets are
//! committed, malformed records are reported without stopping the replay, and a second replay
//! is served from the cache with the image files gone.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use attrstream::embedded_broker::EmbeddedBroker;
use attrstream::events::error_kinds;
use attrstream::events::labelled::*;
use attrstream::events::registry::SchemaRegistry;
use attrstream::events::ImageSource;
use attrstream::train::replay::{replay, replay_snapshot, take_snapshot, Example, ReplayOptions, ReplayRanges};
use attrstream::train::synthetic::{self, SynthConfig};
use common::registry::TestRegistry;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{json, Value};

const SCHEMA_ID: u32 = 5;
const T0: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------
// The Avro contract
// ---------------------------------------------------------------------------------------

fn script() -> PathBuf {
    common::root().join("tests/reference/labelled_avro_reference.py")
}

fn sample(image: ImageSource, full: bool) -> LabelledImage {
    LabelledImage {
        product_id: "sku-42".into(),
        image,
        width: full.then_some(640),
        height: full.then_some(480),
        annotations: if full {
            vec![
                BoxAnnotation {
                    x1: 10.5,
                    y1: 20.25,
                    x2: 300.0,
                    y2: 240.125,
                    label: "cup".into(),
                    iscrowd: Some(false),
                },
                BoxAnnotation {
                    x1: 0.1,
                    y1: 0.2,
                    x2: 639.9,
                    y2: 479.0,
                    label: "dining table".into(),
                    iscrowd: Some(true),
                },
                BoxAnnotation {
                    x1: 1.0,
                    y1: 1.0,
                    x2: 1.0,
                    y2: 2.0,
                    label: "ünï ✓".into(),
                    iscrowd: None,
                },
            ]
        } else {
            vec![]
        },
        split: full.then_some(SplitHint::Validation),
        label_source: label_sources::COCO_IMPORT.into(),
        event_id: full.then(|| "evt-1".into()),
        event_time_ms: full.then_some(T0 + 123),
        metadata: if full {
            [("file_name".to_owned(), "a b.png".to_owned())].into()
        } else {
            BTreeMap::new()
        },
    }
}

fn samples() -> Vec<(&'static str, LabelledImage)> {
    vec![
        (
            "inline_full",
            sample(ImageSource::Inline(vec![0x89, b'P', 0, 0xff, 7]), true),
        ),
        ("inline_empty_bare", sample(ImageSource::Inline(vec![]), false)),
        (
            "uri_full",
            sample(ImageSource::Uri("s3://bucket/p/42.jpg".into()), true),
        ),
        (
            "uri_bare",
            sample(ImageSource::Uri("file:///data/a b.png".into()), false),
        ),
    ]
}

/// The schema file on disk (not the embedded copy) decodes what the encoder writes, strictly,
/// and apache-avro re-encodes the decoded value to the same bytes.
#[test]
fn the_avsc_file_and_the_encoder_agree() {
    let text = std::fs::read_to_string(common::root().join("schemas/labelled_image.avsc")).unwrap();
    let file_schema = Schema::parse_str(&text).unwrap();
    assert!(file_schema == *labelled_image_schema());
    for (name, record) in samples() {
        let body = encode_labelled(&record);
        let mut rest = &body[..];
        let value = apache_avro::from_avro_datum(&file_schema, &mut rest, None).unwrap();
        assert!(rest.is_empty(), "{name}: bytes left over");
        // (At most one metadata entry: apache-avro's maps are unordered.)
        assert_eq!(apache_avro::to_avro_datum(&file_schema, value).unwrap(), body, "{name}");
        assert_eq!(decode_labelled(&body, &file_schema).unwrap(), record, "{name}");
    }
}

#[test]
fn fastavro_reads_what_rust_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for (i, (name, record)) in samples().into_iter().enumerate() {
        let file = format!("{name}.bin");
        let id = 100 + i as u32;
        std::fs::write(dir.path().join(&file), encode_labelled_framed(id, &record)).unwrap();
        cases.push(
            json!({"name": name, "file": file, "schema_id": id, "domain": serde_json::to_value(&record).unwrap()}),
        );
    }
    std::fs::write(dir.path().join("cases.json"), serde_json::to_vec(&cases).unwrap()).unwrap();
    common::run_python(&script(), &["check", dir.path().to_str().unwrap()]);
}

#[test]
fn rust_reads_what_fastavro_writes_directly_and_through_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    common::run_python(&script(), &["write", dir.path().to_str().unwrap()]);
    let manifest: Vec<Value> = serde_json::from_slice(&std::fs::read(dir.path().join("cases.json")).unwrap()).unwrap();
    assert_eq!(manifest.len(), 7, "the script writes 7 cases");
    let registry = TestRegistry::start();
    let client = Arc::new(SchemaRegistry::new(&registry.url, None, Duration::from_secs(5)).unwrap());
    let decoder = LabelledDecoder::new(Some(client));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for case in &manifest {
        let name = case["name"].as_str().unwrap();
        let writer_json = std::fs::read_to_string(dir.path().join(case["writer"].as_str().unwrap())).unwrap();
        let writer = Schema::parse_str(&writer_json).unwrap();
        let body = std::fs::read(dir.path().join(case["file"].as_str().unwrap())).unwrap();
        let expected: Option<LabelledImage> = serde_json::from_value(case["expected"].clone()).unwrap();
        let id = registry.insert_schema(&writer_json, None);
        let direct = decode_labelled(&body, &writer);
        let via_registry = runtime.block_on(decoder.decode(&attrstream::events::wire::frame(id, &body)));
        for result in [direct, via_registry] {
            match (&expected, result) {
                (Some(expected), Ok(record)) => assert_eq!(&record, expected, "{name}"),
                (Some(_), Err(e)) => panic!("{name}: {e}"),
                (None, Ok(record)) => panic!("{name}: decoded {record:?}, expected an error"),
                (None, Err(e)) => assert_eq!(e.kind(), Some(error_kinds::INVALID_EVENT), "{name}: {e}"),
            }
        }
    }
    // A registry that cannot be reached is not the record's fault: no skip kind, so replay stops.
    registry.set_unavailable(true);
    let fresh = LabelledDecoder::new(Some(Arc::new(
        SchemaRegistry::new(&registry.url, None, Duration::from_secs(5)).unwrap(),
    )));
    let body = encode_labelled_framed(1, &samples()[0].1);
    let err = runtime.block_on(fresh.decode(&body)).unwrap_err();
    assert_eq!(err.kind(), None, "{err}");
}

// ---------------------------------------------------------------------------------------
// Kafka: publish-labels and replay
// ---------------------------------------------------------------------------------------

fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_attrstream"))
        .args(args)
        .output()
        .expect("run attrstream");
    assert!(
        out.status.success(),
        "attrstream {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `synth-labels` into `dir`; returns the parsed annotation file.
fn synth(dir: &Path, images: usize, seed: u64) -> Value {
    let summary: Value = serde_json::from_str(&cli(&[
        "synth-labels",
        "--out",
        dir.to_str().unwrap(),
        "--images",
        &images.to_string(),
        "--seed",
        &seed.to_string(),
    ]))
    .unwrap();
    assert_eq!(summary["images"], json!(images));
    serde_json::from_slice(&std::fs::read(dir.join("annotations.json")).unwrap()).unwrap()
}

/// `publish-labels` of the synthetic folder; returns the printed summary.
fn publish(brokers: &str, topic: &str, dir: &Path, extra: &[&str]) -> Value {
    let annotations = dir.join("annotations.json");
    let mut args = vec![
        "publish-labels",
        "--annotations",
        annotations.to_str().unwrap(),
        "--product-id-field",
        "product_id",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--schema-id",
        "5",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&cli(&args)).unwrap()
}

/// What the annotation file says about each image, keyed by file name.
struct Expected {
    product_id: String,
    boxes: Vec<[f32; 4]>,
    labels: Vec<String>,
    iscrowd: Vec<bool>,
}

fn expected_from_coco(coco: &Value) -> BTreeMap<String, Expected> {
    let names: BTreeMap<u64, String> = coco["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_u64().unwrap(), c["name"].as_str().unwrap().to_string()))
        .collect();
    let mut by_id: BTreeMap<u64, (String, Expected)> = coco["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let e = Expected {
                product_id: i["product_id"].as_str().unwrap().to_string(),
                boxes: vec![],
                labels: vec![],
                iscrowd: vec![],
            };
            (
                i["id"].as_u64().unwrap(),
                (i["file_name"].as_str().unwrap().to_string(), e),
            )
        })
        .collect();
    for a in coco["annotations"].as_array().unwrap() {
        let b: Vec<f32> = a["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let e = &mut by_id.get_mut(&a["image_id"].as_u64().unwrap()).unwrap().1;
        e.boxes.push([b[0], b[1], b[0] + b[2], b[1] + b[3]]);
        e.labels.push(names[&a["category_id"].as_u64().unwrap()].clone());
        e.iscrowd.push(a["iscrowd"].as_u64().unwrap() == 1);
    }
    by_id.into_values().collect()
}

/// Asserts that the examples are exactly the synthetic data set: one per image, the annotation
/// file's boxes and labels, and the generator's own pixels (independent of PNG decoding).
fn assert_examples_equal_data_set(examples: &[Example], coco: &Value, config: &SynthConfig) {
    let expected = expected_from_coco(coco);
    assert_eq!(examples.len(), expected.len());
    let generated: Vec<_> = synthetic::generate(config).unwrap().collect();
    let mut seen = std::collections::BTreeSet::new();
    for e in examples {
        let file = e
            .metadata
            .get("file_name")
            .expect("publish-labels records the file name");
        assert!(seen.insert(file.clone()), "{file} replayed twice");
        let want = &expected[file];
        assert_eq!(e.product_id, want.product_id, "{file}");
        assert_eq!(e.boxes, want.boxes, "{file}");
        assert_eq!(e.labels, want.labels, "{file}");
        assert_eq!(e.iscrowd, want.iscrowd, "{file}");
        let index: usize = file.trim_end_matches(".png").parse().unwrap();
        assert!(
            e.image == generated[index].image,
            "{file}: pixels differ from the generator's"
        );
        assert_eq!(e.label_source, "coco-import");
    }
}

fn options(broker: &EmbeddedBroker, topic: &str) -> ReplayOptions {
    let mut o = ReplayOptions::new(broker.bootstrap_servers(), topic);
    o.idle_timeout = Duration::from_secs(20);
    o
}

#[test]
fn a_published_coco_set_replays_exactly_without_group_commits() {
    let broker = EmbeddedBroker::start(1, &[("labels", 3)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coco = synth(dir.path(), 12, 3);
    let summary = publish(
        broker.bootstrap_servers(),
        "labels",
        dir.path(),
        &["--split", "validation"],
    );
    let boxes = coco["annotations"].as_array().unwrap().len();
    assert_eq!(
        (summary["records"].clone(), summary["boxes"].clone()),
        (json!(12), json!(boxes))
    );

    // Group and commit settings given by the user are ignored: replay never joins a group.
    let mut o = options(&broker, "labels");
    o.kafka_properties.extend([
        ("group.id".to_string(), "trainer".to_string()),
        ("enable.auto.commit".to_string(), "true".to_string()),
    ]);
    let replayed = replay(&o).unwrap();
    assert!(replayed.report.skipped.is_empty(), "{:?}", replayed.report.skipped);
    assert_eq!(replayed.report.records, 12);
    assert_eq!(replayed.report.snapshot.max_records(), 12);
    assert_eq!(replayed.report.snapshot.partitions.len(), 3);
    assert_examples_equal_data_set(&replayed.examples, &coco, &SynthConfig::new(12, 3));
    assert!(replayed
        .examples
        .iter()
        .all(|e| e.split_hint == Some(SplitHint::Validation)));
    // Keyed by product id: all photos of a product are in one partition.
    let mut partition_of = BTreeMap::new();
    for e in &replayed.examples {
        assert_eq!(
            *partition_of.entry(e.product_id.clone()).or_insert(e.source.partition),
            e.source.partition
        );
    }

    let committed = common::kafka::committed_offsets(broker.bootstrap_servers(), "trainer", "labels", 3);
    assert!(
        committed.values().all(|o| *o < 0),
        "offsets were committed: {committed:?}"
    );
    // The replay consumer's own (throwaway) group has nothing committed either.
    let own =
        common::kafka::committed_offsets(broker.bootstrap_servers(), &replayed.report.consumer_group, "labels", 3);
    assert!(own.values().all(|o| *o < 0), "replay committed offsets: {own:?}");
}

#[test]
fn a_second_replay_reads_the_cache_even_with_the_images_gone() {
    let broker = EmbeddedBroker::start(1, &[("uri-labels", 2)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let coco = synth(dir.path(), 6, 9);
    publish(broker.bootstrap_servers(), "uri-labels", dir.path(), &["--uri"]);

    let mut o = options(&broker, "uri-labels");
    o.fetch.file_root = Some(dir.path().to_path_buf());
    o.cache_dir = Some(cache.path().to_path_buf());
    let first = replay(&o).unwrap();
    assert_eq!((first.report.fetched, first.report.cache_hits), (6, 0));
    assert_examples_equal_data_set(&first.examples, &coco, &SynthConfig::new(6, 9));

    std::fs::remove_dir_all(dir.path().join("images")).unwrap();
    let second = replay(&o).unwrap();
    assert_eq!((second.report.fetched, second.report.cache_hits), (0, 6));
    assert!(second.report.skipped.is_empty());
    assert_examples_equal_data_set(&second.examples, &coco, &SynthConfig::new(6, 9));
    assert_eq!(first.examples, second.examples);

    // Without the cache the files really are gone: every record is reported, none is fatal.
    o.cache_dir = None;
    let uncached = replay(&o).unwrap();
    assert!(uncached.examples.is_empty());
    assert_eq!(uncached.report.skipped.len(), 6);
    assert!(uncached
        .report
        .skipped
        .iter()
        .all(|s| s.kind == error_kinds::MISSING_IMAGE));
}

/// A small labelled record with a distinct inline PNG.
fn tiny(product: &str, shade: u8) -> LabelledImage {
    LabelledImage {
        product_id: product.to_string(),
        image: ImageSource::Inline(common::kafka::png(4, 3, [shade, 0, 255 - shade])),
        width: Some(4),
        height: Some(3),
        annotations: vec![BoxAnnotation {
            x1: 0.0,
            y1: 0.0,
            x2: 2.0,
            y2: 3.0,
            label: "thing".into(),
            iscrowd: None,
        }],
        split: None,
        label_source: label_sources::HUMAN.into(),
        event_id: None,
        event_time_ms: None,
        metadata: BTreeMap::new(),
    }
}

/// Produces framed values to explicit partitions with explicit Kafka timestamps.
fn produce(brokers: &str, topic: &str, records: &[(i32, i64, Vec<u8>)]) {
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for (partition, timestamp, value) in records {
        producer
            .send(
                BaseRecord::to(topic)
                    .partition(*partition)
                    .timestamp(*timestamp)
                    .key("k")
                    .payload(value),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

fn products(examples: &[Example]) -> Vec<String> {
    examples.iter().map(|e| e.product_id.clone()).collect()
}

#[test]
fn snapshots_are_bounded_and_ranges_select_offsets_and_timestamps() {
    let broker = EmbeddedBroker::start(1, &[("ranged", 2)]).unwrap();
    let brokers = broker.bootstrap_servers();
    // Partition 0: a0..a5 at T0 + i s; partition 1: b0..b3 at T0 + i s + 0.5 s.
    let mut records = Vec::new();
    for i in 0..6 {
        records.push((
            0,
            T0 + i * 1000,
            encode_labelled_framed(SCHEMA_ID, &tiny(&format!("a{i}"), i as u8)),
        ));
    }
    for i in 0..4 {
        records.push((
            1,
            T0 + i * 1000 + 500,
            encode_labelled_framed(SCHEMA_ID, &tiny(&format!("b{i}"), 100 + i as u8)),
        ));
    }
    produce(brokers, "ranged", &records);

    let mut o = options(&broker, "ranged");
    let snapshot = take_snapshot(&o).unwrap();
    // Produced after the snapshot was taken: must not be read from it.
    produce(
        brokers,
        "ranged",
        &[
            (0, T0 + 100_000, encode_labelled_framed(SCHEMA_ID, &tiny("late-a", 50))),
            (1, T0 + 100_500, encode_labelled_framed(SCHEMA_ID, &tiny("late-b", 60))),
        ],
    );
    let bounded = replay_snapshot(&o, &snapshot).unwrap();
    assert_eq!(
        products(&bounded.examples),
        ["a0", "a1", "a2", "a3", "a4", "a5", "b0", "b1", "b2", "b3"]
    );
    let pixels = match &tiny("x", 3).image {
        ImageSource::Inline(png) => image::load_from_memory(png).unwrap().to_rgb8(),
        ImageSource::Uri(_) => unreachable!(),
    };
    assert!(bounded.examples[3].image == pixels, "a3's pixels");
    assert_eq!(bounded.examples[3].timestamp_ms, Some(T0 + 3000));
    // A new snapshot does see them (so the check above can fail).
    assert_eq!(replay(&o).unwrap().examples.len(), 12);

    let select = |o: &mut ReplayOptions, ranges: &[&str]| {
        o.ranges = ReplayRanges::parse(ranges).unwrap();
        let r = replay(o).unwrap();
        assert!(r.report.skipped.is_empty());
        products(&r.examples)
    };
    assert_eq!(select(&mut o, &["0:1..4"]), ["a1", "a2", "a3"]);
    assert_eq!(select(&mut o, &["0:5..end", "1:beginning..1"]), ["a5", "late-a", "b0"]);
    // [T0 + 2 s, T0 + 4 s): by the records' timestamps, in every partition.
    assert_eq!(
        select(&mut o, &[&format!("@{}..@{}", T0 + 2000, T0 + 4000)]),
        ["a2", "a3", "b2", "b3"]
    );
    assert_eq!(
        select(&mut o, &[&format!("@{}..end", T0 + 100_000)]),
        ["late-a", "late-b"]
    );
    assert_eq!(select(&mut o, &[&format!("1:..@{}", T0 + 1600)]), ["b0", "b1"]);
    assert_eq!(select(&mut o, &[&format!("0:@{}..3", T0 + 1000)]), ["a1", "a2"]);
    let err = ReplayRanges::parse(&["7:0..1"]).map(|r| {
        o.ranges = r;
        take_snapshot(&o)
    });
    let message = format!("{:#}", err.unwrap().unwrap_err());
    assert!(message.contains("partition 7 is not in topic ranged"), "{message}");
}

#[test]
fn malformed_records_are_reported_and_the_rest_replayed() {
    let broker = EmbeddedBroker::start(1, &[("messy", 1)]).unwrap();
    let files = tempfile::tempdir().unwrap();
    let framed = |r: &LabelledImage| encode_labelled_framed(SCHEMA_ID, r);
    let mut inverted = tiny("inverted", 1);
    inverted.annotations[0].x2 = -1.0;
    let missing = LabelledImage {
        image: ImageSource::Uri(format!("file://{}/gone.png", files.path().display())),
        ..tiny("missing", 2)
    };
    let corrupt = LabelledImage {
        image: ImageSource::Inline(b"certainly not an image".to_vec()),
        ..tiny("corrupt", 3)
    };
    let wrong_size = LabelledImage {
        width: Some(40),
        ..tiny("wrong-size", 4)
    };
    let good = framed(&tiny("good-0", 5));
    let truncated = good[..good.len() - 10].to_vec();
    let values = vec![
        good.clone(),
        b"{\"product_id\": \"json\"}".to_vec(),
        truncated,
        framed(&inverted),
        framed(&missing),
        framed(&corrupt),
        framed(&wrong_size),
        framed(&tiny("good-1", 6)),
    ];
    let records: Vec<_> = values.into_iter().map(|v| (0, T0, v)).collect();
    produce(broker.bootstrap_servers(), "messy", &records);

    let mut o = options(&broker, "messy");
    o.fetch.file_root = Some(files.path().to_path_buf());
    let r = replay(&o).unwrap();
    assert_eq!(products(&r.examples), ["good-0", "good-1"]);
    let skipped: Vec<(i64, &str)> = r.report.skipped.iter().map(|s| (s.offset, s.kind.as_str())).collect();
    assert_eq!(
        skipped,
        [
            (1, error_kinds::BAD_FRAMING),
            (2, error_kinds::BAD_AVRO),
            (3, error_kinds::INVALID_EVENT),
            (4, error_kinds::MISSING_IMAGE),
            (5, error_kinds::UNKNOWN_FORMAT),
            (6, error_kinds::INVALID_EVENT),
        ]
    );
    assert!(
        r.report.skipped[2].reason.contains("x1 <= x2"),
        "{:?}",
        r.report.skipped[2]
    );
    assert!(
        r.report.skipped[5].reason.contains("declares 40x3"),
        "{:?}",
        r.report.skipped[5]
    );
    assert_eq!(r.report.records, 8);
}
