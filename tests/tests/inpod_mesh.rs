//! In-pod mode as a mesh: node proxies serving pods handed over by a fake istio-cni
//! ([`FakeCni`]), pods as network namespaces with istio-cni's rules on one bridge, and traffic
//! between pods from plain TCP clients inside them (captured by istio-cni's rules, carried over
//! HBONE between the pods' listeners).
//!
//! ```text
//!   bridge br0 (a namespace of its own), 10.79.1.0/24
//!     |-- pod a  10.79.1.1 (sa a)
//!     |-- pod b  10.79.1.2 (sa b), whoami :8080
//!     |-- pod c  10.79.1.3 (sa c) ...
//!
//!   ztunnel (host namespace, node n1 [and n2], INPOD_ENABLED): 15001/15006/15008 inside the pods
//! ```
//!
//! - policies on a pod by the identities of the pods that call it;
//! - istio-cni reconnecting: the new session's snapshot keeps some pods, adds one, leaves one out;
//! - a deleted pod's own outbound connections, closed with it;
//! - a pod whose port is taken: NACKed, named by readiness, started by the retry;
//! - a pod on a second node, served by a second proxy;
//! - an upgrade: a second proxy takes the pods over while the first drains;
//! - a drain waiting for a pod's outbound connection;
//! - `scripts/inpod-demo.sh`, the one-machine demo, end to end.
//!
//! Every scenario is a function of the [`Binary`] it runs; the wrappers run `ztunnel` and
//! `ztunnel-uring`. Needs root and iptables (see
//! `meshwire_tests::netns::available`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use meshwire_testkit::cni::FakeCni;
use meshwire_tests::binary::Binary;
use meshwire_tests::inpod::{
    Lan, POD_PORTS, Pod, ack, add, blocking, closed_within, echo, eventually, inpod_proxy, keep, listening_ports,
    ready, snapshot, snapshot_sent, start, wait_ready,
};
use meshwire_tests::mesh::{AccessLine, Mesh, Proxy, repo_path};
use meshwire_tests::net;
use meshwire_tests::netns;

/// The limit of every wait (generous: the machine may be busy; nothing is timed).
const LIMIT: Duration = Duration::from_secs(30);

/// How long a draining proxy is watched for not exiting while a connection is open (a proxy that
/// does not wait for it exits within milliseconds).
const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// The whoami server's port in pod b.
const WHOAMI_PORT: u16 = 8080;

/// `10.79.1.<n>`, an address on the test's bridge.
fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 79, 1, n)
}

/// Starts a whoami server (its client's address, then an echo) on `pod`'s port 8080; its address.
fn serve_whoami(pod: &Pod) -> SocketAddr {
    pod.ns
        .whoami_server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, WHOAMI_PORT)));
    SocketAddr::from((pod.ip, WHOAMI_PORT))
}

/// A connection from `from` to the whoami server of a pod at `target`, answered: the server saw it
/// come from `from`'s address (the client's address is kept, `ENABLE_ORIG_SRC` being on by default
/// in in-pod mode) and echoes. Panics with `proxy`'s log otherwise.
async fn answered(from: &Pod, target: SocketAddr, proxy: &Proxy) -> TcpStream {
    answered_from(from, target, from.ip, proxy).await
}

/// A connection from `from` to the whoami server at `target`, answered: the server saw it come
/// from `seen_from`, and echoes. Panics with `proxy`'s log otherwise.
async fn answered_from(from: &Pod, target: SocketAddr, seen_from: Ipv4Addr, proxy: &Proxy) -> TcpStream {
    let pod = from.clone();
    let result = blocking(move || {
        let (seen, mut stream) = pod.whoami(target)?;
        echo(&mut stream, format!("from pod {}", pod.name).as_bytes()).map_err(|e| format!("the echo: {e}"))?;
        Ok::<_, String>((seen, stream))
    })
    .await;
    match result {
        Ok((seen, stream)) => {
            assert_eq!(seen.ip(), IpAddr::V4(seen_from), "the whoami server's client address");
            stream
        }
        Err(e) => panic!("pod {} -> {target}: {e}\n{}", from.name, proxy.describe()),
    }
}

/// Waits until `proxy` logged a line containing every one of `needles`.
async fn wait_log(proxy: &Proxy, needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(line) = proxy.log_lines(needles).into_iter().next() {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {needles:?} within {LIMIT:?}\n{}",
            proxy.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `proxy` logged an access line of `direction` for which `matches` holds; returns it.
async fn wait_access_line(proxy: &Proxy, direction: &str, matches: impl Fn(&AccessLine) -> bool) -> AccessLine {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(line) = proxy.access_lines(direction).into_iter().find(&matches) {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no matching {direction} access line within {LIMIT:?}\n{}",
            proxy.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `line` is of a connection from pod `src` to pod `dst` with their identities.
fn between(line: &AccessLine, src: &Pod, dst: &Pod) -> bool {
    line.get("src.identity") == Some(&format!("spiffe://{}", src.principal())[..])
        && line.get("dst.identity") == Some(&format!("spiffe://{}", dst.principal())[..])
}

/// A policy of `default` selecting workloads that name it (`authorizationPolicies`): `action`
/// (`Allow`, `Deny`) for connections from `principal`; an item of a `policies:` list.
fn selector_policy(name: &str, action: &str, principal: &str) -> String {
    format!(
        "- name: {name}\n  namespace: default\n  scope: WorkloadSelector\n  action: {action}\n  dryRun: false\n  \
         rules:\n  - - - principals: [!Exact {principal}]\n"
    )
}

// ------------------------------------------------------------------------------------------------
// 1. Policy by pod identity.

/// Pods a and c (service accounts a and c) call b; policies on b (the local configuration's,
/// selecting b) let a in and refuse c, told apart by the identity each pod's HBONE tunnel presents.
async fn policy_by_pod_identity(binary: Binary) {
    let lan = Lan::new("pol");
    let a = lan.pod("pola", "a", "a", ip(1));
    let b = lan.pod("polb", "b", "b", ip(2));
    let c = lan.pod("polc", "c", "c", ip(3));
    let target = serve_whoami(&b);
    let config = |policies: &str| {
        format!(
            "workloads:\n{}{}{}{policies}",
            a.workload("n1", ""),
            b.workload("n1", ", authorizationPolicies: [default/b-deny-c, default/b-allow-a]"),
            c.workload("n1", ""),
        )
    };
    let mesh = Mesh::new(&config(""));
    let mut cni = FakeCni::start();
    let proxy = start(inpod_proxy(&mesh, &binary, "n1", cni.path())).await;
    let conn = cni.next_connection().await;
    snapshot(&conn, &[&a, &b, &c], &proxy).await;
    wait_ready(&proxy).await;

    // Without policies both reach b: a refusal below is the policies' doing.
    answered(&a, target, &proxy).await;
    answered(&c, target, &proxy).await;

    let phases = [
        (
            "DENY c",
            selector_policy("b-deny-c", "Deny", &c.principal()),
            "explicitly denied by: default/b-deny-c",
        ),
        (
            "ALLOW a only",
            selector_policy("b-allow-a", "Allow", &a.principal()),
            "allow policies exist, but none allowed",
        ),
    ];
    for (phase, policy, reason) in phases {
        mesh.write_config(&config(&format!("policies:\n{policy}")));
        // The proxy applies the file within its poll interval: c is refused from then on.
        let pod = c.clone();
        eventually(&format!("{phase}: c refused"), LIMIT, move || pod.whoami(target).err()).await;
        let pod = c.clone();
        let refused = blocking(move || pod.whoami(target)).await;
        assert!(refused.is_err(), "{phase}: c reached b: {refused:?}");
        // a is let in, over the same listeners.
        answered(&a, target, &proxy).await;
        // b's side refused c's tunnel by c's identity, for the policy's reason.
        let line = wait_access_line(&proxy, "inbound", |line| {
            between(line, &c, &b) && line.get("error").is_some_and(|e| e.contains(reason))
        })
        .await;
        assert_eq!(line.get("dst.workload"), Some("b"), "{line:?}");

        // Without the policy c reaches b again (so the next phase's refusal is its own).
        mesh.write_config(&config(""));
        let pod = c.clone();
        eventually(&format!("after {phase}: c reaches b"), LIMIT, move || {
            pod.whoami(target).ok()
        })
        .await;
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_by_pod_identity_ztunnel() {
    if netns::available("policy_by_pod_identity_ztunnel") {
        policy_by_pod_identity(Binary::ztunnel()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_by_pod_identity_ztunnel_uring() {
    if netns::available("policy_by_pod_identity_ztunnel_uring") {
        policy_by_pod_identity(Binary::ztunnel_uring()).await;
    }
}

// ------------------------------------------------------------------------------------------------
// 2. Reconcile after an istio-cni reconnect.

/// istio-cni drops its connection (a restart); the proxy dials again; the new session's snapshot
/// keeps a and b (`KeepWorkload`), adds d, and leaves c out: c is drained (its listeners close,
/// the connection a had established to it closes), a's established connection to b lives on, d is
/// served, and readiness answers 200 once the snapshot is in.
async fn reconcile_after_istio_cni_reconnect(binary: Binary) {
    let lan = Lan::new("rec");
    let a = lan.pod("reca", "a", "a", ip(1));
    let b = lan.pod("recb", "b", "b", ip(2));
    let c = lan.pod("recc", "c", "c", ip(3));
    let d = lan.pod("recd", "d", "d", ip(4));
    let to_b = serve_whoami(&b);
    let to_c = serve_whoami(&c);
    let mesh = Mesh::new(&format!(
        "workloads:\n{}{}{}{}",
        a.workload("n1", ""),
        b.workload("n1", ""),
        c.workload("n1", ""),
        d.workload("n1", "")
    ));
    let mut cni = FakeCni::start();
    let proxy = start(inpod_proxy(&mesh, &binary, "n1", cni.path())).await;
    let readiness = proxy.ports().readiness;
    let first = cni.next_connection().await;
    snapshot(&first, &[&a, &b, &c], &proxy).await;
    wait_ready(&proxy).await;

    // Established connections: a -> b (both pods are kept) and a -> c (c will be left out).
    let mut kept = answered(&a, to_b, &proxy).await;
    let mut dropped = answered(&a, to_c, &proxy).await;

    // istio-cni restarts: the connection drops, and the proxy dials again.
    drop(first);
    let second = tokio::time::timeout(LIMIT, cni.next_connection())
        .await
        .unwrap_or_else(|_| panic!("the proxy did not dial istio-cni again\n{}", proxy.describe()));
    assert_eq!(keep(&second, &a, &proxy).await, "", "KeepWorkload of a");
    // Until the new session's snapshot is in, the proxy is not ready.
    let (status, body) = blocking(move || ready(readiness)).await;
    assert_eq!(status, 500, "ready before the new session's snapshot: {body}");
    assert!(body.contains("snapshot"), "{body}");
    assert_eq!(keep(&second, &b, &proxy).await, "", "KeepWorkload of b");
    assert_eq!(add(&second, &d, &proxy).await, "", "AddWorkload of d");
    snapshot_sent(&second, &proxy).await;
    wait_ready(&proxy).await;

    // c, left out, is drained: the connection to it closes, its listeners go.
    let closed = blocking(move || closed_within(&mut dropped, LIMIT)).await;
    assert!(
        closed,
        "a's connection to c stayed open after the snapshot left c out\n{}",
        proxy.describe()
    );
    let pod = c.clone();
    eventually("c's listeners closed", LIMIT, move || {
        listening_ports(&pod.ns).is_empty().then_some(())
    })
    .await;
    // c's own traffic is no longer carried: its rules redirect to a 15001 nobody listens on.
    let pod = c.clone();
    let refused = blocking(move || pod.whoami(to_b)).await;
    assert!(refused.is_err(), "c reached b after it was drained: {refused:?}");

    // a's connection to b survived the reconnect and keeps working.
    let (result, mut kept) = blocking(move || {
        let result = echo(&mut kept, b"after istio-cni's reconnect");
        (result, kept)
    })
    .await;
    result.unwrap_or_else(|e| panic!("a's established connection broke: {e}\n{}", proxy.describe()));

    // a, b and d are served; d, added by the new session, reaches b.
    for pod in [&a, &b, &d] {
        let ns = pod.ns.clone();
        let ports = blocking(move || listening_ports(&ns)).await;
        assert_eq!(ports, POD_PORTS, "pod {}", pod.name);
    }
    answered(&d, to_b, &proxy).await;

    // a's connection ends cleanly when a closes it: every byte echoed, then the end of stream.
    let ended = blocking(move || {
        kept.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        kept.read_to_end(&mut rest).map(|_| rest)
    })
    .await;
    assert_eq!(ended.unwrap(), b"", "a's connection after its half close");
    // The connection to c was closed by c's side for the pod's removal.
    let line = wait_access_line(&proxy, "inbound", |line| between(line, &a, &c)).await;
    assert!(
        line.get("error")
            .is_some_and(|e| e.contains("pod uid-c is no longer served")),
        "{line:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_after_istio_cni_reconnect_ztunnel() {
    if netns::available("reconcile_after_istio_cni_reconnect_ztunnel") {
        reconcile_after_istio_cni_reconnect(Binary::ztunnel()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_after_istio_cni_reconnect_ztunnel_uring() {
    if netns::available("reconcile_after_istio_cni_reconnect_ztunnel_uring") {
        reconcile_after_istio_cni_reconnect(Binary::ztunnel_uring()).await;
    }
}

/// A pod istio-cni deletes has its own outbound connections closed too, not only those made to
/// it: pod c's established connection to b (captured in c, carried by c's listener 15001) closes
/// when c is deleted, as ztunnel drains a removed pod's proxy, both ways.
async fn a_removed_pods_outbound_connections_close(binary: Binary) {
    let lan = Lan::new("out");
    let b = lan.pod("outb", "b", "b", ip(2));
    let c = lan.pod("outc", "c", "c", ip(3));
    let to_b = serve_whoami(&b);
    let mesh = Mesh::new(&format!("workloads:\n{}{}", b.workload("n1", ""), c.workload("n1", "")));
    let mut cni = FakeCni::start();
    let proxy = start(inpod_proxy(&mesh, &binary, "n1", cni.path())).await;
    let conn = cni.next_connection().await;
    snapshot(&conn, &[&b, &c], &proxy).await;
    wait_ready(&proxy).await;
    let mut outbound = answered(&c, to_b, &proxy).await;

    assert!(conn.del(&c.uid).await);
    assert_eq!(ack(&conn, &proxy).await, "", "DelWorkload of c");
    let pod = c.clone();
    eventually("c's listeners closed", LIMIT, move || {
        listening_ports(&pod.ns).is_empty().then_some(())
    })
    .await;
    let closed = blocking(move || closed_within(&mut outbound, LIMIT)).await;
    assert!(
        closed,
        "c's own connection to b stayed open after istio-cni deleted c\n{}",
        proxy.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pods_outbound_connections_close_ztunnel() {
    if netns::available("a_removed_pods_outbound_connections_close_ztunnel") {
        a_removed_pods_outbound_connections_close(Binary::ztunnel()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pods_outbound_connections_close_ztunnel_uring() {
    if netns::available("a_removed_pods_outbound_connections_close_ztunnel_uring") {
        a_removed_pods_outbound_connections_close(Binary::ztunnel_uring()).await;
    }
}

// ------------------------------------------------------------------------------------------------
// 3. A pod whose port is taken.

/// Something already listens on 15008 inside pod b (without `SO_REUSEPORT`) when istio-cni adds b:
/// the Add is NACKed naming the port, readiness answers 500 naming the pod, none of b's listeners
/// is left open; once the blocker is gone, the proxy's retry starts b, readiness answers 200, and
/// a reaches b.
async fn a_pod_whose_port_is_taken_is_nacked_and_retried(binary: Binary) {
    let lan = Lan::new("nak");
    let a = lan.pod("naka", "a", "a", ip(1));
    let b = lan.pod("nakb", "b", "b", ip(2));
    let target = serve_whoami(&b);
    // std's listener has SO_REUSEADDR, not SO_REUSEPORT: nobody else binds 15008 in b.
    let blocker =
        b.ns.enter(|| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 15008)))
            .expect("binding 15008 inside pod b");
    let mesh = Mesh::new(&format!("workloads:\n{}{}", a.workload("n1", ""), b.workload("n1", "")));
    let mut cni = FakeCni::start();
    let proxy = start(inpod_proxy(&mesh, &binary, "n1", cni.path())).await;
    let readiness = proxy.ports().readiness;
    let conn = cni.next_connection().await;
    assert_eq!(add(&conn, &a, &proxy).await, "", "AddWorkload of a");
    let nack = add(&conn, &b, &proxy).await;
    assert!(nack.contains("15008"), "the NACK of b names the port: {nack:?}");
    snapshot_sent(&conn, &proxy).await;

    // Readiness names the pod and why.
    let (status, body) = blocking(move || ready(readiness)).await;
    assert_eq!(status, 500, "ready with pod b down: {body}");
    assert!(body.contains(&b.uid) && body.contains("15008"), "{body}");
    // Nothing of b's failed start is left listening (15008 is the blocker's).
    let ns = b.ns.clone();
    let ports = blocking(move || listening_ports(&ns)).await;
    assert!(
        !ports.contains(&15001) && !ports.contains(&15006),
        "pod b's failed start left listeners on {ports:?}"
    );
    // The retry runs and fails while the port is taken.
    wait_log(&proxy, &["cannot start the pod's listeners", &b.uid, "attempts=2"]).await;
    let (status, _) = blocking(move || ready(readiness)).await;
    assert_eq!(status, 500, "ready with the port still taken");

    // The blocker goes: a later retry starts b.
    drop(blocker);
    wait_ready(&proxy).await;
    wait_log(&proxy, &["the pod's listeners started on a retry", &b.uid]).await;
    let ns = b.ns.clone();
    let ports = blocking(move || listening_ports(&ns)).await;
    assert_eq!(ports, POD_PORTS, "pod b's listeners after the retry");
    answered(&a, target, &proxy).await;
    wait_access_line(&proxy, "inbound", |line| between(line, &a, &b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_port_is_taken_is_nacked_and_retried_ztunnel() {
    if netns::available("a_pod_whose_port_is_taken_is_nacked_and_retried_ztunnel") {
        a_pod_whose_port_is_taken_is_nacked_and_retried(Binary::ztunnel()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_port_is_taken_is_nacked_and_retried_ztunnel_uring() {
    if netns::available("a_pod_whose_port_is_taken_is_nacked_and_retried_ztunnel_uring") {
        a_pod_whose_port_is_taken_is_nacked_and_retried(Binary::ztunnel_uring()).await;
    }
}

// ------------------------------------------------------------------------------------------------
// 4. A pod on a second node.

/// Pod a on node n1, pod b on node n2, each node's proxy a process of its own with its own
/// istio-cni: a -> b leaves through n1's proxy inside pod a, over HBONE to n2's proxy's 15008
/// inside pod b, which delivers it; each proxy logs its side with both identities.
async fn a_pod_on_a_second_node(binary: Binary) {
    let lan = Lan::new("two");
    let a = lan.pod("twoa", "a", "a", ip(1));
    let b = lan.pod("twob", "b", "b", ip(2));
    let target = serve_whoami(&b);
    let mesh = Mesh::new(&format!("workloads:\n{}{}", a.workload("n1", ""), b.workload("n2", "")));
    let (mut cni1, mut cni2) = (FakeCni::start(), FakeCni::start());
    let n1 = start(inpod_proxy(&mesh, &binary, "n1", cni1.path())).await;
    let n2 = start(inpod_proxy(&mesh, &binary, "n2", cni2.path())).await;
    let conn1 = cni1.next_connection().await;
    snapshot(&conn1, &[&a], &n1).await;
    let conn2 = cni2.next_connection().await;
    snapshot(&conn2, &[&b], &n2).await;
    wait_ready(&n1).await;
    wait_ready(&n2).await;

    let mut stream = answered(&a, target, &n1).await;
    let ended = blocking(move || {
        echo(&mut stream, b"across two nodes").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).map(|_| rest)
    })
    .await;
    assert_eq!(ended.unwrap(), b"");

    // n1 carried it out of pod a, to pod b's HBONE port; n2 took it in.
    let hbone = SocketAddr::from((b.ip, 15008)).to_string();
    let out = wait_access_line(&n1, "outbound", |line| between(line, &a, &b)).await;
    assert_eq!(out.get("dst.addr"), Some(&hbone[..]), "{out:?}");
    assert_eq!(out.get("dst.hbone_addr"), Some(&target.to_string()[..]), "{out:?}");
    assert!(
        out.get("src.addr")
            .is_some_and(|addr| addr.starts_with(&format!("{}:", a.ip))),
        "{out:?}"
    );
    let inbound = wait_access_line(&n2, "inbound", |line| between(line, &a, &b)).await;
    assert!(
        inbound
            .get("src.addr")
            .is_some_and(|addr| addr.starts_with(&format!("{}:", a.ip))),
        "{inbound:?}"
    );
    assert_eq!(inbound.get("dst.workload"), Some("b"), "{inbound:?}");
    // Neither proxy served the other node's side.
    assert!(n1.access_lines("inbound").is_empty(), "{}", n1.describe());
    assert!(n2.access_lines("outbound").is_empty(), "{}", n2.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_on_a_second_node_ztunnel() {
    if netns::available("a_pod_on_a_second_node_ztunnel") {
        a_pod_on_a_second_node(Binary::ztunnel()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_on_a_second_node_ztunnel_uring() {
    if netns::available("a_pod_on_a_second_node_ztunnel_uring") {
        a_pod_on_a_second_node(Binary::ztunnel_uring()).await;
    }
}

// ------------------------------------------------------------------------------------------------
// 5. Upgrade hand-over.

/// New connections from pod `from` to `target`, one after another (whoami, an echo, a clean end),
/// on a thread, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    thread: Option<thread::JoinHandle<Vec<String>>>,
}

impl Drop for Traffic {
    /// Stops the thread and waits for it, also when a test fails: it holds pod a's namespace,
    /// removed when the last holder lets go.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Traffic {
    fn start(from: &Pod, target: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let (pod, flag, count) = (from.clone(), stop.clone(), ok.clone());
        let thread = thread::spawn(move || {
            let mut failed = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let outcome = pod.whoami(target).and_then(|(_, mut stream)| {
                    echo(&mut stream, b"a new connection").map_err(|e| format!("the echo: {e}"))?;
                    stream.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                    let mut rest = Vec::new();
                    match stream.read_to_end(&mut rest) {
                        Ok(_) if rest.is_empty() => Ok(()),
                        Ok(_) => Err(format!("{} bytes after the echo", rest.len())),
                        Err(e) => Err(format!("the end of the connection: {e}")),
                    }
                });
                match outcome {
                    Ok(()) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failed.push(e),
                }
                thread::sleep(Duration::from_millis(20));
            }
            failed
        });
        Traffic {
            stop,
            ok,
            thread: Some(thread),
        }
    }

    /// Connections that succeeded so far.
    fn ok(&self) -> u32 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `more` connections succeeded from now on.
    async fn wait_for(&self, more: u32, what: &str) {
        let target = self.ok() + more;
        let deadline = tokio::time::Instant::now() + LIMIT;
        while self.ok() < target {
            assert!(
                tokio::time::Instant::now() < deadline && self.thread.as_ref().is_some_and(|t| !t.is_finished()),
                "{what}: {} new connections succeeded, {target} expected",
                self.ok()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops; the connections that succeeded, and why the others failed.
    async fn stop(mut self) -> (u32, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("the traffic thread");
        let failed = blocking(move || thread.join().expect("the traffic thread panicked")).await;
        (self.ok.load(Ordering::SeqCst), failed)
    }
}

/// An upgrade: proxy 1 serves pods a and b (`INPOD_PORT_REUSE` on, its default) and carries a
/// long-lived connection a -> b; proxy 2 dials the same istio-cni, gets the same snapshot, binds
/// the pods' listeners beside proxy 1's and becomes ready; proxy 1 gets SIGTERM and drains. The
/// long-lived connection keeps working through the drain until the test closes it (no byte lost),
/// proxy 1 then exits having drained every connection, and new connections a -> b succeed during
/// and after the hand-over, those after it served by proxy 2.
async fn upgrade_hand_over(binary: Binary) {
    let lan = Lan::new("upg");
    let a = lan.pod("upga", "a", "a", ip(1));
    let b = lan.pod("upgb", "b", "b", ip(2));
    let target = serve_whoami(&b);
    let mesh = Mesh::new(&format!("workloads:\n{}{}", a.workload("n1", ""), b.workload("n1", "")));
    let mut cni = FakeCni::start();
    // A drain deadline far beyond the test's: proxy 1's drain ends when its connections do.
    let old = start(inpod_proxy(&mesh, &binary, "n1", cni.path()).drain_deadline(Duration::from_secs(300))).await;
    let first = cni.next_connection().await;
    snapshot(&first, &[&a, &b], &old).await;
    wait_ready(&old).await;
    let held = answered(&a, target, &old).await;
    let held = Arc::new(std::sync::Mutex::new(held));
    let exchange = |step: &'static str| {
        let held = held.clone();
        async move {
            let result = blocking(move || {
                let mut stream = held.lock().unwrap();
                echo(&mut stream, &net::payload(64 * 1024, step.len() as u64))
            })
            .await;
            result.map_err(|e| format!("{step}: {e}"))
        }
    };

    // Proxy 2: the same istio-cni socket, the same snapshot.
    let new = start(inpod_proxy(&mesh, &binary, "n1", cni.path())).await;
    let second = tokio::time::timeout(LIMIT, cni.next_connection())
        .await
        .unwrap_or_else(|_| panic!("proxy 2 did not dial istio-cni\n{}", new.describe()));
    snapshot(&second, &[&a, &b], &new).await;
    wait_ready(&new).await;
    exchange("with both proxies up")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", old.describe()));

    let traffic = Traffic::start(&a, target);
    traffic.wait_for(3, "before the drain").await;
    old.signal("TERM");
    wait_log(&old, &["draining"]).await;
    // New connections succeed while proxy 1 drains...
    traffic.wait_for(5, "during the drain").await;
    // ...and the long-lived one keeps working through it.
    exchange("during the drain")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", old.describe()));
    // Proxy 1 still runs a while into its drain (a proxy that does not wait exits at once).
    let (exited, mut old) = blocking(move || {
        let mut old = old;
        (old.wait_exit(DRAIN_GRACE), old)
    })
    .await;
    assert!(
        exited.is_none(),
        "proxy 1 exited with a connection open\n{}",
        old.describe()
    );
    exchange("later in the drain")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", old.describe()));

    // The test closes it: every byte came back, then the end of stream.
    let held = Arc::try_unwrap(held).unwrap().into_inner().unwrap();
    let ended = blocking(move || {
        let mut held = held;
        held.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        held.read_to_end(&mut rest).map(|_| rest)
    })
    .await;
    assert_eq!(ended.unwrap(), b"", "the long-lived connection after its half close");
    // Proxy 1's drain completes with its last connection, and it exits.
    let (status, old) = blocking(move || {
        let status = old.wait_exit(LIMIT);
        (status, old)
    })
    .await;
    assert!(
        status.is_some_and(|s| s.success()),
        "proxy 1's exit: {status:?}\n{}",
        old.describe()
    );
    assert!(
        !old.log_lines(&["drained: every connection ended"]).is_empty(),
        "{}",
        old.describe()
    );

    // After the hand-over proxy 2 serves the new connections.
    let after = traffic.ok();
    traffic.wait_for(5, "after the hand-over").await;
    let (ok, failed) = traffic.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed during the hand-over: {failed:?}\n{}\n{}",
        failed.len(),
        ok as usize + failed.len(),
        old.describe(),
        new.describe()
    );
    let served_after = (ok - after) as usize;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let lines = new.access_lines("outbound");
        let served = lines.iter().filter(|line| between(line, &a, &b)).count();
        if served >= served_after {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy 2 logged {served} connections a -> b, {served_after} made after proxy 1 exited\n{}",
            new.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hand_over_ztunnel() {
    if netns::available("upgrade_hand_over_ztunnel") {
        upgrade_hand_over(Binary::ztunnel()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hand_over_ztunnel_uring() {
    if netns::available("upgrade_hand_over_ztunnel_uring") {
        upgrade_hand_over(Binary::ztunnel_uring()).await;
    }
}

/// A drain waits for a pod's outbound connections too: pod a's connection to x, a server outside
/// the mesh (passthrough from inside a), keeps working after SIGTERM until it ends, within the
/// drain deadline.
async fn the_drain_waits_for_a_pods_outbound_connections(binary: Binary) {
    let lan = Lan::new("dro");
    let a = lan.pod("droa", "a", "a", ip(1));
    // x is no pod of the mesh: no istio-cni rules, not in the configuration.
    let x = lan.pod("drox", "x", "x", ip(9));
    meshwire_tests::inpod::script(&["down", "--netns", x.ns.name()]);
    let to_x = serve_whoami(&x);
    let mesh = Mesh::new(&format!("workloads:\n{}", a.workload("n1", "")));
    let mut cni = FakeCni::start();
    let mut proxy = start(inpod_proxy(&mesh, &binary, "n1", cni.path()).drain_deadline(Duration::from_secs(300))).await;
    let conn = cni.next_connection().await;
    snapshot(&conn, &[&a], &proxy).await;
    wait_ready(&proxy).await;
    let held = answered_from(&a, to_x, a.ip, &proxy).await;

    proxy.signal("TERM");
    wait_log(&proxy, &["draining"]).await;
    // Still running a while into the drain (a proxy that does not wait exits at once)...
    let (exited, proxy) = blocking(move || (proxy.wait_exit(DRAIN_GRACE), proxy)).await;
    assert!(
        exited.is_none(),
        "the proxy's drain ended with a pod's connection open\n{}",
        proxy.describe()
    );
    // ...and the connection still works.
    let (result, held) = blocking(move || {
        let mut held = held;
        (echo(&mut held, b"during the drain"), held)
    })
    .await;
    result.unwrap_or_else(|e| panic!("a's connection to x broke in the drain: {e}\n{}", proxy.describe()));
    drop(held);
    let mut proxy = proxy;
    let status = blocking(move || proxy.wait_exit(LIMIT)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_a_pods_outbound_connections_ztunnel() {
    if netns::available("the_drain_waits_for_a_pods_outbound_connections_ztunnel") {
        the_drain_waits_for_a_pods_outbound_connections(Binary::ztunnel()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_a_pods_outbound_connections_ztunnel_uring() {
    if netns::available("the_drain_waits_for_a_pods_outbound_connections_ztunnel_uring") {
        the_drain_waits_for_a_pods_outbound_connections(Binary::ztunnel_uring()).await;
    }
}

// ------------------------------------------------------------------------------------------------
// 6. The one-machine demo.

/// `scripts/inpod-demo.sh` end to end with the binary under test: it makes two pods, hands them to
/// the proxy with its Python istio-cni stand-in, curls pod b from pod a, prints the access log
/// lines, and removes everything it made.
fn demo_script_runs_end_to_end(binary: &Binary) {
    let script = repo_path("scripts/inpod-demo.sh");
    let ports = net::free_ports(3);
    let output = Command::new("bash")
        .arg(&script)
        .arg("--binary")
        .arg(binary.path())
        .args(["--readiness-port", &ports[0].to_string()])
        .args(["--admin-port", &ports[1].to_string()])
        .args(["--metrics-port", &ports[2].to_string()])
        .output()
        .expect("running scripts/inpod-demo.sh");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{}\n{stdout}\n{stderr}", output.status);
    // pod b's server answered pod a from inside pod b, through both pods' listeners.
    assert!(stdout.contains("hello from pod b"), "{stdout}\n{stderr}");
    for direction in ["outbound", "inbound"] {
        assert!(
            stdout
                .lines()
                .any(|line| line.contains(&format!("direction=\"{direction}\""))
                    && line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/a\"")
                    && line.contains("dst.identity=\"spiffe://cluster.local/ns/default/sa/b\"")),
            "no {direction} access line a -> b:\n{stdout}\n{stderr}"
        );
    }
    // The clean-up removed the namespaces it made.
    let made: Vec<&str> = stdout
        .split_whitespace()
        .filter(|word| word.starts_with("inpod-demo-"))
        .collect();
    assert!(!made.is_empty(), "{stdout}");
    let list = netns::run("ip", &["netns", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    let left: Vec<&str> = list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| made.contains(name))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn demo_script_runs_end_to_end_ztunnel() {
    if netns::available("demo_script_runs_end_to_end_ztunnel") {
        demo_script_runs_end_to_end(&Binary::ztunnel());
    }
}

#[test]
fn demo_script_explains_its_options() {
    let script = repo_path("scripts/inpod-demo.sh");
    let output = Command::new("bash").arg(&script).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--binary PATH"), "{help}");
    let output = Command::new("bash")
        .arg(&script)
        .arg("--no-such-option")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--no-such-option"));
}
