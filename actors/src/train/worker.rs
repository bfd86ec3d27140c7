//! Training workers as stream operators: each takes a micro-batch of rows,
//! pulls the weights the batch needs from the parameter-server shards,
//! predicts every row before training on it (progressive validation),
//! computes the gradients and pushes them to the shards. What a row's
//! prediction and gradient are is the worker's [`Model`]'s to say.
//!
//! A job with one worker chains it to the shards ([`TrainWorker::chained`],
//! as Flink chains operators): the shards live in the worker's subtask and
//! pulls and pushes become calls on their tables. With no other worker to
//! be stale against, it trains row by row in place (each row pulls the
//! weights the earlier rows of its batch pushed), probing each key once,
//! as [`Learner::learn`](super::model::Learner::learn) does. Under a minimum-count key
//! policy it pulls and pushes per micro-batch, as unchained workers do.
//! Either way the step's bookkeeping, its serving delta and the checkpoint
//! cut are those of a push: the worker and its shards take the barrier
//! together, so a checkpoint holds exactly the records before it.

use super::messages::{Delta, Push, Scored, TrainBatch};
use super::model::{LogisticRegression, Model};
use super::optimizer::BIAS_KEY;
use super::ps::{KeyPolicy, PsConfig};
use super::pull::{PsClient, Pulled};
use super::shard::{split_parts, FinalModels, ShardOperator};
use super::table::SlotRef;
use crate::stream::operator::{
    decode_state, write_part, Collector, EventTime, Operator, OperatorError, Snapshot, StateError,
};
use braid::store::codec;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The task the training workers run as in [`super::pipeline::build`]'s graph.
pub const WORKER_TASK: &str = "worker";

/// What a worker emits: gradients for a shard, or its predictions; a
/// chained worker emits its shards' serving deltas instead of pushes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerOut {
    /// Gradients for one shard.
    Push(Push),
    /// Predictions for one batch.
    Scored(Scored),
    /// A chained shard's serving delta.
    Delta(Delta),
}

impl WorkerOut {
    /// The push, if this is one.
    pub fn push(self) -> Option<Push> {
        match self {
            WorkerOut::Push(p) => Some(p),
            _ => None,
        }
    }

    /// The serving delta, if this is one.
    pub fn delta(self) -> Option<Delta> {
        match self {
            WorkerOut::Delta(d) => Some(d),
            _ => None,
        }
    }

    /// The predictions, if these are.
    pub fn scored(self) -> Option<Scored> {
        match self {
            WorkerOut::Scored(s) => Some(s),
            _ => None,
        }
    }
}

/// One training worker of model `M`.
pub struct TrainWorker<M: Model = LogisticRegression> {
    config: PsConfig,
    model: M,
    index: usize,
    crash: Option<u64>,
    client: PsClient<M>,
    /// The shards, when chained to this worker.
    chained: Vec<ShardOperator<M>>,
    /// Per shard, where the pulled keys live (chained only).
    slots: Vec<Vec<Option<SlotRef>>>,
    step: u64,
    keys: Vec<Vec<u64>>,
    values: Vec<Vec<f32>>,
    weights: Vec<Pulled>,
    at: Vec<(u32, u32)>,
    rows: Vec<M::Row>,
}

impl TrainWorker {
    /// Worker `index` of `config`, training logistic regression with
    /// `config.optimizer` (checked by the shards).
    pub fn new(config: PsConfig, index: usize) -> Self {
        let model = LogisticRegression::unchecked(config.optimizer);
        Self::with_model(config, index, model)
    }

    /// The only worker of `config`, training logistic regression with
    /// `config.optimizer`, with every shard chained to it (each leaving
    /// its final model in `finals`).
    pub fn chained(config: PsConfig, finals: Arc<FinalModels>) -> Result<Self, StateError> {
        let model = LogisticRegression::new(config.optimizer)
            .map_err(|e| StateError::Decode(e.to_string()))?;
        Self::chained_with(config, model, finals)
    }
}

impl<M: Model> TrainWorker<M> {
    /// Worker `index` of `config`, training `model`.
    pub fn with_model(config: PsConfig, index: usize, model: M) -> Self {
        let shards = config.shards;
        let crash = match config.crash {
            Some(super::ps::Crash::Worker(w, step)) if w == index => Some(step),
            _ => None,
        };
        Self {
            config: config.clone(),
            client: PsClient::new(config, model.clone()),
            model,
            index,
            crash,
            chained: Vec::new(),
            slots: vec![Vec::new(); shards],
            step: 0,
            keys: vec![Vec::new(); shards],
            values: vec![Vec::new(); shards],
            weights: vec![Pulled::default(); shards],
            at: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// The only worker of `config`, training `model`, with every shard
    /// chained to it (each leaving its final model in `finals`).
    pub fn chained_with(
        config: PsConfig,
        model: M,
        finals: Arc<FinalModels<M>>,
    ) -> Result<Self, StateError> {
        if config.workers != 1 {
            return Err(StateError::Decode(format!(
                "only a job's single worker chains its shards; this job has {} workers",
                config.workers
            )));
        }
        let mut worker = Self::with_model(config.clone(), 0, model.clone());
        worker.chained = (0..config.shards)
            .map(|s| {
                Ok(ShardOperator::with_model(config.clone(), s, model.clone())?
                    .reporting_to(finals.clone()))
            })
            .collect::<Result<_, StateError>>()?;
        Ok(worker)
    }

    /// True when the shards are chained to this worker.
    pub fn is_chained(&self) -> bool {
        !self.chained.is_empty()
    }

    /// Steps (batches) trained.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Sends the batch's predictions (made before training on it) on.
    fn emit_scored(
        &self,
        batch: &TrainBatch,
        labels: &[f32],
        predictions: Vec<f32>,
        staleness: u64,
        out: &mut dyn Collector<WorkerOut>,
    ) {
        out.emit(
            WorkerOut::Scored(Scored {
                seq: batch.seq,
                first_row: batch.first_row,
                ingest_ns: batch.ingest_ns,
                labels: labels.to_vec().into(),
                predictions: predictions.into(),
                worker: self.index as u32,
                staleness,
            }),
            None,
        );
    }

    fn train(
        &mut self,
        batch: &TrainBatch,
        out: &mut dyn Collector<WorkerOut>,
    ) -> Result<(), OperatorError> {
        if self.crash.is_some_and(|s| self.step >= s) && super::ps::first_crash(&self.config) {
            panic!(
                "worker {} crashed at step {} (injected)",
                self.index, self.step
            );
        }
        let rows = batch
            .batch
            .view()
            .map_err(|e| OperatorError::Failed(format!("training batch {}: {e}", batch.seq)))?;
        if self.is_chained() && !matches!(self.config.policy, KeyPolicy::MinCount(m) if m > 1) {
            let mut predictions = Vec::with_capacity(rows.rows());
            let client = &self.client;
            ShardOperator::train_chained(
                &mut self.chained,
                &|k| client.shard_of(k),
                self.index,
                self.step,
                batch,
                rows,
                &mut predictions,
                &mut DeltaOut(out),
            )?;
            self.emit_scored(batch, rows.labels(), predictions, 0, out);
            self.step += 1;
            return Ok(());
        }
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
        let mut pulls = Vec::with_capacity(shards);
        for (s, ((keys, slots), out)) in self
            .keys
            .iter()
            .zip(self.slots.iter_mut())
            .zip(self.weights.iter_mut())
            .enumerate()
        {
            match self.chained.get(s) {
                Some(shard) => shard.pull_chained(keys, slots, out.owned()),
                None => pulls.push((s, keys.as_slice(), out)),
            }
        }
        if !pulls.is_empty() {
            let pulled = self.client.pull_many(self.index, self.step, pulls);
            match pulled {
                Ok(stats) => {
                    staleness = stats.iter().map(|s| s.staleness).max().unwrap_or(0);
                }
                Err(e) => {
                    return Err(OperatorError::Failed(format!(
                        "training worker {}: {e}",
                        self.index
                    )))
                }
            }
        }
        let (model, w) = (&self.model, M::WIDTH);
        let params = |s: u32, i: u32| {
            let at = i as usize * w;
            &self.weights[s as usize][at..at + w]
        };
        self.rows.clear();
        let mut at = 0;
        let mut predictions = Vec::with_capacity(rows.rows());
        for (_, ids, _) in rows.iter() {
            let n = ids.len() + 1;
            let mut row = M::Row::default();
            for &(s, i) in &self.at[at..at + n] {
                model.add(&mut row, params(s, i), self.values[s as usize][i as usize]);
            }
            at += n;
            predictions.push(model.predict(&row));
            self.rows.push(row);
        }
        let mut grads: Vec<Vec<f32>> = (0..shards)
            .map(|s| Vec::with_capacity(self.keys[s].len() * w))
            .collect();
        let mut at = 0;
        for (((y, ids, _), &p), row) in rows.iter().zip(predictions.iter()).zip(&self.rows) {
            let n = ids.len() + 1;
            let d = model.margin_gradient(p, y);
            for &(s, i) in &self.at[at..at + n] {
                let x = self.values[s as usize][i as usize];
                let g = model.gradient(row, d, params(s, i), x);
                grads[s as usize].extend_from_slice(g.as_ref());
            }
            at += n;
        }
        for (s, grads) in grads.into_iter().enumerate() {
            let push = Push {
                shard: s as u32,
                worker: self.index as u32,
                step: self.step,
                keys: std::mem::take(&mut self.keys[s]).into(),
                grads: grads.into(),
                rows: rows.rows() as u64,
                seq: batch.seq,
                ingest_ns: batch.ingest_ns,
                done: false,
            };
            match self.chained.get_mut(s) {
                Some(shard) => shard.push_chained(push, &self.slots[s], &mut DeltaOut(out))?,
                None => out.emit(WorkerOut::Push(push), None),
            }
        }
        self.emit_scored(batch, rows.labels(), predictions, staleness, out);
        self.step += 1;
        Ok(())
    }
}

impl<M: Model> Operator for TrainWorker<M> {
    type In = TrainBatch;
    type Out = WorkerOut;

    fn process(
        &mut self,
        batch: TrainBatch,
        _time: Option<EventTime>,
        out: &mut dyn Collector<WorkerOut>,
    ) -> Result<(), OperatorError> {
        self.train(&batch, out)
    }

    fn on_end(&mut self, out: &mut dyn Collector<WorkerOut>) -> Result<(), OperatorError> {
        if self.is_chained() {
            for shard in &mut self.chained {
                shard.on_end(&mut DeltaOut(out))?;
            }
            return Ok(());
        }
        for s in 0..self.client.shards() {
            out.emit(
                WorkerOut::Push(Push {
                    shard: s as u32,
                    worker: self.index as u32,
                    step: self.step,
                    keys: Vec::new().into(),
                    grads: Vec::new().into(),
                    rows: 0,
                    seq: 0,
                    ingest_ns: 0,
                    done: true,
                }),
                None,
            );
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        if !self.is_chained() {
            return Ok(Snapshot::of(self.step));
        }
        let step = self.step;
        let shards: Vec<Snapshot> = self.chained.iter_mut().map(|s| s.freeze()).collect();
        Ok(Snapshot::writer(move |out| {
            write_part(out, |o| {
                codec::encode_append(&step, o)
                    .map(drop)
                    .map_err(|e| StateError::Encode(e.to_string()))
            })?;
            for shard in shards {
                write_part(out, |o| shard.encode_into(o))?;
            }
            Ok(())
        }))
    }

    fn barrier_passed(&mut self, epoch: u64) {
        for shard in &mut self.chained {
            shard.barrier_passed(epoch);
        }
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        Ok(self.restore_state(bytes)?)
    }
}

impl<M: Model> TrainWorker<M> {
    /// Restores the state a snapshot saved.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if !self.is_chained() {
            self.step = decode_state(bytes)?;
            return Ok(());
        }
        let parts = split_parts(bytes)?;
        let Some((step, shards)) = parts.split_first() else {
            return Err(StateError::Decode(
                "an empty chained-worker snapshot".into(),
            ));
        };
        if shards.len() != self.chained.len() {
            return Err(StateError::Decode(format!(
                "the snapshot has {} shards, the job {}",
                shards.len(),
                self.chained.len()
            )));
        }
        let step: u64 = decode_state(step)?;
        for (shard, bytes) in self.chained.iter_mut().zip(shards) {
            shard.restore_state(bytes)?;
        }
        self.step = step;
        Ok(())
    }
}

/// Sends a chained shard's deltas on as the worker's output.
struct DeltaOut<'a>(&'a mut dyn Collector<WorkerOut>);

impl Collector<Delta> for DeltaOut<'_> {
    fn emit(&mut self, delta: Delta, time: Option<EventTime>) {
        self.0.emit(WorkerOut::Delta(delta), time);
    }
}
