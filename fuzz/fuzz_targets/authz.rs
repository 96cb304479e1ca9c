#![no_main]
//! The authorization evaluator (`meshwire_dataplane::rbac`), from structured input.
//!
//! Policies, a destination workload and a connection are built from `arbitrary` mirror types that
//! draw most values from small pools (a few namespaces, identities, addresses, ranges and ports, so
//! that matches actually happen) and some fully arbitrary ones. Each input checks:
//!
//! - the evaluator agrees with a naive model written here from the module's documentation (scopes,
//!   replacement of repeated keys, enforced and dry-run policies, which DENY policy is named, the
//!   dry-run outcomes in order and the dry-run decision);
//! - DENY wins: when an enforced DENY policy that applies matches, the verdict is a denial naming
//!   one, and adding an ALLOW policy (one matching the connection, or not) never turns it into an
//!   allow; a matching ALLOW that applies turns any other decision into an allow;
//! - a match with only `not_X = v` holds exactly when the match with only `X = v` does not, for
//!   every field, with and without a peer identity;
//! - nothing panics.

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use meshwire_dataplane::rbac::{
    Authorization, Connection, Decision, DenyReason, PolicySet, RbacAction, RbacMatch, RbacScope, ServiceAccountMatch,
    StringMatch, WorkloadRef,
};
use meshwire_identity::id::SpiffeId;
use meshwire_tests::fixtures::{
    IDS, IPS, NAMES, NAMESPACES, NETS, PORTS, SERVICE_ACCOUNTS, STRINGS, naive_string_match,
};

// ---------------------------------------------------------------------------------------------
// Value pools (shared with the dataplane's tests)

fn pick<T: Copy>(pool: &[T], index: u8) -> T {
    pool[usize::from(index) % pool.len()]
}

// ---------------------------------------------------------------------------------------------
// Mirror types

#[derive(Debug, Arbitrary)]
enum Str {
    Pool(u8),
    Any(String),
}

impl Str {
    fn get(&self, pool: &[&str]) -> String {
        match self {
            Str::Pool(i) => pick(pool, *i).to_owned(),
            Str::Any(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum StrMatchIn {
    Exact(Str),
    Prefix(Str),
    Suffix(Str),
    Presence,
}

impl StrMatchIn {
    fn build(&self) -> StringMatch {
        match self {
            StrMatchIn::Exact(s) => StringMatch::Exact(s.get(STRINGS)),
            StrMatchIn::Prefix(s) => StringMatch::Prefix(s.get(STRINGS)),
            StrMatchIn::Suffix(s) => StringMatch::Suffix(s.get(STRINGS)),
            StrMatchIn::Presence => StringMatch::Presence,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct SaIn {
    namespace: Str,
    service_account: Str,
}

impl SaIn {
    fn build(&self) -> ServiceAccountMatch {
        ServiceAccountMatch {
            namespace: self.namespace.get(NAMESPACES),
            service_account: self.service_account.get(SERVICE_ACCOUNTS),
        }
    }
}

/// A value from a pool, or any value.
#[derive(Debug, Arbitrary)]
enum Pooled<T> {
    Pool(u8),
    Any(T),
}

impl<T: Copy> Pooled<T> {
    fn get(&self, pool: &[T]) -> T {
        match self {
            Pooled::Pool(i) => pick(pool, *i),
            Pooled::Any(value) => *value,
        }
    }
}

type IpIn = Pooled<IpAddr>;

impl IpIn {
    fn build(&self) -> IpAddr {
        self.get(IPS)
    }
}

#[derive(Debug, Arbitrary)]
enum NetIn {
    Pool(u8),
    Any(IpIn, u8),
}

impl NetIn {
    fn build(&self) -> IpNet {
        match self {
            NetIn::Pool(i) => pick(NETS, *i).parse().expect("the pool holds valid ranges"),
            NetIn::Any(ip, len) => {
                let ip = ip.build();
                let max = if ip.is_ipv4() { 32 } else { 128 };
                IpNet::new(ip, len % (max + 1)).expect("the prefix length is in range")
            }
        }
    }
}

type PortIn = Pooled<u16>;

impl PortIn {
    fn build(&self) -> u16 {
        self.get(PORTS)
    }
}

#[derive(Debug, Default, Arbitrary)]
struct MatchIn {
    namespaces: Vec<StrMatchIn>,
    not_namespaces: Vec<StrMatchIn>,
    service_accounts: Vec<SaIn>,
    not_service_accounts: Vec<SaIn>,
    principals: Vec<StrMatchIn>,
    not_principals: Vec<StrMatchIn>,
    source_ips: Vec<NetIn>,
    not_source_ips: Vec<NetIn>,
    destination_ips: Vec<NetIn>,
    not_destination_ips: Vec<NetIn>,
    destination_ports: Vec<PortIn>,
    not_destination_ports: Vec<PortIn>,
}

impl MatchIn {
    fn build(&self) -> RbacMatch {
        let s = |v: &[StrMatchIn]| v.iter().map(StrMatchIn::build).collect();
        let n = |v: &[NetIn]| v.iter().map(NetIn::build).collect();
        RbacMatch {
            namespaces: s(&self.namespaces),
            not_namespaces: s(&self.not_namespaces),
            service_accounts: self.service_accounts.iter().map(SaIn::build).collect(),
            not_service_accounts: self.not_service_accounts.iter().map(SaIn::build).collect(),
            principals: s(&self.principals),
            not_principals: s(&self.not_principals),
            source_ips: n(&self.source_ips),
            not_source_ips: n(&self.not_source_ips),
            destination_ips: n(&self.destination_ips),
            not_destination_ips: n(&self.not_destination_ips),
            destination_ports: self.destination_ports.iter().map(PortIn::build).collect(),
            not_destination_ports: self.not_destination_ports.iter().map(PortIn::build).collect(),
        }
    }
}

type RulesIn = Vec<Vec<Vec<MatchIn>>>;

fn build_rules(rules: &RulesIn) -> Vec<Vec<Vec<RbacMatch>>> {
    rules
        .iter()
        .map(|rule| {
            rule.iter()
                .map(|clause| clause.iter().map(MatchIn::build).collect())
                .collect()
        })
        .collect()
}

#[derive(Debug, Arbitrary)]
enum ScopeIn {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Arbitrary)]
struct PolicyIn {
    namespace: Str,
    name: Str,
    scope: ScopeIn,
    deny: bool,
    dry_run: bool,
    rules: RulesIn,
}

impl PolicyIn {
    fn build(&self) -> Authorization {
        Authorization {
            name: self.name.get(NAMES),
            namespace: self.namespace.get(NAMESPACES),
            scope: match self.scope {
                ScopeIn::Global => RbacScope::Global,
                ScopeIn::Namespace => RbacScope::Namespace,
                ScopeIn::WorkloadSelector => RbacScope::WorkloadSelector,
            },
            action: if self.deny { RbacAction::Deny } else { RbacAction::Allow },
            rules: build_rules(&self.rules),
            dry_run: self.dry_run,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum KeyIn {
    Pool(u8, u8),
    Unknown,
    Any(String),
}

#[derive(Debug, Arbitrary)]
struct WorkloadIn {
    namespace: Str,
    policies: Vec<KeyIn>,
}

#[derive(Debug, Arbitrary)]
enum IdIn {
    None,
    Pool(u8),
    Any(String),
}

#[derive(Debug, Arbitrary)]
struct ConnIn {
    id: IdIn,
    src: IpIn,
    src_port: u16,
    dst: IpIn,
    dst_port: PortIn,
}

/// One field of a match, with the values for the field and its `not_` form.
#[derive(Debug, Arbitrary)]
enum FieldIn {
    Namespaces(Vec<StrMatchIn>),
    ServiceAccounts(Vec<SaIn>),
    Principals(Vec<StrMatchIn>),
    SourceIps(Vec<NetIn>),
    DestinationIps(Vec<NetIn>),
    DestinationPorts(Vec<PortIn>),
}

/// `values` twice: for a field and for its `not_` form.
fn both<T: Clone>(values: Vec<T>) -> (Vec<T>, Vec<T>) {
    (values.clone(), values)
}

impl FieldIn {
    /// The match with only the field, and the match with only its `not_` form.
    fn build(&self) -> (RbacMatch, RbacMatch) {
        let (mut pos, mut neg) = (RbacMatch::default(), RbacMatch::default());
        let strings = |v: &[StrMatchIn]| both(v.iter().map(StrMatchIn::build).collect());
        let nets = |v: &[NetIn]| both(v.iter().map(NetIn::build).collect());
        match self {
            FieldIn::Namespaces(v) => (pos.namespaces, neg.not_namespaces) = strings(v),
            FieldIn::ServiceAccounts(v) => {
                (pos.service_accounts, neg.not_service_accounts) = both(v.iter().map(SaIn::build).collect())
            }
            FieldIn::Principals(v) => (pos.principals, neg.not_principals) = strings(v),
            FieldIn::SourceIps(v) => (pos.source_ips, neg.not_source_ips) = nets(v),
            FieldIn::DestinationIps(v) => (pos.destination_ips, neg.not_destination_ips) = nets(v),
            FieldIn::DestinationPorts(v) => {
                (pos.destination_ports, neg.not_destination_ports) = both(v.iter().map(PortIn::build).collect())
            }
        }
        (pos, neg)
    }
}

#[derive(Debug, Arbitrary)]
enum ExtraScope {
    Global,
    OwnNamespace,
    Selected,
}

#[derive(Debug, Arbitrary)]
struct Input {
    policies: Vec<PolicyIn>,
    workload: WorkloadIn,
    conn: ConnIn,
    /// The rules of an extra ALLOW policy (`None`: one that matches everything).
    extra_allow: Option<RulesIn>,
    extra_scope: ExtraScope,
    fields: Vec<FieldIn>,
}

// ---------------------------------------------------------------------------------------------
// The naive model, from the documentation of `meshwire_dataplane::rbac`

/// The connection's attributes as the documentation defines them.
struct Peer {
    /// The SPIFFE ID without `spiffe://`.
    principal: String,
    /// Namespace and service account of an Istio path `/ns/<ns>/sa/<sa>`.
    istio: Option<(String, String)>,
}

struct Model {
    peer: Option<Peer>,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
}

impl Model {
    fn new(conn: &Connection<'_>) -> Self {
        let peer = conn.src_identity.map(|id| {
            let segments: Vec<&str> = id.path().split('/').skip(1).collect();
            let istio = match segments.as_slice() {
                ["ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => Some(((*ns).to_owned(), (*sa).to_owned())),
                _ => None,
            };
            let principal = id.to_string();
            Peer {
                principal: principal.strip_prefix("spiffe://").unwrap_or(&principal).to_owned(),
                istio,
            }
        });
        Self {
            peer,
            src: conn.src.ip().to_canonical(),
            dst: conn.dst.ip().to_canonical(),
            port: conn.dst.port(),
        }
    }

    fn field<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
        let p = pos.is_empty() || pos.iter().any(&f);
        let n = !neg.iter().any(&f);
        p && n
    }

    fn one(&self, m: &RbacMatch) -> bool {
        let istio = self.peer.as_ref().and_then(|p| p.istio.as_ref());
        let ns = istio.map(|(ns, _)| ns.as_str());
        Self::field(&m.namespaces, &m.not_namespaces, |s| naive_string_match(s, ns))
            && Self::field(&m.service_accounts, &m.not_service_accounts, |s| {
                istio.is_some_and(|(ns, sa)| *ns == s.namespace && *sa == s.service_account)
            })
            && Self::field(&m.principals, &m.not_principals, |s| {
                naive_string_match(s, self.peer.as_ref().map(|p| p.principal.as_str()))
            })
            && Self::field(&m.source_ips, &m.not_source_ips, |n| n.contains(&self.src))
            && Self::field(&m.destination_ips, &m.not_destination_ips, |n| n.contains(&self.dst))
            && Self::field(&m.destination_ports, &m.not_destination_ports, |p| *p == self.port)
    }

    /// No rules: nothing; a rule: all clauses; an empty clause matches; a clause: any of its
    /// non-empty matches.
    fn matches(&self, p: &Authorization) -> bool {
        p.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| !m.is_empty() && self.one(m)))
        })
    }
}

/// The policies of `action` that apply to the workload, in evaluation order: global ones, then
/// the namespace ones of its namespace (each in configuration order of the last definition of its
/// key), then the ones it lists by key that did not apply already, in its order, once each.
fn applicable<'p>(
    policies: &'p [Authorization],
    namespace: &str,
    selected: &[String],
    action: RbacAction,
) -> Vec<&'p Authorization> {
    let unique: Vec<&Authorization> = policies
        .iter()
        .enumerate()
        .filter(|(i, p)| !policies[i + 1..].iter().any(|q| q.key() == p.key()))
        .map(|(_, p)| p)
        .collect();
    let mut out: Vec<&Authorization> = Vec::new();
    out.extend(
        unique
            .iter()
            .filter(|p| p.action == action && p.scope == RbacScope::Global),
    );
    out.extend(
        unique
            .iter()
            .filter(|p| p.action == action && p.scope == RbacScope::Namespace && p.namespace == namespace),
    );
    for key in selected {
        if let Some(p) = unique.iter().find(|p| p.key() == *key)
            && p.action == action
            && !out.iter().any(|q| q.key() == *key)
        {
            out.push(p);
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Expected {
    Allow,
    DeniedBy(String),
    NotAllowed,
}

fn decide(model: &Model, deny: &[&Authorization], allow: &[&Authorization]) -> Expected {
    if let Some(p) = deny.iter().find(|p| model.matches(p)) {
        return Expected::DeniedBy(p.key());
    }
    if allow.is_empty() || allow.iter().any(|p| model.matches(p)) {
        Expected::Allow
    } else {
        Expected::NotAllowed
    }
}

fn expected(decision: &Decision<'_>) -> Expected {
    match decision {
        Decision::Allow => Expected::Allow,
        Decision::Deny(DenyReason::ExplicitlyDenied { policy }) => Expected::DeniedBy((*policy).to_owned()),
        Decision::Deny(DenyReason::NotAllowed) => Expected::NotAllowed,
        Decision::Deny(other) => panic!("a deny reason this target does not know: {other:?}"),
    }
}

/// Checks one evaluation against the model; returns the enforced decision.
fn check(policies: &[Authorization], namespace: &str, selected: &[String], conn: &Connection<'_>) -> Expected {
    let set = PolicySet::new(policies.iter().cloned());
    let verdict = set.evaluate(&WorkloadRef::new(namespace, selected), conn);
    let model = Model::new(conn);

    let deny = applicable(policies, namespace, selected, RbacAction::Deny);
    let allow = applicable(policies, namespace, selected, RbacAction::Allow);
    fn enforced<'p>(list: &[&'p Authorization]) -> Vec<&'p Authorization> {
        list.iter().copied().filter(|p| !p.dry_run).collect()
    }
    fn dry<'p>(list: &[&'p Authorization]) -> Vec<&'p Authorization> {
        list.iter().copied().filter(|p| p.dry_run).collect()
    }
    let (enforced_deny, enforced_allow) = (enforced(&deny), enforced(&allow));

    // The enforced decision, and the DENY policy it names: the first that matches, in order.
    let want = decide(&model, &enforced_deny, &enforced_allow);
    let got = expected(&verdict.decision);
    assert_eq!(got, want, "decision of {conn} for {namespace} {selected:?}");
    assert_eq!(verdict.is_allowed(), want == Expected::Allow);

    // DENY wins: any enforced DENY that applies and matches denies, naming a matching DENY policy.
    if enforced_deny.iter().any(|p| model.matches(p)) {
        let Expected::DeniedBy(key) = &got else {
            panic!("a matching DENY policy applies, yet {conn} got {got:?}");
        };
        let p = set.get(key).expect("the named policy exists");
        assert!(p.action == RbacAction::Deny && !p.dry_run && model.matches(p));
    }

    // Dry-run outcomes: DENY policies first, each in evaluation order, with whether it matched.
    let dry_policies: Vec<&Authorization> = dry(&deny).into_iter().chain(dry(&allow)).collect();
    assert_eq!(verdict.dry_run.len(), dry_policies.len(), "dry-run outcomes of {conn}");
    for (outcome, p) in verdict.dry_run.iter().zip(&dry_policies) {
        assert_eq!(outcome.policy, p.key());
        assert_eq!(outcome.action, p.action);
        assert_eq!(outcome.matched, model.matches(p));
        assert_eq!(outcome.would_deny(), p.action == RbacAction::Deny && model.matches(p));
    }
    // The decision with dry-run policies enforced too: enforced ones first in each list.
    match &verdict.dry_run_decision {
        None => assert!(dry_policies.is_empty()),
        Some(d) => {
            assert!(!dry_policies.is_empty());
            let deny_order: Vec<&Authorization> = enforced_deny.iter().copied().chain(dry(&deny)).collect();
            assert_eq!(
                expected(d),
                decide(&model, &deny_order, &allow),
                "dry-run decision of {conn}"
            );
        }
    }
    want
}

// ---------------------------------------------------------------------------------------------
// The target

fuzz_target!(|input: Input| {
    if input.policies.len() > 8 {
        return;
    }
    let policies: Vec<Authorization> = input.policies.iter().map(PolicyIn::build).collect();
    let namespace = input.workload.namespace.get(NAMESPACES);
    let selected: Vec<String> = input
        .workload
        .policies
        .iter()
        .map(|k| match k {
            KeyIn::Pool(ns, name) => format!("{}/{}", pick(NAMESPACES, *ns), pick(NAMES, *name)),
            KeyIn::Unknown => "x/unknown".to_owned(),
            KeyIn::Any(s) => s.clone(),
        })
        .collect();
    let id = match &input.conn.id {
        IdIn::None => None,
        IdIn::Pool(i) => Some(SpiffeId::new(pick(IDS, *i)).expect("the pool holds valid SPIFFE IDs")),
        IdIn::Any(s) => SpiffeId::new(s).ok(),
    };
    let conn = Connection {
        src_identity: id.as_ref(),
        src: SocketAddr::new(input.conn.src.build(), input.conn.src_port),
        dst: SocketAddr::new(input.conn.dst.build(), input.conn.dst_port.build()),
    };

    let before = check(&policies, &namespace, &selected, &conn);
    // The same connection without a peer identity follows the same model.
    let plaintext = Connection {
        src_identity: None,
        ..conn
    };
    check(&policies, &namespace, &selected, &plaintext);

    // Adding an ALLOW policy: a deny by a DENY policy stays exactly that; anything else becomes an
    // allow when the new policy applies and matches.
    let extra_rules = match &input.extra_allow {
        Some(rules) => build_rules(rules),
        None => vec![vec![]],
    };
    let mut extra = Authorization {
        name: "extra-allow".to_owned(),
        namespace: "fuzz-extra".to_owned(),
        scope: RbacScope::Global,
        action: RbacAction::Allow,
        rules: extra_rules,
        dry_run: false,
    };
    let mut extra_selected = selected.clone();
    match input.extra_scope {
        ExtraScope::Global => {}
        ExtraScope::OwnNamespace => {
            extra.scope = RbacScope::Namespace;
            extra.namespace = namespace.clone();
        }
        ExtraScope::Selected => {
            extra.scope = RbacScope::WorkloadSelector;
            extra_selected.push(extra.key());
        }
    }
    if !policies.iter().any(|p| p.key() == extra.key()) {
        let extra_matches = extra.matches(&conn);
        assert_eq!(extra_matches, Model::new(&conn).matches(&extra));
        let mut with = policies.clone();
        with.push(extra);
        let after = check(&with, &namespace, &extra_selected, &conn);
        match &before {
            Expected::DeniedBy(_) => assert_eq!(after, before, "an ALLOW policy overrode a DENY"),
            _ if extra_matches => assert_eq!(after, Expected::Allow, "a matching ALLOW did not allow"),
            // A non-matching ALLOW never allows what was not allowed.
            Expected::NotAllowed => assert_eq!(after, Expected::NotAllowed),
            // The DENY policies are the same: an allow never becomes a deny by one.
            Expected::Allow => assert!(!matches!(after, Expected::DeniedBy(_)), "{after:?}"),
        }
    }

    // A field and its negation are complementary, with and without a peer identity.
    for field in input.fields.iter().take(8) {
        let (pos, neg) = field.build();
        if pos.is_empty() {
            continue;
        }
        let policy = |m: RbacMatch| Authorization {
            name: "field".to_owned(),
            namespace: "fuzz".to_owned(),
            scope: RbacScope::Global,
            action: RbacAction::Allow,
            rules: vec![vec![vec![m]]],
            dry_run: false,
        };
        let (pos, neg) = (policy(pos), policy(neg));
        for c in [&conn, &plaintext] {
            let (p, n) = (pos.matches(c), neg.matches(c));
            assert_ne!(p, n, "{field:?} and its negation on {c}");
            assert_eq!(p, Model::new(c).matches(&pos), "{field:?} on {c}");
        }
    }
});
