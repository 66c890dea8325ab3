//! The domain records that cross the Kafka boundary, as plain Rust values.
//!
//! They mirror the Avro schemas in `schemas/` field for field (the codec in
//! [`crate::events::codec`] converts between the two); serde derives let `tail` and the
//! tests print them as JSON. Timestamps are milliseconds since the Unix epoch (UTC).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Input: one product photo to turn into attributes (schema `ProductImageEvent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductImageEvent {
    /// Producer-assigned id, copied to the output so consumers can de-duplicate redeliveries.
    pub event_id: String,
    /// The product the photo shows; the output record's Kafka key.
    pub product_id: String,
    /// The photo itself or where to fetch it.
    pub image: ImageSource,
    /// MIME type if the producer knows it (informational; the decoder sniffs the bytes).
    pub content_type: Option<String>,
    /// Free-form producer metadata, passed through to the output.
    pub metadata: BTreeMap<String, String>,
    /// When the producer created the event.
    pub event_time_ms: Option<i64>,
}

/// Where an event's image bytes come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// The encoded image (JPEG, PNG, …) inside the event.
    Inline(#[serde(with = "serde_bytes_base64")] Vec<u8>),
    /// A `file://`, `http(s)://` or `s3://` URI to fetch.
    Uri(String),
}

/// Output: the attributes of one product photo (schema `ProductAttributes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductAttributes {
    /// The input event's id (consumers de-duplicate on it).
    pub event_id: String,
    /// The input event's product id; also the Kafka message key.
    pub product_id: String,
    /// Which model produced the detections.
    pub model: ModelRef,
    /// Width of the decoded (EXIF-oriented) image in pixels.
    pub image_width: u32,
    /// Height of the decoded (EXIF-oriented) image in pixels.
    pub image_height: u32,
    /// Every detection above the score threshold, best first.
    pub detections: Vec<DetectionRecord>,
    /// Detections aggregated into product attributes.
    pub attributes: AggregatedAttributes,
    /// Time spent in each pipeline stage for this event.
    pub timings: StageTimings,
    /// The input event's time, if it had one.
    pub event_time_ms: Option<i64>,
    /// When this record was produced.
    pub processed_time_ms: i64,
    /// The input event's metadata, unchanged.
    pub metadata: BTreeMap<String, String>,
}

/// Model identity written into every output record (changes on hot swap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Architecture or registry name, e.g. `ssd_mobilenet_v2_coco`.
    pub name: String,
    /// Version: registry version or the weights file's sha256 prefix.
    pub version: String,
}

/// One detected object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionRecord {
    /// Class name from the model's label map.
    pub label: String,
    /// Class index in the model's label map.
    pub label_id: i32,
    /// Confidence in [0, 1].
    pub score: f32,
    /// Box in pixels of the decoded image.
    pub box_px: BoxRecord,
    /// Box divided by image width/height, in [0, 1].
    pub box_norm: BoxRecord,
}

/// An axis-aligned box, corners inclusive-exclusive as torchvision reports them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoxRecord {
    /// Left edge.
    pub x_min: f32,
    /// Top edge.
    pub y_min: f32,
    /// Right edge.
    pub x_max: f32,
    /// Bottom edge.
    pub y_max: f32,
}

/// What recommender systems usually want instead of raw boxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AggregatedAttributes {
    /// Each distinct label once, with its best score and how often it was detected.
    pub labels: Vec<LabelSummary>,
    /// The detection the photo is most likely about (see `attributes::main_object`).
    pub main_object: Option<MainObject>,
    /// Dominant colours inside each detection's box.
    pub object_colours: Vec<ObjectColours>,
}

/// One distinct label of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelSummary {
    /// Class name.
    pub label: String,
    /// Highest score among detections with this label.
    pub max_score: f32,
    /// Number of detections with this label.
    pub count: i32,
}

/// The detection chosen as the photo's subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MainObject {
    /// Class name.
    pub label: String,
    /// Its score.
    pub score: f32,
    /// Index into `detections`.
    pub detection_index: i32,
    /// Box area divided by image area.
    pub area_fraction: f32,
}

/// Dominant colours of one detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectColours {
    /// Index into `detections`.
    pub detection_index: i32,
    /// The detection's label (repeated for convenience).
    pub label: String,
    /// Colours, largest share first.
    pub colours: Vec<DominantColour>,
}

/// A dominant colour with a human name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DominantColour {
    /// Nearest basic colour name (e.g. `red`, `navy`, `beige`).
    pub name: String,
    /// Red, 0–255.
    pub r: u8,
    /// Green, 0–255.
    pub g: u8,
    /// Blue, 0–255.
    pub b: u8,
    /// Share of the box's pixels in this colour cluster, in [0, 1].
    pub fraction: f32,
}

/// Milliseconds spent in each stage for one event.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct StageTimings {
    /// Fetching the image bytes (0 for inline images).
    pub fetch_ms: f64,
    /// Decoding the image.
    pub decode_ms: f64,
    /// Waiting in the batcher and the device queue.
    pub batch_wait_ms: f64,
    /// The batch's inference (shared by every image in the batch).
    pub inference_ms: f64,
    /// From receipt of the Kafka message to the output record being built.
    pub total_ms: f64,
}

/// A message that could not be processed, with the reason (schema `DeadLetter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The original message key, unchanged.
    #[serde(with = "serde_opt_bytes_base64")]
    pub original_key: Option<Vec<u8>>,
    /// The original message value, unchanged (so it can be replayed after a fix).
    #[serde(with = "serde_bytes_base64")]
    pub original_value: Vec<u8>,
    /// Topic the message was read from.
    pub source_topic: String,
    /// Partition the message was read from.
    pub source_partition: i32,
    /// Offset of the message.
    pub source_offset: i64,
    /// The event id, when the event could be decoded.
    pub event_id: Option<String>,
    /// The product id, when the event could be decoded.
    pub product_id: Option<String>,
    /// Machine-readable reason, one of [`crate::events::error_kinds`].
    pub error_kind: String,
    /// Human-readable detail.
    pub error_message: String,
    /// When the message was dead-lettered.
    pub failed_time_ms: i64,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Serde helper: bytes as base64 in JSON so `tail` output stays readable.
mod serde_bytes_base64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// Serde helper: optional bytes as base64 in JSON.
mod serde_opt_bytes_base64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| {
                base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
    }
}
