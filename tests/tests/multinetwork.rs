//! Multi-network (Istio ambient multi-network): a client on network `net-a` reaches a server on
//! network `net-b` by double HBONE through the east-west gateway of `net-b`, for every proxy binary.
//!
//! - `client` (`default/client/client`) on 127.0.0.1, network `net-a`, served by a proxy started
//!   with `--network net-a`, which takes SOCKS5;
//! - `server` (`default/server/server`) on 127.0.0.2, network `net-b`, with
//!   `networkGateway: net-b/127.0.0.4`, served by a proxy with `--network net-b`; an echo server on
//!   127.0.0.2 is the target of the service `echo`, whose only VIP is in `net-a` and whose only
//!   endpoint is `server`;
//! - the east-west gateway of `net-b` on 127.0.0.4 (the workload `istio-system/eastwest`): it
//!   terminates the outer tunnel and splices it to the server proxy's HBONE port
//!   (`meshwire_tests::gateway`; a meshwire proxy cannot be a gateway, see there);
//! - `stranded` on 127.0.0.5, network `net-b` without a gateway: the only endpoint of the service
//!   `stranded`, which is thus unreachable from `net-a`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use meshwire_testkit::pki::server_config;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::gateway::EastWestGateway;
use meshwire_tests::mesh::{Mesh, Proxy};
use meshwire_tests::net::{self, EchoServer, Socks5Failure, Socks5Target, lo};

const ECHO_HOST: &str = "echo.default.svc.cluster.local";
const ECHO_VIP: &str = "127.10.0.29";
const STRANDED_VIP: &str = "127.10.0.30";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest-gateway";

fn config(echo_port: u16, gateway_port: u16) -> String {
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
        80: {echo_port}
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
"#
    )
}

/// The scenario for `binary` (both proxies): the mesh, the proxies, the gateway and the echo server.
struct MultiNetwork {
    _mesh: Mesh,
    client: Proxy,
    server: Proxy,
    gateway: EastWestGateway,
    echo: EchoServer,
}

impl MultiNetwork {
    fn start(binary: &Binary) -> MultiNetwork {
        let echo = EchoServer::start(lo(2));
        // The gateway's routes need the mesh's HBONE port, and the configuration the gateway's port.
        let mesh = Mesh::new(&config(echo.addr().port(), 15008));
        let server_hbone = SocketAddr::new(lo(2), mesh.hbone_port());
        let routes = HashMap::from([(format!("{ECHO_HOST}:80"), server_hbone)]);
        let gateway = EastWestGateway::start(lo(4), server_config(mesh.ca(), GATEWAY_ID), routes);
        mesh.write_config(&config(echo.addr().port(), gateway.addr().port()));
        let server = mesh
            .proxy(binary, lo(2))
            .dedicated("default/server/server")
            .arg("--network")
            .arg("net-b")
            .spawn();
        let client = mesh
            .proxy(binary, lo(1))
            .dedicated("default/client/client")
            .arg("--network")
            .arg("net-a")
            .spawn();
        MultiNetwork {
            _mesh: mesh,
            client,
            server,
            gateway,
            echo,
        }
    }

    fn logs(&self) -> String {
        format!(
            "{}\n{}\ngateway saw: {:?}",
            self.client.describe(),
            self.server.describe(),
            self.gateway.seen()
        )
    }
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
        assert_eq!(seen[0].upstream, Some(SocketAddr::new(lo(2), mesh._mesh.hbone_port())));

        // The server's proxy terminated the inner tunnel: mTLS end to end with the client's identity.
        let inbound = mesh.server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        assert_eq!(inbound.len(), 1, "{binary}: one inbound connection\n{}", mesh.logs());
        let line = &inbound[0];
        assert_eq!(line.get("src.identity"), Some(CLIENT_ID), "{binary}: {line:?}");
        assert_eq!(line.get("dst.identity"), Some(SERVER_ID), "{binary}: {line:?}");
        assert_eq!(line.get("dst.hbone_addr"), Some(mesh.echo.addr().to_string().as_str()));
        assert_eq!(line.number("bytes_recv"), Some(256 * 1024), "{binary}: {line:?}");

        // The client's proxy logged the gateway as where it connected, the workload as the target.
        let outbound = mesh.client.wait_access_lines("outbound", 1, Duration::from_secs(10));
        assert_eq!(outbound.len(), 1, "{binary}\n{}", mesh.logs());
        let line = &outbound[0];
        assert_eq!(
            line.get("dst.addr"),
            Some(mesh.gateway.addr().to_string().as_str()),
            "{line:?}"
        );
        assert_eq!(line.get("dst.hbone_addr"), Some(mesh.echo.addr().to_string().as_str()));
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
