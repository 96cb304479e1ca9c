#![no_main]
//! X.509-SVIDs and trust bundles read from arbitrary DER and PEM.
//!
//! The first byte picks the form of the rest (modulo 4):
//! - 0: a PEM certificate chain, a NUL byte, a PEM private key (`X509Svid::from_pem`);
//! - 1: DER blobs, each preceded by its 2-byte big-endian length: the chain, then the key
//!   (`X509Svid::from_der`);
//! - 2: a PEM trust bundle (`TrustBundle::from_pem`);
//! - 3: DER roots, length-prefixed as in 1 (`TrustBundle::new`).
//!
//! Invariants: nothing panics; an accepted SVID prints (`chain_pem`, `private_key_pem`) to PEM that
//! reads back to the same chain, identity and validity; an accepted bundle has an anchor per root and
//! its roots read back from PEM; verifying the fixture SVID against an accepted bundle, or an accepted
//! SVID against the fixture bundle, never panics, and the fixtures stay valid: the fixture SVID
//! verifies against every accepted bundle that holds the fixture root, and every accepted SVID with
//! the fixture chain verifies against the fixture bundle.
//!
//! Fixtures and seeds (`fixtures/`, `corpus/svid/`) are a real SVID and bundle of the built-in local
//! CA, written by `cargo run --example seeds`.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshwire_identity::bundle::{BundleSet, TrustBundle};
use meshwire_identity::id::{TrustDomain, parse_spiffe_id, parse_trust_domain};
use meshwire_identity::svid::X509Svid;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

struct Fixture {
    svid: X509Svid,
    bundle: TrustBundle,
    bundles: BundleSet,
    trust_domain: TrustDomain,
    /// A time inside the fixture SVID's validity.
    at: SystemTime,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let svid = X509Svid::from_pem(
        include_bytes!("../fixtures/svid-chain.pem"),
        include_bytes!("../fixtures/svid-key.pem"),
    )
    .expect("the fixture SVID is valid");
    let trust_domain = svid.spiffe_id().trust_domain().clone();
    let bundle = TrustBundle::from_pem(trust_domain.clone(), include_bytes!("../fixtures/bundle.pem"))
        .expect("the fixture bundle is valid");
    let at = svid.not_before() + svid.lifetime() / 2;
    svid.verify(&BundleSet::from(bundle.clone()), at)
        .expect("the fixture SVID verifies against its bundle");
    Fixture {
        bundles: BundleSet::from(bundle.clone()),
        svid,
        bundle,
        trust_domain,
        at,
    }
});

fuzz_target!(|data: &[u8]| {
    let fixture = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let (chain, key) = match rest.iter().position(|&b| b == 0) {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &[][..]),
            };
            if let Ok(svid) = X509Svid::from_pem(chain, key) {
                check_svid(fixture, &svid);
            }
        }
        1 => {
            let mut blobs = blobs(rest);
            let Some(key) = blobs.pop() else {
                return;
            };
            let Ok(key) = PrivateKeyDer::try_from(key) else {
                return;
            };
            let chain = blobs.into_iter().map(CertificateDer::from).collect();
            if let Ok(svid) = X509Svid::from_der(chain, key) {
                check_svid(fixture, &svid);
            }
        }
        2 => {
            if let Ok(bundle) = TrustBundle::from_pem(fixture.trust_domain.clone(), rest) {
                check_bundle(fixture, &bundle);
            }
        }
        _ => {
            let roots = blobs(rest).into_iter().map(CertificateDer::from).collect();
            if let Ok(bundle) = TrustBundle::new(fixture.trust_domain.clone(), roots) {
                check_bundle(fixture, &bundle);
            }
        }
    }
});

/// Splits `bytes` into blobs of a 2-byte big-endian length and that many bytes; a truncated last
/// blob is dropped.
fn blobs(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let [hi, lo, rest @ ..] = bytes {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(blob) = rest.get(..len) else {
            break;
        };
        out.push(blob.to_vec());
        bytes = &rest[len..];
    }
    out
}

fn check_svid(fixture: &Fixture, svid: &X509Svid) {
    // The identity is a valid SPIFFE ID that prints and parses back.
    let id = svid.spiffe_id();
    assert_eq!(parse_spiffe_id(&id.to_string()).as_ref(), Ok(id));
    assert!(!svid.chain().is_empty());
    assert_eq!(svid.leaf(), &svid.chain()[0]);
    assert!(svid.not_before() <= svid.not_after() || svid.lifetime() == Duration::ZERO);
    // Printed to PEM, it reads back the same.
    let chain_pem = svid.chain_pem();
    let key_pem = svid.private_key_pem();
    let again = X509Svid::from_pem(chain_pem.as_bytes(), key_pem.as_bytes())
        .unwrap_or_else(|e| panic!("an accepted SVID ({id}) does not read back from its own PEM: {e}"));
    assert!(again.same_chain(svid));
    assert_eq!(again.spiffe_id(), id);
    assert_eq!(again.not_before(), svid.not_before());
    assert_eq!(again.not_after(), svid.not_after());
    assert_eq!(again.private_key().secret_der(), svid.private_key().secret_der());
    // Verification never panics, at the fixture's time, at the SVID's own bounds and far outside.
    for at in [fixture.at, svid.not_before(), svid.not_after(), SystemTime::UNIX_EPOCH] {
        let verdict = svid.verify(&fixture.bundles, at);
        if svid.same_chain(&fixture.svid) && at == fixture.at {
            assert!(verdict.is_ok(), "the fixture chain no longer verifies: {verdict:?}");
        }
        if let Err(err) = verdict {
            assert!(!err.to_string().is_empty());
        }
    }
}

fn check_bundle(fixture: &Fixture, bundle: &TrustBundle) {
    assert!(!bundle.roots().is_empty());
    assert_eq!(bundle.roots().len(), bundle.anchors().len());
    assert_eq!(bundle.trust_domain(), &fixture.trust_domain);
    // The roots read back from PEM.
    let pem: String = bundle
        .roots()
        .iter()
        .map(|root| pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec())))
        .collect();
    let again = TrustBundle::from_pem(fixture.trust_domain.clone(), pem.as_bytes())
        .unwrap_or_else(|e| panic!("an accepted bundle does not read back from PEM: {e}"));
    assert_eq!(again.roots(), bundle.roots());
    // The fixture SVID against it: never a panic; valid whenever the bundle holds the fixture root.
    let verdict = fixture.svid.verify(&BundleSet::from(bundle.clone()), fixture.at);
    if bundle.roots().iter().any(|r| fixture.bundle.roots().contains(r)) {
        assert!(
            verdict.is_ok(),
            "the fixture SVID fails against a bundle holding its root: {verdict:?}"
        );
    }
    // Under another trust domain, the same roots do not vouch for the fixture's identity.
    if let Ok(other) = parse_trust_domain("other.example") {
        if let Ok(foreign) = TrustBundle::new(other, bundle.roots().to_vec()) {
            assert!(fixture.svid.verify(&BundleSet::from(foreign), fixture.at).is_err());
        }
    }
}
