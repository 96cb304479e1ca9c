//! Telemetry: Istio TCP metrics (counts, byte totals, exact rendering, close accounting) and the
//! access log (text escaping, JSON, byte directions, emission through `tracing`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshwire_dataplane::telemetry::accesslog::{self, AccessLogEntry, Direction, FailedConnection, LogFormat};
use meshwire_dataplane::telemetry::layout::{self, render};
use meshwire_dataplane::telemetry::metrics::{
    ConnectionLabels, LabelValue, Metrics, OPENMETRICS_CONTENT_TYPE, Reporter, ResponseFlags, SecurityPolicy,
    TEXT_CONTENT_TYPE, content_type,
};
use meshwire_dataplane::xds::{LocalConfig, Service, Workload};
use proptest::prelude::*;

const MESH: &str = r#"
workloads:
- name: productpage-v1-6d8f
  namespace: bookinfo
  serviceAccount: bookinfo-productpage
  workloadName: productpage-v1
  canonicalName: productpage
  canonicalRevision: v1
  workloadIps: [10.0.0.1]
  protocol: HBONE
- name: reviews-v2-7c9b
  namespace: bookinfo
  serviceAccount: bookinfo-reviews
  workloadName: reviews-v2
  canonicalName: reviews
  canonicalRevision: v2
  clusterId: cluster-east
  workloadIps: [10.0.1.1]
  protocol: HBONE
  services:
    "bookinfo/reviews.bookinfo.svc.cluster.local": {9080: 9080}
services:
- name: reviews
  namespace: bookinfo
  hostname: reviews.bookinfo.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {9080: 9080}
"#;

struct Mesh {
    client: Workload,
    server: Workload,
    service: Service,
}

fn mesh() -> Mesh {
    let mut config = LocalConfig::parse(MESH).unwrap();
    Mesh {
        server: config.workloads.pop().unwrap(),
        client: config.workloads.pop().unwrap(),
        service: config.services.pop().unwrap(),
    }
}

fn outbound_labels(mesh: &Mesh) -> ConnectionLabels {
    ConnectionLabels::new(Reporter::Source, SecurityPolicy::MutualTls)
        .with_source(Some(&mesh.client))
        .with_source_principal(Some(mesh.client.spiffe_id()))
        .with_destination(Some(&mesh.server))
        .with_destination_service(Some(&mesh.service))
}

fn inbound_labels(mesh: &Mesh) -> ConnectionLabels {
    ConnectionLabels::new(Reporter::Destination, SecurityPolicy::MutualTls)
        .with_source(Some(&mesh.client))
        .with_source_principal(Some(mesh.client.spiffe_id()))
        .with_destination(Some(&mesh.server))
        .with_destination_service(Some(&mesh.service))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One sample of the rendered text: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: u64,
}

/// Parses the sample lines of OpenMetrics text, unescaping label values (`\\`, `\"`, `\n`).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let open = line.find('{').expect("labels");
        let name = line[..open].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[open + 1..];
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            rest = rest.strip_prefix(',').unwrap_or(rest);
            let eq = rest.find("=\"").expect("label value");
            let key = rest[..eq].to_owned();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                let (i, c) = chars.next().expect("closing quote");
                match c {
                    '"' => break i,
                    '\\' => match chars.next().expect("escape").1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            labels.insert(key, value);
            rest = &rest[eq + 2 + end + 1..];
        }
        let value = rest.trim().parse().expect("value");
        out.push(Sample { name, labels, value });
    }
    out
}

/// The value of `name` for the sample whose labels include all of `want`; panics unless exactly one.
fn value(text: &str, name: &str, want: &[(&str, &str)]) -> u64 {
    let matching: Vec<_> = samples(text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(matching.len(), 1, "{name} {want:?} in\n{text}");
    matching[0].value
}

#[test]
fn label_values_follow_ztunnel() {
    let mesh = mesh();
    let labels = outbound_labels(&mesh);
    assert_eq!(labels.reporter.as_str(), "source");
    assert_eq!(labels.source_workload.as_str(), "productpage-v1");
    assert_eq!(labels.source_canonical_service.as_str(), "productpage");
    assert_eq!(labels.source_canonical_revision.as_str(), "v1");
    assert_eq!(labels.source_workload_namespace.as_str(), "bookinfo");
    assert_eq!(
        labels.source_principal.as_str(),
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
    );
    assert_eq!(labels.source_app.as_str(), "productpage");
    assert_eq!(labels.source_version.as_str(), "v1");
    assert_eq!(labels.source_cluster.as_str(), "Kubernetes");
    assert_eq!(
        labels.destination_service.as_str(),
        "reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(labels.destination_service_namespace.as_str(), "bookinfo");
    assert_eq!(labels.destination_service_name.as_str(), "reviews");
    assert_eq!(labels.destination_workload.as_str(), "reviews-v2");
    assert_eq!(labels.destination_canonical_service.as_str(), "reviews");
    assert_eq!(labels.destination_canonical_revision.as_str(), "v2");
    assert_eq!(labels.destination_workload_namespace.as_str(), "bookinfo");
    assert_eq!(
        labels.destination_principal.as_str(),
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    );
    assert_eq!(labels.destination_app.as_str(), "reviews");
    assert_eq!(labels.destination_version.as_str(), "v2");
    assert_eq!(labels.destination_cluster.as_str(), "cluster-east");
    assert_eq!(labels.request_protocol.as_str(), "tcp");
    assert_eq!(labels.response_flags.as_str(), "-");
    assert_eq!(labels.connection_security_policy.as_str(), "mutual_tls");

    // A source workload alone does not make a principal: only an mTLS identity does.
    let plain = ConnectionLabels::new(Reporter::Source, SecurityPolicy::Unknown).with_source(Some(&mesh.client));
    assert_eq!(plain.source_principal, LabelValue::unknown());
    assert_eq!(plain.source_principal.as_str(), "unknown");
    assert_eq!(plain.connection_security_policy.as_str(), "unknown");
    assert_eq!(plain.destination_workload.as_str(), "unknown");

    assert_eq!(ResponseFlags::AuthorizationPolicyDenied.as_str(), "DENY");
    assert_eq!(ResponseFlags::ConnectionFailure.as_str(), "CONNECT");
    assert_eq!(Reporter::Destination.to_string(), "destination");
}

/// Connections opened with equal labels hold one shared copy of them (a connection's labels and
/// their strings are about 1 kB); a close with other flags counts under those flags and leaves the
/// shared copy as it was.
#[test]
fn connections_with_equal_labels_share_one_copy() {
    let mesh = mesh();
    let metrics = Metrics::new();
    let a = metrics.open(outbound_labels(&mesh));
    let b = metrics.open(outbound_labels(&mesh));
    let other = metrics.open(inbound_labels(&mesh));
    let held = std::mem::size_of_val(&a);
    println!(
        "a connection's metrics: {held} bytes; its labels: {} bytes",
        size_of::<ConnectionLabels>()
    );
    assert!(held <= 96, "a connection's metrics hold {held} bytes");
    assert!(std::ptr::eq(a.labels(), b.labels()), "one copy for equal labels");
    assert!(!std::ptr::eq(a.labels(), other.labels()));
    assert_eq!(*a.labels(), outbound_labels(&mesh));

    let failed = a.finish(ResponseFlags::ConnectionFailure);
    assert_eq!(failed.labels.response_flags, ResponseFlags::ConnectionFailure);
    assert_eq!(*b.labels(), outbound_labels(&mesh), "the shared copy keeps its flags");
    let done = b.finish(ResponseFlags::None);
    assert_eq!(*done.labels, outbound_labels(&mesh));
    drop(other);

    let text = metrics.render();
    let source = [("reporter", "source"), ("response_flags", "CONNECT")];
    assert_eq!(value(&text, "istio_tcp_connections_closed_total", &source), 1);
    let source = [("reporter", "source"), ("response_flags", "-")];
    assert_eq!(value(&text, "istio_tcp_connections_closed_total", &source), 1);
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &source), 2);
}

#[test]
fn counters_and_byte_totals_per_label_set() {
    let mesh = mesh();
    let metrics = Metrics::new();
    let passthrough = ConnectionLabels::new(Reporter::Source, SecurityPolicy::Unknown).with_source(Some(&mesh.client));

    // Two outbound connections share a label set; one inbound and one passthrough have their own.
    let out_a = metrics.open(outbound_labels(&mesh));
    let out_b = metrics.open(outbound_labels(&mesh));
    let inbound = metrics.open(inbound_labels(&mesh));
    let plain = metrics.open(passthrough);

    for chunk in [100, 2000, 1] {
        out_a.record_received(chunk);
    }
    out_a.record_sent(50_000);
    out_b.record_received(7);
    out_b.record_sent(9);
    inbound.record_received(2101);
    inbound.record_sent(4096);
    inbound.record_sent(4);
    plain.record_received(u64::from(u32::MAX) + 1);

    assert_eq!((out_a.received(), out_a.sent()), (2101, 50_000));
    assert_eq!((out_b.received(), out_b.sent()), (7, 9));
    assert_eq!((inbound.received(), inbound.sent()), (2101, 4100));

    let text = metrics.render();
    let source_mtls = [("reporter", "source"), ("connection_security_policy", "mutual_tls")];
    let destination = [("reporter", "destination")];
    let source_plain = [("reporter", "source"), ("connection_security_policy", "unknown")];
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &source_mtls), 2);
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &destination), 1);
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &source_plain), 1);
    assert_eq!(value(&text, "istio_tcp_received_bytes_total", &source_mtls), 2108);
    assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &source_mtls), 50_009);
    assert_eq!(value(&text, "istio_tcp_received_bytes_total", &destination), 2101);
    assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &destination), 4100);
    assert_eq!(value(&text, "istio_tcp_received_bytes_total", &source_plain), 1 << 32);
    assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &source_plain), 0);
    // Nothing is closed yet.
    assert!(!text.contains("istio_tcp_connections_closed_total{"), "{text}");

    let summary = out_a.finish(ResponseFlags::None);
    assert_eq!((summary.received, summary.sent), (2101, 50_000));
    assert_eq!(*summary.labels, outbound_labels(&mesh));
    drop((out_b, inbound, plain));

    let text = metrics.render();
    assert_eq!(value(&text, "istio_tcp_connections_closed_total", &source_mtls), 2);
    assert_eq!(value(&text, "istio_tcp_connections_closed_total", &destination), 1);
    assert_eq!(value(&text, "istio_tcp_connections_closed_total", &source_plain), 1);
    // Closing does not change the byte totals.
    assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &source_mtls), 50_009);
}

#[test]
fn bytes_recorded_from_many_threads_add_up() {
    let metrics = Metrics::new();
    let connection = metrics.open(ConnectionLabels::new(Reporter::Destination, SecurityPolicy::MutualTls));
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..10_000 {
                    connection.record_sent(3);
                    connection.record_received(1);
                }
            });
        }
    });
    let summary = connection.finish(ResponseFlags::None);
    assert_eq!((summary.sent, summary.received), (120_000, 40_000));
    let text = metrics.render();
    assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &[]), 120_000);
    assert_eq!(value(&text, "istio_tcp_received_bytes_total", &[]), 40_000);
}

#[test]
fn closed_exactly_once_per_connection_with_final_flags() {
    let metrics = Metrics::new();
    let labels = || ConnectionLabels::new(Reporter::Source, SecurityPolicy::MutualTls);

    let finished = metrics.open(labels());
    let failed = metrics.open(labels());
    let denied = metrics.open(labels());
    let dropped = metrics.open(labels());
    let moved = metrics.open(labels());

    let text = metrics.render();
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &[]), 5);

    let _ = finished.finish(ResponseFlags::None);
    let _ = failed.finish(ResponseFlags::ConnectionFailure);
    let _ = denied.finish(ResponseFlags::AuthorizationPolicyDenied);
    drop(dropped);
    // Dropped on another thread, after a move: still once.
    std::thread::spawn(move || drop(moved)).join().unwrap();

    let text = metrics.render();
    // Opened and bytes keep the flags the connection opened with.
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &[]), 5);
    assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &[]), 0);
    assert_eq!(
        value(&text, "istio_tcp_connections_closed_total", &[("response_flags", "-")]),
        3
    );
    assert_eq!(
        value(
            &text,
            "istio_tcp_connections_closed_total",
            &[("response_flags", "CONNECT")]
        ),
        1
    );
    assert_eq!(
        value(
            &text,
            "istio_tcp_connections_closed_total",
            &[("response_flags", "DENY")]
        ),
        1
    );
    let closed: u64 = samples(&text)
        .iter()
        .filter(|s| s.name == "istio_tcp_connections_closed_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(closed, 5);
}

#[test]
fn renders_exact_openmetrics_lines() {
    let mut mesh = mesh();
    // A hostile canonical revision: quote, backslash and newline must be escaped, not break the line.
    mesh.server.canonical_revision = "v2\"\\\nx".to_owned();
    let metrics = Metrics::new();
    let connection = metrics.open(outbound_labels(&mesh));
    connection.record_received(42);
    connection.record_sent(4200);
    let _ = connection.finish(ResponseFlags::None);

    let labels = concat!(
        r#"{reporter="source","#,
        r#"source_workload="productpage-v1",source_canonical_service="productpage",source_canonical_revision="v1","#,
        r#"source_workload_namespace="bookinfo","#,
        r#"source_principal="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage","#,
        r#"source_app="productpage",source_version="v1",source_cluster="Kubernetes","#,
        r#"destination_service="reviews.bookinfo.svc.cluster.local",destination_service_namespace="bookinfo","#,
        r#"destination_service_name="reviews","#,
        r#"destination_workload="reviews-v2",destination_canonical_service="reviews","#,
        r#"destination_canonical_revision="v2\"\\\nx",destination_workload_namespace="bookinfo","#,
        r#"destination_principal="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews","#,
        r#"destination_app="reviews",destination_version="v2\"\\\nx",destination_cluster="cluster-east","#,
        r#"request_protocol="tcp",response_flags="-",connection_security_policy="mutual_tls","#,
        r#"source_region="unknown",source_zone="unknown",destination_region="unknown",destination_zone="unknown"}"#,
    );
    let expected = [
        "# HELP istio_tcp_connections_opened The total number of TCP connections opened.".to_owned(),
        "# TYPE istio_tcp_connections_opened counter".to_owned(),
        format!("istio_tcp_connections_opened_total{labels} 1"),
        "# HELP istio_tcp_connections_closed The total number of TCP connections closed.".to_owned(),
        "# TYPE istio_tcp_connections_closed counter".to_owned(),
        format!("istio_tcp_connections_closed_total{labels} 1"),
        "# HELP istio_tcp_received_bytes The size of total bytes received during request in case of a TCP connection."
            .to_owned(),
        "# TYPE istio_tcp_received_bytes counter".to_owned(),
        format!("istio_tcp_received_bytes_total{labels} 42"),
        "# HELP istio_tcp_sent_bytes The size of total bytes sent during response in case of a TCP connection."
            .to_owned(),
        "# TYPE istio_tcp_sent_bytes counter".to_owned(),
        format!("istio_tcp_sent_bytes_total{labels} 4200"),
        "# HELP istio_tcp_sockets_open The number of TCP sockets the proxy's listeners accepted that are still open."
            .to_owned(),
        "# TYPE istio_tcp_sockets_open gauge".to_owned(),
        "istio_tcp_sockets_open{reporter=\"source\"} 0".to_owned(),
        "istio_tcp_sockets_open{reporter=\"destination\"} 0".to_owned(),
        "# EOF".to_owned(),
    ];
    assert_eq!(metrics.render().lines().collect::<Vec<_>>(), expected);

    // And the parser used by the other tests reads the escaped value back.
    let text = metrics.render();
    let sample = samples(&text).into_iter().next().unwrap();
    assert_eq!(sample.labels["destination_canonical_revision"], "v2\"\\\nx");
    assert_eq!(sample.labels.len(), 27);
}

#[test]
fn other_metrics_share_the_registry() {
    use prometheus_client::metrics::gauge::Gauge;
    let mut metrics = Metrics::new();
    let gauge: Gauge = Gauge::default();
    metrics
        .registry_mut()
        .register("meshwire_workloads", "Workloads known", gauge.clone());
    gauge.set(3);
    assert!(metrics.render().contains("\nmeshwire_workloads 3\n"));
}

#[test]
fn content_type_follows_accept() {
    assert_eq!(
        content_type(["application/openmetrics-text; other stuff"]),
        OPENMETRICS_CONTENT_TYPE
    );
    assert_eq!(
        content_type([
            "application/json",
            "text/plain;q=0.3, Application/OpenMetrics-Text;version=1.0.0"
        ]),
        OPENMETRICS_CONTENT_TYPE
    );
    assert_eq!(content_type(["text/plain", "*/*"]), TEXT_CONTENT_TYPE);
    assert_eq!(content_type(std::iter::empty()), TEXT_CONTENT_TYPE);
}

/// 2025-01-23T05:07:25.806642Z: the time every rendered line here is stamped with.
fn at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(1_737_608_845_806_642)
}
const AT: &str = "2025-01-23T05:07:25.806642Z";

/// The five tab-separated columns of a text line: time, level, target, message, fields.
fn columns(line: &str) -> [&str; 5] {
    let columns: Vec<&str> = line.split('\t').collect();
    columns.try_into().unwrap_or_else(|c| panic!("not 5 columns: {c:?}"))
}

#[test]
fn access_log_outbound_json_has_ztunnel_fields() {
    let mesh = mesh();
    let metrics = Metrics::new();
    let connection = metrics.open(outbound_labels(&mesh));
    connection.record_received(67); // the client's request
    connection.record_sent(490); // the server's response
    let summary = connection.finish(ResponseFlags::None);

    let entry = AccessLogEntry::from_summary(&summary, addr("10.0.0.1:50682"), addr("10.0.1.1:15008"))
        .with_source_workload(Some(&mesh.client))
        .with_destination_workload(Some(&mesh.server))
        .with_hbone_addr(addr("10.0.1.1:9080"))
        .with_duration(Duration::from_micros(15_999));
    let line = accesslog::format(&entry, LogFormat::Json, at());
    assert!(!line.contains('\n'));
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    let expected = serde_json::json!({
        "level": "info",
        "time": AT,
        "scope": "access",
        "message": "connection complete",
        "src.addr": "10.0.0.1:50682",
        "src.workload": "productpage-v1-6d8f",
        "src.namespace": "bookinfo",
        "src.identity": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
        "dst.addr": "10.0.1.1:15008",
        "dst.hbone_addr": "10.0.1.1:9080",
        "dst.service": "reviews.bookinfo.svc.cluster.local",
        "dst.workload": "reviews-v2-7c9b",
        "dst.namespace": "bookinfo",
        "dst.identity": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        "direction": "outbound",
        // Outbound, the local workload is the client: it sent the request and received the response.
        "bytes_sent": 67,
        "bytes_recv": 490,
        "duration": "15ms",
    });
    assert_eq!(json, expected);
    // Keys come in ztunnel's order: level, time, scope, message, then the fields.
    let keys: Vec<&str> = line.match_indices("\":").map(|(i, _)| &line[..i]).collect();
    let keys: Vec<&str> = keys.iter().map(|k| &k[k.rfind('"').unwrap() + 1..]).collect();
    assert_eq!(
        keys,
        [
            "level",
            "time",
            "scope",
            "message",
            "src.addr",
            "src.workload",
            "src.namespace",
            "src.identity",
            "dst.addr",
            "dst.hbone_addr",
            "dst.service",
            "dst.workload",
            "dst.namespace",
            "dst.identity",
            "direction",
            "bytes_sent",
            "bytes_recv",
            "duration"
        ],
        "{line}"
    );

    assert_eq!(
        accesslog::format(&entry, LogFormat::Text, at()),
        concat!(
            "2025-01-23T05:07:25.806642Z\tinfo\taccess\tconnection complete\t",
            r#"src.addr=10.0.0.1:50682 src.workload="productpage-v1-6d8f" src.namespace="bookinfo" "#,
            r#"src.identity="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage" "#,
            r#"dst.addr=10.0.1.1:15008 dst.hbone_addr=10.0.1.1:9080 "#,
            r#"dst.service="reviews.bookinfo.svc.cluster.local" dst.workload="reviews-v2-7c9b" "#,
            r#"dst.namespace="bookinfo" dst.identity="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews" "#,
            r#"direction="outbound" bytes_sent=67 bytes_recv=490 duration="15ms""#,
        )
    );
}

#[test]
fn access_log_inbound_and_plaintext_derivations() {
    let mesh = mesh();
    // Inbound: the local workload is the server; it sent the response.
    let inbound = ConnectionLabels::new(Reporter::Destination, SecurityPolicy::MutualTls)
        .with_source_principal(Some(mesh.client.spiffe_id()))
        .with_destination(Some(&mesh.server));
    let entry = AccessLogEntry::from_labels(&inbound, addr("10.0.0.1:50682"), addr("10.0.1.1:15008"))
        .with_transfer(490, 67)
        .with_error("connection closed due to policy change");
    let json: serde_json::Value = serde_json::from_str(&accesslog::format(&entry, LogFormat::Json, at())).unwrap();
    assert_eq!(json["level"], "error", "a failed connection is logged at error");
    assert_eq!(json["message"], "connection complete");
    assert_eq!(json["direction"], "inbound");
    assert_eq!(json["bytes_sent"], 490);
    assert_eq!(json["bytes_recv"], 67);
    assert_eq!(
        json["src.identity"],
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
    );
    assert_eq!(
        json["dst.workload"], "reviews",
        "the canonical service when no pod name is given"
    );
    assert_eq!(json["error"], "connection closed due to policy change");
    assert_eq!(json["duration"], "0ms");
    assert!(
        json.get("src.workload").is_none(),
        "unknown fields are left out: {json}"
    );
    assert!(json.get("dst.service").is_none());

    // Plain TCP: identities are not logged, since nothing proved them.
    let plain = ConnectionLabels::new(Reporter::Source, SecurityPolicy::Unknown)
        .with_source(Some(&mesh.client))
        .with_source_principal(Some(mesh.client.spiffe_id()))
        .with_destination(Some(&mesh.server));
    let entry = AccessLogEntry::from_labels(&plain, addr("10.0.0.1:1"), addr("10.0.1.1:9080"));
    assert_eq!(entry.direction, Direction::Outbound);
    assert_eq!(entry.src_identity, None);
    assert_eq!(entry.dst_identity, None);
    assert_eq!(entry.src_namespace.as_deref(), Some("bookinfo"));
    assert_eq!(
        accesslog::format(&entry, LogFormat::Text, at()),
        concat!(
            "2025-01-23T05:07:25.806642Z\tinfo\taccess\tconnection complete\t",
            r#"src.addr=10.0.0.1:1 src.workload="productpage" src.namespace="bookinfo" dst.addr=10.0.1.1:9080 dst.workload="reviews" dst.namespace="bookinfo" direction="outbound" bytes_sent=0 bytes_recv=0 duration="0ms""#
        )
    );
}

#[test]
fn failed_connection_line_has_ztunnel_fields_only() {
    let failed = FailedConnection::new(Direction::Inbound, addr("[::1]:40000"), addr("10.0.1.1:15008"))
        .with_error("TLS handshake failed: received corrupt message of type InvalidContentType");
    assert_eq!(
        accesslog::format_failed(&failed, LogFormat::Text, at()),
        concat!(
            "2025-01-23T05:07:25.806642Z\twarn\taccess\tconnection failed\t",
            r#"src.addr=[::1]:40000 dst.addr=10.0.1.1:15008 direction="inbound" "#,
            r#"error="TLS handshake failed: received corrupt message of type InvalidContentType""#
        )
    );
    assert_eq!(
        accesslog::format_failed(&failed, LogFormat::Json, at()),
        concat!(
            r#"{"level":"warn","time":"2025-01-23T05:07:25.806642Z","scope":"access","message":"connection failed","#,
            r#""src.addr":"[::1]:40000","dst.addr":"10.0.1.1:15008","direction":"inbound","#,
            r#""error":"TLS handshake failed: received corrupt message of type InvalidContentType"}"#
        )
    );
}

#[test]
fn text_access_log_escapes_hostile_values() {
    let mut entry = AccessLogEntry::new(Direction::Inbound, addr("[::1]:8080"), addr("10.0.0.2:80"))
        .with_duration(Duration::from_secs(2))
        .with_error("upstream said \"no\"\nfake=\"field\"\t\\ done\r\u{1b}[31m\u{2028}");
    entry.src_workload = Some("a\" injected=\"1".to_owned());
    entry.dst_hbone_addr = Some("evil host:80\nx".to_owned());
    let line = accesslog::format(&entry, LogFormat::Text, at());
    let [time, level, target, message, fields] = columns(&line);
    assert_eq!(
        (time, level, target, message),
        (AT, "error", "access", "connection complete")
    );
    assert_eq!(
        fields,
        concat!(
            r#"src.addr=[::1]:8080 src.workload="a\" injected=\"1" dst.addr=10.0.0.2:80 "#,
            r#"dst.hbone_addr="evil host:80\nx" direction="inbound" bytes_sent=0 bytes_recv=0 duration="2000ms" "#,
            r#"error="upstream said \"no\"\nfake=\"field\"\t\\ done\r\u{1b}[31m\u{2028}""#,
        )
    );
    assert!(!fields.chars().any(char::is_control));

    let json: serde_json::Value = serde_json::from_str(&accesslog::format(&entry, LogFormat::Json, at())).unwrap();
    assert_eq!(
        json["error"],
        "upstream said \"no\"\nfake=\"field\"\t\\ done\r\u{1b}[31m\u{2028}"
    );
    assert_eq!(json["src.workload"], "a\" injected=\"1");
    assert_eq!(json["src.addr"], "[::1]:8080");
}

#[test]
fn log_format_names() {
    assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
    assert_eq!("plain".parse::<LogFormat>().unwrap(), LogFormat::Text);
    assert_eq!("TEXT".parse::<LogFormat>().unwrap(), LogFormat::Text);
    let err = "yaml".parse::<LogFormat>().unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"unknown log format "yaml" (expected "plain", "text" or "json")"#
    );
    assert_eq!(LogFormat::default(), LogFormat::Text);
}

#[test]
fn layout_writes_every_line_as_ztunnel() {
    // Targets lose the binaries' crate prefix; the message and bare values cannot add a column or
    // a line; strings are quoted; numbers and booleans are bare.
    let text = render(LogFormat::Text, at(), || {
        tracing::warn!(
            target: "meshwire_dataplane::proxy::inbound",
            peer = %"10.0.0.1:1\tforged",
            name = "a b",
            count = 3_u64,
            delta = -2_i64,
            ok = true,
            "cannot serve\n{}",
            "x"
        );
        tracing::info!(target: "meshwire_hbone::server", "no fields but the message");
        tracing::error!(target: "ztunnel_uring::main", port = 15008_u64);
    });
    assert_eq!(
        text,
        concat!(
            "2025-01-23T05:07:25.806642Z\twarn\tproxy::inbound\tcannot serve\\nx\t",
            "peer=10.0.0.1:1\\tforged name=\"a b\" count=3 delta=-2 ok=true\n",
            "2025-01-23T05:07:25.806642Z\tinfo\tmeshwire_hbone::server\tno fields but the message\t\n",
            "2025-01-23T05:07:25.806642Z\terror\tmain\tport=15008\n",
        )
    );

    // Spans: `target:span{fields}` in text, an object named after the span in JSON.
    let in_span = |format| {
        render(format, at(), || {
            let span = tracing::info_span!("inbound", id = 7_u64, peer = "p");
            let _entered = span.enter();
            tracing::debug!(target: "meshwire_dataplane::proxy", "stream");
        })
    };
    assert_eq!(
        in_span(LogFormat::Text),
        "2025-01-23T05:07:25.806642Z\tdebug\tproxy:inbound{id=7 peer=\"p\"}\tstream\t\n"
    );
    assert_eq!(
        in_span(LogFormat::Json),
        concat!(
            r#"{"level":"debug","time":"2025-01-23T05:07:25.806642Z","scope":"meshwire_dataplane::proxy","#,
            r#""message":"stream","inbound":{"id":7,"peer":"p"}}"#,
            "\n"
        )
    );

    // JSON: every value that JSON lets through raw but readers take for a line break is escaped.
    let json = render(LogFormat::Json, at(), || {
        tracing::info!(target: "access", text = "a\u{2028}b\u{85}c\u{7f}", float = 0.5, nan = f64::NAN, "m\n");
    });
    assert_eq!(
        json,
        concat!(
            r#"{"level":"info","time":"2025-01-23T05:07:25.806642Z","scope":"access","message":"m\n","#,
            r#""text":"a\u2028b\u0085c\u007f","float":0.5,"nan":null}"#,
            "\n"
        )
    );
}

#[test]
fn time_stamps_are_rfc3339_utc_with_microseconds() {
    let stamp = |secs: u64, micros: u64| {
        let mut out = String::new();
        layout::write_time(
            &mut out,
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
        )
        .unwrap();
        out
    };
    assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
    assert_eq!(stamp(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
    assert_eq!(stamp(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
    assert_eq!(stamp(1_709_251_199, 0), "2024-02-29T23:59:59.000000Z");
    assert_eq!(stamp(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    assert_eq!(stamp(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z");
    // Before 1970: the first instant of 1970.
    let mut out = String::new();
    layout::write_time(&mut out, SystemTime::UNIX_EPOCH - Duration::from_secs(5)).unwrap();
    assert_eq!(out, "1970-01-01T00:00:00.000000Z");
}

/// A `tracing` subscriber that keeps each event's target, level and message.
#[derive(Default)]
struct Capture(Mutex<Vec<(String, tracing::Level, String, bool)>>);

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let meta = event.metadata();
        self.0
            .lock()
            .unwrap()
            .push((meta.target().to_owned(), *meta.level(), message.0, event.is_root()));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn emit_logs_to_the_access_target() {
    let capture = Arc::new(Capture::default());
    let ok = AccessLogEntry::new(Direction::Outbound, addr("10.0.0.1:1"), addr("10.0.0.2:2"));
    let failed = ok.clone().with_error("connection refused");
    let refused = FailedConnection::new(Direction::Inbound, addr("10.0.0.1:1"), addr("10.0.0.2:15008"));
    tracing::subscriber::with_default(Arc::clone(&capture), || {
        let span = tracing::info_span!("outbound");
        let _entered = span.enter();
        accesslog::emit(&ok);
        accesslog::emit(&failed);
        accesslog::emit_failed(&refused);
    });
    let events = capture.0.lock().unwrap();
    let expected = [
        (tracing::Level::INFO, "connection complete"),
        (tracing::Level::ERROR, "connection complete"),
        (tracing::Level::WARN, "connection failed"),
    ];
    assert_eq!(events.len(), expected.len());
    for (event, (level, message)) in events.iter().zip(expected) {
        assert_eq!(
            *event,
            ("access".to_owned(), level, message.to_owned(), true),
            "target access, no parent span"
        );
    }
}

/// No control characters (line breaks among them) and no Unicode line or paragraph separators.
fn is_one_clean_line(line: &str) -> bool {
    !line
        .chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
}

/// The `key=value` pairs of a text line's fields column, strings unquoted and unescaped as Rust's
/// `Debug` escapes them; `None` if the column does not read as such pairs.
fn parse_fields(fields: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = fields;
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        if key.is_empty() || key.contains([' ', '"']) {
            return None;
        }
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        'r' => value.push('\r'),
                        't' => value.push('\t'),
                        '0' => value.push('\0'),
                        'u' => {
                            let mut hex = String::new();
                            chars.next().filter(|(_, c)| *c == '{')?;
                            for (_, c) in chars.by_ref() {
                                if c == '}' {
                                    break;
                                }
                                hex.push(c);
                            }
                            value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                        }
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        pairs.push((key.to_owned(), value));
        rest = match next.strip_prefix(' ') {
            Some(next) if !next.is_empty() => next,
            None if next.is_empty() => next,
            _ => return None,
        };
    }
    Some(pairs)
}

/// The fields `entry` must log, in order, with their values.
fn expected_fields(entry: &AccessLogEntry) -> Vec<(String, String)> {
    let mut fields = vec![("src.addr".to_owned(), entry.src_addr.to_string())];
    let mut optional = |key: &str, value: &Option<String>| {
        if let Some(value) = value {
            fields.push((key.to_owned(), value.clone()));
        }
    };
    optional("src.workload", &entry.src_workload);
    optional("src.namespace", &entry.src_namespace);
    optional("src.identity", &entry.src_identity);
    fields.push(("dst.addr".to_owned(), entry.dst_addr.to_string()));
    let mut optional = |key: &str, value: &Option<String>| {
        if let Some(value) = value {
            fields.push((key.to_owned(), value.clone()));
        }
    };
    optional("dst.hbone_addr", &entry.dst_hbone_addr);
    optional("dst.service", &entry.dst_service);
    optional("dst.workload", &entry.dst_workload);
    optional("dst.namespace", &entry.dst_namespace);
    optional("dst.identity", &entry.dst_identity);
    fields.push(("direction".to_owned(), entry.direction.to_string()));
    fields.push(("bytes_sent".to_owned(), entry.bytes_sent.to_string()));
    fields.push(("bytes_recv".to_owned(), entry.bytes_recv.to_string()));
    fields.push(("duration".to_owned(), format!("{}ms", entry.duration.as_millis())));
    if let Some(error) = &entry.error {
        fields.push(("error".to_owned(), error.clone()));
    }
    fields
}

fn arbitrary_entry() -> impl Strategy<Value = AccessLogEntry> {
    let text = || proptest::option::of(any::<String>());
    (
        (
            any::<SocketAddr>(),
            any::<SocketAddr>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (text(), text(), text(), text(), text()),
        (text(), text(), text(), text(), text()),
        any::<u64>(),
    )
        .prop_map(
            |(
                (src, dst, inbound, sent, recv),
                (src_workload, src_namespace, src_identity, dst_hbone_addr, dst_service),
                (dst_workload, dst_namespace, dst_identity, error, _),
                nanos,
            )| {
                let direction = if inbound {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                };
                let mut entry = AccessLogEntry::new(direction, src, dst).with_duration(Duration::from_nanos(nanos));
                entry.src_workload = src_workload;
                entry.src_namespace = src_namespace;
                entry.src_identity = src_identity;
                entry.dst_hbone_addr = dst_hbone_addr;
                entry.dst_service = dst_service;
                entry.dst_workload = dst_workload;
                entry.dst_namespace = dst_namespace;
                entry.dst_identity = dst_identity;
                entry.bytes_sent = sent;
                entry.bytes_recv = recv;
                entry.error = error;
                entry
            },
        )
}

proptest! {
    #[test]
    fn format_is_one_line_and_json_round_trips(entry in arbitrary_entry()) {
        // Text: five columns, nothing that breaks the line in any, and the fields read back as
        // exactly the entry's, in order: no value can forge a field.
        let text = accesslog::format(&entry, LogFormat::Text, at());
        let [time, level, target, message, fields] = columns(&text);
        prop_assert_eq!(time, AT);
        prop_assert_eq!(level, if entry.error.is_some() { "error" } else { "info" });
        prop_assert_eq!((target, message), ("access", "connection complete"));
        prop_assert!(is_one_clean_line(fields), "{:?}", fields);
        prop_assert_eq!(parse_fields(fields), Some(expected_fields(&entry)), "{}", fields);

        let json_line = accesslog::format(&entry, LogFormat::Json, at());
        prop_assert!(is_one_clean_line(&json_line), "{:?}", json_line);
        let json: serde_json::Value = serde_json::from_str(&json_line).unwrap();
        let field = |key: &str| json.get(key).map(|v| v.as_str().unwrap().to_owned());
        prop_assert_eq!(field("message"), Some("connection complete".to_owned()));
        prop_assert_eq!(field("src.addr"), Some(entry.src_addr.to_string()));
        prop_assert_eq!(field("src.workload"), entry.src_workload.clone());
        prop_assert_eq!(field("src.namespace"), entry.src_namespace.clone());
        prop_assert_eq!(field("src.identity"), entry.src_identity.clone());
        prop_assert_eq!(field("dst.hbone_addr"), entry.dst_hbone_addr.clone());
        prop_assert_eq!(field("dst.service"), entry.dst_service.clone());
        prop_assert_eq!(field("dst.workload"), entry.dst_workload.clone());
        prop_assert_eq!(field("dst.namespace"), entry.dst_namespace.clone());
        prop_assert_eq!(field("dst.identity"), entry.dst_identity.clone());
        prop_assert_eq!(field("error"), entry.error.clone());
        prop_assert_eq!(json["bytes_sent"].as_u64(), Some(entry.bytes_sent));
        prop_assert_eq!(json["bytes_recv"].as_u64(), Some(entry.bytes_recv));
        prop_assert_eq!(field("duration"), Some(format!("{}ms", entry.duration.as_millis())));
    }

    #[test]
    fn failed_line_reads_back(src in any::<SocketAddr>(), dst in any::<SocketAddr>(), error in any::<String>()) {
        let failed = FailedConnection::new(Direction::Outbound, src, dst).with_error(&error);
        let text = accesslog::format_failed(&failed, LogFormat::Text, at());
        let [_, level, target, message, fields] = columns(&text);
        prop_assert_eq!((level, target, message), ("warn", "access", "connection failed"));
        let expected = vec![
            ("src.addr".to_owned(), src.to_string()),
            ("dst.addr".to_owned(), dst.to_string()),
            ("direction".to_owned(), "outbound".to_owned()),
            ("error".to_owned(), error.clone()),
        ];
        prop_assert_eq!(parse_fields(fields), Some(expected));
        let json_line = accesslog::format_failed(&failed, LogFormat::Json, at());
        prop_assert!(is_one_clean_line(&json_line), "{:?}", json_line);
        let json: serde_json::Value = serde_json::from_str(&json_line).unwrap();
        prop_assert_eq!(json["error"].as_str(), Some(error.as_str()));
    }

    #[test]
    fn rendered_label_values_read_back(value in any::<String>()) {
        let mut mesh = mesh();
        mesh.client.canonical_name = value.clone();
        let metrics = Metrics::new();
        let _ = metrics.open(outbound_labels(&mesh)).finish(ResponseFlags::None);
        let text = metrics.render();
        // One line per sample, whatever the value holds (four counters, two socket gauges), and the
        // value reads back.
        prop_assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 6);
        let expected = if value.is_empty() { "unknown".to_owned() } else { value };
        for sample in samples(&text).into_iter().filter(|s| s.labels.contains_key("source_app")) {
            prop_assert_eq!(&sample.labels["source_canonical_service"], &expected);
            prop_assert_eq!(&sample.labels["source_app"], &expected);
        }
    }
}
