//! The store server: owns the arena, the object table and the spill file,
//! and serves clients over a Unix socket.
//!
//! The node daemon embeds it ([`StoreServer::bind`] then
//! [`StoreServer::run`]); `braid-store serve` runs it alone. Each connection
//! gets a reader task, which handles requests in order, and a writer task,
//! which sends replies. A `get` that has to wait, or to restore from spill,
//! runs in its own task so the connection keeps serving. A malformed frame
//! is answered with [`WireError::Malformed`] and ends that connection only;
//! a closed connection releases everything its client held.

use crate::allocator::Block;
use crate::arena::{create_memfd, ArenaError, Mapping, Provisioner};
use crate::config::{StoreConfig, MIN_CAPACITY};
use crate::object_table::{ClientId, GetOutcome, ObjectTable, RestoreJob, SpillJob, Victim};
use crate::protocol::{
    self, Hello, Reply, ReplyFrame, Request, RequestFrame, StoreStats, WireError, HEADER_LEN,
    PROTOCOL_VERSION,
};
use crate::socket_path::SocketPath;
use crate::spill::{SpillError, SpillFile};
use crate::ObjectId;
use parking_lot::Mutex;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Largest object placed in a leased block (256 KiB: a stream channel's
/// batch); bigger puts take the create/seal path.
pub const MAX_LEASED_SIZE: u64 = 256 << 10;

/// Most bytes one lease request may reserve, unless that is fewer than
/// [`MIN_LEASE_BLOCKS`] blocks.
const MAX_LEASE_BYTES: u64 = 256 << 10;

/// Fewest blocks one lease request may reserve, so that large classes too
/// take a round trip only every few puts.
const MIN_LEASE_BLOCKS: u64 = 4;

/// Replies queued per connection before its reader waits for the writer.
const REPLY_QUEUE: usize = 1024;

/// Errors starting or running a store.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// Another live store answers on the socket path.
    #[error("a store is already serving on {0}")]
    InUse(PathBuf),
    /// Binding or preparing the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The arena could not be created.
    #[error(transparent)]
    Arena(#[from] ArenaError),
    /// The spill directory is unusable.
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// Accepting connections failed.
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
}

struct Shared {
    /// Random; tells this store's lend tickets from another's.
    arena_id: u64,
    table: Mutex<ObjectTable>,
    memfd: OwnedFd,
    mapping: Mapping,
    provisioner: Provisioner,
    spill: Option<SpillFile>,
}

/// A bound store, ready to [`run`](StoreServer::run).
pub struct StoreServer {
    listener: UnixListener,
    shared: Arc<Shared>,
    socket: SocketFile,
    shutdown: watch::Sender<bool>,
}

/// Removes the socket file when the server goes away.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A cheap handle to a running store: counters and shutdown.
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl StoreHandle {
    /// The store's counters.
    pub fn stats(&self) -> StoreStats {
        self.shared.stats()
    }

    /// Deletes every sealed object whose id satisfies `select`, as if each
    /// were deleted by a client: pinned ones go when their last pin does.
    /// The node daemon uses it to drop a finished job's objects. Returns how
    /// many were deleted or marked.
    pub fn delete_where(&self, select: impl Fn(&ObjectId) -> bool) -> usize {
        let mut table = self.shared.table.lock();
        let mut deleted = 0;
        for id in table.sealed_ids() {
            if !select(&id) {
                continue;
            }
            if let Ok(extent) = table.delete(id) {
                deleted += 1;
                if let (Some(extent), Some(spill)) = (extent, self.shared.spill.as_ref()) {
                    spill.release(extent);
                }
            }
        }
        deleted
    }

    /// Up to `limit` of the store's objects, in no particular order.
    pub fn objects(&self, limit: usize) -> Vec<crate::ObjectInfo> {
        self.shared.table.lock().describe(limit)
    }

    /// Whether the store holds `id` (sealed, spilled or being written).
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.shared.table.lock().contains(id)
    }

    /// Deletes these objects, as if each were deleted by a client (pinned
    /// ones go when their last pin does; unknown ones are skipped). Returns
    /// how many were deleted or marked.
    pub fn delete_many(&self, ids: &[ObjectId]) -> usize {
        let mut table = self.shared.table.lock();
        let mut deleted = 0;
        for id in ids {
            if let Ok(extent) = table.delete(*id) {
                deleted += 1;
                if let (Some(extent), Some(spill)) = (extent, self.shared.spill.as_ref()) {
                    spill.release(extent);
                }
            }
        }
        deleted
    }

    /// Asks [`StoreServer::run`] to stop accepting and return.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl StoreServer {
    /// Creates the arena, opens the spill file and binds the socket.
    ///
    /// A socket file left by a store that died is removed; a live store on
    /// the same path is an error. Must be called inside a tokio runtime.
    pub async fn bind(config: StoreConfig) -> Result<StoreServer, ServeError> {
        if config.capacity < MIN_CAPACITY {
            return Err(ServeError::Config(format!(
                "capacity {} is below the minimum of {MIN_CAPACITY} bytes",
                config.capacity
            )));
        }
        let spill = config
            .spill_dir
            .as_deref()
            .map(SpillFile::open)
            .transpose()?;
        let memfd = create_memfd(config.capacity)?;
        let mapping = Mapping::new(memfd.as_fd(), config.capacity)?;
        let provision_fd = memfd.try_clone().map_err(|e| ArenaError::Create {
            capacity: config.capacity,
            source: e,
        })?;
        let provisioner = Provisioner::start(provision_fd, config.capacity, config.headroom)
            .map_err(|e| ArenaError::Create {
                capacity: config.capacity,
                source: e,
            })?;
        let listener = bind_socket(&config.socket).await?;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            arena_id: uuid::Uuid::new_v4().as_u64_pair().0,
            table: Mutex::new(ObjectTable::new(config.capacity, spill.is_some())),
            memfd,
            mapping,
            provisioner,
            spill,
        });
        tracing::info!(
            socket = %config.socket.display(),
            capacity = config.capacity,
            spill = ?config.spill_dir,
            "store listening"
        );
        Ok(StoreServer {
            listener,
            shared,
            socket: SocketFile(config.socket),
            shutdown,
        })
    }

    /// The socket clients connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket.0
    }

    /// A handle for counters and shutdown.
    pub fn handle(&self) -> StoreHandle {
        StoreHandle {
            shared: Arc::clone(&self.shared),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Serves clients until [`StoreHandle::shutdown`]; removes the socket
    /// file on return.
    pub async fn run(self) -> Result<(), ServeError> {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    match accepted {
                        Ok((stream, _)) => {
                            let shared = Arc::clone(&self.shared);
                            tokio::spawn(serve_connection(shared, stream));
                        }
                        Err(e) if is_transient(&e) => {
                            tracing::warn!(error = %e, "accept failed; continuing");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => return Err(ServeError::Accept(e)),
                    }
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return Ok(()),
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    ) || e.kind() == std::io::ErrorKind::ConnectionAborted
        || e.kind() == std::io::ErrorKind::Interrupted
}

mod libc_errno {
    pub const EMFILE: i32 = 24;
    pub const ENFILE: i32 = 23;
    pub const ENOBUFS: i32 = 105;
    pub const ENOMEM: i32 = 12;
}

async fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )));
        }
        let short = SocketPath::new(path).map_err(bind_err)?;
        match UnixStream::connect(short.as_path()).await {
            Ok(_) => return Err(ServeError::InUse(path.to_owned())),
            Err(_) => {
                tracing::info!(path = %path.display(), "removing stale store socket");
                std::fs::remove_file(path).map_err(bind_err)?;
            }
        }
    }
    let short = SocketPath::new(path).map_err(bind_err)?;
    let listener = UnixListener::bind(short.as_path()).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

impl Shared {
    fn stats(&self) -> StoreStats {
        let mut stats = self.table.lock().stats();
        stats.provisioned_bytes = self.provisioner.provisioned();
        stats
    }

    /// Allocates `size` bytes, evicting and spilling as needed, with the
    /// block's pages provisioned.
    async fn allocate(self: &Arc<Self>, size: u64) -> Result<Block, WireError> {
        loop {
            let step = self.try_allocate(size);
            match step {
                Ok(block) => return self.provision(block).await,
                Err(Victim::Evicted) => continue,
                Err(Victim::Spill(job)) => {
                    if let Err(reason) = self.spill(job).await {
                        return Err(WireError::Internal(format!(
                            "no room for {size} bytes: spilling failed: {reason}"
                        )));
                    }
                }
                Err(Victim::None) => return Err(self.table.lock().full_error(size)),
            }
        }
    }

    /// One allocation attempt; on failure, what was done to make room.
    fn try_allocate(&self, size: u64) -> Result<Block, Victim> {
        let mut table = self.table.lock();
        match table.allocate(size) {
            Ok(block) => {
                self.provisioner.set_high_water(table.high_water());
                Ok(block)
            }
            Err(_) if size == 0 || size > table.capacity() => Err(Victim::None),
            Err(_) => Err(table.pick_victim()),
        }
    }

    async fn provision(self: &Arc<Self>, block: Block) -> Result<Block, WireError> {
        if self.provisioner.provisioned() >= block.end() {
            return Ok(block);
        }
        let shared = Arc::clone(self);
        let result =
            tokio::task::spawn_blocking(move || shared.provisioner.ensure(block.end())).await;
        match result {
            Ok(Ok(())) => Ok(block),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot back an allocation with memory");
                let mut table = self.table.lock();
                table.free_block(block);
                Err(table.full_error(block.len))
            }
            Err(e) => {
                self.table.lock().free_block(block);
                Err(WireError::Internal(format!(
                    "provisioning task failed: {e}"
                )))
            }
        }
    }

    /// Spills one object. An error means the spill directory is failing;
    /// the caller then gives up instead of trying every other victim.
    async fn spill(self: &Arc<Self>, job: SpillJob) -> Result<(), String> {
        let shared = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || {
            let spill = shared.spill.as_ref().ok_or("spilling is disabled")?;
            shared.mapping.populate(job.block.offset, job.size);
            // SAFETY: the object is in the Spilling state: sealed, so no
            // process writes it, and its block cannot be freed or reused
            // until `finish_spill` runs after this read. The range lies in the
            // mapping because the allocator only hands out in-arena blocks.
            let data = unsafe { shared.arena_slice(job.block.offset, job.size) };
            spill.write(data).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("spill task failed: {e}")))
        .map_err(|e| e.to_string());
        let failure = result.as_ref().err().cloned();
        let unneeded = self.table.lock().finish_spill(job, result);
        if let (Some(extent), Some(spill)) = (unneeded, self.spill.as_ref()) {
            spill.release(extent);
        }
        failure.map_or(Ok(()), Err)
    }

    async fn restore(self: &Arc<Self>, job: RestoreJob) {
        let block = match self.allocate(job.size.max(1)).await {
            Ok(block) => block,
            Err(e) => {
                self.table.lock().abort_restore(job.id, e);
                return;
            }
        };
        let shared = Arc::clone(self);
        let read = tokio::task::spawn_blocking(move || {
            let spill = shared.spill.as_ref().ok_or("spilling is disabled")?;
            shared.mapping.populate(block.offset, job.size);
            // SAFETY: `block` was just allocated for this restore and is not
            // yet visible to any client (the object is in the Restoring
            // state), so this is the only reference to those bytes.
            let out = unsafe { shared.arena_slice_mut(block.offset, job.size) };
            spill
                .read(job.extent, out, job.checksum)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("restore task failed: {e}")));
        let extent = match read {
            Ok(()) => self.table.lock().finish_restore(job.id, block),
            Err(reason) => self.table.lock().lose(job.id, block, reason),
        };
        if let (Some(extent), Some(spill)) = (extent, self.spill.as_ref()) {
            spill.release(extent);
        }
    }

    /// # Safety
    /// `[offset, offset + len)` must lie in the arena and no process may
    /// write it while the slice lives.
    unsafe fn arena_slice(&self, offset: u64, len: u64) -> &[u8] {
        // SAFETY: forwarded to the caller.
        unsafe {
            std::slice::from_raw_parts(self.mapping.base().add(offset as usize), len as usize)
        }
    }

    /// # Safety
    /// `[offset, offset + len)` must lie in the arena and nothing else may
    /// read or write it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn arena_slice_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        // SAFETY: forwarded to the caller.
        unsafe {
            std::slice::from_raw_parts_mut(self.mapping.base().add(offset as usize), len as usize)
        }
    }
}

/// Releases a client's holdings however its connection task ends.
struct ClientGuard {
    shared: Arc<Shared>,
    client: ClientId,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.shared.table.lock().disconnect(self.client);
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: UnixStream) {
    let client = shared.table.lock().connect();
    let guard = ClientGuard {
        shared: Arc::clone(&shared),
        client,
    };
    if let Err(e) = send_hello(&shared, &stream, client).await {
        tracing::debug!(client = %client, error = %e, "handshake failed");
        return;
    }
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(REPLY_QUEUE);
    let writer = tokio::spawn(write_replies(wr, rx));
    let conn = Connection { shared, client, tx };
    conn.read_requests(rd).await;
    drop(conn);
    drop(guard);
    let _ = writer.await;
}

async fn send_hello(shared: &Shared, stream: &UnixStream, client: ClientId) -> std::io::Result<()> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        arena_len: shared.mapping.len(),
        client_id: client,
        store_pid: std::process::id(),
        max_leased_size: MAX_LEASED_SIZE,
        arena_id: shared.arena_id,
    };
    let frame = protocol::encode_frame(&hello).map_err(std::io::Error::other)?;
    let mut sent = 0;
    while sent < frame.len() {
        let n = stream
            .async_io(tokio::io::Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
                let fds = [shared.memfd.as_fd()];
                if sent == 0 {
                    control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
                }
                rustix::net::sendmsg(
                    stream,
                    &[IoSlice::new(&frame[sent..])],
                    &mut control,
                    rustix::net::SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        sent += n;
    }
    Ok(())
}

async fn write_replies(wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut wr = tokio::io::BufWriter::with_capacity(64 << 10, wr);
    while let Some(frame) = rx.recv().await {
        if wr.write_all(&frame).await.is_err() {
            return;
        }
        while let Ok(frame) = rx.try_recv() {
            if wr.write_all(&frame).await.is_err() {
                return;
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    client: ClientId,
    tx: mpsc::Sender<Vec<u8>>,
}

impl Connection {
    async fn read_requests(&self, rd: OwnedReadHalf) {
        let mut rd = BufReader::with_capacity(64 << 10, rd);
        let mut body = Vec::new();
        loop {
            let mut header = [0u8; HEADER_LEN];
            match rd.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                Err(e) => {
                    tracing::debug!(client = %self.client, error = %e, "read failed");
                    return;
                }
            }
            let len = match protocol::body_len(header) {
                Ok(len) => len,
                Err(e) => return self.refuse(e.to_string()).await,
            };
            body.resize(len, 0);
            if let Err(e) = rd.read_exact(&mut body).await {
                return self.refuse(format!("truncated frame: {e}")).await;
            }
            let frame: RequestFrame = match protocol::decode_body(&body) {
                Ok(frame) => frame,
                Err(e) => return self.refuse(e.to_string()).await,
            };
            if !self.handle(frame).await {
                return;
            }
        }
    }

    async fn refuse(&self, reason: String) {
        tracing::warn!(client = %self.client, %reason, "malformed frame; closing connection");
        self.reply(0, Err(WireError::Malformed(reason))).await;
    }

    /// Sends a reply; false when the connection is gone.
    async fn reply(&self, seq: u64, body: Result<Reply, WireError>) -> bool {
        send_reply(&self.tx, seq, body).await
    }

    /// Handles one request; false ends the connection.
    async fn handle(&self, frame: RequestFrame) -> bool {
        let RequestFrame { seq, body } = frame;
        let client = self.client;
        let result = match body {
            Request::Create {
                id,
                size,
                evictable,
            } => self.create(id, size, evictable).await,
            Request::Seal { id, lend_to } => self
                .table()
                .seal(client, id, lend_to)
                .map(|()| Reply::Sealed),
            Request::Abort { id } => self.table().abort(client, id).map(|()| Reply::Aborted),
            Request::Get { id, timeout_ms } => return self.get(seq, id, timeout_ms).await,
            Request::Release { id } => self.table().release(client, id).map(|()| Reply::Released),
            Request::Delete { id } => {
                let freed = self.table().delete(id);
                freed.map(|extent| {
                    if let (Some(extent), Some(spill)) = (extent, self.shared.spill.as_ref()) {
                        spill.release(extent);
                    }
                    Reply::Deleted
                })
            }
            Request::Contains { id } => Ok(Reply::Contains(self.table().contains(&id))),
            Request::Stats => Ok(Reply::Stats(self.shared.stats())),
            Request::Lease { class, count } => self.lease(class, count).await,
            Request::PutLeased {
                id,
                offset,
                size,
                lend_to,
            } => self
                .table()
                .put_leased(client, id, offset, size, lend_to)
                .map(|()| Reply::Sealed),
            Request::Lend { id, to } => self.table().lend(client, id, to).map(|()| Reply::Lent),
            Request::ReleaseLent { id } => self
                .table()
                .release_lent(client, id)
                .map(|()| Reply::Released),
        };
        if seq == 0 {
            if let Err(e) = result {
                tracing::warn!(client = %client, error = %e, "one-way request failed");
            }
            return true;
        }
        self.reply(seq, result).await
    }

    fn table(&self) -> parking_lot::MutexGuard<'_, ObjectTable> {
        self.shared.table.lock()
    }

    async fn create(&self, id: ObjectId, size: u64, evictable: bool) -> Result<Reply, WireError> {
        if self.table().exists(&id) {
            return Err(WireError::AlreadyExists(id));
        }
        let block = self.shared.allocate(size.max(1)).await?;
        let mut table = self.table();
        match table.insert_creating(self.client, id, block, size, evictable) {
            Ok(()) => Ok(Reply::Created {
                offset: block.offset,
            }),
            Err(e) => {
                table.free_block(block);
                Err(e)
            }
        }
    }

    async fn lease(&self, class: u64, count: u32) -> Result<Reply, WireError> {
        if !class.is_power_of_two() || !(crate::allocator::ALIGN..=MAX_LEASED_SIZE).contains(&class)
        {
            return Err(WireError::BadLease(format!(
                "block size {class} is not a power of two in {}..={MAX_LEASED_SIZE}",
                crate::allocator::ALIGN
            )));
        }
        let most = (MAX_LEASE_BYTES / class).max(MIN_LEASE_BLOCKS);
        let count = u64::from(count).clamp(1, most) as u32;
        let leased = self.table().lease(self.client, class, count);
        let offsets = match leased {
            Ok(offsets) => offsets,
            Err(_) => {
                let block = self.shared.allocate(class).await?;
                self.table().add_lease(self.client, block);
                return Ok(Reply::Leased {
                    offsets: vec![block.offset],
                });
            }
        };
        let end = offsets.iter().max().map_or(0, |o| o + class);
        let high_water = self.table().high_water();
        self.shared.provisioner.set_high_water(high_water);
        if self.shared.provisioner.provisioned() < end {
            let shared = Arc::clone(&self.shared);
            let ensured = tokio::task::spawn_blocking(move || shared.provisioner.ensure(end)).await;
            if !matches!(ensured, Ok(Ok(()))) {
                return Err(self.table().full_error(class));
            }
        }
        Ok(Reply::Leased { offsets })
    }

    /// Answers a get now, or from a task that waits (and restores) so this
    /// connection keeps serving.
    async fn get(&self, seq: u64, id: ObjectId, timeout_ms: u64) -> bool {
        if seq == 0 {
            tracing::warn!(client = %self.client, "ignoring a one-way get");
            return true;
        }
        let outcome = self.table().get(self.client, id);
        let (waiter, rx, restore) = match outcome {
            GetOutcome::Ready(reply) => return self.reply(seq, Ok(reply)).await,
            GetOutcome::Wait {
                waiter,
                rx,
                restore,
            } => (waiter, rx, restore),
        };
        if let Some(job) = restore {
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move { shared.restore(job).await });
        }
        let shared = Arc::clone(&self.shared);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let body = wait_for_object(&shared, id, waiter, rx, timeout_ms).await;
            send_reply(&tx, seq, body).await;
        });
        true
    }
}

async fn wait_for_object(
    shared: &Shared,
    id: ObjectId,
    waiter: u64,
    mut rx: oneshot::Receiver<Result<Reply, WireError>>,
    timeout_ms: u64,
) -> Result<Reply, WireError> {
    let deadline = tokio::time::Instant::now().checked_add(Duration::from_millis(timeout_ms));
    let answered = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, &mut rx).await.ok(),
        None => Some((&mut rx).await),
    };
    let answer = match answered {
        Some(answer) => answer,
        None => {
            if shared.table.lock().cancel_waiter(id, waiter) {
                return Err(WireError::Timeout { id, timeout_ms });
            }
            rx.await
        }
    };
    answer.unwrap_or_else(|_| Err(WireError::Internal("the store dropped a waiter".into())))
}

async fn send_reply(tx: &mpsc::Sender<Vec<u8>>, seq: u64, body: Result<Reply, WireError>) -> bool {
    match protocol::encode_frame(&ReplyFrame { seq, body }) {
        Ok(frame) => tx.send(frame).await.is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            false
        }
    }
}
