//! A worker's gradients for one shard, [`Push`], and their Arrow form.
//!
//! Between a worker and a shard in another process a push travels as one
//! Arrow record batch in the store ([`PushFormat`]): `key: UInt64` and
//! `grad: Float32`, one row per occurrence, and the push's header (shard,
//! worker, step, rows, batch index, ingest time, end of input) as schema
//! metadata. The shard applies the columns where they lie: a push's keys
//! and gradients are Arrow buffers, which are the store object's bytes
//! when the push crossed processes and the worker's vectors when it did
//! not.

use super::columns::{
    fill_key_values, key_value_layout, key_values, metadata, number, refused, single,
};
use crate::stream::channel::Format;
use crate::stream::columnar::ColumnarError;
use crate::stream::failure::StageError;
use crate::stream::operator::EventTime;
use arrow_array::RecordBatch;
use braid::store::arrow_buffer::ScalarBuffer;
use braid::store::batch::{BatchLayout, BatchWriter};
use serde::{Deserialize, Serialize};

/// Gradients one worker's step sends to one shard: `grads[i]` for
/// `keys[i]`, applied in order (a key may repeat, once per occurrence).
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// The shard.
    pub shard: u32,
    /// The worker.
    pub worker: u32,
    /// The worker's step (its batch count before this batch).
    pub step: u64,
    /// Keys, in row order.
    pub keys: ScalarBuffer<u64>,
    /// Their gradients.
    pub grads: ScalarBuffer<f32>,
    /// Rows in the worker's batch.
    pub rows: u64,
    /// The batch's stream index.
    pub seq: u64,
    /// When the batch's first row was read.
    pub ingest_ns: u64,
    /// The worker's input ended: no step `step` or later will come.
    pub done: bool,
}

#[derive(Serialize)]
struct PushOut<'a> {
    shard: u32,
    worker: u32,
    step: u64,
    keys: &'a [u64],
    grads: &'a [f32],
    rows: u64,
    seq: u64,
    ingest_ns: u64,
    done: bool,
}

#[derive(Deserialize)]
struct PushIn {
    shard: u32,
    worker: u32,
    step: u64,
    keys: Vec<u64>,
    grads: Vec<f32>,
    rows: u64,
    seq: u64,
    ingest_ns: u64,
    done: bool,
}

impl Serialize for Push {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        PushOut {
            shard: self.shard,
            worker: self.worker,
            step: self.step,
            keys: &self.keys,
            grads: &self.grads,
            rows: self.rows,
            seq: self.seq,
            ingest_ns: self.ingest_ns,
            done: self.done,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Push {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let p = PushIn::deserialize(deserializer)?;
        if !super::columns::splits_evenly(p.keys.len(), p.grads.len()) {
            return Err(serde::de::Error::custom(format!(
                "a push of {} keys and {} gradients",
                p.keys.len(),
                p.grads.len()
            )));
        }
        Ok(Push {
            shard: p.shard,
            worker: p.worker,
            step: p.step,
            keys: p.keys.into(),
            grads: p.grads.into(),
            rows: p.rows,
            seq: p.seq,
            ingest_ns: p.ingest_ns,
            done: p.done,
        })
    }
}

/// Lays a channel's pushes out as Arrow record batches in the store (see
/// the module docs). A channel batch holds one push: the workers' push
/// stream sends each at once (`batch_records(1)`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PushFormat;

const GRAD_COLUMN: &str = "grad";
const HEADER: [&str; 7] = [
    "braid.push.shard",
    "braid.push.worker",
    "braid.push.step",
    "braid.push.rows",
    "braid.push.seq",
    "braid.push.ingest_ns",
    "braid.push.done",
];

impl Format<Push> for PushFormat {
    fn layout(&self, records: &[(Push, Option<EventTime>)]) -> Result<BatchLayout, ColumnarError> {
        let push = single(records, "push")?;
        let header = [
            u64::from(push.shard),
            u64::from(push.worker),
            push.step,
            push.rows,
            push.seq,
            push.ingest_ns,
            u64::from(push.done),
        ];
        let metadata = metadata(HEADER.into_iter().zip(header));
        key_value_layout(&push.keys, &push.grads, GRAD_COLUMN, metadata, "push")
    }

    fn fill(
        &self,
        records: &[(Push, Option<EventTime>)],
        writer: &mut BatchWriter<'_>,
    ) -> Result<(), ColumnarError> {
        let push = single(records, "push")?;
        fill_key_values(writer, &push.keys, &push.grads)
    }

    fn read(
        &self,
        batch: &RecordBatch,
        push: &mut dyn FnMut(Push, Option<EventTime>) -> Result<(), StageError>,
    ) -> Result<usize, StageError> {
        let (keys, grads) = key_values(batch, GRAD_COLUMN)?;
        let mut header = [0u64; HEADER.len()];
        for (value, key) in header.iter_mut().zip(HEADER) {
            *value = number(batch, key)?;
        }
        let [shard, worker, step, rows, seq, ingest_ns, done] = header;
        let small = |v: u64| u32::try_from(v).map_err(|_| refused(format!("{v} is not a u32")));
        let p = Push {
            shard: small(shard)?,
            worker: small(worker)?,
            step,
            keys,
            grads,
            rows,
            seq,
            ingest_ns,
            done: done != 0,
        };
        push(p, None)?;
        // The shard applies the columns where they lie: nothing copied.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid::store::arrow_buffer::Buffer;
    use braid::store::batch::read_record_batch;

    fn sample(n: usize, done: bool) -> Push {
        Push {
            shard: 3,
            worker: 1,
            step: 42,
            keys: (0..n as u64).map(|k| k * 7).collect::<Vec<_>>().into(),
            grads: (0..n).map(|g| g as f32 - 0.5).collect::<Vec<_>>().into(),
            rows: 9,
            seq: 77,
            ingest_ns: 1 << 40,
            done,
        }
    }

    #[test]
    fn a_push_crosses_as_arrow_and_is_applied_in_place() {
        for (n, done, width) in [(100, false, 1), (0, true, 1), (100, false, 5)] {
            let mut sent = sample(n, done);
            sent.grads = (0..n * width)
                .map(|g| g as f32 * 0.25)
                .collect::<Vec<_>>()
                .into();
            let records = [(sent.clone(), None)];
            let layout = PushFormat.layout(&records).expect("laid out");
            let mut words = vec![0u64; layout.total_len().div_ceil(8)];
            let mut writer =
                BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).expect("fits");
            PushFormat.fill(&records, &mut writer).expect("filled");
            writer.finish().expect("checked");
            let buffer = Buffer::from_vec(words);
            let span = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
            let arrow = read_record_batch(buffer).expect("read");
            let mut got = Vec::new();
            let copied = PushFormat
                .read(&arrow, &mut |p, _| {
                    got.push(p);
                    Ok(())
                })
                .expect("a push");
            assert_eq!(copied, 0);
            assert_eq!(got, vec![sent]);
            if n > 0 {
                assert!(
                    span.contains(&(got[0].keys.as_ptr() as usize))
                        && span.contains(&(got[0].grads.as_ptr() as usize)),
                    "keys or gradients were copied (width {width})"
                );
            }
        }
    }

    #[test]
    fn pushes_that_are_not_one_or_do_not_match_are_refused() {
        let two = [(sample(1, false), None), (sample(1, false), None)];
        assert!(PushFormat.layout(&two).is_err());
        let mut odd = sample(3, false);
        odd.grads = vec![1.0f32].into();
        assert!(PushFormat.layout(&[(odd, None)]).is_err());
        let round = braid::store::codec::encode(&sample(4, false)).expect("encoded");
        let back: Push = braid::store::codec::decode(&round).expect("decoded");
        assert_eq!(back, sample(4, false));
    }
}
