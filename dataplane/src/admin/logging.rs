//! Changing the log filter of a running process.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::reload;

/// Why a log filter was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogControlError {
    /// The filter is not valid `EnvFilter` syntax.
    #[error("invalid log filter {filter:?}: {reason}")]
    Invalid {
        /// The filter as given.
        filter: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The filter is empty.
    #[error("empty log filter")]
    Empty,
    /// The subscriber the filter belongs to is gone.
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// Swaps the filter of one subscriber; implemented by `tracing_subscriber`'s reload handle.
trait Reload: Send + Sync {
    fn reload(&self, filter: EnvFilter) -> Result<(), String>;
}

impl<S: 'static> Reload for reload::Handle<EnvFilter, S> {
    fn reload(&self, filter: EnvFilter) -> Result<(), String> {
        reload::Handle::reload(self, filter).map_err(|e| e.to_string())
    }
}

struct Inner {
    reload: Box<dyn Reload>,
    initial: String,
    current: Mutex<String>,
}

/// The process's log filter, readable and replaceable at runtime: a small handle over
/// `tracing_subscriber::reload` for the admin endpoint `/logging`. Cloning is cheap.
///
/// Filters use `EnvFilter` syntax (`RUST_LOG`): `debug`, `meshwire=debug,h2=warn`. An invalid
/// filter is rejected and the current one kept.
///
/// ```
/// use meshwire_dataplane::admin::LogControl;
/// use tracing_subscriber::{EnvFilter, Registry, prelude::*, reload};
///
/// let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
/// let subscriber = Registry::default().with(filter).with(tracing_subscriber::fmt::layer());
/// let _default = tracing::subscriber::set_default(subscriber);
/// let logging = LogControl::new(handle, "info");
///
/// logging.set("meshwire=debug,h2=warn")?;
/// assert_eq!(logging.current(), "meshwire=debug,h2=warn");
/// assert!(logging.set("meshwire=loud").is_err());
/// assert_eq!(logging.current(), "meshwire=debug,h2=warn");
/// logging.reset()?;
/// assert_eq!(logging.current(), "info");
/// // Merged into the filter in force, as ztunnel's `/logging?level=` does: one target changed.
/// logging.merge("access=warn")?;
/// assert_eq!(logging.current(), "info,access=warn");
/// logging.merge("debug,access=info")?;
/// assert_eq!(logging.current(), "debug,access=info");
/// # Ok::<(), meshwire_dataplane::admin::LogControlError>(())
/// ```
#[derive(Clone)]
pub struct LogControl {
    inner: Arc<Inner>,
}

impl LogControl {
    /// Controls the filter behind `handle`, which was installed as `initial` (what
    /// [`LogControl::current`] answers until it is changed, and what [`LogControl::reset`] restores).
    pub fn new<S: 'static>(handle: reload::Handle<EnvFilter, S>, initial: impl Into<String>) -> Self {
        let initial = initial.into();
        Self {
            inner: Arc::new(Inner {
                reload: Box::new(handle),
                current: Mutex::new(initial.clone()),
                initial,
            }),
        }
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The filter the process started with.
    pub fn initial(&self) -> &str {
        &self.inner.initial
    }

    /// Replaces the filter with `filter`; keeps the current one if `filter` is invalid.
    pub fn set(&self, filter: &str) -> Result<(), LogControlError> {
        let filter = filter.trim();
        if filter.is_empty() {
            return Err(LogControlError::Empty);
        }
        let parsed = EnvFilter::builder()
            .parse(filter)
            .map_err(|e| LogControlError::Invalid {
                filter: filter.to_owned(),
                reason: e.to_string(),
            })?;
        let mut current = self.inner.current.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner.reload.reload(parsed).map_err(LogControlError::Reload)?;
        filter.clone_into(&mut current);
        Ok(())
    }

    /// Restores the filter the process started with.
    pub fn reset(&self) -> Result<(), LogControlError> {
        let initial = self.inner.initial.clone();
        self.set(&initial)
    }

    /// Merges `directives` into the filter in force (ztunnel's `POST /logging?level=`): each
    /// directive replaces the one of the same target (a bare level, the default one), the others
    /// stay. `access=warn` quiets the access log and leaves everything else as it was. Invalid
    /// directives change nothing.
    pub fn merge(&self, directives: &str) -> Result<(), LogControlError> {
        let merged = merge_directives(&self.current(), Self::validated(directives)?);
        self.set(&merged)
    }

    /// [`LogControl::reset`], then `directives` merged into the initial filter (ztunnel's
    /// `POST /logging?reset&level=`).
    pub fn reset_and_merge(&self, directives: &str) -> Result<(), LogControlError> {
        let merged = merge_directives(&self.inner.initial, Self::validated(directives)?);
        self.set(&merged)
    }

    /// `directives`, trimmed, if they are a valid filter.
    fn validated(directives: &str) -> Result<&str, LogControlError> {
        let directives = directives.trim();
        if directives.is_empty() {
            return Err(LogControlError::Empty);
        }
        EnvFilter::builder()
            .parse(directives)
            .map_err(|e| LogControlError::Invalid {
                filter: directives.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(directives)
    }
}

/// `base` with `directives` merged in: a directive of `directives` replaces those of `base` for the
/// same target (the text before `=`; a bare level is the default directive), kept in place of the
/// first one replaced, or appended.
fn merge_directives(base: &str, directives: &str) -> String {
    fn target(directive: &str) -> &str {
        directive.rsplit_once('=').map_or("", |(target, _)| target.trim())
    }
    let mut merged: Vec<&str> = base.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    for directive in directives.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let key = target(directive);
        match merged.iter().position(|d| target(d) == key) {
            Some(first) => {
                merged[first] = directive;
                let mut index = 0;
                merged.retain(|d| {
                    let keep = index <= first || target(d) != key;
                    index += 1;
                    keep
                });
            }
            None => merged.push(directive),
        }
    }
    merged.join(",")
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .field("initial", &self.inner.initial)
            .finish()
    }
}
