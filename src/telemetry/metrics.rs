//! The service's instruments: one set, built on an OpenTelemetry `Meter`, read both by the
//! Prometheus exporter behind `/metrics` and by the OTLP exporter when one is configured.
//!
//! Instrument names follow OpenTelemetry conventions; the Prometheus exporter adds the unit
//! and `_total` suffixes, which gives exactly the names operators alert on:
//!
//! | Prometheus name                                   | instrument (unit)                        |
//! |---------------------------------------------------|------------------------------------------|
//! | `attrstream_events_consumed_total`                | counter `attrstream_events_consumed`     |
//! | `attrstream_records_produced_total`               | counter `attrstream_records_produced`    |
//! | `attrstream_dead_letters_total{reason}`           | counter `attrstream_dead_letters`        |
//! | `attrstream_stage_duration_seconds{stage}`        | histogram `attrstream_stage_duration` (s)|
//! | `attrstream_batch_size`                           | histogram (images per batch)             |
//! | `attrstream_batch_fill_ratio`                     | histogram `attrstream_batch_fill` (1)    |
//! | `attrstream_in_flight_messages`                   | observable gauge                         |
//! | `attrstream_queue_depth{queue}`                   | observable gauge (batcher, workers)      |
//! | `attrstream_consumer_lag{topic,partition}`        | observable gauge                         |
//! | `attrstream_model_info{name,version}`             | observable gauge, 1 for the serving model|
//! | `attrstream_device_memory_bytes{device}`          | observable gauge `attrstream_device_memory` (By), CUDA via NVML |
//! | `attrstream_database_writes_total{outcome}`       | counter `attrstream_database_writes`     |
//!
//! Recording costs an atomic add or a bucket update under a short lock, with attribute sets
//! built once ([`Stage`] labels are pre-built); gauges are computed only when a reader collects.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry::KeyValue;

use super::health::Health;

/// A step of an event's way through the service, as labelled in
/// `attrstream_stage_duration_seconds{stage}` and named as a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Getting the image bytes (inline, file, http(s), s3).
    Fetch,
    /// Decoding the image into pixels.
    Decode,
    /// From entering the batcher until the worker starts on the batch.
    BatchWait,
    /// The model's forward pass over the batch holding the image.
    Inference,
    /// Producing the output (or dead-letter) record until the broker acknowledges it.
    Produce,
    /// Writing to the optional PostgreSQL sink.
    Database,
    /// From consumption to acknowledged output.
    Total,
}

impl Stage {
    /// Every stage, in the order of the `stage` label values.
    pub const ALL: [Stage; 7] = [
        Stage::Fetch,
        Stage::Decode,
        Stage::BatchWait,
        Stage::Inference,
        Stage::Produce,
        Stage::Database,
        Stage::Total,
    ];

    /// The label value and span name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Decode => "decode",
            Stage::BatchWait => "batch_wait",
            Stage::Inference => "inference",
            Stage::Produce => "produce",
            Stage::Database => "database",
            Stage::Total => "total",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Outcome of a write to the PostgreSQL sink, as labelled in `attrstream_database_writes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseOutcome {
    /// Written on the first attempt.
    Ok,
    /// Written after at least one retry.
    Retried,
    /// Given up on (the event is dead-lettered).
    Failed,
}

impl DatabaseOutcome {
    fn as_str(self) -> &'static str {
        match self {
            DatabaseOutcome::Ok => "ok",
            DatabaseOutcome::Retried => "retried",
            DatabaseOutcome::Failed => "failed",
        }
    }
}

/// Histogram bucket bounds of stage durations in seconds: 0.5 ms to 60 s.
const DURATION_BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket bounds of the batch size (images).
const BATCH_SIZE_BOUNDS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Bucket bounds of the batch fill ratio.
const FILL_BOUNDS: [f64; 8] = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0];

/// A value read when metrics are collected (a queue's depth, a device's memory).
type Probe = Box<dyn Fn() -> Option<i64> + Send + Sync>;

/// Probes registered by running components, each under a label value.
#[derive(Default)]
struct Probes {
    next: AtomicU64,
    entries: Mutex<BTreeMap<u64, (String, Probe)>>,
}

impl Probes {
    fn add(self: &Arc<Self>, label: String, probe: Probe) -> ProbeGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (label, probe));
        ProbeGuard {
            probes: Arc::downgrade(self),
            id,
        }
    }

    /// Current values, label by label (probes answering `None` are skipped).
    fn read(&self) -> Vec<(String, i64)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .values()
            .filter_map(|(label, probe)| probe().map(|v| (label.clone(), v)))
            .collect()
    }
}

/// Keeps a probe registered; dropping it removes the probe (and whatever it holds).
#[must_use = "the probe is removed when this guard is dropped"]
pub struct ProbeGuard {
    probes: Weak<Probes>,
    id: u64,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(probes) = self.probes.upgrade() {
            probes
                .entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.id);
        }
    }
}

/// The instruments of the serve pipeline.
pub struct Metrics {
    events_consumed: Counter<u64>,
    records_produced: Counter<u64>,
    dead_letters: Counter<u64>,
    stage_duration: Histogram<f64>,
    /// `stage=…` attribute per [`Stage`], built once.
    stage_attrs: [[KeyValue; 1]; 7],
    batch_size: Histogram<u64>,
    batch_fill: Histogram<f64>,
    database_writes: Counter<u64>,
    queues: Arc<Probes>,
    devices: Arc<Probes>,
    /// Observable instruments stay registered while these live.
    _gauges: Vec<ObservableGauge<i64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates every instrument on `meter`; gauges read `health` and the registered probes.
    pub(crate) fn new(meter: &Meter, health: Arc<Health>) -> Self {
        let queues = Arc::new(Probes::default());
        let devices = Arc::new(Probes::default());
        let mut gauges = Vec::new();
        let h = health.clone();
        gauges.push(
            meter
                .i64_observable_gauge("attrstream_in_flight_messages")
                .with_description("Messages consumed whose output is not yet acknowledged")
                .with_callback(move |o| o.observe(h.in_flight() as i64, &[]))
                .build(),
        );
        let q = queues.clone();
        gauges.push(
            meter
                .i64_observable_gauge("attrstream_queue_depth")
                .with_description("Items waiting in an internal queue (batcher: images not yet in a batch; workers: images queued or running on the inference workers)")
                .with_callback(move |o| {
                    for (queue, depth) in q.read() {
                        o.observe(depth, &[KeyValue::new("queue", queue)]);
                    }
                })
                .build(),
        );
        let h = health.clone();
        gauges.push(
            meter
                .i64_observable_gauge("attrstream_consumer_lag")
                .with_description(
                    "Messages behind the high watermark, per assigned partition (from librdkafka statistics)",
                )
                .with_callback(move |o| {
                    for ((topic, partition), lag) in h.lag() {
                        o.observe(
                            lag,
                            &[
                                KeyValue::new("topic", topic),
                                KeyValue::new("partition", partition as i64),
                            ],
                        );
                    }
                })
                .build(),
        );
        let h = health;
        gauges.push(
            meter
                .i64_observable_gauge("attrstream_model_info")
                .with_description("1 for the model every worker serves")
                .with_callback(move |o| {
                    if let Some(model) = h.model() {
                        o.observe(
                            1,
                            &[
                                KeyValue::new("name", model.name),
                                KeyValue::new("version", model.version),
                            ],
                        );
                    }
                })
                .build(),
        );
        let d = devices.clone();
        gauges.push(
            meter
                // The exporter appends `_bytes` for the unit "By".
                .i64_observable_gauge("attrstream_device_memory")
                .with_description("Memory in use on each CUDA device the workers use (whole device, all processes)")
                .with_unit("By")
                .with_callback(move |o| {
                    for (device, bytes) in d.read() {
                        o.observe(bytes, &[KeyValue::new("device", device)]);
                    }
                })
                .build(),
        );
        Self {
            events_consumed: meter
                .u64_counter("attrstream_events_consumed")
                .with_description("Messages consumed from the input topic")
                .build(),
            records_produced: meter
                .u64_counter("attrstream_records_produced")
                .with_description("Attribute records acknowledged by the broker")
                .build(),
            dead_letters: meter
                .u64_counter("attrstream_dead_letters")
                .with_description("Dead letters acknowledged by the broker, by error kind")
                .build(),
            stage_duration: meter
                .f64_histogram("attrstream_stage_duration")
                .with_description("Time an event spent in each stage; total is consumption to acknowledged output")
                .with_unit("s")
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
            stage_attrs: Stage::ALL.map(|s| [KeyValue::new("stage", s.as_str())]),
            batch_size: meter
                .u64_histogram("attrstream_batch_size")
                .with_description("Images per inference batch")
                .with_unit("{image}")
                .with_boundaries(BATCH_SIZE_BOUNDS.to_vec())
                .build(),
            batch_fill: meter
                .f64_histogram("attrstream_batch_fill")
                .with_description("Batch size divided by batch.max_batch_size")
                .with_unit("1")
                .with_boundaries(FILL_BOUNDS.to_vec())
                .build(),
            database_writes: meter
                .u64_counter("attrstream_database_writes")
                .with_description("Writes to the PostgreSQL sink by outcome")
                .build(),
            queues,
            devices,
            _gauges: gauges,
        }
    }

    /// A message was consumed from the input topic.
    pub fn event_consumed(&self) {
        self.events_consumed.add(1, &[]);
    }

    /// An attribute record was acknowledged.
    pub fn record_produced(&self) {
        self.records_produced.add(1, &[]);
    }

    /// A dead letter with error kind `reason` (one of [`crate::events::error_kinds`]) was
    /// acknowledged; `'static` so that recording allocates nothing.
    pub fn dead_letter(&self, reason: &'static str) {
        self.dead_letters.add(1, &[KeyValue::new("reason", reason)]);
    }

    /// One event spent `duration` in `stage`.
    pub fn stage(&self, stage: Stage, duration: Duration) {
        self.stage_duration
            .record(duration.as_secs_f64(), &self.stage_attrs[stage.index()]);
    }

    /// A batch of `size` images ran, out of at most `max_batch_size`.
    pub fn batch(&self, size: usize, max_batch_size: usize) {
        self.batch_size.record(size as u64, &[]);
        self.batch_fill.record(size as f64 / max_batch_size.max(1) as f64, &[]);
    }

    /// A write to the PostgreSQL sink finished with `outcome`.
    pub fn database_write(&self, outcome: DatabaseOutcome) {
        self.database_writes
            .add(1, &[KeyValue::new("outcome", outcome.as_str())]);
    }

    /// Reports `probe()` as `attrstream_queue_depth{queue}` while the guard lives
    /// (`None` from the probe: no value this time, e.g. the queue is gone).
    pub fn watch_queue(&self, queue: &str, probe: impl Fn() -> Option<i64> + Send + Sync + 'static) -> ProbeGuard {
        self.queues.add(queue.to_string(), Box::new(probe))
    }

    /// Reports `probe()` as `attrstream_device_memory_bytes{device}` while the guard lives.
    pub fn watch_device_memory(
        &self,
        device: &str,
        probe: impl Fn() -> Option<i64> + Send + Sync + 'static,
    ) -> ProbeGuard {
        self.devices.add(device.to_string(), Box::new(probe))
    }
}

/// Training figures of `attrstream train`, one point per optimizer step (exported by OTLP;
/// a training job is not scraped).
#[derive(Clone)]
pub struct TrainMetrics {
    loss: Histogram<f64>,
    last_loss: opentelemetry::metrics::Gauge<f64>,
    learning_rate: opentelemetry::metrics::Gauge<f64>,
    images_per_second: opentelemetry::metrics::Gauge<f64>,
    grad_norm: Histogram<f64>,
    steps: Counter<u64>,
    images: Counter<u64>,
}

impl std::fmt::Debug for TrainMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainMetrics").finish_non_exhaustive()
    }
}

/// Bucket bounds of losses and gradient norms (both positive, spanning decades).
const LOSS_BOUNDS: [f64; 14] = [
    0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0,
];

impl TrainMetrics {
    /// Creates the `attrstream_train_*` instruments on `meter`.
    pub(crate) fn new(meter: &Meter) -> Self {
        Self {
            loss: meter
                .f64_histogram("attrstream_train_loss")
                .with_description("Training loss per step, by part (total and the four detector losses)")
                .with_boundaries(LOSS_BOUNDS.to_vec())
                .build(),
            last_loss: meter
                .f64_gauge("attrstream_train_last_loss")
                .with_description("Training loss of the latest step, by part")
                .build(),
            learning_rate: meter
                .f64_gauge("attrstream_train_learning_rate")
                .with_description("Learning rate of the latest step")
                .build(),
            images_per_second: meter
                .f64_gauge("attrstream_train_images_per_second")
                .with_description("Training throughput of the latest step, images per second")
                .build(),
            grad_norm: meter
                .f64_histogram("attrstream_train_grad_norm")
                .with_description("Global L2 norm of the gradients per step, before clipping")
                .with_boundaries(LOSS_BOUNDS.to_vec())
                .build(),
            steps: meter
                .u64_counter("attrstream_train_steps")
                .with_description("Optimizer steps taken")
                .build(),
            images: meter
                .u64_counter("attrstream_train_images")
                .with_description("Training images processed")
                .build(),
        }
    }

    /// Records one optimizer step over `images` images.
    pub fn step(&self, s: &crate::train::trainer::StepStats, images: usize) {
        for (part, value) in [
            ("total", s.total()),
            ("classifier", s.classifier),
            ("box_reg", s.box_reg),
            ("objectness", s.objectness),
            ("rpn_box_reg", s.rpn_box_reg),
        ] {
            if value.is_finite() {
                let attrs = [KeyValue::new("part", part)];
                self.loss.record(value, &attrs);
                self.last_loss.record(value, &attrs);
            }
        }
        self.learning_rate.record(s.lr, &[]);
        if s.images_per_sec.is_finite() {
            self.images_per_second.record(s.images_per_sec, &[]);
        }
        if s.grad_norm.is_finite() {
            self.grad_norm.record(s.grad_norm, &[]);
        }
        self.steps.add(1, &[]);
        self.images.add(images as u64, &[]);
    }
}
