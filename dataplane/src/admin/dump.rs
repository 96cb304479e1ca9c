//! `/config_dump`: the current snapshot and the certificates, as JSON.

use std::time::{Instant, SystemTime};

use meshwire_identity::manager::CertStatus;
use serde_json::{Map, Value, json};

use crate::watch::Snapshot;
use crate::xds::{GatewayAddress, Service, Workload};

/// A point in wall-clock time as RFC 3339 (UTC, `2025-01-31T12:00:00Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let time = time::OffsetDateTime::from(time)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| format!("<unprintable time: {e}>"))
}

/// The configuration dump of `snapshot` and `certificates`, as [`super::AdminHandler`] serves it on
/// `/config_dump`:
///
/// ```json
/// { "config": { "generation": 3, "source": "/etc/ztunnel/local.yaml", "loadedAt": "2025-01-31T12:00:00Z" },
///   "workloads": [ { "uid": "...", "name": "...", "namespace": "...", "spiffeId": "...", ... } ],
///   "services": [ { "name": "...", "namespace": "...", "hostname": "...", "vips": ["/10.0.0.1"], ... } ],
///   "policies": [ { "name": "...", "namespace": "...", "scope": "...", "action": "...", "rules": [...] } ],
///   "certificates": [ { "identity": "spiffe://...", "state": "Available", "expirationTime": "...", ... } ] }
/// ```
///
/// `now` and `wall_now` (the same instant, monotonic and wall-clock) turn the certificates' next
/// refresh into a wall-clock time.
pub fn config_dump(snapshot: &Snapshot, certificates: &[CertStatus], now: Instant, wall_now: SystemTime) -> Value {
    let state = &snapshot.state;
    json!({
        "config": {
            "generation": snapshot.generation,
            "source": snapshot.source.as_ref().map(|p| p.display().to_string()),
            "loadedAt": (snapshot.generation > 0).then(|| rfc3339(snapshot.loaded_at)),
        },
        "workloads": state.workloads().map(workload).collect::<Vec<_>>(),
        "services": state.services().map(service).collect::<Vec<_>>(),
        "policies": state.policies(),
        "certificates": certificates.iter().map(|c| certificate(c, now, wall_now)).collect::<Vec<_>>(),
    })
}

/// The buffer budgets of HBONE tunnels and the bytes held now, as `/config_dump` shows them under
/// `buffers` (bytes):
///
/// ```json
/// { "streamSendBuffer": 409600, "streamCopyBuffer": 262144, "streamLease": 671744,
///   "connectionBudget": 67108864, "processBudget": 1073741824, "processBuffered": 0,
///   "streamWindow": 4194304, "connectionWindow": 16777216,
///   "receiveBudget": 1073741824, "receiveLeased": 0 }
/// ```
///
/// `streamLease` is what one stream holds while it has bytes to forward (its send buffer plus its
/// largest copy buffer); `processBuffered` is what the leases of every tunnel, inbound and outbound,
/// hold now: an upper bound of the bytes buffered for peers. `connectionBudget` applies to inbound
/// connections (an outbound one holds at most its streams' leases); the windows bound what a peer
/// sends that the destination has not taken yet. They are the configured ones: each connection,
/// inbound and outbound, leases the part of its connection window above HTTP/2's 64 KiB default
/// from `receiveBudget` for its life and advertises only what it got; `receiveLeased` is what the
/// connections lease now.
pub fn buffers_dump(serve: &meshwire_hbone::server::ServeOptions) -> Value {
    json!({
        "streamSendBuffer": serve.settings.send_buffer(),
        "streamCopyBuffer": serve.copy.max_buffer.max(serve.copy.initial_buffer),
        "streamLease": serve.stream_lease(),
        "connectionBudget": serve.connection_buffer,
        "processBudget": serve.process_budget.limit(),
        "processBuffered": serve.process_budget.used(),
        "streamWindow": serve.settings.stream_window(),
        "connectionWindow": serve.settings.connection_window(),
        "receiveBudget": serve.receive_budget.limit(),
        "receiveLeased": serve.receive_budget.used(),
    })
}

fn gateway(gateway: Option<&GatewayAddress>) -> Value {
    match gateway {
        Some(g) => json!({ "destination": g.destination.to_string(), "hboneMtlsPort": g.hbone_mtls_port }),
        None => Value::Null,
    }
}

fn port_map(ports: &std::collections::BTreeMap<u16, u16>) -> Value {
    Value::Object(
        ports
            .iter()
            .map(|(port, target)| (port.to_string(), Value::from(*target)))
            .collect::<Map<_, _>>(),
    )
}

fn workload(w: &Workload) -> Value {
    json!({
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace(),
        "serviceAccount": w.service_account(),
        "trustDomain": w.trust_domain().to_string(),
        "spiffeId": w.spiffe_id().to_string(),
        "workloadIps": w.workload_ips,
        "protocol": w.protocol,
        "node": w.node,
        "network": w.network,
        "services": w.services.iter().map(|(key, ports)| (key.to_string(), port_map(ports))).collect::<Map<_, _>>(),
        "waypoint": gateway(w.waypoint.as_ref()),
        "networkGateway": gateway(w.network_gateway.as_ref()),
        "networkMode": w.network_mode,
        "hostname": w.hostname,
        "workloadName": w.workload_name,
        "workloadType": w.workload_type,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
        "locality": w.locality,
        "status": w.status,
        "nativeTunnel": w.native_tunnel,
        "applicationTunnel": w.application_tunnel.as_ref().map(|t| json!({ "protocol": t.protocol, "port": t.port })),
        "authorizationPolicies": w.authorization_policies,
        "capacity": w.capacity,
    })
}

fn service(s: &Service) -> Value {
    json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": s.vips,
        "ports": port_map(&s.ports),
        "subjectAltNames": s.subject_alt_names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "waypoint": gateway(s.waypoint.as_ref()),
    })
}

/// ztunnel's certificate states: `Available` (a valid certificate is in service), `Expired` (the
/// certificate in service expired and no new one came), `Initializing` (the first fetch is under
/// way), `Unavailable: <error>` (the last fetch failed and none is in service).
fn certificate(status: &CertStatus, now: Instant, wall_now: SystemTime) -> Value {
    let state = match (&status.not_after, &status.last_error) {
        (Some(_), _) if status.is_expired(wall_now) => "Expired".to_owned(),
        (Some(_), _) => "Available".to_owned(),
        (None, Some(error)) => format!("Unavailable: {error}"),
        (None, None) => "Initializing".to_owned(),
    };
    let next_refresh = status.next_refresh.map(|at| {
        let wall = match at.checked_duration_since(now) {
            Some(ahead) => wall_now + ahead,
            None => wall_now - now.saturating_duration_since(at),
        };
        rfc3339(wall)
    });
    json!({
        "identity": status.id.to_string(),
        "state": state,
        "expirationTime": status.not_after.map(rfc3339),
        "secondsToExpiry": status.not_after.map(|t| match t.duration_since(wall_now) {
            Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
        }),
        "nextRefresh": next_refresh,
        "pending": status.pending,
        "lastError": status.last_error,
    })
}

/// How many bytes of the dump [`ConfigDumpChunks`] gathers before it hands a chunk over.
pub const DUMP_CHUNK: usize = 32 * 1024;

/// Which part of the dump comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Buffers,
    Certificates,
    Config,
    Istio,
    Policies,
    Services,
    Workloads,
    End,
}

/// The configuration dump of [`config_dump`], serialised piece by piece: each `Iterator::next` gathers
/// one chunk of about [`DUMP_CHUNK`] bytes, the serialisation of whole workloads, services, policies
/// or certificates. The chunks together are byte for byte `serde_json::to_vec_pretty` of
/// [`config_dump`] (the same keys in the same order), but a dump of any size costs a chunk and one
/// item at a time, not the whole document: the admin listener writes each chunk to the connection
/// before it asks for the next.
pub struct ConfigDumpChunks {
    snapshot: std::sync::Arc<Snapshot>,
    /// The `buffers` section ([`buffers_dump`]), when the dump has one.
    buffers: Option<Value>,
    /// The `istio` section (istiod's xDS and CA), when the proxy is configured by istiod.
    istio: Option<Value>,
    certificates: Vec<Value>,
    part: Part,
    /// Whether the document's opening brace was written.
    opened: bool,
    /// The next item of the current part.
    index: usize,
    /// The uid of the last workload written (workloads are walked by uid, not by position).
    after_workload: Option<String>,
    /// The key of the last service written.
    after_service: Option<crate::xds::NamespacedHostname>,
    /// Serialises one item (kept to reuse its allocation).
    item: Vec<u8>,
}

impl std::fmt::Debug for ConfigDumpChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigDumpChunks")
            .field("generation", &self.snapshot.generation)
            .field("part", &self.part)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// [`config_dump`] of `snapshot` and `certificates` as chunks; see [`ConfigDumpChunks`].
pub fn config_dump_chunks(
    snapshot: std::sync::Arc<Snapshot>,
    certificates: &[CertStatus],
    now: Instant,
    wall_now: SystemTime,
) -> ConfigDumpChunks {
    ConfigDumpChunks {
        snapshot,
        buffers: None,
        istio: None,
        certificates: certificates.iter().map(|c| certificate(c, now, wall_now)).collect(),
        part: Part::Certificates,
        opened: false,
        index: 0,
        after_workload: None,
        after_service: None,
        item: Vec::new(),
    }
}

impl ConfigDumpChunks {
    /// The dump with a `buffers` section (the first key, as `serde_json` orders keys), as
    /// [`buffers_dump`] makes it.
    pub fn with_buffers(mut self, buffers: Value) -> Self {
        self.buffers = Some(buffers);
        self.part = Part::Buffers;
        self
    }

    /// The dump with an `istio` section (between `config` and `policies`, as `serde_json` orders
    /// keys): the state of istiod's xDS stream and CA.
    pub fn with_istio(mut self, istio: Value) -> Self {
        self.istio = Some(istio);
        self
    }

    /// Appends `value`, pretty-printed as `serde_json` does at `indent` spaces deep, to `out`.
    fn pretty(&mut self, value: &Value, indent: &[u8], out: &mut Vec<u8>) {
        self.item.clear();
        if serde_json::to_writer_pretty(&mut self.item, value).is_err() {
            // A `Value` always serialises; should it not, the dump stays valid JSON.
            self.item.clear();
            self.item.extend_from_slice(b"null");
        }
        // serde_json escapes newlines inside strings: each one here is between two lines.
        for &byte in &self.item {
            out.push(byte);
            if byte == b'\n' {
                out.extend_from_slice(indent);
            }
        }
    }

    /// The `index`th item of an array part, if there is one.
    fn array_item(&mut self, part: Part, index: usize) -> Option<Value> {
        let snapshot = std::sync::Arc::clone(&self.snapshot);
        let state = &snapshot.state;
        match part {
            Part::Certificates => self.certificates.get(index).cloned(),
            Part::Policies => state
                .policies()
                .get(index)
                .map(|p| serde_json::to_value(p).unwrap_or(Value::Null)),
            Part::Services => {
                let next = state.next_service(self.after_service.as_ref())?;
                self.after_service = Some(next.key());
                Some(service(next))
            }
            Part::Workloads => {
                let next = state.next_workload(self.after_workload.as_deref())?;
                self.after_workload = Some(next.uid.clone());
                Some(workload(next))
            }
            Part::Buffers | Part::Config | Part::Istio | Part::End => None,
        }
    }

    fn key(part: Part) -> &'static [u8] {
        match part {
            Part::Buffers => b"  \"buffers\": ",
            Part::Certificates => b"  \"certificates\": ",
            Part::Config => b"  \"config\": ",
            Part::Istio => b"  \"istio\": ",
            Part::Policies => b"  \"policies\": ",
            Part::Services => b"  \"services\": ",
            Part::Workloads => b"  \"workloads\": ",
            Part::End => b"",
        }
    }

    fn next_part(&self, part: Part) -> Part {
        match part {
            Part::Buffers => Part::Certificates,
            Part::Certificates => Part::Config,
            Part::Config if self.istio.is_some() => Part::Istio,
            Part::Config | Part::Istio => Part::Policies,
            Part::Policies => Part::Services,
            Part::Services => Part::Workloads,
            Part::Workloads | Part::End => Part::End,
        }
    }

    /// Appends the next piece (the head of a part, one item, or the end of a part) to `out`; `false`
    /// once the document is complete.
    fn step(&mut self, out: &mut Vec<u8>) -> bool {
        let part = self.part;
        if part == Part::End {
            return false;
        }
        if self.index == 0 {
            out.extend_from_slice(if std::mem::replace(&mut self.opened, true) {
                b",\n"
            } else {
                b"{\n"
            });
            out.extend_from_slice(Self::key(part));
        }
        if part == Part::Buffers {
            let buffers = self.buffers.take().unwrap_or(Value::Null);
            self.pretty(&buffers, b"  ", out);
            self.part = self.next_part(part);
            return true;
        }
        if part == Part::Istio {
            let istio = self.istio.take().unwrap_or(Value::Null);
            self.pretty(&istio, b"  ", out);
            self.part = self.next_part(part);
            return true;
        }
        if part == Part::Config {
            let snapshot = &self.snapshot;
            let config = json!({
                "generation": snapshot.generation,
                "source": snapshot.source.as_ref().map(|p| p.display().to_string()),
                "loadedAt": (snapshot.generation > 0).then(|| rfc3339(snapshot.loaded_at)),
            });
            self.pretty(&config, b"  ", out);
            self.part = self.next_part(part);
            return true;
        }
        match self.array_item(part, self.index) {
            Some(item) => {
                out.extend_from_slice(if self.index == 0 { b"[\n    " } else { b",\n    " });
                self.pretty(&item, b"    ", out);
                self.index += 1;
            }
            None => {
                out.extend_from_slice(if self.index == 0 { b"[]" } else { b"\n  ]" });
                self.index = 0;
                self.part = self.next_part(part);
                if self.part == Part::End {
                    out.extend_from_slice(b"\n}");
                }
            }
        }
        true
    }
}

impl Iterator for ConfigDumpChunks {
    type Item = bytes::Bytes;

    fn next(&mut self) -> Option<bytes::Bytes> {
        let mut chunk = Vec::with_capacity(DUMP_CHUNK + DUMP_CHUNK / 4);
        while chunk.len() < DUMP_CHUNK && self.step(&mut chunk) {}
        (!chunk.is_empty()).then(|| bytes::Bytes::from(chunk))
    }
}
