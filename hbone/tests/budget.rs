//! Buffer budgets over real loopback sockets with real mTLS: a stream whose peer does not read holds
//! its lease, a second stream waits for the spent budget (its upstream unread) instead of buffering,
//! and once the first is read both deliver every byte; nothing stays charged afterwards.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use meshwire_hbone::Settings;
use meshwire_hbone::budget::BufferBudget;
use meshwire_hbone::client::{self, ConnectRequest, Tunnel};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
use meshwire_rt::TokioTimer;
use meshwire_testkit::data::*;
use meshwire_testkit::net::*;
use meshwire_testkit::pki::*;
use meshwire_testkit::upstream::NeverRead;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
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
    let settings = Settings::builder()
        .stream_window(64 * 1024)
        .connection_window(1024 * 1024)
        .build()
        .unwrap();
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
    ServeOptions {
        settings: Settings::builder().send_buffer(64 * 1024).build().unwrap(),
        ..Default::default()
    }
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

const PIPE: usize = 1024;
const STREAMS: usize = 5;

/// Opens a connection with the largest windows to `addr` and [`STREAMS`] streams that send without
/// end, and waits until they stall.
async fn upload_until_stalled(pki: &Pki, addr: SocketAddr) -> Upload {
    let settings = Settings::builder()
        .stream_window(((1 << 31) - 1) / 4)
        .connection_window((1 << 31) - 1)
        .build()
        .unwrap();
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
        sent: Arc::new(AtomicU64::new(0)),
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
    sent: Arc<AtomicU64>,
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
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }));
    }

    /// Waits until nothing more is sent for half a second; returns how much was sent.
    async fn stalled(&self) -> u64 {
        let mut last = u64::MAX;
        timeout(LIMIT, async {
            loop {
                let now = self.sent.load(Ordering::Relaxed);
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
    let handler = Arc::new(NeverRead::new(PIPE));
    let h = handler.clone();
    let tls_config = pki.server_tls.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).unwrap();
            let (tls_config, options, h) = (tls_config.clone(), options.clone(), h.clone());
            tokio::spawn(async move { serve(tcp, tls_config, &options, &*h).await });
        }
    });
    // What the streams may hold beyond the window: each pipe, and a frame's worth of slack.
    let slack = (STREAMS * PIPE + 16 * 1024) as u64;

    let first = upload_until_stalled(&pki, addr).await;
    let sent = first.sent.load(Ordering::Relaxed);
    assert_eq!(receive.used(), BUDGET, "the first connection leased the whole budget");
    let whole = u64::from(HTTP2_DEFAULT_WINDOW) + BUDGET as u64;
    assert!(
        sent >= whole - 128 * 1024 && sent <= whole + slack,
        "sent {sent} bytes with a {whole}-byte window"
    );
    let mut second = upload_until_stalled(&pki, addr).await;
    let sent = second.sent.load(Ordering::Relaxed);
    let window = u64::from(HTTP2_DEFAULT_WINDOW);
    assert!(
        sent <= window + slack,
        "sent {sent} bytes on a connection set up with the budget spent (window {window})"
    );
    assert_eq!(receive.used(), BUDGET, "nothing more leased");

    // Closing a connection ends its streams, whose upstreams never read, and returns its lease.
    first.close();
    wait_for("the first connection's streams ended", || {
        handler.finished.load(Ordering::SeqCst) == STREAMS as u64
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
        handler.finished.load(Ordering::SeqCst) == 2 * STREAMS as u64 + 1
    })
    .await;
    wait_for("the lease given back", || receive.used() == 0).await;
}

/// Freezes the reads of the client's end of a connection, as a peer that stops reading its socket
/// (and still writes).
#[derive(Default)]
struct ReadGate {
    frozen: AtomicBool,
    waiting: std::sync::Mutex<Vec<std::task::Waker>>,
}

impl ReadGate {
    fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.waiting.lock().unwrap());
        wakers.into_iter().for_each(std::task::Waker::wake);
    }
}

struct ReadGated {
    io: tokio::io::DuplexStream,
    gate: Arc<ReadGate>,
}

impl tokio::io::AsyncRead for ReadGated {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.gate.frozen.load(SeqCst) {
            self.gate.waiting.lock().unwrap().push(cx.waker().clone());
            if self.gate.frozen.load(SeqCst) {
                return std::task::Poll::Pending;
            }
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ReadGated {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `io` until the connection ends, without a drain; the outcome is not looked at.
async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    tls: Arc<rustls::ServerConfig>,
    options: &ServeOptions,
    handler: &impl Handler,
) {
    let _ = server::serve(io, tls, options, handler, &TokioTimer, std::future::pending::<()>()).await;
}

/// What each bursting upstream sends: less than a send buffer, so that HTTP/2 takes all of it.
const BURST: usize = 300 * 1024;
const BURSTS: usize = 8;

/// A handler whose upstreams, on `go`, each send [`BURST`] bytes through a [`PIPE`]-byte pipe,
/// counting what the proxy took, then wait for `finish` (`hold_open`) or close at once.
struct Bursts {
    accepted: Arc<AtomicU64>,
    hold_open: bool,
    go: tokio::sync::watch::Receiver<bool>,
    finish: tokio::sync::watch::Receiver<bool>,
    opened: AtomicU32,
}

impl Handler for Bursts {
    type Upstream = DuplexStream;

    async fn connect(&self, _: &InboundRequest) -> Result<Connected<DuplexStream>, Refusal> {
        let (near, mut far) = tokio::io::duplex(PIPE);
        let seed = self.opened.fetch_add(1, Ordering::SeqCst);
        let (accepted, hold_open) = (self.accepted.clone(), self.hold_open);
        let (mut go, mut finish) = (self.go.clone(), self.finish.clone());
        tokio::spawn(async move {
            let _ = go.wait_for(|v| *v).await;
            for chunk in pattern(BURST, seed).chunks(1024) {
                if far.write_all(chunk).await.is_err() {
                    return;
                }
                accepted.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            if hold_open {
                let _ = finish.wait_for(|v| *v).await;
            }
            let _ = far.shutdown().await;
            // Keep the pipe until the proxy closed its end.
            let mut rest = Vec::new();
            let _ = far.read_to_end(&mut rest).await;
        });
        Ok(near.into())
    }
}

/// A peer that opens [`BURSTS`] streams with the largest windows and then stops reading its socket,
/// while each upstream sends a burst smaller than HTTP/2's send buffer: the bytes HTTP/2 holds for
/// the peer stay under the stream's lease until they are written, whether the upstream then pauses
/// or ends, so the upstreams get no more read than the budget covers. Once the peer reads again,
/// every byte arrives and every lease is given back.
async fn bursts_to_a_peer_that_stopped_reading(hold_open: bool) {
    let pki = Pki::new();
    let mut options = ServeOptions::default();
    let lease = options.stream_lease();
    let budget = Arc::new(BufferBudget::new(2 * lease));
    options.process_budget = budget.clone();
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let (finish_tx, finish) = tokio::sync::watch::channel(false);
    let accepted = Arc::new(AtomicU64::new(0));
    let handler = Arc::new(Bursts {
        accepted: accepted.clone(),
        hold_open,
        go,
        finish,
        opened: Default::default(),
    });

    let (client_end, server_end) = tokio::io::duplex(64 * 1024);
    let (tls, h) = (pki.server_tls.clone(), handler.clone());
    tokio::spawn(async move { serve(server_end, tls, &options, &*h).await });
    let gate = Arc::new(ReadGate::default());
    let io = ReadGated {
        io: client_end,
        gate: gate.clone(),
    };
    let settings = Settings::builder()
        .stream_window(((1 << 31) - 1) / 4)
        .connection_window((1 << 31) - 1)
        .build()
        .unwrap();
    let (conn, driver) = client::handshake(io, pki.client_tls.clone(), &settings, TokioTimer)
        .await
        .unwrap();
    tokio::spawn(driver);
    let request = ConnectRequest::new(Authority::SocketAddr("127.0.0.1:9".parse().unwrap()));
    let mut tunnels = Vec::new();
    for _ in 0..BURSTS {
        tunnels.push(conn.open(&request).await.unwrap());
    }

    gate.frozen.store(true, Ordering::SeqCst);
    go_tx.send(true).unwrap();
    // Wait until the upstreams stall.
    let mut last = u64::MAX;
    timeout(LIMIT, async {
        loop {
            let now = accepted.load(Ordering::SeqCst);
            if now == last {
                break;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .expect("the upstreams stall");
    // Each lease covers at most a whole burst held by HTTP/2; beyond that only the pipes and what
    // the peer's socket took.
    let bound = (budget.limit() + BURSTS * PIPE + 64 * 1024) as u64;
    assert!(
        last <= bound,
        "the upstreams got {last} bytes read for a peer that does not read, over a budget of {} \
         (bound {bound})",
        budget.limit()
    );
    assert!(last >= BURST as u64, "not even one burst was read: {last}");

    gate.thaw();
    finish_tx.send(true).unwrap();
    let reads = tunnels.iter_mut().map(read_all);
    let got = timeout(LIMIT, futures_util::future::join_all(reads)).await.unwrap();
    let mut expected: Vec<Vec<u8>> = (0..BURSTS as u32).map(|seed| pattern(BURST, seed)).collect();
    let mut got: Vec<Vec<u8>> = got;
    expected.sort();
    got.sort();
    assert!(got == expected, "a stream lost or changed bytes");
    drop(tunnels);
    wait_for("every lease given back", || budget.used() == 0).await;
}

#[tokio::test]
async fn bytes_http2_holds_for_a_peer_that_stopped_reading_stay_leased_while_the_upstream_pauses() {
    bursts_to_a_peer_that_stopped_reading(true).await;
}

#[tokio::test]
async fn bytes_http2_holds_for_a_peer_that_stopped_reading_stay_leased_after_the_upstream_ends() {
    bursts_to_a_peer_that_stopped_reading(false).await;
}
