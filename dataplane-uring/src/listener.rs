//! The io_uring build's listeners, made by the socket factory like every other socket of the
//! proxy (`SO_REUSEPORT`, marks, transparent binds, the factory's network namespace), then handed
//! to glommio.
//!
//! glommio makes a listener from a socket it did not bind only through `FromRawFd`: the hand-over
//! of the descriptor's ownership is an `unsafe` call (`into_glommio`), one of the few this crate
//! allows on specific functions (with the system calls of `spread` and `stream`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};

use meshwire_dataplane::rt::socket::{SocketFactory, SocketOptions};

use crate::spread::RoundRobin;

/// Binds a listener on `addr` through `factory` with `opts`, in blocking mode (as glommio's own
/// listeners are; glommio accepts through io_uring), as a glommio listener. With `spread`, the
/// socket joins that round robin in that slot; if it cannot, the kernel's hash picks for it (the
/// error is logged). Must run on a glommio executor thread.
pub fn bind<F: SocketFactory + ?Sized>(
    factory: &F,
    addr: SocketAddr,
    opts: &SocketOptions,
    spread: Option<(&RoundRobin, u32)>,
) -> io::Result<glommio::net::TcpListener> {
    let socket = factory.listener(addr, opts)?;
    if let Some((spread, slot)) = spread
        && let Err(error) = spread.join(slot, socket.as_fd())
    {
        tracing::warn!(%addr, slot, %error, "this core's listener is picked by the kernel's hash, not in turn");
    }
    socket.set_nonblocking(false)?;
    Ok(into_glommio(OwnedFd::from(socket)))
}

/// The glommio listener owning `fd`, a bound and listening TCP socket.
#[allow(unsafe_code)]
fn into_glommio(fd: OwnedFd) -> glommio::net::TcpListener {
    // SAFETY: `fd` is an open TCP socket, bound and listening, owned by this function:
    // `into_raw_fd` gives up that ownership and `from_raw_fd` takes it, so the descriptor has one
    // owner and is closed once, by the glommio listener.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// The glommio UDP socket owning `socket` (a bound UDP socket), in blocking mode as glommio's own
/// sockets are (glommio receives and sends through io_uring).
pub fn udp(socket: socket2::Socket) -> io::Result<glommio::net::UdpSocket> {
    socket.set_nonblocking(false)?;
    Ok(udp_into_glommio(OwnedFd::from(socket)))
}

/// The glommio listener owning `socket` (a bound, listening TCP socket), in blocking mode.
pub fn tcp(socket: socket2::Socket) -> io::Result<glommio::net::TcpListener> {
    socket.set_nonblocking(false)?;
    Ok(into_glommio(OwnedFd::from(socket)))
}

/// The glommio UDP socket owning `fd`, a bound UDP socket.
#[allow(unsafe_code)]
fn udp_into_glommio(fd: OwnedFd) -> glommio::net::UdpSocket {
    // SAFETY: `fd` is an open, bound UDP socket owned by this function: `into_raw_fd` gives up that
    // ownership and `from_raw_fd` takes it, so the descriptor has one owner and is closed once, by
    // the glommio socket.
    unsafe { glommio::net::UdpSocket::from_raw_fd(fd.into_raw_fd()) }
}
