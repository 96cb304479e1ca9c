//! How the proxy runs: its threads, shutdown and hand-over, logging, the packet mark of its own
//! connections, and how the io_uring build spreads connections over its cores.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::error::{Error, Origin};
use super::options::Key::{Env, ProxyConfig};
use super::options::{H_RUN, Inputs, Kind, Opt, parse_found};
use super::values::{at_least_one, non_empty, parse_duration, positive_duration};

/// The firewall mark (`SO_MARK`) of the proxy's own upstream connections, which the redirection rules
/// skip so that the proxy's traffic is not captured again (see the [module documentation](super)).
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

pub(super) const WORKER_THREADS: Opt = Opt {
    flag: "--worker-threads",
    value_name: "N|N%",
    keys: &[Env("ZTUNNEL_WORKER_THREADS"), ProxyConfig("concurrency")],
    default: Some("2"),
    help: "Data-path threads, or a percentage of ZTUNNEL_CPU_LIMIT (or of the CPUs available); ztunnel-uring: \
           executors, by default one per CPU of its CPU set",
    ..Opt::new(H_RUN)
};
pub(super) const DRAIN_DEADLINE: Opt = Opt {
    flag: "--drain-deadline",
    value_name: "DURATION",
    keys: &[Env("CONNECTION_TERMINATION_DEADLINE")],
    help: "Time draining connections get at shutdown",
    default_note: Some("5s, or from TERMINATION_GRACE_PERIOD_SECONDS"),
    ..Opt::new(H_RUN)
};
pub(super) const HANDOVER: Opt = Opt {
    flag: "--handover",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_HANDOVER")],
    help: "Take over from an instance running on the same ports: share its data listeners at once, and bind \
           the readiness, admin and metrics listeners as soon as it releases them (at the end of its drain), \
           waiting up to DURATION",
    default_note: Some("none: a port in use fails the start"),
    ..Opt::new(H_RUN)
};
pub(super) const LOG_FORMAT: Opt = Opt {
    flag: "--log-format",
    value_name: "text|json",
    keys: &[Env("LOG_FORMAT")],
    default: Some("text"),
    help: "Format of log and access log lines",
    ..Opt::new(H_RUN)
};
pub(super) const LOG_LEVEL: Opt = Opt {
    flag: "--log-level",
    value_name: "FILTER",
    keys: &[Env("RUST_LOG")],
    default: Some("info"),
    help: "Log filter (tracing EnvFilter syntax: info, meshwire=debug,h2=warn)",
    ..Opt::new(H_RUN)
};

pub(super) const PACKET_MARK: Opt = Opt {
    flag: "--packet-mark",
    value_name: "MARK|none",
    keys: &[Env("PACKET_MARK")],
    default: Some("auto"),
    help: "Firewall mark (SO_MARK) of the proxy's upstream connections, which redirection rules skip; \
           auto: 0x539 if the proxy may set marks (CAP_NET_ADMIN), else none with a warning; 0 or none: off",
    ..Opt::new(H_RUN)
};

pub(super) const ORIGINAL_SOURCE: Opt = Opt {
    flag: "--original-source",
    value_name: "BOOL",
    keys: &[Env("ENABLE_ORIG_SRC")],
    kind: Kind::Bool,
    help: "Connect to destination workloads from the client's address (IP_TRANSPARENT, needs CAP_NET_ADMIN), \
           so that they see who called; the replies must be routed back to the proxy (istio-cni's rules do, \
           in a pod's namespace)",
    default_note: Some("on in in-pod mode, off otherwise"),
    ..Opt::new(H_RUN)
};

pub(super) const CONNECTION_BALANCE: Opt = Opt {
    flag: "--connection-balance",
    value_name: "hash|round-robin",
    keys: &[Env("MESHWIRE_CONNECTION_BALANCE")],
    default: Some("round-robin"),
    help: "ztunnel-uring: how new connections are spread over the cores: in turn by an eBPF program (needs \
           CAP_BPF and Linux 5.12, else the hash with a log line), or by the kernel's SO_REUSEPORT hash",
    ..Opt::new(H_RUN)
};

/// The scheduling priority of the thread that applies istiod's pushes (decoding, converting, building
/// and publishing the new state, re-checking connections).
///
/// ```
/// use meshwire_dataplane::config::XdsPriority;
/// assert_eq!("idle".parse::<XdsPriority>(), Ok(XdsPriority::Idle));
/// assert_eq!(" Normal ".parse::<XdsPriority>(), Ok(XdsPriority::Normal));
/// assert!("high".parse::<XdsPriority>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdsPriority {
    /// Linux's `SCHED_IDLE`: the thread runs on CPU time the data path leaves, and a data-path
    /// thread that wakes up preempts it at once, so a large push does not delay traffic. On a node
    /// whose CPUs the data path keeps fully busy, pushes apply slowly (the thread keeps a small share).
    #[default]
    Idle,
    /// The default policy, as every other thread: a push takes CPUs from the data path while it is
    /// applied, and is applied as fast under full load.
    Normal,
}

impl XdsPriority {
    /// The name, as parsed.
    pub fn as_str(self) -> &'static str {
        match self {
            XdsPriority::Idle => "idle",
            XdsPriority::Normal => "normal",
        }
    }
}

impl FromStr for XdsPriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "idle" => Ok(XdsPriority::Idle),
            "normal" => Ok(XdsPriority::Normal),
            _ => Err("expected idle or normal".to_owned()),
        }
    }
}

pub(super) const XDS_PRIORITY: Opt = Opt {
    flag: "--xds-priority",
    value_name: "idle|normal",
    keys: &[Env("MESHWIRE_XDS_PRIORITY")],
    default: Some("idle"),
    help: "Scheduling of the thread that applies istiod's pushes: idle (SCHED_IDLE: a push never takes a CPU a \
           data-path thread wants; under full CPU load pushes apply slowly) or normal (the default policy)",
    ..Opt::new(H_RUN)
};

/// The share of one CPU the thread that applies istiod's pushes may take while it applies one, once
/// the proxy serves. Below 1, a large push runs in slices of 1 ms of the thread's CPU time with
/// rests between them, so that the CPU halts the rest of the time; 1 (the default) applies a push
/// at once. The first push is never paced. Pacing keeps a storm of large pushes from keeping a CPU
/// busy, at the cost of slower convergence and more CPU per push (see README).
///
/// ```
/// use meshwire_dataplane::config::XdsCpuShare;
/// assert_eq!("0.25".parse::<XdsCpuShare>().map(XdsCpuShare::get), Ok(0.25));
/// assert_eq!("1".parse::<XdsCpuShare>().map(XdsCpuShare::get), Ok(1.0));
/// assert!("0".parse::<XdsCpuShare>().is_err());
/// assert!("1.5".parse::<XdsCpuShare>().is_err());
/// assert!("a quarter".parse::<XdsCpuShare>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XdsCpuShare(f64);

impl XdsCpuShare {
    /// The smallest share accepted: a push applies at most 20 times slower than at once.
    pub const MIN: f64 = 0.05;

    /// The share, in [`XdsCpuShare::MIN`, 1].
    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for XdsCpuShare {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let share: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("expected a share of one CPU between {} and 1, such as 0.25", Self::MIN))?;
        if !(Self::MIN..=1.0).contains(&share) {
            return Err(format!("{share} is not between {} and 1", Self::MIN));
        }
        Ok(XdsCpuShare(share))
    }
}

pub(super) const XDS_CPU_SHARE: Opt = Opt {
    flag: "--xds-cpu-share",
    value_name: "SHARE",
    keys: &[Env("MESHWIRE_XDS_CPU_SHARE")],
    default: Some("1"),
    help: "Share of one CPU the thread that applies istiod's pushes takes while it applies one, once the proxy \
           serves (0.05 to 1): below 1, a large push runs in slices of 1 ms with rests between them, so that a \
           storm of pushes leaves the CPU idle most of the time (slower to apply, more CPU per push); 1 applies a \
           push at once",
    ..Opt::new(H_RUN)
};

impl Inputs<'_> {
    pub(super) fn xds_priority(&self) -> Result<XdsPriority, Error> {
        Ok(self.required(&XDS_PRIORITY, str::parse)?.value)
    }

    pub(super) fn xds_cpu_share(&self) -> Result<XdsCpuShare, Error> {
        Ok(self.required(&XDS_CPU_SHARE, str::parse)?.value)
    }

    pub(super) fn drain_deadline(&self) -> Result<Duration, Error> {
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
    pub(super) fn worker_threads(&self) -> Result<(usize, bool), Error> {
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

    pub(super) fn handover(&self) -> Result<Option<Duration>, Error> {
        Ok(self.get(&HANDOVER, positive_duration)?.map(|f| f.value))
    }

    pub(super) fn log_format(&self) -> Result<LogFormat, Error> {
        Ok(self.required(&LOG_FORMAT, |s| s.trim().parse())?.value)
    }

    pub(super) fn log_level(&self) -> Result<String, Error> {
        Ok(self.required(&LOG_LEVEL, non_empty)?.value)
    }

    pub(super) fn packet_mark(&self) -> Result<PacketMark, Error> {
        Ok(self.required(&PACKET_MARK, str::parse)?.value)
    }

    pub(super) fn original_source(&self) -> Result<Option<bool>, Error> {
        Ok(self
            .get(&ORIGINAL_SOURCE, super::values::parse_bool)?
            .map(|found| found.value))
    }

    pub(super) fn connection_balance(&self) -> Result<ConnectionBalance, Error> {
        Ok(self.required(&CONNECTION_BALANCE, str::parse)?.value)
    }
}

enum Threads {
    Count(usize),
    Percent(f64),
}
