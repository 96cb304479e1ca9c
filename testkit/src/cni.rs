//! [`FakeCni`]: a fake istio-cni: a real Unix `SOCK_SEQPACKET` listener the proxy's ZDS client
//! dials, scripted by the test.
//!
//! - It listens on a fresh temporary path ([`FakeCni::start`]) or on a path of the test's
//!   ([`FakeCni::start_at`], to make a socket appear where a client already dials).
//! - Each accepted connection reaches the test as a [`CniConnection`] ([`FakeCni::next_connection`])
//!   with the first datagram the proxy sent (its hello) already read: [`CniConnection::hello`].
//! - The test sends requests as istio-cni does ([`CniConnection::add`] with a real network
//!   namespace, [`CniConnection::keep`], [`CniConnection::del`], [`CniConnection::snapshot_sent`]),
//!   or anything else: any request with any descriptors ([`CniConnection::send`]), raw bytes
//!   ([`CniConnection::send_raw`], for malformed and oversized messages). It reads the proxy's
//!   answers in order ([`CniConnection::ack`], [`CniConnection::recv`]) and drops the connection
//!   when it likes (dropping the [`CniConnection`]).
//! - [`FakeCni::connections`] and [`FakeCni::connection_times`] tell how many connections arrived
//!   and when (tokio's clock, so virtual under a paused runtime).
//!
//! [`netns`] opens the test process's own network namespace (`/proc/self/ns/net`: no root needed),
//! the descriptor an `AddWorkload` carries.
//!
//! Spawns its accept loop on the current tokio runtime (the caller's test runtime); stops when
//! dropped.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use meshwire_control::proto::istio::workload::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
    workload_request::Payload, workload_response,
};
use prost::Message;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// The test process's own network namespace (`/proc/self/ns/net`), a descriptor any user may open.
pub fn netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net")
        .expect("opening /proc/self/ns/net")
        .into()
}

/// A pod's identity as istio-cni sends it.
pub fn workload_info(name: &str, namespace: &str, service_account: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
    }
}

/// Wraps a non-blocking descriptor for the reactor. `AsyncFd::new` is deprecated because a
/// `T: AsRawFd` may swap its descriptor behind the reactor; an `OwnedFd` cannot.
#[allow(deprecated)]
fn register(fd: OwnedFd) -> AsyncFd<OwnedFd> {
    AsyncFd::new(fd).expect("registering a Unix socket with the tokio reactor")
}

struct Shared {
    accepted: Mutex<Vec<tokio::time::Instant>>,
    accepted_count: tokio::sync::watch::Sender<usize>,
}

/// A fake istio-cni: see the [module](self) documentation. Stops listening when dropped (its
/// socket file is removed; accepted connections live on until dropped).
pub struct FakeCni {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
    shared: Arc<Shared>,
    connections: mpsc::UnboundedReceiver<CniConnection>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeCni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCni")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeCni {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl FakeCni {
    /// Listens on `ztunnel.sock` in a fresh temporary directory.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for the fake istio-cni");
        let path = dir.path().join("ztunnel.sock");
        let mut cni = Self::start_at(&path);
        cni._dir = Some(dir);
        cni
    }

    /// Listens on `path` (which must not exist; its directory must).
    pub fn start_at(path: &Path) -> Self {
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .expect("a SOCK_SEQPACKET socket");
        let address = SocketAddrUnix::new(path).expect("a Unix socket path");
        rustix::net::bind(&listener, &address).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        rustix::net::listen(&listener, 16).expect("listen");
        let shared = Arc::new(Shared {
            accepted: Mutex::new(Vec::new()),
            accepted_count: tokio::sync::watch::Sender::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let accept = tokio::spawn(accept_loop(register(listener), shared.clone(), tx));
        Self {
            path: path.to_path_buf(),
            _dir: None,
            shared,
            connections: rx,
            accept,
        }
    }

    /// The socket path (what the proxy dials).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection, once its first datagram (the hello) arrived.
    pub async fn next_connection(&mut self) -> CniConnection {
        match self.connections.recv().await {
            Some(c) => c,
            None => panic!("the fake istio-cni's listener stopped"),
        }
    }

    /// How many connections arrived.
    pub fn connections(&self) -> usize {
        self.shared.accepted.lock().unwrap().len()
    }

    /// When each connection arrived (tokio's clock).
    pub fn connection_times(&self) -> Vec<tokio::time::Instant> {
        self.shared.accepted.lock().unwrap().clone()
    }

    /// Waits until `n` connections have arrived in all.
    pub async fn wait_for_connections(&self, n: usize) {
        let mut count = self.shared.accepted_count.subscribe();
        let _ = count.wait_for(|c| *c >= n).await;
    }
}

async fn accept_loop(listener: AsyncFd<OwnedFd>, shared: Arc<Shared>, tx: mpsc::UnboundedSender<CniConnection>) {
    loop {
        let accepted = listener
            .async_io(Interest::READABLE, |l| {
                rustix::net::accept_with(l, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK).map_err(Into::into)
            })
            .await;
        let fd = match accepted {
            Ok(fd) => fd,
            Err(e) => panic!("the fake istio-cni could not accept: {e}"),
        };
        shared.accepted.lock().unwrap().push(tokio::time::Instant::now());
        shared.accepted_count.send_modify(|c| *c += 1);
        let mut connection = CniConnection {
            socket: register(fd),
            hello: Vec::new(),
        };
        // The proxy speaks first; a connection closed before its hello keeps an empty one.
        connection.hello = connection.recv().await.unwrap_or_default();
        if tx.send(connection).is_err() {
            return;
        }
    }
}

/// One connection of the proxy, as the fake istio-cni sees it. Dropping it closes it.
#[derive(Debug)]
pub struct CniConnection {
    socket: AsyncFd<OwnedFd>,
    /// The first datagram the proxy sent (empty if it closed before sending one).
    pub hello: Vec<u8>,
}

impl CniConnection {
    /// The hello, decoded (`None` when it is not a `ZdsHello`).
    pub fn hello(&self) -> Option<ZdsHello> {
        ZdsHello::decode(self.hello.as_slice()).ok()
    }

    /// Sends `bytes` as one datagram with `fds` (`SCM_RIGHTS`); `false` when the proxy is gone.
    pub async fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, |socket| {
                let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() {
                    assert!(control.push(SendAncillaryMessage::ScmRights(fds)), "SCM_RIGHTS space");
                }
                rustix::net::sendmsg(socket, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)
                    .map_err(Into::into)
            })
            .await;
        match sent {
            Ok(n) => {
                assert_eq!(n, bytes.len(), "a datagram was sent in part");
                true
            }
            Err(_) => false,
        }
    }

    /// Sends `request` with `fds`; `false` when the proxy is gone.
    pub async fn send(&self, request: &WorkloadRequest, fds: &[BorrowedFd<'_>]) -> bool {
        self.send_raw(&request.encode_to_vec(), fds).await
    }

    /// Sends `AddWorkload { uid, workload_info: info }` with the test's own network namespace.
    pub async fn add(&self, uid: &str, info: WorkloadInfo) -> bool {
        let netns = netns();
        self.send(&add_request(uid, Some(info)), &[netns.as_fd()]).await
    }

    /// Sends `KeepWorkload { uid }`.
    pub async fn keep(&self, uid: &str) -> bool {
        let request = WorkloadRequest {
            payload: Some(Payload::Keep(KeepWorkload { uid: uid.to_string() })),
        };
        self.send(&request, &[]).await
    }

    /// Sends `DelWorkload { uid }`.
    pub async fn del(&self, uid: &str) -> bool {
        let request = WorkloadRequest {
            payload: Some(Payload::Del(DelWorkload { uid: uid.to_string() })),
        };
        self.send(&request, &[]).await
    }

    /// Sends `SnapshotSent`.
    pub async fn snapshot_sent(&self) -> bool {
        let request = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        self.send(&request, &[]).await
    }

    /// The proxy's next datagram (descriptors, if any, are closed); `None` once it closed the
    /// connection.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        let received = self
            .socket
            .async_io(Interest::READABLE, |socket| {
                let mut buffer = vec![0u8; 64 * 1024];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let got = rustix::net::recvmsg(
                    socket,
                    &mut [IoSliceMut::new(&mut buffer)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                buffer.truncate(got.bytes);
                Ok(buffer)
            })
            .await;
        match received {
            Ok(bytes) if !bytes.is_empty() => Some(bytes),
            // End of stream, or a reset: the proxy is gone.
            _ => None,
        }
    }

    /// The error of the proxy's next Ack (`""` for an ACK). Panics if the proxy closed the
    /// connection instead, or sent something else.
    pub async fn ack(&self) -> String {
        let Some(bytes) = self.recv().await else {
            panic!("the proxy closed the connection instead of answering");
        };
        match WorkloadResponse::decode(bytes.as_slice()) {
            Ok(WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(ack)),
            }) => ack.error,
            other => panic!("the proxy answered {bytes:02x?}, not an Ack: {other:?}"),
        }
    }
}

/// `AddWorkload { uid, workload_info: info }`.
pub fn add_request(uid: &str, info: Option<WorkloadInfo>) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: uid.to_string(),
            workload_info: info,
        })),
    }
}
