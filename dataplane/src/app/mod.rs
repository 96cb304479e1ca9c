//! The wiring of the binaries: from a validated [`Config`] to running listeners, and back down
//! through a bounded drain.
//!
//! - [`plane`]: what both binaries share on tokio: the [`ControlPlane`] (configuration, certificates,
//!   the [`ProxyContext`] every connection reads) and the readiness, admin and metrics listeners.
//! - [`worker`]: the serving of accepted connections written once over
//!   [`Runtime`](crate::rt::Runtime): a [`Worker`] per runtime (tokio) or per core (io_uring).
//! - [`Proxy`] (here): the tokio binary `ztunnel`, one worker on a multi-thread runtime.
//!
//! [`Proxy::start`] loads the local configuration (and keeps watching it), opens the certificate
//! source, starts the certificate manager, decides the packet mark, binds the listeners and spawns
//! their accept loops (one per listener); it must be called inside a tokio runtime with IO and time
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
//! proxy is not served yet.
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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, LogControl, MetricsHandler, Readiness};
use crate::config::{Config, Listener};
use crate::proxy::canonical;
use crate::rt::tokio::{TokioConnector, TokioExecutor, TokioRuntime};
use crate::telemetry::metrics::Metrics;
use crate::watch::ConnectionRegistry;

pub mod cli;
pub mod plane;
pub mod worker;

pub use plane::{
    CONFIG_POLL_INTERVAL, Certificates, Control, ControlListeners, ControlPlane, Manager, ProxyContext, ProxyTls,
    StartError, bind_tokio, data_listeners, shutdown_signal,
};
pub use worker::Worker;

/// A running proxy: its listeners, background tasks and drain machinery.
pub struct Proxy {
    listeners: Vec<(Listener, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    accept_loops: Vec<JoinHandle<()>>,
    /// Every connection task holds a clone; `recv` returns `None` once all are gone.
    connections: mpsc::Receiver<()>,
    plane: ControlPlane,
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

/// The worker of the tokio binary: one for the whole multi-thread runtime.
type TokioWorker = Worker<TokioRuntime>;

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
        let registry = ConnectionRegistry::new();
        let plane = ControlPlane::start(&config, std::slice::from_ref(&registry)).await?;
        let context = plane.context().clone();
        let metrics = Arc::new(Metrics::new());
        let connector = TokioConnector::new(context.client_tls(), context.connector_config());
        let worker = Arc::new(Worker::new(
            context,
            TokioRuntime::new(),
            connector,
            TokioExecutor::new(),
            metrics.clone(),
            registry,
        ));
        // Idle HBONE connections are released after the pool's idle timeout.
        let pool = worker.outbound().pool().clone();
        let maintenance = tokio::spawn(async move { pool.maintain().await });

        let (shutdown, _) = watch::channel(false);
        let (conn_tx, connections) = mpsc::channel::<()>(1);
        let mut listeners = Vec::new();
        // Every listener is bound before any is served, so that a port in use fails the start; the
        // control listeners first, so that a second instance binds nothing (unless it takes over).
        let early_control = ControlListeners::bind_before_data(&config, &mut listeners)?;
        let inbound = bind_tokio(Listener::Inbound, config.listeners.inbound, &mut listeners)?;
        let plaintext = bind_tokio(
            Listener::InboundPlaintext,
            config.listeners.inbound_plaintext,
            &mut listeners,
        )?;
        let capture = bind_tokio(Listener::Outbound, config.listeners.outbound, &mut listeners)?;
        let socks = config
            .listeners
            .socks5
            .map(|addr| bind_tokio(Listener::Socks5, addr, &mut listeners))
            .transpose()?;

        let loops = Loops {
            shutdown: &shutdown,
            connections: &conn_tx,
        };
        let mut accept_loops = vec![maintenance];
        let stop = shutdown.subscribe();
        accept_loops.push(loops.spawn(Listener::Inbound, inbound, &worker, move |w, tcp, peer| {
            let stop = stop.clone();
            async move { w.serve_inbound_hbone(tcp, peer, shutdown_signal(stop)).await }
        }));
        accept_loops.push(loops.spawn(
            Listener::InboundPlaintext,
            plaintext,
            &worker,
            |w, tcp, peer| async move { w.serve_inbound_plaintext(tcp, peer).await },
        ));
        accept_loops.push(
            loops.spawn(Listener::Outbound, capture, &worker, |w, tcp, peer| async move {
                w.serve_capture(tcp, peer).await
            }),
        );
        if let Some(socks) = socks {
            accept_loops.push(
                loops.spawn(Listener::Socks5, socks, &worker, |w, tcp, peer| async move {
                    w.serve_socks5(tcp, peer).await
                }),
            );
        }
        drop(conn_tx);

        // Readiness, admin and metrics; the proxy is ready once this function returns.
        let control_listeners = ControlListeners::bind_after_data(&config, &mut listeners, early_control).await?;
        let (control, listeners_bound) =
            plane.serve_control(&config, control_listeners, MetricsHandler::new(metrics), logging);
        log_listeners(&config, &listeners);
        listeners_bound.ready();
        Ok(Proxy {
            listeners,
            shutdown,
            accept_loops,
            connections,
            plane,
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
        self.control.trigger().clone()
    }

    /// Whether the proxy is ready (what the readiness endpoint answers).
    pub fn readiness(&self) -> &Readiness {
        self.control.readiness()
    }

    /// Stops accepting, asks the HBONE connections to drain, and waits up to the drain deadline
    /// for every connection to end; then stops the background tasks and the control listeners
    /// (readiness answers 503 from the start of the drain).
    pub async fn drain(mut self) -> Drained {
        tracing::info!(deadline = ?self.drain_deadline, "draining");
        self.control.readiness().set_draining();
        let _ = self.shutdown.send(true);
        let mut loops = self.accept_loops.drain(..);
        // The first task is the pool's maintenance, which does not end by itself.
        if let Some(maintenance) = loops.next() {
            maintenance.abort();
        }
        for accept in loops {
            let _ = accept.await;
        }
        let outcome = match tokio::time::timeout(self.drain_deadline, self.connections.recv()).await {
            Ok(_) => Drained::Complete,
            Err(_) => Drained::DeadlineReached,
        };
        self.plane.stop();
        self.control.stop().await;
        outcome
    }
}

/// Logs the listeners bound, and those of `config` that are not served.
pub fn log_listeners(config: &Config, listeners: &[(Listener, SocketAddr)]) {
    for (listener, addr) in listeners {
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
}

/// How long an accept loop waits after a failed accept (out of descriptors, for one) before the
/// next.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Spawns the accept loop of each listener; every connection task holds a clone of `connections`,
/// and every loop stops when `shutdown` says so.
struct Loops<'a> {
    shutdown: &'a watch::Sender<bool>,
    connections: &'a mpsc::Sender<()>,
}

impl Loops<'_> {
    /// Accepts connections on `listener` until shutdown, and spawns `serve` for each (with
    /// `TCP_NODELAY` on, and the peer address with IPv4-mapped addresses as IPv4).
    fn spawn<F, Fut>(
        &self,
        which: Listener,
        listener: TcpListener,
        worker: &Arc<TokioWorker>,
        serve: F,
    ) -> JoinHandle<()>
    where
        F: Fn(Arc<TokioWorker>, TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.shutdown.subscribe();
        let connections = self.connections.clone();
        let worker = worker.clone();
        tokio::spawn(async move {
            let stop = shutdown_signal(shutdown);
            tokio::pin!(stop);
            loop {
                let (tcp, peer) = tokio::select! {
                    () = &mut stop => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            worker.accept_failed(which, &error);
                            tokio::time::sleep(ACCEPT_RETRY).await;
                            continue;
                        }
                    },
                };
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
                }
                let guard = connections.clone();
                let task = serve(worker.clone(), tcp, canonical(peer));
                tokio::spawn(async move {
                    let _guard = guard;
                    task.await;
                });
            }
        })
    }
}
