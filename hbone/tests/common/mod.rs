//! Shared test fixtures: certificates from a real local CA, TLS configs, a tokio timer, TCP echo
//! servers and an HBONE server whose handler connects to real loopback sockets.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use meshwire_hbone::rt::Timer;
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions, StreamReport};
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls::{self, TrustDomains};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};

pub const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
pub const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

#[derive(Clone, Copy)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    type Sleep = tokio::time::Sleep;
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }
    fn sleep_until(&self, deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

pub struct Pki {
    pub ca: LocalCa,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub client_tls: Arc<rustls::ClientConfig>,
}

impl Pki {
    pub fn new() -> Self {
        let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap();
        let server = ca.issue(&id(SERVER)).unwrap();
        let client = ca.issue(&id(CLIENT)).unwrap();
        let server_tls = Arc::new(
            tls::server_config(
                &server.svid,
                &server.bundles,
                &TrustDomains::only(ca.trust_domain().clone()),
                vec![b"h2".to_vec()],
            )
            .unwrap(),
        );
        let client_tls = Arc::new(
            tls::client_config(&client.svid, &client.bundles, vec![id(SERVER)], vec![b"h2".to_vec()]).unwrap(),
        );
        Self {
            ca,
            server_tls,
            client_tls,
        }
    }

    /// A server config presenting `identity`.
    pub fn server_as(&self, identity: &str) -> Arc<rustls::ServerConfig> {
        let svid = self.ca.issue(&id(identity)).unwrap();
        Arc::new(
            tls::server_config(
                &svid.svid,
                &svid.bundles,
                &TrustDomains::only(self.ca.trust_domain().clone()),
                vec![b"h2".to_vec()],
            )
            .unwrap(),
        )
    }

    /// A client config expecting `expected` as the server.
    pub fn client_expecting(&self, expected: &str) -> Arc<rustls::ClientConfig> {
        let client = self.ca.issue(&id(CLIENT)).unwrap();
        Arc::new(tls::client_config(&client.svid, &client.bundles, vec![id(expected)], vec![b"h2".to_vec()]).unwrap())
    }
}

/// A TCP echo server on loopback; returns its address.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A handler that connects to the authority on loopback: 401 for port 1, 503 when the connect fails.
#[derive(Default)]
pub struct LoopbackHandler {
    pub reports: Mutex<Vec<StreamReport>>,
    pub requests: std::sync::Mutex<Vec<InboundRequest>>,
    pub finished: AtomicU64,
}

impl Handler for LoopbackHandler {
    type Upstream = TcpStream;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<TcpStream>, Refusal> {
        self.requests.lock().unwrap().push(request.clone());
        let addr = request
            .authority
            .as_socket_addr()
            .ok_or_else(|| Refusal::bad_request("not an address"))?;
        if addr.port() == 1 {
            return Err(Refusal::unauthorized(format!("{} may not reach port 1", request.peer)));
        }
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
    pub addr: SocketAddr,
    pub handler: Arc<LoopbackHandler>,
    pub shutdown: watch::Sender<bool>,
    pub errors: Arc<Mutex<Vec<String>>>,
}

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
    let (h, errs) = (handler.clone(), errors.clone());
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
            tokio::spawn(async move {
                if let Err(e) = server::serve(tcp, tls_config, &options, &*h, &TokioTimer, stop).await {
                    errs.lock().await.push(format!("{peer}: {e}"));
                }
            });
        }
    });
    HboneServer {
        addr,
        handler,
        shutdown,
        errors,
    }
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// FNV-1a over a byte stream, for checksums of large transfers.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Reads everything from `r`.
pub async fn read_all<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await?;
    Ok(v)
}
