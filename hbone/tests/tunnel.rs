//! Client and server over real loopback sockets with real mTLS: open, echo, half close both ways,
//! refusals with their statuses, resets both ways, a peer killed mid-transfer, drain, and a
//! gibibyte through one tunnel with a checksum at the far end.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use meshwire_hbone::client::{self, ConnectRequest, Refusal};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::server::ServeOptions;
use meshwire_hbone::{ConnectError, Settings};
use meshwire_rt::TokioTimer;
use meshwire_testkit::data::*;
use meshwire_testkit::net::*;
use meshwire_testkit::pki::*;
use meshwire_testkit::upstream::count_to_end;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);

async fn connect(pki: &Pki, server: &HboneServer) -> client::ClientConnection {
    connect_with(server, pki.client_tls.clone()).await.unwrap()
}

async fn connect_with(
    server: &HboneServer,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<client::ClientConnection, ConnectError> {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (conn, driver) = client::handshake(tcp, tls, &Settings::default(), TokioTimer).await?;
    tokio::spawn(driver);
    Ok(conn)
}

fn to(addr: std::net::SocketAddr) -> ConnectRequest {
    ConnectRequest::new(Authority::parse(&addr.to_string()).unwrap())
}

#[tokio::test]
async fn open_echo_and_half_close_from_the_client() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let conn = connect(&pki, &server).await;
    assert_eq!(conn.peer_identity(), &id(SERVER));

    let mut tunnel = conn.open(&to(echo)).await.unwrap();
    assert_eq!(tunnel.peer_identity(), &id(SERVER));
    assert_eq!(
        tunnel.response_headers().get("baggage").unwrap(),
        "k8s.namespace.name=default,service.name=echo",
        "the handler's response headers reach the client"
    );
    tunnel.write_all(b"hello through hbone").await.unwrap();
    let mut buf = [0u8; 19];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through hbone");
    // Half close: the echo server sees end of input, finishes echoing, and closes its side.
    tunnel.write_all(b"last words").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let rest = timeout(LIMIT, read_all(&mut tunnel)).await.unwrap().unwrap();
    assert_eq!(rest, b"last words");
    drop(tunnel);

    timeout(LIMIT, async {
        while server.handler.finished.load(std::sync::atomic::Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let reports = server.handler.reports.lock().await;
    assert_eq!(reports[0].peer, id(CLIENT), "the server saw the client's identity");
    assert_eq!(reports[0].to_upstream, 29);
    assert_eq!(reports[0].from_upstream, 29);
    assert!(reports[0].error.is_none(), "{:?}", reports[0].error);
}

#[tokio::test]
async fn half_close_from_the_upstream_keeps_the_other_direction_open() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    // An upstream that greets, closes its sending side, then reads everything and reports the count.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let counted = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"greeting").await.unwrap();
        tcp.shutdown().await.unwrap();
        read_all(&mut tcp).await.unwrap().len()
    });
    let conn = connect(&pki, &server).await;
    let mut tunnel = conn.open(&to(upstream)).await.unwrap();
    let got = timeout(LIMIT, read_all(&mut tunnel)).await.unwrap().unwrap();
    assert_eq!(got, b"greeting", "end of stream after the upstream's half close");
    // The client can still send after reading end of stream.
    let data = pattern(300_000, 1);
    tunnel.write_all(&data).await.unwrap();
    tunnel.shutdown().await.unwrap();
    assert_eq!(timeout(LIMIT, counted).await.unwrap().unwrap(), data.len());
}

#[tokio::test]
async fn refusals_carry_their_status() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let conn = connect(&pki, &server).await;

    // 401: the handler's policy denies port 1.
    let err = conn.open(&to("127.0.0.1:1".parse().unwrap())).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused {
                kind: Refusal::Unauthorized,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.status(), Some(http::StatusCode::UNAUTHORIZED));
    assert!(
        err.to_string().contains("127.0.0.1:1") && err.to_string().contains("401"),
        "{err}"
    );

    // 503: nothing listens on the destination.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = conn.open(&to(closed)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused {
                kind: Refusal::Unavailable,
                ..
            }
        ),
        "{err}"
    );

    // 400: a hostname authority this handler does not serve.
    let err = conn
        .open(&ConnectRequest::new(
            Authority::parse("reviews.default.svc:9080").unwrap(),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused {
                kind: Refusal::BadRequest,
                ..
            }
        ),
        "{err}"
    );

    // The connection still serves a good stream after the refusals.
    let echo = echo_server().await;
    let mut t = conn.open(&to(echo)).await.unwrap();
    t.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ok");
}

#[tokio::test]
async fn a_wrong_server_identity_fails_the_handshake() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let err = connect_with(
        &server,
        pki.client_expecting("spiffe://cluster.local/ns/default/sa/other"),
    )
    .await
    .unwrap_err();
    let ConnectError::Tls { source } = &err else {
        panic!("expected a TLS error, got {err}")
    };
    let mismatch = meshwire_identity::tls::find_cause::<meshwire_identity::tls::IdentityMismatch>(&**source).unwrap();
    assert_eq!(mismatch.actual, id(SERVER));
}

#[tokio::test]
async fn dropping_the_tunnel_resets_the_stream_and_the_upstream_sees_the_end() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let seen = tokio::spawn(async move { count_to_end(&mut listener.accept().await.unwrap().0).await });
    let conn = connect(&pki, &server).await;
    let mut tunnel = conn.open(&to(upstream)).await.unwrap();
    tunnel.write_all(&pattern(100_000, 2)).await.unwrap();
    drop(tunnel); // RST_STREAM
    let total = timeout(LIMIT, seen)
        .await
        .expect("the upstream connection ended")
        .unwrap();
    assert!(total <= 100_000);
    // The server reported the stream as failed (reset), not as a clean end.
    timeout(LIMIT, async {
        loop {
            if let Some(r) = server.handler.reports.lock().await.first() {
                break r.error.as_ref().map(|e| e.kind());
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap()
    .expect("a reset stream is reported as an error");
}

#[tokio::test]
async fn an_upstream_abort_reaches_the_client_as_an_error() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        let mut tcp = tcp;
        tcp.read_exact(&mut buf).await.unwrap();
        // Abort: RST instead of FIN.
        tcp.set_zero_linger().unwrap();
        drop(tcp);
    });
    let conn = connect(&pki, &server).await;
    let mut tunnel = conn.open(&to(upstream)).await.unwrap();
    tunnel.write_all(b"12345").await.unwrap();
    let err = timeout(LIMIT, read_all(&mut tunnel)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn a_peer_killed_mid_transfer_is_reported_not_hung() {
    let pki = Pki::new();
    // A server we can kill: serve one connection on a task we abort.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls_config = pki.server_tls.clone();
    let serving = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let handler = LoopbackHandler::default();
        let _ = meshwire_hbone::server::serve(
            tcp,
            tls_config,
            &ServeOptions::default(),
            &handler,
            &TokioTimer,
            std::future::pending(),
        )
        .await;
    });
    let echo = echo_server().await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (conn, driver) = client::handshake(tcp, pki.client_tls.clone(), &Settings::default(), TokioTimer)
        .await
        .unwrap();
    let driver = tokio::spawn(driver);
    let mut tunnel = conn.open(&to(echo)).await.unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.unwrap();
    serving.abort(); // the peer process dies: its socket closes
    let err = timeout(LIMIT, read_all(&mut tunnel))
        .await
        .expect("no hang")
        .expect_err("reported as an error");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::Other
        ),
        "{err:?}"
    );
    timeout(LIMIT, driver)
        .await
        .expect("the connection driver ends when the peer dies")
        .unwrap()
        .ok();
    let err = timeout(LIMIT, conn.open(&to(echo))).await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectError::Http2 { .. }), "{err}");
}

#[tokio::test]
async fn drain_lets_open_streams_finish_and_refuses_new_ones() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let conn = connect(&pki, &server).await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(conn.open(&to(echo)).await.unwrap());
    }
    // Start the drain with the three streams open and data in flight.
    for (i, t) in tunnels.iter_mut().enumerate() {
        t.write_all(&pattern(50_000, i as u32)).await.unwrap();
    }
    server.shutdown.send(true).unwrap();
    // Give the GOAWAY time to arrive, then a new stream is refused.
    let refused = timeout(LIMIT, async {
        loop {
            match conn.open(&to(echo)).await {
                Err(e) => break e,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(refused, ConnectError::Http2 { .. }), "{refused}");
    // The open streams still carry everything, both ways, to the end.
    for (i, mut t) in tunnels.into_iter().enumerate() {
        let more = pattern(200_000, 100 + i as u32);
        t.write_all(&more).await.unwrap();
        t.shutdown().await.unwrap();
        let back = timeout(LIMIT, read_all(&mut t)).await.unwrap().unwrap();
        let mut expected = pattern(50_000, i as u32);
        expected.extend_from_slice(&more);
        assert_eq!(back.len(), expected.len());
        assert!(back == expected, "stream {i} lost or reordered bytes");
    }
}

#[tokio::test]
async fn plaintext_on_the_tls_port_is_refused_and_named() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n")
        .await
        .unwrap();
    let _ = timeout(LIMIT, read_all(&mut tcp)).await.unwrap();
    let errors = timeout(LIMIT, async {
        loop {
            let e = server.errors.lock().await.clone();
            if !e.is_empty() {
                break e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(errors[0].contains("TLS handshake failed"), "{errors:?}");
    assert!(
        errors[0].contains("127.0.0.1:"),
        "the log line names the peer: {errors:?}"
    );
}

#[tokio::test]
async fn a_silent_server_times_the_handshake_out() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(tcp);
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let settings = Settings::builder()
        .handshake_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = client::handshake(tcp, pki.client_tls.clone(), &settings, TokioTimer)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ConnectError::HandshakeTimeout(d) if d == Duration::from_millis(200)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_through_one_tunnel_arrives_intact() {
    const TOTAL: usize = 1 << 30;
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    // A sink that checksums what it receives and reports it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink = listener.local_addr().unwrap();
    let received = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut sum = Fnv::new();
        let mut n = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let k = tcp.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            sum.update(&buf[..k]);
            n += k;
        }
        tcp.write_all(&sum.0.to_be_bytes()).await.unwrap();
        (n, sum.0)
    });
    let conn = connect(&pki, &server).await;
    let mut tunnel = conn.open(&to(sink)).await.unwrap();
    let block = pattern(1 << 20, 9);
    let mut sent = Fnv::new();
    for i in 0..TOTAL / block.len() {
        // Vary the blocks so reordering would change the checksum.
        let mut b = block.clone();
        b[0] = i as u8;
        sent.update(&b);
        tunnel.write_all(&b).await.unwrap();
    }
    tunnel.shutdown().await.unwrap();
    let mut reply = [0u8; 8];
    timeout(Duration::from_secs(120), tunnel.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let (n, far_sum) = received.await.unwrap();
    assert_eq!(n, TOTAL);
    assert_eq!(far_sum, sent.0, "checksum at the far end");
    assert_eq!(u64::from_be_bytes(reply), sent.0);
}

#[test]
fn invalid_settings_are_an_error_when_built_not_a_panic_on_connect() {
    let err = Settings::builder().max_frame_size(100).build().unwrap_err();
    assert!(err.to_string().contains("max_frame_size"), "{err}");
    let err = Settings::builder().connection_window(1).build().unwrap_err();
    assert!(err.to_string().contains("connection window"), "{err}");
}

#[tokio::test]
async fn a_workload_connection_spliced_into_a_tunnel_round_trips_with_exact_counts() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let conn = connect(&pki, &server).await;
    // An outbound proxy in miniature: accept the workload's connection, splice it into a tunnel.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let spliced = tokio::spawn(async move {
        let (mut downstream, _) = listener.accept().await.unwrap();
        let mut tunnel = conn.open(&to(echo)).await.unwrap();
        tunnel
            .splice(&mut downstream, meshwire_hbone::copy::CopyConfig::default())
            .await
    });
    let mut workload = TcpStream::connect(proxy).await.unwrap();
    let data = pattern(3_000_000, 5);
    let (mut r, mut w) = workload.split();
    let (sent, got) = tokio::join!(
        async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        },
        read_all(&mut r)
    );
    let () = sent;
    assert!(got.unwrap() == data, "echoed intact through the splice");
    let outcome = timeout(LIMIT, spliced).await.unwrap().unwrap();
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert_eq!(outcome.b_to_a, data.len() as u64, "workload to tunnel");
    assert_eq!(outcome.a_to_b, data.len() as u64, "tunnel to workload");
}

/// A node proxy holds tens of thousands of connections: keep what each one costs in sight.
#[tokio::test]
async fn per_connection_futures_stay_small() {
    let pki = Pki::new();
    let handler = LoopbackHandler::default();
    let (a, _b) = tokio::io::duplex(64);
    let (options, settings) = (ServeOptions::default(), Settings::default());
    let serve = meshwire_hbone::server::serve(
        a,
        pki.server_tls.clone(),
        &options,
        &handler,
        &TokioTimer,
        std::future::pending(),
    );
    let serve_size = std::mem::size_of_val(&serve);
    let (c, _d) = tokio::io::duplex(64);
    let handshake = client::handshake(c, pki.client_tls.clone(), &settings, TokioTimer);
    let handshake_size = std::mem::size_of_val(&handshake);
    let tunnel_size = std::mem::size_of::<meshwire_hbone::Tunnel>();
    let driver_size = std::mem::size_of::<client::ConnectionDriver<TcpStream, TokioTimer>>();
    eprintln!(
        "serve future {serve_size} B, client handshake future {handshake_size} B, connection driver {driver_size} B, \
         tunnel {tunnel_size} B"
    );
    assert!(serve_size <= 3072, "serve future is {serve_size} bytes");
    assert!(
        handshake_size <= 1024,
        "client handshake future is {handshake_size} bytes"
    );
    assert!(tunnel_size <= 256, "a tunnel is {tunnel_size} bytes");
    assert!(driver_size <= 3072, "a connection driver is {driver_size} bytes");
}

/// An embedder that terminates TLS itself hands the established stream and the verified identity to
/// `serve_established`: CONNECT streams round trip, and the handler and the summary see that identity.
#[tokio::test]
async fn serve_established_serves_http2_on_a_tls_stream_the_caller_accepted() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = std::sync::Arc::new(LoopbackHandler::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (server_tls, h) = (pki.server_tls.clone(), handler.clone());
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls_stream = tokio_rustls::TlsAcceptor::from(server_tls).accept(tcp).await.unwrap();
        let peer = meshwire_identity::tls::peer_identity(tls_stream.get_ref().1).unwrap();
        let shutdown = async move {
            let _ = stopped.await;
        };
        meshwire_hbone::server::serve_established(
            tls_stream,
            peer,
            &ServeOptions::default(),
            &*h,
            &TokioTimer,
            shutdown,
        )
        .await
    });

    let tcp = TcpStream::connect(addr).await.unwrap();
    let (conn, driver) = client::handshake(tcp, pki.client_tls.clone(), &Settings::default(), TokioTimer)
        .await
        .unwrap();
    tokio::spawn(driver);
    assert_eq!(conn.peer_identity(), &id(SERVER));
    for message in [&b"first tunnel"[..], b"second tunnel"] {
        let mut tunnel = conn.open(&to(echo)).await.unwrap();
        tunnel.write_all(message).await.unwrap();
        tunnel.shutdown().await.unwrap();
        let echoed = timeout(LIMIT, read_all(&mut tunnel)).await.unwrap().unwrap();
        assert_eq!(echoed, message);
    }
    // Refusals take the same path as in `serve`.
    let refused = conn.open(&to("127.0.0.1:1".parse().unwrap())).await.err().unwrap();
    assert_eq!(refused.status(), Some(http::StatusCode::UNAUTHORIZED), "{refused}");

    stop.send(()).unwrap();
    let summary = timeout(LIMIT, served).await.unwrap().unwrap().unwrap();
    assert_eq!(summary.peer, id(CLIENT));
    assert_eq!(summary.streams, 3);
    let requests = handler.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    assert!(
        requests.iter().all(|r| r.peer == id(CLIENT)),
        "the handler saw the caller's identity"
    );
    let reports = handler.reports.lock().await;
    assert_eq!(reports.len(), 3);
    assert!(reports.iter().all(|r| r.peer == id(CLIENT)));
    assert_eq!(reports.iter().map(|r| r.to_upstream).sum::<u64>(), 25);
}
