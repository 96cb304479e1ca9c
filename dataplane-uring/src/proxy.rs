//! The io_uring build's proxy: the shared control plane on one tokio thread, and one pinned
//! glommio executor per core serving the data path. The lifecycle (the listener set, the start
//! sequence, the accept loops and their dispatch, readiness, the drain) is `meshwire-dataplane`'s
//! [`lifecycle`]; this module supplies glommio's [`Acceptor`], the cores, and where their
//! listeners, pools and metrics live.
//!
//! **Cores.** Every core binds its own socket for each data listener (inbound HBONE, inbound
//! plaintext, outbound capture, SOCKS5) through the socket factory with `SO_REUSEPORT`, so that the
//! kernel spreads new connections over the cores: in turn (the [round robin](crate::spread)
//! program, the default where the kernel accepts it), or by its hash of addresses and ports (with
//! `--connection-balance hash`, or as the fallback); a connection lives and dies on the core that
//! accepted it. Each core has its own [`Worker`]: its own HBONE pool (one tunnel per destination
//! key per core: a peer that opens few tunnels is still spread over the cores), its own metrics
//! ([`Metrics`], summed when scraped) and its own connection registry. Nothing on the data path is
//! shared between cores but the read-only [`ProxyContext`] (configuration snapshots, certificates).
//!
//! **Start.** The control plane starts first (configuration, certificates); the control listeners
//! (readiness, admin, metrics) are bound on the control thread, exclusively, and the data ports are
//! checked to be free ([`ControlListeners::bind_before_data`]: a second instance fails there,
//! binding nothing; a hand-over binds the control listeners last, once the instance it replaces
//! releases them, [`ControlListeners::bind_after_data`]); then the cores start one after
//! the other, each binding its listeners (the first core's addresses are those of the others, so
//! that a port 0 gets one number). A core that cannot start (io_uring unavailable, a port in use)
//! fails the start with the cause; no core serves before every core has bound its listeners. Each
//! core then runs [`lifecycle::serve`] with its worker and listeners.
//!
//! **Drain.** The cores stop accepting, inbound HBONE connections get GOAWAY, and each core ends
//! once its connections have; past the drain deadline the cores are told to abandon what is left
//! ([`Lifecycle::drain`]).
//!
//! [`ControlListeners::bind_before_data`]: meshwire_dataplane::app::ControlListeners::bind_before_data
//! [`ControlListeners::bind_after_data`]: meshwire_dataplane::app::ControlListeners::bind_after_data

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use meshwire_dataplane::admin::{self, LogControl, MetricsHandler, Readiness};
use meshwire_dataplane::app::lifecycle::{self, Acceptor, Connection, Lifecycle, Phase, Starting};
use meshwire_dataplane::app::{Drained, ProxyContext, StartError, Worker, inpod};
use meshwire_dataplane::config::{Config, ConnectionBalance, Listener};
use meshwire_dataplane::dns::{Clients, DnsContext};
use meshwire_dataplane::rt::netns::ProxySocketFactory;
use meshwire_dataplane::rt::socket::{DefaultSocketFactory, SocketOptions};
use meshwire_dataplane::telemetry::metrics::{DnsMetrics, Metrics, listener_label};
use meshwire_dataplane::watch::ConnectionRegistry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};

use crate::preflight::Unavailable;
use crate::rt::{Glommio, GlommioConnector, GlommioExecutor, GlommioRuntime, GlommioStream, UringStream};
use crate::spread::RoundRobin;

/// The memory each executor reserves for storage IO (registered with io_uring): the proxy does
/// network IO only, so glommio's minimum-sized slab is kept small.
pub const IO_MEMORY: usize = 256 * 1024;

/// The name of the per-core accept counter: `meshwire_core_connections_accepted_total{core,listener}`.
pub const ACCEPTED_METRIC: &str = "meshwire_core_connections_accepted";

/// How often each core copies its executor's counters into the metrics (`meshwire_core_busy_seconds`,
/// `meshwire_core_tasks_executed`, `meshwire_core_scheduler_runs`).
pub const EXECUTOR_STATS_PERIOD: Duration = Duration::from_secs(1);

/// The io_uring build's runtime metrics, one series per core (glommio's executor counters, as
/// the tokio build exports tokio's): time spent running tasks, tasks run, scheduler runs.
#[derive(Debug, Clone, Default)]
struct CoreRuntimeMetrics {
    busy: Family<CoreLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    tasks: Family<CoreLabel, Counter>,
    scheduler_runs: Family<CoreLabel, Counter>,
}

/// The label of a per-core runtime metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CoreLabel {
    core: String,
}

impl CoreRuntimeMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "meshwire_core_busy_seconds",
            "Time each core's executor spent running tasks (glommio's executor runtime)",
            self.busy.clone(),
        );
        registry.register(
            "meshwire_core_tasks_executed",
            "Tasks each core's executor ran",
            self.tasks.clone(),
        );
        registry.register(
            "meshwire_core_scheduler_runs",
            "Times each core's scheduler picked a task queue to run",
            self.scheduler_runs.clone(),
        );
    }

    /// Copies this core's executor counters into the metrics every [`EXECUTOR_STATS_PERIOD`] (as
    /// increments since the last copy), for as long as the core runs.
    async fn follow(self, core: usize) {
        let label = CoreLabel { core: core.to_string() };
        let (busy, tasks, runs) = (
            self.busy.get_or_create(&label).clone(),
            self.tasks.get_or_create(&label).clone(),
            self.scheduler_runs.get_or_create(&label).clone(),
        );
        let mut last = (Duration::ZERO, 0u64, 0u64);
        loop {
            let stats = glommio::executor().executor_stats();
            let now = (stats.executor_runtime(), stats.tasks_executed(), stats.scheduler_runs());
            busy.inc_by(now.0.saturating_sub(last.0).as_secs_f64());
            tasks.inc_by(now.1.saturating_sub(last.1));
            runs.inc_by(now.2.saturating_sub(last.2));
            last = now;
            glommio::timer::sleep(EXECUTOR_STATS_PERIOD).await;
        }
    }
}

/// Why the io_uring proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// What stops either build (configuration, certificates, a listener that cannot be bound).
    #[error(transparent)]
    Start(#[from] StartError),
    /// io_uring cannot serve here.
    #[error("io_uring is unavailable: {0}; run `ztunnel` (the tokio build) instead")]
    Unavailable(#[from] Unavailable),
    /// A core stopped before it reported its listeners (a panic, which the log shows).
    #[error("core {core} stopped while starting")]
    CoreLost {
        /// The core's index.
        core: usize,
    },
    /// A core's thread could not be created.
    #[error("cannot create the thread of core {core}: {source}")]
    Thread {
        /// The core's index.
        core: usize,
        /// What failed.
        source: std::io::Error,
    },
}

/// The labels of the per-core accept counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AcceptLabels {
    core: String,
    listener: String,
}

/// Tells the control thread a core ended, when dropped (a normal end, or a panic unwinding).
struct ExitGuard {
    core: usize,
    exits: mpsc::UnboundedSender<usize>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = self.exits.send(self.core);
    }
}

/// What a core starts with (built on the control thread, moved to the core's thread).
struct CoreSetup {
    core: usize,
    cpu: usize,
    context: Arc<ProxyContext>,
    metrics: Arc<Metrics>,
    registry: ConnectionRegistry,
    listeners: Vec<(Listener, SocketAddr)>,
    /// The DNS proxy's address and context, when it is on.
    dns: Option<(SocketAddr, Arc<DnsContext>, Clients)>,
    /// The round robin of each listener (same order as `listeners`), `None` for the kernel's hash.
    spread: Vec<Option<Arc<RoundRobin>>>,
    phase: watch::Receiver<Phase>,
    /// In-pod mode: this core's share of each pod istio-cni adds.
    pods: Option<mpsc::UnboundedReceiver<CorePod>>,
    bound: oneshot::Sender<Result<Vec<(Listener, SocketAddr)>, Error>>,
    accepted: Family<AcceptLabels, Counter>,
    runtime: CoreRuntimeMetrics,
    exit: ExitGuard,
}

/// The worker of a core.
type CoreWorker = Worker<GlommioRuntime>;

/// A core's listener: the glommio listener, and the core's accept counter for it.
#[derive(Debug)]
pub struct CoreListener {
    socket: glommio::net::TcpListener,
    accepted: Counter,
}

impl std::os::fd::AsFd for CoreListener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Acceptor for Glommio {
    type Listener = CoreListener;
    type Shared = Rc<CoreWorker>;

    async fn accept(listener: &CoreListener) -> io::Result<(GlommioStream, Option<SocketAddr>)> {
        let stream = listener.socket.accept().await?;
        listener.accepted.inc();
        // glommio's accept does not say who the client is: the accept loop asks the stream.
        Ok((UringStream::new(stream), None))
    }

    fn adopt(stream: std::net::TcpStream) -> io::Result<GlommioStream> {
        Ok(UringStream::new(glommio::net::TcpStream::from(
            socket2_glommio::Socket::from(stream),
        )))
    }

    fn spawn(connection: Connection<Self>) {
        glommio::spawn_local(connection.serve()).detach();
    }
}

/// The io_uring proxy, running: its control plane and servers on the calling tokio runtime, its
/// cores on their threads.
#[derive(Debug)]
pub struct UringProxy {
    lifecycle: Lifecycle,
    cpus: Vec<usize>,
    exits: mpsc::UnboundedReceiver<usize>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// In-pod mode, when on.
    inpod: Option<inpod::Inpod<CoreServers>>,
}

impl UringProxy {
    /// Starts the proxy of `config` with one executor per entry of `cpus`, pinned to that CPU.
    /// Call inside a tokio runtime (the control thread): the control plane and the readiness,
    /// admin and metrics listeners run on it.
    pub async fn start(config: Config, logging: Option<LogControl>, cpus: Vec<usize>) -> Result<UringProxy, Error> {
        let registries: Vec<ConnectionRegistry> = cpus.iter().map(|_| ConnectionRegistry::new()).collect();
        let metrics: Vec<Arc<Metrics>> = cpus.iter().map(|_| Arc::new(Metrics::new())).collect();
        let mut starting = Starting::begin(&config, &registries).await?;
        if config.inpod.is_some() {
            starting.without_data(&inpod::POD_PORTS.map(|(listener, _)| listener));
        }
        let mut data = starting.data().to_vec();
        let spread = match config.connection_balance {
            ConnectionBalance::RoundRobin => round_robins(data.len(), cpus.len()),
            ConnectionBalance::Hash => vec![None; data.len()],
        };

        // The DNS proxy, when on: a UDP socket and a TCP listener on every core (in in-pod mode,
        // in every pod on every core instead).
        let dns_metrics = Arc::new(DnsMetrics::new());
        let dns_context = match starting.dns_context(&config, &dns_metrics) {
            Ok(dns_context) => dns_context,
            Err(error) => {
                starting.abandon();
                return Err(error.into());
            }
        };
        let mut dns = match (config.listeners.dns, &dns_context, &config.inpod) {
            (Some(addr), Some(context), None) => {
                Some((addr, context.clone(), meshwire_dataplane::dns::clients(&config)))
            }
            _ => None,
        };

        let accepted = Family::<AcceptLabels, Counter>::default();
        let mut extra = Registry::default();
        extra.register(
            ACCEPTED_METRIC,
            "Connections accepted by each core (executor) of the io_uring build, by listener",
            accepted.clone(),
        );
        let runtime = CoreRuntimeMetrics::default();
        runtime.register(&mut extra);

        let (exits_tx, exits) = mpsc::unbounded_channel();
        // In-pod mode: each core gets its share of every pod over a channel.
        let mut pod_senders = Vec::new();
        let mut threads = Vec::new();
        let mut failure = None;
        for (core, (&cpu, (metrics, registry))) in cpus.iter().zip(metrics.iter().zip(&registries)).enumerate() {
            let (bound_tx, bound_rx) = oneshot::channel();
            let pods = config.inpod.is_some().then(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                pod_senders.push(tx);
                rx
            });
            let setup = CoreSetup {
                core,
                cpu,
                context: starting.plane().context().clone(),
                metrics: metrics.clone(),
                registry: registry.clone(),
                listeners: data.clone(),
                dns: dns.clone(),
                spread: spread.clone(),
                phase: starting.phase(),
                pods,
                bound: bound_tx,
                accepted: accepted.clone(),
                runtime: runtime.clone(),
                exit: ExitGuard {
                    core,
                    exits: exits_tx.clone(),
                },
            };
            match spawn_core(setup) {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    failure = Some(Error::Thread { core, source });
                    break;
                }
            }
            // The next core binds the addresses this one got (a port 0 is chosen once).
            match bound_rx.await {
                Ok(Ok(bound)) => {
                    // The DNS proxy's address comes last; the next core binds it too.
                    let (dns_bound, tcp): (Vec<_>, Vec<_>) = bound.into_iter().partition(|(l, _)| *l == Listener::Dns);
                    if let (Some((addr, _, _)), Some((_, bound))) = (dns.as_mut(), dns_bound.first()) {
                        *addr = *bound;
                    }
                    data = tcp;
                }
                Ok(Err(error)) => {
                    failure = Some(error);
                    break;
                }
                Err(_) => {
                    failure = Some(Error::CoreLost { core });
                    break;
                }
            }
        }
        drop(exits_tx);
        if let Some(error) = failure {
            starting.abandon();
            join(threads).await;
            return Err(error);
        }
        tracing::info!(cores = cpus.len(), cpus = ?cpus, "serving on io_uring: one executor per core");
        // In-pod mode: istio-cni's pods, each served in its network namespace on every core.
        let servers = CoreServers { cores: pod_senders };
        let inpod = match inpod::start(&mut starting, &config, registries.clone(), dns_context, servers) {
            Ok(inpod) => inpod,
            Err(error) => {
                starting.abandon();
                join(threads).await;
                return Err(error.into());
            }
        };
        let handler = inpod::Inpod::add_metrics(
            inpod.as_ref(),
            MetricsHandler::summing(metrics)
                .with_registry(Arc::new(extra))
                .with_dns(&dns_metrics),
        );
        data.extend(dns.map(|(addr, _, _)| (Listener::Dns, addr)));
        let lifecycle = match starting.serve(&config, data, handler, logging).await {
            Ok(lifecycle) => lifecycle,
            Err(error) => {
                join(threads).await;
                return Err(error.into());
            }
        };
        Ok(UringProxy {
            lifecycle,
            cpus,
            exits,
            threads,
            inpod,
        })
    }

    /// The listeners being served, with the addresses they are bound to.
    pub fn listeners(&self) -> &[(Listener, SocketAddr)] {
        self.lifecycle.listeners()
    }

    /// The CPU each core's executor is pinned to.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// The trigger `POST /quitquitquit` pulls.
    pub fn shutdown_trigger(&self) -> admin::ShutdownTrigger {
        self.lifecycle.shutdown_trigger()
    }

    /// Whether the proxy is ready (what the readiness endpoint answers).
    pub fn readiness(&self) -> &Readiness {
        self.lifecycle.readiness()
    }

    /// Resolves with a core's index if one stops while serving (a panic on its thread): the
    /// binary then drains the others and exits with a failure, for its supervisor to restart it.
    pub async fn core_stopped(&mut self) -> usize {
        match self.exits.recv().await {
            Some(core) => core,
            None => std::future::pending().await,
        }
    }

    /// Stops accepting on every core, asks the HBONE connections to drain, and waits up to the
    /// drain deadline for every core's connections to end; then tells the cores to abandon what is
    /// left, and stops the control plane and its listeners (readiness answers 500 from the start):
    /// [`Lifecycle::drain`].
    pub async fn drain(self) -> Drained {
        let UringProxy {
            lifecycle,
            mut exits,
            threads,
            inpod,
            ..
        } = self;
        // A core ends once its connections have, its pods' included.
        let all_ended = async { while exits.recv().await.is_some() {} };
        let drained = lifecycle.drain(all_ended, join(threads)).await;
        if let Some(inpod) = inpod {
            inpod.stop();
        }
        drained
    }
}

/// A round robin for each of `listeners` data listeners over `cores` cores ([`RoundRobin`]), or
/// none when there is one core, or when the kernel refuses the program (no `CAP_BPF`, a kernel
/// older than 5.12): then the kernel's hash of `SO_REUSEPORT` spreads the connections, as the
/// log says.
fn round_robins(listeners: usize, cores: usize) -> Vec<Option<Arc<RoundRobin>>> {
    let none = vec![None; listeners];
    if cores < 2 {
        return none;
    }
    let Ok(slots) = u32::try_from(cores) else {
        return none;
    };
    let made: Result<Vec<_>, _> = (0..listeners).map(|_| RoundRobin::new(slots).map(Arc::new)).collect();
    match made {
        Ok(made) => {
            tracing::info!(
                cores,
                "new connections are dealt over the cores in turn (eBPF reuseport program)"
            );
            made.into_iter().map(Some).collect()
        }
        Err(error) => {
            tracing::info!(
                %error,
                "new connections are spread over the cores by the kernel's SO_REUSEPORT hash: the round-robin \
                 program cannot be loaded (it needs CAP_BPF or CAP_SYS_ADMIN and Linux 5.12 or later)"
            );
            none
        }
    }
}

/// Waits for the cores' threads to end, off the control thread's event loop.
async fn join(threads: Vec<std::thread::JoinHandle<()>>) {
    let joined = tokio::task::spawn_blocking(move || {
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a core's thread panicked");
            }
        }
    });
    let _ = joined.await;
}

/// Starts the thread of a core: its executor pinned to its CPU, then [`run_core`]. An executor
/// that cannot be made reports why through `bound`.
fn spawn_core(setup: CoreSetup) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("ztunnel-core{}", setup.core);
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        let (core, cpu) = (setup.core, setup.cpu);
        let executor = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&name)
            .io_memory(IO_MEMORY)
            .make();
        match executor {
            Ok(executor) => executor.run(run_core(setup)),
            Err(error) => {
                let _ = setup.bound.send(Err(Unavailable::classify(core, cpu, error).into()));
            }
        }
    })
}

/// A core: binds its listeners and reports them, then serves them with its [`Worker`]
/// ([`lifecycle::serve`]: once every core has bound its listeners, until the drain and its
/// connections have ended or are abandoned).
async fn run_core(setup: CoreSetup) {
    let CoreSetup {
        core,
        cpu: _,
        context,
        metrics,
        registry,
        listeners,
        dns,
        spread,
        phase,
        pods,
        bound,
        accepted,
        runtime,
        exit,
    } = setup;
    let _exit = exit;
    glommio::spawn_local(runtime.follow(core)).detach();
    let mut sockets = Vec::new();
    let mut addrs = Vec::new();
    // SO_REUSEPORT: every core has its own socket on the same port.
    let opts = SocketOptions {
        reuse_port: true,
        ..SocketOptions::default()
    };
    let slot = u32::try_from(core).unwrap_or(u32::MAX);
    for ((listener, addr), spread) in listeners.into_iter().zip(spread) {
        let spread = spread.as_deref().map(|s| (s, slot));
        match crate::listener::bind(&DefaultSocketFactory, addr, &opts, spread) {
            Ok(socket) => {
                addrs.push((listener, socket.local_addr().unwrap_or(addr)));
                let accepted = accepted
                    .get_or_create(&AcceptLabels {
                        core: core.to_string(),
                        listener: listener_label(listener).to_owned(),
                    })
                    .clone();
                sockets.push((listener, CoreListener { socket, accepted }));
            }
            Err(source) => {
                let _ = bound.send(Err(StartError::Bind { listener, addr, source }.into()));
                return;
            }
        }
    }
    // The DNS proxy: UDP and TCP on this core, with SO_REUSEPORT.
    let dns = match dns {
        Some((addr, context, clients)) => match lifecycle::bind_dns(addr) {
            Ok(sockets) => {
                addrs.push((Listener::Dns, sockets.addr));
                Some((context, clients, sockets))
            }
            Err(error) => {
                let _ = bound.send(Err(error.into()));
                return;
            }
        },
        None => None,
    };
    let _ = bound.send(Ok(addrs));
    if let Some((context, clients, sockets)) = dns {
        glommio::spawn_local(lifecycle::serve_dns::<Glommio>(
            context,
            clients,
            sockets,
            phase.clone(),
        ))
        .detach();
    }

    // In-pod mode: this core serves its share of each pod until the drain; it ends once the pods'
    // connections on it have too.
    let (pods_serving, mut pods_ended) = mpsc::channel::<()>(1);
    if let Some(pods) = pods {
        let core_pods = CorePods {
            core,
            context: context.clone(),
            metrics: metrics.clone(),
            accepted: accepted.clone(),
            serving: pods_serving.clone(),
        };
        glommio::spawn_local(core_pods.run(pods, phase.clone())).detach();
    }
    drop(pods_serving);

    let connector = GlommioConnector::new(context.client_tls(), context.connector_config());
    let worker: Rc<CoreWorker> = Rc::new(Worker::new(
        context,
        GlommioRuntime::new(),
        connector,
        GlommioExecutor,
        metrics,
        registry,
    ));
    lifecycle::serve::<Glommio>(worker, sockets, phase.clone()).await;
    // Every pod served on this core holds a sender: `recv` returns `None` once they all ended.
    let _ = futures_util::future::select(
        std::pin::pin!(pods_ended.recv()),
        std::pin::pin!(lifecycle::reached(phase, Phase::Abandoned)),
    )
    .await;
}

/// One core's share of a pod, sent by [`CoreServers`].
pub struct CorePod {
    uid: String,
    factory: ProxySocketFactory,
    core: inpod::PodCore,
    dns: Option<(Arc<DnsContext>, Clients)>,
    phase: watch::Receiver<Phase>,
}

/// The io_uring build's [`inpod::PodServers`]: each core gets its share of every pod (its own
/// listeners in the pod's namespace, its own worker and pool) over a channel.
#[derive(Debug)]
pub struct CoreServers {
    cores: Vec<mpsc::UnboundedSender<CorePod>>,
}

impl inpod::PodServers for CoreServers {
    fn cores(&self) -> usize {
        self.cores.len()
    }

    fn serve(&mut self, pod: inpod::PodServe) -> Result<(), String> {
        let inpod::PodServe {
            uid,
            factory,
            cores,
            dns,
            phase,
        } = pod;
        if cores.len() != self.cores.len() {
            return Err(format!(
                "{} cores, {} sets of pod listeners",
                self.cores.len(),
                cores.len()
            ));
        }
        for (index, (sender, core)) in self.cores.iter().zip(cores).enumerate() {
            let sent = sender.send(CorePod {
                uid: uid.clone(),
                factory: factory.clone(),
                core,
                dns: dns.clone(),
                phase: phase.clone(),
            });
            if sent.is_err() {
                return Err(format!("core {index} is not serving"));
            }
        }
        Ok(())
    }
}

/// What a core needs to serve its share of pods.
struct CorePods {
    core: usize,
    context: Arc<ProxyContext>,
    metrics: Arc<Metrics>,
    accepted: Family<AcceptLabels, Counter>,
    /// Held by each pod served on this core, so that the core waits for them to end.
    serving: mpsc::Sender<()>,
}

impl CorePods {
    /// Serves each pod received until the proxy drains.
    async fn run(self, mut pods: mpsc::UnboundedReceiver<CorePod>, phase: watch::Receiver<Phase>) {
        let mut draining = std::pin::pin!(lifecycle::reached(phase, Phase::Draining));
        loop {
            let next = std::pin::pin!(pods.recv());
            match futures_util::future::select(draining.as_mut(), next).await {
                futures_util::future::Either::Right((Some(pod), _)) => self.serve(pod),
                _ => return,
            }
        }
    }

    /// Serves one pod's listeners on this core with a worker of its own (the pod's socket factory).
    fn serve(&self, pod: CorePod) {
        let CorePod {
            uid,
            factory,
            core,
            dns,
            phase,
        } = pod;
        let inpod::PodCore {
            listeners,
            dns: dns_sockets,
            registry,
        } = core;
        let mut sockets = Vec::new();
        for (listener, socket) in listeners {
            match crate::listener::tcp(socket) {
                Ok(socket) => {
                    let accepted = self
                        .accepted
                        .get_or_create(&AcceptLabels {
                            core: self.core.to_string(),
                            listener: listener_label(listener).to_owned(),
                        })
                        .clone();
                    sockets.push((listener, CoreListener { socket, accepted }));
                }
                Err(error) => {
                    tracing::error!(pod = %uid, core = self.core, %listener, %error, "cannot serve the pod's listener on this core");
                }
            }
        }
        let connector = GlommioConnector::with_factory(
            self.context.client_tls(),
            factory.clone(),
            self.context.connector_config(),
        );
        let worker: Rc<CoreWorker> = Rc::new(
            Worker::new(
                self.context.clone(),
                GlommioRuntime::with_factory(factory.clone()),
                connector,
                GlommioExecutor,
                self.metrics.clone(),
                registry,
            )
            .for_pod(inpod::PLAINTEXT_PORT)
            .with_original_source(self.context.original_source(true)),
        );
        if let (Some((context, clients)), Some(dns_sockets)) = (dns, dns_sockets) {
            glommio::spawn_local(lifecycle::serve_dns_with::<Glommio, _>(
                context,
                factory,
                clients,
                dns_sockets,
                phase.clone(),
            ))
            .detach();
        }
        let serving = self.serving.clone();
        glommio::spawn_local(async move {
            lifecycle::serve::<Glommio>(worker, sockets, phase).await;
            drop(serving);
        })
        .detach();
    }
}
