//! L4 authorization: ztunnel's matching semantics field by field, the rule structure, scoping,
//! dry-run, plaintext peers, the YAML form of ztunnel's local configuration, and properties checked
//! against a naive model written from ztunnel's `Authorization::matches` and `assert_rbac`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;

use ipnet::IpNet;
use meshwire_dataplane::rbac::{
    Authorization, Connection, Decision, DenyReason, DryRunOutcome, PolicySet, RbacAction, RbacMatch, RbacScope,
    ServiceAccountMatch, StringMatch, WorkloadRef,
};
use meshwire_identity::id::{IstioIdentity, SpiffeId};
use meshwire_tests::fixtures::{
    IDS, IPS, NAMES, NAMESPACES, NETS, PORTS, SERVICE_ACCOUNTS, STRINGS, naive_string_match,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Fixtures (the connections of ztunnel's own rbac tests)

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn conn<'a>(identity: Option<&'a SpiffeId>, src: &str, dst: &str) -> Connection<'a> {
    Connection {
        src_identity: identity,
        src: addr(src),
        dst: addr(dst),
    }
}

/// `spiffe://td/ns/namespace/sa/account`, 127.0.0.1 -> 127.0.0.2:8080.
struct Fixtures {
    tls_id: SpiffeId,
    alt_id: SpiffeId,
}

impl Fixtures {
    fn new() -> Self {
        Self {
            tls_id: id("spiffe://td/ns/namespace/sa/account"),
            alt_id: id("spiffe://td-alt/ns/ns-alt/sa/sa-alt"),
        }
    }
    fn plaintext(&self) -> Connection<'_> {
        conn(None, "127.0.0.1:1234", "127.0.0.2:8080")
    }
    fn tls(&self) -> Connection<'_> {
        conn(Some(&self.tls_id), "127.0.0.1:1234", "127.0.0.2:8080")
    }
    fn alt(&self) -> Connection<'_> {
        conn(Some(&self.alt_id), "127.0.0.3:1234", "127.0.0.4:9090")
    }
}

fn policy(
    namespace: &str,
    name: &str,
    scope: RbacScope,
    action: RbacAction,
    rules: Vec<Vec<Vec<RbacMatch>>>,
) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action,
        rules,
        dry_run: false,
    }
}

fn one(m: RbacMatch) -> Vec<Vec<Vec<RbacMatch>>> {
    vec![vec![vec![m]]]
}

/// A rule with no clauses: matches every connection.
fn everything() -> Vec<Vec<Vec<RbacMatch>>> {
    vec![vec![]]
}

fn ports(p: &[u16]) -> RbacMatch {
    RbacMatch {
        destination_ports: p.to_vec(),
        ..Default::default()
    }
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn sa(namespace: &str, service_account: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

const NO_KEYS: &[String] = &[];

fn workload(namespace: &str) -> WorkloadRef<'_> {
    WorkloadRef::new(namespace, NO_KEYS)
}

fn keys(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

fn deny_by(policy: &str) -> Decision<'_> {
    Decision::Deny(DenyReason::ExplicitlyDenied { policy })
}

const NOT_ALLOWED: Decision<'static> = Decision::Deny(DenyReason::NotAllowed);

/// Checks a single-field match and its `not_` form against [plaintext, tls, alt]: the `not_` form
/// must give the opposite answer on every connection.
fn check_field(set: impl Fn(&mut RbacMatch, bool), expected: [bool; 3]) {
    let f = Fixtures::new();
    let conns = [f.plaintext(), f.tls(), f.alt()];
    for negated in [false, true] {
        let mut m = RbacMatch::default();
        set(&mut m, negated);
        let p = policy("ns", "field", RbacScope::Global, RbacAction::Allow, one(m.clone()));
        for (c, want) in conns.iter().zip(expected) {
            assert_eq!(p.matches(c), want != negated, "{m:?} on {c}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions

#[test]
fn no_policy_allows() {
    let f = Fixtures::new();
    let set = PolicySet::default();
    let v = set.evaluate(&workload("ns"), &f.plaintext());
    assert_eq!(v.decision, Decision::Allow);
    assert!(v.dry_run.is_empty());
    assert_eq!(v.dry_run_decision, None);
    assert!(PolicySet::new(vec![]).is_empty());
}

#[test]
fn matching_allow_allows_and_unmatched_allow_denies() {
    let f = Fixtures::new();
    let set = PolicySet::new([policy(
        "ns",
        "allow-8080",
        RbacScope::Global,
        RbacAction::Allow,
        one(ports(&[8080])),
    )]);
    assert!(set.evaluate(&workload("ns"), &f.tls()).is_allowed());
    let v = set.evaluate(&workload("ns"), &f.alt());
    assert_eq!(v.decision, NOT_ALLOWED);
    assert_eq!(v.decision.deny_reason().unwrap().policy(), None);
    assert_eq!(v.decision.to_string(), "denied: allow policies exist, but none allowed");
}

#[test]
fn matching_deny_denies_naming_the_policy() {
    let f = Fixtures::new();
    let set = PolicySet::new([policy(
        "ns",
        "deny-8080",
        RbacScope::Global,
        RbacAction::Deny,
        one(ports(&[8080])),
    )]);
    let v = set.evaluate(&workload("other"), &f.tls());
    assert_eq!(v.decision, deny_by("ns/deny-8080"));
    assert_eq!(v.decision.deny_reason().unwrap().policy(), Some("ns/deny-8080"));
    assert_eq!(v.decision.to_string(), "denied: explicitly denied by: ns/deny-8080");
    // A DENY that does not match, with no ALLOW, allows.
    assert!(set.evaluate(&workload("ns"), &f.alt()).is_allowed());
}

#[test]
fn deny_wins_over_allow() {
    let f = Fixtures::new();
    let set = PolicySet::new([
        policy("ns", "allow-all", RbacScope::Global, RbacAction::Allow, everything()),
        policy(
            "ns",
            "deny-8080",
            RbacScope::Global,
            RbacAction::Deny,
            one(ports(&[8080])),
        ),
    ]);
    assert_eq!(
        set.evaluate(&workload("ns"), &f.tls()).decision,
        deny_by("ns/deny-8080")
    );
    assert!(set.evaluate(&workload("ns"), &f.alt()).is_allowed());
}

#[test]
fn any_allow_suffices() {
    let f = Fixtures::new();
    let set = PolicySet::new([
        policy(
            "ns",
            "allow-80",
            RbacScope::Global,
            RbacAction::Allow,
            one(ports(&[80])),
        ),
        policy(
            "ns",
            "allow-9090",
            RbacScope::Global,
            RbacAction::Allow,
            one(ports(&[9090])),
        ),
    ]);
    assert!(set.evaluate(&workload("ns"), &f.alt()).is_allowed());
    assert_eq!(set.evaluate(&workload("ns"), &f.tls()).decision, NOT_ALLOWED);
}

#[test]
fn first_matching_deny_in_scope_order_is_named() {
    let f = Fixtures::new();
    let selected = keys(&["ns/by-selector"]);
    let set = PolicySet::new([
        policy(
            "ns",
            "by-selector",
            RbacScope::WorkloadSelector,
            RbacAction::Deny,
            everything(),
        ),
        policy(
            "ns",
            "by-namespace",
            RbacScope::Namespace,
            RbacAction::Deny,
            everything(),
        ),
        policy("root", "global", RbacScope::Global, RbacAction::Deny, everything()),
    ]);
    let wl = WorkloadRef::new("ns", &selected);
    assert_eq!(set.evaluate(&wl, &f.tls()).decision, deny_by("root/global"));
}

// ---------------------------------------------------------------------------------------------
// Fields and their `not_` forms (ztunnel's rbac_test! cases, plus every string match kind)

#[test]
fn namespaces_exact() {
    check_field(
        |m, not| *if not { &mut m.not_namespaces } else { &mut m.namespaces } = vec![exact("namespace")],
        [false, true, false],
    );
}

#[test]
fn namespaces_prefix_suffix_presence() {
    let set_ns = |v: Vec<StringMatch>| {
        move |m: &mut RbacMatch, not: bool| *if not { &mut m.not_namespaces } else { &mut m.namespaces } = v.clone()
    };
    check_field(set_ns(vec![StringMatch::Prefix("name".into())]), [false, true, false]);
    check_field(set_ns(vec![StringMatch::Prefix("ns-".into())]), [false, false, true]);
    check_field(set_ns(vec![StringMatch::Suffix("space".into())]), [false, true, false]);
    check_field(set_ns(vec![StringMatch::Suffix("-alt".into())]), [false, false, true]);
    check_field(set_ns(vec![StringMatch::Presence]), [false, true, true]);
    // Values are OR-ed.
    check_field(set_ns(vec![exact("nope"), exact("ns-alt")]), [false, false, true]);
    // An absent identity is not the empty string (ztunnel would match plaintext here).
    check_field(
        set_ns(vec![exact(""), StringMatch::Prefix(String::new())]),
        [false, true, true],
    );
}

#[test]
fn service_accounts() {
    check_field(
        |m, not| {
            *if not {
                &mut m.not_service_accounts
            } else {
                &mut m.service_accounts
            } = vec![sa("namespace", "account")]
        },
        [false, true, false],
    );
    // Namespace and name must both match; values are OR-ed.
    check_field(
        |m, not| {
            *if not {
                &mut m.not_service_accounts
            } else {
                &mut m.service_accounts
            } = vec![
                sa("namespace", "sa-alt"),
                sa("ns-alt", "account"),
                sa("ns-alt", "sa-alt"),
            ]
        },
        [false, false, true],
    );
}

#[test]
fn principals() {
    let set_p = |v: Vec<StringMatch>| {
        move |m: &mut RbacMatch, not: bool| *if not { &mut m.not_principals } else { &mut m.principals } = v.clone()
    };
    check_field(set_p(vec![exact("td/ns/namespace/sa/account")]), [false, true, false]);
    // Principals never carry the scheme.
    check_field(
        set_p(vec![exact("spiffe://td/ns/namespace/sa/account")]),
        [false, false, false],
    );
    // Exact is exact: neither a prefix nor an extension matches.
    check_field(set_p(vec![exact("td/ns/namespace/sa/acc")]), [false, false, false]);
    check_field(set_p(vec![exact("td/ns/namespace/sa/accountx")]), [false, false, false]);
    // Prefixes inside the trust domain, at its end, and across into the path.
    check_field(set_p(vec![StringMatch::Prefix("t".into())]), [false, true, true]);
    check_field(set_p(vec![StringMatch::Prefix("td/".into())]), [false, true, false]);
    check_field(
        set_p(vec![StringMatch::Prefix("td-alt/ns/ns-".into())]),
        [false, false, true],
    );
    // Suffixes inside the path and across into the trust domain.
    check_field(
        set_p(vec![StringMatch::Suffix("/sa/account".into())]),
        [false, true, false],
    );
    check_field(
        set_p(vec![StringMatch::Suffix("alt/ns/ns-alt/sa/sa-alt".into())]),
        [false, false, true],
    );
    check_field(
        set_p(vec![StringMatch::Suffix("xtd-alt/ns/ns-alt/sa/sa-alt".into())]),
        [false, false, false],
    );
    check_field(set_p(vec![StringMatch::Presence]), [false, true, true]);
}

#[test]
fn source_ips() {
    check_field(
        |m, not| *if not { &mut m.not_source_ips } else { &mut m.source_ips } = vec![net("127.0.0.1/32")],
        [true, true, false],
    );
    check_field(
        |m, not| *if not { &mut m.not_source_ips } else { &mut m.source_ips } = vec![net("127.0.0.0/24")],
        [true, true, true],
    );
    check_field(
        |m, not| *if not { &mut m.not_source_ips } else { &mut m.source_ips } = vec![net("::/0")],
        [false, false, false],
    );
}

#[test]
fn source_ips_v6() {
    let m = RbacMatch {
        source_ips: vec![net("fd00:1::/64")],
        ..Default::default()
    };
    let not = RbacMatch {
        not_source_ips: vec![net("fd00:1::/64")],
        ..Default::default()
    };
    let allow = policy("ns", "v6", RbacScope::Global, RbacAction::Allow, one(m));
    let allow_not = policy("ns", "v6", RbacScope::Global, RbacAction::Allow, one(not));
    for (src, inside) in [
        ("[fd00:1::5]:1", true),
        ("[fd00:1::ffff:1]:1", true),
        ("[fd00:2::5]:1", false),
        ("10.0.0.1:1", false),
    ] {
        let c = conn(None, src, "[fd00:9::1]:80");
        assert_eq!(allow.matches(&c), inside, "{src}");
        assert_eq!(allow_not.matches(&c), !inside, "{src}");
    }
}

#[test]
fn ipv4_mapped_addresses_match_ipv4_ranges() {
    let deny = policy(
        "ns",
        "deny-10",
        RbacScope::Global,
        RbacAction::Deny,
        one(RbacMatch {
            source_ips: vec![net("10.0.0.0/8")],
            ..Default::default()
        }),
    );
    assert!(deny.matches(&conn(None, "[::ffff:10.1.2.3]:1", "10.0.0.1:80")));
    assert!(!deny.matches(&conn(None, "[::ffff:11.1.2.3]:1", "10.0.0.1:80")));
}

#[test]
fn destination_ips() {
    check_field(
        |m, not| {
            *if not {
                &mut m.not_destination_ips
            } else {
                &mut m.destination_ips
            } = vec![net("127.0.0.2/32")]
        },
        [true, true, false],
    );
    check_field(
        |m, not| {
            *if not {
                &mut m.not_destination_ips
            } else {
                &mut m.destination_ips
            } = vec![net("10.0.0.0/8"), net("127.0.0.4/31")]
        },
        [false, false, true],
    );
    check_field(
        |m, not| {
            *if not {
                &mut m.not_destination_ips
            } else {
                &mut m.destination_ips
            } = vec![net("127.0.0.1/24")]
        },
        [true, true, true],
    );
}

#[test]
fn destination_ports() {
    check_field(
        |m, not| {
            *if not {
                &mut m.not_destination_ports
            } else {
                &mut m.destination_ports
            } = vec![8080]
        },
        [true, true, false],
    );
    check_field(
        |m, not| {
            *if not {
                &mut m.not_destination_ports
            } else {
                &mut m.destination_ports
            } = vec![80, 9090]
        },
        [false, false, true],
    );
    // Ports are exact: no ranges, no prefix.
    check_field(
        |m, not| {
            *if not {
                &mut m.not_destination_ports
            } else {
                &mut m.destination_ports
            } = vec![808]
        },
        [false, false, false],
    );
}

#[test]
fn fields_of_a_match_are_anded_and_a_field_with_its_negation() {
    let f = Fixtures::new();
    let m = RbacMatch {
        namespaces: vec![StringMatch::Presence],
        destination_ports: vec![8080, 9090],
        not_source_ips: vec![net("127.0.0.3/32")],
        ..Default::default()
    };
    let p = policy("ns", "and", RbacScope::Global, RbacAction::Allow, one(m));
    assert!(!p.matches(&f.plaintext()), "no namespace");
    assert!(p.matches(&f.tls()));
    assert!(!p.matches(&f.alt()), "excluded source");

    // Positive and negative forms of one field both hold.
    let m = RbacMatch {
        destination_ips: vec![net("127.0.0.0/24")],
        not_destination_ips: vec![net("127.0.0.4/32")],
        ..Default::default()
    };
    let p = policy("ns", "and", RbacScope::Global, RbacAction::Allow, one(m));
    assert!(p.matches(&f.tls()));
    assert!(!p.matches(&f.alt()));
}

// ---------------------------------------------------------------------------------------------
// Rule structure

#[test]
fn clauses_are_anded_matches_ored() {
    // ztunnel's rbac_nesting: (ns a OR ns b) AND port 80.
    let rule = vec![
        vec![
            RbacMatch {
                namespaces: vec![exact("a")],
                ..Default::default()
            },
            RbacMatch {
                namespaces: vec![exact("b")],
                ..Default::default()
            },
        ],
        vec![ports(&[80])],
    ];
    let p = policy("ns", "nested", RbacScope::Global, RbacAction::Allow, vec![rule]);
    let (a, b, bad) = (
        id("spiffe://td/ns/a/sa/account"),
        id("spiffe://td/ns/b/sa/account"),
        id("spiffe://td/ns/bad/sa/account"),
    );
    assert!(p.matches(&conn(Some(&a), "127.0.0.1:1", "127.0.0.2:80")));
    assert!(p.matches(&conn(Some(&b), "127.0.0.1:1", "127.0.0.2:80")));
    assert!(
        !p.matches(&conn(Some(&bad), "127.0.0.1:1", "127.0.0.2:80")),
        "wrong namespace"
    );
    assert!(
        !p.matches(&conn(Some(&b), "127.0.0.1:1", "127.0.0.2:12345")),
        "wrong port"
    );
}

#[test]
fn rules_are_ored() {
    let rules = vec![
        vec![vec![RbacMatch {
            namespaces: vec![exact("a")],
            ..Default::default()
        }]],
        vec![vec![ports(&[443])]],
    ];
    let p = policy("ns", "multi", RbacScope::Global, RbacAction::Allow, rules);
    let (a, bad) = (id("spiffe://td/ns/a/sa/x"), id("spiffe://td/ns/bad/sa/x"));
    assert!(p.matches(&conn(Some(&a), "127.0.0.1:1", "127.0.0.2:80")));
    assert!(p.matches(&conn(Some(&bad), "127.0.0.1:1", "127.0.0.2:443")));
    assert!(p.matches(&conn(None, "127.0.0.1:1", "127.0.0.2:443")));
    assert!(!p.matches(&conn(Some(&bad), "127.0.0.1:1", "127.0.0.2:80")));
}

#[test]
fn empty_structures_follow_ztunnel() {
    let f = Fixtures::new();
    let p = |rules| policy("ns", "empty", RbacScope::Global, RbacAction::Allow, rules);
    // No rules: nothing matches.
    assert!(!p(vec![]).matches(&f.tls()));
    // A rule with no clauses, or with an empty clause: everything matches.
    assert!(p(vec![vec![]]).matches(&f.plaintext()));
    assert!(p(vec![vec![vec![]]]).matches(&f.plaintext()));
    // A match with no field set matches nothing, and is skipped among others.
    assert!(!p(one(RbacMatch::default())).matches(&f.plaintext()));
    assert!(p(vec![vec![vec![RbacMatch::default(), ports(&[8080])]]]).matches(&f.plaintext()));
    assert!(RbacMatch::default().is_empty());
    assert!(!ports(&[1]).is_empty());

    // So an ALLOW with no rules allows nothing, a DENY with no rules denies nothing.
    let allow_nothing = PolicySet::new([policy("ns", "a", RbacScope::Global, RbacAction::Allow, vec![])]);
    assert_eq!(allow_nothing.evaluate(&workload("ns"), &f.tls()).decision, NOT_ALLOWED);
    let deny_nothing = PolicySet::new([policy("ns", "d", RbacScope::Global, RbacAction::Deny, vec![])]);
    assert!(deny_nothing.evaluate(&workload("ns"), &f.tls()).is_allowed());
}

// ---------------------------------------------------------------------------------------------
// Scoping

#[test]
fn global_policies_apply_to_every_workload() {
    let f = Fixtures::new();
    let set = PolicySet::new([policy(
        "istio-system",
        "deny-all",
        RbacScope::Global,
        RbacAction::Deny,
        everything(),
    )]);
    for ns in ["istio-system", "a", "b", ""] {
        assert_eq!(
            set.evaluate(&workload(ns), &f.tls()).decision,
            deny_by("istio-system/deny-all")
        );
    }
}

#[test]
fn namespace_policies_apply_to_their_namespace_only() {
    let f = Fixtures::new();
    let set = PolicySet::new([
        policy("a", "deny-all", RbacScope::Namespace, RbacAction::Deny, everything()),
        policy("b", "allow-nothing", RbacScope::Namespace, RbacAction::Allow, vec![]),
    ]);
    assert_eq!(set.evaluate(&workload("a"), &f.tls()).decision, deny_by("a/deny-all"));
    assert_eq!(set.evaluate(&workload("b"), &f.tls()).decision, NOT_ALLOWED);
    assert!(set.evaluate(&workload("c"), &f.tls()).is_allowed());
}

#[test]
fn selector_policies_apply_to_the_workloads_that_list_them() {
    let f = Fixtures::new();
    let set = PolicySet::new([
        policy(
            "a",
            "deny-all",
            RbacScope::WorkloadSelector,
            RbacAction::Deny,
            everything(),
        ),
        policy(
            "b",
            "allow-nothing",
            RbacScope::WorkloadSelector,
            RbacAction::Allow,
            vec![],
        ),
    ]);
    // Not listed: no effect, even in the policy's namespace.
    assert!(set.evaluate(&workload("a"), &f.tls()).is_allowed());
    assert!(set.evaluate(&workload("b"), &f.tls()).is_allowed());

    let listed = keys(&["a/deny-all"]);
    assert_eq!(
        set.evaluate(&WorkloadRef::new("a", &listed), &f.tls()).decision,
        deny_by("a/deny-all")
    );
    // The key decides, not the workload's namespace (ztunnel looks the key up as it is).
    assert_eq!(
        set.evaluate(&WorkloadRef::new("elsewhere", &listed), &f.tls()).decision,
        deny_by("a/deny-all")
    );
    let listed = keys(&["b/allow-nothing"]);
    assert_eq!(
        set.evaluate(&WorkloadRef::new("b", &listed), &f.tls()).decision,
        NOT_ALLOWED
    );
    // Unknown keys are skipped.
    let unknown = keys(&["a/missing", "deny-all", "/"]);
    assert!(set.evaluate(&WorkloadRef::new("a", &unknown), &f.tls()).is_allowed());
}

#[test]
fn policies_applying_twice_are_evaluated_once() {
    let f = Fixtures::new();
    let set = PolicySet::new([
        Authorization {
            dry_run: true,
            ..policy("root", "g", RbacScope::Global, RbacAction::Deny, everything())
        },
        Authorization {
            dry_run: true,
            ..policy("a", "n", RbacScope::Namespace, RbacAction::Allow, everything())
        },
        Authorization {
            dry_run: true,
            ..policy("a", "s", RbacScope::WorkloadSelector, RbacAction::Allow, everything())
        },
    ]);
    let listed = keys(&["root/g", "a/n", "a/s", "a/s"]);
    let v = set.evaluate(&WorkloadRef::new("a", &listed), &f.tls());
    let reported: Vec<&str> = v.dry_run.iter().map(|o| o.policy).collect();
    assert_eq!(reported, ["root/g", "a/n", "a/s"]);
}

#[test]
fn a_repeated_key_replaces_the_earlier_policy() {
    let f = Fixtures::new();
    let set = PolicySet::new([
        policy("ns", "p", RbacScope::Global, RbacAction::Deny, everything()),
        policy("ns", "other", RbacScope::Global, RbacAction::Allow, everything()),
        policy("ns", "p", RbacScope::Namespace, RbacAction::Allow, one(ports(&[1]))),
    ]);
    assert_eq!(set.len(), 2);
    assert_eq!(set.get("ns/p").unwrap().action, RbacAction::Allow);
    assert_eq!(set.get("ns/p").unwrap().scope, RbacScope::Namespace);
    let names: Vec<&str> = set.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["other", "p"]);
    // The global DENY is gone; the global ALLOW matches.
    assert!(set.evaluate(&workload("ns"), &f.tls()).is_allowed());
    assert_eq!(set.get("ns/missing"), None);
}

// ---------------------------------------------------------------------------------------------
// Dry-run

fn dry(p: Authorization) -> Authorization {
    Authorization { dry_run: true, ..p }
}

#[test]
fn dry_run_deny_is_reported_not_enforced() {
    let f = Fixtures::new();
    let set = PolicySet::new([dry(policy(
        "ns",
        "deny-8080",
        RbacScope::Global,
        RbacAction::Deny,
        one(ports(&[8080])),
    ))]);
    let v = set.evaluate(&workload("ns"), &f.tls());
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(
        v.dry_run,
        [DryRunOutcome {
            policy: "ns/deny-8080",
            action: RbacAction::Deny,
            matched: true
        }]
    );
    assert!(v.dry_run[0].would_deny());
    assert_eq!(v.dry_run_decision, Some(deny_by("ns/deny-8080")));

    let v = set.evaluate(&workload("ns"), &f.alt());
    assert!(v.is_allowed());
    assert!(!v.dry_run[0].matched && !v.dry_run[0].would_deny());
    assert_eq!(v.dry_run_decision, Some(Decision::Allow));
}

#[test]
fn dry_run_allow_is_reported_not_enforced() {
    let f = Fixtures::new();
    // ztunnel #1745: dry-run ALLOW policies exist and none matches: enforcing them would deny.
    let set = PolicySet::new([dry(policy(
        "ns",
        "allow-80",
        RbacScope::Namespace,
        RbacAction::Allow,
        one(ports(&[80])),
    ))]);
    let v = set.evaluate(&workload("ns"), &f.tls());
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(
        v.dry_run,
        [DryRunOutcome {
            policy: "ns/allow-80",
            action: RbacAction::Allow,
            matched: false
        }]
    );
    assert!(!v.dry_run[0].would_deny());
    assert_eq!(v.dry_run_decision, Some(NOT_ALLOWED));

    // With an enforced ALLOW that matches, enforcing the dry-run one changes nothing.
    let set = PolicySet::new([
        dry(policy(
            "ns",
            "allow-80",
            RbacScope::Namespace,
            RbacAction::Allow,
            one(ports(&[80])),
        )),
        policy(
            "ns",
            "allow-8080",
            RbacScope::Namespace,
            RbacAction::Allow,
            one(ports(&[8080])),
        ),
    ]);
    let v = set.evaluate(&workload("ns"), &f.tls());
    assert_eq!(
        (v.decision, v.dry_run_decision),
        (Decision::Allow, Some(Decision::Allow))
    );
    // And a dry-run ALLOW that matches would allow what the enforced ALLOW denies.
    let v = set.evaluate(&workload("ns"), &conn(None, "127.0.0.1:1", "127.0.0.2:80"));
    assert_eq!((v.decision, v.dry_run_decision), (NOT_ALLOWED, Some(Decision::Allow)));
}

#[test]
fn dry_run_policies_are_reported_even_when_an_enforced_deny_matches() {
    let f = Fixtures::new();
    let set = PolicySet::new([
        policy("ns", "deny", RbacScope::Global, RbacAction::Deny, everything()),
        dry(policy("ns", "dry-deny", RbacScope::Global, RbacAction::Deny, vec![])),
        dry(policy(
            "ns",
            "dry-allow",
            RbacScope::Global,
            RbacAction::Allow,
            everything(),
        )),
    ]);
    let v = set.evaluate(&workload("ns"), &f.tls());
    assert_eq!(v.decision, deny_by("ns/deny"));
    assert_eq!(v.dry_run_decision, Some(deny_by("ns/deny")));
    let outcomes: Vec<(&str, bool)> = v.dry_run.iter().map(|o| (o.policy, o.matched)).collect();
    assert_eq!(outcomes, [("ns/dry-deny", false), ("ns/dry-allow", true)]);
}

#[test]
fn dry_run_policies_of_other_workloads_are_not_reported() {
    let f = Fixtures::new();
    let set = PolicySet::new([dry(policy(
        "a",
        "deny",
        RbacScope::Namespace,
        RbacAction::Deny,
        everything(),
    ))]);
    let v = set.evaluate(&workload("b"), &f.tls());
    assert!(v.dry_run.is_empty());
    assert_eq!(v.dry_run_decision, None);
}

// ---------------------------------------------------------------------------------------------
// Plaintext and non-Istio peers

#[test]
fn plaintext_matches_no_identity_field_and_every_negated_one() {
    let f = Fixtures::new();
    let plain = f.plaintext();
    let fields: [RbacMatch; 3] = [
        RbacMatch {
            namespaces: vec![StringMatch::Presence],
            ..Default::default()
        },
        RbacMatch {
            service_accounts: vec![sa("namespace", "account")],
            ..Default::default()
        },
        RbacMatch {
            principals: vec![StringMatch::Presence],
            ..Default::default()
        },
    ];
    for m in fields {
        let p = policy("ns", "id", RbacScope::Global, RbacAction::Allow, one(m.clone()));
        assert!(!p.matches(&plain), "{m:?}");
    }
    let negated = RbacMatch {
        not_namespaces: vec![StringMatch::Presence],
        not_service_accounts: vec![sa("namespace", "account")],
        not_principals: vec![StringMatch::Presence],
        ..Default::default()
    };
    let p = policy("ns", "id", RbacScope::Global, RbacAction::Allow, one(negated));
    assert!(p.matches(&plain));
    assert!(!p.matches(&f.tls()));
}

#[test]
fn deny_without_principal_rejects_plaintext_only() {
    // Istio's "require mTLS" policy: DENY from notPrincipals ["*"].
    let f = Fixtures::new();
    let set = PolicySet::new([policy(
        "ns",
        "require-mtls",
        RbacScope::Namespace,
        RbacAction::Deny,
        one(RbacMatch {
            not_principals: vec![StringMatch::Presence],
            ..Default::default()
        }),
    )]);
    assert_eq!(
        set.evaluate(&workload("ns"), &f.plaintext()).decision,
        deny_by("ns/require-mtls")
    );
    assert!(set.evaluate(&workload("ns"), &f.tls()).is_allowed());
}

#[test]
fn non_istio_spiffe_ids_have_a_principal_but_no_namespace() {
    let spire = id("spiffe://example.org/workload/web");
    let c = conn(Some(&spire), "127.0.0.1:1", "127.0.0.2:80");
    let p = |m| policy("ns", "p", RbacScope::Global, RbacAction::Allow, one(m));
    assert!(
        p(RbacMatch {
            principals: vec![exact("example.org/workload/web")],
            ..Default::default()
        })
        .matches(&c)
    );
    assert!(
        !p(RbacMatch {
            namespaces: vec![StringMatch::Presence],
            ..Default::default()
        })
        .matches(&c)
    );
    assert!(
        p(RbacMatch {
            not_namespaces: vec![StringMatch::Presence],
            ..Default::default()
        })
        .matches(&c)
    );
    assert!(
        !p(RbacMatch {
            service_accounts: vec![sa("workload", "web")],
            ..Default::default()
        })
        .matches(&c)
    );
    // Nearly Istio paths are not Istio identities.
    for path in ["/ns/a/sa/b/c", "/ns/a/xx/b", "/ns/a", "/xx/a/sa/b"] {
        let other = id(&format!("spiffe://td{path}"));
        let c = conn(Some(&other), "127.0.0.1:1", "127.0.0.2:80");
        assert!(
            !p(RbacMatch {
                namespaces: vec![exact("a")],
                ..Default::default()
            })
            .matches(&c),
            "{path}"
        );
    }
}

#[test]
fn connection_display() {
    let f = Fixtures::new();
    assert_eq!(f.plaintext().to_string(), "127.0.0.1:1234(None)->127.0.0.2:8080");
    assert_eq!(
        f.tls().to_string(),
        "127.0.0.1:1234(spiffe://td/ns/namespace/sa/account)->127.0.0.2:8080"
    );
}

// ---------------------------------------------------------------------------------------------
// YAML (ztunnel's local configuration form)

#[test]
fn ztunnel_example_policy_parses() {
    // The `policies:` entry of ztunnel's examples/localhost.yaml.
    let yaml = r#"
- action: Allow
  rules:
  - - - notDestinationPorts:
        - 9999
  name: deny-9999
  namespace: default
  scope: Namespace
"#;
    let policies: Vec<Authorization> = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(
        policies,
        [policy(
            "default",
            "deny-9999",
            RbacScope::Namespace,
            RbacAction::Allow,
            one(RbacMatch {
                not_destination_ports: vec![9999],
                ..Default::default()
            })
        )]
    );
    let set = PolicySet::new(policies);
    assert!(
        set.evaluate(&workload("default"), &conn(None, "10.0.0.1:1", "10.0.0.2:80"))
            .is_allowed()
    );
    assert_eq!(
        set.evaluate(&workload("default"), &conn(None, "10.0.0.1:1", "10.0.0.2:9999"))
            .decision,
        NOT_ALLOWED
    );
}

const FULL: &str = r#"
- name: everything
  namespace: shop
  scope: WorkloadSelector
  action: Deny
  rules:
  - - - namespaces: [!Exact shop, !Prefix team-, !Suffix -prod, !Presence []]
        notNamespaces: [!Exact kube-system]
        serviceAccounts:
        - namespace: shop
          serviceAccount: frontend
        notServiceAccounts:
        - {namespace: shop, serviceAccount: admin}
        principals: [!Exact cluster.local/ns/shop/sa/frontend]
        notPrincipals: [!Suffix /sa/admin]
        sourceIps: [10.0.0.0/8, "fd00::/64"]
        notSourceIps: [10.9.0.0/16]
        destinationIps: [10.1.0.0/16]
        notDestinationIps: ["fd00::1/128"]
        destinationPorts: [8080]
        notDestinationPorts: [9090]
      - sourceIps: [192.168.0.0/16]
    - - destinationPorts: [80, 443]
  - []
  dryRun: true
"#;

#[test]
fn every_field_parses_and_round_trips() {
    let policies: Vec<Authorization> = serde_yaml_ng::from_str(FULL).unwrap();
    let p = &policies[0];
    assert_eq!(p.key(), "shop/everything");
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (RbacScope::WorkloadSelector, RbacAction::Deny, true)
    );
    assert_eq!(p.rules.len(), 2);
    assert_eq!(p.rules[0].len(), 2);
    assert_eq!(p.rules[0][0].len(), 2);
    assert!(p.rules[1].is_empty());
    let m = &p.rules[0][0][0];
    assert_eq!(
        m.namespaces,
        [
            exact("shop"),
            StringMatch::Prefix("team-".into()),
            StringMatch::Suffix("-prod".into()),
            StringMatch::Presence
        ]
    );
    assert_eq!(m.not_service_accounts, [sa("shop", "admin")]);
    assert_eq!(m.source_ips, [net("10.0.0.0/8"), net("fd00::/64")]);
    assert_eq!(m.not_destination_ports, [9090]);

    let yaml = serde_yaml_ng::to_string(&policies).unwrap();
    // ztunnel's spelling: tags for string matches, camelCase fields, empty fields left out.
    for expected in [
        "scope: WorkloadSelector",
        "action: Deny",
        "dryRun: true",
        "!Presence []",
        "!Exact shop",
        "serviceAccount: frontend",
        "notDestinationPorts:",
    ] {
        assert!(yaml.contains(expected), "{expected} missing from\n{yaml}");
    }
    assert!(!yaml.contains("notPrincipals: []"), "{yaml}");
    let again: Vec<Authorization> = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(again, policies);
}

#[test]
fn lenient_spellings_are_accepted() {
    let yaml = r#"
name: p
namespace: ns
scope: WORKLOAD_SELECTOR
action: DENY
rules:
- - - namespaces: [{Exact: a}, {Prefix: b}, {Presence: []}, Presence, !Presence null]
"#;
    let p: Authorization = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (RbacScope::WorkloadSelector, RbacAction::Deny, false)
    );
    assert_eq!(
        p.rules[0][0][0].namespaces,
        [
            exact("a"),
            StringMatch::Prefix("b".into()),
            StringMatch::Presence,
            StringMatch::Presence,
            StringMatch::Presence
        ]
    );
    // Through a `Value` (as a parser that reports lines might do).
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(FULL).unwrap();
    let via_value: Vec<Authorization> = serde_yaml_ng::from_value(value).unwrap();
    assert_eq!(via_value, serde_yaml_ng::from_str::<Vec<Authorization>>(FULL).unwrap());
    // Omitted rules: a policy that matches nothing.
    let p: Authorization = serde_yaml_ng::from_str("{name: p, namespace: ns, scope: Global, action: Allow}").unwrap();
    assert!(p.rules.is_empty() && !p.dry_run);
}

#[test]
fn malformed_policies_are_rejected_naming_the_problem() {
    let err = |yaml: &str| serde_yaml_ng::from_str::<Authorization>(yaml).unwrap_err().to_string();
    let base = "name: p\nnamespace: ns\nscope: Global\naction: Allow\n";
    assert!(err("name: p\nnamespace: ns\nscope: Global\n").contains("action"));
    assert!(err("name: p\nnamespace: ns\naction: Allow\n").contains("scope"));
    assert!(err(&format!("{base}dryrun: true\n")).contains("dryrun"));
    // A misspelt field inside a match would otherwise leave a match that matches nothing.
    assert!(err(&format!("{base}rules: [[[{{destinationPort: [80]}}]]]\n")).contains("destinationPort"));
    assert!(
        err(&format!(
            "{base}rules: [[[{{serviceAccounts: [{{namespace: a, sa: b}}]}}]]]\n"
        ))
        .contains("sa")
    );
    assert!(err(&format!("{base}rules: [[[{{namespaces: [!Regex a]}}]]]\n")).contains("Regex"));
    assert!(
        err(&format!(
            "{base}rules: [[[{{namespaces: [{{Exact: a, Prefix: b}}]}}]]]\n"
        ))
        .contains("one entry")
    );
    assert!(err(&format!("{base}rules: [[[{{namespaces: [a]}}]]]\n")).contains("string match"));
    assert!(err(&format!("{base}rules: [[[{{sourceIps: [10.0.0.1]}}]]]\n")).contains("sourceIps"));
    assert!(err(&format!("{base}rules: [[[{{destinationPorts: [70000]}}]]]\n")).contains("destinationPorts"));
    assert!(err("name: p\nnamespace: ns\nscope: Cluster\naction: Allow\n").contains("Cluster"));
}

// ---------------------------------------------------------------------------------------------
// Properties

/// A connection, owning its identity.
#[derive(Debug, Clone)]
struct ConnSpec {
    id: Option<SpiffeId>,
    src: SocketAddr,
    dst: SocketAddr,
}

impl ConnSpec {
    fn conn(&self) -> Connection<'_> {
        Connection {
            src_identity: self.id.as_ref(),
            src: self.src,
            dst: self.dst,
        }
    }
}

#[derive(Debug, Clone)]
struct WorkloadSpec {
    namespace: String,
    policies: Vec<String>,
}

impl WorkloadSpec {
    fn workload(&self) -> WorkloadRef<'_> {
        WorkloadRef::new(&self.namespace, &self.policies)
    }
}

// The values come from the pools the `authz` fuzz target draws from too.

fn string_match() -> impl Strategy<Value = StringMatch> {
    let s = || prop::sample::select(STRINGS).prop_map(String::from);
    prop_oneof![
        s().prop_map(StringMatch::Exact),
        s().prop_map(StringMatch::Prefix),
        s().prop_map(StringMatch::Suffix),
        Just(StringMatch::Presence),
    ]
}

fn sa_match() -> impl Strategy<Value = ServiceAccountMatch> {
    (prop::sample::select(NAMESPACES), prop::sample::select(SERVICE_ACCOUNTS)).prop_map(|(n, s)| sa(n, s))
}

fn net_strategy() -> impl Strategy<Value = IpNet> {
    prop::sample::select(NETS).prop_map(net)
}

/// Mostly empty, so that matches with few fields set are common.
fn values<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![4 => Just(Vec::new()), 1 => prop::collection::vec(s, 1..=2)]
}

fn rbac_match() -> impl Strategy<Value = RbacMatch> {
    let port = prop::sample::select(PORTS);
    (
        (
            values(string_match()),
            values(string_match()),
            values(sa_match()),
            values(sa_match()),
            values(string_match()),
            values(string_match()),
        ),
        (
            values(net_strategy()),
            values(net_strategy()),
            values(net_strategy()),
            values(net_strategy()),
            values(port.clone()),
            values(port),
        ),
    )
        .prop_map(
            |((ns, nns, sas, nsas, pr, npr), (sip, nsip, dip, ndip, dp, ndp))| RbacMatch {
                namespaces: ns,
                not_namespaces: nns,
                service_accounts: sas,
                not_service_accounts: nsas,
                principals: pr,
                not_principals: npr,
                source_ips: sip,
                not_source_ips: nsip,
                destination_ips: dip,
                not_destination_ips: ndip,
                destination_ports: dp,
                not_destination_ports: ndp,
            },
        )
}

fn rules() -> impl Strategy<Value = Vec<Vec<Vec<RbacMatch>>>> {
    use prop::collection::vec;
    vec(vec(vec(rbac_match(), 0..3), 0..3), 0..3)
}

fn authorization() -> impl Strategy<Value = Authorization> {
    (
        prop::sample::select(NAMESPACES),
        prop::sample::select(NAMES),
        prop_oneof![
            Just(RbacScope::Global),
            Just(RbacScope::Namespace),
            Just(RbacScope::WorkloadSelector)
        ],
        prop_oneof![Just(RbacAction::Allow), Just(RbacAction::Deny)],
        rules(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(namespace, name, scope, action, rules, dry_run)| Authorization {
            dry_run,
            ..policy(namespace, name, scope, action, rules)
        })
}

fn conn_spec() -> impl Strategy<Value = ConnSpec> {
    let ip = || prop::sample::select(IPS);
    (
        prop::option::weighted(0.8, prop::sample::select(IDS).prop_map(id)),
        ip(),
        ip(),
        prop::sample::select(PORTS),
    )
        .prop_map(|(id, src, dst, port)| ConnSpec {
            id,
            src: SocketAddr::new(src, 40000),
            dst: SocketAddr::new(dst, port),
        })
}

fn workload_spec() -> impl Strategy<Value = WorkloadSpec> {
    let key = (prop::sample::select(NAMESPACES), prop::sample::select(NAMES)).prop_map(|(n, p)| format!("{n}/{p}"));
    (
        prop::sample::select(NAMESPACES),
        prop::collection::vec(prop_oneof![key, Just("x/unknown".to_string())], 0..4),
    )
        .prop_map(|(namespace, policies)| WorkloadSpec {
            namespace: namespace.to_string(),
            policies,
        })
}

// A naive model, written from ztunnel's code rather than from the implementation: strings are built,
// the Istio identity is parsed by meshwire-identity, addresses are canonicalised.

fn naive_field<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
    let p = if pos.is_empty() { true } else { pos.iter().any(&f) };
    let n = if neg.is_empty() { true } else { !neg.iter().any(&f) };
    p && n
}

fn naive_matches(p: &Authorization, c: &ConnSpec) -> bool {
    let principal =
        c.id.as_ref()
            .map(|i| i.to_string().strip_prefix("spiffe://").unwrap().to_string());
    let istio = c.id.as_ref().and_then(|i| IstioIdentity::try_from(i).ok());
    let ns = istio.as_ref().map(|i| i.namespace());
    let (src, dst) = (c.src.ip().to_canonical(), c.dst.ip().to_canonical());
    if p.rules.is_empty() {
        return false;
    }
    for rule in &p.rules {
        let mut rule_match = true;
        for clause in rule {
            let mut clause_match = false;
            for m in clause {
                if m.is_empty() {
                    continue;
                }
                let mut ok = naive_field(&m.destination_ips, &m.not_destination_ips, |n| n.contains(&dst));
                ok &= naive_field(&m.source_ips, &m.not_source_ips, |n| n.contains(&src));
                ok &= naive_field(&m.destination_ports, &m.not_destination_ports, |x| *x == c.dst.port());
                ok &= naive_field(&m.service_accounts, &m.not_service_accounts, |s| {
                    istio
                        .as_ref()
                        .is_some_and(|i| i.namespace() == s.namespace && i.service_account() == s.service_account)
                });
                ok &= naive_field(&m.principals, &m.not_principals, |s| {
                    naive_string_match(s, principal.as_deref())
                });
                ok &= naive_field(&m.namespaces, &m.not_namespaces, |s| naive_string_match(s, ns));
                if ok {
                    clause_match = true;
                    break;
                }
            }
            if clause.is_empty() {
                clause_match = true;
            }
            rule_match &= clause_match;
        }
        if rule_match {
            return true;
        }
    }
    false
}

/// The unique policies (last definition of each key) that apply to the workload.
fn naive_applicable<'p>(policies: &'p [Authorization], w: &WorkloadSpec) -> Vec<&'p Authorization> {
    let mut out: Vec<&Authorization> = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        let replaced = policies[i + 1..].iter().any(|q| q.key() == p.key());
        let applies = match p.scope {
            RbacScope::Global => true,
            RbacScope::Namespace => p.namespace == w.namespace,
            _ => false,
        } || w.policies.contains(&p.key());
        if applies && !replaced {
            out.push(p);
        }
    }
    out
}

/// ztunnel's assert_rbac over `policies`: (allowed, denied explicitly).
fn naive_decide(policies: &[&Authorization], c: &ConnSpec) -> (bool, bool) {
    if policies
        .iter()
        .any(|p| p.action == RbacAction::Deny && naive_matches(p, c))
    {
        return (false, true);
    }
    let allows: Vec<_> = policies.iter().filter(|p| p.action == RbacAction::Allow).collect();
    (allows.is_empty() || allows.iter().any(|p| naive_matches(p, c)), false)
}

proptest! {
    #[test]
    fn evaluation_agrees_with_the_naive_model(
        policies in prop::collection::vec(authorization(), 0..6),
        w in workload_spec(),
        c in conn_spec(),
    ) {
        let set = PolicySet::new(policies.clone());
        let v = set.evaluate(&w.workload(), &c.conn());
        let applicable = naive_applicable(&policies, &w);

        let enforced: Vec<&Authorization> = applicable.iter().copied().filter(|p| !p.dry_run).collect();
        let (allowed, explicit) = naive_decide(&enforced, &c);
        prop_assert_eq!(v.is_allowed(), allowed);
        match v.decision {
            Decision::Allow => {}
            Decision::Deny(DenyReason::ExplicitlyDenied { policy }) => {
                prop_assert!(explicit);
                let p = set.get(policy).unwrap();
                prop_assert!(p.action == RbacAction::Deny && !p.dry_run && naive_matches(p, &c));
            }
            Decision::Deny(reason) => {
                prop_assert_eq!(reason, DenyReason::NotAllowed);
                prop_assert!(!explicit);
            }
        }

        let dry: Vec<&Authorization> = applicable.iter().copied().filter(|p| p.dry_run).collect();
        prop_assert_eq!(v.dry_run.len(), dry.len());
        for outcome in &v.dry_run {
            let p = set.get(outcome.policy).unwrap();
            prop_assert!(p.dry_run);
            prop_assert_eq!(outcome.action, p.action);
            prop_assert_eq!(outcome.matched, naive_matches(p, &c));
        }
        match v.dry_run_decision {
            None => prop_assert!(dry.is_empty()),
            Some(d) => {
                prop_assert!(!dry.is_empty());
                prop_assert_eq!(d.is_allowed(), naive_decide(&applicable, &c).0);
            }
        }
    }

    #[test]
    fn a_global_deny_of_everything_denies_every_connection(
        policies in prop::collection::vec(authorization(), 0..6),
        w in workload_spec(),
        c in conn_spec(),
    ) {
        let mut policies = policies;
        policies.push(policy("root", "deny-all", RbacScope::Global, RbacAction::Deny, everything()));
        let set = PolicySet::new(policies);
        prop_assert!(!set.evaluate(&w.workload(), &c.conn()).is_allowed());
    }

    #[test]
    fn adding_a_matching_allow_never_denies(
        policies in prop::collection::vec(authorization(), 0..6),
        extra_rules in rules(),
        w in workload_spec(),
        c in conn_spec(),
    ) {
        let extra = policy("root", "extra", RbacScope::Global, RbacAction::Allow, extra_rules);
        prop_assume!(extra.matches(&c.conn()));
        let before = PolicySet::new(policies.clone());
        let before = before.evaluate(&w.workload(), &c.conn()).decision;
        let mut with = policies;
        with.push(extra);
        let after = PolicySet::new(with);
        let after = after.evaluate(&w.workload(), &c.conn()).decision;
        if before.is_allowed() {
            prop_assert!(after.is_allowed());
        }
        // Unless a DENY matched, a matching ALLOW that applies always allows.
        if !matches!(before, Decision::Deny(DenyReason::ExplicitlyDenied { .. })) {
            prop_assert!(after.is_allowed());
        } else {
            prop_assert_eq!(after, before);
        }
    }

    #[test]
    fn dry_run_policies_never_change_the_decision(
        policies in prop::collection::vec(authorization(), 0..6),
        dry_policies in prop::collection::vec(authorization(), 1..4),
        w in workload_spec(),
        c in conn_spec(),
    ) {
        let enforced: Vec<Authorization> = policies.into_iter().map(|p| Authorization { dry_run: false, ..p }).collect();
        let dry_policies = dry_policies.into_iter().map(|p| Authorization {
            name: format!("dry-{}", p.name),
            dry_run: true,
            ..p
        });
        let without = PolicySet::new(enforced.clone());
        let with = PolicySet::new(enforced.into_iter().chain(dry_policies));
        let (a, b) = (without.evaluate(&w.workload(), &c.conn()), with.evaluate(&w.workload(), &c.conn()));
        prop_assert_eq!(a.decision, b.decision);
    }

    #[test]
    fn a_field_and_its_negation_are_complementary(
        field in 0..6usize,
        strings in prop::collection::vec(string_match(), 1..3),
        sas in prop::collection::vec(sa_match(), 1..3),
        nets in prop::collection::vec(net_strategy(), 1..3),
        ports in prop::collection::vec(prop::sample::select(PORTS), 1..3),
        c in conn_spec(),
    ) {
        let mut pos = RbacMatch::default();
        let mut neg = RbacMatch::default();
        match field {
            0 => (pos.namespaces, neg.not_namespaces) = (strings.clone(), strings),
            1 => (pos.service_accounts, neg.not_service_accounts) = (sas.clone(), sas),
            2 => (pos.principals, neg.not_principals) = (strings.clone(), strings),
            3 => (pos.source_ips, neg.not_source_ips) = (nets.clone(), nets),
            4 => (pos.destination_ips, neg.not_destination_ips) = (nets.clone(), nets),
            _ => (pos.destination_ports, neg.not_destination_ports) = (ports.clone(), ports),
        }
        let p = policy("ns", "pos", RbacScope::Global, RbacAction::Allow, one(pos));
        let n = policy("ns", "neg", RbacScope::Global, RbacAction::Allow, one(neg));
        prop_assert_ne!(p.matches(&c.conn()), n.matches(&c.conn()));
    }

    #[test]
    fn principal_matching_equals_matching_the_built_string(
        td in "[a-z]{1,3}(\\.[a-z]{1,3})?",
        segments in prop::collection::vec("[a-z]{1,3}", 0..4),
        cut in 0usize..40,
        kind in 0..4usize,
        noise in "[a-z/]{0,2}",
    ) {
        let spiffe = id(&format!("spiffe://{td}{}", segments.iter().map(|s| format!("/{s}")).collect::<String>()));
        let principal = spiffe.to_string().strip_prefix("spiffe://").unwrap().to_string();
        let cut = cut.min(principal.len());
        let m = match kind {
            0 => StringMatch::Exact(format!("{}{noise}", &principal[..cut])),
            1 => StringMatch::Prefix(format!("{}{noise}", &principal[..cut])),
            2 => StringMatch::Suffix(format!("{noise}{}", &principal[cut..])),
            _ => StringMatch::Presence,
        };
        let c = Connection { src_identity: Some(&spiffe), src: addr("10.0.0.1:1"), dst: addr("10.0.0.2:80") };
        let p = policy("ns", "p", RbacScope::Global, RbacAction::Allow, one(RbacMatch {
            principals: vec![m.clone()],
            ..Default::default()
        }));
        prop_assert_eq!(p.matches(&c), m.matches(&principal), "{:?} vs {}", m, principal);
    }

    #[test]
    fn policies_round_trip_through_yaml(policies in prop::collection::vec(authorization(), 0..4)) {
        let yaml = serde_yaml_ng::to_string(&policies).unwrap();
        let back: Vec<Authorization> = serde_yaml_ng::from_str(&yaml).unwrap();
        prop_assert_eq!(back, policies);
    }
}
