//! Giving back what a thread's allocator cache holds once the thread has gone quiet.
//!
//! jemalloc (the binaries' allocator) keeps objects a thread freed in a cache of that thread (its
//! tcache: up to 200 objects of each small size and 20 of each size up to 32 KiB), so that the
//! thread's next allocations of those sizes take no lock. The cache empties only as the thread
//! allocates again: after a burst of connections, a thread that goes quiet keeps megabytes, which
//! jemalloc's background decay ([`cli::return_freed_memory`](super::cli::return_freed_memory)) does
//! not reach, since it returns only pages no object is left on. This module gives a thread's cache
//! back to the shared arenas when the thread allocated or freed anything since it last did so, at
//! most once per [`RELEASE_PERIOD`]: from the hook of a tokio runtime that runs as its thread parks
//! ([`on_park`]) and from a loop each data-path worker runs ([`keep_released`]; a multi-thread
//! runtime's worker that parks within the period of its last release keeps the rest until it wakes
//! again or runs the loop). What went back then returns to the kernel with the decay.
//!
//! It does nothing without the `jemalloc` feature, when jemalloc's thread caches are off
//! (`_RJEM_MALLOC_CONF=tcache:false`) or when a thread turned its own off.
//!
//! On the 2-vCPU benchmark machine, shape 5 (10,000 idle tunneled connections through a pair, then
//! closed): the pair's memory 10 s after the close went from 1.32x its idle memory to 1.12x
//! (`ztunnel`), 1.31x to 1.13x (`ztunnel-uring`), about what jemalloc without thread caches gives
//! (which costs 3-4 % more CPU per request); see README.

use std::time::{Duration, Instant};

use meshwire_hbone::rt::Timer;

/// A thread's cache is given back at most this often: a thread that keeps allocating refills its
/// cache from the arenas once a period (a few microseconds), and a thread that went quiet gives its
/// cache back within a period of its last park.
pub const RELEASE_PERIOD: Duration = Duration::from_secs(1);

#[cfg(feature = "jemalloc")]
mod imp {
    use std::cell::Cell;
    use std::time::Instant;

    use tikv_jemalloc_ctl::thread::ThreadLocal;
    use tikv_jemalloc_ctl::{Access, AsName};

    use super::RELEASE_PERIOD;

    /// What a thread knows about its cache.
    #[derive(Clone, Copy)]
    struct State {
        /// The thread's counts of bytes allocated and freed (jemalloc's `thread.allocatedp` and
        /// `thread.deallocatedp`); `None` where the thread may not release (caches off).
        counters: Option<(ThreadLocal<u64>, ThreadLocal<u64>)>,
        /// When the thread last gave its cache back, and its counts right after.
        last: Option<(Instant, u64)>,
    }

    thread_local! {
        static STATE: Cell<Option<State>> = const { Cell::new(None) };
    }

    fn counters() -> Option<(ThreadLocal<u64>, ThreadLocal<u64>)> {
        // jemalloc's own configuration turned the caches off: nothing to give back, and turning
        // this thread's cache back on would override it.
        if !tikv_jemalloc_ctl::opt::tcache::read().unwrap_or(false) {
            return None;
        }
        let allocated = tikv_jemalloc_ctl::thread::allocatedp::read().ok()?;
        let freed = tikv_jemalloc_ctl::thread::deallocatedp::read().ok()?;
        Some((allocated, freed))
    }

    fn activity((allocated, freed): (ThreadLocal<u64>, ThreadLocal<u64>)) -> u64 {
        allocated.get().wrapping_add(freed.get())
    }

    /// Flushes the calling thread's cache: turning it off hands every object in it back to the
    /// arenas (`thread.tcache.enabled`; jemalloc's `thread.tcache.flush` takes no argument, which
    /// its safe interface cannot pass), and on again gives the thread an empty one.
    fn flush() -> bool {
        let enabled = b"thread.tcache.enabled\0".name();
        match Access::<bool>::read(enabled) {
            Ok(true) => Access::<bool>::write(enabled, false).is_ok() && Access::<bool>::write(enabled, true).is_ok(),
            _ => false,
        }
    }

    pub(super) fn release_if_due(now: Instant) -> bool {
        let mut state = STATE.get().unwrap_or_else(|| State {
            counters: counters(),
            last: None,
        });
        let Some(counters) = state.counters else {
            STATE.set(Some(state));
            return false;
        };
        let since = activity(counters);
        let due = match state.last {
            None => true,
            Some((at, after)) => since != after && now.saturating_duration_since(at) >= RELEASE_PERIOD,
        };
        let released = due && flush();
        if released {
            state.last = Some((now, activity(counters)));
        }
        STATE.set(Some(state));
        released
    }
}

/// Gives the calling thread's allocator cache back to the arenas if the thread allocated or freed
/// anything since it last did so and that was at least [`RELEASE_PERIOD`] before `now` (or never).
/// Returns whether it did. Cheap when not due: a thread-local read and a comparison.
pub fn release_if_due(now: Instant) -> bool {
    #[cfg(feature = "jemalloc")]
    {
        imp::release_if_due(now)
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        let _ = now;
        false
    }
}

/// The hook of a tokio runtime's threads as they park (`Builder::on_thread_park`): a thread that
/// has nothing left to do gives back its cache, at most once per [`RELEASE_PERIOD`].
pub fn on_park() {
    release_if_due(Instant::now());
}

/// Gives the cache of the thread that polls it back once per [`RELEASE_PERIOD`] when it was used
/// since; never resolves. A data-path worker runs it beside its accept loops: on an io_uring core
/// it is the core's thread, on the tokio runtime whichever worker's turn it is.
pub async fn keep_released<T: Timer>(timer: T) {
    loop {
        timer.sleep_until(timer.now() + RELEASE_PERIOD).await;
        release_if_due(timer.now());
    }
}

#[cfg(all(test, feature = "jemalloc"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use tikv_jemalloc_ctl::{Access, AsName, epoch};

    use super::{RELEASE_PERIOD, release_if_due};

    /// A thread that freed large buffers holds some in its cache; a release gives them back, and
    /// the next release is due only a period later and only if the thread used the allocator
    /// meanwhile. The thread has an arena of its own, so that the cached bytes jemalloc counts for
    /// that arena are this thread's alone.
    #[test]
    fn a_release_empties_the_thread_cache_once_per_period() {
        std::thread::spawn(|| {
            let arena = Access::<u32>::read("arenas.create\0".name()).unwrap();
            Access::<u32>::write("thread.arena\0".name(), arena).unwrap();
            let stat = format!("stats.arenas.{arena}.tcache_bytes\0");
            let cached = || {
                epoch::advance().unwrap();
                Access::<usize>::read(stat.as_str().name()).unwrap()
            };
            let start = Instant::now();
            // The first call is always due: it releases whatever there is and sets the baseline.
            release_if_due(start);
            const SIZE: usize = 24 * 1024;
            let buffers: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8; SIZE]).collect();
            drop(std::hint::black_box(buffers));
            let before = cached();
            assert!(
                before >= 4 * SIZE,
                "the thread's cache holds {before} bytes after the frees"
            );
            // Not due yet: within the period.
            assert!(!release_if_due(start + RELEASE_PERIOD / 2));
            assert_eq!(cached(), before);
            assert!(release_if_due(start + RELEASE_PERIOD));
            let after = cached();
            assert!(after < SIZE, "{after} bytes cached after the release, {before} before");
            // Nothing allocated since: not due, however late.
            assert!(!release_if_due(start + RELEASE_PERIOD * 10));
            drop(std::hint::black_box(vec![0u8; SIZE]));
            assert_eq!(cached(), SIZE);
            assert!(release_if_due(start + RELEASE_PERIOD * 10 + Duration::from_millis(1)));
            assert_eq!(cached(), 0);
        })
        .join()
        .unwrap();
    }
}
