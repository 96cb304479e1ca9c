//! Trust bundles: the root certificates of a trust domain, and sets of them for federation.
//!
//! ```
//! use meshwire_identity::bundle::BundleSet;
//! use meshwire_identity::source::local_ca::LocalCa;
//! use meshwire_identity::id::TrustDomain;
//!
//! let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
//! let set = BundleSet::from(ca.bundle().clone());
//! assert!(set.get(ca.trust_domain()).is_some());
//! assert!(set.get(&TrustDomain::new("other.org")?).is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::id::TrustDomain;

/// Why a trust bundle could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The bundle has no certificate.
    #[error("trust bundle for {trust_domain} is empty")]
    Empty {
        /// The trust domain.
        trust_domain: TrustDomain,
    },
    /// A PEM block could not be decoded.
    #[error("trust bundle for {trust_domain}: invalid PEM: {reason}")]
    Pem {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// What the decoder found wrong.
        reason: String,
    },
    /// A certificate cannot serve as a trust anchor.
    #[error("trust bundle for {trust_domain}: certificate {index} is not a usable root: {reason}")]
    BadRoot {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// Position of the certificate in the bundle, from 0.
        index: usize,
        /// What the parser found wrong.
        reason: String,
    },
}

/// The root certificates trusted for one trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER certificates.
    pub fn new(trust_domain: TrustDomain, roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty { trust_domain });
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadRoot {
                        trust_domain: trust_domain.clone(),
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            trust_domain,
            roots,
            anchors,
        })
    }

    /// Builds a bundle from a PEM document holding one or more certificates.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem {
                trust_domain: trust_domain.clone(),
                reason: e.to_string(),
            })?;
        Self::new(trust_domain, roots)
    }

    /// The trust domain this bundle is for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates, DER encoded.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// Trust bundles of several trust domains (federation), at most one per trust domain.
#[derive(Debug, Clone, Default)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Arc<TrustBundle>>,
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a bundle, replacing any earlier one for the same trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.bundles.insert(bundle.trust_domain.clone(), Arc::new(bundle));
    }

    /// The bundle of a trust domain.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(trust_domain).map(|b| &**b)
    }

    /// The trust domains that have a bundle.
    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }

    /// All bundles, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles.values().map(|b| &**b)
    }

    /// Whether the set holds no bundle.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl From<TrustBundle> for BundleSet {
    fn from(bundle: TrustBundle) -> Self {
        let mut set = Self::new();
        set.insert(bundle);
        set
    }
}

impl FromIterator<TrustBundle> for BundleSet {
    fn from_iter<I: IntoIterator<Item = TrustBundle>>(iter: I) -> Self {
        let mut set = Self::new();
        for b in iter {
            set.insert(b);
        }
        set
    }
}
