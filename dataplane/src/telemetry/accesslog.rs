//! The access log: one line per connection, when it ends, with ztunnel's fields.
//!
//! The fields, in this order, and only those that are known (ztunnel leaves unknown fields out):
//!
//! | field | value |
//! |---|---|
//! | `src.addr` | the client's address |
//! | `src.workload` | the client's pod name, else its canonical service |
//! | `src.namespace` | the client's namespace |
//! | `src.identity` | the client's SPIFFE ID, on mTLS connections only |
//! | `dst.addr` | the address the proxy connected to (the HBONE endpoint, port 15008, on HBONE) |
//! | `dst.hbone_addr` | the CONNECT target inside the tunnel, on HBONE |
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
//! **Formats.** [`LogFormat::Text`] writes `key=value` pairs separated by spaces, as ztunnel's
//! plain log does: strings quoted and escaped as Rust's `Debug` does (`"a \"b\"\n"`), addresses
//! and numbers bare. [`LogFormat::Json`] writes one JSON object with the same keys, numbers as JSON
//! numbers. Either way a value cannot break the line or forge a field: quotes, backslashes,
//! newlines and every other control character are escaped.
//!
//! ```
//! use std::time::Duration;
//! use meshwire_dataplane::telemetry::accesslog::{AccessLogEntry, Direction, LogFormat, format};
//!
//! let entry = AccessLogEntry::new(Direction::Inbound, "10.0.0.1:40000".parse()?, "10.0.0.2:8080".parse()?)
//!     .with_transfer(100, 10)
//!     .with_duration(Duration::from_millis(12))
//!     .with_error("connection reset by \"peer\"\n");
//! assert_eq!(
//!     format(&entry, LogFormat::Text),
//!     r#"src.addr=10.0.0.1:40000 dst.addr=10.0.0.2:8080 direction="inbound" bytes_sent=100 bytes_recv=10 duration="12ms" error="connection reset by \"peer\"\n""#
//! );
//! let json: serde_json::Value = serde_json::from_str(&format(&entry, LogFormat::Json))?;
//! assert_eq!(json["bytes_sent"], 100);
//! assert_eq!(json["error"], "connection reset by \"peer\"\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use super::metrics::{ConnectionLabels, ConnectionSummary, LabelValue, Reporter, SecurityPolicy};
use crate::xds::Workload;

/// The `tracing` target access log lines are emitted with (ztunnel's).
pub const TARGET: &str = "access";

/// How an access log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// `key=value` pairs, ztunnel's plain format. Parsed from `plain` or `text`.
    #[default]
    Text,
    /// A JSON object. Parsed from `json`.
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One access log line, without a line ending; see the [module documentation](self).
///
/// Pure and total: any entry, whatever its strings hold, gives one line (text) or one JSON object
/// that parses (JSON).
pub fn format(entry: &AccessLogEntry, format: LogFormat) -> String {
    match format {
        LogFormat::Text => format_text(entry),
        LogFormat::Json => format_json(entry),
    }
}

/// Logs the entry's line through `tracing`, with target [`TARGET`] (`access`): at `INFO`, or at
/// `ERROR` when the connection failed, as ztunnel does. Like ztunnel's, the event has no parent span.
///
/// The formatted line is the event's message, so the subscriber adds only its own prefix (time,
/// level, target); with [`LogFormat::Json`], use a subscriber that writes messages as they are.
pub fn emit(entry: &AccessLogEntry, log_format: LogFormat) {
    let line = format(entry, log_format);
    if entry.error.is_some() {
        tracing::event!(target: TARGET, parent: None, tracing::Level::ERROR, "{line}");
    } else {
        tracing::event!(target: TARGET, parent: None, tracing::Level::INFO, "{line}");
    }
}

fn duration_text(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// Writes ` key=value` pairs; the first without the leading space.
struct TextLine(String);

impl TextLine {
    fn key(&mut self, key: &str) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        self.0.push_str(key);
        self.0.push('=');
    }

    /// A value written bare (addresses, numbers).
    fn bare(&mut self, key: &str, value: impl fmt::Display) {
        self.key(key);
        let _ = write!(self.0, "{value}"); // writing into a String cannot fail
    }

    /// A string value, quoted and escaped as Rust's `Debug` does.
    fn quoted(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.key(key);
            let _ = write!(self.0, "{value:?}");
        }
    }

    /// A value written bare when it is made of address characters only, else quoted.
    fn address(&mut self, key: &str, value: Option<&str>) {
        let Some(value) = value else { return };
        let plain = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-' | b'_' | b'[' | b']' | b'%'));
        if plain {
            self.bare(key, value);
        } else {
            self.quoted(key, Some(value));
        }
    }
}

fn format_text(entry: &AccessLogEntry) -> String {
    let mut line = TextLine(String::with_capacity(256));
    line.bare("src.addr", entry.src_addr);
    line.quoted("src.workload", entry.src_workload.as_deref());
    line.quoted("src.namespace", entry.src_namespace.as_deref());
    line.quoted("src.identity", entry.src_identity.as_deref());
    line.bare("dst.addr", entry.dst_addr);
    line.address("dst.hbone_addr", entry.dst_hbone_addr.as_deref());
    line.quoted("dst.service", entry.dst_service.as_deref());
    line.quoted("dst.workload", entry.dst_workload.as_deref());
    line.quoted("dst.namespace", entry.dst_namespace.as_deref());
    line.quoted("dst.identity", entry.dst_identity.as_deref());
    line.quoted("direction", Some(entry.direction.as_str()));
    line.bare("bytes_sent", entry.bytes_sent);
    line.bare("bytes_recv", entry.bytes_recv);
    line.quoted("duration", Some(&duration_text(entry.duration)));
    line.quoted("error", entry.error.as_deref());
    line.0
}

/// The JSON form, keys in the text form's order.
#[derive(Serialize)]
struct JsonLine<'a> {
    #[serde(rename = "src.addr")]
    src_addr: String,
    #[serde(rename = "src.workload", skip_serializing_if = "Option::is_none")]
    src_workload: Option<&'a str>,
    #[serde(rename = "src.namespace", skip_serializing_if = "Option::is_none")]
    src_namespace: Option<&'a str>,
    #[serde(rename = "src.identity", skip_serializing_if = "Option::is_none")]
    src_identity: Option<&'a str>,
    #[serde(rename = "dst.addr")]
    dst_addr: String,
    #[serde(rename = "dst.hbone_addr", skip_serializing_if = "Option::is_none")]
    dst_hbone_addr: Option<&'a str>,
    #[serde(rename = "dst.service", skip_serializing_if = "Option::is_none")]
    dst_service: Option<&'a str>,
    #[serde(rename = "dst.workload", skip_serializing_if = "Option::is_none")]
    dst_workload: Option<&'a str>,
    #[serde(rename = "dst.namespace", skip_serializing_if = "Option::is_none")]
    dst_namespace: Option<&'a str>,
    #[serde(rename = "dst.identity", skip_serializing_if = "Option::is_none")]
    dst_identity: Option<&'a str>,
    direction: &'static str,
    bytes_sent: u64,
    bytes_recv: u64,
    duration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn format_json(entry: &AccessLogEntry) -> String {
    let line = JsonLine {
        src_addr: entry.src_addr.to_string(),
        src_workload: entry.src_workload.as_deref(),
        src_namespace: entry.src_namespace.as_deref(),
        src_identity: entry.src_identity.as_deref(),
        dst_addr: entry.dst_addr.to_string(),
        dst_hbone_addr: entry.dst_hbone_addr.as_deref(),
        dst_service: entry.dst_service.as_deref(),
        dst_workload: entry.dst_workload.as_deref(),
        dst_namespace: entry.dst_namespace.as_deref(),
        dst_identity: entry.dst_identity.as_deref(),
        direction: entry.direction.as_str(),
        bytes_sent: entry.bytes_sent,
        bytes_recv: entry.bytes_recv,
        duration: duration_text(entry.duration),
        error: entry.error.as_deref(),
    };
    // A struct of strings and numbers always serializes; the fallback is never taken.
    let json = serde_json::to_string(&line).unwrap_or_else(|_| String::from("{}"));
    // JSON escapes only the C0 controls; DEL, the C1 controls (NEL among them) and the Unicode line
    // and paragraph separators stay raw, and some log readers take them for line breaks. They can
    // only occur inside strings, where the `\u` escape stands for the same character.
    if !json.chars().any(needs_json_escape) {
        return json;
    }
    let mut escaped = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs_json_escape(c) {
            let _ = write!(escaped, "\\u{:04x}", u32::from(c)); // writing into a String cannot fail
        } else {
            escaped.push(c);
        }
    }
    escaped
}

fn needs_json_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}
