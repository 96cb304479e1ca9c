//! Property and example tests for the CONNECT authority and metadata headers.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use http::{HeaderMap, HeaderValue};
use meshwire_hbone::headers::{
    Authority, AuthorityError, BAGGAGE, BAGGAGE_MAX_BYTES, BAGGAGE_MAX_MEMBERS, Baggage, BaggageError, FORWARDED,
    Forwarded, ForwardedError, ForwardedFor, HeaderError, Metadata, TRACEPARENT, TraceParent, TraceParentError,
    X_FORWARDED_NETWORK,
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

// ---------------------------------------------------------------------------------------------------------
// strategies
// ---------------------------------------------------------------------------------------------------------

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<u128>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        // Short, compressed and IPv4-mapped forms.
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, a, b))),
        any::<[u8; 4]>().prop_map(|b| IpAddr::V6(Ipv4Addr::from(b).to_ipv6_mapped())),
    ]
}

fn nonzero_port() -> impl Strategy<Value = u16> {
    prop_oneof![1u16..=1024, 1u16..=u16::MAX, Just(u16::MAX)]
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
}

/// RFC 1123 hostnames that are not all digits (those must be IPv4 addresses).
fn hostname() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..6)
        .prop_map(|labels| labels.join("."))
        .prop_filter("at most 253 characters", |h| h.len() <= 253)
        .prop_filter("not all digits", |h| {
            !h.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

/// Mixed-case letters in a lowercase hostname.
fn mixed_case(host: &str, mask: u64) -> String {
    host.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn authority() -> impl Strategy<Value = Authority> {
    prop_oneof![
        (ip(), nonzero_port()).prop_map(|(ip, port)| Authority::SocketAddr(SocketAddr::new(ip, port))),
        (hostname(), nonzero_port()).prop_map(|(name, port)| Authority::Host { name, port }),
    ]
}

fn forwarded_for() -> impl Strategy<Value = ForwardedFor> {
    prop_oneof![
        (ip(), any::<u16>()).prop_map(|(ip, port)| ForwardedFor::Addr(SocketAddr::new(ip, port))),
        ip().prop_map(ForwardedFor::Ip),
        // A scope ID survives (flow information is not part of the text form).
        (any::<u128>(), any::<u16>(), 1u32..).prop_map(|(ip, port, scope)| {
            ForwardedFor::Addr(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope)))
        }),
    ]
}

/// Hosts: service hostnames, and any text a header value can carry (quotes, backslashes, Unicode).
fn forwarded_host() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        hostname(),
        "[^\\x00-\\x08\\x0A-\\x1F\\x7F]{0,40}",
        "[\"\\\\ ;,=a-z]{0,10}",
    ])
}

fn forwarded() -> impl Strategy<Value = Forwarded> {
    (forwarded_for(), forwarded_host()).prop_map(|(for_addr, host)| Forwarded { for_addr, host })
}

fn baggage_value() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![any::<String>(), "[a-z0-9.-]{0,20}", "[ %,;=\"\\\\]{0,8}"])
}

fn workload_kind() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "deployment",
            "daemonset",
            "statefulset",
            "job",
            "cronjob",
            "pod",
            "replicaset"
        ])
        .prop_map(str::to_owned),
        "[a-z][a-z0-9.-]{0,15}".prop_filter("reserved", |k| k != "cluster" && k != "namespace"),
    ]
}

fn baggage() -> impl Strategy<Value = Baggage> {
    (
        [
            baggage_value(),
            baggage_value(),
            baggage_value(),
            baggage_value(),
            baggage_value(),
            baggage_value(),
        ],
        prop::option::of((workload_kind(), any::<String>())),
    )
        .prop_map(|(values, workload)| {
            let [cluster, namespace, service, version, region, zone] = values;
            let (workload_kind, workload_name) = workload.unzip();
            Baggage {
                cluster_name: cluster,
                namespace_name: namespace,
                workload_kind,
                workload_name,
                service_name: service,
                service_version: version,
                cloud_region: region,
                cloud_availability_zone: zone,
            }
        })
}

fn traceparent() -> impl Strategy<Value = TraceParent> {
    (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>())
        .prop_filter("non-zero ids", |(trace, parent, _)| {
            *trace != [0; 16] && *parent != [0; 8]
        })
        .prop_map(|(trace_id, parent_id, flags)| TraceParent {
            trace_id,
            parent_id,
            flags,
        })
}

fn network() -> impl Strategy<Value = String> {
    "[!-~]{1,30}"
}

fn metadata() -> impl Strategy<Value = Metadata> {
    (
        prop::option::of(forwarded().prop_filter("representable", |f| f.to_header_value().is_ok())),
        prop::option::of(baggage()),
        prop::option::of(traceparent()),
        prop::option::of(network()),
    )
        .prop_map(|(forwarded, baggage, traceparent, x_forwarded_network)| Metadata {
            forwarded,
            baggage,
            traceparent,
            x_forwarded_network,
        })
}

/// Valid-looking header text with one mutation: a character inserted, removed or replaced.
fn mutated(valid: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (valid, any::<prop::sample::Index>(), any::<char>(), 0..3u8).prop_map(|(s, at, c, op)| {
        let mut chars: Vec<char> = s.chars().collect();
        let i = at.index(chars.len() + 1);
        match op {
            0 => chars.insert(i, c),
            1 if i < chars.len() => {
                chars.remove(i);
            }
            _ if i < chars.len() => chars[i] = c,
            _ => chars.push(c),
        }
        chars.into_iter().collect()
    })
}

// ---------------------------------------------------------------------------------------------------------
// properties
// ---------------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn authority_round_trips(authority in authority()) {
        let text = authority.to_string();
        prop_assert_eq!(Authority::parse(&text), Ok(authority.clone()));
        prop_assert_eq!(text.parse::<Authority>(), Ok(authority.clone()));
        // What h2 hands a server goes through the same parser.
        let uri_authority: http::uri::Authority = text.parse().unwrap();
        prop_assert_eq!(Authority::try_from(&uri_authority), Ok(authority));
    }

    #[test]
    fn authority_ports_with_leading_zeros_are_refused(authority in authority(), zeros in 1..4usize) {
        let text = authority.to_string();
        let (host, port) = text.rsplit_once(':').unwrap();
        let padded = format!("{host}:{}{port}", "0".repeat(zeros));
        match Authority::parse(&padded) {
            Err(AuthorityError::NotCanonical { canonical, .. }) => prop_assert_eq!(canonical, text),
            other => prop_assert!(false, "{padded:?}: {other:?}"),
        }
    }

    #[test]
    fn authority_ip_matches_std(ip in ip(), port in nonzero_port()) {
        let addr = SocketAddr::new(ip, port);
        let parsed = Authority::parse(&addr.to_string()).unwrap();
        prop_assert_eq!(parsed.as_socket_addr(), Some(addr));
        prop_assert_eq!(parsed.port(), port);
        prop_assert_eq!(parsed.host_name(), None);
    }

    #[test]
    fn authority_hostnames_are_case_insensitive(name in hostname(), port in nonzero_port(), mask in any::<u64>()) {
        let parsed = Authority::parse(&format!("{}:{port}", mixed_case(&name, mask))).unwrap();
        prop_assert_eq!(parsed.host_name(), Some(name.as_str()));
        prop_assert_eq!(parsed.port(), port);
        prop_assert_eq!(parsed.as_socket_addr(), None);
        prop_assert_eq!(Authority::host(&mixed_case(&name, mask), port), Ok(parsed));
    }

    #[test]
    fn authority_parse_never_panics(s in ".*") {
        let _ = Authority::parse(&s);
    }

    #[test]
    fn authority_parse_never_panics_near_valid(s in mutated(authority().prop_map(|a| a.to_string()))) {
        if let Ok(parsed) = Authority::parse(&s) {
            // Whatever is accepted is canonical up to case.
            prop_assert!(parsed.to_string().eq_ignore_ascii_case(&s), "{s:?} accepted as {parsed}");
            prop_assert_eq!(Authority::parse(&parsed.to_string()), Ok(parsed));
        }
    }

    #[test]
    fn forwarded_round_trips(forwarded in forwarded()) {
        match forwarded.to_header_value() {
            Ok(value) => {
                let text = forwarded.to_string();
                prop_assert_eq!(value.as_bytes(), text.as_bytes());
                prop_assert_eq!(Forwarded::from_header_value(&value), Ok(forwarded.clone()));
                prop_assert_eq!(forwarded.to_string().parse::<Forwarded>(), Ok(forwarded));
            }
            Err(e) => {
                prop_assert!(matches!(e, ForwardedError::UnrepresentableHost { .. }), "{e}");
                prop_assert!(forwarded.host.unwrap().chars().any(|c| c.is_ascii_control() && c != '\t'));
            }
        }
    }

    #[test]
    fn forwarded_socket_addr_is_quoted_like_ztunnel(ip in ip(), port in any::<u16>()) {
        let addr = SocketAddr::new(ip, port);
        let forwarded = Forwarded::new(addr);
        prop_assert_eq!(forwarded.to_string(), format!("for=\"{addr}\""));
        prop_assert_eq!(forwarded.for_addr.ip(), ip);
        prop_assert_eq!(forwarded.for_addr.port(), Some(port));
    }

    #[test]
    fn forwarded_first_element_wins(first in forwarded(), second in forwarded()) {
        prop_assume!(first.to_header_value().is_ok() && second.to_header_value().is_ok());
        let list = format!("{first} , {second}");
        prop_assert_eq!(Forwarded::parse(&list), Ok(first));
    }

    #[test]
    fn forwarded_parse_never_panics(s in ".*") {
        let _ = Forwarded::parse(&s);
    }

    #[test]
    fn forwarded_parse_never_panics_near_valid(s in mutated(forwarded().prop_map(|f| f.to_string()))) {
        let _ = Forwarded::parse(&s);
    }

    #[test]
    fn forwarded_header_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            let _ = Forwarded::from_header_value(&value);
        }
    }

    #[test]
    fn baggage_round_trips(baggage in baggage()) {
        let value = baggage.to_header_value().unwrap();
        prop_assert!(value.to_str().is_ok(), "baggage must be visible ASCII: {value:?}");
        prop_assert_eq!(Baggage::from_header_value(&value), Ok(baggage.clone()));
        prop_assert_eq!(baggage.to_string().parse::<Baggage>(), Ok(baggage));
    }

    #[test]
    fn baggage_values_are_percent_encoded_outside_baggage_octets(value in any::<String>()) {
        let baggage = Baggage { service_name: Some(value.clone()), ..Baggage::default() };
        let text = baggage.to_string();
        let encoded = text.strip_prefix("service.name=").unwrap();
        let allowed = |b: u8| b"!#$&'()*+-./:<=>?@[]^_`{|}~%".contains(&b) || b.is_ascii_alphanumeric();
        prop_assert!(encoded.bytes().all(allowed), "{}", encoded);
        prop_assert_eq!(encoded.contains('%'), value.bytes().any(|b| !b.is_ascii_graphic() || b"\",;\\%".contains(&b)));
    }

    #[test]
    fn baggage_tolerates_whitespace_properties_and_unknown_keys(
        baggage in baggage(),
        ows in "[ \t]{0,3}",
        property in "(;[a-z]{1,5}(=[a-z0-9]{0,5})?){0,2}",
    ) {
        let members: Vec<String> = baggage
            .to_string()
            .split(',')
            .filter(|m| !m.is_empty())
            .map(|m| {
                let (key, value) = m.split_once('=').unwrap();
                format!("{ows}{key}{ows}={ows}{value}{ows}{property}{ows}")
            })
            .collect();
        let text = format!("unknown.key=1,{ows},{}, no-equals-sign ,bad key=2", members.join(","));
        prop_assert_eq!(Baggage::parse(&text), Ok(baggage));
    }

    #[test]
    fn baggage_parse_never_panics(s in ".*") {
        let _ = Baggage::parse(&s);
    }

    #[test]
    fn baggage_parse_never_panics_near_valid(s in mutated(baggage().prop_map(|b| b.to_string()))) {
        let _ = Baggage::parse(&s);
    }

    #[test]
    fn baggage_header_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            let _ = Baggage::from_header_value(&value);
        }
    }

    #[test]
    fn traceparent_round_trips(traceparent in traceparent()) {
        let value = traceparent.to_header_value().unwrap();
        prop_assert_eq!(value.len(), 55);
        prop_assert_eq!(TraceParent::from_header_value(&value), Ok(traceparent));
        prop_assert_eq!(traceparent.to_string().parse::<TraceParent>(), Ok(traceparent));
        prop_assert_eq!(traceparent.sampled(), traceparent.flags & 1 == 1);
    }

    #[test]
    fn traceparent_future_versions_are_read_and_written_as_00(
        traceparent in traceparent(),
        version in 1u8..0xff,
        extra in prop::option::of("-[a-z0-9-]{0,20}"),
    ) {
        let text = format!("{version:02x}{}{}", &traceparent.to_string()[2..], extra.unwrap_or_default());
        prop_assert_eq!(TraceParent::parse(&text), Ok(traceparent));
    }

    #[test]
    fn traceparent_parse_never_panics(s in ".*") {
        let _ = TraceParent::parse(&s);
    }

    #[test]
    fn traceparent_parse_never_panics_near_valid(s in mutated(traceparent().prop_map(|t| t.to_string()))) {
        if let Ok(parsed) = TraceParent::parse(&s) {
            prop_assert_eq!(TraceParent::parse(&parsed.to_string()), Ok(parsed));
        }
    }

    #[test]
    fn traceparent_header_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 50..60)) {
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            let _ = TraceParent::from_header_value(&value);
        }
    }

    #[test]
    fn metadata_round_trips(meta in metadata()) {
        let mut map = HeaderMap::new();
        prop_assert!(meta.to_headers(&mut map).is_empty());
        prop_assert_eq!(map.len(), [
            meta.forwarded.is_some(),
            meta.baggage.is_some(),
            meta.traceparent.is_some(),
            meta.x_forwarded_network.is_some(),
        ].iter().filter(|set| **set).count());
        let (parsed, errors) = Metadata::from_headers(&map);
        prop_assert!(errors.is_empty(), "{errors:?}");
        prop_assert_eq!(parsed, meta);
    }

    #[test]
    fn metadata_from_arbitrary_headers_never_panics(
        forwarded in prop::collection::vec(any::<u8>(), 0..80),
        baggage in prop::collection::vec(any::<u8>(), 0..80),
        traceparent in prop::collection::vec(any::<u8>(), 0..80),
        network in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let mut map = HeaderMap::new();
        let headers = [(FORWARDED, forwarded), (BAGGAGE, baggage), (TRACEPARENT, traceparent), (X_FORWARDED_NETWORK, network)];
        for (name, bytes) in headers {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                map.append(name, value);
            }
        }
        let (meta, errors) = Metadata::from_headers(&map);
        let present = [&FORWARDED, &BAGGAGE, &TRACEPARENT, &X_FORWARDED_NETWORK]
            .iter()
            .filter(|name| map.contains_key(**name))
            .count();
        let parsed = [
            meta.forwarded.is_some(),
            meta.baggage.is_some(),
            meta.traceparent.is_some(),
            meta.x_forwarded_network.is_some(),
        ].iter().filter(|set| **set).count();
        // Each present header is either parsed or reported, never both, never neither.
        prop_assert_eq!(parsed + errors.len(), present);
    }
}

// ---------------------------------------------------------------------------------------------------------
// :authority examples
// ---------------------------------------------------------------------------------------------------------

#[test]
fn authority_accepts_the_wire_forms() {
    assert_eq!(
        Authority::parse("1.2.3.4:80"),
        Ok(Authority::SocketAddr("1.2.3.4:80".parse().unwrap()))
    );
    assert_eq!(
        Authority::parse("[::1]:80"),
        Ok(Authority::SocketAddr("[::1]:80".parse().unwrap()))
    );
    let host = Authority::parse("Reviews.Default.svc.cluster.local:9080").unwrap();
    assert_eq!(
        host,
        Authority::Host {
            name: "reviews.default.svc.cluster.local".into(),
            port: 9080
        }
    );
    assert_eq!(host.to_string(), "reviews.default.svc.cluster.local:9080");
    assert_eq!(
        Authority::parse("localhost:8080").unwrap().host_name(),
        Some("localhost")
    );
    // IPv4-mapped IPv6 stays IPv6.
    assert_eq!(
        Authority::parse("[::ffff:1.2.3.4]:80").unwrap().to_string(),
        "[::ffff:1.2.3.4]:80"
    );
    // Labels of 63 characters, names of 253.
    let label63 = "a".repeat(63);
    let name253 = [label63.as_str(); 4].join(".")[..253].to_owned();
    assert!(Authority::parse(&format!("{name253}:1")).is_ok());
}

#[test]
fn authority_display_leaves_out_the_scope_id() {
    let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 80, 7, 3));
    assert_eq!(Authority::SocketAddr(scoped).to_string(), "[fe80::1]:80");
}

#[test]
fn authority_refuses_bare_ipv6() {
    for input in ["::1:80", "2001:db8::1:8080", "2001:db8::1", "::1"] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::UnbracketedIpv6 { .. })),
            "{input}: {:?}",
            Authority::parse(input)
        );
    }
    let message = Authority::parse("2001:db8::1:8080").unwrap_err().to_string();
    assert!(
        message.contains(":authority") && message.contains("brackets"),
        "{message}"
    );
}

#[test]
fn authority_refuses_port_zero() {
    for input in ["1.2.3.4:0", "[::1]:0", "example.com:0", "example.com:000"] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::PortZero { .. })),
            "{input}"
        );
    }
    assert!(matches!(
        Authority::host("example.com", 0),
        Err(AuthorityError::PortZero { .. })
    ));
    assert!(
        Authority::parse("1.2.3.4:0")
            .unwrap_err()
            .to_string()
            .contains("port 0")
    );
}

/// `:0080` is not read as port 80: a destination has one spelling, so that no check made on the text
/// (a port list, a log, a policy on the authority) can be passed by another spelling of it.
#[test]
fn authority_refuses_non_canonical_forms() {
    for (input, canonical) in [
        ("1.2.3.4:0080", "1.2.3.4:80"),
        ("1.2.3.4:01", "1.2.3.4:1"),
        ("[::1]:080", "[::1]:80"),
        ("example.com:00443", "example.com:443"),
        ("[::0001]:80", "[::1]:80"),
        ("[0:0:0:0:0:0:0:1]:80", "[::1]:80"),
        ("[2001:db8:0:0:1::1]:80", "[2001:db8::1:0:0:1]:80"),
        ("[::ffff:102:304]:80", "[::ffff:1.2.3.4]:80"),
    ] {
        match Authority::parse(input) {
            Err(AuthorityError::NotCanonical {
                authority,
                canonical: expected,
            }) => {
                assert_eq!(authority, input);
                assert_eq!(expected, canonical, "{input}");
            }
            other => panic!("{input}: {other:?}"),
        }
    }
    let message = Authority::parse("10.0.0.1:0080").unwrap_err().to_string();
    assert!(
        message.contains("10.0.0.1:0080") && message.contains("canonical"),
        "{message}"
    );
    // Case is not a spelling of a destination: hostnames are case-insensitive, and so are hex digits.
    assert_eq!(
        Authority::parse("Example.COM:80").unwrap().to_string(),
        "example.com:80"
    );
    assert_eq!(
        Authority::parse("[2001:DB8::1]:80").unwrap().to_string(),
        "[2001:db8::1]:80"
    );
}

#[test]
fn authority_refuses_a_missing_port() {
    for input in ["1.2.3.4", "example.com", "[::1]", "[::1]:", "example.com:"] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::MissingPort { .. })),
            "{input}: {:?}",
            Authority::parse(input)
        );
    }
}

#[test]
fn authority_refuses_invalid_ports() {
    for input in [
        "1.2.3.4:65536",
        "1.2.3.4:+80",
        "1.2.3.4:-1",
        "a.b:8o",
        "a.b:80 ",
        "a.b: 80",
    ] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::InvalidPort { .. })),
            "{input}: {:?}",
            Authority::parse(input)
        );
    }
}

#[test]
fn authority_refuses_an_empty_label() {
    for input in [".example.com:80", "example..com:80", "example.com.:80", ".:80"] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::EmptyLabel { .. })),
            "{input}: {:?}",
            Authority::parse(input)
        );
    }
    assert!(matches!(
        Authority::parse(":80"),
        Err(AuthorityError::MissingHost { .. })
    ));
    assert_eq!(Authority::parse(""), Err(AuthorityError::Empty));
}

#[test]
fn authority_refuses_a_too_long_hostname() {
    let label = "a".repeat(63);
    let name254 = format!("{label}.{label}.{label}.{}", "b".repeat(62));
    assert_eq!(name254.len(), 254);
    assert_eq!(
        Authority::parse(&format!("{name254}:80")),
        Err(AuthorityError::HostnameTooLong {
            authority: format!("{}…", &format!("{name254}:80")[..128]),
            len: 254
        })
    );
    assert!(matches!(
        Authority::parse(&format!("{}.com:80", "a".repeat(64))),
        Err(AuthorityError::LabelTooLong { .. })
    ));
}

#[test]
fn authority_refuses_invalid_hostnames() {
    for (input, ch) in [
        ("under_score.com:80", '_'),
        ("sp ace:80", ' '),
        ("ünï.com:80", 'ü'),
        ("a:b:c", ':'),
    ] {
        assert_eq!(
            Authority::parse(input),
            Err(AuthorityError::InvalidCharacter {
                authority: input.into(),
                ch
            }),
            "{input}"
        );
    }
    for input in ["-a.com:80", "a-.com:80", "a.-b:80"] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::LabelHyphen { .. })),
            "{input}"
        );
    }
    for input in ["01.2.3.4:80", "1.2.3:80", "256.1.1.1:80", "1.2.3.4.5:80"] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::InvalidIpv4 { .. })),
            "{input}"
        );
    }
    for input in ["[1.2.3.4]:80", "[fe80::1%eth0]:80", "[::1]80", "[::1", "[]:80"] {
        assert!(
            matches!(Authority::parse(input), Err(AuthorityError::InvalidIpv6 { .. })),
            "{input}: {:?}",
            Authority::parse(input)
        );
    }
    assert!(matches!(
        Authority::parse("user@host:80"),
        Err(AuthorityError::InvalidCharacter { ch: '@', .. })
    ));
    assert!(matches!(
        Authority::host("1.2.3.4", 80),
        Err(AuthorityError::InvalidIpv4 { .. })
    ));
}

// ---------------------------------------------------------------------------------------------------------
// forwarded examples
// ---------------------------------------------------------------------------------------------------------

fn addr(s: &str) -> ForwardedFor {
    ForwardedFor::Addr(s.parse().unwrap())
}

#[test]
fn forwarded_builds_ztunnel_values() {
    let v4 = Forwarded::new("10.0.0.1:4711".parse::<SocketAddr>().unwrap());
    assert_eq!(v4.to_header_value().unwrap(), "for=\"10.0.0.1:4711\"");
    let v6 = Forwarded::new("[2001:db8::1]:4711".parse::<SocketAddr>().unwrap())
        .with_host("reviews.default.svc.cluster.local");
    assert_eq!(
        v6.to_header_value().unwrap(),
        "for=\"[2001:db8::1]:4711\";host=reviews.default.svc.cluster.local"
    );
    let ip_only = Forwarded::new("2001:db8::1".parse::<IpAddr>().unwrap()).with_host("a b\"c\\");
    assert_eq!(ip_only.to_string(), r#"for="[2001:db8::1]";host="a b\"c\\""#);
    assert_eq!(Forwarded::parse(&ip_only.to_string()), Ok(ip_only));
}

#[test]
fn forwarded_accepts_unquoted_for() {
    assert_eq!(
        Forwarded::parse("for=1.2.3.4"),
        Ok(Forwarded::new("1.2.3.4".parse::<IpAddr>().unwrap()))
    );
    assert_eq!(Forwarded::parse("for=1.2.3.4:80").unwrap().for_addr, addr("1.2.3.4:80"));
    // Not valid RFC 7239, but unambiguous.
    assert_eq!(Forwarded::parse("for=[::1]:80").unwrap().for_addr, addr("[::1]:80"));
    assert_eq!(
        Forwarded::parse("for=2001:db8::1").unwrap().for_addr,
        ForwardedFor::Ip("2001:db8::1".parse().unwrap())
    );
    assert_eq!(
        Forwarded::parse("for=\"[2001:db8::1]\"").unwrap().for_addr,
        ForwardedFor::Ip("2001:db8::1".parse().unwrap())
    );
    assert_eq!(
        Forwarded::parse("for=\"[fe80::1%2]:80\"").unwrap().for_addr,
        addr("[fe80::1%2]:80")
    );
}

#[test]
fn forwarded_parameter_names_are_case_insensitive() {
    let expected = Forwarded::new("1.2.3.4:80".parse::<SocketAddr>().unwrap()).with_host("svc.ns");
    for input in [
        "FOR=\"1.2.3.4:80\";HOST=svc.ns",
        "For=\"1.2.3.4:80\";Host=svc.ns",
        "host=svc.ns;fOr=\"1.2.3.4:80\"",
    ] {
        assert_eq!(Forwarded::parse(input), Ok(expected.clone()), "{input}");
    }
}

#[test]
fn forwarded_tolerates_whitespace() {
    let expected = Forwarded::new("1.2.3.4:80".parse::<SocketAddr>().unwrap()).with_host("svc.ns");
    for input in [
        "  for = \"1.2.3.4:80\" ; host = svc.ns  ",
        "for=\"1.2.3.4:80\"\t;\thost=\"svc.ns\"",
        " , ,for=\"1.2.3.4:80\";;host=svc.ns;",
    ] {
        assert_eq!(Forwarded::parse(input), Ok(expected.clone()), "{input:?}");
    }
}

#[test]
fn forwarded_ignores_unknown_parameters_and_later_elements() {
    let parsed =
        Forwarded::parse("by=\"[::1]:15008\";for=\"1.2.3.4:80\";proto=https;x=\"a,b;c\", for=5.6.7.8").unwrap();
    assert_eq!(parsed, Forwarded::new("1.2.3.4:80".parse::<SocketAddr>().unwrap()));
    // Later elements are not even looked at.
    assert!(Forwarded::parse("for=1.2.3.4, garbage\"").is_ok());
}

#[test]
fn forwarded_refusals_name_the_header() {
    type Check = fn(&ForwardedError) -> bool;
    let cases: [(&str, Check); 9] = [
        ("", |e| matches!(e, ForwardedError::MissingFor { .. })),
        ("host=a;proto=http", |e| matches!(e, ForwardedError::MissingFor { .. })),
        ("proto=http, for=1.2.3.4", |e| {
            matches!(e, ForwardedError::MissingFor { .. })
        }),
        ("for=unknown", |e| matches!(e, ForwardedError::InvalidFor { .. })),
        ("for=\"_hidden\"", |e| matches!(e, ForwardedError::InvalidFor { .. })),
        ("for=\"1.2.3.4:80", |e| matches!(e, ForwardedError::Malformed { .. })),
        ("for", |e| matches!(e, ForwardedError::Malformed { .. })),
        ("for=\"1.2.3.4\"x", |e| matches!(e, ForwardedError::Malformed { .. })),
        ("for=1.2.3.4;For=5.6.7.8", |e| {
            matches!(e, ForwardedError::DuplicateParameter { param: "for", .. })
        }),
    ];
    for (input, expected) in cases {
        let error = Forwarded::parse(input).unwrap_err();
        assert!(expected(&error), "{input:?}: {error:?}");
        assert!(error.to_string().contains("forwarded header"), "{error}");
    }
    let not_utf8 = HeaderValue::from_bytes(b"for=\"\xff\"").unwrap();
    assert_eq!(Forwarded::from_header_value(&not_utf8), Err(ForwardedError::NotUtf8));
}

#[test]
fn forwarded_refuses_to_build_a_control_character() {
    let forwarded = Forwarded::new("1.2.3.4:80".parse::<SocketAddr>().unwrap()).with_host("a\nb");
    assert!(matches!(
        forwarded.to_header_value(),
        Err(ForwardedError::UnrepresentableHost { .. })
    ));
}

// ---------------------------------------------------------------------------------------------------------
// baggage examples
// ---------------------------------------------------------------------------------------------------------

fn ztunnel_baggage() -> Baggage {
    Baggage {
        cluster_name: Some("Kubernetes".into()),
        namespace_name: Some("default".into()),
        workload_kind: Some("deployment".into()),
        workload_name: Some("reviews-v1".into()),
        service_name: Some("reviews".into()),
        service_version: Some("v1".into()),
        cloud_region: Some("us-east1".into()),
        cloud_availability_zone: Some("us-east1-b".into()),
    }
}

#[test]
fn baggage_builds_ztunnel_order() {
    assert_eq!(
        ztunnel_baggage().to_header_value().unwrap(),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=reviews-v1,\
         service.name=reviews,service.version=v1,cloud.region=us-east1,cloud.availability_zone=us-east1-b"
    );
    let unicode = Baggage {
        service_name: Some("caf\u{e9} 100%,\"a;b\\".into()),
        ..Baggage::default()
    };
    assert_eq!(unicode.to_string(), "service.name=caf%C3%A9%20100%25%2C%22a%3Bb%5C");
    assert_eq!(Baggage::default().to_string(), "");
    assert!(Baggage::default().is_empty());
}

#[test]
fn baggage_parses_forgivingly() {
    let parsed = Baggage::parse(
        " k8s.namespace.name = default ;prop=1;flag , ,garbage, =x, k8s.pod.name=p%2x%41,\
         unknown=%FF, service.name=%E2%82%AC%FF, k8s.namespace.name=second, k8s.job.name=ignored",
    )
    .unwrap();
    assert_eq!(parsed.namespace_name.as_deref(), Some("default"));
    assert_eq!(parsed.workload_kind.as_deref(), Some("pod"));
    // An invalid escape is kept as written; a valid one decoded.
    assert_eq!(parsed.workload_name.as_deref(), Some("p%2xA"));
    // Bytes that are not UTF-8 become U+FFFD.
    assert_eq!(parsed.service_name.as_deref(), Some("\u{20ac}\u{fffd}"));
    assert_eq!(parsed.cluster_name, None);
    // ztunnel's receiver ignores `k8s.cluster.name` as a workload; so do we, and keys are case-sensitive.
    let parsed = Baggage::parse("K8S.CLUSTER.NAME=x,k8s.cluster.name=c,service.name=").unwrap();
    assert_eq!(parsed.cluster_name.as_deref(), Some("c"));
    assert_eq!(parsed.workload_kind, None);
    assert_eq!(parsed.service_name.as_deref(), Some(""));
    // Raw UTF-8 is accepted.
    assert_eq!(
        Baggage::parse("service.name=café").unwrap().service_name.as_deref(),
        Some("café")
    );
}

#[test]
fn baggage_refuses_oversize_values() {
    let big = format!("service.name={}", "a".repeat(BAGGAGE_MAX_BYTES - "service.name=".len()));
    assert_eq!(big.len(), BAGGAGE_MAX_BYTES);
    assert!(Baggage::parse(&big).is_ok());
    let too_big = format!("{big}b");
    assert_eq!(
        Baggage::parse(&too_big),
        Err(BaggageError::TooLarge {
            len: BAGGAGE_MAX_BYTES + 1
        })
    );
    assert!(
        Baggage::parse(&too_big)
            .unwrap_err()
            .to_string()
            .contains("baggage header")
    );

    let members = |n: usize| (0..n).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
    assert!(Baggage::parse(&members(BAGGAGE_MAX_MEMBERS)).is_ok());
    assert_eq!(
        Baggage::parse(&members(BAGGAGE_MAX_MEMBERS + 1)),
        Err(BaggageError::TooManyMembers)
    );

    // The limits apply to all fields together.
    let half = HeaderValue::from_str(&members(100)).unwrap();
    assert_eq!(
        Baggage::from_header_values([&half, &half]),
        Err(BaggageError::TooManyMembers)
    );

    let huge = Baggage {
        cloud_region: Some(" ".repeat(3000)),
        ..Baggage::default()
    };
    assert!(matches!(huge.to_header_value(), Err(BaggageError::TooLarge { .. })));
}

#[test]
fn baggage_refuses_invalid_workloads_when_building() {
    let mut baggage = ztunnel_baggage();
    baggage.workload_name = None;
    assert_eq!(baggage.to_header_value(), Err(BaggageError::IncompleteWorkload));
    for kind in ["", "cluster", "namespace", "a b", "a,b", "a=b"] {
        let mut baggage = ztunnel_baggage();
        baggage.workload_kind = Some(kind.into());
        assert!(
            matches!(baggage.to_header_value(), Err(BaggageError::InvalidWorkloadKind { .. })),
            "{kind:?}"
        );
    }
    let not_utf8 = HeaderValue::from_bytes(b"service.name=\xff").unwrap();
    assert_eq!(Baggage::from_header_value(&not_utf8), Err(BaggageError::NotUtf8));
}

// ---------------------------------------------------------------------------------------------------------
// traceparent examples
// ---------------------------------------------------------------------------------------------------------

const TRACEPARENT_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn traceparent_parses_the_specification_example() {
    let parsed = TraceParent::parse(TRACEPARENT_EXAMPLE).unwrap();
    assert_eq!(parsed.trace_id[0], 0x4b);
    assert_eq!(parsed.trace_id[15], 0x36);
    assert_eq!(parsed.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
    assert_eq!(parsed.flags, 1);
    assert!(parsed.sampled());
    assert_eq!(parsed.to_string(), TRACEPARENT_EXAMPLE);
    assert!(
        !TraceParent::parse(&TRACEPARENT_EXAMPLE.replace("-01", "-00"))
            .unwrap()
            .sampled()
    );
}

#[test]
fn traceparent_refuses_uppercase_hex() {
    let upper = TRACEPARENT_EXAMPLE.replace("4bf9", "4BF9");
    assert_eq!(
        TraceParent::parse(&upper),
        Err(TraceParentError::NotLowercaseHex { field: "trace-id" })
    );
    let upper = TRACEPARENT_EXAMPLE.replace("00f067aa", "00F067AA");
    assert_eq!(
        TraceParent::parse(&upper),
        Err(TraceParentError::NotLowercaseHex { field: "parent-id" })
    );
    let upper = TRACEPARENT_EXAMPLE.replace("-01", "-0A");
    assert_eq!(
        TraceParent::parse(&upper),
        Err(TraceParentError::NotLowercaseHex { field: "trace-flags" })
    );
    assert!(
        TraceParent::parse(&upper)
            .unwrap_err()
            .to_string()
            .contains("traceparent header")
    );
}

#[test]
fn traceparent_refuses_all_zero_ids() {
    let zero_trace = format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32));
    assert_eq!(TraceParent::parse(&zero_trace), Err(TraceParentError::ZeroTraceId));
    let zero_parent = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", "0".repeat(16));
    assert_eq!(TraceParent::parse(&zero_parent), Err(TraceParentError::ZeroParentId));
    let mut built = TraceParent::parse(TRACEPARENT_EXAMPLE).unwrap();
    built.parent_id = [0; 8];
    assert_eq!(built.to_header_value(), Err(TraceParentError::ZeroParentId));
    built.trace_id = [0; 16];
    assert_eq!(built.to_header_value(), Err(TraceParentError::ZeroTraceId));
}

#[test]
fn traceparent_refuses_version_ff() {
    let ff = TRACEPARENT_EXAMPLE.replacen("00", "ff", 1);
    assert_eq!(TraceParent::parse(&ff), Err(TraceParentError::InvalidVersion));
    let upper_version = TRACEPARENT_EXAMPLE.replacen("00", "0A", 1);
    assert_eq!(
        TraceParent::parse(&upper_version),
        Err(TraceParentError::NotLowercaseHex { field: "version" })
    );
}

#[test]
fn traceparent_checks_length_and_dashes() {
    assert_eq!(
        TraceParent::parse(&TRACEPARENT_EXAMPLE[..54]),
        Err(TraceParentError::TooShort { len: 54 })
    );
    assert_eq!(
        TraceParent::parse(&format!("{TRACEPARENT_EXAMPLE}-")),
        Err(TraceParentError::WrongLength { len: 56 })
    );
    let future = TRACEPARENT_EXAMPLE.replacen("00", "01", 1);
    assert!(TraceParent::parse(&format!("{future}-what-ever")).is_ok());
    assert_eq!(
        TraceParent::parse(&format!("{future}x")),
        Err(TraceParentError::MissingDash { position: 55 })
    );
    assert_eq!(
        TraceParent::parse(&TRACEPARENT_EXAMPLE.replacen('-', "_", 1)),
        Err(TraceParentError::MissingDash { position: 2 })
    );
    // Multi-byte characters never cause a slicing panic.
    assert!(TraceParent::parse(&"é".repeat(30)).is_err());
}

// ---------------------------------------------------------------------------------------------------------
// Metadata examples
// ---------------------------------------------------------------------------------------------------------

fn full_metadata() -> Metadata {
    Metadata {
        forwarded: Some(
            Forwarded::new("[2001:db8::1]:4711".parse::<SocketAddr>().unwrap())
                .with_host("reviews.default.svc.cluster.local"),
        ),
        baggage: Some(ztunnel_baggage()),
        traceparent: Some(TraceParent::parse(TRACEPARENT_EXAMPLE).unwrap()),
        x_forwarded_network: Some("network-1".into()),
    }
}

#[test]
fn metadata_round_trips_through_a_header_map() {
    let meta = full_metadata();
    let mut map = HeaderMap::new();
    map.insert(FORWARDED, HeaderValue::from_static("for=9.9.9.9"));
    assert!(meta.to_headers(&mut map).is_empty());
    assert_eq!(map.len(), 4);
    assert_eq!(
        map["forwarded"],
        "for=\"[2001:db8::1]:4711\";host=reviews.default.svc.cluster.local"
    );
    assert_eq!(map["traceparent"], TRACEPARENT_EXAMPLE);
    assert_eq!(map["x-forwarded-network"], "network-1");
    assert!(
        map["baggage"]
            .to_str()
            .unwrap()
            .starts_with("k8s.cluster.name=Kubernetes,")
    );
    assert_eq!(Metadata::from_headers(&map), (meta, Vec::new()));

    let (empty, errors) = Metadata::from_headers(&HeaderMap::new());
    assert!(empty.is_empty() && errors.is_empty());
}

#[test]
fn metadata_drops_one_malformed_header_and_keeps_the_others() {
    let meta = full_metadata();
    let mut map = HeaderMap::new();
    assert!(meta.to_headers(&mut map).is_empty());
    map.insert(
        TRACEPARENT,
        HeaderValue::from_static("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
    );
    let (parsed, errors) = Metadata::from_headers(&map);
    assert_eq!(
        errors,
        vec![HeaderError::TraceParent(TraceParentError::NotLowercaseHex {
            field: "trace-id"
        })]
    );
    assert_eq!(errors[0].header(), "traceparent");
    assert_eq!(
        parsed,
        Metadata {
            traceparent: None,
            ..meta.clone()
        }
    );

    for (name, bad) in [
        (FORWARDED, "for=unknown".to_owned()),
        (BAGGAGE, "a=b,".repeat(BAGGAGE_MAX_MEMBERS + 1)),
        (X_FORWARDED_NETWORK, "two words".to_owned()),
    ] {
        let mut map = HeaderMap::new();
        assert!(meta.to_headers(&mut map).is_empty());
        map.insert(name.clone(), HeaderValue::from_str(&bad).unwrap());
        let (parsed, errors) = Metadata::from_headers(&map);
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert_eq!(errors[0].header(), name.as_str());
        let mut expected = meta.clone();
        match name.as_str() {
            "forwarded" => expected.forwarded = None,
            "baggage" => expected.baggage = None,
            _ => expected.x_forwarded_network = None,
        }
        assert_eq!(parsed, expected, "{name}");
    }
}

#[test]
fn metadata_handles_repeated_headers() {
    let meta = full_metadata();
    let mut map = HeaderMap::new();
    assert!(meta.to_headers(&mut map).is_empty());
    map.append(TRACEPARENT, HeaderValue::from_static(TRACEPARENT_EXAMPLE));
    map.append(FORWARDED, HeaderValue::from_static("for=9.9.9.9"));
    map.append(BAGGAGE, HeaderValue::from_static("k8s.cluster.name=other,extra.key=1"));
    let (parsed, errors) = Metadata::from_headers(&map);
    assert_eq!(
        errors,
        vec![HeaderError::Repeated {
            header: "traceparent",
            count: 2
        }]
    );
    assert!(errors[0].to_string().contains("traceparent header appears 2 times"));
    // The first forwarded field and the first baggage value of a key win.
    assert_eq!(
        parsed,
        Metadata {
            traceparent: None,
            ..meta
        }
    );

    // Baggage split over several fields is read as one list.
    let mut map = HeaderMap::new();
    map.append(BAGGAGE, HeaderValue::from_static("k8s.namespace.name=ns"));
    map.append(BAGGAGE, HeaderValue::from_static("service.name=svc"));
    let baggage = Metadata::from_headers(&map).0.baggage.unwrap();
    assert_eq!(baggage.namespace_name.as_deref(), Some("ns"));
    assert_eq!(baggage.service_name.as_deref(), Some("svc"));
}

#[test]
fn metadata_trims_the_network_name() {
    let mut map = HeaderMap::new();
    map.insert(X_FORWARDED_NETWORK, HeaderValue::from_static("  net-1\t"));
    assert_eq!(
        Metadata::from_headers(&map).0.x_forwarded_network.as_deref(),
        Some("net-1")
    );
    map.insert(X_FORWARDED_NETWORK, HeaderValue::from_static("   "));
    let (meta, errors) = Metadata::from_headers(&map);
    assert_eq!(meta.x_forwarded_network, None);
    assert!(matches!(errors[..], [HeaderError::ForwardedNetwork { .. }]));
}

#[test]
fn metadata_reports_values_it_cannot_write_and_writes_the_rest() {
    let mut meta = full_metadata();
    meta.x_forwarded_network = Some("bad\nname".into());
    meta.traceparent.as_mut().unwrap().trace_id = [0; 16];
    let mut map = HeaderMap::new();
    map.insert(TRACEPARENT, HeaderValue::from_static(TRACEPARENT_EXAMPLE));
    let errors = meta.to_headers(&mut map);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0], HeaderError::TraceParent(TraceParentError::ZeroTraceId));
    assert_eq!(errors[1].header(), "x-forwarded-network");
    assert!(map.contains_key(FORWARDED) && map.contains_key(BAGGAGE));
    assert!(!map.contains_key(X_FORWARDED_NETWORK));
    // A value that could not be written leaves the map's earlier value alone.
    assert_eq!(map[TRACEPARENT], TRACEPARENT_EXAMPLE);
}
