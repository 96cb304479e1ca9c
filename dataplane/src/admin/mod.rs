//! The control plane's HTTP listeners: readiness (15021), admin (15000, loopback) and metrics (15020),
//! as ztunnel serves them.
//!
//! | listener | path | answers |
//! |---|---|---|
//! | readiness | `GET /healthz/ready` | `200 ready`, or `500` naming what is pending or that the proxy drains |
//! | metrics | `GET /metrics`, `GET /stats/prometheus` | the TCP [`Metrics`], the process's metrics, `istio_build` and `meshwire_config_generation`, as OpenMetrics or Prometheus text by `Accept` |
//! | admin | `GET /` | the list of admin endpoints |
//! | admin | `GET /config_dump` | the current workloads, services, policies, configuration generation and certificates, as JSON |
//! | admin | `POST /logging` | the current log filter (other methods: 405, as ztunnel) |
//! | admin | `POST /logging?level=<directives>` | merges directives into the log filter (`EnvFilter` syntax: `access=warn` changes that target only), as ztunnel; `?reset` restores the initial one first |
//! | admin | `POST /quitquitquit` | starts the drain, as SIGTERM does |
//! | admin | `GET /debug/pprof/profile` | a CPU profile of the process in the pprof format, sampled for 10 s or `?seconds=N` ([`profile`]) |
//!
//! Unknown paths are 404, wrong methods 405 with an `Allow` header.
//!
//! The endpoints are pure [`Handler`]s (request head in, response out) over small handles: a
//! [`Readiness`], a [`Published`] snapshot cell, the certificate manager seen through
//! [`CertificateStatus`], a [`LogControl`], a [`ShutdownTrigger`] and the [`Metrics`] registry. No data
//! path type appears, so the io_uring binary, which runs the control plane on a tokio thread as well,
//! serves the same endpoints. [`serve`] drives a handler on a tokio listener with hyper (HTTP/1.1)
//! until a shutdown future resolves.
//!
//! ```
//! use std::sync::Arc;
//! use meshwire_dataplane::admin::{self, Readiness, ReadinessHandler};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let readiness = Readiness::new();
//! let starting = readiness.block("listeners");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(admin::serve("readiness", listener, ReadinessHandler::new(readiness.clone()), async {
//!     let _ = stopped.await;
//! }));
//! // ... bind the other listeners, then:
//! starting.ready();
//! assert!(readiness.is_ready());
//! let _ = stop.send(());
//! server.await?;
//! # Ok(())
//! # }
//! ```

mod dump;
mod logging;
pub mod profile;
mod readiness;
mod server;

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use meshwire_identity::id::SpiffeId;
use meshwire_identity::manager::{CertManager, CertStatus};
use meshwire_identity::source::CertSource;
use meshwire_identity::time::Timer;
use tokio::sync::watch;

use crate::telemetry::metrics::{self, Metrics};
use crate::watch::Published;

pub use dump::{
    ConfigDumpChunks, DUMP_CHUNK, STATIC_CONFIG_LIMIT, buffers_dump, config_dump, config_dump_chunks,
    empty_static_config, rfc3339, static_config,
};
pub use logging::{LogControl, LogControlError};
pub use readiness::{READY_PATH, Readiness, ReadinessHandler, ReadyBlocker};
pub use server::{
    Body, HEADER_READ_TIMEOUT, Handler, LaterResponse, SHUTDOWN_GRACE, method_not_allowed, not_found, query_param,
    response, serve, text,
};

// ---------------------------------------------------------------------------------------------
// Shutdown

/// A request to shut the process down (drain and exit), shared by whoever may ask (`/quitquitquit`,
/// a signal handler) and whoever acts on it. Cloning is cheap; every clone sees the same request.
///
/// ```
/// use meshwire_dataplane::admin::ShutdownTrigger;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let trigger = ShutdownTrigger::new();
/// let waiter = trigger.clone();
/// assert!(!trigger.is_triggered());
/// trigger.trigger("/quitquitquit");
/// assert_eq!(waiter.triggered().await, "/quitquitquit");
/// # }
/// ```
#[derive(Clone)]
pub struct ShutdownTrigger {
    tx: Arc<watch::Sender<Option<String>>>,
}

impl ShutdownTrigger {
    /// Not triggered.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(None).0),
        }
    }

    /// Asks for the shutdown; `reason` says who asked. Only the first request's reason is kept.
    pub fn trigger(&self, reason: &str) {
        self.tx.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason.to_owned());
            true
        });
    }

    /// Whether the shutdown was asked for.
    pub fn is_triggered(&self) -> bool {
        self.tx.borrow().is_some()
    }

    /// Resolves, with the reason, once the shutdown is asked for.
    pub async fn triggered(&self) -> String {
        let mut rx = self.tx.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The sender lives in `self`: it cannot be gone while `self` is borrowed.
            Err(_) => String::new(),
        }
    }
}

impl Default for ShutdownTrigger {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ShutdownTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownTrigger")
            .field("triggered", &*self.tx.borrow())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// What the admin page shows of the certificates: implemented by [`CertManager`] (any source, any
/// timer), so the page needs neither type.
pub trait CertificateStatus: Send + Sync + 'static {
    /// Each identity the manager holds, ordered by identity.
    fn certificates(&self) -> Vec<CertStatus>;
}

impl<S, T> CertificateStatus for CertManager<S, T>
where
    S: CertSource + Send + Sync + 'static,
    T: Timer + Send + Sync + 'static,
{
    fn certificates(&self) -> Vec<CertStatus> {
        self.status()
    }
}

/// The readiness check of a workload certificate (see [`Readiness::check`]): `None` while `status`
/// (the manager's [`CertStatus`] of the identity `id`, `None` if it does not keep it) holds a
/// certificate valid at `wall_now`; else what is missing, naming the identity: not obtained yet
/// (with the last error, if a fetch failed), or expired.
///
/// It reads the status only: the manager fetches and retries on its own schedule.
///
/// ```
/// use meshwire_dataplane::admin::certificate_pending;
/// use meshwire_identity::id::SpiffeId;
///
/// let id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/web")?;
/// let pending = certificate_pending(&id, None, std::time::SystemTime::now());
/// assert_eq!(pending.as_deref(), Some("workload certificate spiffe://cluster.local/ns/default/sa/web"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn certificate_pending(id: &SpiffeId, status: Option<CertStatus>, wall_now: SystemTime) -> Option<String> {
    let what = format!("workload certificate {id}");
    let Some(status) = status else { return Some(what) };
    match (status.not_after, status.last_error) {
        (Some(not_after), _) if not_after < wall_now => {
            Some(format!("{what} (expired at {})", dump::rfc3339(not_after)))
        }
        (Some(_), _) => None,
        (None, Some(error)) => Some(format!("{what} ({error})")),
        (None, None) => Some(what),
    }
}

/// Resolves once `published` holds a loaded configuration (generation 1 or later).
pub async fn config_loaded(published: &Published) {
    let mut changes = published.subscribe();
    let _ = changes.wait_for(|_| published.generation() >= 1).await;
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The metrics listener (15020): `GET /metrics` and `GET /stats/prometheus` answer the metrics of
/// [`Metrics`] (the text of [`Metrics::render`]) and the process's
/// ([`process`](crate::telemetry::process): `process_open_fds`, `process_max_fds`, ...), with the
/// content type [`metrics::content_type`] chooses from the `Accept` headers. Other paths are 404,
/// other methods 405.
///
/// With [`MetricsHandler::with_config`], two gauges are added: `istio_build{component="ztunnel",tag=<version>} 1`
/// (as ztunnel reports its build) and `meshwire_config_generation`, the generation of the
/// configuration in force. With [`MetricsHandler::with_buffers`], four more:
/// `meshwire_hbone_buffered_bytes` (what HBONE tunnels, inbound and outbound, hold now for peers),
/// `meshwire_hbone_buffer_budget_bytes` (the process's budget for it),
/// `meshwire_hbone_receive_window_leased_bytes` (what HBONE connections, inbound and outbound, lease
/// now of the receive budget for their connection windows) and `meshwire_hbone_receive_budget_bytes`
/// (that budget).
#[derive(Debug, Clone)]
pub struct MetricsHandler {
    /// The counters, one [`Metrics`] per core where the proxy counts on each core separately.
    metrics: Arc<[Arc<Metrics>]>,
    proxy: Option<Arc<ProxyGauges>>,
    buffers: Option<Arc<BufferGauges>>,
    /// Metrics of the binary itself (the io_uring build's per-core counters).
    extra: Option<Arc<prometheus_client::registry::Registry>>,
    /// Metrics brought up to date at each scrape (istiod's xDS stream).
    refreshed: Vec<Refreshed>,
    /// The process's metrics ([`ProcessCollector`](crate::telemetry::process::ProcessCollector)).
    process: Arc<prometheus_client::registry::Registry>,
}

/// A registry whose metrics `refresh` brings up to date before each scrape encodes them.
#[derive(Clone)]
struct Refreshed {
    registry: Arc<prometheus_client::registry::Registry>,
    refresh: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Refreshed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refreshed")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct ProxyGauges {
    registry: prometheus_client::registry::Registry,
    generation: prometheus_client::metrics::gauge::Gauge,
    published: Published,
}

#[derive(Debug)]
struct BufferGauges {
    registry: prometheus_client::registry::Registry,
    buffered: prometheus_client::metrics::gauge::Gauge,
    budget: Arc<meshwire_hbone::budget::BufferBudget>,
    leased: prometheus_client::metrics::gauge::Gauge,
    receive: Arc<meshwire_hbone::budget::BufferBudget>,
}

impl MetricsHandler {
    /// The endpoint of `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::summing(vec![metrics])
    }

    /// The endpoint of a proxy that counts in several [`Metrics`] (one per core): each scrape
    /// answers their sum ([`Metrics::sum`]).
    pub fn summing(parts: Vec<Arc<Metrics>>) -> Self {
        let mut process = prometheus_client::registry::Registry::default();
        process.register_collector(Box::new(crate::telemetry::process::ProcessCollector));
        process.register_collector(Box::new(crate::telemetry::process::AllocatorCollector));
        Self {
            metrics: parts.into(),
            proxy: None,
            buffers: None,
            extra: None,
            refreshed: Vec::new(),
            process: Arc::new(process),
        }
    }

    /// Adds the metrics of `registry` to every answer, as they are at each scrape (collectors
    /// included); several may be added.
    pub fn with_static(self, registry: Arc<prometheus_client::registry::Registry>) -> Self {
        self.with_refreshed(registry, Arc::new(|| {}))
    }

    /// Adds the metrics of `registry`, which `refresh` brings up to date before each scrape (for
    /// values kept elsewhere, such as the state of istiod's xDS stream).
    pub fn with_refreshed(
        mut self,
        registry: Arc<prometheus_client::registry::Registry>,
        refresh: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        self.refreshed.push(Refreshed { registry, refresh });
        self
    }

    /// Adds the DNS proxy's metrics ([`DnsMetrics`](crate::telemetry::metrics::DnsMetrics)) to every
    /// answer.
    pub fn with_dns(self, dns: &crate::telemetry::metrics::DnsMetrics) -> Self {
        self.with_refreshed(Arc::clone(dns.registry()), Arc::new(|| {}))
    }

    /// Adds the metrics of `registry` to every answer.
    pub fn with_registry(mut self, registry: Arc<prometheus_client::registry::Registry>) -> Self {
        self.extra = Some(registry);
        self
    }

    /// The counters to encode: the only part, or the sum of the parts.
    fn counters(&self) -> Arc<Metrics> {
        match &*self.metrics {
            [only] => Arc::clone(only),
            parts => Arc::new(Metrics::sum(parts.iter().map(|m| &**m))),
        }
    }

    /// Adds the build and configuration generation gauges, reading the generation from `published`
    /// at each request.
    pub fn with_config(mut self, published: Published) -> Self {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;

        let mut registry = prometheus_client::registry::Registry::default();
        let build: Family<Vec<(&'static str, &'static str)>, Gauge> = Family::default();
        build
            .get_or_create(&vec![("component", "ztunnel"), ("tag", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.sub_registry_with_prefix(metrics::METRIC_PREFIX).register(
            "build",
            "Istio component build info",
            build,
        );
        let generation = Gauge::default();
        registry.register(
            "meshwire_config_generation",
            "The generation of the local configuration in force (0: none loaded)",
            generation.clone(),
        );
        self.proxy = Some(Arc::new(ProxyGauges {
            registry,
            generation,
            published,
        }));
        self
    }

    /// Adds the gauges of the process's buffer budget `budget` and of its receive-window budget
    /// `receive`, read at each request.
    pub fn with_buffers(
        mut self,
        budget: Arc<meshwire_hbone::budget::BufferBudget>,
        receive: Arc<meshwire_hbone::budget::BufferBudget>,
    ) -> Self {
        use prometheus_client::metrics::gauge::Gauge;

        let mut registry = prometheus_client::registry::Registry::default();
        let buffered = Gauge::default();
        registry.register(
            "meshwire_hbone_buffered_bytes",
            "Bytes HBONE tunnels (inbound and outbound) hold for their peers",
            buffered.clone(),
        );
        let limit: Gauge = Gauge::default();
        limit.set(i64::try_from(budget.limit()).unwrap_or(i64::MAX));
        registry.register(
            "meshwire_hbone_buffer_budget_bytes",
            "The process's budget of bytes HBONE tunnels (inbound and outbound) hold for their peers",
            limit,
        );
        let leased = Gauge::default();
        registry.register(
            "meshwire_hbone_receive_window_leased_bytes",
            "Bytes of HTTP/2 connection windows (beyond the 64 KiB default) HBONE connections, inbound and \
             outbound, lease now of the process's receive budget",
            leased.clone(),
        );
        let receive_limit: Gauge = Gauge::default();
        receive_limit.set(i64::try_from(receive.limit()).unwrap_or(i64::MAX));
        registry.register(
            "meshwire_hbone_receive_budget_bytes",
            "The process's budget of HTTP/2 connection windows HBONE connections advertise (beyond the \
             64 KiB default each)",
            receive_limit,
        );
        self.buffers = Some(Arc::new(BufferGauges {
            registry,
            buffered,
            budget,
            leased,
            receive,
        }));
        self
    }

    /// The body `/metrics` answers: every metric in the OpenMetrics text format, ending with `# EOF`.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};

        let counters = self.counters();
        let mut text = String::new();
        // Writing into a String cannot fail, and none of the label encoders here fails.
        let mut encoded = encode_registry(&mut text, counters.registry());
        if let Some(proxy) = &self.proxy {
            proxy
                .generation
                .set(i64::try_from(proxy.published.generation()).unwrap_or(i64::MAX));
            encoded = encoded.and_then(|()| encode_registry(&mut text, &proxy.registry));
        }
        if let Some(buffers) = &self.buffers {
            buffers
                .buffered
                .set(i64::try_from(buffers.budget.used()).unwrap_or(i64::MAX));
            buffers
                .leased
                .set(i64::try_from(buffers.receive.used()).unwrap_or(i64::MAX));
            encoded = encoded.and_then(|()| encode_registry(&mut text, &buffers.registry));
        }
        if let Some(extra) = &self.extra {
            encoded = encoded.and_then(|()| encode_registry(&mut text, extra));
        }
        for refreshed in &self.refreshed {
            (refreshed.refresh)();
            encoded = encoded.and_then(|()| encode_registry(&mut text, &refreshed.registry));
        }
        encoded = encoded.and_then(|()| encode_registry(&mut text, &self.process));
        let encoded = encoded.and_then(|()| encode_eof(&mut text));
        debug_assert!(encoded.is_ok(), "encoding metrics failed: {encoded:?}");
        text
    }
}

impl Handler for MetricsHandler {
    fn handle(&self, request: &Request<()>) -> Response<Bytes> {
        if !matches!(request.uri().path(), "/metrics" | "/stats/prometheus") {
            return server::not_found(request);
        }
        if !server::is_read(request) {
            return server::method_not_allowed(request, &[Method::GET, Method::HEAD]);
        }
        let accept = request.headers().get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok());
        server::response(StatusCode::OK, metrics::content_type(accept), self.render())
    }
}

// ---------------------------------------------------------------------------------------------
// Admin

/// The admin endpoints, with what `/` says of each.
pub const ADMIN_ENDPOINTS: &[(&str, &str)] = &[
    ("/", "this list"),
    (
        "/config_dump",
        "GET: the current workloads, services, policies and certificates, as JSON",
    ),
    (
        "/logging",
        "GET: the current log filter; POST ?level=<filter>: change it (EnvFilter syntax, e.g. debug or meshwire=debug,h2=warn); POST ?reset: restore the initial one",
    ),
    ("/quitquitquit", "POST: drain and exit, as on SIGTERM"),
    (
        "/debug/pprof/profile",
        "GET: a CPU profile of the process (pprof format), sampled for 10 s or ?seconds=N",
    ),
];

const LOGGING_USAGE: &str = "usage: POST /logging (the current filter)\n\
    usage: POST /logging?level=<directives> (merged into the current filter; EnvFilter syntax: debug, access=warn, \
    meshwire=debug,h2=warn)\n\
    usage: POST /logging?reset (the filter the process started with)\n\
    usage: POST /logging?reset&level=<directives> (merged into the filter the process started with)\n";

/// The admin listener (15000, loopback): `/`, `/config_dump`, `/logging`, `/quitquitquit` (see the
/// [module](self) table).
#[derive(Clone)]
pub struct AdminHandler {
    published: Published,
    certificates: Arc<dyn CertificateStatus>,
    shutdown: ShutdownTrigger,
    logging: Option<LogControl>,
    buffers: Option<meshwire_hbone::server::ServeOptions>,
    istio: Option<IstioDump>,
    /// ztunnel's `config` section, and the local configuration for `staticConfig`.
    ztunnel: Option<(serde_json::Value, Option<crate::config::LocalConfigSource>)>,
    workload_state: Option<Arc<std::sync::OnceLock<IstioDump>>>,
}

/// What renders a section of `/config_dump` at each request (`meshwire.istio`, `workloadState`).
pub type IstioDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl AdminHandler {
    /// The admin endpoints over the configuration in `published`, the certificates of
    /// `certificates`, and `shutdown` for `/quitquitquit`. Without [`AdminHandler::with_logging`],
    /// `/logging` answers 501.
    pub fn new(published: Published, certificates: Arc<dyn CertificateStatus>, shutdown: ShutdownTrigger) -> Self {
        Self {
            published,
            certificates,
            shutdown,
            logging: None,
            buffers: None,
            istio: None,
            ztunnel: None,
            workload_state: None,
        }
    }

    /// Adds ztunnel's `config` (`config` in ztunnel's names, [`crate::config::ztunnel_config`]) and
    /// `staticConfig` (the local configuration file, read at each request) to `/config_dump`.
    pub fn with_config(mut self, config: &crate::config::Config) -> Self {
        self.ztunnel = Some((crate::config::ztunnel_config(config), config.local_config.clone()));
        self
    }

    /// Adds ztunnel's `workloadState` to `/config_dump` (in-pod mode: the pods served), rendered
    /// at each request by what `state` holds by then (nothing while it is empty).
    pub fn with_workload_state(mut self, state: Arc<std::sync::OnceLock<IstioDump>>) -> Self {
        self.workload_state = Some(state);
        self
    }

    /// Adds an `istio` section to `/config_dump`, rendered by `istio` at each request (the state of
    /// istiod's xDS stream and CA).
    pub fn with_istio(mut self, istio: IstioDump) -> Self {
        self.istio = Some(istio);
        self
    }

    /// Adds the buffer budgets of `serve` (and the bytes they hold now) to `/config_dump`, as
    /// `buffers` (see [`buffers_dump`]).
    pub fn with_buffers(mut self, serve: meshwire_hbone::server::ServeOptions) -> Self {
        self.buffers = Some(serve);
        self
    }

    /// Serves `/logging` through `logging`.
    pub fn with_logging(mut self, logging: LogControl) -> Self {
        self.logging = Some(logging);
        self
    }

    fn index(&self) -> Response<Bytes> {
        let mut body = String::from("meshwire ztunnel admin\n\n");
        for (path, what) in ADMIN_ENDPOINTS {
            body.push_str(&format!("{path:<15} {what}\n"));
        }
        server::text(StatusCode::OK, body)
    }

    /// The dump as chunks serialised as the connection takes them: one dump costs a chunk at a time,
    /// however many workloads the configuration holds.
    fn config_dump(&self) -> Response<Body> {
        let snapshot = self.published.load();
        let certificates = self.certificates.certificates();
        let mut chunks = config_dump_chunks(snapshot, &certificates, Instant::now(), SystemTime::now());
        if let Some(serve) = &self.buffers {
            chunks = chunks.with_buffers(buffers_dump(serve));
        }
        if let Some(istio) = &self.istio {
            chunks = chunks.with_istio(istio());
        }
        if let Some((config, local)) = &self.ztunnel {
            chunks = chunks
                .with_config(config.clone())
                .with_static_config(static_config(local.as_ref()));
        }
        if let Some(state) = self.workload_state.as_ref().and_then(|slot| slot.get()) {
            chunks = chunks.with_workload_state(state());
        }
        let mut response = Response::new(Body::Chunks(Box::new(chunks)));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        response
    }

    fn logging(&self, request: &Request<()>) -> Response<Bytes> {
        let Some(logging) = &self.logging else {
            return server::text(
                StatusCode::NOT_IMPLEMENTED,
                "this process does not let its log filter be changed\n",
            );
        };
        let current = |logging: &LogControl| {
            server::text(StatusCode::OK, format!("current log level is {}\n", logging.current()))
        };
        match *request.method() {
            Method::POST => {
                let reset = server::query_param(request, "reset").is_some();
                let result = match (server::query_param(request, "level"), reset) {
                    (Some(level), false) => logging.merge(&level),
                    (Some(level), true) => logging.reset_and_merge(&level),
                    (None, true) => logging.reset(),
                    // ztunnel's POST without parameters lists the level.
                    (None, false) => return current(logging),
                };
                match result {
                    Ok(()) => {
                        tracing::info!(filter = %logging.current(), "log filter changed");
                        current(logging)
                    }
                    Err(error @ LogControlError::Reload(_)) => {
                        server::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
                    }
                    Err(error) => server::text(
                        StatusCode::BAD_REQUEST,
                        format!("{error}\nthe log level stays {}\n\n{LOGGING_USAGE}", logging.current()),
                    ),
                }
            }
            // As ztunnel: only POST, which without parameters lists the level.
            _ => {
                let mut response = server::text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("Invalid HTTP method\n\n{LOGGING_USAGE}"),
                );
                response
                    .headers_mut()
                    .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
                response
            }
        }
    }

    fn quit(&self, request: &Request<()>) -> Response<Bytes> {
        if request.method() != Method::POST {
            return server::method_not_allowed(request, &[Method::POST]);
        }
        tracing::info!("shutdown asked for on /quitquitquit");
        self.shutdown.trigger("/quitquitquit");
        server::text(StatusCode::OK, "draining, then exiting\n")
    }
}

impl Handler for AdminHandler {
    fn handle(&self, request: &Request<()>) -> Response<Bytes> {
        self.respond(request).map(Body::collect)
    }

    fn respond_later(&self, request: &Request<()>) -> Option<server::LaterResponse> {
        if request.uri().path() != "/debug/pprof/profile" || !server::is_read(request) {
            return None;
        }
        let duration = match profile::requested_seconds(server::query_param(request, "seconds").as_deref()) {
            Ok(duration) => duration,
            Err(error) => {
                let answer = server::text(StatusCode::BAD_REQUEST, format!("{error}\n")).map(Body::from);
                return Some(Box::pin(std::future::ready(answer)));
            }
        };
        Some(Box::pin(async move {
            tracing::info!(
                seconds = duration.as_secs(),
                "CPU profile asked for on /debug/pprof/profile"
            );
            match profile::cpu_profile(duration).await {
                Ok(bytes) => {
                    let mut response = Response::new(Body::from(Bytes::from(bytes)));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
                    response
                }
                Err(error) => server::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).map(Body::from),
            }
        }))
    }

    fn respond(&self, request: &Request<()>) -> Response<Body> {
        let whole = match request.uri().path() {
            "/" | "/config_dump" | "/debug/pprof/profile" if !server::is_read(request) => {
                server::method_not_allowed(request, &[Method::GET, Method::HEAD])
            }
            "/" => self.index(),
            "/config_dump" => return self.config_dump(),
            "/logging" => self.logging(request),
            "/quitquitquit" => self.quit(request),
            _ => server::not_found(request),
        };
        whole.map(Body::from)
    }
}

impl fmt::Debug for AdminHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminHandler")
            .field("published", &self.published)
            .field("shutdown", &self.shutdown)
            .field("logging", &self.logging)
            .finish_non_exhaustive()
    }
}
