//! A mesh served by a fake istiod: the resources istiod would send for a local configuration, and
//! an [`Istiod`] that serves them to every proxy that subscribes, pushes changes to all of them and
//! issues their certificates.
//!
//! [`resources`] is the inverse of the proxy's conversion (`meshwire_dataplane::istio`): a
//! [`LocalConfig`] becomes the `Address` and `Authorization` resources istiod would send, named as
//! istiod names them (a workload by its uid, a service `<namespace>/<hostname>`, a policy
//! `<namespace>/<name>`). Whole-proxy tests write their mesh once, as YAML, and serve it either way.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use meshwire_control::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use meshwire_control::proto::istio::security as ps;
use meshwire_control::proto::istio::workload as pw;
use meshwire_dataplane::rbac::{Authorization, RbacAction, RbacMatch, RbacScope, ServiceAccountMatch, StringMatch};
use meshwire_dataplane::xds::{
    GatewayAddress, GatewayDestination, HealthStatus, LocalConfig, NetworkMode, Protocol, Service, TunnelProtocol,
    Workload,
};
use meshwire_testkit::istiod::{self, CaRequest, FakeIstiod};
use prost::Message;
use tokio::sync::broadcast;

/// The type URL of workloads and services.
pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
/// The type URL of policies.
pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";

/// One resource as istiod sends it: its name and its encoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Named {
    /// The resource name.
    pub name: String,
    /// The message, in an `Any` with its type URL.
    pub any: prost_types::Any,
}

/// The resources of a mesh, per type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// `istio.workload.Address`: workloads, then services.
    pub addresses: Vec<Named>,
    /// `istio.security.Authorization`.
    pub policies: Vec<Named>,
}

fn any(type_url: &str, bytes: Vec<u8>) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.to_owned(),
        value: bytes,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn gateway(gateway: &GatewayAddress) -> pw::GatewayAddress {
    let destination = match &gateway.destination {
        GatewayDestination::Address(address) => pw::gateway_address::Destination::Address(pw::NetworkAddress {
            network: address.network.clone(),
            address: ip_bytes(address.address),
            length: None,
        }),
        GatewayDestination::Hostname(host) => pw::gateway_address::Destination::Hostname(pw::NamespacedHostname {
            namespace: host.namespace.clone(),
            hostname: host.hostname.clone(),
        }),
        other => panic!("a gateway destination this test kit does not know: {other:?}"),
    };
    pw::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: u32::from(gateway.hbone_mtls_port),
    }
}

fn ports(map: &std::collections::BTreeMap<u16, u16>) -> Vec<pw::Port> {
    map.iter()
        .map(|(service, target)| pw::Port {
            service_port: u32::from(*service),
            target_port: u32::from(*target),
            app_protocol: 0,
        })
        .collect()
}

/// The `Workload` message istiod would send for `w`.
pub fn workload(w: &Workload) -> pw::Workload {
    let workload_type = match w.workload_type.as_str() {
        "deployment" => pw::WorkloadType::Deployment,
        "cronjob" => pw::WorkloadType::Cronjob,
        "job" => pw::WorkloadType::Job,
        _ => pw::WorkloadType::Pod,
    };
    pw::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace().to_owned(),
        addresses: w.workload_ips.iter().map(|ip| ip_bytes(*ip)).collect(),
        hostname: w.hostname.clone(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            Protocol::Hbone => pw::TunnelProtocol::Hbone as i32,
            _ => pw::TunnelProtocol::None as i32,
        },
        trust_domain: w.trust_domain().to_string(),
        service_account: w.service_account().to_owned(),
        waypoint: w.waypoint.as_ref().map(gateway),
        network_gateway: w.network_gateway.as_ref().map(gateway),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: workload_type as i32,
        workload_name: w.workload_name.clone(),
        native_tunnel: w.native_tunnel,
        application_tunnel: w.application_tunnel.as_ref().map(|t| pw::ApplicationTunnel {
            protocol: match t.protocol {
                TunnelProtocol::Proxy => pw::application_tunnel::Protocol::Proxy as i32,
                _ => pw::application_tunnel::Protocol::None as i32,
            },
            port: t.port.map_or(0, u32::from),
        }),
        services: w
            .services
            .iter()
            .map(|(key, map)| (key.to_string(), pw::PortList { ports: ports(map) }))
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            HealthStatus::Unhealthy => pw::WorkloadStatus::Unhealthy as i32,
            _ => pw::WorkloadStatus::Healthy as i32,
        },
        cluster_id: w.cluster_id.clone(),
        locality: Some(pw::Locality {
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
            subzone: w.locality.subzone.clone(),
        }),
        network_mode: match w.network_mode {
            NetworkMode::HostNetwork => pw::NetworkMode::HostNetwork as i32,
            _ => pw::NetworkMode::Standard as i32,
        },
        extensions: Vec::new(),
        capacity: Some(w.capacity),
    }
}

/// The `Service` message istiod would send for `s`.
pub fn service(s: &Service) -> pw::Service {
    pw::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|vip| pw::NetworkAddress {
                network: vip.network.clone(),
                address: ip_bytes(vip.address),
                length: None,
            })
            .collect(),
        ports: ports(&s.ports),
        subject_alt_names: s.subject_alt_names.iter().map(ToString::to_string).collect(),
        waypoint: s.waypoint.as_ref().map(gateway),
        ..Default::default()
    }
}

fn string_match(m: &StringMatch) -> ps::StringMatch {
    use ps::string_match::MatchType;
    let kind = match m {
        StringMatch::Exact(v) => MatchType::Exact(v.clone()),
        StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
        StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
        StringMatch::Presence => MatchType::Presence(()),
        other => panic!("a string match this test kit does not know: {other:?}"),
    };
    ps::StringMatch { match_type: Some(kind) }
}

fn net(n: &ipnet::IpNet) -> ps::Address {
    ps::Address {
        address: ip_bytes(n.addr()),
        length: u32::from(n.prefix_len()),
    }
}

fn account(m: &ServiceAccountMatch) -> ps::ServiceAccountMatch {
    ps::ServiceAccountMatch {
        namespace: m.namespace.clone(),
        service_account: m.service_account.clone(),
    }
}

fn rbac_match(m: &RbacMatch) -> ps::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match).collect();
    let nets = |v: &[ipnet::IpNet]| v.iter().map(net).collect();
    let portlist = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    ps::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: portlist(&m.destination_ports),
        not_destination_ports: portlist(&m.not_destination_ports),
        service_accounts: m.service_accounts.iter().map(account).collect(),
        not_service_accounts: m.not_service_accounts.iter().map(account).collect(),
        extensions: Vec::new(),
    }
}

/// The `Authorization` message istiod would send for `p`.
pub fn authorization(p: &Authorization) -> ps::Authorization {
    ps::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            RbacScope::Namespace => ps::Scope::Namespace as i32,
            RbacScope::WorkloadSelector => ps::Scope::WorkloadSelector as i32,
            _ => ps::Scope::Global as i32,
        },
        action: match p.action {
            RbacAction::Deny => ps::Action::Deny as i32,
            _ => ps::Action::Allow as i32,
        },
        rules: p
            .rules
            .iter()
            .map(|clauses| ps::Rule {
                clauses: clauses
                    .iter()
                    .map(|matches| ps::Clause {
                        matches: matches.iter().map(rbac_match).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: p.dry_run,
        extensions: Vec::new(),
    }
}

/// The resources istiod would send for `config`.
pub fn resources(config: &LocalConfig) -> Resources {
    let address = |payload: pw::address::Type| any(ADDRESS, pw::Address { r#type: Some(payload) }.encode_to_vec());
    let mut addresses: Vec<Named> = config
        .workloads
        .iter()
        .map(|w| Named {
            name: w.uid.clone(),
            any: address(pw::address::Type::Workload(workload(w))),
        })
        .collect();
    addresses.extend(config.services.iter().map(|s| Named {
        name: s.key().to_string(),
        any: address(pw::address::Type::Service(service(s))),
    }));
    let policies = config
        .policies
        .iter()
        .map(|p| Named {
            name: p.key(),
            any: any(AUTHORIZATION, authorization(p).encode_to_vec()),
        })
        .collect();
    Resources { addresses, policies }
}

/// What every stream is told: a change (type URL, resources added or changed, names removed), or
/// to end with a status.
#[derive(Clone)]
enum Push {
    Change(String, Vec<Named>, Vec<String>),
    End(tonic::Code, String),
}

struct Served {
    resources: Resources,
    /// ACK or NACK of each response, in order: (type URL, error detail message if a NACK).
    answers: Vec<(String, Option<String>)>,
    /// Per subscription: its type URL and how many resource versions it said it held.
    resumes: Vec<(String, usize)>,
    /// Per response: its type URL and how many resources it carried.
    sent: Vec<(String, usize)>,
    streams: usize,
    nonce: u64,
}

/// A fake istiod serving one mesh to every proxy, on a runtime of its own (whole-proxy tests are
/// synchronous): each stream gets every resource of each type it subscribes to, then every change
/// [`Istiod::push`]es. Its CA issues certificates for any identity (see [`FakeIstiod`]).
pub struct Istiod {
    runtime: tokio::runtime::Runtime,
    fake: Arc<FakeIstiod>,
    served: Arc<Mutex<Served>>,
    pushes: broadcast::Sender<Push>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Istiod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Istiod")
            .field("address", &self.fake.address())
            .finish_non_exhaustive()
    }
}

impl Istiod {
    /// Starts serving `config`.
    pub fn start(config: &LocalConfig) -> Istiod {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let fake = Arc::new(runtime.block_on(FakeIstiod::start()));
        let served = Arc::new(Mutex::new(Served {
            resources: resources(config),
            answers: Vec::new(),
            resumes: Vec::new(),
            sent: Vec::new(),
            streams: 0,
            nonce: 0,
        }));
        let (pushes, _) = broadcast::channel(64);
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("root-cert.pem"), fake.root_pem()).expect("root file");
        std::fs::write(dir.path().join("istio-token"), "test-token\n").expect("token file");
        let (f, s, p) = (Arc::clone(&fake), Arc::clone(&served), pushes.clone());
        runtime.spawn(async move {
            loop {
                let stream = f.next_stream().await;
                tokio::spawn(serve(stream, Arc::clone(&s), p.subscribe()));
            }
        });
        Istiod {
            runtime,
            fake,
            served,
            pushes,
            dir,
        }
    }

    /// istiod's address.
    pub fn address(&self) -> SocketAddr {
        self.fake.address()
    }

    /// The file holding the root that authenticates istiod (and signs the certificates it issues).
    pub fn root_file(&self) -> PathBuf {
        self.dir.path().join("root-cert.pem")
    }

    /// A root unrelated to istiod's certificate, PEM.
    pub fn other_root_pem(&self) -> String {
        self.fake.other_root_pem()
    }

    /// The token file the proxies send.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("istio-token")
    }

    /// The environment of a proxy that istiod configures and certifies, as ztunnel's DaemonSet sets
    /// it (the pod's own names included).
    pub fn env(&self, pod: &str, instance_ip: IpAddr) -> Vec<(String, String)> {
        istiod::proxy_env(self.address(), &self.root_file(), &self.token_file(), pod, instance_ip)
    }

    /// Sends `resources` of `type_url` (added or changed) and the removal of `removed` to every
    /// stream, and serves them to the streams to come.
    pub fn push(&self, type_url: &str, resources: Vec<Named>, removed: Vec<String>) {
        {
            let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
            let list = match type_url {
                ADDRESS => &mut served.resources.addresses,
                _ => &mut served.resources.policies,
            };
            let replaced: std::collections::HashSet<&str> = removed
                .iter()
                .map(String::as_str)
                .chain(resources.iter().map(|n| n.name.as_str()))
                .collect();
            list.retain(|r| !replaced.contains(r.name.as_str()));
            list.extend(resources.iter().cloned());
        }
        let _ = self.pushes.send(Push::Change(type_url.to_owned(), resources, removed));
    }

    /// Ends every open stream with `code` (UNAVAILABLE is what istiod sends at MaxConnectionAge) and,
    /// with `refuse`, closes every new connection from now on, as an unreachable istiod would.
    pub fn disconnect(&self, code: tonic::Code, refuse: bool) {
        self.fake.refuse_connections(refuse);
        let _ = self.pushes.send(Push::End(code, "closed by the test".to_owned()));
    }

    /// Serves new connections again after [`Istiod::disconnect`].
    pub fn accept_again(&self) {
        self.fake.refuse_connections(false);
    }

    /// The `initial_resource_versions` of every subscription received, per type URL, in order.
    pub fn resumes(&self) -> Vec<(String, usize)> {
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resumes
            .clone()
    }

    /// How many resources were sent in all, per response, in order: (type URL, count).
    pub fn sent(&self) -> Vec<(String, usize)> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner).sent.clone()
    }

    /// Pushes the difference between what is served and `config`.
    pub fn serve(&self, config: &LocalConfig) {
        let next = resources(config);
        let current = self
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resources
            .clone();
        for (type_url, now, then) in [
            (ADDRESS, &next.addresses, &current.addresses),
            (AUTHORIZATION, &next.policies, &current.policies),
        ] {
            let served: std::collections::HashMap<&str, &Named> = then.iter().map(|t| (t.name.as_str(), t)).collect();
            let wanted: std::collections::HashSet<&str> = now.iter().map(|n| n.name.as_str()).collect();
            let changed: Vec<Named> = now
                .iter()
                .filter(|n| served.get(n.name.as_str()) != Some(n))
                .cloned()
                .collect();
            let removed: Vec<String> = then
                .iter()
                .filter(|t| !wanted.contains(t.name.as_str()))
                .map(|t| t.name.clone())
                .collect();
            if !changed.is_empty() || !removed.is_empty() {
                self.push(type_url, changed, removed);
            }
        }
    }

    /// The ACKs and NACKs received so far: (type URL, the NACK's message or `None` for an ACK).
    pub fn answers(&self) -> Vec<(String, Option<String>)> {
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .answers
            .clone()
    }

    /// How many ADS streams were opened.
    pub fn streams(&self) -> usize {
        self.served.lock().unwrap_or_else(PoisonError::into_inner).streams
    }

    /// The certificate requests received so far.
    pub fn ca_requests(&self) -> Vec<CaRequest> {
        self.fake.ca_requests()
    }

    /// Waits until `check` holds of the answers, up to `within`; returns them.
    pub fn wait_answers(
        &self,
        within: Duration,
        check: impl Fn(&[(String, Option<String>)]) -> bool,
    ) -> Vec<(String, Option<String>)> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let answers = self.answers();
            if check(&answers) || std::time::Instant::now() >= deadline {
                return answers;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `f` on istiod's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

fn next_nonce(served: &Mutex<Served>) -> String {
    let mut served = served.lock().unwrap_or_else(PoisonError::into_inner);
    served.nonce += 1;
    format!("n{}", served.nonce)
}

fn respond(
    stream: &istiod::StreamHandle,
    served: &Mutex<Served>,
    type_url: &str,
    resources: Vec<Named>,
    removed: Vec<String>,
) {
    let nonce = next_nonce(served);
    served
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .sent
        .push((type_url.to_owned(), resources.len()));
    let items = resources
        .into_iter()
        .map(|n| {
            let version = format!("{:08x}", crc32fast::hash(&n.any.value));
            (n.name, version, n.any)
        })
        .collect();
    stream.send(istiod::response(type_url, &nonce, items, removed));
}

/// Serves one stream: the initial resources of each type the client subscribes to, the ACKs and
/// NACKs it sends, and every push.
async fn serve(mut stream: istiod::StreamHandle, served: Arc<Mutex<Served>>, mut pushes: broadcast::Receiver<Push>) {
    served.lock().unwrap_or_else(PoisonError::into_inner).streams += 1;
    loop {
        tokio::select! {
            request = stream.recv() => {
                let Some(request) = request else { return };
                on_request(&stream, &served, request);
            }
            push = pushes.recv() => {
                match push {
                    Ok(Push::Change(type_url, resources, removed)) => respond(&stream, &served, &type_url, resources, removed),
                    Ok(Push::End(code, message)) => {
                        stream.close(code, &message);
                        return;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

fn on_request(stream: &istiod::StreamHandle, served: &Mutex<Served>, request: DeltaDiscoveryRequest) {
    if request.response_nonce.is_empty() {
        // A subscription: everything of that type, minus what the client says it holds already.
        let all = {
            let served = served.lock().unwrap_or_else(PoisonError::into_inner);
            match request.type_url.as_str() {
                ADDRESS => served.resources.addresses.clone(),
                _ => served.resources.policies.clone(),
            }
        };
        let held = &request.initial_resource_versions;
        served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resumes
            .push((request.type_url.clone(), held.len()));
        // What the client holds that is gone is removed, as istiod does on a resumed stream.
        let removed: Vec<String> = held
            .keys()
            .filter(|name| !all.iter().any(|n| &n.name == *name))
            .cloned()
            .collect();
        let fresh: Vec<Named> = all
            .into_iter()
            .filter(|n| held.get(&n.name) != Some(&format!("{:08x}", crc32fast::hash(&n.any.value))))
            .collect();
        respond(stream, served, &request.type_url, fresh, removed);
    } else {
        let nack = request.error_detail.map(|status| status.message);
        served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .answers
            .push((request.type_url, nack));
    }
}
