//! In-pod scenarios (istio-cni's ZDS protocol) without Kubernetes: pods are network namespaces with
//! istio-cni's rules, node proxies run on the host in in-pod mode, and istio-cni is played by the
//! testkit's [`FakeCni`](meshwire_testkit::cni::FakeCni).
//!
//! - [`Lan`]: a bridge in a namespace of its own, the pods' network; [`Lan::pod`] makes a [`Pod`]
//!   on it (its namespace, its address on the bridge, istio-cni's rules inside it).
//! - [`Pod`]: its namespace, address and identity; [`Pod::workload`] is its line in the local
//!   configuration; [`Pod::whoami`] connects from inside it, as its application would.
//! - [`inpod_proxy`] and [`start`]: a node proxy of a binary in in-pod mode on free host ports, and
//!   its start (until it logs that it waits for istio-cni).
//! - [`add`], [`keep`], [`snapshot`]: istio-cni's messages for pods, each answered in time or the
//!   test fails with the proxy's log.
//! - [`ready`], [`wait_ready`], [`listening_ports`], [`eventually`]: probes, polled with generous
//!   limits (no timing is asserted).
//!
//! Everything here needs root and iptables (`crate::netns::available`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use meshwire_testkit::cni::{CniConnection, add_request, workload_info};
use meshwire_testkit::http;

use crate::binary::Binary;
use crate::mesh::{Mesh, Proxy, ProxyBuilder, repo_path};
use crate::net;
use crate::netns::{self, Netns};

/// The ports of a pod's listeners (ztunnel's, fixed: istio-cni's rules name them).
pub const POD_PORTS: [u16; 3] = [15001, 15006, 15008];

/// How long a proxy may take to answer one of istio-cni's messages.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The Kubernetes namespace of every pod here.
pub const NAMESPACE: &str = "default";

/// Runs `tests/scripts/istio-cni-inpod.sh` with `args` (panics unless it succeeds).
pub fn script(args: &[&str]) {
    let path = repo_path("tests/scripts/istio-cni-inpod.sh");
    netns::run(&path.display().to_string(), args);
}

/// The answer of `/healthz/ready` at `readiness`: status and body (status 0 and the error when it
/// does not answer).
pub fn ready(readiness: SocketAddr) -> (u16, String) {
    match http::request_blocking(readiness, "GET", "/healthz/ready") {
        Ok(answer) => (answer.status, answer.body),
        Err(e) => (0, e.to_string()),
    }
}

/// Which of the pod listener ports accept a connection on the pod's loopback. A listener answers
/// at once: the connection is made (and the proxy then refuses it, as it was not redirected: a
/// reset may already be there when the connect returns). No listener: refused, or no answer
/// (istio-cni's TPROXY rule for 15008 also takes loopback SYNs, and drops them when nothing
/// listens), so a probe unanswered within a second counts as nothing listening.
pub fn listening_ports(pod: &Netns) -> Vec<u16> {
    POD_PORTS
        .into_iter()
        .filter(|port| {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
            match pod.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1))) {
                Ok(_) => true,
                Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
            }
        })
        .collect()
}

/// Polls `f` on a blocking thread every 50 ms until it returns `Some`; panics naming `what` after
/// `within`.
pub async fn eventually<T: Send + 'static>(
    what: &str,
    within: Duration,
    f: impl Fn() -> Option<T> + Send + Sync + 'static,
) -> T {
    let f = Arc::new(f);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let g = f.clone();
        if let Some(value) = tokio::task::spawn_blocking(move || g())
            .await
            .expect("the probe panicked")
        {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the blocking `f` on a blocking thread.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking step panicked")
}

static PORTS: AtomicU32 = AtomicU32::new(0);

/// The pods' network: a bridge (`br0`) in a namespace of its own, each pod's veth a port of it.
/// Removed with its namespace when dropped.
#[derive(Debug)]
pub struct Lan {
    switch: Netns,
}

impl Lan {
    /// A new bridge in a namespace tagged `tag`.
    pub fn new(tag: &str) -> Lan {
        let switch = Netns::new(tag);
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        Lan { switch }
    }

    /// A pod `name` (service account `service_account`, namespace [`NAMESPACE`], pod UID
    /// `uid-<name>`) at `ip`/24 on the bridge, in a new namespace tagged `tag`, with istio-cni's
    /// rules installed in it.
    pub fn pod(&self, tag: &str, name: &str, service_account: &str, ip: Ipv4Addr) -> Pod {
        let ns = Netns::new(tag);
        let n = PORTS.fetch_add(1, Ordering::SeqCst);
        let (inside, port) = (
            format!("mwp{}x{n}", std::process::id() % 100_000),
            format!("mws{}x{n}", std::process::id() % 100_000),
        );
        netns::run(
            "ip",
            &[
                "link",
                "add",
                &inside,
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                self.switch.name(),
            ],
        );
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &inside]);
        ns.ip(&["link", "set", &inside, "up"]);
        self.switch.ip(&["link", "set", &port, "master", "br0"]);
        self.switch.ip(&["link", "set", &port, "up"]);
        script(&["up", "--netns", ns.name()]);
        Pod {
            uid: format!("uid-{name}"),
            name: name.to_owned(),
            service_account: service_account.to_owned(),
            ip,
            ns: Arc::new(ns),
        }
    }
}

/// A pod: a network namespace on a [`Lan`] with istio-cni's rules.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Its Kubernetes UID, as istio-cni names it.
    pub uid: String,
    /// Its name (and its workload's uid in the local configuration).
    pub name: String,
    /// Its service account.
    pub service_account: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its network namespace.
    pub ns: Arc<Netns>,
}

impl Pod {
    /// Its network namespace, opened (the descriptor an `AddWorkload` carries).
    pub fn netns_file(&self) -> File {
        let path = format!("/run/netns/{}", self.ns.name());
        File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"))
    }

    /// Its identity's principal, as policies name it (`cluster.local/ns/default/sa/<sa>`).
    pub fn principal(&self) -> String {
        format!("cluster.local/ns/{NAMESPACE}/sa/{}", self.service_account)
    }

    /// Its line in a `workloads:` list of the local configuration: an HBONE workload on `node`,
    /// with `extra` (`, authorizationPolicies: [...]`, say) added to its fields.
    pub fn workload(&self, node: &str, extra: &str) -> String {
        format!(
            "- {{uid: {name}, name: {name}, namespace: {NAMESPACE}, serviceAccount: {sa}, workloadIps: [\"{ip}\"], \
             protocol: HBONE, node: {node}{extra}}}\n",
            name = self.name,
            sa = self.service_account,
            ip = self.ip,
        )
    }

    /// A TCP connection from inside the pod to `target` (5 s to connect).
    pub fn connect(&self, target: SocketAddr) -> io::Result<TcpStream> {
        self.ns.tcp_connect(target)
    }

    /// Connects from inside the pod to the whoami server at `target` and reads its line: the
    /// address the server saw and the connection (which echoes from then on), or why there was
    /// no answer (the connection refused or closed first, or no line within
    /// [`net::IO_TIMEOUT`]).
    pub fn whoami(&self, target: SocketAddr) -> Result<(SocketAddr, TcpStream), String> {
        let mut stream = self
            .connect(target)
            .map_err(|e| format!("connecting from pod {} to {target}: {e}", self.name))?;
        match net::whoami_peer(&mut stream) {
            Ok(seen) => Ok((seen, stream)),
            Err(e) => Err(format!("no answer from {target} to pod {}: {e}", self.name)),
        }
    }
}

/// Sends `bytes` through `stream` and checks that the same bytes come back (an echo server at the
/// other end); an error says what went wrong.
pub fn echo(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    stream.set_read_timeout(Some(net::IO_TIMEOUT))?;
    stream.write_all(bytes)?;
    let mut back = vec![0u8; bytes.len()];
    stream.read_exact(&mut back)?;
    if back == bytes {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the echo differs from what was sent",
        ))
    }
}

/// Whether the peer closed `stream` (end of stream or reset) within `within`, nothing else read.
pub fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 1];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
    }
}

/// A node proxy of `binary` for the node `node` in in-pod mode, dialling istio-cni at `socket`:
/// its host listeners (readiness, admin, metrics, SOCKS5) on free ports of 127.0.0.1, HBONE to
/// peers on 15008 (the pods' port).
pub fn inpod_proxy(mesh: &Mesh, binary: &Binary, node: &str, socket: &Path) -> ProxyBuilder {
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    mesh.proxy(binary, host)
        .hbone_port(15008)
        .arg("--node-name")
        .arg(node)
        .env("INPOD_ENABLED", "true")
        .env("INPOD_UDS", &socket.display().to_string())
}

/// Starts `builder` (an [`inpod_proxy`]) until it logs that it waits for istio-cni.
pub async fn start(builder: ProxyBuilder) -> Proxy {
    blocking(move || builder.spawn_until_log(&["in-pod mode"])).await
}

/// The error of the proxy's next Ack on `conn` (`""` for an ACK); panics with `proxy`'s log if it
/// does not answer within [`ACK_TIMEOUT`].
pub async fn ack(conn: &CniConnection, proxy: &Proxy) -> String {
    match tokio::time::timeout(ACK_TIMEOUT, conn.ack()).await {
        Ok(error) => error,
        Err(_) => panic!("no Ack within {ACK_TIMEOUT:?}\n{}", proxy.describe()),
    }
}

/// istio-cni's `AddWorkload` of `pod` with its namespace; the Ack's error (`""`: ACK).
pub async fn add(conn: &CniConnection, pod: &Pod, proxy: &Proxy) -> String {
    let netns = pod.netns_file();
    let info = workload_info(&pod.name, NAMESPACE, &pod.service_account);
    assert!(
        conn.send(&add_request(&pod.uid, Some(info)), &[netns.as_fd()]).await,
        "the proxy closed istio-cni's connection\n{}",
        proxy.describe()
    );
    ack(conn, proxy).await
}

/// istio-cni's `KeepWorkload` of `pod`; the Ack's error.
pub async fn keep(conn: &CniConnection, pod: &Pod, proxy: &Proxy) -> String {
    assert!(
        conn.keep(&pod.uid).await,
        "the proxy closed istio-cni's connection\n{}",
        proxy.describe()
    );
    ack(conn, proxy).await
}

/// istio-cni's `SnapshotSent`, ACKed.
pub async fn snapshot_sent(conn: &CniConnection, proxy: &Proxy) {
    assert!(
        conn.snapshot_sent().await,
        "the proxy closed istio-cni's connection\n{}",
        proxy.describe()
    );
    assert_eq!(ack(conn, proxy).await, "", "SnapshotSent NACKed\n{}", proxy.describe());
}

/// A snapshot of `pods` (an ACKed `AddWorkload` each), then `SnapshotSent`.
pub async fn snapshot(conn: &CniConnection, pods: &[&Pod], proxy: &Proxy) {
    for pod in pods {
        let error = add(conn, pod, proxy).await;
        assert_eq!(
            error,
            "",
            "AddWorkload of pod {} NACKed\n{}",
            pod.name,
            proxy.describe()
        );
    }
    snapshot_sent(conn, proxy).await;
}

/// Waits up to 30 s until `proxy` is ready (its readiness answers 200); panics with its last
/// answer and the proxy's log otherwise.
pub async fn wait_ready(proxy: &Proxy) {
    let readiness = proxy.ports().readiness;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = blocking(move || ready(readiness)).await;
        if answer.0 == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready within 30 s: {answer:?}\n{}",
            proxy.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
