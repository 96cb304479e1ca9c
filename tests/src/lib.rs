//! Whole-proxy integration tests for meshwire: they start the real proxy binaries as processes, with
//! real sockets, a real local CA and real mTLS, and check what a user of the proxy would see.
//!
//! This library is the harness the tests in `tests/tests/` share:
//! - [`binary`]: where the proxy binaries are and which ones a scenario runs against;
//! - [`mesh`]: a mesh on loopback: a shared state directory (one local CA), a live local
//!   configuration file, and proxy processes with free ports;
//! - [`pair`]: the usual scenario, a client and a server workload each with its proxy;
//! - [`policy`]: the scenario of the authorization tests, one workload under its namespace's policies;
//! - [`net`]: blocking servers (echo, whoami), the SOCKS5 client, raw exchanges and checksums;
//! - [`netns`]: network namespaces joined by veth pairs, for capture and multi-host scenarios;
//! - [`inpod`]: in-pod mode without Kubernetes: pods (namespaces with istio-cni's rules) on a
//!   bridge, node proxies in in-pod mode, istio-cni's messages for the testkit's fake istio-cni;
//! - [`fixtures`]: the routing mesh, authorization value pools and SOCKS5 requests that the
//!   dataplane's own tests and the fuzz targets share;
//! - [`gateway`]: an east-west gateway (the outer tunnel of double HBONE) for multi-network scenarios;
//! - [`hbone`]: an HBONE client with certificates from the mesh's CA, to talk to a proxy's inbound
//!   listener directly as any identity and from any loopback address.
//! - [`seam`]: the per-connection proxy logic on any runtime: one scenario both builds run.
//!
//! The binaries are found in the target directory next to the test executables (`cargo test
//! --workspace` builds them); `MESHWIRE_BIN_DIR` overrides the directory.

pub mod binary;
pub mod fixtures;
pub mod gateway;
pub mod hbone;
pub mod inpod;
pub mod istio;
pub mod mesh;
pub mod net;
pub mod netns;
pub mod pair;
pub mod policy;
pub mod seam;
