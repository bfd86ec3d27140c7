//! A TCP line source that acknowledges its input only at checkpoints, and
//! [`LineServer`], a line server speaking its protocol for tests and
//! examples.
//!
//! # Protocol
//!
//! The source connects, as a client, to a line server. Everything is text,
//! one message per `\n`-terminated line (a trailing `\r` is ignored).
//!
//! Client to server:
//! * `FROM <seq>`: the first line of every connection: send the lines from
//!   `seq` on. The source sends its offset, the next seq it expects, so a
//!   fresh source sends `FROM 0` and a restored one the offset of the
//!   checkpoint it was restored from.
//! * `ACK <seq>`: every line below `seq` is covered by a completed
//!   checkpoint and will never be asked for again; the server may forget
//!   it. Acks are cumulative and never decrease.
//!
//! Server to client:
//! * `<seq> <payload>`: line `seq`, where seq is a `u64` counting from 0
//!   without gaps and the payload (no `\n`) is everything after the first
//!   space.
//! * `END <total>`: the stream has exactly `total` lines and all were sent.
//!   The server then half-closes (shuts down its writing side) and keeps
//!   reading acks until the client hangs up.
//! * `ERR <message>`: the request cannot be served (say, `FROM` below what
//!   was acknowledged, which the server may have forgotten); the source
//!   fails.
//!
//! # Offsets and acknowledgements
//!
//! The source's offset is the next seq it expects (8 bytes, little
//! endian). Lines below it that arrive again after a reconnect are
//! skipped; a line above it (a gap) or an `END` that does not match it
//! fails the source.
//!
//! The runner calls [`Source::offset`] at each barrier but does not say
//! for which epoch, and later calls [`Source::notify_checkpoint_complete`]
//! with the epoch. The source therefore queues the offsets in the order
//! they were taken and pops the oldest on each completion. That pairs them
//! correctly because the coordinator triggers a checkpoint only after the
//! previous one completed, and a checkpoint that fails fails the whole
//! attempt, so the source instance that took its offset is discarded. Were
//! a checkpoint ever dropped without a restart, the queue would pair each
//! later completion with an older offset: acks would lag, never run ahead
//! of a completed checkpoint. `offset` must be called only at barriers.
//!
//! The ack is sent when the checkpoint completes, not at the barrier: the
//! server may discard what is acknowledged, so acking at the barrier would
//! lose lines if that checkpoint never completed and the job restored an
//! older one. An ack that cannot be written (the connection is gone) is
//! resent on the next connection.
//!
//! # Connections and parallelism
//!
//! One source instance reads one server over one connection: a server
//! serves one ordered stream. A job with source parallelism `n` gives each
//! subtask its own server address (`addrs[subtask]`). The source connects
//! on its first poll; a connection that fails or ends without `END` is
//! reopened with `FROM <offset>` after a backoff (5 ms doubling to 500 ms),
//! and after [`DEFAULT_MAX_RETRIES`] consecutive failures without a line
//! the source fails. A failed source keeps the cause for
//! [`TcpLineSource::error`] (and logs it), sends no further acks, and fails
//! its polls once the lines read before the failure are out, which fails
//! the attempt: the job recovers from its last checkpoint, or stops with
//! the cause, and never ends on a partial stream as if it were whole. Polls
//! never wait for data; only opening a connection blocks, for at most
//! [`CONNECT_TIMEOUT`].

use super::operator::{Collector, OperatorError, StateError};
use super::source::{Source, SourcePoll};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Consecutive connection failures a source tolerates by default.
pub const DEFAULT_MAX_RETRIES: u32 = 10;

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
const READ_CHUNK: usize = 64 * 1024;

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpLine {
    /// Its position in the stream, from 0.
    pub seq: u64,
    /// The text after the seq.
    pub payload: String,
}

/// Why a [`TcpLineSource`] stopped reading.
#[derive(Debug, Error)]
pub enum TcpSourceError {
    /// The server could not be reached, or its connection kept failing.
    #[error("{addr} unreachable after {attempts} attempts: {last}")]
    Unreachable {
        /// The server.
        addr: SocketAddr,
        /// Consecutive failed attempts.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A line arrived ahead of the one expected.
    #[error("line {got} arrived while line {expected} was expected")]
    Gap {
        /// The next seq the source expected.
        expected: u64,
        /// The seq that arrived.
        got: u64,
    },
    /// The server's `END` does not match the lines received.
    #[error("the server ended the stream at {total} lines while line {expected} was expected")]
    Ended {
        /// The next seq the source expected.
        expected: u64,
        /// The total the server announced.
        total: u64,
    },
    /// The server answered `ERR`.
    #[error("the server refused: {0}")]
    Refused(String),
    /// The server sent a line outside the protocol.
    #[error("malformed line from the server: {0:?}")]
    Malformed(String),
}

enum Msg {
    Line(u64, String),
    End(u64),
    Refused(String),
    Malformed(String),
}

fn parse_msg(line: &[u8]) -> Msg {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(text) = std::str::from_utf8(line) else {
        return Msg::Malformed(String::from_utf8_lossy(line).into_owned());
    };
    let (head, rest) = text.split_once(' ').unwrap_or((text, ""));
    match head {
        "END" => rest
            .trim()
            .parse()
            .map_or_else(|_| Msg::Malformed(text.to_string()), Msg::End),
        "ERR" => Msg::Refused(rest.to_string()),
        _ => match head.parse() {
            Ok(seq) => Msg::Line(seq, rest.to_string()),
            Err(_) => Msg::Malformed(text.to_string()),
        },
    }
}

/// An open connection: a non-blocking stream with its unparsed input and
/// unsent output.
struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    parsed: usize,
    output: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr, from: u64, acked: Option<u64>) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let mut output = format!("FROM {from}\n").into_bytes();
        if let Some(acked) = acked {
            output.extend_from_slice(format!("ACK {acked}\n").as_bytes());
        }
        let mut conn = Conn {
            stream,
            input: Vec::new(),
            parsed: 0,
            output,
        };
        conn.flush()?;
        Ok(conn)
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The next complete message received, if any.
    fn next_msg(&mut self) -> Option<Msg> {
        let pending = &self.input[self.parsed..];
        let end = pending.iter().position(|b| *b == b'\n')?;
        let msg = parse_msg(&pending[..end]);
        self.parsed += end + 1;
        Some(msg)
    }

    /// Reads what has arrived: `Ok(true)` when something did, `Ok(false)`
    /// when nothing is there yet; end of stream is an error, since a
    /// stream ends with `END`.
    fn fill(&mut self) -> std::io::Result<bool> {
        if self.parsed > 0 {
            self.input.drain(..self.parsed);
            self.parsed = 0;
        }
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the server closed the connection before END",
                    ))
                }
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads `"<seq> <payload>"` lines from a line server and acknowledges
/// them only when a checkpoint covering them completes (see the module
/// documentation for the protocol).
pub struct TcpLineSource {
    addr: SocketAddr,
    conn: Option<Conn>,
    next: u64,
    finished: bool,
    taken: Mutex<VecDeque<u64>>,
    completed: Option<u64>,
    acked: Option<u64>,
    failures: u32,
    max_retries: u32,
    retry_at: Option<Instant>,
    error: Option<TcpSourceError>,
}

impl TcpLineSource {
    /// A source reading the server at `addr` from line 0; it connects on
    /// its first poll.
    pub fn new(addr: SocketAddr) -> Self {
        TcpLineSource {
            addr,
            conn: None,
            next: 0,
            finished: false,
            taken: Mutex::new(VecDeque::new()),
            completed: None,
            acked: None,
            failures: 0,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_at: None,
            error: None,
        }
    }

    /// Fails after `retries` consecutive connection failures instead of
    /// [`DEFAULT_MAX_RETRIES`].
    pub fn with_max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Why the source stopped reading early, if it did.
    pub fn error(&self) -> Option<&TcpSourceError> {
        self.error.as_ref()
    }

    /// The last ack sent (or due to be sent on the next connection).
    pub fn acked(&self) -> Option<u64> {
        self.acked
    }

    /// The source's failure, if it failed, as a poll's error.
    fn failed(&self) -> Result<(), OperatorError> {
        match &self.error {
            Some(e) => Err(OperatorError::Failed(format!(
                "tcp line source {}: {e}",
                self.addr
            ))),
            None => Ok(()),
        }
    }

    fn fail(&mut self, error: TcpSourceError) {
        tracing::error!("tcp line source {}: {error}", self.addr);
        self.conn = None;
        self.error = Some(error);
    }

    fn lost(&mut self, why: String) {
        self.conn = None;
        self.failures += 1;
        if self.failures > self.max_retries {
            self.fail(TcpSourceError::Unreachable {
                addr: self.addr,
                attempts: self.failures,
                last: why,
            });
            return;
        }
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(MAX_BACKOFF);
        tracing::warn!(
            "tcp line source {}: {why}; reconnecting in {backoff:?}",
            self.addr
        );
        self.retry_at = Some(Instant::now() + backoff);
    }

    /// The open connection, opening one unless a retry is not due yet.
    fn connection(&mut self) -> Option<Conn> {
        if let Some(conn) = self.conn.take() {
            return Some(conn);
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        match Conn::open(self.addr, self.next, self.acked) {
            Ok(conn) => {
                self.retry_at = None;
                Some(conn)
            }
            Err(e) => {
                self.lost(e.to_string());
                None
            }
        }
    }
}

impl Source for TcpLineSource {
    type Out = TcpLine;

    fn poll(
        &mut self,
        out: &mut dyn Collector<TcpLine>,
        max: usize,
    ) -> Result<SourcePoll, OperatorError> {
        self.failed()?;
        if self.finished {
            return Ok(SourcePoll::Exhausted);
        }
        let Some(mut conn) = self.connection() else {
            self.failed()?;
            return Ok(SourcePoll::Idle);
        };
        let mut emitted = 0;
        let mut lost = conn.flush().err();
        while lost.is_none() && emitted < max {
            match conn.next_msg() {
                Some(Msg::Line(seq, payload)) => {
                    self.failures = 0;
                    if seq < self.next {
                        continue;
                    }
                    if seq > self.next {
                        self.fail(TcpSourceError::Gap {
                            expected: self.next,
                            got: seq,
                        });
                        break;
                    }
                    out.emit(TcpLine { seq, payload }, None);
                    self.next += 1;
                    emitted += 1;
                }
                Some(Msg::End(total)) => {
                    self.failures = 0;
                    if total == self.next {
                        self.finished = true;
                    } else {
                        self.fail(TcpSourceError::Ended {
                            expected: self.next,
                            total,
                        });
                    }
                    break;
                }
                Some(Msg::Refused(why)) => {
                    self.fail(TcpSourceError::Refused(why));
                    break;
                }
                Some(Msg::Malformed(line)) => {
                    self.fail(TcpSourceError::Malformed(line));
                    break;
                }
                None => match conn.fill() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => lost = Some(e),
                },
            }
        }
        if self.error.is_none() {
            match lost {
                Some(e) => self.lost(e.to_string()),
                None => self.conn = Some(conn),
            }
        }
        // Lines read before a failure go out first; the next poll fails.
        if emitted > 0 {
            return Ok(SourcePoll::Emitted(emitted));
        }
        self.failed()?;
        Ok(if self.finished {
            SourcePoll::Exhausted
        } else {
            SourcePoll::Idle
        })
    }

    fn offset(&self) -> Vec<u8> {
        self.taken.lock().push_back(self.next);
        self.next.to_le_bytes().to_vec()
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError> {
        let bytes: [u8; 8] = offset.try_into().map_err(|_| {
            StateError::Decode(format!("a tcp line offset of {} bytes", offset.len()))
        })?;
        self.next = u64::from_le_bytes(bytes);
        self.conn = None;
        self.finished = false;
        self.taken.lock().clear();
        self.failures = 0;
        self.retry_at = None;
        self.error = None;
        Ok(())
    }

    fn notify_checkpoint_complete(&mut self, epoch: u64) {
        if self.completed.is_some_and(|done| epoch <= done) {
            return;
        }
        self.completed = Some(epoch);
        let Some(offset) = self.taken.lock().pop_front() else {
            return;
        };
        if self.acked.is_some_and(|acked| acked >= offset) {
            return;
        }
        self.acked = Some(offset);
        if self.error.is_some() {
            return;
        }
        if let Some(conn) = self.conn.as_mut() {
            conn.output
                .extend_from_slice(format!("ACK {offset}\n").as_bytes());
        }
        let Some(mut conn) = self.connection() else {
            return;
        };
        match conn.flush() {
            Ok(()) => self.conn = Some(conn),
            Err(e) => self.lost(e.to_string()),
        }
    }
}

/// What a [`LineServer`] received, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// A connection asked for the lines from this seq.
    From(u64),
    /// A connection asked for lines from this seq, below what was
    /// acknowledged, and was refused.
    Refused(u64),
    /// Lines below this seq were acknowledged.
    Ack(u64),
}

#[derive(Default)]
struct Log {
    events: Vec<ServerEvent>,
    acked: Option<u64>,
}

struct Shared {
    stop: AtomicBool,
    newest: AtomicU64,
    cut: Mutex<Option<u64>>,
    log: Mutex<Log>,
    acked: Condvar,
}

type Payload = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// A line server for tests and examples: serves lines `0..count` with
/// generated payloads, honours `FROM`, records acks, refuses a `FROM`
/// below the highest ack (it has "forgotten" those lines), and sends `END`
/// after the last line. A new connection (a client reconnecting after a
/// crash) supersedes the previous one, which is closed. Runs on its own
/// threads, which dropping the server stops and joins.
pub struct LineServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl LineServer {
    /// Serves `count` lines with payloads `line-<seq>` on a free port of
    /// 127.0.0.1.
    pub fn start(count: u64) -> std::io::Result<LineServer> {
        LineServer::with_payload(count, |seq| format!("line-{seq}"))
    }

    /// Serves `count` lines with payloads `payload(seq)`, which must not
    /// contain `\n`.
    pub fn with_payload(
        count: u64,
        payload: impl Fn(u64) -> String + Send + Sync + 'static,
    ) -> std::io::Result<LineServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            newest: AtomicU64::new(0),
            cut: Mutex::new(None),
            log: Mutex::new(Log::default()),
            acked: Condvar::new(),
        });
        let payload: Payload = Arc::new(payload);
        let accept_shared = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("line-server-{}", addr.port()))
            .spawn(move || accept_loop(listener, accept_shared, count, payload))?;
        Ok(LineServer {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The highest ack received.
    pub fn acked(&self) -> Option<u64> {
        self.shared.log.lock().acked
    }

    /// Every ack received, in order.
    pub fn acks(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                ServerEvent::Ack(seq) => Some(seq),
                _ => None,
            })
            .collect()
    }

    /// The seq of every `FROM` served, in order.
    pub fn froms(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                ServerEvent::From(seq) => Some(seq),
                _ => None,
            })
            .collect()
    }

    /// Everything received, in order.
    pub fn events(&self) -> Vec<ServerEvent> {
        self.shared.log.lock().events.clone()
    }

    /// Waits up to `timeout` until an ack of at least `seq` arrived;
    /// whether one did.
    pub fn wait_acked(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut log = self.shared.log.lock();
        while log.acked.is_none_or(|acked| acked < seq) {
            if self.shared.acked.wait_until(&mut log, deadline).timed_out() {
                return log.acked.is_some_and(|acked| acked >= seq);
            }
        }
        true
    }

    /// The next connection is closed, without `END`, after it sent `lines`
    /// lines: a server-side failure the client must recover from.
    pub fn cut_next_connection_after(&self, lines: u64) {
        *self.shared.cut.lock() = Some(lines);
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, count: u64, payload: Payload) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    let mut id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                id += 1;
                shared.newest.store(id, Ordering::SeqCst);
                let cut = shared.cut.lock().take();
                let (conn_shared, conn_payload) = (shared.clone(), payload.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("line-server-conn-{id}"))
                    .spawn(move || {
                        serve(stream, id, cut, &conn_shared, count, conn_payload.as_ref())
                    });
                match spawned {
                    Ok(handle) => handlers.push(handle),
                    Err(e) => tracing::warn!("line server: cannot serve a connection: {e}"),
                }
                let (done, running): (Vec<_>, Vec<_>) =
                    handlers.into_iter().partition(|h| h.is_finished());
                for handle in done {
                    let _ = handle.join();
                }
                handlers = running;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                tracing::warn!("line server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    for handle in handlers {
        let _ = handle.join();
    }
}

enum Request {
    From(u64),
    Ack(u64),
}

fn parse_request(line: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let (verb, seq) = text.split_once(' ')?;
    let seq = seq.trim().parse().ok()?;
    match verb {
        "FROM" => Some(Request::From(seq)),
        "ACK" => Some(Request::Ack(seq)),
        _ => None,
    }
}

/// What one connection of a [`LineServer`] is sending.
struct Sending {
    next: u64,
    limit: u64,
    done: bool,
}

fn serve(
    mut stream: TcpStream,
    id: u64,
    cut: Option<u64>,
    shared: &Shared,
    count: u64,
    payload: &dyn Fn(u64) -> String,
) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut input: Vec<u8> = Vec::new();
    let mut output: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut sending: Option<Sending> = None;
    let mut write_closed = false;
    let mut chunk = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) && shared.newest.load(Ordering::SeqCst) == id {
        let mut progress = false;
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                input.extend_from_slice(&chunk[..n]);
                progress = true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
        while let Some(end) = input.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = input.drain(..=end).collect();
            match parse_request(&line) {
                Some(Request::From(seq)) if sending.is_none() => {
                    let mut log = shared.log.lock();
                    match log.acked {
                        Some(acked) if seq < acked => {
                            log.events.push(ServerEvent::Refused(seq));
                            output.extend_from_slice(
                                format!("ERR line {seq} was acknowledged (through {acked}) and forgotten\n")
                                    .as_bytes(),
                            );
                            sending = Some(Sending {
                                next: seq,
                                limit: seq,
                                done: true,
                            });
                        }
                        _ => {
                            log.events.push(ServerEvent::From(seq));
                            sending = Some(Sending {
                                next: seq,
                                limit: cut
                                    .map_or(count, |lines| count.min(seq.saturating_add(lines))),
                                done: false,
                            });
                        }
                    }
                }
                Some(Request::Ack(seq)) => {
                    let mut log = shared.log.lock();
                    log.events.push(ServerEvent::Ack(seq));
                    log.acked = Some(log.acked.map_or(seq, |acked| acked.max(seq)));
                    shared.acked.notify_all();
                }
                _ => tracing::warn!("line server: ignoring {:?}", String::from_utf8_lossy(&line)),
            }
        }
        let Some(send) = sending.as_mut() else {
            if !progress {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        };
        if written == output.len() {
            output.clear();
            written = 0;
            if !send.done {
                while output.len() < READ_CHUNK && send.next < send.limit {
                    output.extend_from_slice(
                        format!("{} {}\n", send.next, payload(send.next)).as_bytes(),
                    );
                    send.next += 1;
                }
                if send.next >= send.limit && output.is_empty() {
                    if send.limit < count {
                        return;
                    }
                    output.extend_from_slice(format!("END {count}\n").as_bytes());
                    send.done = true;
                }
            }
        }
        if written < output.len() {
            match stream.write(&output[written..]) {
                Ok(n) => {
                    written += n;
                    progress |= n > 0;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => return,
            }
        } else if send.done && !write_closed {
            let _ = stream.shutdown(Shutdown::Write);
            write_closed = true;
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
