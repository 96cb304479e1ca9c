//! The per-connection proxy logic on a runtime of its own: [`Outbound`] and [`InboundHandler`] over a
//! [`Runtime`] whose streams and futures are not `Send` (as glommio's are), running on one thread
//! (a tokio `LocalSet`), with real sockets, a real HBONE pool and server, and real mutual TLS from a
//! local CA. The scenario is [`meshwire_tests::seam`]'s, which the io_uring build runs on glommio;
//! every stream, connect, timeout and socket operation of the proxy logic goes through the test
//! runtime, and the scenario counts them.
//!
//! [`Outbound`]: meshwire_dataplane::proxy::outbound::Outbound
//! [`InboundHandler`]: meshwire_dataplane::proxy::inbound::InboundHandler
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use meshwire_dataplane::rt::Runtime;
use meshwire_dataplane::rt::socket::{self, DefaultSocketFactory, SocketOptions};
use meshwire_dataplane::rt::tokio::{ClientTlsSource, ConnectorConfig, TokioConnector, TokioTimer, connect_with};
use meshwire_hbone::ConnectError;
use meshwire_hbone::pool::{Connector, PoolKey};
use meshwire_hbone::rt::Executor;
use meshwire_tests::seam::{Host, proxy_logic_scenario};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{LocalSet, spawn_local};

/// A TCP stream that is not `Send`.
struct LocalStream {
    inner: TcpStream,
    _not_send: PhantomData<Rc<()>>,
}

impl LocalStream {
    fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            _not_send: PhantomData,
        }
    }
}

impl AsyncRead for LocalStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Spawns on the thread's `LocalSet`: futures need not be `Send`.
struct LocalExecutor;

impl<F: Future<Output = ()> + 'static> Executor<F> for LocalExecutor {
    fn execute(&self, future: F) {
        drop(spawn_local(future));
    }
}

/// The HBONE pool's connector of [`LocalRuntime`]: [`TokioConnector`]'s connection as a
/// [`LocalStream`].
struct LocalConnector<S> {
    inner: TokioConnector<S>,
}

impl<S: ClientTlsSource> Connector for LocalConnector<S> {
    type Io = LocalStream;

    async fn connect(&self, key: &PoolKey) -> Result<(LocalStream, Arc<ClientConfig>), ConnectError> {
        let (tcp, tls) = self.inner.connect(key).await?;
        Ok((LocalStream::new(tcp), tls))
    }
}

/// A runtime whose values, streams and futures are not `Send`.
#[derive(Debug, Clone, Default)]
struct LocalRuntime {
    _not_send: PhantomData<Rc<()>>,
}

impl Runtime for LocalRuntime {
    type Stream = LocalStream;
    type Timer = TokioTimer;
    type Executor = LocalExecutor;
    type Connector<S: ClientTlsSource> = LocalConnector<S>;

    fn timer(&self) -> TokioTimer {
        TokioTimer
    }

    async fn connect(&self, dst: SocketAddr, opts: &SocketOptions, timeout: Duration) -> io::Result<LocalStream> {
        let tcp = connect_with(&DefaultSocketFactory, dst, opts, timeout).await?;
        Ok(LocalStream::new(tcp))
    }

    fn local_addr(stream: &LocalStream) -> io::Result<SocketAddr> {
        stream.inner.local_addr()
    }

    fn peer_addr(stream: &LocalStream) -> io::Result<SocketAddr> {
        stream.inner.peer_addr()
    }

    fn original_destination(stream: &LocalStream) -> io::Result<SocketAddr> {
        socket::original_destination(&stream.inner)
    }

    fn reset_on_close(stream: &LocalStream) -> io::Result<()> {
        socket::reset_on_close(&stream.inner)
    }
}

/// The tokio side of the scenario: [`LocalRuntime`] on the thread's `LocalSet`.
struct Local;

impl Host for Local {
    type Runtime = LocalRuntime;
    type Listener = TcpListener;

    fn runtime(&self) -> LocalRuntime {
        LocalRuntime::default()
    }

    fn listen(&self, ip: IpAddr) -> (TcpListener, SocketAddr) {
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    async fn accept(listener: &TcpListener) -> io::Result<LocalStream> {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        Ok(LocalStream::new(tcp))
    }

    async fn dial(addr: SocketAddr) -> io::Result<LocalStream> {
        TcpStream::connect(addr).await.map(LocalStream::new)
    }

    fn spawn(future: impl Future<Output = ()> + 'static) {
        drop(spawn_local(future));
    }

    fn executor(&self) -> LocalExecutor {
        LocalExecutor
    }

    fn connector<S: ClientTlsSource>(&self, tls: S) -> LocalConnector<S> {
        LocalConnector {
            inner: TokioConnector::new(tls, ConnectorConfig::default()),
        }
    }
}

/// SOCKS5 over HBONE (the pool's connector and executor, the inbound handler's upstream connect),
/// SOCKS5 passthrough, the handshake deadline on the runtime's timer, and a capture connection
/// that was not redirected (reset through the runtime), all on one thread.
#[tokio::test(flavor = "current_thread")]
async fn the_proxy_logic_runs_on_a_runtime_without_send() {
    LocalSet::new().run_until(proxy_logic_scenario(Local)).await;
}
