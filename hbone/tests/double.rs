//! Double HBONE and metadata over real sockets: a client reaches a workload behind an east-west
//! gateway through an outer tunnel to the gateway carrying an inner mTLS + HTTP/2 CONNECT to the
//! workload's own identity; metadata headers arrive parsed at the server.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;

use meshwire_hbone::client::{self, ConnectRequest};
use meshwire_hbone::headers::{Authority, Baggage, Forwarded, Metadata, TraceParent};
use meshwire_hbone::server::ServeOptions;
use meshwire_hbone::{Settings, double};
use meshwire_rt::TokioExecutor;
use meshwire_rt::TokioTimer;
use meshwire_testkit::data::*;
use meshwire_testkit::net::*;
use meshwire_testkit::pki::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GATEWAY: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest-gateway";

fn to(addr: SocketAddr) -> ConnectRequest {
    ConnectRequest::new(Authority::parse(&addr.to_string()).unwrap())
}

#[tokio::test]
async fn double_hbone_reaches_a_workload_behind_a_gateway() {
    let pki = Pki::new();
    let echo = echo_server().await;
    // The workload's node: an HBONE server presenting the workload identity.
    let workload = hbone_server(&pki, ServeOptions::default()).await;
    // The east-west gateway: terminates the outer CONNECT and splices it to the node's HBONE port.
    let gateway = hbone_server_with(pki.server_as(GATEWAY), ServeOptions::default()).await;

    let tcp = TcpStream::connect(gateway.addr).await.unwrap();
    let (outer_conn, driver) = client::handshake(tcp, pki.client_expecting(GATEWAY), &Settings::default(), TokioTimer)
        .await
        .unwrap();
    tokio::spawn(driver);
    let outer = outer_conn.open(&to(workload.addr)).await.unwrap();
    assert_eq!(outer.peer_identity(), &id(GATEWAY));

    let mut inner_request = to(echo);
    inner_request.metadata.x_forwarded_network = Some("network-2".into());
    let mut inner = double::connect(
        outer,
        pki.client_tls.clone(),
        &inner_request,
        &Settings::default(),
        TokioTimer,
        &TokioExecutor::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        inner.peer_identity(),
        &id(SERVER),
        "the inner mTLS is with the workload, not the gateway"
    );

    let data = pattern(1 << 20, 3);
    inner.write_all(&data).await.unwrap();
    inner.shutdown().await.unwrap();
    let back = read_all(&mut inner).await.unwrap();
    assert!(back == data, "1 MiB echoed through both tunnels");

    // The gateway saw only the outer CONNECT; the workload's node saw the inner one.
    let outer_seen = gateway.handler.requests.lock().unwrap().clone();
    assert_eq!(outer_seen.len(), 1);
    assert_eq!(outer_seen[0].authority.as_socket_addr(), Some(workload.addr));
    let inner_seen = workload.handler.requests.lock().unwrap().clone();
    assert_eq!(inner_seen.len(), 1);
    assert_eq!(inner_seen[0].authority.as_socket_addr(), Some(echo));
    assert_eq!(inner_seen[0].peer, id(CLIENT));
    assert_eq!(inner_seen[0].metadata.x_forwarded_network.as_deref(), Some("network-2"));
}

#[tokio::test]
async fn metadata_headers_arrive_parsed() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (conn, driver) = client::handshake(tcp, pki.client_tls.clone(), &Settings::default(), TokioTimer)
        .await
        .unwrap();
    tokio::spawn(driver);

    let baggage = Baggage {
        cluster_name: Some("Kubernetes".into()),
        namespace_name: Some("default".into()),
        workload_kind: Some("deployment".into()),
        workload_name: Some("sleep".into()),
        service_name: Some("sleep".into()),
        service_version: Some("v1".into()),
        ..Baggage::default()
    };
    let traceparent: TraceParent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        .parse()
        .unwrap();
    let metadata = Metadata {
        forwarded: Some(
            Forwarded::new("10.0.0.7:41234".parse::<SocketAddr>().unwrap()).with_host("echo.default.svc.cluster.local"),
        ),
        baggage: Some(baggage.clone()),
        traceparent: Some(traceparent),
        x_forwarded_network: None,
    };
    let request = ConnectRequest {
        authority: Authority::parse(&echo.to_string()).unwrap(),
        metadata: metadata.clone(),
    };
    let mut t = conn.open(&request).await.unwrap();
    t.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.unwrap();

    let seen = server.handler.requests.lock().unwrap().clone();
    assert_eq!(seen[0].metadata, metadata);
    let raw = seen[0].headers.get("forwarded").unwrap().to_str().unwrap().to_owned();
    assert_eq!(
        raw, r#"for="10.0.0.7:41234";host=echo.default.svc.cluster.local"#,
        "the wire form ztunnel writes"
    );
}
