//! The data path: the proxies that carry workload traffic.
//!
//! - [`inbound`]: the HBONE server side, which authorizes each CONNECT and splices it to the local
//!   destination workload.
//! - [`outbound`]: the client side, which captures workload connections and tunnels them.

pub mod inbound;
pub mod outbound;
