//! The glommio side of the runtime seam: [`Glommio`] (what glommio does its own way: its
//! [`Native`]), hence [`GlommioRuntime`] (the [`Runtime`] the per-connection proxy logic runs
//! over) and the HBONE pool's [`GlommioConnector`]; connecting sockets made by the
//! [`SocketFactory`]. Its timer, executor and stream are
//! `meshwire-rt`'s ([`GlommioTimer`], [`GlommioExecutor`], [`UringStream`]), re-exported here.
//!
//! Everything here is thread-local, as a thread-per-core proxy is: it must be used on a glommio
//! executor thread, and nothing is `Send`.
//!
//! # Sockets made elsewhere, without `unsafe` here
//!
//! glommio 0.9 connects only sockets it makes itself, and its streams offer their descriptor only as
//! a raw number (`AsRawFd`). Two bridges keep every socket going through the factory:
//! - **connect** ([`connect`]): the factory's socket starts a non-blocking `connect` and becomes a
//!   glommio stream at once (through `std::net::TcpStream` and the socket2 version glommio converts
//!   from); glommio's write readiness (an io_uring poll, armed by a zero-length send that would
//!   block while the socket connects) says when the connect ended, bounded by the timeout, and
//!   `SO_ERROR` whether it succeeded. No thread hop.
//! - **socket operations** on a glommio stream: [`UringStream`] lends its descriptor (`AsFd`, the
//!   one borrow `meshwire-rt` makes), so `SO_ORIGINAL_DST`, `SO_LINGER` and `TCP_NODELAY` are read
//!   and set on the stream's own socket, as on tokio's. [`duplicate`] (`pidfd_getfd(2)` on the
//!   proxy's own process) gives an owned duplicate where one is needed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::time::Duration;

use meshwire_dataplane::rt::datagram::Datagram;
use meshwire_dataplane::rt::native::{Native, PoolConnector, ProxyRuntime};
use meshwire_dataplane::rt::netns::ProxySocketFactory;
use meshwire_dataplane::rt::socket::{SocketError, SocketOp, SocketTarget};
#[cfg(doc)]
use meshwire_dataplane::rt::{Runtime, socket::SocketFactory};
pub use meshwire_rt::glommio::{GlommioExecutor, GlommioSleep, GlommioTimer, UringStream};
use socket2::Socket;

/// A glommio TCP stream seen through the `tokio::io` traits (what the proxy logic reads and writes):
/// a [`UringStream`].
pub type GlommioStream = UringStream;

/// An owned duplicate of the socket behind `fd` (a descriptor of this process), through
/// `pidfd_getfd(2)`: socket options read or set on it are the original socket's.
pub fn duplicate(fd: RawFd) -> io::Result<Socket> {
    meshwire_rt::glommio::stream::duplicate(fd).map(Socket::from)
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
        match outcome {
            None => {
                let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"));
                return Err(fail(e));
            }
            Some(result) => {
                // SO_ERROR is the connect's own error; the send's may only echo it.
                if let Some(e) = socket2::SockRef::from(&stream).take_error().map_err(fail)? {
                    return Err(fail(e));
                }
                result.map_err(fail)?;
            }
        }
    }
    Ok(stream)
}

/// glommio as the proxy's [`Native`]: [`GlommioStream`]s, [`GlommioTimer`], [`GlommioExecutor`],
/// and [`connect`] for the factory's sockets; socket operations on a stream go through
/// [`duplicate`]. Everything must be used on a glommio executor thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct Glommio;

impl Native for Glommio {
    type Stream = GlommioStream;
    type Timer = GlommioTimer;
    type Executor = GlommioExecutor;

    fn connect(socket: Socket, peer: SocketAddr, timeout: Duration) -> impl Future<Output = io::Result<GlommioStream>> {
        connect(socket, peer, timeout)
    }
}

impl Datagram for Glommio {
    type Udp = glommio::net::UdpSocket;
    type Listener = glommio::net::TcpListener;

    fn udp(socket: Socket) -> io::Result<glommio::net::UdpSocket> {
        crate::listener::udp(socket)
    }

    async fn recv_from(udp: &glommio::net::UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        udp.recv_from(buf).await.map_err(io::Error::from)
    }

    async fn send_to(udp: &glommio::net::UdpSocket, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        udp.send_to(buf, to).await.map_err(io::Error::from)
    }

    fn listener(socket: Socket) -> io::Result<glommio::net::TcpListener> {
        crate::listener::tcp(socket)
    }

    async fn accept(listener: &glommio::net::TcpListener) -> io::Result<GlommioStream> {
        Ok(UringStream::new(listener.accept().await?))
    }
}

/// The [`Runtime`] of the io_uring build: glommio streams, timers
/// and tasks; sockets from the socket factory `F`.
pub type GlommioRuntime<F = ProxySocketFactory> = ProxyRuntime<Glommio, F>;

/// The HBONE pool's connector on glommio (see [`PoolConnector`]).
pub type GlommioConnector<S, F = ProxySocketFactory> = PoolConnector<Glommio, S, F>;
