//! Authorization through the real proxy: an HBONE client with certificates from the mesh's CA, for
//! several identities and source addresses, opens CONNECTs to the inbound listener of a proxy serving
//! the workload `prod/server` (127.0.0.2); each policy set must give the Istio L4 answer (200 or 401)
//! for each of them. A policy change closes an established connection that a new DENY matches.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use meshwire_hbone::client::ConnectError;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::hbone::{HboneClient, spiffe};
use meshwire_tests::mesh::{Mesh, Proxy};
use meshwire_tests::net::{self, EchoServer, lo};
use meshwire_tests::policy::{self, allow, config, deny};

/// A client of the test: identity and source address.
#[derive(Debug, Clone, Copy)]
struct Peer {
    namespace: &'static str,
    service_account: &'static str,
    from: u8,
}

const FRONTEND: Peer = Peer {
    namespace: "prod",
    service_account: "frontend",
    from: 5,
};
const FRONTEND_OTHER_IP: Peer = Peer { from: 6, ..FRONTEND };
const BATCH: Peer = Peer {
    namespace: "prod",
    service_account: "batch",
    from: 5,
};
const ATTACKER: Peer = Peer {
    namespace: "evil",
    service_account: "attacker",
    from: 5,
};

struct Server<'e> {
    mesh: Mesh,
    proxy: Proxy,
    echo: &'e [EchoServer; 2],
}

fn echo_servers() -> [EchoServer; 2] {
    [EchoServer::start(lo(2)), EchoServer::start(lo(2))]
}

fn server<'e>(binary: &Binary, policies: &[String], echo: &'e [EchoServer; 2]) -> Server<'e> {
    let mesh = Mesh::new(&config(policies));
    let proxy = policy::server_proxy(&mesh, binary);
    Server { mesh, proxy, echo }
}

impl Server<'_> {
    fn client(&self, peer: Peer) -> HboneClient {
        HboneClient::new(
            self.mesh.ca(),
            &spiffe(peer.namespace, peer.service_account),
            &[spiffe("prod", "server")],
        )
        .from_ip(lo(peer.from))
    }

    /// Whether `peer` may reach echo server `port_index`: `true` on 200 (and the echo works),
    /// `false` on 401; anything else fails the test.
    fn allowed(&self, peer: Peer, port_index: usize) -> bool {
        let dst = self.echo[port_index].addr();
        match self.client(peer).open(self.proxy.ports().inbound, dst) {
            Ok(opened) => {
                assert_eq!(opened.peer, spiffe("prod", "server"));
                let echoed = net::echo_exchange(opened.stream, 1024).unwrap();
                assert!(echoed.intact(), "{peer:?}: {echoed:?}");
                true
            }
            Err(ConnectError::Refused { status, .. }) if status.as_u16() == 401 => false,
            Err(other) => panic!("{peer:?} -> {dst}: unexpected {other}\n{}", self.proxy.describe()),
        }
    }
}

/// One policy set and what it must answer.
struct Case {
    name: &'static str,
    policies: Vec<String>,
    /// (peer, echo server index, allowed)
    expect: Vec<(Peer, usize, bool)>,
}

fn cases(ports: [u16; 2]) -> Vec<Case> {
    let [p0, _] = ports;
    vec![
        Case {
            name: "no policy allows everyone",
            policies: vec![],
            expect: vec![(FRONTEND, 0, true), (ATTACKER, 1, true)],
        },
        Case {
            name: "allow one principal",
            policies: vec![allow("allow", "principals: [!Exact cluster.local/ns/prod/sa/frontend]")],
            expect: vec![(FRONTEND, 0, true), (BATCH, 0, false), (ATTACKER, 0, false)],
        },
        Case {
            name: "allow a principal prefix",
            policies: vec![allow("allow", "principals: [!Prefix cluster.local/ns/prod/]")],
            expect: vec![(FRONTEND, 0, true), (BATCH, 0, true), (ATTACKER, 0, false)],
        },
        Case {
            name: "allow a principal suffix and presence",
            policies: vec![
                allow("suffix", "principals: [!Suffix /sa/batch]"),
                deny("present", "notPrincipals: [!Presence []]"),
            ],
            expect: vec![(BATCH, 0, true), (FRONTEND, 0, false)],
        },
        Case {
            name: "deny a namespace",
            policies: vec![deny("deny", "namespaces: [!Exact evil]")],
            expect: vec![(FRONTEND, 0, true), (ATTACKER, 0, false)],
        },
        Case {
            name: "deny wins over allow",
            policies: vec![
                allow("allow-prod", "namespaces: [!Exact prod]"),
                deny("deny-batch", "principals: [!Suffix /sa/batch]"),
            ],
            expect: vec![(FRONTEND, 0, true), (BATCH, 0, false), (ATTACKER, 0, false)],
        },
        Case {
            name: "not namespaces",
            policies: vec![allow("allow", "notNamespaces: [!Exact evil]")],
            expect: vec![(FRONTEND, 0, true), (ATTACKER, 0, false)],
        },
        Case {
            name: "service accounts and their not form",
            policies: vec![
                allow(
                    "allow",
                    "serviceAccounts: [{namespace: prod, serviceAccount: frontend}, {namespace: prod, serviceAccount: batch}]",
                ),
                deny(
                    "deny",
                    "notServiceAccounts: [{namespace: prod, serviceAccount: frontend}], namespaces: [!Exact prod]",
                ),
            ],
            expect: vec![(FRONTEND, 0, true), (BATCH, 0, false), (ATTACKER, 0, false)],
        },
        Case {
            name: "source CIDR",
            policies: vec![allow("allow", "sourceIps: [127.0.0.5/32]")],
            expect: vec![(FRONTEND, 0, true), (FRONTEND_OTHER_IP, 0, false)],
        },
        Case {
            name: "not source CIDR",
            policies: vec![deny("deny", "notSourceIps: [127.0.0.5/32]")],
            expect: vec![(FRONTEND, 0, true), (FRONTEND_OTHER_IP, 0, false)],
        },
        Case {
            name: "destination port",
            policies: vec![allow("allow", &format!("destinationPorts: [{p0}]"))],
            expect: vec![(FRONTEND, 0, true), (FRONTEND, 1, false)],
        },
        Case {
            name: "not destination port",
            policies: vec![deny("deny", &format!("notDestinationPorts: [{p0}]"))],
            expect: vec![(FRONTEND, 0, true), (FRONTEND, 1, false)],
        },
        Case {
            name: "destination CIDR and its not form",
            policies: vec![
                allow("allow", "destinationIps: [127.0.0.0/24]"),
                deny("deny", "notDestinationIps: [127.0.0.2/32]"),
            ],
            expect: vec![(FRONTEND, 0, true)],
        },
        Case {
            name: "destination CIDR that does not match",
            policies: vec![allow("allow", "destinationIps: [10.0.0.0/8]")],
            expect: vec![(FRONTEND, 0, false)],
        },
        Case {
            name: "fields of a match are AND-ed",
            policies: vec![allow(
                "allow",
                &format!("principals: [!Exact cluster.local/ns/prod/sa/frontend], destinationPorts: [{p0}]"),
            )],
            expect: vec![(FRONTEND, 0, true), (FRONTEND, 1, false), (BATCH, 0, false)],
        },
        Case {
            name: "dry-run policies are not enforced",
            policies: vec![
                policy::policy(
                    "would-deny",
                    "Deny",
                    true,
                    "principals: [!Exact cluster.local/ns/prod/sa/frontend]",
                ),
                policy::policy(
                    "would-allow-only-batch",
                    "Allow",
                    true,
                    "principals: [!Suffix /sa/batch]",
                ),
            ],
            expect: vec![(FRONTEND, 0, true), (ATTACKER, 0, true)],
        },
    ]
}

#[test]
fn policies_give_the_istio_answers() {
    for binary in binary::all() {
        let echo = echo_servers();
        let ports = [echo[0].addr().port(), echo[1].addr().port()];
        for case in cases(ports) {
            let server = server(&binary, &case.policies, &echo);
            for (peer, port, expected) in &case.expect {
                let allowed = server.allowed(*peer, *port);
                assert_eq!(
                    allowed,
                    *expected,
                    "{binary}, {}: {peer:?} to port {} should be {}\n{}",
                    case.name,
                    ports[*port],
                    if *expected { "allowed" } else { "denied" },
                    server.proxy.describe()
                );
            }
            if case.name.starts_with("dry-run") {
                assert!(
                    server.proxy.log().contains("dry-run"),
                    "dry-run outcomes are logged\n{}",
                    server.proxy.describe()
                );
            }
        }
    }
}

#[test]
fn a_denied_connection_is_logged_and_counted_as_such() {
    for binary in binary::all() {
        let echo = echo_servers();
        let server = server(&binary, &[deny("deny", "namespaces: [!Exact evil]")], &echo);
        assert!(!server.allowed(ATTACKER, 0));
        let lines = server.proxy.wait_access_lines("inbound", 1, Duration::from_secs(5));
        assert_eq!(lines.len(), 1, "{}", server.proxy.describe());
        assert_eq!(
            lines[0].get("src.identity"),
            Some("spiffe://cluster.local/ns/evil/sa/attacker")
        );
        assert!(
            lines[0].get("error").is_some_and(|e| e.contains("denied")),
            "{:?}",
            lines[0]
        );
    }
}

#[test]
fn a_new_deny_closes_an_established_connection() {
    for binary in binary::all() {
        let echo = echo_servers();
        let server = server(&binary, &[], &echo);
        let dst = server.echo[0].addr();
        let opened = server.client(FRONTEND).open(server.proxy.ports().inbound, dst).unwrap();
        let mut stream = opened.stream;
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        stream.write_all(b"before\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "before\n");

        // A connection of another identity stays open.
        let other = server.client(BATCH).open(server.proxy.ports().inbound, dst).unwrap();

        server.mesh.write_config(&config(&[deny(
            "deny-frontend",
            "principals: [!Exact cluster.local/ns/prod/sa/frontend]",
        )]));
        // The proxy polls the file every second; then the connection is closed: reads end.
        let started = Instant::now();
        let mut rest = Vec::new();
        let outcome = reader.read_to_end(&mut rest);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the denied connection was not closed\n{}",
            server.proxy.describe()
        );
        assert!(rest.is_empty() || outcome.is_err(), "{outcome:?} {rest:?}");
        assert!(!server.allowed(FRONTEND, 0), "new connections are denied too");

        let echoed = net::echo_exchange(other.stream, 4096).unwrap();
        assert!(
            echoed.intact(),
            "the connection of another identity still works: {echoed:?}"
        );
        let closed = server
            .proxy
            .wait_for_log(&["direction=\"inbound\"", "closed by policy"], Duration::from_secs(5));
        assert!(closed.is_some(), "{}", server.proxy.describe());
    }
}
