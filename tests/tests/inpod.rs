//! In-pod mode end to end: a `ztunnel` process in the host's namespace is handed two pods by a fake
//! istio-cni (a real `SOCK_SEQPACKET` server passing the pods' network namespaces), serves each
//! pod's listeners inside the pod's namespace, and carries pod-to-pod traffic over HBONE with each
//! pod's own identity, istio-cni's rules (`tests/scripts/istio-cni-inpod.sh`) capturing it.
//!
//! ```text
//!   namespace "a" (istio-cni's rules)          veth          namespace "b" (istio-cni's rules)
//!   10.79.0.1  pod a (sa a)           <------------------->  10.79.0.2  pod b (sa b), whoami :8080
//!
//!   ztunnel (host namespace, node n1, INPOD_ENABLED): 15001/15006/15008 inside a and b
//! ```
//!
//! Needs root and iptables (see `meshwire_tests::netns::available`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use meshwire_testkit::cni::{FakeCni, add_request, workload_info};
use meshwire_tests::binary::Binary;
use meshwire_tests::inpod::{eventually, listening_ports, ready, script};
use meshwire_tests::mesh::{Mesh, Ports};
use meshwire_tests::net;
use meshwire_tests::netns::{self, Netns};

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);

fn mesh_yaml() -> String {
    format!(
        r#"
workloads:
- {{uid: a, name: a, namespace: default, serviceAccount: a, workloadIps: ["{A_IP}"], protocol: HBONE, node: n1}}
- {{uid: b, name: b, namespace: default, serviceAccount: b, workloadIps: ["{B_IP}"], protocol: HBONE, node: n1}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_handed_over_by_istio_cni_are_served_in_their_namespaces() {
    if !netns::available("pods_handed_over_by_istio_cni_are_served_in_their_namespaces") {
        return;
    }
    let a = Arc::new(Netns::new("inpa"));
    let b = Arc::new(Netns::new("inpb"));
    a.connect(IpAddr::V4(A_IP), &b, IpAddr::V4(B_IP), 24);
    script(&["up", "--netns", a.name()]);
    script(&["up", "--netns", b.name()]);
    b.whoami_server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8080)));

    let mesh = Mesh::new(&mesh_yaml());
    let mut cni = FakeCni::start();
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let socket = cni.path().to_str().unwrap().to_owned();
    let proxy = tokio::task::spawn_blocking({
        let builder = mesh
            .proxy(&Binary::ztunnel(), host)
            .with_ports(Ports::free(host, 15008))
            .arg("--node-name")
            .arg("n1")
            .env("INPOD_ENABLED", "true")
            .env("INPOD_UDS", &socket);
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
    assert_eq!(status, 503, "ready before the snapshot ended: {body}");
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
    // The connection to the workload is made inside pod b, from b's own address (the client's
    // address is not preserved yet; README, in-pod mode).
    assert_eq!(
        seen.ip(),
        IpAddr::V4(B_IP),
        "the connection to the workload leaves from inside pod b"
    );

    for pod in [a.clone(), b.clone()] {
        let ports = tokio::task::spawn_blocking(move || listening_ports(&pod))
            .await
            .unwrap();
        assert_eq!(ports, [15001, 15006, 15008]);
    }

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
    // Each side logged the connection with the pods' own identities.
    for direction in ["outbound", "inbound"] {
        let lines = proxy.wait_access_lines(direction, 1, Duration::from_secs(10));
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

#[test]
fn ztunnel_uring_refuses_inpod_mode_naming_it() {
    let mesh = Mesh::new(&mesh_yaml());
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (status, proxy) = mesh
        .proxy(&Binary::ztunnel_uring(), host)
        .env("INPOD_ENABLED", "true")
        .env("INPOD_UDS", "/nonexistent/ztunnel.sock")
        .spawn_to_exit(Duration::from_secs(20));
    assert!(!status.success(), "{}", proxy.log());
    assert!(
        proxy
            .log()
            .contains("in-pod mode (INPOD_ENABLED, --inpod) is not served by ztunnel-uring yet"),
        "{}",
        proxy.log()
    );
}
