//! Istio's standard TCP metrics, with ztunnel's names, labels and label values.
//!
//! Four counter families, all with the label set [`ConnectionLabels`]:
//!
//! | family | counts |
//! |---|---|
//! | `istio_tcp_connections_opened_total` | connections opened (at [`Metrics::open`]) |
//! | `istio_tcp_connections_closed_total` | connections closed (at [`ConnectionMetrics::finish`] or on drop) |
//! | `istio_tcp_received_bytes_total` | bytes from the client toward the server: the request direction |
//! | `istio_tcp_sent_bytes_total` | bytes from the server toward the client: the response direction |
//!
//! and one of meshwire's own (ztunnel has no counter for these), with the labels [`RefusalLabels`]:
//!
//! | family | counts |
//! |---|---|
//! | `istio_tcp_connections_refused_total{listener,reason}` | connections refused before they were routed, so that the four families above never see them ([`Metrics::refused`]): a failed TLS or SOCKS5 handshake, a handshake that timed out, a connection left in the listen queue because the process is out of file descriptors |
//!
//! and a gauge, ztunnel's, with the labels [`SocketLabels`]:
//!
//! | family | counts |
//! |---|---|
//! | `istio_tcp_sockets_open{reporter}` | sockets the data listeners accepted that are still open ([`Metrics::socket_opened`]): `source` for the outbound listeners (capture, SOCKS5), `destination` for the inbound ones (HBONE, plaintext) |
//!
//! **Locality.** [`ConnectionLabels`] ends with ztunnel's `source_region`, `source_zone`,
//! `destination_region` and `destination_zone`, from the workloads' `locality`.
//!
//! **Byte directions.** Istio defines `received` as the bytes "received during request" and `sent` as
//! the bytes "sent during response", and ztunnel counts them that way for both reporters: whatever
//! the proxy reads from its downstream side (the client, or the client's tunnel) and writes upstream
//! is *received*; whatever it writes back downstream is *sent*. So for a client that uploads 10 bytes
//! and downloads 100, both the outbound (`reporter="source"`) and the inbound
//! (`reporter="destination"`) proxy count 10 received and 100 sent. The access log takes the local
//! workload's point of view instead (see [`crate::telemetry::accesslog`]).
//!
//! **Hot path.** [`Metrics::open`] looks the byte counters up once per connection; after that
//! [`ConnectionMetrics::record_sent`] and [`ConnectionMetrics::record_received`] are two relaxed
//! atomic adds each, with no lock and no hashing. Bytes are recorded as they flow, so the totals are
//! exact even for connections that last for days. The closed counter is looked up when the connection
//! ends, because its `response_flags` label is only known then (ztunnel does the same: a connection
//! that fails to connect upstream is opened with `response_flags="-"` and closed with `"CONNECT"`).
//! A connection an authorization policy denies is known to be denied before it is counted: it is
//! opened and closed with `response_flags="DENY"`, so that the two counters agree.
//!
//! ```
//! use meshwire_dataplane::telemetry::metrics::{ConnectionLabels, Metrics, Reporter, ResponseFlags, SecurityPolicy};
//!
//! let metrics = Metrics::new();
//! let connection = metrics.open(ConnectionLabels::new(Reporter::Destination, SecurityPolicy::MutualTls));
//! connection.record_received(10); // request bytes, from the client
//! connection.record_sent(100); // response bytes, to the client
//! let summary = connection.finish(ResponseFlags::None);
//! assert_eq!((summary.received, summary.sent), (10, 100));
//!
//! let text = metrics.render();
//! assert!(text.contains("# TYPE istio_tcp_sent_bytes counter"));
//! assert!(text.lines().any(|line| line.starts_with("istio_tcp_sent_bytes_total{reporter=\"destination\",")
//!     && line.ends_with("} 100")));
//! ```

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use meshwire_identity::id::SpiffeId;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::accesslog::{AccessLogEntry, HeldEntry};
use super::shared::Shared;
use crate::config::Listener;
use crate::xds::{Service, Workload};

/// The value of a label whose value is not known (ztunnel's, and Istio's, convention).
pub const UNKNOWN: &str = "unknown";

/// The prefix of every metric name registered by [`Metrics`].
pub const METRIC_PREFIX: &str = "istio";

/// The `Content-Type` of [`Metrics::render`]'s output for a client that accepts OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text;charset=utf-8;version=1.0.0";

/// The `Content-Type` of [`Metrics::render`]'s output for any other client (ztunnel's default).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// The `Content-Type` to answer a metrics request with, given its `Accept` header values.
///
/// [`OPENMETRICS_CONTENT_TYPE`] when any accepted type is `application/openmetrics-text`, else
/// [`TEXT_CONTENT_TYPE`], as ztunnel's `/metrics` and `/stats/prometheus` answer. The body is the same
/// either way.
///
/// ```
/// use meshwire_dataplane::telemetry::metrics::{OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, content_type};
///
/// assert_eq!(content_type(["application/openmetrics-text;version=1.0.0;q=0.5,text/plain"]), OPENMETRICS_CONTENT_TYPE);
/// assert_eq!(content_type(["application/json"]), TEXT_CONTENT_TYPE);
/// assert_eq!(content_type([]), TEXT_CONTENT_TYPE);
/// ```
pub fn content_type<'a>(accept: impl IntoIterator<Item = &'a str>) -> &'static str {
    let openmetrics = accept.into_iter().flat_map(|value| value.split(',')).any(|media| {
        media
            .split(';')
            .next()
            .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/openmetrics-text"))
    });
    if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        TEXT_CONTENT_TYPE
    }
}

/// Which proxy reports a connection (the `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Reporter {
    /// The client's proxy: an outbound connection. Written `source`.
    #[default]
    Source,
    /// The server's proxy: an inbound connection. Written `destination`.
    Destination,
}

impl Reporter {
    /// The label value: `source` or `destination`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The application protocol of a connection (the `request_protocol` label). ztunnel only ever
/// reports `tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum RequestProtocol {
    /// Opaque TCP. Written `tcp`.
    #[default]
    Tcp,
}

impl RequestProtocol {
    /// The label value: `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Tcp => "tcp",
        }
    }
}

/// Why a connection ended abnormally (the `response_flags` label), as ztunnel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ResponseFlags {
    /// Nothing to report. Written `-`.
    #[default]
    None,
    /// An authorization policy denied the connection. Written `DENY`.
    AuthorizationPolicyDenied,
    /// No upstream connection could be established. Written `CONNECT`.
    ConnectionFailure,
}

impl ResponseFlags {
    /// The label value: `-`, `DENY` or `CONNECT`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::AuthorizationPolicyDenied => "DENY",
            ResponseFlags::ConnectionFailure => "CONNECT",
        }
    }
}

/// Whether a connection is protected by mutual TLS (the `connection_security_policy` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SecurityPolicy {
    /// Not known to be mTLS (plain TCP passthrough). Written `unknown`.
    #[default]
    Unknown,
    /// HBONE: mutual TLS. Written `mutual_tls`.
    MutualTls,
}

impl SecurityPolicy {
    /// The label value: `unknown` or `mutual_tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::Unknown => UNKNOWN,
            SecurityPolicy::MutualTls => "mutual_tls",
        }
    }
}

/// The value of a `listener` label: `inbound`, `inbound_plaintext`, `outbound`, `socks5`, `dns`,
/// `readiness`, `admin` or `metrics`.
///
/// ```
/// use meshwire_dataplane::config::Listener;
/// use meshwire_dataplane::telemetry::metrics::listener_label;
///
/// assert_eq!(listener_label(Listener::InboundPlaintext), "inbound_plaintext");
/// ```
pub fn listener_label(listener: Listener) -> &'static str {
    match listener {
        Listener::Inbound => "inbound",
        Listener::InboundPlaintext => "inbound_plaintext",
        Listener::Outbound => "outbound",
        Listener::Socks5 => "socks5",
        Listener::Dns => "dns",
        Listener::Readiness => "readiness",
        Listener::Admin => "admin",
        Listener::Metrics => "metrics",
    }
}

impl EncodeLabelValue for Listener {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(listener_label(*self))
    }
}

/// Why a connection was refused before it was routed (the `reason` label of
/// `istio_tcp_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// The TLS handshake of an inbound HBONE connection failed: not TLS, no client certificate, an
    /// untrusted one. Written `tls_handshake`.
    TlsHandshake,
    /// The SOCKS5 handshake failed: not SOCKS5, an unsupported request, a client gone before the
    /// end of its request. Written `socks5_handshake`.
    Socks5Handshake,
    /// The client did not finish its handshake (TLS and HTTP/2, or SOCKS5) in time. Written
    /// `handshake_timeout`.
    HandshakeTimeout,
    /// Accepting failed because the process (or the system) is out of file descriptors
    /// (`EMFILE`, `ENFILE`): the connection stays in the listen queue until one is free. Written
    /// `fd_exhausted`.
    FdExhausted,
}

impl RefusalReason {
    /// Every reason.
    pub const ALL: [RefusalReason; 4] = [
        RefusalReason::TlsHandshake,
        RefusalReason::Socks5Handshake,
        RefusalReason::HandshakeTimeout,
        RefusalReason::FdExhausted,
    ];

    /// The label value: `tls_handshake`, `socks5_handshake`, `handshake_timeout` or `fd_exhausted`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::TlsHandshake => "tls_handshake",
            RefusalReason::Socks5Handshake => "socks5_handshake",
            RefusalReason::HandshakeTimeout => "handshake_timeout",
            RefusalReason::FdExhausted => "fd_exhausted",
        }
    }
}

/// The labels of `istio_tcp_connections_refused_total`: the listener that refused, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `listener`: the listener that refused ([`listener_label`]).
    pub listener: Listener,
    /// `reason`: why.
    pub reason: RefusalReason,
}

macro_rules! encode_as_str {
    ($($ty:ty),+) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
                encoder.write_str(self.as_str())
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )+};
}

encode_as_str!(Reporter, RequestProtocol, ResponseFlags, SecurityPolicy, RefusalReason);

/// A string label value that may be unknown; an unknown value is written `unknown` (ztunnel's
/// `DefaultedUnknown`). An empty string is unknown.
///
/// ```
/// use meshwire_dataplane::telemetry::metrics::LabelValue;
///
/// assert_eq!(LabelValue::from("reviews").as_str(), "reviews");
/// assert_eq!(LabelValue::from("").as_str(), "unknown");
/// assert_eq!(LabelValue::from("").known(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LabelValue(Option<String>);

impl LabelValue {
    /// An unknown value.
    pub const fn unknown() -> Self {
        Self(None)
    }

    /// The value, or `None` when it is unknown.
    pub fn known(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The value as written in a label: the value, or `unknown`.
    pub fn as_str(&self) -> &str {
        self.known().unwrap_or(UNKNOWN)
    }
}

impl From<String> for LabelValue {
    fn from(value: String) -> Self {
        if value.is_empty() {
            Self(None)
        } else {
            Self(Some(value))
        }
    }
}

impl From<&str> for LabelValue {
    fn from(value: &str) -> Self {
        Self::from(value.to_owned())
    }
}

impl From<Option<String>> for LabelValue {
    fn from(value: Option<String>) -> Self {
        value.map(Self::from).unwrap_or_default()
    }
}

impl fmt::Display for LabelValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// The labels of Istio's TCP metrics, in ztunnel's order.
///
/// Built from pure data: start from [`ConnectionLabels::new`] and add what is known about the
/// connection; everything not added is `unknown`. The fields are public so that a caller can fill
/// them from other sources (the baggage header of an inbound tunnel, for example).
///
/// ```
/// use meshwire_dataplane::telemetry::metrics::{ConnectionLabels, Reporter, SecurityPolicy};
/// use meshwire_dataplane::xds::{Service, Workload};
///
/// let mut client = Workload::new("Kubernetes//v1/Pod/shop/cart-1", "spiffe://cluster.local/ns/shop/sa/cart".parse()?);
/// client.workload_name = "cart".into();
/// let server = Workload::new("Kubernetes//v1/Pod/shop/db-0", "spiffe://cluster.local/ns/shop/sa/db".parse()?);
/// let service = Service::new("shop", "db.shop.svc.cluster.local");
///
/// let labels = ConnectionLabels::new(Reporter::Source, SecurityPolicy::MutualTls)
///     .with_source(Some(&client))
///     .with_source_principal(Some(client.spiffe_id()))
///     .with_destination(Some(&server))
///     .with_destination_service(Some(&service));
/// assert_eq!(labels.source_workload.as_str(), "cart");
/// assert_eq!(labels.source_principal.as_str(), "spiffe://cluster.local/ns/shop/sa/cart");
/// assert_eq!(labels.destination_workload.as_str(), "unknown"); // no workloadName
/// assert_eq!(labels.destination_service_name.as_str(), "db");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, EncodeLabelSet)]
#[non_exhaustive]
pub struct ConnectionLabels {
    /// `reporter`: which proxy reports.
    pub reporter: Reporter,

    /// `source_workload`: the client's owning workload (its `workloadName`, such as the deployment).
    pub source_workload: LabelValue,
    /// `source_canonical_service`: the client's canonical service.
    pub source_canonical_service: LabelValue,
    /// `source_canonical_revision`: the client's canonical revision.
    pub source_canonical_revision: LabelValue,
    /// `source_workload_namespace`: the client's namespace.
    pub source_workload_namespace: LabelValue,
    /// `source_principal`: the SPIFFE ID the client proved over mTLS.
    pub source_principal: LabelValue,
    /// `source_app`: the client's canonical service (ztunnel writes the same value).
    pub source_app: LabelValue,
    /// `source_version`: the client's canonical revision (ztunnel writes the same value).
    pub source_version: LabelValue,
    /// `source_cluster`: the client's cluster.
    pub source_cluster: LabelValue,

    /// `destination_service`: the hostname of the service the client addressed.
    pub destination_service: LabelValue,
    /// `destination_service_namespace`: that service's namespace.
    pub destination_service_namespace: LabelValue,
    /// `destination_service_name`: that service's name.
    pub destination_service_name: LabelValue,

    /// `destination_workload`: the server's owning workload.
    pub destination_workload: LabelValue,
    /// `destination_canonical_service`: the server's canonical service.
    pub destination_canonical_service: LabelValue,
    /// `destination_canonical_revision`: the server's canonical revision.
    pub destination_canonical_revision: LabelValue,
    /// `destination_workload_namespace`: the server's namespace.
    pub destination_workload_namespace: LabelValue,
    /// `destination_principal`: the server's SPIFFE ID.
    pub destination_principal: LabelValue,
    /// `destination_app`: the server's canonical service.
    pub destination_app: LabelValue,
    /// `destination_version`: the server's canonical revision.
    pub destination_version: LabelValue,
    /// `destination_cluster`: the server's cluster.
    pub destination_cluster: LabelValue,

    /// `request_protocol`: always `tcp`.
    pub request_protocol: RequestProtocol,
    /// `response_flags`: `-`, or why the connection failed.
    pub response_flags: ResponseFlags,
    /// `connection_security_policy`: `mutual_tls` on HBONE, else `unknown`.
    pub connection_security_policy: SecurityPolicy,

    /// `source_region`, `source_zone`, `destination_region`, `destination_zone`: the workloads'
    /// localities, last, as ztunnel writes them. Like ztunnel, the four labels are written once a
    /// source or destination workload is known ([`with_source`](Self::with_source),
    /// [`with_destination`](Self::with_destination)), each `unknown` when its workload or its
    /// locality field is not known; a connection with neither workload known has none of them.
    #[prometheus(flatten)]
    pub locality: OptionalLabels<LocalityLabels>,
}

/// The locality labels of Istio's TCP metrics (ztunnel's `LocalityLabels`): the region and zone of
/// the client's and of the server's workload, each `unknown` when not known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, EncodeLabelSet)]
#[non_exhaustive]
pub struct LocalityLabels {
    /// `source_region`: the client workload's region.
    pub source_region: LabelValue,
    /// `source_zone`: the client workload's zone.
    pub source_zone: LabelValue,
    /// `destination_region`: the server workload's region.
    pub destination_region: LabelValue,
    /// `destination_zone`: the server workload's zone.
    pub destination_zone: LabelValue,
}

/// A label set written only when present: `None` writes no label at all (where a [`LabelValue`]
/// writes `unknown`), as ztunnel's `OptionallyEncode`. Boxed: absent, it costs a pointer in every
/// connection's labels (and in the futures holding them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct OptionalLabels<T>(pub Option<Box<T>>);

impl<T: EncodeLabelSet> EncodeLabelSet for OptionalLabels<T> {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>) -> fmt::Result {
        match &self.0 {
            Some(labels) => labels.encode(encoder),
            None => Ok(()),
        }
    }
}

impl ConnectionLabels {
    /// Labels for a connection reported by `reporter` with this security policy; every workload and
    /// service label `unknown`, `request_protocol="tcp"`, `response_flags="-"`.
    pub fn new(reporter: Reporter, security: SecurityPolicy) -> Self {
        Self {
            reporter,
            connection_security_policy: security,
            ..Self::default()
        }
    }

    /// Sets the `source_*` labels from the client's workload, except `source_principal`: like
    /// ztunnel, only an identity proven over mTLS is reported as the principal (see
    /// [`with_source_principal`](Self::with_source_principal)), and `source_region` and
    /// `source_zone` from its locality. `None` leaves them as they are.
    pub fn with_source(mut self, source: Option<&Workload>) -> Self {
        if let Some(w) = source {
            self.source_workload = w.workload_name.as_str().into();
            self.source_canonical_service = w.canonical_name.as_str().into();
            self.source_canonical_revision = w.canonical_revision.as_str().into();
            self.source_workload_namespace = w.namespace().into();
            self.source_app = w.canonical_name.as_str().into();
            self.source_version = w.canonical_revision.as_str().into();
            self.source_cluster = w.cluster_id.as_str().into();
            let locality = self.locality.0.get_or_insert_with(Box::default);
            locality.source_region = w.locality.region.as_str().into();
            locality.source_zone = w.locality.zone.as_str().into();
        }
        self
    }

    /// Sets `source_principal`: the identity the client proved over mTLS (inbound: the peer
    /// certificate's; outbound over HBONE: the local workload's own). `None` leaves it as it is.
    pub fn with_source_principal(mut self, principal: Option<&SpiffeId>) -> Self {
        if let Some(id) = principal {
            self.source_principal = id.to_string().into();
        }
        self
    }

    /// Sets the `destination_*` workload labels, `destination_principal` included, from the server's
    /// workload, and `destination_region` and `destination_zone` from its locality. `None` leaves
    /// them as they are.
    pub fn with_destination(mut self, destination: Option<&Workload>) -> Self {
        if let Some(w) = destination {
            self.destination_workload = w.workload_name.as_str().into();
            self.destination_canonical_service = w.canonical_name.as_str().into();
            self.destination_canonical_revision = w.canonical_revision.as_str().into();
            self.destination_workload_namespace = w.namespace().into();
            self.destination_principal = w.spiffe_id().to_string().into();
            self.destination_app = w.canonical_name.as_str().into();
            self.destination_version = w.canonical_revision.as_str().into();
            self.destination_cluster = w.cluster_id.as_str().into();
            let locality = self.locality.0.get_or_insert_with(Box::default);
            locality.destination_region = w.locality.region.as_str().into();
            locality.destination_zone = w.locality.zone.as_str().into();
        }
        self
    }

    /// Sets `destination_service` (the hostname), `destination_service_namespace` and
    /// `destination_service_name` from the service the client addressed. `None` leaves them as
    /// they are.
    pub fn with_destination_service(mut self, service: Option<&Service>) -> Self {
        if let Some(s) = service {
            self.destination_service = s.hostname.as_str().into();
            self.destination_service_namespace = s.namespace.as_str().into();
            self.destination_service_name = s.name.as_str().into();
        }
        self
    }

    /// Sets `response_flags`.
    pub fn with_response_flags(mut self, flags: ResponseFlags) -> Self {
        self.response_flags = flags;
        self
    }
}

/// The four TCP counter families, the refusal counter and the open sockets gauge, registered in a
/// registry of their own.
///
/// No global state: create one per proxy, share it as `Arc<Metrics>`, and serve [`Metrics::render`]
/// on `/metrics` and `/stats/prometheus`. Other components may register their metrics in the same
/// registry through [`Metrics::registry_mut`] before it is shared.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
    /// The gauges of `istio_tcp_sockets_open{reporter}`, `source` then `destination` (written by
    /// a [`SocketsCollector`] in the registry).
    socket_gauges: [Gauge; 2],
    /// The label sets in use, so that [`Metrics::sum`] can read the families back.
    seen: Arc<Mutex<LabelSets>>,
    /// One copy of each label set open connections were opened with, which they share (rather
    /// than holding about 1 kB of labels and their strings each).
    labels: Shared<ConnectionLabels>,
    /// The same for the names of their access log lines.
    entries: Shared<AccessLogEntry>,
}

/// The labels of `istio_tcp_sockets_open`: the reporter, `source` for the sockets accepted by the
/// outbound listeners (capture and SOCKS5), `destination` for those of the inbound listeners (HBONE
/// and plaintext), as ztunnel labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SocketLabels {
    /// `reporter`.
    pub reporter: Reporter,
}

/// Writes `istio_tcp_sockets_open` with its two series in a fixed order (`source`, then
/// `destination`), where a family would write them in its hash map's order.
#[derive(Debug)]
struct SocketsCollector {
    gauges: [Gauge; 2],
}

impl prometheus_client::collector::Collector for SocketsCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>) -> fmt::Result {
        use prometheus_client::encoding::EncodeMetric;

        let mut family = encoder.encode_descriptor(
            "tcp_sockets_open",
            // The full stop the registry appends to the help of the metrics registered in it.
            "The number of TCP sockets the proxy's listeners accepted that are still open.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (reporter, gauge) in [Reporter::Source, Reporter::Destination].into_iter().zip(&self.gauges) {
            gauge.encode(family.encode_family(&SocketLabels { reporter })?)?;
        }
        Ok(())
    }
}

/// A socket accepted by a data listener, counted in `istio_tcp_sockets_open` until this guard is
/// dropped (whatever ends the connection: its end, an error, a refusal, the drain abandoning it).
/// Created by [`Metrics::socket_opened`].
#[derive(Debug)]
#[must_use = "dropping the guard counts the socket as closed at once"]
pub struct OpenSocket {
    gauge: Gauge,
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The label sets a [`Metrics`] has counters for: those of connections opened (the opened, sent
/// and received families share them) and those of connections closed (their final flags).
#[derive(Debug, Default)]
struct LabelSets {
    opened: HashSet<ConnectionLabels>,
    closed: HashSet<ConnectionLabels>,
}

fn lock(sets: &Mutex<LabelSets>) -> MutexGuard<'_, LabelSets> {
    sets.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry holding the five families, empty.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let refused = Family::default();
        let opened = Family::default();
        let closed = Family::default();
        let sent = Family::default();
        let received = Family::default();
        let istio = registry.sub_registry_with_prefix(METRIC_PREFIX);
        // Names and help texts are ztunnel's; the registry appends `_total` and a full stop.
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            Family::clone(&opened),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            Family::clone(&closed),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            Family::clone(&received),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            Family::clone(&sent),
        );
        istio.register(
            "tcp_connections_refused",
            "The total number of TCP connections refused before they were routed, by listener and reason",
            Family::clone(&refused),
        );
        // Both gauges exist from the start (at 0): a dashboard's query finds them before any traffic.
        let socket_gauges = [Gauge::default(), Gauge::default()];
        istio.register_collector(Box::new(SocketsCollector {
            gauges: socket_gauges.clone(),
        }));
        Self {
            registry,
            opened,
            closed,
            sent,
            received,
            refused,
            socket_gauges,
            seen: Arc::default(),
            labels: Shared::default(),
            entries: Shared::default(),
        }
    }

    fn socket_gauge(&self, reporter: Reporter) -> &Gauge {
        match reporter {
            Reporter::Source => &self.socket_gauges[0],
            Reporter::Destination => &self.socket_gauges[1],
        }
    }

    /// Counts a socket accepted by a data listener as open in `istio_tcp_sockets_open{reporter}`
    /// until the returned guard is dropped: one relaxed atomic addition each way, no lookup.
    ///
    /// ```
    /// use meshwire_dataplane::telemetry::metrics::{Metrics, Reporter};
    ///
    /// let metrics = Metrics::new();
    /// let socket = metrics.socket_opened(Reporter::Destination);
    /// assert_eq!(metrics.sockets_open(Reporter::Destination), 1);
    /// assert!(metrics.render().lines().any(|l| l == "istio_tcp_sockets_open{reporter=\"destination\"} 1"));
    /// drop(socket);
    /// assert_eq!(metrics.sockets_open(Reporter::Destination), 0);
    /// assert!(metrics.render().lines().any(|l| l == "istio_tcp_sockets_open{reporter=\"source\"} 0"));
    /// ```
    pub fn socket_opened(&self, reporter: Reporter) -> OpenSocket {
        let gauge = self.socket_gauge(reporter).clone();
        gauge.inc();
        OpenSocket { gauge }
    }

    /// How many sockets accepted for `reporter` are open now.
    pub fn sockets_open(&self, reporter: Reporter) -> i64 {
        self.socket_gauge(reporter).get()
    }

    /// Counts a connection refused by `listener` before it was routed, for `reason`:
    /// `istio_tcp_connections_refused_total{listener,reason}`.
    ///
    /// ```
    /// use meshwire_dataplane::config::Listener;
    /// use meshwire_dataplane::telemetry::metrics::{Metrics, RefusalReason};
    ///
    /// let metrics = Metrics::new();
    /// metrics.refused(Listener::Socks5, RefusalReason::Socks5Handshake);
    /// assert_eq!(metrics.refusals(Listener::Socks5, RefusalReason::Socks5Handshake), 1);
    /// assert!(metrics.render().lines().any(|line| line
    ///     == "istio_tcp_connections_refused_total{listener=\"socks5\",reason=\"socks5_handshake\"} 1"));
    /// ```
    pub fn refused(&self, listener: Listener, reason: RefusalReason) {
        self.refused.get_or_create(&RefusalLabels { listener, reason }).inc();
    }

    /// How many connections `listener` refused for `reason` so far.
    pub fn refusals(&self, listener: Listener, reason: RefusalReason) -> u64 {
        self.refused
            .get(&RefusalLabels { listener, reason })
            .map_or(0, |counter| counter.get())
    }

    /// The sum of `parts`: one [`Metrics`] whose four families hold, for every label set, the sum of
    /// the parts' counters. This is how a proxy that counts on every core separately (the io_uring
    /// build: no counter shared between cores) answers a scrape. Only the four connection families,
    /// the refusal counter and the open sockets gauge are summed, not metrics registered through
    /// [`registry_mut`](Self::registry_mut).
    ///
    /// ```
    /// use meshwire_dataplane::config::Listener;
    /// use meshwire_dataplane::telemetry::metrics::{
    ///     ConnectionLabels, Metrics, RefusalReason, Reporter, ResponseFlags, SecurityPolicy,
    /// };
    ///
    /// let cores = [Metrics::new(), Metrics::new()];
    /// for (core, bytes) in cores.iter().zip([10, 32]) {
    ///     let connection = core.open(ConnectionLabels::new(Reporter::Destination, SecurityPolicy::MutualTls));
    ///     connection.record_received(bytes);
    ///     connection.finish(ResponseFlags::None);
    ///     core.refused(Listener::Inbound, RefusalReason::TlsHandshake);
    /// }
    /// let total = Metrics::sum(&cores);
    /// let text = total.render();
    /// assert!(text.lines().any(|l| l.starts_with("istio_tcp_received_bytes_total{") && l.ends_with("} 42")));
    /// assert!(text.lines().any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with("} 2")));
    /// assert_eq!(total.refusals(Listener::Inbound, RefusalReason::TlsHandshake), 2);
    /// ```
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a Metrics>) -> Metrics {
        let total = Metrics::new();
        for part in parts {
            // The label sets first: a counter created after this copy is counted at the next scrape.
            let (opened, closed) = {
                let seen = lock(&part.seen);
                (
                    seen.opened.iter().cloned().collect::<Vec<_>>(),
                    seen.closed.iter().cloned().collect::<Vec<_>>(),
                )
            };
            {
                let mut seen = lock(&total.seen);
                seen.opened.extend(opened.iter().cloned());
                seen.closed.extend(closed.iter().cloned());
            }
            for labels in &opened {
                for (from, to) in [
                    (&part.opened, &total.opened),
                    (&part.sent, &total.sent),
                    (&part.received, &total.received),
                ] {
                    if let Some(counter) = from.get(labels) {
                        to.get_or_create(labels).inc_by(counter.get());
                    }
                }
            }
            for labels in &closed {
                if let Some(counter) = part.closed.get(labels) {
                    total.closed.get_or_create(labels).inc_by(counter.get());
                }
            }
            for reporter in [Reporter::Source, Reporter::Destination] {
                total.socket_gauge(reporter).inc_by(part.sockets_open(reporter));
            }
            for listener in Listener::ALL {
                for reason in RefusalReason::ALL {
                    let count = part.refusals(listener, reason);
                    if count > 0 {
                        total
                            .refused
                            .get_or_create(&RefusalLabels { listener, reason })
                            .inc_by(count);
                    }
                }
            }
        }
        total
    }

    /// The registry, to encode it another way.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry, to register further metrics in it (do it before sharing `Metrics`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts a connection as opened and returns its recorder, which counts it as closed when it
    /// is finished or dropped.
    ///
    /// This is the only place, besides the close, where a counter is looked up by its labels.
    pub fn open(&self, labels: ConnectionLabels) -> ConnectionMetrics {
        let labels = self.labels.share(labels);
        // Recorded before the counters exist, so that a counter is never missed by `sum`.
        if self.opened.get(&labels).is_none() {
            lock(&self.seen).opened.insert(ConnectionLabels::clone(&labels));
        }
        self.opened.get_or_create(&labels).inc();
        ConnectionMetrics {
            sent_counter: self.sent.get_or_create_owned(&labels),
            received_counter: self.received.get_or_create_owned(&labels),
            closed: Family::clone(&self.closed),
            seen: Arc::clone(&self.seen),
            flags: labels.response_flags,
            labels,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            finished: false,
        }
    }

    /// `entry`, to be held until its connection ends: its names shared with the connections
    /// between the same workloads (see [`HeldEntry`]).
    pub fn hold_entry(&self, entry: AccessLogEntry) -> HeldEntry {
        HeldEntry::new(entry, |names| self.entries.share(names))
    }

    /// Every registered metric in the OpenMetrics text format (which Prometheus also reads), ending
    /// with `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and none of the label encoders here fails.
        let encoded = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        debug_assert!(encoded.is_ok(), "encoding metrics failed: {encoded:?}");
        text
    }
}

/// The metrics of one connection: created by [`Metrics::open`], fed the bytes as they flow, and
/// counted as closed exactly once, by [`finish`](Self::finish) or, failing that, on drop.
///
/// Recording takes `&self`, so that both copy directions of a connection can record through one
/// shared reference; each call is two relaxed atomic additions.
#[derive(Debug)]
#[must_use = "dropping the recorder counts the connection as closed at once"]
pub struct ConnectionMetrics {
    /// The labels it was opened with, shared with the other connections opened with them.
    labels: Arc<ConnectionLabels>,
    /// The `response_flags` to count the close with.
    flags: ResponseFlags,
    closed: Family<ConnectionLabels, Counter>,
    seen: Arc<Mutex<LabelSets>>,
    sent_counter: Counter,
    received_counter: Counter,
    sent: AtomicU64,
    received: AtomicU64,
    finished: bool,
}

impl ConnectionMetrics {
    /// Records `bytes` written toward the client (the response direction): `istio_tcp_sent_bytes_total`.
    #[inline]
    pub fn record_sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        self.sent_counter.inc_by(bytes);
    }

    /// Records `bytes` read from the client and forwarded toward the server (the request direction):
    /// `istio_tcp_received_bytes_total`.
    #[inline]
    pub fn record_received(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
        self.received_counter.inc_by(bytes);
    }

    /// The bytes recorded by [`record_sent`](Self::record_sent) so far on this connection.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The bytes recorded by [`record_received`](Self::record_received) so far on this connection.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The connection's labels.
    pub fn labels(&self) -> &ConnectionLabels {
        &self.labels
    }

    /// Counts the connection as closed, with `flags` as its `response_flags` (the opened and byte
    /// counters keep the flags the connection was opened with), and returns its totals.
    pub fn finish(mut self, flags: ResponseFlags) -> ConnectionSummary {
        self.flags = flags;
        self.close();
        ConnectionSummary {
            labels: self.closed_labels(),
            sent: self.sent(),
            received: self.received(),
        }
    }

    /// The labels to count the close with: those it was opened with (shared), unless the flags
    /// changed (a copy, made for a failed connection only).
    fn closed_labels(&self) -> Arc<ConnectionLabels> {
        if self.flags == self.labels.response_flags {
            Arc::clone(&self.labels)
        } else {
            let mut labels = ConnectionLabels::clone(&self.labels);
            labels.response_flags = self.flags;
            Arc::new(labels)
        }
    }

    fn close(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let labels = self.closed_labels();
        if self.closed.get(&labels).is_none() {
            lock(&self.seen).closed.insert(ConnectionLabels::clone(&labels));
        }
        self.closed.get_or_create(&labels).inc();
    }
}

impl Drop for ConnectionMetrics {
    /// Counts the connection as closed, with the flags it was opened with, unless it was finished.
    fn drop(&mut self) {
        self.close();
    }
}

/// What a finished connection recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionSummary {
    /// Its labels, with the final `response_flags` (shared with the connections opened with the
    /// same labels).
    pub labels: Arc<ConnectionLabels>,
    /// The bytes written toward the client (the response direction).
    pub sent: u64,
    /// The bytes read from the client (the request direction).
    pub received: u64,
}

/// The labels of the DNS proxy's metrics, ztunnel's: the query's type (`a`, `aaaa`, `srv`...), its
/// transport (`udp`, `tcp`) and the client workload's canonical service and revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// The type of the query's question, lower case; `unknown` without a question.
    pub request_query_type: LabelValue,
    /// `udp` or `tcp`.
    pub request_protocol: LabelValue,
    /// The client workload's canonical service; `unknown` if the client is not known.
    pub source_canonical_service: LabelValue,
    /// The client workload's canonical revision; `unknown` if the client is not known.
    pub source_canonical_revision: LabelValue,
}

impl DnsLabels {
    /// The labels of a query of type `query_type` (such as `A`) over `protocol` from `source`.
    pub fn new(query_type: Option<&str>, protocol: &str, source: Option<&Workload>) -> Self {
        Self {
            request_query_type: query_type.map(str::to_ascii_lowercase).into(),
            request_protocol: protocol.into(),
            source_canonical_service: source.map(|w| w.canonical_name.clone()).into(),
            source_canonical_revision: source.map(|w| w.canonical_revision.clone()).into(),
        }
    }
}

/// The buckets of `istio_dns_upstream_request_duration_seconds`, in seconds: ztunnel's (which lists
/// 0.005 before 0.001), in order.
pub const DNS_DURATION_BUCKETS: [f64; 6] = [0.001, 0.005, 0.01, 0.1, 1.0, 5.0];

/// The DNS proxy's metrics, with ztunnel's names and help texts, all with the labels [`DnsLabels`]:
///
/// | family | counts |
/// |---|---|
/// | `istio_dns_requests_total` | every query decided (answered here, forwarded, or refused as malformed) |
/// | `istio_dns_upstream_requests_total` | queries forwarded to the upstream resolvers |
/// | `istio_dns_upstream_failures_total` | forwarded queries no upstream answered (the client got `SERVFAIL`) |
/// | `istio_dns_upstream_request_duration_seconds` | how long the upstream took, failures included (histogram) |
///
/// One for the whole process (its counters are atomic; every core of the io_uring build counts in
/// it).
///
/// ```
/// use std::time::Duration;
/// use meshwire_dataplane::telemetry::metrics::{DnsLabels, DnsMetrics};
///
/// let dns = DnsMetrics::new();
/// let labels = DnsLabels::new(Some("A"), "udp", None);
/// dns.request(&labels);
/// dns.forwarded(&labels, Duration::from_millis(3), true);
/// assert_eq!(dns.requests(&labels), 1);
/// assert!(dns.render().lines().any(|line| line
///     == "istio_dns_upstream_requests_total{request_query_type=\"a\",request_protocol=\"udp\",\
///         source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\"} 1"));
/// ```
#[derive(Debug)]
pub struct DnsMetrics {
    registry: Arc<Registry>,
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: Family<DnsLabels, Histogram, fn() -> Histogram>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn dns_histogram() -> Histogram {
    Histogram::new(DNS_DURATION_BUCKETS)
}

impl DnsMetrics {
    /// The four families, empty, in a registry of their own (prefix `istio_`).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let upstream_requests = Family::default();
        let upstream_failures = Family::default();
        let upstream_duration: Family<DnsLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(dns_histogram);
        let istio = registry.sub_registry_with_prefix(METRIC_PREFIX);
        istio.register(
            "dns_requests",
            "Total number of DNS requests (unstable)",
            Family::clone(&requests),
        );
        istio.register(
            "dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream (unstable)",
            Family::clone(&upstream_requests),
        );
        istio.register(
            "dns_upstream_failures",
            "Total number of DNS requests that failed to forward upstream (unstable)",
            Family::clone(&upstream_failures),
        );
        istio.register_with_unit(
            "dns_upstream_request_duration",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            Unit::Seconds,
            Family::clone(&upstream_duration),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            upstream_requests,
            upstream_failures,
            upstream_duration,
        }
    }

    /// The registry holding the families (for the metrics endpoint).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Counts a query: `istio_dns_requests_total`.
    pub fn request(&self, labels: &DnsLabels) {
        self.requests.get_or_create(labels).inc();
    }

    /// Counts a forwarded query that took `took` and was answered (`answered`) or failed:
    /// `istio_dns_upstream_requests_total`, `istio_dns_upstream_request_duration_seconds` and, on
    /// failure, `istio_dns_upstream_failures_total`.
    pub fn forwarded(&self, labels: &DnsLabels, took: std::time::Duration, answered: bool) {
        self.upstream_requests.get_or_create(labels).inc();
        self.upstream_duration.get_or_create(labels).observe(took.as_secs_f64());
        if !answered {
            self.upstream_failures.get_or_create(labels).inc();
        }
    }

    /// How many queries with `labels` were counted.
    pub fn requests(&self, labels: &DnsLabels) -> u64 {
        self.requests.get(labels).map_or(0, |c| c.get())
    }

    /// The families in the OpenMetrics text format, ending with `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let encoded = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        debug_assert!(encoded.is_ok(), "encoding metrics failed: {encoded:?}");
        text
    }
}
