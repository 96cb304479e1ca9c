//! The data path: the proxies that carry workload traffic.
//!
//! - [`inbound`]: the inbound side: the HBONE server side, which authorizes each CONNECT and splices
//!   it to the local destination workload, and the inbound plaintext capture listener, which does the
//!   same for redirected connections without a peer identity.
//! - [`outbound`]: the outbound side: the SOCKS5 and outbound capture listeners, which route local
//!   workloads' connections and tunnel them.
//!
//! Shared by both capture listeners: [`check_redirect`], which tells a redirected connection from one
//! made to the listener itself.

use std::io;
use std::net::SocketAddr;

use crate::state::LocalProxy;

pub mod inbound;
pub mod outbound;

/// Why a connection accepted by a capture listener is not served: it was not redirected there by
/// the firewall, so routing it would connect the proxy to itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotRedirected {
    /// The kernel knows no original destination (`SO_ORIGINAL_DST` fails: `ENOENT` when
    /// connection tracking has no NAT entry for it, `ENOPROTOOPT` without connection tracking).
    #[error("the connection from {peer} was not redirected to the {listener} listener: {source}")]
    NoOriginalDestination {
        /// The listener, for the message (`outbound`, `inbound plaintext`).
        listener: &'static str,
        /// The client's address.
        peer: SocketAddr,
        /// The error of `SO_ORIGINAL_DST`.
        source: io::Error,
    },
    /// The original destination is the listener itself, or another of the proxy's own listeners.
    #[error(
        "the connection from {peer} was not redirected to the {listener} listener: its original destination \
         {dst} is the proxy's own listener; refused rather than looped"
    )]
    OwnListener {
        /// The listener, for the message.
        listener: &'static str,
        /// The client's address.
        peer: SocketAddr,
        /// The original destination.
        dst: SocketAddr,
    },
}

/// The original destination of a connection accepted by a capture listener, or why it has none
/// worth routing: `original` is what `SO_ORIGINAL_DST` returned, `local` the accepted socket's
/// local address. A destination equal to `local`, or one of `proxy`'s own listeners
/// ([`LocalProxy::is_own`]), means the connection was not redirected: the client connected to the
/// listener itself. Addresses are compared with IPv4-mapped IPv6 addresses as IPv4.
///
/// ```
/// use meshwire_dataplane::proxy::{NotRedirected, check_redirect};
/// use meshwire_dataplane::state::LocalProxy;
///
/// let proxy = LocalProxy::new();
/// let local = "127.0.0.1:15001".parse()?;
/// let peer = "10.0.0.1:40000".parse()?;
/// let redirected = check_redirect("outbound", Ok("10.0.0.2:80".parse()?), local, peer, &proxy);
/// assert_eq!(redirected.unwrap().to_string(), "10.0.0.2:80");
/// let direct = check_redirect("outbound", Ok(local), local, peer, &proxy).unwrap_err();
/// assert!(matches!(direct, NotRedirected::OwnListener { .. }));
/// assert!(direct.to_string().contains("not redirected"));
/// let unknown = std::io::Error::from_raw_os_error(2); // ENOENT
/// assert!(check_redirect("outbound", Err(unknown), local, peer, &proxy).is_err());
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
pub fn check_redirect(
    listener: &'static str,
    original: io::Result<SocketAddr>,
    local: SocketAddr,
    peer: SocketAddr,
    proxy: &LocalProxy,
) -> Result<SocketAddr, NotRedirected> {
    let dst = original.map_err(|source| NotRedirected::NoOriginalDestination { listener, peer, source })?;
    let dst = canonical(dst);
    if dst == canonical(local) || proxy.is_own(dst) {
        return Err(NotRedirected::OwnListener { listener, peer, dst });
    }
    Ok(dst)
}

/// The destination of a connection a listener received by TPROXY (in-pod mode's inbound
/// plaintext listener): its local address, the one the client dialled. A connection to the
/// listener's own port (`listener_port`) or to one of the proxy's own listeners was not sent by the
/// redirection and is refused, as [`check_redirect`] refuses it.
///
/// ```
/// use meshwire_dataplane::proxy::{NotRedirected, check_transparent};
/// use meshwire_dataplane::state::LocalProxy;
///
/// let proxy = LocalProxy::default();
/// let peer = "10.0.0.9:40000".parse()?;
/// assert_eq!(check_transparent("inbound plaintext", "10.0.0.1:8080".parse()?, 15006, peer, &proxy).unwrap().port(), 8080);
/// let direct = check_transparent("inbound plaintext", "10.0.0.1:15006".parse()?, 15006, peer, &proxy).unwrap_err();
/// assert!(matches!(direct, NotRedirected::OwnListener { .. }));
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
pub fn check_transparent(
    listener: &'static str,
    local: SocketAddr,
    listener_port: u16,
    peer: SocketAddr,
    proxy: &LocalProxy,
) -> Result<SocketAddr, NotRedirected> {
    let dst = canonical(local);
    if dst.port() == listener_port || proxy.is_own(dst) {
        return Err(NotRedirected::OwnListener { listener, peer, dst });
    }
    Ok(dst)
}

/// `addr` with an IPv4-mapped IPv6 address turned into IPv4 (as a dual-stack listener reports IPv4
/// clients).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
