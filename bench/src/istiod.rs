//! A fake istiod for the xds shape: `meshwire_testkit::istiod::FakeIstiod` (a real gRPC server over
//! TLS, and a CA) serving one mesh over delta xDS to every proxy that subscribes, and timing pushes:
//! each push gets a nonce, and every ACK or NACK is recorded with the stream, the nonce and when it
//! arrived.
//!
//! `meshwire_tests::istio::Istiod` does the same for the whole-proxy tests, but its `serve` and
//! `push` compare the new resources with the served ones pairwise (quadratic: seconds for a mesh of
//! 10,000 workloads, which would be timed as the push) and its answers carry no nonce or time.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshwire_control::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use meshwire_testkit::istiod::{FakeIstiod, StreamHandle};
use meshwire_tests::istio::{ADDRESS, AUTHORIZATION, Named, Resources};
use tokio::sync::{broadcast, mpsc, oneshot};

/// One push: its type, nonce and resources (added or changed), and the stream it is for (`None`:
/// every stream).
struct Push {
    type_url: String,
    nonce: String,
    resources: Arc<Vec<Resource>>,
    to: Option<u64>,
}

/// An ACK or NACK.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// The nonce it answers.
    pub(crate) nonce: String,
    /// The NACK's message; `None` for an ACK.
    pub(crate) nack: Option<String>,
    /// When it arrived.
    pub(crate) at: Instant,
}

/// What the bench reads and istiod's thread writes: held only briefly, so that the bench's runtime
/// (where the timed clients run) never waits on istiod's work.
struct Served {
    answers: Vec<Answer>,
    nonce: u64,
    /// The streams being served, by number (in the order they came).
    live: std::collections::BTreeSet<u64>,
}

/// What a new subscription gets: per type URL, every resource by name, and the pushes since, merged
/// in only when a stream subscribes (a push then costs istiod's thread nothing more than handing it
/// to the streams); only istiod's thread touches it.
type Kept = Arc<Mutex<KeptResources>>;

#[derive(Default)]
struct KeptResources {
    by_type: BTreeMap<String, BTreeMap<String, Resource>>,
    pushed: Vec<Arc<Push>>,
}

impl KeptResources {
    /// Every resource of `type_url`, the pushes merged in.
    fn all(&mut self, type_url: &str) -> Vec<Resource> {
        for push in std::mem::take(&mut self.pushed) {
            let kept = self.by_type.entry(push.type_url.clone()).or_default();
            for r in push.resources.iter() {
                kept.insert(r.name.clone(), r.clone());
            }
        }
        self.by_type
            .get(type_url)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Resources cloned for a stream between two rests of istiod's thread (see [`response_paced`]).
const CLONE_SLICE: usize = 2000;

/// The fake istiod; stops when dropped.
pub(crate) struct Istiod {
    fake: Arc<FakeIstiod>,
    served: Arc<Mutex<Served>>,
    pushes: mpsc::UnboundedSender<Push>,
    root: PathBuf,
    token: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Istiod {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `named` as the resources of a response, each with `version`.
pub(crate) fn resources(named: Vec<Named>, version: &str) -> Vec<Resource> {
    named
        .into_iter()
        .map(|n| Resource {
            name: n.name,
            version: version.to_owned(),
            resource: Some(n.any),
            ..Default::default()
        })
        .collect()
}

impl Istiod {
    /// Starts serving `initial` on a thread of its own, at `SCHED_IDLE` (its own tokio runtime:
    /// istiod's encoding and TLS work does not run on the bench's runtime, where the clients it
    /// times run, and takes only CPU time nothing else wants, as istiod on another machine would);
    /// writes its root and the proxies' token into `dir`.
    pub(crate) async fn start(dir: &Path, initial: Resources) -> anyhow::Result<Istiod> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let by_name = |named: Vec<Named>| -> BTreeMap<String, Resource> {
            resources(named, "initial")
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect()
        };
        let kept: Kept = Arc::new(Mutex::new(KeptResources {
            by_type: BTreeMap::from([
                (ADDRESS.to_owned(), by_name(initial.addresses)),
                (AUTHORIZATION.to_owned(), by_name(initial.policies)),
            ]),
            pushed: Vec::new(),
        }));
        let served = Arc::new(Mutex::new(Served {
            answers: Vec::new(),
            nonce: 0,
            live: std::collections::BTreeSet::new(),
        }));
        let (pushes, mut queued) = mpsc::unbounded_channel::<Push>();
        let (started, fake) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let s = Arc::clone(&served);
        let thread = std::thread::Builder::new()
            .name("fake-istiod".to_owned())
            .spawn(move || {
                // istiod runs on other machines of a real mesh: here it takes only the CPU time
                // the proxies and the bench's clients leave (its pushes cost it tens of
                // milliseconds each, which would otherwise be counted against the proxies' latency).
                if let Err(error) = meshwire_dataplane::app::istio::set_idle_priority() {
                    eprintln!("warning: the fake istiod's thread stays at the default policy: {error}");
                }
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = started.send(Err(anyhow::anyhow!("the fake istiod's runtime: {err}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let fake = Arc::new(FakeIstiod::start().await);
                    let (broadcast, _) = broadcast::channel::<Arc<Push>>(16);
                    let (f, b) = (Arc::clone(&fake), broadcast.clone());
                    let (served, k) = (Arc::clone(&s), Arc::clone(&kept));
                    tokio::spawn(async move {
                        for id in 0.. {
                            let stream = f.next_stream().await;
                            lock(&served).live.insert(id);
                            let (served, k, pushes) = (Arc::clone(&served), Arc::clone(&k), b.subscribe());
                            tokio::spawn(async move {
                                serve(id, stream, &served, &k, pushes).await;
                                lock(&served).live.remove(&id);
                            });
                        }
                    });
                    // Pushes are kept for the streams to come and handed to every stream here, on
                    // istiod's thread.
                    tokio::spawn(async move {
                        while let Some(push) = queued.recv().await {
                            let push = Arc::new(push);
                            lock(&kept).pushed.push(Arc::clone(&push));
                            let _ = broadcast.send(push);
                        }
                    });
                    if started.send(Ok(fake)).is_err() {
                        return;
                    }
                    let _ = stopped.await;
                });
            })
            .context("starting the fake istiod's thread")?;
        let fake = fake.await.context("the fake istiod's thread ended")??;
        let root = dir.join("root-cert.pem");
        let token = dir.join("istio-token");
        std::fs::write(&root, fake.root_pem()).with_context(|| format!("writing {}", root.display()))?;
        std::fs::write(&token, "bench-token\n").with_context(|| format!("writing {}", token.display()))?;
        Ok(Istiod {
            fake,
            served,
            pushes,
            root,
            token,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The environment of a proxy that istiod configures and certifies (as ztunnel's DaemonSet
    /// sets it).
    pub(crate) fn env(&self, pod: &str, instance_ip: IpAddr) -> Vec<(String, String)> {
        meshwire_testkit::istiod::proxy_env(self.fake.address(), &self.root, &self.token, pod, instance_ip)
    }

    /// Sends `resources` of `type_url` (added or changed) to every stream and keeps them for the
    /// streams to come (on istiod's thread). Returns the push's nonce and when it was handed over.
    pub(crate) fn push(&self, type_url: &str, resources: Arc<Vec<Resource>>) -> (String, Instant) {
        self.push_to(type_url, resources, None)
    }

    /// The numbers of the streams being served.
    pub(crate) fn streams(&self) -> Vec<u64> {
        lock(&self.served).live.iter().copied().collect()
    }

    /// [`Istiod::push`] to the stream numbered `to` only (`None`: to every stream).
    pub(crate) fn push_to(&self, type_url: &str, resources: Arc<Vec<Resource>>, to: Option<u64>) -> (String, Instant) {
        let nonce = {
            let mut served = lock(&self.served);
            served.nonce += 1;
            format!("push-{}", served.nonce)
        };
        let at = Instant::now();
        let _ = self.pushes.send(Push {
            type_url: type_url.to_owned(),
            nonce: nonce.clone(),
            resources,
            to,
        });
        (nonce, at)
    }

    /// Waits until `count` streams have answered `nonce` (up to `within`); returns their answers.
    /// A NACK is an error.
    pub(crate) async fn answers(&self, nonce: &str, count: usize, within: Duration) -> anyhow::Result<Vec<Answer>> {
        let deadline = Instant::now() + within;
        loop {
            let answers: Vec<Answer> = lock(&self.served)
                .answers
                .iter()
                .filter(|a| a.nonce == nonce)
                .cloned()
                .collect();
            if let Some(nack) = answers.iter().find_map(|a| a.nack.as_ref()) {
                bail!("a proxy rejected push {nonce}: {nack}");
            }
            if answers.len() >= count {
                return Ok(answers);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} of {count} proxies answered push {nonce} within {within:?}",
                    answers.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn response(type_url: &str, nonce: &str, resources: Vec<Resource>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        nonce: nonce.to_owned(),
        resources,
        ..Default::default()
    }
}

/// Serves one stream: everything of each type it subscribes to, then every push; records its
/// answers.
async fn serve(
    id: u64,
    mut stream: StreamHandle,
    served: &Mutex<Served>,
    kept: &Kept,
    mut pushes: broadcast::Receiver<Arc<Push>>,
) {
    loop {
        tokio::select! {
            request = stream.recv() => {
                let Some(request) = request else { return };
                on_request(&stream, served, kept, request);
            }
            push = pushes.recv() => match push {
                Ok(push) if push.to.is_some_and(|to| to != id) => {}
                Ok(push) => {
                    let response = response_paced(&push).await;
                    stream.send(response);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// The response of `push` for one stream, its resources cloned in slices of [`CLONE_SLICE`] with a
/// rest of 1 ms between them: istiod runs on other machines of a real mesh, and the fake one's CPU
/// time (even at `SCHED_IDLE`) would otherwise be counted against the proxies' latency during a
/// push. (Encoding and encrypting the response remain, in tonic.)
async fn response_paced(push: &Push) -> DeltaDiscoveryResponse {
    let mut resources = Vec::with_capacity(push.resources.len());
    for (i, slice) in push.resources.chunks(CLONE_SLICE).enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        resources.extend_from_slice(slice);
    }
    response(&push.type_url, &push.nonce, resources)
}

fn on_request(stream: &StreamHandle, served: &Mutex<Served>, kept: &Kept, request: DeltaDiscoveryRequest) {
    let at = Instant::now();
    if request.response_nonce.is_empty() {
        // A subscription (or a resumed one): everything of the type.
        let all = lock(kept).all(&request.type_url);
        let mut served = lock(served);
        served.nonce += 1;
        let nonce = format!("subscribe-{}", served.nonce);
        drop(served);
        stream.send(response(&request.type_url, &nonce, all));
    } else {
        lock(served).answers.push(Answer {
            nonce: request.response_nonce,
            nack: request.error_detail.map(|status| status.message),
            at,
        });
    }
}
