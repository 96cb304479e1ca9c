//! The SOCKS5 handshake (RFC 1928) of the outbound SOCKS listener (port 15080 by default, loopback only):
//! CONNECT only, no authentication.
//!
//! Two layers, in the shape of the rest of meshwire:
//!
//! - [`Handshake`]: a pure, incremental state machine. Bytes go in through [`Handshake::feed`], the bytes
//!   to send come out of [`Handshake::pending_output`]; it does no IO, never panics, and never consumes a
//!   byte past the end of the client's request, so data the client pipelines after its request stays with
//!   the caller.
//! - [`accept`] and [`reply`]: a thin driver, generic over the `tokio::io` traits only (no runtime, no
//!   spawning). [`accept`] runs the greeting and reads the request, reading exactly the bytes of the
//!   handshake and never more; the proxy then connects upstream and reports the outcome with [`reply`].
//!
//! ```text
//! client                                  proxy
//! VER NMETHODS METHODS          ----->
//!                               <-----    VER METHOD         0x00, or 0xFF and the handshake fails
//! VER CMD RSV ATYP ADDR PORT    ----->                       accept() returns the Request
//!                                         (connects upstream)
//!                               <-----    VER REP RSV ATYP BND.ADDR BND.PORT      reply()
//! ```
//!
//! # What is accepted, and which reply each failure gets
//!
//! | input | outcome |
//! |---|---|
//! | VER other than 5, in the greeting or the request | [`Socks5Error::UnsupportedVersion`], no reply (the client does not speak SOCKS5) |
//! | METHODS without 0x00 (no authentication), or none at all | method selection 0xFF, [`Socks5Error::NoAcceptableMethod`] |
//! | CMD 2 (BIND), 3 (UDP ASSOCIATE) or any other than 1 (CONNECT) | [`Reply::CommandNotSupported`] (0x07), [`Socks5Error::UnsupportedCommand`] |
//! | RSV other than 0 | [`Reply::GeneralFailure`] (0x01), [`Socks5Error::NonZeroReserved`] |
//! | ATYP other than 1 (IPv4), 3 (domain name), 4 (IPv6) | [`Reply::AddressTypeNotSupported`] (0x08), [`Socks5Error::UnsupportedAddressType`] |
//! | a domain name that is not a valid host name | [`Reply::HostUnreachable`] (0x04), [`Socks5Error::InvalidDomain`] |
//! | the peer closes the connection mid-handshake | [`Socks5Error::UnexpectedEof`], no reply |
//!
//! An invalid domain name gets 0x04 "host unreachable" rather than 0x08 "address type not supported":
//! domain names are a supported address type, and a string that cannot be a host name names no host that
//! could be reached. It is the same reply the client gets when a valid name does not resolve (as in
//! ztunnel), so clients see one behaviour for "this name leads nowhere"; 0x08 would instead tell a client
//! that it must resolve names itself.
//!
//! The RSV byte of the request must be 0 (RFC 1928 section 4): a request with another value is not a
//! SOCKS5 request this proxy understands, and gets 0x01 "general SOCKS server failure" (the RFC has no
//! reply of its own for it) rather than being served as if the byte were 0. Problems are reported in
//! field order: an unsupported command before a non-zero RSV, a non-zero RSV before an unknown address
//! type. When a request fails with a known address type, the whole request is read before the reply is
//! sent, so that closing the connection afterwards does not reset it with unread bytes (which can make
//! the client lose the reply). An unknown address type has no known length, so that reply is sent as soon
//! as the ATYP byte is read.
//!
//! # Timeouts
//!
//! There is none here: a client that stops sending leaves [`accept`] pending forever. The caller bounds
//! the handshake with its runtime's timer, for example `tokio::time::timeout(limit, socks5::accept(&mut
//! stream))`, and drops the connection when it fires.
//!
//! # Example
//!
//! ```
//! use std::net::SocketAddr;
//! use meshwire_dataplane::socks5::{self, Reply, Target};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let (mut client, mut proxy) = tokio::io::duplex(1024);
//! // The greeting, a CONNECT to 10.0.0.7:8080, and payload pipelined right behind it.
//! client.write_all(&[5, 1, 0]).await.unwrap();
//! client.write_all(&[5, 1, 0, 1, 10, 0, 0, 7, 0x1f, 0x90]).await.unwrap();
//! client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
//!
//! let request = socks5::accept(&mut proxy).await.unwrap();
//! assert_eq!(request.target, Target::Addr("10.0.0.7:8080".parse().unwrap()));
//! // ... connect upstream, then tell the client how it went:
//! let bound: SocketAddr = "10.0.0.2:41000".parse().unwrap();
//! socks5::reply(&mut proxy, Reply::Succeeded { bound }).await.unwrap();
//!
//! // The pipelined payload is still in the stream, for the proxy to forward.
//! let mut payload = [0; 16];
//! proxy.read_exact(&mut payload).await.unwrap();
//! assert_eq!(&payload, b"GET / HTTP/1.1\r\n");
//! # });
//! ```

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version byte of SOCKS5.
const VERSION: u8 = 5;
/// Authentication method "no authentication required".
const METHOD_NO_AUTH: u8 = 0x00;
/// Method selection "no acceptable methods".
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
/// Request command CONNECT.
const CMD_CONNECT: u8 = 1;
/// Address type IPv4 (4 octets).
const ATYP_IPV4: u8 = 1;
/// Address type domain name (one length octet, then the name).
const ATYP_DOMAIN: u8 = 3;
/// Address type IPv6 (16 octets).
const ATYP_IPV6: u8 = 4;

/// The longest single step of the handshake: a domain name of 255 octets and the port.
const MAX_STEP: usize = 255 + 2;
/// The most the handshake ever queues at once: a method selection (2 bytes) and a failure reply with an
/// IPv4 address (10 bytes).
const MAX_OUTPUT: usize = 2 + 10;
/// The longest reply: VER REP RSV ATYP, an IPv6 address and a port.
const MAX_REPLY: usize = 4 + 16 + 2;

/// The longest host name in text form, without a trailing dot (RFC 1035 section 2.3.4, 255 octets on the
/// wire).
const MAX_NAME: usize = 253;
/// The longest label of a host name (RFC 1035 section 2.3.4).
const MAX_LABEL: usize = 63;

/// Where the client asked to be connected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An IP address and port: ATYP 1 (IPv4) or 4 (IPv6), or a domain name field that holds an IP literal
    /// such as `"10.0.0.7"` or `"::1"` (some clients send those as names).
    Addr(SocketAddr),
    /// A host name, for the proxy to resolve. It is a valid host name: ASCII letters, digits and hyphens
    /// in labels of 1 to 63 characters, at most 253 characters plus an optional trailing dot, not ending
    /// in a numeric label. Its case is kept as the client sent it.
    Domain {
        /// The host name, as sent (including a trailing dot if there was one).
        name: String,
        /// The destination port.
        port: u16,
    },
}

impl Target {
    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(addr) => addr.port(),
            Target::Domain { port, .. } => *port,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(addr) => write!(f, "{addr}"),
            Target::Domain { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

/// A CONNECT request, read by [`accept`] or [`Handshake::feed`]; the client waits for a [`reply`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Request {
    /// Where the client asked to be connected.
    pub target: Target,
}

/// The reply to a request (RFC 1928 section 6): success with the address the proxy bound upstream, or
/// why the connection could not be made.
///
/// Failure replies carry the address `0.0.0.0:0`, as nothing was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply {
    /// 0x00: the upstream connection is established; `bound` is BND.ADDR and BND.PORT, the local
    /// address of the upstream connection (clients generally ignore it; `0.0.0.0:0` is acceptable).
    Succeeded {
        /// The proxy's local address of the upstream connection.
        bound: SocketAddr,
    },
    /// 0x01: general SOCKS server failure.
    GeneralFailure,
    /// 0x02: connection not allowed by ruleset (for example denied by authorization policy).
    NotAllowed,
    /// 0x03: network unreachable.
    NetworkUnreachable,
    /// 0x04: host unreachable (also: a name that does not resolve, or is not a valid host name).
    HostUnreachable,
    /// 0x05: connection refused.
    ConnectionRefused,
    /// 0x06: TTL expired.
    TtlExpired,
    /// 0x07: command not supported (sent by the handshake itself for anything but CONNECT).
    CommandNotSupported,
    /// 0x08: address type not supported (sent by the handshake itself for an unknown ATYP).
    AddressTypeNotSupported,
}

impl Reply {
    /// The REP byte of this reply.
    pub const fn code(&self) -> u8 {
        match self {
            Reply::Succeeded { .. } => 0x00,
            Reply::GeneralFailure => 0x01,
            Reply::NotAllowed => 0x02,
            Reply::NetworkUnreachable => 0x03,
            Reply::HostUnreachable => 0x04,
            Reply::ConnectionRefused => 0x05,
            Reply::TtlExpired => 0x06,
            Reply::CommandNotSupported => 0x07,
            Reply::AddressTypeNotSupported => 0x08,
        }
    }

    /// The failure reply for an error of the upstream connect: refused → 0x05, host unreachable or
    /// timed out → 0x04, network unreachable → 0x03, anything else → 0x01.
    ///
    /// ```
    /// use meshwire_dataplane::socks5::Reply;
    /// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    /// assert_eq!(Reply::for_connect_error(&refused), Reply::ConnectionRefused);
    /// ```
    pub fn for_connect_error(error: &io::Error) -> Reply {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::TimedOut => Reply::HostUnreachable,
            io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
            _ => Reply::GeneralFailure,
        }
    }

    /// The bytes of this reply on the wire: VER 5, REP, RSV 0, ATYP, BND.ADDR, BND.PORT.
    ///
    /// ```
    /// use meshwire_dataplane::socks5::Reply;
    /// assert_eq!(Reply::ConnectionRefused.encode().as_bytes(), [5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
    /// ```
    pub fn encode(&self) -> EncodedReply {
        let bound = match self {
            Reply::Succeeded { bound } => *bound,
            _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        };
        let mut buf = [0; MAX_REPLY];
        buf[0] = VERSION;
        buf[1] = self.code();
        let end = match bound.ip() {
            IpAddr::V4(ip) => {
                buf[3] = ATYP_IPV4;
                buf[4..8].copy_from_slice(&ip.octets());
                8
            }
            IpAddr::V6(ip) => {
                buf[3] = ATYP_IPV6;
                buf[4..20].copy_from_slice(&ip.octets());
                20
            }
        };
        buf[end..end + 2].copy_from_slice(&bound.port().to_be_bytes());
        EncodedReply { buf, len: end + 2 }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Reply::Succeeded { bound } => return write!(f, "succeeded (bound {bound})"),
            Reply::GeneralFailure => "general SOCKS server failure",
            Reply::NotAllowed => "connection not allowed by ruleset",
            Reply::NetworkUnreachable => "network unreachable",
            Reply::HostUnreachable => "host unreachable",
            Reply::ConnectionRefused => "connection refused",
            Reply::TtlExpired => "TTL expired",
            Reply::CommandNotSupported => "command not supported",
            Reply::AddressTypeNotSupported => "address type not supported",
        };
        f.write_str(text)
    }
}

/// The wire form of a [`Reply`] (10 bytes with an IPv4 address, 22 with an IPv6 one), without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncodedReply {
    buf: [u8; MAX_REPLY],
    len: usize,
}

impl EncodedReply {
    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsRef<[u8]> for EncodedReply {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// The part of the handshake an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The client's greeting (VER, NMETHODS, METHODS) and the method selection sent back.
    Greeting,
    /// The client's request (VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT), and a failure reply sent back by
    /// the handshake itself.
    Request,
    /// The reply sent by [`reply`].
    Reply,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Greeting => "greeting",
            Phase::Request => "request",
            Phase::Reply => "reply",
        })
    }
}

/// Why a domain name in a request is not a valid host name (reply 0x04, see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// The name is empty (or only a dot).
    #[error("it is empty")]
    Empty,
    /// The name is longer than 253 characters (not counting a trailing dot).
    #[error("it has {len} characters, more than 253")]
    TooLong {
        /// The length of the name without its trailing dot.
        len: usize,
    },
    /// Two dots in a row, or a leading dot.
    #[error("it has an empty label")]
    EmptyLabel,
    /// A label is longer than 63 characters.
    #[error("a label has {len} characters, more than 63")]
    LabelTooLong {
        /// The length of the label.
        len: usize,
    },
    /// A byte that is not an ASCII letter, digit, hyphen or dot.
    #[error("byte {byte:#04x} is not a letter, digit, hyphen or dot")]
    InvalidCharacter {
        /// The offending byte.
        byte: u8,
    },
    /// A label starts or ends with a hyphen.
    #[error("a label starts or ends with a hyphen")]
    HyphenAtLabelEdge,
    /// The last label is a number (all digits, or `0x` and hex digits) while the name is no IP address:
    /// resolvers may read such names as IPv4 addresses in legacy forms (`127.1`, `0x7f.1`, `0177.0.0.1`),
    /// so they are refused (the WHATWG URL standard's "ends in a number" rule).
    #[error("it ends in a number but is not an IP address")]
    EndsInNumber,
}

/// Why a SOCKS5 handshake failed. Whatever reply the failure calls for has been queued (by
/// [`Handshake`]) or sent (by [`accept`]) already; the caller only closes the connection.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Socks5Error {
    /// VER is not 5 (a SOCKS4 client sends 4, an HTTP client a letter). Nothing is sent back.
    #[error("SOCKS version {version} is not supported (in the {phase}; only version 5 is)")]
    UnsupportedVersion {
        /// Where the version byte was read.
        phase: Phase,
        /// The version byte received.
        version: u8,
    },
    /// The greeting does not offer method 0x00 (no authentication); 0xFF was sent back.
    #[error(
        "no acceptable authentication method: the client offered {}, the proxy accepts only 0x00 (no authentication)",
        MethodList(.offered)
    )]
    NoAcceptableMethod {
        /// The methods the client offered (possibly none).
        offered: Vec<u8>,
    },
    /// CMD is not 1 (CONNECT); reply 0x07 was sent.
    #[error("request command {command} ({}) is not supported, only 1 (CONNECT) is", command_name(*.command))]
    UnsupportedCommand {
        /// The command byte received (2 is BIND, 3 is UDP ASSOCIATE).
        command: u8,
    },
    /// RSV is not 0; reply 0x01 was sent.
    #[error("the reserved byte (RSV) of the request is {reserved:#04x}; RFC 1928 requires 0x00")]
    NonZeroReserved {
        /// The reserved byte received.
        reserved: u8,
    },
    /// ATYP is not 1, 3 or 4; reply 0x08 was sent.
    #[error("request address type {atyp} is not supported, only 1 (IPv4), 3 (domain name) and 4 (IPv6) are")]
    UnsupportedAddressType {
        /// The address type byte received.
        atyp: u8,
    },
    /// The domain name of the request is not a valid host name; reply 0x04 was sent.
    #[error("invalid domain name {name:?} in the request: {reason}")]
    InvalidDomain {
        /// The name as received (bytes that are not UTF-8 replaced by U+FFFD).
        name: String,
        /// What is wrong with it.
        reason: DomainError,
    },
    /// The peer closed the connection (or the input ended) before the handshake was complete.
    #[error(
        "the client closed the connection during the SOCKS5 {phase} after {received} bytes of it, \
         at least {missing} more were expected"
    )]
    UnexpectedEof {
        /// The part of the handshake that was cut short.
        phase: Phase,
        /// How many bytes of that part had been received.
        received: usize,
        /// How many more were needed at least.
        missing: usize,
    },
    /// Reading from or writing to the stream failed.
    #[error("I/O error during the SOCKS5 {phase}: {source}")]
    Io {
        /// The part of the handshake that failed.
        phase: Phase,
        /// The error of the stream.
        source: Arc<io::Error>,
    },
}

impl Socks5Error {
    fn io(phase: Phase, source: io::Error) -> Self {
        Socks5Error::Io {
            phase,
            source: Arc::new(source),
        }
    }
}

/// Formats authentication methods as `[0x01, 0x02]`.
struct MethodList<'a>(&'a [u8]);

impl fmt::Display for MethodList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no method");
        }
        f.write_str("[")?;
        for (i, method) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{method:#04x}")?;
        }
        f.write_str("]")
    }
}

fn command_name(command: u8) -> &'static str {
    match command {
        1 => "CONNECT",
        2 => "BIND",
        3 => "UDP ASSOCIATE",
        _ => "unknown",
    }
}

/// What [`Handshake::feed`] did with its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feed {
    /// How many bytes of the input were consumed. Never more than the rest of the handshake: once the
    /// request is complete, the bytes after it are left unconsumed for the caller.
    pub consumed: usize,
    /// Where the handshake stands.
    pub progress: Progress,
}

/// Where a [`Handshake`] stands after a [`Handshake::feed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The handshake needs this many more bytes (always at least 1) before it can make its next
    /// decision; reading exactly that many never reads past the end of the request. Send
    /// [`Handshake::pending_output`] first: the client may be waiting for the method selection.
    NeedMore(usize),
    /// The request is complete; the client now waits for a [`Reply`].
    Complete(Request),
}

/// The state of the handshake: which step's bytes are being collected.
#[derive(Debug, Clone)]
enum State {
    /// VER, NMETHODS.
    GreetingHeader,
    /// METHODS.
    Methods { count: u8 },
    /// VER, CMD, RSV, ATYP.
    RequestHeader,
    /// An IPv4 or IPv6 address and the port.
    Address { header: RequestHeader, atyp: u8 },
    /// The length octet of a domain name.
    DomainLength { header: RequestHeader },
    /// The domain name and the port.
    Domain { header: RequestHeader, len: u8 },
    /// The request is complete.
    Done(Request),
    /// The handshake failed.
    Failed(Socks5Error),
}

/// The CMD and RSV bytes of a request, checked once its address has been read.
#[derive(Debug, Clone, Copy)]
struct RequestHeader {
    command: u8,
    reserved: u8,
}

impl RequestHeader {
    /// The reply and error for the first problem in field order, if any.
    fn problem(self) -> Option<(Reply, Socks5Error)> {
        if self.command != CMD_CONNECT {
            return Some((
                Reply::CommandNotSupported,
                Socks5Error::UnsupportedCommand { command: self.command },
            ));
        }
        if self.reserved != 0 {
            return Some((
                Reply::GeneralFailure,
                Socks5Error::NonZeroReserved {
                    reserved: self.reserved,
                },
            ));
        }
        None
    }
}

/// The server side of a SOCKS5 handshake as a pure state machine: feed it the client's bytes, send what
/// it queues, and it yields the [`Request`] or a [`Socks5Error`]. [`accept`] drives one over a stream.
///
/// It never panics, bounds every length (at most 257 bytes are buffered), and consumes no byte past the
/// end of the request.
///
/// ```
/// use meshwire_dataplane::socks5::{Handshake, Progress, Target};
///
/// let mut handshake = Handshake::new();
/// let input = [5, 1, 0, /* request */ 5, 1, 0, 3, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0, 80, /* data */ 42];
/// let feed = handshake.feed(&input).unwrap();
/// assert_eq!(feed.consumed, input.len() - 1);
/// let Progress::Complete(request) = feed.progress else { panic!("incomplete") };
/// assert_eq!(request.target, Target::Domain { name: "example".into(), port: 80 });
/// assert_eq!(handshake.pending_output(), [5, 0]);
/// ```
#[derive(Debug, Clone)]
pub struct Handshake {
    state: State,
    /// The bytes of the current step received so far.
    step: [u8; MAX_STEP],
    filled: usize,
    /// The part of the handshake being received, and how many of its bytes arrived.
    phase: Phase,
    phase_received: usize,
    /// Bytes to send to the client: `output[output_start..output_end]`.
    output: [u8; MAX_OUTPUT],
    output_start: usize,
    output_end: usize,
    /// The part of the handshake the last queued output belongs to (for naming write errors).
    output_phase: Phase,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A handshake waiting for the client's greeting.
    pub fn new() -> Self {
        Handshake {
            state: State::GreetingHeader,
            step: [0; MAX_STEP],
            filled: 0,
            phase: Phase::Greeting,
            phase_received: 0,
            output: [0; MAX_OUTPUT],
            output_start: 0,
            output_end: 0,
            output_phase: Phase::Greeting,
        }
    }

    /// How many bytes the next step needs, exactly: reading that many (or fewer) never reads past the end
    /// of the request. 0 once the handshake is complete or failed.
    pub fn bytes_wanted(&self) -> usize {
        self.step_len().saturating_sub(self.filled)
    }

    /// Feeds bytes received from the client; any amount, in any fragmentation. Consumes bytes up to the
    /// end of the request at most, and reports how many it consumed and where the handshake stands.
    ///
    /// After a failure, queued output (a method selection 0xFF or a failure reply) may remain to be sent,
    /// and every later call returns the same error. After completion, later calls consume nothing and
    /// return the request again.
    pub fn feed(&mut self, input: &[u8]) -> Result<Feed, Socks5Error> {
        let mut consumed = 0;
        loop {
            match &self.state {
                State::Done(request) => {
                    return Ok(Feed {
                        consumed,
                        progress: Progress::Complete(request.clone()),
                    });
                }
                State::Failed(error) => return Err(error.clone()),
                _ => {}
            }
            let rest = input.get(consumed..).unwrap_or_default();
            let wanted = self.bytes_wanted();
            if rest.is_empty() {
                return Ok(Feed {
                    consumed,
                    progress: Progress::NeedMore(wanted),
                });
            }
            let take = wanted.min(rest.len());
            let (Some(dst), Some(src)) = (self.step.get_mut(self.filled..self.filled + take), rest.get(..take)) else {
                // Unreachable: a step never exceeds the buffer. Fail rather than panic.
                return Err(self.fail(Socks5Error::io(
                    Phase::Request,
                    io::Error::other("SOCKS5 step overflow"),
                )));
            };
            dst.copy_from_slice(src);
            self.filled += take;
            self.phase_received += take;
            consumed += take;
            if self.filled == self.step_len() {
                self.complete_step();
            }
        }
    }

    /// Reports that the input ended (the peer closed the connection). Before the request is complete,
    /// the handshake fails with [`Socks5Error::UnexpectedEof`]; after it, the request is returned.
    pub fn end_of_input(&mut self) -> Result<Request, Socks5Error> {
        match &self.state {
            State::Done(request) => Ok(request.clone()),
            State::Failed(error) => Err(error.clone()),
            _ => {
                let error = Socks5Error::UnexpectedEof {
                    phase: self.phase,
                    received: self.phase_received,
                    missing: self.bytes_wanted(),
                };
                Err(self.fail(error))
            }
        }
    }

    /// The bytes to send to the client now: the method selection after the greeting, or the failure
    /// reply (or method selection 0xFF) of a failed handshake. Empty when there is nothing to send.
    pub fn pending_output(&self) -> &[u8] {
        self.output.get(self.output_start..self.output_end).unwrap_or_default()
    }

    /// Marks `n` bytes of [`pending_output`](Self::pending_output) as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.output_start = (self.output_start + n).min(self.output_end);
    }

    fn step_len(&self) -> usize {
        match self.state {
            State::GreetingHeader => 2,
            State::Methods { count } => usize::from(count),
            State::RequestHeader => 4,
            State::Address { atyp: ATYP_IPV4, .. } => 4 + 2,
            State::Address { .. } => 16 + 2,
            State::DomainLength { .. } => 1,
            State::Domain { len, .. } => usize::from(len) + 2,
            State::Done(_) | State::Failed(_) => 0,
        }
    }

    /// Queues bytes to send (at most [`MAX_OUTPUT`] over the whole handshake, by construction).
    fn queue(&mut self, phase: Phase, bytes: &[u8]) {
        if let Some(dst) = self.output.get_mut(self.output_end..self.output_end + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.output_end += bytes.len();
            self.output_phase = phase;
        }
    }

    fn fail(&mut self, error: Socks5Error) -> Socks5Error {
        self.state = State::Failed(error.clone());
        error
    }

    /// Fails with a reply to the request.
    fn fail_request(&mut self, reply: Reply, error: Socks5Error) {
        self.queue(Phase::Request, reply.encode().as_bytes());
        self.fail(error);
    }

    /// Acts on a completely received step and moves to the next one.
    fn complete_step(&mut self) {
        let received = self.step;
        let step = received.get(..self.filled).unwrap_or_default();
        self.filled = 0;
        let next = match (&self.state, step) {
            (State::GreetingHeader, &[version, count]) => {
                if version != VERSION {
                    self.fail(Socks5Error::UnsupportedVersion {
                        phase: Phase::Greeting,
                        version,
                    });
                    return;
                }
                if count == 0 {
                    self.queue(Phase::Greeting, &[VERSION, METHOD_NONE_ACCEPTABLE]);
                    self.fail(Socks5Error::NoAcceptableMethod { offered: Vec::new() });
                    return;
                }
                State::Methods { count }
            }
            (State::Methods { .. }, methods) => {
                if !methods.contains(&METHOD_NO_AUTH) {
                    let offered = methods.to_vec();
                    self.queue(Phase::Greeting, &[VERSION, METHOD_NONE_ACCEPTABLE]);
                    self.fail(Socks5Error::NoAcceptableMethod { offered });
                    return;
                }
                self.queue(Phase::Greeting, &[VERSION, METHOD_NO_AUTH]);
                self.phase = Phase::Request;
                self.phase_received = 0;
                State::RequestHeader
            }
            (State::RequestHeader, &[version, command, reserved, atyp]) => {
                if version != VERSION {
                    self.fail(Socks5Error::UnsupportedVersion {
                        phase: Phase::Request,
                        version,
                    });
                    return;
                }
                let header = RequestHeader { command, reserved };
                match atyp {
                    ATYP_IPV4 | ATYP_IPV6 => State::Address { header, atyp },
                    ATYP_DOMAIN => State::DomainLength { header },
                    // The length of the rest is unknown: reply now, on the first problem in field order.
                    _ => {
                        let (reply, error) = header.problem().unwrap_or((
                            Reply::AddressTypeNotSupported,
                            Socks5Error::UnsupportedAddressType { atyp },
                        ));
                        self.fail_request(reply, error);
                        return;
                    }
                }
            }
            (&State::Address { header, atyp }, step) => {
                let (ip, port) = match (atyp, step) {
                    (ATYP_IPV4, &[a, b, c, d, p0, p1]) => (IpAddr::V4(Ipv4Addr::new(a, b, c, d)), [p0, p1]),
                    (_, &[ref ip @ .., p0, p1]) => match <[u8; 16]>::try_from(ip) {
                        Ok(octets) => (IpAddr::V6(Ipv6Addr::from(octets)), [p0, p1]),
                        Err(_) => return self.internal_error(),
                    },
                    _ => return self.internal_error(),
                };
                self.finish(header, Target::Addr(SocketAddr::new(ip, u16::from_be_bytes(port))));
                return;
            }
            (&State::DomainLength { header }, &[len]) => State::Domain { header, len },
            (&State::Domain { header, .. }, &[ref name @ .., p0, p1]) => {
                if let Some((reply, error)) = header.problem() {
                    self.fail_request(reply, error);
                    return;
                }
                let port = u16::from_be_bytes([p0, p1]);
                match parse_domain(name, port) {
                    Ok(target) => self.finish(header, target),
                    Err(reason) => {
                        let name = String::from_utf8_lossy(name).into_owned();
                        self.fail_request(Reply::HostUnreachable, Socks5Error::InvalidDomain { name, reason });
                    }
                }
                return;
            }
            _ => return self.internal_error(),
        };
        self.state = next;
    }

    /// Completes a request whose address has been read.
    fn finish(&mut self, header: RequestHeader, target: Target) {
        match header.problem() {
            Some((reply, error)) => self.fail_request(reply, error),
            None => self.state = State::Done(Request { target }),
        }
    }

    /// A step whose length does not match its state; unreachable by construction, but a failure rather
    /// than a panic.
    fn internal_error(&mut self) {
        let error = io::Error::other("SOCKS5 handshake: step of unexpected length");
        self.fail_request(Reply::GeneralFailure, Socks5Error::io(self.phase, error));
    }
}

/// Turns the DST.ADDR of ATYP 3 into a target: an IP literal becomes an address, anything else must be a
/// valid host name.
fn parse_domain(name: &[u8], port: u16) -> Result<Target, DomainError> {
    if let Some(ip) = std::str::from_utf8(name)
        .ok()
        .and_then(|text| text.parse::<IpAddr>().ok())
    {
        return Ok(Target::Addr(SocketAddr::new(ip, port)));
    }
    validate_host_name(name)?;
    Ok(Target::Domain {
        name: String::from_utf8_lossy(name).into_owned(),
        port,
    })
}

/// Checks that `name` is a host name: LDH labels (RFC 952, RFC 1123 section 2.1) of 1 to 63 characters,
/// at most 253 characters plus an optional trailing dot, not ending in a numeric label.
fn validate_host_name(name: &[u8]) -> Result<(), DomainError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(DomainError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(DomainError::TooLong { len: name.len() });
    }
    let mut last = name;
    for label in name.split(|&byte| byte == b'.') {
        if label.is_empty() {
            return Err(DomainError::EmptyLabel);
        }
        if label.len() > MAX_LABEL {
            return Err(DomainError::LabelTooLong { len: label.len() });
        }
        if let Some(&byte) = label
            .iter()
            .find(|byte| !byte.is_ascii_alphanumeric() && **byte != b'-')
        {
            return Err(DomainError::InvalidCharacter { byte });
        }
        if label.starts_with(b"-") || label.ends_with(b"-") {
            return Err(DomainError::HyphenAtLabelEdge);
        }
        last = label;
    }
    if is_number(last) {
        return Err(DomainError::EndsInNumber);
    }
    Ok(())
}

/// Whether a label reads as a number in a legacy IPv4 form: all decimal digits, or `0x` and hex digits.
fn is_number(label: &[u8]) -> bool {
    if let Some(hex) = label.strip_prefix(b"0x").or_else(|| label.strip_prefix(b"0X")) {
        return hex.iter().all(u8::is_ascii_hexdigit);
    }
    label.iter().all(u8::is_ascii_digit)
}

/// Runs the server side of the SOCKS5 handshake on `stream`: reads the greeting, sends the method
/// selection, and reads the request. Returns the request without replying to it: the caller connects
/// upstream, then sends the outcome with [`reply`].
///
/// Reads exactly the bytes of the handshake and never more (no read asks for more than the next step
/// needs), so anything the client sends after its request stays in the stream. If the stream itself
/// buffers (a `BufReader`), its buffer keeps those bytes.
///
/// On failure, the reply it calls for (method selection 0xFF, or REP 0x07, 0x08 or 0x04) has been sent;
/// the caller closes the connection. There is no timeout: wrap the call in the runtime's timeout.
pub async fn accept<S>(stream: &mut S) -> Result<Request, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut handshake = Handshake::new();
    let mut buf = [0u8; MAX_STEP];
    let mut progress = Progress::NeedMore(handshake.bytes_wanted());
    loop {
        flush_output(&mut handshake, stream).await?;
        let wanted = match progress {
            Progress::Complete(request) => return Ok(request),
            Progress::NeedMore(wanted) => wanted.min(buf.len()),
        };
        let Some(dst) = buf.get_mut(..wanted) else {
            return Err(Socks5Error::io(
                handshake.phase,
                io::Error::other("SOCKS5 step overflow"),
            ));
        };
        let n = match stream.read(dst).await {
            Ok(0) => return handshake.end_of_input(),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(Socks5Error::io(handshake.phase, error)),
        };
        match handshake.feed(buf.get(..n).unwrap_or_default()) {
            Ok(feed) => progress = feed.progress,
            Err(error) => {
                // Best effort: the failure is what matters, not whether its reply could be written.
                let _ = flush_output(&mut handshake, stream).await;
                return Err(error);
            }
        }
    }
}

/// Writes and flushes the handshake's pending output.
async fn flush_output<S>(handshake: &mut Handshake, stream: &mut S) -> Result<(), Socks5Error>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    let output = handshake.pending_output();
    if output.is_empty() {
        return Ok(());
    }
    let len = output.len();
    let phase = handshake.output_phase;
    stream
        .write_all(output)
        .await
        .map_err(|error| Socks5Error::io(phase, error))?;
    handshake.consume_output(len);
    stream.flush().await.map_err(|error| Socks5Error::io(phase, error))
}

/// Sends the reply to a request returned by [`accept`]: [`Reply::Succeeded`] once the upstream
/// connection is established, or the failure (for a failed connect, see [`Reply::for_connect_error`]).
/// After a failure reply the caller closes the connection.
pub async fn reply<S>(stream: &mut S, outcome: Reply) -> Result<(), Socks5Error>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    let bytes = outcome.encode();
    stream
        .write_all(bytes.as_bytes())
        .await
        .map_err(|error| Socks5Error::io(Phase::Reply, error))?;
    stream
        .flush()
        .await
        .map_err(|error| Socks5Error::io(Phase::Reply, error))
}
