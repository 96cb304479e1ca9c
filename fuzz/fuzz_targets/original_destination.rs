#![no_main]
//! The original-destination handling of the capture listeners (`proxy::check_redirect`,
//! `proxy::canonical`) and the outbound routing decision (`State::route_outbound`).
//!
//! The states are those of two fixed configurations: the loopback example
//! (`dataplane/examples/localhost.yaml`) and a mesh with services, VIPs in two networks, dual-stack
//! workloads, service and workload waypoints (by address and by hostname, one missing), a network
//! gateway, unhealthy and zero-capacity endpoints, named ports and a host-networked workload. The
//! input chooses the proxy (its addresses, ports, HBONE port, node, network), the source workload,
//! the original destination (IPv4, IPv6, IPv4-mapped IPv6, any port including 0 and the proxy's own),
//! the accepted socket's local address, the peer and the endpoint pick. Checks:
//!
//! - `canonical` turns exactly the IPv4-mapped addresses into IPv4 and keeps the port;
//! - `check_redirect` refuses exactly the destinations that are the local address or one of the
//!   proxy's own listeners (compared in canonical form, so a mapped address is its IPv4 address),
//!   and otherwise returns the canonical destination; a failed `SO_ORIGINAL_DST` is reported as such;
//! - `route_outbound` is deterministic, answers the same for a destination and its mapped form,
//!   refuses the proxy's own listeners as a loop, never sends a connection to one of them (a plain TCP
//!   destination, or the authority an HBONE tunnel delivers to) and never opens HBONE to one of them
//!   other than the HBONE listener (such routes are refused as loops, which the same decision by a
//!   proxy without addresses of its own confirms); and each route is what its documentation promises (endpoints of
//!   a service are its healthy endpoints in the source's network, HBONE goes to the workload's IP at
//!   the proxy's HBONE port, identities start with the workload's and have no repeats, ...);
//! - nothing panics.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshwire_dataplane::proxy::{NotRedirected, canonical, check_redirect};
use meshwire_dataplane::state::{DEFAULT_PROXY_PORTS, LocalProxy, OutboundRoute, Refusal, State};
use meshwire_dataplane::xds::{GatewayDestination, HealthStatus, Protocol, Workload};
use meshwire_tests::fixtures;

const EXAMPLE: &str = include_str!("../../dataplane/examples/localhost.yaml");

/// Laid over the shared routing mesh (`meshwire_tests::fixtures::MESH`) so that every branch of the
/// routing decision is reachable: workloads and services at the proxy's own addresses and ports, a
/// network gateway for the far endpoint, zero-capacity endpoints, a waypoint whose HBONE port is
/// mapped, a dual-stack pod waypoint, waypoints by hostname and on the proxy's own listener, an
/// IPv6-only endpoint, and a service whose SANs repeat an endpoint's identity.
const MESH_OVERLAY: &str = r#"
workloads:
- name: local
  workloadIps: [127.0.0.1, "::1"]
  protocol: HBONE
  node: node1
  services:
    "default/self.example": {80: 15001, 443: 15008}
- name: local-tcp
  workloadIps: [127.0.0.2]
  protocol: TCP
  node: node1
  services:
    "default/self.example": {80: 15006}
- name: server-far
  network: far
  workloadIps: [10.0.1.4]
  protocol: HBONE
  networkGateway: {destination: "far/10.0.200.1", hboneMtlsPort: 15009}
  services:
    "default/server.example": {}
- name: zero-a
  workloadIps: [10.0.6.1]
  protocol: HBONE
  capacity: 0
  services:
    "default/zero.example": {}
- name: zero-b
  workloadIps: [10.0.6.2]
  protocol: TCP
  capacity: 0
  services:
    "default/zero.example": {}
- name: waypoint
  serviceAccount: waypoint
  workloadIps: [10.0.3.1]
  protocol: HBONE
  services:
    "default/waypoint.default.svc.cluster.local": {15008: 15018}
- name: waypoint-pod
  serviceAccount: waypoint-pod
  workloadIps: [10.0.4.3, "fd00::4:3"]
  protocol: HBONE
- name: behind-hostname-waypoint
  workloadIps: [10.0.4.5]
  protocol: HBONE
  waypoint: {destination: "default/waypoint.default.svc.cluster.local"}
- name: behind-local-waypoint
  workloadIps: [10.0.4.6]
  protocol: HBONE
  waypoint: {destination: "/127.0.0.2", hboneMtlsPort: 15001}
- name: v6-only
  workloadIps: ["fd00::5:2"]
  protocol: TCP
  services:
    "default/dual.example": {}
services:
- hostname: server.example
  vips: [/10.0.10.1, far/10.0.10.1]
  ports: {80: 8080, 8443: 8443}
  subjectAltNames: [spiffe://cluster.local/ns/default/sa/extra, spiffe://cluster.local/ns/default/sa/server]
- hostname: zero.example
  vips: [/10.0.10.7]
  ports: {80: 8080}
- hostname: self.example
  vips: [/10.0.10.8, "/fd00::10:8"]
  ports: {80: 8080, 443: 443, 15001: 15001}
"#;

struct Fixture {
    state: State,
    /// Every address the configuration names, and the usual special ones.
    ips: Vec<IpAddr>,
}

fn fixtures() -> &'static [Fixture; 2] {
    static FIXTURES: OnceLock<[Fixture; 2]> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let mesh = fixtures::overlay(fixtures::config(fixtures::MESH), fixtures::config(MESH_OVERLAY));
        [fixtures::config(EXAMPLE), mesh].map(|config| {
            let state = State::new(config);
            let mut ips: Vec<IpAddr> = vec![
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::UNSPECIFIED.into(),
                Ipv6Addr::LOCALHOST.into(),
                Ipv6Addr::UNSPECIFIED.into(),
                Ipv4Addr::new(192, 0, 2, 1).into(),
            ];
            for workload in state.workloads() {
                ips.extend(&workload.workload_ips);
            }
            for service in state.services() {
                ips.extend(service.vips.iter().map(|vip| vip.address));
            }
            ips.sort();
            ips.dedup();
            Fixture { state, ips }
        })
    })
}

const PORTS: &[u16] = &[
    80, 443, 8080, 8443, 9090, 22, 0, 15001, 15006, 15008, 15009, 15018, 15080, 15000, 65535,
];

#[derive(Debug, Arbitrary)]
enum IpIn {
    Pool(u8),
    Any(IpAddr),
}

#[derive(Debug, Arbitrary)]
enum PortIn {
    Pool(u8),
    /// One of the proxy's own ports.
    Own(u8),
    Any(u16),
}

#[derive(Debug, Arbitrary)]
struct AddrIn {
    ip: IpIn,
    port: PortIn,
    /// Written as an IPv4-mapped IPv6 address, if IPv4.
    mapped: bool,
}

#[derive(Debug, Arbitrary)]
enum LocalIn {
    /// The listener the connection was accepted on: an own address (or 0.0.0.0) and an own port.
    Listener(u8, u8),
    Addr(AddrIn),
}

#[derive(Debug, Arbitrary)]
struct ProxyIn {
    addresses: Vec<IpIn>,
    /// `None`: the default ports.
    ports: Option<Vec<PortIn>>,
    hbone_port: Option<PortIn>,
    node: Option<u8>,
    far: bool,
}

#[derive(Debug, Arbitrary)]
enum SourceIn {
    Workload(u8),
    /// The workload with this IP in the proxy's network, else the first.
    Peer(IpIn),
}

#[derive(Debug, Arbitrary)]
struct Input {
    mesh: bool,
    proxy: ProxyIn,
    source: SourceIn,
    original: Option<AddrIn>,
    local: LocalIn,
    peer: SocketAddr,
    pick: u64,
}

fn mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    }
}

struct Ctx<'a> {
    fixture: &'a Fixture,
    proxy: &'a LocalProxy,
}

impl Ctx<'_> {
    fn ip(&self, ip: &IpIn) -> IpAddr {
        match ip {
            IpIn::Pool(i) => self.fixture.ips[usize::from(*i) % self.fixture.ips.len()],
            IpIn::Any(ip) => *ip,
        }
    }

    fn port(&self, port: &PortIn) -> u16 {
        match port {
            PortIn::Pool(i) => PORTS[usize::from(*i) % PORTS.len()],
            PortIn::Own(i) if !self.proxy.ports.is_empty() => {
                self.proxy.ports[usize::from(*i) % self.proxy.ports.len()]
            }
            PortIn::Own(i) => DEFAULT_PROXY_PORTS[usize::from(*i) % DEFAULT_PROXY_PORTS.len()],
            PortIn::Any(p) => *p,
        }
    }

    fn addr(&self, addr: &AddrIn) -> SocketAddr {
        let ip = self.ip(&addr.ip);
        SocketAddr::new(if addr.mapped { mapped(ip) } else { ip }, self.port(&addr.port))
    }

    /// Whether `addr` is one of the proxy's own listeners, IPv4-mapped addresses being their IPv4
    /// address.
    fn own(&self, addr: SocketAddr) -> bool {
        self.proxy.ports.contains(&addr.port())
            && self
                .proxy
                .addresses
                .iter()
                .any(|own| own.to_canonical() == addr.ip().to_canonical())
    }
}

fn build_proxy(input: &ProxyIn, fixture: &Fixture) -> LocalProxy {
    // Ports first, so that `PortIn::Own` of the HBONE port sees them.
    let scratch = LocalProxy::new();
    let ctx = Ctx {
        fixture,
        proxy: &scratch,
    };
    let mut proxy = LocalProxy::new().with_addresses(input.addresses.iter().take(4).map(|ip| ctx.ip(ip)));
    if let Some(ports) = &input.ports {
        proxy = proxy.with_ports(ports.iter().take(10).map(|p| ctx.port(p)));
    }
    let ctx = Ctx { fixture, proxy: &proxy };
    let hbone_port = input.hbone_port.as_ref().map(|p| ctx.port(p));
    if let Some(port) = hbone_port {
        proxy = proxy.with_hbone_port(port);
    }
    if let Some(node) = input.node {
        proxy = proxy.with_node(["node1", "node2", "local", "elsewhere"][usize::from(node) % 4]);
    }
    if input.far {
        proxy = proxy.with_network("far");
    }
    proxy
}

fn check_canonical(addr: SocketAddr) {
    let c = canonical(addr);
    assert_eq!(c.port(), addr.port());
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => assert_eq!(c.ip(), IpAddr::V4(v4)),
            None => assert_eq!(c.ip(), addr.ip()),
        },
        IpAddr::V4(_) => assert_eq!(c, addr),
    }
    assert_eq!(canonical(c), c);
}

fn check_redirects(ctx: &Ctx<'_>, original: Option<SocketAddr>, local: SocketAddr, peer: SocketAddr) {
    let result = check_redirect(
        "outbound",
        original.ok_or_else(|| io::Error::from_raw_os_error(2)),
        local,
        peer,
        ctx.proxy,
    );
    let Some(original) = original else {
        assert!(
            matches!(result, Err(NotRedirected::NoOriginalDestination { peer: p, .. }) if p == peer),
            "{result:?}"
        );
        return;
    };
    let dst = canonical(original);
    let refused = dst == canonical(local) || ctx.own(dst);
    match &result {
        Ok(got) => {
            assert!(!refused, "{original} accepted on {local} by {:?}", ctx.proxy);
            assert_eq!(*got, dst);
        }
        Err(NotRedirected::OwnListener { dst: got, peer: p, .. }) => {
            assert!(refused, "{original} refused on {local} by {:?}", ctx.proxy);
            assert_eq!((*got, *p), (dst, peer));
            assert!(result.as_ref().unwrap_err().to_string().contains("not redirected"));
        }
        Err(other) => panic!("{original} on {local}: {other:?}"),
    }
    // The mapped and the plain form of the destination and of the local address are the same.
    let again = check_redirect(
        "outbound",
        Ok(SocketAddr::new(mapped(original.ip()), original.port())),
        SocketAddr::new(mapped(local.ip()), local.port()),
        peer,
        ctx.proxy,
    );
    assert_eq!(again.ok(), result.ok());
}

/// One routing decision, against what the documentation of `State::route_outbound` promises.
fn check_route(ctx: &Ctx<'_>, source: &Workload, dst: SocketAddr, pick: u64) {
    let state = &ctx.fixture.state;
    let route = state.route_outbound(ctx.proxy, source, dst, pick);
    assert_eq!(
        route,
        state.route_outbound(ctx.proxy, source, dst, pick),
        "deterministic"
    );
    let canonical_dst = canonical(dst);
    if canonical_dst != dst {
        assert_eq!(
            route,
            state.route_outbound(ctx.proxy, source, canonical_dst, pick),
            "{dst} and {canonical_dst} route alike"
        );
    }
    let dst = canonical_dst;
    let _ = route.to_string();

    if ctx.own(dst) {
        assert_eq!(
            route,
            OutboundRoute::Refused {
                dst,
                reason: Refusal::Loop
            },
            "{dst} is the proxy's own listener"
        );
        return;
    }
    let vip_service = state.service_by_vip(&source.network, dst.ip());
    let dst_workload = state.workload_by_ip(&source.network, dst.ip());
    match &route {
        OutboundRoute::Hbone {
            endpoint,
            authority,
            expected_identities,
            service,
            workload,
        } => {
            let chosen = state.workload_by_uid(workload).expect("the chosen workload exists");
            assert_eq!(chosen.protocol, Protocol::Hbone);
            assert_eq!(*endpoint, SocketAddr::new(authority.ip(), ctx.proxy.hbone_port));
            assert!(chosen.workload_ips.contains(&authority.ip()));
            assert!(
                !ctx.own(*authority),
                "HBONE delivers {dst} to the proxy's own {authority}"
            );
            assert!(!ctx.own(*endpoint) || endpoint.port() == ctx.proxy.hbone_port);
            assert_eq!(&expected_identities[0], chosen.spiffe_id());
            check_identities(expected_identities);
            match service {
                Some(key) => {
                    let s = vip_service.expect("a service route is for a VIP");
                    assert_eq!(&s.key(), key);
                    check_endpoint(source, chosen, key);
                    assert!(s.ports.contains_key(&dst.port()));
                }
                None => {
                    assert!(vip_service.is_none());
                    assert_eq!(dst_workload.map(|w| &w.uid), Some(workload));
                    assert_eq!(*authority, dst);
                }
            }
        }
        OutboundRoute::Waypoint {
            endpoint,
            authority,
            expected_identities,
            service,
            waypoint,
        } => {
            let chosen = state.workload_by_uid(waypoint).expect("the waypoint exists");
            assert_eq!(*authority, dst);
            assert!(chosen.workload_ips.contains(&endpoint.ip()));
            assert!(
                !ctx.own(*endpoint) || endpoint.port() == ctx.proxy.hbone_port,
                "the waypoint route opens HBONE to the proxy's own {endpoint}"
            );
            assert_eq!(&expected_identities[0], chosen.spiffe_id());
            check_identities(expected_identities);
            let gateway = match service {
                Some(key) => {
                    let s = vip_service.expect("a service route is for a VIP");
                    assert_eq!(&s.key(), key);
                    s.waypoint.as_ref().expect("the service has a waypoint")
                }
                None => {
                    assert!(vip_service.is_none());
                    dst_workload
                        .and_then(|w| w.waypoint.as_ref())
                        .expect("the workload has a waypoint")
                }
            };
            // The source is not the waypoint itself.
            assert_ne!(&source.uid, waypoint);
            if let GatewayDestination::Address(address) = &gateway.destination
                && state.service_by_vip(&address.network, address.address).is_none()
            {
                assert_eq!(*endpoint, SocketAddr::new(address.address, gateway.hbone_mtls_port));
            }
        }
        OutboundRoute::Passthrough {
            dst: to,
            service,
            workload,
        } => {
            assert!(!ctx.own(*to), "plain TCP from {dst} to the proxy's own {to}");
            match (service, workload) {
                (Some(key), Some(uid)) => {
                    let s = vip_service.expect("a service route is for a VIP");
                    assert_eq!(&s.key(), key);
                    let chosen = state.workload_by_uid(uid).expect("the chosen workload exists");
                    assert_eq!(chosen.protocol, Protocol::Tcp);
                    assert!(chosen.workload_ips.contains(&to.ip()));
                    check_endpoint(source, chosen, key);
                }
                (None, Some(uid)) => {
                    assert!(vip_service.is_none());
                    let w = dst_workload.expect("a workload route is for a workload IP");
                    assert_eq!(&w.uid, uid);
                    assert_eq!(w.protocol, Protocol::Tcp);
                    assert_eq!(*to, dst);
                }
                (None, None) => {
                    assert!(vip_service.is_none() && dst_workload.is_none(), "{dst} is known");
                    assert_eq!(*to, dst);
                }
                (Some(_), None) => panic!("a service route without a workload: {route:?}"),
            }
        }
        OutboundRoute::Refused { dst: refused, reason } => {
            assert_eq!(*refused, dst);
            match reason {
                Refusal::Loop => {
                    // The next hop is the proxy's own: the same decision by a proxy without
                    // addresses of its own leads into one of this proxy's listeners.
                    let open = ctx.proxy.clone().with_addresses([]);
                    let unchecked = state.route_outbound(&open, source, dst, pick);
                    let into_proxy = match &unchecked {
                        OutboundRoute::Hbone { authority, .. } => ctx.own(*authority),
                        OutboundRoute::DoubleHbone { gateway, .. } => ctx.own(*gateway),
                        OutboundRoute::Passthrough { dst: to, .. } => ctx.own(*to),
                        OutboundRoute::Waypoint { endpoint, .. } => {
                            ctx.own(*endpoint) && endpoint.port() != ctx.proxy.hbone_port
                        }
                        _ => false,
                    };
                    assert!(into_proxy, "{dst} refused as a loop, yet it leads to {unchecked:?}");
                }
                Refusal::UnknownPort { service, port } => {
                    let s = vip_service.expect("a service refusal is for a VIP");
                    assert_eq!((&s.key(), *port), (service, dst.port()));
                    assert!(!s.ports.contains_key(port));
                }
                Refusal::NoEndpoint { service, port } => {
                    let s = vip_service.expect("a service refusal is for a VIP");
                    assert_eq!((&s.key(), *port), (service, dst.port()));
                    assert!(s.ports.contains_key(port));
                }
                Refusal::NoNetworkGateway { service, port, network } => {
                    let s = vip_service.expect("a service refusal is for a VIP");
                    assert_eq!((&s.key(), *port), (service, dst.port()));
                    assert_ne!(network, &source.network);
                }
                Refusal::UnknownNetworkGateway { .. } => {
                    assert!(vip_service.is_some(), "only a service crosses networks");
                }
                Refusal::NoWaypoint { .. } => {
                    assert!(
                        vip_service.is_some_and(|s| s.waypoint.is_some())
                            || dst_workload.is_some_and(|w| w.waypoint.is_some())
                    );
                }
                other => panic!("a refusal this target does not know: {other:?}"),
            }
        }
        OutboundRoute::DoubleHbone {
            gateway,
            gateway_identities,
            expected_endpoint,
            expected_identities,
            service,
            port,
            workload,
            network,
        } => {
            // Only a service crosses networks, to a healthy HBONE endpoint of another network that
            // has a gateway, and only when no endpoint of the source's network serves the port.
            let s = vip_service.expect("a service route is for a VIP");
            assert_eq!(&s.key(), service);
            assert_eq!(*port, dst.port());
            let chosen = state.workload_by_uid(workload).expect("the chosen workload exists");
            assert_eq!(chosen.protocol, Protocol::Hbone);
            assert_eq!(chosen.status, HealthStatus::Healthy);
            assert_ne!(chosen.network, source.network);
            assert_eq!(&chosen.network, network);
            assert!(chosen.network_gateway.is_some());
            assert!(chosen.services.contains_key(service));
            assert!(chosen.workload_ips.contains(&expected_endpoint.ip()));
            assert!(!ctx.own(*gateway), "double HBONE through the proxy's own {gateway}");
            // The gateway may route to any endpoint behind it: the chosen one is among them.
            assert!(expected_identities.contains(chosen.spiffe_id()));
            check_identities(expected_identities);
            assert!(!gateway_identities.is_empty());
            check_identities(gateway_identities);
        }
        other => panic!("a route this target does not know: {other:?}"),
    }
}

/// A service endpoint is healthy, in the source's network and names the service.
fn check_endpoint(source: &Workload, chosen: &Workload, key: &meshwire_dataplane::xds::NamespacedHostname) {
    assert_eq!(chosen.status, HealthStatus::Healthy);
    assert_eq!(chosen.network, source.network);
    assert!(chosen.services.contains_key(key));
}

fn check_identities(ids: &[meshwire_identity::id::SpiffeId]) {
    for (i, id) in ids.iter().enumerate() {
        assert!(!ids[..i].contains(id), "{id} repeats in {ids:?}");
    }
}

fuzz_target!(|input: Input| {
    let fixture = &fixtures()[usize::from(input.mesh)];
    let proxy = build_proxy(&input.proxy, fixture);
    let ctx = Ctx { fixture, proxy: &proxy };
    let workloads: Vec<&Workload> = fixture.state.workloads().collect();
    let source = match &input.source {
        SourceIn::Workload(i) => workloads[usize::from(*i) % workloads.len()],
        SourceIn::Peer(ip) => fixture
            .state
            .workload_by_ip(&proxy.network, ctx.ip(ip).to_canonical())
            .unwrap_or(workloads[0]),
    };
    let original = input.original.as_ref().map(|a| ctx.addr(a));
    let local = match &input.local {
        LocalIn::Listener(a, p) => {
            let ip = if proxy.addresses.is_empty() {
                IpAddr::from(Ipv4Addr::UNSPECIFIED)
            } else {
                proxy.addresses[usize::from(*a) % proxy.addresses.len()]
            };
            SocketAddr::new(ip, ctx.port(&PortIn::Own(*p)))
        }
        LocalIn::Addr(a) => ctx.addr(a),
    };

    for addr in [original, Some(local), Some(input.peer)].into_iter().flatten() {
        check_canonical(addr);
    }
    check_redirects(&ctx, original, local, input.peer);
    if let Some(original) = original {
        check_route(&ctx, source, original, input.pick);
    }
});
