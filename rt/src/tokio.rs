//! The seam over tokio (feature `tokio`): [`TokioTimer`] and [`TokioExecutor`].

use std::future::Future;
use std::time::{Instant, SystemTime};

use ::tokio::runtime::Handle;

use crate::{Executor, Timer};

/// [`Timer`] over `tokio::time`: monotonic time and sleeps follow tokio's clock, so they run in
/// virtual time under a paused runtime (`#[tokio::test(start_paused = true)]`). The wall clock
/// ([`Timer::system_now`]) is the system's, paused or not.
///
/// Sleeps must be created and polled inside a tokio runtime with time enabled.
///
/// ```
/// use std::time::Duration;
/// use meshwire_rt::{Timer, TokioTimer};
///
/// let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
/// rt.block_on(async {
///     let start = TokioTimer.now();
///     // Paused: the clock jumps to the deadline instead of waiting an hour.
///     TokioTimer.sleep_until(start + Duration::from_secs(3_600)).await;
///     assert!(TokioTimer.now() >= start + Duration::from_secs(3_600));
/// });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    type Sleep = ::tokio::time::Sleep;

    fn now(&self) -> Instant {
        ::tokio::time::Instant::now().into_std()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: Instant) -> Self::Sleep {
        ::tokio::time::sleep_until(deadline.into())
    }
}

/// [`Executor`] over `tokio::spawn`: runs `Send + 'static` futures as detached tasks, on the
/// runtime of the calling thread or on a runtime chosen by handle.
///
/// ```
/// use meshwire_rt::{Executor, TokioExecutor};
///
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let (tx, rx) = std::sync::mpsc::channel();
/// // From outside the runtime: through its handle.
/// TokioExecutor::with_handle(rt.handle().clone()).execute(async move { tx.send(7).unwrap() });
/// let got = rt.block_on(async {
///     // Inside the runtime: on the calling thread's.
///     TokioExecutor::new().execute(async {});
///     loop {
///         match rx.try_recv() {
///             Ok(got) => break got,
///             Err(_) => tokio::task::yield_now().await,
///         }
///     }
/// });
/// assert_eq!(got, 7);
/// ```
#[derive(Debug, Clone, Default)]
pub struct TokioExecutor {
    handle: Option<Handle>,
}

impl TokioExecutor {
    /// Spawns on the runtime of the thread calling [`Executor::execute`] (which panics outside
    /// a runtime, like `tokio::spawn`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns on the runtime of `handle`, from any thread.
    pub fn with_handle(handle: Handle) -> Self {
        Self { handle: Some(handle) }
    }
}

impl<F: Future<Output = ()> + Send + 'static> Executor<F> for TokioExecutor {
    fn execute(&self, future: F) {
        match &self.handle {
            Some(handle) => drop(handle.spawn(future)),
            None => drop(::tokio::spawn(future)),
        }
    }
}
