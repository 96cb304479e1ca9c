//! What only the io_uring build (`ztunnel-uring`) has: cores. Connections the kernel spreads over
//! the cores' listeners are served on every core, and dealt to them in turn (a peer's few pooled
//! tunnels land on different cores); each core carries its outbound connections in
//! tunnels of its own pool; and a machine where io_uring cannot run gets a message naming the
//! cause at start. (Every other scenario runs against both binaries in the other files.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshwire_tests::binary::{self, Binary};
use meshwire_tests::hbone::{HboneClient, spiffe};
use meshwire_tests::mesh::{Proxy, metric_sum, repo_path};
use meshwire_tests::net::{self, lo};
use meshwire_tests::pair::Pair;

/// The per-core accept counter of `ztunnel-uring`.
const ACCEPTED: &str = "meshwire_core_connections_accepted_total";
/// The executors the harness asks for (`--worker-threads 2`), also on a machine with one CPU.
const CORES: usize = 2;

/// Runs `f(i)` for every `i` in `0..n`, from one thread per CPU of this process's CPU set, each
/// pinned to its CPU (CPU k takes `i = k, k + cpus, ...`): connections made concurrently from every
/// CPU.
fn from_every_cpu(n: usize, f: impl Fn(usize) + Sync) {
    let set = rustix::thread::sched_getaffinity(None).unwrap();
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect();
    std::thread::scope(|scope| {
        for (k, &cpu) in cpus.iter().enumerate() {
            let f = &f;
            let step = cpus.len();
            scope.spawn(move || {
                let mut one = rustix::thread::CpuSet::new();
                one.set(cpu);
                rustix::thread::sched_setaffinity(None, &one).unwrap();
                for i in (k..n).step_by(step) {
                    f(i);
                }
            });
        }
    });
}

/// The connections each core of `proxy` accepted on `listener` (`socks5`, `inbound`, ...).
fn accepted_per_core(proxy: &Proxy, listener: &str) -> Vec<u64> {
    let text = proxy.metrics();
    (0..CORES)
        .map(|core| {
            metric_sum(
                &text,
                ACCEPTED,
                &[&format!("core=\"{core}\""), &format!("listener=\"{listener}\"")],
            )
        })
        .collect()
}

#[test]
fn connections_accepted_on_every_core_are_served() {
    let uring = Binary::ztunnel_uring();
    // The kernel's hash (the round robin, the default, is the next test's).
    let pair = Pair::start_with(&uring, &uring, "", |proxy| proxy.arg("--connection-balance=hash"));

    // SOCKS5 on the client's proxy: every connection from its own port, spread by the kernel.
    const SOCKS: usize = 32;
    from_every_cpu(SOCKS, |i| {
        let echoed = net::echo_exchange(pair.socks5_to_echo(), 4096 + i).unwrap();
        assert!(echoed.intact(), "connection {i}: {echoed:?}\n{}", pair.logs());
    });
    let socks = accepted_per_core(&pair.client, "socks5");
    assert_eq!(socks.iter().sum::<u64>(), SOCKS as u64, "{socks:?}\n{}", pair.logs());
    assert!(
        socks.iter().all(|&n| n > 0),
        "a core accepted no SOCKS5 connection: {socks:?}"
    );

    // Inbound HBONE on the server's proxy: a new HBONE connection each time.
    const TUNNELS: usize = 24;
    let client = HboneClient::new(
        pair.mesh.ca(),
        &spiffe("default", "client"),
        &[spiffe("default", "server")],
    )
    .from_ip(lo(1));
    from_every_cpu(TUNNELS, |i| {
        let opened = client
            .open(pair.server.ports().inbound, pair.echo.addr())
            .unwrap_or_else(|e| panic!("tunnel {i}: {e}\n{}", pair.logs()));
        assert_eq!(opened.peer, spiffe("default", "server"));
        let echoed = net::echo_exchange(opened.stream, 2048 + i).unwrap();
        assert!(echoed.intact(), "tunnel {i}: {echoed:?}\n{}", pair.logs());
    });
    let inbound = accepted_per_core(&pair.server, "inbound");
    // The client proxy's own tunnels arrived there too (one per client core at most).
    let total: u64 = inbound.iter().sum();
    assert!(
        (TUNNELS as u64..=(TUNNELS + CORES) as u64).contains(&total),
        "{inbound:?}\n{}",
        pair.logs()
    );
    assert!(
        inbound.iter().all(|&n| n > 0),
        "a core accepted no HBONE connection: {inbound:?}"
    );

    // The connection counters of every core are summed in one answer.
    let text = pair
        .server
        .wait_metric("istio_tcp_connections_closed_total", &[], (SOCKS + TUNNELS) as u64);
    assert_eq!(
        metric_sum(&text, "istio_tcp_connections_closed_total", &[]),
        (SOCKS + TUNNELS) as u64,
        "{text}"
    );
}

#[test]
fn by_default_new_connections_are_dealt_over_the_cores_in_turn() {
    let uring = Binary::ztunnel_uring();
    let pair = Pair::start(&uring, &uring);
    // One after the other, from one thread: the kernel's hash would often give one core most.
    const CONNECTIONS: usize = 8;
    for i in 0..CONNECTIONS {
        let echoed = net::echo_exchange(pair.socks5_to_echo(), 512 + i).unwrap();
        assert!(echoed.intact(), "connection {i}: {echoed:?}\n{}", pair.logs());
    }
    let socks = accepted_per_core(&pair.client, "socks5");
    assert_eq!(socks, vec![(CONNECTIONS / CORES) as u64; CORES], "{}", pair.logs());
    // Each client core opened one pooled tunnel to the server; the server's cores got one each
    // (a peer that opens few tunnels is still spread over the cores).
    let inbound = accepted_per_core(&pair.server, "inbound");
    assert_eq!(inbound, vec![1; CORES], "{}", pair.logs());
}

#[test]
fn each_core_carries_its_connections_in_tunnels_of_its_own() {
    let uring = Binary::ztunnel_uring();
    for server in binary::all() {
        let pair = Pair::start(&uring, &server);
        const CONNECTIONS: usize = 24;
        // One after the other: each core's pool then keeps one connection to the server.
        for i in 0..CONNECTIONS {
            let echoed = net::echo_exchange(pair.socks5_to_echo(), 1024 + i).unwrap();
            assert!(
                echoed.intact(),
                "uring -> {server}, connection {i}: {echoed:?}\n{}",
                pair.logs()
            );
        }
        let mut per_core = accepted_per_core(&pair.client, "socks5");
        assert!(
            per_core.iter().all(|&n| n > 0),
            "uring -> {server}: {per_core:?}\n{}",
            pair.logs()
        );

        // The server logs each stream with the address of the HBONE connection it came in: one
        // connection per client core, carrying exactly the streams of that core. A pool shared by
        // the cores would use one connection for all of them.
        let lines = pair
            .server
            .wait_access_lines("inbound", CONNECTIONS, Duration::from_secs(10));
        assert_eq!(lines.len(), CONNECTIONS, "{}", pair.logs());
        let mut per_tunnel: BTreeMap<String, u64> = BTreeMap::new();
        for line in &lines {
            *per_tunnel.entry(line.get("src.addr").unwrap().to_owned()).or_default() += 1;
        }
        let mut streams: Vec<u64> = per_tunnel.values().copied().collect();
        streams.sort_unstable();
        per_core.sort_unstable();
        assert_eq!(
            streams,
            per_core,
            "uring -> {server}: streams per HBONE connection {per_tunnel:?} vs connections per core\n{}",
            pair.logs()
        );
    }
}

#[test]
fn memlock_below_what_glommio_needs_stops_the_start_with_its_cause() {
    let uring = Binary::ztunnel_uring();
    let state = tempfile::tempdir().unwrap();
    // `ulimit -l` takes KiB; lowering a limit needs no privilege.
    let mut shell = std::process::Command::new("/bin/sh");
    shell
        .arg("-c")
        .arg("ulimit -l 64 && exec \"$0\" \"$@\"")
        .arg(uring.path())
        .args(["--config"])
        .arg(repo_path("dataplane/examples/localhost.yaml"))
        .args(["--mode", "dedicated", "--workload", "default/local/default"])
        .args(["--bind-address", "127.0.0.1"])
        .arg("--state-dir")
        .arg(state.path())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let output = shell.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    for needle in [
        "io_uring is unavailable",
        "locked-memory limit",
        "64 KiB",
        "512 KiB",
        "`ztunnel`",
    ] {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing was started: no listener, no CA.
    assert!(!state.path().join("ca").exists(), "{stderr}");
}

/// The io_uring build's runtime metrics, one series per core (glommio's executor counters, as the
/// tokio build exports tokio's): after traffic every core has run tasks, and spent time doing so.
#[test]
fn every_core_reports_its_executors_counters() {
    let uring = Binary::ztunnel_uring();
    let pair = Pair::start(&uring, &uring);
    for _ in 0..20 {
        let stream = pair.socks5(net::Socks5Target::Addr(pair.echo.addr()));
        assert!(net::echo_exchange(stream, 64 * 1024).unwrap().intact());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = pair.client.metrics();
        let per_core = |metric: &str, core: usize| metric_sum(&page, metric, &[&format!("core=\"{core}\"")]);
        let busy_series = page
            .lines()
            .filter(|l| l.starts_with("meshwire_core_busy_seconds_total{"))
            .count();
        let counted = (0..CORES).all(|core| {
            per_core("meshwire_core_tasks_executed_total", core) > 0
                && per_core("meshwire_core_scheduler_runs_total", core) > 0
        });
        if counted && busy_series == CORES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cores' executor counters after traffic:\n{page}\n{}",
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
