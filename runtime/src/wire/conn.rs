//! A multiplexed, bidirectional connection: either side sends requests
//! (answered by sequence number) and one-way messages. Writes from many
//! tasks are batched into one `write` per wake-up; a reader task dispatches
//! replies to their waiters and everything else to a [`Handler`].

use super::messages::{Body, Frame, Message, Reply};
use super::MAX_FRAME;
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

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

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Reply>>>>;

struct Inner {
    id: u64,
    peer: String,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    next_seq: AtomicU64,
    closed: AtomicBool,
    authenticated: AtomicBool,
    closed_notify: tokio::sync::Notify,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    handler: Mutex<Option<Arc<dyn Handler>>>,
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

fn encode_frame(frame: &Frame) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    bincode::serialize_into(&mut buf, frame)?;
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
        Message::PushTask(_) => "PushTask",
        Message::CreateActor(_) => "CreateActor",
        Message::CallActor(_) => "CallActor",
        Message::Cancel(_) => "Cancel",
        Message::GetObject(_) => "GetObject",
        Message::AddBorrower { .. } => "AddBorrower",
        Message::RemoveBorrower { .. } => "RemoveBorrower",
        Message::AddLocation { .. } => "AddLocation",
        Message::Exit => "Exit",
        Message::WorkerReady => "WorkerReady",
        Message::NodeInfo => "NodeInfo",
    }
}

impl Conn {
    /// Serves an accepted or connected stream: spawns its reader and writer
    /// on the current runtime.
    pub fn start<S>(stream: S, peer: String, handler: Arc<dyn Handler>) -> Conn
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
                tx,
                pending: Mutex::new(HashMap::new()),
                next_seq: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                authenticated: AtomicBool::new(false),
                closed_notify: tokio::sync::Notify::new(),
                tasks: Mutex::new(Vec::new()),
                handler: Mutex::new(Some(handler.clone())),
            }),
        };
        let writer = tokio::spawn(write_loop(write, rx));
        let reader_conn = conn.clone();
        let reader = tokio::spawn(async move {
            let result = read_loop(read, &reader_conn, handler.as_ref()).await;
            if let Err(e) = result {
                tracing::debug!(conn = ?reader_conn, "connection ended: {e}");
                reader_conn.close_after_flush();
            }
            reader_conn.finish();
        });
        conn.inner
            .tasks
            .lock()
            .extend([writer.abort_handle(), reader.abort_handle()]);
        conn
    }

    /// Connects to a Unix socket and sends `hello`, returning the connection
    /// and the peer's answer.
    pub async fn connect(
        path: &Path,
        hello: Message,
        handler: Arc<dyn Handler>,
    ) -> Result<(Conn, Reply)> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::Unreachable {
                address: path.display().to_string(),
                message: e.to_string(),
            })?;
        let conn = Conn::start(stream, path.display().to_string(), handler);
        conn.set_authenticated();
        match conn.request(hello).await {
            Ok(reply) => Ok((conn, reply)),
            Err(e) => {
                conn.close();
                Err(e)
            }
        }
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
        let pending: Vec<_> = self.inner.pending.lock().drain().collect();
        for (_, waiter) in pending {
            let _ = waiter.send(Err(self.unreachable("connection closed")));
        }
        self.inner.closed_notify.notify_waiters();
    }

    fn unreachable(&self, message: &str) -> Error {
        Error::Unreachable {
            address: self.inner.peer.clone(),
            message: message.to_string(),
        }
    }

    fn send_frame(&self, frame: &Frame) {
        match encode_frame(frame) {
            Ok(buf) => {
                let _ = self.inner.tx.send(buf);
            }
            Err(e) => {
                if let Body::Reply(_) = frame.body {
                    if let Ok(buf) = encode_frame(&Frame {
                        seq: frame.seq,
                        body: Body::Reply(Err(e)),
                    }) {
                        let _ = self.inner.tx.send(buf);
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
    pub fn request(
        &self,
        message: Message,
    ) -> impl std::future::Future<Output = Result<Reply>> + Send + 'static {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let early = match encode_frame(&Frame {
            seq,
            body: Body::Request(message),
        }) {
            Err(e) => Some(e),
            Ok(buf) => {
                self.inner.pending.lock().insert(seq, tx);
                if self.is_closed() || self.inner.tx.send(buf).is_err() {
                    self.inner.pending.lock().remove(&seq);
                    Some(self.unreachable("connection closed"))
                } else {
                    None
                }
            }
        };
        let closed = self.unreachable("connection closed");
        async move {
            if let Some(e) = early {
                return Err(e);
            }
            rx.await.unwrap_or(Err(closed))
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

async fn read_loop<R: AsyncRead + Unpin>(
    read: R,
    conn: &Conn,
    handler: &dyn Handler,
) -> Result<()> {
    let mut reader = BufReader::with_capacity(256 * 1024, read);
    let mut buf = Vec::new();
    loop {
        let len = match reader.read_u32_le().await {
            Ok(n) => n as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(Error::io("read frame", e)),
        };
        if len > MAX_FRAME {
            return Err(Error::BadRequest(format!("frame of {len} bytes")));
        }
        buf.resize(len, 0);
        reader
            .read_exact(&mut buf)
            .await
            .map_err(|e| Error::io("read frame", e))?;
        let frame: Frame = match bincode::deserialize(&buf) {
            Ok(f) => f,
            Err(e) => {
                conn.send_frame(&Frame {
                    seq: 0,
                    body: Body::Reply(Err(Error::BadRequest(format!("malformed frame: {e}")))),
                });
                return Err(Error::BadRequest(format!("malformed frame: {e}")));
            }
        };
        match frame.body {
            Body::Reply(reply) => {
                let waiter = conn.inner.pending.lock().remove(&frame.seq);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
            }
            Body::Request(message) => {
                let responder = Responder {
                    conn: conn.clone(),
                    seq: frame.seq,
                };
                if conn.is_authenticated() || matches!(message, Message::Hello(_)) {
                    handler.on_request(conn, message, responder);
                } else {
                    responder.respond(Err(Error::Unauthenticated(
                        "send a Hello with the cluster token first".into(),
                    )));
                    conn.close_after_flush();
                }
            }
            Body::OneWay(message) => {
                if conn.is_authenticated() {
                    handler.on_message(conn, message);
                }
            }
        }
        if buf.capacity() > 1 << 20 {
            buf = Vec::new();
        }
    }
}
