//! The socket factory of a pod in in-pod mode on a real network namespace: listeners and
//! connections made inside the pod's namespace, the calling thread back in the proxy's own
//! namespace afterwards, descriptors that are not network namespaces refused.
//!
//! The tests that create a namespace need root and `ip` (iproute2). Without them they fail saying
//! so, unless `MESHWIRE_SKIP_NETNS=1` is set (then they print that they were skipped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use meshwire_dataplane::rt::netns::{Netns, NetnsSocketFactory, is_network_namespace};
use meshwire_dataplane::rt::socket::{DefaultSocketFactory, SocketFactory, SocketOptions};

fn can_make_namespaces(test: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let ip = Command::new("sh")
        .args(["-c", "command -v ip"])
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip {
        return true;
    }
    if std::env::var_os("MESHWIRE_SKIP_NETNS").is_some_and(|v| v == "1") {
        eprintln!("{test}: skipped (MESHWIRE_SKIP_NETNS=1): needs root and ip");
        return false;
    }
    panic!("{test} needs root and ip (iproute2); set MESHWIRE_SKIP_NETNS=1 to skip such tests");
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with loopback up, deleted on drop.
struct Pod(String);

impl Pod {
    fn new() -> Pod {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("mw-dpns-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Pod(name)
    }

    fn netns(&self) -> Netns {
        Netns::open(format!("/run/netns/{}", self.0)).unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn thread_netns_inode() -> u64 {
    let link = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let link = link.to_string_lossy().into_owned();
    link.trim_start_matches("net:[").trim_end_matches(']').parse().unwrap()
}

fn local_port(socket: &socket2::Socket) -> u16 {
    socket.local_addr().unwrap().as_socket().unwrap().port()
}

#[test]
fn only_network_namespaces_are_accepted() {
    let net = File::open("/proc/self/ns/net").unwrap();
    assert!(is_network_namespace(net.as_fd()));
    let uts = File::open("/proc/self/ns/uts").unwrap();
    assert!(!is_network_namespace(uts.as_fd()));
    let file = tempfile::tempfile().unwrap();
    assert!(!is_network_namespace(file.as_fd()));

    let err = Netns::from_fd(OwnedFd::from(uts)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("not a network namespace"), "{err}");
    let err = Netns::open("/proc/self/ns/mnt").unwrap_err();
    assert!(err.to_string().contains("/proc/self/ns/mnt"), "{err}");
    let err = Netns::open("/nonexistent/ns").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("/nonexistent/ns"), "{err}");

    let own = Netns::own().unwrap();
    assert_eq!(own.inode().unwrap(), thread_netns_inode());
}

#[test]
fn a_pods_sockets_live_in_its_namespace_and_the_thread_comes_back() {
    if !can_make_namespaces("a_pods_sockets_live_in_its_namespace_and_the_thread_comes_back") {
        return;
    }
    let pod = Pod::new();
    let home = Netns::own().unwrap();
    let before = thread_netns_inode();
    assert_ne!(pod.netns().inode().unwrap(), before);
    let factory = NetnsSocketFactory::new(DefaultSocketFactory, pod.netns(), home.clone());

    // A listener on the pod's loopback.
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listener = factory.listener(any, &SocketOptions::default()).unwrap();
    assert_eq!(
        thread_netns_inode(),
        before,
        "the thread is back in the proxy's namespace"
    );
    let port = local_port(&listener);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener: TcpListener = listener.into();
    listener.set_nonblocking(false).unwrap();

    // The host's loopback is another one: nothing listens there (a host listener is bound on the
    // same port to be sure the connection cannot reach a stranger).
    let host = TcpListener::bind(addr);
    if let Ok(host) = &host {
        host.set_nonblocking(true).unwrap();
    }
    let host_stream = DefaultSocketFactory
        .stream(addr, None, &SocketOptions::default())
        .unwrap();
    host_stream.set_nonblocking(false).unwrap();
    let reached_host = host_stream.connect(&addr.into());
    match &host {
        Ok(host) => assert!(host.accept().is_ok(), "the host connection went to the host's listener"),
        Err(_) => assert!(reached_host.is_err(), "a host socket reached the pod's loopback"),
    }

    // A stream made by the pod's factory reaches the pod's listener, from the pod's loopback.
    let stream = factory.stream(addr, None, &SocketOptions::default()).unwrap();
    assert_eq!(thread_netns_inode(), before);
    stream.set_nonblocking(false).unwrap();
    stream.connect(&addr.into()).unwrap();
    let mut client: TcpStream = stream.into();
    let (mut served, peer) = listener.accept().unwrap();
    assert!(peer.ip().is_loopback());
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    served.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // A UDP socket (the DNS proxy's) is made in the pod's namespace too: it reaches a UDP socket
    // bound on the pod's loopback, which the host's loopback does not have.
    let any_udp = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let pod_udp: std::net::UdpSocket = factory.datagram(any_udp, &SocketOptions::default()).unwrap().into();
    let pod_udp_addr = pod_udp.local_addr().unwrap();
    let sender: std::net::UdpSocket = factory.datagram(any_udp, &SocketOptions::default()).unwrap().into();
    assert_eq!(thread_netns_inode(), before);
    sender.send_to(b"dns?", pod_udp_addr).unwrap();
    pod_udp.set_nonblocking(false).unwrap();
    pod_udp
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut datagram = [0u8; 8];
    let (n, from) = pod_udp.recv_from(&mut datagram).unwrap();
    assert_eq!(&datagram[..n], b"dns?");
    assert_eq!(from, sender.local_addr().unwrap());
    let host_udp = std::net::UdpSocket::bind(any_udp).unwrap();
    host_udp.connect(pod_udp_addr).unwrap();
    host_udp.send(b"x").unwrap();
    pod_udp
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    assert!(
        pod_udp.recv_from(&mut datagram).is_err(),
        "a host datagram reached the pod's socket"
    );

    // Sockets outlive the namespace's descriptor in the factory, and threads never stay there.
    drop(factory);
    served.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    let from_other_thread = std::thread::spawn(thread_netns_inode).join().unwrap();
    assert_eq!(from_other_thread, before);
}

#[test]
fn entering_a_namespace_that_is_gone_still_works_while_its_descriptor_is_held() {
    if !can_make_namespaces("entering_a_namespace_that_is_gone_still_works_while_its_descriptor_is_held") {
        return;
    }
    let pod = Pod::new();
    let netns = pod.netns();
    let inode = netns.inode().unwrap();
    drop(pod); // `ip netns del`: the name is gone, the namespace lives while a descriptor holds it
    let home = Netns::own().unwrap();
    let seen = netns.run(&home, thread_netns_inode).unwrap();
    assert_eq!(seen, inode);
    assert_eq!(thread_netns_inode(), home.inode().unwrap());
}
