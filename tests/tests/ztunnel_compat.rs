//! meshwire against ztunnel's formats, for both binaries: what an operator's tools read from
//! Istio's ztunnel, read from meshwire. ztunnel's own example configuration (a fixture copied from
//! ztunnel's repository) loads and is shown back as `staticConfig`; `/config_dump` has ztunnel's
//! keys and, for workloads, services, policies, certificates and in-pod workload state, the fields
//! `istioctl ztunnel-config` decodes (`tests/fixtures/istioctl-config-dump-fields.txt`, from
//! istioctl's `ZtunnelDump` types); the admin answers (`/logging`, unknown paths, readiness) and the
//! CPU profile (`/debug/pprof/profile`, pprof's protobuf) are ztunnel's; the startup lines scripts
//! read are ztunnel's; the access log lines (`connection complete` both ways, `connection failed`,
//! `connection opened`) have the layout, fields, order and quoting of ztunnel's lines in
//! `tests/fixtures/ztunnel-access-log.txt`. Metric names and labels against Istio's ztunnel
//! dashboard are checked in `telemetry.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use meshwire_dataplane::admin::profile::Profile;
use meshwire_testkit::http;
use meshwire_tests::binary;
use meshwire_tests::mesh::Mesh;
use meshwire_tests::net::{Socks5Target, lo};
use meshwire_tests::pair::Pair;
use prost::Message as _;
use serde_json::Value;

fn repo_path(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The fields istioctl decodes, by section: `section field` per line (`#` comments).
fn istioctl_fields() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/istioctl-config-dump-fields.txt")).unwrap();
    let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (section, field) = line.split_once(' ').expect("`section field`");
        fields
            .entry(section.to_owned())
            .or_default()
            .push(field.trim().to_owned());
    }
    fields
}

fn dump(admin: std::net::SocketAddr) -> Value {
    let reply = http::request_blocking(admin, "GET", "/config_dump").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn has_fields(what: &str, value: &Value, fields: &[String]) {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {value}"));
    for field in fields {
        assert!(object.contains_key(field), "{what}: no `{field}` in {value}");
    }
}

/// Echoes `len` bytes through the client's SOCKS5 listener to the echo server.
fn exchange(pair: &Pair, len: usize) {
    let mut stream = pair.socks5(Socks5Target::Addr(pair.echo.addr()));
    let payload = vec![7u8; len];
    stream.write_all(&payload).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), len, "{}", pair.logs());
}

const POLICY: &str = r#"
policies:
  - name: allow-client
    namespace: default
    scope: Namespace
    action: Allow
    rules:
      - - - principals: [{ Exact: "cluster.local/ns/default/sa/client" }]
"#;

/// Checks `line` against the fixture's line with `message` and `direction`: the same columns, and
/// the fields in its order, quoted as it quotes them (meshwire leaves out what it does not know, as
/// ztunnel does; the addresses, the direction and, for a complete connection, the bytes and
/// duration are always there).
fn same_layout(line: &str, message: &str, direction: &str) {
    let fixture = ztunnel_lines()
        .into_iter()
        .find(|l| l.contains(message) && l.contains(&format!("direction=\"{direction}\"")))
        .unwrap();
    let columns: Vec<&str> = line.split('\t').collect();
    let expected: Vec<&str> = fixture.split('\t').collect();
    assert_eq!(columns.len(), 5, "{line}");
    assert_eq!(columns[1..4], expected[1..4], "{line}");
    let ours = fields(columns[4]);
    let theirs = fields(expected[4]);
    let keys: Vec<&str> = ours.iter().map(|(k, _)| *k).collect();
    let order: Vec<&str> = theirs.iter().map(|(k, _)| *k).filter(|k| keys.contains(k)).collect();
    assert_eq!(keys, order, "fields out of ztunnel's order or unknown to it: {line}");
    for (key, quoted) in &ours {
        let (_, theirs_quoted) = theirs.iter().find(|(k, _)| k == key).unwrap();
        assert_eq!(quoted, theirs_quoted, "{key} quoted differently: {line}");
    }
    let mut required = vec!["src.addr", "dst.addr", "direction"];
    if message == "connection complete" {
        required.extend(["src.identity", "dst.identity", "bytes_sent", "bytes_recv", "duration"]);
    } else {
        required.push("error");
    }
    for key in required {
        assert!(keys.contains(&key), "no {key}: {line}");
    }
}

/// The lines of `tests/fixtures/ztunnel-access-log.txt`.
fn ztunnel_lines() -> Vec<String> {
    std::fs::read_to_string(repo_path("tests/fixtures/ztunnel-access-log.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// The fields of an access log line's last column: each key, and whether its value is quoted.
fn fields(column: &str) -> Vec<(&str, bool)> {
    let mut out = Vec::new();
    let mut rest = column;
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim_start();
        if let Some(quoted) = after.strip_prefix('"') {
            // A quoted value ends at the first unescaped quote.
            let mut end = 0;
            let bytes = quoted.as_bytes();
            while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
                end += 1;
            }
            out.push((key, true));
            rest = quoted.get(end + 1..).unwrap_or("");
        } else {
            out.push((key, false));
            rest = after.split_once(' ').map_or("", |(_, r)| r);
        }
    }
    out
}

#[test]
fn config_dump_has_ztunnels_shape_for_istioctl() {
    let fields = istioctl_fields();
    for binary in binary::all() {
        let pair = Pair::start_with(&binary, &binary, POLICY, |builder| builder);
        exchange(&pair, 1000);
        let dump = dump(pair.server.ports().admin);
        for key in [
            "workloads",
            "services",
            "policies",
            "stagedServices",
            "staticConfig",
            "version",
            "config",
            "certificates",
        ] {
            assert!(dump.get(key).is_some(), "{binary}: no `{key}` in /config_dump: {dump}");
        }
        has_fields("dump", &dump, &fields["dump"]);
        for workload in dump["workloads"].as_array().unwrap() {
            has_fields("workload", workload, &fields["workload"]);
        }
        let services = dump["services"].as_array().unwrap();
        assert_eq!(services.len(), 1, "{binary}: {dump}");
        has_fields("service", &services[0], &fields["service"]);
        // The echo service's endpoint: the server workload, with its port map.
        let endpoint = &services[0]["endpoints"]["cluster1//v1/Pod/default/server"];
        has_fields("endpoint", endpoint, &fields["endpoint"]);
        assert_eq!(endpoint["port"]["80"], pair.echo.addr().port(), "{binary}: {endpoint}");
        let policies = dump["policies"].as_array().unwrap();
        assert_eq!(policies.len(), 1, "{binary}: {dump}");
        has_fields("policy", &policies[0], &fields["policy"]);
        assert_eq!(
            policies[0]["rules"][0][0][0]["principals"][0]["Exact"],
            "cluster.local/ns/default/sa/client"
        );
        let certificates = dump["certificates"].as_array().unwrap();
        assert!(!certificates.is_empty(), "{binary}: {dump}");
        for certificate in certificates {
            has_fields("certificate", certificate, &fields["certificate"]);
            assert_eq!(certificate["state"], "Available", "{binary}: {certificate}");
            for cert in certificate["certChain"]
                .as_array()
                .unwrap()
                .iter()
                .chain(certificate["rootCerts"].as_array().unwrap())
            {
                has_fields("cert", cert, &fields["cert"]);
            }
        }
        // ztunnel's `version` and `config` keys.
        has_fields("version", &dump["version"], &fields["version"]);
        has_fields("config", &dump["config"], &fields["config"]);
        assert_eq!(dump["config"]["proxyMode"], "Dedicated", "{binary}");
        assert_eq!(
            dump["config"]["adminAddr"],
            pair.server.ports().admin.to_string(),
            "{binary}"
        );
        // The local configuration file as written, and meshwire's own sections aside.
        assert_eq!(
            dump["staticConfig"]["workloads"].as_array().map(Vec::len),
            Some(3),
            "{binary}: {}",
            dump["staticConfig"]
        );
        assert!(dump["meshwire"]["config"]["generation"].as_u64() >= Some(1), "{binary}");
    }
}

#[test]
fn ztunnels_example_configuration_loads_and_is_dumped_back() {
    let yaml = std::fs::read_to_string(repo_path("dataplane/tests/fixtures/ztunnel/localhost.yaml")).unwrap();
    let written: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    for binary in binary::all() {
        let mesh = Mesh::new(&yaml);
        let proxy = mesh.proxy(&binary, lo(1)).spawn();
        let dump = dump(proxy.ports().admin);
        assert_eq!(
            dump["staticConfig"], written,
            "{binary}: staticConfig is the file as written"
        );
        let uids: Vec<&str> = dump["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["uid"].as_str().unwrap())
            .collect();
        assert!(uids.contains(&"cluster1//v1/Pod/default/local"), "{binary}: {uids:?}");
        assert!(
            uids.contains(&"cluster1//v1/Pod/default/local-tcp"),
            "{binary}: {uids:?}"
        );
    }
}

#[test]
fn admin_answers_as_ztunnel_and_profiles_the_cpu() {
    for binary in binary::all() {
        let mut pair = Pair::start(&binary, &binary);
        let admin = pair.client.ports().admin;
        // /logging: POST lists or changes the level, other methods 405, a bad level 400.
        let listed = http::request_blocking(admin, "POST", "/logging").unwrap();
        assert_eq!(listed.status, 200, "{binary}");
        assert!(
            listed.body.starts_with("current log level is "),
            "{binary}: {}",
            listed.body
        );
        assert_eq!(
            http::request_blocking(admin, "GET", "/logging").unwrap().status,
            405,
            "{binary}"
        );
        let bad = http::request_blocking(admin, "POST", "/logging?level=access=loud").unwrap();
        assert_eq!(bad.status, 400, "{binary}: {}", bad.body);
        assert_eq!(
            http::request_blocking(admin, "GET", "/no-such-path").unwrap().status,
            404,
            "{binary}"
        );
        // Readiness: ztunnel's body.
        let ready = http::request_blocking(pair.client.ports().readiness, "GET", "/healthz/ready").unwrap();
        assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"), "{binary}");

        // A CPU profile of one second, taken while connections flow.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let socks = pair.client.ports().socks5;
        let target = Socks5Target::Addr(pair.echo.addr());
        let load = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(stream) = meshwire_tests::net::socks5_connect(socks, &target) {
                        let _ = meshwire_tests::net::echo_exchange(stream, 256 * 1024);
                    }
                }
            })
        };
        let started = Instant::now();
        let reply = http::request_blocking(admin, "GET", "/debug/pprof/profile?seconds=1").unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap();
        assert_eq!(reply.status, 200, "{binary}: {}", reply.body);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{binary}: sampled for the second asked"
        );
        let profile = Profile::decode(reply.bytes.as_slice()).expect("a pprof protobuf");
        let strings = &profile.string_table;
        assert_eq!(strings.first().map(String::as_str), Some(""), "{binary}");
        let types: Vec<&str> = profile
            .sample_type
            .iter()
            .map(|t| strings[usize::try_from(t.r#type).unwrap()].as_str())
            .collect();
        assert_eq!(types, ["samples", "cpu"], "{binary}");
        assert!(!profile.sample.is_empty(), "{binary}: no CPU sample under load");
        for sample in &profile.sample {
            for id in &sample.location_id {
                assert!(profile.location.iter().any(|l| l.id == *id), "{binary}: location {id}");
            }
        }
        assert_eq!(
            http::request_blocking(admin, "GET", "/debug/pprof/profile?seconds=0")
                .unwrap()
                .status,
            400,
            "{binary}"
        );
        assert!(pair.client.is_running(), "{binary}: the proxy survives profiling");
    }
}

#[test]
fn startup_lines_are_ztunnels() {
    for binary in binary::all() {
        let pair = Pair::start(&binary, &binary);
        let log = pair.server.log();
        let line = |needle: &str| {
            log.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{binary}: no line with {needle:?}\n{log}"))
                .to_owned()
        };
        // `<time>\tinfo\tztunnel\tversion: version.BuildInfo{Version:"..", ...}`
        let version = line("\tversion: version.BuildInfo{");
        assert!(version.contains("\tinfo\t"), "{binary}: {version}");
        // One `listener established` per listener, with ztunnel's component names.
        let ports = pair.server.ports();
        for (component, address) in [
            ("admin", ports.admin),
            ("stats", ports.metrics),
            ("readiness", ports.readiness),
            ("inbound", ports.inbound),
            ("outbound", ports.outbound),
        ] {
            let established = log
                .lines()
                .filter(|l| l.contains("\tlistener established\t"))
                .find(|l| l.contains(&format!("component=\"{component}\"")))
                .unwrap_or_else(|| panic!("{binary}: no {component} listener line\n{log}"));
            assert!(
                established.contains(&format!("address={address}")),
                "{binary}: {established}"
            );
        }
        // Readiness: the last task marks the server ready.
        let ready = line("marking server ready");
        assert!(ready.contains("\treadiness\tTask '"), "{binary}: {ready}");
    }
}

#[test]
fn access_log_lines_have_ztunnels_layout() {
    for binary in binary::all() {
        let pair = Pair::start_with(&binary, &binary, "", |builder| builder.log_level("info,access=debug"));
        exchange(&pair, 1000);
        let wait_line = |proxy: &meshwire_tests::mesh::Proxy, needle: &str| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(line) = proxy.log().lines().find(|l| l.contains(needle)) {
                    return line.to_owned();
                }
                assert!(
                    Instant::now() < deadline,
                    "{binary}: no {needle:?} line\n{}",
                    pair.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let line = wait_line(&pair.server, "\taccess\tconnection complete\t");
        same_layout(&line, "connection complete", "inbound");
        let outbound = wait_line(&pair.client, "\taccess\tconnection complete\t");
        same_layout(&outbound, "connection complete", "outbound");
        // A plaintext client on the HBONE port: ztunnel's `connection failed`.
        let mut plain = std::net::TcpStream::connect(pair.server.ports().inbound).unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let _ = plain.read(&mut [0u8; 64]);
        let failed = wait_line(&pair.server, "\taccess\tconnection failed\t");
        same_layout(&failed, "connection failed", "inbound");
        // At `debug`, ztunnel's `connection opened` comes first, with the fields known then.
        let log = pair.server.log();
        let opened = log
            .lines()
            .find(|l| l.contains("\tdebug\taccess\tconnection opened\t"))
            .unwrap_or_else(|| panic!("{binary}: no `connection opened`\n{log}"));
        assert!(
            opened.contains("direction=\"inbound\"") && !opened.contains("bytes_sent="),
            "{binary}: {opened}"
        );
        assert!(
            log.find(opened) < log.find(line.as_str()),
            "{binary}: opened before complete"
        );
    }
}
