//! Property tests for SPIFFE IDs and the Istio identity form.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use meshwire_identity::id::{
    IdError, IstioIdentity, SpiffeId, SpiffeIdError, TrustDomain, parse_spiffe_id, parse_trust_domain,
};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// No regression files: this crate keeps its test inputs in the source.
fn config() -> Config {
    Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A trust domain as a user may type it: valid characters, mixed case.
fn trust_domain_input() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,40}"
}

/// A valid path segment: SPIFFE path characters, not `.` or `..`.
fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,20}".prop_filter("dot segments are not valid", |s| s != "." && s != "..")
}

fn segments(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(), len)
}

/// The scheme in any ASCII case: SPIFFE IDs compare it case-insensitively.
fn scheme() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["spiffe", "SPIFFE", "Spiffe", "sPiFfE"])
}

fn path_of(segments: &[String]) -> String {
    segments.iter().map(|s| format!("/{s}")).collect()
}

fn spiffe_error(input: &str) -> SpiffeIdError {
    match parse_spiffe_id(input) {
        Err(IdError::Spiffe { input: named, source }) => {
            assert_eq!(named, input, "the error names the rejected input");
            let message = IdError::Spiffe {
                input: named,
                source: source.clone(),
            }
            .to_string();
            assert!(message.contains(&format!("{input:?}")), "{message}");
            source
        }
        other => panic!("{input:?} must be refused with IdError::Spiffe, got {other:?}"),
    }
}

fn not_istio(id: &SpiffeId) -> &'static str {
    match IstioIdentity::try_from(id) {
        Err(IdError::NotIstio { id: named, reason }) => {
            assert_eq!(named, id.to_string());
            // The string form is refused the same way.
            match id.to_string().parse::<IstioIdentity>() {
                Err(IdError::NotIstio { reason: again, .. }) => assert_eq!(again, reason),
                other => panic!("{id} parsed as an Istio identity: {other:?}"),
            }
            reason
        }
        other => panic!("{id} must be refused with IdError::NotIstio, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn spiffe_id_round_trips_to_its_canonical_form(
        scheme in scheme(),
        td in trust_domain_input(),
        segs in segments(0..6),
    ) {
        let path = path_of(&segs);
        let input = format!("{scheme}://{td}{path}");
        let canonical = format!("spiffe://{}{path}", td.to_ascii_lowercase());

        let id = parse_spiffe_id(&input).unwrap();
        prop_assert_eq!(id.trust_domain().as_str(), td.to_ascii_lowercase());
        prop_assert_eq!(id.path(), path.as_str());
        let printed = id.to_string();
        prop_assert_eq!(&printed, &canonical);
        let again = parse_spiffe_id(&printed).unwrap();
        prop_assert_eq!(&again, &id);
        // Building from parts gives the same ID.
        let parts: Vec<&str> = segs.iter().map(String::as_str).collect();
        let built = SpiffeId::from_segments(parse_trust_domain(&td).unwrap(), &parts).unwrap();
        prop_assert_eq!(&built, &id);
    }

    #[test]
    fn istio_identity_round_trips(td in trust_domain_input(), ns in segment(), sa in segment()) {
        let trust_domain = TrustDomain::new(&td).unwrap();
        let identity = IstioIdentity::new(trust_domain.clone(), ns.clone(), sa.clone()).unwrap();
        prop_assert_eq!(identity.trust_domain(), &trust_domain);
        prop_assert_eq!(identity.namespace(), ns.as_str());
        prop_assert_eq!(identity.service_account(), sa.as_str());

        let spiffe = identity.to_spiffe_id();
        prop_assert_eq!(spiffe.path(), format!("/ns/{ns}/sa/{sa}"));
        prop_assert_eq!(&SpiffeId::from(&identity), &spiffe);
        prop_assert_eq!(&IstioIdentity::try_from(&spiffe).unwrap(), &identity);
        prop_assert_eq!(&IstioIdentity::try_from(spiffe.clone()).unwrap(), &identity);

        let printed = identity.to_string();
        prop_assert_eq!(&printed, &spiffe.to_string());
        prop_assert_eq!(&printed.parse::<IstioIdentity>().unwrap(), &identity);
        // Mixed-case input of the same identity parses to it too.
        let typed = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        prop_assert_eq!(&typed.parse::<IstioIdentity>().unwrap(), &identity);
    }

    #[test]
    fn istio_identity_refuses_bad_segments(
        td in trust_domain_input(),
        good in segment(),
        bad in prop::sample::select(vec!["", ".", "..", "a/b", "a b", "a%2f", "a@b", "a:b", "\u{e9}"]),
        namespace_is_bad in any::<bool>(),
    ) {
        let td = TrustDomain::new(&td).unwrap();
        let (ns, sa) = if namespace_is_bad { (bad, good.as_str()) } else { (good.as_str(), bad) };
        let err = IstioIdentity::new(td, ns, sa).unwrap_err();
        let field = if namespace_is_bad { "namespace" } else { "service account" };
        prop_assert!(
            matches!(&err, IdError::Segment { field: f, value, .. } if *f == field && value == bad),
            "{:?}", err
        );
        prop_assert!(err.to_string().contains(field), "{}", err);
    }

    #[test]
    fn wrong_scheme_is_refused(
        scheme in "[a-z][a-z0-9+.-]{0,8}".prop_filter("not spiffe", |s| !s.eq_ignore_ascii_case("spiffe")),
        td in trust_domain_input(),
        segs in segments(0..4),
    ) {
        let input = format!("{scheme}://{td}{}", path_of(&segs));
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::WrongScheme);
    }

    #[test]
    fn missing_separator_is_refused(
        sep in prop::sample::select(vec!["", ":", ":/", "/", "//", ":\\\\"]),
        td in trust_domain_input(),
        segs in segments(0..4),
    ) {
        let input = format!("spiffe{sep}{td}{}", path_of(&segs));
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::WrongScheme);
    }

    #[test]
    fn empty_trust_domain_is_refused(segs in segments(0..4)) {
        let input = format!("spiffe://{}", path_of(&segs));
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::MissingTrustDomain);
    }

    #[test]
    fn empty_segment_is_refused(td in trust_domain_input(), segs in segments(1..6), at in any::<prop::sample::Index>()) {
        // `//` at the start of the path, between two segments, or before the last one.
        let at = at.index(segs.len());
        let mut path = String::new();
        for (i, s) in segs.iter().enumerate() {
            if i == at {
                path.push('/');
            }
            path.push('/');
            path.push_str(s);
        }
        let input = format!("spiffe://{td}{path}");
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::EmptySegment);
    }

    #[test]
    fn dot_segment_is_refused(
        td in trust_domain_input(),
        mut segs in segments(1..6),
        at in any::<prop::sample::Index>(),
        dot in prop::sample::select(vec![".", ".."]),
    ) {
        let at = at.index(segs.len());
        dot.clone_into(&mut segs[at]);
        let input = format!("spiffe://{td}{}", path_of(&segs));
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::DotSegment);
    }

    #[test]
    fn trailing_slash_is_refused(td in trust_domain_input(), segs in segments(0..6)) {
        let input = format!("spiffe://{td}{}/", path_of(&segs));
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::TrailingSlash);
    }

    #[test]
    fn bad_path_character_is_refused(
        td in trust_domain_input(),
        mut segs in segments(1..6),
        at in any::<prop::sample::Index>(),
        pos in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec!['%', ' ', '@', ':', '#', '?', '+', '~', '*', '\\', '\u{e9}', '\u{0}']),
    ) {
        let at = at.index(segs.len());
        let pos = pos.index(segs[at].len() + 1);
        segs[at].insert(pos, bad);
        let input = format!("spiffe://{td}{}", path_of(&segs));
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::BadPathSegmentChar);
    }

    #[test]
    fn bad_trust_domain_character_is_refused(
        mut td in trust_domain_input(),
        segs in segments(0..4),
        pos in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![':', '@', '%', ' ', '+', '~', '*', '!', '\u{e9}']),
    ) {
        let pos = pos.index(td.len() + 1);
        td.insert(pos, bad);
        let input = format!("spiffe://{td}{}", path_of(&segs));
        prop_assert_eq!(spiffe_error(&input), SpiffeIdError::BadTrustDomainChar);
    }

    #[test]
    fn too_long_trust_domain_is_refused(td in "[a-z0-9.-]{256,300}", segs in segments(0..3)) {
        let input = format!("spiffe://{td}{}", path_of(&segs));
        let source = spiffe_error(&input);
        prop_assert!(matches!(source, SpiffeIdError::TrustDomainTooLong { max: 255 }), "{:?}", source);
    }

    #[test]
    fn wrong_number_of_segments_is_not_istio(
        td in trust_domain_input(),
        segs in prop_oneof![segments(0..4), segments(5..9)],
    ) {
        let id = parse_spiffe_id(&format!("spiffe://{td}{}", path_of(&segs))).unwrap();
        let reason = not_istio(&id);
        let expected = match segs.len() {
            0 => "empty",
            1..=3 => "fewer than four",
            _ => "more than four",
        };
        prop_assert!(reason.contains(expected), "{} for {:?}", reason, segs);
    }

    #[test]
    fn wrong_keywords_are_not_istio(
        td in trust_domain_input(),
        first in prop_oneof![Just("ns".to_owned()), Just("NS".to_owned()), Just("sa".to_owned()), segment()],
        third in prop_oneof![Just("sa".to_owned()), Just("SA".to_owned()), Just("ns".to_owned()), segment()],
        ns in segment(),
        sa in segment(),
    ) {
        prop_assume!(first != "ns" || third != "sa");
        let id = parse_spiffe_id(&format!("spiffe://{td}/{first}/{ns}/{third}/{sa}")).unwrap();
        let reason = not_istio(&id);
        let expected = if first == "ns" { "third segment" } else { "first segment" };
        prop_assert!(reason.contains(expected), "{}", reason);
        let message = IstioIdentity::try_from(&id).unwrap_err().to_string();
        prop_assert!(message.contains(&id.to_string()), "{}", message);
    }

    /// Whatever a SPIFFE ID looks like, converting it to an Istio identity either fails cleanly or
    /// gives an identity that converts back to the same ID (without panicking), however long it is.
    #[test]
    fn istio_conversion_never_panics(
        td in "[a-z0-9.]{1,255}",
        ns in "[a-z0-9-]{1,1200}",
        sa in "[a-z0-9-]{1,1200}",
    ) {
        let input = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        let id = parse_spiffe_id(&input).unwrap();
        match IstioIdentity::try_from(&id) {
            Ok(identity) => {
                prop_assert!(input.len() <= 2048, "an over-long ID was accepted: {} bytes", input.len());
                prop_assert_eq!(identity.to_spiffe_id(), id);
                prop_assert_eq!(identity.to_string(), input);
            }
            Err(err) => {
                prop_assert!(input.len() > 2048, "{}", err);
                prop_assert!(
                    matches!(&err, IdError::Spiffe { source: SpiffeIdError::SpiffeIdTooLong { .. }, .. }),
                    "{:?}", err
                );
                // `new` draws the same line.
                let new = IstioIdentity::new(id.trust_domain().clone(), ns, sa).unwrap_err();
                prop_assert_eq!(new, err);
            }
        }
    }
}

#[test]
fn istio_identity_of_an_over_long_id_is_refused_not_a_panic() {
    // Each name fits alone; together they pass the 2048-byte limit.
    let (ns, sa) = ("a".repeat(1000), "b".repeat(1100));
    let input = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    // The SPIFFE parser accepts IDs beyond the 2048-byte construction limit...
    assert!(parse_spiffe_id(&input).is_ok());
    // ...but an Istio identity must stay convertible back to a SPIFFE ID.
    let result = std::panic::catch_unwind(|| input.parse::<IstioIdentity>().map(|i| i.to_spiffe_id()));
    let err = result.expect("no panic").unwrap_err();
    assert!(
        matches!(
            err,
            IdError::Spiffe {
                source: SpiffeIdError::SpiffeIdTooLong { max: 2048 },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn fixed_examples() {
    let id: IstioIdentity = "spiffe://Cluster.Local/ns/default/sa/bookinfo".parse().unwrap();
    assert_eq!(id.trust_domain().as_str(), "cluster.local");
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo");
    // Keywords are case-sensitive; namespace and service account keep their case.
    assert!(matches!(
        "spiffe://td/NS/a/sa/b".parse::<IstioIdentity>(),
        Err(IdError::NotIstio { .. })
    ));
    let id: IstioIdentity = "spiffe://td/ns/Default/sa/Web".parse().unwrap();
    assert_eq!((id.namespace(), id.service_account()), ("Default", "Web"));
    // Istio IDs with names equal to the keywords are fine.
    let id: IstioIdentity = "spiffe://td/ns/sa/sa/ns".parse().unwrap();
    assert_eq!((id.namespace(), id.service_account()), ("sa", "ns"));
    assert_eq!(spiffe_error(""), SpiffeIdError::Empty);
    assert_eq!(spiffe_error("spiffe://"), SpiffeIdError::MissingTrustDomain);
    assert_eq!(spiffe_error("spiffe://td:8080/x"), SpiffeIdError::BadTrustDomainChar);
    assert_eq!(spiffe_error("spiffe://user@td/x"), SpiffeIdError::BadTrustDomainChar);
    assert_eq!(spiffe_error("spiffe://td/x?q=1"), SpiffeIdError::BadPathSegmentChar);
    assert_eq!(spiffe_error("spiffe://td/x#f"), SpiffeIdError::BadPathSegmentChar);
    assert_eq!(spiffe_error("spiffe://td/a%2Fb"), SpiffeIdError::BadPathSegmentChar);
}
