//! The client side of HBONE: one mTLS + HTTP/2 connection to a peer's HBONE port, and CONNECT
//! streams over it.
//!
//! [`handshake`] takes a connected byte stream (the caller makes the TCP connection, so it can set
//! marks, bind addresses or use any runtime), performs the TLS and HTTP/2 handshakes within the
//! configured timeout, and returns a [`ClientConnection`] to open tunnels with, plus the
//! connection's driver future, which the caller must run (spawn it) for as long as the connection
//! is used. The driver also sends keep-alive PINGs and ends the connection when they go unanswered.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::task::AtomicWaker;

use bytes::Bytes;

use http::{HeaderMap, Method, Request, StatusCode};
use meshwire_identity::id::SpiffeId;
use meshwire_identity::tls;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::client::TlsStream;

use crate::headers::{Authority, Metadata};
use crate::rt::{Timer, timeout as with_timeout};
use crate::settings::Settings;
use crate::stream::H2Io;

/// What the peer answered to a CONNECT it refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// 400: not a valid CONNECT, or an authority the peer does not serve.
    BadRequest,
    /// 401: the peer's authorization policy denied the connection.
    Unauthorized,
    /// 503: the peer could not connect to the destination.
    Unavailable,
    /// Any other status.
    Other,
}

impl Refusal {
    fn of(status: StatusCode) -> Self {
        match status {
            StatusCode::BAD_REQUEST => Self::BadRequest,
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::SERVICE_UNAVAILABLE => Self::Unavailable,
            _ => Self::Other,
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Self::BadRequest => "the peer found the request malformed or the destination not its own",
            Self::Unauthorized => "the peer's authorization policy denied the connection",
            Self::Unavailable => "the peer could not reach the destination",
            Self::Other => "unexpected status",
        }
    }
}

/// Why a tunnel could not be opened. `Clone`, so one failed handshake can be reported to every
/// request that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The TCP connection could not be made (from the caller's connector).
    #[error("TCP connect to {peer}: {source}")]
    Tcp {
        /// The address connected to.
        peer: SocketAddr,
        /// The error.
        source: Arc<io::Error>,
    },
    /// The TLS handshake failed; the cause includes the peer's alert when one was received, and an
    /// [`meshwire_identity::tls::IdentityMismatch`] when the peer was not who we expected.
    #[error("TLS handshake failed: {source}")]
    Tls {
        /// The error (find typed causes with [`meshwire_identity::tls::find_cause`]).
        source: Arc<io::Error>,
    },
    /// The handshakes did not finish in time.
    #[error("TLS and HTTP/2 handshakes did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The HTTP/2 layer failed (handshake, protocol error, connection gone).
    #[error("HTTP/2: {source}")]
    Http2 {
        /// The error.
        source: Arc<h2::Error>,
    },
    /// The connection stopped answering keep-alive PINGs.
    #[error("no PING answer within {0:?}: connection dropped")]
    PingTimeout(std::time::Duration),
    /// A pooled connection answered neither the CONNECT within `response` nor the PING sent then
    /// within `probe`: the peer stopped answering, and the connection was retired.
    #[error(
        "the peer answered neither the CONNECT within {response:?} nor a PING within {probe:?}: \
         HBONE connection retired"
    )]
    Unresponsive {
        /// How long the CONNECT waited before the connection was probed.
        response: std::time::Duration,
        /// How long the probe's PING waited.
        probe: std::time::Duration,
    },
    /// The peer answered the CONNECT with a status other than 200.
    #[error("CONNECT {authority} refused with {status}: {}", kind.explain())]
    Refused {
        /// The status code.
        status: StatusCode,
        /// What it means.
        kind: Refusal,
        /// The authority asked for.
        authority: String,
    },
    /// The request could not be built (an authority or header that is not valid HTTP).
    #[error("invalid CONNECT request: {0}")]
    InvalidRequest(String),
    /// A [`Pool`](crate::pool::Pool) handshake this request waited for was abandoned: the
    /// [`Pool::connect`](crate::pool::Pool::connect) call leading it was dropped before it finished.
    /// Nothing is known about the peer; a new request makes a new handshake.
    #[error("the HBONE handshake this request waited for was abandoned: the request leading it was dropped")]
    HandshakeAbandoned,
}

impl ConnectError {
    fn h2(e: h2::Error) -> Self {
        Self::Http2 { source: Arc::new(e) }
    }

    /// The status of a refused CONNECT.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A CONNECT request: where to, and the metadata headers that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The `:authority`: final destination `ip:port`, or `hostname:port`.
    pub authority: Authority,
    /// `forwarded`, `baggage`, `traceparent`, `x-forwarded-network`.
    pub metadata: Metadata,
}

impl ConnectRequest {
    /// A request for `authority` with no metadata.
    pub fn new(authority: Authority) -> Self {
        Self {
            authority,
            metadata: Metadata::default(),
        }
    }

    pub(crate) fn to_http(&self) -> Result<Request<()>, ConnectError> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.authority.to_string())
            .body(())
            .map_err(|e| ConnectError::InvalidRequest(e.to_string()))?;
        for skipped in self.metadata.to_headers(req.headers_mut()) {
            tracing::warn!(authority = %self.authority, error = %skipped, "CONNECT sent without a metadata header");
        }
        Ok(req)
    }
}

/// A stream's place in a count of streams (a pooled connection's), taken when it is made and given
/// back when the tunnel holding it is dropped.
pub(crate) struct StreamLease {
    active: Arc<std::sync::atomic::AtomicUsize>,
}

impl StreamLease {
    /// A place already counted in `active`.
    pub(crate) fn new(active: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        Self { active }
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.active.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An open CONNECT stream: bytes both ways; `shutdown` sends END_STREAM (a half close); dropping it
/// before both directions ended resets the stream.
///
/// # Example
///
/// ```
/// use meshwire_hbone::client::{self, ConnectRequest};
/// use meshwire_hbone::copy::CopyConfig;
/// use meshwire_hbone::{Settings, headers::Authority};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # use std::sync::Arc;
/// # use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
/// # use meshwire_identity::{id::{SpiffeId, TrustDomain}, source::local_ca::LocalCa, tls};
/// # use meshwire_rt::TokioTimer;
/// # /// Refuses port 1 (401); else connects an upstream, here an in-process echo.
/// # struct Echo;
/// # impl Handler for Echo {
/// #     type Upstream = tokio::io::DuplexStream;
/// #     async fn connect(&self, request: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
/// #         if request.authority.as_socket_addr().is_some_and(|a| a.port() == 1) {
/// #             return Err(Refusal::unauthorized(format!("{} may not reach port 1", request.peer)));
/// #         }
/// #         let (upstream, echo) = tokio::io::duplex(64 * 1024);
/// #         let (mut r, mut w) = tokio::io::split(echo);
/// #         tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await?; w.shutdown().await });
/// #         Ok(upstream.into())
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
/// # let server_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/server")?;
/// # let server = ca.issue(&server_id)?;
/// # let client = ca.issue(&SpiffeId::new("spiffe://cluster.local/ns/default/sa/client")?)?;
/// # let domains = tls::TrustDomains::only(ca.trust_domain().clone());
/// # let server_tls = Arc::new(tls::server_config(&server.svid, &server.bundles, &domains, vec![b"h2".to_vec()])?);
/// # let client_tls = Arc::new(tls::client_config(&client.svid, &client.bundles, vec![server_id], vec![b"h2".to_vec()])?);
/// # let (io, server_io) = tokio::io::duplex(1 << 20);
/// # tokio::spawn(async move { server::serve(server_io, server_tls, &ServeOptions::default(), &Echo, &TokioTimer, std::future::pending()).await });
/// # let (connection, driver) = client::handshake(io, client_tls, &Settings::default(), TokioTimer).await?;
/// # tokio::spawn(driver);
/// let mut tunnel = connection.open(&ConnectRequest::new(Authority::parse("10.0.0.2:8080")?)).await?;
/// assert_eq!(tunnel.peer_identity().to_string(), "spiffe://cluster.local/ns/default/sa/server");
/// // A proxy splices the tunnel to the connection of the workload that opened it.
/// let (mut workload, mut downstream) = tokio::io::duplex(64 * 1024);
/// let splice = tokio::spawn(async move { tunnel.splice(&mut downstream, CopyConfig::default()).await });
/// workload.write_all(b"hello").await?;
/// workload.shutdown().await?;
/// let mut echoed = Vec::new();
/// workload.read_to_end(&mut echoed).await?;
/// let outcome = splice.await?;
/// assert_eq!((echoed.as_slice(), outcome.a_to_b, outcome.b_to_a), (&b"hello"[..], 5, 5));
/// # Ok(())
/// # }
/// ```
pub struct Tunnel {
    io: H2Io,
    peer: Arc<SpiffeId>,
    response_headers: HeaderMap,
    /// For a pooled tunnel: its place in the connection's stream count, given back on drop.
    pub(crate) lease: Option<StreamLease>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// The verified SPIFFE ID of the peer that terminated the tunnel.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer
    }

    /// Headers of the peer's 200 response (for example `baggage` describing the destination).
    pub fn response_headers(&self) -> &HeaderMap {
        &self.response_headers
    }

    /// Copies between this tunnel and `downstream` (the connection of the workload that opened it)
    /// until both directions ended, with half-close semantics, handing bytes to HTTP/2 and to
    /// `downstream` without an intermediate copy. In the outcome, `a_to_b` counts bytes from the
    /// tunnel to `downstream`, `b_to_a` the other way; both are exact even when the copy fails.
    pub async fn splice<D>(&mut self, downstream: &mut D, config: crate::copy::CopyConfig) -> crate::copy::CopyOutcome
    where
        D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        self.io.splice(downstream, config, None).await
    }

    /// [`splice`](Self::splice), reading `downstream` only while holding a lease of `lease` bytes
    /// of `budget` (see [`crate::budget`]): a peer that does not read holds at most the lease of
    /// each of its tunnels, and when `budget` is spent, tunnels wait and stop reading their
    /// downstream instead of buffering.
    pub async fn splice_within<D>(
        &mut self,
        downstream: &mut D,
        config: crate::copy::CopyConfig,
        budget: &crate::budget::BufferBudget,
        lease: usize,
    ) -> crate::copy::CopyOutcome
    where
        D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let budgets = crate::budget::Budgets {
            connection: None,
            process: budget,
        };
        let lease = crate::budget::Lease::new(budgets, lease);
        self.io.splice(downstream, config, Some(lease)).await
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A liveness probe of one connection, shared by its handles (which ask for it) and its driver
/// (which sends the PING and ends the connection when it goes unanswered).
#[derive(Debug, Default)]
struct Probe {
    /// A probe was asked for and its PING is not answered yet.
    asked: AtomicBool,
    /// The probe's bound, in nanoseconds.
    within: AtomicU64,
    /// The connection ended because a probe went unanswered.
    failed: AtomicBool,
    /// The driver, woken to send the probe's PING.
    driver: AtomicWaker,
}

/// An established HBONE connection. Cheap to clone; clones open streams on the same connection.
#[derive(Clone)]
pub struct ClientConnection {
    send: h2::client::SendRequest<Bytes>,
    peer: Arc<SpiffeId>,
    probe: Arc<Probe>,
}

impl std::fmt::Debug for ClientConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConnection")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ClientConnection {
    /// The verified SPIFFE ID of the peer.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer
    }

    /// Opens a CONNECT stream; returns once the peer answered 200.
    ///
    /// # Example
    ///
    /// ```
    /// use meshwire_hbone::client::{self, ConnectError, ConnectRequest};
    /// use meshwire_hbone::{Settings, headers::Authority};
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # use std::sync::Arc;
    /// # use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
    /// # use meshwire_identity::{id::{SpiffeId, TrustDomain}, source::local_ca::LocalCa, tls};
    /// # use meshwire_rt::TokioTimer;
    /// # /// Refuses port 1 (401); else connects an upstream, here an in-process echo.
    /// # struct Echo;
    /// # impl Handler for Echo {
    /// #     type Upstream = tokio::io::DuplexStream;
    /// #     async fn connect(&self, request: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
    /// #         if request.authority.as_socket_addr().is_some_and(|a| a.port() == 1) {
    /// #             return Err(Refusal::unauthorized(format!("{} may not reach port 1", request.peer)));
    /// #         }
    /// #         let (upstream, echo) = tokio::io::duplex(64 * 1024);
    /// #         let (mut r, mut w) = tokio::io::split(echo);
    /// #         tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await?; w.shutdown().await });
    /// #         Ok(upstream.into())
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
    /// # let server_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/server")?;
    /// # let server = ca.issue(&server_id)?;
    /// # let client = ca.issue(&SpiffeId::new("spiffe://cluster.local/ns/default/sa/client")?)?;
    /// # let domains = tls::TrustDomains::only(ca.trust_domain().clone());
    /// # let server_tls = Arc::new(tls::server_config(&server.svid, &server.bundles, &domains, vec![b"h2".to_vec()])?);
    /// # let client_tls = Arc::new(tls::client_config(&client.svid, &client.bundles, vec![server_id], vec![b"h2".to_vec()])?);
    /// # let (io, server_io) = tokio::io::duplex(1 << 20);
    /// # tokio::spawn(async move { server::serve(server_io, server_tls, &ServeOptions::default(), &Echo, &TokioTimer, std::future::pending()).await });
    /// let (connection, driver) = client::handshake(io, client_tls, &Settings::default(), TokioTimer).await?;
    /// tokio::spawn(driver);
    /// // Streams share the connection, and so do its clones.
    /// let _first = connection.open(&ConnectRequest::new(Authority::parse("10.0.0.2:8080")?)).await?;
    /// let _second = connection.clone().open(&ConnectRequest::new(Authority::parse("[fd00::2]:8080")?)).await?;
    /// // A refusal carries the peer's status.
    /// let refused = connection.open(&ConnectRequest::new(Authority::parse("10.0.0.2:1")?)).await.unwrap_err();
    /// assert!(matches!(refused, ConnectError::Refused { kind: client::Refusal::Unauthorized, .. }), "{refused}");
    /// assert_eq!(refused.status(), Some(http::StatusCode::UNAUTHORIZED));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open(&self, request: &ConnectRequest) -> Result<Tunnel, ConnectError> {
        let http = request.to_http()?;
        let mut send = self.send.clone().ready().await.map_err(ConnectError::h2)?;
        let (response, stream) = send.send_request(http, false).map_err(ConnectError::h2)?;
        let response = response.await.map_err(ConnectError::h2)?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(ConnectError::Refused {
                status,
                kind: Refusal::of(status),
                authority: request.authority.to_string(),
            });
        }
        let (parts, body) = response.into_parts();
        Ok(Tunnel {
            io: H2Io::new(stream, body),
            peer: self.peer.clone(),
            response_headers: parts.headers,
            lease: None,
        })
    }

    /// The most streams the peer lets this client open at once (its SETTINGS_MAX_CONCURRENT_STREAMS).
    pub fn max_send_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Asks the connection's driver to check that the peer still answers: it sends a PING now (or
    /// keeps the keep-alive PING already out) and ends the connection with
    /// [`ConnectError::PingTimeout`] if no answer comes `within` this bound; every stream waiting
    /// on the connection then fails. Until the answer, [`ClientConnection::is_probed`] is true.
    /// Asking again while a probe is out changes nothing.
    pub fn probe(&self, within: std::time::Duration) {
        let nanos = u64::try_from(within.as_nanos()).unwrap_or(u64::MAX);
        if !self.probe.asked.load(Ordering::Acquire) {
            self.probe.within.store(nanos, Ordering::Release);
            if !self.probe.asked.swap(true, Ordering::AcqRel) {
                self.probe.driver.wake();
            }
        }
    }

    /// Whether a probe ([`ClientConnection::probe`]) is out and not yet answered.
    pub fn is_probed(&self) -> bool {
        self.probe.asked.load(Ordering::Acquire)
    }

    /// Whether the connection ended because a probe went unanswered.
    pub fn probe_failed(&self) -> bool {
        self.probe.failed.load(Ordering::Acquire)
    }

    /// Polls whether the connection can take one more stream now (not at its stream limit, not going away).
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.send.poll_ready(cx).map_err(ConnectError::h2)
    }
}

/// Performs the TLS and HTTP/2 handshakes over `io`.
///
/// Set `TCP_NODELAY` on a TCP `io` first: HTTP/2 sends small control frames (WINDOW_UPDATE, PING
/// answers) that Nagle's algorithm would hold back, and one bulk tunnel then stalls at a fraction
/// of its speed.
///
/// Returns the connection and its [`ConnectionDriver`], which must be run until it completes (it
/// completes when the connection closes, with the reason): spawn it.
///
/// # Example
///
/// ```
/// use meshwire_hbone::client::{self, ConnectRequest};
/// use meshwire_hbone::{Settings, headers::Authority};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # use std::sync::Arc;
/// # use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
/// # use meshwire_identity::{id::{SpiffeId, TrustDomain}, source::local_ca::LocalCa, tls};
/// # use meshwire_rt::TokioTimer;
/// # struct Echo;
/// # impl Handler for Echo {
/// #     type Upstream = tokio::io::DuplexStream;
/// #     async fn connect(&self, _: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
/// #         let (upstream, echo) = tokio::io::duplex(64 * 1024);
/// #         let (mut r, mut w) = tokio::io::split(echo);
/// #         tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await?; tokio::io::AsyncWriteExt::shutdown(&mut w).await });
/// #         Ok(upstream.into())
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
/// # let server_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/server")?;
/// # let server = ca.issue(&server_id)?;
/// # let client = ca.issue(&SpiffeId::new("spiffe://cluster.local/ns/default/sa/client")?)?;
/// # let domains = tls::TrustDomains::only(ca.trust_domain().clone());
/// # let server_tls = Arc::new(tls::server_config(&server.svid, &server.bundles, &domains, vec![b"h2".to_vec()])?);
/// # let client_tls = Arc::new(tls::client_config(&client.svid, &client.bundles, vec![server_id], vec![b"h2".to_vec()])?);
/// # let (io, server_io) = tokio::io::duplex(1 << 20);
/// # let options = ServeOptions::default();
/// # tokio::spawn(async move { server::serve(server_io, server_tls, &options, &Echo, &TokioTimer, std::future::pending()).await });
/// // `io` is connected to the peer's HBONE port (usually a `TcpStream` with `TCP_NODELAY`), and
/// // `client_tls` presents our SVID and expects the peer's identity.
/// let (connection, driver) = client::handshake(io, client_tls, &Settings::default(), TokioTimer).await?;
/// tokio::spawn(driver); // runs the connection until it closes
/// assert_eq!(connection.peer_identity().to_string(), "spiffe://cluster.local/ns/default/sa/server");
/// let mut tunnel = connection.open(&ConnectRequest::new(Authority::parse("10.0.0.2:8080")?)).await?;
/// tunnel.write_all(b"hello").await?;
/// tunnel.shutdown().await?; // END_STREAM
/// let mut echoed = Vec::new();
/// tunnel.read_to_end(&mut echoed).await?;
/// assert_eq!(echoed, b"hello");
/// # Ok(())
/// # }
/// ```
pub async fn handshake<IO, T>(
    io: IO,
    tls_config: Arc<ClientConfig>,
    settings: &Settings,
    timer: T,
) -> Result<(ClientConnection, ConnectionDriver<IO, T>), ConnectError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    T: Timer,
{
    let limit = settings.handshake_timeout();
    // Boxed: the handshake state is large and short-lived; callers' futures stay small.
    let hs = async {
        let io = crate::readahead::ReadAhead::new(io, settings.read_ahead());
        let tls_stream = tokio_rustls::TlsConnector::from(tls_config)
            .connect(tls::server_name(), io)
            .await
            .map_err(|e| ConnectError::Tls { source: Arc::new(e) })?;
        let peer = tls::peer_identity(tls_stream.get_ref().1).map_err(|e| ConnectError::Tls {
            source: Arc::new(io::Error::other(e)),
        })?;
        let (send, connection) = settings
            .client_builder()
            .handshake(tls_stream)
            .await
            .map_err(ConnectError::h2)?;
        Ok::<_, ConnectError>((send, connection, peer))
    };
    let (send, mut connection, peer) = with_timeout(&timer, limit, Box::pin(hs))
        .await
        .ok_or(ConnectError::HandshakeTimeout(limit))??;
    let ping = connection.ping_pong();
    let first = Box::pin(timer.sleep_until(timer.now() + settings.ping_interval()));
    let probe = Arc::new(Probe::default());
    let driver = ConnectionDriver {
        connection,
        ping,
        keepalive: KeepAlive::Idle(first),
        timer,
        interval: settings.ping_interval(),
        timeout: settings.ping_timeout(),
        probe: probe.clone(),
        probing: None,
    };
    Ok((
        ClientConnection {
            send,
            peer: Arc::new(peer),
            probe,
        },
        driver,
    ))
}

enum KeepAlive<S> {
    /// Waiting to send the next PING.
    Idle(Pin<Box<S>>),
    /// A PING is out; the sleep is its deadline, at the instant given.
    AwaitingPong(Pin<Box<S>>, Instant),
}

/// Drives one client connection: reads and writes its frames, and sends a keep-alive PING every
/// [`Settings::ping_interval`], ending the connection with [`ConnectError::PingTimeout`] when one
/// is not answered within [`Settings::ping_timeout`] (or, for a probe asked with
/// [`ClientConnection::probe`], within the probe's bound). Completes when the connection closes.
pub struct ConnectionDriver<IO, T: Timer> {
    connection: h2::client::Connection<TlsStream<crate::readahead::ReadAhead<IO>>, Bytes>,
    ping: Option<h2::PingPong>,
    keepalive: KeepAlive<T::Sleep>,
    timer: T,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    probe: Arc<Probe>,
    /// The bound of the probe being answered, once its PING is out.
    probing: Option<std::time::Duration>,
}

// No field is structurally pinned: the sleeps are boxed and the timer is only borrowed.
impl<IO: Unpin, T: Timer> Unpin for ConnectionDriver<IO, T> {}

impl<IO: AsyncRead + AsyncWrite + Unpin, T: Timer> Future for ConnectionDriver<IO, T> {
    type Output = Result<(), ConnectError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.probe.driver.register(cx.waker());
        if let Poll::Ready(result) = Pin::new(&mut this.connection).poll(cx) {
            return Poll::Ready(result.map_err(ConnectError::h2));
        }
        let Some(ping) = this.ping.as_mut() else {
            return Poll::Pending;
        };
        // A probe asked for: a PING now, or the one already out, answered within the probe's bound.
        if this.probing.is_none() && this.probe.asked.load(Ordering::Acquire) {
            let within = std::time::Duration::from_nanos(this.probe.within.load(Ordering::Acquire));
            let deadline = this.timer.now() + within;
            match &this.keepalive {
                KeepAlive::Idle(_) => {
                    if let Err(e) = ping.send_ping(h2::Ping::opaque()) {
                        return Poll::Ready(Err(ConnectError::h2(e)));
                    }
                    let sleep = Box::pin(this.timer.sleep_until(deadline));
                    this.keepalive = KeepAlive::AwaitingPong(sleep, deadline);
                }
                KeepAlive::AwaitingPong(_, out) if *out > deadline => {
                    let sleep = Box::pin(this.timer.sleep_until(deadline));
                    this.keepalive = KeepAlive::AwaitingPong(sleep, deadline);
                }
                KeepAlive::AwaitingPong(..) => {}
            }
            this.probing = Some(within);
        }
        loop {
            match &mut this.keepalive {
                KeepAlive::Idle(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if let Err(e) = ping.send_ping(h2::Ping::opaque()) {
                        return Poll::Ready(Err(ConnectError::h2(e)));
                    }
                    let deadline = this.timer.now() + this.timeout;
                    let sleep = Box::pin(this.timer.sleep_until(deadline));
                    this.keepalive = KeepAlive::AwaitingPong(sleep, deadline);
                }
                KeepAlive::AwaitingPong(deadline, _) => match ping.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        if this.probing.take().is_some() {
                            this.probe.asked.store(false, Ordering::Release);
                        }
                        let next = this.timer.now() + this.interval;
                        this.keepalive = KeepAlive::Idle(Box::pin(this.timer.sleep_until(next)));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(ConnectError::h2(e))),
                    Poll::Pending => {
                        if deadline.as_mut().poll(cx).is_ready() {
                            let waited = match this.probing {
                                Some(within) => {
                                    this.probe.failed.store(true, Ordering::Release);
                                    within
                                }
                                None => this.timeout,
                            };
                            return Poll::Ready(Err(ConnectError::PingTimeout(waited)));
                        }
                        return Poll::Pending;
                    }
                },
            }
        }
    }
}
