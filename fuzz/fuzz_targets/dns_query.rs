#![no_main]
//! The DNS proxy's decision (`dns::decide`) fed arbitrary packets, over UDP and TCP, from a known
//! client and an unknown one, against a fixed mesh; the upstream is the pure decision itself (a
//! forward is checked, not sent).
//!
//! Invariants: nothing panics; the outcome is a local answer, a forward or an error, and
//! - an error is `TooShort` only for packets under 12 bytes, `NotAQuery` only for responses; a
//!   `FORMERR` answer to a malformed query has its id;
//! - a local answer has the query's id and question (byte for byte), is a response, fits the
//!   client's size (512, the EDNS size, or 65,535 over TCP), and is cut only with `TC` set;
//! - a forward leaves the packet as it was (the server sends the input unchanged);
//! - `wire::truncate` of the input to the limit fits it and keeps the id.
//!
//! Seeds (`corpus/dns_query/`): real encoded queries (A, AAAA of mesh and other names, SRV, TXT,
//! an UPDATE, an EDNS query, two questions) and malformed ones (cut, a response, a bad label).

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshwire_dataplane::dns::{Client, NameIndex, Outcome, QueryError, ResolverConfig, Transport, decide, wire};
use meshwire_dataplane::state::State;
use meshwire_dataplane::xds::LocalConfig;

const MESH: &str = r#"
workloads:
- name: client
  namespace: default
  workloadIps: ["10.0.0.1"]
- name: db-0
  namespace: default
  workloadIps: ["10.0.0.5", "fd00::5"]
  services: {"default/db.default.svc.cluster.local": {5432: 5432}}
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.96.0.1", "/fd00::1"]
  ports: {80: 8080}
- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
  ports: {5432: 5432}
- name: wild
  namespace: default
  hostname: "*.example.com"
  vips: ["/10.96.0.3"]
  ports: {443: 443}
"#;

static MESH_STATE: LazyLock<(State, NameIndex, ResolverConfig)> = LazyLock::new(|| {
    let state = State::new(LocalConfig::parse(MESH).expect("the fixed mesh is valid"));
    let index = NameIndex::new(&state);
    (state, index, ResolverConfig::new("cluster.local"))
});

fuzz_target!(|packet: &[u8]| {
    let (state, index, config) = &*MESH_STATE;
    let known = state.workload_by_name("default", "client");
    for workload in [known, None] {
        for transport in [Transport::Udp, Transport::Tcp] {
            let client = Client { workload, network: "" };
            let input = packet.to_vec();
            match decide(config, state, index, client, &input, transport) {
                Ok(decision) => {
                    assert!(decision.limit >= wire::CLASSIC_UDP && decision.limit <= wire::MAX_MESSAGE);
                    if transport == Transport::Tcp {
                        assert_eq!(decision.limit, wire::MAX_MESSAGE);
                    }
                    match decision.outcome {
                        Outcome::Forward => assert_eq!(input, packet, "a forward leaves the packet unchanged"),
                        Outcome::Answer(answer) => {
                            assert!(answer.len() <= decision.limit, "the answer fits the client");
                            assert_eq!(answer[..2], packet[..2], "the query's id");
                            assert_eq!(wire::is_response(&answer), Some(true));
                            let question = wire::question_end(packet).expect("an answered query has a question");
                            if wire::is_truncated(&answer) {
                                assert!(answer.len() >= wire::HEADER_LEN);
                            } else {
                                assert_eq!(answer[4..6], packet[4..6], "one question");
                                assert_eq!(
                                    answer.get(12..question),
                                    packet.get(12..question),
                                    "the query's question, byte for byte"
                                );
                            }
                        }
                    }
                }
                Err(QueryError::TooShort { len }) => assert!(len < wire::HEADER_LEN && len == packet.len()),
                Err(QueryError::NotAQuery) => assert_eq!(wire::is_response(packet), Some(true)),
                Err(error @ QueryError::Malformed { .. }) => {
                    let formerr = error
                        .answer(packet)
                        .expect("a malformed query with a header is answered");
                    assert_eq!(formerr[..2], packet[..2]);
                    assert_eq!(formerr[3] & 0x0f, wire::FORMERR);
                }
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
    }
    let limit = 12 + usize::from(packet.first().copied().unwrap_or(0)) * 4;
    let cut = wire::truncate(packet.to_vec(), limit);
    if packet.len() >= wire::HEADER_LEN {
        assert!(cut.len() <= limit.max(wire::HEADER_LEN));
        assert_eq!(cut[..2], packet[..2]);
    }
});
