//! Certificate sources: where the SVID and trust bundles of an identity come from.
//!
//! Every source implements [`CertSource`]: given a SPIFFE ID, it delivers [`Credentials`] (an SVID for
//! that ID and the trust bundles to verify peers with) or a [`SourceError`]. The trait is async and
//! leaves key generation to the source, so that a CSR-based CA client (the Istio CA,
//! `istio_ca::IstioCa`; the SPIFFE Workload API) fits as well as the built-in [`local_ca::LocalCa`]
//! and [`files::FileSource`].
//! [`crate::manager::CertManager`] drives sources and never needs to know which one it has.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::bundle::BundleSet;
use crate::id::SpiffeId;
use crate::svid::{SvidError, X509Svid};

#[cfg(feature = "files")]
pub mod files;
#[cfg(feature = "istio-ca")]
pub mod istio_ca;
#[cfg(feature = "local-ca")]
pub mod local_ca;

/// An SVID and the trust bundles that go with it.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The workload's certificate and key.
    pub svid: X509Svid,
    /// The bundles to verify peers with: the SVID's own trust domain, and federated ones.
    pub bundles: BundleSet,
}

/// Why a source could not deliver credentials. `Clone`, so that one failed fetch can be reported to
/// every caller that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source does not issue this identity (wrong trust domain, a files source for another ID).
    #[error("the certificate source does not serve {id}: {reason}")]
    NotServed {
        /// The identity asked for.
        id: SpiffeId,
        /// Why.
        reason: String,
    },
    /// The source produced or read an SVID that is not valid.
    #[error("invalid SVID for {id}: {source}")]
    InvalidSvid {
        /// The identity asked for.
        id: SpiffeId,
        /// What is wrong with the SVID.
        source: Box<SvidError>,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: Arc<std::io::Error>,
    },
    /// The source's own data (a bundle file, a CA root) is unusable.
    #[error("{0}")]
    Invalid(String),
    /// A remote CA or agent refused or failed the request.
    #[error("certificate authority error for {id}: {message}")]
    Authority {
        /// The identity asked for.
        id: SpiffeId,
        /// What the authority said.
        message: String,
    },
    /// The authority answered with certificates that fail the checks of
    /// [`istio_ca::check_answer`] (another identity, another key, a chain that does not verify).
    #[cfg(feature = "istio-ca")]
    #[error("refused the certificate authority's answer for {id}: {source}")]
    RefusedAnswer {
        /// The identity asked for.
        id: SpiffeId,
        /// What is wrong with the answer.
        source: Box<istio_ca::AnswerError>,
    },
}

/// A source of credentials for SPIFFE identities.
///
/// Implementations may do IO in `fetch`; they must not spawn. The returned future is polled by the
/// [`crate::manager::CertManager`] driver; it is `Send` whenever the implementation's is, so a
/// manager over a `Send` source runs on a multi-threaded executor.
///
/// ```
/// use meshwire_identity::id::SpiffeId;
/// use meshwire_identity::source::{CertSource, Credentials, SourceError};
///
/// /// A source that knows no identity.
/// struct Nothing;
/// impl CertSource for Nothing {
///     async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
///         Err(SourceError::NotServed { id: id.clone(), reason: "empty source".into() })
///     }
/// }
/// ```
pub trait CertSource {
    /// Delivers credentials for `id`.
    fn fetch(&self, id: &SpiffeId) -> impl Future<Output = Result<Credentials, SourceError>>;

    /// How often the manager should ask again even before the certificate's half-life, for sources
    /// whose content can change at any time (files). `None` (the default): at half-life only.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }
}

impl<S: CertSource + ?Sized> CertSource for Arc<S> {
    fn fetch(&self, id: &SpiffeId) -> impl Future<Output = Result<Credentials, SourceError>> {
        (**self).fetch(id)
    }

    fn poll_interval(&self) -> Option<Duration> {
        (**self).poll_interval()
    }
}

/// The local CA or certificate files, chosen at run time: the source of a program that takes either
/// from its configuration (the proxy binaries, `libmeshwire` contexts).
#[cfg(all(feature = "files", feature = "local-ca"))]
#[derive(Debug)]
pub enum LocalCaOrFiles {
    /// Certificates issued by a local CA.
    LocalCa(local_ca::LocalCa),
    /// Certificates read from PEM files.
    Files(files::FileSource),
}

#[cfg(all(feature = "files", feature = "local-ca"))]
impl CertSource for LocalCaOrFiles {
    async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
        match self {
            Self::LocalCa(ca) => ca.fetch(id).await,
            Self::Files(files) => files.fetch(id).await,
        }
    }

    fn poll_interval(&self) -> Option<Duration> {
        match self {
            Self::LocalCa(ca) => ca.poll_interval(),
            Self::Files(files) => files.poll_interval(),
        }
    }
}
