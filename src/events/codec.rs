//! Avro binary encoding and decoding of the domain records, against the schemas in
//! `schemas/*.avsc` (embedded at build time, parsed once).
//!
//! Encoding builds [`apache_avro::types::Value`]s by hand (no serde reflection) and writes a
//! bare Avro datum; [`crate::events::wire::frame`] adds the Confluent header. Decoding reads
//! with the *writer's* schema (from the registry or the configuration) and resolves to ours,
//! so producers on an older or newer compatible schema keep working; when the writer schema
//! is ours, resolution is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use apache_avro::types::Value;
use apache_avro::Schema;

use super::error_kinds;
use super::types::*;
use super::wire::FramingError;

/// A schema file embedded in the binary: its compact JSON text and the parsed schema.
struct Embedded {
    json: String,
    schema: Schema,
}

impl Embedded {
    fn parse(file: &str, text: &str) -> Embedded {
        let schema = Schema::parse_str(text).unwrap_or_else(|e| panic!("schemas/{file} is not a valid Avro schema: {e}"));
        Embedded { json: compact_json(text), schema }
    }
}

static PRODUCT_IMAGE_EVENT: LazyLock<Embedded> = LazyLock::new(|| {
    Embedded::parse("product_image_event.avsc", include_str!("../../schemas/product_image_event.avsc"))
});
static PRODUCT_ATTRIBUTES: LazyLock<Embedded> = LazyLock::new(|| {
    Embedded::parse("product_attributes.avsc", include_str!("../../schemas/product_attributes.avsc"))
});
static DEAD_LETTER: LazyLock<Embedded> =
    LazyLock::new(|| Embedded::parse("dead_letter.avsc", include_str!("../../schemas/dead_letter.avsc")));

/// The input schema `io.attrstream.ProductImageEvent`: our reader schema for events, and the
/// writer schema of events we publish (`publish`, `demo`).
pub fn product_image_event_schema() -> &'static Schema {
    &PRODUCT_IMAGE_EVENT.schema
}

/// `schemas/product_image_event.avsc` as compact JSON (docs and defaults kept): the text to
/// register or look up in a schema registry. Defaults must be kept because the registry's
/// compatibility checks depend on them (the Parsing Canonical Form drops them).
pub fn product_image_event_schema_json() -> &'static str {
    &PRODUCT_IMAGE_EVENT.json
}

/// The output schema `io.attrstream.ProductAttributes`, the writer schema of every output record.
pub fn product_attributes_schema() -> &'static Schema {
    &PRODUCT_ATTRIBUTES.schema
}

/// `schemas/product_attributes.avsc` as compact JSON, for the schema registry (see
/// [`product_image_event_schema_json`]).
pub fn product_attributes_schema_json() -> &'static str {
    &PRODUCT_ATTRIBUTES.json
}

/// The dead-letter schema `io.attrstream.DeadLetter`, the writer schema of the DLQ topic.
pub fn dead_letter_schema() -> &'static Schema {
    &DEAD_LETTER.schema
}

/// `schemas/dead_letter.avsc` as compact JSON, for the schema registry (see
/// [`product_image_event_schema_json`]).
pub fn dead_letter_schema_json() -> &'static str {
    &DEAD_LETTER.json
}

/// JSON text without insignificant whitespace, keys kept in file order (so the registered
/// text reads like the file).
fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
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

/// Why a value could not be decoded into a domain record. [`DecodeError::kind`] is the
/// dead-letter reason, or `None` when the message itself is fine and the caller should retry.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The value is not in the Confluent wire format.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// The schema id is not known to the registry or not accepted by the configuration.
    #[error("unknown writer schema id {id}: {reason}")]
    UnknownSchema {
        /// The schema id from the Confluent header.
        id: u32,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The writer schema is known, but this value cannot be read as our record (the writer
    /// schema is not compatible with ours, or uses a union branch ours lacks).
    #[error("the writer schema cannot be read as {record}: {reason}")]
    SchemaMismatch {
        /// Our record name.
        record: &'static str,
        /// Details, including the writer schema id when known.
        reason: String,
    },
    /// The bytes do not decode with the writer schema (truncated, corrupt, or written with a
    /// different schema than the header says).
    #[error("the Avro body does not decode: {0}")]
    BadAvro(String),
    /// The record decoded but breaks a rule of the contract (empty ids, empty image URI).
    #[error("invalid event (event_id {event_id:?}, product_id {product_id:?}): {reason}")]
    InvalidEvent {
        /// Which rule is broken.
        reason: String,
        /// The decoded event id (may be empty).
        event_id: String,
        /// The decoded product id (may be empty).
        product_id: String,
    },
    /// The schema registry could not be asked (unreachable, timeout, 5xx, bad credentials):
    /// not the message's fault, so it is retried rather than dead-lettered.
    #[error("schema registry unavailable, cannot fetch writer schema id {id}: {reason}")]
    RegistryUnavailable {
        /// The schema id that was being fetched.
        id: u32,
        /// The registry error.
        reason: String,
    },
}

impl DecodeError {
    /// The dead-letter reason (one of [`error_kinds`]), or `None` for
    /// [`DecodeError::RegistryUnavailable`], which is retried instead of dead-lettered.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            DecodeError::Framing(e) => Some(e.kind()),
            DecodeError::UnknownSchema { .. } | DecodeError::SchemaMismatch { .. } => Some(error_kinds::UNKNOWN_SCHEMA),
            DecodeError::BadAvro(_) => Some(error_kinds::BAD_AVRO),
            DecodeError::InvalidEvent { .. } => Some(error_kinds::INVALID_EVENT),
            DecodeError::RegistryUnavailable { .. } => None,
        }
    }

    /// The event and product ids when the record decoded and they are non-empty: the
    /// `event_id` / `product_id` of the dead-letter record.
    pub fn ids(&self) -> (Option<&str>, Option<&str>) {
        match self {
            DecodeError::InvalidEvent { event_id, product_id, .. } => {
                fn non_empty(s: &str) -> Option<&str> {
                    (!s.is_empty()).then_some(s)
                }
                (non_empty(event_id), non_empty(product_id))
            }
            _ => (None, None),
        }
    }

    /// Adds the writer schema id to the message of body errors, so dead letters say which
    /// schema the bytes were read with.
    pub(crate) fn with_schema_id(self, id: u32) -> DecodeError {
        match self {
            DecodeError::BadAvro(m) => DecodeError::BadAvro(format!("{m} (writer schema id {id})")),
            DecodeError::SchemaMismatch { record, reason } => {
                DecodeError::SchemaMismatch { record, reason: format!("writer schema id {id}: {reason}") }
            }
            other => other,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Encodes an event as a bare Avro datum of [`product_image_event_schema`] (no framing).
pub fn encode_event(event: &ProductImageEvent) -> Vec<u8> {
    let image = match &event.image {
        ImageSource::Inline(data) => Value::Union(0, Box::new(record(vec![("data", Value::Bytes(data.clone()))]))),
        ImageSource::Uri(uri) => Value::Union(1, Box::new(record(vec![("uri", Value::String(uri.clone()))]))),
    };
    let value = record(vec![
        ("event_id", Value::String(event.event_id.clone())),
        ("product_id", Value::String(event.product_id.clone())),
        ("image", image),
        ("content_type", optional(event.content_type.as_ref().map(|s| Value::String(s.clone())))),
        ("metadata", string_map(&event.metadata)),
        ("event_time", optional(event.event_time_ms.map(Value::TimestampMillis))),
    ]);
    write(product_image_event_schema(), value, "ProductImageEvent")
}

/// Encodes an output record as a bare Avro datum of [`product_attributes_schema`] (no framing).
pub fn encode_attributes(attributes: &ProductAttributes) -> Vec<u8> {
    let a = attributes;
    let detections = a
        .detections
        .iter()
        .map(|d| {
            record(vec![
                ("label", Value::String(d.label.clone())),
                ("label_id", Value::Int(d.label_id)),
                ("score", Value::Float(d.score)),
                ("box_px", box_value(&d.box_px)),
                ("box_norm", box_value(&d.box_norm)),
            ])
        })
        .collect();
    let labels = a
        .attributes
        .labels
        .iter()
        .map(|l| {
            record(vec![
                ("label", Value::String(l.label.clone())),
                ("max_score", Value::Float(l.max_score)),
                ("count", Value::Int(l.count)),
            ])
        })
        .collect();
    let main_object = a.attributes.main_object.as_ref().map(|m| {
        record(vec![
            ("label", Value::String(m.label.clone())),
            ("score", Value::Float(m.score)),
            ("detection_index", Value::Int(m.detection_index)),
            ("area_fraction", Value::Float(m.area_fraction)),
        ])
    });
    let object_colours = a
        .attributes
        .object_colours
        .iter()
        .map(|o| {
            let colours = o
                .colours
                .iter()
                .map(|c| {
                    record(vec![
                        ("name", Value::String(c.name.clone())),
                        ("r", Value::Int(c.r.into())),
                        ("g", Value::Int(c.g.into())),
                        ("b", Value::Int(c.b.into())),
                        ("fraction", Value::Float(c.fraction)),
                    ])
                })
                .collect();
            record(vec![
                ("detection_index", Value::Int(o.detection_index)),
                ("label", Value::String(o.label.clone())),
                ("colours", Value::Array(colours)),
            ])
        })
        .collect();
    let t = &a.timings;
    let value = record(vec![
        ("event_id", Value::String(a.event_id.clone())),
        ("product_id", Value::String(a.product_id.clone())),
        (
            "model",
            record(vec![
                ("name", Value::String(a.model.name.clone())),
                ("version", Value::String(a.model.version.clone())),
            ]),
        ),
        ("image_width", Value::Int(saturating_i32(a.image_width))),
        ("image_height", Value::Int(saturating_i32(a.image_height))),
        ("detections", Value::Array(detections)),
        (
            "attributes",
            record(vec![
                ("labels", Value::Array(labels)),
                ("main_object", optional(main_object)),
                ("object_colours", Value::Array(object_colours)),
            ]),
        ),
        (
            "timings",
            record(vec![
                ("fetch_ms", Value::Double(t.fetch_ms)),
                ("decode_ms", Value::Double(t.decode_ms)),
                ("batch_wait_ms", Value::Double(t.batch_wait_ms)),
                ("inference_ms", Value::Double(t.inference_ms)),
                ("total_ms", Value::Double(t.total_ms)),
            ]),
        ),
        ("event_time", optional(a.event_time_ms.map(Value::TimestampMillis))),
        ("processed_time", Value::TimestampMillis(a.processed_time_ms)),
        ("metadata", string_map(&a.metadata)),
    ]);
    write(product_attributes_schema(), value, "ProductAttributes")
}

/// Encodes a dead letter as a bare Avro datum of [`dead_letter_schema`] (no framing).
pub fn encode_dead_letter(dead_letter: &DeadLetter) -> Vec<u8> {
    let d = dead_letter;
    let value = record(vec![
        ("original_key", optional(d.original_key.as_ref().map(|k| Value::Bytes(k.clone())))),
        ("original_value", Value::Bytes(d.original_value.clone())),
        ("source_topic", Value::String(d.source_topic.clone())),
        ("source_partition", Value::Int(d.source_partition)),
        ("source_offset", Value::Long(d.source_offset)),
        ("event_id", optional(d.event_id.as_ref().map(|s| Value::String(s.clone())))),
        ("product_id", optional(d.product_id.as_ref().map(|s| Value::String(s.clone())))),
        ("error_kind", Value::String(d.error_kind.clone())),
        ("error_message", Value::String(d.error_message.clone())),
        ("failed_time", Value::TimestampMillis(d.failed_time_ms)),
    ]);
    write(dead_letter_schema(), value, "DeadLetter")
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(name, value)| (name.to_owned(), value)).collect())
}

/// A `["null", T]` union value.
fn optional(value: Option<Value>) -> Value {
    match value {
        Some(v) => Value::Union(1, Box::new(v)),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn string_map(map: &BTreeMap<String, String>) -> Value {
    Value::Map(map.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<HashMap<_, _>>())
}

fn box_value(b: &BoxRecord) -> Value {
    record(vec![
        ("x_min", Value::Float(b.x_min)),
        ("y_min", Value::Float(b.y_min)),
        ("x_max", Value::Float(b.x_max)),
        ("y_max", Value::Float(b.y_max)),
    ])
}

fn saturating_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// Writes a value built above; it always matches its schema (the tests encode every shape),
/// so a failure is a bug in this file, not a data problem.
fn write(schema: &Schema, value: Value, record: &str) -> Vec<u8> {
    apache_avro::to_avro_datum(schema, value)
        .unwrap_or_else(|e| panic!("BUG: the {record} value built by the codec does not match its schema: {e}"))
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// Decodes an event body written with `writer` (resolved to [`product_image_event_schema`])
/// and checks the contract's rules.
///
/// Errors: [`DecodeError::BadAvro`] when the bytes do not decode with `writer` (including
/// left-over bytes after the record), [`DecodeError::SchemaMismatch`] when `writer` cannot be
/// resolved to our schema, [`DecodeError::InvalidEvent`] when `event_id`, `product_id` or an
/// image URI is empty or blank. Empty inline image data is *not* an error here: the image
/// decoder reports it as `empty_image`.
pub fn decode_event(body: &[u8], writer: &Schema) -> Result<ProductImageEvent, DecodeError> {
    decode_event_with(body, writer, needs_resolution(writer, product_image_event_schema()))
}

/// [`decode_event`] with the writer-equals-reader test done by the caller (once per cached
/// writer schema instead of once per message).
pub(crate) fn decode_event_with(
    body: &[u8],
    writer: &Schema,
    resolve: bool,
) -> Result<ProductImageEvent, DecodeError> {
    let value = read_datum(body, writer, product_image_event_schema(), resolve, "ProductImageEvent")?;
    let event = event_from_value(value).map_err(|e| e.into_error("ProductImageEvent"))?;
    validate_event(event)
}

/// Decodes an output record written with `writer` (resolved to [`product_attributes_schema`]);
/// for `tail`, tests and downstream tooling.
pub fn decode_attributes(body: &[u8], writer: &Schema) -> Result<ProductAttributes, DecodeError> {
    let reader = product_attributes_schema();
    let value = read_datum(body, writer, reader, needs_resolution(writer, reader), "ProductAttributes")?;
    attributes_from_value(value).map_err(|e| e.into_error("ProductAttributes"))
}

/// Decodes a dead letter written with `writer` (resolved to [`dead_letter_schema`]); for
/// `tail`, replay tooling and tests.
pub fn decode_dead_letter(body: &[u8], writer: &Schema) -> Result<DeadLetter, DecodeError> {
    let reader = dead_letter_schema();
    let value = read_datum(body, writer, reader, needs_resolution(writer, reader), "DeadLetter")?;
    dead_letter_from_value(value).map_err(|e| e.into_error("DeadLetter"))
}

/// Whether values written with `writer` must be resolved to `reader` (false when they are
/// the same schema, the common case, which saves the resolution pass).
pub(crate) fn needs_resolution(writer: &Schema, reader: &Schema) -> bool {
    !(std::ptr::eq(writer, reader) || writer == reader)
}

fn read_datum(
    body: &[u8],
    writer: &Schema,
    reader: &Schema,
    resolve: bool,
    record: &'static str,
) -> Result<Value, DecodeError> {
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
    if !resolve {
        return Ok(value);
    }
    value.resolve(reader).map_err(|e| DecodeError::SchemaMismatch { record, reason: e.to_string() })
}

fn validate_event(event: ProductImageEvent) -> Result<ProductImageEvent, DecodeError> {
    let reason = if event.event_id.trim().is_empty() {
        Some("event_id is empty")
    } else if event.product_id.trim().is_empty() {
        Some("product_id is empty")
    } else if matches!(&event.image, ImageSource::Uri(uri) if uri.trim().is_empty()) {
        Some("image uri is empty")
    } else {
        None
    };
    match reason {
        None => Ok(event),
        Some(reason) => Err(DecodeError::InvalidEvent {
            reason: reason.to_owned(),
            event_id: event.event_id,
            product_id: event.product_id,
        }),
    }
}

/// A decoded value that does not have the shape of our reader schema. After resolution this
/// cannot happen unless the writer schema resolved to something unexpected; out-of-range
/// numbers (a colour channel of 300) are reported the same way.
struct Shape(String);

impl Shape {
    fn into_error(self, record: &'static str) -> DecodeError {
        DecodeError::SchemaMismatch { record, reason: self.0 }
    }
}

type Shaped<T> = Result<T, Shape>;

/// The fields of a resolved record, taken in reader-schema order.
struct Fields(std::vec::IntoIter<(String, Value)>);

impl Fields {
    fn of(value: Value, record: &str) -> Shaped<Fields> {
        match value {
            Value::Record(fields) => Ok(Fields(fields.into_iter())),
            other => Err(Shape(format!("expected record {record}, got {}", describe(&other)))),
        }
    }

    fn next(&mut self, name: &str) -> Shaped<Value> {
        match self.0.next() {
            Some((field, value)) if field == name => Ok(value),
            Some((field, _)) => Err(Shape(format!("expected field {name}, got {field}"))),
            None => Err(Shape(format!("missing field {name}"))),
        }
    }

    fn string(&mut self, name: &str) -> Shaped<String> {
        match self.next(name)? {
            Value::String(s) => Ok(s),
            other => Err(unexpected(name, "string", &other)),
        }
    }

    fn bytes(&mut self, name: &str) -> Shaped<Vec<u8>> {
        match self.next(name)? {
            Value::Bytes(b) => Ok(b),
            other => Err(unexpected(name, "bytes", &other)),
        }
    }

    fn int(&mut self, name: &str) -> Shaped<i32> {
        match self.next(name)? {
            Value::Int(i) => Ok(i),
            other => Err(unexpected(name, "int", &other)),
        }
    }

    fn non_negative(&mut self, name: &str) -> Shaped<u32> {
        let v = self.int(name)?;
        u32::try_from(v).map_err(|_| Shape(format!("field {name} is {v}, expected >= 0")))
    }

    fn channel(&mut self, name: &str) -> Shaped<u8> {
        let v = self.int(name)?;
        u8::try_from(v).map_err(|_| Shape(format!("colour channel {name} is {v}, expected 0..=255")))
    }

    fn long(&mut self, name: &str) -> Shaped<i64> {
        let value = self.next(name)?;
        long_value(name, value)
    }

    fn float(&mut self, name: &str) -> Shaped<f32> {
        match self.next(name)? {
            Value::Float(f) => Ok(f),
            other => Err(unexpected(name, "float", &other)),
        }
    }

    fn double(&mut self, name: &str) -> Shaped<f64> {
        match self.next(name)? {
            Value::Double(d) => Ok(d),
            other => Err(unexpected(name, "double", &other)),
        }
    }

    /// A `["null", T]` field.
    fn optional<T>(&mut self, name: &str, convert: impl FnOnce(Value) -> Shaped<T>) -> Shaped<Option<T>> {
        match self.next(name)? {
            Value::Null => Ok(None),
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                v => convert(v).map(Some),
            },
            other => Err(unexpected(name, "union", &other)),
        }
    }

    fn array<T>(&mut self, name: &str, convert: impl FnMut(Value) -> Shaped<T>) -> Shaped<Vec<T>> {
        match self.next(name)? {
            Value::Array(items) => items.into_iter().map(convert).collect(),
            other => Err(unexpected(name, "array", &other)),
        }
    }

    fn string_map(&mut self, name: &str) -> Shaped<BTreeMap<String, String>> {
        match self.next(name)? {
            Value::Map(map) => map
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    other => Err(unexpected(name, "map<string>", &other)),
                })
                .collect(),
            other => Err(unexpected(name, "map", &other)),
        }
    }
}

fn long_value(name: &str, value: Value) -> Shaped<i64> {
    match value {
        // A writer without the logical type resolves (or, when it is our schema, decodes) to Long.
        Value::Long(l) | Value::TimestampMillis(l) => Ok(l),
        other => Err(unexpected(name, "long", &other)),
    }
}

fn unexpected(name: &str, expected: &str, got: &Value) -> Shape {
    Shape(format!("field {name}: expected {expected}, got {}", describe(got)))
}

/// A short description of a value for error messages (never its whole content: it may be an image).
fn describe(value: &Value) -> String {
    let text = format!("{value:?}");
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn event_from_value(value: Value) -> Shaped<ProductImageEvent> {
    let mut f = Fields::of(value, "ProductImageEvent")?;
    let event_id = f.string("event_id")?;
    let product_id = f.string("product_id")?;
    let image = match f.next("image")? {
        Value::Union(0, inner) => ImageSource::Inline(Fields::of(*inner, "InlineImage")?.bytes("data")?),
        Value::Union(1, inner) => ImageSource::Uri(Fields::of(*inner, "ImageUri")?.string("uri")?),
        other => return Err(unexpected("image", "InlineImage or ImageUri", &other)),
    };
    Ok(ProductImageEvent {
        event_id,
        product_id,
        image,
        content_type: f.optional("content_type", |v| string_value("content_type", v))?,
        metadata: f.string_map("metadata")?,
        event_time_ms: f.optional("event_time", |v| long_value("event_time", v))?,
    })
}

fn string_value(name: &str, value: Value) -> Shaped<String> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(unexpected(name, "string", &other)),
    }
}

fn bytes_value(name: &str, value: Value) -> Shaped<Vec<u8>> {
    match value {
        Value::Bytes(b) => Ok(b),
        other => Err(unexpected(name, "bytes", &other)),
    }
}

fn box_from_value(value: Value) -> Shaped<BoxRecord> {
    let mut f = Fields::of(value, "BoundingBox")?;
    Ok(BoxRecord {
        x_min: f.float("x_min")?,
        y_min: f.float("y_min")?,
        x_max: f.float("x_max")?,
        y_max: f.float("y_max")?,
    })
}

fn attributes_from_value(value: Value) -> Shaped<ProductAttributes> {
    let mut f = Fields::of(value, "ProductAttributes")?;
    let event_id = f.string("event_id")?;
    let product_id = f.string("product_id")?;
    let mut m = Fields::of(f.next("model")?, "ModelRef")?;
    let model = ModelRef { name: m.string("name")?, version: m.string("version")? };
    let image_width = f.non_negative("image_width")?;
    let image_height = f.non_negative("image_height")?;
    let detections = f.array("detections", |v| {
        let mut d = Fields::of(v, "Detection")?;
        Ok(DetectionRecord {
            label: d.string("label")?,
            label_id: d.int("label_id")?,
            score: d.float("score")?,
            box_px: box_from_value(d.next("box_px")?)?,
            box_norm: box_from_value(d.next("box_norm")?)?,
        })
    })?;
    let mut a = Fields::of(f.next("attributes")?, "AggregatedAttributes")?;
    let labels = a.array("labels", |v| {
        let mut l = Fields::of(v, "LabelSummary")?;
        Ok(LabelSummary { label: l.string("label")?, max_score: l.float("max_score")?, count: l.int("count")? })
    })?;
    let main_object = a.optional("main_object", |v| {
        let mut o = Fields::of(v, "MainObject")?;
        Ok(MainObject {
            label: o.string("label")?,
            score: o.float("score")?,
            detection_index: o.int("detection_index")?,
            area_fraction: o.float("area_fraction")?,
        })
    })?;
    let object_colours = a.array("object_colours", |v| {
        let mut o = Fields::of(v, "ObjectColours")?;
        Ok(ObjectColours {
            detection_index: o.int("detection_index")?,
            label: o.string("label")?,
            colours: o.array("colours", |v| {
                let mut c = Fields::of(v, "DominantColour")?;
                Ok(DominantColour {
                    name: c.string("name")?,
                    r: c.channel("r")?,
                    g: c.channel("g")?,
                    b: c.channel("b")?,
                    fraction: c.float("fraction")?,
                })
            })?,
        })
    })?;
    let mut t = Fields::of(f.next("timings")?, "StageTimings")?;
    let timings = StageTimings {
        fetch_ms: t.double("fetch_ms")?,
        decode_ms: t.double("decode_ms")?,
        batch_wait_ms: t.double("batch_wait_ms")?,
        inference_ms: t.double("inference_ms")?,
        total_ms: t.double("total_ms")?,
    };
    Ok(ProductAttributes {
        event_id,
        product_id,
        model,
        image_width,
        image_height,
        detections,
        attributes: AggregatedAttributes { labels, main_object, object_colours },
        timings,
        event_time_ms: f.optional("event_time", |v| long_value("event_time", v))?,
        processed_time_ms: f.long("processed_time")?,
        metadata: f.string_map("metadata")?,
    })
}

fn dead_letter_from_value(value: Value) -> Shaped<DeadLetter> {
    let mut f = Fields::of(value, "DeadLetter")?;
    Ok(DeadLetter {
        original_key: f.optional("original_key", |v| bytes_value("original_key", v))?,
        original_value: f.bytes("original_value")?,
        source_topic: f.string("source_topic")?,
        source_partition: f.int("source_partition")?,
        source_offset: f.long("source_offset")?,
        event_id: f.optional("event_id", |v| string_value("event_id", v))?,
        product_id: f.optional("product_id", |v| string_value("product_id", v))?,
        error_kind: f.string("error_kind")?,
        error_message: f.string("error_message")?,
        failed_time_ms: f.long("failed_time")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(image: ImageSource) -> ProductImageEvent {
        ProductImageEvent {
            event_id: "e-1".into(),
            product_id: "p-1".into(),
            image,
            content_type: Some("image/png".into()),
            metadata: [("shop".to_owned(), "eu".to_owned()), ("lang".to_owned(), "de".to_owned())].into(),
            event_time_ms: Some(1_700_000_000_123),
        }
    }

    pub(super) fn attributes_for_perf() -> ProductAttributes {
        attributes()
    }

    fn attributes() -> ProductAttributes {
        let b = BoxRecord { x_min: 1.5, y_min: 2.25, x_max: 100.0, y_max: 80.125 };
        let n = BoxRecord { x_min: 0.01, y_min: 0.02, x_max: 0.9, y_max: 0.8 };
        ProductAttributes {
            event_id: "e-1".into(),
            product_id: "p-1".into(),
            model: ModelRef { name: "ssd_mobilenet_v2_coco".into(), version: "abc123".into() },
            image_width: 640,
            image_height: 480,
            detections: vec![
                DetectionRecord { label: "cup".into(), label_id: 47, score: 0.95, box_px: b, box_norm: n },
                DetectionRecord { label: "bowl".into(), label_id: 51, score: 0.5, box_px: n, box_norm: b },
            ],
            attributes: AggregatedAttributes {
                labels: vec![LabelSummary { label: "cup".into(), max_score: 0.95, count: 1 }],
                main_object: Some(MainObject {
                    label: "cup".into(),
                    score: 0.95,
                    detection_index: 0,
                    area_fraction: 0.25,
                }),
                object_colours: vec![ObjectColours {
                    detection_index: 0,
                    label: "cup".into(),
                    colours: vec![DominantColour { name: "white".into(), r: 250, g: 251, b: 0, fraction: 0.75 }],
                }],
            },
            timings: StageTimings { fetch_ms: 0.0, decode_ms: 1.5, batch_wait_ms: 2.0, inference_ms: 50.25, total_ms: 60.0 },
            event_time_ms: Some(1_700_000_000_000),
            processed_time_ms: 1_700_000_000_500,
            metadata: [("k".to_owned(), "v".to_owned())].into(),
        }
    }

    fn dead_letter() -> DeadLetter {
        DeadLetter {
            original_key: Some(b"p-1".to_vec()),
            original_value: vec![0, 0, 0, 0, 1, 2, 3],
            source_topic: "product-images".into(),
            source_partition: 3,
            source_offset: 1 << 40,
            event_id: Some("e-1".into()),
            product_id: Some("p-1".into()),
            error_kind: error_kinds::FETCH_TIMEOUT.into(),
            error_message: "timed out after 10s".into(),
            failed_time_ms: 1_700_000_000_999,
        }
    }

    #[test]
    fn embedded_schemas_parse_and_keep_defaults() {
        for (schema, json, name) in [
            (product_image_event_schema(), product_image_event_schema_json(), "io.attrstream.ProductImageEvent"),
            (product_attributes_schema(), product_attributes_schema_json(), "io.attrstream.ProductAttributes"),
            (dead_letter_schema(), dead_letter_schema_json(), "io.attrstream.DeadLetter"),
        ] {
            assert_eq!(schema.name().map(|n| n.fullname(None)), Some(name.to_owned()));
            assert!(!json.contains('\n'), "compact JSON");
            // The registered text must parse to the same schema and keep the defaults.
            assert!(Schema::parse_str(json).unwrap() == *schema);
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(json).unwrap()["namespace"],
                serde_json::json!("io.attrstream")
            );
        }
        assert!(product_image_event_schema_json().contains(r#""default":{}"#));
        assert!(product_image_event_schema_json().contains(r#""default":null"#));
    }

    #[test]
    fn compact_json_keeps_whitespace_inside_strings() {
        assert_eq!(compact_json("{ \"a b\" : [ 1, \"x \\\" y\" ] }\n"), r#"{"a b":[1,"x \" y"]}"#);
    }

    #[test]
    fn event_round_trips_with_all_shapes() {
        let mut bare = event(ImageSource::Uri("s3://bucket/key.jpg".into()));
        bare.content_type = None;
        bare.metadata.clear();
        bare.event_time_ms = None;
        for e in [event(ImageSource::Inline(vec![0xff, 0xd8, 0xff, 0])), event(ImageSource::Inline(vec![])), bare] {
            let body = encode_event(&e);
            assert_eq!(decode_event(&body, product_image_event_schema()).unwrap(), e);
        }
    }

    #[test]
    fn attributes_round_trip_with_and_without_optionals() {
        let full = attributes();
        let mut empty = attributes();
        empty.detections.clear();
        empty.attributes = AggregatedAttributes::default();
        empty.event_time_ms = None;
        empty.metadata.clear();
        for a in [full, empty] {
            let body = encode_attributes(&a);
            assert_eq!(decode_attributes(&body, product_attributes_schema()).unwrap(), a);
        }
    }

    #[test]
    fn dead_letter_round_trips_with_and_without_optionals() {
        let full = dead_letter();
        let bare = DeadLetter { original_key: None, event_id: None, product_id: None, ..dead_letter() };
        for d in [full, bare] {
            let body = encode_dead_letter(&d);
            assert_eq!(decode_dead_letter(&body, dead_letter_schema()).unwrap(), d);
        }
    }

    #[test]
    fn invalid_events_are_reported_with_their_ids() {
        let cases = [
            (ProductImageEvent { event_id: "".into(), ..event(ImageSource::Uri("file:///x".into())) }, "event_id"),
            (ProductImageEvent { product_id: " ".into(), ..event(ImageSource::Uri("file:///x".into())) }, "product_id"),
            (event(ImageSource::Uri("".into())), "uri"),
        ];
        for (e, what) in cases {
            let err = decode_event(&encode_event(&e), product_image_event_schema()).unwrap_err();
            assert_eq!(err.kind(), Some(error_kinds::INVALID_EVENT), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        let err = decode_event(&encode_event(&event(ImageSource::Uri("".into()))), product_image_event_schema())
            .unwrap_err();
        assert_eq!(err.ids(), (Some("e-1"), Some("p-1")));
        let err = decode_event(
            &encode_event(&ProductImageEvent { event_id: "".into(), ..event(ImageSource::Inline(vec![1])) }),
            product_image_event_schema(),
        )
        .unwrap_err();
        assert_eq!(err.ids(), (None, Some("p-1")));
    }

    #[test]
    fn truncated_and_padded_bodies_are_bad_avro() {
        let body = encode_event(&event(ImageSource::Uri("https://example.com/a.jpg".into())));
        for cut in [0, 1, body.len() / 2, body.len() - 1] {
            let err = decode_event(&body[..cut], product_image_event_schema()).unwrap_err();
            assert_eq!(err.kind(), Some(error_kinds::BAD_AVRO), "cut {cut}: {err}");
        }
        let mut padded = body.clone();
        padded.push(0);
        let err = decode_event(&padded, product_image_event_schema()).unwrap_err();
        assert_eq!(err.kind(), Some(error_kinds::BAD_AVRO));
        assert!(err.to_string().contains("left over"), "{err}");
    }

    #[test]
    fn an_unrelated_writer_schema_is_a_schema_mismatch() {
        let other = Schema::parse_str(r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"int"}]}"#).unwrap();
        let body = apache_avro::to_avro_datum(&other, Value::Record(vec![("x".into(), Value::Int(3))])).unwrap();
        let err = decode_event(&body, &other).unwrap_err();
        assert_eq!(err.kind(), Some(error_kinds::UNKNOWN_SCHEMA), "{err}");
        assert!(err.to_string().contains("ProductImageEvent"), "{err}");
    }

    #[test]
    fn out_of_range_colour_channels_are_rejected() {
        // Written by some other producer with r = 300: decoding must not truncate silently.
        let body = encode_attributes(&attributes());
        let value = apache_avro::from_avro_datum(product_attributes_schema(), &mut &body[..], None).unwrap();
        // attributes.object_colours[0].colours[0].r
        let Value::Record(mut fields) = value else { panic!() };
        let Value::Record(ref mut attrs) = fields[6].1 else { panic!() };
        let Value::Array(ref mut oc) = attrs[2].1 else { panic!() };
        let Value::Record(ref mut o) = oc[0] else { panic!() };
        let Value::Array(ref mut cs) = o[2].1 else { panic!() };
        let Value::Record(ref mut c) = cs[0] else { panic!() };
        assert_eq!(c[1].0, "r");
        c[1].1 = Value::Int(300);
        let body = apache_avro::to_avro_datum(product_attributes_schema(), Value::Record(fields)).unwrap();
        let err = decode_attributes(&body, product_attributes_schema()).unwrap_err();
        assert!(err.to_string().contains("0..=255"), "{err}");
    }

    #[test]
    fn dead_letter_doc_lists_every_error_kind() {
        let json: serde_json::Value = serde_json::from_str(dead_letter_schema_json()).unwrap();
        let doc = json["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "error_kind")
            .and_then(|f| f["doc"].as_str())
            .unwrap()
            .to_owned();
        use error_kinds::*;
        for kind in [
            BAD_FRAMING,
            UNKNOWN_SCHEMA,
            BAD_AVRO,
            INVALID_EVENT,
            MISSING_IMAGE,
            UNSUPPORTED_URI,
            BLOCKED_ADDRESS,
            FETCH_TIMEOUT,
            FETCH_HTTP_STATUS,
            FETCH_TOO_LARGE,
            FETCH_FAILED,
            EMPTY_IMAGE,
            UNKNOWN_FORMAT,
            IMAGE_TOO_LARGE,
            CORRUPT_IMAGE,
            INFERENCE_FAILED,
        ] {
            assert!(doc.contains(kind), "DeadLetter.error_kind doc does not list {kind}");
        }
    }

    #[test]
    fn every_record_and_field_has_a_doc() {
        fn walk(v: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(o) => {
                    let is_record = o.get("type") == Some(&serde_json::json!("record"));
                    let is_field = o.contains_key("name") && o.contains_key("type") && !is_record && path.ends_with("fields");
                    if (is_record || is_field) && !o.get("doc").is_some_and(|d| d.as_str().is_some_and(|s| !s.is_empty())) {
                        missing.push(format!("{path}/{}", o.get("name").and_then(|n| n.as_str()).unwrap_or("?")));
                    }
                    for (k, child) in o {
                        walk(child, &format!("{path}/{k}"), missing);
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|child| walk(child, path, missing)),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        for json in [product_image_event_schema_json(), product_attributes_schema_json(), dead_letter_schema_json()] {
            walk(&serde_json::from_str(json).unwrap(), "", &mut missing);
        }
        assert!(missing.is_empty(), "records or fields without doc: {missing:?}");
    }
}

#[cfg(test)]
mod perf_tmp {
    use super::*;
    #[test]
    #[ignore]
    fn perf_tmp() {
        let mut a = super::tests::attributes_for_perf();
        for i in 0..18 { let d = a.detections[0].clone(); a.detections.push(DetectionRecord { label_id: i, ..d }); }
        let n = 20000;
        let t = std::time::Instant::now();
        let mut total = 0;
        for _ in 0..n { total += encode_attributes(&a).len(); }
        println!("encode_attributes (20 dets, {} bytes): {:.1} us", total / n, t.elapsed().as_secs_f64() * 1e6 / n as f64);
        let e = ProductImageEvent { event_id: "e-123".into(), product_id: "p-456".into(), image: ImageSource::Uri("https://cdn.example.com/images/p-456/main.jpg".into()), content_type: Some("image/jpeg".into()), metadata: [("a".to_owned(), "b".to_owned())].into(), event_time_ms: Some(1) };
        let body = encode_event(&e);
        let t = std::time::Instant::now();
        for _ in 0..n { let _ = encode_event(&e); }
        println!("encode_event: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
        let t = std::time::Instant::now();
        for _ in 0..n { decode_event(&body, product_image_event_schema()).unwrap(); }
        println!("decode_event: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
        let ab = encode_attributes(&a);
        let t = std::time::Instant::now();
        for _ in 0..2000 { decode_attributes(&ab, product_attributes_schema()).unwrap(); }
        println!("decode_attributes: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / 2000.0);
        let d = DeadLetter { original_key: None, original_value: body.clone(), source_topic: "t".into(), source_partition: 0, source_offset: 1, event_id: None, product_id: None, error_kind: "x".into(), error_message: "y".into(), failed_time_ms: 0 };
        let t = std::time::Instant::now();
        for _ in 0..n { let _ = encode_dead_letter(&d); }
        println!("encode_dead_letter: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
}
