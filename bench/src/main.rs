//! `meshwire-bench`: the dataplane benchmark.
//!
//! Starts pairs of real proxy processes on loopback (proxy A serves the workload `client` at 127.0.0.1
//! and takes SOCKS5; proxy B serves the workload `server` at 127.0.0.2 and receives HBONE on
//! 127.0.0.2), a sink/echo server on 127.0.0.2 in this process, and measures the shapes of
//! `PERFORMANCE.md` through each proxy binary and over a direct TCP connection in the same run:
//! bulk, parallel flows, request/response, new connections, idle connections; and the DNS proxy of
//! one proxy per binary (queries answered locally and forwarded). Prints a table per shape;
//! `--json FILE` writes every figure.
//!
//! With `--topology veth` the two nodes are two network namespaces joined by a veth pair (client
//! node: this process and proxy A; server node: proxy B and the server's sockets), as two nodes of a
//! cluster. The floor references are measured in the same run: a plain userspace forwarder pair
//! (shapes 1, 3 and 4, as a path of its own) and ring's AES-GCM; shapes 1 and 3 print each proxy's
//! figures as ratios to them.
//!
//! ```text
//! cargo build --release -p meshwire-dataplane -p meshwire-dataplane-uring -p meshwire-bench
//! target/release/meshwire-bench --json bench.json --svg parallel.svg
//! target/release/meshwire-bench --topology veth --only bulk,rr,connections,idle
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;

mod client;
mod dns;
mod floor;
mod istiod;
mod load;
mod nodes;
mod plot;
mod proxy;
mod report;
mod server;
mod shapes;
mod sys;
mod xds;

use proxy::{Binary, Pair, PairOptions, Workdir};
use report::Table;
use shapes::{Bench, Plan};

/// The dataplane benchmark: pairs of real proxy processes on loopback against a direct TCP connection.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The `ztunnel` binary (meshwire-dataplane). Default: `ztunnel` next to this executable.
    #[arg(long, value_name = "PATH")]
    ztunnel: Option<PathBuf>,
    /// A proxy binary to measure, as NAME=PATH; repeatable; the binaries are shown side by side.
    /// Default: `ztunnel` and `ztunnel-uring` next to this executable (the second if it is there).
    #[arg(long = "binary", value_name = "NAME=PATH")]
    binaries: Vec<String>,
    /// Write every figure to this file as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw shape 2 (parallel flows, 1 and 2 cores) as an SVG plot in this file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Where the two nodes of each pair are: on this host's loopback, or in two network namespaces
    /// joined by a veth pair (needs root; the dns and xds shapes run on loopback only).
    #[arg(long, value_enum, default_value = "loopback")]
    topology: nodes::Topology,
    /// Run only these shapes (repeatable or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Shape>,
    /// Short durations and small counts, for a smoke test.
    #[arg(long)]
    quick: bool,
    /// Runs of each measurement, interleaved; medians are reported. Default 3 (1 with --quick).
    #[arg(long, value_name = "N")]
    repeat: Option<usize>,
    /// Idle connections held open in the idle shape. Default 10000 (300 with --quick).
    #[arg(long, value_name = "N")]
    idle_connections: Option<usize>,
    /// Workloads of the xds shape's mesh (and a tenth as many services). Default 10000 (1000 with
    /// --quick).
    #[arg(long, value_name = "N")]
    xds_workloads: Option<usize>,
    /// `--xds-priority` of the xds shape's proxies (the thread that applies pushes at SCHED_IDLE, or
    /// at the default policy). Default: the proxies' default (idle).
    #[arg(long, value_name = "idle|normal", value_parser = ["idle", "normal"])]
    xds_priority: Option<String>,
    /// `--xds-cpu-share` of the xds shape's proxies (the share of one CPU a push takes while it is
    /// applied; 1: at once). Default: the proxies' default.
    #[arg(long, value_name = "SHARE")]
    xds_cpu_share: Option<f64>,
    /// Connections opened with a full mTLS handshake each, per run. Default 300 (30 with --quick).
    #[arg(long, value_name = "N")]
    handshake_connections: Option<usize>,
    /// Flow counts of the parallel shape (comma-separated). Default 1,2,4,8,16.
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    flows: Vec<usize>,
    /// Seconds of each parallel-flow run. Default 2 (0.25 with --quick).
    #[arg(long, value_name = "S")]
    parallel_seconds: Option<f64>,
    /// In the parallel shape, leave the bench's own threads (clients and server) on all CPUs at the
    /// default policy instead of confining them to the proxies' CPUs as SCHED_BATCH during each run.
    #[arg(long)]
    free_load: bool,
}

/// A benchmark shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// 1. Bulk, one flow, each direction.
    Bulk,
    /// 2. Parallel flows, 1 and 2 cores, pooled and per-flow tunnels.
    Parallel,
    /// 3. Request/response, fixed rate and closed loop.
    Rr,
    /// 4. New connections: over an existing tunnel and with a full handshake each.
    Connections,
    /// 5. Idle connections: memory per connection.
    Idle,
    /// 8. DNS proxy: UDP queries answered locally and forwarded.
    Dns,
    /// 7. istiod's pushes of a 10,000-workload mesh applied (not in the default set: about a minute).
    Xds,
}

/// Everything written with `--json`.
#[derive(Serialize)]
struct Report {
    machine: Machine,
    plan: Plan,
    binaries: Vec<BinaryJson>,
    /// The floor references' AES-GCM cost (measured with shapes 1 and 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    aes: Option<floor::Aes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bulk: Option<Vec<shapes::BulkRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel: Option<shapes::Parallel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_response: Option<Vec<shapes::RrRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<Vec<shapes::ConnRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<Vec<shapes::IdleRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xds: Option<xds::XdsReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<Vec<dns::DnsRow>>,
    total_seconds: f64,
}

#[derive(Serialize)]
struct Machine {
    cpu: String,
    cpus: usize,
    kernel: String,
    note: &'static str,
}

impl Machine {
    /// `Linux <kernel>`, for titles.
    fn kernel_cpu(&self) -> String {
        format!("Linux {}", self.kernel)
    }
}

#[derive(Serialize)]
struct BinaryJson {
    name: String,
    path: PathBuf,
}

const CAVEAT: &str = "The bench process (clients and server, tokio, one thread per CPU) runs on the same CPUs as \
                      both proxies and competes with them; it is never niced. Only shape 2 restricts the \
                      proxies, to 1 and then 2 CPUs, and moves the bench's threads onto the same CPUs, as \
                      SCHED_BATCH threads that do not preempt a proxy when they wake, for each run (unless \
                      --free-load), so that the load takes its share of 1 CPU as of 2. Compare only figures \
                      of one run.";

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some(floor::FORWARD_FLAG) {
        let args: Vec<String> = std::env::args().skip(2).collect();
        return match floor::forward(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("meshwire-bench forwarder: error: {err:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if std::env::args().nth(1).as_deref() == Some(server::SERVE_FLAG) {
        return match server::serve_until_stdin_closes(std::env::args().nth(2).as_deref()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("meshwire-bench server: error: {err:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("meshwire-bench: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let veth = cli.topology == nodes::Topology::Veth;
    let shapes: Vec<Shape> = if cli.only.is_empty() {
        Shape::value_variants()
            .iter()
            .copied()
            .filter(|s| *s != Shape::Xds && !(veth && *s == Shape::Dns))
            .collect()
    } else {
        cli.only.clone()
    };
    if veth && let Some(shape) = shapes.iter().find(|s| matches!(s, Shape::Dns | Shape::Xds)) {
        bail!("--topology veth: the {shape:?} shape runs on loopback only");
    }
    let binaries = binaries(&cli)?;
    let plan = plan(&cli);
    // Before any thread starts: with veth, this thread moves into the client node, and every thread
    // started after it is there too.
    let _nodes = nodes::Nodes::set_up(cli.topology).context("setting up the nodes (--topology)")?;
    // The clients' ends of every idle connection live in this process (the server's in a child of
    // its own); the proxies, each holding one end of each too, inherit the limit.
    let needed = if shapes.contains(&Shape::Idle) {
        plan.idle_connections as u64 + 4096
    } else {
        4096
    };
    sys::raise_nofile(needed).context("raising the open-file limit (RLIMIT_NOFILE)")?;

    let (cpu, cpus, kernel) = sys::machine();
    println!("meshwire-bench: {cpu}, {cpus} CPUs, Linux {kernel}");
    println!("{CAVEAT}");
    for b in &binaries {
        println!("binary {}: {}", b.name, b.path.display());
    }
    println!(
        "nodes: {}",
        match cli.topology {
            nodes::Topology::Loopback => "loopback (client 127.0.0.1, server 127.0.0.2)".to_owned(),
            nodes::Topology::Veth => format!(
                "two network namespaces joined by a veth pair (client {}, server {})",
                nodes::client_ip(),
                nodes::server_ip()
            ),
        }
    );
    // The floor references: AES-GCM here, the forwarder pair with the proxies' pairs below.
    let floor = shapes
        .iter()
        .any(|s| matches!(s, Shape::Bulk | Shape::Rr | Shape::Connections));
    let aes = if floor {
        let aes = floor::aes(if cli.quick { 0.1 } else { 1.0 })?;
        println!(
            "floor: AES-256-GCM (ring) on one core: seal {:.2} GB/s, open {:.2} GB/s: {:.3} CPU-s/GB to encrypt \
             and decrypt each byte once; the forwarder pair (no TLS, no HTTP/2, 2 workers) is measured as the \
             path `{}`",
            aes.seal_gb_per_s,
            aes.open_gb_per_s,
            aes.cpu_s_per_gb,
            floor::FORWARDER
        );
        Some(aes)
    } else {
        None
    };
    println!();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let started = Instant::now();
    let mut report = Report {
        machine: Machine {
            cpu,
            cpus,
            kernel,
            note: CAVEAT,
        },
        plan: plan.clone(),
        binaries: binaries
            .iter()
            .map(|b| BinaryJson {
                name: b.name.clone(),
                path: b.path.clone(),
            })
            .collect(),
        bulk: None,
        parallel: None,
        request_response: None,
        connections: None,
        idle: None,
        xds: None,
        dns: None,
        aes,
        total_seconds: 0.0,
    };
    let tmp = tempfile::Builder::new()
        .prefix("meshwire-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    runtime.block_on(async {
        let work = Workdir::create(tmp.path())?;
        let server = server::Server::start(nodes::server_ip())?;
        let mut pairs = Vec::new();
        let mut forwarder = None;
        if floor {
            for binary in &binaries {
                let label = format!("{} default", binary.name);
                pairs.push(Pair::start(&work, binary, PairOptions::default(), &label, server.addr()).await?);
            }
            let binary = Binary::forwarder()?;
            let label = format!("{} default", binary.name);
            forwarder = Some(Pair::start(&work, &binary, PairOptions::default(), &label, server.addr()).await?);
        }
        let bench = Bench {
            server,
            work,
            binaries: binaries.clone(),
            plan,
            pairs,
            forwarder,
            aes,
        };
        for shape in &shapes {
            let table = match shape {
                Shape::Bulk => keep(&mut report.bulk, shapes::bulk(&bench).await?),
                Shape::Parallel => {
                    let (parallel, table) = shapes::parallel(&bench).await?;
                    println!("{}", table.render());
                    for line in plot::scaling_summary(&parallel) {
                        println!("{line}");
                    }
                    println!();
                    if let Some(path) = &cli.svg {
                        let title = format!(
                            "Parallel upload flows through two proxies ({}, {} CPUs)",
                            report.machine.kernel_cpu(),
                            report.machine.cpus
                        );
                        std::fs::write(path, plot::parallel_svg(&parallel, &title))
                            .with_context(|| format!("writing {}", path.display()))?;
                        println!("plot written to {}\n", path.display());
                    }
                    report.parallel = Some(parallel);
                    continue;
                }
                Shape::Rr => keep(&mut report.request_response, shapes::request_response(&bench).await?),
                Shape::Connections => keep(&mut report.connections, shapes::connections(&bench).await?),
                Shape::Idle => keep(&mut report.idle, shapes::idle(&bench).await?),
                Shape::Dns => keep(&mut report.dns, dns::dns(&bench).await?),
                Shape::Xds => {
                    let (xds, tables, verdict) = xds::xds(&bench).await?;
                    for table in tables {
                        println!("{}", table.render());
                    }
                    println!("{verdict}\n");
                    report.xds = Some(xds);
                    continue;
                }
            };
            println!("{}", table.render());
        }
        anyhow::Ok(())
    })?;
    // The pairs are gone (killed) with `bench`; the runtime's remaining server tasks go with it.
    drop(runtime);
    report.total_seconds = started.elapsed().as_secs_f64();
    println!("total: {:.0} s", report.total_seconds);
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report).context("encoding the JSON report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// Puts a shape's rows into their place in the report; returns its table.
fn keep<T>(slot: &mut Option<T>, (rows, table): (T, Table)) -> Table {
    *slot = Some(rows);
    table
}

fn plan(cli: &Cli) -> Plan {
    let quick = cli.quick;
    Plan {
        topology: cli.topology,
        repeat: cli.repeat.unwrap_or(if quick { 1 } else { 3 }).max(1),
        bulk_s: if quick { 0.5 } else { 4.0 },
        parallel_s: cli
            .parallel_seconds
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(if quick { 0.25 } else { 2.0 }),
        confine_load: !cli.free_load,
        flows: if cli.flows.iter().any(|&f| f > 0) {
            cli.flows.iter().copied().filter(|&f| f > 0).collect()
        } else {
            vec![1, 2, 4, 8, 16]
        },
        rr_rate: 1000,
        rr_fixed_s: if quick { 1.0 } else { 10.0 },
        rr_closed_s: if quick { 0.5 } else { 3.0 },
        churn_s: if quick { 0.5 } else { 3.0 },
        churn_concurrency: 4,
        handshake_connections: cli.handshake_connections.unwrap_or(if quick { 30 } else { 300 }).max(1),
        idle_connections: cli.idle_connections.unwrap_or(if quick { 300 } else { 10_000 }).max(1),
        idle_settle_s: if quick { 2.0 } else { 10.0 },
        xds_workloads: cli.xds_workloads.unwrap_or(if quick { 1000 } else { 10_000 }).max(1),
        xds_rr_s: if quick { 1.0 } else { 10.0 },
        xds_priority: match cli.xds_priority.as_deref() {
            Some("normal") => Some("normal"),
            Some(_) => Some("idle"),
            None => None,
        },
        xds_cpu_share: cli.xds_cpu_share,
        dns_s: if quick { 0.5 } else { 2.0 },
        dns_in_flight: 64,
    }
}

/// The proxy binaries to measure: `--binary` entries, then `--ztunnel` (or the default `ztunnel`
/// next to this executable) unless a `--binary ztunnel=...` named it already. Each must exist.
fn binaries(cli: &Cli) -> anyhow::Result<Vec<Binary>> {
    let mut list = Vec::new();
    for spec in &cli.binaries {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--binary {spec:?}: expected NAME=PATH");
        };
        if name.is_empty() || path.is_empty() {
            bail!("--binary {spec:?}: expected NAME=PATH with neither empty");
        }
        if list.iter().any(|b: &Binary| b.name == name) {
            bail!("--binary {spec:?}: the name {name} is given twice");
        }
        if name == floor::FORWARDER {
            bail!("--binary {spec:?}: the name {name} is the floor reference's");
        }
        list.push(Binary {
            name: name.to_owned(),
            path: PathBuf::from(path),
            kind: proxy::Kind::Proxy,
        });
    }
    if let Some(path) = &cli.ztunnel {
        if list.iter().any(|b| b.name == "ztunnel") {
            bail!("both --ztunnel and --binary ztunnel=... name the ztunnel binary");
        }
        list.insert(
            0,
            Binary {
                name: "ztunnel".to_owned(),
                path: path.clone(),
                kind: proxy::Kind::Proxy,
            },
        );
    } else if list.is_empty() {
        let exe = std::env::current_exe().context("locating this executable")?;
        let dir = exe.parent().unwrap_or(Path::new("."));
        list.push(Binary {
            name: "ztunnel".to_owned(),
            path: dir.join("ztunnel"),
            kind: proxy::Kind::Proxy,
        });
        let uring = dir.join("ztunnel-uring");
        if uring.is_file() {
            list.push(Binary {
                name: "ztunnel-uring".to_owned(),
                path: uring,
                kind: proxy::Kind::Proxy,
            });
        } else {
            println!(
                "note: {} not found, measuring ztunnel alone (build it with: cargo build --release -p \
                 meshwire-dataplane-uring)",
                uring.display()
            );
        }
    }
    for b in &list {
        if !b.path.is_file() {
            let profile = if b.name == "ztunnel" {
                "\n  build it with: cargo build --release -p meshwire-dataplane --bin ztunnel\n  (then run this \
                 bench from the same target directory, or pass --ztunnel PATH)"
            } else {
                ""
            };
            bail!("proxy binary {} not found at {}{profile}", b.name, b.path.display());
        }
    }
    Ok(list)
}
