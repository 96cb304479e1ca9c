//! Bad input gets its documented answer and the proxy keeps serving everyone else: an invalid change
//! of the local configuration (the old state stays), broken SOCKS5 handshakes, CONNECTs with a wrong
//! authority, and clients whose certificates the mesh does not trust.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use meshwire_hbone::client::ConnectError;
use meshwire_hbone::headers::Authority;
use meshwire_identity::id::TrustDomain;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_tests::binary;
use meshwire_tests::hbone::{HboneClient, spiffe};
use meshwire_tests::net::{self, Socks5Failure, Socks5Target, lo};
use meshwire_tests::pair::{self, ECHO_VIP, Pair};

#[test]
fn an_invalid_config_change_is_rejected_and_the_old_state_kept() {
    for (a, b) in binary::pairs() {
        let s = Pair::start(&a, &b);
        s.mesh
            .write_config("workloads:\n  - name: broken\n    workloadIps: [\"not-an-ip\"]\n");
        let rejected = s
            .client
            .wait_for_log(&["rejected an invalid change"], Duration::from_secs(10));
        let rejected = rejected.unwrap_or_else(|| panic!("no rejection logged\n{}", s.logs()));
        assert!(rejected.contains("workloads[0].workloadIps[0]"), "{rejected}");
        s.still_serves("after an invalid change", 32 * 1024);
        // The service VIP of the old state still resolves.
        let stream = s.socks5(Socks5Target::Addr(Pair::vip()));
        assert!(net::echo_exchange(stream, 1024).unwrap().intact());

        // A valid change afterwards applies: the service is gone, its VIP now passes through.
        s.mesh.write_config(
            &pair::config(s.echo.addr().port(), "").replace(&format!("vips: [\"/{ECHO_VIP}\"]"), "vips: []"),
        );
        assert!(
            s.client
                .wait_for_log(&["applied a change"], Duration::from_secs(10))
                .is_some(),
            "{}",
            s.logs()
        );
    }
}

#[test]
fn broken_socks5_handshakes_get_their_replies() {
    for (a, b) in binary::pairs() {
        let s = Pair::start(&a, &b);
        let socks = s.client.ports().socks5;
        // SOCKS4: no reply, closed.
        assert_eq!(
            net::raw_exchange(socks, &[4, 1, 0, 80, 127, 0, 0, 2, 0]),
            Vec::<u8>::new()
        );
        // No acceptable method (only username/password offered): 0xFF.
        assert_eq!(net::raw_exchange(socks, &[5, 1, 2]), vec![5, 0xff]);
        // BIND: command not supported (7).
        let answer = net::raw_exchange(socks, &[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 2, 0, 80]);
        assert_eq!(answer[..2], [5, 0], "{answer:?}");
        assert_eq!(answer[2..4], [5, 7], "{answer:?}");
        // Address type 9: not supported (8).
        let answer = net::raw_exchange(socks, &[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4]);
        assert_eq!(answer[2..4], [5, 8], "{answer:?}");
        // A client that vanishes mid-handshake.
        drop(net::raw_exchange(socks, &[5, 1]));
        // A name that no service has: host unreachable (4).
        let failure = net::socks5_connect(socks, &Socks5Target::Domain("nowhere.example".into(), 80)).unwrap_err();
        assert_eq!(failure, Socks5Failure::Reply(4));
        s.still_serves("after broken SOCKS5 handshakes", 32 * 1024);
    }
}

#[test]
fn connects_with_a_wrong_authority_get_400_or_503() {
    for binary in binary::all() {
        let s = Pair::start(&binary, &binary);
        let inbound = s.server.ports().inbound;
        let client = HboneClient::new(
            s.mesh.ca(),
            &spiffe("default", "client"),
            &[spiffe("default", "server")],
        );
        let status = |result: Result<_, ConnectError>| match result {
            Ok(_) => panic!("accepted"),
            Err(e) => e.status().map(|s| s.as_u16()).unwrap_or_else(|| panic!("{e}")),
        };
        // An IP other than the one the connection arrived on.
        let other_ip: SocketAddr = SocketAddr::new(lo(1), s.echo.addr().port());
        assert_eq!(status(client.open(inbound, other_ip)), 400);
        // A host name no service of the workload has, and a port its service lacks (its service's
        // hostname and port are served: see multinetwork.rs).
        for name in [
            "nowhere.default.svc.cluster.local:80",
            "echo.default.svc.cluster.local:81",
        ] {
            let name = Authority::parse(name).unwrap();
            assert_eq!(status(client.open_authority(inbound, name)), 400);
        }
        // One of the proxy's own ports: a loop.
        assert_eq!(status(client.open(inbound, inbound)), 503);
        let admin_port = SocketAddr::new(lo(2), s.server.ports().metrics.port());
        assert_eq!(status(client.open(inbound, admin_port)), 503);
        // Nothing listening there.
        let closed = SocketAddr::new(lo(2), net::free_ports(1)[0]);
        assert_eq!(status(client.open(inbound, closed)), 503);
        // And the right one works.
        let opened = client.open(inbound, s.echo.addr()).unwrap();
        assert!(net::echo_exchange(opened.stream, 1024).unwrap().intact());
        s.still_serves("after wrong authorities", 32 * 1024);
    }
}

#[test]
fn clients_with_untrusted_certificates_are_refused() {
    for binary in binary::all() {
        let s = Pair::start(&binary, &binary);
        let inbound = s.server.ports().inbound;
        let foreign = LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap();
        let credentials = foreign.issue(&spiffe("default", "client")).unwrap();
        // The client must trust the mesh's server to get as far as presenting its certificate.
        let mut credentials = credentials;
        credentials.bundles = s.mesh.ca().bundle_set().clone();
        let client = HboneClient::with_credentials(&credentials, &[spiffe("default", "server")]);
        let error = client.open(inbound, s.echo.addr()).unwrap_err();
        assert!(
            matches!(error, ConnectError::Tls { .. } | ConnectError::Http2 { .. }),
            "untrusted client: {error}"
        );

        // A client of another trust domain, with a certificate from the mesh's own CA bundle: refused too.
        let other_td = LocalCa::ephemeral(TrustDomain::new("other.domain").unwrap()).unwrap();
        let other = other_td
            .issue(&meshwire_identity::id::SpiffeId::new("spiffe://other.domain/ns/default/sa/client").unwrap())
            .unwrap();
        let mut other = other;
        other.bundles = s.mesh.ca().bundle_set().clone();
        let client = HboneClient::with_credentials(&other, &[spiffe("default", "server")]);
        assert!(client.open(inbound, s.echo.addr()).is_err());

        // A client expecting another identity refuses the server (and says why).
        let suspicious = HboneClient::new(s.mesh.ca(), &spiffe("default", "client"), &[spiffe("default", "db")]);
        let error = suspicious.open(inbound, s.echo.addr()).unwrap_err();
        assert!(
            error.to_string().contains("sa/db") || format!("{error:?}").contains("sa/db"),
            "{error}"
        );

        assert!(
            s.server
                .wait_for_log(
                    &[
                        "\twarn\taccess\tconnection failed\t",
                        "direction=\"inbound\"",
                        "TLS handshake failed"
                    ],
                    Duration::from_secs(5)
                )
                .is_some(),
            "the refusal is logged\n{}",
            s.server.describe()
        );
        s.still_serves("after untrusted clients", 32 * 1024);
    }
}
