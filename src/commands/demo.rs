//! `attrstream demo`: the whole service on one machine with no Kafka to install.
//!
//! Starts an in-process Kafka-protocol broker, publishes the sample photos (some inline,
//! some as file URIs, plus two broken events) to the input topic, runs the same pipeline as
//! `serve`, prints each attribute record as it arrives on the output topic (read back by an
//! ordinary Kafka consumer), writes annotated images, then shuts down gracefully.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio::sync::oneshot;

use crate::cli::DemoArgs;
use crate::commands::publish::{event_for_image, publish_events};
use crate::commands::tail::decode_json;
use crate::config::Config;
use crate::detection::Detection;
use crate::embedded_broker::EmbeddedBroker;
use crate::events::{DeadLetter, ImageSource, ProductAttributes, ProductImageEvent};
use crate::pipeline::producer_properties;
use crate::serve::{configured_devices, detector_inference, runtime, shutdown_signal};
use crate::sink::create_producer;
use crate::telemetry::http::HttpServer;
use crate::telemetry::{device_memory, Telemetry};

const INPUT: &str = "product-images";
const OUTPUT: &str = "product-attributes";
const DEAD_LETTERS: &str = "product-images-dlq";
const SAMPLES: &str = "assets/samples";

/// Runs the demo; exit code 1 if not every event came back within the timeout.
pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let images = demo_images(&args.images)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let broker = EmbeddedBroker::start(1, &[(INPUT, 2), (OUTPUT, 2), (DEAD_LETTERS, 1)])?;
    let file_root = std::fs::canonicalize(images[0].parent().unwrap_or(Path::new(".")))?;
    let config = demo_config(&broker, &args, &file_root)?;
    let (events, sources) = demo_events(&images, &file_root, args.with_bad_events)?;
    let (inference, model) = detector_inference(&config)?;
    eprintln!(
        "attrstream demo: in-process Kafka broker at {}, model {} ({}), {} worker(s); publishing {} events",
        broker.bootstrap_servers(),
        model.name,
        model.version,
        inference.workers,
        events.len()
    );
    let started = Instant::now();
    let expected = events.len();
    let out = args.out.clone();
    let json = args.json;
    let timeout = Duration::from_secs(args.timeout_secs);
    let telemetry = Telemetry::for_command(&config.telemetry)?;
    let _device_memory = device_memory::watch(&configured_devices(&config)?, telemetry.metrics());
    let pipeline_telemetry = telemetry.clone();
    let outcome = runtime()?.block_on(async move {
        let telemetry = pipeline_telemetry;
        let _server = match config.telemetry.listen_addr()? {
            Some(addr) => {
                let server = HttpServer::start(telemetry.clone(), addr).await?;
                eprintln!(
                    "attrstream demo: metrics at http://{0}/metrics, probes at http://{0}/healthz and /readyz",
                    server.addr()
                );
                Some(server)
            }
            None => None,
        };
        let producer = create_producer(&producer_properties(&config))?;
        publish_events(&producer, INPUT, config.schemas.input_schema_id, &events).await?;
        let (done_tx, done_rx) = oneshot::channel();
        let watcher = tokio::spawn(watch_outputs(
            config.kafka.bootstrap_servers.clone(),
            expected,
            sources,
            out,
            json,
            done_tx,
        ));
        let shutdown = async move {
            tokio::select! {
                _ = done_rx => {}
                _ = tokio::time::sleep(timeout) => eprintln!("attrstream demo: timed out after {timeout:?}"),
                _ = shutdown_signal() => {}
            }
        };
        let report = crate::pipeline::run_with_telemetry(config, inference, telemetry, shutdown).await?;
        watcher.abort();
        let seen = watcher.await.ok().and_then(|r| r.ok()).unwrap_or(expected);
        Ok::<_, anyhow::Error>((report, seen))
    });
    telemetry.finish();
    let (report, seen) = outcome?;
    eprintln!(
        "attrstream demo: {} attribute records, {} dead letters {:?}, mean batch {:.2}, {:.1} s; \
         annotated images and records.jsonl in {}",
        report.produced,
        report.dead_lettered.values().sum::<u64>(),
        report.dead_lettered,
        report.batches.mean_batch_size(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    let done = report.produced + report.dead_lettered.values().sum::<u64>();
    Ok(if done as usize == expected && seen == expected {
        ExitCode::SUCCESS
    } else {
        eprintln!("attrstream demo: expected {expected} records, the service finished {done}");
        ExitCode::from(1)
    })
}

fn demo_images(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(SAMPLES)
        .with_context(|| format!("cannot list {SAMPLES}: run the demo from the repository root or pass images"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase)
                    .as_deref(),
                Some("png" | "jpg" | "jpeg" | "webp")
            )
        })
        .collect();
    found.sort();
    if found.is_empty() {
        bail!("no images in {SAMPLES}: pass image files to `attrstream demo`");
    }
    Ok(found)
}

fn demo_config(broker: &EmbeddedBroker, args: &DemoArgs, file_root: &Path) -> Result<Config> {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = broker.bootstrap_servers().to_string();
    config.kafka.group_id = "attrstream-demo".into();
    config.kafka.input_topic = INPUT.into();
    config.kafka.output_topic = OUTPUT.into();
    config.kafka.dead_letter_topic = DEAD_LETTERS.into();
    config.schemas.input_schema_id = Some(1);
    config.schemas.output_schema_id = Some(2);
    config.schemas.dead_letter_schema_id = Some(3);
    config.fetch.file_root = Some(file_root.to_path_buf());
    config.model.devices = args.devices.clone();
    config.model.weights = args.weights.clone();
    config.pipeline.shutdown_deadline = Duration::from_secs(30);
    config.telemetry.listen = args.telemetry_listen.clone();
    config.validate()?;
    Ok(config)
}

/// The events (every other image by file URI) and, per product id, the local file to annotate.
fn demo_events(
    images: &[PathBuf],
    file_root: &Path,
    with_bad: bool,
) -> Result<(Vec<ProductImageEvent>, HashMap<String, PathBuf>)> {
    let mut events = Vec::new();
    let mut sources = HashMap::new();
    for (i, path) in images.iter().enumerate() {
        let in_root = std::fs::canonicalize(path)
            .map(|p| p.starts_with(file_root))
            .unwrap_or(false);
        let event = event_for_image(path, in_root && i % 2 == 1, None)?;
        sources.insert(event.product_id.clone(), path.clone());
        events.push(event);
    }
    if with_bad {
        let mut corrupt = event_for_image(&images[0], false, Some("broken-upload"))?;
        if let ImageSource::Inline(bytes) = &mut corrupt.image {
            bytes.truncate(bytes.len().min(200));
        }
        let mut blocked = event_for_image(&images[0], false, Some("internal-url"))?;
        blocked.image = ImageSource::Uri("http://169.254.169.254/latest/meta-data/".into());
        events.push(corrupt);
        events.push(blocked);
    }
    Ok((events, sources))
}

/// Reads the output and dead-letter topics like any downstream consumer would, prints and
/// annotates each record, and signals once `expected` records arrived.
async fn watch_outputs(
    brokers: String,
    expected: usize,
    sources: HashMap<String, PathBuf>,
    out: PathBuf,
    print_json: bool,
    done: oneshot::Sender<()>,
) -> Result<usize> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "attrstream-demo-reader")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[OUTPUT, DEAD_LETTERS])?;
    let mut records = std::fs::File::create(out.join("records.jsonl"))?;
    let mut seen = 0;
    while seen < expected {
        let msg = consumer.recv().await?;
        let dead = msg.topic() == DEAD_LETTERS;
        let json = decode_json(msg.payload().unwrap_or_default(), dead, None).await?;
        if print_json {
            println!("{json}");
        }
        writeln!(records, "{json}")?;
        if dead {
            let letter: DeadLetter = serde_json::from_value(json)?;
            let line = format!(
                "dead letter  {:<16} {}: {}",
                letter.product_id.unwrap_or_default(),
                letter.error_kind,
                letter.error_message
            );
            if !print_json {
                println!("{line}");
            }
        } else {
            let record: ProductAttributes = serde_json::from_value(json)?;
            if !print_json {
                println!("attributes   {}", summary(&record));
            }
            if let Some(path) = sources.get(&record.product_id) {
                if let Err(e) = annotate_file(path, &record, &out) {
                    eprintln!("  (could not annotate {}: {e:#})", path.display());
                }
            }
        }
        seen += 1;
    }
    let _ = done.send(());
    Ok(seen)
}

/// One line per record: labels with scores, the main object's colours, latency.
fn summary(r: &ProductAttributes) -> String {
    let labels: Vec<String> = r
        .attributes
        .labels
        .iter()
        .map(|l| {
            format!(
                "{} {:.2}{}",
                l.label,
                l.max_score,
                if l.count > 1 {
                    format!(" ×{}", l.count)
                } else {
                    String::new()
                }
            )
        })
        .collect();
    let main = r.attributes.main_object.as_ref().map(|m| {
        let colours: Vec<&str> = r
            .attributes
            .object_colours
            .iter()
            .find(|c| c.detection_index == m.detection_index)
            .map(|c| c.colours.iter().map(|c| c.name.as_str()).collect())
            .unwrap_or_default();
        format!("main: {} [{}]", m.label, colours.join(", "))
    });
    format!(
        "{:<16} {}x{}  {}  {}  {:.0} ms",
        r.product_id,
        r.image_width,
        r.image_height,
        if labels.is_empty() {
            "(nothing detected)".to_string()
        } else {
            labels.join(", ")
        },
        main.unwrap_or_default(),
        r.timings.total_ms
    )
}

fn annotate_file(path: &Path, record: &ProductAttributes, out: &Path) -> Result<()> {
    let bytes = std::fs::read(path)?;
    let image = crate::preprocess::decode_image(&bytes, crate::preprocess::DEFAULT_MAX_PIXELS)?;
    let detections: Vec<Detection> = record
        .detections
        .iter()
        .map(|d| Detection {
            label: d.label.clone(),
            label_id: d.label_id as i64,
            score: d.score,
            box_px: [d.box_px.x_min, d.box_px.y_min, d.box_px.x_max, d.box_px.y_max],
            box_norm: [d.box_norm.x_min, d.box_norm.y_min, d.box_norm.x_max, d.box_norm.y_max],
        })
        .collect();
    let annotated = crate::annotate::annotate(&image, &detections);
    annotated.save(out.join(format!("{}.png", record.product_id)))?;
    Ok(())
}
