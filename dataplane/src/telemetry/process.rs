//! The process's own metrics, read from `/proc/self` at each scrape (nothing is kept between
//! scrapes, nothing runs between them).
//!
//! | metric | type | what |
//! |---|---|---|
//! | `process_open_fds` | gauge | file descriptors open now (the entries of `/proc/self/fd`) |
//! | `process_max_fds` | gauge | the soft `RLIMIT_NOFILE` |
//! | `process_cpu_seconds_total` | counter | user and system CPU time spent |
//! | `process_resident_memory_bytes` | gauge | resident set size |
//! | `process_virtual_memory_bytes` | gauge | virtual memory size |
//! | `process_start_time_seconds` | gauge | when the process started, in seconds since the Unix epoch |
//! | `process_threads` | gauge | threads of the process |
//!
//! With the `jemalloc` feature (the binaries' allocator), [`AllocatorCollector`] adds
//! `meshwire_allocator_bytes{state}`: jemalloc's own figures (`allocated`: bytes the program holds;
//! `active`: the pages of those allocations; `resident`, `mapped`, `retained`, `metadata`), which
//! tell memory a proxy still holds from pages the allocator has not given back yet.
//!
//! The first two are ztunnel's (its `ProcessMetrics` collector exports only them); the others have
//! the names and meanings of the Prometheus client libraries' process collectors (Go's, which
//! istiod's and istio-cni's pages carry), so that the usual alerts (`process_open_fds /
//! process_max_fds`) and panels work. A value that cannot be read is left out of the scrape (the
//! metric is then absent), never guessed.
//!
//! ```
//! use meshwire_dataplane::telemetry::process::ProcessCollector;
//! use prometheus_client::registry::Registry;
//!
//! let mut registry = Registry::default();
//! registry.register_collector(Box::new(ProcessCollector));
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(text.lines().any(|l| l.starts_with("process_open_fds ")));
//! assert!(text.lines().any(|l| l.starts_with("process_max_fds ")));
//! # Ok::<(), std::fmt::Error>(())
//! ```

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The fields of `/proc/<pid>/stat` these metrics need, in the kernel's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// CPU time in user mode, in clock ticks (field 14, `utime`).
    pub utime: u64,
    /// CPU time in kernel mode, in clock ticks (field 15, `stime`).
    pub stime: u64,
    /// Threads (field 20, `num_threads`).
    pub threads: u64,
    /// When the process started, in clock ticks after boot (field 22, `starttime`).
    pub start_ticks: u64,
    /// Virtual memory size in bytes (field 23, `vsize`).
    pub virtual_bytes: u64,
    /// Resident set size in pages (field 24, `rss`).
    pub resident_pages: u64,
}

/// Parses the text of `/proc/<pid>/stat`; `None` when it does not read as one.
///
/// The command name (field 2) is in parentheses and may itself hold spaces and parentheses: the
/// fields are counted from the last `)`.
///
/// ```
/// use meshwire_dataplane::telemetry::process::parse_stat;
///
/// let line = "42 (z tunnel (x)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1234 \
///             104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 17647 0 0 0 17 0 0 0 0 0 0";
/// let stat = parse_stat(line).unwrap();
/// assert_eq!((stat.utime, stat.stime, stat.threads), (250, 50, 7));
/// assert_eq!((stat.start_ticks, stat.virtual_bytes, stat.resident_pages), (1234, 104857600, 2560));
/// assert_eq!(parse_stat("42 (ztunnel) S 1"), None);
/// assert_eq!(parse_stat("garbage"), None);
/// ```
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (_, after_name) = text.rsplit_once(')')?;
    // `fields[0]` is field 3 (`state`): field n is `fields[n - 3]`.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time, in seconds since the Unix epoch, from the text of `/proc/stat` (its `btime`
/// line); `None` without one.
///
/// ```
/// use meshwire_dataplane::telemetry::process::parse_boot_time;
///
/// assert_eq!(parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"), Some(1_700_000_000));
/// assert_eq!(parse_boot_time("cpu  1 2 3\n"), None);
/// ```
pub fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// The file descriptors the process has open now: the entries of `/proc/self/fd`, less the one
/// listing them. `None` if the directory cannot be read.
pub fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let count = u64::try_from(entries.count()).unwrap_or(u64::MAX);
    Some(count.saturating_sub(1))
}

/// The soft limit on the process's file descriptors (`RLIMIT_NOFILE`); `u64::MAX` when unlimited.
pub fn max_fds() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// The collector of the process metrics (see the [module](self) table): register it in the registry
/// the metrics endpoint encodes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCollector;

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + fmt::Debug + Send + Sync + 'static>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        if let Some(open) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                open,
            )?;
        }
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of file descriptors",
            max_fds(),
        )?;
        let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .as_deref()
            .and_then(parse_stat)
        else {
            return Ok(());
        };
        // Both are fixed for the life of the process (the kernel's USER_HZ and page size).
        let ticks = rustix::param::clock_ticks_per_second();
        let page = u64::try_from(rustix::param::page_size()).unwrap_or(4096);
        if ticks > 0 {
            let cpu = ConstCounter::new(stat.utime.saturating_add(stat.stime) as f64 / ticks as f64);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
        }
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            stat.resident_pages.saturating_mul(page),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            stat.virtual_bytes,
        )?;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(parse_boot_time);
        if let (Some(boot), true) = (boot, ticks > 0) {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                boot as f64 + stat.start_ticks as f64 / ticks as f64,
            )?;
        }
        gauge(
            &mut encoder,
            "process_threads",
            "Number of OS threads in the process",
            stat.threads,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_collector_reads_this_process() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let render = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        };
        // Other tests of this process open and close files meanwhile: only a lower bound holds.
        let files: Vec<std::fs::File> = (0..5)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let text = render();
        let open = value(&text, "process_open_fds");
        assert!(
            open >= 8.0,
            "stdin, stdout, stderr and 5 files held, {open} counted\n{text}"
        );
        drop(files);
        assert!(open <= value(&text, "process_max_fds"), "{text}");
        assert!(value(&text, "process_threads") >= 1.0, "{text}");
        assert!(value(&text, "process_resident_memory_bytes") > 0.0, "{text}");
        assert!(
            value(&text, "process_virtual_memory_bytes") >= value(&text, "process_resident_memory_bytes"),
            "{text}"
        );
        assert!(value(&text, "process_cpu_seconds_total") >= 0.0, "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds counter"), "{text}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value(&text, "process_start_time_seconds");
        // Seconds since the epoch (not ticks since boot), and not in the future (the boot time is
        // whole seconds: a second of slack).
        assert!(started > 1.0e9 && started <= now + 1.0, "{started} vs {now}");
    }
}

/// The collector of `meshwire_allocator_bytes{state}` (see the [module](self) documentation):
/// jemalloc's statistics, refreshed at each scrape. Without the `jemalloc` feature it adds nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllocatorCollector;

impl Collector for AllocatorCollector {
    #[cfg(feature = "jemalloc")]
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        use prometheus_client::metrics::family::Family;
        use tikv_jemalloc_ctl::{epoch, stats};

        // The statistics are a snapshot taken when the epoch advances; leave them out if it cannot.
        if epoch::advance().is_err() {
            return Ok(());
        }
        let family = Family::<Vec<(&'static str, &'static str)>, prometheus_client::metrics::gauge::Gauge>::default();
        let figures: [(&str, tikv_jemalloc_ctl::Result<usize>); 6] = [
            ("allocated", stats::allocated::read()),
            ("active", stats::active::read()),
            ("resident", stats::resident::read()),
            ("mapped", stats::mapped::read()),
            ("retained", stats::retained::read()),
            ("metadata", stats::metadata::read()),
        ];
        for (state, value) in figures {
            if let Ok(value) = value {
                family
                    .get_or_create(&vec![("state", state)])
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
        family.encode(encoder.encode_descriptor(
            "meshwire_allocator_bytes",
            "Memory as the allocator (jemalloc) counts it, by state: allocated (held by the program), active, resident, mapped, retained, metadata",
            None,
            family.metric_type(),
        )?)
    }

    #[cfg(not(feature = "jemalloc"))]
    fn encode(&self, _encoder: DescriptorEncoder<'_>) -> fmt::Result {
        Ok(())
    }
}
