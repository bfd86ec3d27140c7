//! Training workers as stream operators: each takes a micro-batch of rows,
//! pulls the weights the batch needs from the parameter-server shards,
//! predicts every row before training on it (progressive validation),
//! computes the logistic-loss gradients and pushes them to the shards.

use super::optimizer::{sigmoid, BIAS_KEY};
use super::ps::{PsClient, PsConfig, Push, TrainBatch};
use crate::stream::operator::{decode_state, Collector, EventTime, Operator, Snapshot, StateError};
use serde::{Deserialize, Serialize};

/// Predictions a worker made for one batch, before training on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// The batch's stream index.
    pub seq: u64,
    /// The stream position of its first row.
    pub first_row: u64,
    /// When its first row was read.
    pub ingest_ns: u64,
    /// The rows' labels.
    pub labels: Vec<f32>,
    /// The click probability predicted for each row.
    pub predictions: Vec<f32>,
    /// The worker.
    pub worker: u32,
    /// The largest staleness (steps of other workers not visible) of the
    /// batch's pulls.
    pub staleness: u64,
}

/// What a worker emits: gradients for a shard, or its predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerOut {
    /// Gradients for one shard.
    Push(Push),
    /// Predictions for one batch.
    Scored(Scored),
}

impl WorkerOut {
    /// The push, if this is one.
    pub fn push(self) -> Option<Push> {
        match self {
            WorkerOut::Push(p) => Some(p),
            WorkerOut::Scored(_) => None,
        }
    }

    /// The predictions, if these are.
    pub fn scored(self) -> Option<Scored> {
        match self {
            WorkerOut::Scored(s) => Some(s),
            WorkerOut::Push(_) => None,
        }
    }
}

/// One training worker.
pub struct TrainWorker {
    config: PsConfig,
    index: usize,
    crash: Option<u64>,
    client: PsClient,
    step: u64,
    keys: Vec<Vec<u64>>,
    values: Vec<Vec<f32>>,
    weights: Vec<Vec<f32>>,
    at: Vec<(u32, u32)>,
    margins: Vec<f32>,
}

impl TrainWorker {
    /// Worker `index` of `config`.
    pub fn new(config: PsConfig, index: usize) -> Self {
        let shards = config.shards;
        let crash = match config.crash {
            Some(super::ps::Crash::Worker(w, step)) if w == index => Some(step),
            _ => None,
        };
        Self {
            config: config.clone(),
            index,
            crash,
            client: PsClient::new(config),
            step: 0,
            keys: vec![Vec::new(); shards],
            values: vec![Vec::new(); shards],
            weights: vec![Vec::new(); shards],
            at: Vec::new(),
            margins: Vec::new(),
        }
    }

    /// Steps (batches) trained.
    pub fn step(&self) -> u64 {
        self.step
    }

    fn train(&mut self, batch: &TrainBatch, out: &mut dyn Collector<WorkerOut>) {
        if self.crash.is_some_and(|s| self.step >= s) && super::ps::first_crash(&self.config) {
            panic!(
                "worker {} crashed at step {} (injected)",
                self.index, self.step
            );
        }
        let rows = batch.batch.view();
        let shards = self.client.shards();
        for s in 0..shards {
            self.keys[s].clear();
            self.values[s].clear();
        }
        self.at.clear();
        for (_, ids, values) in rows.iter() {
            for (i, &id) in ids.iter().enumerate() {
                let x = values.map_or(1.0, |v| v[i]);
                let s = self.client.shard_of(id);
                self.at.push((s as u32, self.keys[s].len() as u32));
                self.keys[s].push(id);
                self.values[s].push(x);
            }
            let s = self.client.shard_of(BIAS_KEY);
            self.at.push((s as u32, self.keys[s].len() as u32));
            self.keys[s].push(BIAS_KEY);
            self.values[s].push(1.0);
        }
        let mut staleness = 0;
        for s in 0..shards {
            let pulled = self.client.pull(
                s,
                self.index,
                self.step,
                &self.keys[s],
                &mut self.weights[s],
            );
            match pulled {
                Ok(stats) => staleness = staleness.max(stats.staleness),
                Err(e) => panic!("training worker {}: {e}", self.index),
            }
        }
        self.margins.clear();
        let mut at = 0;
        let mut predictions = Vec::with_capacity(rows.rows());
        for (_, ids, _) in rows.iter() {
            let n = ids.len() + 1;
            let mut m = 0.0f32;
            for &(s, i) in &self.at[at..at + n] {
                m += self.weights[s as usize][i as usize] * self.values[s as usize][i as usize];
            }
            at += n;
            predictions.push(sigmoid(m));
        }
        let mut grads: Vec<Vec<f32>> = (0..shards)
            .map(|s| Vec::with_capacity(self.keys[s].len()))
            .collect();
        let mut at = 0;
        for ((y, ids, _), &p) in rows.iter().zip(predictions.iter()) {
            let n = ids.len() + 1;
            let d = p - y;
            for &(s, i) in &self.at[at..at + n] {
                grads[s as usize].push(d * self.values[s as usize][i as usize]);
            }
            at += n;
        }
        for (s, grads) in grads.into_iter().enumerate() {
            out.emit(
                WorkerOut::Push(Push {
                    shard: s as u32,
                    worker: self.index as u32,
                    step: self.step,
                    keys: std::mem::take(&mut self.keys[s]),
                    grads,
                    rows: rows.rows() as u64,
                    seq: batch.seq,
                    ingest_ns: batch.ingest_ns,
                    done: false,
                }),
                None,
            );
        }
        out.emit(
            WorkerOut::Scored(Scored {
                seq: batch.seq,
                first_row: batch.first_row,
                ingest_ns: batch.ingest_ns,
                labels: rows.labels().to_vec(),
                predictions,
                worker: self.index as u32,
                staleness,
            }),
            None,
        );
        self.step += 1;
    }
}

impl Operator for TrainWorker {
    type In = TrainBatch;
    type Out = WorkerOut;

    fn process(
        &mut self,
        batch: TrainBatch,
        _time: Option<EventTime>,
        out: &mut dyn Collector<WorkerOut>,
    ) {
        self.train(&batch, out);
    }

    fn on_end(&mut self, out: &mut dyn Collector<WorkerOut>) {
        for s in 0..self.client.shards() {
            out.emit(
                WorkerOut::Push(Push {
                    shard: s as u32,
                    worker: self.index as u32,
                    step: self.step,
                    keys: Vec::new(),
                    grads: Vec::new(),
                    rows: 0,
                    seq: 0,
                    ingest_ns: 0,
                    done: true,
                }),
                None,
            );
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        Snapshot::of(self.step)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if !bytes.is_empty() {
            self.step = decode_state(bytes)?;
        }
        Ok(())
    }
}
