//! The proxy as a member of an Istio mesh: istiod's delta xDS stream as the source of workloads,
//! services and policies, and the Istio CA as the source of certificates. Both run on the control
//! plane's tokio runtime, in both binaries.
//!
//! Each push istiod sends goes through [`XdsConfig`] (decode, convert, keep by name) into the same
//! [`LocalConfig`] the local file gives, and from there into the same published [`Snapshot`]: one
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
use std::time::SystemTime;

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
use tokio::task::JoinHandle;

use super::plane::{Manager, StartError};
use crate::admin::{IstioDump, rfc3339};
use crate::config::{self, AuthToken, Config, ControlPlane, ProxyMode, Roots};
use crate::istio::XdsConfig;
use crate::rt::tokio::TokioTimer;
use crate::state::LocalProxy;
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

/// What the xDS stream feeds: the store of istiod's resources, and what a new state is published to.
struct Handler {
    store: XdsConfig,
    published: Published,
    registries: Vec<ConnectionRegistry>,
    manager: Manager,
    proxy: LocalProxy,
    address: String,
    /// The identities whose certificates were fetched ahead of need (a node proxy's workloads).
    prefetched: BTreeSet<SpiffeId>,
    retired: Retired,
    /// A state from istiod was published.
    served: bool,
}

/// Replaced snapshots, kept until no connection reads them any more and then freed here, on the
/// control thread. A snapshot of a large mesh takes milliseconds to free; without this, the data-path
/// thread that happens to drop the last reference would pay for it in the middle of a connection.
#[derive(Clone, Default)]
struct Retired(Arc<std::sync::Mutex<Vec<Arc<Snapshot>>>>);

impl Retired {
    fn retire(&self, snapshot: Arc<Snapshot>) {
        let mut retired = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        retired.push(snapshot);
        Self::sweep_locked(&mut retired);
    }

    /// Frees the snapshots only this list still holds.
    fn sweep(&self) {
        let mut retired = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::sweep_locked(&mut retired);
    }

    fn sweep_locked(retired: &mut Vec<Arc<Snapshot>>) {
        retired.retain(|snapshot| Arc::strong_count(snapshot) > 1);
    }
}

/// How often replaced snapshots still read by connections are looked at again.
const RETIRED_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

impl Handler {
    /// A node proxy (shared mode with a node name) fetches the certificates of the workloads on its
    /// node as soon as istiod names them, and stops keeping those of workloads that left. A proxy
    /// without a node name serves every node: it fetches on first use only.
    fn prefetch(&mut self, state: &crate::state::State) {
        if self.proxy.node.is_none() {
            return;
        }
        let wanted: BTreeSet<SpiffeId> = state
            .local_identities(&self.proxy)
            .into_iter()
            .map(SpiffeId::from)
            .collect();
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

impl XdsHandler for Handler {
    fn apply(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> Vec<Rejected> {
        let (changed, gone) = (resources.len(), removed.len());
        let rejected = self.store.apply(type_url, resources, removed);
        for r in &rejected {
            tracing::warn!(istiod = %self.address, %type_url, resource = %r.name, reason = %r.reason, "rejected a resource istiod sent");
        }
        let complete = [crate::istio::ADDRESS_TYPE_URL, crate::istio::AUTHORIZATION_TYPE_URL]
            .iter()
            .all(|t| self.store.received(t));
        if complete && self.served && changed == 0 && gone == 0 {
            // Nothing changed (a resumed stream that holds every version): the state stays as it is,
            // no rebuild, no new generation.
            tracing::debug!(istiod = %self.address, %type_url, "a push without changes");
        } else if complete {
            self.served = true;
            let previous = self.published.load();
            let snapshot = self
                .published
                .publish(self.store.to_local_config(), None, SystemTime::now());
            self.retired.retire(previous);
            let closed: usize = self.registries.iter().map(|r| r.reevaluate(&snapshot)).sum();
            tracing::info!(
                istiod = %self.address,
                %type_url,
                changed,
                removed = gone,
                rejected = rejected.len(),
                generation = snapshot.generation,
                closed,
                "applied a push from istiod"
            );
            self.prefetch(&snapshot.state);
        } else {
            tracing::info!(istiod = %self.address, %type_url, changed, "first push of one type; waiting for the other before serving");
        }
        rejected.into_iter().map(|r| Rejected::new(r.name, r.reason)).collect()
    }
}

/// istiod's xDS stream, running.
#[derive(Debug)]
pub struct Xds {
    status: AdsStatus,
    task: JoinHandle<()>,
}

impl Xds {
    /// Starts the xDS client of `config` (which has `XDS_ADDRESS`) on the current tokio runtime;
    /// what it receives is published to `published`.
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
        let mut handler = Handler {
            store: XdsConfig::new(),
            published,
            registries: registries.to_vec(),
            manager,
            proxy: config.local_proxy(),
            address: plane.address.clone(),
            prefetched: BTreeSet::new(),
            retired: Retired::default(),
            served: false,
        };
        let retired = handler.retired.clone();
        let task = tokio::spawn(async move {
            let mut sweep = tokio::time::interval(RETIRED_SWEEP);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let run = client.run(&mut handler);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    _ = &mut run => return,
                    _ = sweep.tick() => retired.sweep(),
                }
            }
        });
        Ok(Xds { status, task })
    }

    /// The stream's status (readiness, metrics, `/config_dump`).
    pub fn status(&self) -> &AdsStatus {
        &self.status
    }

    /// Stops the client.
    pub fn stop(&self) {
        self.task.abort();
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

/// The `istio` section of `/config_dump`.
pub(crate) fn dump(status: AdsStatus, ca: Option<String>) -> IstioDump {
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
mod tests {
    use super::*;

    #[test]
    fn a_retired_snapshot_is_freed_by_the_sweep_once_no_connection_reads_it() {
        let retired = Retired::default();
        let read_by_a_connection = Arc::new(Snapshot::empty());
        let weak = Arc::downgrade(&read_by_a_connection);
        retired.retire(Arc::clone(&read_by_a_connection));
        retired.sweep();
        assert!(weak.upgrade().is_some(), "still read: kept");
        // The connection ends: its reference goes, the snapshot is not freed there...
        drop(read_by_a_connection);
        assert!(weak.upgrade().is_some(), "the list still holds it");
        // ...but by the sweep.
        retired.sweep();
        assert!(weak.upgrade().is_none());
    }
}
