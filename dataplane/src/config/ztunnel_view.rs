//! The configuration as ztunnel's `/config_dump` shows its own under `config`: ztunnel's camelCase
//! names for the settings both proxies have, with meshwire's values. Settings ztunnel has and
//! meshwire does not (its DNS resolver options, keepalive tuning, on-demand xDS) are left out rather
//! than made up; meshwire's own settings are under the dump's `meshwire` key.

use std::time::Duration;

use serde_json::{Value, json};

use super::{CertificateSource, Config, LocalConfigSource, ProxyMode, Roots};

/// A duration as serde writes a `std::time::Duration` (ztunnel's `{"secs": .., "nanos": ..}`).
fn duration(d: Duration) -> Value {
    json!({ "secs": d.as_secs(), "nanos": d.subsec_nanos() })
}

fn roots(roots: &Roots) -> Value {
    match roots {
        Roots::File(path) => json!({ "File": path.display().to_string() }),
        Roots::System => json!("Default"),
        Roots::Pem(_) => json!("Static"),
    }
}

/// [`Config`] in ztunnel's `config` shape (see the module documentation).
pub fn ztunnel_config(config: &Config) -> Value {
    let listeners = &config.listeners;
    let (proxy_mode, local_node, workload) = match &config.mode {
        ProxyMode::Shared { node } => ("Shared", node.clone(), Value::Null),
        ProxyMode::Dedicated { workload } => (
            "Dedicated",
            None,
            json!({ "name": workload.name, "namespace": workload.namespace, "serviceAccount": workload.service_account }),
        ),
    };
    let xds = config.istio.xds.as_ref();
    let ca = match &config.certificates {
        CertificateSource::IstioCa(ca) => Some(ca),
        CertificateSource::LocalCa { .. } | CertificateSource::Files { .. } => None,
    };
    let settings = &config.pool.settings;
    let mut view = json!({
        "proxy": true,
        "dnsProxy": listeners.dns.is_some(),
        "windowSize": settings.stream_window(),
        "connectionWindowSize": settings.connection_window(),
        "poolMaxStreamsPerConn": config.pool.max_streams_per_connection,
        "poolUnusedReleaseTimeout": duration(config.pool.idle_timeout),
        "socks5Addr": listeners.socks5.map(|a| a.to_string()),
        "adminAddr": listeners.admin.to_string(),
        "statsAddr": listeners.metrics.to_string(),
        "readinessAddr": listeners.readiness.to_string(),
        "inboundAddr": listeners.inbound.to_string(),
        "inboundPlaintextAddr": listeners.inbound_plaintext.to_string(),
        "outboundAddr": listeners.outbound.to_string(),
        "dnsProxyAddr": listeners.dns.map(|a| a.to_string()),
        "network": config.network,
        "localNode": local_node,
        "proxyMode": proxy_mode,
        "proxyWorkloadInformation": workload,
    });
    let rest = json!({
        "clusterId": config.cluster_id,
        "clusterDomain": config.cluster_domain,
        "caAddress": ca.map(|ca| ca.address.clone()),
        "caRootCert": ca.map(|ca| roots(&ca.roots)),
        "altCaHostname": ca.and_then(|ca| ca.server_name.clone()),
        "xdsAddress": xds.map(|xds| xds.address.clone()),
        "xdsRootCert": xds.map(|xds| roots(&xds.roots)),
        "altXdsHostname": xds.and_then(|xds| xds.server_name.clone()),
        "preferedServiceNamespace": config.dns.preferred_namespace,
        "secretTtl": duration(config.cert_ttl),
        "xdsOnDemand": false,
        "fakeCa": matches!(config.certificates, CertificateSource::LocalCa { .. }),
        "selfTerminationDeadline": duration(config.drain_deadline),
        "proxyMetadata": config.istio.metadata.iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect::<serde_json::Map<_, _>>(),
        "numWorkerThreads": config.worker_threads,
        "requireOriginalSource": config.original_source,
        "inpodUds": config.inpod.as_ref().map(|i| i.socket.display().to_string()),
        "inpodPortReuse": config.inpod.as_ref().map(|i| i.port_reuse),
        "packetMark": config.packet_mark.value(),
        "xdsHeaders": xds.map(|xds| xds.headers.clone()).unwrap_or_default(),
        "caHeaders": ca.map(|ca| ca.headers.clone()).unwrap_or_default(),
        "ipv6Enabled": listeners.ipv6,
        "localXdsConfig": match &config.local_config {
            Some(LocalConfigSource::File(path)) => json!({ "File": path.display().to_string() }),
            Some(LocalConfigSource::Inline(_)) => json!("Static"),
            None => Value::Null,
        },
    });
    if let (Some(view), Value::Object(rest)) = (view.as_object_mut(), rest) {
        view.extend(rest);
    }
    view
}
