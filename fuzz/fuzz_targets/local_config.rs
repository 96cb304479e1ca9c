#![no_main]
//! The local configuration YAML (`LocalConfig::parse`, `LocalConfig::parse_file`) and the file
//! watcher that applies it (`ConfigWatcher`).
//!
//! Each input is a document. Checks:
//!
//! - parsing never panics, and gives the same answer twice; with its warnings
//!   (`LocalConfig::parse_with_warnings`), the same answer, and warnings that each name a field
//!   outside `policies` (where an unknown field is an error, not a warning);
//! - an accepted document: its policies (the one part of the configuration with a serde
//!   serialisation) written back to YAML parse back equal; indexing it (`State::new`, the
//!   `PolicySet` of a snapshot) and the lookups of every workload and service do not panic and find
//!   what the configuration holds;
//! - a file's content parses as the document does, except that one of nothing but whitespace is
//!   refused as empty;
//! - the watcher of a file holding the example configuration, after the input is written to the
//!   file and polled: a rejected document leaves the very same snapshot published (same `Arc`,
//!   same generation) and sets `last_error` to the parse error; an accepted one publishes the next
//!   generation, holding exactly the parsed configuration; the example written back is applied
//!   again (or unchanged) and clears the error.
//!
//! The watched file lives in a directory made once per process under `/dev/shm` (or the temporary
//! directory), named after the process id.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshwire_dataplane::rbac::{Authorization, PolicySet};
use meshwire_dataplane::state::{LocalProxy, State};
use meshwire_dataplane::watch::{ConfigWatcher, PollOutcome, Published};
use meshwire_dataplane::xds::{ConfigError, LocalConfig, NetworkMode, Service, Workload};

const EXAMPLE: &str = include_str!("../../dataplane/examples/localhost.yaml");

struct Watched {
    path: PathBuf,
    watcher: ConfigWatcher,
    published: Published,
}

fn watched() -> &'static Mutex<Watched> {
    static WATCHED: OnceLock<Mutex<Watched>> = OnceLock::new();
    WATCHED.get_or_init(|| {
        let base = ["/dev/shm"]
            .iter()
            .map(PathBuf::from)
            .find(|dir| dir.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("meshwire-fuzz-local-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz directory");
        let path = dir.join("config.yaml");
        std::fs::write(&path, EXAMPLE).expect("write the example configuration");
        let (watcher, published) = ConfigWatcher::start(&path).expect("the example configuration loads");
        Mutex::new(Watched {
            path,
            watcher,
            published,
        })
    })
}

/// A fixed wall-clock time for the snapshots: nothing here depends on it.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// The snapshot holds exactly `config`.
fn assert_holds(published: &Published, config: &LocalConfig) {
    let snapshot = published.load();
    // The state orders workloads by uid and services by key; the parser rejects repeats of either.
    let mut workloads: Vec<&Workload> = config.workloads.iter().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Service> = config.services.iter().collect();
    services.sort_by_key(|s| s.key());
    assert!(snapshot.state.workloads().eq(workloads));
    assert!(snapshot.state.services().eq(services));
    assert_eq!(snapshot.state.policies(), &config.policies[..]);
    let policies = PolicySet::new(config.policies.iter().cloned());
    assert!(snapshot.policies.iter().eq(policies.iter()));
}

/// Indexing an accepted configuration, and every lookup of what it holds.
fn check_state(config: &LocalConfig) {
    let state = State::new(config.clone());
    assert_eq!(state.workloads().len(), config.workloads.len());
    for workload in state.workloads() {
        // Duplicate uids and IPs are rejected by the parser, so every lookup finds this workload.
        assert_eq!(state.workload_by_uid(&workload.uid), Some(workload));
        for ip in &workload.workload_ips {
            let found = state.workload_by_ip(&workload.network, *ip);
            if workload.network_mode == NetworkMode::HostNetwork {
                assert!(found.is_none_or(|w| w.uid != workload.uid));
            } else {
                assert_eq!(found, Some(workload), "{workload} by IP {ip}");
            }
        }
        assert!(state.workload_by_name(workload.namespace(), &workload.name).is_some());
        for service in state.services_of_workload(workload) {
            assert!(workload.services.contains_key(&service.key()));
        }
    }
    for service in state.services() {
        assert_eq!(state.service_by_hostname(&service.key()), Some(service));
        for vip in &service.vips {
            assert_eq!(state.service_by_vip(&vip.network, vip.address), Some(service));
        }
        for workload in state.workloads_of_service(&service.key()) {
            assert!(workload.services.contains_key(&service.key()));
        }
    }
    let _ = state.local_identities(&LocalProxy::new());
    let policies = PolicySet::new(config.policies.iter().cloned());
    assert!(policies.len() <= config.policies.len());
}

/// The policies written back to YAML parse back equal.
fn check_policies_round_trip(policies: &[Authorization]) {
    let yaml = serde_yaml_ng::to_string(policies).expect("policies serialise");
    let back: Vec<Authorization> = serde_yaml_ng::from_str(&yaml).unwrap_or_else(|err| {
        panic!("policies written as\n{yaml}\ndo not parse back: {err}");
    });
    assert_eq!(back, policies, "written as\n{yaml}");
    let document = serde_yaml_ng::to_string(&std::collections::BTreeMap::from([("policies", policies)]))
        .expect("a configuration of policies serialises");
    let config = LocalConfig::parse(&document).unwrap_or_else(|err| {
        panic!("policies written as\n{document}\ndo not parse back as a configuration: {err}");
    });
    assert_eq!(config.policies, policies);
}

fuzz_target!(|data: &[u8]| {
    let parsed: Option<Result<LocalConfig, ConfigError>> = std::str::from_utf8(data).ok().map(LocalConfig::parse);
    if let Some(result) = &parsed {
        let text = std::str::from_utf8(data).expect("checked above");
        assert_eq!(&LocalConfig::parse(text), result, "parsing is deterministic");
        match (LocalConfig::parse_with_warnings(text), result) {
            (Ok((config, warnings)), Ok(expected)) => {
                assert_eq!(&config, expected);
                for warning in &warnings {
                    // Unknown fields inside `policies` are errors, never warnings (a top-level field
                    // whose name merely begins with `policies` is an unknown field like any other).
                    let top = warning.field.split(['.', '[']).next().unwrap_or_default();
                    assert!(!warning.field.is_empty() && top != "policies", "{warning}");
                }
            }
            (Err(err), Err(expected)) => assert_eq!(&err, expected),
            (with_warnings, expected) => panic!("{with_warnings:?} differs from {expected:?}"),
        }
        match result {
            Ok(config) => {
                check_policies_round_trip(&config.policies);
                check_state(config);
            }
            Err(err) => assert!(!err.to_string().is_empty()),
        }
    }

    let guard = watched().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Watched {
        path,
        watcher,
        published,
    } = &*guard;
    let before = published.load();
    assert!(watcher.last_error().is_none());
    // The file's content: the document's answer, except that a file of nothing but whitespace is
    // refused as empty.
    let from_file = LocalConfig::parse_file(path, data);
    match (&parsed, &from_file) {
        (Some(_), Err(ConfigError::Empty { file })) => {
            assert!(std::str::from_utf8(data).is_ok_and(|text| text.trim().is_empty()));
            assert_eq!(file, path);
        }
        (Some(parsed), from_file) => assert_eq!(parsed, from_file),
        (None, from_file) => assert!(matches!(from_file, Err(ConfigError::Read { .. })), "{from_file:?}"),
    }
    std::fs::write(path, data).expect("write the configuration file");
    let outcome = watcher.poll_once_at(now());
    let applied = match (&outcome, &from_file) {
        _ if data == EXAMPLE.as_bytes() => {
            assert!(matches!(outcome, PollOutcome::Unchanged), "{outcome:?}");
            assert!(Arc::ptr_eq(&published.load(), &before));
            false
        }
        (PollOutcome::Applied(generation), Ok(config)) => {
            assert_eq!(*generation, before.generation + 1);
            assert_eq!(published.generation(), before.generation + 1);
            assert_eq!(published.load().loaded_at, now());
            assert_holds(published, config);
            assert!(watcher.last_error().is_none());
            true
        }
        (PollOutcome::Rejected(err), from_file) => {
            match from_file {
                Ok(_) => panic!("a valid document was rejected: {err}"),
                // An invalid or empty document; not UTF-8: a read error naming the file.
                Err(want) => assert_eq!(err, want),
            }
            let after = published.load();
            assert!(
                Arc::ptr_eq(&after, &before),
                "a rejected document replaced the snapshot"
            );
            assert_eq!(after.generation, before.generation);
            assert_eq!(watcher.last_error().as_ref(), Some(err));
            false
        }
        (outcome, from_file) => panic!("unexpected poll outcome {outcome:?} for {from_file:?}"),
    };

    // Back to the example.
    std::fs::write(path, EXAMPLE).expect("restore the configuration file");
    let generation = published.generation();
    match watcher.poll_once_at(now()) {
        PollOutcome::Applied(g) if applied => assert_eq!(g, generation + 1),
        PollOutcome::Unchanged if !applied => assert!(Arc::ptr_eq(&published.load(), &before)),
        other => panic!("restoring the example gave {other:?} (applied: {applied})"),
    }
    assert!(watcher.last_error().is_none());
});
