//! The runtime-independent steps of an HBONE pool connector: where the client TLS config of a
//! [`PoolKey`] comes from ([`ClientTlsSource`]), the connector's settings ([`ConnectorConfig`]), and
//! the order of the steps ([`pool_connect`]), so that each runtime's connector only supplies how a
//! socket made by the [`SocketFactory`] gets connected.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshwire_hbone::ConnectError;
use meshwire_hbone::pool::PoolKey;
use rustls::ClientConfig;
use socket2::Socket;

use super::socket::{SocketFactory, SocketOptions, SourceTransparency};

/// Settings of an HBONE pool connector ([`TokioConnector`](super::tokio::TokioConnector) and the
/// io_uring build's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorConfig {
    /// Options of the outbound sockets (`TCP_NODELAY` is set whatever they say).
    pub socket: SocketOptions,
    /// How long a TCP connect may take.
    pub connect_timeout: Duration,
    /// Whether binding a key's source IP sets `IP_TRANSPARENT`.
    pub transparency: SourceTransparency,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        Self {
            socket: SocketOptions::default(),
            connect_timeout: Duration::from_secs(10),
            transparency: SourceTransparency::IfNotLocal,
        }
    }
}

/// Where an HBONE pool connector gets the client TLS config of a [`PoolKey`]: presenting
/// `key.source` and accepting only `key.expected()`. The certificate manager implements it;
/// so does any `Fn(&PoolKey) -> impl Future<Output = Result<Arc<ClientConfig>, ConnectError>>`.
pub trait ClientTlsSource {
    /// The config for `key`, or why there is none (for example [`ConnectError::Tls`] when no
    /// certificate could be had for `key.source`).
    fn client_config(&self, key: &PoolKey) -> impl Future<Output = Result<Arc<ClientConfig>, ConnectError>>;
}

impl<F, Fut> ClientTlsSource for F
where
    F: Fn(&PoolKey) -> Fut,
    Fut: Future<Output = Result<Arc<ClientConfig>, ConnectError>>,
{
    fn client_config(&self, key: &PoolKey) -> impl Future<Output = Result<Arc<ClientConfig>, ConnectError>> {
        self(key)
    }
}

/// The TCP half of a pool connector: a socket from `factory` to `key.destination` (from
/// `key.source_ip`, transparently as `config` says), connected by `connect` within
/// `config.connect_timeout`. Failures are [`ConnectError::Tcp`] naming the destination.
pub async fn connect_key<F, T, Fut>(
    factory: &F,
    config: &ConnectorConfig,
    key: &PoolKey,
    connect: impl FnOnce(Socket, SocketAddr, Duration) -> Fut,
) -> Result<T, ConnectError>
where
    F: SocketFactory + ?Sized,
    Fut: Future<Output = io::Result<T>>,
{
    let peer = key.destination;
    let tcp_error = |source: io::Error| ConnectError::Tcp {
        peer,
        source: Arc::new(source),
    };
    let socket = factory
        .stream_from(peer, key.source_ip, &config.socket, config.transparency)
        .map_err(tcp_error)?;
    connect(socket, peer, config.connect_timeout).await.map_err(tcp_error)
}

/// A pool connector's `connect`: the client TLS config of `key` from `tls` first (no connection is
/// held open while a certificate is fetched), then [`connect_key`].
pub async fn pool_connect<S, F, T, Fut>(
    tls: &S,
    factory: &F,
    config: &ConnectorConfig,
    key: &PoolKey,
    connect: impl FnOnce(Socket, SocketAddr, Duration) -> Fut,
) -> Result<(T, Arc<ClientConfig>), ConnectError>
where
    S: ClientTlsSource + ?Sized,
    F: SocketFactory + ?Sized,
    Fut: Future<Output = io::Result<T>>,
{
    let tls = tls.client_config(key).await?;
    let tcp = connect_key(factory, config, key, connect).await?;
    Ok((tcp, tls))
}
