//! Shape 8: the DNS proxy. One proxy per binary with its DNS proxy on, a local configuration with
//! [`SERVICES`] services (so that mesh names are answered locally), and a fake upstream nameserver in
//! this process that answers every query with one A record (so that other names are forwarded). UDP
//! queries from this process, a fixed number in flight (one per client socket), for a fixed time:
//! A queries for the mesh services' hostnames (answered locally), then for external names (forwarded).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use meshwire_testkit::measure::median;
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::load;
use crate::proxy::{DnsProxy, LOCAL_CONFIG};
use crate::report::{Percentiles, Table};
use crate::shapes::Bench;

/// Services of the local configuration, each with a hostname and a VIP.
pub(crate) const SERVICES: usize = 100;
/// How long one query may wait for its answer before it counts as a timeout: longer than the proxies'
/// upstream timeout (`--dns-upstream-timeout 1s`), so that a forwarded query the upstream did not answer
/// counts as an error (SERVFAIL), and a timeout is a query the proxy itself left unanswered.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The address of the fake upstream's A records.
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The local configuration of the dns shape: the bench's two workloads and [`SERVICES`] services
/// `svc-N.default.svc.cluster.local` with VIPs in 10.97.0.0/16.
fn config_yaml() -> String {
    let mut config = LOCAL_CONFIG.to_owned();
    config.push_str("services:\n");
    for i in 0..SERVICES {
        config.push_str(&format!(
            "  - name: svc-{i}\n    namespace: default\n    hostname: {}\n    vips: [\"/10.97.{}.{}\"]\n    ports:\n      \
             80: 8080\n",
            local_name(i),
            i / 250,
            i % 250 + 1
        ));
    }
    config
}

fn local_name(i: usize) -> String {
    format!("svc-{i}.default.svc.cluster.local")
}

fn external_name(i: usize) -> String {
    format!("host-{i}.example.com")
}

/// A query (RD set, one question `name` A IN) with id 0; [`set_id`] sets it.
fn query(name: &str) -> Vec<u8> {
    let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn set_id(message: &mut [u8], id: u16) {
    message[..2].copy_from_slice(&id.to_be_bytes());
}

/// The end of the question section of a message with one question, if it has one.
fn question_end(message: &[u8]) -> Option<usize> {
    let mut at = 12;
    loop {
        let len = usize::from(*message.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
    }
    (at + 4 <= message.len()).then_some(at + 4)
}

/// The fake upstream's answer to `query`: its id and question, QR and RA set, RD copied, one A record
/// [`UPSTREAM_ANSWER`] for the question's name; `None` if the query has no question.
fn upstream_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let end = question_end(query)?;
    let mut answer = query[..end].to_vec();
    answer[2] = 0x80 | (query[2] & 0x01);
    answer[3] = 0x80;
    // QDCOUNT 1, ANCOUNT 1, NSCOUNT 0, ARCOUNT 0 (the query's EDNS record is left out).
    answer[4..12].copy_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]);
    // The name as a pointer to the question's, type A, class IN, TTL 60, 4 bytes.
    answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    answer.extend_from_slice(&UPSTREAM_ANSWER.octets());
    Some(answer)
}

/// The fake upstream nameserver: a UDP socket on 127.0.0.1 served by a task of the bench's runtime
/// until dropped.
struct Upstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> anyhow::Result<Upstream> {
        let socket =
            std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the fake upstream nameserver")?;
        // Room for bursts of queries while this process's threads are busy with the clients.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, 4 << 20);
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let addr = socket.local_addr()?;
        let task = tokio::spawn(async move {
            let mut buf = vec![0; 65_535];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some(answer) = upstream_answer(&buf[..len]) {
                    let _ = socket.send_to(&answer, peer).await;
                }
            }
        });
        Ok(Upstream { addr, task })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the clients of one run got.
struct Exchanged {
    /// Correct answers: the query's id, a response, NOERROR, at least one answer record.
    answered: u64,
    /// Answers that were not correct.
    errors: u64,
    /// Queries with no answer within [`QUERY_TIMEOUT`].
    timeouts: u64,
    elapsed: Duration,
    /// Of the correct answers, in nanoseconds.
    latency: Histogram<u64>,
}

/// Whether `answer` is a correct answer to the query with `id`.
fn correct(answer: &[u8], id: u16) -> bool {
    answer.len() >= 12
        && u16::from_be_bytes([answer[0], answer[1]]) == id
        && answer[2] & 0x80 != 0
        // Not truncated.
        && answer[2] & 0x02 == 0
        // RCODE NOERROR.
        && answer[3] & 0x0f == 0
        && u16::from_be_bytes([answer[6], answer[7]]) >= 1
}

/// `clients` sockets, each with one query in flight, ask `server` about `names` (in turn) for `duration`.
async fn exchange(
    server: SocketAddr,
    names: &[String],
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Exchanged> {
    let queries: Arc<Vec<Vec<u8>>> = Arc::new(names.iter().map(|n| query(n)).collect());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let queries = queries.clone();
        tasks.push(tokio::spawn(async move {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            socket.connect(server).await?;
            let mut out = Exchanged {
                answered: 0,
                errors: 0,
                timeouts: 0,
                elapsed: Duration::ZERO,
                latency: load::histogram(),
            };
            let mut buf = vec![0; 4096];
            let mut id = (c as u16).wrapping_mul(1021);
            let mut next = c;
            while Instant::now() < deadline {
                id = id.wrapping_add(1);
                let mut q = queries[next % queries.len()].clone();
                next += 1;
                set_id(&mut q, id);
                let sent = Instant::now();
                socket.send(&q).await?;
                let until = tokio::time::Instant::from_std(sent + QUERY_TIMEOUT);
                loop {
                    match tokio::time::timeout_at(until, socket.recv(&mut buf)).await {
                        Err(_) => {
                            out.timeouts += 1;
                            break;
                        }
                        Ok(Err(err)) => return Err(anyhow::Error::from(err).context("receiving a DNS answer")),
                        // A late answer to an earlier query that timed out: keep waiting for this one's.
                        Ok(Ok(len)) if len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) != id => {}
                        Ok(Ok(len)) => {
                            if correct(&buf[..len], id) {
                                out.answered += 1;
                                out.latency.saturating_record(sent.elapsed().as_nanos() as u64);
                            } else {
                                out.errors += 1;
                            }
                            break;
                        }
                    }
                }
            }
            anyhow::Ok(out)
        }));
    }
    let mut total = Exchanged {
        answered: 0,
        errors: 0,
        timeouts: 0,
        elapsed: Duration::ZERO,
        latency: load::histogram(),
    };
    for task in tasks {
        let out = task.await.context("a DNS client task failed")??;
        total.answered += out.answered;
        total.errors += out.errors;
        total.timeouts += out.timeouts;
        total.latency.add(&out.latency).context("merging latency histograms")?;
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Asks `proxy` about `name` until a correct answer comes (5 s at most).
async fn probe(proxy: &DnsProxy, name: &str) -> anyhow::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    socket.connect(proxy.addr()).await?;
    let mut q = query(name);
    let mut buf = vec![0; 4096];
    let mut last = "no answer".to_owned();
    for id in 1..=20 {
        proxy.check()?;
        set_id(&mut q, id);
        socket.send(&q).await?;
        match tokio::time::timeout(Duration::from_millis(250), socket.recv(&mut buf)).await {
            Ok(Ok(len)) if correct(&buf[..len], id) => return Ok(()),
            Ok(Ok(len)) => last = format!("an incorrect answer: {:?}", &buf[..len]),
            Ok(Err(err)) => last = err.to_string(),
            Err(_) => {}
        }
    }
    bail!("no correct answer ({last})")
}

/// One run of one binary and kind.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DnsRun {
    /// Correct answers.
    pub(crate) answered: u64,
    pub(crate) errors: u64,
    pub(crate) timeouts: u64,
    pub(crate) seconds: f64,
    /// Correct answers per second.
    pub(crate) queries_per_s: f64,
    /// Of the correct answers.
    pub(crate) latency: Percentiles,
    /// CPU seconds of the proxy process during the run.
    pub(crate) proxy_cpu_s: f64,
    /// CPU seconds of the bench process (clients and fake upstream) during the run.
    pub(crate) bench_cpu_s: f64,
    /// Proxy CPU milliseconds per 1000 queries answered (= CPU microseconds per query).
    pub(crate) cpu_ms_per_1000: f64,
}

/// The runs of one binary and kind.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DnsRow {
    pub(crate) path: String,
    /// `local` (mesh service hostnames, answered by the proxy) or `forwarded` (external names,
    /// forwarded to the fake upstream).
    pub(crate) kind: &'static str,
    pub(crate) median_queries_per_s: f64,
    pub(crate) median_cpu_ms_per_1000: Option<f64>,
    pub(crate) latency: Percentiles,
    /// Over every run.
    pub(crate) errors: u64,
    /// Over every run.
    pub(crate) timeouts: u64,
    pub(crate) runs: Vec<DnsRun>,
}

/// Shape 8: UDP queries per second and proxy CPU per 1000 queries, answered locally and forwarded.
pub(crate) async fn dns(bench: &Bench) -> anyhow::Result<(Vec<DnsRow>, Table)> {
    let plan = &bench.plan;
    let upstream = Upstream::start().await?;
    let config = bench.work.dir.join("dns.yaml");
    std::fs::write(&config, config_yaml()).with_context(|| format!("writing {}", config.display()))?;
    let resolv_conf = bench.work.dir.join("resolv.conf");
    std::fs::write(&resolv_conf, format!("nameserver {}\n", upstream.addr))
        .with_context(|| format!("writing {}", resolv_conf.display()))?;
    let mut proxies = Vec::new();
    for binary in &bench.binaries {
        let proxy = DnsProxy::start(&bench.work, binary, &config, &resolv_conf).await?;
        // One query of each kind answered before measuring (the proxy has its configuration).
        for name in [local_name(0), external_name(0)] {
            probe(&proxy, &name)
                .await
                .with_context(|| format!("{}: the first query for {name}", binary.name))?;
        }
        proxies.push(proxy);
    }
    let kinds: [(&'static str, Vec<String>); 2] = [
        ("local", (0..SERVICES).map(local_name).collect()),
        ("forwarded", (0..1000).map(external_name).collect()),
    ];
    let duration = Duration::from_secs_f64(plan.dns_s);
    let me = std::process::id();
    let mut runs: Vec<Vec<DnsRun>> = vec![Vec::new(); proxies.len() * kinds.len()];
    for _ in 0..plan.repeat {
        for (k, (kind, names)) in kinds.iter().enumerate() {
            for (p, proxy) in proxies.iter().enumerate() {
                let name = &bench.binaries[p].name;
                let proxy_before = proxy.cpu_seconds()?;
                let bench_before = crate::sys::cpu_seconds(me)?;
                let exchanged = exchange(proxy.addr(), names, plan.dns_in_flight, duration)
                    .await
                    .with_context(|| format!("{kind} DNS queries to {name}"));
                proxy.check()?;
                let exchanged = exchanged?;
                let proxy_cpu_s = proxy.cpu_seconds()? - proxy_before;
                let seconds = exchanged.elapsed.as_secs_f64();
                runs[k * proxies.len() + p].push(DnsRun {
                    answered: exchanged.answered,
                    errors: exchanged.errors,
                    timeouts: exchanged.timeouts,
                    seconds,
                    queries_per_s: exchanged.answered as f64 / seconds,
                    latency: Percentiles::of(&exchanged.latency),
                    proxy_cpu_s,
                    bench_cpu_s: crate::sys::cpu_seconds(me)? - bench_before,
                    cpu_ms_per_1000: proxy_cpu_s * 1e6 / exchanged.answered.max(1) as f64,
                });
            }
        }
    }
    let mut table = Table::new(
        format!(
            "8. DNS over UDP, A queries, {} in flight on as many client sockets ({} s, median of {}; local: {} mesh \
             service hostnames; forwarded: external names to a fake upstream in the bench; latency in us)",
            plan.dns_in_flight, plan.dns_s, plan.repeat, SERVICES
        ),
        &[
            "path",
            "kind",
            "queries/s",
            "CPU-ms/1000 queries",
            "p50",
            "p99",
            "errors",
            "timeouts",
        ],
    );
    let mut rows = Vec::new();
    for (k, (kind, _)) in kinds.iter().enumerate() {
        for (p, binary) in bench.binaries.iter().enumerate() {
            let runs = std::mem::take(&mut runs[k * proxies.len() + p]);
            let row = DnsRow {
                path: binary.name.clone(),
                kind,
                median_queries_per_s: median(runs.iter().map(|r| r.queries_per_s)).unwrap_or(0.0),
                median_cpu_ms_per_1000: median(runs.iter().filter(|r| r.answered > 0).map(|r| r.cpu_ms_per_1000)),
                latency: Percentiles::median_of(&runs.iter().map(|r| r.latency).collect::<Vec<_>>()),
                errors: runs.iter().map(|r| r.errors).sum(),
                timeouts: runs.iter().map(|r| r.timeouts).sum(),
                runs,
            };
            table.row(vec![
                row.path.clone(),
                (*kind).to_owned(),
                format!("{:.0}", row.median_queries_per_s),
                crate::report::fmt(row.median_cpu_ms_per_1000, 1),
                format!("{:.0}", row.latency.p50_us),
                format!("{:.0}", row.latency.p99_us),
                row.errors.to_string(),
                row.timeouts.to_string(),
            ]);
            rows.push(row);
        }
    }
    drop(proxies);
    drop(upstream);
    Ok((rows, table))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_upstream_answers_a_query_with_one_a_record() {
        let mut q = query("host-1.example.com");
        set_id(&mut q, 0xbeef);
        // An EDNS record in the additional section, as the proxy may forward it.
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        let answer = upstream_answer(&q).unwrap();
        assert!(correct(&answer, 0xbeef));
        assert!(!correct(&answer, 0xbeee));
        assert_eq!(&answer[answer.len() - 4..], &UPSTREAM_ANSWER.octets());
        assert_eq!(&answer[10..12], &[0, 0], "no additional records");
    }

    #[test]
    fn an_error_answer_is_not_correct() {
        let mut q = query("x.example.com");
        set_id(&mut q, 7);
        let mut answer = upstream_answer(&q).unwrap();
        answer[3] |= 2; // SERVFAIL
        assert!(!correct(&answer, 7));
        assert!(!correct(&q, 7), "a query is not an answer");
    }

    #[test]
    fn the_config_names_every_service() {
        let config = config_yaml();
        assert!(config.contains("hostname: svc-99.default.svc.cluster.local"));
        assert!(config.contains("\"/10.97.0.100\""));
    }
}
