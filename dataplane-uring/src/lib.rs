//! The meshwire node proxy's data path on glommio (thread-per-core io_uring): the io_uring build
//! reuses all of `meshwire-dataplane` (configuration, state, routing and authorization, the
//! control plane, the per-connection proxy logic written over [`meshwire_dataplane::rt::Runtime`],
//! telemetry, admin) and supplies only the runtime plumbing.
//!
//! - [`rt`]: the [`Runtime`](meshwire_dataplane::rt::Runtime) on glommio: connecting sockets made
//!   by the socket factory, the HBONE pool's connector; its stream ([`rt::UringStream`], glommio's
//!   TCP stream with the `tokio::io` traits, reading into uninitialised memory without zeroing it
//!   and writing vectors in one `sendmsg`), timer and executor are `meshwire-rt`'s (feature
//!   `glommio`).
//! - [`listener`]: listeners made by the socket factory, handed to glommio (`unsafe`: the
//!   descriptor's ownership hand-over).
//! - [`spread`]: [`spread::RoundRobin`], an eBPF program that deals a listener's new connections
//!   over the cores in turn rather than by the kernel's hash (`unsafe`: the `bpf(2)` calls).
//! - [`proxy`]: [`proxy::UringProxy`], the binary `ztunnel-uring`: one pinned executor per core,
//!   listeners per core with `SO_REUSEPORT`, per-core HBONE pools and metrics, the control plane
//!   on one tokio thread.
//! - [`preflight`]: the checks before the executors start (locked-memory limit, io_uring turned
//!   off, the CPU set) and the classification of an executor's start errors.

pub mod listener;
pub mod preflight;
pub mod proxy;
pub mod rt;
pub mod spread;
