//! A pool of HBONE connections, shared by the streams of one key.
//!
//! A [`PoolKey`] is what makes two streams able to share a connection: the source identity, the
//! expected destination identities, the destination `ip:15008` and the source IP. For each key the
//! pool keeps connections carrying up to [`PoolConfig::max_streams_per_connection`] streams each
//! (never more than the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`) and opens another one when all are
//! full. Exactly one handshake per key is in flight: concurrent requests wait for it instead of
//! opening a storm of duplicate connections, and a failed handshake is reported to all of them.
//! Connections are retired when they close (GOAWAY, error, unanswered PINGs) and released after
//! [`PoolConfig::idle_timeout`] without streams, by [`Pool::maintain`]; a key's surplus
//! connections (those a burst of streams opened, beyond the one kept warm) go sooner, after
//! [`PoolConfig::surplus_idle_timeout`], since each holds what its busiest moment needed.
//!
//! A CONNECT not answered within [`PoolConfig::response_timeout`] has its connection probed: a
//! PING goes out at once, new streams avoid the connection until it is answered, and if it is not
//! answered within [`PoolConfig::probe_timeout`] the connection is retired and every CONNECT
//! waiting on it fails with [`ConnectError::Unresponsive`]. A frozen peer thus costs a waiting
//! CONNECT `response_timeout + probe_timeout` (5 s by default), not the keep-alive's 30 s.
//!
//! The pool never spawns by itself: connection drivers go to the caller's [`Executor`]. A
//! thread-per-core caller creates one pool per core (one connection per key per core, no shared
//! state between cores).

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::future::{Either, select};
use meshwire_identity::id::SpiffeId;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::budget::{BufferBudget, WindowLease};
use crate::client::{self, ClientConnection, ConnectError, ConnectRequest, ConnectionDriver, StreamLease, Tunnel};
use crate::rt::{Executor, Timer};
use crate::settings::Settings;

/// What streams must have in common to share a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the client presents.
    pub source: SpiffeId,
    /// The identities the server may present (sorted, without duplicates).
    expected: Vec<SpiffeId>,
    /// The peer's HBONE address, `ip:15008`.
    pub destination: SocketAddr,
    /// The local address to connect from, if one is chosen.
    pub source_ip: Option<IpAddr>,
}

impl PoolKey {
    /// A key; the expected identities are normalised so that their order does not matter.
    pub fn new(
        source: SpiffeId,
        mut expected: Vec<SpiffeId>,
        destination: SocketAddr,
        source_ip: Option<IpAddr>,
    ) -> Self {
        expected.sort();
        expected.dedup();
        Self {
            source,
            expected,
            destination,
            source_ip,
        }
    }

    /// The identities the server may present.
    pub fn expected(&self) -> &[SpiffeId] {
        &self.expected
    }
}

/// Makes the TCP connection and the TLS config for a key. Implemented by the proxy, which knows
/// about socket marks, source addresses, network namespaces and certificates.
pub trait Connector {
    /// The connected byte stream.
    type Io: AsyncRead + AsyncWrite + Unpin;

    /// Connects to `key.destination` (from `key.source_ip`) and returns the stream and a client
    /// config presenting `key.source` and expecting one of `key.expected()`.
    fn connect(&self, key: &PoolKey) -> impl Future<Output = Result<(Self::Io, Arc<ClientConfig>), ConnectError>>;
}

/// Settings of a [`Pool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened (default 100).
    pub max_streams_per_connection: usize,
    /// How long a connection without streams is kept (default 5 minutes).
    pub idle_timeout: Duration,
    /// How long a connection without streams is kept while another connection of its key stays
    /// open (default 5 s): the connections a burst of streams opened beyond the first go soon after
    /// the burst, and their memory with them (an HTTP/2 connection keeps the stream table of its
    /// busiest moment). At least one connection per key is kept for [`idle_timeout`](Self::idle_timeout).
    pub surplus_idle_timeout: Duration,
    /// How long a CONNECT waits for its answer on a pooled connection before the connection is
    /// probed with a PING (default 3 s). A probed connection takes no new streams until the PING is
    /// answered; the CONNECT keeps waiting (a peer may take its time to reach the destination).
    pub response_timeout: Duration,
    /// How long a probe's PING may go unanswered before the connection is retired and the CONNECTs
    /// waiting on it fail with [`ConnectError::Unresponsive`] (default 2 s). A CONNECT to a peer
    /// that stopped answering thus fails within `response_timeout + probe_timeout` on a pooled
    /// connection, and within [`Settings::handshake_timeout`] on a new one.
    pub probe_timeout: Duration,
    /// HTTP/2 settings of the connections.
    pub settings: Settings,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            surplus_idle_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(3),
            probe_timeout: Duration::from_secs(2),
            settings: Settings::default(),
        }
    }
}

/// One handshake in flight for a key, and the callers waiting for it.
#[derive(Default)]
struct Handshake {
    state: Mutex<HandshakeState>,
}

/// The outcome once known, and the wakers of the waiting callers.
type HandshakeState = (Option<Result<(), ConnectError>>, Vec<Waker>);

impl Handshake {
    fn complete(&self, result: Result<(), ConnectError>) {
        let wakers = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if st.0.is_some() {
                return;
            }
            st.0 = Some(result);
            std::mem::take(&mut st.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    fn poll_done(&self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = &st.0 {
            return Poll::Ready(r.clone());
        }
        if !st.1.iter().any(|w| w.will_wake(cx.waker())) {
            st.1.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

struct Conn {
    client: ClientConnection,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// When the pool last saw it without streams.
    idle_since: Option<Instant>,
}

#[derive(Default)]
struct KeyEntry {
    conns: Vec<Conn>,
    connecting: Option<Arc<Handshake>>,
}

struct Inner<C, E, T> {
    connector: C,
    executor: E,
    timer: T,
    config: PoolConfig,
    /// The budget each connection leases its receive windows from (see [`WindowLease`]).
    receive_budget: Arc<BufferBudget>,
    keys: Mutex<HashMap<PoolKey, KeyEntry>>,
    handshakes: AtomicUsize,
}

/// A pool of HBONE connections. Cheap to clone; clones share the pool.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use meshwire_hbone::ConnectError;
/// use meshwire_hbone::pool::{Connector, Pool, PoolConfig, PoolKey};
/// use meshwire_rt::{TokioExecutor, TokioTimer};
/// use tokio::net::TcpStream;
/// # use tokio::io::AsyncWriteExt;
/// # use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
/// # use meshwire_identity::{id::{SpiffeId, TrustDomain}, source::local_ca::LocalCa, tls};
/// # /// Refuses port 1 (401); else connects an upstream, here an in-process echo.
/// # struct Echo;
/// # impl Handler for Echo {
/// #     type Upstream = tokio::io::DuplexStream;
/// #     async fn connect(&self, request: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
/// #         if request.authority.as_socket_addr().is_some_and(|a| a.port() == 1) {
/// #             return Err(Refusal::unauthorized(format!("{} may not reach port 1", request.peer)));
/// #         }
/// #         let (upstream, echo) = tokio::io::duplex(64 * 1024);
/// #         let (mut r, mut w) = tokio::io::split(echo);
/// #         tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await?; w.shutdown().await });
/// #         Ok(upstream.into())
/// #     }
/// # }
///
/// /// Connects over TCP and presents one client config (a node proxy picks it by `key.source`).
/// struct Tcp(Arc<rustls::ClientConfig>);
/// impl Connector for Tcp {
///     type Io = TcpStream;
///     async fn connect(&self, key: &PoolKey) -> Result<(TcpStream, Arc<rustls::ClientConfig>), ConnectError> {
///         let tcp_error = |e| ConnectError::Tcp { peer: key.destination, source: Arc::new(e) };
///         let tcp = TcpStream::connect(key.destination).await.map_err(tcp_error)?;
///         tcp.set_nodelay(true).map_err(tcp_error)?;
///         Ok((tcp, self.0.clone()))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
/// # let server_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/server")?;
/// # let server = ca.issue(&server_id)?;
/// # let client = ca.issue(&SpiffeId::new("spiffe://cluster.local/ns/default/sa/client")?)?;
/// # let domains = tls::TrustDomains::only(ca.trust_domain().clone());
/// # let server_tls = Arc::new(tls::server_config(&server.svid, &server.bundles, &domains, vec![b"h2".to_vec()])?);
/// # let client_tls = Arc::new(tls::client_config(&client.svid, &client.bundles, vec![server_id], vec![b"h2".to_vec()])?);
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let peer = listener.local_addr()?;
/// # tokio::spawn(async move {
/// #     while let Ok((tcp, _)) = listener.accept().await {
/// #         let tls = server_tls.clone();
/// #         tokio::spawn(async move { server::serve(tcp, tls, &ServeOptions::default(), &Echo, &TokioTimer, std::future::pending()).await });
/// #     }
/// # });
/// let pool = Pool::new(Tcp(client_tls), TokioExecutor::new(), TokioTimer, PoolConfig::default());
/// # let client_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/client")?;
/// # let server_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/server")?;
/// // Who we are, whom we expect, where their HBONE port is, and no chosen source IP.
/// let key = PoolKey::new(client_id, vec![server_id], peer, None);
/// # use meshwire_hbone::{client::ConnectRequest, headers::Authority};
/// # let request = ConnectRequest::new(Authority::parse("10.0.0.2:8080")?);
/// let (first, second) = tokio::join!(pool.connect(&key, &request), pool.connect(&key, &request));
/// // Both streams went over one connection: the second request waited for the first handshake.
/// assert_eq!(pool.handshakes(), 1);
/// drop((first?, second?));
/// # Ok(())
/// # }
/// ```
pub struct Pool<C, E, T> {
    inner: Arc<Inner<C, E, T>>,
}

impl<C, E, T> Clone for Pool<C, E, T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C, E, T> Pool<C, E, T> {
    fn keys(&self) -> MutexGuard<'_, HashMap<PoolKey, KeyEntry>> {
        self.inner.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The future a pool hands to its executor for each connection: drives the connection and marks it
/// retired when it ends.
pub struct PooledDriver<IO, T: Timer> {
    driver: ConnectionDriver<IO, T>,
    closed: Arc<AtomicBool>,
    destination: SocketAddr,
    /// Given back when the connection is gone.
    _window: WindowLease,
}

impl<IO: AsyncRead + AsyncWrite + Unpin, T: Timer> Future for PooledDriver<IO, T> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let result = std::task::ready!(Pin::new(&mut this.driver).poll(cx));
        this.closed.store(true, Ordering::Release);
        match result {
            Ok(()) => tracing::debug!(destination = %this.destination, "HBONE connection closed"),
            Err(e) => tracing::debug!(destination = %this.destination, error = %e, "HBONE connection ended"),
        }
        Poll::Ready(())
    }
}

/// Ends a handshake as abandoned ([`ConnectError::HandshakeAbandoned`]) if its leader is dropped
/// before finishing, so that its waiters do not wait forever.
struct LeadGuard<'a, C, E, T> {
    pool: &'a Pool<C, E, T>,
    key: &'a PoolKey,
    handshake: Arc<Handshake>,
    done: bool,
}

impl<C, E, T> Drop for LeadGuard<'_, C, E, T> {
    fn drop(&mut self) {
        if !self.done {
            let mut keys = self.pool.keys();
            if let Some(entry) = keys.get_mut(self.key) {
                entry.connecting = None;
            }
            drop(keys);
            self.handshake.complete(Err(ConnectError::HandshakeAbandoned));
        }
    }
}

/// The entry of `key`, made if missing. The key is cloned only then, not on every stream.
fn entry_of<'a>(keys: &'a mut HashMap<PoolKey, KeyEntry>, key: &PoolKey) -> &'a mut KeyEntry {
    if !keys.contains_key(key) {
        keys.insert(key.clone(), KeyEntry::default());
    }
    keys.get_mut(key).expect("inserted above when missing")
}

enum Step {
    Use(ClientConnection, StreamLease, Arc<AtomicBool>),
    Wait(Arc<Handshake>),
    Lead(Arc<Handshake>),
}

impl<C, E, T> Pool<C, E, T>
where
    C: Connector,
    E: Executor<PooledDriver<C::Io, T>>,
    T: Timer + Clone,
{
    /// A pool connecting through `connector`, running connections on `executor` (see the example
    /// on [`Pool`]).
    pub fn new(connector: C, executor: E, timer: T, config: PoolConfig) -> Self {
        Self::with_receive_budget(
            connector,
            executor,
            timer,
            config,
            Arc::new(BufferBudget::new(usize::MAX)),
        )
    }

    /// A pool like [`Pool::new`] whose connections lease their receive windows from
    /// `receive_budget` for their life, and advertise only what they got (see [`WindowLease`]):
    /// what the peers' bytes that the pool's clients have not read yet take is bounded per process.
    pub fn with_receive_budget(
        connector: C,
        executor: E,
        timer: T,
        config: PoolConfig,
        receive_budget: Arc<BufferBudget>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                executor,
                timer,
                config,
                receive_budget,
                keys: Mutex::new(HashMap::new()),
                handshakes: AtomicUsize::new(0),
            }),
        }
    }

    /// Opens a tunnel to `request.authority` through a connection of `key`, making one if needed
    /// (see the example on [`Pool`]).
    pub async fn connect(&self, key: &PoolKey, request: &ConnectRequest) -> Result<Tunnel, ConnectError> {
        // A connection that closed between our look and our use is retried once. A stream the peer
        // refused unprocessed (REFUSED_STREAM: more streams than it allows, sent before its SETTINGS
        // arrived) is retried a few times: by then its limit is known.
        let mut retried_closed = false;
        let mut refused = 0;
        loop {
            match self.step(key) {
                Step::Use(client, lease, closed) => match self.open_on(&client, request).await {
                    Ok(mut tunnel) => {
                        tunnel.lease = Some(lease);
                        return Ok(tunnel);
                    }
                    Err(ConnectError::Http2 { source })
                        if source.reason() == Some(h2::Reason::REFUSED_STREAM) && refused < 3 =>
                    {
                        refused += 1;
                        tracing::debug!(error = %source, "stream refused unprocessed by the peer; retrying");
                    }
                    Err(e @ ConnectError::Http2 { .. }) if !retried_closed => {
                        tracing::debug!(error = %e, "pooled HBONE connection unusable; retrying on another");
                        closed.store(true, Ordering::Release);
                        retried_closed = true;
                    }
                    Err(e) => return Err(e),
                },
                Step::Wait(handshake) => poll_fn(|cx| handshake.poll_done(cx)).await?,
                Step::Lead(handshake) => {
                    let mut guard = LeadGuard {
                        pool: self,
                        key,
                        handshake: handshake.clone(),
                        done: false,
                    };
                    let result = self.handshake(key).await;
                    guard.done = true;
                    let mut keys = self.keys();
                    let entry = entry_of(&mut keys, key);
                    entry.connecting = None;
                    let outcome = result.map(|conn| entry.conns.push(conn));
                    drop(keys);
                    handshake.complete(outcome.clone());
                    outcome?;
                }
            }
        }
    }

    /// Decides, under the lock, whether to use a connection, wait for a handshake, or lead one.
    fn step(&self, key: &PoolKey) -> Step {
        let max = self.inner.config.max_streams_per_connection.max(1);
        let mut keys = self.keys();
        let entry = entry_of(&mut keys, key);
        entry.conns.retain(|c| !c.closed.load(Ordering::Acquire));
        for c in &mut entry.conns {
            let limit = max.min(c.client.max_send_streams().max(1));
            // A connection being probed (a CONNECT went unanswered) takes no new streams.
            if c.active.load(Ordering::Acquire) < limit && !c.client.is_probed() {
                c.active.fetch_add(1, Ordering::AcqRel);
                c.idle_since = None;
                return Step::Use(c.client.clone(), StreamLease::new(c.active.clone()), c.closed.clone());
            }
        }
        if let Some(h) = &entry.connecting {
            return Step::Wait(h.clone());
        }
        let h = Arc::new(Handshake::default());
        entry.connecting = Some(h.clone());
        Step::Lead(h)
    }

    /// Opens a stream on a pooled connection; probes the connection if the CONNECT is not answered
    /// within the response timeout, and fails with [`ConnectError::Unresponsive`] if the probe is
    /// not answered either (the connection is then gone).
    async fn open_on(&self, client: &ClientConnection, request: &ConnectRequest) -> Result<Tunnel, ConnectError> {
        let config = &self.inner.config;
        let timer = &self.inner.timer;
        let mut open = std::pin::pin!(client.open(request));
        let waited = std::pin::pin!(timer.sleep_until(timer.now() + config.response_timeout));
        if let Either::Left((result, _)) = select(open.as_mut(), waited).await {
            return result;
        }
        tracing::debug!(
            peer = %client.peer_identity(),
            authority = %request.authority,
            after = ?config.response_timeout,
            "CONNECT unanswered: probing the HBONE connection with a PING"
        );
        client.probe(config.probe_timeout);
        match open.await {
            Err(_) if client.probe_failed() => Err(ConnectError::Unresponsive {
                response: config.response_timeout,
                probe: config.probe_timeout,
            }),
            other => other,
        }
    }

    async fn handshake(&self, key: &PoolKey) -> Result<Conn, ConnectError> {
        self.inner.handshakes.fetch_add(1, Ordering::Relaxed);
        let (io, tls) = self.inner.connector.connect(key).await?;
        let window = WindowLease::take(&self.inner.receive_budget, &self.inner.config.settings);
        let settings = window.apply(&self.inner.config.settings);
        let (client, driver) = client::handshake(io, tls, &settings, self.inner.timer.clone()).await?;
        let closed = Arc::new(AtomicBool::new(false));
        self.inner.executor.execute(PooledDriver {
            driver,
            closed: closed.clone(),
            destination: key.destination,
            _window: window,
        });
        tracing::debug!(destination = %key.destination, source = %key.source, "opened HBONE connection");
        Ok(Conn {
            client,
            active: Arc::new(AtomicUsize::new(0)),
            closed,
            idle_since: None,
        })
    }

    /// Releases connections idle for longer than the idle timeout, and those idle for longer than
    /// the surplus idle timeout while another connection of their key stays; forgets closed ones;
    /// returns how many connections remain.
    pub fn release_idle(&self) -> usize {
        let now = self.inner.timer.now();
        let (idle, surplus) = (self.inner.config.idle_timeout, self.inner.config.surplus_idle_timeout);
        let mut keys = self.keys();
        keys.retain(|_, entry| {
            entry.conns.retain(|c| !c.closed.load(Ordering::Acquire));
            // Newest first: while another connection stays, one idle past the surplus timeout goes,
            // so that the oldest (the one new streams try first) is the one kept warm.
            let mut remaining = entry.conns.len();
            for i in (0..entry.conns.len()).rev() {
                let c = &mut entry.conns[i];
                if c.active.load(Ordering::Acquire) > 0 {
                    c.idle_since = None;
                    continue;
                }
                let idle_for = now.duration_since(*c.idle_since.get_or_insert(now));
                if idle_for >= idle || (idle_for >= surplus && remaining > 1) {
                    entry.conns.swap_remove(i);
                    remaining -= 1;
                }
            }
            !entry.conns.is_empty() || entry.connecting.is_some()
        });
        keys.values().map(|e| e.conns.len()).sum()
    }

    /// Runs [`Pool::release_idle`] periodically (every quarter of the shorter idle timeout),
    /// forever. Spawn it.
    pub async fn maintain(&self) {
        let config = &self.inner.config;
        let period = (config.idle_timeout.min(config.surplus_idle_timeout) / 4).max(Duration::from_millis(10));
        loop {
            self.inner.timer.sleep_until(self.inner.timer.now() + period).await;
            self.release_idle();
        }
    }

    /// Open connections per key.
    pub fn connections(&self, key: &PoolKey) -> usize {
        let mut keys = self.keys();
        keys.get_mut(key).map_or(0, |e| {
            e.conns.retain(|c| !c.closed.load(Ordering::Acquire));
            e.conns.len()
        })
    }

    /// Handshakes started since the pool was made.
    pub fn handshakes(&self) -> usize {
        self.inner.handshakes.load(Ordering::Relaxed)
    }

    /// The connector the pool makes its connections with.
    pub fn connector(&self) -> &C {
        &self.inner.connector
    }

    /// The executor the pool runs its connection drivers on (also fit, when it is generic over
    /// the future, for the inner connections of [`double`](crate::double) HBONE).
    pub fn executor(&self) -> &E {
        &self.inner.executor
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }
}
