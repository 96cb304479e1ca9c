//! The per-connection proxy logic of meshwire-dataplane on glommio through [`GlommioRuntime`]: on one
//! glommio executor, SOCKS5 -> HBONE pool (glommio connector, driver on glommio) -> HBONE server with
//! the inbound handler (upstream connected through the runtime) -> an echo server, with real mutual
//! TLS from a local CA; passthrough; and a capture connection that was not redirected, refused with
//! a reset through a duplicate of the glommio stream's socket.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::{Either, select};
use glommio::LocalExecutorBuilder;
use glommio::net::TcpListener;
use meshwire_dataplane::proxy::inbound::InboundHandler;
use meshwire_dataplane::proxy::outbound::{
    CertManagerTls, HbonePool, Outbound, OutboundError, OutboundSummary, RouteKind, SourceWorkload,
};
use meshwire_dataplane::rt::Runtime;
use meshwire_dataplane::rt::tokio::ConnectorConfig;
use meshwire_dataplane::state::LocalProxy;
use meshwire_dataplane::telemetry::accesslog::LogFormat;
use meshwire_dataplane::telemetry::metrics::Metrics;
use meshwire_dataplane::watch::{ConnectionRegistry, Published, Snapshot};
use meshwire_dataplane::xds::LocalConfig;
use meshwire_dataplane_uring::rt::{GlommioConnector, GlommioExecutor, GlommioRuntime, GlommioStream, GlommioTimer};
use meshwire_dataplane_uring::stream::UringStream;
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::{Pool, PoolConfig};
use meshwire_hbone::server::{self, ServeOptions};
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::manager::{CertManager, ManagerConfig};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls::{self, TrustDomains};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const LIMIT: Duration = Duration::from_secs(20);

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// A blocking echo server on `ip`, on its own threads.
fn echo_server(ip: &str) -> SocketAddr {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match select(std::pin::pin!(fut), std::pin::pin!(glommio::timer::sleep(LIMIT))).await {
        Either::Left((out, _)) => out,
        Either::Right(_) => panic!("{what}: not done within {LIMIT:?}"),
    }
}

/// Accepts on `listener` forever, handing each stream and its peer to `serve` on a new task.
fn serve_all<Fut>(listener: TcpListener, serve: impl Fn(GlommioStream, SocketAddr) -> Fut + 'static)
where
    Fut: std::future::Future<Output = ()> + 'static,
{
    glommio::spawn_local(async move {
        while let Ok(stream) = listener.accept().await {
            let stream = UringStream::new(stream);
            let peer =
                GlommioRuntime::<meshwire_dataplane::rt::socket::DefaultSocketFactory>::peer_addr(&stream).unwrap();
            glommio::spawn_local(serve(stream, peer)).detach();
        }
    })
    .detach();
}

/// A SOCKS5 CONNECT to an IPv4 `target`: the reply code and the stream.
async fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> (u8, GlommioStream) {
    let mut tcp = UringStream::new(glommio::net::TcpStream::connect(proxy).await.unwrap());
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.unwrap();
    let SocketAddr::V4(v4) = target else { panic!("IPv4") };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&request).await.unwrap();
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.unwrap();
    (reply[1], tcp)
}

async fn echoes(mut tcp: GlommioStream, len: usize) {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut tcp);
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = within("echo", futures_util::future::join(send, recv)).await;
    assert_eq!(back.len(), len);
    assert!(back == payload, "the echo is intact");
}

async fn next(summaries: &RefCell<Vec<OutboundSummary>>, count: usize) {
    within("a summary", async {
        while summaries.borrow().len() < count {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[test]
fn the_proxy_logic_runs_on_glommio() {
    let handle = LocalExecutorBuilder::default()
        .name("uring-runtime")
        .spawn(|| async move { on_glommio().await })
        .unwrap();
    handle.join().unwrap();
}

async fn on_glommio() {
    let runtime = GlommioRuntime::new();
    let ca = Arc::new(LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap());
    let manager = CertManager::new(ca.clone(), GlommioTimer, ManagerConfig::default());
    let driver = manager.clone();
    glommio::spawn_local(async move { driver.run().await }).detach();
    let echo = echo_server("127.0.0.1");
    let plain_echo = echo_server("127.0.0.2");
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

    // The inbound side: an HBONE server on glommio whose handler connects upstreams through the runtime.
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
    let hbone_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hbone = hbone_listener.local_addr().unwrap();
    let registry = ConnectionRegistry::new();
    let (rt, p, m, r) = (runtime.clone(), published.clone(), metrics.clone(), registry.clone());
    serve_all(hbone_listener, move |stream, peer| {
        let arrived_on =
            GlommioRuntime::<meshwire_dataplane::rt::socket::DefaultSocketFactory>::local_addr(&stream).unwrap();
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
                &GlommioTimer,
                std::future::pending::<()>(),
            )
            .await;
        }
    });

    // The outbound side: SOCKS5 and capture listeners over one pool of the runtime.
    let socks_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let socks = socks_listener.local_addr().unwrap();
    let capture_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let capture = capture_listener.local_addr().unwrap();
    let connector = GlommioConnector::new(CertManagerTls::new(manager), ConnectorConfig::default());
    let pool: HbonePool<_, GlommioRuntime> = Pool::new(connector, GlommioExecutor, GlommioTimer, PoolConfig::default());
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
            .with_telemetry(metrics, LogFormat::Text),
    );
    let summaries = Rc::new(RefCell::new(Vec::new()));
    let (o, s) = (outbound.clone(), summaries.clone());
    serve_all(socks_listener, move |stream, peer| {
        let (o, s) = (o.clone(), s.clone());
        async move {
            let summary = o.serve_socks5(stream, peer).await;
            s.borrow_mut().push(summary);
        }
    });
    let (o, s) = (outbound.clone(), summaries.clone());
    serve_all(capture_listener, move |stream, peer| {
        let (o, s) = (o.clone(), s.clone());
        async move {
            let summary = o.serve_capture(stream, peer).await;
            s.borrow_mut().push(summary);
        }
    });

    // SOCKS5 over HBONE, all of it on this executor.
    let (code, tcp) = within("SOCKS5 to HBONE", socks_connect(socks, echo)).await;
    assert_eq!(code, 0);
    echoes(tcp, 256 * 1024).await;
    next(&summaries, 1).await;
    {
        let all = summaries.borrow();
        let summary = &all[0];
        assert_eq!(summary.route, Some(RouteKind::Hbone));
        assert!(summary.error.is_none(), "{:?}", summary.error);
        assert_eq!(summary.source, Some(id(CLIENT)));
        assert_eq!((summary.sent, summary.received), (256 * 1024, 256 * 1024));
    }
    within("the inbound upstream dropped at the end of the stream", async {
        while !registry.is_empty() {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // Passthrough to a non-mesh workload, connected through the runtime.
    let (code, tcp) = within("SOCKS5 passthrough", socks_connect(socks, plain_echo)).await;
    assert_eq!(code, 0);
    echoes(tcp, 4096).await;
    next(&summaries, 2).await;
    assert_eq!(summaries.borrow()[1].route, Some(RouteKind::Passthrough));

    // A connection to the capture listener that was not redirected: reset.
    let mut direct = UringStream::new(glommio::net::TcpStream::connect(capture).await.unwrap());
    next(&summaries, 3).await;
    assert!(
        matches!(summaries.borrow()[2].error, Some(OutboundError::NotRedirected(_))),
        "{:?}",
        summaries.borrow()[2].error
    );
    let mut buf = [0u8; 1];
    let read = within("the reset", direct.read(&mut buf)).await;
    assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn factory_sockets_connect_or_fail_naming_the_peer() {
    let handle = LocalExecutorBuilder::default()
        .spawn(|| async {
            // A listening peer: connected, and the stream carries bytes both ways.
            let echo = echo_server("127.0.0.1");
            let runtime = GlommioRuntime::new();
            let opts = meshwire_dataplane::rt::socket::SocketOptions::default();
            let tcp = within("connect", runtime.connect(echo, &opts, Duration::from_secs(5)))
                .await
                .unwrap();
            assert_eq!(
                GlommioRuntime::<meshwire_dataplane::rt::socket::DefaultSocketFactory>::peer_addr(&tcp).unwrap(),
                echo
            );
            echoes(tcp, 300_000).await;

            // A closed port: refused, and the error names the peer.
            let closed = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            };
            let err = within(
                "refused connect",
                runtime.connect(closed, &opts, Duration::from_secs(5)),
            )
            .await
            .unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
            assert!(err.to_string().contains(&closed.to_string()), "{err}");
        })
        .unwrap();
    handle.join().unwrap();
}
