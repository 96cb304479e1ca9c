//! The tunnel and pool scenarios on glommio (thread-per-core, io_uring), through the runtime seam
//! (`Timer`, `Executor`, `Connector`) and `tokio_util::compat`, plus interop between runtimes: a
//! tokio client against a glommio server, a glommio client against a tokio server, and two glommio
//! executors pinned to different cores.
//!
//! Each test builds its own glommio executor(s); every wait is bounded, so a bug fails the test
//! instead of hanging it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use glommio::Placement;
use meshwire_hbone::client::{self, ClientConnection, ConnectRequest, Refusal};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::pool::{Pool, PoolConfig, PoolKey};
use meshwire_hbone::server::ServeOptions;
use meshwire_hbone::{ConnectError, Settings, Tunnel};
use meshwire_rt::TokioTimer;
use meshwire_testkit::data::{self, pattern};
use meshwire_testkit::glommio::*;
use meshwire_testkit::net;
use meshwire_testkit::pki::{CLIENT, Pki, SERVER, id};
use meshwire_testkit::upstream::count_to_end;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn to(addr: SocketAddr) -> ConnectRequest {
    ConnectRequest::new(Authority::parse(&addr.to_string()).unwrap())
}

async fn connect(pki: &Pki, server: SocketAddr) -> ClientConnection {
    within(LIMIT, "handshake", glommio_client(server, pki.client_tls.clone()))
        .await
        .unwrap()
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    within(LIMIT, "read to the end", data::read_all(r)).await
}

/// Writes `msg`, reads it back from an echo.
async fn echo_once<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    within(LIMIT, "echo", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(buf, msg);
}

/// A fresh PKI and the server side (HBONE, echo and sink servers) on an executor thread of its own.
fn server_side(name: &str, placement: Placement) -> (Pki, ServerThread) {
    let pki = Pki::new();
    let server = server_thread(name, placement, pki.server_tls.clone(), ServeOptions::default());
    (pki, server)
}

// ---------------------------------------------------------------------------------------------
// Tunnels on glommio
// ---------------------------------------------------------------------------------------------

#[test]
fn open_echo_and_half_close_from_the_client() {
    run("echo", Placement::Unbound, || async {
        let pki = Pki::new();
        let server = spawn_hbone_server(pki.server_tls.clone(), ServeOptions::default());
        let echo = spawn_echo_server();
        let conn = connect(&pki, server.addr).await;
        assert_eq!(conn.peer_identity(), &id(SERVER));

        let mut tunnel = within(LIMIT, "open", conn.open(&to(echo))).await.unwrap();
        assert_eq!(tunnel.peer_identity(), &id(SERVER));
        echo_once(&mut tunnel, b"hello through hbone").await;
        // Half close: the echo server sees end of input, finishes echoing, and closes its side.
        tunnel.write_all(b"last words").await.unwrap();
        tunnel.shutdown().await.unwrap();
        assert_eq!(read_all(&mut tunnel).await.unwrap(), b"last words");
        drop(tunnel);

        wait_until("the server reports the stream", || server.handler.finished.get() >= 1).await;
        let reports = server.handler.reports.borrow();
        assert_eq!(reports[0].peer, id(CLIENT), "the server saw the client's identity");
        assert_eq!(reports[0].status, http::StatusCode::OK);
        assert_eq!(reports[0].to_upstream, 29);
        assert_eq!(reports[0].from_upstream, 29);
        assert!(reports[0].error.is_none(), "{:?}", reports[0].error);
        assert!(server.errors.borrow().is_empty(), "{:?}", server.errors.borrow());
    });
}

#[test]
fn half_close_from_the_upstream_keeps_the_other_direction_open() {
    run("upstream-half-close", Placement::Unbound, || async {
        let pki = Pki::new();
        let server = spawn_hbone_server(pki.server_tls.clone(), ServeOptions::default());
        // An upstream that greets, closes its sending side, then reads everything and counts it.
        let (listener, upstream) = listen();
        let counted = glommio::spawn_local(async move {
            let mut tcp = accept(&listener).await.unwrap();
            tcp.write_all(b"greeting").await.unwrap();
            tcp.shutdown().await.unwrap();
            data::read_all(&mut tcp).await.unwrap().len()
        });
        let conn = connect(&pki, server.addr).await;
        let mut tunnel = within(LIMIT, "open", conn.open(&to(upstream))).await.unwrap();
        let got = read_all(&mut tunnel).await.unwrap();
        assert_eq!(got, b"greeting", "end of stream after the upstream's half close");
        // The client can still send after reading end of stream.
        let data = pattern(300_000, 1);
        within(LIMIT, "write after end of stream", tunnel.write_all(&data))
            .await
            .unwrap();
        tunnel.shutdown().await.unwrap();
        assert_eq!(within(LIMIT, "upstream counts", counted).await, data.len());
        wait_until("the server reports the stream", || server.handler.finished.get() >= 1).await;
        let report = &server.handler.reports.borrow()[0];
        assert_eq!((report.to_upstream, report.from_upstream), (300_000, 8));
        assert!(report.error.is_none(), "{:?}", report.error);
    });
}

#[test]
fn refusals_carry_their_status() {
    run("refusals", Placement::Unbound, || async {
        let pki = Pki::new();
        let server = spawn_hbone_server(pki.server_tls.clone(), ServeOptions::default());
        let conn = connect(&pki, server.addr).await;
        let refused = |err: &ConnectError| match err {
            ConnectError::Refused { kind, .. } => Some(*kind),
            _ => None,
        };

        // 401: the handler's policy denies port 1.
        let err = within(LIMIT, "open", conn.open(&to("127.0.0.1:1".parse().unwrap())))
            .await
            .unwrap_err();
        assert_eq!(refused(&err), Some(Refusal::Unauthorized), "{err}");
        assert_eq!(err.status(), Some(http::StatusCode::UNAUTHORIZED));
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");

        // 503: nothing listens on the destination.
        let closed = listen().1;
        let err = within(LIMIT, "open", conn.open(&to(closed))).await.unwrap_err();
        assert_eq!(refused(&err), Some(Refusal::Unavailable), "{err}");
        assert_eq!(err.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));

        // 400: a hostname authority this handler does not serve.
        let host = ConnectRequest::new(Authority::parse("reviews.default.svc:9080").unwrap());
        let err = within(LIMIT, "open", conn.open(&host)).await.unwrap_err();
        assert_eq!(refused(&err), Some(Refusal::BadRequest), "{err}");
        assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST));

        // The connection still serves a good stream after the refusals.
        let echo = spawn_echo_server();
        let mut t = within(LIMIT, "open", conn.open(&to(echo))).await.unwrap();
        echo_once(&mut t, b"ok").await;
        let statuses: Vec<_> = server
            .handler
            .reports
            .borrow()
            .iter()
            .map(|r| r.status.as_u16())
            .collect();
        assert_eq!(statuses, [401, 503, 400], "the handler saw each refusal");
    });
}

#[test]
fn dropping_the_tunnel_resets_the_stream_and_the_upstream_sees_the_end() {
    run("drop-resets", Placement::Unbound, || async {
        let pki = Pki::new();
        let server = spawn_hbone_server(pki.server_tls.clone(), ServeOptions::default());
        let (listener, upstream) = listen();
        let seen = glommio::spawn_local(async move { count_to_end(&mut accept(&listener).await.unwrap()).await });
        let conn = connect(&pki, server.addr).await;
        let mut tunnel = within(LIMIT, "open", conn.open(&to(upstream))).await.unwrap();
        tunnel.write_all(&pattern(100_000, 2)).await.unwrap();
        drop(tunnel); // RST_STREAM
        let total = within(LIMIT, "the upstream connection ends", seen).await;
        assert!(total <= 100_000);
        wait_until("the server reports the stream", || server.handler.finished.get() >= 1).await;
        {
            let report = &server.handler.reports.borrow()[0];
            assert!(
                report.error.is_some(),
                "a reset stream is reported as an error: {report:?}"
            );
        }
        // The connection survives the reset.
        let echo = spawn_echo_server();
        let mut t = within(LIMIT, "open", conn.open(&to(echo))).await.unwrap();
        echo_once(&mut t, b"still here").await;
    });
}

#[test]
fn an_upstream_abort_reaches_the_client_as_a_reset() {
    // glommio's TcpStream cannot set SO_LINGER: the aborting upstream runs on tokio, in its own thread.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let upstream_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let (mut tcp, _) = tokio::time::timeout(LIMIT, listener.accept()).await.unwrap().unwrap();
            let mut buf = [0u8; 5];
            tokio::time::timeout(LIMIT, tcp.read_exact(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf, b"12345");
            // Abort: RST instead of FIN.
            tcp.set_zero_linger().unwrap();
            drop(tcp);
        });
    });
    let upstream = addr_rx.recv_timeout(LIMIT).unwrap();
    run("upstream-abort", Placement::Unbound, move || async move {
        let pki = Pki::new();
        let server = spawn_hbone_server(pki.server_tls.clone(), ServeOptions::default());
        let conn = connect(&pki, server.addr).await;
        let mut tunnel = within(LIMIT, "open", conn.open(&to(upstream))).await.unwrap();
        tunnel.write_all(b"12345").await.unwrap();
        let err = read_all(&mut tunnel).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        wait_until("the server reports the stream", || server.handler.finished.get() >= 1).await;
        let report = &server.handler.reports.borrow()[0];
        assert!(report.error.is_some(), "{report:?}");
    });
    upstream_thread.join().unwrap();
}

#[test]
fn drain_lets_open_streams_finish_and_refuses_new_ones() {
    run("drain", Placement::Unbound, || async {
        let pki = Pki::new();
        let server = spawn_hbone_server(pki.server_tls.clone(), ServeOptions::default());
        let echo = spawn_echo_server();
        let conn = connect(&pki, server.addr).await;
        let mut tunnels = Vec::new();
        for _ in 0..3 {
            tunnels.push(within(LIMIT, "open", conn.open(&to(echo))).await.unwrap());
        }
        // Start the drain with the three streams open and data in flight.
        for (i, t) in tunnels.iter_mut().enumerate() {
            t.write_all(&pattern(50_000, i as u32)).await.unwrap();
        }
        server.drain.fire();
        // Once the GOAWAY arrived, a new stream is refused.
        let refused = within(LIMIT, "a new stream is refused", async {
            loop {
                match conn.open(&to(echo)).await {
                    Err(e) => break e,
                    Ok(_) => glommio::timer::sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await;
        assert!(matches!(refused, ConnectError::Http2 { .. }), "{refused}");
        // The open streams still carry everything, both ways, to the end.
        for (i, mut t) in tunnels.into_iter().enumerate() {
            let more = pattern(200_000, 100 + i as u32);
            within(LIMIT, "write while draining", t.write_all(&more)).await.unwrap();
            t.shutdown().await.unwrap();
            let back = read_all(&mut t).await.unwrap();
            let mut expected = pattern(50_000, i as u32);
            expected.extend_from_slice(&more);
            assert_eq!(back.len(), expected.len(), "stream {i}");
            assert!(back == expected, "stream {i} lost or reordered bytes");
        }
        // The server reports the three streams complete and clean, then ends the drained connection.
        let full = |r: &meshwire_hbone::server::StreamReport| r.to_upstream == 250_000;
        wait_until("the drained streams are reported", || {
            server.handler.reports.borrow().iter().filter(|r| full(r)).count() == 3
        })
        .await;
        for r in server.handler.reports.borrow().iter().filter(|r| full(r)) {
            assert!(r.error.is_none(), "{r:?}");
            assert_eq!(r.from_upstream, 250_000);
        }
        wait_until("the drained connection ends", || !server.served.borrow().is_empty()).await;
        assert!(server.errors.borrow().is_empty(), "{:?}", server.errors.borrow());
        let summary = &server.served.borrow()[0];
        assert_eq!(summary.peer, id(CLIENT));
        assert!(
            summary.streams >= 3,
            "the three streams, and probes sent before the GOAWAY: {summary:?}"
        );
    });
}

#[test]
fn one_gibibyte_through_one_tunnel_arrives_intact() {
    // The server side on its own executor, so client and server each have a core.
    let (pki, server) = server_side("gib-server", Placement::Unbound);
    let (hbone, sink, tls) = (server.hbone, server.sink, pki.client_tls.clone());
    run("gib-client", Placement::Unbound, move || async move {
        let conn = within(LIMIT, "handshake", glommio_client(hbone, tls)).await.unwrap();
        let mut tunnel = within(LIMIT, "open", conn.open(&to(sink))).await.unwrap();
        within(
            Duration::from_secs(120),
            "1 GiB through the tunnel",
            send_to_sink(&mut tunnel, 1 << 30, 9),
        )
        .await;
    });
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// The pool on glommio
// ---------------------------------------------------------------------------------------------

type GlommioPool = Pool<GlommioConnector, GlommioExecutor, GlommioTimer>;

fn glommio_pool(tls: Arc<rustls::ClientConfig>, config: PoolConfig) -> GlommioPool {
    Pool::new(GlommioConnector { tls }, GlommioExecutor, GlommioTimer, config)
}

fn key(dest: SocketAddr) -> PoolKey {
    PoolKey::new(id(CLIENT), vec![id(SERVER)], dest, None)
}

/// Opens `n` streams at once (one local task each) and holds them all open.
async fn open_many(pool: &GlommioPool, key: &PoolKey, echo: SocketAddr, n: usize) -> Vec<Tunnel> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (pool, key) = (pool.clone(), key.clone());
            glommio::spawn_local(async move { pool.connect(&key, &to(echo)).await })
        })
        .collect();
    let mut tunnels = Vec::with_capacity(n);
    for t in tasks {
        let tunnel = within(LIMIT, "pooled open", t).await;
        tunnels.push(tunnel.map_err(|e| e.to_string()).unwrap());
    }
    tunnels
}

#[test]
fn a_thousand_concurrent_streams_use_ten_connections() {
    let (pki, server) = server_side("pool-server", Placement::Unbound);
    let (hbone, echo, tls) = (server.hbone, server.echo, pki.client_tls.clone());
    run("pool-client", Placement::Unbound, move || async move {
        let pool = glommio_pool(tls, PoolConfig::default());
        let k = key(hbone);
        let mut tunnels = open_many(&pool, &k, echo, 1000).await;
        assert_eq!(pool.connections(&k), 10, "ceil(1000 / 100) connections");
        assert_eq!(pool.handshakes(), 10, "no handshake beyond the ten needed");
        // Every stream works.
        for (i, t) in tunnels.iter_mut().enumerate().step_by(97) {
            echo_once(t, format!("stream {i}").as_bytes()).await;
        }
        // Closed streams give their place back: new streams reuse the connections.
        tunnels.truncate(900);
        drop(tunnels);
        let again = open_many(&pool, &k, echo, 100).await;
        assert_eq!(pool.handshakes(), 10);
        assert_eq!(pool.connections(&k), 10);
        drop(again);
    });
    drop(server);
}

#[test]
fn two_hundred_requests_for_a_new_key_cause_one_handshake() {
    let (pki, server) = server_side("pool-server", Placement::Unbound);
    let (hbone, echo, tls) = (server.hbone, server.echo, pki.client_tls.clone());
    run("pool-client", Placement::Unbound, move || async move {
        let config = PoolConfig {
            max_streams_per_connection: 1000,
            ..PoolConfig::default()
        };
        let pool = glommio_pool(tls, config);
        let k = key(hbone);
        let mut tunnels = open_many(&pool, &k, echo, 200).await;
        assert_eq!(pool.handshakes(), 1);
        assert_eq!(pool.connections(&k), 1);
        echo_once(&mut tunnels[199], b"last").await;
    });
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// Interop between runtimes
// ---------------------------------------------------------------------------------------------

const INTEROP_BYTES: usize = 64 << 20;

/// Runs `fut` on a tokio runtime in a new thread and returns its output (a panic fails the caller).
fn on_tokio_thread<F, T>(fut: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(fut)
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

#[test]
fn a_tokio_client_talks_to_a_glommio_server() {
    let (pki, server) = server_side("interop-server", Placement::Unbound);
    let (hbone, echo, sink, tls) = (server.hbone, server.echo, server.sink, pki.client_tls.clone());
    on_tokio_thread(async move {
        let tcp = tokio::net::TcpStream::connect(hbone).await.unwrap();
        let (conn, driver) = tokio::time::timeout(LIMIT, client::handshake(tcp, tls, &Settings::default(), TokioTimer))
            .await
            .unwrap()
            .unwrap();
        tokio::spawn(driver);
        assert_eq!(conn.peer_identity(), &id(SERVER));

        let mut t = tokio::time::timeout(LIMIT, conn.open(&to(echo)))
            .await
            .unwrap()
            .unwrap();
        t.write_all(b"tokio -> glommio").await.unwrap();
        let mut buf = [0u8; 16];
        tokio::time::timeout(LIMIT, t.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"tokio -> glommio");
        t.shutdown().await.unwrap();
        let rest = tokio::time::timeout(LIMIT, data::read_all(&mut t))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty(), "the glommio echo half-closed after the client did");

        let mut t = tokio::time::timeout(LIMIT, conn.open(&to(sink)))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(LIMIT * 3, send_to_sink(&mut t, INTEROP_BYTES, 11))
            .await
            .expect("64 MiB through the tunnel");
    });
    drop(server);
}

/// A tokio HBONE server (`net::hbone_server_with`: an accept loop calling `server::serve`),
/// a tokio echo server and a tokio sink, on a tokio runtime in their own thread.
struct TokioServerThread {
    hbone: SocketAddr,
    echo: SocketAddr,
    sink: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn tokio_server_thread(tls: Arc<rustls::ServerConfig>) -> TokioServerThread {
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = net::hbone_server_with(tls, ServeOptions::default()).await;
            let echo = net::echo_server().await;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let sink_addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let _ = sink(tcp).await;
                    });
                }
            });
            addrs_tx.send((server.addr, echo, sink_addr)).unwrap();
            let _ = stop_rx.await;
            let errors = server.errors.lock().await;
            assert!(errors.is_empty(), "tokio server errors: {errors:?}");
        });
    });
    let (hbone, echo, sink) = addrs_rx.recv_timeout(LIMIT).expect("the tokio server started");
    TokioServerThread {
        hbone,
        echo,
        sink,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

impl Drop for TokioServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let result = thread.join();
            if !std::thread::panicking() {
                result.unwrap_or_else(|e| std::panic::resume_unwind(e));
            }
        }
    }
}

#[test]
fn a_glommio_client_talks_to_a_tokio_server() {
    let pki = Pki::new();
    let server = tokio_server_thread(pki.server_tls.clone());
    let (hbone, echo, sink, tls) = (server.hbone, server.echo, server.sink, pki.client_tls.clone());
    run("interop-client", Placement::Unbound, move || async move {
        let conn = within(LIMIT, "handshake", glommio_client(hbone, tls)).await.unwrap();
        assert_eq!(conn.peer_identity(), &id(SERVER));
        let mut t = within(LIMIT, "open", conn.open(&to(echo))).await.unwrap();
        echo_once(&mut t, b"glommio -> tokio").await;
        t.shutdown().await.unwrap();
        assert!(read_all(&mut t).await.unwrap().is_empty());

        let mut t = within(LIMIT, "open", conn.open(&to(sink))).await.unwrap();
        within(
            LIMIT * 3,
            "64 MiB through the tunnel",
            send_to_sink(&mut t, INTEROP_BYTES, 12),
        )
        .await;
    });
    drop(server);
}

#[test]
fn two_glommio_executors_pinned_to_different_cores() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("skipped: needs 2 cores, have {cores}");
        return;
    }
    let (pki, server) = server_side("core-0", Placement::Fixed(0));
    assert_eq!(server.cpus, "0", "the server executor is pinned to core 0");
    let (hbone, echo, tls) = (server.hbone, server.echo, pki.client_tls.clone());
    run("core-1", Placement::Fixed(1), move || async move {
        assert_eq!(allowed_cpus(), "1", "the client executor is pinned to core 1");
        let conn = within(LIMIT, "handshake", glommio_client(hbone, tls)).await.unwrap();
        let mut tunnels = Vec::new();
        for i in 0..4u32 {
            let mut t = within(LIMIT, "open", conn.open(&to(echo))).await.unwrap();
            echo_once(&mut t, &pattern(100_000, i)).await;
            tunnels.push(t);
        }
        for mut t in tunnels {
            t.shutdown().await.unwrap();
            assert!(read_all(&mut t).await.unwrap().is_empty());
        }
    });
    drop(server);
}

/// A peer that stops answering (its executor stopped: glommio leaves the sockets of its dropped tasks
/// open, so no FIN or RST arrives, as with a host that vanished) is found out by the keep-alive
/// PINGs: the connection fails within the ping timeout, and its streams with it. Nothing hangs.
#[test]
fn a_peer_that_vanishes_mid_transfer_is_reported_not_hung() {
    let (pki, server) = server_side("doomed", Placement::Unbound);
    let (hbone, echo, tls) = (server.hbone, server.echo, pki.client_tls.clone());
    run("survivor", Placement::Unbound, move || async move {
        let settings = Settings::builder()
            .ping_interval(Duration::from_millis(200))
            .ping_timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        let tcp = tcp_connect(hbone).await.unwrap();
        let (conn, driver) = within(LIMIT, "handshake", client::handshake(tcp, tls, &settings, GlommioTimer))
            .await
            .unwrap();
        let driver = glommio::spawn_local(driver);
        let mut tunnel = within(LIMIT, "open", conn.open(&to(echo))).await.unwrap();
        echo_once(&mut tunnel, &pattern(200_000, 7)).await;
        tunnel.write_all(&pattern(50_000, 8)).await.unwrap();
        drop(server);
        let err = read_all(&mut tunnel)
            .await
            .expect_err("reported as an error, not a clean end");
        assert!(!err.to_string().is_empty());
        let ended = within(LIMIT, "the connection driver ends", driver).await;
        assert!(matches!(ended, Err(ConnectError::PingTimeout(_))), "{ended:?}");
        let err = within(LIMIT, "open after the peer vanished", conn.open(&to(echo)))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Http2 { .. }), "{err}");
    });
}
