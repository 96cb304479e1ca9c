//! Synchronisation primitives, swapped for loom's under the `loom` feature so that the
//! concurrency protocol of [`crate::slot`] can be model-checked.

#[cfg(feature = "loom")]
pub(crate) use loom::sync::Mutex;
#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::Mutex;

use std::sync::Arc;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical section
/// in this crate leaves its data consistent before anything that could panic.
#[cfg(not(feature = "loom"))]
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(feature = "loom")]
pub(crate) fn lock<T>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cell holding the current value, read without locks on the data path.
#[cfg(not(feature = "loom"))]
pub(crate) struct Current<T>(arc_swap::ArcSwapOption<T>);

#[cfg(not(feature = "loom"))]
impl<T> Current<T> {
    pub(crate) fn empty() -> Self {
        Self(arc_swap::ArcSwapOption::empty())
    }
    pub(crate) fn load(&self) -> Option<Arc<T>> {
        self.0.load_full()
    }
    pub(crate) fn store(&self, value: Arc<T>) {
        self.0.store(Some(value));
    }
}

/// Under loom the lock-free cell is modelled by a mutex: arc-swap is not loom-aware, and what the
/// model checks is the protocol around the cell, not the cell itself.
#[cfg(feature = "loom")]
pub(crate) struct Current<T>(loom::sync::Mutex<Option<Arc<T>>>);

#[cfg(feature = "loom")]
impl<T> Current<T> {
    pub(crate) fn empty() -> Self {
        Self(loom::sync::Mutex::new(None))
    }
    pub(crate) fn load(&self) -> Option<Arc<T>> {
        lock(&self.0).clone()
    }
    pub(crate) fn store(&self, value: Arc<T>) {
        *lock(&self.0) = Some(value);
    }
}
