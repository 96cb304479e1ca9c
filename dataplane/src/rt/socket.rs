//! Configured sockets, made in one place: the [`SocketFactory`] seam.
//!
//! Every listener and every outbound connection of the proxy is made through a [`SocketFactory`],
//! which returns a plain, non-blocking [`socket2::Socket`] with the options of a [`SocketOptions`]
//! applied (reuse-port, socket marks, transparent binds, device binding, keep-alive). Each runtime
//! then turns it into its own listener or stream type (see [`super::tokio`] for tokio). This is
//! ztunnel's `SocketFactory` seam: an in-pod build replaces the factory with one that enters the
//! pod's network namespace, and nothing else changes.
//!
//! Errors are [`io::Error`]s of the cause's [`io::ErrorKind`] that carry a [`SocketError`] naming the
//! step (the option, the bind, the connect) and the socket's addresses, for example
//! `setting IP_TRANSPARENT on listener 10.0.0.5:15001: Operation not permitted (os error 1)`.
//!
//! ```
//! use meshwire_dataplane::rt::socket::{DefaultSocketFactory, SocketFactory, SocketOptions};
//!
//! let factory = DefaultSocketFactory;
//! let listener = factory.listener("127.0.0.1:0".parse()?, &SocketOptions::default())?;
//! let addr = listener.local_addr()?.as_socket().expect("an IP socket");
//! assert!(addr.ip().is_loopback());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};

/// The options a [`SocketFactory`] applies to a socket.
///
/// The default suits a listener and an ordinary outbound connection: `SO_REUSEADDR` and
/// `TCP_NODELAY` on, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// `SO_REUSEPORT`: several sockets may bind the same address and port (the kernel spreads new
    /// connections over the listeners), as one listener per core does.
    pub reuse_port: bool,
    /// `SO_REUSEADDR`: a listener may bind a port that still has connections in `TIME_WAIT`.
    pub reuse_address: bool,
    /// `TCP_NODELAY`: no Nagle delay. HBONE needs it (HTTP/2 control frames are small), and proxied
    /// connections should not add delay of their own.
    pub nodelay: bool,
    /// `IP_TRANSPARENT` (`IPV6_TRANSPARENT` on IPv6 sockets): bind to an address that is not local
    /// (to connect from a workload's address) and accept connections redirected by TPROXY. Needs
    /// `CAP_NET_ADMIN`.
    pub transparent: bool,
    /// `SO_MARK`: the firewall mark of the socket's packets (ztunnel marks its own traffic so the
    /// redirection rules skip it). Needs `CAP_NET_ADMIN`.
    pub mark: Option<u32>,
    /// `SO_BINDTODEVICE`: the interface the socket is restricted to.
    pub bind_device: Option<String>,
    /// The listen backlog of a listener (capped by `net.core.somaxconn`).
    pub backlog: u32,
    /// `IPV6_V6ONLY` of an IPv6 socket; `None` keeps the system default (`net.ipv6.bindv6only`).
    pub v6_only: Option<bool>,
    /// `SO_KEEPALIVE` with this idle time before the first probe (`TCP_KEEPIDLE`), also used as
    /// the interval between probes (`TCP_KEEPINTVL`); `None` leaves keep-alive off.
    pub keepalive: Option<Duration>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            reuse_port: false,
            reuse_address: true,
            nodelay: true,
            transparent: false,
            mark: None,
            bind_device: None,
            backlog: 1024,
            v6_only: None,
            keepalive: None,
        }
    }
}

/// Whether an outbound socket bound to a chosen source IP sets `IP_TRANSPARENT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceTransparency {
    /// Never: binding an address that is not local fails.
    Never,
    /// Only when the address is not local: the bind is tried without it first, and tried again
    /// with it when the kernel answers `EADDRNOTAVAIL`.
    #[default]
    IfNotLocal,
    /// Always (as in the options).
    Always,
}

/// Makes the proxy's sockets. Implementations decide where the sockets live (a network namespace)
/// and may add options; runtimes turn the sockets into their own types.
pub trait SocketFactory {
    /// A socket bound to `addr` and listening, non-blocking, with `opts` applied.
    fn listener(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket>;

    /// A socket for a TCP connection to `peer`, not yet connected, non-blocking, with `opts`
    /// applied, and bound to `local` if given (port 0 for any port).
    fn stream(&self, peer: SocketAddr, local: Option<SocketAddr>, opts: &SocketOptions) -> io::Result<Socket>;

    /// A UDP socket bound to `addr` (port 0 for any), non-blocking, with the options of `opts` that
    /// apply to UDP (reuse, transparency, mark, device, IPv6-only): the DNS proxy's sockets, its
    /// listening ones and those it asks the upstream resolvers through.
    fn datagram(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        bind_datagram(addr, opts)
    }

    /// Like [`SocketFactory::stream`], bound to `source` (any port) if given, setting
    /// `IP_TRANSPARENT` as `transparency` says.
    fn stream_from(
        &self,
        peer: SocketAddr,
        source: Option<IpAddr>,
        opts: &SocketOptions,
        transparency: SourceTransparency,
    ) -> io::Result<Socket> {
        let Some(ip) = source else {
            return self.stream(peer, None, opts);
        };
        let local = Some(SocketAddr::new(ip, 0));
        match transparency {
            SourceTransparency::Always if !opts.transparent => {
                let opts = SocketOptions {
                    transparent: true,
                    ..opts.clone()
                };
                self.stream(peer, local, &opts)
            }
            SourceTransparency::IfNotLocal if !opts.transparent => match self.stream(peer, local, opts) {
                Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                    tracing::debug!(%peer, source = %ip, "source address not local; binding it transparently");
                    let opts = SocketOptions {
                        transparent: true,
                        ..opts.clone()
                    };
                    self.stream(peer, local, &opts)
                }
                other => other,
            },
            _ => self.stream(peer, local, opts),
        }
    }
}

impl<F: SocketFactory + ?Sized> SocketFactory for &F {
    fn datagram(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        (**self).datagram(addr, opts)
    }

    fn listener(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        (**self).listener(addr, opts)
    }

    fn stream(&self, peer: SocketAddr, local: Option<SocketAddr>, opts: &SocketOptions) -> io::Result<Socket> {
        (**self).stream(peer, local, opts)
    }
}

impl<F: SocketFactory + ?Sized> SocketFactory for Arc<F> {
    fn datagram(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        (**self).datagram(addr, opts)
    }

    fn listener(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        (**self).listener(addr, opts)
    }

    fn stream(&self, peer: SocketAddr, local: Option<SocketAddr>, opts: &SocketOptions) -> io::Result<Socket> {
        (**self).stream(peer, local, opts)
    }
}

/// The factory of a proxy running in the host's (or its own) network namespace: plain
/// `socket(2)` calls with the options applied in order, the first failure reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultSocketFactory;

impl SocketFactory for DefaultSocketFactory {
    fn listener(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        let target = SocketTarget::Listener(addr);
        let socket = new_tcp_socket(addr, opts, &target)?;
        socket
            .bind(&SockAddr::from(addr))
            .map_err(|e| SocketError::io(SocketOp::Bind, target.clone(), e))?;
        let backlog = i32::try_from(opts.backlog).unwrap_or(i32::MAX);
        socket
            .listen(backlog)
            .map_err(|e| SocketError::io(SocketOp::Listen, target, e))?;
        Ok(socket)
    }

    fn stream(&self, peer: SocketAddr, local: Option<SocketAddr>, opts: &SocketOptions) -> io::Result<Socket> {
        let target = SocketTarget::Outbound { peer, local };
        if let Some(local) = local
            && local.is_ipv4() != peer.is_ipv4()
        {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "source and destination families differ");
            return Err(SocketError::io(SocketOp::Bind, target, e));
        }
        let socket = new_tcp_socket(peer, opts, &target)?;
        if let Some(local) = local {
            socket
                .bind(&SockAddr::from(local))
                .map_err(|e| SocketError::io(SocketOp::Bind, target, e))?;
        }
        Ok(socket)
    }
}

/// A UDP socket bound to `addr`, non-blocking, with the options of `opts` that apply to UDP: what
/// [`SocketFactory::datagram`] does by default.
pub fn bind_datagram(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
    let target = SocketTarget::Listener(addr);
    let socket = new_socket(addr, opts, &target, Type::DGRAM, Protocol::UDP)?;
    socket
        .bind(&SockAddr::from(addr))
        .map_err(|e| SocketError::io(SocketOp::Bind, target, e))?;
    Ok(socket)
}

/// A non-blocking TCP socket of `addr`'s family with `opts` applied (all but the backlog).
fn new_tcp_socket(addr: SocketAddr, opts: &SocketOptions, target: &SocketTarget) -> io::Result<Socket> {
    new_socket(addr, opts, target, Type::STREAM, Protocol::TCP)
}

/// A non-blocking socket of `addr`'s family and type `kind` with `opts` applied (all but the
/// backlog; `TCP_NODELAY` and keep-alive on TCP sockets only).
fn new_socket(
    addr: SocketAddr,
    opts: &SocketOptions,
    target: &SocketTarget,
    kind: Type,
    protocol: Protocol,
) -> io::Result<Socket> {
    let err = |op: SocketOp| move |e: io::Error| SocketError::io(op, target.clone(), e);
    let tcp = protocol == Protocol::TCP;
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, kind.nonblocking().cloexec(), Some(protocol)).map_err(err(SocketOp::Create))?;
    if addr.is_ipv6()
        && let Some(only) = opts.v6_only
    {
        socket
            .set_only_v6(only)
            .map_err(err(SocketOp::Set(SocketOption::V6Only)))?;
    }
    if opts.reuse_address {
        socket
            .set_reuse_address(true)
            .map_err(err(SocketOp::Set(SocketOption::ReuseAddress)))?;
    }
    if opts.reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(err(SocketOp::Set(SocketOption::ReusePort)))?;
    }
    if opts.transparent {
        if addr.is_ipv4() {
            socket
                .set_ip_transparent_v4(true)
                .map_err(err(SocketOp::Set(SocketOption::Transparent)))?;
        } else {
            socket
                .set_ip_transparent_v6(true)
                .map_err(err(SocketOp::Set(SocketOption::TransparentV6)))?;
        }
    }
    if let Some(mark) = opts.mark {
        socket.set_mark(mark).map_err(err(SocketOp::Set(SocketOption::Mark)))?;
    }
    if let Some(device) = &opts.bind_device {
        socket
            .bind_device(Some(device.as_bytes()))
            .map_err(err(SocketOp::Set(SocketOption::BindDevice)))?;
    }
    if tcp && opts.nodelay {
        socket
            .set_tcp_nodelay(true)
            .map_err(err(SocketOp::Set(SocketOption::Nodelay)))?;
    }
    if let Some(idle) = opts.keepalive.filter(|_| tcp) {
        let params = TcpKeepalive::new().with_time(idle).with_interval(idle);
        socket
            .set_tcp_keepalive(&params)
            .map_err(err(SocketOp::Set(SocketOption::Keepalive)))?;
    }
    Ok(socket)
}

/// Checks that no other socket listens on `addr`: binds a socket without `SO_REUSEPORT` to it and
/// closes it again, without listening. A listener bound with `SO_REUSEPORT` (another instance of
/// the proxy) makes this fail with [`io::ErrorKind::AddrInUse`], where a listener of our own with
/// `SO_REUSEPORT` would silently share the port with it. Port 0 is always free. The error names
/// the address.
pub fn check_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let target = SocketTarget::Listener(addr);
    let socket = new_tcp_socket(addr, &SocketOptions::default(), &target)?;
    socket
        .bind(&SockAddr::from(addr))
        .map_err(|e| SocketError::io(SocketOp::Bind, target, e))
}

/// The address a redirected connection was originally sent to: `SO_ORIGINAL_DST` (IPv4) or
/// `IP6T_SO_ORIGINAL_DST` (IPv6) of an accepted `stream`, as recorded by the kernel's connection
/// tracking when iptables redirected it. IPv4-mapped IPv6 results are returned as IPv4.
///
/// For a connection that was not redirected the kernel answers with the connection's own local
/// address when connection tracking saw the connection, and with an error (`ENOENT`) when it did
/// not or (`ENOPROTOOPT`) when connection tracking is not loaded; the error names
/// `SO_ORIGINAL_DST` and the connection. A TPROXY listener (`IP_TRANSPARENT`) needs none of this:
/// its connections' local address is the original destination.
pub fn original_destination<S: AsFd>(stream: &S) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = sock.local_addr().ok().and_then(|a| a.as_socket());
    let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
    let target = SocketTarget::Accepted { local, peer };
    let err = |e: io::Error| SocketError::io(SocketOp::OriginalDestination, target.clone(), e);
    let result = match local {
        Some(SocketAddr::V6(l)) if l.ip().to_ipv4_mapped().is_none() => sock.original_dst_v6(),
        Some(SocketAddr::V6(_)) => sock.original_dst_v4().or_else(|_| sock.original_dst_v6()),
        _ => sock.original_dst_v4(),
    };
    let addr = result.map_err(err)?.as_socket().ok_or_else(|| {
        err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel returned a non-IP address",
        ))
    })?;
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// Checks that this process may set the firewall mark `mark` (`SO_MARK` needs `CAP_NET_ADMIN`) by
/// setting it on a socket made for the purpose. The error is the kernel's, most often
/// [`io::ErrorKind::PermissionDenied`], naming `SO_MARK`.
pub fn check_mark(mark: u32) -> io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket
        .set_mark(mark)
        .map_err(|e| io::Error::new(e.kind(), format!("setting SO_MARK {mark:#x} on a socket: {e}")))
}

/// Makes the close of `stream` send a reset (RST) rather than a FIN, so that the peer sees the
/// connection refused rather than ended: `SO_LINGER` with a zero timeout. Call it just before
/// dropping the stream.
pub fn reset_on_close<S: AsFd>(stream: &S) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Accepts a connection the kernel already queued on `listener`, without waiting: `None` when none
/// is queued. The listener is left in non-blocking mode and the stream is non-blocking, with
/// close-on-exec. For the last accepts of a drain ([`stop_listening`] follows).
pub fn accept_queued<S: AsFd>(listener: &S) -> Option<io::Result<(std::net::TcpStream, Option<SocketAddr>)>> {
    let listener = SockRef::from(listener);
    if let Err(error) = listener.set_nonblocking(true) {
        return Some(Err(error));
    }
    loop {
        return match listener.accept() {
            Ok((stream, peer)) => Some(
                stream
                    .set_nonblocking(true)
                    .map(|()| (std::net::TcpStream::from(stream), peer.as_socket())),
            ),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(e)),
        };
    }
}

/// Stops `listener` listening at once (`shutdown`, which a listening socket takes as the end of
/// listening): it leaves its `SO_REUSEPORT` group, so new connections go to the group's other
/// sockets, even while something else (an io_uring accept in flight) still holds the socket, and an
/// accept waiting on it ends with an error. Connections still queued on it are reset: take them
/// first ([`accept_queued`]).
pub fn stop_listening<S: AsFd>(listener: &S) -> io::Result<()> {
    SockRef::from(listener).shutdown(std::net::Shutdown::Read)
}

/// The local address of a connected TCP stream: for an accepted connection, the address it
/// arrived on.
pub fn local_addr<S: AsFd>(stream: &S) -> io::Result<SocketAddr> {
    inet(SockRef::from(stream).local_addr()?)
}

/// The peer address of a connected TCP stream.
pub fn peer_addr<S: AsFd>(stream: &S) -> io::Result<SocketAddr> {
    inet(SockRef::from(stream).peer_addr()?)
}

/// Turns `TCP_NODELAY` on for `stream`.
pub fn set_nodelay<S: AsFd>(stream: &S) -> io::Result<()> {
    SockRef::from(stream).set_tcp_nodelay(true)
}

fn inet(addr: SockAddr) -> io::Result<SocketAddr> {
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IPv4 or IPv6 socket"))
}

/// A socket option set by a [`SocketFactory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketOption {
    /// `SO_REUSEPORT`.
    ReusePort,
    /// `SO_REUSEADDR`.
    ReuseAddress,
    /// `TCP_NODELAY`.
    Nodelay,
    /// `IP_TRANSPARENT`.
    Transparent,
    /// `IPV6_TRANSPARENT`.
    TransparentV6,
    /// `SO_MARK`.
    Mark,
    /// `SO_BINDTODEVICE`.
    BindDevice,
    /// `IPV6_V6ONLY`.
    V6Only,
    /// `SO_KEEPALIVE` with `TCP_KEEPIDLE` and `TCP_KEEPINTVL`.
    Keepalive,
}

impl SocketOption {
    /// The option's name as in the kernel's headers, e.g. `IP_TRANSPARENT`.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReusePort => "SO_REUSEPORT",
            Self::ReuseAddress => "SO_REUSEADDR",
            Self::Nodelay => "TCP_NODELAY",
            Self::Transparent => "IP_TRANSPARENT",
            Self::TransparentV6 => "IPV6_TRANSPARENT",
            Self::Mark => "SO_MARK",
            Self::BindDevice => "SO_BINDTODEVICE",
            Self::V6Only => "IPV6_V6ONLY",
            Self::Keepalive => "SO_KEEPALIVE",
        }
    }
}

impl fmt::Display for SocketOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketOp {
    /// `socket(2)`.
    Create,
    /// Setting an option.
    Set(SocketOption),
    /// `bind(2)`.
    Bind,
    /// `listen(2)`.
    Listen,
    /// `connect(2)`, or waiting for it to finish.
    Connect,
    /// Reading `SO_ORIGINAL_DST`.
    OriginalDestination,
    /// Registering the socket with a runtime.
    Register,
}

/// The socket a [`SocketError`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketTarget {
    /// A listener for this address.
    Listener(SocketAddr),
    /// An outbound connection to `peer`, from `local` if one was chosen.
    Outbound {
        /// The destination.
        peer: SocketAddr,
        /// The chosen local address.
        local: Option<SocketAddr>,
    },
    /// An accepted connection (addresses that could not be read are `None`).
    Accepted {
        /// The local address.
        local: Option<SocketAddr>,
        /// The peer's address.
        peer: Option<SocketAddr>,
    },
}

impl fmt::Display for SocketTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn or_unknown(a: &Option<SocketAddr>) -> String {
            a.map_or_else(|| "?".to_owned(), |a| a.to_string())
        }
        match self {
            Self::Listener(addr) => write!(f, "listener {addr}"),
            Self::Outbound { peer, local: None } => write!(f, "connection to {peer}"),
            Self::Outbound { peer, local: Some(l) } => write!(f, "connection to {peer} from {l}"),
            Self::Accepted { local, peer } => {
                write!(f, "connection from {} to {}", or_unknown(peer), or_unknown(local))
            }
        }
    }
}

/// What failed, on which socket, and why. Carried inside the [`io::Error`]s of this module and
/// of the runtime's socket functions (which keep the cause's [`io::ErrorKind`]); find it with
/// [`SocketError::find`]. The cause is part of the message and not repeated as
/// [`std::error::Error::source`], so that printing a chain does not say it twice.
#[derive(Debug)]
pub struct SocketError {
    /// The step that failed.
    pub op: SocketOp,
    /// The socket.
    pub target: SocketTarget,
    /// The cause, as the kernel reported it.
    pub source: io::Error,
}

impl SocketError {
    /// An [`io::Error`] of `source`'s kind carrying the context.
    pub fn io(op: SocketOp, target: SocketTarget, source: io::Error) -> io::Error {
        io::Error::new(source.kind(), Self { op, target, source })
    }

    /// The context carried by `error`, if it came from this module.
    pub fn find(error: &io::Error) -> Option<&Self> {
        error.get_ref()?.downcast_ref()
    }
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (op, target, source) = (self.op, &self.target, &self.source);
        match (op, target) {
            (SocketOp::Create, _) => write!(f, "creating a socket for {target}: {source}"),
            (SocketOp::Set(opt), _) => write!(f, "setting {opt} on {target}: {source}"),
            (SocketOp::Bind, SocketTarget::Outbound { peer, local: Some(l) }) => {
                write!(f, "binding {l} for a connection to {peer}: {source}")
            }
            (SocketOp::Bind, _) => write!(f, "binding {target}: {source}"),
            (SocketOp::Listen, _) => write!(f, "listening on {target}: {source}"),
            (SocketOp::Connect, SocketTarget::Outbound { peer, local: None }) => {
                write!(f, "connecting to {peer}: {source}")
            }
            (SocketOp::Connect, SocketTarget::Outbound { peer, local: Some(l) }) => {
                write!(f, "connecting to {peer} from {l}: {source}")
            }
            (SocketOp::Connect, _) => write!(f, "connecting {target}: {source}"),
            (SocketOp::OriginalDestination, _) => write!(f, "reading SO_ORIGINAL_DST of {target}: {source}"),
            (SocketOp::Register, _) => write!(f, "registering {target} with the runtime: {source}"),
        }
    }
}

impl std::error::Error for SocketError {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_port_shared_through_reuse_port_is_not_free() {
        let reuse = SocketOptions {
            reuse_port: true,
            ..SocketOptions::default()
        };
        let listener = DefaultSocketFactory
            .listener("127.0.0.1:0".parse().unwrap(), &reuse)
            .unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let err = check_port_free(addr).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "names the address: {err}");
        // Another socket with SO_REUSEPORT still binds: that is what the check guards against.
        assert!(DefaultSocketFactory.listener(addr, &reuse).is_ok());
        drop(listener);
        check_port_free(addr).unwrap();
        check_port_free("127.0.0.1:0".parse().unwrap()).unwrap();
    }
}
