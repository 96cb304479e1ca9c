//! ztunnel's own local configuration files (`tests/fixtures/ztunnel/`): ztunnel's
//! `examples/localhost.yaml` as it ships, a file with every field of ztunnel's schema, Istio API fields
//! ztunnel may take on, and fields nobody knows. Each parses; the state it gives routes and
//! authorizes as the file says; unknown fields warn, naming their path and line, and change nothing;
//! a bad value of a known field is still an error naming the field and line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use meshwire_dataplane::rbac::{Connection, PolicySet, RbacAction, RbacScope, WorkloadRef};
use meshwire_dataplane::state::{LocalProxy, OutboundRoute, State};
use meshwire_dataplane::xds::{
    ConfigError, GatewayDestination, HealthStatus, LOCATED_WARNINGS, LocalConfig, NamespacedHostname, NetworkAddress,
    NetworkMode, Protocol, TunnelProtocol, Workload,
};
use meshwire_identity::id::SpiffeId;

const LOCALHOST: &str = include_str!("fixtures/ztunnel/localhost.yaml");
const EVERY_FIELD: &str = include_str!("fixtures/ztunnel/every-field.yaml");
const ISTIO_API_FIELDS: &str = include_str!("fixtures/ztunnel/istio-api-fields.yaml");
const FUTURE_FIELDS: &str = include_str!("fixtures/ztunnel/future-fields.yaml");

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> NamespacedHostname {
    s.parse().unwrap()
}

fn ports(pairs: &[(u16, u16)]) -> BTreeMap<u16, u16> {
    pairs.iter().copied().collect()
}

fn workload<'a>(state: &'a State, name: &str) -> &'a Workload {
    state.workloads().find(|w| w.name == name).expect(name)
}

/// Parses a fixture that must give no warning.
fn parse_clean(yaml: &str) -> LocalConfig {
    let (config, warnings) = LocalConfig::parse_with_warnings(yaml).unwrap_or_else(|err| panic!("{err}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    config
}

#[test]
fn every_fixture_loads_from_disk_as_it_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ztunnel");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "every-field.yaml",
            "future-fields.yaml",
            "istio-api-fields.yaml",
            "localhost.yaml"
        ]
    );
    for name in names {
        let path = dir.join(&name);
        let text = std::fs::read_to_string(&path).unwrap();
        let loaded = LocalConfig::load(&path).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(loaded, LocalConfig::parse(&text).unwrap(), "{name}");
        let (from_file, warnings) = LocalConfig::parse_file_with_warnings(&path, text.as_bytes()).unwrap();
        assert_eq!(from_file, loaded, "{name}");
        assert_eq!(warnings, LocalConfig::parse_with_warnings(&text).unwrap().1, "{name}");
    }
}

#[test]
fn ztunnels_localhost_example_parses_and_routes() {
    let config = parse_clean(LOCALHOST);
    assert_eq!(config.workloads.len(), 2);
    assert_eq!(config.services.len(), 2);
    assert_eq!(config.policies.len(), 1);
    let state = State::new(config);
    let proxy = LocalProxy::new().with_node("local").with_addresses([ip("127.0.0.1")]);
    let local = workload(&state, "local");
    assert_eq!(local.uid, "cluster1//v1/Pod/default/local");
    assert_eq!(local.protocol, Protocol::Hbone);

    // The VIP of example.com: HBONE to one of its two endpoints (both on this node, target 8080),
    // expecting the endpoint's identity, then the service's extra SAN.
    let route = state.route_outbound(&proxy, local, addr("127.10.0.1:80"), 0);
    let OutboundRoute::Hbone {
        endpoint,
        authority,
        expected_identities,
        service,
        ..
    } = &route
    else {
        panic!("expected HBONE, got {route:?}");
    };
    assert_eq!(service.as_ref(), Some(&key("default/example.com")));
    assert_eq!(authority.port(), 8080);
    assert_eq!(endpoint.port(), 15008);
    assert_eq!(
        expected_identities.last().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/local"
    );
    // The TCP workload is reached in plain TCP; example2.com's VIP is in the network `remote`, which
    // a workload of the default network does not address.
    assert!(matches!(
        state.route_outbound(&proxy, local, addr("127.0.0.2:8080"), 0),
        OutboundRoute::Passthrough { .. }
    ));
    assert!(state.service_by_vip("remote", ip("127.10.0.2")).is_some());
    assert!(state.service_by_vip("", ip("127.10.0.2")).is_none());

    // Its one policy, an ALLOW of every port but 9999 for the default namespace.
    let policies = PolicySet::new(state.policies().iter().cloned());
    let peer = SpiffeId::new("spiffe://cluster.local/ns/default/sa/local").unwrap();
    let to = |port: u16| Connection {
        src_identity: Some(&peer),
        src: addr("127.0.0.2:40000"),
        dst: SocketAddr::new(ip("127.0.0.1"), port),
    };
    let target = WorkloadRef::new(local.namespace(), &local.authorization_policies);
    assert!(policies.evaluate(&target, &to(8080)).is_allowed());
    assert!(!policies.evaluate(&target, &to(9999)).is_allowed());
}

#[test]
fn every_ztunnel_field_is_accepted_and_the_used_ones_are_kept() {
    let config = parse_clean(EVERY_FIELD);
    assert_eq!(config.workloads.len(), 10);
    assert_eq!(config.services.len(), 5);
    assert_eq!(config.policies.len(), 6);

    let cart = &config.workloads[1];
    assert_eq!(cart.uid, "cluster1//v1/Pod/shop/cart-0");
    assert_eq!(cart.spiffe_id().to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
    assert_eq!(cart.workload_ips, vec![ip("10.10.0.1"), ip("fd00::10:1")]);
    assert_eq!(cart.node, "node-a");
    assert_eq!(
        (cart.workload_name.as_str(), cart.workload_type.as_str()),
        ("cart", "deployment")
    );
    assert_eq!(
        (cart.canonical_name.as_str(), cart.canonical_revision.as_str()),
        ("cart-app", "v2")
    );
    assert_eq!(cart.cluster_id, "cluster1");
    assert_eq!(
        (
            cart.locality.region.as_str(),
            cart.locality.zone.as_str(),
            cart.locality.subzone.as_str()
        ),
        ("eu-west", "eu-west-1a", "rack-7")
    );
    assert_eq!(cart.capacity, 2);
    assert_eq!(cart.status, HealthStatus::Healthy);
    assert_eq!(cart.authorization_policies, ["shop/cart-callers"]);
    assert_eq!(
        cart.services[&key("shop/cart.shop.svc.cluster.local")],
        ports(&[(80, 8080)])
    );
    assert_eq!(config.workloads[2].status, HealthStatus::Unhealthy);
    let tunnelled = &config.workloads[3];
    assert!(tunnelled.native_tunnel);
    let tunnel = tunnelled.application_tunnel.as_ref().unwrap();
    assert_eq!((tunnel.protocol, tunnel.port), (TunnelProtocol::Proxy, Some(15088)));
    let payments = &config.workloads[4];
    let waypoint = payments.waypoint.as_ref().unwrap();
    assert_eq!(
        waypoint.destination,
        GatewayDestination::Hostname(key("shop/waypoint.shop.svc.cluster.local"))
    );
    let inventory = &config.workloads[6];
    assert_eq!(inventory.network, "west");
    assert_eq!(
        inventory.network_gateway.as_ref().unwrap().destination,
        GatewayDestination::Address(NetworkAddress::new("west", ip("10.20.0.100")))
    );
    assert_eq!(config.workloads[8].network_mode, NetworkMode::HostNetwork);
    assert_eq!(config.workloads[9].hostname, "api.example.com");

    let service = &config.services[0];
    assert_eq!(service.key(), key("shop/cart.shop.svc.cluster.local"));
    assert_eq!(
        service.vips,
        vec![
            NetworkAddress::new("", ip("10.96.0.10")),
            NetworkAddress::new("", ip("fd00::96:10"))
        ]
    );
    assert_eq!(service.ports, ports(&[(80, 8080)]));
    assert_eq!(
        service.subject_alt_names[0].to_string(),
        "spiffe://cluster.local/ns/shop/sa/cart-legacy"
    );
    assert_eq!(
        config.services[1].waypoint.as_ref().unwrap().destination,
        GatewayDestination::Address(NetworkAddress::new("", ip("10.10.0.9")))
    );

    let policy = |name: &str| config.policies.iter().find(|p| p.name == name).expect(name);
    assert_eq!(policy("deny-quarantine").scope, RbacScope::Global);
    assert_eq!(policy("deny-quarantine").action, RbacAction::Deny);
    assert_eq!(policy("cart-callers").scope, RbacScope::WorkloadSelector);
    assert!(policy("audit-plaintext").dry_run);
    assert!(!policy("shop-internal").dry_run);
}

#[test]
fn the_every_field_mesh_routes_as_written() {
    let state = State::new(parse_clean(EVERY_FIELD));
    let proxy = LocalProxy::new()
        .with_node("node-a")
        .with_addresses([ip("10.10.0.250")]);
    let frontend = workload(&state, "frontend-0");

    // cart: its healthy endpoints only (cart-1 is Unhealthy; the loadBalancer's AllowAll is not used),
    // each at its own target port, whatever the pick.
    let mut reached = Vec::new();
    for pick in 0..12 {
        let route = state.route_outbound(&proxy, frontend, addr("10.96.0.10:80"), pick);
        let OutboundRoute::Hbone {
            authority,
            expected_identities,
            service,
            ..
        } = &route
        else {
            panic!("expected HBONE, got {route:?}");
        };
        assert_eq!(service.as_ref(), Some(&key("shop/cart.shop.svc.cluster.local")));
        assert_eq!(
            expected_identities.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "spiffe://cluster.local/ns/shop/sa/cart",
                "spiffe://cluster.local/ns/shop/sa/cart-legacy"
            ]
        );
        reached.push(*authority);
    }
    reached.sort();
    reached.dedup();
    assert_eq!(reached, [addr("10.10.0.1:8080"), addr("10.10.0.4:8081")]);
    // The IPv6 VIP answers in IPv6, although `ipFamilies: IPv4` (not used).
    let route = state.route_outbound(&proxy, frontend, addr("[fd00::96:10]:80"), 0);
    assert!(
        matches!(&route, OutboundRoute::Hbone { authority, .. } if *authority == addr("[fd00::10:1]:8080")),
        "{route:?}"
    );

    // payments: through its waypoint, by the service's waypoint (an address) and by the workload's
    // (a hostname, whose service's endpoint is the same waypoint).
    for dst in ["10.96.0.20:443", "10.10.0.5:8443"] {
        let route = state.route_outbound(&proxy, frontend, addr(dst), 0);
        let OutboundRoute::Waypoint {
            endpoint, authority, ..
        } = &route
        else {
            panic!("{dst}: expected the waypoint, got {route:?}");
        };
        assert_eq!((*endpoint, *authority), (addr("10.10.0.9:15008"), addr(dst)));
    }

    // inventory: its only endpoint is in the network `west`, behind the east-west gateway.
    let route = state.route_outbound(&proxy, frontend, addr("10.96.0.30:80"), 0);
    let OutboundRoute::DoubleHbone {
        gateway,
        expected_endpoint,
        network,
        ..
    } = &route
    else {
        panic!("expected double HBONE, got {route:?}");
    };
    assert_eq!(
        (*gateway, *expected_endpoint, network.as_str()),
        (addr("10.20.0.100:15008"), addr("10.20.0.1:9080"), "west")
    );

    // The host-network workload is not looked up by its (shared) IP: plain passthrough.
    assert!(state.workload_by_ip("", ip("10.0.0.11")).is_none());
    assert!(matches!(
        state.route_outbound(&proxy, frontend, addr("10.0.0.11:10250"), 0),
        OutboundRoute::Passthrough { workload: None, .. }
    ));
}

#[test]
fn the_every_field_policies_authorize_as_written() {
    let state = State::new(parse_clean(EVERY_FIELD));
    let policies = PolicySet::new(state.policies().iter().cloned());
    let cart = workload(&state, "cart-0");
    let cart_ref = WorkloadRef::new(cart.namespace(), &cart.authorization_policies);
    let id = |ns: &str, sa: &str| SpiffeId::new(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap();
    let decide = |peer: Option<&SpiffeId>, src: &str, dst: &str| {
        let conn = Connection {
            src_identity: peer,
            src: addr(src),
            dst: addr(dst),
        };
        policies.evaluate(&cart_ref, &conn).decision.to_string()
    };
    let frontend = id("shop", "frontend");
    let checkout = id("checkout", "checkout");
    let intruder = id("shop", "intruder");
    let stranger = id("elsewhere", "stranger");

    // The frontend: by the namespace ALLOW and the selected one.
    assert_eq!(decide(Some(&frontend), "10.10.0.2:40000", "10.10.0.1:8080"), "allowed");
    // checkout: another namespace, allowed by the selected policy's service account match, and spared
    // by the DENY of other namespaces (`!Prefix check`).
    assert_eq!(decide(Some(&checkout), "10.10.1.5:40000", "10.10.0.1:8080"), "allowed");
    // The intruder account: excluded from the namespace ALLOW, not the frontend principal.
    assert_eq!(
        decide(Some(&intruder), "10.10.0.6:40000", "10.10.0.1:8080"),
        "denied: allow policies exist, but none allowed"
    );
    // Another namespace, to the shop range: denied, but for the health port.
    assert_eq!(
        decide(Some(&stranger), "10.30.0.1:40000", "10.10.0.1:8080"),
        "denied: explicitly denied by: shop/deny-other-namespaces"
    );
    assert_eq!(
        decide(Some(&stranger), "10.30.0.1:40000", "10.10.0.1:15021"),
        "denied: allow policies exist, but none allowed"
    );
    // The quarantined range, even for the frontend; the global DENY comes first.
    assert_eq!(
        decide(Some(&frontend), "10.10.9.7:40000", "10.10.0.1:8080"),
        "denied: explicitly denied by: istio-system/deny-quarantine"
    );
    // The admin port: from the first 16 addresses of the range only.
    assert_eq!(decide(Some(&frontend), "10.10.0.2:40000", "10.10.0.1:9090"), "allowed");
    assert_eq!(
        decide(Some(&frontend), "10.10.0.200:40000", "10.10.0.1:9090"),
        "denied: explicitly denied by: shop/deny-admin-port"
    );
    // Plaintext: no ALLOW matches it; the dry-run DENY would have refused it too, and is reported.
    let plaintext = Connection {
        src_identity: None,
        src: addr("10.10.0.2:40000"),
        dst: addr("10.10.0.1:8080"),
    };
    let verdict = policies.evaluate(&cart_ref, &plaintext);
    assert!(!verdict.is_allowed());
    assert_eq!(verdict.dry_run.len(), 1);
    assert_eq!(verdict.dry_run[0].policy, "shop/audit-plaintext");
    assert!(verdict.dry_run[0].would_deny());
    // ... and for the frontend it matches nothing.
    let verdict = policies.evaluate(
        &cart_ref,
        &Connection {
            src_identity: Some(&frontend),
            ..plaintext
        },
    );
    assert!(verdict.is_allowed() && !verdict.dry_run[0].matched);

    // A workload of another namespace: only the global policy applies.
    let agent = workload(&state, "node-agent-a");
    let agent_ref = WorkloadRef::new(agent.namespace(), &agent.authorization_policies);
    let to_agent = |src: &str| Connection {
        src_identity: Some(&stranger),
        src: addr(src),
        dst: addr("10.0.0.11:10250"),
    };
    assert!(policies.evaluate(&agent_ref, &to_agent("10.30.0.1:40000")).is_allowed());
    assert!(!policies.evaluate(&agent_ref, &to_agent("10.10.9.1:40000")).is_allowed());
}

#[test]
fn istio_api_fields_are_accepted_without_warning_and_change_nothing() {
    let config = parse_clean(ISTIO_API_FIELDS);
    // The same file without them gives the same configuration.
    let without: String = {
        let mut out = Vec::new();
        let mut skipping = false;
        for line in ISTIO_API_FIELDS.lines() {
            let field = line.trim_start().split(':').next().unwrap_or_default();
            let top = line.len() - line.trim_start().len() == 2;
            if top && ["extensions", "weightedWaypoints", "visibility", "ingressUseWaypoint"].contains(&field) {
                skipping = true;
                continue;
            }
            if skipping && (line.starts_with("   ") || line.starts_with("  - ")) {
                continue;
            }
            skipping = false;
            out.push(line);
        }
        out.join("\n")
    };
    assert!(
        !without.contains("weightedWaypoints") && !without.contains("extensions"),
        "{without}"
    );
    assert_eq!(config, parse_clean(&without));
}

#[test]
fn unknown_fields_warn_with_their_path_and_line_and_change_nothing() {
    let (config, warnings) = LocalConfig::parse_with_warnings(FUTURE_FIELDS).unwrap();
    let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "apiVersion: unknown field, ignored (line 4, column 1)",
            "workloads[0].serviceAcount: unknown field, ignored; did you mean `serviceAccount`? (line 9, column 3)",
            "workloads[0].futureField: unknown field, ignored (line 13, column 3)",
            "workloads[0].locality.planet: unknown field, ignored (line 14, column 34)",
            "workloads[0].waypoint.priority: unknown field, ignored (line 15, column 61)",
            "workloads[0].applicationTunnel.futureOption: unknown field, ignored (line 16, column 39)",
            "services[0].sessionAffinity: unknown field, ignored (line 27, column 3)",
        ]
    );
    assert_eq!(warnings[1].field, "workloads[0].serviceAcount");
    assert_eq!(warnings[1].suggestion, Some("serviceAccount"));
    assert_eq!(warnings[1].location.map(|l| (l.line, l.column)), Some((9, 3)));

    // Without the unknown fields, the same configuration: the misspelt service account is the
    // default one, not `misspelt`.
    let known: String = FUTURE_FIELDS
        .lines()
        .filter(|line| {
            !["apiVersion", "  serviceAcount", "  futureField", "  sessionAffinity"]
                .iter()
                .any(|f| line.starts_with(f))
        })
        .map(|line| {
            line.replace(", planet: earth", "")
                .replace(", priority: 3", "")
                .replace(", futureOption: on", "")
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(config, parse_clean(&known));
    assert_eq!(config.workloads[0].service_account(), "default");
    // `parse` gives the same configuration and drops the warnings.
    assert_eq!(LocalConfig::parse(FUTURE_FIELDS).unwrap(), config);
}

#[test]
fn the_same_unknown_field_in_many_entries_is_one_warning() {
    // A generator that writes a new field into every workload (and every locality of them).
    let mut yaml = String::from("workloads:\n");
    for i in 0..5_000 {
        yaml.push_str(&format!(
            "- name: w-{i}\n  workloadIps: [\"10.{}.{}.{}\"]\n  futureField: {i}\n  locality: {{zone: z, planet: earth}}\n",
            i / 65_536,
            (i / 256) % 256,
            i % 256
        ));
    }
    let (config, warnings) = LocalConfig::parse_with_warnings(&yaml).unwrap();
    assert_eq!(config.workloads.len(), 5_000);
    let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "workloads[0].futureField: unknown field, ignored (line 4, column 3); the same in 4999 other entries",
            "workloads[0].locality.planet: unknown field, ignored (line 5, column 23); the same in 4999 other entries",
        ]
    );
    assert_eq!(warnings[0].others, 4_999);

    // Distinct unknown fields: each its own warning; only the first ones are located (each costs a
    // parse of the document).
    let mut yaml = String::from("workloads:\n");
    for i in 0..40 {
        yaml.push_str(&format!("- name: w-{i}\n  unknown{i}: x\n"));
    }
    let (_, warnings) = LocalConfig::parse_with_warnings(&yaml).unwrap();
    assert_eq!(warnings.len(), 40);
    assert!(warnings.iter().all(|w| w.others == 0));
    assert_eq!(warnings[3].field, "workloads[3].unknown3");
    assert_eq!(warnings[3].location.map(|l| l.line), Some(9));
    assert!(warnings[..LOCATED_WARNINGS].iter().all(|w| w.location.is_some()));
    assert!(warnings[LOCATED_WARNINGS..].iter().all(|w| w.location.is_none()));
}

#[test]
fn a_suggestion_needs_a_known_field_spelt_almost_alike() {
    let warn = |yaml: &str| {
        let (_, warnings) = LocalConfig::parse_with_warnings(yaml).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        (warnings[0].field.clone(), warnings[0].suggestion)
    };
    assert_eq!(
        warn("workloads:\n- name: a\n  workload_ips: [10.0.0.1]\n"),
        ("workloads[0].workload_ips".to_owned(), Some("workloadIps"))
    );
    assert_eq!(
        warn("services:\n- name: a\n  subjectAltName: []\n"),
        ("services[0].subjectAltName".to_owned(), Some("subjectAltNames"))
    );
    assert_eq!(
        warn("workload:\n- name: a\n"),
        ("workload".to_owned(), Some("workloads"))
    );
    assert_eq!(
        warn("workloads:\n- name: a\n  locality: {regoin: r}\n"),
        ("workloads[0].locality.regoin".to_owned(), Some("region"))
    );
    assert_eq!(
        warn("workloads:\n- name: a\n  sidecar: true\n"),
        ("workloads[0].sidecar".to_owned(), None)
    );
    // A key of a port map or of the workload's services is data, not a field: no warning there.
    let (_, warnings) =
        LocalConfig::parse_with_warnings("workloads:\n- name: a\n  services:\n    \"ns/unknownField\": {80: 8080}\n")
            .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn unknown_fields_in_policies_are_still_errors() {
    let cases: &[(&str, &str, usize)] = &[
        (
            "policies:\n- name: p\n  namespace: ns\n  scope: Namespace\n  action: Allow\n  priority: 1\n",
            "policies[0].priority",
            6,
        ),
        (
            "policies:\n- name: p\n  namespace: ns\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - notPrincipal: [!Exact x]\n",
            "policies[0].rules[0][0][0].notPrincipal",
            7,
        ),
        (
            "policies:\n- name: p\n  namespace: ns\n  scope: Namespace\n  action: Allow\n  rules:\n  - - - serviceAccounts: [{namespace: a, sa: b}]\n",
            "policies[0].rules[0][0][0].serviceAccounts[0].sa",
            7,
        ),
    ];
    for (yaml, field, line) in cases {
        let err = LocalConfig::parse_with_warnings(yaml).expect_err(yaml);
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        assert_eq!(err.field(), Some(*field), "{err}");
        assert_eq!(err.location().map(|l| l.line), Some(*line), "{err}");
        let message = err.to_string();
        assert!(message.contains("unknown field"), "{message}");
        assert!(message.contains("refused rather than half applied"), "{message}");
    }
    // `!Presence []` skips its `[]` on purpose: not a field, no warning.
    let (config, warnings) = LocalConfig::parse_with_warnings(
        "policies:\n- name: p\n  namespace: ns\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - notPrincipals: [!Presence [], {Presence: []}]\n",
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.policies[0].rules[0][0][0].not_principals.len(), 2);
}

#[test]
fn a_bad_value_of_a_known_field_is_still_an_error_with_its_line() {
    let bad = |from: &str, to: &str| {
        assert!(EVERY_FIELD.contains(from), "{from}");
        EVERY_FIELD.replacen(from, to, 1)
    };
    let line_of = |yaml: &str, needle: &str| yaml.lines().position(|line| line.contains(needle)).unwrap() + 1;
    let cases = [
        (
            bad("workloadIps: [\"10.10.0.2\"]", "workloadIps: [\"10.10.0.x\"]"),
            "workloads[0].workloadIps[0]",
            "10.10.0.x",
            r#""10.10.0.x" is not an IP address"#,
        ),
        (
            bad(
                "  protocol: HBONE\n  networkMode: Standard",
                "  protocol: HBONNE\n  networkMode: Standard",
            ),
            "workloads[0].protocol",
            "HBONNE",
            r#""HBONNE" is not a protocol"#,
        ),
        (
            bad("      80: 8081", "      80: 80810"),
            r#"workloads[3].services["shop/cart.shop.svc.cluster.local"].80"#,
            "80810",
            "80810 is not a port",
        ),
        (
            bad("  status: Unhealthy", "  status: Sick"),
            "workloads[2].status",
            "Sick",
            r#""Sick" is not a health status"#,
        ),
        (
            bad("destination: west/10.20.0.100", "destination: 10.20.0.100"),
            "workloads[6].networkGateway.destination",
            "destination: 10.20.0.100",
            "is not <network>/<ip> or <namespace>/<hostname>",
        ),
        (
            bad("vips: [\"/10.96.0.20\"]", "vips: [\"10.96.0.20\"]"),
            "services[1].vips[0]",
            "\"10.96.0.20\"",
            r#"write "/<ip>" for the default network"#,
        ),
        (
            bad("  - spiffe://cluster.local/ns/shop/sa/cart-legacy", "  - cart-legacy"),
            "services[0].subjectAltNames[0]",
            "- cart-legacy",
            "",
        ),
        (
            bad("sourceIps: [\"10.10.9.0/24\"]", "sourceIps: [\"10.10.9.0/33\"]"),
            "policies[0].rules[0][0][0].sourceIps[0]",
            "10.10.9.0/33",
            "",
        ),
        (
            bad("  scope: WorkloadSelector", "  scope: Workload"),
            "policies[4].scope",
            "scope: Workload\n",
            "Workload",
        ),
    ];
    for (yaml, field, needle, fragment) in &cases {
        let err = LocalConfig::parse_with_warnings(yaml).expect_err(field);
        let line = line_of(yaml, needle.trim_end_matches('\n'));
        assert_eq!(err.field(), Some(*field), "{err}");
        assert_eq!(err.location().map(|l| l.line), Some(line), "{err}");
        let message = err.to_string();
        assert!(message.starts_with(&format!("{field}: ")), "{message}");
        assert!(message.contains(&format!("(line {line}, column ")), "{message}");
        assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
    }
}
