//! The seam over glommio (feature `glommio`): [`GlommioTimer`], [`GlommioExecutor`], and
//! [`stream::UringStream`], a glommio TCP stream with the `tokio::io` traits.
//!
//! Everything here is thread-local, as a thread-per-core proxy is: it must be used on a glommio
//! executor thread, and nothing is `Send`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use crate::{Executor, Timer};

pub mod stream;

pub use self::stream::UringStream;

/// [`Timer`] over glommio's reactor timers. Must be used on a glommio executor thread.
///
/// ```
/// use std::time::Duration;
/// use glommio::LocalExecutorBuilder;
/// use meshwire_rt::{GlommioTimer, Timer};
///
/// let handle = LocalExecutorBuilder::default().spawn(|| async {
///     let start = GlommioTimer.now();
///     GlommioTimer.sleep_until(start + Duration::from_millis(10)).await;
///     assert!(GlommioTimer.now() >= start + Duration::from_millis(10));
/// });
/// handle.unwrap().join().unwrap();
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioTimer;

/// A glommio sleep resolving to `()` (glommio's timer resolves to the instant it fired at): the
/// [`Timer::Sleep`] of [`GlommioTimer`].
///
/// ```
/// use std::time::{Duration, Instant};
/// use glommio::LocalExecutorBuilder;
/// use meshwire_rt::glommio::GlommioSleep;
/// use meshwire_rt::{GlommioTimer, Timer};
///
/// let handle = LocalExecutorBuilder::default().spawn(|| async {
///     let sleep: GlommioSleep = GlommioTimer.sleep_until(Instant::now() + Duration::from_millis(1));
///     let () = sleep.await;
/// });
/// handle.unwrap().join().unwrap();
/// ```
#[derive(Debug)]
pub struct GlommioSleep(::glommio::timer::Timer);

impl Future for GlommioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}

impl Timer for GlommioTimer {
    type Sleep = GlommioSleep;

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: Instant) -> GlommioSleep {
        GlommioSleep(::glommio::timer::Timer::new(
            deadline.saturating_duration_since(Instant::now()),
        ))
    }
}

/// [`Executor`] over `glommio::spawn_local`: the task stays on the calling executor's core. Must
/// be used on a glommio executor thread.
///
/// ```
/// use std::cell::Cell;
/// use std::rc::Rc;
/// use glommio::LocalExecutorBuilder;
/// use meshwire_rt::{Executor, GlommioExecutor};
///
/// let handle = LocalExecutorBuilder::default().spawn(|| async {
///     // Not `Send`: the task never leaves this thread.
///     let ran = Rc::new(Cell::new(false));
///     let flag = ran.clone();
///     GlommioExecutor.execute(async move { flag.set(true) });
///     while !ran.get() {
///         glommio::executor().yield_now().await;
///     }
/// });
/// handle.unwrap().join().unwrap();
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioExecutor;

impl<F: Future<Output = ()> + 'static> Executor<F> for GlommioExecutor {
    fn execute(&self, future: F) {
        ::glommio::spawn_local(future).detach();
    }
}
