//! istiod's delta xDS resources turned into the proxy's configuration (`meshwire_dataplane::istio`):
//! the same mesh written as a local file and sent as protos gives the same configuration, routing,
//! verdicts and `/config_dump`; partial NACKs, removals, fail-closed handling of rejected policies
//! and shared addresses.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use meshwire_control::proto::envoy::service::discovery::v3::Resource;
use meshwire_control::proto::istio::security::{self as ps, string_match::MatchType};
use meshwire_control::proto::istio::workload::{self as pw, address, gateway_address};
use meshwire_dataplane::admin::config_dump;
use meshwire_dataplane::istio::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Rejected, XdsConfig};
use meshwire_dataplane::rbac::{Connection, PolicySet, WorkloadRef};
use meshwire_dataplane::state::{LocalProxy, State};
use meshwire_dataplane::watch::Snapshot;
use meshwire_dataplane::xds::LocalConfig;
use meshwire_identity::id::SpiffeId;
use prost::Message;

// ---------------------------------------------------------------------------------------------
// The mesh, as a local file

const MESH: &str = r#"
workloads:
- uid: Kubernetes//Pod/shop/frontend-1
  name: frontend-1
  namespace: shop
  serviceAccount: frontend
  workloadIps: [10.1.0.1]
  protocol: HBONE
  node: node1
  workloadType: deployment
  workloadName: frontend
  canonicalName: frontend-app
  canonicalRevision: v1
  locality: {region: r1, zone: z1, subzone: s1}
- uid: Kubernetes//Pod/shop/cart-1
  name: cart-1
  namespace: shop
  serviceAccount: cart
  trustDomain: td.example
  workloadIps: [10.1.0.2, "fd00::1:2"]
  protocol: HBONE
  node: node2
  workloadType: pod
  services:
    "shop/cart.shop.svc.cluster.local": {80: 8080, 443: 8443}
  authorizationPolicies: [shop/cart-only-frontend]
  capacity: 2
- uid: Kubernetes//Pod/shop/cart-2
  name: cart-2
  namespace: shop
  serviceAccount: cart
  trustDomain: td.example
  workloadIps: [10.1.0.4]
  protocol: HBONE
  node: node2
  status: Unhealthy
  services:
    "shop/cart.shop.svc.cluster.local": {80: 8080, 443: 8443}
  authorizationPolicies: [shop/cart-only-frontend]
  clusterId: cluster-2
- uid: Kubernetes//Pod/legacy/db-1
  name: db-1
  namespace: legacy
  workloadIps: [10.2.0.1]
  protocol: TCP
  node: node1
  workloadType: job
  services:
    "legacy/db.legacy.svc.cluster.local": {5432: 5432}
- uid: Kubernetes//Pod/shop/waypoint-1
  name: waypoint-1
  namespace: shop
  serviceAccount: waypoint
  workloadIps: [10.1.0.9]
  protocol: HBONE
  workloadType: cronjob
  services:
    "shop/waypoint.shop.svc.cluster.local": {15008: 15008}
- uid: Kubernetes//Pod/shop/payments-1
  name: payments-1
  namespace: shop
  serviceAccount: payments
  workloadIps: [10.1.0.3]
  protocol: HBONE
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local"}
  services:
    "shop/payments.shop.svc.cluster.local": {80: 9090}
- uid: Kubernetes//Pod/shop/remote-1
  name: remote-1
  namespace: shop
  serviceAccount: cart
  trustDomain: td.example
  network: remote
  workloadIps: [10.1.0.1]
  protocol: HBONE
  networkGateway: {destination: "remote/10.9.0.1", hboneMtlsPort: 15009}
  services:
    "shop/cart.shop.svc.cluster.local": {}
- uid: Kubernetes//Pod/kube-system/node-agent
  name: node-agent
  namespace: kube-system
  networkMode: HostNetwork
  workloadIps: [10.0.0.1]
  protocol: TCP
  hostname: agent.example
  nativeTunnel: true
  applicationTunnel: {protocol: PROXY, port: 15088}
services:
- name: cart
  namespace: shop
  hostname: cart.shop.svc.cluster.local
  vips: [/10.96.0.1, "/fd00::96:1", remote/10.96.0.1]
  ports: {80: 8080, 443: 8443}
  subjectAltNames: [spiffe://td.example/ns/shop/sa/cart-canary]
- name: db
  namespace: legacy
  hostname: db.legacy.svc.cluster.local
  vips: [/10.96.0.2]
  ports: {5432: 5432}
- name: waypoint
  namespace: shop
  hostname: waypoint.shop.svc.cluster.local
  vips: [/10.96.0.9]
  ports: {15008: 15008}
- name: payments
  namespace: shop
  hostname: payments.shop.svc.cluster.local
  vips: [/10.96.0.3]
  ports: {80: 0}
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local", hboneMtlsPort: 15008}
policies:
- name: cart-only-frontend
  namespace: shop
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/shop/sa/frontend]
    - - destinationPorts: [8080, 8443]
- name: deny-legacy
  namespace: shop
  scope: Namespace
  action: Deny
  rules:
  - - - namespaces: [!Exact legacy]
  - - - sourceIps: [10.2.0.0/16]
        notSourceIps: [10.2.0.1/32]
- name: deny-plaintext-9000
  namespace: istio-system
  scope: Global
  action: Deny
  rules:
  - - - notPrincipals: [!Presence []]
        destinationPorts: [9000]
- name: audit-shop
  namespace: shop
  scope: Namespace
  action: Deny
  dryRun: true
  rules:
  - - - principals: [!Prefix cluster.local/ns/shop/]
- name: allow-legacy
  namespace: legacy
  scope: Namespace
  action: Allow
  rules:
  - - - serviceAccounts: [{namespace: shop, serviceAccount: cart}]
        notNamespaces: [!Suffix -test]
      - sourceIps: ["fd00::/16"]
  - - - destinationIps: [10.2.0.0/24]
        notDestinationIps: [10.2.0.9/32]
        notServiceAccounts: [{namespace: shop, serviceAccount: frontend}]
        notDestinationPorts: [22]
- name: locked
  namespace: kube-system
  scope: Namespace
  action: Allow
"#;

// ---------------------------------------------------------------------------------------------
// The same mesh, as istiod sends it

fn ip(s: &str) -> Vec<u8> {
    match s.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn ports(pairs: &[(u32, u32)]) -> Vec<pw::Port> {
    pairs
        .iter()
        .map(|(service_port, target_port)| pw::Port {
            service_port: *service_port,
            target_port: *target_port,
            app_protocol: 0,
        })
        .collect()
}

fn port_list(key: &str, pairs: &[(u32, u32)]) -> HashMap<String, pw::PortList> {
    HashMap::from([(s(key), pw::PortList { ports: ports(pairs) })])
}

fn host_gateway(namespace: &str, hostname: &str, port: u32) -> pw::GatewayAddress {
    pw::GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(pw::NamespacedHostname {
            namespace: s(namespace),
            hostname: s(hostname),
        })),
        hbone_mtls_port: port,
    }
}

fn vip(network: &str, addr: &str) -> pw::NetworkAddress {
    pw::NetworkAddress {
        network: s(network),
        address: ip(addr),
        length: None,
    }
}

const POD: i32 = pw::WorkloadType::Pod as i32;
const HBONE: i32 = pw::TunnelProtocol::Hbone as i32;

fn proto_workloads() -> Vec<pw::Workload> {
    let cart_ports = || port_list("shop/cart.shop.svc.cluster.local", &[(80, 8080), (443, 8443)]);
    vec![
        pw::Workload {
            uid: s("Kubernetes//Pod/shop/frontend-1"),
            name: s("frontend-1"),
            namespace: s("shop"),
            service_account: s("frontend"),
            addresses: vec![ip("10.1.0.1")],
            tunnel_protocol: HBONE,
            node: s("node1"),
            workload_type: pw::WorkloadType::Deployment as i32,
            workload_name: s("frontend"),
            canonical_name: s("frontend-app"),
            canonical_revision: s("v1"),
            cluster_id: s("Kubernetes"),
            locality: Some(pw::Locality {
                region: s("r1"),
                zone: s("z1"),
                subzone: s("s1"),
            }),
            ..Default::default()
        },
        pw::Workload {
            uid: s("Kubernetes//Pod/shop/cart-1"),
            name: s("cart-1"),
            namespace: s("shop"),
            service_account: s("cart"),
            trust_domain: s("td.example"),
            addresses: vec![ip("10.1.0.2"), ip("fd00::1:2")],
            tunnel_protocol: HBONE,
            node: s("node2"),
            workload_type: POD,
            services: cart_ports(),
            authorization_policies: vec![s("shop/cart-only-frontend")],
            capacity: Some(2),
            ..Default::default()
        },
        pw::Workload {
            uid: s("Kubernetes//Pod/shop/cart-2"),
            name: s("cart-2"),
            namespace: s("shop"),
            service_account: s("cart"),
            trust_domain: s("td.example"),
            addresses: vec![ip("10.1.0.4")],
            tunnel_protocol: HBONE,
            node: s("node2"),
            workload_type: POD,
            status: pw::WorkloadStatus::Unhealthy as i32,
            services: cart_ports(),
            authorization_policies: vec![s("shop/cart-only-frontend")],
            cluster_id: s("cluster-2"),
            ..Default::default()
        },
        pw::Workload {
            uid: s("Kubernetes//Pod/legacy/db-1"),
            name: s("db-1"),
            namespace: s("legacy"),
            addresses: vec![ip("10.2.0.1")],
            tunnel_protocol: pw::TunnelProtocol::None as i32,
            node: s("node1"),
            workload_type: pw::WorkloadType::Job as i32,
            services: port_list("legacy/db.legacy.svc.cluster.local", &[(5432, 5432)]),
            ..Default::default()
        },
        pw::Workload {
            uid: s("Kubernetes//Pod/shop/waypoint-1"),
            name: s("waypoint-1"),
            namespace: s("shop"),
            service_account: s("waypoint"),
            addresses: vec![ip("10.1.0.9")],
            tunnel_protocol: HBONE,
            workload_type: pw::WorkloadType::Cronjob as i32,
            services: port_list("shop/waypoint.shop.svc.cluster.local", &[(15008, 15008)]),
            ..Default::default()
        },
        pw::Workload {
            uid: s("Kubernetes//Pod/shop/payments-1"),
            name: s("payments-1"),
            namespace: s("shop"),
            service_account: s("payments"),
            addresses: vec![ip("10.1.0.3")],
            tunnel_protocol: HBONE,
            workload_type: POD,
            // Port 0: istiod leaves the HBONE port out; the default applies.
            waypoint: Some(host_gateway("shop", "waypoint.shop.svc.cluster.local", 0)),
            services: port_list("shop/payments.shop.svc.cluster.local", &[(80, 9090)]),
            ..Default::default()
        },
        pw::Workload {
            uid: s("Kubernetes//Pod/shop/remote-1"),
            name: s("remote-1"),
            namespace: s("shop"),
            service_account: s("cart"),
            trust_domain: s("td.example"),
            network: s("remote"),
            addresses: vec![ip("10.1.0.1")],
            tunnel_protocol: HBONE,
            workload_type: POD,
            network_gateway: Some(pw::GatewayAddress {
                destination: Some(gateway_address::Destination::Address(vip("remote", "10.9.0.1"))),
                hbone_mtls_port: 15009,
            }),
            services: port_list("shop/cart.shop.svc.cluster.local", &[]),
            ..Default::default()
        },
        pw::Workload {
            uid: s("Kubernetes//Pod/kube-system/node-agent"),
            name: s("node-agent"),
            namespace: s("kube-system"),
            network_mode: pw::NetworkMode::HostNetwork as i32,
            addresses: vec![ip("10.0.0.1")],
            workload_type: POD,
            hostname: s("agent.example"),
            native_tunnel: true,
            application_tunnel: Some(pw::ApplicationTunnel {
                protocol: pw::application_tunnel::Protocol::Proxy as i32,
                port: 15088,
            }),
            ..Default::default()
        },
    ]
}

fn proto_services() -> Vec<pw::Service> {
    vec![
        pw::Service {
            name: s("cart"),
            namespace: s("shop"),
            hostname: s("cart.shop.svc.cluster.local"),
            addresses: vec![vip("", "10.96.0.1"), vip("", "fd00::96:1"), vip("remote", "10.96.0.1")],
            ports: ports(&[(80, 8080), (443, 8443)]),
            subject_alt_names: vec![s("spiffe://td.example/ns/shop/sa/cart-canary")],
            ..Default::default()
        },
        pw::Service {
            name: s("db"),
            namespace: s("legacy"),
            hostname: s("db.legacy.svc.cluster.local"),
            addresses: vec![vip("", "10.96.0.2")],
            ports: ports(&[(5432, 5432)]),
            ..Default::default()
        },
        pw::Service {
            name: s("waypoint"),
            namespace: s("shop"),
            hostname: s("waypoint.shop.svc.cluster.local"),
            addresses: vec![vip("", "10.96.0.9")],
            ports: ports(&[(15008, 15008)]),
            ..Default::default()
        },
        pw::Service {
            name: s("payments"),
            namespace: s("shop"),
            hostname: s("payments.shop.svc.cluster.local"),
            addresses: vec![vip("", "10.96.0.3")],
            ports: ports(&[(80, 0)]),
            waypoint: Some(host_gateway("shop", "waypoint.shop.svc.cluster.local", 15008)),
            ..Default::default()
        },
    ]
}

fn exact(v: &str) -> ps::StringMatch {
    ps::StringMatch {
        match_type: Some(MatchType::Exact(s(v))),
    }
}

fn net(addr: &str, length: u32) -> ps::Address {
    ps::Address {
        address: ip(addr),
        length,
    }
}

fn rule(clauses: Vec<Vec<ps::Match>>) -> ps::Rule {
    ps::Rule {
        clauses: clauses.into_iter().map(|matches| ps::Clause { matches }).collect(),
    }
}

fn policy(
    namespace: &str,
    name: &str,
    scope: ps::Scope,
    action: ps::Action,
    rules: Vec<ps::Rule>,
) -> ps::Authorization {
    ps::Authorization {
        name: s(name),
        namespace: s(namespace),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
        extensions: vec![],
    }
}

fn proto_policies() -> Vec<ps::Authorization> {
    let sa = |namespace: &str, service_account: &str| ps::ServiceAccountMatch {
        namespace: s(namespace),
        service_account: s(service_account),
    };
    let mut audit = policy(
        "shop",
        "audit-shop",
        ps::Scope::Namespace,
        ps::Action::Deny,
        vec![rule(vec![vec![ps::Match {
            principals: vec![ps::StringMatch {
                match_type: Some(MatchType::Prefix(s("cluster.local/ns/shop/"))),
            }],
            ..Default::default()
        }]])],
    );
    audit.dry_run = true;
    vec![
        policy(
            "shop",
            "cart-only-frontend",
            ps::Scope::WorkloadSelector,
            ps::Action::Allow,
            vec![rule(vec![
                vec![ps::Match {
                    principals: vec![exact("cluster.local/ns/shop/sa/frontend")],
                    ..Default::default()
                }],
                vec![ps::Match {
                    destination_ports: vec![8080, 8443],
                    ..Default::default()
                }],
            ])],
        ),
        policy(
            "shop",
            "deny-legacy",
            ps::Scope::Namespace,
            ps::Action::Deny,
            vec![
                rule(vec![vec![ps::Match {
                    namespaces: vec![exact("legacy")],
                    ..Default::default()
                }]]),
                rule(vec![vec![ps::Match {
                    source_ips: vec![net("10.2.0.0", 16)],
                    not_source_ips: vec![net("10.2.0.1", 32)],
                    ..Default::default()
                }]]),
            ],
        ),
        policy(
            "istio-system",
            "deny-plaintext-9000",
            ps::Scope::Global,
            ps::Action::Deny,
            vec![rule(vec![vec![ps::Match {
                not_principals: vec![ps::StringMatch {
                    match_type: Some(MatchType::Presence(())),
                }],
                destination_ports: vec![9000],
                ..Default::default()
            }]])],
        ),
        audit,
        policy(
            "legacy",
            "allow-legacy",
            ps::Scope::Namespace,
            ps::Action::Allow,
            vec![
                rule(vec![vec![
                    ps::Match {
                        service_accounts: vec![sa("shop", "cart")],
                        not_namespaces: vec![ps::StringMatch {
                            match_type: Some(MatchType::Suffix(s("-test"))),
                        }],
                        ..Default::default()
                    },
                    ps::Match {
                        source_ips: vec![net("fd00::", 16)],
                        ..Default::default()
                    },
                ]]),
                rule(vec![vec![ps::Match {
                    destination_ips: vec![net("10.2.0.0", 24)],
                    not_destination_ips: vec![net("10.2.0.9", 32)],
                    not_service_accounts: vec![sa("shop", "frontend")],
                    not_destination_ports: vec![22],
                    ..Default::default()
                }]]),
            ],
        ),
        policy("kube-system", "locked", ps::Scope::Namespace, ps::Action::Allow, vec![]),
    ]
}

// ---------------------------------------------------------------------------------------------
// Resources

fn any(type_url: &str, value: Vec<u8>) -> Option<prost_types::Any> {
    Some(prost_types::Any {
        type_url: s(type_url),
        value,
    })
}

fn workload_resource(w: &pw::Workload) -> Resource {
    let address = pw::Address {
        r#type: Some(address::Type::Workload(w.clone())),
    };
    Resource {
        name: w.uid.clone(),
        version: s("v1"),
        resource: any(ADDRESS_TYPE_URL, address.encode_to_vec()),
        ..Default::default()
    }
}

fn service_resource(svc: &pw::Service) -> Resource {
    let address = pw::Address {
        r#type: Some(address::Type::Service(svc.clone())),
    };
    Resource {
        name: format!("{}/{}", svc.namespace, svc.hostname),
        version: s("v1"),
        resource: any(ADDRESS_TYPE_URL, address.encode_to_vec()),
        ..Default::default()
    }
}

fn policy_resource(p: &ps::Authorization) -> Resource {
    named_policy_resource(&format!("{}/{}", p.namespace, p.name), p)
}

fn named_policy_resource(name: &str, p: &ps::Authorization) -> Resource {
    Resource {
        name: s(name),
        version: s("v1"),
        resource: any(AUTHORIZATION_TYPE_URL, p.encode_to_vec()),
        ..Default::default()
    }
}

/// The mesh, pushed in one response per type.
fn pushed_mesh() -> XdsConfig {
    let mut config = XdsConfig::new();
    let mut addresses: Vec<Resource> = proto_workloads().iter().map(workload_resource).collect();
    addresses.extend(proto_services().iter().map(service_resource));
    assert_eq!(config.apply(ADDRESS_TYPE_URL, addresses, vec![]), vec![]);
    let policies = proto_policies().iter().map(policy_resource).collect();
    assert_eq!(config.apply(AUTHORIZATION_TYPE_URL, policies, vec![]), vec![]);
    config
}

/// The local file's configuration in the store's order.
fn sorted(mut config: LocalConfig) -> LocalConfig {
    config.workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    config.services.sort_by_key(|s| s.key().to_string());
    config.policies.sort_by_key(|p| p.key());
    config
}

fn file_mesh() -> LocalConfig {
    sorted(LocalConfig::parse(MESH).unwrap())
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// Every verdict over a grid of connections to every workload, printed.
fn verdicts(config: &LocalConfig) -> Vec<String> {
    let set = PolicySet::new(config.policies.iter().cloned());
    let ids = [
        None,
        Some(id("spiffe://cluster.local/ns/shop/sa/frontend")),
        Some(id("spiffe://td.example/ns/shop/sa/cart")),
        Some(id("spiffe://cluster.local/ns/legacy/sa/default")),
        Some(id("spiffe://cluster.local/ns/shop-test/sa/cart")),
        Some(id("spiffe://example.org/other")),
    ];
    let sources: [IpAddr; 4] = [
        "10.1.0.1".parse().unwrap(),
        "10.2.0.1".parse().unwrap(),
        "10.2.0.7".parse().unwrap(),
        "fd00::7".parse().unwrap(),
    ];
    let mut out = Vec::new();
    for w in &config.workloads {
        let workload = WorkloadRef::new(w.namespace(), &w.authorization_policies);
        let dst_ips = w.workload_ips.iter().copied().chain(["10.2.0.9".parse().unwrap()]);
        for dst_ip in dst_ips {
            for port in [22, 5432, 8080, 8443, 9000] {
                for src_identity in &ids {
                    for src in sources {
                        let conn = Connection {
                            src_identity: src_identity.as_ref(),
                            src: SocketAddr::new(src, 40000),
                            dst: SocketAddr::new(dst_ip, port),
                        };
                        let verdict = set.evaluate(&workload, &conn);
                        out.push(format!("{} {conn}: {verdict:?}", w.uid));
                    }
                }
            }
        }
    }
    out
}

/// Every routing decision and lookup over a grid of sources and destinations, printed.
fn routes(state: &State) -> Vec<String> {
    let mut out = Vec::new();
    let proxy = LocalProxy::default();
    let dsts: Vec<IpAddr> = [
        "10.1.0.1",
        "10.1.0.2",
        "10.1.0.3",
        "10.1.0.4",
        "10.1.0.9",
        "10.2.0.1",
        "10.0.0.1",
        "10.96.0.1",
        "10.96.0.2",
        "10.96.0.3",
        "10.96.0.9",
        "fd00::96:1",
        "fd00::1:2",
        "192.168.9.9",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    for src in state.workloads() {
        for dst_ip in &dsts {
            for port in [80, 443, 5432, 8080, 15008] {
                for pick in 0..4 {
                    let dst = SocketAddr::new(*dst_ip, port);
                    let route = state.route_outbound(&proxy, src, dst, pick);
                    out.push(format!("{} -> {dst} #{pick}: {route:?}", src.uid));
                }
            }
        }
    }
    for network in ["", "remote"] {
        for dst_ip in &dsts {
            out.push(format!(
                "{network}/{dst_ip}: {:?} {:?}",
                state.workload_by_ip(network, *dst_ip).map(|w| &w.uid),
                state.service_by_vip(network, *dst_ip).map(|s| s.key()),
            ));
        }
    }
    for dst_ip in &dsts {
        out.push(format!(
            "inbound {dst_ip}: {:?}",
            state.inbound_workload(&proxy, *dst_ip).map(|w| &w.uid)
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// (a) one mesh, two sources

#[test]
fn the_same_mesh_from_a_file_and_from_istiod_is_the_same_configuration() {
    let from_file = file_mesh();
    let from_xds = pushed_mesh().to_local_config();
    assert_eq!(from_xds.workloads.len(), 8);
    assert_eq!(from_xds.services.len(), 4);
    assert_eq!(from_xds.policies.len(), 6);
    for (file, xds) in from_file.workloads.iter().zip(&from_xds.workloads) {
        assert_eq!(file, xds, "workload {}", file.uid);
    }
    for (file, xds) in from_file.services.iter().zip(&from_xds.services) {
        assert_eq!(file, xds, "service {}", file.key());
    }
    for (file, xds) in from_file.policies.iter().zip(&from_xds.policies) {
        assert_eq!(file, xds, "policy {}", file.key());
    }
    assert_eq!(from_file, from_xds);
}

#[test]
fn the_same_mesh_routes_and_authorizes_the_same() {
    let from_file = file_mesh();
    let from_xds = pushed_mesh().to_local_config();

    let file_routes = routes(&State::new(from_file.clone()));
    let xds_routes = routes(&State::new(from_xds.clone()));
    assert_eq!(file_routes.len(), xds_routes.len());
    for (file, xds) in file_routes.iter().zip(&xds_routes) {
        assert_eq!(file, xds);
    }
    // The grid sees HBONE, passthrough and waypoint routes.
    let all = file_routes.join("\n");
    for kind in ["Hbone {", "Passthrough {", "Waypoint {", "Refused {"] {
        assert!(all.contains(kind), "no {kind} route in the grid");
    }

    let file_verdicts = verdicts(&from_file);
    let xds_verdicts = verdicts(&from_xds);
    assert_eq!(file_verdicts.len(), xds_verdicts.len());
    for (file, xds) in file_verdicts.iter().zip(&xds_verdicts) {
        assert_eq!(file, xds);
    }
    // The grid sees allowed, denied and dry-run outcomes.
    let all = file_verdicts.join("\n");
    for outcome in ["decision: Allow", "ExplicitlyDenied", "NotAllowed", "matched: true"] {
        assert!(all.contains(outcome), "no {outcome} in the grid");
    }
}

#[test]
fn the_same_mesh_dumps_the_same() {
    let loaded = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let now = Instant::now();
    let file = Snapshot::new(file_mesh(), 3, None, loaded);
    let xds = Snapshot::new(pushed_mesh().to_local_config(), 3, None, loaded);
    let file_dump = config_dump(&file, &[], now, loaded);
    let xds_dump = config_dump(&xds, &[], now, loaded);
    assert_eq!(file_dump, xds_dump);
    assert_eq!(xds_dump["workloads"].as_array().unwrap().len(), 8);
    assert_eq!(xds_dump["policies"].as_array().unwrap().len(), 6);
}

// ---------------------------------------------------------------------------------------------
// (b) partial NACK, (c) removal

#[test]
fn one_bad_workload_is_rejected_and_the_others_apply() {
    let workloads = proto_workloads();
    let mut bad = workloads[1].clone();
    bad.addresses.push(vec![1, 2, 3, 4, 5]);
    let resources = vec![
        workload_resource(&workloads[0]),
        workload_resource(&bad),
        workload_resource(&workloads[3]),
    ];
    let mut config = XdsConfig::new();
    assert!(!config.received(ADDRESS_TYPE_URL));
    let rejected = config.apply(ADDRESS_TYPE_URL, resources, vec![]);
    assert_eq!(
        rejected,
        vec![Rejected {
            name: s("Kubernetes//Pod/shop/cart-1"),
            reason: s("addresses[2]: 5 bytes is not an IPv4 or IPv6 address"),
        }]
    );
    assert!(config.received(ADDRESS_TYPE_URL));
    assert!(!config.received(AUTHORIZATION_TYPE_URL));
    let uids: Vec<_> = config.to_local_config().workloads.into_iter().map(|w| w.uid).collect();
    assert_eq!(uids, ["Kubernetes//Pod/legacy/db-1", "Kubernetes//Pod/shop/frontend-1"]);
    assert_eq!(
        meshwire_dataplane::istio::nack_message(&rejected).unwrap(),
        "Kubernetes//Pod/shop/cart-1: addresses[2]: 5 bytes is not an IPv4 or IPv6 address"
    );

    // A payload of the wrong type, no payload, a name that is not the uid, garbage bytes.
    let mut wrong_type = workload_resource(&workloads[4]);
    wrong_type.resource.as_mut().unwrap().type_url = s(AUTHORIZATION_TYPE_URL);
    let mut empty = workload_resource(&workloads[5]);
    empty.resource = None;
    let mut renamed = workload_resource(&workloads[6]);
    renamed.name = s("Kubernetes//Pod/shop/someone-else");
    let garbage = Resource {
        name: s("garbage"),
        resource: any(ADDRESS_TYPE_URL, vec![0xff, 0xff, 0xff]),
        ..Default::default()
    };
    let rejected = config.apply(ADDRESS_TYPE_URL, vec![wrong_type, empty, renamed, garbage], vec![]);
    let names: Vec<_> = rejected.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/shop/waypoint-1",
            "Kubernetes//Pod/shop/payments-1",
            "Kubernetes//Pod/shop/someone-else",
            "garbage"
        ]
    );
    assert!(rejected[0].reason.contains("expected"), "{}", rejected[0].reason);
    assert!(
        rejected[2].reason.contains("does not match the workload uid"),
        "{}",
        rejected[2].reason
    );
    assert_eq!(config.to_local_config().workloads.len(), 2);
}

#[test]
fn a_rejected_workload_keeps_its_previous_version() {
    let mut config = pushed_mesh();
    let mut bad = proto_workloads()[0].clone();
    bad.tunnel_protocol = 42;
    bad.node = s("elsewhere");
    let rejected = config.apply(ADDRESS_TYPE_URL, vec![workload_resource(&bad)], vec![]);
    assert_eq!(rejected[0].reason, "tunnel_protocol: unknown value 42");
    assert_eq!(config.to_local_config(), file_mesh());
}

#[test]
fn removed_resources_are_dropped() {
    let mut config = pushed_mesh();
    let rejected = config.apply(
        ADDRESS_TYPE_URL,
        vec![],
        vec![
            s("Kubernetes//Pod/shop/cart-2"),
            s("legacy/db.legacy.svc.cluster.local"),
            s("unknown"),
        ],
    );
    assert!(rejected.is_empty());
    let rejected = config.apply(AUTHORIZATION_TYPE_URL, vec![], vec![s("shop/deny-legacy")]);
    assert!(rejected.is_empty());
    let config = config.to_local_config();
    let mut expected = file_mesh();
    expected.workloads.retain(|w| w.uid != "Kubernetes//Pod/shop/cart-2");
    expected.services.retain(|s| s.name != "db");
    expected.policies.retain(|p| p.name != "deny-legacy");
    assert_eq!(config, expected);
}

// ---------------------------------------------------------------------------------------------
// (d) rejected policies fail closed

fn find<'a>(config: &'a LocalConfig, uid: &str) -> &'a meshwire_dataplane::xds::Workload {
    config.workloads.iter().find(|w| w.uid == uid).unwrap()
}

fn allowed(config: &LocalConfig, uid: &str, src_identity: Option<&SpiffeId>, src: &str, port: u16) -> bool {
    let set = PolicySet::new(config.policies.iter().cloned());
    let w = find(config, uid);
    let conn = Connection {
        src_identity,
        src: SocketAddr::new(src.parse().unwrap(), 40000),
        dst: SocketAddr::new(w.workload_ips[0], port),
    };
    set.evaluate(&WorkloadRef::new(w.namespace(), &w.authorization_policies), &conn)
        .is_allowed()
}

const FRONTEND: &str = "Kubernetes//Pod/shop/frontend-1";
const DB: &str = "Kubernetes//Pod/legacy/db-1";

#[test]
fn a_rejected_policy_keeps_its_previous_version() {
    let mut config = pushed_mesh();
    let legacy = id("spiffe://cluster.local/ns/legacy/sa/default");
    assert!(!allowed(
        &config.to_local_config(),
        FRONTEND,
        Some(&legacy),
        "10.1.0.7",
        8080
    ));

    let mut broken = proto_policies()[1].clone();
    assert_eq!(broken.name, "deny-legacy");
    broken.action = 7;
    broken.rules.clear();
    let rejected = config.apply(AUTHORIZATION_TYPE_URL, vec![policy_resource(&broken)], vec![]);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].name, "shop/deny-legacy");
    assert_eq!(
        rejected[0].reason,
        "action: unknown value 7 (the previous version stays in force)"
    );
    let now = config.to_local_config();
    assert_eq!(now, file_mesh());
    assert!(!allowed(&now, FRONTEND, Some(&legacy), "10.1.0.7", 8080));
    assert_eq!(config.placeholders().count(), 0);
}

#[test]
fn a_rejected_new_deny_policy_denies_in_its_scope() {
    let mut config = pushed_mesh();
    let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
    let before = config.to_local_config();
    assert!(allowed(&before, FRONTEND, Some(&frontend), "10.1.0.7", 8080));
    let cart = id("spiffe://td.example/ns/shop/sa/cart");
    assert!(allowed(&before, DB, Some(&cart), "10.1.0.7", 5432));

    // A DENY of port 22 only, with an address of 3 bytes.
    let bad = policy(
        "shop",
        "deny-ssh",
        ps::Scope::Namespace,
        ps::Action::Deny,
        vec![rule(vec![vec![ps::Match {
            destination_ports: vec![22],
            source_ips: vec![ps::Address {
                address: vec![10, 0, 0],
                length: 8,
            }],
            ..Default::default()
        }]])],
    );
    let rejected = config.apply(AUTHORIZATION_TYPE_URL, vec![policy_resource(&bad)], vec![]);
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0]
            .reason
            .starts_with("rules[0].clauses[0].matches[0].source_ips[0].address: 3 bytes"),
        "{}",
        rejected[0].reason
    );
    assert!(
        rejected[0].reason.contains("DENY placeholder"),
        "{}",
        rejected[0].reason
    );
    let after = config.to_local_config();
    // Everything to the namespace `shop` is denied; `legacy` is out of its scope.
    assert!(!allowed(&after, FRONTEND, Some(&frontend), "10.1.0.7", 8080));
    assert!(allowed(&after, DB, Some(&cart), "10.1.0.7", 5432));
    assert_eq!(
        config.placeholders().map(|(name, _)| name).collect::<Vec<_>>(),
        ["shop/deny-ssh"]
    );

    // A valid version replaces the placeholder; removing the name removes it.
    let mut fixed = bad.clone();
    fixed.rules[0].clauses[0].matches[0].source_ips.clear();
    assert!(
        config
            .apply(AUTHORIZATION_TYPE_URL, vec![policy_resource(&fixed)], vec![])
            .is_empty()
    );
    assert!(allowed(
        &config.to_local_config(),
        FRONTEND,
        Some(&frontend),
        "10.1.0.7",
        8080
    ));
    assert!(!allowed(
        &config.to_local_config(),
        FRONTEND,
        Some(&frontend),
        "10.1.0.7",
        22
    ));
    assert!(
        config
            .apply(AUTHORIZATION_TYPE_URL, vec![], vec![s("shop/deny-ssh")])
            .is_empty()
    );
    assert_eq!(config.to_local_config(), file_mesh());
}

#[test]
fn an_unknown_action_never_allows_more() {
    let base = pushed_mesh();
    let base_verdicts = verdicts(&base.to_local_config());
    // Unknown actions, scopes, extensions, undecodable bytes, a mismatched name: each alone.
    // (what, resource, whether the grid must see new denials: a workload-selector placeholder
    // applies to the workloads that select it, and none of the grid's does).
    let mut cases: Vec<(&str, Resource, bool)> = Vec::new();
    for (scope, action) in [(0, 7), (1, 7), (2, 7), (9, 0), (9, 1), (1, -1)] {
        let mut p = policy("shop", "new", ps::Scope::Global, ps::Action::Allow, vec![]);
        p.scope = scope;
        p.action = action;
        cases.push(("unknown enum", policy_resource(&p), scope != 2));
    }
    let mut with_extension = policy("shop", "new", ps::Scope::Namespace, ps::Action::Allow, vec![]);
    with_extension.extensions.push(pw::Extension {
        name: s("future"),
        config: None,
    });
    cases.push(("extension", policy_resource(&with_extension), true));
    cases.push((
        "garbage",
        Resource {
            name: s("legacy/new"),
            resource: any(AUTHORIZATION_TYPE_URL, vec![0x0a, 0xff]),
            ..Default::default()
        },
        true,
    ));
    let other = policy("shop", "other", ps::Scope::WorkloadSelector, ps::Action::Deny, vec![]);
    cases.push(("mismatched name", named_policy_resource("shop/new", &other), true));

    for (what, resource, expect_more) in cases {
        let mut config = base.clone();
        let name = resource.name.clone();
        let rejected = config.apply(AUTHORIZATION_TYPE_URL, vec![resource], vec![]);
        assert_eq!(rejected.len(), 1, "{what}");
        assert_eq!(rejected[0].name, name);
        let after = config.to_local_config();
        assert_eq!(
            after.policies.len(),
            base.to_local_config().policies.len() + 1,
            "{what}"
        );
        let after_verdicts = verdicts(&after);
        let mut denied_more = false;
        for (before, after) in base_verdicts.iter().zip(&after_verdicts) {
            let was_denied = !before.contains("decision: Allow");
            let is_denied = !after.contains("decision: Allow");
            assert!(!was_denied || is_denied, "{what}: allowed more:\n{before}\n{after}");
            denied_more |= is_denied && !was_denied;
        }
        assert_eq!(denied_more, expect_more, "{what} ({name}): new denials");
    }
}

#[test]
fn a_mismatched_name_never_replaces_another_policy() {
    let mut config = pushed_mesh();
    // Sent under `shop/impostor`, the content of an ALLOW-everything `shop/deny-legacy`.
    let impostor = policy(
        "shop",
        "deny-legacy",
        ps::Scope::Namespace,
        ps::Action::Allow,
        vec![rule(vec![])],
    );
    let rejected = config.apply(
        AUTHORIZATION_TYPE_URL,
        vec![named_policy_resource("shop/impostor", &impostor)],
        vec![],
    );
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].reason.contains("does not match"), "{}", rejected[0].reason);
    let after = config.to_local_config();
    let keys: Vec<_> = after.policies.iter().map(|p| p.key()).collect();
    assert!(keys.contains(&s("shop/deny-legacy")));
    assert!(keys.contains(&s("shop//shop/impostor")), "{keys:?}");
    let original = file_mesh()
        .policies
        .into_iter()
        .find(|p| p.name == "deny-legacy")
        .unwrap();
    let set = PolicySet::new(after.policies.iter().cloned());
    assert_eq!(set.get("shop/deny-legacy"), Some(&original));
    let legacy = id("spiffe://cluster.local/ns/legacy/sa/default");
    assert!(!allowed(&after, FRONTEND, Some(&legacy), "10.1.0.7", 8080));
}

// ---------------------------------------------------------------------------------------------
// (e) shared addresses

fn simple_workload(uid: &str, name: &str, addr: &str, protocol: i32) -> pw::Workload {
    pw::Workload {
        uid: s(uid),
        name: s(name),
        namespace: s("shop"),
        addresses: vec![ip(addr)],
        tunnel_protocol: protocol,
        workload_type: POD,
        ..Default::default()
    }
}

fn owner(config: &XdsConfig, addr: &str) -> Option<String> {
    State::new(config.to_local_config())
        .workload_by_ip("", addr.parse().unwrap())
        .map(|w| w.uid.clone())
}

/// No address twice in one network: what the local file's validator requires.
fn assert_unique_addresses(config: &LocalConfig) {
    let mut seen = std::collections::HashSet::new();
    for w in &config.workloads {
        if w.network_mode != meshwire_dataplane::xds::NetworkMode::HostNetwork {
            for ip in &w.workload_ips {
                assert!(seen.insert((w.network.clone(), *ip)), "{ip} twice");
            }
        }
    }
    let mut vips = std::collections::HashSet::new();
    for s in &config.services {
        for vip in &s.vips {
            assert!(vips.insert(vip.clone()), "{vip} twice");
        }
    }
}

#[test]
fn shared_workload_ips_are_resolved_as_ztunnel_does() {
    let pod = simple_workload("c1//Pod/shop/pod", "pod", "10.5.0.1", HBONE);
    let entry = simple_workload("c1/networking.istio.io/WorkloadEntry/shop/we", "we", "10.5.0.1", HBONE);
    let pod_tcp = simple_workload("c1//Pod/shop/pod-tcp", "pod-tcp", "10.5.0.1", 0);
    let host = pw::Workload {
        network_mode: pw::NetworkMode::HostNetwork as i32,
        ..simple_workload("c1//Pod/shop/host", "host", "10.5.0.1", HBONE)
    };
    let mut config = XdsConfig::new();
    let push = |config: &mut XdsConfig, w: &pw::Workload| {
        assert!(
            config
                .apply(ADDRESS_TYPE_URL, vec![workload_resource(w)], vec![])
                .is_empty()
        );
        assert_unique_addresses(&config.to_local_config());
    };
    push(&mut config, &pod_tcp);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/pod-tcp"));
    // A pod before a WorkloadEntry, even one pushed later and in HBONE.
    push(&mut config, &entry);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/pod-tcp"));
    // An HBONE pod before a TCP pod.
    push(&mut config, &pod);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/pod"));
    push(&mut config, &pod_tcp);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/pod"));
    // Host-networked workloads are not indexed and keep their IP.
    push(&mut config, &host);
    let local = config.to_local_config();
    assert_eq!(find(&local, "c1//Pod/shop/host").workload_ips.len(), 1);
    // The losers keep everything but the address.
    let loser = find(&local, "c1/networking.istio.io/WorkloadEntry/shop/we");
    assert!(loser.workload_ips.is_empty());
    assert_eq!(loser.name, "we");

    // Between equals, the one updated last.
    let twin = simple_workload("c1//Pod/shop/twin", "twin", "10.5.0.1", HBONE);
    push(&mut config, &twin);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/twin"));
    push(&mut config, &pod);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/pod"));
    // The winner removed: the next in rank takes the address.
    config.apply(ADDRESS_TYPE_URL, vec![], vec![s("c1//Pod/shop/pod")]);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/twin"));
    config.apply(ADDRESS_TYPE_URL, vec![], vec![s("c1//Pod/shop/twin")]);
    assert_eq!(owner(&config, "10.5.0.1").as_deref(), Some("c1//Pod/shop/pod-tcp"));
}

#[test]
fn shared_vips_go_to_the_service_updated_last() {
    let a = pw::Service {
        name: s("a"),
        namespace: s("shop"),
        hostname: s("a.example"),
        addresses: vec![vip("", "10.96.5.1"), vip("", "10.96.5.2"), vip("", "10.96.5.2")],
        ports: ports(&[(80, 8080)]),
        ..Default::default()
    };
    let b = pw::Service {
        name: s("b"),
        hostname: s("b.example"),
        addresses: vec![vip("", "10.96.5.1")],
        ..a.clone()
    };
    let mut config = XdsConfig::new();
    assert!(
        config
            .apply(
                ADDRESS_TYPE_URL,
                vec![service_resource(&a), service_resource(&b)],
                vec![]
            )
            .is_empty()
    );
    let local = config.to_local_config();
    assert_unique_addresses(&local);
    let state = State::new(local);
    let by_vip = |ip: &str| {
        state
            .service_by_vip("", ip.parse().unwrap())
            .map(|s| s.hostname.clone())
    };
    assert_eq!(by_vip("10.96.5.1").as_deref(), Some("b.example"));
    assert_eq!(by_vip("10.96.5.2").as_deref(), Some("a.example"));
    assert!(
        config
            .apply(ADDRESS_TYPE_URL, vec![service_resource(&a)], vec![])
            .is_empty()
    );
    let state = State::new(config.to_local_config());
    assert_eq!(
        state
            .service_by_vip("", "10.96.5.1".parse().unwrap())
            .map(|s| s.hostname.clone())
            .as_deref(),
        Some("a.example")
    );
}

#[test]
fn versions_and_unknown_types() {
    let mut config = pushed_mesh();
    assert_eq!(config.versions(ADDRESS_TYPE_URL).len(), 12);
    assert_eq!(config.versions(AUTHORIZATION_TYPE_URL).len(), 6);
    let rejected = config.apply(
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        vec![Resource {
            name: s("c"),
            ..Default::default()
        }],
        vec![s("shop/deny-legacy")],
    );
    assert_eq!(rejected.len(), 1);
    assert_eq!(config.to_local_config(), file_mesh());
}

// ---------------------------------------------------------------------------------------------
// Seeds of the fuzz target `xds_resources`

/// Writes the seed corpus of the fuzz target `fuzz/fuzz_targets/xds_resources.rs`: real pushes
/// framed as the target reads them (`[selector][u16 length][DeltaDiscoveryResponse]`). Run with
/// `cargo test -p meshwire-dataplane --test istio_xds write_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus/xds_resources/"]
fn write_fuzz_seeds() {
    use meshwire_control::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

    fn frame(out: &mut Vec<u8>, selector: u8, type_url: &str, resources: Vec<Resource>, removed: &[&str]) {
        let response = DeltaDiscoveryResponse {
            type_url: s(type_url),
            resources,
            removed_resources: removed.iter().map(|n| s(n)).collect(),
            nonce: s("1"),
            ..Default::default()
        };
        let bytes = response.encode_to_vec();
        let len = u16::try_from(bytes.len()).expect("a seed frame under 64 KiB");
        out.push(selector);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    const BASELINE: &str = "istio-system/baseline-deny";
    let baseline = |action: i32, port: u32| {
        let mut p = policy(
            "istio-system",
            "baseline-deny",
            ps::Scope::Global,
            ps::Action::Deny,
            vec![rule(vec![vec![ps::Match {
                destination_ports: vec![port],
                ..Default::default()
            }]])],
        );
        p.action = action;
        p
    };
    let addresses = || {
        let mut all: Vec<Resource> = proto_workloads().iter().map(workload_resource).collect();
        all.extend(proto_services().iter().map(service_resource));
        all
    };
    let policies = || proto_policies().iter().map(policy_resource).collect::<Vec<_>>();
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut mesh = Vec::new();
    frame(&mut mesh, 0, ADDRESS_TYPE_URL, addresses(), &[]);
    frame(&mut mesh, 1, AUTHORIZATION_TYPE_URL, policies(), &[]);
    seeds.push(("mesh", mesh));

    let mut nack = Vec::new();
    let mut bad = proto_workloads()[1].clone();
    bad.addresses.push(vec![1, 2, 3, 4, 5]);
    let mut bad_service = proto_services()[0].clone();
    bad_service.subject_alt_names.push(s("not a spiffe id"));
    frame(
        &mut nack,
        0,
        ADDRESS_TYPE_URL,
        vec![
            workload_resource(&proto_workloads()[0]),
            workload_resource(&bad),
            service_resource(&bad_service),
            workload_resource(&proto_workloads()[3]),
        ],
        &[],
    );
    frame(
        &mut nack,
        0,
        ADDRESS_TYPE_URL,
        vec![],
        &["Kubernetes//Pod/shop/frontend-1"],
    );
    seeds.push(("partial-nack", nack));

    let mut baseline_attacks = Vec::new();
    let mut unknown = baseline(7, 6666);
    unknown.rules.clear();
    frame(
        &mut baseline_attacks,
        1,
        AUTHORIZATION_TYPE_URL,
        vec![policy_resource(&unknown)],
        &[],
    );
    let impostor = policy(
        "istio-system",
        "baseline-deny",
        ps::Scope::Global,
        ps::Action::Allow,
        vec![],
    );
    frame(
        &mut baseline_attacks,
        1,
        AUTHORIZATION_TYPE_URL,
        vec![named_policy_resource("istio-system/other", &impostor)],
        &[],
    );
    frame(
        &mut baseline_attacks,
        1,
        AUTHORIZATION_TYPE_URL,
        vec![Resource {
            name: s(BASELINE),
            resource: any(AUTHORIZATION_TYPE_URL, vec![0x0a, 0xff]),
            ..Default::default()
        }],
        &[],
    );
    frame(&mut baseline_attacks, 0, ADDRESS_TYPE_URL, vec![], &[BASELINE]);
    frame(
        &mut baseline_attacks,
        2,
        "type.googleapis.com/unknown",
        vec![],
        &[BASELINE],
    );
    seeds.push(("baseline-attacks", baseline_attacks));

    let mut replaced = Vec::new();
    frame(
        &mut replaced,
        1,
        AUTHORIZATION_TYPE_URL,
        vec![policy_resource(&baseline(1, 7777))],
        &[],
    );
    frame(&mut replaced, 1, AUTHORIZATION_TYPE_URL, vec![], &[BASELINE]);
    seeds.push(("baseline-replaced-then-removed", replaced));

    let mut placeholders = Vec::new();
    let mut ext = policy("shop", "ext", ps::Scope::Namespace, ps::Action::Allow, vec![]);
    ext.extensions.push(pw::Extension {
        name: s("future"),
        config: None,
    });
    let mut scope = policy("shop", "scope", ps::Scope::Global, ps::Action::Deny, vec![]);
    scope.scope = 9;
    frame(&mut placeholders, 1, AUTHORIZATION_TYPE_URL, policies(), &[]);
    frame(
        &mut placeholders,
        1,
        AUTHORIZATION_TYPE_URL,
        vec![
            policy_resource(&ext),
            policy_resource(&scope),
            named_policy_resource("shop/a/b", &ext),
            named_policy_resource("", &ext),
        ],
        &["shop/deny-legacy"],
    );
    seeds.push(("placeholders", placeholders));

    let mut shared = Vec::new();
    let pod = pw::Workload {
        uid: s("c1//Pod/shop/pod"),
        name: s("pod"),
        namespace: s("shop"),
        addresses: vec![ip("10.1.0.1")],
        tunnel_protocol: HBONE,
        ..Default::default()
    };
    let entry = pw::Workload {
        uid: s("c1/networking.istio.io/WorkloadEntry/shop/we"),
        name: s("we"),
        tunnel_protocol: 0,
        ..pod.clone()
    };
    let mut dup_vip = proto_services()[1].clone();
    dup_vip.addresses = proto_services()[0].addresses.clone();
    frame(&mut shared, 0, ADDRESS_TYPE_URL, addresses(), &[]);
    frame(
        &mut shared,
        0,
        ADDRESS_TYPE_URL,
        vec![
            workload_resource(&pod),
            workload_resource(&entry),
            service_resource(&dup_vip),
        ],
        &[],
    );
    frame(
        &mut shared,
        0,
        ADDRESS_TYPE_URL,
        vec![],
        &["c1//Pod/shop/pod", "shop/cart.shop.svc.cluster.local"],
    );
    seeds.push(("shared-addresses", shared));

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/xds_resources");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental updates: the state a proxy keeps updating push after push is the state a rebuild of
// the whole configuration gives.

mod incremental {
    use super::*;
    use meshwire_dataplane::xds::NamespacedHostname;
    use proptest::prelude::*;

    /// One change in a push, over small pools of names and addresses so that pushes collide:
    /// shared IPs and VIPs, names moving between workloads, endpoints coming and going.
    #[derive(Debug, Clone)]
    enum Op {
        Workload {
            uid: u8,
            name: u8,
            ips: Vec<u8>,
            network: u8,
            hbone: bool,
            services: Vec<u8>,
            healthy: bool,
            host_network: bool,
        },
        RemoveWorkload(u8),
        Service {
            key: u8,
            vips: Vec<u8>,
        },
        RemoveService(u8),
        Policy {
            name: u8,
            deny: bool,
            garbled: bool,
        },
        RemovePolicy(u8),
    }

    /// Even uids are pods (they win a shared IP over the others).
    fn uid(n: u8) -> String {
        if n.is_multiple_of(2) {
            format!("c1//Pod/ns/w{n}")
        } else {
            format!("c1//WorkloadEntry/ns/w{n}")
        }
    }

    fn service_key(n: u8) -> String {
        format!("ns/svc{n}.ns.svc.cluster.local")
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (
                0u8..6,
                0u8..3,
                prop::collection::vec(0u8..4, 0..3),
                0u8..2,
                prop::bool::ANY,
                prop::collection::vec(0u8..3, 0..3),
                prop::bool::weighted(0.8),
                prop::bool::weighted(0.1),
            )
                .prop_map(|(uid, name, ips, network, hbone, services, healthy, host_network)| Op::Workload {
                    uid,
                    name,
                    ips,
                    network,
                    hbone,
                    services,
                    healthy,
                    host_network,
                }),
            1 => (0u8..6).prop_map(Op::RemoveWorkload),
            2 => (0u8..3, prop::collection::vec(0u8..3, 0..3)).prop_map(|(key, vips)| Op::Service { key, vips }),
            1 => (0u8..3).prop_map(Op::RemoveService),
            1 => (0u8..2, prop::bool::ANY, prop::bool::weighted(0.2))
                .prop_map(|(name, deny, garbled)| Op::Policy { name, deny, garbled }),
            1 => (0u8..2).prop_map(Op::RemovePolicy),
        ]
    }

    fn workload(op: &Op) -> Resource {
        let Op::Workload {
            uid: n,
            name,
            ips,
            network,
            hbone,
            services,
            healthy,
            host_network,
        } = op
        else {
            unreachable!()
        };
        let mut services_map = HashMap::new();
        for service in services {
            services_map.insert(
                service_key(*service),
                pw::PortList {
                    ports: ports(&[(80, 8080 + u32::from(*service))]),
                },
            );
        }
        let w = pw::Workload {
            uid: uid(*n),
            name: format!("name{name}"),
            namespace: s("ns"),
            addresses: ips.iter().map(|i| ip(&format!("10.0.0.{i}"))).collect(),
            network: format!("net{network}"),
            tunnel_protocol: if *hbone { HBONE } else { 0 },
            services: services_map,
            status: if *healthy { 0 } else { 1 },
            network_mode: i32::from(*host_network),
            ..Default::default()
        };
        workload_resource(&w)
    }

    fn service(key: u8, vips: &[u8]) -> Resource {
        service_resource(&pw::Service {
            name: format!("svc{key}"),
            namespace: s("ns"),
            hostname: format!("svc{key}.ns.svc.cluster.local"),
            addresses: vips.iter().map(|v| vip("net0", &format!("10.9.0.{v}"))).collect(),
            ports: ports(&[(80, 8080)]),
            ..Default::default()
        })
    }

    fn policy_op(name: u8, deny: bool, garbled: bool) -> Resource {
        let action = if deny { ps::Action::Deny } else { ps::Action::Allow };
        let p = policy("ns", &format!("p{name}"), ps::Scope::Namespace, action, vec![]);
        let mut resource = policy_resource(&p);
        if garbled && let Some(payload) = resource.resource.as_mut() {
            payload.value = vec![0xff, 0xff];
        }
        resource
    }

    /// Everything a lookup can tell of a state, as text.
    fn observe(state: &State) -> Vec<String> {
        let mut seen = Vec::new();
        seen.extend(state.workloads().map(|w| format!("workload {w:?}")));
        seen.extend(state.services().map(|s| format!("service {s:?}")));
        seen.extend(state.policies().iter().map(|p| format!("policy {p:?}")));
        for network in ["net0", "net1", ""] {
            for i in 0..4 {
                let addr: IpAddr = format!("10.0.0.{i}").parse().unwrap();
                let holder = state.workload_by_ip(network, addr).map(|w| w.uid.clone());
                seen.push(format!("ip {network}/{addr} -> {holder:?}"));
                let vip: IpAddr = format!("10.9.0.{i}").parse().unwrap();
                let holder = state.service_by_vip(network, vip).map(|s| s.key().to_string());
                seen.push(format!("vip {network}/{vip} -> {holder:?}"));
            }
        }
        for n in 0..6 {
            let found = state.workload_by_uid(&uid(n)).map(|w| w.name.clone());
            seen.push(format!("uid {n} -> {found:?}"));
        }
        for name in 0..3 {
            let found = state
                .workload_by_name("ns", &format!("name{name}"))
                .map(|w| w.uid.clone());
            seen.push(format!("name {name} -> {found:?}"));
        }
        for key in 0..3 {
            let key = NamespacedHostname {
                namespace: s("ns"),
                hostname: format!("svc{key}.ns.svc.cluster.local"),
            };
            let members: Vec<&str> = state.workloads_of_service(&key).map(|w| w.uid.as_str()).collect();
            seen.push(format!("members {key} -> {members:?}"));
        }
        seen
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Push after push (each taken or not before the next), the state updated with each delta
        /// is the state built from scratch of the whole configuration, and so are its policies.
        #[test]
        fn an_updated_state_is_the_state_rebuilt(
            pushes in prop::collection::vec((prop::collection::vec(op(), 1..5), prop::bool::weighted(0.8)), 1..12),
        ) {
            let mut store = XdsConfig::new();
            let mut state = State::default();
            let mut policies = PolicySet::default();
            for (ops, take) in pushes {
                let mut addresses = Vec::new();
                let mut removed_addresses = Vec::new();
                let mut policy_resources = Vec::new();
                let mut removed_policies = Vec::new();
                for op in &ops {
                    match op {
                        Op::Workload { .. } => addresses.push(workload(op)),
                        Op::RemoveWorkload(n) => removed_addresses.push(uid(*n)),
                        Op::Service { key, vips } => addresses.push(service(*key, vips)),
                        Op::RemoveService(key) => removed_addresses.push(service_key(*key)),
                        Op::Policy { name, deny, garbled } => policy_resources.push(policy_op(*name, *deny, *garbled)),
                        Op::RemovePolicy(name) => removed_policies.push(format!("ns/p{name}")),
                    }
                }
                if !addresses.is_empty() || !removed_addresses.is_empty() {
                    store.apply(ADDRESS_TYPE_URL, addresses, removed_addresses);
                }
                if !policy_resources.is_empty() || !removed_policies.is_empty() {
                    store.apply(AUTHORIZATION_TYPE_URL, policy_resources, removed_policies);
                }
                if !take {
                    continue;
                }
                let delta = store.take_delta();
                if let Some(list) = delta.policies() {
                    policies = PolicySet::new(list.iter().cloned());
                }
                state = state.update(delta);
                let config = store.to_local_config();
                assert_unique_addresses(&config);
                let rebuilt_policies = PolicySet::new(config.policies.iter().cloned());
                let rebuilt = State::new(config);
                prop_assert_eq!(observe(&state), observe(&rebuilt));
                prop_assert!(policies.iter().eq(rebuilt_policies.iter()));
                // Nothing changed since: an empty delta, and the same state.
                let again = store.take_delta();
                prop_assert!(again.is_empty(), "{:?}", again);
            }
        }
    }
}
