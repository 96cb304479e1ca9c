//! The tokio side of the runtime seam: [`Tokio`] (what tokio does its own way: its [`Native`]),
//! hence [`TokioRuntime`] (the [`Runtime`](super::Runtime) of the `ztunnel` binary) and the HBONE
//! pool's [`TokioConnector`]; listeners and streams made from the [`SocketFactory`]'s sockets. Its
//! timer and executor are `meshwire-rt`'s [`TokioTimer`] and [`TokioExecutor`], re-exported here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub use meshwire_rt::{TokioExecutor, TokioTimer};
use socket2::Socket;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

pub use super::connector::{ClientTlsSource, ConnectorConfig};
use super::datagram::Datagram;
use super::native::{Native, PoolConnector, ProxyRuntime};
use super::netns::ProxySocketFactory;
use super::socket::{SocketError, SocketFactory, SocketOp, SocketOptions, SocketTarget};

/// The tokio runtime as the proxy's [`Native`]: [`TcpStream`]s, [`TokioTimer`], [`TokioExecutor`],
/// and [`connect`] for the factory's sockets.
///
/// Streams and sleeps must be used inside a tokio runtime with IO and time enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokio;

impl Native for Tokio {
    type Stream = TcpStream;
    type Timer = TokioTimer;
    type Executor = TokioExecutor;

    fn connect(socket: Socket, peer: SocketAddr, timeout: Duration) -> impl Future<Output = io::Result<TcpStream>> {
        connect(socket, peer, timeout)
    }
}

impl Datagram for Tokio {
    type Udp = UdpSocket;
    type Listener = TcpListener;

    fn udp(socket: Socket) -> io::Result<UdpSocket> {
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket.into())
    }

    fn recv_from(udp: &UdpSocket, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>> {
        udp.recv_from(buf)
    }

    fn send_to(udp: &UdpSocket, buf: &[u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>> {
        udp.send_to(buf, to)
    }

    fn listener(socket: Socket) -> io::Result<TcpListener> {
        into_listener(socket)
    }

    async fn accept(listener: &TcpListener) -> io::Result<TcpStream> {
        listener.accept().await.map(|(stream, _)| stream)
    }
}

/// The [`Runtime`](super::Runtime) on tokio (the `ztunnel` binary's): [`TcpStream`]s,
/// [`TokioTimer`], [`TokioExecutor`] and [`TokioConnector`], connecting through the socket factory
/// `F`. Its futures are `Send` (when `F` is `Sync`), as a multi-threaded tokio runtime needs to
/// spawn them.
pub type TokioRuntime<F = ProxySocketFactory> = ProxyRuntime<Tokio, F>;

/// The HBONE pool's connector on tokio (see [`PoolConnector`]).
pub type TokioConnector<S, F = ProxySocketFactory> = PoolConnector<Tokio, S, F>;

/// A tokio listener from a listening socket (as made by [`SocketFactory::listener`]). Must be
/// called inside a runtime with IO enabled.
pub fn into_listener(socket: Socket) -> io::Result<TcpListener> {
    let addr = socket.local_addr().ok().and_then(|a| a.as_socket());
    let target = SocketTarget::Listener(addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))));
    socket
        .set_nonblocking(true)
        .map_err(|e| SocketError::io(SocketOp::Register, target.clone(), e))?;
    TcpListener::from_std(socket.into()).map_err(|e| SocketError::io(SocketOp::Register, target, e))
}

/// A listener on `addr` made by `factory` with `opts`.
pub fn bind_listener<F: SocketFactory + ?Sized>(
    factory: &F,
    addr: SocketAddr,
    opts: &SocketOptions,
) -> io::Result<TcpListener> {
    into_listener(factory.listener(addr, opts)?)
}

/// Connects an unconnected socket (as made by [`SocketFactory::stream`]) to `peer`, keeping its
/// options and bind, failing with [`io::ErrorKind::TimedOut`] after `timeout`. The error names
/// the peer and the local address.
pub async fn connect(socket: Socket, peer: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|a| !a.ip().is_unspecified());
    let target = SocketTarget::Outbound { peer, local };
    socket
        .set_nonblocking(true)
        .map_err(|e| SocketError::io(SocketOp::Register, target.clone(), e))?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(peer)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(SocketError::io(SocketOp::Connect, target, e)),
        Err(_) => {
            let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"));
            Err(SocketError::io(SocketOp::Connect, target, e))
        }
    }
}

/// Connects to `peer` through `factory` (so the socket gets the marks and options every socket of
/// the proxy gets), failing with [`io::ErrorKind::TimedOut`] after `timeout`.
pub async fn connect_with<F: SocketFactory + ?Sized>(
    factory: &F,
    peer: SocketAddr,
    opts: &SocketOptions,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect(factory.stream(peer, None, opts)?, peer, timeout).await
}
