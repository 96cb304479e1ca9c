//! The per-connection proxy logic on a runtime of its own: [`Outbound`] and [`InboundHandler`] over a
//! [`Runtime`] whose streams and futures are not `Send` (as glommio's are), running on one thread
//! (a tokio `LocalSet`), with real sockets, a real HBONE pool and server, and real mutual TLS from a
//! local CA. Every stream, connect, timeout and socket operation of the proxy logic goes through the
//! test runtime, which counts them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use meshwire_dataplane::proxy::inbound::InboundHandler;
use meshwire_dataplane::proxy::outbound::{
    CertManagerTls, HbonePool, Outbound, OutboundError, OutboundSummary, RouteKind, SourceWorkload,
};
use meshwire_dataplane::rt::Runtime;
use meshwire_dataplane::rt::socket::{self, DefaultSocketFactory, SocketOptions};
use meshwire_dataplane::rt::tokio::{ClientTlsSource, ConnectorConfig, TokioConnector, TokioTimer, connect_with};
use meshwire_dataplane::state::LocalProxy;
use meshwire_dataplane::telemetry::accesslog::LogFormat;
use meshwire_dataplane::telemetry::metrics::Metrics;
use meshwire_dataplane::watch::{ConnectionRegistry, Published, Snapshot};
use meshwire_dataplane::xds::LocalConfig;
use meshwire_hbone::ConnectError;
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::{Connector, Pool, PoolConfig, PoolKey};
use meshwire_hbone::rt::Executor;
use meshwire_hbone::server::{self, ServeOptions};
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::manager::{CertManager, ManagerConfig};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls::{self, TrustDomains};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{LocalSet, spawn_local};

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

thread_local! {
    /// How often [`LocalRuntime::reset_on_close`] ran on this thread.
    static RESETS: Cell<usize> = const { Cell::new(0) };
}

/// A TCP stream that is not `Send`.
struct LocalStream {
    inner: TcpStream,
    _not_send: PhantomData<Rc<()>>,
}

impl LocalStream {
    fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            _not_send: PhantomData,
        }
    }
}

impl AsyncRead for LocalStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Spawns on the thread's `LocalSet`: futures need not be `Send`.
struct LocalExecutor;

impl<F: Future<Output = ()> + 'static> Executor<F> for LocalExecutor {
    fn execute(&self, future: F) {
        drop(spawn_local(future));
    }
}

/// The HBONE pool's connector of [`LocalRuntime`]: [`TokioConnector`]'s connection as a
/// [`LocalStream`], counted.
struct LocalConnector<S> {
    inner: TokioConnector<S>,
    connects: Rc<Cell<usize>>,
}

impl<S: ClientTlsSource> Connector for LocalConnector<S> {
    type Io = LocalStream;

    async fn connect(&self, key: &PoolKey) -> Result<(LocalStream, Arc<ClientConfig>), ConnectError> {
        let (tcp, tls) = self.inner.connect(key).await?;
        self.connects.set(self.connects.get() + 1);
        Ok((LocalStream::new(tcp), tls))
    }
}

/// A runtime whose values, streams and futures are not `Send`; it counts its connects.
#[derive(Debug, Clone, Default)]
struct LocalRuntime {
    connects: Rc<Cell<usize>>,
}

impl Runtime for LocalRuntime {
    type Stream = LocalStream;
    type Timer = TokioTimer;
    type Executor = LocalExecutor;
    type Connector<S> = LocalConnector<S>;

    fn timer(&self) -> TokioTimer {
        TokioTimer
    }

    async fn connect(&self, dst: SocketAddr, opts: &SocketOptions, timeout: Duration) -> io::Result<LocalStream> {
        let tcp = connect_with(&DefaultSocketFactory, dst, opts, timeout).await?;
        self.connects.set(self.connects.get() + 1);
        Ok(LocalStream::new(tcp))
    }

    fn local_addr(stream: &LocalStream) -> io::Result<SocketAddr> {
        stream.inner.local_addr()
    }

    fn peer_addr(stream: &LocalStream) -> io::Result<SocketAddr> {
        stream.inner.peer_addr()
    }

    fn original_destination(stream: &LocalStream) -> io::Result<SocketAddr> {
        socket::original_destination(&stream.inner)
    }

    fn reset_on_close(stream: &LocalStream) -> io::Result<()> {
        RESETS.with(|resets| resets.set(resets.get() + 1));
        socket::reset_on_close(&stream.inner)
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

async fn echo_server(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Accepts on `listener` and runs `serve` for each connection (as a [`LocalStream`]) on this thread.
fn serve_local<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(LocalStream, SocketAddr) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    spawn_local(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            tcp.set_nodelay(true).unwrap();
            spawn_local(serve(LocalStream::new(tcp), peer));
        }
    });
}

/// A SOCKS5 CONNECT to `dst` (IPv4) through `proxy`: the reply code and the connection.
async fn socks_connect(proxy: SocketAddr, dst: SocketAddr) -> (u8, TcpStream) {
    let IpAddr::V4(ip) = dst.ip() else { panic!("IPv4 only") };
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut method = [0u8; 2];
    tcp.read_exact(&mut method).await.unwrap();
    assert_eq!(method, [5, 0]);
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&ip.octets());
    request.extend_from_slice(&dst.port().to_be_bytes());
    tcp.write_all(&request).await.unwrap();
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.unwrap();
    (reply[1], tcp)
}

async fn echoes(mut tcp: TcpStream, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    tcp.write_all(&data).await.unwrap();
    let mut back = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, data);
}

async fn next(summaries: &mut mpsc::UnboundedReceiver<OutboundSummary>) -> OutboundSummary {
    tokio::time::timeout(Duration::from_secs(10), summaries.recv())
        .await
        .expect("a summary within 10 s")
        .expect("the listeners still run")
}

/// SOCKS5 over HBONE (the pool's connector and executor, the inbound handler's upstream connect),
/// SOCKS5 passthrough, the handshake deadline on the runtime's timer, and a capture connection
/// that was not redirected (reset through the runtime), all on one thread.
#[tokio::test(flavor = "current_thread")]
async fn the_proxy_logic_runs_on_a_runtime_without_send() {
    LocalSet::new().run_until(on_local_runtime()).await;
}

async fn on_local_runtime() {
    let runtime = LocalRuntime::default();
    let ca = Arc::new(LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap());
    let manager = CertManager::new(ca.clone(), TokioTimer, ManagerConfig::default());
    let driver = manager.clone();
    tokio::spawn(async move { driver.run().await });
    let echo = echo_server("127.0.0.1").await;
    let plain_echo = echo_server("127.0.0.2").await;
    let yaml = r#"
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
    let published = Published::new(Snapshot::new(
        LocalConfig::parse(yaml).unwrap(),
        1,
        None,
        SystemTime::now(),
    ));
    let metrics = Arc::new(Metrics::new());

    // The inbound side: an HBONE server whose handler connects upstreams through the runtime.
    let server_creds = ca.issue(&id(SERVER)).unwrap();
    let server_tls = Arc::new(
        tls::server_config(
            &server_creds.svid,
            &server_creds.bundles,
            &TrustDomains::only(ca.trust_domain().clone()),
            vec![b"h2".to_vec()],
        )
        .unwrap(),
    );
    let hbone_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = hbone_listener.local_addr().unwrap();
    let registry = ConnectionRegistry::new();
    let (rt, p, m, r) = (runtime.clone(), published.clone(), metrics.clone(), registry.clone());
    serve_local(hbone_listener, move |stream, peer| {
        let arrived_on = LocalRuntime::local_addr(&stream).unwrap();
        let handler = InboundHandler::with_runtime(
            rt.clone(),
            p.clone(),
            LocalProxy::new().with_addresses([hbone.ip()]),
            arrived_on,
            m.clone(),
            r.clone(),
            LogFormat::Text,
        )
        .with_peer_addr(peer);
        let tls = server_tls.clone();
        async move {
            let _ = server::serve(
                stream,
                tls,
                &ServeOptions::default(),
                &handler,
                &TokioTimer,
                std::future::pending::<()>(),
            )
            .await;
        }
    });

    // The outbound side: SOCKS5 and capture listeners over one pool of the runtime.
    let socks_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks = socks_listener.local_addr().unwrap();
    let capture_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let capture = capture_listener.local_addr().unwrap();
    let pool_connects = Rc::new(Cell::new(0));
    let connector = LocalConnector {
        inner: TokioConnector::new(CertManagerTls::new(manager), ConnectorConfig::default()),
        connects: pool_connects.clone(),
    };
    let pool: HbonePool<_, LocalRuntime> = Pool::new(connector, LocalExecutor, TokioTimer, PoolConfig::default());
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
            .with_telemetry(metrics, LogFormat::Text)
            .with_handshake_timeout(Duration::from_millis(200)),
    );
    let (tx, mut summaries) = mpsc::unbounded_channel();
    let (o, t) = (outbound.clone(), tx.clone());
    serve_local(socks_listener, move |stream, peer| {
        let (o, t) = (o.clone(), t.clone());
        async move {
            let _ = t.send(o.serve_socks5(stream, peer).await);
        }
    });
    let o = outbound.clone();
    serve_local(capture_listener, move |stream, peer| {
        let (o, t) = (o.clone(), tx.clone());
        async move {
            let _ = t.send(o.serve_capture(stream, peer).await);
        }
    });

    // HBONE: the pool connects through the runtime's connector and runs its driver on the
    // runtime's executor; the inbound handler connects the echo server through the runtime.
    let (code, tcp) = socks_connect(socks, echo).await;
    assert_eq!(code, 0);
    echoes(tcp, 64 * 1024).await;
    let summary = next(&mut summaries).await;
    assert_eq!(summary.route, Some(RouteKind::Hbone));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(summary.source, Some(id(CLIENT)));
    assert_eq!((summary.sent, summary.received), (64 * 1024, 64 * 1024));
    assert_eq!(pool_connects.get(), 1);
    assert_eq!(runtime.connects.get(), 1, "the inbound upstream");
    for _ in 0..100 {
        if registry.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        registry.is_empty(),
        "the inbound upstream was dropped at the end of the stream"
    );

    // Passthrough: connected through the runtime.
    let (code, tcp) = socks_connect(socks, plain_echo).await;
    assert_eq!(code, 0);
    echoes(tcp, 4096).await;
    let summary = next(&mut summaries).await;
    assert_eq!(summary.route, Some(RouteKind::Passthrough));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(runtime.connects.get(), 2);
    assert_eq!(pool_connects.get(), 1);

    // A client that never finishes its handshake: the deadline runs on the runtime's timer.
    let mut silent = TcpStream::connect(socks).await.unwrap();
    let summary = next(&mut summaries).await;
    assert!(
        matches!(summary.error, Some(OutboundError::HandshakeTimeout(d)) if d == Duration::from_millis(200)),
        "{:?}",
        summary.error
    );
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).await.unwrap(), 0);

    // Not redirected to the capture listener (no NAT on loopback): reset through the runtime.
    let before = RESETS.with(Cell::get);
    let mut direct = TcpStream::connect(capture).await.unwrap();
    let summary = next(&mut summaries).await;
    assert!(
        matches!(summary.error, Some(OutboundError::NotRedirected(_))),
        "{:?}",
        summary.error
    );
    assert_eq!(RESETS.with(Cell::get), before + 1);
    let read = tokio::time::timeout(Duration::from_secs(10), direct.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(runtime.connects.get(), 2, "nothing connected for refused connections");
}
