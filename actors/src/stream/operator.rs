//! The operator contract every stream transformation implements: records
//! in, records out through a [`Collector`], watermarks and end of input
//! passed through, and state taken as a cheap [`Snapshot`] at a barrier and
//! serialized later, off the record path.

use braid::store::codec;
use thiserror::Error;

/// Event time, in milliseconds since an epoch the job chooses.
pub type EventTime = i64;

/// Where an operator sends what it produces.
pub trait Collector<T> {
    /// Emits one record, with its event time if it has one.
    fn emit(&mut self, value: T, time: Option<EventTime>);
}

impl<T> Collector<T> for Vec<(T, Option<EventTime>)> {
    fn emit(&mut self, value: T, time: Option<EventTime>) {
        self.push((value, time));
    }
}

/// Why state could not be saved or restored.
#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum StateError {
    /// The state could not be encoded.
    #[error("cannot encode operator state: {0}")]
    Encode(String),
    /// The saved bytes do not decode as this operator's state.
    #[error("cannot decode operator state: {0}")]
    Decode(String),
}

/// Why an operator failed. The subtask stops, the attempt fails, and the
/// job recovers from its last completed checkpoint (or stops, past its
/// restart strategy): an operator never drops what it cannot handle.
#[derive(Debug, Error)]
pub enum OperatorError {
    /// An I/O operation failed (a sink's write, sync or rename).
    #[error("{action}: {source}")]
    Io {
        /// What was being done, naming the file.
        action: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// State could not be encoded or decoded.
    #[error(transparent)]
    State(#[from] StateError),
    /// Anything else, said in words.
    #[error("{0}")]
    Failed(String),
}

impl OperatorError {
    /// An I/O failure while doing `action`.
    pub fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        OperatorError::Io {
            action: action.into(),
            source,
        }
    }
}

/// State frozen at a barrier: cheap to take (a persistent map's clone, a
/// copy of a few counters), encoded later on another thread so the record
/// path does not wait for serialization.
pub struct Snapshot(Box<WriteState>);

/// Appends an encoded state to a buffer.
type WriteState = dyn FnOnce(&mut Vec<u8>) -> Result<(), StateError> + Send;

impl Snapshot {
    /// A snapshot encoded when [`Snapshot::encode`] runs.
    pub fn new(encode: impl FnOnce() -> Result<Vec<u8>, StateError> + Send + 'static) -> Self {
        Snapshot::writer(move |out| {
            let bytes = encode()?;
            if out.is_empty() {
                *out = bytes;
            } else {
                out.extend_from_slice(&bytes);
            }
            Ok(())
        })
    }

    /// A snapshot that appends its encoding to the buffer it is given
    /// ([`Snapshot::encode_into`]): a large state written once, where the
    /// whole checkpoint blob is assembled, instead of copied part by part.
    pub fn writer(
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), StateError> + Send + 'static,
    ) -> Self {
        Snapshot(Box::new(write))
    }

    /// The snapshot of a stateless operator.
    pub fn empty() -> Self {
        Snapshot::writer(|_| Ok(()))
    }

    /// A snapshot of a value that is itself the frozen copy: its
    /// [`codec`] encoding.
    pub fn of<S: serde::Serialize + Send + 'static>(state: S) -> Self {
        Snapshot::writer(move |out| {
            codec::encode_append(&state, out)
                .map(drop)
                .map_err(|e| StateError::Encode(e.to_string()))
        })
    }

    /// Encodes the state.
    pub fn encode(self) -> Result<Vec<u8>, StateError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the encoded state to `out`.
    pub fn encode_into(self, out: &mut Vec<u8>) -> Result<(), StateError> {
        (self.0)(out)
    }
}

/// Appends one length-prefixed part (its length, u64 little-endian, then
/// its bytes), the bytes written by `write` straight into `out`, so a
/// snapshot's parts are assembled in one buffer without copies.
pub(crate) fn write_part(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), StateError>,
) -> Result<(), StateError> {
    let at = out.len();
    out.extend_from_slice(&[0; 8]);
    write(out)?;
    let len = (out.len() - at - 8) as u64;
    out[at..at + 8].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Decodes bytes written by [`Snapshot::of`]; the state must occupy all of
/// `bytes` (trailing bytes are a [`StateError::Decode`]).
///
/// Any bytes give a state or [`StateError::Decode`]: the [`codec`] checks
/// every length it reads against the input before it allocates for it, and
/// serde's standard collections cap what they reserve up front. A state
/// type whose `Deserialize` reserves whatever length it is told does not
/// have that bound: imbl's collections do, so state fields of imbl types
/// deserialize through [`imbl_de`].
pub fn decode_state<S: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<S, StateError> {
    codec::decode(bytes).map_err(|e| StateError::Decode(e.to_string()))
}

/// `deserialize_with` functions for operator state kept in imbl's
/// persistent collections. imbl's own `Deserialize` reserves as many
/// elements as the input declares, so eight corrupt bytes of a checkpoint
/// could ask for exabytes and abort the process (found by `stream_fuzz`).
/// These read through the standard collections, whose up-front
/// reservation serde caps, and convert; the encoding is the same (a map
/// stays a map, a set a sequence).
pub mod imbl_de {
    use serde::{Deserialize, Deserializer};
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::hash::Hash;

    /// An [`imbl::HashMap`].
    pub fn hash_map<'de, D, K, V>(d: D) -> Result<imbl::HashMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Hash + Eq + Clone,
        V: Deserialize<'de> + Clone,
    {
        Ok(HashMap::<K, V>::deserialize(d)?.into_iter().collect())
    }

    /// An [`imbl::OrdMap`].
    pub fn ord_map<'de, D, K, V>(d: D) -> Result<imbl::OrdMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord + Clone,
        V: Deserialize<'de> + Clone,
    {
        Ok(BTreeMap::<K, V>::deserialize(d)?.into_iter().collect())
    }

    /// An [`imbl::OrdSet`].
    pub fn ord_set<'de, D, T>(d: D) -> Result<imbl::OrdSet<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Ord + Clone,
    {
        Ok(BTreeSet::<T>::deserialize(d)?.into_iter().collect())
    }
}

/// One step of a stream: `map`, `filter`, a keyed process function, a
/// window, a sink's writer. An operator instance runs in one thread, one
/// record at a time; each parallel subtask has its own instance.
pub trait Operator: Send + 'static {
    /// What it consumes.
    type In: Send + 'static;
    /// What it produces.
    type Out: Send + 'static;

    /// Handles one record. An error fails the subtask (see
    /// [`OperatorError`]).
    fn process(
        &mut self,
        value: Self::In,
        time: Option<EventTime>,
        out: &mut dyn Collector<Self::Out>,
    ) -> Result<(), OperatorError>;

    /// Event time has reached `watermark` on every input: no record with
    /// an earlier time will follow. Fire what is due. The runtime forwards
    /// the watermark downstream after this returns.
    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut dyn Collector<Self::Out>,
    ) -> Result<(), OperatorError> {
        let _ = (watermark, out);
        Ok(())
    }

    /// A bounded input has ended: flush what is pending.
    fn on_end(&mut self, out: &mut dyn Collector<Self::Out>) -> Result<(), OperatorError> {
        let _ = out;
        Ok(())
    }

    /// Freezes the operator's state at a barrier. A transactional sink
    /// pre-commits here; an error fails the checkpoint and the attempt, so
    /// no checkpoint completes over data that was not made durable.
    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        Ok(Snapshot::empty())
    }

    /// The barrier of checkpoint `epoch` passed this operator, right after
    /// [`snapshot`](Self::snapshot) froze its state for that epoch.
    fn barrier_passed(&mut self, epoch: u64) {
        let _ = epoch;
    }

    /// Checkpoint `epoch` completed everywhere: a transactional sink makes
    /// what it pre-committed for that epoch visible. An error fails the
    /// attempt; the restore commits that checkpoint's pre-committed output
    /// again before new records flow.
    fn notify_checkpoint_complete(&mut self, epoch: u64) -> Result<(), OperatorError> {
        let _ = epoch;
        Ok(())
    }

    /// Replaces the state with one a snapshot saved (bytes from
    /// [`Snapshot::encode`]; empty bytes for a stateless operator).
    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        let _ = bytes;
        Ok(())
    }
}

/// An operator that may have failed to build: a factory returns one when
/// making its operator can fail at run time (a table too large for memory,
/// a file that does not open), so that the failure fails the subtask at its
/// first call, as any operator error does, instead of a panic.
impl<O: Operator> Operator for Result<O, OperatorError> {
    type In = O::In;
    type Out = O::Out;

    fn process(
        &mut self,
        value: O::In,
        time: Option<EventTime>,
        out: &mut dyn Collector<O::Out>,
    ) -> Result<(), OperatorError> {
        built(self)?.process(value, time, out)
    }

    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut dyn Collector<O::Out>,
    ) -> Result<(), OperatorError> {
        built(self)?.on_watermark(watermark, out)
    }

    fn on_end(&mut self, out: &mut dyn Collector<O::Out>) -> Result<(), OperatorError> {
        built(self)?.on_end(out)
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        built(self)?.snapshot()
    }

    fn barrier_passed(&mut self, epoch: u64) {
        if let Ok(op) = self {
            op.barrier_passed(epoch);
        }
    }

    fn notify_checkpoint_complete(&mut self, epoch: u64) -> Result<(), OperatorError> {
        built(self)?.notify_checkpoint_complete(epoch)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        built(self)?.restore(bytes)
    }
}

/// The operator, or why it could not be built (said again at every call).
fn built<O>(op: &mut Result<O, OperatorError>) -> Result<&mut O, OperatorError> {
    op.as_mut()
        .map_err(|e| OperatorError::Failed(format!("the operator could not be built: {e}")))
}
