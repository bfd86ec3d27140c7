//! Serving gRPC: binding, graceful shutdown, and the `Node` service
//! wrapped with authentication for the node daemon.

use super::auth::{AuthError, ServerAuth};
use super::channel::{CONNECTION_WINDOW, MAX_MESSAGE, STREAM_WINDOW};
use super::proto::node_server::{Node, NodeServer};
use parking_lot::Mutex;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

/// Errors starting or running a gRPC server (the head's or a node's).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The cluster token is unusable.
    #[error("invalid cluster token: {0}")]
    Token(#[from] AuthError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Its HTTP endpoint (`/metrics`) could not be served.
    #[error("cannot serve HTTP: {0}")]
    Http(#[from] crate::telemetry::http::HttpError),
    /// The server failed while running.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The server task panicked or was cancelled.
    #[error("gRPC server task failed: {0}")]
    Task(String),
}

/// The head's serving errors.
pub type HeadError = ServeError;

/// Stops a server; cheap to clone.
#[derive(Clone, Debug)]
pub struct StopHandle {
    sender: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl StopHandle {
    /// Asks the server to stop: it stops accepting, lets calls in flight
    /// finish, then returns. Calling it again does nothing.
    pub fn stop(&self) {
        if let Some(sender) = self.sender.lock().take() {
            let _ = sender.send(());
        }
    }
}

/// A running gRPC server. Dropping it (and every [`StopHandle`]) stops the
/// server.
#[derive(Debug)]
pub struct ServerRunning {
    /// The address the server listens on (with the real port when port 0
    /// was asked for).
    pub local_addr: SocketAddr,
    stop: StopHandle,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// A running node `Node` service (see [`serve_node`]).
pub type NodeRunning = ServerRunning;

impl ServerRunning {
    /// A handle that stops the server from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stops the server gracefully and waits until it has.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.stop.stop();
        self.wait().await
    }

    /// Waits until the server stops (through a [`StopHandle`], or a
    /// failure).
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(result) => result.map_err(ServeError::Transport),
            Err(e) => Err(ServeError::Task(e.to_string())),
        }
    }
}

/// A server builder with braid's HTTP/2 settings.
pub(crate) fn builder() -> Server {
    Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
}

/// Binds `listen` (port 0 picks a free port).
pub(crate) async fn bind(listen: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen,
        source,
    })?;
    Ok((listener, local_addr))
}

/// The HTTP/2 client preface every gRPC connection opens with.
const HTTP2_PREFACE_LEN: usize = 24;

/// An accepted TCP connection that must send the HTTP/2 client preface
/// within the [handshake timeout](crate::wire::handshake_timeout) of being
/// accepted; one that sends nothing, or less, fails its next read and is
/// closed. (Afterwards tonic bounds the rest: headers to hyper's 16 KiB
/// list, messages to `MAX_MESSAGE`, buffered data to the flow-control
/// windows, and the token interceptor rejects a call on its headers,
/// before its body is read.)
#[derive(Debug)]
pub struct HandshakeDeadline<T> {
    inner: T,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    received: usize,
}

impl<T> HandshakeDeadline<T> {
    /// Wraps a connection accepted now.
    pub fn new(inner: T) -> Self {
        HandshakeDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(
                crate::wire::handshake_timeout(),
            ))),
            received: 0,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HandshakeDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            if let std::task::Poll::Ready(Ok(())) = polled {
                this.received += buf.filled().len() - before;
                if this.received >= HTTP2_PREFACE_LEN {
                    this.deadline = None;
                }
                return polled;
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the handshake timeout",
                )));
            }
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HandshakeDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for HandshakeDeadline<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections a gRPC server accepts.
pub(crate) type Incoming = Pin<
    Box<
        dyn tokio_stream::Stream<Item = std::io::Result<HandshakeDeadline<tokio::net::TcpStream>>>
            + Send,
    >,
>;

/// The connections a gRPC server accepts on `listener`, each held to the
/// handshake deadline ([`HandshakeDeadline`]).
pub(crate) fn incoming(listener: TcpListener) -> Incoming {
    use tokio_stream::StreamExt;
    Box::pin(
        TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(|accepted| accepted.map(HandshakeDeadline::new)),
    )
}

/// The signal a server future stops on.
pub(crate) type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Spawns a server: `serve` gets the incoming connections and the stop
/// signal and returns the serving future.
pub(crate) fn spawn<F>(
    listener: TcpListener,
    local_addr: SocketAddr,
    serve: impl FnOnce(Incoming, StopSignal) -> F,
) -> ServerRunning
where
    F: Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
{
    let (sender, receiver) = oneshot::channel::<()>();
    let signal: StopSignal = Box::pin(async move {
        // A dropped sender stops the server too.
        let _ = receiver.await;
    });
    let task = tokio::spawn(serve(incoming(listener), signal));
    ServerRunning {
        local_addr,
        stop: StopHandle {
            sender: Arc::new(Mutex::new(Some(sender))),
        },
        task,
    }
}

/// The `Node` service of `node`, behind the cluster-token check: add it to
/// a [`tonic::transport::Server`] (or use [`serve_node`]).
pub fn node_service<N: Node>(
    node: N,
    token: &str,
) -> Result<InterceptedService<NodeServer<N>, ServerAuth>, AuthError> {
    let auth = ServerAuth::new(token)?;
    let server = NodeServer::new(node)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Ok(InterceptedService::new(server, auth))
}

/// Serves `node`'s `Node` service on `listen` (port 0 picks a free port)
/// until stopped.
pub async fn serve_node<N: Node>(
    listen: SocketAddr,
    token: &str,
    node: N,
) -> Result<NodeRunning, ServeError> {
    let service = node_service(node, token)?;
    let (listener, local_addr) = bind(listen).await?;
    Ok(spawn(listener, local_addr, move |incoming, stop| {
        builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop)
    }))
}
