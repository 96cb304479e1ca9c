//! What keeps a proxy answering, and only the proxy it should be: a second instance started on the
//! ports of a running one fails at start naming the port (control ports, and data ports too),
//! unless it is an explicit hand-over, which takes the control ports once the old instance has
//! drained; and a peer proxy that stops answering (`kill -STOP`) costs new connections a bounded
//! wait, after which they fail, and once it runs again they succeed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use meshwire_testkit::http;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::mesh::Proxy;
use meshwire_tests::net::{self, Socks5Target};
use meshwire_tests::pair::{self, Pair};

/// Polls `check` every 100 ms until it holds; panics with `what` after `within`.
fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the server workload's proxy a second time on `lo(2)`; `same_ports` takes every port of
/// the running one, otherwise only the inbound HBONE port is the same (the mesh's HBONE port).
/// Checks that it exits with status 1, logging `error` and that the port is in use (`port` says
/// which kind of port, for the failure message); returns it, for its log.
fn second_server_fails(pair: &Pair, b: &Binary, same_ports: bool, error: &str, port: &str) -> Proxy {
    let builder = pair::server_proxy(&pair.mesh, b);
    let builder = if same_ports {
        builder.same_ports_as(&pair.server)
    } else {
        builder
    };
    let (status, proxy) = builder.spawn_to_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{b}: {}", proxy.describe());
    assert!(
        proxy.log().contains(error) && proxy.log().contains("in use"),
        "{b}: the error names the {port}\n{}",
        proxy.describe()
    );
    proxy
}

#[test]
fn a_second_instance_on_the_same_ports_fails_at_start_naming_the_port() {
    for b in binary::all() {
        let pair = Pair::start(&b, &b);
        assert!(pair.echo_works(), "{b}: the pair serves\n{}", pair.logs());

        // Every port in use: the first control port bound names it, and nothing is bound.
        let readiness = format!("cannot listen for readiness on {}", pair.server.ports().readiness);
        let second = second_server_fails(&pair, &b, true, &readiness, "port");
        assert!(
            second.log_lines(&["listener established"]).is_empty(),
            "{b}: nothing was served\n{}",
            second.describe()
        );

        // Only a data port in use (its own control ports are free): it fails too, naming it.
        let inbound = format!("cannot listen for inbound HBONE on {}", pair.server.ports().inbound);
        let _third = second_server_fails(&pair, &b, false, &inbound, "data port");

        // The first instance still has everything: traffic, metrics, readiness, admin.
        for _ in 0..10 {
            assert!(pair.echo_works(), "{b}: the first instance serves\n{}", pair.logs());
        }
        let inbound_lines = pair
            .server
            .wait_access_lines("inbound", 11, Duration::from_secs(20))
            .len();
        assert!(
            inbound_lines >= 11,
            "{b}: every connection reached the first instance\n{}",
            pair.logs()
        );
        for (addr, path) in [
            (pair.server.ports().readiness, "/healthz/ready"),
            (pair.server.ports().metrics, "/metrics"),
            (pair.server.ports().admin, "/config_dump"),
        ] {
            let answer = http::request_blocking(addr, "GET", path).unwrap();
            assert_eq!(answer.status, 200, "{b}: {path}");
        }
    }
}

#[test]
fn a_handover_takes_the_control_ports_once_the_old_instance_has_drained() {
    for b in binary::all() {
        let Pair {
            mesh,
            client,
            server: mut old,
            echo,
        } = Pair::start(&b, &b);
        let mut new = pair::take_over(&mesh, &b, &old);

        // The old instance still holds the control ports while it runs: its admin answers.
        let ports = *old.ports();
        assert_eq!(
            http::request_blocking(ports.readiness, "GET", "/healthz/ready")
                .unwrap()
                .status,
            200
        );
        old.signal("TERM");
        let status = old.wait_exit(Duration::from_secs(20)).expect("the old instance exits");
        assert_eq!(status.code(), Some(0), "{}", old.describe());

        // The new one takes the control ports and serves everything.
        new.expect_log(
            &["took over the readiness, admin and metrics listeners"],
            "the control ports",
        );
        wait_until(Duration::from_secs(20), "the new instance ready", || {
            http::request_blocking(ports.readiness, "GET", "/healthz/ready").is_ok_and(|r| r.status == 200)
        });
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(echo.addr())).unwrap();
        assert!(net::echo_exchange(stream, 1024).unwrap().intact());
        // The access line is written when the connection ends, which may be just after the echo.
        assert!(
            !new.wait_access_lines("inbound", 1, Duration::from_secs(10)).is_empty(),
            "{}",
            new.describe()
        );
        // Its admin is its own: /quitquitquit stops it.
        assert_eq!(
            http::request_blocking(ports.admin, "POST", "/quitquitquit")
                .unwrap()
                .status,
            200
        );
        let status = new.wait_exit(Duration::from_secs(20)).expect("the new instance exits");
        assert_eq!(status.code(), Some(0), "{}", new.describe());
    }
}

#[test]
fn a_handover_gives_up_when_the_old_instance_keeps_the_control_ports() {
    for b in binary::all() {
        let pair = Pair::start(&b, &b);
        let (status, new) = pair::server_proxy(&pair.mesh, &b)
            .same_ports_as(&pair.server)
            .handover(Duration::from_secs(1))
            .spawn_to_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{b}: {}", new.describe());
        let readiness = pair.server.ports().readiness.to_string();
        assert!(
            new.log().contains(&format!(
                "cannot take over readiness on {readiness}: the port was still in use after 1s"
            )),
            "{b}: {}",
            new.describe()
        );
        assert!(pair.echo_works(), "{b}: the old instance serves on\n{}", pair.logs());
    }
}

/// Stops a process (`kill -STOP`) and lets it run again (`kill -CONT`) when dropped, so that a
/// failing test does not leave it stopped.
struct Frozen(u32);

impl Frozen {
    fn new(proxy: &Proxy) -> Frozen {
        kill("STOP", proxy.pid());
        Frozen(proxy.pid())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        kill("CONT", self.0);
    }
}

fn kill(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The documented bound of a CONNECT to a peer that stopped answering is the larger of the pool's
/// response + probe timeouts (3 s + 2 s) and the HBONE handshake timeout (10 s); this is a
/// generous margin above it for a loaded machine, and well below what it was (40 s).
const FROZEN_PEER_BOUND: Duration = Duration::from_secs(20);

#[test]
fn a_frozen_peer_fails_new_connections_within_the_bound_and_they_work_again_after() {
    for b in binary::all() {
        let pair = Pair::start(&b, &b);
        // Pooled tunnels to the server's proxy (on every core of the io_uring build).
        for _ in 0..4 {
            assert!(pair.echo_works(), "{b}: the pair serves\n{}", pair.logs());
        }

        let frozen = Frozen::new(&pair.server);
        let socks = pair.client.ports().socks5;
        let target = Socks5Target::Addr(pair.echo.addr());
        // Concurrent connects (landing on the pooled tunnels), then one more after them (a new
        // connection to the frozen peer).
        let attempt = move || {
            let started = Instant::now();
            let outcome = net::socks5_connect(socks, &target);
            (outcome.map(|_| ()), started.elapsed())
        };
        let concurrent: Vec<_> = (0..4).map(|_| thread::spawn(attempt.clone())).collect();
        let mut outcomes: Vec<_> = concurrent.into_iter().map(|t| t.join().unwrap()).collect();
        outcomes.push(attempt());
        eprintln!("{b}: connects through a frozen peer: {outcomes:?}");
        for (outcome, took) in &outcomes {
            assert!(
                outcome.is_err(),
                "{b}: a connect through a frozen peer succeeded\n{}",
                pair.client.describe()
            );
            assert!(
                *took < FROZEN_PEER_BOUND,
                "{b}: a connect waited {took:?} for a frozen peer: {outcomes:?}\n{}",
                pair.client.describe()
            );
        }

        drop(frozen);
        wait_until(Duration::from_secs(30), "connections after the peer runs again", || {
            pair.echo_works()
        });
        for _ in 0..4 {
            assert!(pair.echo_works(), "{b}: the pair serves again\n{}", pair.logs());
        }
    }
}
