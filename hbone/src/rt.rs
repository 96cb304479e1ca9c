//! The runtime seam: how the library sees time and, where asked to, spawns.
//!
//! [`Timer`], [`Executor`] and [`timeout`] are defined in `meshwire-rt`, the crate of the runtime
//! seam, and re-exported here; its `tokio` and `glommio` features provide their implementations
//! for each runtime (`TokioTimer`, `TokioExecutor`, `GlommioTimer`, `GlommioExecutor`).

pub use meshwire_rt::{Executor, Timer, timeout};
