//! The DNS proxy (port 15053, UDP and TCP): the names of the mesh answered here, everything else
//! forwarded unchanged to the node's upstream resolvers.
//!
//! - [`resolve`]: the decision, a pure function of a packet, the client and the routing
//!   [`State`](crate::state::State): a local answer (A/AAAA of services and workloads, with
//!   ztunnel's short names and search domains), a forward, or an error.
//! - [`wire`]: byte-level helpers for packets that pass unchanged: the question section, cutting a
//!   UDP answer to the client's size with `TC`, `SERVFAIL` and `FORMERR` answers.
//! - [`resolv_conf`]: the upstream resolvers and search domains of a `resolv.conf`.
//! - [`server`]: the server, written once over the runtime seam
//!   ([`Datagram`](crate::rt::datagram::Datagram)): [`server::serve`] serves a UDP socket and a TCP
//!   listener for a set of [`server::Clients`] with a shared [`server::DnsContext`].
//!
//! Both binaries serve it on [`Listeners::dns`](crate::config::Listeners::dns) when it is on
//! (`--dns-proxy`, ztunnel's `ISTIO_META_DNS_CAPTURE` / `proxyMetadata.DNS_CAPTURE`, on by
//! default), with [`context`] built from the [`Config`]; its metrics are
//! [`DnsMetrics`].

use std::sync::Arc;

use crate::config::{Config, ProxyMode};
use crate::rt::socket::SocketOptions;
use crate::telemetry::metrics::DnsMetrics;
use crate::watch::Published;

pub mod resolv_conf;
pub mod resolve;
pub mod server;
pub mod wire;

pub use resolv_conf::{ResolvConf, ResolvConfError};
pub use resolve::{Client, Decision, NameIndex, Outcome, QueryError, ResolverConfig, SearchDomains, Transport, decide};
pub use server::{Clients, DnsContext, DnsLimits, ForwardError, serve};

/// The DNS context of `config`: its upstream resolvers and (in dedicated mode) search domains read
/// from [`DnsOptions::resolv_conf`](crate::config::DnsOptions::resolv_conf), the cluster domain,
/// IPv6, the limits, and upstream sockets with `upstream` options (the packet mark).
pub fn context(
    config: &Config,
    published: Published,
    metrics: Arc<DnsMetrics>,
    upstream: SocketOptions,
) -> Result<DnsContext, ResolvConfError> {
    let conf = ResolvConf::read(&config.dns.resolv_conf)?;
    let mut resolver = ResolverConfig::new(&config.cluster_domain);
    resolver.ipv6 = config.listeners.inbound.is_ipv6();
    resolver.preferred_namespace = config.dns.preferred_namespace.clone();
    if matches!(config.mode, ProxyMode::Dedicated { .. }) {
        resolver.search = SearchDomains::Static(conf.search.clone());
    }
    let limits = DnsLimits {
        forwards: config.dns.forward_limit,
        tcp_connections: config.dns.tcp_connections,
        upstream_timeout: config.dns.upstream_timeout,
        ..DnsLimits::default()
    };
    Ok(DnsContext::new(
        resolver,
        conf.nameservers,
        published,
        metrics,
        limits,
        upstream,
    ))
}

/// Whose queries the node's DNS listener answers under `config`: the dedicated workload's, or (shared
/// mode) the workload with the query's source address.
pub fn clients(config: &Config) -> Clients {
    match &config.mode {
        ProxyMode::Dedicated { workload } => Clients::Workload {
            namespace: workload.namespace.clone(),
            name: workload.name.clone(),
            network: config.network.clone(),
        },
        ProxyMode::Shared { .. } => Clients::BySource {
            network: config.network.clone(),
        },
    }
}
