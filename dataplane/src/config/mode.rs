//! Whom the proxy serves and where it runs: the mode, the workload of dedicated mode, the node, the
//! proxy's address, the cluster and network, and the local configuration file.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use meshwire_identity::id::{IstioIdentity, TrustDomain};

use super::error::{Error, Origin};
use super::options::Key::Env;
use super::options::{Found, H_MODE, Inputs, Kind, Opt};
use super::values::{non_empty, parse_bool, parse_ip};

/// Whom the proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyMode {
    /// The workloads of one node (`PROXY_MODE=shared`, ztunnel's default).
    Shared {
        /// The node (`NODE_NAME`); `None` serves the workloads of every node.
        node: Option<String>,
    },
    /// One workload only (`PROXY_MODE=dedicated`), as a sidecar or a gateway.
    Dedicated {
        /// The workload.
        workload: WorkloadInfo,
    },
}

/// A workload, as `PROXY_WORKLOAD_INFO` names it: `namespace/name/service-account`.
///
/// ```
/// use meshwire_dataplane::config::WorkloadInfo;
///
/// let w: WorkloadInfo = "default/client-7d9f/client".parse()?;
/// assert_eq!(w.namespace, "default");
/// assert_eq!(w.name, "client-7d9f");
/// assert_eq!(w.service_account, "client");
/// assert_eq!(w.to_string(), "default/client-7d9f/client");
/// assert!("default/client".parse::<WorkloadInfo>().is_err());
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Service account.
    pub service_account: String,
}

impl WorkloadInfo {
    /// The workload's Istio identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &TrustDomain) -> Result<IstioIdentity, meshwire_identity::id::IdError> {
        IstioIdentity::new(trust_domain.clone(), &self.namespace, &self.service_account)
    }
}

impl FromStr for WorkloadInfo {
    type Err = String;

    /// Parses `namespace/name/service-account`; the error says what is wrong.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let &[namespace, name, service_account] = parts.as_slice() else {
            return Err(format!(
                "expected namespace/name/service-account (three parts separated by '/'), found {} part(s)",
                parts.len()
            ));
        };
        for (part, what) in [
            (namespace, "namespace"),
            (name, "name"),
            (service_account, "service account"),
        ] {
            if part.trim().is_empty() {
                return Err(format!("the {what} is empty"));
            }
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

impl fmt::Display for WorkloadInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.name, self.service_account)
    }
}

/// Where the local configuration (ztunnel's `LOCAL_XDS_PATH` format) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalConfigSource {
    /// A file (`--config`, `LOCAL_XDS_PATH`).
    File(PathBuf),
    /// The YAML itself (`LOCAL_XDS`).
    Inline(String),
}

pub(super) const CONFIG: Opt = Opt {
    flag: "--config",
    value_name: "FILE",
    keys: &[Env("LOCAL_XDS_PATH")],
    help: "Local configuration file: workloads, services and policies (LOCAL_XDS holds the YAML inline)",
    ..Opt::new(H_MODE)
};
pub(super) const MODE: Opt = Opt {
    flag: "--mode",
    value_name: "shared|dedicated",
    keys: &[Env("PROXY_MODE")],
    default: Some("shared"),
    help: "Serve the workloads of a node (shared) or one workload (dedicated)",
    ..Opt::new(H_MODE)
};
pub(super) const WORKLOAD: Opt = Opt {
    flag: "--workload",
    value_name: "NS/NAME/SA",
    keys: &[Env("PROXY_WORKLOAD_INFO")],
    help: "The workload of dedicated mode: namespace/name/service-account (implies --mode dedicated)",
    ..Opt::new(H_MODE)
};
pub(super) const NODE_NAME: Opt = Opt {
    flag: "--node-name",
    value_name: "NAME",
    keys: &[Env("NODE_NAME")],
    help: "The node whose workloads a shared proxy serves",
    default_note: Some("every node"),
    ..Opt::new(H_MODE)
};
pub(super) const INSTANCE_IP: Opt = Opt {
    flag: "--instance-ip",
    value_name: "IP",
    keys: &[Env("INSTANCE_IP")],
    help: "The proxy's own address",
    ..Opt::new(H_MODE)
};
pub(super) const CLUSTER_ID: Opt = Opt {
    flag: "--cluster-id",
    value_name: "ID",
    keys: &[Env("ISTIO_META_CLUSTER_ID"), Env("CLUSTER_ID")],
    default: Some("Kubernetes"),
    help: "The cluster this proxy runs in",
    ..Opt::new(H_MODE)
};
pub(super) const CLUSTER_DOMAIN: Opt = Opt {
    flag: "--cluster-domain",
    value_name: "DOMAIN",
    keys: &[Env("CLUSTER_DOMAIN")],
    default: Some("cluster.local"),
    help: "The DNS domain of the cluster",
    ..Opt::new(H_MODE)
};

/// In-pod mode: istio-cni hands the proxy each pod's network namespace over a Unix socket, and the
/// proxy serves the pod's listeners inside it (see [`crate::inpod`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InpodConfig {
    /// istio-cni's socket (`INPOD_UDS`).
    pub socket: PathBuf,
    /// `SO_REUSEPORT` on the pods' listeners (`INPOD_PORT_REUSE`), so that a new instance binds
    /// beside this one during an upgrade.
    pub port_reuse: bool,
}

pub(super) const INPOD: Opt = Opt {
    flag: "--inpod",
    value_name: "BOOL",
    keys: &[Env("INPOD_ENABLED")],
    default: Some("false"),
    kind: Kind::Bool,
    help: "In-pod mode: serve each pod inside its own network namespace, handed over by istio-cni",
    ..Opt::new(H_MODE)
};
pub(super) const INPOD_SOCKET: Opt = Opt {
    flag: "--inpod-socket",
    value_name: "PATH",
    keys: &[Env("INPOD_UDS")],
    default: Some("/var/run/ztunnel/ztunnel.sock"),
    help: "istio-cni's socket (in-pod mode)",
    ..Opt::new(H_MODE)
};
pub(super) const INPOD_PORT_REUSE: Opt = Opt {
    flag: "--inpod-port-reuse",
    value_name: "BOOL",
    keys: &[Env("INPOD_PORT_REUSE")],
    default: Some("true"),
    kind: Kind::Bool,
    help: "SO_REUSEPORT on the pods' listeners, so that an upgraded proxy binds beside this one (in-pod mode)",
    ..Opt::new(H_MODE)
};

pub(super) const NETWORK: Opt = Opt {
    flag: "--network",
    value_name: "NAME",
    keys: &[Env("NETWORK")],
    help: "The network this proxy is in",
    default_note: Some("the default network"),
    ..Opt::new(H_MODE)
};

impl Inputs<'_> {
    pub(super) fn mode(&self, trust_domain: &TrustDomain) -> Result<ProxyMode, Error> {
        let mode = self.required(&MODE, |s| match s.trim().to_ascii_lowercase().as_str() {
            "shared" => Ok(false),
            "dedicated" => Ok(true),
            _ => Err("expected shared or dedicated".to_owned()),
        })?;
        let workload = self.get(&WORKLOAD, |s| s.trim().parse::<WorkloadInfo>())?;
        let explicit = !matches!(mode.origin, Origin::Default(_));
        match (mode.value, workload) {
            (false, Some(workload)) if explicit => Err(Error::Conflict {
                first: workload.origin,
                second: mode.origin,
                reason: "a workload is only served in dedicated mode",
            }),
            (false, None) => Ok(ProxyMode::Shared {
                node: self.get(&NODE_NAME, non_empty)?.map(|f| f.value),
            }),
            (true, None) => Err(Error::MissingWorkload { mode: mode.origin }),
            (_, Some(workload)) => {
                workload.value.identity(trust_domain).map_err(|err| Error::Invalid {
                    origin: workload.origin,
                    value: workload.value.to_string(),
                    reason: err.to_string(),
                })?;
                Ok(ProxyMode::Dedicated {
                    workload: workload.value,
                })
            }
        }
    }

    pub(super) fn inpod(&self, mode: &ProxyMode) -> Result<Option<InpodConfig>, Error> {
        let enabled = self.required(&INPOD, parse_bool)?;
        if !enabled.value {
            return Ok(None);
        }
        if let ProxyMode::Dedicated { .. } = mode {
            let mode_origin = self
                .given(&WORKLOAD)
                .or_else(|| self.given(&MODE))
                .map_or(Origin::Flag(MODE.flag), |(_, origin)| origin);
            return Err(Error::Conflict {
                first: enabled.origin,
                second: mode_origin,
                reason: "in-pod mode serves the pods of a node: it needs shared mode",
            });
        }
        Ok(Some(InpodConfig {
            socket: self.required(&INPOD_SOCKET, |s| non_empty(s).map(PathBuf::from))?.value,
            port_reuse: self.required(&INPOD_PORT_REUSE, parse_bool)?.value,
        }))
    }

    pub(super) fn local_config(&self) -> Result<Option<LocalConfigSource>, Error> {
        let file = self.get(&CONFIG, |s| non_empty(s).map(PathBuf::from))?;
        if let Some(Found {
            value,
            origin: Origin::Flag(_),
        }) = file
        {
            return Ok(Some(LocalConfigSource::File(value)));
        }
        match (file, self.env("LOCAL_XDS")) {
            (Some(file), Some(_)) => Err(Error::Conflict {
                first: file.origin,
                second: Origin::Env("LOCAL_XDS"),
                reason: "only one local configuration can be given",
            }),
            (Some(file), None) => Ok(Some(LocalConfigSource::File(file.value))),
            (None, Some(yaml)) => Ok(Some(LocalConfigSource::Inline(yaml))),
            (None, None) => Ok(None),
        }
    }

    /// Where the local configuration was given (for errors), `--config` if nowhere.
    pub(super) fn local_config_origin(&self) -> Origin {
        match self.given(&CONFIG) {
            Some((_, origin)) => origin,
            None if self.env("LOCAL_XDS").is_some() => Origin::Env("LOCAL_XDS"),
            None => Origin::Flag(CONFIG.flag),
        }
    }

    pub(super) fn cluster_id(&self) -> Result<String, Error> {
        Ok(self.required(&CLUSTER_ID, non_empty)?.value)
    }

    pub(super) fn cluster_domain(&self) -> Result<String, Error> {
        Ok(self.required(&CLUSTER_DOMAIN, non_empty)?.value)
    }

    pub(super) fn network(&self) -> Result<String, Error> {
        Ok(self
            .get(&NETWORK, |s| Ok(s.trim().to_owned()))?
            .map(|f| f.value)
            .unwrap_or_default())
    }

    pub(super) fn instance_ip(&self) -> Result<Option<IpAddr>, Error> {
        Ok(self.get(&INSTANCE_IP, parse_ip)?.map(|f| f.value))
    }
}
