//! Memory is bounded by configuration, not by the peer: a mesh client with a valid SVID that opens
//! many CONNECT streams to an upstream that sends without end, advertises a huge HTTP/2 window and
//! never reads, gets back-pressure once the proxy holds its buffer budget, and the memory comes back
//! after the connections close. In the other direction, mesh clients that upload without end over
//! many HBONE connections to an upstream that never reads are held to the receive budget the
//! connections lease their windows from.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use meshwire_dataplane::rt::tokio::TokioTimer;
use meshwire_hbone::client::{self, ConnectRequest, Tunnel};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::settings::Settings;
use meshwire_testkit::http;
use meshwire_testkit::upstream::NeverRead;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::hbone::{HboneClient, spiffe};
use meshwire_tests::mesh::{Mesh, Proxy};
use meshwire_tests::net::{self, EchoServer, lo};
use meshwire_tests::pair;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

const MIB: u64 = 1024 * 1024;
/// HBONE connections the attacker opens.
const CONNECTIONS: usize = 4;
/// CONNECT streams on each.
const STREAMS: usize = 100;
/// The server proxy's process-wide budget of bytes held for peers.
const PROCESS_BUDGET: u64 = 24 * MIB;
/// Its budget per HBONE connection.
const CONNECTION_BUDGET: u64 = 8 * MIB;
/// Its HTTP/2 send buffer per stream.
const STREAM_SEND_BUFFER: u64 = 64 * 1024;
/// What the process may hold beyond the budget: per-connection TLS and HTTP/2 state, per-stream
/// state and sockets, allocator fragmentation. Without a budget the attack costs about 0.5 MiB per
/// stream (200 MiB here).
const ALLOWANCE: u64 = 48 * MIB;

/// A TCP server on `ip` that, once `go` is set, writes to every connection without end.
struct Firehose {
    addr: SocketAddr,
    written: Arc<AtomicU64>,
    go: Arc<AtomicBool>,
    go_notify: Arc<tokio::sync::Notify>,
}

impl Firehose {
    fn start(runtime: &tokio::runtime::Runtime, ip: IpAddr) -> Firehose {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let go = Arc::new(AtomicBool::new(false));
        let go_notify = Arc::new(tokio::sync::Notify::new());
        let (w, g, n) = (written.clone(), go.clone(), go_notify.clone());
        runtime.spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (written, go, notify) = (w.clone(), g.clone(), n.clone());
                tokio::spawn(async move {
                    while !go.load(Ordering::SeqCst) {
                        let notified = notify.notified();
                        if go.load(Ordering::SeqCst) {
                            break;
                        }
                        notified.await;
                    }
                    let chunk = vec![0x5au8; 64 * 1024];
                    while tcp.write_all(&chunk).await.is_ok() {
                        written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Firehose {
            addr,
            written,
            go,
            go_notify,
        }
    }

    fn open_the_tap(&self) {
        self.go.store(true, Ordering::SeqCst);
        self.go_notify.notify_waiters();
    }
}

/// One hostile HBONE connection: its streams, and the task that drives it until told to stop
/// (after which it holds the connection open without reading it) and then to close.
struct Hostile {
    tunnels: Vec<Tunnel>,
    stop: Option<oneshot::Sender<()>>,
    close: Option<oneshot::Sender<()>>,
    connection: Option<client::ClientConnection>,
}

/// A raw HBONE connection from `lo(1)` to `proxy`'s inbound listener as `default/client`, advertising
/// the largest windows HTTP/2 allows (so that only the server's own limits hold its buffers), and its
/// driver (to run).
async fn raw_connection(
    mesh: &Mesh,
    proxy: &Proxy,
) -> (
    client::ClientConnection,
    client::ConnectionDriver<tokio::net::TcpStream, TokioTimer>,
) {
    let credentials = mesh.ca().issue(&spiffe("default", "client")).unwrap();
    let tls = meshwire_identity::tls::client_config(
        &credentials.svid,
        &credentials.bundles,
        vec![spiffe("default", "server")],
        vec![b"h2".to_vec()],
    )
    .unwrap();
    // The largest windows HTTP/2 allows, so that only the server's own limits hold its buffers.
    let settings = Settings::builder()
        .stream_window(((1 << 31) - 1) / 4)
        .connection_window((1 << 31) - 1)
        .build()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(lo(1), 0)).unwrap();
    let tcp = socket.connect(proxy.ports().inbound).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    client::handshake(tcp, Arc::new(tls), &settings, TokioTimer)
        .await
        .unwrap()
}

fn hostile_connection(runtime: &tokio::runtime::Runtime, mesh: &Mesh, proxy: &Proxy, upstream: SocketAddr) -> Hostile {
    runtime.block_on(async move {
        let (connection, driver) = raw_connection(mesh, proxy).await;
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (close, close_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut driver = std::pin::pin!(driver);
            tokio::select! {
                _ = &mut driver => {}
                _ = stop_rx => {
                    // Hold the connection without reading it.
                    let _ = close_rx.await;
                }
            }
        });
        let mut tunnels = Vec::new();
        for _ in 0..STREAMS {
            let request = ConnectRequest::new(Authority::SocketAddr(upstream));
            tunnels.push(connection.open(&request).await.expect("CONNECT to the firehose"));
        }
        Hostile {
            tunnels,
            stop: Some(stop),
            close: Some(close),
            connection: Some(connection),
        }
    })
}

/// Waits until `progress` (bytes sent by the attacker) stops growing (every stream back-pressured), sampling the
/// proxy's RSS; returns the largest RSS seen, in KiB.
fn peak_rss_until_stalled(proxy: &Proxy, progress: &AtomicU64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak = 0;
    let mut last = u64::MAX;
    let mut still = 0;
    while still < 6 {
        assert!(Instant::now() < deadline, "{what}: the traffic never stalled");
        thread::sleep(Duration::from_millis(500));
        peak = peak.max(proxy.rss_kib().expect("the proxy's RSS"));
        let now = progress.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    peak
}

fn attack(binary: &Binary) {
    let what = binary.name();
    let runtime = runtime();
    let firehose = Firehose::start(&runtime, lo(2));
    let (mesh, server, before) = attacked_server(
        binary,
        firehose.addr,
        &[
            ("MESHWIRE_HBONE_BUFFER_BUDGET", PROCESS_BUDGET),
            ("MESHWIRE_HBONE_CONNECTION_BUFFER", CONNECTION_BUDGET),
            ("MESHWIRE_HBONE_STREAM_SEND_BUFFER", STREAM_SEND_BUFFER),
        ],
    );

    let mut hostile: Vec<Hostile> = (0..CONNECTIONS)
        .map(|_| hostile_connection(&runtime, &mesh, &server, firehose.addr))
        .collect();
    for h in &mut hostile {
        let _ = h.stop.take().unwrap().send(());
    }
    firehose.open_the_tap();
    let peak = peak_rss_until_stalled(&server, &firehose.written, what);
    let buffered = config_dump_buffers(&server);

    // Every connection closes.
    for mut h in hostile.drain(..) {
        h.tunnels.clear();
        drop(h.connection.take());
        let _ = h.close.take().unwrap().send(());
    }
    let (after, slack) = rss_after_close(&server, before);
    eprintln!(
        "{what}: RSS before {} KiB, peak {} KiB (+{} KiB for {} streams), after close {} KiB; firehose wrote {} MiB; dump {buffered}",
        before,
        peak,
        peak.saturating_sub(before),
        CONNECTIONS * STREAMS,
        after,
        firehose.written.load(Ordering::Relaxed) / MIB,
    );
    assert_peak_within(&server, before, peak, PROCESS_BUDGET + ALLOWANCE, "the budget", what);
    assert_came_back(before, after, slack, what);
    // Nothing stays charged once the streams are gone.
    wait_until_returned(&server, "processBuffered", what);
}

/// A runtime for the attackers and their servers.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A mesh of the usual pair's configuration (its service on `upstream`'s port) and the server
/// workload's proxy of `binary` with the environment variables `env`, ready; and its RSS once
/// [`warmed_up_rss`].
fn attacked_server(binary: &Binary, upstream: SocketAddr, env: &[(&str, u64)]) -> (Mesh, Proxy, u64) {
    let mesh = Mesh::new(&pair::config(upstream.port(), ""));
    let server = env
        .iter()
        .fold(pair::server_proxy(&mesh, binary), |builder, (name, value)| {
            builder.env(name, &value.to_string())
        })
        .spawn();
    let before = warmed_up_rss(&mesh, &server, binary.name());
    (mesh, server, before)
}

/// Checks that the `peak` RSS of `proxy` (KiB) stayed within `before` plus `bound` bytes (`budget`
/// plus its allowance, `budget` naming it for the failure message).
fn assert_peak_within(proxy: &Proxy, before: u64, peak: u64, bound: u64, budget: &str, what: &str) {
    let bound = before + bound / 1024;
    assert!(
        peak <= bound,
        "{what}: RSS grew from {before} KiB to {peak} KiB, over {budget} plus allowance ({bound} KiB)\n{}",
        proxy.describe()
    );
}

/// Checks that the RSS `after` every connection closed came back within `slack` of `before` (KiB).
fn assert_came_back(before: u64, after: u64, slack: u64, what: &str) {
    assert!(
        after <= before + slack,
        "{what}: RSS {after} KiB after every connection closed, more than {slack} KiB over the {before} KiB before"
    );
}

/// The proxy's RSS (KiB) once one tunnel carried 1 MiB each way, so that what any first connection
/// costs for good (code paged in, TLS and HTTP/2 state set up once, allocator arenas) counts as before.
fn warmed_up_rss(mesh: &Mesh, server: &Proxy, what: &str) -> u64 {
    let echo = EchoServer::start(lo(2));
    let client =
        HboneClient::new(mesh.ca(), &spiffe("default", "client"), &[spiffe("default", "server")]).from_ip(lo(1));
    let tunnel = client
        .open(server.ports().inbound, echo.addr())
        .expect("a tunnel to the echo server");
    let echoed = net::echo_exchange(tunnel.stream, MIB as usize).expect("the echo exchange");
    assert!(echoed.intact(), "{what}: {echoed:?}");
    drop(client);
    server.rss_kib().unwrap()
}

/// The proxy's RSS (KiB) once it came back within the slack (10 % of `before`, or 4 MiB on a small
/// process) or after 90 s, and that slack.
fn rss_after_close(server: &Proxy, before: u64) -> (u64, u64) {
    let slack = (before / 10).max(4 * 1024);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut after = server.rss_kib().unwrap();
    while after > before + slack && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
        after = server.rss_kib().unwrap();
    }
    (after, slack)
}

/// Waits (30 s at most) until the `key` of the dump's `buffers` section is 0.
fn wait_until_returned(server: &Proxy, key: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dump = config_dump_buffers(server);
        if dump[key] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {key} still not 0 after close: {dump}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The `buffers` section of the proxy's `/config_dump`.
fn config_dump_buffers(proxy: &Proxy) -> serde_json::Value {
    let answer = http::request_blocking(proxy.ports().admin, "GET", "/config_dump").expect("/config_dump");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let dump: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    dump["meshwire"]["buffers"].clone()
}

#[test]
fn a_peer_that_never_reads_is_held_to_the_buffer_budget_and_memory_comes_back() {
    for binary in binary::all() {
        attack(&binary);
    }
}

#[test]
fn the_budgets_and_the_bytes_held_are_in_config_dump_and_metrics() {
    for binary in binary::all() {
        let mesh = Mesh::new(&pair::config(9, ""));
        let proxy = mesh
            .proxy(&binary, lo(2))
            .dedicated("default/server/server")
            .arg("--hbone-buffer-budget=33554432")
            .env("MESHWIRE_HBONE_CONNECTION_BUFFER", "8388608")
            .env("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "65536")
            .arg("--hbone-receive-budget=16777216")
            .spawn();
        let buffers = config_dump_buffers(&proxy);
        let expected = serde_json::json!({
            "streamSendBuffer": 65536,
            "streamCopyBuffer": 262144,
            "streamLease": 65536 + 262144,
            "connectionBudget": 8388608,
            "processBudget": 33554432,
            "processBuffered": 0,
            "streamWindow": 4194304,
            "connectionWindow": 16777216,
            "receiveBudget": 16777216,
            "receiveLeased": 0,
        });
        assert_eq!(buffers, expected, "{binary}");
        let metrics = proxy.metrics();
        assert!(
            metrics.contains("meshwire_hbone_buffer_budget_bytes 33554432"),
            "{binary}: {metrics}"
        );
        assert!(
            metrics.contains("meshwire_hbone_buffered_bytes 0"),
            "{binary}: {metrics}"
        );
        assert!(
            metrics.contains("meshwire_hbone_receive_budget_bytes 16777216"),
            "{binary}: {metrics}"
        );
        assert!(
            metrics.contains("meshwire_hbone_receive_window_leased_bytes 0"),
            "{binary}: {metrics}"
        );
        // One connection, held open, leases its window (16 MiB less HTTP/2's default 64 KiB).
        let client =
            HboneClient::new(mesh.ca(), &spiffe("default", "client"), &[spiffe("default", "server")]).from_ip(lo(1));
        let echo = EchoServer::start(lo(2));
        let tunnel = client
            .open(proxy.ports().inbound, echo.addr())
            .expect("a tunnel to the echo server");
        let leased = serde_json::json!(16777216 - 65535);
        assert_eq!(config_dump_buffers(&proxy)["receiveLeased"], leased, "{binary}");
        assert!(
            proxy
                .metrics()
                .contains(&format!("meshwire_hbone_receive_window_leased_bytes {leased}")),
            "{binary}"
        );
        drop(tunnel);
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        while config_dump_buffers(&proxy)["receiveLeased"] != 0 {
            assert!(Instant::now() < deadline, "{binary}: the lease was not given back");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_budget_too_small_for_one_stream_is_refused_naming_it() {
    for binary in binary::all() {
        for (args, named) in [
            (["--hbone-buffer-budget", "100000"], "--hbone-buffer-budget"),
            (["--hbone-connection-buffer", "1"], "--hbone-connection-buffer"),
            (["--hbone-stream-send-buffer", "10"], "--hbone-stream-send-buffer"),
            (["--hbone-buffer-budget", "lots"], "--hbone-buffer-budget"),
            (["--hbone-receive-budget", "1GiB"], "--hbone-receive-budget"),
        ] {
            let output = binary.command().args(args).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{binary} {args:?}: {stderr}");
            assert!(stderr.contains(named), "{binary} {args:?}: {stderr}");
        }
    }
}

/// A hostile HBONE server: accepts every CONNECT (to an upstream that is never read), advertises the
/// largest windows, and once told to stop, holds its connections open without reading them.
struct HostileServer {
    accepted: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
}

fn hostile_server(runtime: &tokio::runtime::Runtime, mesh: &Mesh, addr: SocketAddr) -> HostileServer {
    let credentials = mesh.ca().issue(&spiffe("default", "server")).unwrap();
    let tls = meshwire_identity::tls::server_config(
        &credentials.svid,
        &credentials.bundles,
        &meshwire_identity::tls::TrustDomains::only(mesh.ca().trust_domain().clone()),
        vec![b"h2".to_vec()],
    )
    .unwrap();
    let tls = Arc::new(tls);
    let options = Arc::new(meshwire_hbone::server::ServeOptions {
        settings: Settings::builder()
            .stream_window(((1 << 31) - 1) / 4)
            .connection_window((1 << 31) - 1)
            .build()
            .unwrap(),
        ..Default::default()
    });
    let handler = Arc::new(NeverRead::new(1024));
    let accepted = handler.accepted.clone();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
    runtime.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).unwrap();
            let (tls, options, handler, mut stop_rx) = (tls.clone(), options.clone(), handler.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let serve = meshwire_hbone::server::serve(
                    tcp,
                    tls,
                    &options,
                    &*handler,
                    &TokioTimer,
                    std::future::pending::<()>(),
                );
                let mut serve = std::pin::pin!(serve);
                tokio::select! {
                    _ = &mut serve => {}
                    _ = async { drop(stop_rx.wait_for(|stop| *stop).await) } => {
                        // Hold the connection without reading it, until the runtime goes.
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    HostileServer { accepted, stop }
}

/// The outbound side: apps that send without end through the client proxy's HBONE tunnels to a
/// server that never reads are held to the process budget too.
#[test]
fn a_server_that_never_reads_is_held_to_the_buffer_budget() {
    const TUNNELS: usize = 400;
    for binary in binary::all() {
        let what = binary.name();
        let runtime = runtime();
        let mesh = Mesh::new(&pair::config(9, ""));
        let hostile = hostile_server(&runtime, &mesh, SocketAddr::new(lo(2), mesh.hbone_port()));
        let client = mesh
            .proxy(&binary, lo(1))
            .dedicated("default/client/client")
            .env("MESHWIRE_HBONE_BUFFER_BUDGET", &PROCESS_BUDGET.to_string())
            .env("MESHWIRE_HBONE_STREAM_SEND_BUFFER", &STREAM_SEND_BUFFER.to_string())
            .spawn();
        let before = client.rss_kib().unwrap();

        let target = net::Socks5Target::Addr(SocketAddr::new(lo(2), 9000));
        let streams: Vec<std::net::TcpStream> = (0..TUNNELS)
            .map(|_| {
                net::socks5_connect(client.ports().socks5, &target)
                    .unwrap_or_else(|e| panic!("{what}: SOCKS5 CONNECT: {e:?}\n{}", client.describe()))
            })
            .collect();
        assert_eq!(hostile.accepted.load(Ordering::SeqCst), TUNNELS as u64);
        hostile.stop.send(true).unwrap();

        // Every app sends without end.
        let sent = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                let sent = sent.clone();
                stream.set_nonblocking(true).unwrap();
                runtime.spawn(async move {
                    let mut stream = tokio::net::TcpStream::from_std(stream).unwrap();
                    let chunk = vec![0xa5u8; 64 * 1024];
                    while stream.write_all(&chunk).await.is_ok() {
                        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let peak = peak_rss_until_stalled(&client, &sent, what);
        let buffered = config_dump_buffers(&client);
        eprintln!(
            "{what} (outbound): RSS before {before} KiB, peak {peak} KiB (+{} KiB for {TUNNELS} tunnels); apps sent {} MiB; dump {buffered}",
            peak.saturating_sub(before),
            sent.load(Ordering::Relaxed) / MIB,
        );
        assert_peak_within(&client, before, peak, PROCESS_BUDGET + ALLOWANCE, "the budget", what);
        for writer in writers {
            writer.abort();
        }
        drop(runtime);
    }
}

/// The server proxy's process-wide budget of HTTP/2 receive windows in the upload test.
const RECEIVE_BUDGET: u64 = 8 * MIB;
/// HBONE connections the uploader opens.
const UPLOAD_CONNECTIONS: usize = 8;
/// CONNECT streams on each.
const UPLOAD_STREAMS: usize = 20;
/// What the process may hold beyond the receive budget: per-connection TLS and HTTP/2 state
/// (including HTTP/2's own 64 KiB connection window, which every connection has), per-stream state
/// and sockets, allocator fragmentation. Without a receive budget each connection holds its 16 MiB
/// connection window (128 MiB here).
const UPLOAD_ALLOWANCE: u64 = 40 * MIB;

/// A TCP server on `ip` that accepts every connection and never reads from it (with a small receive
/// buffer, so that the kernel takes little before the sender is blocked).
struct Sink {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

impl Sink {
    fn start(runtime: &tokio::runtime::Runtime, ip: IpAddr) -> Sink {
        let listener = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.listen(1024).unwrap()
        });
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        runtime.spawn(async move {
            let mut kept = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                kept.push(tcp);
            }
        });
        Sink { addr, accepted }
    }
}

/// One HBONE connection whose streams each send without end, and the tasks that drive it.
struct Uploader {
    writers: Vec<tokio::task::JoinHandle<()>>,
    driver: tokio::task::JoinHandle<()>,
    connection: client::ClientConnection,
}

impl Uploader {
    fn start(
        runtime: &tokio::runtime::Runtime,
        mesh: &Mesh,
        proxy: &Proxy,
        upstream: SocketAddr,
        sent: &Arc<AtomicU64>,
    ) -> Uploader {
        runtime.block_on(async move {
            let (connection, driver) = raw_connection(mesh, proxy).await;
            let driver = tokio::spawn(async move {
                let _ = driver.await;
            });
            let mut writers = Vec::new();
            for _ in 0..UPLOAD_STREAMS {
                let request = ConnectRequest::new(Authority::SocketAddr(upstream));
                let mut tunnel = connection.open(&request).await.expect("CONNECT to the sink");
                let sent = sent.clone();
                writers.push(tokio::spawn(async move {
                    let chunk = vec![0xc3u8; 64 * 1024];
                    while tunnel.write_all(&chunk).await.is_ok() {
                        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                }));
            }
            Uploader {
                writers,
                driver,
                connection,
            }
        })
    }

    /// Resets every stream and closes the connection.
    fn close(self) {
        for writer in self.writers {
            writer.abort();
        }
        drop(self.connection);
        self.driver.abort();
    }
}

/// The direction peer -> upstream: mesh clients that upload without end over many HBONE connections
/// to an upstream that never reads make the server proxy hold what its receive windows let them
/// send, and those windows come from a process-wide budget.
fn upload_attack(binary: &Binary) {
    let what = binary.name();
    let runtime = runtime();
    let sink = Sink::start(&runtime, lo(2));
    let (mesh, server, before) =
        attacked_server(binary, sink.addr, &[("MESHWIRE_HBONE_RECEIVE_BUDGET", RECEIVE_BUDGET)]);

    let sent = Arc::new(AtomicU64::new(0));
    let uploaders: Vec<Uploader> = (0..UPLOAD_CONNECTIONS)
        .map(|_| Uploader::start(&runtime, &mesh, &server, sink.addr, &sent))
        .collect();
    let peak = peak_rss_until_stalled(&server, &sent, what);
    let buffered = config_dump_buffers(&server);
    assert_eq!(
        sink.accepted.load(Ordering::SeqCst),
        (UPLOAD_CONNECTIONS * UPLOAD_STREAMS) as u64,
        "{what}: every stream reached the sink"
    );

    for uploader in uploaders {
        uploader.close();
    }
    let (after, slack) = rss_after_close(&server, before);
    eprintln!(
        "{what} (uploads): RSS before {before} KiB, peak {peak} KiB (+{} KiB for {UPLOAD_CONNECTIONS} connections x \
         {UPLOAD_STREAMS} streams), after close {after} KiB; uploaders sent {} MiB; dump {buffered}",
        peak.saturating_sub(before),
        sent.load(Ordering::Relaxed) / MIB,
    );
    assert_peak_within(
        &server,
        before,
        peak,
        RECEIVE_BUDGET + UPLOAD_ALLOWANCE,
        "the receive budget",
        what,
    );
    let leased = buffered["receiveLeased"].as_u64().expect("receiveLeased in the dump");
    assert!(
        leased <= RECEIVE_BUDGET,
        "{what}: {leased} bytes of windows leased, over the {RECEIVE_BUDGET} budget"
    );
    assert_came_back(before, after, slack, what);
    // Every window goes back when its connection closes.
    wait_until_returned(&server, "receiveLeased", what);
    drop(runtime);
}

#[test]
fn uploads_to_an_upstream_that_never_reads_are_held_to_the_receive_budget() {
    for binary in binary::all() {
        upload_attack(&binary);
    }
}
