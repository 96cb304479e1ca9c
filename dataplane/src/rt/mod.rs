//! The runtime seam of the dataplane: sockets made in one place, the [`Runtime`] trait the
//! per-connection proxy logic is written over, and its tokio implementation.
//!
//! - [`socket`] (runtime-independent): [`socket::SocketOptions`], the [`socket::SocketFactory`]
//!   trait and its [`socket::DefaultSocketFactory`], and [`socket::original_destination`]
//!   (`SO_ORIGINAL_DST`).
//! - [`netns`] (runtime-independent): [`netns::NetnsSocketFactory`], the factory of a pod in in-pod
//!   mode (every socket made inside the pod's network namespace), and [`netns::Netns`].
//! - [`Runtime`]: what the per-connection logic ([`Outbound`], [`InboundHandler`]) needs from a
//!   runtime: its TCP stream type, a timer, the HBONE pool's executor and connector, connecting
//!   through the socket factory, and the socket operations on a stream.
//! - [`datagram`]: [`datagram::Datagram`], the UDP sockets and TCP listeners of a runtime, from
//!   the factory's sockets: what the DNS proxy adds to the seam.
//! - [`native`]: the [`Runtime`] ([`native::ProxyRuntime`]) and the HBONE pool connector
//!   ([`native::PoolConnector`]) written once over [`native::Native`], what a runtime does its own
//!   way (stream, timer, executor, connecting a socket, socket operations on a stream).
//! - [`tokio`]: [`tokio::Tokio`] (tokio's [`native::Native`]), hence [`tokio::TokioRuntime`] (the
//!   [`Runtime`] of the `ztunnel` binary) and [`tokio::TokioConnector`] for the HBONE pool, the
//!   conversion of the factory's sockets into tokio listeners and streams; [`tokio::TokioTimer`]
//!   and [`tokio::TokioExecutor`] are re-exported from `meshwire-rt`.
//!
//! The timer and executor traits, and their tokio and glommio implementations, live in
//! `meshwire-rt`, the bottom of the crate graph. The io_uring build supplies its own counterpart of
//! [`tokio`] (glommio's [`native::Native`]) and shares [`socket`], [`native`] and everything
//! written over [`Runtime`].
//!
//! [`Outbound`]: crate::proxy::outbound::Outbound
//! [`InboundHandler`]: crate::proxy::inbound::InboundHandler

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ::tokio::io::{AsyncRead, AsyncWrite};
use meshwire_hbone::double::InnerDriver;
use meshwire_hbone::pool::{Connector, PooledDriver};
use meshwire_hbone::rt::{Executor, Timer};

use self::connector::ClientTlsSource;
use self::socket::SocketOptions;

pub mod connector;
pub mod datagram;
pub mod native;
pub mod netns;
pub mod socket;
pub mod tokio;

/// What the per-connection proxy logic needs from a runtime, and nothing more: the proxy's
/// outbound path ([`Outbound`]) and inbound handler ([`InboundHandler`], its upstreams and the
/// plaintext listener's connections) are written once over it, and each binary supplies an
/// implementation: [`tokio::TokioRuntime`] for `ztunnel`, a glommio one for the io_uring build.
///
/// A value of the runtime is held by the proxy objects: it carries what connecting needs (the
/// [`SocketFactory`](socket::SocketFactory), for one). Accepting connections, spawning their
/// tasks and binding listeners stay with each binary's wiring: they are where the runtimes differ
/// most, and the per-connection logic never does them.
///
/// Nothing here requires `Send`: glommio's tasks stay on their thread and its futures are not
/// `Send`. The futures of the proxy logic are `Send` exactly when the runtime's are, so the tokio
/// wiring (which spawns them on a multi-threaded runtime) gets `Send` futures from
/// [`tokio::TokioRuntime`] without the trait asking for it.
///
/// # Members
///
/// - [`Stream`](Self::Stream): the TCP stream, accepted or connected, over the `tokio::io` traits
///   the HBONE library and the copy are written against. A glommio `TcpStream` meets them through
///   `tokio_util::compat` (`FuturesAsyncReadCompatExt::compat`).
/// - [`Timer`](Self::Timer): deadlines (the SOCKS5 handshake's, with
///   [`meshwire_hbone::rt::timeout`]) and the HBONE pool's clock.
/// - [`Executor`](Self::Executor) and [`Connector`](Self::Connector): the two runtime-specific
///   parts of the HBONE pool ([`HbonePool`]): where the connection drivers run, and how a pooled
///   connection's TCP stream and TLS config are had.
/// - [`connect`](Self::connect): the plain TCP connections of the proxy (passthrough, and
///   inbound connections to the destination workload), made through the socket factory so that
///   they get the proxy's marks and options.
/// - [`local_addr`](Self::local_addr), [`peer_addr`](Self::peer_addr),
///   [`original_destination`](Self::original_destination), [`reset_on_close`](Self::reset_on_close):
///   the socket operations on a stream. They are functions of the runtime rather than bounds on
///   the stream because a runtime's stream type may offer only its file descriptor (`AsRawFd`, as
///   glommio's does): the implementation reaches the socket its own way (the workspace forbids
///   `unsafe`, so through a safe wrapper such as `socket2::SockRef` over a borrowed descriptor, or
///   the runtime's own accessors).
///
/// # Connecting on glommio
///
/// [`connect`](Self::connect) makes its socket with [`SocketFactory::stream`] (non-blocking,
/// options applied, bound if asked) and must connect *that* socket, so that the options and bind
/// hold. glommio 0.9 has `impl From<socket2::Socket> for glommio::net::TcpStream`, but no connect of
/// a socket it did not make: the io_uring build starts a non-blocking `connect` on the
/// `socket2::Socket` (it returns `EINPROGRESS`), turns the socket into a glommio stream at once, waits
/// for write readiness through the stream (a zero-length write would block until the connect ends,
/// so glommio arms its io_uring poll), bounded by the runtime's timer, and reads `SO_ERROR` to learn
/// whether the connect succeeded (`meshwire_dataplane_uring::rt::connect`).
///
/// [`Outbound`]: crate::proxy::outbound::Outbound
/// [`InboundHandler`]: crate::proxy::inbound::InboundHandler
/// [`HbonePool`]: crate::proxy::outbound::HbonePool
/// [`SocketFactory::stream`]: socket::SocketFactory::stream
pub trait Runtime: 'static {
    /// A TCP stream of the runtime: what the listeners accept and [`connect`](Self::connect)
    /// returns. The per-connection logic reads, writes and shuts it down through the `tokio::io`
    /// traits only.
    type Stream: AsyncRead + AsyncWrite + Unpin + 'static;

    /// The runtime's clock and sleeps: the deadlines of the per-connection logic, and the HBONE
    /// pool's timer.
    type Timer: Timer + Clone;

    /// Where the HBONE pool runs the drivers of its connections (a task per connection), and the
    /// outbound path the drivers of the inner connections of double HBONE.
    type Executor: Executor<PooledDriver<Self::Stream, Self::Timer>> + Executor<InnerDriver<Self::Timer>>;

    /// The HBONE pool's connector with client TLS configs from `S`: for every
    /// [`ClientTlsSource`] `S`, a [`meshwire_hbone::pool::Connector`] of the runtime's streams. It
    /// connects through the socket factory like [`connect`](Self::connect).
    type Connector<S: ClientTlsSource>: Connector<Io = Self::Stream>;

    /// The timer (a clock handle: cheap to get).
    fn timer(&self) -> Self::Timer;

    /// The source of client TLS configs inside a pool connector of this runtime: double HBONE
    /// takes the config of its inner connection (the source's certificate, the destination's
    /// identities) from the same source as the pool's connections. `None` (the default) when the
    /// connector does not expose it: double HBONE then fails with a TLS error naming the cause.
    fn client_tls<S: ClientTlsSource>(connector: &Self::Connector<S>) -> Option<&S> {
        let _ = connector;
        None
    }

    /// A TCP connection to `dst` made through the runtime's socket factory with `opts`, failing
    /// with [`io::ErrorKind::TimedOut`] after `timeout`. Errors carry a
    /// [`SocketError`](socket::SocketError) naming the step and the addresses.
    fn connect(
        &self,
        dst: SocketAddr,
        opts: &SocketOptions,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<Self::Stream>>;

    /// [`connect`](Self::connect) from the address `source` (any port), bound with `IP_TRANSPARENT`
    /// (it is usually not the host's: the client's address kept on the connection to a workload,
    /// `ENABLE_ORIG_SRC`). `None` is [`connect`](Self::connect). The default ignores `source`.
    fn connect_from(
        &self,
        dst: SocketAddr,
        source: Option<std::net::IpAddr>,
        opts: &SocketOptions,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<Self::Stream>> {
        let _ = source;
        self.connect(dst, opts, timeout)
    }

    /// The stream's local address: for an accepted connection, the address it arrived on (the
    /// capture listeners compare it with the original destination; a SOCKS5 reply names it).
    fn local_addr(stream: &Self::Stream) -> io::Result<SocketAddr>;

    /// The stream's peer address: for an accepted connection, the client's. Accept loops whose
    /// runtime returns only the stream (glommio's `TcpListener::accept`) learn the client here.
    fn peer_addr(stream: &Self::Stream) -> io::Result<SocketAddr>;

    /// The original destination of a connection redirected to a capture listener
    /// (`SO_ORIGINAL_DST`; see [`socket::original_destination`]).
    fn original_destination(stream: &Self::Stream) -> io::Result<SocketAddr>;

    /// Makes closing the stream reset the connection instead of ending it with a FIN (`SO_LINGER`
    /// 0; see [`socket::reset_on_close`]): how a capture listener refuses a connection whose
    /// client was told nothing.
    fn reset_on_close(stream: &Self::Stream) -> io::Result<()>;
}
