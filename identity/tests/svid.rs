//! X.509-SVID validation against real certificates generated with rcgen: one fixture per way a
//! certificate can be wrong, each mapped to its own `SvidError` variant, plus the local CA.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]
#![cfg(feature = "local-ca")]

use std::time::{Duration, SystemTime};

use meshwire_identity::bundle::{BundleSet, TrustBundle};
use meshwire_identity::id::{SpiffeId, SpiffeIdError, TrustDomain};
use meshwire_identity::source::local_ca::{CA_FILE, DEFAULT_SVID_LIFETIME, LocalCa, LocalCaError, ROOT_CERT_FILE};
use meshwire_identity::svid::{SvidError, X509Svid};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};

const TD: &str = "cluster.local";
const ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Fixture builder
// ---------------------------------------------------------------------------------------------

/// The current time rounded down to a whole second, as X.509 validity stores it.
fn base() -> SystemTime {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// A certificate authority: a root, or an intermediate with the chain up to (not including) its root.
struct Ca {
    trust_domain: TrustDomain,
    params: CertificateParams,
    key: KeyPair,
    cert: CertificateDer<'static>,
    /// The intermediates between a leaf of this CA and the root, nearest first.
    intermediates: Vec<CertificateDer<'static>>,
}

fn ca_params(trust_domain: &str, common_name: &str, now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![uri(&format!("spiffe://{trust_domain}"))];
    params.not_before = (now - 24 * HOUR).into();
    params.not_after = (now + 24 * HOUR).into();
    params
}

impl Ca {
    fn root(trust_domain: &str, common_name: &str) -> Self {
        let key = p256();
        let params = ca_params(trust_domain, common_name, base());
        let cert = params.self_signed(&key).unwrap().der().clone();
        Self {
            trust_domain: td(trust_domain),
            params,
            key,
            cert,
            intermediates: Vec::new(),
        }
    }

    fn intermediate(&self, common_name: &str) -> Self {
        let key = p256();
        let mut params = ca_params(self.trust_domain.as_str(), common_name, base());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer()).unwrap().der().clone();
        let mut intermediates = vec![cert.clone()];
        intermediates.extend(self.intermediates.iter().cloned());
        Self {
            trust_domain: self.trust_domain.clone(),
            params,
            key,
            cert,
            intermediates,
        }
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// The bundle of this CA's trust domain holding this (root) CA.
    fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.trust_domain.clone(), vec![self.cert.clone()]).unwrap()
    }

    fn bundles(&self) -> BundleSet {
        BundleSet::from(self.bundle())
    }

    /// Signs a leaf with these parameters and a fresh P-256 key.
    fn issue(&self, params: &CertificateParams) -> Leaf {
        let key = p256();
        let cert = params.signed_by(&key, &self.issuer()).unwrap();
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Leaf { chain, key }
    }
}

/// A leaf certificate with its chain (leaf first) and key.
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
}

impl Leaf {
    fn pkcs8(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }

    fn svid(&self) -> Result<X509Svid, SvidError> {
        X509Svid::from_der(self.chain.clone(), self.pkcs8())
    }
}

/// Parameters of a valid X.509-SVID for `spiffe_id`, valid from five minutes ago for an hour.
fn leaf_params(spiffe_id: &str) -> CertificateParams {
    let now = base();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri(spiffe_id)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - 5 * MINUTE).into();
    params.not_after = (now + HOUR).into();
    params
}

/// A leaf that parses: the errors these tests expect come from the twist, not the fixture.
fn leaf_err(ca: &Ca, params: &CertificateParams) -> SvidError {
    ca.issue(params).svid().unwrap_err()
}

/// `err` is a PEM error about `what`.
fn assert_pem_error(err: &SvidError, what: &str) {
    assert!(matches!(err, SvidError::Pem { what: w, .. } if *w == what), "{err:?}");
}

fn assert_names(err: &SvidError, parts: &[&str]) {
    let message = err.to_string();
    for part in parts {
        assert!(message.contains(part), "{message:?} does not mention {part:?}");
    }
}

// DER helpers, to turn rcgen's PKCS#8 key into the SEC1 form `openssl ec` writes.

fn der_read(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let (len, header) = match input[1] {
        n if n < 0x80 => (usize::from(n), 2),
        0x81 => (usize::from(input[2]), 3),
        0x82 => ((usize::from(input[2]) << 8) | usize::from(input[3]), 4),
        n => panic!("unsupported DER length byte {n:#x}"),
    };
    (input[0], &input[header..header + len], &input[header + len..])
}

fn der_write(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u16::try_from(content.len()).unwrap() {
        n @ 0..0x80 => out.push(u8::try_from(n).unwrap()),
        n @ 0x80..0x100 => out.extend([0x81, u8::try_from(n).unwrap()]),
        n => out.extend([0x82, u8::try_from(n >> 8).unwrap(), u8::try_from(n & 0xff).unwrap()]),
    }
    out.extend_from_slice(content);
    out
}

/// The RFC 5915 `ECPrivateKey` of a P-256 PKCS#8 key, with the named-curve parameters included.
fn pkcs8_to_sec1(pkcs8: &[u8]) -> Vec<u8> {
    let (0x30, body, []) = der_read(pkcs8) else {
        panic!("PKCS#8 is not one SEQUENCE")
    };
    let (0x02, _version, rest) = der_read(body) else {
        panic!("no PKCS#8 version")
    };
    let (0x30, _algorithm, rest) = der_read(rest) else {
        panic!("no PKCS#8 algorithm")
    };
    let (0x04, ec_private_key, _) = der_read(rest) else {
        panic!("no PKCS#8 private key")
    };
    let (0x30, ec, []) = der_read(ec_private_key) else {
        panic!("ECPrivateKey is not one SEQUENCE")
    };
    let (0x02, [1], rest) = der_read(ec) else {
        panic!("ECPrivateKey version is not 1")
    };
    let (0x04, scalar, mut rest) = der_read(rest) else {
        panic!("no private scalar")
    };
    if rest.first() == Some(&0xa0) {
        rest = der_read(rest).2;
    }
    let (0xa1, public_key, []) = der_read(rest) else {
        panic!("no public key")
    };
    let prime256v1 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let content = [
        der_write(0x02, &[1]),
        der_write(0x04, scalar),
        der_write(0xa0, &prime256v1),
        der_write(0xa1, public_key),
    ]
    .concat();
    der_write(0x30, &content)
}

// ---------------------------------------------------------------------------------------------
// Valid SVIDs
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_leaf_under_the_root_parses_and_verifies() {
    let ca = Ca::root(TD, "root");
    let params = leaf_params(ID);
    let leaf = ca.issue(&params);
    let svid = leaf.svid().unwrap();

    assert_eq!(svid.spiffe_id(), &id(ID));
    assert_eq!(svid.chain().len(), 1);
    assert_eq!(svid.leaf(), &leaf.chain[0]);
    assert_eq!(svid.not_before(), SystemTime::from(params.not_before));
    assert_eq!(svid.not_after(), SystemTime::from(params.not_after));
    assert_eq!(svid.lifetime(), HOUR + 5 * MINUTE);
    svid.verify(&ca.bundles(), base()).unwrap();
    // Both ends of the validity window are inclusive.
    svid.verify(&ca.bundles(), svid.not_before()).unwrap();
    svid.verify(&ca.bundles(), svid.not_after()).unwrap();
    assert!(matches!(
        svid.verify(&ca.bundles(), svid.not_after() + SECOND),
        Err(SvidError::Expired { .. })
    ));
    assert!(matches!(
        svid.verify(&ca.bundles(), svid.not_before() - SECOND),
        Err(SvidError::NotYetValid { .. })
    ));

    // Federation: other trust domains in the set change nothing.
    let other = Ca::root("other.org", "other root");
    let set: BundleSet = [other.bundle(), ca.bundle()].into_iter().collect();
    svid.verify(&set, base()).unwrap();
}

#[test]
fn valid_leaf_under_an_intermediate_verifies_against_the_root() {
    let root = Ca::root(TD, "root");
    let intermediate = root.intermediate("intermediate");
    let leaf = intermediate.issue(&leaf_params(ID));
    let svid = leaf.svid().unwrap();
    assert_eq!(svid.chain().len(), 2);
    assert_eq!(svid.chain()[1], intermediate.cert);
    svid.verify(&root.bundles(), base()).unwrap();

    // Two levels of intermediates.
    let deeper = intermediate.intermediate("second intermediate");
    let svid = deeper.issue(&leaf_params(ID)).svid().unwrap();
    assert_eq!(svid.chain().len(), 3);
    svid.verify(&root.bundles(), base()).unwrap();

    // Without the intermediate the leaf does not lead to the root.
    let alone = X509Svid::from_der(vec![leaf.chain[0].clone()], leaf.pkcs8()).unwrap();
    let err = alone.verify(&root.bundles(), base()).unwrap_err();
    assert!(
        matches!(&err, SvidError::UntrustedChain { id: i, .. } if i == &id(ID)),
        "{err:?}"
    );
}

#[test]
fn dns_sans_next_to_the_spiffe_id_are_allowed() {
    let ca = Ca::root(TD, "root");
    let mut params = leaf_params(ID);
    params.subject_alt_names = vec![dns("web.default.svc"), uri(ID), dns("web")];
    let svid = ca.issue(&params).svid().unwrap();
    assert_eq!(svid.spiffe_id(), &id(ID));
    svid.verify(&ca.bundles(), base()).unwrap();
}

#[test]
fn pem_round_trip_keeps_chain_and_key() {
    let root = Ca::root(TD, "root");
    let intermediate = root.intermediate("intermediate");
    let svid = intermediate.issue(&leaf_params(ID)).svid().unwrap();

    let chain_pem = svid.chain_pem();
    let key_pem = svid.private_key_pem();
    assert_eq!(chain_pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key_pem}");

    let again = X509Svid::from_pem(chain_pem.as_bytes(), key_pem.as_bytes()).unwrap();
    assert!(again.same_chain(&svid));
    assert_eq!(again.chain(), svid.chain());
    assert_eq!(again.private_key().secret_der(), svid.private_key().secret_der());
    assert_eq!(again.spiffe_id(), svid.spiffe_id());
    assert_eq!(
        (again.not_before(), again.not_after()),
        (svid.not_before(), svid.not_after())
    );
    again.verify(&root.bundles(), base()).unwrap();
    // And once more: the printed forms are stable.
    assert_eq!(again.chain_pem(), chain_pem);
    assert_eq!(again.private_key_pem(), key_pem);

    // A different leaf is a different chain.
    let other = intermediate.issue(&leaf_params(ID)).svid().unwrap();
    assert!(!other.same_chain(&svid));
}

#[test]
fn sec1_and_pkcs8_keys_both_load() {
    let ca = Ca::root(TD, "root");
    let leaf = ca.issue(&leaf_params(ID));

    let pkcs8 = leaf.svid().unwrap();
    assert!(matches!(pkcs8.private_key(), PrivateKeyDer::Pkcs8(_)));
    pkcs8.verify(&ca.bundles(), base()).unwrap();

    let sec1_der = pkcs8_to_sec1(&leaf.key.serialize_der());
    let sec1 = X509Svid::from_der(leaf.chain.clone(), PrivateSec1KeyDer::from(sec1_der.clone()).into()).unwrap();
    assert!(matches!(sec1.private_key(), PrivateKeyDer::Sec1(_)));
    assert_eq!(sec1.private_key().secret_der(), sec1_der.as_slice());
    sec1.verify(&ca.bundles(), base()).unwrap();

    // The PEM form of a SEC1 key is an EC PRIVATE KEY block, and reads back as SEC1.
    let key_pem = sec1.private_key_pem();
    assert!(key_pem.starts_with("-----BEGIN EC PRIVATE KEY-----\n"), "{key_pem}");
    let again = X509Svid::from_pem(sec1.chain_pem().as_bytes(), key_pem.as_bytes()).unwrap();
    assert!(matches!(again.private_key(), PrivateKeyDer::Sec1(_)));
    assert!(again.same_chain(&pkcs8));

    // A SEC1 key of another certificate is still caught.
    let other = ca.issue(&leaf_params(ID));
    let err = X509Svid::from_der(
        leaf.chain.clone(),
        PrivateSec1KeyDer::from(pkcs8_to_sec1(&other.key.serialize_der())).into(),
    )
    .unwrap_err();
    assert!(matches!(err, SvidError::KeyMismatch { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

#[test]
fn expired_leaf_is_refused_by_verify() {
    let ca = Ca::root(TD, "root");
    let mut params = leaf_params(ID);
    let now = base();
    params.not_before = (now - 2 * HOUR).into();
    params.not_after = (now - HOUR).into();
    // Parsing does not depend on time.
    let svid = ca.issue(&params).svid().unwrap();

    let err = svid.verify(&ca.bundles(), now).unwrap_err();
    assert!(
        matches!(&err, SvidError::Expired { id: i, not_after } if i == &id(ID) && *not_after == now - HOUR),
        "{err:?}"
    );
    assert_names(&err, &[ID, "expired"]);
    assert_eq!(svid.check_validity(now), Err(err));
    // At a time inside its window the same certificate verifies: only time is wrong.
    svid.verify(&ca.bundles(), now - 90 * MINUTE).unwrap();
}

#[test]
fn not_yet_valid_leaf_is_refused_by_verify() {
    let ca = Ca::root(TD, "root");
    let mut params = leaf_params(ID);
    let now = base();
    params.not_before = (now + HOUR).into();
    params.not_after = (now + 2 * HOUR).into();
    let svid = ca.issue(&params).svid().unwrap();

    let err = svid.verify(&ca.bundles(), now).unwrap_err();
    assert!(
        matches!(&err, SvidError::NotYetValid { id: i, not_before } if i == &id(ID) && *not_before == now + HOUR),
        "{err:?}"
    );
    assert_names(&err, &[ID, "not valid before"]);
    svid.verify(&ca.bundles(), now + 90 * MINUTE).unwrap();
}

// ---------------------------------------------------------------------------------------------
// SAN rules
// ---------------------------------------------------------------------------------------------

#[test]
fn two_uri_sans_are_refused() {
    let ca = Ca::root(TD, "root");
    let second = "spiffe://cluster.local/ns/default/sa/db";
    let mut params = leaf_params(ID);
    params.subject_alt_names = vec![uri(ID), uri(second)];
    let err = leaf_err(&ca, &params);
    assert!(
        matches!(&err, SvidError::MultipleUriSans { uris } if uris == &[ID.to_owned(), second.to_owned()]),
        "{err:?}"
    );
    assert_names(&err, &["2 URI SANs", ID, second]);

    // A second URI that is not a SPIFFE ID still makes two.
    params.subject_alt_names = vec![uri(ID), uri("https://web.example.org/")];
    let err = leaf_err(&ca, &params);
    assert!(
        matches!(&err, SvidError::MultipleUriSans { uris } if uris.len() == 2),
        "{err:?}"
    );
}

#[test]
fn leaf_without_uri_san_is_refused() {
    let ca = Ca::root(TD, "root");
    let mut params = leaf_params(ID);
    params.subject_alt_names = Vec::new();
    params.distinguished_name.push(DnType::CommonName, ID); // an ID in the subject does not count
    let err = leaf_err(&ca, &params);
    assert_eq!(err, SvidError::NoUriSan);
    assert_names(&err, &["no URI SAN"]);

    params.subject_alt_names = vec![dns("web.default.svc.cluster.local")];
    assert_eq!(leaf_err(&ca, &params), SvidError::NoUriSan);
}

#[test]
fn uri_san_that_is_not_a_spiffe_id_is_refused() {
    let ca = Ca::root(TD, "root");
    let mut params = leaf_params(ID);
    let https = "https://cluster.local/ns/default/sa/web";
    params.subject_alt_names = vec![uri(https)];
    let err = leaf_err(&ca, &params);
    assert!(
        matches!(&err, SvidError::NotSpiffe { uri, source: SpiffeIdError::WrongScheme } if uri == https),
        "{err:?}"
    );
    assert_names(&err, &[https, "not a SPIFFE ID"]);

    // The right scheme with an invalid path is not a SPIFFE ID either.
    let bad = "spiffe://cluster.local/ns//sa/web";
    params.subject_alt_names = vec![uri(bad)];
    let err = leaf_err(&ca, &params);
    assert!(
        matches!(&err, SvidError::NotSpiffe { uri, source: SpiffeIdError::EmptySegment } if uri == bad),
        "{err:?}"
    );
}

#[test]
fn spiffe_id_without_path_is_refused() {
    let ca = Ca::root(TD, "root");
    let mut params = leaf_params(ID);
    params.subject_alt_names = vec![uri("spiffe://cluster.local")];
    let err = leaf_err(&ca, &params);
    assert!(
        matches!(&err, SvidError::NoPath { id: i } if i == &id("spiffe://cluster.local")),
        "{err:?}"
    );
    assert_names(&err, &["spiffe://cluster.local", "no path"]);
}

// ---------------------------------------------------------------------------------------------
// Basic constraints and key usage
// ---------------------------------------------------------------------------------------------

#[test]
fn ca_leaf_is_refused() {
    let ca = Ca::root(TD, "root");
    for constraints in [BasicConstraints::Unconstrained, BasicConstraints::Constrained(0)] {
        let mut params = leaf_params(ID);
        params.is_ca = IsCa::Ca(constraints);
        let err = leaf_err(&ca, &params);
        assert!(matches!(&err, SvidError::CaLeaf { id: i } if i == &id(ID)), "{err:?}");
        assert_names(&err, &[ID, "CA:true"]);
    }
}

#[test]
fn key_usage_without_digital_signature_is_refused() {
    let ca = Ca::root(TD, "root");
    for usages in [
        vec![KeyUsagePurpose::KeyEncipherment],
        vec![KeyUsagePurpose::KeyAgreement],
        vec![KeyUsagePurpose::ContentCommitment, KeyUsagePurpose::DataEncipherment],
    ] {
        let mut params = leaf_params(ID);
        params.key_usages = usages;
        let err = leaf_err(&ca, &params);
        assert!(
            matches!(&err, SvidError::NoDigitalSignature { id: i } if i == &id(ID)),
            "{err:?}"
        );
        assert_names(&err, &[ID, "digitalSignature"]);
    }
}

#[test]
fn leaf_that_can_sign_certificates_is_refused() {
    let ca = Ca::root(TD, "root");
    // CA:false stated explicitly, and no basicConstraints at all.
    for is_ca in [IsCa::ExplicitNoCa, IsCa::NoCa] {
        let mut params = leaf_params(ID);
        params.is_ca = is_ca;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
        let err = leaf_err(&ca, &params);
        assert!(
            matches!(&err, SvidError::LeafCanSignCertificates { id: i } if i == &id(ID)),
            "{err:?}"
        );
        assert_names(&err, &[ID, "keyCertSign"]);
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

#[test]
fn key_of_another_certificate_is_refused() {
    let ca = Ca::root(TD, "root");
    let leaf = ca.issue(&leaf_params(ID));
    let other = ca.issue(&leaf_params(ID));
    let err = X509Svid::from_der(leaf.chain.clone(), other.pkcs8()).unwrap_err();
    assert!(
        matches!(&err, SvidError::KeyMismatch { id: i } if i == &id(ID)),
        "{err:?}"
    );
    assert_names(&err, &[ID, "does not match"]);

    // A key of another algorithm does not match either.
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let err = X509Svid::from_der(
        leaf.chain.clone(),
        PrivatePkcs8KeyDer::from(ed25519.serialize_der()).into(),
    )
    .unwrap_err();
    assert!(matches!(err, SvidError::KeyMismatch { .. }), "{err:?}");

    // The CA's own key does not make the leaf usable.
    let err = X509Svid::from_der(
        leaf.chain.clone(),
        PrivatePkcs8KeyDer::from(ca.key.serialize_der()).into(),
    )
    .unwrap_err();
    assert!(matches!(err, SvidError::KeyMismatch { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Trust
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_trust_domain_is_refused() {
    let local = Ca::root(TD, "root");
    let other = Ca::root("other.org", "other root");
    let svid = other.issue(&leaf_params("spiffe://other.org/x")).svid().unwrap();
    // Control: against its own bundle it verifies.
    svid.verify(&other.bundles(), base()).unwrap();

    let err = svid.verify(&local.bundles(), base()).unwrap_err();
    assert!(
        matches!(&err, SvidError::UnknownTrustDomain { id: i, trust_domain }
            if i == &id("spiffe://other.org/x") && trust_domain == &td("other.org")),
        "{err:?}"
    );
    assert_names(&err, &["spiffe://other.org/x", "other.org"]);
    assert!(matches!(
        svid.verify(&BundleSet::new(), base()),
        Err(SvidError::UnknownTrustDomain { .. })
    ));
}

#[test]
fn chain_to_another_root_of_the_same_trust_domain_is_refused() {
    let a = Ca::root(TD, "root A");
    let b = Ca::root(TD, "root B");
    // Same subject name as A: the names match, only the signature tells them apart.
    let twin = Ca::root(TD, "root A");
    let svid = a.issue(&leaf_params(ID)).svid().unwrap();
    svid.verify(&a.bundles(), base()).unwrap();

    for other in [&b, &twin] {
        let err = svid.verify(&other.bundles(), base()).unwrap_err();
        assert!(
            matches!(&err, SvidError::UntrustedChain { id: i, reason } if i == &id(ID) && !reason.is_empty()),
            "{err:?}"
        );
        assert_names(&err, &[ID, TD]);
    }

    // A bundle holding both roots trusts it.
    let both = TrustBundle::new(td(TD), vec![b.cert.clone(), a.cert.clone()]).unwrap();
    svid.verify(&BundleSet::from(both), base()).unwrap();

    // Under an intermediate of A, verified against B.
    let svid = a.intermediate("intermediate A").issue(&leaf_params(ID)).svid().unwrap();
    assert!(matches!(
        svid.verify(&b.bundles(), base()),
        Err(SvidError::UntrustedChain { .. })
    ));
}

#[test]
fn root_of_another_trust_domain_does_not_vouch_for_this_one() {
    // A root of other.org signs an SVID claiming cluster.local. Even with other.org's bundle in the
    // set, the SVID is checked against the bundle of cluster.local only.
    let local = Ca::root(TD, "root");
    let other = Ca::root("other.org", "other root");
    let svid = other.issue(&leaf_params(ID)).svid().unwrap();
    let set: BundleSet = [local.bundle(), other.bundle()].into_iter().collect();
    let err = svid.verify(&set, base()).unwrap_err();
    assert!(
        matches!(&err, SvidError::UntrustedChain { id: i, .. } if i == &id(ID)),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_chain_is_refused() {
    let ca = Ca::root(TD, "root");
    let leaf = ca.issue(&leaf_params(ID));
    let err = X509Svid::from_der(Vec::new(), leaf.pkcs8()).unwrap_err();
    assert_eq!(err, SvidError::EmptyChain);
    assert_names(&err, &["empty"]);
    let key_pem = leaf.svid().unwrap().private_key_pem();
    assert_eq!(
        X509Svid::from_pem(b"", key_pem.as_bytes()).unwrap_err(),
        SvidError::EmptyChain
    );
}

#[test]
fn garbage_der_is_refused_with_its_position() {
    let ca = Ca::root(TD, "root");
    let leaf = ca.issue(&leaf_params(ID));

    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    let err = X509Svid::from_der(vec![garbage.clone()], leaf.pkcs8()).unwrap_err();
    assert!(
        matches!(&err, SvidError::Certificate { index: 0, reason } if !reason.is_empty()),
        "{err:?}"
    );
    assert_names(&err, &["certificate 0"]);

    let err = X509Svid::from_der(vec![CertificateDer::from(b"not DER".to_vec())], leaf.pkcs8()).unwrap_err();
    assert!(matches!(err, SvidError::Certificate { index: 0, .. }), "{err:?}");

    // A valid leaf followed by garbage.
    let err = X509Svid::from_der(vec![leaf.chain[0].clone(), garbage], leaf.pkcs8()).unwrap_err();
    assert!(matches!(err, SvidError::Certificate { index: 1, .. }), "{err:?}");

    // Bytes after the certificate.
    let mut trailing = leaf.chain[0].to_vec();
    trailing.extend_from_slice(&[0, 0]);
    let err = X509Svid::from_der(vec![CertificateDer::from(trailing)], leaf.pkcs8()).unwrap_err();
    assert!(
        matches!(&err, SvidError::Certificate { index: 0, reason } if reason.contains("trailing")),
        "{err:?}"
    );

    // A truncated certificate.
    let truncated = leaf.chain[0][..leaf.chain[0].len() - 10].to_vec();
    let err = X509Svid::from_der(vec![CertificateDer::from(truncated)], leaf.pkcs8()).unwrap_err();
    assert!(matches!(err, SvidError::Certificate { index: 0, .. }), "{err:?}");
}

#[test]
fn garbage_pem_and_keys_are_refused() {
    let ca = Ca::root(TD, "root");
    let svid = ca.issue(&leaf_params(ID)).svid().unwrap();
    let chain_pem = svid.chain_pem();
    let key_pem = svid.private_key_pem();

    let bad_chain = "-----BEGIN CERTIFICATE-----\n%%% not base64 %%%\n-----END CERTIFICATE-----\n";
    let err = X509Svid::from_pem(bad_chain.as_bytes(), key_pem.as_bytes()).unwrap_err();
    assert_pem_error(&err, "certificate chain");
    assert_names(&err, &["certificate chain"]);

    // No key at all.
    let err = X509Svid::from_pem(chain_pem.as_bytes(), b"garbage").unwrap_err();
    assert_pem_error(&err, "private key");
    assert_names(&err, &["private key"]);
    // A certificate where the key should be.
    let err = X509Svid::from_pem(chain_pem.as_bytes(), chain_pem.as_bytes()).unwrap_err();
    assert_pem_error(&err, "private key");
    let bad_key = "-----BEGIN PRIVATE KEY-----\n%%%\n-----END PRIVATE KEY-----\n";
    let err = X509Svid::from_pem(chain_pem.as_bytes(), bad_key.as_bytes()).unwrap_err();
    assert_pem_error(&err, "private key");

    // Well-formed PEM holding bytes that are no key.
    let junk_key = "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n";
    let err = X509Svid::from_pem(chain_pem.as_bytes(), junk_key.as_bytes()).unwrap_err();
    assert!(
        matches!(&err, SvidError::PrivateKey { reason } if !reason.is_empty()),
        "{err:?}"
    );
    let err = X509Svid::from_der(svid.chain().to_vec(), PrivateSec1KeyDer::from(vec![0x30, 0x00]).into()).unwrap_err();
    assert!(matches!(err, SvidError::PrivateKey { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Local CA
// ---------------------------------------------------------------------------------------------

#[test]
fn local_ca_issues_verifiable_svids_for_a_day() {
    let ca = LocalCa::ephemeral(td(TD)).unwrap();
    assert_eq!(ca.lifetime(), DEFAULT_SVID_LIFETIME);
    assert_eq!(DEFAULT_SVID_LIFETIME, 24 * HOUR);

    let before = base();
    let creds = ca.issue(&id(ID)).unwrap();
    let after = SystemTime::now();
    let svid = &creds.svid;
    assert_eq!(svid.spiffe_id(), &id(ID));
    assert_eq!(svid.chain().len(), 1);
    assert_eq!(creds.bundles.get(&td(TD)).unwrap().roots(), ca.bundle().roots());
    svid.verify(&creds.bundles, SystemTime::now()).unwrap();
    svid.verify(ca.bundle_set(), SystemTime::now()).unwrap();
    // Valid for 24 hours from issuance (certificate times are whole seconds).
    assert!(
        svid.not_after() >= before + 24 * HOUR && svid.not_after() <= after + 24 * HOUR,
        "{svid:?}"
    );
    // ... and back-dated five minutes for clock skew.
    assert_eq!(svid.lifetime(), 24 * HOUR + 5 * MINUTE);
    assert!(matches!(
        svid.verify(&creds.bundles, after + 24 * HOUR + SECOND),
        Err(SvidError::Expired { .. })
    ));

    // An independent root of the same trust domain does not trust it.
    let stranger = LocalCa::ephemeral(td(TD)).unwrap();
    assert!(matches!(
        svid.verify(stranger.bundle_set(), SystemTime::now()),
        Err(SvidError::UntrustedChain { .. })
    ));
    // Identities of other trust domains are not issued.
    let err = ca.issue(&id("spiffe://other.org/x")).unwrap_err();
    assert!(matches!(err, LocalCaError::ForeignIdentity { .. }), "{err:?}");
}

#[test]
fn local_ca_issue_at_sets_the_requested_lifetime() {
    let ca = LocalCa::ephemeral(td(TD)).unwrap();
    let at = base();

    let creds = ca.issue_at(&id(ID), at, 2 * HOUR).unwrap();
    assert_eq!(creds.svid.not_after(), at + 2 * HOUR);
    assert_eq!(creds.svid.not_before(), at - 5 * MINUTE);
    creds.svid.verify(&creds.bundles, at).unwrap();
    creds.svid.verify(&creds.bundles, at + 2 * HOUR).unwrap();
    assert!(matches!(
        creds.svid.verify(&creds.bundles, at + 2 * HOUR + SECOND),
        Err(SvidError::Expired { .. })
    ));

    // Back-dating never exceeds a tenth of the lifetime, so that half-life stays well after issuance.
    let short = ca.issue_at(&id(ID), at, 90 * SECOND).unwrap();
    assert_eq!(short.svid.not_after(), at + 90 * SECOND);
    assert_eq!(short.svid.not_before(), at - 9 * SECOND);
    let minute = ca.issue_at(&id(ID), at, 60 * SECOND).unwrap();
    assert_eq!(minute.svid.not_before(), at - 6 * SECOND);
    assert!(minute.svid.not_before() + minute.svid.lifetime() / 2 > at + 20 * SECOND);

    // `with_lifetime` changes what `issue` uses.
    let ca = ca.with_lifetime(HOUR);
    assert_eq!(ca.lifetime(), HOUR);
    let creds = ca.issue(&id(ID)).unwrap();
    assert_eq!(creds.svid.lifetime(), HOUR + 5 * MINUTE);
}

#[test]
fn local_ca_persists_its_root() {
    let dir = tempfile::tempdir().unwrap();
    let first = LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
    let ca_pem = std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap();
    assert!(ca_pem.contains("-----BEGIN CERTIFICATE-----") && ca_pem.contains("-----BEGIN PRIVATE KEY-----"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let root_pem = std::fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap();
    let published = TrustBundle::from_pem(td(TD), &root_pem).unwrap();
    assert_eq!(published.roots(), first.bundle().roots());

    let second = LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
    assert_eq!(second.bundle().roots(), first.bundle().roots());
    assert_eq!(
        std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap(),
        ca_pem,
        "loading rewrote the CA"
    );
    // SVIDs of one verify with the other, both ways: it is the same key.
    let a = first.issue(&id(ID)).unwrap();
    let b = second.issue(&id("spiffe://cluster.local/ns/default/sa/db")).unwrap();
    a.svid.verify(second.bundle_set(), SystemTime::now()).unwrap();
    b.svid.verify(first.bundle_set(), SystemTime::now()).unwrap();
    b.svid.verify(&BundleSet::from(published), SystemTime::now()).unwrap();

    // Another directory holds another root.
    let elsewhere = tempfile::tempdir().unwrap();
    let third = LocalCa::load_or_create(&elsewhere.path().join("nested/dir"), td(TD)).unwrap();
    assert_ne!(third.bundle().roots(), first.bundle().roots());
    assert!(matches!(
        a.svid.verify(third.bundle_set(), SystemTime::now()),
        Err(SvidError::UntrustedChain { .. })
    ));
}

#[test]
fn local_ca_refuses_a_root_without_its_key_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let first = LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
    let root = dir.path().join(ROOT_CERT_FILE);
    let root_pem = std::fs::read(&root).unwrap();
    std::fs::remove_file(dir.path().join(CA_FILE)).unwrap();

    let err = LocalCa::load_or_create(dir.path(), td(TD)).unwrap_err();
    match &err {
        LocalCaError::RootWithoutKey { ca, root: found } => {
            assert_eq!(ca, &dir.path().join(CA_FILE));
            assert_eq!(found, &root);
        }
        other => panic!("expected RootWithoutKey, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(CA_FILE) && message.contains(ROOT_CERT_FILE),
        "{message}"
    );
    // Nothing was created or overwritten: the published root is still the first one.
    assert!(!dir.path().join(CA_FILE).exists(), "a new CA file was created");
    assert_eq!(
        std::fs::read(&root).unwrap(),
        root_pem,
        "the published root was overwritten"
    );
    let published = TrustBundle::from_pem(td(TD), &root_pem).unwrap();
    assert_eq!(published.roots(), first.bundle().roots());

    // Without the public root either, a new CA is created as on a first start.
    std::fs::remove_file(&root).unwrap();
    let fresh = LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
    assert_ne!(fresh.bundle().roots(), first.bundle().roots());
}

#[test]
fn local_ca_refuses_a_root_of_another_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
    let err = LocalCa::load_or_create(dir.path(), td("other.org")).unwrap_err();
    match &err {
        LocalCaError::WrongTrustDomain { path, found, expected } => {
            assert_eq!(path, &dir.path().join(CA_FILE));
            assert_eq!(found, "spiffe://cluster.local");
            assert_eq!(expected, &td("other.org"));
        }
        other => panic!("expected WrongTrustDomain, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("cluster.local") && message.contains("other.org"),
        "{message}"
    );
    // The right trust domain still loads.
    LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
}

/// ztunnel's fixed test root (its `FAKE_CA=true`), an RSA root without a URI SAN, loads as the local
/// CA's root when written into `ca.pem`: the SVIDs issued then verify against that root alone, as a
/// ztunnel with `FAKE_CA=true` verifies them.
#[test]
fn local_ca_loads_ztunnels_test_root() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ztunnel-test-ca");
    let root_pem = std::fs::read_to_string(fixtures.join("root-cert.pem")).unwrap();
    let key_pem = std::fs::read_to_string(fixtures.join("ca-key.pem")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CA_FILE), format!("{root_pem}{key_pem}")).unwrap();

    let ca = LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
    let ztunnel_root = TrustBundle::from_pem(td(TD), root_pem.as_bytes()).unwrap();
    assert_eq!(ca.bundle().roots(), ztunnel_root.roots());
    let creds = ca.issue(&SpiffeId::new(ID).unwrap()).unwrap();
    creds
        .svid
        .verify(&BundleSet::from(ztunnel_root), SystemTime::now())
        .expect("meshwire's SVID verifies against ztunnel's test root");
    // Another root does not verify it.
    let other = LocalCa::ephemeral(td(TD)).unwrap();
    assert!(creds.svid.verify(other.bundle_set(), SystemTime::now()).is_err());
    // The published root is ztunnel's.
    let published = std::fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap();
    assert_eq!(
        TrustBundle::from_pem(td(TD), &published).unwrap().roots(),
        ca.bundle().roots()
    );
}

#[test]
fn local_ca_refuses_a_corrupt_ca_file() {
    let foreign_key = p256().serialize_pem();
    let valid = {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path(), td(TD)).unwrap();
        std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap()
    };
    let cert_only = valid[..valid.find("-----BEGIN PRIVATE KEY-----").unwrap()].to_owned();
    let key_only = valid[valid.find("-----BEGIN PRIVATE KEY-----").unwrap()..].to_owned();
    // A leaf, not a CA, with its own key.
    let leaf = Ca::root(TD, "root").issue(&leaf_params(ID));
    let leaf_pem = format!(
        "{}{}",
        X509Svid::from_der(leaf.chain.clone(), leaf.pkcs8())
            .unwrap()
            .chain_pem(),
        leaf.key.serialize_pem()
    );

    let cases = [
        ("not PEM", "this is not a CA\n".to_owned()),
        (
            "bad base64",
            "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n".to_owned(),
        ),
        ("certificate only", cert_only.clone()),
        ("key only", key_only),
        ("foreign key", format!("{cert_only}{foreign_key}")),
        ("leaf certificate", leaf_pem),
        ("truncated", valid[..valid.len() / 2].to_owned()),
    ];
    for (what, content) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CA_FILE);
        std::fs::write(&path, &content).unwrap();
        let err = LocalCa::load_or_create(dir.path(), td(TD)).unwrap_err();
        assert!(
            matches!(&err, LocalCaError::Corrupt { path: p, .. } if p == &path),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(CA_FILE), "{what}: {err}");
        // The file is left for an operator to inspect, not replaced.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), content, "{what}");
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: the same parsers as the `svid` fuzz target (fuzz/fuzz_targets/svid.rs)
// ---------------------------------------------------------------------------------------------

/// One real SVID of the local CA and its bundle, shared by the property tests.
fn issued() -> &'static (X509Svid, TrustBundle) {
    static ISSUED: std::sync::OnceLock<(X509Svid, TrustBundle)> = std::sync::OnceLock::new();
    ISSUED.get_or_init(|| {
        let ca = LocalCa::ephemeral(td(TD)).unwrap();
        let creds = ca.issue(&id(ID)).unwrap();
        (creds.svid, ca.bundle().clone())
    })
}

/// Checks what an accepted SVID promises: its PEM reads back to the same chain, key and identity.
fn check_accepted(svid: &X509Svid) {
    let again = X509Svid::from_pem(svid.chain_pem().as_bytes(), svid.private_key_pem().as_bytes()).unwrap();
    assert!(again.same_chain(svid));
    assert_eq!(again.spiffe_id(), svid.spiffe_id());
    assert_eq!(again.private_key().secret_der(), svid.private_key().secret_der());
    assert_eq!(
        (again.not_before(), again.not_after()),
        (svid.not_before(), svid.not_after())
    );
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// Flipped bytes in the leaf or the key: refused with an error or accepted consistently,
        /// never a panic; the original stays valid.
        #[test]
        fn mutated_svid_der_never_panics(
            in_key in any::<bool>(),
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let (svid, bundle) = issued();
            let mut leaf = svid.leaf().to_vec();
            let mut key = svid.private_key().secret_der().to_vec();
            let target = if in_key { &mut key } else { &mut leaf };
            for (at, byte) in &mutations {
                *at.get_mut(target) = *byte;
            }
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
            match X509Svid::from_der(vec![CertificateDer::from(leaf)], key) {
                Ok(mutated) => {
                    check_accepted(&mutated);
                    let _ = mutated.verify(&BundleSet::from(bundle.clone()), SystemTime::now());
                }
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
            svid.verify(&BundleSet::from(bundle.clone()), SystemTime::now()).unwrap();
        }

        /// Every prefix of a valid DER chain but the whole is refused, never a panic.
        #[test]
        fn truncated_der_is_refused(cut in any::<prop::sample::Index>()) {
            let (svid, _) = issued();
            let leaf = svid.leaf().to_vec();
            let len = cut.index(leaf.len());
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.private_key().secret_der().to_vec()));
            let result = X509Svid::from_der(vec![CertificateDer::from(leaf[..len].to_vec())], key);
            prop_assert!(result.is_err(), "a {len}-byte prefix of a {}-byte certificate was accepted", leaf.len());
        }

        /// Arbitrary PEM documents: an error naming what was wrong, or a consistent SVID.
        #[test]
        fn arbitrary_pem_never_panics(
            chain in prop::collection::vec(any::<u8>(), 0..400),
            key in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            match X509Svid::from_pem(&chain, &key) {
                Ok(svid) => check_accepted(&svid),
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }

        /// Mutated PEM of a real chain and key.
        #[test]
        fn mutated_svid_pem_never_panics(
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let (svid, _) = issued();
            let mut chain = svid.chain_pem().into_bytes();
            for (at, byte) in &mutations {
                *at.get_mut(&mut chain) = *byte;
            }
            match X509Svid::from_pem(&chain, svid.private_key_pem().as_bytes()) {
                Ok(accepted) => check_accepted(&accepted),
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }

        /// Mutated bundles: refused, or an anchor per root; the real SVID verifies against any
        /// accepted bundle that still holds its root.
        #[test]
        fn mutated_bundle_never_panics(
            pem_form in any::<bool>(),
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let (svid, bundle) = issued();
            let root = bundle.roots()[0].to_vec();
            let result = if pem_form {
                let mut pem = pem::encode(&pem::Pem::new("CERTIFICATE", root.clone())).into_bytes();
                for (at, byte) in &mutations {
                    *at.get_mut(&mut pem) = *byte;
                }
                TrustBundle::from_pem(td(TD), &pem)
            } else {
                let mut der = root.clone();
                for (at, byte) in &mutations {
                    *at.get_mut(&mut der) = *byte;
                }
                TrustBundle::new(td(TD), vec![CertificateDer::from(der)])
            };
            match result {
                Ok(accepted) => {
                    prop_assert_eq!(accepted.roots().len(), accepted.anchors().len());
                    let verdict = svid.verify(&BundleSet::from(accepted.clone()), SystemTime::now());
                    if accepted.roots()[0].as_ref() == root.as_slice() {
                        prop_assert!(verdict.is_ok(), "{:?}", verdict);
                    }
                }
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }
    }
}
