//! In-pod mode's bookkeeping ([`Pods`]) over a starter that binds a real listener inside each
//! pod's network namespace (through [`NetnsSocketFactory`], as the binaries do): the snapshot and
//! readiness, a pod whose port is taken NACKed and retried, `Del` and the snapshot's reconciliation
//! closing listeners, `Keep`, and a pod whose sandbox (namespace) changed moved to the new one.
//!
//! Needs root and `ip` (pods are network namespaces made by the test). Without them the tests fail
//! saying so, unless `MESHWIRE_SKIP_NETNS=1` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use meshwire_dataplane::config::WorkloadInfo;
use meshwire_dataplane::inpod::{PodStarter, Pods, RETRY_INTERVAL};
use meshwire_dataplane::rt::netns::{Netns, NetnsSocketFactory};
use meshwire_dataplane::rt::socket::{DefaultSocketFactory, SocketFactory, SocketOptions};

const PORT: u16 = 15006;

/// The tests run one at a time: a process one test forks (`ip netns add`) holds a copy of another
/// test's listeners until it execs, which would keep a closed listener reachable for a moment.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn can_make_namespaces(test: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        return true;
    }
    if std::env::var_os("MESHWIRE_SKIP_NETNS").is_some_and(|v| v == "1") {
        eprintln!("{test}: skipped (MESHWIRE_SKIP_NETNS=1): needs root");
        return false;
    }
    panic!("{test} needs root (network namespaces); set MESHWIRE_SKIP_NETNS=1 to skip such tests");
}

/// A network namespace (a pod's sandbox) with loopback up, deleted on drop.
struct Sandbox(String);

impl Sandbox {
    fn new() -> Sandbox {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("mw-pods-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Sandbox(name)
    }

    fn netns(&self) -> Netns {
        Netns::open(format!("/run/netns/{}", self.0)).unwrap()
    }

    /// Whether something listens on 127.0.0.1:`port` inside the sandbox.
    fn listening(&self, port: u16) -> bool {
        let home = Netns::own().unwrap();
        self.netns()
            .run(&home, || {
                std::net::TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    Duration::from_secs(2),
                )
                .is_ok()
            })
            .unwrap()
    }

    /// Waits (up to 5 s) until 127.0.0.1:`port` can be bound inside the sandbox.
    fn wait_until_free(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let probe = NetnsSocketFactory::new(DefaultSocketFactory, self.netns(), Netns::own().unwrap()).listener(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                &SocketOptions {
                    reuse_address: false,
                    ..SocketOptions::default()
                },
            );
            match probe {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("port {port} not free yet: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("port {port} still taken after 5 s: {e}"),
            }
        }
    }

    /// Binds 127.0.0.1:`port` inside the sandbox (to take the port).
    fn occupy(&self, port: u16) -> TcpListener {
        let factory = NetnsSocketFactory::new(DefaultSocketFactory, self.netns(), Netns::own().unwrap());
        let opts = SocketOptions {
            reuse_address: false,
            ..SocketOptions::default()
        };
        factory
            .listener(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &opts)
            .unwrap()
            .into()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Binds the pod's listener on 127.0.0.1:`PORT` in its namespace; counts starts and stops.
#[derive(Default)]
struct Binder {
    started: Vec<String>,
    stopped: Vec<String>,
}

impl PodStarter for Binder {
    type Running = TcpListener;

    fn start(&mut self, uid: &str, _info: Option<&WorkloadInfo>, netns: &Netns) -> Result<TcpListener, String> {
        let factory = NetnsSocketFactory::new(DefaultSocketFactory, netns.clone(), Netns::own().unwrap());
        let opts = SocketOptions {
            reuse_address: false,
            ..SocketOptions::default()
        };
        let listener = factory
            .listener(SocketAddr::from((Ipv4Addr::LOCALHOST, PORT)), &opts)
            .map_err(|e| e.to_string())?;
        self.started.push(uid.to_owned());
        Ok(listener.into())
    }

    fn stop(&mut self, uid: &str, running: TcpListener) {
        drop(running);
        self.stopped.push(uid.to_owned());
    }
}

fn info(name: &str) -> Option<WorkloadInfo> {
    Some(WorkloadInfo {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        service_account: name.to_owned(),
    })
}

fn named(uids: &[&str]) -> BTreeSet<String> {
    uids.iter().map(|u| (*u).to_owned()).collect()
}

#[test]
fn a_snapshot_of_pods_is_served_and_makes_the_proxy_ready() {
    let _serial = serial();
    if !can_make_namespaces("a_snapshot_of_pods_is_served_and_makes_the_proxy_ready") {
        return;
    }
    let (a, b) = (Sandbox::new(), Sandbox::new());
    let now = Instant::now();
    let mut pods = Pods::new(Binder::default());
    pods.session_started();
    assert!(!pods.ready());
    assert!(pods.not_ready().unwrap().contains("snapshot"), "{:?}", pods.not_ready());

    pods.add("uid-a", info("a"), a.netns(), now).unwrap();
    pods.add("uid-b", info("b"), b.netns(), now).unwrap();
    assert!(!pods.ready(), "ready before the snapshot ended");
    assert_eq!(pods.snapshot_sent(&named(&["uid-a", "uid-b"])), 0);
    assert!(pods.ready());
    assert_eq!(pods.running(), 2);
    assert!(a.listening(PORT) && b.listening(PORT));
    let list = pods.list();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].uid, "uid-a");
    assert_eq!(list[0].info.as_ref().unwrap().name, "a");
    assert!(list.iter().all(|p| p.running && p.error.is_none()));

    // Keep: a pod served is fine; one this process does not know needs an Add.
    pods.keep("uid-a").unwrap();
    let err = pods.keep("uid-x").unwrap_err();
    assert!(err.contains("uid-x") && err.contains("AddWorkload"), "{err}");

    // Del closes that pod's listener at once; an unknown uid is no error.
    pods.del("uid-b");
    assert!(!b.listening(PORT));
    assert!(a.listening(PORT));
    pods.del("uid-b");
    assert_eq!(pods.starter().stopped, ["uid-b"]);

    // Shutdown drains every pod.
    pods.stop_all();
    assert!(!a.listening(PORT));
    assert_eq!(pods.running(), 0);
}

#[test]
fn a_pod_whose_port_is_taken_is_nacked_and_retried_until_it_starts() {
    let _serial = serial();
    if !can_make_namespaces("a_pod_whose_port_is_taken_is_nacked_and_retried_until_it_starts") {
        return;
    }
    let pod = Sandbox::new();
    let squatter = pod.occupy(PORT);
    let t0 = Instant::now();
    let mut pods = Pods::new(Binder::default());
    pods.session_started();

    let err = pods.add("uid-a", info("a"), pod.netns(), t0).unwrap_err();
    assert!(err.contains("in use") && err.contains(&PORT.to_string()), "{err}");
    pods.snapshot_sent(&named(&["uid-a"]));
    assert!(!pods.ready(), "ready with a pod pending");
    let why = pods.not_ready().unwrap();
    assert!(why.contains("uid-a") && why.contains("in use"), "{why}");
    assert_eq!(pods.pending(), 1);
    assert_eq!(pods.next_retry(), Some(t0 + RETRY_INTERVAL));
    let view = &pods.list()[0];
    assert!(!view.running);
    assert_eq!(view.failed_attempts, 1);

    // Not yet due: nothing is tried.
    assert!(pods.retry_due(t0 + RETRY_INTERVAL / 2).is_empty());
    // Due, the port still taken: fails again, scheduled once more.
    let t1 = t0 + RETRY_INTERVAL;
    let tried = pods.retry_due(t1);
    assert_eq!(tried.len(), 1);
    assert!(tried[0].1.is_err());
    assert_eq!(pods.list()[0].failed_attempts, 2);
    assert_eq!(pods.next_retry(), Some(t1 + RETRY_INTERVAL));
    // Keep of a pending pod is NACKed with the reason.
    assert!(pods.keep("uid-a").unwrap_err().contains("in use"));

    // The port is freed: the next retry starts it and the proxy becomes ready. (A process another
    // test forks at that moment holds a copy of the descriptor until it execs: wait until the port
    // can be bound.)
    drop(squatter);
    pod.wait_until_free(PORT);
    let tried = pods.retry_due(t1 + RETRY_INTERVAL);
    assert_eq!(tried, vec![("uid-a".to_owned(), Ok(()))]);
    assert!(pods.ready());
    assert!(pod.listening(PORT));
    assert_eq!(pods.next_retry(), None);
}

#[test]
fn a_new_sessions_snapshot_drains_the_pods_it_does_not_name() {
    let _serial = serial();
    if !can_make_namespaces("a_new_sessions_snapshot_drains_the_pods_it_does_not_name") {
        return;
    }
    let (a, b) = (Sandbox::new(), Sandbox::new());
    let now = Instant::now();
    let mut pods = Pods::new(Binder::default());
    pods.session_started();
    pods.add("uid-a", info("a"), a.netns(), now).unwrap();
    pods.add("uid-b", info("b"), b.netns(), now).unwrap();
    pods.snapshot_sent(&named(&["uid-a", "uid-b"]));

    // istio-cni reconnects: its snapshot names only a (b was deleted meanwhile).
    pods.session_started();
    assert!(!pods.ready(), "a new session waits for its snapshot");
    pods.add("uid-a", info("a"), a.netns(), now).unwrap();
    assert_eq!(pods.snapshot_sent(&named(&["uid-a"])), 1);
    assert!(pods.ready());
    assert!(a.listening(PORT));
    assert!(!b.listening(PORT));
    // a was not restarted by its second Add (same sandbox).
    assert_eq!(pods.starter().started, ["uid-a", "uid-b"]);
    assert_eq!(pods.starter().stopped, ["uid-b"]);
}

#[test]
fn a_pod_added_again_in_a_new_sandbox_moves_there() {
    let _serial = serial();
    if !can_make_namespaces("a_pod_added_again_in_a_new_sandbox_moves_there") {
        return;
    }
    let (old, new) = (Sandbox::new(), Sandbox::new());
    let now = Instant::now();
    let mut pods = Pods::new(Binder::default());
    pods.add("uid-a", info("a"), old.netns(), now).unwrap();
    assert!(old.listening(PORT));
    pods.add("uid-a", info("a"), new.netns(), now).unwrap();
    assert!(new.listening(PORT));
    assert!(!old.listening(PORT));
    assert_eq!(pods.starter().started, ["uid-a", "uid-a"]);
    assert_eq!(pods.starter().stopped, ["uid-a"]);
    assert_eq!(pods.running(), 1);

    assert!(pods.add("", None, new.netns(), now).unwrap_err().contains("no uid"));
}
