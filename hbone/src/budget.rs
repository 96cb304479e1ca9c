//! Budgets of bytes held for peers: what bounds a proxy's memory when a peer does not read.
//!
//! A stream whose upstream sends faster than the peer reads would have its bytes buffered by the
//! proxy (in the copy loop and in HTTP/2's send buffer) for as long as the peer lets it. A
//! [`BufferBudget`] caps those bytes: a stream takes a [`Lease`] of a fixed size (its largest read
//! buffer plus its HTTP/2 send buffer) from its connection's budget and from the process's before it
//! reads from its upstream, and gives it back when the upstream has nothing more to send (paused or
//! ended) and HTTP/2 has let go of every byte the stream read: bytes HTTP/2 still queues for a peer
//! that does not read stay under the lease. When a budget is spent, streams wait for a lease instead
//! of reading: back-pressure reaches the upstream through TCP, and no byte already read is dropped.
//!
//! Accounting costs two atomic operations when a stream starts a burst and two when it ends one;
//! per chunk, only the stream's own count of chunks HTTP/2 holds. A lease is all or nothing, so streams waiting for one never hold part of a
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
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::settings::Settings;

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

    /// Charges as many of `n` bytes as fit under the limit; returns how many it charged.
    pub fn charge_up_to(&self, n: usize) -> usize {
        let mut charged = 0;
        let _ = self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
            charged = n.min(self.limit.saturating_sub(used));
            (charged > 0).then(|| used + charged)
        });
        charged
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

/// HTTP/2's initial connection window (RFC 9113 section 6.9.2): what every connection may receive
/// before any WINDOW_UPDATE, hence the floor of a [`WindowLease`].
pub const HTTP2_DEFAULT_WINDOW: u32 = 65_535;

/// A connection's receive windows, leased from a process-wide budget for the connection's life.
///
/// What an HTTP/2 connection holds of what its peer sent and its destinations have not taken yet is
/// bounded by the connection window it advertises. To bound it per process too, a connection leases
/// the part of its configured window above HTTP/2's 64 KiB default when it is set up, takes what the
/// budget has left if that is less, and advertises only what it got: the connection window is
/// [`HTTP2_DEFAULT_WINDOW`] plus the lease, and each stream's window at most a quarter of it (the
/// ratio [`SettingsBuilder::build`] asks of the configured windows, so that one stalled stream does not
/// stall its siblings). A connection thus always works, and every connection together holds at most
/// the budget plus 64 KiB each. A connection that got less than it wanted leases the rest when the
/// budget has room again ([`WindowLease::top_up`]; the server tries at each new stream). Dropping
/// the lease (when the connection closes) gives it back.
///
/// One atomic operation when a connection is set up and one when it closes; nothing per frame.
///
/// ```
/// use std::sync::Arc;
/// use meshwire_hbone::budget::{BufferBudget, HTTP2_DEFAULT_WINDOW, WindowLease};
/// use meshwire_hbone::settings::Settings;
///
/// let budget = Arc::new(BufferBudget::new(1 << 20));
/// let settings = Settings::default(); // 16 MiB connection window, 4 MiB stream windows
/// let lease = WindowLease::take(&budget, &settings);
/// assert_eq!(lease.leased(), 1 << 20, "what the budget had");
/// assert_eq!(lease.apply(&settings).connection_window(), HTTP2_DEFAULT_WINDOW + (1 << 20));
/// assert_eq!(budget.used(), 1 << 20);
/// drop(lease);
/// assert_eq!(budget.used(), 0);
/// ```
///
/// [`SettingsBuilder::build`]: crate::settings::SettingsBuilder::build
#[derive(Debug)]
pub struct WindowLease {
    budget: Arc<BufferBudget>,
    leased: usize,
}

impl WindowLease {
    /// Leases the windows of `settings` from `budget`, as much of them as it has.
    pub fn take(budget: &Arc<BufferBudget>, settings: &Settings) -> Self {
        let wanted = settings.connection_window().saturating_sub(HTTP2_DEFAULT_WINDOW);
        Self {
            budget: budget.clone(),
            leased: budget.charge_up_to(wanted as usize),
        }
    }

    /// Leases what is missing of the windows of `settings` (those the lease was taken for), as
    /// much as the budget has now; returns the settings to advertise if the lease grew. Costs
    /// nothing once the lease is whole, one atomic operation otherwise.
    pub fn top_up(&mut self, settings: &Settings) -> Option<Settings> {
        let wanted =
            (settings.connection_window().saturating_sub(HTTP2_DEFAULT_WINDOW) as usize).saturating_sub(self.leased);
        if wanted == 0 {
            return None;
        }
        let got = self.budget.charge_up_to(wanted);
        if got == 0 {
            return None;
        }
        self.leased += got;
        Some(self.apply(settings))
    }

    /// Bytes taken from the budget.
    pub fn leased(&self) -> usize {
        self.leased
    }

    /// The settings to advertise: `settings` (those the lease was taken for) with the windows the
    /// lease allows.
    pub fn apply(&self, settings: &Settings) -> Settings {
        let (connection_window, stream_window) = leased_windows(settings, self.leased);
        settings.with_windows(connection_window, stream_window)
    }
}

impl Drop for WindowLease {
    fn drop(&mut self) {
        self.budget.release(self.leased);
    }
}

/// The connection and stream windows a connection configured with `settings` advertises when it
/// leased `leased` bytes: never more than configured, the connection window at least HTTP/2's
/// default, a stream window at most a quarter of the connection window (and at least 1).
pub fn leased_windows(settings: &Settings, leased: usize) -> (u32, u32) {
    let leased = u32::try_from(leased).unwrap_or(u32::MAX);
    let connection = settings
        .connection_window()
        .min(HTTP2_DEFAULT_WINDOW.saturating_add(leased));
    let stream = if connection == settings.connection_window() {
        settings.stream_window()
    } else {
        settings.stream_window().min(connection / 4).max(1)
    };
    (connection, stream)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
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
    fn charge_up_to_takes_what_is_left() {
        let b = BufferBudget::new(100);
        assert_eq!(b.charge_up_to(60), 60);
        assert_eq!(b.charge_up_to(60), 40, "what is left");
        assert_eq!(b.charge_up_to(1), 0, "spent");
        assert_eq!(b.used(), 100);
        b.release(100);
        assert_eq!(b.charge_up_to(usize::MAX), 100, "no overflow");
    }

    #[test]
    fn window_leases_take_the_part_above_http2_default_and_give_it_back() {
        const MIB: usize = 1 << 20;
        let settings = Settings::default();
        let configured = settings.connection_window() as usize - HTTP2_DEFAULT_WINDOW as usize;
        let budget = Arc::new(BufferBudget::new(2 * configured + MIB));
        let first = WindowLease::take(&budget, &settings);
        let second = WindowLease::take(&budget, &settings);
        // Both whole: the configured windows, unchanged.
        for lease in [&first, &second] {
            assert_eq!(lease.leased(), configured);
            assert_eq!(&lease.apply(&settings), &settings);
        }
        // The third gets what is left, the fourth HTTP/2's default only.
        let third = WindowLease::take(&budget, &settings);
        assert_eq!(third.leased(), MIB);
        assert_eq!(
            (
                third.apply(&settings).connection_window(),
                third.apply(&settings).stream_window()
            ),
            (
                HTTP2_DEFAULT_WINDOW + MIB as u32,
                (HTTP2_DEFAULT_WINDOW + MIB as u32) / 4
            )
        );
        let fourth = WindowLease::take(&budget, &settings);
        assert_eq!(fourth.leased(), 0);
        assert_eq!(
            (
                fourth.apply(&settings).connection_window(),
                fourth.apply(&settings).stream_window()
            ),
            (HTTP2_DEFAULT_WINDOW, HTTP2_DEFAULT_WINDOW / 4)
        );
        assert_eq!(
            fourth.apply(&settings).send_buffer(),
            settings.send_buffer(),
            "other settings kept"
        );
        assert_eq!(budget.used(), budget.limit());
        drop((first, third, fourth));
        assert_eq!(budget.used(), configured);
        drop(second);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_short_lease_is_topped_up_when_the_budget_has_room_again() {
        let settings = Settings::default();
        let wanted = settings.connection_window() as usize - HTTP2_DEFAULT_WINDOW as usize;
        let budget = Arc::new(BufferBudget::new(wanted + 1000));
        let first = WindowLease::take(&budget, &settings);
        let mut second = WindowLease::take(&budget, &settings);
        assert_eq!(second.leased(), 1000);
        assert_eq!(second.top_up(&settings), None, "the budget is spent");
        drop(first);
        let grown = second.top_up(&settings).expect("room again");
        assert_eq!(grown, settings, "whole");
        assert_eq!(second.leased(), wanted);
        assert_eq!(second.top_up(&settings), None, "nothing more wanted");
        assert_eq!(budget.used(), wanted);
        drop(second);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn leased_windows_never_exceed_the_configured_ones() {
        let small = Settings::builder()
            .connection_window(40_000)
            .stream_window(10_000)
            .build()
            .unwrap();
        // A configured window under HTTP/2's default leases nothing and is advertised as it is.
        let budget = Arc::new(BufferBudget::new(1 << 30));
        let lease = WindowLease::take(&budget, &small);
        assert_eq!(lease.leased(), 0);
        assert_eq!(lease.apply(&small), small);
        // Stream windows stay at most a quarter of the connection's, however small.
        let ratio = Settings::builder()
            .connection_window(16 << 20)
            .stream_window(1 << 10)
            .build()
            .unwrap();
        assert_eq!(leased_windows(&ratio, 0), (HTTP2_DEFAULT_WINDOW, 1 << 10));
        assert_eq!(leased_windows(&ratio, usize::MAX), (16 << 20, 1 << 10));
        let default = Settings::default();
        for leased in [0, 1, 1000, 1 << 20, 15 << 20, 16 << 20, usize::MAX] {
            let (connection, stream) = leased_windows(&default, leased);
            assert!(connection <= default.connection_window() && connection >= HTTP2_DEFAULT_WINDOW);
            assert!(stream <= default.stream_window() && stream <= connection / 4 && stream >= 1);
        }
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
