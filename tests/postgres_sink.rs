//! The PostgreSQL sink against a real PostgreSQL server (a throwaway cluster per test, see
//! tests/common/postgres.rs) and, for the pipeline tests, librdkafka's mock Kafka cluster with
//! the fake model of tests/pipeline_kafka.rs:
//! - every event's product has its row, one per product, holding the newest event;
//! - replaying the topic (new group, from offset 0) leaves the rows byte-for-byte identical;
//!   the same events through a new model version refresh them;
//! - an older event never overwrites a newer one (the upsert rule, directly);
//! - the database refusing writes, or stopped: retries, then `database_write_failed` dead
//!   letters, no event lost, offsets advance, the stream continues once it is back;
//! - offsets do not move while the database write is blocked (table lock), and do after;
//! - migrations: two replicas starting at once apply them once; an edited migration and a
//!   missing table without `run_migrations` are refused; a row PostgreSQL rejects fails alone.
//! - TLS (a cluster taking TCP clients over TLS only, certificates made at test time): with
//!   `sslmode=verify-full` and the CA as `sslrootcert` the pipeline writes rows on encrypted
//!   sessions; plain text, an untrusted CA, a certificate for another host, or `require`
//!   against a server without TLS fail at once with what to fix.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use attrstream::config::Config;
use attrstream::embedded_broker::EmbeddedBroker;
use attrstream::events::codec::{dead_letter_schema, decode_dead_letter, encode_event};
use attrstream::events::wire::{frame, unframe};
use attrstream::events::{
    AggregatedAttributes, DeadLetter, ImageSource, LabelSummary, ModelRef, ProductAttributes, ProductImageEvent,
    StageTimings,
};
use attrstream::pipeline::Inference;
use attrstream::sink::postgres::migrate::{checksum, MIGRATIONS};
use attrstream::sink::postgres::{DatabaseConfig, PostgresSink, Written};
use attrstream::telemetry::Telemetry;
use common::kafka::*;
use common::pipeline::{test_config, Running, DLQ, IN, OUT};
use common::postgres::{wait_until, TestCa, TestPostgres, WRITER_PASSWORD};

/// The sink's settings for database `db` of `pg`, connecting as the writer role with its
/// password given apart from the URL (as from a Kubernetes Secret).
fn database(pg: &TestPostgres, db: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: Some(pg.writer_url(db)),
        password: Some(WRITER_PASSWORD.into()),
        max_wait: Duration::from_millis(5),
        retries: 2,
        ..Default::default()
    }
}

fn config(brokers: &str, group: &str, database: DatabaseConfig) -> Config {
    let mut c = test_config(brokers, group);
    c.database = database;
    c.validate().unwrap();
    c
}

/// A keyed, framed event for `product` with a small inline PNG.
fn event(product: &str, event_id: &str, time_ms: Option<i64>) -> (Vec<u8>, Vec<u8>) {
    let e = ProductImageEvent {
        event_id: event_id.to_string(),
        product_id: product.to_string(),
        image: ImageSource::Inline(png(12, 10, [200, 30, 30])),
        content_type: None,
        metadata: BTreeMap::from([("event".to_string(), event_id.to_string())]),
        event_time_ms: time_ms,
    };
    (product.as_bytes().to_vec(), frame(1, &encode_event(&e)))
}

/// The group's committed offset per input partition; a partition with nothing committed yet
/// counts as 0 (as an empty partition's end is 0).
/// `count` events for products `{prefix}0`, `{prefix}1`, … with event ids `{prefix}N-a`, all at `time_ms`.
fn events(prefix: &str, count: usize, time_ms: i64) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..count)
        .map(|i| event(&format!("{prefix}{i}"), &format!("{prefix}{i}-a"), Some(time_ms)))
        .collect()
}

fn committed(brokers: &str, group: &str, partitions: i32) -> HashMap<i32, i64> {
    committed_offsets(brokers, group, IN, partitions)
        .into_iter()
        .map(|(p, o)| (p, o.max(0)))
        .collect()
}

/// Waits until the group's committed offsets reach the end of every input partition.
fn wait_all_committed(brokers: &str, group: &str, partitions: i32) {
    let ends = end_offsets(brokers, IN, partitions);
    let mut now = HashMap::new();
    let done = wait_until(Duration::from_secs(60), || {
        now = committed(brokers, group, partitions);
        now == ends
    });
    assert!(done, "committed offsets {now:?} never reached the ends {ends:?}");
}

/// Every row as JSON text, by product: the whole row, `updated_at` included.
fn snapshot(pg: &TestPostgres, db: &str) -> BTreeMap<String, String> {
    pg.admin(db)
        .query("SELECT product_id, row_to_json(t)::text FROM product_attributes t ORDER BY product_id")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn row_count(pg: &TestPostgres, db: &str, filter: &str) -> i64 {
    pg.admin(db)
        .scalar(&format!("SELECT count(*) FROM product_attributes WHERE {filter}"))
}

/// Dead letters among `records`, decoded.
fn dead_letters(records: &[ReadRecord]) -> Vec<DeadLetter> {
    records
        .iter()
        .filter(|r| r.topic == DLQ)
        .map(|r| {
            let (_, body) = unframe(&r.value).expect("framed");
            decode_dead_letter(body, dead_letter_schema()).expect("decodes")
        })
        .collect()
}

#[test]
fn every_product_gets_one_row_with_its_newest_event_and_redelivery_changes_nothing() {
    let pg = TestPostgres::start();
    pg.create_database("stream");
    let broker = EmbeddedBroker::start(1, &[(IN, 3), (OUT, 2), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let t0 = 1_700_000_000_000i64;
    let mut records = Vec::new();
    for i in 0..12 {
        records.push(event(&format!("p{i}"), &format!("p{i}-a"), Some(t0 + i)));
    }
    // Later events for some products; for p5 the newer one comes first and the older after it.
    for i in 0..4 {
        records.push(event(&format!("p{i}"), &format!("p{i}-b"), Some(t0 + 1000 + i)));
    }
    records.push(event("p5", "p5-new", Some(t0 + 5000)));
    records.push(event("p5", "p5-old", Some(t0 + 10)));
    // The same time: the larger event id wins whatever the order; no time loses to any time.
    records.push(event("p6", "p6-z", Some(t0 + 6000)));
    records.push(event("p6", "p6-m", Some(t0 + 6000)));
    records.push(event("p7", "p7-none", None));
    produce_raw(&brokers, IN, &records);
    let mut expected: BTreeMap<String, String> = (0..12).map(|i| (format!("p{i}"), format!("p{i}-a"))).collect();
    for i in 0..4 {
        expected.insert(format!("p{i}"), format!("p{i}-b"));
    }
    expected.insert("p5".into(), "p5-new".into());
    expected.insert("p6".into(), "p6-z".into());
    // p7 keeps p7-a: "p7-none" has no event time.

    let running = Running::start(
        config(&brokers, "g-first", database(&pg, "stream")),
        fake_inference(2, Duration::from_millis(5)),
    );
    wait_all_committed(&brokers, "g-first", 3);
    let first = running.stop();
    assert_eq!(first.consumed as usize, records.len());
    assert_eq!(
        first.produced as usize,
        records.len(),
        "every event has its output record"
    );
    assert!(first.dead_lettered.is_empty(), "{:?}", first.dead_lettered);
    assert_eq!(first.database.ok as usize, records.len(), "{:?}", first.database);
    assert_eq!(first.database.failed, 0);

    let admin = pg.admin("stream");
    let rows = admin.query(
        "SELECT product_id, event_id, model_name, model_version, attributes -> 'labels' -> 0 ->> 'label', \
         jsonb_array_length(detections), metadata ->> 'event', image_width, image_height, \
         event_time IS NULL FROM product_attributes ORDER BY product_id",
    );
    assert_eq!(rows.len(), 12, "one row per distinct product");
    for r in &rows {
        let product: String = r.get(0);
        let event_id: String = r.get(1);
        assert_eq!(event_id, expected[&product], "{product} holds its newest event");
        assert_eq!(
            (r.get::<_, String>(2), r.get::<_, String>(3)),
            ("fake".into(), "1".into())
        );
        assert_eq!(r.get::<_, String>(4), "thing", "{product}: labels as JSONB");
        assert_eq!(r.get::<_, i32>(5), 1, "{product}: detections as JSONB");
        assert_eq!(
            r.get::<_, String>(6),
            event_id,
            "{product}: the winning event's metadata"
        );
        assert_eq!((r.get::<_, i32>(7), r.get::<_, i32>(8)), (12, 10));
        assert!(!r.get::<_, bool>(9));
    }
    let before = snapshot(&pg, "stream");

    // Redelivery: the whole topic again from offset 0 (a new group), same model.
    let running = Running::start(
        config(&brokers, "g-replay", database(&pg, "stream")),
        fake_inference(2, Duration::from_millis(5)),
    );
    wait_all_committed(&brokers, "g-replay", 3);
    let replay = running.stop();
    assert_eq!(replay.database.ok as usize, records.len());
    assert_eq!(
        snapshot(&pg, "stream"),
        before,
        "a redelivered stream leaves every row as it was, updated_at included"
    );

    // The same events through a new model version refresh the rows (and keep the winners).
    let running = Running::start(
        config(&brokers, "g-model-2", database(&pg, "stream")),
        Inference::new(1, fake_factory(Duration::from_millis(5), "2")),
    );
    wait_all_committed(&brokers, "g-model-2", 3);
    running.stop();
    assert_eq!(row_count(&pg, "stream", "model_version = '2'"), 12);
    let after: BTreeMap<String, String> = admin
        .query("SELECT product_id, event_id FROM product_attributes")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(after, expected);
}

fn record(product: &str, event_id: &str, time_ms: Option<i64>, version: &str, label: &str) -> ProductAttributes {
    ProductAttributes {
        event_id: event_id.into(),
        product_id: product.into(),
        model: ModelRef {
            name: "m".into(),
            version: version.into(),
        },
        image_width: 100,
        image_height: 80,
        detections: vec![],
        attributes: AggregatedAttributes {
            labels: vec![LabelSummary {
                label: label.into(),
                max_score: 0.75,
                count: 1,
            }],
            ..Default::default()
        },
        timings: StageTimings::default(),
        event_time_ms: time_ms,
        processed_time_ms: 1_700_000_000_000,
        metadata: BTreeMap::new(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_older_event_never_overwrites_a_newer_one() {
    let pg = TestPostgres::start();
    pg.create_database("rule");
    let rt = runtime();
    let sink = rt.block_on(PostgresSink::start(&database(&pg, "rule"))).unwrap();
    let admin = pg.admin("rule");
    let upsert = |r: ProductAttributes| assert_eq!(rt.block_on(sink.upsert(&r)), Ok(Written::FirstAttempt));
    let state = |product: &str| -> (String, String, String, String) {
        let rows = admin.query(&format!(
            "SELECT event_id, model_version, attributes -> 'labels' -> 0 ->> 'label', updated_at::text \
             FROM product_attributes WHERE product_id = '{product}'"
        ));
        assert_eq!(rows.len(), 1, "{product}");
        (rows[0].get(0), rows[0].get(1), rows[0].get(2), rows[0].get(3))
    };

    upsert(record("p", "e2", Some(2_000), "1", "cup"));
    let newest = state("p");
    upsert(record("p", "e1", Some(1_000), "1", "older"));
    assert_eq!(state("p"), newest, "an older event is acknowledged but changes nothing");
    upsert(record("p", "e2", Some(2_000), "1", "cup"));
    assert_eq!(state("p"), newest, "a redelivery changes nothing, not even updated_at");
    upsert(record("p", "e2", Some(2_000), "2", "cup"));
    assert_eq!(
        state("p").1,
        "2",
        "the same event through another model refreshes the row"
    );
    upsert(record("p", "e3", Some(2_000), "2", "bowl"));
    assert_eq!(state("p").0, "e3", "same time: the larger event id wins");
    upsert(record("p", "e0", Some(2_000), "2", "plate"));
    assert_eq!(state("p").0, "e3", "same time, smaller id: ignored");
    upsert(record("p", "E9", Some(2_000), "2", "plate"));
    assert_eq!(
        state("p").0,
        "e3",
        "ids compare bytewise ('E' < 'e'), whatever the collation"
    );

    upsert(record("q", "q-none", None, "1", "cup"));
    upsert(record("q", "q-time", Some(0), "1", "cup"));
    upsert(record("q", "q-none-2", None, "1", "cup"));
    assert_eq!(state("q").0, "q-time", "an event with a time beats those without");

    // The attribute JSON is queryable with the GIN index's operator.
    let cups: Vec<String> = admin
        .query(
            "SELECT product_id FROM product_attributes \
             WHERE attributes @> '{\"labels\": [{\"label\": \"cup\"}]}' ORDER BY product_id",
        )
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cups, vec!["q"]);
    let counts = sink.stats().snapshot();
    assert_eq!((counts.ok, counts.failed), (10, 0), "{counts:?}");
}

#[test]
fn a_write_blocked_for_a_moment_succeeds_on_a_retry() {
    let pg = TestPostgres::start();
    pg.create_database("retry");
    let rt = runtime();
    // libpq options in the URL reach the server: writes give up on a lock after 100 ms.
    let cfg = DatabaseConfig {
        url: Some(format!("{}?options=-c%20lock_timeout%3D100ms", pg.writer_url("retry"))),
        retries: 6,
        ..database(&pg, "retry")
    };
    let sink = rt.block_on(PostgresSink::start(&cfg)).unwrap();
    let locker = pg.admin("retry");
    // EXCLUSIVE blocks writes but not reads (so the count below does not wait).
    locker.execute("BEGIN; LOCK TABLE product_attributes IN EXCLUSIVE MODE");
    let pending = rt.spawn(async move {
        let result = sink.upsert(&record("p", "e1", Some(1), "1", "cup")).await;
        (result, sink.stats().snapshot())
    });
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(row_count(&pg, "retry", "true"), 0);
    locker.execute("COMMIT");
    let (result, counts) = rt.block_on(pending).unwrap();
    assert_eq!(result, Ok(Written::AfterRetries));
    assert_eq!((counts.ok, counts.retried, counts.failed), (0, 1, 0), "{counts:?}");
    assert!(counts.retry_attempts >= 1, "{counts:?}");
    assert_eq!(row_count(&pg, "retry", "true"), 1);
}

#[test]
fn a_batch_with_a_row_postgres_refuses_fails_only_that_row() {
    let pg = TestPostgres::start();
    pg.create_database("refuse");
    let rt = runtime();
    let mut cfg = database(&pg, "refuse");
    cfg.max_wait = Duration::from_millis(300); // all six land in one batch
    let sink = rt.block_on(PostgresSink::start(&cfg)).unwrap();
    let mut records: Vec<ProductAttributes> = (0..5)
        .map(|i| record(&format!("ok{i}"), &format!("e{i}"), Some(i), "1", "cup"))
        .collect();
    let mut bad = record("bad", "e-bad", Some(1), "1", "cup");
    bad.metadata
        .insert("note".into(), "a NUL \u{0} is not allowed in jsonb".into());
    records.insert(2, bad);
    let results = rt.block_on(futures::future::join_all(records.iter().map(|r| sink.upsert(r))));
    for (r, result) in records.iter().zip(&results) {
        if r.product_id == "bad" {
            let err = result.as_ref().unwrap_err().to_string();
            assert!(err.contains("refused"), "{err}");
        } else {
            assert!(result.is_ok(), "{}: {result:?}", r.product_id);
        }
    }
    assert_eq!(row_count(&pg, "refuse", "true"), 5);
    let counts = sink.stats().snapshot();
    assert_eq!((counts.ok, counts.failed, counts.retried), (5, 1, 0), "{counts:?}");
}

#[test]
fn a_database_that_refuses_writes_dead_letters_after_retries_and_the_stream_continues() {
    let pg = TestPostgres::start();
    pg.create_database("outage");
    let broker = EmbeddedBroker::start(1, &[(IN, 2), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let telemetry = Telemetry::local().unwrap();
    let running = Running::start_with(
        config(&brokers, "g-outage", database(&pg, "outage")),
        fake_inference(1, Duration::from_millis(5)),
        telemetry.clone(),
    );
    produce_raw(&brokers, IN, &[event("warm", "warm-1", Some(1))]);
    assert!(wait_until(Duration::from_secs(60), || row_count(&pg, "outage", "true") == 1));

    let admin = pg.admin("outage");
    admin.execute("REVOKE INSERT, UPDATE ON product_attributes FROM writer");
    let down = events("down", 5, 10);
    produce_raw(&brokers, IN, &down);
    let read = read_topics(&brokers, &[OUT, DLQ], 1 + 5 + 5, Duration::from_secs(60));
    let letters = dead_letters(&read);
    assert_eq!(letters.len(), 5, "one dead letter per failed row");
    assert_eq!(
        read.iter().filter(|r| r.topic == OUT).count(),
        6,
        "the output records are produced all the same"
    );
    for letter in &letters {
        assert_eq!(letter.error_kind, "database_write_failed");
        assert!(
            letter.error_message.contains("permission denied") && letter.error_message.contains("3 times"),
            "{}",
            letter.error_message
        );
        let product = letter.product_id.clone().expect("product id in the dead letter");
        let original = down
            .iter()
            .find(|(k, _)| k == product.as_bytes())
            .expect("a down event");
        assert_eq!(letter.original_value, original.1, "replayable: the original bytes");
        assert_eq!(letter.event_id.as_deref(), Some(format!("{product}-a").as_str()));
    }
    wait_all_committed(&brokers, "g-outage", 2);

    admin.execute("GRANT INSERT, UPDATE ON product_attributes TO writer");
    let up = events("up", 3, 20);
    produce_raw(&brokers, IN, &up);
    assert!(
        wait_until(Duration::from_secs(60), || row_count(
            &pg,
            "outage",
            "product_id LIKE 'up%'"
        ) == 3),
        "the stream continues once the database accepts writes again"
    );
    wait_all_committed(&brokers, "g-outage", 2);
    let report = running.stop();
    assert_eq!(row_count(&pg, "outage", "product_id LIKE 'down%'"), 0);
    assert_eq!(report.consumed, 9);
    assert_eq!(report.produced, 9);
    assert_eq!(
        report.dead_lettered,
        BTreeMap::from([("database_write_failed".to_string(), 5)])
    );
    let db = report.database;
    assert_eq!((db.ok, db.retried, db.failed), (4, 0, 5), "{db:?}");
    assert!(
        db.retry_attempts >= 2 && db.retry_attempts.is_multiple_of(2),
        "each failed batch was retried twice: {db:?}"
    );
    let metrics = telemetry.prometheus_text();
    for line in [
        "attrstream_database_writes_total{outcome=\"ok\"} 4",
        "attrstream_database_writes_total{outcome=\"failed\"} 5",
        "attrstream_dead_letters_total{reason=\"database_write_failed\"} 5",
        "attrstream_stage_duration_seconds_count{stage=\"database\"} 9",
        // Once per event, dead-lettered or not.
        "attrstream_stage_duration_seconds_count{stage=\"produce\"} 9",
        "attrstream_stage_duration_seconds_count{stage=\"total\"} 9",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in /metrics:\n{metrics}"
        );
    }
}

#[test]
fn a_stopped_server_costs_dead_letters_not_events_and_is_reconnected_after_restart() {
    let pg = TestPostgres::start();
    pg.create_database("restart");
    let broker = EmbeddedBroker::start(1, &[(IN, 1), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let running = Running::start(
        config(&brokers, "g-restart", database(&pg, "restart")),
        fake_inference(1, Duration::from_millis(5)),
    );
    produce_raw(&brokers, IN, &[event("warm", "warm-1", Some(1))]);
    assert!(wait_until(Duration::from_secs(60), || row_count(
        &pg, "restart", "true"
    ) == 1));

    pg.stop();
    let down = events("down", 3, 10);
    produce_raw(&brokers, IN, &down);
    let read = read_topics(&brokers, &[DLQ], 3, Duration::from_secs(60));
    let letters = dead_letters(&read);
    assert_eq!(letters.len(), 3);
    assert!(
        letters.iter().all(|l| l.error_kind == "database_write_failed"),
        "{letters:?}"
    );
    wait_all_committed(&brokers, "g-restart", 1);

    pg.restart();
    let up = events("up", 3, 20);
    produce_raw(&brokers, IN, &up);
    assert!(
        wait_until(Duration::from_secs(60), || row_count(
            &pg,
            "restart",
            "product_id LIKE 'up%'"
        ) == 3),
        "the pool reconnects after the server restarts"
    );
    wait_all_committed(&brokers, "g-restart", 1);
    let report = running.stop();
    assert_eq!(report.produced, 7);
    assert_eq!(report.dead_lettered.get("database_write_failed"), Some(&3));
}

#[test]
fn offsets_wait_for_the_database_write() {
    let pg = TestPostgres::start();
    pg.create_database("locked");
    let broker = EmbeddedBroker::start(1, &[(IN, 2), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let running = Running::start(
        config(&brokers, "g-locked", database(&pg, "locked")),
        fake_inference(1, Duration::from_millis(5)),
    );
    produce_raw(&brokers, IN, &[event("warm", "warm-1", Some(1))]);
    assert!(wait_until(Duration::from_secs(60), || row_count(&pg, "locked", "true") == 1));
    wait_all_committed(&brokers, "g-locked", 2);
    let before = committed(&brokers, "g-locked", 2);

    // Writes now wait on the lock (no statement timeout): nothing fails, nothing completes.
    let locker = pg.admin("locked");
    locker.execute("BEGIN; LOCK TABLE product_attributes IN ACCESS EXCLUSIVE MODE");
    let blocked = events("b", 10, 5);
    produce_raw(&brokers, IN, &blocked);
    let outputs = read_topics(&brokers, &[OUT], 11, Duration::from_secs(60));
    assert_eq!(outputs.len(), 11, "the output records are acknowledged meanwhile");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            committed(&brokers, "g-locked", 2),
            before,
            "offsets must not move past messages whose row is not written"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    locker.execute("COMMIT");
    wait_all_committed(&brokers, "g-locked", 2);
    assert_eq!(row_count(&pg, "locked", "true"), 11);
    let report = running.stop();
    assert!(report.dead_lettered.is_empty(), "{:?}", report.dead_lettered);
    assert_eq!(report.database.ok, 11);
    assert!(read_topics(&brokers, &[DLQ], 1, Duration::from_secs(1)).is_empty());
}

#[test]
fn migrations_apply_once_under_concurrent_starts_and_are_checked() {
    let pg = TestPostgres::start();
    pg.create_database("migrations");
    pg.create_database("bare");
    let rt = runtime();
    let cfg = database(&pg, "migrations");

    // Two replicas starting together: both succeed, the migration is applied once.
    let (a, b) = rt.block_on(async { tokio::join!(PostgresSink::start(&cfg), PostgresSink::start(&cfg)) });
    a.unwrap();
    b.unwrap();
    let admin = pg.admin("migrations");
    let recorded: Vec<(i32, String)> = admin
        .query("SELECT version, checksum FROM attrstream_schema_migrations ORDER BY version")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let shipped: Vec<(i32, String)> = MIGRATIONS.iter().map(|m| (m.version, checksum(m.sql))).collect();
    assert_eq!(recorded, shipped);
    // Starting again is a no-op.
    rt.block_on(PostgresSink::start(&cfg)).unwrap();
    assert_eq!(
        admin.scalar::<i64>("SELECT count(*) FROM attrstream_schema_migrations"),
        MIGRATIONS.len() as i64
    );

    // Without run_migrations the table must exist; waiting does not create it, so no retries.
    let quick = Duration::from_secs(3);
    let unmigrated = DatabaseConfig {
        run_migrations: false,
        ..database(&pg, "bare")
    };
    let (err, took) = start_error(&rt, unmigrated);
    assert!(err.contains("run_migrations"), "{err}");
    assert!(took < quick, "a missing table is not retried ({took:?}): {err}");
    let migrated = DatabaseConfig {
        run_migrations: false,
        ..cfg.clone()
    };
    rt.block_on(PostgresSink::start(&migrated)).unwrap();

    // An applied migration that no longer matches the shipped file is refused.
    admin.execute("UPDATE attrstream_schema_migrations SET checksum = 'edited' WHERE version = 1");
    let (err, took) = start_error(&rt, cfg.clone());
    assert!(err.contains("edited after it was applied"), "{err}");
    assert!(took < quick, "an edited migration is not retried ({took:?}): {err}");

    // A database user that may not CREATE in the schema: refused at once, saying so.
    pg.admin("postgres").execute("CREATE DATABASE locked_schema");
    pg.admin("locked_schema")
        .execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let (err, took) = start_error(&rt, database(&pg, "locked_schema"));
    assert!(err.contains("permission denied") && err.contains("CREATE"), "{err}");
    assert!(took < quick, "a missing privilege is not retried ({took:?}): {err}");
    let no_retries = DatabaseConfig { retries: 0, ..cfg };

    // A wrong password: the error says what to check and does not show it.
    let wrong = DatabaseConfig {
        password: Some("not-the-password".into()),
        ..no_retries
    };
    let err = format!("{:#}", rt.block_on(PostgresSink::start(&wrong)).err().unwrap());
    assert!(err.contains("password") && err.contains("database.url"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
}

/// `database(pg, db)` with `params` (e.g. `sslmode=...&sslrootcert=...`) added to its URL.
fn database_with(pg: &TestPostgres, db: &str, params: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: Some(format!("{}?{params}", pg.writer_url(db))),
        ..database(pg, db)
    }
}

/// Writes `pem` to `dir/name`; returns the path for `sslrootcert`.
fn pem_file(dir: &tempfile::TempDir, name: &str, pem: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

/// The writer role's sessions now: (over TLS, all).
fn writer_sessions(pg: &TestPostgres) -> (i64, i64) {
    let rows = pg.admin("postgres").query(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.usename = 'writer'",
    );
    (rows[0].get(0), rows[0].get(1))
}

/// Starting the sink with `cfg` fails: its whole error text and how long it took. `retries`
/// is 5 (at least 6.2 s of backoff), so a quick answer shows it was not retried.
fn start_error(rt: &tokio::runtime::Runtime, cfg: DatabaseConfig) -> (String, Duration) {
    let cfg = DatabaseConfig { retries: 5, ..cfg };
    let started = Instant::now();
    let err = rt
        .block_on(PostgresSink::start(&cfg))
        .err()
        .expect("the sink must not start");
    (format!("{err:#}"), started.elapsed())
}

#[test]
fn with_verify_full_and_the_ca_the_pipeline_writes_rows_over_tls() {
    let ca = TestCa::new("attrstream test CA");
    let pg = TestPostgres::start_tls(&ca.server_cert(&["127.0.0.1"]));
    pg.create_database("tls");
    let certs = tempfile::tempdir().unwrap();
    let ca_file = pem_file(&certs, "ca.pem", ca.cert_pem());
    let broker = EmbeddedBroker::start(1, &[(IN, 2), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let db = database_with(&pg, "tls", &format!("sslmode=verify-full&sslrootcert={ca_file}"));
    let running = Running::start(
        config(&brokers, "g-tls", db),
        fake_inference(1, Duration::from_millis(5)),
    );
    let records: Vec<_> = (0..6)
        .map(|i| event(&format!("t{i}"), &format!("t{i}-a"), Some(i)))
        .collect();
    produce_raw(&brokers, IN, &records);
    wait_all_committed(&brokers, "g-tls", 2);
    assert_eq!(row_count(&pg, "tls", "event_id LIKE 't%-a'"), 6);
    let (encrypted, all) = writer_sessions(&pg);
    assert!(
        all >= 1 && encrypted == all,
        "{encrypted} of {all} writer sessions use TLS"
    );
    let report = running.stop();
    assert!(report.dead_lettered.is_empty(), "{:?}", report.dead_lettered);
    assert_eq!(report.database.ok, 6, "{:?}", report.database);
}

#[test]
fn plain_text_and_untrusted_certificates_are_refused_at_once_saying_what_to_fix() {
    let ca = TestCa::new("attrstream test CA");
    let pg = TestPostgres::start_tls(&ca.server_cert(&["127.0.0.1"]));
    pg.create_database("tls");
    let certs = tempfile::tempdir().unwrap();
    let ca_file = pem_file(&certs, "ca.pem", ca.cert_pem());
    let wrong_ca = pem_file(&certs, "other-ca.pem", TestCa::new("another CA").cert_pem());
    let rt = runtime();
    let quick = Duration::from_secs(3);

    // Plain text: the server (pg_hba.conf hostnossl ... reject) refuses the session.
    let (err, took) = start_error(&rt, database_with(&pg, "tls", "sslmode=disable"));
    assert!(
        err.contains("no encryption") && err.contains("sslmode=verify-full"),
        "{err}"
    );
    assert!(took < quick, "a TLS mismatch is not retried ({took:?}): {err}");

    // A certificate signed by a CA that is not sslrootcert.
    for params in [
        format!("sslmode=verify-full&sslrootcert={wrong_ca}"),
        // With a CA file, require verifies the chain as libpq does.
        format!("sslmode=require&sslrootcert={wrong_ca}"),
    ] {
        let (err, took) = start_error(&rt, database_with(&pg, "tls", &params));
        assert!(
            err.contains("UnknownIssuer") && err.contains("not signed by a trusted CA") && err.contains("sslrootcert"),
            "{params}: {err}"
        );
        assert!(took < quick, "{params}: not retried ({took:?})");
    }
    // Without sslrootcert, verify-full trusts the platform store, which has no test CA.
    let (err, _) = start_error(&rt, database_with(&pg, "tls", "sslmode=verify-full"));
    assert!(err.contains("sslrootcert"), "{err}");

    // require without a CA file: encrypted, not authenticated (libpq's meaning); with the right
    // CA file, the chain is checked and passes; the default, prefer, takes TLS when offered. All
    // must be TLS here: the server rejects plain text.
    let mut sinks = Vec::new();
    for params in [
        "sslmode=require".to_string(),
        format!("sslmode=require&sslrootcert={ca_file}"),
        "application_name=prefer-by-default".to_string(),
    ] {
        let sink = rt
            .block_on(PostgresSink::start(&database_with(&pg, "tls", &params)))
            .unwrap_or_else(|e| panic!("{params}: {e:#}"));
        let written = rt.block_on(sink.upsert(&record(&params, "e1", Some(1), "1", "cup")));
        assert_eq!(written, Ok(Written::FirstAttempt), "{params}");
        sinks.push(sink);
    }
    assert_eq!(row_count(&pg, "tls", "true"), 3);
    let (encrypted, all) = writer_sessions(&pg);
    assert!(
        all >= 2 && encrypted == all,
        "{encrypted} of {all} writer sessions use TLS"
    );
}

#[test]
fn verify_full_refuses_a_certificate_for_another_host_that_verify_ca_accepts() {
    let ca = TestCa::new("attrstream test CA");
    let pg = TestPostgres::start_tls(&ca.server_cert(&["db.other.example"]));
    pg.create_database("tls");
    let certs = tempfile::tempdir().unwrap();
    let ca_file = pem_file(&certs, "ca.pem", ca.cert_pem());
    let rt = runtime();

    let (err, took) = start_error(
        &rt,
        database_with(&pg, "tls", &format!("sslmode=verify-full&sslrootcert={ca_file}")),
    );
    assert!(
        err.contains("not valid for name") && err.contains("db.other.example") && err.contains("sslmode=verify-ca"),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "not retried ({took:?}): {err}");

    // verify-ca checks the chain only: the same certificate is accepted.
    let sink = rt
        .block_on(PostgresSink::start(&database_with(
            &pg,
            "tls",
            &format!("sslmode=verify-ca&sslrootcert={ca_file}"),
        )))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let written = rt.block_on(sink.upsert(&record("p", "e1", Some(1), "1", "cup")));
    assert_eq!(written, Ok(Written::FirstAttempt));
}

#[test]
fn sslmode_require_against_a_server_without_tls_says_so() {
    let pg = TestPostgres::start();
    pg.create_database("plain");
    let rt = runtime();
    for params in ["sslmode=require", "sslmode=verify-full"] {
        let (err, took) = start_error(&rt, database_with(&pg, "plain", params));
        assert!(
            err.contains("does not accept TLS") && err.contains("sslmode=disable"),
            "{params}: {err}"
        );
        assert!(took < Duration::from_secs(3), "{params}: not retried ({took:?})");
    }
    // The default (prefer) falls back to plain text when the server declines TLS.
    let _sink = rt.block_on(PostgresSink::start(&database(&pg, "plain"))).unwrap();
    let (encrypted, all) = writer_sessions(&pg);
    assert!(
        all >= 1 && encrypted == 0,
        "{encrypted} of {all} writer sessions use TLS"
    );
}
