//! The xds shape: applying istiod's pushes.
//!
//! A generated mesh (workloads over 100 nodes and 100 namespaces, each in one service with a VIP
//! and 2 ports; namespace-scoped ALLOW and DENY policies with principals and ports), encoded as the
//! resources istiod sends (`meshwire_tests::istio::resources`), is
//! 1. applied in this process the way the proxy applies a push (`XdsConfig::apply` of both types,
//!    then `XdsConfig::take_delta`, `State::update` of the previous state, the policies indexed and
//!    `Published::publish_parts`), timed step by step, with the memory the store and the snapshot
//!    hold, and the cost of a one-workload update on top of it;
//! 2. pushed by a fake istiod ([`crate::istiod`]) to a pair of each proxy binary that istiod
//!    configures: push -> ACK and push -> `meshwire_config_generation` on /metrics, the proxies' CPU
//!    and RSS;
//! 3. pushed again and again (every workload changed each time) while a 1 KiB request/response
//!    stream runs through the same pair at a fixed rate: latency without pushes, with a push each
//!    second (the exchanges in flight from a push to its last ACK against those between pushes of
//!    the same run, so that the machine's noise is the same for both), with pushes back to back,
//!    and with a push of one workload changed each second (the usual push of a mesh whose pods come
//!    and go). `--xds-priority` and `--xds-cpu-share` set the proxies' options of those names.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use meshwire_control::proto::envoy::service::discovery::v3::Resource;
use meshwire_dataplane::istio::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, XdsConfig};
use meshwire_dataplane::rbac::PolicySet;
use meshwire_dataplane::state::{Delta, State};
use meshwire_dataplane::watch::{Published, Snapshot};
use meshwire_dataplane::xds::LocalConfig;
use meshwire_testkit::measure::median;
use meshwire_tests::istio::{ADDRESS, AUTHORIZATION};
use serde::Serialize;
use tikv_jemalloc_ctl::{Access, AsName};

use crate::istiod::{self, Istiod};
use crate::load;
use crate::proxy::{LOCAL_CONFIG, Pair, PairOptions};
use crate::report::{Percentiles, Table};
use crate::shapes::Bench;
use crate::sys;

const NAMESPACES: usize = 100;
const NODES: usize = 100;
/// How long a proxy may take to answer a push.
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// The budget: a push of 10,000 workloads and 1,000 services applied in under 1 s...
const BUDGET_APPLY_S: f64 = 1.0;
/// ... holding under 100 MB of state ...
const BUDGET_STATE_MB: f64 = 100.0;
/// ... without a p99 jump of the data path: the p99 during pushes within this factor of before.
const P99_JUMP: f64 = 1.5;
/// How long the proxies are left alone before their memory is read again: longer than jemalloc's
/// decay time (10 s), after which its background threads have returned freed pages.
const SETTLE: Duration = Duration::from_secs(11);
/// The interval of the paced pushes during request/response.
const PACE: Duration = Duration::from_secs(1);

/// The size of the generated mesh.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct MeshSize {
    pub(crate) workloads: usize,
    pub(crate) services: usize,
    pub(crate) policies: usize,
}

/// The mesh as a local configuration (ztunnel's `LOCAL_XDS_PATH` format): `size`, every workload's
/// canonical revision `v<revision>` (a new revision changes every workload), and the bench's two
/// loopback workloads (`client`, `server`) first when `with_pair`.
pub(crate) fn mesh_yaml(size: MeshSize, revision: u32, with_pair: bool) -> String {
    use std::fmt::Write as _;

    let services = size.services.max(1);
    let mut y = String::with_capacity(size.workloads * 600 + size.services * 250 + size.policies * 300);
    y.push_str(if with_pair { LOCAL_CONFIG } else { "workloads:\n" });
    for i in 0..size.workloads {
        let j = i % services;
        let ns = j % NAMESPACES;
        let node = (i / NAMESPACES) % NODES;
        let ip = i + 1;
        let _ = write!(
            y,
            "  - uid: Kubernetes//Pod/ns-{ns}/pod-{i}\n    name: pod-{i}\n    namespace: ns-{ns}\n    \
             serviceAccount: sa-{j}\n    workloadIps: [\"10.{}.{}.{}\"]\n    protocol: HBONE\n    node: node-{node}\n    \
             workloadName: deploy-{j}\n    workloadType: deployment\n    canonicalName: svc-{j}\n    \
             canonicalRevision: v{revision}\n    services:\n      \"ns-{ns}/svc-{j}.ns-{ns}.svc.cluster.local\":\n        \
             80: 8080\n        443: 8443\n",
            1 + ip / 65536,
            (ip / 256) % 256,
            ip % 256
        );
    }
    if size.services > 0 {
        y.push_str("services:\n");
    }
    for j in 0..size.services {
        let ns = j % NAMESPACES;
        let _ = write!(
            y,
            "  - name: svc-{j}\n    namespace: ns-{ns}\n    hostname: svc-{j}.ns-{ns}.svc.cluster.local\n    \
             vips: [\"/10.96.{}.{}\"]\n    ports:\n      80: 8080\n      443: 8443\n",
            j / 256,
            j % 256
        );
    }
    if size.policies > 0 {
        y.push_str("policies:\n");
    }
    for k in 0..size.policies {
        let ns = k % NAMESPACES;
        // One in five denies: a DENY of one service account on one port; the others allow a
        // service account and a namespace on both ports.
        let (action, ports) = if k % 5 == 0 {
            ("Deny", "[8443]")
        } else {
            ("Allow", "[8080, 8443]")
        };
        let _ = write!(
            y,
            "  - name: policy-{k}\n    namespace: ns-{ns}\n    scope: Namespace\n    action: {action}\n    rules:\n      \
             - - - principals: [!Exact cluster.local/ns/ns-{}/sa/sa-{}, !Prefix cluster.local/ns/ns-{}/]\n            \
             destinationPorts: {ports}\n",
            (k + 1) % NAMESPACES,
            (k * 7) % services,
            (k + 2) % NAMESPACES,
        );
    }
    y
}

/// The mesh of [`mesh_yaml`], parsed.
pub(crate) fn mesh(size: MeshSize, revision: u32, with_pair: bool) -> anyhow::Result<LocalConfig> {
    LocalConfig::parse(&mesh_yaml(size, revision, with_pair))
        .map_err(|err| anyhow::anyhow!("the generated mesh does not parse: {err}"))
}

/// What istiod sends for `config`: (Address resources, Authorization resources).
fn encoded(config: &LocalConfig, version: &str) -> (Vec<Resource>, Vec<Resource>) {
    let r = meshwire_tests::istio::resources(config);
    (
        istiod::resources(r.addresses, version),
        istiod::resources(r.policies, version),
    )
}

fn bytes_of(resources: &[Resource]) -> usize {
    resources
        .iter()
        .map(|r| r.name.len() + r.resource.as_ref().map_or(0, |a| a.value.len()))
        .sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(bytes: i64) -> f64 {
    bytes as f64 / 1e6
}

fn rss_self() -> anyhow::Result<i64> {
    Ok(i64::try_from(sys::rss_bytes(std::process::id())?).unwrap_or(i64::MAX))
}

fn check_accepted(what: &str, rejected: &[meshwire_dataplane::istio::Rejected]) -> anyhow::Result<()> {
    if let Some(r) = rejected.first() {
        bail!(
            "{what}: {} resources rejected, the first {}: {}",
            rejected.len(),
            r.name,
            r.reason
        );
    }
    Ok(())
}

/// jemalloc (this program's allocator, through `meshwire-dataplane`) returning freed pages to the
/// kernel at once, for as long as it lives: resident memory then follows what is allocated, to the
/// page. Setting the decay to 0 purges what each arena had kept. Restores the previous decay times
/// when dropped.
struct ZeroDecay {
    previous: Vec<(String, isize)>,
}

impl ZeroDecay {
    fn new() -> ZeroDecay {
        let mut previous = Vec::new();
        let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
        for i in 0..arenas {
            // Muzzy first: with it at 0, dirty pages are purged for good (MADV_DONTNEED), not
            // lazily (MADV_FREE pages stay resident until the kernel needs them).
            for kind in ["muzzy", "dirty"] {
                let name = format!("arena.{i}.{kind}_decay_ms\0");
                let key = name.as_str().name();
                // Arenas no thread has used yet do not exist: nothing to set.
                if let Ok(value) = Access::<isize>::read(key)
                    && Access::<isize>::write(key, 0).is_ok()
                {
                    previous.push((name, value));
                }
            }
        }
        ZeroDecay { previous }
    }
}

impl Drop for ZeroDecay {
    fn drop(&mut self) {
        for (name, value) in self.previous.iter().rev() {
            let _ = Access::<isize>::write(name.as_str().name(), *value);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 1. In this process.

/// What the proxy's xDS thread keeps between pushes: the last state and its indexed policies, which
/// each push's delta updates, and the cell it publishes to.
#[derive(Default)]
struct Applier {
    state: Arc<State>,
    policies: Arc<PolicySet>,
    published: Published,
}

impl Applier {
    fn publish(&mut self, delta: Delta) -> Arc<Snapshot> {
        if let Some(policies) = delta.policies() {
            self.policies = Arc::new(PolicySet::new(policies.iter().cloned()));
        }
        self.state = Arc::new(self.state.update(delta));
        self.published.publish_parts(
            Arc::clone(&self.state),
            Arc::clone(&self.policies),
            None,
            SystemTime::now(),
        )
    }
}

/// Timings of one full apply, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ApplyRun {
    pub(crate) decode_address_ms: f64,
    pub(crate) decode_authorization_ms: f64,
    pub(crate) decode_convert_ms: f64,
    /// `take_delta`.
    pub(crate) delta_ms: f64,
    /// `State::update`, the policies indexed, `publish_parts`.
    pub(crate) publish_ms: f64,
    pub(crate) state_build_ms: f64,
    pub(crate) total_ms: f64,
}

/// Timings of a one-workload update on top of the full state, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct UpdateRun {
    pub(crate) apply_ms: f64,
    /// `take_delta`, `State::update`, `publish_parts` (which drops the previous snapshot).
    pub(crate) publish_ms: f64,
    pub(crate) total_ms: f64,
}

/// The in-process figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InProcess {
    pub(crate) mesh: MeshSize,
    /// Encoded size of the Address and Authorization resources (names and messages).
    pub(crate) encoded_bytes: usize,
    pub(crate) median: ApplyRun,
    pub(crate) runs: Vec<ApplyRun>,
    /// Resident memory the store of istiod's resources (`XdsConfig`) holds.
    pub(crate) store_bytes: i64,
    /// Resident memory the published snapshot (`State` and policies) holds.
    pub(crate) snapshot_bytes: i64,
    pub(crate) update_median: UpdateRun,
    pub(crate) update_runs: Vec<UpdateRun>,
    /// A push of every workload changed (Address only), on top of the full state.
    pub(crate) all_changed_median: UpdateRun,
    pub(crate) all_changed_runs: Vec<UpdateRun>,
}

fn median_apply(runs: &[ApplyRun]) -> ApplyRun {
    let m = |f: fn(&ApplyRun) -> f64| median(runs.iter().map(f)).unwrap_or(0.0);
    ApplyRun {
        decode_address_ms: m(|r| r.decode_address_ms),
        decode_authorization_ms: m(|r| r.decode_authorization_ms),
        decode_convert_ms: m(|r| r.decode_convert_ms),
        delta_ms: m(|r| r.delta_ms),
        publish_ms: m(|r| r.publish_ms),
        state_build_ms: m(|r| r.state_build_ms),
        total_ms: m(|r| r.total_ms),
    }
}

/// Part 1: apply, memory, small update.
fn in_process(size: MeshSize, runs: usize, update_runs: usize) -> anyhow::Result<InProcess> {
    let config = mesh(size, 1, false)?;
    let (addresses, policies) = encoded(&config, "1");
    let encoded_bytes = bytes_of(&addresses) + bytes_of(&policies);

    let apply_all = |store: &mut XdsConfig, a: Vec<Resource>, p: Vec<Resource>| -> anyhow::Result<(Instant, Instant)> {
        check_accepted("Address", &store.apply(ADDRESS_TYPE_URL, a, Vec::new()))?;
        let t1 = Instant::now();
        check_accepted("Authorization", &store.apply(AUTHORIZATION_TYPE_URL, p, Vec::new()))?;
        Ok((t1, Instant::now()))
    };

    let mut samples = Vec::new();
    for _ in 0..runs {
        let (a, p) = (addresses.clone(), policies.clone());
        let mut store = XdsConfig::new();
        let mut proxy = Applier::default();
        let t0 = Instant::now();
        let (t1, t2) = apply_all(&mut store, a, p)?;
        let delta = store.take_delta();
        let t3 = Instant::now();
        let snapshot = proxy.publish(delta);
        let t4 = Instant::now();
        if snapshot.state.workloads().len() != size.workloads || snapshot.state.services().len() != size.services {
            bail!(
                "the state has {} workloads and {} services, not {} and {}",
                snapshot.state.workloads().len(),
                snapshot.state.services().len(),
                size.workloads,
                size.services
            );
        }
        samples.push(ApplyRun {
            decode_address_ms: ms(t1 - t0),
            decode_authorization_ms: ms(t2 - t1),
            decode_convert_ms: ms(t2 - t0),
            delta_ms: ms(t3 - t2),
            publish_ms: ms(t4 - t3),
            state_build_ms: ms(t4 - t2),
            total_ms: ms(t4 - t0),
        });
    }

    // Memory: resident memory with jemalloc returning every freed page at once.
    let (mut store, mut proxy, store_bytes, snapshot_bytes) = {
        let _zero = ZeroDecay::new();
        let before = rss_self()?;
        let mut store = XdsConfig::new();
        // The copies are freed as they are applied.
        apply_all(&mut store, addresses.clone(), policies.clone())?;
        let with_store = rss_self()?;
        let mut proxy = Applier::default();
        drop(proxy.publish(store.take_delta()));
        let with_snapshot = rss_self()?;
        (store, proxy, with_store - before, with_snapshot - with_store)
    };

    // One workload changed (its revision), on top of the full state.
    let first = config.workloads.first().context("the generated mesh has no workload")?;
    let mut updates = Vec::new();
    for run in 0..update_runs {
        let mut changed = first.clone();
        changed.canonical_revision = format!("v{}", 2 + run % 2);
        let mut one = LocalConfig::default();
        one.workloads = vec![changed];
        let (resource, _) = encoded(&one, &format!("u{run}"));
        let t0 = Instant::now();
        check_accepted("update", &store.apply(ADDRESS_TYPE_URL, resource, Vec::new()))?;
        let t1 = Instant::now();
        drop(proxy.publish(store.take_delta()));
        let t2 = Instant::now();
        updates.push(UpdateRun {
            apply_ms: ms(t1 - t0),
            publish_ms: ms(t2 - t1),
            total_ms: ms(t2 - t0),
        });
    }
    // Every workload changed (their revision), on top of the full state.
    let mut all_changed = Vec::new();
    for run in 0..runs {
        let revision = u32::try_from(3 + run).unwrap_or(u32::MAX);
        let (resources, _) = encoded(&mesh(size, revision, false)?, &format!("c{run}"));
        let t0 = Instant::now();
        check_accepted("changed", &store.apply(ADDRESS_TYPE_URL, resources, Vec::new()))?;
        let t1 = Instant::now();
        drop(proxy.publish(store.take_delta()));
        let t2 = Instant::now();
        all_changed.push(UpdateRun {
            apply_ms: ms(t1 - t0),
            publish_ms: ms(t2 - t1),
            total_ms: ms(t2 - t0),
        });
    }
    let median_update = |runs: &[UpdateRun]| {
        let m = |f: fn(&UpdateRun) -> f64| median(runs.iter().map(f)).unwrap_or(0.0);
        UpdateRun {
            apply_ms: m(|r| r.apply_ms),
            publish_ms: m(|r| r.publish_ms),
            total_ms: m(|r| r.total_ms),
        }
    };
    Ok(InProcess {
        mesh: size,
        encoded_bytes,
        median: median_apply(&samples),
        runs: samples,
        store_bytes,
        snapshot_bytes,
        update_median: median_update(&updates),
        update_runs: updates,
        all_changed_median: median_update(&all_changed),
        all_changed_runs: all_changed,
    })
}

// ---------------------------------------------------------------------------------------------------
// 2. and 3. Through the proxies.

/// One push to a pair, in milliseconds from handing the first response to the streams.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct PushRun {
    /// Until both proxies ACKed the Address push.
    pub(crate) ack_address_ms: f64,
    /// Until both proxies ACKed the last push (Authorization, for a full push).
    pub(crate) ack_all_ms: f64,
    /// Until both proxies' `meshwire_config_generation` showed every push.
    pub(crate) generation_ms: f64,
    /// CPU milliseconds of both proxies from the push to the new generation on both.
    pub(crate) cpu_ms: f64,
}

/// Resident memory of A and B, MB.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct PairRss {
    pub(crate) a_mb: f64,
    pub(crate) b_mb: f64,
}

impl PairRss {
    fn of(pair: &Pair) -> anyhow::Result<PairRss> {
        let (a, b) = pair.rss()?;
        Ok(PairRss {
            a_mb: a as f64 / 1e6,
            b_mb: b as f64 / 1e6,
        })
    }
}

/// The figures of one binary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProxyRow {
    pub(crate) path: String,
    /// The first push: from the two loopback workloads to the full mesh (Address and Authorization).
    pub(crate) full_push: PushRun,
    /// Pushes of every workload changed (Address only): the median, and each.
    pub(crate) change_push: PushRun,
    pub(crate) change_pushes: Vec<PushRun>,
    pub(crate) rss_before: PairRss,
    /// After the full push and the pushes of every workload changed.
    pub(crate) rss_after: PairRss,
    /// At the end, after the pushes during request/response.
    pub(crate) rss_end: PairRss,
    /// [`SETTLE`] later, without pushes.
    pub(crate) rss_settled: PairRss,
    /// 1 KiB request/response at the fixed rate: without pushes, ...
    pub(crate) rr_before: Percentiles,
    /// ... while a push of every workload changed starts every [`PACE`] (the runs of `rounds`
    /// pooled, as are the figures below up to the one-at-a-time ones) ...
    pub(crate) rr_paced: Percentiles,
    pub(crate) pushes_paced: usize,
    /// ... of which the exchanges in flight while a push was being applied (from the push to the
    /// last ACK) ...
    pub(crate) rr_in_push: Percentiles,
    /// ... and the others, between pushes (the same run: the same machine noise) ...
    pub(crate) rr_between_pushes: Percentiles,
    /// ... and every exchange with no push in flight: those between pushes and those of the run
    /// without pushes (the baseline the exchanges during a push are judged against) ...
    pub(crate) rr_quiet: Percentiles,
    /// ... and the same with each push sent to one proxy and, once it answered, to the other (each
    /// proxy's node has CPUs of its own in a real mesh; here both share the machine's): during such
    /// a push, and with no push in flight ...
    pub(crate) pushes_apart: usize,
    pub(crate) rr_in_push_apart: Percentiles,
    pub(crate) rr_quiet_apart: Percentiles,
    /// ... and while such pushes follow each other (each as soon as both proxies ACKed the one before).
    pub(crate) rr_during: Percentiles,
    pub(crate) pushes_during: usize,
    /// ... and while a push of one workload changed starts every [`PACE`]: during such a push and
    /// between pushes.
    pub(crate) rr_in_one_push: Percentiles,
    pub(crate) rr_between_one_pushes: Percentiles,
    pub(crate) pushes_one: usize,
    /// The control: the median length of a paced push's window (push to last ACK), and the
    /// exchanges in flight while two threads at `SCHED_IDLE` spun that long each [`PACE`], and the
    /// others: what idle-priority CPU use of a push's length costs the data path on this machine.
    pub(crate) push_length_ms: f64,
    pub(crate) rr_in_spin: Percentiles,
    pub(crate) rr_between_spins: Percentiles,
    pub(crate) spins: usize,
    /// Each round of paced pushes and of the control that followed it: the p99 of the exchanges in
    /// flight during a push (a spin) over that of the others of the same run.
    pub(crate) rounds: Vec<Round>,
}

/// One round of paced pushes and the control after it.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Round {
    pub(crate) push_ratio: f64,
    pub(crate) spin_ratio: f64,
}

/// The p99 of `during` over that of `between` (0 when no exchange was in flight during a window).
fn ratio(during: &Histogram<u64>, between: &Histogram<u64>) -> f64 {
    if during.is_empty() {
        return 0.0;
    }
    during.value_at_quantile(0.99) as f64 / (between.value_at_quantile(0.99) as f64).max(1.0)
}

/// Everything the xds shape reports.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct XdsReport {
    pub(crate) in_process: InProcess,
    pub(crate) proxies: Vec<ProxyRow>,
    pub(crate) rr_rate: u32,
    pub(crate) rr_seconds: f64,
}

/// `meshwire_config_generation` of the proxy whose metrics listener is `addr`.
async fn generation(addr: SocketAddr) -> anyhow::Result<u64> {
    crate::proxy::metric(addr, "meshwire_config_generation").await
}

/// When the generation at `addr` reached `target` (scraped every 2 ms).
async fn generation_reached(addr: SocketAddr, target: u64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + PUSH_TIMEOUT;
    loop {
        if generation(addr).await? >= target {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            bail!("{addr}: generation {target} not reached within {PUSH_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Pushes `pushes` (type URL, resources) one after the other and times them on `pair`.
async fn timed_push(istiod: &Istiod, pair: &Pair, pushes: Vec<(&str, Arc<Vec<Resource>>)>) -> anyhow::Result<PushRun> {
    let [ma, mb] = pair.metrics();
    let before = generation(ma).await?.max(generation(mb).await?);
    let target = before + pushes.len() as u64;
    let cpu_before = pair.cpu_seconds()?;
    let mut nonces = Vec::new();
    let mut start = None;
    for (type_url, resources) in pushes {
        let (nonce, at) = istiod.push(type_url, resources);
        start.get_or_insert(at);
        nonces.push(nonce);
    }
    let start = start.context("nothing to push")?;
    let answers = async {
        let mut last = Vec::new();
        for nonce in &nonces {
            let answers = istiod.answers(nonce, 2, PUSH_TIMEOUT).await?;
            last.push(answers.iter().map(|a| a.at).max().unwrap_or(start));
        }
        anyhow::Ok(last)
    };
    let (acks, ga, gb) = pair
        .guard(async { tokio::try_join!(answers, generation_reached(ma, target), generation_reached(mb, target)) })
        .await?;
    let cpu = pair.cpu_seconds()? - cpu_before;
    Ok(PushRun {
        ack_address_ms: ms(acks.first().copied().unwrap_or(start) - start),
        ack_all_ms: ms(acks.last().copied().unwrap_or(start) - start),
        generation_ms: ms(ga.max(gb) - start),
        cpu_ms: cpu * 1e3,
    })
}

/// The pushes of a mesh: the full one (from the pair's mesh), and changes of every workload
/// (revisions 2 and 3, alternately).
struct Pushes {
    full: (Arc<Vec<Resource>>, Arc<Vec<Resource>>),
    changes: [Arc<Vec<Resource>>; 2],
    /// One workload changed (revisions 2 and 3, alternately): the usual push of a mesh whose pods
    /// come and go.
    one_changed: [Arc<Vec<Resource>>; 2],
}

impl Pushes {
    fn new(size: MeshSize) -> anyhow::Result<Pushes> {
        let (addresses, policies) = encoded(&mesh(size, 1, true)?, "1");
        let full = (Arc::new(addresses), Arc::new(policies));
        let change = |revision: u32| -> anyhow::Result<Arc<Vec<Resource>>> {
            let mut config = mesh(size, revision, true)?;
            config.services.clear();
            Ok(Arc::new(encoded(&config, &revision.to_string()).0))
        };
        let changes = [change(2)?, change(3)?];
        // One workload of the mesh (the last: not one the pair's traffic uses), changed.
        let one = |all: &Arc<Vec<Resource>>| -> anyhow::Result<Arc<Vec<Resource>>> {
            let last = all.last().context("the mesh has no workload")?;
            Ok(Arc::new(vec![last.clone()]))
        };
        let one_changed = [one(&changes[0])?, one(&changes[1])?];
        Ok(Pushes {
            full,
            changes,
            one_changed,
        })
    }

    /// The k-th push of `what`.
    fn nth(&self, what: PushKind, k: usize) -> Arc<Vec<Resource>> {
        match what {
            PushKind::EveryWorkload => Arc::clone(&self.changes[k % 2]),
            PushKind::OneWorkload => Arc::clone(&self.one_changed[k % 2]),
        }
    }
}

/// What the pushes during request/response change.
#[derive(Debug, Clone, Copy)]
enum PushKind {
    EveryWorkload,
    OneWorkload,
}

/// Pushes every workload changed, again and again, each when both proxies have answered the one
/// before (and, with `pace`, no sooner than `pace` after the one before started), until `stop`;
/// records each push's window, from the push to the last ACK. The first push is always made and
/// waited for, so that a measurement shorter than a push (a loaded machine, a debug build) still
/// has one push in it.
async fn push_until(
    istiod: &Istiod,
    pushes: &Pushes,
    what: PushKind,
    windows: &Mutex<Vec<(Instant, Instant)>>,
    pace: Option<Duration>,
    one_at_a_time: bool,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    for k in 0.. {
        if k > 0 && stop.load(Ordering::Relaxed) {
            break;
        }
        let started = tokio::time::Instant::now();
        let window = if one_at_a_time {
            // To one proxy, and once it answered to the other, as if each had a node of its own.
            let streams = istiod.streams();
            if streams.len() != 2 {
                bail!("istiod serves {} streams, not the pair's 2", streams.len());
            }
            let mut window: Option<(Instant, Instant)> = None;
            for stream in streams {
                let (nonce, at) = istiod.push_to(ADDRESS, pushes.nth(what, k), Some(stream));
                let answers = istiod.answers(&nonce, 1, PUSH_TIMEOUT).await?;
                let end = answers.iter().map(|a| a.at).max().unwrap_or(at);
                window = Some((window.map_or(at, |(start, _)| start), end));
            }
            window
        } else {
            let (nonce, at) = istiod.push(ADDRESS, pushes.nth(what, k));
            let answers = istiod.answers(&nonce, 2, PUSH_TIMEOUT).await?;
            Some((at, answers.iter().map(|a| a.at).max().unwrap_or(at)))
        };
        windows.lock().unwrap_or_else(PoisonError::into_inner).extend(window);
        if let Some(pace) = pace {
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < started + pace {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(())
}

/// The control for the pushes' windows: `threads` threads at `SCHED_IDLE` that spin for `length`
/// every [`PACE`] (as long as a push keeps the proxies' xDS threads busy, doing nothing else),
/// until `stop`; records each spin's window. What the data path's latency does during those windows
/// is what any idle-priority CPU use costs it on this machine, whatever the work.
fn spin_idle(threads: usize, length: Duration, stop: &AtomicBool, windows: &Mutex<Vec<(Instant, Instant)>>) {
    std::thread::scope(|scope| {
        let mut spinners = Vec::new();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        for _ in 0..threads {
            let done = done_tx.clone();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<Instant>();
            spinners.push(go_tx);
            scope.spawn(move || {
                if let Err(error) = meshwire_dataplane::app::istio::set_idle_priority() {
                    eprintln!("warning: the idle spinner stays at the default policy: {error}");
                }
                while let Ok(until) = go_rx.recv() {
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    let _ = done.send(());
                }
            });
        }
        while !stop.load(Ordering::Relaxed) {
            let began = Instant::now();
            for spinner in &spinners {
                let _ = spinner.send(began + length);
            }
            for _ in 0..threads {
                let _ = done_rx.recv();
            }
            windows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((began, Instant::now()));
            let next = began + PACE;
            while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        drop(spinners);
    });
}

/// The exchanges of `timeline` in flight during one of `windows` (their request written before the
/// window ended and their response read after it began), and the others.
fn split_by_windows(timeline: &[(Instant, u64)], windows: &[(Instant, Instant)]) -> (Histogram<u64>, Histogram<u64>) {
    let (mut during, mut between) = (load::histogram(), load::histogram());
    for &(sent, took) in timeline {
        let answered = sent + Duration::from_nanos(took);
        let in_flight = windows.iter().any(|&(start, end)| sent <= end && answered >= start);
        if in_flight { &mut during } else { &mut between }.saturating_record(took);
    }
    (during, between)
}

/// Parts 2 and 3 for one binary.
async fn through_proxies(bench: &Bench, binary: &crate::proxy::Binary, pushes: &Pushes) -> anyhow::Result<ProxyRow> {
    let plan = &bench.plan;
    let label = format!("{} xds", binary.name);
    let initial = meshwire_tests::istio::resources(
        &LocalConfig::parse(LOCAL_CONFIG).map_err(|err| anyhow::anyhow!("the pair's mesh: {err}"))?,
    );
    let istiod = Istiod::start(&bench.work.dir.join(format!("istiod-{}", binary.name)), initial).await?;
    let server = bench.server.addr();
    let options = PairOptions {
        xds_priority: plan.xds_priority,
        xds_cpu_share: plan.xds_cpu_share,
        ..PairOptions::default()
    };
    let pair = Pair::start_configured(&bench.work, binary, options, &label, server, Some(&istiod))
        .await
        .with_context(|| format!("starting {label}"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = PairRss::of(&pair)?;

    let full_push = timed_push(
        &istiod,
        &pair,
        vec![
            (ADDRESS, Arc::clone(&pushes.full.0)),
            (AUTHORIZATION, Arc::clone(&pushes.full.1)),
        ],
    )
    .await
    .with_context(|| format!("{label}: the full push"))?;
    let mut change_pushes = Vec::new();
    for k in 0..plan.repeat {
        change_pushes.push(
            timed_push(&istiod, &pair, vec![(ADDRESS, Arc::clone(&pushes.changes[k % 2]))])
                .await
                .with_context(|| format!("{label}: a push of every workload changed"))?,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = PairRss::of(&pair)?;

    let d = Duration::from_secs_f64(plan.xds_rr_s);
    let label: &str = &label;
    let pair = &pair;
    let rr = |what: &'static str| async move {
        pair.guard(load::request_response_fixed(pair.route(), server, plan.rr_rate, d))
            .await
            .with_context(|| format!("{label}: request/response {what}"))
    };
    let before = rr("before the pushes").await?;
    let during = |what: PushKind, pace: Option<Duration>, one_at_a_time: bool| {
        let istiod = &istiod;
        async move {
            let windows = Mutex::new(Vec::new());
            let stop = AtomicBool::new(false);
            let measuring = async {
                let exchanges = rr("during the pushes").await;
                stop.store(true, Ordering::Relaxed);
                exchanges
            };
            let (exchanges, pushed) = tokio::join!(
                measuring,
                push_until(istiod, pushes, what, &windows, pace, one_at_a_time, &stop)
            );
            pushed.with_context(|| format!("{label}: pushing during request/response"))?;
            let exchanges = exchanges?;
            let windows = windows.into_inner().unwrap_or_else(PoisonError::into_inner);
            let (during, between) = split_by_windows(&exchanges.timeline, &windows);
            anyhow::Ok((exchanges.latency, windows.len(), (during, between), windows))
        }
    };
    let quiet = |between: &Histogram<u64>| -> anyhow::Result<Percentiles> {
        let mut quiet = before.latency.clone();
        quiet
            .add(between)
            .context("merging the exchanges without a push in flight")?;
        Ok(Percentiles::of(&quiet))
    };
    // Paced pushes of every workload and the control, spinners at SCHED_IDLE (one per proxy of the
    // pair) as long as those pushes, in alternation `plan.repeat` times: one run's p99 of the few
    // exchanges in flight during pushes moves with the machine's noise, the median of the rounds'
    // ratios less so. The exchanges of all rounds are pooled for the table.
    let mut paced = load::histogram();
    let (mut in_push, mut between_pushes) = (load::histogram(), load::histogram());
    let (mut in_spin, mut between_spins) = (load::histogram(), load::histogram());
    let (mut pushes_paced, mut spins, mut push_lengths) = (0, 0, Vec::new());
    let mut rounds = Vec::new();
    for _ in 0..plan.repeat.max(1) {
        let (all, pushed, (in_round, between_round), push_windows) =
            during(PushKind::EveryWorkload, Some(PACE), false).await?;
        paced.add(&all).context("pooling the rounds' exchanges")?;
        pushes_paced += pushed;
        let push_length = median(
            push_windows
                .iter()
                .map(|(start, end)| end.duration_since(*start).as_secs_f64()),
        )
        .map_or(Duration::ZERO, Duration::from_secs_f64);
        push_lengths.push(push_length.as_secs_f64());
        let (in_spin_round, between_spin_round, spun) = {
            let stop = Arc::new(AtomicBool::new(false));
            let windows = Arc::new(Mutex::new(Vec::new()));
            let spinning = std::thread::Builder::new()
                .name("idle-spinners".to_owned())
                .spawn({
                    let (stop, windows) = (Arc::clone(&stop), Arc::clone(&windows));
                    move || spin_idle(2, push_length, &stop, &windows)
                })
                .context("starting the idle spinners")?;
            let exchanges = rr("with idle-priority spinners").await;
            stop.store(true, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || spinning.join()).await;
            let exchanges = exchanges?;
            let windows = windows.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let (during, between) = split_by_windows(&exchanges.timeline, &windows);
            (during, between, windows.len())
        };
        spins += spun;
        rounds.push(Round {
            push_ratio: ratio(&in_round, &between_round),
            spin_ratio: ratio(&in_spin_round, &between_spin_round),
        });
        for (pool, add) in [
            (&mut in_push, &in_round),
            (&mut between_pushes, &between_round),
            (&mut in_spin, &in_spin_round),
            (&mut between_spins, &between_spin_round),
        ] {
            pool.add(add).context("pooling the rounds' exchanges")?;
        }
    }
    let rr_paced = Percentiles::of(&paced);
    let (rr_in_push, rr_between_pushes, rr_quiet) = (
        Percentiles::of(&in_push),
        Percentiles::of(&between_pushes),
        quiet(&between_pushes)?,
    );
    let (rr_in_spin, rr_between_spins) = (Percentiles::of(&in_spin), Percentiles::of(&between_spins));
    let push_length = Duration::from_secs_f64(median(push_lengths.iter().copied()).unwrap_or(0.0));
    let (_, pushes_apart, (in_push_apart, between_apart), _) =
        during(PushKind::EveryWorkload, Some(PACE), true).await?;
    let (rr_in_push_apart, rr_quiet_apart) = (Percentiles::of(&in_push_apart), quiet(&between_apart)?);
    let (back_to_back, pushes_during, _, _) = during(PushKind::EveryWorkload, None, false).await?;
    let rr_during = Percentiles::of(&back_to_back);
    let (_, pushes_one, (in_one_push, between_one_pushes), _) =
        during(PushKind::OneWorkload, Some(PACE), false).await?;
    let (rr_in_one_push, rr_between_one_pushes) = (Percentiles::of(&in_one_push), Percentiles::of(&between_one_pushes));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = PairRss::of(pair)?;
    // jemalloc's background threads give back what was freed more than its decay time ago (10 s).
    tokio::time::sleep(SETTLE).await;
    let rss_settled = PairRss::of(pair)?;
    let m = |f: fn(&PushRun) -> f64| median(change_pushes.iter().map(f)).unwrap_or(0.0);
    Ok(ProxyRow {
        path: binary.name.clone(),
        full_push,
        change_push: PushRun {
            ack_address_ms: m(|r| r.ack_address_ms),
            ack_all_ms: m(|r| r.ack_all_ms),
            generation_ms: m(|r| r.generation_ms),
            cpu_ms: m(|r| r.cpu_ms),
        },
        change_pushes,
        rss_before,
        rss_after,
        rss_end,
        rss_settled,
        rr_before: Percentiles::of(&before.latency),
        rr_paced,
        pushes_paced,
        rr_in_push,
        rr_between_pushes,
        rr_quiet,
        pushes_apart,
        rr_in_push_apart,
        rr_quiet_apart,
        rr_during,
        pushes_during,
        rr_in_one_push,
        rr_between_one_pushes,
        pushes_one,
        push_length_ms: ms(push_length),
        rr_in_spin,
        rr_between_spins,
        spins,
        rounds,
    })
}

/// The xds shape: the report and its tables (in process, through the proxies), and the verdict.
pub(crate) async fn xds(bench: &Bench) -> anyhow::Result<(XdsReport, Vec<Table>, String)> {
    let plan = &bench.plan;
    let size = MeshSize {
        workloads: plan.xds_workloads,
        services: (plan.xds_workloads / 10).max(1),
        policies: 100,
    };
    let runs = plan.repeat.max(5);
    let update_runs = 21;
    let in_process = in_process(size, runs, update_runs)?;
    let pushes = Pushes::new(size)?;
    let mut proxies = Vec::new();
    for binary in &bench.binaries {
        proxies.push(through_proxies(bench, binary, &pushes).await?);
    }

    let ip = &in_process;
    let mesh_text = format!(
        "{} workloads, {} services, {} policies; {:.1} MB encoded",
        size.workloads,
        size.services,
        size.policies,
        ip.encoded_bytes as f64 / 1e6
    );
    let mut t1 = Table::new(
        format!(
            "7a. xDS push applied in this process ({mesh_text}; median of {runs}, ms; memory: resident, jemalloc \
             returning freed pages at once)"
        ),
        &[
            "step",
            "decode+convert (Address / Authorization)",
            "take_delta",
            "State::update + publish",
            "state build",
            "total",
            "store MB",
            "snapshot MB",
            "held MB",
        ],
    );
    let m = &ip.median;
    t1.row(vec![
        "full push".to_owned(),
        format!(
            "{:.0} ({:.0} / {:.1})",
            m.decode_convert_ms, m.decode_address_ms, m.decode_authorization_ms
        ),
        format!("{:.0}", m.delta_ms),
        format!("{:.0}", m.publish_ms),
        format!("{:.0}", m.state_build_ms),
        format!("{:.0}", m.total_ms),
        format!("{:.1}", mb(ip.store_bytes)),
        format!("{:.1}", mb(ip.snapshot_bytes)),
        format!("{:.1}", mb(ip.store_bytes + ip.snapshot_bytes)),
    ]);
    // Updates on top of the full state: what the store's apply and the state's update take.
    for (label, u, precision) in [
        (
            format!("every workload changed (median of {runs})"),
            &ip.all_changed_median,
            0,
        ),
        (
            format!("1 workload changed (median of {update_runs})"),
            &ip.update_median,
            2,
        ),
    ] {
        t1.row(vec![
            label,
            format!("{:.precision$}", u.apply_ms),
            "-".to_owned(),
            format!("{:.precision$} (with take_delta)", u.publish_ms),
            "-".to_owned(),
            format!("{:.0}", u.total_ms),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
        ]);
    }

    let mut t2 = Table::new(
        format!(
            "7b. xDS push through a pair of proxies configured by a fake istiod (ms from the push to both proxies' \
             ACK / new meshwire_config_generation; CPU-ms of both; changed: every workload, Address only, median of \
             {}; RSS: before, 0.5 s after those pushes, 0.5 s after those of 7c, {} s later)",
            plan.repeat,
            SETTLE.as_secs()
        ),
        &[
            "path",
            "full: ACK Address",
            "full: ACK both",
            "full: generation",
            "full: CPU-ms",
            "changed: ACK",
            "changed: generation",
            "changed: CPU-ms",
            "RSS A+B before MB",
            "after pushes",
            "at the end",
            "settled",
        ],
    );
    for row in &proxies {
        t2.row(vec![
            row.path.clone(),
            format!("{:.0}", row.full_push.ack_address_ms),
            format!("{:.0}", row.full_push.ack_all_ms),
            format!("{:.0}", row.full_push.generation_ms),
            format!("{:.0}", row.full_push.cpu_ms),
            format!("{:.0}", row.change_push.ack_all_ms),
            format!("{:.0}", row.change_push.generation_ms),
            format!("{:.0}", row.change_push.cpu_ms),
            format!(
                "{:.1} ({:.1} + {:.1})",
                row.rss_before.a_mb + row.rss_before.b_mb,
                row.rss_before.a_mb,
                row.rss_before.b_mb
            ),
            format!(
                "{:.1} ({:.1} + {:.1})",
                row.rss_after.a_mb + row.rss_after.b_mb,
                row.rss_after.a_mb,
                row.rss_after.b_mb
            ),
            format!(
                "{:.1} ({:.1} + {:.1})",
                row.rss_end.a_mb + row.rss_end.b_mb,
                row.rss_end.a_mb,
                row.rss_end.b_mb
            ),
            format!(
                "{:.1} ({:.1} + {:.1})",
                row.rss_settled.a_mb + row.rss_settled.b_mb,
                row.rss_settled.a_mb,
                row.rss_settled.b_mb
            ),
        ]);
    }

    let mut t3 = Table::new(
        format!(
            "7c. 1 KiB request/response through the pair at {}/s for {} s: without pushes, with a push of every \
             workload changed each {} s in {} runs, each followed by the control, idle-priority spinners as long \
             as a push (all exchanges; those between pushes; those in flight from a push to its last ACK; the runs \
             pooled), with such pushes back to back, and with a push of one workload changed each second (latency \
             in us; the proxies' --xds-priority: {}, --xds-cpu-share: {})",
            plan.rr_rate,
            plan.xds_rr_s,
            PACE.as_secs_f64(),
            plan.repeat.max(1),
            plan.xds_priority.unwrap_or("idle, the default"),
            plan.xds_cpu_share
                .map_or_else(|| "the default".to_owned(), |s| s.to_string())
        ),
        &["path", "when", "pushes", "p50", "p90", "p99", "p99.9", "max"],
    );
    for row in &proxies {
        for (when, p, pushes) in [
            ("no pushes", &row.rr_before, "-".to_owned()),
            ("pushes paced", &row.rr_paced, row.pushes_paced.to_string()),
            ("- between pushes", &row.rr_between_pushes, "-".to_owned()),
            ("- during a push", &row.rr_in_push, "-".to_owned()),
            (
                "- no push in flight: between + no pushes",
                &row.rr_quiet,
                "-".to_owned(),
            ),
            (
                "one proxy at a time: during a push",
                &row.rr_in_push_apart,
                row.pushes_apart.to_string(),
            ),
            (
                "- no push in flight: between + no pushes",
                &row.rr_quiet_apart,
                "-".to_owned(),
            ),
            ("pushes back to back", &row.rr_during, row.pushes_during.to_string()),
            (
                "1 workload each 1 s: between",
                &row.rr_between_one_pushes,
                row.pushes_one.to_string(),
            ),
            ("- during a push", &row.rr_in_one_push, "-".to_owned()),
            (
                "control: idle spinners as long as a push: between",
                &row.rr_between_spins,
                format!("{} x {:.0} ms", row.spins, row.push_length_ms),
            ),
            ("- during a spin", &row.rr_in_spin, "-".to_owned()),
        ] {
            t3.row(vec![
                row.path.clone(),
                when.to_owned(),
                pushes,
                format!("{:.0}", p.p50_us),
                format!("{:.0}", p.p90_us),
                format!("{:.0}", p.p99_us),
                format!("{:.0}", p.p999_us),
                format!("{:.0}", p.max_us),
            ]);
        }
    }

    let held = mb(ip.store_bytes + ip.snapshot_bytes);
    let within = |ok: bool| if ok { "within" } else { "OVER" };
    let mut verdict = format!(
        "verdict ({} workloads, {} services): in process {:.0} ms (budget {:.0} ms: {}), state {:.1} MB (budget {:.0} \
         MB: {})",
        size.workloads,
        size.services,
        m.total_ms,
        BUDGET_APPLY_S * 1e3,
        within(m.total_ms <= BUDGET_APPLY_S * 1e3),
        held,
        BUDGET_STATE_MB,
        within(held <= BUDGET_STATE_MB),
    );
    for row in &proxies {
        let judge = |between: &Percentiles, during: &Percentiles| -> (f64, String) {
            let ratio = during.p99_us / between.p99_us.max(1.0);
            let word = if during.max_us == 0.0 {
                "no exchange was in flight during a push".to_owned()
            } else if ratio <= P99_JUMP {
                "no jump".to_owned()
            } else {
                format!("JUMP, over x{P99_JUMP}")
            };
            (ratio, word)
        };
        let (apart_ratio, apart_word) = judge(&row.rr_quiet_apart, &row.rr_in_push_apart);
        let (one_ratio, one_word) = judge(&row.rr_between_one_pushes, &row.rr_in_one_push);
        let push_ratio = median(row.rounds.iter().map(|r| r.push_ratio)).unwrap_or(0.0);
        let spin_ratio = median(row.rounds.iter().map(|r| r.spin_ratio)).unwrap_or(0.0);
        let each = row
            .rounds
            .iter()
            .map(|r| format!("x{:.2}/x{:.2}", r.push_ratio, r.spin_ratio))
            .collect::<Vec<_>>()
            .join(" ");
        let word = if row.rr_in_push.max_us == 0.0 {
            "no exchange was in flight during a push".to_owned()
        } else if push_ratio <= P99_JUMP {
            "no jump".to_owned()
        } else if push_ratio <= spin_ratio {
            format!("over x{P99_JUMP}, but no more than the control: the machine's")
        } else {
            format!("JUMP, over x{P99_JUMP} and over the control")
        };
        verdict.push_str(&format!(
            "; {}: push -> generation {:.0} ms ({}); p99 during a push of every workload to both proxies over the p99 \
             between pushes, median of {} rounds x{push_ratio:.2}, idle-priority spinners as long as a push, doing \
             nothing else (the control) x{spin_ratio:.2}: {word} (each round, push/control: {each}; pooled: {:.0} us \
             with no push in flight -> {:.0} us during a push); {:.0} -> {:.0} us to one proxy at a time (x{:.2}: \
             {apart_word}), {:.0} -> {:.0} us with one workload (x{:.2}: {one_word})",
            row.path,
            row.full_push.generation_ms,
            within(row.full_push.generation_ms <= BUDGET_APPLY_S * 1e3),
            row.rounds.len(),
            row.rr_quiet.p99_us,
            row.rr_in_push.p99_us,
            row.rr_quiet_apart.p99_us,
            row.rr_in_push_apart.p99_us,
            apart_ratio,
            row.rr_between_one_pushes.p99_us,
            row.rr_in_one_push.p99_us,
            one_ratio,
        ));
    }
    let report = XdsReport {
        in_process,
        proxies,
        rr_rate: plan.rr_rate,
        rr_seconds: plan.xds_rr_s,
    };
    Ok((report, vec![t1, t2, t3], verdict))
}
