//! `braid start`: a new cluster (`--head`: a head and a node beside it) or
//! a node joining one (`--address`). The daemons are this binary
//! re-executed with a role; they detach, log into the session directory and
//! outlive the command.

use crate::cli::{usage_error, StartArgs};
use crate::client::{self, Connected};
use crate::procs::{self, Kind};
use anyhow::{anyhow, bail, Context};
use braid::cluster::{self, ClusterFile, Daemon, DaemonConfig, DaemonOptions, TOKEN_VAR};
use braid::Resources;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a daemon stopped because a start failed gets to exit.
const CLEANUP_GRACE: Duration = Duration::from_secs(5);

/// How long the head may take to list a node that reported ready.
const LISTING_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `braid start`.
pub fn run(args: StartArgs) -> anyhow::Result<()> {
    let node = NodeSettings {
        num_cpus: args.num_cpus.unwrap_or_else(default_cpus),
        object_store_memory: args.object_store_memory,
        resources: args.resources.clone().unwrap_or_default(),
    };
    match &args.address {
        Some(address) => start_node(
            address,
            args.token.clone(),
            args.host,
            args.metrics_port,
            node,
        ),
        None => start_head(
            args.host,
            args.port,
            args.metrics_port,
            Duration::from_secs_f64(args.node_timeout),
            node,
        ),
    }
}

/// What a node offers.
struct NodeSettings {
    num_cpus: f64,
    object_store_memory: Option<u64>,
    resources: Resources,
}

/// The CPUs this process may use.
fn default_cpus() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64
}

/// An IP as the `host` of a node daemon (which appends `:0`).
fn host_string(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// An address a local client can reach: loopback for one bound to every
/// interface.
fn reachable(bound: SocketAddr) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = if bound.is_ipv4() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
    };
    SocketAddr::new(ip, bound.port())
}

/// What a node daemon reported when it became ready.
struct NodeReady {
    node_id: String,
    grpc_address: String,
    metrics_address: String,
}

/// Parses a node's ready line, `<control_socket> <node_id> <grpc_address>
/// <metrics_address>` (from the right, as the socket path may contain
/// spaces).
fn parse_node_ready(line: &str) -> anyhow::Result<NodeReady> {
    let mut parts = line.rsplitn(4, ' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(metrics), Some(grpc), Some(id), Some(_socket)) => Ok(NodeReady {
            node_id: id.to_owned(),
            grpc_address: grpc.to_owned(),
            metrics_address: metrics.to_owned(),
        }),
        _ => bail!("the node reported an unexpected ready line {line:?}"),
    }
}

/// A fresh `node-<n>.log` in `dir` (created here, so concurrent starts
/// into one session directory get distinct files).
fn new_node_log(dir: &Path) -> anyhow::Result<PathBuf> {
    for n in 1..10_000 {
        let path = dir.join(format!("node-{n}.log"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
        }
    }
    bail!("too many node logs in {}", dir.display())
}

/// Starts a detached daemon logging to `log`: this binary, which becomes
/// the daemon when started with a role.
fn daemon(config: &DaemonConfig, log: &Path) -> braid::Result<Daemon> {
    let exe = std::env::current_exe().map_err(|e| braid::Error::io("find own executable", e))?;
    cluster::start_daemon(
        &exe,
        config,
        &DaemonOptions {
            parent: None,
            log_file: Some(log.to_path_buf()),
            detach: true,
        },
    )
}

/// Stops daemons this command started, after a later step failed.
fn stop_started(daemons: &mut [(&mut Daemon, Kind)]) {
    let procs = daemons
        .iter()
        .map(|(d, kind)| procs::of_child(&d.child, *kind))
        .collect();
    procs::terminate(procs, CLEANUP_GRACE);
    for (d, _) in daemons.iter_mut() {
        // Reaps it: it has exited (or was killed) by now.
        let _ = d.child.try_wait();
    }
}

/// Waits until the head lists node `node_id` as alive.
fn wait_listed(connected: &Connected, node_id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + LISTING_TIMEOUT;
    loop {
        let nodes = connected.list_nodes()?;
        if nodes
            .iter()
            .any(|n| n.alive && n.info.node_id.to_string() == node_id)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the head does not list the new node {node_id} as alive");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `braid start --head`.
fn start_head(
    host: Option<IpAddr>,
    port: u16,
    metrics_port: u16,
    node_timeout: Duration,
    node: NodeSettings,
) -> anyhow::Result<()> {
    let ip = host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    // Held until the daemons hold the session themselves.
    let session = cluster::new_session_dir().context("create the session directory")?;
    let session_dir = session.path().to_path_buf();
    let token = cluster::new_token();
    let head_log = session_dir.join("head.log");
    let mut head = daemon(
        &DaemonConfig::Head {
            listen: SocketAddr::new(ip, port).to_string(),
            token: token.clone(),
            session_dir: session_dir.clone(),
            node_timeout_ms: u64::try_from(node_timeout.as_millis()).unwrap_or(u64::MAX),
            metrics_port,
        },
        &head_log,
    )
    .map_err(|e| {
        let hint = if e.to_string().contains("in use") {
            format!(" (port {port} is taken, by another cluster? `--port 0` picks a free one)")
        } else {
            String::new()
        };
        anyhow!(
            "the head did not start: {e}{hint} (log: {})",
            head_log.display()
        )
    })?;
    let mut ready_parts = head.ready.split_whitespace();
    let parsed = (
        ready_parts.next().map(str::parse::<SocketAddr>),
        ready_parts.next().map(str::parse::<SocketAddr>),
    );
    let (bound, metrics_bound) = match parsed {
        (Some(Ok(a)), Some(Ok(m))) => (a, m),
        _ => {
            stop_started(&mut [(&mut head, Kind::Head)]);
            bail!(
                "the head reported an unexpected ready line {:?}",
                head.ready
            );
        }
    };
    // A head listening on every interface is reached locally via loopback.
    let address = reachable(bound).to_string();
    let metrics_url = format!("http://{}/metrics", reachable(metrics_bound));
    let file = ClusterFile {
        address: address.clone(),
        token: token.clone(),
        session_dir: session_dir.clone(),
    };
    let token_file = match cluster::write_cluster_file(&file) {
        Ok(path) => path,
        Err(e) => {
            stop_started(&mut [(&mut head, Kind::Head)]);
            bail!("cannot write the cluster file: {e}");
        }
    };
    let fail = |daemons: &mut [(&mut Daemon, Kind)], message: String| -> anyhow::Error {
        stop_started(daemons);
        let _ = std::fs::remove_file(&token_file);
        anyhow!(message)
    };
    let node_log = match new_node_log(&session_dir) {
        Ok(path) => path,
        Err(e) => return Err(fail(&mut [(&mut head, Kind::Head)], format!("{e:#}"))),
    };
    let started = daemon(
        &DaemonConfig::Node {
            head: address.clone(),
            token: token.clone(),
            session_dir: session_dir.clone(),
            num_cpus: node.num_cpus,
            object_store_memory: node.object_store_memory,
            resources: node.resources.clone(),
            host: host_string(ip),
            is_head_node: true,
            metrics_port: 0,
        },
        &node_log,
    );
    let mut node_daemon = match started {
        Ok(d) => d,
        Err(e) => {
            return Err(fail(
                &mut [(&mut head, Kind::Head)],
                format!(
                    "the head's node did not start: {e} (log: {})",
                    node_log.display()
                ),
            ))
        }
    };
    let checked = parse_node_ready(&node_daemon.ready).and_then(|ready| {
        client::connect(&address, &token)
            .and_then(|connected| wait_listed(&connected, &ready.node_id))
            .map(|()| ready)
            .context("the new cluster does not answer")
    });
    let ready = match checked {
        Ok(ready) => ready,
        Err(e) => {
            return Err(fail(
                &mut [(&mut node_daemon, Kind::Node), (&mut head, Kind::Head)],
                format!("{e:#}"),
            ))
        }
    };

    println!("Started a braid cluster.");
    println!("  address:     {address}");
    if bound.ip().is_unspecified() {
        println!(
            "               (listening on every interface: from other machines use this machine's IP, port {})",
            bound.port()
        );
    }
    println!(
        "  dashboard:   http://{}/?token={token}",
        reachable(metrics_bound)
    );
    println!("  metrics:     {metrics_url}");
    println!("               (send the token: Authorization: Bearer TOKEN)");
    println!("  token file:  {}", token_file.display());
    println!("  session dir: {}", session_dir.display());
    println!(
        "  head:        pid {}, log {}",
        head.child.id(),
        head_log.display()
    );
    println!(
        "  node:        {} (pid {}, {} CPUs, gRPC {}), log {}",
        ready.node_id,
        node_daemon.child.id(),
        node.num_cpus,
        ready.grpc_address,
        node_log.display()
    );
    println!();
    println!(
        "Connect a program:  {}={address} <your program>",
        cluster::ADDRESS_VAR
    );
    println!("Add a node:         braid start --address {address}");
    println!(
        "                    (from another machine, also pass --token or set {TOKEN_VAR}; the token is in the token file)"
    );
    println!("Show the cluster:   braid status");
    println!("Stop it:            braid stop");
    Ok(())
}

/// Where the token of `braid start --address` came from.
fn resolve_token(
    address: &str,
    flag: Option<String>,
) -> Result<(String, &'static str), clap::Error> {
    if let Some(token) = flag {
        if token.is_empty() {
            return Err(usage_error("start", "the value of --token is empty"));
        }
        return Ok((token, "--token"));
    }
    if let Ok(token) = std::env::var(TOKEN_VAR) {
        if !token.is_empty() {
            return Ok((token, TOKEN_VAR));
        }
    }
    match cluster::read_cluster_file(address) {
        Some(file) => Ok((file.token, "the cluster file")),
        None => Err(usage_error(
            "start",
            format!(
                "no token for the cluster at {address}: pass --token <TOKEN> or set {TOKEN_VAR} \
             (the head's machine keeps it in {})",
                cluster::cluster_file_path(address).display()
            ),
        )),
    }
}

/// The local IP this machine uses to reach `address` (no packet is sent).
fn route_to(address: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    let target = address.to_socket_addrs().ok()?.next()?;
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// `braid start --address`.
fn start_node(
    address: &str,
    token_flag: Option<String>,
    host: Option<IpAddr>,
    metrics_port: u16,
    node: NodeSettings,
) -> anyhow::Result<()> {
    let (token, source) = resolve_token(address, token_flag)?;
    let connected = client::connect(address, &token)?;
    connected
        .list_nodes()
        .map_err(|e| match e.downcast_ref::<braid::Error>() {
            Some(braid::Error::Unauthenticated(why)) => {
                anyhow!("the cluster refused the token from {source} ({why})")
            }
            _ => e,
        })?;
    braid::session::clean_up(&braid::session::private_user_dir()?);
    // A new session is held until the node holds it itself.
    let (session_dir, _session) = match cluster::read_cluster_file(address) {
        Some(file) if file.session_dir.is_dir() => (file.session_dir, None),
        _ => {
            let session = cluster::new_session_dir().context("create the session directory")?;
            (session.path().to_path_buf(), Some(session))
        }
    };
    let ip = match host.or_else(|| route_to(address)) {
        Some(ip) => ip,
        None => {
            return Err(usage_error(
                "start",
                format!("cannot tell which local address reaches {address}: pass --host <IP>"),
            )
            .into())
        }
    };
    let node_log = new_node_log(&session_dir)?;
    let mut started = daemon(
        &DaemonConfig::Node {
            head: address.to_owned(),
            token,
            session_dir,
            num_cpus: node.num_cpus,
            object_store_memory: node.object_store_memory,
            resources: node.resources,
            host: host_string(ip),
            is_head_node: false,
            metrics_port,
        },
        &node_log,
    )
    .map_err(|e| anyhow!("the node did not start: {e} (log: {})", node_log.display()))?;
    let ready = parse_node_ready(&started.ready)
        .and_then(|ready| wait_listed(&connected, &ready.node_id).map(|()| ready));
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            stop_started(&mut [(&mut started, Kind::Node)]);
            return Err(e.context("the node did not join"));
        }
    };
    println!("Started node {} joining {address}.", ready.node_id);
    println!(
        "  pid {}, {} CPUs, gRPC {}, metrics http://{}/metrics, log {}",
        started.child.id(),
        node.num_cpus,
        ready.grpc_address,
        ready.metrics_address,
        node_log.display()
    );
    println!("Show the cluster: braid status --address {address}");
    Ok(())
}
