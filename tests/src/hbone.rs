//! An HBONE client for tests: it opens CONNECT tunnels to a proxy's inbound listener as any identity
//! the mesh's CA issues (or a foreign one), from a chosen loopback address, and hands each tunnel back
//! as a plain blocking `TcpStream` (a loopback connection spliced to the tunnel), so tests use the same
//! blocking helpers for every path.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;

use meshwire_dataplane::rt::tokio::TokioTimer;
use meshwire_hbone::client::{self, ConnectError, ConnectRequest};
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::headers::Authority;
use meshwire_hbone::settings::Settings;
use meshwire_identity::id::SpiffeId;
use meshwire_identity::source::Credentials;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls;

/// `spiffe://cluster.local/ns/<namespace>/sa/<service_account>`.
pub fn spiffe(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}")).expect("SPIFFE ID")
}

/// An HBONE client with one identity.
#[derive(Debug)]
pub struct HboneClient {
    runtime: Arc<tokio::runtime::Runtime>,
    tls: Arc<rustls::ClientConfig>,
    from: Option<IpAddr>,
}

/// An open tunnel, as a blocking stream, with the identity the server proved. It keeps the client's
/// runtime alive: the tunnel lives until the stream and the client are both gone.
#[derive(Debug)]
pub struct Opened {
    /// The tunnel's bytes.
    pub stream: TcpStream,
    /// The server's verified SPIFFE ID.
    pub peer: SpiffeId,
    _runtime: Arc<tokio::runtime::Runtime>,
}

impl HboneClient {
    /// A client presenting `identity` (issued by `ca`) and accepting servers with one of `expected`.
    pub fn new(ca: &LocalCa, identity: &SpiffeId, expected: &[SpiffeId]) -> HboneClient {
        let credentials = ca.issue(identity).expect("issue a client certificate");
        Self::with_credentials(&credentials, expected)
    }

    /// A client presenting `credentials` (for example from a CA the mesh does not trust).
    pub fn with_credentials(credentials: &Credentials, expected: &[SpiffeId]) -> HboneClient {
        let tls = tls::client_config(
            &credentials.svid,
            &credentials.bundles,
            expected.to_vec(),
            vec![b"h2".to_vec()],
        )
        .expect("client TLS config");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        HboneClient {
            runtime: Arc::new(runtime),
            tls: Arc::new(tls),
            from: None,
        }
    }

    /// Connects from `ip` (bound before connecting) instead of the address the kernel picks.
    pub fn from_ip(mut self, ip: IpAddr) -> HboneClient {
        self.from = Some(ip);
        self
    }

    /// Opens a new HBONE connection to `proxy` and a CONNECT stream for `authority` on it.
    pub fn open(&self, proxy: SocketAddr, authority: SocketAddr) -> Result<Opened, ConnectError> {
        self.open_authority(proxy, Authority::SocketAddr(authority))
    }

    /// [`open`](Self::open) with any authority (a host name, say).
    pub fn open_authority(&self, proxy: SocketAddr, authority: Authority) -> Result<Opened, ConnectError> {
        let tls = self.tls.clone();
        let from = self.from;
        let runtime = self.runtime.clone();
        self.runtime.block_on(async move {
            let tcp_error = |source: io::Error| ConnectError::Tcp {
                peer: proxy,
                source: Arc::new(source),
            };
            let socket = match proxy {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(tcp_error)?;
            if let Some(ip) = from {
                socket.bind(SocketAddr::new(ip, 0)).map_err(tcp_error)?;
            }
            let tcp = socket.connect(proxy).await.map_err(tcp_error)?;
            tcp.set_nodelay(true).map_err(tcp_error)?;
            let (connection, driver) = client::handshake(tcp, tls, &Settings::default(), TokioTimer).await?;
            tokio::spawn(driver);
            let mut tunnel = connection.open(&ConnectRequest::new(authority)).await?;
            let peer = tunnel.peer_identity().clone();

            // Bridge the tunnel to a loopback connection the test reads and writes.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(tcp_error)?;
            let local = listener.local_addr().map_err(tcp_error)?;
            let outer = std::net::TcpStream::connect(local).map_err(tcp_error)?;
            let (mut inner, _) = listener.accept().await.map_err(tcp_error)?;
            tokio::spawn(async move {
                let _ = tunnel.splice(&mut inner, CopyConfig::default()).await;
                // The connection closes when `connection` and the tunnel are gone.
                drop(connection);
            });
            Ok(Opened {
                stream: outer,
                peer,
                _runtime: runtime,
            })
        })
    }
}
