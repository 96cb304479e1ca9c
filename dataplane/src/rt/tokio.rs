//! The tokio side of the runtime seam: [`TokioRuntime`] (the [`Runtime`] of the `ztunnel`
//! binary), timer, executor, listeners and streams made from the [`SocketFactory`]'s sockets, and
//! the HBONE pool's TCP connector.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshwire_hbone::ConnectError;
use meshwire_hbone::pool::{Connector, PoolKey};
use meshwire_hbone::rt::{Executor, Timer};
use rustls::ClientConfig;
use socket2::Socket;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;

use super::Runtime;
pub use super::connector::{ClientTlsSource, ConnectorConfig};
use super::connector::{connect_key, pool_connect};
use super::socket::{self, DefaultSocketFactory, SocketError, SocketFactory, SocketOp, SocketOptions, SocketTarget};

/// The [`Runtime`] on tokio: [`TcpStream`]s, [`TokioTimer`], [`TokioExecutor`] and
/// [`TokioConnector`], connecting through the socket factory `F`. Its futures are `Send` (when
/// `F` is `Sync`), as a multi-threaded tokio runtime needs to spawn them.
///
/// Streams and sleeps must be used inside a tokio runtime with IO and time enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioRuntime<F = DefaultSocketFactory> {
    factory: F,
}

impl TokioRuntime {
    /// The runtime connecting with the [`DefaultSocketFactory`].
    pub fn new() -> Self {
        Self::default()
    }
}

impl<F> TokioRuntime<F> {
    /// The runtime connecting with `factory`.
    pub fn with_factory(factory: F) -> Self {
        Self { factory }
    }

    /// The socket factory.
    pub fn factory(&self) -> &F {
        &self.factory
    }
}

impl<F: SocketFactory + 'static> Runtime for TokioRuntime<F> {
    type Stream = TcpStream;
    type Timer = TokioTimer;
    type Executor = TokioExecutor;
    type Connector<S> = TokioConnector<S, F>;

    fn timer(&self) -> TokioTimer {
        TokioTimer
    }

    async fn connect(&self, dst: SocketAddr, opts: &SocketOptions, timeout: Duration) -> io::Result<TcpStream> {
        connect_with(&self.factory, dst, opts, timeout).await
    }

    fn local_addr(stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr()
    }

    fn peer_addr(stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.peer_addr()
    }

    fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
        socket::original_destination(stream)
    }

    fn reset_on_close(stream: &TcpStream) -> io::Result<()> {
        socket::reset_on_close(stream)
    }
}

/// [`Timer`] over `tokio::time`: monotonic time and sleeps follow tokio's clock, so they run in
/// virtual time under a paused runtime (`#[tokio::test(start_paused = true)]`). The wall clock
/// ([`Timer::system_now`]) is the system's, paused or not.
///
/// Sleeps must be created and polled inside a tokio runtime with time enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    type Sleep = tokio::time::Sleep;

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }
}

/// [`Executor`] over `tokio::spawn`: runs `Send + 'static` futures as detached tasks, on the
/// runtime of the calling thread or on a runtime chosen by handle.
#[derive(Debug, Clone, Default)]
pub struct TokioExecutor {
    handle: Option<Handle>,
}

impl TokioExecutor {
    /// Spawns on the runtime of the thread calling [`Executor::execute`] (which panics outside
    /// a runtime, like `tokio::spawn`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns on the runtime of `handle`, from any thread.
    pub fn with_handle(handle: Handle) -> Self {
        Self { handle: Some(handle) }
    }
}

impl<F: Future<Output = ()> + Send + 'static> Executor<F> for TokioExecutor {
    fn execute(&self, future: F) {
        match &self.handle {
            Some(handle) => drop(handle.spawn(future)),
            None => drop(tokio::spawn(future)),
        }
    }
}

/// A tokio listener from a listening socket (as made by [`SocketFactory::listener`]). Must be
/// called inside a runtime with IO enabled.
pub fn into_listener(socket: Socket) -> io::Result<TcpListener> {
    let addr = socket.local_addr().ok().and_then(|a| a.as_socket());
    let target = SocketTarget::Listener(addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))));
    socket
        .set_nonblocking(true)
        .map_err(|e| SocketError::io(SocketOp::Register, target.clone(), e))?;
    TcpListener::from_std(socket.into()).map_err(|e| SocketError::io(SocketOp::Register, target, e))
}

/// A listener on `addr` made by `factory` with `opts`.
pub fn bind_listener<F: SocketFactory + ?Sized>(
    factory: &F,
    addr: SocketAddr,
    opts: &SocketOptions,
) -> io::Result<TcpListener> {
    into_listener(factory.listener(addr, opts)?)
}

/// Connects an unconnected socket (as made by [`SocketFactory::stream`]) to `peer`, keeping its
/// options and bind, failing with [`io::ErrorKind::TimedOut`] after `timeout`. The error names
/// the peer and the local address.
pub async fn connect(socket: Socket, peer: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|a| !a.ip().is_unspecified());
    let target = SocketTarget::Outbound { peer, local };
    socket
        .set_nonblocking(true)
        .map_err(|e| SocketError::io(SocketOp::Register, target.clone(), e))?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(peer)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(SocketError::io(SocketOp::Connect, target, e)),
        Err(_) => {
            let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"));
            Err(SocketError::io(SocketOp::Connect, target, e))
        }
    }
}

/// Connects to `peer` through `factory` (so the socket gets the marks and options every socket of
/// the proxy gets), failing with [`io::ErrorKind::TimedOut`] after `timeout`.
pub async fn connect_with<F: SocketFactory + ?Sized>(
    factory: &F,
    peer: SocketAddr,
    opts: &SocketOptions,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect(factory.stream(peer, None, opts)?, peer, timeout).await
}

/// The HBONE pool's connector on tokio: the TCP connection to a [`PoolKey`]'s destination, from
/// its source IP if set (transparently when that IP is not local, per
/// [`ConnectorConfig::transparency`]), with `TCP_NODELAY` on, through a [`SocketFactory`]; and the
/// client TLS config for the key from `tls`, the piece the certificate manager provides.
#[derive(Debug, Clone)]
pub struct TokioConnector<S, F = DefaultSocketFactory> {
    tls: S,
    factory: F,
    config: ConnectorConfig,
}

impl<S> TokioConnector<S> {
    /// A connector making sockets with the [`DefaultSocketFactory`].
    pub fn new(tls: S, config: ConnectorConfig) -> Self {
        Self::with_factory(tls, DefaultSocketFactory, config)
    }
}

impl<S, F: SocketFactory> TokioConnector<S, F> {
    /// A connector making sockets with `factory`.
    pub fn with_factory(tls: S, factory: F, config: ConnectorConfig) -> Self {
        let mut config = config;
        config.socket.nodelay = true;
        Self { tls, factory, config }
    }

    /// The source of client TLS configs.
    pub fn tls(&self) -> &S {
        &self.tls
    }

    /// The settings (with `TCP_NODELAY` on).
    pub fn config(&self) -> &ConnectorConfig {
        &self.config
    }

    /// The TCP half of [`meshwire_hbone::pool::Connector::connect`]: a connection to
    /// `key.destination` from `key.source_ip`, with `TCP_NODELAY` on. Failures are
    /// [`ConnectError::Tcp`] naming the destination, with the [`SocketError`] inside.
    pub async fn connect_tcp(&self, key: &PoolKey) -> Result<TcpStream, ConnectError> {
        connect_key(&self.factory, &self.config, key, connect).await
    }
}

impl<S: ClientTlsSource, F: SocketFactory> Connector for TokioConnector<S, F> {
    type Io = TcpStream;

    /// The TLS config first (no connection is held open while a certificate is fetched), then
    /// [`TokioConnector::connect_tcp`].
    async fn connect(&self, key: &PoolKey) -> Result<(TcpStream, Arc<ClientConfig>), ConnectError> {
        pool_connect(&self.tls, &self.factory, &self.config, key, connect).await
    }
}
