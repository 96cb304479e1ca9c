//! In-pod mode's bookkeeping: which pods the proxy serves, written once for both binaries.
//!
//! istio-cni tells the proxy about the pods of its node over the ZDS protocol
//! (`meshwire_control::zds`): a snapshot of `Add` (with the pod's network namespace) or `Keep`
//! messages, `SnapshotSent`, then `Add` and `Del` as pods come and go. [`Pods`] turns those into
//! calls to a [`PodStarter`] (the binary's: bind the pod's listeners inside its namespace and serve
//! them, or drain them) and answers each message (`Ok` is ACKed, `Err` NACKed with the reason):
//!
//! - `Add` of a new pod starts it; of a pod already served in the same namespace (same inode) is a
//!   no-op; in another namespace (the pod's sandbox was recreated) stops the old listeners and
//!   starts new ones.
//! - A pod whose start fails is NACKed and kept as *pending*: [`Pods::retry_due`] starts it again
//!   every [`RETRY_INTERVAL`] until it starts, is deleted or is left out of a snapshot.
//! - `Keep` of a pod served is ACKed; of a pod this process does not know is NACKed (its namespace
//!   is needed: istio-cni sends an `Add`).
//! - `Del` stops the pod at once (unknown pods are ACKed: the message is idempotent).
//! - `SnapshotSent` stops every pod not named in the snapshot of that session.
//!
//! [`Pods::ready`] is the in-pod part of readiness: a snapshot was processed in the current session
//! and no pod is pending. Time is an input ([`Instant`]s passed in), so the retry schedule runs in
//! virtual time in tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::config::WorkloadInfo;
use crate::rt::netns::Netns;

/// How long a pod whose listeners could not start waits before the next attempt.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// What a binary does for a pod: start its listeners inside its namespace and serve them, or stop
/// (drain) them.
pub trait PodStarter {
    /// What a served pod holds (its listeners and connections); handed back to [`stop`](Self::stop).
    type Running;

    /// Starts serving the pod `uid`: `Err` says why it could not (a port taken, the namespace
    /// gone), and nothing of it is left running.
    fn start(&mut self, uid: &str, info: Option<&WorkloadInfo>, netns: &Netns) -> Result<Self::Running, String>;

    /// Stops serving a pod: its listeners close and its connections are drained or closed.
    fn stop(&mut self, uid: &str, running: Self::Running);
}

/// One pod istio-cni named.
struct Pod<R> {
    info: Option<WorkloadInfo>,
    netns: Netns,
    /// The namespace's inode: an `Add` with the same one is the same sandbox.
    inode: Option<u64>,
    state: PodState<R>,
}

enum PodState<R> {
    Running(R),
    /// Its start failed: the reason, the attempts so far, and when to try again.
    Pending {
        reason: String,
        attempts: u32,
        retry_at: Instant,
    },
}

/// A pod as [`Pods::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// The Kubernetes pod UID.
    pub uid: String,
    /// Its name, namespace and service account, when istio-cni gave them.
    pub info: Option<WorkloadInfo>,
    /// Whether its listeners are up.
    pub running: bool,
    /// Why its last start failed, while it is pending.
    pub error: Option<String>,
    /// Failed starts since it was added.
    pub failed_attempts: u32,
}

/// The pods served in in-pod mode (see the module docs).
pub struct Pods<S: PodStarter> {
    starter: S,
    pods: BTreeMap<String, Pod<S::Running>>,
    /// A snapshot was processed in the current session.
    synced: bool,
}

impl<S: PodStarter> fmt::Debug for Pods<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pods")
            .field("pods", &self.pods.keys().collect::<Vec<_>>())
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

impl<S: PodStarter> Pods<S> {
    /// No pods yet; `starter` starts and stops them.
    pub fn new(starter: S) -> Self {
        Pods {
            starter,
            pods: BTreeMap::new(),
            synced: false,
        }
    }

    /// The starter.
    pub fn starter(&self) -> &S {
        &self.starter
    }

    /// A new session with istio-cni began: readiness waits for its snapshot.
    pub fn session_started(&mut self) {
        self.synced = false;
    }

    /// `AddWorkload`: serve the pod `uid` in `netns`.
    pub fn add(&mut self, uid: &str, info: Option<WorkloadInfo>, netns: Netns, now: Instant) -> Result<(), String> {
        if uid.is_empty() {
            return Err("the pod has no uid".to_owned());
        }
        let inode = netns.inode().ok();
        if let Some(pod) = self.pods.get_mut(uid) {
            let same_sandbox = inode.is_some() && pod.inode == inode;
            if same_sandbox {
                pod.info = info.or(pod.info.take());
                return match &pod.state {
                    PodState::Running(_) => Ok(()),
                    PodState::Pending { .. } => self.try_start(uid, now),
                };
            }
            tracing::info!(
                pod = uid,
                "the pod's network namespace changed: its listeners move to the new one"
            );
            self.remove(uid);
        }
        self.pods.insert(
            uid.to_owned(),
            Pod {
                info,
                netns,
                inode,
                state: PodState::Pending {
                    reason: String::new(),
                    attempts: 0,
                    retry_at: now,
                },
            },
        );
        self.try_start(uid, now)
    }

    /// `KeepWorkload`: the pod `uid` should already be served by this process.
    pub fn keep(&mut self, uid: &str) -> Result<(), String> {
        match self.pods.get(uid).map(|pod| &pod.state) {
            Some(PodState::Running(_)) => Ok(()),
            Some(PodState::Pending { reason, .. }) => Err(format!("the pod's listeners are not up: {reason}")),
            None => Err(format!(
                "pod {uid} is unknown to this proxy: it needs an AddWorkload with its network namespace"
            )),
        }
    }

    /// `DelWorkload`: stop serving the pod `uid` at once. An unknown uid is not an error.
    pub fn del(&mut self, uid: &str) {
        if !self.remove(uid) {
            tracing::debug!(pod = uid, "DelWorkload of a pod this proxy does not serve");
        }
    }

    /// `SnapshotSent`: stops every pod not in `named` (the uids of the session's snapshot); returns
    /// how many were stopped.
    pub fn snapshot_sent(&mut self, named: &BTreeSet<String>) -> usize {
        let stale: Vec<String> = self.pods.keys().filter(|uid| !named.contains(*uid)).cloned().collect();
        for uid in &stale {
            tracing::info!(pod = %uid, "istio-cni's snapshot does not name the pod: its listeners are drained");
            self.remove(uid);
        }
        self.synced = true;
        stale.len()
    }

    /// Starts again the pending pods whose retry time has come; returns the uids tried with the
    /// outcome of each.
    pub fn retry_due(&mut self, now: Instant) -> Vec<(String, Result<(), String>)> {
        let due: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, pod)| matches!(pod.state, PodState::Pending { retry_at, .. } if retry_at <= now))
            .map(|(uid, _)| uid.clone())
            .collect();
        due.into_iter()
            .map(|uid| {
                let outcome = self.try_start(&uid, now);
                (uid, outcome)
            })
            .collect()
    }

    /// When the next pending pod is due, if any.
    pub fn next_retry(&self) -> Option<Instant> {
        self.pods
            .values()
            .filter_map(|pod| match pod.state {
                PodState::Pending { retry_at, .. } => Some(retry_at),
                PodState::Running(_) => None,
            })
            .min()
    }

    /// Stops every pod (the proxy is shutting down).
    pub fn stop_all(&mut self) {
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.remove(&uid);
        }
    }

    /// Ready: a snapshot was processed in the current session and every pod named since is served.
    pub fn ready(&self) -> bool {
        self.synced && self.pending() == 0
    }

    /// Why the proxy is not ready, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        if !self.synced {
            return Some("waiting for istio-cni's snapshot of the node's pods".to_owned());
        }
        let pending: Vec<String> = self
            .pods
            .iter()
            .filter_map(|(uid, pod)| match &pod.state {
                PodState::Pending { reason, .. } => Some(format!("{uid}: {reason}")),
                PodState::Running(_) => None,
            })
            .collect();
        (!pending.is_empty()).then(|| format!("pods whose listeners are not up: {}", pending.join("; ")))
    }

    /// How many pods wait for their listeners.
    pub fn pending(&self) -> usize {
        self.pods
            .values()
            .filter(|pod| matches!(pod.state, PodState::Pending { .. }))
            .count()
    }

    /// How many pods are served.
    pub fn running(&self) -> usize {
        self.pods.len() - self.pending()
    }

    /// Every pod, by uid.
    pub fn list(&self) -> Vec<PodView> {
        self.pods
            .iter()
            .map(|(uid, pod)| {
                let (running, error, failed_attempts) = match &pod.state {
                    PodState::Running(_) => (true, None, 0),
                    PodState::Pending { reason, attempts, .. } => (false, Some(reason.clone()), *attempts),
                };
                PodView {
                    uid: uid.clone(),
                    info: pod.info.clone(),
                    running,
                    error,
                    failed_attempts,
                }
            })
            .collect()
    }

    fn try_start(&mut self, uid: &str, now: Instant) -> Result<(), String> {
        let Some(pod) = self.pods.get_mut(uid) else {
            return Err(format!("pod {uid} is unknown"));
        };
        let attempts = match &pod.state {
            PodState::Running(_) => return Ok(()),
            PodState::Pending { attempts, .. } => *attempts,
        };
        match self.starter.start(uid, pod.info.as_ref(), &pod.netns) {
            Ok(running) => {
                if attempts > 0 {
                    tracing::info!(pod = uid, attempts, "the pod's listeners are up after failed attempts");
                }
                pod.state = PodState::Running(running);
                Ok(())
            }
            Err(reason) => {
                let attempts = attempts + 1;
                tracing::warn!(pod = uid, attempts, error = %reason, retry_in = ?RETRY_INTERVAL, "cannot start the pod's listeners");
                pod.state = PodState::Pending {
                    reason: reason.clone(),
                    attempts,
                    retry_at: now + RETRY_INTERVAL,
                };
                Err(reason)
            }
        }
    }

    /// Stops and forgets `uid`; whether it was known.
    fn remove(&mut self, uid: &str) -> bool {
        match self.pods.remove(uid) {
            Some(Pod {
                state: PodState::Running(running),
                ..
            }) => {
                self.starter.stop(uid, running);
                true
            }
            Some(_) => true,
            None => false,
        }
    }
}
