//! The DNS proxy's decision, a pure function: given a packet from a client and the routing
//! [`State`], answer it here (the names of the mesh) or forward it unchanged to the upstream
//! resolvers. No IO, no clock, no randomness.
//!
//! **What is answered here** (as ztunnel's `dns::server` does): A and AAAA queries (class IN, one
//! question, opcode QUERY) for
//! - a service hostname (exact, or a wildcard hostname such as `*.example.com`) with VIPs: its VIPs
//!   in the client's network; a Kubernetes headless service (no VIP, a `.svc.<cluster domain>`
//!   hostname): the addresses of its workloads;
//! - a workload of a headless service, `<pod>.<service>.<namespace>.svc.<cluster domain>`;
//! - the short forms Kubernetes clients use: `name` (in the client's namespace), `name.ns`,
//!   `name.ns.svc`, and the pod forms `pod.service`, `pod.service.ns`, `pod.service.ns.svc`;
//! - names the client's resolver completed with a search domain (`name.ns.svc.cluster.local` tried as
//!   `name.<client ns>.svc.cluster.local`...): the completed name answers with a CNAME to the name
//!   found and that name's addresses. Search domains are per client (`<ns>.svc.<domain>`,
//!   `svc.<domain>`, `<domain>`) on a node proxy, and those of `resolv.conf` for a dedicated one.
//!
//! A name found with no address of the asked family (AAAA for an IPv4-only service, or any AAAA
//! when IPv6 is off) answers `NOERROR` with no records: the name exists. Nothing is answered
//! `NXDOMAIN` here: a name the mesh does not know is forwarded, as ztunnel does.
//!
//! **What is forwarded**, byte for byte: every other opcode (UPDATE, NOTIFY...), every other record
//! type (SRV, TXT, CNAME, PTR...), queries with several questions or another class, EDNS versions
//! other than 0, and names the mesh does not know.
//!
//! **What is an error** ([`QueryError`]): a packet shorter than a header or that is a response (the
//! server drops it), and a query that does not parse (the server answers `FORMERR`).
//!
//! Service names are found through a [`NameIndex`] of the state's hostnames, built once per state.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::wire;
use crate::state::State;
use crate::xds::{NamespacedHostname, Service, Workload};

/// The TTL of local answers, in seconds (ztunnel's).
pub const TTL: u32 = 30;

/// The EDNS UDP size the proxy announces in its local answers.
pub const ANNOUNCED_UDP: u16 = 1232;

/// Where the search domains a client's resolver appends come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchDomains {
    /// Kubernetes' for the client's namespace: `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>` (a node
    /// proxy serves many namespaces).
    PerClient,
    /// A fixed list (a dedicated proxy: its `resolv.conf`'s), lower case, no trailing dots.
    Static(Vec<String>),
}

/// How names are resolved: the cluster domain, the search domains, IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// The cluster's DNS domain, lower case, no trailing dot (`cluster.local`).
    pub cluster_domain: String,
    /// The search domains of the clients.
    pub search: SearchDomains,
    /// Whether AAAA queries may be answered with addresses (`--ipv6`).
    pub ipv6: bool,
    /// The namespace whose service wins when several namespaces define a hostname and none is the
    /// client's (ztunnel's `PREFERED_SERVICE_NAMESPACE`).
    pub preferred_namespace: Option<String>,
}

impl ResolverConfig {
    /// Per-client search domains, IPv6 on, no preferred namespace.
    pub fn new(cluster_domain: &str) -> Self {
        Self {
            cluster_domain: normalize(cluster_domain),
            search: SearchDomains::PerClient,
            ipv6: true,
            preferred_namespace: None,
        }
    }
}

/// The client of a query, as the state knows it.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// Its workload (by source address on a node proxy, the pod's in dedicated or in-pod mode),
    /// `None` if unknown: then short names (which need its namespace) are forwarded.
    pub workload: Option<&'a Workload>,
    /// Its network: the VIPs answered are those in this network.
    pub network: &'a str,
}

impl<'a> Client<'a> {
    /// The client `workload`, in its network.
    pub fn workload(workload: &'a Workload) -> Self {
        Self {
            workload: Some(workload),
            network: &workload.network,
        }
    }

    fn namespace(&self) -> Option<&'a str> {
        self.workload.map(|w| w.namespace())
    }
}

/// How the query came: a UDP answer must fit the client's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP: at most 512 bytes, or the query's EDNS size.
    Udp,
    /// TCP: up to 65,535 bytes.
    Tcp,
}

impl Transport {
    /// `udp` or `tcp` (the `request_protocol` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send this answer (it fits the client's limit; cut with `TC` set where it did not).
    Answer(Vec<u8>),
    /// Forward the packet, unchanged, to the upstream resolvers.
    Forward,
}

/// A query decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Answer or forward.
    pub outcome: Outcome,
    /// The type asked (of the first question; `None` without one): the `request_query_type` label.
    pub query_type: Option<RecordType>,
    /// The most bytes an answer to the client may have on its transport: 512 or the query's EDNS
    /// size over UDP (at least 512), 65,535 over TCP.
    pub limit: usize,
}

/// Why a packet is not a query the proxy can decide on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// Shorter than a DNS header: dropped.
    #[error("a packet of {len} bytes is shorter than a DNS header")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// A response, not a query: dropped (answering it could loop).
    #[error("the packet is a response, not a query")]
    NotAQuery,
    /// The header is whole but the message does not parse: answered `FORMERR`.
    #[error("malformed DNS query {id:#06x}: {reason}")]
    Malformed {
        /// Its id.
        id: u16,
        /// What is wrong.
        reason: String,
    },
}

impl QueryError {
    /// The answer the client gets: `FORMERR` for a malformed query, nothing otherwise.
    pub fn answer(&self, packet: &[u8]) -> Option<Vec<u8>> {
        match self {
            QueryError::Malformed { .. } => wire::error_answer(packet, wire::FORMERR),
            _ => None,
        }
    }
}

/// The state's service hostnames, lower case, each with the keys of the services that have it:
/// the name lookups of the DNS proxy, built once per [`State`].
#[derive(Debug, Clone, Default)]
pub struct NameIndex {
    services: HashMap<String, Vec<NamespacedHostname>>,
}

impl NameIndex {
    /// Indexes the hostnames of `state`'s services (the keys of one hostname ordered by namespace).
    pub fn new(state: &State) -> Self {
        let mut services: HashMap<String, Vec<NamespacedHostname>> = HashMap::with_capacity(state.services().len());
        for service in state.services() {
            services
                .entry(normalize(&service.hostname))
                .or_default()
                .push(service.key());
        }
        Self { services }
    }

    fn services<'s>(&'s self, state: &'s State, hostname: &str) -> impl Iterator<Item = &'s Service> + use<'s> {
        self.services
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|key| state.service_by_hostname(key))
    }
}

/// Lower case, no trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn labels(name: &str) -> usize {
    if name.is_empty() { 0 } else { name.split('.').count() }
}

/// A name the query may mean, as ztunnel's aliases.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Alias {
    name: String,
    /// The name with a search domain taken off, when this alias comes from it.
    stripped: Option<String>,
    /// Whether the alias may be `<pod>.<service>.<ns>.svc.<domain>`.
    pod_host: bool,
}

/// What a name resolves to.
#[derive(Debug, Clone, Copy)]
enum Target<'s> {
    Service(&'s Service),
    Workload(&'s Workload),
}

/// Decides `packet` from `client` over `transport` against `state` (with `index`, made from the
/// same state).
pub fn decide(
    config: &ResolverConfig,
    state: &State,
    index: &NameIndex,
    client: Client<'_>,
    packet: &[u8],
    transport: Transport,
) -> Result<Decision, QueryError> {
    let id = wire::id(packet)
        .filter(|_| packet.len() >= wire::HEADER_LEN)
        .ok_or(QueryError::TooShort { len: packet.len() })?;
    if wire::is_response(packet) == Some(true) {
        return Err(QueryError::NotAQuery);
    }
    let message = Message::from_vec(packet).map_err(|e| QueryError::Malformed {
        id,
        reason: e.to_string(),
    })?;
    let limit = match transport {
        Transport::Tcp => wire::MAX_MESSAGE,
        Transport::Udp => message.extensions().as_ref().map_or(wire::CLASSIC_UDP, |edns| {
            usize::from(edns.max_payload()).max(wire::CLASSIC_UDP)
        }),
    };
    let query_type = message.queries().first().map(Query::query_type);
    let forward = Decision {
        outcome: Outcome::Forward,
        query_type,
        limit,
    };
    let [query] = message.queries() else {
        return Ok(forward);
    };
    let local = message.op_code() == OpCode::Query
        && query.query_class() == DNSClass::IN
        && matches!(query.query_type(), RecordType::A | RecordType::AAAA)
        && message.extensions().as_ref().is_none_or(|edns| edns.version() == 0);
    if !local {
        return Ok(forward);
    }
    if wire::first_question_compressed(packet) {
        return Err(QueryError::Malformed {
            id,
            reason: "the question's name holds a compression pointer (into the header or itself)".to_owned(),
        });
    }
    let requested = normalize(&query.name().to_lowercase().to_ascii());
    let Some((target, alias)) = find(config, state, index, client, &requested) else {
        return Ok(forward);
    };
    let addresses = if query.query_type() == RecordType::AAAA && !config.ipv6 {
        Vec::new()
    } else {
        addresses(state, client, target, query.query_type())
    };
    let answer = build_answer(&message, query, alias.stripped.as_deref(), &addresses);
    Ok(Decision {
        outcome: Outcome::Answer(wire::truncate(answer, limit)),
        query_type,
        limit,
    })
}

/// The answer to `message`'s `query`: a CNAME from the requested name to `stripped` if the name
/// was found with a search domain taken off, and the addresses under the name found.
fn build_answer(message: &Message, query: &Query, stripped: Option<&str>, addresses: &[IpAddr]) -> Vec<u8> {
    let mut answer = Message::new();
    answer
        .set_id(message.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(message.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(message.checking_disabled())
        .set_response_code(ResponseCode::NoError)
        .add_query(query.clone());
    if message.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(ANNOUNCED_UDP).set_version(0);
        answer.set_edns(edns);
    }
    let mut name = query.name().clone();
    if let Some(stripped) = stripped
        && let Ok(canonical) = Name::from_ascii(format!("{stripped}."))
    {
        answer.add_answer(Record::from_rdata(
            name.clone(),
            TTL,
            RData::CNAME(CNAME(canonical.clone())),
        ));
        name = canonical;
    }
    for ip in addresses {
        let rdata = match ip {
            IpAddr::V4(ip) => RData::A(A(*ip)),
            IpAddr::V6(ip) => RData::AAAA(AAAA(*ip)),
        };
        answer.add_answer(Record::from_rdata(name.clone(), TTL, rdata));
    }
    // Every name came from a parsed query and every record is well formed: encoding cannot fail;
    // should it, the client is told the server failed.
    answer.to_vec().unwrap_or_else(|_| {
        Message::error_msg(message.id(), OpCode::Query, ResponseCode::ServFail)
            .to_vec()
            .unwrap_or_default()
    })
}

/// The search domains of `client`.
fn search_domains(config: &ResolverConfig, client: Client<'_>) -> Vec<String> {
    match &config.search {
        SearchDomains::Static(domains) => domains.clone(),
        SearchDomains::PerClient => {
            let domain = &config.cluster_domain;
            let mut domains = Vec::with_capacity(3);
            if let Some(ns) = client.namespace() {
                domains.push(format!("{ns}.svc.{domain}"));
            }
            domains.push(format!("svc.{domain}"));
            domains.push(domain.clone());
            domains
        }
    }
}

/// The Kubernetes names `name` may be short for, each with whether it is a pod host.
fn kube_fqdns(config: &ResolverConfig, namespace: Option<&str>, name: &str) -> Vec<(String, bool)> {
    let domain = &config.cluster_domain;
    let in_namespace = |name: &str| namespace.map(|ns| format!("{name}.{ns}.svc.{domain}"));
    let svc = name.ends_with(".svc");
    match labels(name) {
        1 => in_namespace(name).map(|n| (n, false)).into_iter().collect(),
        2 => std::iter::once((format!("{name}.svc.{domain}"), false))
            .chain(in_namespace(name).map(|n| (n, true)))
            .collect(),
        3 => svc
            .then(|| (format!("{name}.{domain}"), false))
            .into_iter()
            .chain(std::iter::once((format!("{name}.svc.{domain}"), true)))
            .collect(),
        4 if svc => vec![(format!("{name}.{domain}"), true)],
        _ => Vec::new(),
    }
}

/// The names `requested` may mean for `client`, most specific first, without repeats.
fn aliases(config: &ResolverConfig, client: Client<'_>, requested: &str) -> Vec<Alias> {
    let namespace = client.namespace();
    let mut out: Vec<Alias> = Vec::new();
    let mut add = |alias: Alias| {
        if !alias.name.is_empty() && !out.iter().any(|a| a.name == alias.name) {
            out.push(alias);
        }
    };
    let pod_host = labels(requested) == 6;
    add(Alias {
        name: requested.to_owned(),
        stripped: None,
        pod_host,
    });
    for (name, pod_host) in kube_fqdns(config, namespace, requested) {
        add(Alias {
            name,
            stripped: None,
            pod_host,
        });
    }
    for domain in search_domains(config, client) {
        let Some(stripped) = requested
            .strip_suffix(domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|rest| !rest.is_empty())
        else {
            continue;
        };
        add(Alias {
            name: stripped.to_owned(),
            stripped: Some(stripped.to_owned()),
            pod_host,
        });
        for (name, pod_host) in kube_fqdns(config, namespace, stripped) {
            add(Alias {
                name,
                stripped: Some(stripped.to_owned()),
                pod_host,
            });
        }
    }
    out
}

/// `name`, then its wildcards from the most specific: `a.b.c`, `*.b.c`, `*.c`.
fn wildcards(name: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(name.to_owned()).chain(
        name.match_indices('.')
            .map(move |(dot, _)| format!("*{}", &name[dot..])),
    )
}

/// The service or workload `requested` names for `client`, and the alias that found it.
fn find<'s>(
    config: &ResolverConfig,
    state: &'s State,
    index: &'s NameIndex,
    client: Client<'_>,
    requested: &str,
) -> Option<(Target<'s>, Alias)> {
    let kube_suffix = format!(".svc.{}", config.cluster_domain);
    let namespace = client.namespace();
    for alias in aliases(config, client, requested) {
        let names: Vec<String> = wildcards(&alias.name).collect();
        for name in names {
            let candidates = index
                .services(state, &name)
                .filter(|service| !service.vips.is_empty() || normalize(&service.hostname).ends_with(&kube_suffix));
            if let Some(service) = best_service(candidates, namespace, config.preferred_namespace.as_deref()) {
                return Some((Target::Service(service), alias));
            }
        }
        if alias.pod_host
            && let Some((pod, service_host)) = alias.name.split_once('.')
        {
            let found = index
                .services(state, service_host)
                .filter(|service| service.vips.is_empty())
                .flat_map(|service| state.workloads_of_service(&service.key()))
                .filter(|workload| workload.name.eq_ignore_ascii_case(pod))
                .reduce(|best, next| {
                    if Some(best.namespace()) != namespace && Some(next.namespace()) == namespace {
                        next
                    } else {
                        best
                    }
                });
            if let Some(workload) = found {
                return Some((Target::Workload(workload), alias));
            }
        }
    }
    None
}

/// The service of the client's namespace, else of the preferred namespace, else the first.
fn best_service<'s>(
    candidates: impl Iterator<Item = &'s Service>,
    namespace: Option<&str>,
    preferred: Option<&str>,
) -> Option<&'s Service> {
    let mut first = None;
    let mut in_preferred = None;
    for service in candidates {
        if Some(service.namespace.as_str()) == namespace {
            return Some(service);
        }
        if in_preferred.is_none() && Some(service.namespace.as_str()) == preferred {
            in_preferred = Some(service);
        }
        first = first.or(Some(service));
    }
    in_preferred.or(first)
}

fn of_type(ip: &IpAddr, record_type: RecordType) -> bool {
    match ip {
        IpAddr::V4(_) => record_type == RecordType::A,
        IpAddr::V6(_) => record_type == RecordType::AAAA,
    }
}

/// The addresses of `target` of the asked type: a service's VIPs in the client's network (a
/// headless service's workloads' addresses, one per workload), a workload's addresses.
fn addresses(state: &State, client: Client<'_>, target: Target<'_>, record_type: RecordType) -> Vec<IpAddr> {
    match target {
        Target::Workload(workload) => workload
            .workload_ips
            .iter()
            .copied()
            .filter(|ip| of_type(ip, record_type))
            .collect(),
        Target::Service(service) if service.vips.is_empty() => state
            .workloads_of_service(&service.key())
            .filter_map(|workload| {
                workload
                    .workload_ips
                    .iter()
                    .copied()
                    .find(|ip| of_type(ip, record_type))
            })
            .collect(),
        Target::Service(service) => service
            .vips
            .iter()
            .filter(|vip| vip.network == client.network && of_type(&vip.address, record_type))
            .map(|vip| vip.address)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Message;

    use super::*;
    use crate::xds::LocalConfig;

    const MESH: &str = r#"
workloads:
- name: client
  namespace: default
  workloadIps: ["10.0.0.1"]
- name: db-0
  namespace: default
  workloadIps: ["10.0.0.5", "fd00::5"]
  services: {"default/db.default.svc.cluster.local": {5432: 5432}}
- name: remote
  namespace: default
  network: net2
  workloadIps: ["10.1.0.1"]
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.96.0.1", "net2/10.97.0.1"]
  ports: {80: 8080}
- name: reviews
  namespace: other
  hostname: reviews.other.svc.cluster.local
  vips: ["/10.96.0.2", "/fd00::2"]
  ports: {80: 8080}
- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
  ports: {5432: 5432}
- name: wild
  namespace: default
  hostname: "*.example.com"
  vips: ["/10.96.0.3"]
  ports: {443: 443}
"#;

    fn state() -> State {
        State::new(LocalConfig::parse(MESH).expect("valid mesh"))
    }

    fn query(name: &str, record_type: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x4242).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), record_type));
        m.to_vec().expect("encodes")
    }

    /// The answer's records as `name data`, or `None` when forwarded.
    fn ask(state: &State, client: &str, name: &str, record_type: RecordType) -> Option<Vec<String>> {
        let config = ResolverConfig::new("cluster.local");
        let index = NameIndex::new(state);
        let workload = state.workload_by_name("default", client).expect("client");
        let packet = query(name, record_type);
        let decision = decide(
            &config,
            state,
            &index,
            Client::workload(workload),
            &packet,
            Transport::Udp,
        )
        .expect("a query");
        match decision.outcome {
            Outcome::Forward => None,
            Outcome::Answer(answer) => {
                let answer = Message::from_vec(&answer).expect("parses");
                assert_eq!(answer.id(), 0x4242);
                assert_eq!(answer.queries(), Message::from_vec(&packet).expect("parses").queries());
                assert_eq!(answer.response_code(), ResponseCode::NoError);
                Some(
                    answer
                        .answers()
                        .iter()
                        .map(|r| format!("{} {}", r.name(), r.data()))
                        .collect(),
                )
            }
        }
    }

    fn some(records: &[&str]) -> Option<Vec<String>> {
        Some(records.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn service_names_answer_with_the_vips_of_the_clients_network() {
        let state = state();
        let a = RecordType::A;
        assert_eq!(
            ask(&state, "client", "reviews.default.svc.cluster.local.", a),
            some(&["reviews.default.svc.cluster.local. 10.96.0.1"])
        );
        // Short names: the client's namespace first.
        assert_eq!(ask(&state, "client", "reviews.", a), some(&["reviews. 10.96.0.1"]));
        assert_eq!(
            ask(&state, "client", "reviews.other.", a),
            some(&["reviews.other. 10.96.0.2"])
        );
        assert_eq!(
            ask(&state, "client", "reviews.other.svc.", a),
            some(&["reviews.other.svc. 10.96.0.2"])
        );
        // Another network's client gets that network's VIP.
        assert_eq!(
            ask(&state, "remote", "reviews.default.", a),
            some(&["reviews.default. 10.97.0.1"])
        );
        // Case does not matter; the answer keeps the query's.
        assert_eq!(
            ask(&state, "client", "REVIEWS.Default.", a),
            some(&["REVIEWS.Default. 10.96.0.1"])
        );
        // Wildcard hostnames.
        assert_eq!(
            ask(&state, "client", "api.example.com.", a),
            some(&["api.example.com. 10.96.0.3"])
        );
    }

    #[test]
    fn search_domains_give_a_cname_and_families_are_kept_apart() {
        let state = state();
        assert_eq!(
            ask(
                &state,
                "client",
                "reviews.other.default.svc.cluster.local.",
                RecordType::A
            ),
            some(&[
                "reviews.other.default.svc.cluster.local. reviews.other.",
                "reviews.other. 10.96.0.2"
            ])
        );
        // IPv4 only: the name exists, no AAAA record.
        assert_eq!(ask(&state, "client", "reviews.", RecordType::AAAA), some(&[]));
        assert_eq!(
            ask(&state, "client", "reviews.other.", RecordType::AAAA),
            some(&["reviews.other. fd00::2"])
        );
    }

    #[test]
    fn headless_services_and_their_pods_answer_with_workload_addresses() {
        let state = state();
        assert_eq!(
            ask(&state, "client", "db.default.svc.cluster.local.", RecordType::A),
            some(&["db.default.svc.cluster.local. 10.0.0.5"])
        );
        assert_eq!(
            ask(&state, "client", "db-0.db.default.svc.cluster.local.", RecordType::AAAA),
            some(&["db-0.db.default.svc.cluster.local. fd00::5"])
        );
        assert_eq!(
            ask(&state, "client", "db-0.db.", RecordType::A),
            some(&["db-0.db. 10.0.0.5"])
        );
    }

    #[test]
    fn everything_else_is_forwarded() {
        let state = state();
        assert_eq!(ask(&state, "client", "example.org.", RecordType::A), None);
        assert_eq!(
            ask(&state, "client", "reviews.default.svc.cluster.local.", RecordType::SRV),
            None
        );
        assert_eq!(
            ask(&state, "client", "reviews.default.svc.cluster.local.", RecordType::TXT),
            None
        );
        // A service of another namespace is not reached by its short name.
        assert_eq!(ask(&state, "client", "nothere.", RecordType::A), None);
        // Another opcode.
        let config = ResolverConfig::new("cluster.local");
        let index = NameIndex::new(&state);
        let mut update = query("reviews.default.svc.cluster.local.", RecordType::A);
        update[2] = 5 << 3;
        let client = Client {
            workload: None,
            network: "",
        };
        let decision = decide(&config, &state, &index, client, &update, Transport::Udp).expect("a query");
        assert_eq!(decision.outcome, Outcome::Forward);
    }

    #[test]
    fn bad_packets_are_errors_and_limits_follow_edns() {
        let state = state();
        let config = ResolverConfig::new("cluster.local");
        let index = NameIndex::new(&state);
        let client = Client {
            workload: None,
            network: "",
        };
        let run = |packet: &[u8], transport| decide(&config, &state, &index, client, packet, transport);
        assert_eq!(run(&[1, 2, 3], Transport::Udp), Err(QueryError::TooShort { len: 3 }));
        let mut response = query("a.", RecordType::A);
        response[2] |= 0x80;
        assert_eq!(run(&response, Transport::Udp), Err(QueryError::NotAQuery));
        let mut cut = query("example.org.", RecordType::A);
        cut.truncate(cut.len() - 2);
        let error = run(&cut, Transport::Udp).expect_err("malformed");
        assert!(matches!(error, QueryError::Malformed { id: 0x4242, .. }), "{error}");
        let formerr = error.answer(&cut).expect("an answer");
        assert_eq!(formerr[3] & 0x0f, wire::FORMERR);
        // A question whose name ends in a pointer (here into the header, read as the root): found
        // by the fuzz target; refused rather than answered with another question.
        let mut pointed = query("api.example.com.", RecordType::A);
        let end = pointed.len() - 5;
        assert_eq!(pointed[end], 0, "the name's end");
        pointed.splice(end..=end, [0xc0, 0x00]);
        let error = run(&pointed, Transport::Udp).expect_err("a compressed question");
        assert!(matches!(error, QueryError::Malformed { id: 0x4242, .. }), "{error}");

        let mut edns = Message::from_vec(&query("example.org.", RecordType::A)).expect("parses");
        let mut e = Edns::new();
        e.set_max_payload(4096);
        edns.set_edns(e);
        let edns = edns.to_vec().expect("encodes");
        assert_eq!(run(&edns, Transport::Udp).map(|d| d.limit), Ok(4096));
        assert_eq!(
            run(&query("a.", RecordType::A), Transport::Udp).map(|d| d.limit),
            Ok(512)
        );
        assert_eq!(
            run(&query("a.", RecordType::A), Transport::Tcp).map(|d| d.limit),
            Ok(65_535)
        );
        // Unknown clients still get fully qualified names.
        let decision = run(
            &query("reviews.default.svc.cluster.local.", RecordType::A),
            Transport::Udp,
        );
        assert!(matches!(decision.map(|d| d.outcome), Ok(Outcome::Answer(_))));
    }
}
