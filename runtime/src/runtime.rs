//! [`Runtime`]: what a driver or a task holds to use the cluster — put,
//! get, wait, cancel, actors by name, placement groups — plus the helpers
//! that let code that is not async block on it.

use crate::core::Core;
use crate::error::{Error, Result};
use crate::ids::{NodeId, PlacementGroupId};
use crate::object_ref::{Lent, ObjectRef};
use crate::objects::ObjectBytes;
use crate::refs::ValueState;
use crate::resources::Resources;
use crate::submit::Submitter;
use crate::value::{decode, encode_return};
use arrow_array::RecordBatch;
use braid_store::batch::{BatchLayout, BatchWriter};
use braid_store::{BuildError, ObjectView, PutError, StoreSeat};
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

static CURRENT: Mutex<Option<Runtime>> = Mutex::new(None);

/// The process's core, once the runtime is up.
pub(crate) fn current_core() -> Option<Arc<Core>> {
    CURRENT.lock().as_ref().map(|r| r.core.clone())
}

/// The runtime of this process: the driver's after [`init`](crate::init),
/// or the worker's inside a task or actor.
pub fn current() -> Result<Runtime> {
    CURRENT
        .lock()
        .clone()
        .ok_or_else(|| Error::NotRunning("call braid::init() first".into()))
}

pub(crate) fn set_current(rt: &Runtime) {
    let mut current = CURRENT.lock();
    if current.is_none() {
        *current = Some(rt.clone());
    }
}

pub(crate) fn clear_current() {
    CURRENT.lock().take();
}

/// Runs `future` on the runtime behind `handle` and blocks this thread
/// until it finishes. Safe to call from a task's synchronous code.
pub(crate) fn block_on<F>(handle: &tokio::runtime::Handle, future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let join = handle.spawn(future);
    let wait = async move {
        join.await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| futures::executor::block_on(wait))
        }
        _ => futures::executor::block_on(wait),
    }
}

/// Marks an [`ObjectRef`] to a plain-old-data array put with
/// [`Runtime::put_array`]: its bytes are the elements, not an encoding.
pub struct Array<T>(PhantomData<T>);

/// Marks an [`ObjectRef`] to an Arrow record batch put with
/// [`Runtime::put_batch`] or [`Runtime::put_batch_with`].
pub struct Batch;

/// A zero-copy view of an array in the node's shared memory. Dropping it
/// unpins the object.
pub struct ArrayView<T> {
    view: ObjectView,
    _type: PhantomData<T>,
}

impl<T: bytemuck::Pod> std::ops::Deref for ArrayView<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.view.as_slice().unwrap_or(&[])
    }
}

impl<T> ArrayView<T> {
    /// The underlying store view.
    pub fn view(&self) -> &ObjectView {
        &self.view
    }
}

/// A placement group: resource bundles reserved together, on one node
/// (PACK) or spread over several (SPREAD).
#[derive(Debug, Clone)]
pub struct PlacementGroup {
    id: PlacementGroupId,
    nodes: Vec<NodeId>,
}

impl PlacementGroup {
    /// The group's id.
    pub fn id(&self) -> PlacementGroupId {
        self.id
    }

    /// The node bundle `index` was placed on.
    pub fn node_of(&self, index: u32) -> Option<NodeId> {
        self.nodes.get(index as usize).copied()
    }

    /// The node of every bundle, in bundle order.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }
}

/// How a placement group's bundles are spread over nodes.
pub use crate::rpc::PlacementStrategy;

/// A handle on a braid cluster. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) core: Arc<Core>,
    /// The process's task submitter, shared by every clone.
    pub(crate) tasks: Arc<Submitter>,
    pub(crate) cluster: Option<Arc<crate::cluster::EmbeddedCluster>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Runtime(node {}, job {})",
            self.core.node_id, self.core.job
        )
    }
}

impl Runtime {
    /// The runtime of the process behind `core`, stopping `cluster` when
    /// shut down.
    pub(crate) fn new(
        core: Arc<Core>,
        cluster: Option<Arc<crate::cluster::EmbeddedCluster>>,
    ) -> Runtime {
        let tasks = Arc::new(Submitter::new(Arc::downgrade(&core)));
        let rebuilder: Arc<dyn crate::lineage::Rebuilder> = tasks.clone();
        let _ = core.rebuilder.set(rebuilder);
        Runtime {
            tasks,
            core,
            cluster,
        }
    }

    /// Runs `future` on the runtime's threads and blocks this thread until
    /// it finishes: for synchronous code (a task body, a non-async `main`)
    /// that wants several things at once.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        block_on(&self.core.handle, future)
    }

    /// Runs `future` on the runtime's threads in the background.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.core.handle.spawn(future)
    }

    /// The node this process runs on.
    pub fn node_id(&self) -> NodeId {
        self.core.node_id
    }

    /// The job this process belongs to.
    pub fn job_id(&self) -> crate::ids::JobId {
        self.core.job
    }

    /// The cluster token, for starting more drivers or nodes that join
    /// this cluster (`BRAID_TOKEN`).
    pub fn token(&self) -> &str {
        &self.core.token
    }

    /// The head's gRPC address (`host:port`).
    pub fn address(&self) -> &str {
        &self.core.head_address
    }

    /// The cluster's dashboard, `http://HOST:PORT/?token=TOKEN` (opening it
    /// signs the browser in), or `None` when the head serves none. The
    /// head's `/metrics` is at the same `HOST:PORT`.
    pub async fn dashboard_url(&self) -> Result<Option<String>> {
        let head = crate::rpc::HeadClient::connect(self.address(), self.token()).await?;
        let status = head.cluster_status().await?;
        Ok((!status.metrics_address.is_empty())
            .then(|| format!("http://{}/?token={}", status.metrics_address, self.token())))
    }

    /// This job's scratch directory, `<session>/scratch/<job-id>/` (mode
    /// 0700), created on first use: for temporary files such as checkpoint
    /// directories. The node removes it when the job's driver exits,
    /// however it exits (a SIGKILL too), and `braid stop` removes what is
    /// left of a stopped cluster's. Every process of the job on the same
    /// node (driver and workers) gets the same directory.
    pub fn scratch_dir(&self) -> Result<std::path::PathBuf> {
        crate::session::create_scratch_dir(&self.core.session_dir, self.core.job)
    }

    /// The node's object store, for direct zero-copy work.
    pub fn store(&self) -> &braid_store::StoreClient {
        &self.core.store
    }

    /// Stores a value in the node's object store and returns a reference
    /// owned by this process. References nested in the value stay alive as
    /// long as it does.
    pub fn put<T: Serialize>(&self, value: &T) -> Result<ObjectRef<T>> {
        let encoded = encode_return(value)?;
        let id = self.core.new_object_id();
        self.core
            .store
            .put_with_fresh_id(id, &encoded.bytes)
            .map_err(store_put_error)?;
        let handle = self
            .core
            .refs
            .new_owned(id, ValueState::Stored(vec![self.core.node_id]));
        if !encoded.refs.is_empty() {
            self.core.refs.set_contained(id, encoded.refs);
        }
        Ok(ObjectRef::from_handle(handle))
    }

    /// Stores an array of plain-old-data values; any process on the node
    /// reads it in place with [`Runtime::get_array`].
    pub fn put_array<T: bytemuck::Pod>(&self, values: &[T]) -> Result<ObjectRef<Array<T>>> {
        let id = self.core.new_object_id();
        self.core
            .store
            .put_with_fresh_id(id, bytemuck::cast_slice(values))
            .map_err(store_put_error)?;
        Ok(ObjectRef::from_handle(self.core.refs.new_owned(
            id,
            ValueState::Stored(vec![self.core.node_id]),
        )))
    }

    /// Puts an Arrow record batch into the store in Arrow IPC layout (each
    /// buffer copied once); any process on any node reads it in place with
    /// [`Runtime::get_batch`].
    pub fn put_batch(&self, batch: &RecordBatch) -> Result<ObjectRef<Batch>> {
        let layout = BatchLayout::of(batch).map_err(|e| Error::BadRequest(e.to_string()))?;
        self.put_laid_out(&layout, |buf| {
            braid_store::batch::write_record_batch(&layout, batch, buf)
                .map_err(|e| Error::BadRequest(e.to_string()))
        })
    }

    /// Builds a record batch directly in the store: `fill` writes the
    /// columns of `layout` in place, then the batch is sealed. Nothing is
    /// encoded or copied.
    pub fn put_batch_with(
        &self,
        layout: &BatchLayout,
        fill: impl FnOnce(&mut BatchWriter<'_>) -> Result<()>,
    ) -> Result<ObjectRef<Batch>> {
        self.put_laid_out(layout, |buf| fill_batch(layout, buf, fill))
    }

    /// [`Runtime::put_batch_with`], lending the batch to the process
    /// sitting at `to` on this node's store (see
    /// [`Runtime::store_seat`]) as it is sealed: that reader holds it with
    /// [`Runtime::get_batch_lent`] at once, without asking the store. A
    /// batch of up to 256 KiB costs no round trip to the store at all.
    /// The lent pin is the reader's to release, so the returned [`Lent`]
    /// must reach it (a reader that exits releases it too).
    pub fn put_batch_lent(
        &self,
        layout: &BatchLayout,
        to: &StoreSeat,
        fill: impl FnOnce(&mut BatchWriter<'_>) -> Result<()>,
    ) -> Result<(ObjectRef<Batch>, Lent<Batch>)> {
        let id = self.core.new_object_id();
        let size = layout.total_len() as u64;
        let built = self
            .core
            .store
            .build_lent_with_fresh_id(id, size, to, |buf| fill_batch(layout, buf, fill));
        let (_view, ticket) = built.map_err(build_error)?;
        let object = self.stored_batch(id);
        let lent = object.lend_pinned(ticket);
        Ok((object, lent))
    }

    /// Where this process sits on its node's store, for
    /// [`Runtime::put_batch_lent`] in another process.
    pub fn store_seat(&self) -> StoreSeat {
        self.core.store.seat()
    }

    fn put_laid_out(
        &self,
        layout: &BatchLayout,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<ObjectRef<Batch>> {
        let id = self.core.new_object_id();
        let built = self
            .core
            .store
            .build_with_fresh_id(id, layout.total_len() as u64, fill);
        built.map_err(build_error)?;
        Ok(self.stored_batch(id))
    }

    fn stored_batch(&self, id: braid_store::ObjectId) -> ObjectRef<Batch> {
        ObjectRef::from_handle(
            self.core
                .refs
                .new_owned(id, ValueState::Stored(vec![self.core.node_id])),
        )
    }

    /// Gets a record batch lent by its owner ([`ObjectRef::lend`]) and
    /// reads it in place: pulled to this node first if it lives elsewhere,
    /// without asking the owner where it is or counting a reference there.
    /// The batch's arrays pin the object until they are dropped.
    pub async fn get_batch_lent(&self, lent: &Lent<Batch>) -> Result<RecordBatch> {
        if let Some(adopted) = self.adopt_batch(lent) {
            return adopted;
        }
        let view = self
            .core
            .objects
            .fetch_lent(lent.id(), lent.owner())
            .await?;
        view.record_batch().map_err(|e| Error::Codec(e.to_string()))
    }

    /// [`Runtime::get_batch_lent`] of a batch whose pin was lent to this
    /// process ([`Runtime::put_batch_lent`]), at once and without blocking;
    /// `None` for any other batch.
    pub fn adopt_batch(&self, lent: &Lent<Batch>) -> Option<Result<RecordBatch>> {
        let ticket = lent.ticket().filter(|t| t.to() == self.store_seat())?;
        Some(
            self.core
                .store
                .adopt(ticket)
                .map_err(|e| Error::io("adopting a lent batch", e))
                .and_then(|view| view.record_batch().map_err(|e| Error::Codec(e.to_string()))),
        )
    }

    /// Gets a record batch put with [`Runtime::put_batch`]: waits until it
    /// is ready, fetches it to this node if it lives elsewhere, and returns
    /// it read in place (its arrays point into this process's mapping of
    /// the store and keep the object pinned until they are dropped).
    pub async fn get_batch(&self, r: &ObjectRef<Batch>) -> Result<RecordBatch> {
        match self.fetch(r).await? {
            ObjectBytes::Stored(view) => {
                view.record_batch().map_err(|e| Error::Codec(e.to_string()))
            }
            ObjectBytes::Inline(_) => Err(Error::BadRequest("not a stored batch".into())),
        }
    }

    /// Gets a value: waits until it is ready, fetches it to this node if it
    /// lives elsewhere, and decodes it.
    pub async fn get<T: DeserializeOwned>(&self, r: &ObjectRef<T>) -> Result<T> {
        let bytes = self.fetch(r).await?;
        decode(bytes.as_bytes())
    }

    /// [`Runtime::get`] with a timeout.
    pub async fn get_timeout<T: DeserializeOwned>(
        &self,
        r: &ObjectRef<T>,
        timeout: Duration,
    ) -> Result<T> {
        tokio::time::timeout(timeout, self.get(r))
            .await
            .unwrap_or(Err(Error::Timeout(timeout)))
    }

    /// Gets many values, in order.
    pub async fn get_all<T: DeserializeOwned>(&self, refs: &[ObjectRef<T>]) -> Result<Vec<T>> {
        let futures: Vec<_> = refs.iter().map(|r| self.get(r)).collect();
        futures::future::join_all(futures)
            .await
            .into_iter()
            .collect()
    }

    /// [`Runtime::get`], for code that is not async.
    pub fn get_blocking<T: DeserializeOwned + Send + 'static>(
        &self,
        r: &ObjectRef<T>,
    ) -> Result<T> {
        let rt = self.clone();
        let r = r.clone();
        block_on(&self.core.handle, async move { rt.get(&r).await })
    }

    /// Maps a stored array in place: no copy, wherever it was put on this
    /// node (arrays on other nodes are transferred first).
    pub async fn get_array<T: bytemuck::Pod>(
        &self,
        r: &ObjectRef<Array<T>>,
    ) -> Result<ArrayView<T>> {
        match self.fetch(r).await? {
            ObjectBytes::Stored(view) => {
                view.as_slice::<T>()
                    .map_err(|e| Error::Codec(e.to_string()))?;
                Ok(ArrayView {
                    view,
                    _type: PhantomData,
                })
            }
            ObjectBytes::Inline(_) => Err(Error::BadRequest("not an array object".into())),
        }
    }

    async fn fetch<T>(&self, r: &ObjectRef<T>) -> Result<ObjectBytes> {
        let core = self.core.clone();
        let handle = r.handle.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            core.objects.fetch_bytes(handle.id, &handle.owner).await
        } else {
            block_on(&self.core.handle.clone(), async move {
                core.objects.fetch_bytes(handle.id, &handle.owner).await
            })
        }
    }

    /// Waits until `k` of `refs` are ready or `timeout` passes, and returns
    /// the ready ones (in readiness order, at most `k`) and the rest (in
    /// their original order). A failed task counts as ready: `get` returns
    /// its error.
    pub async fn wait<T>(
        &self,
        refs: &[ObjectRef<T>],
        k: usize,
        timeout: Option<Duration>,
    ) -> (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>) {
        let k = k.min(refs.len());
        let mut ready = Vec::with_capacity(k);
        for (i, r) in refs.iter().enumerate() {
            if ready.len() >= k {
                break;
            }
            if matches!(
                self.core.refs.state(r.id()),
                Some(ValueState::Inline(_) | ValueState::Stored(_) | ValueState::Failed(_))
            ) {
                ready.push(i);
            }
        }
        if ready.len() < k {
            let mut pending: FuturesUnordered<_> = refs
                .iter()
                .enumerate()
                .filter(|(i, _)| !ready.contains(i))
                .map(|(i, r)| {
                    let core = self.core.clone();
                    let handle = r.handle.clone();
                    async move {
                        let _ = core.objects.resolve(handle.id, &handle.owner).await;
                        i
                    }
                })
                .collect();
            let collect = async {
                while ready.len() < k {
                    match pending.next().await {
                        Some(i) => ready.push(i),
                        None => break,
                    }
                }
            };
            match timeout {
                Some(d) => {
                    let _ = tokio::time::timeout(d, collect).await;
                }
                None => collect.await,
            }
        }
        let mut is_ready = vec![false; refs.len()];
        for &i in &ready {
            is_ready[i] = true;
        }
        let ready_refs = ready.iter().map(|&i| refs[i].clone()).collect();
        let rest = refs
            .iter()
            .enumerate()
            .filter(|(i, _)| !is_ready[*i])
            .map(|(_, r)| r.clone())
            .collect();
        (ready_refs, rest)
    }

    /// Cancels the task behind `r`: its reference resolves to
    /// [`Error::Cancelled`]. A task that has not started never runs; a
    /// running async task is aborted; a running sync task finishes but its
    /// result is dropped ([`cancel_force`](Self::cancel_force) ends it).
    /// Returns false if this process did not submit it or it already
    /// finished.
    pub fn cancel<T>(&self, r: &ObjectRef<T>) -> bool {
        self.tasks.cancel(r.id(), false)
    }

    /// Cancels a task by force (Ray's `cancel(ref, force=True)`): as
    /// [`cancel`](Self::cancel), and if it is running synchronously its
    /// worker process exits, so its CPU returns to the node at once (other
    /// tasks queued on that worker are retried elsewhere). Its reference
    /// fails with [`Error::Cancelled`].
    pub fn cancel_force<T>(&self, r: &ObjectRef<T>) -> bool {
        self.tasks.cancel(r.id(), true)
    }

    /// Reserves resource bundles together.
    pub async fn placement_group(
        &self,
        bundles: Vec<Resources>,
        strategy: PlacementStrategy,
    ) -> Result<PlacementGroup> {
        let core = self.core.clone();
        let id = PlacementGroupId::random();
        let nodes = self
            .core
            .handle
            .spawn(async move {
                let spec = crate::rpc::PlacementGroupSpec {
                    pg_id: id,
                    name: None,
                    bundles: bundles.into_iter().map(|b| b.0).collect(),
                    strategy,
                    job_id: Some(core.job),
                };
                core.head().await?.create_placement_group(&spec).await
            })
            .await
            .map_err(|e| Error::io("placement group", e))??;
        Ok(PlacementGroup { id, nodes })
    }

    /// Releases a placement group's bundles.
    pub async fn remove_placement_group(&self, group: &PlacementGroup) -> Result<()> {
        let core = self.core.clone();
        let id = group.id;
        self.core
            .handle
            .spawn(async move { core.head().await?.remove_placement_group(id).await })
            .await
            .map_err(|e| Error::io("placement group", e))?
    }

    /// The cluster's nodes, as the head sees them.
    pub async fn nodes(&self) -> Result<Vec<crate::rpc::NodeRecord>> {
        let core = self.core.clone();
        self.core
            .handle
            .spawn(async move { core.head().await?.list_nodes().await })
            .await
            .map_err(|e| Error::io("list nodes", e))?
    }

    /// How many objects this process's reference table tracks (owned and
    /// borrowed), for tests and diagnostics.
    pub fn tracked_objects(&self) -> usize {
        self.core.refs.len()
    }

    /// Leaves the cluster: finishes the job (its workers, non-detached
    /// actors and objects are cleaned up) and, for an embedded cluster,
    /// stops its daemons.
    pub async fn shutdown(self) {
        clear_current();
        let core = self.core.clone();
        let _ = self
            .core
            .handle
            .spawn(async move {
                if let Ok(head) = core.head().await {
                    let _ = head.finish_job(core.job).await;
                }
            })
            .await;
        self.core.node.close();
        if let Some(cluster) = &self.cluster {
            cluster.stop();
        }
    }
}

/// Writes a batch of `layout` into `buf` with `fill`, and checks it.
fn fill_batch(
    layout: &BatchLayout,
    buf: &mut [u8],
    fill: impl FnOnce(&mut BatchWriter<'_>) -> Result<()>,
) -> Result<()> {
    let mut writer = BatchWriter::new(layout, buf).map_err(|e| Error::BadRequest(e.to_string()))?;
    fill(&mut writer)?;
    writer
        .finish()
        .map_err(|e| Error::BadRequest(e.to_string()))
}

fn build_error(e: BuildError<Error>) -> Error {
    match e {
        BuildError::Fill(e) => e,
        BuildError::Store(PutError::Create(e)) => store_create_error(e),
        BuildError::Store(e) => Error::io("store put", e),
        BuildError::Lend(e) => Error::BadRequest(e.to_string()),
    }
}

fn store_create_error(e: braid_store::CreateError) -> Error {
    match e {
        braid_store::CreateError::StoreFull { .. } | braid_store::CreateError::TooLarge { .. } => {
            Error::StoreFull(e.to_string())
        }
        e => Error::io("store create", e),
    }
}

fn store_put_error(e: braid_store::PutError) -> Error {
    match e {
        braid_store::PutError::Create(braid_store::CreateError::StoreFull { .. }) => {
            Error::StoreFull(e.to_string())
        }
        e => Error::io("store put", e),
    }
}
