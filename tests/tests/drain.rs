//! Drain on SIGTERM (and SIGINT): a proxy stops accepting, lets in-flight connections finish until
//! the drain deadline, closes what is left at the deadline, and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use meshwire_tests::binary::{self, Binary};
use meshwire_tests::net::{self, Socks5Target};
use meshwire_tests::pair::{self, Pair};

fn pair(client: &Binary, server: &Binary, deadline: Duration) -> Pair {
    Pair::start_with(client, server, "", |proxy| proxy.drain_deadline(deadline))
}

/// Sends `chunks` chunks of 64 KiB, one every `pause`, then half-closes; returns the sender thread.
fn slow_sender(stream: &TcpStream, chunks: usize, pause: Duration) -> thread::JoinHandle<(u64, u32)> {
    let mut writer = stream.try_clone().unwrap();
    thread::spawn(move || {
        let mut hasher = crc32fast::Hasher::new();
        let mut sent = 0u64;
        for i in 0..chunks {
            let chunk = net::payload(64 * 1024, i as u64);
            hasher.update(&chunk);
            writer.write_all(&chunk).unwrap();
            sent += chunk.len() as u64;
            thread::sleep(pause);
        }
        writer.shutdown(Shutdown::Write).unwrap();
        (sent, hasher.finalize())
    })
}

fn read_all(mut stream: TcpStream) -> (u64, u32, Option<std::io::Error>) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut hasher = crc32fast::Hasher::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (received, hasher.finalize(), None),
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) => return (received, hasher.finalize(), Some(e)),
        }
    }
}

#[test]
fn in_flight_transfers_finish_during_the_drain_and_lose_nothing() {
    for (a, b) in binary::pairs() {
        for signal in ["TERM", "INT"] {
            let Pair {
                mut client,
                mut server,
                echo,
                ..
            } = pair(&a, &b, Duration::from_secs(5));
            let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr())).unwrap();
            // About 1.5 s of traffic; both proxies are told to drain 300 ms in.
            let sender = slow_sender(&stream, 30, Duration::from_millis(50));
            thread::sleep(Duration::from_millis(300));
            server.signal(signal);
            client.signal(signal);

            // New connections are no longer accepted.
            thread::sleep(Duration::from_millis(200));
            assert!(
                TcpStream::connect(client.ports().socks5).is_err(),
                "{a}: SOCKS5 still accepting while draining"
            );
            assert!(
                TcpStream::connect(server.ports().inbound).is_err(),
                "{b}: inbound still accepting while draining"
            );

            let (received, received_crc, error) = read_all(stream);
            let (sent, sent_crc) = sender.join().unwrap();
            assert!(
                error.is_none(),
                "{a} -> {b} (SIG{signal}): {error:?}\n{}",
                server.describe()
            );
            assert_eq!(
                (received, received_crc),
                (sent, sent_crc),
                "{a} -> {b} (SIG{signal}): the echo is intact"
            );

            for proxy in [&mut client, &mut server] {
                let status = proxy
                    .wait_exit(Duration::from_secs(5))
                    .unwrap_or_else(|| panic!("still running after the drain\n{}", proxy.describe()));
                assert_eq!(status.code(), Some(0), "{}", proxy.describe());
                assert!(proxy.log().contains("drained"), "{}", proxy.describe());
            }
        }
    }
}

#[test]
fn connections_left_at_the_deadline_are_closed_and_the_proxy_exits() {
    for (a, b) in binary::pairs() {
        let deadline = Duration::from_secs(1);
        let Pair {
            mut client,
            mut server,
            echo,
            ..
        } = pair(&a, &b, deadline);
        let mut stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr())).unwrap();
        stream.write_all(b"hello").unwrap();
        let mut hello = [0u8; 5];
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.read_exact(&mut hello).unwrap();

        // An idle connection that never ends by itself.
        let started = Instant::now();
        server.signal("TERM");
        let status = server
            .wait_exit(deadline + Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{b}: still running after the deadline\n{}", server.describe()));
        assert_eq!(status.code(), Some(0), "{}", server.describe());
        assert!(
            started.elapsed() >= deadline,
            "{b}: exited before the deadline with a connection open"
        );
        assert!(server.log().contains("drain deadline reached"), "{}", server.describe());
        // The client sees its connection end.
        let mut rest = Vec::new();
        let outcome = stream.read_to_end(&mut rest);
        if let Err(e) = &outcome {
            assert!(
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                "{a} -> {b}: the connection was left open after the server's proxy exited"
            );
        }
        assert!(rest.is_empty(), "{rest:?}");
        assert!(client.is_running(), "{a}: the client's proxy keeps running");
    }
}

#[test]
fn a_second_instance_on_the_same_ports_takes_over_without_refusing_connections() {
    for (a, b) in binary::pairs() {
        let Pair {
            mesh,
            client,
            server: mut old,
            echo,
        } = pair(&a, &b, Duration::from_secs(2));
        // The new instance takes over: it shares the data ports while the old one still runs
        // (SO_REUSEPORT), and binds the control ports once the old one has drained.
        let new = pair::take_over(&mesh, &b, &old);

        let socks = client.ports().socks5;
        let target = Socks5Target::Addr(echo.addr());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let traffic = thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match net::socks5_connect(socks, &target) {
                    Ok(stream) => match net::echo_exchange(stream, 1024) {
                        Ok(e) if e.intact() => ok += 1,
                        other => failed.push(format!("{other:?}")),
                    },
                    Err(e) => failed.push(format!("{e:?}")),
                }
                thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        });
        thread::sleep(Duration::from_millis(300));
        old.signal("TERM");
        let status = old.wait_exit(Duration::from_secs(8)).expect("the old instance exits");
        assert_eq!(status.code(), Some(0), "{}", old.describe());
        thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ok, failed) = traffic.join().unwrap();
        assert!(
            failed.is_empty(),
            "{a} -> {b}: {} of {} connections failed during the restart: {failed:?}\n{}\n{}",
            failed.len(),
            ok as usize + failed.len(),
            old.describe(),
            new.describe()
        );
        assert!(ok > 10, "{ok} connections");
        assert!(
            !new.wait_access_lines("inbound", 1, Duration::from_secs(10)).is_empty(),
            "the new instance served connections\n{}",
            new.describe()
        );
    }
}

/// The connections the kernel queued on a listener and the proxy had not accepted yet when its
/// drain began are served, not reset: with `SO_REUSEPORT` each listener of a port has a queue of
/// its own, and closing one with connections in it resets them although the port stays served
/// (by the io_uring build's other cores, or the next proxy of an upgrade). The client's proxy is
/// stopped (SIGSTOP) while clients connect to its SOCKS5 listener, so their connections wait in
/// its queue; it gets SIGTERM and is continued; every connection then gets through, and the
/// proxy exits once they have ended.
#[test]
fn connections_queued_when_the_drain_begins_are_served() {
    const QUEUED: usize = 24;
    for a in binary::all() {
        let Pair {
            mut client,
            server: _server,
            echo,
            ..
        } = pair(&a, &a, Duration::from_secs(20));
        let socks = client.ports().socks5;
        let target = Socks5Target::Addr(echo.addr());
        client.signal("STOP");
        // The kernel completes the handshakes and queues the connections: nobody accepts them.
        let queued: Vec<TcpStream> = (0..QUEUED)
            .map(|i| TcpStream::connect(socks).unwrap_or_else(|e| panic!("{a}: connection {i} to {socks}: {e}")))
            .collect();
        client.signal("TERM");
        client.signal("CONT");
        let clients: Vec<_> = queued
            .into_iter()
            .enumerate()
            .map(|(i, tcp)| {
                let target = target.clone();
                thread::spawn(move || {
                    let stream = meshwire_testkit::socks5::connect_blocking(tcp, &target, net::IO_TIMEOUT)
                        .map_err(|e| format!("connection {i}: SOCKS5: {e:?}"))?;
                    match net::echo_exchange(stream, 4096) {
                        Ok(echoed) if echoed.intact() => Ok(()),
                        other => Err(format!("connection {i}: {other:?}")),
                    }
                })
            })
            .collect();
        let failed: Vec<String> = clients.into_iter().filter_map(|c| c.join().unwrap().err()).collect();
        assert!(
            failed.is_empty(),
            "{a}: {} of {QUEUED} connections queued at the drain failed: {failed:?}\n{}",
            failed.len(),
            client.describe()
        );
        let status = client.wait_exit(Duration::from_secs(10));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{a}: the drained proxy exits 0\n{}",
            client.describe()
        );
        assert!(
            !client.log_lines(&["drained: every connection ended"]).is_empty(),
            "{a}\n{}",
            client.describe()
        );
    }
}
