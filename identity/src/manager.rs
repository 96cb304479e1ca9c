//! A certificate manager for many identities at once.
//!
//! A node proxy holds one SVID per workload identity on its node. [`CertManager`] keeps them:
//!
//! - [`CertManager::get`] returns a [`CertHandle`] for an identity, fetching it if needed. Any number
//!   of concurrent callers for one identity cause one fetch.
//! - Fetches wait in one queue ordered by [`Priority`]: a connection waiting for a certificate goes
//!   before a warm-up, which goes before a background refresh. At most
//!   [`ManagerConfig::max_in_flight`] fetches run at once.
//! - Each certificate is refreshed at half its lifetime (with jitter). A failed refresh keeps the
//!   still-valid certificate and is retried with exponential back-off (500 ms doubling, +-20 %,
//!   capped at 150 s, and at the source's [`CertSource::poll_interval`] for sources that poll).
//! - The back-off holds for every caller: while a retry is scheduled and no valid certificate is
//!   in service, [`CertManager::get`] answers the last error at once instead of fetching again, and
//!   [`CertManager::warm_up`] does nothing. Only the scheduled retry asks the source.
//! - A [`CertHandle`] always yields the current certificate and its rustls configs. Rotation swaps
//!   them for new handshakes; established connections keep what they were built with.
//! - [`CertManager::forget`] drops an identity whose workloads left.
//!
//! The manager never spawns: [`CertManager::run`] is the future that drives fetches and timers, and
//! the caller runs it on its executor. Time comes from a [`Timer`], so tests run rotation in virtual time.
//!
//! ```
//! use meshwire_identity::id::{SpiffeId, TrustDomain};
//! use meshwire_identity::manager::{CertManager, ManagerConfig, Priority};
//! use meshwire_identity::source::local_ca::LocalCa;
//! // The timer over tokio's clock (`meshwire-rt` with its `tokio` feature).
//! use meshwire_rt::TokioTimer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
//! let manager = CertManager::new(ca, TokioTimer, ManagerConfig::default());
//! let driver = manager.clone();
//! tokio::spawn(async move { driver.run().await });
//!
//! let id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/web")?;
//! let handle = manager.get(&id, Priority::Connection).await?;
//! let certs = handle.current();
//! assert_eq!(certs.svid().spiffe_id(), &id);
//! let _server_tls = certs.server_config();
//! manager.shutdown();
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rustls::{ClientConfig, ServerConfig};

use crate::bundle::BundleSet;
use crate::id::SpiffeId;
use crate::slot::{Begin, Slot};
use crate::source::{CertSource, Credentials, SourceError};
use crate::svid::{SvidError, X509Svid};
use crate::sync::Current;
use crate::time::Timer;
use crate::tls::{self, TlsError, TrustDomains};

/// Why the manager could not provide a certificate. `Clone`: one failure reaches every waiter.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The source failed.
    #[error("fetching the certificate of {id}: {source}")]
    Source {
        /// The identity.
        id: SpiffeId,
        /// What the source said.
        source: Box<SourceError>,
    },
    /// The source delivered an SVID that does not validate.
    #[error("the certificate delivered for {id} is not valid: {source}")]
    Invalid {
        /// The identity.
        id: SpiffeId,
        /// What is wrong with it.
        source: Box<SvidError>,
    },
    /// The source delivered an SVID for another identity.
    #[error("asked for the certificate of {requested}, the source delivered one for {delivered}")]
    WrongIdentity {
        /// The identity asked for.
        requested: SpiffeId,
        /// The identity of the delivered SVID.
        delivered: SpiffeId,
    },
    /// The TLS configs could not be built from the certificate.
    #[error("building TLS configs for {id}: {source}")]
    Tls {
        /// The identity.
        id: SpiffeId,
        /// What rustls said.
        source: Box<TlsError>,
    },
    /// The identity was forgotten while the caller waited.
    #[error("the identity {id} was removed from the certificate manager")]
    Forgotten {
        /// The identity.
        id: SpiffeId,
    },
    /// The manager was shut down.
    #[error("the certificate manager is shut down")]
    Shutdown,
}

/// Who is asking for a certificate; the queue serves the first before the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A connection is waiting for it.
    Connection,
    /// A workload arrived on the node; its certificate is fetched ahead of need.
    Warmup,
    /// A certificate in service reached its refresh time, or a failed fetch is retried.
    Refresh,
}

/// Settings of a [`CertManager`].
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Fetches running at once, at most.
    pub max_in_flight: usize,
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Relative jitter of retry delays (0.2 = +-20 %).
    pub backoff_jitter: f64,
    /// Relative jitter of the refresh time around half-life (0.05 = between 47.5 % and 52.5 % of the lifetime).
    pub refresh_jitter: f64,
    /// ALPN protocols of the TLS configs.
    pub alpn: Vec<Vec<u8>>,
    /// Trust domains whose clients the server configs accept; `None`: the SVID's own.
    pub accepted_trust_domains: Option<TrustDomains>,
    /// Seed of the jitter generator, for reproducible tests; `None`: random.
    pub seed: Option<u64>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(150),
            backoff_jitter: 0.2,
            refresh_jitter: 0.05,
            alpn: vec![b"h2".to_vec()],
            accepted_trust_domains: None,
            seed: None,
        }
    }
}

/// The certificate of one identity and the TLS configs built from it. Immutable: rotation makes a
/// new one.
pub struct WorkloadCerts {
    svid: X509Svid,
    bundles: BundleSet,
    server_config: Arc<ServerConfig>,
    alpn: Vec<Vec<u8>>,
    /// Monotonic time at which the certificate expires.
    expires_at: Instant,
}

impl std::fmt::Debug for WorkloadCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCerts")
            .field("svid", &self.svid)
            .finish_non_exhaustive()
    }
}

impl WorkloadCerts {
    /// The SVID.
    pub fn svid(&self) -> &X509Svid {
        &self.svid
    }

    /// The trust bundles delivered with it.
    pub fn bundles(&self) -> &BundleSet {
        &self.bundles
    }

    /// A server config presenting this SVID (built once per certificate).
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.server_config
    }

    /// A client config presenting this SVID and accepting only servers whose identity is in `expected`.
    pub fn client_config(&self, expected: Vec<SpiffeId>) -> Result<Arc<ClientConfig>, TlsError> {
        tls::client_config(&self.svid, &self.bundles, expected, self.alpn.clone()).map(Arc::new)
    }
}

/// A consumer's view of one identity's certificate: always the current one.
#[derive(Clone)]
pub struct CertHandle {
    id: SpiffeId,
    slot: Arc<CertSlot>,
}

impl std::fmt::Debug for CertHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CertHandle {
    /// The identity.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The current certificate and configs (a lock-free read).
    pub fn current(&self) -> Arc<WorkloadCerts> {
        // Handles are made only once a certificate was published, and a published value is never removed.
        self.slot
            .current()
            .expect("a handle exists only for a slot with a certificate")
    }
}

/// What the manager knows of one identity, for admin pages.
#[derive(Debug, Clone)]
pub struct CertStatus {
    /// The identity.
    pub id: SpiffeId,
    /// Expiry of the certificate in service, if any.
    pub not_after: Option<SystemTime>,
    /// When the next refresh or retry is scheduled, if one is.
    pub next_refresh: Option<Instant>,
    /// Whether a fetch is queued or running.
    pub pending: bool,
    /// The error of the last attempt, if it failed.
    pub last_error: Option<String>,
    /// The certificate in service (its chain and trust bundles), if any.
    pub current: Option<Arc<WorkloadCerts>>,
}

impl CertStatus {
    /// Whether a certificate is in service but its validity ended before `wall_now`.
    pub fn is_expired(&self, wall_now: SystemTime) -> bool {
        self.not_after.is_some_and(|t| t < wall_now)
    }
}

type CertSlot = Slot<WorkloadCerts, CertError>;

struct Entry {
    token: u64,
    slot: Arc<CertSlot>,
    queued: Option<(Priority, u64)>,
    refresh_key: Option<(Instant, u64)>,
    backoff: Option<Duration>,
    /// The error of the last attempt, if it failed; answered to callers until the retry.
    last_error: Option<CertError>,
}

struct State {
    entries: HashMap<SpiffeId, Entry>,
    queue: BTreeMap<(Priority, u64), SpiffeId>,
    timers: BTreeMap<(Instant, u64), SpiffeId>,
    in_flight: usize,
    next_seq: u64,
    rng: fastrand::Rng,
    driver: Option<Waker>,
}

impl State {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn enqueue(&mut self, id: &SpiffeId, priority: Priority) {
        let seq = self.seq();
        let Some(entry) = self.entries.get_mut(id) else { return };
        match entry.queued {
            Some(q) if q.0 <= priority => return,
            Some(q) => {
                self.queue.remove(&q);
            }
            None => {}
        }
        entry.queued = Some((priority, seq));
        self.queue.insert((priority, seq), id.clone());
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    fn schedule(&mut self, id: &SpiffeId, at: Instant) {
        let seq = self.seq();
        let Some(entry) = self.entries.get_mut(id) else { return };
        if let Some(old) = entry.refresh_key.take() {
            self.timers.remove(&old);
        }
        entry.refresh_key = Some((at, seq));
        self.timers.insert((at, seq), id.clone());
    }
}

struct Shared<S, T> {
    source: S,
    timer: T,
    config: ManagerConfig,
    state: Mutex<State>,
    /// Every entry's slot by identity, a copy of `state.entries`' slots replaced whenever an entry
    /// comes or goes (under the state's lock): [`CertManager::get`] finds a certificate in service
    /// without taking the lock, once per inbound HBONE connection and per pooled handshake.
    slots: Current<HashMap<SpiffeId, Arc<CertSlot>>>,
    shutdown: AtomicBool,
}

/// Keeps the certificates of many identities. Cheap to clone; clones share one manager.
pub struct CertManager<S, T> {
    shared: Arc<Shared<S, T>>,
}

impl<S, T> Clone for CertManager<S, T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

fn jitter(rng: &mut fastrand::Rng, d: Duration, relative: f64) -> Duration {
    let factor = 1.0 + relative * (rng.f64() * 2.0 - 1.0);
    d.mul_f64(factor.max(0.0))
}

impl<S: CertSource, T: Timer> CertManager<S, T> {
    /// A manager fetching from `source`, seeing time through `timer`.
    pub fn new(source: S, timer: T, config: ManagerConfig) -> Self {
        let rng = config.seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        Self {
            shared: Arc::new(Shared {
                source,
                timer,
                state: Mutex::new(State {
                    entries: HashMap::new(),
                    queue: BTreeMap::new(),
                    timers: BTreeMap::new(),
                    in_flight: 0,
                    next_seq: 0,
                    rng,
                    driver: None,
                }),
                config,
                slots: Current::empty(),
                shutdown: AtomicBool::new(false),
            }),
        }
    }

    /// The source.
    pub fn source(&self) -> &S {
        &self.shared.source
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Finds or creates the entry of `id` and asks its slot what to do, queueing a fetch at
    /// `priority` when one must start.
    fn begin(&self, id: &SpiffeId, priority: Priority) -> Result<(Arc<CertSlot>, Begin<WorkloadCerts>), CertError> {
        if self.shared.shutdown.load(Ordering::Acquire) {
            return Err(CertError::Shutdown);
        }
        let now = self.shared.timer.now();
        let mut st = self.state();
        if !st.entries.contains_key(id) {
            let token = st.seq();
            st.entries.insert(
                id.clone(),
                Entry {
                    token,
                    slot: Arc::new(Slot::new()),
                    queued: None,
                    refresh_key: None,
                    backoff: None,
                    last_error: None,
                },
            );
            self.index_slots(&st);
        }
        let entry = &st.entries[id];
        // Backing off after a failure, with no valid certificate: the scheduled retry is the next
        // fetch; callers get the last error rather than a fetch of their own.
        if let Some(error) = &entry.last_error
            && entry.refresh_key.is_some_and(|(at, _)| at > now)
            && entry.slot.current().is_none_or(|c| c.expires_at <= now)
        {
            return Err(error.clone());
        }
        let slot = entry.slot.clone();
        let begin = slot.begin(|c| c.expires_at > now);
        match begin {
            Begin::Ready(_) => {}
            Begin::Lead(_) => st.enqueue(id, priority),
            // A fetch is queued or running; a more urgent caller moves a queued one forward.
            Begin::Wait(_) => {
                if st.entries[id].queued.is_some() {
                    st.enqueue(id, priority);
                }
            }
        }
        Ok((slot, begin))
    }

    /// The certificate of `id`, fetched first if there is none in service (or it expired). While a
    /// failed fetch is backing off and no valid certificate is in service, the last error, at once.
    pub async fn get(&self, id: &SpiffeId, priority: Priority) -> Result<CertHandle, CertError> {
        if let Some(handle) = self.in_service(id) {
            return Ok(handle);
        }
        let (slot, begin) = self.begin(id, priority)?;
        let seen = match begin {
            Begin::Ready(_) => return Ok(CertHandle { id: id.clone(), slot }),
            Begin::Lead(seen) | Begin::Wait(seen) => seen,
        };
        match slot.wait(seen).await {
            Ok(_) => Ok(CertHandle { id: id.clone(), slot }),
            Err(e) => {
                // A failed refresh while the old certificate is still valid is no failure for the caller.
                let now = self.shared.timer.now();
                match slot.current() {
                    Some(c)
                        if c.expires_at > now && !matches!(e, CertError::Forgotten { .. } | CertError::Shutdown) =>
                    {
                        Ok(CertHandle { id: id.clone(), slot })
                    }
                    _ => Err(e),
                }
            }
        }
    }

    /// The handle of `id` when its certificate is in service and valid, read without the state's
    /// lock: what [`CertManager::begin`] answers as `Ready` in that case, the common one.
    fn in_service(&self, id: &SpiffeId) -> Option<CertHandle> {
        if self.shared.shutdown.load(Ordering::Acquire) {
            return None;
        }
        let slots = self.shared.slots.load()?;
        let slot = slots.get(id)?;
        let now = self.shared.timer.now();
        slot.current().filter(|c| c.expires_at > now)?;
        Some(CertHandle {
            id: id.clone(),
            slot: slot.clone(),
        })
    }

    /// Publishes the slots of `st`'s entries for [`CertManager::in_service`].
    fn index_slots(&self, st: &State) {
        let slots = st.entries.iter().map(|(id, e)| (id.clone(), e.slot.clone())).collect();
        self.shared.slots.store(Arc::new(slots));
    }

    /// Starts fetching the certificate of `id` ahead of need, unless it is in service or coming (or
    /// a failed fetch is backing off).
    pub fn warm_up(&self, id: &SpiffeId) {
        let _ = self.begin(id, Priority::Warmup);
    }

    /// The handle of `id` if a certificate is in service, without fetching.
    pub fn handle(&self, id: &SpiffeId) -> Option<CertHandle> {
        let st = self.state();
        let entry = st.entries.get(id)?;
        entry.slot.current()?;
        Some(CertHandle {
            id: id.clone(),
            slot: entry.slot.clone(),
        })
    }

    /// Stops keeping `id`: no more refreshes; callers waiting for it get [`CertError::Forgotten`].
    /// Handles already given out keep the last certificate.
    pub fn forget(&self, id: &SpiffeId) {
        let mut st = self.state();
        if let Some(entry) = st.entries.remove(id) {
            self.index_slots(&st);
            if let Some(q) = entry.queued {
                st.queue.remove(&q);
            }
            if let Some(t) = entry.refresh_key {
                st.timers.remove(&t);
            }
            entry.slot.close(CertError::Forgotten { id: id.clone() });
        }
    }

    /// Ends [`CertManager::run`]; waiting and later callers get [`CertError::Shutdown`].
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        let mut st = self.state();
        for (_, entry) in st.entries.drain() {
            entry.slot.close(CertError::Shutdown);
        }
        self.index_slots(&st);
        st.queue.clear();
        st.timers.clear();
        if let Some(w) = st.driver.take() {
            w.wake();
        }
    }

    /// What the manager knows of each identity, ordered by identity.
    pub fn status(&self) -> Vec<CertStatus> {
        let st = self.state();
        let mut out: Vec<_> = st.entries.iter().map(|(id, e)| Self::status_of(id, e)).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// What the manager knows of `id`, if it keeps it. Reads state only: never starts a fetch.
    pub fn status_for(&self, id: &SpiffeId) -> Option<CertStatus> {
        let st = self.state();
        st.entries.get(id).map(|e| Self::status_of(id, e))
    }

    fn status_of(id: &SpiffeId, e: &Entry) -> CertStatus {
        CertStatus {
            id: id.clone(),
            not_after: e.slot.current().map(|c| c.svid.not_after()),
            next_refresh: e.refresh_key.map(|k| k.0),
            pending: e.queued.is_some() || (e.refresh_key.is_none() && e.slot.current().is_none()),
            last_error: e.last_error.as_ref().map(ToString::to_string),
            current: e.slot.current(),
        }
    }

    /// Validates what a fetch delivered and builds the configs.
    fn accept(
        &self,
        id: &SpiffeId,
        creds: Credentials,
        wall: SystemTime,
        now: Instant,
    ) -> Result<WorkloadCerts, CertError> {
        let Credentials { svid, bundles } = creds;
        if svid.spiffe_id() != id {
            return Err(CertError::WrongIdentity {
                requested: id.clone(),
                delivered: svid.spiffe_id().clone(),
            });
        }
        svid.verify(&bundles, wall).map_err(|source| CertError::Invalid {
            id: id.clone(),
            source: Box::new(source),
        })?;
        let accepted = self
            .shared
            .config
            .accepted_trust_domains
            .clone()
            .unwrap_or_else(|| TrustDomains::only(id.trust_domain().clone()));
        let server_config =
            tls::server_config(&svid, &bundles, &accepted, self.shared.config.alpn.clone()).map_err(|source| {
                CertError::Tls {
                    id: id.clone(),
                    source: Box::new(source),
                }
            })?;
        let remaining = svid.not_after().duration_since(wall).unwrap_or_default();
        Ok(WorkloadCerts {
            expires_at: now + remaining,
            svid,
            bundles,
            server_config: Arc::new(server_config),
            alpn: self.shared.config.alpn.clone(),
        })
    }

    fn next_backoff(&self, entry: &mut Entry, rng: &mut fastrand::Rng) -> Duration {
        let cfg = &self.shared.config;
        let base = entry
            .backoff
            .map_or(cfg.initial_backoff, |b| (b * 2).min(cfg.max_backoff));
        entry.backoff = Some(base);
        jitter(rng, base, cfg.backoff_jitter)
    }

    fn complete(&self, id: &SpiffeId, token: u64, result: Result<Credentials, SourceError>) {
        let now = self.shared.timer.now();
        let wall = self.shared.timer.system_now();
        let outcome = result
            .map_err(|source| CertError::Source {
                id: id.clone(),
                source: Box::new(source),
            })
            .and_then(|creds| self.accept(id, creds, wall, now));
        let mut st = self.state();
        st.in_flight -= 1;
        let State { entries, rng, .. } = &mut *st;
        let Some(entry) = entries.get_mut(id).filter(|e| e.token == token) else {
            return; // forgotten while fetching
        };
        let slot = entry.slot.clone();
        let at = match outcome {
            Ok(certs) => {
                let cfg = &self.shared.config;
                let lifetime = certs.svid.lifetime();
                let elapsed = wall.duration_since(certs.svid.not_before()).unwrap_or_default();
                let unchanged = slot.current().is_some_and(|c| c.svid.same_chain(&certs.svid));
                let mut delay = jitter(rng, lifetime / 2, cfg.refresh_jitter).saturating_sub(elapsed);
                if let Some(poll) = self.shared.source.poll_interval() {
                    delay = if delay.is_zero() { poll } else { delay.min(poll) };
                }
                let delay = if delay.is_zero() {
                    // Past its refresh time already: the source has nothing newer; ask again with back-off.
                    self.next_backoff(entry, rng)
                } else {
                    entry.backoff = None;
                    delay
                };
                entry.last_error = None;
                if unchanged {
                    let current = slot.current().expect("unchanged implies a current value");
                    slot.publish(current);
                } else {
                    tracing::debug!(%id, not_after = %crate::svid::fmt_time(certs.svid.not_after()), "certificate in service");
                    slot.publish(Arc::new(certs));
                }
                now + delay
            }
            Err(e) => {
                let mut delay = self.next_backoff(entry, rng);
                if let Some(poll) = self.shared.source.poll_interval() {
                    // A source that polls is cheap to ask and may change at any time: ask again no
                    // later than its poll interval.
                    delay = delay.min(poll);
                }
                let keeps = slot.current().is_some_and(|c| c.expires_at > now);
                tracing::warn!(%id, error = %e, retry_in = ?delay, keeping_valid_certificate = keeps, "certificate fetch failed");
                entry.last_error = Some(e.clone());
                slot.fail(e);
                now + delay
            }
        };
        st.schedule(id, at);
    }

    /// Drives fetches and refresh timers until [`CertManager::shutdown`]. Run it on one task.
    pub async fn run(&self) {
        let mut fetches = FuturesUnordered::new();
        let mut sleep: Option<(Instant, Pin<Box<T::Sleep>>)> = None;
        poll_fn(|cx| {
            loop {
                if self.shared.shutdown.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
                let mut progressed = false;
                while let Poll::Ready(Some((id, token, result))) = fetches.poll_next_unpin(cx) {
                    self.complete(&id, token, result);
                    progressed = true;
                }

                let now = self.shared.timer.now();
                let mut starts = Vec::new();
                let next_timer = {
                    let mut st = self.state();
                    match &st.driver {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => st.driver = Some(cx.waker().clone()),
                    }
                    // Due refreshes join the queue.
                    while let Some(entry) = st.timers.first_entry() {
                        if entry.key().0 > now {
                            break;
                        }
                        let id = entry.remove();
                        let Some(e) = st.entries.get_mut(&id) else { continue };
                        e.refresh_key = None;
                        if e.slot.try_lead() {
                            st.enqueue(&id, Priority::Refresh);
                        }
                    }
                    while st.in_flight < self.shared.config.max_in_flight.max(1) {
                        let Some((_, id)) = st.queue.pop_first() else { break };
                        let Some(e) = st.entries.get_mut(&id) else { continue };
                        e.queued = None;
                        let token = e.token;
                        st.in_flight += 1;
                        starts.push((id, token));
                    }
                    st.timers.first_key_value().map(|(k, _)| k.0)
                };
                for (id, token) in starts {
                    let source = &self.shared.source;
                    fetches.push(async move {
                        let result = source.fetch(&id).await;
                        (id, token, result)
                    });
                    progressed = true;
                }
                if progressed {
                    continue;
                }
                match next_timer {
                    Some(deadline) => {
                        if sleep.as_ref().is_none_or(|(d, _)| *d != deadline) {
                            sleep = Some((deadline, Box::pin(self.shared.timer.sleep_until(deadline))));
                        }
                        if let Some((_, s)) = sleep.as_mut()
                            && s.as_mut().poll(cx).is_ready()
                        {
                            sleep = None;
                            continue;
                        }
                    }
                    None => sleep = None,
                }
                return Poll::Pending;
            }
        })
        .await
    }
}
