//! The timer seam: how time-dependent logic sees time.
//!
//! Nothing in this crate reads a clock directly. The [`Timer`] a caller passes in supplies the
//! monotonic time used for scheduling, the wall-clock time used for certificate validity, and
//! sleeps. A tokio binary uses `meshwire_rt::TokioTimer` (over `tokio::time`), a glommio binary
//! `meshwire_rt::GlommioTimer` (over glommio's timers), and tests a paused or simulated clock.
//!
//! [`Timer`] is defined in `meshwire-rt`, the crate of the runtime seam, and re-exported here.

pub use meshwire_rt::Timer;
