//! Telemetry of the serve pipeline, end to end and without a GPU or network: the pipeline runs
//! against librdkafka's in-process mock cluster with a fake model, exports by OTLP/HTTP to a
//! receiver started here that decodes the payloads with the official OpenTelemetry protobuf
//! definitions (`opentelemetry-proto`), and serves /metrics, /healthz and /readyz over HTTP.
//!
//! Checked: every event has its `event` span in the producer's trace (parent = the span id
//! in the input's `traceparent`) with fetch, decode, batch_wait, inference and produce
//! children; output and dead-letter records carry a `traceparent` of the same trace naming our
//! event span; metrics arrive by OTLP; after the run a scrape shows events consumed = records
//! produced + dead letters = events sent, dead letters by reason; /healthz is 200 while
//! running; /readyz is 503 before the model is loaded and 200 once partitions are assigned,
//! and with two members on one partition exactly the one holding it is ready; `tracing` spans
//! reach OTLP through the tracing-opentelemetry bridge, their log lines as span events.
//!
//! Each pipeline gets its own `Telemetry` (registry, providers, health), so the tests run in
//! parallel without sharing counters, and the OTLP endpoint is passed explicitly rather than
//! through process-global `OTEL_*` variables.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attrstream::config::Config;
use attrstream::embedded_broker::EmbeddedBroker;
use attrstream::events::codec::encode_event;
use attrstream::events::wire::frame;
use attrstream::events::{ImageSource, ProductImageEvent};
use attrstream::telemetry::http::HttpServer;
use attrstream::telemetry::{OtlpSettings, Telemetry, TelemetrySettings};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::kafka::{fake_inference, png, read_topics, ReadRecord};
use common::pipeline::{test_config, Running, DLQ, IN, OUT};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::{status, Span};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// What the OTLP receiver got, decoded.
#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

/// An OTLP/HTTP receiver (protobuf) on its own thread and runtime.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let state = received.clone();
        let addr = runtime.block_on(async move {
            let app = axum::Router::new()
                .route("/v1/traces", post(traces))
                .route("/v1/metrics", post(metrics))
                .with_state(state);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            addr
        });
        Self {
            addr,
            received,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        let r = self.received.lock().unwrap();
        r.traces
            .iter()
            .flat_map(|req| &req.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    /// The latest value of each cumulative integer sum, by metric name and attributes.
    fn int_sums(&self) -> BTreeMap<(String, String), i64> {
        let r = self.received.lock().unwrap();
        let mut out = BTreeMap::new();
        for req in &r.metrics {
            for m in req
                .resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| &sm.metrics)
            {
                if let Some(metric::Data::Sum(sum)) = &m.data {
                    for p in &sum.data_points {
                        if let Some(number_data_point::Value::AsInt(v)) = p.value {
                            let attrs: Vec<String> = p
                                .attributes
                                .iter()
                                .map(|kv| {
                                    format!(
                                        "{}={}",
                                        kv.key,
                                        any_text(kv.value.as_ref().and_then(|v| v.value.as_ref()))
                                    )
                                })
                                .collect();
                            out.insert((m.name.clone(), attrs.join(",")), v);
                        }
                    }
                }
            }
        }
        out
    }

    fn service_names(&self) -> Vec<String> {
        let r = self.received.lock().unwrap();
        let resources = r
            .traces
            .iter()
            .flat_map(|t| t.resource_spans.iter().filter_map(|rs| rs.resource.clone()))
            .chain(
                r.metrics
                    .iter()
                    .flat_map(|m| m.resource_metrics.iter().filter_map(|rm| rm.resource.clone())),
            );
        resources
            .flat_map(|res| res.attributes)
            .filter(|kv| kv.key == "service.name")
            .map(|kv| any_text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .collect()
    }
}

fn any_text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

async fn traces(State(state): State<Arc<Mutex<Received>>>, body: Bytes) -> Vec<u8> {
    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace request");
    state.lock().unwrap().traces.push(req);
    Vec::new() // an empty ExportTraceServiceResponse
}

async fn metrics(State(state): State<Arc<Mutex<Received>>>, body: Bytes) -> Vec<u8> {
    let req = ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics request");
    state.lock().unwrap().metrics.push(req);
    Vec::new()
}

/// The telemetry HTTP server of `telemetry` on a free port, on its own runtime.
struct Endpoints {
    addr: SocketAddr,
    _server: HttpServer,
    _runtime: tokio::runtime::Runtime,
}

impl Endpoints {
    fn start(telemetry: &Telemetry) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime
            .block_on(HttpServer::start(telemetry.clone(), "127.0.0.1:0".parse().unwrap()))
            .unwrap();
        Self {
            addr: server.addr(),
            _server: server,
            _runtime: runtime,
        }
    }

    /// GET `path`: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::blocking::get(format!("http://{}{path}", self.addr)).expect("telemetry endpoint");
        (response.status().as_u16(), response.text().unwrap_or_default())
    }

    /// Polls `path` until it answers `status` or `timeout` passes; the last answer.
    fn wait_for(&self, path: &str, status: u16, timeout: Duration) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.get(path);
            if answer.0 == status || Instant::now() > deadline {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn config(brokers: &str, group: &str) -> Config {
    let mut c = test_config(brokers, group);
    for (k, v) in [("statistics.interval.ms", "200"), ("fetch.wait.max.ms", "10")] {
        c.kafka.consumer_options.insert(k.into(), v.into());
    }
    c.telemetry.listen = String::new(); // the tests start the server themselves
    c.validate().unwrap();
    c
}

fn telemetry(otlp: OtlpSettings) -> Telemetry {
    Telemetry::new(&TelemetrySettings {
        service_name: "attrstream-test".into(),
        otlp,
    })
    .unwrap()
}

/// A W3C `traceparent` for trace `trace` and parent span `span`, sampled.
fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// A record to produce: key, value, headers.
type Outgoing = (String, Vec<u8>, Vec<(String, String)>);

/// Produces records with their headers and waits for the acknowledgements.
fn produce_with_headers(brokers: &str, topic: &str, records: &[Outgoing]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    for (key, value, headers) in records {
        let mut h = OwnedHeaders::new();
        for (name, v) in headers {
            h = h.insert(Header {
                key: name,
                value: Some(v.as_bytes()),
            });
        }
        producer
            .send(BaseRecord::to(topic).key(key).payload(value).headers(h))
            .expect("enqueue");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// A record read back, its key as text (the tests' keys are product ids).
struct Read {
    topic: String,
    key: String,
    headers: HashMap<String, String>,
}

impl From<ReadRecord> for Read {
    fn from(r: ReadRecord) -> Self {
        Self {
            topic: r.topic,
            key: String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned(),
            headers: r.headers,
        }
    }
}

fn event(id: &str) -> ProductImageEvent {
    ProductImageEvent {
        event_id: format!("evt-{id}"),
        product_id: id.to_string(),
        image: ImageSource::Inline(png(12, 10, [200, 40, 30])),
        content_type: None,
        metadata: BTreeMap::new(),
        event_time_ms: Some(1_700_000_000_000),
    }
}

/// The value of the sample `name` (with its labels, exactly as rendered) in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn hex_id(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

#[test]
fn events_are_traced_counted_and_exported() {
    let broker = EmbeddedBroker::start(1, &[(IN, 2), (OUT, 2), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let receiver = Receiver::start();
    let telemetry = telemetry(OtlpSettings::to_endpoint(&receiver.url(), Duration::from_millis(300)));
    let endpoints = Endpoints::start(&telemetry);

    // Before anything runs: alive (starting), not ready, and the reason says why.
    assert_eq!(endpoints.get("/healthz").0, 200);
    let (status, reason) = endpoints.get("/readyz");
    assert_eq!(status, 503);
    assert!(reason.contains("model"), "{reason}");

    // Six good events and one that cannot be decoded, each in a producer trace of its own.
    let mut producer_spans: HashMap<String, (String, String)> = HashMap::new(); // key -> (trace, span)
    let mut records = Vec::new();
    for i in 0..7 {
        let key = if i == 3 { "poison".to_string() } else { format!("p{i}") };
        let trace = format!("{:032x}", 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_0000u128 + i as u128 + 1);
        let span = format!("{:016x}", 0x00f0_67aa_0ba9_0000u64 + i as u64 + 1);
        let value = if key == "poison" {
            b"not a framed avro event".to_vec()
        } else {
            frame(1, &encode_event(&event(&key)))
        };
        let headers = vec![
            ("traceparent".to_string(), traceparent(&trace, &span)),
            ("tracestate".to_string(), "vendor=abc".to_string()),
            ("x-tenant".to_string(), "shop-1".to_string()),
        ];
        producer_spans.insert(key.clone(), (trace, span));
        records.push((key, value, headers));
    }
    produce_with_headers(&brokers, IN, &records);

    let running = Running::start_with(
        config(&brokers, "g-telemetry"),
        fake_inference(1, Duration::from_millis(2)),
        telemetry.clone(),
    );
    let (status, reason) = endpoints.wait_for("/readyz", 200, Duration::from_secs(30));
    assert_eq!(
        status, 200,
        "ready once the model is warm and partitions are assigned: {reason}"
    );
    let read: Vec<Read> = read_topics(&brokers, &[OUT, DLQ], records.len(), Duration::from_secs(60))
        .into_iter()
        .map(Read::from)
        .collect();
    assert_eq!(read.len(), records.len(), "one record per event");
    assert_eq!(endpoints.get("/healthz").0, 200, "alive while the consumer polls");
    // Lag comes from librdkafka's statistics (every 200 ms here): everything is consumed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lag_line = loop {
        let scrape = endpoints.get("/metrics").1;
        let lags: Vec<f64> = (0..2)
            .filter_map(|p| {
                sample(
                    &scrape,
                    &format!("attrstream_consumer_lag{{partition=\"{p}\",topic=\"{IN}\"}}"),
                )
            })
            .collect();
        if lags.len() == 2 && lags.iter().all(|l| *l == 0.0) || Instant::now() > deadline {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for p in 0..2 {
        assert_eq!(
            sample(
                &lag_line,
                &format!("attrstream_consumer_lag{{partition=\"{p}\",topic=\"{IN}\"}}")
            ),
            Some(0.0),
            "lag of partition {p} in\n{lag_line}"
        );
    }
    let report = running.stop();
    assert_eq!(report.produced, 6);

    // After the run: the scrape's counters add up to the events sent.
    let (status, scrape) = endpoints.get("/metrics");
    assert_eq!(status, 200);
    let consumed = sample(&scrape, "attrstream_events_consumed_total");
    let produced = sample(&scrape, "attrstream_records_produced_total");
    let dead = sample(&scrape, "attrstream_dead_letters_total{reason=\"bad_framing\"}");
    assert_eq!(consumed, Some(7.0), "{scrape}");
    assert_eq!(produced, Some(6.0), "{scrape}");
    assert_eq!(dead, Some(1.0), "{scrape}");
    assert_eq!(consumed, Some(produced.unwrap() + dead.unwrap()));
    for (name, at_least) in [
        ("attrstream_stage_duration_seconds_count{stage=\"fetch\"}", 6.0),
        ("attrstream_stage_duration_seconds_count{stage=\"decode\"}", 6.0),
        ("attrstream_stage_duration_seconds_count{stage=\"batch_wait\"}", 6.0),
        ("attrstream_stage_duration_seconds_count{stage=\"inference\"}", 6.0),
        ("attrstream_stage_duration_seconds_count{stage=\"produce\"}", 7.0),
        ("attrstream_stage_duration_seconds_count{stage=\"total\"}", 7.0),
        ("attrstream_model_info{name=\"fake\",version=\"1\"}", 1.0),
        ("attrstream_batch_fill_ratio_count", 1.0),
    ] {
        let v = sample(&scrape, name).unwrap_or_else(|| panic!("no {name} in\n{scrape}"));
        assert!(v >= at_least, "{name} = {v}");
    }
    assert_eq!(
        sample(&scrape, "attrstream_batch_size_sum"),
        Some(6.0),
        "every good image ran in some batch"
    );
    assert!(
        scrape.contains("# TYPE attrstream_stage_duration_seconds histogram"),
        "{scrape}"
    );
    assert_eq!(sample(&scrape, "attrstream_in_flight_messages"), Some(0.0));
    assert!(
        endpoints.get("/readyz").0 == 503 && endpoints.get("/healthz").0 == 503,
        "not ready and not alive once the consumer has stopped"
    );

    // Flush the last spans and metrics, then look at what the receiver decoded.
    telemetry.shutdown();
    let spans = receiver.spans();
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    for r in &read {
        let (trace, parent) = &producer_spans[&r.key];
        let event = spans
            .iter()
            .find(|s| s.name == "event" && hex_id(&s.trace_id) == *trace)
            .unwrap_or_else(|| panic!("no event span in trace {trace} ({})", r.key));
        assert_eq!(
            hex_id(&event.parent_span_id),
            *parent,
            "{}: parent is the producer's span",
            r.key
        );
        let children: Vec<&str> = spans
            .iter()
            .filter(|s| s.parent_span_id == event.span_id)
            .map(|s| {
                assert_eq!(s.trace_id, event.trace_id);
                assert!(
                    s.start_time_unix_nano >= event.start_time_unix_nano,
                    "{} starts inside the event",
                    s.name
                );
                assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
                s.name.as_str()
            })
            .collect();
        // The output (or dead letter) carries our span, in the same trace; other headers stay.
        let ours = traceparent(trace, &hex_id(&event.span_id));
        assert_eq!(r.headers.get("traceparent"), Some(&ours), "{}: {:?}", r.key, r.headers);
        assert!(by_id.contains_key(&event.span_id));
        if r.key == "poison" {
            assert_eq!(r.topic, DLQ);
            assert_eq!(
                children,
                vec!["produce"],
                "a message that cannot be decoded only has its dead letter"
            );
            let status = event.status.as_ref().expect("status");
            assert_eq!(status.code, status::StatusCode::Error as i32);
        } else {
            assert_eq!(r.topic, OUT);
            assert_eq!(r.headers.get("x-tenant").map(String::as_str), Some("shop-1"));
            assert_eq!(r.headers.get("tracestate").map(String::as_str), Some("vendor=abc"));
            let mut names = children.clone();
            names.sort_unstable();
            assert_eq!(
                names,
                vec!["batch_wait", "decode", "fetch", "inference", "produce"],
                "{}",
                r.key
            );
            let attr = |name: &str| {
                event
                    .attributes
                    .iter()
                    .find(|kv| kv.key == name)
                    .map(|kv| any_text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            };
            assert_eq!(attr("attrstream.event.id"), Some(format!("evt-{}", r.key)));
            assert_eq!(attr("attrstream.product.id"), Some(r.key.clone()));
            assert_eq!(attr("messaging.destination.name").as_deref(), Some(IN));
            assert!(attr("messaging.kafka.offset").is_some());
        }
    }
    // Metrics arrived by OTLP too, with the same figures.
    let sums = receiver.int_sums();
    assert_eq!(
        sums.get(&("attrstream_events_consumed".into(), String::new())),
        Some(&7),
        "{sums:?}"
    );
    assert_eq!(
        sums.get(&("attrstream_dead_letters".into(), "reason=bad_framing".into())),
        Some(&1),
        "{sums:?}"
    );
    let names = receiver.service_names();
    assert!(
        !names.is_empty() && names.iter().all(|n| n == "attrstream-test"),
        "{names:?}"
    );
}

#[test]
fn readiness_follows_partition_assignment() {
    // One partition, two members: only the member holding it is ready.
    let broker = EmbeddedBroker::start(1, &[(IN, 1), (OUT, 1), (DLQ, 1)]).unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let (ta, tb) = (telemetry(OtlpSettings::none()), telemetry(OtlpSettings::none()));
    let (ea, eb) = (Endpoints::start(&ta), Endpoints::start(&tb));
    let a = Running::start_with(
        config(&brokers, "g-ready"),
        fake_inference(1, Duration::ZERO),
        ta.clone(),
    );
    assert_eq!(
        ea.wait_for("/readyz", 200, Duration::from_secs(30)).0,
        200,
        "a alone holds the partition"
    );
    let b = Running::start_with(
        config(&brokers, "g-ready"),
        fake_inference(1, Duration::ZERO),
        tb.clone(),
    );
    // Once b has joined, the group settles with the partition on exactly one of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (ra, rb) = loop {
        let (ra, rb) = (ea.get("/readyz"), eb.get("/readyz"));
        let b_joined = rb.1.contains("no partitions") || rb.0 == 200;
        if b_joined && (ra.0 == 200) != (rb.0 == 200) || Instant::now() > deadline {
            break (ra, rb);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!((ra.0 == 200) != (rb.0 == 200), "exactly one ready: a {ra:?}, b {rb:?}");
    let (idle, idle_endpoints, busy, busy_endpoints) = if ra.0 == 200 {
        (b, &eb, a, &ea)
    } else {
        (a, &ea, b, &eb)
    };
    let (_, reason) = idle_endpoints.get("/readyz");
    assert!(reason.contains("no partitions assigned"), "{reason}");
    assert_eq!(idle_endpoints.get("/healthz").0, 200, "an idle member is still alive");
    // The holder leaves: the other one takes the partition over and becomes ready.
    busy.stop();
    assert_eq!(busy_endpoints.get("/readyz").0, 503);
    let (status, reason) = idle_endpoints.wait_for("/readyz", 200, Duration::from_secs(30));
    assert_eq!(status, 200, "{reason}");
    idle.stop();
}

#[test]
fn tracing_spans_are_exported_through_the_bridge() {
    // The process-wide `tracing` subscriber, as `main` installs it; this test binary's other
    // tests only log through it.
    attrstream::telemetry::logging::init(Default::default());
    let receiver = Receiver::start();
    let telemetry = telemetry(OtlpSettings::to_endpoint(&receiver.url(), Duration::from_secs(60)));
    assert!(attrstream::telemetry::logging::attach(
        telemetry.tracer().expect("tracing on")
    ));
    tracing::info_span!("bridge_check", job = "test").in_scope(|| {
        tracing::info!(step = 1, "inside the span");
    });
    attrstream::telemetry::logging::detach();
    telemetry.shutdown();
    let spans = receiver.spans();
    let span = spans.iter().find(|s| s.name == "bridge_check").unwrap_or_else(|| {
        panic!(
            "no bridged span among {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    });
    assert!(
        span.events.iter().any(|e| e.name == "inside the span"),
        "log lines become span events: {:?}",
        span.events
    );
    assert!(span.attributes.iter().any(|kv| kv.key == "job"));
}
