//! istio-cni's in-pod redirection (`tests/scripts/istio-cni-inpod.sh`) against sockets made the way
//! a node proxy makes a pod's sockets in in-pod mode (`NetnsSocketFactory`: created inside the
//! pod's network namespace from a thread of the host's namespace, with `IP_TRANSPARENT` and the
//! proxy's mark 0x539):
//!
//! ```text
//!   namespace "pod" (istio-cni's rules)               namespace "peer"
//!   10.78.0.1  listeners 15001, 15006, 15008   veth   10.78.0.2  whoami :9090
//! ```
//!
//! - inbound TCP to any port of the pod lands on 15006 (TPROXY: the local address is the one dialled);
//! - inbound to 15008 lands on 15008;
//! - the pod's own outbound TCP lands on 15001, `SO_ORIGINAL_DST` naming where it was going;
//! - a socket with the proxy's mark goes out uncaptured, from the pod's address;
//! - loopback traffic inside the pod is left alone.
//!
//! Needs root and iptables (see `meshwire_tests::netns::available`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use meshwire_dataplane::rt::netns::{Netns as PodNetns, NetnsSocketFactory};
use meshwire_dataplane::rt::socket::{DefaultSocketFactory, SocketFactory, SocketOptions, original_destination};
use meshwire_tests::mesh::repo_path;
use meshwire_tests::net;
use meshwire_tests::netns::{self, Netns};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const MARK: u32 = 0x539;
const TIMEOUT: Duration = Duration::from_secs(5);

fn script(args: &[&str]) {
    let path = repo_path("tests/scripts/istio-cni-inpod.sh");
    netns::run(path.to_str().unwrap(), args);
}

fn listener(factory: &impl SocketFactory, port: u16, transparent: bool) -> TcpListener {
    let opts = SocketOptions {
        reuse_port: true,
        transparent,
        mark: Some(MARK),
        ..SocketOptions::default()
    };
    let socket = factory
        .listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), &opts)
        .unwrap_or_else(|e| panic!("binding :{port} in the pod: {e}"));
    let listener: TcpListener = socket.into();
    listener.set_nonblocking(false).unwrap();
    listener
}

/// Accepts one connection within the timeout.
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                return (stream, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no connection accepted: {e}"),
        }
    }
}

#[test]
fn istio_cni_rules_send_a_pods_traffic_to_the_listeners_made_in_its_namespace() {
    if !netns::available("istio_cni_rules_send_a_pods_traffic_to_the_listeners_made_in_its_namespace") {
        return;
    }
    let pod = Netns::new("inpod");
    let peer = Netns::new("inpeer");
    pod.connect(IpAddr::V4(POD_IP), &peer, IpAddr::V4(PEER_IP), 24);
    script(&["up", "--netns", pod.name()]);
    peer.whoami_server(SocketAddr::from((PEER_IP, 9090)));

    // The pod's listeners, made from this (host namespace) thread.
    let factory = NetnsSocketFactory::new(
        DefaultSocketFactory,
        PodNetns::open(format!("/run/netns/{}", pod.name())).unwrap(),
        PodNetns::own().unwrap(),
    );
    let outbound = listener(&factory, 15001, false);
    let inbound_plain = listener(&factory, 15006, true);
    let inbound_hbone = listener(&factory, 15008, true);

    // Inbound to an application port: TPROXY to 15006, the dialled address kept.
    let mut client = peer.connect_or_panic(SocketAddr::from((POD_IP, 8080)));
    let (mut served, from) = accept(&inbound_plain);
    assert_eq!(from.ip(), IpAddr::V4(PEER_IP));
    assert_eq!(served.local_addr().unwrap(), SocketAddr::from((POD_IP, 8080)));
    // No NAT: conntrack's original destination is the local address too (so the proxy's loop guard,
    // "the original destination is the listener itself", must compare with the listener's port).
    assert_eq!(original_destination(&served).unwrap(), SocketAddr::from((POD_IP, 8080)));
    client.write_all(b"in").unwrap();
    let mut buf = [0u8; 2];
    served.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"in");

    // Inbound HBONE: to 15008 itself.
    let _hbone_client = peer.connect_or_panic(SocketAddr::from((POD_IP, 15008)));
    let (hbone, from) = accept(&inbound_hbone);
    assert_eq!(from.ip(), IpAddr::V4(PEER_IP));
    assert_eq!(hbone.local_addr().unwrap(), SocketAddr::from((POD_IP, 15008)));

    // The application's outbound connection: REDIRECT to 15001, the original destination kept.
    let target = SocketAddr::from((PEER_IP, 9090));
    let _app = pod.connect_or_panic(target);
    let (captured, from) = accept(&outbound);
    assert_eq!(from.ip(), IpAddr::V4(POD_IP));
    assert_eq!(original_destination(&captured).unwrap(), target);

    // The proxy's own connection (marked, made in the pod's namespace) goes out uncaptured, from the
    // pod's address.
    let marked = SocketOptions {
        mark: Some(MARK),
        ..SocketOptions::default()
    };
    let socket = factory.stream(target, None, &marked).unwrap();
    socket.set_nonblocking(false).unwrap();
    socket.connect_timeout(&target.into(), TIMEOUT).unwrap();
    let mut upstream: TcpStream = socket.into();
    assert_eq!(net::whoami_peer(&mut upstream).unwrap().ip(), IpAddr::V4(POD_IP));
    outbound.set_nonblocking(true).unwrap();
    assert!(outbound.accept().is_err(), "the marked connection was captured");

    // Loopback inside the pod is not captured.
    let local = pod
        .enter(|| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 7070))))
        .unwrap();
    let _to_local = pod.connect_or_panic(SocketAddr::from((Ipv4Addr::LOCALHOST, 7070)));
    let (_, from) = accept(&local);
    assert!(from.ip().is_loopback());
    assert!(outbound.accept().is_err(), "loopback traffic was captured");

    script(&["down", "--netns", pod.name()]);
    // Without the rules, an inbound connection reaches the port dialled (nothing listens: refused).
    assert!(peer.tcp_connect(SocketAddr::from((POD_IP, 8080))).is_err());
}

#[test]
fn the_script_refuses_bad_arguments_naming_them() {
    let path = repo_path("tests/scripts/istio-cni-inpod.sh");
    for (args, expected) in [
        (vec!["up"], "--netns is required"),
        (vec!["up", "--netns", "mw-none-such", "--mark", "zz"], "invalid --mark"),
        (vec!["sideways", "--netns", "x"], "unknown argument: sideways"),
        (vec!["--netns", "x"], "no command"),
    ] {
        let out = std::process::Command::new(&path).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
