//! The proxy's identity: the trust domain, the state directory (where the local CA keeps its key), where
//! workload certificates come from, and how long the local CA's certificates live.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshwire_identity::id::{TrustDomain, parse_trust_domain};

use super::error::{Error, Origin};
use super::istio::ControlPlane;
use super::options::Key::Env;
use super::options::{Found, H_MODE, Inputs, Opt, parse_found};
use super::values::{non_empty, parse_bool, parse_duration};

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateSource {
    /// A CA run by the proxy itself, keeping its key and certificate in `dir` (`<state dir>/ca`); the
    /// default, like ztunnel's `FAKE_CA=true`.
    LocalCa {
        /// The CA's directory.
        dir: PathBuf,
    },
    /// One certificate read from PEM files (`--cert-chain`, `--cert-key`, `--trust-bundle`).
    Files {
        /// The certificate chain, leaf first.
        chain: PathBuf,
        /// The private key of the leaf.
        key: PathBuf,
        /// The trusted CA certificates.
        bundle: PathBuf,
    },
    /// The Istio CA (istiod's `CreateCertificate`), at `CA_ADDRESS` or istiod's xDS address: the
    /// default when `XDS_ADDRESS` is set.
    IstioCa(ControlPlane),
}

pub(super) const TRUST_DOMAIN: Opt = Opt {
    flag: "--trust-domain",
    value_name: "DOMAIN",
    keys: &[Env("TRUST_DOMAIN")],
    default: Some("cluster.local"),
    help: "The trust domain of the mesh",
    ..Opt::new(H_MODE)
};

pub(super) const STATE_DIR: Opt = Opt {
    flag: "--state-dir",
    value_name: "DIR",
    keys: &[Env("MESHWIRE_STATE_DIR"), Env("STATE_DIRECTORY")],
    default: Some(".meshwire"),
    help: "Directory of state that outlives restarts (the local CA); use persistent storage",
    ..Opt::new(H_MODE)
};
pub(super) const CERT_CHAIN: Opt = Opt {
    flag: "--cert-chain",
    value_name: "FILE",
    keys: &[Env("MESHWIRE_CERT_CHAIN")],
    help: "Certificate chain (PEM, leaf first) to use instead of the local CA; needs --cert-key and --trust-bundle",
    ..Opt::new(H_MODE)
};
pub(super) const CERT_KEY: Opt = Opt {
    flag: "--cert-key",
    value_name: "FILE",
    keys: &[Env("MESHWIRE_CERT_KEY")],
    help: "Private key (PEM) of --cert-chain",
    ..Opt::new(H_MODE)
};
pub(super) const TRUST_BUNDLE: Opt = Opt {
    flag: "--trust-bundle",
    value_name: "FILE",
    keys: &[Env("MESHWIRE_TRUST_BUNDLE")],
    help: "Trusted CA certificates (PEM) that go with --cert-chain",
    ..Opt::new(H_MODE)
};
pub(super) const CERT_TTL: Opt = Opt {
    flag: "--cert-ttl",
    value_name: "DURATION",
    keys: &[Env("SECRET_TTL")],
    default: Some("24h"),
    help: "Lifetime of the certificates the local CA issues (at least 1m); refreshed at half-life",
    ..Opt::new(H_MODE)
};

/// The shortest certificate lifetime `--cert-ttl` accepts: shorter ones would be refreshed every
/// few seconds, and whole-second certificate times make them expire as they are issued.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(60);

fn cert_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d < MIN_CERT_TTL => Err(format!(
            "must be at least {}s (a certificate lifetime)",
            MIN_CERT_TTL.as_secs()
        )),
        d => Ok(d),
    }
}

impl Inputs<'_> {
    pub(super) fn trust_domain(&self) -> Result<TrustDomain, Error> {
        let trust_domain = self.required(&TRUST_DOMAIN, |s| {
            parse_trust_domain(s.trim()).map_err(|err| match err {
                meshwire_identity::id::IdError::TrustDomain { source, .. } => source.to_string(),
                other => other.to_string(),
            })
        })?;
        Ok(trust_domain.value)
    }

    pub(super) fn state_dir(&self) -> Result<PathBuf, Error> {
        let state_dir = self.required(&STATE_DIR, |s| non_empty(s).map(PathBuf::from))?;
        Ok(match state_dir.origin {
            // systemd separates several state directories with colons; the first is ours.
            Origin::Env("STATE_DIRECTORY") => state_dir
                .value
                .to_str()
                .and_then(|s| s.split(':').find(|dir| !dir.is_empty()))
                .map(PathBuf::from)
                .unwrap_or(state_dir.value),
            _ => state_dir.value,
        })
    }

    pub(super) fn cert_ttl(&self) -> Result<Duration, Error> {
        Ok(self.required(&CERT_TTL, cert_ttl)?.value)
    }

    pub(super) fn certificates(
        &self,
        state_dir: &Path,
        xds: Option<&ControlPlane>,
    ) -> Result<CertificateSource, Error> {
        let path = |s: &str| non_empty(s).map(PathBuf::from);
        let chain = self.get(&CERT_CHAIN, path)?;
        let key = self.get(&CERT_KEY, path)?;
        let bundle = self.get(&TRUST_BUNDLE, path)?;
        let fake_ca = self
            .env("FAKE_CA")
            .map(|raw| parse_found(raw, Origin::Env("FAKE_CA"), parse_bool))
            .transpose()?;
        let istio_ca = self.istio_ca(xds)?;
        match (chain, key, bundle) {
            (None, None, None) => match (fake_ca, istio_ca) {
                (Some(Found { value: true, .. }), _) | (_, None) => Ok(CertificateSource::LocalCa {
                    dir: state_dir.join("ca"),
                }),
                (_, Some((ca, _))) => Ok(CertificateSource::IstioCa(ca)),
            },
            (Some(chain), Some(key), Some(bundle)) => {
                if let Some((_, origin @ (Origin::Flag(_) | Origin::Env("CA_ADDRESS")))) = istio_ca {
                    return Err(Error::Conflict {
                        first: origin,
                        second: chain.origin,
                        reason: "the Istio CA and certificate files are two sources of certificates: give one",
                    });
                }
                if let Some(Found { value: true, origin }) = fake_ca {
                    return Err(Error::Conflict {
                        first: origin,
                        second: chain.origin,
                        reason: "FAKE_CA=true asks for the local CA, which certificate files replace",
                    });
                }
                Ok(CertificateSource::Files {
                    chain: chain.value,
                    key: key.value,
                    bundle: bundle.value,
                })
            }
            (chain, key, bundle) => {
                let files = [
                    (chain, CERT_CHAIN.flag),
                    (key, CERT_KEY.flag),
                    (bundle, TRUST_BUNDLE.flag),
                ];
                let given = files.iter().find_map(|(f, _)| f.as_ref().map(|f| f.origin));
                let missing = files.iter().find(|(f, _)| f.is_none()).map(|(_, flag)| *flag);
                Err(Error::Incomplete {
                    given: given.unwrap_or(Origin::Flag(CERT_CHAIN.flag)),
                    missing: missing.unwrap_or(CERT_CHAIN.flag),
                    reason: "--cert-chain, --cert-key and --trust-bundle go together",
                })
            }
        }
    }
}
