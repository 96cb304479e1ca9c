//! The per-connection proxy logic of meshwire-dataplane ([`Outbound`] and [`InboundHandler`]) on a
//! runtime of the caller's choosing, written once over [`Runtime`]: the tokio build runs it on a
//! runtime whose streams and futures are not `Send`, the io_uring build on glommio.
//!
//! A [`Host`] supplies the runtime and what the scenario needs around it: listeners, client
//! connections, tasks on the current thread, and the HBONE pool's executor and connector.
//! [`proxy_logic_scenario`] wraps the runtime in a counting one, so that every connect, pool connect
//! and reset of the proxy logic is seen to go through the runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwire_dataplane::proxy::inbound::InboundHandler;
use meshwire_dataplane::proxy::outbound::{
    CertManagerTls, HbonePool, Outbound, OutboundError, OutboundSummary, RouteKind, SourceWorkload,
};
use meshwire_dataplane::rt::Runtime;
use meshwire_dataplane::rt::connector::ClientTlsSource;
use meshwire_dataplane::rt::socket::SocketOptions;
use meshwire_dataplane::state::LocalProxy;
use meshwire_dataplane::telemetry::metrics::Metrics;
use meshwire_dataplane::watch::{ConnectionRegistry, Published, Snapshot};
use meshwire_dataplane::xds::LocalConfig;
use meshwire_hbone::ConnectError;
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::{Connector, Pool, PoolConfig, PoolKey};
use meshwire_hbone::rt::{Timer, timeout};
use meshwire_hbone::server::{self, ServeOptions};
use meshwire_identity::manager::{CertManager, ManagerConfig};
use meshwire_testkit::data::pattern;
use meshwire_testkit::pki::{CLIENT, Pki, id};
use meshwire_testkit::socks5::{self, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::net::{EchoServer, lo};

/// How long any single wait of the scenario may take before it fails instead of hanging.
pub const LIMIT: Duration = Duration::from_secs(20);

/// The stream type of a host's runtime.
pub type HostStream<H> = <<H as Host>::Runtime as Runtime>::Stream;

/// A runtime and what a test needs around it to drive the proxy logic on it.
pub trait Host {
    /// The runtime the proxy logic runs over.
    type Runtime: Runtime + Clone;
    /// A TCP listener of the runtime.
    type Listener: 'static;

    /// A new runtime value.
    fn runtime(&self) -> Self::Runtime;

    /// A listener on an ephemeral port of `ip`, and its address.
    fn listen(&self, ip: IpAddr) -> (Self::Listener, SocketAddr);

    /// The next connection of `listener`, as a stream of the runtime.
    fn accept(listener: &Self::Listener) -> impl Future<Output = io::Result<HostStream<Self>>>;

    /// A client's connection to `addr`, made without the runtime's
    /// [`connect`](Runtime::connect) (the scenario counts those of the proxy logic).
    fn dial(addr: SocketAddr) -> impl Future<Output = io::Result<HostStream<Self>>>;

    /// Runs `future` as a task on the current thread.
    fn spawn(future: impl Future<Output = ()> + 'static);

    /// The executor of the HBONE pool's connection drivers.
    fn executor(&self) -> <Self::Runtime as Runtime>::Executor;

    /// The HBONE pool's connector, with client TLS configs from `tls`.
    fn connector<S: ClientTlsSource>(&self, tls: S) -> <Self::Runtime as Runtime>::Connector<S>;
}

thread_local! {
    /// How often [`Counted::reset_on_close`] ran on this thread.
    static RESETS: Cell<usize> = const { Cell::new(0) };
}

/// The runtime `R`, counting the connects made through it (its own and its pool connector's).
#[derive(Debug, Clone)]
struct Counted<R> {
    inner: R,
    connects: Rc<Cell<usize>>,
    pool_connects: Rc<Cell<usize>>,
}

/// A pool connector counting its connections.
struct CountedConnector<C> {
    inner: C,
    connects: Rc<Cell<usize>>,
}

impl<C: Connector> Connector for CountedConnector<C> {
    type Io = C::Io;

    async fn connect(&self, key: &PoolKey) -> Result<(C::Io, Arc<rustls::ClientConfig>), ConnectError> {
        let connected = self.inner.connect(key).await?;
        self.connects.set(self.connects.get() + 1);
        Ok(connected)
    }
}

impl<R: Runtime> Runtime for Counted<R> {
    type Stream = R::Stream;
    type Timer = R::Timer;
    type Executor = R::Executor;
    type Connector<S: ClientTlsSource> = CountedConnector<R::Connector<S>>;

    fn timer(&self) -> R::Timer {
        self.inner.timer()
    }

    async fn connect(&self, dst: SocketAddr, opts: &SocketOptions, timeout: Duration) -> io::Result<R::Stream> {
        let stream = self.inner.connect(dst, opts, timeout).await?;
        self.connects.set(self.connects.get() + 1);
        Ok(stream)
    }

    fn local_addr(stream: &R::Stream) -> io::Result<SocketAddr> {
        R::local_addr(stream)
    }

    fn peer_addr(stream: &R::Stream) -> io::Result<SocketAddr> {
        R::peer_addr(stream)
    }

    fn original_destination(stream: &R::Stream) -> io::Result<SocketAddr> {
        R::original_destination(stream)
    }

    fn reset_on_close(stream: &R::Stream) -> io::Result<()> {
        RESETS.with(|resets| resets.set(resets.get() + 1));
        R::reset_on_close(stream)
    }
}

/// Accepts on `listener` forever, running `serve` with each stream and its peer on a task of its own.
fn serve_all<H, F, Fut>(listener: H::Listener, serve: F)
where
    H: Host,
    F: Fn(HostStream<H>, SocketAddr) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    H::spawn(async move {
        while let Ok(stream) = H::accept(&listener).await {
            let peer = H::Runtime::peer_addr(&stream).expect("the peer address of an accepted stream");
            H::spawn(serve(stream, peer));
        }
    });
}

/// `fut`'s output, or a panic naming `what` if it takes longer than [`LIMIT`] on `timer`.
pub async fn within<T: Timer, F: Future>(timer: &T, what: &str, fut: F) -> F::Output {
    timeout(timer, LIMIT, fut)
        .await
        .unwrap_or_else(|| panic!("{what}: not done within {LIMIT:?}"))
}

/// Sends `len` bytes of test data through `stream` to an echo server and half-closes, while reading
/// everything that comes back; checks that the echo is the data, intact.
pub async fn echoes<T: Timer, S: AsyncRead + AsyncWrite + Unpin>(timer: &T, mut stream: S, len: usize) {
    let payload = pattern(len, 7);
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let send = async {
        w.write_all(&payload).await.expect("sending to the echo server");
        w.shutdown().await.expect("half-closing towards the echo server");
    };
    let recv = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.expect("reading the echo");
        back
    };
    let ((), back) = within(timer, "the echo", async { tokio::join!(send, recv) }).await;
    assert_eq!(back.len(), len, "bytes echoed");
    assert!(back == payload, "the echo is intact");
}

/// The next summary of the outbound listeners.
async fn next<T: Timer>(timer: &T, summaries: &mut mpsc::UnboundedReceiver<OutboundSummary>) -> OutboundSummary {
    within(timer, "a summary", summaries.recv())
        .await
        .expect("the listeners still run")
}

/// The mesh of the scenario: the client workload (127.0.0.3) and the server workload (127.0.0.1)
/// in the mesh, the workload `plain` (127.0.0.2) outside it.
const WORKLOADS: &str = r#"
workloads:
- name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.0.3"]
  protocol: HBONE
- name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
- name: plain
  namespace: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
"#;

/// The proxy logic on `host`'s runtime, all of it on the current thread, with real sockets, a real
/// HBONE pool and server, and real mutual TLS from a local CA:
/// - SOCKS5 over HBONE: the pool connects through the runtime's connector and runs its driver on
///   the runtime's executor; the inbound handler connects the echo server through the runtime, and
///   drops that upstream at the end of the stream;
/// - SOCKS5 passthrough to a workload outside the mesh, connected through the runtime;
/// - a client that never finishes its SOCKS5 handshake, dropped at the deadline on the runtime's
///   timer;
/// - a connection to the capture listener that was not redirected: reset through the runtime.
pub async fn proxy_logic_scenario<H: Host>(host: H) {
    let runtime = Counted {
        inner: host.runtime(),
        connects: Rc::default(),
        pool_connects: Rc::default(),
    };
    let timer = runtime.timer();
    let Pki { ca, server_tls, .. } = Pki::new();
    let manager = CertManager::new(ca, timer.clone(), ManagerConfig::default());
    let driver = manager.clone();
    H::spawn(async move { driver.run().await });
    let echo = EchoServer::start(lo(1)).addr();
    let plain_echo = EchoServer::start(lo(2)).addr();
    let published = Published::new(Snapshot::new(
        LocalConfig::parse(WORKLOADS).expect("the scenario's configuration"),
        1,
        None,
        SystemTime::now(),
    ));
    let metrics = Arc::new(Metrics::new());

    // The inbound side: an HBONE server whose handler connects upstreams through the runtime.
    let (hbone_listener, hbone) = host.listen(lo(1));
    let registry = ConnectionRegistry::new();
    let (rt, p, m, r, t) = (
        runtime.clone(),
        published.clone(),
        metrics.clone(),
        registry.clone(),
        timer.clone(),
    );
    serve_all::<H, _, _>(hbone_listener, move |stream, peer| {
        let arrived_on = H::Runtime::local_addr(&stream).expect("the local address of an accepted stream");
        let handler = InboundHandler::with_runtime(
            rt.clone(),
            p.clone(),
            LocalProxy::new().with_addresses([hbone.ip()]),
            arrived_on,
            m.clone(),
            r.clone(),
        )
        .with_peer_addr(peer);
        let (tls, timer) = (server_tls.clone(), t.clone());
        async move {
            let options = ServeOptions::default();
            let _ = server::serve(stream, tls, &options, &handler, &timer, std::future::pending::<()>()).await;
        }
    });

    // The outbound side: SOCKS5 and capture listeners over one pool of the runtime.
    let (socks_listener, socks) = host.listen(lo(1));
    let (capture_listener, capture) = host.listen(lo(1));
    let connector = CountedConnector {
        inner: host.connector(CertManagerTls::new(manager)),
        connects: runtime.pool_connects.clone(),
    };
    let pool: HbonePool<_, Counted<H::Runtime>> =
        Pool::new(connector, host.executor(), timer.clone(), PoolConfig::default());
    let proxy = LocalProxy::new()
        .with_addresses([socks.ip()])
        .with_ports([socks.port(), capture.port()])
        .with_hbone_port(hbone.port());
    let source = SourceWorkload::Dedicated {
        namespace: "default".into(),
        name: "client".into(),
    };
    let outbound = Rc::new(
        Outbound::with_runtime(runtime.clone(), published, proxy, source, pool, CopyConfig::default())
            .with_telemetry(metrics)
            .with_handshake_timeout(Duration::from_millis(200)),
    );
    let (tx, mut summaries) = mpsc::unbounded_channel();
    for (listener, is_socks5) in [(socks_listener, true), (capture_listener, false)] {
        let (o, t) = (outbound.clone(), tx.clone());
        serve_all::<H, _, _>(listener, move |stream, peer| {
            let (o, t) = (o.clone(), t.clone());
            async move {
                let summary = if is_socks5 {
                    o.serve_socks5(stream, peer).await
                } else {
                    o.serve_capture(stream, peer).await
                };
                let _ = t.send(summary);
            }
        });
    }

    // SOCKS5 over HBONE.
    let client = H::dial(socks).await.expect("connecting to the SOCKS5 listener");
    let tunnel = within(&timer, "SOCKS5 to HBONE", socks5::connect(client, &Target::Addr(echo)))
        .await
        .expect("SOCKS5 reply 0 for the mesh workload");
    echoes(&timer, tunnel, 256 * 1024).await;
    let summary = next(&timer, &mut summaries).await;
    assert_eq!(summary.route, Some(RouteKind::Hbone));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(summary.source, Some(id(CLIENT)));
    assert_eq!((summary.sent, summary.received), (256 * 1024, 256 * 1024));
    assert_eq!(runtime.pool_connects.get(), 1);
    assert_eq!(runtime.connects.get(), 1, "the inbound upstream");
    within(&timer, "the inbound upstream dropped at the end of the stream", async {
        while !registry.is_empty() {
            timer.sleep_until(timer.now() + Duration::from_millis(10)).await;
        }
    })
    .await;

    // Passthrough to a workload outside the mesh, connected through the runtime.
    let client = H::dial(socks).await.expect("connecting to the SOCKS5 listener");
    let stream = within(
        &timer,
        "SOCKS5 passthrough",
        socks5::connect(client, &Target::Addr(plain_echo)),
    )
    .await
    .expect("SOCKS5 reply 0 for the workload outside the mesh");
    echoes(&timer, stream, 4096).await;
    let summary = next(&timer, &mut summaries).await;
    assert_eq!(summary.route, Some(RouteKind::Passthrough));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(runtime.connects.get(), 2);
    assert_eq!(runtime.pool_connects.get(), 1);

    // A client that never finishes its handshake: the deadline runs on the runtime's timer.
    let mut silent = H::dial(socks).await.expect("connecting to the SOCKS5 listener");
    let summary = next(&timer, &mut summaries).await;
    assert!(
        matches!(summary.error, Some(OutboundError::HandshakeTimeout(d)) if d == Duration::from_millis(200)),
        "{:?}",
        summary.error
    );
    let mut buf = [0u8; 1];
    let read = within(
        &timer,
        "the end of the silent client's connection",
        silent.read(&mut buf),
    )
    .await;
    assert_eq!(read.expect("the silent client's read"), 0);

    // Not redirected to the capture listener (no NAT on loopback): reset through the runtime.
    let before = RESETS.with(Cell::get);
    let mut direct = H::dial(capture).await.expect("connecting to the capture listener");
    let summary = next(&timer, &mut summaries).await;
    assert!(
        matches!(summary.error, Some(OutboundError::NotRedirected(_))),
        "{:?}",
        summary.error
    );
    assert_eq!(RESETS.with(Cell::get), before + 1);
    let read = within(&timer, "the reset", direct.read(&mut buf)).await;
    assert_eq!(read.expect_err("a reset").kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(runtime.connects.get(), 2, "nothing connected for refused connections");
}
