#![no_main]
//! Answers of the Istio CA (`IstioCertificateResponse.cert_chain`) checked against a fixed request:
//! `meshwire_identity::source::istio_ca::check_answer` for the identity
//! `spiffe://cluster.local/ns/default/sa/fuzz` and the fixed CSR key `fixtures/ca-answer-key.pem`, at
//! 2026-06-01.
//!
//! The first byte picks the form of the rest (modulo 2):
//! - 0: the `cert_chain` strings separated by NUL bytes (invalid UTF-8 replaced);
//! - 1: DER certificates, each preceded by its 2-byte big-endian length and encoded to PEM by the
//!   target; an empty one ends an element, so the last element may hold several roots. Mutations
//!   reach the certificates' structure instead of their base64.
//!
//! Invariants: nothing panics; an accepted answer names the requested identity, carries the CSR's
//! key (which the leaf certifies), has at least one root, none expired, and its SVID verifies
//! against those roots; a refusal prints a message.
//!
//! Seeds (`corpus/ca_answer/`) are real answers of an rcgen CA, good and bad, in both forms, written
//! with the fixture key by `cargo test -p meshwire-identity --test istio_ca -- --ignored
//! write_fuzz_seeds`.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshwire_identity::bundle::{BundleSet, TrustBundle};
use meshwire_identity::id::{SpiffeId, parse_spiffe_id};
use meshwire_identity::source::istio_ca::check_answer;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

struct Fixture {
    id: SpiffeId,
    key: PrivateKeyDer<'static>,
    /// 2026-06-01, inside the seeds' validity.
    now: SystemTime,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| Fixture {
    id: parse_spiffe_id("spiffe://cluster.local/ns/default/sa/fuzz").expect("a valid SPIFFE ID"),
    key: PrivateKeyDer::from_pem_slice(include_bytes!("../fixtures/ca-answer-key.pem")).expect("the fixture key"),
    now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_272_000),
});

fuzz_target!(|data: &[u8]| {
    let fixture = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let chain = if mode % 2 == 0 {
        pem_elements(rest)
    } else {
        der_elements(rest)
    };
    match check_answer(&fixture.id, &fixture.key, &chain, fixture.now) {
        Ok(answer) => {
            let svid = &answer.svid;
            assert_eq!(svid.spiffe_id(), &fixture.id, "accepted an answer for another identity");
            assert_eq!(
                svid.private_key().secret_der(),
                fixture.key.secret_der(),
                "the SVID holds another key than the CSR's"
            );
            assert!(
                svid.certified_key().keys_match().is_ok(),
                "accepted a leaf that does not certify the CSR's key"
            );
            assert!(!answer.roots.is_empty());
            assert!(
                answer.roots.iter().all(|r| r.not_after >= fixture.now),
                "an expired root was kept"
            );
            let bundle = TrustBundle::new(
                fixture.id.trust_domain().clone(),
                answer.roots.iter().map(|r| r.der.clone()).collect(),
            )
            .expect("accepted roots make a bundle");
            let verdict = svid.verify(&BundleSet::from(bundle), fixture.now);
            assert!(
                verdict.is_ok(),
                "an accepted SVID does not verify to its roots: {verdict:?}"
            );
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
});

fn pem_elements(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// Length-prefixed DER certificates; an empty one ends an element; a truncated last one is dropped.
fn der_elements(mut bytes: &[u8]) -> Vec<String> {
    let mut elements = Vec::new();
    let mut current = String::new();
    while let [hi, lo, rest @ ..] = bytes {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(der) = rest.get(..len) else {
            break;
        };
        bytes = &rest[len..];
        if der.is_empty() {
            elements.push(std::mem::take(&mut current));
        } else {
            current.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())));
        }
    }
    elements.push(current);
    elements
}
