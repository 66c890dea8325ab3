//! The serve pipeline end to end through Kafka (the in-process broker), three figures:
//!
//! 1. **Throughput against the bare detector.** The sample photos are published inline as M
//!    Confluent-framed events before the service starts; the service (`pipeline::run` with
//!    the same worker factory `serve` uses) works off that backlog, and a reader consumer
//!    timestamps each output record as it arrives. The bare detector is the service's own
//!    worker pool with the same factory (same devices, threads and warm-up), fed batches of
//!    the same photos, already decoded, at `batch.max_batch_size`; half of its batches run
//!    before and half after the pipeline, each half on a replica of its own that is stopped
//!    before anything else runs. Printed: both imgs/s and pipeline ÷ bare (goal ≥ 0.95).
//! 2. **The pipeline's own ceiling.** Tiny inline PNGs and an identity inference step that
//!    lives only in this file: everything but the model, in msgs/s (goal ≥ 20,000 on 2
//!    cores).
//! 3. **Latency at half capacity.** With the real model, a producer thread publishes at
//!    0.5 × the throughput of step 1 for a fixed time, stamping each event with its send
//!    time; latency is the output record's arrival at the reader minus that send time
//!    (same clock, same process). Printed: p50, p99, max and the count.
//!
//! The pipeline's throughput is measured in the steady state: from the moment the batch
//! holding the K-th output record (K = 10% of M, at least 2 batches) has been read back, to
//! the last record, counting the records read in between. That excludes model loading, the
//! group join and the first, cold batches (the bare detector is warmed up before timing).
//! Under the table come what the output records say (batches, model time inside the
//! pipeline, stage timings) and, for the ceiling, the CPU the process used by thread.
//!
//! libtorch's CPU speed depends on other work on the cores (libgomp spins between parallel
//! regions unless `OMP_WAIT_POLICY=passive`), so the machine's load average and CPU pressure
//! are printed with the figures.
//!
//! Run: `scripts/bench-pipeline` (or `cargo bench --bench pipeline`). Environment:
//! `BENCH_DEVICES` (default `cpu`; e.g. `cuda:0,cuda:0` for two workers on one GPU),
//! `BENCH_THREADS` (libtorch threads per CPU worker; default as `serve`: cores ÷ CPU
//! workers), `BENCH_EVENTS` (M, default 160 on the CPU, 2000 with a GPU), `BENCH_BATCH`
//! (default 8, the service default), `BENCH_MAX_WAIT_MS` (default 10),
//! `BENCH_LATENCY_SECS` (default 20), `BENCH_CEILING_EVENTS` (default 100,000),
//! `BENCH_CEILING_PARTITIONS` (default 8), `BENCH_CEILING_BATCH` (default 64),
//! `BENCH_CEILING_IN_FLIGHT` (default 512, the service default), `BENCH_DECODE_THREADS` (default 0 = one per
//! core), `BENCH_PHASES` (default `throughput,latency,ceiling`; add `breakdown` for each
//! stage of the ceiling measured alone). Needs the SSD model that
//! `scripts/setup` converts (or Faster R-CNN weights), no Python.
//!
//! The mock broker answers an empty fetch only after the consumer's `fetch.wait.max.ms`
//! (500 ms by default) even when data arrives meanwhile, which a real broker does not; the
//! service's consumer and the reader therefore run with `fetch.wait.max.ms = 10`.
//!
//! The ceiling runs with the service's default `pipeline.max_in_flight` (512). At the limit
//! the consumer waits for completions rather than pausing its partitions: a pause costs about
//! 0.9 s before fetching resumes (`BENCH_PHASES=breakdown` measures that delay alone), which
//! capped an earlier version at about `max_in_flight` msgs/s.
//!
//! Exits 1 when records are missing, dead-lettered or a phase fails or times out.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use attrstream::config::{available_cores, Config};
use attrstream::detection::ImageDetections;
use attrstream::embedded_broker::EmbeddedBroker;
use attrstream::events::codec::{decode_attributes, encode_event, product_attributes_schema};
use attrstream::events::wire::{frame, unframe};
use attrstream::events::{ImageSource, ModelRef, ProductAttributes, ProductImageEvent};
use attrstream::pipeline::{Inference, RunReport};
use attrstream::preprocess::{decode_image, DEFAULT_MAX_PIXELS};
use attrstream::serve::detector_inference;
use attrstream::workers::{BackendFactory, InferenceBackend};
use image::RgbImage;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

#[allow(dead_code)]
mod common;

/// Input topic of every phase.
const IN: &str = "bench-images";
/// Output topic of every phase.
const OUT: &str = "bench-attributes";
/// Dead-letter topic of every phase.
const DLQ: &str = "bench-dead-letters";
/// Confluent schema ids (no registry: fixed ids, as in the tests and the demo).
const INPUT_SCHEMA_ID: u32 = 1;
/// Schema id of output records.
const OUTPUT_SCHEMA_ID: u32 = 2;
/// Schema id of dead letters.
const DEAD_LETTER_SCHEMA_ID: u32 = 3;
/// Metadata key carrying the send time (µs since the epoch) of latency-phase events.
const SENT_US: &str = "bench_sent_us";
/// The phases `BENCH_PHASES` may name.
const PHASES: [&str; 4] = ["throughput", "latency", "ceiling", "breakdown"];
/// Input bytes per partition kept below this, far from the mock broker's 5 MiB per partition.
const BYTES_PER_PARTITION: usize = 2 << 20;
/// The mock broker's wait on an empty fetch, lowered from librdkafka's 500 ms (see the top).
const FETCH_WAIT_MS: &str = "10";

/// What the environment asks for.
#[derive(Debug, Clone)]
struct Settings {
    /// `model.devices` entries, one worker each.
    devices: Vec<String>,
    /// libtorch threads per CPU worker (0 = the service's rule, cores ÷ CPU workers).
    threads: usize,
    /// Events of the throughput phase (M).
    events: usize,
    /// `batch.max_batch_size` for the real model, and the bare detector's batch size.
    batch: usize,
    /// `batch.max_wait`.
    max_wait: Duration,
    /// Seconds of paced traffic in the latency phase.
    latency_secs: u64,
    /// Events of the ceiling phase.
    ceiling_events: usize,
    /// Input partitions of the ceiling phase.
    ceiling_partitions: i32,
    /// `batch.max_batch_size` of the ceiling phase.
    ceiling_batch: usize,
    /// `pipeline.max_in_flight` of the ceiling phase.
    ceiling_in_flight: usize,
    /// `decode.threads` (0 = one per core).
    decode_threads: usize,
    /// Which phases run.
    phases: Vec<String>,
}

impl Settings {
    /// Reads the `BENCH_*` variables.
    fn from_env() -> Self {
        let devices: Vec<String> = std::env::var("BENCH_DEVICES")
            .unwrap_or_else(|_| "cpu".into())
            .split(',')
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty())
            .collect();
        let gpu = devices.iter().any(|d| d.starts_with("cuda") || d == "auto");
        let phases = std::env::var("BENCH_PHASES")
            .unwrap_or_else(|_| "throughput,latency,ceiling".into())
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        Self {
            devices,
            threads: common::env_or("BENCH_THREADS", 0),
            events: common::env_or("BENCH_EVENTS", if gpu { 2000 } else { 160 }).max(8),
            batch: common::env_or("BENCH_BATCH", 8).max(1),
            max_wait: Duration::from_millis(common::env_or("BENCH_MAX_WAIT_MS", 10) as u64),
            latency_secs: common::env_or("BENCH_LATENCY_SECS", 20).max(1) as u64,
            ceiling_events: common::env_or("BENCH_CEILING_EVENTS", 100_000).max(100),
            ceiling_partitions: common::env_or("BENCH_CEILING_PARTITIONS", 8).max(1) as i32,
            ceiling_batch: common::env_or("BENCH_CEILING_BATCH", 64).max(1),
            ceiling_in_flight: common::env_or("BENCH_CEILING_IN_FLIGHT", 512).max(1),
            decode_threads: common::env_or("BENCH_DECODE_THREADS", 0),
            phases,
        }
    }

    /// True when `phase` is to run.
    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    /// libtorch threads each CPU worker gets (what `serve::detector_inference` will use).
    fn resolved_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        let cpu_workers = self.devices.iter().filter(|d| d.as_str() == "cpu").count().max(1);
        (available_cores() / cpu_workers).max(1)
    }

    /// The `BENCH_*`, `ATTRSTREAM_*__*` and OpenMP variables that were set, as a command prefix.
    fn command(&self) -> String {
        let mut set: Vec<String> = std::env::vars()
            .filter(|(k, _)| {
                k.starts_with("BENCH_")
                    || (k.starts_with("ATTRSTREAM_") && k.contains("__"))
                    || k.starts_with("OMP_")
                    || k.starts_with("GOMP_")
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        set.sort();
        set.push("scripts/bench-pipeline".into());
        set.join(" ")
    }
}

/// The service configuration every phase starts from: the in-process broker, fixed schema
/// ids, the devices and batching of `settings`.
fn base_config(brokers: &str, settings: &Settings) -> Result<Config> {
    // The service's own layering, so `ATTRSTREAM_*__*` variables reach every knob not set below.
    let ids = [
        ("schemas.input_schema_id", INPUT_SCHEMA_ID),
        ("schemas.output_schema_id", OUTPUT_SCHEMA_ID),
        ("schemas.dead_letter_schema_id", DEAD_LETTER_SCHEMA_ID),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let mut c = Config::load(None, &ids).context("configuration from ATTRSTREAM_* variables")?;
    c.kafka.bootstrap_servers = brokers.to_string();
    c.kafka.group_id = "attrstream-bench".into();
    c.kafka.input_topic = IN.into();
    c.kafka.output_topic = OUT.into();
    c.kafka.dead_letter_topic = DLQ.into();
    c.kafka
        .consumer_options
        .entry("fetch_wait_max_ms".into())
        .or_insert_with(|| FETCH_WAIT_MS.into());
    c.schemas.registry_url = None;
    c.schemas.input_format = attrstream::config::InputFormat::Confluent;
    c.model.devices = settings.devices.clone();
    c.model.threads_per_worker = settings.threads;
    c.batch.max_batch_size = settings.batch;
    c.batch.max_wait = settings.max_wait;
    c.decode.threads = settings.decode_threads;
    c.pipeline.shutdown_deadline = Duration::from_secs(15);
    c.validate()?;
    Ok(c)
}

/// A second handle on the same workers and factory.
fn clone_inference(inference: &Inference) -> Inference {
    Inference::new(inference.workers, inference.factory.clone())
}

/// Microseconds since the Unix epoch (the clock both ends of the latency phase read).
fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A framed ProductImageEvent with `image` inline; `sent_us` stamps event time and metadata.
fn framed_event(id: &str, image: &[u8], sent_us: Option<i64>) -> Vec<u8> {
    let mut metadata = BTreeMap::new();
    if let Some(us) = sent_us {
        metadata.insert(SENT_US.to_string(), us.to_string());
    }
    let event = ProductImageEvent {
        event_id: id.to_string(),
        product_id: id.to_string(),
        image: ImageSource::Inline(image.to_vec()),
        content_type: None,
        metadata,
        event_time_ms: Some(sent_us.map(|us| us / 1000).unwrap_or_else(|| wall_us() / 1000)),
    };
    frame(INPUT_SCHEMA_ID, &encode_event(&event))
}

/// A producer for the benchmark's own input (not the service's producer).
fn bench_producer(brokers: &str, linger_ms: u32) -> Result<BaseProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "2097151")
        .set("batch.num.messages", "10000")
        .create()
        .context("cannot create the benchmark's producer")
}

/// Sends one record, waiting while librdkafka's queue is full.
fn send(producer: &BaseProducer, topic: &str, partition: i32, key: &str, value: &[u8]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record = BaseRecord::to(topic).partition(partition).key(key).payload(value);
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, _)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                if Instant::now() > deadline {
                    bail!("publishing to {topic}: the producer queue stayed full for 60 s");
                }
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => bail!("publishing to {topic}: {e}"),
        }
    }
}

/// Publishes `records` (key, framed value) round-robin over `partitions` and waits for the
/// broker's acknowledgements.
fn publish(brokers: &str, partitions: i32, records: impl Iterator<Item = (String, Vec<u8>)>) -> Result<usize> {
    let producer = bench_producer(brokers, 20)?;
    let mut n = 0;
    for (i, (key, value)) in records.enumerate() {
        send(&producer, IN, i as i32 % partitions, &key, &value)?;
        n += 1;
        if n % 1000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("publishing the input events: not acknowledged within 120 s")?;
    Ok(n)
}

/// An output or dead-letter record as the reader saw it.
struct Arrival {
    /// When the reader got it.
    at: Instant,
    /// The same moment on the wall clock, µs since the epoch.
    wall_us: i64,
    /// From the dead-letter topic.
    dead: bool,
    /// The record key (the product id).
    key: Vec<u8>,
    /// The framed Avro value.
    value: Vec<u8>,
}

impl Arrival {
    /// The decoded output record.
    fn attributes(&self) -> Result<ProductAttributes> {
        let (id, body) = unframe(&self.value).context("output record without Confluent framing")?;
        if id != OUTPUT_SCHEMA_ID {
            bail!("output record framed with schema id {id}, not {OUTPUT_SCHEMA_ID}");
        }
        decode_attributes(body, product_attributes_schema()).context("output record does not decode")
    }
}

/// A consumer thread reading the output and dead-letter topics from the beginning (assigned
/// partitions, no group join) and timestamping every record as it arrives.
struct Reader {
    /// Stop now.
    stop: Arc<AtomicBool>,
    /// Stop by itself after this many records.
    target: Arc<AtomicUsize>,
    /// Records read so far.
    seen: Arc<AtomicUsize>,
    /// The thread, returning the arrivals.
    thread: Option<JoinHandle<Result<Vec<Arrival>>>>,
}

impl Reader {
    /// Starts reading `topics` (name, partitions) on `brokers`.
    fn start(brokers: &str, topics: &[(&str, i32)]) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("bench-reader-{}", wall_us()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .create()
            .context("cannot create the reader consumer")?;
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in topics {
            for p in 0..*partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl).context("reader: cannot assign partitions")?;
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicUsize::new(usize::MAX));
        let seen = Arc::new(AtomicUsize::new(0));
        let (s, t, n) = (stop.clone(), target.clone(), seen.clone());
        let thread = std::thread::Builder::new()
            .name("bench-reader".into())
            .spawn(move || {
                let mut out = Vec::new();
                while !s.load(Ordering::Relaxed) && out.len() < t.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(50)) {
                        Some(Ok(m)) => {
                            out.push(Arrival {
                                at: Instant::now(),
                                wall_us: wall_us(),
                                dead: m.topic() == DLQ,
                                key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                                value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                            });
                            n.store(out.len(), Ordering::Relaxed);
                        }
                        Some(Err(e)) => eprintln!("bench reader: Kafka error (librdkafka retries): {e}"),
                        None => {}
                    }
                }
                Ok(out)
            })
            .context("cannot start the reader thread")?;
        Ok(Self {
            stop,
            target,
            seen,
            thread: Some(thread),
        })
    }

    /// Records read so far.
    fn seen(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }

    /// Lets the thread stop by itself once `n` records are in.
    fn set_target(&self, n: usize) {
        self.target.store(n, Ordering::Relaxed);
    }

    /// Stops the thread and returns what it read.
    fn finish(mut self) -> Result<Vec<Arrival>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))?,
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for Reader {
    /// A reader dropped on an error path stops instead of polling forever.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The service (`pipeline::run`) on its own thread and runtime, as `serve` runs it.
struct Service {
    /// Resolves the shutdown future.
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The run's result, once it returns.
    done: mpsc::Receiver<Result<RunReport>>,
}

impl Service {
    /// Starts `pipeline::run(config, inference, …)`.
    fn start(config: Config, inference: Inference) -> Result<Self> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("bench-service".into())
            .spawn(move || {
                let result = attrstream::serve::runtime().and_then(|rt| {
                    rt.block_on(attrstream::pipeline::run(config, inference, async {
                        let _ = rx.await;
                    }))
                });
                let _ = done_tx.send(result);
            })
            .context("cannot start the service thread")?;
        Ok(Self {
            shutdown: Some(tx),
            done,
        })
    }

    /// An error if the service has already stopped (it should run until told to stop).
    fn check_running(&self) -> Result<()> {
        match self.done.try_recv() {
            Ok(Ok(report)) => bail!("the service stopped on its own: {report:?}"),
            Ok(Err(e)) => Err(e.context("the service failed")),
            Err(mpsc::TryRecvError::Empty) => Ok(()),
            Err(mpsc::TryRecvError::Disconnected) => bail!("the service thread died"),
        }
    }

    /// Asks for a graceful stop and waits up to `timeout` for the run's report.
    fn stop(mut self, timeout: Duration) -> Result<RunReport> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.done.recv_timeout(timeout) {
            Ok(result) => result.context("the service failed"),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("the service did not stop within {timeout:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the service thread died"),
        }
    }
}

impl Drop for Service {
    /// A service dropped on an error path is told to stop (it drains and exits by itself).
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits until the reader has `n` records; fails with a clear message on timeout or when the
/// service stops early. `what` names the phase.
fn wait_for(reader: &Reader, service: &Service, n: usize, timeout: Duration, what: &str) -> Result<()> {
    let started = Instant::now();
    let mut last_report = Instant::now();
    while reader.seen() < n {
        service.check_running()?;
        if started.elapsed() > timeout {
            bail!(
                "{what}: timed out after {:.0} s with {} of {n} records read back",
                timeout.as_secs_f64(),
                reader.seen()
            );
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {what}: {} of {n} records after {:.0} s",
                reader.seen(),
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Checks that every key in `expected` came back exactly once on the output topic and that
/// nothing was dead-lettered.
fn check_complete(arrivals: &[Arrival], expected: &HashSet<String>) -> Result<()> {
    let dead: Vec<&Arrival> = arrivals.iter().filter(|a| a.dead).collect();
    if !dead.is_empty() {
        bail!(
            "{} events were dead-lettered (first key {})",
            dead.len(),
            String::from_utf8_lossy(&dead[0].key)
        );
    }
    let mut seen = HashSet::new();
    for a in arrivals {
        let key = String::from_utf8_lossy(&a.key).into_owned();
        if expected.contains(&key) && !seen.insert(key.clone()) {
            bail!("output for {key} arrived twice");
        }
    }
    let missing = expected.len() - seen.len();
    if missing > 0 {
        bail!("{missing} of {} output records are missing", expected.len());
    }
    Ok(())
}

/// Steady-state throughput from output arrivals.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    /// Records per second.
    per_s: f64,
    /// Records counted.
    records: usize,
    /// Seconds of the window.
    secs: f64,
}

/// Records per second from the end of the batch that holds the `skip`-th arrival to the last
/// arrival. Records of one batch share `timings.inference_ms` to the nanosecond, which
/// identifies the batch; starting at a batch boundary keeps a batch's records from being
/// counted without its processing time.
fn steady_throughput(arrivals: &[Arrival], skip: usize, lookahead: usize) -> Result<Throughput> {
    let outputs: Vec<&Arrival> = arrivals.iter().filter(|a| !a.dead).collect();
    if outputs.len() < 3 {
        bail!("too few output records ({}) to measure throughput", outputs.len());
    }
    let k = skip.clamp(1, outputs.len() - 2);
    let batch = outputs[k].attributes()?.timings.inference_ms.to_bits();
    let mut start = k;
    for (i, a) in outputs.iter().enumerate().skip(k + 1).take(lookahead) {
        if a.attributes()?.timings.inference_ms.to_bits() == batch {
            start = i;
        }
    }
    let last = outputs.len() - 1;
    if start >= last {
        start = k;
    }
    let secs = outputs[last].at.duration_since(outputs[start].at).as_secs_f64();
    let records = last - start;
    Ok(Throughput {
        per_s: records as f64 / secs.max(1e-9),
        records,
        secs,
    })
}

/// The sample photos: encoded bytes (what events carry) and decoded images (what the bare
/// detector gets).
struct Photos {
    /// File bytes, in the order of `common::sample_paths`.
    encoded: Vec<Vec<u8>>,
    /// Decoded (EXIF-oriented) RGB images.
    decoded: Vec<RgbImage>,
}

impl Photos {
    /// Reads and decodes assets/samples.
    fn load() -> Result<Self> {
        let mut encoded = Vec::new();
        let mut decoded = Vec::new();
        let paths: Vec<std::path::PathBuf> = common::sample_paths()
            .iter()
            .map(|p| std::path::Path::new("assets/samples").join(p.file_name().unwrap_or_default()))
            .collect();
        for path in paths {
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            decoded.push(
                decode_image(&bytes, DEFAULT_MAX_PIXELS).with_context(|| format!("decoding {}", path.display()))?,
            );
            encoded.push(bytes);
        }
        Ok(Self { encoded, decoded })
    }

    /// Mean encoded size.
    fn mean_bytes(&self) -> usize {
        self.encoded.iter().map(Vec::len).sum::<usize>() / self.encoded.len().max(1)
    }

    /// Input partitions that keep `events` photo events well inside the mock broker's limit.
    fn partitions_for(&self, events: usize) -> i32 {
        (events * self.mean_bytes()).div_ceil(BYTES_PER_PARTITION).clamp(4, 512) as i32
    }
}

/// The bare detector: the service's own worker pool (`workers::WorkerPool`, one thread per
/// configured device, each building its backend with the factory `serve` uses and warming it
/// up as the service does), fed batches of already-decoded photos as fast as it takes them.
/// No Kafka, no decoding, no colours: only what the model costs.
struct BareDetector {
    /// The async runtime that dispatches batches (the pool's API is async).
    rt: tokio::runtime::Runtime,
    /// The workers.
    pool: Arc<attrstream::workers::WorkerPool<usize>>,
    /// Finished batches.
    results: tokio::sync::mpsc::UnboundedReceiver<attrstream::workers::WorkResult<usize>>,
    /// The batches to cycle through (every photo in turn).
    batches: Vec<Vec<RgbImage>>,
}

impl BareDetector {
    /// Starts the workers and runs two batches per worker to warm them up.
    fn start(inference: &Inference, photos: &[RgbImage], batch: usize) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (tx, results) = tokio::sync::mpsc::unbounded_channel();
        let pool = Arc::new(attrstream::workers::WorkerPool::start(
            inference.workers,
            inference.factory.clone(),
            0,
            tx,
        )?);
        let batches = (0..photos.len())
            .map(|offset| {
                (0..batch)
                    .map(|j| photos[(offset + j) % photos.len()].clone())
                    .collect()
            })
            .collect();
        let mut bare = Self {
            rt,
            pool,
            results,
            batches,
        };
        bare.run(2 * inference.workers)?;
        Ok(bare)
    }

    /// Runs `count` batches through the pool, keeping every worker's queue full; returns the
    /// images and seconds from the first dispatch to the last result, and each batch's
    /// inference seconds.
    fn run(&mut self, count: usize) -> Result<(usize, f64, Vec<f64>)> {
        let pool = self.pool.clone();
        let batches: Vec<Vec<RgbImage>> = (0..count)
            .map(|i| self.batches[i % self.batches.len()].clone())
            .collect();
        let results = &mut self.results;
        self.rt.block_on(async move {
            let started = Instant::now();
            let feeder = tokio::spawn(async move {
                for (i, images) in batches.into_iter().enumerate() {
                    let items = vec![i; images.len()];
                    pool.dispatch(attrstream::workers::WorkBatch {
                        images,
                        items,
                        closed_at: Instant::now(),
                    })
                    .await?;
                }
                Ok::<_, anyhow::Error>(())
            });
            let mut images = 0;
            let mut per_batch = Vec::with_capacity(count);
            for _ in 0..count {
                let done = tokio::time::timeout(Duration::from_secs(1800), results.recv())
                    .await
                    .map_err(|_| anyhow::anyhow!("bare detector: no result within 30 min"))?
                    .context("bare detector: the workers stopped")?;
                if let Some(Err(e)) = done.results.iter().find(|r| r.is_err()) {
                    bail!("bare detector: inference failed: {e}");
                }
                images += done.images.len();
                per_batch.push(done.inference.as_secs_f64());
            }
            feeder.await.context("bare detector feeder")??;
            Ok((images, started.elapsed().as_secs_f64(), per_batch))
        })
    }

    /// Stops the workers and waits for their threads to end. Nothing of the bare detector
    /// may outlive its half: libgomp spins less while more OpenMP threads exist than cores,
    /// so an idle replica would change how the pipeline's replica runs.
    fn stop(self) {
        let Self { rt, pool, results, .. } = self;
        drop(results);
        if let Ok(pool) = Arc::try_unwrap(pool) {
            pool.shutdown();
        }
        drop(rt);
    }
}

/// Figures of phase 1.
struct ThroughputResult {
    /// Bare detector imgs/s (both halves together).
    bare: f64,
    /// Images the bare detector ran (timed).
    bare_images: usize,
    /// Pipeline throughput.
    pipeline: Throughput,
    /// The run's batching.
    report: RunReport,
    /// Input partitions.
    partitions: i32,
    /// Batches and stage timings from the output records.
    inside: InsideFigures,
}

/// Phase 1: the bare detector, then the pipeline on M photo events, then the bare detector again.
fn phase_throughput(settings: &Settings, photos: &Photos, model: &mut Option<ModelRef>) -> Result<ThroughputResult> {
    let m = settings.events;
    let partitions = photos.partitions_for(m);
    let broker = EmbeddedBroker::start(1, &[(IN, partitions), (OUT, 4), (DLQ, 1)])?;
    let config = base_config(broker.bootstrap_servers(), settings)?;
    let (inference, model_ref) = detector_inference(&config)?;
    *model = Some(model_ref);
    let workers = inference.workers;

    eprintln!(
        "phase 1: loading the bare detector ({workers} worker(s), batch {})",
        settings.batch
    );
    let mut bare = BareDetector::start(&inference, &photos.decoded, settings.batch)?;
    // Each half loads its own replica and stops it afterwards (see `BareDetector::stop`).
    let rounds = m.div_ceil(2 * settings.batch).max(2 * workers);
    let (n1, s1, b1) = bare.run(rounds)?;
    bare.stop();
    eprintln!(
        "  bare detector, first half: {n1} images in {s1:.2} s ({:.2} imgs/s; seconds per batch {b1:.3?})",
        n1 as f64 / s1,
    );

    eprintln!("phase 1: publishing {m} photo events over {partitions} partitions");
    let expected: HashSet<String> = (0..m).map(|i| format!("photo-{i}")).collect();
    publish(
        broker.bootstrap_servers(),
        partitions,
        (0..m).map(|i| {
            let key = format!("photo-{i}");
            let value = framed_event(&key, &photos.encoded[i % photos.encoded.len()], None);
            (key, value)
        }),
    )?;
    let reader = Reader::start(broker.bootstrap_servers(), &[(OUT, 4), (DLQ, 1)])?;
    reader.set_target(m);
    eprintln!("phase 1: running the pipeline");
    let service = Service::start(config.clone(), clone_inference(&inference))?;
    let expected_secs = m as f64 / (n1 as f64 / s1).max(0.01);
    let waited = wait_for(
        &reader,
        &service,
        m,
        Duration::from_secs_f64(120.0 + 5.0 * expected_secs),
        "phase 1 (pipeline throughput)",
    );
    let report = service.stop(Duration::from_secs(60));
    let arrivals = reader.finish()?;
    waited?;
    let report = report?;
    check_complete(&arrivals, &expected)?;
    let skip = (m / 10).max(2 * settings.batch * workers);
    let pipeline = steady_throughput(&arrivals, skip, 4 * settings.batch * workers)?;
    let inside = inside_figures(&arrivals)?;
    eprintln!("  pipeline batches (images, seconds): {:.3?}", inside.sizes);

    let mut bare = BareDetector::start(&inference, &photos.decoded, settings.batch)?;
    let (n2, s2, b2) = bare.run(rounds)?;
    eprintln!(
        "  bare detector, second half: {n2} images in {s2:.2} s ({:.2} imgs/s; seconds per batch {b2:.3?})",
        n2 as f64 / s2,
    );
    bare.stop();
    Ok(ThroughputResult {
        bare: (n1 + n2) as f64 / (s1 + s2),
        bare_images: n1 + n2,
        pipeline,
        report,
        partitions,
        inside,
    })
}

/// Figures of phase 3.
struct LatencyResult {
    /// Target rate, events/s.
    rate: f64,
    /// Rate actually sent.
    sent_rate: f64,
    /// Latencies in ms, sorted.
    latencies_ms: Vec<f64>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Phase 3: paced photo events at `rate` for `settings.latency_secs`, latency per record.
fn phase_latency(settings: &Settings, photos: &Photos, rate: f64) -> Result<LatencyResult> {
    let partitions = photos.partitions_for((rate * 10.0).ceil() as usize).max(8);
    let broker = EmbeddedBroker::start(1, &[(IN, partitions), (OUT, 4), (DLQ, 1)])?;
    let brokers = broker.bootstrap_servers().to_string();
    let config = base_config(&brokers, settings)?;
    let (inference, _) = detector_inference(&config)?;
    let reader = Reader::start(&brokers, &[(OUT, 4), (DLQ, 1)])?;
    eprintln!("phase 3: starting the service");
    let service = Service::start(config, inference)?;

    // Warm-up: the model loaded, the group joined, each photo once through.
    let warm = photos.encoded.len();
    publish(
        &brokers,
        partitions,
        (0..warm).map(|i| {
            let key = format!("warm-{i}");
            let value = framed_event(&key, &photos.encoded[i], None);
            (key, value)
        }),
    )?;
    let outcome = (|| {
        wait_for(&reader, &service, warm, Duration::from_secs(300), "phase 3 warm-up")?;
        let count = ((rate * settings.latency_secs as f64).round() as usize).max(1);
        eprintln!(
            "phase 3: publishing {count} events at {rate:.2}/s for {} s",
            settings.latency_secs
        );
        let producer = bench_producer(&brokers, 0)?;
        let started = Instant::now();
        let mut last_send = started;
        for i in 0..count {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let key = format!("lat-{i}");
            let value = framed_event(&key, &photos.encoded[i % photos.encoded.len()], Some(wall_us()));
            send(&producer, IN, i as i32 % partitions, &key, &value)?;
            last_send = Instant::now();
            producer.poll(Duration::ZERO);
            service.check_running()?;
        }
        let span = last_send.duration_since(started).as_secs_f64();
        let sent_rate = if count > 1 {
            (count - 1) as f64 / span.max(1e-9)
        } else {
            rate
        };
        producer
            .flush(Duration::from_secs(60))
            .context("phase 3: events not acknowledged within 60 s")?;
        reader.set_target(warm + count);
        wait_for(
            &reader,
            &service,
            warm + count,
            Duration::from_secs(120),
            "phase 3 (latency)",
        )?;
        Ok::<_, anyhow::Error>((count, sent_rate))
    })();
    let report = service.stop(Duration::from_secs(60));
    let arrivals = reader.finish()?;
    let (count, sent_rate) = outcome?;
    report?;
    let expected: HashSet<String> = (0..count).map(|i| format!("lat-{i}")).collect();
    check_complete(&arrivals, &expected)?;
    let mut latencies_ms = Vec::with_capacity(count);
    for a in arrivals.iter().filter(|a| a.key.starts_with(b"lat-")) {
        let record = a.attributes()?;
        let sent: i64 = record
            .metadata
            .get(SENT_US)
            .and_then(|v| v.parse().ok())
            .context("latency record without its send time")?;
        latencies_ms.push((a.wall_us - sent) as f64 / 1000.0);
    }
    latencies_ms.sort_by(f64::total_cmp);
    Ok(LatencyResult {
        rate,
        sent_rate,
        latencies_ms,
    })
}

/// The ceiling phase's inference step: no model, just the image size back.
struct Identity;

impl InferenceBackend for Identity {
    fn model(&self) -> ModelRef {
        ModelRef {
            name: "identity".into(),
            version: "0".into(),
        }
    }

    fn infer(&mut self, images: &[RgbImage]) -> Result<Vec<ImageDetections>> {
        Ok(images
            .iter()
            .map(|im| ImageDetections {
                width: im.width(),
                height: im.height(),
                detections: Vec::new(),
            })
            .collect())
    }
}

/// An 8×8 PNG.
fn tiny_png() -> Result<Vec<u8>> {
    let img = RgbImage::from_pixel(8, 8, image::Rgb([200, 120, 40]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Figures of phase 2.
struct CeilingResult {
    /// Steady-state msgs/s.
    throughput: Throughput,
    /// Seconds from service start to the last record.
    total_secs: f64,
    /// The run's batching and pauses.
    report: RunReport,
    /// The configuration used.
    config: Config,
    /// CPU seconds the whole process used from service start to the last record.
    cpu_secs: f64,
    /// The same by thread name.
    cpu: Vec<(String, f64)>,
    /// Batches and stage timings from the output records.
    inside: InsideFigures,
}

/// Phase 2: tiny images, identity inference, `ceiling_events` events.
fn phase_ceiling(settings: &Settings) -> Result<CeilingResult> {
    let n = settings.ceiling_events;
    let partitions = settings.ceiling_partitions;
    let broker = EmbeddedBroker::start(1, &[(IN, partitions), (OUT, partitions), (DLQ, 1)])?;
    let brokers = broker.bootstrap_servers().to_string();
    let mut config = base_config(&brokers, settings)?;
    config.model.devices = Vec::new();
    config.batch.max_batch_size = settings.ceiling_batch;
    config.pipeline.max_in_flight = settings.ceiling_in_flight;
    config.validate()?;
    let png = tiny_png()?;
    eprintln!(
        "phase 2: publishing {n} events ({} B PNG) over {partitions} partitions",
        png.len()
    );
    let published = Instant::now();
    publish(
        &brokers,
        partitions,
        (0..n).map(|i| {
            let key = format!("tiny-{i}");
            let value = framed_event(&key, &png, None);
            (key, value)
        }),
    )?;
    eprintln!("  published in {:.1} s", published.elapsed().as_secs_f64());
    let reader = Reader::start(&brokers, &[(OUT, partitions), (DLQ, 1)])?;
    reader.set_target(n);
    let factory: BackendFactory = Arc::new(|_| Ok(Box::new(Identity) as Box<dyn InferenceBackend>));
    eprintln!("phase 2: running the pipeline with the identity step");
    let threads_before = thread_cpu();
    let cpu_before = process_cpu();
    let started = Instant::now();
    let service = Service::start(config.clone(), Inference::new(1, factory))?;
    let waited = wait_for(&reader, &service, n, Duration::from_secs(300), "phase 2 (ceiling)");
    let total_secs = started.elapsed().as_secs_f64();
    let cpu_secs = process_cpu() - cpu_before;
    let cpu = cpu_by_thread(&threads_before, &thread_cpu());
    let report = service.stop(Duration::from_secs(60));
    let arrivals = reader.finish()?;
    waited?;
    let report = report?;
    let expected: HashSet<String> = (0..n).map(|i| format!("tiny-{i}")).collect();
    check_complete(&arrivals, &expected)?;
    let throughput = steady_throughput(&arrivals, n / 10, 4 * settings.ceiling_batch)?;
    let inside = inside_figures(&arrivals)?;
    Ok(CeilingResult {
        throughput,
        total_secs,
        report,
        config,
        cpu_secs,
        cpu,
        inside,
    })
}

/// CPU seconds of every live thread of this process: thread id → (name, seconds).
fn thread_cpu() -> BTreeMap<u32, (String, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((name, secs)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            out.insert(tid, (name, secs));
        }
    }
    out
}

/// CPU seconds of the whole process (threads that ended included).
fn process_cpu() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
        .map(|(_, secs)| secs)
        .unwrap_or(0.0)
}

/// (name, utime + stime in seconds) from a `/proc/…/stat` line.
fn parse_stat(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((name, ticks / 100.0))
}

/// CPU used between two snapshots, summed by thread name; threads that did not exist in
/// `before` are marked as started during the run. Sorted, largest first.
fn cpu_by_thread(before: &BTreeMap<u32, (String, f64)>, after: &BTreeMap<u32, (String, f64)>) -> Vec<(String, f64)> {
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    for (tid, (name, secs)) in after {
        let (label, used) = match before.get(tid) {
            Some((_, was)) => (format!("{name} [before]"), secs - was),
            None => (format!("{name} [service]"), *secs),
        };
        *by_name.entry(label).or_default() += used;
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s > 0.0).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Per-batch facts from output records: records of one batch share `inference_ms`.
#[derive(Debug, Clone, Default)]
struct InsideFigures {
    /// Distinct batches seen.
    batches: usize,
    /// Images in them.
    images: usize,
    /// Σ batch inference seconds.
    inference_secs: f64,
    /// Mean decode ms per record.
    decode_ms: f64,
    /// Mean batch wait ms per record.
    batch_wait_ms: f64,
    /// Mean consumer-to-emit ms per record.
    total_ms: f64,
    /// (images, inference seconds) of each batch, in the order of their first record.
    sizes: Vec<(usize, f64)>,
}

/// Batch sizes, model time and stage timings from the output records.
fn inside_figures(arrivals: &[Arrival]) -> Result<InsideFigures> {
    let mut batches: BTreeMap<u64, (usize, f64)> = BTreeMap::new();
    let mut order: Vec<u64> = Vec::new();
    let mut f = InsideFigures::default();
    let mut n = 0usize;
    for a in arrivals.iter().filter(|a| !a.dead) {
        let r = a.attributes()?;
        let id = r.timings.inference_ms.to_bits();
        let entry = batches.entry(id).or_insert_with(|| {
            order.push(id);
            (0, r.timings.inference_ms)
        });
        entry.0 += 1;
        f.decode_ms += r.timings.decode_ms;
        f.batch_wait_ms += r.timings.batch_wait_ms;
        f.total_ms += r.timings.total_ms;
        n += 1;
    }
    let n = n.max(1) as f64;
    f.decode_ms /= n;
    f.batch_wait_ms /= n;
    f.total_ms /= n;
    f.batches = batches.len();
    f.images = batches.values().map(|(c, _)| c).sum();
    f.inference_secs = batches.values().map(|(_, ms)| ms / 1000.0).sum();
    f.sizes = order.iter().map(|id| (batches[id].0, batches[id].1 / 1000.0)).collect();
    Ok(f)
}

/// One stage measured alone: name, operations per second, how.
struct StageFigure {
    /// What was measured.
    stage: &'static str,
    /// Operations (messages) per second.
    per_s: f64,
    /// How it was measured.
    detail: String,
}

/// Times `f` over `n` calls; returns calls per second.
fn per_second(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let started = Instant::now();
    for i in 0..n {
        f(i);
    }
    n as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

/// The identity step's output record for a tiny image, framed as the sink frames it.
fn tiny_output_record(i: usize) -> Vec<u8> {
    let record = ProductAttributes {
        event_id: format!("tiny-{i}"),
        product_id: format!("tiny-{i}"),
        model: Identity.model(),
        image_width: 8,
        image_height: 8,
        detections: Vec::new(),
        attributes: Default::default(),
        timings: Default::default(),
        event_time_ms: Some(wall_us() / 1000),
        processed_time_ms: wall_us() / 1000,
        metadata: BTreeMap::new(),
    };
    frame(OUTPUT_SCHEMA_ID, &attrstream::events::codec::encode_attributes(&record))
}

/// The ceiling's stages one at a time, each at its own maximum rate on this machine: the
/// CPU work per message (Avro decode, PNG decode, Avro encode), the decode hop through the
/// async runtime (semaphore + `spawn_blocking`, as `pipeline::process` does it), and Kafka
/// alone (consuming the input with the service's consumer settings; producing output
/// records with the service's producer, one task per record, as the sink does).
fn phase_breakdown(settings: &Settings, photos: &Photos) -> Result<Vec<StageFigure>> {
    let n = settings.ceiling_events;
    let png = tiny_png()?;
    let mut figures = Vec::new();
    let config = base_config("localhost:9", settings)?;
    let decoder = attrstream::events::registry::InputDecoder::new(attrstream::pipeline::input_schemas(&config, None)?);
    let events: Vec<Vec<u8>> = (0..n).map(|i| framed_event(&format!("tiny-{i}"), &png, None)).collect();
    let rate = per_second(n, |i| {
        let decoded = decoder.decode_cached(&events[i]);
        assert!(matches!(decoded, Some(Ok(_))), "event decodes");
    });
    figures.push(StageFigure {
        stage: "Avro decode of the input event",
        per_s: rate,
        detail: format!("InputDecoder::decode_cached, {n} events, one thread"),
    });
    let rate = per_second(n, |_| {
        decode_image(&png, DEFAULT_MAX_PIXELS).expect("tiny PNG decodes");
    });
    figures.push(StageFigure {
        stage: "PNG decode (8×8)",
        per_s: rate,
        detail: format!("preprocess::decode_image, {n} images, one thread"),
    });
    let rounds = 10 * photos.encoded.len();
    let rate = per_second(rounds, |i| {
        let bytes = &photos.encoded[i % photos.encoded.len()];
        decode_image(bytes, DEFAULT_MAX_PIXELS).expect("sample decodes");
    });
    figures.push(StageFigure {
        stage: "decode of the sample photos",
        per_s: rate,
        detail: format!("preprocess::decode_image, {rounds} photos (PNG/JPEG, 451×300 to 640×427), one thread"),
    });
    let colour_cfg = attrstream::attributes::ColourConfig::default();
    let rate = per_second(rounds, |i| {
        let image = &photos.decoded[i % photos.decoded.len()];
        let (w, h) = (image.width() as f32, image.height() as f32);
        let dets = ImageDetections {
            width: image.width(),
            height: image.height(),
            detections: (0..3)
                .map(|k| attrstream::detection::Detection {
                    label: "thing".into(),
                    label_id: 1,
                    score: 0.9 - 0.1 * k as f32,
                    box_px: [w / 4.0, h / 4.0, 3.0 * w / 4.0, 3.0 * h / 4.0],
                    box_norm: [0.25, 0.25, 0.75, 0.75],
                })
                .collect(),
        };
        std::hint::black_box(attrstream::attributes::aggregate(image, &dets, &colour_cfg));
    });
    figures.push(StageFigure {
        stage: "colours of 3 detections (sample photos)",
        per_s: rate,
        detail: format!("attributes::aggregate, default ColourConfig, {rounds} photos, one thread"),
    });
    let rate = per_second(n, |i| {
        std::hint::black_box(tiny_output_record(i));
    });
    figures.push(StageFigure {
        stage: "Avro encode of the output record",
        per_s: rate,
        detail: format!("codec::encode_attributes + frame, {n} records, one thread"),
    });

    let rt = attrstream::serve::runtime()?;
    let permits = config.decode_threads();
    let png = Arc::new(png);
    let started = Instant::now();
    rt.block_on(async {
        let cpu = Arc::new(tokio::sync::Semaphore::new(permits));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..n {
            let (cpu, tx, png) = (cpu.clone(), tx.clone(), png.clone());
            tokio::spawn(async move {
                let _permit = cpu.acquire().await;
                let _ = tokio::task::spawn_blocking(move || decode_image(&png, DEFAULT_MAX_PIXELS)).await;
                let _ = tx.send(());
            });
        }
        drop(tx);
        while rx.recv().await.is_some() {}
    });
    figures.push(StageFigure {
        stage: "decode hop on the runtime",
        per_s: n as f64 / started.elapsed().as_secs_f64(),
        detail: format!("tokio::spawn + semaphore({permits}) + spawn_blocking(decode_image), {n} tasks"),
    });

    let partitions = settings.ceiling_partitions;
    let broker = EmbeddedBroker::start(1, &[(IN, partitions), (OUT, partitions)])?;
    let brokers = broker.bootstrap_servers().to_string();
    publish(
        &brokers,
        partitions,
        events.into_iter().enumerate().map(|(i, v)| (format!("tiny-{i}"), v)),
    )?;
    let config = base_config(&brokers, settings)?;
    let mut cc = ClientConfig::new();
    for (k, v) in attrstream::pipeline::consumer_properties(&config) {
        cc.set(k, v);
    }
    cc.set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = cc.create()?;
    consumer.subscribe(&[IN])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let poll_one = |what: &str| -> Result<()> {
        loop {
            if Instant::now() > deadline {
                bail!("breakdown: {what}: no input event within 120 s");
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(5)) {
                std::hint::black_box(m.payload().map(<[u8]>::to_vec));
                return Ok(());
            }
        }
    };
    // Consume the first half at full speed.
    let half = n / 2;
    poll_one("first message")?;
    let first = Instant::now();
    for _ in 1..half {
        poll_one("consuming")?;
    }
    let secs = first.elapsed().as_secs_f64();
    figures.push(StageFigure {
        stage: "Kafka consume alone",
        per_s: (half - 1) as f64 / secs,
        detail: format!(
            "BaseConsumer::poll with the service's consumer settings, {half} events, {partitions} partitions"
        ),
    });
    // What the service's backpressure does: pause every partition, let 100 ms pass while
    // polling (as the consumer thread does), resume, and time until the next message.
    let mut resume_ms = Vec::new();
    for _ in 0..5 {
        let assignment = consumer.assignment()?;
        consumer.pause(&assignment)?;
        let paused = Instant::now();
        while paused.elapsed() < Duration::from_millis(100) {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(10)) {
                bail!("breakdown: a message arrived from a paused partition");
            }
        }
        consumer.resume(&assignment)?;
        let resumed = Instant::now();
        poll_one("after resume")?;
        resume_ms.push(resumed.elapsed().as_secs_f64() * 1000.0);
        for _ in 0..1000 {
            poll_one("after resume")?;
        }
    }
    drop(consumer);
    resume_ms.sort_by(f64::total_cmp);
    figures.push(StageFigure {
        stage: "Kafka consumer resume after a pause",
        per_s: 1000.0 / percentile(&resume_ms, 50.0),
        detail: format!(
            "pause all partitions 100 ms, resume, first message after {:.0?} ms (5 tries): at most one pause cycle per this",
            resume_ms
        ),
    });

    let producer = attrstream::sink::create_producer(&attrstream::pipeline::producer_properties(&config))?;
    let records: Vec<Vec<u8>> = (0..n).map(tiny_output_record).collect();
    let started = Instant::now();
    let failed = rt.block_on(async {
        let mut tasks = Vec::with_capacity(n);
        for (i, payload) in records.into_iter().enumerate() {
            let producer = producer.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("tiny-{i}");
                let record = rdkafka::producer::FutureRecord::<str, [u8]>::to(OUT)
                    .key(&key)
                    .payload(&payload);
                producer.send(record, rdkafka::util::Timeout::Never).await.is_err()
            }));
        }
        let mut failed = 0;
        for t in tasks {
            if t.await.unwrap_or(true) {
                failed += 1;
            }
        }
        failed
    });
    if failed > 0 {
        bail!("breakdown: {failed} of {n} output records failed to produce");
    }
    figures.push(StageFigure {
        stage: "Kafka produce alone",
        per_s: n as f64 / started.elapsed().as_secs_f64(),
        detail: format!("FutureProducer::send with the service's producer settings, one task per record, {n} records"),
    });
    Ok(figures)
}

/// The first line of `date -u`, or the Unix time.
fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| format!("unix time {}", wall_us() / 1_000_000))
}

/// CPU model and core count.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!(
        "{} cores ({cpu}), load average {load}, {}",
        available_cores(),
        cpu_pressure()
    )
}

/// The share of the last minute in which runnable tasks waited for a CPU (`/proc/pressure/cpu`):
/// other work on the machine that the figures share the cores with.
fn cpu_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().find(|f| f.starts_with("avg60=")))
                .map(|f| format!("CPU pressure {}% (avg60)", &f[6..]))
        })
        .unwrap_or_else(|| "CPU pressure unknown".into())
}

/// `goal met` / `goal missed` for a figure.
fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    // The project folder: where the benchmark was built, or the current folder when the
    // binary runs elsewhere (a prebuilt copy on a GPU machine, started from the repository root).
    if !std::path::Path::new("assets/samples").is_dir() {
        if let Err(e) = std::env::set_current_dir(common::root()) {
            eprintln!(
                "bench-pipeline: run it from the repository root (assets/samples not found here, and {}: {e})",
                common::root().display()
            );
            return ExitCode::from(2);
        }
    }
    let settings = Settings::from_env();
    if let Some(p) = settings.phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
        eprintln!(
            "bench-pipeline: unknown phase `{p}` in BENCH_PHASES (known: {})",
            PHASES.join(", ")
        );
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let date = today();
    let host = machine();
    let photos = match Photos::load() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench-pipeline: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut failures: Vec<String> = Vec::new();
    let mut model: Option<ModelRef> = None;

    let throughput = if settings.runs("throughput") || settings.runs("latency") {
        match phase_throughput(&settings, &photos, &mut model) {
            Ok(r) => Some(r),
            Err(e) => {
                failures.push(format!("phase 1 (throughput): {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let latency = if settings.runs("latency") {
        match &throughput {
            Some(t) => match phase_latency(&settings, &photos, 0.5 * t.pipeline.per_s) {
                Ok(r) => Some(r),
                Err(e) => {
                    failures.push(format!("phase 3 (latency): {e:#}"));
                    None
                }
            },
            None => {
                failures.push("phase 3 (latency): skipped, it needs the capacity from phase 1".into());
                None
            }
        }
    } else {
        None
    };
    let ceiling = if settings.runs("ceiling") {
        match phase_ceiling(&settings) {
            Ok(r) => Some(r),
            Err(e) => {
                failures.push(format!("phase 2 (ceiling): {e:#}"));
                None
            }
        }
    } else {
        None
    };

    let breakdown = if settings.runs("breakdown") {
        match phase_breakdown(&settings, &photos) {
            Ok(r) => Some(r),
            Err(e) => {
                failures.push(format!("breakdown: {e:#}"));
                None
            }
        }
    } else {
        None
    };

    let threads = settings.resolved_threads();
    println!();
    println!("attrstream pipeline benchmark, {date}");
    println!("machine: {host}");
    println!("command: {}", settings.command());
    if let Some(m) = &model {
        println!("model: {} ({})", m.name, m.version);
    }
    println!(
        "config: devices [{}], {threads} libtorch thread(s) per CPU worker, decode threads {}, \
         OMP_WAIT_POLICY {}, in-process Kafka broker (fetch.wait.max.ms {FETCH_WAIT_MS})",
        settings.devices.join(", "),
        if settings.decode_threads > 0 {
            settings.decode_threads
        } else {
            available_cores()
        },
        std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "unset (libgomp spins)".into()),
    );
    println!();
    println!("| figure | result | goal | detail |");
    println!("|---|---:|---|---|");
    if let Some(t) = &throughput {
        let ratio = t.pipeline.per_s / t.bare;
        println!(
            "| 1. bare detector | {:.2} imgs/s | | batch {}, {} images over {} worker(s), half before, half after the pipeline |",
            t.bare, settings.batch, t.bare_images, settings.devices.len()
        );
        println!(
            "| 1. pipeline through Kafka | {:.2} imgs/s | | {} events over {} partitions; {} records in {:.2} s after warm-up; \
             batch max {} wait {} ms, mean batch {:.2} ({} full, {} timed out, {} eager) |",
            t.pipeline.per_s,
            settings.events,
            t.partitions,
            t.pipeline.records,
            t.pipeline.secs,
            settings.batch,
            settings.max_wait.as_millis(),
            t.report.batches.mean_batch_size(),
            t.report.batches.full,
            t.report.batches.timed_out,
            t.report.batches.eager,
        );
        println!(
            "| 1. pipeline ÷ bare | {ratio:.3} | ≥ 0.95 {} | |",
            verdict(ratio >= 0.95)
        );
    }
    if let Some(c) = &ceiling {
        println!(
            "| 2. ceiling (identity step, 8×8 PNG) | {:.0} msgs/s | ≥ 20,000 {} | {} events over {} partitions, {} records in {:.2} s \
             after warm-up ({:.1} s from start); batch max {} (mean {:.2}), max_in_flight {}, decode threads {}, {} pauses |",
            c.throughput.per_s,
            verdict(c.throughput.per_s >= 20_000.0),
            settings.ceiling_events,
            settings.ceiling_partitions,
            c.throughput.records,
            c.throughput.secs,
            c.total_secs,
            c.config.batch.max_batch_size,
            c.report.batches.mean_batch_size(),
            c.config.pipeline.max_in_flight,
            c.config.decode_threads(),
            c.report.pauses,
        );
    }
    if let Some(l) = &latency {
        let v = &l.latencies_ms;
        println!(
            "| 3. latency at half capacity | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | | {} events at {:.2}/s \
             (target {:.2}/s = 0.5 × phase 1) for {} s; send → output read back |",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
            v.len(),
            l.sent_rate,
            l.rate,
            settings.latency_secs,
        );
    }
    println!();
    if let Some(t) = &throughput {
        let i = &t.inside;
        println!(
            "phase 1 inside the pipeline (from the records): {} batches, mean {:.2} images; model time alone \
             {:.2} imgs/s; per record: decode {:.1} ms, batch wait {:.1} ms, consumer to output {:.0} ms",
            i.batches,
            i.images as f64 / i.batches.max(1) as f64,
            i.images as f64 / i.inference_secs.max(1e-9),
            i.decode_ms,
            i.batch_wait_ms,
            i.total_ms,
        );
    }
    if let Some(c) = &ceiling {
        let msgs = settings.ceiling_events as f64;
        println!(
            "phase 2 CPU: {:.1} s of CPU in {:.1} s (mean {:.2} cores busy), {:.0} µs per message; per record: \
             decode {:.2} ms, batch wait {:.2} ms, consumer to output {:.0} ms; {} batches",
            c.cpu_secs,
            c.total_secs,
            c.cpu_secs / c.total_secs.max(1e-9),
            c.cpu_secs * 1e6 / msgs,
            c.inside.decode_ms,
            c.inside.batch_wait_ms,
            c.inside.total_ms,
            c.report.batches.batches,
        );
        println!("phase 2 CPU by thread ([service] = started by the service, [before] = broker, reader, benchmark):");
        for (name, secs) in c.cpu.iter().take(14) {
            println!("  {name:<32} {secs:>7.2} s  {:>6.1} µs/msg", secs * 1e6 / msgs);
        }
    }
    if let Some(b) = &breakdown {
        println!("stages alone (BENCH_PHASES=breakdown), each at its own maximum rate:");
        for f in b {
            let digits = if f.per_s < 100.0 { 2 } else { 0 };
            println!("  {:<40} {:>10.digits$} /s  ({})", f.stage, f.per_s, f.detail);
        }
    }
    println!(
        "total time {:.0} s; at the end: load average {}, {}",
        started.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_default(),
        cpu_pressure()
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("bench-pipeline FAILED: {f}");
            println!("FAILED: {f}");
        }
        ExitCode::from(1)
    }
}
