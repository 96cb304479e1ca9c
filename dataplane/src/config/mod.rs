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
//! | `--inpod BOOL` | `INPOD_ENABLED` | `false` |
//! | `--inpod-socket PATH` | `INPOD_UDS` | `/var/run/ztunnel/ztunnel.sock` |
//! | `--inpod-port-reuse BOOL` | `INPOD_PORT_REUSE` | `true` |
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
//! | `--xds-address` | `XDS_ADDRESS` | none: the local configuration only |
//! | `--xds-root-ca` | `XDS_ROOT_CA` | `/var/run/secrets/istio/root-cert.pem` |
//! | `--alt-xds-hostname` | `ALT_XDS_HOSTNAME` | the host of the xDS address |
//! | `--ca-address` | `CA_ADDRESS` | the xDS address |
//! | `--ca-root-ca` | `CA_ROOT_CA` | `/var/run/secrets/istio/root-cert.pem` |
//! | `--alt-ca-hostname` | `ALT_CA_HOSTNAME` | the host of the CA address |
//! | `--auth-token` | `AUTH_TOKEN` | `/var/run/secrets/tokens/istio-token` |
//! | `--pod-name` | `POD_NAME` | none |
//! | `--pod-namespace` | `POD_NAMESPACE` | none |
//! | `--service-account` | `SERVICE_ACCOUNT` | none |
//! | `--bind-address` | `MESHWIRE_BIND_ADDRESS` | `::`, or `0.0.0.0` if `IPV6_ENABLED=false` |
//! | `--ipv6` | `IPV6_ENABLED` | `true` |
//! | `--inbound-port` (HBONE) | `MESHWIRE_INBOUND_PORT` | 15008 |
//! | `--inbound-plaintext-port` | `MESHWIRE_INBOUND_PLAINTEXT_PORT` | 15006 |
//! | `--outbound-port` | `MESHWIRE_OUTBOUND_PORT` | 15001 |
//! | `--socks5 BOOL` | `UNSTABLE_ENABLE_SOCKS5` | `false` |
//! | `--socks5-port` | `MESHWIRE_SOCKS5_PORT` | 15080 |
//! | `--socks5-address` | `MESHWIRE_SOCKS5_ADDRESS` | 127.0.0.1 |
//! | `--dns-proxy BOOL` | `ISTIO_META_DNS_CAPTURE`, `PROXY_CONFIG` `proxyMetadata.DNS_CAPTURE` | `true` |
//! | `--dns-port` | `MESHWIRE_DNS_PORT`; `ISTIO_META_DNS_PROXY_ADDR` | 15053 |
//! | `--dns-address` | `MESHWIRE_DNS_ADDRESS`; `ISTIO_META_DNS_PROXY_ADDR` | 127.0.0.1 |
//! | `--dns-resolv-conf` | `MESHWIRE_DNS_RESOLV_CONF` | `/etc/resolv.conf` |
//! | `--dns-upstream-timeout` | `MESHWIRE_DNS_UPSTREAM_TIMEOUT` | `2s` |
//! | `--dns-forward-limit` | `MESHWIRE_DNS_FORWARD_LIMIT` | 1024 |
//! | `--dns-tcp-connections` | `MESHWIRE_DNS_TCP_CONNECTIONS` | 256 |
//! | `--dns-preferred-namespace` | `PREFERED_SERVICE_NAMESPACE` | none |
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
//! | `--pool-surplus-release-timeout` | `MESHWIRE_POOL_SURPLUS_RELEASE_TIMEOUT` | `5s` |
//! | `--pool-response-timeout` | `MESHWIRE_POOL_RESPONSE_TIMEOUT` | `3s` |
//! | `--pool-probe-timeout` | `MESHWIRE_POOL_PROBE_TIMEOUT` | `2s` |
//! | `--worker-threads N\|N%` | `ZTUNNEL_WORKER_THREADS`, `PROXY_CONFIG` `concurrency` | 2 (`ztunnel-uring`: one per CPU) |
//! | `--drain-deadline` | `CONNECTION_TERMINATION_DEADLINE`; from `TERMINATION_GRACE_PERIOD_SECONDS` | `5s` |
//! | `--handover DURATION` | `MESHWIRE_HANDOVER` | none: the ports must be free |
//! | `--log-format text\|json` | `LOG_FORMAT` | `text` |
//! | `--log-level` | `RUST_LOG` | `info` |
//! | `--packet-mark MARK\|none` | `PACKET_MARK` | `auto`: 0x539 where permitted |
//! | `--original-source BOOL` | `ENABLE_ORIG_SRC` | on in in-pod mode, off otherwise |
//! | `--connection-balance hash\|round-robin` | `MESHWIRE_CONNECTION_BALANCE` | `round-robin` (`ztunnel-uring` only) |
//! | `--xds-priority idle\|normal` | `MESHWIRE_XDS_PRIORITY` | `idle` |
//! | `--xds-cpu-share SHARE` | `MESHWIRE_XDS_CPU_SHARE` | `1`: at once |
//!
//! As in ztunnel: `PROXY_CONFIG` is Istio's ProxyConfig as YAML or JSON, of which `proxyAdminPort`,
//! `statsPort`, `concurrency` and `proxyMetadata` (`DNS_CAPTURE`, `DNS_PROXY_ADDR`) are read;
//! `ISTIO_META_<KEY>` variables override `proxyMetadata`; a percentage of worker threads is taken of
//! `ZTUNNEL_CPU_LIMIT` (or of the CPUs available); without `CONNECTION_TERMINATION_DEADLINE`, a
//! `TERMINATION_GRACE_PERIOD_SECONDS` of more than 10 gives a drain deadline 5 s shorter, of 10 or less
//! one 1 s shorter (at least 1 s), so that connections are closed before Kubernetes kills the process.
//! `FAKE_CA=true` asks for the local CA even when istiod is configured. `ISTIO_META_<KEY>` and
//! `ISTIO_METAJSON_<KEY>` become the metadata of the proxy's `Node` in xDS, `XDS_HEADER_<NAME>` and
//! `CA_HEADER_<NAME>` headers of every request to istiod (see [`IstioConfig`]). Durations are Go-style (`500ms`,
//! `1m30s`, `1.5h`, units `ns` `us` `ms` `s` `m` `h` `d`) or a number of seconds.
//!
//! Differences from ztunnel: every port can be moved; the SOCKS5 listener (off unless
//! `UNSTABLE_ENABLE_SOCKS5=true` or `--socks5 true`, as in ztunnel) listens on loopback only; without
//! `XDS_ADDRESS` the proxy runs
//! on its local configuration and its local CA (ztunnel defaults to istiod's address), so that a run
//! outside a cluster needs no setup; certificates can also come from files. ztunnel variables
//! meshwire does not implement (keepalives, on-demand xDS) are listed in [`UNSUPPORTED_ZTUNNEL_ENV`]; those
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
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Command;
use clap::error::ErrorKind;
use meshwire_hbone::Settings;
use meshwire_hbone::pool::PoolConfig;
use meshwire_identity::id::TrustDomain;

use crate::state::LocalProxy;

// One module per group of options: each holds its options' flags, variables, defaults and help, the
// types they set and the code that reads them. The flags table above is checked against them.
mod command;
mod error;
mod hbone;
mod identity;
mod istio;
mod listeners;
mod mode;
mod options;
mod runtime;
mod values;
mod ztunnel_view;

pub use error::{Error, Origin};
pub use hbone::BufferLimits;
pub use identity::{CertificateSource, MIN_CERT_TTL};
pub use istio::{
    AuthToken, CA_HEADER_PREFIX, ControlPlane, DEFAULT_AUTH_TOKEN, DEFAULT_ROOT_CA, IstioConfig, META_JSON_PREFIX,
    META_PREFIX, Roots, XDS_HEADER_PREFIX, check_address,
};
pub use listeners::{DnsOptions, Listener, Listeners};
pub use mode::{InpodConfig, LocalConfigSource, ProxyMode, WorkloadInfo};
pub use runtime::{ConnectionBalance, LogFormat, PacketMark, XdsCpuShare, XdsPriority};
pub use ztunnel_view::ztunnel_config;

use command::command;
use options::{Inputs, program_name};

/// ztunnel environment variables that meshwire recognises but does not implement. Those that are set
/// are listed in [`Config::ignored_env`].
pub const UNSUPPORTED_ZTUNNEL_ENV: &[&str] = &[
    "XDS_ON_DEMAND",
    "ENABLE_PROXY",
    "TRANSPARENT_NETWORK_POLICIES",
    "LOCALHOST_APP_TUNNEL",
    "KEEPALIVE_TIME",
    "KEEPALIVE_INTERVAL",
    "KEEPALIVE_RETRIES",
    "KEEPALIVE_ENABLED",
    "USER_TIMEOUT_ENABLED",
];

/// Variables the proxy reads besides those of its options (`--help` lists those).
const OTHER_ENV: &[&str] = &[
    "LOCAL_XDS",
    "FAKE_CA",
    "PROXY_CONFIG",
    "TERMINATION_GRACE_PERIOD_SECONDS",
    "ZTUNNEL_CPU_LIMIT",
];

/// Whether the proxy reads the environment variable `name`: a variable of one of its options, one
/// of the few others it reads ([`Config::from_process`]), or one of the families known by their
/// prefix (`ISTIO_META_*`, `ISTIO_METAJSON_*`, `XDS_HEADER_*`, `CA_HEADER_*`). Deployment manifests
/// are checked against it, so that a variable they set is never silently ignored.
///
/// ```
/// use meshwire_dataplane::config::reads_env;
///
/// assert!(reads_env("XDS_ADDRESS"));
/// assert!(reads_env("ISTIO_META_CLUSTER_ID"));
/// assert!(!reads_env("XDS_ADRESS"));
/// ```
pub fn reads_env(name: &str) -> bool {
    let option = command::OPTS
        .iter()
        .flat_map(|opt| opt.keys)
        .any(|key| matches!(key, options::Key::Env(n) if *n == name));
    let prefixed = [META_PREFIX, META_JSON_PREFIX, XDS_HEADER_PREFIX, CA_HEADER_PREFIX]
        .iter()
        .any(|prefix| name.len() > prefix.len() && name.starts_with(prefix));
    option || prefixed || OTHER_ENV.contains(&name)
}

/// The configuration of a running proxy. Built and validated by [`Config::from_args_and_env`]; then
/// immutable, shared as `Arc<Config>`.
///
/// [`Config::default`] is what an empty command line and an empty environment give.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Whom the proxy serves.
    pub mode: ProxyMode,
    /// In-pod mode (shared mode only): `Some` when istio-cni hands the pods over.
    pub inpod: Option<InpodConfig>,
    /// The local configuration file (workloads, services, policies), if any.
    pub local_config: Option<LocalConfigSource>,
    /// Where the proxy keeps state that must outlive a restart (the local CA).
    pub state_dir: PathBuf,
    /// Where workload certificates come from.
    pub certificates: CertificateSource,
    /// istiod: its xDS service (when set, the source of workloads and policies), the token and the
    /// proxy's own names.
    pub istio: IstioConfig,
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
    /// The DNS proxy's settings (its address is [`Listeners::dns`]).
    pub dns: DnsOptions,
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
    /// Whether connections to destination workloads leave from the client's address
    /// (`ENABLE_ORIG_SRC`); `None` when not set: see
    /// [`ProxyContext::original_source`](crate::app::ProxyContext::original_source).
    pub original_source: Option<bool>,
    /// How the io_uring build spreads new connections over its cores (the tokio build has one
    /// listening socket per port and ignores it).
    pub connection_balance: ConnectionBalance,
    /// The scheduling priority of the thread that applies istiod's pushes.
    pub xds_priority: XdsPriority,
    /// The share of one CPU a push may take while it is applied (see [`XdsCpuShare`]).
    pub xds_cpu_share: XdsCpuShare,
    /// ztunnel variables that were set but that meshwire does not implement (from
    /// [`UNSUPPORTED_ZTUNNEL_ENV`]), for the binary to warn about.
    pub ignored_env: Vec<&'static str>,
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

/// The build, as ztunnel describes it: `ztunnel version` prints its [`Display`](std::fmt::Display)
/// (`version.BuildInfo{Version:"..", ...}`), `/config_dump` shows it under `version` (camelCase
/// keys): the crate's version, the git revision given at build time (`MESHWIRE_GIT_REVISION`, else
/// `unknown`), the compiler's version and the build profile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildInfo {
    /// The crate's version.
    pub version: String,
    /// The git revision given at build time, or `unknown`.
    pub git_revision: String,
    /// The compiler's version.
    pub rust_version: String,
    /// `debug` or `release`.
    pub build_profile: String,
    /// `Clean` with a known revision, else `Unknown`.
    pub build_status: String,
    /// The version again (meshwire's tags are its versions).
    pub git_tag: String,
}

impl BuildInfo {
    /// This build's.
    pub fn current() -> Self {
        let revision = option_env!("MESHWIRE_GIT_REVISION").unwrap_or("unknown");
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            git_revision: revision.to_owned(),
            rust_version: env!("MESHWIRE_RUSTC_VERSION").to_owned(),
            build_profile: if cfg!(debug_assertions) { "debug" } else { "release" }.to_owned(),
            build_status: if revision == "unknown" { "Unknown" } else { "Clean" }.to_owned(),
            git_tag: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

impl std::fmt::Display for BuildInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "version.BuildInfo{{Version:\"{}\", GitRevision:\"{}\", RustVersion:\"{}\", \
             BuildProfile:\"{}\", BuildStatus:\"{}\", GitTag:\"{}\"}}",
            self.version, self.git_revision, self.rust_version, self.build_profile, self.build_status, self.git_tag
        )
    }
}

/// [`BuildInfo::current`] as `ztunnel version` prints it.
///
/// ```
/// let info = meshwire_dataplane::config::build_info();
/// assert!(info.starts_with(&format!("version.BuildInfo{{Version:\"{}\", GitRevision:\"", env!("CARGO_PKG_VERSION"))));
/// ```
pub fn build_info() -> String {
    BuildInfo::current().to_string()
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
        Self::read(args.into_iter().map(Into::into).collect(), env, Vec::new())
    }

    /// [`Config::from_args_and_env`] with the environment given as every variable's name and value,
    /// which also reads the families of variables known by their prefix (`ISTIO_META_*`,
    /// `ISTIO_METAJSON_*`, `XDS_HEADER_*`, `CA_HEADER_*`).
    pub fn from_args_and_vars<I, T, V>(args: I, vars: V) -> Result<Config, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
        V: IntoIterator<Item = (String, String)>,
    {
        let vars: std::collections::HashMap<String, String> = vars.into_iter().collect();
        let names = vars.keys().cloned().collect();
        let env = |name: &str| vars.get(name).cloned();
        Self::read(args.into_iter().map(Into::into).collect(), &env, names)
    }

    /// Parses the command line, then reads and validates every option; `names` are the variables'
    /// names where known.
    fn read(args: Vec<OsString>, env: &dyn Fn(&str) -> Option<String>, names: Vec<String>) -> Result<Config, Error> {
        let name = program_name(args.first());
        let matches = command()
            .name(name)
            .try_get_matches_from(args)
            .map_err(|err| Error::Cli {
                kind: err.kind(),
                message: err.render().to_string(),
            })?;
        if matches.get_one::<String>("command").map(String::as_str) == Some("version") {
            // ztunnel's `version` line, for scripts that read it; `--version` names meshwire.
            return Err(Error::Cli {
                kind: ErrorKind::DisplayVersion,
                message: format!("{}\n", build_info()),
            });
        }
        Inputs::new(matches, env, names)?.config()
    }

    /// [`Config::from_args_and_vars`] with the process's arguments and environment (variables whose
    /// name or value is not UTF-8 are left out).
    pub fn from_process() -> Result<Config, Error> {
        let vars = std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Self::from_args_and_vars(std::env::args_os(), vars)
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
    /// ports non-zero and distinct, budgets that let a stream through, worker threads and pool streams
    /// at least 1 (HTTP/2 settings are valid by construction).
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_with(&|l| Origin::Flag(l.port_flag()), hbone::flag_origins())
    }

    /// `buffers` is where the stream send buffer, the connection buffer and the process budget came
    /// from.
    fn validate_with(&self, port_origin: &dyn Fn(Listener) -> Origin, buffers: [Origin; 3]) -> Result<(), Error> {
        self.listeners.check_ports(port_origin)?;
        hbone::check(self, buffers)?;
        for (value, flag) in [
            (self.worker_threads, runtime::WORKER_THREADS.flag),
            (self.pool.max_streams_per_connection, hbone::POOL_MAX_STREAMS.flag),
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

impl Inputs<'_> {
    /// Reads every option, in an order that decides which of several bad values is reported, and
    /// validates the whole.
    fn config(&self) -> Result<Config, Error> {
        let trust_domain = self.trust_domain()?;
        let mode = self.mode(&trust_domain)?;
        let inpod = self.inpod(&mode)?;
        let state_dir = self.state_dir()?;
        let xds = self.xds()?;
        let local_config = self.local_config()?;
        if xds.is_some() && local_config.is_some() {
            return Err(Error::Conflict {
                first: Origin::Env("XDS_ADDRESS"),
                second: self.local_config_origin(),
                reason: "the proxy takes its workloads and policies from istiod or from a local configuration, not both",
            });
        }
        let certificates = self.certificates(&state_dir, xds.as_ref())?;
        let istio = self.istio(xds)?;
        let cert_ttl = self.cert_ttl()?;
        let hbone = self.hbone()?;
        let (listeners, port_origins) = self.listeners()?;
        let worker_threads = self.worker_threads()?;
        let config = Config {
            mode,
            inpod,
            local_config,
            state_dir,
            certificates,
            istio,
            trust_domain,
            cluster_id: self.cluster_id()?,
            cluster_domain: self.cluster_domain()?,
            network: self.network()?,
            instance_ip: self.instance_ip()?,
            listeners,
            dns: self.dns_options()?,
            pool: hbone.pool,
            buffers: hbone.buffers,
            drain_deadline: self.drain_deadline()?,
            handover: self.handover()?,
            worker_threads: worker_threads.0,
            worker_threads_given: worker_threads.1,
            cert_ttl,
            log_format: self.log_format()?,
            log_level: self.log_level()?,
            packet_mark: self.packet_mark()?,
            original_source: self.original_source()?,
            connection_balance: self.connection_balance()?,
            xds_priority: self.xds_priority()?,
            xds_cpu_share: self.xds_cpu_share()?,
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
        config.validate_with(&port_origin, hbone.buffer_origins)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::command::OPTS;
    use super::options::Key;

    /// The flags table of the module documentation, the operator's reference, has a row for every
    /// option, in order, naming its variables and its default.
    #[test]
    fn the_flags_table_matches_the_options() {
        let rows: Vec<&str> = include_str!("mod.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("//! | `--"))
            .collect();
        assert_eq!(rows.len(), OPTS.len(), "one row per option");
        for (row, opt) in rows.iter().zip(OPTS) {
            let flag = opt.id();
            assert!(
                row.starts_with(&format!("{flag}`")) || row.starts_with(&format!("{flag} ")),
                "the row of {} is --{row}",
                opt.flag
            );
            for key in opt.keys {
                let (Key::Env(name) | Key::ProxyConfig(name)) = key;
                assert!(
                    row.contains(&format!("`{name}`")),
                    "{name} is missing in the row of {}",
                    opt.flag
                );
            }
            if let Some(default) = opt.default {
                let default_cell = row
                    .trim_end()
                    .trim_end_matches('|')
                    .rsplit('|')
                    .next()
                    .unwrap_or_default();
                assert!(
                    default_cell.contains(default),
                    "{default} is missing in the row of {}",
                    opt.flag
                );
            }
        }
    }
}
