//! Readiness: the proxy is ready once every task that blocks readiness has finished and every
//! readiness check passes, and stops being ready when it drains.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use super::server::{self, Handler};

/// The path of the readiness probe.
pub const READY_PATH: &str = "/healthz/ready";

/// A condition evaluated at every probe: what it waits for, or `None` when it holds.
type Check = Arc<dyn Fn() -> Option<String> + Send + Sync>;

#[derive(Default)]
struct State {
    next: u64,
    /// Each pending task's name, and when it was registered (for the log line when it completes).
    pending: BTreeMap<u64, (String, std::time::Instant)>,
    checks: Vec<Check>,
    draining: bool,
}

/// Whether the proxy is ready to serve: shared by whoever blocks readiness and the readiness
/// endpoint. Cloning is cheap; every clone sees the same state.
///
/// Each task that must finish before the proxy is ready takes a [`ReadyBlocker`] with
/// [`Readiness::block`] and drops it (or calls [`ReadyBlocker::ready`]) when done. The proxy is ready
/// when no blocker is left, every check passes, and it is not draining.
///
/// A condition that can come and go (a certificate that expires, a workload that leaves the
/// configuration) is a check ([`Readiness::check`]): a function evaluated at every probe, which
/// names what is missing or returns `None`. Checks only read state; they never start work.
///
/// ```
/// use meshwire_dataplane::admin::Readiness;
///
/// let readiness = Readiness::new();
/// let config = readiness.block("local configuration");
/// let cert = readiness.block("workload certificate");
/// assert_eq!(readiness.pending(), ["local configuration", "workload certificate"]);
/// config.ready();
/// drop(cert);
/// assert!(readiness.is_ready());
/// readiness.set_draining();
/// assert!(!readiness.is_ready());
///
/// let readiness = Readiness::new();
/// let present = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
/// let seen = present.clone();
/// readiness.check(move || {
///     (!seen.load(std::sync::atomic::Ordering::Relaxed)).then(|| "workload default/web".to_owned())
/// });
/// assert_eq!(readiness.pending(), ["workload default/web"]);
/// present.store(true, std::sync::atomic::Ordering::Relaxed);
/// assert!(readiness.is_ready());
/// ```
#[derive(Clone, Default)]
pub struct Readiness {
    state: Arc<Mutex<State>>,
}

impl Readiness {
    /// Ready, with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a task that blocks readiness until the returned blocker is dropped. `task` names it
    /// in the probe's answer.
    pub fn block(&self, task: impl Into<String>) -> ReadyBlocker {
        let mut state = self.state();
        state.next += 1;
        let id = state.next;
        state.pending.insert(id, (task.into(), std::time::Instant::now()));
        ReadyBlocker {
            readiness: self.clone(),
            id,
        }
    }

    /// Adds a condition to readiness, evaluated at every probe: `check` names what is missing, or
    /// returns `None` when the condition holds. It must be quick and must not block.
    pub fn check(&self, check: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.state().checks.push(Arc::new(check));
    }

    /// The tasks still blocking readiness and the checks that fail, sorted by name.
    pub fn pending(&self) -> Vec<String> {
        let (mut pending, checks) = {
            let state = self.state();
            let pending: Vec<String> = state.pending.values().map(|(task, _)| task.clone()).collect();
            (pending, state.checks.clone())
        };
        // Evaluated without the lock: a check reads other state.
        pending.extend(checks.iter().filter_map(|check| check()));
        pending.sort();
        pending
    }

    /// Marks the proxy as draining: never ready again.
    pub fn set_draining(&self) {
        self.state().draining = true;
    }

    /// Whether the proxy is draining.
    pub fn is_draining(&self) -> bool {
        self.state().draining
    }

    /// Whether nothing is pending, every check passes, and the proxy is not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.pending().is_empty()
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readiness")
            .field("pending", &self.pending())
            .field("draining", &self.is_draining())
            .finish()
    }
}

/// One task blocking readiness; dropping it unblocks.
#[must_use = "dropping the blocker marks its task as done at once"]
pub struct ReadyBlocker {
    readiness: Readiness,
    id: u64,
}

impl ReadyBlocker {
    /// Marks the task as done (the same as dropping the blocker).
    pub fn ready(self) {}

    /// The task's name.
    pub fn task(&self) -> String {
        self.readiness
            .state()
            .pending
            .get(&self.id)
            .map(|(task, _)| task.clone())
            .unwrap_or_default()
    }
}

impl Drop for ReadyBlocker {
    /// Logs the task's completion as ztunnel does (`Task '..' complete (..), still awaiting N
    /// tasks`, or `.., marking server ready` for the last one; target `readiness`).
    fn drop(&mut self) {
        let (removed, left) = {
            let mut state = self.readiness.state();
            let removed = state.pending.remove(&self.id);
            (removed, state.pending.len())
        };
        let Some((task, since)) = removed else {
            return;
        };
        let took = since.elapsed();
        if left == 0 {
            tracing::info!(target: "readiness", "Task '{task}' complete ({took:?}), marking server ready");
        } else {
            tracing::info!(target: "readiness", "Task '{task}' complete ({took:?}), still awaiting {left} tasks");
        }
    }
}

impl fmt::Debug for ReadyBlocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadyBlocker").field("task", &self.task()).finish()
    }
}

/// The readiness listener (15021): `GET /healthz/ready` answers `200 ready` when the proxy is
/// ready, else `500` naming what is pending (`not ready, pending: local configuration, workload
/// certificate`) or that it is draining, as ztunnel answers. Other paths are 404, other methods 405.
#[derive(Debug, Clone)]
pub struct ReadinessHandler {
    readiness: Readiness,
}

impl ReadinessHandler {
    /// The endpoint of `readiness`.
    pub fn new(readiness: Readiness) -> Self {
        Self { readiness }
    }
}

impl Handler for ReadinessHandler {
    fn handle(&self, request: &Request<()>) -> Response<Bytes> {
        if request.uri().path() != READY_PATH {
            return server::not_found(request);
        }
        if !server::is_read(request) {
            return server::method_not_allowed(request, &[Method::GET, Method::HEAD]);
        }
        if self.readiness.is_draining() {
            return server::text(StatusCode::INTERNAL_SERVER_ERROR, "not ready, draining\n");
        }
        let pending = self.readiness.pending();
        if pending.is_empty() {
            server::text(StatusCode::OK, "ready\n")
        } else {
            server::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not ready, pending: {}\n", pending.join(", ")),
            )
        }
    }
}
