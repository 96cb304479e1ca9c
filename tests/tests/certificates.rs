//! Workload certificates, whole-proxy, on both binaries: the lifetime `--cert-ttl`/`SECRET_TTL`
//! asks for, readiness and `/config_dump` when a certificate expires and when a fresh one comes,
//! a local CA whose root key is missing, the dedicated workload missing from the configuration,
//! and the back-off of failed certificate fetches.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use meshwire_identity::id::SpiffeId;
use meshwire_identity::source::Credentials;
use meshwire_identity::tls;
use meshwire_testkit::http;
use meshwire_tests::binary;
use meshwire_tests::hbone::spiffe;
use meshwire_tests::mesh::{Mesh, Proxy, ProxyBuilder};
use meshwire_tests::net::{self, EchoServer, Socks5Target, lo};
use meshwire_tests::pair;
use serde_json::Value;

/// Generous bound for anything the proxy does on its own (a file poll, a config reload).
const WITHIN: Duration = Duration::from_secs(30);

fn server_id() -> SpiffeId {
    spiffe("default", "server")
}

fn client_id() -> SpiffeId {
    spiffe("default", "client")
}

/// The readiness answer: status and body.
fn readiness(proxy: &Proxy) -> (u16, String) {
    match http::request_blocking(proxy.ports().readiness, "GET", "/healthz/ready") {
        Ok(r) => (r.status, r.body),
        Err(e) => (0, e.to_string()),
    }
}

/// Polls readiness until `accept(status, body)`, or panics after [`WITHIN`] naming `what`.
fn wait_readiness(proxy: &Proxy, what: &str, accept: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let (status, body) = readiness(proxy);
        if accept(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last readiness answer {status} {body:?}\n{}",
            proxy.describe()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The `/config_dump` entry of `id`'s certificate.
fn dumped_certificate(proxy: &Proxy, id: &SpiffeId) -> Option<Value> {
    let dump = http::request_blocking(proxy.ports().admin, "GET", "/config_dump").ok()?;
    let dump: Value = serde_json::from_str(&dump.body).ok()?;
    dump["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == id.to_string())
        .cloned()
}

/// Polls the dump until `id`'s certificate is in `state`; returns the entry.
fn wait_dumped_state(proxy: &Proxy, id: &SpiffeId, state: &str) -> Value {
    let deadline = Instant::now() + WITHIN;
    loop {
        let entry = dumped_certificate(proxy, id);
        if let Some(entry) = entry.as_ref().filter(|e| e["state"] == state) {
            return entry.clone();
        }
        assert!(
            Instant::now() < deadline,
            "certificate of {id} not {state} in /config_dump: {entry:?}\n{}",
            proxy.describe()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The validity (not before, not after) of the leaf certificate `proxy` presents on its inbound
/// HBONE listener to a mesh client, from a real TLS handshake.
fn presented_validity(mesh: &Mesh, proxy: SocketAddr, expected: &SpiffeId) -> (SystemTime, SystemTime) {
    let client = mesh.ca().issue(&client_id()).unwrap();
    let config = tls::client_config(
        &client.svid,
        &client.bundles,
        vec![expected.clone()],
        vec![b"h2".to_vec()],
    )
    .unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), tls::server_name()).unwrap();
    let mut tcp = TcpStream::connect_timeout(&proxy, Duration::from_secs(10)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .unwrap_or_else(|e| panic!("TLS handshake with {proxy}: {e}"));
    }
    let leaf = conn.peer_certificates().expect("the server presents a certificate")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let at = |t: x509_parser::time::ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp() as u64);
    (at(cert.validity().not_before), at(cert.validity().not_after))
}

/// The credentials `files` point at: PEM chain, key and the mesh's root.
struct CertFiles {
    _dir: tempfile::TempDir,
    chain: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl CertFiles {
    fn new(mesh: &Mesh, credentials: &Credentials) -> CertFiles {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles {
            chain: dir.path().join("cert-chain.pem"),
            key: dir.path().join("key.pem"),
            bundle: mesh.state_dir().join("ca").join("root-cert.pem"),
            _dir: dir,
        };
        files.write(credentials);
        files
    }

    /// Replaces the chain and key (each written aside and renamed into place).
    fn write(&self, credentials: &Credentials) {
        let replace = |path: &Path, content: String| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        };
        replace(&self.key, credentials.svid.private_key_pem());
        replace(&self.chain, credentials.svid.chain_pem());
    }

    fn apply(&self, builder: ProxyBuilder) -> ProxyBuilder {
        builder
            .arg("--cert-chain")
            .arg(self.chain.to_str().unwrap())
            .arg("--cert-key")
            .arg(self.key.to_str().unwrap())
            .arg("--trust-bundle")
            .arg(self.bundle.to_str().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// 3. --cert-ttl / SECRET_TTL
// ---------------------------------------------------------------------------------------------

#[test]
fn the_certificate_ttl_is_the_lifetime_of_the_served_certificate() {
    let ttl = Duration::from_secs(60);
    for binary in binary::all() {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(&pair::config(echo.addr().port(), ""));
        let issued_after = SystemTime::now();
        // ztunnel's variable on one, the flag on the other.
        let builder = mesh.proxy(&binary, lo(2)).dedicated("default/server/server");
        let builder = if binary.name() == "ztunnel" {
            builder.env("SECRET_TTL", "1m")
        } else {
            builder.arg("--cert-ttl").arg("1m")
        };
        let server = builder.spawn();
        let issued_before = SystemTime::now();

        // /config_dump: the certificate in service expires within the TTL.
        let entry = wait_dumped_state(&server, &server_id(), "Available");
        let left = entry["meshwire"]["secondsToExpiry"].as_i64().unwrap();
        assert!(
            (1..=60).contains(&left),
            "{binary}: expires in {left} s with a TTL of 60 s: {entry}\n{}",
            server.describe()
        );

        // The certificate a peer sees in a handshake: valid for the TTL from its issuance (whole
        // seconds), back-dated by a tenth of it at most.
        let (not_before, not_after) = presented_validity(&mesh, server.ports().inbound, &server_id());
        assert!(
            not_after + Duration::from_secs(1) >= issued_after + ttl
                && not_after <= SystemTime::now() + ttl
                && not_after <= issued_before + ttl + WITHIN,
            "{binary}: presented certificate expires at {not_after:?}, issued between {issued_after:?} and now"
        );
        let lifetime = not_after.duration_since(not_before).unwrap();
        assert!(
            lifetime >= ttl && lifetime <= ttl + ttl / 10,
            "{binary}: presented certificate valid for {lifetime:?}"
        );

        // Refreshed at half-life, not continuously, and never expired: over 40 s (two thirds of
        // the TTL), the certificate in service changes once or twice.
        let mut seen = vec![entry["meshwire"]["expirationTime"].clone()];
        let until = Instant::now() + Duration::from_secs(40);
        while Instant::now() < until {
            let entry = dumped_certificate(&server, &server_id()).expect("certificate in the dump");
            assert_eq!(entry["state"], "Available", "{binary}: {entry}\n{}", server.describe());
            if seen.last() != Some(&entry["meshwire"]["expirationTime"]) {
                seen.push(entry["meshwire"]["expirationTime"].clone());
            }
            thread::sleep(Duration::from_millis(250));
        }
        assert!(
            (2..=3).contains(&seen.len()),
            "{binary}: certificates in service over 40 s: {seen:?}\n{}",
            server.describe()
        );
        let (status, body) = readiness(&server);
        assert_eq!(status, 200, "{binary}: {body}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. An expired certificate
// ---------------------------------------------------------------------------------------------

#[test]
fn an_expired_certificate_makes_the_proxy_unready_until_a_fresh_one_is_written() {
    for binary in binary::all() {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(&pair::config(echo.addr().port(), ""));
        let short = mesh
            .ca()
            .issue_at(&server_id(), SystemTime::now(), Duration::from_secs(15))
            .unwrap();
        let expires = short.svid.not_after();
        let files = CertFiles::new(&mesh, &short);
        let server = files
            .apply(mesh.proxy(&binary, lo(2)).dedicated("default/server/server"))
            .spawn();
        wait_dumped_state(&server, &server_id(), "Available");

        // Past its expiry: not ready, naming the identity; the dump says Expired.
        while SystemTime::now() <= expires + Duration::from_secs(1) {
            thread::sleep(Duration::from_millis(100));
        }
        let (_, body) = wait_readiness(&server, "not ready once expired", |status, _| status == 500);
        assert!(
            body.contains(&server_id().to_string()) && body.contains("expired"),
            "{binary}: {body}"
        );
        let entry = wait_dumped_state(&server, &server_id(), "Expired");
        assert!(
            entry["meshwire"]["secondsToExpiry"].as_i64().unwrap() < 0,
            "{binary}: {entry}"
        );

        // A fresh certificate written to the files restores both.
        files.write(&mesh.ca().issue(&server_id()).unwrap());
        wait_readiness(&server, "ready with a fresh certificate", |status, _| status == 200);
        let entry = wait_dumped_state(&server, &server_id(), "Available");
        assert!(
            entry["meshwire"]["secondsToExpiry"].as_i64().unwrap() > 3600,
            "{binary}: {entry}"
        );
        let (_, not_after) = presented_validity(&mesh, server.ports().inbound, &server_id());
        assert!(not_after > SystemTime::now() + Duration::from_secs(3600), "{binary}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A local CA whose root key is missing
// ---------------------------------------------------------------------------------------------

#[test]
fn a_root_without_its_key_fails_the_start_and_is_not_replaced() {
    for binary in binary::all() {
        let mesh = Mesh::new(&pair::config(9, ""));
        let ca_dir = mesh.state_dir().join("ca");
        let root = ca_dir.join("root-cert.pem");
        let before = std::fs::read(&root).unwrap();
        std::fs::remove_file(ca_dir.join("ca.pem")).unwrap();

        let (status, proxy) = mesh
            .proxy(&binary, lo(1))
            .dedicated("default/client/client")
            .spawn_to_exit(WITHIN);
        assert!(!status.success(), "{binary}: {status}\n{}", proxy.describe());
        let log = proxy.log();
        assert!(
            log.contains(&ca_dir.join("ca.pem").display().to_string()) && log.contains(&root.display().to_string()),
            "{binary}: the error names both files\n{log}"
        );
        assert_eq!(
            std::fs::read(&root).unwrap(),
            before,
            "{binary}: the root was overwritten"
        );
        assert!(!ca_dir.join("ca.pem").exists(), "{binary}: a new CA was created");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. The dedicated workload missing from the configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn a_missing_dedicated_workload_keeps_the_proxy_unready_and_refusals_are_logged() {
    for binary in binary::all() {
        let echo = EchoServer::start(lo(2));
        let full = pair::config(echo.addr().port(), "");
        // The configuration without the client workload (the first of the list).
        let start = full.find("  - uid: cluster1//v1/Pod/default/client").unwrap();
        let end = full.find("  - uid: cluster1//v1/Pod/default/server").unwrap();
        let without = format!("{}{}", &full[..start], &full[end..]);
        let mesh = Mesh::new(&without);
        let _server = mesh.proxy(&binary, lo(2)).dedicated("default/server/server").spawn();
        let client = mesh
            .proxy(&binary, lo(1))
            .dedicated("default/client/client")
            .spawn_listening();

        let (_, body) = wait_readiness(&client, "not ready without its workload", |status, body| {
            status == 500 && body.contains("default/client")
        });
        assert!(body.contains("workload"), "{binary}: {body}");
        // Stays so (not a start-up transient).
        thread::sleep(Duration::from_secs(2));
        assert_eq!(readiness(&client).0, 500, "{binary}");

        // Every refusal is in the access log, as other refusals are.
        for _ in 0..3 {
            let refused = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr()));
            assert!(refused.is_err(), "{binary}: connected without a source workload");
        }
        let lines = client.wait_access_lines("outbound", 3, WITHIN);
        assert_eq!(lines.len(), 3, "{binary}: {lines:?}\n{}", client.describe());
        for line in &lines {
            assert_eq!(
                line.get("dst.addr"),
                Some(echo.addr().to_string().as_str()),
                "{binary}: {line:?}"
            );
            assert!(line.get("src.addr").is_some(), "{binary}: {line:?}");
            // Refused before any route, as ztunnel refuses a request it cannot build.
            assert_eq!(
                (line.level(), line.message()),
                ("warn", "connection failed"),
                "{line:?}"
            );
            let error = line.get("error").unwrap_or_default();
            assert!(
                error.contains("default/client") && error.contains("not in the local configuration"),
                "{binary}: {line:?}"
            );
        }

        // Added by a configuration change: ready, and its connections go through.
        mesh.write_config(&full);
        wait_readiness(&client, "ready once the workload is added", |status, _| status == 200);
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr()))
            .unwrap_or_else(|e| panic!("{binary}: {e:?}\n{}", client.describe()));
        assert!(net::echo_exchange(stream, 16 * 1024).unwrap().intact(), "{binary}");
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Back-off of failed fetches
// ---------------------------------------------------------------------------------------------

/// Seconds since midnight of a log line's timestamp (`2026-01-31T12:00:00.123456Z ...`).
fn logged_at(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// A logged `retry_in=1.5s` (`Duration`'s `Debug`), in seconds.
fn retry_in(line: &str) -> Option<f64> {
    let value = line.split("retry_in=").nth(1)?.split_whitespace().next()?;
    for (unit, scale) in [("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)] {
        if let Some(number) = value.strip_suffix(unit) {
            return Some(number.parse::<f64>().ok()? * scale);
        }
    }
    None
}

#[test]
fn a_failing_certificate_is_fetched_again_only_when_the_logged_back_off_says() {
    for binary in binary::all() {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(&pair::config(echo.addr().port(), ""));
        // Files holding another identity than the proxy's workload: every fetch fails validation.
        let files = CertFiles::new(&mesh, &mesh.ca().issue(&server_id()).unwrap());
        let client = files
            .apply(mesh.proxy(&binary, lo(1)).dedicated("default/client/client"))
            .spawn_listening();

        // Over 12 s, readiness probes and connections keep asking for the certificate.
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            let _ = readiness(&client);
            let _ = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr()));
            thread::sleep(Duration::from_millis(100));
        }

        let failures = client.log_lines(&["certificate fetch failed", "sa/client"]);
        assert!(failures.len() >= 3, "{binary}: {failures:?}\n{}", client.describe());
        // Each fetch after a failure came no sooner than the retry the failure logged.
        for pair in failures.windows(2) {
            let (Some(first), Some(next), Some(retry)) = (logged_at(&pair[0]), logged_at(&pair[1]), retry_in(&pair[0]))
            else {
                panic!("{binary}: unparsable lines {pair:?}");
            };
            assert!(
                // 0.2 s of slack for a loaded machine; a fetch that bypasses the back-off comes
                // within milliseconds of the failure.
                next - first >= retry - 0.2,
                "{binary}: fetched again after {:.3} s, the log said retry_in {retry:.3} s:\n{}\n{}",
                next - first,
                pair[0],
                pair[1]
            );
        }
        // Not ready, naming the identity whose certificate is missing.
        let (status, body) = readiness(&client);
        assert_eq!(status, 500, "{binary}: {body}");
        assert!(body.contains(&client_id().to_string()), "{binary}: {body}");
    }
}
