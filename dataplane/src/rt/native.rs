//! The [`Runtime`] and the HBONE pool connector, written once over what differs between runtimes.
//!
//! A runtime contributes a [`Native`] implementation on a marker type: its stream, timer and
//! executor types, and how it connects a socket the [`SocketFactory`] made. The socket operations
//! on a stream go through its borrowed descriptor, the same on every runtime. [`ProxyRuntime`] (a [`Runtime`]) and [`PoolConnector`] (the pool's
//! [`Connector`]) are built over it with a socket factory: `ztunnel`'s are
//! [`TokioRuntime`](super::tokio::TokioRuntime) and [`TokioConnector`](super::tokio::TokioConnector)
//! over [`Tokio`](super::tokio::Tokio); the io_uring build has the same over its glommio marker.

use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use ::tokio::io::{AsyncRead, AsyncWrite};
use meshwire_hbone::ConnectError;
use meshwire_hbone::double::InnerDriver;
use meshwire_hbone::pool::{Connector, PoolKey, PooledDriver};
use meshwire_hbone::rt::{Executor, Timer};
use rustls::ClientConfig;
use socket2::Socket;

use super::Runtime;
use super::connector::{ClientTlsSource, ConnectorConfig, connect_key, pool_connect};
use super::netns::ProxySocketFactory;
use super::socket::{self, SocketFactory, SocketOptions};

/// What a runtime does its own way, and all the proxy's [`Runtime`] needs from it besides the
/// socket factory. Implemented on a marker type by each binary.
pub trait Native: 'static {
    /// The runtime's TCP stream: [`Runtime::Stream`]. Its socket, borrowed (`AsFd`), serves the
    /// socket operations ([`socket::local_addr`], [`socket::original_destination`], ...).
    type Stream: AsyncRead + AsyncWrite + AsFd + Unpin + 'static;

    /// The runtime's clock: [`Runtime::Timer`]; a handle made with `Default`.
    type Timer: Timer + Clone + Default;

    /// Where the HBONE pool runs its connection drivers, and the outbound path those of the inner
    /// connections of double HBONE: [`Runtime::Executor`].
    type Executor: Executor<PooledDriver<Self::Stream, Self::Timer>> + Executor<InnerDriver<Self::Timer>>;

    /// Connects an unconnected socket (as made by [`SocketFactory::stream`]) to `peer`, keeping
    /// its options and bind, failing with [`io::ErrorKind::TimedOut`] after `timeout`; errors
    /// name the peer and the local address.
    fn connect(socket: Socket, peer: SocketAddr, timeout: Duration) -> impl Future<Output = io::Result<Self::Stream>>;
}

/// The proxy's [`Runtime`] on the runtime `N`, connecting through the socket factory `F`. Its
/// futures are `Send` exactly when `N`'s and `F` are.
pub struct ProxyRuntime<N, F = ProxySocketFactory> {
    factory: F,
    native: PhantomData<fn() -> N>,
}

impl<N> ProxyRuntime<N> {
    /// The runtime connecting in the proxy's own network namespace ([`ProxySocketFactory::Host`]).
    pub fn new() -> Self {
        Self::with_factory(ProxySocketFactory::Host)
    }
}

impl<N> Default for ProxyRuntime<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<N, F> ProxyRuntime<N, F> {
    /// The runtime connecting with `factory`.
    pub fn with_factory(factory: F) -> Self {
        Self {
            factory,
            native: PhantomData,
        }
    }

    /// The socket factory.
    pub fn factory(&self) -> &F {
        &self.factory
    }
}

impl<N, F: Clone> Clone for ProxyRuntime<N, F> {
    fn clone(&self) -> Self {
        Self::with_factory(self.factory.clone())
    }
}

impl<N, F: fmt::Debug> fmt::Debug for ProxyRuntime<N, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyRuntime")
            .field("native", &std::any::type_name::<N>())
            .field("factory", &self.factory)
            .finish()
    }
}

impl<N: Native, F: SocketFactory + 'static> Runtime for ProxyRuntime<N, F> {
    type Stream = N::Stream;
    type Timer = N::Timer;
    type Executor = N::Executor;
    type Connector<S: ClientTlsSource> = PoolConnector<N, S, F>;

    fn timer(&self) -> N::Timer {
        N::Timer::default()
    }

    fn client_tls<S: ClientTlsSource>(connector: &PoolConnector<N, S, F>) -> Option<&S> {
        Some(connector.tls())
    }

    async fn connect(&self, dst: SocketAddr, opts: &SocketOptions, timeout: Duration) -> io::Result<N::Stream> {
        N::connect(self.factory.stream(dst, None, opts)?, dst, timeout).await
    }

    async fn connect_from(
        &self,
        dst: SocketAddr,
        source: Option<std::net::IpAddr>,
        opts: &SocketOptions,
        timeout: Duration,
    ) -> io::Result<N::Stream> {
        let socket = self
            .factory
            .stream_from(dst, source, opts, socket::SourceTransparency::Always)?;
        N::connect(socket, dst, timeout).await
    }

    fn local_addr(stream: &N::Stream) -> io::Result<SocketAddr> {
        socket::local_addr(stream)
    }

    fn peer_addr(stream: &N::Stream) -> io::Result<SocketAddr> {
        socket::peer_addr(stream)
    }

    fn original_destination(stream: &N::Stream) -> io::Result<SocketAddr> {
        socket::original_destination(stream)
    }

    fn reset_on_close(stream: &N::Stream) -> io::Result<()> {
        socket::reset_on_close(stream)
    }
}

/// The HBONE pool's connector on the runtime `N`: the TCP connection to a [`PoolKey`]'s
/// destination, from its source IP if set (transparently when that IP is not local, per
/// [`ConnectorConfig::transparency`]), with `TCP_NODELAY` on, through a [`SocketFactory`]; and the
/// client TLS config for the key from `tls`, the piece the certificate manager provides.
pub struct PoolConnector<N, S, F = ProxySocketFactory> {
    tls: S,
    factory: F,
    config: ConnectorConfig,
    native: PhantomData<fn() -> N>,
}

impl<N, S> PoolConnector<N, S> {
    /// A connector making sockets in the proxy's own network namespace ([`ProxySocketFactory::Host`]).
    pub fn new(tls: S, config: ConnectorConfig) -> Self {
        Self::with_factory(tls, ProxySocketFactory::Host, config)
    }
}

impl<N, S, F> PoolConnector<N, S, F> {
    /// A connector making sockets with `factory`.
    pub fn with_factory(tls: S, factory: F, config: ConnectorConfig) -> Self {
        let mut config = config;
        config.socket.nodelay = true;
        Self {
            tls,
            factory,
            config,
            native: PhantomData,
        }
    }

    /// The source of client TLS configs.
    pub fn tls(&self) -> &S {
        &self.tls
    }

    /// The settings (with `TCP_NODELAY` on).
    pub fn config(&self) -> &ConnectorConfig {
        &self.config
    }
}

impl<N: Native, S, F: SocketFactory> PoolConnector<N, S, F> {
    /// The TCP half of [`Connector::connect`]: a connection to `key.destination` from
    /// `key.source_ip`, with `TCP_NODELAY` on. Failures are [`ConnectError::Tcp`] naming the
    /// destination, with the [`SocketError`](super::socket::SocketError) inside.
    pub async fn connect_tcp(&self, key: &PoolKey) -> Result<N::Stream, ConnectError> {
        connect_key(&self.factory, &self.config, key, N::connect).await
    }
}

impl<N, S: Clone, F: Clone> Clone for PoolConnector<N, S, F> {
    fn clone(&self) -> Self {
        Self {
            tls: self.tls.clone(),
            factory: self.factory.clone(),
            config: self.config.clone(),
            native: PhantomData,
        }
    }
}

impl<N, S: fmt::Debug, F: fmt::Debug> fmt::Debug for PoolConnector<N, S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConnector")
            .field("native", &std::any::type_name::<N>())
            .field("tls", &self.tls)
            .field("factory", &self.factory)
            .field("config", &self.config)
            .finish()
    }
}

impl<N: Native, S: ClientTlsSource, F: SocketFactory> Connector for PoolConnector<N, S, F> {
    type Io = N::Stream;

    /// The TLS config first (no connection is held open while a certificate is fetched), then
    /// [`PoolConnector::connect_tcp`].
    async fn connect(&self, key: &PoolKey) -> Result<(N::Stream, Arc<ClientConfig>), ConnectError> {
        pool_connect(&self.tls, &self.factory, &self.config, key, N::connect).await
    }
}
