//! Fixtures of the dataplane's tests and fuzz targets that need its types: the mesh the routing
//! decision is checked against, the value pools authorization policies and connections are drawn
//! from, a naive string match to check the evaluator against, and SOCKS5 requests as bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use meshwire_dataplane::rbac::StringMatch;
use meshwire_dataplane::socks5::Target;
use meshwire_dataplane::state::State;
use meshwire_dataplane::xds::LocalConfig;

// ---------------------------------------------------------------------------------------------
// Meshes
// ---------------------------------------------------------------------------------------------

/// A mesh for the outbound routing decision: HBONE and TCP workloads on two nodes, a service with
/// endpoints of every kind (weighted, unhealthy, in another network), services with port mappings,
/// named ports and no endpoints, service and workload waypoints (one missing, one a pod reached on
/// its own HBONE port), a dual-stack service and a host-networked workload; one policy.
pub const MESH: &str = r#"
workloads:
- name: client
  workloadIps: [10.0.0.1]
  protocol: HBONE
  node: node1
- name: server-a
  serviceAccount: server
  workloadIps: [10.0.1.1]
  protocol: HBONE
  node: node2
  capacity: 3
  services:
    "default/server.example": {80: 9090}
- name: server-b
  serviceAccount: server
  workloadIps: [10.0.1.2]
  protocol: HBONE
  node: node2
  services:
    "default/server.example": {}
- name: server-sick
  workloadIps: [10.0.1.3]
  protocol: HBONE
  status: Unhealthy
  services:
    "default/server.example": {}
- name: server-far
  network: far
  workloadIps: [10.0.1.4]
  protocol: HBONE
  services:
    "default/server.example": {}
- name: legacy
  workloadIps: [10.0.2.1]
  protocol: TCP
  services:
    "default/legacy.example": {80: 8081}
- name: named-without-port
  workloadIps: [10.0.2.2]
  protocol: HBONE
  services:
    "default/named.example": {}
- name: waypoint
  serviceAccount: waypoint
  workloadIps: [10.0.3.1]
  protocol: HBONE
  services:
    "default/waypoint.default.svc.cluster.local": {}
- name: behind-waypoint
  workloadIps: [10.0.4.1]
  protocol: HBONE
  waypoint: {destination: "/10.0.30.1"}
- name: behind-missing-waypoint
  workloadIps: [10.0.4.2]
  protocol: HBONE
  waypoint: {destination: "/10.0.99.99"}
- name: waypoint-pod
  serviceAccount: waypoint-pod
  workloadIps: [10.0.4.3]
  protocol: HBONE
- name: behind-pod-waypoint
  workloadIps: [10.0.4.4]
  protocol: TCP
  waypoint: {destination: "/10.0.4.3", hboneMtlsPort: 15009}
- name: dual-stack
  workloadIps: [10.0.5.1, "fd00::5:1"]
  protocol: HBONE
  services:
    "default/dual.example": {}
- name: host-networked
  networkMode: HostNetwork
  workloadIps: [10.0.0.1]
  protocol: HBONE
services:
- hostname: server.example
  vips: [/10.0.10.1, far/10.0.10.1]
  ports: {80: 8080, 8443: 8443}
  subjectAltNames: [spiffe://cluster.local/ns/default/sa/extra]
- hostname: legacy.example
  vips: [/10.0.10.2]
  ports: {80: 8080}
- hostname: empty.example
  vips: [/10.0.10.3]
  ports: {80: 8080}
- hostname: named.example
  vips: [/10.0.10.5]
  ports: {80: 0}
- hostname: waypoint.default.svc.cluster.local
  vips: [/10.0.30.1]
  ports: {}
- hostname: waypointed.example
  vips: [/10.0.10.4]
  ports: {80: 8080}
  waypoint: {destination: "default/waypoint.default.svc.cluster.local"}
- hostname: dual.example
  vips: [/10.0.10.6, "/fd00::10:6"]
  ports: {80: 8080}
policies:
- name: p
  namespace: default
  scope: Namespace
  action: Allow
"#;

/// A local configuration document parsed; panics naming the document's error.
pub fn config(yaml: &str) -> LocalConfig {
    LocalConfig::parse(yaml).unwrap_or_else(|e| panic!("a fixture configuration does not parse: {e}"))
}

/// The state of [`MESH`].
pub fn mesh_state() -> State {
    State::new(config(MESH))
}

/// `base` with `overlay` laid over it: a workload (a service) of `overlay` replaces the one of
/// `base` with the same name (hostname) where it stands, and is added after the others when there
/// is none; the policies of `overlay` follow those of `base`.
pub fn overlay(mut base: LocalConfig, overlay: LocalConfig) -> LocalConfig {
    for workload in overlay.workloads {
        match base.workloads.iter_mut().find(|w| w.name == workload.name) {
            Some(slot) => *slot = workload,
            None => base.workloads.push(workload),
        }
    }
    for service in overlay.services {
        match base.services.iter_mut().find(|s| s.hostname == service.hostname) {
            Some(slot) => *slot = service,
            None => base.services.push(service),
        }
    }
    base.policies.extend(overlay.policies);
    base
}

// ---------------------------------------------------------------------------------------------
// Authorization
// ---------------------------------------------------------------------------------------------

/// Namespaces policies and workloads are drawn from.
pub const NAMESPACES: &[&str] = &["a", "b", "team-a", "default"];
/// Policy names.
pub const NAMES: &[&str] = &["p1", "p2", "p3"];
/// Service accounts of service account matches.
pub const SERVICE_ACCOUNTS: &[&str] = &["x", "y", "default"];
/// Strings of string matches (namespaces, principals): prefixes, suffixes and pieces of [`IDS`].
pub const STRINGS: &[&str] = &[
    "",
    "a",
    "b",
    "team-",
    "-a",
    "t",
    "td",
    "td/",
    "td/ns/a",
    "td/ns/a/sa/x",
    "/sa/x",
    "x",
    "example.org/w",
    "cluster.local/ns/default/",
    "cluster.local/ns/a/sa/y",
];
/// Peer identities: Istio ones in the pools' namespaces, and others.
pub const IDS: &[&str] = &[
    "spiffe://td/ns/a/sa/x",
    "spiffe://td/ns/b/sa/y",
    "spiffe://td/ns/team-a/sa/x",
    "spiffe://cluster.local/ns/a/sa/y",
    "spiffe://cluster.local/ns/default/sa/default",
    "spiffe://example.org/w",
    "spiffe://example.org/ns/a/sa/x/extra",
    "spiffe://example.org",
];
/// Source and destination addresses, inside and outside [`NETS`].
pub const IPS: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
    IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1)),
    // ::ffff:10.0.0.1, matched as 10.0.0.1.
    IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001)),
];
/// Address ranges of IP matches.
pub const NETS: &[&str] = &[
    "10.0.0.0/24",
    "10.0.0.0/8",
    "10.0.0.1/32",
    "192.168.0.0/16",
    "fd00::/64",
    "fd00::/16",
    "0.0.0.0/0",
    "::/0",
    "::ffff:10.0.0.0/120",
];
/// Destination ports.
pub const PORTS: &[u16] = &[80, 443, 8080, 0];

/// Whether `m` matches `value` as the evaluator's documentation says, written naively: an absent
/// value matches nothing, presence is a non-empty value.
pub fn naive_string_match(m: &StringMatch, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    match m {
        StringMatch::Exact(s) => v == s,
        StringMatch::Prefix(s) => v.starts_with(s.as_str()),
        StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        StringMatch::Presence => !v.is_empty(),
        other => panic!("a string match the naive model does not know: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// SOCKS5
// ---------------------------------------------------------------------------------------------

/// The request of `command` (1: CONNECT) for `target` as a client sends it after the greeting
/// (RFC 1928 4): an IPv4 or IPv6 address, or a domain name (panics on one longer than 255 bytes).
pub fn socks5_request(command: u8, target: &Target) -> Vec<u8> {
    let mut request = vec![5, command, 0];
    let port = match target {
        Target::Addr(SocketAddr::V4(addr)) => {
            request.push(1);
            request.extend_from_slice(&addr.ip().octets());
            addr.port()
        }
        Target::Addr(SocketAddr::V6(addr)) => {
            request.push(4);
            request.extend_from_slice(&addr.ip().octets());
            addr.port()
        }
        Target::Domain { name, port } => {
            request.push(3);
            let len = u8::try_from(name.len()).unwrap_or_else(|_| panic!("a SOCKS5 name of {} bytes", name.len()));
            request.push(len);
            request.extend_from_slice(name.as_bytes());
            *port
        }
    };
    request.extend_from_slice(&port.to_be_bytes());
    request
}
