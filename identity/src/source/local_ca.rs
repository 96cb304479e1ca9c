//! The built-in local certificate authority: the embedded default of meshwire.
//!
//! On first use it creates an ECDSA P-256 root for its trust domain and persists it in a directory
//! the caller chooses (`ca.pem`, mode 0600, holding the root certificate and key; `root-cert.pem`,
//! the public root to hand to peers). Later runs load the same root, so identities issued by
//! different processes sharing the directory trust each other. It issues short-lived ECDSA P-256
//! X.509-SVIDs (24 h by default, like Istio's CA; [`LocalCa::with_lifetime`] sets another lifetime)
//! for any identity of its trust domain.
//!
//! ```
//! use meshwire_identity::id::{SpiffeId, TrustDomain};
//! use meshwire_identity::source::local_ca::LocalCa;
//!
//! let dir = tempfile::tempdir()?;
//! let td = TrustDomain::new("cluster.local")?;
//! let first = LocalCa::load_or_create(dir.path(), td.clone())?;
//! let again = LocalCa::load_or_create(dir.path(), td)?;
//! assert_eq!(first.bundle().roots(), again.bundle().roots());
//! let creds = again.issue(&SpiffeId::new("spiffe://cluster.local/ns/default/sa/web")?)?;
//! creds.svid.verify(first.bundle_set(), std::time::SystemTime::now())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{CertSource, Credentials, SourceError};
use crate::bundle::{BundleSet, TrustBundle};
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{SvidError, X509Svid};

/// Default lifetime of issued SVIDs.
pub const DEFAULT_SVID_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a newly created root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start this long before issuance, to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// How far an SVID of `lifetime` is back-dated: [`BACKDATE`], but never more than a tenth of the
/// lifetime, so that the middle of its validity (where it is refreshed) stays well after issuance
/// even for lifetimes of a few minutes.
fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 10)
}

/// File holding the root certificate and key.
pub const CA_FILE: &str = "ca.pem";
/// File holding the root certificate alone, for peers to trust.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Why the local CA could not load, create or issue.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LocalCaError {
    /// A file or directory could not be read or written.
    #[error("local CA: {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: Arc<std::io::Error>,
    },
    /// The persisted root is unusable.
    #[error("local CA: {path} is not a usable CA: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The persisted root belongs to another trust domain.
    #[error("local CA: {path} is the root of trust domain {found}, not {expected}")]
    WrongTrustDomain {
        /// The file.
        path: PathBuf,
        /// The trust domain of the persisted root.
        found: String,
        /// The trust domain asked for.
        expected: TrustDomain,
    },
    /// The identity is outside the CA's trust domain.
    #[error("local CA of trust domain {trust_domain} cannot issue {id}")]
    ForeignIdentity {
        /// The identity asked for.
        id: SpiffeId,
        /// The CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The public root is there but the CA file holding its key is not: creating a new root would
    /// overwrite the root peers trust and split the mesh between two roots.
    #[error(
        "local CA: {root} exists but {ca} (the root certificate and its key) is missing: refusing to create a \
         new root that proxies trusting {root} would reject; restore {ca}, or remove {root} to start a new CA"
    )]
    RootWithoutKey {
        /// The missing CA file (root certificate and key).
        ca: PathBuf,
        /// The public root certificate found.
        root: PathBuf,
    },
    /// Certificate generation failed.
    #[error("local CA: cannot generate a certificate: {0}")]
    Generate(String),
    /// An issued certificate failed validation (a bug, reported rather than hidden).
    #[error("local CA issued an invalid SVID: {0}")]
    Issued(#[source] SvidError),
}

/// A certificate authority for one trust domain, kept in memory and optionally persisted.
pub struct LocalCa {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    bundle: TrustBundle,
    bundle_set: BundleSet,
    lifetime: Duration,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn generate(e: rcgen::Error) -> LocalCaError {
    LocalCaError::Generate(e.to_string())
}

fn io_err(path: &Path, source: std::io::Error) -> LocalCaError {
    LocalCaError::Io {
        path: path.to_owned(),
        source: Arc::new(source),
    }
}

fn root_params(trust_domain: &TrustDomain, now: SystemTime) -> Result<CertificateParams, LocalCaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    // A name of its own: chains to another root of the same trust domain then fail as
    // "unknown issuer" rather than as a bad signature.
    let mut tag = [0u8; 6];
    fastrand::fill(&mut tag);
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("meshwire local CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(trust_domain.id_string().try_into().map_err(generate)?)];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    rcgen::SerialNumber::from_slice(&bytes)
}

impl LocalCa {
    /// A CA whose root lives only in memory (tests, throw-away meshes).
    pub fn ephemeral(trust_domain: TrustDomain) -> Result<Self, LocalCaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let params = root_params(&trust_domain, SystemTime::now())?;
        let cert = params.self_signed(&key).map_err(generate)?;
        Self::from_parts(trust_domain, cert.der().clone(), key, Path::new("<memory>"))
    }

    /// Loads the root persisted in `dir`, or creates and persists one if there is none.
    ///
    /// Creation is atomic: two processes starting together end up with the same root. A directory
    /// holding the public root ([`ROOT_CERT_FILE`]) without the CA file ([`CA_FILE`]) is an error
    /// ([`LocalCaError::RootWithoutKey`]), and nothing in it is overwritten: a new root would not be
    /// trusted by the proxies that trust the old one.
    pub fn load_or_create(dir: &Path, trust_domain: TrustDomain) -> Result<Self, LocalCaError> {
        let path = dir.join(CA_FILE);
        match std::fs::read_to_string(&path) {
            Ok(pem) => return Self::load(&path, &pem, trust_domain),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, e)),
        }
        let root = dir.join(ROOT_CERT_FILE);
        match std::fs::symlink_metadata(&root) {
            Ok(_) => return Err(LocalCaError::RootWithoutKey { ca: path, root }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&root, e)),
        }
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let params = root_params(&trust_domain, SystemTime::now())?;
        let cert = params.self_signed(&key).map_err(generate)?;
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());

        // Write a private temporary file, then link it into place: the link fails if another
        // process created the CA first, and then its root is the one to use.
        let tmp = dir.join(format!(".{CA_FILE}.{}.{}", std::process::id(), fastrand::u64(..)));
        write_private(&tmp, pem.as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                let ca = Self::from_parts(trust_domain, cert.der().clone(), key, &path)?;
                ca.write_root_cert(dir)?;
                tracing::info!(path = %path.display(), trust_domain = %ca.trust_domain, "created local CA root");
                Ok(ca)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let pem = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
                Self::load(&path, &pem, trust_domain)
            }
            Err(e) => Err(io_err(&path, e)),
        }
    }

    fn load(path: &Path, pem: &str, trust_domain: TrustDomain) -> Result<Self, LocalCaError> {
        let corrupt = |reason: String| LocalCaError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let blocks = pem::parse_many(pem).map_err(|e| corrupt(format!("invalid PEM: {e}")))?;
        let mut cert = None;
        let mut key = None;
        for block in blocks {
            match block.tag() {
                "CERTIFICATE" if cert.is_none() => cert = Some(CertificateDer::from(block.into_contents())),
                "PRIVATE KEY" if key.is_none() => key = Some(block.into_contents()),
                tag => return Err(corrupt(format!("unexpected PEM block {tag:?}"))),
            }
        }
        let cert = cert.ok_or_else(|| corrupt("no CERTIFICATE block".into()))?;
        let key = key.ok_or_else(|| corrupt("no PRIVATE KEY block".into()))?;
        let key = KeyPair::try_from(&PrivatePkcs8KeyDer::from(key))
            .map_err(|e| corrupt(format!("invalid private key: {e}")))?;
        let ca = Self::from_parts(trust_domain, cert, key, path)?;
        ca.write_root_cert(path.parent().unwrap_or(Path::new(".")))?;
        Ok(ca)
    }

    fn from_parts(
        trust_domain: TrustDomain,
        cert: CertificateDer<'static>,
        key: KeyPair,
        path: &Path,
    ) -> Result<Self, LocalCaError> {
        let corrupt = |reason: String| LocalCaError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let facts = crate::x509::facts(&cert).map_err(|e| corrupt(format!("invalid certificate: {}", e.0)))?;
        if !facts.is_ca || !facts.key_cert_sign {
            return Err(corrupt(
                "the certificate is not a CA (basicConstraints CA:true, keyCertSign)".into(),
            ));
        }
        let now = SystemTime::now();
        if now > facts.not_after {
            return Err(corrupt(format!(
                "the root expired at {}",
                crate::svid::fmt_time(facts.not_after)
            )));
        }
        match facts.uri_sans.as_slice() {
            [uri] if SpiffeId::new(uri).is_ok_and(|id| id.trust_domain() == &trust_domain) => {}
            [uri] => {
                return Err(LocalCaError::WrongTrustDomain {
                    path: path.to_owned(),
                    found: uri.clone(),
                    expected: trust_domain,
                });
            }
            // A root without a URI SAN, as Istio's CA roots are (`O=cluster.local`): its trust
            // domain is the one configured.
            [] => {}
            _ => {
                return Err(corrupt(
                    "the root names several URIs: at most one, its trust domain".into(),
                ));
            }
        }
        // The key must be the root's own.
        let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .map_err(|e| corrupt(format!("unusable private key: {e}")))?;
        rustls::sign::CertifiedKey::new(vec![cert.clone()], signing)
            .keys_match()
            .map_err(|_| corrupt("the private key does not belong to the root certificate".into()))?;

        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| corrupt(e.to_string()))?;
        let bundle = TrustBundle::new(trust_domain.clone(), vec![cert]).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            bundle_set: BundleSet::from(bundle.clone()),
            trust_domain,
            issuer,
            bundle,
            lifetime: DEFAULT_SVID_LIFETIME,
        })
    }

    fn write_root_cert(&self, dir: &Path) -> Result<(), LocalCaError> {
        let path = dir.join(ROOT_CERT_FILE);
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", self.bundle.roots()[0].to_vec()));
        if std::fs::read_to_string(&path).is_ok_and(|old| old == pem) {
            return Ok(());
        }
        let tmp = dir.join(format!(
            ".{ROOT_CERT_FILE}.{}.{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&tmp, pem).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
    }

    /// Sets the lifetime of SVIDs issued from now on.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The lifetime of issued SVIDs.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The CA's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root, as a trust bundle.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The root, as a bundle set of one.
    pub fn bundle_set(&self) -> &BundleSet {
        &self.bundle_set
    }

    /// Issues an SVID for `id`, valid from now for the CA's lifetime.
    pub fn issue(&self, id: &SpiffeId) -> Result<Credentials, LocalCaError> {
        self.issue_at(id, SystemTime::now(), self.lifetime)
    }

    /// Issues an SVID for `id` valid from `now` for `lifetime`, back-dated for clock skew by five
    /// minutes or a tenth of `lifetime`, whichever is shorter.
    pub fn issue_at(&self, id: &SpiffeId, now: SystemTime, lifetime: Duration) -> Result<Credentials, LocalCaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(LocalCaError::ForeignIdentity {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(generate)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - backdate(lifetime)).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        let svid = X509Svid::from_der(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(LocalCaError::Issued)?;
        Ok(Credentials {
            svid,
            bundles: self.bundle_set.clone(),
        })
    }
}

impl CertSource for LocalCa {
    async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
        self.issue(id).map_err(|e| match e {
            LocalCaError::ForeignIdentity { .. } => SourceError::NotServed {
                id: id.clone(),
                reason: e.to_string(),
            },
            LocalCaError::Issued(source) => SourceError::InvalidSvid {
                id: id.clone(),
                source: Box::new(source),
            },
            other => SourceError::Invalid(other.to_string()),
        })
    }
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> Result<(), LocalCaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(path, e))
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> Result<(), LocalCaError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(path, e))
}
