//! The server side: accept HBONE connections on an address and hand each CONNECT to a C callback,
//! which accepts (and receives one end of a socket pair spliced to the tunnel) or refuses.

use std::cell::Cell;
use std::ffi::{CString, c_char, c_int, c_void};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use http::StatusCode;
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions, StreamReport};
use meshwire_rt::TokioTimer;
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::Shared;
use crate::error::{Failure, MeshwireStatus};

/// The accept callback: `peer_identity` (the client's verified SPIFFE ID) and `authority` (the
/// destination it asked for) are valid during the call only; `fd` is one end of a socket pair
/// spliced to the tunnel. Return 0 to accept: the fd is then the callback's to use and close.
/// Return an HTTP status from 400 to 599 to refuse with it (401: denied by policy, 503: the
/// destination is unreachable); any other value refuses with 500. On refusal meshwire closes the fd.
pub type MeshwireAcceptCallback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        peer_identity: *const c_char,
        authority: *const c_char,
        fd: c_int,
    ) -> c_int,
>;

/// The callback's `user_data`: an opaque pointer the caller promised may be used from any thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UserData(pub(crate) *mut c_void);

// SAFETY: meshwire never dereferences the pointer; it only hands it back to the caller's callback,
// and the header documents that callbacks run on meshwire's threads, so `user_data` must be usable
// from any thread.
unsafe impl Send for UserData {}
// SAFETY: as above; meshwire only copies the pointer value.
unsafe impl Sync for UserData {}

thread_local! {
    /// Set while this thread runs an accept callback, so that freeing the server from inside its own
    /// callback does not wait for that callback to return.
    static IN_ACCEPT_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// The callback and what guards it.
struct Callback {
    function: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, c_int) -> c_int,
    user_data: UserData,
    /// Held (shared) while a callback runs; `meshwire_server_free` takes it exclusively after
    /// setting `closed`, so no callback runs once it returned.
    gate: RwLock<()>,
    closed: AtomicBool,
}

enum Decision {
    Accept,
    Refuse(StatusCode),
}

impl Callback {
    fn decide(&self, peer: &CString, authority: &CString, fd: OwnedFd) -> Decision {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::SeqCst) {
            return Decision::Refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
        IN_ACCEPT_CALLBACK.with(|c| c.set(true));
        // SAFETY: the function pointer and user_data come from the caller of meshwire_server_start,
        // who guarantees they stay valid until meshwire_server_free returns (enforced by `gate`);
        // the strings live until after the call; the fd is open.
        let rc = unsafe { (self.function)(self.user_data.0, peer.as_ptr(), authority.as_ptr(), fd.as_raw_fd()) };
        IN_ACCEPT_CALLBACK.with(|c| c.set(false));
        if rc == 0 {
            // The callback owns the fd now.
            let _ = fd.into_raw_fd();
            return Decision::Accept;
        }
        let status = u16::try_from(rc)
            .ok()
            .filter(|s| (400..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Decision::Refuse(status)
    }
}

#[derive(Clone)]
struct CallbackHandler(Arc<Callback>);

fn unavailable(what: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal::unavailable(format!("{what}: {e}"))
}

impl Handler for CallbackHandler {
    type Upstream = UnixStream;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<UnixStream>, Refusal> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| unavailable("socket pair", e))?;
        ours.set_nonblocking(true).map_err(|e| unavailable("socket pair", e))?;
        let ours = UnixStream::from_std(ours).map_err(|e| unavailable("socket pair", e))?;
        let peer = CString::new(request.peer.to_string()).map_err(|e| unavailable("peer identity", e))?;
        let authority = CString::new(request.authority.to_string()).map_err(|e| unavailable("authority", e))?;
        let callback = self.0.clone();
        // On a blocking thread: the callback may take locks or do blocking work without stalling
        // the tunnels served by meshwire's workers.
        let decision = tokio::task::spawn_blocking(move || callback.decide(&peer, &authority, OwnedFd::from(theirs)))
            .await
            .map_err(|e| unavailable("accept callback", e))?;
        match decision {
            Decision::Accept => Ok(Connected::from(ours)),
            Decision::Refuse(status) => Err(Refusal::new(
                status,
                format!("refused by the accept callback with {status}"),
            )),
        }
    }

    fn finished(&self, report: StreamReport) {
        tracing::debug!(
            peer = %report.peer, status = %report.status, to_upstream = report.to_upstream,
            from_upstream = report.from_upstream, error = ?report.error, "HBONE stream ended"
        );
    }
}

/// An opaque HBONE server. Made by `meshwire_server_start`, freed by `meshwire_server_free`.
pub struct MeshwireServer {
    callback: Arc<Callback>,
    shared: Arc<Shared>,
    pub(crate) local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

impl MeshwireServer {
    pub(crate) fn start(
        shared: &Arc<Shared>,
        listen: &str,
        function: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, c_int) -> c_int,
        user_data: *mut c_void,
    ) -> Result<Self, Failure> {
        let addr: SocketAddr = listen.parse().map_err(|_| {
            Failure::invalid(format!(
                "listen address {listen:?} is not an ip:port (such as 0.0.0.0:15008 or 127.0.0.1:0)"
            ))
        })?;
        let io = |e: std::io::Error| Failure::new(MeshwireStatus::MESHWIRE_ERR_IO, format!("listen on {addr}: {e}"));
        let std_listener = std::net::TcpListener::bind(addr).map_err(io)?;
        std_listener.set_nonblocking(true).map_err(io)?;
        let local_addr = std_listener.local_addr().map_err(io)?;
        let listener = {
            let _entered = shared.handle.enter();
            TcpListener::from_std(std_listener).map_err(io)?
        };
        let callback = Arc::new(Callback {
            function,
            user_data: UserData(user_data),
            gate: RwLock::new(()),
            closed: AtomicBool::new(false),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_loop = shared.handle.spawn(accept_loop(
            shared.clone(),
            listener,
            CallbackHandler(callback.clone()),
            shutdown_rx,
        ));
        tracing::info!(%local_addr, "HBONE server listening");
        Ok(Self {
            callback,
            shared: shared.clone(),
            local_addr,
            shutdown,
            accept_loop,
        })
    }

    /// Stops accepting; open tunnels drain. Waits for running callbacks unless called from one.
    pub(crate) fn stop(self) {
        self.callback.closed.store(true, Ordering::SeqCst);
        if !IN_ACCEPT_CALLBACK.with(Cell::get) {
            drop(self.callback.gate.write().unwrap_or_else(PoisonError::into_inner));
        }
        let _ = self.shutdown.send(true);
        self.accept_loop.abort();
        // Once the aborted loop is gone, so is the listening socket. (Fails at once if the context
        // was freed first: the runtime is gone and with it the listener.)
        let accept_loop = self.accept_loop;
        let _ = self.shared.wait(async move {
            let _ = accept_loop.await;
        });
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    handler: CallbackHandler,
    mut shutdown: watch::Receiver<bool>,
) {
    let options = Arc::new(ServeOptions::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (tcp, client) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accepting an HBONE connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = shared.certs.current().server_config().clone();
        let handler = handler.clone();
        let options = options.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let drain = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            match server::serve(tcp, tls, &options, &handler, &TokioTimer, drain).await {
                Ok(summary) => {
                    tracing::debug!(%client, peer = %summary.peer, streams = summary.streams, "HBONE connection closed")
                }
                Err(e) => tracing::info!(%client, error = %e, "HBONE connection failed"),
            }
        });
    }
}
