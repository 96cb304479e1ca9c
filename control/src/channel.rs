//! A gRPC channel to istiod: HTTP/2 over TLS 1.3 (rustls on ring), server authentication only,
//! with the headers istiod expects on every request.
//!
//! The pieces:
//! - [`Address`]: `host:port` (an `https://` prefix is accepted), parsed once by [`Address::parse`];
//! - [`Roots`]: where the roots that authenticate istiod come from; a root file is re-read at every
//!   new connection, so a rotated root file is used from the next connect on;
//! - [`Token`]: the bearer token; a token file is re-read on every request, so rotation is safe;
//! - [`ChannelConfig`] and [`Channel`]: the validated configuration, and [`Channel::connect`], which
//!   dials, handshakes TLS and HTTP/2, and hands back a [`GrpcService`] (a tower service that the
//!   generated clients take) and the [`Connection`] future that the caller drives (the channel
//!   never spawns it; hyper itself spawns the request-body pumps of HTTP/2 on tokio and keeps its
//!   keepalive timers on tokio's clock, so a tokio runtime must be current);
//! - [`HeadersLayer`] / [`Headers`]: the tower layer that puts `authorization`, `clusterid` and the
//!   extra headers on every request.
//!
//! ```
//! use meshwire_control::channel::{Address, ChannelConfig, Roots, Token};
//!
//! let address = Address::parse("https://istiod.istio-system.svc:15012").unwrap();
//! assert_eq!(address.host(), "istiod.istio-system.svc");
//! assert_eq!(address.port(), 15012);
//! let config = ChannelConfig::new(address, Roots::File("/var/run/secrets/istio/root-cert.pem".into()))
//!     .token(Token::File("/var/run/secrets/tokens/istio-token".into()))
//!     .header("X-Tenant_Id", "blue");
//! assert_eq!(config.cluster_id, "Kubernetes");
//! assert!(meshwire_control::channel::Channel::new(config).is_ok());
//! assert!(Address::parse("istiod.istio-system.svc").unwrap_err().to_string().contains("istiod.istio-system.svc"));
//! ```

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshwire_rt::Timer;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The default connect timeout: TCP, TLS and HTTP/2 handshakes together.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default interval of HTTP/2 keepalive pings (a silently dead connection is noticed within
/// this interval plus [`DEFAULT_KEEPALIVE_TIMEOUT`]).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// The default time a keepalive ping may wait for its answer before the connection is closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The default value of the `clusterid` header.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// What went wrong building or using a [`Channel`]. Every variant names the value, file or address
/// that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The control-plane address could not be parsed.
    #[error("invalid control-plane address {value:?}: {reason}")]
    Address {
        /// The value as given.
        value: String,
        /// Why it is not an address.
        reason: String,
    },
    /// The server name to verify is not a DNS name or an IP address.
    #[error("invalid server name {value:?}: {reason}")]
    ServerName {
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A header name or value cannot be sent.
    #[error("invalid header {name:?}: {reason}")]
    Header {
        /// The header name as given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// The roots could not be loaded.
    #[error("loading the roots from {source_name}: {reason}")]
    Roots {
        /// Where the roots came from: the file, `system roots` or `inline PEM`.
        source_name: String,
        /// What failed.
        reason: String,
    },
    /// The bearer token could not be read or is not a valid header value.
    #[error("reading the bearer token from {path}: {reason}")]
    Token {
        /// The token file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The TCP connection failed.
    #[error("connecting to {address}: {reason}")]
    Connect {
        /// The address dialled.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The TLS handshake failed (for instance, the server's certificate is not signed by the roots).
    #[error("TLS handshake with {address} (verifying server name {server_name}): {reason}")]
    Tls {
        /// The address dialled.
        address: String,
        /// The server name verified.
        server_name: String,
        /// What failed.
        reason: String,
    },
    /// The HTTP/2 handshake or connection failed.
    #[error("HTTP/2 connection to {address}: {reason}")]
    Http2 {
        /// The address dialled.
        address: String,
        /// What failed.
        reason: String,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {address}: timed out after {timeout:?}")]
    Timeout {
        /// The address dialled.
        address: String,
        /// The connect timeout.
        timeout: Duration,
    },
}

/// A control-plane address: a host (DNS name or IP address) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    host: String,
    port: u16,
}

impl Address {
    /// Parses `host:port` (IPv6 hosts in brackets: `[fd00::1]:15012`), with an optional `https://`
    /// prefix and an optional trailing `/`. A port is required; errors name the value.
    pub fn parse(value: &str) -> Result<Self, ChannelError> {
        let err = |reason: &str| ChannelError::Address {
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = value.trim();
        let rest = match trimmed.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => rest,
            Some((scheme, _)) => return Err(err(&format!("scheme {scheme:?} is not supported (only https)"))),
            None => trimmed,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(err("empty"));
        }
        if rest.contains('/') || rest.contains('@') || rest.contains('?') {
            return Err(err("expected host:port, without a path or user info"));
        }
        let authority: http::uri::Authority = rest.parse().map_err(|e| err(&format!("{e}")))?;
        let port = authority
            .port_u16()
            .ok_or_else(|| err("no port (expected host:port, e.g. istiod.istio-system.svc:15012)"))?;
        if port == 0 {
            return Err(err("port 0"));
        }
        let host = authority.host();
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => {
                v6.parse::<std::net::Ipv6Addr>()
                    .map_err(|_| err("the bracketed host is not an IPv6 address"))?;
                v6
            }
            None => host,
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }

    /// The host: a DNS name or an IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for Address {
    type Err = ChannelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Where the roots that authenticate istiod come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file, re-read at every new connection (so a rotated file is used at the next connect).
    File(PathBuf),
    /// The system's roots (rustls-native-certs).
    System,
    /// Inline PEM.
    Pem(String),
}

impl Roots {
    fn describe(&self) -> String {
        match self {
            Roots::File(path) => path.display().to_string(),
            Roots::System => "the system roots".to_string(),
            Roots::Pem(_) => "inline PEM".to_string(),
        }
    }

    /// Loads the roots now.
    pub fn load(&self) -> Result<RootCertStore, ChannelError> {
        let err = |reason: String| ChannelError::Roots {
            source_name: self.describe(),
            reason,
        };
        let mut store = RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = match self {
            Roots::File(path) => {
                let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
                CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| err(format!("bad PEM: {e}")))?
            }
            Roots::Pem(pem) => CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| err(format!("bad PEM: {e}")))?,
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() && !found.errors.is_empty() {
                    let reasons: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                    return Err(err(reasons.join("; ")));
                }
                found.certs
            }
        };
        let (added, _ignored) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(err("no usable root certificate".to_string()));
        }
        Ok(store)
    }
}

/// The bearer token sent as `authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// A file (the projected ServiceAccount token), re-read on every request. Surrounding
    /// whitespace is trimmed.
    File(PathBuf),
    /// A fixed token.
    Static(String),
}

impl Token {
    /// The header value `Bearer <token>`, read now.
    fn header_value(&self) -> Result<HeaderValue, ChannelError> {
        let (source, token) = match self {
            Token::File(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| ChannelError::Token {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                (path.display().to_string(), token)
            }
            Token::Static(token) => ("the static token".to_string(), token.clone()),
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(ChannelError::Token {
                path: source,
                reason: "empty token".to_string(),
            });
        }
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ChannelError::Token {
            path: source,
            reason: "the token is not a valid header value".to_string(),
        })
    }
}

/// The configuration of a [`Channel`]: built with [`ChannelConfig::new`] and the builder methods,
/// checked by [`Channel::new`].
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The address of istiod (or of the CA).
    pub address: Address,
    /// The roots that authenticate the server.
    pub roots: Roots,
    /// The server name verified in the server's certificate; `None` means the host of the address.
    pub server_name: Option<String>,
    /// The bearer token, if any.
    pub token: Option<Token>,
    /// The value of the `clusterid` header ([`DEFAULT_CLUSTER_ID`] unless set).
    pub cluster_id: String,
    /// Extra headers (from `XDS_HEADER_<NAME>` / `CA_HEADER_<NAME>`): names are lower-cased,
    /// underscores kept.
    pub headers: Vec<(String, String)>,
    /// The connect timeout ([`DEFAULT_CONNECT_TIMEOUT`] unless set).
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive: ping interval and answer timeout (defaults
    /// [`DEFAULT_KEEPALIVE_INTERVAL`], [`DEFAULT_KEEPALIVE_TIMEOUT`]); `None` disables pings.
    pub keepalive: Option<(Duration, Duration)>,
}

impl ChannelConfig {
    /// A configuration with no token, the default cluster ID, no extra headers and the default
    /// connect timeout.
    pub fn new(address: Address, roots: Roots) -> Self {
        Self {
            address,
            roots,
            server_name: None,
            token: None,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            headers: Vec::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keepalive: Some((DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT)),
        }
    }

    /// Sets the server name to verify.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Sets the bearer token.
    pub fn token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// Sets the `clusterid` header value.
    pub fn cluster_id(mut self, cluster_id: impl Into<String>) -> Self {
        self.cluster_id = cluster_id.into();
        self
    }

    /// Adds an extra header (the name is lower-cased when the channel is built).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the HTTP/2 keepalive (ping interval, answer timeout), or disables it.
    pub fn keepalive(mut self, keepalive: Option<(Duration, Duration)>) -> Self {
        self.keepalive = keepalive;
        self
    }
}

/// The headers put on every request: see [`HeadersLayer`].
#[derive(Debug)]
struct HeaderSet {
    token: Option<Token>,
    fixed: Vec<(HeaderName, HeaderValue)>,
}

/// A checked channel configuration, cheap to clone; [`Channel::connect`] opens connections.
#[derive(Debug, Clone)]
pub struct Channel {
    inner: Arc<ChannelInner>,
}

#[derive(Debug)]
struct ChannelInner {
    address: Address,
    roots: Roots,
    server_name: ServerName<'static>,
    server_name_text: String,
    headers: Arc<HeaderSet>,
    origin: http::Uri,
    connect_timeout: Duration,
    keepalive: Option<(Duration, Duration)>,
}

impl Channel {
    /// Checks `config`: the server name, the header names and values. The roots and the token are
    /// read later (at each connect and each request).
    pub fn new(config: ChannelConfig) -> Result<Self, ChannelError> {
        let server_name_text = config
            .server_name
            .clone()
            .unwrap_or_else(|| config.address.host().to_string());
        let server_name = match server_name_text.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(server_name_text.clone()).map_err(|e| ChannelError::ServerName {
                value: server_name_text.clone(),
                reason: e.to_string(),
            })?,
        };
        let mut fixed = Vec::with_capacity(config.headers.len() + 1);
        let cluster_id = HeaderValue::from_str(&config.cluster_id).map_err(|e| ChannelError::Header {
            name: "clusterid".to_string(),
            reason: format!("value {:?}: {e}", config.cluster_id),
        })?;
        fixed.push((HeaderName::from_static("clusterid"), cluster_id));
        for (name, value) in &config.headers {
            let header_name =
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|e| ChannelError::Header {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
            let header_value = HeaderValue::from_str(value).map_err(|e| ChannelError::Header {
                name: name.clone(),
                reason: format!("value {value:?}: {e}"),
            })?;
            fixed.push((header_name, header_value));
        }
        let origin: http::Uri = format!("https://{}", config.address)
            .parse()
            .map_err(|e: http::uri::InvalidUri| ChannelError::Address {
                value: config.address.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(ChannelInner {
                address: config.address,
                roots: config.roots,
                server_name,
                server_name_text,
                headers: Arc::new(HeaderSet {
                    token: config.token,
                    fixed,
                }),
                origin,
                connect_timeout: config.connect_timeout,
                keepalive: config.keepalive,
            }),
        })
    }

    /// The address connections go to.
    pub fn address(&self) -> &Address {
        &self.inner.address
    }

    /// The origin URI (`https://host:port`) the generated clients are given
    /// (`with_origin`), so requests carry the right `:authority`.
    pub fn origin(&self) -> http::Uri {
        self.inner.origin.clone()
    }

    /// The layer that puts this channel's headers on every request.
    pub fn headers_layer(&self) -> HeadersLayer {
        HeadersLayer {
            headers: self.inner.headers.clone(),
        }
    }

    /// Opens a connection: TCP, TLS 1.3 (roots loaded now), HTTP/2, all within the connect
    /// timeout on `timer`. Returns the service to hand to a generated client (with
    /// [`Channel::origin`]) and the connection future, which must be polled for requests to make
    /// progress (select or join it with the calls; drop it to close the connection).
    pub async fn connect<T: Timer>(&self, timer: &T) -> Result<(GrpcService, Connection), ChannelError> {
        let inner = &self.inner;
        match meshwire_rt::timeout(timer, inner.connect_timeout, self.connect_now()).await {
            Some(result) => result,
            None => Err(ChannelError::Timeout {
                address: inner.address.to_string(),
                timeout: inner.connect_timeout,
            }),
        }
    }

    async fn connect_now(&self) -> Result<(GrpcService, Connection), ChannelError> {
        let inner = &self.inner;
        let address = inner.address.to_string();
        let roots = inner.roots.load()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ChannelError::Tls {
                address: address.clone(),
                server_name: inner.server_name_text.clone(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect((inner.address.host(), inner.address.port()))
            .await
            .map_err(|e| ChannelError::Connect {
                address: address.clone(),
                reason: e.to_string(),
            })?;
        // Best effort: gRPC messages are small and latency matters more than batching.
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(Arc::new(tls))
            .connect(inner.server_name.clone(), tcp)
            .await
            .map_err(|e| ChannelError::Tls {
                address: address.clone(),
                server_name: inner.server_name_text.clone(),
                reason: e.to_string(),
            })?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        if let Some((interval, timeout)) = inner.keepalive {
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        let (send, conn) = builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ChannelError::Http2 {
                address: address.clone(),
                reason: e.to_string(),
            })?;
        let connection = Connection {
            future: Box::pin(async move {
                conn.await.map_err(|e| ChannelError::Http2 {
                    address,
                    reason: e.to_string(),
                })
            }),
        };
        let service = self.headers_layer().wrap(Http2Service { send });
        Ok((service, connection))
    }
}

/// The connection future of a [`Channel::connect`]: drives the HTTP/2 connection until it closes.
#[must_use = "requests make no progress unless the connection is polled"]
pub struct Connection {
    future: Pin<Box<dyn Future<Output = Result<(), ChannelError>> + Send>>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Future for Connection {
    type Output = Result<(), ChannelError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.future.as_mut().poll(cx)
    }
}

/// The error type of the services here (what tonic's `GrpcService` expects).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed response future.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, BoxError>> + Send>>;

/// Requests over one HTTP/2 connection (hyper's `SendRequest`), as a tower service.
#[derive(Debug, Clone)]
pub struct Http2Service {
    send: http2::SendRequest<tonic::body::Body>,
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Http2Service {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let response = self.send.send_request(req);
        Box::pin(async move { response.await.map_err(Into::into) })
    }
}

/// The service a [`Channel::connect`] returns: the headers layer over the HTTP/2 connection.
pub type GrpcService = Headers<Http2Service>;

/// The tower layer that adds, to every request: `authorization: Bearer <token>` (a token file
/// re-read each time), `clusterid`, and the extra headers of the [`ChannelConfig`].
#[derive(Debug, Clone)]
pub struct HeadersLayer {
    headers: Arc<HeaderSet>,
}

impl HeadersLayer {
    fn wrap<S>(&self, inner: S) -> Headers<S> {
        Headers {
            inner,
            headers: self.headers.clone(),
        }
    }
}

impl<S> tower_layer::Layer<S> for HeadersLayer {
    type Service = Headers<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.wrap(inner)
    }
}

/// The service made by [`HeadersLayer`].
#[derive(Debug, Clone)]
pub struct Headers<S> {
    inner: S,
    headers: Arc<HeaderSet>,
}

impl<S, B> tower_service::Service<http::Request<B>> for Headers<S>
where
    S: tower_service::Service<http::Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let map = req.headers_mut();
        for (name, value) in &self.headers.fixed {
            map.insert(name.clone(), value.clone());
        }
        if let Some(token) = &self.headers.token {
            match token.header_value() {
                Ok(value) => {
                    map.insert(http::header::AUTHORIZATION, value);
                }
                Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = Address::parse("istiod.istio-system.svc:15012").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.host(), a.port()), ("istiod.istio-system.svc", 15012));
        let a = Address::parse("https://10.0.0.1:15012/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.host(), a.port()), ("10.0.0.1", 15012));
        let a = Address::parse("[fd00::1]:15012").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.host(), "fd00::1");
        assert_eq!(a.to_string(), "[fd00::1]:15012");
        for bad in [
            "",
            "istiod",
            "http://istiod:15012",
            "istiod:http",
            "istiod:0",
            "istiod:15012/x",
            "[zz]:1",
        ] {
            let e = Address::parse(bad).err().unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn headers_are_checked_and_lower_cased() {
        let address = Address::parse("istiod:15012").unwrap_or_else(|e| panic!("{e}"));
        let config = ChannelConfig::new(address.clone(), Roots::System).header("X-Team_Name", "blue");
        let channel = Channel::new(config).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = channel.inner.headers.fixed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["clusterid", "x-team_name"]);
        let bad = ChannelConfig::new(address, Roots::System).header("bad name", "v");
        let e = Channel::new(bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("\"bad name\""), "{e}");
    }
}
