//! The wiring of the tokio binary: from a validated [`Config`] to running listeners, and back down
//! through a bounded drain.
//!
//! [`Proxy::start`] loads the local configuration (and keeps watching it), opens the certificate
//! source, starts the certificate manager, decides the packet mark, binds the listeners and spawns
//! their accept loops (one per listener); it must be called inside a tokio runtime with IO and time
//! enabled. Every listener is bound before any is served: one that cannot be bound (a port in use)
//! fails the start. [`Proxy::drain`] stops accepting, tells the HBONE connections to drain, and waits
//! up to the drain deadline for the connections to end.
//!
//! Listeners served:
//!
//! | listener | port | what it does |
//! |---|---|---|
//! | inbound HBONE | 15008 | mTLS with the destination workload's certificate, then [`InboundHandler`] per CONNECT |
//! | inbound plaintext | 15006 | redirected inbound TCP: [`InboundHandler::serve_plaintext`] (policies without a peer identity) |
//! | outbound capture | 15001 | redirected outbound TCP: [`Outbound::serve_capture`] |
//! | SOCKS5 | 15080 | [`Outbound::serve_socks5`] (loopback only; can be turned off) |
//!
//! | readiness | 15021 | `/healthz/ready`: 200 once listeners, configuration and certificate are there ([`crate::admin`]) |
//! | admin | 15000 | `/config_dump`, `/logging`, `/quitquitquit` (loopback only) |
//! | metrics | 15020 | `/metrics`, `/stats/prometheus` |
//!
//! Every listener binds with `SO_REUSEPORT`, so that a new instance can take over the ports while
//! this one drains. The DNS proxy is not served yet.
//!
//! **Whose connections.** In dedicated mode every connection is the configured workload's: its
//! certificate serves inbound HBONE, and outbound connections go out with its identity; the workload
//! is looked up by namespace and name in each configuration snapshot, so a change of it is followed.
//! In shared mode an inbound HBONE connection is for the served workload whose IP it arrived on (and
//! is served with that workload's certificate), and an outbound connection is from the local workload
//! whose IP is the client's address (and its HBONE tunnel presents that workload's identity).
//!
//! **Packet mark.** The upstream connections (HBONE to peers, passthrough, connections to local
//! workloads) carry the packet mark of [`config::PacketMark`], so that the redirection rules of
//! `dataplane/scripts/redirect.sh` do not capture them again. With the default (`auto`) a proxy that
//! may not set marks (not `CAP_NET_ADMIN`: an unprivileged run on loopback) warns once and runs
//! without; an explicit mark it may not set fails the start ([`StartError::PacketMark`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::pool::Pool;
use meshwire_hbone::server::{self, ServeOptions};
use meshwire_identity::id::SpiffeId;
use meshwire_identity::manager::{CertManager, ManagerConfig, Priority};
use meshwire_identity::source::files::{FilePaths, FileSource};
use meshwire_identity::source::local_ca::{LocalCa, LocalCaError};
use meshwire_identity::source::{CertSource, Credentials, SourceError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminHandler, LogControl, MetricsHandler, Readiness, ReadinessHandler, ReadyBlocker};
use crate::config::{self, CertificateSource, Config, Listener, LocalConfigSource, PacketMark, ProxyMode};
use crate::proxy::canonical;
use crate::proxy::inbound::InboundHandler;
use crate::proxy::outbound::{CertManagerTls, HbonePool, Outbound, SourceWorkload};
use crate::rt::socket::{DefaultSocketFactory, SocketOptions, check_mark};
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
    /// The packet mark was given explicitly and cannot be set (it needs `CAP_NET_ADMIN`).
    #[error("cannot set the packet mark {mark:#x} (--packet-mark, PACKET_MARK): {source}")]
    PacketMark {
        /// The mark.
        mark: u32,
        /// What failed.
        source: io::Error,
    },
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
    /// Options of the connections to local workloads (the packet mark).
    upstream: SocketOptions,
}

impl Shared {
    /// The inbound handler of a connection from `peer` that arrived on `arrived_on`.
    fn inbound_handler(&self, arrived_on: SocketAddr, peer: SocketAddr) -> InboundHandler {
        InboundHandler::new(
            self.published.clone(),
            self.proxy.clone(),
            arrived_on,
            self.metrics.clone(),
            self.registry.clone(),
            self.log_format,
        )
        .with_peer_addr(peer)
        .with_socket_options(self.upstream.clone())
    }
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
    /// Starts the proxy of `config`: loads the local configuration, opens certificates, decides the
    /// packet mark, binds the inbound HBONE, inbound plaintext, outbound capture, SOCKS5, readiness,
    /// admin and metrics listeners and starts serving. Call inside a tokio runtime. The admin
    /// `/logging` endpoint answers 501: see [`Proxy::start_with_logging`].
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
                if published
                    .load()
                    .state
                    .workload_by_name(&workload.namespace, &workload.name)
                    .is_none()
                {
                    tracing::warn!(
                        %workload,
                        "the dedicated workload is not in the local configuration (yet): its outbound \
                         connections fail until it is"
                    );
                }
                SourceWorkload::Dedicated {
                    namespace: workload.namespace.clone(),
                    name: workload.name.clone(),
                }
            }
            _ => SourceWorkload::Shared,
        };

        let upstream = SocketOptions {
            mark: packet_mark(config.packet_mark)?,
            ..SocketOptions::default()
        };
        let log_format = match config.log_format {
            config::LogFormat::Json => accesslog::LogFormat::Json,
            _ => accesslog::LogFormat::Text,
        };
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared {
            proxy: config.local_proxy(),
            published: published.clone(),
            manager: manager.clone(),
            metrics: metrics.clone(),
            registry,
            dedicated,
            serve_options: ServeOptions {
                settings: config.http2().clone(),
                copy: CopyConfig::default(),
            },
            log_format,
            upstream: upstream.clone(),
        });

        // The outbound path, shared by the SOCKS5 and capture listeners, with one HBONE pool.
        let connector = TokioConnector::new(
            CertManagerTls::new(manager.clone()),
            ConnectorConfig {
                socket: upstream.clone(),
                ..ConnectorConfig::default()
            },
        );
        let pool: HbonePool<_> = Pool::new(connector, TokioExecutor::new(), TokioTimer, config.pool.clone());
        let outbound = Arc::new(
            Outbound::new(published, shared.proxy.clone(), source, pool, CopyConfig::default())
                .with_telemetry(metrics, log_format)
                .with_socket_options(upstream),
        );
        // Idle HBONE connections are released after the pool's idle timeout.
        let pool = outbound.pool().clone();
        background.push(tokio::spawn(async move { pool.maintain().await }));

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
        let mut bind = |listener: Listener, addr: SocketAddr| -> Result<TcpListener, StartError> {
            let bound = bind_listener(&DefaultSocketFactory, addr, &opts).map_err(|source| StartError::Bind {
                listener,
                addr,
                source,
            })?;
            listeners.push((listener, local_addr(&bound, addr)));
            Ok(bound)
        };
        // Every listener is bound before any is served, so that a port in use fails the start.
        let inbound = bind(Listener::Inbound, config.listeners.inbound)?;
        let plaintext = bind(Listener::InboundPlaintext, config.listeners.inbound_plaintext)?;
        let capture = bind(Listener::Outbound, config.listeners.outbound)?;
        let socks = config
            .listeners
            .socks5
            .map(|addr| bind(Listener::Socks5, addr))
            .transpose()?;
        let control_listeners = ControlListeners {
            readiness: bind(Listener::Readiness, config.listeners.readiness)?,
            admin: bind(Listener::Admin, config.listeners.admin)?,
            metrics: bind(Listener::Metrics, config.listeners.metrics)?,
        };

        let loops = Loops {
            shutdown: &shutdown,
            connections: &conn_tx,
        };
        accept_loops.push(loops.inbound_hbone(inbound, shared.clone()));
        accept_loops.push(loops.inbound_plaintext(plaintext, shared.clone()));
        accept_loops.push(loops.outbound_capture(capture, outbound.clone()));
        if let Some(socks) = socks {
            accept_loops.push(loops.socks5(socks, outbound));
        }
        drop(conn_tx);

        // Readiness, admin and metrics; the proxy is ready once this function returns.
        let (control, listeners_bound) = Control::start(&config, &shared, logging, control_listeners);

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

/// The bound control listeners.
struct ControlListeners {
    readiness: TcpListener,
    admin: TcpListener,
    metrics: TcpListener,
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

    /// Serves readiness, admin and metrics on their bound listeners; readiness waits for the local
    /// configuration, the dedicated workload's first certificate, and the returned blocker (to drop
    /// once every listener is bound).
    fn start(
        config: &Config,
        shared: &Shared,
        logging: Option<LogControl>,
        bound: ControlListeners,
    ) -> (Control, ReadyBlocker) {
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
                "readiness",
                bound.readiness,
                ReadinessHandler::new(readiness.clone()),
                &stop,
            ),
            Self::serve("admin", bound.admin, admin, &stop),
            Self::serve(
                "metrics",
                bound.metrics,
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
        (control, listeners_bound)
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

/// Spawns the accept loop of each listener; every connection task holds a clone of `connections`,
/// and every loop stops when `shutdown` says so.
struct Loops<'a> {
    shutdown: &'a watch::Sender<bool>,
    connections: &'a mpsc::Sender<()>,
}

impl Loops<'_> {
    /// Inbound HBONE: mTLS with the certificate of the workload the connection is for (the dedicated
    /// workload, or in shared mode the served workload whose IP it arrived on), then
    /// [`server::serve`] with an [`InboundHandler`]. Draining sends GOAWAY.
    fn inbound_hbone(&self, listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
        let shutdown = self.shutdown.subscribe();
        self.spawn(Listener::Inbound, listener, move |tcp, peer| {
            serve_inbound_hbone(tcp, peer, shared.clone(), shutdown.clone())
        })
    }

    /// Inbound plaintext capture: [`InboundHandler::serve_plaintext`].
    fn inbound_plaintext(&self, listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
        self.spawn(Listener::InboundPlaintext, listener, move |tcp, peer| {
            serve_inbound_plaintext(tcp, peer, shared.clone())
        })
    }

    /// Outbound capture: [`Outbound::serve_capture`].
    fn outbound_capture(&self, listener: TcpListener, outbound: Arc<ProxyOutbound>) -> JoinHandle<()> {
        self.spawn(Listener::Outbound, listener, move |tcp, peer| {
            let outbound = outbound.clone();
            async move {
                let summary = outbound.serve_capture(tcp, peer).await;
                tracing::debug!(%peer, ?summary, "outbound capture connection done");
            }
        })
    }

    /// Outbound SOCKS5: [`Outbound::serve_socks5`].
    fn socks5(&self, listener: TcpListener, outbound: Arc<ProxyOutbound>) -> JoinHandle<()> {
        self.spawn(Listener::Socks5, listener, move |tcp, peer| {
            let outbound = outbound.clone();
            async move {
                let summary = outbound.serve_socks5(tcp, peer).await;
                tracing::debug!(%peer, ?summary, "SOCKS5 connection done");
            }
        })
    }

    /// Accepts connections on `listener` until shutdown, and spawns `serve` for each (with
    /// `TCP_NODELAY` on, and the peer address with IPv4-mapped addresses as IPv4).
    fn spawn<F, Fut>(&self, which: Listener, listener: TcpListener, serve: F) -> JoinHandle<()>
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.shutdown.subscribe();
        let connections = self.connections.clone();
        tokio::spawn(async move {
            let stop = shutdown_signal(shutdown);
            tokio::pin!(stop);
            loop {
                let (tcp, peer) = tokio::select! {
                    () = &mut stop => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::warn!(listener = %which, %error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
                }
                let guard = connections.clone();
                let task = serve(tcp, canonical(peer));
                tokio::spawn(async move {
                    let _guard = guard;
                    task.await;
                });
            }
        })
    }
}

/// The outbound path of the binary.
type ProxyOutbound = Outbound<CertManagerTls<Certificates, TokioTimer>>;

/// The firewall mark of the proxy's upstream connections: see [`config::PacketMark`].
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

async fn serve_inbound_hbone(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let arrived_on = match tcp.local_addr() {
        Ok(addr) => canonical(addr),
        Err(error) => {
            tracing::warn!(%peer, %error, "inbound HBONE connection has no local address");
            return;
        }
    };
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
    let handler = shared.inbound_handler(arrived_on, peer);
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
}

async fn serve_inbound_plaintext(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let arrived_on = match tcp.local_addr() {
        Ok(addr) => canonical(addr),
        Err(error) => {
            tracing::warn!(%peer, %error, "inbound plaintext connection has no local address");
            return;
        }
    };
    let handler = shared.inbound_handler(arrived_on, peer);
    match handler.serve_plaintext(tcp, shared.serve_options.copy).await {
        Ok(copied) => tracing::debug!(%peer, ?copied, "inbound plaintext connection done"),
        Err(error) => tracing::warn!(%peer, %error, "inbound plaintext connection failed"),
    }
}
