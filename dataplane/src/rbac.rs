//! Istio L4 authorization policies (ztunnel's `Authorization`) and their evaluation.
//!
//! A policy has a scope (global, namespace, workload selector), an action (ALLOW or DENY), a dry-run
//! flag and rules. Rules are OR-ed; the clauses of a rule are AND-ed; the matches of a clause are
//! OR-ed; the fields of a match are AND-ed; the values of a field are OR-ed; each field has a `not_`
//! form, which holds when none of its values match.
//!
//! [`PolicySet`] indexes the policies of a configuration by scope, and [`PolicySet::evaluate`] decides
//! one connection ([`Connection`]) to one destination workload ([`WorkloadRef`]) the way ztunnel does
//! (Istio's AuthorizationPolicy algorithm):
//!
//! 1. if any enforced DENY policy that applies matches, the connection is denied;
//! 2. otherwise, if no enforced ALLOW policy applies, it is allowed;
//! 3. otherwise it is allowed only if one of those ALLOW policies matches.
//!
//! Dry-run policies are evaluated and reported in the [`Verdict`] (each outcome, and the decision
//! that enforcing them would give), never enforced. Evaluation is pure: no IO, no logging, no
//! allocation unless dry-run policies apply.
//!
//! # The YAML form
//!
//! The serde form is ztunnel's (the `policies:` list of its local configuration): camelCase fields,
//! `scope: Global | Namespace | WorkloadSelector`, `action: Allow | Deny`, `rules` as a list (rules) of
//! lists (clauses) of matches, and string matches as YAML tags (`!Exact foo`, `!Prefix foo`,
//! `!Suffix foo`, `!Presence []`):
//!
//! ```
//! use meshwire_dataplane::rbac::{Authorization, Connection, PolicySet, WorkloadRef};
//! use meshwire_identity::id::SpiffeId;
//!
//! let policies: Vec<Authorization> = serde_yaml_ng::from_str(
//!     r#"
//! - name: only-frontend
//!   namespace: shop
//!   scope: Namespace
//!   action: Allow
//!   rules:
//!   - - - principals: [!Exact cluster.local/ns/shop/sa/frontend]
//!     - - destinationPorts: [8080]
//!   dryRun: false
//! "#,
//! )?;
//! let policies = PolicySet::new(policies);
//! let frontend = SpiffeId::new("spiffe://cluster.local/ns/shop/sa/frontend")?;
//! let conn = Connection {
//!     src_identity: Some(&frontend),
//!     src: "10.0.0.1:40000".parse()?,
//!     dst: "10.0.0.2:8080".parse()?,
//! };
//! let cart = WorkloadRef::new("shop", &[]);
//! assert!(policies.evaluate(&cart, &conn).is_allowed());
//! let plaintext = Connection { src_identity: None, ..conn };
//! let verdict = policies.evaluate(&cart, &plaintext);
//! assert_eq!(verdict.decision.to_string(), "denied: allow policies exist, but none allowed");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Compatibility with ztunnel (`src/rbac.rs`, `src/state.rs` `assert_rbac`, `src/state/policy.rs`)
//!
//! Same as ztunnel:
//! - a policy with no rules matches nothing (an ALLOW with no rules therefore allows nothing, a DENY
//!   with no rules denies nothing); a rule with no clauses matches everything; a clause with no
//!   matches matches; a match with no field set matches nothing (it is skipped in its clause);
//! - principals are compared with the SPIFFE ID without `spiffe://` (`cluster.local/ns/a/sa/b`);
//!   `Presence` matches any identity; service accounts compare namespace and name, not the trust domain;
//! - a connection without identity matches no positive identity field (`namespaces`, `serviceAccounts`,
//!   `principals`) and every `not_` identity field, so `notPrincipals: [!Presence []]` in a DENY policy
//!   rejects plaintext, as in Istio;
//! - policies are keyed `namespace/name`; a later policy with the same key replaces an earlier one;
//!   a workload applies the global policies, the namespace policies of its namespace and the policies
//!   it lists by key (unknown keys are skipped);
//! - dry-run: DENY and ALLOW dry-run policies are evaluated and reported, never enforced
//!   (ztunnel PRs #1659 and #1745).
//!
//! Deliberate differences:
//! - an absent identity is not the empty string: ztunnel matches `namespaces` against `""` for
//!   plaintext, so `!Exact ""` or `!Prefix ""` would match a plaintext peer there and never here;
//! - the source identity is a [`SpiffeId`]: principals match any SPIFFE ID, while namespaces and
//!   service accounts are taken only from the Istio form `/ns/<ns>/sa/<sa>` (a peer with another path
//!   has none). ztunnel treats a non-Istio SPIFFE ID as no identity at all;
//! - IP addresses are canonicalised (an IPv4-mapped IPv6 address is matched as IPv4), as ztunnel's
//!   sockets do before building the connection;
//! - a workload that lists a global policy, or a namespace policy of its own namespace, applies it once,
//!   not twice (this only changes what is reported for dry-run policies);
//! - unknown fields are rejected in matches and service account matches too, not only at the policy
//!   level: a misspelt field would otherwise leave an empty match, and a DENY policy that silently
//!   matches nothing;
//! - `rules` and `dryRun` may be omitted (empty, false); the proto enum names (`ALLOW`, `DENY`,
//!   `GLOBAL`, `NAMESPACE`, `WORKLOAD_SELECTOR`) are accepted as aliases; string matches are also
//!   accepted as single-entry maps (`{Exact: foo}`) and `Presence` as a plain `Presence`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use meshwire_identity::id::SpiffeId;
use serde::de::{self, EnumAccess, IgnoredAny, MapAccess, VariantAccess, Visitor};
use serde::ser::SerializeTupleVariant;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where a policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub enum RbacScope {
    /// Every workload of the mesh.
    #[default]
    #[serde(alias = "GLOBAL")]
    Global,
    /// Every workload of the policy's namespace.
    #[serde(alias = "NAMESPACE")]
    Namespace,
    /// The workloads that list the policy's key (`namespace/name`) among their policies.
    #[serde(alias = "WORKLOAD_SELECTOR")]
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub enum RbacAction {
    /// Allow: if any enforced ALLOW policy applies to a workload, one of them must match.
    #[default]
    #[serde(alias = "ALLOW")]
    Allow,
    /// Deny: a match rejects the connection.
    #[serde(alias = "DENY")]
    Deny,
}

impl fmt::Display for RbacAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RbacAction::Allow => "ALLOW",
            RbacAction::Deny => "DENY",
        })
    }
}

/// A string match of a principal or namespace.
///
/// In YAML (ztunnel's form) a match is a tag: `!Exact foo`, `!Prefix foo`, `!Suffix foo`,
/// `!Presence []`. Single-entry maps (`{Exact: foo}`, `{Presence: []}`) and a plain `Presence` are
/// accepted too; serialization always writes ztunnel's form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StringMatch {
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Equal to.
    Exact(String),
    /// Any value, as long as there is one (a peer identity).
    Presence,
}

impl StringMatch {
    /// Whether `value` matches. An absent value (no peer identity) is never passed here: it matches
    /// no `StringMatch`, including `Exact("")`.
    ///
    /// ```
    /// use meshwire_dataplane::rbac::StringMatch;
    ///
    /// assert!(StringMatch::Prefix("team-".into()).matches("team-a"));
    /// assert!(!StringMatch::Presence.matches(""));
    /// ```
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Exact(exact) => exact == value,
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// Whether the principal `trust_domain + path` (a SPIFFE ID without `spiffe://`) matches, without
    /// building the string.
    fn matches_principal(&self, trust_domain: &str, path: &str) -> bool {
        let (td, path) = (trust_domain.as_bytes(), path.as_bytes());
        match self {
            StringMatch::Exact(exact) => {
                let exact = exact.as_bytes();
                exact.len() == td.len() + path.len() && exact.starts_with(td) && exact.get(td.len()..) == Some(path)
            }
            StringMatch::Prefix(prefix) => {
                let prefix = prefix.as_bytes();
                match prefix.get(td.len()..) {
                    Some(rest) => prefix.starts_with(td) && path.starts_with(rest),
                    None => td.starts_with(prefix),
                }
            }
            StringMatch::Suffix(suffix) => {
                let suffix = suffix.as_bytes();
                match suffix.len().checked_sub(path.len()) {
                    Some(head) => suffix.ends_with(path) && td.ends_with(&suffix[..head]),
                    None => path.ends_with(suffix),
                }
            }
            StringMatch::Presence => !td.is_empty() || !path.is_empty(),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The variant indices and shapes of ztunnel's `enum StringMatch { Prefix(_), Suffix(_),
        // Exact(_), Presence() }`.
        match self {
            StringMatch::Prefix(v) => serializer.serialize_newtype_variant("StringMatch", 0, "Prefix", v),
            StringMatch::Suffix(v) => serializer.serialize_newtype_variant("StringMatch", 1, "Suffix", v),
            StringMatch::Exact(v) => serializer.serialize_newtype_variant("StringMatch", 2, "Exact", v),
            StringMatch::Presence => serializer
                .serialize_tuple_variant("StringMatch", 3, "Presence", 0)?
                .end(),
        }
    }
}

/// The variant names of [`StringMatch`].
#[derive(Deserialize)]
#[serde(variant_identifier)]
enum StringMatchKind {
    Prefix,
    Suffix,
    Exact,
    Presence,
}

struct StringMatchVisitor;

impl<'de> Visitor<'de> for StringMatchVisitor {
    type Value = StringMatch;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string match: !Exact <s>, !Prefix <s>, !Suffix <s> or !Presence []")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<StringMatch, A::Error> {
        let (kind, value) = data.variant::<StringMatchKind>()?;
        Ok(match kind {
            StringMatchKind::Prefix => StringMatch::Prefix(value.newtype_variant()?),
            StringMatchKind::Suffix => StringMatch::Suffix(value.newtype_variant()?),
            StringMatchKind::Exact => StringMatch::Exact(value.newtype_variant()?),
            StringMatchKind::Presence => {
                value.newtype_variant::<IgnoredAny>()?;
                StringMatch::Presence
            }
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMatch, A::Error> {
        let Some(kind) = map.next_key::<StringMatchKind>()? else {
            return Err(de::Error::invalid_length(0, &"a map with one entry"));
        };
        let m = match kind {
            StringMatchKind::Prefix => StringMatch::Prefix(map.next_value()?),
            StringMatchKind::Suffix => StringMatch::Suffix(map.next_value()?),
            StringMatchKind::Exact => StringMatch::Exact(map.next_value()?),
            StringMatchKind::Presence => {
                map.next_value::<IgnoredAny>()?;
                StringMatch::Presence
            }
        };
        if map.next_key::<IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(2, &"a map with one entry"));
        }
        Ok(m)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StringMatch, E> {
        match v {
            "Presence" => Ok(StringMatch::Presence),
            _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
        }
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StringMatchVisitor)
    }
}

/// A service account match: the namespace and name of the peer's Istio identity (any trust domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    /// The namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
}

/// One match: fields AND-ed, values of a field OR-ed, a `not_` field holds when none of its values
/// match. A match with no field set matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RbacMatch {
    /// Source namespaces (of the peer's Istio identity).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    /// Source namespaces that must not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// Source service accounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Source service accounts that must not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source principals (SPIFFE IDs without the `spiffe://` scheme, as Istio writes them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    /// Source principals that must not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// Source IP ranges.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    /// Source IP ranges that must not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    /// Destination IP ranges.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    /// Destination IP ranges that must not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    /// Destination ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    /// Destination ports that must not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl RbacMatch {
    /// Whether no field is set (such a match matches nothing).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    /// Whether every set field holds. Address fields first: they are the cheapest.
    fn matches(&self, a: &Attrs<'_>) -> bool {
        field(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == a.dst_port
        }) && field(&self.destination_ips, &self.not_destination_ips, |n| n.contains(&a.dst))
            && field(&self.source_ips, &self.not_source_ips, |n| n.contains(&a.src))
            && field(&self.namespaces, &self.not_namespaces, |m| {
                a.peer.and_then(|p| p.namespace).is_some_and(|ns| m.matches(ns))
            })
            && field(&self.service_accounts, &self.not_service_accounts, |m| {
                a.peer.is_some_and(|p| {
                    p.namespace == Some(m.namespace.as_str()) && p.service_account == Some(m.service_account.as_str())
                })
            })
            && field(&self.principals, &self.not_principals, |m| {
                a.peer.is_some_and(|p| m.matches_principal(p.trust_domain, p.path))
            })
    }
}

/// One field and its `not_` form: some positive value matches (or there is none) and no negative
/// value matches.
fn field<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(&matches)
}

/// An authorization policy, in ztunnel's form.
///
/// `name`, `namespace`, `scope` and `action` are required in YAML; `rules` (empty) and `dryRun`
/// (false) may be omitted; unknown fields are rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// The policy's name.
    pub name: String,
    /// The policy's namespace.
    pub namespace: String,
    /// Where it applies.
    pub scope: RbacScope,
    /// What a match does.
    pub action: RbacAction,
    /// Rules (OR) of clauses (AND) of matches (OR). No rules: the policy matches nothing.
    #[serde(default)]
    pub rules: Vec<Vec<Vec<RbacMatch>>>,
    /// Evaluated and reported, never enforced.
    #[serde(default)]
    pub dry_run: bool,
}

impl Authorization {
    /// The policy's key, `namespace/name`, by which workloads select it.
    pub fn key(&self) -> String {
        let mut key = String::with_capacity(self.namespace.len() + 1 + self.name.len());
        key.push_str(&self.namespace);
        key.push('/');
        key.push_str(&self.name);
        key
    }

    /// Whether the policy's rules match `conn`, whatever its action, scope and dry-run flag.
    ///
    /// Cost: linear in the number of values in the rules (each string match linear in its length);
    /// stops at the first matching rule. No allocation.
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        rules_match(&self.rules, &Attrs::new(conn))
    }
}

fn rules_match(rules: &[Vec<Vec<RbacMatch>>], a: &Attrs<'_>) -> bool {
    // ztunnel: no rules match nothing; a rule with no clauses matches; a clause with no matches
    // matches; a match with no field set is skipped.
    rules.iter().any(|rule| {
        rule.iter()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| !m.is_empty() && m.matches(a)))
    })
}

/// The attributes of a connection that policies look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection<'a> {
    /// The verified SPIFFE ID of the peer (HBONE mTLS); `None` for plaintext, which matches no
    /// identity field and every `not_` identity field.
    pub src_identity: Option<&'a SpiffeId>,
    /// The source address.
    pub src: SocketAddr,
    /// The destination address (the workload address and port the connection is for).
    pub dst: SocketAddr,
}

impl fmt::Display for Connection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.src_identity {
            Some(id) => write!(f, "{}({})->{}", self.src, id, self.dst),
            None => write!(f, "{}(None)->{}", self.src, self.dst),
        }
    }
}

/// The peer identity, split once per evaluation.
#[derive(Clone, Copy)]
struct Peer<'a> {
    trust_domain: &'a str,
    /// The SPIFFE ID's path, with its leading `/`.
    path: &'a str,
    /// Present for Istio identities (`/ns/<ns>/sa/<sa>`) only.
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
}

/// `(namespace, service account)` of an Istio identity path `/ns/<ns>/sa/<sa>`.
fn istio_parts(path: &str) -> Option<(&str, &str)> {
    let (ns, rest) = path.strip_prefix("/ns/")?.split_once('/')?;
    let sa = rest.strip_prefix("sa/")?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then_some((ns, sa))
}

struct Attrs<'a> {
    src: IpAddr,
    dst: IpAddr,
    dst_port: u16,
    peer: Option<Peer<'a>>,
}

impl<'a> Attrs<'a> {
    fn new(conn: &Connection<'a>) -> Self {
        let peer = conn.src_identity.map(|id| {
            let parts = istio_parts(id.path());
            Peer {
                trust_domain: id.trust_domain_name(),
                path: id.path(),
                namespace: parts.map(|(ns, _)| ns),
                service_account: parts.map(|(_, sa)| sa),
            }
        });
        Self {
            src: conn.src.ip().to_canonical(),
            dst: conn.dst.ip().to_canonical(),
            dst_port: conn.dst.port(),
            peer,
        }
    }
}

/// What scoping needs to know about the destination workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadRef<'a> {
    /// The workload's namespace: namespace-scoped policies of this namespace apply.
    pub namespace: &'a str,
    /// The keys (`namespace/name`) of the policies that select the workload (ztunnel's
    /// `authorization_policies`): these apply, whatever their namespace. Unknown keys are skipped.
    pub policies: &'a [String],
}

impl<'a> WorkloadRef<'a> {
    /// A workload of `namespace` selecting the policies `policies` (keys `namespace/name`).
    pub fn new(namespace: &'a str, policies: &'a [String]) -> Self {
        Self { namespace, policies }
    }
}

/// Why a connection is denied. The messages are ztunnel's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DenyReason<'p> {
    /// An enforced DENY policy matched.
    #[error("explicitly denied by: {policy}")]
    ExplicitlyDenied {
        /// The policy's key, `namespace/name`.
        policy: &'p str,
    },
    /// Enforced ALLOW policies apply and none matched.
    #[error("allow policies exist, but none allowed")]
    NotAllowed,
}

impl<'p> DenyReason<'p> {
    /// The key of the DENY policy that matched, if one did.
    pub fn policy(&self) -> Option<&'p str> {
        match self {
            DenyReason::ExplicitlyDenied { policy } => Some(policy),
            DenyReason::NotAllowed => None,
        }
    }
}

/// An authorization decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'p> {
    /// The connection may proceed.
    Allow,
    /// The connection must be rejected.
    Deny(DenyReason<'p>),
}

impl<'p> Decision<'p> {
    /// Whether the connection may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// Why the connection is denied, if it is.
    pub fn deny_reason(&self) -> Option<DenyReason<'p>> {
        match self {
            Decision::Allow => None,
            Decision::Deny(reason) => Some(*reason),
        }
    }
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::Deny(reason) => write!(f, "denied: {reason}"),
        }
    }
}

/// What one dry-run policy found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DryRunOutcome<'p> {
    /// The policy's key, `namespace/name`.
    pub policy: &'p str,
    /// The policy's action.
    pub action: RbacAction,
    /// Whether its rules match the connection.
    pub matched: bool,
}

impl DryRunOutcome<'_> {
    /// Whether this policy alone would reject the connection if enforced (a DENY that matched). Whether
    /// an unmatched ALLOW would reject it depends on the other ALLOW policies: see
    /// [`Verdict::dry_run_decision`].
    pub fn would_deny(&self) -> bool {
        self.action == RbacAction::Deny && self.matched
    }
}

/// The result of [`PolicySet::evaluate`]: the enforced decision and what dry-run policies found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verdict<'p> {
    /// The decision to enforce.
    pub decision: Decision<'p>,
    /// One outcome per dry-run policy that applies to the workload, DENY policies first, in the order
    /// of [`PolicySet::evaluate`].
    pub dry_run: Vec<DryRunOutcome<'p>>,
    /// The decision if the dry-run policies were enforced too; `None` when no dry-run policy applies.
    pub dry_run_decision: Option<Decision<'p>>,
}

impl Verdict<'_> {
    /// Whether the connection may proceed (the enforced decision).
    pub fn is_allowed(&self) -> bool {
        self.decision.is_allowed()
    }
}

/// The policies of one policy bucket, split by action (indices into `PolicySet::entries`).
#[derive(Debug, Clone, Default)]
struct Bucket {
    deny: Vec<usize>,
    allow: Vec<usize>,
}

impl Bucket {
    fn get(&self, action: RbacAction) -> &[usize] {
        match action {
            RbacAction::Allow => &self.allow,
            RbacAction::Deny => &self.deny,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    policy: Authorization,
}

/// An immutable set of policies indexed for evaluation: global policies, namespace policies by
/// namespace, and every policy by key for workload selectors.
///
/// Build it once per configuration snapshot (cost linear in the number of policies) and share it.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Unique keys, in configuration order (of the last definition of each key).
    entries: Vec<Entry>,
    by_key: HashMap<String, usize>,
    global: Bucket,
    by_namespace: HashMap<String, Bucket>,
    has_dry_run: bool,
}

impl PolicySet {
    /// Indexes `policies`. A policy whose key (`namespace/name`) repeats an earlier one replaces it,
    /// as in ztunnel's policy store.
    pub fn new(policies: impl IntoIterator<Item = Authorization>) -> Self {
        let policies: Vec<Authorization> = policies.into_iter().collect();
        let keys: Vec<String> = policies.iter().map(Authorization::key).collect();
        let last: HashMap<&str, usize> = keys.iter().enumerate().map(|(i, k)| (k.as_str(), i)).collect();
        let keep: Vec<bool> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| last.get(k.as_str()) == Some(&i))
            .collect();

        let mut set = PolicySet::default();
        for ((policy, key), keep) in policies.into_iter().zip(keys).zip(keep) {
            if !keep {
                continue;
            }
            let index = set.entries.len();
            let bucket = match policy.scope {
                RbacScope::Global => Some(&mut set.global),
                RbacScope::Namespace => Some(set.by_namespace.entry(policy.namespace.clone()).or_default()),
                RbacScope::WorkloadSelector => None,
            };
            if let Some(bucket) = bucket {
                match policy.action {
                    RbacAction::Allow => bucket.allow.push(index),
                    RbacAction::Deny => bucket.deny.push(index),
                }
            }
            set.has_dry_run |= policy.dry_run;
            set.by_key.insert(key.clone(), index);
            set.entries.push(Entry { key, policy });
        }
        set
    }

    /// The number of policies (after replacement of repeated keys).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no policy.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The policy of key `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Authorization> {
        self.by_key
            .get(key)
            .and_then(|&i| self.entries.get(i))
            .map(|e| &e.policy)
    }

    /// The policies, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Authorization> {
        self.entries.iter().map(|e| &e.policy)
    }

    /// Decides whether `conn` may reach `workload`.
    ///
    /// The policies that apply are the global ones, the namespace ones of the workload's namespace
    /// and the ones the workload lists by key, evaluated in that order (which decides which DENY
    /// policy is named when several match). Enforced policies: the first matching DENY denies;
    /// otherwise the connection is allowed if no ALLOW applies or one matches, and denied with
    /// [`DenyReason::NotAllowed`] if none does. Dry-run policies are all evaluated and reported in
    /// [`Verdict::dry_run`] and [`Verdict::dry_run_decision`], never enforced.
    ///
    /// Cost: one hash lookup of the workload's namespace and one per policy key the workload lists
    /// (plus a quadratic check for keys it lists twice, over a list that is usually tiny), then
    /// linear in the size of the applicable policies' rules. Enforced DENY and ALLOW policies stop at
    /// the first match when the set holds no dry-run policy. No allocation unless dry-run policies
    /// apply (the outcome list).
    pub fn evaluate<'p>(&'p self, workload: &WorkloadRef<'_>, conn: &Connection<'_>) -> Verdict<'p> {
        let attrs = Attrs::new(conn);
        let ns = self.by_namespace.get(workload.namespace);
        let mut dry_run = Vec::new();

        let mut denied_by = None;
        let mut dry_denied_by = None;
        for entry in self.applicable(workload, ns, RbacAction::Deny) {
            if entry.policy.dry_run {
                let matched = rules_match(&entry.policy.rules, &attrs);
                dry_run.push(DryRunOutcome {
                    policy: &entry.key,
                    action: RbacAction::Deny,
                    matched,
                });
                if matched && dry_denied_by.is_none() {
                    dry_denied_by = Some(entry.key.as_str());
                }
            } else if denied_by.is_none() && rules_match(&entry.policy.rules, &attrs) {
                denied_by = Some(entry.key.as_str());
                if !self.has_dry_run {
                    break;
                }
            }
        }

        let (mut allow_applies, mut allowed) = (false, false);
        let (mut dry_allow_applies, mut dry_allowed) = (false, false);
        if denied_by.is_none() || self.has_dry_run {
            for entry in self.applicable(workload, ns, RbacAction::Allow) {
                if entry.policy.dry_run {
                    let matched = rules_match(&entry.policy.rules, &attrs);
                    dry_run.push(DryRunOutcome {
                        policy: &entry.key,
                        action: RbacAction::Allow,
                        matched,
                    });
                    dry_allow_applies = true;
                    dry_allowed |= matched;
                } else if denied_by.is_none() && !allowed {
                    allow_applies = true;
                    allowed = rules_match(&entry.policy.rules, &attrs);
                    if allowed && !self.has_dry_run {
                        break;
                    }
                }
            }
        }

        let decide = |denied_by: Option<&'p str>, allow_applies: bool, allowed: bool| match denied_by {
            Some(policy) => Decision::Deny(DenyReason::ExplicitlyDenied { policy }),
            None if !allow_applies || allowed => Decision::Allow,
            None => Decision::Deny(DenyReason::NotAllowed),
        };
        let decision = decide(denied_by, allow_applies, allowed);
        let dry_run_decision = (!dry_run.is_empty()).then(|| {
            decide(
                denied_by.or(dry_denied_by),
                allow_applies || dry_allow_applies,
                allowed || dry_allowed,
            )
        });
        Verdict {
            decision,
            dry_run,
            dry_run_decision,
        }
    }

    /// The policies of `action` that apply to `workload`: global, then namespace, then selected by key
    /// (skipping unknown keys, keys listed twice and policies already applied through their scope).
    fn applicable<'s, 'w>(
        &'s self,
        workload: &'w WorkloadRef<'w>,
        ns: Option<&'s Bucket>,
        action: RbacAction,
    ) -> impl Iterator<Item = &'s Entry> {
        let scoped = self
            .global
            .get(action)
            .iter()
            .chain(ns.map_or(&[][..], |b| b.get(action)));
        let selected = workload.policies.iter().enumerate().filter_map(move |(i, key)| {
            let entry = self.entries.get(*self.by_key.get(key.as_str())?)?;
            let policy = &entry.policy;
            let already_applied = match policy.scope {
                RbacScope::Global => true,
                RbacScope::Namespace => policy.namespace == workload.namespace,
                RbacScope::WorkloadSelector => false,
            };
            let repeated = workload.policies.get(..i).is_some_and(|before| before.contains(key));
            (policy.action == action && !already_applied && !repeated).then_some(entry)
        });
        scoped.filter_map(|&i| self.entries.get(i)).chain(selected)
    }
}

impl FromIterator<Authorization> for PolicySet {
    fn from_iter<I: IntoIterator<Item = Authorization>>(iter: I) -> Self {
        Self::new(iter)
    }
}

impl From<Vec<Authorization>> for PolicySet {
    fn from(policies: Vec<Authorization>) -> Self {
        Self::new(policies)
    }
}
