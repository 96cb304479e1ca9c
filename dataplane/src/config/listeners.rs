//! The listeners: the address every one binds and which ones are on.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::error::{Error, Origin};
use super::options::Key::{Env, ProxyConfig};
use super::options::{Found, H_LISTEN, Inputs, Kind, Opt, parse_found};
use super::values::{at_least_one, non_empty, parse_bool, parse_ip, parse_port, positive_duration};

/// One of the proxy's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Listener {
    /// Inbound HBONE (15008).
    Inbound,
    /// Inbound plaintext capture (15006).
    InboundPlaintext,
    /// Outbound capture (15001).
    Outbound,
    /// Outbound SOCKS5 (15080, loopback).
    Socks5,
    /// DNS proxy (15053, loopback).
    Dns,
    /// Readiness probe (15021).
    Readiness,
    /// Admin API (15000, loopback).
    Admin,
    /// Prometheus metrics (15020).
    Metrics,
}

impl Listener {
    /// Every listener.
    pub const ALL: [Listener; 8] = [
        Listener::Inbound,
        Listener::InboundPlaintext,
        Listener::Outbound,
        Listener::Socks5,
        Listener::Dns,
        Listener::Readiness,
        Listener::Admin,
        Listener::Metrics,
    ];

    /// The flag that sets its port (`--inbound-port`).
    pub fn port_flag(self) -> &'static str {
        self.port_opt().flag
    }

    /// ztunnel's port for it, the default.
    pub fn default_port(self) -> u16 {
        match self {
            Listener::Inbound => 15008,
            Listener::InboundPlaintext => 15006,
            Listener::Outbound => 15001,
            Listener::Socks5 => 15080,
            Listener::Dns => 15053,
            Listener::Readiness => 15021,
            Listener::Admin => 15000,
            Listener::Metrics => 15020,
        }
    }

    pub(super) fn port_opt(self) -> &'static Opt {
        match self {
            Listener::Inbound => &INBOUND_PORT,
            Listener::InboundPlaintext => &INBOUND_PLAINTEXT_PORT,
            Listener::Outbound => &OUTBOUND_PORT,
            Listener::Socks5 => &SOCKS5_PORT,
            Listener::Dns => &DNS_PORT,
            Listener::Readiness => &READINESS_PORT,
            Listener::Admin => &ADMIN_PORT,
            Listener::Metrics => &METRICS_PORT,
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Listener::Inbound => "inbound HBONE",
            Listener::InboundPlaintext => "inbound plaintext",
            Listener::Outbound => "outbound",
            Listener::Socks5 => "SOCKS5",
            Listener::Dns => "DNS",
            Listener::Readiness => "readiness",
            Listener::Admin => "admin",
            Listener::Metrics => "metrics",
        })
    }
}

/// The address of every listener. The SOCKS5 and DNS listeners can be turned off.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listeners {
    /// Inbound HBONE, `[::]:15008`.
    pub inbound: SocketAddr,
    /// Inbound plaintext capture, `[::]:15006`.
    pub inbound_plaintext: SocketAddr,
    /// Outbound capture, `[::]:15001`.
    pub outbound: SocketAddr,
    /// Outbound SOCKS5, `127.0.0.1:15080`; `None` when turned off.
    pub socks5: Option<SocketAddr>,
    /// DNS proxy, `127.0.0.1:15053`; `None` when turned off.
    pub dns: Option<SocketAddr>,
    /// Readiness probe, `[::]:15021`.
    pub readiness: SocketAddr,
    /// Admin API, `127.0.0.1:15000`.
    pub admin: SocketAddr,
    /// Prometheus metrics, `[::]:15020`.
    pub metrics: SocketAddr,
    /// Whether the proxy listens on IPv6 too (`IPV6_ENABLED`): in in-pod mode, the pods' listeners
    /// are bound on `[::]` (both families) rather than `0.0.0.0`.
    pub ipv6: bool,
}

impl Listeners {
    /// The address of `listener`; `None` when it is turned off.
    pub fn get(&self, listener: Listener) -> Option<SocketAddr> {
        match listener {
            Listener::Inbound => Some(self.inbound),
            Listener::InboundPlaintext => Some(self.inbound_plaintext),
            Listener::Outbound => Some(self.outbound),
            Listener::Socks5 => self.socks5,
            Listener::Dns => self.dns,
            Listener::Readiness => Some(self.readiness),
            Listener::Admin => Some(self.admin),
            Listener::Metrics => Some(self.metrics),
        }
    }

    /// The listeners that are on, with their addresses, in [`Listener::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Listener, SocketAddr)> + '_ {
        Listener::ALL.into_iter().filter_map(|l| self.get(l).map(|a| (l, a)))
    }

    /// The data listeners (inbound HBONE, inbound plaintext, outbound capture, SOCKS5 if on), in the
    /// order the binaries bind them: the one list both binaries serve.
    pub fn data(&self) -> Vec<(Listener, SocketAddr)> {
        let mut data = vec![
            (Listener::Inbound, self.inbound),
            (Listener::InboundPlaintext, self.inbound_plaintext),
            (Listener::Outbound, self.outbound),
        ];
        data.extend(self.socks5.map(|addr| (Listener::Socks5, addr)));
        data
    }

    /// The ports of the listeners that are on.
    pub fn ports(&self) -> Vec<u16> {
        self.iter().map(|(_, a)| a.port()).collect()
    }

    /// Checks that every port is non-zero and that no two listeners share one; `port_origin` names
    /// where a listener's port came from.
    pub(super) fn check_ports(&self, port_origin: &dyn Fn(Listener) -> Origin) -> Result<(), Error> {
        let mut seen: Vec<(u16, Listener)> = Vec::new();
        for (listener, addr) in self.iter() {
            if addr.port() == 0 {
                return Err(Error::Invalid {
                    origin: port_origin(listener),
                    value: "0".to_owned(),
                    reason: "ports must be between 1 and 65535".to_owned(),
                });
            }
            if let Some(&(_, first)) = seen.iter().find(|(p, _)| *p == addr.port()) {
                return Err(Error::DuplicatePort {
                    port: addr.port(),
                    first: port_origin(first),
                    second: port_origin(listener),
                });
            }
            seen.push((addr.port(), listener));
        }
        Ok(())
    }
}

pub(super) const BIND_ADDRESS: Opt = Opt {
    flag: "--bind-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_BIND_ADDRESS")],
    help: "Address of the inbound, outbound, readiness and metrics listeners",
    default_note: Some("::, 0.0.0.0 if --ipv6 false"),
    ..Opt::new(H_LISTEN)
};
pub(super) const IPV6: Opt = Opt {
    flag: "--ipv6",
    value_name: "BOOL",
    keys: &[Env("IPV6_ENABLED")],
    default: Some("true"),
    kind: Kind::Bool,
    help: "Listen on IPv6 as well as IPv4 (the default --bind-address is :: rather than 0.0.0.0)",
    ..Opt::new(H_LISTEN)
};
pub(super) const INBOUND_PORT: Opt = Opt {
    flag: "--inbound-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_INBOUND_PORT")],
    default: Some("15008"),
    help: "Port of the inbound HBONE listener",
    ..Opt::new(H_LISTEN)
};
pub(super) const INBOUND_PLAINTEXT_PORT: Opt = Opt {
    flag: "--inbound-plaintext-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_INBOUND_PLAINTEXT_PORT")],
    default: Some("15006"),
    help: "Port of the inbound plaintext capture listener",
    ..Opt::new(H_LISTEN)
};
pub(super) const OUTBOUND_PORT: Opt = Opt {
    flag: "--outbound-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_OUTBOUND_PORT")],
    default: Some("15001"),
    help: "Port of the outbound capture listener",
    ..Opt::new(H_LISTEN)
};
pub(super) const SOCKS5: Opt = Opt {
    flag: "--socks5",
    value_name: "BOOL",
    keys: &[Env("UNSTABLE_ENABLE_SOCKS5")],
    default: Some("false"),
    kind: Kind::Bool,
    help: "Run the outbound SOCKS5 listener (off by default, as in ztunnel)",
    ..Opt::new(H_LISTEN)
};
pub(super) const SOCKS5_PORT: Opt = Opt {
    flag: "--socks5-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_SOCKS5_PORT")],
    default: Some("15080"),
    help: "Port of the SOCKS5 listener",
    ..Opt::new(H_LISTEN)
};
pub(super) const SOCKS5_ADDRESS: Opt = Opt {
    flag: "--socks5-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_SOCKS5_ADDRESS")],
    default: Some("127.0.0.1"),
    help: "Address of the SOCKS5 listener (it has no authentication: keep it on loopback)",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_PROXY: Opt = Opt {
    flag: "--dns-proxy",
    value_name: "BOOL",
    keys: &[Env("ISTIO_META_DNS_CAPTURE"), ProxyConfig("proxyMetadata.DNS_CAPTURE")],
    default: Some("true"),
    kind: Kind::Bool,
    help: "Run the DNS proxy",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_PORT: Opt = Opt {
    flag: "--dns-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_DNS_PORT")],
    default: Some("15053"),
    help: "Port of the DNS proxy (ISTIO_META_DNS_PROXY_ADDR sets address and port together)",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_ADDRESS: Opt = Opt {
    flag: "--dns-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_DNS_ADDRESS")],
    default: Some("127.0.0.1"),
    help: "Address of the DNS proxy",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_RESOLV_CONF: Opt = Opt {
    flag: "--dns-resolv-conf",
    value_name: "PATH",
    keys: &[Env("MESHWIRE_DNS_RESOLV_CONF")],
    default: Some("/etc/resolv.conf"),
    help: "The resolv.conf naming the upstream resolvers the DNS proxy forwards to (and a dedicated proxy's \
           search domains); a nameserver may be IP:PORT",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_UPSTREAM_TIMEOUT: Opt = Opt {
    flag: "--dns-upstream-timeout",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_DNS_UPSTREAM_TIMEOUT")],
    default: Some("2s"),
    help: "How long the DNS proxy waits for an upstream resolver before it asks the next",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_FORWARD_LIMIT: Opt = Opt {
    flag: "--dns-forward-limit",
    value_name: "N",
    keys: &[Env("MESHWIRE_DNS_FORWARD_LIMIT")],
    default: Some("1024"),
    help: "UDP queries the DNS proxy forwards at once (per core); past it a query gets SERVFAIL",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_TCP_CONNECTIONS: Opt = Opt {
    flag: "--dns-tcp-connections",
    value_name: "N",
    keys: &[Env("MESHWIRE_DNS_TCP_CONNECTIONS")],
    default: Some("256"),
    help: "TCP connections the DNS proxy serves at once (per core); past it they wait to be accepted",
    ..Opt::new(H_LISTEN)
};
pub(super) const DNS_PREFERRED_NAMESPACE: Opt = Opt {
    flag: "--dns-preferred-namespace",
    value_name: "NAMESPACE",
    keys: &[Env("PREFERED_SERVICE_NAMESPACE")],
    help: "The namespace whose service the DNS proxy answers with when several define a hostname and none is \
           the client's",
    ..Opt::new(H_LISTEN)
};
pub(super) const READINESS_PORT: Opt = Opt {
    flag: "--readiness-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_READINESS_PORT")],
    default: Some("15021"),
    help: "Port of the readiness probe (/healthz/ready)",
    ..Opt::new(H_LISTEN)
};
pub(super) const ADMIN_PORT: Opt = Opt {
    flag: "--admin-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_ADMIN_PORT"), ProxyConfig("proxyAdminPort")],
    default: Some("15000"),
    help: "Port of the admin API",
    ..Opt::new(H_LISTEN)
};
pub(super) const ADMIN_ADDRESS: Opt = Opt {
    flag: "--admin-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_ADMIN_ADDRESS")],
    default: Some("127.0.0.1"),
    help: "Address of the admin API (it has no authentication: keep it on loopback)",
    ..Opt::new(H_LISTEN)
};
pub(super) const METRICS_PORT: Opt = Opt {
    flag: "--metrics-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_METRICS_PORT"), ProxyConfig("statsPort")],
    default: Some("15020"),
    help: "Port of the Prometheus metrics listener",
    ..Opt::new(H_LISTEN)
};

/// The DNS proxy's settings besides its address ([`Listeners::dns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DnsOptions {
    /// The `resolv.conf` of the upstream resolvers (`/etc/resolv.conf`).
    pub resolv_conf: PathBuf,
    /// How long an upstream is given before the next is asked (2 s).
    pub upstream_timeout: Duration,
    /// UDP queries forwarded at once, per core (1024).
    pub forward_limit: usize,
    /// TCP connections served at once, per core (256).
    pub tcp_connections: usize,
    /// ztunnel's `PREFERED_SERVICE_NAMESPACE`.
    pub preferred_namespace: Option<String>,
}

impl Inputs<'_> {
    pub(super) fn dns_options(&self) -> Result<DnsOptions, Error> {
        Ok(DnsOptions {
            resolv_conf: PathBuf::from(self.required(&DNS_RESOLV_CONF, non_empty)?.value),
            upstream_timeout: self.required(&DNS_UPSTREAM_TIMEOUT, positive_duration)?.value,
            forward_limit: self.required(&DNS_FORWARD_LIMIT, at_least_one)?.value,
            tcp_connections: self.required(&DNS_TCP_CONNECTIONS, at_least_one)?.value,
            preferred_namespace: self.get(&DNS_PREFERRED_NAMESPACE, non_empty)?.map(|f| f.value),
        })
    }

    pub(super) fn listeners(&self) -> Result<(Listeners, Vec<(Listener, Origin)>), Error> {
        let ipv6 = self.required(&IPV6, parse_bool)?.value;
        let wildcard = if ipv6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let bind = self.get(&BIND_ADDRESS, parse_ip)?.map_or(wildcard, |f| f.value);
        let mut origins = Vec::new();
        let mut port = |listener: Listener| -> Result<u16, Error> {
            let found = self.required(listener.port_opt(), parse_port)?;
            origins.push((listener, found.origin));
            Ok(found.value)
        };
        let inbound = SocketAddr::new(bind, port(Listener::Inbound)?);
        let inbound_plaintext = SocketAddr::new(bind, port(Listener::InboundPlaintext)?);
        let outbound = SocketAddr::new(bind, port(Listener::Outbound)?);
        let readiness = SocketAddr::new(bind, port(Listener::Readiness)?);
        let metrics = SocketAddr::new(bind, port(Listener::Metrics)?);
        let admin = SocketAddr::new(self.required(&ADMIN_ADDRESS, parse_ip)?.value, port(Listener::Admin)?);
        let socks5 = if self.required(&SOCKS5, parse_bool)?.value {
            Some(SocketAddr::new(
                self.required(&SOCKS5_ADDRESS, parse_ip)?.value,
                port(Listener::Socks5)?,
            ))
        } else {
            None
        };
        let dns = if self.required(&DNS_PROXY, parse_bool)?.value {
            match self.dns_proxy_addr()? {
                Some(found) if self.given(&DNS_ADDRESS).is_none() && self.given(&DNS_PORT).is_none() => {
                    origins.push((Listener::Dns, found.origin));
                    Some(found.value)
                }
                _ => Some(SocketAddr::new(
                    self.required(&DNS_ADDRESS, parse_ip)?.value,
                    port(Listener::Dns)?,
                )),
            }
        } else {
            None
        };
        let listeners = Listeners {
            inbound,
            inbound_plaintext,
            outbound,
            socks5,
            dns,
            readiness,
            admin,
            metrics,
            ipv6,
        };
        Ok((listeners, origins))
    }

    /// ztunnel's `DNS_PROXY_ADDR` proxy metadata: `localhost:PORT` or `IP:PORT`.
    fn dns_proxy_addr(&self) -> Result<Option<Found<SocketAddr>>, Error> {
        let raw = self
            .env("ISTIO_META_DNS_PROXY_ADDR")
            .map(|v| (v, Origin::Env("ISTIO_META_DNS_PROXY_ADDR")))
            .or_else(|| self.proxy_config("proxyMetadata.DNS_PROXY_ADDR"));
        raw.map(|(raw, origin)| {
            parse_found(raw, origin, |s| {
                let s = s.trim();
                let addr = match s.strip_prefix("localhost:") {
                    Some(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), parse_port(port)?),
                    None => s
                        .parse::<SocketAddr>()
                        .map_err(|_| "expected localhost:PORT or IP:PORT".to_owned())?,
                };
                if addr.port() == 0 {
                    return Err("ports must be between 1 and 65535".to_owned());
                }
                Ok(addr)
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_defaults_are_ztunnels() {
        for listener in Listener::ALL {
            assert_eq!(
                listener.port_opt().default,
                Some(listener.default_port().to_string().as_str())
            );
        }
    }
}
