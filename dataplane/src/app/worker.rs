//! The serving of accepted connections, written once over [`Runtime`]: a [`Worker`] holds what
//! a set of connections shares on one runtime (the whole tokio proxy, or one core of the io_uring
//! build): the [`ProxyContext`], the metrics and connection registry it counts in, and the
//! outbound path with its HBONE pool.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::Pool;
use meshwire_hbone::server::{self, ServeError};
use meshwire_identity::manager::Priority;

use super::plane::{ProxyContext, ProxyTls};
use crate::config::Listener;
use crate::proxy::canonical;
use crate::proxy::inbound::InboundHandler;
use crate::proxy::outbound::Outbound;
use crate::rt::Runtime;
use crate::telemetry::accesslog::{self, Direction, FailedConnection};
use crate::telemetry::metrics::{Metrics, RefusalReason};
use crate::watch::{CloseSignal, ConnectionGuard, ConnectionRegistry};

/// The outbound path of a [`Worker`] on the runtime `R`.
pub type WorkerOutbound<R> = Outbound<ProxyTls, R>;

/// What the connections accepted on one runtime (or one core) share: the context, their metrics
/// and registry, and the outbound path with its HBONE pool. The accept loops of [`lifecycle`](super::lifecycle)
/// hand every accepted connection to one of its `serve_*` methods.
pub struct Worker<R: Runtime> {
    context: Arc<ProxyContext>,
    runtime: R,
    metrics: Arc<Metrics>,
    registry: ConnectionRegistry,
    outbound: WorkerOutbound<R>,
    /// When the worker was made: the origin of `fd_warning_at`.
    started: Instant,
    /// When the next warning about running out of file descriptors may be logged, in milliseconds
    /// since `started`.
    fd_warning_at: AtomicU64,
    /// `Some(port)` when the inbound plaintext listener (on `port`) receives its connections by
    /// TPROXY (a pod's, in in-pod mode) rather than by REDIRECT.
    transparent_plaintext: Option<u16>,
    /// Whether connections to destination workloads leave from the client's address.
    original_source: bool,
    /// Whether outbound connections (capture, SOCKS5) are registered too (a pod's worker: they
    /// close with the pod, and the drain waits for them).
    outbound_registered: bool,
}

/// How often a worker logs that it is out of file descriptors at most (its accept loops retry
/// every [`ACCEPT_RETRY`](super::lifecycle::ACCEPT_RETRY); the refusal counter counts every failed accept).
const FD_WARNING_INTERVAL: Duration = Duration::from_secs(1);

impl<R: Runtime> std::fmt::Debug for Worker<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("outbound", &self.outbound)
            .finish_non_exhaustive()
    }
}

impl<R> Worker<R>
where
    R: Runtime + Clone,
{
    /// A worker on `runtime` counting in `metrics` and `registry`, whose HBONE pool connects with
    /// `connector` (made from [`ProxyContext::client_tls`] and [`ProxyContext::connector_config`])
    /// and runs its connections on `executor`.
    pub fn new(
        context: Arc<ProxyContext>,
        runtime: R,
        connector: R::Connector<ProxyTls>,
        executor: R::Executor,
        metrics: Arc<Metrics>,
        registry: ConnectionRegistry,
    ) -> Self {
        let context_original_source = context.original_source(false);
        let pool = Pool::with_receive_budget(
            connector,
            executor,
            runtime.timer(),
            context.pool_config().clone(),
            context.serve_options().receive_budget.clone(),
        );
        let outbound = Outbound::with_runtime(
            runtime.clone(),
            context.published().clone(),
            context.local_proxy().clone(),
            context.source().clone(),
            pool,
            CopyConfig::default(),
        )
        .with_telemetry(metrics.clone())
        .with_socket_options(context.upstream().clone())
        .with_buffer_budget(
            context.serve_options().process_budget.clone(),
            context.serve_options().stream_lease(),
        );
        Self {
            context,
            runtime,
            metrics,
            registry,
            outbound,
            started: Instant::now(),
            fd_warning_at: AtomicU64::new(0),
            transparent_plaintext: None,
            original_source: context_original_source,
            outbound_registered: false,
        }
    }

    /// The worker of a pod in in-pod mode: its inbound plaintext listener (on `port`) receives its
    /// connections by TPROXY (their destination is their local address), and its outbound
    /// connections are registered, so that they close when the pod is removed and the drain waits
    /// for them.
    pub fn for_pod(mut self, port: u16) -> Self {
        self.transparent_plaintext = Some(port);
        self.outbound_registered = true;
        self
    }

    /// The worker connecting to destination workloads from the client's address, or not
    /// ([`ProxyContext::original_source`]).
    pub fn with_original_source(mut self, original_source: bool) -> Self {
        self.original_source = original_source;
        self
    }

    /// The outbound path (SOCKS5 and capture listeners) and its HBONE pool.
    pub fn outbound(&self) -> &WorkerOutbound<R> {
        &self.outbound
    }

    /// The runtime the worker's connections run on.
    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    /// The metrics the worker's connections are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The inbound handler of a connection from `peer` that arrived on `arrived_on`.
    fn inbound_handler(&self, arrived_on: SocketAddr, peer: SocketAddr) -> InboundHandler<R> {
        InboundHandler::with_runtime(
            self.runtime.clone(),
            self.context.published().clone(),
            self.context.local_proxy().clone(),
            arrived_on,
            self.metrics.clone(),
            self.registry.clone(),
        )
        .with_peer_addr(peer)
        .with_socket_options(self.context.upstream().clone())
        .with_original_source(self.original_source)
    }

    /// Serves an inbound HBONE connection from `peer`: mTLS with the certificate of the workload
    /// it is for (the dedicated workload, or in shared mode the served workload whose IP it
    /// arrived on), then every CONNECT with an [`InboundHandler`]; `shutdown` resolving sends
    /// GOAWAY and lets the streams finish.
    pub async fn serve_inbound_hbone(&self, tcp: R::Stream, peer: SocketAddr, shutdown: impl Future<Output = ()>) {
        let arrived_on = match R::local_addr(&tcp) {
            Ok(addr) => canonical(addr),
            Err(error) => {
                tracing::warn!(%peer, %error, "inbound HBONE connection has no local address");
                return;
            }
        };
        let id = match self.context.dedicated() {
            Some(id) => id.clone(),
            None => {
                let snapshot = self.context.published().load();
                match snapshot
                    .state
                    .inbound_workload(self.context.local_proxy(), arrived_on.ip())
                {
                    Some(workload) => workload.spiffe_id().clone(),
                    None => {
                        // ztunnel's TLS handshake fails there (no certificate to present).
                        refused_early(peer, arrived_on, server::RefusalReason::NoWorkload(arrived_on.ip()));
                        return;
                    }
                }
            }
        };
        let tls = match self.context.manager().get(&id, Priority::Connection).await {
            Ok(handle) => handle.current().server_config().clone(),
            Err(error) => {
                refused_early(peer, arrived_on, format_args!("no certificate for {id}: {error}"));
                return;
            }
        };
        let handler = self.inbound_handler(arrived_on, peer);
        let timer = self.runtime.timer();
        let result = server::serve(tcp, tls, self.context.serve_options(), &handler, &timer, shutdown).await;
        match result {
            Ok(summary) => tracing::debug!(%peer, client = %summary.peer, streams = summary.streams, "HBONE done"),
            Err(error) => {
                let refusal = match error {
                    ServeError::Tls(_) => Some(RefusalReason::TlsHandshake),
                    ServeError::HandshakeTimeout(_) => Some(RefusalReason::HandshakeTimeout),
                    _ => None,
                };
                match refusal {
                    Some(reason) => {
                        self.metrics.refused(Listener::Inbound, reason);
                        refused_early(peer, arrived_on, &error);
                    }
                    None => tracing::warn!(%peer, %error, "inbound HBONE connection failed"),
                }
            }
        }
    }

    /// What the accept loops of both binaries do when accepting on `listener` failed with `error`,
    /// before they wait [`ACCEPT_RETRY`](super::lifecycle::ACCEPT_RETRY) and accept again: log it, naming the
    /// listener, and when the process is out of file descriptors (`EMFILE`, `ENFILE`) say so and
    /// count it (`istio_tcp_connections_refused_total{reason="fd_exhausted"}`): the connection waits
    /// in the listen queue until a descriptor is free. That warning is logged once a second at most
    /// (the counter counts every failed accept).
    pub fn accept_failed(&self, listener: Listener, error: &io::Error) {
        if is_fd_exhaustion(error) {
            self.metrics.refused(listener, RefusalReason::FdExhausted);
            let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let next = self.fd_warning_at.load(Ordering::Relaxed);
            let interval = u64::try_from(FD_WARNING_INTERVAL.as_millis()).unwrap_or(u64::MAX);
            let due = now >= next
                && self
                    .fd_warning_at
                    .compare_exchange(next, now.saturating_add(interval), Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok();
            if !due {
                tracing::debug!(%listener, %error, "cannot accept: out of file descriptors");
                return;
            }
            tracing::warn!(
                %listener,
                %error,
                "cannot accept on the {listener} listener: out of file descriptors; the connection waits in \
                 the listen queue (raise the limit, `ulimit -n`)"
            );
        } else {
            tracing::warn!(%listener, %error, "cannot accept on the {listener} listener");
        }
    }

    /// Serves a redirected inbound plaintext connection from `peer`:
    /// [`InboundHandler::serve_plaintext`].
    pub async fn serve_inbound_plaintext(&self, tcp: R::Stream, peer: SocketAddr) {
        let arrived_on = match R::local_addr(&tcp) {
            Ok(addr) => canonical(addr),
            Err(error) => {
                tracing::warn!(%peer, %error, "inbound plaintext connection has no local address");
                return;
            }
        };
        let handler = self.inbound_handler(arrived_on, peer);
        let copy = self.context.serve_options().copy;
        let served = match self.transparent_plaintext {
            Some(port) => handler.serve_transparent(tcp, port, copy).await,
            None => handler.serve_plaintext(tcp, copy).await,
        };
        match served {
            Ok(copied) => tracing::debug!(%peer, ?copied, "inbound plaintext connection done"),
            Err(error) => tracing::warn!(%peer, %error, "inbound plaintext connection failed"),
        }
    }

    /// Serves a redirected outbound connection from `peer`: [`Outbound::serve_capture`].
    ///
    /// Not an `async fn` (nor is [`serve_socks5`](Self::serve_socks5)): one would keep the stream
    /// and the peer as its arguments beside the future that took them, for the connection's life.
    pub fn serve_capture(&self, tcp: R::Stream, peer: SocketAddr) -> impl Future<Output = ()> + '_ {
        self.closable(self.outbound.serve_capture(tcp, peer))
            .map(move |summary| match summary {
                Some(summary) => tracing::debug!(%peer, ?summary, "outbound capture connection done"),
                None => tracing::debug!(%peer, "outbound capture connection closed: its pod is no longer served"),
            })
    }

    /// Serves a SOCKS5 connection from `peer`: [`Outbound::serve_socks5`].
    pub fn serve_socks5(&self, tcp: R::Stream, peer: SocketAddr) -> impl Future<Output = ()> + '_ {
        self.closable(self.outbound.serve_socks5(tcp, peer))
            .map(move |summary| match summary {
                Some(summary) => tracing::debug!(%peer, ?summary, "SOCKS5 connection done"),
                None => tracing::debug!(%peer, "SOCKS5 connection closed: its pod is no longer served"),
            })
    }

    /// Runs an outbound connection's `serving`; for a pod's worker, registered until it ends, and
    /// dropped (its sockets closed) with `None` if the registry closes it first.
    ///
    /// Not an `async fn`: one would keep `serving` twice, as its argument and as the future it
    /// awaits, doubling what every connection holds.
    fn closable<F: Future>(&self, serving: F) -> Closable<F> {
        closable(self.outbound_registered.then_some(&self.registry), serving)
    }
}

/// `serving`, registered in `registry` (if any) until it ends, and ended early with `None` if the
/// registry closes it first.
fn closable<F: Future>(registry: Option<&ConnectionRegistry>, serving: F) -> Closable<F> {
    Closable {
        serving,
        close: registry.map(ConnectionRegistry::register_outbound),
    }
}

pin_project_lite::pin_project! {
    /// [`Worker::closable`]'s future: `serving`, ended early with `None` when the registry closes
    /// the connection (the guard keeps it registered meanwhile).
    struct Closable<F> {
        #[pin]
        serving: F,
        close: Option<(ConnectionGuard, CloseSignal)>,
    }
}

impl<F: Future> Future for Closable<F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(done) = this.serving.poll(cx) {
            return std::task::Poll::Ready(Some(done));
        }
        if let Some((_, close)) = this.close
            && std::pin::Pin::new(close).poll(cx).is_ready()
        {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    }
}

/// Logs an inbound HBONE connection from `peer` to `arrived_on` that ended before any CONNECT (its
/// TLS handshake failed or did not finish, or there is no certificate to present) as ztunnel does:
/// `connection failed` in the access log, with `dst.addr` the address it arrived on.
fn refused_early(peer: SocketAddr, arrived_on: SocketAddr, error: impl std::fmt::Display) {
    accesslog::emit_failed(&FailedConnection::new(Direction::Inbound, canonical(peer), arrived_on).with_error(error));
}

/// `ENFILE` on Linux: the system's table of open files is full.
const ENFILE: i32 = 23;
/// `EMFILE` on Linux: the process reached its limit of open file descriptors (`RLIMIT_NOFILE`).
const EMFILE: i32 = 24;

/// Whether `error` says the process (`EMFILE`) or the system (`ENFILE`) is out of file descriptors.
///
/// ```
/// use meshwire_dataplane::app::worker::is_fd_exhaustion;
///
/// assert!(is_fd_exhaustion(&std::io::Error::from_raw_os_error(24))); // EMFILE
/// assert!(is_fd_exhaustion(&std::io::Error::from_raw_os_error(23))); // ENFILE
/// assert!(!is_fd_exhaustion(&std::io::Error::from_raw_os_error(103))); // ECONNABORTED
/// assert!(!is_fd_exhaustion(&std::io::Error::other("too many open files")));
/// ```
pub fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(EMFILE | ENFILE))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::watch::CloseReason;

    /// A connection with a large state while it runs.
    async fn large() -> usize {
        let state = [7u8; 4096];
        std::future::ready(()).await;
        std::hint::black_box(&state).len()
    }

    /// Every outbound connection of a pod's worker runs in [`closable`]: it holds the connection's
    /// future once (an `async fn` would hold it twice, as its argument and as what it awaits),
    /// ends with it, and ends early, dropping it, when the registry closes the connection.
    #[tokio::test]
    async fn a_closable_connection_holds_its_future_once_and_ends_when_closed() {
        let registry = ConnectionRegistry::new();
        let size = std::mem::size_of_val(&large());
        let wrapped = closable(Some(&registry), large());
        assert!(
            std::mem::size_of_val(&wrapped) <= size + 64,
            "{} bytes around a {size}-byte future",
            std::mem::size_of_val(&wrapped)
        );
        assert_eq!(registry.len(), 1, "registered while it runs");
        assert_eq!(wrapped.await, Some(4096));
        assert!(registry.is_empty(), "unregistered once it ended");

        let waiting = closable(Some(&registry), std::future::pending::<()>());
        assert_eq!(
            registry.close_all(&CloseReason::PodRemoved {
                uid: "pod-1".to_owned()
            }),
            1
        );
        assert_eq!(waiting.await, None, "closed by the registry");
        assert!(registry.is_empty());

        assert_eq!(closable(None, large()).await, Some(4096), "without a registry");
    }
}
