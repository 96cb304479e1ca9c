//! The local configuration file: the YAML that ztunnel reads from `LOCAL_XDS_PATH`.
//!
//! A document has three lists, each optional: `workloads:`, `services:` and `policies:`. Every file
//! ztunnel accepts is accepted here with the same meaning (its own `examples/localhost.yaml` among
//! them: `tests/fixtures/ztunnel/`); meshwire is more forgiving about what may be left out:
//!
//! | field | ztunnel | meshwire |
//! |---|---|---|
//! | `workloads[].namespace` | required | `default` |
//! | `workloads[].serviceAccount` | `""` | `default` |
//! | `workloads[].trustDomain` | `""` | `cluster.local` |
//! | `workloads[].workloadIps`, `services` | required | empty |
//! | `workloads[].uid` | `""` | `<clusterId>//v1/Pod/<namespace>/<name>` |
//! | `workloads[].protocol` | `HBONE` or `TCP` | the same, any case; `TCP` when left out |
//! | `hboneMtlsPort` of a waypoint or gateway | required | 15008 |
//! | `applicationTunnel.protocol` | required | `NONE` |
//! | `services[].namespace` | required | `default` |
//! | `services[].hostname` | required | `<name>.<namespace>.svc.cluster.local` |
//! | `services[].ports`, `vips` | required | empty |
//! | `policies[].rules`, `dryRun` | required | empty, `false` |
//! | a field written `null` or left empty | often an error | the field's default |
//!
//! # ztunnel's schema, and what meshwire does with each field
//!
//! Fields are named as ztunnel names them (camelCase): those of its `LocalConfig`, of its `Workload`
//! (flattened into each entry of `workloads`, which adds the `services` port map), `Service` and
//! `Authorization`. A gateway address (`waypoint`, `networkGateway`) is `{destination, hboneMtlsPort}`,
//! the destination written `<network>/<ip>` or `<namespace>/<hostname>`.
//!
//! | field | type | meshwire |
//! |---|---|---|
//! | `workloads[].uid` | string | the workload's key |
//! | `workloads[].name`, `namespace` | string | lookups by name; the namespace is part of the identity |
//! | `workloads[].serviceAccount`, `trustDomain` | string | the identity (SPIFFE ID) |
//! | `workloads[].workloadIps` | list of IPs | its addresses: inbound lookup, routing |
//! | `workloads[].protocol` | `HBONE` or `TCP` | how it receives mesh traffic |
//! | `workloads[].networkMode` | `Standard` or `HostNetwork` | a host-network workload is not looked up by IP |
//! | `workloads[].node` | string | which node proxy serves it |
//! | `workloads[].network` | string | its network (`""`: the default one) |
//! | `workloads[].services` | map `<namespace>/<hostname>` to map port to target port | the services it is an endpoint of |
//! | `workloads[].waypoint` | gateway address | traffic to it goes through the waypoint |
//! | `workloads[].networkGateway` | gateway address | how other networks reach it (double HBONE) |
//! | `workloads[].hostname` | string | resolved when it has no IP |
//! | `workloads[].status` | `Healthy` or `Unhealthy` | an unhealthy workload is never chosen as an endpoint |
//! | `workloads[].capacity` | integer (1) | its weight among a service's endpoints |
//! | `workloads[].authorizationPolicies` | list of `<namespace>/<name>` | the policies that select it |
//! | `workloads[].clusterId` | string (`Kubernetes`) | the default uid, telemetry |
//! | `workloads[].workloadName`, `canonicalName`, `canonicalRevision` | string | telemetry |
//! | `workloads[].workloadType` | string (`pod`) | kept (`/config_dump`), not used |
//! | `workloads[].locality` | `{region, zone, subzone}` | kept (`/config_dump`), not used: no locality-aware choice |
//! | `workloads[].nativeTunnel` | bool | kept (`/config_dump`), not used |
//! | `workloads[].applicationTunnel` | `{protocol: NONE or PROXY, port}` | kept (`/config_dump`), not used: no PROXY header is sent |
//! | `services[].name`, `namespace`, `hostname` | string | the service and its key, `<namespace>/<hostname>` |
//! | `services[].vips` | list of `<network>/<ip>` | its VIPs |
//! | `services[].ports` | map port to target port (0: a named port) | its ports |
//! | `services[].subjectAltNames` | list of SPIFFE IDs | identities its endpoints may present besides their own |
//! | `services[].waypoint` | gateway address | traffic to it goes through the waypoint |
//! | `policies[]` | `name`, `namespace`, `scope`, `action`, `rules`, `dryRun` | enforced: see [`crate::rbac`] |
//!
//! Accepted with any value and ignored, as their istiod equivalents are ([`crate::istio::convert`]):
//!
//! - `services[].endpoints`: endpoints come from the workloads' `services`;
//! - `services[].loadBalancer` (`routingPreferences`, `mode`, `healthPolicy`): endpoints are chosen
//!   among the healthy ones, in the client's network first, weighted by `capacity`;
//! - `services[].ipFamilies`: each VIP is answered in its own family;
//! - `services[].canonical`: no service of a hostname is preferred over another;
//! - `services[].cidrVips` (a newer ztunnel's): a VIP is one address;
//! - `services[].weightedWaypoints`, `visibility`, `ingressUseWaypoint`, `extensions` (Istio's
//!   workload API, which ztunnel's types may take on): only `waypoint` is followed;
//! - `workloads[].extensions` (Istio's workload API): opaque configuration.
//!
//! # Unknown fields, bad values
//!
//! A field outside that schema (a newer ztunnel's, or a typo) is ignored with a [`ConfigWarning`]
//! naming its path and line, and a known field of the same mapping spelt almost alike (one warning
//! for the same field in every entry of a list: [`LocalConfig::parse_with_warnings`]); the
//! configuration watcher logs them once per content it applies. In `policies` an unknown field is an error instead: it could be a condition that
//! changes who is allowed. A known field whose value does not parse is an error (`protocol: HBOEN`
//! never falls back to `TCP`). A port map entry without a target (`443:`) keeps its number. A
//! service port 0 is an error, and so is a target port 0 in a workload's own port map; a service's
//! target port 0 is a named port, which only the workloads' port maps resolve. A file of nothing but
//! whitespace is an error ([`LocalConfig::parse_file`]): write `{}` for a configuration with nothing
//! in it.
//!
//! Errors name the field and, where the document has it, the line:
//!
//! ```
//! use meshwire_dataplane::xds::LocalConfig;
//!
//! let yaml = "workloads:\n- name: a\n  workloadIps: [10.0.0.x]\n";
//! let err = LocalConfig::parse(yaml).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     r#"workloads[0].workloadIps[0]: "10.0.0.x" is not an IP address (line 3, column 17)"#
//! );
//! ```
//!
//! After parsing, the configuration is checked as a whole: identities that are not valid SPIFFE IDs
//! are errors, and so are a workload IP used twice in one network, a VIP used by two services, a
//! service defined twice and a `uid` used twice (these name both places).
//!
//! ```
//! use meshwire_dataplane::xds::{LocalConfig, Protocol};
//!
//! let config = LocalConfig::parse(
//!     r#"
//! workloads:
//! - name: local
//!   workloadIps: ["127.0.0.1"]
//!   protocol: HBONE
//!   services:
//!     "default/example.com": {80: 8080}
//! services:
//! - name: example
//!   hostname: example.com
//!   vips: ["/127.10.0.1"]
//!   ports: {80: 8080}
//! "#,
//! )?;
//! let local = &config.workloads[0];
//! assert_eq!(local.protocol, Protocol::Hbone);
//! assert_eq!(local.spiffe_id().to_string(), "spiffe://cluster.local/ns/default/sa/default");
//! assert_eq!(local.uid, "Kubernetes//v1/Pod/default/local");
//! assert_eq!(config.services[0].key().to_string(), "default/example.com");
//! # Ok::<(), meshwire_dataplane::xds::ConfigError>(())
//! ```

mod error;
mod locate;
mod raw;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use meshwire_identity::id::{IstioIdentity, SpiffeId, TrustDomain};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::rbac::Authorization;

pub use error::{ConfigError, ConfigWarning, Location};

/// The namespace of a workload or service that names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The service account of a workload that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The trust domain of a workload that names none.
pub const DEFAULT_TRUST_DOMAIN: &str = meshwire_identity::id::DEFAULT_TRUST_DOMAIN;
/// The cluster of a workload that names none (ztunnel's default too).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// The DNS suffix of a service hostname derived from its name: `<name>.<namespace>.svc.<domain>`.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The HBONE port of a waypoint or gateway address that names none.
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// How many of a configuration's warnings get a location (each costs a parse of the document), and
/// how many the configuration watcher lists in its log before it only counts the rest.
pub const LOCATED_WARNINGS: usize = 16;

/// The whole local configuration: workloads, services and authorization policies.
///
/// Built by [`LocalConfig::parse`] or [`LocalConfig::load`], which validate it; see the [module
/// documentation](self) for the format.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct LocalConfig {
    /// The workloads (pods, VMs), in file order.
    pub workloads: Vec<Workload>,
    /// The services, in file order.
    pub services: Vec<Service>,
    /// The authorization policies, in file order.
    pub policies: Vec<Authorization>,
}

impl LocalConfig {
    /// Parses and validates a local configuration document.
    ///
    /// Never panics; every error names the field (`workloads[2].workloadIps[0]`) and, when the
    /// document has it, the line and column. Unknown fields are ignored; use
    /// [`LocalConfig::parse_with_warnings`] to hear about them.
    pub fn parse(yaml: &str) -> Result<LocalConfig, ConfigError> {
        Self::parse_with_warnings(yaml).map(|(config, _)| config)
    }

    /// [`LocalConfig::parse`], with a warning for each unknown field: a field neither meshwire nor
    /// ztunnel's local configuration knows, outside `policies` (where an unknown field is an error),
    /// in document order. The same unknown field in several entries of a list is one warning
    /// ([`ConfigWarning::others`]); the first [`LOCATED_WARNINGS`] warnings have their line and
    /// column. The caller logs them: the configuration watcher does, once per content of the file it
    /// applies.
    ///
    /// ```
    /// use meshwire_dataplane::xds::LocalConfig;
    ///
    /// let yaml = "workloads:\n- name: a\n  serviceAcount: shop\n";
    /// let (config, warnings) = LocalConfig::parse_with_warnings(yaml)?;
    /// assert_eq!(config.workloads[0].service_account(), "default");
    /// assert_eq!(
    ///     warnings[0].to_string(),
    ///     "workloads[0].serviceAcount: unknown field, ignored; did you mean `serviceAccount`? (line 3, column 3)"
    /// );
    /// # Ok::<(), meshwire_dataplane::xds::ConfigError>(())
    /// ```
    pub fn parse_with_warnings(yaml: &str) -> Result<(LocalConfig, Vec<ConfigWarning>), ConfigError> {
        let mut unknown = Vec::new();
        let mut collect = |path: serde_ignored::Path<'_>| unknown.extend(raw::unknown_field(&path));
        let deserializer = serde_ignored::Deserializer::new(serde_yaml_ng::Deserializer::from_str(yaml), &mut collect);
        // An empty document (or `null`) is an empty configuration.
        let raw: Option<raw::RawConfig> =
            serde_path_to_error::deserialize(deserializer).map_err(|err| error::from_serde(&err))?;
        let config = raw
            .unwrap_or_default()
            .validate()
            .map_err(|invalid| invalid.locate(yaml))?;
        // One warning per unknown field and place in the schema, whatever the list indexes.
        let mut distinct: Vec<(Vec<locate::Seg>, usize)> = Vec::new();
        let mut seen: HashMap<Vec<Option<&str>>, usize> = HashMap::new();
        for path in &unknown {
            let shape = path
                .iter()
                .map(|seg| match seg {
                    locate::Seg::Key(key) => Some(key.as_str()),
                    locate::Seg::Index(_) => None,
                })
                .collect();
            match seen.entry(shape) {
                Entry::Occupied(first) => distinct[*first.get()].1 += 1,
                Entry::Vacant(slot) => {
                    slot.insert(distinct.len());
                    distinct.push((path.clone(), 0));
                }
            }
        }
        let warnings = distinct
            .iter()
            .enumerate()
            .map(|(i, (path, others))| {
                ConfigWarning::unknown_field(yaml, path, raw::suggestion(path), *others, i < LOCATED_WARNINGS)
            })
            .collect();
        Ok((config, warnings))
    }

    /// Reads and parses a local configuration file, as [`LocalConfig::parse_file`] does.
    ///
    /// A file that cannot be read gives [`ConfigError::Read`] naming it.
    pub fn load(path: &Path) -> Result<LocalConfig, ConfigError> {
        let bytes = std::fs::read(path).map_err(|err| ConfigError::Read {
            file: path.to_owned(),
            kind: err.kind(),
            message: err.to_string(),
        })?;
        Self::parse_file(path, &bytes)
    }

    /// Parses the content of the local configuration file `file`.
    ///
    /// Content that is not UTF-8 is a [`ConfigError::Read`] naming the file. Content with nothing
    /// but whitespace is [`ConfigError::Empty`]: a file is empty when it was truncated by mistake or
    /// is being written, never as a way to say "no workloads" (write `{}` for that). Everything else
    /// is [`LocalConfig::parse`]'s.
    pub fn parse_file(file: &Path, bytes: &[u8]) -> Result<LocalConfig, ConfigError> {
        Self::parse_file_with_warnings(file, bytes).map(|(config, _)| config)
    }

    /// [`LocalConfig::parse_file`], with the warnings of [`LocalConfig::parse_with_warnings`].
    pub fn parse_file_with_warnings(
        file: &Path,
        bytes: &[u8],
    ) -> Result<(LocalConfig, Vec<ConfigWarning>), ConfigError> {
        let yaml = std::str::from_utf8(bytes).map_err(|err| ConfigError::Read {
            file: file.to_owned(),
            kind: std::io::ErrorKind::InvalidData,
            message: err.to_string(),
        })?;
        if yaml.trim().is_empty() {
            return Err(ConfigError::Empty { file: file.to_owned() });
        }
        Self::parse_with_warnings(yaml)
    }
}

/// How a workload receives mesh traffic (ztunnel's `protocol`, written `HBONE` or `TCP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// Plain TCP: the workload is not in the mesh; traffic to it is sent as is.
    #[default]
    Tcp,
    /// HBONE: mTLS and HTTP/2 CONNECT to the workload's node proxy on port 15008.
    Hbone,
}

impl Protocol {
    /// The name used in configuration files: `TCP` or `HBONE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Hbone => "HBONE",
        }
    }
}

/// Whether a workload has its own network namespace (ztunnel's `networkMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum NetworkMode {
    /// The workload has its own IPs.
    #[default]
    Standard,
    /// The workload shares its node's network: its IPs are the node's, so they do not identify it
    /// and are not indexed.
    HostNetwork,
}

impl NetworkMode {
    /// The name used in configuration files: `Standard` or `HostNetwork`.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Standard => "Standard",
            NetworkMode::HostNetwork => "HostNetwork",
        }
    }
}

/// Whether a workload may receive traffic through services (ztunnel's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum HealthStatus {
    /// Ready: chosen as a service endpoint.
    #[default]
    Healthy,
    /// Not ready: never chosen as a service endpoint (direct traffic still reaches it).
    Unhealthy,
}

impl HealthStatus {
    /// The name used in configuration files: `Healthy` or `Unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "Healthy",
            HealthStatus::Unhealthy => "Unhealthy",
        }
    }
}

/// The protocol of a workload's application tunnel (ztunnel's `applicationTunnel.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum TunnelProtocol {
    /// No tunnel: traffic is delivered as plain TCP.
    #[default]
    None,
    /// PROXY protocol v2 in front of the delivered bytes.
    Proxy,
}

impl TunnelProtocol {
    /// The name used in configuration files: `NONE` or `PROXY`.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelProtocol::None => "NONE",
            TunnelProtocol::Proxy => "PROXY",
        }
    }
}

macro_rules! keyword_serde {
    ($ty:ident, $what:literal, [$($variant:ident),+ $(,)?]) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        /// Accepts the configuration name in any case.
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                const TABLE: &[$ty] = &[$($ty::$variant),+];
                deserializer.deserialize_str(raw::KeywordVisitor {
                    what: $what,
                    table: TABLE,
                    name: |value: &$ty| value.as_str(),
                })
            }
        }
    };
}

keyword_serde!(Protocol, "protocol", [Hbone, Tcp]);
keyword_serde!(NetworkMode, "network mode", [Standard, HostNetwork]);
keyword_serde!(HealthStatus, "health status", [Healthy, Unhealthy]);
keyword_serde!(TunnelProtocol, "tunnel protocol", [None, Proxy]);

/// A service's key: its namespace and hostname, written `<namespace>/<hostname>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    /// The namespace.
    pub namespace: String,
    /// The hostname, such as `reviews.default.svc.cluster.local`.
    pub hostname: String,
}

impl NamespacedHostname {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, hostname: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            hostname: hostname.into(),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

/// Why a string is not `<namespace>/<hostname>` or `<network>/<ip>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not {expected}")]
pub struct AddressParseError {
    /// The rejected input.
    pub input: String,
    /// What was expected, such as `"<namespace>/<hostname>"`.
    pub expected: &'static str,
}

impl FromStr for NamespacedHostname {
    type Err = AddressParseError;

    /// Parses `<namespace>/<hostname>`; both parts must be non-empty and the hostname has no `/`.
    fn from_str(s: &str) -> Result<Self, AddressParseError> {
        match s.split_once('/') {
            Some((namespace, hostname)) if !namespace.is_empty() && !hostname.is_empty() && !hostname.contains('/') => {
                Ok(Self::new(namespace, hostname))
            }
            _ => Err(AddressParseError {
                input: s.to_owned(),
                expected: "<namespace>/<hostname>",
            }),
        }
    }
}

/// An IP address in a network, written `<network>/<ip>` (`/10.0.0.1` in the default network `""`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    /// The network; `""` is the default network.
    pub network: String,
    /// The address.
    pub address: IpAddr,
}

impl NetworkAddress {
    /// An address from its parts.
    pub fn new(network: impl Into<String>, address: IpAddr) -> Self {
        Self {
            network: network.into(),
            address,
        }
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl FromStr for NetworkAddress {
    type Err = AddressParseError;

    /// Parses `<network>/<ip>`; the network may be empty and contains no `/`.
    fn from_str(s: &str) -> Result<Self, AddressParseError> {
        let err = || AddressParseError {
            input: s.to_owned(),
            expected: if s.parse::<IpAddr>().is_ok() {
                "<network>/<ip> (write \"/<ip>\" for the default network)"
            } else {
                "<network>/<ip>"
            },
        };
        let (network, address) = s.split_once('/').ok_or_else(err)?;
        let address = address.parse().map_err(|_| err())?;
        Ok(Self::new(network, address))
    }
}

/// Where a waypoint or network gateway is: an address or a service hostname.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GatewayDestination {
    /// `<network>/<ip>`: a workload IP or a service VIP.
    Address(NetworkAddress),
    /// `<namespace>/<hostname>`: a service.
    Hostname(NamespacedHostname),
}

impl fmt::Display for GatewayDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayDestination::Address(address) => address.fmt(f),
            GatewayDestination::Hostname(hostname) => hostname.fmt(f),
        }
    }
}

impl FromStr for GatewayDestination {
    type Err = AddressParseError;

    /// `<network>/<ip>` when the part after the last `/` is an IP, else `<namespace>/<hostname>`
    /// (ztunnel's order).
    fn from_str(s: &str) -> Result<Self, AddressParseError> {
        if let Ok(address) = s.parse() {
            return Ok(GatewayDestination::Address(address));
        }
        s.parse()
            .map(GatewayDestination::Hostname)
            .map_err(|_| AddressParseError {
                input: s.to_owned(),
                expected: "<network>/<ip> or <namespace>/<hostname>",
            })
    }
}

/// A waypoint or network gateway: where it is and its HBONE port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct GatewayAddress {
    /// Where it is.
    pub destination: GatewayDestination,
    /// Its HBONE (mTLS) port, `hboneMtlsPort`; 15008 when left out.
    pub hbone_mtls_port: u16,
}

impl GatewayAddress {
    /// A gateway address from its parts.
    pub fn new(destination: GatewayDestination, hbone_mtls_port: u16) -> Self {
        Self {
            destination,
            hbone_mtls_port,
        }
    }
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} port {}", self.destination, self.hbone_mtls_port)
    }
}

macro_rules! string_serde {
    ($ty:ident, $expecting:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, value: &str) -> Result<$ty, E> {
                        value.parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    };
}

string_serde!(NamespacedHostname, "a string <namespace>/<hostname>");
string_serde!(NetworkAddress, "a string <network>/<ip>");
string_serde!(GatewayDestination, "a string <network>/<ip> or <namespace>/<hostname>");

/// A workload's locality, used for locality-aware load balancing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
#[non_exhaustive]
pub struct Locality {
    /// The region.
    pub region: String,
    /// The zone.
    pub zone: String,
    /// The subzone.
    pub subzone: String,
}

/// A workload's application tunnel: how its node proxy delivers traffic to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ApplicationTunnel {
    /// The tunnel protocol.
    pub protocol: TunnelProtocol,
    /// The port the workload accepts the tunnel on, if not the destination port.
    pub port: Option<u16>,
}

impl ApplicationTunnel {
    /// A tunnel from its parts.
    pub fn new(protocol: TunnelProtocol, port: Option<u16>) -> Self {
        Self { protocol, port }
    }
}

/// A workload: a pod or VM the mesh knows, with its identity, addresses and services.
///
/// The identity fields (`namespace`, `serviceAccount`, `trustDomain`) were validated together when the
/// configuration was parsed; they are read through [`Workload::identity`] and its shorthands, so that
/// they cannot disagree with the SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Workload {
    /// A unique key, such as `cluster1//v1/Pod/default/productpage-1`.
    pub uid: String,
    /// The workload's own name (the pod name).
    pub name: String,
    identity: IstioIdentity,
    spiffe_id: SpiffeId,
    /// Its addresses (one per IP family), unique within `network` unless host-networked.
    pub workload_ips: Vec<IpAddr>,
    /// How it receives mesh traffic.
    pub protocol: Protocol,
    /// The node it runs on: a node proxy serves the workloads of its node.
    pub node: String,
    /// Its network; `""` is the default network.
    pub network: String,
    /// Its services, each with the ports of this workload that serve them (service port to target
    /// port). A port left out here takes the target port of the service.
    pub services: BTreeMap<NamespacedHostname, BTreeMap<u16, u16>>,
    /// Its waypoint, if traffic addressed to it must go through one.
    pub waypoint: Option<GatewayAddress>,
    /// The gateway of its network, to reach it from another network.
    pub network_gateway: Option<GatewayAddress>,
    /// Whether it shares its node's network.
    pub network_mode: NetworkMode,
    /// A DNS name to resolve when it has no IP (`hostname`).
    pub hostname: String,
    /// The name of the owning controller, such as the deployment (`workloadName`; defaults to `name`).
    pub workload_name: String,
    /// The kind of the owner, such as `deployment` or `pod` (`workloadType`; defaults to `pod`).
    pub workload_type: String,
    /// Istio's canonical service name (`canonicalName`; defaults to `workloadName`).
    pub canonical_name: String,
    /// Istio's canonical revision (`canonicalRevision`; defaults to `latest`).
    pub canonical_revision: String,
    /// Its cluster (`clusterId`; defaults to `Kubernetes`).
    pub cluster_id: String,
    /// Its locality.
    pub locality: Locality,
    /// Whether it is chosen as a service endpoint.
    pub status: HealthStatus,
    /// Whether it terminates HBONE itself (`nativeTunnel`).
    pub native_tunnel: bool,
    /// How its node proxy delivers traffic to it.
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Names (`<namespace>/<name>`) of the authorization policies that select it.
    pub authorization_policies: Vec<String>,
    /// Its weight when a service endpoint is chosen (`capacity`; defaults to 1).
    pub capacity: u32,
}

impl Workload {
    /// A workload with this uid and identity and every other field at the default it takes when left
    /// out of the file (no IPs, `TCP`, default network, no services, capacity 1, ...).
    ///
    /// ```
    /// use meshwire_dataplane::xds::{Protocol, Workload};
    ///
    /// let mut workload = Workload::new("pod-1", "spiffe://cluster.local/ns/shop/sa/cart".parse()?);
    /// workload.workload_ips.push("10.0.0.1".parse()?);
    /// workload.protocol = Protocol::Hbone;
    /// assert_eq!(workload.namespace(), "shop");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(uid: impl Into<String>, identity: IstioIdentity) -> Self {
        Self {
            uid: uid.into(),
            name: String::new(),
            spiffe_id: identity.to_spiffe_id(),
            identity,
            workload_ips: Vec::new(),
            protocol: Protocol::default(),
            node: String::new(),
            network: String::new(),
            services: BTreeMap::new(),
            waypoint: None,
            network_gateway: None,
            network_mode: NetworkMode::default(),
            hostname: String::new(),
            workload_name: String::new(),
            workload_type: "pod".to_owned(),
            canonical_name: String::new(),
            canonical_revision: "latest".to_owned(),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            locality: Locality::default(),
            status: HealthStatus::default(),
            native_tunnel: false,
            application_tunnel: None,
            authorization_policies: Vec::new(),
            capacity: 1,
        }
    }

    /// Changes its identity, and with it its SPIFFE ID.
    pub fn set_identity(&mut self, identity: IstioIdentity) {
        self.spiffe_id = identity.to_spiffe_id();
        self.identity = identity;
    }

    /// Its identity: trust domain, namespace and service account.
    pub fn identity(&self) -> &IstioIdentity {
        &self.identity
    }

    /// Its SPIFFE ID: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// Its namespace.
    pub fn namespace(&self) -> &str {
        self.identity.namespace()
    }

    /// Its service account.
    pub fn service_account(&self) -> &str {
        self.identity.service_account()
    }

    /// Its trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.identity.trust_domain()
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workload {} ({})", self.uid, self.spiffe_id)
    }
}

/// A service: a hostname and VIPs that load-balance over the workloads that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Service {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its hostname, such as `reviews.default.svc.cluster.local`.
    pub hostname: String,
    /// Its virtual IPs, each in a network.
    pub vips: Vec<NetworkAddress>,
    /// Its ports: service port to target port. A target port of 0 means "named port": only a
    /// workload's own port map gives it.
    pub ports: BTreeMap<u16, u16>,
    /// Identities its endpoints may present besides their own (`subjectAltNames`).
    pub subject_alt_names: Vec<SpiffeId>,
    /// Its waypoint, if traffic addressed to it must go through one.
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// A service with this namespace and hostname, named after the hostname's first label, with no
    /// VIPs, ports, extra SANs or waypoint.
    pub fn new(namespace: impl Into<String>, hostname: impl Into<String>) -> Self {
        let hostname = hostname.into();
        Self {
            name: hostname.split('.').next().unwrap_or_default().to_owned(),
            namespace: namespace.into(),
            hostname,
            vips: Vec::new(),
            ports: BTreeMap::new(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        }
    }

    /// Its key, `<namespace>/<hostname>`.
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname::new(&self.namespace, &self.hostname)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service {}/{}", self.namespace, self.hostname)
    }
}
