//! The connection pool over real sockets and real mTLS: streams per connection, one handshake per
//! key, the peer's stream limit, idle release, retirement on GOAWAY and on unanswered PINGs, and
//! one failed handshake reported to every waiter.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use meshwire_hbone::client::ConnectRequest;
use meshwire_hbone::headers::Authority;
use meshwire_hbone::pool::{Connector, Pool, PoolConfig, PoolKey};
use meshwire_hbone::rt::Timer;
use meshwire_hbone::server::ServeOptions;
use meshwire_hbone::{ConnectError, Settings};
use meshwire_rt::TokioExecutor;
use meshwire_testkit::data::*;
use meshwire_testkit::net::*;
use meshwire_testkit::pki::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);

/// The real clock, plus an offset the test can move forward (idle release without waiting).
#[derive(Clone, Default)]
struct JumpTimer(Arc<AtomicU64>);

impl JumpTimer {
    fn jump(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
    fn offset(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
}

impl Timer for JumpTimer {
    type Sleep = tokio::time::Sleep;
    fn now(&self) -> Instant {
        Instant::now() + self.offset()
    }
    fn system_now(&self) -> SystemTime {
        SystemTime::now() + self.offset()
    }
    fn sleep_until(&self, deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.checked_sub(self.offset()).unwrap_or_else(Instant::now).into())
    }
}

/// Connects plain TCP to the key's destination and uses the fixture's client config.
struct TcpConnector {
    tls: Arc<rustls::ClientConfig>,
}

impl Connector for TcpConnector {
    type Io = TcpStream;
    async fn connect(&self, key: &PoolKey) -> Result<(TcpStream, Arc<rustls::ClientConfig>), ConnectError> {
        let tcp = TcpStream::connect(key.destination)
            .await
            .map_err(|e| ConnectError::Tcp {
                peer: key.destination,
                source: Arc::new(e),
            })?;
        Ok((tcp, self.tls.clone()))
    }
}

type TestPool = Pool<TcpConnector, TokioExecutor, JumpTimer>;

fn pool(pki: &Pki, config: PoolConfig) -> (TestPool, JumpTimer) {
    let timer = JumpTimer::default();
    (
        Pool::new(
            TcpConnector {
                tls: pki.client_tls.clone(),
            },
            TokioExecutor::new(),
            timer.clone(),
            config,
        ),
        timer,
    )
}

fn key(dest: SocketAddr) -> PoolKey {
    PoolKey::new(id(CLIENT), vec![id(SERVER)], dest, None)
}

fn to(addr: SocketAddr) -> ConnectRequest {
    ConnectRequest::new(Authority::parse(&addr.to_string()).unwrap())
}

/// Opens `n` streams at once and holds them all open; returns them.
async fn open_many(pool: &TestPool, key: &PoolKey, echo: SocketAddr, n: usize) -> Vec<meshwire_hbone::Tunnel> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move { pool.connect(&key, &to(echo)).await })
        })
        .collect();
    let mut tunnels = Vec::new();
    for t in tasks {
        tunnels.push(
            timeout(LIMIT, t)
                .await
                .unwrap()
                .unwrap()
                .map_err(|e| e.to_string())
                .unwrap(),
        );
    }
    tunnels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_use_ten_connections() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let (pool, _) = pool(&pki, PoolConfig::default());
    let k = key(server.addr);
    let mut tunnels = open_many(&pool, &k, echo, 1000).await;
    assert_eq!(pool.connections(&k), 10, "ceil(1000 / 100) connections");
    assert_eq!(pool.handshakes(), 10, "no handshake beyond the ten needed");
    // Every stream works.
    for (i, t) in tunnels.iter_mut().enumerate().step_by(97) {
        let msg = format!("stream {i}");
        t.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        t.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    // Closed streams give their place back: new streams reuse the connections.
    tunnels.truncate(900);
    drop(tunnels);
    let again = open_many(&pool, &k, echo, 100).await;
    assert_eq!(pool.handshakes(), 10);
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_for_a_new_key_cause_one_handshake() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let (pool, _) = pool(
        &pki,
        PoolConfig {
            max_streams_per_connection: 1000,
            ..PoolConfig::default()
        },
    );
    let k = key(server.addr);
    let tunnels = open_many(&pool, &k, echo, 200).await;
    assert_eq!(pool.handshakes(), 1);
    assert_eq!(pool.connections(&k), 1);
    drop(tunnels);
}

#[tokio::test]
async fn the_peers_stream_limit_is_respected() {
    let pki = Pki::new();
    let options = ServeOptions {
        settings: Settings::builder().max_concurrent_streams(10).build().unwrap(),
        ..Default::default()
    };
    let server = hbone_server(&pki, options).await;
    let echo = echo_server().await;
    let (pool, _) = pool(&pki, PoolConfig::default());
    let k = key(server.addr);
    // The first stream teaches the client the server's SETTINGS.
    let first = pool.connect(&k, &to(echo)).await.unwrap();
    let rest = open_many(&pool, &k, echo, 39).await;
    assert_eq!(pool.connections(&k), 4, "40 streams at 10 per connection");
    drop((first, rest));
}

#[tokio::test]
async fn a_failed_handshake_is_reported_to_every_waiter() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let timer = JumpTimer::default();
    // The client expects another identity: every handshake fails.
    let wrong = pki.client_expecting("spiffe://cluster.local/ns/default/sa/other");
    let pool: TestPool = Pool::new(
        TcpConnector { tls: wrong },
        TokioExecutor::new(),
        timer,
        PoolConfig::default(),
    );
    let k = key(server.addr);
    let echo = echo_server().await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (pool, k) = (pool.clone(), k.clone());
            tokio::spawn(async move { pool.connect(&k, &to(echo)).await })
        })
        .collect();
    let mut tls_errors = 0;
    for t in tasks {
        match t.await.unwrap() {
            Err(ConnectError::Tls { .. }) => tls_errors += 1,
            other => panic!("expected the handshake's TLS error, got {other:?}"),
        }
    }
    assert_eq!(tls_errors, 50);
    assert!(
        pool.handshakes() < 50,
        "waiters shared handshakes: {}",
        pool.handshakes()
    );
}

#[tokio::test]
async fn a_waiter_learns_that_its_handshake_was_abandoned() {
    let pki = Pki::new();
    // A peer that never answers: the handshake waits until its leader is dropped.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pool, _timer) = pool(&pki, PoolConfig::default());
    let k = key(silent.local_addr().unwrap());
    let request = to(silent.local_addr().unwrap());
    let mut leader = Box::pin(pool.connect(&k, &request));
    let mut waiter = Box::pin(pool.connect(&k, &request));
    assert!(leader.as_mut().now_or_never().is_none());
    assert!(waiter.as_mut().now_or_never().is_none());
    drop(leader);
    match timeout(LIMIT, waiter).await.unwrap() {
        Err(e @ ConnectError::HandshakeAbandoned) => assert!(e.to_string().contains("abandoned"), "{e}"),
        other => panic!("expected an abandoned handshake, got {other:?}"),
    }
}

#[tokio::test]
async fn idle_connections_are_released_after_the_idle_timeout() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let (pool, timer) = pool(&pki, PoolConfig::default());
    let k = key(server.addr);
    let t = pool.connect(&k, &to(echo)).await.unwrap();
    timer.jump(Duration::from_secs(600));
    assert_eq!(pool.release_idle(), 1, "a connection with an open stream is kept");
    drop(t);
    assert_eq!(pool.release_idle(), 1, "idle from now on");
    timer.jump(Duration::from_secs(299));
    assert_eq!(pool.release_idle(), 1, "not yet idle for 5 minutes");
    timer.jump(Duration::from_secs(2));
    assert_eq!(pool.release_idle(), 0, "released after 5 minutes idle");
    // The next stream makes a new connection.
    let _t = pool.connect(&k, &to(echo)).await.unwrap();
    assert_eq!(pool.handshakes(), 2);
}

/// A burst of streams opens several connections to one peer; once it is over, all but one go
/// after the surplus idle timeout (and the peer sees them close), and the last one stays for the
/// idle timeout.
#[tokio::test]
async fn a_bursts_surplus_connections_go_soon_after_it_and_one_stays_warm() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let config = PoolConfig {
        max_streams_per_connection: 2,
        ..PoolConfig::default()
    };
    let (pool, timer) = pool(&pki, config.clone());
    let k = key(server.addr);
    let mut tunnels = open_many(&pool, &k, echo, 6).await;
    assert_eq!(pool.connections(&k), 3, "a burst of 6 streams, 2 per connection");

    // One stream stays: its connection is kept whatever the timeouts, the two idle ones go.
    let kept = tunnels.remove(0);
    drop(tunnels);
    assert_eq!(pool.release_idle(), 3, "idle from now on");
    timer.jump(config.surplus_idle_timeout - Duration::from_millis(1));
    assert_eq!(pool.release_idle(), 3, "not yet idle for the surplus timeout");
    timer.jump(Duration::from_millis(2));
    assert_eq!(pool.release_idle(), 1, "the surplus idle connections released");
    timeout(LIMIT, async {
        while server.open_connections() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the peer sees the released connections close");

    // The last connection, idle, stays for the idle timeout and carries the next stream.
    drop(kept);
    assert_eq!(pool.release_idle(), 1, "idle from now on");
    timer.jump(config.surplus_idle_timeout * 10);
    assert_eq!(pool.release_idle(), 1, "the last connection of a key is kept warm");
    let _t = pool.connect(&k, &to(echo)).await.unwrap();
    assert_eq!(pool.handshakes(), 3, "no handshake for the next stream");
    drop(_t);
    assert_eq!(pool.release_idle(), 1);
    timer.jump(config.idle_timeout + Duration::from_secs(1));
    assert_eq!(pool.release_idle(), 0, "released after the idle timeout");
}

#[tokio::test]
async fn a_draining_peer_retires_the_connection() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let (pool, _) = pool(&pki, PoolConfig::default());
    let k = key(server.addr);
    drop(pool.connect(&k, &to(echo)).await.unwrap());
    server.shutdown.send(true).unwrap();
    timeout(LIMIT, async {
        while pool.connections(&k) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the GOAWAY retires the connection");
    // The server still accepts new connections (only old ones drain); the pool makes one.
    server.shutdown.send(false).unwrap();
    let mut t = pool.connect(&k, &to(echo)).await.unwrap();
    t.write_all(b"x").await.unwrap();
    assert_eq!(pool.handshakes(), 2);
}

/// A TCP relay that can be frozen: it stops forwarding in both directions.
async fn freezable_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            let outbound = TcpStream::connect(target).await.unwrap();
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            type R = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
            type W = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
            let pairs: [(R, W); 2] = [(Box::new(ir), Box::new(ow)), (Box::new(or), Box::new(iw))];
            for (mut r, mut w) in pairs {
                let f = f.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while f.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, frozen)
}

#[tokio::test]
async fn unanswered_pings_retire_the_connection() {
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let (relay, frozen) = freezable_relay(server.addr).await;
    let settings = Settings::builder()
        .ping_interval(Duration::from_millis(100))
        .ping_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (pool, _) = pool(
        &pki,
        PoolConfig {
            settings,
            ..PoolConfig::default()
        },
    );
    let k = key(relay);
    drop(pool.connect(&k, &to(echo)).await.unwrap());
    // Pings are answered while the path works: the connection lives through several intervals.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.connections(&k), 1);
    frozen.store(true, Ordering::SeqCst);
    timeout(LIMIT, async {
        while pool.connections(&k) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the connection is retired after the ping timeout");
}

/// The pool's connections lease their receive windows from the budget it is given: the first takes
/// what it wants (up to the budget), the next one, with the budget spent, works on HTTP/2's default
/// window, and the leases go back when the connections are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_lease_their_windows_and_give_them_back() {
    use meshwire_hbone::budget::BufferBudget;
    const BUDGET: usize = 1 << 20;
    let pki = Pki::new();
    let server = hbone_server(&pki, ServeOptions::default()).await;
    let echo = echo_server().await;
    let timer = JumpTimer::default();
    let receive = Arc::new(BufferBudget::new(BUDGET));
    let config = PoolConfig {
        max_streams_per_connection: 1,
        ..PoolConfig::default()
    };
    let pool = Pool::with_receive_budget(
        TcpConnector {
            tls: pki.client_tls.clone(),
        },
        TokioExecutor::new(),
        timer.clone(),
        config.clone(),
        receive.clone(),
    );
    let k = key(server.addr);
    let mut tunnels = open_many(&pool, &k, echo, 2).await;
    assert_eq!(pool.connections(&k), 2);
    assert_eq!(
        receive.used(),
        BUDGET,
        "the first connection leased the budget, the second nothing"
    );
    // Both carry more than HTTP/2's default window each way.
    let data = pattern(256 * 1024, 5);
    for tunnel in &mut tunnels {
        let (mut r, mut w) = tokio::io::split(tunnel);
        let (written, echoed) = tokio::join!(
            async {
                w.write_all(&data).await.unwrap();
            },
            async {
                let mut got = vec![0u8; data.len()];
                r.read_exact(&mut got).await.unwrap();
                got
            }
        );
        let () = written;
        assert!(echoed == data, "the echo lost or changed bytes");
    }
    drop(tunnels);
    // Seen idle, then idle for longer than the timeout.
    assert_eq!(pool.release_idle(), 2, "idle from now on");
    assert_eq!(receive.used(), BUDGET, "held while the connections are pooled");
    timer.jump(config.idle_timeout + Duration::from_secs(1));
    timeout(LIMIT, async {
        while pool.release_idle() > 0 || receive.used() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connections released and their leases given back");
}
