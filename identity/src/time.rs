//! The timer seam: how time-dependent logic sees time.
//!
//! Nothing in this crate reads a clock directly. The [`Timer`] a caller passes in supplies the
//! monotonic time used for scheduling, the wall-clock time used for certificate validity, and
//! sleeps. A tokio binary implements it over `tokio::time`, a glommio binary over glommio's timers,
//! and tests over a paused or simulated clock.

use std::future::Future;
use std::time::{Instant, SystemTime};

/// A source of time and sleeps.
///
/// ```
/// use std::time::{Instant, SystemTime};
/// use meshwire_identity::time::Timer;
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
