//! The delta xDS (ADS) client: one `DeltaAggregatedResources` stream to istiod, wildcard
//! subscriptions to [`ADDRESS_TYPE`] and [`AUTHORIZATION_TYPE`], partial NACKs, reconnects with
//! `initial_resource_versions`, full-jitter exponential backoff on errors, and a shared
//! [`AdsStatus`] for readiness, metrics and config dumps.
//!
//! The caller implements [`XdsHandler`] (apply what decodes, name what does not) and drives
//! [`AdsClient::run`] on its tokio runtime; the client never spawns (hyper spawns only the request
//! body pump of the stream). On a disconnect the handler is told nothing: the last good state keeps
//! serving, and the next stream's initial requests tell istiod which versions are held.
//!
//! Reconnects:
//! - a stream that ends with gRPC status OK after a response, or with UNAVAILABLE after a response
//!   (istiod's 30-minute MaxConnectionAge), is a normal reconnect: at once, no backoff, not an
//!   error (counted as [`TerminationReason::Complete`] / [`TerminationReason::Reconnect`]);
//! - anything else (connect failure, other statuses, or a stream closed before any response) backs
//!   off with full jitter: the n-th consecutive failure waits a uniformly random time in
//!   `[0, min(max, initial * 2^(n-1))]` (defaults: [`Backoff::DEFAULT`], 500 ms doubling up to
//!   15 s; ztunnel retries without jitter from 10 ms, so a restarted istiod meets every node at
//!   once). A stream that received a response resets the backoff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::future::{Either, select};
use meshwire_rt::Timer;
use tokio::sync::mpsc;
use tonic::Code;

use crate::channel::{Channel, ChannelError};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use crate::proto::google::rpc;

/// The type URL of workloads and services (`istio.workload.Address`).
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// The type URL of L4 authorization policies (`istio.security.Authorization`).
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// The largest response accepted by default: istiod's first push to a node of a large mesh is
/// far above tonic's 4 MiB default (ztunnel allows 200 MiB too).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 200 * 1024 * 1024;

/// The gRPC code of a NACK's `error_detail` (INVALID_ARGUMENT).
const INVALID_ARGUMENT: i32 = 3;

/// A resource the handler could not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The resource name.
    pub name: String,
    /// Why it was rejected (decode or conversion error).
    pub reason: String,
}

impl Rejected {
    /// A rejection of `name` for `reason`.
    pub fn new(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// What the caller does with the resources istiod sends.
pub trait XdsHandler {
    /// Applies one response of `type_url`: the `resources` added or changed, the names `removed`.
    /// Applies every resource that decodes and converts; returns the others (empty: all applied).
    fn apply(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> Vec<Rejected>;
}

/// Full-jitter exponential backoff: after the n-th consecutive failure, a uniformly random delay in
/// `[0, min(max, initial * 2^(n-1))]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling after the first failure.
    pub initial: Duration,
    /// The largest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// 500 ms doubling up to 15 s.
    pub const DEFAULT: Backoff = Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(15),
    };

    /// The ceiling of the delay after `failures` consecutive failures (`failures >= 1`).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(30);
        self.initial.saturating_mul(1u32 << shift).min(self.max)
    }

    /// A delay for `failures` consecutive failures, drawn from `rng`.
    pub fn delay(&self, failures: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(failures).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.u64(0..=ceiling))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a stream (or an attempt at one) ended: ztunnel's `istio_xds_connection_terminations`
/// `reason` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TerminationReason {
    /// The connection could not be made (TCP, TLS or HTTP/2).
    ConnectionError,
    /// The stream failed: an error status, or the connection dropped.
    Error,
    /// istiod closed the stream with UNAVAILABLE after responses (MaxConnectionAge): a normal
    /// reconnect.
    Reconnect,
    /// The stream ended with status OK.
    Complete,
}

impl TerminationReason {
    /// Every reason, in label order.
    pub const ALL: [TerminationReason; 4] = [
        TerminationReason::ConnectionError,
        TerminationReason::Error,
        TerminationReason::Reconnect,
        TerminationReason::Complete,
    ];

    /// The label value, as ztunnel spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            TerminationReason::ConnectionError => "ConnectionError",
            TerminationReason::Error => "Error",
            TerminationReason::Reconnect => "Reconnect",
            TerminationReason::Complete => "Complete",
        }
    }
}

/// The state of one subscribed type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// At least one response of this type was fully ACKed (readiness).
    pub acked: bool,
    /// The nonce of the last ACK.
    pub last_ack_nonce: Option<String>,
    /// When the last ACK was sent.
    pub last_ack_at: Option<SystemTime>,
    /// The nonce of the last NACK.
    pub last_nack_nonce: Option<String>,
    /// The message of the last NACK (`"<name>: <reason>; ..."`).
    pub last_nack: Option<String>,
    /// When the last NACK was sent.
    pub last_nack_at: Option<SystemTime>,
    /// How many resources of this type are held (accepted and not removed).
    pub resources: usize,
}

/// A copy of the client's status at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdsSnapshot {
    /// istiod's address.
    pub address: String,
    /// A stream is open (its response headers arrived).
    pub connected: bool,
    /// Per subscribed type URL.
    pub types: BTreeMap<String, TypeStatus>,
    /// How many streams ended, by reason.
    pub terminations: BTreeMap<TerminationReason, u64>,
    /// Consecutive failures since the last stream that received a response.
    pub consecutive_failures: u32,
    /// The last error (connect failure or gRPC status), as logged.
    pub last_error: Option<String>,
    /// The delay chosen before the current reconnect attempt, while backing off.
    pub backoff: Option<Duration>,
}

impl AdsSnapshot {
    /// Ready: every subscribed type was ACKed at least once.
    pub fn ready(&self) -> bool {
        !self.types.is_empty() && self.types.values().all(|t| t.acked)
    }

    /// How many streams ended for `reason`.
    pub fn terminations(&self, reason: TerminationReason) -> u64 {
        self.terminations.get(&reason).copied().unwrap_or(0)
    }
}

/// The client's status, shared (clone it freely; [`AdsStatus::snapshot`] copies it out).
#[derive(Debug, Clone)]
pub struct AdsStatus {
    inner: Arc<Mutex<AdsSnapshot>>,
}

impl AdsStatus {
    fn new(address: String, types: &[String]) -> Self {
        let snapshot = AdsSnapshot {
            address,
            connected: false,
            types: types.iter().map(|t| (t.clone(), TypeStatus::default())).collect(),
            terminations: TerminationReason::ALL.iter().map(|r| (*r, 0)).collect(),
            consecutive_failures: 0,
            last_error: None,
            backoff: None,
        };
        Self {
            inner: Arc::new(Mutex::new(snapshot)),
        }
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> AdsSnapshot {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every subscribed type was ACKed at least once.
    pub fn ready(&self) -> bool {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).ready()
    }

    fn update<R>(&self, f: impl FnOnce(&mut AdsSnapshot) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// How a stream ended.
enum End {
    /// The connection could not be made.
    Connect(ChannelError),
    /// The stream ended; `status` is `None` for OK.
    Stream {
        status: Option<tonic::Status>,
        got_response: bool,
    },
}

/// The delta ADS client. Build it with [`AdsClient::new`], adjust with the `with_*` methods, keep
/// [`AdsClient::status`] for readiness and metrics, and drive [`AdsClient::run`].
pub struct AdsClient<T> {
    channel: Channel,
    node: Node,
    types: Vec<String>,
    timer: T,
    rng: fastrand::Rng,
    backoff: Backoff,
    max_message_size: usize,
    status: AdsStatus,
    /// Per type: name -> version of each accepted resource.
    versions: HashMap<String, HashMap<String, String>>,
}

impl<T: Timer> AdsClient<T> {
    /// A client for istiod at `channel`, identifying as `node`, subscribing (wildcard) to
    /// [`ADDRESS_TYPE`] and [`AUTHORIZATION_TYPE`], with [`Backoff::DEFAULT`] and a random seed.
    pub fn new(channel: Channel, node: Node, timer: T) -> Self {
        let types = vec![ADDRESS_TYPE.to_string(), AUTHORIZATION_TYPE.to_string()];
        let status = AdsStatus::new(channel.address().to_string(), &types);
        Self {
            channel,
            node,
            types,
            timer,
            rng: fastrand::Rng::new(),
            backoff: Backoff::DEFAULT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            status,
            versions: HashMap::new(),
        }
    }

    /// Sets the backoff.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the largest response accepted ([`DEFAULT_MAX_MESSAGE_SIZE`] unless set).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets the jitter's random generator (a seeded one makes the delays deterministic).
    pub fn with_rng(mut self, rng: fastrand::Rng) -> Self {
        self.rng = rng;
        self
    }

    /// Sets the subscribed types (wildcard each), replacing the default two.
    pub fn with_types(mut self, types: Vec<String>) -> Self {
        self.status = AdsStatus::new(self.channel.address().to_string(), &types);
        self.types = types;
        self
    }

    /// The shared status.
    pub fn status(&self) -> AdsStatus {
        self.status.clone()
    }

    /// The versions held for `type_url` (name -> version), as the next reconnect will announce them.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }

    /// Runs the client forever: connect, stream, reconnect. Drop the future to stop it.
    pub async fn run<H: XdsHandler>(&mut self, handler: &mut H) -> Infallible {
        let address = self.channel.address().to_string();
        loop {
            let end = self.stream_once(handler).await;
            let (reason, normal, error) = match &end {
                End::Connect(e) => {
                    tracing::warn!(istiod = %address, error = %e, "xDS: connecting to istiod failed");
                    (TerminationReason::ConnectionError, false, Some(e.to_string()))
                }
                End::Stream {
                    status: None,
                    got_response,
                } => {
                    tracing::info!(istiod = %address, code = ?Code::Ok, "xDS: istiod ended the stream");
                    (TerminationReason::Complete, *got_response, None)
                }
                End::Stream {
                    status: Some(s),
                    got_response: true,
                } if s.code() == Code::Unavailable => {
                    tracing::info!(istiod = %address, code = ?s.code(), message = s.message(),
                        "xDS: istiod closed the stream (max connection age); reconnecting");
                    (TerminationReason::Reconnect, true, None)
                }
                End::Stream { status: Some(s), .. } => {
                    tracing::warn!(istiod = %address, code = ?s.code(), message = s.message(),
                        "xDS: stream to istiod failed");
                    let text = format!("{}: gRPC status {:?}: {}", address, s.code(), s.message());
                    (TerminationReason::Error, false, Some(text))
                }
            };
            let got_response = matches!(end, End::Stream { got_response: true, .. });
            let failures = self.status.update(|s| {
                s.connected = false;
                *s.terminations.entry(reason).or_insert(0) += 1;
                if got_response {
                    s.consecutive_failures = 0;
                }
                if error.is_some() || !normal {
                    s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                }
                if let Some(text) = &error {
                    s.last_error = Some(text.clone());
                }
                s.consecutive_failures
            });
            if normal {
                continue;
            }
            let delay = self.backoff.delay(failures.max(1), &mut self.rng);
            tracing::info!(istiod = %address, ?delay, failures, "xDS: reconnecting after backoff");
            self.status.update(|s| s.backoff = Some(delay));
            self.timer.sleep_until(self.timer.now() + delay).await;
            self.status.update(|s| s.backoff = None);
        }
    }

    /// The initial request of `type_url` on a new stream: wildcard, the Node, the versions held.
    fn initial_request(&self, type_url: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.to_string(),
            initial_resource_versions: self.versions(type_url),
            ..Default::default()
        }
    }

    async fn stream_once<H: XdsHandler>(&mut self, handler: &mut H) -> End {
        let (service, connection) = match self.channel.connect(&self.timer).await {
            Ok(pair) => pair,
            Err(e) => return End::Connect(e),
        };
        let address = self.channel.address().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        for type_url in &self.types {
            // The receiver lives in `outbound` below: the send cannot fail.
            let _ = tx.send(self.initial_request(type_url));
        }
        let outbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut client = AggregatedDiscoveryServiceClient::with_origin(service, self.channel.origin())
            .max_decoding_message_size(self.max_message_size);
        let mut got_response = false;
        let stream = async {
            let response = client.delta_aggregated_resources(outbound).await?;
            self.status.update(|s| s.connected = true);
            tracing::info!(istiod = %address, "xDS: stream to istiod open");
            let mut inbound = response.into_inner();
            while let Some(message) = inbound.message().await? {
                got_response = true;
                let reply = self.on_response(handler, message);
                if tx.send(reply).is_err() {
                    break;
                }
            }
            Ok::<(), tonic::Status>(())
        };
        let result = match select(pin!(stream), connection).await {
            Either::Left((result, _)) => result,
            Either::Right((closed, _)) => Err(tonic::Status::unavailable(match closed {
                Ok(()) => format!("the connection to {address} closed"),
                Err(e) => e.to_string(),
            })),
        };
        End::Stream {
            status: result.err(),
            got_response,
        }
    }

    /// Applies one response and builds its ACK or NACK.
    fn on_response<H: XdsHandler>(
        &mut self,
        handler: &mut H,
        response: DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse {
            type_url,
            nonce,
            resources,
            removed_resources,
            ..
        } = response;
        let rejected = if self.types.contains(&type_url) {
            let names: Vec<(String, String)> = resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
            let removed = removed_resources.clone();
            let rejected = handler.apply(&type_url, resources, removed_resources);
            let bad: HashSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
            let held = self.versions.entry(type_url.clone()).or_default();
            for name in &removed {
                held.remove(name);
            }
            for (name, version) in names {
                if bad.contains(name.as_str()) {
                    held.remove(&name);
                } else {
                    held.insert(name, version);
                }
            }
            rejected
        } else {
            resources
                .iter()
                .map(|r| Rejected::new(r.name.clone(), format!("type {type_url} is not subscribed")))
                .collect()
        };
        let count = self.versions.get(&type_url).map_or(0, HashMap::len);
        let now = self.timer.system_now();
        let address = self.channel.address().to_string();
        let mut reply = DeltaDiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: nonce.clone(),
            ..Default::default()
        };
        if rejected.is_empty() {
            tracing::debug!(istiod = %address, type_url, nonce, resources = count, "xDS: ACK");
            self.status.update(|s| {
                if let Some(t) = s.types.get_mut(&type_url) {
                    t.acked = true;
                    t.last_ack_nonce = Some(nonce);
                    t.last_ack_at = Some(now);
                    t.resources = count;
                }
            });
        } else {
            let message = rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(istiod = %address, type_url, nonce, rejected = rejected.len(), %message, "xDS: NACK");
            reply.error_detail = Some(rpc::Status {
                code: INVALID_ARGUMENT,
                message: message.clone(),
                details: Vec::new(),
            });
            self.status.update(|s| {
                if let Some(t) = s.types.get_mut(&type_url) {
                    t.last_nack_nonce = Some(nonce);
                    t.last_nack = Some(message);
                    t.last_nack_at = Some(now);
                    t.resources = count;
                }
            });
        }
        reply
    }
}

impl<T> std::fmt::Debug for AdsClient<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsClient")
            .field("address", &self.channel.address().to_string())
            .field("types", &self.types)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceilings_double_up_to_the_cap() {
        let b = Backoff::DEFAULT;
        let ceilings: Vec<u64> = (1..=8).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
        assert_eq!(b.ceiling(u32::MAX), b.max);
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 1..=10 {
            assert!(b.delay(n, &mut rng) <= b.ceiling(n));
        }
    }
}
