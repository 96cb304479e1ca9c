//! In-pod mode in the tokio binary: istio-cni's pods served inside their own network namespaces.
//!
//! The ZDS client ([`meshwire_control::zds`]) runs on the control thread; each pod istio-cni adds
//! gets, through [`inpod::Pods`](crate::inpod::Pods) and [`TokioPods`] (its [`PodStarter`]):
//!
//! - a [`Worker`] of its own whose sockets are made inside the pod's namespace
//!   ([`ProxySocketFactory::Pod`]): its HBONE pool connects from the pod, its upstream
//!   connections leave from the pod;
//! - the listeners 15001 (outbound capture), 15006 (inbound plaintext) and 15008 (inbound HBONE)
//!   bound in the pod's namespace on every address, with `IP_TRANSPARENT` (istio-cni's rules send
//!   inbound traffic there with TPROXY) and `SO_REUSEPORT` (`INPOD_PORT_REUSE`), served by the
//!   accept loops every worker has ([`lifecycle::serve`]) on the data runtime;
//! - a child of the process's [`ConnectionRegistry`], so that new policies re-check the pod's
//!   connections and a removed pod's connections are closed at once;
//! - its workload's certificate fetched ahead of its first connection, when istio-cni names it.
//!
//! A pod removed (`DelWorkload`, or left out of a snapshot) stops accepting and has its connections
//! closed; the proxy's drain drains every pod. Readiness waits for istio-cni's snapshot and for
//! every pod's listeners ([`Pods::not_ready`](crate::inpod::Pods::not_ready)).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use meshwire_control::zds::{PodEvent, PodHandler, ZdsClient, ZdsStatus};
use meshwire_identity::id::{IstioIdentity, TrustDomain};
use meshwire_rt::tokio::TokioTimer;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::lifecycle::{self, Phase};
use super::plane::ProxyContext;
use super::worker::Worker;
use crate::config::{InpodConfig, WorkloadInfo};
use crate::inpod::{PodStarter, Pods};
use crate::rt::netns::{Netns, ProxySocketFactory};
use crate::rt::socket::SocketOptions;
use crate::rt::tokio::{Tokio, TokioConnector, TokioExecutor, TokioRuntime, into_listener};
use crate::telemetry::metrics::Metrics;
use crate::watch::{CloseReason, ConnectionRegistry};

/// The pods' inbound plaintext port (ztunnel's, fixed: istio-cni's rules name it).
const PLAINTEXT_PORT: u16 = 15006;

/// The ports of a pod's listeners (ztunnel's, fixed: istio-cni's rules name them).
pub const POD_PORTS: [(crate::config::Listener, u16); 3] = [
    (crate::config::Listener::Outbound, 15001),
    (crate::config::Listener::InboundPlaintext, PLAINTEXT_PORT),
    (crate::config::Listener::Inbound, 15008),
];

/// How often pods whose listeners could not start are tried again (the schedule itself is
/// [`crate::inpod::RETRY_INTERVAL`]).
const RETRY_TICK: Duration = Duration::from_secs(1);

/// Starts and stops pods on the tokio data runtime.
pub struct TokioPods {
    context: Arc<ProxyContext>,
    metrics: Arc<Metrics>,
    registry: ConnectionRegistry,
    data: Handle,
    home: Netns,
    port_reuse: bool,
    trust_domain: TrustDomain,
    /// The proxy's phase: a pod drains with the proxy.
    phase: watch::Receiver<Phase>,
}

/// A pod being served: its phase (drained on stop) and its connections.
pub struct RunningPod {
    phase: watch::Sender<Phase>,
    registry: ConnectionRegistry,
}

impl std::fmt::Debug for RunningPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPod")
            .field("connections", &self.registry.len())
            .finish_non_exhaustive()
    }
}

impl TokioPods {
    /// Pods served on `data` with `context`, counted in `metrics`, their connections children of
    /// `registry`, drained with `phase`.
    pub fn new(
        context: Arc<ProxyContext>,
        metrics: Arc<Metrics>,
        registry: ConnectionRegistry,
        data: Handle,
        inpod: &InpodConfig,
        trust_domain: TrustDomain,
        phase: watch::Receiver<Phase>,
    ) -> std::io::Result<Self> {
        Ok(TokioPods {
            context,
            metrics,
            registry,
            data,
            home: Netns::own()?,
            port_reuse: inpod.port_reuse,
            trust_domain,
            phase,
        })
    }
}

impl PodStarter for TokioPods {
    type Running = RunningPod;

    fn start(&mut self, uid: &str, info: Option<&WorkloadInfo>, netns: &Netns) -> Result<RunningPod, String> {
        let factory = ProxySocketFactory::pod(netns.clone(), self.home.clone());
        let mut listeners = Vec::new();
        {
            let _data = self.data.enter();
            for (listener, port) in POD_PORTS {
                let opts = SocketOptions {
                    reuse_port: self.port_reuse,
                    transparent: listener != crate::config::Listener::Outbound,
                    ..SocketOptions::default()
                };
                let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
                let socket = crate::rt::socket::SocketFactory::listener(&factory, addr, &opts)
                    .map_err(|e| format!("binding the pod's {listener} listener {addr}: {e}"))?;
                let tcp = into_listener(socket).map_err(|e| format!("serving the pod's {listener} listener: {e}"))?;
                listeners.push((listener, tcp));
            }
        }
        if let Some(info) = info {
            match IstioIdentity::new(self.trust_domain.clone(), &info.namespace, &info.service_account) {
                Ok(identity) => self.context.manager().warm_up(&identity.into()),
                Err(e) => {
                    tracing::warn!(pod = uid, error = %e, "the pod's identity is not valid: no certificate fetched ahead")
                }
            }
        }
        let registry = self.registry.child();
        let connector = TokioConnector::with_factory(
            self.context.client_tls(),
            factory.clone(),
            self.context.connector_config(),
        );
        let worker = Arc::new(
            Worker::new(
                self.context.clone(),
                TokioRuntime::with_factory(factory),
                connector,
                TokioExecutor::with_handle(self.data.clone()),
                self.metrics.clone(),
                registry.clone(),
            )
            .with_transparent_plaintext(PLAINTEXT_PORT),
        );
        let (phase, pod_phase) = watch::channel(Phase::Serving);
        // The pod follows the proxy's drain, until the pod's own serving ends (its phase has no
        // receiver left): a removed pod leaves no task behind.
        let mut process = self.phase.clone();
        let follower = phase.clone();
        self.data.spawn(async move {
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
        self.data.spawn(lifecycle::serve::<Tokio>(worker, listeners, pod_phase));
        tracing::info!(pod = uid, workload = ?info.map(ToString::to_string), "serving the pod in its network namespace");
        Ok(RunningPod { phase, registry })
    }

    fn stop(&mut self, uid: &str, running: RunningPod) {
        let RunningPod { phase, registry } = running;
        let _ = phase.send(Phase::Draining);
        let closed = registry.close_all(&CloseReason::PodRemoved { uid: uid.to_owned() });
        let _ = phase.send(Phase::Abandoned);
        tracing::info!(pod = uid, closed, "the pod is no longer served: its listeners closed");
    }
}

/// The ZDS handler: istio-cni's messages applied to the pods.
struct Handler {
    pods: Arc<Mutex<Pods<TokioPods>>>,
}

impl PodHandler for Handler {
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
#[derive(Debug)]
pub struct Inpod {
    pods: Arc<Mutex<Pods<TokioPods>>>,
    tasks: Vec<JoinHandle<()>>,
    status: ZdsStatus,
}

impl std::fmt::Debug for TokioPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokioPods").finish_non_exhaustive()
    }
}

impl Inpod {
    /// Connects to istio-cni at `config.socket` (from the current tokio runtime: the control
    /// thread's) and serves the pods it names with `pods`.
    pub fn start(config: &InpodConfig, pods: TokioPods) -> Inpod {
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

    /// Stops talking to istio-cni and stops every pod (their connections are closed).
    pub fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.pods.lock().unwrap_or_else(PoisonError::into_inner).stop_all();
    }
}
