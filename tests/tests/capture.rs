//! Traffic capture end to end, in network namespaces made for each test: a proxy runs in a workload's
//! namespace whose TCP is redirected by `dataplane/scripts/redirect.sh`, and a second one serves the
//! peer namespace across a veth pair. Runs for every pair of binaries (pod side, peer side).
//!
//! ```text
//!   namespace "pod" (redirect rules)                 namespace "peer"
//!   10.77.0.1  workload "client" (HBONE)      veth   10.77.0.2  workload "server" (HBONE), whoami :8080
//!   proxy A: shared mode, node "pod"       <------>  10.77.0.3  workload "plain" (TCP), whoami :9090
//!   whoami :7070 (inbound plaintext target)          proxy B: shared mode, node "peer"
//! ```
//!
//! The whoami servers answer each connection with the address they saw it come from, then echo.
//! Needs root and iptables (see `meshwire_tests::netns::available`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshwire_tests::binary::{self, Binary};
use meshwire_tests::mesh::{Mesh, Ports, Proxy, repo_path};
use meshwire_tests::net;
use meshwire_tests::netns::{self, Netns};
use meshwire_tests::policy;

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PLAIN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

fn redirect_script() -> String {
    repo_path("dataplane/scripts/redirect.sh").to_str().unwrap().to_owned()
}

fn config_yaml(policies: &str) -> String {
    format!(
        r#"
workloads:
- {{uid: client, name: client, namespace: default, serviceAccount: client, workloadIps: ["{POD_IP}"], protocol: HBONE, node: pod}}
- {{uid: server, name: server, namespace: default, serviceAccount: server, workloadIps: ["{SERVER_IP}"], protocol: HBONE, node: peer}}
- {{uid: plain, name: plain, namespace: default, workloadIps: ["{PLAIN_IP}"], protocol: TCP, node: peer}}
{policies}
"#
    )
}

/// The namespaces, the rules, both proxies and the whoami servers.
struct Capture {
    // Dropped in this order: the proxies, the mesh, then the namespaces.
    a: Proxy,
    b: Proxy,
    mesh: Mesh,
    pod: Netns,
    peer: Netns,
}

impl Capture {
    /// The topology, with proxy A of `a` in the pod and proxy B of `b` in the peer namespace.
    fn start(a: &Binary, b: &Binary) -> Capture {
        let pod = Netns::new("cap-pod");
        let peer = Netns::new("cap-peer");
        pod.connect(IpAddr::V4(POD_IP), &peer, IpAddr::V4(SERVER_IP), 24);
        peer.ip(&["addr", "add", &format!("{PLAIN_IP}/32"), "dev", "lo"]);
        let out = netns::run(&redirect_script(), &["up", "--netns", pod.name()]);
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains("TCP redirected"), "{out}");

        let mesh = Mesh::new(&config_yaml(""));
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let proxy = |binary: &Binary, ns: &Netns, node: &str| {
            mesh.proxy(binary, any)
                .shared()
                .with_ports(Ports::ztunnel_defaults(any))
                .in_netns(ns)
                .drain_deadline(Duration::from_secs(1))
                .arg("--node-name")
                .arg(node)
                .arg("--ipv6")
                .arg("false")
                .spawn()
        };
        let a = proxy(a, &pod, "pod");
        let b = proxy(b, &peer, "peer");
        peer.whoami_server(SocketAddr::from((SERVER_IP, 8080)));
        peer.whoami_server(SocketAddr::from((PLAIN_IP, 9090)));
        pod.whoami_server(SocketAddr::from((POD_IP, 7070)));
        Capture { a, b, mesh, pod, peer }
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.a.describe(), self.b.describe())
    }

    /// Replaces the configuration's policies and waits until both proxies applied the change.
    fn rewrite_config(&mut self, policies: &str) {
        self.mesh.write_config(&config_yaml(policies));
        for proxy in [&mut self.a, &mut self.b] {
            proxy.expect_log(
                &["applied a change of the local configuration"],
                "reload of the configuration",
            );
        }
    }
}

/// Whether a connection from `ns` to `addr` is refused: reset (possibly before `connect` returned)
/// or closed without a byte.
fn refused_in(ns: &Netns, addr: SocketAddr) -> bool {
    match ns.tcp_connect(addr) {
        Ok(stream) => net::refused(stream),
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn captured_connection_to_a_mesh_workload_arrives_over_hbone_with_the_source_identity() {
    if !netns::available("captured_connection_to_a_mesh_workload_arrives_over_hbone_with_the_source_identity") {
        return;
    }
    for (a, b) in binary::pairs() {
        let mut capture = Capture::start(&a, &b);
        let len = 256 * 1024;
        // A plain client in the pod connects to the server workload's IP: captured by OUTPUT, carried
        // over HBONE by proxy A to proxy B, which connects the whoami server from the server's address.
        let stream = capture.pod.connect_or_panic(SocketAddr::from((SERVER_IP, 8080)));
        let client = stream.local_addr().unwrap();
        let seen = net::whoami_echo(stream, len);
        assert_eq!(
            seen.ip(),
            IpAddr::V4(SERVER_IP),
            "{a} -> {b}: the whoami server was reached by proxy B\n{}",
            capture.logs()
        );

        let line_len = seen.to_string().len() + 1;
        capture.b.expect_log(
            &[
                "access",
                "direction=\"inbound\"",
                &format!("src.identity=\"{CLIENT_ID}\""),
                &format!("dst.identity=\"{SERVER_ID}\""),
                &format!("dst.hbone_addr={SERVER_IP}:8080"),
            ],
            "the inbound access log line with the client's identity",
        );
        // Proxy A logs the outbound side with the bytes the client sent and received.
        capture.a.expect_log(
            &[
                "access",
                "direction=\"outbound\"",
                &format!("src.addr={client}"),
                &format!("src.identity=\"{CLIENT_ID}\""),
                &format!("dst.addr={SERVER_IP}:15008"),
                &format!("bytes_sent={len} "),
                &format!("bytes_recv={} ", len + line_len),
            ],
            "the outbound access log line",
        );
        assert!(
            capture.a.log_lines(&["access", "error="]).is_empty(),
            "{a} -> {b}\n{}",
            capture.logs()
        );
    }
}

#[test]
fn captured_connection_to_a_non_mesh_workload_passes_through_with_the_mark() {
    if !netns::available("captured_connection_to_a_non_mesh_workload_passes_through_with_the_mark") {
        return;
    }
    for (a, b) in binary::pairs() {
        let mut capture = Capture::start(&a, &b);
        let stream = capture.pod.connect_or_panic(SocketAddr::from((PLAIN_IP, 9090)));
        let client = stream.local_addr().unwrap();
        let seen = net::whoami_echo(stream, 64 * 1024);
        // The proxy connected (from the pod's address, on a port of its own); its marked connection
        // was not captured again, or it would have looped back into the proxy.
        assert_eq!(seen.ip(), IpAddr::V4(POD_IP), "{a}\n{}", capture.logs());
        assert_ne!(
            seen, client,
            "{a}: the whoami server saw the client itself: the connection was not captured"
        );
        capture.a.expect_log(
            &[
                "access",
                "direction=\"outbound\"",
                &format!("src.addr={client}"),
                &format!("dst.addr={PLAIN_IP}:9090"),
                "bytes_sent=65536 ",
            ],
            "the passthrough access log line",
        );
        let log = capture.a.log();
        assert!(log.contains("upstream connections carry the packet mark"), "{log}");
        assert!(!log.contains("src.identity"), "passthrough is not mTLS: {log}");
        assert_eq!(
            capture.a.log_lines(&["access", "direction=\"outbound\""]).len(),
            1,
            "{log}"
        );
    }
}

#[test]
fn inbound_plaintext_is_authorized_without_a_peer_identity() {
    if !netns::available("inbound_plaintext_is_authorized_without_a_peer_identity") {
        return;
    }
    for (a, b) in binary::pairs() {
        let mut capture = Capture::start(&a, &b);
        let to_pod = SocketAddr::from((POD_IP, 7070));
        // No policy: allowed. The whoami server in the pod sees the proxy's connection from the
        // pod's own address, not the peer's: PREROUTING redirected it to the inbound plaintext
        // listener.
        let stream = capture.peer.connect_or_panic(to_pod);
        let seen = net::whoami_echo(stream, 32 * 1024);
        assert_eq!(seen.ip(), IpAddr::V4(POD_IP), "{a}: not proxied\n{}", capture.logs());
        capture.a.expect_log(
            &["access", "direction=\"inbound\"", "bytes_recv=32768 "],
            "the inbound plaintext access log line",
        );
        assert!(
            capture
                .a
                .log_lines(&["access", "direction=\"inbound\"", "src.identity"])
                .is_empty(),
            "plaintext has no peer identity: {}",
            capture.a.describe()
        );

        // An established connection, then an ALLOW policy that requires a principal: plaintext has
        // none, so the policy refuses new connections and closes the established one.
        let mut held = capture.peer.connect_or_panic(to_pod);
        net::whoami_peer(&mut held).unwrap();
        held.write_all(b"ping").unwrap();
        let mut pong = [0u8; 4];
        held.read_exact(&mut pong).unwrap();
        let mesh_only = policy::namespace_policy(
            "default",
            "mesh-only",
            "Allow",
            false,
            "principals: [!Prefix cluster.local/ns/]",
        );
        capture.rewrite_config(&format!("policies:{mesh_only}"));
        assert!(
            net::refused(held),
            "{a}: the established plaintext connection was not closed by the new policy\n{}",
            capture.logs()
        );
        capture.a.expect_log(
            &["connection closed by policy"],
            "the access log of the closed connection",
        );
        assert!(
            refused_in(&capture.peer, to_pod),
            "{a}: a plaintext connection was allowed by a policy requiring a principal\n{}",
            capture.logs()
        );
        capture.a.expect_log(
            &["access", "direction=\"inbound\"", "denied"],
            "the access log line of the denied connection",
        );

        // HBONE from the client still passes the policy: it has a principal.
        let stream = capture.pod.connect_or_panic(SocketAddr::from((SERVER_IP, 8080)));
        assert_eq!(net::whoami_echo(stream, 1024).ip(), IpAddr::V4(SERVER_IP));
    }
}

#[test]
fn connections_to_the_capture_listeners_without_redirect_are_refused() {
    if !netns::available("connections_to_the_capture_listeners_without_redirect_are_refused") {
        return;
    }
    for (a, b) in binary::pairs() {
        let mut capture = Capture::start(&a, &b);
        // From the pod over loopback (not redirected): the outbound listener itself.
        assert!(refused_in(&capture.pod, SocketAddr::from((Ipv4Addr::LOCALHOST, 15001))));
        capture.a.expect_log(
            &["not redirected", "refused rather than looped"],
            "the refusal of the direct connection to the outbound listener",
        );
        // The inbound plaintext listener, directly.
        assert!(refused_in(&capture.pod, SocketAddr::from((POD_IP, 15006))));
        capture.a.expect_log(
            &["not redirected to the inbound plaintext listener"],
            "the refusal of the direct connection to the inbound plaintext listener",
        );
        // From the peer to the pod's port 15001: redirected to inbound plaintext, whose original
        // destination is the proxy's own port: refused, not looped.
        assert!(refused_in(&capture.peer, SocketAddr::from((POD_IP, 15001))));
        capture.a.expect_log(
            &["would loop"],
            "the refusal of an inbound connection to the proxy's own port",
        );
        // Still serving.
        let stream = capture.pod.connect_or_panic(SocketAddr::from((SERVER_IP, 8080)));
        assert_eq!(net::whoami_echo(stream, 1024).ip(), IpAddr::V4(SERVER_IP));
        capture.a.expect_log(
            &["access", "direction=\"outbound\""],
            "the access log line of the routed connection",
        );
        let outbound = capture.a.log_lines(&["access", "direction=\"outbound\""]);
        assert_eq!(
            outbound.len(),
            1,
            "{a}: only the real connection was routed: {outbound:?}"
        );
    }
}

#[test]
fn redirect_script_is_idempotent_and_names_what_is_wrong() {
    if !netns::available("redirect_script_is_idempotent_and_names_what_is_wrong") {
        return;
    }
    let script = redirect_script();
    let pod = Netns::new("redir");
    let rules = || String::from_utf8_lossy(&pod.exec("iptables", &["-t", "nat", "-S"]).stdout).into_owned();
    let redirect = |command: &str| netns::run(&script, &[command, "--netns", pod.name()]);
    let before = rules();
    redirect("up");
    let once = rules();
    redirect("up");
    assert_eq!(rules(), once, "a second `up` changed the rules");
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
    netns::run(
        &script,
        &[
            "up",
            "--netns",
            pod.name(),
            "--mark",
            "42",
            "--outbound-port",
            "16001",
            "--exclude-ports",
            "22",
        ],
    );
    let changed = rules();
    assert!(changed.contains("--mark 0x2a -j RETURN"), "{changed}");
    assert!(changed.contains("--to-ports 16001"), "{changed}");
    assert!(
        changed.contains("-A MESHWIRE_PREROUTING -p tcp -m tcp --dport 22 -j RETURN"),
        "{changed}"
    );
    assert_eq!(changed.matches("-j MESHWIRE_OUTPUT").count(), 1, "{changed}");
    redirect("down");
    assert_eq!(rules(), before, "`down` left rules behind");
    redirect("down");

    let fails = |args: &[&str], needle: &str| {
        let output = std::process::Command::new(&script).args(args).output().unwrap();
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
