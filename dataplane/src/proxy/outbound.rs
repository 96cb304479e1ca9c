//! The outbound path of the SOCKS5 listener on tokio: the SOCKS5 handshake, the routing decision
//! ([`State::route_outbound`]), then an HBONE tunnel from the pool (to the destination's node proxy
//! or its waypoint), a plain TCP connection (passthrough), or a refusal, answered with the SOCKS5
//! reply that fits.
//!
//! [`CertManagerTls`] gives the HBONE pool's [`TokioConnector`] its client TLS configs from the
//! certificate manager.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshwire_hbone::client::{ConnectError, ConnectRequest};
use meshwire_hbone::copy::{self, CopyConfig};
use meshwire_hbone::headers::{Authority, Forwarded, Metadata};
use meshwire_hbone::pool::{Pool, PoolKey};
use meshwire_identity::manager::{CertManager, Priority};
use meshwire_identity::source::CertSource;
use meshwire_identity::time::Timer;
use rustls::ClientConfig;
use tokio::net::TcpStream;

use crate::rt::socket::{DefaultSocketFactory, SocketOptions};
use crate::rt::tokio::connect_with;

use crate::rt::tokio::{ClientTlsSource, TokioConnector, TokioExecutor, TokioTimer};
use crate::socks5::{self, Reply, Socks5Error, Target};
use crate::state::{LocalProxy, OutboundRoute, Refusal, State};
use crate::watch::Published;
use crate::xds::Workload;

/// How long a client may take over the SOCKS5 handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a passthrough TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client TLS configs of the HBONE pool, from a [`CertManager`]: the certificate of the key's
/// source identity (fetched at [`Priority::Connection`] if the manager does not hold it yet),
/// accepting only the key's expected identities.
pub struct CertManagerTls<S, T> {
    manager: CertManager<S, T>,
}

impl<S, T> CertManagerTls<S, T> {
    /// Configs from `manager` (whose driver, [`CertManager::run`], the caller runs).
    pub fn new(manager: CertManager<S, T>) -> Self {
        Self { manager }
    }

    /// The certificate manager.
    pub fn manager(&self) -> &CertManager<S, T> {
        &self.manager
    }
}

impl<S, T> fmt::Debug for CertManagerTls<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManagerTls").finish_non_exhaustive()
    }
}

impl<S, T> Clone for CertManagerTls<S, T> {
    fn clone(&self) -> Self {
        Self {
            manager: self.manager.clone(),
        }
    }
}

fn tls_error(error: impl std::error::Error + Send + Sync + 'static) -> ConnectError {
    ConnectError::Tls {
        source: Arc::new(io::Error::other(error)),
    }
}

impl<S: CertSource, T: Timer> ClientTlsSource for CertManagerTls<S, T> {
    async fn client_config(&self, key: &PoolKey) -> Result<Arc<ClientConfig>, ConnectError> {
        let handle = self
            .manager
            .get(&key.source, Priority::Connection)
            .await
            .map_err(tls_error)?;
        handle
            .current()
            .client_config(key.expected().to_vec())
            .map_err(tls_error)
    }
}

/// The HBONE pool of the tokio data path.
pub type HbonePool<S> = Pool<TokioConnector<S>, TokioExecutor, TokioTimer>;

/// Whose connections the SOCKS5 listener carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceWorkload {
    /// One workload's (dedicated mode): the workload with this uid.
    Dedicated(String),
    /// Any local workload's (shared mode): the workload whose IP is the client's address.
    Shared,
}

/// Which way a connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// An HBONE tunnel to the destination workload's node proxy.
    Hbone,
    /// An HBONE tunnel to the destination's waypoint.
    Waypoint,
    /// Plain TCP to the destination.
    Passthrough,
    /// Refused by the routing decision.
    Refused,
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteKind::Hbone => "hbone",
            RouteKind::Waypoint => "waypoint",
            RouteKind::Passthrough => "passthrough",
            RouteKind::Refused => "refused",
        })
    }
}

/// Why an outbound connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    /// The SOCKS5 handshake failed (its reply, if any, was sent).
    #[error("SOCKS5 handshake: {0}")]
    Handshake(#[from] Socks5Error),
    /// The client did not finish the SOCKS5 handshake in time.
    #[error("the SOCKS5 handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// No workload is known as the source of the connection.
    #[error("no local workload for the client {peer}")]
    UnknownSource {
        /// The client's address.
        peer: SocketAddr,
    },
    /// The requested host name is not the hostname of a service with a VIP.
    #[error("cannot resolve {name:?}: no service with that hostname and a VIP")]
    Unresolved {
        /// The name asked for.
        name: String,
    },
    /// The routing decision refused the connection.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The HBONE tunnel could not be opened.
    #[error("HBONE: {0}")]
    Hbone(#[from] ConnectError),
    /// The passthrough TCP connection could not be made.
    #[error("TCP connect to {dst}: {source}")]
    Connect {
        /// The destination.
        dst: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The SOCKS5 reply could not be sent.
    #[error("sending the SOCKS5 reply: {0}")]
    Reply(Socks5Error),
    /// Copying the bytes failed after the connection was established.
    #[error("copy: {0}")]
    Copy(io::Error),
}

/// What became of one SOCKS5 connection.
#[derive(Debug, Default)]
pub struct OutboundSummary {
    /// What the client asked for, once the handshake completed.
    pub target: Option<Target>,
    /// The destination after name resolution.
    pub dst: Option<SocketAddr>,
    /// Which way it went, once routed.
    pub route: Option<RouteKind>,
    /// The SOCKS5 reply sent after the request (none when the handshake failed).
    pub reply: Option<Reply>,
    /// Bytes from the client to the destination.
    pub sent: u64,
    /// Bytes from the destination to the client.
    pub received: u64,
    /// The failure, if any.
    pub error: Option<OutboundError>,
}

/// The SOCKS5 reply for an HBONE tunnel that could not be opened.
pub fn reply_for_hbone_error(error: &ConnectError) -> Reply {
    match error {
        ConnectError::Refused { status, .. } => match status.as_u16() {
            401 | 403 => Reply::NotAllowed,
            503 => Reply::HostUnreachable,
            _ => Reply::GeneralFailure,
        },
        ConnectError::Tcp { source, .. } => Reply::for_connect_error(source),
        ConnectError::HandshakeTimeout(_) => Reply::HostUnreachable,
        _ => Reply::GeneralFailure,
    }
}

/// The outbound side of the SOCKS5 listener.
pub struct Outbound<S> {
    published: Published,
    proxy: LocalProxy,
    source: SourceWorkload,
    pool: HbonePool<S>,
    copy: CopyConfig,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    pick: AtomicU64,
}

impl<S> fmt::Debug for Outbound<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("proxy", &self.proxy)
            .field("source", &self.source)
            .field("copy", &self.copy)
            .finish_non_exhaustive()
    }
}

impl<S: ClientTlsSource> Outbound<S> {
    /// An outbound path routing with the current snapshot of `published`, for `proxy`, carrying the
    /// connections of `source` over `pool`.
    pub fn new(
        published: Published,
        proxy: LocalProxy,
        source: SourceWorkload,
        pool: HbonePool<S>,
        copy: CopyConfig,
    ) -> Self {
        Self {
            published,
            proxy,
            source,
            pool,
            copy,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            pick: AtomicU64::new(0),
        }
    }

    /// Changes the SOCKS5 handshake timeout (default [`HANDSHAKE_TIMEOUT`]).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Changes the passthrough connect timeout (default [`CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The HBONE pool.
    pub fn pool(&self) -> &HbonePool<S> {
        &self.pool
    }

    /// Serves one SOCKS5 connection from `peer`: handshake, route, connect, reply, copy until both
    /// directions ended. Failures are logged and returned in the summary.
    pub async fn serve_socks5(&self, mut stream: TcpStream, peer: SocketAddr) -> OutboundSummary {
        let mut summary = OutboundSummary::default();
        if let Err(error) = self.serve(&mut stream, peer, &mut summary).await {
            tracing::warn!(
                %peer,
                target = ?summary.target.as_ref().map(ToString::to_string),
                route = ?summary.route,
                %error,
                "outbound SOCKS5 connection failed"
            );
            summary.error = Some(error);
        }
        summary
    }

    async fn serve(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        summary: &mut OutboundSummary,
    ) -> Result<(), OutboundError> {
        let request = match tokio::time::timeout(self.handshake_timeout, socks5::accept(stream)).await {
            Ok(request) => request?,
            Err(_) => return Err(OutboundError::HandshakeTimeout(self.handshake_timeout)),
        };
        summary.target = Some(request.target.clone());
        let snapshot = self.published.load();
        let state = &snapshot.state;

        let Some(source) = self.source_workload(state, peer) else {
            reply(stream, summary, Reply::GeneralFailure).await?;
            return Err(OutboundError::UnknownSource { peer });
        };
        let dst = match &request.target {
            Target::Addr(addr) => *addr,
            Target::Domain { name, port } => match resolve(state, source, name) {
                Some(ip) => SocketAddr::new(ip, *port),
                None => {
                    reply(stream, summary, Reply::HostUnreachable).await?;
                    return Err(OutboundError::Unresolved { name: name.clone() });
                }
            },
        };
        summary.dst = Some(dst);

        let pick = self.pick.fetch_add(1, Ordering::Relaxed);
        let route = state.route_outbound(&self.proxy, source, dst, pick);
        let via_waypoint = matches!(route, OutboundRoute::Waypoint { .. });
        match route {
            OutboundRoute::Hbone {
                endpoint,
                authority,
                expected_identities,
                service,
                ..
            }
            | OutboundRoute::Waypoint {
                endpoint,
                authority,
                expected_identities,
                service,
                ..
            } => {
                summary.route = Some(if via_waypoint {
                    RouteKind::Waypoint
                } else {
                    RouteKind::Hbone
                });
                let host = service.map(|s| s.hostname);
                self.hbone(
                    stream,
                    peer,
                    source,
                    endpoint,
                    authority,
                    expected_identities,
                    host,
                    summary,
                )
                .await
            }
            OutboundRoute::Passthrough { dst, .. } => {
                summary.route = Some(RouteKind::Passthrough);
                self.passthrough(stream, dst, summary).await
            }
            OutboundRoute::Refused { reason, .. } => {
                summary.route = Some(RouteKind::Refused);
                reply(stream, summary, Reply::NotAllowed).await?;
                Err(OutboundError::Refused(reason))
            }
        }
    }

    fn source_workload<'a>(&self, state: &'a State, peer: SocketAddr) -> Option<&'a Workload> {
        match &self.source {
            SourceWorkload::Dedicated(uid) => state.workload_by_uid(uid),
            SourceWorkload::Shared => state.workload_by_ip(&self.proxy.network, peer.ip()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn hbone(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        source: &Workload,
        endpoint: SocketAddr,
        authority: SocketAddr,
        expected: Vec<meshwire_identity::id::SpiffeId>,
        host: Option<String>,
        summary: &mut OutboundSummary,
    ) -> Result<(), OutboundError> {
        let key = PoolKey::new(source.spiffe_id().clone(), expected, endpoint, None);
        let mut forwarded = Forwarded::new(peer);
        if let Some(host) = host {
            forwarded = forwarded.with_host(host);
        }
        let request = ConnectRequest {
            authority: Authority::SocketAddr(authority),
            metadata: Metadata {
                forwarded: Some(forwarded),
                ..Metadata::default()
            },
        };
        let mut tunnel = match self.pool.connect(&key, &request).await {
            Ok(tunnel) => tunnel,
            Err(error) => {
                reply(stream, summary, reply_for_hbone_error(&error)).await?;
                return Err(error.into());
            }
        };
        let bound = local_addr(stream);
        reply(stream, summary, Reply::Succeeded { bound }).await?;
        let outcome = tunnel.splice(stream, self.copy).await;
        summary.received = outcome.a_to_b;
        summary.sent = outcome.b_to_a;
        outcome.error.map_or(Ok(()), |e| Err(OutboundError::Copy(e)))
    }

    async fn passthrough(
        &self,
        stream: &mut TcpStream,
        dst: SocketAddr,
        summary: &mut OutboundSummary,
    ) -> Result<(), OutboundError> {
        let connected = connect_with(
            &DefaultSocketFactory,
            dst,
            &SocketOptions::default(),
            self.connect_timeout,
        )
        .await;
        let mut upstream = match connected {
            Ok(upstream) => upstream,
            Err(source) => {
                reply(stream, summary, Reply::for_connect_error(&source)).await?;
                return Err(OutboundError::Connect { dst, source });
            }
        };
        let bound = local_addr(stream);
        reply(stream, summary, Reply::Succeeded { bound }).await?;
        let outcome = copy::bidirectional(stream, &mut upstream, self.copy).await;
        summary.sent = outcome.a_to_b;
        summary.received = outcome.b_to_a;
        outcome.error.map_or(Ok(()), |e| Err(OutboundError::Copy(e)))
    }
}

fn local_addr(stream: &TcpStream) -> SocketAddr {
    stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

async fn reply(stream: &mut TcpStream, summary: &mut OutboundSummary, outcome: Reply) -> Result<(), OutboundError> {
    summary.reply = Some(outcome);
    socks5::reply(stream, outcome).await.map_err(OutboundError::Reply)
}

/// The VIP of the first service whose hostname is `name` (case-insensitive, a trailing dot
/// ignored): its VIP in the source's network if it has one, else its first.
pub fn resolve(state: &State, source: &Workload, name: &str) -> Option<IpAddr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let service = state
        .services()
        .iter()
        .find(|s| s.hostname.eq_ignore_ascii_case(name) && !s.vips.is_empty())?;
    service
        .vips
        .iter()
        .find(|vip| vip.network == source.network)
        .or_else(|| service.vips.first())
        .map(|vip| vip.address)
}
