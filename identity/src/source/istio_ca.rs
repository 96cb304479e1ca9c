//! The Istio CA (istiod's `IstioCertificateService`) as a certificate source.
//!
//! [`IstioCa`] makes a fresh key and [`Csr`] for every fetch, sends it through a
//! [`CertificateAuthority`] (the transport: a gRPC client lives in another crate and implements the
//! trait, so this crate keeps no gRPC dependency), and checks the answer with [`check_answer`]
//! before anything uses it:
//!
//! - the leaf's URI SAN is the identity asked for;
//! - the leaf's public key is the key of the CSR (ztunnel checks only the SAN; an answer with
//!   another key would fail every handshake of the workload until the next renewal);
//! - the chain verifies, at the time of the [`Timer`], to the roots the answer returned (its last
//!   element, which may hold several PEM roots), and the leaf follows the X.509-SVID rules.
//!
//! A refused answer is a [`SourceError::RefusedAnswer`] naming the identity and the reason; the
//! [`crate::manager::CertManager`] keeps a still-valid certificate in service and retries with its
//! back-off.
//!
//! The returned roots become the trust bundle of the identity's trust domain. Roots rotate: every
//! root an earlier answer announced stays in the bundle while it is valid, so during a rotation
//! peers with certificates of the old root and of the new one are both trusted. Expired roots are
//! dropped at the next answer.
//!
//! ```
//! use std::time::{Duration, Instant, SystemTime};
//! use meshwire_identity::id::SpiffeId;
//! use meshwire_identity::source::istio_ca::{CertificateAuthority, CertificateRequest, IstioCa, ProxyMode};
//! use meshwire_identity::source::{CertSource, SourceError};
//! use meshwire_identity::time::Timer;
//!
//! /// An authority that is down.
//! struct Down;
//! impl CertificateAuthority for Down {
//!     async fn create_certificate(&self, request: CertificateRequest<'_>) -> Result<Vec<String>, String> {
//!         assert!(request.csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
//!         assert_eq!(request.validity, Duration::from_secs(24 * 3600));
//!         Err("connection refused".into())
//!     }
//! }
//! # struct Clock;
//! # impl Timer for Clock {
//! #     type Sleep = std::future::Pending<()>;
//! #     fn now(&self) -> Instant { Instant::now() }
//! #     fn system_now(&self) -> SystemTime { SystemTime::now() }
//! #     fn sleep_until(&self, _: Instant) -> Self::Sleep { std::future::pending() }
//! # }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = IstioCa::new(Down, Clock, ProxyMode::Shared);
//! let id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/web")?;
//! let err = ca.fetch(&id).await.unwrap_err();
//! assert!(matches!(err, SourceError::Authority { .. }));
//! assert!(err.to_string().contains("sa/web") && err.to_string().contains("connection refused"));
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{CertSource, Credentials, SourceError};
use crate::bundle::{BundleSet, TrustBundle};
use crate::csr::Csr;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{SvidError, X509Svid, fmt_time};
use crate::time::Timer;

/// The validity asked for by default: 24 hours, ztunnel's `SECRET_TTL`.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// At most this many roots are kept per trust domain (the newest first): an authority announcing a
/// new root with every answer cannot make the bundle grow without bound.
pub const MAX_KNOWN_ROOTS: usize = 16;

/// What the source asks of a certificate authority (the Istio CA's `CreateCertificate`).
#[derive(Debug, Clone, Copy)]
pub struct CertificateRequest<'a> {
    /// The identity the certificate is for.
    pub id: &'a SpiffeId,
    /// The PKCS#10 request, PEM encoded (the `csr` field).
    pub csr_pem: &'a str,
    /// The validity asked for (the `validity_duration` field, in seconds on the wire).
    pub validity: Duration,
    /// Shared (node) mode: the request asks for another workload's identity, and the metadata
    /// carries `ImpersonatedIdentity: <id>`.
    pub impersonate: bool,
}

/// The transport to a certificate authority: sends one request and returns the answer.
///
/// ```
/// use meshwire_identity::source::istio_ca::{CertificateAuthority, CertificateRequest};
///
/// /// Records what it is asked and answers nothing useful.
/// #[derive(Default)]
/// struct Recorder(std::sync::Mutex<Vec<String>>);
/// impl CertificateAuthority for Recorder {
///     async fn create_certificate(&self, request: CertificateRequest<'_>) -> Result<Vec<String>, String> {
///         self.0.lock().unwrap().push(request.id.to_string());
///         Ok(Vec::new())
///     }
/// }
/// ```
pub trait CertificateAuthority {
    /// Sends the request; returns the answer's `cert_chain` as sent (leaf first, intermediates,
    /// root(s) last; the last element may hold several PEM roots), or the authority's error text.
    fn create_certificate(&self, request: CertificateRequest<'_>) -> impl Future<Output = Result<Vec<String>, String>>;
}

impl<A: CertificateAuthority + ?Sized> CertificateAuthority for Arc<A> {
    fn create_certificate(&self, request: CertificateRequest<'_>) -> impl Future<Output = Result<Vec<String>, String>> {
        (**self).create_certificate(request)
    }
}

impl<A: CertificateAuthority + ?Sized> CertificateAuthority for &A {
    fn create_certificate(&self, request: CertificateRequest<'_>) -> impl Future<Output = Result<Vec<String>, String>> {
        (**self).create_certificate(request)
    }
}

/// Whose certificates the proxy asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyMode {
    /// The proxy's own identity only (a sidecar or a waypoint).
    #[default]
    Dedicated,
    /// A node proxy asking for the identities of the workloads on its node: every request
    /// impersonates the identity it names.
    Shared,
}

/// Why an answer of the certificate authority was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// The answer holds no certificate at all.
    #[error("the answer's cert_chain is empty")]
    Empty,
    /// The answer holds no root: a single element (the leaf), or a last element with no certificate.
    #[error("the answer carries no root certificate (its last element holds the roots)")]
    NoRoots,
    /// An element is not valid PEM.
    #[error("element {element} of the answer is not valid PEM: {reason}")]
    Pem {
        /// Position in `cert_chain`, from 0.
        element: usize,
        /// What the decoder found wrong.
        reason: String,
    },
    /// An element of the chain holds no certificate.
    #[error("element {element} of the answer holds no PEM certificate")]
    NoCertificate {
        /// Position in `cert_chain`, from 0.
        element: usize,
    },
    /// The leaf could not be parsed.
    #[error("the leaf certificate cannot be parsed: {reason}")]
    Leaf {
        /// What the parser found wrong.
        reason: String,
    },
    /// The leaf names another identity (or several, or none).
    #[error("the leaf certificate is for {}, not for {requested}", describe_sans(delivered))]
    WrongIdentity {
        /// The identity asked for.
        requested: SpiffeId,
        /// The URI SANs of the leaf.
        delivered: Vec<String>,
    },
    /// The leaf certifies another key than the CSR's.
    #[error("the leaf certificate certifies another public key than the one of the CSR")]
    KeyMismatch,
    /// The CSR's private key cannot be used (a caller error, not the authority's).
    #[error("the private key of the request cannot be used: {reason}")]
    PrivateKey {
        /// What rustls found wrong.
        reason: String,
    },
    /// A root cannot serve as a trust anchor.
    #[error("root {index} of the answer is not a usable root: {reason}")]
    BadRoot {
        /// Position among the roots of the last element, from 0.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Every returned root has expired.
    #[error("every root of the answer has expired (the last at {})", fmt_time(*not_after))]
    RootsExpired {
        /// The latest expiry among the roots.
        not_after: SystemTime,
    },
    /// The chain does not verify to the returned roots.
    #[error("the chain does not verify to the roots of the answer: {reason}")]
    Untrusted {
        /// What path building found wrong.
        reason: String,
    },
    /// The leaf is not a valid X.509-SVID (a CA leaf, no `digitalSignature`, expired, ...).
    #[error("{0}")]
    Svid(SvidError),
}

fn describe_sans(sans: &[String]) -> String {
    match sans {
        [] => "no URI SAN".to_owned(),
        [one] => one.clone(),
        many => format!("{} URI SANs ({})", many.len(), many.join(", ")),
    }
}

/// A root certificate announced by an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// The certificate, DER encoded.
    pub der: CertificateDer<'static>,
    /// The end of its validity.
    pub not_after: SystemTime,
}

/// An answer that passed [`check_answer`].
#[derive(Debug, Clone)]
pub struct CheckedAnswer {
    /// The SVID: the chain without the roots, and the CSR's key.
    pub svid: X509Svid,
    /// The returned roots that are not expired, in the order of the answer.
    pub roots: Vec<Root>,
}

fn pem_certs(element: usize, text: &str) -> Result<Vec<CertificateDer<'static>>, AnswerError> {
    CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AnswerError::Pem {
            element,
            reason: e.to_string(),
        })
}

/// Checks an answer of the certificate authority to a request for `id` made with the key `key`,
/// at `now`, and builds the SVID from it.
///
/// `cert_chain` is the answer as sent: the leaf first, then intermediates, then the roots (the last
/// element, which may hold several PEM certificates). An element before the last may also hold
/// several certificates, read in order. The answer is accepted only if the leaf's single URI SAN is
/// `id`, the leaf certifies the public key of `key`, the leaf follows the X.509-SVID rules, and the
/// chain verifies at `now` to one of the returned roots that is not expired. Never panics, whatever
/// the input.
///
/// ```
/// use std::time::SystemTime;
/// use meshwire_identity::csr::Csr;
/// use meshwire_identity::id::SpiffeId;
/// use meshwire_identity::source::istio_ca::{AnswerError, check_answer};
///
/// let id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/web")?;
/// let csr = Csr::generate(&id)?;
/// let err = check_answer(&id, &csr.private_key(), &["not a certificate".to_owned()], SystemTime::now()).unwrap_err();
/// assert_eq!(err, AnswerError::NoRoots);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check_answer(
    id: &SpiffeId,
    key: &PrivateKeyDer<'static>,
    cert_chain: &[String],
    now: SystemTime,
) -> Result<CheckedAnswer, AnswerError> {
    let Some((roots_pem, chain_pems)) = cert_chain.split_last() else {
        return Err(AnswerError::Empty);
    };
    if chain_pems.is_empty() {
        return Err(AnswerError::NoRoots);
    }
    let mut chain = Vec::new();
    for (element, text) in chain_pems.iter().enumerate() {
        let certs = pem_certs(element, text)?;
        if certs.is_empty() {
            return Err(AnswerError::NoCertificate { element });
        }
        chain.extend(certs);
    }
    let roots = pem_certs(chain_pems.len(), roots_pem)?;
    if roots.is_empty() {
        return Err(AnswerError::NoRoots);
    }

    // Structure first: the leaf parses, the roots are usable anchors (the expired ones left out).
    let leaf = chain.first().ok_or(AnswerError::NoCertificate { element: 0 })?;
    let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| AnswerError::Leaf { reason: e.to_string() })?;
    let mut live = Vec::new();
    let mut latest_expiry = None;
    for (index, der) in roots.into_iter().enumerate() {
        let bad = |reason: String| AnswerError::BadRoot { index, reason };
        webpki::anchor_from_trusted_cert(&der).map_err(|e| bad(format!("{e:?}")))?;
        let facts = crate::x509::facts(&der).map_err(|e| bad(e.0))?;
        latest_expiry = latest_expiry.max(Some(facts.not_after));
        if now <= facts.not_after {
            live.push(Root {
                der,
                not_after: facts.not_after,
            });
        }
    }
    if live.is_empty() {
        return Err(AnswerError::RootsExpired {
            not_after: latest_expiry.unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    // Then the identity and the key: the two facts ztunnel's answer handling gets wrong or leaves out.
    let sans = parsed
        .subject_alternative_name()
        .map_err(|e| AnswerError::Leaf {
            reason: format!("subjectAltName: {e}"),
        })?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if !matches!(sans.as_slice(), [one] if *one == id.to_string()) {
        return Err(AnswerError::WrongIdentity {
            requested: id.clone(),
            delivered: sans,
        });
    }
    let signing = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| AnswerError::PrivateKey { reason: e.to_string() })?;
    let spki = signing.public_key().ok_or_else(|| AnswerError::PrivateKey {
        reason: "its public key cannot be derived".into(),
    })?;
    if spki.as_ref() != parsed.tbs_certificate.subject_pki.raw {
        return Err(AnswerError::KeyMismatch);
    }

    let bundle =
        TrustBundle::new(id.trust_domain().clone(), live.iter().map(|r| r.der.clone()).collect()).map_err(|e| {
            AnswerError::BadRoot {
                index: 0,
                reason: e.to_string(),
            }
        })?;

    let svid = X509Svid::from_der(chain, key.clone_key()).map_err(|e| match e {
        SvidError::KeyMismatch { .. } => AnswerError::KeyMismatch,
        other => AnswerError::Svid(other),
    })?;
    svid.verify(&BundleSet::from(bundle), now).map_err(|e| match e {
        SvidError::UntrustedChain { reason, .. } => AnswerError::Untrusted { reason },
        other => AnswerError::Svid(other),
    })?;
    Ok(CheckedAnswer { svid, roots: live })
}

/// The roots announced so far, per trust domain, newest first.
#[derive(Debug, Default)]
struct KnownRoots(BTreeMap<TrustDomain, Vec<Root>>);

impl KnownRoots {
    /// Merges the roots of a new answer into those known for `trust_domain`, dropping the expired
    /// ones, and returns the bundle of all of them. Changes nothing if the bundle cannot be built.
    fn merge(&mut self, trust_domain: &TrustDomain, new: &[Root], now: SystemTime) -> Result<TrustBundle, String> {
        let known = self.0.get(trust_domain).map(Vec::as_slice).unwrap_or_default();
        let mut merged: Vec<Root> = new.to_vec();
        for root in known {
            if now <= root.not_after && !merged.iter().any(|r| r.der == root.der) {
                merged.push(root.clone());
            }
        }
        merged.truncate(MAX_KNOWN_ROOTS);
        let bundle = TrustBundle::new(trust_domain.clone(), merged.iter().map(|r| r.der.clone()).collect())
            .map_err(|e| e.to_string())?;
        self.0.insert(trust_domain.clone(), merged);
        Ok(bundle)
    }
}

/// The Istio CA as a [`CertSource`]: a CSR per fetch, sent through a [`CertificateAuthority`],
/// the answer checked with [`check_answer`], the roots kept across rotations.
///
/// Time (root and certificate validity) comes from the [`Timer`]'s wall clock. `poll_interval` is
/// `None`: the manager refreshes at half-life.
pub struct IstioCa<A, T> {
    authority: A,
    timer: T,
    mode: ProxyMode,
    validity: Duration,
    roots: Mutex<KnownRoots>,
}

impl<A, T> std::fmt::Debug for IstioCa<A, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCa")
            .field("mode", &self.mode)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl<A: CertificateAuthority, T: Timer> IstioCa<A, T> {
    /// A source asking `authority`, seeing time through `timer`; in [`ProxyMode::Shared`] every
    /// request impersonates its identity. Asks for [`DEFAULT_VALIDITY`].
    pub fn new(authority: A, timer: T, mode: ProxyMode) -> Self {
        Self {
            authority,
            timer,
            mode,
            validity: DEFAULT_VALIDITY,
            roots: Mutex::new(KnownRoots::default()),
        }
    }

    /// Sets the validity asked for.
    pub fn with_validity(mut self, validity: Duration) -> Self {
        self.validity = validity;
        self
    }

    /// The validity asked for.
    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// The proxy mode.
    pub fn mode(&self) -> ProxyMode {
        self.mode
    }

    /// The authority.
    pub fn authority(&self) -> &A {
        &self.authority
    }

    /// The roots trusted for `trust_domain` as of the last answer, newest first, without those
    /// expired at `now`.
    pub fn trusted_roots(&self, trust_domain: &TrustDomain, now: SystemTime) -> Vec<CertificateDer<'static>> {
        let known = self.roots.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .0
            .get(trust_domain)
            .map(|roots| {
                roots
                    .iter()
                    .filter(|r| now <= r.not_after)
                    .map(|r| r.der.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl<A: CertificateAuthority, T: Timer> CertSource for IstioCa<A, T> {
    async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
        let csr = Csr::generate(id).map_err(|e| SourceError::Invalid(e.to_string()))?;
        let request = CertificateRequest {
            id,
            csr_pem: csr.pem(),
            validity: self.validity,
            impersonate: self.mode == ProxyMode::Shared,
        };
        let cert_chain =
            self.authority
                .create_certificate(request)
                .await
                .map_err(|message| SourceError::Authority {
                    id: id.clone(),
                    message,
                })?;
        let now = self.timer.system_now();
        let refused = |source: AnswerError| SourceError::RefusedAnswer {
            id: id.clone(),
            source: Box::new(source),
        };
        let answer = check_answer(id, &csr.private_key(), &cert_chain, now).map_err(refused)?;
        let bundle = self
            .roots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .merge(id.trust_domain(), &answer.roots, now)
            .map_err(|reason| refused(AnswerError::BadRoot { index: 0, reason }))?;
        Ok(Credentials {
            svid: answer.svid,
            bundles: BundleSet::from(bundle),
        })
    }
}
