//! Avro interoperability: what attrstream writes must be readable by an independent Avro
//! implementation (Python fastavro, reading schemas/*.avsc) and the other way round, the
//! Confluent framing must be what standard deserializers expect, and the schema-registry
//! client must behave (against an in-process test registry).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use attrstream::events::codec::{self, DecodeError};
use attrstream::events::registry::{resolve_output_schema_id, InputDecoder, InputSchemas, SchemaRegistry};
use attrstream::events::{error_kinds, wire, *};
use common::registry::TestRegistry;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(5);

fn script() -> std::path::PathBuf {
    common::root().join("tests/reference/avro_reference.py")
}

fn event(image: ImageSource, full: bool) -> ProductImageEvent {
    ProductImageEvent {
        event_id: "evt-0001".into(),
        product_id: "sku-42".into(),
        image,
        content_type: full.then(|| "image/jpeg".into()),
        metadata: if full {
            [
                ("shop".to_owned(), "eu-1".to_owned()),
                ("ünï".to_owned(), "✓ ß".to_owned()),
            ]
            .into()
        } else {
            BTreeMap::new()
        },
        event_time_ms: full.then_some(1_700_000_000_123),
    }
}

fn attributes(full: bool) -> ProductAttributes {
    let px = BoxRecord {
        x_min: 10.5,
        y_min: 20.25,
        x_max: 300.0,
        y_max: 240.125,
    };
    let norm = BoxRecord {
        x_min: 0.016_406_25,
        y_min: 0.042_187_5,
        x_max: 0.468_75,
        y_max: 0.5,
    };
    let detections = vec![
        DetectionRecord {
            label: "cup".into(),
            label_id: 47,
            score: 0.953_1,
            box_px: px,
            box_norm: norm,
        },
        DetectionRecord {
            label: "dining table".into(),
            label_id: 67,
            score: 0.31,
            box_px: norm,
            box_norm: px,
        },
    ];
    ProductAttributes {
        event_id: "evt-0001".into(),
        product_id: "sku-42".into(),
        model: ModelRef {
            name: "ssd_mobilenet_v2_coco".into(),
            version: "1f2e3d4c".into(),
        },
        image_width: 640,
        image_height: 480,
        detections: if full { detections } else { vec![] },
        attributes: if full {
            AggregatedAttributes {
                labels: vec![
                    LabelSummary {
                        label: "cup".into(),
                        max_score: 0.953_1,
                        count: 1,
                    },
                    LabelSummary {
                        label: "dining table".into(),
                        max_score: 0.31,
                        count: 1,
                    },
                ],
                main_object: Some(MainObject {
                    label: "cup".into(),
                    score: 0.953_1,
                    detection_index: 0,
                    area_fraction: 0.207_5,
                }),
                object_colours: vec![ObjectColours {
                    detection_index: 0,
                    label: "cup".into(),
                    colours: vec![
                        DominantColour {
                            name: "white".into(),
                            r: 250,
                            g: 249,
                            b: 245,
                            fraction: 0.62,
                        },
                        DominantColour {
                            name: "black".into(),
                            r: 0,
                            g: 0,
                            b: 0,
                            fraction: 0.38,
                        },
                    ],
                }],
            }
        } else {
            AggregatedAttributes::default()
        },
        timings: StageTimings {
            fetch_ms: 0.0,
            decode_ms: 3.25,
            batch_wait_ms: 12.5,
            inference_ms: 55.123_456_789,
            total_ms: 71.0,
        },
        event_time_ms: full.then_some(1_700_000_000_000),
        processed_time_ms: 1_700_000_000_456,
        metadata: if full {
            [("shop".to_owned(), "eu-1".to_owned())].into()
        } else {
            BTreeMap::new()
        },
    }
}

fn dead_letter(full: bool) -> DeadLetter {
    DeadLetter {
        original_key: full.then(|| b"sku-42".to_vec()),
        original_value: vec![0, 0, 0, 0, 7, 0xff, 0x00, 0x80],
        source_topic: "product-images".into(),
        source_partition: 11,
        source_offset: 9_876_543_210,
        event_id: full.then(|| "evt-0001".into()),
        product_id: full.then(|| "sku-42".into()),
        error_kind: if full {
            error_kinds::FETCH_HTTP_STATUS
        } else {
            error_kinds::BAD_FRAMING
        }
        .into(),
        error_message: "HTTP 503 from https://cdn.example.com/x.jpg".into(),
        failed_time_ms: 1_700_000_000_789,
    }
}

/// (a) Rust encodes and frames every record shape; fastavro decodes them and compares.
#[test]
fn fastavro_reads_what_rust_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    let mut add = |name: &str, schema: &str, schema_id: u32, body: Vec<u8>, domain: serde_json::Value| {
        let file = format!("{name}.bin");
        std::fs::write(dir.path().join(&file), wire::frame(schema_id, &body)).unwrap();
        cases.push(json!({ "name": name, "schema": schema, "schema_id": schema_id, "file": file, "domain": domain }));
    };
    for (i, (name, e)) in [
        (
            "event_inline_full",
            event(ImageSource::Inline(vec![0xff, 0xd8, 0, 1, 2, 0x80]), true),
        ),
        ("event_inline_bare", event(ImageSource::Inline(vec![9; 1000]), false)),
        ("event_inline_empty", event(ImageSource::Inline(vec![]), false)),
        (
            "event_uri_full",
            event(ImageSource::Uri("s3://bucket/images/sku-42.jpg".into()), true),
        ),
        (
            "event_uri_bare",
            event(ImageSource::Uri("file:///data/a b.png".into()), false),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        add(
            name,
            "product_image_event",
            1 + i as u32,
            codec::encode_event(&e),
            serde_json::to_value(&e).unwrap(),
        );
    }
    for (name, a) in [
        ("attributes_full", attributes(true)),
        ("attributes_bare", attributes(false)),
    ] {
        add(
            name,
            "product_attributes",
            0x0102_0304,
            codec::encode_attributes(&a),
            serde_json::to_value(&a).unwrap(),
        );
    }
    for (name, d) in [
        ("dead_letter_full", dead_letter(true)),
        ("dead_letter_bare", dead_letter(false)),
    ] {
        add(
            name,
            "dead_letter",
            u32::MAX,
            codec::encode_dead_letter(&d),
            serde_json::to_value(&d).unwrap(),
        );
    }
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_vec_pretty(&cases).unwrap(),
    )
    .unwrap();
    common::run_python(&script(), &["check", dir.path().to_str().unwrap()]);
}

/// (b) fastavro encodes events (current, older and newer writer schemas); Rust decodes them.
#[test]
fn rust_reads_what_fastavro_writes() {
    let dir = tempfile::tempdir().unwrap();
    common::run_python(&script(), &["write", dir.path().to_str().unwrap()]);
    let cases = read_python_cases(dir.path());
    assert_eq!(cases.len(), 9, "the script writes 9 cases");
    for case in &cases {
        let result = codec::decode_event(&case.body, &case.writer);
        match (&case.expected, result) {
            (Some(expected), Ok(event)) => assert_eq!(&event, expected, "{}", case.name),
            (Some(_), Err(e)) => panic!("{}: {e}", case.name),
            (None, Ok(event)) => panic!("{}: decoded {event:?}, expected an error", case.name),
            (None, Err(e)) => {
                let kind = match case.name.as_str() {
                    "newer_writer_new_branch" => error_kinds::UNKNOWN_SCHEMA,
                    "empty_event_id" => error_kinds::INVALID_EVENT,
                    other => panic!("unexpected failing case {other}"),
                };
                assert_eq!(e.kind(), Some(kind), "{}: {e}", case.name);
            }
        }
    }
    // The older writer lacks three fields: their defaults fill in.
    let older = cases.iter().find(|c| c.name == "older_writer").unwrap();
    assert!(older.writer != *codec::product_image_event_schema());
    let event = codec::decode_event(&older.body, &older.writer).unwrap();
    assert_eq!(
        (event.content_type, event.metadata.len(), event.event_time_ms),
        (None, 0, None)
    );
}

struct PythonCase {
    name: String,
    body: Vec<u8>,
    writer: Schema,
    writer_json: String,
    expected: Option<ProductImageEvent>,
}

fn read_python_cases(dir: &Path) -> Vec<PythonCase> {
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    manifest
        .into_iter()
        .map(|c| {
            let writer_json = std::fs::read_to_string(dir.join(c["writer"].as_str().unwrap())).unwrap();
            PythonCase {
                name: c["name"].as_str().unwrap().to_owned(),
                body: std::fs::read(dir.join(c["file"].as_str().unwrap())).unwrap(),
                writer: Schema::parse_str(&writer_json).unwrap(),
                writer_json,
                expected: serde_json::from_value(c["expected"].clone()).unwrap(),
            }
        })
        .collect()
}

/// The evolution rules of schemas/README.md, checked with apache-avro's compatibility checker:
/// the current schema reads the older and newer writers' data (newer only when the new branch
/// is not used, which the full check cannot know: it reports the new branch).
#[test]
fn older_writer_schema_is_backward_compatible() {
    let dir = tempfile::tempdir().unwrap();
    common::run_python(&script(), &["write", dir.path().to_str().unwrap()]);
    let cases = read_python_cases(dir.path());
    let older = &cases.iter().find(|c| c.name == "older_writer").unwrap().writer;
    let reader = codec::product_image_event_schema();
    apache_avro::schema_compatibility::SchemaCompatibility::can_read(older, reader)
        .expect("the current ProductImageEvent must read data written with the older schema");
    let newer = &cases.iter().find(|c| c.name == "newer_writer").unwrap().writer;
    assert!(apache_avro::schema_compatibility::SchemaCompatibility::can_read(newer, reader).is_err());
    // ... while the newer schema reads everything the current one writes (FORWARD).
    apache_avro::schema_compatibility::SchemaCompatibility::can_read(reader, newer)
        .expect("a newer schema with an added default field and an appended branch reads current data");
}

fn registry(reg: &TestRegistry) -> Arc<SchemaRegistry> {
    Arc::new(SchemaRegistry::new(&reg.url, None, TIMEOUT).unwrap())
}

/// (c) The registry client: stable ids, lookups, fetch by id with caching.
#[tokio::test]
async fn registry_register_lookup_and_fetch() {
    let reg = TestRegistry::start();
    let client = registry(&reg);
    let subject = "product-attributes-value";
    let json = codec::product_attributes_schema_json();
    assert_eq!(client.lookup(subject, json).await.unwrap(), None, "unknown subject");
    let id = client.register(subject, json).await.unwrap();
    assert_eq!(
        client.register(subject, json).await.unwrap(),
        id,
        "registering again returns the same id"
    );
    assert_eq!(client.lookup(subject, json).await.unwrap(), Some(id));
    // Same schema text under another subject: same id (ids are global), other schema: new id.
    assert_eq!(client.register("other-value", json).await.unwrap(), id);
    let dlq = client
        .register("dlq-value", codec::dead_letter_schema_json())
        .await
        .unwrap();
    assert_ne!(dlq, id);
    assert_eq!(
        client.lookup(subject, codec::dead_letter_schema_json()).await.unwrap(),
        None,
        "not in this subject"
    );
    let schema = client.schema_by_id(id).await.unwrap();
    assert!(schema == *codec::product_attributes_schema());
    let _ = client.schema_by_id(id).await.unwrap();
    assert_eq!(reg.requests("GET /schemas/ids/{id}"), 1, "schemas by id are cached");
    let err = client.schema_by_id(999).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        err.to_string().contains("/schemas/ids/999") && err.to_string().contains("404"),
        "{err}"
    );
    let err = client.register(subject, "{not json").await.unwrap_err();
    assert!(err.to_string().contains("422"), "{err}");
}

/// (c) resolve_output_schema_id: fixed id wins, lookup, auto-registration, clear refusals.
#[tokio::test]
async fn output_schema_id_resolution() {
    let reg = TestRegistry::start();
    let client = registry(&reg);
    let json = codec::dead_letter_schema_json();
    assert_eq!(
        resolve_output_schema_id(Some(&client), "dlq-value", json, false, Some(77))
            .await
            .unwrap(),
        77
    );
    assert_eq!(
        resolve_output_schema_id(None, "dlq-value", json, false, Some(78))
            .await
            .unwrap(),
        78
    );
    assert_eq!(reg.total_requests(), 0, "a fixed id needs no registry");
    let err = resolve_output_schema_id(None, "dlq-value", json, true, None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("registry"), "{err:#}");
    let err = resolve_output_schema_id(Some(&client), "dlq-value", json, false, None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("not registered"), "{err:#}");
    let id = resolve_output_schema_id(Some(&client), "dlq-value", json, true, None)
        .await
        .unwrap();
    assert_eq!(
        resolve_output_schema_id(Some(&client), "dlq-value", json, false, None)
            .await
            .unwrap(),
        id
    );
    reg.set_unavailable(true);
    let err = resolve_output_schema_id(Some(&client), "dlq-value", json, true, None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("503"), "{err:#}");
}

fn uri_event() -> ProductImageEvent {
    event(ImageSource::Uri("https://cdn.example.com/sku-42.jpg".into()), true)
}

fn kind(result: Result<ProductImageEvent, DecodeError>) -> Option<&'static str> {
    result.expect_err("decoding should fail").kind()
}

/// (c) InputDecoder in registry mode: ids resolve (including an older writer schema written
/// by fastavro), and every failure has the right dead-letter kind.
#[tokio::test]
async fn input_decoder_with_registry() {
    let reg = TestRegistry::start();
    let client = registry(&reg);
    let id = client
        .register("product-images-value", codec::product_image_event_schema_json())
        .await
        .unwrap();
    let decoder = InputDecoder::new(InputSchemas::Registry(client.clone()));
    let body = codec::encode_event(&uri_event());
    let framed = wire::frame(id, &body);
    assert!(
        decoder.decode_cached(&framed).is_none(),
        "not cached yet: needs the registry"
    );
    assert_eq!(decoder.decode(&framed).await.unwrap(), uri_event());
    assert_eq!(
        decoder.decode_cached(&framed).unwrap().unwrap(),
        uri_event(),
        "cached now"
    );
    assert_eq!(reg.requests("GET /schemas/ids/{id}"), 1);

    // An older writer schema registered by a producer, data written by fastavro.
    let dir = tempfile::tempdir().unwrap();
    common::run_python(&script(), &["write", dir.path().to_str().unwrap()]);
    let older = read_python_cases(dir.path())
        .into_iter()
        .find(|c| c.name == "older_writer")
        .unwrap();
    let older_id = client
        .register("product-images-value", &older.writer_json)
        .await
        .unwrap();
    assert_ne!(older_id, id);
    let decoded = decoder.decode(&wire::frame(older_id, &older.body)).await.unwrap();
    assert_eq!(Some(decoded), older.expected);

    // Failures and their kinds.
    assert_eq!(
        kind(decoder.decode(&wire::frame(4242, &body)).await),
        Some(error_kinds::UNKNOWN_SCHEMA)
    );
    assert_eq!(
        kind(decoder.decode(b"garbage, not framed").await),
        Some(error_kinds::BAD_FRAMING)
    );
    assert_eq!(kind(decoder.decode(&[0, 0]).await), Some(error_kinds::BAD_FRAMING));
    let truncated = wire::frame(id, &body[..body.len() - 3]);
    let err = decoder.decode(&truncated).await.unwrap_err();
    assert_eq!(err.kind(), Some(error_kinds::BAD_AVRO), "{err}");
    assert!(err.to_string().contains(&format!("schema id {id}")), "{err}");
    let invalid = ProductImageEvent {
        product_id: String::new(),
        ..uri_event()
    };
    let err = decoder
        .decode(&wire::frame(id, &codec::encode_event(&invalid)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(error_kinds::INVALID_EVENT));
    assert_eq!(err.ids(), (Some("evt-0001"), None));

    // A registered schema that is not Avro, or not an event at all.
    let proto = reg.insert_schema("syntax = \"proto3\"; message X {}", Some("PROTOBUF"));
    let err = decoder.decode(&wire::frame(proto, &body)).await.unwrap_err();
    assert_eq!(err.kind(), Some(error_kinds::UNKNOWN_SCHEMA), "{err}");
    assert!(err.to_string().contains("PROTOBUF"), "{err}");
    let other = client
        .register("other-value", r#"{"type":"record","name":"Other","fields":[]}"#)
        .await
        .unwrap();
    let err = decoder.decode(&wire::frame(other, &[])).await.unwrap_err();
    assert_eq!(err.kind(), Some(error_kinds::UNKNOWN_SCHEMA), "{err}");

    // Unknown ids are remembered: no second request for the same unknown id.
    let before = reg.requests("GET /schemas/ids/{id}");
    assert_eq!(
        kind(decoder.decode(&wire::frame(4242, &body)).await),
        Some(error_kinds::UNKNOWN_SCHEMA)
    );
    assert_eq!(reg.requests("GET /schemas/ids/{id}"), before);
}

/// A registry that is down is not the message's fault: no kind, so the caller retries; once
/// it is back, the same message decodes.
#[tokio::test]
async fn registry_outage_is_retryable() {
    let reg = TestRegistry::start();
    let client = registry(&reg);
    let id = client
        .register("product-images-value", codec::product_image_event_schema_json())
        .await
        .unwrap();
    let decoder = InputDecoder::new(InputSchemas::Registry(client));
    let framed = wire::frame(id, &codec::encode_event(&uri_event()));
    reg.set_unavailable(true);
    let err = decoder.decode(&framed).await.unwrap_err();
    assert!(matches!(err, DecodeError::RegistryUnavailable { .. }), "{err}");
    assert_eq!(err.kind(), None);
    assert!(err.to_string().contains("503"), "{err}");
    reg.set_unavailable(false);
    assert_eq!(decoder.decode(&framed).await.unwrap(), uri_event());

    // Nothing listening at all.
    let url = reg.url.clone();
    drop(reg);
    let gone = Arc::new(SchemaRegistry::new(&url, None, Duration::from_secs(2)).unwrap());
    let err = InputDecoder::new(InputSchemas::Registry(gone))
        .decode(&framed)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), None, "{err}");
    assert!(err.to_string().contains(&url), "{err}");
}

/// Basic auth: sent when configured (explicitly or in the URL); a 401 says to check credentials.
#[tokio::test]
async fn registry_basic_auth() {
    let reg = TestRegistry::start_with_auth("svc", "s3cret:x");
    let json = codec::product_image_event_schema_json();
    let anonymous = SchemaRegistry::new(&reg.url, None, TIMEOUT).unwrap();
    let err = anonymous.register("s-value", json).await.unwrap_err();
    assert!(
        err.to_string().contains("401") && err.to_string().contains("credentials"),
        "{err}"
    );
    let authed = SchemaRegistry::new(&reg.url, Some(("svc".into(), "s3cret:x".into())), TIMEOUT).unwrap();
    let id = authed.register("s-value", json).await.unwrap();
    let in_url = reg.url.replace("http://", "http://svc:s3cret%3Ax@");
    let from_url = SchemaRegistry::new(&in_url, None, TIMEOUT).unwrap();
    assert_eq!(from_url.lookup("s-value", json).await.unwrap(), Some(id));
    assert!(!from_url.url().contains("s3cret"));
}

/// (c) Fixed and raw modes need no registry.
#[test]
fn input_decoder_fixed_and_raw_modes() {
    let body = codec::encode_event(&uri_event());
    let fixed = InputDecoder::new(InputSchemas::Fixed {
        id: 12,
        writer_schema: codec::product_image_event_schema().clone(),
    });
    assert_eq!(
        fixed.decode_cached(&wire::frame(12, &body)).unwrap().unwrap(),
        uri_event()
    );
    let err = fixed.decode_cached(&wire::frame(13, &body)).unwrap().unwrap_err();
    assert_eq!(err.kind(), Some(error_kinds::UNKNOWN_SCHEMA));
    assert!(err.to_string().contains("only schema id 12"), "{err}");
    assert_eq!(
        kind(fixed.decode_cached(&body).unwrap()),
        Some(error_kinds::BAD_FRAMING)
    );

    let raw = InputDecoder::new(InputSchemas::Raw {
        writer_schema: codec::product_image_event_schema().clone(),
    });
    assert_eq!(raw.decode_cached(&body).unwrap().unwrap(), uri_event());
    assert_eq!(
        kind(raw.decode_cached(&body[..4]).unwrap()),
        Some(error_kinds::BAD_AVRO)
    );
    // A framed value given to a raw decoder is not silently misread.
    assert!(raw.decode_cached(&wire::frame(1, &body)).unwrap().is_err());
}

/// The registry's view of our schema text: what `GET /subjects/{s}/versions/latest` returns
/// parses back to the embedded schema, defaults included.
#[test]
fn registered_text_round_trips_through_the_registry() {
    let reg = TestRegistry::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = registry(&reg);
    for (subject, json, schema) in [
        (
            "in-value",
            codec::product_image_event_schema_json(),
            codec::product_image_event_schema(),
        ),
        (
            "out-value",
            codec::product_attributes_schema_json(),
            codec::product_attributes_schema(),
        ),
        (
            "dlq-value",
            codec::dead_letter_schema_json(),
            codec::dead_letter_schema(),
        ),
    ] {
        let id = rt.block_on(client.register(subject, json)).unwrap();
        let latest: serde_json::Value =
            reqwest::blocking::get(format!("{}/subjects/{subject}/versions/latest", reg.url))
                .unwrap()
                .json_or_text();
        assert_eq!(latest["id"], json!(id));
        let text = latest["schema"].as_str().unwrap();
        assert!(Schema::parse_str(text).unwrap() == *schema);
        assert!(text.contains("\"default\""), "defaults are registered");
    }
}

/// `reqwest::blocking` without the `json` feature: parse the body ourselves.
trait JsonOrText {
    fn json_or_text(self) -> serde_json::Value;
}

impl JsonOrText for reqwest::blocking::Response {
    fn json_or_text(self) -> serde_json::Value {
        let text = self.text().unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }
}
