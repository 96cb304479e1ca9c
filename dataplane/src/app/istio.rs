//! The proxy as a member of an Istio mesh: istiod's delta xDS stream as the source of workloads,
//! services and policies, and the Istio CA as the source of certificates. Both run on the control
//! plane's tokio runtime, in both binaries.
//!
//! Each push istiod sends goes through [`XdsConfig`] (decode, convert, keep by name) into the same
//! [`LocalConfig`](crate::xds::LocalConfig) the local file gives, and from there into the same published [`Snapshot`]: one
//! conversion target, so routing and policy are those of the file path. Nothing is published before
//! both types (`Address` and `Authorization`) have sent their first push, so that no workload is
//! ever served without its policies. Each publication re-checks the established connections (a
//! pushed DENY closes what it denies) and asks the certificate manager for the certificates of the
//! workloads the proxy serves, so that they are there before their first connection. While the
//! stream is down the last good state keeps serving; the client reconnects with jittered backoff.
//!
//! [`Snapshot`]: crate::watch::Snapshot

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshwire_control::ads::{AdsClient, AdsStatus, Rejected, TerminationReason, XdsHandler};
use meshwire_control::ca::CaClient;
use meshwire_control::channel::{self, Address, Channel, ChannelConfig, Token};
use meshwire_control::node::node_from_env;
use meshwire_control::proto::envoy::config::core::v3::Node;
use meshwire_control::proto::envoy::service::discovery::v3::Resource;
use meshwire_identity::id::SpiffeId;
use meshwire_identity::source::istio_ca::{CertificateAuthority, CertificateRequest};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::plane::{Manager, StartError};
use crate::admin::{IstioDump, rfc3339};
use crate::config::{self, AuthToken, Config, ControlPlane, ProxyMode, Roots, XdsPriority};
use crate::istio::XdsConfig;
use crate::pace;
use crate::rbac::PolicySet;
use crate::rt::tokio::TokioTimer;
use crate::state::{LocalProxy, State};
use crate::watch::{ConnectionRegistry, Published, Snapshot};

/// A channel to one of istiod's services as the configuration describes it.
pub(crate) fn channel(config: &Config, plane: &ControlPlane) -> Result<Channel, StartError> {
    let invalid = |error: channel::ChannelError| StartError::Istiod {
        address: plane.address.clone(),
        reason: error.to_string(),
    };
    let address = Address::parse(&plane.address).map_err(invalid)?;
    let roots = match &plane.roots {
        Roots::File(path) => channel::Roots::File(path.clone()),
        Roots::System => channel::Roots::System,
        Roots::Pem(pem) => channel::Roots::Pem(pem.clone()),
    };
    let token = match &config.istio.token {
        AuthToken::File(path) => Token::File(path.clone()),
        AuthToken::Static(token) => Token::Static(token.clone()),
    };
    let mut channel = ChannelConfig::new(address, roots)
        .token(token)
        .cluster_id(config.cluster_id.clone());
    if let Some(name) = &plane.server_name {
        channel = channel.server_name(name.clone());
    }
    for (name, value) in &plane.headers {
        channel = channel.header(name.clone(), value.clone());
    }
    Channel::new(channel).map_err(invalid)
}

/// The `Node` the proxy names itself with to istiod: its pod, namespace, address, node and the
/// `ISTIO_META_*` / `ISTIO_METAJSON_*` metadata.
pub(crate) fn node(config: &Config) -> Result<Node, StartError> {
    let istio = &config.istio;
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut push = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            vars.push((name.to_owned(), value));
        }
    };
    push("POD_NAME", istio.pod_name.clone());
    push("POD_NAMESPACE", istio.pod_namespace.clone());
    push("INSTANCE_IP", config.instance_ip.map(|ip| ip.to_string()));
    if let ProxyMode::Shared { node: Some(node) } = &config.mode {
        push("NODE_NAME", Some(node.clone()));
    }
    for (key, value) in &istio.metadata {
        vars.push((format!("{}{key}", config::META_PREFIX), value.clone()));
    }
    for (key, value) in &istio.metadata_json {
        vars.push((format!("{}{key}", config::META_JSON_PREFIX), value.clone()));
    }
    node_from_env(vars).map_err(|error| StartError::Istiod {
        address: istio.xds.as_ref().map(|x| x.address.clone()).unwrap_or_default(),
        reason: format!("cannot name the proxy to istiod: {error}"),
    })
}

/// The Istio CA client as the identity crate's certificate authority.
#[derive(Debug, Clone)]
pub struct IstioCaClient(pub(crate) CaClient<TokioTimer>);

impl IstioCaClient {
    /// The client of the CA `config` names.
    pub(crate) fn new(config: &Config, plane: &ControlPlane) -> Result<Self, StartError> {
        Ok(Self(CaClient::new(channel(config, plane)?, TokioTimer)))
    }

    /// The CA's address.
    pub fn address(&self) -> String {
        self.0.address()
    }
}

impl CertificateAuthority for IstioCaClient {
    async fn create_certificate(&self, request: CertificateRequest<'_>) -> Result<Vec<String>, String> {
        let impersonated = request.impersonate.then(|| request.id.to_string());
        self.0
            .create_certificate(request.csr_pem.to_owned(), request.validity, impersonated)
            .await
            .map_err(|error| {
                tracing::warn!(identity = %request.id, %error, "the Istio CA did not issue a certificate");
                error.to_string()
            })
    }
}

/// What the xDS stream feeds, on the xDS thread ([`Xds::start`]): the store of istiod's resources,
/// and what a new state is published to. What it did goes to the control thread as [`Event`]s.
struct Handler {
    store: XdsConfig,
    /// The state of the last publication, which the next push updates (never rebuilds).
    state: Arc<State>,
    /// Its policies, indexed; rebuilt only by a push of policies.
    policies: Arc<PolicySet>,
    published: Published,
    proxy: LocalProxy,
    retired: Retired,
    /// A state from istiod was published.
    served: bool,
    /// The share of one CPU a push takes once the proxy serves (`--xds-cpu-share`).
    cpu_share: f64,
    events: mpsc::UnboundedSender<Event>,
}

/// What the xDS thread tells the control thread, which logs it, re-checks the established
/// connections and asks for certificates: the xDS thread takes no lock a data-path thread or the
/// control thread may wait for while it is preempted (the connection registries, the certificate
/// manager, the log output), since at [`XdsPriority::Idle`] it may stay preempted for long.
#[derive(Debug)]
enum Event {
    /// Resources of a push were rejected (the others apply).
    Rejected {
        type_url: String,
        rejected: Vec<crate::istio::Rejected>,
    },
    /// The first push of one type arrived; nothing is served before the other's.
    Waiting { type_url: String, changed: usize },
    /// A push was applied and its state published.
    Published {
        type_url: String,
        changed: usize,
        removed: usize,
        rejected: usize,
        generation: u64,
        /// From the push's arrival to its publication, rests included.
        took: Duration,
        /// How long the push rested, paced to its share of one CPU.
        rested: Duration,
        /// The identities of the workloads this proxy serves on its node (`None` for a proxy
        /// without a node name, which fetches on first use only).
        local_identities: Option<BTreeSet<SpiffeId>>,
    },
}

/// How often replaced snapshots still read by connections are looked at again.
const RETIRED_SWEEP: Duration = Duration::from_secs(1);

/// A push that took longer than this is logged at warning level (at [`XdsPriority::Idle`] it means
/// the data path kept every CPU busy).
const SLOW_APPLY: Duration = Duration::from_secs(5);

/// The name of the xDS thread.
pub const XDS_THREAD: &str = "ztunnel-xds";

/// Replaced snapshots, kept until no connection reads them any more and then freed on the xDS
/// thread. A snapshot of a large mesh takes milliseconds to free; without this, the data-path thread
/// that happens to drop the last reference would pay for it in the middle of a connection. A state
/// that shares nothing with the states after it (they were built afresh) is freed entry by entry
/// within the push's pace (`crate::pace`). (Only the xDS thread touches the list: the handler and
/// the periodic sweep.)
#[derive(Clone, Default)]
struct Retired(Arc<std::sync::Mutex<Vec<RetiredSnapshot>>>);

struct RetiredSnapshot {
    snapshot: Arc<Snapshot>,
    /// Its state shares no part with a later one: freeing it frees all of it.
    alone: bool,
}

impl Retired {
    /// Keeps `snapshot` until no connection reads it; `alone` when the state that replaced it was
    /// built afresh.
    fn retire(&self, snapshot: Arc<Snapshot>, alone: bool) {
        self.lock().push(RetiredSnapshot { snapshot, alone });
        self.sweep();
    }

    /// Frees the snapshots only this list still holds.
    fn sweep(&self) {
        let unread: Vec<RetiredSnapshot> = self
            .lock()
            .extract_if(.., |r| Arc::strong_count(&r.snapshot) == 1)
            .collect();
        for retired in unread {
            retired.free();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RetiredSnapshot>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RetiredSnapshot {
    /// Drops the snapshot; when the thread is paced and the state is alone, takes it apart in the
    /// pace (unpaced, a plain drop costs less).
    fn free(self) {
        let RetiredSnapshot { snapshot, alone } = self;
        if alone
            && pace::active()
            && let Ok(snapshot) = Arc::try_unwrap(snapshot)
            && let Ok(state) = Arc::try_unwrap(snapshot.state)
        {
            state.dismantle();
        }
    }
}

impl Handler {
    fn tell(&self, event: Event) {
        // The control thread goes only when the proxy stops.
        let _ = self.events.send(event);
    }
}

impl XdsHandler for Handler {
    fn apply(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> Vec<Rejected> {
        // The first push is applied at once: nothing is served before it, and readiness waits for it.
        let share = if self.served { self.cpu_share } else { 1.0 };
        pace::paced(share, || self.apply_paced(type_url, resources, removed)).0
    }
}

impl Handler {
    /// [`XdsHandler::apply`], within the pace of the push.
    fn apply_paced(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> Vec<Rejected> {
        let started = Instant::now();
        let (changed, gone) = (resources.len(), removed.len());
        let rejected = self.store.apply(type_url, resources, removed);
        let answer: Vec<Rejected> = rejected
            .iter()
            .map(|r| Rejected::new(r.name.clone(), r.reason.clone()))
            .collect();
        let count = rejected.len();
        if !rejected.is_empty() {
            self.tell(Event::Rejected {
                type_url: type_url.to_owned(),
                rejected,
            });
        }
        let complete = [crate::istio::ADDRESS_TYPE_URL, crate::istio::AUTHORIZATION_TYPE_URL]
            .iter()
            .all(|t| self.store.received(t));
        if complete && self.served && changed == 0 && gone == 0 {
            // Nothing changed (a resumed stream that holds every version): the state stays as it is,
            // no rebuild, no new generation.
        } else if complete {
            self.served = true;
            let previous = self.published.load();
            let delta = self.store.take_delta();
            // Built afresh, the next state shares nothing with the previous one.
            let afresh = delta.is_whole();
            if let Some(policies) = delta.policies() {
                self.policies = Arc::new(PolicySet::new(policies.iter().cloned()));
            }
            self.state = Arc::new(self.state.update(delta));
            let snapshot = self.published.publish_parts(
                Arc::clone(&self.state),
                Arc::clone(&self.policies),
                None,
                SystemTime::now(),
            );
            self.retired.retire(previous, afresh);
            let local_identities = self.proxy.node.is_some().then(|| {
                snapshot
                    .state
                    .local_identities(&self.proxy)
                    .into_iter()
                    .map(SpiffeId::from)
                    .collect()
            });
            let took = started.elapsed();
            self.tell(Event::Published {
                type_url: type_url.to_owned(),
                changed,
                removed: gone,
                rejected: count,
                generation: snapshot.generation,
                took,
                rested: pace::rests().total,
                local_identities,
            });
        } else {
            self.tell(Event::Waiting {
                type_url: type_url.to_owned(),
                changed,
            });
        }
        answer
    }
}

/// The control thread's side of the xDS stream: what follows each push.
struct Follower {
    address: String,
    published: Published,
    registries: Vec<ConnectionRegistry>,
    manager: Manager,
    /// The identities whose certificates were fetched ahead of need (a node proxy's workloads).
    prefetched: BTreeSet<SpiffeId>,
    stats: ApplyStats,
}

impl Follower {
    fn on(&mut self, event: Event) {
        let address = &self.address;
        match event {
            Event::Rejected { type_url, rejected } => {
                for r in &rejected {
                    tracing::warn!(istiod = %address, %type_url, resource = %r.name, reason = %r.reason, "rejected a resource istiod sent");
                }
            }
            Event::Waiting { type_url, changed } => {
                tracing::info!(istiod = %address, %type_url, changed, "first push of one type; waiting for the other before serving");
            }
            Event::Published {
                type_url,
                changed,
                removed,
                rejected,
                generation,
                took,
                rested,
                local_identities,
            } => {
                self.stats.record(took, rested);
                // The current state: a newer one may have been published meanwhile.
                let snapshot = self.published.load();
                let closed: usize = self.registries.iter().map(|r| r.reevaluate(&snapshot)).sum();
                drop(snapshot);
                tracing::info!(
                    istiod = %address,
                    %type_url,
                    changed,
                    removed,
                    rejected,
                    generation,
                    took_ms = took.as_millis(),
                    rested_ms = rested.as_millis(),
                    closed,
                    "applied a push from istiod"
                );
                if took > SLOW_APPLY {
                    tracing::warn!(istiod = %address, ?took,
                        "a push from istiod took long to apply: the data path keeps the CPUs busy (see --xds-priority)");
                }
                if let Some(wanted) = local_identities {
                    self.prefetch(wanted);
                }
            }
        }
    }

    /// A node proxy (shared mode with a node name) fetches the certificates of the workloads on its
    /// node as soon as istiod names them, and stops keeping those of workloads that left. A proxy
    /// without a node name serves every node: it fetches on first use only.
    fn prefetch(&mut self, wanted: BTreeSet<SpiffeId>) {
        for id in wanted.difference(&self.prefetched) {
            self.manager.warm_up(id);
        }
        for id in self.prefetched.difference(&wanted) {
            tracing::info!(identity = %id, "no workload of this node has the identity any more: its certificate is released");
            self.manager.forget(id);
        }
        self.prefetched = wanted;
    }
}

/// How long the last push took to apply (for `/config_dump`); written and read on the control thread.
#[derive(Debug, Clone, Default)]
struct ApplyStats(Arc<std::sync::Mutex<Option<(SystemTime, Duration, Duration)>>>);

impl ApplyStats {
    /// The last push: when it was published, how long it took, how long of that it rested.
    fn record(&self, took: Duration, rested: Duration) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((SystemTime::now(), took, rested));
    }

    fn last(&self) -> Option<(SystemTime, Duration, Duration)> {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs `task` on a thread named `name` with a current-thread tokio runtime of its own, at
/// `priority`, until `task` ends or `stop` is dropped or fires.
fn spawn_thread<F>(
    name: &str,
    priority: XdsPriority,
    stop: oneshot::Receiver<()>,
    task: impl FnOnce() -> F + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: Future<Output = ()>,
{
    std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        if priority == XdsPriority::Idle
            && let Err(error) = set_idle_priority()
        {
            tracing::warn!(%error, "applying istiod's pushes competes with the data path");
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .on_thread_park(super::thread_cache::on_park)
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(%error, "cannot start the xDS thread's runtime: istiod's pushes are not applied");
                return;
            }
        };
        runtime.block_on(async move {
            tokio::select! {
                () = task() => {}
                _ = stop => {}
                // The thread gives back its allocator cache once a push is applied.
                () = super::thread_cache::keep_released(crate::rt::tokio::TokioTimer) => {}
            }
        });
    })
}

/// Puts the calling thread in Linux's `SCHED_IDLE` policy: it runs only on CPU time no other thread
/// wants, and a thread of another policy that wakes up preempts it at once. The error says why not.
pub fn set_idle_priority() -> Result<(), String> {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    // For SCHED_IDLE the nice value has no influence; the lowest is asked for.
    thread_priority::set_thread_priority_and_policy(thread_priority::thread_native_id(), ThreadPriority::Min, policy)
        .map_err(|error| format!("cannot put the thread at SCHED_IDLE: {error:?}"))
}

/// istiod's xDS stream, running on a thread of its own: the client (TLS, HTTP/2, decoding), the
/// store of istiod's resources, the conversion and the state build of each push, the publication,
/// and the freeing of replaced states. At [`XdsPriority::Idle`] (the default) that thread is in
/// Linux's `SCHED_IDLE` policy: a push of a large mesh costs tens of milliseconds of CPU, which on
/// the control thread or at the default policy would hold a CPU a data-path thread waits for (the
/// scheduler lets a waking thread preempt a running one of the same policy only after that one's
/// time slice); at `SCHED_IDLE` a waking data-path thread preempts it at once. What follows a push
/// (re-checking connections, certificates, log lines) runs on the control thread.
#[derive(Debug)]
pub struct Xds {
    status: AdsStatus,
    /// Firing or dropping it stops the xDS thread.
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    follower: JoinHandle<()>,
    stats: ApplyStats,
    priority: XdsPriority,
    cpu_share: f64,
}

impl Xds {
    /// Starts the xDS client of `config` (which has `XDS_ADDRESS`) on its thread, and what follows
    /// each push on the current tokio runtime (the control thread's); what it receives is
    /// published to `published`.
    pub(crate) fn start(
        config: &Config,
        plane: &ControlPlane,
        published: Published,
        registries: &[ConnectionRegistry],
        manager: Manager,
    ) -> Result<Xds, StartError> {
        let channel = channel(config, plane)?;
        let node = node(config)?;
        tracing::info!(istiod = %plane.address, node = %node.id, "subscribing to istiod's workloads and policies (delta xDS)");
        let mut client = AdsClient::new(channel, node, TokioTimer);
        let status = client.status();
        let stats = ApplyStats::default();
        let (events, mut received) = mpsc::unbounded_channel();
        let mut handler = Handler {
            store: XdsConfig::new(),
            state: Arc::default(),
            policies: Arc::default(),
            published: published.clone(),
            proxy: config.local_proxy(),
            retired: Retired::default(),
            served: false,
            cpu_share: config.xds_cpu_share.get(),
            events,
        };
        let retired = handler.retired.clone();
        let cpu_share = config.xds_cpu_share.get();
        let (stop, stopped) = oneshot::channel();
        spawn_thread(XDS_THREAD, config.xds_priority, stopped, move || async move {
            let mut sweep = tokio::time::interval(RETIRED_SWEEP);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let run = client.run(&mut handler);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    _ = &mut run => return,
                    _ = sweep.tick() => {
                        pace::paced(cpu_share, || retired.sweep());
                    }
                }
            }
        })
        .map_err(|error| StartError::Istiod {
            address: plane.address.clone(),
            reason: format!("cannot start the xDS thread: {error}"),
        })?;
        let mut follower = Follower {
            address: plane.address.clone(),
            published,
            registries: registries.to_vec(),
            manager,
            prefetched: BTreeSet::new(),
            stats: stats.clone(),
        };
        let follower = tokio::spawn(async move {
            while let Some(event) = received.recv().await {
                follower.on(event);
            }
        });
        Ok(Xds {
            status,
            stop: std::sync::Mutex::new(Some(stop)),
            follower,
            stats,
            priority: config.xds_priority,
            cpu_share: config.xds_cpu_share.get(),
        })
    }

    /// The stream's status (readiness, metrics, `/config_dump`).
    pub fn status(&self) -> &AdsStatus {
        &self.status
    }

    /// How pushes are applied (for `/config_dump`).
    pub(crate) fn apply_view(&self) -> ApplyView {
        ApplyView {
            stats: self.stats.clone(),
            priority: self.priority,
            cpu_share: self.cpu_share,
        }
    }

    /// Stops the client.
    pub fn stop(&self) {
        let stop = self
            .stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        self.follower.abort();
    }
}

impl Drop for Xds {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why the proxy is not ready while the xDS stream has not ACKed a first push of every type.
pub(crate) fn not_ready(status: &AdsStatus) -> Option<String> {
    let snapshot = status.snapshot();
    if snapshot.ready() {
        return None;
    }
    let waiting: Vec<&str> = snapshot
        .types
        .iter()
        .filter(|(_, t)| !t.acked)
        .map(|(name, _)| name.rsplit('.').next().unwrap_or(name))
        .collect();
    Some(format!(
        "istiod at {}: no accepted push yet of {} ({})",
        snapshot.address,
        waiting.join(", "),
        snapshot
            .last_error
            .as_deref()
            .unwrap_or(if snapshot.connected { "connected" } else { "connecting" })
    ))
}

/// How istiod's pushes are applied: the [`Applier`]'s priority and its last push.
#[derive(Debug, Clone)]
pub(crate) struct ApplyView {
    stats: ApplyStats,
    priority: XdsPriority,
    cpu_share: f64,
}

impl ApplyView {
    fn to_json(&self) -> Value {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        json!({
            "thread": XDS_THREAD,
            "priority": self.priority.as_str(),
            "cpuShare": self.cpu_share,
            "lastPublished": self.stats.last().map(|(at, took, rested)| json!({
                "at": rfc3339(at),
                "tookMs": ms(took),
                "restedMs": ms(rested),
            })),
        })
    }
}

/// The `istio` section of `/config_dump`.
pub(crate) fn dump(status: AdsStatus, apply: Option<ApplyView>, ca: Option<String>) -> IstioDump {
    Arc::new(move || {
        let s = status.snapshot();
        let types: serde_json::Map<String, Value> = s
            .types
            .iter()
            .map(|(type_url, t)| {
                (
                    type_url.clone(),
                    json!({
                        "acked": t.acked,
                        "resources": t.resources,
                        "lastAck": t.last_ack_at.map(rfc3339),
                        "lastAckNonce": t.last_ack_nonce,
                        "lastNack": t.last_nack_at.map(rfc3339),
                        "lastNackNonce": t.last_nack_nonce,
                        "lastNackMessage": t.last_nack,
                    }),
                )
            })
            .collect();
        let terminations: serde_json::Map<String, Value> = s
            .terminations
            .iter()
            .map(|(reason, count)| (reason.as_str().to_owned(), json!(count)))
            .collect();
        json!({
            "xds": {
                "address": s.address,
                "connected": s.connected,
                "ready": s.ready(),
                "types": types,
                "terminations": terminations,
                "consecutiveFailures": s.consecutive_failures,
                "lastError": s.last_error,
                "backoffMs": s.backoff.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                "apply": apply.as_ref().map(ApplyView::to_json),
            },
            "ca": ca.as_ref().map(|address| json!({ "address": address })),
        })
    })
}

/// `istio_xds_connection_terminations_total{reason}`, as ztunnel counts them, read from `status` at
/// each scrape.
pub(crate) fn metrics(status: AdsStatus) -> (Arc<Registry>, Arc<dyn Fn() + Send + Sync>) {
    let family: Family<Vec<(&'static str, &'static str)>, Counter> = Family::default();
    let mut registry = Registry::default();
    registry.register(
        "istio_xds_connection_terminations",
        "The total number of completed connections to xds server (unstable)",
        family.clone(),
    );
    let refresh = move || {
        let snapshot = status.snapshot();
        for reason in TerminationReason::ALL {
            family
                .get_or_create(&vec![("reason", reason.as_str())])
                .inner()
                .store(snapshot.terminations(reason), std::sync::atomic::Ordering::Relaxed);
        }
    };
    refresh();
    (Arc::new(registry), Arc::new(refresh))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_snapshot_is_freed_by_the_sweep_once_no_connection_reads_it() {
        let retired = Retired::default();
        let read_by_a_connection = Arc::new(Snapshot::empty());
        let weak = Arc::downgrade(&read_by_a_connection);
        retired.retire(Arc::clone(&read_by_a_connection), true);
        retired.sweep();
        assert!(weak.upgrade().is_some(), "still read: kept");
        // The connection ends: its reference goes, the snapshot is not freed there...
        drop(read_by_a_connection);
        assert!(weak.upgrade().is_some(), "the list still holds it");
        // ...but by the sweep.
        retired.sweep();
        assert!(weak.upgrade().is_none());
    }

    fn policy_of_thread(name: &str) -> Option<u32> {
        meshwire_testkit::measure::thread_policy(std::process::id(), name)
    }

    #[test]
    fn the_xds_thread_runs_at_sched_idle_or_at_the_default_policy_when_asked_and_stops_when_told() {
        use meshwire_testkit::measure::{SCHED_IDLE, SCHED_OTHER};
        let name = "xds-policy-test";
        for (priority, policy) in [(XdsPriority::Idle, SCHED_IDLE), (XdsPriority::Normal, SCHED_OTHER)] {
            let (stop, stopped) = oneshot::channel();
            let (seen, saw) = std::sync::mpsc::channel();
            let thread = spawn_thread(name, priority, stopped, move || async move {
                // What the thread runs sees its own policy, on its own runtime.
                let _ = seen.send((
                    policy_of_thread(name),
                    tokio::runtime::Handle::current().runtime_flavor(),
                ));
                std::future::pending::<()>().await;
            })
            .unwrap();
            let (seen, flavor) = saw.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(seen, Some(policy), "{priority:?}");
            assert_eq!(flavor, tokio::runtime::RuntimeFlavor::CurrentThread);
            assert!(!thread.is_finished(), "runs until told to stop");
            stop.send(()).unwrap();
            thread.join().unwrap();
            // The joined thread leaves /proc a moment after its exit woke the join.
            let deadline = Instant::now() + Duration::from_secs(10);
            while policy_of_thread(name).is_some() {
                assert!(Instant::now() < deadline, "the thread is still listed");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
