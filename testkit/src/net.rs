//! Tokio loopback servers: TCP servers (an echo server, or any task per connection), an HBONE server
//! whose handler connects to real loopback sockets, and one whose tunnels echo through a pipe.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions, StreamReport};
use meshwire_rt::TokioTimer;
use tokio::io::AsyncWriteExt;
use tokio::io::DuplexStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};

use crate::pki::Pki;

/// A TCP echo server on loopback; returns its address.
pub async fn echo_server() -> SocketAddr {
    echo_server_on(IpAddr::V4(Ipv4Addr::LOCALHOST)).await
}

/// A TCP echo server on an ephemeral port of `ip`; returns its address.
pub async fn echo_server_on(ip: IpAddr) -> SocketAddr {
    tcp_server_on(ip, |mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A TCP server on an ephemeral port of `ip` running `serve` on a task of its own for each
/// connection; returns its address.
pub async fn tcp_server_on<F, Fut>(ip: IpAddr, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((ip, 0))
        .await
        .unwrap_or_else(|e| panic!("TCP server on {ip}: {e}"));
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// Where a loopback handler connects a tunnel: the request's authority, which must be an address
/// (400 otherwise) and not of port 1 (401: the fixtures' forbidden port).
pub fn loopback_destination(request: &InboundRequest) -> Result<SocketAddr, Refusal> {
    let addr = request
        .authority
        .as_socket_addr()
        .ok_or_else(|| Refusal::bad_request("not an address"))?;
    if addr.port() == 1 {
        return Err(Refusal::unauthorized(format!("{} may not reach port 1", request.peer)));
    }
    Ok(addr)
}

/// A handler that connects to the authority on loopback: 401 for port 1, 503 when the connect fails.
#[derive(Default)]
pub struct LoopbackHandler {
    /// What every finished stream reported.
    pub reports: Mutex<Vec<StreamReport>>,
    /// Every request the handler was asked to connect.
    pub requests: std::sync::Mutex<Vec<InboundRequest>>,
    /// How many streams finished.
    pub finished: AtomicU64,
}

impl Handler for LoopbackHandler {
    type Upstream = TcpStream;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<TcpStream>, Refusal> {
        self.requests.lock().unwrap().push(request.clone());
        let addr = loopback_destination(request)?;
        let upstream = TcpStream::connect(addr)
            .await
            .map_err(|e| Refusal::unavailable(format!("connect {addr}: {e}")))?;
        let mut connected = Connected::from(upstream);
        connected.response_headers.insert(
            "baggage",
            http::HeaderValue::from_static("k8s.namespace.name=default,service.name=echo"),
        );
        Ok(connected)
    }

    fn finished(&self, report: StreamReport) {
        self.finished.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut r) = self.reports.try_lock() {
            r.push(report);
        }
    }
}

/// An HBONE server on loopback; `shutdown` starts a drain of every connection.
pub struct HboneServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its handler: what the streams asked and did.
    pub handler: Arc<LoopbackHandler>,
    /// Send `true` to drain every connection.
    pub shutdown: watch::Sender<bool>,
    /// The errors of connections that failed.
    pub errors: Arc<Mutex<Vec<String>>>,
    /// HBONE connections accepted and not yet ended.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl HboneServer {
    /// The HBONE connections it accepted that have not ended yet.
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An HBONE server presenting the [`Pki`]'s server identity.
pub async fn hbone_server(pki: &Pki, options: ServeOptions) -> HboneServer {
    hbone_server_with(pki.server_tls.clone(), options).await
}

/// An HBONE server presenting the identity of `tls_config`.
pub async fn hbone_server_with(tls_config: Arc<rustls::ServerConfig>, options: ServeOptions) -> HboneServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(LoopbackHandler::default());
    let (shutdown, rx) = watch::channel(false);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (h, errs, count) = (handler.clone(), errors.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let mut rx = rx.clone();
            let stop = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let (tls_config, options, h, errs) = (tls_config.clone(), options.clone(), h.clone(), errs.clone());
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let count = count.clone();
            tokio::spawn(async move {
                if let Err(e) = server::serve(tcp, tls_config, &options, &*h, &TokioTimer, stop).await {
                    errs.lock().await.push(format!("{peer}: {e}"));
                }
                count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    HboneServer {
        addr,
        handler,
        shutdown,
        errors,
        open,
    }
}

/// A handler that echoes every tunnel through an in-memory pipe, whatever its authority, and
/// records the requests.
#[derive(Default)]
pub struct EchoHandler {
    /// The requests, in the order they came.
    pub requests: std::sync::Mutex<Vec<InboundRequest>>,
}

impl Handler for EchoHandler {
    type Upstream = DuplexStream;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<DuplexStream>, Refusal> {
        self.requests.lock().unwrap().push(request.clone());
        let (upstream, mut echo) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut echo);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        Ok(Connected::from(upstream))
    }
}

/// An HBONE server on loopback presenting the identity of `tls_config`, whose tunnels echo (see
/// [`EchoHandler`]); it serves until the runtime ends. Returns its address and its handler.
pub async fn echo_hbone_server(tls_config: Arc<rustls::ServerConfig>) -> (SocketAddr, Arc<EchoHandler>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("HBONE echo server on 127.0.0.1: {e}"));
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(EchoHandler::default());
    let serving = handler.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls_config, handler) = (tls_config.clone(), serving.clone());
            tokio::spawn(async move {
                let options = ServeOptions::default();
                let _ = server::serve(
                    tcp,
                    tls_config,
                    &options,
                    &*handler,
                    &TokioTimer,
                    std::future::pending(),
                )
                .await;
            });
        }
    });
    (addr, handler)
}
