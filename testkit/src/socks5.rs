//! A SOCKS5 client (no authentication, CONNECT) over any stream, built on `tokio-socks`: the way a
//! test reaches a proxy's SOCKS5 listener.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_socks::Error;
use tokio_socks::tcp::Socks5Stream;

/// A SOCKS5 destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address.
    Addr(SocketAddr),
    /// A host name and port.
    Domain(String, u16),
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target::Addr(addr)
    }
}

/// Why a SOCKS5 CONNECT did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The proxy answered with this reply code (RFC 1928 section 6).
    Reply(u8),
    /// The exchange failed (the message says how).
    Io(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Reply(code) => write!(f, "SOCKS5 reply {code}"),
            Failure::Io(message) => write!(f, "SOCKS5 exchange failed: {message}"),
        }
    }
}

impl Failure {
    /// The reply code: the proxy's, or 255 when the exchange itself failed.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Reply(code) => *code,
            Failure::Io(_) => 255,
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match e {
            Error::GeneralSocksServerFailure => 1,
            Error::ConnectionNotAllowedByRuleset => 2,
            Error::NetworkUnreachable => 3,
            Error::HostUnreachable => 4,
            Error::ConnectionRefused => 5,
            Error::TtlExpired => 6,
            Error::CommandNotSupported => 7,
            Error::AddressTypeNotSupported => 8,
            other => return Failure::Io(other.to_string()),
        };
        Failure::Reply(code)
    }
}

/// A CONNECT to `target` over `stream`, already connected to the proxy: the stream, ready to
/// carry the tunnel's bytes, on reply 0; the reply code otherwise.
pub async fn connect<S>(stream: S, target: &Target) -> Result<S, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let socks = match target {
        Target::Addr(addr) => Socks5Stream::connect_with_socket(stream, *addr).await,
        Target::Domain(name, port) => Socks5Stream::connect_with_socket(stream, (name.as_str(), *port)).await,
    }?;
    Ok(socks.into_inner())
}

/// [`connect`] over a blocking socket, for tests that drive the proxy from plain threads: `Ok` on
/// reply 0 with the socket back in blocking mode, with `timeout` as its read timeout.
pub fn connect_blocking(
    stream: std::net::TcpStream,
    target: &Target,
    timeout: Duration,
) -> Result<std::net::TcpStream, Failure> {
    let io = |e: io::Error| Failure::Io(e.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io)?;
    stream.set_nonblocking(true).map_err(io)?;
    let stream = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(stream).map_err(io)?;
        match tokio::time::timeout(timeout, connect(tcp, target)).await {
            Ok(done) => done,
            Err(_) => Err(Failure::Io(format!("no SOCKS5 reply within {timeout:?}"))),
        }
    })?;
    let stream = stream.into_std().map_err(io)?;
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    Ok(stream)
}
