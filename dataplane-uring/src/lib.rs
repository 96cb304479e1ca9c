//! The meshwire node proxy's data path on glommio (thread-per-core io_uring): the io_uring build
//! reuses all of `meshwire-dataplane` (configuration, state, routing and authorization, the
//! per-connection proxy logic written over [`meshwire_dataplane::rt::Runtime`], telemetry, admin) and
//! supplies only the runtime plumbing.
//!
//! So far: [`rt`], the [`Runtime`](meshwire_dataplane::rt::Runtime) on glommio. The binary
//! (`ztunnel-uring`: executors per core, listeners per core, per-core pools) is not written yet.

pub mod rt;
