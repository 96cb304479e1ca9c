//! A pooled connection to a peer that stops answering (a frozen process: its socket still takes
//! bytes, nothing comes back), in virtual time: a CONNECT on it fails within the response timeout
//! plus the probe timeout, the connection is retired, a new connection fails at the handshake
//! timeout, and a peer that answers again is used again; a keep-alive PING already out waits no
//! longer than the probe's bound. A peer that is only slow to answer a CONNECT but answers PINGs
//! keeps its connection.
//!
//! The peer is a real HBONE server (real mTLS, real certificates) over in-memory pipes, so that
//! tokio's paused clock only moves when every task waits.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use meshwire_hbone::ConnectError;
use meshwire_hbone::client::ConnectRequest;
use meshwire_hbone::headers::Authority;
use meshwire_hbone::pool::{Connector, Pool, PoolConfig, PoolKey};
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
use meshwire_rt::TokioExecutor;
use meshwire_rt::TokioTimer;
use meshwire_testkit::pki::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::time::Instant;

/// Freezes every connection of the peer at once, as `kill -STOP` freezes its process.
#[derive(Default)]
struct Gate {
    frozen: AtomicBool,
    waiting: Mutex<Vec<Waker>>,
}

impl Gate {
    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.waiting.lock().unwrap());
        wakers.into_iter().for_each(Waker::wake);
    }

    /// `Pending` (to be woken by `thaw`) while frozen.
    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.frozen.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        self.waiting.lock().unwrap().push(cx.waker().clone());
        if self.frozen.load(Ordering::SeqCst) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// The peer's end of a connection: neither reads nor writes while the gate is frozen.
struct Gated {
    io: DuplexStream,
    gate: Arc<Gate>,
}

impl AsyncRead for Gated {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Answers every CONNECT after `delay_ms` with an echo upstream.
#[derive(Default)]
struct EchoHandler {
    delay_ms: AtomicU64,
}

impl Handler for EchoHandler {
    type Upstream = DuplexStream;

    async fn connect(&self, _request: &InboundRequest) -> Result<Connected<DuplexStream>, Refusal> {
        tokio::time::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))).await;
        let (upstream, mut echo) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut echo);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        Ok(Connected::from(upstream))
    }
}

/// Connects to an HBONE server of its own over an in-memory pipe, behind the gate.
struct PipeConnector {
    pki: Arc<Pki>,
    gate: Arc<Gate>,
    handler: Arc<EchoHandler>,
}

impl Connector for PipeConnector {
    type Io = DuplexStream;

    async fn connect(&self, _key: &PoolKey) -> Result<(DuplexStream, Arc<rustls::ClientConfig>), ConnectError> {
        let (client, peer) = tokio::io::duplex(256 * 1024);
        let (tls, handler, gate) = (self.pki.server_tls.clone(), self.handler.clone(), self.gate.clone());
        tokio::spawn(async move {
            let io = Gated { io: peer, gate };
            let _ = server::serve(
                io,
                tls,
                &ServeOptions::default(),
                &*handler,
                &TokioTimer,
                std::future::pending(),
            )
            .await;
        });
        Ok((client, self.pki.client_tls.clone()))
    }
}

struct Peer {
    pool: Pool<PipeConnector, TokioExecutor, TokioTimer>,
    gate: Arc<Gate>,
    handler: Arc<EchoHandler>,
    key: PoolKey,
}

fn peer() -> Peer {
    let pki = Arc::new(Pki::new());
    let gate = Arc::new(Gate::default());
    let handler = Arc::new(EchoHandler::default());
    let connector = PipeConnector {
        pki,
        gate: gate.clone(),
        handler: handler.clone(),
    };
    Peer {
        pool: Pool::new(connector, TokioExecutor::new(), TokioTimer, PoolConfig::default()),
        gate,
        handler,
        key: PoolKey::new(id(CLIENT), vec![id(SERVER)], "127.0.0.2:15008".parse().unwrap(), None),
    }
}

fn request() -> ConnectRequest {
    ConnectRequest::new(Authority::parse("127.0.0.2:8080").unwrap())
}

/// Opens a tunnel and checks that it carries bytes both ways.
async fn echo_through(peer: &Peer) {
    let mut tunnel = peer.pool.connect(&peer.key, &request()).await.unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
}

#[tokio::test(start_paused = true)]
async fn a_frozen_peer_fails_a_pooled_connect_within_the_response_and_probe_timeouts() {
    let peer = peer();
    let defaults = PoolConfig::default();
    echo_through(&peer).await;
    assert_eq!(peer.pool.connections(&peer.key), 1);

    peer.gate.freeze();
    let started = Instant::now();
    let err = peer.pool.connect(&peer.key, &request()).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        err.to_string()
            .contains("answered neither the CONNECT within 3s nor a PING within 2s"),
        "{err}"
    );
    assert_eq!(waited, Duration::from_secs(5), "response timeout + probe timeout");
    assert_eq!(peer.pool.connections(&peer.key), 0, "the connection is retired");

    // A new connection to the frozen peer fails at the handshake timeout.
    let started = Instant::now();
    let err = peer.pool.connect(&peer.key, &request()).await.unwrap_err();
    assert!(matches!(err, ConnectError::HandshakeTimeout(_)), "{err}");
    assert_eq!(started.elapsed(), defaults.settings.handshake_timeout());

    // Thawed, the peer is used again, on a new connection.
    peer.gate.thaw();
    echo_through(&peer).await;
    assert_eq!(peer.pool.connections(&peer.key), 1);
    assert_eq!(peer.pool.handshakes(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_peer_slow_to_answer_a_connect_but_answering_pings_keeps_its_connection() {
    let peer = peer();
    echo_through(&peer).await;

    // The CONNECT is answered after 8 s, well past the response timeout; the probe's PING is
    // answered at once, so the CONNECT keeps waiting on the same connection.
    peer.handler.delay_ms.store(8_000, Ordering::SeqCst);
    let started = Instant::now();
    let mut tunnel = peer.pool.connect(&peer.key, &request()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(8));
    tunnel.write_all(b"slow").await.unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"slow");
    assert_eq!(peer.pool.handshakes(), 1, "no new connection");
    assert_eq!(peer.pool.connections(&peer.key), 1);

    // The probe was answered: new streams use the connection again.
    peer.handler.delay_ms.store(0, Ordering::SeqCst);
    echo_through(&peer).await;
    assert_eq!(peer.pool.handshakes(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_probe_shortens_the_wait_for_a_keep_alive_ping_already_out() {
    let peer = peer();
    echo_through(&peer).await;
    peer.gate.freeze();
    // The keep-alive PING goes out 10 s after the handshake and would wait 20 s for its answer.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(peer.pool.connections(&peer.key), 1, "not retired yet");

    let started = Instant::now();
    let err = peer.pool.connect(&peer.key, &request()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Unresponsive { .. }), "{err}");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "the probe's bound, not the keep-alive's"
    );
    assert_eq!(peer.pool.connections(&peer.key), 0);
}
