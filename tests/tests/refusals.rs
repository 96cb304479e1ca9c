//! Refusals, whole-proxy, on both binaries: what a careless or hostile client gets, and what the
//! proxy's metrics and logs say about it.
//!
//! - TLS and SOCKS5 handshake failures, and accepts that fail for want of file descriptors, are
//!   counted in `istio_tcp_connections_refused_total{listener,reason}`; the log line of the last
//!   names the listener;
//! - a connection an authorization policy denies is opened and closed with `response_flags="DENY"`;
//! - an upstream that resets its connection makes the proxies reset the client's (the HBONE stream
//!   in between is reset too), never end it cleanly;
//! - an HBONE client without a certificate gets the TLS alert `certificate_required`;
//! - a CONNECT authority not in canonical form (`:0080`) gets 400;
//! - a SOCKS5 request whose reserved byte is not 0 gets reply 0x01 and is not served.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use meshwire_identity::tls;
use meshwire_tests::binary;
use meshwire_tests::hbone::spiffe;
use meshwire_tests::mesh::{Proxy, metric_sum};
use meshwire_tests::net::{self, Socks5Target, lo};
use meshwire_tests::pair::Pair;

const REFUSED: &str = "istio_tcp_connections_refused_total";
const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";

/// Generous: the machine running the tests may be loaded.
const DEADLINE: Duration = Duration::from_secs(30);

/// Scrapes `proxy` until the sum of `metric` with `labels` is at least `at_least`; returns that sum,
/// and panics with the scrape and the log after [`DEADLINE`].
fn wait_metric_at_least(proxy: &Proxy, metric: &str, labels: &[&str], at_least: u64) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = proxy.metrics();
        let sum = metric_sum(&text, metric, labels);
        if sum >= at_least {
            return sum;
        }
        assert!(
            Instant::now() < deadline,
            "{metric}{labels:?} is {sum}, expected at least {at_least}\n{text}\n{}",
            proxy.describe()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A plaintext client on the HBONE port and a SOCKS4 client on the SOCKS5 port are refused, and
/// each refusal is counted under its listener and reason.
#[test]
fn tls_and_socks5_refusals_are_counted() {
    for binary in binary::all() {
        let s = Pair::start(&binary, &binary);
        let labels =
            |listener: &str, reason: &str| [format!("listener=\"{listener}\""), format!("reason=\"{reason}\"")];

        // Not TLS: the handshake fails.
        let answer = net::raw_exchange(s.server.ports().inbound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(!answer.starts_with(b"HTTP"), "{binary}: {answer:?}");
        let tls = labels("inbound", "tls_handshake");
        let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        assert_eq!(wait_metric_at_least(&s.server, REFUSED, &tls, 1), 1, "{binary}");

        // Not SOCKS5: no reply, closed.
        assert_eq!(
            net::raw_exchange(s.client.ports().socks5, &[4, 1, 0, 80, 127, 0, 0, 2, 0]),
            b""
        );
        let socks = labels("socks5", "socks5_handshake");
        let socks: Vec<&str> = socks.iter().map(String::as_str).collect();
        assert_eq!(wait_metric_at_least(&s.client, REFUSED, &socks, 1), 1, "{binary}");

        // Neither is counted as a connection, and the other proxy counted nothing.
        let text = s.client.metrics();
        assert_eq!(metric_sum(&text, REFUSED, &tls), 0, "{binary}: {text}");
        assert_eq!(metric_sum(&text, OPENED, &[]), 0, "{binary}: {text}");
        assert_eq!(metric_sum(&s.server.metrics(), REFUSED, &socks), 0, "{binary}");
        s.still_serves(&format!("{binary}: after the refusals"), 16 * 1024);
    }
}

/// Sets the soft `RLIMIT_NOFILE` of process `pid` (the hard limit stays).
fn set_nofile(pid: u32, soft: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --pid {pid} --nofile={soft}: failed");
}

/// The soft `RLIMIT_NOFILE` of process `pid`.
fn nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

/// A proxy out of file descriptors logs which listener cannot accept and counts it; once
/// descriptors are free again it serves as before.
#[test]
fn fd_exhaustion_names_the_listener_and_is_counted() {
    for binary in binary::all() {
        let s = Pair::start(&binary, &binary);
        let pid = s.client.pid();
        let original = nofile(pid);
        // Room for a few connections only.
        set_nofile(pid, open_fds(pid) + 8);

        // Clients that connect and say nothing hold a descriptor each (until the handshake times
        // out); the kernel completes their connections in the listen queue either way.
        let mut held = Vec::new();
        let line = loop {
            if let Some(line) = s.client.log_lines(&["out of file descriptors"]).into_iter().next() {
                break line;
            }
            assert!(
                held.len() < 200,
                "{binary}: no fd exhaustion logged after {} connections\n{}",
                held.len(),
                s.client.describe()
            );
            held.push(TcpStream::connect(s.client.ports().socks5).unwrap());
            thread::sleep(Duration::from_millis(20));
        };
        assert!(
            line.contains("SOCKS5"),
            "{binary}: the log line names no listener: {line}"
        );

        drop(held);
        set_nofile(pid, original);
        let fd = wait_metric_at_least(
            &s.client,
            REFUSED,
            &["listener=\"socks5\"", "reason=\"fd_exhausted\""],
            1,
        );
        assert!(fd >= 1, "{binary}");
        let text = s.client.metrics();
        assert_eq!(
            metric_sum(&text, REFUSED, &["reason=\"fd_exhausted\"", "listener=\"inbound\""]),
            0,
            "{binary}: only the listener that could not accept counts\n{text}"
        );
        s.still_serves(&format!("{binary}: after running out of descriptors"), 16 * 1024);
    }
}

/// A policy that denies the client.
const DENY_CLIENT: &str = r#"
policies:
  - name: deny-client
    namespace: default
    scope: Namespace
    action: Deny
    dryRun: false
    rules:
      - - - { principals: [!Exact cluster.local/ns/default/sa/client] }
"#;

/// The opened and closed counters of a denied connection agree: both say `DENY`.
#[test]
fn a_denied_connection_is_opened_and_closed_with_deny() {
    for binary in binary::all() {
        let s = Pair::start_with(&binary, &binary, DENY_CLIENT, |builder| builder);
        let refused = net::socks5_connect(s.client.ports().socks5, &Socks5Target::Addr(s.echo.addr()));
        assert!(refused.is_err(), "{binary}: the denied connection was served");
        let dest = "reporter=\"destination\"";
        let deny = "response_flags=\"DENY\"";
        assert_eq!(wait_metric_at_least(&s.server, CLOSED, &[dest, deny], 1), 1, "{binary}");
        let text = s.server.metrics();
        assert_eq!(metric_sum(&text, OPENED, &[dest, deny]), 1, "{binary}\n{text}");
        assert_eq!(
            metric_sum(&text, OPENED, &[dest, "response_flags=\"-\""]),
            0,
            "{binary}: opened as allowed, closed as denied\n{text}"
        );
        assert_eq!(
            metric_sum(&text, CLOSED, &[dest, "response_flags=\"-\""]),
            0,
            "{binary}\n{text}"
        );
        assert_eq!(
            s.echo.accepted(),
            0,
            "{binary}: the denied connection reached the workload"
        );
    }
}

/// A server on `ip` that reads 5 bytes of each connection, answers `partial`, and resets it
/// (`SO_LINGER` 0, then close).
fn resetting_server(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut hello = [0u8; 5];
                if stream.read_exact(&mut hello).is_ok() {
                    let _ = stream.write_all(b"partial");
                }
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            });
        }
    });
    addr
}

/// Reads until the end: `Ok(bytes)` on a clean end of stream, `Err` on an error (a reset).
fn read_until_end(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(got),
            n => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The client of a connection its upstream reset sees the reset: through an HBONE tunnel (the
/// server's proxy resets the stream, the client's proxy the SOCKS5 connection), with every pair of
/// binaries, and through a passthrough connection.
#[test]
fn an_upstream_reset_reaches_the_socks5_client() {
    for (a, b) in binary::pairs() {
        let s = Pair::start(&a, &b);
        let meshed = resetting_server(lo(2));
        let legacy = resetting_server(lo(3));
        for (route, upstream) in [("passthrough", legacy), ("HBONE", meshed)] {
            let mut stream = s.socks5(Socks5Target::Addr(upstream));
            stream.write_all(b"hello").unwrap();
            match read_until_end(&mut stream) {
                Err(error) => assert_eq!(
                    error.kind(),
                    io::ErrorKind::ConnectionReset,
                    "{a} -> {b} ({route}): {error}"
                ),
                Ok(bytes) => panic!(
                    "{a} -> {b} ({route}): a clean end of stream after {:?}, not a reset\n{}",
                    String::from_utf8_lossy(&bytes),
                    s.logs()
                ),
            }
        }
        s.still_serves(&format!("{a} -> {b}: after the resets"), 16 * 1024);
    }
}

/// A client certificate resolver with no certificate.
#[derive(Debug)]
struct NoCertificate;

impl rustls::client::ResolvesClientCert for NoCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// The error a TLS client that trusts the mesh but presents no certificate gets from `proxy`'s
/// inbound listener: the handshake, then (when `eager`, as an HTTP/2 client does) the client's
/// first bytes at once, then a read, which brings the server's verdict.
fn connect_without_certificate(pair: &Pair, eager: bool) -> io::Error {
    // The mesh's trust bundle and the server's expected identity, without a certificate.
    let credentials = pair.mesh.ca().issue(&spiffe("default", "client")).unwrap();
    let mut config = tls::client_config(
        &credentials.svid,
        &credentials.bundles,
        vec![spiffe("default", "server")],
        vec![b"h2".to_vec()],
    )
    .unwrap();
    config.client_auth_cert_resolver = Arc::new(NoCertificate);
    let mut connection = rustls::ClientConnection::new(Arc::new(config), tls::server_name()).unwrap();
    let mut tcp = TcpStream::connect(pair.server.ports().inbound).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    // The client's side of the TLS 1.3 handshake ends with its (empty) certificate and Finished;
    // the server's verdict comes after, as an alert.
    while connection.is_handshaking() {
        if let Err(error) = connection.complete_io(&mut tcp) {
            return error;
        }
    }
    if eager {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        if let Err(error) = connection
            .writer()
            .write_all(preface)
            .and_then(|()| connection.complete_io(&mut tcp).map(drop))
        {
            return error;
        }
    }
    let mut buf = [0u8; 64];
    loop {
        match connection.reader().read(&mut buf) {
            Ok(0) => return io::Error::new(io::ErrorKind::UnexpectedEof, "a clean close without an alert"),
            Ok(_) => return io::Error::other("data from a server that should refuse"),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return error,
        }
        match connection.read_tls(&mut tcp) {
            Ok(0) => return io::Error::new(io::ErrorKind::UnexpectedEof, "closed without an alert"),
            Ok(_) => {
                if let Err(error) = connection.process_new_packets() {
                    return io::Error::new(io::ErrorKind::InvalidData, error);
                }
            }
            Err(error) => return error,
        }
    }
}

/// A TLS client that trusts the mesh but presents no certificate learns why it is refused: the
/// alert `certificate_required`, as rustls sends it; also a client that sends its first bytes
/// before the verdict arrives, as HTTP/2 clients do.
#[test]
fn a_client_without_a_certificate_gets_certificate_required() {
    for binary in binary::all() {
        let s = Pair::start(&binary, &binary);
        for eager in [false, true] {
            let error = connect_without_certificate(&s, eager);
            let rustls_error = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
            assert_eq!(
                rustls_error,
                Some(&rustls::Error::AlertReceived(
                    rustls::AlertDescription::CertificateRequired
                )),
                "{binary} (eager: {eager}): {error} ({:?})\n{}",
                error.kind(),
                s.server.describe()
            );
        }
        assert_eq!(
            wait_metric_at_least(
                &s.server,
                REFUSED,
                &["listener=\"inbound\"", "reason=\"tls_handshake\""],
                2
            ),
            2,
            "{binary}"
        );
    }
}

/// The status of a CONNECT for the raw `authority` (sent as it is, not parsed) to `pair`'s server
/// proxy, as the mesh's client.
fn raw_connect_status(pair: &Pair, authority: &str) -> u16 {
    let credentials = pair.mesh.ca().issue(&spiffe("default", "client")).unwrap();
    let config = tls::client_config(
        &credentials.svid,
        &credentials.bundles,
        vec![spiffe("default", "server")],
        vec![b"h2".to_vec()],
    )
    .unwrap();
    let inbound = pair.server.ports().inbound;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(tls::server_name(), tcp)
                .await
                .unwrap();
            let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
            tokio::spawn(connection);
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority)
                .body(())
                .unwrap();
            assert_eq!(request.uri().authority().unwrap().as_str(), authority, "sent as it is");
            let (response, _body) = client.send_request(request, false).unwrap();
            response.await.unwrap().status().as_u16()
        };
        tokio::time::timeout(DEADLINE, exchange)
            .await
            .expect("no answer to the CONNECT")
    })
}

/// `:0080` is not port 80: a CONNECT authority with a port (or an address) not in canonical form is
/// refused with 400, and the log says why.
#[test]
fn a_connect_authority_not_in_canonical_form_gets_400() {
    for binary in binary::all() {
        let s = Pair::start(&binary, &binary);
        let port = s.echo.addr().port();
        assert_eq!(raw_connect_status(&s, &format!("127.0.0.2:{port}")), 200, "{binary}");
        assert_eq!(raw_connect_status(&s, &format!("127.0.0.2:0{port}")), 400, "{binary}");
        assert_eq!(raw_connect_status(&s, &format!("127.0.0.2:00{port}")), 400, "{binary}");
        let line = s
            .server
            .wait_for_log(&["not in canonical form"], DEADLINE)
            .unwrap_or_else(|| panic!("{binary}: the refusal is not logged\n{}", s.server.describe()));
        assert!(line.contains(&format!("127.0.0.2:0{port}")), "{binary}: {line}");
        assert!(
            s.echo.accepted() <= 1,
            "{binary}: a CONNECT not in canonical form reached the workload"
        );
    }
}

/// A SOCKS5 request whose reserved byte is not 0 gets reply 0x01 and is not served.
#[test]
fn a_socks5_request_with_a_non_zero_reserved_byte_is_refused() {
    for binary in binary::all() {
        let s = Pair::start(&binary, &binary);
        let SocketAddr::V4(echo) = s.echo.addr() else {
            panic!("IPv4")
        };
        let mut request = vec![5, 1, 0, 5, 1, 0x01, 1];
        request.extend_from_slice(&echo.ip().octets());
        request.extend_from_slice(&echo.port().to_be_bytes());
        let answer = net::raw_exchange(s.client.ports().socks5, &request);
        assert_eq!(answer, [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0], "{binary}");
        assert_eq!(s.echo.accepted(), 0, "{binary}: the request was served");
        let line = s
            .client
            .wait_for_log(&["reserved byte (RSV)"], DEADLINE)
            .unwrap_or_else(|| panic!("{binary}: the refusal is not logged\n{}", s.client.describe()));
        assert!(line.contains("0x01"), "{binary}: {line}");
        s.still_serves(&format!("{binary}: after the bad request"), 16 * 1024);
        assert_eq!(s.echo.accepted(), 1, "{binary}");
    }
}
