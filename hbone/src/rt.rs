//! The runtime seam: how the library sees time and, where asked to, spawns.

use std::future::Future;

pub use meshwire_identity::time::Timer;

/// Runs futures on the caller's executor.
///
/// Generic over the future type, so the caller decides what it needs: a tokio implementation
/// requires `Send + 'static` futures, a glommio one (`spawn_local`) only `'static`.
///
/// ```
/// use meshwire_hbone::rt::Executor;
///
/// #[derive(Clone)]
/// struct Tokio;
/// impl<F: std::future::Future<Output = ()> + Send + 'static> Executor<F> for Tokio {
///     fn execute(&self, future: F) {
///         tokio::spawn(future);
///     }
/// }
/// ```
pub trait Executor<F: Future<Output = ()>> {
    /// Starts running `future` in the background.
    fn execute(&self, future: F);
}
