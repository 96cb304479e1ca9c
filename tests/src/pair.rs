//! The scenario most tests start from: two workloads in dedicated mode on loopback, each with its own
//! proxy, and an echo server behind the server workload.
//!
//! - `client` (`default/client/client`) on 127.0.0.1, served by proxy `client`, which takes SOCKS5;
//! - `server` (`default/server/server`) on 127.0.0.2, served by proxy `server`; an echo server listens
//!   on 127.0.0.2 and is the target of the service `echo.default.svc.cluster.local`, VIP
//!   [`ECHO_VIP`] port 80;
//! - `legacy` on 127.0.0.3: not in the mesh (plain TCP), no proxy.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::binary::Binary;
use crate::mesh::{Mesh, Proxy, ProxyBuilder};
use crate::net::{self, EchoServer, Socks5Target, lo};

/// The VIP of the echo service.
pub const ECHO_VIP: &str = "127.10.0.9";
/// The hostname of the echo service.
pub const ECHO_HOST: &str = "echo.default.svc.cluster.local";

/// The local configuration of the scenario, for an echo server on `echo_port`, with `extra` appended
/// (a `policies:` section, say).
pub fn config(echo_port: u16, extra: &str) -> String {
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
  - uid: cluster1//v1/Pod/default/server
    name: server
    namespace: default
    serviceAccount: server
    workloadIps: ["127.0.0.2"]
    protocol: HBONE
    node: node-b
    services:
      "default/{ECHO_HOST}":
        80: {echo_port}
  - uid: cluster1//v1/Pod/default/legacy
    name: legacy
    namespace: default
    serviceAccount: legacy
    workloadIps: ["127.0.0.3"]
    protocol: TCP
    node: node-c
services:
  - name: echo
    namespace: default
    hostname: {ECHO_HOST}
    vips: ["/{ECHO_VIP}"]
    ports:
      80: {echo_port}
{extra}
"#
    )
}

/// The two proxies, their mesh and the echo server.
#[derive(Debug)]
pub struct Pair {
    /// The mesh (configuration file, CA).
    pub mesh: Mesh,
    /// The client workload's proxy.
    pub client: Proxy,
    /// The server workload's proxy.
    pub server: Proxy,
    /// The echo server behind the server workload.
    pub echo: EchoServer,
}

impl Pair {
    /// Starts the scenario: `client` as the client's proxy binary, `server` as the server's.
    pub fn start(client: &Binary, server: &Binary) -> Pair {
        Self::start_with(client, server, "", |builder| builder)
    }

    /// [`Pair::start`] with `extra` configuration and `configure` applied to both proxies.
    pub fn start_with(
        client: &Binary,
        server: &Binary,
        extra: &str,
        configure: impl Fn(ProxyBuilder) -> ProxyBuilder,
    ) -> Pair {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(&config(echo.addr().port(), extra));
        let server = configure(server_proxy(&mesh, server)).spawn();
        let client = configure(mesh.proxy(client, lo(1)).dedicated("default/client/client")).spawn();
        Pair {
            mesh,
            client,
            server,
            echo,
        }
    }

    /// Both proxies' command lines and logs, for failure messages.
    pub fn logs(&self) -> String {
        format!("{}\n{}", self.client.describe(), self.server.describe())
    }

    /// A SOCKS5 CONNECT through the client's proxy; panics with both logs unless it succeeds.
    pub fn socks5(&self, target: Socks5Target) -> TcpStream {
        net::socks5_connect(self.client.ports().socks5, &target)
            .unwrap_or_else(|e| panic!("SOCKS5 CONNECT to {target:?}: {e:?}\n{}", self.logs()))
    }

    /// A SOCKS5 CONNECT to the echo server's address.
    pub fn socks5_to_echo(&self) -> TcpStream {
        self.socks5(Socks5Target::Addr(self.echo.addr()))
    }

    /// Whether a SOCKS5 connection through the client's proxy to the echo server carries 1 KiB
    /// back and forth intact (`false` on any failure, the CONNECT's included).
    pub fn echo_works(&self) -> bool {
        net::socks5_connect(self.client.ports().socks5, &Socks5Target::Addr(self.echo.addr()))
            .ok()
            .and_then(|stream| net::echo_exchange(stream, 1024).ok())
            .is_some_and(|echoed| echoed.intact())
    }

    /// Checks that a good connection still works: a SOCKS5 connection to the echo server carries
    /// `len` bytes back and forth intact; panics naming `context` (with both logs) otherwise.
    pub fn still_serves(&self, context: &str, len: usize) {
        let stream = net::socks5_connect(self.client.ports().socks5, &Socks5Target::Addr(self.echo.addr()))
            .unwrap_or_else(|e| panic!("{context}: SOCKS5 no longer works: {e:?}\n{}", self.logs()));
        let echoed = net::echo_exchange(stream, len).unwrap_or_else(|e| panic!("{context}: the echo: {e}"));
        assert!(echoed.intact(), "{context}: {echoed:?}");
    }

    /// The echo service's VIP and port.
    pub fn vip() -> SocketAddr {
        SocketAddr::new(ECHO_VIP.parse().expect("VIP"), 80)
    }
}

/// A proxy of `binary` for the server workload (dedicated mode, on 127.0.0.2), to configure and
/// start: a second instance next to [`Pair::server`], say.
pub fn server_proxy(mesh: &Mesh, binary: &Binary) -> ProxyBuilder {
    mesh.proxy(binary, lo(2)).dedicated("default/server/server")
}

/// Starts a second instance of the server workload's proxy on the ports of `old` with `--handover
/// 60s`, and waits until it logs that it is taking over (it shares the data ports at once and binds
/// the control ports once `old` has drained).
pub fn take_over(mesh: &Mesh, binary: &Binary, old: &Proxy) -> Proxy {
    server_proxy(mesh, binary)
        .same_ports_as(old)
        .handover(Duration::from_secs(60))
        .spawn_until_log(&["taking over"])
}
