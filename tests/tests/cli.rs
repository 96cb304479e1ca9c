//! The proxy binary's own behaviour, for every binary: started on the example configuration
//! (`dataplane/examples/localhost.yaml`) it answers ready, carries 1 MiB through SOCKS5 -> HBONE (to
//! its own inbound listener) -> an echo server, counts the bytes in its metrics, keeps the local CA it
//! creates in its state directory, and exits 0 on SIGTERM or `POST /quitquitquit` within the drain
//! deadline. At start, an invalid local configuration, an occupied port or a bad flag make it exit
//! non-zero, naming what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use meshwire_testkit::http;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::mesh::{Mesh, Ports, Proxy, metric_sum, repo_path};
use meshwire_tests::net::{self, EchoServer, Socks5Target, lo};

const DRAIN_DEADLINE: Duration = Duration::from_secs(2);
const PAYLOAD: usize = 1024 * 1024;
/// How long a proxy that fails at start may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The example configuration, as a mesh.
fn example_mesh() -> Mesh {
    Mesh::new(&std::fs::read_to_string(repo_path("dataplane/examples/localhost.yaml")).unwrap())
}

/// A proxy for the example's workload `default/local/default` on 127.0.0.1, ready, with its state
/// (and the local CA it creates) in `state`.
fn example_proxy(mesh: &Mesh, binary: &Binary, state: &Path) -> Proxy {
    mesh.proxy(binary, lo(1))
        .dedicated("default/local/default")
        .state_dir(state)
        .drain_deadline(DRAIN_DEADLINE)
        .spawn()
}

/// Checks that `proxy`, told to stop by `what`, exits with status 0 within the drain deadline (and
/// a margin).
fn exits_0_after_draining(proxy: &mut Proxy, binary: &Binary, what: &str) {
    let status = proxy
        .wait_exit(DRAIN_DEADLINE + Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{binary}: still running after {what}\n{}", proxy.describe()));
    assert_eq!(status.code(), Some(0), "{}", proxy.describe());
}

/// Checks that the log of `proxy` contains every one of `needles`.
fn assert_logged(proxy: &Proxy, needles: &[&str]) {
    let log = proxy.log();
    for needle in needles {
        assert!(log.contains(needle), "{needle:?} missing from: {log}");
    }
}

#[test]
fn socks5_through_hbone_to_echo_is_counted_then_sigterm_drains() {
    for binary in binary::all() {
        let mesh = example_mesh();
        let state = tempfile::tempdir().unwrap();
        let mut proxy = example_proxy(&mesh, &binary, state.path());
        let ready = http::request_blocking(proxy.ports().readiness, "GET", "/healthz/ready").unwrap();
        assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"), "{binary}");

        // 1 MiB through SOCKS5 -> HBONE -> inbound -> echo.
        let echo = EchoServer::start(lo(1));
        let stream = net::socks5_connect(proxy.ports().socks5, &Socks5Target::Addr(echo.addr()))
            .unwrap_or_else(|e| panic!("{binary}: SOCKS5 CONNECT: {e:?}\n{}", proxy.describe()));
        let echoed = net::echo_exchange(stream, PAYLOAD)
            .unwrap_or_else(|e| panic!("{binary}: reading the echo: {e}\n{}", proxy.describe()));
        assert!(echoed.intact(), "{binary}: {echoed:?}\n{}", proxy.describe());
        assert_eq!(echoed.received, PAYLOAD as u64);

        // The inbound side counted the connection and every byte, both ways (recorded as they flow:
        // each wait polls until its counter is complete).
        let destination = ["reporter=\"destination\""];
        let expected = [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_received_bytes_total", PAYLOAD as u64),
            ("istio_tcp_sent_bytes_total", PAYLOAD as u64),
        ];
        for (metric, value) in expected {
            proxy.wait_metric(metric, &destination, value);
        }
        let text = proxy.metrics();
        for (metric, value) in expected {
            assert_eq!(
                metric_sum(&text, metric, &destination),
                value,
                "{binary}: {metric}\n{text}"
            );
        }

        assert!(
            state.path().join("ca").join("ca.pem").is_file(),
            "{binary}: the local CA is kept in the state directory"
        );

        // SIGTERM: drain and exit 0 within the deadline (plus a margin).
        proxy.signal("TERM");
        exits_0_after_draining(&mut proxy, &binary, "SIGTERM");
        // The connection went through the inbound HBONE listener, which logs it.
        assert_logged(&proxy, &["listener established", "direction=\"inbound\""]);
    }
}

#[test]
fn quitquitquit_drains_and_exits_0() {
    for binary in binary::all() {
        let mesh = example_mesh();
        let state = tempfile::tempdir().unwrap();
        let mut proxy = example_proxy(&mesh, &binary, state.path());
        let admin = proxy.ports().admin;

        // The admin listener is on loopback and answers; GET does not shut down.
        let dump = http::request_blocking(admin, "GET", "/config_dump").unwrap();
        assert_eq!(dump.status, 200, "{binary}: {}", dump.body);
        assert!(
            dump.body.contains("\"spiffe://cluster.local/ns/default/sa/default\""),
            "{binary}: {}",
            dump.body
        );
        assert_eq!(
            http::request_blocking(admin, "GET", "/quitquitquit").unwrap().status,
            405,
            "{binary}"
        );
        assert!(
            proxy.is_running(),
            "{binary}: GET /quitquitquit shut down\n{}",
            proxy.describe()
        );

        assert_eq!(
            http::request_blocking(admin, "POST", "/quitquitquit").unwrap().status,
            200,
            "{binary}"
        );
        exits_0_after_draining(&mut proxy, &binary, "/quitquitquit");
        assert!(proxy.log().contains("/quitquitquit"), "{}", proxy.describe());
    }
}

#[test]
fn an_occupied_admin_port_exits_1_naming_the_listener_and_address() {
    for binary in binary::all() {
        let mesh = example_mesh();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ports = Ports::free(lo(1), mesh.hbone_port());
        ports.admin = taken.local_addr().unwrap();
        let (status, proxy) = mesh.proxy(&binary, lo(1)).with_ports(ports).spawn_to_exit(EXIT_TIMEOUT);
        assert_eq!(status.code(), Some(1), "{}", proxy.describe());
        assert!(
            proxy
                .log()
                .contains(&format!("cannot listen for admin on {}", ports.admin)),
            "{}",
            proxy.describe()
        );
    }
}

#[test]
fn invalid_local_config_exits_non_zero_naming_field_and_line() {
    for binary in binary::all() {
        let mesh = Mesh::new(
            "workloads:\n- name: a\n  workloadIps: [\"10.0.0.1\"]\n- name: b\n  workloadIps: [\"10.0.0.x\"]\n",
        );
        let (status, proxy) = mesh.proxy(&binary, lo(1)).spawn_to_exit(EXIT_TIMEOUT);
        assert!(!status.success(), "{}", proxy.describe());
        assert_logged(&proxy, &["workloads[1].workloadIps[0]", "line 5"]);
    }
}

#[test]
fn invalid_flag_exits_2() {
    for binary in binary::all() {
        let output = binary.command().args(["--inbound-port", "nope"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("--inbound-port"), "{binary}: {stderr}");
    }
}

#[test]
fn version_names_the_binary_and_version_prints_ztunnels_build_info() {
    for binary in binary::all() {
        // `--version`: the binary, meshwire and the version.
        let output = binary.command().arg("--version").output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{binary}: {output:?}");
        let first = stdout.split_whitespace().next().unwrap_or_default();
        assert_eq!(first, binary.name(), "{binary}: {stdout}");
        assert!(
            stdout.contains("meshwire") && stdout.contains(env!("CARGO_PKG_VERSION")),
            "{stdout}"
        );
        // `version`: ztunnel's one line, for scripts that read it.
        let output = binary.command().arg("version").output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{binary}: {output:?}");
        assert!(
            stdout.starts_with(&format!(
                "version.BuildInfo{{Version:\"{}\", GitRevision:\"",
                env!("CARGO_PKG_VERSION")
            )),
            "{binary}: {stdout}"
        );
        for field in ["RustVersion:\"", "BuildProfile:\"", "BuildStatus:\"", "GitTag:\""] {
            assert!(stdout.contains(field), "{binary}: {stdout}");
        }
        assert_eq!(stdout.lines().count(), 1, "{binary}: {stdout}");
    }
}

/// As ztunnel's `localhost:15000`: the admin listener answers on IPv6 loopback too, on the same
/// port (where the host has IPv6 loopback).
#[test]
fn admin_answers_on_ipv6_loopback_too() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let mesh = example_mesh();
    for binary in binary::all() {
        let state = tempfile::tempdir().unwrap();
        let proxy = example_proxy(&mesh, &binary, state.path());
        let v4 = proxy.ports().admin;
        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v4.port()));
        let answer = http::request_blocking(v6, "POST", "/logging")
            .unwrap_or_else(|e| panic!("{binary}: admin on {v6}: {e}\n{}", proxy.describe()));
        assert_eq!(answer.status, 200, "{binary}: {}", answer.body);
        assert!(
            answer.body.starts_with("current log level is"),
            "{binary}: {}",
            answer.body
        );
    }
}
