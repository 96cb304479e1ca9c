//! Istio's control plane: where istiod's xDS and CA are, how the proxy authenticates them and to
//! them, and how it names itself to istiod (ztunnel's variables, with the same names, values and
//! meaning).
//!
//! An unset or empty `XDS_ADDRESS` keeps the proxy on its local configuration (the file, or no
//! workloads at all) and the certificates on the embedded local CA: the default of a run outside a
//! mesh. A non-empty `XDS_ADDRESS` subscribes to istiod, and then the certificates come from the Istio
//! CA at `CA_ADDRESS` (istiod's address when unset), unless `FAKE_CA=true` keeps the local CA or
//! certificate files are given. A local configuration and `XDS_ADDRESS` together are an error: the
//! proxy has one source of workloads.

use std::path::PathBuf;

use meshwire_control::channel::Address;

use super::error::{Error, Origin};
use super::options::Key::Env;
use super::options::{Found, Inputs, Opt};
use super::values::non_empty;

/// The heading of these options in `--help`.
pub(super) const H_ISTIO: &str = "Istio control plane";

/// The root certificate istiod's chart mounts into ztunnel's pod.
pub const DEFAULT_ROOT_CA: &str = "/var/run/secrets/istio/root-cert.pem";
/// The projected ServiceAccount token (audience `istio-ca`) istiod's chart mounts.
pub const DEFAULT_AUTH_TOKEN: &str = "/var/run/secrets/tokens/istio-token";
/// The prefix of the variables that become `Node` metadata strings (prefix stripped).
pub const META_PREFIX: &str = "ISTIO_META_";
/// The prefix of the variables that become `Node` metadata JSON values (prefix stripped).
pub const META_JSON_PREFIX: &str = "ISTIO_METAJSON_";
/// The prefix of the variables that become headers of every xDS request.
pub const XDS_HEADER_PREFIX: &str = "XDS_HEADER_";
/// The prefix of the variables that become headers of every CA request.
pub const CA_HEADER_PREFIX: &str = "CA_HEADER_";

pub(super) const XDS_ADDRESS: Opt = Opt {
    flag: "--xds-address",
    value_name: "HOST:PORT",
    keys: &[Env("XDS_ADDRESS")],
    help: "istiod's xDS address (istiod.istio-system.svc:15012); unset or empty: the local configuration only",
    ..Opt::new(H_ISTIO)
};
pub(super) const XDS_ROOT_CA: Opt = Opt {
    flag: "--xds-root-ca",
    value_name: "FILE|SYSTEM|PEM",
    keys: &[Env("XDS_ROOT_CA")],
    default: Some(DEFAULT_ROOT_CA),
    help: "Roots that authenticate istiod's xDS server: a PEM file (re-read at each connection), SYSTEM for the system roots, or inline PEM",
    ..Opt::new(H_ISTIO)
};
pub(super) const ALT_XDS_HOSTNAME: Opt = Opt {
    flag: "--alt-xds-hostname",
    value_name: "NAME",
    keys: &[Env("ALT_XDS_HOSTNAME")],
    default_note: Some("the host of the xDS address"),
    help: "The name istiod's xDS certificate must carry, when it is not the host of the address",
    ..Opt::new(H_ISTIO)
};
pub(super) const CA_ADDRESS: Opt = Opt {
    flag: "--ca-address",
    value_name: "HOST:PORT",
    keys: &[Env("CA_ADDRESS")],
    default_note: Some("the xDS address"),
    help: "The Istio CA's address; used when --xds-address is set (or when given) unless FAKE_CA=true or certificate files are given",
    ..Opt::new(H_ISTIO)
};
pub(super) const CA_ROOT_CA: Opt = Opt {
    flag: "--ca-root-ca",
    value_name: "FILE|SYSTEM|PEM",
    keys: &[Env("CA_ROOT_CA")],
    default: Some(DEFAULT_ROOT_CA),
    help: "Roots that authenticate the Istio CA, as --xds-root-ca",
    ..Opt::new(H_ISTIO)
};
pub(super) const ALT_CA_HOSTNAME: Opt = Opt {
    flag: "--alt-ca-hostname",
    value_name: "NAME",
    keys: &[Env("ALT_CA_HOSTNAME")],
    default_note: Some("the host of the CA address"),
    help: "The name the Istio CA's certificate must carry, when it is not the host of the address",
    ..Opt::new(H_ISTIO)
};
pub(super) const AUTH_TOKEN: Opt = Opt {
    flag: "--auth-token",
    value_name: "FILE|TOKEN",
    keys: &[Env("AUTH_TOKEN")],
    default: Some(DEFAULT_AUTH_TOKEN),
    help: "The bearer token sent to istiod: a file (a value starting with / or .), re-read for every request, or the token itself",
    ..Opt::new(H_ISTIO)
};
pub(super) const POD_NAME: Opt = Opt {
    flag: "--pod-name",
    value_name: "NAME",
    keys: &[Env("POD_NAME")],
    help: "The proxy's own pod, named to istiod in its node id and metadata",
    ..Opt::new(H_ISTIO)
};
pub(super) const POD_NAMESPACE: Opt = Opt {
    flag: "--pod-namespace",
    value_name: "NAMESPACE",
    keys: &[Env("POD_NAMESPACE")],
    help: "The proxy's own namespace; istiod refuses a stream whose namespace is not its token's",
    ..Opt::new(H_ISTIO)
};
pub(super) const SERVICE_ACCOUNT: Opt = Opt {
    flag: "--service-account",
    value_name: "NAME",
    keys: &[Env("SERVICE_ACCOUNT")],
    help: "The proxy's own service account (istio-system/ztunnel may ask for other workloads' certificates)",
    ..Opt::new(H_ISTIO)
};

/// Roots that authenticate istiod (`XDS_ROOT_CA`, `CA_ROOT_CA`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Roots {
    /// A PEM file, read again for every new connection (so a rotated root is used at the next one).
    File(PathBuf),
    /// The operating system's roots (`SYSTEM`).
    System,
    /// PEM given inline.
    Pem(String),
}

impl Roots {
    fn parse(s: &str) -> Result<Roots, String> {
        let s = s.trim();
        if s == "SYSTEM" {
            Ok(Roots::System)
        } else if s.starts_with("-----BEGIN") {
            Ok(Roots::Pem(s.to_owned()))
        } else {
            non_empty(s).map(|p| Roots::File(PathBuf::from(p)))
        }
    }
}

/// The bearer token sent to istiod (`AUTH_TOKEN`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthToken {
    /// A file, read again for every request (Kubernetes rotates projected tokens).
    File(PathBuf),
    /// The token itself.
    Static(String),
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthToken::File(path) => f.debug_tuple("File").field(path).finish(),
            // A token is a credential: never in logs.
            AuthToken::Static(_) => f.write_str("Static(..)"),
        }
    }
}

impl AuthToken {
    fn parse(s: &str) -> Result<AuthToken, String> {
        let s = non_empty(s.trim())?;
        Ok(if s.starts_with('/') || s.starts_with('.') {
            AuthToken::File(PathBuf::from(s))
        } else {
            AuthToken::Static(s)
        })
    }
}

/// One of istiod's services: where it is, the roots that authenticate it, and the extra headers of
/// every request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ControlPlane {
    /// `host:port`, as given (an `https://` prefix is kept and understood by the client).
    pub address: String,
    /// The roots that authenticate the server.
    pub roots: Roots,
    /// The name the server's certificate must carry; `None`: the host of the address
    /// (`ALT_XDS_HOSTNAME` / `ALT_CA_HOSTNAME`).
    pub server_name: Option<String>,
    /// Extra request headers (`XDS_HEADER_<NAME>` / `CA_HEADER_<NAME>`), names lower-cased.
    pub headers: Vec<(String, String)>,
}

/// How the proxy talks to istiod. Read from the variables ztunnel reads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IstioConfig {
    /// istiod's xDS service; `None`: the local configuration only.
    pub xds: Option<ControlPlane>,
    /// The bearer token of every request to istiod (xDS and CA).
    pub token: AuthToken,
    /// The proxy's own pod (`POD_NAME`).
    pub pod_name: Option<String>,
    /// The proxy's own namespace (`POD_NAMESPACE`).
    pub pod_namespace: Option<String>,
    /// The proxy's own service account (`SERVICE_ACCOUNT`).
    pub service_account: Option<String>,
    /// `ISTIO_META_<KEY>` variables, the prefix stripped, in name order.
    pub metadata: Vec<(String, String)>,
    /// `ISTIO_METAJSON_<KEY>` variables, the prefix stripped, checked to be JSON, in name order.
    pub metadata_json: Vec<(String, String)>,
}

/// Checks an istiod address as the client parses it ([`Address::parse`]): `host:port`, optionally
/// after `https://` (`http://` is refused: istiod is always reached over TLS).
pub fn check_address(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.starts_with("http://") {
        return Err("istiod is reached over TLS: use host:port or https://host:port".to_owned());
    }
    Address::parse(s)
        .map(|_| s.to_owned())
        .map_err(|err| format!("{err} (expected host:port, such as istiod.istio-system.svc:15012)"))
}

/// The variables whose names start with `prefix`, the prefix stripped, in name order.
fn prefixed<'a>(names: &'a [String], prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    names
        .iter()
        .filter_map(move |name| name.strip_prefix(prefix).map(|key| (name.as_str(), key)))
        .filter(|(_, key)| !key.is_empty())
}

impl Inputs<'_> {
    fn headers(&self, prefix: &str) -> Result<Vec<(String, String)>, Error> {
        let mut headers = Vec::new();
        for (name, key) in prefixed(self.names(), prefix) {
            let Some(value) = self.env(name) else { continue };
            let header = key.to_ascii_lowercase();
            let valid_name = header.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid_name || value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                return Err(Error::InvalidVariable {
                    name: name.to_owned(),
                    value,
                    reason: "not a valid HTTP header".to_owned(),
                });
            }
            headers.push((header, value));
        }
        Ok(headers)
    }

    fn control_plane(
        &self,
        address: Found<String>,
        roots: &Opt,
        server_name: &Opt,
        prefix: &str,
    ) -> Result<ControlPlane, Error> {
        Ok(ControlPlane {
            address: address.value,
            roots: self.required(roots, Roots::parse)?.value,
            server_name: self.get(server_name, |s| non_empty(s.trim()))?.map(|f| f.value),
            headers: self.headers(prefix)?,
        })
    }

    /// The xDS service, if `XDS_ADDRESS` is set.
    pub(super) fn xds(&self) -> Result<Option<ControlPlane>, Error> {
        self.get(&XDS_ADDRESS, check_address)?
            .map(|address| self.control_plane(address, &XDS_ROOT_CA, &ALT_XDS_HOSTNAME, XDS_HEADER_PREFIX))
            .transpose()
    }

    /// The Istio CA: `CA_ADDRESS` if given, else the xDS address when xDS is on.
    pub(super) fn istio_ca(&self, xds: Option<&ControlPlane>) -> Result<Option<(ControlPlane, Origin)>, Error> {
        let address = match self.get(&CA_ADDRESS, check_address)? {
            Some(address) => address,
            None => match xds {
                Some(xds) => Found {
                    value: xds.address.clone(),
                    origin: Origin::Env("XDS_ADDRESS"),
                },
                None => return Ok(None),
            },
        };
        let origin = address.origin;
        Ok(Some((
            self.control_plane(address, &CA_ROOT_CA, &ALT_CA_HOSTNAME, CA_HEADER_PREFIX)?,
            origin,
        )))
    }

    pub(super) fn istio(&self, xds: Option<ControlPlane>) -> Result<IstioConfig, Error> {
        let optional = |opt: &Opt| -> Result<Option<String>, Error> {
            Ok(self.get(opt, |s| non_empty(s.trim()))?.map(|f| f.value))
        };
        let mut metadata = Vec::new();
        for (name, key) in prefixed(self.names(), META_PREFIX) {
            if let Some(value) = self.env(name) {
                metadata.push((key.to_owned(), value));
            }
        }
        let mut metadata_json = Vec::new();
        for (name, key) in prefixed(self.names(), META_JSON_PREFIX) {
            if let Some(value) = self.env(name) {
                if let Err(err) = serde_json::from_str::<serde_json::Value>(&value) {
                    return Err(Error::InvalidVariable {
                        name: name.to_owned(),
                        value,
                        reason: format!("not JSON: {err}"),
                    });
                }
                metadata_json.push((key.to_owned(), value));
            }
        }
        Ok(IstioConfig {
            xds,
            token: self.required(&AUTH_TOKEN, AuthToken::parse)?.value,
            pod_name: optional(&POD_NAME)?,
            pod_namespace: optional(&POD_NAMESPACE)?,
            service_account: optional(&SERVICE_ACCOUNT)?,
            metadata,
            metadata_json,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{CertificateSource, Config};

    fn config(vars: &[(&str, &str)]) -> Result<Config, Error> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_args_and_vars(["ztunnel"], vars)
    }

    #[test]
    fn an_unset_or_empty_xds_address_keeps_the_local_mode_and_the_local_ca() {
        for vars in [&[][..], &[("XDS_ADDRESS", "")][..]] {
            let config = config(vars).unwrap();
            assert_eq!(config.istio.xds, None);
            assert!(matches!(config.certificates, CertificateSource::LocalCa { .. }));
        }
    }

    #[test]
    fn istiod_as_ztunnel_is_configured() {
        let config = config(&[
            ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
            ("CA_ADDRESS", "https://istiod-ca.istio-system.svc:15012"),
            ("POD_NAME", "ztunnel-x7k2p"),
            ("POD_NAMESPACE", "istio-system"),
            ("SERVICE_ACCOUNT", "ztunnel"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_METAJSON_LABELS", r#"{"app":"ztunnel"}"#),
            ("XDS_HEADER_X_Tenant", "blue"),
            ("CA_HEADER_AUDIT", "on"),
            ("CA_ROOT_CA", "SYSTEM"),
            ("AUTH_TOKEN", "abc.def"),
        ])
        .unwrap();
        let xds = config.istio.xds.as_ref().unwrap();
        assert_eq!(xds.address, "istiod.istio-system.svc:15012");
        assert_eq!(xds.roots, Roots::File(PathBuf::from(DEFAULT_ROOT_CA)));
        assert_eq!(xds.headers, [("x_tenant".to_owned(), "blue".to_owned())]);
        let CertificateSource::IstioCa(ca) = &config.certificates else {
            panic!("{:?}", config.certificates)
        };
        assert_eq!(ca.address, "https://istiod-ca.istio-system.svc:15012");
        assert_eq!(ca.roots, Roots::System);
        assert_eq!(ca.headers, [("audit".to_owned(), "on".to_owned())]);
        assert_eq!(config.cluster_id, "east");
        assert_eq!(config.istio.token, AuthToken::Static("abc.def".to_owned()));
        assert_eq!(config.istio.pod_name.as_deref(), Some("ztunnel-x7k2p"));
        assert_eq!(
            config.istio.metadata,
            [
                ("CLUSTER_ID".to_owned(), "east".to_owned()),
                ("DNS_CAPTURE".to_owned(), "true".to_owned())
            ]
        );
        assert_eq!(
            config.istio.metadata_json,
            [("LABELS".to_owned(), r#"{"app":"ztunnel"}"#.to_owned())]
        );
        assert!(config.ignored_env.is_empty(), "{:?}", config.ignored_env);
    }

    #[test]
    fn the_ca_defaults_to_istiod_and_fake_ca_keeps_the_local_one() {
        let config = config(&[("XDS_ADDRESS", "istiod.istio-system.svc:15012")]).unwrap();
        let CertificateSource::IstioCa(ca) = &config.certificates else {
            panic!("{:?}", config.certificates)
        };
        assert_eq!(ca.address, "istiod.istio-system.svc:15012");
        assert_eq!(config.istio.token, AuthToken::File(PathBuf::from(DEFAULT_AUTH_TOKEN)));
        let config = config_with_fake_ca();
        assert!(matches!(config.certificates, CertificateSource::LocalCa { .. }));
    }

    fn config_with_fake_ca() -> Config {
        config(&[("XDS_ADDRESS", "istiod:15012"), ("FAKE_CA", "true")]).unwrap()
    }

    #[test]
    fn bad_values_are_named() {
        let err = config(&[("XDS_ADDRESS", "istiod")]).unwrap_err().to_string();
        assert!(err.contains("XDS_ADDRESS") && err.contains("host:port"), "{err}");
        let err = config(&[("XDS_ADDRESS", "http://istiod:15012")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("over TLS"), "{err}");
        let err = config(&[("XDS_ADDRESS", "istiod:15012"), ("ISTIO_METAJSON_LABELS", "{app")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ISTIO_METAJSON_LABELS") && err.contains("not JSON"),
            "{err}"
        );
        let err = config(&[("XDS_ADDRESS", "istiod:15012"), ("XDS_HEADER_BAD HEADER", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("XDS_HEADER_BAD HEADER"), "{err}");
        let err = config(&[("XDS_ADDRESS", "istiod:15012"), ("LOCAL_XDS_PATH", "mesh.yaml")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("XDS_ADDRESS") && err.contains("LOCAL_XDS_PATH"), "{err}");
    }

    #[test]
    fn a_token_is_never_printed() {
        let config = config(&[("AUTH_TOKEN", "secret-token")]).unwrap();
        assert!(!format!("{config:?}").contains("secret-token"));
    }
}
