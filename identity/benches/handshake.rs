//! Single-core throughput of the identity layer: mutual-TLS handshakes, local-CA issuance and
//! per-destination client-config builds.
//!
//! Run it with
//!
//! ```text
//! cargo bench -p meshwire-identity --bench handshake            # 2 s per round
//! cargo bench -p meshwire-identity --bench handshake -- 5       # 5 s per round
//! BENCH_SECONDS=0.5 cargo bench -p meshwire-identity --bench handshake
//! taskset -c 0 cargo bench -p meshwire-identity --bench handshake   # also keep it on one CPU
//! ```
//!
//! `cargo bench` builds with the `bench` profile (optimised, like `release`). This is a plain
//! program (`harness = false`), not a timed test: it prints figures and never fails on them.
//!
//! What is measured, all on one thread (so on one core at a time):
//!
//! 1. **Full mTLS handshakes**: TLS 1.3, ECDSA P-256 SVIDs from [`LocalCa::ephemeral`], configs from
//!    [`tls::server_config`] and [`tls::client_config`] (built once and shared, as a proxy does; no
//!    resumption, so every handshake is a full one with both certificate chains verified). Client
//!    and server are `rustls` connections exchanging bytes through an in-memory `Vec`, no sockets,
//!    so the CPU of *both* sides is counted. One handshake = both sides. The client/server split is
//!    the time spent in each side's calls (`*Connection::new`, `read_tls`, `process_new_packets`,
//!    `write_tls`), measured with `Instant` around each call.
//! 2. **Local-CA issuance**: [`LocalCa::issue`] (P-256 key generation, signing, SVID validation).
//! 3. **Client-config builds**: `tls::client_config(..).map(Arc::new)`, exactly what
//!    `WorkloadCerts::client_config` does for every destination.
//!
//! Method: each measurement is warmed up, then run for a fixed duration per round (default 2 s;
//! first numeric command-line argument or `BENCH_SECONDS`), for 5 rounds; the table shows the
//! median, min and max across rounds. Wall time comes from `std::time::Instant`; process CPU time
//! (user + system) from fields 14 and 15 of `/proc/self/stat` in 100 Hz clock ticks (10 ms
//! resolution, Linux only; shown as `n/a` elsewhere). Results are also written as JSON to
//! `target/bench-identity.json` (in the workspace target directory).

#![allow(clippy::unwrap_used, missing_docs)]

use std::error::Error;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::source::Credentials;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls;
use meshwire_testkit::measure::{
    Cpu, Summary, clock_ticks, json_summary, process_cpu, seconds_argument, summarize, tls_handshake, tls_read,
    tls_write, unix_time, write_results,
};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const ROUNDS: usize = 5;
const DEFAULT_SECONDS: f64 = 2.0;

/// Process CPU time (user + system), in seconds, or `None` where `/proc` is unavailable.
fn cpu_seconds() -> Option<f64> {
    process_cpu().map(Cpu::total)
}

/// One round of one measurement.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    ops: u64,
    wall: f64,
    cpu: Option<f64>,
    /// Seconds spent in client-side calls (handshakes only).
    client: f64,
    /// Seconds spent in server-side calls (handshakes only).
    server: f64,
}

impl Round {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.wall
    }
    fn us_per_op(&self) -> f64 {
        self.wall * 1e6 / self.ops as f64
    }
    fn client_us(&self) -> f64 {
        self.client * 1e6 / self.ops as f64
    }
    fn server_us(&self) -> f64 {
        self.server * 1e6 / self.ops as f64
    }
    fn cpu_per_1000(&self) -> Option<f64> {
        self.cpu.map(|c| c * 1000.0 / self.ops as f64)
    }
    fn cpu_util(&self) -> Option<f64> {
        self.cpu.map(|c| c / self.wall)
    }
}

/// Runs `op` (which returns the client and server seconds it spent, if it splits them) repeatedly
/// for `duration`.
fn run_for(duration: Duration, mut op: impl FnMut() -> Result<(f64, f64)>) -> Result<Round> {
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut round = Round::default();
    loop {
        let (c, s) = op()?;
        round.client += c;
        round.server += s;
        round.ops += 1;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            round.wall = elapsed.as_secs_f64();
            break;
        }
    }
    round.cpu = cpu0.zip(cpu_seconds()).map(|(a, b)| b - a);
    Ok(round)
}

/// Warms up, then runs `ROUNDS` rounds.
fn measure(
    name: &str,
    warmup: Duration,
    duration: Duration,
    mut op: impl FnMut() -> Result<(f64, f64)>,
) -> Result<Vec<Round>> {
    eprint!("{name}: warm-up");
    run_for(warmup, &mut op)?;
    let mut rounds = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        eprint!(", round {}", i + 1);
        rounds.push(run_for(duration, &mut op)?);
    }
    eprintln!();
    Ok(rounds)
}

/// A row of the table / an entry of the JSON file.
struct Stat {
    key: &'static str,
    label: String,
    unit: &'static str,
    summary: Option<Summary>,
    per_round: Vec<Option<f64>>,
}

fn stat(
    key: &'static str,
    label: impl Into<String>,
    unit: &'static str,
    rounds: &[Round],
    f: impl Fn(&Round) -> Option<f64>,
) -> Stat {
    let per_round: Vec<Option<f64>> = rounds.iter().map(&f).collect();
    let summary = summarize(per_round.iter().copied());
    Stat {
        key,
        label: label.into(),
        unit,
        summary,
        per_round,
    }
}

struct Bench {
    key: &'static str,
    title: &'static str,
    rounds: Vec<Round>,
    stats: Vec<Stat>,
}

impl Bench {
    /// The statistics every measurement has, of operations called `noun` (`handshake`): their rate,
    /// wall time per operation, CPU per 1000 and CPU utilisation.
    fn new(key: &'static str, title: &'static str, noun: &str, rounds: Vec<Round>) -> Bench {
        let stats = vec![
            stat("ops_per_sec", format!("{noun}s/s"), "1/s", &rounds, |r| {
                Some(r.ops_per_sec())
            }),
            stat("us_per_op", format!("wall per {noun}"), "us", &rounds, |r| {
                Some(r.us_per_op())
            }),
            stat(
                "cpu_s_per_1000",
                format!("CPU per 1000 {noun}s"),
                "CPU-s",
                &rounds,
                Round::cpu_per_1000,
            ),
            stat("cpu_utilization", "CPU / wall", "ratio", &rounds, Round::cpu_util),
        ];
        Bench {
            key,
            title,
            rounds,
            stats,
        }
    }
}

/// Four significant figures, no exponent.
fn fmt_num(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let decimals = (3 - x.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{x:.decimals$}")
}

/// Drives one full handshake in memory; returns (client seconds, server seconds).
fn handshake(client_cfg: &Arc<ClientConfig>, server_cfg: &Arc<ServerConfig>, buf: &mut Vec<u8>) -> Result<(f64, f64)> {
    let mut client_t = Duration::ZERO;
    let mut server_t = Duration::ZERO;

    let t = Instant::now();
    let mut c = ClientConnection::new(client_cfg.clone(), tls::server_name())?;
    client_t += t.elapsed();
    let t = Instant::now();
    let mut s = ServerConnection::new(server_cfg.clone())?;
    server_t += t.elapsed();

    let mut flights = 0;
    while c.is_handshaking() || s.is_handshaking() {
        flights += 1;
        if flights > 16 {
            return Err("handshake does not complete".into());
        }
        // Client -> server.
        let t = Instant::now();
        tls_write(&mut c, buf)?;
        client_t += t.elapsed();
        let t = Instant::now();
        tls_read(&mut s, buf)?;
        // Server -> client.
        tls_write(&mut s, buf)?;
        server_t += t.elapsed();
        let t = Instant::now();
        tls_read(&mut c, buf)?;
        client_t += t.elapsed();
    }
    black_box((&c, &s));
    Ok((client_t.as_secs_f64(), server_t.as_secs_f64()))
}

fn main() -> Result<()> {
    let secs = seconds_argument(DEFAULT_SECONDS)?;
    let duration = Duration::from_secs_f64(secs);
    let warmup = Duration::from_secs_f64((secs / 4.0).clamp(0.05, 0.5));

    // Setup: one CA, a server and a client SVID, configs built once.
    let td = TrustDomain::new("cluster.local")?;
    let ca = LocalCa::ephemeral(td.clone())?;
    let server_id = SpiffeId::new("spiffe://cluster.local/ns/bench/sa/server")?;
    let client_id = SpiffeId::new("spiffe://cluster.local/ns/bench/sa/client")?;
    let server: Credentials = ca.issue(&server_id)?;
    let client: Credentials = ca.issue(&client_id)?;
    let alpn = vec![b"h2".to_vec()];
    let domains = tls::TrustDomains::only(td);
    let server_cfg = Arc::new(tls::server_config(
        &server.svid,
        &server.bundles,
        &domains,
        alpn.clone(),
    )?);
    let client_cfg = Arc::new(tls::client_config(
        &client.svid,
        &client.bundles,
        vec![server_id.clone()],
        alpn.clone(),
    )?);

    // Check once that the handshake is the one we mean to measure.
    let (version, suite, kx) = {
        let mut c = ClientConnection::new(client_cfg.clone(), tls::server_name())?;
        let mut s = ServerConnection::new(server_cfg.clone())?;
        tls_handshake(&mut c, &mut s)?;
        assert_eq!(tls::peer_identity(&s)?, client_id);
        assert_eq!(tls::peer_identity(&c)?, server_id);
        assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
        let version = format!("{:?}", c.protocol_version().ok_or("no protocol version")?);
        let suite = format!("{:?}", c.negotiated_cipher_suite().ok_or("no cipher suite")?.suite());
        let kx = format!(
            "{:?}",
            c.negotiated_key_exchange_group().ok_or("no key exchange group")?.name()
        );
        (version, suite, kx)
    };

    println!("meshwire-identity single-core benchmark");
    println!(
        "  {ROUNDS} rounds x {secs} s per measurement, warm-up {:.2} s; one thread; CPU from /proc/self/stat ({} Hz ticks)",
        warmup.as_secs_f64(),
        clock_ticks()
    );
    println!(
        "  handshake: {version}, {suite}, key exchange {kx}, ECDSA P-256 SVIDs, mutual auth, no resumption, in-memory"
    );
    println!();

    let mut buf = Vec::with_capacity(8192);
    let hs = measure("handshake", warmup, duration, || {
        handshake(&client_cfg, &server_cfg, &mut buf)
    })?;

    let issue_id = SpiffeId::new("spiffe://cluster.local/ns/bench/sa/issued")?;
    let issue = measure("issue", warmup, duration, || {
        black_box(ca.issue(black_box(&issue_id))?);
        Ok((0.0, 0.0))
    })?;

    let config = measure("client_config", warmup, duration, || {
        let cfg =
            tls::client_config(&client.svid, &client.bundles, vec![server_id.clone()], alpn.clone()).map(Arc::new)?;
        black_box(cfg);
        Ok((0.0, 0.0))
    })?;
    eprintln!();

    let mut handshakes = Bench::new("handshake", "mTLS handshake (client+server)", "handshake", hs);
    let split = [
        stat("client_us_per_op", "  client side", "us", &handshakes.rounds, |r| {
            Some(r.client_us())
        }),
        stat("server_us_per_op", "  server side", "us", &handshakes.rounds, |r| {
            Some(r.server_us())
        }),
    ];
    // After the wall time per handshake.
    handshakes.stats.splice(2..2, split);
    let benches = vec![
        handshakes,
        Bench::new("issue", "LocalCa::issue (keygen+sign+validate)", "issue", issue),
        Bench::new(
            "client_config",
            "tls::client_config + Arc::new (per destination)",
            "build",
            config,
        ),
    ];

    // Table.
    let label_w = benches
        .iter()
        .flat_map(|b| &b.stats)
        .map(|s| s.label.len())
        .max()
        .unwrap_or(0)
        .max(24);
    let header = format!(
        "{:<label_w$}  {:>12}  {:>12}  {:>12}  {:<5}",
        "", "median", "min", "max", "unit"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for b in &benches {
        let ops: u64 = b.rounds.iter().map(|r| r.ops).sum();
        println!("{} [{} ops in {} rounds]", b.title, ops, b.rounds.len());
        for s in &b.stats {
            let (med, min, max) = match s.summary {
                Some(x) => (fmt_num(x.median), fmt_num(x.min), fmt_num(x.max)),
                None => ("n/a".to_owned(), "n/a".to_owned(), "n/a".to_owned()),
            };
            println!(
                "  {:<w$}  {med:>12}  {min:>12}  {max:>12}  {:<5}",
                s.label,
                s.unit,
                w = label_w - 2
            );
        }
    }

    // JSON.
    let finite = |x: Option<f64>| x.filter(|x| x.is_finite());
    let results: serde_json::Map<String, serde_json::Value> = benches
        .iter()
        .map(|b| {
            let mut entry = serde_json::json!({
                "description": b.title,
                "ops_per_round": b.rounds.iter().map(|r| r.ops).collect::<Vec<_>>(),
                "wall_seconds_per_round": b.rounds.iter().map(|r| r.wall).collect::<Vec<_>>(),
                "cpu_seconds_per_round": b.rounds.iter().map(|r| finite(r.cpu)).collect::<Vec<_>>(),
            });
            for s in &b.stats {
                entry[s.key] = json_summary(s.unit, s.summary, &s.per_round);
            }
            (b.key.to_owned(), entry)
        })
        .collect();
    let json = serde_json::json!({
        "benchmark": "meshwire-identity/handshake",
        "unix_time": unix_time(),
        "seconds_per_round": secs,
        "warmup_seconds": warmup.as_secs_f64(),
        "rounds": ROUNDS,
        "threads": 1,
        "cpu_clock_ticks_per_sec": clock_ticks(),
        "tls": {
            "version": version, "cipher_suite": suite, "key_exchange": kx,
            "certificates": "ECDSA P-256", "mutual": true, "resumption": false,
        },
        "results": results,
    });
    write_results("bench-identity.json", &json)?;
    Ok(())
}
