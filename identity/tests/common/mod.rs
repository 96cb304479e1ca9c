//! Test helpers shared by the integration tests: a timer over tokio's clock whose wall time moves
//! with it, and a scriptable certificate source over a real local CA.
#![cfg(feature = "local-ca")]
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::source::{CertSource, Credentials, SourceError};
use meshwire_identity::time::Timer;

/// Tokio's clock (virtual under `start_paused`), with a wall clock that advances with it.
#[derive(Clone)]
pub struct TestTimer {
    base_instant: tokio::time::Instant,
    base_wall: SystemTime,
    real_wall: bool,
}

impl TestTimer {
    pub fn new() -> Self {
        Self {
            base_instant: tokio::time::Instant::now(),
            base_wall: SystemTime::now(),
            real_wall: false,
        }
    }

    /// Virtual monotonic time but the real wall clock: for tests whose certificates are checked
    /// by rustls, which reads the real clock.
    pub fn with_real_wall() -> Self {
        Self {
            real_wall: true,
            ..Self::new()
        }
    }
}

impl Timer for TestTimer {
    type Sleep = tokio::time::Sleep;

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn system_now(&self) -> SystemTime {
        if self.real_wall {
            return SystemTime::now();
        }
        self.base_wall + (tokio::time::Instant::now() - self.base_instant)
    }

    fn sleep_until(&self, deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }
}

/// One fetch as the source saw it.
#[derive(Debug, Clone)]
pub struct FetchRecord {
    pub id: SpiffeId,
    pub at: SystemTime,
    pub ok: bool,
}

/// A source issuing from a real local CA at the test timer's wall time, which can be told to fail,
/// to hold fetches until released, and to deliver the wrong identity; it records every fetch.
pub struct ScriptedSource {
    pub ca: LocalCa,
    pub timer: TestTimer,
    pub lifetime: Duration,
    pub fail: AtomicBool,
    pub wrong_identity: AtomicBool,
    pub gate: Option<Arc<tokio::sync::Semaphore>>,
    pub log: Mutex<Vec<FetchRecord>>,
    pub started: Mutex<VecDeque<SpiffeId>>,
    pub fetches: AtomicUsize,
}

impl ScriptedSource {
    pub fn new(timer: TestTimer, lifetime: Duration) -> Self {
        Self {
            ca: LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap(),
            timer,
            lifetime,
            fail: AtomicBool::new(false),
            wrong_identity: AtomicBool::new(false),
            gate: None,
            log: Mutex::new(Vec::new()),
            started: Mutex::new(VecDeque::new()),
            fetches: AtomicUsize::new(0),
        }
    }

    pub fn gated(mut self) -> (Self, Arc<tokio::sync::Semaphore>) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        self.gate = Some(gate.clone());
        (self, gate)
    }

    pub fn fetch_count(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    pub fn records(&self) -> Vec<FetchRecord> {
        self.log.lock().unwrap().clone()
    }
}

impl CertSource for ScriptedSource {
    async fn fetch(&self, id: &SpiffeId) -> Result<Credentials, SourceError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.started.lock().unwrap().push_back(id.clone());
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let at = self.timer.system_now();
        let ok = !self.fail.load(Ordering::SeqCst);
        self.log.lock().unwrap().push(FetchRecord { id: id.clone(), at, ok });
        if !ok {
            return Err(SourceError::Authority {
                id: id.clone(),
                message: "CA unavailable (scripted)".into(),
            });
        }
        let issue_for = if self.wrong_identity.load(Ordering::SeqCst) {
            SpiffeId::new("spiffe://cluster.local/ns/other/sa/impostor").unwrap()
        } else {
            id.clone()
        };
        Ok(self.ca.issue_at(&issue_for, at, self.lifetime).unwrap())
    }
}

pub fn id(name: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://cluster.local/ns/default/sa/{name}")).unwrap()
}

/// Lets spawned tasks run until they all wait, without moving the paused clock.
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}
