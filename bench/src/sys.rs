//! What the bench reads from the kernel: CPU time and resident memory of a process (`/proc`), the
//! HBONE connections a proxy holds (`/proc/net/tcp`), the machine's description, and the open-file limit.

use std::net::SocketAddrV4;

use anyhow::{Context, bail};
use meshwire_testkit::measure;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// CPU seconds (user + system, every thread, live or exited) used so far by process `pid`, from
/// `/proc/<pid>/stat` fields 14 and 15.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(measure::pid_cpu(pid)?.total())
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("/proc/{pid}/status has no VmRSS (the process has exited?)"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("/proc/{pid}/status: bad VmRSS line {line:?}"))?;
    Ok(kib * 1024)
}

/// Established TCP connections whose local end is `local` (the accepted side of a listener), from
/// `/proc/<pid>/net/tcp` (the connections of the network namespace of process `pid`).
pub(crate) fn established_to(pid: u32, local: SocketAddrV4) -> anyhow::Result<usize> {
    // The table of the process's own network namespace (the server node's, with veth).
    let path = format!("/proc/{pid}/net/tcp");
    let table = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Addresses are `HEXIP:HEXPORT`, the IP in the kernel's (little-endian) byte order.
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(local.ip().octets()), local.port());
    Ok(table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut cols = line.split_whitespace();
            let local_col = cols.nth(1);
            let state = cols.nth(1);
            local_col == Some(want.as_str()) && state == Some("01")
        })
        .count())
}

/// The first `n` CPUs of this process's CPU set (all of them when it has fewer).
pub(crate) fn first_cpu_ids(n: usize) -> anyhow::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None).context("reading the CPU set (sched_getaffinity)")?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .take(n)
        .collect())
}

/// Moves every thread of this process onto `cpus` (sched_setaffinity per thread, as listed in
/// `/proc/self/task`) and into the `SCHED_BATCH` policy until the guard is dropped; threads started
/// meanwhile inherit the set and the policy of the thread that starts them.
///
/// `SCHED_BATCH` because the load now shares the proxies' CPUs: a batch thread that wakes up (a
/// sink that a proxy's send made readable) waits for the running proxy thread's turn to end
/// instead of preempting it, so the proxies are interrupted about as little as by a load generator
/// on CPUs of its own.
pub(crate) fn confine_threads(cpus: &[usize]) -> anyhow::Result<Confined> {
    let all = rustix::thread::sched_getaffinity(None).context("reading the CPU set (sched_getaffinity)")?;
    let mut set = rustix::thread::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu);
    }
    for tid in threads()? {
        // A thread may have exited since the directory was read.
        let _ = rustix::thread::sched_setaffinity(rustix::process::Pid::from_raw(tid), &set);
    }
    // The guard first: if the policy cannot be set, dropping it puts the CPU sets back.
    let confined = Confined { all };
    set_policy("--batch")?;
    Ok(confined)
}

/// Sets the scheduling policy of every thread of this process with util-linux's `chrt` (neither
/// rustix nor the standard library has `sched_setscheduler`, and the workspace forbids `unsafe`).
fn set_policy(policy: &str) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("chrt")
        .args(["--all-tasks", policy, "--pid", "0", &pid])
        .status()
        .with_context(|| format!("running chrt {policy} (util-linux) on the bench's threads"))?;
    anyhow::ensure!(
        status.success(),
        "chrt {policy} on the bench's threads failed: {status}"
    );
    Ok(())
}

/// Threads moved by [`confine_threads`]: dropping it gives every thread the CPU set the calling
/// thread had before (the bench never pins a thread of its own) and the default policy.
pub(crate) struct Confined {
    all: rustix::thread::CpuSet,
}

impl Drop for Confined {
    fn drop(&mut self) {
        for tid in threads().unwrap_or_default() {
            let _ = rustix::thread::sched_setaffinity(rustix::process::Pid::from_raw(tid), &self.all);
        }
        if let Err(err) = set_policy("--other") {
            eprintln!("warning: {err:#}");
        }
    }
}

/// The thread ids of this process.
fn threads() -> anyhow::Result<Vec<i32>> {
    let dir = std::fs::read_dir("/proc/self/task").context("listing this process's threads (/proc/self/task)")?;
    Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
}

/// The first `n` CPUs of this process's CPU set, as a `taskset -c` list (`0,1`); all of them (with
/// a note on stdout) when the set has fewer.
pub(crate) fn first_cpus(n: usize) -> anyhow::Result<String> {
    let cpus: Vec<String> = first_cpu_ids(n)?.iter().map(|cpu| cpu.to_string()).collect();
    if cpus.len() < n {
        println!(
            "note: {n} CPUs asked for, the CPU set has {}: the proxies share them",
            cpus.len()
        );
    }
    Ok(cpus.join(","))
}

/// The machine: CPU model, CPUs available, kernel.
pub(crate) fn machine() -> (String, usize, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpu, cpus, measure::kernel_release())
}

/// Raises this process's open-file limit (inherited by the proxies it starts) to at least `needed`:
/// the soft limit up to the hard one, and the hard one too when allowed. Fails with a message saying
/// what to do when the limit cannot be raised that far. Returns the limit now in force.
pub(crate) fn raise_nofile(needed: u64) -> anyhow::Result<u64> {
    let current = getrlimit(Resource::Nofile);
    let soft = current.current.unwrap_or(u64::MAX);
    let hard = current.maximum.unwrap_or(u64::MAX);
    if soft >= needed {
        return Ok(soft);
    }
    if hard >= needed {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: current.maximum,
            },
        )
        .with_context(|| format!("raising the soft RLIMIT_NOFILE from {soft} to its hard limit {hard}"))?;
        return Ok(hard);
    }
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(needed);
    let target = needed.max(hard).min(nr_open);
    if target < needed {
        bail!(
            "{needed} open files are needed but the kernel allows at most {nr_open} (fs.nr_open): lower \
             --idle-connections"
        );
    }
    if let Err(err) = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: Some(target),
        },
    ) {
        bail!(
            "{needed} open files are needed but RLIMIT_NOFILE is {soft} (hard limit {hard}) and cannot be raised \
             ({err}): run as root, raise the limit (`ulimit -Hn {needed}`), or lower --idle-connections"
        );
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_own_cpu_and_memory() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(
            cpu_seconds(pid).unwrap() > before,
            "100 ms of spinning counted no CPU time"
        );
        assert!(rss_bytes(pid).unwrap() > 1024 * 1024);
    }

    /// The CPUs allowed to the calling thread and its scheduling policy, from `/proc/thread-self`.
    fn placement() -> (String, u32) {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap();
        // Field 41 of stat is the policy; fields 3.. follow the command name's closing parenthesis.
        let policy = stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(41 - 3).unwrap();
        (cpus.trim().to_owned(), policy.parse().unwrap())
    }

    // Other tests of this binary run meanwhile and are moved too, which does them no harm; only this
    // test's own threads are checked, as the harness may start threads at any time.
    #[test]
    fn confined_threads_run_as_batch_on_the_given_cpus_until_the_guard_drops() {
        const SCHED_OTHER: u32 = 0;
        const SCHED_BATCH: u32 = 3;
        let (all, policy) = placement();
        assert_eq!(policy, SCHED_OTHER);
        let first = first_cpu_ids(1).unwrap();
        let confined = confine_threads(&first).unwrap();
        assert_eq!(placement(), (first[0].to_string(), SCHED_BATCH));
        // A thread started meanwhile inherits both.
        let child = std::thread::spawn(placement).join().unwrap();
        assert_eq!(child, (first[0].to_string(), SCHED_BATCH));
        drop(confined);
        assert_eq!(placement(), (all, SCHED_OTHER));
    }

    #[test]
    fn counts_established_connections_of_a_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let _a = std::net::TcpStream::connect(addr).unwrap();
        let _b = std::net::TcpStream::connect(addr).unwrap();
        let _accepted = (listener.accept().unwrap(), listener.accept().unwrap());
        assert_eq!(established_to(std::process::id(), addr).unwrap(), 2);
    }
}
