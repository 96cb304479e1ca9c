//! The DNS proxy of both binaries on real sockets: mesh names answered locally (service hostname,
//! short names, search domains, AAAA of an IPv4 service), everything else forwarded to a fake
//! upstream byte for byte (A, SRV, TXT, UPDATE), a large answer cut with TC over UDP and whole over
//! TCP, SERVFAIL when the upstream is down, the `istio_dns_*` metrics, and tens of thousands of
//! forwarded queries answered by one server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshwire_testkit::dns::{self, FakeDns};
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::mesh::{Mesh, Proxy, metric_sum};
use meshwire_tests::net::{self, lo};

const MESH: &str = r#"
workloads:
  - uid: cluster1//v1/Pod/default/client
    name: client
    namespace: default
    serviceAccount: client
    workloadIps: ["127.0.0.1"]
    protocol: HBONE
    canonicalName: client-app
  - uid: cluster1//v1/Pod/default/server
    name: server
    namespace: default
    serviceAccount: server
    workloadIps: ["127.0.0.2"]
    protocol: HBONE
    services:
      "default/server.default.svc.cluster.local":
        80: 8080
services:
  - name: server
    namespace: default
    hostname: server.default.svc.cluster.local
    vips: ["/10.96.0.10"]
    ports:
      80: 8080
  - name: other
    namespace: ns2
    hostname: other.ns2.svc.cluster.local
    vips: ["/10.96.0.20"]
    ports:
      80: 8080
"#;

/// A proxy of `binary` with its DNS proxy on 127.0.0.1, forwarding to `upstream`.
struct Setup {
    _mesh: Mesh,
    _dir: tempfile::TempDir,
    proxy: Proxy,
    dns: SocketAddr,
}

fn start(binary: &Binary, upstream: SocketAddr) -> Setup {
    let mesh = Mesh::new(MESH);
    let dir = tempfile::tempdir().unwrap();
    let resolv_conf: PathBuf = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        format!("nameserver {upstream}\nsearch example.internal\n"),
    )
    .unwrap();
    let dns = SocketAddr::new(lo(1), net::free_ports(1)[0]);
    let proxy = mesh.proxy(binary, lo(1)).dns(dns, &resolv_conf).spawn();
    Setup {
        _mesh: mesh,
        _dir: dir,
        proxy,
        dns,
    }
}

/// The addresses and CNAME targets of an answer, in order.
fn records(message: &Message) -> Vec<String> {
    message
        .answers()
        .iter()
        .map(|r| format!("{} {}", r.name(), r.data()))
        .collect()
}

fn upstream_a(query: &[u8]) -> Option<Vec<u8>> {
    let parsed = Message::from_vec(query).ok()?;
    let name = parsed.queries().first()?.name().clone();
    let record = Record::from_rdata(name, 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));
    Some(dns::answer(query, vec![record]))
}

#[test]
fn mesh_names_are_answered_locally() {
    let upstream = FakeDns::start(upstream_a).unwrap();
    for binary in binary::all() {
        let setup = start(&binary, upstream.addr());
        let cases: &[(&str, RecordType, &[&str])] = &[
            (
                "server.default.svc.cluster.local.",
                RecordType::A,
                &["server.default.svc.cluster.local. 10.96.0.10"],
            ),
            ("server.", RecordType::A, &["server. 10.96.0.10"]),
            ("server.default.", RecordType::A, &["server.default. 10.96.0.10"]),
            (
                "server.default.svc.",
                RecordType::A,
                &["server.default.svc. 10.96.0.10"],
            ),
            ("other.ns2.", RecordType::A, &["other.ns2. 10.96.0.20"]),
            // A name the client's resolver completed with a search domain: a CNAME to the name found.
            (
                "server.default.default.svc.cluster.local.",
                RecordType::A,
                &[
                    "server.default.default.svc.cluster.local. server.default.",
                    "server.default. 10.96.0.10",
                ],
            ),
            // The service has no IPv6 VIP: the name exists, with no AAAA record.
            ("server.default.svc.cluster.local.", RecordType::AAAA, &[]),
        ];
        for (id, (name, record_type, expected)) in (1u16..).zip(cases) {
            for over_tcp in [false, true] {
                let query = dns::query(id, name, *record_type, None);
                let answer = if over_tcp {
                    dns::tcp_exchange(setup.dns, &query)
                } else {
                    dns::udp_exchange(setup.dns, &query)
                }
                .unwrap_or_else(|e| panic!("{binary}: {name}: {e}\n{}", setup.proxy.describe()));
                let answer = dns::parse(&answer);
                assert_eq!(answer.id(), id, "{binary}: {name}");
                assert_eq!(answer.response_code(), ResponseCode::NoError, "{binary}: {name}");
                assert!(answer.authoritative(), "{binary}: {name} answered locally");
                assert_eq!(answer.queries()[0].name().to_ascii(), *name);
                assert_eq!(records(&answer), *expected, "{binary}: {name} {record_type}");
            }
        }
        // Not one of those reached the upstream.
        assert!(upstream.received().is_empty(), "{binary}: {:?}", upstream.received());
        let text = setup.proxy.wait_metric("istio_dns_requests_total", &[], 14);
        assert_eq!(metric_sum(&text, "istio_dns_requests_total", &[]), 14, "{text}");
        assert_eq!(
            metric_sum(
                &text,
                "istio_dns_requests_total",
                &[
                    "request_query_type=\"a\"",
                    "request_protocol=\"udp\"",
                    "source_canonical_service=\"client-app\""
                ]
            ),
            6,
            "{text}"
        );
        assert_eq!(metric_sum(&text, "istio_dns_upstream_requests_total", &[]), 0, "{text}");
    }
}

#[test]
fn other_names_and_types_are_forwarded_byte_for_byte() {
    let upstream = FakeDns::start(|query| {
        let parsed = Message::from_vec(query).ok()?;
        let question = parsed.queries().first()?.clone();
        let name = question.name().clone();
        let rdata = match question.query_type() {
            RecordType::SRV => RData::SRV(SRV::new(10, 5, 5060, Name::from_ascii("sip.example.").ok()?)),
            RecordType::TXT => RData::TXT(TXT::new(vec!["v=spf1 -all".to_owned()])),
            _ => RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        };
        Some(dns::answer(query, vec![Record::from_rdata(name, 60, rdata)]))
    })
    .unwrap();
    for binary in binary::all() {
        let setup = start(&binary, upstream.addr());
        let before = upstream.received().len();
        let mut update = Message::new();
        update
            .set_id(77)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Update)
            .add_query(Query::query(Name::from_ascii("example.org.").unwrap(), RecordType::SOA));
        let queries = [
            dns::query(101, "forwarded.example.", RecordType::A, None),
            dns::query(102, "_sip._udp.example.", RecordType::SRV, Some(1232)),
            dns::query(103, "example.", RecordType::TXT, None),
            // A mesh name of a type the proxy does not answer.
            dns::query(104, "server.default.svc.cluster.local.", RecordType::TXT, None),
            update.to_vec().unwrap(),
        ];
        for (i, query) in queries.iter().enumerate() {
            let over_tcp = i % 2 == 1;
            let answer = if over_tcp {
                dns::tcp_exchange(setup.dns, query)
            } else {
                dns::udp_exchange(setup.dns, query)
            }
            .unwrap_or_else(|e| panic!("{binary}: query {i}: {e}\n{}", setup.proxy.describe()));
            let received = upstream.received();
            let last = received.last().unwrap();
            assert_eq!(received.len(), before + i + 1, "{binary}");
            assert_eq!(&last.query, query, "{binary}: query {i} reached the upstream unchanged");
            assert_eq!(last.transport, if over_tcp { "tcp" } else { "udp" }, "{binary}");
            assert!(
                Some(&answer) == last.answer.as_ref(),
                "{binary}: answer {i} came back unchanged"
            );
        }
        let srv = dns::parse(&dns::udp_exchange(setup.dns, &queries[1]).unwrap());
        assert_eq!(records(&srv), ["_sip._udp.example. 10 5 5060 sip.example."]);

        let text = setup.proxy.wait_metric("istio_dns_upstream_requests_total", &[], 6);
        assert_eq!(metric_sum(&text, "istio_dns_upstream_requests_total", &[]), 6, "{text}");
        assert_eq!(
            metric_sum(
                &text,
                "istio_dns_upstream_requests_total",
                &["request_query_type=\"srv\""]
            ),
            2,
            "{text}"
        );
        assert_eq!(metric_sum(&text, "istio_dns_requests_total", &[]), 6, "{text}");
        assert_eq!(metric_sum(&text, "istio_dns_upstream_failures_total", &[]), 0, "{text}");
        assert_eq!(
            metric_sum(&text, "istio_dns_upstream_request_duration_seconds_count", &[]),
            6,
            "{text}"
        );
    }
}

#[test]
fn a_large_answer_is_cut_with_tc_over_udp_and_whole_over_tcp() {
    let upstream = FakeDns::start(|query| {
        let parsed = Message::from_vec(query).ok()?;
        let name = parsed.queries().first()?.name().clone();
        let records = (0..40)
            .map(|i| {
                Record::from_rdata(
                    name.clone(),
                    60,
                    RData::TXT(TXT::new(vec![format!("{i:03}{}", "x".repeat(97))])),
                )
            })
            .collect();
        // Whatever the transport: an upstream that ignores the client's size.
        Some(dns::answer(query, records))
    })
    .unwrap();
    for binary in binary::all() {
        let setup = start(&binary, upstream.addr());
        let query = dns::query(4242, "large.example.", RecordType::TXT, None);
        let cut = dns::udp_exchange(setup.dns, &query).unwrap();
        assert!(cut.len() <= 512, "{binary}: {} bytes", cut.len());
        let cut = dns::parse(&cut);
        assert_eq!(cut.id(), 4242);
        assert!(cut.truncated(), "{binary}: TC set");
        assert_eq!(cut.queries()[0].name().to_ascii(), "large.example.");
        // An EDNS client with room for it gets it whole over UDP.
        let big = dns::query(4243, "large.example.", RecordType::TXT, Some(8192));
        let whole_udp = dns::parse(&dns::udp_exchange(setup.dns, &big).unwrap());
        assert!(!whole_udp.truncated());
        assert_eq!(whole_udp.answers().len(), 40);

        let whole = dns::tcp_exchange(setup.dns, &query).unwrap();
        assert!(
            Some(&whole) == upstream.received().last().unwrap().answer.as_ref(),
            "{binary}: unchanged over TCP"
        );
        let whole = dns::parse(&whole);
        assert!(!whole.truncated());
        assert_eq!(whole.answers().len(), 40, "{binary}");
    }
}

#[test]
fn servfail_when_the_upstream_is_down() {
    // A port nothing listens on (neither UDP nor TCP).
    let closed = {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket.local_addr().unwrap()
    };
    for binary in binary::all() {
        let setup = start(&binary, closed);
        let query = dns::query(9, "unknown.example.", RecordType::A, None);
        for over_tcp in [false, true] {
            let answer = if over_tcp {
                dns::tcp_exchange(setup.dns, &query)
            } else {
                dns::udp_exchange(setup.dns, &query)
            }
            .unwrap_or_else(|e| panic!("{binary}: {e}\n{}", setup.proxy.describe()));
            let answer = dns::parse(&answer);
            assert_eq!(answer.id(), 9);
            assert_eq!(
                answer.response_code(),
                ResponseCode::ServFail,
                "{binary} (tcp: {over_tcp})"
            );
            assert_eq!(answer.queries()[0].name().to_ascii(), "unknown.example.");
        }
        // Mesh names are still answered.
        let local = dns::parse(&dns::udp_exchange(setup.dns, &dns::query(10, "server.", RecordType::A, None)).unwrap());
        assert_eq!(records(&local), ["server. 10.96.0.10"]);
        assert_eq!(local.queries()[0].name().to_ascii(), "server.");
        let text = setup.proxy.wait_metric("istio_dns_upstream_failures_total", &[], 2);
        assert_eq!(metric_sum(&text, "istio_dns_upstream_failures_total", &[]), 2, "{text}");
        assert_eq!(
            metric_sum(
                &text,
                "istio_dns_upstream_failures_total",
                &["request_protocol=\"tcp\""]
            ),
            1,
            "{text}"
        );
    }
}

/// Forwarded queries sent one after the other on one client socket (so to one server: one core of
/// `ztunnel-uring`): more than glommio's 16-bit task reference count holds, each query waking the
/// server's task at least once.
const MANY_FORWARDS: u16 = 40_000;

#[test]
fn forty_thousand_forwarded_queries_are_all_answered() {
    // ztunnel-uring stopped answering after about 32,767 wake-ups of a core's DNS task: glommio kept
    // a clone of the task's waker for every poll of the pending TCP accept (polled with the UDP loop
    // in one task), until the task's reference count overflowed and its wake-up panicked.
    let upstream = FakeDns::start(upstream_a).unwrap();
    for binary in binary::all() {
        let setup = start(&binary, upstream.addr());
        let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        client.connect(setup.dns).unwrap();
        // A bound on a stalled server, not a timing check: the answer of a live one takes far less.
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0; 65_535];
        for i in 0..MANY_FORWARDS {
            let id = i.wrapping_mul(7919);
            let query = dns::query(id, &format!("host-{}.example.", i % 1000), RecordType::A, None);
            client.send(&query).unwrap();
            let len = client.recv(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "{binary}: query {i} of {MANY_FORWARDS}: {e}\n{}",
                    setup.proxy.describe()
                )
            });
            let answer = dns::parse(&buf[..len]);
            assert_eq!(answer.id(), id, "{binary}: query {i}");
            assert_eq!(answer.response_code(), ResponseCode::NoError, "{binary}: query {i}");
            assert_eq!(
                records(&answer),
                [format!("host-{}.example. 192.0.2.1", i % 1000)],
                "{binary}: query {i}"
            );
        }
        // The server still answers the other ways: over TCP, and locally.
        let tcp =
            dns::parse(&dns::tcp_exchange(setup.dns, &dns::query(1, "last.example.", RecordType::A, None)).unwrap());
        assert_eq!(records(&tcp), ["last.example. 192.0.2.1"], "{binary}");
        let local = dns::parse(&dns::udp_exchange(setup.dns, &dns::query(2, "server.", RecordType::A, None)).unwrap());
        assert_eq!(records(&local), ["server. 10.96.0.10"], "{binary}");
        let forwarded = u64::from(MANY_FORWARDS) + 1;
        let text = setup
            .proxy
            .wait_metric("istio_dns_upstream_requests_total", &[], forwarded);
        assert_eq!(
            metric_sum(&text, "istio_dns_upstream_requests_total", &[]),
            forwarded,
            "{binary}"
        );
        assert_eq!(
            metric_sum(&text, "istio_dns_upstream_failures_total", &[]),
            0,
            "{binary}"
        );
    }
}
