//! Whole-proxy integration tests for meshwire: they start the real proxy binaries as processes, with
//! real sockets, a real local CA and real mTLS, and check what a user of the proxy would see.
//!
//! This library is the harness the tests in `tests/tests/` share:
//! - [`binary`]: where the proxy binaries are and which ones a scenario runs against;
//! - [`mesh`]: a mesh on loopback: a shared state directory (one local CA), a live local
//!   configuration file, and proxy processes with free ports;
//! - [`pair`]: the usual scenario, a client and a server workload each with its proxy;
//! - [`net`]: blocking clients and servers (echo, SOCKS5, HTTP/1.1) and checksums;
//! - [`netns`]: network namespaces joined by veth pairs, for capture and multi-host scenarios;
//! - [`hbone`]: an HBONE client with certificates from the mesh's CA, to talk to a proxy's inbound
//!   listener directly as any identity and from any loopback address.
//!
//! The binaries are found in the target directory next to the test executables (`cargo test
//! --workspace` builds them); `MESHWIRE_BIN_DIR` overrides the directory.

pub mod binary;
pub mod hbone;
pub mod mesh;
pub mod net;
pub mod netns;
pub mod pair;
