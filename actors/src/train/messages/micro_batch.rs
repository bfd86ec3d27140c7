//! A training micro-batch, [`TrainBatch`]: built by the source, or read in
//! place from the node's store where it crossed processes.
//!
//! Between the source and a worker in another process a micro-batch
//! travels as one Arrow record batch in the store ([`TrainBatchFormat`],
//! set on the source's stream with
//! [`DataStream::columnar_with`](crate::stream::graph::DataStream::columnar_with)):
//! the feature batch's columns (see [`data`](crate::train::data)), and the
//! micro-batch's index, first row and ingest time as schema metadata. The
//! worker trains on the columns where they lie ([`Rows::InPlace`]), so
//! nothing is encoded or copied on the way.

use super::columns::{invalid, metadata, number, refused, single};
use crate::stream::channel::Format;
use crate::stream::columnar::ColumnarError;
use crate::stream::failure::StageError;
use crate::stream::operator::EventTime;
use crate::train::data::{DataError, FeatureBatch, FeatureBatchRef};
use arrow_array::RecordBatch;
use braid::store::batch::{BatchLayout, BatchWriter};
use serde::{Deserialize, Serialize};

/// One training micro-batch from the source: `rows` rows starting at
/// stream position `first_row`, read at `ingest_ns` (wall clock).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBatch {
    /// Its index in the stream (workers take `seq mod workers`).
    pub seq: u64,
    /// The stream position of its first row.
    pub first_row: u64,
    /// When its first row was read (ns since the Unix epoch).
    pub ingest_ns: u64,
    /// The rows.
    pub batch: Rows,
}

/// A micro-batch's rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// Built in this process (by the source, or decoded).
    Built(FeatureBatch),
    /// A feature batch's Arrow record batch, read in place from the store
    /// and checked to be one ([`FeatureBatchRef::from_record_batch`]).
    InPlace(RecordBatch),
}

impl Rows {
    /// The rows' columns, in place.
    pub fn view(&self) -> Result<FeatureBatchRef<'_>, DataError> {
        match self {
            Rows::Built(batch) => Ok(batch.view()),
            Rows::InPlace(batch) => FeatureBatchRef::from_record_batch(batch),
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        match self {
            Rows::Built(batch) => batch.rows(),
            Rows::InPlace(batch) => batch.num_rows(),
        }
    }
}

impl From<FeatureBatch> for Rows {
    fn from(batch: FeatureBatch) -> Self {
        Rows::Built(batch)
    }
}

#[derive(Serialize)]
struct TrainBatchOut<'a> {
    seq: u64,
    first_row: u64,
    ingest_ns: u64,
    labels: &'a [f32],
    offsets: &'a [u32],
    ids: &'a [u64],
    values: Option<&'a [f32]>,
}

#[derive(Deserialize)]
struct TrainBatchIn {
    seq: u64,
    first_row: u64,
    ingest_ns: u64,
    labels: Vec<f32>,
    offsets: Vec<u32>,
    ids: Vec<u64>,
    values: Option<Vec<f32>>,
}

impl Serialize for TrainBatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rows = self.batch.view().map_err(serde::ser::Error::custom)?;
        TrainBatchOut {
            seq: self.seq,
            first_row: self.first_row,
            ingest_ns: self.ingest_ns,
            labels: rows.labels(),
            offsets: rows.offsets(),
            ids: rows.ids(),
            values: rows.values(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TrainBatch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let b = TrainBatchIn::deserialize(deserializer)?;
        let batch = FeatureBatch::from_parts(b.labels, b.offsets, b.ids, b.values)
            .map_err(serde::de::Error::custom)?;
        Ok(TrainBatch {
            seq: b.seq,
            first_row: b.first_row,
            ingest_ns: b.ingest_ns,
            batch: Rows::Built(batch),
        })
    }
}

/// Schema metadata keys of a micro-batch's Arrow form.
const SEQ_KEY: &str = "braid.train.seq";
const FIRST_ROW_KEY: &str = "braid.train.first_row";
const INGEST_KEY: &str = "braid.train.ingest_ns";

/// Lays a channel's micro-batches out as Arrow record batches in the store
/// (see the module docs). A channel batch holds one micro-batch: the
/// training source's stream sends each at once (`batch_records(1)`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TrainBatchFormat;

/// The one micro-batch of a channel batch, with its rows built (a batch
/// read in place elsewhere and sent on is copied into a built one).
fn built(
    records: &[(TrainBatch, Option<EventTime>)],
) -> Result<(&TrainBatch, std::borrow::Cow<'_, FeatureBatch>), ColumnarError> {
    let batch = single(records, "micro-batch")?;
    let rows = match &batch.batch {
        Rows::Built(rows) => std::borrow::Cow::Borrowed(rows),
        Rows::InPlace(_) => {
            std::borrow::Cow::Owned(batch.batch.view().map_err(invalid)?.to_batch())
        }
    };
    Ok((batch, rows))
}

impl Format<TrainBatch> for TrainBatchFormat {
    fn layout(
        &self,
        records: &[(TrainBatch, Option<EventTime>)],
    ) -> Result<BatchLayout, ColumnarError> {
        let (batch, rows) = built(records)?;
        let metadata = metadata([
            (SEQ_KEY, batch.seq),
            (FIRST_ROW_KEY, batch.first_row),
            (INGEST_KEY, batch.ingest_ns),
        ]);
        Ok(BatchLayout::with_metadata(
            rows.rows(),
            &rows.column_specs(),
            metadata,
        )?)
    }

    fn fill(
        &self,
        records: &[(TrainBatch, Option<EventTime>)],
        writer: &mut BatchWriter<'_>,
    ) -> Result<(), ColumnarError> {
        let (_, rows) = built(records)?;
        let mut columns = writer.columns().into_iter();
        rows.write_columns(&mut columns).map_err(invalid)
    }

    fn read(
        &self,
        batch: &RecordBatch,
        push: &mut dyn FnMut(TrainBatch, Option<EventTime>) -> Result<(), StageError>,
    ) -> Result<usize, StageError> {
        FeatureBatchRef::from_record_batch(batch).map_err(refused)?;
        let micro = TrainBatch {
            seq: number(batch, SEQ_KEY)?,
            first_row: number(batch, FIRST_ROW_KEY)?,
            ingest_ns: number(batch, INGEST_KEY)?,
            batch: Rows::InPlace(batch.clone()),
        };
        push(micro, None)?;
        // The worker reads the columns where they lie: nothing copied.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid::store::arrow_buffer::Buffer;
    use braid::store::batch::read_record_batch;

    /// Lays `batch` out with the format, writes it into an owned buffer
    /// and reads it back as the receiving end of a channel would.
    fn through_arrow(batch: &TrainBatch) -> Result<Vec<TrainBatch>, String> {
        let records = [(batch.clone(), None)];
        let layout = TrainBatchFormat
            .layout(&records)
            .map_err(|e| e.to_string())?;
        let mut words = vec![0u64; layout.total_len().div_ceil(8)];
        let mut writer = BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words))
            .map_err(|e| e.to_string())?;
        TrainBatchFormat
            .fill(&records, &mut writer)
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        let arrow = read_record_batch(Buffer::from_vec(words)).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let copied = TrainBatchFormat
            .read(&arrow, &mut |b, _| {
                out.push(b);
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        assert_eq!(copied, 0);
        Ok(out)
    }

    fn micro(rows: usize, values: bool) -> TrainBatch {
        let mut batch = FeatureBatch::new();
        for r in 0..rows {
            let ids: Vec<u64> = (0..r % 4 + 1).map(|j| (r * 10 + j) as u64).collect();
            let xs: Vec<f32> = ids.iter().map(|&i| i as f32 / 2.0).collect();
            batch
                .push_row((r % 2) as f32, &ids, values.then_some(&xs[..]))
                .unwrap();
        }
        batch.set_positions(1000);
        TrainBatch {
            seq: 7,
            first_row: 1000,
            ingest_ns: 123_456_789,
            batch: batch.into(),
        }
    }

    #[test]
    fn a_micro_batch_crosses_as_arrow_and_is_read_in_place() {
        for (rows, values) in [(5, false), (3, true), (0, false)] {
            let sent = micro(rows, values);
            let got = through_arrow(&sent).unwrap();
            let [back] = &got[..] else {
                panic!("one micro-batch, got {}", got.len());
            };
            assert!(matches!(back.batch, Rows::InPlace(_)));
            assert_eq!(
                (back.seq, back.first_row, back.ingest_ns),
                (sent.seq, sent.first_row, sent.ingest_ns)
            );
            let (a, b) = (sent.batch.view().unwrap(), back.batch.view().unwrap());
            assert_eq!(a.labels(), b.labels());
            assert_eq!(a.offsets(), b.offsets());
            assert_eq!(a.ids(), b.ids());
            assert_eq!(a.values(), b.values());
            assert_eq!(a.positions(), b.positions());
            // And it serializes as the built batch does.
            assert_eq!(
                braid::store::codec::encode(back).unwrap(),
                braid::store::codec::encode(&sent).unwrap()
            );
        }
    }

    #[test]
    fn a_channel_batch_of_two_micro_batches_is_refused() {
        let two = [(micro(2, false), None), (micro(1, false), None)];
        assert!(matches!(
            TrainBatchFormat.layout(&two),
            Err(ColumnarError::Invalid(_))
        ));
    }

    #[test]
    fn a_batch_without_the_micro_batch_metadata_is_refused() {
        let arrow = match micro(2, false).batch {
            Rows::Built(b) => b.to_record_batch().unwrap(),
            Rows::InPlace(b) => b,
        };
        let read = TrainBatchFormat.read(&arrow, &mut |_, _| Ok(()));
        assert!(read.is_err());
    }
}
