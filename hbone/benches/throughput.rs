//! Bulk throughput and CPU cost of HBONE tunnels, beside plain TCP proxying, on tokio and glommio.
//!
//! Run it with
//!
//! ```text
//! cargo bench -p meshwire-hbone --bench throughput             # 3 s per round
//! cargo bench -p meshwire-hbone --bench throughput -- 5        # 5 s per round
//! BENCH_SECONDS=1 cargo bench -p meshwire-hbone --bench throughput
//! BENCH_ONLY=hbone cargo bench -p meshwire-hbone --bench throughput  # only keys containing "hbone"
//! BENCH_NODELAY=0 cargo bench -p meshwire-hbone --bench throughput   # proxies keep Nagle on
//! ```
//!
//! `cargo bench` builds with the `bench` profile (optimised, like `release`). This is a plain
//! program (`harness = false`), not a timed test: it prints figures and never fails on them.
//! It takes about (3 + 1) x 11 rounds of the per-round duration plus a second of setup per round:
//! a little over 2 minutes by default.
//!
//! # What is measured
//!
//! Everything runs in this one process over loopback TCP (127.0.0.1): a load generator that writes
//! 128 KiB chunks as fast as it can, the proxy under test, and a sink that reads with a 256 KiB
//! buffer and counts the bytes it receives, per flow. Traffic is one way, client to sink (bulk
//! upload); nothing flows back but TCP ACKs and HTTP/2 WINDOW_UPDATEs. The proxies' sockets (the
//! plain proxy's two, the HBONE client's and the HBONE server's accepted and upstream sockets) get
//! `TCP_NODELAY`, as ztunnel's do; `BENCH_NODELAY=0` leaves Nagle on there too. The load
//! generator's and the sink's sockets keep the OS defaults, as an application's would.
//!
//! The paths (JSON keys `<runtime>_<path>_<flows>`):
//!
//! - **direct TCP** (`tokio_direct_1`): writer -> sink, no proxy. What the load generator and the
//!   sink cost on their own; subtract it from the rows below to estimate a proxy's share.
//! - **plain TCP proxy** (`*_tcp_proxy_1`, `*_tcp_proxy_8`): writer -> proxy -> sink, the proxy
//!   being the library's [`copy::bidirectional`] (default [`CopyConfig`]) between the accepted
//!   connection and a new connection to the sink. Two loopback TCP hops, no TLS, no HTTP/2: the
//!   floor for any proxy. One flow, and 8 flows in parallel.
//! - **HBONE** (`*_hbone_1`, `*_hbone_8_conns`, `*_hbone_8_streams`): the writer writes into a
//!   [`Tunnel`](meshwire_hbone::Tunnel) opened with [`client::handshake`] +
//!   [`ClientConnection::open`] (mutual TLS 1.3 with ECDSA P-256 SVIDs from an ephemeral
//!   [`LocalCa`], HTTP/2 CONNECT, default [`Settings`]) to an in-process [`server::serve`] (default
//!   [`ServeOptions`]) whose [`Handler`] connects to the sink; the server copies the stream to that
//!   TCP connection. Also two loopback TCP hops, so the difference to the plain proxy is TLS
//!   (encryption in the client, decryption in the server) plus HTTP/2 framing and flow control on
//!   both sides. (Istio's "ztunnel through itself" has one hop more: application -> outbound
//!   ztunnel.) Three shapes: (a) one tunnel on one connection, (b) 8 tunnels on 8 connections in
//!   parallel, (c) 8 tunnels (streams) sharing one connection.
//!
//! The runtimes:
//!
//! - **tokio**: one multi-thread runtime with 2 worker threads (the reference machine has 2 vCPUs)
//!   runs everything: writers, proxy or HBONE client and server, sink.
//! - **glommio** (io_uring, thread per core): two executors, `Placement::Fixed(0)` for the server
//!   side (the plain proxy or the HBONE server, with its copies to the sink) and `Fixed(1)` for the
//!   client side (the writers; the HBONE clients, their connection drivers on `spawn_local`; and
//!   the sink), `Unbound` where pinning fails. glommio sockets reach the library through
//!   `tokio_util::compat`. Each executor's CPU is reported on its own line: the server side, and
//!   the client side with the load generator and the sink.
//!
//! # Method
//!
//! Each round of a measurement starts from scratch: a fresh runtime (or pair of executors),
//! listeners, connections, handshakes and tunnels; once every flow has reached the sink the
//! traffic runs 0.25 s to ramp up, then is measured for a fixed window (default 3 s; the first
//! numeric command-line argument, or `BENCH_SECONDS`), then everything is torn down. (On a
//! work-stealing runtime where tasks land decides much of the result, so a round is a fresh
//! draw rather than a slice of one.) One short warm-up round of every measurement comes first and
//! is discarded; then 3 rounds, interleaved: round 1 of every measurement, then round 2, ...
//!
//! Per round: payload bytes the sink received (per flow), wall time (`Instant`), process CPU time
//! (user + system, fields 14 and 15 of `/proc/self/stat`, 100 Hz clock ticks, so +-10 ms per
//! reading), and each glommio executor's from `/proc/self/task/<tid>/stat`. The table shows the
//! median and [min, max] across the 3 rounds of:
//!
//! - **Gbit/s** = bytes x 8 / wall / 1e9 (payload: TLS and HTTP/2 overhead not counted);
//! - **CPU-s/GB** = CPU seconds of the whole process per 1e9 payload bytes. Writer and sink are
//!   included: compare rows with each other, and subtract the direct-TCP row for the proxies alone;
//! - **(user+sys)** = the CPU-s/GB medians split into user and kernel (system) time: the kernel
//!   part is mostly loopback TCP, the user part copies, TLS, HTTP/2 and the runtimes;
//! - **cores** = CPU seconds / wall seconds (2.00 = both cores busy all the time);
//! - **slowest** = the slowest flow's bytes / the mean flow's bytes (1.00 = fair; several flows only).
//!
//! Results are also written as JSON to `target/bench-hbone.json` (the workspace target directory,
//! or `$CARGO_TARGET_DIR`), with every round's figures. The machine is shared and noisy: compare
//! only rows of one run.

#![allow(clippy::unwrap_used, missing_docs)]

use std::error::Error;
use std::fmt::Display;
use std::future::{Future, pending};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use meshwire_hbone::Settings;
use meshwire_hbone::client::{self, ClientConnection, ConnectRequest};
use meshwire_hbone::copy::{self, CopyConfig};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions, StreamReport};
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls::{self, TrustDomains};
use meshwire_rt::TokioTimer;
use meshwire_testkit::measure::{
    Cpu, Summary, clock_ticks, current_tid, json_summary, kernel_release, process_cpu, seconds_argument, summarize,
    thread_cpu, tls_handshake, unix_time, write_results,
};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const ROUNDS: usize = 3;
const DEFAULT_SECONDS: f64 = 3.0;
/// Size of each write of the load generator.
const CHUNK: usize = 128 * 1024;
/// Size of the sink's read buffer.
const SINK_BUFFER: usize = 256 * 1024;
/// Writes or reads in a row before a task yields to its executor (glommio has no cooperative budget).
const YIELD_EVERY: u32 = 16;
/// Traffic time between a round's setup and the start of its measurement window.
const RAMP: Duration = Duration::from_millis(250);
/// Longest wait for a measurement's setup (connections, handshakes, tunnels).
const SETUP_LIMIT: Duration = Duration::from_secs(30);

/// Whether the proxies' sockets get `TCP_NODELAY`, as ztunnel's do: on unless `BENCH_NODELAY=0`.
fn nodelay() -> bool {
    static NODELAY: OnceLock<bool> = OnceLock::new();
    *NODELAY.get_or_init(|| {
        std::env::var("BENCH_NODELAY").map_or(true, |v| !matches!(v.trim(), "0" | "false" | "no" | "off"))
    })
}

const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";

// ---------------------------------------------------------------------------------------------
// Shared state of one measurement

/// Counters and errors of one measurement, shared by every task on every thread.
#[derive(Default)]
struct Ctx {
    /// Bytes received by the sink, one counter per accepted flow.
    flows: Mutex<Vec<Arc<AtomicU64>>>,
    /// Set when the measurement ends: errors after this are the teardown, not failures.
    stopping: AtomicBool,
    errors: Mutex<Vec<String>>,
    /// The sink's address, once bound (the plain proxy on glommio looks it up here).
    sink: OnceLock<SocketAddr>,
}

impl Ctx {
    fn new_flow(&self) -> Arc<AtomicU64> {
        let counter = Arc::new(AtomicU64::new(0));
        self.flows.lock().unwrap().push(counter.clone());
        counter
    }

    /// Bytes received so far, per flow.
    fn snapshot(&self) -> Vec<u64> {
        self.flows
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn error(&self, what: impl Display) {
        if !self.stopping() {
            let mut errors = self.errors.lock().unwrap();
            if errors.len() < 20 {
                errors.push(what.to_string());
            }
        }
    }
}

/// Returns `Pending` once, after waking itself: lets the executor run other tasks.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// Counts a task's writes or reads and yields to the executor after every [`YIELD_EVERY`].
#[derive(Default)]
struct Budget(u32);

impl Budget {
    async fn spend(&mut self) {
        self.0 += 1;
        if self.0 == YIELD_EVERY {
            self.0 = 0;
            YieldNow(false).await;
        }
    }
}

/// The load generator: writes 128 KiB chunks until the measurement stops or the stream fails.
async fn write_forever<W: AsyncWrite + Unpin>(mut w: W, ctx: Arc<Ctx>) {
    let chunk = vec![0x5a_u8; CHUNK];
    let mut budget = Budget::default();
    while !ctx.stopping() {
        if let Err(e) = w.write_all(&chunk).await {
            ctx.error(format!("writer: {e}"));
            return;
        }
        budget.spend().await;
    }
}

/// The sink: reads and counts until end of stream.
async fn sink<R: AsyncRead + Unpin>(mut r: R, ctx: Arc<Ctx>) {
    let counter = ctx.new_flow();
    let mut buf = vec![0u8; SINK_BUFFER];
    let mut budget = Budget::default();
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return,
            Ok(len) => {
                counter.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(e) => {
                ctx.error(format!("sink: {e}"));
                return;
            }
        }
        budget.spend().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

struct Pki {
    server_tls: Arc<ServerConfig>,
    client_tls: Arc<ClientConfig>,
    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519", from one in-memory handshake.
    negotiated: String,
}

impl Pki {
    fn new() -> Result<Self> {
        let td = TrustDomain::new("cluster.local")?;
        let ca = LocalCa::ephemeral(td.clone())?;
        let server_id = SpiffeId::new(SERVER_ID)?;
        let client_id = SpiffeId::new(CLIENT_ID)?;
        let server = ca.issue(&server_id)?;
        let client = ca.issue(&client_id)?;
        let alpn = vec![b"h2".to_vec()];
        let server_tls = Arc::new(tls::server_config(
            &server.svid,
            &server.bundles,
            &TrustDomains::only(td),
            alpn.clone(),
        )?);
        let client_tls = Arc::new(tls::client_config(
            &client.svid,
            &client.bundles,
            vec![server_id],
            alpn,
        )?);
        let negotiated = negotiated(&client_tls, &server_tls)?;
        Ok(Self {
            server_tls,
            client_tls,
            negotiated,
        })
    }
}

/// What a handshake between the two configs negotiates (driven in memory).
fn negotiated(client_tls: &Arc<ClientConfig>, server_tls: &Arc<ServerConfig>) -> Result<String> {
    let mut c = rustls::ClientConnection::new(client_tls.clone(), tls::server_name())?;
    let mut s = rustls::ServerConnection::new(server_tls.clone())?;
    tls_handshake(&mut c, &mut s)?;
    let version = c.protocol_version().map(|v| format!("{v:?}"));
    let suite = c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()));
    let kx = c.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
    Ok(format!(
        "{} {} {}",
        version.unwrap_or_else(|| "?".into()),
        suite.unwrap_or_else(|| "?".into()),
        kx.unwrap_or_else(|| "?".into())
    ))
}

fn connect_request(sink: SocketAddr) -> Result<ConnectRequest> {
    Ok(ConnectRequest::new(Authority::parse(&sink.to_string())?))
}

// ---------------------------------------------------------------------------------------------
// What is measured

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    Tokio,
    Glommio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    TcpProxy,
    Hbone,
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    key: &'static str,
    title: &'static str,
    runtime: Runtime,
    path: Path,
    /// TCP connections from the client side.
    connections: usize,
    /// Tunnels per connection (HBONE only; 1 otherwise).
    streams: usize,
}

impl Scenario {
    fn flows(&self) -> usize {
        self.connections * self.streams
    }
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        key: "tokio_direct_1",
        title: "direct TCP, no proxy, 1 flow",
        runtime: Runtime::Tokio,
        path: Path::Direct,
        connections: 1,
        streams: 1,
    },
    Scenario {
        key: "tokio_tcp_proxy_1",
        title: "plain TCP proxy, 1 flow",
        runtime: Runtime::Tokio,
        path: Path::TcpProxy,
        connections: 1,
        streams: 1,
    },
    Scenario {
        key: "tokio_tcp_proxy_8",
        title: "plain TCP proxy, 8 flows",
        runtime: Runtime::Tokio,
        path: Path::TcpProxy,
        connections: 8,
        streams: 1,
    },
    Scenario {
        key: "tokio_hbone_1",
        title: "HBONE (a) 1 tunnel, 1 conn",
        runtime: Runtime::Tokio,
        path: Path::Hbone,
        connections: 1,
        streams: 1,
    },
    Scenario {
        key: "tokio_hbone_8_conns",
        title: "HBONE (b) 8 tunnels, 8 conns",
        runtime: Runtime::Tokio,
        path: Path::Hbone,
        connections: 8,
        streams: 1,
    },
    Scenario {
        key: "tokio_hbone_8_streams",
        title: "HBONE (c) 8 tunnels, 1 conn",
        runtime: Runtime::Tokio,
        path: Path::Hbone,
        connections: 1,
        streams: 8,
    },
    Scenario {
        key: "glommio_tcp_proxy_1",
        title: "plain TCP proxy, 1 flow",
        runtime: Runtime::Glommio,
        path: Path::TcpProxy,
        connections: 1,
        streams: 1,
    },
    Scenario {
        key: "glommio_tcp_proxy_8",
        title: "plain TCP proxy, 8 flows",
        runtime: Runtime::Glommio,
        path: Path::TcpProxy,
        connections: 8,
        streams: 1,
    },
    Scenario {
        key: "glommio_hbone_1",
        title: "HBONE (a) 1 tunnel, 1 conn",
        runtime: Runtime::Glommio,
        path: Path::Hbone,
        connections: 1,
        streams: 1,
    },
    Scenario {
        key: "glommio_hbone_8_conns",
        title: "HBONE (b) 8 tunnels, 8 conns",
        runtime: Runtime::Glommio,
        path: Path::Hbone,
        connections: 8,
        streams: 1,
    },
    Scenario {
        key: "glommio_hbone_8_streams",
        title: "HBONE (c) 8 tunnels, 1 conn",
        runtime: Runtime::Glommio,
        path: Path::Hbone,
        connections: 1,
        streams: 8,
    },
];

/// A measurement whose traffic is flowing.
struct Running {
    ctx: Arc<Ctx>,
    /// Threads whose CPU is reported on their own: (label, tid).
    threads: Vec<(String, u32)>,
    stop: Box<dyn FnOnce() -> Result<()>>,
}

// ---------------------------------------------------------------------------------------------
// Both runtimes

/// What the proxies under test take from a runtime: its TCP sockets and its timer.
trait Net {
    /// A TCP connection.
    type Tcp: AsyncRead + AsyncWrite + Unpin;
    /// The timer of the HBONE client and server.
    type Timer: meshwire_rt::Timer + Default;

    /// Connects; `proxy`: the socket is one of a proxy's (the TCP_NODELAY setting applies).
    fn connect(addr: SocketAddr, proxy: bool) -> impl Future<Output = std::io::Result<Self::Tcp>>;
}

/// Connects every CONNECT to its authority on loopback, with the sockets of `N`.
struct LoopbackHandler<N> {
    ctx: Arc<Ctx>,
    net: PhantomData<N>,
}

impl<N: Net> Handler for LoopbackHandler<N> {
    type Upstream = N::Tcp;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
        let addr = request
            .authority
            .as_socket_addr()
            .ok_or_else(|| Refusal::bad_request("not an address"))?;
        N::connect(addr, true)
            .await
            .map(Connected::from)
            .map_err(|e| Refusal::unavailable(format!("connect {addr}: {e}")))
    }

    fn finished(&self, report: StreamReport) {
        if let Some(e) = report.error {
            self.ctx.error(format!("HBONE server stream: {e}"));
        } else if let Some(r) = report.refusal {
            self.ctx.error(format!("HBONE server refused: {r}"));
        }
    }
}

/// The HBONE server's work for one accepted connection.
async fn serve_hbone<N: Net>(tcp: N::Tcp, tls: Arc<ServerConfig>, ctx: Arc<Ctx>) {
    let options = ServeOptions {
        settings: bench_settings(),
        ..ServeOptions::default()
    };
    let handler = LoopbackHandler::<N> {
        ctx: ctx.clone(),
        net: PhantomData,
    };
    if let Err(e) = server::serve(tcp, tls, &options, &handler, &N::Timer::default(), pending::<()>()).await {
        ctx.error(format!("HBONE serve: {e}"));
    }
}

/// The plain proxy's work for one accepted connection: connects to the sink, copies both ways.
async fn splice<N: Net>(mut down: N::Tcp, sink_addr: SocketAddr, ctx: Arc<Ctx>) {
    match N::connect(sink_addr, true).await {
        Ok(mut up) => {
            let outcome = copy::bidirectional(&mut down, &mut up, CopyConfig::default()).await;
            if let Some(e) = outcome.error {
                ctx.error(format!("proxy copy: {e}"));
            }
        }
        Err(e) => ctx.error(format!("proxy connect: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// tokio

/// tokio's sockets and timer.
struct TokioNet;

impl Net for TokioNet {
    type Tcp = tokio::net::TcpStream;
    type Timer = TokioTimer;

    fn connect(addr: SocketAddr, proxy: bool) -> impl Future<Output = std::io::Result<Self::Tcp>> {
        tokio_connect(addr, proxy)
    }
}

/// Connects; `proxy`: the socket is one of a proxy's (the TCP_NODELAY setting applies).
async fn tokio_connect(addr: SocketAddr, proxy: bool) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(proxy && nodelay())?;
    Ok(tcp)
}

/// An accepted proxy socket, with the TCP_NODELAY setting applied.
fn tokio_accepted(tcp: tokio::net::TcpStream) -> tokio::net::TcpStream {
    // Only fails on a socket that is already gone: the copy will report that.
    let _ = tcp.set_nodelay(nodelay());
    tcp
}

async fn tokio_listener() -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

async fn tokio_sink(ctx: &Arc<Ctx>) -> Result<SocketAddr> {
    let (listener, addr) = tokio_listener().await?;
    let ctx = ctx.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(sink(tcp, ctx.clone()));
        }
    });
    Ok(addr)
}

async fn tokio_tcp_proxy(sink_addr: SocketAddr, ctx: &Arc<Ctx>) -> Result<SocketAddr> {
    let (listener, addr) = tokio_listener().await?;
    let ctx = ctx.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            tokio::spawn(splice::<TokioNet>(tokio_accepted(down), sink_addr, ctx.clone()));
        }
    });
    Ok(addr)
}

async fn tokio_hbone_server(tls: Arc<ServerConfig>, ctx: &Arc<Ctx>) -> Result<SocketAddr> {
    let (listener, addr) = tokio_listener().await?;
    let ctx = ctx.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_hbone::<TokioNet>(tokio_accepted(tcp), tls.clone(), ctx.clone()));
        }
    });
    Ok(addr)
}

async fn tokio_hbone_client(
    server: SocketAddr,
    tls: Arc<ClientConfig>,
    ctx: &Arc<Ctx>,
) -> Result<ClientConnection, BoxError> {
    let tcp = tokio_connect(server, true).await?;
    let (conn, driver) = client::handshake(tcp, tls, &bench_settings(), TokioTimer).await?;
    let ctx = ctx.clone();
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            ctx.error(format!("HBONE client connection: {e}"));
        }
    });
    Ok(conn)
}

fn tokio_start(scenario: &Scenario, pki: &Pki) -> Result<Running> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-tokio")
        .enable_all()
        .build()?;
    let ctx = Arc::new(Ctx::default());
    let (server_tls, client_tls) = (pki.server_tls.clone(), pki.client_tls.clone());
    let s = *scenario;
    let setup = rt.block_on({
        let ctx = ctx.clone();
        async move {
            let sink_addr = tokio_sink(&ctx).await?;
            match s.path {
                Path::Direct | Path::TcpProxy => {
                    let target = if s.path == Path::Direct {
                        sink_addr
                    } else {
                        tokio_tcp_proxy(sink_addr, &ctx).await?
                    };
                    for _ in 0..s.connections {
                        let tcp = tokio_connect(target, false).await?;
                        tokio::spawn(write_forever(tcp, ctx.clone()));
                    }
                }
                Path::Hbone => {
                    let server = tokio_hbone_server(server_tls, &ctx).await?;
                    let request = connect_request(sink_addr)?;
                    for _ in 0..s.connections {
                        let conn = tokio_hbone_client(server, client_tls.clone(), &ctx).await?;
                        for _ in 0..s.streams {
                            let tunnel = conn.open(&request).await?;
                            tokio::spawn(write_forever(tunnel, ctx.clone()));
                        }
                    }
                }
            }
            Ok::<_, BoxError>(())
        }
    });
    let stop = {
        let ctx = ctx.clone();
        move || {
            ctx.stopping.store(true, Ordering::Relaxed);
            rt.shutdown_timeout(Duration::from_secs(5));
            Ok(())
        }
    };
    if let Err(e) = setup {
        stop().ok();
        return Err(e);
    }
    Ok(Running {
        ctx,
        threads: Vec::new(),
        stop: Box::new(stop),
    })
}

// ---------------------------------------------------------------------------------------------
// glommio

use meshwire_rt::GlommioTimer;

type GlommioTcp = Compat<glommio::net::TcpStream>;

/// Connects; `proxy`: the socket is one of a proxy's (the TCP_NODELAY setting applies).
async fn glommio_connect(addr: SocketAddr, proxy: bool) -> std::io::Result<GlommioTcp> {
    let tcp = glommio::net::TcpStream::connect(addr)
        .await
        .map_err(std::io::Error::from)?;
    tcp.set_nodelay(proxy && nodelay()).map_err(std::io::Error::from)?;
    Ok(tcp.compat())
}

/// An accepted proxy socket, with the TCP_NODELAY setting applied.
fn glommio_accepted(tcp: glommio::net::TcpStream) -> GlommioTcp {
    // Only fails on a socket that is already gone: the copy will report that.
    let _ = tcp.set_nodelay(nodelay());
    tcp.compat()
}

/// glommio's sockets (through `tokio_util::compat`) and timer.
struct GlommioNet;

impl Net for GlommioNet {
    type Tcp = GlommioTcp;
    type Timer = GlommioTimer;

    fn connect(addr: SocketAddr, proxy: bool) -> impl Future<Output = std::io::Result<Self::Tcp>> {
        glommio_connect(addr, proxy)
    }
}

/// Runs until the measurement stops (the executor then drops its remaining tasks).
async fn glommio_wait_stop(ctx: &Ctx) {
    while !ctx.stopping() {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

fn glommio_bind() -> Result<(glommio::net::TcpListener, SocketAddr), String> {
    let listener = glommio::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    Ok((listener, addr))
}

/// The server executor: the plain proxy or the HBONE server.
async fn glommio_server(
    path: Path,
    tls: Arc<ServerConfig>,
    ctx: Arc<Ctx>,
    ready: mpsc::Sender<Result<SocketAddr, String>>,
) {
    let (listener, addr) = match glommio_bind() {
        Ok(bound) => bound,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(addr));
    let c = ctx.clone();
    glommio::spawn_local(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok(tcp) => glommio_accepted(tcp),
                Err(e) => {
                    c.error(format!("accept: {e}"));
                    return;
                }
            };
            let (ctx, tls) = (c.clone(), tls.clone());
            glommio::spawn_local(async move {
                if path == Path::Hbone {
                    serve_hbone::<GlommioNet>(tcp, tls, ctx).await;
                    return;
                }
                let Some(&sink_addr) = ctx.sink.get() else {
                    ctx.error("proxy: no sink address");
                    return;
                };
                splice::<GlommioNet>(tcp, sink_addr, ctx).await;
            })
            .detach();
        }
    })
    .detach();
    glommio_wait_stop(&ctx).await;
}

/// The client executor: the sink, then the flows (writers, HBONE clients and their drivers).
async fn glommio_client(
    scenario: Scenario,
    server: SocketAddr,
    tls: Arc<ClientConfig>,
    ctx: Arc<Ctx>,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let setup = async {
        let (listener, sink_addr) = glommio_bind()?;
        ctx.sink.set(sink_addr).map_err(|_| "sink bound twice")?;
        let c = ctx.clone();
        glommio::spawn_local(async move {
            while let Ok(tcp) = listener.accept().await {
                glommio::spawn_local(sink(tcp.compat(), c.clone())).detach();
            }
        })
        .detach();
        match scenario.path {
            Path::Direct | Path::TcpProxy => {
                let target = if scenario.path == Path::Direct {
                    sink_addr
                } else {
                    server
                };
                for _ in 0..scenario.connections {
                    let tcp = glommio_connect(target, false).await?;
                    glommio::spawn_local(write_forever(tcp, ctx.clone())).detach();
                }
            }
            Path::Hbone => {
                let request = connect_request(sink_addr)?;
                for _ in 0..scenario.connections {
                    let tcp = glommio_connect(server, true).await?;
                    let (conn, driver) = client::handshake(tcp, tls.clone(), &bench_settings(), GlommioTimer).await?;
                    let c = ctx.clone();
                    glommio::spawn_local(async move {
                        if let Err(e) = driver.await {
                            c.error(format!("HBONE client connection: {e}"));
                        }
                    })
                    .detach();
                    for _ in 0..scenario.streams {
                        let tunnel = conn.open(&request).await?;
                        glommio::spawn_local(write_forever(tunnel, ctx.clone())).detach();
                    }
                }
            }
        }
        Ok::<(), BoxError>(())
    }
    .await;
    let _ = ready.send(setup.map_err(|e| e.to_string()));
    glommio_wait_stop(&ctx).await;
}

/// Starts an executor on `cpu`, or unbound if that fails; returns its handle, tid and placement.
fn start_executor<G, F>(name: &str, cpu: usize, body: G) -> Result<(glommio::ExecutorJoinHandle<()>, u32, String)>
where
    G: FnOnce() -> F + Send + Clone + 'static,
    F: Future<Output = ()> + 'static,
{
    let mut failures = Vec::new();
    for (placement, label) in [
        (Placement::Fixed(cpu), format!("Fixed({cpu})")),
        (Placement::Unbound, "Unbound".to_owned()),
    ] {
        let (tx, rx) = mpsc::channel();
        let body = body.clone();
        let spawned = LocalExecutorBuilder::new(placement)
            .name(name)
            .spawn(move || async move {
                let _ = tx.send(current_tid().unwrap_or(0));
                body().await
            });
        match spawned {
            Err(e) => failures.push(format!("{label}: {e}")),
            Ok(handle) => match rx.recv() {
                Ok(tid) => return Ok((handle, tid, label)),
                Err(_) => failures.push(format!("{label}: {:?}", handle.join().err())),
            },
        }
    }
    Err(format!("cannot start a glommio executor: {}", failures.join("; ")).into())
}

fn glommio_start(scenario: &Scenario, pki: &Pki) -> Result<Running> {
    let ctx = Arc::new(Ctx::default());
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    let setup = (|| -> Result<()> {
        let (tx, rx) = mpsc::channel();
        let body = {
            let (ctx, tls, path) = (ctx.clone(), pki.server_tls.clone(), scenario.path);
            move || glommio_server(path, tls, ctx, tx)
        };
        let (handle, tid, placement) = start_executor("bench-server", 0, body)?;
        handles.push(handle);
        threads.push((format!("server executor, {placement}"), tid));
        let server = rx.recv_timeout(SETUP_LIMIT)??;

        let (tx, rx) = mpsc::channel();
        let body = {
            let (ctx, tls, s) = (ctx.clone(), pki.client_tls.clone(), *scenario);
            move || glommio_client(s, server, tls, ctx, tx)
        };
        let (handle, tid, placement) = start_executor("bench-client", 1, body)?;
        handles.push(handle);
        threads.push((format!("client executor + sink, {placement}"), tid));
        rx.recv_timeout(SETUP_LIMIT)??;
        Ok(())
    })();
    let stop = {
        let ctx = ctx.clone();
        move || -> Result<()> {
            ctx.stopping.store(true, Ordering::Relaxed);
            let mut failures = Vec::new();
            for handle in handles {
                if let Err(e) = handle.join() {
                    failures.push(format!("{e:?}"));
                }
            }
            if failures.is_empty() {
                Ok(())
            } else {
                Err(format!("glommio executors failed: {}", failures.join("; ")).into())
            }
        }
    };
    if let Err(e) = setup {
        stop().ok();
        return Err(e);
    }
    Ok(Running {
        ctx,
        threads,
        stop: Box::new(stop),
    })
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// One measurement window.
#[derive(Debug, Clone)]
struct Round {
    /// Bytes received per flow.
    flow_bytes: Vec<u64>,
    wall: f64,
    cpu: Option<Cpu>,
    /// CPU time of each reported thread.
    thread_cpu: Vec<Option<Cpu>>,
}

impl Round {
    fn bytes(&self) -> u64 {
        self.flow_bytes.iter().sum()
    }
    fn gbit_per_sec(&self) -> f64 {
        self.bytes() as f64 * 8.0 / self.wall / 1e9
    }
    fn gb(&self) -> f64 {
        self.bytes() as f64 / 1e9
    }
    /// CPU seconds per GB of `cpu`, a part of this round's CPU time.
    fn per_gb(&self, cpu: Option<f64>) -> Option<f64> {
        cpu.filter(|_| self.bytes() > 0).map(|c| c / self.gb())
    }
    /// The slowest flow's bytes over the mean flow's, with several flows.
    fn slowest_share(&self) -> Option<f64> {
        if self.flow_bytes.len() < 2 || self.bytes() == 0 {
            return None;
        }
        let mean = self.bytes() as f64 / self.flow_bytes.len() as f64;
        self.flow_bytes.iter().min().map(|&m| m as f64 / mean)
    }
}

struct Sample {
    at: Instant,
    flows: Vec<u64>,
    cpu: Option<Cpu>,
    threads: Vec<Option<Cpu>>,
}

fn sample(running: &Running) -> Sample {
    Sample {
        at: Instant::now(),
        flows: running.ctx.snapshot(),
        cpu: process_cpu(),
        threads: running.threads.iter().map(|&(_, tid)| thread_cpu(tid)).collect(),
    }
}

fn round_between(a: &Sample, b: &Sample) -> Round {
    let flow_bytes = b
        .flows
        .iter()
        .enumerate()
        .map(|(i, &n)| n - a.flows.get(i).copied().unwrap_or(0))
        .collect();
    Round {
        flow_bytes,
        wall: (b.at - a.at).as_secs_f64(),
        cpu: a.cpu.zip(b.cpu).map(|(x, y)| y.since(x)),
        thread_cpu: a
            .threads
            .iter()
            .zip(&b.threads)
            .map(|(x, y)| x.zip(*y).map(|(x, y)| y.since(x)))
            .collect(),
    }
}

/// The result of one scenario.
struct Measured {
    scenario: Scenario,
    rounds: Vec<Round>,
    threads: Vec<String>,
    errors: Vec<String>,
    /// Why the scenario could not run (or stopped running).
    failed: Option<String>,
}

/// One round: sets the scenario up from scratch (fresh runtime or executors, connections,
/// handshakes, tunnels), lets the traffic ramp up for `ramp`, measures for `window`, tears down.
fn run_round(
    scenario: &Scenario,
    pki: &Pki,
    ramp: Duration,
    window: Duration,
    measured: &mut Measured,
) -> Result<Round> {
    let running = match scenario.runtime {
        Runtime::Tokio => tokio_start(scenario, pki)?,
        Runtime::Glommio => glommio_start(scenario, pki)?,
    };
    measured.threads = running.threads.iter().map(|(label, _)| label.clone()).collect();
    // Every flow must have reached the sink before the clock starts.
    let deadline = Instant::now() + SETUP_LIMIT;
    while running.ctx.snapshot().len() < scenario.flows() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(ramp);
    let before = sample(&running);
    std::thread::sleep(window);
    let after = sample(&running);
    let round = round_between(&before, &after);
    for e in running.ctx.errors.lock().unwrap().iter() {
        if !measured.errors.contains(e) && measured.errors.len() < 20 {
            measured.errors.push(e.clone());
        }
    }
    let ctx = running.ctx.clone();
    (running.stop)()?;
    let flows = ctx.snapshot().len();
    if flows != scenario.flows() {
        return Err(format!("{flows} flows reached the sink, {} expected", scenario.flows()).into());
    }
    Ok(round)
}

/// A warm-up round of every scenario, then `ROUNDS` rounds, interleaved: round 1 of every
/// scenario, then round 2 of every scenario, ... so that the machine's drift spreads over all.
fn run_all(scenarios: &[Scenario], pki: &Pki, ramp: Duration, warmup: Duration, duration: Duration) -> Vec<Measured> {
    let mut results: Vec<Measured> = scenarios
        .iter()
        .map(|s| Measured {
            scenario: *s,
            rounds: Vec::new(),
            threads: Vec::new(),
            errors: Vec::new(),
            failed: None,
        })
        .collect();
    for round in 0..=ROUNDS {
        if round == 0 {
            eprint!("warm-up:");
        } else {
            eprint!("round {round}/{ROUNDS}:");
        }
        for m in results.iter_mut().filter(|m| m.failed.is_none()) {
            let scenario = m.scenario;
            eprint!(" {}", scenario.key);
            let window = if round == 0 { warmup } else { duration };
            match run_round(&scenario, pki, ramp, window, m) {
                Ok(r) if round > 0 => m.rounds.push(r),
                Ok(_) => {}
                Err(e) => {
                    eprint!(" (failed: {e})");
                    m.failed = Some(e.to_string());
                }
            }
        }
        eprintln!();
    }
    results
}

// ---------------------------------------------------------------------------------------------
// Reporting

/// A statistic across rounds: its value in each round, and their summary.
struct Stat {
    per_round: Vec<Option<f64>>,
    summary: Option<Summary>,
}

impl Stat {
    fn of(rounds: &[Round], f: impl Fn(&Round) -> Option<f64>) -> Stat {
        let per_round: Vec<Option<f64>> = rounds.iter().map(f).collect();
        let summary = summarize(per_round.iter().copied());
        Stat { per_round, summary }
    }

    fn json(&self, unit: &str) -> serde_json::Value {
        json_summary(unit, self.summary, &self.per_round)
    }
}

/// The CPU cost of a measurement, the whole process's or one thread's: CPU seconds per GB (and
/// their user and system parts), and cores.
struct CpuStats {
    per_gb: Stat,
    user: Stat,
    sys: Stat,
    cores: Stat,
}

impl CpuStats {
    /// The statistics of the CPU time `cpu` takes from each round.
    fn of(rounds: &[Round], cpu: impl Fn(&Round) -> Option<Cpu>) -> CpuStats {
        CpuStats {
            per_gb: Stat::of(rounds, |r| r.per_gb(cpu(r).map(Cpu::total))),
            user: Stat::of(rounds, |r| r.per_gb(cpu(r).map(|c| c.user))),
            sys: Stat::of(rounds, |r| r.per_gb(cpu(r).map(|c| c.sys))),
            cores: Stat::of(rounds, |r| cpu(r).map(|c| c.total() / r.wall)),
        }
    }

    /// The CPU-s/GB, (user+sys) and cores columns of the table.
    fn cells(&self) -> String {
        format!(
            "{:<24} {:>11} {:>5}",
            cell(self.per_gb.summary, 3),
            split(self.user.summary, self.sys.summary),
            short(self.cores.summary, 2)
        )
    }

    fn json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut json = serde_json::Map::new();
        json.insert("cpu_s_per_gb".to_owned(), self.per_gb.json("CPU-s/GB"));
        json.insert("user_cpu_s_per_gb".to_owned(), self.user.json("CPU-s/GB"));
        json.insert("sys_cpu_s_per_gb".to_owned(), self.sys.json("CPU-s/GB"));
        json.insert("cores".to_owned(), self.cores.json("CPU-s/s"));
        json
    }
}

fn cell(s: Option<Summary>, decimals: usize) -> String {
    match s {
        Some(s) => format!("{:.d$} [{:.d$}, {:.d$}]", s.median, s.min, s.max, d = decimals),
        None => "n/a".to_owned(),
    }
}

/// "user+sys" medians.
fn split(user: Option<Summary>, sys: Option<Summary>) -> String {
    match (user, sys) {
        (Some(u), Some(s)) => format!("{:.2}+{:.2}", u.median, s.median),
        _ => "-".to_owned(),
    }
}

fn short(s: Option<Summary>, decimals: usize) -> String {
    s.map_or_else(|| "-".to_owned(), |s| format!("{:.d$}", s.median, d = decimals))
}

fn main() -> Result<()> {
    let secs = seconds_argument(DEFAULT_SECONDS)?;
    let duration = Duration::from_secs_f64(secs);
    let warmup = Duration::from_secs_f64((secs / 4.0).clamp(0.25, 1.0));
    let ramp = RAMP;
    let pki = Pki::new()?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = kernel_release();

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let scenarios: Vec<Scenario> = SCENARIOS
        .iter()
        .filter(|s| s.key.contains(only.as_str()))
        .copied()
        .collect();
    let results = run_all(&scenarios, &pki, ramp, warmup, duration);
    eprintln!();

    println!("meshwire-hbone bulk throughput, one process over loopback (client -> proxy -> sink)");
    println!(
        "  {ROUNDS} interleaved rounds of {secs} s per measurement, each a fresh setup + {:.2} s ramp-up; \
         one {:.2} s warm-up round first",
        ramp.as_secs_f64(),
        warmup.as_secs_f64()
    );
    println!(
        "  {cpus} CPUs, Linux {kernel}; CPU from /proc/self/stat ({} Hz ticks), whole process \
         (writers and sink included)",
        clock_ticks()
    );
    println!(
        "  writes of {} KiB, sink reads of {} KiB, TCP_NODELAY on proxy sockets: {}; HBONE: {}, \
         default Settings; tokio: 2 workers",
        CHUNK / 1024,
        SINK_BUFFER / 1024,
        if nodelay() { "on" } else { "off" },
        pki.negotiated
    );
    println!("  median [min, max] across rounds");
    println!();
    let header = format!(
        "{:<8} {:<30} {:>5}  {:<24} {:<24} {:>11} {:>5} {:>7}",
        "runtime", "path", "flows", "Gbit/s", "CPU-s/GB", "(user+sys)", "cores", "slowest"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let mut json_results = serde_json::Map::new();
    for m in &results {
        let s = &m.scenario;
        let runtime = format!("{:?}", s.runtime).to_lowercase();
        if let Some(why) = &m.failed {
            println!("{runtime:<8} {:<30} {:>5}  failed: {why}", s.title, s.flows());
            json_results.insert(
                s.key.to_owned(),
                serde_json::json!({ "description": s.title, "failed": why }),
            );
            continue;
        }
        let gbit = Stat::of(&m.rounds, |r| Some(r.gbit_per_sec()));
        let cpu = CpuStats::of(&m.rounds, |r| r.cpu);
        let slowest = Stat::of(&m.rounds, Round::slowest_share);
        println!(
            "{runtime:<8} {:<30} {:>5}  {:<24} {} {:>7}",
            s.title,
            s.flows(),
            cell(gbit.summary, 2),
            cpu.cells(),
            short(slowest.summary, 2)
        );
        let mut threads_json = Vec::new();
        for (i, label) in m.threads.iter().enumerate() {
            let thread = CpuStats::of(&m.rounds, |r| r.thread_cpu.get(i).copied().flatten());
            println!("{:<8}   {:<34}  {:<24} {}", "", label, "", thread.cells());
            let mut json = thread.json();
            json.insert("thread".to_owned(), label.as_str().into());
            threads_json.push(json);
        }
        for e in &m.errors {
            println!("{:<8}   error: {e}", "");
        }
        let serde_json::Value::Object(mut entry) = serde_json::json!({
            "description": s.title,
            "runtime": runtime,
            "path": format!("{:?}", s.path),
            "connections": s.connections,
            "streams_per_connection": s.streams,
            "flows": s.flows(),
            "bytes_per_round": m.rounds.iter().map(Round::bytes).collect::<Vec<_>>(),
            "flow_bytes_per_round": m.rounds.iter().map(|r| r.flow_bytes.clone()).collect::<Vec<_>>(),
            "wall_seconds_per_round": m.rounds.iter().map(|r| r.wall).collect::<Vec<_>>(),
            "cpu_seconds_per_round": m.rounds.iter().map(|r| r.cpu.map(Cpu::total)).collect::<Vec<_>>(),
            "user_cpu_seconds_per_round": m.rounds.iter().map(|r| r.cpu.map(|c| c.user)).collect::<Vec<_>>(),
            "sys_cpu_seconds_per_round": m.rounds.iter().map(|r| r.cpu.map(|c| c.sys)).collect::<Vec<_>>(),
            "gbit_per_sec": gbit.json("Gbit/s"),
            "slowest_flow_over_mean": slowest.json("ratio"),
            "threads": threads_json,
            "errors": m.errors,
        }) else {
            unreachable!("a JSON object")
        };
        entry.extend(cpu.json());
        json_results.insert(s.key.to_owned(), entry.into());
    }

    let json = serde_json::json!({
        "benchmark": "meshwire-hbone/throughput",
        "unix_time": unix_time(),
        "seconds_per_round": secs,
        "warmup_seconds": warmup.as_secs_f64(),
        "ramp_seconds": ramp.as_secs_f64(),
        "rounds": ROUNDS,
        "cpus": cpus,
        "kernel": kernel,
        "cpu_clock_ticks_per_sec": clock_ticks(),
        "write_bytes": CHUNK,
        "sink_read_bytes": SINK_BUFFER,
        "tls": pki.negotiated,
        "tokio_worker_threads": 2,
        "proxy_sockets_tcp_nodelay": nodelay(),
        "results": json_results,
    });
    write_results("bench-hbone.json", &json)?;
    Ok(())
}

/// The HBONE settings of both ends: the defaults, with `BENCH_READ_AHEAD=<bytes>` overriding the
/// read-ahead under TLS (0 turns it off) for A/B runs.
fn bench_settings() -> Settings {
    let mut s = Settings::builder();
    if let Some(v) = std::env::var("BENCH_READ_AHEAD").ok().and_then(|v| v.parse().ok()) {
        s = s.read_ahead(v);
    }
    s.build().expect("a read-ahead is always valid")
}
