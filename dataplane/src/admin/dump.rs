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
/// `/config_dump`, in ztunnel's shape (what `istioctl ztunnel-config` reads), meshwire's own
/// sections under `meshwire`:
///
/// ```json
/// { "certificates": [ { "identity": "spiffe://...", "state": "Available",
///                       "certChain": [ { "pem": "<base64 of the PEM>", "serialNumber": "...",
///                                        "validFrom": "...", "expirationTime": "..." } ],
///                       "rootCerts": [ ... ],
///                       "meshwire": { "expirationTime": "...", "secondsToExpiry": 3600, ... } } ],
///   "config": { ztunnel's configuration keys },
///   "meshwire": { "config": { "generation": 3, "source": "/etc/ztunnel/local.yaml", "loadedAt": "..." },
///                 "buffers": { ... }, "istio": { ... } },
///   "policies": [ ... ], "services": [ ... ], "stagedServices": {},
///   "staticConfig": { the local configuration file, or empty lists },
///   "version": { "version": "...", "gitRevision": "...", ... },
///   "workloadState": { in-pod mode: each pod served },
///   "workloads": [ ... ] }
/// ```
///
/// `now` and `wall_now` (the same instant, monotonic and wall-clock) turn the certificates' next
/// refresh into a wall-clock time. This is the dump without the optional sections (see
/// [`ConfigDumpChunks`]'s builders).
pub fn config_dump(snapshot: &Snapshot, certificates: &[CertStatus], now: Instant, wall_now: SystemTime) -> Value {
    let state = &snapshot.state;
    json!({
        "certificates": certificates.iter().map(|c| certificate(c, now, wall_now)).collect::<Vec<_>>(),
        "config": Value::Object(Map::new()),
        "meshwire": { "config": generation(snapshot) },
        "policies": state.policies(),
        "services": state.services().map(|s| service(s, state)).collect::<Vec<_>>(),
        "stagedServices": Value::Object(Map::new()),
        "staticConfig": empty_static_config(),
        "version": crate::config::BuildInfo::current(),
        "workloads": state.workloads().map(workload).collect::<Vec<_>>(),
    })
}

/// The generation of the configuration in force, where it came from and when.
fn generation(snapshot: &Snapshot) -> Value {
    json!({
        "generation": snapshot.generation,
        "source": snapshot.source.as_ref().map(|p| p.display().to_string()),
        "loadedAt": (snapshot.generation > 0).then(|| rfc3339(snapshot.loaded_at)),
    })
}

/// ztunnel's `staticConfig` when there is no local configuration: an empty one.
pub fn empty_static_config() -> Value {
    json!({ "workloads": [], "policies": [], "services": [] })
}

/// The largest local configuration file `/config_dump` shows as `staticConfig`: a larger one is
/// left out (`meshwire.staticConfigOmitted` says why), since it is parsed whole for each dump,
/// where the rest of the dump is streamed.
pub const STATIC_CONFIG_LIMIT: u64 = 1024 * 1024;

/// ztunnel's `staticConfig`: the local configuration as written (YAML read into JSON), when it is
/// a file of at most [`STATIC_CONFIG_LIMIT`] bytes or inline; else the empty one and why.
pub fn static_config(source: Option<&crate::config::LocalConfigSource>) -> (Value, Option<String>) {
    use crate::config::LocalConfigSource;
    let text = match source {
        None => return (empty_static_config(), None),
        Some(LocalConfigSource::Inline(yaml)) => yaml.clone(),
        Some(LocalConfigSource::File(path)) => {
            let read = std::fs::metadata(path).and_then(|meta| {
                if meta.len() > STATIC_CONFIG_LIMIT {
                    Err(std::io::Error::other(format!(
                        "{} bytes, above the {STATIC_CONFIG_LIMIT} shown",
                        meta.len()
                    )))
                } else {
                    std::fs::read_to_string(path)
                }
            });
            match read {
                Ok(text) => text,
                Err(error) => return (empty_static_config(), Some(format!("{}: {error}", path.display()))),
            }
        }
    };
    match serde_yaml_ng::from_str::<Value>(&text) {
        Ok(Value::Null) => (empty_static_config(), None),
        Ok(value) => (value, None),
        Err(error) => (empty_static_config(), Some(format!("the local configuration: {error}"))),
    }
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

/// A service as ztunnel dumps it, with its `endpoints` (by workload uid: the workloads that name it,
/// and their port maps for it). [`ConfigDumpChunks`] streams the endpoints one at a time.
fn service(s: &Service, state: &crate::state::State) -> Value {
    let key = s.key();
    let endpoints = state
        .workloads_of_service(&key)
        .map(|w| (w.uid.clone(), endpoint(w, &key)))
        .collect::<Map<_, _>>();
    let mut value = service_fields(s);
    if let Value::Object(fields) = &mut value {
        fields.insert("endpoints".to_owned(), Value::Object(endpoints));
    }
    value
}

/// One endpoint of the service `key`: the workload, and its port map for the service.
fn endpoint(w: &Workload, key: &crate::xds::NamespacedHostname) -> Value {
    let ports = w
        .services
        .get(key)
        .map(port_map)
        .unwrap_or_else(|| Value::Object(Map::new()));
    json!({ "workloadUid": w.uid, "service": key.to_string(), "port": ports })
}

/// A service's fields but its endpoints.
fn service_fields(s: &Service) -> Value {
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

/// One certificate as ztunnel dumps it: the PEM (base64 of the PEM text, as ztunnel writes it),
/// the serial number in decimal, the validity in RFC 3339.
fn cert_dump(der: &rustls_pki_types::CertificateDer<'_>) -> Value {
    use base64::Engine as _;
    match meshwire_identity::svid::certificate_summary(der) {
        Ok(summary) => json!({
            "pem": base64::engine::general_purpose::STANDARD.encode(summary.pem),
            "serialNumber": summary.serial,
            "validFrom": rfc3339(summary.not_before),
            "expirationTime": rfc3339(summary.not_after),
        }),
        Err(error) => json!({ "pem": format!("<unreadable certificate: {error}>") }),
    }
}

/// ztunnel's certificate entry: `identity`, `state` (`Available`: a valid certificate is in
/// service; `Initializing`: the first fetch is under way; `Unavailable: <error>`: the last fetch
/// failed and none is in service; meshwire adds `Expired`: the certificate in service expired and
/// no new one came), `certChain` (leaf first) and `rootCerts`; meshwire's own facts under
/// `meshwire` (expiry, next refresh, a fetch pending, the last error).
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
    let (chain, roots) = match &status.current {
        Some(current) => (
            current.svid().chain().iter().map(cert_dump).collect::<Vec<_>>(),
            current
                .bundles()
                .iter()
                .flat_map(|bundle| bundle.roots().iter().map(cert_dump))
                .collect::<Vec<_>>(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    json!({
        "identity": status.id.to_string(),
        "state": state,
        "certChain": chain,
        "rootCerts": roots,
        "meshwire": {
            "expirationTime": status.not_after.map(rfc3339),
            "secondsToExpiry": status.not_after.map(|t| match t.duration_since(wall_now) {
                Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
            }),
            "nextRefresh": next_refresh,
            "pending": status.pending,
            "lastError": status.last_error,
        },
    })
}

/// How many bytes of the dump [`ConfigDumpChunks`] gathers before it hands a chunk over.
pub const DUMP_CHUNK: usize = 32 * 1024;

/// Which part of the dump comes next (in the order of the keys, as `serde_json` sorts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Certificates,
    Config,
    Meshwire,
    Policies,
    Services,
    StagedServices,
    StaticConfig,
    Version,
    WorkloadState,
    Workloads,
    End,
}

/// The configuration dump of [`config_dump`], serialised piece by piece: each `Iterator::next` gathers
/// one chunk of about [`DUMP_CHUNK`] bytes, the serialisation of whole workloads, services, policies
/// or certificates. The chunks together are byte for byte `serde_json::to_vec_pretty` of
/// [`config_dump`] with the same sections (the same keys in the same order), but a dump of any size
/// costs a chunk and one item at a time, not the whole document: the admin listener writes each
/// chunk to the connection before it asks for the next.
pub struct ConfigDumpChunks {
    snapshot: std::sync::Arc<Snapshot>,
    /// `meshwire.buffers` ([`buffers_dump`]), when the dump has it.
    buffers: Option<Value>,
    /// `meshwire.istio` (istiod's xDS and CA), when the proxy is configured by istiod.
    istio: Option<Value>,
    /// ztunnel's `config` ([`crate::config::ztunnel_config`]).
    config: Option<Value>,
    /// ztunnel's `staticConfig`, and why it is empty when it was left out.
    static_config: Option<(Value, Option<String>)>,
    /// ztunnel's `workloadState` (in-pod mode).
    workload_state: Option<Value>,
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
    /// The service being written, whose endpoints are streamed one at a time.
    open_service: Option<OpenService>,
}

/// A service of the dump whose `endpoints` (its first key) are being written.
struct OpenService {
    key: crate::xds::NamespacedHostname,
    /// The next endpoint, by position in the service's endpoints (ordered by uid).
    next: usize,
    /// What follows the endpoints: the service's other fields and its closing brace.
    tail: Vec<u8>,
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
        config: None,
        static_config: None,
        workload_state: None,
        certificates: certificates.iter().map(|c| certificate(c, now, wall_now)).collect(),
        part: Part::Certificates,
        opened: false,
        index: 0,
        after_workload: None,
        after_service: None,
        item: Vec::new(),
        open_service: None,
    }
}

impl ConfigDumpChunks {
    /// The dump with `meshwire.buffers`, as [`buffers_dump`] makes it.
    pub fn with_buffers(mut self, buffers: Value) -> Self {
        self.buffers = Some(buffers);
        self
    }

    /// The dump with `meshwire.istio`: the state of istiod's xDS stream and CA.
    pub fn with_istio(mut self, istio: Value) -> Self {
        self.istio = Some(istio);
        self
    }

    /// The dump with ztunnel's `config` ([`crate::config::ztunnel_config`]); else `{}`.
    pub fn with_config(mut self, config: Value) -> Self {
        self.config = Some(config);
        self
    }

    /// The dump with ztunnel's `staticConfig` as [`static_config`] reads it; else the empty one.
    pub fn with_static_config(mut self, static_config: (Value, Option<String>)) -> Self {
        self.static_config = Some(static_config);
        self
    }

    /// The dump with ztunnel's `workloadState` (in-pod mode: the pods served).
    pub fn with_workload_state(mut self, state: Value) -> Self {
        self.workload_state = Some(state);
        self
    }

    /// The `meshwire` section: the configuration's generation, and what the builders added.
    fn meshwire(&mut self) -> Value {
        let mut section = Map::new();
        section.insert("config".to_owned(), generation(&self.snapshot));
        if let Some(buffers) = self.buffers.take() {
            section.insert("buffers".to_owned(), buffers);
        }
        if let Some(istio) = self.istio.take() {
            section.insert("istio".to_owned(), istio);
        }
        if let Some((_, Some(why))) = &self.static_config {
            section.insert("staticConfigOmitted".to_owned(), Value::from(why.as_str()));
        }
        Value::Object(section)
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
            Part::Workloads => {
                let next = state.next_workload(self.after_workload.as_deref())?;
                self.after_workload = Some(next.uid.clone());
                Some(workload(next))
            }
            _ => None,
        }
    }

    fn key(part: Part) -> &'static [u8] {
        match part {
            Part::Certificates => b"  \"certificates\": ",
            Part::Config => b"  \"config\": ",
            Part::Meshwire => b"  \"meshwire\": ",
            Part::Policies => b"  \"policies\": ",
            Part::Services => b"  \"services\": ",
            Part::StagedServices => b"  \"stagedServices\": ",
            Part::StaticConfig => b"  \"staticConfig\": ",
            Part::Version => b"  \"version\": ",
            Part::WorkloadState => b"  \"workloadState\": ",
            Part::Workloads => b"  \"workloads\": ",
            Part::End => b"",
        }
    }

    fn next_part(&self, part: Part) -> Part {
        match part {
            Part::Certificates => Part::Config,
            Part::Config => Part::Meshwire,
            Part::Meshwire => Part::Policies,
            Part::Policies => Part::Services,
            Part::Services => Part::StagedServices,
            Part::StagedServices => Part::StaticConfig,
            Part::StaticConfig => Part::Version,
            Part::Version if self.workload_state.is_some() => Part::WorkloadState,
            Part::Version | Part::WorkloadState => Part::Workloads,
            Part::Workloads | Part::End => Part::End,
        }
    }

    /// The value of a part that is one value rather than an array, `None` for an array part.
    fn single(&mut self, part: Part) -> Option<Value> {
        Some(match part {
            Part::Config => self.config.take().unwrap_or_else(|| Value::Object(Map::new())),
            Part::Meshwire => self.meshwire(),
            Part::StagedServices => Value::Object(Map::new()),
            Part::StaticConfig => match self.static_config.take() {
                Some((value, _)) => value,
                None => empty_static_config(),
            },
            Part::Version => serde_json::to_value(crate::config::BuildInfo::current()).unwrap_or(Value::Null),
            Part::WorkloadState => self.workload_state.take().unwrap_or(Value::Null),
            Part::Certificates | Part::Policies | Part::Services | Part::Workloads | Part::End => return None,
        })
    }

    /// One piece of the `services` part: a service's head and the key of its endpoints, one
    /// endpoint, the end of its endpoints with the rest of the service, or the end of the part.
    /// Written as `serde_json` pretty-prints [`service`] (`endpoints` is its first key).
    fn service_step(&mut self, out: &mut Vec<u8>) {
        let snapshot = std::sync::Arc::clone(&self.snapshot);
        let state = &snapshot.state;
        if let Some(mut open) = self.open_service.take() {
            match state.endpoint_of_service(&open.key, open.next) {
                Some(w) => {
                    out.extend_from_slice(if open.next == 0 { b"{\n        " } else { b",\n        " });
                    out.extend_from_slice(serde_json::to_string(&w.uid).unwrap_or_default().as_bytes());
                    out.extend_from_slice(b": ");
                    self.pretty(&endpoint(w, &open.key), b"        ", out);
                    open.next += 1;
                    self.open_service = Some(open);
                }
                None => {
                    out.extend_from_slice(if open.next == 0 { b"{}" } else { b"\n      }" });
                    out.extend_from_slice(&open.tail);
                    self.index += 1;
                }
            }
            return;
        }
        match state.next_service(self.after_service.as_ref()) {
            Some(next) => {
                self.after_service = Some(next.key());
                out.extend_from_slice(if self.index == 0 { b"[\n    " } else { b",\n    " });
                out.extend_from_slice(b"{\n      \"endpoints\": ");
                let mut fields = Vec::new();
                self.pretty(&service_fields(next), b"    ", &mut fields);
                // `{\n      "hostname": ..\n    }` without its opening brace, after a comma.
                let mut tail = b",\n      ".to_vec();
                tail.extend_from_slice(fields.get(b"{\n      ".len()..).unwrap_or_default());
                self.open_service = Some(OpenService {
                    key: next.key(),
                    next: 0,
                    tail,
                });
            }
            None => {
                out.extend_from_slice(if self.index == 0 { b"[]" } else { b"\n  ]" });
                self.index = 0;
                self.part = self.next_part(Part::Services);
            }
        }
    }

    /// Appends the next piece (the head of a part, one item, or the end of a part) to `out`; `false`
    /// once the document is complete.
    fn step(&mut self, out: &mut Vec<u8>) -> bool {
        let part = self.part;
        if part == Part::End {
            return false;
        }
        if self.index == 0 && self.open_service.is_none() {
            out.extend_from_slice(if std::mem::replace(&mut self.opened, true) {
                b",\n"
            } else {
                b"{\n"
            });
            out.extend_from_slice(Self::key(part));
        }
        if let Some(value) = self.single(part) {
            self.pretty(&value, b"  ", out);
            self.part = self.next_part(part);
            if self.part == Part::End {
                out.extend_from_slice(b"\n}");
            }
            return true;
        }
        if part == Part::Services {
            self.service_step(out);
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
