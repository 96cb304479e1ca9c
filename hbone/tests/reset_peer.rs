//! A client that resets its connection while the server's streams have bytes to send and nothing
//! arrives to read: the server's writes fail, and the server must end every stream (closing their
//! upstreams and giving back their buffer leases) and the connection, rather than leave the streams
//! waiting for send capacity that can never come.
//!
//! The write error is the only sign of the reset the server gets here (reads stay pending, as on a
//! socket whose error HTTP/2 meets first while writing), which is the order that left a connection
//! and its streams behind when the error surfaced while HTTP/2 flushed its queued frames.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use meshwire_hbone::client::{self, ConnectRequest};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
use meshwire_hbone::settings::Settings;
use meshwire_rt::TokioTimer;
use meshwire_testkit::pki::Pki;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

/// The server's end of the connection: once `reset`, every write fails as on a reset socket; reads
/// go on (and stay pending: the client sends nothing more).
struct Resettable {
    io: DuplexStream,
    reset: Arc<AtomicBool>,
}

impl Resettable {
    fn check(&self) -> io::Result<()> {
        if self.reset.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Resettable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Resettable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Connects every CONNECT to an upstream that sends without end, counting the upstreams still open
/// and the bytes they wrote.
#[derive(Default)]
struct Firehose {
    open: Arc<AtomicUsize>,
    written: Arc<AtomicU64>,
}

impl Handler for Firehose {
    type Upstream = DuplexStream;

    async fn connect(&self, _request: &InboundRequest) -> Result<Connected<DuplexStream>, Refusal> {
        let (upstream, mut source) = tokio::io::duplex(64 * 1024);
        let (open, written) = (self.open.clone(), self.written.clone());
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let chunk = vec![0x5a_u8; 16 * 1024];
            // Ends when the proxy drops its end of the upstream.
            while source.write_all(&chunk).await.is_ok() {
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(Connected::from(upstream))
    }
}

/// Waits (5 s at most) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_reset_met_while_writing_ends_every_stream_and_the_connection() {
    const STREAMS: usize = 8;
    let pki = Pki::new();
    let handler = Arc::new(Firehose::default());
    let options = Arc::new(ServeOptions::default());
    let reset = Arc::new(AtomicBool::new(false));
    let (client_io, server_io) = tokio::io::duplex(256 * 1024);

    let serving = {
        let (tls, handler, options) = (pki.server_tls.clone(), handler.clone(), options.clone());
        let io = Resettable {
            io: server_io,
            reset: reset.clone(),
        };
        tokio::spawn(
            async move { server::serve(io, tls, &options, &*handler, &TokioTimer, std::future::pending()).await },
        )
    };

    let (connection, driver) = client::handshake(client_io, pki.client_tls.clone(), &Settings::default(), TokioTimer)
        .await
        .unwrap();
    tokio::spawn(driver);
    // The client reads every tunnel: the server's streams always have bytes and windows to send.
    for _ in 0..STREAMS {
        let request = ConnectRequest::new(Authority::parse("127.0.0.2:8080").unwrap());
        let mut tunnel = connection.open(&request).await.unwrap();
        tokio::spawn(async move { tokio::io::copy(&mut tunnel, &mut tokio::io::sink()).await });
    }
    eventually("the upstreams send", || {
        handler.written.load(Ordering::Relaxed) > 1 << 20
    })
    .await;
    assert_eq!(handler.open.load(Ordering::SeqCst), STREAMS);

    reset.store(true, Ordering::SeqCst);

    let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
    let result = ended.expect("the connection ends after the reset").unwrap();
    let error = result.expect_err("a reset connection ends in error");
    assert!(error.to_string().contains("reset"), "{error}");
    eventually("every upstream is closed", || handler.open.load(Ordering::SeqCst) == 0).await;
    assert_eq!(options.process_budget.used(), 0, "every stream's lease is given back");
}
