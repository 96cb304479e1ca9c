//! The concurrency primitive behind fetch de-duplication and certificate swap.
//!
//! A [`Slot`] holds the current value of one identity (read without locks) and the state of the
//! one fetch that may be running for it. Callers that find no usable value call [`Slot::begin`]:
//! exactly one of any number of concurrent callers is told to lead (start a fetch); the others
//! wait for that fetch to complete. Completion either publishes a new value, which replaces the
//! current one for new readers while readers holding the old one keep it, or records a failure.
//! The protocol is model-checked with loom (`cargo test -p meshwire-identity --features loom --lib loom`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::sync::{Current, Mutex, lock};

struct Inner<E> {
    /// Number of completed attempts; waiters wait for it to pass the value they saw.
    completed: u64,
    /// Whether an attempt is running.
    fetching: bool,
    /// The error of the latest attempt, if it failed.
    last_error: Option<E>,
    /// Set once the slot is retired: every wait ends with this error.
    closed: Option<E>,
    waiters: Vec<Waker>,
}

/// The current value of one key, and the fetch that may be running for it.
pub(crate) struct Slot<T, E> {
    current: Current<T>,
    inner: Mutex<Inner<E>>,
}

/// What a caller of [`Slot::begin`] should do.
pub(crate) enum Begin<T> {
    /// A usable value is there.
    #[cfg_attr(not(test), allow(dead_code))]
    Ready(Arc<T>),
    /// The caller must start a fetch, then wait for attempt number `.0 + 1`.
    Lead(u64),
    /// A fetch is running: wait for attempt number `.0 + 1`.
    Wait(u64),
}

impl<T, E: Clone> Slot<T, E> {
    pub(crate) fn new() -> Self {
        Self {
            current: Current::empty(),
            inner: Mutex::new(Inner {
                completed: 0,
                fetching: false,
                last_error: None,
                closed: None,
                waiters: Vec::new(),
            }),
        }
    }

    /// The current value, without locking.
    pub(crate) fn current(&self) -> Option<Arc<T>> {
        self.current.load()
    }

    /// Returns a usable current value, or makes the caller the leader of a new fetch, or tells it to
    /// wait for the running one.
    pub(crate) fn begin(&self, usable: impl Fn(&T) -> bool) -> Begin<T> {
        if let Some(v) = self.current.load().filter(|v| usable(v)) {
            return Begin::Ready(v);
        }
        let mut inner = lock(&self.inner);
        // Check again under the lock: a fetch may have published since.
        if let Some(v) = self.current.load().filter(|v| usable(v)) {
            return Begin::Ready(v);
        }
        if inner.fetching || inner.closed.is_some() {
            Begin::Wait(inner.completed)
        } else {
            inner.fetching = true;
            Begin::Lead(inner.completed)
        }
    }

    /// Starts a fetch unless one is running (a background refresh). Returns whether it started.
    pub(crate) fn try_lead(&self) -> bool {
        let mut inner = lock(&self.inner);
        if inner.fetching || inner.closed.is_some() {
            false
        } else {
            inner.fetching = true;
            true
        }
    }

    /// Ends the running fetch with a new value.
    pub(crate) fn publish(&self, value: Arc<T>) {
        let waiters = {
            let mut inner = lock(&self.inner);
            // Stored under the lock, so a waiter that sees the new attempt count sees the value.
            self.current.store(value);
            inner.completed += 1;
            inner.fetching = false;
            inner.last_error = None;
            std::mem::take(&mut inner.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// Ends the running fetch with an error; the current value, if any, stays.
    pub(crate) fn fail(&self, error: E) {
        let waiters = {
            let mut inner = lock(&self.inner);
            inner.completed += 1;
            inner.fetching = false;
            inner.last_error = Some(error);
            std::mem::take(&mut inner.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// Retires the slot: every current and future wait ends with `error`.
    pub(crate) fn close(&self, error: E) {
        let waiters = {
            let mut inner = lock(&self.inner);
            inner.closed = Some(error);
            inner.fetching = false;
            std::mem::take(&mut inner.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// Waits until the attempt after `seen` completes; yields the value it published, or its error.
    pub(crate) fn wait(&self, seen: u64) -> Wait<'_, T, E> {
        Wait { slot: self, seen }
    }

    fn poll_wait(&self, seen: u64, cx: &mut Context<'_>) -> Poll<Result<Arc<T>, E>> {
        let mut inner = lock(&self.inner);
        if let Some(e) = &inner.closed {
            return Poll::Ready(Err(e.clone()));
        }
        if inner.completed > seen {
            return Poll::Ready(match &inner.last_error {
                Some(e) => Err(e.clone()),
                // Published values never go away, so the current one is the newest published.
                None => Ok(self
                    .current
                    .load()
                    .expect("a completed attempt without error published a value")),
            });
        }
        if !inner.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            inner.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Future returned by [`Slot::wait`].
pub(crate) struct Wait<'a, T, E> {
    slot: &'a Slot<T, E>,
    seen: u64,
}

impl<T, E: Clone> Future for Wait<'_, T, E> {
    type Output = Result<Arc<T>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.slot.poll_wait(self.seen, cx)
    }
}

#[cfg(all(test, not(feature = "loom")))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn one_leader_then_waiters_get_the_published_value() {
        let slot: Slot<u32, String> = Slot::new();
        let Begin::Lead(seen) = slot.begin(|_| true) else {
            panic!("first caller must lead")
        };
        let Begin::Wait(seen2) = slot.begin(|_| true) else {
            panic!("second caller must wait")
        };
        assert_eq!(seen, seen2);
        let mut wait = Box::pin(slot.wait(seen2));
        assert!(wait.as_mut().now_or_never().is_none());
        slot.publish(Arc::new(7));
        assert_eq!(*wait.now_or_never().expect("ready").expect("ok"), 7);
        assert!(matches!(slot.begin(|_| true), Begin::Ready(v) if *v == 7));
        // Not usable any more (expired): a new fetch is led, and a failure keeps the old value.
        let Begin::Lead(seen) = slot.begin(|_| false) else {
            panic!("must lead a new fetch")
        };
        slot.fail("down".to_owned());
        assert_eq!(slot.wait(seen).now_or_never().expect("ready").unwrap_err(), "down");
        assert_eq!(slot.current().as_deref(), Some(&7));
        slot.close("gone".to_owned());
        assert_eq!(slot.wait(u64::MAX).now_or_never().expect("ready").unwrap_err(), "gone");
        assert!(!slot.try_lead());
    }
}

#[cfg(all(test, feature = "loom"))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::thread;

    /// Bounded exploration: every interleaving with up to three preemptions, which covers the races
    /// of this protocol (each operation takes the lock at most twice) in seconds rather than hours.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    /// Concurrent callers for one key: exactly one leads, one fetch happens, and every caller ends
    /// up with the value it published.
    #[test]
    fn loom_concurrent_callers_cause_one_fetch() {
        model(|| {
            let slot: Arc<Slot<usize, ()>> = Arc::new(Slot::new());
            let fetches = Arc::new(AtomicUsize::new(0));
            let caller = {
                let slot = slot.clone();
                let fetches = fetches.clone();
                move || match slot.begin(|_| true) {
                    Begin::Ready(v) => *v,
                    Begin::Lead(seen) => {
                        let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
                        slot.publish(Arc::new(100 + n));
                        *loom::future::block_on(slot.wait(seen)).expect("published")
                    }
                    Begin::Wait(seen) => *loom::future::block_on(slot.wait(seen)).expect("published"),
                }
            };
            // Three callers: two threads and this one.
            let handles: Vec<_> = (0..2).map(|_| thread::spawn(caller.clone())).collect();
            let mut values = vec![caller()];
            values.extend(handles.into_iter().map(|h| h.join().expect("thread")));
            assert_eq!(fetches.load(Ordering::SeqCst), 1);
            assert!(values.iter().all(|v| *v == 101), "{values:?}");
        });
    }

    /// Readers see whole published values while a swap happens; a background refresh never runs
    /// beside a fetch led by a connection; a connection that waits gets a usable value.
    #[test]
    fn loom_swap_keeps_old_readers_and_refresh_excludes_fetch() {
        model(|| {
            let slot: Arc<Slot<usize, ()>> = Arc::new(Slot::new());
            slot.publish(Arc::new(1));
            let reader = {
                let slot = slot.clone();
                thread::spawn(move || {
                    let held = slot.current().expect("value");
                    let later = slot.current().expect("value");
                    (*held, *later)
                })
            };
            let refresher = {
                let slot = slot.clone();
                thread::spawn(move || {
                    if slot.try_lead() {
                        slot.publish(Arc::new(2));
                        true
                    } else {
                        false
                    }
                })
            };
            // A connection that finds the value unusable at the same time.
            let conn = match slot.begin(|v| *v >= 2) {
                Begin::Ready(v) => *v,
                Begin::Lead(seen) => {
                    slot.publish(Arc::new(3));
                    *loom::future::block_on(slot.wait(seen)).expect("published")
                }
                Begin::Wait(seen) => *loom::future::block_on(slot.wait(seen)).expect("published"),
            };
            let (held, later) = reader.join().expect("reader");
            let refreshed = refresher.join().expect("refresher");
            // Whatever the interleaving, a reader sees whole published values only.
            assert!(
                [1, 2, 3].contains(&held) && [1, 2, 3].contains(&later),
                "{held} {later}"
            );
            assert!(conn >= 2, "the connection got a usable value: {conn}");
            let last = *slot.current().expect("value");
            assert!(last == 2 || last == 3);
            if !refreshed {
                assert_eq!(last, 3);
            }
        });
    }
}
