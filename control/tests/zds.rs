//! The ZDS client against a fake istio-cni, over real `SOCK_SEQPACKET` sockets with real
//! descriptors (the test's own network namespace, pipes, files). Reconnect timing is checked in
//! virtual time (a paused tokio clock); the other tests run in real time under a timeout.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshwire_control::proto::istio::workload::zds::{DelWorkload, WorkloadRequest, workload_request};
use meshwire_control::zds::{
    Backoff, DEFAULT_BACKOFF, MAX_FDS, PodEvent, PodHandler, WorkloadInfo, ZdsClient, ZdsState, ZdsStatus,
};
use meshwire_rt::TokioTimer;
use meshwire_testkit::cni::{CniConnection, FakeCni, add_request, netns, workload_info};
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, timeout};

const SEED: u64 = 0x2d5;

/// A small backoff for tests that reconnect after bad messages in real time.
const FAST: Backoff = Backoff {
    initial: Duration::from_millis(1),
    max: Duration::from_millis(10),
};

/// One event as the handler saw it (the namespace as its `/proc/self/fd` link).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Add {
        uid: String,
        info: Option<WorkloadInfo>,
        netns: String,
    },
    Keep(String),
    Del(String),
    Snapshot(BTreeSet<String>),
}

/// Records every event and session; NACKs the uids in `reject` with their reason.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    sessions: Arc<Mutex<Vec<u64>>>,
    reject: HashMap<String, String>,
}

impl Recorder {
    fn rejecting(rejections: &[(&str, &str)]) -> Self {
        Self {
            reject: rejections.iter().map(|(u, r)| (u.to_string(), r.to_string())).collect(),
            ..Default::default()
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn sessions(&self) -> Vec<u64> {
        self.sessions.lock().unwrap().clone()
    }
}

impl PodHandler for Recorder {
    fn session_started(&mut self, session: u64) {
        self.sessions.lock().unwrap().push(session);
    }

    fn handle(&mut self, event: PodEvent) -> impl Future<Output = Result<(), String>> {
        let (uid, seen) = match event {
            PodEvent::Add { uid, info, netns } => {
                let link = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&netns)))
                    .unwrap()
                    .display()
                    .to_string();
                let seen = Seen::Add {
                    uid: uid.clone(),
                    info,
                    netns: link,
                };
                (Some(uid), seen)
            }
            PodEvent::Keep { uid } => (Some(uid.clone()), Seen::Keep(uid)),
            PodEvent::Del { uid } => (Some(uid.clone()), Seen::Del(uid)),
            PodEvent::SnapshotSent { named } => (None, Seen::Snapshot(named)),
        };
        self.seen.lock().unwrap().push(seen);
        let answer = match uid.and_then(|u| self.reject.get(&u)) {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        };
        std::future::ready(answer)
    }
}

/// Runs a client of `path` with `handler` until the returned guard drops.
fn spawn_client(client: ZdsClient<TokioTimer>, handler: &Recorder) -> (ZdsStatus, AbortOnDrop) {
    let status = client.status();
    let mut handler = handler.clone();
    let mut client = client;
    let task = tokio::spawn(async move {
        client.run(&mut handler).await;
    });
    (status, AbortOnDrop(task))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `fut`, failing the test after 10 s (real time only).
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match timeout(Duration::from_secs(10), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.to_string(),
        namespace: "ns-a".to_string(),
        service_account: "sa-a".to_string(),
    }
}

fn is_netns(link: &str) -> bool {
    link.starts_with("net:[")
}

#[tokio::test]
async fn hello_snapshot_and_acks_in_order() {
    let mut cni = FakeCni::start();
    let handler = Recorder::rejecting(&[("uid-bad", "cannot start the listeners of uid-bad")]);
    let (status, _client) = spawn_client(ZdsClient::new(cni.path(), TokioTimer), &handler);
    let conn = within("the connection", cni.next_connection()).await;
    // The hello comes first: ZdsHello { version: V1 }.
    assert_eq!(conn.hello, [0x08, 0x01]);
    assert_eq!(conn.hello().unwrap().version, 1);

    // The snapshot, sent at once as istio-cni does; the answers come back one per message, in order.
    assert!(conn.add("uid-a", workload_info("pod-a", "ns-a", "sa-a")).await);
    assert!(conn.keep("uid-b").await);
    assert!(conn.add("uid-bad", workload_info("pod-bad", "ns-a", "sa-a")).await);
    assert!(conn.add("uid-c", workload_info("pod-c", "ns-a", "sa-a")).await);
    assert!(conn.del("uid-c").await);
    assert!(conn.snapshot_sent().await);
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(within("an Ack", conn.recv()).await.unwrap());
    }
    let ack = vec![0x0a, 0x00];
    // Ack { error } inside WorkloadResponse { ack }: the reason is 37 bytes.
    let nack = [&[0x0a, 39, 0x0a, 37][..], b"cannot start the listeners of uid-bad"].concat();
    assert_eq!(
        answers,
        [ack.clone(), ack.clone(), nack, ack.clone(), ack.clone(), ack.clone()]
    );

    let seen = handler.seen();
    assert_eq!(seen.len(), 6, "{seen:?}");
    let Seen::Add {
        uid,
        info: got_info,
        netns,
    } = &seen[0]
    else {
        panic!("{seen:?}")
    };
    assert_eq!((uid.as_str(), got_info.clone()), ("uid-a", Some(info("pod-a"))));
    assert!(is_netns(netns), "{netns}");
    assert_eq!(seen[1], Seen::Keep("uid-b".into()));
    assert_eq!(seen[4], Seen::Del("uid-c".into()));
    // Named in the snapshot: what was added or kept (the NACKed pod too: istio-cni retries it), less
    // what was deleted.
    let named: BTreeSet<String> = ["uid-a", "uid-b", "uid-bad"].iter().map(|s| s.to_string()).collect();
    assert_eq!(seen[5], Seen::Snapshot(named));
    assert_eq!(handler.sessions(), [1]);

    // After the snapshot, pods come and go.
    assert!(conn.add("uid-d", workload_info("pod-d", "ns-a", "sa-a")).await);
    assert_eq!(within("an Ack", conn.ack()).await, "");
    assert!(conn.del("uid-a").await);
    assert_eq!(within("an Ack", conn.ack()).await, "");
    assert_eq!(handler.seen()[7], Seen::Del("uid-a".into()));

    let state = status.state();
    assert!(
        state.connected && state.snapshot_received && state.synced(),
        "{state:?}"
    );
    assert_eq!((state.sessions, state.dials, state.snapshots), (1, 1, 1));
    assert_eq!((state.acks, state.nacks), (7, 1));
    assert_eq!(
        (state.consecutive_failures, state.last_error, state.backoff),
        (0, None, None)
    );
    assert_eq!(state.path, cni.path());
    assert_eq!(cni.connections(), 1);
}

#[tokio::test]
async fn a_handler_error_is_a_nack_and_the_session_continues() {
    let mut cni = FakeCni::start();
    let handler = Recorder::rejecting(&[("uid-x", "no certificate for sa-x"), ("uid-quiet", "")]);
    let (status, _client) = spawn_client(ZdsClient::new(cni.path(), TokioTimer), &handler);
    let conn = within("the connection", cni.next_connection()).await;
    assert!(conn.add("uid-x", workload_info("pod-x", "ns", "sa-x")).await);
    assert_eq!(within("a NACK", conn.ack()).await, "no certificate for sa-x");
    // An empty reason from the handler must not read as an ACK.
    assert!(conn.keep("uid-quiet").await);
    assert_eq!(
        within("a NACK", conn.ack()).await,
        "rejected by the proxy (no reason given)"
    );
    // istio-cni retries; the same connection serves the next messages.
    assert!(conn.add("uid-y", workload_info("pod-y", "ns", "sa-y")).await);
    assert_eq!(within("an ACK", conn.ack()).await, "");
    assert!(conn.snapshot_sent().await);
    assert_eq!(within("an ACK", conn.ack()).await, "");
    let state = status.state();
    assert_eq!((state.acks, state.nacks, state.sessions), (2, 2, 1), "{state:?}");
    assert!(state.connected && state.last_error.is_none(), "{state:?}");
    assert_eq!(cni.connections(), 1);
}

/// A pipe whose write end is sent to the proxy: the read end sees EOF once every copy of the write
/// end is closed, so `closed()` tells the proxy dropped the descriptors it received.
struct Tracer {
    reader: tokio::net::unix::pipe::Receiver,
    writer: Option<std::io::PipeWriter>,
}

impl Tracer {
    fn new() -> Self {
        let (reader, writer) = std::io::pipe().unwrap();
        Self {
            reader: tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).unwrap(),
            writer: Some(writer),
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.writer.as_ref().unwrap().as_fd()
    }

    /// Drops the test's own copy and waits for EOF: every copy the proxy received was closed.
    async fn closed(mut self) {
        self.writer = None;
        let mut buf = [0u8; 8];
        let n = within(
            "the descriptors sent to the proxy to be closed",
            self.reader.read(&mut buf),
        )
        .await
        .unwrap();
        assert_eq!(n, 0);
    }
}

/// Sends a bad message, then checks: the proxy NACKs it with an error containing `expected`,
/// closes the connection, records the error, tells the handler nothing, and dials again.
async fn refused(
    cni: &mut FakeCni,
    conn: CniConnection,
    status: &ZdsStatus,
    handler: &Recorder,
    expected: &str,
) -> CniConnection {
    let before = status.state();
    let error = within("the NACK of a bad message", conn.ack()).await;
    assert!(error.contains(expected), "{error:?} does not name {expected:?}");
    assert_eq!(within("the proxy to close", conn.recv()).await, None);
    let next = within("a new connection", cni.next_connection()).await;
    assert_eq!(next.hello, [0x08, 0x01]);
    let state: ZdsState = status.state();
    assert_eq!(state.last_error.as_deref(), Some(error.as_str()));
    assert_eq!(state.nacks, before.nacks + 1);
    assert!(state.sessions > before.sessions, "{state:?}");
    assert!(handler.seen().is_empty(), "{:?}", handler.seen());
    next
}

#[tokio::test]
async fn bad_messages_are_refused_by_name_and_their_descriptors_closed() {
    let mut cni = FakeCni::start();
    let handler = Recorder::default();
    let client = ZdsClient::new(cni.path(), TokioTimer).with_backoff(FAST);
    let (status, _client) = spawn_client(client, &handler);
    let mut conn = within("the connection", cni.next_connection()).await;

    // Over 1024 bytes (a well-formed AddWorkload otherwise), with a descriptor.
    let long = add_request(&"u".repeat(1990), None);
    let size = prost::Message::encoded_len(&long);
    let tracer = Tracer::new();
    assert!(conn.send(&long, &[tracer.fd()]).await);
    let expected = format!("the message of {size} bytes is over the limit of 1024 bytes (truncated, MSG_TRUNC)");
    conn = refused(&mut cni, conn, &status, &handler, &expected).await;
    tracer.closed().await;

    // Far more descriptors than the receive buffer holds: truncated by the kernel (MSG_CTRUNC).
    let tracer = Tracer::new();
    let del = WorkloadRequest {
        payload: Some(workload_request::Payload::Del(DelWorkload { uid: "uid-d".into() })),
    };
    let many = vec![tracer.fd(); 4 * MAX_FDS];
    assert!(conn.send(&del, &many).await);
    conn = refused(&mut cni, conn, &status, &handler, "truncated (MSG_CTRUNC)").await;
    tracer.closed().await;

    // An AddWorkload without its namespace.
    assert!(conn.send(&add_request("uid-a", None), &[]).await);
    conn = refused(
        &mut cni,
        conn,
        &status,
        &handler,
        "AddWorkload uid-a carries 0 file descriptors, expected 1",
    )
    .await;

    // An AddWorkload with two.
    let tracer = Tracer::new();
    let ns = netns();
    assert!(conn.send(&add_request("uid-a", None), &[ns.as_fd(), tracer.fd()]).await);
    conn = refused(
        &mut cni,
        conn,
        &status,
        &handler,
        "AddWorkload uid-a carries 2 file descriptors, expected 1",
    )
    .await;
    tracer.closed().await;

    // A DelWorkload with one.
    let tracer = Tracer::new();
    assert!(conn.send(&del, &[tracer.fd()]).await);
    conn = refused(
        &mut cni,
        conn,
        &status,
        &handler,
        "DelWorkload uid-d carries 1 file descriptors, expected none",
    )
    .await;
    tracer.closed().await;

    // Descriptors that are not network namespaces: another namespace, a file, a pipe.
    let uts = std::fs::File::open("/proc/self/ns/uts").unwrap();
    assert!(conn.send(&add_request("uid-u", None), &[uts.as_fd()]).await);
    conn = refused(
        &mut cni,
        conn,
        &status,
        &handler,
        "AddWorkload uid-u: the file descriptor is not a network namespace: it is uts:[",
    )
    .await;
    let file = tempfile::NamedTempFile::new().unwrap();
    assert!(conn.send(&add_request("uid-f", None), &[file.as_file().as_fd()]).await);
    let path = file.path().display().to_string();
    conn = refused(
        &mut cni,
        conn,
        &status,
        &handler,
        &format!("not a network namespace: it is {path}"),
    )
    .await;
    let tracer = Tracer::new();
    assert!(conn.send(&add_request("uid-p", None), &[tracer.fd()]).await);
    conn = refused(
        &mut cni,
        conn,
        &status,
        &handler,
        "not a network namespace: it is pipe:[",
    )
    .await;
    tracer.closed().await;

    // Not a WorkloadRequest at all, and one with nothing in it that this version knows.
    assert!(conn.send_raw(&[0x0a, 0x05, 0x0a], &[]).await);
    conn = refused(
        &mut cni,
        conn,
        &status,
        &handler,
        "the message is not a WorkloadRequest",
    )
    .await;
    assert!(conn.send_raw(&[0x20, 0x01], &[]).await);
    conn = refused(&mut cni, conn, &status, &handler, "the WorkloadRequest has no payload").await;

    // The session after all that works.
    assert!(conn.add("uid-ok", workload_info("pod-ok", "ns", "sa")).await);
    assert_eq!(within("an ACK", conn.ack()).await, "");
    assert_eq!(cni.connections(), 11);
    let state = status.state();
    assert_eq!((state.sessions, state.acks, state.nacks), (11, 1, 10), "{state:?}");
    assert!(state.consecutive_failures >= 1, "{state:?}");
}

#[tokio::test(start_paused = true)]
async fn reconnects_at_once_after_the_server_drops_the_connection() {
    let mut cni = FakeCni::start();
    let handler = Recorder::default();
    let (status, _client) = spawn_client(ZdsClient::new(cni.path(), TokioTimer), &handler);
    let conn = cni.next_connection().await;
    assert!(conn.add("uid-a", workload_info("pod-a", "ns", "sa")).await);
    assert!(conn.add("uid-b", workload_info("pod-b", "ns", "sa")).await);
    assert!(conn.snapshot_sent().await);
    for _ in 0..3 {
        assert_eq!(conn.ack().await, "");
    }
    assert!(status.state().snapshot_received);

    // istio-cni restarts: the proxy dials again at once (no backoff: the clock did not move) and
    // says hello again; the new session starts without a snapshot.
    let dropped_at = Instant::now();
    drop(conn);
    let conn = cni.next_connection().await;
    assert_eq!(conn.hello, [0x08, 0x01]);
    assert_eq!(cni.connection_times()[1], dropped_at);
    let state = status.state();
    assert!(state.connected && !state.snapshot_received, "{state:?}");
    assert_eq!(
        (state.sessions, state.consecutive_failures, state.last_error),
        (2, 0, None)
    );
    assert_eq!(handler.sessions(), [1, 2]);

    // The new snapshot names only what this session named.
    assert!(conn.keep("uid-a").await);
    assert!(conn.add("uid-c", workload_info("pod-c", "ns", "sa")).await);
    assert!(conn.snapshot_sent().await);
    for _ in 0..3 {
        assert_eq!(conn.ack().await, "");
    }
    let named: BTreeSet<String> = ["uid-a", "uid-c"].iter().map(|s| s.to_string()).collect();
    assert_eq!(handler.seen().last(), Some(&Seen::Snapshot(named)));
    let state = status.state();
    assert!(state.snapshot_received, "{state:?}");
    assert_eq!(state.snapshots, 2);
}

#[tokio::test(start_paused = true)]
async fn failed_dials_back_off_with_jitter_until_the_socket_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let handler = Recorder::default();
    let client = ZdsClient::new(&path, TokioTimer).with_rng(fastrand::Rng::with_seed(SEED));
    let start = Instant::now();
    let (status, _client) = spawn_client(client, &handler);

    // The delays the client draws: the same seed, the n-th failure's ceiling.
    let mut rng = fastrand::Rng::with_seed(SEED);
    let delays: Vec<Duration> = (1..=7).map(|n| DEFAULT_BACKOFF.delay(n, &mut rng)).collect();
    for (n, d) in delays.iter().enumerate() {
        assert!(*d <= DEFAULT_BACKOFF.ceiling(n as u32 + 1));
    }
    assert!(delays.windows(2).any(|w| w[0] != w[1]), "jittered: {delays:?}");
    // The seed gives a sixth delay long enough for the test to bring istio-cni up within it.
    assert!(delays[5] > Duration::from_millis(20), "{delays:?}");
    // Jitter: not every delay sits at its ceiling.
    assert!(
        (0..6).any(|n| delays[n] < DEFAULT_BACKOFF.ceiling(n as u32 + 1)),
        "{delays:?}"
    );

    // Six failed dials, sampled every millisecond of virtual time (tokio's timers tick in
    // milliseconds: a dial is seen within 1 ms after it happened, its deadline rounded up to 1 ms).
    let mut dial_times = Vec::new();
    let mut backoffs = Vec::new();
    let mut seen_dials = 0;
    while dial_times.len() < 6 {
        let state = status.state();
        if state.dials > seen_dials {
            assert_eq!(state.dials, seen_dials + 1, "one dial per sample");
            seen_dials = state.dials;
            dial_times.push(Instant::now() - start);
            backoffs.push(state.backoff.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(backoffs, delays[..6], "the delays drawn, in order");
    assert!(
        dial_times[0] <= Duration::from_millis(1),
        "the first dial is at once: {dial_times:?}"
    );
    let ms = Duration::from_millis(1);
    for (i, gap) in dial_times.windows(2).map(|w| w[1] - w[0]).enumerate() {
        let want = delays[i];
        assert!(
            gap + ms >= want && gap <= want + 2 * ms,
            "dial {} came {gap:?} after the previous one, want {want:?}",
            i + 2
        );
    }
    let state = status.state();
    assert!(!state.connected, "{state:?}");
    assert_eq!((state.sessions, state.consecutive_failures), (0, 6));
    assert_eq!(state.backoff, Some(delays[5]));
    let error = state.last_error.unwrap();
    assert!(
        error.starts_with(&format!("connecting to {}: ", path.display())),
        "{error}"
    );

    // istio-cni comes up: the next dial (after the sixth delay) connects.
    let last_dial = start + dial_times[5];
    let mut cni = FakeCni::start_at(&path);
    let conn = cni.next_connection().await;
    assert_eq!(conn.hello, [0x08, 0x01]);
    let times = cni.connection_times();
    assert_eq!(times.len(), 1);
    let after = times[0] - last_dial;
    assert!(
        after + ms >= delays[5] && after <= delays[5] + 2 * ms,
        "connected {after:?} after the sixth dial, want {:?}",
        delays[5]
    );
    let state = status.state();
    assert!(state.connected, "{state:?}");
    assert_eq!((state.sessions, state.dials, state.backoff), (1, 7, None));
    // The failures count until a session ends cleanly.
    assert_eq!(state.consecutive_failures, 6);
    drop(conn);
    let _conn = cni.next_connection().await;
    assert_eq!(status.state().consecutive_failures, 0);
}

/// Writes the seed corpus of the `zds_message` fuzz target (`fuzz/corpus/zds_message/`): byte 0 the
/// descriptor count, byte 1 the flags (bit 0 MSG_TRUNC, bit 1 MSG_CTRUNC, bit 2 not a network
/// namespace), then the datagram. Run with `--ignored write_fuzz_seeds`; the output is committed.
#[test]
#[ignore = "writes the fuzz seeds"]
fn write_fuzz_seeds() {
    use meshwire_control::proto::istio::workload::zds::{KeepWorkload, SnapshotSent};
    use prost::Message;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/zds_message");
    std::fs::create_dir_all(&dir).unwrap();
    let info = workload_info("productpage-v1-6b746f74dc-9stvq", "bookinfo", "bookinfo-productpage");
    let uid = "0ae5c03d-5fb3-4eb9-9de8-2bd4b51606ba";
    let add = add_request(uid, Some(info.clone())).encode_to_vec();
    let keep = WorkloadRequest {
        payload: Some(workload_request::Payload::Keep(KeepWorkload { uid: uid.into() })),
    }
    .encode_to_vec();
    let del = WorkloadRequest {
        payload: Some(workload_request::Payload::Del(DelWorkload { uid: uid.into() })),
    }
    .encode_to_vec();
    let snapshot = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    }
    .encode_to_vec();
    // An AddWorkload of exactly `size` bytes (a uid of the length that makes it so).
    let add_of = |size: usize| {
        let bytes = (1..size)
            .map(|n| add_request(&"u".repeat(n), Some(info.clone())).encode_to_vec())
            .find(|b| b.len() == size)
            .unwrap();
        assert_eq!(bytes.len(), size);
        bytes
    };
    let seeds: Vec<(&str, u8, u8, Vec<u8>)> = vec![
        ("add", 1, 0, add.clone()),
        ("add-without-info", 1, 0, add_request(uid, None).encode_to_vec()),
        (
            "add-empty-info",
            1,
            0,
            add_request(uid, Some(Default::default())).encode_to_vec(),
        ),
        (
            "add-empty-uid",
            1,
            0,
            add_request("", Some(info.clone())).encode_to_vec(),
        ),
        ("add-no-fd", 0, 0, add.clone()),
        ("add-two-fds", 2, 0, add.clone()),
        ("add-not-netns", 1, 4, add.clone()),
        ("add-1024-bytes", 1, 0, add_of(1024)),
        ("add-1025-bytes", 1, 0, add_of(1025)),
        ("add-msg-trunc", 1, 1, add.clone()),
        ("add-msg-ctrunc", 1, 2, add.clone()),
        ("keep", 0, 0, keep.clone()),
        ("keep-with-fd", 1, 0, keep),
        ("del", 0, 0, del.clone()),
        ("del-with-fd", 1, 0, del),
        ("snapshot-sent", 0, 0, snapshot.clone()),
        ("snapshot-sent-with-fds", 3, 0, snapshot),
        ("unknown-field", 0, 0, vec![0x20, 0x01]),
        ("empty", 0, 0, Vec::new()),
        (
            "add-then-keep",
            1,
            0,
            [
                add_request(uid, None).encode_to_vec(),
                vec![0x2a, 0x03, 0x0a, 0x01, b'k'],
            ]
            .concat(),
        ),
    ];
    for (name, fds, flags, bytes) in seeds {
        std::fs::write(dir.join(name), [&[fds, flags][..], &bytes].concat()).unwrap();
    }
}
