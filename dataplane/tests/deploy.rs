//! The Kubernetes manifests of `deploy/ztunnel.yaml` against the binary they run: every variable
//! they set is one the proxy reads, the token and the root certificate are mounted where the proxy
//! looks for them by default, the probes and scrape port are the proxy's default listeners, and the
//! configuration the pod gets (its arguments and its environment, with the values Kubernetes fills
//! in) is one that joins istiod as the ServiceAccount `istio-system/ztunnel`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::IpAddr;
use std::path::Path;

use meshwire_dataplane::admin::READY_PATH;
use meshwire_dataplane::config::{
    AuthToken, CertificateSource, Config, DEFAULT_AUTH_TOKEN, DEFAULT_ROOT_CA, ProxyMode, Roots, reads_env,
};
use serde::Deserialize;
use serde_yaml_ng::Value;

const MANIFESTS: &str = include_str!("../../deploy/ztunnel.yaml");

const ISTIOD: &str = "istiod.istio-system.svc:15012";

/// The values Kubernetes gives a `fieldRef` or `resourceFieldRef` in the test's pod.
const POD_NAME: &str = "ztunnel-x7k2p";
const NODE_NAME: &str = "node-1";
const POD_IP: &str = "10.244.1.7";
const CPU_LIMIT: &str = "2";

/// Every document of the manifests.
fn documents() -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(MANIFESTS)
        .map(|doc| Value::deserialize(doc).expect("deploy/ztunnel.yaml is YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one document of `kind`.
fn only(kind: &str) -> Value {
    let docs: Vec<Value> = documents().into_iter().filter(|doc| doc["kind"] == kind).collect();
    assert_eq!(docs.len(), 1, "one {kind} in deploy/ztunnel.yaml");
    docs.into_iter().next().unwrap()
}

fn daemonset() -> Value {
    only("DaemonSet")
}

/// The DaemonSet's pod spec.
fn pod(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]
}

/// The DaemonSet's one container.
fn container(ds: &Value) -> &Value {
    let containers = pod(ds)["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

fn seq<'a>(value: &'a Value, what: &str) -> &'a [Value] {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("{what} is not a list: {value:?}"))
}

/// The container's environment, with the values Kubernetes would fill in for the test's pod.
fn env(ds: &Value) -> Vec<(String, String)> {
    let pod = pod(ds);
    seq(&container(ds)["env"], "env")
        .iter()
        .map(|var| {
            let name = str_of(&var["name"], "env[].name").to_owned();
            let value = if let Some(value) = var.get("value") {
                str_of(value, &name).to_owned()
            } else if let Some(field) = var["valueFrom"].get("fieldRef") {
                match str_of(&field["fieldPath"], &name) {
                    "metadata.name" => POD_NAME.to_owned(),
                    "metadata.namespace" => str_of(&ds["metadata"]["namespace"], "namespace").to_owned(),
                    "spec.nodeName" => NODE_NAME.to_owned(),
                    "status.podIP" => POD_IP.to_owned(),
                    "spec.serviceAccountName" => str_of(&pod["serviceAccountName"], "serviceAccountName").to_owned(),
                    other => panic!("{name}: no sample value for the field {other}"),
                }
            } else if let Some(resource) = var["valueFrom"].get("resourceFieldRef") {
                match str_of(&resource["resource"], &name) {
                    "limits.cpu" => CPU_LIMIT.to_owned(),
                    other => panic!("{name}: no sample value for the resource {other}"),
                }
            } else {
                panic!("{name} has neither a value nor a fieldRef or resourceFieldRef")
            };
            (name, value)
        })
        .collect()
}

/// The configuration the binary reads in the DaemonSet's pod: `ztunnel` and the container's
/// arguments, and its environment.
fn pod_config(ds: &Value) -> Config {
    let args: Vec<String> = std::iter::once("ztunnel".to_owned())
        .chain(
            seq(&container(ds)["args"], "args")
                .iter()
                .map(|arg| str_of(arg, "args[]").to_owned()),
        )
        .collect();
    Config::from_args_and_vars(args, env(ds)).unwrap_or_else(|err| panic!("the pod's configuration: {err}"))
}

/// The volume the container mounts at `dir`.
fn volume_at<'a>(ds: &'a Value, dir: &str) -> &'a Value {
    let mount = seq(&container(ds)["volumeMounts"], "volumeMounts")
        .iter()
        .find(|mount| mount["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let name = str_of(&mount["name"], "volumeMounts[].name");
    assert!(mount.get("subPath").is_none(), "the mount at {dir} is a subPath");
    seq(&pod(ds)["volumes"], "volumes")
        .iter()
        .find(|volume| volume["name"] == name)
        .unwrap_or_else(|| panic!("the volume {name} mounted at {dir} is missing"))
}

/// `path` as folder and file name.
fn split(path: &str) -> (&str, &str) {
    let path = Path::new(path);
    (
        path.parent().and_then(Path::to_str).unwrap(),
        path.file_name().and_then(|f| f.to_str()).unwrap(),
    )
}

#[test]
fn every_variable_the_manifests_set_is_one_the_proxy_reads() {
    let ds = daemonset();
    let vars = seq(&container(&ds)["env"], "env");
    assert!(!vars.is_empty());
    let mut names = Vec::new();
    for var in vars {
        let name = str_of(&var["name"], "env[].name");
        assert!(
            reads_env(name),
            "deploy/ztunnel.yaml sets {name}, which meshwire does not read: remove it (and list it in the \
             file's header) or teach the proxy to read it"
        );
        assert!(!names.contains(&name), "{name} is set twice");
        names.push(name);
    }
    // Nothing the pod sets ends up ignored with a warning either.
    assert_eq!(pod_config(&ds).ignored_env, Vec::<&str>::new());
}

#[test]
fn the_token_and_the_root_certificate_are_mounted_where_the_proxy_reads_them() {
    let ds = daemonset();

    let (dir, file) = split(DEFAULT_AUTH_TOKEN);
    let token = volume_at(&ds, dir);
    let sources = seq(&token["projected"]["sources"], "the token volume's projected sources");
    let sa_token = sources
        .iter()
        .find_map(|source| source.get("serviceAccountToken"))
        .expect("a projected serviceAccountToken");
    assert_eq!(sa_token["path"], file, "the token's file in {dir}");
    assert_eq!(
        sa_token["audience"], "istio-ca",
        "the token's audience (istiod checks it)"
    );

    let (dir, file) = split(DEFAULT_ROOT_CA);
    let root = volume_at(&ds, dir);
    let config_map = root
        .get("configMap")
        .expect("the root certificate comes from a ConfigMap");
    assert_eq!(config_map["name"], "istio-ca-root-cert", "istiod's root ConfigMap");
    let items = seq(&config_map["items"], "the ConfigMap's items");
    assert!(
        items
            .iter()
            .any(|item| item["key"] == "root-cert.pem" && item["path"] == file),
        "the ConfigMap's root-cert.pem is not projected as {file}: {items:?}"
    );

    // And the proxy reads them from there: nothing in the pod moves them.
    let config = pod_config(&ds);
    assert_eq!(config.istio.token, AuthToken::File(DEFAULT_AUTH_TOKEN.into()));
    let xds = config.istio.xds.as_ref().expect("xDS");
    assert_eq!(xds.roots, Roots::File(DEFAULT_ROOT_CA.into()));
    let CertificateSource::IstioCa(ca) = &config.certificates else {
        panic!("{:?}", config.certificates)
    };
    assert_eq!(ca.roots, Roots::File(DEFAULT_ROOT_CA.into()));
}

#[test]
fn the_probe_and_the_scrape_port_are_the_proxy_s_listeners() {
    let ds = daemonset();
    let defaults = Config::default().listeners;
    let readiness = defaults.readiness.port();
    let metrics = defaults.metrics.port();

    let probe = &container(&ds)["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], READY_PATH, "the readiness probe's path");
    assert_eq!(
        probe["port"].as_u64(),
        Some(u64::from(readiness)),
        "the readiness probe's port"
    );

    let ports = seq(&container(&ds)["ports"], "ports");
    let stats = ports
        .iter()
        .find(|port| port["name"] == "ztunnel-stats")
        .expect("the ztunnel-stats port");
    assert_eq!(
        stats["containerPort"].as_u64(),
        Some(u64::from(metrics)),
        "ztunnel-stats"
    );
    assert!(
        ports
            .iter()
            .any(|port| port["containerPort"].as_u64() == Some(u64::from(readiness))),
        "the readiness port is declared"
    );

    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], metrics.to_string().as_str());
    for (key, value) in [
        ("sidecar.istio.io/inject", "false"),
        ("ambient.istio.io/redirection", "disabled"),
    ] {
        assert_eq!(annotations[key], value, "the pod annotation {key}");
    }

    // The pod's configuration keeps those ports.
    let config = pod_config(&ds);
    assert_eq!(config.listeners.readiness.port(), readiness);
    assert_eq!(config.listeners.metrics.port(), metrics);
}

#[test]
fn the_pod_s_configuration_joins_istiod() {
    let ds = daemonset();
    let config = pod_config(&ds);

    let xds = config.istio.xds.as_ref().expect("xDS is on");
    assert_eq!(xds.address, ISTIOD);
    let CertificateSource::IstioCa(ca) = &config.certificates else {
        panic!("certificates from the Istio CA, not {:?}", config.certificates)
    };
    assert_eq!(ca.address, ISTIOD);

    assert_eq!(config.istio.pod_name.as_deref(), Some(POD_NAME));
    assert_eq!(config.istio.pod_namespace.as_deref(), Some("istio-system"));
    assert_eq!(config.istio.service_account.as_deref(), Some("ztunnel"));
    assert_eq!(
        config.mode,
        ProxyMode::Shared {
            node: Some(NODE_NAME.to_owned())
        }
    );
    assert_eq!(config.instance_ip, Some(POD_IP.parse::<IpAddr>().unwrap()));
    assert_eq!(config.cluster_id, "Kubernetes");
    assert!(
        config
            .istio
            .metadata
            .contains(&("CLUSTER_ID".to_owned(), "Kubernetes".to_owned())),
        "{:?}",
        config.istio.metadata
    );
    assert_eq!(config.local_config, None);

    // Connections are drained before Kubernetes kills the process.
    let grace = pod(&ds)["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        config.drain_deadline.as_secs() < grace,
        "a drain deadline of {:?} in a grace period of {grace}s",
        config.drain_deadline
    );
}

#[test]
fn the_pod_runs_as_istio_system_ztunnel() {
    let sa = only("ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "ztunnel");
    assert_eq!(sa["metadata"]["namespace"], "istio-system");

    let ds = daemonset();
    assert_eq!(ds["metadata"]["namespace"], "istio-system");
    assert_eq!(pod(&ds)["serviceAccountName"], "ztunnel");

    let container = container(&ds);
    assert_eq!(
        container["args"],
        serde_yaml_ng::from_str::<Value>("[proxy, ztunnel]").unwrap()
    );
    let caps = seq(&container["securityContext"]["capabilities"]["add"], "capabilities.add");
    for cap in ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"] {
        assert!(caps.iter().any(|c| c == cap), "{cap} is not added: {caps:?}");
    }
    assert_eq!(container["securityContext"]["privileged"], false);
    assert_eq!(container["securityContext"]["runAsUser"].as_u64(), Some(0));
}
