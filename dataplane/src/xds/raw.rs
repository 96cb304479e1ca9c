//! The document as written (serde structs with ztunnel's field names) and its validation into the
//! model types; which skipped values are unknown fields, and the known fields they may be a typo of.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use meshwire_identity::id::{IdError, IstioIdentity, parse_spiffe_id, parse_trust_domain};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::error::{Pending, field_name, field_path};
use super::locate::Seg;
use super::{
    ApplicationTunnel, ConfigError, DEFAULT_CLUSTER_DOMAIN, DEFAULT_CLUSTER_ID, DEFAULT_HBONE_PORT, DEFAULT_NAMESPACE,
    DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, GatewayAddress, GatewayDestination, HealthStatus, LocalConfig,
    Locality, NamespacedHostname, NetworkAddress, NetworkMode, Protocol, Service, TunnelProtocol, Workload,
};
use crate::rbac::Authorization;

/// `null`, `~` or an empty value read as the field's default.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// A name from a fixed table, in any case; the error lists the names.
pub(super) struct KeywordVisitor<T: 'static> {
    pub(super) what: &'static str,
    pub(super) table: &'static [T],
    pub(super) name: fn(&T) -> &'static str,
}

impl<T: 'static> KeywordVisitor<T> {
    fn names(&self) -> String {
        let names: Vec<_> = self.table.iter().map(self.name).collect();
        names.join(" or ")
    }
}

impl<T: Copy + 'static> Visitor<'_> for KeywordVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} ({})", self.what, self.names())
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        self.table
            .iter()
            .find(|candidate| (self.name)(candidate).eq_ignore_ascii_case(value))
            .copied()
            .ok_or_else(|| {
                E::custom(format_args!(
                    "{value:?} is not a {} (expected {})",
                    self.what,
                    self.names()
                ))
            })
    }
}

/// An IP address, with an error that quotes the input.
#[derive(Debug, Clone, Copy)]
struct Ip(IpAddr);

impl<'de> Deserialize<'de> for Ip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ip;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Ip, E> {
                value
                    .parse()
                    .map(Ip)
                    .map_err(|_| E::custom(format_args!("{value:?} is not an IP address")))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// A port, written as a number or a quoted number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (0 to 65535)")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Port, E> {
                u16::try_from(value)
                    .map(Port)
                    .map_err(|_| E::custom(format_args!("{value} is not a port (0 to 65535)")))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Port, E> {
                u16::try_from(value)
                    .map(Port)
                    .map_err(|_| E::custom(format_args!("{value} is not a port (0 to 65535)")))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Port, E> {
                value
                    .trim()
                    .parse()
                    .map(Port)
                    .map_err(|_| E::custom(format_args!("{value:?} is not a port (0 to 65535)")))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Refuses what a port map cannot mean: a service port 0 (no client connects to port 0), and, in a
/// workload's own map (`workload_map`), a target port 0. A service's target port 0 stays legal: it is
/// a named port, which only the workloads' own maps resolve. `at` is the path of the map.
fn check_ports(map: &BTreeMap<Port, Option<Port>>, at: Vec<Seg>, workload_map: bool) -> Result<(), Pending> {
    for (port, target) in map {
        let field = |key: u16| {
            let mut path = at.clone();
            path.push(Seg::Key(key.to_string()));
            path
        };
        if port.0 == 0 {
            return Err(Pending::new(field(0), |field| ConfigError::Invalid {
                field,
                message: "service port 0 is not a port clients can connect to (1 to 65535)".to_owned(),
                location: None,
            }));
        }
        if workload_map && target.is_some_and(|target| target.0 == 0) {
            return Err(Pending::new(field(port.0), |field| ConfigError::Invalid {
                field,
                message: format!(
                    "target port 0 is not a port the workload accepts on (1 to 65535); leave the target out \
                     to keep the service port {}",
                    port.0
                ),
                location: None,
            }));
        }
    }
    Ok(())
}

fn ports(map: BTreeMap<Port, Option<Port>>) -> BTreeMap<u16, u16> {
    map.into_iter()
        .map(|(port, target)| (port.0, target.map_or(port.0, |target| target.0)))
        .collect()
}

#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "a mapping with `workloads`, `services` and `policies`"
)]
#[derive(Default)]
pub(super) struct RawConfig {
    #[serde(default, deserialize_with = "nullable")]
    workloads: Vec<RawWorkload>,
    #[serde(default, deserialize_with = "nullable")]
    services: Vec<RawService>,
    #[serde(default, deserialize_with = "nullable")]
    policies: Vec<Authorization>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", expecting = "a workload (a mapping)")]
struct RawWorkload {
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    service_account: String,
    #[serde(default, deserialize_with = "nullable")]
    trust_domain: String,
    #[serde(default, deserialize_with = "nullable")]
    workload_ips: Vec<Ip>,
    #[serde(default, deserialize_with = "nullable")]
    protocol: Protocol,
    #[serde(default, deserialize_with = "nullable")]
    node: String,
    #[serde(default, deserialize_with = "nullable")]
    network: String,
    /// Service key to (service port to target port); a port without a target keeps its number.
    #[serde(default, deserialize_with = "nullable")]
    services: BTreeMap<NamespacedHostname, Option<BTreeMap<Port, Option<Port>>>>,
    #[serde(default)]
    waypoint: Option<RawGateway>,
    #[serde(default)]
    network_gateway: Option<RawGateway>,
    #[serde(default, deserialize_with = "nullable")]
    network_mode: NetworkMode,
    #[serde(default, deserialize_with = "nullable")]
    hostname: String,
    #[serde(default, deserialize_with = "nullable")]
    workload_name: String,
    #[serde(default, deserialize_with = "nullable")]
    workload_type: String,
    #[serde(default, deserialize_with = "nullable")]
    canonical_name: String,
    #[serde(default, deserialize_with = "nullable")]
    canonical_revision: String,
    #[serde(default, deserialize_with = "nullable")]
    native_tunnel: bool,
    #[serde(default)]
    application_tunnel: Option<RawApplicationTunnel>,
    #[serde(default, deserialize_with = "nullable")]
    authorization_policies: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    status: HealthStatus,
    #[serde(default, deserialize_with = "nullable")]
    cluster_id: String,
    #[serde(default, deserialize_with = "nullable")]
    locality: Locality,
    #[serde(default)]
    capacity: Option<u32>,
    // Istio's workload API field, accepted and not used (istiod's are ignored too).
    #[serde(default)]
    extensions: Option<Unused>,
}

#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "a gateway address (a mapping with `destination` and `hboneMtlsPort`)"
)]
struct RawGateway {
    destination: GatewayDestination,
    #[serde(default)]
    hbone_mtls_port: Option<Port>,
}

impl From<RawGateway> for GatewayAddress {
    fn from(raw: RawGateway) -> Self {
        GatewayAddress::new(
            raw.destination,
            raw.hbone_mtls_port.map_or(DEFAULT_HBONE_PORT, |port| port.0),
        )
    }
}

#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "an application tunnel (a mapping with `protocol` and `port`)"
)]
struct RawApplicationTunnel {
    #[serde(default, deserialize_with = "nullable")]
    protocol: TunnelProtocol,
    #[serde(default)]
    port: Option<Port>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", expecting = "a service (a mapping)")]
struct RawService {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    hostname: String,
    #[serde(default, deserialize_with = "nullable")]
    vips: Vec<NetworkAddress>,
    #[serde(default, deserialize_with = "nullable")]
    ports: BTreeMap<Port, Option<Port>>,
    #[serde(default, deserialize_with = "nullable")]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    waypoint: Option<RawGateway>,
    // Accepted with any value for compatibility with ztunnel's format (and Istio's workload API),
    // and not used; the module documentation says why for each.
    #[serde(default)]
    endpoints: Option<Unused>,
    #[serde(default)]
    load_balancer: Option<Unused>,
    #[serde(default)]
    ip_families: Option<Unused>,
    #[serde(default)]
    canonical: Option<Unused>,
    #[serde(default)]
    cidr_vips: Option<Unused>,
    #[serde(default)]
    weighted_waypoints: Option<Unused>,
    #[serde(default)]
    visibility: Option<Unused>,
    #[serde(default)]
    ingress_use_waypoint: Option<Unused>,
    #[serde(default)]
    extensions: Option<Unused>,
}

/// A field of ztunnel's schema (or Istio's workload API) that meshwire accepts with any value and does
/// not use. Read as a whole value rather than skipped: skipped values are how unknown fields are
/// found, and nothing inside this one is unknown.
struct Unused;

impl<'de> Deserialize<'de> for Unused {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_yaml_ng::Value::deserialize(deserializer).map(|_| Unused)
    }
}

/// The path of an unknown field, from what `serde_ignored` reports as skipped; `None` for a skipped
/// value that is not a mapping entry, and for anything under `policies`, whose types refuse unknown
/// fields (what they skip on purpose, such as the `[]` of `!Presence []`, is not a field).
pub(super) fn unknown_field(path: &serde_ignored::Path<'_>) -> Option<Vec<Seg>> {
    fn push(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
        match path {
            serde_ignored::Path::Root => {}
            serde_ignored::Path::Seq { parent, index } => {
                push(parent, out);
                out.push(Seg::Index(*index));
            }
            serde_ignored::Path::Map { parent, key } => {
                push(parent, out);
                out.push(Seg::Key(key.clone()));
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => push(parent, out),
        }
    }
    if !matches!(path, serde_ignored::Path::Map { .. }) {
        return None;
    }
    let mut segs = Vec::new();
    push(path, &mut segs);
    match segs.first() {
        Some(Seg::Key(top)) if top == "policies" => None,
        _ => Some(segs),
    }
}

/// A known field of the mapping that holds the unknown field at `path`, spelt almost alike (the same
/// but for case, `_` and `-`, or at most two edits away).
pub(super) fn suggestion(path: &[Seg]) -> Option<&'static str> {
    let (Some(Seg::Key(unknown)), parent) = (path.last(), &path[..path.len().saturating_sub(1)]) else {
        return None;
    };
    fn key(seg: &Seg) -> Option<&str> {
        match seg {
            Seg::Key(key) => Some(key.as_str()),
            Seg::Index(_) => None,
        }
    }
    let known: &'static [&'static str] = match parent {
        [] => fields_of::<RawConfig>(),
        [top, Seg::Index(_)] if key(top) == Some("workloads") => fields_of::<RawWorkload>(),
        [top, Seg::Index(_)] if key(top) == Some("services") => fields_of::<RawService>(),
        [top, Seg::Index(_), field] => match (key(top), key(field)) {
            (Some("workloads" | "services"), Some("waypoint")) | (Some("workloads"), Some("networkGateway")) => {
                fields_of::<RawGateway>()
            }
            (Some("workloads"), Some("applicationTunnel")) => fields_of::<RawApplicationTunnel>(),
            (Some("workloads"), Some("locality")) => fields_of::<Locality>(),
            _ => &[],
        },
        _ => &[],
    };
    let plain = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let unknown = plain(unknown);
    known
        .iter()
        .map(|candidate| (edits(&plain(candidate), &unknown), *candidate))
        .filter(|(distance, _)| *distance <= 2 && *distance < unknown.chars().count())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// The Levenshtein distance between `a` and `b` (in characters).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The field names (as the document writes them) of a struct with a derived `Deserialize`: serde
/// hands them to `deserialize_struct`, where a probe deserializer catches them.
fn fields_of<T: de::DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);

    impl fmt::Display for Fields {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "fields {:?}", self.0)
        }
    }

    impl std::error::Error for Fields {}

    impl de::Error for Fields {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Fields(&[])
        }
    }

    struct Probe;

    impl<'de> Deserializer<'de> for Probe {
        type Error = Fields;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    match T::deserialize(Probe) {
        Err(Fields(fields)) => fields,
        Ok(_) => &[],
    }
}

/// The name of a field path, for an error that mentions a second place.
fn named(path: Vec<Seg>) -> String {
    field_name(&path)
}

fn or_default(value: String, default: &str) -> String {
    if value.is_empty() { default.to_owned() } else { value }
}

impl RawConfig {
    pub(super) fn validate(self) -> Result<LocalConfig, Pending> {
        let mut workloads = Vec::with_capacity(self.workloads.len());
        let mut uids: HashMap<String, usize> = HashMap::new();
        let mut ips: HashMap<(String, IpAddr), (usize, usize)> = HashMap::new();
        for (i, raw) in self.workloads.into_iter().enumerate() {
            let uid_given = !raw.uid.is_empty();
            let workload = raw.validate(i)?;
            if let Some(&first) = uids.get(&workload.uid) {
                let uid_path = if uid_given {
                    field_path!["workloads", i, "uid"]
                } else {
                    field_path!["workloads", i]
                };
                return Err(Pending::new(uid_path, |field| ConfigError::DuplicateUid {
                    field,
                    uid: workload.uid.clone(),
                    other: named(field_path!["workloads", first]),
                    location: None,
                }));
            }
            uids.insert(workload.uid.clone(), i);
            if workload.network_mode != NetworkMode::HostNetwork {
                for (j, ip) in workload.workload_ips.iter().enumerate() {
                    match ips.get(&(workload.network.clone(), *ip)) {
                        Some(&(wi, wj)) => {
                            return Err(Pending::new(field_path!["workloads", i, "workloadIps", j], |field| {
                                ConfigError::DuplicateWorkloadIp {
                                    field,
                                    network: workload.network.clone(),
                                    ip: *ip,
                                    other: named(field_path!["workloads", wi, "workloadIps", wj]),
                                    location: None,
                                }
                            }));
                        }
                        None => {
                            ips.insert((workload.network.clone(), *ip), (i, j));
                        }
                    }
                }
            }
            workloads.push(workload);
        }

        let mut services = Vec::with_capacity(self.services.len());
        let mut keys: HashMap<NamespacedHostname, usize> = HashMap::new();
        let mut vips: HashMap<NetworkAddress, (usize, usize)> = HashMap::new();
        for (i, raw) in self.services.into_iter().enumerate() {
            let service = raw.validate(i)?;
            let key = service.key();
            if let Some(&first) = keys.get(&key) {
                return Err(Pending::new(field_path!["services", i], |field| {
                    ConfigError::DuplicateService {
                        field,
                        key,
                        other: named(field_path!["services", first]),
                        location: None,
                    }
                }));
            }
            keys.insert(key, i);
            for (j, vip) in service.vips.iter().enumerate() {
                if let Some(&(si, sj)) = vips.get(vip) {
                    return Err(Pending::new(field_path!["services", i, "vips", j], |field| {
                        ConfigError::DuplicateVip {
                            field,
                            vip: vip.clone(),
                            other: named(field_path!["services", si, "vips", sj]),
                            location: None,
                        }
                    }));
                }
                vips.insert(vip.clone(), (i, j));
            }
            services.push(service);
        }

        Ok(LocalConfig {
            workloads,
            services,
            policies: self.policies,
        })
    }
}

impl RawWorkload {
    fn validate(self, i: usize) -> Result<Workload, Pending> {
        let namespace = or_default(self.namespace, DEFAULT_NAMESPACE);
        let service_account = or_default(self.service_account, DEFAULT_SERVICE_ACCOUNT);
        let trust_domain = or_default(self.trust_domain, DEFAULT_TRUST_DOMAIN);
        let identity_error = |field: &str, source: IdError| {
            let field_path = if field.is_empty() {
                field_path!["workloads", i]
            } else {
                field_path!["workloads", i, field]
            };
            Pending::new(field_path, |field| ConfigError::Identity {
                field,
                source,
                location: None,
            })
        };
        let trust_domain = parse_trust_domain(&trust_domain).map_err(|err| identity_error("trustDomain", err))?;
        let identity = IstioIdentity::new(trust_domain, namespace, service_account).map_err(|err| {
            let field = match &err {
                IdError::Segment { field: "namespace", .. } => "namespace",
                IdError::Segment { .. } => "serviceAccount",
                _ => "",
            };
            identity_error(field, err)
        })?;
        let cluster_id = or_default(self.cluster_id, DEFAULT_CLUSTER_ID);
        let uid = if !self.uid.is_empty() {
            self.uid
        } else if !self.name.is_empty() {
            format!("{cluster_id}//v1/Pod/{}/{}", identity.namespace(), self.name)
        } else {
            return Err(Pending::new(field_path!["workloads", i, "name"], |field| {
                ConfigError::Missing {
                    field,
                    hint: "a workload needs a `name` or a `uid`",
                    location: None,
                }
            }));
        };
        let workload_name = or_default(self.workload_name, &self.name);
        let canonical_name = or_default(self.canonical_name, &workload_name);
        for (key, ports_of_key) in &self.services {
            if let Some(ports_of_key) = ports_of_key {
                check_ports(
                    ports_of_key,
                    field_path!["workloads", i, "services", key.to_string().as_str()],
                    true,
                )?;
            }
        }
        let services = self
            .services
            .into_iter()
            .map(|(key, ports_of_key)| (key, ports(ports_of_key.unwrap_or_default())))
            .collect();
        if self.extensions.is_some() {
            tracing::debug!(workload = %uid, "accepted and not used: the extensions of a local workload");
        }
        Ok(Workload {
            uid,
            name: self.name,
            spiffe_id: identity.to_spiffe_id(),
            identity,
            workload_ips: self.workload_ips.into_iter().map(|ip| ip.0).collect(),
            protocol: self.protocol,
            node: self.node,
            network: self.network,
            services,
            waypoint: self.waypoint.map(GatewayAddress::from),
            network_gateway: self.network_gateway.map(GatewayAddress::from),
            network_mode: self.network_mode,
            hostname: self.hostname,
            workload_name,
            workload_type: or_default(self.workload_type, "pod"),
            canonical_name,
            canonical_revision: or_default(self.canonical_revision, "latest"),
            cluster_id,
            locality: self.locality,
            status: self.status,
            native_tunnel: self.native_tunnel,
            application_tunnel: self.application_tunnel.map(|tunnel| ApplicationTunnel {
                protocol: tunnel.protocol,
                port: tunnel.port.map(|port| port.0),
            }),
            authorization_policies: self.authorization_policies,
            capacity: self.capacity.unwrap_or(1),
        })
    }
}

impl RawService {
    /// The accepted-and-ignored fields this service gives.
    fn ignored_fields(&self) -> Vec<&'static str> {
        [
            ("endpoints", self.endpoints.is_some()),
            ("loadBalancer", self.load_balancer.is_some()),
            ("ipFamilies", self.ip_families.is_some()),
            ("canonical", self.canonical.is_some()),
            ("cidrVips", self.cidr_vips.is_some()),
            ("weightedWaypoints", self.weighted_waypoints.is_some()),
            ("visibility", self.visibility.is_some()),
            ("ingressUseWaypoint", self.ingress_use_waypoint.is_some()),
            ("extensions", self.extensions.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }

    fn validate(self, i: usize) -> Result<Service, Pending> {
        let ignored = self.ignored_fields();
        let namespace = or_default(self.namespace, DEFAULT_NAMESPACE);
        let hostname = if !self.hostname.is_empty() {
            self.hostname
        } else if !self.name.is_empty() {
            format!("{}.{namespace}.svc.{DEFAULT_CLUSTER_DOMAIN}", self.name)
        } else {
            return Err(Pending::new(field_path!["services", i, "hostname"], |field| {
                ConfigError::Missing {
                    field,
                    hint: "a service needs a `hostname` or a `name`",
                    location: None,
                }
            }));
        };
        let name = if self.name.is_empty() {
            hostname.split('.').next().unwrap_or_default().to_owned()
        } else {
            self.name
        };
        let mut subject_alt_names = Vec::with_capacity(self.subject_alt_names.len());
        for (j, san) in self.subject_alt_names.iter().enumerate() {
            let id = parse_spiffe_id(san).map_err(|source| {
                Pending::new(field_path!["services", i, "subjectAltNames", j], |field| {
                    ConfigError::Identity {
                        field,
                        source,
                        location: None,
                    }
                })
            })?;
            subject_alt_names.push(id);
        }
        check_ports(&self.ports, field_path!["services", i, "ports"], false)?;
        if !ignored.is_empty() {
            tracing::debug!(service = %hostname, fields = ?ignored, "accepted and not used: fields of a local service");
        }
        Ok(Service {
            name,
            namespace,
            hostname,
            vips: self.vips,
            ports: ports(self.ports),
            subject_alt_names,
            waypoint: self.waypoint.map(GatewayAddress::from),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn field_names_quote_keys_that_are_not_plain() {
        assert_eq!(
            named(field_path!["workloads", 2, "workloadIps", 0]),
            "workloads[2].workloadIps[0]"
        );
        assert_eq!(
            named(field_path!["workloads", 0, "services", "default/example.com", "80"]),
            r#"workloads[0].services["default/example.com"].80"#
        );
        assert_eq!(field_name(&[]), "(top level)");
        assert_eq!(field_name(&[Seg::Key(String::new())]), r#"[""]"#);
    }
}
