//! An immutable snapshot of the mesh (workloads, services, policies) with the lookups and the outbound
//! routing decision, as pure functions.
//!
//! A [`State`] is built from a validated [`LocalConfig`] (or, push after push, from the previous
//! state and a [`Delta`]) and then only read: share it as `Arc<State>` (an `ArcSwap<State>` when the
//! configuration changes) so that data-path cores read it without waiting on the control plane. No
//! method does IO, reads the clock or draws random numbers; the caller passes the proxy's own
//! addresses and a number that picks among service endpoints.
//!
//! ```
//! use std::net::SocketAddr;
//! use meshwire_dataplane::state::{LocalProxy, OutboundRoute, State};
//! use meshwire_dataplane::xds::LocalConfig;
//!
//! let config = LocalConfig::parse(
//!     r#"
//! workloads:
//! - name: client
//!   workloadIps: ["127.0.0.1"]
//!   protocol: HBONE
//! - name: server
//!   serviceAccount: server
//!   workloadIps: ["127.0.0.2"]
//!   protocol: HBONE
//!   services: {"default/server.example": {80: 8080}}
//! services:
//! - hostname: server.example
//!   vips: ["/127.10.0.1"]
//!   ports: {80: 8080}
//! "#,
//! )?;
//! let state = State::new(config);
//! let client = state.workload_by_ip("", "127.0.0.1".parse()?).expect("client");
//! let dst: SocketAddr = "127.10.0.1:80".parse()?;
//! let OutboundRoute::Hbone { endpoint, authority, expected_identities, .. } =
//!     state.route_outbound(&LocalProxy::default(), client, dst, 0)
//! else {
//!     panic!("expected HBONE");
//! };
//! assert_eq!(endpoint.to_string(), "127.0.0.2:15008");
//! assert_eq!(authority.to_string(), "127.0.0.2:8080");
//! assert_eq!(expected_identities[0].to_string(), "spiffe://cluster.local/ns/default/sa/server");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Bound;
use std::sync::Arc;

use meshwire_identity::id::{IstioIdentity, SpiffeId};

use crate::pace;
use crate::rbac::Authorization;
use crate::xds::{
    DEFAULT_HBONE_PORT, GatewayAddress, GatewayDestination, HealthStatus, LocalConfig, NamespacedHostname, NetworkMode,
    Protocol, Service, Workload,
};

/// The ports a ztunnel listens on, which meshwire keeps as defaults: outbound capture 15001, inbound
/// plaintext 15006, HBONE 15008, SOCKS5 15080, DNS 15053, readiness 15021, admin 15000, metrics 15020.
pub const DEFAULT_PROXY_PORTS: [u16; 8] = [15001, 15006, 15008, 15080, 15053, 15021, 15000, 15020];

/// The proxy itself, as routing sees it: where it is and which ports are its own.
///
/// Traffic to one of its own addresses at one of its own ports would loop back into the proxy and is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalProxy {
    /// The node it serves; `None` serves every workload (a single proxy on loopback).
    pub node: Option<String>,
    /// The network it is in; `""` is the default network.
    pub network: String,
    /// Its own addresses.
    pub addresses: Vec<IpAddr>,
    /// Its own listening ports.
    pub ports: Vec<u16>,
    /// The port destination workloads receive HBONE on (15008 in ztunnel).
    pub hbone_port: u16,
}

impl Default for LocalProxy {
    fn default() -> Self {
        Self {
            node: None,
            network: String::new(),
            addresses: Vec::new(),
            ports: DEFAULT_PROXY_PORTS.to_vec(),
            hbone_port: DEFAULT_HBONE_PORT,
        }
    }
}

impl LocalProxy {
    /// A proxy with no node, no addresses of its own, the default ports and HBONE on 15008.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves only the workloads of `node`.
    pub fn with_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Sits in `network`.
    pub fn with_network(mut self, network: impl Into<String>) -> Self {
        self.network = network.into();
        self
    }

    /// Has these addresses of its own.
    pub fn with_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.addresses = addresses.into_iter().collect();
        self
    }

    /// Listens on these ports (in place of the defaults).
    pub fn with_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.ports = ports.into_iter().collect();
        self
    }

    /// Sends HBONE to destination workloads on `port`.
    pub fn with_hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    /// Whether `addr` is one of the proxy's own listeners. Addresses are compared with IPv4-mapped
    /// IPv6 addresses as IPv4, on both sides.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.ports.contains(&addr.port()) && self.addresses.iter().any(|own| own.to_canonical() == ip)
    }

    /// Whether the proxy serves workloads of `node`.
    pub fn serves_node(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|own| own == node)
    }
}

/// What to do with an outbound connection, decided before any IO.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutboundRoute {
    /// Open an HBONE tunnel (mTLS, HTTP/2 CONNECT) to the destination workload's node proxy.
    Hbone {
        /// Where to connect: the workload's IP and the HBONE port.
        endpoint: SocketAddr,
        /// The CONNECT `:authority`: the workload's IP and the target port.
        authority: SocketAddr,
        /// The identities the server may present: the workload's, then its service's extra SANs.
        expected_identities: Vec<SpiffeId>,
        /// The service the client addressed, if it addressed one.
        service: Option<NamespacedHostname>,
        /// The destination workload's uid.
        workload: String,
    },
    /// Open an HBONE tunnel to the destination's waypoint, which routes further.
    Waypoint {
        /// Where to connect: the waypoint's IP and HBONE port.
        endpoint: SocketAddr,
        /// The CONNECT `:authority`: the original destination (service VIP or workload IP, and port).
        authority: SocketAddr,
        /// The identities the waypoint may present.
        expected_identities: Vec<SpiffeId>,
        /// The service the client addressed, if it addressed one.
        service: Option<NamespacedHostname>,
        /// The waypoint workload's uid.
        waypoint: String,
    },
    /// Double HBONE (multi-network): open an HBONE tunnel to the network gateway of the
    /// destination's network, and inside it a second HBONE connection, with mTLS end to end, to the
    /// node proxy of an endpoint of the service. The gateway only splices the outer stream; it never
    /// sees inside the inner TLS.
    ///
    /// Both CONNECTs name the service, `:authority <service hostname>:<port>`, as ztunnel sends
    /// them: the gateway routes the outer stream on it to any endpoint of the service in its network
    /// (not necessarily `expected_endpoint`), and that endpoint's node proxy resolves the inner one
    /// to its own workload and target port ([`State::inbound_service_target`]).
    DoubleHbone {
        /// Where to connect: the gateway's address and HBONE (mTLS) port.
        gateway: SocketAddr,
        /// The identities the gateway may present (its workload's, then its service's extra SANs).
        gateway_identities: Vec<SpiffeId>,
        /// The endpoint chosen for the connection, `<workload ip>:<target port>`: the one the
        /// gateway is expected to reach (for logs, and the key of the inner TLS config), although it
        /// may route the stream to another endpoint of the service behind it.
        expected_endpoint: SocketAddr,
        /// The identities the destination may present: those of every healthy endpoint of the
        /// service in `network` that serves `port` through the same gateway (the gateway may route
        /// to any of them), in uid order, then the service's extra SANs, without repeats.
        expected_identities: Vec<SpiffeId>,
        /// The service the client addressed: the `:authority` of both CONNECTs is its hostname
        /// and `port`.
        service: NamespacedHostname,
        /// The service port the client addressed.
        port: u16,
        /// The uid of the chosen endpoint's workload.
        workload: String,
        /// The chosen endpoint's network.
        network: String,
    },
    /// Connect directly, in plain TCP: the destination is not in the mesh (a `TCP` workload or an
    /// address the mesh does not know).
    Passthrough {
        /// Where to connect: the original destination, or the chosen endpoint of a service.
        dst: SocketAddr,
        /// The service the client addressed, if it addressed one.
        service: Option<NamespacedHostname>,
        /// The destination workload's uid, if the mesh knows it.
        workload: Option<String>,
    },
    /// Refuse the connection.
    Refused {
        /// The original destination.
        dst: SocketAddr,
        /// Why.
        reason: Refusal,
    },
}

/// Why an outbound connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The destination, or the service endpoint or waypoint chosen for it, is one of the proxy's own
    /// listeners.
    #[error("the destination is the proxy itself")]
    Loop,
    /// The service does not declare the port.
    #[error("service {service} has no port {port}")]
    UnknownPort {
        /// The service.
        service: NamespacedHostname,
        /// The port the client addressed.
        port: u16,
    },
    /// No healthy endpoint of the service serves the port: none in the source's network, nor any
    /// in another network (with or without a network gateway).
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoEndpoint {
        /// The service.
        service: NamespacedHostname,
        /// The port the client addressed.
        port: u16,
    },
    /// No endpoint in the source's network serves the port, and those of other networks that do
    /// have no network gateway to reach them through.
    #[error(
        "service {service} port {port} is served only on network {network:?}, by endpoints without a network gateway"
    )]
    NoNetworkGateway {
        /// The service.
        service: NamespacedHostname,
        /// The port the client addressed.
        port: u16,
        /// The network of (the first of) those endpoints.
        network: String,
    },
    /// The network gateway of the chosen endpoint is not a known workload, nor a service with a
    /// VIP or endpoint the source can reach: its identity, which the outer mTLS must verify, is
    /// unknown (ztunnel refuses such a connection too).
    #[error("network gateway {gateway} is unknown or has no healthy endpoint")]
    UnknownNetworkGateway {
        /// The gateway.
        gateway: GatewayAddress,
    },
    /// The destination's waypoint is not a known workload or a service with an endpoint.
    #[error("waypoint {waypoint} is unknown or has no healthy endpoint")]
    NoWaypoint {
        /// The waypoint.
        waypoint: GatewayAddress,
    },
}

/// Where an inbound CONNECT to a service hostname goes ([`State::inbound_service_target`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ServiceTarget<'a> {
    /// The address the connection arrived on and the workload's target port.
    pub dst: SocketAddr,
    /// The workload served at that address.
    pub workload: &'a Workload,
    /// The service with the hostname the workload is an endpoint of.
    pub service: &'a Service,
}

/// Why an inbound CONNECT to a service hostname has no destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceTargetError {
    /// No workload served by this proxy has the address the connection arrived on.
    #[error("no workload served by this proxy has the IP {ip}")]
    NoWorkload {
        /// The address the connection arrived on.
        ip: IpAddr,
    },
    /// No service has the hostname.
    #[error("no service has the hostname {hostname:?}")]
    UnknownHostname {
        /// The hostname asked for.
        hostname: String,
    },
    /// The workload is not an endpoint of any service with the hostname.
    #[error("workload {workload} is not an endpoint of a service with the hostname {hostname:?}")]
    NotAnEndpoint {
        /// The hostname asked for.
        hostname: String,
        /// The workload's uid.
        workload: String,
    },
    /// Neither the workload nor the service has a (non-zero) target port for the port.
    #[error("service {service} has no target port for port {port} on workload {workload}")]
    NoTargetPort {
        /// The service.
        service: NamespacedHostname,
        /// The port asked for.
        port: u16,
        /// The workload's uid.
        workload: String,
    },
}

/// An immutable snapshot of workloads, services and policies, indexed for routing.
///
/// Its maps are persistent ([`imbl`]): [`State::update`] makes the next state from this one and a
/// [`Delta`] in time proportional to what changed (a workload in a mesh of 10,000 costs
/// microseconds, not a rebuild), and the two states share everything the change did not touch. A
/// clone is cheap.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// uid -> workload.
    workloads: imbl::OrdMap<String, Arc<Workload>>,
    /// key -> service.
    services: imbl::OrdMap<NamespacedHostname, Arc<Service>>,
    policies: Arc<Vec<Authorization>>,
    /// network -> IP -> workload (host-networked workloads are not indexed).
    workload_by_ip: imbl::HashMap<String, imbl::HashMap<IpAddr, Arc<Workload>>>,
    /// namespace -> name -> the workloads with that name, ordered by uid.
    workload_by_name: imbl::HashMap<String, imbl::HashMap<String, Members>>,
    /// network -> VIP -> service.
    service_by_vip: imbl::HashMap<String, imbl::HashMap<IpAddr, Arc<Service>>>,
    /// service key -> workloads that name it, ordered by uid.
    endpoints: imbl::HashMap<NamespacedHostname, Members>,
}

/// Workloads ordered by uid: the members of a service, or the workloads sharing a name. A sorted
/// array, rebuilt when a member changes (cheap for the sizes services have), so that routing walks a
/// slice on every connection.
type Members = Arc<[Arc<Workload>]>;

/// A change to a list of [`Members`]: the uid, and the new member (`None` removes it).
type MemberChange<'a> = (&'a str, Option<Arc<Workload>>);

/// What changed between two [`State`]s: workloads put (added or replaced, by uid) or removed,
/// services put or removed (by key), and the policies when they changed (all of them).
///
/// The resources must be consistent as a whole once applied, as a [`LocalConfig`] must be: no IP in
/// one network claimed by two workloads, no VIP by two services. A claim on an address another
/// workload (or service) keeps after the update is ignored (the address stays with its holder).
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// The delta names every workload and service of the next state: it is built from the delta
    /// alone (cheaper than patching when most of the state changes).
    whole: bool,
    workloads: Vec<(String, Option<Arc<Workload>>)>,
    services: Vec<(NamespacedHostname, Option<Arc<Service>>)>,
    policies: Option<Vec<Authorization>>,
}

impl Delta {
    /// An empty delta.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty delta that is to name every workload and service of the next state, and its
    /// policies: [`State::update`] builds the next state from it alone, dropping whatever it does
    /// not name.
    pub fn whole() -> Self {
        Self {
            whole: true,
            ..Self::default()
        }
    }

    /// Whether the delta names the whole next state.
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    /// Adds `workload`, or replaces the one with its uid.
    pub fn put_workload(&mut self, workload: Arc<Workload>) {
        self.workloads.push((workload.uid.clone(), Some(workload)));
    }

    /// Removes the workload with this uid.
    pub fn remove_workload(&mut self, uid: impl Into<String>) {
        self.workloads.push((uid.into(), None));
    }

    /// Adds `service`, or replaces the one with its key.
    pub fn put_service(&mut self, service: Arc<Service>) {
        self.services.push((service.key(), Some(service)));
    }

    /// Removes the service with this key.
    pub fn remove_service(&mut self, key: NamespacedHostname) {
        self.services.push((key, None));
    }

    /// Replaces every policy with `policies`.
    pub fn set_policies(&mut self, policies: Vec<Authorization>) {
        self.policies = Some(policies);
    }

    /// The policies, when they change.
    pub fn policies(&self) -> Option<&[Authorization]> {
        self.policies.as_deref()
    }

    /// The number of workloads and services put or removed.
    pub fn len(&self) -> usize {
        self.workloads.len() + self.services.len()
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        !self.whole && self.workloads.is_empty() && self.services.is_empty() && self.policies.is_none()
    }
}

impl From<LocalConfig> for State {
    fn from(config: LocalConfig) -> Self {
        Self::new(config)
    }
}

impl State {
    /// Indexes a configuration.
    ///
    /// [`LocalConfig::parse`] rejects duplicate IPs, VIPs, service keys and uids; should a configuration
    /// changed by hand have them anyway, the first in file order wins.
    pub fn new(config: LocalConfig) -> Self {
        let LocalConfig {
            workloads,
            services,
            policies,
            ..
        } = config;
        let mut delta = Delta::whole();
        let mut uids = std::collections::HashSet::new();
        for workload in workloads {
            if uids.insert(workload.uid.clone()) {
                delta.put_workload(Arc::new(workload));
            }
        }
        let mut keys = std::collections::HashSet::new();
        for service in services {
            if keys.insert(service.key()) {
                delta.put_service(Arc::new(service));
            }
        }
        delta.set_policies(policies);
        State::default().update(delta)
    }

    /// The state after `delta`; `self` is left as it was and shares with the result every part the
    /// delta does not change. A uid or key named several times in the delta takes its last entry. A
    /// [whole](Delta::whole) delta gives the state of its content alone (and `self`'s policies
    /// unless it sets them).
    pub fn update(&self, delta: Delta) -> State {
        let Delta {
            whole,
            workloads,
            services,
            policies,
        } = delta;
        let mut next = if whole {
            // Built afresh: nothing to unindex, and every map is mutated in place.
            State {
                policies: Arc::clone(&self.policies),
                ..State::default()
            }
        } else {
            self.clone()
        };
        if let Some(policies) = policies {
            next.policies = Arc::new(policies);
        }

        // Workloads: unindex the old version of each changed uid, then index the new ones, so that
        // an address or name that moves from one workload to another within the delta ends up with
        // its new holder whatever the order.
        // By uid, the last entry of a uid kept.
        let workloads: BTreeMap<String, Option<Arc<Workload>>> = workloads.into_iter().collect();
        // Membership changes, applied per list once all are known: key -> (uid, new member).
        let mut endpoint_changes: HashMap<NamespacedHostname, Vec<MemberChange<'_>>> = HashMap::new();
        let mut name_changes: HashMap<(String, String), Vec<MemberChange<'_>>> = HashMap::new();
        for uid in workloads.keys() {
            pace::point();
            let Some(old) = next.workloads.remove(uid) else {
                continue;
            };
            next.unindex_addresses(&old);
            for key in old.services.keys() {
                endpoint_changes.entry(key.clone()).or_default().push((uid, None));
            }
            name_changes
                .entry((old.namespace().to_owned(), old.name.clone()))
                .or_default()
                .push((uid, None));
        }
        for (uid, workload) in &workloads {
            pace::point();
            let Some(workload) = workload else { continue };
            next.workloads.insert(uid.clone(), Arc::clone(workload));
            next.index_addresses(workload);
            for key in workload.services.keys() {
                endpoint_changes
                    .entry(key.clone())
                    .or_default()
                    .push((uid, Some(Arc::clone(workload))));
            }
            name_changes
                .entry((workload.namespace().to_owned(), workload.name.clone()))
                .or_default()
                .push((uid, Some(Arc::clone(workload))));
        }
        for (key, changes) in endpoint_changes {
            pace::point();
            let members = patch_members(next.endpoints.get(&key), changes);
            match members {
                Some(members) => next.endpoints.insert(key, members),
                None => next.endpoints.remove(&key),
            };
        }
        for ((namespace, name), changes) in name_changes {
            pace::point();
            let names = next.workload_by_name.entry(namespace.clone()).or_default();
            match patch_members(names.get(&name), changes) {
                Some(members) => names.insert(name, members),
                None => names.remove(&name),
            };
            if names.is_empty() {
                next.workload_by_name.remove(&namespace);
            }
        }

        // Services, the same way.
        let services: BTreeMap<NamespacedHostname, Option<Arc<Service>>> = services.into_iter().collect();
        for key in services.keys() {
            pace::point();
            if let Some(old) = next.services.remove(key) {
                next.unindex_vips(&old);
            }
        }
        for (key, service) in services {
            pace::point();
            if let Some(service) = service {
                next.index_vips(&service);
                next.services.insert(key, service);
            }
        }
        next
    }

    /// Frees the state entry by entry, with a pace point (`crate::pace`) between entries: the
    /// indexes first, which only hold references, then the workloads and services, whose last
    /// references they may be. Meant for a state that shares nothing with another (replaced by one
    /// built afresh): the nodes a map shares with another state are copied as they are taken apart.
    pub(crate) fn dismantle(self) {
        let State {
            workloads,
            services,
            policies,
            workload_by_ip,
            workload_by_name,
            service_by_vip,
            endpoints,
        } = self;
        for (_, by_ip) in workload_by_ip {
            pace::drop_each(by_ip);
        }
        for (_, by_name) in workload_by_name {
            pace::drop_each(by_name);
        }
        for (_, by_vip) in service_by_vip {
            pace::drop_each(by_vip);
        }
        pace::drop_each(endpoints);
        pace::drop_each(workloads);
        pace::drop_each(services);
        drop(policies);
    }

    fn index_addresses(&mut self, workload: &Arc<Workload>) {
        if workload.network_mode == NetworkMode::HostNetwork || workload.workload_ips.is_empty() {
            return;
        }
        with_inner(&mut self.workload_by_ip, &workload.network, |by_ip| {
            for ip in &workload.workload_ips {
                by_ip.entry(*ip).or_insert_with(|| Arc::clone(workload));
            }
        });
    }

    fn unindex_addresses(&mut self, workload: &Workload) {
        if workload.network_mode == NetworkMode::HostNetwork || workload.workload_ips.is_empty() {
            return;
        }
        let Some(by_ip) = self.workload_by_ip.get_mut(&workload.network) else {
            return;
        };
        for ip in &workload.workload_ips {
            if by_ip.get(ip).is_some_and(|holder| holder.uid == workload.uid) {
                by_ip.remove(ip);
            }
        }
        if by_ip.is_empty() {
            self.workload_by_ip.remove(&workload.network);
        }
    }

    fn index_vips(&mut self, service: &Arc<Service>) {
        for vip in &service.vips {
            with_inner(&mut self.service_by_vip, &vip.network, |by_vip| {
                by_vip.entry(vip.address).or_insert_with(|| Arc::clone(service));
            });
        }
    }

    fn unindex_vips(&mut self, service: &Service) {
        for vip in &service.vips {
            let Some(by_vip) = self.service_by_vip.get_mut(&vip.network) else {
                continue;
            };
            if by_vip
                .get(&vip.address)
                .is_some_and(|holder| holder.namespace == service.namespace && holder.hostname == service.hostname)
            {
                by_vip.remove(&vip.address);
            }
            if by_vip.is_empty() {
                self.service_by_vip.remove(&vip.network);
            }
        }
    }

    /// Every workload, ordered by uid.
    pub fn workloads(&self) -> impl ExactSizeIterator<Item = &Workload> + '_ {
        self.workloads.values().map(|workload| &**workload)
    }

    /// Every service, ordered by key (`<namespace>/<hostname>`).
    pub fn services(&self) -> impl ExactSizeIterator<Item = &Service> + '_ {
        self.services.values().map(|service| &**service)
    }

    /// The first workload by uid after `uid` (the first of all for `None`): a walk over the
    /// workloads that holds no borrow between steps.
    pub fn next_workload(&self, uid: Option<&str>) -> Option<&Workload> {
        first_after(&self.workloads, uid)
    }

    /// The first service by key after `key` (the first of all for `None`).
    pub fn next_service(&self, key: Option<&NamespacedHostname>) -> Option<&Service> {
        first_after(&self.services, key)
    }

    /// Every authorization policy, in configuration order.
    pub fn policies(&self) -> &[Authorization] {
        &self.policies
    }

    /// The workload with this IP in this network (host-networked workloads are not found by IP).
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Workload> {
        self.workload_by_ip.get(network)?.get(&ip).map(|workload| &**workload)
    }

    /// The workload with this uid.
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.workloads.get(uid).map(|workload| &**workload)
    }

    /// The workload with this namespace and name (a pod's namespace and name, as ztunnel's
    /// `PROXY_WORKLOAD_INFO` names the workload of a dedicated proxy); the first by uid if several
    /// share them.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workload_by_name
            .get(namespace)?
            .get(name)?
            .first()
            .map(|workload| &**workload)
    }

    /// The service with this VIP in this network.
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Service> {
        self.service_by_vip.get(network)?.get(&ip).map(|service| &**service)
    }

    /// The service with this namespace and hostname.
    pub fn service_by_hostname(&self, key: &NamespacedHostname) -> Option<&Service> {
        self.services.get(key).map(|service| &**service)
    }

    /// The services with this hostname, in any namespace, ordered by key. The hostname is compared
    /// without regard to ASCII case, a trailing dot ignored. A walk over every service: for rare
    /// lookups, not for every connection.
    pub fn services_with_hostname<'a>(&'a self, hostname: &'a str) -> impl Iterator<Item = &'a Service> + 'a {
        let hostname = hostname.strip_suffix('.').unwrap_or(hostname);
        self.services()
            .filter(move |service| service.hostname.eq_ignore_ascii_case(hostname))
    }

    /// The workloads that name the service in their `services`, healthy or not, ordered by uid.
    pub fn workloads_of_service<'a>(
        &'a self,
        key: &NamespacedHostname,
    ) -> impl Iterator<Item = &'a Workload> + use<'a> {
        self.endpoints
            .get(key)
            .into_iter()
            .flat_map(|members| members.iter())
            .map(|workload| &**workload)
    }

    /// The `index`th of [`State::workloads_of_service`] (by uid), if there is one.
    pub fn endpoint_of_service(&self, key: &NamespacedHostname, index: usize) -> Option<&Workload> {
        self.endpoints
            .get(key)
            .and_then(|members| members.get(index))
            .map(|workload| &**workload)
    }

    /// The services a workload names that the configuration defines.
    pub fn services_of_workload<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Service> + 'a {
        workload.services.keys().filter_map(|key| self.service_by_hostname(key))
    }

    /// The identities a node proxy needs certificates for: those of the HBONE workloads it serves,
    /// sorted, without repeats.
    pub fn local_identities(&self, proxy: &LocalProxy) -> Vec<IstioIdentity> {
        let mut identities: Vec<_> = self
            .workloads()
            .filter(|workload| workload.protocol == Protocol::Hbone && proxy.serves_node(&workload.node))
            .map(|workload| workload.identity().clone())
            .collect();
        identities.sort();
        identities.dedup();
        identities
    }
    /// The workload an inbound connection to `dst_ip` is for: one with that IP in the proxy's network,
    /// on the proxy's node.
    pub fn inbound_workload(&self, proxy: &LocalProxy, dst_ip: IpAddr) -> Option<&Workload> {
        self.workload_by_ip(&proxy.network, dst_ip)
            .filter(|workload| proxy.serves_node(&workload.node))
    }

    /// The service an inbound connection to `workload` at `port` is reported under when the client
    /// named none (its `destination_service` label and access log `dst.service`), as ztunnel guesses
    /// it: the first service the workload is an endpoint of (in key order) with a port whose target
    /// is `port`, the service's own target port or the workload's port for it (a named port).
    ///
    /// ```
    /// use meshwire_dataplane::state::State;
    /// use meshwire_dataplane::xds::LocalConfig;
    ///
    /// let state = State::new(LocalConfig::parse(
    ///     r#"
    /// workloads:
    /// - name: db
    ///   namespace: shop
    ///   workloadIps: ["10.0.0.2"]
    ///   protocol: HBONE
    ///   services: {"shop/admin.shop.svc": {}, "shop/db.shop.svc": {5432: 15432}}
    /// services:
    /// - hostname: db.shop.svc
    ///   namespace: shop
    ///   ports: {5432: 0}
    /// - hostname: admin.shop.svc
    ///   namespace: shop
    ///   ports: {80: 8080}
    /// "#,
    /// )?);
    /// let db = state.workload_by_name("shop", "db").unwrap();
    /// let guess = |port| state.inbound_service_guess(db, port).map(|s| s.hostname.as_str());
    /// assert_eq!(guess(15432), Some("db.shop.svc")); // the workload's port for a named port
    /// assert_eq!(guess(8080), Some("admin.shop.svc")); // the service's target port
    /// assert_eq!(guess(5432), None); // a service port, not a target
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn inbound_service_guess(&self, workload: &Workload, port: u16) -> Option<&Service> {
        workload
            .services
            .iter()
            .filter_map(|(key, own)| Some((self.service_by_hostname(key)?, own)))
            .find(|(service, own)| {
                service
                    .ports
                    .iter()
                    .any(|(service_port, target)| *target == port || own.get(service_port) == Some(&port))
            })
            .map(|(service, _)| service)
    }

    /// Where an inbound CONNECT to `<hostname>:<port>` that arrived on `arrived_on` goes (the inner
    /// CONNECT of double HBONE names the service, not the workload): the workload this proxy serves
    /// at `arrived_on` ([`inbound_workload`](Self::inbound_workload)), the service with that hostname
    /// it is an endpoint of, and `<arrived_on>:<target port>`, the target port being the workload's
    /// own port for the service's `port`, else the service's non-zero target port.
    ///
    /// Services of several namespaces may share a hostname: among those the workload is an endpoint
    /// of (its `services` names them), the one in the workload's namespace is preferred, else the
    /// first in configuration order.
    ///
    /// Stricter than ztunnel, which takes the service with the hostname (preferring the workload's
    /// namespace) without checking that the workload is one of its endpoints: here a hostname whose
    /// services do not include the workload is refused ([`ServiceTargetError::NotAnEndpoint`]), so
    /// that a client cannot reach a port of a workload through a service that does not route to it.
    /// The caller still refuses the proxy's own ports and applies the policies to the result.
    ///
    /// ```
    /// use meshwire_dataplane::state::{LocalProxy, ServiceTargetError, State};
    /// use meshwire_dataplane::xds::LocalConfig;
    ///
    /// let state = State::new(LocalConfig::parse(
    ///     r#"
    /// workloads:
    /// - name: server
    ///   workloadIps: ["10.0.0.2"]
    ///   protocol: HBONE
    ///   services: {"default/server.example": {80: 8080}}
    /// services:
    /// - hostname: server.example
    ///   ports: {80: 9090, 443: 8443}
    /// - hostname: other.example
    ///   ports: {80: 8080}
    /// "#,
    /// )?);
    /// let proxy = LocalProxy::new();
    /// let ip = "10.0.0.2".parse()?;
    /// let target = state.inbound_service_target(&proxy, ip, "server.example", 80)?;
    /// assert_eq!(target.dst.to_string(), "10.0.0.2:8080");
    /// assert_eq!(target.service.hostname, "server.example");
    /// // The service's own target port where the workload has none.
    /// assert_eq!(state.inbound_service_target(&proxy, ip, "server.example", 443)?.dst.port(), 8443);
    /// assert!(matches!(
    ///     state.inbound_service_target(&proxy, ip, "other.example", 80),
    ///     Err(ServiceTargetError::NotAnEndpoint { .. })
    /// ));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn inbound_service_target(
        &self,
        proxy: &LocalProxy,
        arrived_on: IpAddr,
        hostname: &str,
        port: u16,
    ) -> Result<ServiceTarget<'_>, ServiceTargetError> {
        let arrived_on = arrived_on.to_canonical();
        let workload = self
            .inbound_workload(proxy, arrived_on)
            .ok_or(ServiceTargetError::NoWorkload { ip: arrived_on })?;
        // The services the workload is an endpoint of (its `services` names them, in key order) with
        // the hostname: a look at the workload's few services, not at the mesh's.
        let wanted = hostname.strip_suffix('.').unwrap_or(hostname);
        let mut named = workload
            .services
            .keys()
            .filter(|key| key.hostname.eq_ignore_ascii_case(wanted))
            .filter_map(|key| self.service_by_hostname(key));
        let first = named.next();
        let chosen = first
            .filter(|service| service.namespace == workload.namespace())
            .or_else(|| named.find(|service| service.namespace == workload.namespace()))
            .or(first);
        if chosen.is_none() && self.services_with_hostname(hostname).next().is_none() {
            return Err(ServiceTargetError::UnknownHostname {
                hostname: hostname.to_owned(),
            });
        }
        let Some(service) = chosen else {
            return Err(ServiceTargetError::NotAnEndpoint {
                hostname: hostname.to_owned(),
                workload: workload.uid.clone(),
            });
        };
        let key = service.key();
        let Some(target) = target_port(workload, service, &key, port).filter(|target| *target != 0) else {
            return Err(ServiceTargetError::NoTargetPort {
                service: key,
                port,
                workload: workload.uid.clone(),
            });
        };
        Ok(ServiceTarget {
            dst: SocketAddr::new(arrived_on, target),
            workload,
            service,
        })
    }

    /// Decides where an outbound connection from `source` to `original_dst` goes.
    ///
    /// The destination is taken in canonical form: an IPv4-mapped IPv6 address is its IPv4 address (as
    /// [`crate::proxy::canonical`] writes it), for every lookup and in the route.
    ///
    /// In order: a destination that is the proxy's own listener is refused ([`Refusal::Loop`]); a
    /// service VIP (in the source's network) goes to the service's waypoint if it has one, else to one
    /// of its endpoints, chosen by `pick` (see below); a workload IP goes to the workload's waypoint if
    /// it has one, else to the workload; anything else passes through. An `HBONE` destination gets an
    /// [`OutboundRoute::Hbone`] tunnel to `<workload ip>:<proxy.hbone_port>` with the authority
    /// `<workload ip>:<target port>`; a `TCP` destination passes through to the same authority. Traffic
    /// from a waypoint to what it serves does not go back to the waypoint.
    ///
    /// Endpoints of a service are its healthy workloads in the source's network that have an IP and a
    /// target port for the addressed port (the workload's own port map first, then the service's
    /// non-zero target port). They are ordered by uid and weighted by `capacity`; `pick` modulo the
    /// total weight chooses one, so a caller passing a counter gets weighted round robin and a caller
    /// passing a hash of the connection gets a stable choice.
    ///
    /// **Multi-network.** Only when no endpoint in the source's network serves the port (Istio's
    /// default preference for the local network) are `HBONE` endpoints of other networks that have a
    /// network gateway eligible, chosen the same way, and reached by
    /// [`OutboundRoute::DoubleHbone`] through their gateway (see `resolve_network_gateway` for how
    /// a gateway address and its identity are found). Endpoints of another network without a gateway
    /// are never chosen ([`Refusal::NoNetworkGateway`] when only they would serve the port); a
    /// gateway whose identity is unknown is refused ([`Refusal::UnknownNetworkGateway`]), as ztunnel
    /// refuses it. A workload IP of another network is not addressable (it is not found in the
    /// source's network): only services cross networks.
    ///
    /// No route leads back into the proxy: a service endpoint whose address and target port are one of
    /// the proxy's own listeners, or a waypoint reached at one of them other than the HBONE port, is
    /// refused as a loop too ([`Refusal::Loop`], naming the original destination). An HBONE tunnel to
    /// the proxy's own HBONE port is not a loop: that is how a workload of the proxy's own node is
    /// reached.
    pub fn route_outbound(
        &self,
        proxy: &LocalProxy,
        source: &Workload,
        original_dst: SocketAddr,
        pick: u64,
    ) -> OutboundRoute {
        let original_dst = SocketAddr::new(original_dst.ip().to_canonical(), original_dst.port());
        if proxy.is_own(original_dst) {
            return OutboundRoute::Refused {
                dst: original_dst,
                reason: Refusal::Loop,
            };
        }
        if let Some(service) = self.service_by_vip(&source.network, original_dst.ip()) {
            return self.route_to_service(proxy, source, service, original_dst, pick);
        }
        if let Some(workload) = self.workload_by_ip(&source.network, original_dst.ip()) {
            return self.route_to_workload(proxy, source, workload, original_dst, pick);
        }
        OutboundRoute::Passthrough {
            dst: original_dst,
            service: None,
            workload: None,
        }
    }

    fn route_to_service(
        &self,
        proxy: &LocalProxy,
        source: &Workload,
        service: &Service,
        dst: SocketAddr,
        pick: u64,
    ) -> OutboundRoute {
        let key = service.key();
        if let Some(waypoint) = &service.waypoint
            && !self.is_waypoint(source, waypoint)
        {
            return self.via_waypoint(proxy, source, waypoint, dst, Some(key), pick);
        }
        if !service.ports.contains_key(&dst.port()) {
            return OutboundRoute::Refused {
                dst,
                reason: Refusal::UnknownPort {
                    service: key,
                    port: dst.port(),
                },
            };
        }
        let Some((workload, ip, target_port)) =
            self.pick_endpoint(source, service, &key, dst, Some(dst.port()), Reach::Local, pick)
        else {
            return self.through_gateway(proxy, source, service, key, dst, pick);
        };
        let authority = SocketAddr::new(ip, target_port);
        if proxy.is_own(authority) {
            return OutboundRoute::Refused {
                dst,
                reason: Refusal::Loop,
            };
        }
        match workload.protocol {
            Protocol::Hbone => OutboundRoute::Hbone {
                endpoint: SocketAddr::new(ip, proxy.hbone_port),
                authority,
                expected_identities: identities(workload, Some(service)),
                service: Some(key),
                workload: workload.uid.clone(),
            },
            Protocol::Tcp => OutboundRoute::Passthrough {
                dst: authority,
                service: Some(key),
                workload: Some(workload.uid.clone()),
            },
        }
    }

    /// The route to an endpoint of another network, for a service none of whose endpoints in the
    /// source's network serves the port: double HBONE through the endpoint's network gateway.
    fn through_gateway(
        &self,
        proxy: &LocalProxy,
        source: &Workload,
        service: &Service,
        key: NamespacedHostname,
        dst: SocketAddr,
        pick: u64,
    ) -> OutboundRoute {
        let port = dst.port();
        let picked = self.pick_endpoint(source, service, &key, dst, Some(port), Reach::ThroughGateway, pick);
        let Some((workload, ip, target_port, gateway)) =
            picked.and_then(|(workload, ip, target)| Some((workload, ip, target, workload.network_gateway.as_ref()?)))
        else {
            // Name the network of an endpoint that would serve the port but has no gateway, if any.
            let stranded = self
                .workloads_of_service(&key)
                .filter(|w| w.status == HealthStatus::Healthy && w.network != source.network)
                .find(|w| target_port(w, service, &key, port).is_some());
            let reason = match stranded {
                Some(w) => Refusal::NoNetworkGateway {
                    service: key,
                    port,
                    network: w.network.clone(),
                },
                None => Refusal::NoEndpoint { service: key, port },
            };
            return OutboundRoute::Refused { dst, reason };
        };
        match self.resolve_network_gateway(source, gateway, dst, pick) {
            None => OutboundRoute::Refused {
                dst,
                reason: Refusal::UnknownNetworkGateway {
                    gateway: gateway.clone(),
                },
            },
            Some((at, _)) if proxy.is_own(at) => OutboundRoute::Refused {
                dst,
                reason: Refusal::Loop,
            },
            Some((at, gateway_identities)) => OutboundRoute::DoubleHbone {
                gateway: at,
                gateway_identities,
                expected_endpoint: SocketAddr::new(ip, target_port),
                expected_identities: self.behind_gateway_identities(source, service, &key, workload, port),
                service: key,
                port,
                workload: workload.uid.clone(),
                network: workload.network.clone(),
            },
        }
    }

    /// Where a network gateway is reached from `source` and the identities it may present.
    ///
    /// - `<network>/<ip>`: that IP at the gateway's HBONE port. Its identity is that of the
    ///   workload with the IP in that network, else those of the endpoints of the service with that
    ///   VIP (any of them may answer behind a VIP), plus the service's extra SANs.
    /// - `<namespace>/<hostname>`: the service's VIP in the source's network, at the HBONE port,
    ///   with the identities of all its endpoints and its extra SANs; without such a VIP, one of its
    ///   endpoints in the source's network (chosen by `pick`), at its target port for the HBONE port
    ///   (the HBONE port itself without a mapping), with that endpoint's identity and the SANs.
    ///
    /// `None` when no identity is known: the outer mTLS could verify nothing.
    fn resolve_network_gateway(
        &self,
        source: &Workload,
        gateway: &GatewayAddress,
        dst: SocketAddr,
        pick: u64,
    ) -> Option<(SocketAddr, Vec<SpiffeId>)> {
        let port = gateway.hbone_mtls_port;
        let (at, ids) = match &gateway.destination {
            GatewayDestination::Address(address) => {
                let at = SocketAddr::new(address.address, port);
                if let Some(workload) = self.workload_by_ip(&address.network, address.address) {
                    (at, identities(workload, None))
                } else {
                    let service = self.service_by_vip(&address.network, address.address)?;
                    (at, self.service_identities(service))
                }
            }
            GatewayDestination::Hostname(key) => {
                let service = self.service_by_hostname(key)?;
                let vip = service
                    .vips
                    .iter()
                    .filter(|vip| vip.network == source.network)
                    .find(|vip| vip.address.is_ipv6() == dst.is_ipv6())
                    .or_else(|| service.vips.iter().find(|vip| vip.network == source.network));
                match vip {
                    Some(vip) => (SocketAddr::new(vip.address, port), self.service_identities(service)),
                    None => {
                        let (workload, ip, _) =
                            self.pick_endpoint(source, service, key, dst, None, Reach::Local, pick)?;
                        let target = target_port(workload, service, key, port).unwrap_or(port);
                        (SocketAddr::new(ip, target), identities(workload, Some(service)))
                    }
                }
            }
        };
        (!ids.is_empty()).then_some((at, ids))
    }

    /// The identities the destination of a double-HBONE connection to `picked` may present. The
    /// gateway routes the stream by service hostname to any endpoint of the service behind it, so
    /// they are those of every endpoint `picked` could have been: healthy, with an IP, reachable
    /// from `source` through a gateway, in `picked`'s network behind the same gateway, serving
    /// `port`; in uid order, then the service's extra SANs, without repeats.
    fn behind_gateway_identities(
        &self,
        source: &Workload,
        service: &Service,
        key: &NamespacedHostname,
        picked: &Workload,
        port: u16,
    ) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = Vec::new();
        let members = self
            .workloads_of_service(key)
            .filter(|w| {
                w.status == HealthStatus::Healthy
                    && Reach::ThroughGateway.admits(source, w)
                    && w.network == picked.network
                    && w.network_gateway == picked.network_gateway
                    && !w.workload_ips.is_empty()
                    && target_port(w, service, key, port).is_some()
            })
            .map(Workload::spiffe_id);
        for id in members.chain(&service.subject_alt_names) {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// The identities of a service's healthy endpoints, in uid order, then its extra SANs, without
    /// repeats.
    fn service_identities(&self, service: &Service) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = Vec::new();
        let members = self
            .workloads_of_service(&service.key())
            .filter(|w| w.status == HealthStatus::Healthy)
            .map(Workload::spiffe_id);
        for id in members.chain(&service.subject_alt_names) {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }

    fn route_to_workload(
        &self,
        proxy: &LocalProxy,
        source: &Workload,
        workload: &Workload,
        dst: SocketAddr,
        pick: u64,
    ) -> OutboundRoute {
        if let Some(waypoint) = &workload.waypoint
            && !self.is_waypoint(source, waypoint)
        {
            return self.via_waypoint(proxy, source, waypoint, dst, None, pick);
        }
        match workload.protocol {
            Protocol::Hbone => OutboundRoute::Hbone {
                endpoint: SocketAddr::new(dst.ip(), proxy.hbone_port),
                authority: dst,
                expected_identities: identities(workload, None),
                service: None,
                workload: workload.uid.clone(),
            },
            Protocol::Tcp => OutboundRoute::Passthrough {
                dst,
                service: None,
                workload: Some(workload.uid.clone()),
            },
        }
    }

    fn via_waypoint(
        &self,
        proxy: &LocalProxy,
        source: &Workload,
        waypoint: &GatewayAddress,
        dst: SocketAddr,
        service: Option<NamespacedHostname>,
        pick: u64,
    ) -> OutboundRoute {
        match self.resolve_waypoint(source, waypoint, dst, pick) {
            Some((_, endpoint, _)) if proxy.is_own(endpoint) && endpoint.port() != proxy.hbone_port => {
                OutboundRoute::Refused {
                    dst,
                    reason: Refusal::Loop,
                }
            }
            Some((workload, endpoint, waypoint_service)) => OutboundRoute::Waypoint {
                endpoint,
                authority: dst,
                expected_identities: identities(workload, waypoint_service),
                service,
                waypoint: workload.uid.clone(),
            },
            None => OutboundRoute::Refused {
                dst,
                reason: Refusal::NoWaypoint {
                    waypoint: waypoint.clone(),
                },
            },
        }
    }

    /// The waypoint's workload, the address to reach it and its service (when addressed as one).
    fn resolve_waypoint<'a>(
        &'a self,
        source: &Workload,
        waypoint: &GatewayAddress,
        dst: SocketAddr,
        pick: u64,
    ) -> Option<(&'a Workload, SocketAddr, Option<&'a Service>)> {
        let service = match &waypoint.destination {
            GatewayDestination::Address(address) => match self.service_by_vip(&address.network, address.address) {
                Some(service) => service,
                None => {
                    let workload = self.workload_by_ip(&address.network, address.address)?;
                    return Some((
                        workload,
                        SocketAddr::new(address.address, waypoint.hbone_mtls_port),
                        None,
                    ));
                }
            },
            GatewayDestination::Hostname(key) => self.service_by_hostname(key)?,
        };
        // A waypoint need not declare its HBONE port: without a mapping, the port is used as is.
        let key = service.key();
        let (workload, ip, _) = self.pick_endpoint(source, service, &key, dst, None, Reach::Local, pick)?;
        let port = target_port(workload, service, &key, waypoint.hbone_mtls_port).unwrap_or(waypoint.hbone_mtls_port);
        Some((workload, SocketAddr::new(ip, port), Some(service)))
    }

    /// Whether `source` is (an instance of) the waypoint, whose traffic must not loop back to it.
    fn is_waypoint(&self, source: &Workload, waypoint: &GatewayAddress) -> bool {
        match &waypoint.destination {
            GatewayDestination::Address(address) => match self.service_by_vip(&address.network, address.address) {
                Some(service) => source.services.contains_key(&service.key()),
                None => source.network == address.network && source.workload_ips.contains(&address.address),
            },
            GatewayDestination::Hostname(key) => source.services.contains_key(key),
        }
    }

    /// Chooses an endpoint of `service` among those `reach` admits: the workload, its IP and the
    /// target port. With `port`, only workloads with a target port for it; without, any (the port
    /// is then the service's own).
    #[allow(clippy::too_many_arguments)]
    fn pick_endpoint<'a>(
        &'a self,
        source: &Workload,
        service: &Service,
        key: &NamespacedHostname,
        dst: SocketAddr,
        port: Option<u16>,
        reach: Reach,
        pick: u64,
    ) -> Option<(&'a Workload, IpAddr, u16)> {
        // Two passes over the members (weights, then the choice) rather than a collected list: no
        // allocation per connection.
        let eligible = || {
            self.workloads_of_service(key)
                .filter(move |workload| workload.status == HealthStatus::Healthy && reach.admits(source, workload))
                .filter_map(move |workload| {
                    let ip = pick_ip(workload, dst.ip())?;
                    let target = match port {
                        Some(port) => target_port(workload, service, key, port)?,
                        None => 0,
                    };
                    Some((workload, ip, target))
                })
        };
        let (count, total) = eligible().fold((0u64, 0u64), |(count, total), (workload, ..)| {
            (count + 1, total + u64::from(workload.capacity))
        });
        if total == 0 {
            // Every capacity is 0: choose uniformly rather than not at all.
            let index = usize::try_from(pick.checked_rem(count)?).ok()?;
            return eligible().nth(index);
        }
        let mut remaining = pick % total;
        eligible().find(|(workload, ..)| {
            let weight = u64::from(workload.capacity);
            if remaining < weight {
                return true;
            }
            remaining -= weight;
            false
        })
    }
}

/// The first value of `map` whose key comes after `after` (the first of all for `None`).
fn first_after<'a, K, Q, V>(map: &'a imbl::OrdMap<K, Arc<V>>, after: Option<&Q>) -> Option<&'a V>
where
    K: Ord + Clone + std::borrow::Borrow<Q>,
    Q: Ord + ?Sized,
{
    let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
    map.range::<_, Q>((lower, Bound::Unbounded))
        .next()
        .map(|(_, value)| &**value)
}

/// Runs `f` on the inner map of `outer` at `key`, created empty if missing, changed in place: the
/// key is copied only when it is new, and the inner map (path by path) only where an older state
/// shares it.
fn with_inner<V: Clone>(
    outer: &mut imbl::HashMap<String, imbl::HashMap<IpAddr, V>>,
    key: &str,
    f: impl FnOnce(&mut imbl::HashMap<IpAddr, V>),
) {
    match outer.get_mut(key) {
        Some(inner) => f(inner),
        None => f(outer.entry(key.to_owned()).or_default()),
    }
}

/// `members` after `changes`, in order: `(uid, None)` removes the member with that uid, `(uid,
/// Some(workload))` puts `workload` in its place (ordered by uid). `None` when no member is left.
fn patch_members(members: Option<&Members>, changes: Vec<MemberChange<'_>>) -> Option<Members> {
    let mut list: Vec<Arc<Workload>> = members.map(|m| m.to_vec()).unwrap_or_default();
    for (uid, member) in changes {
        let at = list.binary_search_by(|w| w.uid.as_str().cmp(uid));
        match (at, member) {
            (Ok(i), Some(member)) => list[i] = member,
            (Err(i), Some(member)) => list.insert(i, member),
            (Ok(i), None) => {
                list.remove(i);
            }
            (Err(_), None) => {}
        }
    }
    (!list.is_empty()).then(|| list.into())
}

/// Which endpoints of a service a connection may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Those in the source's network, reached directly.
    Local,
    /// `HBONE` ones in another network that have a network gateway (double HBONE through it).
    ThroughGateway,
}

impl Reach {
    fn admits(self, source: &Workload, endpoint: &Workload) -> bool {
        match self {
            Reach::Local => endpoint.network == source.network,
            Reach::ThroughGateway => {
                endpoint.network != source.network
                    && endpoint.network_gateway.is_some()
                    && endpoint.protocol == Protocol::Hbone
            }
        }
    }
}

/// The target port of `port` on `workload` for `service`: the workload's own mapping, else the
/// service's non-zero target port (0 is a named port only workloads resolve).
fn target_port(workload: &Workload, service: &Service, key: &NamespacedHostname, port: u16) -> Option<u16> {
    if let Some(target) = workload.services.get(key).and_then(|ports| ports.get(&port)) {
        return Some(*target);
    }
    service.ports.get(&port).copied().filter(|target| *target != 0)
}

/// The workload IP to use: one of the same family as the original destination, else the first.
fn pick_ip(workload: &Workload, original: IpAddr) -> Option<IpAddr> {
    workload
        .workload_ips
        .iter()
        .find(|ip| ip.is_ipv6() == original.is_ipv6())
        .or_else(|| workload.workload_ips.first())
        .copied()
}

/// The workload's SPIFFE ID, then the service's extra SANs, without repeats.
fn identities(workload: &Workload, service: Option<&Service>) -> Vec<SpiffeId> {
    let mut ids = vec![workload.spiffe_id().clone()];
    for san in service.into_iter().flat_map(|service| &service.subject_alt_names) {
        if !ids.contains(san) {
            ids.push(san.clone());
        }
    }
    ids
}

impl fmt::Display for OutboundRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboundRoute::Hbone {
                endpoint, authority, ..
            } => write!(f, "HBONE to {endpoint} for {authority}"),
            OutboundRoute::Waypoint {
                endpoint,
                authority,
                waypoint,
                ..
            } => write!(f, "HBONE to waypoint {waypoint} at {endpoint} for {authority}"),
            OutboundRoute::DoubleHbone {
                gateway,
                expected_endpoint,
                service,
                port,
                network,
                ..
            } => write!(
                f,
                "double HBONE through gateway {gateway} for {}:{port} (chosen endpoint {expected_endpoint}) in network \
                 {network:?}",
                service.hostname
            ),
            OutboundRoute::Passthrough { dst, .. } => write!(f, "plain TCP to {dst}"),
            OutboundRoute::Refused { dst, reason } => write!(f, "refused {dst}: {reason}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The multi-network decision: local endpoints first, remote ones through their network gateway.

    use super::*;

    const MESH: &str = r#"
workloads:
- name: client
  serviceAccount: client
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  network: net-a
- name: local-server
  serviceAccount: local
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  network: net-a
  services: {"default/both.example": {80: 8080}}
- name: remote-server
  serviceAccount: remote
  workloadIps: ["10.1.0.2"]
  protocol: HBONE
  network: net-b
  networkGateway: {destination: "net-b/10.1.0.100", hboneMtlsPort: 15009}
  services:
    "default/both.example": {80: 8080}
    "default/remote.example": {80: 8080}
- name: eastwest
  namespace: istio-system
  serviceAccount: eastwest
  workloadIps: ["10.1.0.100"]
  protocol: HBONE
  network: net-b
- name: stranded
  serviceAccount: stranded
  workloadIps: ["10.2.0.2"]
  protocol: HBONE
  network: net-c
  services: {"default/stranded.example": {80: 8080}}
- name: unknown-gateway
  workloadIps: ["10.3.0.2"]
  protocol: HBONE
  network: net-d
  networkGateway: {destination: "net-d/10.3.0.100"}
  services: {"default/unknown-gateway.example": {80: 8080}}
- name: behind-vip
  serviceAccount: behind-vip
  workloadIps: ["10.4.0.2"]
  protocol: HBONE
  network: net-e
  networkGateway: {destination: "istio-system/ew-vip.example"}
  services: {"default/by-vip.example": {80: 8080}}
- name: ew-vip-pod
  namespace: istio-system
  serviceAccount: ew-vip
  workloadIps: ["10.4.0.100"]
  protocol: HBONE
  network: net-e
  services: {"istio-system/ew-vip.example": {15008: 15008}}
- name: behind-endpoint
  serviceAccount: behind-endpoint
  workloadIps: ["10.5.0.2"]
  protocol: HBONE
  network: net-f
  networkGateway: {destination: "istio-system/ew-pods.example", hboneMtlsPort: 15008}
  services: {"default/by-endpoint.example": {80: 8080}}
- name: ew-pod
  namespace: istio-system
  serviceAccount: ew-pods
  workloadIps: ["10.0.8.8"]
  protocol: HBONE
  network: net-a
  services: {"istio-system/ew-pods.example": {15008: 15099}}
services:
- hostname: both.example
  vips: ["net-a/10.9.0.1"]
  ports: {80: 8080}
- hostname: remote.example
  vips: ["net-a/10.9.0.2", "net-b/10.9.1.2"]
  ports: {80: 8080}
- hostname: stranded.example
  vips: ["net-a/10.9.0.3"]
  ports: {80: 8080}
- hostname: unknown-gateway.example
  vips: ["net-a/10.9.0.4"]
  ports: {80: 8080}
- hostname: by-vip.example
  vips: ["net-a/10.9.0.5"]
  ports: {80: 8080}
- hostname: by-endpoint.example
  vips: ["net-a/10.9.0.6"]
  ports: {80: 8080}
- namespace: istio-system
  hostname: ew-vip.example
  vips: ["net-a/10.9.0.100"]
  subjectAltNames: ["spiffe://cluster.local/ns/istio-system/sa/ew-extra"]
  ports: {15008: 15008}
- namespace: istio-system
  hostname: ew-pods.example
  vips: ["net-f/10.9.5.100"]
  ports: {15008: 15099}
"#;

    fn state() -> State {
        State::new(LocalConfig::parse(MESH).expect("the test mesh parses"))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn id(namespace: &str, sa: &str) -> SpiffeId {
        SpiffeId::new(format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}")).unwrap()
    }

    fn key(s: &str) -> NamespacedHostname {
        s.parse().unwrap()
    }

    fn route(state: &State, source: &str, dst: &str, pick: u64) -> OutboundRoute {
        let source = state.workload_by_name("default", source).expect("source");
        state.route_outbound(
            &LocalProxy::new().with_network(&source.network),
            source,
            addr(dst),
            pick,
        )
    }

    fn uid(state: &State, namespace: &str, name: &str) -> String {
        state.workload_by_name(namespace, name).unwrap().uid.clone()
    }

    #[test]
    fn a_local_endpoint_is_preferred_to_a_remote_one() {
        let state = state();
        for pick in 0..8 {
            let OutboundRoute::Hbone {
                endpoint, authority, ..
            } = route(&state, "client", "10.9.0.1:80", pick)
            else {
                panic!("expected HBONE to the local endpoint");
            };
            assert_eq!((endpoint, authority), (addr("10.0.0.2:15008"), addr("10.0.0.2:8080")));
        }
    }

    #[test]
    fn a_remote_endpoint_is_reached_through_its_gateway_by_address() {
        let state = state();
        let route = route(&state, "client", "10.9.0.2:80", 0);
        assert_eq!(
            route,
            OutboundRoute::DoubleHbone {
                gateway: addr("10.1.0.100:15009"),
                gateway_identities: vec![id("istio-system", "eastwest")],
                expected_endpoint: addr("10.1.0.2:8080"),
                expected_identities: vec![id("default", "remote")],
                service: key("default/remote.example"),
                port: 80,
                workload: uid(&state, "default", "remote-server"),
                network: "net-b".into(),
            }
        );
        assert_eq!(
            route.to_string(),
            r#"double HBONE through gateway 10.1.0.100:15009 for remote.example:80 (chosen endpoint 10.1.0.2:8080) in network "net-b""#
        );
    }

    #[test]
    fn from_the_endpoints_own_network_the_route_is_plain_hbone() {
        let state = state();
        let source = state.workload_by_name("istio-system", "eastwest").unwrap();
        let proxy = LocalProxy::new().with_network("net-b");
        let OutboundRoute::Hbone { authority, .. } = state.route_outbound(&proxy, source, addr("10.9.1.2:80"), 0)
        else {
            panic!("expected HBONE within net-b");
        };
        assert_eq!(authority, addr("10.1.0.2:8080"));
    }

    #[test]
    fn a_remote_endpoint_without_a_gateway_is_never_chosen() {
        let state = state();
        let route = route(&state, "client", "10.9.0.3:80", 0);
        assert_eq!(
            route,
            OutboundRoute::Refused {
                dst: addr("10.9.0.3:80"),
                reason: Refusal::NoNetworkGateway {
                    service: key("default/stranded.example"),
                    port: 80,
                    network: "net-c".into(),
                },
            }
        );
        assert_eq!(
            route.to_string(),
            "refused 10.9.0.3:80: service default/stranded.example port 80 is served only on network \"net-c\", \
             by endpoints without a network gateway"
        );
        // Nor is a workload of another network addressable by its IP.
        assert!(matches!(
            self::route(&state, "client", "10.1.0.2:8080", 0),
            OutboundRoute::Passthrough { workload: None, .. }
        ));
    }

    #[test]
    fn a_gateway_of_unknown_identity_is_refused() {
        let state = state();
        let OutboundRoute::Refused {
            reason: Refusal::UnknownNetworkGateway { gateway },
            ..
        } = route(&state, "client", "10.9.0.4:80", 0)
        else {
            panic!("expected a refusal");
        };
        assert_eq!(gateway.to_string(), "net-d/10.3.0.100 port 15008");
    }

    #[test]
    fn a_gateway_by_hostname_is_its_vip_in_the_sources_network() {
        let state = state();
        let OutboundRoute::DoubleHbone {
            gateway,
            gateway_identities,
            expected_endpoint,
            expected_identities,
            ..
        } = route(&state, "client", "10.9.0.5:80", 0)
        else {
            panic!("expected double HBONE");
        };
        assert_eq!(gateway, addr("10.9.0.100:15008"));
        assert_eq!(
            gateway_identities,
            [id("istio-system", "ew-vip"), id("istio-system", "ew-extra")]
        );
        assert_eq!(expected_endpoint, addr("10.4.0.2:8080"));
        assert_eq!(expected_identities, [id("default", "behind-vip")]);
    }

    #[test]
    fn a_gateway_by_hostname_without_a_local_vip_is_one_of_its_local_endpoints() {
        let state = state();
        let OutboundRoute::DoubleHbone {
            gateway,
            gateway_identities,
            network,
            ..
        } = route(&state, "client", "10.9.0.6:80", 0)
        else {
            panic!("expected double HBONE");
        };
        // The endpoint's own target port for the gateway service's HBONE port.
        assert_eq!(gateway, addr("10.0.8.8:15099"));
        assert_eq!(gateway_identities, [id("istio-system", "ew-pods")]);
        assert_eq!(network, "net-f");
    }

    /// A service with endpoints in two networks behind gateways: who may answer behind a gateway.
    const SPREAD: &str = r#"
workloads:
- name: client
  serviceAccount: client
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  network: net-a
- uid: a-spread-b
  name: spread-b
  serviceAccount: spread-b
  workloadIps: ["10.1.0.2"]
  protocol: HBONE
  network: net-b
  networkGateway: {destination: "net-b/10.1.0.100"}
  services: {"default/spread.example": {80: 8080}}
- uid: b-spread-a
  name: spread-a
  serviceAccount: spread-a
  workloadIps: ["10.1.0.3"]
  protocol: HBONE
  network: net-b
  networkGateway: {destination: "net-b/10.1.0.100"}
  services: {"default/spread.example": {80: 8080}}
- uid: c-spread-a-again
  name: spread-a-again
  serviceAccount: spread-a
  workloadIps: ["10.1.0.4"]
  protocol: HBONE
  network: net-b
  networkGateway: {destination: "net-b/10.1.0.100"}
  services: {"default/spread.example": {80: 8080}}
- uid: d-sick
  name: sick
  serviceAccount: sick
  workloadIps: ["10.1.0.5"]
  protocol: HBONE
  network: net-b
  status: Unhealthy
  networkGateway: {destination: "net-b/10.1.0.100"}
  services: {"default/spread.example": {80: 8080}}
- uid: e-far
  name: far
  serviceAccount: far
  workloadIps: ["10.2.0.2"]
  protocol: HBONE
  network: net-c
  networkGateway: {destination: "net-c/10.2.0.100"}
  services: {"default/spread.example": {80: 8080}}
- uid: f-no-port
  name: no-port
  serviceAccount: no-port
  workloadIps: ["10.1.0.6"]
  protocol: HBONE
  network: net-b
  networkGateway: {destination: "net-b/10.1.0.100"}
  services: {"default/spread.example": {81: 8081}}
- uid: g-other-gateway
  name: other-gateway
  serviceAccount: other-gateway
  workloadIps: ["10.1.0.7"]
  protocol: HBONE
  network: net-b
  networkGateway: {destination: "net-b/10.1.0.101"}
  services: {"default/spread.example": {80: 8080}}
- name: eastwest-b
  namespace: istio-system
  serviceAccount: eastwest
  workloadIps: ["10.1.0.100"]
  protocol: HBONE
  network: net-b
- name: eastwest-b2
  namespace: istio-system
  serviceAccount: eastwest2
  workloadIps: ["10.1.0.101"]
  protocol: HBONE
  network: net-b
- name: eastwest-c
  namespace: istio-system
  serviceAccount: eastwest
  workloadIps: ["10.2.0.100"]
  protocol: HBONE
  network: net-c
services:
- hostname: spread.example
  vips: ["net-a/10.9.0.7"]
  subjectAltNames:
  - "spiffe://cluster.local/ns/default/sa/spread-extra"
  - "spiffe://cluster.local/ns/default/sa/spread-a"
  ports: {80: 0}
"#;

    #[test]
    fn the_inner_tls_accepts_every_endpoint_the_gateway_may_route_to() {
        let state = State::new(LocalConfig::parse(SPREAD).unwrap());
        let expected = |pick| {
            let OutboundRoute::DoubleHbone {
                expected_endpoint,
                expected_identities,
                service,
                port,
                ..
            } = route(&state, "client", "10.9.0.7:80", pick)
            else {
                panic!("expected double HBONE");
            };
            assert_eq!((service, port), (key("default/spread.example"), 80));
            (expected_endpoint, expected_identities)
        };
        // Eligible, in uid order: spread-b, spread-a, spread-a-again, far, other-gateway (sick is
        // unhealthy, no-port does not serve 80 and the service's target port is a named one).
        let behind_b = vec![
            id("default", "spread-b"),
            id("default", "spread-a"),
            id("default", "spread-extra"),
        ];
        assert_eq!(expected(0), (addr("10.1.0.2:8080"), behind_b.clone()));
        assert_eq!(expected(1), (addr("10.1.0.3:8080"), behind_b.clone()));
        assert_eq!(expected(2), (addr("10.1.0.4:8080"), behind_b));
        // Another network's endpoint: only it is behind its gateway.
        assert_eq!(
            expected(3),
            (
                addr("10.2.0.2:8080"),
                vec![
                    id("default", "far"),
                    id("default", "spread-extra"),
                    id("default", "spread-a")
                ]
            )
        );
        // The same network, another gateway: that gateway reaches only it.
        assert_eq!(
            expected(4).1,
            [
                id("default", "other-gateway"),
                id("default", "spread-extra"),
                id("default", "spread-a")
            ]
        );
    }

    /// A workload that is an endpoint of services of two namespaces sharing a hostname.
    const INBOUND: &str = r#"
workloads:
- uid: server
  name: server
  namespace: shop
  serviceAccount: server
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  node: node-1
  services:
    "shop/cart.example": {80: 8080}
    "other/cart.example": {80: 9080}
    "shop/named.example": {}
    "other/only-other.example": {80: 7070}
- uid: elsewhere
  name: elsewhere
  namespace: shop
  workloadIps: ["10.0.0.3"]
  protocol: HBONE
  node: node-2
  services: {"shop/cart.example": {80: 8080}}
services:
- namespace: other
  hostname: cart.example
  ports: {80: 9080, 443: 9443}
- namespace: shop
  hostname: cart.example
  ports: {80: 8080, 443: 8443}
- namespace: shop
  hostname: named.example
  ports: {80: 0}
- namespace: other
  hostname: only-other.example
  ports: {80: 7070}
- namespace: shop
  hostname: stranger.example
  ports: {80: 80}
"#;

    #[test]
    fn a_hostname_authority_resolves_to_the_local_workloads_target_port() {
        let state = State::new(LocalConfig::parse(INBOUND).unwrap());
        let proxy = LocalProxy::new().with_node("node-1");
        let server: IpAddr = "10.0.0.2".parse().unwrap();
        let target = |ip: IpAddr, host: &str, port| {
            state
                .inbound_service_target(&proxy, ip, host, port)
                .map(|t| (t.dst, t.workload.uid.clone(), t.service.key()))
        };
        // The service of the workload's namespace, although another comes first, and the
        // workload's own target port.
        assert_eq!(
            target(server, "cart.example", 80),
            Ok((addr("10.0.0.2:8080"), "server".to_owned(), key("shop/cart.example")))
        );
        // The service's target port where the workload has none; case and a trailing dot ignored;
        // an IPv4-mapped address as its IPv4 address.
        assert_eq!(
            target("::ffff:10.0.0.2".parse().unwrap(), "Cart.Example.", 443),
            Ok((addr("10.0.0.2:8443"), "server".to_owned(), key("shop/cart.example")))
        );
        // Only another namespace's service with the hostname has the workload: that one.
        assert_eq!(
            target(server, "only-other.example", 80),
            Ok((
                addr("10.0.0.2:7070"),
                "server".to_owned(),
                key("other/only-other.example")
            ))
        );
    }

    #[test]
    fn a_hostname_authority_without_a_local_endpoint_or_port_is_refused() {
        let state = State::new(LocalConfig::parse(INBOUND).unwrap());
        let proxy = LocalProxy::new().with_node("node-1");
        let server: IpAddr = "10.0.0.2".parse().unwrap();
        let refusal = |ip: IpAddr, host: &str, port| state.inbound_service_target(&proxy, ip, host, port).unwrap_err();

        let not_member = refusal(server, "stranger.example", 80);
        assert_eq!(
            not_member,
            ServiceTargetError::NotAnEndpoint {
                hostname: "stranger.example".into(),
                workload: "server".into(),
            }
        );
        assert_eq!(
            not_member.to_string(),
            r#"workload server is not an endpoint of a service with the hostname "stranger.example""#
        );
        let unknown = refusal(server, "nowhere.example", 80);
        assert_eq!(unknown.to_string(), r#"no service has the hostname "nowhere.example""#);

        // A named target port (0) the workload does not map, and a port nobody declares.
        for (host, port) in [("named.example", 80), ("cart.example", 81)] {
            let error = refusal(server, host, port);
            assert!(
                matches!(&error, ServiceTargetError::NoTargetPort { port: p, workload, .. } if *p == port && workload == "server"),
                "{error:?}"
            );
        }
        assert_eq!(
            refusal(server, "cart.example", 81).to_string(),
            "service shop/cart.example has no target port for port 81 on workload server"
        );

        // A workload of another node, and an address no workload has.
        for ip in ["10.0.0.3", "10.0.0.99"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(refusal(ip, "cart.example", 80), ServiceTargetError::NoWorkload { ip });
        }
    }

    #[test]
    fn a_dismantled_state_frees_its_workloads_and_services_and_a_state_sharing_with_it_keeps_them() {
        let state = State::new(LocalConfig::parse(MESH).unwrap());
        let workloads: Vec<std::sync::Weak<Workload>> = state.workloads.values().map(Arc::downgrade).collect();
        let services: Vec<std::sync::Weak<Service>> = state.services.values().map(Arc::downgrade).collect();
        let count = workloads.len();
        assert!(count > 4 && !services.is_empty());
        // A state that shares every part with it (a clone, or one patched from it) is untouched.
        let sharing = state.clone();
        state.dismantle();
        assert_eq!(sharing.workloads().len(), count);
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            sharing.workload_by_ip("net-a", ip).map(|w| w.name.as_str()),
            Some("local-server")
        );
        assert!(workloads.iter().all(|w| w.upgrade().is_some()));
        // The last holder dismantled, everything is freed.
        sharing.dismantle();
        assert!(workloads.iter().all(|w| w.upgrade().is_none()));
        assert!(services.iter().all(|s| s.upgrade().is_none()));
    }
}
