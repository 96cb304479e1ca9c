//! The glommio side of the runtime seam: [`GlommioRuntime`] (the
//! [`Runtime`] the per-connection proxy logic runs over), its timer and executor, connecting
//! sockets made by the [`SocketFactory`], and the HBONE pool's [`GlommioConnector`].
//!
//! Everything here is thread-local, as a thread-per-core proxy is: it must be used on a glommio
//! executor thread, and nothing is `Send`.
//!
//! # Sockets made elsewhere, without `unsafe`
//!
//! glommio 0.9 connects only sockets it makes itself, and its streams offer their descriptor only as
//! a raw number (`AsRawFd`). Two safe bridges keep every socket going through the factory:
//! - **connect** ([`connect`]): the factory's socket starts a non-blocking `connect` and becomes a
//!   glommio stream at once (through `std::net::TcpStream` and the socket2 version glommio converts
//!   from); glommio's write readiness (an io_uring poll, armed by a zero-length send that would
//!   block while the socket connects) says when the connect ended, bounded by the timeout, and
//!   `SO_ERROR` whether it succeeded. No thread hop.
//! - **socket operations** on a glommio stream ([`duplicate`]): `pidfd_getfd(2)` on the proxy's own
//!   process returns an owned duplicate of the stream's descriptor; options read or set on the
//!   duplicate are those of the same socket (`SO_ORIGINAL_DST`, `SO_LINGER`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use meshwire_dataplane::rt::Runtime;
use meshwire_dataplane::rt::connector::{ClientTlsSource, ConnectorConfig, pool_connect};
use meshwire_dataplane::rt::socket::{
    self, DefaultSocketFactory, SocketError, SocketFactory, SocketOp, SocketOptions, SocketTarget,
};
use meshwire_hbone::ConnectError;
use meshwire_hbone::pool::{Connector, PoolKey};
use meshwire_hbone::rt::{Executor, Timer};
use rustls::ClientConfig;
use socket2::Socket;

use crate::stream::UringStream;

/// A glommio TCP stream seen through the `tokio::io` traits (what the proxy logic reads and writes):
/// a [`UringStream`].
pub type GlommioStream = UringStream;

/// [`Timer`] over glommio's reactor timers. Must be used on a glommio executor thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioTimer;

/// A glommio sleep resolving to `()` (glommio's timer resolves to the instant it fired at).
#[derive(Debug)]
pub struct GlommioSleep(glommio::timer::Timer);

impl Future for GlommioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}

impl Timer for GlommioTimer {
    type Sleep = GlommioSleep;

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: Instant) -> GlommioSleep {
        GlommioSleep(glommio::timer::Timer::new(
            deadline.saturating_duration_since(Instant::now()),
        ))
    }
}

/// [`Executor`] over `glommio::spawn_local`: the task stays on the calling executor's core.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioExecutor;

impl<F: Future<Output = ()> + 'static> Executor<F> for GlommioExecutor {
    fn execute(&self, future: F) {
        glommio::spawn_local(future).detach();
    }
}

/// An owned duplicate of the socket behind `fd` (a descriptor of this process), through
/// `pidfd_getfd(2)`: socket options read or set on it are the original socket's.
pub fn duplicate(fd: RawFd) -> io::Result<Socket> {
    crate::stream::duplicate(fd).map(Socket::from)
}

/// Connects an unconnected, non-blocking socket (as made by [`SocketFactory::stream`]) to `peer`,
/// keeping its options and bind, failing with [`io::ErrorKind::TimedOut`] after `timeout`; the
/// error names the peer and the local address. Must run on a glommio executor thread.
///
/// The connect is started on the socket, which then becomes a glommio stream at once; glommio's
/// write readiness (an io_uring poll: a zero-length send on a socket still connecting would block)
/// says when the connect ended, and `SO_ERROR` whether it succeeded.
pub async fn connect(socket: Socket, peer: SocketAddr, timeout: Duration) -> io::Result<GlommioStream> {
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|a| !a.ip().is_unspecified());
    let target = SocketTarget::Outbound { peer, local };
    let fail = |e: io::Error| SocketError::io(SocketOp::Connect, target.clone(), e);
    socket
        .set_nonblocking(true)
        .map_err(|e| SocketError::io(SocketOp::Register, target.clone(), e))?;
    let pending = match socket.connect(&peer.into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => true,
        Err(e) => return Err(fail(e)),
    };
    let std_stream = std::net::TcpStream::from(socket);
    let mut stream = UringStream::new(glommio::net::TcpStream::from(socket2_glommio::Socket::from(std_stream)));
    if pending {
        let writable = std::future::poll_fn(|cx| {
            use futures_util::io::AsyncWrite as _;
            Pin::new(stream.get_mut()).poll_write(cx, &[])
        });
        let outcome = meshwire_hbone::rt::timeout(&GlommioTimer, timeout, writable).await;
        let sock = stream.socket().map_err(fail)?;
        match outcome {
            None => {
                let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"));
                return Err(fail(e));
            }
            Some(result) => {
                // SO_ERROR is the connect's own error; the send's may only echo it.
                if let Some(e) = sock.take_error().map_err(fail)? {
                    return Err(fail(e));
                }
                result.map_err(fail)?;
            }
        }
    }
    Ok(stream)
}

/// The [`Runtime`] of the io_uring build: glommio streams, timers and tasks; sockets from the
/// socket factory `F`.
#[derive(Debug, Clone, Default)]
pub struct GlommioRuntime<F = DefaultSocketFactory> {
    factory: F,
}

impl GlommioRuntime {
    /// The runtime connecting with the [`DefaultSocketFactory`].
    pub fn new() -> Self {
        Self::default()
    }
}

impl<F> GlommioRuntime<F> {
    /// The runtime connecting with `factory`.
    pub fn with_factory(factory: F) -> Self {
        Self { factory }
    }

    /// The socket factory.
    pub fn factory(&self) -> &F {
        &self.factory
    }
}

impl<F: SocketFactory + 'static> Runtime for GlommioRuntime<F> {
    type Stream = GlommioStream;
    type Timer = GlommioTimer;
    type Executor = GlommioExecutor;
    type Connector<S> = GlommioConnector<S, F>;

    fn timer(&self) -> GlommioTimer {
        GlommioTimer
    }

    async fn connect(&self, dst: SocketAddr, opts: &SocketOptions, timeout: Duration) -> io::Result<GlommioStream> {
        connect(self.factory.stream(dst, None, opts)?, dst, timeout).await
    }

    fn local_addr(stream: &GlommioStream) -> io::Result<SocketAddr> {
        stream.local_addr()
    }

    fn peer_addr(stream: &GlommioStream) -> io::Result<SocketAddr> {
        stream.peer_addr()
    }

    fn original_destination(stream: &GlommioStream) -> io::Result<SocketAddr> {
        socket::original_destination(&stream.socket()?)
    }

    fn reset_on_close(stream: &GlommioStream) -> io::Result<()> {
        socket::reset_on_close(&stream.socket()?)
    }
}

/// The HBONE pool's connector on glommio: the TCP connection to a [`PoolKey`]'s destination (from
/// its source IP if set), with `TCP_NODELAY` on, through a [`SocketFactory`]; and the client TLS
/// config for the key from `tls`.
#[derive(Debug, Clone)]
pub struct GlommioConnector<S, F = DefaultSocketFactory> {
    tls: S,
    factory: F,
    config: ConnectorConfig,
}

impl<S> GlommioConnector<S> {
    /// A connector making sockets with the [`DefaultSocketFactory`].
    pub fn new(tls: S, config: ConnectorConfig) -> Self {
        Self::with_factory(tls, DefaultSocketFactory, config)
    }
}

impl<S, F: SocketFactory> GlommioConnector<S, F> {
    /// A connector making sockets with `factory`.
    pub fn with_factory(tls: S, factory: F, config: ConnectorConfig) -> Self {
        let mut config = config;
        config.socket.nodelay = true;
        Self { tls, factory, config }
    }
}

impl<S: ClientTlsSource, F: SocketFactory> Connector for GlommioConnector<S, F> {
    type Io = GlommioStream;

    /// [`pool_connect`] with glommio's [`connect`].
    async fn connect(&self, key: &PoolKey) -> Result<(GlommioStream, Arc<ClientConfig>), ConnectError> {
        pool_connect(&self.tls, &self.factory, &self.config, key, connect).await
    }
}
