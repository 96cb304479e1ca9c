//! Pacing of the xDS thread's long work (`--xds-cpu-share` below 1).
//!
//! A push that changes every workload of a large mesh costs the proxy tens of milliseconds of CPU
//! (decoding, converting, building the new state, freeing the old one). At `SCHED_IDLE` that work
//! never holds a CPU a data-path thread wants, yet a CPU kept busy even at idle priority still
//! costs the data path on a small node: the scheduler no longer finds that CPU idle when it places
//! a waking thread, which can then wait behind another thread for a scheduler tick. Paced, the work
//! runs in slices of [`SLICE`] of the thread's CPU time with rests between them, so that it takes
//! a given share of one CPU and the CPU halts the rest of the time: a storm of large pushes no
//! longer keeps a CPU busy. A push then takes longer to apply, and more CPU (its caches are cold
//! after each rest).
//!
//! The loops of a push call [`point`] where they may rest; outside [`paced`] (on any other thread,
//! in tests of the state, in the benchmark's in-process runs) a point does nothing.

use std::cell::RefCell;
use std::time::Duration;

/// The CPU time a paced work runs before it rests.
pub(crate) const SLICE: Duration = Duration::from_millis(1);

/// Points between two readings of the thread's CPU time (a point is a few microseconds of work at
/// most: one resource converted, one workload indexed).
const CHECK_EVERY: u32 = 16;

/// The rest a work owes after each slice: `share` of one CPU for the work, the rest for nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Pacer {
    /// The rest per unit of work: `(1 - share) / share`.
    rest_per_work: f64,
    /// The thread's CPU time when the current slice began.
    slice_began: Duration,
}

impl Pacer {
    /// A pacer for a work that may take `share` of one CPU (in (0, 1)), starting at the thread's
    /// CPU time `cpu`.
    pub(crate) fn new(share: f64, cpu: Duration) -> Self {
        let share = share.clamp(0.01, 1.0);
        Pacer {
            rest_per_work: (1.0 - share) / share,
            slice_began: cpu,
        }
    }

    /// At a point where the thread's CPU time is `cpu`: the rest it owes now, if its slice is
    /// spent.
    pub(crate) fn due(&self, cpu: Duration) -> Option<Duration> {
        let worked = cpu.saturating_sub(self.slice_began);
        (worked >= SLICE).then(|| worked.mul_f64(self.rest_per_work))
    }

    /// The thread rested; its next slice begins at CPU time `cpu`.
    pub(crate) fn rested(&mut self, cpu: Duration) {
        self.slice_began = cpu;
    }
}

/// What pacing a work cost it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Rests {
    /// How many times it rested.
    pub(crate) count: u32,
    /// How long it rested in all.
    pub(crate) total: Duration,
}

struct Active {
    pacer: Pacer,
    countdown: u32,
    rests: Rests,
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Runs `work` on this thread paced to `share` of one CPU (a share of 1 or more runs it at once),
/// and says how it rested. Within a paced work, a nested one runs in the outer one's pace.
pub(crate) fn paced<R>(share: f64, work: impl FnOnce() -> R) -> (R, Rests) {
    if active() || share >= 1.0 || share.is_nan() {
        return (work(), Rests::default());
    }
    ACTIVE.with(|active| {
        *active.borrow_mut() = Some(Active {
            pacer: Pacer::new(share, thread_cpu()),
            countdown: CHECK_EVERY,
            rests: Rests::default(),
        });
    });
    // Cleared however `work` ends (a panic included), so that no later work of the thread rests.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            let _ = ACTIVE.try_with(|active| active.borrow_mut().take());
        }
    }
    let clear = Clear;
    let result = work();
    let rests = rests();
    drop(clear);
    (result, rests)
}

/// Whether a paced work runs on this thread (within [`paced`] at a share below one CPU).
pub(crate) fn active() -> bool {
    ACTIVE.with(|active| active.borrow().is_some())
}

/// How the paced work running on this thread rested so far (nothing outside [`paced`]).
pub(crate) fn rests() -> Rests {
    ACTIVE.with(|active| active.borrow().as_ref().map(|a| a.rests).unwrap_or_default())
}

/// A point of a long work where it may rest: within [`paced`], every [`CHECK_EVERY`] points the
/// thread's CPU time is read, and once a [`SLICE`] of it is spent the thread sleeps what it owes.
/// Elsewhere it does nothing.
pub(crate) fn point() {
    let rest = ACTIVE.with(|active| {
        let mut active = active.borrow_mut();
        let active = active.as_mut()?;
        active.countdown -= 1;
        if active.countdown > 0 {
            return None;
        }
        active.countdown = CHECK_EVERY;
        active.pacer.due(thread_cpu())
    });
    let Some(rest) = rest else { return };
    // The thread-local is not borrowed while the thread sleeps.
    std::thread::sleep(rest);
    ACTIVE.with(|active| {
        if let Some(active) = active.borrow_mut().as_mut() {
            active.pacer.rested(thread_cpu());
            active.rests.count += 1;
            active.rests.total += rest;
        }
    });
}

/// Drops `items` one by one, with a [`point`] after each (a collection that frees its parts as it
/// is consumed is then freed in the pace of the work).
pub(crate) fn drop_each<I: IntoIterator>(items: I) {
    for item in items {
        drop(item);
        point();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slice_of_work_owes_the_rest_of_its_share() {
        let mut pacer = Pacer::new(0.25, 10 * MS);
        assert_eq!(pacer.due(10 * MS), None);
        assert_eq!(pacer.due(10 * MS + SLICE / 2), None);
        // A quarter of one CPU: 3 ms of rest per ms of work, counted from the slice's start.
        assert_eq!(pacer.due(10 * MS + SLICE), Some(3 * SLICE));
        assert_eq!(pacer.due(10 * MS + 2 * SLICE), Some(6 * SLICE));
        pacer.rested(12 * MS);
        assert_eq!(pacer.due(12 * MS + SLICE / 2), None);
        assert_eq!(pacer.due(12 * MS + SLICE), Some(3 * SLICE));
        // CPU time never goes back; a reading before the slice's start owes nothing.
        assert_eq!(pacer.due(MS), None);
    }

    #[test]
    fn shares_out_of_range_are_clamped() {
        assert_eq!(Pacer::new(1.0, Duration::ZERO).due(SLICE), Some(Duration::ZERO));
        assert_eq!(Pacer::new(5.0, Duration::ZERO).due(SLICE), Some(Duration::ZERO));
        // At most 99 ms of rest per ms of work.
        assert_eq!(Pacer::new(0.0, Duration::ZERO).due(SLICE), Some(SLICE.mul_f64(99.0)));
    }

    /// Burns about `cpu` of this thread's CPU time, calling [`point`] as a long work does.
    fn burn(cpu: Duration) {
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu().saturating_sub(start) < cpu {
            for i in 0..200u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            point();
        }
    }

    #[test]
    fn a_paced_work_rests_in_proportion_and_an_unpaced_one_does_not() {
        let work = 10 * MS;
        let ((), rests) = paced(0.5, || burn(work));
        // Half of one CPU: about as much rest as work, in slices of about 1 ms of CPU time (the
        // last slice may be cut short; a slice may run past its end by up to CHECK_EVERY points).
        assert!(rests.count >= 5, "{rests:?}");
        assert!(rests.total >= work.mul_f64(0.7), "{rests:?}");
        assert!(rests.total <= work.mul_f64(2.0), "{rests:?}");
        // Outside `paced`, and at a share of one CPU, points do nothing.
        burn(work);
        let ((), unpaced) = paced(1.0, || burn(work));
        assert_eq!(unpaced, Rests::default());
        // Nested: the outer pace counts.
        let (inner, outer) = paced(0.5, || paced(0.9, || burn(work)).1);
        assert_eq!(inner, Rests::default(), "a nested work has no pace of its own");
        assert!(outer.count >= 5, "{outer:?}");
    }

    #[test]
    fn a_work_that_panics_leaves_the_thread_unpaced() {
        let outcome = std::panic::catch_unwind(|| paced(0.5, || panic!("boom")));
        assert!(outcome.is_err());
        assert!(ACTIVE.with(|active| active.borrow().is_none()));
    }
}
