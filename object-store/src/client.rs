//! The store client: connects over the Unix socket, maps the arena, and gives
//! out zero-copy buffers and views of objects.
//!
//! A [`StoreClient`] is cheap to clone and safe to share between threads.
//! Requests carry sequence numbers; whichever waiting thread finds the socket
//! idle reads replies for all of them, so one thread's round trip costs one
//! write and one read with no helper thread in between.
//!
//! Three things keep the common calls off the socket round trip:
//! * a `get` of an object this client already pins is answered locally;
//! * releases are one-way messages;
//! * small puts (up to the store's `max_leased_size`) go into blocks the
//!   store leased to this client in batches, and are sealed with a one-way
//!   message. Such puts are only for fresh ids ([`ObjectId::random`]): an id
//!   collision cannot be reported back, and is logged by the store.

use crate::arena::Mapping;
use crate::error::{
    unexpected, BuildError, ConnectionError, CreateError, DeleteError, GetError, GetValueError,
    PutError, SealError,
};
use crate::protocol::{
    self, FrameError, Hello, Reply, ReplyFrame, Request, RequestFrame, StoreStats, WireError,
    HEADER_LEN, PROTOCOL_VERSION,
};
use crate::view::{ObjectBuf, ObjectView};
use crate::{ClientId, ObjectId};
use parking_lot::{Condvar, Mutex};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::{BufReader, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Number of small-object size classes (64 B to 256 KiB, powers of two).
const CLASSES: usize = 13;

/// Smallest leased block.
const MIN_CLASS: u64 = 64;

/// A connection to a store; see the module docs.
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("client_id", &self.inner.hello.client_id)
            .field("store_pid", &self.inner.hello.store_pid)
            .finish()
    }
}

pub(crate) struct ClientInner {
    writer: Mutex<UnixStream>,
    reader: Mutex<BufReader<UnixStream>>,
    replies: Mutex<Replies>,
    replied: Condvar,
    next_seq: AtomicU64,
    pub(crate) mapping: Mapping,
    _memfd: OwnedFd,
    hello: Hello,
    pins: Mutex<HashMap<ObjectId, LocalPin>>,
    leases: Mutex<[Vec<u64>; CLASSES]>,
}

#[derive(Default)]
struct Replies {
    ready: HashMap<u64, Result<Reply, WireError>>,
    reading: bool,
    dead: Option<ConnectionError>,
}

#[derive(Clone, Copy)]
struct LocalPin {
    offset: u64,
    size: u64,
    count: u64,
    /// The store's pin was lent to this client, so the last view releases
    /// it with [`Request::ReleaseLent`].
    lent: bool,
}

impl StoreClient {
    /// Connects to the store listening on `socket` and maps its arena.
    ///
    /// Nothing is populated at connect: each region is mapped in when this
    /// process first uses it.
    pub fn connect(socket: impl AsRef<Path>) -> Result<StoreClient, ConnectionError> {
        let path = socket.as_ref();
        let stream = crate::socket_path::SocketPath::new(path)
            .and_then(|short| UnixStream::connect(short.as_path()))
            .map_err(|e| ConnectionError::Connect {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let (hello, memfd) = receive_hello(&stream)?;
        if hello.version != PROTOCOL_VERSION {
            return Err(ConnectionError::VersionMismatch {
                store: hello.version,
                client: PROTOCOL_VERSION,
            });
        }
        let memfd_len = rustix::fs::fstat(&memfd)
            .map_err(|e| ConnectionError::Handshake(format!("cannot stat the arena: {e}")))?
            .st_size;
        if u64::try_from(memfd_len).ok() != Some(hello.arena_len) {
            return Err(ConnectionError::Handshake(format!(
                "arena is {memfd_len} bytes, the store announced {}",
                hello.arena_len
            )));
        }
        let mapping = Mapping::new(std::os::fd::AsFd::as_fd(&memfd), hello.arena_len)?;
        let read_half = stream
            .try_clone()
            .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
        Ok(StoreClient {
            inner: Arc::new(ClientInner {
                writer: Mutex::new(stream),
                reader: Mutex::new(BufReader::with_capacity(64 << 10, read_half)),
                replies: Mutex::new(Replies::default()),
                replied: Condvar::new(),
                next_seq: AtomicU64::new(1),
                mapping,
                _memfd: memfd,
                hello,
                pins: Mutex::new(HashMap::new()),
                leases: Mutex::new(Default::default()),
            }),
        })
    }

    pub(crate) fn inner(&self) -> &Arc<ClientInner> {
        &self.inner
    }

    /// The id the store gave this connection.
    pub fn client_id(&self) -> ClientId {
        self.inner.hello.client_id
    }

    /// Process id of the store.
    pub fn store_pid(&self) -> u32 {
        self.inner.hello.store_pid
    }

    /// Size of the arena in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.hello.arena_len
    }

    /// Address range of this process's mapping of the arena. Every buffer and
    /// view this client hands out lies inside it.
    pub fn arena_range(&self) -> std::ops::Range<usize> {
        let base = self.inner.mapping.base() as usize;
        base..base + self.inner.mapping.len() as usize
    }

    /// Allocates an object of `size` bytes to be written in place, then
    /// [sealed](ObjectBuf::seal). Dropping the buffer unsealed aborts it.
    ///
    /// Under memory pressure the store first evicts unpinned evictable
    /// objects, then spills unpinned primary objects, and only then answers
    /// [`CreateError::StoreFull`].
    pub fn create(&self, id: ObjectId, size: u64) -> Result<ObjectBuf, CreateError> {
        self.create_with(id, size, false)
    }

    /// Like [`create`](Self::create), for a secondary copy the store may
    /// drop under memory pressure instead of spilling it.
    pub fn create_evictable(&self, id: ObjectId, size: u64) -> Result<ObjectBuf, CreateError> {
        self.create_with(id, size, true)
    }

    fn create_with(
        &self,
        id: ObjectId,
        size: u64,
        evictable: bool,
    ) -> Result<ObjectBuf, CreateError> {
        let reply = self.inner.call(Request::Create {
            id,
            size,
            evictable,
        })?;
        match reply? {
            Reply::Created { offset } => {
                self.inner.check_range(offset, size)?;
                self.inner.mapping.populate(offset, size);
                Ok(ObjectBuf::new(Arc::clone(&self.inner), id, offset, size))
            }
            other => Err(unexpected_reply(other).into()),
        }
    }

    /// Copies `data` into a new object with a fresh id, seals it and returns
    /// a view holding one pin.
    pub fn put(&self, data: &[u8]) -> Result<ObjectView, PutError> {
        let id = ObjectId::random();
        let len = data.len() as u64;
        if len > 0 && len <= self.inner.hello.max_leased_size {
            return self.put_leased(id, data);
        }
        let mut buf = self.create(id, len)?;
        buf.as_mut_slice().copy_from_slice(data);
        Ok(buf.seal()?)
    }

    /// [`StoreClient::put`] under an id the caller made fresh (random in at
    /// least 96 of its bits, such as a job tag followed by random bytes).
    /// Small objects take the same leased, one-way path as `put`, where an
    /// id collision could not be reported; a reused id is the caller's bug.
    pub fn put_with_fresh_id(&self, id: ObjectId, data: &[u8]) -> Result<ObjectView, PutError> {
        let len = data.len() as u64;
        if len > 0 && len <= self.inner.hello.max_leased_size {
            return self.put_leased(id, data);
        }
        let mut buf = self.create(id, len)?;
        buf.as_mut_slice().copy_from_slice(data);
        Ok(buf.seal()?)
    }

    /// Puts a slice of plain-old-data values; read it back zero-copy with
    /// [`ObjectView::as_slice`].
    pub fn put_array<T: bytemuck::Pod>(&self, values: &[T]) -> Result<ObjectView, PutError> {
        self.put(bytemuck::cast_slice(values))
    }

    /// Encodes `value` with the [`codec`](crate::codec) straight into a new
    /// object.
    pub fn put_value<T: serde::Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<ObjectView, PutError> {
        let len = crate::codec::encoded_len(value).map_err(|e| PutError::Encode(e.to_string()))?;
        let id = ObjectId::random();
        let mut buf = self.create(id, len)?;
        crate::codec::encode_into(value, buf.as_mut_slice())
            .map_err(|e| PutError::Encode(e.to_string()))?;
        Ok(buf.seal()?)
    }

    fn put_leased(&self, id: ObjectId, data: &[u8]) -> Result<ObjectView, PutError> {
        let copy = |dst: &mut [u8]| {
            dst.copy_from_slice(data);
            Ok::<(), std::convert::Infallible>(())
        };
        self.build_leased(id, data.len() as u64, copy, None)
            .map_err(|e| match e {
                BuildError::Store(e) => e,
                BuildError::Fill(never) => match never {},
                // Nothing is lent here.
                BuildError::Lend(e) => ConnectionError::Protocol(e.to_string()).into(),
            })
    }

    /// Builds an object of `size` bytes in place under an id the caller
    /// made fresh (random in at least 96 of its bits, as for
    /// [`put_with_fresh_id`](Self::put_with_fresh_id)): `fill` writes it,
    /// then it is sealed and a view holding one pin is returned. An object
    /// of up to the store's leased size is written into a block leased to
    /// this client and sealed with a one-way message, so it costs no round
    /// trip to the store; a larger one is created and sealed by calls. If
    /// `fill` fails, nothing is stored and its error is returned.
    pub fn build_with_fresh_id<E>(
        &self,
        id: ObjectId,
        size: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<ObjectView, BuildError<E>> {
        if size > 0 && size <= self.inner.hello.max_leased_size {
            return self.build_leased(id, size, fill, None);
        }
        let mut buf = self.create(id, size).map_err(PutError::from)?;
        fill(buf.as_mut_slice()).map_err(BuildError::Fill)?;
        Ok(buf.seal().map_err(PutError::from)?)
    }

    /// Whether an object of `size` bytes goes into a leased block.
    pub(crate) fn fits_lease(&self, size: u64) -> bool {
        size > 0 && size <= self.inner.hello.max_leased_size
    }

    /// Builds an object in a block leased to this client and seals it with
    /// a one-way message, lending a pin to `lend_to` in the same message.
    pub(crate) fn build_leased<E>(
        &self,
        id: ObjectId,
        size: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
        lend_to: Option<ClientId>,
    ) -> Result<ObjectView, BuildError<E>> {
        let class = size.next_power_of_two().max(MIN_CLASS);
        let offset = self.take_leased_block(class).map_err(PutError::from)?;
        self.inner.mapping.populate(offset, size);
        // SAFETY: the block at `offset` is leased to this client alone and
        // has not been handed to the store as an object yet, so nothing else
        // reads or writes it; `check_range` validated it lies in the arena.
        let dst = unsafe { self.inner.slice_mut(offset, size) };
        if let Err(e) = fill(dst) {
            // Still leased to this client and still no object: back to the
            // free blocks, whatever `fill` left in it.
            let index = (class.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize;
            self.inner.leases.lock()[index].push(offset);
            return Err(BuildError::Fill(e));
        }
        self.inner
            .send_oneway(Request::PutLeased {
                id,
                offset,
                size,
                lend_to,
            })
            .map_err(PutError::from)?;
        self.inner.pins.lock().insert(
            id,
            LocalPin {
                offset,
                size,
                count: 1,
                lent: false,
            },
        );
        Ok(ObjectView::new(Arc::clone(&self.inner), id, offset, size))
    }

    fn take_leased_block(&self, class: u64) -> Result<u64, CreateError> {
        let index = (class.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize;
        if let Some(offset) = self.inner.leases.lock()[index].pop() {
            return Ok(offset);
        }
        let reply = self.inner.call(Request::Lease {
            class,
            count: u32::MAX,
        })?;
        let mut offsets = match reply? {
            Reply::Leased { offsets } if !offsets.is_empty() => offsets,
            other => return Err(unexpected_reply(other).into()),
        };
        for &offset in &offsets {
            self.inner.check_range(offset, class)?;
        }
        offsets.sort_unstable_by(|a, b| b.cmp(a));
        let first = offsets.pop().unwrap_or_default();
        self.inner.leases.lock()[index].extend(offsets);
        Ok(first)
    }

    /// Pins a sealed object and returns a zero-copy view of it, waiting up to
    /// `timeout` for it to be created and sealed.
    ///
    /// A spilled object is restored transparently. An object this client
    /// already pins is answered without asking the store.
    pub fn get(&self, id: ObjectId, timeout: Duration) -> Result<ObjectView, GetError> {
        if let Some(view) = self.local_get(id) {
            return Ok(view);
        }
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let reply = self.inner.call(Request::Get { id, timeout_ms })?;
        let (offset, size) = match reply? {
            Reply::Object { offset, size } => (offset, size),
            other => return Err(unexpected_reply(other).into()),
        };
        self.inner.check_range(offset, size)?;
        let duplicate = {
            let mut pins = self.inner.pins.lock();
            match pins.entry(id) {
                Entry::Occupied(mut pin) => {
                    pin.get_mut().count += 1;
                    true
                }
                Entry::Vacant(slot) => {
                    slot.insert(LocalPin {
                        offset,
                        size,
                        count: 1,
                        lent: false,
                    });
                    false
                }
            }
        };
        if duplicate {
            let _ = self.inner.send_oneway(Request::Release { id });
        }
        self.inner.mapping.populate(offset, size);
        Ok(ObjectView::new(Arc::clone(&self.inner), id, offset, size))
    }

    fn local_get(&self, id: ObjectId) -> Option<ObjectView> {
        let mut pins = self.inner.pins.lock();
        let pin = pins.get_mut(&id)?;
        pin.count += 1;
        let pin = *pin;
        drop(pins);
        Some(ObjectView::new(
            Arc::clone(&self.inner),
            id,
            pin.offset,
            pin.size,
        ))
    }

    /// Gets an object written with [`put_value`](Self::put_value) and decodes
    /// it.
    pub fn get_value<T: serde::de::DeserializeOwned>(
        &self,
        id: ObjectId,
        timeout: Duration,
    ) -> Result<T, GetValueError> {
        let view = self.get(id, timeout)?;
        crate::codec::decode(view.as_bytes()).map_err(|e| GetValueError::Decode {
            id,
            reason: e.to_string(),
        })
    }

    /// Deletes an object. Its memory is freed at once if no client pins it,
    /// otherwise when the last pin is released; a spilled copy is removed.
    pub fn delete(&self, id: ObjectId) -> Result<(), DeleteError> {
        match self.inner.call(Request::Delete { id })?? {
            Reply::Deleted => Ok(()),
            other => Err(unexpected_reply(other).into()),
        }
    }

    /// Whether a sealed object with this id exists, in memory or spilled.
    pub fn contains(&self, id: ObjectId) -> Result<bool, ConnectionError> {
        match self.inner.call(Request::Contains { id })? {
            Ok(Reply::Contains(found)) => Ok(found),
            Ok(other) => Err(unexpected_reply(other)),
            Err(e) => Err(unexpected(e)),
        }
    }

    /// The store's counters.
    pub fn stats(&self) -> Result<StoreStats, ConnectionError> {
        match self.inner.call(Request::Stats)? {
            Ok(Reply::Stats(stats)) => Ok(stats),
            Ok(other) => Err(unexpected_reply(other)),
            Err(e) => Err(unexpected(e)),
        }
    }

    /// Number of objects this client pins (each counted once, however many
    /// views share the pin).
    pub fn pinned_objects(&self) -> usize {
        self.inner.pins.lock().len()
    }
}

fn unexpected_reply(reply: Reply) -> ConnectionError {
    ConnectionError::Protocol(format!("unexpected reply from the store: {reply:?}"))
}

fn receive_hello(stream: &UnixStream) -> Result<(Hello, OwnedFd), ConnectionError> {
    let mut buf = vec![0u8; protocol::MAX_FRAME as usize + HEADER_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| ConnectionError::Handshake(format!("cannot receive the greeting: {e}")))?;
    let mut memfd = None;
    for message in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = message {
            for fd in fds {
                memfd.get_or_insert(fd);
            }
        }
    }
    let memfd =
        memfd.ok_or_else(|| ConnectionError::Handshake("no arena descriptor received".into()))?;
    let mut got = received.bytes;
    if got < HEADER_LEN {
        return Err(ConnectionError::Handshake(format!(
            "greeting of {got} bytes is truncated"
        )));
    }
    let header = [buf[0], buf[1], buf[2], buf[3]];
    let len = protocol::body_len(header).map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    if got < HEADER_LEN + len {
        let mut rest = stream;
        std::io::Read::read_exact(&mut rest, &mut buf[got..HEADER_LEN + len])
            .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
        got = HEADER_LEN + len;
    }
    if got != HEADER_LEN + len {
        return Err(ConnectionError::Handshake(
            "unexpected bytes after the greeting".into(),
        ));
    }
    let hello: Hello = protocol::decode_body(&buf[HEADER_LEN..HEADER_LEN + len])
        .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    Ok((hello, memfd))
}

impl ClientInner {
    fn send(&self, seq: u64, body: Request) -> Result<(), ConnectionError> {
        if let Some(dead) = &self.replies.lock().dead {
            return Err(dead.clone());
        }
        let frame = protocol::encode_frame(&RequestFrame { seq, body })
            .map_err(|e| ConnectionError::Protocol(e.to_string()))?;
        self.writer
            .lock()
            .write_all(&frame)
            .map_err(|e| ConnectionError::Disconnected(e.to_string()))
    }

    /// Sends a request that gets no reply.
    pub(crate) fn send_oneway(&self, body: Request) -> Result<(), ConnectionError> {
        self.send(0, body)
    }

    /// Sends a request and waits for its reply.
    fn call(&self, body: Request) -> Result<Result<Reply, WireError>, ConnectionError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.send(seq, body)?;
        self.wait_reply(seq)
    }

    pub(crate) fn call_seal(
        &self,
        id: ObjectId,
        offset: u64,
        size: u64,
        lend_to: Option<ClientId>,
    ) -> Result<(), SealError> {
        match self.call(Request::Seal { id, lend_to })?? {
            Reply::Sealed => {
                self.pins.lock().insert(
                    id,
                    LocalPin {
                        offset,
                        size,
                        count: 1,
                        lent: false,
                    },
                );
                Ok(())
            }
            other => Err(unexpected_reply(other).into()),
        }
    }

    fn wait_reply(&self, seq: u64) -> Result<Result<Reply, WireError>, ConnectionError> {
        let mut replies = self.replies.lock();
        loop {
            if let Some(reply) = replies.ready.remove(&seq) {
                return Ok(reply);
            }
            if let Some(dead) = &replies.dead {
                return Err(dead.clone());
            }
            if replies.reading {
                self.replied.wait(&mut replies);
                continue;
            }
            replies.reading = true;
            drop(replies);
            let mut scratch = Vec::new();
            let frame = protocol::read_frame::<ReplyFrame>(&mut *self.reader.lock(), &mut scratch);
            replies = self.replies.lock();
            replies.reading = false;
            match frame {
                Ok(ReplyFrame { seq: 0, body }) => {
                    let reason = match body {
                        Err(e) => e.to_string(),
                        Ok(reply) => format!("reply without a request: {reply:?}"),
                    };
                    replies.dead = Some(ConnectionError::Protocol(reason));
                }
                Ok(ReplyFrame { seq, body }) => {
                    replies.ready.insert(seq, body);
                }
                Err(FrameError::Closed) => {
                    replies.dead = Some(ConnectionError::Disconnected(
                        "the store closed the connection".into(),
                    ));
                }
                Err(e) => replies.dead = Some(ConnectionError::Disconnected(e.to_string())),
            }
            self.replied.notify_all();
        }
    }

    /// Counts one more local reference to an object this process pins.
    pub(crate) fn add_local_pin(&self, id: ObjectId) {
        if let Some(pin) = self.pins.lock().get_mut(&id) {
            pin.count += 1;
        }
    }

    /// Drops one local reference; the last one releases the store's pin.
    pub(crate) fn unpin(&self, id: ObjectId) {
        let mut pins = self.pins.lock();
        let Some(pin) = pins.get_mut(&id) else {
            return;
        };
        pin.count -= 1;
        if pin.count == 0 {
            let lent = pin.lent;
            pins.remove(&id);
            drop(pins);
            let release = if lent {
                Request::ReleaseLent { id }
            } else {
                Request::Release { id }
            };
            let _ = self.send_oneway(release);
        }
    }

    /// Which arena this client mapped (see [`Hello::arena_id`]).
    pub(crate) fn arena_id(&self) -> u64 {
        self.hello.arena_id
    }

    /// This connection's id.
    pub(crate) fn client_id(&self) -> ClientId {
        self.hello.client_id
    }

    /// Counts a pin lent to this client (one-way, by its lender) on the
    /// object at `[offset, offset + size)`: a first view holds it, and if
    /// this process pins the object already, the lent pin is handed back.
    pub(crate) fn adopt_lent(
        &self,
        id: ObjectId,
        offset: u64,
        size: u64,
    ) -> Result<(), ConnectionError> {
        self.check_range(offset, size)?;
        let mut pins = self.pins.lock();
        match pins.entry(id) {
            Entry::Occupied(mut pin) => {
                pin.get_mut().count += 1;
                drop(pins);
                self.send_oneway(Request::ReleaseLent { id })
            }
            Entry::Vacant(slot) => {
                slot.insert(LocalPin {
                    offset,
                    size,
                    count: 1,
                    lent: true,
                });
                Ok(())
            }
        }
    }

    /// The bounds of a view this process holds on `id`, if any.
    pub(crate) fn pinned_range(&self, id: ObjectId) -> Option<(u64, u64)> {
        self.pins.lock().get(&id).map(|p| (p.offset, p.size))
    }

    fn check_range(&self, offset: u64, size: u64) -> Result<(), ConnectionError> {
        if self.mapping.in_bounds(offset, size) {
            Ok(())
        } else {
            Err(ConnectionError::Protocol(format!(
                "the store named bytes {offset}..+{size}, outside the {}-byte arena",
                self.mapping.len()
            )))
        }
    }

    /// # Safety
    /// The range must be in bounds and nothing may write it while the slice
    /// lives.
    pub(crate) unsafe fn slice(&self, offset: u64, len: u64) -> &[u8] {
        // SAFETY: forwarded to the caller.
        unsafe {
            std::slice::from_raw_parts(self.mapping.base().add(offset as usize), len as usize)
        }
    }

    /// # Safety
    /// The range must be in bounds and nothing else may read or write it
    /// while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        // SAFETY: forwarded to the caller.
        unsafe {
            std::slice::from_raw_parts_mut(self.mapping.base().add(offset as usize), len as usize)
        }
    }
}
