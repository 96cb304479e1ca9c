//! Published snapshots, the configuration file watcher (initial load, valid, invalid and empty
//! changes, a file briefly missing, atomic replacement, polling with a settle period under a virtual
//! clock, inotify: a file applied only once its writer closes it, renames, symlink swaps) and the
//! connection registry that closes connections a new DENY policy matches.
#![allow(clippy::unwrap_used, missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use meshwire_dataplane::rt::tokio::TokioTimer;
use meshwire_dataplane::watch::{
    CloseReason, CloseSignal, ConfigWatcher, ConnectionAttrs, ConnectionRegistry, PollOutcome, Published, Snapshot,
};
use meshwire_dataplane::xds::{ConfigError, LocalConfig};
use meshwire_identity::id::SpiffeId;
use meshwire_identity::time::Timer;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// The workload `shop/cart` on 10.0.0.2: the `workloads` section of the configurations below.
macro_rules! shop {
    () => {
        r#"
workloads:
- name: cart
  namespace: shop
  serviceAccount: cart
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
"#
    };
}

const SHOP: &str = shop!();

/// SHOP with a namespace DENY policy for the `frontend` identity.
const SHOP_DENY_FRONTEND: &str = concat!(
    shop!(),
    r#"policies:
- name: deny-frontend
  namespace: shop
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/shop/sa/frontend]
"#
);

/// Line 7 holds an address that does not parse.
const INVALID: &str = r#"
workloads:
- name: cart
  namespace: shop
  serviceAccount: cart
  workloadIps:
  - "10.0.0.x"
"#;

fn write(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
}

fn config_file(content: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    write(&path, content);
    (dir, path)
}

fn ips(published: &Published) -> Vec<String> {
    published
        .load()
        .state
        .workloads()
        .flat_map(|w| w.workload_ips.iter().map(ToString::to_string))
        .collect()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn applied(outcome: PollOutcome) -> u64 {
    match outcome {
        PollOutcome::Applied(generation) => generation,
        other => panic!("expected Applied, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Published

#[test]
fn published_is_shared_and_cheap() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Published>();
    assert_send_sync::<ConnectionRegistry>();
    fn assert_send<T: Send + Sync>() {}
    assert_send::<CloseSignal>();
    assert_send::<ConfigWatcher>();
    assert_eq!(size_of::<CloseSignal>(), size_of::<usize>());

    let published = Published::default();
    assert_eq!(published.generation(), 0);
    let clone = published.clone();
    let mut changes = published.subscribe();
    let config = LocalConfig::parse(SHOP).unwrap();
    let snapshot = published.publish(config.clone(), None, SystemTime::UNIX_EPOCH);
    assert_eq!(snapshot.generation, 1);
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), 1);
    assert_eq!(clone.load_guard().state.workloads().len(), 1);

    let stored = clone.store(Snapshot::new(config, 7, None, SystemTime::UNIX_EPOCH));
    assert_eq!(stored.generation, 7);
    assert_eq!(published.generation(), 7);
    assert_eq!(*changes.borrow_and_update(), 7);
    assert_eq!(
        published
            .publish(LocalConfig::default(), None, SystemTime::UNIX_EPOCH)
            .generation,
        8
    );
}

// ---------------------------------------------------------------------------------------------
// The watcher

#[test]
fn initial_load() {
    let (_dir, path) = config_file(SHOP_DENY_FRONTEND);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    let snapshot = published.load();
    assert_eq!(snapshot.generation, 1);
    assert_eq!(snapshot.source.as_deref(), Some(path.as_path()));
    assert_eq!(snapshot.state.workloads().next().unwrap().name, "cart");
    assert_eq!(snapshot.policies.len(), 1);
    assert!(snapshot.policies.get("shop/deny-frontend").is_some());
    assert_eq!(watcher.path(), path);
    assert!(watcher.last_error().is_none());
    assert!(matches!(watcher.poll_once(), PollOutcome::Unchanged));
    assert_eq!(published.generation(), 1);
}

#[test]
fn start_fails_on_an_invalid_or_missing_file() {
    let (dir, path) = config_file(INVALID);
    let err = ConfigWatcher::start(&path).unwrap_err();
    assert_eq!(err.field(), Some("workloads[0].workloadIps[0]"));
    assert_eq!(err.location().unwrap().line, 7);

    let missing = dir.path().join("nope.yaml");
    let err = ConfigWatcher::start(&missing).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Read { file, kind: std::io::ErrorKind::NotFound, .. } if *file == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("nope.yaml"), "{err}");
}

#[test]
fn valid_change_is_applied() {
    let (_dir, path) = config_file(SHOP);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    let mut changes = published.subscribe();
    let before = published.load();

    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.3"));
    assert_eq!(applied(watcher.poll_once()), 2);
    assert_eq!(published.generation(), 2);
    assert_eq!(ips(&published), ["10.0.0.3"]);
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), 2);
    // A reader that kept the old snapshot still has it.
    assert_eq!(before.generation, 1);
    assert_eq!(
        before.state.workloads().next().unwrap().workload_ips[0].to_string(),
        "10.0.0.2"
    );

    // Nothing new: nothing published.
    assert!(matches!(watcher.poll_once(), PollOutcome::Unchanged));
    assert!(!changes.has_changed().unwrap());

    write(&path, SHOP_DENY_FRONTEND);
    assert_eq!(applied(watcher.poll_once()), 3);
    assert_eq!(published.load().policies.len(), 1);
}

#[test]
fn invalid_change_is_rejected_and_the_old_state_kept() {
    let (_dir, path) = config_file(SHOP);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    let changes = published.subscribe();

    write(&path, INVALID);
    let PollOutcome::Rejected(err) = watcher.poll_once() else {
        panic!("expected Rejected");
    };
    assert_eq!(err.field(), Some("workloads[0].workloadIps[0]"));
    assert_eq!(err.location().unwrap().line, 7);
    assert_eq!(published.generation(), 1);
    assert_eq!(ips(&published), ["10.0.0.2"]);
    assert!(!changes.has_changed().unwrap());

    let last = watcher.last_error().unwrap();
    assert_eq!(last, err);
    let message = last.to_string();
    assert!(message.starts_with("workloads[0].workloadIps[0]: "), "{message}");
    assert!(message.contains("line 7"), "{message}");

    // The same invalid content is judged once; the error stays for the admin page.
    assert!(matches!(watcher.poll_once(), PollOutcome::Unchanged));
    assert_eq!(watcher.last_error(), Some(err));

    // Content that is not UTF-8 is rejected too.
    std::fs::write(&path, b"workloads: \xff\n").unwrap();
    let PollOutcome::Rejected(ConfigError::Read { kind, .. }) = watcher.poll_once() else {
        panic!("expected a rejected read");
    };
    assert_eq!(kind, std::io::ErrorKind::InvalidData);

    // Reverting to the published content clears the error without a new generation.
    write(&path, SHOP);
    assert!(matches!(watcher.poll_once(), PollOutcome::Unchanged));
    assert!(watcher.last_error().is_none());
    assert_eq!(published.generation(), 1);

    // A valid change after a rejected one is applied.
    write(&path, INVALID);
    assert!(matches!(watcher.poll_once(), PollOutcome::Rejected(_)));
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.4"));
    assert_eq!(applied(watcher.poll_once()), 2);
    assert!(watcher.last_error().is_none());
    assert_eq!(ips(&published), ["10.0.0.4"]);
}

#[test]
fn a_file_removed_then_restored_keeps_the_state() {
    let (_dir, path) = config_file(SHOP);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();

    std::fs::remove_file(&path).unwrap();
    for _ in 0..2 {
        let PollOutcome::Missing(err) = watcher.poll_once() else {
            panic!("expected Missing");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
    assert_eq!(published.generation(), 1);
    assert_eq!(ips(&published), ["10.0.0.2"]);
    assert!(matches!(watcher.last_error(), Some(ConfigError::Read { .. })));

    // Restored as it was: nothing to publish.
    write(&path, SHOP);
    assert!(matches!(watcher.poll_once(), PollOutcome::Unchanged));
    assert!(watcher.last_error().is_none());
    assert_eq!(published.generation(), 1);

    // Removed, then restored with new content.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(watcher.poll_once(), PollOutcome::Missing(_)));
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.5"));
    assert_eq!(applied(watcher.poll_once()), 2);
    assert_eq!(ips(&published), ["10.0.0.5"]);
}

#[test]
fn atomic_replacement_by_rename_is_picked_up() {
    let (dir, path) = config_file(SHOP);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();

    // Same length, written within the same timestamp tick: only the content differs.
    let replacement = dir.path().join(".config.yaml.tmp");
    write(&replacement, &SHOP.replace("10.0.0.2", "10.0.0.9"));
    std::fs::rename(&replacement, &path).unwrap();
    assert_eq!(applied(watcher.poll_once()), 2);
    assert_eq!(ips(&published), ["10.0.0.9"]);

    // And again, through a symlink swap as Kubernetes ConfigMap volumes do it.
    let data = dir.path().join("data-2");
    std::fs::create_dir(&data).unwrap();
    write(&data.join("config.yaml"), &SHOP.replace("10.0.0.2", "10.0.0.8"));
    let link = dir.path().join("link.tmp");
    std::os::unix::fs::symlink(data.join("config.yaml"), &link).unwrap();
    std::fs::rename(&link, &path).unwrap();
    assert_eq!(applied(watcher.poll_once()), 3);
    assert_eq!(ips(&published), ["10.0.0.8"]);
}

#[test]
fn a_watcher_without_initial_load_publishes_on_first_poll() {
    let (_dir, path) = config_file(SHOP);
    let published = Published::default();
    let watcher = ConfigWatcher::new(&path, published.clone());
    let loaded_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    assert_eq!(applied(watcher.poll_once_at(loaded_at)), 1);
    assert_eq!(published.load().loaded_at, loaded_at);
    assert!(matches!(watcher.poll_once(), PollOutcome::Unchanged));
}

/// A virtual clock: sleeps end when the test moves the clock past their deadline. (tokio's paused
/// clock, `start_paused`, needs tokio's `test-util` feature, which this crate's dev-dependencies do not
/// enable.)
#[derive(Clone)]
struct VirtualTimer {
    inner: Arc<Mutex<VirtualClock>>,
}

struct VirtualClock {
    now: Instant,
    sleepers: Vec<Waker>,
}

impl VirtualTimer {
    fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(VirtualClock {
                now: Instant::now(),
                sleepers: Vec::new(),
            })),
        }
    }

    fn advance(&self, by: Duration) {
        let sleepers = {
            let mut clock = self.inner.lock().unwrap();
            clock.now += by;
            std::mem::take(&mut clock.sleepers)
        };
        // Every sleeper looks again at its deadline.
        sleepers.into_iter().for_each(Waker::wake);
    }
}

struct VirtualSleep {
    clock: Arc<Mutex<VirtualClock>>,
    deadline: Instant,
}

impl Future for VirtualSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut clock = self.clock.lock().unwrap();
        if clock.now >= self.deadline {
            return Poll::Ready(());
        }
        clock.sleepers.push(cx.waker().clone());
        Poll::Pending
    }
}

impl Timer for VirtualTimer {
    type Sleep = VirtualSleep;

    fn now(&self) -> Instant {
        self.inner.lock().unwrap().now
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    fn sleep_until(&self, deadline: Instant) -> VirtualSleep {
        VirtualSleep {
            clock: Arc::clone(&self.inner),
            deadline,
        }
    }
}

/// Lets every other task of the current-thread runtime run until it waits again.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn polling_applies_a_change_once_it_has_settled() {
    let (_dir, path) = config_file(SHOP);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    let watcher = Arc::new(watcher);
    let mut changes = published.subscribe();
    let interval = Duration::from_secs(5);
    let timer = VirtualTimer::new();

    let task = tokio::spawn({
        let (watcher, timer) = (Arc::clone(&watcher), timer.clone());
        async move { watcher.run_polling(timer, interval, interval).await }
    });
    // The watcher takes its first look at once, then sleeps for the interval.
    settle().await;
    assert_eq!(published.generation(), 1);

    timer.advance(Duration::from_millis(100));
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.3"));
    // Not seen before the interval is over.
    timer.advance(Duration::from_millis(4_899));
    settle().await;
    assert_eq!(published.generation(), 1);
    // Seen, but not yet the same for the settle period.
    timer.advance(Duration::from_millis(1));
    settle().await;
    assert_eq!(published.generation(), 1);
    assert!(!changes.has_changed().unwrap());

    timer.advance(interval);
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("a change once it has settled")
        .unwrap();
    assert_eq!(*changes.borrow_and_update(), 2);
    assert_eq!(ips(&published), ["10.0.0.3"]);
    // `loaded_at` comes from the timer's wall clock.
    assert_eq!(published.load().loaded_at, SystemTime::UNIX_EPOCH);

    // A half-written file that changes again before it settles is never applied.
    write(&path, "\nworkloads:\n- name: cart\n");
    timer.advance(interval);
    settle().await;
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.4"));
    timer.advance(interval);
    settle().await;
    assert_eq!(published.generation(), 2);
    timer.advance(interval);
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*changes.borrow_and_update(), 3);
    assert_eq!(ips(&published), ["10.0.0.4"]);

    // An invalid change is kept out once settled, and the loop goes on.
    write(&path, INVALID);
    timer.advance(interval);
    settle().await;
    assert!(watcher.last_error().is_none(), "judged before it settled");
    timer.advance(interval);
    settle().await;
    assert_eq!(published.generation(), 3);
    assert_eq!(
        watcher.last_error().unwrap().field(),
        Some("workloads[0].workloadIps[0]")
    );
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.5"));
    timer.advance(interval);
    settle().await;
    timer.advance(interval);
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ips(&published), ["10.0.0.5"]);
    assert!(watcher.last_error().is_none());

    task.abort();
}

#[test]
fn poll_settled_waits_for_the_same_content_over_the_settle_period() {
    let (_dir, path) = config_file(SHOP);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    let settle = Duration::from_secs(2);
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let wall = SystemTime::UNIX_EPOCH;
    let poll = |ms: u64| watcher.poll_settled_at(at(ms), wall, settle);

    assert!(matches!(poll(0), PollOutcome::Unchanged));
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.3"));
    assert!(matches!(poll(100), PollOutcome::Settling));
    assert!(matches!(poll(2_099), PollOutcome::Settling));
    assert_eq!(published.generation(), 1);
    assert_eq!(applied(poll(2_100)), 2);
    // Back to a known content: nothing settles.
    write(&path, SHOP);
    assert!(matches!(poll(3_000), PollOutcome::Settling));
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.3"));
    assert!(matches!(poll(6_000), PollOutcome::Unchanged));
    // A direct look applies at once (the caller knows the writer is done).
    write(&path, SHOP);
    assert!(matches!(poll(7_000), PollOutcome::Settling));
    assert_eq!(applied(watcher.poll_once()), 3);
}

#[test]
fn an_empty_file_is_an_error_and_the_state_stays() {
    let (_dir, path) = config_file(SHOP);
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    for empty in ["", "\n", "  \n\t\n"] {
        write(&path, empty);
        let PollOutcome::Rejected(err) = watcher.poll_once() else {
            panic!("an empty file {empty:?} must be rejected");
        };
        assert!(matches!(&err, ConfigError::Empty { file } if *file == path), "{err:?}");
        assert!(
            err.to_string().contains("is empty; keeping the current configuration"),
            "{err}"
        );
        assert_eq!(published.generation(), 1);
        assert_eq!(ips(&published), ["10.0.0.2"]);
        assert_eq!(watcher.last_error(), Some(err));
    }
    // An explicitly empty configuration is one.
    write(&path, "{}\n");
    assert_eq!(applied(watcher.poll_once()), 2);
    assert!(published.load().state.workloads().next().is_none());

    // A proxy does not start on an empty file either.
    write(&path, "");
    let Err(err) = ConfigWatcher::start(&path) else {
        panic!("started on an empty file");
    };
    assert!(matches!(err, ConfigError::Empty { .. }), "{err:?}");
    assert!(matches!(LocalConfig::load(&path), Err(ConfigError::Empty { .. })));
}

/// Waits up to 20 s until the published generation is `generation`.
async fn generation_becomes(published: &Published, generation: u64) {
    let mut changes = published.subscribe();
    tokio::time::timeout(Duration::from_secs(20), changes.wait_for(|g| *g >= generation))
        .await
        .unwrap_or_else(|_| panic!("generation {generation} not published; at {}", published.generation()))
        .unwrap();
    assert_eq!(published.generation(), generation);
}

/// Starts [`ConfigWatcher::run`] with a poll interval so long that only inotify can see a change.
fn run_notified(path: &Path) -> (Arc<ConfigWatcher>, Published, tokio::task::JoinHandle<()>) {
    let (watcher, published) = ConfigWatcher::start(path).unwrap();
    let watcher = Arc::new(watcher);
    let task = tokio::spawn({
        let watcher = Arc::clone(&watcher);
        async move {
            watcher.run(TokioTimer, Duration::from_secs(3_600)).await;
        }
    });
    (watcher, published, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inotify_applies_a_file_rewritten_in_place_only_once_the_writer_closes_it() {
    use std::io::Write as _;
    let (_dir, path) = config_file(SHOP);
    let (_watcher, published, task) = run_notified(&path);

    // Truncated and half-written in place, held open: never applied, however long the writer waits.
    let full = SHOP_DENY_FRONTEND;
    let cut = full.find("policies:").unwrap();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(&full.as_bytes()[..cut]).unwrap();
    file.flush().unwrap();
    let mut changes = published.subscribe();
    assert!(
        tokio::time::timeout(Duration::from_millis(1_500), changes.changed())
            .await
            .is_err(),
        "a half-written file was applied"
    );
    assert_eq!(published.generation(), 1);
    assert!(published.load().policies.is_empty());

    // Done: the whole file is applied.
    file.write_all(&full.as_bytes()[cut..]).unwrap();
    drop(file);
    generation_becomes(&published, 2).await;
    assert_eq!(published.load().policies.len(), 1);

    // Opened for writing and closed without a write: the same content, nothing new.
    drop(std::fs::OpenOptions::new().append(true).open(&path).unwrap());
    // Renamed into place.
    let tmp = path.with_extension("tmp");
    write(&tmp, &SHOP.replace("10.0.0.2", "10.0.0.7"));
    std::fs::rename(&tmp, &path).unwrap();
    generation_becomes(&published, 3).await;
    assert_eq!(ips(&published), ["10.0.0.7"]);
    task.abort();
}

#[tokio::test]
async fn run_polls_while_the_directory_cannot_be_watched_then_watches_it() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("later");
    let path = dir.join("config.yaml");
    let published = Published::default();
    let watcher = Arc::new(ConfigWatcher::new(&path, published.clone()));
    let timer = VirtualTimer::new();
    let task = tokio::spawn({
        let (watcher, timer) = (Arc::clone(&watcher), timer.clone());
        async move { watcher.run(timer, Duration::from_secs(1)).await }
    });
    // No directory to watch: the watcher polls, and finds no file.
    settle().await;
    assert_eq!(published.generation(), 0);
    assert!(matches!(watcher.last_error(), Some(ConfigError::Read { .. })));

    // The directory and the file appear: at the next poll the watcher watches the directory with
    // inotify, and looks once at what was written while it could not.
    std::fs::create_dir(&dir).unwrap();
    write(&path, SHOP);
    timer.advance(Duration::from_secs(1));
    generation_becomes(&published, 1).await;
    // From now on, inotify: a change is seen without the clock moving.
    write(&path, &SHOP.replace("10.0.0.2", "10.0.0.6"));
    generation_becomes(&published, 2).await;
    assert_eq!(ips(&published), ["10.0.0.6"]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inotify_follows_a_configmap_symlink_swap_and_a_symlink_to_another_directory() {
    // A ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..v1.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..v1")).unwrap();
    write(&root.join("..v1/config.yaml"), SHOP);
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.yaml", root.join("config.yaml")).unwrap();
    let path = root.join("config.yaml");
    let (_watcher, published, task) = run_notified(&path);

    // The kubelet's update: a new directory, a new `..data` symlink renamed over the old one.
    std::fs::create_dir(root.join("..v2")).unwrap();
    write(&root.join("..v2/config.yaml"), &SHOP.replace("10.0.0.2", "10.0.0.8"));
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..v1")).unwrap();
    generation_becomes(&published, 2).await;
    assert_eq!(ips(&published), ["10.0.0.8"]);

    // The file the symlink resolves to, rewritten in place in its own directory.
    write(&root.join("..v2/config.yaml"), &SHOP.replace("10.0.0.2", "10.0.0.9"));
    generation_becomes(&published, 3).await;
    assert_eq!(ips(&published), ["10.0.0.9"]);
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// The connection registry

fn shop_conn(identity: &str, src: &str) -> ConnectionAttrs {
    ConnectionAttrs::new("shop", Vec::new(), Some(id(identity)), addr(src), addr("10.0.0.2:8080"))
}

async fn closes(signal: &mut CloseSignal) -> CloseReason {
    tokio::time::timeout(Duration::from_secs(5), signal)
        .await
        .expect("the close signal fires")
}

async fn stays_open(signal: &mut CloseSignal) {
    assert!(!signal.is_closed());
    assert!(
        tokio::time::timeout(Duration::from_millis(50), signal).await.is_err(),
        "the close signal must not fire"
    );
}

#[tokio::test]
async fn a_new_deny_policy_closes_exactly_the_connections_it_matches() {
    let (_dir, path) = config_file(SHOP);
    let registry = ConnectionRegistry::new();
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    let watcher = watcher.with_registry(registry.clone());

    let (_frontend_guard, mut frontend) = registry.register(shop_conn(
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "10.0.0.1:40000",
    ));
    let (_admin_guard, mut admin) =
        registry.register(shop_conn("spiffe://cluster.local/ns/shop/sa/admin", "10.0.0.3:40000"));
    assert_eq!(registry.len(), 2);

    // Waiting before the change: the signal must be woken, not only found set.
    let waiting = tokio::spawn(async move {
        let reason = closes(&mut frontend).await;
        (reason, frontend)
    });
    tokio::task::yield_now().await;

    // The same policies: nothing closes.
    assert_eq!(registry.reevaluate(&published.load()), 0);

    write(&path, SHOP_DENY_FRONTEND);
    assert_eq!(applied(watcher.poll_once()), 2);
    let (reason, frontend) = waiting.await.unwrap();
    assert_eq!(
        reason,
        CloseReason::PolicyDenied {
            generation: 2,
            policy: Some("shop/deny-frontend".to_owned()),
            message: "denied: explicitly denied by: shop/deny-frontend".to_owned(),
        }
    );
    assert!(frontend.is_closed());
    assert_eq!(frontend.reason(), Some(&reason));
    assert_eq!(
        reason.to_string(),
        "configuration generation 2: denied: explicitly denied by: shop/deny-frontend"
    );
    stays_open(&mut admin).await;

    // A connection told to close is not counted again; the other is still allowed.
    assert_eq!(registry.reevaluate(&published.load()), 0);
    // The registry itself: a fresh connection of the denied identity is closed by reevaluate.
    let (_again_guard, mut again) = registry.register(shop_conn(
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "10.0.0.1:40001",
    ));
    assert_eq!(registry.reevaluate(&published.load()), 1);
    closes(&mut again).await;
    stays_open(&mut admin).await;
}

/// Connections from one peer identity to one destination share their registered attributes but
/// keep their own source addresses: a policy on source addresses closes exactly the one it matches.
#[tokio::test]
async fn a_policy_on_source_addresses_closes_only_the_matching_connection_of_a_peer() {
    const DENY_SOURCE: &str = concat!(
        shop!(),
        r#"policies:
- name: deny-one-source
  namespace: shop
  scope: Namespace
  action: Deny
  rules:
  - - - sourceIps: [10.0.0.7/32]
"#
    );
    let (_dir, path) = config_file(SHOP);
    let registry = ConnectionRegistry::new();
    let (watcher, published) = ConfigWatcher::start(&path).unwrap();
    let watcher = watcher.with_registry(registry.clone());
    let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
    let (_a_guard, mut a) = registry.register(shop_conn(frontend, "10.0.0.1:40000"));
    let (_b_guard, mut b) = registry.register(shop_conn(frontend, "10.0.0.7:40000"));
    let (_c_guard, mut c) = registry.register(shop_conn(frontend, "10.0.0.1:40001"));

    write(&path, DENY_SOURCE);
    assert_eq!(applied(watcher.poll_once()), 2);
    let reason = closes(&mut b).await;
    assert!(reason.to_string().contains("shop/deny-one-source"), "{reason}");
    stays_open(&mut a).await;
    stays_open(&mut c).await;
    assert_eq!(registry.reevaluate(&published.load()), 0);
}

#[tokio::test]
async fn a_policy_newly_selecting_the_workload_is_seen_through_its_uid() {
    let config = LocalConfig::parse(SHOP).unwrap();
    let published = Published::new(Snapshot::new(config, 1, None, SystemTime::UNIX_EPOCH));
    let registry = ConnectionRegistry::new();
    let cart = published.load().state.workloads().next().expect("a workload").clone();
    let peer = id("spiffe://cluster.local/ns/other/sa/client");
    let (_guard, mut signal) = registry.register(ConnectionAttrs::for_workload(
        &cart,
        Some(peer),
        addr("10.0.0.7:1234"),
        addr("10.0.0.2:8080"),
    ));
    let (_plain_guard, mut plaintext) = registry.register(ConnectionAttrs::new(
        "elsewhere",
        Vec::new(),
        None,
        addr("10.0.0.8:1234"),
        addr("10.0.0.9:80"),
    ));

    // The workload now selects a DENY policy of another namespace for peers of namespace `other`.
    let changed = concat!(
        shop!(),
        r#"  authorizationPolicies: ["security/no-other"]
policies:
- name: no-other
  namespace: security
  scope: WorkloadSelector
  action: Deny
  rules:
  - - - namespaces: [!Exact other]
"#
    );
    let snapshot = published.publish(LocalConfig::parse(changed).unwrap(), None, SystemTime::UNIX_EPOCH);
    assert_eq!(registry.reevaluate(&snapshot), 1);
    let CloseReason::PolicyDenied { policy, .. } = closes(&mut signal).await else {
        panic!("expected a policy denial");
    };
    assert_eq!(policy.as_deref(), Some("security/no-other"));
    stays_open(&mut plaintext).await;
}

#[test]
fn dropping_the_guard_unregisters() {
    let registry = ConnectionRegistry::default();
    assert!(registry.is_empty());
    let (guard, signal) = registry.register(shop_conn(
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "10.0.0.1:40000",
    ));
    let (other_guard, _other) = registry.register(shop_conn(
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "10.0.0.1:40001",
    ));
    assert_eq!(registry.len(), 2);
    drop(guard);
    assert_eq!(registry.len(), 1);

    // Only the connection still registered is judged and closed.
    let snapshot = Snapshot::new(
        LocalConfig::parse(SHOP_DENY_FRONTEND).unwrap(),
        2,
        None,
        SystemTime::UNIX_EPOCH,
    );
    assert_eq!(registry.reevaluate(&snapshot), 1);
    assert!(!signal.is_closed());
    drop(other_guard);
    assert!(registry.is_empty());
    assert_eq!(registry.reevaluate(&snapshot), 0);
}

#[test]
fn registration_from_many_threads() {
    let registry = ConnectionRegistry::new();
    let snapshot = Snapshot::new(
        LocalConfig::parse(SHOP_DENY_FRONTEND).unwrap(),
        2,
        None,
        SystemTime::UNIX_EPOCH,
    );
    let kept: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let registry = registry.clone();
                scope.spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..100 {
                        let sa = if i % 2 == 0 { "frontend" } else { "admin" };
                        let conn = shop_conn(
                            &format!("spiffe://cluster.local/ns/shop/sa/{sa}"),
                            &format!("10.0.{t}.1:{}", 10_000 + i),
                        );
                        let registered = registry.register(conn);
                        if i % 4 < 2 {
                            kept.push(registered);
                        }
                    }
                    kept
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(registry.len(), 8 * 50);
    // Kept: i % 4 in {0, 1}; denied: the even ones (frontend), i % 4 == 0.
    assert_eq!(registry.reevaluate(&snapshot), 8 * 25);
    let closed = kept.iter().filter(|(_, signal)| signal.is_closed()).count();
    assert_eq!(closed, 8 * 25);
    drop(kept);
    assert!(registry.is_empty());
}

#[tokio::test]
async fn a_pods_child_registry_is_judged_with_the_process_and_closed_on_its_own() {
    let config = LocalConfig::parse(SHOP).unwrap();
    let published = Published::new(Snapshot::new(config, 1, None, SystemTime::UNIX_EPOCH));
    let registry = ConnectionRegistry::new();
    let pod_a = registry.child();
    let pod_b = registry.child();
    let (_a_guard, mut a_conn) = pod_a.register(shop_conn(
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "10.0.0.1:40010",
    ));
    let (_b_guard, mut b_conn) = pod_b.register(shop_conn("spiffe://cluster.local/ns/shop/sa/admin", "10.0.0.3:40011"));
    let (_own_guard, mut own_conn) =
        registry.register(shop_conn("spiffe://cluster.local/ns/shop/sa/admin", "10.0.0.3:40012"));
    assert_eq!(registry.len(), 3);
    assert_eq!(pod_a.len(), 1);

    // A new DENY reaches the children's connections through the process's registry.
    let snapshot = published.publish(
        LocalConfig::parse(SHOP_DENY_FRONTEND).unwrap(),
        None,
        SystemTime::UNIX_EPOCH,
    );
    assert_eq!(registry.reevaluate(&snapshot), 1);
    assert!(matches!(closes(&mut a_conn).await, CloseReason::PolicyDenied { .. }));

    // Removing pod b closes its connections only.
    let reason = CloseReason::PodRemoved {
        uid: "uid-b".to_owned(),
    };
    assert_eq!(pod_b.close_all(&reason), 1);
    assert_eq!(closes(&mut b_conn).await, reason);
    assert_eq!(reason.to_string(), "pod uid-b is no longer served");
    stays_open(&mut own_conn).await;
    assert_eq!(pod_b.close_all(&reason), 0, "told once");

    // A dropped child is forgotten by its parent.
    drop(pod_b);
    drop(_b_guard);
    assert_eq!(registry.len(), 2);
}
