//! The serve pipeline against a real Kafka protocol (librdkafka's in-process mock cluster),
//! with a fake model so the tests are about streaming: every event gives exactly one output
//! or dead letter with the right reason, offsets are committed only for finished work, a
//! restart resumes with nothing lost, two instances split the partitions, and backpressure
//! pauses the consumer without losing anything.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use attrstream::config::Config;
use attrstream::embedded_broker::EmbeddedBroker;
use attrstream::events::codec::{
    dead_letter_schema, decode_attributes, decode_dead_letter, encode_event, product_attributes_schema,
};
use attrstream::events::wire::{frame, unframe};
use attrstream::events::{DeadLetter, ImageSource, ProductAttributes, ProductImageEvent};
use attrstream::pipeline::{Inference, ModelUpdate};
use common::kafka::*;
use common::pipeline::{test_config, Running, DLQ, IN, OUT};

fn config(brokers: &str, group: &str) -> Config {
    let mut c = test_config(brokers, group);
    c.fetch.timeout = Duration::from_millis(300);
    c.fetch.retries = 0;
    c.validate().unwrap();
    c
}

fn event(id: &str, image: ImageSource) -> ProductImageEvent {
    ProductImageEvent {
        event_id: format!("evt-{id}"),
        product_id: id.to_string(),
        image,
        content_type: None,
        metadata: BTreeMap::from([("case".to_string(), id.to_string())]),
        event_time_ms: Some(1_700_000_000_000),
    }
}

fn framed(e: &ProductImageEvent) -> Vec<u8> {
    frame(1, &encode_event(e))
}

/// Keyed, framed events with small distinct inline PNGs, product ids `{prefix}{i}`.
fn inline_events(prefix: &str, range: std::ops::Range<usize>) -> Vec<(Vec<u8>, Vec<u8>)> {
    range
        .map(|i| {
            let colour = [(i % 256) as u8, (i / 256) as u8, 7];
            let e = event(&format!("{prefix}{i}"), ImageSource::Inline(png(10, 10, colour)));
            (e.product_id.clone().into_bytes(), framed(&e))
        })
        .collect()
}

/// Number of distinct event ids among output records.
fn distinct_events(records: &[ReadRecord]) -> usize {
    let (outputs, _) = collect(records);
    outputs.iter().map(|o| o.event_id.clone()).collect::<HashSet<_>>().len()
}

/// Outputs by key and dead letters by key, decoded.
fn collect(records: &[ReadRecord]) -> (Vec<ProductAttributes>, HashMap<String, DeadLetter>) {
    let mut outputs = Vec::new();
    let mut dead = HashMap::new();
    for r in records {
        let (id, body) = unframe(&r.value).expect("framed output");
        if r.topic == OUT {
            assert_eq!(id, 2, "output schema id");
            outputs.push(decode_attributes(body, product_attributes_schema()).expect("decodes"));
        } else {
            assert_eq!(id, 3, "dead-letter schema id");
            let letter = decode_dead_letter(body, dead_letter_schema()).expect("decodes");
            let key = String::from_utf8(r.key.clone().unwrap_or_default()).unwrap();
            assert!(dead.insert(key, letter).is_none(), "one dead letter per input");
        }
    }
    (outputs, dead)
}

fn assert_all_committed(brokers: &str, group: &str, partitions: i32) {
    let committed = committed_offsets(brokers, group, IN, partitions);
    let ends = end_offsets(brokers, IN, partitions);
    assert_eq!(committed, ends, "committed offsets reach the end of every partition");
}

#[test]
fn every_event_gives_one_output_or_a_dead_letter_with_its_reason() {
    let broker = EmbeddedBroker::start(1, &[(IN, 3), (OUT, 2), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shoe.png"), png(40, 30, [10, 20, 200])).unwrap();
    let file_uri = |name: &str| format!("file://{}", dir.path().join(name).display());
    let rocket = std::fs::read(common::root().join("assets/samples/rocket.jpg")).unwrap();
    let mut corrupt_jpeg = rocket.clone();
    corrupt_jpeg.iter_mut().skip(600).take(4000).for_each(|b| *b = 0x5a);
    corrupt_jpeg.truncate(corrupt_jpeg.len() / 2);

    let mut good: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            let e = event(
                &format!("good-{i}"),
                ImageSource::Inline(png(20 + i, 16, [200, (i * 20) as u8, 30])),
            );
            (e.product_id.clone(), framed(&e))
        })
        .collect();
    let from_file = event("good-file", ImageSource::Uri(file_uri("shoe.png")));
    good.push((from_file.product_id.clone(), framed(&from_file)));

    let valid_body = encode_event(&event("x", ImageSource::Inline(png(8, 8, [1, 2, 3]))));
    let mut bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-framing", b"definitely not avro".to_vec(), "bad_framing"),
        ("bad-avro", frame(1, &[0x01]), "bad_avro"),
        ("unknown-schema", frame(99, &valid_body), "unknown_schema"),
        (
            "empty-image",
            framed(&event("empty-image", ImageSource::Inline(vec![]))),
            "empty_image",
        ),
        (
            "corrupt-jpeg",
            framed(&event("corrupt-jpeg", ImageSource::Inline(corrupt_jpeg))),
            "corrupt_image",
        ),
        (
            "bomb",
            framed(&event("bomb", ImageSource::Inline(png_header_only(50_000, 50_000)))),
            "image_too_large",
        ),
        (
            "missing-file",
            framed(&event("missing-file", ImageSource::Uri(file_uri("nope.png")))),
            "missing_image",
        ),
        (
            "loopback-url",
            framed(&event(
                "loopback-url",
                ImageSource::Uri("http://127.0.0.1:9/a.png".into()),
            )),
            "blocked_address",
        ),
        (
            "metadata-url",
            framed(&event(
                "metadata-url",
                ImageSource::Uri("http://169.254.169.254/latest/".into()),
            )),
            "blocked_address",
        ),
        (
            "ftp-url",
            framed(&event("ftp-url", ImageSource::Uri("ftp://example.com/a.png".into()))),
            "unsupported_uri",
        ),
        (
            "model-crash",
            framed(&event("model-crash", ImageSource::Inline(png(16, 16, POISON_RGB)))),
            "inference_failed",
        ),
    ];
    let mut empty_id = event("empty-id", ImageSource::Inline(png(8, 8, [1, 2, 3])));
    empty_id.event_id.clear();
    bad.push(("empty-id", framed(&empty_id), "invalid_event"));

    // Interleave good and bad so poison sits between good messages of the same partition.
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for i in 0..good.len().max(bad.len()) {
        if let Some((k, v)) = good.get(i) {
            records.push((k.clone().into_bytes(), v.clone()));
        }
        if let Some((k, v, _)) = bad.get(i) {
            records.push((k.as_bytes().to_vec(), v.clone()));
        }
    }
    produce_raw(&brokers, IN, &records);

    let mut cfg = config(&brokers, "g-poison");
    cfg.fetch.file_root = Some(dir.path().to_path_buf());
    let running = Running::start(cfg, fake_inference(2, Duration::from_millis(5)));
    let read = read_topics(&brokers, &[OUT, DLQ], records.len(), Duration::from_secs(60));
    let report = running.stop();

    assert_eq!(read.len(), records.len(), "one record per event");
    let (outputs, dead) = collect(&read);
    let mut got: Vec<&str> = outputs.iter().map(|o| o.product_id.as_str()).collect();
    got.sort_unstable();
    let mut want: Vec<&str> = good.iter().map(|(k, _)| k.as_str()).collect();
    want.sort_unstable();
    assert_eq!(got, want);
    for o in &outputs {
        assert_eq!(o.event_id, format!("evt-{}", o.product_id), "event id carried through");
        assert_eq!(o.model.name, "fake");
        assert_eq!(o.metadata.get("case"), Some(&o.product_id));
        assert_eq!(o.detections.len(), 1);
        assert_eq!(o.attributes.labels[0].label, "thing");
        assert!(o.timings.total_ms > 0.0);
    }
    let shoe = outputs.iter().find(|o| o.product_id == "good-file").unwrap();
    assert_eq!((shoe.image_width, shoe.image_height), (40, 30));
    for (key, _, kind) in &bad {
        let letter = dead.get(*key).unwrap_or_else(|| panic!("no dead letter for {key}"));
        assert_eq!(letter.error_kind, *kind, "{key}: {}", letter.error_message);
        assert!(!letter.error_message.is_empty());
        assert_eq!(letter.source_topic, IN);
        let original = records.iter().find(|(k, _)| k == key.as_bytes()).unwrap();
        assert_eq!(letter.original_value, original.1, "{key}: original bytes kept");
        assert_eq!(letter.original_key.as_deref(), Some(key.as_bytes()));
    }
    assert_eq!(report.produced as usize, good.len());
    assert_eq!(report.dead_lettered.values().sum::<u64>() as usize, bad.len());
    assert_all_committed(&brokers, "g-poison", 3);
}

#[test]
fn restart_resumes_from_committed_offsets_without_loss_or_duplicates() {
    let broker = EmbeddedBroker::start(1, &[(IN, 4), (OUT, 2), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let batch = |from: usize, to: usize| inline_events("p", from..to);
    produce_raw(&brokers, IN, &batch(0, 40));
    let mut slow = config(&brokers, "g-restart");
    slow.batch.max_batch_size = 1;
    slow.pipeline.max_in_flight = 4;
    let first = Running::start(slow, fake_inference(1, Duration::from_millis(100)));
    // Stop mid-stream, once some records are out.
    let partial = read_topics(&brokers, &[OUT], 10, Duration::from_secs(60));
    assert!(partial.len() >= 10);
    let report1 = first.stop();
    assert!(
        report1.produced >= 10 && (report1.produced as usize) < 40,
        "stopped mid-stream: {report1:?}"
    );
    assert_eq!(report1.abandoned, 0, "graceful stop drains everything it took");

    produce_raw(&brokers, IN, &batch(40, 60));
    let second = Running::start(
        config(&brokers, "g-restart"),
        fake_inference(2, Duration::from_millis(1)),
    );
    let all = read_topics(&brokers, &[OUT], 60, Duration::from_secs(60));
    let report2 = second.stop();
    // Read once more to see duplicates, if any arrived late.
    let all = if all.len() == 60 {
        read_topics(&brokers, &[OUT], 1000, Duration::from_secs(2))
    } else {
        all
    };
    let (outputs, _) = collect(&all);
    let ids: Vec<String> = outputs.iter().map(|o| o.event_id.clone()).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 60, "every event processed");
    assert_eq!(ids.len(), 60, "no duplicates after a graceful restart");
    assert_eq!(
        report1.consumed + report2.consumed,
        60,
        "the second run started where the first committed"
    );
    assert_all_committed(&brokers, "g-restart", 4);
}

#[test]
fn two_instances_in_one_group_split_the_partitions() {
    let broker = EmbeddedBroker::start(1, &[(IN, 4), (OUT, 2), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let a = Running::start(
        config(&brokers, "g-split"),
        fake_inference(1, Duration::from_millis(20)),
    );
    let b = Running::start(
        config(&brokers, "g-split"),
        fake_inference(1, Duration::from_millis(20)),
    );
    // Let both join before the data arrives, so the split is visible.
    std::thread::sleep(Duration::from_secs(4));
    let records = inline_events("s", 0..80);
    produce_raw(&brokers, IN, &records);
    // Wait for every event's output. A rebalance while they work (e.g. the second member's join
    // arriving late on a loaded machine) may legitimately repeat a few (at-least-once), so
    // read until all 80 distinct events are there rather than exactly 80 records.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut read = read_topics(&brokers, &[OUT], 80, Duration::from_secs(60));
    while distinct_events(&read) < 80 && Instant::now() < deadline {
        read = read_topics(&brokers, &[OUT], read.len() + 1, Duration::from_secs(5));
    }
    let (ra, rb) = (a.stop(), b.stop());
    let (outputs, _) = collect(&read);
    let unique: HashSet<&str> = outputs.iter().map(|o| o.event_id.as_str()).collect();
    assert_eq!(unique.len(), 80, "together they processed every event");
    if read.len() > 80 {
        eprintln!(
            "{} events were processed twice after a rebalance (at-least-once)",
            read.len() - 80
        );
    }
    assert!(
        ra.consumed > 0 && rb.consumed > 0,
        "both instances got partitions: {ra:?} {rb:?}"
    );
    assert_all_committed(&brokers, "g-split", 4);
}

#[test]
fn overload_holds_the_in_flight_limit_and_loses_nothing() {
    let broker = EmbeddedBroker::start(1, &[(IN, 2), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let records = inline_events("o", 0..60);
    produce_raw(&brokers, IN, &records);
    let mut cfg = config(&brokers, "g-overload");
    cfg.pipeline.max_in_flight = 6;
    cfg.batch.max_batch_size = 2;
    let running = Running::start(cfg, fake_inference(1, Duration::from_millis(20)));
    let started = Instant::now();
    let read = read_topics(&brokers, &[OUT], 60, Duration::from_secs(60));
    let report = running.stop();
    assert_eq!(read.len(), 60, "all processed after {:?}", started.elapsed());
    assert!(report.peak_in_flight <= 6, "in-flight limit held: {report:?}");
    assert!(report.batches.mean_batch_size() <= 2.0);
    assert_all_committed(&brokers, "g-overload", 2);
}

#[test]
fn a_long_stall_pauses_the_partitions_and_loses_nothing() {
    let broker = EmbeddedBroker::start(1, &[(IN, 2), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let records = inline_events("l", 0..6);
    produce_raw(&brokers, IN, &records);
    let mut cfg = config(&brokers, "g-stall");
    cfg.pipeline.max_in_flight = 2;
    cfg.batch.max_batch_size = 2;
    // Each batch takes longer than the consumer waits before pausing.
    let running = Running::start(cfg, fake_inference(1, Duration::from_millis(1500)));
    let read = read_topics(&brokers, &[OUT], 6, Duration::from_secs(60));
    let report = running.stop();
    assert_eq!(read.len(), 6);
    assert!(
        report.pauses > 0,
        "the consumer paused during the long stall: {report:?}"
    );
    assert!(report.peak_in_flight <= 2, "{report:?}");
    assert_all_committed(&brokers, "g-stall", 2);
}

#[test]
fn a_model_swap_under_load_loses_no_event_and_records_name_the_version() {
    let broker = EmbeddedBroker::start(1, &[(IN, 2), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    produce_raw(&brokers, IN, &inline_events("before", 0..300));
    let mut cfg = config(&brokers, "g-swap");
    cfg.batch.max_batch_size = 4;
    let mut inference = Inference::new(2, fake_factory(Duration::from_millis(30), "1"));
    let (updates, updates_rx) = tokio::sync::mpsc::channel(1);
    inference.updates = Some(updates_rx);
    let running = Running::start(cfg, inference);
    // Swap while the backlog is being worked through.
    let early = read_topics(&brokers, &[OUT], 40, Duration::from_secs(60));
    assert_eq!(early.len(), 40);
    updates
        .blocking_send(ModelUpdate {
            factory: fake_factory(Duration::from_millis(30), "2"),
            description: "version 2".into(),
        })
        .unwrap();
    let during = read_topics(&brokers, &[OUT], 300, Duration::from_secs(60));
    assert_eq!(during.len(), 300);
    // Events that arrive after the swap are served by the new model only.
    produce_raw(&brokers, IN, &inline_events("after", 0..20));
    let read = read_topics(&brokers, &[OUT, DLQ], 320, Duration::from_secs(60));
    let report = running.stop();
    let (outputs, dead) = collect(&read);
    assert!(dead.is_empty(), "nothing failed during the swap: {dead:?}");
    let ids: HashSet<&str> = outputs.iter().map(|o| o.event_id.as_str()).collect();
    assert_eq!(ids.len(), 320, "every event exactly one output");
    let versions = |prefix: &str| -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for o in outputs.iter().filter(|o| o.product_id.starts_with(prefix)) {
            *counts.entry(o.model.version.clone()).or_insert(0) += 1;
        }
        counts
    };
    let before = versions("before");
    assert!(
        before.get("1").copied().unwrap_or(0) >= 40 && before.get("2").copied().unwrap_or(0) > 0,
        "the swap happened mid-stream: {before:?}"
    );
    assert_eq!(versions("after"), BTreeMap::from([("2".to_string(), 20)]));
    assert_eq!(report.produced, 320);
    assert_all_committed(&brokers, "g-swap", 2);
}

#[test]
fn shutdown_with_nothing_to_do_is_prompt() {
    let broker = EmbeddedBroker::start(1, &[(IN, 1), (OUT, 1), (DLQ, 1)]).unwrap();
    let running = Running::start(
        config(broker.bootstrap_servers(), "g-idle"),
        fake_inference(1, Duration::ZERO),
    );
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let report = running.stop();
    assert_eq!(report.consumed, 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// A local HTTP server: /ok.png (a photo), /missing (404), /slow (answers after 3 s).
fn image_server() -> (String, std::thread::JoinHandle<()>) {
    use axum::routing::get;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new()
                .route("/ok.png", get(|| async { png(24, 18, [0, 128, 0]) }))
                .route(
                    "/slow",
                    get(|| async {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        png(8, 8, [0, 0, 0])
                    }),
                );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (url, handle)
}

#[test]
fn http_images_are_fetched_and_404_and_timeouts_are_dead_lettered() {
    let (url, _server) = image_server();
    let broker = EmbeddedBroker::start(1, &[(IN, 1), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let cases = [
        ("http-ok", format!("{url}/ok.png")),
        ("http-404", format!("{url}/missing")),
        ("http-timeout", format!("{url}/slow")),
        ("http-after", format!("{url}/ok.png")),
    ];
    let records: Vec<(Vec<u8>, Vec<u8>)> = cases
        .iter()
        .map(|(id, uri)| {
            (
                id.as_bytes().to_vec(),
                framed(&event(id, ImageSource::Uri(uri.clone()))),
            )
        })
        .collect();
    produce_raw(&brokers, IN, &records);
    let mut cfg = config(&brokers, "g-http");
    cfg.fetch.allow_private_addresses = true; // the test server is on loopback
    let running = Running::start(cfg, fake_inference(1, Duration::ZERO));
    let read = read_topics(&brokers, &[OUT, DLQ], records.len(), Duration::from_secs(30));
    running.stop();
    let (outputs, dead) = collect(&read);
    let mut ok: Vec<&str> = outputs.iter().map(|o| o.product_id.as_str()).collect();
    ok.sort_unstable();
    assert_eq!(ok, vec!["http-after", "http-ok"]);
    assert!(outputs.iter().all(|o| (o.image_width, o.image_height) == (24, 18)));
    assert_eq!(
        dead["http-404"].error_kind, "missing_image",
        "{}",
        dead["http-404"].error_message
    );
    assert_eq!(
        dead["http-timeout"].error_kind, "fetch_timeout",
        "{}",
        dead["http-timeout"].error_message
    );
    assert_all_committed(&brokers, "g-http", 1);
}

#[test]
fn schema_ids_come_from_the_registry_and_output_schemas_are_registered() {
    use attrstream::events::codec::{
        dead_letter_schema_json, product_attributes_schema_json, product_image_event_schema_json,
    };
    let registry = common::registry::TestRegistry::start();
    let input_id = registry.insert_schema(product_image_event_schema_json(), None);
    let broker = EmbeddedBroker::start(1, &[(IN, 1), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let good = event("reg-good", ImageSource::Inline(png(9, 9, [5, 5, 5])));
    let records = vec![
        (b"reg-good".to_vec(), frame(input_id, &encode_event(&good))),
        (b"reg-unknown".to_vec(), frame(input_id + 1000, &encode_event(&good))),
    ];
    produce_raw(&brokers, IN, &records);
    let mut cfg = config(&brokers, "g-registry");
    cfg.schemas.registry_url = Some(registry.url.clone());
    cfg.schemas.input_schema_id = None;
    cfg.schemas.output_schema_id = None;
    cfg.schemas.dead_letter_schema_id = None;
    cfg.validate().unwrap();
    let running = Running::start(cfg, fake_inference(1, Duration::ZERO));
    let read = read_topics(&brokers, &[OUT, DLQ], 2, Duration::from_secs(30));
    running.stop();
    assert_eq!(read.len(), 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client =
        attrstream::events::registry::SchemaRegistry::new(&registry.url, None, Duration::from_secs(5)).unwrap();
    let out_id = rt
        .block_on(client.lookup(&format!("{OUT}-value"), product_attributes_schema_json()))
        .unwrap()
        .expect("output schema registered under <topic>-value");
    let dlq_id = rt
        .block_on(client.lookup(&format!("{DLQ}-value"), dead_letter_schema_json()))
        .unwrap()
        .expect("dead-letter schema registered");
    for r in &read {
        let (id, body) = unframe(&r.value).unwrap();
        if r.topic == OUT {
            assert_eq!(id, out_id);
            let record = decode_attributes(body, product_attributes_schema()).unwrap();
            assert_eq!(record.event_id, "evt-reg-good");
        } else {
            assert_eq!(id, dlq_id);
            let letter = decode_dead_letter(body, dead_letter_schema()).unwrap();
            assert_eq!(letter.error_kind, "unknown_schema", "{}", letter.error_message);
        }
    }
}

#[test]
fn raw_avro_input_with_a_configured_writer_schema() {
    let broker = EmbeddedBroker::start(1, &[(IN, 1), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let e = event("raw-1", ImageSource::Inline(png(7, 5, [9, 9, 9])));
    produce_raw(&brokers, IN, &[(b"raw-1".to_vec(), encode_event(&e))]);
    let mut cfg = config(&brokers, "g-raw");
    cfg.schemas.input_format = attrstream::config::InputFormat::Raw;
    cfg.schemas.input_schema_id = None;
    cfg.validate().unwrap();
    let running = Running::start(cfg, fake_inference(1, Duration::ZERO));
    let read = read_topics(&brokers, &[OUT, DLQ], 1, Duration::from_secs(30));
    running.stop();
    let (outputs, dead) = collect(&read);
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(outputs[0].event_id, "evt-raw-1");
    assert_eq!((outputs[0].image_width, outputs[0].image_height), (7, 5));
}
