//! X.509-SVIDs: a certificate chain whose leaf names one SPIFFE ID, and its private key.
//!
//! Parsing checks everything the SPIFFE X.509-SVID specification asks of the leaf that does not
//! depend on time or on a trust bundle: exactly one URI SAN that is a SPIFFE ID with a path, not a
//! CA, `digitalSignature` set, no `keyCertSign`, and a private key that matches it.
//! [`X509Svid::verify`] adds the validity window and the chain to the bundle of the SVID's trust
//! domain. Each failure has its own [`SvidError`] variant.
//!
//! ```
//! use std::time::SystemTime;
//! use meshwire_identity::id::{SpiffeId, TrustDomain};
//! use meshwire_identity::source::local_ca::LocalCa;
//! use meshwire_identity::svid::{SvidError, X509Svid};
//!
//! let ca = LocalCa::ephemeral(TrustDomain::new("example.org")?)?;
//! let creds = ca.issue(&SpiffeId::new("spiffe://example.org/web")?)?;
//! // Round trip through PEM.
//! let svid = X509Svid::from_pem(creds.svid.chain_pem().as_bytes(), creds.svid.private_key_pem().as_bytes())?;
//! svid.verify(&creds.bundles, SystemTime::now())?;
//! // A key that belongs to another certificate is refused.
//! let other = ca.issue(&SpiffeId::new("spiffe://example.org/db")?)?;
//! let err = X509Svid::from_pem(creds.svid.chain_pem().as_bytes(), other.svid.private_key_pem().as_bytes()).unwrap_err();
//! assert!(matches!(err, SvidError::KeyMismatch { .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::x509;

/// Why a certificate chain and key are not a valid X.509-SVID.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The chain holds no certificate.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// PEM input could not be decoded.
    #[error("invalid PEM in the {what}: {reason}")]
    Pem {
        /// `certificate chain` or `private key`.
        what: &'static str,
        /// What the decoder found wrong.
        reason: String,
    },
    /// A certificate of the chain could not be parsed.
    #[error("certificate {index} of the chain cannot be parsed: {reason}")]
    Certificate {
        /// Position in the chain, from 0 (the leaf).
        index: usize,
        /// What the parser found wrong.
        reason: String,
    },
    /// The private key could not be loaded.
    #[error("the private key cannot be used: {reason}")]
    PrivateKey {
        /// What rustls found wrong.
        reason: String,
    },
    /// The leaf has no URI SAN.
    #[error("the leaf certificate has no URI SAN (an X.509-SVID has exactly one, its SPIFFE ID)")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("the leaf certificate has {} URI SANs ({}); an X.509-SVID has exactly one", uris.len(), uris.join(", "))]
    MultipleUriSans {
        /// The URI SANs found.
        uris: Vec<String>,
    },
    /// The URI SAN is not a SPIFFE ID.
    #[error("the URI SAN {uri:?} is not a SPIFFE ID: {source}")]
    NotSpiffe {
        /// The URI SAN.
        uri: String,
        /// What the SPIFFE ID parser found wrong.
        source: SpiffeIdError,
    },
    /// The SPIFFE ID names a trust domain only; a workload ID needs a path.
    #[error("the SPIFFE ID {id} of the leaf has no path")]
    NoPath {
        /// The SPIFFE ID.
        id: SpiffeId,
    },
    /// The leaf is a CA certificate.
    #[error("the leaf certificate of {id} is a CA certificate (basicConstraints CA:true)")]
    CaLeaf {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
    },
    /// The leaf has no key usage extension, or one without `digitalSignature`.
    #[error("the leaf certificate of {id} lacks the digitalSignature key usage")]
    NoDigitalSignature {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
    },
    /// The leaf may sign certificates.
    #[error("the leaf certificate of {id} has keyCertSign in its key usage")]
    LeafCanSignCertificates {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
    },
    /// The private key does not belong to the leaf certificate.
    #[error("the private key does not match the leaf certificate of {id}")]
    KeyMismatch {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
    },
    /// The leaf expired.
    #[error("the certificate of {id} expired at {}", fmt_time(*not_after))]
    Expired {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
        /// When it expired.
        not_after: SystemTime,
    },
    /// The leaf is not valid yet.
    #[error("the certificate of {id} is not valid before {}", fmt_time(*not_before))]
    NotYetValid {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
        /// When it becomes valid.
        not_before: SystemTime,
    },
    /// No trust bundle is known for the SVID's trust domain.
    #[error("no trust bundle for the trust domain {trust_domain} of {id}")]
    UnknownTrustDomain {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
        /// Its trust domain.
        trust_domain: TrustDomain,
    },
    /// The chain does not lead to a root of the trust bundle.
    #[error("the certificate chain of {id} does not verify against the trust bundle of {}: {reason}", id.trust_domain())]
    UntrustedChain {
        /// The SPIFFE ID of the leaf.
        id: SpiffeId,
        /// What path building found wrong.
        reason: String,
    },
}

/// Formats a time as RFC 3339 (UTC) for messages.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// Reads the SPIFFE ID of a leaf certificate, checking the SAN rules of an X.509-SVID.
pub(crate) fn leaf_spiffe_id(facts: &x509::CertFacts) -> Result<SpiffeId, SvidError> {
    let uri = match facts.uri_sans.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [uri] => uri,
        uris => return Err(SvidError::MultipleUriSans { uris: uris.to_vec() }),
    };
    let id = SpiffeId::new(uri).map_err(|source| SvidError::NotSpiffe {
        uri: uri.clone(),
        source,
    })?;
    if id.path().is_empty() {
        return Err(SvidError::NoPath { id });
    }
    Ok(id)
}

/// Checks the leaf-only rules of an X.509-SVID and returns its SPIFFE ID and facts.
pub(crate) fn check_leaf(der: &[u8]) -> Result<(SpiffeId, x509::CertFacts), SvidError> {
    let facts = x509::facts(der).map_err(|e| SvidError::Certificate { index: 0, reason: e.0 })?;
    let id = leaf_spiffe_id(&facts)?;
    if facts.is_ca {
        return Err(SvidError::CaLeaf { id });
    }
    // The SPIFFE X.509-SVID specification requires the key usage extension, with digitalSignature.
    if facts.digital_signature != Some(true) {
        return Err(SvidError::NoDigitalSignature { id });
    }
    if facts.key_cert_sign {
        return Err(SvidError::LeafCanSignCertificates { id });
    }
    Ok((id, facts))
}

/// Verifies `chain` (leaf first) against the bundle of the leaf's trust domain for `usage`.
pub(crate) fn verify_chain(
    id: &SpiffeId,
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), ChainError> {
    let bundle = bundles.get(id.trust_domain()).ok_or(ChainError::UnknownTrustDomain)?;
    let leaf = chain.first().ok_or(ChainError::Webpki(webpki::Error::BadDer))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(ChainError::Webpki)?;
    ee.verify_for_usage(
        crate::crypto::provider().signature_verification_algorithms.all,
        bundle.anchors(),
        &chain[1..],
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(ChainError::Webpki)
}

/// Why a chain did not verify.
#[derive(Debug)]
pub(crate) enum ChainError {
    UnknownTrustDomain,
    Webpki(webpki::Error),
}

/// A validated X.509-SVID: its SPIFFE ID, certificate chain (leaf first) and private key.
///
/// Cheap to clone: the chain and key are shared.
#[derive(Clone)]
pub struct X509Svid {
    id: SpiffeId,
    certified: Arc<CertifiedKey>,
    key_der: Arc<PrivateKeyDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("id", &self.id)
            .field("chain_len", &self.certified.cert.len())
            .field("not_before", &fmt_time(self.not_before))
            .field("not_after", &fmt_time(self.not_after))
            .finish_non_exhaustive()
    }
}

impl X509Svid {
    /// Parses and checks an SVID from DER: a chain (leaf first) and a PKCS#8, SEC1 or PKCS#1 key.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let (id, facts) = check_leaf(leaf)?;
        for (index, cert) in chain.iter().enumerate().skip(1) {
            x509::facts(cert).map_err(|e| SvidError::Certificate { index, reason: e.0 })?;
        }
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| SvidError::PrivateKey { reason: e.to_string() })?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(SvidError::KeyMismatch { id });
            }
            Err(e) => {
                return Err(SvidError::PrivateKey {
                    reason: format!("cannot compare it with the leaf: {e}"),
                });
            }
        }
        Ok(Self {
            id,
            certified: Arc::new(certified),
            key_der: Arc::new(key),
            not_before: facts.not_before,
            not_after: facts.not_after,
        })
    }

    /// Parses and checks an SVID from PEM: the chain (leaf first) and the private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, SvidError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::Pem {
                what: "certificate chain",
                reason: e.to_string(),
            })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| SvidError::Pem {
            what: "private key",
            reason: e.to_string(),
        })?;
        Self::from_der(chain, key)
    }

    /// The SPIFFE ID the SVID names.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }

    /// The chain and key in the form rustls signs with.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// The private key, DER encoded.
    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key_der
    }

    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        self.chain().iter().map(|c| pem_block("CERTIFICATE", c)).collect()
    }

    /// The private key as PEM.
    pub fn private_key_pem(&self) -> String {
        let label = match &*self.key_der {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pem_block(label, self.key_der.secret_der())
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's whole lifetime.
    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Checks that `now` lies within the leaf's validity.
    pub fn check_validity(&self, now: SystemTime) -> Result<(), SvidError> {
        if now < self.not_before {
            return Err(SvidError::NotYetValid {
                id: self.id.clone(),
                not_before: self.not_before,
            });
        }
        if now > self.not_after {
            return Err(SvidError::Expired {
                id: self.id.clone(),
                not_after: self.not_after,
            });
        }
        Ok(())
    }

    /// Checks the validity window and that the chain leads to a root of the bundle of the SVID's
    /// trust domain in `bundles`.
    pub fn verify(&self, bundles: &BundleSet, now: SystemTime) -> Result<(), SvidError> {
        self.check_validity(now)?;
        let unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        // An SVID may be meant for either end of mTLS: accept a chain good for server or client use.
        let result = match verify_chain(&self.id, self.chain(), bundles, unix, webpki::KeyUsage::server_auth()) {
            Err(ChainError::Webpki(webpki::Error::RequiredEkuNotFoundContext(_))) => {
                verify_chain(&self.id, self.chain(), bundles, unix, webpki::KeyUsage::client_auth())
            }
            other => other,
        };
        result.map_err(|e| match e {
            ChainError::UnknownTrustDomain => SvidError::UnknownTrustDomain {
                id: self.id.clone(),
                trust_domain: self.id.trust_domain().clone(),
            },
            ChainError::Webpki(e) => SvidError::UntrustedChain {
                id: self.id.clone(),
                reason: format!("{e:?}"),
            },
        })
    }

    /// Whether two SVIDs carry the same chain (a reload that changed nothing).
    pub fn same_chain(&self, other: &Self) -> bool {
        self.chain() == other.chain()
    }
}

/// What an admin page shows of one certificate (ztunnel's `/config_dump` fields): its PEM, its
/// serial number in decimal, and its validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// The certificate as one PEM block (LF line endings).
    pub pem: String,
    /// The serial number, in decimal.
    pub serial: String,
    /// The start of its validity.
    pub not_before: SystemTime,
    /// The end of its validity.
    pub not_after: SystemTime,
}

/// The [`CertificateSummary`] of a DER certificate; `Err` names what could not be read.
pub fn certificate_summary(der: &CertificateDer<'_>) -> Result<CertificateSummary, String> {
    let facts = x509::facts(der).map_err(|e| e.0)?;
    Ok(CertificateSummary {
        pem: pem_block("CERTIFICATE", der),
        serial: facts.serial,
        not_before: facts.not_before,
        not_after: facts.not_after,
    })
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
