//! Published configuration snapshots, the configuration file watcher, and the registry that closes
//! established connections a new policy denies.
//!
//! The control plane builds an immutable [`Snapshot`] (the [`State`] and the [`PolicySet`] of one
//! valid configuration) and publishes it through [`Published`], an `ArcSwap` cell: data-path threads
//! read the current snapshot without locks and without waiting on the control thread.
//!
//! [`ConfigWatcher`] keeps [`Published`] in step with the configuration file. It applies a change only
//! once the writer is done with the file: it watches the file's directory with inotify and looks at
//! the file when a writer closes it after writing or when it is renamed into place, never while a
//! writer holds it open; where inotify is unavailable it polls on an interval given by a
//! caller-provided [`Timer`] and applies a change once the file has stayed the same for a settle
//! period. It publishes each valid change as a new generation and keeps the current snapshot when a
//! change is invalid, the file is empty, or the file is briefly missing:
//!
//! ```
//! use meshwire_dataplane::watch::{ConfigWatcher, PollOutcome};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("config.yaml");
//! std::fs::write(&path, "workloads:\n- name: a\n  workloadIps: [\"10.0.0.1\"]\n")?;
//! let (watcher, published) = ConfigWatcher::start(&path)?;
//! assert_eq!(published.load().generation, 1);
//!
//! std::fs::write(&path, "workloads:\n- name: a\n  workloadIps: [\"10.0.0.x\"]\n")?;
//! assert!(matches!(watcher.poll_once(), PollOutcome::Rejected(_)));
//! assert_eq!(published.load().state.workloads().next().unwrap().workload_ips[0].to_string(), "10.0.0.1");
//!
//! std::fs::write(&path, "workloads:\n- name: a\n  workloadIps: [\"10.0.0.2\"]\n")?;
//! assert!(matches!(watcher.poll_once(), PollOutcome::Applied(2)));
//! assert_eq!(published.load().state.workloads().next().unwrap().workload_ips[0].to_string(), "10.0.0.2");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`ConnectionRegistry`] holds the authorization attributes of established connections; after a
//! new snapshot, [`ConnectionRegistry::reevaluate`] judges each against the new policies and fires
//! the [`CloseSignal`] of those now denied, which the connection's copy loop selects on.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use meshwire_identity::id::SpiffeId;
use meshwire_identity::time::Timer;
use tokio::sync::watch;

use crate::rbac::{Connection, PolicySet, WorkloadRef};
use crate::state::State;
use crate::telemetry::shared::Shared;
use crate::xds::{ConfigError, ConfigWarning, LOCATED_WARNINGS, LocalConfig, Workload};

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// One valid configuration, indexed and immutable: what the data path reads.
#[derive(Debug)]
pub struct Snapshot {
    /// Workloads, services and policies, indexed for routing.
    pub state: Arc<State>,
    /// The configuration's authorization policies, indexed for evaluation.
    pub policies: Arc<PolicySet>,
    /// Which publication this is: 1 for the first configuration, one more for each change applied.
    /// 0 is the empty snapshot of [`Snapshot::empty`].
    pub generation: u64,
    /// The file the configuration was read from, if it was read from one.
    pub source: Option<PathBuf>,
    /// When the configuration was loaded (wall-clock time, for the admin page).
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// Indexes `config`: its [`State`], and a [`PolicySet`] of its policies.
    pub fn new(config: LocalConfig, generation: u64, source: Option<PathBuf>, loaded_at: SystemTime) -> Self {
        let policies = PolicySet::new(config.policies.iter().cloned());
        Self {
            state: Arc::new(State::new(config)),
            policies: Arc::new(policies),
            generation,
            source,
            loaded_at,
        }
    }

    /// A snapshot of a state already indexed and its policies (the state's, indexed).
    pub fn from_parts(
        state: Arc<State>,
        policies: Arc<PolicySet>,
        generation: u64,
        source: Option<PathBuf>,
        loaded_at: SystemTime,
    ) -> Self {
        Self {
            state,
            policies,
            generation,
            source,
            loaded_at,
        }
    }

    /// Generation 0: no workloads, services or policies, no source, loaded at the Unix epoch.
    pub fn empty() -> Self {
        Self::new(LocalConfig::default(), 0, None, SystemTime::UNIX_EPOCH)
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::empty()
    }
}

struct PublishedInner {
    current: ArcSwap<Snapshot>,
    /// Serialises writers, so that generations assigned by [`Published::publish`] increase. Readers
    /// never take it.
    writer: Mutex<()>,
    /// Carries the generation of each store to subscribers.
    changes: watch::Sender<u64>,
}

/// The current [`Snapshot`], shared between the control plane (one writer) and the data path (many
/// readers). Cloning is cheap (one reference count) and every clone sees the same snapshot.
///
/// Reads are lock-free and never wait on writers ([`arc_swap::ArcSwap`]). Changes are announced on a
/// [`tokio::sync::watch`] channel carrying the new generation: tokio's `sync` primitives need no tokio
/// runtime, so a glommio executor or a plain thread (`Receiver::has_changed`) can use it as well. A
/// watch channel only keeps the latest value: a slow subscriber skips intermediate generations,
/// which is right for snapshots, where only the latest matters.
#[derive(Clone)]
pub struct Published {
    inner: Arc<PublishedInner>,
}

impl Published {
    /// A cell holding `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        let (changes, _) = watch::channel(snapshot.generation);
        Self {
            inner: Arc::new(PublishedInner {
                current: ArcSwap::from_pointee(snapshot),
                writer: Mutex::new(()),
                changes,
            }),
        }
    }

    /// The current snapshot, as an `Arc` the caller may keep as long as it likes (a connection keeps
    /// the snapshot it started with). Lock-free.
    pub fn load(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// The current snapshot, borrowed without touching its reference count: the cheapest read, for a
    /// short look on a hot path. Keep the guard briefly (a thread holding many guards makes later
    /// loads slower); use [`Published::load`] to keep the snapshot.
    pub fn load_guard(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.current.load()
    }

    /// The generation of the current snapshot.
    pub fn generation(&self) -> u64 {
        self.inner.current.load().generation
    }

    /// Replaces the current snapshot with `snapshot` as it is, and tells subscribers its generation.
    ///
    /// The caller chooses the generation; it should be greater than the current one.
    /// [`Published::publish`] chooses it.
    pub fn store(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let _writer = lock(&self.inner.writer);
        self.store_locked(Arc::new(snapshot))
    }

    /// Indexes `config` as the next generation (one more than the current one), publishes it and
    /// returns it.
    pub fn publish(&self, config: LocalConfig, source: Option<PathBuf>, loaded_at: SystemTime) -> Arc<Snapshot> {
        let _writer = lock(&self.inner.writer);
        let generation = self.inner.current.load().generation + 1;
        self.store_locked(Arc::new(Snapshot::new(config, generation, source, loaded_at)))
    }

    /// Publishes a state already indexed and its policies as the next generation, and returns the
    /// snapshot (for a source that updates its state incrementally, [`State::update`]).
    pub fn publish_parts(
        &self,
        state: Arc<State>,
        policies: Arc<PolicySet>,
        source: Option<PathBuf>,
        loaded_at: SystemTime,
    ) -> Arc<Snapshot> {
        let _writer = lock(&self.inner.writer);
        let generation = self.inner.current.load().generation + 1;
        let snapshot = Snapshot::from_parts(state, policies, generation, source, loaded_at);
        self.store_locked(Arc::new(snapshot))
    }

    fn store_locked(&self, snapshot: Arc<Snapshot>) -> Arc<Snapshot> {
        self.inner.current.store(Arc::clone(&snapshot));
        // `send_replace` stores the value even when nobody subscribes.
        self.inner.changes.send_replace(snapshot.generation);
        snapshot
    }

    /// A receiver of the generation of each new snapshot: `changed().await` completes after the next
    /// store, then [`Published::load`] reads it. Works on any executor, or none (`has_changed`).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}

impl Default for Published {
    /// A cell holding [`Snapshot::empty`].
    fn default() -> Self {
        Self::new(Snapshot::empty())
    }
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.load_guard();
        f.debug_struct("Published")
            .field("generation", &current.generation)
            .field("source", &current.source)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration file watcher

/// How long a change seen by polling must stay the same before it is applied, where inotify is
/// unavailable and the watcher polls (see [`ConfigWatcher::run_polling`]).
pub const SETTLE_PERIOD: Duration = Duration::from_secs(2);

/// What one look at the configuration file found.
#[derive(Debug)]
#[non_exhaustive]
pub enum PollOutcome {
    /// The file holds the configuration already published (or the change already rejected).
    Unchanged,
    /// The file changed and is valid: a snapshot of this generation was published.
    Applied(u64),
    /// The file changed and is invalid, empty or not UTF-8: the current snapshot stays. Reported
    /// once per distinct content; [`ConfigWatcher::last_error`] keeps it.
    Rejected(ConfigError),
    /// The file could not be read (most often: it is missing while being replaced): the current
    /// snapshot stays. Reported on every poll until the file is back.
    Missing(io::Error),
    /// Polling only ([`ConfigWatcher::poll_settled_at`]): the file changed, and has not yet stayed the
    /// same for the settle period. Nothing is applied yet.
    Settling,
}

/// What the watcher has seen of the file.
#[derive(Debug, Default)]
struct Seen {
    /// The content of the published configuration; `None` before the first one (see
    /// [`ConfigWatcher::new`]).
    applied: Option<Vec<u8>>,
    /// The content last rejected, so that the same invalid file is judged (and logged) once.
    rejected: Option<Vec<u8>>,
    /// Why the file last failed, until it holds a valid configuration again.
    last_error: Option<ConfigError>,
    /// Whether the last poll could not read the file (to log the transitions only).
    unreadable: bool,
    /// Polling only: a changed content and when it was first seen, until it settles.
    settling: Option<(Vec<u8>, Instant)>,
}

impl Seen {
    /// Whether `bytes` were judged already: the published content, or the content last rejected.
    fn judged(&mut self, bytes: &[u8]) -> bool {
        if self.applied.as_deref() == Some(bytes) {
            // Back to (or still at) the published configuration.
            self.rejected = None;
            self.last_error = None;
            return true;
        }
        self.rejected.as_deref() == Some(bytes)
    }
}

/// Keeps a [`Published`] in step with a configuration file, applying a change only once the writer
/// is done with the file.
///
/// [`ConfigWatcher::run`] watches the file's directory with inotify and looks at the file when a
/// writer closes it after writing (`IN_CLOSE_WRITE`), when an entry is renamed into the directory
/// (`IN_MOVED_TO`: a file renamed into place, or the `..data` symlink of a Kubernetes ConfigMap
/// volume), or when a symlink is created there. Writes in progress (`IN_MODIFY`), and closes
/// without a write, are not looked at: a file rewritten in place is never read half-written. Where
/// the configuration is a symlink to a file in another directory, that directory is watched too.
/// Where inotify is unavailable (or the directory's watch is lost), the watcher polls instead
/// ([`ConfigWatcher::run_polling`]), and applies a change only once the file has stayed the same
/// for [`SETTLE_PERIOD`].
///
/// A look reads the file and compares its bytes with those of the last configuration seen, so that a
/// look that finds nothing new costs one read; the file is parsed only when its bytes changed.
///
/// An invalid change is logged (`tracing::warn!`, with the [`ConfigError`] naming the field and
/// line), kept for [`ConfigWatcher::last_error`], and changes nothing: the current snapshot stays.
/// So does an empty file ([`ConfigError::Empty`]), and a file that cannot be read (missing while it
/// is being replaced). An applied content's unknown fields ([`ConfigWarning`]) are logged
/// (`tracing::warn!`, naming the field and line, up to [`LOCATED_WARNINGS`] lines and a count of the
/// rest) when it is applied, and so once per content of the file.
///
/// With [`ConfigWatcher::with_registry`], every applied snapshot is also handed to
/// [`ConnectionRegistry::reevaluate`], closing established connections the new policies deny; a
/// proxy with a registry per core adds each of them.
pub struct ConfigWatcher {
    path: PathBuf,
    published: Published,
    registries: Vec<ConnectionRegistry>,
    seen: Mutex<Seen>,
    /// The inotify watch set up by [`ConfigWatcher::start`] or [`ConfigWatcher::new`] (before the
    /// first read, so that no change after it is missed), until [`ConfigWatcher::run`] takes it.
    notify: Mutex<Option<DirWatch>>,
}

impl ConfigWatcher {
    /// Loads the configuration file at `path` and publishes it as generation 1.
    ///
    /// Fails when the file cannot be read, is empty or is invalid: a proxy must not start on a
    /// configuration it cannot apply. The error names the file, or the field and line.
    pub fn start(path: impl Into<PathBuf>) -> Result<(ConfigWatcher, Published), ConfigError> {
        let path = path.into();
        let notify = DirWatch::new(&path);
        let bytes = std::fs::read(&path).map_err(|err| read_error(&path, &err))?;
        let (config, warnings) = LocalConfig::parse_file_with_warnings(&path, &bytes)?;
        log_warnings(Some(&path), &warnings);
        let published = Published::new(Snapshot::new(config, 1, Some(path.clone()), SystemTime::now()));
        tracing::info!(path = %path.display(), generation = 1, "loaded the local configuration");
        let watcher = ConfigWatcher {
            path,
            published: published.clone(),
            registries: Vec::new(),
            seen: Mutex::new(Seen {
                applied: Some(bytes),
                ..Seen::default()
            }),
            notify: Mutex::new(notify.ok()),
        };
        Ok((watcher, published))
    }

    /// A watcher of `path` that publishes to `published`, without reading the file yet: the first
    /// poll that finds a valid file publishes it (as one more than the current generation), even if
    /// `published` already holds the same configuration.
    pub fn new(path: impl Into<PathBuf>, published: Published) -> Self {
        let path = path.into();
        let notify = DirWatch::new(&path).ok();
        Self {
            path,
            published,
            registries: Vec::new(),
            seen: Mutex::new(Seen::default()),
            notify: Mutex::new(notify),
        }
    }

    /// Re-evaluates the connections of `registry` after each applied change (in addition to the
    /// registries added before).
    pub fn with_registry(mut self, registry: ConnectionRegistry) -> Self {
        self.registries.push(registry);
        self
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cell the watcher publishes to.
    pub fn published(&self) -> &Published {
        &self.published
    }

    /// Why the file last failed to load (an invalid change, or a read error), while it does not hold
    /// a valid configuration; `None` once it does again. For the admin page.
    pub fn last_error(&self) -> Option<ConfigError> {
        lock(&self.seen).last_error.clone()
    }

    /// Reads the file once and publishes it if it changed and is valid; see [`PollOutcome`]. The
    /// snapshot's `loaded_at` is [`SystemTime::now`]; [`ConfigWatcher::poll_once_at`] takes it.
    ///
    /// This applies what the file holds now: call it when the writer is known to be done (an
    /// inotify close-after-write or rename, or a test that wrote the file).
    pub fn poll_once(&self) -> PollOutcome {
        self.poll_once_at(SystemTime::now())
    }

    /// [`ConfigWatcher::poll_once`], with the wall-clock time to record as the snapshot's `loaded_at`.
    pub fn poll_once_at(&self, now: SystemTime) -> PollOutcome {
        let mut seen = lock(&self.seen);
        seen.settling = None;
        let bytes = match self.read(&mut seen) {
            Ok(bytes) => bytes,
            Err(err) => return PollOutcome::Missing(err),
        };
        if seen.judged(&bytes) {
            return PollOutcome::Unchanged;
        }
        self.judge(seen, bytes, now)
    }

    /// Reads the file once, for a watcher that polls without knowing whether a writer is done: a
    /// changed content is applied (or rejected) only once it was seen the same for `settle` (from
    /// `now`, monotonic); until then the outcome is [`PollOutcome::Settling`]. `wall_now` is recorded
    /// as the snapshot's `loaded_at`.
    pub fn poll_settled_at(&self, now: Instant, wall_now: SystemTime, settle: Duration) -> PollOutcome {
        let mut seen = lock(&self.seen);
        let bytes = match self.read(&mut seen) {
            Ok(bytes) => bytes,
            Err(err) => {
                seen.settling = None;
                return PollOutcome::Missing(err);
            }
        };
        if seen.judged(&bytes) {
            seen.settling = None;
            return PollOutcome::Unchanged;
        }
        match &seen.settling {
            Some((pending, since)) if *pending == bytes => {
                if now.saturating_duration_since(*since) < settle {
                    return PollOutcome::Settling;
                }
                seen.settling = None;
                self.judge(seen, bytes, wall_now)
            }
            _ => {
                tracing::debug!(path = %self.path.display(), "the local configuration changed; waiting for it to settle");
                seen.settling = Some((bytes, now));
                PollOutcome::Settling
            }
        }
    }

    /// Reads the file; a read error (logged once until the file is readable again) keeps the
    /// current snapshot.
    fn read(&self, seen: &mut Seen) -> io::Result<Vec<u8>> {
        let path = self.path.display();
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                if std::mem::take(&mut seen.unreadable) {
                    tracing::info!(path = %path, "the local configuration is readable again");
                }
                Ok(bytes)
            }
            Err(err) => {
                if !seen.unreadable {
                    tracing::warn!(
                        path = %path,
                        error = %err,
                        generation = self.published.generation(),
                        "cannot read the local configuration; keeping the current one"
                    );
                }
                seen.unreadable = true;
                seen.last_error = Some(read_error(&self.path, &err));
                Err(err)
            }
        }
    }

    /// Parses changed content and publishes it, or keeps the current snapshot and records why not.
    fn judge(&self, mut seen: MutexGuard<'_, Seen>, bytes: Vec<u8>, now: SystemTime) -> PollOutcome {
        let path = self.path.display();
        match LocalConfig::parse_file_with_warnings(&self.path, &bytes) {
            Ok((config, warnings)) => {
                // Once per content applied: unchanged content is not parsed again.
                log_warnings(Some(&self.path), &warnings);
                let snapshot = self.published.publish(config, Some(self.path.clone()), now);
                tracing::info!(
                    path = %path,
                    generation = snapshot.generation,
                    "applied a change of the local configuration"
                );
                *seen = Seen {
                    applied: Some(bytes),
                    ..Seen::default()
                };
                drop(seen);
                if !self.registries.is_empty() {
                    let closed: usize = self.registries.iter().map(|r| r.reevaluate(&snapshot)).sum();
                    if closed > 0 {
                        tracing::info!(
                            generation = snapshot.generation,
                            closed,
                            "closed established connections the new policies deny"
                        );
                    }
                }
                PollOutcome::Applied(snapshot.generation)
            }
            Err(err) => {
                tracing::error!(
                    path = %path,
                    error = %err,
                    generation = self.published.generation(),
                    "rejected an invalid change of the local configuration; keeping the current one"
                );
                seen.rejected = Some(bytes);
                seen.last_error = Some(err.clone());
                PollOutcome::Rejected(err)
            }
        }
    }

    /// Watches the file forever: with inotify (see [`ConfigWatcher`]), or, where inotify is
    /// unavailable or its watch of the directory is lost, by polling every `interval` (measured by
    /// `timer`) with a [`SETTLE_PERIOD`], trying inotify again at each poll. Drop the future to stop
    /// watching.
    ///
    /// Needs a tokio runtime with IO enabled (inotify's descriptor is registered with its reactor).
    /// The file is read on the calling thread (a few kilobytes, once per change): run it on the
    /// control-plane thread, not on a data-path core.
    pub async fn run<T: Timer>(&self, timer: T, interval: Duration) -> Infallible {
        let mut fallback_logged = false;
        let mut catch_up = false;
        loop {
            let notify = lock(&self.notify).take().map_or_else(|| DirWatch::new(&self.path), Ok);
            let error = match notify.and_then(|notify| notify.into_stream(&self.path)) {
                Ok(stream) => {
                    tracing::info!(path = %self.path.display(), "watching the local configuration with inotify");
                    fallback_logged = false;
                    if catch_up {
                        // Changes made while the directory was not watched.
                        self.poll_once_at(timer.system_now());
                    }
                    self.run_notified(stream, &timer).await
                }
                Err(error) => error,
            };
            catch_up = true;
            if !fallback_logged {
                tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    interval = ?interval,
                    settle = ?SETTLE_PERIOD,
                    "cannot watch the local configuration with inotify; polling it instead"
                );
                fallback_logged = true;
            }
            self.poll_settled_at(timer.now(), timer.system_now(), SETTLE_PERIOD);
            let deadline = timer.now() + interval;
            timer.sleep_until(deadline).await;
        }
    }

    /// Looks at the file after each event of `stream` that says a writer is done; returns why the
    /// watch ended (the directory was removed or moved, or reading events failed).
    async fn run_notified<T: Timer>(&self, mut stream: NotifyStream, timer: &T) -> io::Error {
        use futures_util::StreamExt as _;
        loop {
            let event = match stream.events.next().await {
                Some(Ok(event)) => event,
                Some(Err(error)) => return error,
                None => return io::Error::other("the inotify event stream ended"),
            };
            match stream.classify(&event) {
                Notified::Look => {
                    // The watches first, so that the next change of where the file links is seen.
                    stream.follow_symlink(&self.path);
                    self.poll_once_at(timer.system_now());
                }
                Notified::Ignore => {}
                Notified::Lost => {
                    return io::Error::other(format!("the directory of {} was removed or moved", self.path.display()));
                }
            }
        }
    }

    /// Polls the file now and then every `interval` (measured by `timer`), forever, applying a change
    /// once it has stayed the same for `settle` ([`ConfigWatcher::poll_settled_at`]); no inotify.
    /// Drop the future to stop watching.
    pub async fn run_polling<T: Timer>(&self, timer: T, interval: Duration, settle: Duration) -> Infallible {
        loop {
            self.poll_settled_at(timer.now(), timer.system_now(), settle);
            let deadline = timer.now() + interval;
            timer.sleep_until(deadline).await;
        }
    }
}

impl fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field("path", &self.path)
            .field("published", &self.published)
            .field("registries", &self.registries)
            .field("last_error", &self.last_error())
            .finish()
    }
}

/// Logs the warnings of a local configuration being applied (unknown fields, ignored), one line
/// each for the first [`LOCATED_WARNINGS`] and one line counting the rest, naming the file
/// (`source`) when there is one.
pub(crate) fn log_warnings(source: Option<&Path>, warnings: &[ConfigWarning]) {
    let source = source
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "(inline)".to_owned());
    for warning in warnings.iter().take(LOCATED_WARNINGS) {
        tracing::warn!(path = %source, "local configuration: {warning}");
    }
    if let Some(rest) = warnings.len().checked_sub(LOCATED_WARNINGS).filter(|rest| *rest > 0) {
        tracing::warn!(path = %source, "local configuration: {rest} more unknown fields, ignored and not listed");
    }
}

fn read_error(path: &Path, err: &io::Error) -> ConfigError {
    ConfigError::Read {
        file: path.to_owned(),
        kind: err.kind(),
        message: err.to_string(),
    }
}

/// What the events of a file's directory are watched for.
fn dir_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// The directory of `path` (`.` for a bare file name).
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The directory of the file a configuration path links to, when it is not the path's own directory:
/// its path, its watch, and the file's name there.
type Target = Option<(PathBuf, WatchDescriptor, OsString)>;

/// Watches, through `watches`, the directory of the file `path` resolves to, when it is not the
/// directory of `path` itself (`own`: the configuration is a symlink to a file elsewhere, which may
/// be edited in place there); drops the watch of a directory it no longer links to.
fn follow_symlink(watches: &mut Watches, own: &WatchDescriptor, target: &mut Target, path: &Path) {
    let resolved = std::fs::canonicalize(path).ok();
    let own_dir = std::fs::canonicalize(dir_of(path)).ok();
    let wanted = resolved.and_then(|file| {
        let dir = dir_of(&file);
        let name = file.file_name()?.to_owned();
        (Some(&dir) != own_dir.as_ref()).then_some((dir, name))
    });
    if let (Some((dir, _, name)), Some((want_dir, want_name))) = (&*target, &wanted)
        && dir == want_dir
        && name == want_name
    {
        return;
    }
    if let Some((_, wd, _)) = target.take() {
        let _ = watches.remove(wd);
    }
    if let Some((dir, name)) = wanted {
        match watches.add(&dir, dir_mask()) {
            Ok(wd) if wd != *own => *target = Some((dir, wd, name)),
            Ok(_) => {}
            Err(error) => tracing::warn!(
                dir = %dir.display(),
                %error,
                "cannot watch the directory the local configuration links to"
            ),
        }
    }
}

/// An inotify instance watching the directory of the configuration file (and of the file it links
/// to), not yet registered with a runtime (so that [`ConfigWatcher::start`] can set it up without
/// one).
struct DirWatch {
    inotify: Inotify,
    dir: WatchDescriptor,
    target: Target,
}

impl DirWatch {
    fn new(path: &Path) -> io::Result<DirWatch> {
        let inotify = Inotify::init()?;
        let mut watches = inotify.watches();
        let dir = watches.add(dir_of(path), dir_mask())?;
        let mut target = None;
        follow_symlink(&mut watches, &dir, &mut target, path);
        Ok(DirWatch { inotify, dir, target })
    }

    /// Registers the instance with the current tokio runtime.
    fn into_stream(self, path: &Path) -> io::Result<NotifyStream> {
        let events = self.inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(NotifyStream {
            events,
            dir: self.dir,
            dir_path: dir_of(path),
            file_name: path.file_name().map(OsStr::to_owned).unwrap_or_default(),
            target: self.target,
        })
    }
}

/// What an event of the watched directories calls for.
#[derive(Debug, PartialEq, Eq)]
enum Notified {
    /// A writer may be done with the file: look at it.
    Look,
    /// Nothing to do.
    Ignore,
    /// The directory's watch is gone.
    Lost,
}

/// The inotify events of the configuration file's directory (and of the directory of the file it
/// links to, if it is a symlink).
struct NotifyStream {
    events: EventStream<Vec<u8>>,
    dir: WatchDescriptor,
    dir_path: PathBuf,
    file_name: OsString,
    /// The directory of the file the configuration links to, when it is another directory.
    target: Target,
}

impl NotifyStream {
    fn classify(&mut self, event: &inotify::Event<OsString>) -> Notified {
        let mask = event.mask;
        if mask.contains(EventMask::Q_OVERFLOW) {
            // Events were dropped: one of them may have been the writer's close.
            return Notified::Look;
        }
        let name = event.name.as_deref();
        if event.wd == self.dir {
            if mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                return Notified::Lost;
            }
            if mask.contains(EventMask::CLOSE_WRITE) && name == Some(self.file_name.as_os_str()) {
                return Notified::Look;
            }
            if mask.contains(EventMask::MOVED_TO) {
                // The file renamed into place, or a directory symlink on its path swapped.
                return Notified::Look;
            }
            if mask.contains(EventMask::CREATE)
                && let Some(name) = name
                && self.dir_path_is_symlink(name)
            {
                return Notified::Look;
            }
            return Notified::Ignore;
        }
        if let Some((_, wd, file)) = &self.target
            && event.wd == *wd
        {
            if mask.contains(EventMask::IGNORED) {
                self.target = None;
                return Notified::Look;
            }
            if mask.intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO) && name == Some(file.as_os_str()) {
                return Notified::Look;
            }
        }
        Notified::Ignore
    }

    /// Whether `name` in the watched directory is a symlink (a created symlink has no close event).
    fn dir_path_is_symlink(&self, name: &OsStr) -> bool {
        std::fs::symlink_metadata(self.dir_path.join(name)).is_ok_and(|meta| meta.file_type().is_symlink())
    }

    /// Keeps the watch of the directory the file links to current; see [`follow_symlink`].
    fn follow_symlink(&mut self, path: &Path) {
        follow_symlink(&mut self.events.watches(), &self.dir, &mut self.target, path);
    }
}

// ---------------------------------------------------------------------------------------------
// Established connections and their close signals

/// Why a connection was told to close.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The policies of a new snapshot deny the connection.
    PolicyDenied {
        /// The snapshot's generation.
        generation: u64,
        /// The DENY policy that matched (`namespace/name`); `None` when ALLOW policies apply and
        /// none matches.
        policy: Option<String>,
        /// The decision, as ztunnel words it: `denied: explicitly denied by: ns/name`.
        message: String,
    },
    /// The pod the connection was for is no longer served (in-pod mode: istio-cni deleted it, or
    /// left it out of a snapshot).
    PodRemoved {
        /// The pod's Kubernetes UID.
        uid: String,
    },
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PolicyDenied {
                generation, message, ..
            } => write!(f, "configuration generation {generation}: {message}"),
            CloseReason::PodRemoved { uid } => write!(f, "pod {uid} is no longer served"),
        }
    }
}

#[derive(Debug, Default)]
struct SignalInner {
    /// Set once, when the connection must close.
    reason: OnceLock<CloseReason>,
    /// The task waiting on the [`CloseSignal`].
    waker: Mutex<Option<Waker>>,
}

impl SignalInner {
    /// Records `reason` and wakes the waiter; `false` if the signal had fired already.
    fn fire(&self, reason: CloseReason) -> bool {
        if self.reason.set(reason).is_err() {
            return false;
        }
        // Taken under the lock that `poll` registers under, after the reason is set: either `poll`
        // sees the reason, or its waker is here.
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
        true
    }
}

/// A future that completes, with the reason, once the connection must close: select on it next to
/// the connection's copy loop.
///
/// Runtime-agnostic (a reference-counted flag and a waker; no timer, no runtime) and one pointer in
/// size. Meant for one waiting task; it is not `Clone` (one task drives a connection).
#[derive(Debug)]
#[must_use = "a close signal does nothing unless polled or checked"]
pub struct CloseSignal {
    inner: Arc<SignalInner>,
}

impl CloseSignal {
    /// Why the connection must close, if it must; never waits.
    pub fn reason(&self) -> Option<&CloseReason> {
        self.inner.reason.get()
    }

    /// Whether the connection must close.
    pub fn is_closed(&self) -> bool {
        self.reason().is_some()
    }
}

impl Future for CloseSignal {
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if let Some(reason) = self.inner.reason.get() {
            return Poll::Ready(reason.clone());
        }
        let mut waker = lock(&self.inner.waker);
        // Checked again under the lock: `fire` sets the reason before taking the waker.
        if let Some(reason) = self.inner.reason.get() {
            return Poll::Ready(reason.clone());
        }
        match &mut *waker {
            Some(stored) if stored.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// The authorization attributes of an established connection: what [`PolicySet::evaluate`] needs to
/// judge it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionAttrs {
    /// The destination workload's uid. When set and the new snapshot still has the workload, its
    /// namespace and policy keys are taken from there (a change may select new policies for it);
    /// otherwise `namespace` and `policies` are used.
    pub workload_uid: Option<String>,
    /// The destination workload's namespace.
    pub namespace: String,
    /// The keys (`namespace/name`) of the policies that select the destination workload.
    pub policies: Vec<String>,
    /// The peer's verified identity; `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    /// The source address.
    pub src: SocketAddr,
    /// The destination address (workload address and port).
    pub dst: SocketAddr,
}

impl ConnectionAttrs {
    /// A connection to `workload` (its uid, namespace and policy keys).
    pub fn for_workload(workload: &Workload, src_identity: Option<SpiffeId>, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            workload_uid: Some(workload.uid.clone()),
            namespace: workload.namespace().to_owned(),
            policies: workload.authorization_policies.clone(),
            src_identity,
            src,
            dst,
        }
    }

    /// A connection to a workload of `namespace` selecting `policies`, not tied to a workload uid.
    pub fn new(
        namespace: impl Into<String>,
        policies: Vec<String>,
        src_identity: Option<SpiffeId>,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        Self {
            workload_uid: None,
            namespace: namespace.into(),
            policies,
            src_identity,
            src,
            dst,
        }
    }

    /// Judges the connection from `src` against `snapshot`'s policies; `Some` with the reason if
    /// denied.
    fn denied_by(&self, src: SocketAddr, snapshot: &Snapshot) -> Option<CloseReason> {
        let workload = self
            .workload_uid
            .as_deref()
            .and_then(|uid| snapshot.state.workload_by_uid(uid));
        let workload = match workload {
            Some(workload) => WorkloadRef::new(workload.namespace(), &workload.authorization_policies),
            None => WorkloadRef::new(&self.namespace, &self.policies),
        };
        let conn = Connection {
            src_identity: self.src_identity.as_ref(),
            src,
            dst: self.dst,
        };
        let verdict = snapshot.policies.evaluate(&workload, &conn);
        let reason = verdict.decision.deny_reason()?;
        Some(CloseReason::PolicyDenied {
            generation: snapshot.generation,
            policy: reason.policy().map(str::to_owned),
            message: verdict.decision.to_string(),
        })
    }
}

struct Registered {
    /// `None` for a connection no policy re-checks (a pod's outbound connection, closed with the
    /// pod); else its attributes but the source address (shared by the connections from one peer
    /// to one destination, see [`RegistryInner::attrs`]) and its source address.
    attrs: Option<(Arc<ConnectionAttrs>, SocketAddr)>,
    signal: Arc<SignalInner>,
}

/// Shards of the registry, so that registrations on many cores rarely meet on one lock.
const SHARDS: usize = 16;

struct RegistryInner {
    next_id: AtomicU64,
    /// The attributes of registered connections without their source address (their `src` is
    /// unspecified), one copy for each peer and destination.
    attrs: Shared<ConnectionAttrs>,
    shards: [Mutex<HashMap<u64, Registered>>; SHARDS],
    /// Registries made by [`ConnectionRegistry::child`], judged with this one; dropped ones are
    /// pruned as they are found.
    children: Mutex<Vec<Weak<RegistryInner>>>,
}

impl RegistryInner {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Registered>> {
        // The remainder is below SHARDS, so the cast cannot truncate.
        &self.shards[(id % SHARDS as u64) as usize]
    }
}

/// The established connections whose authorization a new snapshot must re-check (ztunnel's
/// connection manager and policy watcher).
///
/// Thread-safe and cheap to clone (one reference count). Registration is one short lock of one of
/// 16 shards; the [`ConnectionGuard`] it returns unregisters on drop. [`ConnectionRegistry::reevaluate`]
/// runs on the control thread and locks one shard at a time.
#[derive(Clone)]
pub struct ConnectionRegistry {
    inner: Arc<RegistryInner>,
}

impl ConnectionRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(RegistryInner {
                next_id: AtomicU64::new(0),
                attrs: Shared::default(),
                shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
                children: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A registry of its own (one pod's connections, in in-pod mode) whose connections this one's
    /// [`reevaluate`](Self::reevaluate) judges too, and that [`close_all`](Self::close_all) can
    /// close apart from the others. It lives as long as a clone of it does.
    pub fn child(&self) -> ConnectionRegistry {
        let child = ConnectionRegistry::new();
        let mut children = lock(&self.inner.children);
        children.retain(|c| c.strong_count() > 0);
        children.push(Arc::downgrade(&child.inner));
        child
    }

    /// Tells every connection registered here (and in its children) to close for `reason`;
    /// returns how many were newly told.
    pub fn close_all(&self, reason: &CloseReason) -> usize {
        let mut closed = 0;
        for shard in &self.inner.shards {
            for registered in lock(shard).values() {
                closed += usize::from(registered.signal.fire(reason.clone()));
            }
        }
        closed
            + self
                .children()
                .iter()
                .map(|child| child.close_all(reason))
                .sum::<usize>()
    }

    /// The live children.
    fn children(&self) -> Vec<ConnectionRegistry> {
        let mut children = lock(&self.inner.children);
        children.retain(|c| c.strong_count() > 0);
        children
            .iter()
            .filter_map(Weak::upgrade)
            .map(|inner| ConnectionRegistry { inner })
            .collect()
    }

    /// Registers an established connection: the guard keeps it registered until dropped, the signal
    /// completes when a new snapshot denies it.
    pub fn register(&self, attrs: ConnectionAttrs) -> (ConnectionGuard, CloseSignal) {
        self.insert(Some(attrs))
    }

    /// Registers a connection that policies do not re-check (a pod's outbound connection: the
    /// destination's proxy judges it), so that [`close_all`](Self::close_all) closes it and
    /// [`len`](Self::len) counts it.
    pub fn register_outbound(&self) -> (ConnectionGuard, CloseSignal) {
        self.insert(None)
    }

    fn insert(&self, attrs: Option<ConnectionAttrs>) -> (ConnectionGuard, CloseSignal) {
        let attrs = attrs.map(|mut attrs| {
            let src = std::mem::replace(&mut attrs.src, SocketAddr::from(([0, 0, 0, 0], 0)));
            (self.inner.attrs.share(attrs), src)
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(SignalInner::default());
        lock(self.inner.shard(id)).insert(
            id,
            Registered {
                attrs,
                signal: Arc::clone(&signal),
            },
        );
        let guard = ConnectionGuard {
            registry: Arc::clone(&self.inner),
            id,
        };
        (guard, CloseSignal { inner: signal })
    }

    /// The number of registered connections, its children's included.
    pub fn len(&self) -> usize {
        let own: usize = self.inner.shards.iter().map(|shard| lock(shard).len()).sum();
        own + self.children().iter().map(ConnectionRegistry::len).sum::<usize>()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Judges every registered connection against `snapshot`'s policies and fires the close signal
    /// of each one now denied; returns how many were newly told to close (connections told before
    /// are not judged again). Dry-run policies are not enforced, as for new connections.
    pub fn reevaluate(&self, snapshot: &Snapshot) -> usize {
        let mut closed = 0;
        for shard in &self.inner.shards {
            for (id, registered) in lock(shard).iter() {
                if registered.signal.reason.get().is_some() {
                    continue;
                }
                let Some((attrs, src)) = &registered.attrs else {
                    continue;
                };
                if let Some(reason) = attrs.denied_by(*src, snapshot) {
                    tracing::debug!(
                        connection = id,
                        src = %src,
                        dst = %attrs.dst,
                        %reason,
                        "closing a connection"
                    );
                    closed += usize::from(registered.signal.fire(reason));
                }
            }
        }
        closed
            + self
                .children()
                .iter()
                .map(|child| child.reevaluate(snapshot))
                .sum::<usize>()
    }
}

impl Default for ConnectionRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ConnectionRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionRegistry")
            .field("connections", &self.len())
            .finish()
    }
}

/// Keeps a connection registered in its [`ConnectionRegistry`]; dropping it unregisters the
/// connection. Hold it for the connection's lifetime.
#[must_use = "dropping the guard unregisters the connection at once"]
pub struct ConnectionGuard {
    registry: Arc<RegistryInner>,
    id: u64,
}

impl fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionGuard").field("id", &self.id).finish()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut shard = lock(self.registry.shard(self.id));
        shard.remove(&self.id);
        // A map keeps its capacity: after a burst of connections, give back most of it (halving
        // at a quarter full, so that a steady count does not rebuild the map again and again).
        if shard.capacity() > SHARD_KEPT_CAPACITY && shard.len() < shard.capacity() / 4 {
            let keep = (shard.len() * 2).max(SHARD_KEPT_CAPACITY);
            shard.shrink_to(keep);
        }
    }
}

/// The capacity a registry shard keeps however few connections it holds.
const SHARD_KEPT_CAPACITY: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(registry: &ConnectionRegistry) -> usize {
        registry.inner.shards.iter().map(|shard| lock(shard).capacity()).sum()
    }

    /// After a burst of connections, the registry gives back the room it grew for them.
    #[test]
    fn the_registry_shrinks_after_a_burst() {
        let registry = ConnectionRegistry::new();
        let idle = capacity(&registry);
        let mut burst: Vec<_> = (0..20_000).map(|_| registry.register_outbound()).collect();
        assert_eq!(registry.len(), 20_000);
        let grown = capacity(&registry);
        assert!(grown >= 20_000, "{grown}");
        let kept: Vec<_> = burst.drain(..10).collect();
        drop(burst);
        assert_eq!(registry.len(), 10);
        let after = capacity(&registry);
        assert!(
            after <= idle + SHARDS * SHARD_KEPT_CAPACITY * 2,
            "capacity {after} after the burst (it grew to {grown})"
        );
        drop(kept);
        assert!(registry.is_empty());
    }
}
