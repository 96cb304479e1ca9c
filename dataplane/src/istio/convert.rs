//! Pure conversions from istiod's protos (`istio.workload.Workload`, `istio.workload.Service`,
//! `istio.security.Authorization`) into the model of the local configuration ([`Workload`],
//! [`Service`], [`Authorization`]).
//!
//! There is one conversion target: a resource converts to exactly what the local configuration file
//! gives for the same mesh, with the same defaults (namespace `default`, service account `default`,
//! trust domain `cluster.local`, cluster `Kubernetes`, workload name = name, canonical name = workload
//! name, canonical revision `latest`, a uid derived from cluster, namespace and name when empty,
//! HBONE port 15008 for a gateway that gives none, capacity 1 when absent). The proto enums map as
//! follows: `tunnel_protocol` `NONE` -> [`Protocol::Tcp`], `HBONE` -> [`Protocol::Hbone`];
//! `workload_type` -> its name in lower case (`deployment`, `cronjob`, `pod`, `job`), as the local
//! file writes it.
//!
//! Errors name the resource and the field with the proto's field names:
//! `workload Kubernetes//Pod/ns/a: addresses[1]: 5 bytes is not an IPv4 or IPv6 address`.
//!
//! What is refused, and why:
//! - an enum value the proxy does not know (a newer istiod), in any resource: guessing could weaken
//!   policy or misroute; for a policy, the store then installs a fail-closed placeholder
//!   ([`super::store`]);
//! - `LEGACY_ISTIO_MTLS` workloads: meshwire does not speak Istio's legacy mTLS;
//! - policy and match `extensions`: a condition the proxy does not understand; ignoring it would
//!   widen an ALLOW;
//! - what the local file refuses too: identities that are not valid SPIFFE ID parts, subject
//!   alternative names that are not SPIFFE IDs, service port 0, ports above 65535.
//!
//! What is ignored: workload and service `extensions`, `app_protocol`, a service's `load_balancing`,
//! `ip_families`, `canonical`, `ingress_use_waypoint`, and the `length` of a service address (a VIP
//! is one address). A target port 0 in a workload's own port map is left out of the map, which is
//! how the local file says "the service's target port" (the local file cannot write a 0 there).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use meshwire_control::proto::istio::security as ps;
use meshwire_control::proto::istio::workload as pw;
use meshwire_identity::id::{IdError, IstioIdentity, parse_spiffe_id, parse_trust_domain};

use crate::rbac::{Authorization, RbacAction, RbacMatch, RbacScope, ServiceAccountMatch, StringMatch};
use crate::xds::{
    ApplicationTunnel, DEFAULT_CLUSTER_DOMAIN, DEFAULT_CLUSTER_ID, DEFAULT_HBONE_PORT, DEFAULT_NAMESPACE,
    DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, GatewayAddress, GatewayDestination, HealthStatus, Locality,
    NamespacedHostname, NetworkAddress, NetworkMode, Protocol, Service, TunnelProtocol, Workload,
};

/// The kind of resource a [`ConvertError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResourceKind {
    /// An `istio.workload.Workload`.
    Workload,
    /// An `istio.workload.Service`.
    Service,
    /// An `istio.security.Authorization`.
    Policy,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Workload => "workload",
            ResourceKind::Service => "service",
            ResourceKind::Policy => "policy",
        })
    }
}

/// Why a resource cannot be converted: the resource, the field (proto field names, with indexes and
/// map keys) and what is wrong with it.
///
/// ```
/// use meshwire_control::proto::istio::workload::Workload;
/// use meshwire_dataplane::istio::convert;
///
/// let proto = Workload {
///     uid: "Kubernetes//Pod/ns/a".into(),
///     name: "a".into(),
///     namespace: "ns".into(),
///     addresses: vec![vec![10, 0, 0, 1], vec![1, 2, 3, 4, 5]],
///     ..Default::default()
/// };
/// let err = convert::workload(&proto).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "workload Kubernetes//Pod/ns/a: addresses[1]: 5 bytes is not an IPv4 or IPv6 address"
/// );
/// assert_eq!(err.field, "addresses[1]");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {resource}: {field}: {message}")]
#[non_exhaustive]
pub struct ConvertError {
    /// What kind of resource.
    pub kind: ResourceKind,
    /// The resource: a workload's uid, a service's `<namespace>/<hostname>`, a policy's
    /// `<namespace>/<name>`.
    pub resource: String,
    /// The field, such as `addresses[1]` or `rules[0].clauses[1].matches[0].source_ips[2]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConvertError {
    /// `<field>: <message>`, without the resource (for a NACK, which names the resource itself).
    pub fn detail(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

/// The resource being converted, for errors (borrowed from the resource when it names itself:
/// conversion runs for every resource of a push, errors are rare).
struct Ctx<'a> {
    kind: ResourceKind,
    resource: std::borrow::Cow<'a, str>,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConvertError {
        ConvertError {
            kind: self.kind,
            resource: self.resource.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An IP address from its 4 or 16 bytes (the wire form of Istio's addresses).
///
/// ```
/// use meshwire_dataplane::istio::convert::ip_from_bytes;
///
/// assert_eq!(ip_from_bytes(&[10, 0, 0, 1]).unwrap().to_string(), "10.0.0.1");
/// assert_eq!(ip_from_bytes(&[1, 2, 3]).unwrap_err(), "3 bytes is not an IPv4 or IPv6 address");
/// ```
pub fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(format!("{} bytes is not an IPv4 or IPv6 address", bytes.len()))
}

fn or_default(value: &str, default: &str) -> String {
    if value.is_empty() {
        default.to_owned()
    } else {
        value.to_owned()
    }
}

/// A port; `field` is formatted only for an error (conversion runs for every resource of a push).
fn port(ctx: &Ctx, field: impl std::fmt::Display, value: u32) -> Result<u16, ConvertError> {
    u16::try_from(value).map_err(|_| ctx.err(field.to_string(), format!("{value} is not a port (0 to 65535)")))
}

/// `services["<key>"]`, formatted only when an error names it.
struct ServiceField<'a>(&'a str);

impl std::fmt::Display for ServiceField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "services[{:?}]", self.0)
    }
}

fn unknown_enum(ctx: &Ctx, field: &str, value: i32) -> ConvertError {
    ctx.err(field, format!("unknown value {value}"))
}

/// A waypoint or network gateway.
fn gateway(ctx: &Ctx, field: &str, proto: &pw::GatewayAddress) -> Result<GatewayAddress, ConvertError> {
    let destination = match &proto.destination {
        None => return Err(ctx.err(field, "no destination (neither hostname nor address)")),
        Some(pw::gateway_address::Destination::Hostname(host)) => {
            let text = format!("{}/{}", host.namespace, host.hostname);
            let key: NamespacedHostname = text
                .parse()
                .map_err(|err| ctx.err(format!("{field}.hostname"), format!("{err}")))?;
            if key.namespace != host.namespace {
                return Err(ctx.err(
                    format!("{field}.hostname.namespace"),
                    format!("{:?} is not a namespace", host.namespace),
                ));
            }
            GatewayDestination::Hostname(key)
        }
        Some(pw::gateway_address::Destination::Address(address)) => {
            let ip = ip_from_bytes(&address.address).map_err(|m| ctx.err(format!("{field}.address.address"), m))?;
            GatewayDestination::Address(NetworkAddress::new(&address.network, ip))
        }
    };
    let hbone_mtls_port = match proto.hbone_mtls_port {
        0 => DEFAULT_HBONE_PORT,
        value => port(ctx, format_args!("{field}.hbone_mtls_port"), value)?,
    };
    Ok(GatewayAddress::new(destination, hbone_mtls_port))
}

/// The identity of a workload, with the local file's defaults; errors name the proto field.
fn identity(ctx: &Ctx, proto: &pw::Workload) -> Result<IstioIdentity, ConvertError> {
    let trust_domain = or_default(&proto.trust_domain, DEFAULT_TRUST_DOMAIN);
    let trust_domain = parse_trust_domain(&trust_domain).map_err(|err| ctx.err("trust_domain", err.to_string()))?;
    let namespace = or_default(&proto.namespace, DEFAULT_NAMESPACE);
    let service_account = or_default(&proto.service_account, DEFAULT_SERVICE_ACCOUNT);
    IstioIdentity::new(trust_domain, namespace, service_account).map_err(|err| {
        let field = match &err {
            IdError::Segment { field: "namespace", .. } => "namespace",
            IdError::Segment { .. } => "service_account",
            _ => "(identity)",
        };
        ctx.err(field, err.to_string())
    })
}

/// Converts an `istio.workload.Workload`.
pub fn workload(proto: &pw::Workload) -> Result<Workload, ConvertError> {
    let namespace = or_default(&proto.namespace, DEFAULT_NAMESPACE);
    let cluster_id = or_default(&proto.cluster_id, DEFAULT_CLUSTER_ID);
    let mut ctx = Ctx {
        kind: ResourceKind::Workload,
        resource: if proto.uid.is_empty() {
            format!("{namespace}/{}", proto.name).into()
        } else {
            proto.uid.as_str().into()
        },
    };
    let uid = if !proto.uid.is_empty() {
        proto.uid.clone()
    } else if !proto.name.is_empty() {
        let uid = format!("{cluster_id}//v1/Pod/{namespace}/{}", proto.name);
        ctx.resource = uid.clone().into();
        uid
    } else {
        return Err(ctx.err("uid", "missing; a workload needs a `uid` or a `name`"));
    };
    let identity = identity(&ctx, proto)?;

    let mut workload_ips = Vec::with_capacity(proto.addresses.len());
    for (i, bytes) in proto.addresses.iter().enumerate() {
        workload_ips.push(ip_from_bytes(bytes).map_err(|m| ctx.err(format!("addresses[{i}]"), m))?);
    }
    let protocol = match pw::TunnelProtocol::try_from(proto.tunnel_protocol) {
        Ok(pw::TunnelProtocol::None) => Protocol::Tcp,
        Ok(pw::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(pw::TunnelProtocol::LegacyIstioMtls) => {
            return Err(ctx.err("tunnel_protocol", "LEGACY_ISTIO_MTLS is not supported"));
        }
        Err(_) => return Err(unknown_enum(&ctx, "tunnel_protocol", proto.tunnel_protocol)),
    };
    let waypoint = proto
        .waypoint
        .as_ref()
        .map(|g| gateway(&ctx, "waypoint", g))
        .transpose()?;
    let network_gateway = proto
        .network_gateway
        .as_ref()
        .map(|g| gateway(&ctx, "network_gateway", g))
        .transpose()?;
    let workload_type = match pw::WorkloadType::try_from(proto.workload_type) {
        Ok(kind) => kind.as_str_name().to_ascii_lowercase(),
        Err(_) => return Err(unknown_enum(&ctx, "workload_type", proto.workload_type)),
    };
    let application_tunnel = match &proto.application_tunnel {
        None => None,
        Some(tunnel) => {
            let protocol = match pw::application_tunnel::Protocol::try_from(tunnel.protocol) {
                Ok(pw::application_tunnel::Protocol::None) => TunnelProtocol::None,
                Ok(pw::application_tunnel::Protocol::Proxy) => TunnelProtocol::Proxy,
                Err(_) => return Err(unknown_enum(&ctx, "application_tunnel.protocol", tunnel.protocol)),
            };
            let port = match tunnel.port {
                0 => None,
                value => Some(port(&ctx, "application_tunnel.port", value)?),
            };
            Some(ApplicationTunnel::new(protocol, port))
        }
    };
    // Sorted by key, so that the first error found does not depend on the map's order.
    let mut keys: Vec<&String> = proto.services.keys().collect();
    keys.sort();
    let mut services = BTreeMap::new();
    for key in keys {
        let field = ServiceField(key);
        let parsed: NamespacedHostname = key
            .parse()
            .map_err(|err| ctx.err(field.to_string(), format!("{err}")))?;
        let mut ports = BTreeMap::new();
        if let Some(list) = proto.services.get(key) {
            for (i, p) in list.ports.iter().enumerate() {
                let service_port = port(&ctx, format_args!("{field}.ports[{i}].service_port"), p.service_port)?;
                if service_port == 0 {
                    return Err(ctx.err(
                        format!("{field}.ports[{i}].service_port"),
                        "service port 0 is not a port clients can connect to (1 to 65535)",
                    ));
                }
                let target = port(&ctx, format_args!("{field}.ports[{i}].target_port"), p.target_port)?;
                if target != 0 {
                    ports.insert(service_port, target);
                }
            }
        }
        services.insert(parsed, ports);
    }
    let status = match pw::WorkloadStatus::try_from(proto.status) {
        Ok(pw::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pw::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => return Err(unknown_enum(&ctx, "status", proto.status)),
    };
    let network_mode = match pw::NetworkMode::try_from(proto.network_mode) {
        Ok(pw::NetworkMode::Standard) => NetworkMode::Standard,
        Ok(pw::NetworkMode::HostNetwork) => NetworkMode::HostNetwork,
        Err(_) => return Err(unknown_enum(&ctx, "network_mode", proto.network_mode)),
    };
    let locality = proto
        .locality
        .as_ref()
        .map(|l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        })
        .unwrap_or_default();
    let workload_name = or_default(&proto.workload_name, &proto.name);
    let canonical_name = or_default(&proto.canonical_name, &workload_name);

    let mut workload = Workload::new(uid, identity);
    workload.name = proto.name.clone();
    workload.workload_ips = workload_ips;
    workload.protocol = protocol;
    workload.node = proto.node.clone();
    workload.network = proto.network.clone();
    workload.services = services;
    workload.waypoint = waypoint;
    workload.network_gateway = network_gateway;
    workload.network_mode = network_mode;
    workload.hostname = proto.hostname.clone();
    workload.workload_name = workload_name;
    workload.workload_type = workload_type;
    workload.canonical_name = canonical_name;
    workload.canonical_revision = or_default(&proto.canonical_revision, "latest");
    workload.cluster_id = cluster_id;
    workload.locality = locality;
    workload.status = status;
    workload.native_tunnel = proto.native_tunnel;
    workload.application_tunnel = application_tunnel;
    workload.authorization_policies = proto.authorization_policies.clone();
    workload.capacity = proto.capacity.unwrap_or(1);
    Ok(workload)
}

/// Converts an `istio.workload.Service`.
pub fn service(proto: &pw::Service) -> Result<Service, ConvertError> {
    let namespace = or_default(&proto.namespace, DEFAULT_NAMESPACE);
    let hostname = if !proto.hostname.is_empty() {
        proto.hostname.clone()
    } else if !proto.name.is_empty() {
        format!("{}.{namespace}.svc.{DEFAULT_CLUSTER_DOMAIN}", proto.name)
    } else {
        let ctx = Ctx {
            kind: ResourceKind::Service,
            resource: format!("{namespace}/").into(),
        };
        return Err(ctx.err("hostname", "missing; a service needs a `hostname` or a `name`"));
    };
    let ctx = Ctx {
        kind: ResourceKind::Service,
        resource: format!("{namespace}/{hostname}").into(),
    };
    let name = if proto.name.is_empty() {
        hostname.split('.').next().unwrap_or_default().to_owned()
    } else {
        proto.name.clone()
    };
    let mut vips = Vec::with_capacity(proto.addresses.len());
    for (i, address) in proto.addresses.iter().enumerate() {
        let ip = ip_from_bytes(&address.address).map_err(|m| ctx.err(format!("addresses[{i}].address"), m))?;
        vips.push(NetworkAddress::new(&address.network, ip));
    }
    let mut ports = BTreeMap::new();
    for (i, p) in proto.ports.iter().enumerate() {
        let service_port = port(&ctx, format_args!("ports[{i}].service_port"), p.service_port)?;
        if service_port == 0 {
            return Err(ctx.err(
                format!("ports[{i}].service_port"),
                "service port 0 is not a port clients can connect to (1 to 65535)",
            ));
        }
        let target = port(&ctx, format_args!("ports[{i}].target_port"), p.target_port)?;
        // A port listed twice (TCP and UDP of one Kubernetes port): the last one, as ztunnel.
        ports.insert(service_port, target);
    }
    let mut subject_alt_names = Vec::with_capacity(proto.subject_alt_names.len());
    for (i, san) in proto.subject_alt_names.iter().enumerate() {
        subject_alt_names
            .push(parse_spiffe_id(san).map_err(|err| ctx.err(format!("subject_alt_names[{i}]"), err.to_string()))?);
    }
    let waypoint = proto
        .waypoint
        .as_ref()
        .map(|g| gateway(&ctx, "waypoint", g))
        .transpose()?;
    let mut service = Service::new(namespace, hostname);
    service.name = name;
    service.vips = vips;
    service.ports = ports;
    service.subject_alt_names = subject_alt_names;
    service.waypoint = waypoint;
    Ok(service)
}

/// The scope of a policy, if the value is one the proxy knows.
pub(crate) fn scope(value: i32) -> Option<RbacScope> {
    match ps::Scope::try_from(value).ok()? {
        ps::Scope::Global => Some(RbacScope::Global),
        ps::Scope::Namespace => Some(RbacScope::Namespace),
        ps::Scope::WorkloadSelector => Some(RbacScope::WorkloadSelector),
    }
}

/// The action of a policy, if the value is one the proxy knows.
pub(crate) fn action(value: i32) -> Option<RbacAction> {
    match ps::Action::try_from(value).ok()? {
        ps::Action::Allow => Some(RbacAction::Allow),
        ps::Action::Deny => Some(RbacAction::Deny),
    }
}

fn string_match(ctx: &Ctx, field: String, proto: &ps::StringMatch) -> Result<StringMatch, ConvertError> {
    use ps::string_match::MatchType;
    match &proto.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err(ctx.err(field, "no match type (exact, prefix, suffix or presence)")),
    }
}

fn string_matches(
    ctx: &Ctx,
    at: &str,
    name: &str,
    proto: &[ps::StringMatch],
) -> Result<Vec<StringMatch>, ConvertError> {
    proto
        .iter()
        .enumerate()
        .map(|(i, m)| string_match(ctx, format!("{at}.{name}[{i}]"), m))
        .collect()
}

fn nets(ctx: &Ctx, at: &str, name: &str, proto: &[ps::Address]) -> Result<Vec<IpNet>, ConvertError> {
    let mut out = Vec::with_capacity(proto.len());
    for (i, address) in proto.iter().enumerate() {
        let field = format!("{at}.{name}[{i}]");
        let ip = ip_from_bytes(&address.address).map_err(|m| ctx.err(format!("{field}.address"), m))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let length = u8::try_from(address.length)
            .ok()
            .filter(|length| *length <= max)
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}.length"),
                    format!("{} is not a prefix length of {ip} (0 to {max})", address.length),
                )
            })?;
        let net = IpNet::new(ip, length).map_err(|err| ctx.err(format!("{field}.length"), err.to_string()))?;
        out.push(net);
    }
    Ok(out)
}

fn ports(ctx: &Ctx, at: &str, name: &str, proto: &[u32]) -> Result<Vec<u16>, ConvertError> {
    proto
        .iter()
        .enumerate()
        .map(|(i, p)| port(ctx, format_args!("{at}.{name}[{i}]"), *p))
        .collect()
}

fn service_accounts(proto: &[ps::ServiceAccountMatch]) -> Vec<ServiceAccountMatch> {
    proto
        .iter()
        .map(|m| ServiceAccountMatch {
            namespace: m.namespace.clone(),
            service_account: m.service_account.clone(),
        })
        .collect()
}

fn rbac_match(ctx: &Ctx, at: &str, proto: &ps::Match) -> Result<RbacMatch, ConvertError> {
    if !proto.extensions.is_empty() {
        return Err(ctx.err(
            format!("{at}.extensions"),
            "extensions are not supported (a condition the proxy does not understand)",
        ));
    }
    Ok(RbacMatch {
        namespaces: string_matches(ctx, at, "namespaces", &proto.namespaces)?,
        not_namespaces: string_matches(ctx, at, "not_namespaces", &proto.not_namespaces)?,
        service_accounts: service_accounts(&proto.service_accounts),
        not_service_accounts: service_accounts(&proto.not_service_accounts),
        principals: string_matches(ctx, at, "principals", &proto.principals)?,
        not_principals: string_matches(ctx, at, "not_principals", &proto.not_principals)?,
        source_ips: nets(ctx, at, "source_ips", &proto.source_ips)?,
        not_source_ips: nets(ctx, at, "not_source_ips", &proto.not_source_ips)?,
        destination_ips: nets(ctx, at, "destination_ips", &proto.destination_ips)?,
        not_destination_ips: nets(ctx, at, "not_destination_ips", &proto.not_destination_ips)?,
        destination_ports: ports(ctx, at, "destination_ports", &proto.destination_ports)?,
        not_destination_ports: ports(ctx, at, "not_destination_ports", &proto.not_destination_ports)?,
    })
}

/// Converts an `istio.security.Authorization`. An unknown scope or action, a string match without a
/// type, an address that is not 4 or 16 bytes, a prefix length too long for its address, a port above
/// 65535 and any `extensions` are errors: a policy the proxy cannot fully understand is never
/// enforced half-understood.
pub fn authorization(proto: &ps::Authorization) -> Result<Authorization, ConvertError> {
    let ctx = Ctx {
        kind: ResourceKind::Policy,
        resource: format!("{}/{}", proto.namespace, proto.name).into(),
    };
    let scope = scope(proto.scope).ok_or_else(|| unknown_enum(&ctx, "scope", proto.scope))?;
    let action = action(proto.action).ok_or_else(|| unknown_enum(&ctx, "action", proto.action))?;
    if !proto.extensions.is_empty() {
        return Err(ctx.err(
            "extensions",
            "extensions are not supported (a condition the proxy does not understand)",
        ));
    }
    let mut rules = Vec::with_capacity(proto.rules.len());
    for (i, rule) in proto.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (j, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (k, m) in clause.matches.iter().enumerate() {
                matches.push(rbac_match(&ctx, &format!("rules[{i}].clauses[{j}].matches[{k}]"), m)?);
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(Authorization {
        name: proto.name.clone(),
        namespace: proto.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: proto.dry_run,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pod() -> pw::Workload {
        pw::Workload {
            uid: "Kubernetes//Pod/ns/a".into(),
            name: "a".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            tunnel_protocol: pw::TunnelProtocol::Hbone as i32,
            workload_type: pw::WorkloadType::Pod as i32,
            ..Default::default()
        }
    }

    #[test]
    fn workload_defaults_are_the_local_files() {
        let w = workload(&pod()).unwrap();
        assert_eq!(w.spiffe_id().to_string(), "spiffe://cluster.local/ns/ns/sa/default");
        assert_eq!(w.protocol, Protocol::Hbone);
        assert_eq!(w.workload_type, "pod");
        assert_eq!(w.workload_name, "a");
        assert_eq!(w.canonical_name, "a");
        assert_eq!(w.canonical_revision, "latest");
        assert_eq!(w.cluster_id, "Kubernetes");
        assert_eq!(w.capacity, 1);
        let mut with_capacity = pod();
        with_capacity.capacity = Some(0);
        assert_eq!(workload(&with_capacity).unwrap().capacity, 0);
        let mut cronjob = pod();
        cronjob.workload_type = pw::WorkloadType::Cronjob as i32;
        assert_eq!(workload(&cronjob).unwrap().workload_type, "cronjob");
    }

    #[test]
    fn workload_errors_name_the_field() {
        let mut bad = pod();
        bad.tunnel_protocol = 9;
        assert_eq!(
            workload(&bad).unwrap_err().to_string(),
            "workload Kubernetes//Pod/ns/a: tunnel_protocol: unknown value 9"
        );
        let mut bad = pod();
        bad.services.insert(
            "ns/svc".into(),
            pw::PortList {
                ports: vec![pw::Port {
                    service_port: 70000,
                    ..Default::default()
                }],
            },
        );
        assert_eq!(
            workload(&bad).unwrap_err().detail(),
            r#"services["ns/svc"].ports[0].service_port: 70000 is not a port (0 to 65535)"#
        );
        let mut bad = pod();
        bad.service_account = "a/b".into();
        assert_eq!(workload(&bad).unwrap_err().field, "service_account");
        let mut bad = pod();
        bad.waypoint = Some(pw::GatewayAddress::default());
        assert_eq!(workload(&bad).unwrap_err().field, "waypoint");
    }

    #[test]
    fn policy_with_unknown_enums_or_extensions_is_refused() {
        let policy = ps::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: 7,
            ..Default::default()
        };
        assert_eq!(
            authorization(&policy).unwrap_err().to_string(),
            "policy ns/p: action: unknown value 7"
        );
        let policy = ps::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![ps::Rule {
                clauses: vec![ps::Clause {
                    matches: vec![ps::Match {
                        source_ips: vec![ps::Address {
                            address: vec![10, 0, 0, 0],
                            length: 33,
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(
            authorization(&policy).unwrap_err().detail(),
            "rules[0].clauses[0].matches[0].source_ips[0].length: 33 is not a prefix length of 10.0.0.0 (0 to 32)"
        );
    }
}
