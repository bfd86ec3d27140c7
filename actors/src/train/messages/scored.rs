//! A worker's predictions for one batch, [`Scored`], and their Arrow form.
//!
//! Between the workers and the evaluation in another process, a channel
//! batch of scored batches travels as one Arrow record batch in the store
//! ([`ScoredFormat`]): `label: Float32` and `prediction: Float32`, one row
//! per predicted row, the scored batches one after another; each one's
//! header (batch index, first row, ingest time, worker, staleness, rows)
//! in the schema metadata. The evaluation reads each scored batch's slice
//! of the columns where it lies.

use super::columns::{invalid, refused};
use crate::stream::channel::Format;
use crate::stream::columnar::ColumnarError;
use crate::stream::failure::StageError;
use crate::stream::operator::EventTime;
use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, RecordBatch};
use braid::store::arrow_buffer::ScalarBuffer;
use braid::store::batch::{BatchLayout, BatchWriter, ColumnSpec, Primitive, ValuesMut};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Predictions a worker made for one batch, before training on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The batch's stream index.
    pub seq: u64,
    /// The stream position of its first row.
    pub first_row: u64,
    /// When its first row was read.
    pub ingest_ns: u64,
    /// The rows' labels.
    pub labels: ScalarBuffer<f32>,
    /// The click probability predicted for each row.
    pub predictions: ScalarBuffer<f32>,
    /// The worker.
    pub worker: u32,
    /// The largest staleness (steps of other workers not visible) of the
    /// batch's pulls.
    pub staleness: u64,
}

#[derive(Serialize)]
struct ScoredOut<'a> {
    seq: u64,
    first_row: u64,
    ingest_ns: u64,
    labels: &'a [f32],
    predictions: &'a [f32],
    worker: u32,
    staleness: u64,
}

#[derive(Deserialize)]
struct ScoredIn {
    seq: u64,
    first_row: u64,
    ingest_ns: u64,
    labels: Vec<f32>,
    predictions: Vec<f32>,
    worker: u32,
    staleness: u64,
}

impl Serialize for Scored {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ScoredOut {
            seq: self.seq,
            first_row: self.first_row,
            ingest_ns: self.ingest_ns,
            labels: &self.labels,
            predictions: &self.predictions,
            worker: self.worker,
            staleness: self.staleness,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Scored {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = ScoredIn::deserialize(deserializer)?;
        Ok(Scored {
            seq: s.seq,
            first_row: s.first_row,
            ingest_ns: s.ingest_ns,
            labels: s.labels.into(),
            predictions: s.predictions.into(),
            worker: s.worker,
            staleness: s.staleness,
        })
    }
}

/// Lays a channel's scored batches out as one Arrow record batch in the
/// store (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct ScoredFormat;

const LABEL_COLUMN: &str = "label";
const PREDICTION_COLUMN: &str = "prediction";
/// The scored batches' headers, `seq:first_row:ingest_ns:worker:staleness:rows`
/// joined by `,`.
const HEADERS_KEY: &str = "braid.scored.headers";

fn header(s: &Scored) -> String {
    format!(
        "{}:{}:{}:{}:{}:{}",
        s.seq,
        s.first_row,
        s.ingest_ns,
        s.worker,
        s.staleness,
        s.labels.len()
    )
}

fn parse_header(text: &str) -> Option<[u64; 6]> {
    let mut out = [0u64; 6];
    let mut parts = text.split(':');
    for v in out.iter_mut() {
        *v = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

impl Format<Scored> for ScoredFormat {
    fn layout(
        &self,
        records: &[(Scored, Option<EventTime>)],
    ) -> Result<BatchLayout, ColumnarError> {
        let mut rows = 0;
        let mut headers = Vec::with_capacity(records.len());
        for (s, _) in records {
            if s.labels.len() != s.predictions.len() {
                return Err(invalid(format!(
                    "a scored batch of {} labels and {} predictions",
                    s.labels.len(),
                    s.predictions.len()
                )));
            }
            rows += s.labels.len();
            headers.push(header(s));
        }
        let metadata = HashMap::from([(HEADERS_KEY.to_string(), headers.join(","))]);
        Ok(BatchLayout::with_metadata(
            rows,
            &[
                ColumnSpec::primitive(LABEL_COLUMN, Primitive::Float32),
                ColumnSpec::primitive(PREDICTION_COLUMN, Primitive::Float32),
            ],
            metadata,
        )?)
    }

    fn fill(
        &self,
        records: &[(Scored, Option<EventTime>)],
        writer: &mut BatchWriter<'_>,
    ) -> Result<(), ColumnarError> {
        let mut columns = writer.columns().into_iter();
        let (Some(l), Some(p)) = (columns.next(), columns.next()) else {
            return Err(ColumnarError::MissingColumn);
        };
        let (ValuesMut::Float32(labels), ValuesMut::Float32(predictions)) = (l.values, p.values)
        else {
            return Err(invalid("the layout is not a scored one"));
        };
        let mut at = 0;
        for (s, _) in records {
            let n = s.labels.len();
            let (Some(l), Some(p)) = (labels.get_mut(at..at + n), predictions.get_mut(at..at + n))
            else {
                return Err(invalid("scored batches overflow their layout"));
            };
            l.copy_from_slice(&s.labels);
            p.copy_from_slice(&s.predictions);
            at += n;
        }
        Ok(())
    }

    fn read(
        &self,
        batch: &RecordBatch,
        push: &mut dyn FnMut(Scored, Option<EventTime>) -> Result<(), StageError>,
    ) -> Result<usize, StageError> {
        let column = |name: &str| -> Result<ScalarBuffer<f32>, StageError> {
            Ok(batch
                .column_by_name(name)
                .filter(|c| c.null_count() == 0)
                .ok_or_else(|| refused(format!("a batch without a {name} column")))?
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| refused(format!("{name} is not Float32")))?
                .values()
                .clone())
        };
        let (labels, predictions) = (column(LABEL_COLUMN)?, column(PREDICTION_COLUMN)?);
        let headers = batch
            .schema_ref()
            .metadata()
            .get(HEADERS_KEY)
            .ok_or_else(|| refused("a batch without its scored headers"))?;
        let mut at = 0usize;
        for text in headers.split(',').filter(|t| !t.is_empty()) {
            let [seq, first_row, ingest_ns, worker, staleness, rows] =
                parse_header(text).ok_or_else(|| refused(format!("a bad header {text:?}")))?;
            let rows = usize::try_from(rows).map_err(|e| refused(e.to_string()))?;
            let end = at
                .checked_add(rows)
                .filter(|end| *end <= labels.len())
                .ok_or_else(|| refused("headers past the end of the columns"))?;
            let worker = u32::try_from(worker).map_err(|e| refused(e.to_string()))?;
            push(
                Scored {
                    seq,
                    first_row,
                    ingest_ns,
                    labels: labels.slice(at, rows),
                    predictions: predictions.slice(at, rows),
                    worker,
                    staleness,
                },
                None,
            )?;
            at = end;
        }
        if at != labels.len() {
            return Err(refused("rows the headers do not cover"));
        }
        // The evaluation reads each slice where it lies: nothing copied.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid::store::arrow_buffer::Buffer;
    use braid::store::batch::read_record_batch;

    fn sample(seq: u64, n: usize) -> Scored {
        Scored {
            seq,
            first_row: seq * 100,
            ingest_ns: 1 << 40,
            labels: (0..n).map(|i| (i % 2) as f32).collect::<Vec<_>>().into(),
            predictions: (0..n).map(|i| i as f32 / 10.0).collect::<Vec<_>>().into(),
            worker: 1,
            staleness: 2,
        }
    }

    #[test]
    fn scored_batches_cross_as_one_arrow_batch_read_in_place() {
        let sent: Vec<Scored> = vec![sample(3, 5), sample(4, 0), sample(5, 7)];
        let records: Vec<(Scored, Option<EventTime>)> =
            sent.iter().cloned().map(|s| (s, None)).collect();
        let layout = ScoredFormat.layout(&records).expect("laid out");
        let mut words = vec![0u64; layout.total_len().div_ceil(8)];
        let mut writer =
            BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).expect("fits");
        ScoredFormat.fill(&records, &mut writer).expect("filled");
        writer.finish().expect("checked");
        let buffer = Buffer::from_vec(words);
        let span = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        let arrow = read_record_batch(buffer).expect("read");
        let mut got = Vec::new();
        let copied = ScoredFormat
            .read(&arrow, &mut |s, _| {
                got.push(s);
                Ok(())
            })
            .expect("scored batches");
        assert_eq!(copied, 0);
        assert_eq!(got, sent);
        assert!(
            span.contains(&(got[2].predictions.as_ptr() as usize)),
            "predictions were copied"
        );
    }

    #[test]
    fn mismatched_or_uncovered_batches_are_refused() {
        let mut odd = sample(1, 3);
        odd.predictions = vec![0.5f32].into();
        assert!(ScoredFormat.layout(&[(odd, None)]).is_err());
        let round = braid::store::codec::encode(&sample(2, 4)).expect("encoded");
        let back: Scored = braid::store::codec::decode(&round).expect("decoded");
        assert_eq!(back, sample(2, 4));
    }
}
