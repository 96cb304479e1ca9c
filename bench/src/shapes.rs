//! The benchmark shapes of `PERFORMANCE.md`, each measured through every proxy binary and over a
//! direct TCP connection in the same run, runs interleaved, medians reported.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshwire_testkit::measure::median;
use serde::Serialize;

use crate::client::Route;
use crate::floor::{Aes, FORWARDER};
use crate::load::{self, Direction};
use crate::proxy::{Binary, Pair, PairOptions, Workdir};
use crate::report::{Percentiles, Table, fmt};
use crate::server::{Server, ServerProcess};
use crate::sys;

/// Durations and sizes of one run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    /// Where the two nodes of each pair are.
    pub(crate) topology: crate::nodes::Topology,
    /// Runs of each measurement (interleaved); medians are reported.
    pub(crate) repeat: usize,
    /// Seconds of each one-flow bulk run.
    pub(crate) bulk_s: f64,
    /// Seconds of each parallel-flows run.
    pub(crate) parallel_s: f64,
    /// Flow counts of the parallel shape.
    pub(crate) flows: Vec<usize>,
    /// Whether the parallel shape confines the bench's own threads to the proxies' CPUs during a run.
    pub(crate) confine_load: bool,
    /// Requests per second of the fixed-rate request/response run.
    pub(crate) rr_rate: u32,
    /// Seconds of the fixed-rate request/response run.
    pub(crate) rr_fixed_s: f64,
    /// Seconds of the closed-loop request/response run.
    pub(crate) rr_closed_s: f64,
    /// Seconds of the connection churn over an existing tunnel.
    pub(crate) churn_s: f64,
    /// Clients opening connections at once, in the connection shapes.
    pub(crate) churn_concurrency: usize,
    /// Connections opened with a full mTLS handshake each.
    pub(crate) handshake_connections: usize,
    /// Idle connections held open.
    pub(crate) idle_connections: usize,
    /// Seconds after the idle connections closed at which memory is read again (the goal: back
    /// within 10 % of idle by then).
    pub(crate) idle_settle_s: f64,
    /// Workloads of the xds shape's mesh.
    pub(crate) xds_workloads: usize,
    /// Seconds of each request/response run of the xds shape (before and during pushes).
    pub(crate) xds_rr_s: f64,
    /// `--xds-priority` of the xds shape's proxies; `None`: their default.
    pub(crate) xds_priority: Option<&'static str>,
    /// `--xds-cpu-share` of the xds shape's proxies; `None`: their default.
    pub(crate) xds_cpu_share: Option<f64>,
    /// Seconds of each run of the dns shape.
    pub(crate) dns_s: f64,
    /// DNS queries in flight in the dns shape (one per client socket).
    pub(crate) dns_in_flight: usize,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Everything the shapes share.
pub(crate) struct Bench {
    pub(crate) server: Server,
    pub(crate) work: Workdir,
    pub(crate) binaries: Vec<Binary>,
    pub(crate) plan: Plan,
    /// One pair per binary with the default settings (2 workers, pooled), for shapes 1, 3 and 4.
    pub(crate) pairs: Vec<Pair>,
    /// The floor references' forwarder pair (2 workers), for shapes 1, 3 and 4.
    pub(crate) forwarder: Option<Pair>,
    /// The floor references' AES-GCM cost, measured at the start.
    pub(crate) aes: Option<Aes>,
}

/// A way to the server: direct, or through a pair of one binary.
#[derive(Clone, Copy)]
struct Case<'a> {
    name: &'a str,
    pair: Option<&'a Pair>,
}

impl Case<'_> {
    fn route(&self) -> Route {
        self.pair.map_or(Route::Direct, Pair::route)
    }
}

/// CPU used during a measurement.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Cost {
    /// CPU seconds of both proxies together; `None` for a direct connection.
    pub(crate) proxy_cpu_s: Option<f64>,
    /// CPU seconds of the bench process itself (clients and server).
    pub(crate) bench_cpu_s: f64,
}

/// Runs `fut` within `limit`, measuring the CPU the proxies of `pair` and the bench use meanwhile;
/// ends early with an error naming the proxy if one of them exits.
async fn measured<T>(
    pair: Option<&Pair>,
    limit: Duration,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Cost)> {
    let me = std::process::id();
    let proxy_before = pair.map(Pair::cpu_seconds).transpose()?;
    let bench_before = sys::cpu_seconds(me)?;
    let bounded = async {
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result,
            Err(_) => bail!("the measurement did not finish within {limit:?}"),
        }
    };
    let out = match pair {
        Some(pair) => pair.guard(bounded).await?,
        None => bounded.await?,
    };
    let proxy_after = pair.map(Pair::cpu_seconds).transpose()?;
    let cost = Cost {
        proxy_cpu_s: proxy_before.zip(proxy_after).map(|(b, a)| a - b),
        bench_cpu_s: sys::cpu_seconds(me)? - bench_before,
    };
    Ok((out, cost))
}

fn context_of(case: &Case<'_>, what: &str) -> String {
    format!("{what} via {}", case.name)
}

impl Bench {
    fn cases(&self) -> Vec<Case<'_>> {
        let mut cases = vec![Case {
            name: "direct",
            pair: None,
        }];
        cases.extend(self.binaries.iter().zip(&self.pairs).map(|(b, p)| Case {
            name: &b.name,
            pair: Some(p),
        }));
        cases.extend(self.forwarder.iter().map(|p| Case {
            name: FORWARDER,
            pair: Some(p),
        }));
        cases
    }

    /// The floor of a TLS proxy pair's CPU per GB: the forwarder pair's, measured alike, plus AES
    /// both ways; `None` without them.
    fn floor_cpu_s_per_gb(&self, forwarder: Option<f64>) -> Option<f64> {
        Some(forwarder? + self.aes?.cpu_s_per_gb)
    }
}

// ---------------------------------------------------------------------------------------------------
// 1. Bulk, one flow.

/// One bulk or parallel run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BulkRun {
    pub(crate) gbps: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) seconds: f64,
    /// Proxy CPU seconds per GB (10^9 bytes) moved; `None` for a direct connection.
    pub(crate) cpu_s_per_gb: Option<f64>,
    #[serde(flatten)]
    pub(crate) cost: Cost,
}

impl BulkRun {
    fn new(moved: load::Moved, cost: Cost) -> BulkRun {
        BulkRun {
            gbps: moved.gbps(),
            bytes_sent: moved.sent,
            bytes_received: moved.received,
            seconds: moved.elapsed.as_secs_f64(),
            cpu_s_per_gb: cost.proxy_cpu_s.map(|c| c / (moved.received as f64 / 1e9)),
            cost,
        }
    }
}

/// The runs of one path and direction.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BulkRow {
    pub(crate) path: String,
    pub(crate) direction: &'static str,
    /// Parallel flows (1 or 4), each on a connection of its own.
    pub(crate) flows: usize,
    pub(crate) median_gbps: f64,
    pub(crate) median_cpu_s_per_gb: Option<f64>,
    /// The CPU per GB over the floor of the same run (the forwarder pair's for the same flows and
    /// direction, plus AES-GCM both ways); `None` for direct and the forwarder.
    pub(crate) cpu_over_floor: Option<f64>,
    pub(crate) runs: Vec<BulkRun>,
}

/// Shape 1: one flow and four flows each way, Gbit/s and proxy CPU-seconds per GB, the latter also
/// as a ratio to the floor.
pub(crate) async fn bulk(bench: &Bench) -> anyhow::Result<(Vec<BulkRow>, Table)> {
    let cases = bench.cases();
    let duration = secs(bench.plan.bulk_s);
    let directions = [Direction::Upload, Direction::Download];
    let flow_counts = [1, 4];
    // Runs by (flows, direction, case).
    let slot = |f: usize, d: usize, c: usize| (f * directions.len() + d) * cases.len() + c;
    let mut runs: Vec<Vec<BulkRun>> = vec![Vec::new(); flow_counts.len() * directions.len() * cases.len()];
    for _ in 0..bench.plan.repeat {
        for (f, flows) in flow_counts.iter().enumerate() {
            for (d, direction) in directions.iter().enumerate() {
                for (c, case) in cases.iter().enumerate() {
                    let (moved, cost) = measured(
                        case.pair,
                        duration + Duration::from_secs(60),
                        load::bulk(case.route(), &bench.server, *direction, *flows, duration),
                    )
                    .await
                    .with_context(|| context_of(case, &format!("bulk {}, {flows} flows", direction.name())))?;
                    runs[slot(f, d, c)].push(BulkRun::new(moved, cost));
                }
            }
        }
    }
    let mut rows = Vec::new();
    let mut table = Table::new(
        format!(
            "1. Bulk, one flow and four ({} s, median of {}; x floor: CPU-s/GB over the forwarder pair's plus \
             AES-GCM both ways{})",
            bench.plan.bulk_s,
            bench.plan.repeat,
            bench
                .aes
                .map(|a| format!(" ({:.3} CPU-s/GB)", a.cpu_s_per_gb))
                .unwrap_or_default()
        ),
        &[
            "path",
            "flows",
            "direction",
            "Gbit/s",
            "proxy CPU-s/GB",
            "x floor",
            "Gbit/s of each run",
        ],
    );
    for (f, flows) in flow_counts.iter().enumerate() {
        for (d, direction) in directions.iter().enumerate() {
            let forwarder = cases
                .iter()
                .position(|c| c.name == FORWARDER)
                .and_then(|c| median(runs[slot(f, d, c)].iter().filter_map(|r| r.cpu_s_per_gb)));
            let floor = bench.floor_cpu_s_per_gb(forwarder);
            for (c, case) in cases.iter().enumerate() {
                let runs = std::mem::take(&mut runs[slot(f, d, c)]);
                let median_cpu_s_per_gb = median(runs.iter().filter_map(|r| r.cpu_s_per_gb));
                let row = BulkRow {
                    path: case.name.to_owned(),
                    direction: direction.name(),
                    flows: *flows,
                    median_gbps: median(runs.iter().map(|r| r.gbps)).unwrap_or(0.0),
                    median_cpu_s_per_gb,
                    cpu_over_floor: match (case.name, median_cpu_s_per_gb, floor) {
                        (FORWARDER, ..) => None,
                        (_, Some(cpu), Some(floor)) => Some(cpu / floor),
                        _ => None,
                    },
                    runs,
                };
                table.row(vec![
                    row.path.clone(),
                    flows.to_string(),
                    row.direction.to_owned(),
                    format!("{:.2}", row.median_gbps),
                    fmt(row.median_cpu_s_per_gb, 3),
                    fmt(row.cpu_over_floor, 2),
                    row.runs
                        .iter()
                        .map(|r| format!("{:.2}", r.gbps))
                        .collect::<Vec<_>>()
                        .join(" "),
                ]);
                rows.push(row);
            }
        }
    }
    Ok((rows, table))
}

// ---------------------------------------------------------------------------------------------------
// 2. Parallel flows.

/// The runs of one path, tunnel kind, worker count and flow count.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ParallelRow {
    pub(crate) path: String,
    /// `direct`, `pooled` (one HBONE connection for up to 100 streams) or `per-flow` (max streams 1).
    pub(crate) tunnel: &'static str,
    /// The cores the proxies ran on (each restricted to that many CPUs, with as many tokio workers
    /// or glommio executors); `None` for direct.
    pub(crate) cores: Option<usize>,
    pub(crate) flows: usize,
    pub(crate) median_gbps: f64,
    pub(crate) median_cpu_s_per_gb: Option<f64>,
    /// HBONE connections B held after the last run (the pool keeps them).
    pub(crate) hbone_connections: Option<usize>,
    pub(crate) runs: Vec<BulkRun>,
}

/// 2 cores against 1, for one path, tunnel kind and flow count.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ParallelRatio {
    pub(crate) path: String,
    pub(crate) tunnel: &'static str,
    pub(crate) flows: usize,
    pub(crate) gbps_1_core: f64,
    pub(crate) gbps_2_cores: f64,
    pub(crate) ratio: f64,
}

/// Shape 2's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Parallel {
    pub(crate) rows: Vec<ParallelRow>,
    pub(crate) ratios: Vec<ParallelRatio>,
}

/// Shape 2: 1..16 parallel upload flows, proxies on 1 and then 2 cores (restricted to that many
/// CPUs, with as many tokio workers or glommio executors), pooled and per-flow tunnels.
///
/// With [`Plan::confine_load`] the bench's own threads (senders and sink) are moved onto the same
/// CPUs for each run: left on every CPU, the load would take its share of a second CPU for free at
/// 1 core and out of the proxies' two at 2 cores, which caps the ratio below 2 even for a proxy
/// that scales perfectly. They run as `SCHED_BATCH` meanwhile (see [`sys::confine_threads`]).
pub(crate) async fn parallel(bench: &Bench) -> anyhow::Result<(Parallel, Table)> {
    let plan = &bench.plan;
    let max_flows = plan.flows.iter().copied().max().unwrap_or(1);
    // (binary index, tunnel, cores, pair)
    let mut pairs = Vec::new();
    for binary in &bench.binaries {
        for (tunnel, max_streams) in [("pooled", None), ("per-flow", Some(1))] {
            for cores in [1, 2] {
                let label = format!("{} {tunnel} {cores}c", binary.name);
                let options = PairOptions {
                    workers: cores,
                    cpus: Some(cores),
                    max_streams,
                    ..PairOptions::default()
                };
                let pair = Pair::start(&bench.work, binary, options, &label, bench.server.addr()).await?;
                if max_streams.is_some() {
                    // Open the tunnels before measuring: the runs measure the data path, not handshakes.
                    let held = pair
                        .guard(load::hold_open(pair.route(), bench.server.addr(), max_flows, max_flows))
                        .await
                        .with_context(|| format!("opening {max_flows} tunnels through {label}"))?;
                    drop(held);
                }
                pairs.push((binary.name.clone(), tunnel, Some(cores), Some(pair)));
            }
        }
    }
    let mut cases: Vec<(String, &'static str, Option<usize>, Option<&Pair>)> =
        vec![("direct".to_owned(), "direct", None, None)];
    cases.extend(pairs.iter().map(|(n, t, w, p)| (n.clone(), *t, *w, p.as_ref())));

    let duration = secs(plan.parallel_s);
    let mut runs: Vec<Vec<BulkRun>> = vec![Vec::new(); cases.len() * plan.flows.len()];
    for _ in 0..plan.repeat {
        for (f, &flows) in plan.flows.iter().enumerate() {
            for (c, (name, tunnel, cores, pair)) in cases.iter().enumerate() {
                let route = pair.map_or(Route::Direct, Pair::route);
                let confined = match cores {
                    Some(cores) if plan.confine_load => Some(sys::confine_threads(&sys::first_cpu_ids(*cores)?)?),
                    _ => None,
                };
                let result = measured(
                    *pair,
                    duration + Duration::from_secs(60),
                    load::bulk(route, &bench.server, Direction::Upload, flows, duration),
                )
                .await;
                drop(confined);
                let (moved, cost) = result.with_context(|| {
                    let c = cores.map(|c| format!(" {c} core(s)")).unwrap_or_default();
                    format!("{flows} parallel flows via {name} {tunnel}{c}")
                })?;
                runs[f * cases.len() + c].push(BulkRun::new(moved, cost));
            }
        }
    }

    let mut rows = Vec::new();
    for (f, &flows) in plan.flows.iter().enumerate() {
        for (c, (name, tunnel, cores, pair)) in cases.iter().enumerate() {
            let runs = std::mem::take(&mut runs[f * cases.len() + c]);
            rows.push(ParallelRow {
                path: name.clone(),
                tunnel,
                cores: *cores,
                flows,
                median_gbps: median(runs.iter().map(|r| r.gbps)).unwrap_or(0.0),
                median_cpu_s_per_gb: median(runs.iter().filter_map(|r| r.cpu_s_per_gb)),
                hbone_connections: pair.map(Pair::hbone_connections).transpose()?,
                runs,
            });
        }
    }
    let mut ratios = Vec::new();
    let mut table = Table::new(
        format!(
            "2. Parallel upload flows ({} s each, median of {}; both proxies restricted to 1 and then 2 CPUs, \
             with as many workers or executors{})",
            plan.parallel_s,
            plan.repeat,
            if plan.confine_load {
                ", and the bench's threads with them as SCHED_BATCH"
            } else {
                "; the bench's threads on every CPU"
            }
        ),
        &[
            "path",
            "tunnel",
            "flows",
            "Gbit/s 1 core",
            "Gbit/s 2 cores",
            "2c/1c",
            "CPU-s/GB 1 core",
            "CPU-s/GB 2 cores",
            "CPUs busy 2 cores",
            "HBONE conns",
        ],
    );
    for &flows in &plan.flows {
        let find = |name: &str, tunnel: &str, cores: Option<usize>| {
            rows.iter()
                .find(|r| r.path == name && r.tunnel == tunnel && r.cores == cores && r.flows == flows)
        };
        if let Some(direct) = find("direct", "direct", None) {
            table.row(vec![
                "direct".into(),
                "-".into(),
                flows.to_string(),
                format!("{:.2}", direct.median_gbps),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for binary in &bench.binaries {
            for tunnel in ["pooled", "per-flow"] {
                let (Some(one), Some(two)) = (find(&binary.name, tunnel, Some(1)), find(&binary.name, tunnel, Some(2)))
                else {
                    continue;
                };
                let ratio = two.median_gbps / one.median_gbps;
                table.row(vec![
                    binary.name.clone(),
                    tunnel.into(),
                    flows.to_string(),
                    format!("{:.2}", one.median_gbps),
                    format!("{:.2}", two.median_gbps),
                    format!("{ratio:.2}x"),
                    fmt(one.median_cpu_s_per_gb, 3),
                    fmt(two.median_cpu_s_per_gb, 3),
                    busy(two),
                    format!(
                        "{}/{}",
                        one.hbone_connections.unwrap_or(0),
                        two.hbone_connections.unwrap_or(0)
                    ),
                ]);
                ratios.push(ParallelRatio {
                    path: binary.name.clone(),
                    tunnel,
                    flows,
                    gbps_1_core: one.median_gbps,
                    gbps_2_cores: two.median_gbps,
                    ratio,
                });
            }
        }
    }
    Ok((Parallel { rows, ratios }, table))
}

/// The CPUs the proxies and the bench kept busy during a row's runs (CPU seconds over elapsed
/// seconds, medians), as `proxies + bench`.
fn busy(row: &ParallelRow) -> String {
    let proxies = median(
        row.runs
            .iter()
            .filter_map(|r| r.cost.proxy_cpu_s.map(|c| c / r.seconds)),
    );
    let bench = median(row.runs.iter().map(|r| r.cost.bench_cpu_s / r.seconds));
    match (proxies, bench) {
        (Some(p), Some(b)) => format!("{p:.2} + {b:.2}"),
        _ => "-".into(),
    }
}

// ---------------------------------------------------------------------------------------------------
// 3. Request/response.

/// One request/response run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RrRun {
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    pub(crate) requests_per_s: f64,
    pub(crate) latency: Percentiles,
    /// Proxy CPU milliseconds per 1000 requests (CPU seconds per million); `None` for direct.
    pub(crate) cpu_ms_per_1000: Option<f64>,
    #[serde(flatten)]
    pub(crate) cost: Cost,
}

/// The runs of one path and mode.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RrRow {
    pub(crate) path: String,
    /// `fixed` (at `rr_rate` per second) or `closed` (closed loop, one request at a time).
    pub(crate) mode: &'static str,
    pub(crate) median_requests_per_s: f64,
    pub(crate) latency: Percentiles,
    /// Median latency minus the direct connection's, same mode; `None` for direct.
    pub(crate) added: Option<Percentiles>,
    /// Added p50 and p99 over the forwarder pair's added p50 and p99, same mode; `None` for direct
    /// and the forwarder.
    pub(crate) added_over_forwarder: Option<(f64, f64)>,
    /// CPU per request over the forwarder pair's; `None` for direct and the forwarder.
    pub(crate) cpu_over_forwarder: Option<f64>,
    pub(crate) median_cpu_ms_per_1000: Option<f64>,
    /// Proxy CPU as a percentage of one core during the run.
    pub(crate) median_core_percent: Option<f64>,
    pub(crate) runs: Vec<RrRun>,
}

/// Shape 3: 1 KiB request/response at a fixed rate and in a closed loop.
pub(crate) async fn request_response(bench: &Bench) -> anyhow::Result<(Vec<RrRow>, Table)> {
    let plan = &bench.plan;
    let cases = bench.cases();
    let modes = ["fixed", "closed"];
    let mut runs: Vec<Vec<RrRun>> = vec![Vec::new(); cases.len() * modes.len()];
    let server = bench.server.addr();
    for _ in 0..plan.repeat {
        for (m, mode) in modes.iter().enumerate() {
            for (c, case) in cases.iter().enumerate() {
                let route = case.route();
                let (exchanges, cost) = if *mode == "fixed" {
                    let d = secs(plan.rr_fixed_s);
                    measured(
                        case.pair,
                        d + Duration::from_secs(60),
                        load::request_response_fixed(route, server, plan.rr_rate, d),
                    )
                    .await
                } else {
                    let d = secs(plan.rr_closed_s);
                    measured(
                        case.pair,
                        d + Duration::from_secs(60),
                        load::request_response_closed(route, server, d),
                    )
                    .await
                }
                .with_context(|| context_of(case, &format!("request/response ({mode})")))?;
                let requests = exchanges.latency.len();
                runs[m * cases.len() + c].push(RrRun {
                    requests,
                    seconds: exchanges.elapsed.as_secs_f64(),
                    requests_per_s: requests as f64 / exchanges.elapsed.as_secs_f64(),
                    latency: Percentiles::of(&exchanges.latency),
                    cpu_ms_per_1000: cost.proxy_cpu_s.map(|c| c * 1e6 / requests.max(1) as f64),
                    cost,
                });
            }
        }
    }
    let mut rows: Vec<RrRow> = Vec::new();
    let mut table = Table::new(
        format!(
            "3. Request/response, 1 KiB each way, one connection ({}/s for {} s; closed loop for {} s; median of {}; \
             latency in us)",
            plan.rr_rate, plan.rr_fixed_s, plan.rr_closed_s, plan.repeat
        ),
        &[
            "path",
            "mode",
            "req/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "added p50",
            "added p90",
            "added p99",
            "added p99.9",
            "CPU-ms/1000 req",
            "% of a core",
            "x fwd: added p50, p99, CPU",
        ],
    );
    let forwarder = cases.iter().position(|c| c.name == FORWARDER);
    for (m, mode) in modes.iter().enumerate() {
        let mut direct: Option<Percentiles> = None;
        // The forwarder's added latency and CPU per request, for the ratios.
        let reference = forwarder.and_then(|f| {
            let direct = cases.iter().position(|c| c.pair.is_none())?;
            let of = |c: usize| {
                Percentiles::median_of(&runs[m * cases.len() + c].iter().map(|r| r.latency).collect::<Vec<_>>())
            };
            let added = of(f).minus(&of(direct));
            let cpu = median(runs[m * cases.len() + f].iter().filter_map(|r| r.cpu_ms_per_1000))?;
            Some((added, cpu))
        });
        for (c, case) in cases.iter().enumerate() {
            let runs = std::mem::take(&mut runs[m * cases.len() + c]);
            let latency = Percentiles::median_of(&runs.iter().map(|r| r.latency).collect::<Vec<_>>());
            let added = match (case.pair, direct) {
                (Some(_), Some(base)) => Some(latency.minus(&base)),
                _ => None,
            };
            if case.pair.is_none() {
                direct = Some(latency);
            }
            let median_cpu_ms_per_1000 = median(runs.iter().filter_map(|r| r.cpu_ms_per_1000));
            let ratios = match (case.name, added, reference) {
                (FORWARDER, ..) => None,
                (_, Some(added), Some((base, cpu))) => Some((
                    (added.p50_us / base.p50_us, added.p99_us / base.p99_us),
                    median_cpu_ms_per_1000.map(|c| c / cpu),
                )),
                _ => None,
            };
            let row = RrRow {
                path: case.name.to_owned(),
                mode,
                median_requests_per_s: median(runs.iter().map(|r| r.requests_per_s)).unwrap_or(0.0),
                latency,
                added,
                added_over_forwarder: ratios.map(|r| r.0),
                cpu_over_forwarder: ratios.and_then(|r| r.1),
                median_cpu_ms_per_1000,
                median_core_percent: median(
                    runs.iter()
                        .filter_map(|r| r.cost.proxy_cpu_s.map(|c| c / r.seconds * 100.0)),
                ),
                runs,
            };
            let a = |f: fn(&Percentiles) -> f64| row.added.as_ref().map(f);
            table.row(vec![
                row.path.clone(),
                if *mode == "fixed" {
                    format!("{}/s", plan.rr_rate)
                } else {
                    "closed loop".to_owned()
                },
                format!("{:.0}", row.median_requests_per_s),
                format!("{:.0}", row.latency.p50_us),
                format!("{:.0}", row.latency.p90_us),
                format!("{:.0}", row.latency.p99_us),
                format!("{:.0}", row.latency.p999_us),
                fmt(a(|p| p.p50_us), 0),
                fmt(a(|p| p.p90_us), 0),
                fmt(a(|p| p.p99_us), 0),
                fmt(a(|p| p.p999_us), 0),
                fmt(row.median_cpu_ms_per_1000, 1),
                fmt(row.median_core_percent, 1),
                match row.added_over_forwarder {
                    Some((p50, p99)) => format!("{p50:.2}, {p99:.2}, {}", fmt(row.cpu_over_forwarder, 2)),
                    None => "-".to_owned(),
                },
            ]);
            rows.push(row);
        }
    }
    Ok((rows, table))
}

// ---------------------------------------------------------------------------------------------------
// 4. New connections.

/// One run of new connections.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnRun {
    pub(crate) connections: u64,
    pub(crate) seconds: f64,
    pub(crate) per_second: f64,
    /// From connect to the first echoed byte.
    pub(crate) latency: Percentiles,
    /// Proxy CPU seconds per 1000 connections (= CPU milliseconds per connection); `None` for direct.
    pub(crate) cpu_s_per_1000: Option<f64>,
    /// HBONE connections B held at the end of the run.
    pub(crate) hbone_connections: Option<usize>,
    #[serde(flatten)]
    pub(crate) cost: Cost,
}

/// The runs of one path and kind.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnRow {
    pub(crate) path: String,
    /// `pooled`: short connections over the existing tunnel; `handshake`: each connection on a new
    /// HBONE connection (full mTLS handshake).
    pub(crate) kind: &'static str,
    pub(crate) median_per_second: f64,
    pub(crate) median_cpu_s_per_1000: Option<f64>,
    pub(crate) latency: Percentiles,
    pub(crate) runs: Vec<ConnRun>,
}

/// Shape 4: connections per second over an existing tunnel, and each with a full mTLS handshake.
///
/// The handshake runs use a fresh pair per run whose proxy A allows one stream per HBONE connection
/// and keep every connection open until the end of the run, so that each new connection needs a new
/// HBONE connection (TLS resumption is off in meshwire, so each is a full handshake; the
/// pool's idle release does not help here: a released connection would be replaced by a pooled one).
pub(crate) async fn connections(bench: &Bench) -> anyhow::Result<(Vec<ConnRow>, Table)> {
    let plan = &bench.plan;
    let cases = bench.cases();
    let server = bench.server.addr();
    let churn = secs(plan.churn_s);
    let mut pooled: Vec<Vec<ConnRun>> = vec![Vec::new(); cases.len()];
    let mut handshake: Vec<Vec<ConnRun>> = vec![Vec::new(); bench.binaries.len()];
    let run = |opened: &load::Opened, cost: Cost, hbone: Option<usize>| ConnRun {
        connections: opened.connections,
        seconds: opened.elapsed.as_secs_f64(),
        per_second: opened.connections as f64 / opened.elapsed.as_secs_f64(),
        latency: Percentiles::of(&opened.latency),
        cpu_s_per_1000: cost.proxy_cpu_s.map(|c| c * 1000.0 / opened.connections.max(1) as f64),
        hbone_connections: hbone,
        cost,
    };
    for _ in 0..plan.repeat {
        for (c, case) in cases.iter().enumerate() {
            let (opened, cost) = measured(
                case.pair,
                churn + Duration::from_secs(60),
                load::connections(case.route(), server, plan.churn_concurrency, churn, u64::MAX, false),
            )
            .await
            .with_context(|| context_of(case, "new connections over the pooled tunnel"))?;
            let hbone = match case.name {
                // The forwarder has no tunnel.
                FORWARDER => None,
                _ => case.pair.map(Pair::hbone_connections).transpose()?,
            };
            pooled[c].push(run(&opened, cost, hbone));
        }
        for (b, binary) in bench.binaries.iter().enumerate() {
            let label = format!("{} handshake", binary.name);
            let options = PairOptions {
                max_streams: Some(1),
                ..PairOptions::default()
            };
            let pair = Pair::start(&bench.work, binary, options, &label, server).await?;
            // The first connection took the HBONE connection the start-up check left idle in the pool.
            let first = pair.guard(load::open_echoed(pair.route(), server)).await?;
            let n = plan.handshake_connections as u64;
            let (opened, cost) = measured(
                Some(&pair),
                Duration::from_secs(300),
                load::connections(
                    pair.route(),
                    server,
                    plan.churn_concurrency,
                    Duration::from_secs(240),
                    n,
                    true,
                ),
            )
            .await
            .with_context(|| format!("{n} connections with a full handshake each via {}", binary.name))?;
            let hbone = pair.hbone_connections()?;
            if opened.connections < n || opened.held.len() as u64 != opened.connections {
                bail!(
                    "only {} of {n} connections with a handshake each were opened via {} in time",
                    opened.connections,
                    binary.name
                );
            }
            // Every held connection plus the first must have its own HBONE connection.
            if (hbone as u64) < n + 1 {
                bail!(
                    "{n} held connections via {} share {hbone} HBONE connections: the handshake count is not \
                     what it should be",
                    binary.name
                );
            }
            handshake[b].push(run(&opened, cost, Some(hbone)));
            drop(opened);
            drop(first);
        }
    }
    let mut rows = Vec::new();
    let mut table = Table::new(
        format!(
            "4. New connections ({} clients at once; pooled: {} s of connect, 1-byte echo, close; handshake: {} \
             connections held open, one stream per HBONE connection; median of {}; latency in us)",
            plan.churn_concurrency, plan.churn_s, plan.handshake_connections, plan.repeat
        ),
        &[
            "path",
            "kind",
            "conns/s",
            "CPU-s/1000 conns",
            "p50",
            "p99",
            "HBONE conns",
        ],
    );
    let mut push = |name: &str, kind: &'static str, runs: Vec<ConnRun>| {
        let row = ConnRow {
            path: name.to_owned(),
            kind,
            median_per_second: median(runs.iter().map(|r| r.per_second)).unwrap_or(0.0),
            median_cpu_s_per_1000: median(runs.iter().filter_map(|r| r.cpu_s_per_1000)),
            latency: Percentiles::median_of(&runs.iter().map(|r| r.latency).collect::<Vec<_>>()),
            runs,
        };
        table.row(vec![
            row.path.clone(),
            kind.to_owned(),
            format!("{:.0}", row.median_per_second),
            fmt(row.median_cpu_s_per_1000, 3),
            format!("{:.0}", row.latency.p50_us),
            format!("{:.0}", row.latency.p99_us),
            row.runs
                .last()
                .and_then(|r| r.hbone_connections)
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        ]);
        rows.push(row);
    };
    for (case, runs) in cases.iter().zip(pooled) {
        let kind = match (case.name, case.pair) {
            (FORWARDER, _) => "plain",
            (_, Some(_)) => "pooled",
            (_, None) => "direct",
        };
        push(case.name, kind, runs);
    }
    for (binary, runs) in bench.binaries.iter().zip(handshake) {
        push(&binary.name, "handshake", runs);
    }
    Ok((rows, table))
}

// ---------------------------------------------------------------------------------------------------
// 5. Idle connections.

/// Resident memory of both proxies, in KiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Rss {
    pub(crate) a_kib: u64,
    pub(crate) b_kib: u64,
    pub(crate) total_kib: u64,
}

impl Rss {
    fn of(pair: &Pair) -> anyhow::Result<Rss> {
        let (a, b) = pair.rss()?;
        Ok(Rss {
            a_kib: a / 1024,
            b_kib: b / 1024,
            total_kib: (a + b) / 1024,
        })
    }
}

/// Memory with idle connections, per binary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleRow {
    pub(crate) path: String,
    pub(crate) connections: usize,
    /// Seconds it took to open them all.
    pub(crate) open_seconds: f64,
    pub(crate) hbone_connections: usize,
    /// After start and one connection.
    pub(crate) rss_before: Rss,
    /// With every connection open and idle.
    pub(crate) rss_held: Rss,
    /// 1 s after they all closed.
    pub(crate) rss_after: Rss,
    /// [`Plan::idle_settle_s`] after they all closed.
    pub(crate) rss_settled: Rss,
    /// `rss_settled` over `rss_before`, both proxies together (1.0: all memory back).
    pub(crate) settled_over_idle: f64,
    /// What the allocator counts as held by both proxies (bytes), before, held and settled (when
    /// the binaries export `meshwire_allocator_bytes`): memory still in use, as against pages the
    /// allocator has not given back.
    pub(crate) allocated_before: Option<u64>,
    pub(crate) allocated_held: Option<u64>,
    pub(crate) allocated_settled: Option<u64>,
    /// (held - before) / connections, both proxies together.
    pub(crate) bytes_per_connection: f64,
}

/// Shape 5: N idle connections through a fresh pair: resident memory per connection, and after close.
pub(crate) async fn idle(bench: &Bench) -> anyhow::Result<(Vec<IdleRow>, Table)> {
    let n = bench.plan.idle_connections;
    // The server's ends of the connections are in a process of their own: the open-file limit then
    // needs to hold only one end per process.
    let server_process = ServerProcess::start().await?;
    let server = server_process.addr();
    let server_pid = server_process.pid();
    let std::net::SocketAddr::V4(server_v4) = server else {
        bail!("the server is not on IPv4");
    };
    let mut rows = Vec::new();
    let mut table = Table::new(
        format!(
            "5. {n} idle connections through a fresh pair (2 workers, pooled): resident memory of both proxies, \
             MiB as total (A + B); later: {} s after the last connection closed",
            bench.plan.idle_settle_s.max(1.0)
        ),
        &[
            "path",
            "HBONE conns",
            "RSS before",
            "RSS held",
            "bytes/conn",
            "RSS 1 s after close",
            "RSS later",
            "later / before",
            "allocated: before / held / later",
            "open s",
        ],
    );
    let settle = Duration::from_secs_f64(bench.plan.idle_settle_s.max(1.0));
    for binary in &bench.binaries {
        let pair = Pair::start(
            &bench.work,
            binary,
            PairOptions::default(),
            &format!("{} idle", binary.name),
            server,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_before = Rss::of(&pair)?;
        let allocated_before = pair.allocated().await;
        let started = Instant::now();
        let held = pair
            .guard(async {
                match tokio::time::timeout(Duration::from_secs(300), load::hold_open(pair.route(), server, n, 32)).await
                {
                    Ok(r) => r,
                    Err(_) => bail!("{n} connections not open within 300 s"),
                }
            })
            .await
            .with_context(|| format!("opening {n} idle connections via {}", binary.name))?;
        let open_seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_held = Rss::of(&pair)?;
        let allocated_held = pair.allocated().await;
        let hbone_connections = pair.hbone_connections()?;
        drop(held);
        // Wait until B closed every connection to the server, then a little more.
        let deadline = Instant::now() + Duration::from_secs(30);
        while sys::established_to(server_pid, server_v4)? > 0 {
            if Instant::now() > deadline {
                bail!(
                    "{} connections to the server still open 30 s after the clients closed theirs via {}",
                    sys::established_to(server_pid, server_v4)?,
                    binary.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = Rss::of(&pair)?;
        tokio::time::sleep(settle - Duration::from_secs(1)).await;
        let rss_settled = Rss::of(&pair)?;
        let allocated_settled = pair.allocated().await;
        let row = IdleRow {
            path: binary.name.clone(),
            connections: n,
            open_seconds,
            hbone_connections,
            rss_before,
            rss_held,
            rss_after,
            rss_settled,
            settled_over_idle: rss_settled.total_kib as f64 / rss_before.total_kib.max(1) as f64,
            allocated_before,
            allocated_held,
            allocated_settled,
            bytes_per_connection: (rss_held.total_kib as f64 - rss_before.total_kib as f64) * 1024.0 / n as f64,
        };
        let mib = |r: &Rss| format!("{:.1} ({:.1} + {:.1})", mb(r.total_kib), mb(r.a_kib), mb(r.b_kib));
        table.row(vec![
            row.path.clone(),
            row.hbone_connections.to_string(),
            mib(&row.rss_before),
            mib(&row.rss_held),
            format!("{:.0}", row.bytes_per_connection),
            mib(&row.rss_after),
            mib(&row.rss_settled),
            format!("{:.2}", row.settled_over_idle),
            match (row.allocated_before, row.allocated_held, row.allocated_settled) {
                (Some(before), Some(held), Some(settled)) => format!(
                    "{:.1} / {:.1} / {:.1}",
                    before as f64 / 1048576.0,
                    held as f64 / 1048576.0,
                    settled as f64 / 1048576.0
                ),
                _ => "-".to_owned(),
            },
            format!("{:.1}", row.open_seconds),
        ]);
        rows.push(row);
    }
    Ok((rows, table))
}

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
