//! The outbound proxy: connections of local workloads, from the SOCKS5 listener (15080) or
//! redirected to the outbound capture listener (15001), carried to their destination.
//!
//! Both listeners share one path, [`Outbound`]; only how the destination is learnt and what the
//! client is told differ:
//!
//! | | SOCKS5 ([`Outbound::serve_socks5`]) | capture ([`Outbound::serve_capture`]) |
//! |---|---|---|
//! | destination | the SOCKS5 request (a service hostname is resolved to its VIP) | `SO_ORIGINAL_DST` |
//! | source workload | dedicated: the proxy's workload; shared: the workload whose IP is the client's | the same |
//! | success | SOCKS5 reply 0x00, then the bytes | the bytes |
//! | refusal or failure | the SOCKS5 reply that fits, then close | close with a reset |
//! | upstream reset, or any failure of the copy | close with a reset | close with a reset |
//!
//! A copy that did not end cleanly (the upstream reset its connection, the tunnel's stream was
//! reset, the tunnel failed) closes the client's connection with a reset (`SO_LINGER` 0), never with
//! a FIN: a clean end of stream would pass for a complete response.
//! Then, for both: the routing decision ([`State::route_outbound`]), an HBONE tunnel from the pool
//! (keyed by the source workload's SPIFFE ID, to the destination's node proxy or its waypoint), a
//! double-HBONE tunnel through the network gateway of another network (an outer stream from the
//! pool to the gateway carrying an inner mTLS connection to the destination; see
//! [`OutboundRoute::DoubleHbone`]), a plain TCP connection (passthrough), or a refusal; the copy;
//! and the telemetry.
//!
//! A connection to the capture listener that was not redirected (no original destination, or the
//! listener itself as the original destination) is refused with a log line naming it, never routed:
//! routing it would connect the proxy to itself ([`check_redirect`]).
//!
//! **Telemetry.** Every routed connection gets metrics with `reporter="source"` (opened when routed,
//! bytes counted as they flow through [`MeteredStream`], closed at the end with `response_flags`
//! `CONNECT` when no upstream could be had) and one access log line with `direction="outbound"` when
//! it ends, both kept in an [`OutboundRecord`] that writes them when dropped, as the inbound side's
//! upstream does (see [`crate::proxy::inbound`]). A SOCKS5 handshake that fails or times out is
//! counted in `istio_tcp_connections_refused_total{listener="socks5"}`.
//!
//! **Runtimes.** [`Outbound`] is written over the [`Runtime`] seam (its stream type, timer, HBONE
//! pool parts, connect and socket operations); [`TokioRuntime`] is the default. What is decided is
//! public as well: [`outbound_labels`], [`outbound_log_entry`], [`OutboundRecord`],
//! [`MeteredStream`] (over the `tokio::io` traits only) and [`check_redirect`].
//!
//! [`CertManagerTls`] gives the HBONE pool's [`TokioConnector`] its client TLS configs from the
//! certificate manager.
//!
//! [`TokioConnector`]: crate::rt::tokio::TokioConnector

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use meshwire_hbone::budget::BufferBudget;
use meshwire_hbone::client::{ConnectError, ConnectRequest, Tunnel};
use meshwire_hbone::copy::{self, CopyConfig, CopyOutcome};
use meshwire_hbone::double;
use meshwire_hbone::headers::{Authority, Forwarded, Metadata};
use meshwire_hbone::pool::{Pool, PoolKey};
use meshwire_hbone::rt::timeout;
use meshwire_identity::id::SpiffeId;
use meshwire_identity::manager::{CertManager, Priority};
use meshwire_identity::source::CertSource;
use meshwire_identity::time::Timer;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Listener;
use crate::proxy::{NotRedirected, canonical, check_redirect};
use crate::rt::Runtime;
use crate::rt::socket::SocketOptions;
use crate::rt::tokio::{ClientTlsSource, TokioRuntime};
use crate::socks5::{self, Reply, Socks5Error, Target};
use crate::state::{LocalProxy, OutboundRoute, Refusal, State};
use crate::telemetry::accesslog::{self, AccessLogEntry, Direction, FailedConnection, HeldEntry};
use crate::telemetry::metrics::{
    ConnectionLabels, ConnectionMetrics, LabelValue, Metrics, RefusalReason, Reporter, ResponseFlags, SecurityPolicy,
};
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

/// The HBONE pool of the data path on the runtime `R`: its [`Runtime::Connector`] with client TLS
/// configs from `S`, its [`Runtime::Executor`] and [`Runtime::Timer`] (on tokio, the default:
/// [`TokioConnector`], [`TokioExecutor`] and [`TokioTimer`]).
///
/// [`TokioConnector`]: crate::rt::tokio::TokioConnector
/// [`TokioExecutor`]: crate::rt::tokio::TokioExecutor
/// [`TokioTimer`]: crate::rt::tokio::TokioTimer
pub type HbonePool<S, R = TokioRuntime> =
    Pool<<R as Runtime>::Connector<S>, <R as Runtime>::Executor, <R as Runtime>::Timer>;

/// Whose connections the outbound listeners carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceWorkload {
    /// One workload's (dedicated mode): the workload with this namespace and name, looked up in each
    /// snapshot, so that a change of its configuration (uid, identity, network) is followed.
    Dedicated {
        /// The workload's namespace.
        namespace: String,
        /// The workload's (pod) name.
        name: String,
    },
    /// Any local workload's (shared mode): the workload whose IP is the client's address.
    Shared,
}

impl SourceWorkload {
    /// The source workload of a client at `peer` in `state`, for a proxy in `network`.
    pub fn resolve<'a>(&self, state: &'a State, network: &str, peer: SocketAddr) -> Option<&'a Workload> {
        match self {
            SourceWorkload::Dedicated { namespace, name } => state.workload_by_name(namespace, name),
            SourceWorkload::Shared => state.workload_by_ip(network, peer.ip().to_canonical()),
        }
    }

    /// The error of a connection from `peer` whose source workload [`resolve`](Self::resolve) did
    /// not find: in dedicated mode, the proxy's own workload is missing from the configuration.
    pub fn unknown(&self, peer: SocketAddr) -> OutboundError {
        match self {
            SourceWorkload::Dedicated { namespace, name } => OutboundError::DedicatedWorkloadMissing {
                workload: format!("{namespace}/{name}"),
            },
            SourceWorkload::Shared => OutboundError::UnknownSource { peer },
        }
    }
}

/// Which way a connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// An HBONE tunnel to the destination workload's node proxy.
    Hbone,
    /// An HBONE tunnel to the destination's waypoint.
    Waypoint,
    /// Double HBONE: an inner HBONE tunnel to the destination inside an outer one to the network
    /// gateway of its network.
    DoubleHbone,
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
            RouteKind::DoubleHbone => "double-hbone",
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
    /// A connection to the capture listener that was not redirected to it.
    #[error(transparent)]
    NotRedirected(#[from] NotRedirected),
    /// No workload is known as the source of the connection.
    #[error("no local workload for the client {peer}")]
    UnknownSource {
        /// The client's address.
        peer: SocketAddr,
    },
    /// In dedicated mode, the proxy's own workload is not in the configuration.
    #[error("the dedicated workload {workload} is not in the local configuration")]
    DedicatedWorkloadMissing {
        /// The workload, as `namespace/name`.
        workload: String,
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

/// What became of one outbound connection.
#[derive(Debug, Default)]
pub struct OutboundSummary {
    /// What the client asked for, once the SOCKS5 handshake completed (SOCKS5 only).
    pub target: Option<Target>,
    /// The destination: after name resolution (SOCKS5), or the original destination (capture).
    pub dst: Option<SocketAddr>,
    /// The identity the connection went out with (the source workload's), once known.
    pub source: Option<SpiffeId>,
    /// Which way it went, once routed.
    pub route: Option<RouteKind>,
    /// The SOCKS5 reply sent after the request (SOCKS5 only; none when the handshake failed).
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
        ConnectError::HandshakeTimeout(_) | ConnectError::Unresponsive { .. } => Reply::HostUnreachable,
        _ => Reply::GeneralFailure,
    }
}

/// The metric labels of an outbound connection (`reporter="source"`) from `source`, routed by
/// `route`: `mutual_tls` and the source's identity as `source_principal` over HBONE (to the
/// destination or its waypoint, or double HBONE through a network gateway: the mTLS is end to
/// end), `unknown` for passthrough; the destination workload and service as far as `state` knows
/// them.
pub fn outbound_labels(state: &State, source: &Workload, route: &OutboundRoute) -> ConnectionLabels {
    let mtls = matches!(
        route,
        OutboundRoute::Hbone { .. } | OutboundRoute::Waypoint { .. } | OutboundRoute::DoubleHbone { .. }
    );
    let security = if mtls {
        SecurityPolicy::MutualTls
    } else {
        SecurityPolicy::Unknown
    };
    let mut labels = ConnectionLabels::new(Reporter::Source, security)
        .with_source(Some(source))
        .with_source_principal(mtls.then(|| source.spiffe_id()));
    let service = match route {
        OutboundRoute::Hbone { service, .. }
        | OutboundRoute::Waypoint { service, .. }
        | OutboundRoute::Passthrough { service, .. } => service.as_ref(),
        OutboundRoute::DoubleHbone { service, .. } => Some(service),
        _ => None,
    };
    labels = labels.with_destination_service(service.and_then(|key| state.service_by_hostname(key)));
    match route {
        OutboundRoute::Hbone { workload, .. } | OutboundRoute::DoubleHbone { workload, .. } => {
            labels = labels.with_destination(state.workload_by_uid(workload));
        }
        OutboundRoute::Waypoint {
            expected_identities, ..
        } => {
            if let Some(id) = expected_identities.first() {
                labels.destination_principal = id.to_string().into();
            }
        }
        OutboundRoute::Passthrough { workload, .. } => {
            labels = labels.with_destination(workload.as_deref().and_then(|uid| state.workload_by_uid(uid)));
            // Not authenticated: no principal to report.
            labels.destination_principal = LabelValue::unknown();
        }
        _ => {}
    }
    labels
}

/// The access log entry of an outbound connection from `peer` to the original destination `dst`,
/// routed by `route`, with `labels` from [`outbound_labels`]: `dst.addr` is the address the proxy
/// connects to (the HBONE endpoint, the network gateway of double HBONE, or the passthrough
/// destination), `dst.hbone_addr` the CONNECT target inside the tunnel (for double HBONE, the
/// CONNECTs': `<service hostname>:<port>`, as ztunnel logs it beside the gateway).
pub fn outbound_log_entry(
    state: &State,
    labels: &ConnectionLabels,
    source: &Workload,
    peer: SocketAddr,
    dst: SocketAddr,
    route: &OutboundRoute,
) -> AccessLogEntry {
    let to = match route {
        OutboundRoute::Hbone { endpoint, .. } | OutboundRoute::Waypoint { endpoint, .. } => *endpoint,
        OutboundRoute::DoubleHbone { gateway, .. } => *gateway,
        OutboundRoute::Passthrough { dst, .. } => *dst,
        _ => dst,
    };
    let entry = AccessLogEntry::from_labels(labels, peer, to).with_source_workload(Some(source));
    match route {
        OutboundRoute::Hbone {
            authority, workload, ..
        } => entry
            .with_destination_workload(state.workload_by_uid(workload))
            .with_hbone_addr(authority),
        OutboundRoute::DoubleHbone {
            service,
            port,
            workload,
            ..
        } => entry
            .with_destination_workload(state.workload_by_uid(workload))
            .with_hbone_addr(format_args!("{}:{port}", service.hostname)),
        OutboundRoute::Waypoint { authority, .. } => entry.with_hbone_addr(authority),
        OutboundRoute::Passthrough { workload, .. } => {
            entry.with_destination_workload(workload.as_deref().and_then(|uid| state.workload_by_uid(uid)))
        }
        _ => entry,
    }
}

/// The telemetry of one outbound connection: its metrics, counted while the bytes flow (through
/// [`MeteredStream`]), and its access log line. Both are finished when the record drops, with the
/// response flags and error set by [`fail`](Self::fail), so that a connection is counted as closed
/// and logged exactly once however it ends (a task abandoned at the drain deadline included).
#[derive(Debug)]
pub struct OutboundRecord {
    /// `Some` until dropped.
    recorder: Option<ConnectionMetrics>,
    /// `Some` until dropped.
    entry: Option<HeldEntry>,
    start: Instant,
    flags: ResponseFlags,
    error: Option<String>,
}

impl OutboundRecord {
    /// Counts the connection as opened in `metrics` with `labels`; `entry` is logged at the end.
    pub fn open(metrics: &Metrics, labels: ConnectionLabels, entry: AccessLogEntry) -> Self {
        accesslog::emit_opened(&entry);
        Self {
            recorder: Some(metrics.open(labels)),
            entry: Some(metrics.hold_entry(entry)),
            start: Instant::now(),
            flags: ResponseFlags::None,
            error: None,
        }
    }

    /// The connection's metrics, to count bytes into.
    pub fn metrics(&self) -> Option<&ConnectionMetrics> {
        self.recorder.as_ref()
    }

    /// Records why the connection failed: `flags` for the closed counter (unless `None`) and the
    /// access log's `error`.
    pub fn fail(&mut self, flags: Option<ResponseFlags>, error: impl fmt::Display) {
        if let Some(flags) = flags {
            self.flags = flags;
        }
        self.error = Some(error.to_string());
    }
}

impl Drop for OutboundRecord {
    fn drop(&mut self) {
        let (Some(recorder), Some(entry)) = (self.recorder.take(), self.entry.take()) else {
            return;
        };
        let summary = recorder.finish(self.flags);
        let mut entry = entry
            .into_entry()
            .with_transfer(summary.sent, summary.received)
            .with_duration(self.start.elapsed());
        if let Some(error) = self.error.take() {
            entry = entry.with_error(error);
        }
        accesslog::emit(&entry);
    }
}

/// The client's side of a proxied connection, counting its bytes into the connection's metrics as
/// they pass: what is read from the client (the request direction) as received, what is written to
/// it (the response direction) as sent. Generic over the `tokio::io` traits only.
#[derive(Debug)]
pub struct MeteredStream<'a, D: ?Sized> {
    inner: &'a mut D,
    metrics: Option<&'a ConnectionMetrics>,
}

impl<'a, D: ?Sized> MeteredStream<'a, D> {
    /// `inner`, counted into `metrics` (nothing is counted with `None`).
    pub fn new(inner: &'a mut D, metrics: Option<&'a ConnectionMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<D: AsyncRead + Unpin + ?Sized> AsyncRead for MeteredStream<'_, D> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0
            && let Some(metrics) = self.metrics
        {
            metrics.record_received(n as u64);
        }
        result
    }
}

impl<D: AsyncWrite + Unpin + ?Sized> AsyncWrite for MeteredStream<'_, D> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result
            && let Some(metrics) = self.metrics
        {
            metrics.record_sent(*n as u64);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result
            && let Some(metrics) = self.metrics
        {
            metrics.record_sent(*n as u64);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// How the client reached the proxy, which decides what it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Downstream {
    /// Through the SOCKS5 listener: it gets a SOCKS5 reply before any byte of the destination.
    Socks5,
    /// Redirected to the capture listener: it is told nothing; a refusal resets the connection.
    Redirected,
}

/// The connection to the destination.
enum Upstream<T> {
    Tunnel(Tunnel),
    Tcp(T),
}

/// An outbound connection whose upstream is open (and whose SOCKS5 client was told so): what its
/// copy needs.
struct Established<T> {
    record: OutboundRecord,
    upstream: Upstream<T>,
}

/// The outbound proxy: the shared path of the SOCKS5 and capture listeners, on the runtime `R`.
pub struct Outbound<S: ClientTlsSource, R: Runtime = TokioRuntime> {
    runtime: R,
    published: Published,
    proxy: LocalProxy,
    source: SourceWorkload,
    pool: HbonePool<S, R>,
    copy: CopyConfig,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    socket: SocketOptions,
    metrics: Arc<Metrics>,
    pick: AtomicU64,
    /// The budget HBONE tunnels hold the client's bytes within, and one tunnel's lease.
    budget: Option<(Arc<BufferBudget>, usize)>,
}

impl<S: ClientTlsSource, R: Runtime> fmt::Debug for Outbound<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("proxy", &self.proxy)
            .field("source", &self.source)
            .field("copy", &self.copy)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl<S: ClientTlsSource> Outbound<S> {
    /// An outbound path on tokio routing with the current snapshot of `published`, for `proxy`,
    /// carrying the connections of `source` over `pool`; passthrough connections are made with the
    /// [`DefaultSocketFactory`](crate::rt::socket::DefaultSocketFactory). Its metrics go to a
    /// registry of its own until [`with_telemetry`](Self::with_telemetry) names the proxy's.
    pub fn new(
        published: Published,
        proxy: LocalProxy,
        source: SourceWorkload,
        pool: HbonePool<S>,
        copy: CopyConfig,
    ) -> Self {
        Self::with_runtime(TokioRuntime::new(), published, proxy, source, pool, copy)
    }
}

impl<S, R> Outbound<S, R>
where
    S: ClientTlsSource,
    R: Runtime,
{
    /// [`Outbound::new`] on `runtime`, which makes the passthrough connections.
    pub fn with_runtime(
        runtime: R,
        published: Published,
        proxy: LocalProxy,
        source: SourceWorkload,
        pool: HbonePool<S, R>,
        copy: CopyConfig,
    ) -> Self {
        Self {
            runtime,
            published,
            proxy,
            source,
            pool,
            copy,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            socket: SocketOptions::default(),
            metrics: Arc::new(Metrics::new()),
            pick: AtomicU64::new(0),
            budget: None,
        }
    }

    /// Counts the connections in `metrics` (the access log lines go to `tracing` whatever the metrics).
    pub fn with_telemetry(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Holds what HBONE tunnels buffer of their clients' bytes within `budget`, each tunnel
    /// taking a lease of `lease` bytes while its client sends (see
    /// [`meshwire_hbone::budget`]); without it, only each tunnel's own buffers bound it.
    pub fn with_buffer_budget(mut self, budget: Arc<BufferBudget>, lease: usize) -> Self {
        self.budget = Some((budget, lease));
        self
    }

    /// Changes the options of passthrough connections (the packet mark, for one); the HBONE
    /// connections take theirs from the pool's connector.
    pub fn with_socket_options(mut self, socket: SocketOptions) -> Self {
        self.socket = socket;
        self
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
    pub fn pool(&self) -> &HbonePool<S, R> {
        &self.pool
    }

    /// The metrics the connections are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves one SOCKS5 connection from `peer`: handshake, route, connect, reply, copy until both
    /// directions ended. Failures are logged and returned in the summary.
    ///
    /// In two phases, so that a connection holds the state of its copy only: the handshake, the
    /// route and the opening of the upstream (boxed, given back once the upstream is open), then
    /// the copy. Not an `async fn`, which would keep its arguments twice
    /// (as passed, and as the locals they are moved into).
    pub fn serve_socks5(&self, mut stream: R::Stream, peer: SocketAddr) -> impl Future<Output = OutboundSummary> + '_ {
        let peer = canonical(peer);
        async move {
            let mut summary = OutboundSummary::default();
            let established = Box::pin(self.socks5(&mut stream, peer, &mut summary)).await;
            if let Err(error) = self.copy(&mut stream, established, &mut summary).await {
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
    }

    /// Serves one connection redirected to the outbound capture listener from `peer`: its original
    /// destination from `SO_ORIGINAL_DST` ([`check_redirect`] refuses a connection that was not
    /// redirected), then [`serve_redirected`](Self::serve_redirected).
    ///
    /// Not an `async fn`: one would keep the stream and the peer beside the future it hands them to.
    pub fn serve_capture(&self, stream: R::Stream, peer: SocketAddr) -> impl Future<Output = OutboundSummary> + '_ {
        use futures_util::future::Either;
        let peer = canonical(peer);
        let local = R::local_addr(&stream).unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        match check_redirect("outbound", R::original_destination(&stream), local, peer, &self.proxy) {
            Ok(dst) => Either::Left(self.serve_redirected(stream, peer, dst)),
            Err(error) => {
                tracing::warn!(%peer, %error, "outbound capture connection refused");
                reset::<R>(&stream);
                Either::Right(std::future::ready(OutboundSummary {
                    error: Some(error.into()),
                    ..OutboundSummary::default()
                }))
            }
        }
    }

    /// Serves one connection from `peer` whose original destination is `dst` (as a capture
    /// listener learnt it): route, connect, copy until both directions ended. The client is told
    /// nothing; a refusal, a failed connect or a failed copy closes its connection with a reset. Failures are
    /// logged and returned in the summary.
    ///
    /// In two phases, as [`serve_socks5`](Self::serve_socks5), and not an `async fn` either.
    pub fn serve_redirected(
        &self,
        mut stream: R::Stream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> impl Future<Output = OutboundSummary> + '_ {
        let peer = canonical(peer);
        async move {
            let mut summary = OutboundSummary::default();
            let established = Box::pin(async {
                let snapshot = self.published.load();
                let source = self.source.resolve(&snapshot.state, &self.proxy.network, peer);
                self.establish(
                    &mut stream,
                    peer,
                    source,
                    &snapshot.state,
                    dst,
                    Downstream::Redirected,
                    &mut summary,
                )
                .await
            })
            .await;
            if let Err(error) = self.copy(&mut stream, established, &mut summary).await {
                tracing::warn!(%peer, %dst, route = ?summary.route, %error, "outbound connection failed");
                reset::<R>(&stream);
                summary.error = Some(error);
            }
            summary
        }
    }

    async fn socks5(
        &self,
        stream: &mut R::Stream,
        peer: SocketAddr,
        summary: &mut OutboundSummary,
    ) -> Result<Established<R::Stream>, OutboundError> {
        let timer = self.runtime.timer();
        let request = match timeout(&timer, self.handshake_timeout, socks5::accept(stream)).await {
            Some(Ok(request)) => request,
            Some(Err(error)) => {
                self.metrics.refused(Listener::Socks5, RefusalReason::Socks5Handshake);
                return Err(error.into());
            }
            None => {
                self.metrics.refused(Listener::Socks5, RefusalReason::HandshakeTimeout);
                return Err(OutboundError::HandshakeTimeout(self.handshake_timeout));
            }
        };
        summary.target = Some(request.target.clone());
        let snapshot = self.published.load();
        let state = &snapshot.state;
        let source = self.source.resolve(state, &self.proxy.network, peer);
        let dst = match &request.target {
            Target::Addr(addr) => canonical(*addr),
            Target::Domain { name, port } => {
                let network = source.map_or(self.proxy.network.as_str(), |s| s.network.as_str());
                match resolve_in(state, network, name) {
                    Some(ip) => SocketAddr::new(ip, *port),
                    None => {
                        reply(stream, summary, Reply::HostUnreachable).await?;
                        return Err(OutboundError::Unresolved { name: name.clone() });
                    }
                }
            }
        };
        self.establish(stream, peer, source, state, dst, Downstream::Socks5, summary)
            .await
    }

    /// The path both listeners share, up to the copy: route the connection of `source` at `peer`
    /// to `dst`, open the upstream, tell a SOCKS5 client how it went, and record it all.
    #[allow(clippy::too_many_arguments)]
    async fn establish(
        &self,
        stream: &mut R::Stream,
        peer: SocketAddr,
        source: Option<&Workload>,
        state: &State,
        dst: SocketAddr,
        downstream: Downstream,
        summary: &mut OutboundSummary,
    ) -> Result<Established<R::Stream>, OutboundError> {
        summary.dst = Some(dst);
        let Some(source) = source else {
            // Refused before any route: `connection failed`, as ztunnel logs a request it could not
            // build.
            let error = self.source.unknown(peer);
            accesslog::emit_failed(&FailedConnection::new(Direction::Outbound, peer, dst).with_error(&error));
            if downstream == Downstream::Socks5 {
                reply(stream, summary, Reply::GeneralFailure).await?;
            }
            return Err(error);
        };
        summary.source = Some(source.spiffe_id().clone());

        // In a block that ends before the first await, so that the route and the labels, moved
        // into the record and the opening, take no room in this future; the opening (a pooled
        // CONNECT or a TCP connect) is boxed, so that its state is not kept for the rest of the
        // connection's life, which it would size otherwise.
        let (mut record, opening) = {
            let pick = self.pick.fetch_add(1, Ordering::Relaxed);
            let route = state.route_outbound(&self.proxy, source, dst, pick);
            summary.route = Some(RouteKind::of(&route));
            let labels = outbound_labels(state, source, &route);
            let entry = outbound_log_entry(state, &labels, source, peer, dst, &route);
            let record = OutboundRecord::open(&self.metrics, labels, entry);
            (record, Box::pin(self.open(peer, source, route)))
        };

        let upstream = match opening.await {
            Ok(upstream) => upstream,
            Err((error, refusal)) => {
                record.fail(Some(ResponseFlags::ConnectionFailure), &error);
                if downstream == Downstream::Socks5 {
                    reply(stream, summary, refusal).await?;
                }
                return Err(error);
            }
        };
        if downstream == Downstream::Socks5 {
            let bound = local_addr::<R>(stream);
            if let Err(error) = reply(stream, summary, Reply::Succeeded { bound }).await {
                record.fail(None, &error);
                return Err(error);
            }
        }

        Ok(Established { record, upstream })
    }

    /// Copies between the client and the upstream of an established connection until both
    /// directions ended, counting the bytes into its record; on a failed copy, resets the client.
    /// A connection that was not established ends at once with its error.
    ///
    /// Not an `async fn`: one would keep `established` as its argument and again as the parts
    /// bound out of it, for the connection's life. Each upstream kind's future holds the record
    /// and the upstream once.
    fn copy<'a>(
        &'a self,
        stream: &'a mut R::Stream,
        established: Result<Established<R::Stream>, OutboundError>,
        summary: &'a mut OutboundSummary,
    ) -> impl Future<Output = Result<(), OutboundError>> + 'a {
        use futures_util::future::Either;
        let Established { mut record, upstream } = match established {
            Ok(established) => established,
            Err(error) => return Either::Right(std::future::ready(Err(error))),
        };
        let config = self.copy;
        let budget = self.budget.as_ref().map(|(budget, lease)| (&**budget, *lease));
        Either::Left(match upstream {
            Upstream::Tunnel(mut tunnel) => Either::Left(async move {
                let mut client = MeteredStream::new(&mut *stream, record.metrics());
                let CopyOutcome { a_to_b, b_to_a, error } = match budget {
                    Some((budget, lease)) => tunnel.splice_within(&mut client, config, budget, lease).await,
                    None => tunnel.splice(&mut client, config).await,
                };
                copied::<R>(stream, &mut record, summary, b_to_a, a_to_b, error)
            }),
            Upstream::Tcp(mut tcp) => Either::Right(async move {
                let mut client = MeteredStream::new(&mut *stream, record.metrics());
                let CopyOutcome { a_to_b, b_to_a, error } = copy::bidirectional(&mut client, &mut tcp, config).await;
                copied::<R>(stream, &mut record, summary, a_to_b, b_to_a, error)
            }),
        })
    }

    /// Opens the upstream `route` names; on failure, the error and the SOCKS5 reply that fits it.
    async fn open(
        &self,
        peer: SocketAddr,
        source: &Workload,
        route: OutboundRoute,
    ) -> Result<Upstream<R::Stream>, (OutboundError, Reply)> {
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
                let key = PoolKey::new(source.spiffe_id().clone(), expected_identities, endpoint, None);
                let mut forwarded = Forwarded::new(peer);
                if let Some(service) = service {
                    forwarded = forwarded.with_host(service.hostname);
                }
                let request = ConnectRequest {
                    authority: Authority::SocketAddr(authority),
                    metadata: Metadata {
                        forwarded: Some(forwarded),
                        ..Metadata::default()
                    },
                };
                match self.pool.connect(&key, &request).await {
                    Ok(tunnel) => Ok(Upstream::Tunnel(tunnel)),
                    Err(error) => {
                        let reply = reply_for_hbone_error(&error);
                        Err((error.into(), reply))
                    }
                }
            }
            OutboundRoute::DoubleHbone {
                gateway,
                gateway_identities,
                expected_endpoint,
                expected_identities,
                service,
                port,
                ..
            } => {
                let legs = DoubleHbone {
                    gateway,
                    gateway_identities,
                    expected_endpoint,
                    expected_identities,
                    service,
                    port,
                };
                // Boxed: a rare path whose state would otherwise enlarge every connection's future.
                match Box::pin(self.double_hbone(peer, source, legs)).await {
                    Ok(tunnel) => Ok(Upstream::Tunnel(tunnel)),
                    Err(error) => {
                        let reply = reply_for_hbone_error(&error);
                        Err((error.into(), reply))
                    }
                }
            }
            OutboundRoute::Passthrough { dst, .. } => {
                match self.runtime.connect(dst, &self.socket, self.connect_timeout).await {
                    Ok(tcp) => Ok(Upstream::Tcp(tcp)),
                    Err(source) => {
                        let reply = Reply::for_connect_error(&source);
                        Err((OutboundError::Connect { dst, source }, reply))
                    }
                }
            }
            OutboundRoute::Refused { reason, .. } => Err((OutboundError::Refused(reason), Reply::NotAllowed)),
        }
    }
}

/// The parts of an [`OutboundRoute::DoubleHbone`] the data path uses.
struct DoubleHbone {
    gateway: SocketAddr,
    gateway_identities: Vec<SpiffeId>,
    expected_endpoint: SocketAddr,
    expected_identities: Vec<SpiffeId>,
    service: crate::xds::NamespacedHostname,
    port: u16,
}

impl<S, R> Outbound<S, R>
where
    S: ClientTlsSource,
    R: Runtime,
{
    /// Opens a double-HBONE tunnel for the client at `peer` of `source`:
    ///
    /// 1. the inner connection's client TLS config (the source's certificate, accepting only the
    ///    identities of the service's endpoints behind the gateway), from the pool connector's
    ///    source of configs, fetched first so that no stream is held open while a certificate is
    ///    fetched;
    /// 2. the outer stream, from the pool: mTLS to the gateway (accepting only its identities) and
    ///    a CONNECT to `<service hostname>:<service port>`, which is what ztunnel sends and what an
    ///    east-west gateway routes on, to any endpoint of the service in its network;
    /// 3. inside it ([`double::connect`]): mTLS to that endpoint's node proxy, HTTP/2, and a
    ///    CONNECT to `<service hostname>:<service port>` again (as ztunnel sends it: the endpoint's
    ///    proxy resolves it to its workload's target port, whichever endpoint the gateway chose)
    ///    with `forwarded` and `x-forwarded-network` (the source's network). Its driver runs on the
    ///    pool's executor; dropping the returned tunnel ends the inner connection and then the outer
    ///    stream.
    ///
    /// The outer connections are pooled like any HBONE connection (keyed by the source identity,
    /// the gateway's identities and address), so that tunnels to one gateway share them; the inner
    /// connection is one per tunnel and never pooled, as in ztunnel: the gateway may route each
    /// outer stream to another endpoint, so an inner connection cannot be reused for another
    /// tunnel. The inner handshake and CONNECT are bounded by the connect timeout.
    async fn double_hbone(
        &self,
        peer: SocketAddr,
        source: &Workload,
        legs: DoubleHbone,
    ) -> Result<Tunnel, ConnectError> {
        let DoubleHbone {
            gateway,
            gateway_identities,
            expected_endpoint,
            expected_identities,
            service,
            port,
        } = legs;
        let source_id = source.spiffe_id();
        let Some(tls) = R::client_tls(self.pool.connector()) else {
            return Err(tls_error(io::Error::other(
                "double HBONE: this runtime's HBONE connector gives no client TLS configs",
            )));
        };
        // Never pooled: the key only asks the source of configs for the right certificate and
        // expected identities.
        let inner_key = PoolKey::new(source_id.clone(), expected_identities, expected_endpoint, None);
        let inner_tls = tls.client_config(&inner_key).await?;

        let forwarded = Forwarded::new(peer).with_host(service.hostname.clone());
        let authority = Authority::host(&service.hostname, port)
            .map_err(|error| ConnectError::InvalidRequest(format!("service hostname {}: {error}", service.hostname)))?;
        let outer_request = ConnectRequest {
            authority: authority.clone(),
            metadata: Metadata {
                forwarded: Some(forwarded.clone()),
                ..Metadata::default()
            },
        };
        let outer_key = PoolKey::new(source_id.clone(), gateway_identities, gateway, None);
        let outer = self.pool.connect(&outer_key, &outer_request).await?;

        let inner_request = ConnectRequest {
            authority,
            metadata: Metadata {
                forwarded: Some(forwarded),
                x_forwarded_network: (!source.network.is_empty()).then(|| source.network.clone()),
                ..Metadata::default()
            },
        };
        let timer = self.runtime.timer();
        let settings = &self.pool.config().settings;
        let inner = double::connect(
            outer,
            inner_tls,
            &inner_request,
            settings,
            timer.clone(),
            self.pool.executor(),
        );
        match timeout(&timer, self.connect_timeout, inner).await {
            Some(result) => result,
            None => Err(ConnectError::HandshakeTimeout(self.connect_timeout)),
        }
    }
}

impl RouteKind {
    /// The kind of `route`.
    pub fn of(route: &OutboundRoute) -> Self {
        match route {
            OutboundRoute::Hbone { .. } => RouteKind::Hbone,
            OutboundRoute::Waypoint { .. } => RouteKind::Waypoint,
            OutboundRoute::DoubleHbone { .. } => RouteKind::DoubleHbone,
            OutboundRoute::Passthrough { .. } => RouteKind::Passthrough,
            _ => RouteKind::Refused,
        }
    }
}

/// What ends a copy: the bytes sent to the upstream and to the client in the summary; a failed
/// copy recorded, and the client reset.
fn copied<R: Runtime>(
    stream: &R::Stream,
    record: &mut OutboundRecord,
    summary: &mut OutboundSummary,
    to_upstream: u64,
    to_client: u64,
    error: Option<io::Error>,
) -> Result<(), OutboundError> {
    summary.sent = to_upstream;
    summary.received = to_client;
    match error {
        Some(error) => {
            // The connection did not end cleanly (the upstream or the tunnel was reset, say): the
            // client must not see a clean end of stream, which would pass for a complete response.
            reset::<R>(stream);
            record.fail(None, &error);
            Err(OutboundError::Copy(error))
        }
        None => Ok(()),
    }
}

/// Makes dropping `stream` reset the connection; a failure only means it ends with a FIN.
fn reset<R: Runtime>(stream: &R::Stream) {
    if let Err(error) = R::reset_on_close(stream) {
        tracing::debug!(%error, "cannot set SO_LINGER to reset the connection");
    }
}

fn local_addr<R: Runtime>(stream: &R::Stream) -> SocketAddr {
    R::local_addr(stream)
        .map(canonical)
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

async fn reply<D: AsyncWrite + Unpin + ?Sized>(
    stream: &mut D,
    summary: &mut OutboundSummary,
    outcome: Reply,
) -> Result<(), OutboundError> {
    summary.reply = Some(outcome);
    socks5::reply(stream, outcome).await.map_err(OutboundError::Reply)
}

/// The VIP of the first service whose hostname is `name` (case-insensitive, a trailing dot
/// ignored): its VIP in the source's network if it has one, else its first.
pub fn resolve(state: &State, source: &Workload, name: &str) -> Option<IpAddr> {
    resolve_in(state, &source.network, name)
}

/// [`resolve`] for a client in `network`.
pub fn resolve_in(state: &State, network: &str, name: &str) -> Option<IpAddr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let service = state
        .services()
        .find(|s| s.hostname.eq_ignore_ascii_case(name) && !s.vips.is_empty())?;
    service
        .vips
        .iter()
        .find(|vip| vip.network == network)
        .or_else(|| service.vips.first())
        .map(|vip| vip.address)
}
