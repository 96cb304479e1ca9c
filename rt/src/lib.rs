//! The runtime seam of meshwire: how its libraries see time and, where asked to, spawn, without
//! depending on a runtime.
//!
//! - [`Timer`]: monotonic time for scheduling, wall-clock time for certificate validity, and
//!   sleeps. Nothing in meshwire reads a clock directly: the timer a caller passes in supplies the
//!   time, so tests run time-dependent logic on a paused or simulated clock.
//! - [`Executor`]: runs futures on the caller's executor, generic over the future type so the
//!   caller decides whether they must be `Send` (as in hyper's `rt` module).
//! - [`timeout`]: a deadline on a future, over any [`Timer`].
//!
//! The crate depends on no runtime by default. Each runtime's implementations sit behind a
//! feature:
//! - `tokio`: [`TokioTimer`] (`tokio::time`, so virtual time under a paused runtime) and
//!   [`TokioExecutor`] (`tokio::spawn`), in [`tokio`](mod@tokio).
//! - `glommio`: [`GlommioTimer`] (glommio's reactor timers), [`GlommioExecutor`]
//!   (`glommio::spawn_local`) and [`glommio::stream::UringStream`] (a glommio TCP stream with the
//!   `tokio::io` traits), in [`glommio`](mod@glommio).
//!
//! `meshwire-identity` re-exports [`Timer`] as `meshwire_identity::time::Timer`, and
//! `meshwire-hbone` re-exports all three items as `meshwire_hbone::rt`.
// Only `glommio::stream` needs `unsafe` (its two functions allow it); without it, none may.
#![cfg_attr(not(feature = "glommio"), forbid(unsafe_code))]

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

#[cfg(feature = "glommio")]
pub mod glommio;
#[cfg(feature = "tokio")]
pub mod tokio;

#[cfg(feature = "glommio")]
pub use self::glommio::{GlommioExecutor, GlommioTimer};
#[cfg(feature = "tokio")]
pub use self::tokio::{TokioExecutor, TokioTimer};

/// A source of time and sleeps.
///
/// ```
/// use std::time::{Instant, SystemTime};
/// use meshwire_rt::Timer;
///
/// /// A timer whose sleeps never end: enough for code that only reads the time.
/// struct Frozen(Instant, SystemTime);
/// impl Timer for Frozen {
///     type Sleep = std::future::Pending<()>;
///     fn now(&self) -> Instant { self.0 }
///     fn system_now(&self) -> SystemTime { self.1 }
///     fn sleep_until(&self, _deadline: Instant) -> Self::Sleep { std::future::pending() }
/// }
/// let t = Frozen(Instant::now(), SystemTime::UNIX_EPOCH);
/// assert_eq!(t.system_now(), SystemTime::UNIX_EPOCH);
/// ```
pub trait Timer {
    /// The future returned by [`Timer::sleep_until`].
    type Sleep: Future<Output = ()>;

    /// The current monotonic time, used for all scheduling.
    fn now(&self) -> Instant;

    /// The current wall-clock time, used to judge certificate validity.
    fn system_now(&self) -> SystemTime;

    /// A future that completes once [`Timer::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Self::Sleep;
}

/// Runs futures on the caller's executor.
///
/// Generic over the future type, so the caller decides what it needs: a tokio implementation
/// ([`TokioExecutor`] with the `tokio` feature) requires `Send + 'static` futures, a glommio one
/// ([`GlommioExecutor`] with the `glommio` feature, over `spawn_local`) only `'static`.
///
/// ```
/// use std::cell::RefCell;
/// use std::future::Future;
/// use std::pin::Pin;
/// use meshwire_rt::Executor;
///
/// /// Keeps the futures for the caller to run later, as a test might.
/// #[derive(Default)]
/// struct Queue(RefCell<Vec<Pin<Box<dyn Future<Output = ()>>>>>);
/// impl<F: Future<Output = ()> + 'static> Executor<F> for Queue {
///     fn execute(&self, future: F) {
///         self.0.borrow_mut().push(Box::pin(future));
///     }
/// }
/// let queue = Queue::default();
/// queue.execute(async {});
/// assert_eq!(queue.0.borrow().len(), 1);
/// ```
pub trait Executor<F: Future<Output = ()>> {
    /// Starts running `future` in the background.
    fn execute(&self, future: F);
}

/// Runs `fut` with a deadline `limit` from now on `timer`: its output, or `None` when the deadline
/// passed first (then `fut` is dropped). The runtime-independent counterpart of
/// `tokio::time::timeout`; the deadline counts from this call.
///
/// A combinator, not an `async fn`: one would hold `fut` twice, as its argument and as the future
/// it polls, so the [`Timeout`] future is `fut` and the sleep, once each.
///
/// ```
/// use std::time::{Duration, Instant, SystemTime};
/// use meshwire_rt::{Timer, timeout};
///
/// /// A timer whose every deadline has already passed.
/// struct Late;
/// impl Timer for Late {
///     type Sleep = std::future::Ready<()>;
///     fn now(&self) -> Instant { Instant::now() }
///     fn system_now(&self) -> SystemTime { SystemTime::now() }
///     fn sleep_until(&self, _deadline: Instant) -> Self::Sleep { std::future::ready(()) }
/// }
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// // A future that is ready still gets its output in; one that is not runs out of time.
/// assert_eq!(timeout(&Late, Duration::from_secs(1), async { 7 }).await, Some(7));
/// assert_eq!(timeout(&Late, Duration::from_secs(1), std::future::pending::<()>()).await, None);
/// // The timeout adds the sleep to the future, and little else.
/// let large = async { std::future::ready([0u8; 4096]).await };
/// let size = std::mem::size_of_val(&large);
/// assert!(std::mem::size_of_val(&timeout(&Late, Duration::from_secs(1), large)) <= size + 16);
/// # });
/// ```
pub fn timeout<T: Timer, F: Future>(timer: &T, limit: Duration, fut: F) -> Timeout<F, T::Sleep> {
    Timeout {
        fut,
        sleep: timer.sleep_until(timer.now() + limit),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`timeout`]: `fut`'s output, or `None` once the sleep ended first.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct Timeout<F, S> {
        #[pin]
        fut: F,
        #[pin]
        sleep: S,
    }
}

impl<F: Future, S: Future<Output = ()>> Future for Timeout<F, S> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(out) = this.fut.poll(cx) {
            return std::task::Poll::Ready(Some(out));
        }
        this.sleep.poll(cx).map(|()| None)
    }
}
