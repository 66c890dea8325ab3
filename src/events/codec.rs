//! Avro binary encoding and decoding of the domain records, against the schemas in
//! `schemas/*.avsc` (embedded at build time, parsed once).
//!
//! Encoding writes the Avro binary encoding of our records directly (see "Encoding" below
//! for why); [`crate::events::wire::frame`] adds the Confluent header. Decoding reads
//! with the *writer's* schema (from the registry or the configuration) and resolves to ours,
//! so producers on an older or newer compatible schema keep working; when the writer schema
//! is ours, resolution is skipped.

use std::collections::BTreeMap;
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
        let schema =
            Schema::parse_str(text).unwrap_or_else(|e| panic!("schemas/{file} is not a valid Avro schema: {e}"));
        Embedded {
            json: compact_json(text),
            schema,
        }
    }
}

static PRODUCT_IMAGE_EVENT: LazyLock<Embedded> = LazyLock::new(|| {
    Embedded::parse(
        "product_image_event.avsc",
        include_str!("../../schemas/product_image_event.avsc"),
    )
});
static PRODUCT_ATTRIBUTES: LazyLock<Embedded> = LazyLock::new(|| {
    Embedded::parse(
        "product_attributes.avsc",
        include_str!("../../schemas/product_attributes.avsc"),
    )
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
            DecodeError::InvalidEvent {
                event_id, product_id, ..
            } => {
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
            DecodeError::SchemaMismatch { record, reason } => DecodeError::SchemaMismatch {
                record,
                reason: format!("writer schema id {id}: {reason}"),
            },
            other => other,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------
//
// The encoders write the Avro binary encoding directly, field by field in schema order.
// Building `apache_avro::types::Value` trees and calling `to_avro_datum` was measured at
// about 130 µs for a record with 20 detections in a release build (it allocates every field
// name and value, validates the tree and re-resolves the schema's names on every call): too
// slow for 20,000 messages a second on 2 cores. Writing directly takes about 1 µs, allocates
// once and orders map entries deterministically. The schema files stay the contract: the
// tests decode everything written here with apache-avro (strictly, no bytes left over) and
// with fastavro, so a field added to a schema but not here fails them.

/// Encodes an event as a bare Avro datum of [`product_image_event_schema`] (no framing).
pub fn encode_event(event: &ProductImageEvent) -> Vec<u8> {
    let image_len = match &event.image {
        ImageSource::Inline(data) => data.len(),
        ImageSource::Uri(uri) => uri.len(),
    };
    let mut out = Out::with_capacity(64 + image_len + event.event_id.len() + event.product_id.len());
    out.string(&event.event_id);
    out.string(&event.product_id);
    match &event.image {
        ImageSource::Inline(data) => {
            out.union_branch(0);
            out.bytes(data);
        }
        ImageSource::Uri(uri) => {
            out.union_branch(1);
            out.string(uri);
        }
    }
    out.optional(event.content_type.as_deref(), Out::string);
    out.string_map(&event.metadata);
    out.optional(event.event_time_ms, Out::long);
    out.0
}

/// Encodes an output record as a bare Avro datum of [`product_attributes_schema`] (no framing).
pub fn encode_attributes(attributes: &ProductAttributes) -> Vec<u8> {
    let a = attributes;
    let mut out = Out::with_capacity(256 + 64 * a.detections.len() + 48 * a.attributes.object_colours.len());
    out.string(&a.event_id);
    out.string(&a.product_id);
    out.string(&a.model.name);
    out.string(&a.model.version);
    out.int(saturating_i32(a.image_width));
    out.int(saturating_i32(a.image_height));
    out.array(&a.detections, |out, d| {
        out.string(&d.label);
        out.int(d.label_id);
        out.float(d.score);
        out.bounding_box(&d.box_px);
        out.bounding_box(&d.box_norm);
    });
    out.array(&a.attributes.labels, |out, l| {
        out.string(&l.label);
        out.float(l.max_score);
        out.int(l.count);
    });
    out.optional(a.attributes.main_object.as_ref(), |out, m| {
        out.string(&m.label);
        out.float(m.score);
        out.int(m.detection_index);
        out.float(m.area_fraction);
    });
    out.array(&a.attributes.object_colours, |out, o| {
        out.int(o.detection_index);
        out.string(&o.label);
        out.array(&o.colours, |out, c| {
            out.string(&c.name);
            out.int(c.r.into());
            out.int(c.g.into());
            out.int(c.b.into());
            out.float(c.fraction);
        });
    });
    let t = &a.timings;
    for ms in [t.fetch_ms, t.decode_ms, t.batch_wait_ms, t.inference_ms, t.total_ms] {
        out.double(ms);
    }
    out.optional(a.event_time_ms, Out::long);
    out.long(a.processed_time_ms);
    out.string_map(&a.metadata);
    out.0
}

/// Encodes a dead letter as a bare Avro datum of [`dead_letter_schema`] (no framing).
pub fn encode_dead_letter(dead_letter: &DeadLetter) -> Vec<u8> {
    let d = dead_letter;
    let key_len = d.original_key.as_ref().map_or(0, Vec::len);
    let mut out = Out::with_capacity(96 + key_len + d.original_value.len() + d.error_message.len());
    out.optional(d.original_key.as_deref(), Out::bytes);
    out.bytes(&d.original_value);
    out.string(&d.source_topic);
    out.int(d.source_partition);
    out.long(d.source_offset);
    out.optional(d.event_id.as_deref(), Out::string);
    out.optional(d.product_id.as_deref(), Out::string);
    out.string(&d.error_kind);
    out.string(&d.error_message);
    out.long(d.failed_time_ms);
    out.0
}

fn saturating_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// An Avro binary encoder for the primitive and complex types our schemas use
/// (specification: "Binary Encoding").
struct Out(Vec<u8>);

impl Out {
    fn with_capacity(capacity: usize) -> Out {
        Out(Vec::with_capacity(capacity))
    }

    /// `long` (and `int`, and timestamp-millis): zig-zag, then a little-endian base-128 varint.
    fn long(&mut self, v: i64) {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        while n >= 0x80 {
            self.0.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }

    fn int(&mut self, v: i32) {
        self.long(v.into());
    }

    fn float(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn double(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// `bytes`: length, then the bytes.
    fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.0.extend_from_slice(b);
    }

    /// `string`: its UTF-8 bytes, as `bytes`.
    fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// The zero-based index of the union branch that follows.
    fn union_branch(&mut self, index: i64) {
        self.long(index);
    }

    /// A `["null", T]` union.
    fn optional<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Out, T)) {
        match value {
            None => self.union_branch(0),
            Some(v) => {
                self.union_branch(1);
                write(self, v);
            }
        }
    }

    /// An array as one block of `items.len()` items followed by the empty end block.
    fn array<T>(&mut self, items: &[T], mut write: impl FnMut(&mut Out, &T)) {
        if !items.is_empty() {
            self.long(items.len() as i64);
            for item in items {
                write(self, item);
            }
        }
        self.long(0);
    }

    /// A `map<string>` as one block (entries in key order) followed by the empty end block.
    fn string_map(&mut self, map: &BTreeMap<String, String>) {
        if !map.is_empty() {
            self.long(map.len() as i64);
            for (k, v) in map {
                self.string(k);
                self.string(v);
            }
        }
        self.long(0);
    }

    fn bounding_box(&mut self, b: &BoxRecord) {
        for v in [b.x_min, b.y_min, b.x_max, b.y_max] {
            self.float(v);
        }
    }
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
pub(crate) fn decode_event_with(body: &[u8], writer: &Schema, resolve: bool) -> Result<ProductImageEvent, DecodeError> {
    let value = read_datum(body, writer, product_image_event_schema(), resolve, "ProductImageEvent")?;
    let event = event_from_value(value).map_err(|e| e.into_error("ProductImageEvent"))?;
    validate_event(event)
}

/// Decodes an output record written with `writer` (resolved to [`product_attributes_schema`]);
/// for `tail`, tests and downstream tooling.
pub fn decode_attributes(body: &[u8], writer: &Schema) -> Result<ProductAttributes, DecodeError> {
    let reader = product_attributes_schema();
    let value = read_datum(
        body,
        writer,
        reader,
        needs_resolution(writer, reader),
        "ProductAttributes",
    )?;
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
    value.resolve(reader).map_err(|e| DecodeError::SchemaMismatch {
        record,
        reason: e.to_string(),
    })
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
    let model = ModelRef {
        name: m.string("name")?,
        version: m.string("version")?,
    };
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
        Ok(LabelSummary {
            label: l.string("label")?,
            max_score: l.float("max_score")?,
            count: l.int("count")?,
        })
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
        attributes: AggregatedAttributes {
            labels,
            main_object,
            object_colours,
        },
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
            metadata: [
                ("shop".to_owned(), "eu".to_owned()),
                ("lang".to_owned(), "de".to_owned()),
            ]
            .into(),
            event_time_ms: Some(1_700_000_000_123),
        }
    }

    fn attributes() -> ProductAttributes {
        let b = BoxRecord {
            x_min: 1.5,
            y_min: 2.25,
            x_max: 100.0,
            y_max: 80.125,
        };
        let n = BoxRecord {
            x_min: 0.01,
            y_min: 0.02,
            x_max: 0.9,
            y_max: 0.8,
        };
        ProductAttributes {
            event_id: "e-1".into(),
            product_id: "p-1".into(),
            model: ModelRef {
                name: "ssd_mobilenet_v2_coco".into(),
                version: "abc123".into(),
            },
            image_width: 640,
            image_height: 480,
            detections: vec![
                DetectionRecord {
                    label: "cup".into(),
                    label_id: 47,
                    score: 0.95,
                    box_px: b,
                    box_norm: n,
                },
                DetectionRecord {
                    label: "bowl".into(),
                    label_id: 51,
                    score: 0.5,
                    box_px: n,
                    box_norm: b,
                },
            ],
            attributes: AggregatedAttributes {
                labels: vec![LabelSummary {
                    label: "cup".into(),
                    max_score: 0.95,
                    count: 1,
                }],
                main_object: Some(MainObject {
                    label: "cup".into(),
                    score: 0.95,
                    detection_index: 0,
                    area_fraction: 0.25,
                }),
                object_colours: vec![ObjectColours {
                    detection_index: 0,
                    label: "cup".into(),
                    colours: vec![DominantColour {
                        name: "white".into(),
                        r: 250,
                        g: 251,
                        b: 0,
                        fraction: 0.75,
                    }],
                }],
            },
            timings: StageTimings {
                fetch_ms: 0.0,
                decode_ms: 1.5,
                batch_wait_ms: 2.0,
                inference_ms: 50.25,
                total_ms: 60.0,
            },
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
            (
                product_image_event_schema(),
                product_image_event_schema_json(),
                "io.attrstream.ProductImageEvent",
            ),
            (
                product_attributes_schema(),
                product_attributes_schema_json(),
                "io.attrstream.ProductAttributes",
            ),
            (
                dead_letter_schema(),
                dead_letter_schema_json(),
                "io.attrstream.DeadLetter",
            ),
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
        assert_eq!(
            compact_json("{ \"a b\" : [ 1, \"x \\\" y\" ] }\n"),
            r#"{"a b":[1,"x \" y"]}"#
        );
    }

    #[test]
    fn event_round_trips_with_all_shapes() {
        let mut bare = event(ImageSource::Uri("s3://bucket/key.jpg".into()));
        bare.content_type = None;
        bare.metadata.clear();
        bare.event_time_ms = None;
        for e in [
            event(ImageSource::Inline(vec![0xff, 0xd8, 0xff, 0])),
            event(ImageSource::Inline(vec![])),
            bare,
        ] {
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
        let bare = DeadLetter {
            original_key: None,
            event_id: None,
            product_id: None,
            ..dead_letter()
        };
        for d in [full, bare] {
            let body = encode_dead_letter(&d);
            assert_eq!(decode_dead_letter(&body, dead_letter_schema()).unwrap(), d);
        }
    }

    #[test]
    fn invalid_events_are_reported_with_their_ids() {
        let cases = [
            (
                ProductImageEvent {
                    event_id: "".into(),
                    ..event(ImageSource::Uri("file:///x".into()))
                },
                "event_id",
            ),
            (
                ProductImageEvent {
                    product_id: " ".into(),
                    ..event(ImageSource::Uri("file:///x".into()))
                },
                "product_id",
            ),
            (event(ImageSource::Uri("".into())), "uri"),
        ];
        for (e, what) in cases {
            let err = decode_event(&encode_event(&e), product_image_event_schema()).unwrap_err();
            assert_eq!(err.kind(), Some(error_kinds::INVALID_EVENT), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        let err = decode_event(
            &encode_event(&event(ImageSource::Uri("".into()))),
            product_image_event_schema(),
        )
        .unwrap_err();
        assert_eq!(err.ids(), (Some("e-1"), Some("p-1")));
        let err = decode_event(
            &encode_event(&ProductImageEvent {
                event_id: "".into(),
                ..event(ImageSource::Inline(vec![1]))
            }),
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
    fn longs_use_zigzag_varints() {
        let long = Schema::parse_str(r#""long""#).unwrap();
        for v in [
            0,
            -1,
            1,
            63,
            -64,
            64,
            -65,
            1 << 40,
            i64::from(i32::MIN),
            i64::MIN,
            i64::MAX,
        ] {
            let mut out = Out::with_capacity(10);
            out.long(v);
            assert_eq!(out.0, apache_avro::to_avro_datum(&long, Value::Long(v)).unwrap(), "{v}");
        }
    }

    #[test]
    fn bytes_equal_apache_avro_encoding_of_the_same_values() {
        // Re-encoding what apache-avro decodes must give the same bytes (maps have at most one
        // entry here: apache-avro's maps are unordered).
        let mut inline = event(ImageSource::Inline(vec![1, 2, 3]));
        inline.metadata.remove("lang");
        let bare = ProductImageEvent {
            content_type: None,
            metadata: BTreeMap::new(),
            event_time_ms: None,
            ..event(ImageSource::Uri("u".into()))
        };
        let mut full = attributes();
        full.metadata = [("k".to_owned(), "v".to_owned())].into();
        let empty = ProductAttributes {
            detections: vec![],
            attributes: AggregatedAttributes::default(),
            event_time_ms: None,
            metadata: BTreeMap::new(),
            ..attributes()
        };
        let bare_letter = DeadLetter {
            original_key: None,
            event_id: None,
            product_id: None,
            ..dead_letter()
        };
        for (body, schema) in [
            (encode_event(&inline), product_image_event_schema()),
            (encode_event(&bare), product_image_event_schema()),
            (encode_attributes(&full), product_attributes_schema()),
            (encode_attributes(&empty), product_attributes_schema()),
            (encode_dead_letter(&dead_letter()), dead_letter_schema()),
            (encode_dead_letter(&bare_letter), dead_letter_schema()),
        ] {
            let value = apache_avro::from_avro_datum(schema, &mut &body[..], None).unwrap();
            assert_eq!(apache_avro::to_avro_datum(schema, value).unwrap(), body);
        }
    }

    #[test]
    fn an_unrelated_writer_schema_is_a_schema_mismatch() {
        let other =
            Schema::parse_str(r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"int"}]}"#).unwrap();
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
        let Value::Record(ref mut attrs) = fields[6].1 else {
            panic!()
        };
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
            DATABASE_WRITE_FAILED,
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
                    let is_field =
                        o.contains_key("name") && o.contains_key("type") && !is_record && path.ends_with("fields");
                    if (is_record || is_field) && o.get("doc").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
                        missing.push(format!(
                            "{path}/{}",
                            o.get("name").and_then(|n| n.as_str()).unwrap_or("?")
                        ));
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
        for json in [
            product_image_event_schema_json(),
            product_attributes_schema_json(),
            dead_letter_schema_json(),
        ] {
            walk(&serde_json::from_str(json).unwrap(), "", &mut missing);
        }
        assert!(missing.is_empty(), "records or fields without doc: {missing:?}");
    }
}
