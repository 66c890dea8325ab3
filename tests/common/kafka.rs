//! Kafka helpers for the integration tests: publish raw values, read topics back, read
//! committed offsets, and a fake inference backend for tests about streaming semantics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attrstream::detection::{Detection, ImageDetections};
use attrstream::events::ModelRef;
use attrstream::pipeline::Inference;
use attrstream::workers::{BackendFactory, InferenceBackend};
use image::RgbImage;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// Produces raw values (already framed) with keys and waits for the acknowledgements.
pub fn produce_raw(brokers: &str, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    for (key, value) in records {
        loop {
            match producer.send(BaseRecord::to(topic).key(key).payload(value)) {
                Ok(()) => break,
                Err((e, _)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "produce failed: {e}"
                    );
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// A record read back: topic, partition, offset, key, value and headers (values as UTF-8,
/// lossily).
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads `topics` from the beginning (no group commits) until `count` records arrived or
/// `timeout` passed.
pub fn read_topics(brokers: &str, topics: &[&str], count: usize, timeout: Duration) -> Vec<ReadRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(topics).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(ReadRecord {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().unwrap_or_default().to_vec(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                let value = String::from_utf8_lossy(x.value.unwrap_or_default());
                                (x.key.to_string(), value.into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    out
}

/// The group's committed offset per partition of `topic` (partitions 0..partitions).
pub fn committed_offsets(brokers: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let result = {
        // Keep the returned list in a narrow scope: alive at drop it hangs rd_kafka_destroy.
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                };
                (e.partition(), offset)
            })
            .collect()
    };
    drop(consumer);
    result
}

/// Number of messages per partition (high watermark) of `topic`.
pub fn end_offsets(brokers: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, high)
        })
        .collect()
}

/// A stand-in model: one "thing" detection over the image's central half, after an
/// optional delay per batch. Lets streaming tests run fast and deterministically.
/// Images whose top-left pixel is magenta (255, 0, 255) make it panic, like a model bug.
pub struct FakeDetector {
    pub delay: Duration,
    /// The model version written into output records.
    pub version: &'static str,
}

impl InferenceBackend for FakeDetector {
    fn model(&self) -> ModelRef {
        ModelRef {
            name: "fake".into(),
            version: self.version.into(),
        }
    }

    fn infer(&mut self, images: &[RgbImage]) -> anyhow::Result<Vec<ImageDetections>> {
        std::thread::sleep(self.delay);
        if images.iter().any(|im| im.get_pixel(0, 0).0 == POISON_RGB) {
            panic!("fake model cannot handle magenta");
        }
        Ok(images
            .iter()
            .map(|im| {
                let (w, h) = (im.width() as f32, im.height() as f32);
                let b = [w / 4.0, h / 4.0, 3.0 * w / 4.0, 3.0 * h / 4.0];
                ImageDetections {
                    width: im.width(),
                    height: im.height(),
                    detections: vec![Detection {
                        label: "thing".into(),
                        label_id: 1,
                        score: 0.9,
                        box_px: b,
                        box_norm: [0.25, 0.25, 0.75, 0.75],
                    }],
                }
            })
            .collect())
    }
}

/// The colour that makes [`FakeDetector`] panic.
pub const POISON_RGB: [u8; 3] = [255, 0, 255];

/// Builds [`FakeDetector`]s of model version `version` with `delay` per batch.
pub fn fake_factory(delay: Duration, version: &'static str) -> BackendFactory {
    Arc::new(move |_| Ok(Box::new(FakeDetector { delay, version }) as Box<dyn InferenceBackend>))
}

/// `workers` fake workers (model version "1") with `delay` per batch.
pub fn fake_inference(workers: usize, delay: Duration) -> Inference {
    Inference::new(workers, fake_factory(delay, "1"))
}

/// A small PNG of one colour.
pub fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = RgbImage::from_pixel(width, height, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// A PNG whose header declares `width` x `height` pixels, with no pixel data behind it.
pub fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let crc = crc32(&ihdr);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
