#![no_main]
//! istiod's delta xDS pushes applied to the proxy's configuration store
//! (`meshwire_dataplane::istio::XdsConfig::apply`, `to_local_config`).
//!
//! The input is a sequence of frames, each `[selector: u8][length: u16, big-endian][length bytes]`;
//! the bytes are an encoded `DeltaDiscoveryResponse` (its `resources`, `removed_resources` and
//! `type_url`; a frame that does not decode is skipped). The selector picks the type the push is
//! applied as: 0 workloads and services (`istio.workload.Address`), 1 policies
//! (`istio.security.Authorization`), anything else the response's own `type_url`. The seeds
//! (`corpus/xds_resources/`) are real pushes: the mesh of `dataplane/tests/istio_xds.rs`, broken
//! resources, removals, shared addresses (written by that test file's ignored `write_fuzz_seeds`).
//!
//! The store starts holding a baseline policy, `istio-system/baseline-deny`: a global DENY of every
//! connection to port 6666. After each push:
//!
//! - nothing panics; every rejected resource is one of the push;
//! - `to_local_config()` is deterministic and a configuration the local file's validator would
//!   accept: no uid, address (per network, host-networked workloads aside), service key, VIP or
//!   policy key twice; a `State`, a snapshot and its `/config_dump` are built from it;
//! - the baseline DENY stays in force (a plaintext or mTLS connection to port 6666 of the default
//!   namespace and of every workload is denied, naming the baseline) unless a push of policies removed
//!   `istio-system/baseline-deny` or replaced it with a valid version (then the check stops).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshwire_control::proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use meshwire_control::proto::istio::security as ps;
use meshwire_dataplane::admin::config_dump;
use meshwire_dataplane::istio::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, XdsConfig};
use meshwire_dataplane::rbac::{Connection, PolicySet, WorkloadRef};
use meshwire_dataplane::state::State;
use meshwire_dataplane::watch::Snapshot;
use meshwire_dataplane::xds::{LocalConfig, NamespacedHostname, NetworkMode};
use meshwire_identity::id::SpiffeId;
use prost::Message;

const BASELINE: &str = "istio-system/baseline-deny";
const DENIED_PORT: u16 = 6666;

fn baseline() -> XdsConfig {
    let policy = ps::Authorization {
        name: "baseline-deny".into(),
        namespace: "istio-system".into(),
        scope: ps::Scope::Global as i32,
        action: ps::Action::Deny as i32,
        rules: vec![ps::Rule {
            clauses: vec![ps::Clause {
                matches: vec![ps::Match {
                    destination_ports: vec![u32::from(DENIED_PORT)],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let resource = Resource {
        name: BASELINE.into(),
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: policy.encode_to_vec(),
        }),
        ..Default::default()
    };
    let mut config = XdsConfig::new();
    let rejected = config.apply(AUTHORIZATION_TYPE_URL, vec![resource], vec![]);
    assert!(rejected.is_empty(), "the baseline policy is rejected: {rejected:?}");
    config
}

/// The pushes of the input: (type URL to apply as, response).
fn pushes(mut data: &[u8]) -> Vec<(String, DeltaDiscoveryResponse)> {
    let mut out = Vec::new();
    while let [selector, hi, lo, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (frame, tail) = rest.split_at(len);
        data = tail;
        let Ok(response) = DeltaDiscoveryResponse::decode(frame) else {
            continue;
        };
        let type_url = match selector {
            0 => ADDRESS_TYPE_URL.to_owned(),
            1 => AUTHORIZATION_TYPE_URL.to_owned(),
            _ => response.type_url.clone(),
        };
        out.push((type_url, response));
    }
    out
}

/// What the local file's validator requires, and what a `State` is built from.
fn check_config(config: &LocalConfig) {
    let mut uids = HashSet::new();
    let mut ips = HashSet::new();
    for w in &config.workloads {
        assert!(uids.insert(w.uid.as_str()), "uid {} twice", w.uid);
        if w.network_mode != NetworkMode::HostNetwork {
            for ip in &w.workload_ips {
                assert!(ips.insert((w.network.as_str(), *ip)), "{}/{ip} twice", w.network);
            }
        }
    }
    let mut keys = HashSet::new();
    let mut vips = HashSet::new();
    for s in &config.services {
        assert!(keys.insert(s.key()), "service {} twice", s.key());
        for vip in &s.vips {
            assert!(vips.insert(vip.clone()), "VIP {vip} twice");
        }
    }
    let mut policies = HashSet::new();
    for p in &config.policies {
        assert!(policies.insert(p.key()), "policy {} twice", p.key());
    }
    let state = State::new(config.clone());
    assert_eq!(state.workloads().len(), config.workloads.len());
    for w in &config.workloads {
        assert_eq!(state.workload_by_uid(&w.uid).map(|found| &found.uid), Some(&w.uid));
        if w.network_mode != NetworkMode::HostNetwork {
            for ip in &w.workload_ips {
                assert_eq!(
                    state.workload_by_ip(&w.network, *ip).map(|found| &found.uid),
                    Some(&w.uid)
                );
            }
        }
    }
    for s in &config.services {
        for vip in &s.vips {
            assert_eq!(
                state.service_by_vip(&vip.network, vip.address).map(|found| found.key()),
                Some(s.key())
            );
        }
    }
    let loaded = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let snapshot = Snapshot::new(config.clone(), 1, None, loaded);
    let _ = config_dump(&snapshot, &[], Instant::now(), loaded);
}

/// The baseline DENY denies port 6666, for the default namespace and for every workload.
fn check_baseline(config: &LocalConfig) {
    let set = PolicySet::new(config.policies.iter().cloned());
    let peer = SpiffeId::new("spiffe://cluster.local/ns/default/sa/default").expect("a valid SPIFFE ID");
    let mut targets = vec![(
        "default".to_owned(),
        Vec::new(),
        SocketAddr::from(([10, 0, 0, 1], DENIED_PORT)),
    )];
    for w in &config.workloads {
        let ip = w.workload_ips.first().copied().unwrap_or([10, 0, 0, 1].into());
        targets.push((
            w.namespace().to_owned(),
            w.authorization_policies.clone(),
            SocketAddr::new(ip, DENIED_PORT),
        ));
    }
    for (namespace, policies, dst) in &targets {
        for src_identity in [None, Some(&peer)] {
            let conn = Connection {
                src_identity,
                src: SocketAddr::from(([10, 9, 9, 9], 40000)),
                dst: *dst,
            };
            let verdict = set.evaluate(&WorkloadRef::new(namespace, policies), &conn);
            assert!(
                !verdict.is_allowed(),
                "the baseline DENY no longer denies {conn} to {namespace}: {verdict:?}"
            );
        }
    }
    assert!(set.get(BASELINE).is_some(), "the baseline policy is gone");
}

/// Every address, name and service key a configuration of the run held: where a stale entry of an
/// updated state would show.
#[derive(Default)]
struct Seen {
    ips: HashSet<(String, IpAddr)>,
    vips: HashSet<(String, IpAddr)>,
    names: HashSet<(String, String)>,
    keys: HashSet<NamespacedHostname>,
}

/// The state the proxy keeps updating with each push's delta holds what a state built from scratch
/// of the whole configuration holds, for everything seen so far.
fn check_incremental(updated: &State, local: &LocalConfig, seen: &mut Seen) {
    for w in &local.workloads {
        seen.ips
            .extend(w.workload_ips.iter().map(|ip| (w.network.clone(), *ip)));
        seen.names.insert((w.namespace().to_owned(), w.name.clone()));
        seen.keys.extend(w.services.keys().cloned());
    }
    for s in &local.services {
        seen.vips
            .extend(s.vips.iter().map(|vip| (vip.network.clone(), vip.address)));
        seen.keys.insert(s.key());
    }
    let rebuilt = State::new(local.clone());
    assert!(
        updated.workloads().eq(rebuilt.workloads()),
        "the updated state's workloads differ"
    );
    assert!(
        updated.services().eq(rebuilt.services()),
        "the updated state's services differ"
    );
    assert_eq!(updated.policies(), rebuilt.policies());
    for (network, ip) in &seen.ips {
        assert_eq!(
            updated.workload_by_ip(network, *ip),
            rebuilt.workload_by_ip(network, *ip),
            "{network}/{ip}"
        );
    }
    for (network, vip) in &seen.vips {
        assert_eq!(
            updated.service_by_vip(network, *vip),
            rebuilt.service_by_vip(network, *vip),
            "{network}/{vip}"
        );
    }
    for (namespace, name) in &seen.names {
        assert_eq!(
            updated.workload_by_name(namespace, name),
            rebuilt.workload_by_name(namespace, name)
        );
    }
    for key in &seen.keys {
        assert!(
            updated.workloads_of_service(key).eq(rebuilt.workloads_of_service(key)),
            "members of {key}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut config = baseline();
    let mut baseline_intact = true;
    check_baseline(&config.to_local_config());
    let mut state = State::default().update(config.take_delta());
    let mut seen = Seen::default();
    for (type_url, response) in pushes(data) {
        let names: HashSet<String> = response.resources.iter().map(|r| r.name.clone()).collect();
        let sent_baseline = response.resources.iter().filter(|r| r.name == BASELINE).count();
        let removed_baseline = response.removed_resources.iter().any(|n| n == BASELINE);
        let rejected = config.apply(&type_url, response.resources, response.removed_resources);
        for r in &rejected {
            assert!(names.contains(&r.name), "rejected {:?}, not in the push", r.name);
        }
        if type_url == AUTHORIZATION_TYPE_URL {
            let rejected_baseline = rejected.iter().filter(|r| r.name == BASELINE).count();
            if removed_baseline || sent_baseline > rejected_baseline {
                baseline_intact = false;
            }
        }
        let local = config.to_local_config();
        assert_eq!(local, config.to_local_config(), "to_local_config is not deterministic");
        check_config(&local);
        state = state.update(config.take_delta());
        check_incremental(&state, &local, &mut seen);
        if baseline_intact {
            check_baseline(&local);
        }
    }
});
