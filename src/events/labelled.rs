//! Labelled training images (`schemas/labelled_image.avsc`, record `io.attrstream.LabelledImage`):
//! the Rust record, its Avro binary codec and Confluent framing.
//!
//! A labelled-images topic is the fine-tuning mode's input: `attrstream publish-labels` (or
//! any labelling tool) writes one record per photo with its ground-truth boxes, and
//! [`crate::train::replay`] reads a bounded snapshot of it back. Like the other contracts, the
//! schema file is embedded at build time and is the single source of truth; the encoder writes
//! the Avro binary encoding field by field in schema order, and the tests hold it to the file
//! with apache-avro (strict decode, byte-equal re-encode) and with Python's fastavro.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use apache_avro::types::Value;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use super::codec::DecodeError;
use super::registry::SchemaRegistry;
use super::wire;
use super::ImageSource;

/// The topic `publish-labels` writes to and the trainer replays when none is given.
pub const DEFAULT_LABELLED_TOPIC: &str = "labelled-images";

/// Well-known values of [`LabelledImage::label_source`]. The field is a free string so new
/// sources need no schema change; these are the ones attrstream itself writes or expects.
pub mod label_sources {
    /// Boxes drawn by people.
    pub const HUMAN: &str = "human";
    /// Imported from a COCO annotation file by `attrstream publish-labels`.
    pub const COCO_IMPORT: &str = "coco-import";
    /// Generated with known boxes by `attrstream synth-labels`.
    pub const SYNTHETIC: &str = "synthetic";
    /// Pseudo-labels predicted by a model.
    pub const MODEL: &str = "model";
}

/// One product photo with its ground-truth boxes (schema `LabelledImage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledImage {
    /// The product the photo shows (non-empty); the split keeps a product on one side.
    pub product_id: String,
    /// The photo itself or where to fetch it.
    pub image: ImageSource,
    /// Width in pixels the boxes refer to, if the producer knows it (checked after decoding).
    pub width: Option<u32>,
    /// Height in pixels the boxes refer to, if the producer knows it (checked after decoding).
    pub height: Option<u32>,
    /// Every labelled object; empty for a negative example.
    pub annotations: Vec<BoxAnnotation>,
    /// Which data set the labeller meant the photo for, if any.
    pub split: Option<SplitHint>,
    /// Where the labels come from (see [`label_sources`]).
    pub label_source: String,
    /// Producer-assigned id for de-duplication, if any.
    pub event_id: Option<String>,
    /// When the labels were made or published (ms since the Unix epoch), if known.
    pub event_time_ms: Option<i64>,
    /// Free-form producer metadata (source file name, COCO image id, …).
    pub metadata: BTreeMap<String, String>,
}

/// One labelled object: a box in pixels (torchvision's x1, y1, x2, y2) and its class name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxAnnotation {
    /// Left edge in pixels.
    pub x1: f32,
    /// Top edge in pixels.
    pub y1: f32,
    /// Right edge in pixels (>= `x1`).
    pub x2: f32,
    /// Bottom edge in pixels (>= `y1`).
    pub y2: f32,
    /// Class name (non-empty).
    pub label: String,
    /// COCO's iscrowd flag; `None` means not a crowd.
    pub iscrowd: Option<bool>,
}

impl BoxAnnotation {
    /// The box as `[x1, y1, x2, y2]`, the layout the trainer and torchvision use.
    pub fn xyxy(&self) -> [f32; 4] {
        [self.x1, self.y1, self.x2, self.y2]
    }

    /// Whether the box marks a crowd (COCO `iscrowd`), `None` counting as false.
    pub fn is_crowd(&self) -> bool {
        self.iscrowd.unwrap_or(false)
    }
}

/// The labeller's split preference (Avro enum `SplitHint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitHint {
    /// Meant for training.
    Train,
    /// Meant for validation (model selection, early stopping).
    Validation,
    /// Meant for the final test set (never trained on or selected with).
    Test,
}

impl SplitHint {
    /// Every hint in schema symbol order (the Avro enum index is the position here).
    pub const ALL: [SplitHint; 3] = [SplitHint::Train, SplitHint::Validation, SplitHint::Test];

    /// The Avro symbol (`train`, `validation`, `test`).
    pub fn as_str(self) -> &'static str {
        match self {
            SplitHint::Train => "train",
            SplitHint::Validation => "validation",
            SplitHint::Test => "test",
        }
    }

    fn index(self) -> i64 {
        match self {
            SplitHint::Train => 0,
            SplitHint::Validation => 1,
            SplitHint::Test => 2,
        }
    }
}

impl fmt::Display for SplitHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SplitHint {
    type Err = String;

    /// Parses `train`, `validation` (or `val`) and `test`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(SplitHint::Train),
            "validation" | "val" => Ok(SplitHint::Validation),
            "test" => Ok(SplitHint::Test),
            other => Err(format!("unknown split {other:?}: use train, validation or test")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The embedded schema
// ---------------------------------------------------------------------------------------

const SCHEMA_TEXT: &str = include_str!("../../schemas/labelled_image.avsc");

static SCHEMA: LazyLock<(Schema, String)> = LazyLock::new(|| {
    let schema = Schema::parse_str(SCHEMA_TEXT)
        .unwrap_or_else(|e| panic!("schemas/labelled_image.avsc is not a valid Avro schema: {e}"));
    (schema, compact_json(SCHEMA_TEXT))
});

/// The schema `io.attrstream.LabelledImage`: our reader schema and the writer schema of what we publish.
pub fn labelled_image_schema() -> &'static Schema {
    &SCHEMA.0
}

/// `schemas/labelled_image.avsc` as compact JSON with docs and defaults kept: the text to
/// register in or look up from a schema registry (subject `<topic>-value`).
pub fn labelled_image_schema_json() -> &'static str {
    &SCHEMA.1
}

/// JSON text without insignificant whitespace, keys in file order (as the codec does for the
/// other schemas, so registered texts read like the files).
fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Encodes a record as a bare Avro datum of [`labelled_image_schema`] (no framing).
pub fn encode_labelled(record: &LabelledImage) -> Vec<u8> {
    let image_len = match &record.image {
        ImageSource::Inline(data) => data.len(),
        ImageSource::Uri(uri) => uri.len(),
    };
    let mut out = Avro(Vec::with_capacity(96 + image_len + 40 * record.annotations.len()));
    out.string(&record.product_id);
    match &record.image {
        ImageSource::Inline(data) => {
            out.long(0);
            out.bytes(data);
        }
        ImageSource::Uri(uri) => {
            out.long(1);
            out.string(uri);
        }
    }
    out.optional(record.width, |o, v| o.long(saturating_int(v)));
    out.optional(record.height, |o, v| o.long(saturating_int(v)));
    if !record.annotations.is_empty() {
        out.long(record.annotations.len() as i64);
        for a in &record.annotations {
            for v in [a.x1, a.y1, a.x2, a.y2] {
                out.0.extend_from_slice(&v.to_le_bytes());
            }
            out.string(&a.label);
            out.optional(a.iscrowd, |o, v| o.0.push(u8::from(v)));
        }
    }
    out.long(0);
    out.optional(record.split, |o, s| o.long(s.index()));
    out.string(&record.label_source);
    out.optional(record.event_id.as_deref(), Avro::string);
    out.optional(record.event_time_ms, Avro::long);
    if !record.metadata.is_empty() {
        out.long(record.metadata.len() as i64);
        for (k, v) in &record.metadata {
            out.string(k);
            out.string(v);
        }
    }
    out.long(0);
    out.0
}

/// Encodes a record and prefixes the Confluent header for `schema_id`: a Kafka value any
/// schema-registry Avro deserializer reads.
pub fn encode_labelled_framed(schema_id: u32, record: &LabelledImage) -> Vec<u8> {
    wire::frame(schema_id, &encode_labelled(record))
}

/// Avro `int`s are 32-bit; sizes beyond that cannot be real images, so they saturate.
fn saturating_int(v: u32) -> i64 {
    i64::from(v.min(i32::MAX as u32))
}

/// The Avro binary encoding of the primitive shapes this schema uses (specification:
/// "Binary Encoding").
struct Avro(Vec<u8>);

impl Avro {
    /// `long` and `int`: zig-zag, then a little-endian base-128 varint.
    fn long(&mut self, v: i64) {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        while n >= 0x80 {
            self.0.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.0.extend_from_slice(b);
    }

    fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// A `["null", T]` union.
    fn optional<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Avro, T)) {
        match value {
            None => self.long(0),
            Some(v) => {
                self.long(1);
                write(self, v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// Decodes a record body written with `writer` (resolved to [`labelled_image_schema`]) and
/// checks the contract's rules.
///
/// Errors: [`DecodeError::BadAvro`] when the bytes do not decode with `writer` (left-over
/// bytes included), [`DecodeError::SchemaMismatch`] when `writer` cannot be read as ours,
/// [`DecodeError::InvalidEvent`] when a rule is broken (empty product id, label or image URI,
/// a box that is not finite or has x2 < x1 or y2 < y1, a negative width or height).
pub fn decode_labelled(body: &[u8], writer: &Schema) -> Result<LabelledImage, DecodeError> {
    let reader = labelled_image_schema();
    let mut rest = body;
    let value = apache_avro::from_avro_datum(writer, &mut rest, None)
        .map_err(|e| DecodeError::BadAvro(format!("{} bytes: {e}", body.len())))?;
    if !rest.is_empty() {
        return Err(DecodeError::BadAvro(format!(
            "{} bytes left over after the record ({} bytes read): the body was probably written with a \
             different schema than the one its schema id names",
            rest.len(),
            body.len() - rest.len()
        )));
    }
    let value = if std::ptr::eq(writer, reader) || writer == reader {
        value
    } else {
        value.resolve(reader).map_err(|e| mismatch(e.to_string()))?
    };
    validate(from_value(value).map_err(mismatch)?)
}

/// Splits a Confluent-framed value and decodes its body with our own schema as the writer
/// schema (for topics written by attrstream, or when no registry is configured); returns the
/// schema id from the header too.
pub fn decode_labelled_framed(value: &[u8]) -> Result<(u32, LabelledImage), DecodeError> {
    let (id, body) = wire::unframe(value)?;
    let record = decode_labelled(body, labelled_image_schema()).map_err(|e| with_schema_id(e, id))?;
    Ok((id, record))
}

/// Reads Confluent-framed LabelledImage values: the writer schema comes from the schema
/// registry when one is given (fetched once per id, so producers on an older or newer
/// compatible schema keep working), else every value is read with our own schema.
#[derive(Debug, Clone, Default)]
pub struct LabelledDecoder {
    registry: Option<Arc<SchemaRegistry>>,
}

impl LabelledDecoder {
    /// A decoder that looks writer schemas up in `registry`, or uses ours when `None`.
    pub fn new(registry: Option<Arc<SchemaRegistry>>) -> Self {
        Self { registry }
    }

    /// Decodes one Kafka value. [`DecodeError::RegistryUnavailable`] means the registry could
    /// not be asked (not the record's fault): callers should stop or retry rather than skip.
    pub async fn decode(&self, value: &[u8]) -> Result<LabelledImage, DecodeError> {
        let (id, body) = wire::unframe(value)?;
        let Some(registry) = &self.registry else {
            return decode_labelled(body, labelled_image_schema()).map_err(|e| with_schema_id(e, id));
        };
        let writer = registry.shared_schema_by_id(id).await.map_err(|e| {
            if e.is_not_found() || matches!(e, super::registry::RegistryError::UnusableSchema { .. }) {
                DecodeError::UnknownSchema {
                    id,
                    reason: e.to_string(),
                }
            } else {
                DecodeError::RegistryUnavailable {
                    id,
                    reason: e.to_string(),
                }
            }
        })?;
        decode_labelled(body, &writer).map_err(|e| with_schema_id(e, id))
    }
}

fn with_schema_id(e: DecodeError, id: u32) -> DecodeError {
    match e {
        DecodeError::BadAvro(m) => DecodeError::BadAvro(format!("{m} (writer schema id {id})")),
        DecodeError::SchemaMismatch { record, reason } => DecodeError::SchemaMismatch {
            record,
            reason: format!("writer schema id {id}: {reason}"),
        },
        other => other,
    }
}

fn mismatch(reason: String) -> DecodeError {
    DecodeError::SchemaMismatch {
        record: "LabelledImage",
        reason,
    }
}

fn validate(record: LabelledImage) -> Result<LabelledImage, DecodeError> {
    let mut reason = None;
    if record.product_id.trim().is_empty() {
        reason = Some("product_id is empty".to_owned());
    } else if matches!(&record.image, ImageSource::Uri(uri) if uri.trim().is_empty()) {
        reason = Some("image uri is empty".to_owned());
    } else if record.label_source.trim().is_empty() {
        reason = Some("label_source is empty".to_owned());
    } else {
        for (i, a) in record.annotations.iter().enumerate() {
            let finite = a.xyxy().iter().all(|v| v.is_finite());
            if !finite || a.x2 < a.x1 || a.y2 < a.y1 {
                reason = Some(format!(
                    "annotation {i} has the box ({}, {}, {}, {}): corners must be finite with x1 <= x2 and y1 <= y2",
                    a.x1, a.y1, a.x2, a.y2
                ));
                break;
            }
            if a.label.trim().is_empty() {
                reason = Some(format!("annotation {i} has an empty label"));
                break;
            }
        }
    }
    match reason {
        None => Ok(record),
        Some(reason) => Err(DecodeError::InvalidEvent {
            reason,
            event_id: record.event_id.unwrap_or_default(),
            product_id: record.product_id,
        }),
    }
}

/// The fields of a resolved record, in reader-schema order.
struct Fields(std::vec::IntoIter<(String, Value)>);

impl Fields {
    fn of(value: Value, record: &str) -> Result<Fields, String> {
        match value {
            Value::Record(fields) => Ok(Fields(fields.into_iter())),
            other => Err(format!("expected record {record}, got {}", describe(&other))),
        }
    }

    fn next(&mut self, name: &str) -> Result<Value, String> {
        match self.0.next() {
            Some((field, value)) if field == name => Ok(value),
            Some((field, _)) => Err(format!("expected field {name}, got {field}")),
            None => Err(format!("missing field {name}")),
        }
    }

    fn string(&mut self, name: &str) -> Result<String, String> {
        string(name, self.next(name)?)
    }

    fn float(&mut self, name: &str) -> Result<f32, String> {
        match self.next(name)? {
            Value::Float(f) => Ok(f),
            other => Err(unexpected(name, "float", &other)),
        }
    }

    /// A `["null", T]` field.
    fn optional<T>(
        &mut self,
        name: &str,
        convert: impl FnOnce(Value) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.next(name)? {
            Value::Null => Ok(None),
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                v => convert(v).map(Some),
            },
            other => Err(unexpected(name, "union", &other)),
        }
    }
}

fn string(name: &str, value: Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(unexpected(name, "string", &other)),
    }
}

fn size(name: &str, value: Value) -> Result<u32, String> {
    match value {
        Value::Int(v) => u32::try_from(v).map_err(|_| format!("field {name} is {v}, expected >= 0")),
        other => Err(unexpected(name, "int", &other)),
    }
}

fn unexpected(name: &str, expected: &str, got: &Value) -> String {
    format!("field {name}: expected {expected}, got {}", describe(got))
}

/// A short description of a value for error messages (never all of it: it may be an image).
fn describe(value: &Value) -> String {
    let text = format!("{value:?}");
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn from_value(value: Value) -> Result<LabelledImage, String> {
    let mut f = Fields::of(value, "LabelledImage")?;
    let product_id = f.string("product_id")?;
    let image = match f.next("image")? {
        Value::Union(0, inner) => match Fields::of(*inner, "InlineImage")?.next("data")? {
            Value::Bytes(b) => ImageSource::Inline(b),
            other => return Err(unexpected("data", "bytes", &other)),
        },
        Value::Union(1, inner) => ImageSource::Uri(Fields::of(*inner, "ImageUri")?.string("uri")?),
        other => return Err(unexpected("image", "InlineImage or ImageUri", &other)),
    };
    let width = f.optional("width", |v| size("width", v))?;
    let height = f.optional("height", |v| size("height", v))?;
    let annotations = match f.next("annotations")? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| {
                let mut a = Fields::of(item, "BoxAnnotation")?;
                Ok(BoxAnnotation {
                    x1: a.float("x1")?,
                    y1: a.float("y1")?,
                    x2: a.float("x2")?,
                    y2: a.float("y2")?,
                    label: a.string("label")?,
                    iscrowd: a.optional("iscrowd", |v| match v {
                        Value::Boolean(b) => Ok(b),
                        other => Err(unexpected("iscrowd", "boolean", &other)),
                    })?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?,
        other => return Err(unexpected("annotations", "array", &other)),
    };
    let split = f.optional("split", |v| match v {
        Value::Enum(_, symbol) => symbol.parse::<SplitHint>(),
        other => Err(unexpected("split", "SplitHint", &other)),
    })?;
    let label_source = f.string("label_source")?;
    let event_id = f.optional("event_id", |v| string("event_id", v))?;
    let event_time_ms = f.optional("event_time", |v| match v {
        Value::Long(l) | Value::TimestampMillis(l) => Ok(l),
        other => Err(unexpected("event_time", "long", &other)),
    })?;
    let metadata = match f.next("metadata")? {
        Value::Map(map) => map
            .into_iter()
            .map(|(k, v)| Ok((k, string("metadata", v)?)))
            .collect::<Result<BTreeMap<_, _>, String>>()?,
        other => return Err(unexpected("metadata", "map", &other)),
    };
    Ok(LabelledImage {
        product_id,
        image,
        width,
        height,
        annotations,
        split,
        label_source,
        event_id,
        event_time_ms,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::error_kinds;

    fn record(image: ImageSource) -> LabelledImage {
        LabelledImage {
            product_id: "sku-1".into(),
            image,
            width: Some(160),
            height: Some(120),
            annotations: vec![
                BoxAnnotation {
                    x1: 1.5,
                    y1: 2.0,
                    x2: 50.25,
                    y2: 60.0,
                    label: "red_circle".into(),
                    iscrowd: Some(false),
                },
                BoxAnnotation {
                    x1: 0.0,
                    y1: 0.0,
                    x2: 0.0,
                    y2: 10.0,
                    label: "blue square".into(),
                    iscrowd: None,
                },
            ],
            split: Some(SplitHint::Validation),
            label_source: label_sources::COCO_IMPORT.into(),
            event_id: Some("e-1".into()),
            event_time_ms: Some(1_700_000_000_000),
            metadata: [("file_name".to_owned(), "a.png".to_owned())].into(),
        }
    }

    fn bare() -> LabelledImage {
        LabelledImage {
            width: None,
            height: None,
            annotations: vec![],
            split: None,
            event_id: None,
            event_time_ms: None,
            metadata: BTreeMap::new(),
            ..record(ImageSource::Uri("file:///x.png".into()))
        }
    }

    #[test]
    fn embedded_schema_parses_with_docs_and_namespace() {
        let schema = labelled_image_schema();
        assert_eq!(
            schema.name().map(|n| n.fullname(None)),
            Some("io.attrstream.LabelledImage".to_owned())
        );
        assert!(Schema::parse_str(labelled_image_schema_json()).unwrap() == *schema);
        assert!(!labelled_image_schema_json().contains('\n'));
        // Every record and field has a doc (as the codec's test demands of the other schemas).
        fn walk(v: &serde_json::Value, in_fields: bool, missing: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(o) => {
                    let named = o.contains_key("name") && o.contains_key("type");
                    let is_record = o.get("type") == Some(&serde_json::json!("record"));
                    if (is_record || (named && in_fields)) && o.get("doc").and_then(|d| d.as_str()).is_none() {
                        missing.push(o["name"].to_string());
                    }
                    for (k, child) in o {
                        walk(child, k == "fields", missing);
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|c| walk(c, in_fields, missing)),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        walk(
            &serde_json::from_str(labelled_image_schema_json()).unwrap(),
            false,
            &mut missing,
        );
        assert!(missing.is_empty(), "without doc: {missing:?}");
    }

    #[test]
    fn round_trips_every_shape() {
        for r in [
            record(ImageSource::Inline(vec![0x89, b'P', b'N', b'G', 0])),
            record(ImageSource::Uri("s3://bucket/a.jpg".into())),
            bare(),
        ] {
            let body = encode_labelled(&r);
            assert_eq!(decode_labelled(&body, labelled_image_schema()).unwrap(), r);
            let (id, again) = decode_labelled_framed(&encode_labelled_framed(7, &r)).unwrap();
            assert_eq!((id, again), (7, r));
        }
        for hint in SplitHint::ALL {
            let r = LabelledImage {
                split: Some(hint),
                ..bare()
            };
            assert_eq!(
                decode_labelled(&encode_labelled(&r), labelled_image_schema())
                    .unwrap()
                    .split,
                Some(hint)
            );
            assert_eq!(hint.as_str().parse::<SplitHint>(), Ok(hint));
        }
    }

    #[test]
    fn encoding_equals_apache_avro_for_the_same_values() {
        // Maps with at most one entry: apache-avro's maps are unordered.
        for r in [record(ImageSource::Inline(vec![1, 2, 3])), bare()] {
            let body = encode_labelled(&r);
            let schema = labelled_image_schema();
            let value = apache_avro::from_avro_datum(schema, &mut &body[..], None).unwrap();
            assert!(value.validate(schema));
            assert_eq!(apache_avro::to_avro_datum(schema, value).unwrap(), body);
        }
    }

    #[test]
    fn broken_rules_are_invalid_events() {
        let mut inverted = record(ImageSource::Inline(vec![1]));
        inverted.annotations[0].x2 = 0.5;
        let mut nan = record(ImageSource::Inline(vec![1]));
        nan.annotations[1].y2 = f32::NAN;
        let mut no_label = record(ImageSource::Inline(vec![1]));
        no_label.annotations[1].label = " ".into();
        let no_product = LabelledImage {
            product_id: "".into(),
            ..bare()
        };
        let no_uri = LabelledImage {
            image: ImageSource::Uri(" ".into()),
            ..bare()
        };
        for (r, what) in [
            (inverted, "x1 <= x2"),
            (nan, "finite"),
            (no_label, "empty label"),
            (no_product, "product_id"),
            (no_uri, "uri"),
        ] {
            let err = decode_labelled(&encode_labelled(&r), labelled_image_schema()).unwrap_err();
            assert_eq!(err.kind(), Some(error_kinds::INVALID_EVENT), "{err}");
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn truncated_padded_and_unframed_values_are_rejected() {
        let body = encode_labelled(&record(ImageSource::Uri("https://x/y.png".into())));
        for cut in [0, 1, body.len() / 2, body.len() - 1] {
            let err = decode_labelled(&body[..cut], labelled_image_schema()).unwrap_err();
            assert_eq!(err.kind(), Some(error_kinds::BAD_AVRO), "cut {cut}: {err}");
        }
        let mut padded = body.clone();
        padded.push(0);
        assert!(decode_labelled(&padded, labelled_image_schema())
            .unwrap_err()
            .to_string()
            .contains("left over"));
        let err = decode_labelled_framed(&body).unwrap_err();
        assert_eq!(err.kind(), Some(error_kinds::BAD_FRAMING), "{err}");
    }

    #[test]
    fn unknown_split_names_say_what_is_allowed() {
        let err = "holdout".parse::<SplitHint>().unwrap_err();
        assert!(err.contains("train, validation or test"), "{err}");
        assert_eq!("VAL".parse::<SplitHint>(), Ok(SplitHint::Validation));
    }
}
