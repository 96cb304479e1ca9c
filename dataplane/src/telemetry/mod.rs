//! Telemetry for every proxied connection: Istio's standard TCP metrics and ztunnel's access log.
//!
//! - [`metrics`]: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_sent_bytes_total` and `istio_tcp_received_bytes_total`, with ztunnel's labels, so
//!   that Kiali and existing dashboards work; a per-connection recorder cheap enough for the data
//!   path; the OpenMetrics text for `/metrics` and `/stats/prometheus`.
//! - [`process`]: the process's own metrics (`process_open_fds`, `process_max_fds`, CPU, memory,
//!   threads), read from `/proc/self` at each scrape.
//! - [`runtime`]: the tokio data runtime's metrics (`tokio_num_workers`, ...), ztunnel's.
//! - [`accesslog`]: ztunnel's access log, a `tracing` event per connection (target `access`).
//! - [`layout`]: ztunnel's log layout (tab-separated text, or JSON), for every line the process logs.
//!
//! Nothing here spawns, only [`process`] reads files (`/proc`, when scraped), and only the log layout reads the clock (for its time stamps): the
//! data path passes durations in, and the caller decides where the rendered metrics and log lines go.
//!
//! A connection's life, as the outbound proxy sees it:
//!
//! ```
//! use std::time::Duration;
//! use meshwire_dataplane::telemetry::accesslog::{self, AccessLogEntry};
//! use meshwire_dataplane::telemetry::metrics::{ConnectionLabels, Metrics, Reporter, ResponseFlags, SecurityPolicy};
//! use meshwire_dataplane::xds::Workload;
//!
//! let client = Workload::new("pod-1", "spiffe://cluster.local/ns/shop/sa/cart".parse()?);
//! let server = Workload::new("pod-2", "spiffe://cluster.local/ns/shop/sa/db".parse()?);
//! let metrics = Metrics::new();
//!
//! // Opened: the labels come from the routing decision.
//! let labels = ConnectionLabels::new(Reporter::Source, SecurityPolicy::MutualTls)
//!     .with_source(Some(&client))
//!     .with_source_principal(Some(client.spiffe_id()))
//!     .with_destination(Some(&server));
//! let connection = metrics.open(labels);
//!
//! // Bytes flow: the copy loop records each write.
//! connection.record_received(5); // client -> server
//! connection.record_sent(7); // server -> client
//!
//! // Closed: count it and log it.
//! let summary = connection.finish(ResponseFlags::None);
//! let entry = AccessLogEntry::from_summary(&summary, "10.0.0.1:40000".parse()?, "10.0.0.2:15008".parse()?)
//!     .with_hbone_addr("10.0.0.2:8080")
//!     .with_duration(Duration::from_millis(3));
//! assert_eq!((entry.bytes_sent, entry.bytes_recv), (5, 7)); // the client's point of view
//! accesslog::emit(&entry); // `connection complete`, target `access`
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod accesslog;
pub mod layout;
pub mod metrics;
pub mod process;
pub mod runtime;
pub mod shared;
