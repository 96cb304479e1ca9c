//! SPIFFE IDs, trust domains and the Istio identity form.
//!
//! [`SpiffeId`] and [`TrustDomain`] are the `spiffe` crate's validated types. [`IstioIdentity`] is the
//! form Istio gives every workload, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! with conversions both ways.
//!
//! ```
//! use meshwire_identity::id::{IstioIdentity, SpiffeId};
//!
//! let id: IstioIdentity = "spiffe://cluster.local/ns/default/sa/bookinfo".parse()?;
//! assert_eq!(id.namespace(), "default");
//! assert_eq!(id.service_account(), "bookinfo");
//! let spiffe: SpiffeId = id.to_spiffe_id();
//! assert_eq!(spiffe.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo");
//! assert!("spiffe://cluster.local/workload/x".parse::<IstioIdentity>().is_err());
//! # Ok::<(), meshwire_identity::id::IdError>(())
//! ```

use std::fmt;
use std::str::FromStr;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// The trust domain Istio uses when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a string is not a valid SPIFFE ID or Istio identity.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input is not a SPIFFE ID at all.
    #[error("invalid SPIFFE ID {input:?}: {source}")]
    Spiffe {
        /// The rejected input.
        input: String,
        /// What the SPIFFE ID parser found wrong.
        source: SpiffeIdError,
    },
    /// The input is not a trust domain name.
    #[error("invalid trust domain {input:?}: {source}")]
    TrustDomain {
        /// The rejected input.
        input: String,
        /// What the parser found wrong.
        source: SpiffeIdError,
    },
    /// A SPIFFE ID whose path is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "SPIFFE ID {id} is not an Istio identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}"
    )]
    NotIstio {
        /// The SPIFFE ID.
        id: String,
        /// Which part of the path is wrong.
        reason: &'static str,
    },
    /// A namespace or service account that cannot be a SPIFFE path segment.
    #[error("invalid {field} {value:?}: {source}")]
    Segment {
        /// `namespace` or `service account`.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What the SPIFFE ID parser found wrong.
        source: SpiffeIdError,
    },
}

/// Parses a SPIFFE ID, naming the input in the error.
pub fn parse_spiffe_id(input: &str) -> Result<SpiffeId, IdError> {
    SpiffeId::new(input).map_err(|source| IdError::Spiffe {
        input: input.to_owned(),
        source,
    })
}

/// Parses a trust domain name (`example.org`) or the SPIFFE ID of one (`spiffe://example.org`).
pub fn parse_trust_domain(input: &str) -> Result<TrustDomain, IdError> {
    TrustDomain::new(input).map_err(|source| IdError::TrustDomain {
        input: input.to_owned(),
        source,
    })
}

/// An Istio workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IstioIdentity {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl IstioIdentity {
    /// Builds an identity, checking that namespace and service account are valid path segments.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdError> {
        let namespace = namespace.into();
        let service_account = service_account.into();
        for (field, value) in [("namespace", &namespace), ("service account", &service_account)] {
            SpiffeId::from_segments(trust_domain.clone(), &[value.as_str()]).map_err(|source| IdError::Segment {
                field,
                value: value.clone(),
                source,
            })?;
        }
        // The whole ID must also fit the SPIFFE length limit.
        SpiffeId::from_segments(trust_domain.clone(), &["ns", &namespace, "sa", &service_account]).map_err(
            |source| IdError::Spiffe {
                input: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
                source,
            },
        )?;
        Ok(Self {
            trust_domain,
            namespace,
            service_account,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The SPIFFE ID of this identity.
    pub fn to_spiffe_id(&self) -> SpiffeId {
        SpiffeId::from_segments(
            self.trust_domain.clone(),
            &["ns", &self.namespace, "sa", &self.service_account],
        )
        .expect("segments were validated when the identity was built") // invariant of `new`
    }
}

impl fmt::Display for IstioIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl TryFrom<&SpiffeId> for IstioIdentity {
    type Error = IdError;

    fn try_from(id: &SpiffeId) -> Result<Self, IdError> {
        let not_istio = |reason| IdError::NotIstio {
            id: id.to_string(),
            reason,
        };
        let mut segments = id
            .path()
            .strip_prefix('/')
            .ok_or_else(|| not_istio("the path is empty"))?
            .split('/');
        let (Some(ns_key), Some(ns), Some(sa_key), Some(sa)) =
            (segments.next(), segments.next(), segments.next(), segments.next())
        else {
            return Err(not_istio("the path has fewer than four segments"));
        };
        if segments.next().is_some() {
            return Err(not_istio("the path has more than four segments"));
        }
        if ns_key != "ns" {
            return Err(not_istio("the first segment is not \"ns\""));
        }
        if sa_key != "sa" {
            return Err(not_istio("the third segment is not \"sa\""));
        }
        // `SpiffeId::new` accepts IDs beyond the 2048-byte limit that `new` (and `to_spiffe_id`)
        // enforce; validate the same way so every identity converts back without panicking.
        Self::new(id.trust_domain().clone(), ns, sa)
    }
}

impl TryFrom<SpiffeId> for IstioIdentity {
    type Error = IdError;

    fn try_from(id: SpiffeId) -> Result<Self, IdError> {
        Self::try_from(&id)
    }
}

impl From<&IstioIdentity> for SpiffeId {
    fn from(id: &IstioIdentity) -> Self {
        id.to_spiffe_id()
    }
}

impl From<IstioIdentity> for SpiffeId {
    fn from(id: IstioIdentity) -> Self {
        id.to_spiffe_id()
    }
}

impl FromStr for IstioIdentity {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::try_from(&parse_spiffe_id(s)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_name_the_part_that_is_wrong() {
        let err = "spiffe://td/ns/a/xx/b".parse::<IstioIdentity>().unwrap_err();
        assert!(err.to_string().contains("third segment"), "{err}");
        let err = "spiffe://td/ns/a/sa/b/c".parse::<IstioIdentity>().unwrap_err();
        assert!(err.to_string().contains("more than four"), "{err}");
        let err = "spiffe://td".parse::<IstioIdentity>().unwrap_err();
        assert!(err.to_string().contains("path is empty"), "{err}");
        let err = "http://td/ns/a/sa/b".parse::<IstioIdentity>().unwrap_err();
        assert!(
            matches!(
                err,
                IdError::Spiffe {
                    source: SpiffeIdError::WrongScheme,
                    ..
                }
            ),
            "{err}"
        );
        let err = IstioIdentity::new(parse_trust_domain("td").unwrap(), "a/b", "c").unwrap_err();
        assert!(matches!(err, IdError::Segment { field: "namespace", .. }), "{err}");
    }
}
