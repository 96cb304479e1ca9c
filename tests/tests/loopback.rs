//! Dedicated mode on loopback, two proxies: a client workload on 127.0.0.1 (proxy A) reaches a server
//! workload on 127.0.0.2 (proxy B) through SOCKS5 -> HBONE -> inbound; by workload IP, service VIP and
//! service hostname; a non-mesh workload on 127.0.0.3 is reached by plain TCP passthrough; 100 MB
//! cross with a checksum. Every scenario runs for every pair of proxy binaries.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::Duration;

use meshwire_testkit::http;
use meshwire_tests::binary;
use meshwire_tests::mesh::{Mesh, ProxyBuilder};
use meshwire_tests::net::{self, EchoServer, Socks5Target, lo};
use meshwire_tests::pair::{self, ECHO_HOST, Pair};

#[test]
fn socks5_to_a_workload_ip_crosses_hbone_with_both_identities() {
    for (a, b) in binary::pairs() {
        let pair = Pair::start(&a, &b);
        let stream = pair.socks5(Socks5Target::Addr(pair.echo.addr()));
        let echoed = net::echo_exchange(stream, 256 * 1024).unwrap();
        assert!(echoed.intact(), "{a} -> {b}: {echoed:?}\n{}", pair.logs());

        let inbound = pair.server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        assert_eq!(inbound.len(), 1, "{a} -> {b}: one inbound connection\n{}", pair.logs());
        let line = &inbound[0];
        assert_eq!(
            line.get("src.identity"),
            Some("spiffe://cluster.local/ns/default/sa/client")
        );
        assert_eq!(
            line.get("dst.identity"),
            Some("spiffe://cluster.local/ns/default/sa/server")
        );
        assert_eq!(line.get("src.workload"), Some("client"));
        assert_eq!(line.get("dst.workload"), Some("server"));
        assert_eq!(line.get("dst.hbone_addr"), Some(pair.echo.addr().to_string().as_str()));
        assert_eq!(line.number("bytes_recv"), Some(256 * 1024), "{line:?}");
        assert_eq!(line.number("bytes_sent"), Some(256 * 1024), "{line:?}");
        assert_eq!(pair.echo.accepted(), 1);
    }
}

#[test]
fn service_vip_and_hostname_resolve_to_the_endpoint() {
    for (a, b) in binary::pairs() {
        let pair = Pair::start(&a, &b);
        for target in [
            Socks5Target::Addr(Pair::vip()),
            Socks5Target::Domain(ECHO_HOST.into(), 80),
        ] {
            let stream = pair.socks5(target.clone());
            let echoed = net::echo_exchange(stream, 64 * 1024).unwrap();
            assert!(
                echoed.intact(),
                "{a} -> {b} via {target:?}: {echoed:?}\n{}",
                pair.logs()
            );
        }
        let inbound = pair.server.wait_access_lines("inbound", 2, Duration::from_secs(10));
        assert_eq!(inbound.len(), 2, "{}", pair.logs());
        for line in &inbound {
            // The VIP was resolved to the endpoint's address and target port before the CONNECT.
            assert_eq!(line.get("dst.hbone_addr"), Some(pair.echo.addr().to_string().as_str()));
        }
        assert_eq!(pair.echo.accepted(), 2);
    }
}

#[test]
fn a_non_mesh_workload_is_reached_by_plain_passthrough() {
    for (a, b) in binary::pairs() {
        let pair = Pair::start(&a, &b);
        let whoami = net::whoami_server(lo(3));
        let stream = pair.socks5(Socks5Target::Addr(whoami));
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut peer = String::new();
        reader.read_line(&mut peer).unwrap();
        let peer: SocketAddr = peer.trim().parse().unwrap();
        // Passthrough: the client's proxy itself connected, not the server's proxy over HBONE.
        assert_eq!(peer.ip(), lo(1), "{a}: connected from {peer}");
        let mut writer = stream;
        writer.write_all(b"plain\n").unwrap();
        let mut echoed = String::new();
        reader.read_line(&mut echoed).unwrap();
        assert_eq!(echoed, "plain\n");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            pair.server.access_lines("inbound").is_empty(),
            "{a}: nothing went through the server's proxy\n{}",
            pair.logs()
        );
    }
}

#[test]
fn one_hundred_megabytes_cross_intact() {
    for (a, b) in binary::pairs() {
        let pair = Pair::start(&a, &b);
        let stream = pair.socks5(Socks5Target::Addr(pair.echo.addr()));
        let len = 100 * 1000 * 1000;
        let echoed = net::echo_exchange(stream, len).unwrap();
        assert!(echoed.intact(), "{a} -> {b}: {echoed:?}\n{}", pair.logs());
        assert_eq!(echoed.received, len as u64);
        let inbound = pair.server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        assert_eq!(inbound[0].number("bytes_recv"), Some(len as u64));
        assert_eq!(inbound[0].number("bytes_sent"), Some(len as u64));
    }
}

#[test]
fn a_proxy_with_certificates_from_files_joins_the_mesh() {
    for (a, b) in binary::pairs() {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(&pair::config(echo.addr().port(), ""));
        let dir = tempfile::tempdir().unwrap();
        let credentials = mesh
            .ca()
            .issue(&meshwire_tests::hbone::spiffe("default", "server"))
            .unwrap();
        let chain = dir.path().join("cert-chain.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&chain, credentials.svid.chain_pem()).unwrap();
        std::fs::write(&key, credentials.svid.private_key_pem()).unwrap();
        let bundle = mesh.state_dir().join("ca").join("root-cert.pem");
        assert!(bundle.is_file(), "the local CA writes its root for others to trust");
        let files = |builder: ProxyBuilder| {
            builder
                .arg("--cert-chain")
                .arg(chain.to_str().unwrap())
                .arg("--cert-key")
                .arg(key.to_str().unwrap())
                .arg("--trust-bundle")
                .arg(bundle.to_str().unwrap())
        };

        let server = files(mesh.proxy(&b, lo(2)).dedicated("default/server/server")).spawn();
        let client = mesh.proxy(&a, lo(1)).dedicated("default/client/client").spawn();
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr()))
            .unwrap_or_else(|e| panic!("{e:?}\n{}\n{}", client.describe(), server.describe()));
        assert!(net::echo_exchange(stream, 64 * 1024).unwrap().intact());
        let inbound = server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        assert_eq!(
            inbound[0].get("src.identity"),
            Some("spiffe://cluster.local/ns/default/sa/client"),
            "{}",
            server.describe()
        );

        // Files for another identity than the dedicated workload's: its connections fail, clearly.
        let wrong = files(mesh.proxy(&b, lo(4)).dedicated("default/other/other")).spawn_listening();
        let complaint = wrong.wait_for_log(
            &[
                "does not serve spiffe://cluster.local/ns/default/sa/other",
                "cert-chain.pem holds",
                "sa/server",
            ],
            Duration::from_secs(10),
        );
        assert!(complaint.is_some(), "the mismatch is named\n{}", wrong.describe());
        let ready = http::request_blocking(wrong.ports().readiness, "GET", "/healthz/ready").unwrap();
        assert_eq!(ready.status, 500, "not ready without its certificate: {}", ready.body);
        assert!(ready.body.contains("certificate"), "{}", ready.body);
    }
}

/// Established TCP connections whose remote end is `peer` (from `ss`), seen from this namespace.
fn established_to(peer: SocketAddr) -> usize {
    let output = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", "dst", &peer.to_string()])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn idle_hbone_connections_are_released_after_the_idle_timeout() {
    for (a, b) in binary::pairs() {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(&pair::config(echo.addr().port(), ""));
        let server = mesh.proxy(&b, lo(2)).dedicated("default/server/server").spawn();
        let client = mesh
            .proxy(&a, lo(1))
            .dedicated("default/client/client")
            .arg("--pool-unused-release-timeout")
            .arg("300ms")
            .spawn();
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr())).unwrap();
        assert!(net::echo_exchange(stream, 1024).unwrap().intact());
        let inbound = server.ports().inbound;
        assert_eq!(
            established_to(inbound),
            1,
            "{a}: one pooled HBONE connection to {inbound}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while established_to(inbound) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{a}: the idle HBONE connection was not released\n{}",
                client.describe()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // A new connection opens a new tunnel.
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr())).unwrap();
        assert!(net::echo_exchange(stream, 1024).unwrap().intact());
    }
}
