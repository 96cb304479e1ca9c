//! Buffer budgets over real loopback sockets with real mTLS: a stream whose peer does not read holds
//! its lease, a second stream waits for the spent budget (its upstream unread) instead of buffering,
//! and once the first is read both deliver every byte; nothing stays charged afterwards.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshwire_hbone::Settings;
use meshwire_hbone::budget::BufferBudget;
use meshwire_hbone::client::{self, ConnectRequest, Tunnel};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::server::ServeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);
/// What each upstream sends: far more than the client's window plus the server's buffers.
const TOTAL: usize = 3 << 20;

/// An upstream that sends [`TOTAL`] bytes of `pattern(TOTAL, port)` to each connection, then closes.
async fn sender() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.write_all(&pattern(TOTAL, 7)).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

async fn read_all(tunnel: &mut Tunnel) -> Vec<u8> {
    let mut got = Vec::new();
    timeout(LIMIT, tunnel.read_to_end(&mut got)).await.unwrap().unwrap();
    got
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    timeout(LIMIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Two streams on one connection, with the budget under test just one lease large.
async fn second_stream_waits_for_the_first(options: ServeOptions, budget: Arc<BufferBudget>) {
    let pki = Pki::new();
    let lease = options.stream_lease();
    let server = hbone_server(&pki, options).await;
    let upstream = sender().await;
    // Small windows: the server cannot push an upstream's bytes into the client's buffers.
    let settings = Settings {
        stream_window: 64 * 1024,
        connection_window: 1024 * 1024,
        ..Settings::default()
    };
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (conn, driver) = client::handshake(tcp, pki.client_tls.clone(), &settings, TokioTimer)
        .await
        .unwrap();
    tokio::spawn(driver);
    let request = ConnectRequest::new(Authority::SocketAddr(upstream));

    let mut first = conn.open(&request).await.unwrap();
    wait_for("the first stream's lease", || budget.used() == lease).await;
    let mut second = conn.open(&request).await.unwrap();
    // The second stream is open but may not read its upstream: nothing arrives.
    let mut byte = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(300), second.read(&mut byte))
            .await
            .is_err(),
        "the second stream moved bytes with the budget spent"
    );
    assert_eq!(budget.used(), lease, "never more than the budget");

    // Reading the first gives its lease back once its upstream ended; the second then delivers
    // everything.
    let expected = pattern(TOTAL, 7);
    let (a, b) = tokio::join!(read_all(&mut first), read_all(&mut second));
    assert!(a == expected, "the first stream lost or changed bytes");
    assert!(b == expected, "the second stream lost or changed bytes");
    drop((first, second));
    wait_for("every lease given back", || budget.used() == 0).await;
}

fn small_send_buffer() -> ServeOptions {
    let mut options = ServeOptions::default();
    options.settings.send_buffer = 64 * 1024;
    options
}

#[tokio::test]
async fn a_spent_process_budget_holds_a_stream_back_and_loses_nothing() {
    let mut options = small_send_buffer();
    let budget = Arc::new(BufferBudget::new(options.stream_lease()));
    options.process_budget = budget.clone();
    second_stream_waits_for_the_first(options, budget).await;
}

#[tokio::test]
async fn a_spent_connection_budget_holds_a_stream_back_and_loses_nothing() {
    let mut options = small_send_buffer();
    // The connection's budget is not visible from outside; the process's, as large, follows it.
    options.connection_buffer = options.stream_lease();
    let budget = Arc::new(BufferBudget::new(usize::MAX));
    options.process_budget = budget.clone();
    second_stream_waits_for_the_first(options, budget).await;
}

#[tokio::test]
async fn a_budget_smaller_than_one_stream_is_refused_by_name() {
    let mut options = small_send_buffer();
    options.connection_buffer = options.stream_lease() - 1;
    let err = options.validate().unwrap_err();
    assert!(err.to_string().contains("connection_buffer"), "{err}");
    let mut options = small_send_buffer();
    options.process_budget = Arc::new(BufferBudget::new(1000));
    let err = options.validate().unwrap_err();
    assert!(err.to_string().contains("process_budget"), "{err}");
}

/// A handler whose upstreams never read: each is one end of an in-memory pipe of 1 KiB whose other
/// end is kept, unread.
#[derive(Default)]
struct NeverRead {
    kept: std::sync::Mutex<Vec<tokio::io::DuplexStream>>,
    finished: std::sync::atomic::AtomicU64,
}

impl meshwire_hbone::server::Handler for NeverRead {
    type Upstream = tokio::io::DuplexStream;

    async fn connect(
        &self,
        _: &meshwire_hbone::server::InboundRequest,
    ) -> Result<meshwire_hbone::server::Connected<Self::Upstream>, meshwire_hbone::server::Refusal> {
        let (near, far) = tokio::io::duplex(PIPE);
        self.kept.lock().unwrap().push(far);
        Ok(near.into())
    }

    fn finished(&self, _: meshwire_hbone::server::StreamReport) {
        self.finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

const PIPE: usize = 1024;
const STREAMS: usize = 5;

/// Opens a connection with the largest windows to `addr` and [`STREAMS`] streams that send without
/// end, and waits until they stall.
async fn upload_until_stalled(pki: &Pki, addr: SocketAddr) -> Upload {
    let settings = Settings {
        stream_window: ((1 << 31) - 1) / 4,
        connection_window: (1 << 31) - 1,
        ..Settings::default()
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (conn, driver) = client::handshake(tcp, pki.client_tls.clone(), &settings, TokioTimer)
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = driver.await;
    });
    let mut upload = Upload {
        conn,
        tasks: vec![driver],
        sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    for _ in 0..STREAMS {
        upload.add_stream().await;
    }
    upload.stalled().await;
    upload
}

/// A connection whose streams send without end, and how much they sent.
struct Upload {
    conn: client::ClientConnection,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

impl Upload {
    /// Opens one more stream that sends without end.
    async fn add_stream(&mut self) {
        let to = ConnectRequest::new(Authority::SocketAddr("127.0.0.1:9".parse().unwrap()));
        let mut tunnel = self.conn.open(&to).await.unwrap();
        let sent = self.sent.clone();
        self.tasks.push(tokio::spawn(async move {
            let chunk = vec![0x3cu8; 16 * 1024];
            while tunnel.write_all(&chunk).await.is_ok() {
                sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }

    /// Waits until nothing more is sent for half a second; returns how much was sent.
    async fn stalled(&self) -> u64 {
        let mut last = u64::MAX;
        timeout(LIMIT, async {
            loop {
                let now = self.sent.load(std::sync::atomic::Ordering::Relaxed);
                if now == last {
                    break;
                }
                last = now;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await
        .expect("the uploads stall");
        last
    }

    /// Resets the streams and closes the connection.
    fn close(self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A connection leases its window from the receive budget and advertises only what it got (the
/// peer can send no more than that to an upstream that does not read); one set up when the budget
/// is spent gets HTTP/2's default, and grows its windows at its next stream once the budget has
/// room again; closing a connection whose upstreams never read ends its streams and gives its
/// lease back.
#[tokio::test]
async fn connections_advertise_only_the_window_they_leased_and_give_it_back() {
    use meshwire_hbone::budget::HTTP2_DEFAULT_WINDOW;
    const BUDGET: usize = 1 << 20;
    let pki = Pki::new();
    let receive = Arc::new(BufferBudget::new(BUDGET));
    let options = ServeOptions {
        receive_budget: receive.clone(),
        ..ServeOptions::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(NeverRead::default());
    let h = handler.clone();
    let tls_config = pki.server_tls.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).unwrap();
            let (tls_config, options, h) = (tls_config.clone(), options.clone(), h.clone());
            tokio::spawn(async move {
                let _ = meshwire_hbone::server::serve(
                    tcp,
                    tls_config,
                    &options,
                    &*h,
                    &TokioTimer,
                    std::future::pending::<()>(),
                )
                .await;
            });
        }
    });
    // What the streams may hold beyond the window: each pipe, and a frame's worth of slack.
    let slack = (STREAMS * PIPE + 16 * 1024) as u64;

    let first = upload_until_stalled(&pki, addr).await;
    let sent = first.sent.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(receive.used(), BUDGET, "the first connection leased the whole budget");
    let whole = u64::from(HTTP2_DEFAULT_WINDOW) + BUDGET as u64;
    assert!(
        sent >= whole - 128 * 1024 && sent <= whole + slack,
        "sent {sent} bytes with a {whole}-byte window"
    );
    let mut second = upload_until_stalled(&pki, addr).await;
    let sent = second.sent.load(std::sync::atomic::Ordering::Relaxed);
    let window = u64::from(HTTP2_DEFAULT_WINDOW);
    assert!(
        sent <= window + slack,
        "sent {sent} bytes on a connection set up with the budget spent (window {window})"
    );
    assert_eq!(receive.used(), BUDGET, "nothing more leased");

    // Closing a connection ends its streams, whose upstreams never read, and returns its lease.
    first.close();
    wait_for("the first connection's streams ended", || {
        handler.finished.load(std::sync::atomic::Ordering::SeqCst) == STREAMS as u64
    })
    .await;
    wait_for("the first lease given back", || receive.used() == 0).await;

    // The second connection's next stream grows its windows to what the budget has now.
    second.add_stream().await;
    let sent = second.stalled().await;
    assert_eq!(receive.used(), BUDGET, "the second connection topped its lease up");
    assert!(
        sent >= whole - 128 * 1024 && sent <= whole + slack + (16 << 10),
        "sent {sent} bytes once the window grew to {whole}"
    );
    second.close();
    wait_for("every stream ended", || {
        handler.finished.load(std::sync::atomic::Ordering::SeqCst) == 2 * STREAMS as u64 + 1
    })
    .await;
    wait_for("the lease given back", || receive.used() == 0).await;
}
