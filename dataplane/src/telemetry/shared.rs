//! One shared copy of each value many connections hold alike: a connection's metric labels, the
//! names of its access log line and the authorization attributes the connection registry keeps are
//! the same for every connection between two workloads, and held for the connection's life, so
//! that each connection keeps a pointer rather than its own copy (about 1.5 kB of values and
//! strings each).
//!
//! A value is looked up under a read lock (the usual case, a value seen before); a new one is added
//! under the write lock, which also sweeps out, whenever the set has doubled since the last sweep,
//! the values no connection holds any more: the set stays within twice what live connections use.
//!
//! ```
//! use meshwire_dataplane::telemetry::shared::Shared;
//!
//! let names = Shared::default();
//! let a = names.share("cart -> db".to_owned());
//! let b = names.share("cart -> db".to_owned());
//! assert!(std::sync::Arc::ptr_eq(&a, &b));
//! assert_eq!(names.len(), 1);
//! ```

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, PoisonError, RwLock};

/// Below this many values, the set is never swept.
const FIRST_SWEEP: usize = 64;

/// The set of shared values (see the [module](self) documentation).
#[derive(Debug)]
pub struct Shared<T> {
    inner: RwLock<Values<T>>,
}

#[derive(Debug)]
struct Values<T> {
    set: HashSet<Arc<T>>,
    /// The size at which the next insertion sweeps the set first.
    sweep_at: usize,
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Self {
            inner: RwLock::new(Values {
                set: HashSet::new(),
                sweep_at: FIRST_SWEEP,
            }),
        }
    }
}

impl<T: Eq + Hash> Shared<T> {
    /// The shared copy of `value`: the one in use already, or `value`, now shared.
    pub fn share(&self, value: T) -> Arc<T> {
        if let Some(shared) = self
            .inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .set
            .get(&value)
        {
            return Arc::clone(shared);
        }
        let mut values = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = values.set.get(&value) {
            return Arc::clone(shared);
        }
        if values.set.len() >= values.sweep_at {
            // Only the set holds these: no connection uses them any more.
            values.set.retain(|held| Arc::strong_count(held) > 1);
            values.sweep_at = (values.set.len() * 2).max(FIRST_SWEEP);
        }
        let shared = Arc::new(value);
        values.set.insert(Arc::clone(&shared));
        shared
    }

    /// How many values the set holds (some perhaps no longer in use, until the next sweep).
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).set.len()
    }

    /// Whether the set holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_unused_ones_are_swept_as_the_set_grows() {
        let shared = Shared::default();
        let kept: Vec<Arc<String>> = (0..10).map(|i| shared.share(format!("kept {i}"))).collect();
        for (i, value) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(value, &shared.share(format!("kept {i}"))));
        }
        // Values nobody holds stay until the set reaches its sweep size...
        for i in 0..(FIRST_SWEEP - 10) {
            drop(shared.share(format!("gone {i}")));
        }
        assert_eq!(shared.len(), FIRST_SWEEP);
        // ...and the next new value sweeps them out; the values in use stay.
        let last = shared.share("last".to_owned());
        assert_eq!(shared.len(), 11);
        for (i, value) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(value, &shared.share(format!("kept {i}"))));
        }
        assert_eq!(*last, "last");
        // The next sweep waits until the set doubles again (at least the first sweep size).
        for i in 0..(FIRST_SWEEP - 11) {
            drop(shared.share(format!("again {i}")));
        }
        assert_eq!(shared.len(), FIRST_SWEEP);
    }
}
