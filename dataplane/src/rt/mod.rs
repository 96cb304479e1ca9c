//! The runtime seam of the dataplane: sockets made in one place, and the tokio implementations of
//! the executor, timer and connector traits that `meshwire-hbone` and `meshwire-identity` are
//! generic over.
//!
//! - [`socket`] (runtime-independent): [`socket::SocketOptions`], the [`socket::SocketFactory`]
//!   trait and its [`socket::DefaultSocketFactory`], and [`socket::original_destination`]
//!   (`SO_ORIGINAL_DST`).
//! - [`tokio`]: [`tokio::TokioTimer`], [`tokio::TokioExecutor`], the conversion of the factory's
//!   sockets into tokio listeners and streams, and [`tokio::TokioConnector`] for the HBONE pool.
//!
//! The io_uring build supplies its own counterpart of [`tokio`] and shares [`socket`].

pub mod socket;
pub mod tokio;
