//! The library part of meshwire's ztunnel-compatible node proxy: everything a ztunnel is, written
//! so that the tokio binary and the io_uring binary share it and replace only the data path.
//!
//! - [`xds`]: the local configuration file (ztunnel's `LOCAL_XDS_PATH` YAML: workloads, services,
//!   policies), parsed forgivingly with errors naming the field and line.
//! - [`state`]: an immutable snapshot of workloads, services and policies with the lookups routing
//!   needs, as pure functions.
//! - [`rbac`]: Istio L4 authorization policies and their evaluation, as pure functions.
//! - [`socks5`]: the SOCKS5 handshake of the outbound SOCKS listener (CONNECT, no authentication).

pub mod rbac;
pub mod socks5;
pub mod state;
pub mod xds;
