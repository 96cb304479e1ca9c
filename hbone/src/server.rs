//! The server side of HBONE: serves one accepted connection.
//!
//! [`serve`] performs the TLS handshake (the client must present an SVID the server config
//! accepts) and the HTTP/2 handshake, then, for every stream: checks that it is a CONNECT with a
//! valid authority (else 400), asks the [`Handler`] for the upstream (the handler refuses with a
//! status, such as 401 for a denied policy or 503 for a failed connect), answers 200 only once the
//! upstream exists, and copies both ways with half-close semantics until both sides are done. A copy
//! that fails (the upstream reset its connection, say) resets the stream with CONNECT_ERROR (RFC 9113
//! section 8.5), so that the client learns the connection did not end cleanly.
//!
//! All streams of a connection are driven inside the one future `serve` returns: a failing stream
//! (refused, reset, its upstream gone) ends on its own without affecting its siblings, dropping the
//! future closes everything,
//! and no `Send` bound or spawning is needed. When `shutdown` completes the server sends GOAWAY,
//! accepts no new stream, lets the open ones finish, and then closes; a caller enforces a drain
//! deadline by dropping the future.
//!
//! [`serve_established`] does the same on a connection whose TLS layer the caller terminated and
//! whose client identity the caller verified.
//!
//! What HTTP/2 itself rejects never reaches the handler: a CONNECT with `:scheme`/`:path` or an
//! authority that is not valid URI syntax is reset with PROTOCOL_ERROR, a header list over the limit
//! gets 431, streams over the concurrency limit get REFUSED_STREAM. Some protocol violations (a
//! zero WINDOW_UPDATE, DATA after END_STREAM, a header block in more than a few CONTINUATION frames)
//! are connection errors in h2 and end the whole connection with GOAWAY; `serve` then returns
//! [`ServeError::Http2`].

use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{Either, select};
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use meshwire_identity::id::SpiffeId;
use meshwire_identity::tls;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::budget::{Budgets, BufferBudget, WindowLease};
use crate::copy::CopyConfig;
use crate::headers::{Authority, Metadata};
use crate::rt::Timer;
use crate::rt::timeout as with_timeout;
use crate::settings::Settings;
use crate::stream::H2Io;

/// A CONNECT the server accepted at the HTTP level, for the handler to decide on.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The verified SPIFFE ID of the client.
    pub peer: SpiffeId,
    /// The destination asked for.
    pub authority: Authority,
    /// The metadata headers that parsed; malformed ones are dropped (and logged).
    pub metadata: Metadata,
    /// All request headers.
    pub headers: HeaderMap,
}

/// Why a CONNECT was refused: the reasons the library itself refuses for, the ones a node proxy
/// refuses for, and free text for any other handler. Its `Display` is the text logged (the reason
/// is never sent to the client: only the status is).
///
/// ```
/// use meshwire_hbone::server::{Refusal, RefusalReason};
///
/// let refusal = Refusal::unavailable(RefusalReason::Loop("10.0.0.1:15008".parse()?));
/// assert_eq!(refusal.status, http::StatusCode::SERVICE_UNAVAILABLE);
/// assert_eq!(
///     refusal.reason.to_string(),
///     "10.0.0.1:15008 is one of the proxy's own ports: the connection would loop"
/// );
/// // A handler with its own words refuses with free text.
/// let other = Refusal::unauthorized("port 1 is denied");
/// assert!(matches!(other.reason, RefusalReason::Other(ref text) if text == "port 1 is denied"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RefusalReason {
    /// The request's method is not CONNECT (refused by the library with 400).
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    /// The `:authority` is not a valid CONNECT authority (refused by the library with 400).
    #[error("{0}")]
    InvalidAuthority(#[from] crate::headers::AuthorityError),
    /// The request has no `:authority` (refused by the library with 400).
    #[error("CONNECT without :authority")]
    MissingAuthority,
    /// The authority is a host name, which the handler does not serve (a handler that forwards
    /// only to addresses; a node proxy resolves a service hostname to a local workload instead).
    #[error("hostname authorities are not served by this handler: {0}")]
    HostnameAuthority(Authority),
    /// The authority's IP is not the address the connection arrived on.
    #[error("authority IP {authority} is not the address the connection arrived on, {arrived_on}")]
    AuthorityMismatch {
        /// The IP asked for.
        authority: IpAddr,
        /// The local address of the connection.
        arrived_on: IpAddr,
    },
    /// The destination is one of the proxy's own ports: connecting would loop back into it.
    #[error("{0} is one of the proxy's own ports: the connection would loop")]
    Loop(SocketAddr),
    /// No workload the handler serves has the destination IP.
    #[error("no workload served by this proxy has the IP {0}")]
    NoWorkload(IpAddr),
    /// Authorization denied the connection; the text is the decision as the policy engine words it.
    #[error("{0}")]
    Denied(String),
    /// The upstream connection failed.
    #[error("{source}")]
    UpstreamConnect {
        /// The destination.
        destination: SocketAddr,
        /// The error.
        source: Arc<io::Error>,
    },
    /// Any other reason, in the handler's words.
    #[error("{0}")]
    Other(String),
}

impl From<String> for RefusalReason {
    fn from(text: String) -> Self {
        Self::Other(text)
    }
}

impl From<&str> for RefusalReason {
    fn from(text: &str) -> Self {
        Self::Other(text.to_owned())
    }
}

/// A handler's refusal: the status to answer and why (logged, not sent).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The status of the response.
    pub status: StatusCode,
    /// Why, for the log.
    pub reason: RefusalReason,
}

impl Refusal {
    /// A refusal with any status (a handler should use a 4xx or 5xx one).
    pub fn new(status: StatusCode, reason: impl Into<RefusalReason>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(reason: impl Into<RefusalReason>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }

    /// 401 Unauthorized: authorization denied.
    pub fn unauthorized(reason: impl Into<RefusalReason>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, reason)
    }

    /// 503 Service Unavailable: the upstream could not be reached.
    pub fn unavailable(reason: impl Into<RefusalReason>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, reason)
    }
}

/// An accepted CONNECT: the upstream, and headers for the 200 response (such as `baggage`
/// describing the destination). A bare upstream converts into one with no extra headers.
#[derive(Debug)]
pub struct Connected<U> {
    /// The upstream connection the tunnel is spliced to.
    pub upstream: U,
    /// Headers added to the 200 response.
    pub response_headers: HeaderMap,
}

impl<U> From<U> for Connected<U> {
    fn from(upstream: U) -> Self {
        Self {
            upstream,
            response_headers: HeaderMap::new(),
        }
    }
}

/// What happened to one stream, reported to [`Handler::finished`].
#[derive(Debug)]
pub struct StreamReport {
    /// The client's identity.
    pub peer: SpiffeId,
    /// The destination, if the request had a valid one.
    pub authority: Option<Authority>,
    /// The status answered.
    pub status: StatusCode,
    /// Why the stream was refused, if it was.
    pub refusal: Option<RefusalReason>,
    /// Bytes from the client to the upstream.
    pub to_upstream: u64,
    /// Bytes from the upstream to the client.
    pub from_upstream: u64,
    /// How the copy failed, if it did.
    pub error: Option<io::Error>,
}

/// Decides what to do with each CONNECT.
///
/// # Example
///
/// ```
/// use meshwire_hbone::server::{Connected, Handler, InboundRequest, Refusal};
/// use tokio::io::AsyncWriteExt;
/// # use tokio::io::AsyncReadExt;
///
/// /// Refuses port 1 (401); else connects an upstream, here an in-process echo.
/// struct Echo;
/// impl Handler for Echo {
///     type Upstream = tokio::io::DuplexStream;
///     async fn connect(&self, request: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
///         if request.authority.as_socket_addr().is_some_and(|a| a.port() == 1) {
///             return Err(Refusal::unauthorized(format!("{} may not reach port 1", request.peer)));
///         }
///         let (upstream, echo) = tokio::io::duplex(64 * 1024);
///         let (mut r, mut w) = tokio::io::split(echo);
///         tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await?; w.shutdown().await });
///         Ok(upstream.into())
///     }
/// }
///
/// # use std::sync::Arc;
/// # use meshwire_identity::{id::{SpiffeId, TrustDomain}, source::local_ca::LocalCa, tls};
/// # use meshwire_rt::TokioTimer;
/// # use meshwire_hbone::server::{self, ServeOptions};
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
/// # let (connection, driver) = meshwire_hbone::client::handshake(io, client_tls, &Default::default(), TokioTimer).await?;
/// # tokio::spawn(driver);
/// # use meshwire_hbone::{client::ConnectRequest, headers::Authority};
/// # let refused = connection.open(&ConnectRequest::new(Authority::parse("10.0.0.2:1")?)).await.unwrap_err();
/// # assert_eq!(refused.status(), Some(http::StatusCode::UNAUTHORIZED));
/// # let mut tunnel = connection.open(&ConnectRequest::new(Authority::parse("10.0.0.2:80")?)).await?;
/// # tunnel.write_all(b"hi").await?;
/// # tunnel.shutdown().await?;
/// # let mut echoed = Vec::new();
/// # tunnel.read_to_end(&mut echoed).await?;
/// # assert_eq!(echoed, b"hi");
/// # Ok(())
/// # }
/// ```
pub trait Handler {
    /// The upstream connection the tunnel is spliced to.
    type Upstream: AsyncRead + AsyncWrite + Unpin;

    /// Authorizes the request and connects the upstream, or refuses with a status.
    fn connect(&self, request: &InboundRequest) -> impl Future<Output = Result<Connected<Self::Upstream>, Refusal>>;

    /// Called once per stream when it ends (metrics, access log). The default does nothing.
    fn finished(&self, report: StreamReport) {
        let _ = report;
    }
}

/// Why serving a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The TLS handshake failed (plaintext on the TLS port, untrusted or missing client certificate, ...).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The handshakes did not finish in time: TLS and HTTP/2 for [`serve`], HTTP/2 alone for
    /// [`serve_established`].
    #[error("TLS and HTTP/2 handshakes did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The options are not usable: a budget too small for one stream (see [`ServeOptions::validate`]).
    #[error("invalid HBONE settings: {0}")]
    Settings(#[from] crate::settings::SettingsError),
    /// The HTTP/2 connection failed.
    #[error("HTTP/2 connection with {peer} failed: {source}")]
    Http2 {
        /// The client.
        peer: SpiffeId,
        /// The error.
        source: h2::Error,
    },
}

/// How a connection that was served ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSummary {
    /// The client's identity.
    pub peer: SpiffeId,
    /// Streams handled.
    pub streams: u64,
}

/// Settings of the server side.
///
/// What a connection holds for its client is bounded: for each stream, its upstream's bytes (at
/// most [`ServeOptions::stream_lease`]: HTTP/2's send buffer plus the largest copy buffer) and its
/// client's bytes not yet taken by the upstream (at most the stream window); for the connection,
/// `connection_buffer` of upstream bytes and the connection window of client bytes; for the process,
/// `process_budget` of upstream bytes over every connection, and `receive_budget` of connection
/// windows (client bytes) over every connection. A stream that finds a budget spent waits and stops
/// reading its upstream (see [`crate::budget`]); a connection that finds `receive_budget` spent
/// advertises a smaller window (see [`WindowLease`]).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// HTTP/2 settings and the handshake timeout.
    pub settings: Settings,
    /// Copy buffer sizes.
    pub copy: CopyConfig,
    /// Bytes the streams of one connection hold from their upstreams together (default 64 MiB).
    pub connection_buffer: usize,
    /// The budget every connection served with these options shares (default: unlimited).
    pub process_budget: Arc<BufferBudget>,
    /// The budget of receive windows every connection served with these options leases its
    /// connection window from once authenticated, for its life (default: unlimited).
    pub receive_budget: Arc<BufferBudget>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            settings: Settings::default(),
            copy: CopyConfig::default(),
            connection_buffer: DEFAULT_CONNECTION_BUFFER,
            process_budget: Arc::new(BufferBudget::new(usize::MAX)),
            receive_budget: Arc::new(BufferBudget::new(usize::MAX)),
        }
    }
}

/// The default of [`ServeOptions::connection_buffer`]: 64 MiB.
pub const DEFAULT_CONNECTION_BUFFER: usize = 64 * 1024 * 1024;

impl ServeOptions {
    /// What one stream holds of the budgets while its upstream sends: HTTP/2's send buffer plus the
    /// largest copy buffer.
    pub fn stream_lease(&self) -> usize {
        stream_lease(&self.settings, &self.copy)
    }

    /// Checks that each budget lets at least one stream through (the settings are valid by
    /// construction).
    pub fn validate(&self) -> Result<(), crate::settings::SettingsError> {
        let lease = self.stream_lease();
        for (budget, value) in [
            ("connection_buffer", self.connection_buffer),
            ("process_budget", self.process_budget.limit()),
        ] {
            if value < lease {
                return Err(crate::settings::SettingsError::BudgetTooSmall { budget, value, lease });
            }
        }
        Ok(())
    }
}

/// What one stream holds of the budgets while its upstream sends, for `settings` and `copy`.
pub fn stream_lease(settings: &Settings, copy: &CopyConfig) -> usize {
    settings
        .send_buffer()
        .saturating_add(copy.max_buffer.max(copy.initial_buffer))
}

/// Serves one accepted connection until it closes, fails, or drains after `shutdown`.
///
/// Set `TCP_NODELAY` on the accepted socket first (see [`crate::client::handshake`]): without it the
/// server's WINDOW_UPDATE frames wait behind Nagle's algorithm and a bulk upload crawls.
///
/// `options.settings.handshake_timeout()` covers the TLS and HTTP/2 handshakes together.
///
/// # Example
///
/// ```
/// use meshwire_hbone::server::{self, ServeOptions};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # use std::sync::Arc;
/// # use meshwire_hbone::server::{Connected, Handler, InboundRequest, Refusal};
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
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let addr = listener.local_addr()?;
/// # let client_task = tokio::spawn(async move {
/// #     let (connection, driver) = meshwire_hbone::client::handshake(tokio::net::TcpStream::connect(addr).await?, client_tls, &Default::default(), TokioTimer).await?;
/// #     tokio::spawn(driver);
/// #     let request = meshwire_hbone::client::ConnectRequest::new(meshwire_hbone::headers::Authority::parse("10.0.0.2:8080")?);
/// #     let mut tunnel = connection.open(&request).await?;
/// #     tunnel.write_all(b"hello").await?;
/// #     tunnel.shutdown().await?;
/// #     let mut echoed = Vec::new();
/// #     tunnel.read_to_end(&mut echoed).await?;
/// #     assert_eq!(echoed, b"hello");
/// #     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
/// # });
/// let (tcp, _) = listener.accept().await?;
/// tcp.set_nodelay(true)?;
/// // Until the client closes the connection (a shutdown future would drain it first).
/// let summary = server::serve(tcp, server_tls, &ServeOptions::default(), &Echo, &TokioTimer, std::future::pending()).await?;
/// assert_eq!(summary.streams, 1);
/// # client_task.await.unwrap().unwrap();
/// # Ok(())
/// # }
/// ```
pub async fn serve<IO, H, T, S>(
    io: IO,
    tls_config: Arc<ServerConfig>,
    options: &ServeOptions,
    handler: &H,
    timer: &T,
    shutdown: S,
) -> Result<ServeSummary, ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
    T: Timer,
    S: Future<Output = ()>,
{
    let handshake = async move {
        let io = crate::readahead::ReadAhead::new(io, options.settings.read_ahead());
        let accept = tokio_rustls::TlsAcceptor::from(tls_config).accept(io).into_fallible();
        let tls_stream = match accept.await {
            Ok(tls_stream) => tls_stream,
            Err((error, mut io)) => {
                // rustls has written its alert (`certificate_required` for a client without a
                // certificate): flush it and end the connection after it with a FIN, so that the
                // client reads why it was refused whatever the runtime does on close.
                let _ = io.shutdown().await;
                return Err(ServeError::Tls(error));
            }
        };
        let peer = tls::peer_identity(tls_stream.get_ref().1).map_err(|e| ServeError::Tls(io::Error::other(e)))?;
        // Only an authenticated client gets a window beyond HTTP/2's default.
        let window = WindowLease::take(&options.receive_budget, &options.settings);
        let conn = h2_handshake(tls_stream, &window.apply(&options.settings), &peer).await?;
        Ok((conn, peer, window))
    };
    // Boxed: the handshake state is large and needed once; the connection's future stays small.
    serve_with(Box::pin(handshake), options, handler, timer, shutdown).await
}

/// Serves HTTP/2 on a connection whose TLS layer is already established, like [`serve`] after its
/// TLS handshake: for embedders that terminate TLS themselves.
///
/// `io` carries the decrypted stream (the client's HTTP/2 preface comes first), and `peer` is the
/// client's identity. **The caller is responsible for `peer`**: it must come from a client certificate
/// the caller verified against the trust bundles (as [`meshwire_identity::tls::peer_identity`] does on
/// a rustls connection built with [`meshwire_identity::tls::server_config`]). The server does not check
/// it; it hands it to the [`Handler`] in every [`InboundRequest`], where authorization relies on it.
///
/// `options.settings.handshake_timeout()` covers the HTTP/2 handshake alone; `read_ahead` does not apply
/// (it is a layer under TLS).
///
/// # Example
///
/// ```
/// use meshwire_hbone::server::{self, ServeOptions};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # use std::sync::Arc;
/// # use meshwire_hbone::server::{Connected, Handler, InboundRequest, Refusal};
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
/// # let client_task = tokio::spawn(async move {
/// #     let (connection, driver) = meshwire_hbone::client::handshake(io, client_tls, &Default::default(), TokioTimer).await?;
/// #     tokio::spawn(driver);
/// #     let request = meshwire_hbone::client::ConnectRequest::new(meshwire_hbone::headers::Authority::parse("10.0.0.2:8080")?);
/// #     let mut tunnel = connection.open(&request).await?;
/// #     tunnel.write_all(b"hello").await?;
/// #     tunnel.shutdown().await?;
/// #     let mut echoed = Vec::new();
/// #     tunnel.read_to_end(&mut echoed).await?;
/// #     assert_eq!(echoed, b"hello");
/// #     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
/// # });
/// // The caller terminates TLS and verifies the client identity itself.
/// let tls_stream = tokio_rustls::TlsAcceptor::from(server_tls).accept(server_io).await?;
/// let peer = tls::peer_identity(tls_stream.get_ref().1)?;
/// let options = ServeOptions::default();
/// let summary = server::serve_established(tls_stream, peer, &options, &Echo, &TokioTimer, std::future::pending()).await?;
/// assert_eq!(summary.streams, 1);
/// # client_task.await.unwrap().unwrap();
/// # Ok(())
/// # }
/// ```
pub async fn serve_established<IO, H, T, S>(
    io: IO,
    peer: SpiffeId,
    options: &ServeOptions,
    handler: &H,
    timer: &T,
    shutdown: S,
) -> Result<ServeSummary, ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
    T: Timer,
    S: Future<Output = ()>,
{
    let handshake = async move {
        let window = WindowLease::take(&options.receive_budget, &options.settings);
        let conn = h2_handshake(io, &window.apply(&options.settings), &peer).await?;
        Ok((conn, peer, window))
    };
    // Boxed: the handshake state is large and needed once; the connection's future stays small.
    serve_with(Box::pin(handshake), options, handler, timer, shutdown).await
}

/// The server side of the HTTP/2 handshake; a failure names the peer.
async fn h2_handshake<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    settings: &Settings,
    peer: &SpiffeId,
) -> Result<h2::server::Connection<IO, Bytes>, ServeError> {
    settings
        .server_builder()
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|source| ServeError::Http2 {
            peer: peer.clone(),
            source,
        })
}

/// Checks the settings, runs `handshake` (which yields the HTTP/2 connection, the verified peer and
/// the connection's window lease, held until the connection ends) within the handshake timeout, then accepts and drives the connection's streams until it ends.
///
/// The connection is a local here, never an argument, so that the future holds it once; `handshake`
/// comes boxed, as an unstarted future is as large as its largest state.
async fn serve_with<IO, H, T, S, F>(
    handshake: F,
    options: &ServeOptions,
    handler: &H,
    timer: &T,
    shutdown: S,
) -> Result<ServeSummary, ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
    T: Timer,
    S: Future<Output = ()>,
    F: Future<Output = Result<(h2::server::Connection<IO, Bytes>, SpiffeId, WindowLease), ServeError>> + Unpin,
{
    options.validate()?;
    let connection_budget = BufferBudget::new(options.connection_buffer);
    let budgets = Budgets {
        connection: Some(&connection_budget),
        process: &options.process_budget,
    };
    let lease = options.stream_lease();
    let limit = options.settings.handshake_timeout();
    let (conn, peer, mut window) = with_timeout(timer, limit, handshake)
        .await
        .ok_or(ServeError::HandshakeTimeout(limit))??;
    // `None` once the connection ended: dropped then, so that HTTP/2 fails every stream still open.
    let mut conn = Some(conn);

    let mut streams = FuturesUnordered::new();
    let mut shutdown = pin!(shutdown);
    let mut draining = false;
    let mut count = 0u64;
    let mut failure: Option<h2::Error> = None;
    let copy_config = options.copy;
    let peer_ref = &peer;
    let result = poll_fn(|cx| {
        loop {
            if !draining && shutdown.as_mut().poll(cx).is_ready() {
                tracing::debug!(peer = %peer_ref, open_streams = streams.len(), "draining HBONE connection");
                if let Some(conn) = conn.as_mut() {
                    conn.graceful_shutdown();
                }
                draining = true;
            }
            let mut progressed = false;
            if let Some(live) = conn.as_mut() {
                match live.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        count += 1;
                        // A connection set up when the receive budget was short grows its windows
                        // once the budget has room again.
                        if let Some(grown) = window.top_up(&options.settings) {
                            live.set_target_window_size(grown.connection_window());
                            // Refused while an earlier SETTINGS change waits for its ACK: the stream
                            // windows then stay as they were (still within the connection window).
                            if let Err(e) = live.set_initial_window_size(grown.stream_window()) {
                                tracing::debug!(peer = %peer_ref, error = %e, "stream windows not grown");
                            }
                        }
                        streams.push(handle_stream(
                            handler,
                            peer_ref,
                            Box::new(request),
                            respond,
                            copy_config,
                            (budgets, lease),
                        ));
                        progressed = true;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        if is_clean_end(&e, streams.is_empty()) {
                            tracing::debug!(peer = %peer_ref, error = %e, "HBONE connection ended");
                        } else {
                            failure = Some(e);
                        }
                        // The connection is over. Dropping it fails every stream still open: an
                        // error HTTP/2 met while flushing (a reset peer) reaches no stream
                        // otherwise, and a stream waiting to send would wait for good.
                        conn = None;
                        progressed = true;
                    }
                    Poll::Ready(None) => {
                        conn = None;
                        progressed = true;
                    }
                    Poll::Pending => {}
                }
            }
            while let Poll::Ready(Some(report)) = streams.poll_next_unpin(cx) {
                handler.finished(report);
            }
            if conn.is_none() && streams.is_empty() {
                return Poll::Ready(match failure.take() {
                    Some(source) => Err(ServeError::Http2 {
                        peer: peer_ref.clone(),
                        source,
                    }),
                    None => Ok(()),
                });
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    })
    .await;
    // The connection (and its buffers) went when it ended; now its window goes back to the budget.
    drop(window);
    result?;
    Ok(ServeSummary {
        peer: peer.clone(),
        streams: count,
    })
}

/// Whether a connection error is an ordinary end: a GOAWAY without error, or a client that hung up
/// with no stream open.
fn is_clean_end(e: &h2::Error, idle: bool) -> bool {
    if e.is_go_away() {
        return e.reason() == Some(h2::Reason::NO_ERROR);
    }
    idle && e.get_io().is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    })
}

fn respond_status(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // The stream may already be reset by the client; nothing more to do then.
    let _ = respond.send_response(response, true);
}

/// One stream, from its CONNECT to the end of its splice. A server holds this future for each
/// stream's life, so what it keeps while the bytes flow is memory per stream: the request comes
/// boxed (an argument is kept for the whole life of an `async fn`'s future, moved out or not), and
/// the report is made at the end, the stream keeping only its authority meanwhile.
async fn handle_stream<H: Handler>(
    handler: &H,
    peer: &SpiffeId,
    request: Box<Request<h2::RecvStream>>,
    mut respond: SendResponse<Bytes>,
    copy_config: CopyConfig,
    (budgets, lease): (Budgets<'_>, usize),
) -> StreamReport {
    let report = |authority: Option<Authority>| StreamReport {
        peer: peer.clone(),
        authority,
        status: StatusCode::OK,
        refusal: None,
        to_upstream: 0,
        from_upstream: 0,
        error: None,
    };
    let refuse = |mut report: StreamReport, respond: &mut SendResponse<Bytes>, refusal: Refusal| {
        tracing::info!(%peer, status = %refusal.status, reason = %refusal.reason, "refused HBONE stream");
        respond_status(respond, refusal.status);
        report.status = refusal.status;
        report.refusal = Some(refusal.reason);
        report
    };
    // The request and the state of connecting the upstream (boxed) live in this block only, and
    // its outcome in the `match` only: a stream does not keep them (nor the request's headers)
    // while it carries bytes. (Bound with a `let` first, the outcome would keep its room in the
    // future for the stream's life.)
    #[allow(clippy::blocks_in_conditions)]
    let (
        Connected {
            mut upstream,
            response_headers,
        },
        body,
        authority,
    ) = match {
        let (parts, body) = request.into_parts();
        if parts.method != Method::CONNECT {
            return refuse(
                report(None),
                &mut respond,
                Refusal::bad_request(RefusalReason::NotConnect(parts.method.clone())),
            );
        }
        let authority = match parts.uri.authority().map(|a| Authority::parse(a.as_str())) {
            Some(Ok(a)) => a,
            Some(Err(e)) => return refuse(report(None), &mut respond, Refusal::bad_request(e)),
            None => {
                return refuse(
                    report(None),
                    &mut respond,
                    Refusal::bad_request(RefusalReason::MissingAuthority),
                );
            }
        };
        let (metadata, header_errors) = Metadata::from_headers(&parts.headers);
        for e in header_errors {
            tracing::debug!(%peer, error = %e, "ignored a malformed metadata header");
        }
        let request = InboundRequest {
            peer: peer.clone(),
            authority,
            metadata,
            headers: parts.headers,
        };

        // Connect the upstream, unless the client gives up first.
        let gave_up = poll_fn(|cx| respond.poll_reset(cx));
        match select(Box::pin(handler.connect(&request)), pin!(gave_up)).await {
            Either::Left((decided, _)) => (decided, body, request.authority.clone()),
            Either::Right((reason, _)) => {
                let mut report = report(Some(request.authority.clone()));
                report.error = Some(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("client reset the stream while connecting: {reason:?}"),
                ));
                return report;
            }
        }
    } {
        (Ok(connected), body, authority) => (connected, body, authority),
        (Err(refusal), _, authority) => return refuse(report(Some(authority)), &mut respond, refusal),
    };
    // The response in a block: moved into `send_response`, it would still take room in the future.
    let send = {
        let mut ok = Response::new(());
        *ok.headers_mut() = response_headers;
        respond.send_response(ok, false)
    };
    let send = match send {
        Ok(send) => send,
        Err(e) => {
            let mut report = report(Some(authority));
            report.error = Some(crate::stream::h2_to_io(e));
            return report;
        }
    };
    let mut tunnel = H2Io::new(send, body);
    let outcome = tunnel
        .splice(
            &mut upstream,
            copy_config,
            Some(crate::budget::Lease::new(budgets, lease)),
        )
        .await;
    if outcome.error.is_some() {
        // An error on the upstream connection (a reset, say) is passed on as RST_STREAM
        // CONNECT_ERROR (RFC 9113 section 8.5), never as a clean END_STREAM.
        tunnel.reset(h2::Reason::CONNECT_ERROR);
    }
    let mut report = report(Some(authority));
    report.to_upstream = outcome.a_to_b;
    report.from_upstream = outcome.b_to_a;
    report.error = outcome.error;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler whose `connect` holds a large state while it runs.
    struct Slow;

    impl Handler for Slow {
        type Upstream = tokio::io::DuplexStream;

        async fn connect(&self, _request: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
            let state = [7u8; 8192];
            std::future::ready(()).await;
            let (upstream, _) = tokio::io::duplex(std::hint::black_box(&state).len());
            Ok(upstream.into())
        }
    }

    /// The signature of [`handle_stream`] for `H`, returning `Fut`.
    type HandleStream<'a, H, Fut> = fn(
        &'a H,
        &'a SpiffeId,
        Box<Request<h2::RecvStream>>,
        SendResponse<Bytes>,
        CopyConfig,
        (Budgets<'a>, usize),
    ) -> Fut;

    fn future_size<'a, H: 'a, Fut>(_: HandleStream<'a, H, Fut>) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// A server holds one of these per stream for the stream's life: its size is memory per
    /// stream. The handler's `connect` state and the request are not part of it (boxed, and dropped
    /// once connected), whatever the handler's connect holds: measured at 952 bytes on x86_64
    /// (debug build, a duplex upstream; 1384 while the request was an argument by value and the
    /// report and the response were kept); it was 4736 bytes with the proxy's handler (release).
    #[test]
    fn a_streams_future_does_not_hold_the_handlers_connect_state() {
        let size = future_size(handle_stream::<Slow>);
        println!("handle_stream: {size} bytes");
        assert!(size <= 1024, "the per-stream future is {size} bytes");
    }
}
