//! The object plane: objects moved between nodes over TCP streams of their
//! own, read and written straight between the socket and the stores'
//! shared memory. Every node listens on its `--host` address; a node that
//! wants an object connects to the holder's listener and sends one small
//! request frame (the cluster token and the object id) within the
//! handshake deadline; anything else, longer, or later closes the
//! connection. The holder answers with the object's size, then streams it
//! in chunks of [`CHUNK`] bytes, each behind its length and CRC-32,
//! written from its mapping of the object. The puller creates the object
//! in its store and reads each chunk from the socket into the object's
//! buffer in place (no copy in between, nothing staged in process memory),
//! checks its CRC there, and seals the object only once all of it arrived
//! intact; on any failure the unsealed object is aborted and nothing is
//! visible. One stream per object keeps the sender writing while the
//! receiver reads: the kernel's socket buffers pipeline the chunks.

use crate::rpc::{StoreFailure, TransferError};
use braid_store::{codec, CreateError, GetError, ObjectId, StoreClient};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes per chunk.
pub(crate) const CHUNK: usize = 1 << 20;

/// The largest request frame a listener reads.
const REQUEST_MAX: usize = 4096;

/// The largest answer header a puller reads.
const HEADER_MAX: usize = 64 << 10;

/// How long the holder waits for the object to be in its store.
const GET_TIMEOUT: Duration = Duration::from_millis(50);

/// How long either end waits for the other's next bytes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a puller asks for.
#[derive(Serialize, Deserialize)]
struct Request {
    token: String,
    object: ObjectId,
}

/// The holder's answer, before the chunks.
#[derive(Serialize, Deserialize)]
enum Answer {
    /// The object follows: this many bytes.
    Object { size: u64 },
    /// The object is not in this node's store.
    Missing(String),
    /// The request was refused (a wrong token).
    Refused(String),
}

async fn idle<T>(
    what: &str,
    future: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match tokio::time::timeout(IDLE_TIMEOUT, future).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("nothing for {IDLE_TIMEOUT:?} while {what}"),
        )),
    }
}

async fn write_frame<T: Serialize>(stream: &mut TcpStream, value: &T) -> std::io::Result<()> {
    let body = codec::encode(value).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    idle("writing", stream.write_all(&frame)).await
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    stream: &mut TcpStream,
    max: usize,
) -> std::io::Result<T> {
    let len = idle("reading", stream.read_u32_le()).await? as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {max})"),
        ));
    }
    let mut body = vec![0u8; len];
    idle("reading", stream.read_exact(&mut body)).await?;
    codec::decode(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Serves the object plane on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    token: String,
    store: Arc<StoreClient>,
    transfers: Arc<super::metrics::Transfers>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let (token, store, transfers) = (token.clone(), store.clone(), transfers.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, &token, store, &transfers).await {
                        tracing::debug!("object plane, {from}: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("object plane accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_one(
    mut stream: TcpStream,
    token: &str,
    store: Arc<StoreClient>,
    transfers: &super::metrics::Transfers,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let deadline = crate::wire::handshake_timeout();
    let request: Request = tokio::time::timeout(deadline, read_frame(&mut stream, REQUEST_MAX))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within the deadline",
            )
        })??;
    if !crate::cluster::token_matches(&request.token, token) {
        return write_frame(&mut stream, &Answer::Refused("wrong cluster token".into())).await;
    }
    let id = request.object;
    let got = tokio::task::spawn_blocking(move || store.get(id, GET_TIMEOUT))
        .await
        .map_err(std::io::Error::other)?;
    let view = match got {
        Ok(view) => view,
        Err(e @ (GetError::Timeout { .. } | GetError::Lost { .. } | GetError::Deleted(_))) => {
            let missing = Answer::Missing(format!("object {id} is not in this node's store: {e}"));
            return write_frame(&mut stream, &missing).await;
        }
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    let bytes = view.as_bytes();
    write_frame(
        &mut stream,
        &Answer::Object {
            size: bytes.len() as u64,
        },
    )
    .await?;
    for chunk in bytes.chunks(CHUNK) {
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&crc32fast::hash(chunk).to_le_bytes());
        idle("sending", stream.write_all(&head)).await?;
        idle("sending", stream.write_all(chunk)).await?;
    }
    idle("sending", stream.flush()).await?;
    transfers.sent(bytes.len() as u64);
    Ok(())
}

/// Pulls object `id` from the node whose object plane is at `address`
/// into `store`, presenting `token`, and returns the bytes it moved (0
/// at once if the store has it). On error nothing is stored.
pub(crate) async fn pull(
    address: &str,
    token: &str,
    id: ObjectId,
    store: &Arc<StoreClient>,
) -> Result<u64, TransferError> {
    let peer = address.to_owned();
    let failed = |message: String| TransferError::Connection {
        id,
        peer: peer.clone(),
        message,
    };
    let local = store.clone();
    if tokio::task::spawn_blocking(move || local.contains(id))
        .await
        .map_err(|e| StoreFailure::Task(e.to_string()))?
        .map_err(StoreFailure::Connection)?
    {
        return Ok(0);
    }
    let mut stream = idle("connecting", TcpStream::connect(address))
        .await
        .map_err(|e| failed(e.to_string()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| failed(e.to_string()))?;
    let request = Request {
        token: token.to_owned(),
        object: id,
    };
    write_frame(&mut stream, &request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let size = match read_frame(&mut stream, HEADER_MAX)
        .await
        .map_err(|e| failed(e.to_string()))?
    {
        Answer::Object { size } => size,
        Answer::Missing(_) => return Err(TransferError::NotFound(id)),
        Answer::Refused(why) => return Err(failed(why)),
    };
    let local = store.clone();
    let mut buf = match tokio::task::spawn_blocking(move || local.create(id, size))
        .await
        .map_err(|e| StoreFailure::Task(e.to_string()))?
    {
        Ok(buf) => buf,
        // Another puller on this node creates it; its seal is awaited by
        // a `get`.
        Err(CreateError::AlreadyExists(_)) => return Ok(0),
        Err(e) => return Err(StoreFailure::Create(e).into()),
    };
    let total = usize::try_from(size).map_err(|e| failed(e.to_string()))?;
    let mut received = 0usize;
    while received < total {
        let mut head = [0u8; 8];
        idle("receiving", stream.read_exact(&mut head))
            .await
            .map_err(|_| TransferError::Truncated {
                id,
                peer: peer.clone(),
                received: received as u64,
                expected: size,
            })?;
        let (len, crc) = (
            u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize,
            u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        );
        let corrupt = |reason: String| TransferError::Corrupt {
            id,
            peer: peer.clone(),
            offset: received as u64,
            reason,
        };
        if len == 0 || len > CHUNK || len > total - received {
            return Err(corrupt(format!(
                "a chunk of {len} bytes with {} of {total} left",
                total - received
            )));
        }
        let range = received..received + len;
        let slot = buf
            .as_mut_slice()
            .get_mut(range.clone())
            .ok_or_else(|| corrupt(format!("range {range:?} is outside the buffer")))?;
        idle("receiving", stream.read_exact(slot))
            .await
            .map_err(|_| TransferError::Truncated {
                id,
                peer: peer.clone(),
                received: received as u64,
                expected: size,
            })?;
        if crc32fast::hash(slot) != crc {
            return Err(corrupt("CRC-32 mismatch".into()));
        }
        received += len;
    }
    tokio::task::spawn_blocking(move || buf.seal().map(drop))
        .await
        .map_err(|e| StoreFailure::Task(e.to_string()))?
        .map_err(StoreFailure::Seal)?;
    Ok(size)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_under_their_caps() {
        let request = Request {
            token: "t".repeat(64),
            object: ObjectId::random(),
        };
        assert!(codec::encode(&request).unwrap().len() < REQUEST_MAX);
        let answer = codec::encode(&Answer::Object { size: 1 << 40 }).unwrap();
        assert!(matches!(
            codec::decode::<Answer>(&answer).unwrap(),
            Answer::Object { size } if size == 1 << 40
        ));
    }
}
