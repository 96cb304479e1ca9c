//! The control listeners over real sockets and real state: readiness turning from 500 to 200 as the
//! configuration is published and the certificate manager fetches a certificate from a local CA;
//! `/config_dump` showing a loaded configuration and that certificate; `/logging` changing a real
//! `tracing` filter and refusing an invalid one; `/quitquitquit` pulling the shutdown trigger; metrics
//! with content negotiation; 404/405; servers that stop with their shutdown future.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshwire_dataplane::admin::{
    self, AdminHandler, Handler, LogControl, MetricsHandler, Readiness, ReadinessHandler, ShutdownTrigger,
};
use meshwire_dataplane::rt::tokio::TokioTimer;
use meshwire_dataplane::telemetry::metrics::{
    ConnectionLabels, Metrics, OPENMETRICS_CONTENT_TYPE, Reporter, ResponseFlags, SecurityPolicy, TEXT_CONTENT_TYPE,
};
use meshwire_dataplane::watch::{Published, Snapshot};
use meshwire_dataplane::xds::LocalConfig;
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::manager::{CertManager, CertStatus, ManagerConfig, Priority};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_testkit::http::{Response, request as http_request};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

// ---------------------------------------------------------------------------------------------
// Fixtures

const SHOP: &str = r#"
workloads:
- uid: cluster1//v1/Pod/shop/cart-1
  name: cart-1
  namespace: shop
  serviceAccount: cart
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  services:
    "shop/cart.shop.svc.cluster.local": {80: 8080}
services:
- name: cart
  namespace: shop
  hostname: cart.shop.svc.cluster.local
  vips: ["/10.96.0.2"]
  ports: {80: 8080}
policies:
- name: allow-frontend
  namespace: shop
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/shop/sa/frontend]
"#;

const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

/// A server for `handler` on a free loopback port, stopped by sending on (or dropping) the sender.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(name: &'static str, handler: impl Handler) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(admin::serve(name, listener, handler, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(admin::SHUTDOWN_GRACE + Duration::from_secs(2), &mut self.task)
            .await
            .expect("the server stops within its grace period")
            .unwrap();
    }
}

/// The body of `reply` as JSON; panics when it is not.
fn json(reply: &Response) -> Value {
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", reply.body))
}

/// One request (`Connection: close`), the whole answer read.
async fn request(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
    tokio::time::timeout(Duration::from_secs(10), http_request(addr, method, target, headers))
        .await
        .expect("the server answers and closes")
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

async fn get(addr: SocketAddr, target: &str) -> Response {
    request(addr, "GET", target, &[]).await
}

async fn post(addr: SocketAddr, target: &str) -> Response {
    request(addr, "POST", target, &[]).await
}

type Manager = CertManager<LocalCa, TokioTimer>;

fn manager() -> Manager {
    let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap();
    CertManager::new(ca, TokioTimer, ManagerConfig::default())
}

// ---------------------------------------------------------------------------------------------
// Readiness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_500_naming_what_is_pending_until_config_and_certificate_are_there() {
    let readiness = Readiness::new();
    let published = Published::default();
    let manager = manager();
    let cart = SpiffeId::new(CART).unwrap();

    let listeners = readiness.block("listeners");
    let config_blocker = readiness.block("local configuration");
    let waiting_config = published.clone();
    let config_task = tokio::spawn(async move {
        admin::config_loaded(&waiting_config).await;
        config_blocker.ready();
    });
    let (checked, id) = (manager.clone(), cart.clone());
    readiness.check(move || admin::certificate_pending(&id, checked.status_for(&id), SystemTime::now()));
    manager.warm_up(&cart);
    let server = Server::start("readiness", ReadinessHandler::new(readiness.clone())).await;

    let reply = get(server.addr, "/healthz/ready").await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.body,
        format!("not ready, pending: listeners, local configuration, workload certificate {CART}\n")
    );

    listeners.ready();
    let reply = get(server.addr, "/healthz/ready").await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.body,
        format!("not ready, pending: local configuration, workload certificate {CART}\n")
    );

    // The configuration arrives: only the certificate is missing (the manager's driver is not running).
    published.publish(LocalConfig::parse(SHOP).unwrap(), None, SystemTime::now());
    config_task.await.unwrap();
    let reply = get(server.addr, "/healthz/ready").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (
            500,
            format!("not ready, pending: workload certificate {CART}\n").as_str()
        )
    );

    // The manager runs and fetches the certificate from the local CA (the check only reads).
    let driver = manager.clone();
    let run = tokio::spawn(async move { driver.run().await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !readiness.is_ready() {
        assert!(Instant::now() < deadline, "the certificate is fetched: {readiness:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = get(server.addr, "/healthz/ready").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ready\n"));
    assert_eq!(reply.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(manager.handle(&cart).is_some());

    // Other paths and methods.
    assert_eq!(get(server.addr, "/healthz").await.status, 404);
    assert_eq!(get(server.addr, "/").await.status, 404);
    let reply = post(server.addr, "/healthz/ready").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));

    // Draining: not ready any more.
    readiness.set_draining();
    let reply = get(server.addr, "/healthz/ready").await;
    assert_eq!((reply.status, reply.body.as_str()), (500, "not ready, draining\n"));

    server.stop().await;
    manager.shutdown();
    run.await.unwrap();
}

#[test]
fn certificate_pending_names_the_identity_and_what_is_wrong() {
    let cart = SpiffeId::new(CART).unwrap();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let status = |not_after: Option<SystemTime>, last_error: Option<&str>| CertStatus {
        id: cart.clone(),
        not_after,
        next_refresh: None,
        pending: false,
        last_error: last_error.map(str::to_owned),
        current: None,
    };
    let pending = |s: Option<CertStatus>| admin::certificate_pending(&cart, s, now);
    // Not kept, or no fetch finished yet.
    assert_eq!(pending(None), Some(format!("workload certificate {CART}")));
    assert_eq!(
        pending(Some(status(None, None))),
        Some(format!("workload certificate {CART}"))
    );
    // The last fetch failed.
    assert_eq!(
        pending(Some(status(None, Some("CA unavailable")))),
        Some(format!("workload certificate {CART} (CA unavailable)"))
    );
    // Valid: nothing pending, even after a failed refresh.
    let later = now + Duration::from_secs(60);
    assert_eq!(pending(Some(status(Some(later), None))), None);
    assert_eq!(pending(Some(status(Some(later), Some("CA unavailable")))), None);
    // Expired: pending again, with the expiry.
    let earlier = now - Duration::from_secs(60);
    assert_eq!(
        pending(Some(status(Some(earlier), Some("expired")))),
        Some(format!("workload certificate {CART} (expired at 2025-06-15T15:05:40Z)"))
    );
}

#[test]
fn readiness_checks_come_and_go() {
    let readiness = Readiness::new();
    let present = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = present.clone();
    readiness.check(move || {
        (!seen.load(std::sync::atomic::Ordering::SeqCst)).then(|| "dedicated workload shop/cart".to_owned())
    });
    let blocker = readiness.block("listeners");
    assert_eq!(readiness.pending(), ["dedicated workload shop/cart", "listeners"]);
    blocker.ready();
    assert!(!readiness.is_ready());
    present.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(readiness.is_ready());
    // A condition that fails again makes the proxy unready again.
    present.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(readiness.pending(), ["dedicated workload shop/cart"]);
}

// ---------------------------------------------------------------------------------------------
// Admin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_shows_the_snapshot_and_the_certificates_with_their_expiry() {
    let loaded_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let published = Published::new(Snapshot::new(
        LocalConfig::parse(SHOP).unwrap(),
        1,
        Some(PathBuf::from("/etc/ztunnel/local.yaml")),
        loaded_at,
    ));
    let manager = manager();
    let driver = manager.clone();
    let run = tokio::spawn(async move { driver.run().await });
    let cart = SpiffeId::new(CART).unwrap();
    let handle = manager.get(&cart, Priority::Connection).await.unwrap();
    let not_after = handle.current().svid().not_after();

    let handler = AdminHandler::new(published.clone(), Arc::new(manager.clone()), ShutdownTrigger::new());
    let server = Server::start("admin", handler).await;

    let reply = get(server.addr, "/config_dump").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let dump = json(&reply);

    assert_eq!(dump["meshwire"]["config"]["generation"], 1);
    assert_eq!(dump["meshwire"]["config"]["source"], "/etc/ztunnel/local.yaml");
    assert_eq!(dump["meshwire"]["config"]["loadedAt"], "2025-06-15T15:06:40Z");

    let workloads = dump["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 1);
    assert_eq!(workloads[0]["uid"], "cluster1//v1/Pod/shop/cart-1");
    assert_eq!(workloads[0]["name"], "cart-1");
    assert_eq!(workloads[0]["spiffeId"], CART);
    assert_eq!(workloads[0]["workloadIps"][0], "10.0.0.2");
    assert_eq!(workloads[0]["protocol"], "HBONE");
    assert_eq!(workloads[0]["services"]["shop/cart.shop.svc.cluster.local"]["80"], 8080);

    let services = dump["services"].as_array().unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0]["hostname"], "cart.shop.svc.cluster.local");
    assert_eq!(services[0]["vips"][0], "/10.96.0.2");
    assert_eq!(services[0]["ports"]["80"], 8080);

    let policies = dump["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0]["name"], "allow-frontend");
    assert_eq!(policies[0]["namespace"], "shop");
    assert_eq!(policies[0]["action"], "Allow");

    let certificates = dump["certificates"].as_array().unwrap();
    assert_eq!(certificates.len(), 1, "{certificates:?}");
    let cert = &certificates[0];
    assert_eq!(cert["identity"], CART);
    assert_eq!(cert["state"], "Available");
    // ztunnel's shape, as `istioctl ztunnel-config certificates` reads it: the chain (leaf first)
    // and the roots, each with the base64 of its PEM, its decimal serial and its validity.
    let chain = cert["certChain"].as_array().expect("certChain");
    let roots = cert["rootCerts"].as_array().expect("rootCerts");
    assert!(!chain.is_empty() && !roots.is_empty(), "{cert}");
    for entry in chain.iter().chain(roots) {
        use base64::Engine as _;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(entry["pem"].as_str().expect("pem"))
            .expect("the pem is base64");
        let pem = String::from_utf8(pem).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
        let serial = entry["serialNumber"].as_str().unwrap();
        assert!(
            !serial.is_empty() && serial.chars().all(|c| c.is_ascii_digit()),
            "{serial}"
        );
        assert!(
            entry["validFrom"].as_str().unwrap() < entry["expirationTime"].as_str().unwrap(),
            "{entry}"
        );
    }
    assert_eq!(chain[0]["expirationTime"], admin::rfc3339(not_after).as_str());
    assert_eq!(cert["meshwire"]["expirationTime"], admin::rfc3339(not_after).as_str());
    let left = cert["meshwire"]["secondsToExpiry"].as_i64().unwrap();
    let expected = i64::try_from(not_after.duration_since(SystemTime::now()).unwrap().as_secs()).unwrap();
    assert!((expected - 5..=expected + 1).contains(&left), "{left} vs {expected}");
    // Refreshed at about half its lifetime: before it expires, after now.
    let next = cert["meshwire"]["nextRefresh"]
        .as_str()
        .expect("a refresh is scheduled");
    assert!(next > admin::rfc3339(SystemTime::now()).as_str(), "{next}");
    assert!(next < admin::rfc3339(not_after).as_str(), "{next}");
    assert_eq!(cert["meshwire"]["lastError"], Value::Null);

    // A new generation shows at once.
    published.publish(LocalConfig::default(), None, SystemTime::now());
    let dump = json(&get(server.addr, "/config_dump").await);
    assert_eq!(dump["meshwire"]["config"]["generation"], 2);
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 0);

    server.stop().await;
    manager.shutdown();
    run.await.unwrap();
}

/// A configuration of `count` workloads, each in a service, and a policy.
fn many_workloads(count: usize) -> LocalConfig {
    let mut yaml = String::from("workloads:\n");
    for i in 0..count {
        yaml.push_str(&format!(
            "- name: w-{i}\n  namespace: shop\n  serviceAccount: sa-{i}\n  workloadIps: [\"10.{}.{}.{}\"]\n  \
             protocol: HBONE\n  services:\n    \"shop/cart.shop.svc.cluster.local\": {{80: 8080}}\n",
            i / 65_536,
            (i / 256) % 256,
            i % 256
        ));
    }
    yaml.push_str(&SHOP[SHOP.find("services:\n- name").unwrap()..]);
    LocalConfig::parse(&yaml).unwrap()
}

#[test]
fn the_streamed_config_dump_is_the_document_byte_for_byte_in_bounded_chunks() {
    let now = Instant::now();
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    for (count, source) in [
        (0, None),
        (1, Some("/etc/ztunnel/local.yaml")),
        (3_000, Some("/x.yaml")),
    ] {
        let snapshot = Arc::new(Snapshot::new(many_workloads(count), 7, source.map(PathBuf::from), wall));
        let whole = serde_json::to_vec_pretty(&admin::config_dump(&snapshot, &[], now, wall)).unwrap();
        let chunks: Vec<_> = admin::config_dump_chunks(Arc::clone(&snapshot), &[], now, wall).collect();
        assert!(chunks.iter().all(|c| !c.is_empty()));
        // A chunk is cut after the item that reaches the chunk size.
        assert!(chunks.iter().all(|c| c.len() < admin::DUMP_CHUNK + 4_096), "{count}");
        let streamed: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(
            String::from_utf8_lossy(&streamed),
            String::from_utf8_lossy(&whole),
            "{count}"
        );
        let dump: Value = serde_json::from_slice(&streamed).unwrap();
        assert_eq!(dump["workloads"].as_array().unwrap().len(), count);
        if count == 3_000 {
            assert!(chunks.len() > 10, "{}", chunks.len());
            // Workloads are dumped by uid.
            assert!(
                dump["workloads"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w["name"] == "w-2999")
            );
            assert_eq!(dump["services"][0]["hostname"], "cart.shop.svc.cluster.local");
            assert_eq!(dump["policies"][0]["name"], "allow-frontend");
        }
    }
    // With the `istio` and `buffers` sections: still the document, keys in serde_json's order.
    let snapshot = Arc::new(Snapshot::new(many_workloads(2), 3, None, wall));
    let istio = serde_json::json!({ "xds": { "address": "istiod:15012", "connected": true } });
    let buffers = serde_json::json!({ "budget": 1 });
    let mut whole = admin::config_dump(&snapshot, &[], now, wall);
    whole["meshwire"]["istio"] = istio.clone();
    whole["meshwire"]["buffers"] = buffers.clone();
    let whole = serde_json::to_vec_pretty(&whole).unwrap();
    let streamed = admin::Body::Chunks(Box::new(
        admin::config_dump_chunks(snapshot, &[], now, wall)
            .with_istio(istio)
            .with_buffers(buffers),
    ))
    .collect();
    assert_eq!(String::from_utf8_lossy(&streamed), String::from_utf8_lossy(&whole));
    // An empty snapshot, before any configuration.
    let empty = Arc::new(Snapshot::empty());
    let whole = serde_json::to_vec_pretty(&admin::config_dump(&empty, &[], now, wall)).unwrap();
    let streamed = admin::Body::Chunks(Box::new(admin::config_dump_chunks(empty, &[], now, wall))).collect();
    assert_eq!(streamed, whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_config_dump_is_sent_chunked_and_complete() {
    let published = Published::new(Snapshot::new(many_workloads(5_000), 1, None, SystemTime::now()));
    let manager = manager();
    let handler = AdminHandler::new(published, Arc::new(manager.clone()), ShutdownTrigger::new());
    let server = Server::start("admin", handler).await;
    let reply = get(server.addr, "/config_dump").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let dump = json(&reply);
    let workloads = dump["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 5_000);
    assert!(workloads.iter().any(|w| w["name"] == "w-4999"));
    server.stop().await;
    manager.shutdown();
}

#[tokio::test]
async fn config_dump_before_any_configuration_and_certificate() {
    let manager = manager();
    // No driver: the warm-up stays queued.
    manager.warm_up(&SpiffeId::new(CART).unwrap());
    let handler = AdminHandler::new(Published::default(), Arc::new(manager.clone()), ShutdownTrigger::new());
    let server = Server::start("admin", handler).await;
    let dump = json(&get(server.addr, "/config_dump").await);
    assert_eq!(dump["meshwire"]["config"]["generation"], 0);
    assert_eq!(dump["meshwire"]["config"]["loadedAt"], Value::Null);
    assert_eq!(dump["workloads"], Value::Array(vec![]));
    assert_eq!(dump["certificates"][0]["state"], "Initializing");
    assert_eq!(dump["certificates"][0]["meshwire"]["expirationTime"], Value::Null);
    assert_eq!(dump["certificates"][0]["meshwire"]["pending"], true);
    assert_eq!(dump["certificates"][0]["certChain"], Value::Array(vec![]));
    server.stop().await;
}

#[test]
fn config_dump_says_expired_for_a_certificate_past_its_expiry() {
    let now = Instant::now();
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let status = |not_after: SystemTime| CertStatus {
        id: SpiffeId::new(CART).unwrap(),
        not_after: Some(not_after),
        next_refresh: None,
        pending: false,
        last_error: Some("the certificate expired".to_owned()),
        current: None,
    };
    let snapshot = Snapshot::new(LocalConfig::parse(SHOP).unwrap(), 1, None, wall);
    let dump = admin::config_dump(&snapshot, &[status(wall - Duration::from_secs(30))], now, wall);
    assert_eq!(dump["certificates"][0]["state"], "Expired");
    assert_eq!(dump["certificates"][0]["meshwire"]["secondsToExpiry"], -30);
    let dump = admin::config_dump(&snapshot, &[status(wall + Duration::from_secs(30))], now, wall);
    assert_eq!(dump["certificates"][0]["state"], "Available");
}

/// Installs the process's `tracing` subscriber, as the binary does: a reloadable filter. Only one
/// test of this file may call it (a process has one global subscriber).
fn reloadable(initial: &str) -> LogControl {
    let (filter, handle) = reload::Layer::new(EnvFilter::new(initial));
    Registry::default()
        .with(filter)
        .try_init()
        .expect("the only global subscriber of this test binary");
    LogControl::new(handle, initial)
}

/// Whether `target` logs at DEBUG and at INFO under the global subscriber.
fn enabled(target: &'static str) -> (bool, bool) {
    match target {
        "meshwire" => (
            tracing::enabled!(target: "meshwire", tracing::Level::DEBUG),
            tracing::enabled!(target: "meshwire", tracing::Level::INFO),
        ),
        _ => (
            tracing::enabled!(target: "h2", tracing::Level::DEBUG),
            tracing::enabled!(target: "h2", tracing::Level::INFO),
        ),
    }
}

#[tokio::test]
async fn logging_shows_and_merges_into_the_filter_and_refuses_an_invalid_one() {
    let logging = reloadable("info");
    let handler = AdminHandler::new(Published::default(), Arc::new(manager()), ShutdownTrigger::new())
        .with_logging(logging.clone());
    let server = Server::start("admin", handler).await;

    // As ztunnel: POST without parameters lists the filter; other methods are 405.
    let reply = post(server.addr, "/logging").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "current log level is info\n")
    );
    let reply = get(server.addr, "/logging").await;
    assert_eq!(reply.status, 405, "{reply:?}");
    assert_eq!(reply.header("allow"), Some("POST"));
    assert!(reply.body.starts_with("Invalid HTTP method\n"), "{}", reply.body);
    assert_eq!(enabled("meshwire"), (false, true));

    // Per-target directives, percent-encoded as a client sends them, merged into the filter.
    let reply = post(server.addr, "/logging?level=meshwire%3Ddebug%2Ch2%3Dwarn").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "current log level is info,meshwire=debug,h2=warn\n")
    );
    assert_eq!(enabled("meshwire"), (true, true), "the new filter is in force");
    assert_eq!(enabled("h2"), (false, false));
    // `access=warn` quiets one target and leaves the others as they were.
    let reply = post(server.addr, "/logging?level=access=warn").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "current log level is info,meshwire=debug,h2=warn,access=warn\n")
    );
    assert_eq!(enabled("meshwire"), (true, true), "merging did not silence the rest");
    // A directive for a target already named replaces it; a bare level replaces the default.
    let reply = post(server.addr, "/logging?level=h2%3Dinfo%2Cwarn").await;
    assert_eq!(
        reply.body,
        "current log level is warn,meshwire=debug,h2=info,access=warn\n"
    );
    assert_eq!(enabled("h2"), (false, true));

    // An invalid filter: 400 naming the problem; the old filter stays in force.
    let reply = post(server.addr, "/logging?level=meshwire=loud").await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.body.contains("invalid log filter \"meshwire=loud\""),
        "{}",
        reply.body
    );
    assert!(reply.body.contains("expected one of"), "{}", reply.body);
    assert!(
        reply.body.contains("stays warn,meshwire=debug,h2=info,access=warn"),
        "{}",
        reply.body
    );
    assert_eq!(logging.current(), "warn,meshwire=debug,h2=info,access=warn");
    assert_eq!(enabled("meshwire"), (true, true));

    let reply = post(server.addr, "/logging?level=").await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("empty log filter"), "{}", reply.body);

    // reset restores the initial filter; reset with a level merges into the initial one.
    let reply = post(server.addr, "/logging?reset").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "current log level is info\n")
    );
    assert_eq!(enabled("meshwire"), (false, true));
    let reply = post(server.addr, "/logging?reset&level=h2%3Ddebug").await;
    assert_eq!(reply.body, "current log level is info,h2=debug\n");
    assert_eq!(enabled("h2"), (true, true));

    let reply = request(server.addr, "PUT", "/logging?level=debug", &[]).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));
    assert_eq!(logging.current(), "info,h2=debug");
    server.stop().await;
}

#[tokio::test]
async fn logging_without_a_handle_is_501() {
    let handler = AdminHandler::new(Published::default(), Arc::new(manager()), ShutdownTrigger::new());
    let server = Server::start("admin", handler).await;
    assert_eq!(post(server.addr, "/logging").await.status, 501);
    server.stop().await;
}

#[tokio::test]
async fn quitquitquit_pulls_the_shutdown_trigger_on_post_only() {
    let trigger = ShutdownTrigger::new();
    let handler = AdminHandler::new(Published::default(), Arc::new(manager()), trigger.clone());
    let server = Server::start("admin", handler).await;

    let reply = get(server.addr, "/quitquitquit").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));
    assert!(!trigger.is_triggered());

    let reply = post(server.addr, "/quitquitquit").await;
    assert_eq!(reply.status, 200);
    let reason = tokio::time::timeout(Duration::from_secs(5), trigger.triggered())
        .await
        .expect("the trigger is pulled");
    assert_eq!(reason, "/quitquitquit");
    server.stop().await;
}

#[tokio::test]
async fn admin_index_lists_endpoints_and_unknown_paths_and_methods_are_refused() {
    let handler = AdminHandler::new(Published::default(), Arc::new(manager()), ShutdownTrigger::new());
    let server = Server::start("admin", handler).await;

    let reply = get(server.addr, "/").await;
    assert_eq!(reply.status, 200);
    for path in ["/config_dump", "/logging", "/quitquitquit"] {
        assert!(reply.body.contains(path), "{}", reply.body);
    }
    let reply = get(server.addr, "/nope").await;
    assert_eq!((reply.status, reply.body.as_str()), (404, "no such endpoint: /nope\n"));
    assert_eq!(get(server.addr, "/config_dump/x").await.status, 404);
    let reply = post(server.addr, "/config_dump").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    assert_eq!(request(server.addr, "DELETE", "/", &[]).await.status, 405);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Metrics

#[tokio::test]
async fn metrics_render_the_counters_with_the_negotiated_content_type() {
    let metrics = Arc::new(Metrics::new());
    let connection = metrics.open(ConnectionLabels::new(Reporter::Destination, SecurityPolicy::MutualTls));
    connection.record_received(10);
    connection.record_sent(100);
    let _summary = connection.finish(ResponseFlags::None);
    let server = Server::start("metrics", MetricsHandler::new(metrics.clone())).await;

    for path in ["/metrics", "/stats/prometheus"] {
        let reply = get(server.addr, path).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(TEXT_CONTENT_TYPE));
        let line = |family: &str| {
            reply
                .body
                .lines()
                .find(|l| l.starts_with(&format!("{family}{{reporter=\"destination\",")))
                .unwrap_or_else(|| panic!("no {family} in\n{}", reply.body))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(line("istio_tcp_connections_opened_total"), "1");
        assert_eq!(line("istio_tcp_connections_closed_total"), "1");
        assert_eq!(line("istio_tcp_received_bytes_total"), "10");
        assert_eq!(line("istio_tcp_sent_bytes_total"), "100");
        assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);
    }

    let reply = request(
        server.addr,
        "GET",
        "/metrics",
        &[("Accept", "application/openmetrics-text;version=1.0.0,text/plain;q=0.5")],
    )
    .await;
    assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    let reply = request(server.addr, "GET", "/stats/prometheus", &[("Accept", "text/plain")]).await;
    assert_eq!(reply.header("content-type"), Some(TEXT_CONTENT_TYPE));

    assert_eq!(get(server.addr, "/").await.status, 404);
    assert_eq!(get(server.addr, "/metricsx").await.status, 404);
    assert!(
        !get(server.addr, "/metrics").await.body.contains("istio_build"),
        "gauges only with_config"
    );
    let reply = post(server.addr, "/metrics").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    server.stop().await;
}

#[tokio::test]
async fn metrics_with_config_add_the_build_and_config_generation_gauges() {
    let metrics = Arc::new(Metrics::new());
    let _open = metrics.open(ConnectionLabels::new(Reporter::Source, SecurityPolicy::MutualTls));
    let published = Published::new(Snapshot::new(
        LocalConfig::parse(SHOP).unwrap(),
        1,
        None,
        SystemTime::now(),
    ));
    let server = Server::start("metrics", MetricsHandler::new(metrics).with_config(published.clone())).await;

    let body = get(server.addr, "/metrics").await.body;
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        body.lines()
            .any(|l| l == format!("istio_build{{component=\"ztunnel\",tag=\"{version}\"}} 1")),
        "{body}"
    );
    assert!(body.lines().any(|l| l == "meshwire_config_generation 1"), "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"source\",") && l.ends_with(" 1")),
        "{body}"
    );
    assert_eq!(body.matches("# EOF").count(), 1, "{body}");
    assert!(body.ends_with("# EOF\n"));

    published.publish(LocalConfig::default(), None, SystemTime::now());
    let body = get(server.addr, "/stats/prometheus").await.body;
    assert!(body.lines().any(|l| l == "meshwire_config_generation 2"), "{body}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test]
async fn a_server_stops_with_its_shutdown_future_despite_idle_keep_alive_connections() {
    let server = Server::start("readiness", ReadinessHandler::new(Readiness::new())).await;
    let addr = server.addr;
    // A keep-alive connection that has made one request and stays open.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"));

    let started = Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < admin::SHUTDOWN_GRACE,
        "an idle connection is closed at once"
    );
    // The idle connection was closed and the listener is gone.
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Handlers without sockets

#[test]
fn handlers_answer_without_a_server() {
    let readiness = Readiness::new();
    let blocker = readiness.block("listeners");
    let handler = ReadinessHandler::new(readiness.clone());
    let request = http::Request::get("/healthz/ready").body(()).unwrap();
    assert_eq!(handler.handle(&request).status(), 500);
    drop(blocker);
    assert_eq!(handler.handle(&request).status(), 200);
}
