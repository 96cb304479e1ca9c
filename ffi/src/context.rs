//! The context: meshwire's runtime threads and one identity, kept current by a certificate manager.

use std::ffi::CString;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwire_identity::id::{SpiffeId, parse_spiffe_id};
use meshwire_identity::manager::{CertHandle, CertManager, ManagerConfig, Priority};
use meshwire_identity::source::LocalCaOrFiles;
use meshwire_identity::source::files::{FilePaths, FileSource};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_rt::TokioTimer;
use tokio::runtime::{Handle, Runtime};

use crate::error::{Failure, MeshwireStatus};

/// How long freeing a context waits for meshwire's threads to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Blocks SIGPIPE on the calling thread (one of meshwire's). A Rust program ignores SIGPIPE, but a C
/// host usually does not, and a write to a socket whose peer is gone would then kill the process;
/// blocked, the signal stays pending on this thread and the write fails with `EPIPE` instead.
fn block_sigpipe() {
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before use; pthread_sigmask
    // changes the signal mask of this thread only and does not keep the pointer.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// What the context's servers and dials share.
pub(crate) struct Shared {
    pub(crate) handle: Handle,
    pub(crate) certs: CertHandle,
    manager: CertManager<LocalCaOrFiles, TokioTimer>,
}

impl Shared {
    /// Runs `fut` on meshwire's runtime and waits for its output on the calling thread, which may
    /// be any thread (a plain thread channel, not `block_on`, so no runtime rule is broken).
    pub(crate) fn wait<F>(&self, fut: F) -> Result<F::Output, Failure>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        wait_on(&self.handle, fut)
    }
}

fn wait_on<F>(handle: &Handle, fut: F) -> Result<F::Output, Failure>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| {
        Failure::new(
            MeshwireStatus::MESHWIRE_ERR_RUNTIME,
            "the meshwire context is shutting down",
        )
    })
}

/// An opaque meshwire context: runtime threads and an identity. Made by
/// `meshwire_context_new_local_ca` or `meshwire_context_new_files`, freed by `meshwire_context_free`.
pub struct MeshwireContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) identity: CString,
    runtime: Option<Runtime>,
}

impl MeshwireContext {
    fn start(source: LocalCaOrFiles, id: SpiffeId) -> Result<Self, Failure> {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("meshwire")
            .on_thread_start(block_sigpipe)
            .enable_all()
            .build()
            .map_err(|e| {
                Failure::new(
                    MeshwireStatus::MESHWIRE_ERR_RUNTIME,
                    format!("cannot start meshwire's threads: {e}"),
                )
            })?;
        let manager = CertManager::new(source, TokioTimer, ManagerConfig::default());
        let driver = manager.clone();
        runtime.spawn(async move { driver.run().await });
        let fetcher = manager.clone();
        let wanted = id.clone();
        let got = wait_on(runtime.handle(), async move {
            fetcher.get(&wanted, Priority::Connection).await
        });
        let certs = match got {
            Ok(Ok(certs)) => certs,
            Ok(Err(e)) => {
                manager.shutdown();
                runtime.shutdown_background();
                return Err(Failure::new(
                    MeshwireStatus::MESHWIRE_ERR_IDENTITY,
                    format!("cannot obtain the certificate of {id}: {e}"),
                ));
            }
            Err(e) => {
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let identity = CString::new(id.to_string()).map_err(|e| Failure::invalid(e.to_string()))?;
        Ok(Self {
            shared: Arc::new(Shared {
                handle: runtime.handle().clone(),
                certs,
                manager,
            }),
            identity,
            runtime: Some(runtime),
        })
    }

    /// A context whose identity `spiffe_id` is issued by the local CA persisted in `ca_dir` (created
    /// there on first use, for the SPIFFE ID's trust domain).
    pub(crate) fn local_ca(ca_dir: &str, spiffe_id: &str) -> Result<Self, Failure> {
        let id = parse_spiffe_id(spiffe_id).map_err(|e| Failure::invalid(e.to_string()))?;
        if ca_dir.is_empty() {
            return Err(Failure::invalid("the CA directory is empty"));
        }
        let ca = LocalCa::load_or_create(Path::new(ca_dir), id.trust_domain().clone())
            .map_err(|e| Failure::new(MeshwireStatus::MESHWIRE_ERR_IDENTITY, e.to_string()))?;
        Self::start(LocalCaOrFiles::LocalCa(ca), id)
    }

    /// A context whose identity is the SVID in the given files (reloaded when they change).
    pub(crate) fn files(cert_chain: &str, private_key: &str, trust_bundle: &str) -> Result<Self, Failure> {
        let source = FileSource::new(FilePaths {
            cert_chain: cert_chain.into(),
            private_key: private_key.into(),
            trust_bundle: trust_bundle.into(),
        });
        let creds = source
            .load(SystemTime::now())
            .map_err(|e| Failure::new(MeshwireStatus::MESHWIRE_ERR_IDENTITY, e.to_string()))?;
        let id = creds.svid.spiffe_id().clone();
        Self::start(LocalCaOrFiles::Files(source), id)
    }

    /// Stops the certificate manager and the runtime: every task (servers, tunnels) ends.
    pub(crate) fn shutdown(mut self) {
        self.shared.manager.shutdown();
        if let Some(runtime) = self.runtime.take() {
            if Handle::try_current().is_ok() {
                // On one of meshwire's own threads (a callback): waiting here would wait for itself.
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(SHUTDOWN_WAIT);
            }
        }
    }
}

impl Drop for MeshwireContext {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
