//! A multiplexed, bidirectional connection: either side sends requests
//! (answered by sequence number) and one-way messages. Writes from many
//! tasks are batched into one `write` per wake-up; a reader task dispatches
//! replies to their waiters and everything else to a [`Handler`].

use super::messages::{Body, Frame, Message, Reply};
use super::ring::{self, RingPair};
use super::{handshake_timeout, HELLO_MAX_FRAME, MAX_FRAME};
use crate::error::{Error, Result};
use braid_store::codec;
use parking_lot::Mutex;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

/// Which transport a connection runs over (see [`super::transport`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Transport {
    /// A Unix socket: both ends on one machine, so the connection may move
    /// onto shared-memory rings.
    Local,
    /// TCP: the ends may be on different machines.
    Tcp,
}

/// What a connection does with what the other side sends.
pub trait Handler: Send + Sync + 'static {
    /// A request; answer it through `responder` (now or later).
    fn on_request(&self, conn: &Conn, message: Message, responder: Responder);
    /// A one-way message.
    fn on_message(&self, conn: &Conn, message: Message);
    /// The connection closed (the peer exited, or it was closed here).
    fn on_close(&self, _conn: &Conn) {}
}

/// A handler that refuses everything: for connections that only send.
pub struct NoHandler;

impl Handler for NoHandler {
    fn on_request(&self, _conn: &Conn, message: Message, responder: Responder) {
        responder.respond(Err(Error::BadRequest(format!(
            "this peer serves no requests, got {}",
            message_name(&message)
        ))));
    }
    fn on_message(&self, _conn: &Conn, _message: Message) {}
}

/// Answers one request.
pub struct Responder {
    conn: Conn,
    seq: u64,
}

impl Responder {
    /// Sends the answer.
    pub fn respond(self, reply: Result<Reply>) {
        self.conn.send_frame(&Frame {
            seq: self.seq,
            body: Body::Reply(reply),
        });
    }

    /// The connection the request came on.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }
}

/// Requests awaiting replies, by sequence number, with where each began in
/// the ring (if the ring carried it).
type Pending = Mutex<HashMap<u64, (oneshot::Sender<Result<Reply>>, Option<u64>)>>;

/// The message of the error a request gets when its connection closed
/// before the peer read it ([`never_read`]).
const NEVER_READ: &str = "connection closed before the peer read the request";

/// Whether `error` says the request's connection closed before the peer
/// read it from the ring: the peer cannot have acted on it, so sending it
/// again elsewhere runs it at most once.
pub(crate) fn never_read(error: &Error) -> bool {
    matches!(error, Error::Unreachable { message, .. } if message == NEVER_READ)
}

/// Where a frame went.
enum Sent {
    /// Into the ring, starting at this position.
    Ring(u64),
    /// Onto the socket.
    Socket,
    /// Nowhere: the connection is closed.
    Closed,
}

struct Inner {
    id: u64,
    peer: String,
    transport: Transport,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    next_seq: AtomicU64,
    closed: AtomicBool,
    /// The peer ended the connection (its socket reached end of stream).
    closed_by_peer: AtomicBool,
    authenticated: AtomicBool,
    closed_notify: tokio::sync::Notify,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    handler: Mutex<Option<Arc<dyn Handler>>>,
    ring: OnceLock<Arc<RingLink>>,
}

/// Which end of a connection a ring belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RingEnd {
    /// This process dialed: it made the rings and sends requests.
    Dialed,
    /// This process accepted: it serves requests, and runs them on the
    /// ring's reader thread when they allow it.
    Accepted,
}

/// A connection's shared-memory transport, once both ends mapped it.
struct RingLink {
    pair: RingPair,
    end: RingEnd,
    /// Whether frames this end sends go through the ring rather than the
    /// socket. The dialing end switches only once the peer has mapped it.
    sending: AtomicBool,
    /// Set when the peer refused the ring: its reader thread exits.
    abandoned: AtomicBool,
    producer: Mutex<Producer>,
    consumer: Mutex<Vec<u8>>,
}

/// Frames that did not fit in the ring wait here, in order, for a flusher
/// thread that writes them as space frees.
#[derive(Default)]
struct Producer {
    overflow: VecDeque<Vec<u8>>,
    flushing: bool,
    /// The ring position after every byte taken so far (written or queued).
    end: u64,
}

/// How long the accepting end's reader keeps polling after its last frame
/// before it sleeps: long enough to catch a caller's next synchronous call.
const SERVE_SPIN: Duration = Duration::from_micros(60);
/// How long a lone request polls for its reply before it parks.
const CALL_SPIN: Duration = Duration::from_micros(100);

thread_local! {
    static SERVING_RING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is the reader of an accepted connection's ring,
/// where a request may run to completion before the next one is read.
pub fn on_serving_ring_thread() -> bool {
    SERVING_RING.with(Cell::get)
}

/// One connection. Cheap to clone; closes when [`Conn::close`] is called or
/// the peer goes away.
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn#{}({})", self.inner.id, self.inner.peer)
    }
}

/// Encodes `frame` as it goes on the wire: its body's length (`u32`
/// little-endian) and the body, `frame` in the store's
/// [`codec`]. Bodies over [`MAX_FRAME`] are refused.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    codec::encode_append(frame, &mut buf)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(Error::BadRequest(format!(
            "message of {len} bytes exceeds the {MAX_FRAME}-byte frame limit"
        )));
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// A short name of a message, for logs and errors.
pub fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "Hello",
        Message::RegisterJob(_) => "RegisterJob",
        Message::RequestLease(_) => "RequestLease",
        Message::ReturnLease { .. } => "ReturnLease",
        Message::PullObject { .. } => "PullObject",
        Message::FreeObjects(_) => "FreeObjects",
        Message::Log { .. } => "Log",
        Message::Metrics(_) => "Metrics",
        Message::Spans(_) => "Spans",
        Message::PushTask(_) => "PushTask",
        Message::CreateActor(_) => "CreateActor",
        Message::CallActor(_) => "CallActor",
        Message::Cancel(_) => "Cancel",
        Message::CancelForce(_) => "CancelForce",
        Message::GetObject(_) => "GetObject",
        Message::AddBorrower { .. } => "AddBorrower",
        Message::RemoveBorrower { .. } => "RemoveBorrower",
        Message::AddLocation { .. } => "AddLocation",
        Message::Exit => "Exit",
        Message::NodeDied(_) => "NodeDied",
        Message::WorkerReady => "WorkerReady",
        Message::NodeInfo => "NodeInfo",
        Message::OpenRing { .. } => "OpenRing",
    }
}

impl Conn {
    /// Serves a stream this process connected (its peer is trusted to
    /// speak first only in answer): spawns its reader and writer on the
    /// current runtime.
    pub fn start<S>(
        stream: S,
        transport: Transport,
        peer: String,
        handler: Arc<dyn Handler>,
    ) -> Conn
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Conn::spawn(stream, transport, peer, handler, None)
    }

    /// Serves a stream this process accepted: until the peer's `Hello` is
    /// accepted ([`Conn::set_authenticated`]), its frames are capped at
    /// [`HELLO_MAX_FRAME`], and if that does not happen within
    /// [`handshake_timeout`] the connection is closed.
    pub fn accept<S>(
        stream: S,
        transport: Transport,
        peer: String,
        handler: Arc<dyn Handler>,
    ) -> Conn
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let deadline = tokio::time::Instant::now() + handshake_timeout();
        Conn::spawn(stream, transport, peer, handler, Some(deadline))
    }

    fn spawn<S>(
        stream: S,
        transport: Transport,
        peer: String,
        handler: Arc<dyn Handler>,
        handshake: Option<tokio::time::Instant>,
    ) -> Conn
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let (read, write) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Conn {
            inner: Arc::new(Inner {
                id: IDS.fetch_add(1, Ordering::Relaxed),
                peer,
                transport,
                tx,
                pending: Mutex::new(HashMap::new()),
                next_seq: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                closed_by_peer: AtomicBool::new(false),
                authenticated: AtomicBool::new(false),
                closed_notify: tokio::sync::Notify::new(),
                tasks: Mutex::new(Vec::new()),
                handler: Mutex::new(Some(handler.clone())),
                ring: OnceLock::new(),
            }),
        };
        let writer = tokio::spawn(write_loop(write, rx));
        let reader_conn = conn.clone();
        let reader = tokio::spawn(async move {
            let result = read_loop(read, &reader_conn, handler.as_ref(), handshake).await;
            match result {
                Ok(()) => reader_conn
                    .inner
                    .closed_by_peer
                    .store(true, Ordering::Release),
                Err(e) => {
                    tracing::debug!(conn = ?reader_conn, "connection ended: {e}");
                    reader_conn.close_after_flush();
                }
            }
            reader_conn.drain_ring_at_end();
            reader_conn.finish();
        });
        conn.inner
            .tasks
            .lock()
            .extend([writer.abort_handle(), reader.abort_handle()]);
        conn
    }

    /// The transport the connection runs over.
    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// Marks the peer as authenticated: its hello carried the cluster
    /// token (or this side opened the connection). Until then only a
    /// `Hello` request is handed to the handler; anything else is refused.
    pub fn set_authenticated(&self) {
        self.inner.authenticated.store(true, Ordering::Release);
    }

    /// Whether the peer has authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.inner.authenticated.load(Ordering::Acquire)
    }

    /// A number unique to this connection within the process.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Waits until the connection closes.
    pub async fn closed(&self) {
        loop {
            let notified = self.inner.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Closes the connection; pending requests fail, and the handler hears
    /// of it as if the peer had gone.
    pub fn close(&self) {
        for task in self.inner.tasks.lock().drain(..) {
            task.abort();
        }
        self.finish();
    }

    /// Closes the connection once what was sent before is written (the
    /// peer sees the last reply, then end of stream).
    pub fn close_after_flush(&self) {
        let _ = self.inner.tx.send(Vec::new());
    }

    /// The peer's socket ended: whatever it wrote into the ring before it
    /// went is delivered before pending requests fail, as a socket's last
    /// bytes would be. (On the accepting end the reader may be running a
    /// call, and a dead caller's last frames need no answer.)
    fn drain_ring_at_end(&self) {
        let Some(link) = self.inner.ring.get() else {
            return;
        };
        if link.end != RingEnd::Dialed || self.is_closed() {
            return;
        }
        let Some(handler) = self.inner.handler.lock().clone() else {
            return;
        };
        let mut buf = link.consumer.lock();
        if let Err(e) = drain_ring(self, link, &mut buf, handler.as_ref()) {
            tracing::debug!(conn = ?self, "ring failed at close: {e}");
        }
    }

    fn finish(&self) {
        self.mark_closed();
        let handler = self.inner.handler.lock().take();
        if let Some(handler) = handler {
            handler.on_close(self);
        }
    }

    fn mark_closed(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(link) = self.inner.ring.get() {
            link.pair.wake_reader();
        }
        // What the peer read of the ring, if it ended the connection (a
        // connection closed here may still be read).
        let consumed = self
            .inner
            .ring
            .get()
            .filter(|_| self.inner.closed_by_peer.load(Ordering::Acquire))
            .map(|link| link.pair.consumed());
        let pending: Vec<_> = self.inner.pending.lock().drain().collect();
        for (_, (waiter, start)) in pending {
            let unread = matches!((consumed, start), (Some(read), Some(start)) if read <= start);
            let message = if unread {
                NEVER_READ
            } else {
                "connection closed"
            };
            let _ = waiter.send(Err(self.unreachable(message)));
        }
        self.inner.closed_notify.notify_waiters();
    }

    fn unreachable(&self, message: &str) -> Error {
        Error::Unreachable {
            address: self.inner.peer.clone(),
            message: message.to_string(),
        }
    }

    /// Queues an encoded frame on the ring when it carries this end's
    /// frames, else on the socket. False if the connection is closed.
    fn send_bytes(&self, buf: Vec<u8>) -> bool {
        !matches!(self.send_tracked(buf), Sent::Closed)
    }

    /// [`send_bytes`](Self::send_bytes), saying where the frame went.
    fn send_tracked(&self, buf: Vec<u8>) -> Sent {
        if let Some(link) = self.inner.ring.get() {
            if link.sending.load(Ordering::Acquire) {
                return link.send(self, buf).map_or(Sent::Closed, Sent::Ring);
            }
        }
        match self.inner.tx.send(buf) {
            Ok(()) => Sent::Socket,
            Err(_) => Sent::Closed,
        }
    }

    fn send_frame(&self, frame: &Frame) {
        match encode_frame(frame) {
            Ok(buf) => {
                self.send_bytes(buf);
            }
            Err(e) => {
                if let Body::Reply(_) = frame.body {
                    if let Ok(buf) = encode_frame(&Frame {
                        seq: frame.seq,
                        body: Body::Reply(Err(e)),
                    }) {
                        self.send_bytes(buf);
                    }
                } else {
                    tracing::warn!("dropping a message that cannot be encoded: {e}");
                }
            }
        }
    }

    /// Sends a one-way message.
    pub fn send(&self, message: Message) {
        self.send_frame(&Frame {
            seq: 0,
            body: Body::OneWay(message),
        });
    }

    /// Sends a request and returns a future of its reply. The request is
    /// on the wire (in order with everything else sent from this
    /// connection) before this returns.
    pub fn request(&self, message: Message) -> RequestFuture {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let early = match encode_frame(&Frame {
            seq,
            body: Body::Request(message),
        }) {
            Err(e) => Some(e),
            Ok(buf) => {
                // Registered before it is sent (the reply may come at once),
                // with its ring position once known; the ring's producer
                // lock orders positions as frames go in.
                self.inner.pending.lock().insert(seq, (tx, None));
                let sent = if self.is_closed() {
                    Sent::Closed
                } else {
                    self.send_tracked(buf)
                };
                match sent {
                    // Never sent, so never read: the caller may send it
                    // again elsewhere (to a restarted actor, say).
                    Sent::Closed => {
                        self.inner.pending.lock().remove(&seq);
                        Some(self.unreachable(NEVER_READ))
                    }
                    Sent::Ring(start) => {
                        if let Some((_, at)) = self.inner.pending.lock().get_mut(&seq) {
                            *at = Some(start);
                        }
                        None
                    }
                    Sent::Socket => None,
                }
            }
        };
        RequestFuture {
            conn: self.clone(),
            early,
            rx,
            polled: false,
        }
    }

    /// Moves this connection's frames onto a shared-memory ring pair (the
    /// dialing end; the peer must be a process on this machine run by the
    /// same user). The socket stays open as the liveness signal. On error
    /// the connection keeps working over the socket.
    pub async fn open_ring(&self) -> Result<()> {
        if self.transport() != Transport::Local {
            return Err(Error::BadRequest(
                "rings join processes on one machine, not a TCP connection".into(),
            ));
        }
        let (pair, fd) = RingPair::create()?;
        let link = Arc::new(RingLink::new(pair, RingEnd::Dialed));
        if self.inner.ring.set(link.clone()).is_err() {
            return Ok(());
        }
        self.start_ring_reader(link.clone())?;
        let reply = self
            .request(Message::OpenRing {
                pid: std::process::id(),
                fd: ring::raw_fd(&fd),
            })
            .await;
        drop(fd);
        let refused = match reply {
            Ok(Reply::Ok) => {
                link.sending.store(true, Ordering::Release);
                return Ok(());
            }
            Ok(_) => Error::BadRequest("peer answered OpenRing oddly".into()),
            Err(e) => e,
        };
        link.abandoned.store(true, Ordering::Release);
        link.pair.wake_reader();
        Err(refused)
    }

    /// The accepting end of [`Conn::open_ring`]: maps the peer's rings and
    /// sends everything after this through them.
    fn accept_ring(&self, pid: u32, fd: i32) -> Result<()> {
        if self.transport() != Transport::Local {
            return Err(Error::BadRequest(
                "a ring is opened over a Unix socket only: the peer is on another machine".into(),
            ));
        }
        let pair = RingPair::open(pid, fd)?;
        let link = Arc::new(RingLink::new(pair, RingEnd::Accepted));
        link.sending.store(true, Ordering::Release);
        self.inner
            .ring
            .set(link.clone())
            .map_err(|_| Error::BadRequest("this connection already has a ring".into()))?;
        self.start_ring_reader(link)
    }

    fn start_ring_reader(&self, link: Arc<RingLink>) -> Result<()> {
        let conn = self.clone();
        std::thread::Builder::new()
            .name("braid-ring".into())
            .spawn(move || ring_reader(conn, link))
            .map(|_| ())
            .map_err(|e| Error::io("spawn ring reader", e))
    }

    /// Polls the ring for the reply to the only request in flight, for up
    /// to [`CALL_SPIN`], dispatching whatever else arrives meanwhile.
    fn spin_for_reply(&self, rx: &mut oneshot::Receiver<Result<Reply>>) -> Option<Result<Reply>> {
        let link = self.inner.ring.get()?;
        if !link.sending.load(Ordering::Relaxed) || self.inner.pending.lock().len() != 1 {
            return None;
        }
        let mut consumer = link.consumer.try_lock()?;
        let handler = self.inner.handler.lock().clone()?;
        link.pair.mark_polling();
        let deadline = Instant::now() + CALL_SPIN;
        let mut spins = 0u32;
        let outcome = loop {
            if let Err(e) = drain_ring(self, link, &mut consumer, handler.as_ref()) {
                tracing::debug!(conn = ?self, "ring failed: {e}");
                self.close();
                break None;
            }
            match rx.try_recv() {
                Ok(reply) => break Some(reply),
                Err(oneshot::error::TryRecvError::Closed) => {
                    break Some(Err(self.unreachable("connection closed")))
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if self.is_closed() || Instant::now() > deadline {
                break None;
            }
            spin_pause(&mut spins);
        };
        if link.pair.end_polling().is_err() {
            self.close();
        }
        outcome
    }
}

/// The reply to a [`Conn::request`]. A request that is alone on a ring
/// connection polls the ring itself for a short while before parking, so
/// a synchronous call costs no wake-ups.
#[must_use = "a request's reply is lost unless awaited"]
pub struct RequestFuture {
    conn: Conn,
    early: Option<Error>,
    rx: oneshot::Receiver<Result<Reply>>,
    polled: bool,
}

impl Future for RequestFuture {
    type Output = Result<Reply>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Reply>> {
        let this = &mut *self;
        if let Some(e) = this.early.take() {
            return Poll::Ready(Err(e));
        }
        if !this.polled {
            this.polled = true;
            if let Some(reply) = this.conn.spin_for_reply(&mut this.rx) {
                return Poll::Ready(reply);
            }
        }
        match Pin::new(&mut this.rx).poll(cx) {
            Poll::Ready(Ok(reply)) => Poll::Ready(reply),
            Poll::Ready(Err(_)) => Poll::Ready(Err(this.conn.unreachable("connection closed"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl RingLink {
    fn new(pair: RingPair, end: RingEnd) -> Self {
        RingLink {
            pair,
            end,
            sending: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            producer: Mutex::new(Producer::default()),
            consumer: Mutex::new(Vec::new()),
        }
    }

    /// Writes a frame now if it fits and nothing waits before it; else
    /// queues it for a flusher thread. Returns the ring position the frame
    /// starts at, or `None` if the connection is closed.
    fn send(self: &Arc<Self>, conn: &Conn, buf: Vec<u8>) -> Option<u64> {
        if conn.is_closed() {
            return None;
        }
        let mut producer = self.producer.lock();
        let start = producer.end;
        producer.end += buf.len() as u64;
        if !producer.flushing {
            match self.pair.fits(buf.len()) {
                Ok(true) => {
                    return match self.pair.write_some(&buf) {
                        Ok(_) => Some(start),
                        Err(e) => {
                            drop(producer);
                            tracing::debug!(?conn, "ring failed: {e}");
                            conn.close();
                            None
                        }
                    };
                }
                Ok(false) => {}
                Err(e) => {
                    drop(producer);
                    tracing::debug!(?conn, "ring failed: {e}");
                    conn.close();
                    return None;
                }
            }
        }
        producer.overflow.push_back(buf);
        if !producer.flushing {
            producer.flushing = true;
            let link = self.clone();
            let flusher_conn = conn.clone();
            let spawned = std::thread::Builder::new()
                .name("braid-ring-flush".into())
                .spawn(move || link.flush(&flusher_conn));
            if let Err(e) = spawned {
                producer.overflow.clear();
                producer.flushing = false;
                drop(producer);
                tracing::warn!(?conn, "cannot start a ring flusher: {e}");
                conn.close();
                return None;
            }
        }
        Some(start)
    }

    /// Writes queued frames piece by piece as the peer frees space.
    fn flush(&self, conn: &Conn) {
        loop {
            let next = {
                let mut producer = self.producer.lock();
                match producer.overflow.pop_front() {
                    Some(buf) => buf,
                    None => {
                        producer.flushing = false;
                        return;
                    }
                }
            };
            let mut done = 0;
            while done < next.len() {
                if conn.is_closed() {
                    let mut producer = self.producer.lock();
                    producer.overflow.clear();
                    producer.flushing = false;
                    return;
                }
                match self.pair.write_some(&next[done..]) {
                    Ok(0) => {
                        if self.pair.wait_for_space(Duration::from_millis(50)).is_err() {
                            conn.close();
                        }
                    }
                    Ok(n) => done += n,
                    Err(e) => {
                        tracing::debug!(?conn, "ring failed: {e}");
                        conn.close();
                    }
                }
            }
        }
    }
}

fn spin_pause(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Reads every whole frame waiting in the ring and dispatches it.
fn drain_ring(
    conn: &Conn,
    link: &RingLink,
    buf: &mut Vec<u8>,
    handler: &dyn Handler,
) -> Result<usize> {
    link.pair.read_into(buf)?;
    let mut at = 0;
    let mut frames = 0;
    while let Some(body) = next_frame(&buf[at..])? {
        dispatch(conn, &buf[at..][body.clone()], handler)?;
        at += body.end;
        frames += 1;
    }
    buf.drain(..at);
    if buf.is_empty() && buf.capacity() > 1 << 20 {
        *buf = Vec::new();
    }
    Ok(frames)
}

/// Finds the first whole frame at the start of `bytes` (frames as a
/// producer wrote them into a ring, one after another): the range of its
/// body, `None` if the frame is not complete yet, an error if its length
/// exceeds [`MAX_FRAME`]. The frame ends where the body does.
pub fn next_frame(bytes: &[u8]) -> Result<Option<Range<usize>>> {
    let Some((header, rest)) = bytes.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*header) as usize;
    if len > MAX_FRAME {
        return Err(Error::BadRequest(format!("frame of {len} bytes")));
    }
    Ok((rest.len() >= len).then_some(4..4 + len))
}

/// Decodes one frame's body, as read off a socket or a ring. Any bytes
/// that are not exactly one [`Frame`] (trailing bytes included) are an
/// error, whatever the peer sent.
pub fn decode_frame(body: &[u8]) -> Result<Frame> {
    codec::decode_bounded(body, MAX_FRAME as u64)
        .map_err(|e| Error::BadRequest(format!("malformed frame: {e}")))
}

/// The thread that reads a ring connection's inbound frames: it polls
/// for a while after each one (on the accepting end), then sleeps on the
/// ring's futex until the peer writes or the connection closes.
fn ring_reader(conn: Conn, link: Arc<RingLink>) {
    let Some(handler) = conn.inner.handler.lock().clone() else {
        return;
    };
    let spin = match link.end {
        RingEnd::Accepted => {
            SERVING_RING.with(|s| s.set(true));
            SERVE_SPIN
        }
        RingEnd::Dialed => Duration::ZERO,
    };
    'outer: loop {
        if conn.is_closed() || link.abandoned.load(Ordering::Acquire) {
            return;
        }
        let drained = {
            let mut buf = link.consumer.lock();
            drain_ring(&conn, &link, &mut buf, handler.as_ref())
        };
        if let Err(e) = drained {
            tracing::debug!(?conn, "ring failed: {e}");
            conn.close();
            return;
        }
        if !spin.is_zero() {
            let deadline = Instant::now() + spin;
            let mut spins = 0;
            while Instant::now() < deadline {
                if conn.is_closed() || link.pair.available().map_or(true, |n| n > 0) {
                    continue 'outer;
                }
                spin_pause(&mut spins);
            }
        }
        match link.pair.prepare_sleep() {
            Ok(Some(signal)) => {
                if !conn.is_closed() {
                    link.pair.sleep(signal, Duration::from_secs(1));
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(?conn, "ring failed: {e}");
                conn.close();
                return;
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(write: W, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut writer = BufWriter::with_capacity(256 * 1024, write);
    'outer: while let Some(buf) = rx.recv().await {
        if buf.is_empty() {
            break;
        }
        if writer.write_all(&buf).await.is_err() {
            return;
        }
        while let Ok(buf) = rx.try_recv() {
            if buf.is_empty() {
                break 'outer;
            }
            if writer.write_all(&buf).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

/// Reads frames until the stream ends. With a `handshake` deadline (an
/// accepted connection), frames before authentication are capped at
/// [`HELLO_MAX_FRAME`] and must have authenticated the peer by then.
async fn read_loop<R: AsyncRead + Unpin>(
    read: R,
    conn: &Conn,
    handler: &dyn Handler,
    handshake: Option<tokio::time::Instant>,
) -> Result<()> {
    let mut reader = BufReader::with_capacity(256 * 1024, read);
    let mut buf = Vec::new();
    loop {
        let pending_hello = handshake.filter(|_| !conn.is_authenticated());
        let read = read_frame(&mut reader, &mut buf, pending_hello.is_some());
        let more = match pending_hello {
            None => read.await?,
            Some(deadline) => tokio::time::timeout_at(deadline, read)
                .await
                .map_err(|_| {
                    Error::Unauthenticated(format!(
                        "no accepted Hello within {:?} of connecting",
                        handshake_timeout()
                    ))
                })??,
        };
        if !more {
            return Ok(());
        }
        dispatch(conn, &buf, handler)?;
        if buf.capacity() > 1 << 20 {
            buf = Vec::new();
        }
    }
}

/// Reads one frame's body into `buf`; false at a clean end of stream.
/// Before authentication a length above [`HELLO_MAX_FRAME`] is refused
/// before anything of the body is read.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    before_hello: bool,
) -> Result<bool> {
    let len = match reader.read_u32_le().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(Error::io("read frame", e)),
    };
    if before_hello && len > HELLO_MAX_FRAME {
        return Err(Error::Unauthenticated(format!(
            "frame of {len} bytes before an accepted Hello (at most {HELLO_MAX_FRAME})"
        )));
    }
    if len > MAX_FRAME {
        return Err(Error::BadRequest(format!("frame of {len} bytes")));
    }
    buf.resize(len, 0);
    reader
        .read_exact(buf)
        .await
        .map_err(|e| Error::io("read frame", e))?;
    Ok(true)
}

/// Decodes one frame and routes it: replies to their waiters, requests and
/// one-way messages to the handler (once the peer has authenticated).
fn dispatch(conn: &Conn, bytes: &[u8], handler: &dyn Handler) -> Result<()> {
    let frame = match decode_frame(bytes) {
        Ok(f) => f,
        Err(e) => {
            conn.send_frame(&Frame {
                seq: 0,
                body: Body::Reply(Err(e.clone())),
            });
            return Err(e);
        }
    };
    match frame.body {
        Body::Reply(reply) => {
            let waiter = conn.inner.pending.lock().remove(&frame.seq);
            if let Some((waiter, _)) = waiter {
                let _ = waiter.send(reply);
            }
        }
        Body::Request(message) => {
            let responder = Responder {
                conn: conn.clone(),
                seq: frame.seq,
            };
            if !conn.is_authenticated() && !matches!(message, Message::Hello(_)) {
                responder.respond(Err(Error::Unauthenticated(
                    "send a Hello with the cluster token first".into(),
                )));
                conn.close_after_flush();
            } else if let Message::OpenRing { pid, fd } = message {
                let opened = conn.accept_ring(pid, fd);
                responder.respond(opened.map(|_| Reply::Ok));
            } else {
                handler.on_request(conn, message, responder);
            }
        }
        Body::OneWay(message) => {
            if conn.is_authenticated() {
                handler.on_message(conn, message);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_on_a_closed_connection_was_never_read() {
        let (here, _there) = tokio::io::duplex(1 << 16);
        let conn = Conn::start(here, Transport::Local, "peer".into(), Arc::new(NoHandler));
        conn.close();
        let answer = conn.request(Message::NodeInfo).await;
        assert!(
            matches!(&answer, Err(e) if never_read(e)),
            "a request the connection never sent may be sent again elsewhere: {answer:?}"
        );
    }
}
