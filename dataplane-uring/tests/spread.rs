//! [`RoundRobin`] over real listening sockets of one reuseport group: new connections are dealt
//! to the sockets in turn, in slot order (from a random first slot); a slot whose socket closed falls back to the kernel's
//! hash (the connection is still accepted by a socket of the group); bad slots are refused.
//! Loading eBPF needs `CAP_BPF` (the test suite runs as root, as the netns tests do).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use meshwire_dataplane_uring::spread::RoundRobin;
use socket2::{Domain, Socket, Type};

/// A listening socket with `SO_REUSEPORT` on `addr`, non-blocking.
fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(128).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket.into()
}

/// The index of the listener that accepted the next connection (waiting up to 5 s).
fn accepted_by(listeners: &[TcpListener]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (i, listener) in listeners.iter().enumerate() {
            match listener.accept() {
                Ok(_) => return i,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept on listener {i}: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no listener accepted the connection");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn group(n: usize) -> Vec<TcpListener> {
    let first = reuseport_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let addr = first.local_addr().unwrap();
    let mut listeners = vec![first];
    listeners.extend((1..n).map(|_| reuseport_listener(addr)));
    listeners
}

#[test]
fn connections_are_dealt_to_the_sockets_in_turn() {
    for n in [2usize, 3] {
        let listeners = group(n);
        let addr = listeners[0].local_addr().unwrap();
        let spread = RoundRobin::new(n as u32).expect("loading the round-robin program (needs CAP_BPF)");
        assert_eq!(spread.slots(), n as u32);
        for (slot, listener) in listeners.iter().enumerate() {
            spread.join(slot as u32, listener.as_fd()).unwrap();
        }
        let mut order = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..4 * n {
            clients.push(TcpStream::connect(addr).unwrap());
            order.push(accepted_by(&listeners));
        }
        // Every SYN advances the counter (which starts anywhere): slot s, s+1, .., n-1, 0, ...
        let expected: Vec<usize> = (0..4 * n).map(|i| (order[0] + i) % n).collect();
        assert_eq!(order, expected, "{n} sockets");
    }
}

#[test]
fn an_empty_slot_falls_back_to_the_kernels_hash() {
    let mut listeners = group(2);
    let addr = listeners[0].local_addr().unwrap();
    let spread = RoundRobin::new(2).expect("loading the round-robin program (needs CAP_BPF)");
    for (slot, listener) in listeners.iter().enumerate() {
        spread.join(slot as u32, listener.as_fd()).unwrap();
    }
    // Closing a socket empties its slot: connections dealt to it go to the one left.
    drop(listeners.remove(1));
    for _ in 0..6 {
        let _client = TcpStream::connect(addr).unwrap();
        assert_eq!(accepted_by(&listeners), 0);
    }
}

#[test]
fn bad_slots_are_refused_with_a_message() {
    assert_eq!(RoundRobin::new(0).unwrap_err().kind(), ErrorKind::InvalidInput);
    let listeners = group(1);
    let spread = RoundRobin::new(1).unwrap();
    let err = spread.join(1, listeners[0].as_fd()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("slot 1"), "{err}");
    // A socket that is not listening cannot join.
    let idle = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let err = spread.join(0, idle.as_fd()).unwrap_err();
    assert!(err.to_string().contains("socket array"), "{err}");
}
