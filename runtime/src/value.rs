//! How arguments and return values are encoded: bincode through the
//! store's codec (`braid_store::codec`), with the object references a value
//! holds collected beside its bytes so they stay counted in flight.

use crate::error::{Error, Result};
use crate::object_ref::{collect_nested, ObjectRef, RefHandle};
use braid_store::{codec, ObjectView};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

/// An encoded task or actor-call argument, ready to ship.
#[derive(Debug)]
pub enum Arg {
    /// A value, encoded, with the references nested inside it.
    Value {
        /// The encoded value.
        bytes: Vec<u8>,
        /// References serialized inside it.
        nested: Vec<Arc<RefHandle>>,
    },
    /// A reference, resolved to its value before the task runs.
    Ref(Arc<RefHandle>),
}

/// Anything that can be passed where a `T` argument is expected: a `T`
/// itself, or an [`ObjectRef<T>`] whose value is fetched before the task
/// runs.
pub trait IntoArg<T> {
    /// Encodes the argument.
    fn into_arg(self) -> Result<Arg>;
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self) -> Result<Arg> {
        let encoded = encode_return(&self)?;
        Ok(Arg::Value {
            bytes: encoded.bytes,
            nested: encoded.refs,
        })
    }
}

/// A `&str` where a `String` is taken: `greet::remote(&rt, "x")`. It
/// encodes as the `String` would.
impl IntoArg<String> for &str {
    fn into_arg(self) -> Result<Arg> {
        self.serialize_arg()
    }
}

/// A `&String` where a `String` is taken, without cloning it.
impl IntoArg<String> for &String {
    fn into_arg(self) -> Result<Arg> {
        self.as_str().serialize_arg()
    }
}

/// A slice where a `Vec<T>` is taken: `sum::remote(&rt, &xs[..10])`. It
/// encodes as the `Vec` would.
impl<T: Serialize> IntoArg<Vec<T>> for &[T] {
    fn into_arg(self) -> Result<Arg> {
        self.serialize_arg()
    }
}

/// A `&Vec<T>` where a `Vec<T>` is taken, without cloning it.
impl<T: Serialize> IntoArg<Vec<T>> for &Vec<T> {
    fn into_arg(self) -> Result<Arg> {
        self.as_slice().serialize_arg()
    }
}

/// Encodes a borrowed value as an argument of the owned type it
/// serializes as.
trait SerializeArg {
    fn serialize_arg(&self) -> Result<Arg>;
}

impl<T: Serialize + ?Sized> SerializeArg for T {
    fn serialize_arg(&self) -> Result<Arg> {
        let encoded = encode_return(&self)?;
        Ok(Arg::Value {
            bytes: encoded.bytes,
            nested: encoded.refs,
        })
    }
}

impl<T> IntoArg<T> for ObjectRef<T> {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg::Ref(self.handle))
    }
}

impl<T> IntoArg<T> for &ObjectRef<T> {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg::Ref(self.handle.clone()))
    }
}

/// An encoded value and the references serialized inside it.
#[derive(Debug, Default)]
pub struct Encoded {
    pub(crate) bytes: Vec<u8>,
    pub(crate) refs: Vec<Arc<RefHandle>>,
}

impl Encoded {
    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Encodes a value, collecting the references nested in it.
pub fn encode_return<T: Serialize>(value: &T) -> Result<Encoded> {
    let (bytes, refs) = collect_nested(|| codec::encode(value));
    let bytes = bytes.map_err(|e| Error::Codec(e.to_string()))?;
    Ok(Encoded { bytes, refs })
}

/// Decodes a value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    codec::decode(bytes).map_err(|e| Error::Codec(e.to_string()))
}

/// One resolved argument on the worker side.
#[derive(Debug)]
pub(crate) enum ArgData {
    Inline(Vec<u8>),
    Stored(ObjectView),
}

impl ArgData {
    fn bytes(&self) -> &[u8] {
        match self {
            ArgData::Inline(b) => b,
            ArgData::Stored(v) => v.as_bytes(),
        }
    }
}

/// The resolved arguments of one task or call, as the registered function
/// receives them.
#[derive(Debug)]
pub struct Args {
    pub(crate) items: Vec<ArgData>,
}

impl Args {
    /// How many arguments there are.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Checks the caller passed `n` arguments.
    pub fn expect_len(&self, n: usize, function: &'static str) -> Result<()> {
        if self.items.len() == n {
            Ok(())
        } else {
            Err(Error::TaskError {
                function: function.to_string(),
                message: format!("expected {n} arguments, got {}", self.items.len()),
            })
        }
    }

    /// Decodes argument `index`.
    pub fn decode<T: DeserializeOwned>(&self, index: usize) -> Result<T> {
        let item = self
            .items
            .get(index)
            .ok_or_else(|| Error::Codec(format!("no argument {index}")))?;
        decode(item.bytes())
    }
}
