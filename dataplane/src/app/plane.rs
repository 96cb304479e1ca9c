//! The control plane both binaries share, on tokio: the local configuration (loaded and watched),
//! the certificate source and manager, the decisions taken once at start (whose connections, the
//! packet mark, the access log format), and the readiness, admin and metrics listeners.
//!
//! [`ControlPlane::start`] builds it inside a tokio runtime (the `ztunnel` binary's multi-thread
//! runtime, or the single control thread of the io_uring build); the data path reads what it
//! needs through [`ProxyContext`], which is `Send + Sync` and never blocks: snapshots are
//! published lock-free, certificates are read from the manager's slots.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwire_hbone::budget::BufferBudget;
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::PoolConfig;
use meshwire_hbone::server::ServeOptions;
use meshwire_identity::id::SpiffeId;
use meshwire_identity::manager::{CertManager, ManagerConfig};
use meshwire_identity::source::files::{FilePaths, FileSource};
use meshwire_identity::source::istio_ca::{self, IstioCa};
use meshwire_identity::source::local_ca::{LocalCa, LocalCaError};
use meshwire_identity::source::{CertSource, Credentials, LocalCaOrFiles, SourceError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::istio::{self as istiod, IstioCaClient, Xds};
use crate::admin::{self, AdminHandler, LogControl, MetricsHandler, Readiness, ReadinessHandler, ReadyBlocker};
use crate::config::{CertificateSource, Config, Listener, LocalConfigSource, PacketMark, ProxyMode};
use crate::proxy::outbound::{CertManagerTls, SourceWorkload};
use crate::rt::connector::ConnectorConfig;
use crate::rt::socket::{DefaultSocketFactory, SocketOptions, check_mark, check_port_free};
use crate::rt::tokio::{TokioTimer, bind_listener};
use crate::state::LocalProxy;
use crate::watch::{ConfigWatcher, ConnectionRegistry, Published, Snapshot, log_warnings};
use crate::xds::{ConfigError, LocalConfig};

/// How often the local configuration file is polled for changes where inotify is unavailable (it is
/// watched with inotify otherwise; see [`ConfigWatcher::run`]).
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The local configuration cannot be read or is invalid (the error names the field and line).
    #[error("invalid local configuration: {0}")]
    LocalConfig(Box<ConfigError>),
    /// The local CA cannot be loaded or created (its message names the local CA and the file).
    #[error(transparent)]
    LocalCa(#[from] LocalCaError),
    /// The dedicated workload has no valid identity.
    #[error("workload identity: {0}")]
    Identity(String),
    /// istiod's xDS or CA client cannot be set up from the configuration.
    #[error("istiod at {address}: {reason}")]
    Istiod {
        /// istiod's address, as configured.
        address: String,
        /// What is wrong.
        reason: String,
    },
    /// The packet mark was given explicitly and cannot be set (it needs `CAP_NET_ADMIN`).
    #[error("cannot set the packet mark {mark:#x} (--packet-mark, PACKET_MARK): {source}")]
    PacketMark {
        /// The mark.
        mark: u32,
        /// What failed.
        source: io::Error,
    },
    /// A listener's port is in use: another process (another instance of the proxy, most often)
    /// listens on it.
    #[error(
        "cannot listen for {listener} on {addr}: the port is in use by another process (another instance \
         of the proxy? --handover takes over from an instance that is draining)"
    )]
    PortInUse {
        /// The listener.
        listener: Listener,
        /// Its configured address.
        addr: SocketAddr,
    },
    /// A hand-over ([`Config::handover`]) waited in vain for the other instance to release a
    /// control listener's port.
    #[error("cannot take over {listener} on {addr}: the port was still in use after {within:?} (--handover)")]
    HandoverTimeout {
        /// The listener.
        listener: Listener,
        /// Its configured address.
        addr: SocketAddr,
        /// How long the hand-over waited.
        within: Duration,
    },
    /// The DNS proxy's upstream resolvers cannot be read.
    #[error("DNS proxy: {0}")]
    Dns(#[from] crate::dns::ResolvConfError),
    /// In-pod mode cannot start (the proxy's own network namespace cannot be opened).
    #[error("in-pod mode: {0}")]
    Inpod(String),
    /// A listener cannot be bound.
    #[error("cannot listen for {listener} on {addr}: {source}")]
    Bind {
        /// The listener.
        listener: Listener,
        /// Its configured address.
        addr: SocketAddr,
        /// What failed.
        source: io::Error,
    },
}

impl From<ConfigError> for StartError {
    fn from(error: ConfigError) -> Self {
        StartError::LocalConfig(Box::new(error))
    }
}

/// The certificate source the binaries use: the local CA, PEM files, or the Istio CA.
#[derive(Debug)]
pub enum Certificates {
    /// The local CA or PEM files (boxed: the variants differ much in size, and the source is built
    /// once).
    Local(Box<LocalCaOrFiles>),
    /// istiod's CA (`CreateCertificate`), asked over gRPC.
    Istio(IstioCa<IstioCaClient, TokioTimer>),
}

impl CertSource for Certificates {
    async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
        match self {
            Self::Local(local) => local.fetch(id).await,
            Self::Istio(ca) => ca.fetch(id).await,
        }
    }

    fn poll_interval(&self) -> Option<Duration> {
        match self {
            Self::Local(local) => local.poll_interval(),
            Self::Istio(ca) => ca.poll_interval(),
        }
    }
}

impl Certificates {
    /// The Istio CA's address, when certificates come from it.
    pub fn istio_ca(&self) -> Option<String> {
        match self {
            Self::Istio(ca) => Some(ca.authority().address()),
            Self::Local(_) => None,
        }
    }
}

/// Opens the certificate source `config` names: loads (or creates) the local CA in its directory,
/// issuing certificates for [`Config::cert_ttl`], prepares reading the certificate files, or sets up
/// the Istio CA client (certificates asked for [`Config::cert_ttl`], impersonating the workloads of
/// the node in shared mode).
pub fn open_certificates(config: &Config) -> Result<Certificates, StartError> {
    Ok(match &config.certificates {
        CertificateSource::LocalCa { dir } => Certificates::Local(Box::new(LocalCaOrFiles::LocalCa(
            LocalCa::load_or_create(dir, config.trust_domain.clone())?.with_lifetime(config.cert_ttl),
        ))),
        CertificateSource::Files { chain, key, bundle } => {
            Certificates::Local(Box::new(LocalCaOrFiles::Files(FileSource::new(FilePaths {
                cert_chain: chain.clone(),
                private_key: key.clone(),
                trust_bundle: bundle.clone(),
            }))))
        }
        CertificateSource::IstioCa(ca) => {
            let mode = match config.mode {
                ProxyMode::Shared { .. } => istio_ca::ProxyMode::Shared,
                ProxyMode::Dedicated { .. } => istio_ca::ProxyMode::Dedicated,
            };
            tracing::info!(ca = %ca.address, ?mode, "certificates come from the Istio CA");
            Certificates::Istio(
                IstioCa::new(IstioCaClient::new(config, ca)?, TokioTimer, mode).with_validity(config.cert_ttl),
            )
        }
    })
}

/// The certificate manager of the binaries; its driver runs on the control plane's runtime, and
/// any thread reads certificates from it.
pub type Manager = CertManager<Certificates, TokioTimer>;

/// The client TLS configs of the binaries' HBONE pools.
pub type ProxyTls = CertManagerTls<Certificates, TokioTimer>;

/// What every connection of the proxy reads, on any runtime and any core: the published
/// configuration, the certificates, and the decisions taken at start. `Send + Sync`; nothing in
/// it blocks a data-path thread.
pub struct ProxyContext {
    published: Published,
    proxy: LocalProxy,
    manager: Manager,
    /// The identity of the dedicated workload; `None` in shared mode.
    dedicated: Option<SpiffeId>,
    source: SourceWorkload,
    serve_options: ServeOptions,
    /// Options of the proxy's upstream connections (the packet mark).
    upstream: SocketOptions,
    pool: PoolConfig,
    /// istiod's xDS stream, when it configures the proxy.
    xds: Option<meshwire_control::ads::AdsStatus>,
    /// How istiod's pushes are applied (for `/config_dump`), when istiod configures the proxy.
    xds_apply: Option<istiod::ApplyView>,
    /// The Istio CA's address, when certificates come from it.
    istio_ca: Option<String>,
    /// `ENABLE_ORIG_SRC`, when set.
    original_source: Option<bool>,
}

impl std::fmt::Debug for ProxyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyContext")
            .field("proxy", &self.proxy)
            .field("dedicated", &self.dedicated)
            .field("source", &self.source)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl ProxyContext {
    /// The published configuration.
    pub fn published(&self) -> &Published {
        &self.published
    }

    /// The proxy's own description (its node, network, mode).
    pub fn local_proxy(&self) -> &LocalProxy {
        &self.proxy
    }

    /// The certificate manager.
    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    /// The identity of the dedicated workload (`None` in shared mode).
    pub fn dedicated(&self) -> Option<&SpiffeId> {
        self.dedicated.as_ref()
    }

    /// Whose outbound connections the outbound listeners carry.
    pub fn source(&self) -> &SourceWorkload {
        &self.source
    }

    /// The options of inbound HBONE connections (HTTP/2 settings, copy buffers).
    pub fn serve_options(&self) -> &ServeOptions {
        &self.serve_options
    }

    /// The options of the proxy's upstream connections (the packet mark).
    pub fn upstream(&self) -> &SocketOptions {
        &self.upstream
    }

    /// Whether connections to destination workloads leave from the client's address
    /// (`ENABLE_ORIG_SRC`): as set, or when not set, for a pod's workers in in-pod mode (where
    /// istio-cni's rules route the replies back to the proxy) and not for the node's.
    pub fn original_source(&self, in_pod: bool) -> bool {
        self.original_source.unwrap_or(in_pod)
    }

    /// The status of istiod's xDS stream, when istiod configures the proxy.
    pub fn xds(&self) -> Option<&meshwire_control::ads::AdsStatus> {
        self.xds.as_ref()
    }

    /// The HBONE pool's settings.
    pub fn pool_config(&self) -> &PoolConfig {
        &self.pool
    }

    /// The client TLS configs for an HBONE pool.
    pub fn client_tls(&self) -> ProxyTls {
        CertManagerTls::new(self.manager.clone())
    }

    /// The settings of an HBONE pool's connector (upstream socket options).
    pub fn connector_config(&self) -> ConnectorConfig {
        ConnectorConfig {
            socket: self.upstream.clone(),
            ..ConnectorConfig::default()
        }
    }
}

/// The control plane: the context every connection reads, and the tasks that keep it current
/// (the configuration watcher, the certificate manager's driver) on the tokio runtime it was
/// started in.
pub struct ControlPlane {
    context: Arc<ProxyContext>,
    background: Vec<JoinHandle<()>>,
    xds: Option<Xds>,
    /// What renders `/config_dump`'s `workloadState`, set by in-pod mode once it starts.
    workload_state: Arc<std::sync::OnceLock<admin::IstioDump>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("context", &self.context)
            .field("background", &self.background)
            .field("xds", &self.xds)
            .field("workload_state", &self.workload_state.get().is_some())
            .finish()
    }
}

impl ControlPlane {
    /// Loads the local configuration (and starts watching it, re-evaluating the connections of
    /// every registry in `registries` at each change), opens the certificate source and starts its
    /// manager, and decides whose connections the proxy carries and their packet mark. Call inside
    /// a tokio runtime with IO and time enabled: the watcher and the manager run on it.
    pub async fn start(config: &Config, registries: &[ConnectionRegistry]) -> Result<ControlPlane, StartError> {
        let mut background = Vec::new();
        // The control thread gives back its allocator cache once it goes quiet.
        background.push(tokio::spawn(super::thread_cache::keep_released(TokioTimer)));

        // The local configuration, watched when it is a file.
        let published = match &config.local_config {
            Some(LocalConfigSource::File(path)) => {
                let (watcher, published) = ConfigWatcher::start(path)?;
                let watcher = registries
                    .iter()
                    .fold(watcher, |watcher, registry| watcher.with_registry(registry.clone()));
                background.push(tokio::spawn(async move {
                    watcher.run(TokioTimer, CONFIG_POLL_INTERVAL).await;
                }));
                published
            }
            Some(LocalConfigSource::Inline(yaml)) => {
                let (parsed, warnings) = LocalConfig::parse_with_warnings(yaml)?;
                log_warnings(None, &warnings);
                Published::new(Snapshot::new(parsed, 1, None, SystemTime::now()))
            }
            None if config.istio.xds.is_some() => Published::default(),
            None => {
                tracing::warn!(
                    "no local configuration (--config, LOCAL_XDS_PATH) and no istiod (XDS_ADDRESS): serving no \
                     workloads"
                );
                Published::default()
            }
        };

        // Certificates.
        let certificates = open_certificates(config)?;
        let istio_ca = certificates.istio_ca();
        let manager: Manager = CertManager::new(certificates, TokioTimer, ManagerConfig::default());
        let driver = manager.clone();
        background.push(tokio::spawn(async move { driver.run().await }));

        // istiod's workloads and policies.
        let xds = match &config.istio.xds {
            Some(plane) => Some(Xds::start(
                config,
                plane,
                published.clone(),
                registries,
                manager.clone(),
            )?),
            None => None,
        };

        let dedicated = match &config.mode {
            ProxyMode::Dedicated { workload } => Some(SpiffeId::from(
                workload
                    .identity(&config.trust_domain)
                    .map_err(|e| StartError::Identity(format!("{workload}: {e}")))?,
            )),
            ProxyMode::Shared { .. } => None,
        };
        if let Some(id) = &dedicated {
            manager.warm_up(id);
        }
        let source = match &config.mode {
            ProxyMode::Dedicated { workload } => {
                if published
                    .load()
                    .state
                    .workload_by_name(&workload.namespace, &workload.name)
                    .is_none()
                {
                    tracing::warn!(
                        %workload,
                        "the dedicated workload is not in the local configuration (yet): the proxy is not \
                         ready and its connections are refused until it is"
                    );
                }
                SourceWorkload::Dedicated {
                    namespace: workload.namespace.clone(),
                    name: workload.name.clone(),
                }
            }
            ProxyMode::Shared { .. } => SourceWorkload::Shared,
        };

        let upstream = SocketOptions {
            mark: packet_mark(config.packet_mark)?,
            ..SocketOptions::default()
        };
        let context = Arc::new(ProxyContext {
            proxy: config.local_proxy(),
            published,
            manager,
            dedicated,
            source,
            serve_options: ServeOptions {
                settings: config.http2().clone(),
                copy: CopyConfig::default(),
                connection_buffer: config.buffers.connection,
                process_budget: Arc::new(BufferBudget::new(config.buffers.process)),
                receive_budget: Arc::new(BufferBudget::new(config.buffers.receive)),
            },
            upstream,
            pool: config.pool.clone(),
            xds: xds.as_ref().map(|x| x.status().clone()),
            xds_apply: xds.as_ref().map(Xds::apply_view),
            istio_ca,
            original_source: config.original_source,
        });
        Ok(ControlPlane {
            context,
            background,
            xds,
            workload_state: Arc::default(),
        })
    }

    /// The context connections read.
    pub fn context(&self) -> &Arc<ProxyContext> {
        &self.context
    }

    /// Makes `/config_dump` show `workloadState`, rendered by `state` at each request (in-pod
    /// mode: the pods it serves). Set once; a second call is ignored.
    pub fn set_workload_state(&self, state: admin::IstioDump) {
        let _ = self.workload_state.set(state);
    }

    /// Serves readiness, admin and metrics on their bound listeners (on the current tokio
    /// runtime); the metrics endpoint answers `metrics` (the connection counters, summed over the
    /// cores where each core counts in its own) with the build and configuration gauges. Readiness
    /// waits for the local configuration and the returned blocker (to drop once every listener is
    /// bound); in dedicated mode it also requires, at every probe, the workload in the
    /// configuration and its certificate valid.
    pub fn serve_control(
        &self,
        config: &Config,
        listeners: ControlListeners,
        metrics: MetricsHandler,
        logging: Option<LogControl>,
    ) -> (Control, ReadyBlocker) {
        Control::start(
            config,
            &self.context,
            metrics,
            logging,
            listeners,
            self.workload_state.clone(),
        )
    }

    /// Stops the configuration watcher and the certificate manager.
    pub fn stop(self) {
        self.context.manager.shutdown();
        if let Some(xds) = &self.xds {
            xds.stop();
        }
        for task in &self.background {
            task.abort();
        }
    }
}

/// Binds `addr` for the data listener `listener` with `SO_REUSEPORT` (so that a new instance can
/// take over the port while this one drains, and the io_uring build's cores can each have a socket)
/// as a tokio listener, and records the address it is bound to in `bound`.
pub fn bind_tokio(
    listener: Listener,
    addr: SocketAddr,
    bound: &mut Vec<(Listener, SocketAddr)>,
) -> Result<TcpListener, StartError> {
    let opts = SocketOptions {
        reuse_port: true,
        ..SocketOptions::default()
    };
    bind_with(listener, addr, &opts, bound)
}

/// Binds `addr` for `listener` with `opts` as a tokio listener and records it in `bound`.
fn bind_with(
    listener: Listener,
    addr: SocketAddr,
    opts: &SocketOptions,
    bound: &mut Vec<(Listener, SocketAddr)>,
) -> Result<TcpListener, StartError> {
    let tcp = bind_listener(&DefaultSocketFactory, addr, opts).map_err(|source| bind_error(listener, addr, source))?;
    bound.push((listener, tcp.local_addr().unwrap_or(addr)));
    Ok(tcp)
}

/// [`StartError::PortInUse`] when the port is taken, [`StartError::Bind`] otherwise.
fn bind_error(listener: Listener, addr: SocketAddr, source: io::Error) -> StartError {
    if source.kind() == io::ErrorKind::AddrInUse {
        StartError::PortInUse { listener, addr }
    } else {
        StartError::Bind { listener, addr, source }
    }
}

/// How often a taking-over instance tries again to bind a control listener the other instance
/// still holds.
const HANDOVER_RETRY: Duration = Duration::from_millis(100);

/// The bound control listeners.
///
/// They are bound without `SO_REUSEPORT`, so that a second instance on the same ports fails at
/// start naming the port rather than sharing the admin, metrics and readiness endpoints with the
/// first. A hand-over ([`Config::handover`]) shares the data listeners at once and binds the control
/// listeners when the other instance releases them. The order, in both binaries:
/// [`ControlListeners::bind_before_data`], then the data listeners, then
/// [`ControlListeners::bind_after_data`].
#[derive(Debug)]
pub struct ControlListeners {
    /// Readiness (15021).
    pub readiness: TcpListener,
    /// Admin (15000).
    pub admin: TcpListener,
    /// Admin on `[::1]` as well, on the same port, when the admin address is IPv4 loopback and IPv6
    /// is on (ztunnel's `localhost:15000`); `None` where the host has no IPv6 loopback.
    pub admin_v6: Option<TcpListener>,
    /// Metrics (15020).
    pub metrics: TcpListener,
}

impl ControlListeners {
    /// Binds the three control listeners of `config`, exclusively (no `SO_REUSEPORT`): a port in
    /// use fails with [`StartError::PortInUse`].
    pub fn bind(config: &Config, bound: &mut Vec<(Listener, SocketAddr)>) -> Result<Self, StartError> {
        let opts = SocketOptions::default();
        let readiness = bind_with(Listener::Readiness, config.listeners.readiness, &opts, bound)?;
        let admin = bind_with(Listener::Admin, config.listeners.admin, &opts, bound)?;
        let admin_v6 = match admin.local_addr() {
            Ok(SocketAddr::V4(v4)) if v4.ip().is_loopback() && config.listeners.ipv6 => {
                let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v4.port()));
                let opts = SocketOptions {
                    v6_only: Some(true),
                    ..SocketOptions::default()
                };
                match bind_listener(&DefaultSocketFactory, addr, &opts) {
                    Ok(tcp) => {
                        bound.push((Listener::Admin, addr));
                        Some(tcp)
                    }
                    Err(error) => {
                        tracing::info!(%addr, %error, "the admin listener is on IPv4 loopback only");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(ControlListeners {
            readiness,
            admin,
            admin_v6,
            metrics: bind_with(Listener::Metrics, config.listeners.metrics, &opts, bound)?,
        })
    }

    /// What a binary does before binding its data listeners. Without a hand-over: binds the control
    /// listeners, and checks that no other socket listens on a data listener's port (which
    /// `SO_REUSEPORT` would otherwise share with it), so that a second instance fails at start
    /// naming the port and binds nothing. With a hand-over: nothing (`None`); the data listeners are
    /// shared with the instance being replaced.
    pub fn bind_before_data(
        config: &Config,
        bound: &mut Vec<(Listener, SocketAddr)>,
    ) -> Result<Option<Self>, StartError> {
        if config.handover.is_some() {
            return Ok(None);
        }
        let control = Self::bind(config, bound)?;
        for (listener, addr) in config.listeners.data() {
            check_port_free(addr).map_err(|source| bind_error(listener, addr, source))?;
        }
        Ok(Some(control))
    }

    /// What a binary does once its data listeners are bound: the control listeners bound by
    /// [`ControlListeners::bind_before_data`], or in a hand-over, binds them, trying again every
    /// 100 ms while the other instance holds a port, for up to [`Config::handover`]. Call inside a
    /// tokio runtime with time enabled.
    pub async fn bind_after_data(
        config: &Config,
        bound: &mut Vec<(Listener, SocketAddr)>,
        early: Option<Self>,
    ) -> Result<Self, StartError> {
        if let Some(control) = early {
            return Ok(control);
        }
        let within = config.handover.unwrap_or_default();
        tracing::info!(
            ?within,
            "taking over: serving the data listeners; binding the readiness, admin and metrics listeners \
             once the other instance releases them"
        );
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut attempt = Vec::new();
            match Self::bind(config, &mut attempt) {
                Ok(control) => {
                    bound.extend(attempt);
                    tracing::info!("took over the readiness, admin and metrics listeners");
                    return Ok(control);
                }
                Err(StartError::PortInUse { listener, addr }) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%listener, %addr, "control port still held by the other instance");
                    tokio::time::sleep(HANDOVER_RETRY).await;
                }
                Err(StartError::PortInUse { listener, addr }) => {
                    return Err(StartError::HandoverTimeout { listener, addr, within });
                }
                Err(other) => return Err(other),
            }
        }
    }
}

/// The control listeners (readiness, admin, metrics) and the tasks that make the proxy ready.
#[derive(Debug)]
pub struct Control {
    readiness: Readiness,
    trigger: admin::ShutdownTrigger,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    waiters: Vec<JoinHandle<()>>,
}

impl Control {
    fn start(
        config: &Config,
        context: &ProxyContext,
        metrics: MetricsHandler,
        logging: Option<LogControl>,
        bound: ControlListeners,
        workload_state: Arc<std::sync::OnceLock<admin::IstioDump>>,
    ) -> (Control, ReadyBlocker) {
        let readiness = Readiness::new();
        let listeners_bound = readiness.block("listeners");
        let mut waiters = Vec::new();
        if config.local_config.is_some() {
            let blocker = readiness.block("local configuration");
            let published = context.published.clone();
            waiters.push(tokio::spawn(async move {
                admin::config_loaded(&published).await;
                blocker.ready();
            }));
        }
        // Dedicated mode: ready only while the workload is in the configuration and its certificate
        // is valid. Both can come and go, so they are checks evaluated at every probe; they read
        // state only (the manager fetches and retries on its own back-off schedule).
        if let Some(id) = context.dedicated.clone() {
            let manager = context.manager.clone();
            readiness.check(move || admin::certificate_pending(&id, manager.status_for(&id), SystemTime::now()));
        }
        // Configured by istiod: ready once a first push of every type was accepted (ACKed).
        if let Some(status) = context.xds.clone() {
            readiness.check(move || istiod::not_ready(&status));
        }
        if let SourceWorkload::Dedicated { namespace, name } = &context.source {
            let (namespace, name) = (namespace.clone(), name.clone());
            let published = context.published.clone();
            readiness.check(move || {
                let known = published.load().state.workload_by_name(&namespace, &name).is_some();
                (!known).then(|| format!("dedicated workload {namespace}/{name} (not in the local configuration)"))
            });
        }

        let trigger = admin::ShutdownTrigger::new();
        let mut admin = AdminHandler::new(
            context.published.clone(),
            Arc::new(context.manager.clone()),
            trigger.clone(),
        );
        if let Some(logging) = logging {
            admin = admin.with_logging(logging);
        }
        admin = admin
            .with_buffers(context.serve_options.clone())
            .with_config(config)
            .with_workload_state(workload_state);
        let mut metrics = metrics;
        if let Some(status) = &context.xds {
            admin = admin.with_istio(istiod::dump(
                status.clone(),
                context.xds_apply.clone(),
                context.istio_ca.clone(),
            ));
            let (registry, refresh) = istiod::metrics(status.clone());
            metrics = metrics.with_refreshed(registry, refresh);
        } else if let Some(ca) = &context.istio_ca {
            let ca = ca.clone();
            admin = admin.with_istio(Arc::new(
                move || serde_json::json!({ "xds": null, "ca": { "address": ca } }),
            ));
        }
        let (stop, _) = watch::channel(false);
        let servers = vec![
            Self::serve(
                "readiness",
                bound.readiness,
                ReadinessHandler::new(readiness.clone()),
                &stop,
            ),
            Self::serve("admin", bound.admin, admin.clone(), &stop),
            Self::serve(
                "metrics",
                bound.metrics,
                metrics.with_config(context.published.clone()).with_buffers(
                    context.serve_options.process_budget.clone(),
                    context.serve_options.receive_budget.clone(),
                ),
                &stop,
            ),
        ];
        let mut servers = servers;
        if let Some(tcp) = bound.admin_v6 {
            servers.push(Self::serve("admin", tcp, admin, &stop));
        }
        let control = Control {
            readiness,
            trigger,
            stop,
            servers,
            waiters,
        };
        (control, listeners_bound)
    }

    /// Whether the proxy is ready (what the readiness endpoint answers).
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The trigger `POST /quitquitquit` pulls.
    pub fn trigger(&self) -> &admin::ShutdownTrigger {
        &self.trigger
    }

    /// Spawns the server of `handler` on `tcp`, stopping with `stop`.
    fn serve(
        name: &'static str,
        tcp: TcpListener,
        handler: impl admin::Handler,
        stop: &watch::Sender<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(admin::serve(name, tcp, handler, shutdown_signal(stop.subscribe())))
    }

    /// Stops the servers (letting requests in progress finish) and the readiness tasks.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        for waiter in &self.waiters {
            waiter.abort();
        }
    }
}

/// Resolves when `rx` says shutdown (or its sender is gone). Runtime-independent: it works on any
/// executor.
pub async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The firewall mark of the proxy's upstream connections: see [`PacketMark`].
fn packet_mark(setting: PacketMark) -> Result<Option<u32>, StartError> {
    let Some(mark) = setting.value() else {
        return Ok(None);
    };
    match check_mark(mark) {
        Ok(()) => {
            tracing::info!(mark = %format_args!("{mark:#x}"), "upstream connections carry the packet mark");
            Ok(Some(mark))
        }
        Err(error) if setting == PacketMark::Auto => {
            tracing::warn!(
                mark = %format_args!("{mark:#x}"),
                %error,
                "cannot set the packet mark (it needs CAP_NET_ADMIN): upstream connections go out unmarked; \
                 do not redirect this proxy's traffic with firewall rules, they would capture it again \
                 (--packet-mark none silences this)"
            );
            Ok(None)
        }
        Err(source) => Err(StartError::PacketMark { mark, source }),
    }
}
