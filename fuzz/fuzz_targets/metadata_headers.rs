#![no_main]
//! The metadata headers of an HBONE CONNECT request (`forwarded`, `baggage`, `traceparent`,
//! `x-forwarded-network`) and the `:authority`, read from arbitrary header fields.
//!
//! The input is a list of header fields, one per line, `name: value` (a line without `: ` is a
//! `forwarded` value; a name that is not a valid header name is skipped). Each value is parsed alone
//! by its own parser, and the whole list is read as a request's header map by `Metadata::from_headers`.
//!
//! Invariants: nothing panics; what a parser accepts prints to a value that parses back to the same
//! thing (for `forwarded`, `baggage`, `traceparent` and the authority); the metadata read from a map
//! writes back (`Metadata::to_headers`) without error, and reading the written map gives the same
//! metadata; each malformed header is reported and does not stop the others from being read.
//!
//! Seeds (`corpus/metadata_headers/`): the headers ztunnel and meshwire write on a CONNECT, and the
//! examples of the Forwarded (RFC 7239), W3C Baggage and W3C Trace Context specifications.

use std::fmt::Debug;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use meshwire_hbone::headers::{Authority, Baggage, Forwarded, Metadata, TraceParent};

fuzz_target!(|data: &[u8]| {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let (name, value) = match line.windows(2).position(|w| w == b": ") {
            Some(at) => (&line[..at], &line[at + 2..]),
            None => (&b"forwarded"[..], line),
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let Ok(name) = HeaderName::from_bytes(name) else {
            continue;
        };
        check_value(&name, &value);
        map.append(name, value);
    }
    check_map(&map);
});

/// One value, by the parser of its header name (authority for any other name).
fn check_value(name: &HeaderName, value: &HeaderValue) {
    match name.as_str() {
        "forwarded" => {
            if let Ok(forwarded) = Forwarded::from_header_value(value)
                && let Ok(written) = forwarded.to_header_value()
            {
                parses_back(Forwarded::from_header_value, &forwarded, &written);
                assert_eq!(written.as_bytes(), forwarded.to_string().as_bytes());
            }
        }
        "baggage" => {
            if let Ok(baggage) = Baggage::from_header_value(value)
                && let Ok(written) = baggage.to_header_value()
            {
                parses_back(Baggage::from_header_value, &baggage, &written);
            }
        }
        "traceparent" => {
            if let Ok(traceparent) = TraceParent::from_header_value(value) {
                let written = traceparent
                    .to_header_value()
                    .unwrap_or_else(|e| panic!("an accepted traceparent {traceparent} cannot be written: {e}"));
                parses_back(TraceParent::from_header_value, &traceparent, &written);
                assert_eq!(written.as_bytes(), traceparent.to_string().as_bytes());
            }
        }
        _ => {
            if let Ok(text) = value.to_str() {
                if let Ok(authority) = Authority::parse(text) {
                    let printed = authority.to_string();
                    assert_eq!(
                        Authority::parse(&printed).as_ref(),
                        Ok(&authority),
                        "{text:?} printed {printed:?}"
                    );
                    assert_ne!(authority.port(), 0, "{text:?}: port 0 accepted");
                }
            }
        }
    }
}

/// `written`, the value `parsed` wrote, parses back to `parsed`.
fn parses_back<T: PartialEq + Debug, E: PartialEq + Debug>(
    parse: impl Fn(&HeaderValue) -> Result<T, E>,
    parsed: &T,
    written: &HeaderValue,
) {
    assert_eq!(parse(written).as_ref(), Ok(parsed), "{written:?}");
}

/// The whole map, as a CONNECT request's headers.
fn check_map(map: &HeaderMap) {
    let (metadata, errors) = Metadata::from_headers(map);
    // Every reported error names its header.
    for error in &errors {
        assert!(!error.header().is_empty());
        assert!(!error.to_string().is_empty());
    }
    // A header absent from the map is absent from the metadata.
    assert!(map.contains_key("forwarded") || metadata.forwarded.is_none());
    assert!(map.contains_key("baggage") || metadata.baggage.is_none());
    assert!(map.contains_key("traceparent") || metadata.traceparent.is_none());
    assert!(map.contains_key("x-forwarded-network") || metadata.x_forwarded_network.is_none());
    // What was read writes back, and reads back the same.
    let mut written = HeaderMap::new();
    let write_errors = metadata.to_headers(&mut written);
    assert!(
        write_errors.is_empty(),
        "{metadata:?} read from {map:?} cannot be written: {write_errors:?}"
    );
    let (again, errors_again) = Metadata::from_headers(&written);
    assert!(errors_again.is_empty(), "{written:?}: {errors_again:?}");
    assert_eq!(again, metadata, "written as {written:?}");
}
