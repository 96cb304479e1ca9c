//! The delta ADS client against a fake istiod, over real TLS and real sockets, in virtual time
//! (a paused tokio clock: backoff delays are measured, never waited for).

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshwire_control::ads::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, AdsClient, AdsStatus, Backoff, Rejected, TerminationReason, XdsHandler,
};
use meshwire_control::channel::{Address, Channel, ChannelConfig, Roots, Token};
use meshwire_control::node::node_from_env;
use meshwire_control::proto::envoy::config::core::v3::Node;
use meshwire_control::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};
use meshwire_rt::TokioTimer;
use meshwire_testkit::istiod::{FakeIstiod, ISTIOD_NAME, StreamHandle, response};
use tokio::time::Instant;
use tonic::Code;

const SEED: u64 = 0x15_7104;

fn node() -> Node {
    node_from_env([
        ("POD_NAME", "ztunnel-abc"),
        ("POD_NAMESPACE", "istio-system"),
        ("INSTANCE_IP", "10.0.0.9"),
        ("NODE_NAME", "worker-1"),
    ])
    .unwrap()
}

/// One `apply` call as the handler saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    type_url: String,
    names: Vec<String>,
    removed: Vec<String>,
}

/// Records every call; rejects the names in `reject` with the reason `"bad <name>"`.
#[derive(Clone, Default)]
struct Recorder {
    applied: Arc<Mutex<Vec<Applied>>>,
    reject: HashSet<String>,
}

impl Recorder {
    fn rejecting(names: &[&str]) -> Self {
        Self {
            reject: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    fn calls(&self) -> Vec<Applied> {
        self.applied.lock().unwrap().clone()
    }
}

impl XdsHandler for Recorder {
    fn apply(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> Vec<Rejected> {
        let names: Vec<String> = resources.iter().map(|r| r.name.clone()).collect();
        let rejected = names
            .iter()
            .filter(|n| self.reject.contains(*n))
            .map(|n| Rejected::new(n.clone(), format!("bad {n}")))
            .collect();
        self.applied.lock().unwrap().push(Applied {
            type_url: type_url.to_string(),
            names,
            removed,
        });
        rejected
    }
}

/// A channel to `fake`. Without HTTP/2 keepalive unless asked: under a paused clock, a pending
/// ping timer lets tokio jump the clock to it whenever every task waits on a socket for a moment,
/// which would blur the delays measured here (in real time the same exchanges take milliseconds).
fn channel(fake: &FakeIstiod, keepalive: bool) -> Channel {
    let address = Address::parse(&fake.address().to_string()).unwrap();
    let mut config = ChannelConfig::new(address, Roots::Pem(fake.root_pem()))
        .server_name(ISTIOD_NAME)
        .token(Token::Static("t0k3n".into()));
    if !keepalive {
        config = config.keepalive(None);
    }
    Channel::new(config).unwrap()
}

/// Starts a client on `fake` in a task (no keepalive); returns its status.
fn start(fake: &FakeIstiod, backoff: Backoff, handler: Recorder) -> AdsStatus {
    start_on(channel(fake, false), backoff, handler)
}

/// Starts a client on `channel` in a task; returns its status.
fn start_on(channel: Channel, backoff: Backoff, mut handler: Recorder) -> AdsStatus {
    let mut client = AdsClient::new(channel, node(), TokioTimer)
        .with_backoff(backoff)
        .with_rng(fastrand::Rng::with_seed(SEED));
    let status = client.status();
    tokio::spawn(async move {
        client.run(&mut handler).await;
    });
    status
}

fn any(name: &str) -> prost_types::Any {
    prost_types::Any {
        type_url: ADDRESS_TYPE.to_string(),
        value: name.as_bytes().to_vec(),
    }
}

fn res(items: &[(&str, &str)]) -> Vec<(String, String, prost_types::Any)> {
    items
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string(), any(n)))
        .collect()
}

/// Reads the two initial requests of a stream, keyed by type.
async fn initial(stream: &mut StreamHandle) -> HashMap<String, DeltaDiscoveryRequest> {
    let mut out = HashMap::new();
    for _ in 0..2 {
        let r = stream.expect("an initial request").await;
        out.insert(r.type_url.clone(), r);
    }
    assert_eq!(out.len(), 2, "one initial request per type");
    out
}

fn versions(items: &[(&str, &str)]) -> HashMap<String, String> {
    items.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

#[tokio::test(start_paused = true)]
async fn subscribe_ack_partial_nack_readiness_and_reconnect_with_versions() {
    let fake = FakeIstiod::start().await;
    let handler = Recorder::rejecting(&["ns/bad", "ns/worse"]);
    let status = start(&fake, Backoff::DEFAULT, handler.clone());

    let mut s = fake.next_stream().await;
    assert_eq!(s.header("authorization"), "Bearer t0k3n");
    assert_eq!(s.header("clusterid"), "Kubernetes");
    let first = initial(&mut s).await;
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let r = &first[type_url];
        assert_eq!(
            r.node.as_ref().unwrap().id,
            node().id,
            "{type_url}: the first request carries the Node"
        );
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        assert!(r.initial_resource_versions.is_empty());
        assert!(r.response_nonce.is_empty() && r.error_detail.is_none());
    }
    assert!(!status.ready());

    // ACK: type and nonce, no Node, no error.
    s.send(response(ADDRESS_TYPE, "a1", res(&[("w1", "1"), ("w2", "1")]), vec![]));
    let ack = s.expect("the ACK of a1").await;
    assert_eq!(
        (ack.type_url.as_str(), ack.response_nonce.as_str()),
        (ADDRESS_TYPE, "a1")
    );
    assert!(ack.error_detail.is_none() && ack.node.is_none());
    let snap = status.snapshot();
    assert!(snap.connected);
    assert!(snap.types[ADDRESS_TYPE].acked);
    assert_eq!(snap.types[ADDRESS_TYPE].last_ack_nonce.as_deref(), Some("a1"));
    assert_eq!(snap.types[ADDRESS_TYPE].resources, 2);
    assert!(!status.ready(), "authorization not ACKed yet");

    // A NACK-only first response does not make the type ready.
    s.send(response(AUTHORIZATION_TYPE, "p1", res(&[("ns/bad", "1")]), vec![]));
    let nack = s.expect("the NACK of p1").await;
    assert_eq!(nack.response_nonce, "p1");
    let detail = nack.error_detail.unwrap();
    assert_eq!(detail.code, 3);
    assert_eq!(detail.message, "ns/bad: bad ns/bad");
    assert!(nack.node.is_none());
    assert!(!status.ready());

    // Partial NACK: the good one applied, each bad one named.
    s.send(response(
        AUTHORIZATION_TYPE,
        "p2",
        res(&[("ns/good", "1"), ("ns/bad", "2"), ("ns/worse", "1")]),
        vec![],
    ));
    let nack = s.expect("the NACK of p2").await;
    assert_eq!(
        nack.error_detail.unwrap().message,
        "ns/bad: bad ns/bad; ns/worse: bad ns/worse"
    );
    let snap = status.snapshot();
    assert_eq!(
        snap.types[AUTHORIZATION_TYPE].last_nack.as_deref(),
        Some("ns/bad: bad ns/bad; ns/worse: bad ns/worse")
    );
    assert_eq!(snap.types[AUTHORIZATION_TYPE].resources, 1);
    assert!(!status.ready());

    s.send(response(AUTHORIZATION_TYPE, "p3", res(&[("ns/other", "7")]), vec![]));
    assert!(s.expect("the ACK of p3").await.error_detail.is_none());
    assert!(status.ready(), "both types ACKed");

    // A removal drops the name.
    s.send(response(ADDRESS_TYPE, "a2", vec![], vec!["w2".into()]));
    assert!(s.expect("the ACK of a2").await.error_detail.is_none());
    let calls_before = handler.calls().len();
    assert_eq!(handler.calls().last().unwrap().removed, vec!["w2".to_string()]);

    // MaxConnectionAge: UNAVAILABLE after responses, a normal reconnect at once.
    let closed_at = Instant::now();
    s.close(Code::Unavailable, "max connection age");
    let mut s = fake.next_stream().await;
    assert_eq!(Instant::now() - closed_at, Duration::ZERO, "no backoff");
    let again = initial(&mut s).await;
    assert_eq!(again[ADDRESS_TYPE].initial_resource_versions, versions(&[("w1", "1")]));
    assert_eq!(
        again[AUTHORIZATION_TYPE].initial_resource_versions,
        versions(&[("ns/good", "1"), ("ns/other", "7")]),
        "NACKed names left out"
    );
    assert!(
        again.values().all(|r| r.node.is_some()),
        "each type's first request on the new stream carries the Node"
    );

    let snap = status.snapshot();
    assert_eq!(snap.terminations(TerminationReason::Reconnect), 1);
    assert_eq!(snap.terminations(TerminationReason::Error), 0);
    assert_eq!(snap.terminations(TerminationReason::ConnectionError), 0);
    assert_eq!(snap.consecutive_failures, 0);
    assert!(snap.last_error.is_none());
    assert!(status.ready(), "readiness survives a reconnect");
    assert_eq!(
        handler.calls().len(),
        calls_before,
        "the handler is not told anything on a disconnect"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_ended_with_ok_reconnects_at_once_without_an_error() {
    let fake = FakeIstiod::start().await;
    let status = start(&fake, Backoff::DEFAULT, Recorder::default());
    let mut s = fake.next_stream().await;
    initial(&mut s).await;
    s.send(response(ADDRESS_TYPE, "a1", res(&[("w1", "1")]), vec![]));
    s.expect("the ACK").await;
    let closed_at = Instant::now();
    s.close(Code::Ok, "");
    let mut s = fake.next_stream().await;
    assert_eq!(Instant::now() - closed_at, Duration::ZERO);
    let again = initial(&mut s).await;
    assert_eq!(again[ADDRESS_TYPE].initial_resource_versions, versions(&[("w1", "1")]));
    let snap = status.snapshot();
    assert_eq!(snap.terminations(TerminationReason::Complete), 1);
    assert_eq!(snap.terminations(TerminationReason::Error), 0);
    assert_eq!(snap.consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn refused_connections_back_off_with_full_jitter_in_virtual_time() {
    let fake = FakeIstiod::start().await;
    fake.refuse_connections(true);
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(16),
    };
    let status = start(&fake, backoff, Recorder::default());
    const ATTEMPTS: usize = 9;
    fake.wait_for_connections(ATTEMPTS).await;
    let times = fake.connection_times();
    let delays: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();

    // The same seed draws the same delays: the n-th failure waits in [0, min(16 s, 2^(n-1) s)]
    // (tokio's timers round up to the next millisecond).
    let tick = Duration::from_millis(1);
    let mut rng = fastrand::Rng::with_seed(SEED);
    for (i, delay) in delays.iter().enumerate() {
        let failures = i as u32 + 1;
        let ceiling = backoff.ceiling(failures);
        assert!(*delay <= ceiling + tick, "delay {i}: {delay:?} > {ceiling:?}");
        let drawn = backoff.delay(failures, &mut rng);
        assert!(
            *delay >= drawn && *delay <= drawn + tick,
            "delay {i}: {delay:?}, drawn {drawn:?}"
        );
    }
    let ceilings: Vec<u64> = (1..ATTEMPTS as u32).map(|n| backoff.ceiling(n).as_secs()).collect();
    assert_eq!(ceilings, [1, 2, 4, 8, 16, 16, 16, 16]);
    let early: Duration = delays[..3].iter().sum();
    let late: Duration = delays[delays.len() - 3..].iter().sum();
    assert!(late > early * 2, "the delays grow: {delays:?}");

    let snap = status.snapshot();
    assert!(snap.terminations(TerminationReason::ConnectionError) >= ATTEMPTS as u64 - 1);
    assert_eq!(snap.terminations(TerminationReason::Error), 0);
    assert!(snap.consecutive_failures >= ATTEMPTS as u32 - 1);
    assert!(!snap.connected && !snap.ready());
    let error = snap.last_error.unwrap();
    assert!(error.contains(&fake.address().to_string()), "{error}");

    // istiod comes back: a stream that gets a response resets the backoff, so an error after it
    // waits at most the first ceiling.
    fake.refuse_connections(false);
    let mut s = fake.next_stream().await;
    initial(&mut s).await;
    s.send(response(ADDRESS_TYPE, "a1", vec![], vec![]));
    s.expect("the ACK").await;
    assert_eq!(
        status.snapshot().consecutive_failures,
        ATTEMPTS as u32,
        "reset when the stream ends, not before"
    );
    let closed_at = Instant::now();
    s.close(Code::Internal, "boom");
    let mut s = fake.next_stream().await;
    assert!(Instant::now() - closed_at <= backoff.ceiling(1) + tick);
    initial(&mut s).await;
    let snap = status.snapshot();
    assert_eq!(snap.terminations(TerminationReason::Error), 1);
    assert_eq!(snap.consecutive_failures, 1);
    let error = snap.last_error.unwrap();
    assert!(error.contains("Internal") && error.contains("boom"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn an_error_before_any_response_counts_and_backs_off() {
    let fake = FakeIstiod::start().await;
    let status = start(&fake, Backoff::DEFAULT, Recorder::default());
    let mut s = fake.next_stream().await;
    initial(&mut s).await;
    s.close(Code::PermissionDenied, "NAMESPACE does not match the token");
    let mut s = fake.next_stream().await;
    initial(&mut s).await;
    // UNAVAILABLE before any response is an error too, not a normal reconnect.
    s.close(Code::Unavailable, "not ready");
    let mut s = fake.next_stream().await;
    initial(&mut s).await;
    let snap = status.snapshot();
    assert_eq!(snap.terminations(TerminationReason::Error), 2);
    assert_eq!(snap.terminations(TerminationReason::Reconnect), 0);
    assert_eq!(snap.consecutive_failures, 2);
    let times = fake.connection_times();
    let tick = Duration::from_millis(1);
    assert!(times[1] - times[0] <= Backoff::DEFAULT.ceiling(1) + tick);
    assert!(times[2] - times[1] <= Backoff::DEFAULT.ceiling(2) + tick);
    assert!(snap.last_error.unwrap().contains("Unavailable"));
}

#[tokio::test(start_paused = true)]
async fn large_responses_and_idle_streams_are_kept() {
    let fake = FakeIstiod::start().await;
    let handler = Recorder::default();
    let status = start_on(channel(&fake, true), Backoff::DEFAULT, handler.clone());
    let mut s = fake.next_stream().await;
    initial(&mut s).await;

    // Above tonic's 4 MiB default: a large mesh's first push.
    let big = prost_types::Any {
        type_url: ADDRESS_TYPE.to_string(),
        value: vec![7; 6 * 1024 * 1024],
    };
    s.send(response(
        ADDRESS_TYPE,
        "big",
        vec![("w-big".into(), "1".into(), big)],
        vec![],
    ));
    let ack = s.expect("the ACK of a 6 MiB response").await;
    assert!(ack.error_detail.is_none());
    assert_eq!(handler.calls()[0].names, ["w-big"]);

    // Ten idle minutes (virtual): keepalive pings are answered, the stream stays.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let snap = status.snapshot();
    assert!(snap.connected);
    assert_eq!(snap.terminations.values().sum::<u64>(), 0, "{snap:?}");
    assert_eq!(fake.connection_times().len(), 1);
    s.send(response(AUTHORIZATION_TYPE, "p1", vec![], vec![]));
    assert_eq!(s.expect("the ACK of p1").await.response_nonce, "p1");
    assert!(status.ready());
}
