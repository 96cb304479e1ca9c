#![no_main]
//! SPIFFE IDs, trust domains and Istio identities parsed from arbitrary text.
//!
//! Invariants: nothing panics; whatever parses prints to a form that parses back to the same value
//! and prints the same again; an ID that converts to an Istio identity converts back to itself, and
//! the identity built from its parts is the same; the three parsers agree with each other (an Istio
//! identity is a SPIFFE ID, whose trust domain parses alone).
//!
//! The input is split at the first NUL byte: the text before it is parsed as every kind of name;
//! after it, up to two more NUL-separated pieces are used as a namespace and a service account for
//! `IstioIdentity::new` with the trust domain parsed from the first piece.
//!
//! Seeds (`corpus/spiffe_id/`): the identities of the example configuration and of the tests.

use libfuzzer_sys::fuzz_target;
use meshwire_identity::id::{IstioIdentity, SpiffeId, parse_spiffe_id, parse_trust_domain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut pieces = text.split('\0');
    let name = pieces.next().unwrap_or_default();
    check_spiffe_id(name);
    check_trust_domain(name);
    check_istio(name);
    if let (Some(namespace), Some(service_account)) = (pieces.next(), pieces.next()) {
        check_istio_parts(name, namespace, service_account);
    }
});

fn check_spiffe_id(input: &str) {
    let Ok(id) = parse_spiffe_id(input) else {
        // Anything the SPIFFE parser refuses is no Istio identity either.
        assert!(
            input.parse::<IstioIdentity>().is_err(),
            "{input:?}: Istio identity but no SPIFFE ID"
        );
        return;
    };
    let printed = id.to_string();
    let again = parse_spiffe_id(&printed).unwrap_or_else(|e| panic!("{printed:?} (printed from {input:?}): {e}"));
    assert_eq!(again, id, "{input:?} printed as {printed:?}");
    assert_eq!(again.to_string(), printed);
    // The trust domain of a valid ID is a valid trust domain, printed the same way.
    let td = id.trust_domain();
    let td_again = parse_trust_domain(&td.to_string()).unwrap_or_else(|e| panic!("trust domain of {printed:?}: {e}"));
    assert_eq!(&td_again, td);
    assert!(
        printed.starts_with(&format!("spiffe://{td}")),
        "{printed:?} does not start with its trust domain"
    );
    match IstioIdentity::try_from(&id) {
        Ok(istio) => {
            assert_eq!(istio.to_spiffe_id(), id, "{printed:?} -> {istio:?} -> back");
            assert_eq!(SpiffeId::from(&istio), id);
            assert_eq!(istio.to_string(), printed);
            let parsed: IstioIdentity = printed.parse().unwrap_or_else(|e| panic!("{printed:?}: {e}"));
            assert_eq!(parsed, istio);
            let rebuilt = IstioIdentity::new(td.clone(), istio.namespace(), istio.service_account())
                .unwrap_or_else(|e| panic!("rebuilding {istio:?}: {e}"));
            assert_eq!(rebuilt, istio);
        }
        Err(err) => {
            // The refusal names the ID, and parsing the text refuses it too.
            assert!(!err.to_string().is_empty());
            assert!(printed.parse::<IstioIdentity>().is_err(), "{printed:?}");
        }
    }
}

fn check_trust_domain(input: &str) {
    let Ok(td) = parse_trust_domain(input) else {
        return;
    };
    let printed = td.to_string();
    let again = parse_trust_domain(&printed).unwrap_or_else(|e| panic!("{printed:?} (from {input:?}): {e}"));
    assert_eq!(again, td);
    assert_eq!(again.to_string(), printed);
}

fn check_istio(input: &str) {
    let Ok(istio) = input.parse::<IstioIdentity>() else {
        return;
    };
    let id = parse_spiffe_id(input).unwrap_or_else(|e| panic!("{input:?} is an Istio identity but: {e}"));
    assert_eq!(istio.to_spiffe_id(), id);
    let printed = istio.to_string();
    let again: IstioIdentity = printed.parse().unwrap_or_else(|e| panic!("{printed:?}: {e}"));
    assert_eq!(again, istio);
}

fn check_istio_parts(td: &str, namespace: &str, service_account: &str) {
    let Ok(td) = parse_trust_domain(td) else {
        return;
    };
    let Ok(istio) = IstioIdentity::new(td.clone(), namespace, service_account) else {
        return;
    };
    assert_eq!(istio.trust_domain(), &td);
    assert_eq!(istio.namespace(), namespace);
    assert_eq!(istio.service_account(), service_account);
    // An identity built from valid parts has a SPIFFE ID that converts back to it.
    let id = istio.to_spiffe_id();
    let back = IstioIdentity::try_from(&id).unwrap_or_else(|e| panic!("{id} back to an Istio identity: {e}"));
    assert_eq!(back, istio);
    let printed = istio.to_string();
    assert_eq!(parse_spiffe_id(&printed).ok(), Some(id));
}
