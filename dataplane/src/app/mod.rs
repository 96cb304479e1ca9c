//! The wiring of the binaries: from a validated [`Config`] to running listeners, and back down
//! through a bounded drain.
//!
//! - [`plane`]: what both binaries share on tokio: the [`ControlPlane`] (configuration, certificates,
//!   the [`ProxyContext`] every connection reads) and the readiness, admin and metrics listeners.
//! - [`worker`]: the serving of accepted connections written once over
//!   [`Runtime`](crate::rt::Runtime): a [`Worker`] per runtime (tokio) or per core (io_uring).
//! - [`lifecycle`]: what both binaries do around the workers, written once: the data listener
//!   set, the start sequence, the accept loops and the dispatch by listener kind, readiness, and
//!   the drain; a binary supplies its runtime's [`Acceptor`].
//! - [`thread_cache`]: each thread gives its allocator cache back once it has gone quiet.
//! - [`Proxy`] (here): the tokio binary `ztunnel`, one worker on a multi-thread runtime (the
//!   control plane on a runtime of its own with [`Proxy::start_on`]), and the tokio [`Acceptor`].
//!
//! [`Proxy::start`] loads the local configuration (and keeps watching it), opens the certificate
//! source, starts the certificate manager, decides the packet mark, binds the listeners and serves
//! them (one accept loop per listener); it must be called inside a tokio runtime with IO and time
//! enabled. Every listener is bound before any is served (but for a hand-over, whose control
//! listeners follow once the replaced instance releases them): one that cannot be bound (a port in
//! use) fails the start. [`Proxy::drain`] stops accepting, tells the HBONE connections to drain, and waits
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
//! | DNS | 15053 (UDP and TCP) | [`crate::dns::serve`] (loopback by default; can be turned off) |
//!
//! | readiness | 15021 | `/healthz/ready`: 200 once listeners and configuration are there and, in dedicated mode, while the workload is in the configuration and its certificate is valid ([`crate::admin`]) |
//! | admin | 15000 | `/config_dump`, `/logging`, `/quitquitquit` (loopback only) |
//! | metrics | 15020 | `/metrics`, `/stats/prometheus` |
//!
//! The data listeners bind with `SO_REUSEPORT`, so that a new instance can take over the ports
//! while this one drains; the control listeners (readiness, admin, metrics) do not, and are bound
//! first: a second instance started on the same ports fails naming the port, binding nothing. A
//! hand-over (`--handover`, [`Config::handover`]) shares the data listeners at once and binds the
//! control listeners once the draining instance releases them ([`ControlListeners`]). The DNS
//! proxy binds UDP and TCP with `SO_REUSEPORT` too.
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
//!
//! [`InboundHandler`]: crate::proxy::inbound::InboundHandler
//! [`InboundHandler::serve_plaintext`]: crate::proxy::inbound::InboundHandler::serve_plaintext
//! [`Outbound::serve_capture`]: crate::proxy::outbound::Outbound::serve_capture
//! [`Outbound::serve_socks5`]: crate::proxy::outbound::Outbound::serve_socks5
//! [`config::PacketMark`]: crate::config::PacketMark

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::admin::{self, LogControl, MetricsHandler, Readiness};
use crate::config::{Config, Listener};
use crate::dns;
use crate::rt::tokio::{Tokio, TokioConnector, TokioExecutor, TokioRuntime};
use crate::telemetry::metrics::{DnsMetrics, Metrics};
use crate::telemetry::runtime::TokioRuntimeCollector;
use crate::watch::ConnectionRegistry;

pub mod cli;
pub mod inpod;
pub mod istio;
pub mod lifecycle;
pub mod plane;
pub mod thread_cache;
pub mod worker;

pub use lifecycle::{
    ACCEPT_RETRY, Acceptor, Connection, DnsSockets, Drained, Lifecycle, Phase, ReadinessCheck, Starting, bind_dns,
    log_listeners, reached, serve_dns,
};
pub use plane::{
    CONFIG_POLL_INTERVAL, Certificates, Control, ControlListeners, ControlPlane, Manager, ProxyContext, ProxyTls,
    StartError, bind_tokio, shutdown_signal,
};
pub use worker::Worker;

/// A running proxy: its [`Lifecycle`], and the task of its worker.
#[derive(Debug)]
pub struct Proxy {
    lifecycle: Lifecycle,
    worker: JoinHandle<()>,
    /// In-pod mode, when on.
    inpod: Option<inpod::Inpod<inpod::TokioServers>>,
    /// Every connection of the proxy (the pods' in children).
    registry: ConnectionRegistry,
}

/// The worker of the tokio binary: one for the whole multi-thread runtime.
type TokioWorker = Worker<TokioRuntime>;

impl Acceptor for Tokio {
    type Listener = TcpListener;
    type Shared = Arc<TokioWorker>;

    async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, Option<SocketAddr>)> {
        let (tcp, peer) = listener.accept().await?;
        Ok((tcp, Some(peer)))
    }

    fn adopt(stream: std::net::TcpStream) -> io::Result<TcpStream> {
        TcpStream::from_std(stream)
    }

    fn spawn(connection: Connection<Self>) {
        tokio::spawn(connection.serve());
    }
}

/// The registry of the data runtime's metrics ([`TokioRuntimeCollector`]).
fn tokio_metrics(data: &Handle) -> Arc<prometheus_client::registry::Registry> {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(TokioRuntimeCollector::new(data)));
    Arc::new(registry)
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
        Self::start_on(config, logging, Handle::current()).await
    }

    /// [`Proxy::start_with_logging`] with the data path on the runtime of `data`: the data
    /// listeners, their accept loops and the connections run there, while the control plane
    /// (configuration watcher, certificate manager, readiness, admin and metrics) runs on the
    /// runtime this is called in. The `ztunnel` binary calls it on a small control thread with a
    /// multi-thread runtime for the data path.
    pub async fn start_on(config: Config, logging: Option<LogControl>, data: Handle) -> Result<Proxy, StartError> {
        let registry = ConnectionRegistry::new();
        let mut starting = Starting::begin(&config, std::slice::from_ref(&registry)).await?;
        if config.inpod.is_some() {
            starting.without_data(&inpod::POD_PORTS.map(|(listener, _)| listener));
        }
        let context = starting.plane().context().clone();
        let metrics = Arc::new(Metrics::new());
        let connector = TokioConnector::new(context.client_tls(), context.connector_config());
        let worker = Arc::new(Worker::new(
            context.clone(),
            TokioRuntime::new(),
            connector,
            TokioExecutor::new(),
            metrics.clone(),
            registry.clone(),
        ));

        // Every data listener is bound before any is served, so that a port in use fails the start;
        // with the data runtime's IO driver.
        let mut bound = Vec::new();
        let mut sockets = Vec::new();
        {
            let _data = data.enter();
            for &(listener, addr) in starting.data() {
                match bind_tokio(listener, addr, &mut bound) {
                    Ok(tcp) => sockets.push((listener, tcp)),
                    Err(error) => {
                        starting.abandon();
                        return Err(error);
                    }
                }
            }
        }
        // The DNS proxy, when on: one UDP socket and one TCP listener, served by one task; in
        // in-pod mode, in each pod instead.
        let dns_metrics = Arc::new(DnsMetrics::new());
        let dns_context = match starting.dns_context(&config, &dns_metrics) {
            Ok(dns_context) => dns_context,
            Err(error) => {
                starting.abandon();
                return Err(error);
            }
        };
        if let (Some(addr), Some(dns_context), None) = (config.listeners.dns, &dns_context, &config.inpod) {
            let sockets = {
                let _data = data.enter();
                match bind_dns(addr) {
                    Ok(sockets) => sockets,
                    Err(error) => {
                        starting.abandon();
                        return Err(error);
                    }
                }
            };
            bound.push((Listener::Dns, sockets.addr));
            data.spawn(serve_dns::<Tokio>(
                dns_context.clone(),
                dns::clients(&config),
                sockets,
                starting.phase(),
            ));
        }
        let worker = data.spawn(lifecycle::serve::<Tokio>(worker, sockets, starting.phase()));
        // In-pod mode: istio-cni's pods, each served in its network namespace.
        let servers = inpod::TokioServers::new(context.clone(), metrics.clone(), data.clone());
        let inpod = match inpod::start(&mut starting, &config, vec![registry.clone()], dns_context, servers) {
            Ok(inpod) => inpod,
            Err(error) => {
                starting.abandon();
                return Err(error);
            }
        };
        // Readiness, admin and metrics; the proxy is ready once this function returns.
        let handler = inpod::Inpod::add_metrics(
            inpod.as_ref(),
            MetricsHandler::new(metrics)
                .with_dns(&dns_metrics)
                .with_static(tokio_metrics(&data)),
        );
        let lifecycle = starting.serve(&config, bound, handler, logging).await?;
        Ok(Proxy {
            lifecycle,
            worker,
            inpod,
            registry,
        })
    }

    /// The listeners being served, with the addresses they are bound to.
    pub fn listeners(&self) -> &[(Listener, SocketAddr)] {
        self.lifecycle.listeners()
    }

    /// The trigger `POST /quitquitquit` pulls: see [`Lifecycle::shutdown_trigger`].
    pub fn shutdown_trigger(&self) -> admin::ShutdownTrigger {
        self.lifecycle.shutdown_trigger()
    }

    /// Whether the proxy is ready (what the readiness endpoint answers).
    pub fn readiness(&self) -> &Readiness {
        self.lifecycle.readiness()
    }

    /// Stops accepting, asks the HBONE connections to drain, and waits up to the drain deadline
    /// for every connection to end; then stops the background tasks and the control listeners
    /// (readiness answers 500 from the start of the drain): [`Lifecycle::drain`].
    pub async fn drain(self) -> Drained {
        let registry = self.registry;
        let pods = self.inpod.is_some();
        let ended = async {
            let _ = self.worker.await;
            // The pods' connections (they drain with the proxy's phase, on tasks of their own).
            while pods && !registry.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let drained = self.lifecycle.drain(ended, async {}).await;
        if let Some(inpod) = self.inpod {
            inpod.stop();
        }
        drained
    }
}
