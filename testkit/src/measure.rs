//! The measuring harness of the benchmark programs: CPU time of a process or a thread from
//! `/proc`, the kernel's release, summary statistics across rounds, the duration argument of
//! `cargo bench`, the JSON file a benchmark writes into the target directory, and TLS handshakes
//! driven in memory.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// CPU time in seconds, split into user and system (kernel) time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    /// Seconds in user mode.
    pub user: f64,
    /// Seconds in the kernel on the process's behalf.
    pub sys: f64,
}

impl Cpu {
    /// User plus system seconds.
    pub fn total(self) -> f64 {
        self.user + self.sys
    }

    /// The CPU time used between `earlier` and `self`.
    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }
}

/// Clock ticks per second of the CPU times in `/proc/.../stat` (`sysconf(_SC_CLK_TCK)`, 100 on
/// Linux): their resolution.
pub fn clock_ticks() -> f64 {
    rustix::param::clock_ticks_per_second().max(1) as f64
}

/// Field `n` (numbered from 1, as in proc(5), `n >= 3`) of the text of a `/proc/.../stat` file.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// The CPU time (fields 14 and 15, utime and stime) of the text of a `/proc/.../stat` file.
fn parse_stat(stat: &str) -> Option<Cpu> {
    let utime: u64 = stat_field(stat, 14)?.parse().ok()?;
    let stime: u64 = stat_field(stat, 15)?.parse().ok()?;
    let ticks = clock_ticks();
    Some(Cpu {
        user: utime as f64 / ticks,
        sys: stime as f64 / ticks,
    })
}

/// The CPU time (user, system; every thread, live or exited, for a process) counted in the
/// `/proc/.../stat` file at `path`. The error names the file.
pub fn stat_cpu(path: impl AsRef<Path>) -> io::Result<Cpu> {
    let path = path.as_ref();
    let stat = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
    parse_stat(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: fields 14 and 15 (utime, stime) missing or not numbers",
                path.display()
            ),
        )
    })
}

/// Linux's `SCHED_OTHER` (the default policy), as [`thread_policy`] reads it.
pub const SCHED_OTHER: u32 = 0;
/// Linux's `SCHED_IDLE`, as [`thread_policy`] reads it.
pub const SCHED_IDLE: u32 = 5;

/// The scheduling policy (field 41 of `/proc/<pid>/task/<tid>/stat`) of the thread of process `pid`
/// named `name`; `None` when it has no such thread (or `/proc` cannot be read).
pub fn thread_policy(pid: u32, name: &str) -> Option<u32> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            return stat_field(&stat, 41)?.parse().ok();
        }
    }
    None
}

/// The CPU time of process `pid` so far (`/proc/<pid>/stat`).
pub fn pid_cpu(pid: u32) -> io::Result<Cpu> {
    stat_cpu(format!("/proc/{pid}/stat"))
}

/// The CPU time of this process so far, or `None` where `/proc` is unavailable.
pub fn process_cpu() -> Option<Cpu> {
    stat_cpu("/proc/self/stat").ok()
}

/// The CPU time of thread `tid` of this process so far, or `None` where unavailable.
pub fn thread_cpu(tid: u32) -> Option<Cpu> {
    stat_cpu(format!("/proc/self/task/{tid}/stat")).ok()
}

/// The kernel thread id of the calling thread (`/proc/thread-self` -> `<pid>/task/<tid>`).
pub fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// The kernel's release (`/proc/sys/kernel/osrelease`), or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The median of the finite `values` (the mean of the middle two for an even count); `None` when
/// there are none.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Median, min and max of a statistic across rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

/// The summary of one value per round; `None` unless every round has the value and it is finite.
pub fn summarize(values: impl IntoIterator<Item = Option<f64>>) -> Option<Summary> {
    let v: Vec<f64> = values.into_iter().collect::<Option<Vec<f64>>>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some(Summary {
        median: median(v.iter().copied())?,
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

/// A statistic as the JSON files record it: `unit`, `median`, `min`, `max` (null without a
/// summary) and `per_round` (null where a round has no finite value).
pub fn json_summary(unit: &str, summary: Option<Summary>, per_round: &[Option<f64>]) -> serde_json::Value {
    let finite = |x: Option<f64>| x.filter(|x| x.is_finite());
    serde_json::json!({
        "unit": unit,
        "median": summary.map(|s| s.median),
        "min": summary.map(|s| s.min),
        "max": summary.map(|s| s.max),
        "per_round": per_round.iter().map(|&x| finite(x)).collect::<Vec<_>>(),
    })
}

/// The seconds per round of a benchmark program: the first command-line argument that is a
/// number (`cargo bench` passes `--bench` before it), else `BENCH_SECONDS`, else `default`.
/// Anything but a positive number is an error.
pub fn seconds_argument(default: f64) -> Result<f64, String> {
    let arg = std::env::args().skip(1).find_map(|a| a.parse::<f64>().ok());
    let secs = match arg {
        Some(s) => s,
        None => match std::env::var("BENCH_SECONDS") {
            Ok(v) => v
                .trim()
                .parse::<f64>()
                .map_err(|e| format!("BENCH_SECONDS={v:?}: {e}"))?,
            Err(_) => default,
        },
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!(
            "the duration per round must be a positive number of seconds, not {secs}"
        ));
    }
    Ok(secs)
}

/// `target/<file_name>` in the workspace target directory: `$CARGO_TARGET_DIR` when set, else the
/// `target` directory the running program was built in.
pub fn json_path(file_name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join(file_name);
    }
    // A benchmark runs as <target>/<profile>/deps/<name>-<hash> (or <target>/<triple>/...).
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe.ancestors().find(|p| p.file_name().is_some_and(|n| n == "target"))
    {
        return target.join(file_name);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(file_name)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `json`, pretty-printed, to [`json_path`]`(file_name)` and says so on standard output
/// after a blank line.
pub fn write_results(file_name: &str, json: &serde_json::Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(json)? + "\n";
    let path = json_path(file_name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, text)?;
    println!();
    println!("results written to {}", path.display());
    Ok(())
}

/// Writes the TLS records `from` has to send into `buf`, emptied first: one flight of a handshake
/// driven in memory.
pub fn tls_write<D>(from: &mut rustls::ConnectionCommon<D>, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf)?;
    }
    Ok(())
}

/// Feeds the TLS `records` of a flight to `to`, which processes them.
pub fn tls_read<D>(to: &mut rustls::ConnectionCommon<D>, mut records: &[u8]) -> io::Result<()> {
    while !records.is_empty() {
        to.read_tls(&mut records)?;
        to.process_new_packets().map_err(io::Error::other)?;
    }
    Ok(())
}

/// Drives a handshake between `client` and `server` in memory, one flight each way at a time, until
/// neither is handshaking any more or 16 round trips have gone by.
pub fn tls_handshake<C, S>(
    client: &mut rustls::ConnectionCommon<C>,
    server: &mut rustls::ConnectionCommon<S>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    for _ in 0..16 {
        if !(client.is_handshaking() || server.is_handshaking()) {
            break;
        }
        tls_write(client, &mut buf)?;
        tls_read(server, &buf)?;
        tls_write(server, &mut buf)?;
        tls_read(client, &buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cpu_fields_after_a_command_name_with_spaces() {
        let ticks = clock_ticks();
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        let cpu = parse_stat(stat).unwrap();
        assert_eq!(cpu.user, 250.0 / ticks);
        assert_eq!(cpu.sys, 50.0 / ticks);
        assert!(parse_stat("42 (x) S 1 2").is_none());
    }

    #[test]
    fn reads_own_cpu_time() {
        let before = process_cpu().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(process_cpu().unwrap().since(before).total() > 0.0);
        assert!(thread_cpu(current_tid().unwrap()).is_some());
    }

    #[test]
    fn summaries_need_every_round() {
        assert_eq!(
            summarize([Some(3.0), Some(1.0), Some(2.0), Some(10.0)]),
            Some(Summary {
                median: 2.5,
                min: 1.0,
                max: 10.0
            })
        );
        assert_eq!(summarize([Some(1.0), None]), None);
        assert_eq!(summarize([Some(1.0), Some(f64::NAN)]), None);
        assert_eq!(summarize([]), None);
        assert_eq!(median([1.0, f64::INFINITY, 3.0]), Some(2.0));
    }
}
