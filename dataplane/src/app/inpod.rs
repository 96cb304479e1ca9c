//! In-pod mode, written once for both binaries: istio-cni's pods served inside their own network
//! namespaces.
//!
//! The ZDS client ([`meshwire_control::zds`]) runs on the control thread; each pod istio-cni adds
//! gets, through [`inpod::Pods`](crate::inpod::Pods) and [`RuntimePods`] (its [`PodStarter`]):
//!
//! - on each core (the tokio binary has one), the listeners 15001 (outbound capture), 15006
//!   (inbound plaintext) and 15008 (inbound HBONE), bound in the pod's namespace on every address
//!   (`[::]` for both families with `IPV6_ENABLED`, the default; `0.0.0.0` without), with `IP_TRANSPARENT` (istio-cni's rules send inbound traffic there with TPROXY) and
//!   `SO_REUSEPORT` (`INPOD_PORT_REUSE`; always with more than one core), and the DNS proxy's UDP
//!   and TCP sockets (`DNS_PROXY_ADDR`, 127.0.0.1:15053 by default) when it is on, answering as the
//!   pod's workload;
//! - on each core, a [`Worker`] of its own whose sockets are made inside the pod's namespace
//!   ([`ProxySocketFactory::Pod`]): its HBONE pool connects from the pod, its upstream
//!   connections and DNS queries leave from the pod; served by the accept loops every worker has
//!   ([`lifecycle::serve`]). Where they run is the binary's [`PodServers`]: [`TokioServers`] on the
//!   tokio data runtime; the io_uring build sends each core its share;
//! - on each core, a child of the core's [`ConnectionRegistry`], so that new policies re-check the
//!   pod's connections and a removed pod's connections are closed at once;
//! - its workload's certificate fetched ahead of its first connection, when istio-cni names it.
//!
//! A pod removed (`DelWorkload`, or left out of a snapshot) stops accepting and has its connections
//! closed; the proxy's drain drains every pod. Readiness waits for istio-cni's snapshot and for
//! every pod's listeners ([`Pods::not_ready`](crate::inpod::Pods::not_ready)).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use meshwire_control::zds::{PodEvent, PodHandler, ZdsClient, ZdsStatus};
use meshwire_identity::id::{IstioIdentity, TrustDomain};
use meshwire_rt::tokio::TokioTimer;
use prometheus_client::metrics::counter::Counter;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::lifecycle::{self, DnsSockets, Phase, Starting};
use super::plane::{ProxyContext, StartError};
use super::worker::Worker;
use crate::config::{Config, InpodConfig, Listener, WorkloadInfo};
use crate::dns::{Clients, DnsContext};
use crate::inpod::{PodStarter, Pods};
use crate::rt::netns::{Netns, ProxySocketFactory};
use crate::rt::socket::{SocketFactory, SocketOptions};
use crate::rt::tokio::{Tokio, TokioConnector, TokioExecutor, TokioRuntime, into_listener};
use crate::telemetry::metrics::Metrics;
use crate::watch::{CloseReason, ConnectionRegistry};

/// The pods' inbound plaintext port (ztunnel's, fixed: istio-cni's rules name it).
pub const PLAINTEXT_PORT: u16 = 15006;

/// The ports of a pod's listeners (ztunnel's, fixed: istio-cni's rules name them).
pub const POD_PORTS: [(Listener, u16); 3] = [
    (Listener::Outbound, 15001),
    (Listener::InboundPlaintext, PLAINTEXT_PORT),
    (Listener::Inbound, 15008),
];

/// How often pods whose listeners could not start are tried again (the schedule itself is
/// [`crate::inpod::RETRY_INTERVAL`]).
const RETRY_TICK: Duration = Duration::from_secs(1);

/// One core's share of a pod (the tokio binary has one core): the pod's listeners bound for that
/// core inside the pod's namespace, its DNS sockets, and the registry of the connections it
/// accepts.
#[derive(Debug)]
pub struct PodCore {
    /// The TCP listeners, bound and listening, in blocking or non-blocking mode (the runtime sets
    /// the mode it needs).
    pub listeners: Vec<(Listener, socket2::Socket)>,
    /// The DNS proxy's sockets, when it is on.
    pub dns: Option<DnsSockets>,
    /// The registry of this core's connections of the pod (a child of the core's registry).
    pub registry: ConnectionRegistry,
}

/// A pod to serve, bound and ready: what a binary's [`PodServers`] gets.
pub struct PodServe {
    /// The Kubernetes pod UID (for logs).
    pub uid: String,
    /// Makes the pod's sockets (upstream connections, HBONE pool, DNS upstreams) inside its
    /// namespace.
    pub factory: ProxySocketFactory,
    /// One entry per core, in core order.
    pub cores: Vec<PodCore>,
    /// The DNS proxy's shared context and whose queries it answers (this pod's), when it is on.
    pub dns: Option<(Arc<DnsContext>, Clients)>,
    /// The pod's phase: it drains with the proxy, or alone when removed.
    pub phase: watch::Receiver<Phase>,
}

impl std::fmt::Debug for PodServe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodServe")
            .field("uid", &self.uid)
            .field("cores", &self.cores.len())
            .finish_non_exhaustive()
    }
}

/// Where a binary serves a pod's listeners: the tokio data runtime ([`TokioServers`]), or every
/// core of the io_uring build. The rest (binding inside the pod's namespace, certificates, drain,
/// removal) is [`RuntimePods`]'s, written once.
pub trait PodServers: Send + 'static {
    /// How many cores serve each pod: each gets its own socket of every pod listener
    /// (`SO_REUSEPORT` when more than one).
    fn cores(&self) -> usize;

    /// Serves `pod` (a worker per core with the pod's socket factory, accepting on the core's
    /// listeners until the pod's phase drains). `Err` says why it could not; what was sent to cores
    /// already ends with the pod's phase.
    fn serve(&mut self, pod: PodServe) -> Result<(), String>;
}

/// Starts and stops pods: binds each pod's listeners inside its namespace (one set per core),
/// fetches its certificate ahead, and hands them to the binary's [`PodServers`].
pub struct RuntimePods<S> {
    context: Arc<ProxyContext>,
    /// The registry of each core: a pod's connections on a core are a child of it.
    registries: Vec<ConnectionRegistry>,
    servers: S,
    home: Netns,
    port_reuse: bool,
    trust_domain: TrustDomain,
    /// The DNS proxy's address inside each pod, its context, and the network of its clients.
    dns: Option<(SocketAddr, Arc<DnsContext>, String)>,
    /// Whether the pods' listeners are bound on `[::]` (both families) rather than `0.0.0.0`.
    ipv6: bool,
    /// The proxy's phase: a pod drains with the proxy.
    phase: watch::Receiver<Phase>,
    /// The control thread's runtime, where each pod's phase follows the proxy's.
    control: Handle,
    /// Pods whose listeners started, and pods stopped (ztunnel's `workload_manager_proxies_*`).
    started: Counter,
    stopped: Counter,
}

impl<S> std::fmt::Debug for RuntimePods<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimePods")
            .field("cores", &self.registries.len())
            .finish_non_exhaustive()
    }
}

/// A pod being served: its phase (drained on stop) and its connections on each core.
pub struct RunningPod {
    phase: watch::Sender<Phase>,
    registries: Vec<ConnectionRegistry>,
}

impl std::fmt::Debug for RunningPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPod")
            .field(
                "connections",
                &self.registries.iter().map(ConnectionRegistry::len).sum::<usize>(),
            )
            .finish_non_exhaustive()
    }
}

/// What [`RuntimePods::new`] needs of the proxy.
pub struct PodsSetup {
    /// The proxy's context (certificates, configuration).
    pub context: Arc<ProxyContext>,
    /// The registry of each core (one for the tokio binary), in core order.
    pub registries: Vec<ConnectionRegistry>,
    /// `INPOD_PORT_REUSE`, the trust domain, the DNS proxy's address.
    pub config: Config,
    /// The DNS proxy's context, when it is on.
    pub dns: Option<Arc<DnsContext>>,
    /// The proxy's phase.
    pub phase: watch::Receiver<Phase>,
}

impl<S: PodServers> RuntimePods<S> {
    /// Pods served by `servers`. Call on the control thread's runtime.
    pub fn new(setup: PodsSetup, servers: S) -> std::io::Result<Self> {
        let PodsSetup {
            context,
            registries,
            config,
            dns,
            phase,
        } = setup;
        let port_reuse = config.inpod.as_ref().is_none_or(|inpod| inpod.port_reuse);
        if !port_reuse && servers.cores() > 1 {
            tracing::warn!(
                cores = servers.cores(),
                "INPOD_PORT_REUSE=false: each core still binds its own socket of every pod listener with SO_REUSEPORT"
            );
        }
        let dns = match (config.listeners.dns, dns) {
            (Some(addr), Some(context)) => Some((addr, context, config.network.clone())),
            _ => None,
        };
        Ok(RuntimePods {
            context,
            registries,
            servers,
            home: Netns::own()?,
            port_reuse,
            trust_domain: config.trust_domain.clone(),
            dns,
            ipv6: config.listeners.ipv6,
            phase,
            control: Handle::current(),
            started: Counter::default(),
            stopped: Counter::default(),
        })
    }

    /// Binds one core's listeners inside the pod's namespace (through `factory`); its connections
    /// will be in `registry`.
    fn bind(
        &self,
        factory: &ProxySocketFactory,
        reuse_port: bool,
        registry: ConnectionRegistry,
    ) -> Result<PodCore, String> {
        let mut listeners = Vec::new();
        for (listener, port) in POD_PORTS {
            let opts = SocketOptions {
                reuse_port,
                transparent: listener != Listener::Outbound,
                v6_only: Some(false),
                ..SocketOptions::default()
            };
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            let fail =
                |addr: SocketAddr, e: std::io::Error| format!("binding the pod's {listener} listener {addr}: {e}");
            let socket = if self.ipv6 {
                match factory.listener(v6, &opts) {
                    Ok(socket) => socket,
                    // A port in use is in use for both families.
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(fail(v6, e)),
                    // No IPv6 in the pod's namespace: IPv4 only.
                    Err(e) => {
                        tracing::debug!(%listener, error = %e, "no IPv6 in the pod's namespace: listening on IPv4 only");
                        factory.listener(v4, &opts).map_err(|e| fail(v4, e))?
                    }
                }
            } else {
                factory.listener(v4, &opts).map_err(|e| fail(v4, e))?
            };
            listeners.push((listener, socket));
        }
        let dns = match &self.dns {
            Some((addr, _, _)) => Some(
                lifecycle::bind_dns_with(factory, *addr)
                    .map_err(|e| format!("binding the pod's DNS proxy {addr}: {e}"))?,
            ),
            None => None,
        };
        Ok(PodCore {
            listeners,
            dns,
            registry,
        })
    }
}

impl<S: PodServers> PodStarter for RuntimePods<S> {
    type Running = RunningPod;

    fn start(&mut self, uid: &str, info: Option<&WorkloadInfo>, netns: &Netns) -> Result<RunningPod, String> {
        let factory = ProxySocketFactory::pod(netns.clone(), self.home.clone());
        let reuse_port = self.port_reuse || self.registries.len() > 1;
        let mut cores = Vec::with_capacity(self.registries.len());
        for registry in &self.registries {
            cores.push(self.bind(&factory, reuse_port, registry.child())?);
        }
        if let Some(info) = info {
            match IstioIdentity::new(self.trust_domain.clone(), &info.namespace, &info.service_account) {
                Ok(identity) => self.context.manager().warm_up(&identity.into()),
                Err(e) => {
                    tracing::warn!(pod = uid, error = %e, "the pod's identity is not valid: no certificate fetched ahead")
                }
            }
        }
        let registries: Vec<ConnectionRegistry> = cores.iter().map(|core| core.registry.clone()).collect();
        let (phase, pod_phase) = watch::channel(Phase::Serving);
        let dns = self.dns.as_ref().map(|(_, context, network)| {
            let clients = match info {
                Some(info) => Clients::Workload {
                    namespace: info.namespace.clone(),
                    name: info.name.clone(),
                    network: network.clone(),
                },
                None => Clients::BySource {
                    network: network.clone(),
                },
            };
            (context.clone(), clients)
        });
        self.servers.serve(PodServe {
            uid: uid.to_owned(),
            factory,
            cores,
            dns,
            phase: pod_phase,
        })?;
        // The pod follows the proxy's drain, until the pod's own serving ends (its phase has no
        // receiver left): a removed pod leaves no task behind.
        let mut process = self.phase.clone();
        let follower = phase.clone();
        self.control.spawn(async move {
            loop {
                let now = *process.borrow_and_update();
                if now >= Phase::Draining {
                    follower.send_if_modified(|p| {
                        let changed = now > *p;
                        if changed {
                            *p = now;
                        }
                        changed
                    });
                }
                if now == Phase::Abandoned {
                    return;
                }
                tokio::select! {
                    changed = process.changed() => if changed.is_err() { return },
                    () = follower.closed() => return,
                }
            }
        });
        tracing::info!(pod = uid, workload = ?info.map(ToString::to_string), cores = registries.len(),
            "serving the pod in its network namespace");
        self.started.inc();
        Ok(RunningPod { phase, registries })
    }

    fn stop(&mut self, uid: &str, running: RunningPod) {
        self.stopped.inc();
        let RunningPod { phase, registries } = running;
        let _ = phase.send(Phase::Draining);
        let reason = CloseReason::PodRemoved { uid: uid.to_owned() };
        let closed: usize = registries.iter().map(|registry| registry.close_all(&reason)).sum();
        let _ = phase.send(Phase::Abandoned);
        tracing::info!(pod = uid, closed, "the pod is no longer served: its listeners closed");
    }
}

/// The tokio binary's [`PodServers`]: every pod on the data runtime, one worker per pod.
#[derive(Debug)]
pub struct TokioServers {
    context: Arc<ProxyContext>,
    metrics: Arc<Metrics>,
    data: Handle,
}

impl TokioServers {
    /// Pods served on `data` with `context`, counted in `metrics`.
    pub fn new(context: Arc<ProxyContext>, metrics: Arc<Metrics>, data: Handle) -> Self {
        TokioServers { context, metrics, data }
    }
}

impl PodServers for TokioServers {
    fn cores(&self) -> usize {
        1
    }

    fn serve(&mut self, pod: PodServe) -> Result<(), String> {
        let PodServe {
            uid: _,
            factory,
            cores,
            dns,
            phase,
        } = pod;
        let Some(PodCore {
            listeners,
            dns: dns_sockets,
            registry,
        }) = cores.into_iter().next()
        else {
            return Err("no listener bound for the pod".to_owned());
        };
        let listeners = {
            let _data = self.data.enter();
            listeners
                .into_iter()
                .map(|(listener, socket)| {
                    into_listener(socket)
                        .map(|tcp| (listener, tcp))
                        .map_err(|e| format!("serving the pod's {listener} listener: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let connector = TokioConnector::with_factory(
            self.context.client_tls(),
            factory.clone(),
            self.context.connector_config(),
        );
        let worker = Arc::new(
            Worker::new(
                self.context.clone(),
                TokioRuntime::with_factory(factory.clone()),
                connector,
                TokioExecutor::with_handle(self.data.clone()),
                self.metrics.clone(),
                registry,
            )
            .for_pod(PLAINTEXT_PORT)
            .with_original_source(self.context.original_source(true)),
        );
        if let (Some((context, clients)), Some(sockets)) = (dns, dns_sockets) {
            self.data.spawn(lifecycle::serve_dns_with::<Tokio, _>(
                context,
                factory,
                clients,
                sockets,
                phase.clone(),
            ));
        }
        self.data.spawn(lifecycle::serve::<Tokio>(worker, listeners, phase));
        Ok(())
    }
}

/// Starts in-pod mode when `config` asks for it (on the control thread's runtime): the pods istio-cni
/// names are served by `servers`, their connections children of `registries` (one per core), with
/// the DNS proxy's context `dns`; readiness waits for istio-cni's snapshot and the pods' listeners.
pub fn start<S: PodServers>(
    starting: &mut Starting,
    config: &Config,
    registries: Vec<ConnectionRegistry>,
    dns: Option<Arc<DnsContext>>,
    servers: S,
) -> Result<Option<Inpod<S>>, StartError> {
    let Some(inpod) = &config.inpod else {
        return Ok(None);
    };
    let setup = PodsSetup {
        context: starting.plane().context().clone(),
        registries,
        config: config.clone(),
        dns,
        phase: starting.phase(),
    };
    let pods = RuntimePods::new(setup, servers).map_err(|error| StartError::Inpod(error.to_string()))?;
    let inpod = Inpod::start(inpod, pods);
    starting.readiness_check(Box::new(inpod.readiness_check()));
    starting.plane().set_workload_state(inpod.workload_state());
    Ok(Some(inpod))
}

/// The ZDS handler: istio-cni's messages applied to the pods.
struct Handler<S: PodServers> {
    pods: Arc<Mutex<Pods<RuntimePods<S>>>>,
}

impl<S: PodServers> PodHandler for Handler<S> {
    fn session_started(&mut self, session: u64) {
        tracing::info!(session, "connected to istio-cni");
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .session_started();
    }

    async fn handle(&mut self, event: PodEvent) -> Result<(), String> {
        let mut pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            PodEvent::Add { uid, info, netns } => {
                let netns = Netns::from_fd(netns).map_err(|e| e.to_string())?;
                let info = info.map(|i| WorkloadInfo {
                    namespace: i.namespace,
                    name: i.name,
                    service_account: i.service_account,
                });
                pods.add(&uid, info, netns, Instant::now())
            }
            PodEvent::Keep { uid } => pods.keep(&uid),
            PodEvent::Del { uid } => {
                pods.del(&uid);
                Ok(())
            }
            PodEvent::SnapshotSent { named } => {
                let drained = pods.snapshot_sent(&named);
                tracing::info!(pods = named.len(), drained, "istio-cni's snapshot processed");
                Ok(())
            }
        }
    }
}

/// In-pod mode running: the ZDS client and the retries on the control runtime, the pods on the
/// data runtime.
pub struct Inpod<S: PodServers> {
    pods: Arc<Mutex<Pods<RuntimePods<S>>>>,
    tasks: Vec<JoinHandle<()>>,
    status: ZdsStatus,
}

impl<S: PodServers> std::fmt::Debug for Inpod<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inpod")
            .field("pods", &self.pods)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<S: PodServers> Inpod<S> {
    /// Connects to istio-cni at `config.socket` (from the current tokio runtime: the control
    /// thread's) and serves the pods it names with `pods`.
    pub fn start(config: &InpodConfig, pods: RuntimePods<S>) -> Inpod<S> {
        let pods = Arc::new(Mutex::new(Pods::new(pods)));
        let mut client = ZdsClient::new(config.socket.clone(), TokioTimer);
        let status = client.status();
        let mut handler = Handler { pods: pods.clone() };
        let zds = tokio::spawn(async move {
            let _ = client.run(&mut handler).await;
        });
        let retry_pods = pods.clone();
        let retries = tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETRY_TICK);
            loop {
                tick.tick().await;
                let mut pods = retry_pods.lock().unwrap_or_else(PoisonError::into_inner);
                for (uid, outcome) in pods.retry_due(Instant::now()) {
                    if outcome.is_ok() {
                        tracing::info!(pod = %uid, "the pod's listeners started on a retry");
                    }
                }
            }
        });
        tracing::info!(socket = %config.socket.display(), "in-pod mode: waiting for istio-cni's pods");
        Inpod {
            pods,
            tasks: vec![zds, retries],
            status,
        }
    }

    /// Why the proxy is not ready on in-pod mode's account, if it is not.
    pub fn readiness_check(&self) -> impl Fn() -> Option<String> + Send + Sync + 'static {
        let pods = self.pods.clone();
        let status = self.status.clone();
        move || {
            let state = status.state();
            if !state.connected && !state.synced() {
                let why = state.last_error.unwrap_or_else(|| "not connected yet".to_owned());
                return Some(format!("istio-cni ({}): {why}", state.path.display()));
            }
            pods.lock().unwrap_or_else(PoisonError::into_inner).not_ready()
        }
    }

    /// What renders `/config_dump`'s `workloadState` as ztunnel does: each pod by uid, its `state`
    /// (`Up` when its listeners are up, `Pending` while they are not) and its `info` (name,
    /// namespace, service account, when istio-cni gave them); meshwire adds, for a pending pod, why
    /// its last start failed and how many starts failed (`meshwire`).
    pub fn workload_state(&self) -> crate::admin::IstioDump {
        let pods = self.pods.clone();
        Arc::new(move || {
            let list = pods.lock().unwrap_or_else(PoisonError::into_inner).list();
            let state = list
                .into_iter()
                .map(|pod| {
                    let mut entry = serde_json::Map::new();
                    if let Some(info) = &pod.info {
                        entry.insert(
                            "info".to_owned(),
                            serde_json::json!({
                                "name": info.name,
                                "namespace": info.namespace,
                                "serviceAccount": info.service_account,
                            }),
                        );
                    }
                    entry.insert("state".to_owned(), (if pod.running { "Up" } else { "Pending" }).into());
                    if let Some(error) = pod.error {
                        entry.insert(
                            "meshwire".to_owned(),
                            serde_json::json!({ "error": error, "failedAttempts": pod.failed_attempts }),
                        );
                    }
                    (pod.uid, serde_json::Value::Object(entry))
                })
                .collect::<serde_json::Map<_, _>>();
            serde_json::Value::Object(state)
        })
    }

    /// ztunnel's workload manager gauges, read from the pods at each scrape:
    /// `workload_manager_active_proxy_count` (pods served) and
    /// `workload_manager_pending_proxy_count` (pods whose listeners wait for a retry), and the
    /// counters `workload_manager_proxies_started_total` and `workload_manager_proxies_stopped_total`, for
    /// [`MetricsHandler::with_refreshed`](crate::admin::MetricsHandler::with_refreshed).
    pub fn metrics(&self) -> (Arc<prometheus_client::registry::Registry>, Arc<dyn Fn() + Send + Sync>) {
        use prometheus_client::metrics::gauge::Gauge;

        let mut registry = prometheus_client::registry::Registry::default();
        let manager = registry.sub_registry_with_prefix("workload_manager");
        let (active, pending) = (Gauge::<i64>::default(), Gauge::<i64>::default());
        // ztunnel's names and help texts.
        manager.register(
            "active_proxy_count",
            "The total number current workloads with active proxies (unstable)",
            active.clone(),
        );
        manager.register(
            "pending_proxy_count",
            "The total number current workloads with pending proxies (unstable)",
            pending.clone(),
        );
        let (started, stopped) = {
            let pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
            (pods.starter().started.clone(), pods.starter().stopped.clone())
        };
        manager.register(
            "proxies_started",
            "The total number of proxies that were started (unstable)",
            started,
        );
        manager.register(
            "proxies_stopped",
            "The total number of proxies that were stopped (unstable)",
            stopped,
        );
        let pods = self.pods.clone();
        let refresh = move || {
            let pods = pods.lock().unwrap_or_else(PoisonError::into_inner);
            active.set(i64::try_from(pods.running()).unwrap_or(i64::MAX));
            pending.set(i64::try_from(pods.pending()).unwrap_or(i64::MAX));
        };
        (Arc::new(registry), Arc::new(refresh))
    }

    /// `handler` with in-pod mode's metrics ([`Inpod::metrics`]) when in-pod mode is on.
    pub fn add_metrics(
        inpod: Option<&Inpod<S>>,
        handler: crate::admin::MetricsHandler,
    ) -> crate::admin::MetricsHandler {
        match inpod {
            Some(inpod) => {
                let (registry, refresh) = inpod.metrics();
                handler.with_refreshed(registry, refresh)
            }
            None => handler,
        }
    }

    /// Stops talking to istio-cni and stops every pod (their connections are closed).
    pub fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.pods.lock().unwrap_or_else(PoisonError::into_inner).stop_all();
    }
}
