//! Glommio fixtures: the runtime seam in glommio terms (timer, executor, pool connector), loopback
//! TCP servers (echo, checksumming sink) and an HBONE server whose handler splices tunnels to
//! glommio TCP streams, plus a helper that runs a whole server side on its own glommio executor.
//!
//! Everything here is thread-local (`Rc`, `Cell`, `spawn_local`), as a thread-per-core proxy would
//! be; only addresses, TLS configs and stop signals cross threads.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use futures_util::future::{Either, select};
use glommio::net::{TcpListener, TcpStream};
use glommio::{BuilderErrorKind, ExecutorJoinHandle, GlommioError, LocalExecutorBuilder, Placement};
use meshwire_hbone::client::{self, ClientConnection};
use meshwire_hbone::pool::{Connector, PoolKey};
use meshwire_hbone::server::{
    self, Connected, Handler, InboundRequest, Refusal, ServeOptions, ServeSummary, StreamReport,
};
use meshwire_hbone::{ConnectError, Settings};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::data::{Fnv, pattern};

/// A glommio TCP stream seen through the `tokio::io` traits.
pub type GlommioTcp = Compat<TcpStream>;

/// How long any single wait may take before the test fails instead of hanging.
pub const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The runtime seam
// ---------------------------------------------------------------------------------------------

pub use meshwire_rt::{GlommioExecutor, GlommioTimer};

/// Pool connector: a glommio TCP connection to the key's destination, and a fixed client config.
pub struct GlommioConnector {
    /// The client config every connection uses.
    pub tls: Arc<rustls::ClientConfig>,
}

impl Connector for GlommioConnector {
    type Io = GlommioTcp;

    async fn connect(&self, key: &PoolKey) -> Result<(GlommioTcp, Arc<rustls::ClientConfig>), ConnectError> {
        let tcp = tcp_connect(key.destination).await.map_err(|e| ConnectError::Tcp {
            peer: key.destination,
            source: Arc::new(e),
        })?;
        Ok((tcp, self.tls.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Running things
// ---------------------------------------------------------------------------------------------

/// Runs `fut_gen()` on a new glommio executor thread and returns its output; a panic inside
/// (a failed assertion) fails the caller.
pub fn run<G, F, T>(name: &str, placement: Placement, fut_gen: G) -> T
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let handle = LocalExecutorBuilder::new(placement)
        .name(name)
        .spawn(fut_gen)
        .unwrap_or_else(|e| panic!("cannot start glommio executor {name}: {e}"));
    join(name, handle)
}

/// Joins an executor thread; its panic (a failed assertion) is re-raised here with its message.
pub fn join<T: Send + 'static>(name: &str, handle: ExecutorJoinHandle<T>) -> T {
    match handle.join() {
        Ok(out) => out,
        Err(GlommioError::BuilderError(BuilderErrorKind::ThreadPanic(payload))) => std::panic::resume_unwind(payload),
        Err(e) => panic!("glommio executor {name} failed: {e}"),
    }
}

/// `fut`'s output, or a panic naming `what` if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match select(pin!(fut), pin!(glommio::timer::sleep(limit))).await {
        Either::Left((out, _)) => out,
        Either::Right(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// Polls `cond` every millisecond until it holds; fails after [`LIMIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(LIMIT, what, async {
        while !cond() {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// The CPUs the calling thread may run on, as the kernel lists them (`0-1`, `1`, ...).
pub fn allowed_cpus() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// A drain signal local to one executor: `fire` once, every `wait` future completes.
#[derive(Clone, Default)]
pub struct Drain(Rc<DrainState>);

#[derive(Default)]
/// The state a [`Drain`] shares: fired or not, and who waits.
pub struct DrainState {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Drain {
    /// Fires the drain: every `wait` future completes.
    pub fn fire(&self) {
        self.0.fired.set(true);
        for w in self.0.wakers.take() {
            w.wake();
        }
    }

    /// Completes once the drain has fired.
    pub fn wait(&self) -> impl Future<Output = ()> + 'static {
        let state = self.0.clone();
        poll_fn(move |cx| {
            if state.fired.get() {
                return Poll::Ready(());
            }
            // `serve` polls this on every wake-up of its connection: register each task once.
            let mut wakers = state.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

// ---------------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------------

/// Connects a glommio TCP stream (no Nagle) and wraps it for the `tokio::io` traits.
pub async fn tcp_connect(addr: SocketAddr) -> io::Result<GlommioTcp> {
    let tcp = TcpStream::connect(addr).await.map_err(io::Error::from)?;
    tcp.set_nodelay(true).map_err(io::Error::from)?;
    Ok(tcp.compat())
}

/// A glommio listener on an ephemeral loopback port.
pub fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Accepts one connection (no Nagle), wrapped for the `tokio::io` traits.
pub async fn accept(listener: &TcpListener) -> io::Result<GlommioTcp> {
    let tcp = listener.accept().await.map_err(io::Error::from)?;
    tcp.set_nodelay(true).map_err(io::Error::from)?;
    Ok(tcp.compat())
}

/// Echoes everything back; on end of input, half-closes after the last byte.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = s.shutdown().await;
}

/// Reads to the end while checksumming, then answers the checksum and the byte count (16 bytes,
/// big endian) and closes.
pub async fn sink<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = Fnv::new();
    let mut n = 0u64;
    loop {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        sum.update(&buf[..k]);
        n += k as u64;
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&sum.0.to_be_bytes());
    reply[8..].copy_from_slice(&n.to_be_bytes());
    s.write_all(&reply).await?;
    s.shutdown().await?;
    Ok((n, sum.0))
}

/// Sends `total` bytes (1 MiB blocks of test data, each marked with its index so reordering shows)
/// into `s`, half-closes, and checks the [`sink`]'s answer against what was sent.
pub async fn send_to_sink<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, total: usize, seed: u32) {
    const BLOCK: usize = 1 << 20;
    assert_eq!(total % BLOCK, 0);
    let mut block = pattern(BLOCK, seed);
    let mut sent = Fnv::new();
    for i in 0..total / BLOCK {
        block[0] = i as u8;
        block[BLOCK / 2] = (i >> 8) as u8;
        sent.update(&block);
        s.write_all(&block).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).await.unwrap();
    let far_sum = u64::from_be_bytes(reply[..8].try_into().unwrap());
    let far_n = u64::from_be_bytes(reply[8..].try_into().unwrap());
    assert_eq!(far_n, total as u64, "bytes received at the far end");
    assert_eq!(far_sum, sent.0, "checksum at the far end");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing after the sink's answer");
}

/// A glommio echo server on loopback, running on the current executor.
pub fn spawn_echo_server() -> SocketAddr {
    let (listener, addr) = listen();
    glommio::spawn_local(async move {
        while let Ok(tcp) = accept(&listener).await {
            glommio::spawn_local(echo(tcp)).detach();
        }
    })
    .detach();
    addr
}

/// A glommio checksumming sink on loopback (see [`sink`]), running on the current executor.
pub fn spawn_sink_server() -> SocketAddr {
    let (listener, addr) = listen();
    glommio::spawn_local(async move {
        while let Ok(tcp) = accept(&listener).await {
            glommio::spawn_local(async move {
                let _ = sink(tcp).await;
            })
            .detach();
        }
    })
    .detach();
    addr
}

// ---------------------------------------------------------------------------------------------
// HBONE
// ---------------------------------------------------------------------------------------------

/// Connects to the authority on loopback with glommio: 401 for port 1, 503 when the connect fails.
#[derive(Default)]
pub struct GlommioHandler {
    /// What every finished stream reported.
    pub reports: RefCell<Vec<StreamReport>>,
    /// How many streams finished.
    pub finished: Cell<u64>,
}

impl Handler for GlommioHandler {
    type Upstream = GlommioTcp;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<GlommioTcp>, Refusal> {
        let addr = crate::net::loopback_destination(request)?;
        tcp_connect(addr)
            .await
            .map(Connected::from)
            .map_err(|e| Refusal::unavailable(format!("connect {addr}: {e}")))
    }

    fn finished(&self, report: StreamReport) {
        self.finished.set(self.finished.get() + 1);
        self.reports.borrow_mut().push(report);
    }
}

/// An HBONE server on the current glommio executor; `drain.fire()` drains every connection.
pub struct GlommioHboneServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its handler: what the streams did.
    pub handler: Rc<GlommioHandler>,
    /// Fire to drain every connection.
    pub drain: Drain,
    /// Connections served to their end without error.
    pub served: Rc<RefCell<Vec<ServeSummary>>>,
    /// Connections that ended with an error.
    pub errors: Rc<RefCell<Vec<String>>>,
}

/// Starts an HBONE server (accept loop plus one `serve` task per connection) on the current executor.
pub fn spawn_hbone_server(tls: Arc<rustls::ServerConfig>, options: ServeOptions) -> GlommioHboneServer {
    let (listener, addr) = listen();
    let handler = Rc::new(GlommioHandler::default());
    let drain = Drain::default();
    let served = Rc::new(RefCell::new(Vec::new()));
    let errors = Rc::new(RefCell::new(Vec::new()));
    let (h, d, done, errs) = (handler.clone(), drain.clone(), served.clone(), errors.clone());
    glommio::spawn_local(async move {
        loop {
            let Ok(tcp) = listener.accept().await else {
                return;
            };
            let peer = tcp.peer_addr().map_or_else(|e| format!("?: {e}"), |a| a.to_string());
            let _ = tcp.set_nodelay(true);
            let (tls, options, h, stop) = (tls.clone(), options.clone(), h.clone(), d.wait());
            let (done, errs) = (done.clone(), errs.clone());
            glommio::spawn_local(async move {
                match server::serve(tcp.compat(), tls, &options, &*h, &GlommioTimer, stop).await {
                    Ok(summary) => done.borrow_mut().push(summary),
                    Err(e) => errs.borrow_mut().push(format!("{peer}: {e}")),
                }
            })
            .detach();
        }
    })
    .detach();
    GlommioHboneServer {
        addr,
        handler,
        drain,
        served,
        errors,
    }
}

/// TLS + HTTP/2 handshake over a glommio TCP connection; the driver runs on the current executor.
pub async fn glommio_client(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<ClientConnection, ConnectError> {
    let tcp = tcp_connect(addr).await.unwrap();
    let (conn, driver) = client::handshake(tcp, tls, &Settings::default(), GlommioTimer).await?;
    glommio::spawn_local(async move {
        let _ = driver.await;
    })
    .detach();
    Ok(conn)
}

/// A whole server side (HBONE server, echo server, sink) on its own glommio executor thread.
/// Stopped (and joined) on drop.
pub struct ServerThread {
    /// The HBONE server.
    pub hbone: SocketAddr,
    /// The TCP echo server.
    pub echo: SocketAddr,
    /// The checksumming sink.
    pub sink: SocketAddr,
    /// The CPUs the executor thread may run on (`Cpus_allowed_list` of `/proc/thread-self/status`).
    pub cpus: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<ExecutorJoinHandle<()>>,
}

/// Starts a [`ServerThread`] placed as asked.
pub fn server_thread(
    name: &str,
    placement: Placement,
    tls: Arc<rustls::ServerConfig>,
    options: ServeOptions,
) -> ServerThread {
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
    // tokio's oneshot needs no runtime: the glommio side awaits it, the test thread fires it.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = LocalExecutorBuilder::new(placement)
        .name(name)
        .spawn(move || async move {
            let server = spawn_hbone_server(tls, options);
            let echo = spawn_echo_server();
            let sink = spawn_sink_server();
            addrs_tx.send((server.addr, echo, sink, allowed_cpus())).unwrap();
            let _ = stop_rx.await;
            // Returning drops every task of this executor: listeners, connections, streams.
        })
        .unwrap_or_else(|e| panic!("cannot start glommio executor {name}: {e}"));
    let (hbone, echo, sink, cpus) = addrs_rx.recv_timeout(LIMIT).expect("the server executor started");
    ServerThread {
        hbone,
        echo,
        sink,
        cpus,
        stop: Some(stop_tx),
        handle: Some(handle),
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            if std::thread::panicking() {
                let _ = handle.join();
            } else {
                join("server", handle);
            }
        }
    }
}
