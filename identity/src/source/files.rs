//! Credentials read from files on disk (an SVID chain, its key, and a trust bundle), for SVIDs
//! written by an external agent such as cert-manager, a SPIRE helper or a mounted secret.
//!
//! The manager asks again every [`FileSource::poll_interval`]: the files are read, and a change is
//! parsed and validated. A valid change replaces the credentials; a bad one (truncated write,
//! corrupt PEM, key of another certificate, untrusted chain, expired) is logged once and the last
//! good credentials stay in service for as long as they are valid.
//!
//! ```no_run
//! use meshwire_identity::source::files::{FilePaths, FileSource};
//!
//! let source = FileSource::new(FilePaths {
//!     cert_chain: "/var/run/secrets/workload/cert-chain.pem".into(),
//!     private_key: "/var/run/secrets/workload/key.pem".into(),
//!     trust_bundle: "/var/run/secrets/workload/root-cert.pem".into(),
//! });
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{CertSource, Credentials, SourceError};
use crate::bundle::{BundleSet, TrustBundle};
use crate::id::SpiffeId;
use crate::svid::X509Svid;

/// Default interval between two looks at the files.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Where the files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePaths {
    /// PEM certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// PEM private key of the leaf.
    pub private_key: PathBuf,
    /// PEM root certificates of the SVID's trust domain.
    pub trust_bundle: PathBuf,
}

#[derive(Default)]
struct State {
    /// The bytes last read, accepted or not: unchanged files are not parsed again.
    last_read: Option<[Vec<u8>; 3]>,
    /// The last good credentials.
    good: Option<Credentials>,
    /// Why the last change was rejected, while it is still on disk.
    rejected: Option<SourceError>,
}

/// A certificate source reading one SVID from files.
pub struct FileSource {
    paths: FilePaths,
    poll_interval: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("paths", &self.paths)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl FileSource {
    /// A source over `paths`, looked at every [`DEFAULT_POLL_INTERVAL`].
    pub fn new(paths: FilePaths) -> Self {
        Self {
            paths,
            poll_interval: DEFAULT_POLL_INTERVAL,
            state: Mutex::default(),
        }
    }

    /// Sets how often the files are looked at.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The paths read.
    pub fn paths(&self) -> &FilePaths {
        &self.paths
    }

    fn read_all(&self) -> Result<[Vec<u8>; 3], SourceError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| SourceError::Io {
                path: p.display().to_string(),
                source: Arc::new(e),
            })
        };
        Ok([
            read(&self.paths.cert_chain)?,
            read(&self.paths.private_key)?,
            read(&self.paths.trust_bundle)?,
        ])
    }

    fn parse(&self, bytes: &[Vec<u8>; 3], now: SystemTime) -> Result<Credentials, SourceError> {
        let [chain, key, bundle] = bytes;
        let at = |what: &str, e: &dyn std::fmt::Display| {
            SourceError::Invalid(format!(
                "{} / {}: {what}: {e}",
                self.paths.cert_chain.display(),
                self.paths.private_key.display()
            ))
        };
        let svid = X509Svid::from_pem(chain, key).map_err(|e| at("invalid SVID", &e))?;
        let bundle = TrustBundle::from_pem(svid.spiffe_id().trust_domain().clone(), bundle)
            .map_err(|e| SourceError::Invalid(format!("{}: {e}", self.paths.trust_bundle.display())))?;
        let bundles = BundleSet::from(bundle);
        svid.verify(&bundles, now).map_err(|e| at("SVID rejected", &e))?;
        Ok(Credentials { svid, bundles })
    }

    /// Reads the files now; returns the credentials in service afterwards.
    ///
    /// A change that does not validate is logged and ignored while the last good credentials are
    /// still valid at `now`; with none, its error is returned.
    pub fn load(&self, now: SystemTime) -> Result<Credentials, SourceError> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let read = self.read_all();
        match read {
            Ok(bytes) if state.last_read.as_ref() == Some(&bytes) => {}
            Ok(bytes) => {
                match self.parse(&bytes, now) {
                    Ok(creds) => {
                        if state.good.is_some() {
                            tracing::info!(id = %creds.svid.spiffe_id(), path = %self.paths.cert_chain.display(), "reloaded certificate from files");
                        }
                        state.good = Some(creds);
                        state.rejected = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rejected a change of the certificate files; keeping the previous certificate");
                        state.rejected = Some(e);
                    }
                }
                state.last_read = Some(bytes);
            }
            Err(e) => {
                // A file that is briefly missing while an agent replaces it is not a reason to stop.
                if state.rejected.as_ref().map(ToString::to_string) != Some(e.to_string()) {
                    tracing::warn!(error = %e, "cannot read the certificate files; keeping the previous certificate");
                }
                state.rejected = Some(e);
                state.last_read = None;
            }
        }
        match (&state.good, &state.rejected) {
            (Some(good), _) if good.svid.check_validity(now).is_ok() => Ok(good.clone()),
            (_, Some(e)) => Err(e.clone()),
            (Some(good), None) => Err(SourceError::InvalidSvid {
                id: good.svid.spiffe_id().clone(),
                source: Box::new(
                    good.svid
                        .check_validity(now)
                        .err()
                        .unwrap_or(crate::svid::SvidError::EmptyChain),
                ),
            }),
            (None, None) => Err(SourceError::Invalid(format!(
                "{}: nothing loaded",
                self.paths.cert_chain.display()
            ))),
        }
    }
}

impl CertSource for FileSource {
    async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
        let creds = self.load(SystemTime::now())?;
        if creds.svid.spiffe_id() != id {
            return Err(SourceError::NotServed {
                id: id.clone(),
                reason: format!("{} holds {}", self.paths.cert_chain.display(), creds.svid.spiffe_id()),
            });
        }
        Ok(creds)
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(self.poll_interval)
    }
}
