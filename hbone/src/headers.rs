//! The metadata of an HBONE CONNECT request: its `:authority` and the optional `forwarded`, `baggage`,
//! `traceparent` and `x-forwarded-network` headers, parsed and built as ztunnel writes them.
//!
//! Everything here is a pure function of its input: no IO, no logging, and no allocation beyond the values
//! returned. Parsers are strict where the value decides where bytes go ([`Authority`]) and forgiving where
//! the value is only informative ([`Forwarded`], [`Baggage`]); [`Metadata::from_headers`] never fails as a
//! whole, because a receiver requires none of the metadata headers.
//!
//! Every type builds a value that its own parser accepts and returns unchanged: `to_header_value` fails
//! exactly when the receiver's parser would refuse the value (or the value cannot be a header value at all).
//!
//! ```
//! use meshwire_hbone::headers::{Authority, Baggage, Forwarded, Metadata, TraceParent};
//!
//! let authority: Authority = "[2001:db8::1]:8080".parse()?;
//! assert_eq!(authority.port(), 8080);
//! assert_eq!(authority.to_string(), "[2001:db8::1]:8080");
//!
//! let meta = Metadata {
//!     forwarded: Some(Forwarded::new("10.0.0.1:4711".parse::<std::net::SocketAddr>()?)),
//!     baggage: Some(Baggage { namespace_name: Some("default".into()), ..Baggage::default() }),
//!     traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse::<TraceParent>()?),
//!     x_forwarded_network: None,
//! };
//! let mut headers = http::HeaderMap::new();
//! assert!(meta.to_headers(&mut headers).is_empty());
//! assert_eq!(headers["forwarded"], "for=\"10.0.0.1:4711\"");
//!
//! let (parsed, errors) = Metadata::from_headers(&headers);
//! assert!(errors.is_empty());
//! assert_eq!(parsed, meta);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `forwarded` header (RFC 7239): the original client address.
pub const FORWARDED: HeaderName = http::header::FORWARDED;
/// The `baggage` header (W3C Baggage): the source workload's identity for telemetry.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// The `traceparent` header (W3C Trace Context).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The `x-forwarded-network` header: the client's network, on the inner CONNECT of double HBONE.
pub const X_FORWARDED_NETWORK: HeaderName = HeaderName::from_static("x-forwarded-network");

/// Longest hostname accepted in an `:authority`, in characters (RFC 1123).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest label of a hostname, in characters (RFC 1123).
const MAX_LABEL_LEN: usize = 63;
/// Longest `baggage` value accepted or built, in bytes (all `baggage` fields of a request together).
pub const BAGGAGE_MAX_BYTES: usize = 8192;
/// Most list members accepted in a `baggage` value (all `baggage` fields of a request together).
pub const BAGGAGE_MAX_MEMBERS: usize = 180;
/// How much of a rejected input an error keeps, in bytes.
const EXCERPT_MAX: usize = 128;

// ---------------------------------------------------------------------------------------------------------
// :authority
// ---------------------------------------------------------------------------------------------------------

/// The `:authority` of an HBONE CONNECT: where the tunnel's bytes must go.
///
/// The wire forms are `1.2.3.4:80`, `[2001:db8::1]:80` and `<service hostname>:<port>`. Parsing is strict:
/// a bare IPv6 address, a missing port, port 0, an IPv6 zone (`%eth0`) or a hostname that is not a sequence
/// of RFC 1123 labels is refused. A host made only of digits and dots must be a valid IPv4 address
/// (`01.2.3.4` and `1.2.3` are refused rather than taken as hostnames). Only the canonical form of an
/// address is accepted, the one [`Display`] writes: a port with a leading zero (`1.2.3.4:0080`) or an IPv6
/// address written another way (`[::0001]:80`, `[0:0::1]:80`) is refused rather than read as another
/// spelling of a destination. Hostnames are case-insensitive and kept in lowercase. An IPv4-mapped IPv6
/// address (`[::ffff:1.2.3.4]:80`) stays an IPv6 address.
///
/// [`Display`]: fmt::Display
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Authority {
    /// An IP address and port: the final destination, after service VIP resolution.
    ///
    /// The scope ID and flow information of an IPv6 address are not part of the wire form: [`Display`]
    /// leaves them out and [`Authority::parse`] sets them to zero.
    ///
    /// [`Display`]: fmt::Display
    SocketAddr(SocketAddr),
    /// A service hostname and port.
    Host {
        /// The hostname, in lowercase when it comes from [`Authority::parse`] or [`Authority::host`].
        name: String,
        /// The port, never 0 when it comes from [`Authority::parse`] or [`Authority::host`].
        port: u16,
    },
}

/// Why an `:authority` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The `:authority` is empty.
    #[error(":authority is empty")]
    Empty,
    /// No `:<port>` at the end.
    #[error(":authority {authority:?} has no port (expected <host>:<port>)")]
    MissingPort {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
    },
    /// Port 0, which cannot be a destination.
    #[error(":authority {authority:?} has port 0")]
    PortZero {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
    },
    /// A port that is not a decimal number up to 65535.
    #[error(":authority {authority:?} has an invalid port {port:?} (expected a decimal number in 1..=65535)")]
    InvalidPort {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
        /// The text after the last `:` (at most 128 bytes of it).
        port: String,
    },
    /// Nothing before `:<port>`.
    #[error(":authority {authority:?} has no host before the port")]
    MissingHost {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
    },
    /// An IPv6 address without brackets, such as `2001:db8::1:80` or `::1`.
    #[error(":authority {authority:?}: an IPv6 address must be in brackets, as [<address>]:<port>")]
    UnbracketedIpv6 {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
    },
    /// A `[` that does not start `[<IPv6 address>]:<port>`.
    #[error(":authority {authority:?}: expected [<IPv6 address>]:<port>")]
    InvalidIpv6 {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
    },
    /// A host made only of digits and dots that is not a valid IPv4 address.
    #[error(":authority {authority:?}: the host is neither a valid IPv4 address nor a hostname")]
    InvalidIpv4 {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
    },
    /// A hostname longer than 253 characters.
    #[error(":authority {authority:?}: the hostname is {len} characters long, more than 253")]
    HostnameTooLong {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
        /// The hostname's length.
        len: usize,
    },
    /// A hostname with an empty label: a leading, trailing or doubled `.`.
    #[error(":authority {authority:?}: the hostname has an empty label")]
    EmptyLabel {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
    },
    /// A hostname label longer than 63 characters.
    #[error(":authority {authority:?}: hostname label {label:?} is longer than 63 characters")]
    LabelTooLong {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
        /// The label (at most 128 bytes of it).
        label: String,
    },
    /// A hostname label that starts or ends with `-`.
    #[error(":authority {authority:?}: hostname label {label:?} starts or ends with '-'")]
    LabelHyphen {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
        /// The label.
        label: String,
    },
    /// A hostname character other than an ASCII letter, digit, `-` or `.`.
    #[error(":authority {authority:?}: the hostname contains {ch:?}; only letters, digits, '-' and '.' are allowed")]
    InvalidCharacter {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
        /// The first offending character.
        ch: char,
    },
    /// A valid destination written in a form other than its canonical one: a port with a leading
    /// zero, or an IPv6 address not in its RFC 5952 form.
    #[error(":authority {authority:?} is not in canonical form: expected {canonical:?}")]
    NotCanonical {
        /// The rejected `:authority` (at most 128 bytes of it).
        authority: String,
        /// The canonical form of the same destination.
        canonical: String,
    },
}

/// What is wrong with a hostname, before the error names the whole `:authority`.
enum HostnameProblem {
    TooLong(usize),
    EmptyLabel,
    LabelTooLong(usize),
    LabelHyphen(usize),
    Character(char),
}

impl HostnameProblem {
    fn into_error(self, name: &str, authority: &str) -> AuthorityError {
        let label_at = |start: usize| {
            let end = name[start..].find('.').map_or(name.len(), |i| start + i);
            excerpt(&name[start..end])
        };
        let authority = excerpt(authority);
        match self {
            Self::TooLong(len) => AuthorityError::HostnameTooLong { authority, len },
            Self::EmptyLabel => AuthorityError::EmptyLabel { authority },
            Self::LabelTooLong(start) => AuthorityError::LabelTooLong {
                authority,
                label: label_at(start),
            },
            Self::LabelHyphen(start) => AuthorityError::LabelHyphen {
                authority,
                label: label_at(start),
            },
            Self::Character(ch) => AuthorityError::InvalidCharacter { authority, ch },
        }
    }
}

/// Checks RFC 1123 hostname syntax (any letter case). Label problems carry the label's start.
fn check_hostname(name: &str) -> Result<(), HostnameProblem> {
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(HostnameProblem::Character(ch));
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(HostnameProblem::TooLong(name.len()));
    }
    let mut start = 0;
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostnameProblem::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostnameProblem::LabelTooLong(start));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostnameProblem::LabelHyphen(start));
        }
        start += label.len() + 1;
    }
    Ok(())
}

/// Whether a host is made of digits and dots only, with at least one digit: it must then be an IPv4 address.
fn looks_like_ipv4(host: &str) -> bool {
    host.bytes().any(|b| b.is_ascii_digit()) && host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Parses the port of an `:authority` (the text after its last `:`).
fn parse_authority_port(authority: &str, port: &str) -> Result<u16, AuthorityError> {
    if port.is_empty() {
        return Err(AuthorityError::MissingPort {
            authority: excerpt(authority),
        });
    }
    // `u16::from_str` accepts a leading `+`: check for digits first.
    let number = if port.bytes().all(|b| b.is_ascii_digit()) {
        port.parse::<u16>().ok()
    } else {
        None
    };
    match number {
        Some(0) => Err(AuthorityError::PortZero {
            authority: excerpt(authority),
        }),
        Some(port) => Ok(port),
        None => Err(AuthorityError::InvalidPort {
            authority: excerpt(authority),
            port: excerpt(port),
        }),
    }
}

impl Authority {
    /// Parses an `:authority` in one of its wire forms: `1.2.3.4:80`, `[2001:db8::1]:80` or `<hostname>:<port>`,
    /// written canonically (up to the case of a hostname or of IPv6 hex digits).
    ///
    /// ```
    /// use meshwire_hbone::headers::{Authority, AuthorityError};
    ///
    /// assert_eq!(Authority::parse("10.0.0.1:80")?.port(), 80);
    /// assert!(matches!(Authority::parse("10.0.0.1:0080"), Err(AuthorityError::NotCanonical { .. })));
    /// assert!(matches!(Authority::parse("[::0001]:80"), Err(AuthorityError::NotCanonical { .. })));
    /// # Ok::<(), AuthorityError>(())
    /// ```
    pub fn parse(authority: &str) -> Result<Self, AuthorityError> {
        let parsed = Self::parse_any_form(authority)?;
        let canonical = parsed.to_string();
        if !canonical.eq_ignore_ascii_case(authority) {
            return Err(AuthorityError::NotCanonical {
                authority: excerpt(authority),
                canonical,
            });
        }
        Ok(parsed)
    }

    /// [`parse`](Self::parse) without the check of the canonical form.
    fn parse_any_form(authority: &str) -> Result<Self, AuthorityError> {
        if authority.is_empty() {
            return Err(AuthorityError::Empty);
        }
        if let Some(rest) = authority.strip_prefix('[') {
            let invalid = || AuthorityError::InvalidIpv6 {
                authority: excerpt(authority),
            };
            let (ip, after) = rest.split_once(']').ok_or_else(invalid)?;
            let ip = Ipv6Addr::from_str(ip).map_err(|_| invalid())?;
            let port = match after.strip_prefix(':') {
                Some(port) => parse_authority_port(authority, port)?,
                None if after.is_empty() => {
                    return Err(AuthorityError::MissingPort {
                        authority: excerpt(authority),
                    });
                }
                None => return Err(invalid()),
            };
            return Ok(Self::SocketAddr(SocketAddr::new(IpAddr::V6(ip), port)));
        }
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(AuthorityError::MissingPort {
                authority: excerpt(authority),
            });
        };
        if host.contains(':') {
            if Ipv6Addr::from_str(authority).is_ok() || Ipv6Addr::from_str(host).is_ok() {
                return Err(AuthorityError::UnbracketedIpv6 {
                    authority: excerpt(authority),
                });
            }
            return Err(AuthorityError::InvalidCharacter {
                authority: excerpt(authority),
                ch: ':',
            });
        }
        if host.is_empty() {
            return Err(AuthorityError::MissingHost {
                authority: excerpt(authority),
            });
        }
        if let Ok(ip) = Ipv4Addr::from_str(host) {
            let port = parse_authority_port(authority, port)?;
            return Ok(Self::SocketAddr(SocketAddr::new(IpAddr::V4(ip), port)));
        }
        if looks_like_ipv4(host) {
            return Err(AuthorityError::InvalidIpv4 {
                authority: excerpt(authority),
            });
        }
        check_hostname(host).map_err(|problem| problem.into_error(host, authority))?;
        let port = parse_authority_port(authority, port)?;
        Ok(Self::Host {
            name: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Builds a hostname authority, checking the hostname and port as [`Authority::parse`] does.
    ///
    /// The hostname is stored in lowercase. An IP address is refused here: use [`Authority::SocketAddr`].
    pub fn host(name: &str, port: u16) -> Result<Self, AuthorityError> {
        let authority = || format!("{name}:{port}");
        if name.is_empty() {
            return Err(AuthorityError::MissingHost {
                authority: excerpt(&authority()),
            });
        }
        if looks_like_ipv4(name) {
            return Err(AuthorityError::InvalidIpv4 {
                authority: excerpt(&authority()),
            });
        }
        check_hostname(name).map_err(|problem| problem.into_error(name, &authority()))?;
        if port == 0 {
            return Err(AuthorityError::PortZero {
                authority: excerpt(&authority()),
            });
        }
        Ok(Self::Host {
            name: name.to_ascii_lowercase(),
            port,
        })
    }

    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            Self::SocketAddr(addr) => addr.port(),
            Self::Host { port, .. } => *port,
        }
    }

    /// The destination address, when the authority is an IP address rather than a hostname.
    pub fn as_socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::SocketAddr(addr) => Some(*addr),
            Self::Host { .. } => None,
        }
    }

    /// The hostname, when the authority is a hostname rather than an IP address.
    pub fn host_name(&self) -> Option<&str> {
        match self {
            Self::SocketAddr(_) => None,
            Self::Host { name, .. } => Some(name),
        }
    }
}

impl fmt::Display for Authority {
    /// The canonical wire form: `1.2.3.4:80`, `[2001:db8::1]:80` or `<hostname>:<port>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SocketAddr(SocketAddr::V4(addr)) => write!(f, "{}:{}", addr.ip(), addr.port()),
            Self::SocketAddr(SocketAddr::V6(addr)) => write!(f, "[{}]:{}", addr.ip(), addr.port()),
            Self::Host { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

impl FromStr for Authority {
    type Err = AuthorityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&http::uri::Authority> for Authority {
    type Error = AuthorityError;

    /// Checks the authority of a request URI (as `h2` hands it to a server) against the HBONE forms.
    fn try_from(authority: &http::uri::Authority) -> Result<Self, Self::Error> {
        Self::parse(authority.as_str())
    }
}

// ---------------------------------------------------------------------------------------------------------
// forwarded
// ---------------------------------------------------------------------------------------------------------

/// The `for=` node of a `forwarded` header: the client's address, with or without its port.
///
/// RFC 7239 allows a node without a port (`for=192.0.2.1`, `for="[2001:db8::1]"`); it is kept as
/// [`ForwardedFor::Ip`] rather than given a made-up port. Obfuscated and `unknown` nodes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardedFor {
    /// An address and port, as ztunnel writes it.
    Addr(SocketAddr),
    /// An address without a port.
    Ip(IpAddr),
}

impl ForwardedFor {
    /// The client's IP address.
    pub fn ip(&self) -> IpAddr {
        match self {
            Self::Addr(addr) => addr.ip(),
            Self::Ip(ip) => *ip,
        }
    }

    /// The client's port, when the node has one.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Addr(addr) => Some(addr.port()),
            Self::Ip(_) => None,
        }
    }

    /// Reads a node: `1.2.3.4`, `1.2.3.4:80`, `[v6]`, `[v6]:80`, `[v6%scope]:80`, and bare `v6`.
    fn parse(node: &str) -> Option<Self> {
        if let Ok(addr) = SocketAddr::from_str(node) {
            return Some(Self::Addr(addr));
        }
        if let Ok(ip) = IpAddr::from_str(node) {
            return Some(Self::Ip(ip));
        }
        let inner = node.strip_prefix('[')?.strip_suffix(']')?;
        Ipv6Addr::from_str(inner).ok().map(|ip| Self::Ip(IpAddr::V6(ip)))
    }
}

impl From<SocketAddr> for ForwardedFor {
    fn from(addr: SocketAddr) -> Self {
        Self::Addr(addr)
    }
}

impl From<IpAddr> for ForwardedFor {
    fn from(ip: IpAddr) -> Self {
        Self::Ip(ip)
    }
}

impl fmt::Display for ForwardedFor {
    /// The node as RFC 7239 writes it, before quoting: `1.2.3.4:80`, `[2001:db8::1]:80`, `1.2.3.4`, `[2001:db8::1]`.
    ///
    /// An IPv6 scope ID is written as the standard library writes it (`[fe80::1%2]:80`) and parsed back;
    /// flow information is not written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(addr) => write!(f, "{addr}"),
            Self::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// The `forwarded` header of an HBONE CONNECT: `for="<client ip:port>"`, plus `;host=<service hostname>`
/// when the client addressed a service.
///
/// Built values always quote the node (`for="10.0.0.1:4711"`, `for="[2001:db8::1]:4711"`), as ztunnel does
/// and as RFC 7239 requires for anything containing `:`; the host is written as a token when it is one and
/// as a quoted string otherwise.
///
/// Parsing reads the first non-empty element of the list and ignores the rest. It accepts quoted or
/// unquoted values (also unquoted IPv6 nodes), parameter names in any case, whitespace around `;`, `=` and
/// `,`, quoted-pair escapes, and unknown parameters (ignored). It refuses a first element without `for`,
/// with `for` or `host` twice, or whose `for` is not an IP address. The host is kept as written (no case
/// folding, no hostname check): it is informative only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Forwarded {
    /// The client's address.
    pub for_addr: ForwardedFor,
    /// The service hostname the client addressed, if any.
    pub host: Option<String>,
}

/// Why a `forwarded` header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardedError {
    /// The header value is not UTF-8.
    #[error("forwarded header is not valid UTF-8")]
    NotUtf8,
    /// The first element is not a `;`-separated list of `name=value` pairs.
    #[error("forwarded header {value:?}: {reason}")]
    Malformed {
        /// The rejected header value (at most 128 bytes of it).
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The first element has no `for` parameter.
    #[error("forwarded header {value:?} has no for= parameter in its first element")]
    MissingFor {
        /// The rejected header value (at most 128 bytes of it).
        value: String,
    },
    /// A parameter appears twice in the first element.
    #[error("forwarded header {value:?}: parameter {param} appears more than once in the first element")]
    DuplicateParameter {
        /// The rejected header value (at most 128 bytes of it).
        value: String,
        /// `for` or `host`.
        param: &'static str,
    },
    /// The `for` node is not an IP address with an optional port.
    #[error("forwarded header: for={node:?} is not an IP address with an optional port")]
    InvalidFor {
        /// The node, unquoted (at most 128 bytes of it).
        node: String,
    },
    /// The host contains a control character, which no header value can carry.
    #[error("forwarded header: host {host:?} contains a control character")]
    UnrepresentableHost {
        /// The host (at most 128 bytes of it).
        host: String,
    },
}

/// Reads RFC 7230 syntax (tokens, quoted strings, whitespace) from a header value.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let found = self.peek() == Some(b);
        if found {
            self.pos += 1;
        }
        found
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Takes a run of ASCII bytes matching `keep` (the run ends on a char boundary).
    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii() && keep(b)) {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    /// Takes an unquoted value: everything up to whitespace, `;`, `,` or `"` (non-ASCII included).
    fn take_unquoted(&mut self) -> &'a str {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| !matches!(b, b' ' | b'\t' | b';' | b',' | b'"'))
        {
            self.pos += 1;
        }
        // The delimiters are ASCII, so `pos` is on a char boundary.
        &self.s[start..self.pos]
    }

    /// Takes a quoted string, the cursor being on its opening `"`; `None` when it is not terminated.
    fn take_quoted(&mut self) -> Option<Cow<'a, str>> {
        let bytes = self.s.as_bytes();
        let start = self.pos + 1;
        let mut i = start;
        let mut escaped = false;
        loop {
            match bytes.get(i)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    bytes.get(i + 1)?;
                    i += 2;
                }
                _ => i += 1,
            }
        }
        self.pos = i + 1;
        let raw = &self.s[start..i];
        if !escaped {
            return Some(Cow::Borrowed(raw));
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut rest = raw.bytes();
        while let Some(b) = rest.next() {
            // A backslash escapes the next byte; continuation bytes of a multi-byte character are never `\`.
            out.push(if b == b'\\' { rest.next()? } else { b });
        }
        // Removing ASCII backslashes from UTF-8 leaves UTF-8.
        String::from_utf8(out).ok().map(Cow::Owned)
    }
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether a string is a non-empty RFC 7230 token.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// Whether a character cannot appear in a header value at all (controls other than HTAB, and DEL).
fn is_unrepresentable(c: char) -> bool {
    c.is_ascii_control() && c != '\t'
}

impl Forwarded {
    /// A `forwarded` value for a client address, without a host.
    pub fn new(for_addr: impl Into<ForwardedFor>) -> Self {
        Self {
            for_addr: for_addr.into(),
            host: None,
        }
    }

    /// Sets the service hostname the client addressed.
    #[must_use]
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Parses a `forwarded` header value (see [`Forwarded`] for what is accepted).
    pub fn parse(value: &str) -> Result<Self, ForwardedError> {
        let malformed = |reason| ForwardedError::Malformed {
            value: excerpt(value),
            reason,
        };
        let mut cursor = Cursor { s: value, pos: 0 };
        // Skip empty list elements, which RFC 7230 lets a recipient ignore.
        loop {
            cursor.skip_ows();
            if !cursor.eat(b',') {
                break;
            }
        }
        let mut for_node: Option<Cow<'_, str>> = None;
        let mut host: Option<Cow<'_, str>> = None;
        loop {
            cursor.skip_ows();
            match cursor.peek() {
                None | Some(b',') => break,
                Some(b';') => {
                    cursor.pos += 1;
                    continue;
                }
                Some(_) => {}
            }
            let name = cursor.take_while(is_tchar);
            if name.is_empty() {
                return Err(malformed("expected a parameter name"));
            }
            cursor.skip_ows();
            if !cursor.eat(b'=') {
                return Err(malformed("a parameter has no '=' and value"));
            }
            cursor.skip_ows();
            let param_value = if cursor.peek() == Some(b'"') {
                cursor
                    .take_quoted()
                    .ok_or_else(|| malformed("a quoted string is not terminated"))?
            } else {
                Cow::Borrowed(cursor.take_unquoted())
            };
            cursor.skip_ows();
            if !matches!(cursor.peek(), None | Some(b';' | b',')) {
                return Err(malformed("unexpected text after a parameter value"));
            }
            let (slot, param) = if name.eq_ignore_ascii_case("for") {
                (&mut for_node, "for")
            } else if name.eq_ignore_ascii_case("host") {
                (&mut host, "host")
            } else {
                continue;
            };
            if slot.is_some() {
                return Err(ForwardedError::DuplicateParameter {
                    value: excerpt(value),
                    param,
                });
            }
            *slot = Some(param_value);
        }
        let node = for_node.ok_or_else(|| ForwardedError::MissingFor { value: excerpt(value) })?;
        let for_addr = ForwardedFor::parse(&node).ok_or_else(|| ForwardedError::InvalidFor { node: excerpt(&node) })?;
        Ok(Self {
            for_addr,
            host: host.map(Cow::into_owned),
        })
    }

    /// Parses a `forwarded` header value, which must be UTF-8.
    pub fn from_header_value(value: &HeaderValue) -> Result<Self, ForwardedError> {
        let value = std::str::from_utf8(value.as_bytes()).map_err(|_| ForwardedError::NotUtf8)?;
        Self::parse(value)
    }

    /// Builds the header value; fails when the host contains a control character.
    pub fn to_header_value(&self) -> Result<HeaderValue, ForwardedError> {
        if let Some(host) = &self.host
            && host.chars().any(is_unrepresentable)
        {
            return Err(ForwardedError::UnrepresentableHost { host: excerpt(host) });
        }
        HeaderValue::try_from(self.to_string()).map_err(|_| ForwardedError::UnrepresentableHost {
            host: excerpt(self.host.as_deref().unwrap_or_default()),
        })
    }
}

impl fmt::Display for Forwarded {
    /// The header value, such as `for="10.0.0.1:4711";host=reviews.default.svc.cluster.local`.
    ///
    /// A host with control characters is written as is, which makes the value unusable as a header value:
    /// [`Forwarded::to_header_value`] checks for that.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "for=\"{}\"", self.for_addr)?;
        let Some(host) = &self.host else {
            return Ok(());
        };
        f.write_str(";host=")?;
        if is_token(host) {
            return f.write_str(host);
        }
        f.write_char('"')?;
        for c in host.chars() {
            if c == '"' || c == '\\' {
                f.write_char('\\')?;
            }
            f.write_char(c)?;
        }
        f.write_char('"')
    }
}

impl FromStr for Forwarded {
    type Err = ForwardedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------------------
// baggage
// ---------------------------------------------------------------------------------------------------------

/// The subset of W3C baggage that HBONE carries: the source (or, on a response, destination) workload.
///
/// Built as `k1=v1,k2=v2` in ztunnel's key order, values percent-encoded wherever W3C baggage requires it
/// (outside `baggage-octet`) and also `%`, so that any string, Unicode included, comes back unchanged.
/// `Some("")` is written as `key=` and read back as `Some("")`.
///
/// Parsing is forgiving: members are split on `,` and trimmed; properties after `;` are ignored; values are
/// percent-decoded (an invalid `%` sequence is kept as written, decoded bytes that are not UTF-8 become
/// U+FFFD as W3C requires); unknown keys, empty members and malformed members (no `=`, a key that is not a
/// token) are skipped; for a key given twice, the first value wins. The value is an error only when it
/// is not UTF-8 or exceeds the limits ([`BAGGAGE_MAX_BYTES`], [`BAGGAGE_MAX_MEMBERS`]). Raw non-ASCII UTF-8
/// in a value is accepted as is. Keys are case-sensitive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster_name: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace_name: Option<String>,
    /// The `<kind>` of `k8s.<kind>.name`: `deployment`, `daemonset`, `statefulset`, `job`, `cronjob`, `pod`, ...
    ///
    /// Written only together with [`Baggage::workload_name`]; it must be a token (no `,`, `;`, `=` or
    /// whitespace) and neither `cluster` nor `namespace`.
    pub workload_kind: Option<String>,
    /// The value of `k8s.<kind>.name`: the workload's name.
    pub workload_name: Option<String>,
    /// `service.name`.
    pub service_name: Option<String>,
    /// `service.version`.
    pub service_version: Option<String>,
    /// `cloud.region`.
    pub cloud_region: Option<String>,
    /// `cloud.availability_zone`.
    pub cloud_availability_zone: Option<String>,
}

/// Why a `baggage` header is refused, or a [`Baggage`] cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BaggageError {
    /// The header value is not UTF-8.
    #[error("baggage header is not valid UTF-8")]
    NotUtf8,
    /// The value is longer than [`BAGGAGE_MAX_BYTES`].
    #[error("baggage header is {len} bytes long, more than the {BAGGAGE_MAX_BYTES} allowed")]
    TooLarge {
        /// The length in bytes (of all `baggage` fields so far, when there are several).
        len: usize,
    },
    /// The value has more than [`BAGGAGE_MAX_MEMBERS`] list members.
    #[error("baggage header has more than {BAGGAGE_MAX_MEMBERS} list members")]
    TooManyMembers,
    /// A workload kind that cannot be the `<kind>` of a `k8s.<kind>.name` key.
    #[error(
        "baggage: workload kind {kind:?} cannot form the key k8s.<kind>.name \
         (it must be a non-empty token other than \"cluster\" and \"namespace\")"
    )]
    InvalidWorkloadKind {
        /// The kind (at most 128 bytes of it).
        kind: String,
    },
    /// Only one of `workload_kind` and `workload_name` is set.
    #[error("baggage: workload_kind and workload_name must be set together")]
    IncompleteWorkload,
}

/// W3C `baggage-octet`, minus `%` (which this encoder always escapes so that decoding is exact).
fn is_baggage_safe(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

fn write_percent_encoded(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    for b in value.bytes() {
        if is_baggage_safe(b) {
            f.write_char(char::from(b))?;
        } else {
            write!(f, "%{b:02X}")?;
        }
    }
    Ok(())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(value: &str) -> String {
    if !value.contains('%') {
        return value.to_owned();
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            )
        {
            out.push((high << 4) | low);
            i += 3;
            continue;
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Accumulates `baggage` fields, enforcing the limits over all of them.
#[derive(Default)]
struct BaggageParser {
    baggage: Baggage,
    bytes: usize,
    fields: usize,
    members: usize,
}

impl BaggageParser {
    fn feed(&mut self, value: &str) -> Result<(), BaggageError> {
        // Several fields count as one comma-joined value.
        self.bytes += value.len() + usize::from(self.fields > 0);
        self.fields += 1;
        if self.bytes > BAGGAGE_MAX_BYTES {
            return Err(BaggageError::TooLarge { len: self.bytes });
        }
        for member in value.split(',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            self.members += 1;
            if self.members > BAGGAGE_MAX_MEMBERS {
                return Err(BaggageError::TooManyMembers);
            }
            let pair = member.split_once(';').map_or(member, |(pair, _properties)| pair);
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let (key, value) = (trim_ows(key), trim_ows(value));
            if !is_token(key) {
                continue;
            }
            let b = &mut self.baggage;
            let slot = match key {
                "k8s.cluster.name" => &mut b.cluster_name,
                "k8s.namespace.name" => &mut b.namespace_name,
                "service.name" => &mut b.service_name,
                "service.version" => &mut b.service_version,
                "cloud.region" => &mut b.cloud_region,
                "cloud.availability_zone" => &mut b.cloud_availability_zone,
                _ => {
                    if let Some(kind) = workload_kind_of(key)
                        && b.workload_name.is_none()
                    {
                        b.workload_kind = Some(kind.to_owned());
                        b.workload_name = Some(percent_decode(value));
                    }
                    continue;
                }
            };
            if slot.is_none() {
                *slot = Some(percent_decode(value));
            }
        }
        Ok(())
    }
}

/// The `<kind>` of a `k8s.<kind>.name` key (the cluster and namespace keys excluded).
fn workload_kind_of(key: &str) -> Option<&str> {
    let kind = key.strip_prefix("k8s.")?.strip_suffix(".name")?;
    valid_workload_kind(kind).then_some(kind)
}

fn valid_workload_kind(kind: &str) -> bool {
    is_token(kind) && kind != "cluster" && kind != "namespace"
}

impl Baggage {
    /// Parses one `baggage` header value (see [`Baggage`] for what is accepted).
    pub fn parse(value: &str) -> Result<Self, BaggageError> {
        let mut parser = BaggageParser::default();
        parser.feed(value)?;
        Ok(parser.baggage)
    }

    /// Parses one `baggage` header value, which must be UTF-8.
    pub fn from_header_value(value: &HeaderValue) -> Result<Self, BaggageError> {
        Self::from_header_values([value])
    }

    /// Parses all the `baggage` fields of a request as one comma-joined list, as W3C baggage specifies.
    ///
    /// The limits apply to all fields together; for a key given twice, the first value wins.
    pub fn from_header_values<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Result<Self, BaggageError> {
        let mut parser = BaggageParser::default();
        for value in values {
            let value = std::str::from_utf8(value.as_bytes()).map_err(|_| BaggageError::NotUtf8)?;
            parser.feed(value)?;
        }
        Ok(parser.baggage)
    }

    /// Builds the header value; fails on an incomplete or invalid workload, or beyond [`BAGGAGE_MAX_BYTES`].
    pub fn to_header_value(&self) -> Result<HeaderValue, BaggageError> {
        match (&self.workload_kind, &self.workload_name) {
            (Some(kind), Some(_)) if !valid_workload_kind(kind) => {
                return Err(BaggageError::InvalidWorkloadKind { kind: excerpt(kind) });
            }
            (Some(_), None) | (None, Some(_)) => return Err(BaggageError::IncompleteWorkload),
            _ => {}
        }
        let value = self.to_string();
        if value.len() > BAGGAGE_MAX_BYTES {
            return Err(BaggageError::TooLarge { len: value.len() });
        }
        // Keys are tokens and values are percent-encoded: the value is visible ASCII.
        HeaderValue::try_from(value).map_err(|_| BaggageError::InvalidWorkloadKind {
            kind: excerpt(self.workload_kind.as_deref().unwrap_or_default()),
        })
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Baggage {
    /// The header value, such as `k8s.namespace.name=default,service.name=reviews`.
    ///
    /// The workload member is written only when both its kind and name are set; an invalid kind is written
    /// as is. [`Baggage::to_header_value`] checks both.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload = match (&self.workload_kind, &self.workload_name) {
            (Some(kind), Some(name)) => Some((kind.as_str(), name)),
            _ => None,
        };
        let members = [
            ("k8s.", "cluster", self.cluster_name.as_ref()),
            ("k8s.", "namespace", self.namespace_name.as_ref()),
            (
                "k8s.",
                workload.map_or("", |(kind, _)| kind),
                workload.map(|(_, name)| name),
            ),
            ("service.", "name", self.service_name.as_ref()),
            ("service.", "version", self.service_version.as_ref()),
            ("cloud.", "region", self.cloud_region.as_ref()),
            ("cloud.", "availability_zone", self.cloud_availability_zone.as_ref()),
        ];
        let mut first = true;
        for (prefix, middle, value) in members {
            let Some(value) = value else {
                continue;
            };
            if !first {
                f.write_char(',')?;
            }
            first = false;
            let suffix = if prefix == "k8s." { ".name" } else { "" };
            write!(f, "{prefix}{middle}{suffix}=")?;
            write_percent_encoded(f, value)?;
        }
        Ok(())
    }
}

impl FromStr for Baggage {
    type Err = BaggageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------------------
// traceparent
// ---------------------------------------------------------------------------------------------------------

/// A W3C `traceparent`: `00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`.
///
/// Parsing follows W3C Trace Context: lowercase hex only; version `ff`, an all-zero trace-id or parent-id
/// are refused; version `00` is exactly 55 characters; a higher version is read for its first four
/// fields when it is at least 55 characters and, if longer, has `-` at position 55. The version is not
/// kept: a value is always written as version `00`, as the specification asks of a propagator that reads a
/// newer version. All eight flag bits are kept and written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace-id; all zeros is invalid.
    pub trace_id: [u8; 16],
    /// The parent-id (span id of the caller); all zeros is invalid.
    pub parent_id: [u8; 8],
    /// The trace flags; bit 0 is "sampled".
    pub flags: u8,
}

/// Why a `traceparent` header is refused, or a [`TraceParent`] cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParentError {
    /// Fewer than 55 bytes.
    #[error("traceparent header is {len} bytes long; it needs at least 55")]
    TooShort {
        /// The length in bytes.
        len: usize,
    },
    /// Version `00` with other than 55 bytes.
    #[error("traceparent header is {len} bytes long; version 00 has exactly 55")]
    WrongLength {
        /// The length in bytes.
        len: usize,
    },
    /// Version `ff`, which the specification forbids.
    #[error("traceparent header has version ff, which is invalid")]
    InvalidVersion,
    /// A field that is not lowercase hexadecimal.
    #[error("traceparent header: {field} is not lowercase hexadecimal")]
    NotLowercaseHex {
        /// `version`, `trace-id`, `parent-id` or `trace-flags`.
        field: &'static str,
    },
    /// A missing `-` separator.
    #[error("traceparent header: expected '-' at position {position}")]
    MissingDash {
        /// The 0-based byte position.
        position: usize,
    },
    /// An all-zero trace-id.
    #[error("traceparent header: trace-id is all zeros")]
    ZeroTraceId,
    /// An all-zero parent-id.
    #[error("traceparent header: parent-id is all zeros")]
    ZeroParentId,
}

/// A lowercase hex digit's value.
fn lower_hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Decodes lowercase hex into `out`, which is half the length of `hex`.
fn decode_lower_hex(hex: &[u8], out: &mut [u8], field: &'static str) -> Result<(), TraceParentError> {
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        match (lower_hex_value(pair[0]), lower_hex_value(pair[1])) {
            (Some(high), Some(low)) => *byte = (high << 4) | low,
            _ => return Err(TraceParentError::NotLowercaseHex { field }),
        }
    }
    Ok(())
}

impl TraceParent {
    /// The "sampled" flag bit.
    pub const SAMPLED: u8 = 0x01;

    /// Parses a `traceparent` header value.
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        Self::parse_bytes(value.as_bytes())
    }

    /// Parses a `traceparent` header value.
    pub fn from_header_value(value: &HeaderValue) -> Result<Self, TraceParentError> {
        Self::parse_bytes(value.as_bytes())
    }

    fn parse_bytes(b: &[u8]) -> Result<Self, TraceParentError> {
        let len = b.len();
        if len < 55 {
            return Err(TraceParentError::TooShort { len });
        }
        let mut version = [0u8; 1];
        decode_lower_hex(&b[0..2], &mut version, "version")?;
        match version[0] {
            0xff => return Err(TraceParentError::InvalidVersion),
            0x00 if len != 55 => return Err(TraceParentError::WrongLength { len }),
            _ => {}
        }
        for position in [2, 35, 52] {
            if b[position] != b'-' {
                return Err(TraceParentError::MissingDash { position });
            }
        }
        if len > 55 && b[55] != b'-' {
            return Err(TraceParentError::MissingDash { position: 55 });
        }
        let mut parsed = Self {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        decode_lower_hex(&b[3..35], &mut parsed.trace_id, "trace-id")?;
        decode_lower_hex(&b[36..52], &mut parsed.parent_id, "parent-id")?;
        let mut flags = [0u8; 1];
        decode_lower_hex(&b[53..55], &mut flags, "trace-flags")?;
        parsed.flags = flags[0];
        parsed.check()?;
        Ok(parsed)
    }

    fn check(&self) -> Result<(), TraceParentError> {
        if self.trace_id == [0; 16] {
            return Err(TraceParentError::ZeroTraceId);
        }
        if self.parent_id == [0; 8] {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(())
    }

    /// Whether the caller may have recorded the trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// Builds the header value; fails on an all-zero trace-id or parent-id.
    pub fn to_header_value(&self) -> Result<HeaderValue, TraceParentError> {
        self.check()?;
        // Always 55 bytes of lowercase hex and dashes.
        HeaderValue::try_from(self.to_string()).map_err(|_| TraceParentError::NotLowercaseHex { field: "trace-id" })
    }
}

impl fmt::Display for TraceParent {
    /// The version `00` header value, such as `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for b in self.trace_id {
            write!(f, "{b:02x}")?;
        }
        f.write_char('-')?;
        for b in self.parent_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------------------
// all metadata headers
// ---------------------------------------------------------------------------------------------------------

/// Why one metadata header was dropped by [`Metadata::from_headers`] or not written by [`Metadata::to_headers`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The `forwarded` header.
    #[error(transparent)]
    Forwarded(#[from] ForwardedError),
    /// The `baggage` header.
    #[error(transparent)]
    Baggage(#[from] BaggageError),
    /// The `traceparent` header.
    #[error(transparent)]
    TraceParent(#[from] TraceParentError),
    /// The `x-forwarded-network` header: empty, or not visible ASCII.
    #[error("x-forwarded-network header {value:?}: {reason}")]
    ForwardedNetwork {
        /// The rejected value (at most 128 bytes of it, lossily decoded).
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A header that may appear only once appears several times.
    #[error("{header} header appears {count} times; it may appear at most once")]
    Repeated {
        /// `traceparent` or `x-forwarded-network`.
        header: &'static str,
        /// How many times it appears.
        count: usize,
    },
}

impl HeaderError {
    /// The name of the header concerned, for logs.
    pub fn header(&self) -> &'static str {
        match self {
            Self::Forwarded(_) => "forwarded",
            Self::Baggage(_) => "baggage",
            Self::TraceParent(_) => "traceparent",
            Self::ForwardedNetwork { .. } => "x-forwarded-network",
            Self::Repeated { header, .. } => header,
        }
    }
}

/// Checks a network name: visible ASCII, no whitespace, not empty.
fn check_network(value: &[u8]) -> Result<(), HeaderError> {
    let reason = if value.is_empty() {
        "the network name is empty"
    } else if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
        "the network name must be visible ASCII without whitespace"
    } else {
        return Ok(());
    };
    Err(HeaderError::ForwardedNetwork {
        value: excerpt(&String::from_utf8_lossy(value)),
        reason,
    })
}

/// The optional metadata headers of an HBONE CONNECT request. A receiver requires none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// `forwarded`: the original client address, and the service it addressed.
    pub forwarded: Option<Forwarded>,
    /// `baggage`: the source workload, for telemetry.
    pub baggage: Option<Baggage>,
    /// `traceparent`: the caller's trace context.
    pub traceparent: Option<TraceParent>,
    /// `x-forwarded-network`: the client's network, on the inner CONNECT of double HBONE.
    ///
    /// A network name is visible ASCII without whitespace; surrounding whitespace is trimmed on parsing.
    pub x_forwarded_network: Option<String>,
}

impl Metadata {
    /// Writes the headers that are set, each replacing any earlier value of that name.
    ///
    /// A value that would be refused by the receiver or cannot be a header value (a control character in
    /// the forwarded host, an incomplete baggage workload, an all-zero trace id, an invalid network name) is
    /// not written and is reported in the returned list instead; the map is otherwise left as it was, and
    /// headers that are `None` are not touched. As on the receiving side, one bad value does not stop the others.
    pub fn to_headers(&self, map: &mut HeaderMap) -> Vec<HeaderError> {
        let mut errors = Vec::new();
        let mut put = |name: HeaderName, value: Option<Result<HeaderValue, HeaderError>>| match value {
            Some(Ok(value)) => {
                map.insert(name, value);
            }
            Some(Err(e)) => errors.push(e),
            None => {}
        };
        put(
            FORWARDED,
            self.forwarded
                .as_ref()
                .map(|f| f.to_header_value().map_err(HeaderError::from)),
        );
        put(
            BAGGAGE,
            self.baggage
                .as_ref()
                .map(|b| b.to_header_value().map_err(HeaderError::from)),
        );
        put(
            TRACEPARENT,
            self.traceparent
                .as_ref()
                .map(|t| t.to_header_value().map_err(HeaderError::from)),
        );
        put(
            X_FORWARDED_NETWORK,
            self.x_forwarded_network.as_ref().map(|network| {
                check_network(network.as_bytes())?;
                HeaderValue::from_str(network).map_err(|_| HeaderError::ForwardedNetwork {
                    value: excerpt(network),
                    reason: "the network name must be visible ASCII without whitespace",
                })
            }),
        );
        errors
    }

    /// Reads the metadata headers. Never fails as a whole: each malformed header is left out of the
    /// result and reported in the list.
    ///
    /// Several `forwarded` fields form one list, of which the first element is read; several `baggage`
    /// fields form one list, all read; `traceparent` and `x-forwarded-network` may appear at most once
    /// (more is reported as [`HeaderError::Repeated`] and the header dropped).
    pub fn from_headers(map: &HeaderMap) -> (Metadata, Vec<HeaderError>) {
        let mut errors = Vec::new();
        let forwarded = map
            .get(FORWARDED)
            .and_then(|value| keep(&mut errors, Forwarded::from_header_value(value)));
        let baggage = match map.get_all(BAGGAGE).iter().next() {
            Some(_) => keep(&mut errors, Baggage::from_header_values(map.get_all(BAGGAGE))),
            None => None,
        };
        let traceparent = single(map, TRACEPARENT, "traceparent").and_then(|value| {
            let parsed = value.and_then(|v| TraceParent::from_header_value(v).map_err(HeaderError::from));
            keep(&mut errors, parsed)
        });
        let x_forwarded_network = single(map, X_FORWARDED_NETWORK, "x-forwarded-network").and_then(|value| {
            let parsed = value.and_then(|v| {
                let trimmed = trim_ows_bytes(v.as_bytes());
                check_network(trimmed)?;
                // Visible ASCII, hence UTF-8.
                Ok(String::from_utf8_lossy(trimmed).into_owned())
            });
            keep(&mut errors, parsed)
        });
        (
            Metadata {
                forwarded,
                baggage,
                traceparent,
                x_forwarded_network,
            },
            errors,
        )
    }

    /// Whether no header is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The value of a result, or `None` with its error recorded.
fn keep<T, E: Into<HeaderError>>(errors: &mut Vec<HeaderError>, result: Result<T, E>) -> Option<T> {
    result.map_err(|e| errors.push(e.into())).ok()
}

/// The only value of a header that may appear at most once: `None` when absent.
fn single<'m>(
    map: &'m HeaderMap,
    name: HeaderName,
    label: &'static str,
) -> Option<Result<&'m HeaderValue, HeaderError>> {
    let mut values = map.get_all(name).iter();
    let first = values.next()?;
    let more = values.count();
    if more > 0 {
        return Some(Err(HeaderError::Repeated {
            header: label,
            count: more + 1,
        }));
    }
    Some(Ok(first))
}

fn trim_ows_bytes(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// At most [`EXCERPT_MAX`] bytes of `s`, cut on a character boundary, with `…` when cut.
fn excerpt(s: &str) -> String {
    if s.len() <= EXCERPT_MAX {
        return s.to_owned();
    }
    let mut end = EXCERPT_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + '…'.len_utf8());
    out.push_str(&s[..end]);
    out.push('…');
    out
}
