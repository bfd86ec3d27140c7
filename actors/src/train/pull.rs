//! A worker's pulls: [`PsClient`], a worker's handle on every shard, reads
//! a shard in its own process in place; one in another process on the same
//! node, in place too, through the shard's page ([`super::shard_page`]:
//! the table in shared memory and the clock that says when a step may read
//! it); and one on another node through a call on the shard's host,
//! answered by the shard's [`serve`]d pull service, which also tells
//! workers where its page is.
//!
//! For a call, the worker builds the keys as an Arrow column in its node's store, lent
//! to the shard's process as it is sealed, and calls the shard's host with
//! the lend ticket and where it sits on the store itself. The shard reads
//! the keys in place and writes the weights straight into a store object
//! lent back to the worker ([`ShardCell::pull_into`]), and the worker
//! reads them in place ([`Pulled`]). Only the call's small header
//! is encoded. When the two processes use different stores (other nodes),
//! keys and weights travel in the call instead. Pulls count on the
//! worker's channel to the shard (the push edge): each pull sends two
//! batches, its keys and its weights, and counts the bytes that went
//! through serde when they travel in the call.

use super::model::{LogisticRegression, Model};
use super::model::{Rule, RuleJob};
use super::ps::{PsConfig, PullError, PullStats};
use super::shard::{ShardCell, ShardOperator, SHARD_TASK};
use super::shard_page::{PageAddr, PageReader};
use super::sharding::ConsistentHash;
use super::table::SlotsView;
use crate::stream::context::TaskContext;
use crate::stream::registry;
use crate::stream::service::{self, CallError, PeerCall, Peers, Service};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::RecordBatch;
use braid::store::arrow_buffer::ScalarBuffer;
use braid::store::batch::{BatchLayout, ColumnSpec, Primitive, ValuesMut};
use braid::store::codec;
use braid::store::StoreSeat;
use braid::{Batch, Lent, Runtime};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How a worker reaches a shard.
enum ShardLink<M: Model> {
    /// In this process: read in place.
    Local(Arc<ShardCell<M>>),
    /// In another process on this node: read in place through its page.
    Mapped(PageReader<M::State>),
    /// In another process (cluster runner): a call on its host, named.
    Remote(String),
}

/// A worker's handle on every shard of the current attempt, which train
/// model `M`.
pub struct PsClient<M: Model = LogisticRegression> {
    config: PsConfig,
    model: M,
    ring: ConsistentHash,
    shards: Vec<ShardLink<M>>,
    generation: u64,
    /// The attempt's other subtasks, on the cluster runner.
    peers: Option<Arc<dyn Peers>>,
}

impl<M: Model> PsClient<M> {
    /// A client for the current attempt's shards (resolved on first use),
    /// which train `model`.
    pub fn new(config: PsConfig, model: M) -> Self {
        Self {
            ring: config.ring(),
            config,
            model,
            shards: Vec::new(),
            generation: TaskContext::current().generation,
            peers: service::peers(),
        }
    }

    /// The shard of `key`.
    #[inline]
    pub fn shard_of(&self, key: u64) -> usize {
        if self.config.shards == 1 {
            return 0;
        }
        self.ring.shard_of(key).unwrap_or(0) as usize
    }

    /// Shards.
    pub fn shards(&self) -> usize {
        self.config.shards
    }

    fn resolve(&mut self) -> Result<(), PullError> {
        if self.shards.len() == self.config.shards {
            return Ok(());
        }
        self.shards.clear();
        for s in 0..self.config.shards {
            let name = self.config.shard_name(self.generation, s);
            // On the cluster runner a shard may run in another process;
            // in one process every shard registers here.
            let link = match (&self.peers, registry::get::<ShardCell<M>>(&name)) {
                (_, Ok(cell)) => ShardLink::Local(cell),
                (Some(peers), Err(_)) => match map_page(peers.as_ref(), s, &name) {
                    Ok(reader) => ShardLink::Mapped(reader),
                    Err(why) => {
                        tracing::debug!("shard {s}: pulls are calls ({why})");
                        ShardLink::Remote(name)
                    }
                },
                (None, Err(_)) => ShardLink::Local(
                    registry::wait_for::<ShardCell<M>>(&name, self.config.pull_timeout)
                        .map_err(|e| PullError::Unreachable(s, e.to_string()))?,
                ),
            };
            self.shards.push(link);
        }
        Ok(())
    }

    /// Reads the weights of `keys` (all of shard `shard`) for `worker`'s
    /// step `step` into `out` (see [`PsClient::pull_many`]).
    pub fn pull(
        &mut self,
        shard: usize,
        worker: usize,
        step: u64,
        keys: &[u64],
        out: &mut Pulled,
    ) -> Result<PullStats, PullError> {
        let mut stats = self.pull_many(worker, step, vec![(shard, keys, out)])?;
        stats
            .pop()
            .ok_or_else(|| PullError::Unreachable(shard, "no answer".into()))
    }

    /// Reads, for `worker`'s step `step`, each `(shard, keys, out)`'s
    /// weights into its `out`: in place from shards in this process, and
    /// through calls on their hosts for the others, all made at once so
    /// their round trips overlap (see the module docs). The stats of each, in
    /// order; the first failure fails all.
    pub fn pull_many(
        &mut self,
        worker: usize,
        step: u64,
        pulls: Vec<(usize, &[u64], &mut Pulled)>,
    ) -> Result<Vec<PullStats>, PullError> {
        self.resolve()?;
        let mut stats = vec![PullStats::default(); pulls.len()];
        let mut calls = Vec::new();
        for (i, (shard, keys, out)) in pulls.into_iter().enumerate() {
            let link = self
                .shards
                .get_mut(shard)
                .ok_or_else(|| PullError::Unreachable(shard, "no such shard".into()))?;
            match link {
                ShardLink::Mapped(reader) => {
                    let model = &self.model;
                    let out = out.owned();
                    let staleness = self.config.consistency.staleness();
                    let timeout = self.config.pull_timeout;
                    let (pulled, ()) =
                        reader.read(shard, worker, step, staleness, timeout, |view| {
                            read_view(model, view, keys, out)
                        })?;
                    stats[i] = pulled;
                    if let Some(m) = self.peers.as_ref().and_then(|p| p.meter(SHARD_TASK, shard)) {
                        m.sent(std::mem::size_of_val(&out[..]));
                    }
                }
                ShardLink::Local(cell) => {
                    stats[i] =
                        cell.pull(worker, step, keys, out.owned(), self.config.pull_timeout)?;
                }
                ShardLink::Remote(_) => calls.push((i, shard, keys, out)),
            }
        }
        if calls.is_empty() {
            return Ok(stats);
        }
        let mut remote = Vec::with_capacity(calls.len());
        let mut remote_at = Vec::with_capacity(calls.len());
        for (i, shard, keys, out) in calls {
            if let Some(ShardLink::Remote(name)) = self.shards.get(shard) {
                remote.push(RemotePull {
                    shard,
                    name,
                    keys,
                    out,
                });
                remote_at.push(i);
            }
        }
        let peers = self
            .peers
            .as_ref()
            .ok_or_else(|| PullError::Unreachable(remote[0].shard, "no peers".into()))?;
        for (i, pulled) in remote_at
            .into_iter()
            .zip(many(peers.as_ref(), worker, step, remote))
        {
            stats[i] = pulled?;
        }
        Ok(stats)
    }
}

/// Reads the parameters of `keys` from a shard's mapped table into `out`,
/// [`Model::WIDTH`] floats per key (absent keys read 0), as
/// [`ShardCell::pull`] does under the shard's lock.
fn read_view<M: Model>(model: &M, view: &SlotsView<M::State>, keys: &[u64], out: &mut Vec<f32>) {
    struct Job<'a, M: Model>(&'a SlotsView<M::State>, &'a [u64], &'a mut Vec<f32>);
    impl<M: Model> RuleJob<M> for Job<'_, M> {
        type Output = ();
        fn run<R: Rule<M>>(self, r: R) {
            let Job(view, keys, out) = self;
            for chunk in keys.chunks(PREFETCH_CHUNK) {
                view.prefetch(chunk);
                for &k in chunk {
                    match view.get(k) {
                        Some(s) => out.extend_from_slice(r.params(&s).as_ref()),
                        None => out.extend_from_slice(M::Params::default().as_ref()),
                    }
                }
            }
        }
    }
    out.clear();
    out.reserve(keys.len() * M::WIDTH);
    model.with_rule(Job::<M>(view, keys, out));
}

/// Keys whose home slots a mapped read loads ahead at a time.
const PREFETCH_CHUNK: usize = 64;

/// Asks shard `shard` (service `name`) where its page is, and maps it:
/// only when the shard shares this process's store (the same node, so
/// the same machine).
fn map_page<S: super::table::SlotState>(
    peers: &dyn Peers,
    shard: usize,
    name: &str,
) -> Result<PageReader<S>, String> {
    let rt = braid::current().map_err(|e| e.to_string())?;
    match peers.seat(SHARD_TASK, shard) {
        Some(seat) if seat.same_store(&rt.store_seat()) => {}
        _ => return Err("the shard is on another node".into()),
    }
    let request = codec::encode(&Request::Page).map_err(|e| e.to_string())?;
    let answer = peers
        .call_many(vec![PeerCall {
            task: SHARD_TASK.to_string(),
            subtask: shard,
            service: name.to_string(),
            request,
        }])
        .pop()
        .ok_or("no answer")?
        .map_err(|e| e.to_string())?;
    let addr: Result<PageAddr, String> = codec::decode(&answer).map_err(|e| e.to_string())?;
    PageReader::open(addr?).map_err(|e| e.to_string())
}

/// Offers `shard`'s pulls to workers in other processes (the cluster
/// runner's; in one process they read the shard in place).
pub fn serve<M: Model>(mut shard: ShardOperator<M>) -> ShardOperator<M> {
    let service = PullService::new(shard.cell().clone(), shard.config().pull_timeout);
    shard.offer(Arc::new(service));
    shard
}

/// Parameters a worker pulled, [`Model::WIDTH`] floats per key: read into its own vector (from
/// a shard in its process), or the column of a store object a shard in
/// another process lent it.
#[derive(Debug, Clone, Default)]
pub struct Pulled {
    owned: Vec<f32>,
    in_place: Option<ScalarBuffer<f32>>,
}

impl std::ops::Deref for Pulled {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.in_place {
            Some(weights) => weights,
            None => &self.owned,
        }
    }
}

impl Pulled {
    /// The worker's own vector, to pull into (weights read in place are
    /// let go; the vector's allocation is kept between pulls).
    pub fn owned(&mut self) -> &mut Vec<f32> {
        self.in_place = None;
        &mut self.owned
    }

    /// Weights read in place.
    pub fn in_place(&mut self, weights: ScalarBuffer<f32>) {
        self.in_place = Some(weights);
    }

    /// Whether the weights are read in place.
    pub fn is_in_place(&self) -> bool {
        self.in_place.is_some()
    }
}

#[derive(Serialize, Deserialize)]
enum Keys {
    /// A `key: UInt64` column in the store, lent to the shard's process.
    Lent(Lent<Batch>),
    /// In the call.
    Inline(Vec<u64>),
}

#[derive(Serialize, Deserialize)]
enum Weights {
    /// A `weight: Float32` column in the store, lent to the worker's
    /// process.
    Lent(Lent<Batch>),
    /// In the answer.
    Inline(Vec<f32>),
}

#[derive(Serialize, Deserialize)]
enum Request {
    /// Weights, for a worker on another node.
    Pull(Box<PullRequest>),
    /// Where the shard's page is, for a worker on this node.
    Page,
}

#[derive(Serialize, Deserialize)]
struct PullRequest {
    worker: usize,
    step: u64,
    keys: Keys,
    /// Where the worker sits on its store, to lend it the weights.
    reply_to: Option<StoreSeat>,
}

type Answer = Result<(PullStats, Weights), PullError>;

const KEY_COLUMN: &str = "key";
const WEIGHT_COLUMN: &str = "weight";

/// The one primitive column of a lent batch, in place.
fn column<T: arrow_array::ArrowPrimitiveType>(
    rt: &Runtime,
    lent: &Lent<Batch>,
) -> Result<ScalarBuffer<T::Native>, String> {
    let batch: RecordBatch = match rt.adopt_batch(lent) {
        Some(adopted) => adopted,
        None => {
            let (reader, lent) = (rt.clone(), lent.clone());
            rt.block_on(async move { reader.get_batch_lent(&lent).await })
        }
    }
    .map_err(|e| e.to_string())?;
    let array = batch.columns().first().ok_or("an empty batch")?;
    let values = array
        .as_primitive_opt::<T>()
        .ok_or_else(|| format!("a column of {}", array.data_type()))?;
    Ok(values.values().clone())
}

/// A remote pull on its way: the call to make, and what to keep until
/// its answer.
struct Outgoing {
    call: PeerCall,
    /// The keys' object, held until the shard has read it.
    held: Option<braid::ObjectRef<Batch>>,
}

/// Prepares the pull of `keys` for `step` from shard `shard` (service
/// `name`) in another process: the keys lent to the shard's process when
/// it shares this process's store, else in the call.
fn outgoing(
    peers: &dyn Peers,
    rt: Option<&Runtime>,
    shard: usize,
    name: &str,
    worker: usize,
    step: u64,
    keys: &[u64],
) -> Result<Outgoing, PullError> {
    let unreachable = |why: String| PullError::Unreachable(shard, why);
    let meter = peers.meter(SHARD_TASK, shard);
    let key_bytes = std::mem::size_of_val(keys);
    let lend_to = match (rt, peers.seat(SHARD_TASK, shard)) {
        (Some(rt), Some(seat)) if seat.same_store(&rt.store_seat()) => Some((rt, seat)),
        _ => None,
    };
    let mut held = None;
    let keys = match lend_to {
        Some((rt, seat)) => {
            let layout = BatchLayout::new(
                keys.len(),
                &[ColumnSpec::primitive(KEY_COLUMN, Primitive::UInt64)],
            )
            .map_err(|e| unreachable(e.to_string()))?;
            let (object, lent) = rt
                .put_batch_lent(&layout, &seat, |w| match &mut w.columns()[0].values {
                    ValuesMut::UInt64(k) => {
                        k.copy_from_slice(keys);
                        Ok(())
                    }
                    _ => Err(braid::Error::BadRequest("not a key column".into())),
                })
                .map_err(|e| unreachable(e.to_string()))?;
            held = Some(object);
            Keys::Lent(lent)
        }
        None => {
            if let Some(m) = meter {
                m.codec(key_bytes);
            }
            Keys::Inline(keys.to_vec())
        }
    };
    if let Some(m) = meter {
        m.sent(key_bytes);
    }
    let request = codec::encode(&Request::Pull(Box::new(PullRequest {
        worker,
        step,
        keys,
        reply_to: rt.map(Runtime::store_seat),
    })))
    .map_err(|e| unreachable(e.to_string()))?;
    Ok(Outgoing {
        call: PeerCall {
            task: SHARD_TASK.to_string(),
            subtask: shard,
            service: name.to_string(),
            request,
        },
        held,
    })
}

/// Takes shard `shard`'s answer to a pull into `out`.
fn answered(
    peers: &dyn Peers,
    rt: Option<&Runtime>,
    shard: usize,
    answer: Result<Vec<u8>, CallError>,
    out: &mut Pulled,
) -> Result<PullStats, PullError> {
    let unreachable = |why: String| PullError::Unreachable(shard, why);
    let meter = peers.meter(SHARD_TASK, shard);
    let answer = answer.map_err(|e| unreachable(e.to_string()))?;
    let answer: Answer = codec::decode(&answer).map_err(|e| unreachable(e.to_string()))?;
    let (stats, weights) = answer?;
    match weights {
        Weights::Inline(w) => {
            if let Some(m) = meter {
                m.sent(std::mem::size_of_val(&w[..]));
                m.codec(std::mem::size_of_val(&w[..]));
            }
            *out.owned() = w;
        }
        Weights::Lent(lent) => {
            let rt = rt.ok_or_else(|| unreachable("weights lent outside a runtime".into()))?;
            out.in_place(column::<Float32Type>(rt, &lent).map_err(unreachable)?);
            if let Some(m) = meter {
                m.sent(std::mem::size_of_val(&out[..]));
            }
        }
    }
    Ok(stats)
}

/// One remote pull for [`many`]: shard `shard`'s service `name`, the keys
/// and where the weights go.
pub(crate) struct RemotePull<'a> {
    /// The shard.
    pub shard: usize,
    /// Its pull service.
    pub name: &'a str,
    /// The keys.
    pub keys: &'a [u64],
    /// The weights.
    pub out: &'a mut Pulled,
}

/// Pulls from several shards in other processes for `step`, the calls'
/// round trips overlapping; each pull's stats, in order.
pub(crate) fn many(
    peers: &dyn Peers,
    worker: usize,
    step: u64,
    pulls: Vec<RemotePull<'_>>,
) -> Vec<Result<PullStats, PullError>> {
    let rt = braid::current().ok();
    let mut calls = Vec::new();
    let mut held = Vec::new();
    let mut results: Vec<Option<Result<PullStats, PullError>>> = Vec::new();
    for p in &pulls {
        match outgoing(peers, rt.as_ref(), p.shard, p.name, worker, step, p.keys) {
            Ok(o) => {
                calls.push(o.call);
                held.push(o.held);
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut answers = peers.call_many(calls).into_iter();
    drop(held);
    pulls
        .into_iter()
        .zip(results)
        .map(|(p, result)| match result {
            Some(failed) => failed,
            None => match answers.next() {
                Some(answer) => answered(peers, rt.as_ref(), p.shard, answer, p.out),
                None => Err(PullError::Unreachable(p.shard, "no answer".into())),
            },
        })
        .collect()
}

/// A shard answering remote pulls as a local one would.
pub(crate) struct PullService<M: Model> {
    cell: Arc<ShardCell<M>>,
    timeout: Duration,
    /// The shard's process's runtime (none in a process without one).
    rt: Option<Runtime>,
}

impl<M: Model> PullService<M> {
    /// Answers pulls of `cell`, waiting up to `timeout` for slower workers.
    pub(crate) fn new(cell: Arc<ShardCell<M>>, timeout: Duration) -> Self {
        PullService {
            cell,
            timeout,
            rt: braid::current().ok(),
        }
    }

    fn answer(&self, request: PullRequest) -> Answer {
        let index = self.cell.index();
        let unreachable = |why: String| PullError::Unreachable(index, why);
        let lent_keys;
        let keys: &[u64] = match &request.keys {
            Keys::Inline(keys) => keys,
            Keys::Lent(lent) => {
                let rt = self
                    .rt
                    .as_ref()
                    .ok_or_else(|| unreachable("no runtime".into()))?;
                lent_keys = column::<UInt64Type>(rt, lent).map_err(unreachable)?;
                &lent_keys
            }
        };
        let lend_to = match (&self.rt, request.reply_to) {
            (Some(rt), Some(seat)) if seat.same_store(&rt.store_seat()) => Some((rt, seat)),
            _ => None,
        };
        let Some((rt, seat)) = lend_to else {
            let mut out = Vec::new();
            let stats =
                self.cell
                    .pull(request.worker, request.step, keys, &mut out, self.timeout)?;
            return Ok((stats, Weights::Inline(out)));
        };
        let layout = BatchLayout::new(
            keys.len() * M::WIDTH,
            &[ColumnSpec::primitive(WEIGHT_COLUMN, Primitive::Float32)],
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let mut pulled = None;
        let built = rt.put_batch_lent(&layout, &seat, |w| {
            let ValuesMut::Float32(out) = &mut w.columns()[0].values else {
                return Err(braid::Error::BadRequest("not a weight column".into()));
            };
            let stats = self
                .cell
                .pull_into(request.worker, request.step, keys, out, self.timeout);
            let failed = stats.is_err();
            pulled = Some(stats);
            if failed {
                return Err(braid::Error::BadRequest("the pull failed".into()));
            }
            Ok(())
        });
        let stats = match pulled {
            Some(stats) => stats?,
            None => return Err(unreachable("the weights could not be built".into())),
        };
        // The worker's pin was lent as the weights were sealed: the
        // object stays until the worker lets go of it.
        let (_object, lent) = built.map_err(|e| unreachable(e.to_string()))?;
        Ok((stats, Weights::Lent(lent)))
    }
}

impl<M: Model> Service for PullService<M> {
    fn call(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let request: Request =
            codec::decode(request).map_err(|e| format!("a malformed pull request: {e}"))?;
        match request {
            Request::Pull(request) => codec::encode(&self.answer(*request)),
            Request::Page => codec::encode(&self.cell.open_page().map_err(|e| e.to_string())),
        }
        .map_err(|e| e.to_string())
    }

    /// A pull waits for slower workers (BSP, SSP) and, in every mode, for
    /// the worker's own pushes up to [`super::shard_page::OWN_LAG`] steps
    /// back, which the shard's operator thread applies.
    fn may_block(&self) -> bool {
        true
    }
}
