//! The output side: attribute records and dead letters produced to Kafka, each completion
//! reported to the offset tracker only after the broker acknowledged the record.
//!
//! A produce that keeps failing after `pipeline.produce_retries` is fatal: the service stops
//! without committing that message, so it is redelivered after a restart instead of lost.
//!
//! [`postgres`] is the optional second destination of attribute records; with it on, the
//! pipeline produces with [`OutputSink::produce_attributes`] and completes the message itself
//! (`OutputSink::complete`, crate-internal) once the row is written too.

pub mod postgres;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::kafka_errors::QuietContext;

/// The producer every command uses: librdkafka's, with its global errors rate-limited in the
/// logs ([`QuietContext`]).
pub type KafkaProducer = FutureProducer<QuietContext>;
use rdkafka::util::Timeout;
use tokio::sync::watch;

use crate::events::codec::{encode_attributes, encode_dead_letter};
use crate::events::wire::frame;
use crate::events::{DeadLetter, ProductAttributes};
use crate::source::{CompletionSender, MessagePosition};

/// Producer settings that make delivery safe by default (users may override via options).
pub fn producer_defaults() -> Vec<(&'static str, &'static str)> {
    vec![
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
    ]
}

/// Creates a producer from `bootstrap.servers` and librdkafka properties (applied in order).
pub fn create_producer(properties: &[(String, String)]) -> Result<KafkaProducer> {
    let mut config = ClientConfig::new();
    for (k, v) in producer_defaults() {
        config.set(k, v);
    }
    for (k, v) in properties {
        config.set(k, v);
    }
    config
        .create_with_context(QuietContext::default())
        .context("cannot create the Kafka producer (check kafka.* settings)")
}

/// Where records go and with which schema ids.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// Topic of ProductAttributes records.
    pub output_topic: String,
    /// Topic of DeadLetter records.
    pub dead_letter_topic: String,
    /// Schema id framed into output records.
    pub output_schema_id: u32,
    /// Schema id framed into dead letters.
    pub dead_letter_schema_id: u32,
    /// Produce attempts after the first before giving up (fatal).
    pub retries: u32,
}

/// Produces records and reports completions; cheap to clone into tasks.
#[derive(Clone)]
pub struct OutputSink {
    producer: KafkaProducer,
    settings: Arc<SinkSettings>,
    completions: CompletionSender,
    fatal: watch::Sender<Option<String>>,
}

impl OutputSink {
    /// A sink over `producer`; a permanent failure is announced on `fatal`.
    pub fn new(
        producer: KafkaProducer,
        settings: SinkSettings,
        completions: CompletionSender,
        fatal: watch::Sender<Option<String>>,
    ) -> Self {
        Self {
            producer,
            settings: Arc::new(settings),
            completions,
            fatal,
        }
    }

    /// Produces an attribute record (key = product id) and completes `position` once
    /// acknowledged; false if it could not be delivered (the service is then stopping).
    pub async fn deliver_attributes(
        &self,
        position: MessagePosition,
        record: &ProductAttributes,
        headers: &[(String, Vec<u8>)],
    ) -> bool {
        let delivered = self.produce_attributes(position, record, headers).await;
        if delivered {
            self.complete(position);
        }
        delivered
    }

    /// Produces an attribute record like [`OutputSink::deliver_attributes`] but does not
    /// complete `position`: for a caller that must also wait for another write (the database)
    /// and then calls `OutputSink::complete` or delivers a dead letter. False if it could
    /// not be delivered (the service is then stopping).
    pub async fn produce_attributes(
        &self,
        position: MessagePosition,
        record: &ProductAttributes,
        headers: &[(String, Vec<u8>)],
    ) -> bool {
        let payload = frame(self.settings.output_schema_id, &encode_attributes(record));
        let topic = self.settings.output_topic.clone();
        self.send(position, &topic, Some(record.product_id.as_bytes()), &payload, headers)
            .await
    }

    /// Reports `position` finished to the offset tracker (exactly once per message). The
    /// consumer thread may be gone after a shutdown deadline; then there is nothing to do.
    pub(crate) fn complete(&self, position: MessagePosition) {
        let _ = self.completions.send(position);
    }

    /// Produces a dead letter (original key kept, with `headers`: the event's trace context)
    /// and completes `position` once acknowledged; false if it could not be delivered.
    pub async fn deliver_dead_letter(
        &self,
        position: MessagePosition,
        letter: &DeadLetter,
        headers: &[(String, Vec<u8>)],
    ) -> bool {
        tracing::info!(
            partition = letter.source_partition,
            offset = letter.source_offset,
            kind = %letter.error_kind,
            error = %letter.error_message,
            "dead-lettered"
        );
        let payload = frame(self.settings.dead_letter_schema_id, &encode_dead_letter(letter));
        let topic = self.settings.dead_letter_topic.clone();
        let key = letter.original_key.clone();
        let delivered = self.send(position, &topic, key.as_deref(), &payload, headers).await;
        if delivered {
            self.complete(position);
        }
        delivered
    }

    /// Produces one record with retries; false after a fatal failure (announced on `fatal`).
    async fn send(
        &self,
        position: MessagePosition,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> bool {
        let mut attempt = 0;
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            if !headers.is_empty() {
                let mut h = OwnedHeaders::new_with_capacity(headers.len());
                for (name, value) in headers {
                    h = h.insert(Header {
                        key: name,
                        value: Some(value),
                    });
                }
                record = record.headers(h);
            }
            match self.producer.send(record, Timeout::Never).await {
                Ok(_) => return true,
                Err((e, _)) if attempt < self.settings.retries => {
                    attempt += 1;
                    let delay = Duration::from_millis(200 * 2u64.pow(attempt.min(6)));
                    tracing::warn!(error = %e, topic, attempt, "produce failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
                Err((e, _)) => {
                    let message = format!(
                        "producing to {topic} failed {} times ({e}); stopping without committing \
                         partition {} offset {} so it is redelivered after a restart",
                        attempt + 1,
                        position.partition,
                        position.offset
                    );
                    tracing::error!("{message}");
                    let _ = self.fatal.send(Some(message));
                    return false;
                }
            }
        }
    }

    /// Waits for every queued record to be acknowledged (or `timeout`).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).context("flushing the producer")
    }
}
