//! An immutable snapshot of the mesh (workloads, services, policies) with the lookups and the outbound
//! routing decision, as pure functions.
//!
//! A [`State`] is built once from a validated [`LocalConfig`] and then only read: share it as
//! `Arc<State>` (an `ArcSwap<State>` when the configuration changes) so that data-path cores read it
//! without waiting on the control plane. No method does IO, reads the clock or draws random numbers;
//! the caller passes the proxy's own addresses and a number that picks among service endpoints.
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

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use meshwire_identity::id::{IstioIdentity, SpiffeId};

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
    /// No healthy endpoint of the service, in the source's network, serves the port.
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoEndpoint {
        /// The service.
        service: NamespacedHostname,
        /// The port the client addressed.
        port: u16,
    },
    /// The destination's waypoint is not a known workload or a service with an endpoint.
    #[error("waypoint {waypoint} is unknown or has no healthy endpoint")]
    NoWaypoint {
        /// The waypoint.
        waypoint: GatewayAddress,
    },
}

/// An immutable snapshot of workloads, services and policies, indexed for routing.
#[derive(Debug, Clone, Default)]
pub struct State {
    workloads: Vec<Workload>,
    services: Vec<Service>,
    policies: Vec<Authorization>,
    /// network -> IP -> workload (host-networked workloads are not indexed).
    workload_by_ip: HashMap<String, HashMap<IpAddr, usize>>,
    workload_by_uid: HashMap<String, usize>,
    /// namespace -> name -> workload.
    workload_by_name: HashMap<String, HashMap<String, usize>>,
    /// network -> VIP -> service.
    service_by_vip: HashMap<String, HashMap<IpAddr, usize>>,
    service_by_key: HashMap<NamespacedHostname, usize>,
    /// service key -> workloads that name it, ordered by uid.
    endpoints: HashMap<NamespacedHostname, Vec<usize>>,
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
        let mut state = State {
            workloads,
            services,
            policies,
            ..State::default()
        };
        for (i, workload) in state.workloads.iter().enumerate() {
            state.workload_by_uid.entry(workload.uid.clone()).or_insert(i);
            state
                .workload_by_name
                .entry(workload.namespace().to_owned())
                .or_default()
                .entry(workload.name.clone())
                .or_insert(i);
            if workload.network_mode != NetworkMode::HostNetwork {
                let by_ip = state.workload_by_ip.entry(workload.network.clone()).or_default();
                for ip in &workload.workload_ips {
                    by_ip.entry(*ip).or_insert(i);
                }
            }
            for key in workload.services.keys() {
                state.endpoints.entry(key.clone()).or_default().push(i);
            }
        }
        for endpoints in state.endpoints.values_mut() {
            endpoints.sort_by(|a, b| state.workloads[*a].uid.cmp(&state.workloads[*b].uid));
        }
        for (i, service) in state.services.iter().enumerate() {
            state.service_by_key.entry(service.key()).or_insert(i);
            for vip in &service.vips {
                state
                    .service_by_vip
                    .entry(vip.network.clone())
                    .or_default()
                    .entry(vip.address)
                    .or_insert(i);
            }
        }
        state
    }

    /// Every workload, in configuration order.
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    /// Every service, in configuration order.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Every authorization policy, in configuration order.
    pub fn policies(&self) -> &[Authorization] {
        &self.policies
    }

    /// The workload with this IP in this network (host-networked workloads are not found by IP).
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Workload> {
        let index = *self.workload_by_ip.get(network)?.get(&ip)?;
        self.workloads.get(index)
    }

    /// The workload with this uid.
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.workloads.get(*self.workload_by_uid.get(uid)?)
    }

    /// The workload with this namespace and name (a pod's namespace and name, as ztunnel's
    /// `PROXY_WORKLOAD_INFO` names the workload of a dedicated proxy); the first in configuration
    /// order if several share them.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads.get(*self.workload_by_name.get(namespace)?.get(name)?)
    }

    /// The service with this VIP in this network.
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Service> {
        let index = *self.service_by_vip.get(network)?.get(&ip)?;
        self.services.get(index)
    }

    /// The service with this namespace and hostname.
    pub fn service_by_hostname(&self, key: &NamespacedHostname) -> Option<&Service> {
        self.services.get(*self.service_by_key.get(key)?)
    }

    /// The workloads that name the service in their `services`, healthy or not, ordered by uid.
    pub fn workloads_of_service<'a>(
        &'a self,
        key: &NamespacedHostname,
    ) -> impl Iterator<Item = &'a Workload> + use<'a> {
        self.endpoints
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|index| self.workloads.get(*index))
    }

    /// The services a workload names that the configuration defines.
    pub fn services_of_workload<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Service> + 'a {
        workload.services.keys().filter_map(|key| self.service_by_hostname(key))
    }

    /// The identities a node proxy needs certificates for: those of the HBONE workloads it serves,
    /// sorted, without repeats.
    pub fn local_identities(&self, proxy: &LocalProxy) -> Vec<IstioIdentity> {
        let mut identities: Vec<_> = self
            .workloads
            .iter()
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
        let Some((workload, ip, target_port)) = self.pick_endpoint(source, service, &key, dst, Some(dst.port()), pick)
        else {
            return OutboundRoute::Refused {
                dst,
                reason: Refusal::NoEndpoint {
                    service: key,
                    port: dst.port(),
                },
            };
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
        let (workload, ip, _) = self.pick_endpoint(source, service, &key, dst, None, pick)?;
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

    /// Chooses an endpoint of `service`: the workload, its IP and the target port. With `port`, only
    /// workloads with a target port for it; without, any (the port is then the service's own).
    fn pick_endpoint<'a>(
        &'a self,
        source: &Workload,
        service: &Service,
        key: &NamespacedHostname,
        dst: SocketAddr,
        port: Option<u16>,
        pick: u64,
    ) -> Option<(&'a Workload, IpAddr, u16)> {
        // Two passes over the members (weights, then the choice) rather than a collected list: no
        // allocation per connection.
        let eligible = || {
            self.workloads_of_service(key)
                .filter(|workload| workload.status == HealthStatus::Healthy && workload.network == source.network)
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
            OutboundRoute::Passthrough { dst, .. } => write!(f, "plain TCP to {dst}"),
            OutboundRoute::Refused { dst, reason } => write!(f, "refused {dst}: {reason}"),
        }
    }
}
