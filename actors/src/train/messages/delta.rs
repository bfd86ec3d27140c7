//! The weights a shard changed since its previous delta, [`Delta`], and
//! their Arrow form.
//!
//! Between a shard and serving in another process a delta travels as one
//! Arrow record batch in the store ([`DeltaFormat`]): `key: UInt64` and
//! `weight: Float32`, and the delta's header (shard, version, whether it
//! is full, and the batches it applied) as schema metadata. Serving
//! applies the columns where they lie.

use super::columns::{
    fill_key_values, key_value_layout, key_values, metadata, number, refused, single,
};
use super::{AppliedBatch, ModelVersion};
use crate::stream::channel::Format;
use crate::stream::columnar::ColumnarError;
use crate::stream::failure::StageError;
use crate::stream::operator::EventTime;
use arrow_array::RecordBatch;
use braid::store::arrow_buffer::ScalarBuffer;
use braid::store::batch::{BatchLayout, BatchWriter};
use serde::{Deserialize, Serialize};

/// Weights a shard changed since its previous delta, for serving.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The shard.
    pub shard: u32,
    /// The shard's version after the delta.
    pub version: ModelVersion,
    /// Replace the shard's part of the serving model (after a restore, and
    /// in a shard's first delta) instead of updating it.
    pub full: bool,
    /// Keys changed. A key may repeat, and then its last entry holds its
    /// weight (a full delta's keys are distinct and ascending).
    pub keys: ScalarBuffer<u64>,
    /// Their weights.
    pub weights: ScalarBuffer<f32>,
    /// Batches applied since the previous delta.
    pub batches: Vec<AppliedBatch>,
}

#[derive(Serialize)]
struct DeltaOut<'a> {
    shard: u32,
    version: ModelVersion,
    full: bool,
    keys: &'a [u64],
    weights: &'a [f32],
    batches: &'a [AppliedBatch],
}

#[derive(Deserialize)]
struct DeltaIn {
    shard: u32,
    version: ModelVersion,
    full: bool,
    keys: Vec<u64>,
    weights: Vec<f32>,
    batches: Vec<AppliedBatch>,
}

impl Serialize for Delta {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        DeltaOut {
            shard: self.shard,
            version: self.version,
            full: self.full,
            keys: &self.keys,
            weights: &self.weights,
            batches: &self.batches,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Delta {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let d = DeltaIn::deserialize(deserializer)?;
        if !super::columns::splits_evenly(d.keys.len(), d.weights.len()) {
            return Err(serde::de::Error::custom(format!(
                "a delta of {} keys and {} weights",
                d.keys.len(),
                d.weights.len()
            )));
        }
        Ok(Delta {
            shard: d.shard,
            version: d.version,
            full: d.full,
            keys: d.keys.into(),
            weights: d.weights.into(),
            batches: d.batches,
        })
    }
}

/// Lays a channel's deltas out as Arrow record batches in the store (see
/// the module docs). A channel batch holds one delta: the shards' delta
/// stream sends each at once (`batch_records(1)`).
#[derive(Debug, Default, Clone, Copy)]
pub struct DeltaFormat;

const WEIGHT_COLUMN: &str = "weight";
const SHARD_KEY: &str = "braid.delta.shard";
const EPOCH_KEY: &str = "braid.delta.epoch";
const RECORDS_KEY: &str = "braid.delta.records";
const FULL_KEY: &str = "braid.delta.full";
/// The applied batches, `seq:rows:ingest_ns` joined by `,`.
const BATCHES_KEY: &str = "braid.delta.batches";

fn parse_batches(text: &str) -> Option<Vec<AppliedBatch>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|b| {
            let mut parts = b.split(':').map(|n| n.parse::<u64>().ok());
            let (seq, rows, ingest_ns) = (parts.next()??, parts.next()??, parts.next()??);
            parts.next().is_none().then_some(AppliedBatch {
                seq,
                rows,
                ingest_ns,
            })
        })
        .collect()
}

impl Format<Delta> for DeltaFormat {
    fn layout(&self, records: &[(Delta, Option<EventTime>)]) -> Result<BatchLayout, ColumnarError> {
        let delta = single(records, "delta")?;
        let mut metadata = metadata([
            (SHARD_KEY, u64::from(delta.shard)),
            (EPOCH_KEY, delta.version.epoch),
            (RECORDS_KEY, delta.version.records),
            (FULL_KEY, u64::from(delta.full)),
        ]);
        let batches: Vec<String> = delta
            .batches
            .iter()
            .map(|b| format!("{}:{}:{}", b.seq, b.rows, b.ingest_ns))
            .collect();
        metadata.insert(BATCHES_KEY.to_string(), batches.join(","));
        key_value_layout(
            &delta.keys,
            &delta.weights,
            WEIGHT_COLUMN,
            metadata,
            "delta",
        )
    }

    fn fill(
        &self,
        records: &[(Delta, Option<EventTime>)],
        writer: &mut BatchWriter<'_>,
    ) -> Result<(), ColumnarError> {
        let delta = single(records, "delta")?;
        fill_key_values(writer, &delta.keys, &delta.weights)
    }

    fn read(
        &self,
        batch: &RecordBatch,
        push: &mut dyn FnMut(Delta, Option<EventTime>) -> Result<(), StageError>,
    ) -> Result<usize, StageError> {
        let (keys, weights) = key_values(batch, WEIGHT_COLUMN)?;
        let shard = u32::try_from(number(batch, SHARD_KEY)?)
            .map_err(|_| refused("a delta's shard is not a u32"))?;
        let batches = batch
            .schema_ref()
            .metadata()
            .get(BATCHES_KEY)
            .and_then(|text| parse_batches(text))
            .ok_or_else(|| refused("a delta batch without its applied batches"))?;
        let delta = Delta {
            shard,
            version: ModelVersion {
                epoch: number(batch, EPOCH_KEY)?,
                records: number(batch, RECORDS_KEY)?,
            },
            full: number(batch, FULL_KEY)? != 0,
            keys,
            weights,
            batches,
        };
        push(delta, None)?;
        // Serving applies the columns where they lie: nothing copied.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid::store::arrow_buffer::Buffer;
    use braid::store::batch::read_record_batch;

    fn sample(n: usize, batches: usize) -> Delta {
        Delta {
            shard: 1,
            version: ModelVersion {
                epoch: 3,
                records: 4096,
            },
            full: n % 2 == 0,
            keys: (0..n as u64).map(|k| k * 13).collect::<Vec<_>>().into(),
            weights: (0..n).map(|w| w as f32 / 3.0).collect::<Vec<_>>().into(),
            batches: (0..batches as u64)
                .map(|i| AppliedBatch {
                    seq: i,
                    rows: 64 + i,
                    ingest_ns: 1 << 50 | i,
                })
                .collect(),
        }
    }

    #[test]
    fn a_delta_crosses_as_arrow_and_is_applied_in_place() {
        for (n, batches) in [(500, 2), (0, 0), (7, 1)] {
            let sent = sample(n, batches);
            let records = [(sent.clone(), None)];
            let layout = DeltaFormat.layout(&records).expect("laid out");
            let mut words = vec![0u64; layout.total_len().div_ceil(8)];
            let mut writer =
                BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).expect("fits");
            DeltaFormat.fill(&records, &mut writer).expect("filled");
            writer.finish().expect("checked");
            let buffer = Buffer::from_vec(words);
            let span = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
            let arrow = read_record_batch(buffer).expect("read");
            let mut got = Vec::new();
            let copied = DeltaFormat
                .read(&arrow, &mut |d, _| {
                    got.push(d);
                    Ok(())
                })
                .expect("a delta");
            assert_eq!(copied, 0);
            assert_eq!(got, vec![sent]);
            if n > 0 {
                assert!(
                    span.contains(&(got[0].weights.as_ptr() as usize)),
                    "weights were copied"
                );
            }
        }
    }

    #[test]
    fn bad_applied_batches_are_refused_and_serde_round_trips() {
        assert!(parse_batches("1:2").is_none());
        assert!(parse_batches("1:2:3:4").is_none());
        assert!(parse_batches("a:2:3").is_none());
        assert_eq!(parse_batches("").map(|b| b.len()), Some(0));
        let round = braid::store::codec::encode(&sample(5, 2)).expect("encoded");
        let back: Delta = braid::store::codec::decode(&round).expect("decoded");
        assert_eq!(back, sample(5, 2));
    }
}
