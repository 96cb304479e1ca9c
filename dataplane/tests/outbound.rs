//! The outbound SOCKS5 path end to end, in process: the test kit's SOCKS5 client, the proxy's
//! [`Outbound`] with a real HBONE pool and certificate manager over a local CA, an HBONE server with
//! mTLS on loopback, and TCP echo servers.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshwire_dataplane::config::Listener;
use meshwire_dataplane::proxy::outbound::{
    CertManagerTls, HbonePool, Outbound, OutboundError, OutboundSummary, RouteKind, SourceWorkload,
};
use meshwire_dataplane::rt::tokio::{ConnectorConfig, TokioConnector, TokioExecutor, TokioTimer};
use meshwire_dataplane::socks5::Reply;
use meshwire_dataplane::state::LocalProxy;
use meshwire_dataplane::telemetry::metrics::{Metrics, RefusalReason};
use meshwire_dataplane::watch::{Published, Snapshot};
use meshwire_dataplane::xds::LocalConfig;
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::{Pool, PoolConfig};
use meshwire_hbone::server::ServeOptions;
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::manager::{CertManager, ManagerConfig};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_testkit::data::{Fnv, pattern};
use meshwire_testkit::net::{LoopbackHandler, echo_server_on, hbone_server_with, tcp_server_on};
use meshwire_testkit::pki::{CLIENT, SERVER, id, server_config};
use meshwire_testkit::socks5::{self, Failure, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The client TLS of the outbound proxy: from a certificate manager over a local CA.
type Tls = CertManagerTls<Arc<LocalCa>, TokioTimer>;

/// What the HBONE server's handler saw.
#[derive(Debug, Clone)]
struct Seen {
    peer: SpiffeId,
    authority: String,
    forwarded: Option<String>,
}

/// A new local CA for `cluster.local`.
fn new_ca() -> Arc<LocalCa> {
    Arc::new(LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap())
}

/// A tokio HBONE pool with client certificates from `manager`.
fn pool(manager: CertManager<Arc<LocalCa>, TokioTimer>) -> HbonePool<Tls> {
    let connector = TokioConnector::new(CertManagerTls::new(manager), ConnectorConfig::default());
    Pool::new(connector, TokioExecutor::new(), TokioTimer, PoolConfig::default())
}

/// An outbound proxy with no workloads, for a shared source, and its pool over a new CA.
fn bare_outbound() -> Outbound<Tls> {
    Outbound::new(
        Published::default(),
        LocalProxy::new(),
        SourceWorkload::Shared,
        pool(CertManager::new(new_ca(), TokioTimer, ManagerConfig::default())),
        CopyConfig::default(),
    )
}

struct Fixture {
    /// The SOCKS5 listener.
    socks: SocketAddr,
    /// A listener whose connections are served as redirected to `redirect_to`.
    redirected: SocketAddr,
    redirect_to: Arc<Mutex<Option<SocketAddr>>>,
    /// A capture listener (no redirection on loopback: `SO_ORIGINAL_DST` finds none).
    capture: SocketAddr,
    echo: SocketAddr,
    plain_echo: SocketAddr,
    handler: Arc<LoopbackHandler>,
    summaries: mpsc::UnboundedReceiver<OutboundSummary>,
    published: Published,
    yaml: String,
    metrics: Arc<Metrics>,
}

impl Fixture {
    /// What the HBONE server's handler saw, in order.
    fn seen(&self) -> Vec<Seen> {
        let requests = self.handler.requests.lock().unwrap();
        requests
            .iter()
            .map(|request| Seen {
                peer: request.peer.clone(),
                authority: request.authority.to_string(),
                forwarded: request.metadata.forwarded.as_ref().map(|f| format!("{f:?}")),
            })
            .collect()
    }
}

async fn fixture() -> Fixture {
    fixture_with(SourceWorkload::Dedicated {
        namespace: "default".into(),
        name: "client".into(),
    })
    .await
}

/// Serves every connection of `listener` with `serve`, sending the summaries to `tx`.
fn serve_all<F, Fut>(listener: TcpListener, tx: mpsc::UnboundedSender<OutboundSummary>, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = OutboundSummary> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let (task, tx) = (serve(tcp, peer), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(task.await);
            });
        }
    });
}

async fn fixture_with(source: SourceWorkload) -> Fixture {
    let ca = new_ca();
    let manager = CertManager::new(ca.clone(), TokioTimer, ManagerConfig::default());
    let driver = manager.clone();
    tokio::spawn(async move { driver.run().await });

    let server = hbone_server_with(server_config(&ca, SERVER), ServeOptions::default()).await;
    let (hbone, handler) = (server.addr, server.handler);
    let echo = echo_server_on([127, 0, 0, 1].into()).await;
    let plain_echo = echo_server_on([127, 0, 0, 2].into()).await;
    let port = echo.port();
    let yaml = format!(
        r#"
workloads:
- uid: client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.0.3"]
  protocol: HBONE
- uid: server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  services: {{"default/echo.example": {{80: {port}}}}}
- uid: plain
  name: plain
  namespace: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
services:
- name: echo
  namespace: default
  hostname: echo.example
  vips: ["/127.10.0.1"]
  ports: {{80: {port}}}
"#
    );
    let config = LocalConfig::parse(&yaml).unwrap();
    let published = Published::new(Snapshot::new(config, 1, None, SystemTime::now()));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks = listener.local_addr().unwrap();
    let redirect_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirected = redirect_listener.local_addr().unwrap();
    let capture_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let capture = capture_listener.local_addr().unwrap();
    let proxy = LocalProxy::new()
        .with_addresses([socks.ip()])
        .with_ports([socks.port(), redirected.port(), capture.port()])
        .with_hbone_port(hbone.port());
    let metrics = Arc::new(Metrics::new());
    let outbound = Arc::new(
        Outbound::new(published.clone(), proxy, source, pool(manager), CopyConfig::default())
            .with_telemetry(metrics.clone()),
    );
    let (tx, summaries) = mpsc::unbounded_channel();
    let o = outbound.clone();
    serve_all(listener, tx.clone(), move |tcp, peer| {
        let o = o.clone();
        async move { o.serve_socks5(tcp, peer).await }
    });
    let redirect_to = Arc::new(Mutex::new(None::<SocketAddr>));
    let (o, to) = (outbound.clone(), redirect_to.clone());
    serve_all(redirect_listener, tx.clone(), move |tcp, peer| {
        let (o, dst) = (o.clone(), to.lock().unwrap().expect("redirect_to set"));
        async move { o.serve_redirected(tcp, peer, dst).await }
    });
    let o = outbound.clone();
    serve_all(capture_listener, tx, move |tcp, peer| {
        let o = o.clone();
        async move { o.serve_capture(tcp, peer).await }
    });
    Fixture {
        socks,
        redirected,
        redirect_to,
        capture,
        echo,
        plain_echo,
        handler,
        summaries,
        published,
        yaml,
        metrics,
    }
}

/// A SOCKS5 CONNECT to `target` through the proxy's listener `proxy`: the stream on reply 0.
async fn socks_connect(proxy: SocketAddr, target: impl Into<Target>) -> Result<TcpStream, Failure> {
    socks_connect_from(proxy, None, target.into()).await
}

/// [`socks_connect`] from the source address `from`.
async fn socks_connect_from(proxy: SocketAddr, from: Option<IpAddr>, target: Target) -> Result<TcpStream, Failure> {
    let tcp = match from {
        None => TcpStream::connect(proxy).await.unwrap(),
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(proxy).await.unwrap()
        }
    };
    socks5::connect(tcp, &target).await
}

/// A host name as a SOCKS5 destination.
fn name(host: &str, port: u16) -> Target {
    Target::Domain(host.to_owned(), port)
}

fn fnv(data: &[u8]) -> u64 {
    let mut sum = Fnv::new();
    sum.update(data);
    sum.0
}

/// Sends `len` bytes through `tcp`, half-closes, and checks the echo matches.
async fn echo_through(tcp: TcpStream, len: usize) {
    let data = pattern(len, 7);
    let expected = fnv(&data);
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), len);
    assert_eq!(fnv(&back), expected);
}

async fn next_summary(f: &mut Fixture) -> OutboundSummary {
    tokio::time::timeout(Duration::from_secs(10), f.summaries.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_mesh_workload_goes_through_hbone() {
    let mut f = fixture().await;
    let tcp = socks_connect(f.socks, f.echo).await.expect("SOCKS5 reply 0");
    echo_through(tcp, 1 << 20).await;

    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Hbone));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(summary.sent, 1 << 20);
    assert_eq!(summary.received, 1 << 20);
    assert!(matches!(summary.reply, Some(Reply::Succeeded { .. })));

    let seen = f.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer, id(CLIENT));
    assert_eq!(seen[0].authority, f.echo.to_string());
    assert!(seen[0].forwarded.is_some(), "no forwarded header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_non_mesh_workload_passes_through() {
    let mut f = fixture().await;
    let tcp = socks_connect(f.socks, f.plain_echo).await.expect("SOCKS5 reply 0");
    echo_through(tcp, 64 * 1024).await;

    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Passthrough));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(summary.sent, 64 * 1024);
    assert!(f.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_hostname_resolves_through_its_vip() {
    let mut f = fixture().await;
    let tcp = socks_connect(f.socks, name("echo.example", 80))
        .await
        .expect("SOCKS5 reply 0");
    echo_through(tcp, 4096).await;

    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Hbone));
    assert_eq!(summary.dst, Some("127.10.0.1:80".parse().unwrap()));
    let seen = f.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authority, f.echo.to_string());
    assert!(seen[0].forwarded.as_deref().unwrap().contains("echo.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hostname_is_host_unreachable() {
    let mut f = fixture().await;
    let failure = socks_connect(f.socks, name("nowhere.example", 80)).await.unwrap_err();
    assert_eq!(failure, Failure::Reply(0x04));
    let summary = next_summary(&mut f).await;
    assert!(summary.error.is_some());
    assert_eq!(summary.route, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refused_by_the_hbone_server_is_not_allowed() {
    let mut f = fixture().await;
    let failure = socks_connect(f.socks, "127.0.0.1:1".parse::<SocketAddr>().unwrap())
        .await
        .unwrap_err();
    assert_eq!(failure, Failure::Reply(0x02));
    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Hbone));
    assert_eq!(summary.reply, Some(Reply::NotAllowed));
    assert_eq!(f.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_looping_into_the_proxy_fails() {
    let mut f = fixture().await;
    let failure = socks_connect(f.socks, f.socks).await.unwrap_err();
    assert!(matches!(failure, Failure::Reply(_)), "{failure}");
    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Refused));
    assert!(f.seen().is_empty());
}

/// A server on `ip` that reads everything the client sends, then answers `reply_len` bytes and
/// closes: the two directions carry different byte counts.
async fn asymmetric_server(ip: &str, reply_len: usize) -> SocketAddr {
    tcp_server_on(ip.parse().unwrap(), move |mut tcp| async move {
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
        let _ = tcp.write_all(&vec![b'r'; reply_len]).await;
        let _ = tcp.shutdown().await;
    })
    .await
}

/// Sends `len` bytes, half-closes, and returns how many bytes came back.
async fn upload(tcp: TcpStream, len: usize) -> usize {
    let (mut r, mut w) = tcp.into_split();
    w.write_all(&pattern(len, 3)).await.unwrap();
    w.shutdown().await.unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    back.len()
}

/// The value of the sample of `family` whose labels include every one of `labels`; panics unless
/// exactly one sample matches.
fn sample(metrics: &Metrics, family: &str, labels: &[&str]) -> u64 {
    let text = metrics.render();
    let found: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{family}{{")) && labels.iter().all(|l| line.contains(l)))
        .collect();
    assert_eq!(found.len(), 1, "{family} {labels:?} in:\n{text}");
    found[0].rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_metrics_count_the_bytes_each_way_with_reporter_source() {
    let mut f = fixture().await;
    // Over HBONE: the mesh workload "server" is 127.0.0.1.
    let mesh = asymmetric_server("127.0.0.1", 777).await;
    let tcp = socks_connect(f.socks, mesh).await.expect("SOCKS5 reply 0");
    assert_eq!(upload(tcp, 10_000).await, 777);
    let summary = next_summary(&mut f).await;
    assert_eq!((summary.sent, summary.received), (10_000, 777));
    let hbone = [
        "reporter=\"source\"",
        "source_workload_namespace=\"default\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/server\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(sample(&f.metrics, "istio_tcp_received_bytes_total", &hbone), 10_000);
    assert_eq!(sample(&f.metrics, "istio_tcp_sent_bytes_total", &hbone), 777);
    assert_eq!(sample(&f.metrics, "istio_tcp_connections_opened_total", &hbone), 1);
    let closed = [&hbone[..], &["response_flags=\"-\""]].concat();
    assert_eq!(sample(&f.metrics, "istio_tcp_connections_closed_total", &closed), 1);

    // Passthrough to the TCP workload 127.0.0.2: not mutual TLS, no principals.
    let plain = asymmetric_server("127.0.0.2", 55).await;
    let tcp = socks_connect(f.socks, plain).await.expect("SOCKS5 reply 0");
    assert_eq!(upload(tcp, 3000).await, 55);
    next_summary(&mut f).await;
    let passthrough = [
        "reporter=\"source\"",
        "source_principal=\"unknown\"",
        "destination_principal=\"unknown\"",
        "connection_security_policy=\"unknown\"",
    ];
    assert_eq!(sample(&f.metrics, "istio_tcp_received_bytes_total", &passthrough), 3000);
    assert_eq!(sample(&f.metrics, "istio_tcp_sent_bytes_total", &passthrough), 55);
    assert_eq!(
        sample(&f.metrics, "istio_tcp_connections_closed_total", &passthrough),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connection_goes_through_hbone_without_a_socks_reply() {
    let mut f = fixture().await;
    *f.redirect_to.lock().unwrap() = Some(f.echo);
    let tcp = TcpStream::connect(f.redirected).await.unwrap();
    echo_through(tcp, 64 * 1024).await;
    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Hbone));
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(summary.reply, None);
    assert_eq!(summary.source, Some(id(CLIENT)));
    assert_eq!((summary.sent, summary.received), (64 * 1024, 64 * 1024));
    let seen = f.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer, id(CLIENT));
    let labels = ["reporter=\"source\"", "connection_security_policy=\"mutual_tls\""];
    assert_eq!(sample(&f.metrics, "istio_tcp_received_bytes_total", &labels), 64 * 1024);
}

/// Whether a connection to `addr` is refused: reset (possibly before the connect returned) or
/// closed without a byte.
async fn refused_at(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr).await {
        Ok(tcp) => closed_without_data(tcp).await,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Whether the client's connection was closed without a byte (reset or EOF).
async fn closed_without_data(mut tcp: TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
        Ok(Ok(0)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the connection was neither served nor closed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connection_refused_by_routing_is_reset_and_counted() {
    let mut f = fixture().await;
    // The SOCKS5 listener is one of the proxy's own: routing refuses the loop.
    *f.redirect_to.lock().unwrap() = Some(f.socks);
    assert!(refused_at(f.redirected).await);
    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Refused));
    assert!(
        matches!(summary.error, Some(OutboundError::Refused(_))),
        "{:?}",
        summary.error
    );
    assert!(f.seen().is_empty());
    let closed = ["reporter=\"source\"", "response_flags=\"CONNECT\""];
    assert_eq!(sample(&f.metrics, "istio_tcp_connections_closed_total", &closed), 1);

    // A passthrough destination where nothing listens: refused by the kernel, reset as well.
    let nothing = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        l.local_addr().unwrap()
    };
    *f.redirect_to.lock().unwrap() = Some(nothing);
    assert!(refused_at(f.redirected).await);
    let summary = next_summary(&mut f).await;
    assert_eq!(summary.route, Some(RouteKind::Passthrough));
    assert!(
        matches!(summary.error, Some(OutboundError::Connect { .. })),
        "{:?}",
        summary.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_listener_refuses_a_connection_that_was_not_redirected() {
    let mut f = fixture().await;
    assert!(refused_at(f.capture).await);
    let summary = next_summary(&mut f).await;
    let error = summary.error.expect("refused");
    assert!(matches!(error, OutboundError::NotRedirected(_)), "{error:?}");
    assert!(
        error.to_string().contains("not redirected to the outbound listener"),
        "{error}"
    );
    assert_eq!(summary.route, None, "routed");
    assert!(f.seen().is_empty());
    assert!(!f.metrics.render().contains("istio_tcp_connections_opened_total{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_source_is_looked_up_in_each_snapshot() {
    let mut f = fixture_with(SourceWorkload::Dedicated {
        namespace: "default".into(),
        name: "late".into(),
    })
    .await;
    let failure = socks_connect(f.socks, f.echo).await.unwrap_err();
    assert_eq!(failure, Failure::Reply(0x01), "no workload default/late yet");
    let summary = next_summary(&mut f).await;
    let error = summary.error.expect("refused");
    assert!(
        matches!(&error, OutboundError::DedicatedWorkloadMissing { workload } if workload == "default/late"),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("default/late is not in the local configuration"),
        "{error}"
    );

    // The new workload goes at the end of the workload list, before the top-level services.
    let at = f.yaml.find("\nservices:\n").expect("a top-level services section");
    let late = "\n- uid: late-1\n  name: late\n  namespace: default\n  serviceAccount: late\n  \
                workloadIps: [\"127.0.0.4\"]\n  protocol: HBONE";
    let yaml = format!("{}{late}{}", &f.yaml[..at], &f.yaml[at..]);
    f.published
        .publish(LocalConfig::parse(&yaml).unwrap(), None, SystemTime::now());
    let tcp = socks_connect(f.socks, f.echo).await.expect("SOCKS5 reply 0");
    echo_through(tcp, 1024).await;
    let summary = next_summary(&mut f).await;
    assert_eq!(summary.source, Some(id("spiffe://cluster.local/ns/default/sa/late")));
    assert_eq!(f.seen()[0].peer, id("spiffe://cluster.local/ns/default/sa/late"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_source_is_the_workload_with_the_client_address() {
    let mut f = fixture_with(SourceWorkload::Shared).await;
    // 127.0.0.3 is the workload "client".
    let tcp = socks_connect_from(f.socks, Some("127.0.0.3".parse().unwrap()), f.echo.into())
        .await
        .expect("SOCKS5 reply 0");
    echo_through(tcp, 4096).await;
    let summary = next_summary(&mut f).await;
    assert_eq!(summary.source, Some(id(CLIENT)));
    assert_eq!(f.seen()[0].peer, id(CLIENT));
    // 127.0.0.5 is no workload.
    let failure = socks_connect_from(f.socks, Some("127.0.0.5".parse().unwrap()), f.echo.into())
        .await
        .unwrap_err();
    assert_eq!(failure, Failure::Reply(0x01));
    let summary = next_summary(&mut f).await;
    assert!(
        matches!(summary.error, Some(OutboundError::UnknownSource { .. })),
        "{:?}",
        summary.error
    );
}

/// A proxy holds one of these futures per connection: their size is memory per connection. Measured
/// at 1192-1232 bytes on x86_64 (debug build; 2912-3120 before the handshake and the opening of the
/// upstream were boxed apart from the copy, 4376-4584 before the opening was boxed and the route and
/// labels were scoped out of the copy phase); the ceiling keeps them from growing unnoticed (jemalloc
/// rounds a box of these up to 1280 bytes).
#[tokio::test]
async fn per_connection_futures_stay_small() {
    let outbound = bare_outbound();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sizes = [
        ("serve_socks5", {
            let fut = outbound.serve_socks5(TcpStream::connect(addr).await.unwrap(), addr);
            std::mem::size_of_val(&fut)
        }),
        ("serve_capture", {
            let fut = outbound.serve_capture(TcpStream::connect(addr).await.unwrap(), addr);
            std::mem::size_of_val(&fut)
        }),
        ("serve_redirected", {
            let fut = outbound.serve_redirected(TcpStream::connect(addr).await.unwrap(), addr, addr);
            std::mem::size_of_val(&fut)
        }),
    ];
    for (name, size) in sizes {
        println!("{name}: {size} bytes");
    }
    for (name, size) in sizes {
        assert!(size <= 1280, "the {name} future is {size} bytes");
    }
}

/// A SOCKS5 client that says nothing is dropped at the handshake timeout (in virtual time), one that
/// does not speak SOCKS5 at once; each refusal is counted under its reason.
#[tokio::test(start_paused = true)]
async fn failed_socks5_handshakes_are_counted_as_refusals() {
    let metrics = Arc::new(Metrics::new());
    let outbound = bare_outbound()
        .with_telemetry(metrics.clone())
        .with_handshake_timeout(Duration::from_secs(5));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve_next = || async {
        let (tcp, peer) = listener.accept().await.unwrap();
        outbound.serve_socks5(tcp, peer).await
    };

    // Silent.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let summary = serve_next().await;
    assert!(
        matches!(summary.error, Some(OutboundError::HandshakeTimeout(_))),
        "{summary:?}"
    );
    assert_eq!(metrics.refusals(Listener::Socks5, RefusalReason::HandshakeTimeout), 1);
    assert_eq!(metrics.refusals(Listener::Socks5, RefusalReason::Socks5Handshake), 0);

    // SOCKS4.
    let mut socks4 = TcpStream::connect(addr).await.unwrap();
    socks4.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
    let summary = serve_next().await;
    assert!(
        matches!(summary.error, Some(OutboundError::Handshake(_))),
        "{summary:?}"
    );
    assert_eq!(metrics.refusals(Listener::Socks5, RefusalReason::Socks5Handshake), 1);
    assert_eq!(metrics.refusals(Listener::Socks5, RefusalReason::HandshakeTimeout), 1);
    let text = metrics.render();
    assert!(
        text.contains("istio_tcp_connections_refused_total{listener=\"socks5\",reason=\"handshake_timeout\"} 1"),
        "{text}"
    );
    // Refused before routing: no connection is counted.
    assert!(!text.contains("istio_tcp_connections_opened_total{"), "{text}");
}
