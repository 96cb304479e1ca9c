//! In-pod mode end to end, for both binaries: a proxy process in the host's namespace is handed
//! two pods by a fake istio-cni (a real `SOCK_SEQPACKET` server passing the pods' network
//! namespaces), serves each pod's listeners inside the pod's namespace, and carries pod-to-pod
//! traffic over HBONE with each pod's own identity, istio-cni's rules
//! (`tests/scripts/istio-cni-inpod.sh`) capturing it; each pod has its DNS proxy, answering mesh
//! names as that pod's workload and forwarding the rest from inside the pod.
//!
//! ```text
//!   namespace "a" (istio-cni's rules, --dns)   veth          namespace "b" (istio-cni's rules)
//!   10.79.0.1  pod a (sa a)           <------------------->  10.79.0.2  pod b (sa b), whoami :8080
//!   upstream resolver 127.0.0.1:port
//!
//!   proxy (host namespace, node n1, INPOD_ENABLED): 15001/15006/15008 and 127.0.0.1:15053 inside
//!   a and b
//! ```
//!
//! Needs root and iptables (see `meshwire_tests::netns::available`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use meshwire_testkit::cni::{FakeCni, add_request, workload_info};
use meshwire_testkit::dns::{self, FakeDns};
use meshwire_tests::binary::Binary;
use meshwire_tests::inpod::{eventually, listening_ports, ready, script};
use meshwire_tests::mesh::{Mesh, metric_sum};
use meshwire_tests::net;
use meshwire_tests::netns::{self, Netns};

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);

fn mesh_yaml() -> String {
    format!(
        r#"
workloads:
- {{uid: a, name: a, namespace: default, serviceAccount: a, workloadIps: ["{A_IP}"], protocol: HBONE, node: n1}}
- uid: b
  name: b
  namespace: default
  serviceAccount: b
  workloadIps: ["{B_IP}"]
  protocol: HBONE
  node: n1
  services:
    "default/svc-b.default.svc.cluster.local":
      80: 8080
services:
- name: svc-b
  namespace: default
  hostname: svc-b.default.svc.cluster.local
  vips: ["/10.96.0.5"]
  ports:
    80: 8080
"#
    )
}

/// An upstream resolver's answer: 192.0.2.1 for any A question.
fn upstream_a(query: &[u8]) -> Option<Vec<u8>> {
    let parsed = Message::from_vec(query).ok()?;
    let name = parsed.queries().first()?.name().clone();
    let record = Record::from_rdata(name, 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));
    Some(dns::answer(query, vec![record]))
}

/// The answer records of a DNS exchange made over UDP from inside `pod` with `server`, as
/// `name address` lines.
fn ask(pod: &Netns, server: SocketAddr, id: u16, name: &'static str) -> Result<Vec<String>, String> {
    let answer = pod.enter(move || {
        // From the pod's own address when the server is not on loopback (a query captured by
        // istio-cni's rule for port 53).
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.send_to(&dns::query(id, name, RecordType::A, None), server)?;
        let mut buf = vec![0; 65_535];
        let (len, from) = socket.recv_from(&mut buf)?;
        assert_eq!(from, server, "the answer comes from the address asked");
        buf.truncate(len);
        Ok::<_, std::io::Error>(buf)
    });
    let answer = answer.map_err(|e| format!("{name} from {server}: {e}"))?;
    let message = dns::parse(&answer);
    Ok(message
        .answers()
        .iter()
        .map(|r| format!("{} {}", r.name(), r.data()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_serves_pods_handed_over_by_istio_cni_in_their_namespaces() {
    pods_handed_over_by_istio_cni_are_served_in_their_namespaces(Binary::ztunnel(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_without_original_source_connects_to_pods_from_their_own_address() {
    pods_handed_over_by_istio_cni_are_served_in_their_namespaces(Binary::ztunnel(), Some(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_uring_serves_pods_handed_over_by_istio_cni_in_their_namespaces() {
    pods_handed_over_by_istio_cni_are_served_in_their_namespaces(Binary::ztunnel_uring(), None).await;
}

/// `original_source`: `ENABLE_ORIG_SRC`, or not set.
async fn pods_handed_over_by_istio_cni_are_served_in_their_namespaces(binary: Binary, original_source: Option<bool>) {
    if !netns::available("pods_handed_over_by_istio_cni_are_served_in_their_namespaces") {
        return;
    }
    let short = match (binary == Binary::ztunnel(), original_source) {
        (true, None) => "t",
        (true, Some(_)) => "o",
        (false, _) => "u",
    };
    let a = Arc::new(Netns::new(&format!("inpa{short}")));
    let b = Arc::new(Netns::new(&format!("inpb{short}")));
    a.connect(IpAddr::V4(A_IP), &b, IpAddr::V4(B_IP), 24);
    script(&["up", "--netns", a.name(), "--dns"]);
    script(&["up", "--netns", b.name()]);
    b.whoami_server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8080)));
    // The upstream resolver, reachable from inside pod a only: forwarded queries leave from the pod.
    let upstream = a.enter(|| FakeDns::start(upstream_a)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resolv_conf = dir.path().join("resolv.conf");
    std::fs::write(&resolv_conf, format!("nameserver {}\n", upstream.addr())).unwrap();
    let pod_dns = SocketAddr::from((Ipv4Addr::LOCALHOST, 15053));

    let mesh = Mesh::new(&mesh_yaml());
    let mut cni = FakeCni::start();
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let socket = cni.path().to_str().unwrap().to_owned();
    let proxy = tokio::task::spawn_blocking({
        let builder = mesh
            .proxy(&binary, host)
            .hbone_port(15008)
            .dns(pod_dns, &resolv_conf)
            .arg("--node-name")
            .arg("n1")
            .env("INPOD_ENABLED", "true")
            .env("INPOD_UDS", &socket);
        let builder = match original_source {
            Some(on) => builder.env("ENABLE_ORIG_SRC", if on { "true" } else { "false" }),
            None => builder,
        };
        move || builder.spawn_until_log(&["in-pod mode"])
    })
    .await
    .unwrap();
    let readiness = proxy.ports().readiness;

    // istio-cni: hello, then the snapshot of both pods with their namespaces.
    let conn = cni.next_connection().await;
    let (a_ns, b_ns) = (
        std::fs::File::open(format!("/run/netns/{}", a.name())).unwrap(),
        std::fs::File::open(format!("/run/netns/{}", b.name())).unwrap(),
    );
    assert!(
        conn.send(
            &add_request("uid-a", Some(workload_info("a", "default", "a"))),
            &[a_ns.as_fd()]
        )
        .await
    );
    assert_eq!(conn.ack().await, "", "{}", proxy.log());
    let (status, body) = tokio::task::spawn_blocking(move || ready(readiness)).await.unwrap();
    assert_eq!(status, 500, "ready before the snapshot ended: {body}");
    assert!(
        conn.send(
            &add_request("uid-b", Some(workload_info("b", "default", "b"))),
            &[b_ns.as_fd()]
        )
        .await
    );
    assert_eq!(conn.ack().await, "", "{}", proxy.log());
    assert!(conn.snapshot_sent().await);
    assert_eq!(conn.ack().await, "");
    eventually("ready after the snapshot", Duration::from_secs(10), move || {
        (ready(readiness).0 == 200).then_some(())
    })
    .await;
    // /config_dump's workloadState, as ztunnel's (what istioctl reads): both pods up, with their
    // workload info.
    let admin = proxy.ports().admin;
    let dump = tokio::task::spawn_blocking(move || {
        meshwire_testkit::http::request_blocking(admin, "GET", "/config_dump").unwrap()
    })
    .await
    .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
    for (uid, name) in [("uid-a", "a"), ("uid-b", "b")] {
        let pod = &dump["workloadState"][uid];
        assert_eq!(pod["state"], "Up", "{uid}: {}", dump["workloadState"]);
        assert_eq!(pod["info"]["name"], name, "{uid}: {pod}");
        assert_eq!(pod["info"]["namespace"], "default", "{uid}: {pod}");
        assert_eq!(pod["info"]["serviceAccount"], name, "{uid}: {pod}");
    }

    // Pod a's connection to pod b: captured in a, carried over HBONE to b's 15008, delivered in b.
    let target = SocketAddr::from((B_IP, 8080));
    let (seen, client) = tokio::task::spawn_blocking({
        let a = a.clone();
        move || {
            let mut stream = a.connect_or_panic(target);
            let seen = net::whoami_peer(&mut stream).unwrap();
            stream.write_all(b"through the mesh").unwrap();
            let mut echoed = [0u8; 16];
            stream.read_exact(&mut echoed).unwrap();
            assert_eq!(&echoed, b"through the mesh");
            (seen, stream)
        }
    })
    .await
    .unwrap();
    // The connection to the workload is made inside pod b from pod a's address (ENABLE_ORIG_SRC
    // is on by default in in-pod mode; istio-cni's rules route the replies back to the proxy), or
    // from pod b's own address with ENABLE_ORIG_SRC=false.
    let source = if original_source == Some(false) { B_IP } else { A_IP };
    assert_eq!(
        seen.ip(),
        IpAddr::V4(source),
        "the workload sees its client's address\n{}",
        proxy.log()
    );

    for pod in [a.clone(), b.clone()] {
        let ports = tokio::task::spawn_blocking(move || listening_ports(&pod))
            .await
            .unwrap();
        assert_eq!(ports, [15001, 15006, 15008]);
    }

    // Pod a's DNS proxy: a mesh name answered as pod a's workload (its namespace completes the
    // short name), also when the query is captured by istio-cni's rule for port 53; another name
    // forwarded from inside the pod to its upstream.
    let dns_checks = tokio::task::spawn_blocking({
        let a = a.clone();
        move || {
            [
                ask(&a, pod_dns, 1, "svc-b.default.svc.cluster.local."),
                ask(&a, pod_dns, 2, "svc-b."),
                ask(&a, SocketAddr::from((B_IP, 53)), 3, "svc-b.default."),
                ask(&a, pod_dns, 4, "forwarded.example."),
            ]
        }
    })
    .await
    .unwrap();
    assert_eq!(
        dns_checks,
        [
            Ok(vec!["svc-b.default.svc.cluster.local. 10.96.0.5".to_owned()]),
            Ok(vec!["svc-b. 10.96.0.5".to_owned()]),
            Ok(vec!["svc-b.default. 10.96.0.5".to_owned()]),
            Ok(vec!["forwarded.example. 192.0.2.1".to_owned()]),
        ],
        "{}",
        proxy.log()
    );
    let forwarded: Vec<_> = upstream.received().into_iter().map(|r| r.transport).collect();
    assert_eq!(forwarded, ["udp"], "only the name outside the mesh is forwarded");
    // Nothing of the proxy listens on the host's 15053: in in-pod mode the DNS proxy is the pods'.
    assert!(
        std::net::UdpSocket::bind(pod_dns).is_ok(),
        "the DNS proxy is bound on the host in in-pod mode"
    );

    // istio-cni deletes pod b: its connections close, its listeners are gone.
    assert!(conn.del("uid-b").await);
    assert_eq!(conn.ack().await, "");
    let closed = tokio::task::spawn_blocking(move || {
        let mut client = client;
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        match client.read(&mut buf) {
            Ok(0) => true,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            Ok(_) => false,
        }
    })
    .await
    .unwrap();
    assert!(closed, "pod b's connection stayed open after its DelWorkload");
    // ztunnel's workload manager metrics: two pods started, one stopped, one served.
    let metrics = proxy.ports().metrics;
    let page = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let page = meshwire_testkit::http::request_blocking(metrics, "GET", "/metrics")
                .unwrap()
                .body;
            if metric_sum(&page, "workload_manager_proxies_stopped_total", &[]) == 1
                || std::time::Instant::now() >= deadline
            {
                return page;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    for (metric, expected) in [
        ("workload_manager_proxies_started_total", 2),
        ("workload_manager_proxies_stopped_total", 1),
        ("workload_manager_active_proxy_count", 1),
        ("workload_manager_pending_proxy_count", 0),
    ] {
        assert_eq!(metric_sum(&page, metric, &[]), expected, "{metric}\n{page}");
    }
    // Each side logged the connection with the pods' own identities.
    for direction in ["outbound", "inbound"] {
        let lines = proxy.wait_complete_lines(direction, 1, Duration::from_secs(10));
        assert!(
            lines
                .first()
                .is_some_and(|line| line.get("src.identity").is_some_and(|id| id.ends_with("/sa/a"))
                    && line.get("dst.identity").is_some_and(|id| id.ends_with("/sa/b"))),
            "{direction}: {lines:?}\n{}",
            proxy.log()
        );
    }
    // Its listeners are closed: nothing listens on 15001, 15006 or 15008 inside pod b any more.
    let b_listening = tokio::task::spawn_blocking({
        let b = b.clone();
        move || listening_ports(&b)
    })
    .await
    .unwrap();
    assert!(b_listening.is_empty(), "pod b still has listeners on {b_listening:?}");
    let a_listening = tokio::task::spawn_blocking({
        let a = a.clone();
        move || listening_ports(&a)
    })
    .await
    .unwrap();
    assert_eq!(a_listening, [15001, 15006, 15008], "pod a is still served");
    drop(proxy);
}

const A_IP6: Ipv6Addr = Ipv6Addr::new(0xfd79, 0, 0, 0, 0, 0, 0, 1);
const B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd79, 0, 0, 0, 0, 0, 0, 2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_serves_dual_stack_pods_on_both_families() {
    dual_stack_pods_are_served_on_both_families(Binary::ztunnel()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_uring_serves_dual_stack_pods_on_both_families() {
    dual_stack_pods_are_served_on_both_families(Binary::ztunnel_uring()).await;
}

/// Pods with an IPv4 and an IPv6 address, istio-cni's rules for both families: the pods'
/// listeners (on `[::]`, `IPV6_ENABLED` being on by default) capture and serve both, and the
/// workload sees its client's address of the family used.
async fn dual_stack_pods_are_served_on_both_families(binary: Binary) {
    if !netns::available("dual_stack_pods_are_served_on_both_families") {
        return;
    }
    let short = if binary == Binary::ztunnel() { "t" } else { "u" };
    let a = Arc::new(Netns::new(&format!("inp6a{short}")));
    let b = Arc::new(Netns::new(&format!("inp6b{short}")));
    for pod in [&a, &b] {
        // No duplicate address detection: the addresses are usable at once.
        for conf in ["all", "default"] {
            netns::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    pod.name(),
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{conf}.accept_dad=0"),
                ],
            );
        }
    }
    a.connect(IpAddr::V4(A_IP), &b, IpAddr::V4(B_IP), 24);
    a.connect(IpAddr::V6(A_IP6), &b, IpAddr::V6(B_IP6), 64);
    script(&["up", "--netns", a.name(), "--ipv6"]);
    script(&["up", "--netns", b.name(), "--ipv6"]);
    b.whoami_server(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080)));

    let mesh = Mesh::new(&format!(
        r#"
workloads:
- {{uid: a, name: a, namespace: default, serviceAccount: a, workloadIps: ["{A_IP}", "{A_IP6}"], protocol: HBONE, node: n1}}
- {{uid: b, name: b, namespace: default, serviceAccount: b, workloadIps: ["{B_IP}", "{B_IP6}"], protocol: HBONE, node: n1}}
"#
    ));
    let mut cni = FakeCni::start();
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let socket = cni.path().to_str().unwrap().to_owned();
    let proxy = tokio::task::spawn_blocking({
        let builder = mesh
            .proxy(&binary, host)
            .hbone_port(15008)
            .arg("--node-name")
            .arg("n1")
            .env("INPOD_ENABLED", "true")
            .env("INPOD_UDS", &socket);
        move || builder.spawn_until_log(&["in-pod mode"])
    })
    .await
    .unwrap();
    let readiness = proxy.ports().readiness;
    let conn = cni.next_connection().await;
    for (uid, pod, sa) in [("uid-a", &a, "a"), ("uid-b", &b, "b")] {
        let ns = std::fs::File::open(format!("/run/netns/{}", pod.name())).unwrap();
        assert!(
            conn.send(&add_request(uid, Some(workload_info(sa, "default", sa))), &[ns.as_fd()])
                .await
        );
        assert_eq!(conn.ack().await, "", "{}", proxy.log());
    }
    assert!(conn.snapshot_sent().await);
    assert_eq!(conn.ack().await, "");
    eventually("ready after the snapshot", Duration::from_secs(10), move || {
        (ready(readiness).0 == 200).then_some(())
    })
    .await;

    for (target, client) in [
        (IpAddr::V6(B_IP6), IpAddr::V6(A_IP6)),
        (IpAddr::V4(B_IP), IpAddr::V4(A_IP)),
    ] {
        let seen = tokio::task::spawn_blocking({
            let a = a.clone();
            move || {
                let mut stream = a.connect_or_panic(SocketAddr::new(target, 8080));
                net::whoami_peer(&mut stream)
            }
        })
        .await
        .unwrap();
        assert_eq!(
            seen.map(|s| s.ip().to_canonical()).map_err(|e| e.to_string()),
            Ok(client),
            "to {target}\n{}",
            proxy.log()
        );
    }
    // Both went through the mesh: pod b's side logged each, with the pods' identities.
    let lines = proxy.wait_complete_lines("inbound", 2, Duration::from_secs(10));
    let sources: Vec<_> = lines
        .iter()
        .filter(|line| line.get("src.identity").is_some_and(|id| id.ends_with("/sa/a")))
        .filter_map(|line| line.get("src.addr").map(str::to_owned))
        .collect();
    assert_eq!(sources.len(), 2, "{lines:?}\n{}", proxy.log());

    // Pod a's HBONE pool keeps its tunnels to pod b (idle, for reuse) while a is served; istio-cni
    // deletes pod a: its pool goes with it, and pod b sees the tunnels close.
    let tunnels = |pod: Arc<Netns>| {
        move || {
            let out = netns::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    pod.name(),
                    "ss",
                    "-Htn",
                    "state",
                    "established",
                    "( sport = :15008 )",
                ],
            );
            String::from_utf8_lossy(&out.stdout).lines().count()
        }
    };
    let before = tokio::task::spawn_blocking(tunnels(b.clone())).await.unwrap();
    assert!(before >= 1, "no pooled tunnel from pod a to pod b");
    assert!(conn.del("uid-a").await);
    assert_eq!(conn.ack().await, "");
    let check = tunnels(b.clone());
    eventually(
        "pod a's pooled tunnels closed after its DelWorkload",
        Duration::from_secs(10),
        move || (check() == 0).then_some(()),
    )
    .await;
    drop(proxy);
}
