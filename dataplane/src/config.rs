//! The proxy's own configuration: one validated, immutable [`Config`] read from command-line flags and
//! environment variables, shared as `Arc<Config>` by everything that runs.
//!
//! Every flag can also be set through an environment variable. Where ztunnel reads a variable for the
//! same setting, meshwire reads that variable with the same name, values and default, so a ztunnel
//! Deployment or DaemonSet keeps working; settings ztunnel cannot change (every port, the certificate
//! files, the state directory) get a `MESHWIRE_` variable. A flag wins over its variables; of several
//! variables the first one listed wins; an empty variable counts as unset (as Kubernetes sets optional
//! fields). `--help` lists each flag with its variables and default.
//!
//! Reading the configuration is pure: [`Config::from_args_and_env`] takes the argument vector and a
//! function that looks up variables, so tests inject both and never touch the process environment, and
//! it never touches the filesystem ([`Config::check_files`] does, separately). Errors name the flag or
//! variable the bad value came from, and the value.
//!
//! ```
//! use std::collections::HashMap;
//! use meshwire_dataplane::config::{Config, Listener, ProxyMode};
//!
//! let env = HashMap::from([
//!     ("PROXY_MODE", "dedicated"),
//!     ("PROXY_WORKLOAD_INFO", "default/client-7d9f/client"),
//!     ("MESHWIRE_ADMIN_PORT", "16000"),
//! ]);
//! let config = Config::from_args_and_env(
//!     ["ztunnel", "--config", "local.yaml", "--admin-port", "17000", "--drain-deadline", "500ms"],
//!     &|name| env.get(name).map(|v| v.to_string()),
//! )?;
//! let ProxyMode::Dedicated { workload } = &config.mode else { panic!("dedicated") };
//! assert_eq!(workload.service_account, "client");
//! assert_eq!(config.listeners.admin.to_string(), "127.0.0.1:17000"); // the flag beats the variable
//! assert_eq!(config.listeners.get(Listener::Inbound).map(|a| a.port()), Some(15008));
//! assert_eq!(config.drain_deadline.as_millis(), 500);
//!
//! let err = Config::from_args_and_env(["ztunnel", "--inbound-port", "15001"], &|_| None).unwrap_err();
//! assert!(err.to_string().contains("port 15001 is used by both"), "{err}");
//! # Ok::<(), meshwire_dataplane::config::Error>(())
//! ```
//!
//! # Flags and variables
//!
//! | flag | variables (first wins) | default |
//! |---|---|---|
//! | `--config FILE` | `LOCAL_XDS_PATH`; `LOCAL_XDS` holds the YAML inline | none |
//! | `--mode shared\|dedicated` | `PROXY_MODE` | `shared` (`dedicated` if a workload is given) |
//! | `--workload NS/NAME/SA` | `PROXY_WORKLOAD_INFO` | none; required in dedicated mode |
//! | `--node-name` | `NODE_NAME` | none (serve every node) |
//! | `--instance-ip` | `INSTANCE_IP` | none |
//! | `--cluster-id` | `ISTIO_META_CLUSTER_ID`, `CLUSTER_ID` | `Kubernetes` |
//! | `--cluster-domain` | `CLUSTER_DOMAIN` | `cluster.local` |
//! | `--trust-domain` | `TRUST_DOMAIN` | `cluster.local` |
//! | `--network` | `NETWORK` | the default network (`""`) |
//! | `--state-dir` | `MESHWIRE_STATE_DIR`, `STATE_DIRECTORY` (systemd) | `.meshwire` |
//! | `--cert-chain` | `MESHWIRE_CERT_CHAIN` | none: the local CA |
//! | `--cert-key` | `MESHWIRE_CERT_KEY` | none |
//! | `--trust-bundle` | `MESHWIRE_TRUST_BUNDLE` | none |
//! | `--cert-ttl` | `SECRET_TTL` | `24h` |
//! | `--bind-address` | `MESHWIRE_BIND_ADDRESS` | `::`, or `0.0.0.0` if `IPV6_ENABLED=false` |
//! | `--ipv6` | `IPV6_ENABLED` | `true` |
//! | `--inbound-port` (HBONE) | `MESHWIRE_INBOUND_PORT` | 15008 |
//! | `--inbound-plaintext-port` | `MESHWIRE_INBOUND_PLAINTEXT_PORT` | 15006 |
//! | `--outbound-port` | `MESHWIRE_OUTBOUND_PORT` | 15001 |
//! | `--socks5 BOOL` | `UNSTABLE_ENABLE_SOCKS5` | `true` |
//! | `--socks5-port` | `MESHWIRE_SOCKS5_PORT` | 15080 |
//! | `--socks5-address` | `MESHWIRE_SOCKS5_ADDRESS` | 127.0.0.1 |
//! | `--dns-proxy BOOL` | `ISTIO_META_DNS_CAPTURE`, `PROXY_CONFIG` `proxyMetadata.DNS_CAPTURE` | `true` |
//! | `--dns-port` | `MESHWIRE_DNS_PORT`; `ISTIO_META_DNS_PROXY_ADDR` | 15053 |
//! | `--dns-address` | `MESHWIRE_DNS_ADDRESS`; `ISTIO_META_DNS_PROXY_ADDR` | 127.0.0.1 |
//! | `--readiness-port` | `MESHWIRE_READINESS_PORT` | 15021 |
//! | `--admin-port` | `MESHWIRE_ADMIN_PORT`, `PROXY_CONFIG` `proxyAdminPort` | 15000 |
//! | `--admin-address` | `MESHWIRE_ADMIN_ADDRESS` | 127.0.0.1 |
//! | `--metrics-port` | `MESHWIRE_METRICS_PORT`, `PROXY_CONFIG` `statsPort` | 15020 |
//! | `--http2-stream-window` | `HTTP2_STREAM_WINDOW_SIZE` | 4194304 |
//! | `--http2-connection-window` | `HTTP2_CONNECTION_WINDOW_SIZE` | 16777216 |
//! | `--http2-frame-size` | `HTTP2_FRAME_SIZE` | 1048576 |
//! | `--hbone-stream-send-buffer` | `MESHWIRE_HBONE_STREAM_SEND_BUFFER` | 409600 |
//! | `--hbone-connection-buffer` | `MESHWIRE_HBONE_CONNECTION_BUFFER` | 67108864 |
//! | `--hbone-buffer-budget` | `MESHWIRE_HBONE_BUFFER_BUDGET` | 1073741824 |
//! | `--hbone-receive-budget` | `MESHWIRE_HBONE_RECEIVE_BUDGET` | 1073741824 |
//! | `--pool-max-streams-per-connection` | `POOL_MAX_STREAMS_PER_CONNECTION` | 100 |
//! | `--pool-unused-release-timeout` | `POOL_UNUSED_RELEASE_TIMEOUT` | `5m` |
//! | `--pool-response-timeout` | `MESHWIRE_POOL_RESPONSE_TIMEOUT` | `3s` |
//! | `--pool-probe-timeout` | `MESHWIRE_POOL_PROBE_TIMEOUT` | `2s` |
//! | `--worker-threads N\|N%` | `ZTUNNEL_WORKER_THREADS`, `PROXY_CONFIG` `concurrency` | 2 (`ztunnel-uring`: one per CPU) |
//! | `--drain-deadline` | `CONNECTION_TERMINATION_DEADLINE`; from `TERMINATION_GRACE_PERIOD_SECONDS` | `5s` |
//! | `--handover DURATION` | `MESHWIRE_HANDOVER` | none: the ports must be free |
//! | `--log-format text\|json` | `LOG_FORMAT` | `text` |
//! | `--log-level` | `RUST_LOG` | `info` |
//! | `--packet-mark MARK\|none` | `PACKET_MARK` | `auto`: 0x539 where permitted |
//! | `--connection-balance hash\|round-robin` | `MESHWIRE_CONNECTION_BALANCE` | `round-robin` (`ztunnel-uring` only) |
//!
//! As in ztunnel: `PROXY_CONFIG` is Istio's ProxyConfig as YAML or JSON, of which `proxyAdminPort`,
//! `statsPort`, `concurrency` and `proxyMetadata` (`DNS_CAPTURE`, `DNS_PROXY_ADDR`) are read;
//! `ISTIO_META_<KEY>` variables override `proxyMetadata`; a percentage of worker threads is taken of
//! `ZTUNNEL_CPU_LIMIT` (or of the CPUs available); without `CONNECTION_TERMINATION_DEADLINE`, a
//! `TERMINATION_GRACE_PERIOD_SECONDS` of more than 10 gives a drain deadline 5 s shorter, of 10 or less
//! one 1 s shorter (at least 1 s), so that connections are closed before Kubernetes kills the process.
//! `FAKE_CA=true` asks for what is the default here (a local CA). Durations are Go-style (`500ms`,
//! `1m30s`, `1.5h`, units `ns` `us` `ms` `s` `m` `h` `d`) or a number of seconds.
//!
//! Differences from ztunnel, all where ztunnel has no setting: every port can be moved; the SOCKS5
//! listener is on unless `UNSTABLE_ENABLE_SOCKS5=false` (it listens on loopback only); certificates come
//! from a local CA or from files instead of istiod. ztunnel variables meshwire does not implement (xDS
//! and CA clients, in-pod mode, keepalives) are listed in [`UNSUPPORTED_ZTUNNEL_ENV`]; those
//! that are set end up in [`Config::ignored_env`] for the binary to warn about.
//!
//! **Buffer budgets.** What the proxy holds for an HBONE peer that does not read is bounded by
//! these settings, not by the windows the peer advertises: per stream, the HTTP/2 send buffer
//! (`--hbone-stream-send-buffer`) plus the largest copy buffer (256 KiB), and the stream window of
//! bytes the peer sent that the upstream did not take; per connection, `--hbone-connection-buffer`
//! of upstream bytes and the connection window; per process, `--hbone-buffer-budget` over every
//! HBONE tunnel, inbound (upstream bytes) and outbound (the client's bytes, where the per-stream
//! part bounds a peer that does not read too). A stream that finds a budget spent stops reading its
//! upstream until another stream gives bytes back (see [`meshwire_hbone::budget`]).
//!
//! The other direction, what peers send that the destination does not take, is bounded by the
//! windows the proxy advertises: per stream the stream window, per connection the connection window,
//! and per process `--hbone-receive-budget`: every HBONE connection, inbound (once its client is
//! authenticated) and outbound (pooled), leases the part of its connection window above HTTP/2's
//! 64 KiB default from it for the connection's life, and advertises only what it got (stream windows
//! at most a quarter of that). A separate budget, not `--hbone-buffer-budget`: a window is reserved
//! for a connection's whole life, idle or not, and would otherwise starve the streams that move
//! bytes. Every connection together holds at most the budget plus 64 KiB each.
//!
//! **Packet mark.** The proxy's own upstream connections (HBONE to peers, passthrough, connections
//! to local workloads) carry the firewall mark of `--packet-mark` (`SO_MARK`, ztunnel's 0x539 = 1337 by
//! default), so that the redirection rules of `scripts/redirect.sh` let them out instead of capturing
//! them again. Setting a mark needs `CAP_NET_ADMIN`. By default ([`PacketMark::Auto`]) the proxy checks
//! at startup whether it may set the mark, and if it may not (an unprivileged run on loopback, as in
//! the README) it warns once and runs without marks; such a run must not be combined with redirection
//! rules. A mark given explicitly ([`PacketMark::Set`]) that cannot be set fails the start instead.
//! `0`, `none` or `off` turns marking off. Values are decimal or `0x` hexadecimal.
//!
//! The state directory defaults to `.meshwire` in the working directory, so that an unprivileged run
//! needs no setup. Deployments should give an absolute path on persistent storage (`/var/lib/meshwire`,
//! or systemd's `StateDirectory=`, which sets `STATE_DIRECTORY`): not `/var/run`, a tmpfs cleared at boot,
//! since the local CA's key must outlive restarts for the certificates it issued to stay trusted.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches, Command};
use meshwire_hbone::Settings;
use meshwire_hbone::pool::PoolConfig;
use meshwire_hbone::settings::SettingsError;
use meshwire_identity::id::{IstioIdentity, TrustDomain, parse_trust_domain};

use crate::state::LocalProxy;

/// ztunnel environment variables that meshwire recognises but does not implement. Those that are set
/// are listed in [`Config::ignored_env`].
pub const UNSUPPORTED_ZTUNNEL_ENV: &[&str] = &[
    "XDS_ADDRESS",
    "XDS_ROOT_CA",
    "ALT_XDS_HOSTNAME",
    "XDS_ON_DEMAND",
    "CA_ADDRESS",
    "CA_ROOT_CA",
    "ALT_CA_HOSTNAME",
    "AUTH_TOKEN",
    "INPOD_UDS",
    "INPOD_PORT_REUSE",
    "ENABLE_ORIG_SRC",
    "ENABLE_PROXY",
    "TRANSPARENT_NETWORK_POLICIES",
    "PREFERED_SERVICE_NAMESPACE",
    "LOCALHOST_APP_TUNNEL",
    "KEEPALIVE_TIME",
    "KEEPALIVE_INTERVAL",
    "KEEPALIVE_RETRIES",
    "KEEPALIVE_ENABLED",
    "USER_TIMEOUT_ENABLED",
];

/// The configuration of a running proxy. Built and validated by [`Config::from_args_and_env`]; then
/// immutable, shared as `Arc<Config>`.
///
/// [`Config::default`] is what an empty command line and an empty environment give.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Whom the proxy serves.
    pub mode: ProxyMode,
    /// The local configuration file (workloads, services, policies), if any.
    pub local_config: Option<LocalConfigSource>,
    /// Where the proxy keeps state that must outlive a restart (the local CA).
    pub state_dir: PathBuf,
    /// Where workload certificates come from.
    pub certificates: CertificateSource,
    /// The trust domain of the mesh (`cluster.local`).
    pub trust_domain: TrustDomain,
    /// The cluster this proxy runs in (`Kubernetes`).
    pub cluster_id: String,
    /// The DNS domain of the cluster (`cluster.local`).
    pub cluster_domain: String,
    /// The network this proxy is in; `""` is the default network.
    pub network: String,
    /// The proxy's own address (`INSTANCE_IP`), if known.
    pub instance_ip: Option<IpAddr>,
    /// The address of every listener.
    pub listeners: Listeners,
    /// The HBONE connection pool, with the HTTP/2 settings of every HBONE connection (see
    /// [`Config::http2`]).
    pub pool: PoolConfig,
    /// The budgets of bytes inbound HBONE connections hold for their peers.
    pub buffers: BufferLimits,
    /// How long draining connections are given at shutdown before they are closed.
    pub drain_deadline: Duration,
    /// `Some` when this instance takes over from one still running on the same ports: it shares
    /// the data listeners at once (`SO_REUSEPORT`) and waits up to this long for the other instance
    /// to release the control listeners (readiness, admin, metrics). `None`: every port must be
    /// free, and a port in use fails the start.
    pub handover: Option<Duration>,
    /// Threads of the data path (the tokio build's workers, the io_uring build's executors).
    pub worker_threads: usize,
    /// Whether `worker_threads` was given (flag, variable or `PROXY_CONFIG`) rather than defaulted:
    /// the io_uring build's default is one executor per CPU of the process's CPU set instead.
    pub worker_threads_given: bool,
    /// Lifetime of the certificates the local CA issues (ztunnel's `SECRET_TTL`: the requested
    /// workload certificate lifetime), at least [`MIN_CERT_TTL`]. They are refreshed at half-life.
    pub cert_ttl: Duration,
    /// Format of the log and access log lines.
    pub log_format: LogFormat,
    /// The log filter, in `tracing_subscriber::EnvFilter` syntax (`info`, `meshwire=debug,h2=warn`).
    pub log_level: String,
    /// The firewall mark of the proxy's own upstream connections.
    pub packet_mark: PacketMark,
    /// How the io_uring build spreads new connections over its cores (the tokio build has one
    /// listening socket per port and ignores it).
    pub connection_balance: ConnectionBalance,
    /// ztunnel variables that were set but that meshwire does not implement (from
    /// [`UNSUPPORTED_ZTUNNEL_ENV`]), for the binary to warn about.
    pub ignored_env: Vec<&'static str>,
}

/// The budgets of bytes the proxy holds from upstreams for HBONE peers that do not read (the
/// per-stream part is the HTTP/2 send buffer, [`meshwire_hbone::Settings::send_buffer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Bytes the streams of one connection hold together (`--hbone-connection-buffer`).
    pub connection: usize,
    /// Bytes every HBONE tunnel of the process, inbound and outbound, holds together
    /// (`--hbone-buffer-budget`).
    pub process: usize,
    /// Bytes of HTTP/2 connection windows (beyond HTTP/2's 64 KiB default each) every HBONE
    /// connection of the process, inbound and outbound, advertises together
    /// (`--hbone-receive-budget`).
    pub receive: usize,
}

/// Whom the proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyMode {
    /// The workloads of one node (`PROXY_MODE=shared`, ztunnel's default).
    Shared {
        /// The node (`NODE_NAME`); `None` serves the workloads of every node.
        node: Option<String>,
    },
    /// One workload only (`PROXY_MODE=dedicated`), as a sidecar or a gateway.
    Dedicated {
        /// The workload.
        workload: WorkloadInfo,
    },
}

/// A workload, as `PROXY_WORKLOAD_INFO` names it: `namespace/name/service-account`.
///
/// ```
/// use meshwire_dataplane::config::WorkloadInfo;
///
/// let w: WorkloadInfo = "default/client-7d9f/client".parse()?;
/// assert_eq!(w.namespace, "default");
/// assert_eq!(w.name, "client-7d9f");
/// assert_eq!(w.service_account, "client");
/// assert_eq!(w.to_string(), "default/client-7d9f/client");
/// assert!("default/client".parse::<WorkloadInfo>().is_err());
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Service account.
    pub service_account: String,
}

impl WorkloadInfo {
    /// The workload's Istio identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &TrustDomain) -> Result<IstioIdentity, meshwire_identity::id::IdError> {
        IstioIdentity::new(trust_domain.clone(), &self.namespace, &self.service_account)
    }
}

impl FromStr for WorkloadInfo {
    type Err = String;

    /// Parses `namespace/name/service-account`; the error says what is wrong.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let &[namespace, name, service_account] = parts.as_slice() else {
            return Err(format!(
                "expected namespace/name/service-account (three parts separated by '/'), found {} part(s)",
                parts.len()
            ));
        };
        for (part, what) in [
            (namespace, "namespace"),
            (name, "name"),
            (service_account, "service account"),
        ] {
            if part.trim().is_empty() {
                return Err(format!("the {what} is empty"));
            }
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

impl fmt::Display for WorkloadInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.name, self.service_account)
    }
}

/// The firewall mark (`SO_MARK`) of the proxy's own upstream connections, which the redirection rules
/// skip so that the proxy's traffic is not captured again (see the [module documentation](self)).
///
/// ```
/// use meshwire_dataplane::config::PacketMark;
///
/// assert_eq!("0x539".parse::<PacketMark>(), Ok(PacketMark::Set(1337)));
/// assert_eq!("1337".parse::<PacketMark>(), Ok(PacketMark::Set(0x539)));
/// assert_eq!("none".parse::<PacketMark>(), Ok(PacketMark::Off));
/// assert_eq!("0".parse::<PacketMark>(), Ok(PacketMark::Off));
/// assert_eq!("auto".parse::<PacketMark>(), Ok(PacketMark::Auto));
/// assert_eq!(PacketMark::Auto.value(), Some(PacketMark::DEFAULT));
/// assert!("0x1_0000_0000".parse::<PacketMark>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PacketMark {
    /// [`PacketMark::DEFAULT`] if the proxy may set marks (it has `CAP_NET_ADMIN`); otherwise none,
    /// with a warning at startup.
    #[default]
    Auto,
    /// This mark; a proxy that may not set it does not start.
    Set(u32),
    /// No mark.
    Off,
}

impl PacketMark {
    /// ztunnel's mark, 0x539 (1337).
    pub const DEFAULT: u32 = 0x539;

    /// The mark to try, if any.
    pub fn value(self) -> Option<u32> {
        match self {
            PacketMark::Auto => Some(Self::DEFAULT),
            PacketMark::Set(mark) => Some(mark),
            PacketMark::Off => None,
        }
    }
}

/// How `ztunnel-uring` spreads a listener's new connections over its cores' sockets.
///
/// ```
/// use meshwire_dataplane::config::ConnectionBalance;
/// assert_eq!("hash".parse::<ConnectionBalance>(), Ok(ConnectionBalance::Hash));
/// assert_eq!("Round-Robin".parse::<ConnectionBalance>(), Ok(ConnectionBalance::RoundRobin));
/// assert!("random".parse::<ConnectionBalance>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectionBalance {
    /// The kernel's `SO_REUSEPORT` hash of addresses and ports.
    Hash,
    /// In turn, by an eBPF reuseport program (needs `CAP_BPF` and Linux 5.12; the hash otherwise).
    #[default]
    RoundRobin,
}

impl FromStr for ConnectionBalance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hash" => Ok(ConnectionBalance::Hash),
            "round-robin" | "roundrobin" | "round_robin" => Ok(ConnectionBalance::RoundRobin),
            _ => Err("expected hash or round-robin".to_owned()),
        }
    }
}

impl FromStr for PacketMark {
    type Err = String;

    /// `auto`; `none`, `off` or `0`; or a mark, decimal or `0x` hexadecimal.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        let parsed = match lower.as_str() {
            "auto" => return Ok(PacketMark::Auto),
            "none" | "off" | "false" => return Ok(PacketMark::Off),
            _ => match lower.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(&hex.replace('_', ""), 16),
                None => lower.replace('_', "").parse::<u32>(),
            },
        };
        match parsed {
            Ok(0) => Ok(PacketMark::Off),
            Ok(mark) => Ok(PacketMark::Set(mark)),
            Err(_) => Err("expected auto, none, or a mark between 1 and 0xffffffff (decimal or 0x hex)".to_owned()),
        }
    }
}

impl fmt::Display for PacketMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PacketMark::Auto => write!(f, "auto ({:#x} where permitted)", Self::DEFAULT),
            PacketMark::Set(mark) => write!(f, "{mark:#x}"),
            PacketMark::Off => f.write_str("none"),
        }
    }
}

/// Where the local configuration (ztunnel's `LOCAL_XDS_PATH` format) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalConfigSource {
    /// A file (`--config`, `LOCAL_XDS_PATH`).
    File(PathBuf),
    /// The YAML itself (`LOCAL_XDS`).
    Inline(String),
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateSource {
    /// A CA run by the proxy itself, keeping its key and certificate in `dir` (`<state dir>/ca`); the
    /// default, like ztunnel's `FAKE_CA=true`.
    LocalCa {
        /// The CA's directory.
        dir: PathBuf,
    },
    /// One certificate read from PEM files (`--cert-chain`, `--cert-key`, `--trust-bundle`).
    Files {
        /// The certificate chain, leaf first.
        chain: PathBuf,
        /// The private key of the leaf.
        key: PathBuf,
        /// The trusted CA certificates.
        bundle: PathBuf,
    },
}

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

    fn port_opt(self) -> &'static Opt {
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

    /// The ports of the listeners that are on.
    pub fn ports(&self) -> Vec<u16> {
        self.iter().map(|(_, a)| a.port()).collect()
    }
}

/// Format of log lines, access log included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable text (`text`, or ztunnel's `plain`).
    #[default]
    Text,
    /// One JSON object per line (`json`).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "plain" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".to_owned()),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Where a value came from, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// A command-line flag (`--inbound-port`).
    Flag(&'static str),
    /// An environment variable (`HTTP2_FRAME_SIZE`).
    Env(&'static str),
    /// A field of the `PROXY_CONFIG` variable (`proxyAdminPort`).
    ProxyConfig(&'static str),
    /// The default of a flag.
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::ProxyConfig(field) => write!(f, "PROXY_CONFIG field {field}"),
            Origin::Default(flag) => write!(f, "{flag} (default)"),
        }
    }
}

/// Why the configuration cannot be used. Every message names the flag or variable and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line is malformed (unknown flag, missing value), or asks for `--help` or
    /// `--version`; `message` is clap's rendering, to print as is (see [`Error::is_help`]).
    #[error("{message}")]
    Cli {
        /// What clap found.
        kind: ErrorKind,
        /// The rendered message (or help, or version).
        message: String,
    },
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for {origin}: {reason}")]
    Invalid {
        /// Where it came from.
        origin: Origin,
        /// The value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two listeners on one port.
    #[error("port {port} is used by both {first} and {second}: two listeners cannot share a port")]
    DuplicatePort {
        /// The port.
        port: u16,
        /// Where the first listener's port came from.
        first: Origin,
        /// Where the second listener's port came from.
        second: Origin,
    },
    /// HTTP/2 settings that HTTP/2 or each other reject.
    #[error("invalid HTTP/2 settings from {}: {source}", join(origins))]
    Http2 {
        /// Where the settings involved came from.
        origins: Vec<Origin>,
        /// What is wrong.
        source: SettingsError,
    },
    /// Dedicated mode without a workload.
    #[error(
        "dedicated mode (from {mode}) requires the workload: set --workload or PROXY_WORKLOAD_INFO to \
         namespace/name/service-account"
    )]
    MissingWorkload {
        /// Where dedicated mode came from.
        mode: Origin,
    },
    /// Two settings that exclude each other.
    #[error("{first} conflicts with {second}: {reason}")]
    Conflict {
        /// One setting.
        first: Origin,
        /// The other.
        second: Origin,
        /// Why they cannot go together.
        reason: &'static str,
    },
    /// One of a group of settings that go together without the others.
    #[error("{given} needs {missing} as well: {reason}")]
    Incomplete {
        /// The setting given.
        given: Origin,
        /// The flag of a setting missing.
        missing: &'static str,
        /// Which settings go together.
        reason: &'static str,
    },
    /// A file named by the configuration cannot be read ([`Config::check_files`]).
    #[error("{flag} {}: {reason}", path.display())]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Whether this is a request for `--help` or `--version` (or the `version` command), whose message
    /// goes to standard output with exit status 0.
    pub fn is_help(&self) -> bool {
        matches!(
            self,
            Error::Cli {
                kind: ErrorKind::DisplayHelp | ErrorKind::DisplayVersion,
                ..
            }
        )
    }
}

fn join(origins: &[Origin]) -> String {
    origins
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

impl Default for Config {
    fn default() -> Self {
        match Self::from_args_and_env(["ztunnel"], &|_| None) {
            Ok(config) => config,
            // The defaults are valid, as the tests check.
            Err(err) => unreachable!("the defaults are invalid: {err}"),
        }
    }
}

impl Config {
    /// Reads the configuration from an argument vector (program name first, as `std::env::args_os`
    /// gives it) and environment variables looked up through `env`, and validates it. Touches neither
    /// the process environment nor the filesystem.
    pub fn from_args_and_env<I, T>(args: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let name = program_name(args.first());
        let matches = command()
            .name(name)
            .try_get_matches_from(args)
            .map_err(|err| Error::Cli {
                kind: err.kind(),
                message: err.render().to_string(),
            })?;
        if matches.get_one::<String>("command").map(String::as_str) == Some("version") {
            return Err(Error::Cli {
                kind: ErrorKind::DisplayVersion,
                message: format!("{name} (meshwire) {}\n", env!("CARGO_PKG_VERSION")),
            });
        }
        let inputs = Inputs::new(matches, env)?;
        inputs.config()
    }

    /// [`Config::from_args_and_env`] with the process's arguments and environment.
    pub fn from_process() -> Result<Config, Error> {
        Self::from_args_and_env(std::env::args_os(), &|name| std::env::var(name).ok())
    }

    /// The command line definition, for rendering help or completions.
    pub fn command() -> Command {
        command()
    }

    /// The HTTP/2 settings of HBONE connections, client and server side.
    pub fn http2(&self) -> &Settings {
        &self.pool.settings
    }

    /// Checks a configuration built by hand as [`Config::from_args_and_env`] checks what it reads:
    /// ports non-zero and distinct, HTTP/2 settings, worker threads and pool streams at least 1.
    pub fn validate(&self) -> Result<(), Error> {
        let http2 =
            [&HTTP2_STREAM_WINDOW, &HTTP2_CONNECTION_WINDOW, &HTTP2_FRAME_SIZE].map(|opt| Origin::Flag(opt.flag));
        let buffers = [
            &HBONE_STREAM_SEND_BUFFER,
            &HBONE_CONNECTION_BUFFER,
            &HBONE_BUFFER_BUDGET,
        ]
        .map(|opt| Origin::Flag(opt.flag));
        self.validate_with(&|l| Origin::Flag(l.port_flag()), http2, buffers)
    }

    /// `http2` is where the stream window, connection window and frame size came from; `buffers`
    /// where the stream send buffer, the connection buffer and the process budget came from.
    fn validate_with(
        &self,
        port_origin: &dyn Fn(Listener) -> Origin,
        http2: [Origin; 3],
        buffers: [Origin; 3],
    ) -> Result<(), Error> {
        let mut seen: Vec<(u16, Listener)> = Vec::new();
        for (listener, addr) in self.listeners.iter() {
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
        self.http2().validate().map_err(|source| {
            let [stream, connection, frame] = http2;
            let origins = match &source {
                SettingsError::OutOfRange { field, .. } if *field == "stream_window" => vec![stream],
                SettingsError::OutOfRange { field, .. } if *field == "connection_window" => vec![connection],
                SettingsError::OutOfRange { field, .. } if *field == "max_frame_size" => vec![frame],
                SettingsError::ConnectionWindowTooSmall { .. } => vec![connection, stream],
                SettingsError::OutOfRange { field, .. } if *field == "send_buffer" => vec![buffers[0]],
                _ => http2.to_vec(),
            };
            Error::Http2 { origins, source }
        })?;
        // Each budget lets at least one stream through.
        let lease = meshwire_hbone::server::stream_lease(self.http2(), &meshwire_hbone::copy::CopyConfig::default());
        for (value, origin) in [
            (self.buffers.connection, buffers[1]),
            (self.buffers.process, buffers[2]),
        ] {
            if value < lease {
                return Err(Error::Invalid {
                    origin,
                    value: value.to_string(),
                    reason: format!(
                        "smaller than what one stream holds ({lease} bytes: the stream send buffer plus the \
                         256 KiB copy buffer), so no stream could send"
                    ),
                });
            }
        }
        for (value, flag) in [
            (self.worker_threads, "--worker-threads"),
            (
                self.pool.max_streams_per_connection,
                "--pool-max-streams-per-connection",
            ),
        ] {
            if value == 0 {
                return Err(Error::Invalid {
                    origin: Origin::Flag(flag),
                    value: "0".to_owned(),
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Checks that the files the configuration names exist and are files: the local configuration
    /// file and the certificate files. Run by the binary at startup, after parsing.
    pub fn check_files(&self) -> Result<(), Error> {
        let mut files: Vec<(&'static str, &Path)> = Vec::new();
        if let Some(LocalConfigSource::File(path)) = &self.local_config {
            files.push(("--config", path));
        }
        if let CertificateSource::Files { chain, key, bundle } = &self.certificates {
            files.extend([
                ("--cert-chain", chain.as_path()),
                ("--cert-key", key.as_path()),
                ("--trust-bundle", bundle.as_path()),
            ]);
        }
        for (flag, path) in files {
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(Error::File {
                        flag,
                        path: path.to_owned(),
                        reason: "not a regular file".to_owned(),
                    });
                }
                Err(err) => {
                    return Err(Error::File {
                        flag,
                        path: path.to_owned(),
                        reason: err.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The proxy as routing sees it ([`LocalProxy`]): its node (shared mode), network, own address,
    /// listening ports, and the HBONE port, taken to be the same on every node.
    pub fn local_proxy(&self) -> LocalProxy {
        let mut proxy = LocalProxy::new();
        if let ProxyMode::Shared { node: Some(node) } = &self.mode {
            proxy = proxy.with_node(node.clone());
        }
        proxy.network = self.network.clone();
        proxy.addresses = self.instance_ip.into_iter().collect();
        proxy.ports = self.listeners.ports();
        proxy.hbone_port = self.listeners.inbound.port();
        proxy
    }
}

// ---------------------------------------------------------------------------------------------------
// The option table: one entry per flag, driving the command line, its help, and the variables read.

/// A place a value can be read from besides its flag.
#[derive(Clone, Copy)]
enum Key {
    Env(&'static str),
    ProxyConfig(&'static str),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Value,
    Bool,
}

struct Opt {
    /// `--flag`; the clap id is the flag without its dashes.
    flag: &'static str,
    value_name: &'static str,
    help: &'static str,
    heading: &'static str,
    keys: &'static [Key],
    default: Option<&'static str>,
    /// What `--help` says of the default when it is not a plain value.
    default_note: Option<&'static str>,
    kind: Kind,
}

impl Opt {
    /// A value option under `heading` with no variables and no default.
    const fn new(heading: &'static str) -> Opt {
        Opt {
            flag: "",
            value_name: "",
            help: "",
            heading,
            keys: &[],
            default: None,
            default_note: None,
            kind: Kind::Value,
        }
    }

    fn id(&self) -> &'static str {
        self.flag.trim_start_matches('-')
    }

    fn arg(&self) -> Arg {
        let mut help = self.help.to_owned();
        let envs: Vec<String> = self
            .keys
            .iter()
            .map(|k| match k {
                Key::Env(name) => (*name).to_owned(),
                Key::ProxyConfig(field) => format!("PROXY_CONFIG {field}"),
            })
            .collect();
        if !envs.is_empty() {
            help.push_str(&format!(" [env: {}]", envs.join(", ")));
        }
        if let Some(default) = self.default.or(self.default_note) {
            help.push_str(&format!(" [default: {default}]"));
        }
        let arg = Arg::new(self.id())
            .long(self.id())
            .value_name(self.value_name)
            .help(help)
            .help_heading(self.heading)
            .action(ArgAction::Set);
        match self.kind {
            Kind::Value => arg,
            Kind::Bool => arg.num_args(0..=1).default_missing_value("true"),
        }
    }
}

const H_MODE: &str = "Mode and identity";
const H_LISTEN: &str = "Listeners";
const H_HBONE: &str = "HTTP/2 and connection pool";
const H_RUN: &str = "Runtime";

use Key::{Env, ProxyConfig};

const CONFIG: Opt = Opt {
    flag: "--config",
    value_name: "FILE",
    keys: &[Env("LOCAL_XDS_PATH")],
    help: "Local configuration file: workloads, services and policies (LOCAL_XDS holds the YAML inline)",
    ..Opt::new(H_MODE)
};
const MODE: Opt = Opt {
    flag: "--mode",
    value_name: "shared|dedicated",
    keys: &[Env("PROXY_MODE")],
    default: Some("shared"),
    help: "Serve the workloads of a node (shared) or one workload (dedicated)",
    ..Opt::new(H_MODE)
};
const WORKLOAD: Opt = Opt {
    flag: "--workload",
    value_name: "NS/NAME/SA",
    keys: &[Env("PROXY_WORKLOAD_INFO")],
    help: "The workload of dedicated mode: namespace/name/service-account (implies --mode dedicated)",
    ..Opt::new(H_MODE)
};
const NODE_NAME: Opt = Opt {
    flag: "--node-name",
    value_name: "NAME",
    keys: &[Env("NODE_NAME")],
    help: "The node whose workloads a shared proxy serves",
    default_note: Some("every node"),
    ..Opt::new(H_MODE)
};
const INSTANCE_IP: Opt = Opt {
    flag: "--instance-ip",
    value_name: "IP",
    keys: &[Env("INSTANCE_IP")],
    help: "The proxy's own address",
    ..Opt::new(H_MODE)
};
const CLUSTER_ID: Opt = Opt {
    flag: "--cluster-id",
    value_name: "ID",
    keys: &[Env("ISTIO_META_CLUSTER_ID"), Env("CLUSTER_ID")],
    default: Some("Kubernetes"),
    help: "The cluster this proxy runs in",
    ..Opt::new(H_MODE)
};
const CLUSTER_DOMAIN: Opt = Opt {
    flag: "--cluster-domain",
    value_name: "DOMAIN",
    keys: &[Env("CLUSTER_DOMAIN")],
    default: Some("cluster.local"),
    help: "The DNS domain of the cluster",
    ..Opt::new(H_MODE)
};
const TRUST_DOMAIN: Opt = Opt {
    flag: "--trust-domain",
    value_name: "DOMAIN",
    keys: &[Env("TRUST_DOMAIN")],
    default: Some("cluster.local"),
    help: "The trust domain of the mesh",
    ..Opt::new(H_MODE)
};
const NETWORK: Opt = Opt {
    flag: "--network",
    value_name: "NAME",
    keys: &[Env("NETWORK")],
    help: "The network this proxy is in",
    default_note: Some("the default network"),
    ..Opt::new(H_MODE)
};
const STATE_DIR: Opt = Opt {
    flag: "--state-dir",
    value_name: "DIR",
    keys: &[Env("MESHWIRE_STATE_DIR"), Env("STATE_DIRECTORY")],
    default: Some(".meshwire"),
    help: "Directory of state that outlives restarts (the local CA); use persistent storage",
    ..Opt::new(H_MODE)
};
const CERT_CHAIN: Opt = Opt {
    flag: "--cert-chain",
    value_name: "FILE",
    keys: &[Env("MESHWIRE_CERT_CHAIN")],
    help: "Certificate chain (PEM, leaf first) to use instead of the local CA; needs --cert-key and --trust-bundle",
    ..Opt::new(H_MODE)
};
const CERT_KEY: Opt = Opt {
    flag: "--cert-key",
    value_name: "FILE",
    keys: &[Env("MESHWIRE_CERT_KEY")],
    help: "Private key (PEM) of --cert-chain",
    ..Opt::new(H_MODE)
};
const TRUST_BUNDLE: Opt = Opt {
    flag: "--trust-bundle",
    value_name: "FILE",
    keys: &[Env("MESHWIRE_TRUST_BUNDLE")],
    help: "Trusted CA certificates (PEM) that go with --cert-chain",
    ..Opt::new(H_MODE)
};
const CERT_TTL: Opt = Opt {
    flag: "--cert-ttl",
    value_name: "DURATION",
    keys: &[Env("SECRET_TTL")],
    default: Some("24h"),
    help: "Lifetime of the certificates the local CA issues (at least 1m); refreshed at half-life",
    ..Opt::new(H_MODE)
};

const BIND_ADDRESS: Opt = Opt {
    flag: "--bind-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_BIND_ADDRESS")],
    help: "Address of the inbound, outbound, readiness and metrics listeners",
    default_note: Some("::, 0.0.0.0 if --ipv6 false"),
    ..Opt::new(H_LISTEN)
};
const IPV6: Opt = Opt {
    flag: "--ipv6",
    value_name: "BOOL",
    keys: &[Env("IPV6_ENABLED")],
    default: Some("true"),
    kind: Kind::Bool,
    help: "Listen on IPv6 as well as IPv4 (the default --bind-address is :: rather than 0.0.0.0)",
    ..Opt::new(H_LISTEN)
};
const INBOUND_PORT: Opt = Opt {
    flag: "--inbound-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_INBOUND_PORT")],
    default: Some("15008"),
    help: "Port of the inbound HBONE listener",
    ..Opt::new(H_LISTEN)
};
const INBOUND_PLAINTEXT_PORT: Opt = Opt {
    flag: "--inbound-plaintext-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_INBOUND_PLAINTEXT_PORT")],
    default: Some("15006"),
    help: "Port of the inbound plaintext capture listener",
    ..Opt::new(H_LISTEN)
};
const OUTBOUND_PORT: Opt = Opt {
    flag: "--outbound-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_OUTBOUND_PORT")],
    default: Some("15001"),
    help: "Port of the outbound capture listener",
    ..Opt::new(H_LISTEN)
};
const SOCKS5: Opt = Opt {
    flag: "--socks5",
    value_name: "BOOL",
    keys: &[Env("UNSTABLE_ENABLE_SOCKS5")],
    default: Some("true"),
    kind: Kind::Bool,
    help: "Run the outbound SOCKS5 listener",
    ..Opt::new(H_LISTEN)
};
const SOCKS5_PORT: Opt = Opt {
    flag: "--socks5-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_SOCKS5_PORT")],
    default: Some("15080"),
    help: "Port of the SOCKS5 listener",
    ..Opt::new(H_LISTEN)
};
const SOCKS5_ADDRESS: Opt = Opt {
    flag: "--socks5-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_SOCKS5_ADDRESS")],
    default: Some("127.0.0.1"),
    help: "Address of the SOCKS5 listener (it has no authentication: keep it on loopback)",
    ..Opt::new(H_LISTEN)
};
const DNS_PROXY: Opt = Opt {
    flag: "--dns-proxy",
    value_name: "BOOL",
    keys: &[Env("ISTIO_META_DNS_CAPTURE"), ProxyConfig("proxyMetadata.DNS_CAPTURE")],
    default: Some("true"),
    kind: Kind::Bool,
    help: "Run the DNS proxy",
    ..Opt::new(H_LISTEN)
};
const DNS_PORT: Opt = Opt {
    flag: "--dns-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_DNS_PORT")],
    default: Some("15053"),
    help: "Port of the DNS proxy (ISTIO_META_DNS_PROXY_ADDR sets address and port together)",
    ..Opt::new(H_LISTEN)
};
const DNS_ADDRESS: Opt = Opt {
    flag: "--dns-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_DNS_ADDRESS")],
    default: Some("127.0.0.1"),
    help: "Address of the DNS proxy",
    ..Opt::new(H_LISTEN)
};
const READINESS_PORT: Opt = Opt {
    flag: "--readiness-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_READINESS_PORT")],
    default: Some("15021"),
    help: "Port of the readiness probe (/healthz/ready)",
    ..Opt::new(H_LISTEN)
};
const ADMIN_PORT: Opt = Opt {
    flag: "--admin-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_ADMIN_PORT"), ProxyConfig("proxyAdminPort")],
    default: Some("15000"),
    help: "Port of the admin API",
    ..Opt::new(H_LISTEN)
};
const ADMIN_ADDRESS: Opt = Opt {
    flag: "--admin-address",
    value_name: "IP",
    keys: &[Env("MESHWIRE_ADMIN_ADDRESS")],
    default: Some("127.0.0.1"),
    help: "Address of the admin API (it has no authentication: keep it on loopback)",
    ..Opt::new(H_LISTEN)
};
const METRICS_PORT: Opt = Opt {
    flag: "--metrics-port",
    value_name: "PORT",
    keys: &[Env("MESHWIRE_METRICS_PORT"), ProxyConfig("statsPort")],
    default: Some("15020"),
    help: "Port of the Prometheus metrics listener",
    ..Opt::new(H_LISTEN)
};

const HTTP2_STREAM_WINDOW: Opt = Opt {
    flag: "--http2-stream-window",
    value_name: "BYTES",
    keys: &[Env("HTTP2_STREAM_WINDOW_SIZE")],
    default: Some("4194304"),
    help: "Initial flow-control window of each HBONE stream",
    ..Opt::new(H_HBONE)
};
const HTTP2_CONNECTION_WINDOW: Opt = Opt {
    flag: "--http2-connection-window",
    value_name: "BYTES",
    keys: &[Env("HTTP2_CONNECTION_WINDOW_SIZE")],
    default: Some("16777216"),
    help: "Flow-control window of each HBONE connection (at least 4 stream windows)",
    ..Opt::new(H_HBONE)
};
const HTTP2_FRAME_SIZE: Opt = Opt {
    flag: "--http2-frame-size",
    value_name: "BYTES",
    keys: &[Env("HTTP2_FRAME_SIZE")],
    default: Some("1048576"),
    help: "Largest HTTP/2 frame accepted",
    ..Opt::new(H_HBONE)
};
const HBONE_STREAM_SEND_BUFFER: Opt = Opt {
    flag: "--hbone-stream-send-buffer",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_STREAM_SEND_BUFFER")],
    default: Some("409600"),
    help: "Bytes HTTP/2 queues for one HBONE stream whose peer does not read, whatever window the peer advertises",
    ..Opt::new(H_HBONE)
};
const HBONE_CONNECTION_BUFFER: Opt = Opt {
    flag: "--hbone-connection-buffer",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_CONNECTION_BUFFER")],
    default: Some("67108864"),
    help: "Bytes the streams of one inbound HBONE connection hold from their upstreams together",
    ..Opt::new(H_HBONE)
};
const HBONE_BUFFER_BUDGET: Opt = Opt {
    flag: "--hbone-buffer-budget",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_BUFFER_BUDGET")],
    default: Some("1073741824"),
    help: "Bytes every HBONE tunnel of the process (inbound and outbound) holds for peers together; \
           streams wait (and stop reading what they forward) when it is spent",
    ..Opt::new(H_HBONE)
};
const HBONE_RECEIVE_BUDGET: Opt = Opt {
    flag: "--hbone-receive-budget",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_RECEIVE_BUDGET")],
    default: Some("1073741824"),
    help: "Bytes of HTTP/2 connection windows every HBONE connection of the process advertises together \
           (beyond HTTP/2's 64 KiB default each); a connection set up when it is spent advertises less",
    ..Opt::new(H_HBONE)
};
const POOL_MAX_STREAMS: Opt = Opt {
    flag: "--pool-max-streams-per-connection",
    value_name: "N",
    keys: &[Env("POOL_MAX_STREAMS_PER_CONNECTION")],
    default: Some("100"),
    help: "Streams on one pooled HBONE connection before another is opened",
    ..Opt::new(H_HBONE)
};
const POOL_RESPONSE_TIMEOUT: Opt = Opt {
    flag: "--pool-response-timeout",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_POOL_RESPONSE_TIMEOUT")],
    default: Some("3s"),
    help: "How long a CONNECT waits for its answer on a pooled HBONE connection before the connection is \
           checked with a PING (new streams avoid it meanwhile)",
    ..Opt::new(H_HBONE)
};
const POOL_PROBE_TIMEOUT: Opt = Opt {
    flag: "--pool-probe-timeout",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_POOL_PROBE_TIMEOUT")],
    default: Some("2s"),
    help: "How long that PING may go unanswered before the connection is retired and its waiting CONNECTs fail",
    ..Opt::new(H_HBONE)
};
const POOL_UNUSED_RELEASE_TIMEOUT: Opt = Opt {
    flag: "--pool-unused-release-timeout",
    value_name: "DURATION",
    keys: &[Env("POOL_UNUSED_RELEASE_TIMEOUT")],
    default: Some("5m"),
    help: "How long a pooled connection without streams is kept",
    ..Opt::new(H_HBONE)
};

const WORKER_THREADS: Opt = Opt {
    flag: "--worker-threads",
    value_name: "N|N%",
    keys: &[Env("ZTUNNEL_WORKER_THREADS"), ProxyConfig("concurrency")],
    default: Some("2"),
    help: "Data-path threads, or a percentage of ZTUNNEL_CPU_LIMIT (or of the CPUs available); ztunnel-uring: \
           executors, by default one per CPU of its CPU set",
    ..Opt::new(H_RUN)
};
const DRAIN_DEADLINE: Opt = Opt {
    flag: "--drain-deadline",
    value_name: "DURATION",
    keys: &[Env("CONNECTION_TERMINATION_DEADLINE")],
    help: "Time draining connections get at shutdown",
    default_note: Some("5s, or from TERMINATION_GRACE_PERIOD_SECONDS"),
    ..Opt::new(H_RUN)
};
const HANDOVER: Opt = Opt {
    flag: "--handover",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_HANDOVER")],
    help: "Take over from an instance running on the same ports: share its data listeners at once, and bind \
           the readiness, admin and metrics listeners as soon as it releases them (at the end of its drain), \
           waiting up to DURATION",
    default_note: Some("none: a port in use fails the start"),
    ..Opt::new(H_RUN)
};
const LOG_FORMAT: Opt = Opt {
    flag: "--log-format",
    value_name: "text|json",
    keys: &[Env("LOG_FORMAT")],
    default: Some("text"),
    help: "Format of log and access log lines",
    ..Opt::new(H_RUN)
};
const LOG_LEVEL: Opt = Opt {
    flag: "--log-level",
    value_name: "FILTER",
    keys: &[Env("RUST_LOG")],
    default: Some("info"),
    help: "Log filter (tracing EnvFilter syntax: info, meshwire=debug,h2=warn)",
    ..Opt::new(H_RUN)
};

const PACKET_MARK: Opt = Opt {
    flag: "--packet-mark",
    value_name: "MARK|none",
    keys: &[Env("PACKET_MARK")],
    default: Some("auto"),
    help: "Firewall mark (SO_MARK) of the proxy's upstream connections, which redirection rules skip; \
           auto: 0x539 if the proxy may set marks (CAP_NET_ADMIN), else none with a warning; 0 or none: off",
    ..Opt::new(H_RUN)
};

const CONNECTION_BALANCE: Opt = Opt {
    flag: "--connection-balance",
    value_name: "hash|round-robin",
    keys: &[Env("MESHWIRE_CONNECTION_BALANCE")],
    default: Some("round-robin"),
    help: "ztunnel-uring: how new connections are spread over the cores: in turn by an eBPF program (needs \
           CAP_BPF and Linux 5.12, else the hash with a log line), or by the kernel's SO_REUSEPORT hash",
    ..Opt::new(H_RUN)
};

const OPTS: &[&Opt] = &[
    &CONFIG,
    &MODE,
    &WORKLOAD,
    &NODE_NAME,
    &INSTANCE_IP,
    &CLUSTER_ID,
    &CLUSTER_DOMAIN,
    &TRUST_DOMAIN,
    &NETWORK,
    &STATE_DIR,
    &CERT_CHAIN,
    &CERT_KEY,
    &TRUST_BUNDLE,
    &CERT_TTL,
    &BIND_ADDRESS,
    &IPV6,
    &INBOUND_PORT,
    &INBOUND_PLAINTEXT_PORT,
    &OUTBOUND_PORT,
    &SOCKS5,
    &SOCKS5_PORT,
    &SOCKS5_ADDRESS,
    &DNS_PROXY,
    &DNS_PORT,
    &DNS_ADDRESS,
    &READINESS_PORT,
    &ADMIN_PORT,
    &ADMIN_ADDRESS,
    &METRICS_PORT,
    &HTTP2_STREAM_WINDOW,
    &HTTP2_CONNECTION_WINDOW,
    &HTTP2_FRAME_SIZE,
    &HBONE_STREAM_SEND_BUFFER,
    &HBONE_CONNECTION_BUFFER,
    &HBONE_BUFFER_BUDGET,
    &HBONE_RECEIVE_BUDGET,
    &POOL_MAX_STREAMS,
    &POOL_UNUSED_RELEASE_TIMEOUT,
    &POOL_RESPONSE_TIMEOUT,
    &POOL_PROBE_TIMEOUT,
    &WORKER_THREADS,
    &DRAIN_DEADLINE,
    &HANDOVER,
    &LOG_FORMAT,
    &LOG_LEVEL,
    &PACKET_MARK,
    &CONNECTION_BALANCE,
];

/// The name `--version` and `--help` show: `ztunnel-uring` when the program runs as the io_uring build
/// (its file name), `ztunnel` otherwise.
fn program_name(argv0: Option<&OsString>) -> &'static str {
    match argv0.and_then(|a| Path::new(a).file_name()).and_then(|n| n.to_str()) {
        Some("ztunnel-uring") => "ztunnel-uring",
        _ => "ztunnel",
    }
}

fn command() -> Command {
    let cmd = Command::new("ztunnel")
        .version(env!("CARGO_PKG_VERSION"))
        .about("meshwire: a ztunnel-compatible node proxy")
        .long_about(
            "meshwire: a ztunnel-compatible node proxy.\n\nEvery flag can also be set through the environment \
             variables listed with it; a flag wins over its variables, the first variable listed wins over \
             the others, and an empty variable counts as unset.",
        )
        .arg(
            Arg::new("command")
                .value_name("COMMAND")
                .value_parser(["proxy", "version"])
                .help("proxy (the default) runs the proxy; version prints the version"),
        )
        .arg(
            Arg::new("proxy-type")
                .value_name("PROXY_TYPE")
                .help("Accepted and ignored, as by ztunnel (Istio runs `ztunnel proxy ztunnel`)"),
        );
    OPTS.iter().fold(cmd, |cmd, opt| cmd.arg(opt.arg()))
}

// ---------------------------------------------------------------------------------------------------
// Reading the values.

/// A value and where it came from.
struct Found<T> {
    value: T,
    origin: Origin,
}

/// The parsed command line, the variables, and the fields of `PROXY_CONFIG`.
struct Inputs<'a> {
    matches: ArgMatches,
    env: &'a dyn Fn(&str) -> Option<String>,
    proxy_config: HashMap<&'static str, String>,
}

impl<'a> Inputs<'a> {
    fn new(matches: ArgMatches, env: &'a dyn Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let mut inputs = Self {
            matches,
            env,
            proxy_config: HashMap::new(),
        };
        if let Some(raw) = inputs.env("PROXY_CONFIG") {
            inputs.proxy_config = parse_proxy_config(&raw)?;
        }
        Ok(inputs)
    }

    /// A variable; empty counts as unset.
    fn env(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }

    /// The value given for `opt` by its flag or one of its variables, not counting its default.
    fn given(&self, opt: &Opt) -> Option<(String, Origin)> {
        if let Ok(Some(value)) = self.matches.try_get_one::<String>(opt.id()) {
            return Some((value.clone(), Origin::Flag(opt.flag)));
        }
        opt.keys.iter().find_map(|key| match *key {
            Key::Env(name) => self.env(name).map(|v| (v, Origin::Env(name))),
            Key::ProxyConfig(field) => self
                .proxy_config
                .get(field)
                .map(|v| (v.clone(), Origin::ProxyConfig(field))),
        })
    }

    /// The value of `opt`, its default if none is given, parsed.
    fn get<T>(&self, opt: &Opt, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Option<Found<T>>, Error> {
        let raw = self
            .given(opt)
            .or_else(|| opt.default.map(|d| (d.to_owned(), Origin::Default(opt.flag))));
        raw.map(|(raw, origin)| parse_found(raw, origin, parse)).transpose()
    }

    /// [`Inputs::get`] of an option that has a default.
    fn required<T>(&self, opt: &Opt, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Found<T>, Error> {
        self.get(opt, parse)?.ok_or_else(|| Error::Invalid {
            origin: Origin::Default(opt.flag),
            value: String::new(),
            reason: "no value and no default".to_owned(),
        })
    }

    fn config(&self) -> Result<Config, Error> {
        let trust_domain = self.required(&TRUST_DOMAIN, |s| {
            parse_trust_domain(s.trim()).map_err(|err| match err {
                meshwire_identity::id::IdError::TrustDomain { source, .. } => source.to_string(),
                other => other.to_string(),
            })
        })?;
        let mode = self.mode(&trust_domain.value)?;
        let state_dir = self.required(&STATE_DIR, |s| non_empty(s).map(PathBuf::from))?;
        let state_dir = match state_dir.origin {
            // systemd separates several state directories with colons; the first is ours.
            Origin::Env("STATE_DIRECTORY") => state_dir
                .value
                .to_str()
                .and_then(|s| s.split(':').find(|dir| !dir.is_empty()))
                .map(PathBuf::from)
                .unwrap_or(state_dir.value),
            _ => state_dir.value,
        };
        let certificates = self.certificates(&state_dir)?;
        let cert_ttl = self.required(&CERT_TTL, cert_ttl)?.value;

        let mut settings = Settings::default();
        let stream_window = self.required(&HTTP2_STREAM_WINDOW, parse_u32)?;
        let connection_window = self.required(&HTTP2_CONNECTION_WINDOW, parse_u32)?;
        let frame_size = self.required(&HTTP2_FRAME_SIZE, parse_u32)?;
        settings.stream_window = stream_window.value;
        settings.connection_window = connection_window.value;
        settings.max_frame_size = frame_size.value;
        let send_buffer = self.required(&HBONE_STREAM_SEND_BUFFER, parse_bytes)?;
        settings.send_buffer = send_buffer.value;
        let connection_buffer = self.required(&HBONE_CONNECTION_BUFFER, parse_bytes)?;
        let buffer_budget = self.required(&HBONE_BUFFER_BUDGET, parse_bytes)?;
        let receive_budget = self.required(&HBONE_RECEIVE_BUDGET, parse_bytes)?;
        let pool = PoolConfig {
            max_streams_per_connection: self.required(&POOL_MAX_STREAMS, at_least_one)?.value,
            idle_timeout: self.required(&POOL_UNUSED_RELEASE_TIMEOUT, parse_duration)?.value,
            response_timeout: self.required(&POOL_RESPONSE_TIMEOUT, positive_duration)?.value,
            probe_timeout: self.required(&POOL_PROBE_TIMEOUT, positive_duration)?.value,
            settings,
        };
        let buffers = BufferLimits {
            connection: connection_buffer.value,
            process: buffer_budget.value,
            receive: receive_budget.value,
        };

        let (listeners, port_origins) = self.listeners()?;
        let worker_threads = self.worker_threads()?;
        let config = Config {
            mode,
            local_config: self.local_config()?,
            state_dir,
            certificates,
            trust_domain: trust_domain.value,
            cluster_id: self.required(&CLUSTER_ID, non_empty)?.value,
            cluster_domain: self.required(&CLUSTER_DOMAIN, non_empty)?.value,
            network: self
                .get(&NETWORK, |s| Ok(s.trim().to_owned()))?
                .map(|f| f.value)
                .unwrap_or_default(),
            instance_ip: self.get(&INSTANCE_IP, parse_ip)?.map(|f| f.value),
            listeners,
            pool,
            buffers,
            drain_deadline: self.drain_deadline()?,
            handover: self.get(&HANDOVER, positive_duration)?.map(|f| f.value),
            worker_threads: worker_threads.0,
            worker_threads_given: worker_threads.1,
            cert_ttl,
            log_format: self.required(&LOG_FORMAT, |s| s.trim().parse())?.value,
            log_level: self.required(&LOG_LEVEL, non_empty)?.value,
            packet_mark: self.required(&PACKET_MARK, str::parse)?.value,
            connection_balance: self.required(&CONNECTION_BALANCE, str::parse)?.value,
            ignored_env: UNSUPPORTED_ZTUNNEL_ENV
                .iter()
                .copied()
                .filter(|name| self.env(name).is_some())
                .collect(),
        };
        let port_origin = |l: Listener| {
            port_origins
                .iter()
                .find(|(listener, _)| *listener == l)
                .map_or(Origin::Flag(l.port_flag()), |(_, origin)| *origin)
        };
        let http2 = [stream_window.origin, connection_window.origin, frame_size.origin];
        let buffer_origins = [send_buffer.origin, connection_buffer.origin, buffer_budget.origin];
        config.validate_with(&port_origin, http2, buffer_origins)?;
        Ok(config)
    }

    fn mode(&self, trust_domain: &TrustDomain) -> Result<ProxyMode, Error> {
        let mode = self.required(&MODE, |s| match s.trim().to_ascii_lowercase().as_str() {
            "shared" => Ok(false),
            "dedicated" => Ok(true),
            _ => Err("expected shared or dedicated".to_owned()),
        })?;
        let workload = self.get(&WORKLOAD, |s| s.trim().parse::<WorkloadInfo>())?;
        let explicit = !matches!(mode.origin, Origin::Default(_));
        match (mode.value, workload) {
            (false, Some(workload)) if explicit => Err(Error::Conflict {
                first: workload.origin,
                second: mode.origin,
                reason: "a workload is only served in dedicated mode",
            }),
            (false, None) => Ok(ProxyMode::Shared {
                node: self.get(&NODE_NAME, non_empty)?.map(|f| f.value),
            }),
            (true, None) => Err(Error::MissingWorkload { mode: mode.origin }),
            (_, Some(workload)) => {
                workload.value.identity(trust_domain).map_err(|err| Error::Invalid {
                    origin: workload.origin,
                    value: workload.value.to_string(),
                    reason: err.to_string(),
                })?;
                Ok(ProxyMode::Dedicated {
                    workload: workload.value,
                })
            }
        }
    }

    fn local_config(&self) -> Result<Option<LocalConfigSource>, Error> {
        let file = self.get(&CONFIG, |s| non_empty(s).map(PathBuf::from))?;
        if let Some(Found {
            value,
            origin: Origin::Flag(_),
        }) = file
        {
            return Ok(Some(LocalConfigSource::File(value)));
        }
        match (file, self.env("LOCAL_XDS")) {
            (Some(file), Some(_)) => Err(Error::Conflict {
                first: file.origin,
                second: Origin::Env("LOCAL_XDS"),
                reason: "only one local configuration can be given",
            }),
            (Some(file), None) => Ok(Some(LocalConfigSource::File(file.value))),
            (None, Some(yaml)) => Ok(Some(LocalConfigSource::Inline(yaml))),
            (None, None) => Ok(None),
        }
    }

    fn certificates(&self, state_dir: &Path) -> Result<CertificateSource, Error> {
        let path = |s: &str| non_empty(s).map(PathBuf::from);
        let chain = self.get(&CERT_CHAIN, path)?;
        let key = self.get(&CERT_KEY, path)?;
        let bundle = self.get(&TRUST_BUNDLE, path)?;
        let fake_ca = self
            .env("FAKE_CA")
            .map(|raw| parse_found(raw, Origin::Env("FAKE_CA"), parse_bool))
            .transpose()?;
        match (chain, key, bundle) {
            (None, None, None) => Ok(CertificateSource::LocalCa {
                dir: state_dir.join("ca"),
            }),
            (Some(chain), Some(key), Some(bundle)) => {
                if let Some(Found { value: true, origin }) = fake_ca {
                    return Err(Error::Conflict {
                        first: origin,
                        second: chain.origin,
                        reason: "FAKE_CA=true asks for the local CA, which certificate files replace",
                    });
                }
                Ok(CertificateSource::Files {
                    chain: chain.value,
                    key: key.value,
                    bundle: bundle.value,
                })
            }
            (chain, key, bundle) => {
                let files = [
                    (chain, CERT_CHAIN.flag),
                    (key, CERT_KEY.flag),
                    (bundle, TRUST_BUNDLE.flag),
                ];
                let given = files.iter().find_map(|(f, _)| f.as_ref().map(|f| f.origin));
                let missing = files.iter().find(|(f, _)| f.is_none()).map(|(_, flag)| *flag);
                Err(Error::Incomplete {
                    given: given.unwrap_or(Origin::Flag(CERT_CHAIN.flag)),
                    missing: missing.unwrap_or(CERT_CHAIN.flag),
                    reason: "--cert-chain, --cert-key and --trust-bundle go together",
                })
            }
        }
    }

    fn listeners(&self) -> Result<(Listeners, Vec<(Listener, Origin)>), Error> {
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
        };
        Ok((listeners, origins))
    }

    /// ztunnel's `DNS_PROXY_ADDR` proxy metadata: `localhost:PORT` or `IP:PORT`.
    fn dns_proxy_addr(&self) -> Result<Option<Found<SocketAddr>>, Error> {
        let raw = self
            .env("ISTIO_META_DNS_PROXY_ADDR")
            .map(|v| (v, Origin::Env("ISTIO_META_DNS_PROXY_ADDR")))
            .or_else(|| {
                self.proxy_config
                    .get("proxyMetadata.DNS_PROXY_ADDR")
                    .map(|v| (v.clone(), Origin::ProxyConfig("proxyMetadata.DNS_PROXY_ADDR")))
            });
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

    fn drain_deadline(&self) -> Result<Duration, Error> {
        if let Some(found) = self.get(&DRAIN_DEADLINE, parse_duration)? {
            return Ok(found.value);
        }
        let name = "TERMINATION_GRACE_PERIOD_SECONDS";
        let Some(raw) = self.env(name) else {
            return Ok(Duration::from_secs(5));
        };
        let grace = parse_found(raw, Origin::Env(name), |s| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| "expected a whole number of seconds".to_owned())
        })?;
        // Leave Kubernetes' grace period a margin to close what is left before it sends SIGKILL.
        let secs = if grace.value > 10 {
            grace.value - 5
        } else {
            grace.value.saturating_sub(1)
        };
        Ok(Duration::from_secs(secs.max(1)))
    }

    /// The number of worker threads, and whether it was given rather than defaulted.
    fn worker_threads(&self) -> Result<(usize, bool), Error> {
        let found = self.required(&WORKER_THREADS, |s| {
            let s = s.trim();
            match s.strip_suffix('%') {
                Some(percent) => match percent.trim().parse::<f64>() {
                    Ok(p) if p > 0.0 && p <= 100.0 => Ok(Threads::Percent(p)),
                    Ok(_) => Err("a percentage must be more than 0 and at most 100".to_owned()),
                    Err(_) => Err("expected a number of threads or a percentage (50%)".to_owned()),
                },
                None => at_least_one(s).map(Threads::Count),
            }
        })?;
        let given = !matches!(found.origin, Origin::Default(_));
        match found.value {
            Threads::Count(n) => Ok((n, given)),
            Threads::Percent(percent) => {
                let name = "ZTUNNEL_CPU_LIMIT";
                let cpus = match self.env(name) {
                    Some(raw) => parse_found(raw, Origin::Env(name), at_least_one)?.value,
                    None => std::thread::available_parallelism().map_or(1, usize::from),
                };
                // Rounded up, at least 1; the percentage is at most 100, so this fits.
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss
                )]
                let threads = (cpus as f64 * percent / 100.0).ceil() as usize;
                Ok((threads.max(1), given))
            }
        }
    }
}

enum Threads {
    Count(usize),
    Percent(f64),
}

fn parse_found<T>(
    raw: String,
    origin: Origin,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Found<T>, Error> {
    match parse(&raw) {
        Ok(value) => Ok(Found { value, origin }),
        Err(reason) => Err(Error::Invalid {
            origin,
            value: raw,
            reason,
        }),
    }
}

/// Reads the fields of Istio's ProxyConfig (YAML or JSON) that ztunnel reads.
fn parse_proxy_config(raw: &str) -> Result<HashMap<&'static str, String>, Error> {
    use serde_yaml_ng::Value as Yaml;
    let invalid = |reason: String| Error::Invalid {
        origin: Origin::Env("PROXY_CONFIG"),
        value: raw.to_owned(),
        reason,
    };
    let scalar = |value: &Yaml| match value {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let mut fields = HashMap::new();
    let map = match serde_yaml_ng::from_str::<Yaml>(raw).map_err(|err| invalid(err.to_string()))? {
        Yaml::Null => return Ok(fields),
        Yaml::Mapping(map) => map,
        _ => return Err(invalid("expected a mapping of ProxyConfig fields".to_owned())),
    };
    for field in ["proxyAdminPort", "statsPort", "concurrency"] {
        if let Some(value) = map.get(field) {
            let value = scalar(value).ok_or_else(|| invalid(format!("{field} must be a number")))?;
            fields.insert(field, value);
        }
    }
    match map.get("proxyMetadata") {
        None | Some(Yaml::Null) => {}
        Some(Yaml::Mapping(meta)) => {
            for (key, field) in [
                ("DNS_CAPTURE", "proxyMetadata.DNS_CAPTURE"),
                ("DNS_PROXY_ADDR", "proxyMetadata.DNS_PROXY_ADDR"),
            ] {
                // ztunnel strips the ISTIO_META_ prefix from metadata keys.
                if let Some(value) = meta.get(key).or_else(|| meta.get(format!("ISTIO_META_{key}"))) {
                    let value =
                        scalar(value).ok_or_else(|| invalid(format!("proxyMetadata.{key} must be a string")))?;
                    fields.insert(field, value);
                }
            }
        }
        Some(_) => return Err(invalid("proxyMetadata must be a mapping".to_owned())),
    }
    Ok(fields)
}

fn non_empty(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err("expected a port number between 1 and 65535".to_owned()),
        Ok(port) => Ok(port),
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let s = s.trim();
    let s = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(s);
    s.parse().map_err(|_| "expected an IPv4 or IPv6 address".to_owned())
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("expected a number of bytes between 0 and {}", u32::MAX))
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("expected a number of bytes between 0 and {}", usize::MAX))
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".to_owned()),
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be more than zero".to_owned()),
        d => Ok(d),
    }
}

/// The shortest certificate lifetime `--cert-ttl` accepts: shorter ones would be refreshed every
/// few seconds, and whole-second certificate times make them expire as they are issued.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(60);

fn cert_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d < MIN_CERT_TTL => Err(format!(
            "must be at least {}s (a certificate lifetime)",
            MIN_CERT_TTL.as_secs()
        )),
        d => Ok(d),
    }
}

/// Parses a Go-style duration (`5s`, `500ms`, `1m30s`, `1.5h`; units `ns`, `us`/`µs`, `ms`, `s`, `m`,
/// `min`, `h`, `d`), or a whole number of seconds as ztunnel also accepts.
fn parse_duration(s: &str) -> Result<Duration, String> {
    const TOO_LARGE: &str = "the duration is too large";
    let s = s.trim();
    if s.is_empty() {
        return Err("expected a duration such as 5s, 500ms or 1m".to_owned());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Duration::from_secs).map_err(|_| TOO_LARGE.to_owned());
    }
    let mut nanos: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        rest = after;
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" | "min" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            "" => return Err(format!("{number:?} has no unit (ns, us, ms, s, m, h, d)")),
            _ => return Err(format!("unknown unit {unit:?} (expected ns, us, ms, s, m, h or d)")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(format!("expected a number before {unit:?}"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| TOO_LARGE.to_owned())?
        };
        // Nanosecond precision needs at most 18 decimal places even for days.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_nanos = if fraction.is_empty() {
            0
        } else {
            let digits: u128 = fraction.parse().map_err(|_| TOO_LARGE.to_owned())?;
            let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(18));
            digits * unit_nanos / scale
        };
        nanos = whole
            .checked_mul(unit_nanos)
            .and_then(|n| n.checked_add(fraction_nanos))
            .and_then(|n| n.checked_add(nanos))
            .ok_or_else(|| TOO_LARGE.to_owned())?;
    }
    let nanos = u64::try_from(nanos).map_err(|_| TOO_LARGE.to_owned())?;
    Ok(Duration::from_nanos(nanos))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("5s"), Duration::from_secs(5));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1m"), Duration::from_secs(60));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("10"), Duration::from_secs(10));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("2us"), Duration::from_micros(2));
        assert_eq!(ok("2µs"), Duration::from_micros(2));
        assert_eq!(ok("1d"), Duration::from_secs(86_400));
        for bad in [
            "",
            "s",
            "5x",
            "-5s",
            "1..5s",
            ".s",
            "5 s",
            "99999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn every_option_is_on_the_command_line() {
        let cmd = command();
        for opt in OPTS {
            assert!(cmd.get_arguments().any(|a| a.get_id() == opt.id()), "{}", opt.flag);
            assert!(opt.flag.starts_with("--"), "{}", opt.flag);
        }
        for listener in Listener::ALL {
            assert_eq!(
                listener.port_opt().default,
                Some(listener.default_port().to_string().as_str())
            );
        }
    }

    #[test]
    fn buffer_budgets_are_read_and_each_lets_one_stream_through() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
        };
        let default = Config::default();
        assert_eq!(default.http2().send_buffer, 400 * 1024);
        assert_eq!(
            default.buffers,
            BufferLimits {
                connection: 64 << 20,
                process: 1 << 30,
                receive: 1 << 30,
            }
        );
        let set = Config::from_args_and_env(
            ["ztunnel", "--hbone-buffer-budget", "33554432"],
            &env(&[
                ("MESHWIRE_HBONE_RECEIVE_BUDGET", "0"),
                ("MESHWIRE_HBONE_CONNECTION_BUFFER", "8388608"),
                ("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "65536"),
            ]),
        )
        .unwrap();
        assert_eq!(set.http2().send_buffer, 65536);
        assert_eq!(set.pool.settings.send_buffer, 65536, "the client side too");
        assert_eq!(
            set.buffers,
            BufferLimits {
                connection: 8 << 20,
                process: 32 << 20,
                receive: 0,
            }
        );
        // A budget under one stream's lease (send buffer + 256 KiB copy buffer) names its origin.
        for (args, vars, named) in [
            (&["--hbone-buffer-budget", "1000"][..], &[][..], "--hbone-buffer-budget"),
            (
                &[][..],
                &[
                    ("MESHWIRE_HBONE_CONNECTION_BUFFER", "327679"),
                    ("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "65536"),
                ][..],
                "environment variable MESHWIRE_HBONE_CONNECTION_BUFFER",
            ),
            (
                &[][..],
                &[("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "100")][..],
                "environment variable MESHWIRE_HBONE_STREAM_SEND_BUFFER",
            ),
            (&["--hbone-buffer-budget=-1"][..], &[][..], "--hbone-buffer-budget"),
            (
                &["--hbone-receive-budget", "16MiB"][..],
                &[][..],
                "--hbone-receive-budget",
            ),
            (
                &[][..],
                &[("MESHWIRE_HBONE_RECEIVE_BUDGET", "-5")][..],
                "environment variable MESHWIRE_HBONE_RECEIVE_BUDGET",
            ),
        ] {
            let vars: Vec<(String, String)> = vars.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
            let lookup = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
            let err = Config::from_args_and_env(std::iter::once("ztunnel").chain(args.iter().copied()), &lookup)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{args:?} {vars:?}: {err}");
        }
    }
}
