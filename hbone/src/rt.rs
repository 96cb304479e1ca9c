//! The runtime seam: how the library sees time and, where asked to, spawns.

use std::future::Future;
use std::time::Duration;

use futures_util::future::{Either, select};

pub use meshwire_identity::time::Timer;

/// Runs futures on the caller's executor.
///
/// Generic over the future type, so the caller decides what it needs: a tokio implementation
/// requires `Send + 'static` futures, a glommio one (`spawn_local`) only `'static`.
///
/// ```
/// use meshwire_hbone::rt::Executor;
///
/// #[derive(Clone)]
/// struct Tokio;
/// impl<F: std::future::Future<Output = ()> + Send + 'static> Executor<F> for Tokio {
///     fn execute(&self, future: F) {
///         tokio::spawn(future);
///     }
/// }
/// ```
pub trait Executor<F: Future<Output = ()>> {
    /// Starts running `future` in the background.
    fn execute(&self, future: F);
}

/// Runs `fut` with a deadline `limit` from now on `timer`: its output, or `None` when the deadline
/// passed first (then `fut` is dropped). The runtime-independent counterpart of
/// `tokio::time::timeout`.
///
/// ```
/// use std::time::Duration;
/// use meshwire_hbone::rt::{Timer, timeout};
/// # #[derive(Clone)]
/// # struct Tokio;
/// # impl Timer for Tokio {
/// #     type Sleep = tokio::time::Sleep;
/// #     fn now(&self) -> std::time::Instant { tokio::time::Instant::now().into_std() }
/// #     fn system_now(&self) -> std::time::SystemTime { std::time::SystemTime::now() }
/// #     fn sleep_until(&self, deadline: std::time::Instant) -> Self::Sleep { tokio::time::sleep_until(deadline.into()) }
/// # }
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// assert_eq!(timeout(&Tokio, Duration::from_secs(1), async { 7 }).await, Some(7));
/// assert_eq!(timeout(&Tokio, Duration::from_secs(1), std::future::pending::<()>()).await, None);
/// # });
/// ```
pub async fn timeout<T: Timer, F: Future>(timer: &T, limit: Duration, fut: F) -> Option<F::Output> {
    let sleep = timer.sleep_until(timer.now() + limit);
    match select(std::pin::pin!(fut), std::pin::pin!(sleep)).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(_) => None,
    }
}
