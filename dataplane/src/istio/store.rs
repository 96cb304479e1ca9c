//! [`XdsConfig`]: what istiod sent over delta xDS, resource by resource, and the [`LocalConfig`] it
//! amounts to.
//!
//! # Rules
//!
//! - Resources are stored by name: a workload by its uid, a service by `<namespace>/<hostname>`, a
//!   policy by `<namespace>/<name>`. A resource whose name is not the one its content gives is
//!   rejected (so a resource can never take the place of another one).
//! - A push applies its removals first, then its resources in order (a name sent twice: the last one).
//!   Every resource that fails to decode (wrong `Any` type, bad bytes) or to convert is rejected and
//!   named in the returned [`Rejected`] list; the others apply (a partial NACK).
//! - A rejected workload or service leaves its previous version, if any, in place.
//! - A rejected policy leaves its previous accepted version in force. When there is none, a
//!   fail-closed placeholder takes its name (see below).
//! - Shared addresses: two workloads claiming one IP in one network, or two services one VIP, are
//!   not rejected (the local-file validator rejects them; istiod sends them, for example a pod and a
//!   WorkloadEntry with the same IP). They are resolved as ztunnel's `WorkloadStore` resolves them
//!   (`WorkloadByAddr::get`): a pod (uid containing `//Pod/`) before anything else, then an HBONE
//!   workload before a TCP one, then the workload updated last; for services, the one updated last
//!   (ztunnel's `by_vip` keeps the last insert). [`XdsConfig::to_local_config`] gives the address to
//!   the winner only: the losers keep everything else (uid, identity, services, other addresses). So
//!   the configuration has each address once, as the local file must. Host-networked workloads are
//!   never indexed by IP and keep theirs. An address listed twice by one resource is kept once.
//!
//! # Fail-closed placeholders
//!
//! A policy that cannot be understood (bytes that do not decode, an unknown action or scope, an
//! extension, a bad address, a name that does not match its content) must never weaken
//! authorization. With no previous accepted version to keep, the store installs a placeholder that
//! denies at least what the policy could have denied:
//!
//! - a DENY policy, or one whose action is unknown or unreadable: a DENY placeholder whose one rule
//!   has no clauses, so it matches every connection;
//! - an ALLOW policy: an ALLOW placeholder with no rules, which matches nothing. Where an ALLOW policy
//!   applies, traffic no ALLOW matches is denied; the placeholder keeps that "some ALLOW exists"
//!   effect without allowing anything: what the policy would have denied stays denied, and what it
//!   would have allowed is denied too unless another ALLOW policy allows it;
//! - the scope is the policy's when known; an unknown or unreadable scope is `Global` (the widest);
//! - `dry_run` is kept when the policy decoded (a dry-run policy is never enforced, so neither is its
//!   placeholder); a policy that did not decode is enforced;
//! - the key: a placeholder for resource `<ns>/<name>` whose content (if any decoded) has that
//!   namespace and name is keyed `<ns>/<name>`, so that workloads selecting the policy select the
//!   placeholder. Any other placeholder (a name that does not match the content, or is not
//!   `<ns>/<name>`) is keyed `<ns>//<resource name>`: accepted policy names never contain `/`, so it
//!   can never take the key of another enforced policy. No workload selects such a key, so its
//!   `WorkloadSelector` scope is widened to `Namespace`; its namespace is the content's, else the
//!   resource name's first segment, else (none known) its scope is `Global`.
//!
//! Removing the name (or a valid version of it) removes the placeholder.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use meshwire_control::proto::envoy::service::discovery::v3::Resource;
use meshwire_control::proto::istio::security as ps;
use meshwire_control::proto::istio::workload as pw;
use prost::Message;

use super::convert;
use crate::pace;
use crate::rbac::{Authorization, RbacAction, RbacScope};
use crate::state::Delta;
use crate::xds::{LocalConfig, NamespacedHostname, NetworkMode, Protocol, Service, Workload};

/// The type URL of workload and service resources (`istio.workload.Address`).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// The type URL of policy resources (`istio.security.Authorization`).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// A resource of a push that was not applied: its name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The resource name.
    pub name: String,
    /// Why, such as `addresses[1]: 5 bytes is not an IPv4 or IPv6 address`.
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// The message of a NACK's `error_detail`: `<name>: <reason>; ...`, or `None` when nothing was
/// rejected (an ACK).
pub fn nack_message(rejected: &[Rejected]) -> Option<String> {
    if rejected.is_empty() {
        return None;
    }
    Some(rejected.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
}

#[derive(Debug, Clone)]
enum Address {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

#[derive(Debug, Clone)]
struct StoredAddress {
    /// The resource name, shared by its address claims.
    name: Arc<str>,
    address: Address,
    /// When it was last applied: the order that breaks ties between shared addresses.
    seq: u64,
    version: String,
}

#[derive(Debug, Clone)]
enum StoredPolicy {
    Accepted { policy: Authorization, version: String },
    Placeholder { policy: Authorization, reason: String },
}

impl StoredPolicy {
    fn policy(&self) -> &Authorization {
        match self {
            StoredPolicy::Accepted { policy, .. } | StoredPolicy::Placeholder { policy, .. } => policy,
        }
    }
}

/// The state of what istiod sent: workloads and services (`istio.workload.Address`) and policies
/// (`istio.security.Authorization`), by resource name. See the [module documentation](self) for the
/// rules.
///
/// ```
/// use meshwire_control::proto::envoy::service::discovery::v3::Resource;
/// use meshwire_control::proto::istio::workload::{Address, Workload, address};
/// use meshwire_dataplane::istio::store::{ADDRESS_TYPE_URL, XdsConfig};
/// use prost::Message;
///
/// let workload = Workload {
///     uid: "Kubernetes//Pod/ns/a".into(),
///     name: "a".into(),
///     namespace: "ns".into(),
///     addresses: vec![vec![10, 0, 0, 1]],
///     ..Default::default()
/// };
/// let address = Address { r#type: Some(address::Type::Workload(workload)) };
/// let resource = Resource {
///     name: "Kubernetes//Pod/ns/a".into(),
///     resource: Some(prost_types::Any {
///         type_url: ADDRESS_TYPE_URL.into(),
///         value: address.encode_to_vec(),
///     }),
///     ..Default::default()
/// };
/// let mut config = XdsConfig::new();
/// assert!(config.apply(ADDRESS_TYPE_URL, vec![resource], vec![]).is_empty());
/// assert!(config.received(ADDRESS_TYPE_URL));
/// assert_eq!(config.to_local_config().workloads[0].name, "a");
/// ```
#[derive(Debug, Clone, Default)]
pub struct XdsConfig {
    addresses: BTreeMap<String, StoredAddress>,
    policies: BTreeMap<String, StoredPolicy>,
    seq: u64,
    address_received: bool,
    authorization_received: bool,
    /// Workload addresses: network -> IP -> the workloads claiming it, ranked as ztunnel ranks
    /// them (the last holds it).
    ip_claims: Claims,
    /// Service VIPs: network -> VIP -> the services claiming it, by when they were applied.
    vip_claims: Claims,
    /// What changed since the last [`XdsConfig::take_delta`]: workload uids and service keys whose
    /// version in force (after address resolution) may differ.
    changed_workloads: BTreeSet<String>,
    changed_services: BTreeMap<String, NamespacedHostname>,
    policies_changed: bool,
}

/// network -> address -> its claimants in ascending rank: the last holds the address. Nearly every
/// address has one claimant.
type Claims = HashMap<String, HashMap<IpAddr, Vec<Claim>>>;

/// A claim on an address. Workloads rank a pod first, then an HBONE workload, then the one applied
/// last; services, the one applied last. Sequence numbers are unique, so ranks never tie.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    rank: (bool, bool, u64),
    name: Arc<str>,
}

/// A policy name as a valid key `<namespace>/<name>`: both parts non-empty, neither with a `/`.
fn policy_key_parts(name: &str) -> Option<(&str, &str)> {
    let (namespace, policy) = name.split_once('/')?;
    (!namespace.is_empty() && !policy.is_empty() && !policy.contains('/')).then_some((namespace, policy))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.contains('/')
}

/// Decodes the `Any` of a resource, checking its type.
fn decode<M: Message + Default>(resource: &Resource, type_url: &str) -> Result<M, String> {
    let any = resource
        .resource
        .as_ref()
        .ok_or_else(|| "the resource has no payload".to_owned())?;
    if any.type_url != type_url {
        return Err(format!("payload of type {:?}, expected {type_url:?}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|err| format!("cannot decode the payload: {err}"))
}

impl XdsConfig {
    /// An empty configuration: nothing received yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one delta push of `type_url`: drops the `removed` names, then decodes, converts and
    /// stores each resource by its name. Returns the resources that were not applied (empty: an
    /// ACK). A push of a type the proxy does not know rejects each of its resources and changes
    /// nothing.
    pub fn apply(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> Vec<Rejected> {
        match type_url {
            ADDRESS_TYPE_URL => {
                self.address_received = true;
                for name in &removed {
                    self.replace_address(name, None);
                    pace::point();
                }
                resources
                    .into_iter()
                    .filter_map(|resource| {
                        pace::point();
                        self.apply_address(resource).err()
                    })
                    .collect()
            }
            AUTHORIZATION_TYPE_URL => {
                self.authorization_received = true;
                self.policies_changed = true;
                for name in &removed {
                    self.policies.remove(name);
                }
                resources
                    .into_iter()
                    .filter_map(|resource| {
                        pace::point();
                        self.apply_policy(resource).err()
                    })
                    .collect()
            }
            other => resources
                .into_iter()
                .map(|resource| Rejected {
                    name: resource.name,
                    reason: format!("type {other:?} is not supported"),
                })
                .collect(),
        }
    }

    fn apply_address(&mut self, resource: Resource) -> Result<(), Rejected> {
        let reject = |reason: String| Rejected {
            name: resource.name.clone(),
            reason,
        };
        let proto: pw::Address = decode(&resource, ADDRESS_TYPE_URL).map_err(reject)?;
        let (address, key) = match &proto.r#type {
            Some(pw::address::Type::Workload(w)) => {
                let workload = convert::workload(w).map_err(|e| reject(e.detail()))?;
                let key = workload.uid.clone();
                (Address::Workload(Arc::new(workload)), key)
            }
            Some(pw::address::Type::Service(s)) => {
                let service = convert::service(s).map_err(|e| reject(e.detail()))?;
                let key = service.key().to_string();
                (Address::Service(Arc::new(service)), key)
            }
            None => return Err(reject("the address is neither a workload nor a service".to_owned())),
        };
        if key != resource.name {
            let what = match address {
                Address::Workload(_) => "workload uid",
                Address::Service(_) => "service <namespace>/<hostname>",
            };
            return Err(reject(format!("the resource name does not match the {what} {key:?}")));
        }
        self.seq += 1;
        let stored = StoredAddress {
            name: Arc::from(resource.name.as_str()),
            address,
            seq: self.seq,
            version: resource.version,
        };
        self.replace_address(&resource.name, Some(stored));
        Ok(())
    }

    /// Puts `stored` under `name` (or removes the name), keeping the address claims and the record
    /// of what changed: the name itself, and every workload or service that held one of the
    /// addresses the old or new version claims and lost it, or gained it.
    fn replace_address(&mut self, name: &str, stored: Option<StoredAddress>) {
        let old = match stored {
            Some(stored) => {
                self.mark(name, &stored.address);
                self.addresses.insert(name.to_owned(), stored)
            }
            None => self.addresses.remove(name),
        };
        // The new claims first, then the old ones withdrawn: an address the name keeps never loses
        // its entry in between.
        let mut moved: Vec<Arc<str>> = Vec::new();
        if let Some(new) = self.addresses.get(name).cloned() {
            self.claim(&new, true, &mut moved);
        }
        if let Some(old) = &old {
            self.mark(name, &old.address);
            self.claim(old, false, &mut moved);
        }
        for holder in moved {
            if &*holder != name
                && let Some(stored) = self.addresses.get(&*holder)
            {
                let address = stored.address.clone();
                self.mark(&holder, &address);
            }
        }
    }

    /// Adds (or withdraws) the claims of `stored`; pushes to `moved` the names that held or now hold
    /// an address whose holder changed.
    fn claim(&mut self, stored: &StoredAddress, add: bool, moved: &mut Vec<Arc<str>>) {
        let (claims, rank, addresses): (&mut Claims, _, Vec<(&str, IpAddr)>) = match &stored.address {
            Address::Workload(w) if w.network_mode != NetworkMode::HostNetwork => (
                &mut self.ip_claims,
                (w.uid.contains("//Pod/"), w.protocol == Protocol::Hbone, stored.seq),
                w.workload_ips.iter().map(|ip| (w.network.as_str(), *ip)).collect(),
            ),
            Address::Workload(_) => return,
            Address::Service(s) => (
                &mut self.vip_claims,
                (false, false, stored.seq),
                s.vips.iter().map(|vip| (vip.network.as_str(), vip.address)).collect(),
            ),
        };
        let claim = Claim {
            rank,
            name: Arc::clone(&stored.name),
        };
        for (network, ip) in addresses {
            let by_ip = match claims.get_mut(network) {
                Some(by_ip) => by_ip,
                None => claims.entry(network.to_owned()).or_default(),
            };
            let claimants = by_ip.entry(ip).or_default();
            let before = claimants.last().map(|c| Arc::clone(&c.name));
            match (add, claimants.binary_search(&claim)) {
                (true, Err(at)) => claimants.insert(at, claim.clone()),
                (false, Ok(at)) => {
                    claimants.remove(at);
                }
                _ => {}
            }
            let after = claimants.last().map(|c| Arc::clone(&c.name));
            if claimants.is_empty() {
                by_ip.remove(&ip);
                if by_ip.is_empty() {
                    claims.remove(network);
                }
            }
            if before != after {
                moved.extend(before);
                moved.extend(after);
            }
        }
    }

    /// Records that `name`, of the kind of `address`, changed.
    fn mark(&mut self, name: &str, address: &Address) {
        match address {
            Address::Workload(_) => {
                self.changed_workloads.insert(name.to_owned());
            }
            Address::Service(s) => {
                self.changed_services.insert(name.to_owned(), s.key());
            }
        }
    }

    /// Whether `name` holds the address `(network, ip)` of a workload.
    fn holds_ip(&self, name: &str, network: &str, ip: IpAddr) -> bool {
        holder(&self.ip_claims, network, ip).is_some_and(|holder| holder == name)
    }

    fn holds_vip(&self, name: &str, network: &str, ip: IpAddr) -> bool {
        holder(&self.vip_claims, network, ip).is_some_and(|holder| holder == name)
    }

    /// The version in force of the workload stored as `name`: without the addresses another
    /// workload holds, and each address once. The stored workload itself when nothing is taken out.
    fn effective_workload(&self, name: &str, w: &Arc<Workload>) -> Arc<Workload> {
        let host = w.network_mode == NetworkMode::HostNetwork;
        match kept(&w.workload_ips, |ip| host || self.holds_ip(name, &w.network, *ip)) {
            None => Arc::clone(w),
            Some(workload_ips) => {
                let mut workload = Workload::clone(w);
                workload.workload_ips = workload_ips;
                Arc::new(workload)
            }
        }
    }

    /// The version in force of the service stored as `name`: without the VIPs another service
    /// holds, and each VIP once.
    fn effective_service(&self, name: &str, s: &Arc<Service>) -> Arc<Service> {
        match kept(&s.vips, |vip| self.holds_vip(name, &vip.network, vip.address)) {
            None => Arc::clone(s),
            Some(vips) => {
                let mut service = Service::clone(s);
                service.vips = vips;
                Arc::new(service)
            }
        }
    }

    /// What changed since the last call (since the store was made, for the first): the workloads
    /// and services to put or remove, and all the policies when any changed. Applied with
    /// [`State::update`](crate::state::State::update) to the state of the previous call, it gives the
    /// state of [`XdsConfig::to_local_config`].
    ///
    /// When at least a quarter of the workloads and services changed (a first push, or a push that
    /// touches every workload), the delta is [whole](Delta::whole): it names everything, and the
    /// next state is built from it rather than patched, which costs less then.
    pub fn take_delta(&mut self) -> Delta {
        let changed = self.changed_workloads.len() + self.changed_services.len();
        if changed * 4 >= self.addresses.len() && changed > 0 {
            return self.take_whole_delta();
        }
        let mut delta = Delta::new();
        for name in std::mem::take(&mut self.changed_workloads) {
            pace::point();
            match self.addresses.get(&name).map(|s| &s.address) {
                Some(Address::Workload(w)) => delta.put_workload(self.effective_workload(&name, w)),
                _ => delta.remove_workload(name),
            }
        }
        for (name, key) in std::mem::take(&mut self.changed_services) {
            pace::point();
            match self.addresses.get(&name).map(|s| &s.address) {
                Some(Address::Service(s)) => delta.put_service(self.effective_service(&name, s)),
                _ => delta.remove_service(key),
            }
        }
        if std::mem::take(&mut self.policies_changed) {
            delta.set_policies(self.policies.values().map(|p| p.policy().clone()).collect());
        }
        delta
    }

    fn take_whole_delta(&mut self) -> Delta {
        self.changed_workloads.clear();
        self.changed_services.clear();
        let mut delta = Delta::whole();
        for (name, stored) in &self.addresses {
            pace::point();
            match &stored.address {
                Address::Workload(w) => delta.put_workload(self.effective_workload(name, w)),
                Address::Service(s) => delta.put_service(self.effective_service(name, s)),
            }
        }
        if std::mem::take(&mut self.policies_changed) {
            delta.set_policies(self.policies.values().map(|p| p.policy().clone()).collect());
        }
        delta
    }

    fn apply_policy(&mut self, resource: Resource) -> Result<(), Rejected> {
        let decoded: Result<ps::Authorization, String> = decode(&resource, AUTHORIZATION_TYPE_URL);
        let outcome = match &decoded {
            Err(reason) => Err(reason.clone()),
            Ok(proto) => convert::authorization(proto)
                .map_err(|e| e.detail())
                .and_then(|policy| {
                    let key = policy.key();
                    if key != resource.name {
                        Err(format!(
                            "the resource name does not match the policy <namespace>/<name> {key:?}"
                        ))
                    } else if policy_key_parts(&key).is_none() {
                        Err(format!(
                            "{key:?} is not <namespace>/<name> (both non-empty, without `/`)"
                        ))
                    } else {
                        Ok(policy)
                    }
                }),
        };
        match outcome {
            Ok(policy) => {
                self.policies.insert(
                    resource.name,
                    StoredPolicy::Accepted {
                        policy,
                        version: resource.version,
                    },
                );
                Ok(())
            }
            Err(reason) => {
                let keep = matches!(self.policies.get(&resource.name), Some(StoredPolicy::Accepted { .. }));
                let reason = if keep {
                    format!("{reason} (the previous version stays in force)")
                } else {
                    let placeholder = placeholder(&resource.name, decoded.as_ref().ok());
                    let what = match placeholder.action {
                        RbacAction::Allow => "an ALLOW placeholder that allows nothing",
                        _ => "a DENY placeholder that denies everything",
                    };
                    let reason = format!("{reason} ({what} is enforced in its place)");
                    self.policies.insert(
                        resource.name.clone(),
                        StoredPolicy::Placeholder {
                            policy: placeholder,
                            reason: reason.clone(),
                        },
                    );
                    reason
                };
                Err(Rejected {
                    name: resource.name,
                    reason,
                })
            }
        }
    }

    /// Whether a first push of `type_url` arrived (readiness waits for both types).
    pub fn received(&self, type_url: &str) -> bool {
        match type_url {
            ADDRESS_TYPE_URL => self.address_received,
            AUTHORIZATION_TYPE_URL => self.authorization_received,
            _ => false,
        }
    }

    /// The versions of the resources of `type_url` the store holds as accepted (for the
    /// `initial_resource_versions` of a reconnect); placeholders are left out.
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        match type_url {
            ADDRESS_TYPE_URL => self
                .addresses
                .iter()
                .map(|(name, stored)| (name.clone(), stored.version.clone()))
                .collect(),
            AUTHORIZATION_TYPE_URL => self
                .policies
                .iter()
                .filter_map(|(name, stored)| match stored {
                    StoredPolicy::Accepted { version, .. } => Some((name.clone(), version.clone())),
                    StoredPolicy::Placeholder { .. } => None,
                })
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    /// The placeholders in force: the resource name and why its policy was rejected, by name.
    pub fn placeholders(&self) -> impl Iterator<Item = (&str, &str)> {
        self.policies.iter().filter_map(|(name, stored)| match stored {
            StoredPolicy::Placeholder { reason, .. } => Some((name.as_str(), reason.as_str())),
            StoredPolicy::Accepted { .. } => None,
        })
    }

    /// The configuration in force: workloads ordered by uid, services by `<namespace>/<hostname>`,
    /// policies (placeholders included) by resource name; shared addresses resolved (see the
    /// [module documentation](self)). It has no repeated uid, workload address, service key, VIP or
    /// policy key: the configuration a local file with the same mesh gives.
    pub fn to_local_config(&self) -> LocalConfig {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for (name, stored) in &self.addresses {
            match &stored.address {
                Address::Workload(w) => workloads.push(Workload::clone(&self.effective_workload(name, w))),
                Address::Service(s) => services.push(Service::clone(&self.effective_service(name, s))),
            }
        }
        // Names are uids and service keys: already in order.
        let policies = self.policies.values().map(|p| p.policy().clone()).collect();
        LocalConfig {
            workloads,
            services,
            policies,
        }
    }
}

/// The entries of `items` that `holds` keeps, each once; `None` when that is all of them as they are
/// (the usual case, which allocates nothing). Resources list a handful of addresses: the repeat check
/// scans the ones before.
fn kept<T: PartialEq + Clone>(items: &[T], holds: impl Fn(&T) -> bool) -> Option<Vec<T>> {
    let keep = |i: usize, item: &T| !items[..i].contains(item) && holds(item);
    if items.iter().enumerate().all(|(i, item)| keep(i, item)) {
        return None;
    }
    Some(
        items
            .iter()
            .enumerate()
            .filter(|(i, item)| keep(*i, item))
            .map(|(_, item)| item.clone())
            .collect(),
    )
}

/// The name holding `(network, ip)` in `claims`.
fn holder<'a>(claims: &'a Claims, network: &str, ip: IpAddr) -> Option<&'a str> {
    claims.get(network)?.get(&ip)?.last().map(|claim| &*claim.name)
}

/// The fail-closed placeholder of the rejected policy resource `name`, whose content is `decoded`
/// when it decoded. See the [module documentation](self).
fn placeholder(name: &str, decoded: Option<&ps::Authorization>) -> Authorization {
    let parts = policy_key_parts(name);
    let matches_content = match (parts, decoded) {
        (Some(_), None) => true,
        (Some((ns, policy)), Some(d)) => d.namespace == ns && d.name == policy,
        (None, _) => false,
    };
    let mut scope = decoded
        .and_then(|d| convert::scope(d.scope))
        .unwrap_or(RbacScope::Global);
    let action = match decoded.and_then(|d| convert::action(d.action)) {
        Some(RbacAction::Allow) => RbacAction::Allow,
        _ => RbacAction::Deny,
    };
    let dry_run = decoded.is_some_and(|d| d.dry_run);
    let (namespace, policy_name) = match parts {
        Some((ns, policy)) if matches_content => (ns.to_owned(), policy.to_owned()),
        _ => {
            let namespace = decoded
                .map(|d| d.namespace.as_str())
                .filter(|ns| valid_segment(ns))
                .or_else(|| name.split('/').next().filter(|ns| valid_segment(ns)));
            if scope == RbacScope::WorkloadSelector {
                scope = RbacScope::Namespace;
            }
            if namespace.is_none() {
                scope = RbacScope::Global;
            }
            (namespace.unwrap_or_default().to_owned(), format!("/{name}"))
        }
    };
    let rules = match action {
        // No rules: matches nothing.
        RbacAction::Allow => Vec::new(),
        // One rule without clauses: matches everything.
        _ => vec![Vec::new()],
    };
    Authorization {
        name: policy_name,
        namespace,
        scope,
        action,
        rules,
        dry_run,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_keys_never_collide_with_valid_ones() {
        let undecoded = placeholder("ns/p", None);
        assert_eq!(undecoded.key(), "ns/p");
        assert_eq!(undecoded.scope, RbacScope::Global);
        assert_eq!(undecoded.action, RbacAction::Deny);

        let other = ps::Authorization {
            name: "q".into(),
            namespace: "ns".into(),
            scope: ps::Scope::WorkloadSelector as i32,
            action: ps::Action::Allow as i32,
            ..Default::default()
        };
        let mismatched = placeholder("ns/p", Some(&other));
        assert_eq!(mismatched.key(), "ns//ns/p");
        assert_eq!(mismatched.scope, RbacScope::Namespace);
        assert_eq!(mismatched.action, RbacAction::Allow);
        assert!(mismatched.rules.is_empty());

        let nameless = placeholder("", None);
        assert_eq!(nameless.key(), "//");
        assert_eq!(nameless.scope, RbacScope::Global);
    }

    #[test]
    fn nack_message_joins_the_rejections() {
        assert_eq!(nack_message(&[]), None);
        let rejected = [
            Rejected {
                name: "a".into(),
                reason: "x: bad".into(),
            },
            Rejected {
                name: "b".into(),
                reason: "y: worse".into(),
            },
        ];
        assert_eq!(nack_message(&rejected).unwrap(), "a: x: bad; b: y: worse");
    }
}
