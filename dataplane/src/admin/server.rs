//! The HTTP/1.1 driver shared by the three control listeners: accept, serve each connection with
//! hyper, stop with the drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long requests in progress may take to finish once the server is told to stop; connections
/// still open after that are closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Answers requests to one control listener. Pure: a request's method, URI and headers in (the body
/// is not read), a response out; no IO, so handlers are tested without sockets and any runtime can
/// drive them.
pub trait Handler: Send + Sync + 'static {
    /// The response to `request`, with its whole body.
    fn handle(&self, request: &Request<()>) -> Response<Bytes>;

    /// The response to `request` as [`serve`] sends it: by default [`Handler::handle`]'s whole
    /// body; a handler whose answer can be large gives a [`Body::Chunks`] instead, produced as the
    /// connection takes it.
    fn respond(&self, request: &Request<()>) -> Response<Body> {
        self.handle(request).map(Body::from)
    }

    /// The response to `request` when it takes time to make (a profile samples for seconds):
    /// [`serve`] awaits it, on the connection's task, instead of calling [`Handler::respond`].
    /// `None` (the default) for a request answered at once.
    fn respond_later(&self, _request: &Request<()>) -> Option<LaterResponse> {
        None
    }
}

/// A response [`Handler::respond_later`] makes asynchronously.
pub type LaterResponse = std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

impl<H: Handler + ?Sized> Handler for Arc<H> {
    fn handle(&self, request: &Request<()>) -> Response<Bytes> {
        (**self).handle(request)
    }

    fn respond(&self, request: &Request<()>) -> Response<Body> {
        (**self).respond(request)
    }

    fn respond_later(&self, request: &Request<()>) -> Option<LaterResponse> {
        (**self).respond_later(request)
    }
}

/// A response body: whole, or chunks produced one at a time as the connection takes them, so that
/// a large answer never sits whole in memory (sent with `Transfer-Encoding: chunked`).
pub enum Body {
    /// The whole body (taken when sent).
    Full(Option<Bytes>),
    /// The chunks, each produced when the connection has room for it.
    Chunks(Box<dyn Iterator<Item = Bytes> + Send>),
}

impl Body {
    /// Every chunk, gathered into one buffer (for tests and small answers).
    pub fn collect(self) -> Bytes {
        match self {
            Body::Full(bytes) => bytes.unwrap_or_default(),
            Body::Chunks(chunks) => {
                let mut all = Vec::new();
                chunks.for_each(|chunk| all.extend_from_slice(&chunk));
                Bytes::from(all)
            }
        }
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body::Full(Some(bytes))
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Full(bytes) => f.debug_tuple("Full").field(&bytes.as_ref().map(Bytes::len)).finish(),
            Body::Chunks(_) => f.write_str("Chunks(..)"),
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let next = match self.get_mut() {
            Body::Full(bytes) => bytes.take().filter(|bytes| !bytes.is_empty()),
            Body::Chunks(chunks) => chunks.next(),
        };
        std::task::Poll::Ready(next.map(|bytes| Ok(hyper::body::Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(bytes) => hyper::body::SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Chunks(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Serves `handler` on `listener` (HTTP/1.1, keep-alive) until `shutdown` resolves; then stops
/// accepting, lets requests in progress finish for up to [`SHUTDOWN_GRACE`], and returns.
///
/// Spawns one tokio task per connection: it runs on the control thread, in both binaries. `name`
/// names the listener in logs.
pub async fn serve<H: Handler>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) {
    let handler = Arc::new(handler);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let stop = stop_rx.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (parts, _body) = request.into_parts();
                let request = Request::from_parts(parts, ());
                let response: LaterResponse = match handler.respond_later(&request) {
                    Some(later) => later,
                    None => Box::pin(std::future::ready(handler.respond(&request))),
                };
                async move { Ok::<_, Infallible>(response.await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopped(stop) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(listener = name, %peer, %error, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::debug!(
            listener = name,
            open = connections.len(),
            "closing HTTP connections after the grace period"
        );
    }
    connections.abort_all();
}

/// Resolves once `stop` says stop (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// A response with `status`, a `Content-Type` and `body`.
pub fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    response(status, "text/plain; charset=utf-8", body)
}

/// 404, naming the path.
pub fn not_found(request: &Request<()>) -> Response<Bytes> {
    text(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}\n", request.uri().path()),
    )
}

/// 405 with an `Allow` header listing `allowed`.
pub fn method_not_allowed(request: &Request<()>, allowed: &[Method]) -> Response<Bytes> {
    let allow = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} not allowed on {}; allowed: {allow}\n",
            request.method(),
            request.uri().path()
        ),
    );
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}

/// Whether `request` may read: `GET` or `HEAD`.
pub(crate) fn is_read(request: &Request<()>) -> bool {
    matches!(*request.method(), Method::GET | Method::HEAD)
}

/// The value of the query parameter `name`, percent-decoded (`+` is a space), if present.
pub fn query_param(request: &Request<()>, name: &str) -> Option<String> {
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

/// Decodes `%XX` escapes and `+` (form encoding); malformed escapes are kept as written.
fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn get(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).unwrap()
    }

    #[test]
    fn query_params_are_percent_decoded() {
        let request = get("/logging?x=1&level=meshwire%3Ddebug%2Ch2%3Dwarn&y");
        assert_eq!(
            query_param(&request, "level").as_deref(),
            Some("meshwire=debug,h2=warn")
        );
        assert_eq!(query_param(&request, "y").as_deref(), Some(""));
        assert_eq!(query_param(&request, "z"), None);
        assert_eq!(
            query_param(&get("/logging?level=a+b%2"), "level").as_deref(),
            Some("a b%2")
        );
        assert_eq!(
            query_param(&get("/logging?level=%zz%41"), "level").as_deref(),
            Some("%zzA")
        );
        assert_eq!(query_param(&get("/logging"), "level"), None);
    }
}
