//! HBONE tunnels: HTTP/2 CONNECT over SPIFFE mutual TLS, as Istio ambient's ztunnel speaks them.
//!
//! `meshwire-hbone` is a library for any proxy. It depends on no async runtime: it is generic over
//! the `tokio::io` traits (glommio streams fit through `tokio_util::compat`), never spawns, puts no
//! `Send` bound on its types, and returns futures for the caller to drive. Time reaches it through
//! [`rt::Timer`], spawning (where a caller wants connections driven on their own tasks) through
//! [`rt::Executor`].
//!
//! - [`client`]: mTLS + HTTP/2 handshake to a peer's port 15008, then CONNECT streams ([`Tunnel`]s).
//! - [`server`]: serves one accepted TCP connection: mTLS, HTTP/2, and for each CONNECT stream a
//!   [`server::Handler`] decision, then a bidirectional copy.
//! - [`pool`]: tunnels shared by key (identities, destination, source IP), one handshake per key at a
//!   time, at most N streams per connection, idle connections released.
//! - [`double`]: double HBONE, an inner mTLS + HTTP/2 CONNECT to the final workload inside an outer
//!   tunnel to an east-west gateway.
//! - [`headers`]: the CONNECT authority and metadata headers (`forwarded`, `baggage`, `traceparent`).
//! - [`budget`]: budgets of bytes held for peers that do not read (per connection, per process).
//! - [`settings`]: HTTP/2 windows, frame size, stream and header limits, timeouts (ztunnel's values by default).

pub mod budget;
pub mod client;
pub mod copy;
pub mod double;
pub mod headers;
pub mod pool;
mod readahead;
pub mod rt;
pub mod server;
pub mod settings;
mod stream;

pub use client::{ConnectError, Tunnel};

/// The repository's README, whose Rust example (opening a tunnel, in the meshwire-hbone section)
/// runs as a doc test, so that the README and the API cannot drift apart.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
pub use settings::Settings;
