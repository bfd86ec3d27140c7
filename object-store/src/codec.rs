//! Value serialization: the only module in the crate that touches `bincode`.
//!
//! Everything the store serializes (control messages, socket frames, small
//! metadata values) goes through these functions, so changing the wire format
//! is a change to this file alone. Nothing bincode-specific appears in the
//! public API: errors carry messages, not `bincode::Error`.
//!
//! The format is bincode 1.3 with fixed-width little-endian integers
//! (collection lengths are `u64`), chosen so encoded sizes are predictable and
//! independent of the values. Decoding always rejects trailing bytes, and a
//! length prefix can never make the decoder reserve more than the input could
//! hold (plus at most 1 MiB of cautious preallocation per open sequence).
//!
//! Limits for untrusted input: memory is bounded by the input size, not by
//! the decoded type's in-memory size. A type whose elements are much larger
//! in memory than on the wire (`Vec<Option<[u64; 1000]>>`: one byte per
//! `None`) amplifies accordingly, and a sequence of zero-sized elements
//! (`Vec<()>`) with a huge declared length costs time though not memory. Keep
//! such types out of messages decoded from other processes.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The message bincode 1.3.3 puts in `ErrorKind::Custom` when
/// `reject_trailing_bytes` fires; bincode is pinned to `=1.3.3`, so matching
/// on it is stable (and covered by a test).
const TRAILING_BYTES_MSG: &str = "Slice had bytes remaining after deserialization";

/// A value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The value's `Serialize` impl failed (e.g. a sequence of unknown length
    /// or a custom serializer error).
    #[error("cannot serialize value: {0}")]
    Serialize(String),
    /// The destination buffer cannot hold the encoded value.
    #[error("buffer too small: encoding needs {needed} bytes, buffer has {available}")]
    BufferTooSmall {
        /// Bytes the encoding needs.
        needed: u64,
        /// Bytes the buffer provides.
        available: usize,
    },
}

/// Bytes could not be decoded into the requested type.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid encoding of the requested type (truncated,
    /// invalid tag, invalid UTF-8, a length prefix longer than the input, ...).
    #[error("malformed input: {0}")]
    Malformed(String),
    /// The input is longer than the caller's byte limit.
    #[error("input exceeds the decode limit of {limit} bytes")]
    TooLarge {
        /// The limit passed to [`decode_bounded`].
        limit: u64,
    },
    /// A complete value was decoded but bytes were left over.
    #[error("trailing bytes after the encoded value")]
    TrailingBytes,
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
}

fn serialize_error(e: bincode::Error) -> EncodeError {
    EncodeError::Serialize(e.to_string())
}

/// Encodes `value` into a fresh vector.
///
/// Use for messages and small values; to write straight into an existing
/// buffer (e.g. an arena object) use [`encode_into`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    options().serialize(value).map_err(serialize_error)
}

/// The exact number of bytes [`encode`] would produce for `value`, computed
/// without allocating.
///
/// Use to size a buffer or store object before calling [`encode_into`].
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<u64, EncodeError> {
    options().serialized_size(value).map_err(serialize_error)
}

/// Encodes `value` into the front of `buf` and returns the number of bytes
/// written; bytes past that are left untouched.
///
/// Use to serialize in place into memory you already own (e.g. an arena
/// object). If `buf` is too small, fails before writing anything.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut [u8]) -> Result<usize, EncodeError> {
    let needed = encoded_len(value)?;
    let too_small = EncodeError::BufferTooSmall {
        needed,
        available: buf.len(),
    };
    let n = match usize::try_from(needed) {
        Ok(n) if n <= buf.len() => n,
        _ => return Err(too_small),
    };
    let dst = buf.get_mut(..n).ok_or(too_small)?;
    options()
        .serialize_into(dst, value)
        .map_err(serialize_error)?;
    Ok(n)
}

/// Appends the encoding of `value` to `out` and returns the number of bytes
/// appended; the bytes already in `out` are kept.
///
/// Use to assemble a larger buffer (a length-prefixed frame, a checkpoint
/// blob of several parts) without an intermediate vector. Unlike
/// [`encode_into`] it makes a single pass over `value` (no sizing pass), and
/// `out` grows as needed. On failure `out` is left as it was.
pub fn encode_append<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    let at = out.len();
    match options().serialize_into(&mut *out, value) {
        Ok(()) => Ok(out.len() - at),
        Err(e) => {
            out.truncate(at);
            Err(serialize_error(e))
        }
    }
}

/// Decodes a `T` that must occupy all of `bytes`.
///
/// Use for values read from store objects. Safe on untrusted bytes too: a
/// length prefix larger than the rest of `bytes` is rejected before anything
/// is allocated for it. Use [`decode_bounded`] to also cap the input size.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    options().deserialize(bytes).map_err(|e| decode_error(*e))
}

/// Decodes a `T` that must occupy all of `bytes`, refusing inputs longer than
/// `limit` bytes.
///
/// Use for untrusted input (socket frames, data from other processes). Any
/// length prefix larger than `limit` is an error, never an allocation.
pub fn decode_bounded<T: DeserializeOwned>(bytes: &[u8], limit: u64) -> Result<T, DecodeError> {
    // bincode 1.3.3 ignores `with_limit` when decoding from a slice (it
    // substitutes an infinite limit, see its `internal::deserialize_seed`),
    // because the slice itself bounds every read: byte and string lengths are
    // checked against the remaining input before allocating, and serde caps
    // sequence preallocation at 1 MiB. So the input length is the effective
    // limit and is checked here.
    if bytes.len() as u64 > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    options().deserialize(bytes).map_err(|e| decode_error(*e))
}

fn decode_error(e: bincode::ErrorKind) -> DecodeError {
    match e {
        bincode::ErrorKind::Custom(msg) if msg == TRAILING_BYTES_MSG => DecodeError::TrailingBytes,
        bincode::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Malformed("unexpected end of input".to_owned())
        }
        other => DecodeError::Malformed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Put,
        Get { id: u64 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        name: String,
        kind: Kind,
        data: Vec<u32>,
        opt: Option<f64>,
    }

    fn sample() -> Msg {
        Msg {
            name: "hello".into(),
            kind: Kind::Get { id: 7 },
            data: vec![1, 2, 3],
            opt: Some(1.5),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = encode(&m).unwrap();
        assert_eq!(encoded_len(&m).unwrap(), bytes.len() as u64);
        assert_eq!(decode::<Msg>(&bytes).unwrap(), m);
        assert_eq!(decode_bounded::<Msg>(&bytes, 1024).unwrap(), m);

        let s: &str = "unsized";
        let bytes = encode(s).unwrap();
        assert_eq!(decode::<String>(&bytes).unwrap(), s);
        assert_eq!(
            decode::<Kind>(&encode(&Kind::Put).unwrap()).unwrap(),
            Kind::Put
        );
    }

    #[test]
    fn fixint_little_endian() {
        assert_eq!(encode(&1u32).unwrap(), vec![1, 0, 0, 0]);
        assert_eq!(encode(&vec![9u8]).unwrap(), vec![1, 0, 0, 0, 0, 0, 0, 0, 9]);
    }

    #[test]
    fn encode_into_writes_in_place() {
        let m = sample();
        let expected = encode(&m).unwrap();
        let mut buf = vec![0xAAu8; expected.len() + 10];
        let n = encode_into(&m, &mut buf).unwrap();
        assert_eq!(n, expected.len());
        assert_eq!(&buf[..n], &expected[..]);
        assert!(buf[n..].iter().all(|&b| b == 0xAA));
        assert_eq!(decode::<Msg>(&buf[..n]).unwrap(), m);
    }

    #[test]
    fn encode_append_keeps_the_prefix() {
        let m = sample();
        let expected = encode(&m).unwrap();
        let mut out = vec![7u8, 8, 9];
        let n = encode_append(&m, &mut out).unwrap();
        assert_eq!(n, expected.len());
        assert_eq!(&out[..3], &[7, 8, 9]);
        assert_eq!(&out[3..], &expected[..]);
        assert_eq!(decode::<Msg>(&out[3..]).unwrap(), m);
    }

    #[test]
    fn encode_append_failure_leaves_out_unchanged() {
        /// Serializes one element, then fails.
        struct FailsMidway;
        impl Serialize for FailsMidway {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::{Error, SerializeTuple};
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element(&0xDEAD_BEEFu32)?;
                Err(S::Error::custom("midway"))
            }
        }
        let mut out = vec![1u8, 2];
        assert!(matches!(
            encode_append(&FailsMidway, &mut out),
            Err(EncodeError::Serialize(_))
        ));
        assert_eq!(out, vec![1, 2]);
    }

    #[test]
    fn encode_into_buffer_too_small() {
        let m = sample();
        let len = encode(&m).unwrap().len();
        let mut buf = vec![0xAAu8; len - 1];
        match encode_into(&m, &mut buf) {
            Err(EncodeError::BufferTooSmall { needed, available }) => {
                assert_eq!(needed, len as u64);
                assert_eq!(available, len - 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.iter().all(|&b| b == 0xAA), "nothing written on failure");
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut bytes = encode(&sample()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Msg>(&bytes),
            Err(DecodeError::TrailingBytes)
        ));
        assert!(matches!(
            decode_bounded::<Msg>(&bytes, 1024),
            Err(DecodeError::TrailingBytes)
        ));
    }

    #[test]
    fn truncated_is_malformed() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode::<Msg>(&bytes[..cut]),
                Err(DecodeError::Malformed(_))
            ));
        }
    }

    #[test]
    fn huge_declared_length_fails_fast() {
        // A u64 length prefix of 2^60 followed by a few bytes of payload.
        let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);

        // Would abort on allocation failure if the prefix were trusted.
        let malformed = |r: Result<(), DecodeError>| matches!(r, Err(DecodeError::Malformed(_)));
        assert!(malformed(decode::<Vec<u64>>(&bytes).map(drop)));
        assert!(malformed(decode::<Vec<u8>>(&bytes).map(drop)));
        assert!(malformed(decode::<String>(&bytes).map(drop)));
        assert!(malformed(decode::<Vec<Vec<u8>>>(&bytes).map(drop)));
        assert!(malformed(
            decode_bounded::<Vec<u64>>(&bytes, 1 << 20).map(drop)
        ));
        assert!(malformed(
            decode_bounded::<String>(&bytes, 1 << 20).map(drop)
        ));
        assert!(malformed(
            decode_bounded::<Vec<Vec<u8>>>(&bytes, 1 << 20).map(drop)
        ));

        // Nested: an outer sequence of 2^60 inner sequences of 2^60 each.
        let mut nested = (1u64 << 60).to_le_bytes().to_vec();
        nested.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(malformed(
            decode_bounded::<Vec<Vec<u64>>>(&nested, 64).map(drop)
        ));
    }

    #[test]
    fn input_over_limit_rejected() {
        let bytes = encode(&vec![0u8; 100]).unwrap();
        assert!(matches!(
            decode_bounded::<Vec<u8>>(&bytes, 50),
            Err(DecodeError::TooLarge { limit: 50 })
        ));
        assert!(decode_bounded::<Vec<u8>>(&bytes, bytes.len() as u64).is_ok());
    }

    #[test]
    fn invalid_content_is_malformed() {
        // Enum variant index out of range.
        let bytes = 5u32.to_le_bytes();
        assert!(matches!(
            decode::<Kind>(&bytes),
            Err(DecodeError::Malformed(_))
        ));
        // Invalid UTF-8 in a string.
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(
            decode::<String>(&bytes),
            Err(DecodeError::Malformed(_))
        ));
    }
}
