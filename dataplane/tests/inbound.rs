//! The inbound HBONE handler over real loopback sockets and real mutual TLS.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwire_dataplane::proxy::inbound::InboundHandler;
use meshwire_dataplane::rt::tokio::TokioTimer;
use meshwire_dataplane::state::LocalProxy;
use meshwire_dataplane::telemetry::metrics::Metrics;
use meshwire_dataplane::watch::{ConnectionRegistry, Published, Snapshot};
use meshwire_dataplane::xds::LocalConfig;
use meshwire_hbone::client::{self, ClientConnection, ConnectRequest, Tunnel};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::server::{self, RefusalReason, ServeOptions};
use meshwire_hbone::settings::Settings;
use meshwire_testkit::net::echo_server;
use meshwire_testkit::pki::{CLIENT, Pki, id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The server workload on 127.0.0.1: the `workloads` section of the configurations below.
macro_rules! server_workload {
    () => {
        r#"
workloads:
- name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
"#
    };
}

/// The server workload on 127.0.0.1, no policies.
const OPEN: &str = server_workload!();

/// OPEN with a namespace DENY policy for the client's principal.
const DENY_CLIENT: &str = concat!(
    server_workload!(),
    r#"policies:
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/client]
"#
);

/// An inbound proxy on `ip` serving the configuration `yaml`.
struct Proxy {
    addr: SocketAddr,
    published: Published,
    metrics: Arc<Metrics>,
    registry: ConnectionRegistry,
    client_tls: Arc<rustls::ClientConfig>,
}

async fn proxy(ip: &str, yaml: &str) -> Proxy {
    let pki = Pki::new();
    let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = LocalConfig::parse(yaml).unwrap();
    let published = Published::new(Snapshot::new(config, 1, None, SystemTime::now()));
    let metrics = Arc::new(Metrics::new());
    let registry = ConnectionRegistry::new();
    let local = LocalProxy::new().with_addresses([addr.ip()]);
    let (p, m, r, tls_config) = (
        published.clone(),
        metrics.clone(),
        registry.clone(),
        pki.server_tls.clone(),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            tcp.set_nodelay(true).unwrap();
            let handler = InboundHandler::new(
                p.clone(),
                local.clone(),
                tcp.local_addr().unwrap(),
                m.clone(),
                r.clone(),
            )
            .with_peer_addr(peer);
            let tls_config = tls_config.clone();
            tokio::spawn(async move {
                let options = ServeOptions::default();
                let _ = server::serve(tcp, tls_config, &options, &handler, &TokioTimer, std::future::pending()).await;
            });
        }
    });
    Proxy {
        addr,
        published,
        metrics,
        registry,
        client_tls: pki.client_tls,
    }
}

impl Proxy {
    async fn connect(&self) -> ClientConnection {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (conn, driver) = client::handshake(tcp, self.client_tls.clone(), &Settings::default(), TokioTimer)
            .await
            .unwrap();
        tokio::spawn(driver);
        conn
    }

    async fn open(&self, authority: SocketAddr) -> Result<Tunnel, u16> {
        self.open_authority(Authority::SocketAddr(authority)).await
    }

    async fn open_authority(&self, authority: Authority) -> Result<Tunnel, u16> {
        let conn = self.connect().await;
        conn.open(&ConnectRequest::new(authority))
            .await
            .map_err(|e| e.status().map_or(0, |s| s.as_u16()))
    }
}

/// The value of the series of `family` in `text`, if there is one.
fn series(text: &str, family: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.starts_with(&format!("{family}{{")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn roundtrip(tunnel: &mut Tunnel, data: &[u8]) {
    tunnel.write_all(data).await.unwrap();
    tunnel.flush().await.unwrap();
    let mut back = vec![0; data.len()];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, data);
}

#[tokio::test]
async fn an_allowed_stream_echoes_and_is_counted() {
    let echo = echo_server().await;
    let proxy = proxy("127.0.0.1", OPEN).await;
    let mut tunnel = proxy.open(echo).await.unwrap();
    roundtrip(&mut tunnel, b"hello").await;
    roundtrip(&mut tunnel, b" inbound world").await;
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());

    // The upstream is dropped when the server's stream ends, shortly after the client saw EOF.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = proxy.metrics.render();
        if series(&text, "istio_tcp_connections_closed_total") == Some(1) {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "never closed:\n{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(series(&text, "istio_tcp_connections_opened_total"), Some(1), "{text}");
    assert_eq!(series(&text, "istio_tcp_received_bytes_total"), Some(19), "{text}");
    assert_eq!(series(&text, "istio_tcp_sent_bytes_total"), Some(19), "{text}");
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap();
    assert!(opened.contains("reporter=\"destination\""), "{opened}");
    assert!(
        opened.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{opened}"
    );
    assert!(proxy.registry.is_empty());
}

#[tokio::test]
async fn an_authority_ip_other_than_the_arrival_address_gets_400() {
    let echo = echo_server().await;
    let proxy = proxy("127.0.0.1", OPEN).await;
    let other = SocketAddr::new("127.0.0.2".parse().unwrap(), echo.port());
    assert_eq!(proxy.open(other).await.unwrap_err(), 400);
}

#[tokio::test]
async fn the_proxys_own_port_gets_503() {
    let proxy = proxy("127.0.0.1", OPEN).await;
    assert_eq!(proxy.open(proxy.addr).await.unwrap_err(), 503);
    let own = SocketAddr::new(proxy.addr.ip(), 15008);
    assert_eq!(proxy.open(own).await.unwrap_err(), 503);
}

#[tokio::test]
async fn an_unknown_workload_gets_400() {
    // The proxy listens on 127.0.0.3, where no workload is.
    let proxy = proxy("127.0.0.3", OPEN).await;
    let target = SocketAddr::new(proxy.addr.ip(), 9);
    assert_eq!(proxy.open(target).await.unwrap_err(), 400);
}

#[tokio::test]
async fn a_denied_client_gets_401() {
    let echo = echo_server().await;
    let proxy = proxy("127.0.0.1", DENY_CLIENT).await;
    assert_eq!(proxy.open(echo).await.unwrap_err(), 401);
    let text = proxy.metrics.render();
    let closed = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_closed_total{"))
        .unwrap();
    assert!(closed.contains("response_flags=\"DENY\""), "{closed}");
    // Opened and closed agree: the denial is known before the connection is counted.
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap();
    assert!(opened.contains("response_flags=\"DENY\""), "{opened}");
}

/// The server workload on 127.0.0.1 as the endpoint of `echo.example`, whose port 80 is `port` on
/// the workload; port 81 of the service targets the proxy's own HBONE port.
fn service_config(port: u16, policies: &str) -> String {
    format!(
        r#"
workloads:
- name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  services: {{"default/echo.example": {{80: {port}}}}}
services:
- hostname: echo.example
  ports: {{80: 8080, 81: 15008}}
- hostname: other.example
  ports: {{80: {port}}}
{policies}"#
    )
}

#[tokio::test]
async fn a_hostname_authority_reaches_the_workloads_target_port_for_the_service() {
    let echo = echo_server().await;
    let proxy = proxy("127.0.0.1", &service_config(echo.port(), "")).await;
    let host = |name: &str, port| Authority::host(name, port).unwrap();

    let mut tunnel = proxy.open_authority(host("echo.example", 80)).await.unwrap();
    roundtrip(&mut tunnel, b"by hostname").await;
    let text = proxy.metrics.render();
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap();
    assert!(opened.contains(r#"destination_service="echo.example""#), "{opened}");

    // A service the workload is no endpoint of, and a port the service lacks: 400.
    assert_eq!(proxy.open_authority(host("other.example", 80)).await.unwrap_err(), 400);
    assert_eq!(proxy.open_authority(host("echo.example", 83)).await.unwrap_err(), 400);
    assert_eq!(
        proxy.open_authority(host("nowhere.example", 80)).await.unwrap_err(),
        400
    );
    // A target port that is one of the proxy's own: 503, as for an address.
    assert_eq!(proxy.open_authority(host("echo.example", 81)).await.unwrap_err(), 503);
}

#[tokio::test]
async fn a_policy_denies_a_hostname_authority_as_an_address() {
    let echo = echo_server().await;
    let policies = r#"policies:
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/client]
"#;
    let proxy = proxy("127.0.0.1", &service_config(echo.port(), policies)).await;
    let by_name = proxy.open_authority(Authority::host("echo.example", 80).unwrap()).await;
    assert_eq!(by_name.unwrap_err(), 401);
    assert_eq!(proxy.open(echo).await.unwrap_err(), 401);
}

#[tokio::test]
async fn a_closed_upstream_port_gets_503() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = proxy("127.0.0.1", OPEN).await;
    assert_eq!(proxy.open(closed).await.unwrap_err(), 503);
}

#[tokio::test]
async fn a_new_deny_policy_resets_an_established_stream() {
    let echo = echo_server().await;
    let proxy = proxy("127.0.0.1", OPEN).await;
    let mut tunnel = proxy.open(echo).await.unwrap();
    roundtrip(&mut tunnel, b"before").await;
    assert_eq!(proxy.registry.len(), 1);

    let snapshot = proxy
        .published
        .publish(LocalConfig::parse(DENY_CLIENT).unwrap(), None, SystemTime::now());
    assert_eq!(proxy.registry.reevaluate(&snapshot), 1);

    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
        .await
        .expect("the tunnel was not closed in time");
    assert!(read.is_err(), "expected a reset, got {read:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !proxy.registry.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection stayed registered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// OPEN with a namespace ALLOW policy that requires a principal under `cluster.local/ns/`.
const ALLOW_MESH_ONLY: &str = concat!(
    server_workload!(),
    r#"policies:
- name: mesh-only
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Prefix cluster.local/ns/]
"#
);

/// A handler as the inbound plaintext listener makes one: arrived on its port, no peer identity.
fn plaintext_handler(yaml: &str) -> (InboundHandler, Published, Arc<Metrics>, ConnectionRegistry) {
    let published = Published::new(Snapshot::new(
        LocalConfig::parse(yaml).unwrap(),
        1,
        None,
        SystemTime::now(),
    ));
    let metrics = Arc::new(Metrics::new());
    let registry = ConnectionRegistry::new();
    let handler = InboundHandler::new(
        published.clone(),
        LocalProxy::new(),
        "127.0.0.1:15006".parse().unwrap(),
        metrics.clone(),
        registry.clone(),
    )
    .with_peer_addr("127.0.0.9:40000".parse().unwrap());
    (handler, published, metrics, registry)
}

#[tokio::test]
async fn plaintext_is_counted_without_a_peer_identity_and_refused_by_a_policy_requiring_one() {
    let echo = echo_server().await;
    let (handler, published, metrics, registry) = plaintext_handler(OPEN);
    let mut upstream = handler.open(echo, None).await.unwrap();
    assert_eq!(registry.len(), 1);
    upstream.write_all(b"plain").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), upstream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"plain");
    drop(upstream);
    assert!(registry.is_empty());
    let text = metrics.render();
    let closed = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_closed_total{"))
        .unwrap();
    for label in [
        "reporter=\"destination\"",
        "source_principal=\"unknown\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/server\"",
        "connection_security_policy=\"unknown\"",
        "response_flags=\"-\"",
    ] {
        assert!(closed.contains(label), "{label} missing: {closed}");
    }
    assert_eq!(series(&text, "istio_tcp_received_bytes_total"), Some(5), "{text}");

    // A policy that requires a principal refuses plaintext, which has none.
    published.publish(LocalConfig::parse(ALLOW_MESH_ONLY).unwrap(), None, SystemTime::now());
    let refusal = handler.open(echo, None).await.unwrap_err();
    assert_eq!(refusal.status.as_u16(), 401, "{}", refusal.reason);
    assert!(registry.is_empty());
    let text = metrics.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("response_flags=\"DENY\"")
                && l.contains("connection_security_policy=\"unknown\"")),
        "{text}"
    );
    // With the identity it requires, the same connection is allowed.
    let upstream = handler.open(echo, Some(&id(CLIENT))).await.unwrap();
    drop(upstream);
}

#[tokio::test]
async fn plaintext_to_the_proxys_own_port_or_an_unserved_address_is_refused() {
    let (handler, _published, _metrics, registry) = plaintext_handler(OPEN);
    let own = handler
        .open("127.0.0.1:15008".parse().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(own.status.as_u16(), 503);
    assert!(
        matches!(own.reason, RefusalReason::Loop(dst) if dst.port() == 15008),
        "{}",
        own.reason
    );
    assert!(own.reason.to_string().contains("would loop"), "{}", own.reason);
    let unserved = handler.open("127.0.0.77:80".parse().unwrap(), None).await.unwrap_err();
    assert_eq!(unserved.status.as_u16(), 400);
    assert!(matches!(unserved.reason, RefusalReason::NoWorkload(ip) if ip.to_string() == "127.0.0.77"));
    assert!(registry.is_empty());
}

#[tokio::test]
async fn a_new_policy_closes_an_established_plaintext_connection() {
    let echo = echo_server().await;
    let (handler, published, _metrics, registry) = plaintext_handler(OPEN);
    let mut upstream = handler.open(echo, None).await.unwrap();
    let snapshot = published.publish(LocalConfig::parse(ALLOW_MESH_ONLY).unwrap(), None, SystemTime::now());
    assert_eq!(registry.reevaluate(&snapshot), 1);
    let mut buf = [0u8; 4];
    let error = tokio::time::timeout(Duration::from_secs(5), upstream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("connection closed by policy"), "{error}");
}
