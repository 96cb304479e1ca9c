//! The Istio CA source against an in-process authority: a real rcgen CA that parses the CSR,
//! checks its signature and signs a certificate for its key (or, on purpose, a wrong answer).
//! Issuance, mTLS between issued SVIDs, every refused answer, impersonation, root rotation, and the
//! certificate manager over the source in virtual time (refresh at half-life, a CA outage).
#![allow(clippy::unwrap_used, missing_docs)]
#![cfg(all(feature = "istio-ca", feature = "local-ca"))]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{TestTimer, settle};
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::manager::{CertManager, ManagerConfig, Priority};
use meshwire_identity::source::istio_ca::{
    AnswerError, CertificateAuthority, CertificateRequest, DEFAULT_VALIDITY, IstioCa, ProxyMode, check_answer,
};
use meshwire_identity::source::{CertSource, Credentials, SourceError};
use meshwire_identity::svid::SvidError;
use meshwire_identity::time::Timer;
use meshwire_identity::tls::{self, TrustDomains};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::prelude::FromDer;

// ---------------------------------------------------------------------------------------------
// An in-process certificate authority.

/// A CA certificate and its key.
struct Ca {
    der: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

fn ca_params(name: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cluster.local");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(serial());
    params
}

fn serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}

impl Ca {
    fn root(name: &str, not_before: SystemTime, not_after: SystemTime) -> Arc<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(name, not_before, not_after);
        let cert = params.self_signed(&key).unwrap();
        Arc::new(Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    fn intermediate(&self, name: &str) -> Arc<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params(
            name,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            self.not_after,
        );
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Arc::new(Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            not_after: self.not_after,
        })
    }
}

/// Which answer the authority gives.
#[derive(Debug, Clone, PartialEq)]
enum Behaviour {
    Good,
    /// A certificate for another identity.
    WrongIdentity,
    /// A certificate for the requested identity, but for another key than the CSR's.
    WrongKey,
    /// The leaf only, no roots.
    LeafOnly,
    /// The roots of an unrelated CA.
    UnrelatedRoots,
    /// Exactly this `cert_chain`.
    Fixed(Vec<String>),
    /// An error.
    Outage,
}

/// The chain the authority signs with and the answer's trailing elements.
#[derive(Clone)]
struct Setup {
    signer: Arc<Ca>,
    /// Intermediates, one element each, in the answer after the leaf.
    intermediates: Vec<String>,
    /// The last element: one or several PEM roots.
    roots: String,
}

#[derive(Debug, Clone)]
struct Seen {
    id: SpiffeId,
    csr_pem: String,
    validity: Duration,
    impersonate: bool,
    at: SystemTime,
}

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

struct TestAuthority {
    clock: Clock,
    setup: Mutex<Setup>,
    behaviour: Mutex<Behaviour>,
    seen: Mutex<Vec<Seen>>,
    unrelated: Arc<Ca>,
}

impl TestAuthority {
    fn new(clock: Clock, setup: Setup) -> Arc<Self> {
        Arc::new(Self {
            clock,
            setup: Mutex::new(setup),
            behaviour: Mutex::new(Behaviour::Good),
            seen: Mutex::new(Vec::new()),
            unrelated: Ca::root("unrelated", epoch(2020), epoch(2100)),
        })
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn set_setup(&self, setup: Setup) {
        *self.setup.lock().unwrap() = setup;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Signs the CSR as istiod would: the CSR's key and SAN, `validity` from `now`, back-dated a minute.
    fn answer(&self, request: &CertificateRequest<'_>, now: SystemTime) -> Result<Vec<String>, String> {
        let behaviour = self.behaviour.lock().unwrap().clone();
        let setup = self.setup.lock().unwrap().clone();
        let mut csr =
            CertificateSigningRequestParams::from_pem(request.csr_pem).map_err(|e| format!("bad CSR: {e}"))?;
        let expected = vec![SanType::URI(request.id.to_string().try_into().unwrap())];
        if csr.params.subject_alt_names != expected {
            return Err(format!(
                "the CSR names {:?}, not {}",
                csr.params.subject_alt_names, request.id
            ));
        }
        let params = &mut csr.params;
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + request.validity).into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial());
        if behaviour == Behaviour::WrongIdentity {
            params.subject_alt_names = vec![SanType::URI(
                "spiffe://cluster.local/ns/other/sa/impostor".try_into().unwrap(),
            )];
        }
        let leaf = if behaviour == Behaviour::WrongKey {
            let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            csr.params.signed_by(&other, &setup.signer.issuer).unwrap()
        } else {
            csr.signed_by(&setup.signer.issuer).unwrap()
        };
        let mut chain = vec![leaf.pem()];
        chain.extend(setup.intermediates.iter().cloned());
        match behaviour {
            Behaviour::LeafOnly => {}
            Behaviour::UnrelatedRoots => chain.push(self.unrelated.pem.clone()),
            _ => chain.push(setup.roots.clone()),
        }
        Ok(chain)
    }
}

impl CertificateAuthority for TestAuthority {
    async fn create_certificate(&self, request: CertificateRequest<'_>) -> Result<Vec<String>, String> {
        let now = (self.clock)();
        self.seen.lock().unwrap().push(Seen {
            id: request.id.clone(),
            csr_pem: request.csr_pem.to_owned(),
            validity: request.validity,
            impersonate: request.impersonate,
            at: now,
        });
        match self.behaviour.lock().unwrap().clone() {
            Behaviour::Outage => return Err("istiod unavailable: connection refused".into()),
            Behaviour::Fixed(chain) => return Ok(chain),
            _ => {}
        }
        self.answer(&request, now)
    }
}

/// A wall clock the test sets; its sleeps never end (the source only reads the time).
#[derive(Clone)]
struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    fn new(at: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(at)))
    }
    fn get(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
    fn clock(&self) -> Clock {
        let me = self.clone();
        Arc::new(move || me.get())
    }
}

impl Timer for ManualClock {
    type Sleep = std::future::Pending<()>;
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn system_now(&self) -> SystemTime {
        self.get()
    }
    fn sleep_until(&self, _deadline: Instant) -> Self::Sleep {
        std::future::pending()
    }
}

fn epoch(year: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs((year - 1970) * 31_556_952)
}

fn id(name: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://cluster.local/ns/default/sa/{name}")).unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A root and an intermediate signing for it; answers are `[leaf, intermediate, root]`.
fn with_intermediate() -> (Arc<Ca>, Setup) {
    let root = Ca::root("root", epoch(2020), epoch(2100));
    let intermediate = root.intermediate("istiod");
    let setup = Setup {
        intermediates: vec![intermediate.pem.clone()],
        signer: intermediate,
        roots: root.pem.clone(),
    };
    (root, setup)
}

fn direct(root: &Arc<Ca>) -> Setup {
    Setup {
        signer: root.clone(),
        intermediates: Vec::new(),
        roots: root.pem.clone(),
    }
}

type Source = IstioCa<Arc<TestAuthority>, ManualClock>;

fn source(mode: ProxyMode) -> (Source, Arc<TestAuthority>, Arc<Ca>, ManualClock) {
    let clock = ManualClock::new(SystemTime::now());
    let (root, setup) = with_intermediate();
    let authority = TestAuthority::new(clock.clock(), setup);
    (
        IstioCa::new(authority.clone(), clock.clone(), mode),
        authority,
        root,
        clock,
    )
}

/// The public key (SubjectPublicKeyInfo) a CSR asks a certificate for.
fn csr_spki(csr_pem: &str) -> Vec<u8> {
    let der = pem::parse(csr_pem).unwrap().into_contents();
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
    req.certification_request_info.subject_pki.raw.to_vec()
}

fn leaf_spki(cert: &CertificateDer<'_>) -> Vec<u8> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert).unwrap();
    cert.tbs_certificate.subject_pki.raw.to_vec()
}

fn refused(err: &SourceError) -> &AnswerError {
    match err {
        SourceError::RefusedAnswer { source, .. } => source,
        other => panic!("not a refused answer: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Issuance.

#[tokio::test]
async fn issues_an_svid_for_the_csr_key_that_verifies_against_the_returned_root() {
    let (ca, authority, root, clock) = source(ProxyMode::Dedicated);
    let web = id("web");
    let creds = ca.fetch(&web).await.unwrap();
    assert_eq!(creds.svid.spiffe_id(), &web);
    // Leaf and intermediate; the root is in the bundle, not in the chain.
    assert_eq!(creds.svid.chain().len(), 2);
    let seen = authority.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        leaf_spki(creds.svid.leaf()),
        csr_spki(&seen[0].csr_pem),
        "the leaf certifies the CSR's key"
    );
    assert!(creds.svid.certified_key().keys_match().is_ok());
    creds.svid.verify(&creds.bundles, clock.get()).unwrap();
    assert_eq!(
        creds.bundles.get(&td()).unwrap().roots(),
        std::slice::from_ref(&root.der)
    );
    assert_eq!(ca.trusted_roots(&td(), clock.get()), vec![root.der.clone()]);
    // The lifetime asked for by default: ztunnel's 24 h, back-dated a minute by the CA.
    assert_eq!(seen[0].validity, DEFAULT_VALIDITY);
    assert_eq!(creds.svid.lifetime(), DEFAULT_VALIDITY + Duration::from_secs(60));
    assert!(ca.poll_interval().is_none());
    // Every fetch makes a new key.
    let again = ca.fetch(&web).await.unwrap();
    assert_ne!(leaf_spki(again.svid.leaf()), leaf_spki(creds.svid.leaf()));
}

#[tokio::test]
async fn impersonates_in_shared_mode_only_and_asks_for_the_configured_validity() {
    let (shared, authority, _, _) = source(ProxyMode::Shared);
    let shared = shared.with_validity(Duration::from_secs(3600));
    shared.fetch(&id("a")).await.unwrap();
    let seen = authority.seen();
    assert!(
        seen[0].impersonate,
        "shared (node) mode asks for another workload's identity"
    );
    assert_eq!(seen[0].id, id("a"));
    assert_eq!(seen[0].validity, Duration::from_secs(3600));

    let (dedicated, authority, _, _) = source(ProxyMode::Dedicated);
    dedicated.fetch(&id("a")).await.unwrap();
    assert!(!authority.seen()[0].impersonate);
    assert_eq!(ProxyMode::default(), ProxyMode::Dedicated);
}

type ClientStream = tokio_rustls::client::TlsStream<tokio::io::DuplexStream>;
type ServerStream = tokio_rustls::server::TlsStream<tokio::io::DuplexStream>;

async fn handshake(client: &Credentials, server: &Credentials, expected: &SpiffeId) -> (ClientStream, ServerStream) {
    let alpn = vec![b"h2".to_vec()];
    let server_cfg =
        tls::server_config(&server.svid, &server.bundles, &TrustDomains::only(td()), alpn.clone()).unwrap();
    let client_cfg = tls::client_config(&client.svid, &client.bundles, vec![expected.clone()], alpn).unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let (c, s) = tokio::join!(connector.connect(tls::server_name(), a), acceptor.accept(b));
    (c.unwrap(), s.unwrap())
}

#[tokio::test]
async fn two_issued_svids_complete_an_mtls_handshake() {
    let (ca, _, _, _) = source(ProxyMode::Shared);
    let (alice, bob) = (id("alice"), id("bob"));
    let client = ca.fetch(&alice).await.unwrap();
    let server = ca.fetch(&bob).await.unwrap();
    let (mut c, mut s) = handshake(&client, &server, &bob).await;
    assert_eq!(tls::peer_identity(c.get_ref().1).unwrap(), bob);
    assert_eq!(tls::peer_identity(s.get_ref().1).unwrap(), alice);
    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

// ---------------------------------------------------------------------------------------------
// Refused answers.

#[tokio::test]
async fn an_answer_for_another_identity_is_refused() {
    let (ca, authority, _, _) = source(ProxyMode::Shared);
    authority.set(Behaviour::WrongIdentity);
    let err = ca.fetch(&id("web")).await.unwrap_err();
    assert!(
        matches!(refused(&err), AnswerError::WrongIdentity { requested, delivered }
            if *requested == id("web") && delivered == &["spiffe://cluster.local/ns/other/sa/impostor".to_owned()]),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("sa/web") && text.contains("sa/impostor"), "{text}");
}

#[tokio::test]
async fn an_answer_certifying_another_key_is_refused() {
    let (ca, authority, _, _) = source(ProxyMode::Shared);
    authority.set(Behaviour::WrongKey);
    let err = ca.fetch(&id("web")).await.unwrap_err();
    assert_eq!(refused(&err), &AnswerError::KeyMismatch, "{err}");
    assert!(
        err.to_string().contains("sa/web") && err.to_string().contains("public key"),
        "{err}"
    );
}

#[tokio::test]
async fn a_chain_that_does_not_verify_to_the_returned_roots_is_refused() {
    let (ca, authority, _, _) = source(ProxyMode::Shared);
    authority.set(Behaviour::UnrelatedRoots);
    let err = ca.fetch(&id("web")).await.unwrap_err();
    assert!(matches!(refused(&err), AnswerError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("sa/web"), "{err}");

    // A leaf signed by a CA whose own certificate is left out of the answer does not verify either.
    let (_, setup) = with_intermediate();
    authority.set_setup(Setup {
        intermediates: Vec::new(),
        ..setup
    });
    authority.set(Behaviour::Good);
    let err = ca.fetch(&id("web")).await.unwrap_err();
    assert!(matches!(refused(&err), AnswerError::Untrusted { .. }), "{err}");
}

#[tokio::test]
async fn an_answer_without_roots_is_refused() {
    let (ca, authority, _, _) = source(ProxyMode::Shared);
    // A CA signing with its root directly answers `[leaf]`: nothing is left for the roots.
    authority.set(Behaviour::LeafOnly);
    let root = Ca::root("root", epoch(2020), epoch(2100));
    authority.set_setup(direct(&root));
    let err = ca.fetch(&id("web")).await.unwrap_err();
    assert_eq!(refused(&err), &AnswerError::NoRoots, "{err}");
    assert!(err.to_string().contains("no root"), "{err}");
}

#[tokio::test]
async fn garbage_answers_are_refused_with_clear_errors() {
    let (ca, authority, root, clock) = source(ProxyMode::Shared);
    let good = ca.fetch(&id("web")).await.unwrap();
    let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", good.svid.leaf().to_vec()));
    let bad_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_owned();
    let not_der = pem::encode(&pem::Pem::new("CERTIFICATE", b"not DER at all".to_vec()));
    type Expect = fn(&AnswerError) -> bool;
    let cases: Vec<(Vec<String>, Expect)> = vec![
        (vec![], |e| *e == AnswerError::Empty),
        (vec!["hello".into()], |e| *e == AnswerError::NoRoots),
        (vec!["hello".into(), root.pem.clone()], |e| {
            *e == AnswerError::NoCertificate { element: 0 }
        }),
        (vec![bad_base64.clone(), root.pem.clone()], |e| {
            matches!(e, AnswerError::Pem { element: 0, .. })
        }),
        (vec![leaf_pem.clone(), bad_base64], |e| {
            matches!(e, AnswerError::Pem { element: 1, .. })
        }),
        (vec![leaf_pem.clone(), String::new()], |e| *e == AnswerError::NoRoots),
        (vec![not_der.clone(), root.pem.clone()], |e| {
            matches!(e, AnswerError::Leaf { .. })
        }),
        (vec![leaf_pem.clone(), not_der], |e| {
            matches!(e, AnswerError::BadRoot { index: 0, .. })
        }),
        (
            vec![leaf_pem.clone(), "\u{0}\u{ffff}garbage".into(), root.pem.clone()],
            |e| *e == AnswerError::NoCertificate { element: 1 },
        ),
    ];
    for (chain, expected) in cases {
        authority.set(Behaviour::Fixed(chain.clone()));
        let err = ca.fetch(&id("web")).await.unwrap_err();
        let answer = refused(&err);
        assert!(expected(answer), "{chain:?}: {answer:?}");
        let text = err.to_string();
        assert!(text.contains("sa/web") && text.len() > 40, "{text}");
    }
    // The same leaf, with a key that is not the CSR's (an answer to an earlier request), is refused;
    // with the key of that request, accepted.
    let intermediate_pem = pem::encode(&pem::Pem::new("CERTIFICATE", good.svid.chain()[1].to_vec()));
    let chain = vec![leaf_pem, intermediate_pem, root.pem.clone()];
    authority.set(Behaviour::Fixed(chain.clone()));
    assert_eq!(
        refused(&ca.fetch(&id("web")).await.unwrap_err()),
        &AnswerError::KeyMismatch
    );
    let checked = check_answer(&id("web"), good.svid.private_key(), &chain, clock.get()).unwrap();
    assert!(checked.svid.same_chain(&good.svid));
    assert_eq!(checked.roots.len(), 1);
    // Asked for another identity, the same answer is refused.
    let err = check_answer(&id("db"), good.svid.private_key(), &chain, clock.get()).unwrap_err();
    assert!(matches!(err, AnswerError::WrongIdentity { .. }), "{err}");
    // An expired leaf is an SVID error.
    let late = clock.get() + Duration::from_secs(2 * 24 * 3600);
    let err = check_answer(&id("web"), good.svid.private_key(), &chain, late).unwrap_err();
    assert!(matches!(err, AnswerError::Svid(SvidError::Expired { .. })), "{err}");
}

#[tokio::test]
async fn roots_that_all_expired_are_refused() {
    let clock = ManualClock::new(SystemTime::now());
    let old = Ca::root("old", epoch(2020), clock.get() + Duration::from_secs(3600));
    let authority = TestAuthority::new(clock.clock(), direct(&old));
    let ca = IstioCa::new(authority.clone(), clock.clone(), ProxyMode::Shared);
    ca.fetch(&id("web")).await.unwrap();
    clock.advance(Duration::from_secs(7200));
    let err = ca.fetch(&id("web")).await.unwrap_err();
    assert!(matches!(refused(&err), AnswerError::RootsExpired { .. }), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(ca.trusted_roots(&td(), clock.get()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Root rotation.

#[tokio::test]
async fn rotated_roots_stay_trusted_until_they_expire() {
    let clock = ManualClock::new(SystemTime::now());
    let start = clock.get();
    let old = Ca::root("old", epoch(2020), start + Duration::from_secs(6 * 3600));
    let new = Ca::root("new", epoch(2020), epoch(2100));
    // Rotation starts: the answer is signed by the old root and announces both.
    let authority = TestAuthority::new(
        clock.clock(),
        Setup {
            signer: old.clone(),
            intermediates: Vec::new(),
            roots: format!("{}{}", old.pem, new.pem),
        },
    );
    let ca = IstioCa::new(authority.clone(), clock.clone(), ProxyMode::Shared);
    let signed_by_old = ca.fetch(&id("a")).await.unwrap();
    assert_eq!(signed_by_old.bundles.get(&td()).unwrap().roots().len(), 2);

    // Then the CA signs with the new root and announces it alone: the old one stays trusted.
    // (No time passes here: the handshakes below are checked by rustls on the real clock.)
    authority.set_setup(direct(&new));
    let signed_by_new = ca.fetch(&id("b")).await.unwrap();
    let bundles = &signed_by_new.bundles;
    let roots = bundles.get(&td()).unwrap().roots();
    assert_eq!(
        roots,
        &[new.der.clone(), old.der.clone()],
        "newest first, the old one kept"
    );
    signed_by_old.svid.verify(bundles, clock.get()).unwrap();
    signed_by_new.svid.verify(bundles, clock.get()).unwrap();
    // Both ways of the handshake work between the two roots.
    let (a, b) = (id("a"), id("b"));
    let now_a = Credentials {
        svid: signed_by_old.svid.clone(),
        bundles: bundles.clone(),
    };
    handshake(&now_a, &signed_by_new, &b).await;
    handshake(&signed_by_new, &now_a, &a).await;
    assert_eq!(ca.trusted_roots(&td(), clock.get()).len(), 2);

    // Once the old root expired, the next answer drops it.
    clock.advance(Duration::from_secs(6 * 3600 + 1));
    assert_eq!(ca.trusted_roots(&td(), clock.get()), vec![new.der.clone()]);
    let later = ca.fetch(&id("b")).await.unwrap();
    assert_eq!(
        later.bundles.get(&td()).unwrap().roots(),
        std::slice::from_ref(&new.der)
    );
    let err = signed_by_old.svid.verify(&later.bundles, clock.get()).unwrap_err();
    assert!(matches!(err, SvidError::UntrustedChain { .. }), "{err}");
}

#[tokio::test]
async fn roots_are_kept_per_trust_domain() {
    let clock = ManualClock::new(SystemTime::now());
    let root = Ca::root("root", epoch(2020), epoch(2100));
    let authority = TestAuthority::new(clock.clock(), direct(&root));
    let ca = IstioCa::new(authority.clone(), clock.clone(), ProxyMode::Shared);
    let other = SpiffeId::new("spiffe://other.org/ns/default/sa/x").unwrap();
    let creds = ca.fetch(&other).await.unwrap();
    assert!(creds.bundles.get(&TrustDomain::new("other.org").unwrap()).is_some());
    assert!(creds.bundles.get(&td()).is_none());
    assert!(ca.trusted_roots(&td(), clock.get()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Through the certificate manager, in virtual time.

type Managed = CertManager<Arc<IstioCa<Arc<TestAuthority>, TestTimer>>, TestTimer>;

fn managed(validity: Duration) -> (Managed, Arc<TestAuthority>, TestTimer) {
    let timer = TestTimer::new();
    let (_, setup) = with_intermediate();
    let wall = timer.clone();
    let authority = TestAuthority::new(Arc::new(move || wall.system_now()), setup);
    let source = Arc::new(IstioCa::new(authority.clone(), timer.clone(), ProxyMode::Shared).with_validity(validity));
    let manager = CertManager::new(
        source,
        timer.clone(),
        ManagerConfig {
            seed: Some(11),
            ..ManagerConfig::default()
        },
    );
    let driver = manager.clone();
    tokio::spawn(async move { driver.run().await });
    (manager, authority, timer)
}

async fn sleep_until_wall(timer: &TestTimer, at: SystemTime, step: Duration) {
    while timer.system_now() < at {
        tokio::time::sleep(step).await;
    }
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn the_manager_refreshes_at_half_life() {
    let validity = Duration::from_secs(3600);
    let (manager, authority, timer) = managed(validity);
    let web = id("web");
    let handle = manager.get(&web, Priority::Connection).await.unwrap();
    let first = handle.current();
    assert_eq!(authority.seen().len(), 1);
    let issued = authority.seen()[0].at;

    // Nothing before 45 % of the validity, a refresh by 55 %.
    sleep_until_wall(&timer, issued + validity.mul_f64(0.45), Duration::from_secs(10)).await;
    assert_eq!(authority.seen().len(), 1, "no refresh before half-life");
    sleep_until_wall(&timer, issued + validity.mul_f64(0.55), Duration::from_secs(10)).await;
    let seen = authority.seen();
    assert_eq!(seen.len(), 2, "one refresh at half-life");
    let at = seen[1]
        .at
        .duration_since(first.svid().not_before())
        .unwrap()
        .as_secs_f64()
        / first.svid().lifetime().as_secs_f64();
    assert!((0.47..=0.53).contains(&at), "refreshed at {at:.3} of the lifetime");
    let second = handle.current();
    assert!(
        !second.svid().same_chain(first.svid()),
        "the handle yields the new certificate"
    );
    assert_eq!(second.svid().spiffe_id(), &web);
    assert!(seen.iter().all(|s| s.impersonate && s.validity == validity));
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn a_ca_outage_keeps_the_valid_certificate_retries_with_back_off_and_renews_after() {
    let validity = Duration::from_secs(4 * 3600);
    let (manager, authority, timer) = managed(validity);
    let web = id("web");
    let handle = manager.get(&web, Priority::Connection).await.unwrap();
    let original = handle.current();
    let issued = authority.seen()[0].at;

    // istiod goes away before the refresh point and stays away well past it.
    authority.set(Behaviour::Outage);
    let outage_end = issued + validity / 2 + Duration::from_secs(1200);
    sleep_until_wall(&timer, outage_end, Duration::from_secs(1)).await;
    let attempts: Vec<SystemTime> = authority.seen()[1..].iter().map(|s| s.at).collect();
    assert!(attempts.len() >= 8, "retried: {} attempts", attempts.len());
    let gaps: Vec<f64> = attempts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap().as_secs_f64())
        .collect();
    // Exponential back-off: 500 ms doubling (+-20 %), capped at 150 s; 1 s steps blur the first ones.
    let mut expected = 0.5f64;
    for (i, gap) in gaps.iter().enumerate() {
        assert!(
            *gap >= expected * 0.8 - 1.0 && *gap <= expected * 1.2 + 1.0,
            "gap {i}: {gap:.2} s, expected {expected} s: {gaps:?}"
        );
        expected = (expected * 2.0).min(150.0);
    }
    // The certificate in service is still the first one, and still valid.
    assert!(handle.current().svid().same_chain(original.svid()));
    assert!(original.svid().not_after() > timer.system_now());
    let again = manager.get(&web, Priority::Connection).await.unwrap();
    assert!(again.current().svid().same_chain(original.svid()));
    let status = manager.status();
    assert!(
        status[0].last_error.as_deref().unwrap().contains("istiod unavailable"),
        "{status:?}"
    );

    // istiod is back: the next retry renews the certificate.
    authority.set(Behaviour::Good);
    let before = authority.seen().len();
    tokio::time::sleep(Duration::from_secs(200)).await;
    settle().await;
    assert_eq!(authority.seen().len(), before + 1);
    let renewed = handle.current();
    assert!(!renewed.svid().same_chain(original.svid()), "renewed after the outage");
    assert!(renewed.svid().not_after() > original.svid().not_after());
    assert!(manager.status()[0].last_error.is_none());
    manager.shutdown();
}

#[tokio::test(start_paused = true)]
async fn a_refused_answer_is_retried_and_the_valid_certificate_kept() {
    let validity = Duration::from_secs(3600);
    let (manager, authority, timer) = managed(validity);
    let web = id("web");
    let handle = manager.get(&web, Priority::Connection).await.unwrap();
    let original = handle.current();
    let issued = authority.seen()[0].at;
    authority.set(Behaviour::WrongKey);
    sleep_until_wall(&timer, issued + validity.mul_f64(0.6), Duration::from_secs(1)).await;
    assert!(authority.seen().len() >= 4, "refused answers are retried");
    assert!(handle.current().svid().same_chain(original.svid()));
    let status = manager.status();
    let error = status[0].last_error.clone().unwrap();
    assert!(error.contains("refused") && error.contains("public key"), "{error}");
    authority.set(Behaviour::Good);
    tokio::time::sleep(Duration::from_secs(200)).await;
    settle().await;
    assert!(!handle.current().svid().same_chain(original.svid()));
    manager.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Seeds of the `ca_answer` fuzz target.

/// Writes `fuzz/fixtures/ca-answer-key.pem` (the fixed CSR key of the target) and the seeds in
/// `fuzz/corpus/ca_answer/`: real answers of an rcgen CA, good and bad. Run with
/// `cargo test -p meshwire-identity --test istio_ca -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes the fuzz seeds"]
fn write_fuzz_seeds() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = fuzz.join("corpus/ca_answer");
    std::fs::create_dir_all(&corpus).unwrap();
    // The target checks answers at 2026-06-01 for this identity; the seeds are valid 2026-2036.
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    let fuzz_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/fuzz").unwrap();
    let csr = meshwire_identity::csr::Csr::generate(&fuzz_id).unwrap();
    let key_pem = pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        csr.private_key_pkcs8().secret_pkcs8_der().to_vec(),
    ));
    std::fs::write(fuzz.join("fixtures/ca-answer-key.pem"), key_pem).unwrap();

    let clock: Clock = Arc::new(move || start);
    let root = Ca::root(
        "root",
        start - Duration::from_secs(3600),
        start + Duration::from_secs(20 * 365 * 86_400),
    );
    let next = Ca::root(
        "next",
        start - Duration::from_secs(3600),
        start + Duration::from_secs(20 * 365 * 86_400),
    );
    let intermediate = root.intermediate("istiod");
    let authority = TestAuthority::new(clock, direct(&root));
    let request = CertificateRequest {
        id: &fuzz_id,
        csr_pem: csr.pem(),
        validity: Duration::from_secs(10 * 365 * 86_400),
        impersonate: true,
    };
    let check_at = start + Duration::from_secs(151 * 86_400);
    let write = |name: &str, chain: Vec<String>, accepted: bool| {
        let verdict = check_answer(&fuzz_id, &csr.private_key(), &chain, check_at);
        assert_eq!(verdict.is_ok(), accepted, "{name}: {verdict:?}");
        // Mode 0: the PEM elements separated by NUL bytes.
        let mut seed = vec![0u8];
        seed.extend(chain.join("\0").into_bytes());
        std::fs::write(corpus.join(format!("{name}-pem")), seed).unwrap();
        // Mode 1: DER certificates, each with a 2-byte big-endian length; an empty one ends an element.
        let mut seed = vec![1u8];
        for (i, element) in chain.iter().enumerate() {
            if i > 0 {
                seed.extend([0, 0]);
            }
            for cert in CertificateDer::pem_slice_iter(element.as_bytes()).flatten() {
                seed.extend(u16::try_from(cert.len()).unwrap().to_be_bytes());
                seed.extend_from_slice(&cert);
            }
        }
        std::fs::write(corpus.join(format!("{name}-der")), seed).unwrap();
    };
    let answer = |setup: Setup, behaviour: Behaviour| {
        authority.set_setup(setup);
        authority.set(behaviour);
        authority.answer(&request, start).unwrap()
    };
    write("good", answer(direct(&root), Behaviour::Good), true);
    let with_intermediate = Setup {
        signer: intermediate.clone(),
        intermediates: vec![intermediate.pem.clone()],
        roots: root.pem.clone(),
    };
    write("intermediate", answer(with_intermediate, Behaviour::Good), true);
    let two_roots = Setup {
        roots: format!("{}{}", next.pem, root.pem),
        ..direct(&root)
    };
    write("two-roots", answer(two_roots, Behaviour::Good), true);
    write("wrong-identity", answer(direct(&root), Behaviour::WrongIdentity), false);
    write("wrong-key", answer(direct(&root), Behaviour::WrongKey), false);
    write(
        "unrelated-roots",
        answer(direct(&root), Behaviour::UnrelatedRoots),
        false,
    );
    write("leaf-only", answer(direct(&root), Behaviour::LeafOnly), false);
}
