//! The inbound proxy: the HBONE server side (15008) and the inbound plaintext
//! capture listener (15006).
//!
//! An [`InboundHandler`] is made for every accepted HBONE connection and decides on each CONNECT
//! stream of it, in this order (the statuses of `HBONE.md`):
//!
//! 1. an `ip:port` authority's IP must be the address the connection arrived on: another one gets
//!    400. A `<service hostname>:<port>` authority (the inner CONNECT of double HBONE, as ztunnel
//!    sends it) is resolved instead ([`State::inbound_service_target`]): to the workload served at
//!    the address the connection arrived on, which must be an endpoint of a service with that
//!    hostname, and its target port for the port; else 400. The destination is then that address
//!    and target port, and the access log's `dst.hbone_addr` the hostname and port, as ztunnel
//!    logs it;
//! 2. the destination port must not be one of the proxy's own ports (nor the port the connection
//!    arrived on): such a request would loop back into the proxy and gets 503;
//! 3. the IP must belong to a workload this proxy serves ([`State::inbound_workload`]): else 400;
//! 4. the policies of the current snapshot must allow the peer: a denial gets 401 (dry-run outcomes
//!    are logged, not enforced), for a hostname authority exactly as for the address it resolved
//!    to;
//! 5. a TCP connection to the destination (`TCP_NODELAY` on) must succeed: else 503.
//!
//! The accepted connection is registered in the [`ConnectionRegistry`], so that a later snapshot
//! whose policies deny it closes it, and the upstream is returned as an [`InboundUpstream`].
//!
//! **Plaintext.** A connection redirected to the inbound plaintext listener goes through steps 2 to 5
//! the same way ([`InboundHandler::open`]), with its original destination (`SO_ORIGINAL_DST`) as the
//! authority and no peer identity: policies that require one refuse it, and its metrics say
//! `connection_security_policy="unknown"`. [`InboundHandler::serve_plaintext`] serves such a
//! connection whole; a refusal closes it with a reset.
//!
//! Connections to the destination workload are made with the handler's [`SocketOptions`] (the
//! proxy's packet mark, so that redirection rules let them through), through the handler's
//! [`Runtime`] ([`TokioRuntime`] by default), whose streams the plaintext listener's connections
//! and the upstreams are.
//!
//! **Telemetry design.** The per-connection state (metrics recorder, start time, access log entry)
//! lives in the [`InboundUpstream`] itself, not in a map keyed by stream: the upstream counts bytes
//! as they pass, and when the HBONE server drops it at the end of the stream, its `Drop` closes the
//! metrics and writes the access log line with the duration measured from the connect. This needs
//! no lookup in [`Handler::finished`] and cannot leak an entry for a stream whose report never
//! comes. Requests refused after the destination workload is known (401, failed connect) are
//! counted and logged (`connection complete` with an `error`) in `connect`; earlier refusals (400,
//! loops) are logged as `connection failed` when the server reports them ([`Handler::finished`]).
//! Over HBONE the access log's `dst.addr` is the address the connection arrived on (`<ip>:15008`)
//! and `dst.hbone_addr` the CONNECT target, as ztunnel logs them.
//!
//! [`State::inbound_workload`]: crate::state::State::inbound_workload
//! [`State::inbound_service_target`]: crate::state::State::inbound_service_target

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use meshwire_hbone::copy::{self, CopyConfig};
use meshwire_hbone::headers::Authority;
use meshwire_hbone::server::{Connected, Handler, InboundRequest, Refusal, RefusalReason, StreamReport};
use meshwire_identity::id::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::{NotRedirected, canonical, check_redirect, check_transparent};

use crate::rbac::{Connection, WorkloadRef};
use crate::rt::Runtime;
use crate::rt::socket::SocketOptions;
use crate::rt::tokio::TokioRuntime;
use crate::state::{LocalProxy, ServiceTargetError};
use crate::telemetry::accesslog::{self, AccessLogEntry, Direction, FailedConnection, HeldEntry};
use crate::telemetry::metrics::{
    ConnectionLabels, ConnectionMetrics, Metrics, Reporter, ResponseFlags, SecurityPolicy,
};
use crate::watch::{
    CloseReason, CloseSignal, ConnectionAttrs, ConnectionGuard, ConnectionRegistry, Published, Snapshot,
};
use crate::xds::{Service, Workload};

/// How long connecting to the destination workload may take before the stream is refused with 503.
const UPSTREAM_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Decides on the CONNECT streams of one accepted HBONE connection and connects their upstreams,
/// on the runtime `R`.
#[derive(Debug, Clone)]
pub struct InboundHandler<R = TokioRuntime> {
    runtime: R,
    published: Published,
    proxy: LocalProxy,
    arrived_on: SocketAddr,
    peer_addr: SocketAddr,
    metrics: Arc<Metrics>,
    registry: ConnectionRegistry,
    socket: SocketOptions,
    /// Whether connections to workloads leave from the client's address (`ENABLE_ORIG_SRC`).
    original_source: bool,
}

impl InboundHandler {
    /// A handler on tokio for a connection that arrived on `arrived_on` (the accepted socket's
    /// local address), connecting upstreams with the
    /// [`DefaultSocketFactory`](crate::rt::socket::DefaultSocketFactory).
    ///
    /// The client's address is unknown (`0.0.0.0:0`) until [`with_peer_addr`](Self::with_peer_addr)
    /// sets it; it is the source address authorization and the access log see.
    pub fn new(
        published: Published,
        proxy: LocalProxy,
        arrived_on: SocketAddr,
        metrics: Arc<Metrics>,
        registry: ConnectionRegistry,
    ) -> Self {
        Self::with_runtime(TokioRuntime::new(), published, proxy, arrived_on, metrics, registry)
    }
}

impl<R: Runtime> InboundHandler<R> {
    /// [`InboundHandler::new`] on `runtime`, which connects the upstreams.
    pub fn with_runtime(
        runtime: R,
        published: Published,
        proxy: LocalProxy,
        arrived_on: SocketAddr,
        metrics: Arc<Metrics>,
        registry: ConnectionRegistry,
    ) -> Self {
        Self {
            runtime,
            published,
            proxy,
            arrived_on: canonical(arrived_on),
            peer_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            metrics,
            registry,
            socket: SocketOptions::default(),
            original_source: false,
        }
    }

    /// Connects to destination workloads from the client's address (the peer address, bound with
    /// `IP_TRANSPARENT`), as ztunnel's `ENABLE_ORIG_SRC` does, instead of the proxy's own: the
    /// workload sees who called it. The replies must come back to the proxy (istio-cni's rules
    /// route them in a pod's namespace).
    pub fn with_original_source(mut self, original_source: bool) -> Self {
        self.original_source = original_source;
        self
    }

    /// Changes the options of the connections to destination workloads (the packet mark, for one).
    pub fn with_socket_options(mut self, socket: SocketOptions) -> Self {
        self.socket = socket;
        self
    }

    /// Sets the client's address (the accepted socket's peer address).
    pub fn with_peer_addr(mut self, peer_addr: SocketAddr) -> Self {
        self.peer_addr = canonical(peer_addr);
        self
    }

    /// The address the connection arrived on.
    pub fn arrived_on(&self) -> SocketAddr {
        self.arrived_on
    }

    /// Counts and logs a request refused after its destination was known, and returns the refusal.
    fn refuse(
        &self,
        recorder: ConnectionMetrics,
        entry: AccessLogEntry,
        flags: ResponseFlags,
        refusal: Refusal,
    ) -> Refusal {
        let summary = recorder.finish(flags);
        let entry = entry
            .with_transfer(summary.sent, summary.received)
            .with_error(&refusal.reason);
        accesslog::emit(&entry);
        refusal
    }

    /// Steps 2 to 5 for a connection from the client to `dst`, with the identity the client proved
    /// (`None` for plaintext): refuses the proxy's own ports (503), a destination that is no served
    /// workload (400), a denial of the policies (401, counted and logged), a failed connect (503,
    /// counted and logged); else connects, registers the connection and returns its upstream.
    pub async fn open(&self, dst: SocketAddr, peer: Option<&SpiffeId>) -> Result<InboundUpstream<R>, Refusal> {
        let dst = canonical(dst);
        if self.proxy.ports.contains(&dst.port()) {
            return Err(Refusal::unavailable(RefusalReason::Loop(dst)));
        }

        let snapshot = self.published.load();
        let Some(workload) = snapshot.state.inbound_workload(&self.proxy, dst.ip()) else {
            return Err(Refusal::bad_request(RefusalReason::NoWorkload(dst.ip())));
        };
        let hbone_addr = peer.is_some().then(|| dst.to_string());
        // The client named no service: report the one ztunnel would guess (`dst.service`).
        let service = snapshot.state.inbound_service_guess(workload, dst.port());
        self.admit(&snapshot, dst, workload, service, peer, hbone_addr).await
    }

    /// Step 1 for a `<hostname>:<port>` authority, then steps 2 to 5: resolves it to the workload
    /// served at the address the connection arrived on and its target port for the service (400
    /// when there is none), refuses the proxy's own ports (503), then goes on as
    /// [`open`](Self::open) does for that address, with the service in the labels and the access
    /// log, and `<hostname>:<port>` as the log's `dst.hbone_addr`.
    async fn open_service(&self, hostname: &str, port: u16, peer: &SpiffeId) -> Result<InboundUpstream<R>, Refusal> {
        let snapshot = self.published.load();
        let target = snapshot
            .state
            .inbound_service_target(&self.proxy, self.arrived_on.ip(), hostname, port)
            .map_err(|error| match error {
                ServiceTargetError::NoWorkload { ip } => Refusal::bad_request(RefusalReason::NoWorkload(ip)),
                other => Refusal::bad_request(format!("CONNECT to {hostname}:{port}: {other}")),
            })?;
        let dst = target.dst;
        if self.proxy.ports.contains(&dst.port()) || dst.port() == self.arrived_on.port() {
            return Err(Refusal::unavailable(RefusalReason::Loop(dst)));
        }
        let hbone_addr = Some(format!("{hostname}:{port}"));
        self.admit(
            &snapshot,
            dst,
            target.workload,
            Some(target.service),
            Some(peer),
            hbone_addr,
        )
        .await
    }

    /// Steps 4 and 5 for a connection to `dst`, an address of `workload` (of `service`, when the
    /// client named one): the policies, the connect, the registration, the upstream.
    async fn admit(
        &self,
        snapshot: &Snapshot,
        dst: SocketAddr,
        workload: &Workload,
        service: Option<&Service>,
        peer: Option<&SpiffeId>,
        hbone_addr: Option<String>,
    ) -> Result<InboundUpstream<R>, Refusal> {
        let source = snapshot
            .state
            .workload_by_ip(&self.proxy.network, self.peer_addr.ip())
            .filter(|w| peer.is_none_or(|peer| w.spiffe_id() == peer));

        let security = if peer.is_some() {
            SecurityPolicy::MutualTls
        } else {
            SecurityPolicy::Unknown
        };
        let labels = ConnectionLabels::new(Reporter::Destination, security)
            .with_source(source)
            .with_source_principal(peer)
            .with_destination(Some(workload))
            .with_destination_service(service);
        // As ztunnel: over HBONE, `dst.addr` is the address the connection arrived on (`<ip>:15008`)
        // and `dst.hbone_addr` the CONNECT target; in plaintext, the original destination.
        let logged_dst = if peer.is_some() { self.arrived_on } else { dst };
        let mut entry = AccessLogEntry::from_labels(&labels, self.peer_addr, logged_dst)
            .with_source_workload(source)
            .with_destination_workload(Some(workload));
        if let Some(target) = hbone_addr {
            entry = entry.with_hbone_addr(target);
        }
        accesslog::emit_opened(&entry);
        let start = Instant::now();

        // Authorization, before the connection is counted as opened: a denied connection is opened
        // and closed with `response_flags="DENY"`, so that the two counters agree.
        let conn = Connection {
            src_identity: peer,
            src: self.peer_addr,
            dst,
        };
        let verdict = snapshot.policies.evaluate(
            &WorkloadRef::new(workload.namespace(), &workload.authorization_policies),
            &conn,
        );
        for outcome in &verdict.dry_run {
            tracing::info!(
                policy = outcome.policy,
                action = %outcome.action,
                matched = outcome.matched,
                would_deny = outcome.would_deny(),
                connection = %conn,
                "dry-run authorization policy"
            );
        }
        if let Some(decision) = &verdict.dry_run_decision {
            tracing::info!(connection = %conn, decision = %decision, "dry-run authorization decision");
        }
        if !verdict.decision.is_allowed() {
            let reason = format!("{}: {}", conn, verdict.decision);
            let flags = ResponseFlags::AuthorizationPolicyDenied;
            return Err(self.refuse(
                self.metrics.open(labels.with_response_flags(flags)),
                entry,
                flags,
                Refusal::unauthorized(RefusalReason::Denied(reason)),
            ));
        }
        let recorder = self.metrics.open(labels);

        // Upstream.
        let source = (self.original_source && !self.peer_addr.ip().is_unspecified()).then_some(self.peer_addr.ip());
        let tcp = match self
            .runtime
            .connect_from(dst, source, &self.socket, UPSTREAM_CONNECT_TIMEOUT)
            .await
        {
            Ok(tcp) => tcp,
            Err(e) => {
                return Err(self.refuse(
                    recorder,
                    entry,
                    ResponseFlags::ConnectionFailure,
                    Refusal::unavailable(RefusalReason::UpstreamConnect {
                        destination: dst,
                        source: Arc::new(e),
                    }),
                ));
            }
        };

        let attrs = ConnectionAttrs::for_workload(workload, peer.cloned(), self.peer_addr, dst);
        let (guard, close) = self.registry.register(attrs);
        Ok(InboundUpstream {
            tcp,
            close,
            closed: None,
            recorder: Some(recorder),
            _guard: guard,
            start,
            entry: Some(self.metrics.hold_entry(entry)),
        })
    }

    /// Serves one connection accepted by the inbound plaintext listener: its original destination
    /// from `SO_ORIGINAL_DST` ([`check_redirect`] refuses a connection that was not redirected), then
    /// [`open`](Self::open) without a peer identity, and the copy until both directions ended (or
    /// a new policy denies the connection). A refusal, or a copy that fails (the workload reset its
    /// connection, say), closes the client's connection with a reset.
    ///
    /// The handler must have been made for this connection: its `arrived_on` the accepted socket's
    /// local address, its peer address the client's.
    pub async fn serve_plaintext(
        &self,
        client: R::Stream,
        config: CopyConfig,
    ) -> Result<PlaintextCopied, PlaintextError> {
        let dst = check_redirect(
            "inbound plaintext",
            R::original_destination(&client),
            self.arrived_on,
            self.peer_addr,
            &self.proxy,
        );
        self.serve_plaintext_to(client, dst, config).await
    }

    /// [`serve_plaintext`](Self::serve_plaintext) for a connection the listener received by TPROXY
    /// (in-pod mode: istio-cni's rules): its destination is the address it arrived on
    /// ([`check_transparent`]); `listener_port` is the listener's own port.
    pub async fn serve_transparent(
        &self,
        client: R::Stream,
        listener_port: u16,
        config: CopyConfig,
    ) -> Result<PlaintextCopied, PlaintextError> {
        let dst = check_transparent(
            "inbound plaintext",
            self.arrived_on,
            listener_port,
            self.peer_addr,
            &self.proxy,
        );
        self.serve_plaintext_to(client, dst, config).await
    }

    async fn serve_plaintext_to(
        &self,
        mut client: R::Stream,
        dst: Result<SocketAddr, NotRedirected>,
        config: CopyConfig,
    ) -> Result<PlaintextCopied, PlaintextError> {
        let result = match dst {
            Ok(dst) => self.open(dst, None).await.map_err(PlaintextError::Refused),
            Err(error) => Err(PlaintextError::NotRedirected(error)),
        };
        let mut upstream = match result {
            Ok(upstream) => upstream,
            Err(error) => {
                if let Err(e) = R::reset_on_close(&client) {
                    tracing::debug!(error = %e, "cannot set SO_LINGER to reset the connection");
                }
                return Err(error);
            }
        };
        let outcome = copy::bidirectional(&mut client, &mut upstream, config).await;
        let copied = PlaintextCopied {
            to_workload: outcome.a_to_b,
            to_client: outcome.b_to_a,
        };
        match outcome.error {
            Some(error) => {
                // Not a clean end (the workload reset the connection, say): pass it on as a reset.
                if let Err(e) = R::reset_on_close(&client) {
                    tracing::debug!(error = %e, "cannot set SO_LINGER to reset the connection");
                }
                Err(PlaintextError::Copy { copied, error })
            }
            None => Ok(copied),
        }
    }
}

/// The bytes an inbound plaintext connection carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlaintextCopied {
    /// From the client to the workload.
    pub to_workload: u64,
    /// From the workload to the client.
    pub to_client: u64,
}

/// Why an inbound plaintext connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlaintextError {
    /// It was not redirected to the listener.
    #[error(transparent)]
    NotRedirected(NotRedirected),
    /// It was refused (the reason names the step; denials and failed connects are in the access log).
    #[error("refused ({}): {}", .0.status, .0.reason)]
    Refused(Refusal),
    /// The copy failed (or a new policy closed the connection) after it was established.
    #[error("copy after {} bytes to the workload and {} to the client: {error}", .copied.to_workload, .copied.to_client)]
    Copy {
        /// What was copied before.
        copied: PlaintextCopied,
        /// The error.
        error: io::Error,
    },
}

impl<R: Runtime> Handler for InboundHandler<R> {
    type Upstream = InboundUpstream<R>;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<InboundUpstream<R>>, Refusal> {
        let dst = match &request.authority {
            Authority::SocketAddr(addr) => canonical(*addr),
            Authority::Host { name, port } => {
                // Boxed: a rare path (double HBONE) whose state would otherwise enlarge every
                // stream's future.
                return Box::pin(self.open_service(name, *port, &request.peer))
                    .await
                    .map(Connected::from);
            }
        };
        if dst.ip() != self.arrived_on.ip() {
            return Err(Refusal::bad_request(RefusalReason::AuthorityMismatch {
                authority: dst.ip(),
                arrived_on: self.arrived_on.ip(),
            }));
        }
        if dst.port() == self.arrived_on.port() {
            return Err(Refusal::unavailable(RefusalReason::Loop(dst)));
        }
        self.open(dst, Some(&request.peer)).await.map(Connected::from)
    }

    /// Accepted streams are counted and logged when their [`InboundUpstream`] drops, and those
    /// refused by a policy or a failed connect in [`connect`](Handler::connect); this logs the
    /// streams refused before (not a CONNECT, a bad authority, no such workload, a loop) as
    /// `connection failed`, as ztunnel does, and traces every report.
    fn finished(&self, report: StreamReport) {
        if let Some(reason) = &report.refusal
            && !matches!(reason, RefusalReason::Denied(_) | RefusalReason::UpstreamConnect { .. })
        {
            accesslog::emit_failed(
                &FailedConnection::new(Direction::Inbound, self.peer_addr, self.arrived_on).with_error(reason),
            );
        }
        tracing::debug!(
            peer = %report.peer,
            authority = ?report.authority.as_ref().map(ToString::to_string),
            status = %report.status,
            refusal = ?report.refusal.as_ref().map(ToString::to_string),
            to_upstream = report.to_upstream,
            from_upstream = report.from_upstream,
            error = ?report.error.as_ref().map(ToString::to_string),
            "inbound HBONE stream finished"
        );
    }
}

/// The upstream of an accepted inbound stream: a TCP connection to the destination workload that
/// counts its bytes into the connection's metrics, fails every read and write once a new policy
/// denies the connection, keeps the connection registered while it lives, and on drop closes the
/// metrics and writes the access log line.
pub struct InboundUpstream<R: Runtime = TokioRuntime> {
    tcp: R::Stream,
    close: CloseSignal,
    /// Set once the close signal fired.
    closed: Option<CloseReason>,
    /// `Some` until dropped.
    recorder: Option<ConnectionMetrics>,
    _guard: ConnectionGuard,
    start: Instant,
    /// `Some` until dropped.
    entry: Option<HeldEntry>,
}

impl<R: Runtime> fmt::Debug for InboundUpstream<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundUpstream")
            .field("close", &self.close)
            .field("closed", &self.closed)
            .field("recorder", &self.recorder)
            .field("start", &self.start)
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> InboundUpstream<R> {
    /// The error every read and write returns once the connection was told to close.
    /// Fails once the close signal fired. A set-once read: no lock on the data path.
    fn check_closed(&mut self) -> io::Result<()> {
        if self.closed.is_none() {
            self.closed = self.close.reason().cloned();
        }
        match &self.closed {
            Some(reason) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("connection closed by policy: {reason}"),
            )),
            None => Ok(()),
        }
    }

    /// When the socket is about to park the task, the close signal must be able to wake it too:
    /// register with it then (and only then, so busy streams never touch its lock).
    fn or_close<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_pending()
            && self.closed.is_none()
            && let Poll::Ready(reason) = Pin::new(&mut self.close).poll(cx)
        {
            self.closed = Some(reason);
            if let Err(e) = self.check_closed() {
                return Poll::Ready(Err(e));
            }
        }
        result
    }

    /// Bytes read from the upstream so far (toward the client).
    pub fn sent(&self) -> u64 {
        self.recorder.as_ref().map_or(0, ConnectionMetrics::sent)
    }

    /// Bytes written to the upstream so far (from the client).
    pub fn received(&self) -> u64 {
        self.recorder.as_ref().map_or(0, ConnectionMetrics::received)
    }
}

impl<R: Runtime> AsyncRead for InboundUpstream<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check_closed()?;
        let before = buf.filled().len();
        let result = Pin::new(&mut self.tcp).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0
            && let Some(recorder) = &self.recorder
        {
            recorder.record_sent(n as u64);
        }
        self.or_close(cx, result)
    }
}

impl<R: Runtime> AsyncWrite for InboundUpstream<R> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check_closed()?;
        let result = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result
            && let Some(recorder) = &self.recorder
        {
            recorder.record_received(*n as u64);
        }
        self.or_close(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_closed()?;
        let result = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result
            && let Some(recorder) = &self.recorder
        {
            recorder.record_received(*n as u64);
        }
        self.or_close(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl<R: Runtime> Drop for InboundUpstream<R> {
    fn drop(&mut self) {
        let (Some(recorder), Some(entry)) = (self.recorder.take(), self.entry.take()) else {
            return;
        };
        let closed = self.closed.take().or_else(|| self.close.reason().cloned());
        let flags = if closed.is_some() {
            ResponseFlags::AuthorizationPolicyDenied
        } else {
            ResponseFlags::None
        };
        let summary = recorder.finish(flags);
        let mut entry = entry
            .into_entry()
            .with_transfer(summary.sent, summary.received)
            .with_duration(self.start.elapsed());
        if let Some(reason) = closed {
            entry = entry.with_error(format!("connection closed by policy: {reason}"));
        }
        accesslog::emit(&entry);
    }
}
