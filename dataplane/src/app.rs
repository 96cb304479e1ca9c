//! The wiring of the tokio binary: from a validated [`Config`] to running listeners, and back down
//! through a bounded drain.
//!
//! [`Proxy::start`] loads the local configuration (and keeps watching it), opens the certificate
//! source, starts the certificate manager, binds the listeners and spawns their accept loops; it must
//! be called inside a tokio runtime with IO and time enabled. [`Proxy::drain`] stops accepting,
//! tells the HBONE connections to drain, and waits up to the drain deadline for the connections to end.
//!
//! Listeners served now: inbound HBONE, the outbound SOCKS5 listener, and the control listeners
//! (readiness, admin, metrics: see [`crate::admin`]). The outbound capture (15001), inbound plaintext
//! (15006) and DNS listeners are not bound yet.
//!
//! Known limits: in dedicated mode the SOCKS5 source workload is looked up (by namespace and name) in
//! the configuration loaded at startup; a later change to that workload's uid is not followed.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::{Pool, PoolConfig};
use meshwire_hbone::server::{self, ServeOptions};
use meshwire_identity::id::SpiffeId;
use meshwire_identity::manager::{CertManager, ManagerConfig, Priority};
use meshwire_identity::source::files::{FilePaths, FileSource};
use meshwire_identity::source::local_ca::{LocalCa, LocalCaError};
use meshwire_identity::source::{CertSource, Credentials, SourceError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminHandler, LogControl, MetricsHandler, Readiness, ReadinessHandler, ReadyBlocker};
use crate::config::{self, CertificateSource, Config, Listener, LocalConfigSource, ProxyMode};
use crate::proxy::inbound::InboundHandler;
use crate::proxy::outbound::{CertManagerTls, HbonePool, Outbound, SourceWorkload};
use crate::rt::socket::{DefaultSocketFactory, SocketOptions};
use crate::rt::tokio::{ConnectorConfig, TokioConnector, TokioExecutor, TokioTimer, bind_listener};
use crate::state::LocalProxy;
use crate::telemetry::accesslog;
use crate::telemetry::metrics::Metrics;
use crate::watch::{ConfigWatcher, ConnectionRegistry, Published, Snapshot};
use crate::xds::{ConfigError, LocalConfig};

/// How often the local configuration file is polled for changes.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The local configuration cannot be read or is invalid (the error names the field and line).
    #[error("invalid local configuration: {0}")]
    LocalConfig(Box<ConfigError>),
    /// The local CA cannot be loaded or created.
    #[error("local CA: {0}")]
    LocalCa(#[from] LocalCaError),
    /// The dedicated workload has no valid identity.
    #[error("workload identity: {0}")]
    Identity(String),
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

/// The certificate source the binary uses: the local CA or PEM files.
#[derive(Debug, Clone)]
pub enum Certificates {
    /// A CA kept in the state directory.
    LocalCa(Arc<LocalCa>),
    /// Certificates read from files.
    Files(Arc<FileSource>),
}

impl CertSource for Certificates {
    async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
        match self {
            Certificates::LocalCa(ca) => ca.fetch(id).await,
            Certificates::Files(files) => files.fetch(id).await,
        }
    }

    fn poll_interval(&self) -> Option<Duration> {
        match self {
            Certificates::LocalCa(ca) => ca.poll_interval(),
            Certificates::Files(files) => files.poll_interval(),
        }
    }
}

impl Certificates {
    /// Opens the source `config` names: loads (or creates) the local CA in its directory, or
    /// prepares reading the certificate files.
    pub fn open(config: &Config) -> Result<Self, StartError> {
        Ok(match &config.certificates {
            CertificateSource::LocalCa { dir } => {
                Certificates::LocalCa(Arc::new(LocalCa::load_or_create(dir, config.trust_domain.clone())?))
            }
            CertificateSource::Files { chain, key, bundle } => {
                Certificates::Files(Arc::new(FileSource::new(FilePaths {
                    cert_chain: chain.clone(),
                    private_key: key.clone(),
                    trust_bundle: bundle.clone(),
                })))
            }
        })
    }
}

type Manager = CertManager<Certificates, TokioTimer>;

/// Shared by every connection task.
struct Shared {
    published: Published,
    proxy: LocalProxy,
    manager: Manager,
    metrics: Arc<Metrics>,
    registry: ConnectionRegistry,
    /// The identity of the dedicated workload; `None` in shared mode.
    dedicated: Option<SpiffeId>,
    serve_options: ServeOptions,
    log_format: accesslog::LogFormat,
}

/// A running proxy: its listeners, background tasks and drain machinery.
pub struct Proxy {
    listeners: Vec<(Listener, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    accept_loops: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    /// Every connection task holds a clone; `recv` returns `None` once all are gone.
    connections: mpsc::Receiver<()>,
    manager: Manager,
    drain_deadline: Duration,
    control: Control,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("listeners", &self.listeners)
            .field("drain_deadline", &self.drain_deadline)
            .finish_non_exhaustive()
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection ended before the deadline.
    Complete,
    /// The deadline passed with connections still open; they are abandoned.
    DeadlineReached,
}

impl Proxy {
    /// Starts the proxy of `config`: loads the local configuration, opens certificates, binds the
    /// inbound HBONE, SOCKS5, readiness, admin and metrics listeners and starts serving. Call inside
    /// a tokio runtime. The admin `/logging` endpoint answers 501: see [`Proxy::start_with_logging`].
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        Self::start_with_logging(config, None).await
    }

    /// [`Proxy::start`], with the handle through which the admin `/logging` endpoint reads and
    /// changes the process's log filter.
    pub async fn start_with_logging(config: Config, logging: Option<LogControl>) -> Result<Proxy, StartError> {
        let config = Arc::new(config);
        let registry = ConnectionRegistry::new();
        let mut background = Vec::new();

        // The local configuration, watched when it is a file.
        let published = match &config.local_config {
            Some(LocalConfigSource::File(path)) => {
                let (watcher, published) = ConfigWatcher::start(path)?;
                let watcher = watcher.with_registry(registry.clone());
                background.push(tokio::spawn(async move {
                    watcher.run(TokioTimer, CONFIG_POLL_INTERVAL).await;
                }));
                published
            }
            Some(LocalConfigSource::Inline(yaml)) => {
                let parsed = LocalConfig::parse(yaml)?;
                Published::new(Snapshot::new(parsed, 1, None, SystemTime::now()))
            }
            None => {
                tracing::warn!("no local configuration (--config, LOCAL_XDS_PATH): serving no workloads");
                Published::default()
            }
        };

        // Certificates.
        let certificates = Certificates::open(&config)?;
        let manager: Manager = CertManager::new(certificates, TokioTimer, ManagerConfig::default());
        let driver = manager.clone();
        background.push(tokio::spawn(async move { driver.run().await }));

        let dedicated = match &config.mode {
            ProxyMode::Dedicated { workload } => Some(SpiffeId::from(
                workload
                    .identity(&config.trust_domain)
                    .map_err(|e| StartError::Identity(format!("{workload}: {e}")))?,
            )),
            _ => None,
        };
        if let Some(id) = &dedicated {
            manager.warm_up(id);
        }
        let source = match &config.mode {
            ProxyMode::Dedicated { workload } => {
                let snapshot = published.load();
                let found = snapshot
                    .state
                    .workloads()
                    .iter()
                    .find(|w| w.name == workload.name && w.identity().namespace() == workload.namespace);
                match found {
                    Some(w) => SourceWorkload::Dedicated(w.uid.clone()),
                    None => {
                        tracing::warn!(
                            %workload,
                            "the dedicated workload is not in the local configuration: SOCKS5 connections will fail"
                        );
                        SourceWorkload::Dedicated(format!("{}/{}", workload.namespace, workload.name))
                    }
                }
            }
            _ => SourceWorkload::Shared,
        };

        let shared = Arc::new(Shared {
            proxy: config.local_proxy(),
            published: published.clone(),
            manager: manager.clone(),
            metrics: Arc::new(Metrics::new()),
            registry,
            dedicated,
            serve_options: ServeOptions {
                settings: config.http2().clone(),
                copy: CopyConfig::default(),
            },
            log_format: match config.log_format {
                config::LogFormat::Json => accesslog::LogFormat::Json,
                _ => accesslog::LogFormat::Text,
            },
        });

        let (shutdown, _) = watch::channel(false);
        let (conn_tx, connections) = mpsc::channel::<()>(1);
        let mut listeners = Vec::new();
        let mut accept_loops = Vec::new();
        // SO_REUSEPORT: a new instance binds the same ports while this one drains, so a restart
        // refuses no connection.
        let opts = SocketOptions {
            reuse_port: true,
            ..SocketOptions::default()
        };

        let bind = |listener: Listener, addr: SocketAddr| {
            bind_listener(&DefaultSocketFactory, addr, &opts).map_err(|source| StartError::Bind {
                listener,
                addr,
                source,
            })
        };

        // Inbound HBONE.
        let inbound = bind(Listener::Inbound, config.listeners.inbound)?;
        listeners.push((Listener::Inbound, local_addr(&inbound, config.listeners.inbound)));
        accept_loops.push(tokio::spawn(accept_inbound(
            inbound,
            shared.clone(),
            shutdown.subscribe(),
            conn_tx.clone(),
        )));

        // Outbound SOCKS5.
        if let Some(addr) = config.listeners.socks5 {
            let socks = bind(Listener::Socks5, addr)?;
            listeners.push((Listener::Socks5, local_addr(&socks, addr)));
            let pool_config: PoolConfig = config.pool.clone();
            let connector = TokioConnector::new(CertManagerTls::new(manager.clone()), ConnectorConfig::default());
            let pool: HbonePool<_> = Pool::new(connector, TokioExecutor::new(), TokioTimer, pool_config);
            let outbound = Arc::new(Outbound::new(
                published,
                shared.proxy.clone(),
                source,
                pool,
                CopyConfig::default(),
            ));
            accept_loops.push(tokio::spawn(accept_socks5(
                socks,
                outbound,
                shutdown.subscribe(),
                conn_tx.clone(),
            )));
        }
        drop(conn_tx);

        // Readiness, admin and metrics; the proxy is ready once this function returns.
        let (control, listeners_bound) = Control::start(&config, &shared, logging, &bind, &mut listeners)?;

        for (listener, addr) in &listeners {
            tracing::info!(%listener, %addr, "listening");
        }
        let skipped: Vec<String> = config
            .listeners
            .iter()
            .filter(|(l, _)| !listeners.iter().any(|(bound, _)| bound == l))
            .map(|(l, a)| format!("{l} ({a})"))
            .collect();
        if !skipped.is_empty() {
            tracing::info!(not_served = %skipped.join(", "), "listeners not implemented yet, not bound");
        }

        listeners_bound.ready();
        Ok(Proxy {
            listeners,
            shutdown,
            accept_loops,
            background,
            connections,
            manager,
            drain_deadline: config.drain_deadline,
            control,
        })
    }

    /// The listeners being served, with the addresses they are bound to.
    pub fn listeners(&self) -> &[(Listener, SocketAddr)] {
        &self.listeners
    }

    /// The trigger `POST /quitquitquit` pulls: resolves [`admin::ShutdownTrigger::triggered`] when
    /// the process should drain and exit. Signal handlers may pull it too.
    pub fn shutdown_trigger(&self) -> admin::ShutdownTrigger {
        self.control.trigger.clone()
    }

    /// Whether the proxy is ready (what the readiness endpoint answers).
    pub fn readiness(&self) -> &Readiness {
        &self.control.readiness
    }

    /// Stops accepting, asks the HBONE connections to drain, and waits up to the drain deadline
    /// for every connection to end; then stops the background tasks and the control listeners
    /// (readiness answers 503 from the start of the drain).
    pub async fn drain(mut self) -> Drained {
        tracing::info!(deadline = ?self.drain_deadline, "draining");
        self.control.readiness.set_draining();
        let _ = self.shutdown.send(true);
        for accept in self.accept_loops.drain(..) {
            let _ = accept.await;
        }
        let outcome = match tokio::time::timeout(self.drain_deadline, self.connections.recv()).await {
            Ok(_) => Drained::Complete,
            Err(_) => Drained::DeadlineReached,
        };
        self.manager.shutdown();
        for task in &self.background {
            task.abort();
        }
        self.control.stop().await;
        outcome
    }
}

/// The control listeners (readiness, admin, metrics) and the tasks that make the proxy ready.
struct Control {
    readiness: Readiness,
    trigger: admin::ShutdownTrigger,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    waiters: Vec<JoinHandle<()>>,
}

impl Control {
    /// How often a failed first fetch of the dedicated workload's certificate is retried.
    const CERTIFICATE_RETRY: Duration = Duration::from_secs(1);

    /// Binds and serves readiness, admin and metrics, adding them to `listeners`; readiness waits
    /// for the local configuration, the dedicated workload's first certificate, and the returned
    /// blocker (to drop once every listener is bound).
    fn start(
        config: &Config,
        shared: &Shared,
        logging: Option<LogControl>,
        bind: &dyn Fn(Listener, SocketAddr) -> Result<TcpListener, StartError>,
        listeners: &mut Vec<(Listener, SocketAddr)>,
    ) -> Result<(Control, ReadyBlocker), StartError> {
        // Bind all three before serving any, so that a failed bind leaves nothing running.
        let addrs = &config.listeners;
        let readiness_tcp = bind(Listener::Readiness, addrs.readiness)?;
        let admin_tcp = bind(Listener::Admin, addrs.admin)?;
        let metrics_tcp = bind(Listener::Metrics, addrs.metrics)?;

        let readiness = Readiness::new();
        let listeners_bound = readiness.block("listeners");
        let mut waiters = Vec::new();
        if config.local_config.is_some() {
            let blocker = readiness.block("local configuration");
            let published = shared.published.clone();
            waiters.push(tokio::spawn(async move {
                admin::config_loaded(&published).await;
                blocker.ready();
            }));
        }
        if let Some(id) = shared.dedicated.clone() {
            let blocker = readiness.block("workload certificate");
            let manager = shared.manager.clone();
            waiters.push(tokio::spawn(async move {
                if admin::certificate_obtained(&manager, &id, Self::CERTIFICATE_RETRY)
                    .await
                    .is_ok()
                {
                    blocker.ready();
                }
            }));
        }

        let trigger = admin::ShutdownTrigger::new();
        let mut admin = AdminHandler::new(
            shared.published.clone(),
            Arc::new(shared.manager.clone()),
            trigger.clone(),
        );
        if let Some(logging) = logging {
            admin = admin.with_logging(logging);
        }
        let (stop, _) = watch::channel(false);
        let servers = vec![
            Self::serve(
                listeners,
                Listener::Readiness,
                readiness_tcp,
                addrs.readiness,
                ReadinessHandler::new(readiness.clone()),
                &stop,
            ),
            Self::serve(listeners, Listener::Admin, admin_tcp, addrs.admin, admin, &stop),
            Self::serve(
                listeners,
                Listener::Metrics,
                metrics_tcp,
                addrs.metrics,
                MetricsHandler::new(shared.metrics.clone()).with_config(shared.published.clone()),
                &stop,
            ),
        ];
        let control = Control {
            readiness,
            trigger,
            stop,
            servers,
            waiters,
        };
        Ok((control, listeners_bound))
    }

    /// Spawns the server of `handler` on `tcp`, stopping with `stop`, and records the listener.
    fn serve(
        listeners: &mut Vec<(Listener, SocketAddr)>,
        listener: Listener,
        tcp: TcpListener,
        configured: SocketAddr,
        handler: impl admin::Handler,
        stop: &watch::Sender<bool>,
    ) -> JoinHandle<()> {
        listeners.push((listener, local_addr(&tcp, configured)));
        let name = match listener {
            Listener::Readiness => "readiness",
            Listener::Admin => "admin",
            Listener::Metrics => "metrics",
            _ => "control",
        };
        tokio::spawn(admin::serve(name, tcp, handler, shutdown_signal(stop.subscribe())))
    }

    /// Stops the servers (letting requests in progress finish) and the readiness tasks.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        for waiter in &self.waiters {
            waiter.abort();
        }
    }
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// Resolves when `rx` says shutdown (or its sender is gone).
async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn accept_inbound(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    conn_tx: mpsc::Sender<()>,
) {
    let stop = shutdown_signal(shutdown.clone());
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "inbound HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let arrived_on = match tcp.local_addr() {
            Ok(addr) => addr,
            Err(error) => {
                tracing::warn!(%peer, %error, "inbound HBONE connection has no local address");
                continue;
            }
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let guard = conn_tx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let id = match &shared.dedicated {
                Some(id) => id.clone(),
                None => {
                    let snapshot = shared.published.load();
                    match snapshot.state.inbound_workload(&shared.proxy, arrived_on.ip()) {
                        Some(workload) => workload.spiffe_id().clone(),
                        None => {
                            tracing::warn!(%peer, %arrived_on, "inbound HBONE connection to no served workload");
                            return;
                        }
                    }
                }
            };
            let tls = match shared.manager.get(&id, Priority::Connection).await {
                Ok(handle) => handle.current().server_config().clone(),
                Err(error) => {
                    tracing::warn!(%peer, %id, %error, "no certificate for inbound HBONE connection");
                    return;
                }
            };
            let handler = InboundHandler::new(
                shared.published.clone(),
                shared.proxy.clone(),
                arrived_on,
                shared.metrics.clone(),
                shared.registry.clone(),
                shared.log_format,
            )
            .with_peer_addr(peer);
            let result = server::serve(
                tcp,
                tls,
                &shared.serve_options,
                &handler,
                &TokioTimer,
                shutdown_signal(shutdown),
            )
            .await;
            match result {
                Ok(summary) => tracing::debug!(%peer, client = %summary.peer, streams = summary.streams, "HBONE done"),
                Err(error) => tracing::warn!(%peer, %error, "inbound HBONE connection failed"),
            }
        });
    }
}

async fn accept_socks5(
    listener: TcpListener,
    outbound: Arc<Outbound<CertManagerTls<Certificates, TokioTimer>>>,
    shutdown: watch::Receiver<bool>,
    conn_tx: mpsc::Sender<()>,
) {
    let stop = shutdown_signal(shutdown);
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "SOCKS5 accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let outbound = outbound.clone();
        let guard = conn_tx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let summary = outbound.serve_socks5(tcp, peer).await;
            tracing::debug!(%peer, ?summary, "SOCKS5 connection done");
        });
    }
}
