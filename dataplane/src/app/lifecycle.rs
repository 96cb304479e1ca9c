//! The proxy's lifecycle, written once for both binaries: which data listeners a configuration
//! asks for, the start sequence around them, the accept loops, the dispatch of an accepted
//! connection to its [`Worker`] method, and the bounded drain.
//!
//! A binary supplies only what its runtime does differently, through [`Acceptor`] (how a listener
//! accepts, how `TCP_NODELAY` is set on a stream, how a connection's task is spawned), and where
//! its workers and listeners live: `ztunnel` binds one tokio listener per data listener and runs
//! one [`serve`] on its multi-thread runtime; the io_uring build binds them on every core (with
//! `SO_REUSEPORT`) and runs one [`serve`] per core.
//!
//! **Start.** [`Starting::begin`] starts the [`ControlPlane`] and binds the control listeners before
//! any data listener ([`ControlListeners::bind_before_data`]: exclusively, so that a second instance
//! fails there binding nothing; a hand-over binds them last). The binary then binds the data
//! listeners of [`Starting::data`] with `SO_REUSEPORT` and starts its workers' [`serve`], which wait
//! for the [`Phase::Serving`] phase. [`Starting::serve`] enters it, binds the control listeners of a
//! hand-over ([`ControlListeners::bind_after_data`]), serves readiness, admin and metrics, logs the
//! listeners and marks the listeners ready. A failure on the way ([`Starting::abandon`], or
//! [`Starting::serve`] failing) moves to [`Phase::Abandoned`]: nothing is served.
//!
//! **Serving.** Every accept loop retries [`ACCEPT_RETRY`] after a failed accept (after
//! [`Worker::accept_failed`]), turns `TCP_NODELAY` on, takes the peer address with IPv4-mapped
//! addresses as IPv4 ([`canonical`]), and spawns a [`Connection`] holding a guard the drain waits on
//! and one counting the socket in `istio_tcp_sockets_open` ([`socket_reporter`]) until it ends;
//! [`Connection::serve`] dispatches it by its listener with an exhaustive match: a new kind of
//! [`Listener`] does not compile until it is served or named as not served here.
//!
//! **Drain.** [`Lifecycle::drain`] answers 500 on readiness, moves to [`Phase::Draining`] (the accept
//! loops accept what the kernel queued and shut their listeners down (`close_listener`); inbound
//! HBONE connections get GOAWAY), waits up to the drain deadline for the
//! connections to end, then moves to [`Phase::Abandoned`] (what is left is abandoned) and stops the
//! control plane and its listeners.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::os::fd::AsFd;
use std::pin::{Pin, pin};
use std::time::Duration;

use futures_util::future::{Either, join_all, select};
use meshwire_hbone::rt::Timer;
use tokio::sync::{mpsc, watch};

use super::plane::{Control, ControlListeners, ControlPlane, StartError};
use super::thread_cache;
use super::worker::Worker;
use crate::admin::{self, LogControl, MetricsHandler, Readiness};
use crate::config::{Config, Listener};
use crate::proxy::canonical;
use crate::rt::Runtime;
use crate::rt::native::{Native, ProxyRuntime};
use crate::rt::socket;
use crate::telemetry::metrics::{OpenSocket, Reporter};
use crate::watch::ConnectionRegistry;

/// How long an accept loop waits after a failed accept (out of descriptors, for one) before the
/// next.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// ztunnel's name for a listener in its `listener established` line (`component`).
fn component(listener: Listener) -> &'static str {
    match listener {
        Listener::Inbound => "inbound",
        Listener::InboundPlaintext => "inbound plaintext",
        Listener::Outbound => "outbound",
        Listener::Socks5 => "socks5",
        Listener::Dns => "dns",
        Listener::Readiness => "readiness",
        Listener::Admin => "admin",
        Listener::Metrics => "stats",
    }
}

/// Logs the listeners bound, as ztunnel does (`listener established address=.. component=..`, and
/// for the data listeners whether they keep the client's address, `transparent`), and those of
/// `config` that are not served.
pub fn log_listeners(config: &Config, listeners: &[(Listener, SocketAddr)]) {
    let transparent = config.original_source.unwrap_or(false);
    for (listener, addr) in listeners {
        let component = component(*listener);
        match listener {
            Listener::Inbound | Listener::InboundPlaintext | Listener::Outbound => {
                tracing::info!(address = %addr, component, transparent, "listener established");
            }
            _ => tracing::info!(address = %addr, component, "listener established"),
        }
    }
    let skipped: Vec<String> = config
        .listeners
        .iter()
        .filter(|(l, _)| !listeners.iter().any(|(bound, _)| bound == l))
        .map(|(l, a)| format!("{l} ({a})"))
        .collect();
    if skipped.is_empty() {
        return;
    }
    if config.inpod.is_some() {
        tracing::info!(in_each_pod = %skipped.join(", "),
            "in-pod mode: these listeners are bound inside each pod's network namespace, not on the node");
    } else {
        tracing::info!(not_served = %skipped.join(", "), "listeners not bound");
    }
}

/// The phases of the proxy, as every worker sees them (through a `watch` channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Binding listeners; nothing is served yet.
    Starting,
    /// Every listener is bound: serve.
    Serving,
    /// Stop accepting; let the connections finish.
    Draining,
    /// The drain deadline passed (or the start failed): stop now.
    Abandoned,
}

/// Resolves once the phase is `at_least` or later (or the proxy is gone). Runtime-independent.
pub async fn reached(mut phase: watch::Receiver<Phase>, at_least: Phase) {
    let _ = phase.wait_for(|p| *p >= at_least).await;
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection ended before the deadline.
    Complete,
    /// The deadline passed with connections still open; they are abandoned.
    DeadlineReached,
}

/// What the lifecycle needs from a runtime beyond [`Native`]: the few things the accept loops do
/// differently on tokio and on glommio. The tokio implementation is
/// [`Tokio`](crate::rt::tokio::Tokio)'s (here); the io_uring build implements it for its glommio
/// marker. The workers run the proxy's [`ProxyRuntime`] over the same marker.
pub trait Acceptor: Native + Sized {
    /// A bound, listening socket of the runtime (its descriptor for the drain's last accepts).
    type Listener: AsFd + 'static;

    /// How the connection tasks of a worker share it: `Arc` on a multi-thread runtime, `Rc` on a
    /// core.
    type Shared: Deref<Target = Worker<ProxyRuntime<Self>>> + Clone + 'static;

    /// Accepts a connection on `listener`: the stream, and the client's address when the accept
    /// learned it (when it did not, the accept loop asks the socket: [`socket::peer_addr`]).
    fn accept(listener: &Self::Listener) -> impl Future<Output = io::Result<(Self::Stream, Option<SocketAddr>)>>;

    /// A connection accepted on a listener's descriptor rather than through the runtime (the drain's
    /// last accepts, [`socket::accept_queued`]), made a stream of the runtime.
    fn adopt(stream: std::net::TcpStream) -> io::Result<Self::Stream>;

    /// Spawns the task of `connection` ([`Connection::serve`]) on this runtime (this core), detached.
    fn spawn(connection: Connection<Self>);
}

/// An accepted connection, ready to be served by its listener's [`Worker`] method.
pub struct Connection<R: Acceptor> {
    listener: Listener,
    worker: R::Shared,
    stream: R::Stream,
    peer: SocketAddr,
    phase: watch::Receiver<Phase>,
    /// Held until the connection ends: the drain waits for every guard to be gone.
    guard: mpsc::Sender<()>,
    /// Held until the connection ends: counts it in `istio_tcp_sockets_open` meanwhile.
    socket: Option<OpenSocket>,
}

/// The `reporter` an accepted socket of `listener` is counted under in `istio_tcp_sockets_open`:
/// `destination` on the inbound listeners, `source` on the outbound ones (ztunnel's); `None` for the
/// listeners that are not data listeners.
pub fn socket_reporter(listener: Listener) -> Option<Reporter> {
    match listener {
        Listener::Inbound | Listener::InboundPlaintext => Some(Reporter::Destination),
        Listener::Outbound | Listener::Socks5 => Some(Reporter::Source),
        Listener::Dns | Listener::Readiness | Listener::Admin | Listener::Metrics => None,
    }
}

impl<R: Acceptor> std::fmt::Debug for Connection<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("listener", &self.listener)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl<R: Acceptor> Connection<R> {
    /// Serves the connection with the [`Worker`] method of its listener; an inbound HBONE
    /// connection is asked to drain (GOAWAY) from [`Phase::Draining`] on.
    pub async fn serve(self) {
        let Connection {
            listener,
            worker,
            stream,
            peer,
            phase,
            guard,
            socket,
        } = self;
        let _guard = guard;
        let _socket = socket;
        // Each kind's future boxed: a connection holds the state of its own kind only, not that of
        // the largest kind (the task would otherwise be as large as the largest, for every
        // connection).
        match listener {
            Listener::Inbound => {
                Box::pin(worker.serve_inbound_hbone(stream, peer, reached(phase, Phase::Draining))).await;
            }
            Listener::InboundPlaintext => Box::pin(worker.serve_inbound_plaintext(stream, peer)).await,
            Listener::Outbound => Box::pin(worker.serve_capture(stream, peer)).await,
            Listener::Socks5 => Box::pin(worker.serve_socks5(stream, peer)).await,
            // Not in `Listeners::data`, so never accepted here: the control listeners are served by
            // the control plane, the DNS proxy by its own server (`serve_dns`).
            Listener::Dns | Listener::Readiness | Listener::Admin | Listener::Metrics => {
                tracing::error!(%listener, %peer, "connection on a listener that is not a data listener: closed");
            }
        }
    }
}

/// Serves `listeners` with `worker` once `phase` is [`Phase::Serving`] (nothing if the start is
/// abandoned): accepts on every listener and runs the HBONE pool's maintenance until
/// [`Phase::Draining`], then resolves once every connection accepted here has ended, or at
/// [`Phase::Abandoned`]. One per worker: the whole tokio proxy, or one core of the io_uring build.
pub async fn serve<R: Acceptor>(
    worker: R::Shared,
    listeners: Vec<(Listener, R::Listener)>,
    phase: watch::Receiver<Phase>,
) {
    let started = phase.clone().wait_for(|p| *p != Phase::Starting).await.map(|p| *p);
    // A worker that first sees the drain (its thread did not run between the start and the drain,
    // as when the process was stopped) still runs its accept loops: they end at once, taking what the
    // kernel queued on the listeners meanwhile ([`close_listener`]), rather than dropping the
    // listeners with those connections in them.
    if !matches!(started, Ok(Phase::Serving | Phase::Draining)) {
        return;
    }
    // Idle HBONE connections are released after the pool's idle timeout.
    let pool = worker.outbound().pool().clone();
    let timer = worker.runtime().timer();
    let (connections, mut ended) = mpsc::channel::<()>(1);
    let loops = join_all(listeners.into_iter().map(|(listener, socket)| {
        accept_loop::<R>(listener, socket, worker.clone(), phase.clone(), connections.clone())
    }));
    drop(connections);
    drop(worker);
    // The accept loops end at the drain; the maintenance does not end by itself. Meanwhile the
    // thread gives back its allocator cache once it goes quiet.
    let (maintain, release) = (pin!(pool.maintain()), pin!(thread_cache::keep_released(timer)));
    let _ = select(pin!(loops), select(maintain, release)).await;
    // Every connection task holds a sender: `recv` returns `None` once they all ended.
    let _ = select(pin!(ended.recv()), pin!(reached(phase, Phase::Abandoned))).await;
}

/// How long the drain waits for the accept that was pending when it began to end, once its
/// listener is shut down (it ends at once: the bound is against a runtime that never says so).
const PENDING_ACCEPT_GRACE: Duration = Duration::from_secs(1);

/// Accepts connections on `socket` until [`Phase::Draining`], and spawns a [`Connection`] for each
/// (with `TCP_NODELAY` on, and the peer address with IPv4-mapped addresses as IPv4); then closes
/// the listener without resetting what the kernel queued on it ([`close_listener`]).
async fn accept_loop<R: Acceptor>(
    listener: Listener,
    socket: R::Listener,
    worker: R::Shared,
    phase: watch::Receiver<Phase>,
    connections: mpsc::Sender<()>,
) {
    let timer = worker.runtime().timer();
    let admit = |stream: R::Stream, peer: Option<SocketAddr>| {
        // Counted from the accept on, so that every way the connection ends counts it closed.
        let socket = socket_reporter(listener).map(|reporter| worker.metrics().socket_opened(reporter));
        let peer = match peer.map_or_else(|| socket::peer_addr(&stream), Ok) {
            Ok(peer) => canonical(peer),
            Err(error) => {
                tracing::debug!(%listener, %error, "accepted connection already gone");
                return;
            }
        };
        if let Err(error) = socket::set_nodelay(&stream) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        R::spawn(Connection {
            listener,
            worker: worker.clone(),
            stream,
            peer,
            phase: phase.clone(),
            guard: connections.clone(),
            socket,
        });
    };
    let mut stop = pin!(reached(phase.clone(), Phase::Draining));
    loop {
        let mut accept = pin!(R::accept(&socket));
        match select(stop.as_mut(), accept.as_mut()).await {
            Either::Left(((), _)) => {
                close_listener::<R>(listener, &socket, accept, &timer, admit).await;
                return;
            }
            Either::Right((Ok((stream, peer)), _)) => admit(stream, peer),
            Either::Right((Err(error), _)) => {
                worker.accept_failed(listener, &error);
                timer.sleep_until(timer.now() + ACCEPT_RETRY).await;
            }
        }
    }
}

/// The end of a listener at the drain. Each listener of a port shared with `SO_REUSEPORT` (the
/// cores of the io_uring build, the next proxy of an upgrade or a hand-over) has a queue of its
/// own where the kernel puts the connections it gives it until they are accepted, and closing it
/// resets those, although other listeners go on serving the port. So the connections already
/// queued are accepted (served as the drain's last), then the listener is shut down, which takes
/// it out of the group at once and ends the accept still pending on it (an io_uring accept holds
/// the socket beyond its descriptor), and that accept's connection, if it got one, is served too.
/// A connection the kernel queues between the last accept and the shutdown is still reset: the
/// window is two system calls wide (`net.ipv4.tcp_migrate_req` closes it: README).
async fn close_listener<R: Acceptor>(
    listener: Listener,
    socket: &R::Listener,
    pending: Pin<&mut impl Future<Output = io::Result<(R::Stream, Option<SocketAddr>)>>>,
    timer: &R::Timer,
    admit: impl Fn(R::Stream, Option<SocketAddr>),
) {
    let mut queued = 0usize;
    while let Some(accepted) = socket::accept_queued(socket) {
        match accepted.and_then(|(stream, peer)| Ok((R::adopt(stream)?, peer))) {
            Ok((stream, peer)) => {
                queued += 1;
                admit(stream, peer);
            }
            Err(error) => {
                tracing::debug!(%listener, %error, "accepting the connections queued at the drain");
                break;
            }
        }
    }
    if let Err(error) = socket::stop_listening(socket) {
        tracing::debug!(%listener, %error, "shutting the listener down at the drain");
    }
    let deadline = timer.now() + PENDING_ACCEPT_GRACE;
    if let Either::Left((Ok((stream, peer)), _)) = select(pending, pin!(timer.sleep_until(deadline))).await {
        queued += 1;
        admit(stream, peer);
    }
    if queued > 0 {
        tracing::debug!(%listener, queued, "connections queued at the drain accepted");
    }
}

/// A proxy being started: its control plane running, its control listeners bound (but for a
/// hand-over), its data listeners to be bound by the binary.
#[derive(Debug)]
pub struct Starting {
    plane: ControlPlane,
    /// The listeners bound so far, with their addresses.
    listeners: Vec<(Listener, SocketAddr)>,
    early_control: Option<ControlListeners>,
    data: Vec<(Listener, SocketAddr)>,
    phase: watch::Sender<Phase>,
    /// Readiness checks of the binary's own (in-pod mode's), added before the proxy can be ready.
    checks: Checks,
}

/// A readiness check: why the proxy is not ready, if it is not.
pub type ReadinessCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The binary's readiness checks (not printable: their count is).
#[derive(Default)]
struct Checks(Vec<ReadinessCheck>);

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} readiness checks", self.0.len())
    }
}

impl Starting {
    /// Starts the control plane of `config` (connections counted in `registries`, one per worker)
    /// and binds the control listeners before the data listeners
    /// ([`ControlListeners::bind_before_data`]). Call inside a tokio runtime with IO and time enabled.
    pub async fn begin(config: &Config, registries: &[ConnectionRegistry]) -> Result<Starting, StartError> {
        let plane = ControlPlane::start(config, registries).await?;
        let mut listeners = Vec::new();
        // The control listeners first, so that a second instance binds nothing (unless it takes over).
        let early_control = match ControlListeners::bind_before_data(config, &mut listeners) {
            Ok(early) => early,
            Err(error) => {
                plane.stop();
                return Err(error);
            }
        };
        let (phase, _) = watch::channel(Phase::Starting);
        Ok(Starting {
            plane,
            listeners,
            early_control,
            data: config.listeners.data(),
            phase,
            checks: Checks::default(),
        })
    }

    /// The control plane.
    pub fn plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// The data listeners to bind ([`Listeners::data`](crate::config::Listeners::data)), in order.
    pub fn data(&self) -> &[(Listener, SocketAddr)] {
        &self.data
    }

    /// Adds a readiness check, in force before the proxy can first be ready.
    pub fn readiness_check(&mut self, check: ReadinessCheck) {
        self.checks.0.push(check);
    }

    /// Leaves out the data listeners of `listeners` (in-pod mode serves them in each pod instead).
    pub fn without_data(&mut self, listeners: &[Listener]) {
        self.data.retain(|(listener, _)| !listeners.contains(listener));
    }

    /// The DNS proxy's context when `config` turns it on: what every DNS server of the process
    /// shares (the node's, or in in-pod mode every pod's), counting in `metrics`.
    pub fn dns_context(
        &self,
        config: &Config,
        metrics: &std::sync::Arc<crate::telemetry::metrics::DnsMetrics>,
    ) -> Result<Option<std::sync::Arc<crate::dns::DnsContext>>, StartError> {
        if config.listeners.dns.is_none() {
            return Ok(None);
        }
        let context = self.plane.context();
        crate::dns::context(
            config,
            context.published().clone(),
            metrics.clone(),
            context.upstream().clone(),
        )
        .map(|dns| Some(std::sync::Arc::new(dns)))
        .map_err(StartError::Dns)
    }

    /// The phase, for a worker's [`serve`].
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Gives the start up: the workers see [`Phase::Abandoned`], the control plane stops.
    pub fn abandon(self) {
        let _ = self.phase.send(Phase::Abandoned);
        self.plane.stop();
    }

    /// Serves: `data` are the data listeners the binary bound, with their addresses; the workers
    /// start accepting, the control listeners of a hand-over are bound, readiness, admin and
    /// metrics (from `metrics`; `/logging` through `logging`) are served, the listeners are logged
    /// and the proxy is ready once the configuration and certificates are. On failure the start is
    /// abandoned.
    pub async fn serve(
        self,
        config: &Config,
        data: Vec<(Listener, SocketAddr)>,
        metrics: MetricsHandler,
        logging: Option<LogControl>,
    ) -> Result<Lifecycle, StartError> {
        let Starting {
            plane,
            mut listeners,
            early_control,
            phase,
            data: _,
            checks,
        } = self;
        listeners.extend(data);
        let _ = phase.send(Phase::Serving);
        let control_listeners = match ControlListeners::bind_after_data(config, &mut listeners, early_control).await {
            Ok(control) => control,
            Err(error) => {
                let _ = phase.send(Phase::Abandoned);
                plane.stop();
                return Err(error);
            }
        };
        let (control, listeners_bound) = plane.serve_control(config, control_listeners, metrics, logging);
        for check in checks.0 {
            control.readiness().check(check);
        }
        log_listeners(config, &listeners);
        listeners_bound.ready();
        Ok(Lifecycle {
            listeners,
            phase,
            plane,
            control,
            drain_deadline: config.drain_deadline,
        })
    }
}

/// A running proxy's lifecycle: its listeners, control plane and control listeners, and the phase
/// its workers follow.
#[derive(Debug)]
pub struct Lifecycle {
    listeners: Vec<(Listener, SocketAddr)>,
    phase: watch::Sender<Phase>,
    plane: ControlPlane,
    control: Control,
    drain_deadline: Duration,
}

impl Lifecycle {
    /// The listeners being served, with the addresses they are bound to.
    pub fn listeners(&self) -> &[(Listener, SocketAddr)] {
        &self.listeners
    }

    /// The trigger `POST /quitquitquit` pulls: resolves [`admin::ShutdownTrigger::triggered`] when
    /// the process should drain and exit. Signal handlers may pull it too.
    pub fn shutdown_trigger(&self) -> admin::ShutdownTrigger {
        self.control.trigger().clone()
    }

    /// Whether the proxy is ready (what the readiness endpoint answers).
    pub fn readiness(&self) -> &Readiness {
        self.control.readiness()
    }

    /// Stops accepting and asks the HBONE connections to drain ([`Phase::Draining`]), and waits up
    /// to the drain deadline for `ended` (every worker's connections ended); then abandons what is
    /// left ([`Phase::Abandoned`]), waits for `stopped` (the workers' threads, say), stops the
    /// control plane and its listeners, and logs how the drain ended. Readiness answers 500 from
    /// the start.
    pub async fn drain(self, ended: impl Future<Output = ()>, stopped: impl Future<Output = ()>) -> Drained {
        tracing::info!(deadline = ?self.drain_deadline, "draining");
        self.control.readiness().set_draining();
        let _ = self.phase.send(Phase::Draining);
        let outcome = match tokio::time::timeout(self.drain_deadline, ended).await {
            Ok(()) => Drained::Complete,
            Err(_) => Drained::DeadlineReached,
        };
        let _ = self.phase.send(Phase::Abandoned);
        stopped.await;
        self.plane.stop();
        self.control.stop().await;
        match outcome {
            Drained::Complete => tracing::info!("drained: every connection ended"),
            Drained::DeadlineReached => tracing::warn!("drain deadline reached: closing remaining connections"),
        }
        outcome
    }
}

/// The DNS proxy's sockets on one address: UDP and TCP on the same port.
#[derive(Debug)]
pub struct DnsSockets {
    /// The UDP socket, bound.
    pub udp: socket2::Socket,
    /// The TCP socket, bound and listening.
    pub tcp: socket2::Socket,
    /// The address both are bound to (a port 0 chosen once, by the TCP socket).
    pub addr: SocketAddr,
}

/// Binds the DNS proxy's TCP listener and UDP socket on `addr` with `SO_REUSEPORT` (as the data
/// listeners are: an instance taking over shares them, a core of the io_uring build has its own),
/// the UDP socket on the port the TCP one got.
pub fn bind_dns(addr: SocketAddr) -> Result<DnsSockets, StartError> {
    bind_dns_with(&crate::rt::socket::DefaultSocketFactory, addr)
}

/// [`bind_dns`] with the sockets made by `factory` (a pod's, inside its network namespace).
pub fn bind_dns_with<F: crate::rt::socket::SocketFactory>(
    factory: &F,
    addr: SocketAddr,
) -> Result<DnsSockets, StartError> {
    use crate::rt::socket::SocketOptions;

    let opts = SocketOptions {
        reuse_port: true,
        ..SocketOptions::default()
    };
    let fail = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            StartError::PortInUse {
                listener: Listener::Dns,
                addr,
            }
        } else {
            StartError::Bind {
                listener: Listener::Dns,
                addr,
                source,
            }
        }
    };
    let tcp = factory.listener(addr, &opts).map_err(fail)?;
    let bound = socket::local_addr(&tcp).map_err(fail)?;
    let udp = factory.datagram(bound, &opts).map_err(fail)?;
    Ok(DnsSockets { udp, tcp, addr: bound })
}

/// Serves the DNS proxy on `sockets` with `context` for `clients` once `phase` is
/// [`Phase::Serving`], until [`Phase::Draining`] (UDP clients ask again; nothing is drained).
pub async fn serve_dns<N: crate::rt::datagram::Datagram>(
    context: std::sync::Arc<crate::dns::DnsContext>,
    clients: crate::dns::Clients,
    sockets: DnsSockets,
    phase: watch::Receiver<Phase>,
) {
    serve_dns_with::<N, _>(
        context,
        crate::rt::socket::DefaultSocketFactory,
        clients,
        sockets,
        phase,
    )
    .await;
}

/// [`serve_dns`] with the upstream sockets made by `factory` (a pod's: its queries leave from the
/// pod).
pub async fn serve_dns_with<N: crate::rt::datagram::Datagram, F: crate::rt::socket::SocketFactory>(
    context: std::sync::Arc<crate::dns::DnsContext>,
    factory: F,
    clients: crate::dns::Clients,
    sockets: DnsSockets,
    phase: watch::Receiver<Phase>,
) {
    let started = phase.clone().wait_for(|p| *p != Phase::Starting).await.map(|p| *p);
    if !matches!(started, Ok(Phase::Serving)) {
        return;
    }
    let stop = reached(phase, Phase::Draining);
    let served = crate::dns::serve::<N, _>(context, factory, clients, sockets.udp, sockets.tcp, stop).await;
    if let Err(error) = served {
        tracing::error!(%error, addr = %sockets.addr, "cannot serve DNS");
    }
}
