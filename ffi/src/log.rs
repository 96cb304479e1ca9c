//! Logging: meshwire's `tracing` events handed to a C callback, filtered by a level.

use std::cell::Cell;
use std::ffi::{CString, c_char, c_int, c_void};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock};

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::error::Failure;
use crate::server::UserData;

/// Log levels, from nothing to everything.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(non_camel_case_types, reason = "the variants have the names of the C constants")]
pub enum MeshwireLogLevel {
    /// No log message.
    MESHWIRE_LOG_OFF = 0,
    /// Failures that need attention.
    MESHWIRE_LOG_ERROR = 1,
    /// Unusual events meshwire recovered from.
    MESHWIRE_LOG_WARN = 2,
    /// Servers started, certificates created.
    MESHWIRE_LOG_INFO = 3,
    /// Connections and tunnels opened and closed.
    MESHWIRE_LOG_DEBUG = 4,
    /// Everything.
    MESHWIRE_LOG_TRACE = 5,
}

impl MeshwireLogLevel {
    pub(crate) fn from_c(level: c_int) -> Result<Self, Failure> {
        Ok(match level {
            0 => Self::MESHWIRE_LOG_OFF,
            1 => Self::MESHWIRE_LOG_ERROR,
            2 => Self::MESHWIRE_LOG_WARN,
            3 => Self::MESHWIRE_LOG_INFO,
            4 => Self::MESHWIRE_LOG_DEBUG,
            5 => Self::MESHWIRE_LOG_TRACE,
            other => {
                return Err(Failure::invalid(format!(
                    "log level {other} is not one of MESHWIRE_LOG_OFF (0) to MESHWIRE_LOG_TRACE (5)"
                )));
            }
        })
    }

    fn of(level: &Level) -> Self {
        match *level {
            Level::ERROR => Self::MESHWIRE_LOG_ERROR,
            Level::WARN => Self::MESHWIRE_LOG_WARN,
            Level::INFO => Self::MESHWIRE_LOG_INFO,
            Level::DEBUG => Self::MESHWIRE_LOG_DEBUG,
            Level::TRACE => Self::MESHWIRE_LOG_TRACE,
        }
    }
}

/// The log callback: `target` (the module that logged) and `message` (the message and its fields,
/// `key=value`) are valid during the call only.
pub type MeshwireLogCallback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        level: MeshwireLogLevel,
        target: *const c_char,
        message: *const c_char,
    ),
>;

type LogFn = unsafe extern "C" fn(*mut c_void, MeshwireLogLevel, *const c_char, *const c_char);

static LEVEL: AtomicU8 = AtomicU8::new(MeshwireLogLevel::MESHWIRE_LOG_OFF as u8);
static SINK: RwLock<Option<(LogFn, UserData)>> = RwLock::new(None);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

thread_local! {
    /// Set while this thread runs the log callback: events it causes are dropped, and the callback
    /// cannot be replaced from inside itself (that would wait for itself).
    static IN_LOG_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Sets the level; events above it are not formatted at all.
pub(crate) fn set_level(level: MeshwireLogLevel) {
    LEVEL.store(level as u8, Ordering::SeqCst);
}

/// Replaces the callback (`None`: no logging). Returns once no call of the previous callback runs.
pub(crate) fn set_callback(callback: Option<(LogFn, *mut c_void)>, level: MeshwireLogLevel) -> Result<(), Failure> {
    if IN_LOG_CALLBACK.with(Cell::get) {
        return Err(Failure::new(
            crate::error::MeshwireStatus::MESHWIRE_ERR_RUNTIME,
            "meshwire_set_log_callback must not be called from the log callback",
        ));
    }
    if callback.is_some() {
        install()?;
    }
    let mut sink = SINK.write().unwrap_or_else(PoisonError::into_inner);
    *sink = callback.map(|(f, data)| (f, UserData(data)));
    set_level(if sink.is_some() {
        level
    } else {
        MeshwireLogLevel::MESHWIRE_LOG_OFF
    });
    Ok(())
}

/// Installs the forwarding subscriber as the process's global `tracing` subscriber, once.
fn install() -> Result<(), Failure> {
    INSTALLED
        .get_or_init(|| {
            tracing::subscriber::set_global_default(Registry::default().with(CallbackLayer)).map_err(|e| {
                format!("cannot install meshwire's log forwarding: another tracing subscriber is installed ({e})")
            })
        })
        .clone()
        .map_err(|e| Failure::new(crate::error::MeshwireStatus::MESHWIRE_ERR_RUNTIME, e))
}

struct CallbackLayer;

fn level_enabled(level: &Level) -> bool {
    MeshwireLogLevel::of(level) as u8 <= LEVEL.load(Ordering::Relaxed)
}

impl<S: Subscriber> Layer<S> for CallbackLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // The level changes at run time: ask `enabled` every time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        level_enabled(metadata.level())
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !level_enabled(event.metadata().level()) || IN_LOG_CALLBACK.with(Cell::get) {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let message = CString::new(text.finish().replace('\0', "\\0")).unwrap_or_default();
        let target = CString::new(event.metadata().target()).unwrap_or_default();
        let sink = SINK.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((function, user_data)) = *sink {
            IN_LOG_CALLBACK.with(|c| c.set(true));
            // SAFETY: the caller of meshwire_set_log_callback guarantees the function and user_data
            // stay valid until the callback is replaced, which waits for this read lock to be released;
            // the strings outlive the call.
            unsafe {
                function(
                    user_data.0,
                    MeshwireLogLevel::of(event.metadata().level()),
                    target.as_ptr(),
                    message.as_ptr(),
                )
            };
            IN_LOG_CALLBACK.with(|c| c.set(false));
        }
    }
}

/// An event's message followed by its fields as `key=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Text {
    fn finish(mut self) -> String {
        if !self.fields.is_empty() {
            if !self.message.is_empty() {
                self.message.push(' ');
            }
            self.message.push_str(&self.fields);
        }
        self.message
    }
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }
}
