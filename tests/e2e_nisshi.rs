//! End to end against a separate Kafka-protocol broker process (nisshi), with the real
//! `attrstream` binary and the real SSD MobileNetV2 model, as an operator would run it:
//! events published with `attrstream publish`, `attrstream serve` configured by a TOML file
//! and environment variables, output read back by an independent client (Python
//! confluent-kafka + fastavro with the .avsc files). A serve killed with SIGKILL mid-stream
//! and restarted loses nothing; SIGTERM drains, commits and exits 0; two serve processes in
//! one group split the partitions.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attrstream::events::codec::encode_event;
use attrstream::events::wire::frame;
use attrstream::events::{ImageSource, ProductImageEvent};
use common::kafka::{committed_offsets, end_offsets, produce_raw};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::Value;

const IN: &str = "product-images";
const OUT: &str = "product-attributes";
const DLQ: &str = "product-images-dlq";

/// The nisshi broker binary: `NISSHI`, else ~/.cargo/bin/nisshi, else PATH.
fn nisshi_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NISSHI") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin/nisshi");
    if home.exists() {
        return home;
    }
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("nisshi"))
                .find(|p| p.exists())
        })
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!("the nisshi broker is not installed: run `scripts/setup --test` (cargo install nisshi)")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A nisshi broker process with in-memory storage, killed on drop.
struct Broker {
    child: Child,
    url: String,
}

impl Broker {
    fn start(topics: &[(&str, i32)]) -> Self {
        let port = free_port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(nisshi_binary())
            .args([
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .args([
                "--storage-engine",
                "memory://nisshi/",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nisshi");
        let url = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&url).is_err() {
            assert!(Instant::now() < deadline, "nisshi did not listen on {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let broker = Self { child, url };
        broker.create_topics(topics);
        broker
    }

    fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.url)
            .create()
            .unwrap();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let results = rt
            .block_on(admin.create_topics(&new, &AdminOptions::new()))
            .expect("create topics");
        for r in results {
            r.expect("topic created");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service's TOML configuration for this broker (schema ids fixed, no registry).
fn write_config(dir: &Path, brokers: &str, group: &str) -> PathBuf {
    let samples = common::root().join("assets/samples");
    let text = format!(
        r#"
[kafka]
bootstrap_servers = "{brokers}"
group_id = "{group}"
commit_interval = "500ms"
[kafka.consumer_options]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[schemas]
input_schema_id = 1
output_schema_id = 2
dead_letter_schema_id = 3
[fetch]
file_root = "{samples}"
[batch]
max_batch_size = 4
max_wait = "20ms"
[model]
weights = "{weights}"
devices = ["cpu"]
[pipeline]
shutdown_deadline = "30s"
[telemetry]
listen = "127.0.0.1:0"  # several serve processes run at once: any free port each
"#,
        samples = samples.display(),
        weights = common::root()
            .join("models/ssd_mobilenet_v2_coco.safetensors")
            .display(),
    );
    let path = dir.join(format!("{group}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `attrstream serve` whose stderr is collected.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_attrstream"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("ATTRSTREAM_THREADS", "1")
            .current_dir(common::root())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start attrstream serve");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns the exit status and the log.
    fn terminate(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // let the log reader finish
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("serve did not exit within {within:?} of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Publishes `n` events from the sample photos with `attrstream publish` (half inline, half
/// as file URIs), returns their event ids by product id.
fn publish(brokers: &str, n: usize, prefix: &str) -> HashMap<String, String> {
    let samples = common::root().join("assets/samples");
    let photos = ["coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg"];
    let mut ids = HashMap::new();
    for i in 0..n {
        let product = format!("{prefix}-{i}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_attrstream"));
        cmd.args(["publish", "--brokers", brokers, "--set", "schemas.input_schema_id=1"])
            .args([
                "--set",
                "schemas.output_schema_id=2",
                "--set",
                "schemas.dead_letter_schema_id=3",
            ])
            .args(["--product-id", &product])
            .arg(samples.join(photos[i % photos.len()]));
        if i % 2 == 1 {
            cmd.arg("--uri");
        }
        let out = cmd.output().expect("attrstream publish");
        assert!(
            out.status.success(),
            "publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: Value = serde_json::from_slice(&out.stdout).expect("publish prints JSON");
        ids.insert(product, line["event_id"].as_str().unwrap().to_string());
    }
    ids
}

/// Reads the topics with the independent Python client; one JSON value per record.
fn read_independently(brokers: &str, count: usize, timeout_secs: u64) -> Vec<Value> {
    let out = Command::new(common::python())
        .arg(common::root().join("tests/reference/kafka_e2e_consume.py"))
        .args([brokers, &common::root().join("schemas").to_string_lossy()])
        .args([&count.to_string(), &timeout_secs.to_string()])
        .args([
            format!("{OUT}=product_attributes.avsc"),
            format!("{DLQ}=dead_letter.avsc"),
        ])
        .output()
        .expect("run the Python reader");
    assert!(
        out.status.success(),
        "reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the output topic holds at least `n` records (cheap check via watermarks).
fn wait_for_outputs(brokers: &str, partitions: i32, n: i64, within: Duration, serve: &Serve) {
    let deadline = Instant::now() + within;
    loop {
        let total: i64 = end_offsets(brokers, OUT, partitions).values().sum();
        if total >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {total} of {n} outputs after {within:?}:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sigkill_mid_stream_then_restart_loses_nothing() {
    let broker = Broker::start(&[(IN, 2), (OUT, 2), (DLQ, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.url, "e2e-kill");
    let mut ids = publish(&broker.url, 24, "kill");
    // Two poison messages published by a plain client.
    produce_raw(&broker.url, IN, &[(b"garbage".to_vec(), b"not an event".to_vec())]);
    let bad_url = ProductImageEvent {
        event_id: "evt-bad-url".into(),
        product_id: "bad-url".into(),
        image: ImageSource::Uri("http://127.0.0.1:1/x.png".into()),
        content_type: None,
        metadata: Default::default(),
        event_time_ms: None,
    };
    produce_raw(
        &broker.url,
        IN,
        &[(b"bad-url".to_vec(), frame(1, &encode_event(&bad_url)))],
    );
    ids.insert("bad-url".into(), "evt-bad-url".into());

    let first = Serve::start(&config);
    wait_for_outputs(&broker.url, 2, 6, Duration::from_secs(180), &first);
    first.kill(); // SIGKILL: no drain, no commit beyond what was committed

    let second = Serve::start(&config);
    wait_for_outputs(&broker.url, 2, 24, Duration::from_secs(180), &second);
    std::thread::sleep(Duration::from_secs(2)); // let the dead letters and commits settle
    let (status, log) = second.terminate(Duration::from_secs(40));
    assert!(status.success(), "serve exits 0 after SIGTERM: {status:?}\n{log}");
    assert!(log.contains("stopped"), "{log}");

    let out_total: i64 = end_offsets(&broker.url, OUT, 2).values().sum();
    let dlq_total: i64 = end_offsets(&broker.url, DLQ, 1).values().sum();
    let records = read_independently(&broker.url, (out_total + dlq_total) as usize, 60);
    let mut produced: HashMap<String, usize> = HashMap::new();
    let mut dead: HashMap<String, String> = HashMap::new();
    for r in &records {
        let rec = &r["record"];
        if r["topic"] == OUT {
            assert_eq!(r["schema_id"], 2);
            *produced
                .entry(rec["event_id"].as_str().unwrap().to_string())
                .or_default() += 1;
            assert_eq!(r["key"], rec["product_id"], "key = product id");
            assert_eq!(rec["model"]["name"], "ssd_mobilenet_v2_coco");
        } else {
            assert_eq!(r["schema_id"], 3);
            dead.insert(
                r["key"].as_str().unwrap_or_default().to_string(),
                rec["error_kind"].as_str().unwrap().into(),
            );
        }
    }
    for (product, event_id) in &ids {
        if product == "bad-url" {
            continue;
        }
        assert!(produced.contains_key(event_id), "{product} ({event_id}) lost");
    }
    assert_eq!(dead.get("garbage").map(String::as_str), Some("bad_framing"));
    assert_eq!(dead.get("bad-url").map(String::as_str), Some("blocked_address"));
    let duplicates: usize = produced.values().map(|c| c - 1).sum();
    eprintln!("duplicates after SIGKILL: {duplicates} (uncommitted work redone)");
    // Real photos give real labels.
    let by_product: HashMap<&str, &Value> = records
        .iter()
        .filter(|r| r["topic"] == OUT)
        .map(|r| (r["record"]["product_id"].as_str().unwrap(), &r["record"]))
        .collect();
    let labels = |p: &str| -> HashSet<String> {
        by_product[p]["attributes"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["label"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(labels("kill-0").contains("cup"), "coffee.png: {:?}", labels("kill-0"));
    assert!(labels("kill-1").contains("cat"), "chelsea.png: {:?}", labels("kill-1"));
    assert_eq!(
        committed_offsets(&broker.url, "e2e-kill", IN, 2),
        end_offsets(&broker.url, IN, 2)
    );
}

#[test]
fn two_serve_processes_split_the_partitions() {
    let broker = Broker::start(&[(IN, 4), (OUT, 2), (DLQ, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.url, "e2e-split");
    let a = Serve::start(&config);
    let b = Serve::start(&config);
    std::thread::sleep(Duration::from_secs(8)); // both load the model and join
    let ids = publish(&broker.url, 24, "split");
    wait_for_outputs(&broker.url, 2, 24, Duration::from_secs(180), &a);
    let (sa, la) = a.terminate(Duration::from_secs(40));
    let (sb, lb) = b.terminate(Duration::from_secs(40));
    assert!(sa.success() && sb.success());
    let consumed = |log: &str| -> u64 {
        let line = log.lines().rev().find(|l| l.contains("stopped")).unwrap_or_default();
        line.split("consumed=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    assert!(consumed(&la) > 0 && consumed(&lb) > 0, "both got work:\n{la}\n{lb}");
    let records = read_independently(&broker.url, 24, 60);
    let seen: HashSet<String> = records
        .iter()
        .map(|r| r["record"]["event_id"].as_str().unwrap().to_string())
        .collect();
    for event_id in ids.values() {
        assert!(seen.contains(event_id), "{event_id} missing");
    }
}
