//! An HTTP/1.1 client for the proxies' control endpoints (readiness, metrics, admin), on hyper's
//! client: one request a connection (`Connection: close`), the whole body read as text.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, Method, Request};
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long [`request_blocking`] waits for the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`request_blocking`] waits for the whole response once connected.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP response: status, headers and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, as text (invalid UTF-8 replaced).
    pub body: String,
    /// The body as it came.
    pub bytes: Vec<u8>,
}

impl Response {
    /// The first header called `name` (any case), when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Sends one request (`Connection: close`, `Content-Length: 0`, and `headers`) to `addr` for `path`,
/// and reads the whole response. Errors name the step that failed: connecting, the exchange (a
/// malformed response among others: hyper checks the framing, chunked or by length), the body.
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    let tcp = TcpStream::connect(addr).await?;
    exchange(tcp, addr, method, path, headers).await
}

/// The exchange of [`request`] on `tcp`, connected to `addr`.
async fn exchange(
    tcp: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<Response> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| other("HTTP handshake", e))?;
    let connection = tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).map_err(|e| other("method", e))?)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONNECTION, "close")
        .header(http::header::CONTENT_LENGTH, "0");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(String::new()).map_err(|e| other("request", e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| other(&format!("{method} {path} to {addr}"), e))?;
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| other(&format!("body of {method} {path} from {addr}"), e))?;
        if let Some(data) = frame.data_ref() {
            bytes.extend_from_slice(data);
        }
    }
    // The server closes after its response (`Connection: close`): the connection task ends.
    let _ = connection.await;
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    })
}

/// [`request`] from a plain thread (on a runtime of its own), without extra headers: connected
/// within [`CONNECT_TIMEOUT`], answered within [`RESPONSE_TIMEOUT`].
pub fn request_blocking(addr: SocketAddr, method: &str, path: &str) -> io::Result<Response> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let timed_out = |what: &str, within: Duration| {
            io::Error::new(io::ErrorKind::TimedOut, format!("{what} {addr} within {within:?}"))
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out("no connection to", CONNECT_TIMEOUT))??;
        tokio::time::timeout(RESPONSE_TIMEOUT, exchange(tcp, addr, method, path, &[]))
            .await
            .map_err(|_| timed_out("no response from", RESPONSE_TIMEOUT))?
    })
}
