//! The library part of meshwire's ztunnel-compatible node proxy: everything a ztunnel is, written
//! so that the tokio binary and the io_uring binary share it and replace only the data path.
//!
//! - [`admin`]: the control plane's HTTP listeners: readiness, admin (`/config_dump`, `/logging`,
//!   `/quitquitquit`) and metrics, as handles any runtime's binary can serve.
//! - [`app`]: the wiring of the binaries: the control plane (certificates, configuration watching,
//!   admin), the proxy lifecycle both binaries share (listeners, accept loops, drain), and the
//!   tokio binary.
//! - [`config`]: the proxy's validated configuration, from flags and ztunnel's environment variables.
//! - [`inpod`]: in-pod mode's bookkeeping of the pods istio-cni names (start, retry, drain,
//!   reconcile after a snapshot, readiness), over a binary's [`inpod::PodStarter`].
//! - [`istio`]: configuration from istiod (delta xDS workloads, services and policies), converted
//!   into the local configuration's model.
//! - `pace`: the xDS thread's long work run in slices with rests, so that a large push leaves the
//!   CPUs idle most of the time.
//! - [`xds`]: the local configuration file (ztunnel's `LOCAL_XDS_PATH` YAML: workloads, services,
//!   policies), parsed forgivingly with errors naming the field and line.
//! - [`state`]: an immutable snapshot of workloads, services and policies with the lookups routing
//!   needs, as pure functions.
//! - [`rbac`]: Istio L4 authorization policies and their evaluation, as pure functions.
//! - [`proxy`]: the data path: the inbound HBONE handler and the outbound proxy.
//! - [`rt`]: the runtime seam: sockets made through one factory (marks, transparent binds,
//!   reuse-port, `SO_ORIGINAL_DST`) and tokio's timer, executor and HBONE connector.
//! - [`socks5`]: the SOCKS5 handshake of the outbound SOCKS listener (CONNECT, no authentication).
//! - [`telemetry`]: Istio's TCP metrics (ztunnel's names and labels) and the per-connection access log.
//! - [`watch`]: published snapshots read without locks, the configuration file watcher, and the
//!   registry that closes established connections a new policy denies.

pub mod admin;
pub mod app;
pub mod config;
pub mod dns;
pub mod inpod;
pub mod istio;
mod pace;
pub mod proxy;
pub mod rbac;
pub mod rt;
pub mod socks5;
pub mod state;
pub mod telemetry;
pub mod watch;
pub mod xds;
