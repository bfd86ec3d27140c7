//! The HTTP side of telemetry: a daemon's server (`axum`: `/metrics`, and
//! whatever else the daemon routes, all behind the cluster token), and a
//! small HTTP/1.1 client the head uses to read its node's series and tests
//! use to read both.

use crate::cluster::token_matches;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The cookie that carries the token for a browser.
pub const TOKEN_COOKIE: &str = "braid_token";

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Errors serving or fetching over HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound or reached.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The peer did not answer in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// The answer was not HTTP.
    #[error("malformed HTTP answer from {0}")]
    Malformed(String),
}

/// Text produced at each scrape.
pub type Source = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// The token a request presents: `Authorization: Bearer T`, else a
/// `token` query parameter, else the `braid_token` cookie.
fn presented(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        if let Some(token) = auth.to_str().ok().and_then(|a| a.strip_prefix("Bearer ")) {
            return Some(token.trim().to_string());
        }
    }
    let from_query = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_string)
    });
    if from_query.is_some() {
        return from_query;
    }
    for cookie in headers.get_all(header::COOKIE) {
        let Ok(cookie) = cookie.to_str() else {
            continue;
        };
        for part in cookie.split(';') {
            if let Some(token) = part.trim().strip_prefix("braid_token=") {
                return Some(token.to_string());
            }
        }
    }
    None
}

/// Middleware refusing requests without the cluster token (401).
pub async fn require_token(
    State(token): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Response {
    match presented(request.headers(), request.uri().query()) {
        Some(given) if token_matches(&given, &token) => next.run(request).await,
        Some(_) => (StatusCode::UNAUTHORIZED, "wrong cluster token\n").into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this endpoint needs the cluster token: Authorization: Bearer TOKEN\n",
        )
            .into_response(),
    }
}

/// A router serving `/metrics` from `source`, behind `token`.
pub fn metrics_router(token: &str, source: Source) -> axum::Router {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let source = source.clone();
            async move { ([(header::CONTENT_TYPE, OPENMETRICS)], source().await) }
        }),
    );
    protect(router, token)
}

/// Puts every route of `router` behind `token`.
pub fn protect(router: axum::Router, token: &str) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(
        Arc::<str>::from(token),
        require_token,
    ))
}

/// A running HTTP server; dropping it stops it.
#[derive(Debug)]
pub struct HttpServer {
    /// Where it listens.
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connections that have sent their first bytes, for axum: a connection
/// silent past the handshake deadline is closed unserved, as on every
/// other listener of the cluster, so strangers cannot hold sockets open.
struct Speaking {
    ready: tokio::sync::mpsc::Receiver<(tokio::net::TcpStream, SocketAddr)>,
    local_addr: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for Speaking {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Speaking {
    fn new(listener: tokio::net::TcpListener, local_addr: SocketAddr) -> Speaking {
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!("HTTP accept on {local_addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    let deadline = crate::wire::handshake_timeout();
                    match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        _ => tracing::debug!("HTTP: {peer} sent nothing in time; closed"),
                    }
                });
            }
        });
        Speaking {
            ready,
            local_addr,
            accepting,
        }
    }
}

impl axum::serve::Listener for Speaking {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (it is aborted only when this drops).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Binds `listen` (port 0: any free port) and serves `router` there.
pub async fn serve(listen: SocketAddr, router: axum::Router) -> Result<HttpServer, HttpError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| HttpError::Io {
            what: format!("bind {listen}"),
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| HttpError::Io {
        what: "metrics address".into(),
        source,
    })?;
    let speaking = Speaking::new(listener, local_addr);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(speaking, router).await {
            tracing::warn!("HTTP server on {local_addr} stopped: {e}");
        }
    });
    Ok(HttpServer { local_addr, task })
}

/// An HTTP answer: its status code and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET http://{addr}{path}`, with the token as a bearer when given,
/// bounded by `timeout`.
pub async fn get(
    addr: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Answer, HttpError> {
    request("GET", addr, path, token, None, timeout).await
}

/// `POST http://{addr}{path}` with a JSON body, with the token as a bearer
/// when given, bounded by `timeout`.
pub async fn post(
    addr: &str,
    path: &str,
    token: Option<&str>,
    json: &str,
    timeout: Duration,
) -> Result<Answer, HttpError> {
    let body = ("application/json", json.as_bytes());
    request("POST", addr, path, token, Some(body), timeout).await
}

/// `PUT http://{addr}{path}` with `bytes` as an `application/octet-stream`
/// body, with the token as a bearer when given, bounded by `timeout`.
pub async fn put(
    addr: &str,
    path: &str,
    token: Option<&str>,
    bytes: &[u8],
    timeout: Duration,
) -> Result<Answer, HttpError> {
    let body = ("application/octet-stream", bytes);
    request("PUT", addr, path, token, Some(body), timeout).await
}

/// A request's body: its content type and bytes.
type Body<'a> = (&'a str, &'a [u8]);

async fn request(
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Body<'_>>,
    timeout: Duration,
) -> Result<Answer, HttpError> {
    let what = format!("{method} http://{addr}{path}");
    tokio::time::timeout(timeout, fetch(method, addr, path, token, body))
        .await
        .map_err(|_| HttpError::Timeout(what))?
}

async fn fetch(
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Body<'_>>,
) -> Result<Answer, HttpError> {
    let io = |what: &str| {
        let what = format!("{what} {addr}");
        move |source| HttpError::Io { what, source }
    };
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(io("connect to"))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let length = body.map_or_else(String::new, |(kind, bytes)| {
        format!(
            "Content-Type: {kind}\r\nContent-Length: {}\r\n",
            bytes.len()
        )
    });
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n{length}\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(io("write to"))?;
    if let Some((_, bytes)) = body {
        stream.write_all(bytes).await.map_err(io("write to"))?;
    }
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(io("read from"))?;
    parse_answer(&raw).ok_or_else(|| HttpError::Malformed(addr.to_string()))
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi");
        assert_eq!(plain.map(|a| (a.status, a.body)), Some((200, "hi".into())));
        let chunked = parse_answer(
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!(
            chunked.map(|a| (a.status, a.body)),
            Some((401, "abcde".into()))
        );
        assert!(parse_answer(b"garbage").is_none());
    }

    #[tokio::test]
    async fn metrics_need_the_token() {
        let source: Source = Arc::new(|| Box::pin(async { "x 1\n# EOF\n".to_string() }));
        let listen = "127.0.0.1:0".parse().expect("an address");
        let server = serve(listen, metrics_router("sesame", source))
            .await
            .expect("serve");
        let addr = server.local_addr.to_string();
        let second = Duration::from_secs(5);
        let anonymous = get(&addr, "/metrics", None, second).await;
        assert_eq!(anonymous.map(|a| a.status).ok(), Some(401));
        let wrong = get(&addr, "/metrics", Some("open"), second).await;
        assert_eq!(wrong.map(|a| a.status).ok(), Some(401));
        let right = get(&addr, "/metrics", Some("sesame"), second).await;
        let right = right.map(|a| (a.status, a.body)).ok();
        assert_eq!(right, Some((200, "x 1\n# EOF\n".to_string())));
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_handshake_deadline() {
        use tokio::io::AsyncReadExt;
        let source: Source = Arc::new(|| Box::pin(async { "# EOF\n".to_string() }));
        let listen = "127.0.0.1:0".parse().expect("an address");
        let server = serve(listen, metrics_router("sesame", source))
            .await
            .expect("serve");
        let mut silent = tokio::net::TcpStream::connect(server.local_addr)
            .await
            .expect("connect");
        let deadline = crate::wire::handshake_timeout() + Duration::from_secs(5);
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(deadline, silent.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the silent connection stayed open: {read:?}"
        );
        // Everyone else is still served.
        let answer = get(
            &server.local_addr.to_string(),
            "/metrics",
            Some("sesame"),
            Duration::from_secs(5),
        )
        .await
        .expect("served");
        assert_eq!(answer.status, 200);
    }
}
