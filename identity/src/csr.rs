//! Certificate signing requests for a SPIFFE identity, as the Istio CA expects them.
//!
//! A [`Csr`] holds a fresh ECDSA P-256 key pair and a PKCS#10 request signed with it (SHA-256):
//! an empty subject and exactly one subject alternative name, the URI of the SPIFFE ID. With an
//! empty subject the SAN extension is marked critical (RFC 5280, 4.2.1.6). The private key stays in
//! the [`Csr`], so that the SVID can be built from the certificate the authority answers with.
//!
//! ```
//! use meshwire_identity::csr::Csr;
//! use meshwire_identity::id::SpiffeId;
//!
//! let id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/web")?;
//! let csr = Csr::generate(&id)?;
//! assert!(csr.pem().starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
//! assert_eq!(csr.id(), &id);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::id::SpiffeId;

/// Why a CSR could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Key generation or request encoding failed.
    #[error("cannot generate a certificate signing request for {id}: {reason}")]
    Generate {
        /// The identity of the request.
        id: SpiffeId,
        /// What the generator said.
        reason: String,
    },
    /// The key given to [`Csr::with_key`] is not a usable ECDSA P-256 PKCS#8 key.
    #[error("cannot use the given key for a certificate signing request for {id}: {reason}")]
    Key {
        /// The identity of the request.
        id: SpiffeId,
        /// What is wrong with the key.
        reason: String,
    },
}

/// A PKCS#10 certificate signing request for one SPIFFE ID, and its private key.
///
/// `Debug` shows the identity only, never the key.
pub struct Csr {
    id: SpiffeId,
    pem: String,
    der: Vec<u8>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl fmt::Debug for Csr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csr").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Csr {
    /// A request for `id` with a fresh ECDSA P-256 key.
    pub fn generate(id: &SpiffeId) -> Result<Self, CsrError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CsrError::Generate {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        Self::build(id, &key)
    }

    /// A request for `id` signed with an existing ECDSA P-256 key (PKCS#8): for fixtures that need
    /// a fixed key. [`Csr::generate`] is what a certificate source uses.
    ///
    /// ```
    /// use meshwire_identity::csr::Csr;
    /// use meshwire_identity::id::SpiffeId;
    ///
    /// let id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/web")?;
    /// let first = Csr::generate(&id)?;
    /// let again = Csr::with_key(&id, &first.private_key_pkcs8())?;
    /// assert_eq!(again.private_key_pkcs8(), first.private_key_pkcs8());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_key(id: &SpiffeId, key: &PrivatePkcs8KeyDer<'_>) -> Result<Self, CsrError> {
        let key =
            KeyPair::from_pkcs8_der_and_sign_algo(key, &rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CsrError::Key {
                id: id.clone(),
                reason: e.to_string(),
            })?;
        Self::build(id, &key)
    }

    fn build(id: &SpiffeId, key: &KeyPair) -> Result<Self, CsrError> {
        let generate = |e: rcgen::Error| CsrError::Generate {
            id: id.clone(),
            reason: e.to_string(),
        };
        let mut params = CertificateParams::default();
        // An empty subject (rcgen's default has a common name): the SPIFFE ID is the only name.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(generate)?)];
        let request = params.serialize_request(key).map_err(generate)?;
        let pem = request.pem().map_err(generate)?;
        Ok(Self {
            id: id.clone(),
            pem,
            der: request.der().to_vec(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// The identity the request names.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The request, PEM encoded (`CERTIFICATE REQUEST`): what the Istio CA's `csr` field carries.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The request, DER encoded.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The private key, PKCS#8.
    pub fn private_key_pkcs8(&self) -> PrivatePkcs8KeyDer<'static> {
        self.key.clone_key()
    }

    /// The private key, as the SVID takes it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension};

    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::new("spiffe://cluster.local/ns/default/sa/web").unwrap()
    }

    #[test]
    fn a_p256_request_with_one_critical_uri_san_and_an_empty_subject() {
        let csr = Csr::generate(&id()).unwrap();
        let block = pem::parse(csr.pem()).unwrap();
        assert_eq!(block.tag(), "CERTIFICATE REQUEST");
        assert_eq!(block.contents(), csr.der());
        let (rest, req) = X509CertificationRequest::from_der(csr.der()).unwrap();
        assert!(rest.is_empty());
        req.verify_signature().unwrap();
        // ecdsa-with-SHA256, over an id-ecPublicKey on prime256v1.
        assert_eq!(req.signature_algorithm.algorithm.to_id_string(), "1.2.840.10045.4.3.2");
        let spki = &req.certification_request_info.subject_pki;
        assert_eq!(spki.algorithm.algorithm.to_id_string(), "1.2.840.10045.2.1");
        let curve = spki.algorithm.parameters.as_ref().unwrap().as_oid().unwrap();
        assert_eq!(curve.to_id_string(), "1.2.840.10045.3.1.7");
        assert_eq!(
            req.certification_request_info.subject.iter().count(),
            0,
            "empty subject"
        );

        let extensions: Vec<_> = req.requested_extensions().unwrap().collect();
        assert_eq!(extensions.len(), 1, "{extensions:?}");
        let ParsedExtension::SubjectAlternativeName(san) = extensions[0] else {
            panic!("not a SAN: {:?}", extensions[0]);
        };
        assert_eq!(
            san.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
        );
        // The raw extension: critical, since the subject is empty.
        let raw = req
            .certification_request_info
            .iter_attributes()
            .find_map(|a| match a.parsed_attribute() {
                x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(r) => Some(r.extensions.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(raw.len(), 1);
        assert!(
            raw[0].critical,
            "the SAN extension of a request with an empty subject is critical"
        );
    }

    #[test]
    fn each_request_has_its_own_key_and_with_key_keeps_the_key() {
        let a = Csr::generate(&id()).unwrap();
        let b = Csr::generate(&id()).unwrap();
        assert_ne!(a.private_key_pkcs8(), b.private_key_pkcs8());
        let again = Csr::with_key(&id(), &a.private_key_pkcs8()).unwrap();
        assert_eq!(again.private_key_pkcs8(), a.private_key_pkcs8());
        let spki = |c: &Csr| {
            X509CertificationRequest::from_der(c.der())
                .unwrap()
                .1
                .certification_request_info
                .subject_pki
                .raw
                .to_vec()
        };
        assert_eq!(spki(&again), spki(&a));
        assert_ne!(spki(&b), spki(&a));
        assert!(!format!("{a:?}").contains("PRIVATE"), "Debug shows no key");
    }

    #[test]
    fn a_bad_key_is_an_error_naming_the_identity() {
        let err = Csr::with_key(&id(), &PrivatePkcs8KeyDer::from(vec![1, 2, 3])).unwrap_err();
        assert!(matches!(err, CsrError::Key { .. }));
        assert!(err.to_string().contains("sa/web"), "{err}");
    }
}
