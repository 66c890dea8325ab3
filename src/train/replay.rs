//! Reading a bounded snapshot of a labelled-images topic as training examples.
//!
//! A training run must see a fixed data set, so replay is two steps:
//! 1. [`take_snapshot`] turns the requested ranges ([`ReplayRanges`]: offsets, timestamps,
//!    `beginning`, `end`, per partition or for all) into fixed offsets per partition. `end` is
//!    the high watermark *at that moment*, so records produced afterwards are never read. The
//!    [`Snapshot`] is plain data (serde): store it next to a checkpoint to replay exactly the
//!    same records later.
//! 2. [`read_snapshot`] reads those offsets with a consumer that uses `assign` (never
//!    `subscribe`), a throwaway `group.id` it never joins, and never commits, so replays leave
//!    no trace in any consumer group and any number can run at once. It stops when every partition reaches its
//!    end offset. Each record is decoded ([`LabelledDecoder`]), its image fetched the way serve
//!    does ([`ImageFetcher`]: inline, file, http(s), s3 with the same limits and SSRF guard)
//!    and decoded ([`decode_image`]), with at most `concurrency` records in flight.
//!
//! Records that cannot become examples (bad framing, undecodable Avro, broken rules, missing or
//! corrupt images, a declared size that does not match the image) are skipped and reported with
//! their partition, offset, a machine-readable kind and the reason; they never stop the replay.
//! Only a schema registry that cannot be reached stops it (the records are fine; the result would
//! silently miss data).
//! Progress (records done out of the snapshot's offsets) shows as a bar or periodic log lines
//! ([`crate::progress`]).
//!
//! With a cache folder ([`ReplayOptions::cache_dir`]) every decoded example is stored as a PNG
//! plus a small JSON file, keyed by topic, partition, offset and a SHA-256 of the record's value
//! bytes. Later epochs and reruns read the cache instead of fetching and decoding again; a record
//! whose bytes changed (a recreated topic) gets a new key, so stale entries are never used.
//!
//! Timestamp bounds (`@ms`) select by the records' Kafka timestamps: a start `@t` keeps records
//! with timestamp >= t, an end `@t` keeps records with timestamp < t. The broker's time index
//! (`ListOffsets`) narrows which offsets are read; a broker that cannot place a timestamp
//! (librdkafka's mock cluster, or no record at or after it) makes reading start at the beginning
//! or stop at the end of the partition, and the timestamp filter alone selects. When timestamps
//! grow with offsets (log-append time, or producers stamping at send time) this is exactly the
//! records of the time window; with out-of-order producer timestamps, a record stored after the
//! first one at or after the end timestamp is not read even if its own timestamp is earlier.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt as _;
use image::{ImageEncoder as _, RgbImage};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::kafka_errors::QuietContext;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};
use tokio::sync::mpsc;

use crate::config::{normalize_kafka_key, Config};
use crate::events::codec::DecodeError;
use crate::events::error_kinds;
use crate::events::labelled::{LabelledDecoder, LabelledImage, SplitHint};
use crate::events::registry::SchemaRegistry;
use crate::fetch::{FetchConfig, ImageFetcher};
use crate::preprocess::{decode_image, DEFAULT_MAX_PIXELS};
use crate::progress::Progress;

// ---------------------------------------------------------------------------------------
// Ranges
// ---------------------------------------------------------------------------------------

/// One end of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// The partition's first available offset (low watermark).
    Beginning,
    /// The partition's high watermark when the snapshot is taken.
    End,
    /// An absolute offset (clamped to what the partition holds).
    Offset(i64),
    /// A Kafka timestamp in milliseconds since the Unix epoch.
    Timestamp(i64),
}

impl FromStr for Bound {
    type Err = String;

    /// `beginning`, `end`, an offset (`1000`) or `@` and a timestamp in ms (`@1700000000000`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "beginning" => return Ok(Bound::Beginning),
            "end" => return Ok(Bound::End),
            _ => {}
        }
        let (digits, timestamp) = match s.strip_prefix('@') {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let value: i64 = digits.parse().ok().filter(|v| *v >= 0).ok_or_else(|| {
            format!(
                "{s:?} is not a range bound: use beginning, end, an offset (1000) or @ and a timestamp in \
                     milliseconds (@1700000000000)"
            )
        })?;
        Ok(if timestamp {
            Bound::Timestamp(value)
        } else {
            Bound::Offset(value)
        })
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Beginning => f.write_str("beginning"),
            Bound::End => f.write_str("end"),
            Bound::Offset(o) => write!(f, "{o}"),
            Bound::Timestamp(t) => write!(f, "@{t}"),
        }
    }
}

/// A half-open range `start..end` (the end offset or timestamp itself is excluded), for one
/// partition or, with `partition: None`, for every partition not named by another range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSpec {
    /// The partition, or `None` for all partitions.
    pub partition: Option<i32>,
    /// First record (inclusive).
    pub start: Bound,
    /// Where to stop (exclusive).
    pub end: Bound,
}

impl FromStr for RangeSpec {
    type Err = String;

    /// `START..END`, optionally prefixed with `PARTITION:`; an empty side means `beginning` /
    /// `end`: `beginning..end`, `1000..5000`, `@1700000000000..end`, `0:100..200`, `3:..@1700000000000`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let (partition, range) = match text.split_once(':') {
            Some((p, range)) => {
                let p: i32 = p
                    .trim()
                    .parse()
                    .ok()
                    .filter(|p| *p >= 0)
                    .ok_or_else(|| format!("{text:?}: {p:?} is not a partition number"))?;
                (Some(p), range)
            }
            None => (None, text),
        };
        let (start, end) = range.split_once("..").ok_or_else(|| {
            format!("{text:?} is not a range: write START..END, e.g. beginning..end, 1000..5000, @1700000000000..end or 0:100..200")
        })?;
        let bound = |side: &str, default: Bound| -> Result<Bound, String> {
            if side.trim().is_empty() {
                Ok(default)
            } else {
                side.parse().map_err(|e| format!("{text:?}: {e}"))
            }
        };
        Ok(RangeSpec {
            partition,
            start: bound(start, Bound::Beginning)?,
            end: bound(end, Bound::End)?,
        })
    }
}

impl fmt::Display for RangeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.partition {
            write!(f, "{p}:")?;
        }
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Which records of a topic to replay: at most one all-partition range plus per-partition ones.
/// No ranges at all means `beginning..end` of every partition; only per-partition ranges means
/// only those partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRanges {
    all: Option<RangeSpec>,
    partitions: BTreeMap<i32, RangeSpec>,
}

impl ReplayRanges {
    /// Every partition from its beginning to its end.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Parses range arguments (each may also hold several ranges separated by commas), e.g.
    /// `["beginning..end"]`, `["0:100..200", "1:0..50"]`, `["@1700000000000..end,2:0..10"]`.
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Self> {
        let mut ranges = Vec::new();
        for spec in specs {
            for part in spec.as_ref().split(',').filter(|p| !p.trim().is_empty()) {
                ranges.push(part.parse::<RangeSpec>().map_err(anyhow::Error::msg)?);
            }
        }
        Self::from_specs(ranges)
    }

    /// Builds the ranges from parsed specs; refuses two ranges for the same partition or two
    /// all-partition ranges.
    pub fn from_specs(specs: impl IntoIterator<Item = RangeSpec>) -> Result<Self> {
        let mut out = Self::default();
        for spec in specs {
            match spec.partition {
                None => {
                    if let Some(previous) = out.all.replace(spec) {
                        bail!("two ranges for all partitions ({previous} and {spec}): give one, plus per-partition ranges (P:START..END) if needed");
                    }
                }
                Some(p) => {
                    if let Some(previous) = out.partitions.insert(p, spec) {
                        bail!("two ranges for partition {p} ({previous} and {spec}): give one per partition");
                    }
                }
            }
        }
        Ok(out)
    }

    /// The range of `partition`, or `None` when it is not to be read.
    pub fn for_partition(&self, partition: i32) -> Option<RangeSpec> {
        if let Some(spec) = self.partitions.get(&partition) {
            return Some(*spec);
        }
        match self.all {
            Some(spec) => Some(spec),
            None if self.partitions.is_empty() => Some(RangeSpec {
                partition: None,
                start: Bound::Beginning,
                end: Bound::End,
            }),
            None => None,
        }
    }

    /// The partitions named explicitly.
    pub fn named_partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }
}

// ---------------------------------------------------------------------------------------
// Snapshot
// ---------------------------------------------------------------------------------------

/// The fixed offsets of one partition to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    /// The partition.
    pub partition: i32,
    /// First offset to read.
    pub start: i64,
    /// Offset to stop before (at most the high watermark when the snapshot was taken).
    pub end: i64,
    /// Keep only records with a timestamp >= this (a `@ms` start bound).
    pub min_timestamp_ms: Option<i64>,
    /// Keep only records with a timestamp < this (a `@ms` end bound).
    pub end_timestamp_ms: Option<i64>,
}

impl PartitionSnapshot {
    /// Whether a record with this timestamp is selected (records without one pass only when
    /// no timestamp bound is set).
    pub fn accepts_timestamp(&self, timestamp_ms: Option<i64>) -> bool {
        match (self.min_timestamp_ms, self.end_timestamp_ms, timestamp_ms) {
            (None, None, _) => true,
            (_, _, None) => false,
            (min, end, Some(t)) => min.is_none_or(|m| t >= m) && end.is_none_or(|e| t < e),
        }
    }
}

/// A bounded, reproducible view of a topic: what [`read_snapshot`] reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The topic.
    pub topic: String,
    /// The partitions to read, in partition order (empty ranges included, for the report).
    pub partitions: Vec<PartitionSnapshot>,
    /// When the end offsets were fixed (ms since the Unix epoch).
    pub taken_at_ms: i64,
}

impl Snapshot {
    /// The most records the snapshot can hold (sum of `end - start`; timestamp filters and
    /// compaction gaps can make the real number smaller).
    pub fn max_records(&self) -> i64 {
        self.partitions.iter().map(|p| p.end - p.start).sum()
    }
}

// ---------------------------------------------------------------------------------------
// Options and results
// ---------------------------------------------------------------------------------------

/// How to replay: where the topic is, which records, how to fetch and decode, the cache.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The labelled-images topic.
    pub topic: String,
    /// Which records.
    pub ranges: ReplayRanges,
    /// librdkafka properties: `bootstrap.servers` and connection options (security, …).
    /// Group and commit settings in here are ignored: replay never joins a group.
    pub kafka_properties: Vec<(String, String)>,
    /// Where writer schemas come from; `None` reads every value with our own schema.
    pub registry: Option<Arc<SchemaRegistry>>,
    /// Image fetching (limits, timeouts, `file_root` for file:// URIs, S3).
    pub fetch: FetchConfig,
    /// Images declaring more pixels are skipped.
    pub max_pixels: u64,
    /// Most records being fetched and decoded at once.
    pub concurrency: usize,
    /// Folder of decoded examples, reused across epochs and runs; `None` disables caching.
    pub cache_dir: Option<PathBuf>,
    /// Time limit of each metadata request (partitions, watermarks, offsets for times).
    pub request_timeout: Duration,
    /// Give up when no record arrives for this long while partitions are unfinished.
    pub idle_timeout: Duration,
}

impl ReplayOptions {
    /// Defaults for `topic` on `bootstrap_servers`: everything, no registry, default fetch
    /// settings, 8 records in flight, no cache.
    pub fn new(bootstrap_servers: &str, topic: &str) -> Self {
        Self {
            topic: topic.to_string(),
            ranges: ReplayRanges::everything(),
            kafka_properties: vec![("bootstrap.servers".into(), bootstrap_servers.to_string())],
            registry: None,
            fetch: FetchConfig::default(),
            max_pixels: DEFAULT_MAX_PIXELS,
            concurrency: 8,
            cache_dir: None,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    /// Options from the service configuration: brokers and client options (`kafka.options`,
    /// `kafka.consumer_options`), `kafka.connect_timeout` as the metadata requests' limit, the
    /// schema registry, `fetch` and `decode.max_pixels`.
    pub fn from_config(config: &Config, topic: &str) -> Result<Self> {
        let mut options = Self::new(&config.kafka.bootstrap_servers, topic);
        options.request_timeout = config.kafka.connect_timeout;
        for (k, v) in config.kafka.options.iter().chain(&config.kafka.consumer_options) {
            options.kafka_properties.push((normalize_kafka_key(k), v.clone()));
        }
        options.registry = crate::pipeline::registry_client(config)?;
        options.fetch = config.fetch.clone();
        options.max_pixels = config.decode.max_pixels;
        Ok(options)
    }
}

/// Where an example came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordSource {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// One decoded training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The product the photo shows (the split's unit).
    pub product_id: String,
    /// The decoded, EXIF-oriented RGB image (see [`Example::to_tensor`]).
    pub image: RgbImage,
    /// Boxes in pixels, `[x1, y1, x2, y2]`.
    pub boxes: Vec<[f32; 4]>,
    /// Class name of each box.
    pub labels: Vec<String>,
    /// COCO iscrowd of each box.
    pub iscrowd: Vec<bool>,
    /// The record's split hint.
    pub split_hint: Option<SplitHint>,
    /// Where the labels come from (`human`, `coco-import`, …).
    pub label_source: String,
    /// The record's event id, if it had one.
    pub event_id: Option<String>,
    /// The record's metadata (e.g. `file_name` and `coco_image_id` from `publish-labels`).
    pub metadata: BTreeMap<String, String>,
    /// The Kafka record it was read from.
    pub source: RecordSource,
    /// The record's Kafka timestamp (ms), if it had one.
    pub timestamp_ms: Option<i64>,
}

impl Example {
    /// Image width in pixels.
    pub fn width(&self) -> u32 {
        self.image.width()
    }

    /// Image height in pixels.
    pub fn height(&self) -> u32 {
        self.image.height()
    }

    /// The image as a `[3, H, W]` float tensor in `[0, 1]` on `device` (torchvision's `to_tensor`).
    pub fn to_tensor(&self, device: Device) -> Tensor {
        crate::preprocess::to_tensor(&self.image, device)
    }

    fn from_record(record: LabelledImage, image: RgbImage, source: RecordSource, timestamp_ms: Option<i64>) -> Self {
        Example {
            product_id: record.product_id,
            image,
            boxes: record.annotations.iter().map(|a| a.xyxy()).collect(),
            iscrowd: record.annotations.iter().map(|a| a.is_crowd()).collect(),
            labels: record.annotations.into_iter().map(|a| a.label).collect(),
            split_hint: record.split,
            label_source: record.label_source,
            event_id: record.event_id,
            metadata: record.metadata,
            source,
            timestamp_ms,
        }
    }
}

/// A record that did not become an example, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Machine-readable reason, one of [`crate::events::error_kinds`] (`bad_framing`,
    /// `bad_avro`, `invalid_event`, `missing_image`, `corrupt_image`, …).
    pub kind: String,
    /// What is wrong, for people.
    pub reason: String,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayReport {
    /// The offsets that were read.
    pub snapshot: Snapshot,
    /// Records consumed inside the snapshot's offsets.
    pub records: u64,
    /// Records outside the snapshot's timestamp bounds (not decoded).
    pub filtered_by_timestamp: u64,
    /// Examples produced.
    pub examples: usize,
    /// Examples read from the cache.
    pub cache_hits: u64,
    /// Images fetched (cache misses that got as far as fetching).
    pub fetched: u64,
    /// Records skipped, with reasons, in partition/offset order.
    pub skipped: Vec<SkippedRecord>,
    /// Cache entries that could not be written (the examples are still returned).
    pub cache_write_errors: u64,
    /// The throwaway group id the consumer carried (librdkafka's assign needs one); it never
    /// joins the group and never commits, so nothing is ever stored under it.
    pub consumer_group: String,
    /// Wall time of the read.
    pub elapsed_ms: u64,
}

/// The examples of a replay (in partition, offset order) and its report.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The decoded examples.
    pub examples: Vec<Example>,
    /// Counts, skipped records and the snapshot.
    pub report: ReplayReport,
}

// ---------------------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------------------

/// Takes a snapshot and reads it, on a runtime of its own (for callers without one; async
/// callers use [`snapshot_blocking`] and [`read_snapshot`]).
pub fn replay(options: &ReplayOptions) -> Result<Replay> {
    let snapshot = take_snapshot(options)?;
    replay_snapshot(options, &snapshot)
}

/// Reads an existing snapshot (e.g. one stored with a checkpoint) on a runtime of its own.
pub fn replay_snapshot(options: &ReplayOptions, snapshot: &Snapshot) -> Result<Replay> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the replay runtime")?
        .block_on(read_snapshot(options, snapshot))
}

/// [`take_snapshot`] on a blocking thread, for async callers.
pub async fn snapshot_blocking(options: ReplayOptions) -> Result<Snapshot> {
    tokio::task::spawn_blocking(move || take_snapshot(&options))
        .await
        .context("the snapshot thread panicked")?
}

/// Fixes the offsets to read (blocking: metadata and watermark requests).
///
/// Errors when the topic does not exist, a named partition is not in it, or the brokers do not
/// answer within `request_timeout`.
pub fn take_snapshot(options: &ReplayOptions) -> Result<Snapshot> {
    let consumer = create_consumer(options, &throwaway_group_id())?;
    let topic = options.topic.as_str();
    let timeout = options.request_timeout;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot read the metadata of topic {topic} (are the brokers reachable?)"))?;
    let partitions: BTreeSet<i32> = {
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            bail!("topic {topic} does not exist");
        };
        if let Some(e) = t.error() {
            bail!(
                "topic {topic} cannot be read: {}",
                rdkafka::types::RDKafkaErrorCode::from(e)
            );
        }
        t.partitions().iter().map(|p| p.id()).collect()
    };
    ensure!(!partitions.is_empty(), "topic {topic} has no partitions");
    for p in options.ranges.named_partitions() {
        ensure!(
            partitions.contains(&p),
            "partition {p} is not in topic {topic} (it has partitions {}..={})",
            partitions.first().copied().unwrap_or(0),
            partitions.last().copied().unwrap_or(0)
        );
    }
    let selected: Vec<(i32, RangeSpec)> = partitions
        .iter()
        .filter_map(|&p| options.ranges.for_partition(p).map(|r| (p, r)))
        .collect();

    let mut watermarks = BTreeMap::new();
    for (p, _) in &selected {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .with_context(|| format!("cannot read the offsets of {topic}/{p}"))?;
        watermarks.insert(*p, (low, high));
    }
    let taken_at_ms = crate::events::now_ms();
    let starts = offsets_for_times(&consumer, topic, &selected, |r| r.start, timeout)?;
    let ends = offsets_for_times(&consumer, topic, &selected, |r| r.end, timeout)?;

    let mut out = Vec::with_capacity(selected.len());
    for (p, range) in &selected {
        let (low, high) = watermarks[p];
        let resolve = |bound: Bound, by_time: Option<i64>, unplaced: i64| match bound {
            Bound::Beginning => low,
            Bound::End => high,
            Bound::Offset(o) => o.clamp(low, high),
            Bound::Timestamp(_) => by_time.map_or(unplaced, |o| o.clamp(low, high)),
        };
        let start = resolve(range.start, starts.get(p).copied().flatten(), low);
        let end = resolve(range.end, ends.get(p).copied().flatten(), high).max(start);
        if let Bound::Offset(o) = range.start {
            if o < low {
                tracing::warn!(
                    partition = p,
                    requested = o,
                    first = low,
                    "start offset no longer in the topic (retention); starting at the first one"
                );
            }
        }
        out.push(PartitionSnapshot {
            partition: *p,
            start,
            end,
            min_timestamp_ms: match range.start {
                Bound::Timestamp(t) => Some(t),
                _ => None,
            },
            end_timestamp_ms: match range.end {
                Bound::Timestamp(t) => Some(t),
                _ => None,
            },
        });
    }
    Ok(Snapshot {
        topic: topic.to_string(),
        partitions: out,
        taken_at_ms,
    })
}

/// The broker's first offset at or after each timestamp bound picked by `bound`; `None` when
/// the broker cannot place it (no record at or after it, or no time index).
fn offsets_for_times(
    consumer: &ReplayConsumer,
    topic: &str,
    selected: &[(i32, RangeSpec)],
    bound: impl Fn(&RangeSpec) -> Bound,
    timeout: Duration,
) -> Result<BTreeMap<i32, Option<i64>>> {
    let mut tpl = TopicPartitionList::new();
    for (p, range) in selected {
        if let Bound::Timestamp(t) = bound(range) {
            tpl.add_partition_offset(topic, *p, Offset::Offset(t))
                .context("building the offsets-for-times request")?;
        }
    }
    if tpl.count() == 0 {
        return Ok(BTreeMap::new());
    }
    let answer = consumer
        .offsets_for_times(tpl, timeout)
        .with_context(|| format!("cannot look up offsets by timestamp in {topic}"))?;
    Ok(answer
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) if o >= 0 && e.error().is_ok() => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect())
}

/// librdkafka properties of the replay consumer: the user's connection options without any
/// group or commit settings, then ours (a throwaway group id, no commits, no offset store, EOF events).
fn consumer_config(options: &ReplayOptions, group_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in &options.kafka_properties {
        let key = normalize_kafka_key(k);
        let group_setting = key.starts_with("group.")
            || key.starts_with("enable.auto.")
            || key == "auto.commit.interval.ms"
            || key == "enable.partition.eof";
        if group_setting {
            tracing::debug!(key, "ignored for replay (it never joins a consumer group)");
            continue;
        }
        config.set(key, v);
    }
    // librdkafka's assign() needs a group handle, so there is a group id, but a fresh one that
    // never joins (no subscribe) and never commits: nothing is stored under it on the brokers.
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    config
}

/// A fresh, never-joined group id for one replay consumer.
fn throwaway_group_id() -> String {
    format!("attrstream-replay-{}", uuid::Uuid::new_v4())
}

/// Replay's consumer: librdkafka's, with its global errors rate-limited in the logs.
type ReplayConsumer = BaseConsumer<QuietContext>;

fn create_consumer(options: &ReplayOptions, group_id: &str) -> Result<ReplayConsumer> {
    consumer_config(options, group_id)
        .create_with_context(QuietContext::default())
        .context("cannot create the Kafka consumer for replay (check the kafka options)")
}

/// One consumed record inside the snapshot.
struct RawRecord {
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    value: Vec<u8>,
}

/// What the consumer thread reports when it is done.
#[derive(Default)]
struct ReadCounts {
    records: u64,
    filtered_by_timestamp: u64,
}

/// Reads the records of `snapshot`, turning each into an example or a skipped-record entry.
pub async fn read_snapshot(options: &ReplayOptions, snapshot: &Snapshot) -> Result<Replay> {
    ensure!(options.concurrency > 0, "replay concurrency must be at least 1");
    ensure!(
        snapshot.topic == options.topic,
        "the snapshot is of topic {}, the options name {}",
        snapshot.topic,
        options.topic
    );
    let started = Instant::now();
    let fetcher = ImageFetcher::new(options.fetch.clone())?;
    let decoder = LabelledDecoder::new(options.registry.clone());
    let cache = match &options.cache_dir {
        Some(dir) => Some(ExampleCache::open(dir, &options.topic)?),
        None => None,
    };

    let (tx, rx) = mpsc::channel::<RawRecord>(options.concurrency * 2);
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_group = throwaway_group_id();
    // Records done out of the snapshot's offsets: decoded or skipped here, filtered by
    // timestamp in the reader.
    let progress = Progress::new(
        format!("replay {}", options.topic),
        Some(u64::try_from(snapshot.max_records()).unwrap_or(0)),
    );
    let reader = {
        let consumer = create_consumer(options, &consumer_group)?;
        let snapshot = snapshot.clone();
        let stop = stop.clone();
        let idle_timeout = options.idle_timeout;
        let progress = progress.clone();
        std::thread::Builder::new()
            .name("attrstream-replay".into())
            .spawn(move || read_partitions(&consumer, &snapshot, idle_timeout, &tx, &stop, &progress))
            .context("cannot start the replay consumer thread")?
    };

    let context = Arc::new(RecordProcessor {
        topic: options.topic.clone(),
        fetcher,
        decoder,
        cache,
        max_pixels: options.max_pixels,
    });
    let records = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut outcomes = Box::pin(
        records
            .map(|raw| {
                let context = context.clone();
                async move { context.process(raw).await }
            })
            .buffer_unordered(options.concurrency),
    );

    let mut examples = Vec::new();
    let mut skipped = Vec::new();
    let (mut cache_hits, mut fetched, mut cache_write_errors) = (0, 0, 0);
    let mut fatal = None;
    while let Some(outcome) = outcomes.next().await {
        progress.inc(1);
        match outcome {
            Outcome::Example {
                example,
                from_cache,
                fetched: did_fetch,
                cache_write_failed,
            } => {
                cache_hits += u64::from(from_cache);
                fetched += u64::from(did_fetch);
                cache_write_errors += u64::from(cache_write_failed);
                examples.push(*example);
            }
            Outcome::Skipped(s) => {
                tracing::warn!(partition = s.partition, offset = s.offset, kind = %s.kind, reason = %s.reason, "skipping labelled record");
                skipped.push(s);
            }
            Outcome::Fatal(e) => {
                fatal = Some(e);
                break;
            }
        }
    }
    drop(outcomes);
    if fatal.is_some() {
        stop.store(true, Ordering::Relaxed);
    }
    let counts = tokio::task::spawn_blocking(move || reader.join())
        .await
        .context("joining the replay consumer thread")?
        .map_err(|_| anyhow::anyhow!("the replay consumer thread panicked"))?;
    if let Some(e) = fatal {
        return Err(e);
    }
    let counts = counts?;
    // The snapshot's offsets are an upper bound (compaction gaps): end at what was there.
    progress.set_length(counts.records);
    progress.finish();
    examples.sort_by_key(|e| (e.source.partition, e.source.offset));
    skipped.sort_by_key(|s| (s.partition, s.offset));
    let report = ReplayReport {
        snapshot: snapshot.clone(),
        records: counts.records,
        filtered_by_timestamp: counts.filtered_by_timestamp,
        examples: examples.len(),
        cache_hits,
        fetched,
        skipped,
        cache_write_errors,
        consumer_group,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    Ok(Replay { examples, report })
}

/// The consumer loop (blocking thread): assign the snapshot's partitions at their start
/// offsets, forward records until each partition reaches its end, then stop.
fn read_partitions(
    consumer: &ReplayConsumer,
    snapshot: &Snapshot,
    idle_timeout: Duration,
    tx: &mpsc::Sender<RawRecord>,
    stop: &AtomicBool,
    progress: &Progress,
) -> Result<ReadCounts> {
    let topic = snapshot.topic.as_str();
    let mut counts = ReadCounts::default();
    let mut open: BTreeMap<i32, &PartitionSnapshot> = snapshot
        .partitions
        .iter()
        .filter(|p| p.start < p.end)
        .map(|p| (p.partition, p))
        .collect();
    if open.is_empty() {
        return Ok(counts);
    }
    let mut tpl = TopicPartitionList::new();
    for p in open.values() {
        tpl.add_partition_offset(topic, p.partition, Offset::Offset(p.start))
            .context("building the assignment")?;
    }
    consumer
        .assign(&tpl)
        .with_context(|| format!("cannot assign the partitions of {topic}"))?;

    let mut last_progress = Instant::now();
    while !open.is_empty() {
        if stop.load(Ordering::Relaxed) || tx.is_closed() {
            return Ok(counts);
        }
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            if last_progress.elapsed() > idle_timeout {
                let waiting: Vec<String> = open.values().map(|p| format!("{}@{}", p.partition, p.end)).collect();
                bail!(
                    "no records from {topic} for {:?} while partitions {} are unfinished (partition@end offset); \
                     are the brokers reachable? raise the idle timeout for slow clusters",
                    idle_timeout,
                    waiting.join(", ")
                );
            }
            continue;
        };
        let message = match result {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(p)) => {
                // The partition's current end is at or beyond the snapshot's end.
                if open.remove(&p).is_some() {
                    pause(consumer, topic, p);
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, topic, "Kafka error during replay (librdkafka retries)");
                continue;
            }
        };
        last_progress = Instant::now();
        let partition = message.partition();
        let Some(range) = open.get(&partition).copied() else {
            continue; // a prefetched record of a finished partition
        };
        let offset = message.offset();
        if offset >= range.end {
            open.remove(&partition);
            pause(consumer, topic, partition);
            continue;
        }
        if offset < range.start {
            continue;
        }
        counts.records += 1;
        let timestamp_ms = message.timestamp().to_millis();
        if range.accepts_timestamp(timestamp_ms) {
            let raw = RawRecord {
                partition,
                offset,
                timestamp_ms,
                value: message.payload().unwrap_or_default().to_vec(),
            };
            if tx.blocking_send(raw).is_err() {
                return Ok(counts); // the processing side stopped (fatal error)
            }
        } else {
            counts.filtered_by_timestamp += 1;
            progress.inc(1);
        }
        if offset + 1 >= range.end {
            open.remove(&partition);
            pause(consumer, topic, partition);
        }
    }
    Ok(counts)
}

fn pause(consumer: &ReplayConsumer, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::debug!(error = %e, partition, "could not pause a finished partition");
    }
}

enum Outcome {
    Example {
        example: Box<Example>,
        from_cache: bool,
        fetched: bool,
        cache_write_failed: bool,
    },
    Skipped(SkippedRecord),
    Fatal(anyhow::Error),
}

/// What every record's processing shares.
struct RecordProcessor {
    topic: String,
    fetcher: ImageFetcher,
    decoder: LabelledDecoder,
    cache: Option<ExampleCache>,
    max_pixels: u64,
}

impl RecordProcessor {
    async fn process(&self, raw: RawRecord) -> Outcome {
        let source = RecordSource {
            topic: self.topic.clone(),
            partition: raw.partition,
            offset: raw.offset,
        };
        let skip = |kind: &str, reason: String| {
            Outcome::Skipped(SkippedRecord {
                partition: raw.partition,
                offset: raw.offset,
                kind: kind.to_string(),
                reason,
            })
        };
        let key = CacheKey::new(raw.partition, raw.offset, &raw.value);
        if let Some(cache) = &self.cache {
            let (cache, key, source) = (cache.clone(), key.clone(), source.clone());
            let timestamp_ms = raw.timestamp_ms;
            if let Ok(Ok(Some(example))) =
                tokio::task::spawn_blocking(move || cache.load(&key, source, timestamp_ms)).await
            {
                return Outcome::Example {
                    example: Box::new(example),
                    from_cache: true,
                    fetched: false,
                    cache_write_failed: false,
                };
            }
        }
        let record = match self.decoder.decode(&raw.value).await {
            Ok(r) => r,
            Err(e @ DecodeError::RegistryUnavailable { .. }) => {
                return Outcome::Fatal(anyhow::Error::new(e).context(format!(
                    "cannot decode {}/{} offset {}",
                    self.topic, raw.partition, raw.offset
                )))
            }
            Err(e) => return skip(e.kind().unwrap_or(error_kinds::BAD_AVRO), e.to_string()),
        };
        let fetched = match self.fetcher.fetch(&record.image).await {
            Ok(f) => f,
            Err(e) => return skip(e.kind(), e.to_string()),
        };
        let max_pixels = self.max_pixels;
        let decoded = tokio::task::spawn_blocking(move || decode_image(&fetched.bytes, max_pixels)).await;
        let image = match decoded {
            Ok(Ok(image)) => image,
            Ok(Err(e)) => return skip(e.kind(), e.to_string()),
            Err(e) => return skip(error_kinds::CORRUPT_IMAGE, format!("the image decoder panicked: {e}")),
        };
        let declared = (record.width, record.height);
        let size_ok = declared.0.is_none_or(|w| w == image.width()) && declared.1.is_none_or(|h| h == image.height());
        if !size_ok {
            return skip(
                error_kinds::INVALID_EVENT,
                format!(
                    "the record declares {}x{} but the image is {}x{} after EXIF orientation: its boxes would be misplaced",
                    declared.0.map_or("?".to_string(), |w| w.to_string()),
                    declared.1.map_or("?".to_string(), |h| h.to_string()),
                    image.width(),
                    image.height()
                ),
            );
        }
        let example = Example::from_record(record, image, source, raw.timestamp_ms);
        let mut cache_write_failed = false;
        if let Some(cache) = &self.cache {
            let (cache, stored) = (cache.clone(), example.clone());
            let written = tokio::task::spawn_blocking(move || cache.store(&key, &stored)).await;
            if let Ok(Err(e)) | Err(e) = written.map_err(anyhow::Error::from) {
                tracing::warn!(error = %format!("{e:#}"), "cannot write a replay cache entry");
                cache_write_failed = true;
            }
        }
        Outcome::Example {
            example: Box::new(example),
            from_cache: false,
            fetched: true,
            cache_write_failed,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------

/// Version of the cache layout and of what "decoded" means; bump it when decoding changes
/// (EXIF handling, colour conversion) so old entries are not used.
const CACHE_VERSION: u32 = 1;

/// Identifies a cache entry: partition, offset and the SHA-256 of the record's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    partition: i32,
    offset: i64,
    value_sha256: String,
}

impl CacheKey {
    /// The key of the record at `partition`/`offset` with these value bytes.
    pub fn new(partition: i32, offset: i64, value: &[u8]) -> Self {
        Self {
            partition,
            offset,
            value_sha256: hex::encode(Sha256::digest(value)),
        }
    }
}

/// Decoded examples on disk: `DIR/v1/<topic>/<partition>/<offset>-<sha256 prefix>.{png,json}`.
/// The PNG holds the decoded RGB pixels (lossless), the JSON the annotations; an entry is
/// complete when its JSON exists (written last, both renamed into place).
#[derive(Debug, Clone)]
pub struct ExampleCache {
    dir: PathBuf,
}

/// The JSON half of a cache entry.
#[derive(Debug, Serialize, Deserialize)]
struct CachedAnnotations {
    version: u32,
    value_sha256: String,
    product_id: String,
    width: u32,
    height: u32,
    boxes: Vec<[f32; 4]>,
    labels: Vec<String>,
    iscrowd: Vec<bool>,
    split_hint: Option<SplitHint>,
    label_source: String,
    event_id: Option<String>,
    metadata: BTreeMap<String, String>,
}

impl ExampleCache {
    /// The cache of `topic` under `dir` (created if missing).
    pub fn open(dir: &Path, topic: &str) -> Result<Self> {
        let dir = dir.join(format!("v{CACHE_VERSION}")).join(escape_topic(topic));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the replay cache folder {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn paths(&self, key: &CacheKey) -> (PathBuf, PathBuf) {
        let base = self
            .dir
            .join(key.partition.to_string())
            .join(format!("{}-{}", key.offset, &key.value_sha256[..32]));
        (base.with_extension("png"), base.with_extension("json"))
    }

    /// The cached example for `key`, `None` when there is no complete, matching entry.
    pub fn load(&self, key: &CacheKey, source: RecordSource, timestamp_ms: Option<i64>) -> Result<Option<Example>> {
        let (png, json) = self.paths(key);
        let Ok(text) = std::fs::read(&json) else {
            return Ok(None);
        };
        let meta: CachedAnnotations = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        if meta.version != CACHE_VERSION || meta.value_sha256 != key.value_sha256 {
            return Ok(None);
        }
        let Ok(image) = image::open(&png) else {
            return Ok(None);
        };
        let image = image.to_rgb8();
        if (image.width(), image.height()) != (meta.width, meta.height) {
            return Ok(None);
        }
        Ok(Some(Example {
            product_id: meta.product_id,
            image,
            boxes: meta.boxes,
            labels: meta.labels,
            iscrowd: meta.iscrowd,
            split_hint: meta.split_hint,
            label_source: meta.label_source,
            event_id: meta.event_id,
            metadata: meta.metadata,
            source,
            timestamp_ms,
        }))
    }

    /// Stores an example under `key` (PNG first, then the JSON that marks it complete).
    pub fn store(&self, key: &CacheKey, example: &Example) -> Result<()> {
        let (png, json) = self.paths(key);
        let folder = png.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
        let mut encoded = Vec::new();
        image::codecs::png::PngEncoder::new_with_quality(
            &mut encoded,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Sub,
        )
        .write_image(
            example.image.as_raw(),
            example.width(),
            example.height(),
            image::ExtendedColorType::Rgb8,
        )
        .context("encoding a cache PNG")?;
        write_atomically(&png, &encoded)?;
        let meta = CachedAnnotations {
            version: CACHE_VERSION,
            value_sha256: key.value_sha256.clone(),
            product_id: example.product_id.clone(),
            width: example.width(),
            height: example.height(),
            boxes: example.boxes.clone(),
            labels: example.labels.clone(),
            iscrowd: example.iscrowd.clone(),
            split_hint: example.split_hint,
            label_source: example.label_source.clone(),
            event_id: example.event_id.clone(),
            metadata: example.metadata.clone(),
        };
        write_atomically(&json, &serde_json::to_vec(&meta)?)
    }
}

/// Writes a file under a temporary name and renames it into place, so readers (other epochs,
/// concurrent runs) never see half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))
}

/// Kafka topic names are `[a-zA-Z0-9._-]`; anything else (and a leading dot) is escaped so a
/// topic name can never leave the cache folder.
fn escape_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for (i, c) in topic.chars().enumerate() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' || (c == '.' && i > 0) {
            out.push(c);
        } else {
            for b in c.to_string().bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_ranges_parse_as_documented() {
        let r: RangeSpec = "beginning..end".parse().unwrap();
        assert_eq!((r.partition, r.start, r.end), (None, Bound::Beginning, Bound::End));
        let r: RangeSpec = "1000..5000".parse().unwrap();
        assert_eq!((r.start, r.end), (Bound::Offset(1000), Bound::Offset(5000)));
        let r: RangeSpec = "@1700000000000..end".parse().unwrap();
        assert_eq!((r.start, r.end), (Bound::Timestamp(1_700_000_000_000), Bound::End));
        let r: RangeSpec = "0:100..200".parse().unwrap();
        assert_eq!(
            (r.partition, r.start, r.end),
            (Some(0), Bound::Offset(100), Bound::Offset(200))
        );
        let r: RangeSpec = " 3:..@5 ".parse().unwrap();
        assert_eq!(
            (r.partition, r.start, r.end),
            (Some(3), Bound::Beginning, Bound::Timestamp(5))
        );
        for text in ["0:100..200", "@5..end", "beginning..7"] {
            assert_eq!(text.parse::<RangeSpec>().unwrap().to_string(), text);
        }
        for bad in ["100", "a..b", "-1..5", "x:1..2", "1..@", "-2:1..2"] {
            let err = bad.parse::<RangeSpec>().unwrap_err();
            assert!(err.contains(bad.trim()), "{bad}: {err}");
        }
    }

    #[test]
    fn ranges_pick_partitions() {
        let all = ReplayRanges::everything();
        assert_eq!(all.for_partition(7).unwrap().start, Bound::Beginning);
        let some = ReplayRanges::parse(&["0:1..2,2:3..4"]).unwrap();
        assert_eq!(some.for_partition(0).unwrap().end, Bound::Offset(2));
        assert!(some.for_partition(1).is_none());
        let mixed = ReplayRanges::parse(&["@10..end", "1:5..6"]).unwrap();
        assert_eq!(mixed.for_partition(0).unwrap().start, Bound::Timestamp(10));
        assert_eq!(mixed.for_partition(1).unwrap().start, Bound::Offset(5));
        assert!(ReplayRanges::parse(&["0:1..2", "0:3..4"])
            .unwrap_err()
            .to_string()
            .contains("partition 0"));
        assert!(ReplayRanges::parse(&["1..2", "3..4"]).is_err());
    }

    #[test]
    fn timestamp_filter_is_half_open() {
        let p = PartitionSnapshot {
            partition: 0,
            start: 0,
            end: 10,
            min_timestamp_ms: Some(100),
            end_timestamp_ms: Some(200),
        };
        assert!(!p.accepts_timestamp(Some(99)));
        assert!(p.accepts_timestamp(Some(100)));
        assert!(p.accepts_timestamp(Some(199)));
        assert!(!p.accepts_timestamp(Some(200)));
        assert!(!p.accepts_timestamp(None));
        let open = PartitionSnapshot {
            min_timestamp_ms: None,
            end_timestamp_ms: None,
            ..p
        };
        assert!(open.accepts_timestamp(None));
    }

    #[test]
    fn replay_never_joins_a_group_or_commits() {
        let mut options = ReplayOptions::new("b:9092", "t");
        options.kafka_properties.extend([
            ("group.id".to_string(), "trainer".to_string()),
            ("enable.auto.commit".to_string(), "true".to_string()),
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
        ]);
        let config = consumer_config(&options, "attrstream-replay-x");
        assert_eq!(config.get("group.id"), Some("attrstream-replay-x"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn cache_keys_depend_on_the_record_bytes_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ExampleCache::open(dir.path(), "labels").unwrap();
        let source = RecordSource {
            topic: "labels".into(),
            partition: 1,
            offset: 5,
        };
        let example = Example {
            product_id: "p".into(),
            image: RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9])),
            boxes: vec![[1.0, 1.5, 3.0, 4.0]],
            labels: vec!["red_circle".into()],
            iscrowd: vec![true],
            split_hint: Some(SplitHint::Test),
            label_source: "synthetic".into(),
            event_id: Some("e".into()),
            metadata: [("file_name".to_string(), "x.png".to_string())].into(),
            source: source.clone(),
            timestamp_ms: Some(3),
        };
        let key = CacheKey::new(1, 5, b"value");
        assert!(cache.load(&key, source.clone(), Some(3)).unwrap().is_none());
        cache.store(&key, &example).unwrap();
        assert_eq!(cache.load(&key, source.clone(), Some(3)).unwrap(), Some(example));
        let changed = CacheKey::new(1, 5, b"other value");
        assert!(cache.load(&changed, source, Some(3)).unwrap().is_none());
    }

    #[test]
    fn topic_names_cannot_escape_the_cache() {
        assert_eq!(escape_topic("labelled-images.v2_x"), "labelled-images.v2_x");
        assert_eq!(escape_topic("../x"), "%2E.%2Fx");
        assert_eq!(escape_topic("a/b"), "a%2Fb");
    }
}
