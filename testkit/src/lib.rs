//! The fixtures meshwire's tests, fuzz targets and benchmarks share, written once:
//! - [`pki`]: certificates from a real local CA and the TLS configs built on them;
//! - [`net`]: tokio loopback servers (TCP echo, an HBONE server splicing to loopback sockets);
//! - [`data`]: deterministic test data and checksums;
//! - [`http`]: an HTTP/1.1 client for the proxies' control endpoints, async and blocking;
//! - [`socks5`]: a SOCKS5 client over any stream (and over a blocking socket);
//! - [`measure`]: the benchmarks' harness: CPU time from `/proc`, summaries, the JSON file;
//! - [`h2`]: HTTP/2 frames and HPACK written and read by hand, to talk to a server below h2;
//! - [`istiod`]: a fake istiod (delta ADS and CA over real TLS), scripted by the test;
//! - [`cni`]: a fake istio-cni (the in-pod protocol over a real `SOCK_SEQPACKET` socket), scripted by
//!   the test;
//! - [`upstream`]: the far side of a tunnel: a byte-counting reader, a handler that never reads;
//! - `glommio` (feature `glommio`): the same servers on a glommio executor, and helpers that run
//!   futures on executor threads.
//!
//! Fixtures fail loudly: a bind or a certificate that cannot be made panics with what failed,
//! which fails the test that asked for it.
#![allow(clippy::unwrap_used)]

pub mod cni;
pub mod data;
pub mod dns;
#[cfg(feature = "glommio")]
pub mod glommio;
pub mod h2;
pub mod http;
pub mod istiod;
pub mod measure;
pub mod net;
pub mod pki;
pub mod socks5;
pub mod upstream;
