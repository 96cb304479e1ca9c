//! Budgets of bytes held for peers: what bounds a proxy's memory when a peer does not read.
//!
//! A stream whose upstream sends faster than the peer reads would have its bytes buffered by the
//! proxy (in the copy loop and in HTTP/2's send buffer) for as long as the peer lets it. A
//! [`BufferBudget`] caps those bytes: a stream takes a [`Lease`] of a fixed size (its largest read
//! buffer plus its HTTP/2 send buffer) from its connection's budget and from the process's before it
//! reads from its upstream, and gives it back when the upstream has nothing more to send or the
//! stream ends. When a budget is spent, streams wait for a lease instead of reading: back-pressure
//! reaches the upstream through TCP, and no byte already read is dropped.
//!
//! Accounting costs two atomic operations when a stream starts a burst and two when it ends one,
//! none per chunk. A lease is all or nothing, so streams waiting for one never hold part of a
//! budget, and a budget at least one lease large always lets one stream through.
//!
//! ```
//! use meshwire_hbone::budget::BufferBudget;
//!
//! let budget = BufferBudget::new(1024);
//! assert!(budget.try_charge(1000));
//! assert!(!budget.try_charge(100), "over the limit");
//! budget.release(1000);
//! assert_eq!(budget.used(), 0);
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

/// A limit on bytes held, shared by the streams it covers (one connection's, or a whole process's).
/// Thread-safe: on a thread-per-core runtime one budget may cover every core.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    used: AtomicUsize,
    /// How many tasks wait in `waiters`; read without the lock when releasing.
    waiting: AtomicUsize,
    waiters: Mutex<Vec<Waker>>,
}

impl BufferBudget {
    /// A budget of `limit` bytes, none used.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes currently charged.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `n` bytes if they fit under the limit; returns whether they did.
    pub fn try_charge(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Gives back `n` bytes charged before, and wakes the tasks that wait for room.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::SeqCst);
        // SeqCst with the registration in `poll_charge`: either the waiter's second try sees the
        // release, or the release sees the waiter.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let waiters = {
                let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
                self.waiting.store(0, Ordering::SeqCst);
                std::mem::take(&mut *waiters)
            };
            for waker in waiters {
                waker.wake();
            }
        }
    }

    /// Charges `n` bytes, or registers the task to be woken when bytes are released.
    pub fn poll_charge(&self, cx: &mut Context<'_>, n: usize) -> Poll<()> {
        if self.try_charge(n) {
            return Poll::Ready(());
        }
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
                self.waiting.store(waiters.len(), Ordering::SeqCst);
            }
        }
        // A release between the failed charge and the registration found no waiter: try again.
        if self.try_charge(n) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// The budgets a stream's lease is charged to: its connection's (if it has one), then its process's.
#[derive(Debug, Clone, Copy)]
pub struct Budgets<'a> {
    /// The connection's budget.
    pub connection: Option<&'a BufferBudget>,
    /// The process's budget (shared by every connection).
    pub process: &'a BufferBudget,
}

/// What one stream holds of its budgets: nothing, its connection's share only (while it waits for
/// the process's), or a whole lease. Dropping it gives everything back.
#[derive(Debug)]
pub struct Lease<'a> {
    budgets: Budgets<'a>,
    size: usize,
    connection: bool,
    process: bool,
}

impl<'a> Lease<'a> {
    /// An empty lease of `size` bytes against `budgets`.
    pub fn new(budgets: Budgets<'a>, size: usize) -> Self {
        Self {
            budgets,
            size,
            connection: false,
            process: false,
        }
    }

    /// Whether the lease is held.
    pub fn held(&self) -> bool {
        self.process
    }

    /// Takes the lease, from the connection's budget and then the process's, or registers the task
    /// to be woken when one of them has room. Waiting for the process's budget, it keeps its
    /// connection's share (a lease is never released half-way, so waiters cannot starve each other).
    pub fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.connection {
            if let Some(connection) = self.budgets.connection {
                std::task::ready!(connection.poll_charge(cx, self.size));
            }
            self.connection = true;
        }
        if !self.process {
            std::task::ready!(self.budgets.process.poll_charge(cx, self.size));
            self.process = true;
        }
        Poll::Ready(())
    }

    /// Gives the lease back (the stream has nothing buffered).
    pub fn release(&mut self) {
        if self.process {
            self.budgets.process.release(self.size);
            self.process = false;
        }
        if self.connection {
            if let Some(connection) = self.budgets.connection {
                connection.release(self.size);
            }
            self.connection = false;
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn flag() -> (Arc<Flag>, Waker) {
        let f = Arc::new(Flag(AtomicBool::new(false)));
        (f.clone(), Waker::from(f))
    }

    #[test]
    fn charges_up_to_the_limit_and_no_further() {
        let b = BufferBudget::new(100);
        assert!(b.try_charge(60));
        assert!(b.try_charge(40));
        assert!(!b.try_charge(1), "full");
        assert_eq!(b.used(), 100);
        b.release(40);
        assert!(!b.try_charge(41));
        assert!(b.try_charge(40));
        assert!(!b.try_charge(usize::MAX), "no overflow");
    }

    #[test]
    fn a_waiter_is_woken_when_bytes_are_released() {
        let b = BufferBudget::new(100);
        assert!(b.try_charge(100));
        let (woken, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        assert!(b.poll_charge(&mut cx, 50).is_pending());
        // Polled again while waiting: registered once.
        assert!(b.poll_charge(&mut cx, 50).is_pending());
        assert_eq!(b.waiters.lock().unwrap().len(), 1);
        b.release(50);
        assert!(woken.0.load(Ordering::SeqCst), "the waiter was woken");
        assert!(b.poll_charge(&mut cx, 50).is_ready());
        assert_eq!(b.used(), 100);
    }

    #[test]
    fn a_lease_takes_both_budgets_and_gives_both_back_on_drop() {
        let connection = BufferBudget::new(300);
        let process = BufferBudget::new(1000);
        let budgets = Budgets {
            connection: Some(&connection),
            process: &process,
        };
        let (_, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let mut leases: Vec<Lease<'_>> = (0..4).map(|_| Lease::new(budgets, 100)).collect();
        for lease in &mut leases[..3] {
            assert!(lease.poll_acquire(&mut cx).is_ready());
        }
        assert!(
            leases[3].poll_acquire(&mut cx).is_pending(),
            "the connection's budget is spent"
        );
        assert!(!leases[3].held());
        assert_eq!((connection.used(), process.used()), (300, 300));
        leases[0].release();
        assert!(!leases[0].held());
        assert!(leases[3].poll_acquire(&mut cx).is_ready());
        drop(leases);
        assert_eq!((connection.used(), process.used()), (0, 0));
    }

    #[test]
    fn waiting_for_the_process_keeps_the_connection_share() {
        let (c1, c2) = (BufferBudget::new(1000), BufferBudget::new(1000));
        let process = BufferBudget::new(150);
        let (woken, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let mut first = Lease::new(
            Budgets {
                connection: Some(&c1),
                process: &process,
            },
            100,
        );
        let mut second = Lease::new(
            Budgets {
                connection: Some(&c2),
                process: &process,
            },
            100,
        );
        assert!(first.poll_acquire(&mut cx).is_ready());
        assert!(second.poll_acquire(&mut cx).is_pending());
        assert_eq!(
            (c2.used(), process.used()),
            (100, 100),
            "holds its connection share only"
        );
        drop(first);
        assert!(woken.0.load(Ordering::SeqCst));
        assert!(second.poll_acquire(&mut cx).is_ready());
        drop(second);
        assert_eq!((c1.used(), c2.used(), process.used()), (0, 0, 0));
    }

    #[test]
    fn concurrent_charges_never_exceed_the_limit() {
        let b = Arc::new(BufferBudget::new(1000));
        let over = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (b, over) = (b.clone(), over.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if b.try_charge(300) {
                            if b.used() > 1000 {
                                over.store(true, Ordering::SeqCst);
                            }
                            b.release(300);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!over.load(Ordering::SeqCst));
        assert_eq!(b.used(), 0);
    }
}
