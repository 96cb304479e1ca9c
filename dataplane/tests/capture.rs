//! Traffic capture end to end, in network namespaces made for each test: the real `ztunnel` binary
//! runs in a workload's namespace whose TCP is redirected by `dataplane/scripts/redirect.sh`, and a
//! second one serves the peer namespace across a veth pair.
//!
//! ```text
//!   namespace "pod" (redirect rules)                 namespace "peer"
//!   10.77.0.1  workload "client" (HBONE)      veth   10.77.0.2  workload "server" (HBONE), echo :8080
//!   proxy A: shared mode, node "pod"       <------>  10.77.0.3  workload "plain" (TCP), echo :9090
//!   echo :7070 (inbound plaintext target)            proxy B: shared mode, node "peer"
//! ```
//!
//! Test threads enter a namespace with `setns` to open sockets there. These tests need root,
//! `ip` and `iptables`: without root they fail saying so, unless `MESHWIRE_SKIP_NETNS=1` is set, in
//! which case they print that they are skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

const REDIRECT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redirect.sh");
const POD_IP: &str = "10.77.0.1";
const SERVER_IP: &str = "10.77.0.2";
const PLAIN_IP: &str = "10.77.0.3";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the test can run: root and the tools. Not root: panics saying so, unless
/// `MESHWIRE_SKIP_NETNS=1`, which skips the test with a message.
fn netns_available(test: &str) -> bool {
    if std::env::var("MESHWIRE_SKIP_NETNS").as_deref() == Ok("1") {
        // Straight to stderr, past the test harness's capture, so that the skip is seen.
        let _ = writeln!(
            io::stderr(),
            "{test}: skipped: MESHWIRE_SKIP_NETNS=1 (it needs root, network namespaces and iptables)"
        );
        return false;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "{test} needs root (it creates network namespaces and iptables rules): run the tests as root, \
         or set MESHWIRE_SKIP_NETNS=1 to skip it"
    );
    for tool in ["ip", "iptables"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(
            found,
            "{test} needs {tool}: apt-get install iproute2 iptables (scripts/test.sh does)"
        );
    }
    true
}

fn run(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Two namespaces joined by a veth pair; deleted on drop (also when the test panics).
struct Topology {
    pod: String,
    peer: String,
}

impl Topology {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("mwcap{}-{n}", std::process::id());
        let topology = Topology {
            pod: format!("{base}-pod"),
            peer: format!("{base}-peer"),
        };
        ip(&["netns", "add", &topology.pod]);
        ip(&["netns", "add", &topology.peer]);
        let (pod, peer) = (topology.pod.as_str(), topology.peer.as_str());
        ip(&["-n", pod, "link", "set", "lo", "up"]);
        ip(&["-n", peer, "link", "set", "lo", "up"]);
        ip(&[
            "-n", pod, "link", "add", "p0", "type", "veth", "peer", "name", "q0", "netns", peer,
        ]);
        ip(&["-n", pod, "addr", "add", &format!("{POD_IP}/24"), "dev", "p0"]);
        ip(&["-n", peer, "addr", "add", &format!("{SERVER_IP}/24"), "dev", "q0"]);
        ip(&["-n", peer, "addr", "add", &format!("{PLAIN_IP}/24"), "dev", "q0"]);
        ip(&["-n", pod, "link", "set", "p0", "up"]);
        ip(&["-n", peer, "link", "set", "q0", "up"]);
        topology
    }

    fn redirect(&self, command: &str) -> String {
        run(Command::new(REDIRECT).args([command, "--netns", &self.pod]))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that entered the network namespace `ns`; sockets it makes stay there.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
            .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
        f()
    })
    .join()
    .unwrap()
}

/// A TCP server in `ns` at `addr` that first sends the address of the peer it accepted (one line),
/// then echoes everything back and half-closes.
fn reporting_echo(ns: &str, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = in_netns(ns, move || TcpListener::bind(addr).unwrap());
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let peer = stream.peer_addr().unwrap();
                if stream.write_all(format!("{peer}\n").as_bytes()).is_err() {
                    return;
                }
                let mut reader = stream.try_clone().unwrap();
                let _ = io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
}

/// A TCP connection from namespace `ns` to `addr`.
fn try_connect_in(ns: &str, addr: &str) -> io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    let stream = in_netns(ns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// [`try_connect_in`], which must succeed.
fn connect_in(ns: &str, addr: &str) -> TcpStream {
    try_connect_in(ns, addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

/// Whether a connection from `ns` to `addr` is refused: reset (possibly before `connect` returned)
/// or closed without a byte.
fn refused_in(ns: &str, addr: &str) -> bool {
    match try_connect_in(ns, addr) {
        Ok(stream) => refused(stream),
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    }
}

/// Reads the line a [`reporting_echo`] sends first: the peer address it saw.
fn read_peer_line(stream: &mut TcpStream) -> io::Result<SocketAddr> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the peer line",
                ));
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    String::from_utf8(line)
        .unwrap()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))
}

/// Sends `len` patterned bytes, half-closes, and checks they come back; returns the peer line.
fn echo_through(mut stream: TcpStream, len: usize) -> SocketAddr {
    let seen = read_peer_line(&mut stream).expect("the echo server's peer line");
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let expected = payload.clone();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        writer.write_all(&payload).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(len);
    stream.read_to_end(&mut back).expect("the echo");
    sender.join().unwrap();
    assert_eq!(back.len(), len, "echo length");
    assert!(back == expected, "echo content differs");
    seen
}

/// Whether the connection was refused: closed (reset or EOF) without a byte.
fn refused(mut stream: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("waiting for the refusal: {e}"),
    }
}

fn config_yaml(policies: &str) -> String {
    format!(
        r#"
workloads:
- uid: client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{POD_IP}"]
  protocol: HBONE
  node: pod
- uid: server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["{SERVER_IP}"]
  protocol: HBONE
  node: peer
- uid: plain
  name: plain
  namespace: default
  workloadIps: ["{PLAIN_IP}"]
  protocol: TCP
  node: peer
{policies}
"#
    )
}

/// A `ztunnel` in a namespace, its stderr collected; killed on drop.
struct Ztunnel {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Ztunnel {
    fn start(ns: &str, node: &str, config: &Path, state: &Path) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ztunnel")])
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(["--mode", "shared", "--node-name", node])
            .args(["--bind-address", "0.0.0.0", "--ipv6", "false"])
            .args(["--socks5", "false", "--dns-proxy", "false"])
            .args(["--worker-threads", "1", "--drain-deadline", "1s", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in [
            "RUST_LOG",
            "LOCAL_XDS_PATH",
            "LOCAL_XDS",
            "PROXY_MODE",
            "PROXY_WORKLOAD_INFO",
            "PACKET_MARK",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut proxy = Ztunnel { child, log };
        proxy.wait_for(|log| log.matches("listening").count() >= 3, "its listeners");
        proxy
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log satisfies `check`; panics with the log after [`TIMEOUT`].
    fn wait_for(&mut self, check: impl Fn(&str) -> bool, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if check(&self.log()) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ztunnel exited with {status} while waiting for {what}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no {what} in time:\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The access log lines that contain every one of `needles`.
    fn access_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.contains("access") && needles.iter().all(|n| line.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The namespaces, the rules, both proxies and the echo servers.
struct Mesh {
    // Dropped in this order: the proxies, then the namespaces.
    a: Ztunnel,
    b: Ztunnel,
    dir: tempfile::TempDir,
    topology: Topology,
}

impl Mesh {
    fn start(policies: &str) -> Mesh {
        let topology = Topology::new();
        let out = topology.redirect("up");
        assert!(out.contains("TCP redirected"), "{out}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), config_yaml(policies)).unwrap();
        let config = dir.path().join("mesh.yaml");
        let state = dir.path().join("state");
        // A creates the CA in the shared state directory before B loads it.
        let a = Ztunnel::start(&topology.pod, "pod", &config, &state);
        let b = Ztunnel::start(&topology.peer, "peer", &config, &state);
        reporting_echo(&topology.peer, &format!("{SERVER_IP}:8080"));
        reporting_echo(&topology.peer, &format!("{PLAIN_IP}:9090"));
        reporting_echo(&topology.pod, &format!("{POD_IP}:7070"));
        Mesh { a, b, dir, topology }
    }

    fn rewrite_config(&mut self, policies: &str) {
        let path = self.dir.path().join("mesh.yaml");
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, config_yaml(policies)).unwrap();
        std::fs::rename(tmp, path).unwrap();
        for proxy in [&mut self.a, &mut self.b] {
            proxy.wait_for(
                |log| log.contains("applied a change of the local configuration"),
                "reload of the configuration",
            );
        }
    }
}

#[test]
fn captured_connection_to_a_mesh_workload_arrives_over_hbone_with_the_source_identity() {
    if !netns_available("captured_connection_to_a_mesh_workload_arrives_over_hbone_with_the_source_identity") {
        return;
    }
    let mut mesh = Mesh::start("");
    let len = 256 * 1024;
    // A plain client in the pod connects to the server workload's IP: captured by OUTPUT, carried
    // over HBONE by proxy A to proxy B, which connects the echo server from the server's address.
    let stream = connect_in(&mesh.topology.pod, &format!("{SERVER_IP}:8080"));
    let client = stream.local_addr().unwrap();
    let seen = echo_through(stream, len);
    assert_eq!(
        seen.ip().to_string(),
        SERVER_IP,
        "the echo server was reached by proxy B"
    );

    let line_len = seen.to_string().len() + 1;
    let inbound = [
        "direction=\"inbound\"",
        &format!("src.identity=\"{CLIENT_ID}\""),
        &format!("dst.identity=\"{SERVER_ID}\""),
        &format!("dst.hbone_addr={SERVER_IP}:8080"),
    ];
    mesh.b.wait_for(
        |log| {
            log.lines()
                .any(|l| l.contains("access") && inbound.iter().all(|n| l.contains(n)))
        },
        "the inbound access log line with the client's identity",
    );
    // Proxy A logs the outbound side with the bytes the client sent and received.
    let outbound = [
        "direction=\"outbound\"".to_owned(),
        format!("src.addr={client}"),
        format!("src.identity=\"{CLIENT_ID}\""),
        format!("dst.addr={SERVER_IP}:15008"),
        format!("bytes_sent={len} "),
        format!("bytes_recv={} ", len + line_len),
    ];
    let needles: Vec<&str> = outbound.iter().map(String::as_str).collect();
    mesh.a.wait_for(
        |log| {
            log.lines()
                .any(|l| l.contains("access") && needles.iter().all(|n| l.contains(n)))
        },
        "the outbound access log line",
    );
    assert!(mesh.a.access_lines(&["error="]).is_empty(), "{}", mesh.a.log());
}

#[test]
fn captured_connection_to_a_non_mesh_workload_passes_through_with_the_mark() {
    if !netns_available("captured_connection_to_a_non_mesh_workload_passes_through_with_the_mark") {
        return;
    }
    let mut mesh = Mesh::start("");
    let stream = connect_in(&mesh.topology.pod, &format!("{PLAIN_IP}:9090"));
    let client = stream.local_addr().unwrap();
    let seen = echo_through(stream, 64 * 1024);
    // The proxy connected (from the pod's address, on a port of its own); its marked connection was
    // not captured again, or it would have looped back into the proxy.
    assert_eq!(seen.ip().to_string(), POD_IP);
    assert_ne!(
        seen, client,
        "the echo server saw the client itself: the connection was not captured"
    );
    let needles = [
        "direction=\"outbound\"".to_owned(),
        format!("src.addr={client}"),
        format!("dst.addr={PLAIN_IP}:9090"),
        "bytes_sent=65536 ".to_owned(),
    ];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    mesh.a.wait_for(
        |log| {
            log.lines()
                .any(|l| l.contains("access") && needles.iter().all(|n| l.contains(n)))
        },
        "the passthrough access log line",
    );
    let log = mesh.a.log();
    assert!(log.contains("upstream connections carry the packet mark"), "{log}");
    assert!(!log.contains("src.identity"), "passthrough is not mTLS: {log}");
    assert_eq!(mesh.a.access_lines(&["direction=\"outbound\""]).len(), 1, "{log}");
}

#[test]
fn inbound_plaintext_is_authorized_without_a_peer_identity() {
    if !netns_available("inbound_plaintext_is_authorized_without_a_peer_identity") {
        return;
    }
    let mut mesh = Mesh::start("");
    // No policy: allowed. The echo server in the pod sees the proxy's connection from the pod's own
    // address, not the peer's: PREROUTING redirected it to the inbound plaintext listener.
    let stream = connect_in(&mesh.topology.peer, &format!("{POD_IP}:7070"));
    let seen = echo_through(stream, 32 * 1024);
    assert_eq!(seen.ip().to_string(), POD_IP, "not proxied");
    mesh.a.wait_for(
        |log| {
            log.lines()
                .any(|l| l.contains("access") && l.contains("direction=\"inbound\"") && l.contains("bytes_recv=32768 "))
        },
        "the inbound plaintext access log line",
    );
    assert!(
        mesh.a
            .access_lines(&["direction=\"inbound\"", "src.identity"])
            .is_empty(),
        "plaintext has no peer identity: {}",
        mesh.a.log()
    );

    // An established connection, then an ALLOW policy that requires a principal: plaintext has
    // none, so the policy refuses new connections and closes the established one.
    let mut held = connect_in(&mesh.topology.peer, &format!("{POD_IP}:7070"));
    read_peer_line(&mut held).unwrap();
    held.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    held.read_exact(&mut pong).unwrap();
    mesh.rewrite_config(
        r#"
policies:
- name: mesh-only
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Prefix cluster.local/ns/]
"#,
    );
    assert!(
        refused(held),
        "the established plaintext connection was not closed by the new policy"
    );
    mesh.a.wait_for(
        |log| log.contains("connection closed by policy"),
        "the access log of the closed connection",
    );
    assert!(
        refused_in(&mesh.topology.peer, &format!("{POD_IP}:7070")),
        "a plaintext connection was allowed by a policy requiring a principal"
    );
    mesh.a.wait_for(
        |log| {
            log.lines()
                .any(|l| l.contains("access") && l.contains("direction=\"inbound\"") && l.contains("denied"))
        },
        "the access log line of the denied connection",
    );

    // HBONE from the client still passes the policy: it has a principal.
    let stream = connect_in(&mesh.topology.pod, &format!("{SERVER_IP}:8080"));
    assert_eq!(echo_through(stream, 1024).ip().to_string(), SERVER_IP);
}

#[test]
fn connections_to_the_capture_listeners_without_redirect_are_refused() {
    if !netns_available("connections_to_the_capture_listeners_without_redirect_are_refused") {
        return;
    }
    let mut mesh = Mesh::start("");
    let (pod, peer) = (mesh.topology.pod.clone(), mesh.topology.peer.clone());
    // From the pod over loopback (not redirected): the outbound listener itself.
    assert!(refused_in(&pod, "127.0.0.1:15001"));
    mesh.a.wait_for(
        |log| log.contains("not redirected") && log.contains("refused rather than looped"),
        "the refusal of the direct connection to the outbound listener",
    );
    // The inbound plaintext listener, directly.
    assert!(refused_in(&pod, &format!("{POD_IP}:15006")));
    mesh.a.wait_for(
        |log| log.contains("not redirected to the inbound plaintext listener"),
        "the refusal of the direct connection to the inbound plaintext listener",
    );
    // From the peer to the pod's port 15001: redirected to inbound plaintext, whose original
    // destination is the proxy's own port: refused, not looped.
    assert!(refused_in(&peer, &format!("{POD_IP}:15001")));
    mesh.a.wait_for(
        |log| log.contains("would loop"),
        "the refusal of an inbound connection to the proxy's own port",
    );
    // Still serving.
    let stream = connect_in(&pod, &format!("{SERVER_IP}:8080"));
    assert_eq!(echo_through(stream, 1024).ip().to_string(), SERVER_IP);
    mesh.a.wait_for(
        |log| log.contains("direction=\"outbound\""),
        "the access log line of the routed connection",
    );
    let outbound = mesh.a.access_lines(&["direction=\"outbound\""]);
    assert_eq!(outbound.len(), 1, "only the real connection was routed: {outbound:?}");
}

#[test]
fn redirect_script_is_idempotent_and_names_what_is_wrong() {
    if !netns_available("redirect_script_is_idempotent_and_names_what_is_wrong") {
        return;
    }
    let topology = Topology::new();
    let rules = |ns: &str| run(Command::new("ip").args(["netns", "exec", ns, "iptables", "-t", "nat", "-S"]));
    let before = rules(&topology.pod);
    topology.redirect("up");
    let once = rules(&topology.pod);
    topology.redirect("up");
    assert_eq!(rules(&topology.pod), once, "a second `up` changed the rules");
    for needle in [
        "-A OUTPUT -p tcp -j MESHWIRE_OUTPUT",
        "-A PREROUTING -p tcp -j MESHWIRE_PREROUTING",
        "-A MESHWIRE_OUTPUT -m mark --mark 0x539 -j RETURN",
        "-A MESHWIRE_OUTPUT -o lo -j RETURN",
        "-A MESHWIRE_OUTPUT -p tcp -m tcp --dport 15008 -j RETURN",
        "-A MESHWIRE_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "-A MESHWIRE_PREROUTING -p tcp -m tcp --dport 15008 -j RETURN",
        "-A MESHWIRE_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert!(once.contains(needle), "{needle} missing:\n{once}");
    }
    // Options change the rules in place.
    run(Command::new(REDIRECT).args([
        "up",
        "--netns",
        &topology.pod,
        "--mark",
        "42",
        "--outbound-port",
        "16001",
        "--exclude-ports",
        "22",
    ]));
    let changed = rules(&topology.pod);
    assert!(changed.contains("--mark 0x2a -j RETURN"), "{changed}");
    assert!(changed.contains("--to-ports 16001"), "{changed}");
    assert!(
        changed.contains("-A MESHWIRE_PREROUTING -p tcp -m tcp --dport 22 -j RETURN"),
        "{changed}"
    );
    assert_eq!(changed.matches("-j MESHWIRE_OUTPUT").count(), 1, "{changed}");
    topology.redirect("down");
    assert_eq!(rules(&topology.pod), before, "`down` left rules behind");
    topology.redirect("down");

    let fails = |args: &[&str], needle: &str| {
        let output = Command::new(REDIRECT).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };
    fails(
        &["up", "--netns", "mw-no-such-namespace"],
        "\"mw-no-such-namespace\" does not exist",
    );
    fails(&["up", "--mark", "0"], "invalid --mark \"0\"");
    fails(&["up", "--outbound-port", "70000"], "invalid --outbound-port \"70000\"");
    fails(&["up", "--exclude-ports", "22,x"], "invalid --exclude-ports \"x\"");
    fails(&["sideways"], "unknown argument: sideways");
    fails(&[], "no command");
}
