//! Multi-network (Istio ambient multi-network): a client on network `net-a` reaches a server on
//! network `net-b` by double HBONE through the east-west gateway of `net-b`, for every proxy binary.
//!
//! - `client` (`default/client/client`) on 127.0.0.1, network `net-a`, served by a proxy started
//!   with `--network net-a`, which takes SOCKS5;
//! - `server` (`default/server/server`) on 127.0.0.2, network `net-b`, with
//!   `networkGateway: net-b/127.0.0.4`, served by a proxy with `--network net-b`; an echo server on
//!   127.0.0.2 is the target of the service `echo`, whose only VIP is in `net-a`;
//! - in some scenarios, a second endpoint of `echo`: `server2` (`default/server2/server2`, another
//!   service account) on 127.0.0.3, behind the same gateway, with its own proxy and echo server;
//! - the east-west gateway of `net-b` on 127.0.0.4 (the workload `istio-system/eastwest`): it
//!   terminates the outer tunnel and splices it, by the CONNECT's `<service hostname>:<port>`, to
//!   the HBONE port of one endpoint's proxy (`server`'s, or `server2`'s when there is one), whichever
//!   endpoint the client's proxy chose (`meshwire_tests::gateway`; a meshwire proxy cannot be a
//!   gateway, see there);
//! - `stranded` on 127.0.0.5, network `net-b` without a gateway: the only endpoint of the service
//!   `stranded`, which is thus unreachable from `net-a`.
//!
//! Both CONNECTs name the service (`echo.default.svc.cluster.local:80`), as ztunnel sends them;
//! the proxy of the endpoint the gateway chose resolves the inner one to its own workload.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use meshwire_hbone::client::ConnectError;
use meshwire_hbone::headers::Authority;
use meshwire_testkit::pki::server_config;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::gateway::EastWestGateway;
use meshwire_tests::hbone::{HboneClient, spiffe};
use meshwire_tests::mesh::{Mesh, Proxy};
use meshwire_tests::net::{self, EchoServer, Socks5Failure, Socks5Target, lo};
use meshwire_tests::policy::namespace_policy;

const ECHO_HOST: &str = "echo.default.svc.cluster.local";
const ECHO_VIP: &str = "127.10.0.29";
const STRANDED_VIP: &str = "127.10.0.30";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const SERVER2_ID: &str = "spiffe://cluster.local/ns/default/sa/server2";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest-gateway";

/// What a scenario has besides the client, `server`, the gateway and `stranded`.
#[derive(Debug, Clone, Default)]
struct Options {
    /// A second endpoint of `echo`, `server2`, to which the gateway routes the service.
    second_endpoint: bool,
    /// Items of the `policies:` list.
    policies: Vec<String>,
}

/// The configuration: `echo_ports` the ports of the echo servers of `server` and (if there is a
/// second) `server2`.
fn config(echo_ports: &[u16], gateway_port: u16, policies: &[String]) -> String {
    let echo_port = echo_ports[0];
    let server2 = match echo_ports.get(1) {
        Some(port) => format!(
            r#"
  - uid: cluster2//v1/Pod/default/server2
    name: server2
    namespace: default
    serviceAccount: server2
    workloadIps: ["127.0.0.3"]
    protocol: HBONE
    node: node-b2
    network: net-b
    networkGateway: {{destination: "net-b/127.0.0.4", hboneMtlsPort: {gateway_port}}}
    services:
      "default/{ECHO_HOST}":
        80: {port}"#
        ),
        None => String::new(),
    };
    let policies = if policies.is_empty() {
        String::new()
    } else {
        format!("policies:{}", policies.concat())
    };
    format!(
        r#"
workloads:
  - uid: cluster1//v1/Pod/default/client
    name: client
    namespace: default
    serviceAccount: client
    workloadIps: ["127.0.0.1"]
    protocol: HBONE
    node: node-a
    network: net-a
  - uid: cluster2//v1/Pod/default/server
    name: server
    namespace: default
    serviceAccount: server
    workloadIps: ["127.0.0.2"]
    protocol: HBONE
    node: node-b
    network: net-b
    networkGateway: {{destination: "net-b/127.0.0.4", hboneMtlsPort: {gateway_port}}}
    services:
      "default/{ECHO_HOST}":
        80: {echo_port}{server2}
  - uid: cluster2//v1/Pod/istio-system/eastwest
    name: eastwest
    namespace: istio-system
    serviceAccount: eastwest-gateway
    workloadIps: ["127.0.0.4"]
    protocol: HBONE
    node: node-gw
    network: net-b
  - uid: cluster2//v1/Pod/default/stranded
    name: stranded
    namespace: default
    serviceAccount: stranded
    workloadIps: ["127.0.0.5"]
    protocol: HBONE
    node: node-c
    network: net-b
    services:
      "default/stranded.default.svc.cluster.local":
        80: {echo_port}
services:
  - name: echo
    namespace: default
    hostname: {ECHO_HOST}
    vips: ["net-a/{ECHO_VIP}"]
    ports:
      80: {echo_port}
  - name: stranded
    namespace: default
    hostname: stranded.default.svc.cluster.local
    vips: ["net-a/{STRANDED_VIP}"]
    ports:
      80: {echo_port}
{policies}
"#
    )
}

/// The scenario for `binary` (both proxies): the mesh, the proxies, the gateway and the echo servers.
struct MultiNetwork {
    mesh: Mesh,
    client: Proxy,
    server: Proxy,
    echo: EchoServer,
    /// `server2`'s proxy and echo server, with [`Options::second_endpoint`].
    second: Option<(Proxy, EchoServer)>,
    gateway: EastWestGateway,
}

impl MultiNetwork {
    fn start(binary: &Binary) -> MultiNetwork {
        Self::start_with(binary, &Options::default())
    }

    fn start_with(binary: &Binary, options: &Options) -> MultiNetwork {
        let echo = EchoServer::start(lo(2));
        let echo2 = options.second_endpoint.then(|| EchoServer::start(lo(3)));
        let echo_ports: Vec<u16> = [Some(&echo), echo2.as_ref()]
            .into_iter()
            .flatten()
            .map(|echo| echo.addr().port())
            .collect();
        // The gateway's routes need the mesh's HBONE port, and the configuration the gateway's port.
        let mesh = Mesh::new(&config(&echo_ports, 15008, &options.policies));
        let routed_to = if options.second_endpoint { lo(3) } else { lo(2) };
        let routes = HashMap::from([(format!("{ECHO_HOST}:80"), SocketAddr::new(routed_to, mesh.hbone_port()))]);
        let gateway = EastWestGateway::start(lo(4), server_config(mesh.ca(), GATEWAY_ID), routes);
        mesh.write_config(&config(&echo_ports, gateway.addr().port(), &options.policies));
        let server = mesh
            .proxy(binary, lo(2))
            .dedicated("default/server/server")
            .arg("--network")
            .arg("net-b")
            .spawn();
        let second = echo2.map(|echo2| {
            let proxy = mesh
                .proxy(binary, lo(3))
                .dedicated("default/server2/server2")
                .arg("--network")
                .arg("net-b")
                .spawn();
            (proxy, echo2)
        });
        let client = mesh
            .proxy(binary, lo(1))
            .dedicated("default/client/client")
            .arg("--network")
            .arg("net-a")
            .spawn();
        MultiNetwork {
            mesh,
            client,
            server,
            echo,
            second,
            gateway,
        }
    }

    fn logs(&self) -> String {
        let second = self
            .second
            .as_ref()
            .map(|(proxy, _)| proxy.describe())
            .unwrap_or_default();
        format!(
            "{}\n{}\n{second}\ngateway saw: {:?}",
            self.client.describe(),
            self.server.describe(),
            self.gateway.seen()
        )
    }

    /// An HBONE client of `identity` (`default/<service account>`) that accepts `server`'s identity.
    fn hbone_client(&self, service_account: &str) -> HboneClient {
        HboneClient::new(
            self.mesh.ca(),
            &spiffe("default", service_account),
            &[spiffe("default", "server")],
        )
    }

    /// The status of a CONNECT to `server`'s proxy (directly, not through the gateway) for
    /// `authority` by `service_account`: 200 (after an intact echo) or the refusal's.
    fn direct_status(&self, service_account: &str, authority: Authority) -> u16 {
        match self
            .hbone_client(service_account)
            .open_authority(self.server.ports().inbound, authority.clone())
        {
            Ok(opened) => {
                let echoed = net::echo_exchange(opened.stream, 1024).unwrap();
                assert!(echoed.intact(), "{authority}: {echoed:?}");
                200
            }
            Err(ConnectError::Refused { status, .. }) => status.as_u16(),
            Err(other) => panic!("{authority}: unexpected {other}\n{}", self.logs()),
        }
    }
}

fn echo_authority(port: u16) -> Authority {
    Authority::host(ECHO_HOST, port).unwrap()
}

fn vip(ip: &str) -> Socks5Target {
    Socks5Target::Addr(SocketAddr::new(ip.parse().unwrap(), 80))
}

#[test]
fn a_service_on_another_network_is_reached_by_double_hbone_through_its_gateway() {
    for binary in binary::all() {
        let mesh = MultiNetwork::start(&binary);
        let stream = net::socks5_connect(mesh.client.ports().socks5, &vip(ECHO_VIP))
            .unwrap_or_else(|e| panic!("{binary}: SOCKS5 CONNECT to the VIP: {e:?}\n{}", mesh.logs()));
        let echoed = net::echo_exchange(stream, 256 * 1024).unwrap();
        assert!(echoed.intact(), "{binary}: {echoed:?}\n{}", mesh.logs());
        assert_eq!(mesh.echo.accepted(), 1, "{binary}");

        // The gateway terminated only the outer tunnel: the client proxy's mTLS as the client, and
        // the CONNECT ztunnel sends (the service hostname and port), spliced to the server's proxy.
        let seen = mesh.gateway.seen();
        assert_eq!(seen.len(), 1, "{binary}: one outer CONNECT\n{}", mesh.logs());
        assert_eq!(seen[0].authority, format!("{ECHO_HOST}:80"));
        assert_eq!(seen[0].peer.to_string(), CLIENT_ID);
        assert_eq!(seen[0].upstream, Some(SocketAddr::new(lo(2), mesh.mesh.hbone_port())));

        // The server's proxy terminated the inner tunnel: mTLS end to end with the client's identity.
        let inbound = mesh.server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        assert_eq!(inbound.len(), 1, "{binary}: one inbound connection\n{}", mesh.logs());
        let line = &inbound[0];
        assert_eq!(line.get("src.identity"), Some(CLIENT_ID), "{binary}: {line:?}");
        assert_eq!(line.get("dst.identity"), Some(SERVER_ID), "{binary}: {line:?}");
        // The inner CONNECT named the service, as ztunnel's does; the proxy resolved it to the
        // workload's target port, where the echo server got the connection.
        assert_eq!(
            line.get("dst.hbone_addr"),
            Some("echo.default.svc.cluster.local:80"),
            "{line:?}"
        );
        // As ztunnel: `dst.addr` is the HBONE address the inner connection arrived on.
        assert_eq!(
            line.get("dst.addr"),
            Some(SocketAddr::new(lo(2), mesh.mesh.hbone_port()).to_string().as_str()),
            "{line:?}"
        );
        assert_eq!(line.get("dst.service"), Some(ECHO_HOST), "{line:?}");
        assert_eq!(line.number("bytes_recv"), Some(256 * 1024), "{binary}: {line:?}");

        // The client's proxy logged the gateway as where it connected, the service as the target.
        let outbound = mesh.client.wait_access_lines("outbound", 1, Duration::from_secs(10));
        assert_eq!(outbound.len(), 1, "{binary}\n{}", mesh.logs());
        let line = &outbound[0];
        assert_eq!(
            line.get("dst.addr"),
            Some(mesh.gateway.addr().to_string().as_str()),
            "{line:?}"
        );
        assert_eq!(
            line.get("dst.hbone_addr"),
            Some("echo.default.svc.cluster.local:80"),
            "{line:?}"
        );
        assert_eq!(line.get("dst.workload"), Some("server"), "{line:?}");
        assert_eq!(line.get("dst.service"), Some(ECHO_HOST), "{line:?}");
        assert_eq!(line.get("error"), None, "{line:?}");
        let metrics = mesh.client.metrics();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains(r#"connection_security_policy="mutual_tls""#)
                    && l.contains(r#"destination_workload="server""#)),
            "{binary}: {metrics}"
        );
    }
}

#[test]
fn a_remote_endpoint_without_a_gateway_is_refused_with_the_reason() {
    for binary in binary::all() {
        let mesh = MultiNetwork::start(&binary);
        let failure = net::socks5_connect(mesh.client.ports().socks5, &vip(STRANDED_VIP)).err();
        assert_eq!(
            failure,
            Some(Socks5Failure::Reply(0x02)),
            "{binary}: not allowed\n{}",
            mesh.logs()
        );
        let outbound = mesh.client.wait_access_lines("outbound", 1, Duration::from_secs(10));
        let error = outbound.first().and_then(|l| l.get("error").map(str::to_owned));
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("network \"net-b\"") && e.contains("without a network gateway")),
            "{binary}: {error:?}\n{}",
            mesh.logs()
        );
        assert!(mesh.gateway.seen().is_empty(), "{binary}");
        assert_eq!(mesh.echo.accepted(), 0, "{binary}");
    }
}

#[test]
fn the_gateway_may_route_the_service_to_any_of_its_endpoints() {
    let options = Options {
        second_endpoint: true,
        ..Options::default()
    };
    for binary in binary::all() {
        let mesh = MultiNetwork::start_with(&binary, &options);
        let (server2, echo2) = mesh.second.as_ref().unwrap();
        // The client's proxy chooses among `server` and `server2` (weighted round robin); the gateway
        // routes every stream to `server2`: whichever the client chose, the inner mTLS accepts
        // `server2`'s identity and the inner CONNECT names the service, which `server2`'s proxy
        // resolves to its own workload.
        for n in 1..=2 {
            let stream = net::socks5_connect(mesh.client.ports().socks5, &vip(ECHO_VIP))
                .unwrap_or_else(|e| panic!("{binary}: SOCKS5 CONNECT {n}: {e:?}\n{}", mesh.logs()));
            let echoed = net::echo_exchange(stream, 64 * 1024).unwrap();
            assert!(echoed.intact(), "{binary}: {echoed:?}\n{}", mesh.logs());
        }
        assert_eq!(
            (mesh.echo.accepted(), echo2.accepted()),
            (0, 2),
            "{binary}\n{}",
            mesh.logs()
        );
        let seen = mesh.gateway.seen();
        assert_eq!(seen.len(), 2, "{binary}\n{}", mesh.logs());
        assert!(
            seen.iter()
                .all(|s| s.upstream == Some(SocketAddr::new(lo(3), mesh.mesh.hbone_port()))),
            "{seen:?}"
        );

        let inbound = server2.wait_access_lines("inbound", 2, Duration::from_secs(10));
        assert_eq!(inbound.len(), 2, "{binary}\n{}", mesh.logs());
        for line in &inbound {
            assert_eq!(line.get("src.identity"), Some(CLIENT_ID), "{line:?}");
            assert_eq!(line.get("dst.identity"), Some(SERVER2_ID), "{line:?}");
            assert_eq!(
                line.get("dst.hbone_addr"),
                Some("echo.default.svc.cluster.local:80"),
                "{line:?}"
            );
            assert_eq!(
                line.get("dst.addr"),
                Some(SocketAddr::new(lo(3), mesh.mesh.hbone_port()).to_string().as_str()),
                "{line:?}"
            );
            assert_eq!(line.get("dst.service"), Some(ECHO_HOST), "{line:?}");
            assert_eq!(line.get("error"), None, "{line:?}");
        }
        assert!(mesh.server.access_lines("inbound").is_empty(), "{binary}");
        let outbound = mesh.client.wait_access_lines("outbound", 2, Duration::from_secs(10));
        assert_eq!(outbound.len(), 2, "{binary}\n{}", mesh.logs());
        for line in &outbound {
            assert_eq!(
                line.get("dst.hbone_addr"),
                Some("echo.default.svc.cluster.local:80"),
                "{line:?}"
            );
            assert_eq!(line.get("error"), None, "{line:?}");
        }
    }
}

#[test]
fn an_inbound_connect_by_hostname_needs_a_service_the_workload_serves() {
    for binary in binary::all() {
        let mesh = MultiNetwork::start(&binary);
        // Directly to `server`'s proxy: the service it is an endpoint of, at the workload's target
        // port.
        assert_eq!(
            mesh.direct_status("client", echo_authority(80)),
            200,
            "{binary}\n{}",
            mesh.logs()
        );
        assert_eq!(mesh.echo.accepted(), 1, "{binary}");
        let inbound = mesh.server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        let line = inbound
            .first()
            .unwrap_or_else(|| panic!("{binary}: no access line\n{}", mesh.logs()));
        assert_eq!(
            line.get("dst.hbone_addr"),
            Some("echo.default.svc.cluster.local:80"),
            "{line:?}"
        );
        assert_eq!(
            line.get("dst.addr"),
            Some(SocketAddr::new(lo(2), mesh.mesh.hbone_port()).to_string().as_str()),
            "{line:?}"
        );

        // A service of another workload, a hostname no service has, a port the service lacks.
        for authority in [
            Authority::host("stranded.default.svc.cluster.local", 80).unwrap(),
            Authority::host("nowhere.default.svc.cluster.local", 80).unwrap(),
            echo_authority(81),
        ] {
            assert_eq!(
                mesh.direct_status("client", authority.clone()),
                400,
                "{binary}: {authority}\n{}",
                mesh.logs()
            );
        }
        assert_eq!(mesh.echo.accepted(), 1, "{binary}");
        let refusals = mesh
            .server
            .log_lines(&["not an endpoint of a service with the hostname"]);
        assert!(
            refusals
                .iter()
                .any(|l| l.contains("stranded.default.svc.cluster.local")),
            "{binary}: the refusal names the hostname\n{}",
            mesh.logs()
        );
    }
}

#[test]
fn a_policy_denies_a_hostname_connect_as_it_denies_an_address_connect() {
    let options = Options {
        policies: vec![namespace_policy(
            "default",
            "deny-client",
            "Deny",
            false,
            "principals: [!Exact cluster.local/ns/default/sa/client]",
        )],
        ..Options::default()
    };
    for binary in binary::all() {
        let mesh = MultiNetwork::start_with(&binary, &options);
        // Through the gateway: the inner CONNECT is denied, and the client told so.
        let failure = net::socks5_connect(mesh.client.ports().socks5, &vip(ECHO_VIP)).err();
        assert_eq!(
            failure,
            Some(Socks5Failure::Reply(0x02)),
            "{binary}: not allowed\n{}",
            mesh.logs()
        );
        // Directly: by hostname and by address alike; another identity is allowed.
        assert_eq!(mesh.direct_status("client", echo_authority(80)), 401, "{binary}");
        assert_eq!(
            mesh.direct_status("client", Authority::SocketAddr(mesh.echo.addr())),
            401,
            "{binary}"
        );
        assert_eq!(mesh.direct_status("other", echo_authority(80)), 200, "{binary}");
        assert_eq!(mesh.echo.accepted(), 1, "{binary}");

        let inbound = mesh.server.wait_access_lines("inbound", 4, Duration::from_secs(10));
        assert_eq!(inbound.len(), 4, "{binary}\n{}", mesh.logs());
        let denied: Vec<_> = inbound
            .iter()
            .filter(|l| l.get("src.identity") == Some(CLIENT_ID))
            .collect();
        assert_eq!(denied.len(), 3, "{inbound:?}");
        assert!(
            denied
                .iter()
                .all(|l| l.get("error").is_some_and(|e| e.contains("deny-client"))),
            "{binary}: {denied:?}"
        );
        assert_eq!(
            denied
                .iter()
                .filter(|l| l.get("dst.hbone_addr") == Some("echo.default.svc.cluster.local:80"))
                .count(),
            2,
            "{binary}: {denied:?}"
        );
    }
}
