//! How one braid process reaches another. Processes on one machine talk
//! over Unix sockets and then shared-memory rings; processes on different
//! machines talk over TCP (`TCP_NODELAY`, keepalive), with the same braid
//! frames. An [`Endpoint`] says where a process (or a node's control plane)
//! listens; [`Endpoint::route`] picks the transport from it, and [`dial`]
//! opens a [`Conn`] over it. Listeners of both kinds are served by
//! [`serve`]: an accepted connection must authenticate with its first
//! frame, as on every plane.

use super::conn::{Conn, Handler, Transport};
use super::messages::{Message, Reply};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How long a TCP connection may go silent before keepalive probes start,
/// and the gap between probes; after [`KEEPALIVE_PROBES`] unanswered probes
/// (or unacknowledged data for [`USER_TIMEOUT`]) the kernel ends the
/// connection, so a vanished host fails pending calls instead of hanging.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// See [`KEEPALIVE_IDLE`].
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// See [`KEEPALIVE_IDLE`].
const KEEPALIVE_PROBES: u32 = 3;
/// See [`KEEPALIVE_IDLE`].
const USER_TIMEOUT: Duration = Duration::from_secs(15);

/// The machine a process runs on, as far as sharing goes: processes with
/// equal ids see the same files, `/dev/shm` and process ids (one boot, one
/// mount and one pid namespace), so they can use Unix sockets, memfds
/// passed through `/proc` and the node's store. Anything else is another
/// host, reached over the network.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct MachineId(pub String);

impl MachineId {
    /// This process's machine.
    pub fn current() -> &'static MachineId {
        static CURRENT: OnceLock<MachineId> = OnceLock::new();
        CURRENT.get_or_init(|| {
            let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_string());
            let link = |path: &str| {
                std::fs::read_link(path)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            };
            let boot = read("/proc/sys/kernel/random/boot_id")
                .unwrap_or_else(|_| crate::cluster::hostname());
            MachineId(format!(
                "{boot}/{}/{}",
                link("/proc/self/ns/mnt"),
                link("/proc/self/ns/pid")
            ))
        })
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a process or a node's control plane listens.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The machine it runs on.
    pub machine: MachineId,
    /// Its Unix socket, for processes on that machine.
    pub socket: String,
    /// Its TCP `host:port`, for processes on other machines (none if it
    /// listens on its socket only).
    pub tcp: Option<String>,
}

impl Endpoint {
    /// How this process reaches the endpoint: its socket if it is on this
    /// machine, else TCP.
    pub fn route(&self) -> Result<Route> {
        if &self.machine == MachineId::current() {
            return Ok(Route::Local(PathBuf::from(&self.socket)));
        }
        match &self.tcp {
            Some(tcp) => Ok(Route::Tcp(tcp.clone())),
            None => Err(Error::Unreachable {
                address: self.socket.clone(),
                message: "on another machine, and it listens on no TCP address".into(),
            }),
        }
    }

    /// Whether the endpoint is on this process's machine.
    pub fn is_local(&self) -> bool {
        &self.machine == MachineId::current()
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.tcp, self.is_local()) {
            (Some(tcp), false) => write!(f, "tcp://{tcp}"),
            _ => write!(f, "{}", self.socket),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One way to reach an endpoint.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Route {
    /// A Unix socket on this machine.
    Local(PathBuf),
    /// A TCP address on another.
    Tcp(String),
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Local(path) => write!(f, "{}", path.display()),
            Route::Tcp(address) => write!(f, "tcp://{address}"),
        }
    }
}

/// Connects over `route` and sends `hello` (which carries the cluster
/// token), returning the connection and the peer's answer.
pub async fn dial(
    route: &Route,
    hello: Message,
    handler: Arc<dyn Handler>,
) -> Result<(Conn, Reply)> {
    let unreachable = |e: std::io::Error| Error::Unreachable {
        address: route.to_string(),
        message: e.to_string(),
    };
    let timed_out = |what: &str| Error::Unreachable {
        address: route.to_string(),
        message: format!("{what} within {:?}", super::handshake_timeout()),
    };
    let conn = match route {
        Route::Local(path) => {
            let short = braid_store::socket_path::SocketPath::new(path).map_err(unreachable)?;
            let stream = tokio::net::UnixStream::connect(short.as_path())
                .await
                .map_err(unreachable)?;
            Conn::start(stream, Transport::Local, route.to_string(), handler)
        }
        Route::Tcp(address) => {
            let connect = tokio::net::TcpStream::connect(address.as_str());
            let stream = tokio::time::timeout(super::handshake_timeout(), connect)
                .await
                .map_err(|_| timed_out("no connection"))?
                .map_err(unreachable)?;
            tune(&stream).map_err(unreachable)?;
            Conn::start(stream, Transport::Tcp, route.to_string(), handler)
        }
    };
    conn.set_authenticated();
    // A host whose processes are stopped still accepts connections (its
    // kernel answers); the greeting is what tells it lives.
    match tokio::time::timeout(super::handshake_timeout(), conn.request(hello)).await {
        Ok(Ok(reply)) => Ok((conn, reply)),
        Ok(Err(e)) => {
            conn.close();
            Err(e)
        }
        Err(_) => {
            conn.close();
            Err(timed_out("no greeting"))
        }
    }
}

/// Sets what every braid TCP connection uses: no Nagle delay (frames are
/// batched per wake-up already) and keepalive with a user timeout, so a
/// peer whose host vanished is noticed within seconds.
fn tune(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// A listener for braid connections.
pub enum Listener {
    /// A Unix socket.
    Local(tokio::net::UnixListener),
    /// A TCP socket.
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds a TCP listener on `ip` (port 0: the kernel picks one) and
    /// returns it with the address it is bound to.
    pub async fn bind_tcp(ip: IpAddr) -> Result<(Listener, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .map_err(|e| Error::io(format!("bind {ip}:0"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io("TCP listener address", e))?;
        Ok((Listener::Tcp(listener), bound))
    }
}

/// Accepts connections on `listener` until the task is dropped, serving
/// each with `handler` under the handshake rules of [`Conn::accept`].
/// `label` names the peers in logs.
pub async fn serve(listener: Listener, label: &'static str, handler: Arc<dyn Handler>) {
    loop {
        let accepted = match &listener {
            Listener::Local(l) => l.accept().await.map(|(stream, _)| {
                Conn::accept(stream, Transport::Local, label.into(), handler.clone());
            }),
            Listener::Tcp(l) => l.accept().await.map(|(stream, from)| {
                if let Err(e) = tune(&stream) {
                    tracing::debug!("tuning a connection from {from}: {e}");
                }
                Conn::accept(
                    stream,
                    Transport::Tcp,
                    format!("{label} {from}"),
                    handler.clone(),
                );
            }),
        };
        if let Err(e) = accepted {
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn endpoint(machine: MachineId, tcp: Option<&str>) -> Endpoint {
        Endpoint {
            machine,
            socket: "/nowhere.sock".into(),
            tcp: tcp.map(str::to_string),
        }
    }

    #[test]
    fn a_process_on_this_machine_is_reached_on_its_socket() {
        let here = endpoint(MachineId::current().clone(), Some("10.0.0.1:7"));
        assert_eq!(
            here.route().unwrap(),
            Route::Local(PathBuf::from("/nowhere.sock"))
        );
    }

    #[test]
    fn a_process_on_another_machine_is_reached_over_tcp_or_not_at_all() {
        let other = MachineId("another-boot/mnt/pid".into());
        let there = endpoint(other.clone(), Some("10.0.0.1:7"));
        assert_eq!(there.route().unwrap(), Route::Tcp("10.0.0.1:7".into()));
        let socket_only = endpoint(other, None);
        assert!(matches!(
            socket_only.route(),
            Err(Error::Unreachable { .. })
        ));
    }

    #[test]
    fn the_machine_id_names_boot_mounts_and_pids() {
        let id = MachineId::current();
        assert!(id.0.contains("mnt:["), "{id}");
        assert!(id.0.contains("pid:["), "{id}");
    }
}
