//! The upstream resolvers and search domains of a `resolv.conf(5)` file.
//!
//! Only `nameserver`, `search` and `domain` are read; everything else (`options`, `sortlist`) is
//! ignored, as are comments (`#`, `;`). A nameserver is an IP, with meshwire's extension `IP:PORT`
//! or `[IPv6]:PORT` for an upstream on another port than 53 (tests, local resolvers). As in glibc,
//! the last `search` or `domain` line wins, and a file naming no nameserver means `127.0.0.1:53`.
//!
//! ```
//! use meshwire_dataplane::dns::resolv_conf::ResolvConf;
//!
//! let conf = ResolvConf::parse("nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\n")?;
//! assert_eq!(conf.nameservers, ["10.96.0.10:53".parse()?]);
//! assert_eq!(conf.search, ["default.svc.cluster.local", "svc.cluster.local"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

/// The port of a nameserver named without one.
pub const DNS_PORT: u16 = 53;

/// What a `resolv.conf` says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolvConf {
    /// The upstream resolvers, in order (`127.0.0.1:53` when the file names none).
    pub nameservers: Vec<SocketAddr>,
    /// The search domains, without trailing dots, lower case.
    pub search: Vec<String>,
}

/// Why a `resolv.conf` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolvConfError {
    /// The file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A `nameserver` line names no address.
    #[error("line {line}: {value:?} is not an IP address (nor IP:PORT)")]
    Nameserver {
        /// The line number, from 1.
        line: usize,
        /// The value.
        value: String,
    },
}

impl ResolvConf {
    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<ResolvConf, ResolvConfError> {
        let text = std::fs::read_to_string(path).map_err(|e| ResolvConfError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|e| match e {
            ResolvConfError::Nameserver { line, value } => ResolvConfError::Read {
                path: path.display().to_string(),
                reason: format!("line {line}: {value:?} is not an IP address (nor IP:PORT)"),
            },
            other => other,
        })
    }

    /// Parses the text of a `resolv.conf`.
    pub fn parse(text: &str) -> Result<ResolvConf, ResolvConfError> {
        let mut nameservers = Vec::new();
        let mut search = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    let value = words.next().unwrap_or_default();
                    let addr = parse_nameserver(value).ok_or_else(|| ResolvConfError::Nameserver {
                        line: index + 1,
                        value: value.to_owned(),
                    })?;
                    nameservers.push(addr);
                }
                Some("search" | "domain") => {
                    search = words
                        .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                        .filter(|d| !d.is_empty())
                        .collect();
                }
                _ => {}
            }
        }
        if nameservers.is_empty() {
            nameservers.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT));
        }
        Ok(ResolvConf { nameservers, search })
    }
}

/// `IP`, `IP%scope` (the scope dropped), `IPv4:PORT` or `[IPv6]:PORT`.
fn parse_nameserver(value: &str) -> Option<SocketAddr> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Some(addr);
    }
    let ip = value.split('%').next().unwrap_or(value);
    ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, DNS_PORT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_search_and_ports() -> Result<(), ResolvConfError> {
        let conf = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nnameserver 127.0.0.1:5353\n\
             nameserver [::1]:5300\noptions ndots:5\ndomain first.example\nsearch A.example. b.example ; x\n",
        )?;
        let expected: Vec<SocketAddr> = ["10.0.0.1:53", "[fe80::1]:53", "127.0.0.1:5353", "[::1]:5300"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        assert_eq!(conf.nameservers, expected);
        assert_eq!(conf.search, ["a.example", "b.example"]);
        Ok(())
    }

    #[test]
    fn no_nameserver_means_localhost_and_bad_ones_are_named() {
        assert_eq!(
            ResolvConf::parse("search x\n").map(|c| c.nameservers),
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], 53))])
        );
        assert_eq!(
            ResolvConf::parse("nameserver\nnameserver dns.example\n"),
            Err(ResolvConfError::Nameserver {
                line: 1,
                value: String::new()
            })
        );
        assert!(matches!(
            ResolvConf::read(Path::new("/nonexistent/resolv.conf")),
            Err(ResolvConfError::Read { .. })
        ));
    }
}
