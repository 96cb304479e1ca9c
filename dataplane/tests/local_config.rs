//! The local configuration file: ztunnel's format, meshwire's defaults, errors that name the field and
//! the line, and no panic on any input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use meshwire_dataplane::rbac::{RbacAction, RbacScope};
use meshwire_dataplane::xds::{
    ConfigError, GatewayDestination, HealthStatus, LocalConfig, NamespacedHostname, NetworkAddress, NetworkMode,
    Protocol,
};
use proptest::prelude::*;

/// ztunnel's `examples/localhost.yaml`, as ztunnel ships it (more of ztunnel's format:
/// `ztunnel_format.rs`).
const ZTUNNEL_LOCALHOST: &str = include_str!("fixtures/ztunnel/localhost.yaml");

const OUR_EXAMPLE: &str = include_str!("../examples/localhost.yaml");

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> NamespacedHostname {
    s.parse().unwrap()
}

fn ports(pairs: &[(u16, u16)]) -> BTreeMap<u16, u16> {
    pairs.iter().copied().collect()
}

#[test]
fn parses_ztunnels_own_example() {
    let config = LocalConfig::parse(ZTUNNEL_LOCALHOST).unwrap();
    assert_eq!(config.workloads.len(), 2);
    let local = &config.workloads[0];
    assert_eq!(local.uid, "cluster1//v1/Pod/default/local");
    assert_eq!(local.name, "local");
    assert_eq!(local.namespace(), "default");
    assert_eq!(local.service_account(), "default");
    assert_eq!(local.trust_domain().to_string(), "cluster.local");
    assert_eq!(local.workload_ips, vec![ip("127.0.0.1")]);
    assert_eq!(local.protocol, Protocol::Hbone);
    assert_eq!(local.node, "local");
    assert_eq!(local.network, "");
    assert_eq!(local.services.len(), 2);
    assert_eq!(local.services[&key("default/example.com")], ports(&[(80, 8080)]));
    assert_eq!(
        local.spiffe_id().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(config.workloads[1].protocol, Protocol::Tcp);

    assert_eq!(config.services.len(), 2);
    let example = &config.services[0];
    assert_eq!(example.key(), key("default/example.com"));
    assert_eq!(example.name, "local");
    assert_eq!(example.vips, vec![NetworkAddress::new("", ip("127.10.0.1"))]);
    assert_eq!(example.ports, ports(&[(80, 8080)]));
    assert_eq!(
        example.subject_alt_names[0].to_string(),
        "spiffe://cluster.local/ns/default/sa/local"
    );
    assert_eq!(
        config.services[1].vips,
        vec![NetworkAddress::new("remote", ip("127.10.0.2"))]
    );

    assert_eq!(config.policies.len(), 1);
    let policy = &config.policies[0];
    assert_eq!(policy.name, "deny-9999");
    assert_eq!(policy.action, RbacAction::Allow);
    assert_eq!(policy.scope, RbacScope::Namespace);
    assert_eq!(policy.rules[0][0][0].not_destination_ports, vec![9999]);
}

#[test]
fn parses_our_example_and_loads_it_from_disk() {
    let parsed = LocalConfig::parse(OUR_EXAMPLE).unwrap();
    let loaded = LocalConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/localhost.yaml")).unwrap();
    assert_eq!(parsed, loaded);

    let local = &parsed.workloads[0];
    assert_eq!(local.workload_ips, vec![ip("127.0.0.1")]);
    assert_eq!(local.protocol, Protocol::Hbone);
    assert_eq!(
        local.spiffe_id().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(local.services[&key("default/example.com")], ports(&[(80, 8080)]));
    let tcp = &parsed.workloads[1];
    assert_eq!(tcp.protocol, Protocol::Tcp);
    assert_eq!(tcp.namespace(), "default");

    let service = &parsed.services[0];
    assert_eq!(service.key(), key("default/example.com"));
    assert_eq!(service.vips, vec![NetworkAddress::new("", ip("127.10.0.1"))]);

    let policy = &parsed.policies[0];
    assert_eq!(policy.action, RbacAction::Allow);
    assert_eq!(policy.namespace, "default");
    assert_eq!(policy.rules.len(), 1);
}

#[test]
fn left_out_fields_take_defaults() {
    let config = LocalConfig::parse(
        "workloads:\n- name: a\n  workloadIps: [10.0.0.1]\nservices:\n- name: svc\n- hostname: web.example\n",
    )
    .unwrap();
    let a = &config.workloads[0];
    assert_eq!(a.namespace(), "default");
    assert_eq!(a.service_account(), "default");
    assert_eq!(a.trust_domain().to_string(), "cluster.local");
    assert_eq!(a.protocol, Protocol::Tcp);
    assert_eq!(a.network, "");
    assert_eq!(a.node, "");
    assert!(a.services.is_empty());
    assert_eq!(a.waypoint, None);
    assert_eq!(a.uid, "Kubernetes//v1/Pod/default/a");
    assert_eq!(a.cluster_id, "Kubernetes");
    assert_eq!(a.workload_name, "a");
    assert_eq!(a.canonical_name, "a");
    assert_eq!(a.canonical_revision, "latest");
    assert_eq!(a.workload_type, "pod");
    assert_eq!(a.status, HealthStatus::Healthy);
    assert_eq!(a.network_mode, NetworkMode::Standard);
    assert_eq!(a.capacity, 1);

    let svc = &config.services[0];
    assert_eq!(svc.namespace, "default");
    assert_eq!(svc.hostname, "svc.default.svc.cluster.local");
    assert!(svc.vips.is_empty() && svc.ports.is_empty());
    let web = &config.services[1];
    assert_eq!(web.name, "web");
    assert_eq!(web.key(), key("default/web.example"));
}

#[test]
fn empty_and_null_values_are_defaults() {
    for empty in [
        "",
        "# nothing\n",
        "null",
        "~",
        "workloads:\nservices:\npolicies:\n",
        "{}",
    ] {
        assert_eq!(LocalConfig::parse(empty).unwrap(), LocalConfig::default(), "{empty:?}");
    }
    let config = LocalConfig::parse(
        "workloads:\n- name: a\n  namespace: null\n  serviceAccount:\n  trustDomain: ~\n  services:\n    \"ns/h\":\n  workloadIps:\n",
    )
    .unwrap();
    let a = &config.workloads[0];
    assert_eq!(
        a.spiffe_id().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(a.services[&key("ns/h")], BTreeMap::new());
    assert!(a.workload_ips.is_empty());
}

#[test]
fn forgiving_spellings() {
    let config = LocalConfig::parse(
        r#"
workloads:
- name: a
  protocol: hbone
  status: unhealthy
  networkMode: hostnetwork
  services:
    "ns/h": {"80": "8080", 443: }
  waypoint: {destination: "/10.0.0.9"}
  networkGateway: {destination: "ns/gateway.example", hboneMtlsPort: 15009}
  applicationTunnel: {protocol: proxy, port: 15088}
- name: b
  protocol: Tcp
  workloadIps: ["::1", 10.0.0.2]
"#,
    )
    .unwrap();
    let a = &config.workloads[0];
    assert_eq!(a.protocol, Protocol::Hbone);
    assert_eq!(a.status, HealthStatus::Unhealthy);
    assert_eq!(a.network_mode, NetworkMode::HostNetwork);
    assert_eq!(a.services[&key("ns/h")], ports(&[(80, 8080), (443, 443)]));
    let waypoint = a.waypoint.as_ref().unwrap();
    assert_eq!(
        waypoint.destination,
        GatewayDestination::Address(NetworkAddress::new("", ip("10.0.0.9")))
    );
    assert_eq!(waypoint.hbone_mtls_port, 15008);
    let gateway = a.network_gateway.as_ref().unwrap();
    assert_eq!(
        gateway.destination,
        GatewayDestination::Hostname(key("ns/gateway.example"))
    );
    assert_eq!(gateway.hbone_mtls_port, 15009);
    assert_eq!(a.application_tunnel.as_ref().unwrap().port, Some(15088));
    assert_eq!(config.workloads[1].protocol, Protocol::Tcp);
    assert_eq!(config.workloads[1].workload_ips, vec![ip("::1"), ip("10.0.0.2")]);
}

#[test]
fn accepts_every_ztunnel_workload_and_service_field() {
    let config = LocalConfig::parse(
        r#"
workloads:
- uid: c1//v1/Pod/ns1/full
  name: full
  namespace: ns1
  serviceAccount: sa1
  trustDomain: example.org
  workloadIps: [10.1.0.1]
  protocol: HBONE
  node: node1
  network: net1
  services: {"ns1/svc.example": {80: 8080}}
  waypoint: {destination: "net1/10.1.0.100", hboneMtlsPort: 15008}
  networkGateway: {destination: "net1/10.1.0.200", hboneMtlsPort: 15008}
  networkMode: Standard
  hostname: full.example
  workloadName: full-deploy
  workloadType: deployment
  canonicalName: full-app
  canonicalRevision: v1
  nativeTunnel: false
  applicationTunnel: {protocol: NONE}
  authorizationPolicies: [ns1/allow]
  status: Healthy
  clusterId: c1
  locality: {region: r, zone: z, subzone: s}
  capacity: 3
services:
- name: svc
  namespace: ns1
  hostname: svc.example
  vips: [net1/10.1.1.1]
  ports: {80: 8080}
  endpoints: {}
  subjectAltNames: [spiffe://example.org/ns/ns1/sa/extra]
  waypoint: {destination: "ns1/waypoint.example"}
  loadBalancer: {routingPreferences: [Network], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: IPv4
"#,
    )
    .unwrap();
    let full = &config.workloads[0];
    assert_eq!(full.spiffe_id().to_string(), "spiffe://example.org/ns/ns1/sa/sa1");
    assert_eq!(full.workload_name, "full-deploy");
    assert_eq!(full.canonical_name, "full-app");
    assert_eq!(full.canonical_revision, "v1");
    assert_eq!(full.cluster_id, "c1");
    assert_eq!(full.locality.zone, "z");
    assert_eq!(full.capacity, 3);
    assert_eq!(full.authorization_policies, vec!["ns1/allow".to_owned()]);
    assert!(config.services[0].waypoint.is_some());
}

/// Parses `yaml`, expecting an error about `field` on `line`, whose message contains `fragment`.
fn assert_error(yaml: &str, field: &str, line: usize, fragment: &str) -> ConfigError {
    let err = LocalConfig::parse(yaml).expect_err(yaml);
    let message = err.to_string();
    assert_eq!(err.field(), Some(field), "{message}");
    assert_eq!(err.location().map(|l| l.line), Some(line), "{message}");
    assert!(message.starts_with(&format!("{field}: ")), "{message}");
    assert!(message.contains(&format!("(line {line}, column ")), "{message}");
    assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
    err
}

#[test]
fn an_ip_that_does_not_parse_is_named_with_its_line() {
    let yaml = "workloads:\n- name: a\n  workloadIps: [10.0.0.1]\n- name: b\n- name: c\n  workloadIps:\n  - 10.0.0.x\n";
    let err = assert_error(
        yaml,
        "workloads[2].workloadIps[0]",
        7,
        r#""10.0.0.x" is not an IP address"#,
    );
    assert_eq!(
        err.to_string(),
        r#"workloads[2].workloadIps[0]: "10.0.0.x" is not an IP address (line 7, column 5)"#
    );
    assert!(matches!(err, ConfigError::Invalid { .. }));
}

#[test]
fn each_malformed_value_names_its_field_and_line() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "workloads:\n- name: a\n  protocol: UDP\n",
            "workloads[0].protocol",
            3,
            r#""UDP" is not a protocol (expected HBONE or TCP)"#,
        ),
        (
            "workloads:\n- name: a\n  services:\n    example.com: {80: 8080}\n",
            r#"workloads[0].services["example.com"]"#,
            4,
            "is not <namespace>/<hostname>",
        ),
        (
            "workloads:\n- name: a\n  services:\n    \"ns/h\": {80: 70000}\n",
            r#"workloads[0].services["ns/h"].80"#,
            4,
            "70000 is not a port",
        ),
        (
            "services:\n- name: a\n  vips: [127.10.0.1]\n",
            "services[0].vips[0]",
            3,
            r#"write "/<ip>" for the default network"#,
        ),
        (
            "services:\n- name: a\n  vips: [net/not-an-ip]\n",
            "services[0].vips[0]",
            3,
            r#""net/not-an-ip" is not <network>/<ip>"#,
        ),
        (
            "policies:\n- name: p\n  namespace: ns\n  scope: Global\n  action: Deny\n  rules:\n  - - - notPrincipal: []\n",
            "policies[0].rules[0][0][0].notPrincipal",
            7,
            "unknown field `notPrincipal`, expected one of",
        ),
        ("workloads: 5\n", "workloads", 1, "invalid type: integer `5`"),
        (
            "workloads:\n- name: [a]\n",
            "workloads[0].name",
            2,
            "invalid type: sequence",
        ),
        (
            "workloads:\n- name: a\n  waypoint: {destination: nowhere}\n",
            "workloads[0].waypoint.destination",
            3,
            "is not <network>/<ip> or <namespace>/<hostname>",
        ),
        (
            "workloads:\n- name: a\n  waypoint: {}\n",
            "workloads[0].waypoint",
            3,
            "missing field `destination`",
        ),
        (
            "workloads:\n- name: a\n  capacity: -1\n",
            "workloads[0].capacity",
            3,
            "expected u32",
        ),
        (
            "policies:\n- name: p\n  namespace: ns\n  scope: Namespace\n  action: Maybe\n",
            "policies[0].action",
            5,
            "Maybe",
        ),
        (
            "workloads:\n  - name: a\n   bad: indent\n",
            "workloads",
            3,
            "did not find expected",
        ),
        ("workloads: [\n", "workloads", 2, "did not find expected node content"),
    ];
    for (yaml, field, line, fragment) in cases {
        assert_error(yaml, field, *line, fragment);
    }
}

#[test]
fn port_zero_is_refused_where_it_means_nothing() {
    let cases = [
        // A service port 0, in a service and in a workload's port map.
        (
            "services:\n- name: a\n  vips: [/10.0.0.1]\n  ports:\n    80: 8080\n    0: 8080\n",
            "services[0].ports.0",
            6,
            "service port 0 is not a port clients can connect to",
        ),
        (
            "workloads:\n- name: a\n  services:\n    \"ns/h\":\n      0: 8080\n",
            r#"workloads[0].services["ns/h"].0"#,
            5,
            "service port 0 is not a port clients can connect to",
        ),
        // A target port 0 in a workload's own map: the port the workload accepts on.
        (
            "workloads:\n- name: a\n  services:\n    \"ns/h\":\n      80: 8080\n      443: 0\n",
            r#"workloads[0].services["ns/h"].443"#,
            6,
            "target port 0 is not a port the workload accepts on",
        ),
    ];
    for (yaml, field, line, fragment) in cases {
        let err = assert_error(yaml, field, line, fragment);
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
    }
    // A service's target port 0 is a named port, resolved by the workloads' maps: legal.
    let config = LocalConfig::parse(
        "services:\n- name: a\n  vips: [/10.0.0.1]\n  ports: {80: 0}\nworkloads:\n- name: w\n  \
         workloadIps: [10.0.0.2]\n  services:\n    \"default/a.default.svc.cluster.local\": {80: 8080}\n",
    )
    .unwrap();
    assert_eq!(config.services[0].ports[&80], 0);
    assert_eq!(config.workloads[0].services.values().next().unwrap()[&80], 8080);
}

#[test]
fn invalid_identities_name_the_field() {
    let err = assert_error(
        "workloads:\n- name: a\n  namespace: a/b\n",
        "workloads[0].namespace",
        3,
        r#"invalid namespace "a/b""#,
    );
    assert!(matches!(err, ConfigError::Identity { .. }));
    assert_error(
        "workloads:\n- name: a\n  serviceAccount: \"sa b\"\n",
        "workloads[0].serviceAccount",
        3,
        r#"invalid service account "sa b""#,
    );
    assert_error(
        "workloads:\n- name: a\n  trustDomain: Not A Domain\n",
        "workloads[0].trustDomain",
        3,
        "invalid trust domain",
    );
    assert_error(
        "services:\n- name: a\n  subjectAltNames:\n  - spiffe://td/ns/a/sa/b\n  - not-a-spiffe-id\n",
        "services[0].subjectAltNames[1]",
        5,
        "invalid SPIFFE ID",
    );
    // Too long as a whole: the workload is named.
    let yaml = format!(
        "workloads:\n- name: a\n  namespace: {}\n  serviceAccount: {}\n",
        "n".repeat(1000),
        "s".repeat(1100)
    );
    assert_error(&yaml, "workloads[0]", 2, "invalid SPIFFE ID");
}

#[test]
fn duplicates_name_both_places() {
    let err = assert_error(
        "workloads:\n- name: a\n  workloadIps: [10.0.0.1]\n- name: b\n  workloadIps: [10.0.0.2, 10.0.0.1]\n",
        "workloads[1].workloadIps[1]",
        5,
        r#"address 10.0.0.1 of network "" is already taken by workloads[0].workloadIps[0]"#,
    );
    assert!(matches!(err, ConfigError::DuplicateWorkloadIp { .. }));
    // The same IP in two networks, or on a host-networked workload, is fine.
    LocalConfig::parse(
        "workloads:\n- name: a\n  workloadIps: [10.0.0.1]\n- name: b\n  network: other\n  workloadIps: [10.0.0.1]\n- name: c\n  networkMode: HostNetwork\n  workloadIps: [10.0.0.1]\n",
    )
    .unwrap();

    assert_error(
        "services:\n- name: a\n  vips: [/10.9.0.1]\n- name: b\n  vips: [/10.9.0.2, /10.9.0.1]\n",
        "services[1].vips[1]",
        5,
        "VIP /10.9.0.1 is already taken by services[0].vips[0]",
    );
    assert_error(
        "services:\n- hostname: a.example\n- name: b\n  hostname: a.example\n",
        "services[1]",
        3,
        "service default/a.example is already defined by services[0]",
    );
    assert_error(
        "workloads:\n- name: a\n  uid: x\n- name: b\n  uid: x\n",
        "workloads[1].uid",
        5,
        r#"uid "x" is already used by workloads[0]"#,
    );
    // A derived uid is not in the document: the workload is named.
    assert_error(
        "workloads:\n- name: a\n- name: a\n",
        "workloads[1]",
        3,
        r#"uid "Kubernetes//v1/Pod/default/a" is already used"#,
    );
}

#[test]
fn items_without_a_name_are_rejected() {
    let cases = [
        (
            "workloads:\n- {}\n",
            "workloads[0].name",
            "a workload needs a `name` or a `uid`",
        ),
        (
            "services:\n- vips: [/10.0.0.1]\n",
            "services[0].hostname",
            "a service needs a `hostname` or a `name`",
        ),
    ];
    for (yaml, field, fragment) in cases {
        let err = assert_error(yaml, field, 2, fragment);
        assert!(matches!(err, ConfigError::Missing { .. }), "{err:?}");
    }
}

#[test]
fn unreadable_files_name_the_file() {
    let err = LocalConfig::load(Path::new("/nonexistent/meshwire.yaml")).unwrap_err();
    assert!(matches!(
        err,
        ConfigError::Read {
            kind: std::io::ErrorKind::NotFound,
            ..
        }
    ));
    assert!(err.to_string().contains("/nonexistent/meshwire.yaml"), "{err}");
    assert_eq!(err.field(), None);
}

#[test]
fn several_documents_are_rejected() {
    let err = LocalConfig::parse("workloads: []\n---\nworkloads: []\n").unwrap_err();
    assert!(err.to_string().contains("more than one document"), "{err}");
}

#[test]
fn policies_use_the_rbac_serde_form() {
    let config = LocalConfig::parse(
        "policies:\n- name: p\n  namespace: ns\n  scope: Global\n  action: Deny\n  rules:\n  - - - principals: [!Exact cluster.local/ns/a/sa/b]\n",
    )
    .unwrap();
    assert_eq!(config.policies[0].action, RbacAction::Deny);
    assert_eq!(config.policies[0].rules[0][0][0].principals.len(), 1);
}

/// Mutates `text`: each edit deletes, inserts, replaces or duplicates a span.
fn mutate(text: &str, edits: &[(u8, usize, usize, String)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for (kind, at, len, insert) in edits {
        let at = at % (bytes.len() + 1);
        let end = (at + len).min(bytes.len());
        match kind % 4 {
            0 => {
                bytes.drain(at..end);
            }
            1 => {
                bytes.splice(at..at, insert.bytes());
            }
            2 => {
                bytes.splice(at..end, insert.bytes());
            }
            _ => {
                let span = bytes[at..end].to_vec();
                bytes.splice(at..at, span);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Found by the `local_config` fuzz target: a tagged collection where a list is expected used to make
/// the YAML library panic ("unexpected end of mapping") while the error was being located.
#[test]
fn tagged_values_where_collections_belong_are_errors_not_panics() {
    let yaml = "workloads: !orklo:\n- !orklo:\n";
    let err = LocalConfig::parse(yaml).unwrap_err();
    assert!(err.to_string().contains("workloads"), "{err}");
    check_no_panic_and_errors_are_named(yaml);
    // Tags elsewhere around collections: an error or a configuration, never a panic.
    for yaml in [
        "workloads: !x\n  a: b\nservices: []\n",
        "workloads:\n- !w {name: a}\n- name: b\n",
        "policies: !p [1, 2]\nworkloads: [{x: !t {a: [b]}}]\n",
        "services: [!s {a: !t [!u {b: c}]}]\n",
    ] {
        check_no_panic_and_errors_are_named(yaml);
    }
}

fn check_no_panic_and_errors_are_named(yaml: &str) {
    if let Err(err) = LocalConfig::parse(yaml) {
        let message = err.to_string();
        assert!(!message.is_empty());
        assert!(err.field().is_some(), "{message}");
        if let Some(location) = err.location() {
            assert!(
                location.line >= 1 && location.line <= yaml.lines().count() + 1,
                "{message}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_never_panics_on_arbitrary_text(yaml in any::<String>()) {
        check_no_panic_and_errors_are_named(&yaml);
    }

    #[test]
    fn parse_never_panics_on_yaml_like_text(yaml in r#"([a-zA-Z0-9:/\[\]{}"'!&*#., -]{0,12}\n?){0,24}"#) {
        check_no_panic_and_errors_are_named(&yaml);
    }

    #[test]
    fn parse_never_panics_on_mutated_examples(
        which in 0..2usize,
        edits in prop::collection::vec(
            (any::<u8>(), any::<usize>(), 0..40usize, r#"[a-zA-Z0-9:/\[\]{}"'!&*#.,\n -]{0,8}"#),
            1..6,
        ),
    ) {
        let base = [ZTUNNEL_LOCALHOST, OUR_EXAMPLE][which];
        check_no_panic_and_errors_are_named(&mutate(base, &edits));
    }

    #[test]
    fn generated_configurations_parse_back(
        workloads in prop::collection::btree_map(
            any::<u32>(),
            ("[a-z][a-z0-9-]{0,10}", "[a-z][a-z0-9-]{0,10}", any::<bool>(), prop::option::of(1u16..)),
            0..8,
        ),
    ) {
        let mut yaml = String::from("workloads:\n");
        for (n, (ip, (name, sa, hbone, port))) in workloads.iter().enumerate() {
            let ip = std::net::Ipv4Addr::from(*ip);
            yaml.push_str(&format!(
                "- name: {name}\n  uid: w{n}\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: {}\n",
                if *hbone { "HBONE" } else { "TCP" }
            ));
            if let Some(port) = port {
                yaml.push_str(&format!("  services:\n    \"ns/{name}.example\": {{{port}: {port}}}\n"));
            }
        }
        let config = LocalConfig::parse(&yaml).unwrap();
        prop_assert_eq!(config.workloads.len(), workloads.len());
        for (workload, (ip, (name, sa, hbone, port))) in config.workloads.iter().zip(&workloads) {
            prop_assert_eq!(workload.workload_ips.clone(), vec![IpAddr::from(std::net::Ipv4Addr::from(*ip))]);
            prop_assert_eq!(&workload.name, name);
            prop_assert_eq!(workload.service_account(), sa.as_str());
            prop_assert_eq!(workload.protocol == Protocol::Hbone, *hbone);
            prop_assert_eq!(workload.services.len(), usize::from(port.is_some()));
        }
    }
}
