//! Two hosts: two network namespaces joined by a veth pair, a proxy in each (dedicated mode, the
//! ztunnel ports), and iptables redirection (dataplane/scripts/redirect.sh) in the client's namespace.
//! A client that knows nothing of the mesh connects to the server workload's IP: its connection is
//! captured on 15001, crosses the veth over HBONE with the client workload's identity, and is delivered
//! by the server's proxy; a connection to a non-mesh address passes through as plain TCP.
//!
//! Needs root and iptables (see `meshwire_tests::netns::available`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshwire_tests::binary::{self, Binary};
use meshwire_tests::mesh::{Mesh, Ports, repo_path};
use meshwire_tests::net;
use meshwire_tests::netns::{self, Netns};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const LEGACY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const PORT: u16 = 9000;
const CONFIG: &str = r#"
workloads:
  - uid: cluster1//v1/Pod/default/client
    name: client
    serviceAccount: client
    workloadIps: ["10.77.0.1"]
    protocol: HBONE
    node: host-c
  - uid: cluster1//v1/Pod/default/server
    name: server
    serviceAccount: server
    workloadIps: ["10.77.0.2"]
    protocol: HBONE
    node: host-s
  - uid: cluster1//v1/Pod/default/legacy
    name: legacy
    serviceAccount: legacy
    workloadIps: ["10.77.0.3"]
    protocol: TCP
    node: host-s
"#;

#[test]
fn captured_traffic_crosses_hosts_over_hbone_with_the_workloads_identities() {
    if !netns::available("captured_traffic_crosses_hosts_over_hbone_with_the_workloads_identities") {
        return;
    }
    for (a, b) in binary::pairs() {
        let client_ns = Netns::new("c");
        let server_ns = Netns::new("s");
        client_ns.connect(IpAddr::V4(CLIENT_IP), &server_ns, IpAddr::V4(SERVER_IP), 24);
        server_ns.ip(&["addr", "add", &format!("{LEGACY_IP}/32"), "dev", "lo"]);

        server_ns.whoami_server(SocketAddr::from((SERVER_IP, PORT)));
        server_ns.whoami_server(SocketAddr::from((LEGACY_IP, PORT)));

        let mesh = Mesh::new(CONFIG);
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        // Each proxy on ztunnel's ports in its workload's namespace.
        let proxy = |binary: &Binary, workload: &str, ns: &Netns| {
            mesh.proxy(binary, any)
                .dedicated(workload)
                .with_ports(Ports::ztunnel_defaults(any))
                .in_netns(ns)
                .spawn()
        };
        let server = proxy(&b, "default/server/server", &server_ns);
        let client = proxy(&a, "default/client/client", &client_ns);
        let script = repo_path("dataplane/scripts/redirect.sh");
        netns::run(script.to_str().unwrap(), &["up", "--netns", client_ns.name()]);
        let logs = || format!("{}\n{}", client.describe(), server.describe());

        // To the mesh workload: captured, HBONE across the veth, delivered by the server's proxy.
        let peer = net::whoami_echo(
            client_ns.connect_or_panic(SocketAddr::from((SERVER_IP, PORT))),
            1_000_000,
        );
        assert_eq!(
            peer.ip(),
            IpAddr::V4(SERVER_IP),
            "{a} -> {b}: the server's proxy delivered the connection\n{}",
            logs()
        );
        let inbound = server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        assert_eq!(inbound.len(), 1, "{}", logs());
        assert_eq!(
            inbound[0].get("src.identity"),
            Some("spiffe://cluster.local/ns/default/sa/client")
        );
        assert_eq!(
            inbound[0].get("dst.identity"),
            Some("spiffe://cluster.local/ns/default/sa/server")
        );
        assert_eq!(
            inbound[0].get("src.addr").map(|a| a.starts_with("10.77.0.1:")),
            Some(true)
        );
        assert_eq!(inbound[0].number("bytes_recv"), Some(1_000_000));
        let outbound = client.wait_access_lines("outbound", 1, Duration::from_secs(10));
        assert_eq!(outbound.len(), 1, "{}", logs());
        assert_eq!(
            outbound[0].get("dst.identity"),
            Some("spiffe://cluster.local/ns/default/sa/server")
        );
        assert_eq!(outbound[0].get("dst.hbone_addr"), Some("10.77.0.2:9000"));

        // To a non-mesh workload: passed through by the client's proxy, nothing through the server's.
        let peer = net::whoami_echo(client_ns.connect_or_panic(SocketAddr::from((LEGACY_IP, PORT))), 100_000);
        assert_eq!(peer.ip(), IpAddr::V4(CLIENT_IP), "{}", logs());
        let outbound = client.wait_access_lines("outbound", 2, Duration::from_secs(10));
        assert_eq!(outbound.len(), 2, "{}", logs());
        assert!(
            outbound.iter().any(|l| l.get("dst.addr") == Some("10.77.0.3:9000")),
            "{}",
            logs()
        );
        assert_eq!(server.access_lines("inbound").len(), 1, "{}", logs());

        netns::run(script.to_str().unwrap(), &["down", "--netns", client_ns.name()]);
    }
}
