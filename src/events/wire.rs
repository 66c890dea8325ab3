//! The Confluent wire format: byte 0 is the magic byte 0, bytes 1–4 the schema-registry id
//! of the writer schema (big-endian), then the Avro binary body.
//!
//! Every standard Kafka Avro serializer (Java, Python, Go, …) writes and reads this framing,
//! so producers and consumers of our topics need nothing but their usual deserializer.

use super::error_kinds;

/// The first byte of every Confluent-framed value.
pub const MAGIC_BYTE: u8 = 0;

/// Length of the framing header: magic byte plus 4-byte schema id.
pub const HEADER_LEN: usize = 5;

/// Why a value is not in the Confluent wire format (dead-letter kind `bad_framing`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Fewer bytes than the 5-byte header.
    #[error(
        "value is {len} bytes, shorter than the 5-byte Confluent header (magic byte 0 + schema id); \
         was it written without a schema-registry serializer?"
    )]
    TooShort {
        /// Length of the value.
        len: usize,
    },
    /// The first byte is not the magic byte 0.
    #[error(
        "first byte is 0x{found:02x}, not the Confluent magic byte 0x00; the value was not written by a \
         schema-registry Avro serializer (raw Avro, JSON or another format?)"
    )]
    WrongMagicByte {
        /// The first byte found.
        found: u8,
    },
}

impl FramingError {
    /// The dead-letter reason for every framing error: [`error_kinds::BAD_FRAMING`].
    pub fn kind(&self) -> &'static str {
        error_kinds::BAD_FRAMING
    }
}

/// Prefixes an Avro body with the Confluent header for `schema_id`.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    write_header(schema_id, &mut out);
    out.extend_from_slice(body);
    out
}

/// Appends the 5-byte Confluent header to `out`; lets encoders write header and body into one
/// buffer without a copy.
pub fn write_header(schema_id: u32, out: &mut Vec<u8>) {
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.to_be_bytes());
}

/// Splits a Confluent-framed value into its schema id and Avro body (borrowed, no copy).
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8]), FramingError> {
    if bytes.len() < HEADER_LEN {
        return Err(FramingError::TooShort { len: bytes.len() });
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(FramingError::WrongMagicByte { found: bytes[0] });
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_then_unframe_round_trips() {
        let framed = frame(0x0102_0304, b"avro");
        assert_eq!(framed, [0, 1, 2, 3, 4, b'a', b'v', b'r', b'o']);
        assert_eq!(unframe(&framed), Ok((0x0102_0304, &b"avro"[..])));
    }

    #[test]
    fn empty_body_is_allowed() {
        // A record with no fields encodes to zero bytes; the framing itself is still valid.
        assert_eq!(unframe(&frame(7, b"")), Ok((7, &b""[..])));
    }

    #[test]
    fn short_values_are_rejected() {
        for len in 0..HEADER_LEN {
            let err = unframe(&vec![0; len]).unwrap_err();
            assert_eq!(err, FramingError::TooShort { len });
            assert_eq!(err.kind(), error_kinds::BAD_FRAMING);
            assert!(err.to_string().contains("shorter than the 5-byte"), "{err}");
        }
    }

    #[test]
    fn wrong_magic_byte_is_rejected() {
        let err = unframe(b"{\"event_id\": 1}").unwrap_err();
        assert_eq!(err, FramingError::WrongMagicByte { found: b'{' });
        assert!(err.to_string().contains("0x7b"), "{err}");
    }
}
