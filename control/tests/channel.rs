//! The gRPC channel against a fake istiod over real TLS and real sockets: the headers on every
//! request (a token file re-read after it changes, `clusterid`, custom headers), the roots (a root
//! file re-read at the next connect, a wrong root refused with an error that says so).

#![allow(clippy::unwrap_used)]

use meshwire_control::channel::{Address, Channel, ChannelConfig, ChannelError, Roots, Token};
use meshwire_control::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use meshwire_control::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshwire_rt::TokioTimer;
use meshwire_testkit::istiod::{FakeIstiod, ISTIOD_NAME, StreamHandle};

fn config(fake: &FakeIstiod, roots: Roots) -> ChannelConfig {
    let address = Address::parse(&fake.address().to_string()).unwrap();
    ChannelConfig::new(address, roots).server_name(ISTIOD_NAME)
}

/// Connects, drives the connection in a task, and returns a client.
async fn client(channel: &Channel) -> AggregatedDiscoveryServiceClient<meshwire_control::channel::GrpcService> {
    let (service, connection) = channel.connect(&TokioTimer).await.unwrap();
    tokio::spawn(connection);
    AggregatedDiscoveryServiceClient::with_origin(service, channel.origin())
}

/// Opens one ADS stream on `client` and returns the fake's view of it.
async fn open(
    fake: &FakeIstiod,
    client: &mut AggregatedDiscoveryServiceClient<meshwire_control::channel::GrpcService>,
) -> StreamHandle {
    let requests = futures_util::stream::iter(vec![DeltaDiscoveryRequest::default()]);
    let (_, stream) = tokio::join!(client.delta_aggregated_resources(requests), fake.next_stream());
    stream
}

#[tokio::test]
async fn headers_on_every_request_and_the_token_file_is_reread() {
    let fake = FakeIstiod::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "first-token\n").unwrap();
    let channel = Channel::new(
        config(&fake, Roots::Pem(fake.root_pem()))
            .token(Token::File(token.clone()))
            .cluster_id("east")
            .header("X-Tenant_Id", "blue")
            .header("other", "x"),
    )
    .unwrap();
    let mut client = client(&channel).await;

    let stream = open(&fake, &mut client).await;
    assert_eq!(stream.header("authorization"), "Bearer first-token");
    assert_eq!(stream.header("clusterid"), "east");
    assert_eq!(stream.header("x-tenant_id"), "blue");
    assert_eq!(stream.header("other"), "x");

    // A rotated token is used by the next request on the same connection.
    std::fs::write(&token, "second-token").unwrap();
    let stream = open(&fake, &mut client).await;
    assert_eq!(stream.header("authorization"), "Bearer second-token");
    assert_eq!(fake.connection_times().len(), 1, "one connection for both streams");
}

#[tokio::test]
async fn defaults_no_token_and_cluster_kubernetes() {
    let fake = FakeIstiod::start().await;
    let channel = Channel::new(config(&fake, Roots::Pem(fake.root_pem()))).unwrap();
    let mut client = client(&channel).await;
    let stream = open(&fake, &mut client).await;
    assert_eq!(stream.header("clusterid"), "Kubernetes");
    assert!(stream.headers.get("authorization").is_none());
}

#[tokio::test]
async fn a_missing_token_file_fails_the_request_naming_the_file() {
    let fake = FakeIstiod::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("absent-token");
    let channel = Channel::new(config(&fake, Roots::Pem(fake.root_pem())).token(Token::File(token.clone()))).unwrap();
    let mut client = client(&channel).await;
    let requests = futures_util::stream::iter(vec![DeltaDiscoveryRequest::default()]);
    let status = client.delta_aggregated_resources(requests).await.unwrap_err();
    assert!(status.message().contains("absent-token"), "{status:?}");
}

#[tokio::test]
async fn a_wrong_root_is_refused_and_a_rotated_root_file_is_used_at_the_next_connect() {
    let fake = FakeIstiod::start().await;
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("root-cert.pem");
    std::fs::write(&roots, fake.other_root_pem()).unwrap();
    let channel = Channel::new(config(&fake, Roots::File(roots.clone()))).unwrap();

    let err = channel.connect(&TokioTimer).await.unwrap_err();
    assert!(matches!(err, ChannelError::Tls { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&fake.address().to_string()), "{text}");
    assert!(text.contains(ISTIOD_NAME), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");

    // Rotated on disk: the next connection trusts the new file.
    std::fs::write(&roots, fake.root_pem()).unwrap();
    let mut client = client(&channel).await;
    open(&fake, &mut client).await;

    // A name the certificate does not hold is refused too.
    let channel = Channel::new(config(&fake, Roots::Pem(fake.root_pem())).server_name("istiod.other.svc")).unwrap();
    let err = channel.connect(&TokioTimer).await.unwrap_err();
    assert!(err.to_string().contains("istiod.other.svc"), "{err}");
}

#[tokio::test]
async fn connect_errors_name_the_address() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let channel = Channel::new(ChannelConfig::new(
        Address::parse(&address).unwrap(),
        Roots::Pem(String::new()),
    ))
    .unwrap();
    let err = channel.connect(&TokioTimer).await.unwrap_err();
    // Empty roots: the roots fail before the dial, and say where they came from.
    assert!(err.to_string().contains("inline PEM"), "{err}");

    let fake = FakeIstiod::start().await;
    let channel = Channel::new(ChannelConfig::new(
        Address::parse(&address).unwrap(),
        Roots::Pem(fake.root_pem()),
    ))
    .unwrap();
    let err = channel.connect(&TokioTimer).await.unwrap_err();
    assert!(matches!(err, ChannelError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&address), "{err}");
}
