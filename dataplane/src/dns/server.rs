//! The DNS server, written once over the runtime seam ([`Datagram`]): a UDP loop and a TCP loop
//! on sockets the caller made, deciding every query with [`resolve::decide`] against the current
//! snapshot and forwarding the others to the upstream resolvers.
//!
//! [`serve`] is the entry point: a [`DnsContext`] (shared by every server of the process), the
//! socket factory its upstream sockets come from, whose queries it serves ([`Clients`]: the
//! source's workload on a node proxy, one pod's in dedicated or in-pod mode) and the two sockets.
//! It never spawns: the UDP loop drives its forwarded queries and the TCP loop its connections
//! (each bounded by [`DnsLimits`]), so one future serves both, on any runtime, on any core.
//!
//! Forwarding ([`DnsContext::forward`]): over UDP for a UDP query (a socket per query from the
//! factory, connected to the upstream, so only its answers are read; the answer must have the
//! query's id), over TCP for a TCP query; each upstream in `resolv.conf` order, the next one on a
//! timeout or an error. The query goes out unchanged and the answer comes back unchanged, but for a
//! UDP answer longer than the client's size, cut with `TC` set ([`wire::truncate`]); an upstream's
//! `TC` answer passes as it is, so the client asks again over TCP. When every upstream failed, the
//! client gets `SERVFAIL`.

use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use futures_util::future::{join, select};
use futures_util::stream::FuturesUnordered;
use meshwire_hbone::rt::{Timer, timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::resolve::{self, Client, NameIndex, Outcome, ResolverConfig, Transport};
use super::wire;
use crate::proxy::canonical;
use crate::rt::datagram::Datagram;
use crate::rt::socket::{self, SocketFactory, SocketOptions};
use crate::state::State;
use crate::telemetry::metrics::{DnsLabels, DnsMetrics};
use crate::watch::Published;

/// The budgets and deadlines of a DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsLimits {
    /// Forwarded UDP queries waiting for an upstream at once, per server; past it a query is
    /// answered `SERVFAIL` at once.
    pub forwards: usize,
    /// TCP connections served at once, per server; past it new connections wait in the listen
    /// queue.
    pub tcp_connections: usize,
    /// How long one upstream is given to answer before the next is asked.
    pub upstream_timeout: Duration,
    /// How long a TCP connection may stay without a query (ztunnel's 5 s).
    pub tcp_idle: Duration,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self {
            forwards: 1024,
            tcp_connections: 256,
            upstream_timeout: Duration::from_secs(2),
            tcp_idle: Duration::from_secs(5),
        }
    }
}

/// Whose queries a server answers: how the client's workload (its namespace, network and metric
/// labels) is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clients {
    /// A node proxy's: the workload with the query's source address in `network`.
    BySource {
        /// The proxy's network.
        network: String,
    },
    /// One workload's (a dedicated proxy's; a pod's in in-pod mode), by namespace and name.
    Workload {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The network used while the workload is not in the state.
        network: String,
    },
}

/// Why no upstream answered a forwarded query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// No upstream resolver is configured.
    #[error("no upstream resolver")]
    NoUpstream,
    /// The last upstream asked did not answer in time.
    #[error("upstream {upstream} did not answer within {within:?}")]
    Timeout {
        /// The upstream.
        upstream: SocketAddr,
        /// Its deadline.
        within: Duration,
    },
    /// Asking the last upstream failed.
    #[error("upstream {upstream}: {reason}")]
    Io {
        /// The upstream.
        upstream: SocketAddr,
        /// What failed.
        reason: String,
    },
}

/// The state's name index, and the state it was made from.
#[derive(Debug)]
struct Indexed {
    state: Arc<State>,
    index: Arc<NameIndex>,
}

/// What every DNS server of the process shares (`Send + Sync`): how names resolve, the upstream
/// resolvers, the published configuration and its name index, the metrics and the limits.
#[derive(Debug)]
pub struct DnsContext {
    resolver: ResolverConfig,
    upstreams: Vec<SocketAddr>,
    published: Published,
    metrics: Arc<DnsMetrics>,
    limits: DnsLimits,
    upstream_options: SocketOptions,
    /// `upstream_options` without `SO_REUSEADDR` and `SO_REUSEPORT`, for the UDP sockets of
    /// forwarded queries: with them, Linux may give two live UDP sockets bound to port 0 the same
    /// port, and two queries in flight would share one address pair (one socket reads both
    /// answers, the other query times out).
    udp_upstream_options: SocketOptions,
    index: ArcSwapOption<Indexed>,
}

/// What to do with a packet.
enum Step {
    /// Send this.
    Reply(Vec<u8>),
    /// Forward the packet; the answer may have `limit` bytes.
    Forward { labels: DnsLabels, limit: usize },
    /// Nothing (not a query).
    Drop,
}

impl DnsContext {
    /// A context resolving with `resolver`, forwarding to `upstreams` (in order) through sockets
    /// with `upstream_options` (the proxy's packet mark), reading `published`, counting in
    /// `metrics`.
    pub fn new(
        resolver: ResolverConfig,
        upstreams: Vec<SocketAddr>,
        published: Published,
        metrics: Arc<DnsMetrics>,
        limits: DnsLimits,
        upstream_options: SocketOptions,
    ) -> Self {
        Self {
            resolver,
            upstreams,
            published,
            metrics,
            limits,
            udp_upstream_options: SocketOptions {
                reuse_address: false,
                reuse_port: false,
                ..upstream_options.clone()
            },
            upstream_options,
            index: ArcSwapOption::empty(),
        }
    }

    /// The upstream resolvers.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<DnsMetrics> {
        &self.metrics
    }

    /// The limits.
    pub fn limits(&self) -> &DnsLimits {
        &self.limits
    }

    /// The name index of `state`: the one made last if it is of this state, else a new one (made
    /// once per published state, by the first query that sees it).
    fn index(&self, state: &Arc<State>) -> Arc<NameIndex> {
        if let Some(indexed) = &*self.index.load()
            && Arc::ptr_eq(&indexed.state, state)
        {
            return Arc::clone(&indexed.index);
        }
        let index = Arc::new(NameIndex::new(state));
        self.index.store(Some(Arc::new(Indexed {
            state: Arc::clone(state),
            index: Arc::clone(&index),
        })));
        index
    }

    /// Decides `packet` from `peer` (canonical) over `transport`, and counts it.
    fn step(&self, clients: &Clients, peer: SocketAddr, packet: &[u8], transport: Transport) -> Step {
        let snapshot = self.published.load_guard();
        let state = &snapshot.state;
        let index = self.index(state);
        let (workload, network) = match clients {
            Clients::BySource { network } => (state.workload_by_ip(network, peer.ip()), network.as_str()),
            Clients::Workload {
                namespace,
                name,
                network,
            } => (state.workload_by_name(namespace, name), network.as_str()),
        };
        let client = Client {
            workload,
            network: workload.map_or(network, |w| w.network.as_str()),
        };
        match resolve::decide(&self.resolver, state, &index, client, packet, transport) {
            Ok(decision) => {
                let query_type = decision.query_type.map(|t| t.to_string());
                let labels = DnsLabels::new(query_type.as_deref(), transport.as_str(), workload);
                self.metrics.request(&labels);
                match decision.outcome {
                    Outcome::Answer(answer) => {
                        tracing::debug!(%peer, query_type = ?query_type, "DNS query answered locally");
                        Step::Reply(answer)
                    }
                    Outcome::Forward => Step::Forward {
                        labels,
                        limit: decision.limit,
                    },
                }
            }
            Err(error) => {
                tracing::debug!(%peer, %error, "DNS query refused");
                match error.answer(packet) {
                    Some(answer) => {
                        self.metrics
                            .request(&DnsLabels::new(None, transport.as_str(), workload));
                        Step::Reply(answer)
                    }
                    None => Step::Drop,
                }
            }
        }
    }

    /// Forwards `query` over `transport` to the upstreams and returns what the client gets: the
    /// answer (a UDP one cut to `limit` with `TC` set if longer), or `SERVFAIL` when no upstream
    /// answered. Counted in the upstream metrics with `labels`.
    pub async fn forward<N: Datagram, F: SocketFactory>(
        &self,
        factory: &F,
        query: &[u8],
        transport: Transport,
        limit: usize,
        labels: &DnsLabels,
    ) -> Vec<u8> {
        let timer = N::Timer::default();
        let started = timer.now();
        let result = match transport {
            Transport::Udp => self.forward_udp::<N, F>(factory, query, limit).await,
            Transport::Tcp => self.forward_tcp::<N, F>(factory, query).await,
        };
        self.metrics
            .forwarded(labels, timer.now().saturating_duration_since(started), result.is_ok());
        match result {
            Ok(answer) if transport == Transport::Udp => wire::truncate(answer, limit),
            Ok(answer) => answer,
            Err(error) => {
                tracing::debug!(%error, "DNS query forwarded in vain: SERVFAIL");
                wire::error_answer(query, wire::SERVFAIL).unwrap_or_default()
            }
        }
    }

    async fn forward_udp<N: Datagram, F: SocketFactory>(
        &self,
        factory: &F,
        query: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, ForwardError> {
        let id = wire::id(query);
        let mut last = ForwardError::NoUpstream;
        // One byte more than the client may take: a longer answer is seen as such, and cut.
        let mut buf = vec![0; limit.clamp(wire::CLASSIC_UDP, wire::MAX_MESSAGE - 1) + 1];
        let timer = N::Timer::default();
        for &upstream in &self.upstreams {
            let io = |e: io::Error| ForwardError::Io {
                upstream,
                reason: e.to_string(),
            };
            let any = if upstream.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            };
            let exchange = async {
                let socket = factory
                    .datagram(SocketAddr::new(any, 0), &self.udp_upstream_options)
                    .map_err(io)?;
                socket.connect(&upstream.into()).map_err(io)?;
                let udp = N::udp(socket).map_err(io)?;
                N::send_to(&udp, query, upstream).await.map_err(io)?;
                loop {
                    let (len, _) = N::recv_from(&udp, &mut buf).await.map_err(io)?;
                    let answer = &buf[..len];
                    // Only the answer to this query: a late answer to an earlier one is skipped.
                    if wire::is_response(answer) == Some(true) && wire::id(answer) == id {
                        return Ok(answer.to_vec());
                    }
                }
            };
            match timeout(&timer, self.limits.upstream_timeout, exchange).await {
                Some(Ok(answer)) => return Ok(answer),
                Some(Err(error)) => last = error,
                None => {
                    last = ForwardError::Timeout {
                        upstream,
                        within: self.limits.upstream_timeout,
                    }
                }
            }
        }
        Err(last)
    }

    async fn forward_tcp<N: Datagram, F: SocketFactory>(
        &self,
        factory: &F,
        query: &[u8],
    ) -> Result<Vec<u8>, ForwardError> {
        let id = wire::id(query);
        let mut last = ForwardError::NoUpstream;
        let timer = N::Timer::default();
        let Ok(len) = u16::try_from(query.len()) else {
            return Err(ForwardError::Io {
                upstream: self
                    .upstreams
                    .first()
                    .copied()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                reason: "query longer than a DNS message".to_owned(),
            });
        };
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend(len.to_be_bytes());
        framed.extend(query);
        for &upstream in &self.upstreams {
            let io = |e: io::Error| ForwardError::Io {
                upstream,
                reason: e.to_string(),
            };
            let within = self.limits.upstream_timeout;
            let exchange = async {
                let socket = factory.stream(upstream, None, &self.upstream_options).map_err(io)?;
                let mut stream = N::connect(socket, upstream, within).await.map_err(io)?;
                stream.write_all(&framed).await.map_err(io)?;
                stream.flush().await.map_err(io)?;
                loop {
                    let answer = read_message(&mut stream).await.map_err(io)?;
                    if wire::is_response(&answer) == Some(true) && wire::id(&answer) == id {
                        return Ok(answer);
                    }
                }
            };
            match timeout(&timer, within, exchange).await {
                Some(Ok(answer)) => return Ok(answer),
                Some(Err(error)) => last = error,
                None => last = ForwardError::Timeout { upstream, within },
            }
        }
        Err(last)
    }
}

/// Reads one length-prefixed DNS message from a TCP stream.
async fn read_message<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut len = [0; 2];
    stream.read_exact(&mut len).await?;
    let mut message = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

/// Serves DNS on `udp` and `tcp` (bound sockets, as the socket factory makes them: the TCP one
/// listening) for `clients`, with `context`, until `stop` resolves; upstream sockets come from
/// `factory`. Errors only if a socket cannot be handed to the runtime.
///
/// A node proxy runs one per listening address (per core in the io_uring build, with
/// `SO_REUSEPORT`); in-pod mode would run one per pod, with sockets and a factory of the pod's
/// network namespace and [`Clients::Workload`].
pub async fn serve<N: Datagram, F: SocketFactory>(
    context: Arc<DnsContext>,
    factory: F,
    clients: Clients,
    udp: socket2::Socket,
    tcp: socket2::Socket,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let udp = N::udp(udp)?;
    let tcp = N::listener(tcp)?;
    let serving = join(
        serve_udp::<N, F>(&context, &factory, &clients, &udp),
        serve_tcp::<N, F>(&context, &factory, &clients, &tcp),
    );
    let _ = select(pin!(serving), pin!(stop)).await;
    Ok(())
}

/// How long a loop waits after its socket failed before it reads again.
const RETRY: Duration = Duration::from_millis(50);

/// The UDP loop: local answers sent at once, forwarded queries driven here (at most
/// [`DnsLimits::forwards`]), each sending its own answer.
async fn serve_udp<N: Datagram, F: SocketFactory>(context: &DnsContext, factory: &F, clients: &Clients, udp: &N::Udp) {
    let timer = N::Timer::default();
    let mut buf = vec![0; wire::MAX_MESSAGE];
    let mut forwards = FuturesUnordered::new();
    loop {
        let received = {
            let mut recv = pin!(N::recv_from(udp, &mut buf));
            poll_fn(|cx| {
                while let Poll::Ready(Some(())) = forwards.poll_next_unpin(cx) {}
                recv.as_mut().poll(cx)
            })
            .await
        };
        let (len, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "cannot read from the DNS UDP socket");
                timer.sleep_until(timer.now() + RETRY).await;
                continue;
            }
        };
        let packet = &buf[..len];
        match context.step(clients, canonical(peer), packet, Transport::Udp) {
            Step::Reply(answer) => send_udp::<N>(udp, &answer, peer).await,
            Step::Drop => {}
            Step::Forward { labels, limit } => {
                if forwards.len() >= context.limits.forwards {
                    tracing::debug!(%peer, limit = context.limits.forwards, "too many DNS queries forwarded: SERVFAIL");
                    context.metrics.forwarded(&labels, Duration::ZERO, false);
                    if let Some(answer) = wire::error_answer(packet, wire::SERVFAIL) {
                        send_udp::<N>(udp, &answer, peer).await;
                    }
                    continue;
                }
                let query = packet.to_vec();
                forwards.push(async move {
                    let answer = context
                        .forward::<N, F>(factory, &query, Transport::Udp, limit, &labels)
                        .await;
                    send_udp::<N>(udp, &answer, peer).await;
                });
            }
        }
    }
}

async fn send_udp<N: Datagram>(udp: &N::Udp, answer: &[u8], peer: SocketAddr) {
    if let Err(error) = N::send_to(udp, answer, peer).await {
        tracing::debug!(%peer, %error, "cannot send a DNS answer");
    }
}

/// The TCP loop: accepts while fewer than [`DnsLimits::tcp_connections`] connections are served,
/// and drives them.
async fn serve_tcp<N: Datagram, F: SocketFactory>(
    context: &DnsContext,
    factory: &F,
    clients: &Clients,
    listener: &N::Listener,
) {
    let timer = N::Timer::default();
    let cap = context.limits.tcp_connections.max(1);
    let mut connections = FuturesUnordered::new();
    loop {
        let accepted = {
            let mut accept = pin!(N::accept(listener));
            poll_fn(|cx| {
                while let Poll::Ready(Some(())) = connections.poll_next_unpin(cx) {}
                if connections.len() >= cap {
                    // Woken when a connection ends.
                    return Poll::Pending;
                }
                accept.as_mut().poll(cx)
            })
            .await
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "cannot accept on the DNS TCP listener");
                timer.sleep_until(timer.now() + RETRY).await;
                continue;
            }
        };
        let Ok(peer) = socket::peer_addr(&stream) else {
            continue;
        };
        connections.push(serve_connection::<N, F>(
            context,
            factory,
            clients,
            stream,
            canonical(peer),
        ));
    }
}

/// One TCP connection: its queries one after the other, until it ends, idles past
/// [`DnsLimits::tcp_idle`] or sends what is not a query.
async fn serve_connection<N: Datagram, F: SocketFactory>(
    context: &DnsContext,
    factory: &F,
    clients: &Clients,
    mut stream: N::Stream,
    peer: SocketAddr,
) {
    let timer = N::Timer::default();
    loop {
        let query = match timeout(&timer, context.limits.tcp_idle, read_message(&mut stream)).await {
            Some(Ok(query)) => query,
            _ => return,
        };
        let answer = match context.step(clients, peer, &query, Transport::Tcp) {
            Step::Reply(answer) => answer,
            Step::Drop => return,
            Step::Forward { labels, limit } => {
                context
                    .forward::<N, F>(factory, &query, Transport::Tcp, limit, &labels)
                    .await
            }
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend(len.to_be_bytes());
        framed.extend(answer);
        if stream.write_all(&framed).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}
