//! An east-west gateway for multi-network scenarios, doing what Istio's does for double HBONE: it
//! terminates the outer HBONE tunnel (mTLS as the gateway's identity, HTTP/2 CONNECT) and splices
//! each CONNECT stream, without looking inside it, to the HBONE port of a workload of its network,
//! where the inner tunnel (mTLS end to end with the destination) is terminated.
//!
//! A meshwire proxy cannot play this part: its inbound listener delivers a CONNECT only to the
//! workload at the address the connection arrived on, never to another host: an `ip:port` authority
//! must be that address (HBONE.md: another one gets 400), and a `<service hostname>:<port>` one must
//! name a service that workload is an endpoint of (else 400), which it resolves to the workload's
//! target port.
//!
//! Where a stream goes: its authority looked up in the gateway's routes (`<service hostname>:<port>`,
//! what ztunnel sends, to the HBONE address of the proxy of one endpoint of the service, any one, as
//! a real gateway chooses); an `ip:port` authority that is not routed goes to that address.
//! Connections to the upstream are made from the gateway's own IP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use meshwire_dataplane::rt::tokio::TokioTimer;
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
use meshwire_identity::id::SpiffeId;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// One CONNECT the gateway served or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The outer CONNECT's `:authority`, as sent.
    pub authority: String,
    /// The verified identity of the client of the outer tunnel.
    pub peer: SpiffeId,
    /// Where the stream was spliced to (`None` when refused).
    pub upstream: Option<SocketAddr>,
}

/// A running gateway; it stops when dropped.
#[derive(Debug)]
pub struct EastWestGateway {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _runtime: tokio::runtime::Runtime,
}

impl EastWestGateway {
    /// A gateway listening on an ephemeral port of `ip`, presenting the identity of `tls`, routing
    /// CONNECT authorities by `routes`.
    pub fn start(ip: IpAddr, tls: Arc<rustls::ServerConfig>, routes: HashMap<String, SocketAddr>) -> EastWestGateway {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(TcpListener::bind((ip, 0)))
            .unwrap_or_else(|e| panic!("east-west gateway on {ip}: {e}"));
        let addr = listener.local_addr().expect("gateway address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = Arc::new(Router {
            ip,
            routes,
            seen: seen.clone(),
        });
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, router) = (tls.clone(), router.clone());
                tokio::spawn(async move {
                    let options = ServeOptions::default();
                    let _ = server::serve(tcp, tls, &options, &*router, &TokioTimer, std::future::pending()).await;
                });
            }
        });
        EastWestGateway {
            addr,
            seen,
            _runtime: runtime,
        }
    }

    /// Where it listens (its HBONE mTLS port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CONNECTs it received, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Router {
    ip: IpAddr,
    routes: HashMap<String, SocketAddr>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Router {
    async fn splice_to(&self, upstream: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = if upstream.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(self.ip, 0))?;
        socket.connect(upstream).await
    }
}

impl Handler for Router {
    type Upstream = TcpStream;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<TcpStream>, Refusal> {
        let authority = request.authority.to_string();
        let upstream = self
            .routes
            .get(&authority)
            .copied()
            .or_else(|| request.authority.as_socket_addr());
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
            authority: authority.clone(),
            peer: request.peer.clone(),
            upstream,
        });
        let upstream = upstream.ok_or_else(|| Refusal::bad_request(format!("no route for {authority}")))?;
        let tcp = self
            .splice_to(upstream)
            .await
            .map_err(|e| Refusal::unavailable(format!("connect {upstream}: {e}")))?;
        Ok(Connected::from(tcp))
    }
}
