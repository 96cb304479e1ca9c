//! The access log: a line per connection, with ztunnel's messages, levels and fields.
//!
//! Lines are `tracing` events with target `access` (so `RUST_LOG` and `POST /logging?level=access=warn`
//! choose which are written, as with ztunnel), written by the process's subscriber in its layout
//! ([`crate::telemetry::layout`]: ztunnel's tab-separated text, or JSON). Three kinds, as ztunnel's:
//!
//! | kind | level | message | fields |
//! |---|---|---|---|
//! | a connection whose destination is known, as it starts ([`emit_opened`]) | `debug` | `connection opened` | the known ones below but bytes, duration and error |
//! | a connection that ended ([`emit`]) | `info` | `connection complete` | all the known ones below |
//! | one that failed once its destination was known ([`emit`] with an error) | `error` | `connection complete` | all the known ones, `error` last |
//! | one refused before (a failed TLS handshake on 15008, a bad CONNECT, an unknown client: [`emit_failed`]) | `warn` | `connection failed` | `src.addr`, `dst.addr`, `direction`, `error` |
//!
//! The fields, in this order, and only those that are known (ztunnel leaves unknown fields out):
//!
//! | field | value |
//! |---|---|
//! | `src.addr` | the client's address |
//! | `src.workload` | the client's pod name, else its canonical service |
//! | `src.namespace` | the client's namespace |
//! | `src.identity` | the client's SPIFFE ID, on mTLS connections only |
//! | `dst.addr` | outbound, the address the proxy connected to (the HBONE endpoint `<ip>:15008`, the network gateway, or the passthrough destination); inbound, the address the connection arrived on (`<ip>:15008` for HBONE, the original destination for plaintext) |
//! | `dst.hbone_addr` | the CONNECT target inside the tunnel (`<ip>:<port>`, or `<hostname>:<port>` for double HBONE), on HBONE |
//! | `dst.service` | the hostname of the service the client addressed |
//! | `dst.workload` | the server's pod name, else its canonical service |
//! | `dst.namespace` | the server's namespace |
//! | `dst.identity` | the server's SPIFFE ID, on mTLS connections only |
//! | `direction` | `outbound` (reported by the client's proxy) or `inbound` |
//! | `bytes_sent`, `bytes_recv` | bytes, from the local workload's point of view |
//! | `duration` | in whole milliseconds, such as `"12ms"` |
//! | `error` | why the connection failed, when it did |
//!
//! **Byte directions.** `bytes_sent` is what the local workload sent: on an outbound connection the
//! client's request bytes, on an inbound one the server's response bytes; `bytes_recv` the other
//! direction. This is ztunnel's access log; its metrics count request and response bytes instead
//! (see [`crate::telemetry::metrics`]), and [`AccessLogEntry::with_transfer`] turns one into the other.
//!
//! **Values.** In text, strings are quoted and escaped as Rust's `Debug` does (`"a \"b\"\n"`);
//! addresses and numbers are bare (`dst.hbone_addr` too, unless it holds anything but address
//! characters: then it is quoted). In JSON, numbers are JSON numbers and the rest strings. Either way a
//! value cannot break the line or forge a field (see [`crate::telemetry::layout`]).
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use meshwire_dataplane::telemetry::accesslog::{self, AccessLogEntry, Direction, FailedConnection, LogFormat};
//!
//! let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_737_608_845_806_642);
//! let entry = AccessLogEntry::new(Direction::Inbound, "10.0.0.1:40000".parse()?, "10.0.0.2:15008".parse()?)
//!     .with_hbone_addr("10.0.0.2:8080")
//!     .with_transfer(100, 10)
//!     .with_duration(Duration::from_millis(12))
//!     .with_error("connection reset by \"peer\"\n");
//! assert_eq!(
//!     accesslog::format(&entry, LogFormat::Text, at),
//!     "2025-01-23T05:07:25.806642Z\terror\taccess\tconnection complete\t\
//!      src.addr=10.0.0.1:40000 dst.addr=10.0.0.2:15008 dst.hbone_addr=10.0.0.2:8080 direction=\"inbound\" \
//!      bytes_sent=100 bytes_recv=10 duration=\"12ms\" error=\"connection reset by \\\"peer\\\"\\n\""
//! );
//! let json: serde_json::Value = serde_json::from_str(&accesslog::format(&entry, LogFormat::Json, at))?;
//! assert_eq!(json["scope"], "access");
//! assert_eq!(json["bytes_sent"], 100);
//! assert_eq!(json["error"], "connection reset by \"peer\"\n");
//!
//! let failed = FailedConnection::new(Direction::Inbound, "10.0.0.1:40001".parse()?, "10.0.0.2:15008".parse()?)
//!     .with_error("TLS handshake failed: received corrupt message");
//! assert_eq!(
//!     accesslog::format_failed(&failed, LogFormat::Text, at),
//!     "2025-01-23T05:07:25.806642Z\twarn\taccess\tconnection failed\t\
//!      src.addr=10.0.0.1:40001 dst.addr=10.0.0.2:15008 direction=\"inbound\" \
//!      error=\"TLS handshake failed: received corrupt message\""
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::layout;
use super::metrics::{ConnectionLabels, ConnectionSummary, LabelValue, Reporter, SecurityPolicy};
use crate::xds::Workload;

/// The `tracing` target access log lines are emitted with (ztunnel's).
pub const TARGET: &str = "access";

/// How the process's log lines, access log lines among them, are written (see
/// [`crate::telemetry::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// ztunnel's plain format: tab-separated columns, the fields as `key=value` pairs. Parsed from
    /// `plain` or `text`.
    #[default]
    Text,
    /// A JSON object per line. Parsed from `json`.
    Json,
}

/// A log format name that is not `plain`, `text` or `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?} (expected \"plain\", \"text\" or \"json\")")]
pub struct LogFormatError(
    /// The rejected name.
    pub String,
);

impl FromStr for LogFormat {
    type Err = LogFormatError;

    /// Parses ztunnel's `LOG_FORMAT` values (`plain`, `json`) and `text`, in any case.
    fn from_str(s: &str) -> Result<Self, LogFormatError> {
        if s.eq_ignore_ascii_case("json") {
            Ok(LogFormat::Json)
        } else if s.eq_ignore_ascii_case("plain") || s.eq_ignore_ascii_case("text") {
            Ok(LogFormat::Text)
        } else {
            Err(LogFormatError(s.to_owned()))
        }
    }
}

/// Which way a connection goes, as the reporting proxy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Direction {
    /// From a local workload (the client) out: `reporter="source"` in the metrics.
    Outbound,
    /// To a local workload (the server): `reporter="destination"` in the metrics.
    Inbound,
}

impl Direction {
    /// The logged value: `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl From<Reporter> for Direction {
    fn from(reporter: Reporter) -> Self {
        match reporter {
            Reporter::Source => Direction::Outbound,
            Reporter::Destination => Direction::Inbound,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One connection's access log line, as data. `None` fields are left out of the line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct AccessLogEntry {
    /// `src.addr`: the client's address.
    pub src_addr: SocketAddr,
    /// `src.workload`: the client's pod name, else its canonical service.
    pub src_workload: Option<String>,
    /// `src.namespace`: the client's namespace.
    pub src_namespace: Option<String>,
    /// `src.identity`: the client's SPIFFE ID (mTLS connections only).
    pub src_identity: Option<String>,
    /// `dst.addr`: the address the proxy connected to.
    pub dst_addr: SocketAddr,
    /// `dst.hbone_addr`: the CONNECT target inside the tunnel (`<ip>:<port>` or `<hostname>:<port>`).
    pub dst_hbone_addr: Option<String>,
    /// `dst.service`: the hostname of the service the client addressed.
    pub dst_service: Option<String>,
    /// `dst.workload`: the server's pod name, else its canonical service.
    pub dst_workload: Option<String>,
    /// `dst.namespace`: the server's namespace.
    pub dst_namespace: Option<String>,
    /// `dst.identity`: the server's SPIFFE ID (mTLS connections only).
    pub dst_identity: Option<String>,
    /// `direction`.
    pub direction: Direction,
    /// `bytes_sent`: what the local workload sent.
    pub bytes_sent: u64,
    /// `bytes_recv`: what the local workload received.
    pub bytes_recv: u64,
    /// `duration`: how long the connection lasted; logged in whole milliseconds.
    pub duration: Duration,
    /// `error`: why the connection failed, if it did.
    pub error: Option<String>,
}

/// An access log entry held while its connection lives, for the line written when it ends: its
/// names and identities (the same for every connection between two workloads) in one copy that
/// those connections share, its addresses and CONNECT target its own. Made by
/// [`Metrics::hold_entry`](super::metrics::Metrics::hold_entry).
///
/// ```
/// use meshwire_dataplane::telemetry::accesslog::{AccessLogEntry, Direction};
/// use meshwire_dataplane::telemetry::metrics::Metrics;
///
/// let metrics = Metrics::new();
/// let entry = AccessLogEntry::new(Direction::Inbound, "10.0.0.1:40000".parse()?, "10.0.0.2:15008".parse()?)
///     .with_hbone_addr("10.0.0.2:8080");
/// let held = metrics.hold_entry(entry.clone());
/// assert_eq!(held.into_entry(), entry);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct HeldEntry {
    /// The entry without its addresses and CONNECT target.
    names: Arc<AccessLogEntry>,
    src_addr: SocketAddr,
    dst_addr: SocketAddr,
    dst_hbone_addr: Option<String>,
}

/// What a [`HeldEntry`]'s shared part has for its addresses.
const NO_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

impl HeldEntry {
    /// `entry` held, its names shared through `share`.
    pub(crate) fn new(mut entry: AccessLogEntry, share: impl FnOnce(AccessLogEntry) -> Arc<AccessLogEntry>) -> Self {
        let src_addr = std::mem::replace(&mut entry.src_addr, NO_ADDR);
        let dst_addr = std::mem::replace(&mut entry.dst_addr, NO_ADDR);
        let dst_hbone_addr = entry.dst_hbone_addr.take();
        Self {
            names: share(entry),
            src_addr,
            dst_addr,
            dst_hbone_addr,
        }
    }

    /// The whole entry again (its names copied out of the shared part).
    pub fn into_entry(self) -> AccessLogEntry {
        let mut entry = Arc::unwrap_or_clone(self.names);
        entry.src_addr = self.src_addr;
        entry.dst_addr = self.dst_addr;
        entry.dst_hbone_addr = self.dst_hbone_addr;
        entry
    }
}

impl AccessLogEntry {
    /// An entry with the addresses and direction only: no workloads, no bytes, no duration, no error.
    pub fn new(direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self {
            src_addr,
            src_workload: None,
            src_namespace: None,
            src_identity: None,
            dst_addr,
            dst_hbone_addr: None,
            dst_service: None,
            dst_workload: None,
            dst_namespace: None,
            dst_identity: None,
            direction,
            bytes_sent: 0,
            bytes_recv: 0,
            duration: Duration::ZERO,
            error: None,
        }
    }

    /// An entry with what a connection's metric labels know, as ztunnel derives it: the direction
    /// from the reporter; namespaces and the service hostname; the canonical services as workload
    /// names (until [`with_source_workload`](Self::with_source_workload) and
    /// [`with_destination_workload`](Self::with_destination_workload) give pod names); the
    /// principals as identities only when the connection is mutual TLS.
    pub fn from_labels(labels: &ConnectionLabels, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        let known = |value: &LabelValue| value.known().map(str::to_owned);
        let mtls = labels.connection_security_policy == SecurityPolicy::MutualTls;
        Self {
            src_workload: known(&labels.source_canonical_service),
            src_namespace: known(&labels.source_workload_namespace),
            src_identity: known(&labels.source_principal).filter(|_| mtls),
            dst_service: known(&labels.destination_service),
            dst_workload: known(&labels.destination_canonical_service),
            dst_namespace: known(&labels.destination_workload_namespace),
            dst_identity: known(&labels.destination_principal).filter(|_| mtls),
            ..Self::new(labels.reporter.into(), src_addr, dst_addr)
        }
    }

    /// [`from_labels`](Self::from_labels) and [`with_transfer`](Self::with_transfer) for a finished
    /// connection.
    pub fn from_summary(summary: &ConnectionSummary, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self::from_labels(&summary.labels, src_addr, dst_addr).with_transfer(summary.sent, summary.received)
    }

    /// Names the client by its pod name (`src.workload`), if it has one. `None` changes nothing.
    pub fn with_source_workload(mut self, source: Option<&Workload>) -> Self {
        if let Some(name) = source.map(|w| &w.name).filter(|name| !name.is_empty()) {
            self.src_workload = Some(name.clone());
        }
        self
    }

    /// Names the server by its pod name (`dst.workload`), if it has one. `None` changes nothing.
    pub fn with_destination_workload(mut self, destination: Option<&Workload>) -> Self {
        if let Some(name) = destination.map(|w| &w.name).filter(|name| !name.is_empty()) {
            self.dst_workload = Some(name.clone());
        }
        self
    }

    /// Sets `dst.hbone_addr`, the CONNECT target inside the tunnel.
    pub fn with_hbone_addr(mut self, target: impl fmt::Display) -> Self {
        self.dst_hbone_addr = Some(target.to_string());
        self
    }

    /// Sets the byte counts from the totals the metrics count ([`ConnectionMetrics::sent`] toward
    /// the client, [`ConnectionMetrics::received`] from it), turned to the local workload's point of
    /// view: outbound, the local workload is the client and sent what the proxy received from it;
    /// inbound, it is the server and sent what the proxy sent toward the client.
    ///
    /// [`ConnectionMetrics::sent`]: super::metrics::ConnectionMetrics::sent
    /// [`ConnectionMetrics::received`]: super::metrics::ConnectionMetrics::received
    pub fn with_transfer(mut self, sent_to_client: u64, received_from_client: u64) -> Self {
        (self.bytes_sent, self.bytes_recv) = match self.direction {
            Direction::Outbound => (received_from_client, sent_to_client),
            Direction::Inbound => (sent_to_client, received_from_client),
        };
        self
    }

    /// Sets how long the connection lasted.
    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// Sets why the connection failed.
    pub fn with_error(mut self, error: impl fmt::Display) -> Self {
        self.error = Some(error.to_string());
        self
    }
}

/// A connection refused before its destination was known (ztunnel's early denials): a failed TLS
/// handshake on the HBONE port, a CONNECT refused before any policy applied, an outbound connection
/// from an unknown client. Logged by [`emit_failed`] as `connection failed`, at `warn`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailedConnection {
    /// `direction`.
    pub direction: Direction,
    /// `src.addr`: the client's address.
    pub src_addr: SocketAddr,
    /// `dst.addr`: inbound, the address the connection arrived on; outbound, its original destination.
    pub dst_addr: SocketAddr,
    /// `error`: why it was refused.
    pub error: String,
}

impl FailedConnection {
    /// A refused connection from `src_addr` to `dst_addr`, with an empty error until
    /// [`with_error`](Self::with_error) gives it.
    pub fn new(direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self {
            direction,
            src_addr,
            dst_addr,
            error: String::new(),
        }
    }

    /// Sets why it was refused.
    pub fn with_error(mut self, error: impl fmt::Display) -> Self {
        self.error = error.to_string();
        self
    }
}

/// The event's message for a connection that ended, failed or not (ztunnel's).
pub const COMPLETE: &str = "connection complete";
/// The event's message for a connection whose destination is known, at its start (ztunnel's, at
/// `debug`).
pub const OPENED: &str = "connection opened";
/// The event's message for a connection refused before its destination was known (ztunnel's).
pub const FAILED: &str = "connection failed";

/// Whether `value` is made of address characters only (written bare, as ztunnel writes addresses).
fn is_plain_address(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-' | b'_' | b'[' | b']' | b'%'))
}

fn duration_text(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// Binds `$value` to `$entry`'s `dst.hbone_addr` as a field value: bare when it is made of address
/// characters only (as ztunnel writes addresses), else a string (quoted and escaped by the layout).
/// A macro, since the value borrows locals of the caller's scope.
macro_rules! hbone_addr_value {
    ($entry:expr => $value:ident) => {
        let plain;
        let quoted;
        let $value: Option<&dyn tracing::Value> = match $entry.dst_hbone_addr.as_deref() {
            Some(addr) if is_plain_address(addr) => {
                plain = tracing::field::display(addr);
                Some(&plain)
            }
            Some(addr) => {
                quoted = addr;
                Some(&quoted)
            }
            None => None,
        };
    };
}

/// The `connection complete` event at `$level`, with the fields of `$entry` in ztunnel's order.
macro_rules! complete_event {
    ($level:expr, $entry:expr, $hbone_addr:expr, $duration:expr) => {
        tracing::event!(
            target: TARGET,
            parent: None,
            $level,
            src.addr = %$entry.src_addr,
            src.workload = $entry.src_workload.as_deref(),
            src.namespace = $entry.src_namespace.as_deref(),
            src.identity = $entry.src_identity.as_deref(),
            dst.addr = %$entry.dst_addr,
            dst.hbone_addr = $hbone_addr,
            dst.service = $entry.dst_service.as_deref(),
            dst.workload = $entry.dst_workload.as_deref(),
            dst.namespace = $entry.dst_namespace.as_deref(),
            dst.identity = $entry.dst_identity.as_deref(),
            direction = $entry.direction.as_str(),
            bytes_sent = $entry.bytes_sent,
            bytes_recv = $entry.bytes_recv,
            duration = $duration,
            error = $entry.error.as_deref(),
            "connection complete"
        )
    };
}

/// Logs a connection that ended: `connection complete` at `INFO`, or at `ERROR` with its `error`
/// when it failed, as ztunnel does; target [`TARGET`] (`access`), no parent span.
pub fn emit(entry: &AccessLogEntry) {
    hbone_addr_value!(entry => hbone_addr);
    if entry.error.is_some() {
        if tracing::enabled!(target: TARGET, tracing::Level::ERROR) {
            let duration = duration_text(entry.duration);
            complete_event!(tracing::Level::ERROR, entry, hbone_addr, duration.as_str());
        }
    } else if tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        let duration = duration_text(entry.duration);
        complete_event!(tracing::Level::INFO, entry, hbone_addr, duration.as_str());
    }
}

/// Logs a connection whose destination is known as it starts: `connection opened` at `DEBUG`, with
/// the fields known then (no bytes, duration or error), as ztunnel does; target [`TARGET`], no
/// parent span. Costs one check of the filter when `access` is not at `debug`.
pub fn emit_opened(entry: &AccessLogEntry) {
    if !tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        return;
    }
    hbone_addr_value!(entry => hbone_addr);
    tracing::event!(
        target: TARGET,
        parent: None,
        tracing::Level::DEBUG,
        src.addr = %entry.src_addr,
        src.workload = entry.src_workload.as_deref(),
        src.namespace = entry.src_namespace.as_deref(),
        src.identity = entry.src_identity.as_deref(),
        dst.addr = %entry.dst_addr,
        dst.hbone_addr = hbone_addr,
        dst.service = entry.dst_service.as_deref(),
        dst.workload = entry.dst_workload.as_deref(),
        dst.namespace = entry.dst_namespace.as_deref(),
        dst.identity = entry.dst_identity.as_deref(),
        direction = entry.direction.as_str(),
        "connection opened"
    );
}

/// Logs a connection refused before its destination was known: `connection failed` at `WARN`, with
/// `src.addr`, `dst.addr`, `direction` and `error`, as ztunnel does; target [`TARGET`], no parent span.
pub fn emit_failed(failed: &FailedConnection) {
    tracing::event!(
        target: TARGET,
        parent: None,
        tracing::Level::WARN,
        src.addr = %failed.src_addr,
        dst.addr = %failed.dst_addr,
        direction = failed.direction.as_str(),
        error = failed.error.as_str(),
        "connection failed"
    );
}

/// The line [`emit`] writes for `entry` in `format`, timestamped `at`, without its line ending.
///
/// Pure and total: any entry, whatever its strings hold, gives one line (text) or one JSON object
/// that parses (JSON).
pub fn format(entry: &AccessLogEntry, format: LogFormat, at: SystemTime) -> String {
    one_line(layout::render(format, at, || emit(entry)))
}

/// The line [`emit_failed`] writes for `failed` in `format`, timestamped `at`, without its line ending.
pub fn format_failed(failed: &FailedConnection, format: LogFormat, at: SystemTime) -> String {
    one_line(layout::render(format, at, || emit_failed(failed)))
}

fn one_line(mut rendered: String) -> String {
    if rendered.ends_with('\n') {
        rendered.pop();
    }
    rendered
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    /// Entries held for connections between the same workloads share their names; each keeps its
    /// own addresses and CONNECT target, and gives back the whole entry.
    #[test]
    fn held_entries_share_their_names_and_keep_their_addresses() {
        let metrics = Metrics::new();
        let entry = |port: u16, target: &str| {
            AccessLogEntry::new(
                Direction::Inbound,
                SocketAddr::from(([10, 0, 0, 1], port)),
                "10.0.0.2:15008".parse().unwrap(),
            )
            .with_hbone_addr(target)
            .with_identities(
                Some("spiffe://cluster.local/ns/shop/sa/cart"),
                Some("spiffe://cluster.local/ns/shop/sa/db"),
            )
        };
        // Test-only: the identities, as `from_labels` sets them.
        trait WithIdentities {
            fn with_identities(self, src: Option<&str>, dst: Option<&str>) -> Self;
        }
        impl WithIdentities for AccessLogEntry {
            fn with_identities(mut self, src: Option<&str>, dst: Option<&str>) -> Self {
                self.src_identity = src.map(str::to_owned);
                self.dst_identity = dst.map(str::to_owned);
                self
            }
        }
        let (a, b) = (entry(40000, "10.0.0.2:5432"), entry(40001, "10.0.0.2:5433"));
        let held_a = metrics.hold_entry(a.clone());
        let held_b = metrics.hold_entry(b.clone());
        assert!(Arc::ptr_eq(&held_a.names, &held_b.names), "one copy of the names");
        let other = metrics.hold_entry(entry(40002, "10.0.0.2:5432").with_identities(None, None));
        assert!(!Arc::ptr_eq(&held_a.names, &other.names));
        assert_eq!(held_a.into_entry(), a);
        assert_eq!(held_b.into_entry(), b);
    }
}
