//! The certificate manager in virtual time: refresh at half-life, back-off on failure,
//! de-duplicated fetches, priorities under a fetch budget, forget, and rotation under live
//! TLS connections.
#![allow(clippy::unwrap_used, missing_docs)]
#![cfg(feature = "local-ca")]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::{ScriptedSource, TestTimer, id, settle};
use meshwire_identity::manager::{CertError, CertManager, ManagerConfig, Priority};
use meshwire_identity::source::SourceError;
use meshwire_identity::time::Timer;
use meshwire_identity::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Manager = CertManager<Arc<ScriptedSource>, TestTimer>;

fn start(source: ScriptedSource, config: ManagerConfig) -> (Manager, Arc<ScriptedSource>) {
    let source = Arc::new(source);
    let manager = CertManager::new(
        source.clone(),
        source.timer.clone(),
        ManagerConfig {
            seed: Some(7),
            ..config
        },
    );
    let driver = manager.clone();
    tokio::spawn(async move { driver.run().await });
    (manager, source)
}

/// The service accounts of the fetches, in the order the source started them.
fn started_order(source: &ScriptedSource) -> Vec<String> {
    source
        .started
        .lock()
        .unwrap()
        .iter()
        .map(|i| i.path().rsplit('/').next().unwrap().to_owned())
        .collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn refreshes_at_half_life_and_swaps_the_certificate() {
    let timer = TestTimer::new();
    let lifetime = Duration::from_secs(3600);
    let (manager, source) = start(ScriptedSource::new(timer.clone(), lifetime), ManagerConfig::default());
    let alice = id("alice");

    let handle = manager.get(&alice, Priority::Connection).await.unwrap();
    let first = handle.current();
    assert_eq!(source.fetch_count(), 1);
    let nb = first.svid().not_before();
    let half = nb + first.svid().lifetime() / 2;

    // Several refresh cycles: each refresh happens within +-5 % of the lifetime around half-life.
    let mut previous = first.clone();
    for cycle in 1..=3 {
        let deadline = previous.svid().not_before() + previous.svid().lifetime().mul_f64(0.53);
        while timer.system_now() < deadline {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        settle().await;
        assert_eq!(
            source.fetch_count(),
            1 + cycle,
            "cycle {cycle}: one refresh per half-life"
        );
        let rec = source.records().last().cloned().unwrap();
        let p = previous.svid();
        let at = rec.at.duration_since(p.not_before()).unwrap();
        let frac = secs(at) / secs(p.lifetime());
        assert!(
            (0.47..=0.53).contains(&frac),
            "cycle {cycle}: refreshed at {frac:.3} of the lifetime"
        );
        let now = handle.current();
        assert!(
            !now.svid().same_chain(previous.svid()),
            "the handle yields the new certificate"
        );
        assert!(now.svid().not_after() > previous.svid().not_after());
        previous = now;
    }
    // Before the first half-life, nothing was fetched again.
    assert!(source.records()[1].at >= half - lifetime.mul_f64(0.03));
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_keeps_the_valid_certificate_and_backs_off() {
    let timer = TestTimer::new();
    let lifetime = Duration::from_secs(4 * 3600);
    let (manager, source) = start(ScriptedSource::new(timer.clone(), lifetime), ManagerConfig::default());
    let bob = id("bob");
    let handle = manager.get(&bob, Priority::Connection).await.unwrap();
    let original = handle.current();

    source.fail.store(true, Ordering::SeqCst);
    // Past half-life plus enough time for the back-off to reach its cap (~0.5+1+...+128+150*k s).
    let until = original.svid().not_before() + lifetime / 2 + Duration::from_secs(1400);
    while timer.system_now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    settle().await;

    let failures: Vec<SystemTime> = source.records().iter().filter(|r| !r.ok).map(|r| r.at).collect();
    assert!(
        failures.len() >= 10,
        "retried with back-off: {} attempts",
        failures.len()
    );
    let gaps: Vec<f64> = failures
        .windows(2)
        .map(|w| secs(w[1].duration_since(w[0]).unwrap()))
        .collect();
    // 500 ms doubling, +-20 %, capped at 150 s (+-20 %). `sleep(1 s)` steps blur the very first gaps by up to 1 s.
    let mut expected = 0.5f64;
    for (i, gap) in gaps.iter().enumerate() {
        let (lo, hi) = (expected * 0.8 - 1.0, expected * 1.2 + 1.0);
        assert!(
            *gap >= lo && *gap <= hi,
            "gap {i} is {gap:.2}s, expected {expected}s +-20%: {gaps:?}"
        );
        expected = (expected * 2.0).min(150.0);
    }
    assert!(
        gaps.last().copied().unwrap() >= 150.0 * 0.8 - 1.0,
        "back-off reaches its cap: {gaps:?}"
    );

    // Through all of it the still-valid certificate stays in service and `get` answers at once.
    assert!(handle.current().svid().same_chain(original.svid()));
    let again = manager.get(&bob, Priority::Connection).await.unwrap();
    assert!(again.current().svid().same_chain(original.svid()));
    let status = manager.status();
    assert!(
        status[0].last_error.as_deref().unwrap().contains("CA unavailable"),
        "{status:?}"
    );

    // Recovery: the next retry succeeds, the certificate rotates, and back-off is reset.
    source.fail.store(false, Ordering::SeqCst);
    let before = source.fetch_count();
    tokio::time::sleep(Duration::from_secs(200)).await;
    settle().await;
    assert_eq!(source.fetch_count(), before + 1);
    assert!(!handle.current().svid().same_chain(original.svid()));
    assert!(manager.status()[0].last_error.is_none());
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn a_certificate_that_expires_while_the_source_fails_is_an_error() {
    let timer = TestTimer::new();
    let lifetime = Duration::from_secs(600);
    let (manager, source) = start(ScriptedSource::new(timer.clone(), lifetime), ManagerConfig::default());
    let carol = id("carol");
    let handle = manager.get(&carol, Priority::Connection).await.unwrap();
    source.fail.store(true, Ordering::SeqCst);
    let expiry = handle.current().svid().not_after();
    while timer.system_now() <= expiry + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let err = manager.get(&carol, Priority::Connection).await.unwrap_err();
    assert!(
        matches!(&err, CertError::Source { id, source } if *id == carol && matches!(**source, SourceError::Authority { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains(&carol.to_string()),
        "the error names the identity: {err}"
    );
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn callers_do_not_bypass_the_back_off_of_a_failing_certificate() {
    let timer = TestTimer::new();
    let source = ScriptedSource::new(timer.clone(), Duration::from_secs(3600));
    source.fail.store(true, Ordering::SeqCst);
    let (manager, source) = start(source, ManagerConfig::default());
    let erin = id("erin");

    // A connection every 100 ms and a warm-up every second (a readiness probe), for 60 s.
    let first = manager.get(&erin, Priority::Connection).await.unwrap_err();
    assert!(matches!(&first, CertError::Source { .. }), "{first}");
    for tick in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tick % 10 == 0 {
            manager.warm_up(&erin);
        }
        let err = manager.get(&erin, Priority::Connection).await.unwrap_err();
        assert!(err.to_string().contains("CA unavailable"), "{err}");
    }
    settle().await;

    // Only the scheduled retries reached the source: 500 ms doubling (+-20 %) from the first
    // failure, about 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s.
    let attempts: Vec<SystemTime> = source.records().iter().map(|r| r.at).collect();
    assert!(
        (6..=8).contains(&attempts.len()),
        "{} fetches in 60 s: {attempts:?}",
        attempts.len()
    );
    let mut expected = 0.5f64;
    for (i, gap) in attempts
        .windows(2)
        .map(|w| secs(w[1].duration_since(w[0]).unwrap()))
        .enumerate()
    {
        assert!(
            gap >= expected * 0.8 - 0.11,
            "retry {i} after {gap:.2} s, the back-off was {expected} s +-20 %"
        );
        expected *= 2.0;
    }
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn a_one_minute_certificate_of_the_local_ca_is_refreshed_at_half_life() {
    let timer = TestTimer::new();
    let lifetime = Duration::from_secs(60);
    let (manager, source) = start(ScriptedSource::new(timer.clone(), lifetime), ManagerConfig::default());
    let fred = id("fred");
    let handle = manager.get(&fred, Priority::Connection).await.unwrap();
    let issued = timer.system_now();
    let until = issued + Duration::from_secs(300);
    while timer.system_now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            handle.current().svid().not_after() > timer.system_now(),
            "the certificate in service expired"
        );
    }
    settle().await;
    // Every 27 s or so (the middle of 60 s back-dated by 6 s), not continuously.
    let at: Vec<SystemTime> = source.records().iter().map(|r| r.at).collect();
    assert!((10..=13).contains(&at.len()), "{} fetches in 300 s", at.len());
    for gap in at.windows(2).map(|w| secs(w[1].duration_since(w[0]).unwrap())) {
        assert!((23.0..=32.0).contains(&gap), "refreshed after {gap:.1} s: {at:?}");
    }
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_requests_cause_one_fetch() {
    let timer = TestTimer::new();
    let (source, gate) = ScriptedSource::new(timer, Duration::from_secs(3600)).gated();
    let (manager, source) = start(source, ManagerConfig::default());
    let dave = id("dave");
    let spawn = |n: usize| -> Vec<_> {
        (0..n)
            .map(|_| {
                let m = manager.clone();
                let d = dave.clone();
                tokio::spawn(async move { m.get(&d, Priority::Connection).await })
            })
            .collect()
    };
    // Two waves: the first finds the identity unknown, the second arrives while its fetch runs.
    let mut tasks = spawn(50);
    settle().await;
    assert_eq!(source.fetch_count(), 1);
    tasks.extend(spawn(50));
    settle().await;
    assert_eq!(source.fetch_count(), 1, "one fetch while 100 callers wait");
    gate.add_permits(1);
    let mut leaves = Vec::new();
    for t in tasks {
        leaves.push(t.await.unwrap().unwrap().current().svid().leaf().clone());
    }
    assert!(
        leaves.iter().all(|l| *l == leaves[0]),
        "every caller got the same certificate"
    );
    assert_eq!(source.fetch_count(), 1);
    manager.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_several_threads_cause_one_fetch_per_identity() {
    let timer = TestTimer::new();
    let (manager, source) = start(
        ScriptedSource::new(timer, Duration::from_secs(3600)),
        ManagerConfig::default(),
    );
    let ids: Vec<_> = (0..5).map(|i| id(&format!("w{i}"))).collect();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let m = manager.clone();
            let d = ids[i % ids.len()].clone();
            tokio::spawn(async move {
                m.get(&d, Priority::Connection)
                    .await
                    .map(|h| h.current().svid().leaf().clone())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(source.fetch_count(), ids.len());
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn priorities_are_honoured_under_a_fetch_budget() {
    let timer = TestTimer::new();
    let (source, gate) = ScriptedSource::new(timer.clone(), Duration::from_secs(600)).gated();
    let (manager, source) = start(
        source,
        ManagerConfig {
            max_in_flight: 1,
            ..ManagerConfig::default()
        },
    );

    // `refresher` gets a certificate, which will come due for refresh.
    gate.add_permits(1);
    let refresher = id("refresher");
    manager.get(&refresher, Priority::Connection).await.unwrap();

    // `blocker` takes the only fetch slot and holds it.
    let m = manager.clone();
    let blocker = tokio::spawn(async move { m.get(&id("blocker"), Priority::Connection).await });
    settle().await;
    assert_eq!(source.fetch_count(), 2);

    // While it is held: the refresh comes due, a warm-up is asked, then a connection waits.
    tokio::time::sleep(Duration::from_secs(400)).await;
    manager.warm_up(&id("warm"));
    let m = manager.clone();
    let conn = tokio::spawn(async move { m.get(&id("conn"), Priority::Connection).await });
    settle().await;
    assert_eq!(source.fetch_count(), 2, "the budget of one fetch is respected");

    for _ in 0..4 {
        gate.add_permits(1);
        settle().await;
    }
    blocker.await.unwrap().unwrap();
    conn.await.unwrap().unwrap();
    let order = started_order(&source);
    assert_eq!(
        order,
        ["refresher", "blocker", "conn", "warm", "refresher"],
        "connection, then warm-up, then refresh"
    );
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn a_waiting_connection_promotes_a_queued_warm_up() {
    let timer = TestTimer::new();
    let (source, gate) = ScriptedSource::new(timer, Duration::from_secs(600)).gated();
    let (manager, source) = start(
        source,
        ManagerConfig {
            max_in_flight: 1,
            ..ManagerConfig::default()
        },
    );
    let m = manager.clone();
    let blocker = tokio::spawn(async move { m.get(&id("blocker"), Priority::Connection).await });
    settle().await;
    manager.warm_up(&id("a"));
    manager.warm_up(&id("b"));
    let m = manager.clone();
    let b_conn = tokio::spawn(async move { m.get(&id("b"), Priority::Connection).await });
    settle().await;
    for _ in 0..3 {
        gate.add_permits(1);
        settle().await;
    }
    blocker.await.unwrap().unwrap();
    b_conn.await.unwrap().unwrap();
    let order = started_order(&source);
    assert_eq!(order, ["blocker", "b", "a"]);
    assert_eq!(source.fetch_count(), 3, "the promoted warm-up was not fetched twice");
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn forget_ends_waits_and_refreshes() {
    let timer = TestTimer::new();
    let (source, gate) = ScriptedSource::new(timer, Duration::from_secs(600)).gated();
    let (manager, source) = start(source, ManagerConfig::default());
    let erin = id("erin");
    let m = manager.clone();
    let e = erin.clone();
    let waiting = tokio::spawn(async move { m.get(&e, Priority::Connection).await });
    settle().await;
    manager.forget(&erin);
    let err = waiting.await.unwrap().unwrap_err();
    assert!(matches!(&err, CertError::Forgotten { id } if *id == erin), "{err}");
    gate.add_permits(1);
    settle().await;
    assert!(
        manager.handle(&erin).is_none(),
        "a fetch that completes after forget is dropped"
    );

    // A kept identity is refreshed; a forgotten one no longer is.
    gate.add_permits(100);
    let frank = id("frank");
    let handle = manager.get(&frank, Priority::Connection).await.unwrap();
    let count = source.fetch_count();
    manager.forget(&frank);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    settle().await;
    assert_eq!(source.fetch_count(), count);
    // The handle given out earlier keeps its last certificate.
    assert_eq!(handle.current().svid().spiffe_id(), &frank);
    assert!(manager.status().is_empty());
    manager.shutdown();
}

/// A certificate in service is handed out as it is (no fetch, and no wait on the manager's
/// lock), but never once its identity was forgotten, once it expired, or after shutdown.
#[tokio::test(start_paused = true)]
async fn a_certificate_in_service_is_handed_out_until_forgotten_expired_or_shut_down() {
    let timer = TestTimer::new();
    let lifetime = Duration::from_secs(600);
    let (manager, source) = start(ScriptedSource::new(timer.clone(), lifetime), ManagerConfig::default());
    let hana = id("hana");
    let first = manager.get(&hana, Priority::Connection).await.unwrap();
    for _ in 0..3 {
        let again = manager.get(&hana, Priority::Connection).await.unwrap();
        assert!(again.current().svid().same_chain(first.current().svid()));
    }
    assert_eq!(source.fetch_count(), 1, "a certificate in service is not fetched again");

    // Forgotten: the next get fetches a new certificate rather than handing out the old slot.
    manager.forget(&hana);
    let after = manager.get(&hana, Priority::Connection).await.unwrap();
    assert_eq!(source.fetch_count(), 2);
    assert!(!after.current().svid().same_chain(first.current().svid()));

    // Expired, the CA failing since: the expired certificate is not handed out.
    source.fail.store(true, Ordering::SeqCst);
    let expiry = after.current().svid().not_after();
    while timer.system_now() <= expiry {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    settle().await;
    let err = manager.get(&hana, Priority::Connection).await.unwrap_err();
    assert!(!matches!(err, CertError::Shutdown), "{err}");

    // In service again, then shut down: no certificate is handed out any more.
    source.fail.store(false, Ordering::SeqCst);
    let ivan = id("ivan");
    manager.get(&ivan, Priority::Connection).await.unwrap();
    manager.shutdown();
    let err = manager.get(&ivan, Priority::Connection).await.unwrap_err();
    assert!(matches!(err, CertError::Shutdown), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_identity_is_refused() {
    let timer = TestTimer::new();
    let source = ScriptedSource::new(timer, Duration::from_secs(600));
    source.wrong_identity.store(true, Ordering::SeqCst);
    let (manager, _source) = start(source, ManagerConfig::default());
    let err = manager.get(&id("gina"), Priority::Connection).await.unwrap_err();
    assert!(
        matches!(&err, CertError::WrongIdentity { requested, delivered }
        if *requested == id("gina") && delivered.path() == "/ns/other/sa/impostor"),
        "{err}"
    );
    manager.shutdown();
    let err = manager.get(&id("gina"), Priority::Connection).await.unwrap_err();
    assert!(matches!(err, CertError::Shutdown));
}

#[tokio::test(start_paused = true)]
async fn connections_established_before_a_rotation_keep_working() {
    let timer = TestTimer::with_real_wall();
    let (manager, source) = start(
        ScriptedSource::new(timer.clone(), Duration::from_secs(3600)),
        ManagerConfig::default(),
    );
    let server_id = id("server");
    let client_id = id("client");
    let server = manager.get(&server_id, Priority::Connection).await.unwrap();
    let client = manager.get(&client_id, Priority::Connection).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An echo server that takes the current server config for every new connection.
    let srv = server.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(srv.current().server_config().clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let connect = |client: meshwire_identity::manager::CertHandle, expected| async move {
        let cfg = client.current().client_config(vec![expected]).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(cfg)
            .connect(tls::server_name(), tcp)
            .await
            .unwrap()
    };
    let mut old = connect(client.clone(), server_id.clone()).await;
    let old_leaf = old.get_ref().1.peer_certificates().unwrap()[0].clone();
    let echo = |s: &'static [u8]| s;
    old.write_all(echo(b"before")).await.unwrap();
    let mut buf = [0u8; 6];
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");

    // Rotate both identities.
    let fetches = source.fetch_count();
    // Virtual monotonic time moves past half-life (the wall clock is real, as rustls reads it).
    tokio::time::sleep(server.current().svid().lifetime().mul_f64(0.56)).await;
    settle().await;
    assert!(source.fetch_count() >= fetches + 2, "both certificates rotated");
    assert!(server.current().svid().leaf() != &old_leaf);

    // The old connection still carries data both ways.
    old.write_all(b"after!").await.unwrap();
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    // A new connection is made with the new certificates.
    let mut new = connect(client.clone(), server_id.clone()).await;
    let new_leaf = new.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(&new_leaf, server.current().svid().leaf());
    assert_ne!(new_leaf, old_leaf);
    new.write_all(b"fresh!").await.unwrap();
    new.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"fresh!");
    manager.shutdown();
}

#[test]
fn manager_futures_are_send_over_send_sources() {
    fn assert_send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let timer = TestTimer::new();
    let source = Arc::new(ScriptedSource::new(timer.clone(), Duration::from_secs(60)));
    let manager = CertManager::new(source, timer, ManagerConfig::default());
    let who = id("h");
    assert_send(&manager.run());
    assert_send(&manager.get(&who, Priority::Connection));
}
