//! The benchmark end to end with `--quick` against the debug `ztunnel` of this target directory (which
//! `cargo test --workspace` builds): every shape is in the JSON report, with positive figures, and every
//! bulk run counted at the receiver exactly the bytes its sender sent, and every DNS query of the dns
//! shape got a correct answer.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `target/<profile>/<name>` (`ztunnel`, `ztunnel-uring`), beside the bench binary Cargo built for
/// this test.
fn proxy(name: &str) -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_meshwire-bench"));
    let path = bench.parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (`cargo test --workspace` \
         builds it)",
        path.display()
    );
    path
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} is not positive: {x}");
    x
}

fn rows<'a>(report: &'a Value, key: &str) -> &'a Vec<Value> {
    let rows = report[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array in the report"));
    assert!(!rows.is_empty(), "{key} is empty");
    rows
}

/// The `what` row of `rows` for `path` whose `key` is `value`.
fn row<'a>(rows: &'a [Value], what: &str, path: &str, key: &str, value: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["path"] == path && r[key] == value)
        .unwrap_or_else(|| panic!("no {what} row {path} {value}"))
}

/// Bytes sent equal bytes received in every run, and the figures of each run are positive.
fn check_bulk_runs(row: &Value, what: &str, proxied: bool) {
    let runs = row["runs"].as_array().unwrap();
    assert!(!runs.is_empty(), "{what}: no runs");
    for run in runs {
        let sent = run["bytes_sent"].as_u64().unwrap();
        assert!(sent > 0, "{what}: nothing sent");
        assert_eq!(sent, run["bytes_received"].as_u64().unwrap(), "{what}: counts differ");
        positive(&run["gbps"], what);
        if proxied {
            positive(&run["cpu_s_per_gb"], what);
        }
    }
}

/// Shape 1 in `report`: every path (direct, `binaries`, the forwarder), direction and flow count
/// with positive figures and equal counts; the binaries' CPU per GB over the floor is positive and
/// is their CPU over the forwarder's plus AES's; AES was measured.
fn check_bulk_with_floor(report: &Value, binaries: &[&str]) {
    let aes = positive(&report["aes"]["cpu_s_per_gb"], "AES CPU-s/GB");
    positive(&report["aes"]["seal_gb_per_s"], "AES seal GB/s");
    positive(&report["aes"]["open_gb_per_s"], "AES open GB/s");
    let bulk = rows(report, "bulk");
    let paths: Vec<&str> = ["direct", "forwarder"].iter().chain(binaries).copied().collect();
    for flows in [1, 4] {
        for direction in ["upload", "download"] {
            let of = |path: &str| {
                bulk.iter()
                    .find(|r| r["path"] == path && r["direction"] == direction && r["flows"] == flows)
                    .unwrap_or_else(|| panic!("no bulk row {path} {direction} {flows} flows"))
            };
            for path in &paths {
                let row = of(path);
                positive(&row["median_gbps"], "bulk Gbit/s");
                if *path != "direct" {
                    positive(&row["median_cpu_s_per_gb"], "bulk CPU-s/GB");
                }
                check_bulk_runs(row, &format!("bulk {path} {direction} {flows}"), *path != "direct");
            }
            let forwarder = positive(&of("forwarder")["median_cpu_s_per_gb"], "forwarder CPU-s/GB");
            assert!(of("forwarder")["cpu_over_floor"].is_null());
            for path in binaries {
                let row = of(path);
                let over = positive(&row["cpu_over_floor"], "CPU over the floor");
                let cpu = positive(&row["median_cpu_s_per_gb"], "bulk CPU-s/GB");
                assert!(
                    (over - cpu / (forwarder + aes)).abs() < 1e-9,
                    "{path}: {over} is not {cpu} / ({forwarder} + {aes})"
                );
            }
        }
    }
}

/// Shape 3 in `report`: both modes for direct, the forwarder and `binaries`, with latency, added
/// latency and CPU; each binary's ratios to the forwarder are its figures over the forwarder's.
fn check_rr_with_forwarder(report: &Value, binaries: &[&str]) {
    let rr = rows(report, "request_response");
    for mode in ["fixed", "closed"] {
        let forwarder = row(rr, "request/response", "forwarder", "mode", mode);
        for path in ["direct", "forwarder"].iter().chain(binaries) {
            let row = row(rr, "request/response", path, "mode", mode);
            positive(&row["median_requests_per_s"], "requests/s");
            for p in ["p50_us", "p90_us", "p99_us", "p999_us"] {
                positive(&row["latency"][p], p);
            }
            if *path != "direct" {
                positive(&row["median_cpu_ms_per_1000"], "CPU per 1000 requests");
                assert!(row["added"]["p50_us"].is_number(), "no added latency: {row}");
            }
            if binaries.contains(path) {
                let cpu = row["median_cpu_ms_per_1000"].as_f64().unwrap();
                let base = forwarder["median_cpu_ms_per_1000"].as_f64().unwrap();
                let ratio = row["cpu_over_forwarder"].as_f64().unwrap();
                assert!(
                    (ratio - cpu / base).abs() < 1e-9,
                    "{path} {mode}: CPU ratio {ratio}, not {cpu} / {base}"
                );
                let added = row["added_over_forwarder"].as_array().unwrap();
                let p50 = row["added"]["p50_us"].as_f64().unwrap() / forwarder["added"]["p50_us"].as_f64().unwrap();
                assert!((added[0].as_f64().unwrap() - p50).abs() < 1e-9, "{path} {mode}: {row}");
            } else {
                assert!(row["added_over_forwarder"].is_null() && row["cpu_over_forwarder"].is_null());
            }
        }
    }
}

#[test]
fn quick_run_reports_every_shape_with_positive_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let started = Instant::now();
    let svg = dir.path().join("parallel.svg");
    let output = Command::new(env!("CARGO_BIN_EXE_meshwire-bench"))
        .arg("--quick")
        .arg("--binary")
        .arg(format!("ztunnel={}", proxy("ztunnel").display()))
        .arg("--binary")
        .arg(format!("ztunnel-uring={}", proxy("ztunnel-uring").display()))
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the quick run took {:?}",
        started.elapsed()
    );
    for title in [
        "1. Bulk",
        "2. Parallel",
        "3. Request/response",
        "4. New connections",
        "5. 300 idle",
        "8. DNS over UDP",
    ] {
        assert!(stdout.contains(title), "no table {title:?} in:\n{stdout}");
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    // 1. Bulk: direct, both binaries and the forwarder, both directions, 1 and 4 flows; each
    // binary's CPU over the floor.
    check_bulk_with_floor(&report, &["ztunnel", "ztunnel-uring"]);
    assert_eq!(report["plan"]["topology"], "loopback");

    // 2. Parallel: every flow count, direct and both tunnel kinds with 1 and 2 cores, ratios, for
    // both binaries; the plot has a curve per binary, tunnel kind and core count.
    let parallel = &report["parallel"];
    let prows = rows(parallel, "rows");
    for flows in [1, 2, 4, 8, 16] {
        let mut kinds = Vec::new();
        for row in prows.iter().filter(|r| r["flows"] == flows) {
            positive(&row["median_gbps"], "parallel Gbit/s");
            let proxied = row["path"] != "direct";
            check_bulk_runs(row, &format!("parallel {flows} {}", row["tunnel"]), proxied);
            kinds.push((
                row["path"].as_str().unwrap().to_owned(),
                row["tunnel"].as_str().unwrap().to_owned(),
                row["cores"].as_u64(),
            ));
            if row["tunnel"] == "pooled" {
                // One pooled tunnel per proxy, or per core of the io_uring build.
                let most = if row["path"] == "ztunnel-uring" {
                    row["cores"].as_u64().unwrap()
                } else {
                    1
                };
                let n = row["hbone_connections"].as_u64().unwrap();
                assert!((1..=most).contains(&n), "pooled flows on {n} HBONE connections: {row}");
            }
            if row["tunnel"] == "per-flow" {
                assert!(
                    row["hbone_connections"].as_u64().unwrap() >= 16,
                    "per-flow tunnels: {row}"
                );
            }
        }
        kinds.sort();
        let mut expected = vec![("direct".to_owned(), "direct".to_owned(), None)];
        for binary in ["ztunnel", "ztunnel-uring"] {
            for tunnel in ["per-flow", "pooled"] {
                for cores in [1, 2] {
                    expected.push((binary.to_owned(), tunnel.to_owned(), Some(cores)));
                }
            }
        }
        assert_eq!(kinds, expected, "parallel rows for {flows} flows");
    }
    let ratios = rows(parallel, "ratios");
    assert_eq!(ratios.len(), 20, "2 binaries x 2 tunnel kinds x 5 flow counts");
    for ratio in ratios {
        positive(&ratio["ratio"], "2c/1c ratio");
    }
    assert!(
        stdout.contains("scaling ztunnel-uring pooled: 2 cores / 1 core"),
        "{stdout}"
    );
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(
        plot.matches("<polyline").count(),
        8,
        "2 binaries x 2 tunnel kinds x 2 core counts"
    );
    assert!(plot.contains("ztunnel-uring, 2 cores"), "{plot}");

    // 3. Request/response: both modes, latency, added latency and CPU, and their ratios to the
    // forwarder's.
    check_rr_with_forwarder(&report, &["ztunnel", "ztunnel-uring"]);
    let rr = rows(&report, "request_response");
    let fixed = row(rr, "request/response", "ztunnel", "mode", "fixed");
    let rate = positive(&fixed["median_requests_per_s"], "fixed rate");
    assert!(
        (800.0..1200.0).contains(&rate),
        "the fixed rate was {rate}/s, not about 1000/s"
    );

    // 4. Connections: direct, pooled, handshake (each on its own HBONE connection).
    let conns = rows(&report, "connections");
    for (path, kind) in [
        ("direct", "direct"),
        ("ztunnel", "pooled"),
        ("ztunnel", "handshake"),
        ("ztunnel-uring", "pooled"),
        ("ztunnel-uring", "handshake"),
    ] {
        let row = row(conns, "connections", path, "kind", kind);
        positive(&row["median_per_second"], "connections/s");
        if path != "direct" {
            positive(&row["median_cpu_s_per_1000"], "CPU per 1000 connections");
        }
        if kind == "handshake" {
            let run = &row["runs"][0];
            assert!(
                run["hbone_connections"].as_u64().unwrap() > run["connections"].as_u64().unwrap(),
                "handshake connections did not each get their own HBONE connection: {run}"
            );
        }
    }

    // 5. Idle: memory before, held, after, per connection.
    let idle = rows(&report, "idle");
    assert_eq!(idle.len(), 2, "one idle row per binary");
    for row in idle {
        assert_eq!(row["connections"], 300);
        for key in ["rss_before", "rss_held", "rss_after", "rss_settled"] {
            positive(&row[key]["a_kib"], key);
            positive(&row[key]["b_kib"], key);
        }
        let ratio = positive(&row["settled_over_idle"], "RSS later over before");
        let (later, before) = (
            row["rss_settled"]["total_kib"].as_f64().unwrap(),
            row["rss_before"]["total_kib"].as_f64().unwrap(),
        );
        assert!((ratio - later / before).abs() < 1e-9, "{row}");
        positive(&row["bytes_per_connection"], "bytes per idle connection");
        // Both binaries export what the allocator holds; 300 connections held take more than none.
        let held = positive(&row["allocated_held"], "allocated with the connections held");
        assert!(held > positive(&row["allocated_before"], "allocated before"), "{row}");
        positive(&row["allocated_settled"], "allocated later");
    }

    // 8. DNS: both kinds through both binaries, every answer correct (id, NOERROR, a record).
    let dns = rows(&report, "dns");
    for path in ["ztunnel", "ztunnel-uring"] {
        for kind in ["local", "forwarded"] {
            let row = row(dns, "dns", path, "kind", kind);
            positive(&row["median_queries_per_s"], "DNS queries/s");
            positive(&row["median_cpu_ms_per_1000"], "CPU per 1000 DNS queries");
            positive(&row["latency"]["p50_us"], "DNS p50");
            // A local answer never fails; a forwarded query may (SERVFAIL) when the upstream in the
            // bench, sharing the CPUs, does not answer within the proxy's upstream timeout.
            if kind == "local" {
                assert_eq!(row["errors"], 0, "incorrect DNS answers: {row}");
            }
            let answered: u64 = row["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["answered"].as_u64().unwrap())
                .sum();
            let failed = row["errors"].as_u64().unwrap() + row["timeouts"].as_u64().unwrap();
            assert!(failed * 100 <= answered, "more than 1 % of DNS queries failed: {row}");
        }
    }
}

/// The xds shape (not in the default set) with a small mesh: every figure of the in-process part and
/// of each binary is there, each push was answered, pushes ran during the request stream.
#[test]
fn quick_xds_run_reports_pushes_in_process_and_through_each_binary() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_meshwire-bench"))
        .args(["--quick", "--only", "xds", "--xds-workloads", "500"])
        .arg("--binary")
        .arg(format!("ztunnel={}", proxy("ztunnel").display()))
        .arg("--binary")
        .arg(format!("ztunnel-uring={}", proxy("ztunnel-uring").display()))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    for title in [
        "7a. xDS push applied in this process",
        "7b. xDS push through",
        "7c. 1 KiB",
        "verdict (",
    ] {
        assert!(stdout.contains(title), "no {title:?} in:\n{stdout}");
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let xds = &report["xds"];
    let in_process = &xds["in_process"];
    assert_eq!(in_process["mesh"]["workloads"], 500);
    for key in ["decode_convert_ms", "state_build_ms", "total_ms"] {
        positive(&in_process["median"][key], key);
    }
    positive(&in_process["update_median"]["total_ms"], "update");
    positive(&in_process["encoded_bytes"], "encoded bytes");
    let proxies = rows(xds, "proxies");
    assert_eq!(proxies.len(), 2, "one row per binary");
    for row in proxies {
        for push in ["full_push", "change_push"] {
            for key in ["ack_address_ms", "ack_all_ms", "generation_ms"] {
                positive(&row[push][key], key);
            }
        }
        positive(&row["rss_after"]["a_mb"], "RSS");
        positive(&row["rr_before"]["p99_us"], "p99 before");
        positive(&row["rr_quiet"]["p99_us"], "p99 with no push in flight");
        for (rr, pushes) in [
            ("rr_paced", "pushes_paced"),
            ("rr_during", "pushes_during"),
            ("rr_in_push_apart", "pushes_apart"),
        ] {
            positive(&row[rr]["p99_us"], rr);
            assert!(row[pushes].as_u64().unwrap() >= 1, "{row}");
        }
        // One round of paced pushes and of the control with --quick, each judged.
        let rounds = row["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 1, "{row}");
        assert!(row["spins"].as_u64().unwrap() >= 1, "{row}");
        for round in rounds {
            for ratio in ["push_ratio", "spin_ratio"] {
                assert!(
                    round[ratio].as_f64().is_some_and(|r| r >= 0.0 && r.is_finite()),
                    "{round}"
                );
            }
        }
    }
}

fn bench_fails(args: &[&str]) -> String {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_meshwire-bench"))
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "the bench succeeded with {args:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failing took {:?}",
        started.elapsed()
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_missing_binary_is_named_with_how_to_build_it() {
    let err = bench_fails(&["--quick", "--only", "bulk", "--ztunnel", "/nonexistent/ztunnel"]);
    assert!(err.contains("/nonexistent/ztunnel"), "{err}");
    assert!(
        err.contains("cargo build --release -p meshwire-dataplane --bin ztunnel"),
        "{err}"
    );
}

#[test]
fn a_proxy_that_exits_ends_the_bench_naming_it() {
    // A script standing for a proxy binary that fails at start, as one whose port is taken would.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake-proxy");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'error: cannot listen for SOCKS5: Address in use' >&2\nexit 1\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(&fake).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&fake, perms).unwrap();
    let err = bench_fails(&[
        "--quick",
        "--only",
        "bulk",
        "--binary",
        &format!("fake={}", fake.display()),
    ]);
    assert!(err.contains("proxy A (client)"), "{err}");
    assert!(err.contains("exited with exit status: 1"), "{err}");
    assert!(
        err.contains("Address in use"),
        "the proxy's own message is not shown: {err}"
    );
}

/// The veth topology: the nodes are two network namespaces made for the run and removed after it,
/// the floor references are measured there too, and the proxies and the forwarder carry the same
/// shapes between them.
#[test]
fn quick_veth_run_measures_between_two_namespaces_with_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let child = Command::new(env!("CARGO_BIN_EXE_meshwire-bench"))
        .args(["--quick", "--topology", "veth", "--only", "bulk,rr"])
        .arg("--binary")
        .arg(format!("ztunnel={}", proxy("ztunnel").display()))
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("two network namespaces joined by a veth pair (client 10.201.0.1, server 10.201.0.2)"),
        "{stdout}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["plan"]["topology"], "veth");
    check_bulk_with_floor(&report, &["ztunnel"]);
    check_rr_with_forwarder(&report, &["ztunnel"]);
    // The run's namespaces are gone with it.
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    for ns in [format!("mwb-client-{pid}"), format!("mwb-server-{pid}")] {
        assert!(!namespaces.contains(&ns), "{ns} is left after the run: {namespaces}");
    }
}

#[test]
fn the_dns_and_xds_shapes_are_refused_with_veth() {
    for shape in ["dns", "xds"] {
        let err = bench_fails(&["--quick", "--topology", "veth", "--only", shape]);
        assert!(
            err.contains("--topology veth") && err.contains("loopback only"),
            "{err}"
        );
    }
}
