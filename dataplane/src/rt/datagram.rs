//! The part of the runtime seam the DNS proxy adds: UDP sockets, and TCP listeners made from
//! sockets the [`SocketFactory`](super::socket::SocketFactory) made. Implemented by each binary's
//! [`Native`] marker: [`Tokio`](super::tokio::Tokio) here, the glommio one in the io_uring build.
//!
//! The DNS server ([`crate::dns::server`]) is written once over it: it never spawns (its UDP and
//! TCP loops drive their queries and connections themselves), so nothing here asks for `Send`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use super::native::Native;

/// UDP sockets and TCP listeners of a runtime, from sockets the socket factory made (bound,
/// non-blocking, options applied): a node proxy's on the host, a pod's in the pod's network
/// namespace.
pub trait Datagram: Native {
    /// A UDP socket of the runtime.
    type Udp: 'static;

    /// A TCP listener of the runtime.
    type Listener: 'static;

    /// The runtime's UDP socket owning `socket` (a bound UDP socket).
    fn udp(socket: Socket) -> io::Result<Self::Udp>;

    /// Receives one datagram into `buf`: its length (cut to `buf`'s) and its sender.
    fn recv_from(udp: &Self::Udp, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>>;

    /// Sends `buf` as one datagram to `to`.
    fn send_to(udp: &Self::Udp, buf: &[u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>>;

    /// The runtime's listener owning `socket` (a bound, listening TCP socket).
    fn listener(socket: Socket) -> io::Result<Self::Listener>;

    /// Accepts a connection on `listener`.
    fn accept(listener: &Self::Listener) -> impl Future<Output = io::Result<Self::Stream>>;
}
