//! The Kafka contracts: domain records, their Avro codec, the Confluent wire format and
//! the schema-registry client. `schemas/*.avsc` is the single source of truth; the codec
//! embeds those files at build time.

pub mod codec;
pub mod labelled;
pub mod registry;
pub mod types;
pub mod wire;

pub use types::*;

/// The machine-readable reasons a message goes to the dead-letter topic (`DeadLetter.error_kind`).
///
/// They are part of the output contract: alerting and replay tooling match on them, so add
/// new ones rather than renaming.
pub mod error_kinds {
    /// The value is not in the expected wire format (e.g. no Confluent magic byte).
    pub const BAD_FRAMING: &str = "bad_framing";
    /// The Confluent schema id is not known to the registry or the configuration.
    pub const UNKNOWN_SCHEMA: &str = "unknown_schema";
    /// The Avro body does not decode with the writer schema.
    pub const BAD_AVRO: &str = "bad_avro";
    /// The record decoded but breaks a rule (empty event id, empty product id, …).
    pub const INVALID_EVENT: &str = "invalid_event";
    /// The image URI points to nothing (missing file or object, HTTP 404/410).
    pub const MISSING_IMAGE: &str = "missing_image";
    /// The image URI is malformed or uses a scheme that is not enabled.
    pub const UNSUPPORTED_URI: &str = "unsupported_uri";
    /// The URI resolves to a loopback, link-local or private address and the SSRF guard is on.
    pub const BLOCKED_ADDRESS: &str = "blocked_address";
    /// Fetching took longer than the configured timeout (after retries).
    pub const FETCH_TIMEOUT: &str = "fetch_timeout";
    /// The server answered with an error status other than not-found (after retries).
    pub const FETCH_HTTP_STATUS: &str = "fetch_http_status";
    /// The image is larger than the configured byte limit.
    pub const FETCH_TOO_LARGE: &str = "fetch_too_large";
    /// Any other fetch failure (connection refused, TLS, I/O) after retries.
    pub const FETCH_FAILED: &str = "fetch_failed";
    /// Zero bytes of image data.
    pub const EMPTY_IMAGE: &str = "empty_image";
    /// The bytes are not a supported image format.
    pub const UNKNOWN_FORMAT: &str = "unknown_format";
    /// The image declares more pixels than the configured limit (refused before decoding).
    pub const IMAGE_TOO_LARGE: &str = "image_too_large";
    /// The image data is truncated or corrupt.
    pub const CORRUPT_IMAGE: &str = "corrupt_image";
    /// The model failed on this image even after the worker was restarted and the image retried alone.
    pub const INFERENCE_FAILED: &str = "inference_failed";
    /// The PostgreSQL sink could not store the event's row after its retries (or PostgreSQL
    /// refused the data). The output record was still produced; replay the dead letter to
    /// write the row.
    pub const DATABASE_WRITE_FAILED: &str = "database_write_failed";
}
