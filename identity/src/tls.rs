//! rustls configurations for SPIFFE mutual TLS: ring provider, TLS 1.3 only, AES-256-GCM and
//! AES-128-GCM, ALPN chosen by the caller.
//!
//! - [`server_config`] requires a client SVID, verifies its chain against the bundle of the client's
//!   own trust domain, accepts only the trust domains it is given, and leaves the verified peer
//!   identity for [`peer_identity`].
//! - [`client_config`] verifies the server chain against the bundle of the server's trust domain,
//!   then requires its SPIFFE ID to be one of an expected set; a wrong identity fails the handshake
//!   with an [`IdentityMismatch`] that names expected and actual. No SNI is sent and sessions are
//!   not resumed.
//!
//! ```
//! use std::sync::Arc;
//! use meshwire_identity::id::{SpiffeId, TrustDomain};
//! use meshwire_identity::source::local_ca::LocalCa;
//! use meshwire_identity::tls;
//!
//! let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
//! let server = ca.issue(&SpiffeId::new("spiffe://cluster.local/ns/a/sa/server")?)?;
//! let client = ca.issue(&SpiffeId::new("spiffe://cluster.local/ns/a/sa/client")?)?;
//! let domains = tls::TrustDomains::only(ca.trust_domain().clone());
//! let server_cfg = tls::server_config(&server.svid, &server.bundles, &domains, vec![b"h2".to_vec()])?;
//! let client_cfg = tls::client_config(
//!     &client.svid, &client.bundles, vec![server.svid.spiffe_id().clone()], vec![b"h2".to_vec()])?;
//!
//! // Drive a handshake in memory.
//! let mut c = rustls::ClientConnection::new(Arc::new(client_cfg), tls::server_name())?;
//! let mut s = rustls::ServerConnection::new(Arc::new(server_cfg))?;
//! while c.is_handshaking() || s.is_handshaking() {
//!     let mut buf = Vec::new();
//!     c.write_tls(&mut buf)?;
//!     s.read_tls(&mut &buf[..])?;
//!     s.process_new_packets()?;
//!     buf.clear();
//!     s.write_tls(&mut buf)?;
//!     c.read_tls(&mut &buf[..])?;
//!     c.process_new_packets()?;
//! }
//! assert_eq!(tls::peer_identity(&s)?, *client.svid.spiffe_id());
//! assert_eq!(tls::peer_identity(&c)?, *server.svid.spiffe_id());
//! assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeSet;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::SingleCertAndKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName, OtherError, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{self, ChainError, SvidError, X509Svid};
use crate::x509;

pub use crate::crypto::provider;

/// The server name handed to rustls on the client side. SNI is disabled, so it never reaches the
/// wire, and the verifiers check SPIFFE IDs, not names.
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// Why a TLS config could not be built or a peer identity could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The server was given no trust domain to accept.
    #[error("no trust domain is accepted: the server would refuse every client")]
    NoTrustDomain,
    /// The client was given no identity to expect.
    #[error("no expected server identity: the client would refuse every server")]
    NoExpectedIdentity,
    /// The connection has no peer certificate (handshake not done, or no client auth).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's leaf is not an SVID (cannot happen after our verifiers accepted it).
    #[error("the peer certificate is not an X.509-SVID: {0}")]
    PeerNotSvid(#[source] SvidError),
}

/// The set of trust domains whose clients a server accepts (more than one for federation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomains(BTreeSet<TrustDomain>);

impl TrustDomains {
    /// Only clients of `trust_domain`.
    pub fn only(trust_domain: TrustDomain) -> Self {
        Self(BTreeSet::from([trust_domain]))
    }

    /// Whether a trust domain is accepted.
    pub fn contains(&self, trust_domain: &TrustDomain) -> bool {
        self.0.contains(trust_domain)
    }

    /// The accepted trust domains.
    pub fn iter(&self) -> impl Iterator<Item = &TrustDomain> {
        self.0.iter()
    }
}

impl FromIterator<TrustDomain> for TrustDomains {
    fn from_iter<I: IntoIterator<Item = TrustDomain>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// The server presented a valid SVID, but not one of the identities the client expected.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityMismatch {
    /// The identities the client would accept.
    pub expected: Vec<SpiffeId>,
    /// The identity the server presented.
    pub actual: SpiffeId,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server identity {} is not the expected ", self.actual)?;
        match self.expected.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "one of [")?;
                for (i, id) in many.iter().enumerate() {
                    write!(f, "{}{id}", if i == 0 { "" } else { ", " })?;
                }
                write!(f, "]")
            }
        }
    }
}

impl StdError for IdentityMismatch {}

// rustls prints certificate errors of its `Other` kind with `{:?}`: make that the readable message.
impl fmt::Debug for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A client presented an SVID of a trust domain the server does not accept.
#[derive(Clone, PartialEq, Eq)]
pub struct ForeignTrustDomain {
    /// The client's SPIFFE ID.
    pub peer: SpiffeId,
    /// The trust domains the server accepts.
    pub accepted: Vec<TrustDomain>,
}

impl fmt::Display for ForeignTrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let accepted: Vec<_> = self.accepted.iter().map(TrustDomain::as_str).collect();
        write!(
            f,
            "peer {} is in trust domain {}, which is not accepted (accepted: {})",
            self.peer,
            self.peer.trust_domain(),
            accepted.join(", ")
        )
    }
}

impl StdError for ForeignTrustDomain {}

// rustls prints certificate errors of its `Other` kind with `{:?}`: make that the readable message.
impl fmt::Debug for ForeignTrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A peer certificate that failed chain verification, with the SPIFFE ID it claimed.
#[derive(Clone)]
pub struct UntrustedPeer {
    /// The SPIFFE ID the peer's leaf names.
    pub peer: SpiffeId,
    /// Why verification failed.
    pub reason: String,
}

impl fmt::Display for UntrustedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate of {} does not verify against the bundle of {}: {}",
            self.peer,
            self.peer.trust_domain(),
            self.reason
        )
    }
}

impl StdError for UntrustedPeer {}

// rustls prints certificate errors of its `Other` kind with `{:?}`: make that the readable message.
impl fmt::Debug for UntrustedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Finds an error of type `E` carried anywhere in `err`'s chain of sources, including inside an
/// `io::Error` from a TLS stream and a rustls certificate error.
///
/// ```
/// # use meshwire_identity::tls::{find_cause, IdentityMismatch};
/// let io_err = std::io::Error::other("not a TLS error");
/// assert!(find_cause::<IdentityMismatch>(&io_err).is_none());
/// ```
pub fn find_cause<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| find_cause::<E>(inner))
        {
            return Some(found);
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
            && let Some(found) = other.0.downcast_ref::<E>()
        {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

fn other_cert_error(e: impl StdError + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn svid_error(e: SvidError) -> rustls::Error {
    other_cert_error(e)
}

fn webpki_error(peer: &SpiffeId, e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    rustls::Error::InvalidCertificate(match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => {
            return other_cert_error(UntrustedPeer {
                peer: peer.clone(),
                reason: format!("{other:?}"),
            });
        }
    })
}

/// Reads, checks and verifies a peer chain; returns the peer's SPIFFE ID.
fn verify_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    usage: webpki::KeyUsage,
    accept: impl FnOnce(&SpiffeId) -> Result<(), rustls::Error>,
) -> Result<SpiffeId, rustls::Error> {
    let facts =
        x509::facts(end_entity).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let id = svid::leaf_spiffe_id(&facts).map_err(svid_error)?;
    accept(&id)?;
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(CertificateDer::from(end_entity.as_ref()));
    chain.extend(intermediates.iter().map(|c| CertificateDer::from(c.as_ref())));
    svid::verify_chain(&id, &chain, bundles, now, usage).map_err(|e| match e {
        ChainError::UnknownTrustDomain => other_cert_error(SvidError::UnknownTrustDomain {
            id: id.clone(),
            trust_domain: id.trust_domain().clone(),
        }),
        ChainError::Webpki(e) => webpki_error(&id, e),
    })?;
    Ok(id)
}

/// The handshake-signature half of both verifiers: TLS 1.3 signatures checked with the provider's
/// algorithms; TLS 1.2 never negotiated (the configs allow TLS 1.3 only).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not supported".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    bundles: BundleSet,
    accepted: TrustDomains,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            webpki::KeyUsage::client_auth(),
            |id| {
                if self.accepted.contains(id.trust_domain()) {
                    Ok(())
                } else {
                    Err(other_cert_error(ForeignTrustDomain {
                        peer: id.clone(),
                        accepted: self.accepted.iter().cloned().collect(),
                    }))
                }
            },
        )?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    bundles: BundleSet,
    expected: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Chain first, then the identity: a mismatch is only reported for a certificate we trust.
        let id = verify_peer(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            webpki::KeyUsage::server_auth(),
            |_| Ok(()),
        )?;
        if !self.expected.contains(&id) {
            return Err(other_cert_error(IdentityMismatch {
                expected: self.expected.clone(),
                actual: id,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// A server config presenting `svid`, requiring client SVIDs of the `accepted` trust domains that
/// chain to their bundle in `bundles`, and offering the `alpn` protocols (a client offering none of
/// them is refused with `no_application_protocol`; a client offering no ALPN is accepted).
pub fn server_config(
    svid: &X509Svid,
    bundles: &BundleSet,
    accepted: &TrustDomains,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, TlsError> {
    if accepted.0.is_empty() {
        return Err(TlsError::NoTrustDomain);
    }
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        bundles: bundles.clone(),
        accepted: accepted.clone(),
        provider: provider.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(svid.certified_key().clone())));
    config.alpn_protocols = alpn;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// A client config presenting `svid` and accepting only a server whose chain verifies against the
/// bundle of its trust domain in `bundles` and whose SPIFFE ID is one of `expected`.
///
/// Build one per destination: the expected identities are part of the config. Building is cheap
/// (no parsing, a few reference-count increments).
pub fn client_config(
    svid: &X509Svid,
    bundles: &BundleSet,
    expected: Vec<SpiffeId>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, TlsError> {
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentity);
    }
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        bundles: bundles.clone(),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(svid.certified_key().clone())));
    config.alpn_protocols = alpn;
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The SPIFFE ID of the peer of an established connection (client or server side).
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    let facts =
        x509::facts(leaf).map_err(|e| TlsError::PeerNotSvid(SvidError::Certificate { index: 0, reason: e.0 }))?;
    svid::leaf_spiffe_id(&facts).map_err(TlsError::PeerNotSvid)
}
