//! The per-connection proxy logic of meshwire-dataplane on glommio through [`GlommioRuntime`]: on one
//! glommio executor, SOCKS5 -> HBONE pool (glommio connector, driver on glommio) -> HBONE server with
//! the inbound handler (upstream connected through the runtime) -> an echo server, with real mutual
//! TLS from a local CA; passthrough; the SOCKS5 handshake deadline on glommio's timer; and a capture
//! connection that was not redirected, refused with a reset through a duplicate of the glommio
//! stream's socket. The scenario is [`meshwire_tests::seam`]'s, which the tokio build runs too.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use glommio::Placement;
use glommio::net::TcpListener;
use meshwire_dataplane::rt::Runtime;
use meshwire_dataplane::rt::connector::{ClientTlsSource, ConnectorConfig};
use meshwire_dataplane::rt::socket::{DefaultSocketFactory, SocketOptions};
use meshwire_dataplane_uring::rt::{GlommioConnector, GlommioExecutor, GlommioRuntime, GlommioStream, UringStream};
use meshwire_testkit::glommio::{GlommioTimer, run, spawn_echo_server, within};
use meshwire_tests::seam::{self, Host, LIMIT, proxy_logic_scenario};

/// The glommio side of the scenario: [`GlommioRuntime`] on the current executor.
struct Glommio;

impl Host for Glommio {
    type Runtime = GlommioRuntime;
    type Listener = TcpListener;

    fn runtime(&self) -> GlommioRuntime {
        GlommioRuntime::new()
    }

    fn listen(&self, ip: IpAddr) -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    async fn accept(listener: &TcpListener) -> io::Result<GlommioStream> {
        Ok(UringStream::new(listener.accept().await?))
    }

    async fn dial(addr: SocketAddr) -> io::Result<GlommioStream> {
        Ok(UringStream::new(glommio::net::TcpStream::connect(addr).await?))
    }

    fn spawn(future: impl Future<Output = ()> + 'static) {
        glommio::spawn_local(future).detach();
    }

    fn executor(&self) -> GlommioExecutor {
        GlommioExecutor
    }

    fn connector<S: ClientTlsSource>(&self, tls: S) -> GlommioConnector<S> {
        GlommioConnector::new(tls, ConnectorConfig::default())
    }
}

#[test]
fn the_proxy_logic_runs_on_glommio() {
    run("uring-runtime", Placement::Unbound, || proxy_logic_scenario(Glommio));
}

#[test]
fn factory_sockets_connect_or_fail_naming_the_peer() {
    run("uring-connect", Placement::Unbound, || async {
        // A listening peer: connected, and the stream carries bytes both ways.
        let echo = spawn_echo_server();
        let runtime = GlommioRuntime::new();
        let opts = SocketOptions::default();
        let tcp = within(LIMIT, "connect", runtime.connect(echo, &opts, Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(GlommioRuntime::<DefaultSocketFactory>::peer_addr(&tcp).unwrap(), echo);
        seam::echoes(&GlommioTimer, tcp, 300_000).await;

        // A closed port: refused, and the error names the peer.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = within(
            LIMIT,
            "refused connect",
            runtime.connect(closed, &opts, Duration::from_secs(5)),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(err.to_string().contains(&closed.to_string()), "{err}");
    });
}
