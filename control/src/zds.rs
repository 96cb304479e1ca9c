//! The in-pod protocol (ZDS) client: the node proxy's side of istio-cni's Unix socket.
//!
//! istio-cni listens on a Unix `SOCK_SEQPACKET` socket ([`DEFAULT_SOCKET_PATH`], set by
//! `INPOD_UDS`; the path is a parameter here, the crate never reads the environment). The proxy
//! connects, sends `ZdsHello { version: V1 }`, then receives one `WorkloadRequest` per datagram (at
//! most [`MAX_MESSAGE_SIZE`] bytes, no length prefix) and answers each with one `WorkloadResponse`
//! `Ack`, in order: an empty error is an ACK (on the wire `0a 00`), anything else a NACK.
//!
//! - [`parse_request`] is the pure core: the bytes of one datagram, the file descriptors that came
//!   with it (`SCM_RIGHTS`) and whether the kernel truncated it, to a [`PodMessage`] or a
//!   [`ZdsError`] naming what was wrong. An `AddWorkload` carries exactly one descriptor, the pod's
//!   network namespace (checked by a function the caller passes: [`check_netns`] for real
//!   descriptors); any other message carries none. Descriptors of a rejected message are dropped,
//!   which closes them.
//! - [`ZdsClient::run`] drives the socket on the caller's tokio runtime (it never spawns): dial,
//!   hello, then per datagram: parse, hand the [`PodEvent`] to the caller's [`PodHandler`], send
//!   its answer as the Ack. A handler's `Err(reason)` is a NACK and the session continues (istio-cni
//!   retries that pod). A message that does not parse is NACKed with the error, and then the session
//!   ends: the client re-dials.
//! - The snapshot: after the hello istio-cni names every pod it knows (`AddWorkload` or
//!   `KeepWorkload`), then sends `SnapshotSent`. The client keeps the set of uids named in the
//!   current session (a `DelWorkload` takes its uid out) and hands it over with
//!   [`PodEvent::SnapshotSent`]: the proxy drains every pod it serves that is not in it.
//!   [`PodHandler::session_started`] marks the start of each session.
//! - Reconnects: a session the peer closed re-dials at once (istio-cni fails new pods while no
//!   proxy is connected); a dial that fails, and a session that ended on an error (a bad message,
//!   a socket error), back off with full jitter ([`Backoff`], [`DEFAULT_BACKOFF`]: 100 ms doubling
//!   up to 2 s). Time comes from a [`Timer`], so tests run it on a paused tokio clock.
//! - [`ZdsStatus`]: connected, sessions, snapshot received, counters and the last error, for
//!   readiness and config dumps (a small mutex, touched once per message, never by a data path).
//!
//! ```
//! use meshwire_control::zds::{PodMessage, Truncation, WorkloadInfo, parse_request};
//! use meshwire_control::proto::istio::workload::zds::{AddWorkload, WorkloadRequest, workload_request::Payload};
//! use prost::Message;
//!
//! let add = WorkloadRequest {
//!     payload: Some(Payload::Add(AddWorkload {
//!         uid: "0ae5c03d".into(),
//!         workload_info: Some(Default::default()),
//!     })),
//! };
//! // One descriptor came with it; here a stand-in, checked by a stand-in netns check.
//! let parsed = parse_request(&add.encode_to_vec(), vec![7u32], Truncation::None, |_| Ok(()));
//! assert_eq!(
//!     parsed,
//!     Ok(PodMessage::Add { uid: "0ae5c03d".into(), info: Some(WorkloadInfo::default()), netns: 7 })
//! );
//! // Without it, the error says so.
//! let err = parse_request::<u32>(&add.encode_to_vec(), vec![], Truncation::None, |_| Ok(())).unwrap_err();
//! assert_eq!(err.to_string(), "AddWorkload 0ae5c03d carries 0 file descriptors, expected 1 (its network namespace)");
//! ```

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meshwire_rt::Timer;
use prost::Message;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendFlags,
    SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use crate::ads::Backoff;
use crate::proto::istio::workload::zds::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadRequest, WorkloadResponse, ZdsHello,
    workload_request, workload_response,
};

/// istio-cni's socket when `INPOD_UDS` is not set.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

/// The largest message accepted, bytes (the receive buffer's size).
pub const MAX_MESSAGE_SIZE: usize = 1024;

/// The descriptors the receive buffer is sized for: a datagram with more may be truncated by the
/// kernel (`MSG_CTRUNC`, [`ZdsError::FdsTruncated`]; the buffer's alignment slack may fit one or two
/// more, which are then refused by count). Every message but `AddWorkload` carries none, that one
/// carries one.
pub const MAX_FDS: usize = 8;

/// The reconnect backoff by default: 100 ms doubling up to 2 s, full jitter. istio-cni fails new
/// pods while no proxy is connected, so the ceiling stays low.
pub const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(2),
};

/// Why a message, a dial or a session failed. The message names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ZdsError {
    /// The datagram was longer than [`MAX_MESSAGE_SIZE`] (`MSG_TRUNC`, or more bytes than that).
    #[error("the message of {size} bytes is over the limit of {MAX_MESSAGE_SIZE} bytes (truncated, MSG_TRUNC)")]
    TooLong {
        /// The datagram's length.
        size: usize,
    },
    /// The datagram's file descriptors did not fit (`MSG_CTRUNC`): more than [`MAX_FDS`] were sent.
    #[error(
        "the message's file descriptors were truncated (MSG_CTRUNC): more than the {MAX_FDS} the receive buffer holds were sent"
    )]
    FdsTruncated,
    /// The bytes are not a `WorkloadRequest`.
    #[error("the message is not a WorkloadRequest: {0}")]
    Decode(String),
    /// A `WorkloadRequest` without a payload (empty, or only fields this version does not know).
    #[error("the WorkloadRequest has no payload (add, del, snapshot_sent or keep)")]
    NoPayload,
    /// An `AddWorkload`, `KeepWorkload` or `DelWorkload` with an empty uid.
    #[error("{kind} has an empty uid")]
    EmptyUid {
        /// `AddWorkload`, `KeepWorkload` or `DelWorkload`.
        kind: &'static str,
    },
    /// A message with the wrong number of file descriptors (all of them were closed).
    #[error("{kind}{} carries {got} file descriptors, expected {}", uid_suffix(uid), expected_fds(*expected))]
    WrongFdCount {
        /// The message type (`AddWorkload`, `DelWorkload`, ...).
        kind: &'static str,
        /// Its uid (empty for `SnapshotSent`).
        uid: String,
        /// How many it must carry (1 for `AddWorkload`, 0 otherwise).
        expected: usize,
        /// How many came.
        got: usize,
    },
    /// The descriptor of an `AddWorkload` is not a network namespace (it was closed).
    #[error("AddWorkload {uid}: the file descriptor is not a network namespace: {reason}")]
    NotNetns {
        /// The pod's uid.
        uid: String,
        /// What it is instead, or why that could not be told.
        reason: String,
    },
    /// The socket could not be dialled, or the hello could not be sent.
    #[error("connecting to {path}: {reason}")]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        reason: String,
    },
    /// The socket failed during a session (receive or send).
    #[error("{op} on {path}: {reason}")]
    Io {
        /// `receiving` or `sending the Ack`.
        op: &'static str,
        /// The socket path.
        path: String,
        /// The error.
        reason: String,
    },
}

fn uid_suffix(uid: &str) -> String {
    if uid.is_empty() {
        String::new()
    } else {
        format!(" {uid}")
    }
}

fn expected_fds(expected: usize) -> &'static str {
    if expected == 1 {
        "1 (its network namespace)"
    } else {
        "none"
    }
}

/// A pod's identity, as istio-cni sends it in `AddWorkload`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    /// The pod name.
    pub name: String,
    /// The pod namespace.
    pub namespace: String,
    /// The pod's service account.
    pub service_account: String,
}

/// Whether (and how) the kernel truncated a received datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Truncation {
    /// Not truncated.
    #[default]
    None,
    /// The bytes were truncated (`MSG_TRUNC`); `size` is the datagram's real length.
    Data {
        /// The datagram's length.
        size: usize,
    },
    /// The file descriptors were truncated (`MSG_CTRUNC`).
    Control,
}

/// One request of istio-cni, checked. `F` is the descriptor type: [`OwnedFd`] from the socket, any
/// stand-in in tests and fuzzing.
#[derive(Debug, PartialEq, Eq)]
pub enum PodMessage<F = OwnedFd> {
    /// Serve a pod: its network namespace came with the message.
    Add {
        /// The Kubernetes pod UID (never empty).
        uid: String,
        /// The pod's identity; `None` when istio-cni sent none (older versions).
        info: Option<WorkloadInfo>,
        /// The pod's network namespace.
        netns: F,
    },
    /// Keep serving a pod (snapshot only: istio-cni no longer holds its namespace).
    Keep {
        /// The Kubernetes pod UID (never empty).
        uid: String,
    },
    /// Stop serving a pod.
    Del {
        /// The Kubernetes pod UID (never empty).
        uid: String,
    },
    /// The snapshot is complete.
    SnapshotSent,
}

impl<F> PodMessage<F> {
    /// The protobuf message type: `AddWorkload`, `KeepWorkload`, `DelWorkload` or `SnapshotSent`.
    pub fn kind(&self) -> &'static str {
        match self {
            PodMessage::Add { .. } => "AddWorkload",
            PodMessage::Keep { .. } => "KeepWorkload",
            PodMessage::Del { .. } => "DelWorkload",
            PodMessage::SnapshotSent => "SnapshotSent",
        }
    }

    /// The pod's uid (`None` for `SnapshotSent`).
    pub fn uid(&self) -> Option<&str> {
        match self {
            PodMessage::Add { uid, .. } | PodMessage::Keep { uid } | PodMessage::Del { uid } => Some(uid),
            PodMessage::SnapshotSent => None,
        }
    }

    /// The `WorkloadRequest` this message was read from (without its descriptor).
    pub fn to_request(&self) -> WorkloadRequest {
        use workload_request::Payload;
        let payload = match self {
            PodMessage::Add { uid, info, .. } => Payload::Add(AddWorkload {
                uid: uid.clone(),
                workload_info: info.as_ref().map(|i| crate::proto::istio::workload::zds::WorkloadInfo {
                    name: i.name.clone(),
                    namespace: i.namespace.clone(),
                    service_account: i.service_account.clone(),
                }),
            }),
            PodMessage::Keep { uid } => Payload::Keep(KeepWorkload { uid: uid.clone() }),
            PodMessage::Del { uid } => Payload::Del(DelWorkload { uid: uid.clone() }),
            PodMessage::SnapshotSent => Payload::SnapshotSent(SnapshotSent {}),
        };
        WorkloadRequest { payload: Some(payload) }
    }
}

/// Reads one datagram of istio-cni: its `bytes`, the descriptors `fds` that came with it, how the
/// kernel truncated it, and `check_netns` to tell whether the descriptor of an `AddWorkload` is a
/// network namespace ([`check_netns`] for real descriptors; `Err` says what it is instead).
///
/// Checks, in order: truncation, size ([`MAX_MESSAGE_SIZE`]), protobuf decoding, a payload, a
/// non-empty uid, the descriptor count (one for `AddWorkload`, none otherwise), the namespace. On
/// any error every descriptor is dropped (closed).
pub fn parse_request<F>(
    bytes: &[u8],
    fds: Vec<F>,
    truncation: Truncation,
    check_netns: impl FnOnce(&F) -> Result<(), String>,
) -> Result<PodMessage<F>, ZdsError> {
    use workload_request::Payload;
    match truncation {
        Truncation::Data { size } => return Err(ZdsError::TooLong { size }),
        Truncation::Control => return Err(ZdsError::FdsTruncated),
        Truncation::None => {}
    }
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(ZdsError::TooLong { size: bytes.len() });
    }
    let request = WorkloadRequest::decode(bytes).map_err(|e| ZdsError::Decode(e.to_string()))?;
    let (kind, uid) = match request.payload.ok_or(ZdsError::NoPayload)? {
        Payload::Add(AddWorkload { uid, workload_info }) => {
            let info = workload_info.map(|i| WorkloadInfo {
                name: i.name,
                namespace: i.namespace,
                service_account: i.service_account,
            });
            return parse_add(uid, info, fds, check_netns);
        }
        Payload::Keep(KeepWorkload { uid }) => (Kind::Keep, uid),
        Payload::Del(DelWorkload { uid }) => (Kind::Del, uid),
        Payload::SnapshotSent(SnapshotSent {}) => (Kind::SnapshotSent, String::new()),
    };
    let name = kind.name();
    if kind != Kind::SnapshotSent && uid.is_empty() {
        return Err(ZdsError::EmptyUid { kind: name });
    }
    if !fds.is_empty() {
        return Err(ZdsError::WrongFdCount {
            kind: name,
            uid,
            expected: 0,
            got: fds.len(),
        });
    }
    Ok(match kind {
        Kind::Keep => PodMessage::Keep { uid },
        Kind::Del => PodMessage::Del { uid },
        Kind::SnapshotSent => PodMessage::SnapshotSent,
    })
}

/// The messages that carry no descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Keep,
    Del,
    SnapshotSent,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Keep => "KeepWorkload",
            Kind::Del => "DelWorkload",
            Kind::SnapshotSent => "SnapshotSent",
        }
    }
}

/// The checks of an `AddWorkload`: a uid, exactly one descriptor, a network namespace.
fn parse_add<F>(
    uid: String,
    info: Option<WorkloadInfo>,
    mut fds: Vec<F>,
    check_netns: impl FnOnce(&F) -> Result<(), String>,
) -> Result<PodMessage<F>, ZdsError> {
    if uid.is_empty() {
        return Err(ZdsError::EmptyUid { kind: "AddWorkload" });
    }
    let netns = match (fds.pop(), fds.is_empty()) {
        (Some(netns), true) => netns,
        (first, _) => {
            let got = fds.len() + usize::from(first.is_some());
            return Err(ZdsError::WrongFdCount {
                kind: "AddWorkload",
                uid,
                expected: 1,
                got,
            });
        }
    };
    if let Err(reason) = check_netns(&netns) {
        return Err(ZdsError::NotNetns { uid, reason });
    }
    Ok(PodMessage::Add { uid, info, netns })
}

/// `NSFS_MAGIC`: the file system of namespace descriptors (`/proc/<pid>/ns/*` and their bind
/// mounts, such as `/var/run/netns/cni-<id>`, the path a CNI plugin is given for a pod).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Tells whether `fd` is a network namespace. A descriptor on the namespace file system is one when
/// `/proc/self/fd/<n>` links to `net:[<inode>]`; a bind-mounted namespace (what a CNI plugin opens)
/// links to its path instead, and is checked by entering it with `setns(fd, CLONE_NEWNET)` on a
/// short-lived thread of its own (the kernel refuses another kind of namespace; this needs
/// `CAP_SYS_ADMIN`, as serving the pod does). `Err` says what it is instead (`uts:[..]`, a file
/// path, `pipe:[..]`) or why that could not be told.
pub fn check_netns(fd: BorrowedFd<'_>) -> Result<(), String> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let target = match std::fs::read_link(&link) {
        Ok(target) => target.to_string_lossy().into_owned(),
        Err(e) => return Err(format!("cannot tell its type: readlink {link}: {e}")),
    };
    let on_nsfs = rustix::fs::fstatfs(fd)
        .map_err(|e| format!("cannot tell its type: fstatfs: {e}"))?
        .f_type;
    #[allow(clippy::unnecessary_cast)]
    if on_nsfs as i64 != NSFS_MAGIC {
        return Err(format!("it is {target}"));
    }
    if target.starts_with("net:[") {
        return Ok(());
    }
    if target.ends_with(']') && target.contains(":[") {
        return Err(format!("it is {target}"));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                match rustix::thread::move_into_link_name_space(fd, Some(rustix::thread::LinkNameSpaceType::Network)) {
                    Ok(()) => Ok(()),
                    Err(rustix::io::Errno::INVAL) => Err(format!("it is a namespace of another kind ({target})")),
                    Err(e) => Err(format!("cannot tell the type of namespace {target}: entering it: {e}")),
                }
            })
            .join()
            .unwrap_or_else(|_| Err("cannot tell its type: the checking thread failed".to_owned()))
    })
}

/// What the proxy is told, one event per message of istio-cni.
#[derive(Debug)]
pub enum PodEvent {
    /// Serve a pod (start its listeners inside `netns`).
    Add {
        /// The Kubernetes pod UID.
        uid: String,
        /// The pod's identity; `None` when istio-cni sent none (older versions).
        info: Option<WorkloadInfo>,
        /// The pod's network namespace.
        netns: OwnedFd,
    },
    /// Keep serving a pod (named in the snapshot without its namespace).
    Keep {
        /// The Kubernetes pod UID.
        uid: String,
    },
    /// Stop serving a pod: drain its listeners.
    Del {
        /// The Kubernetes pod UID.
        uid: String,
    },
    /// The snapshot is complete: drain every pod served that is not in `named`.
    SnapshotSent {
        /// The uids named by `AddWorkload` or `KeepWorkload` in this session before this message
        /// (NACKed ones included: istio-cni retries them), less those deleted since.
        named: BTreeSet<String>,
    },
}

/// What the proxy does with istio-cni's requests.
pub trait PodHandler {
    /// A new session began (the hello was sent); `session` counts from 1. A snapshot follows.
    fn session_started(&mut self, session: u64) {
        let _ = session;
    }

    /// Acts on one request. `Ok` is ACKed; `Err(reason)` is NACKed with `reason` (istio-cni
    /// retries that pod) and the session continues. The next message is read once this completes.
    fn handle(&mut self, event: PodEvent) -> impl Future<Output = Result<(), String>>;
}

/// A copy of the client's status at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZdsState {
    /// istio-cni's socket path.
    pub path: PathBuf,
    /// A session is open (connected, hello sent).
    pub connected: bool,
    /// How many sessions began.
    pub sessions: u64,
    /// How many dials were attempted (failed ones included).
    pub dials: u64,
    /// The current session received `SnapshotSent`.
    pub snapshot_received: bool,
    /// How many `SnapshotSent` were received, over all sessions.
    pub snapshots: u64,
    /// How many messages were ACKed, over all sessions.
    pub acks: u64,
    /// How many messages were NACKed (handler errors and bad messages), over all sessions.
    pub nacks: u64,
    /// Consecutive failures (failed dials, sessions ended on an error) since a session ended cleanly.
    pub consecutive_failures: u32,
    /// The last error: a failed dial, a bad message or a socket error.
    pub last_error: Option<String>,
    /// The delay chosen before the current reconnect attempt, while backing off.
    pub backoff: Option<Duration>,
}

impl ZdsState {
    /// At least one snapshot was received (the pods istio-cni knows are being served).
    pub fn synced(&self) -> bool {
        self.snapshots > 0
    }
}

/// The client's status, shared (clone it freely; [`ZdsStatus::state`] copies it out).
#[derive(Debug, Clone)]
pub struct ZdsStatus {
    inner: Arc<Mutex<ZdsState>>,
}

impl ZdsStatus {
    fn new(path: PathBuf) -> Self {
        Self {
            inner: Arc::new(Mutex::new(ZdsState {
                path,
                connected: false,
                sessions: 0,
                dials: 0,
                snapshot_received: false,
                snapshots: 0,
                acks: 0,
                nacks: 0,
                consecutive_failures: 0,
                last_error: None,
                backoff: None,
            })),
        }
    }

    /// A copy of the current status.
    pub fn state(&self) -> ZdsState {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn update<R>(&self, f: impl FnOnce(&mut ZdsState) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// How a session (or the attempt at one) ended.
enum End {
    /// The dial or the hello failed.
    Dial(ZdsError),
    /// The peer closed the socket.
    Closed,
    /// A bad message or a socket error.
    Failed(ZdsError),
}

/// One datagram as received.
struct Datagram {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    truncation: Truncation,
}

/// The ZDS client. Build it with [`ZdsClient::new`], keep [`ZdsClient::status`], drive
/// [`ZdsClient::run`].
pub struct ZdsClient<T> {
    path: PathBuf,
    timer: T,
    rng: fastrand::Rng,
    backoff: Backoff,
    status: ZdsStatus,
}

impl<T: Timer> ZdsClient<T> {
    /// A client of istio-cni's socket at `path` ([`DEFAULT_SOCKET_PATH`] unless `INPOD_UDS` says
    /// otherwise), with [`DEFAULT_BACKOFF`] and a random seed.
    pub fn new(path: impl Into<PathBuf>, timer: T) -> Self {
        let path = path.into();
        Self {
            status: ZdsStatus::new(path.clone()),
            path,
            timer,
            rng: fastrand::Rng::new(),
            backoff: DEFAULT_BACKOFF,
        }
    }

    /// Sets the backoff.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the jitter's random generator (a seeded one makes the delays deterministic).
    pub fn with_rng(mut self, rng: fastrand::Rng) -> Self {
        self.rng = rng;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared status.
    pub fn status(&self) -> ZdsStatus {
        self.status.clone()
    }

    /// Runs the client forever: dial, hello, serve the session, reconnect. Drop the future to stop
    /// it (that closes the socket). Needs a tokio runtime with IO enabled.
    pub async fn run<H: PodHandler>(&mut self, handler: &mut H) -> Infallible {
        let path = self.path.display().to_string();
        loop {
            let end = self.session(handler).await;
            let error = match end {
                End::Closed => {
                    tracing::info!(socket = %path, "ZDS: istio-cni closed the connection; reconnecting");
                    None
                }
                End::Dial(e) => {
                    tracing::warn!(socket = %path, error = %e, "ZDS: connecting to istio-cni failed");
                    Some(e)
                }
                End::Failed(e) => {
                    tracing::warn!(socket = %path, error = %e, "ZDS: session with istio-cni failed");
                    Some(e)
                }
            };
            let failures = self.status.update(|s| {
                s.connected = false;
                s.snapshot_received = false;
                match &error {
                    None => s.consecutive_failures = 0,
                    Some(e) => {
                        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                        s.last_error = Some(e.to_string());
                    }
                }
                s.consecutive_failures
            });
            if error.is_none() {
                continue;
            }
            let delay = self.backoff.delay(failures.max(1), &mut self.rng);
            tracing::debug!(socket = %path, ?delay, failures, "ZDS: reconnecting after backoff");
            self.status.update(|s| s.backoff = Some(delay));
            self.timer.sleep_until(self.timer.now() + delay).await;
            self.status.update(|s| s.backoff = None);
        }
    }

    /// Dials, says hello, and serves one session.
    async fn session<H: PodHandler>(&mut self, handler: &mut H) -> End {
        self.status.update(|s| s.dials += 1);
        let socket = match self.dial().await {
            Ok(socket) => socket,
            Err(e) => return End::Dial(e),
        };
        let session = self.status.update(|s| {
            s.sessions += 1;
            s.connected = true;
            s.snapshot_received = false;
            s.sessions
        });
        tracing::info!(socket = %self.path.display(), session, "ZDS: connected to istio-cni");
        handler.session_started(session);
        let mut named = BTreeSet::new();
        loop {
            let datagram = match socket.async_io(Interest::READABLE, recv_datagram).await {
                Ok(Some(d)) => d,
                Ok(None) => return End::Closed,
                Err(e) => return End::Failed(self.io_error("receiving", &e)),
            };
            let parsed = parse_request(&datagram.bytes, datagram.fds, datagram.truncation, |fd| {
                check_netns(fd.as_fd())
            });
            let message = match parsed {
                Ok(message) => message,
                Err(e) => {
                    // Tell istio-cni why, then end the session.
                    self.status.update(|s| s.nacks += 1);
                    let _ = self.send_ack(&socket, &e.to_string()).await;
                    return End::Failed(e);
                }
            };
            let event = match message {
                PodMessage::Add { uid, info, netns } => {
                    named.insert(uid.clone());
                    PodEvent::Add { uid, info, netns }
                }
                PodMessage::Keep { uid } => {
                    named.insert(uid.clone());
                    PodEvent::Keep { uid }
                }
                PodMessage::Del { uid } => {
                    named.remove(&uid);
                    PodEvent::Del { uid }
                }
                PodMessage::SnapshotSent => {
                    self.status.update(|s| {
                        s.snapshot_received = true;
                        s.snapshots += 1;
                    });
                    PodEvent::SnapshotSent { named: named.clone() }
                }
            };
            let what = event_name(&event);
            let error = match handler.handle(event).await {
                Ok(()) => String::new(),
                Err(reason) if reason.is_empty() => "rejected by the proxy (no reason given)".to_string(),
                Err(reason) => reason,
            };
            if error.is_empty() {
                tracing::debug!(what, "ZDS: ACK");
                self.status.update(|s| s.acks += 1);
            } else {
                tracing::warn!(what, error, "ZDS: NACK");
                self.status.update(|s| s.nacks += 1);
            }
            if let Err(e) = self.send_ack(&socket, &error).await {
                return End::Failed(e);
            }
        }
    }

    async fn dial(&self) -> Result<AsyncFd<OwnedFd>, ZdsError> {
        let connect_error = |reason: String| ZdsError::Connect {
            path: self.path.display().to_string(),
            reason,
        };
        let address = SocketAddrUnix::new(&self.path).map_err(|e| connect_error(format!("bad socket path: {e}")))?;
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| connect_error(format!("socket: {e}")))?;
        // A Unix socket connects at once or fails (EAGAIN: istio-cni's backlog is full).
        rustix::net::connect(&fd, &address).map_err(|e| connect_error(e.to_string()))?;
        // `AsyncFd::new` is deprecated because a `T: AsRawFd` may change or close its descriptor
        // behind the reactor's back; an `OwnedFd` cannot (the safe twin of `AsyncFd::register`).
        #[allow(deprecated)]
        let socket = AsyncFd::new(fd).map_err(|e| connect_error(format!("registering the socket: {e}")))?;
        let hello = ZdsHello {
            version: Version::V1 as i32,
        }
        .encode_to_vec();
        socket
            .async_io(Interest::WRITABLE, |fd| send_datagram(fd, &hello))
            .await
            .map_err(|e| connect_error(format!("sending the hello: {e}")))?;
        Ok(socket)
    }

    async fn send_ack(&self, socket: &AsyncFd<OwnedFd>, error: &str) -> Result<(), ZdsError> {
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.to_string(),
            })),
        }
        .encode_to_vec();
        socket
            .async_io(Interest::WRITABLE, |fd| send_datagram(fd, &response))
            .await
            .map_err(|e| self.io_error("sending the Ack", &e))
    }

    fn io_error(&self, op: &'static str, e: &std::io::Error) -> ZdsError {
        ZdsError::Io {
            op,
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }
}

impl<T> std::fmt::Debug for ZdsClient<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsClient")
            .field("path", &self.path)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

fn event_name(event: &PodEvent) -> String {
    match event {
        PodEvent::Add { uid, .. } => format!("AddWorkload {uid}"),
        PodEvent::Keep { uid } => format!("KeepWorkload {uid}"),
        PodEvent::Del { uid } => format!("DelWorkload {uid}"),
        PodEvent::SnapshotSent { named } => format!("SnapshotSent ({} named)", named.len()),
    }
}

/// Sends one datagram (no descriptors).
fn send_datagram(fd: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    let mut control = SendAncillaryBuffer::default();
    let sent = rustix::net::sendmsg(fd, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?;
    if sent != bytes.len() {
        return Err(std::io::Error::other(format!("sent {sent} of {} bytes", bytes.len())));
    }
    Ok(())
}

/// Receives one datagram with its descriptors; `None` at the end of the stream (zero bytes, no
/// descriptors).
fn recv_datagram(fd: &OwnedFd) -> std::io::Result<Option<Datagram>> {
    let mut buffer = [0u8; MAX_MESSAGE_SIZE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        fd,
        &mut [IoSliceMut::new(&mut buffer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let truncation = if received.flags.contains(ReturnFlags::TRUNC) || received.bytes > MAX_MESSAGE_SIZE {
        Truncation::Data { size: received.bytes }
    } else if received.flags.contains(ReturnFlags::CTRUNC) {
        Truncation::Control
    } else {
        Truncation::None
    };
    if received.bytes == 0 && fds.is_empty() && truncation == Truncation::None {
        return Ok(None);
    }
    let len = received.bytes.min(MAX_MESSAGE_SIZE);
    Ok(Some(Datagram {
        bytes: buffer[..len].to_vec(),
        fds,
        truncation,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proto::istio::workload::zds::WorkloadInfo as ProtoInfo;

    fn encode(payload: workload_request::Payload) -> Vec<u8> {
        WorkloadRequest { payload: Some(payload) }.encode_to_vec()
    }

    fn add(uid: &str, info: Option<ProtoInfo>) -> Vec<u8> {
        encode(workload_request::Payload::Add(AddWorkload {
            uid: uid.into(),
            workload_info: info,
        }))
    }

    fn ok(_: &u32) -> Result<(), String> {
        Ok(())
    }

    fn parse(bytes: &[u8], fds: Vec<u32>) -> Result<PodMessage<u32>, ZdsError> {
        parse_request(bytes, fds, Truncation::None, ok)
    }

    #[test]
    fn add_with_info_and_one_fd() {
        let info = ProtoInfo {
            name: "pod-a".into(),
            namespace: "ns-a".into(),
            service_account: "sa-a".into(),
        };
        let message = parse(&add("uid-a", Some(info)), vec![9]).unwrap();
        assert_eq!(
            message,
            PodMessage::Add {
                uid: "uid-a".into(),
                info: Some(WorkloadInfo {
                    name: "pod-a".into(),
                    namespace: "ns-a".into(),
                    service_account: "sa-a".into(),
                }),
                netns: 9,
            }
        );
        // Re-encoding gives back the same bytes.
        assert_eq!(message.to_request().encode_to_vec(), add("uid-a", Some(info_a())));
        // Without info: None, and it round-trips as None.
        let bare = parse(&add("uid-b", None), vec![3]).unwrap();
        assert_eq!(
            bare,
            PodMessage::Add {
                uid: "uid-b".into(),
                info: None,
                netns: 3
            }
        );
        assert_eq!(bare.to_request().encode_to_vec(), add("uid-b", None));
    }

    fn info_a() -> ProtoInfo {
        ProtoInfo {
            name: "pod-a".into(),
            namespace: "ns-a".into(),
            service_account: "sa-a".into(),
        }
    }

    #[test]
    fn keep_del_snapshot() {
        let keep = encode(workload_request::Payload::Keep(KeepWorkload { uid: "k".into() }));
        let del = encode(workload_request::Payload::Del(DelWorkload { uid: "d".into() }));
        let snap = encode(workload_request::Payload::SnapshotSent(SnapshotSent {}));
        assert_eq!(snap, [0x1a, 0x00]);
        assert_eq!(parse(&keep, vec![]).unwrap(), PodMessage::Keep { uid: "k".into() });
        assert_eq!(parse(&del, vec![]).unwrap(), PodMessage::Del { uid: "d".into() });
        assert_eq!(parse(&snap, vec![]).unwrap(), PodMessage::SnapshotSent);
        for bytes in [&keep, &del, &snap] {
            assert_eq!(&parse(bytes, vec![]).unwrap().to_request().encode_to_vec(), bytes);
        }
    }

    #[test]
    fn wrong_fd_counts_are_named() {
        let e = parse(&add("u", None), vec![]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "AddWorkload u carries 0 file descriptors, expected 1 (its network namespace)"
        );
        let e = parse(&add("u", None), vec![1, 2]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "AddWorkload u carries 2 file descriptors, expected 1 (its network namespace)"
        );
        let del = encode(workload_request::Payload::Del(DelWorkload { uid: "d".into() }));
        assert_eq!(
            parse(&del, vec![4]).unwrap_err().to_string(),
            "DelWorkload d carries 1 file descriptors, expected none"
        );
        let snap = encode(workload_request::Payload::SnapshotSent(SnapshotSent {}));
        assert_eq!(
            parse(&snap, vec![4, 5]).unwrap_err().to_string(),
            "SnapshotSent carries 2 file descriptors, expected none"
        );
    }

    #[test]
    fn a_non_netns_fd_is_refused_with_what_it_is() {
        let e = parse_request(&add("u", None), vec![1u32], Truncation::None, |_| {
            Err("it is uts:[1]".into())
        });
        assert_eq!(
            e.unwrap_err().to_string(),
            "AddWorkload u: the file descriptor is not a network namespace: it is uts:[1]"
        );
    }

    #[test]
    fn truncation_size_and_garbage() {
        let snap = encode(workload_request::Payload::SnapshotSent(SnapshotSent {}));
        assert_eq!(
            parse_request(&snap, Vec::<u32>::new(), Truncation::Data { size: 2000 }, ok).unwrap_err(),
            ZdsError::TooLong { size: 2000 }
        );
        assert_eq!(
            parse_request(&snap, vec![1u32], Truncation::Control, ok).unwrap_err(),
            ZdsError::FdsTruncated
        );
        // Over the limit even if the caller did not flag it.
        let mut long = add(&"x".repeat(MAX_MESSAGE_SIZE), None);
        assert!(long.len() > MAX_MESSAGE_SIZE);
        assert_eq!(
            parse(&long, vec![1]).unwrap_err(),
            ZdsError::TooLong { size: long.len() }
        );
        long.truncate(MAX_MESSAGE_SIZE);
        assert!(matches!(parse(&long, vec![1]).unwrap_err(), ZdsError::Decode(_)));
        assert_eq!(parse(&[], vec![]).unwrap_err(), ZdsError::NoPayload);
        // Only an unknown field (the reserved 4): no payload.
        assert_eq!(parse(&[0x20, 0x01], vec![]).unwrap_err(), ZdsError::NoPayload);
        assert!(matches!(parse(&[0xff], vec![]).unwrap_err(), ZdsError::Decode(_)));
        let e = parse(&[0x0a, 0x05, 0x0a], vec![]).unwrap_err();
        assert!(
            e.to_string().starts_with("the message is not a WorkloadRequest: "),
            "{e}"
        );
    }

    #[test]
    fn empty_uids_are_refused() {
        assert_eq!(
            parse(&add("", None), vec![1]).unwrap_err(),
            ZdsError::EmptyUid { kind: "AddWorkload" }
        );
        let keep = encode(workload_request::Payload::Keep(KeepWorkload { uid: String::new() }));
        assert_eq!(
            parse(&keep, vec![]).unwrap_err().to_string(),
            "KeepWorkload has an empty uid"
        );
        let del = encode(workload_request::Payload::Del(DelWorkload { uid: String::new() }));
        assert_eq!(
            parse(&del, vec![]).unwrap_err(),
            ZdsError::EmptyUid { kind: "DelWorkload" }
        );
    }

    #[test]
    fn check_netns_tells_namespaces_apart() {
        let net = std::fs::File::open("/proc/self/ns/net").unwrap();
        assert_eq!(check_netns(net.as_fd()), Ok(()));
        let uts = std::fs::File::open("/proc/self/ns/uts").unwrap();
        let e = check_netns(uts.as_fd()).unwrap_err();
        assert!(e.starts_with("it is uts:["), "{e}");
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let e = check_netns(file.as_fd()).unwrap_err();
        assert!(e.contains("/status"), "{e}");
    }
}
