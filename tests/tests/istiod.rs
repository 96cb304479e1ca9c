//! Proxies configured and certified by istiod: two proxies of each binary (and a shared node proxy)
//! subscribe to one fake istiod (a real gRPC server over TLS, `meshwire_tests::istio::Istiod`), get
//! the mesh of the pair scenario over delta xDS and their certificates from its CA, carry traffic
//! with mutual TLS, and apply a pushed policy to new and established connections.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use meshwire_dataplane::xds::LocalConfig;
use meshwire_testkit::{http, measure};
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::istio::{AUTHORIZATION, Istiod};
use meshwire_tests::mesh::{Mesh, Proxy, metric_sum};
use meshwire_tests::net::{self, EchoServer, Socks5Target, lo};
use meshwire_tests::pair;
use serde_json::Value;

fn wait_until(within: Duration, what: &str, check: impl FnMut() -> bool) {
    wait_until_or(within, what, check, String::new);
}

fn wait_until_or(within: Duration, what: &str, mut check: impl FnMut() -> bool, explain: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", explain());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The readiness answer of `proxy` (status and body), for failure messages.
fn readiness(proxy: &Proxy) -> String {
    match http::request_blocking(proxy.ports().readiness, "GET", "/healthz/ready") {
        Ok(answer) => format!("{}: {} {}", proxy.ports().readiness, answer.status, answer.body),
        Err(err) => format!("{}: {err}", proxy.ports().readiness),
    }
}

fn ready(proxy: &Proxy) -> bool {
    http::request_blocking(proxy.ports().readiness, "GET", "/healthz/ready").is_ok_and(|r| r.status == 200)
}

fn config_dump(proxy: &Proxy) -> Value {
    let answer = http::request_blocking(proxy.ports().admin, "GET", "/config_dump").unwrap();
    assert_eq!(answer.status, 200);
    serde_json::from_str(&answer.body).unwrap()
}

/// The pair scenario's mesh, its echo server and a fake istiod serving it.
struct IstioPair {
    mesh: Mesh,
    istiod: Istiod,
    echo: EchoServer,
    config: LocalConfig,
}

impl IstioPair {
    fn new() -> IstioPair {
        let echo = EchoServer::start(lo(2));
        let yaml = pair::config(echo.addr().port(), "");
        let config = LocalConfig::parse(&yaml).unwrap();
        IstioPair {
            mesh: Mesh::new(&yaml),
            istiod: Istiod::start(&config),
            echo,
            config,
        }
    }

    /// A proxy of `binary` on `ip` configured by istiod (no local configuration, no local CA).
    fn proxy(&self, binary: &Binary, ip: std::net::IpAddr, pod: &str) -> meshwire_tests::mesh::ProxyBuilder {
        let mut builder = self.mesh.proxy(binary, ip).without_local_config();
        for (name, value) in self.istiod.env(pod, ip) {
            builder = builder.env(&name, &value);
        }
        builder
    }

    /// The client's and the server's dedicated proxies of `binary`, configured by istiod, once both
    /// are ready (panics with their readiness answers and logs otherwise). The server applies
    /// istiod's pushes at the default `--xds-priority` (idle), the client at `normal`.
    fn dedicated_pair(&self, binary: &Binary) -> (Proxy, Proxy) {
        let server = self
            .proxy(binary, lo(2), "ztunnel-b")
            .dedicated("default/server/server")
            .spawn_listening();
        let client = self
            .proxy(binary, lo(1), "ztunnel-a")
            .dedicated("default/client/client")
            .env("MESHWIRE_XDS_PRIORITY", "normal")
            .spawn_listening();
        wait_until_or(
            Duration::from_secs(20),
            "both proxies ready",
            || ready(&client) && ready(&server),
            || {
                format!(
                    "{}\n{}\n{}\n{}",
                    readiness(&client),
                    readiness(&server),
                    client.describe(),
                    server.describe()
                )
            },
        );
        (client, server)
    }
}

#[test]
fn two_proxies_of_each_binary_are_configured_and_certified_by_istiod() {
    for b in binary::all() {
        let mesh = IstioPair::new();
        let (client, server) = mesh.dedicated_pair(&b);
        let logs = || format!("{}\n{}", client.describe(), server.describe());

        // Each proxy ACKed a first push of both types, and nothing was NACKed.
        let answers = mesh.istiod.answers();
        assert!(answers.iter().all(|(_, nack)| nack.is_none()), "{answers:?}");
        assert!(answers.len() >= 4, "{answers:?}\n{}", logs());

        // Traffic: SOCKS5 -> HBONE (certificates from istiod's CA) -> the echo server.
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(mesh.echo.addr()))
            .unwrap_or_else(|e| panic!("{e:?}\n{}", logs()));
        assert!(net::echo_exchange(stream, 64 * 1024).unwrap().intact());
        let inbound = server.wait_access_lines("inbound", 1, Duration::from_secs(10));
        assert_eq!(
            inbound[0].get("src.identity"),
            Some("spiffe://cluster.local/ns/default/sa/client"),
            "{}",
            logs()
        );

        // The CA was asked for both identities, with the token and the cluster, without
        // impersonation (dedicated proxies ask for their own identity).
        let requests = mesh.istiod.ca_requests();
        for id in [
            "spiffe://cluster.local/ns/default/sa/client",
            "spiffe://cluster.local/ns/default/sa/server",
        ] {
            let request = requests
                .iter()
                .find(|r| r.uri_san.as_deref() == Some(id))
                .unwrap_or_else(|| panic!("no certificate request for {id}: {requests:?}"));
            assert_eq!(request.headers["authorization"], "Bearer test-token");
            assert_eq!(request.headers["clusterid"], "Kubernetes");
            assert_eq!(request.impersonated, None);
        }

        // /config_dump: the workloads istiod sent and the stream's state; the terminations metric.
        let dump = config_dump(&server);
        assert_eq!(dump["workloads"].as_array().map(Vec::len), Some(3), "{dump}");
        assert_eq!(dump["meshwire"]["istio"]["xds"]["connected"], true, "{dump}");
        assert_eq!(dump["meshwire"]["istio"]["xds"]["ready"], true, "{dump}");
        assert_eq!(
            dump["meshwire"]["istio"]["ca"]["address"],
            mesh.istiod.address().to_string(),
            "{dump}"
        );
        let metrics = server.metrics();
        assert!(metrics.contains("istio_xds_connection_terminations_total"), "{metrics}");

        // The pushes were applied on the xDS thread, at SCHED_IDLE by default and at the default
        // policy when asked (the client).
        for (proxy, priority, policy) in [
            (&server, "idle", measure::SCHED_IDLE),
            (&client, "normal", measure::SCHED_OTHER),
        ] {
            let dump = config_dump(proxy);
            let apply = &dump["meshwire"]["istio"]["xds"]["apply"];
            assert_eq!(apply["priority"], priority, "{dump}");
            assert_eq!(apply["thread"], "ztunnel-xds", "{dump}");
            assert!(apply["lastPublished"]["tookMs"].is_number(), "{dump}");
            assert_eq!(
                measure::thread_policy(proxy.pid(), "ztunnel-xds"),
                Some(policy),
                "{}: {priority}",
                b.name()
            );
        }

        // A pushed DENY of the client closes its established connection and refuses new ones.
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(mesh.echo.addr())).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        writer.write_all(b"before\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "before\n");
        let deny = format!(
            "{}policies:\n  - name: deny-client\n    namespace: default\n    scope: Namespace\n    action: Deny\n    \
             rules: [[[{{principals: [!Exact cluster.local/ns/default/sa/client]}}]]]\n",
            pair::config(mesh.echo.addr().port(), "")
        );
        let mut denied = mesh.config.clone();
        denied.policies = LocalConfig::parse(&deny).unwrap().policies;
        mesh.istiod.serve(&denied);
        let started = Instant::now();
        let mut rest = Vec::new();
        let outcome = reader.read_to_end(&mut rest);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the denied connection was not closed\n{}",
            logs()
        );
        assert!(rest.is_empty() || outcome.is_err(), "{outcome:?} {rest:?}");
        let refused = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(mesh.echo.addr()))
            .ok()
            .and_then(|s| net::echo_exchange(s, 1024).ok())
            .is_none_or(|e| !e.intact());
        assert!(
            refused,
            "a new connection of the denied client went through\n{}",
            logs()
        );
        let answers = mesh.istiod.wait_answers(Duration::from_secs(10), |a| {
            a.iter().filter(|(t, _)| t == AUTHORIZATION).count() >= 4
        });
        assert!(answers.iter().all(|(_, nack)| nack.is_none()), "{answers:?}");
    }
}

#[test]
fn a_node_proxy_fetches_the_certificates_of_its_node_as_istiod_names_them() {
    for b in binary::all() {
        let mesh = IstioPair::new();
        // A shared proxy for node-b, where the server workload runs.
        let node = mesh
            .proxy(&b, lo(2), "ztunnel-b")
            .shared()
            .env("NODE_NAME", "node-b")
            .spawn_listening();
        wait_until(Duration::from_secs(20), "the node proxy ready", || ready(&node));
        // Before any connection, it asked for the server's certificate, impersonating it.
        wait_until(Duration::from_secs(20), "the server's certificate asked for", || {
            mesh.istiod
                .ca_requests()
                .iter()
                .any(|r| r.uri_san.as_deref() == Some("spiffe://cluster.local/ns/default/sa/server"))
        });
        let requests = mesh.istiod.ca_requests();
        assert!(
            requests.iter().all(|r| r.impersonated == r.uri_san),
            "a node proxy impersonates the identity it asks for: {requests:?}"
        );
        assert!(
            requests
                .iter()
                .all(|r| r.uri_san.as_deref() != Some("spiffe://cluster.local/ns/default/sa/client")),
            "the client runs on another node: {requests:?}\n{}",
            node.describe()
        );
        let dump = config_dump(&node);
        let certificates = dump["certificates"].as_array().cloned().unwrap_or_default();
        assert!(
            certificates
                .iter()
                .any(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/server"),
            "{dump}"
        );
        // A metric of the stream, scraped: no termination yet.
        assert_eq!(
            metric_sum(&node.metrics(), "istio_xds_connection_terminations_total", &[]),
            0
        );
    }
}

#[test]
fn a_proxy_given_a_wrong_root_for_istiod_is_not_ready_and_says_why() {
    for b in binary::all() {
        let mesh = IstioPair::new();
        let wrong = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(wrong.path(), mesh.istiod.other_root_pem()).unwrap();
        let proxy = mesh
            .proxy(&b, lo(2), "ztunnel-b")
            .dedicated("default/server/server")
            .env("XDS_ROOT_CA", wrong.path().to_str().unwrap())
            .spawn_listening();
        let mut answer = None;
        wait_until(Duration::from_secs(20), "a readiness answer", || {
            answer = http::request_blocking(proxy.ports().readiness, "GET", "/healthz/ready").ok();
            answer.is_some()
        });
        let answer = answer.unwrap();
        assert_eq!(answer.status, 500, "{}", proxy.describe());
        let logged = proxy.wait_for_log(&[&mesh.istiod.address().to_string()], Duration::from_secs(20));
        assert!(logged.is_some(), "the log names istiod's address\n{}", proxy.describe());
        assert!(answer.body.contains("istiod"), "{}", answer.body);
    }
}

#[test]
fn while_istiod_is_gone_the_last_state_serves_and_the_stream_resumes_where_it_was() {
    for b in binary::all() {
        let mesh = IstioPair::new();
        let (client, server) = mesh.dedicated_pair(&b);
        let logs = || format!("{}\n{}", client.describe(), server.describe());
        let echo = |what: &str| {
            let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(mesh.echo.addr()))
                .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", logs()));
            assert!(net::echo_exchange(stream, 4096).unwrap().intact(), "{what}");
        };
        echo("before");
        let generation = metric_sum(&client.metrics(), "meshwire_config_generation", &[]);
        assert!(generation >= 1, "{}", client.metrics());

        // istiod goes away: streams end with an error and new connections are refused.
        mesh.istiod.disconnect(tonic::Code::Internal, true);
        wait_until(Duration::from_secs(10), "the streams' end counted", || {
            metric_sum(
                &client.metrics(),
                "istio_xds_connection_terminations_total",
                &["reason=\"Error\""],
            ) >= 1
        });
        std::thread::sleep(Duration::from_secs(1));
        echo("while istiod is unreachable");
        assert!(ready(&client) && ready(&server), "readiness holds\n{}", logs());
        let dump = config_dump(&client);
        assert_eq!(dump["meshwire"]["istio"]["xds"]["connected"], false, "{dump}");
        assert!(dump["meshwire"]["istio"]["xds"]["lastError"].is_string(), "{dump}");

        // istiod is back: each proxy resumes, naming the versions it holds; nothing unchanged is
        // sent again.
        let sent_before = mesh.istiod.sent().len();
        mesh.istiod.accept_again();
        wait_until(Duration::from_secs(30), "both proxies resumed", || {
            // Both proxies resubscribe to both types; only workloads and services are held (the
            // mesh has no policy).
            mesh.istiod.resumes().iter().filter(|(_, held)| *held > 0).count() >= 2 && mesh.istiod.resumes().len() >= 8
        });
        let resumed: Vec<(String, usize)> = mesh
            .istiod
            .resumes()
            .into_iter()
            .filter(|(_, held)| *held > 0)
            .collect();
        assert!(
            resumed.iter().any(|(t, held)| t.ends_with("Address") && *held == 4),
            "{resumed:?}"
        );
        let sent_after: Vec<(String, usize)> = mesh.istiod.sent().into_iter().skip(sent_before).collect();
        assert!(
            sent_after.iter().all(|(_, count)| *count == 0),
            "unchanged resources were sent again: {sent_after:?}"
        );
        echo("after istiod came back");
        // Nothing changed: no new state was built.
        assert_eq!(
            metric_sum(&client.metrics(), "meshwire_config_generation", &[]),
            generation,
            "{}",
            logs()
        );

        // MaxConnectionAge: istiod ends the stream with UNAVAILABLE; the proxy reconnects at once.
        let streams = mesh.istiod.streams();
        mesh.istiod.disconnect(tonic::Code::Unavailable, false);
        wait_until(Duration::from_secs(10), "both proxies reconnected", || {
            mesh.istiod.streams() >= streams + 2
        });
        assert!(
            metric_sum(
                &client.metrics(),
                "istio_xds_connection_terminations_total",
                &["reason=\"Reconnect\""]
            ) >= 1,
            "{}",
            client.metrics()
        );
    }
}

/// `n` workloads of another node (HBONE, one address each), as a local configuration has them.
fn bulk_workloads(n: usize) -> Vec<meshwire_dataplane::xds::Workload> {
    use std::fmt::Write as _;
    let mut yaml = String::from("workloads:\n");
    for i in 0..n {
        let _ = write!(
            yaml,
            "  - uid: Kubernetes//Pod/bulk/pod-{i}\n    name: pod-{i}\n    namespace: bulk\n    serviceAccount: sa-{}\n    \
             workloadIps: [\"10.200.{}.{}\"]\n    protocol: HBONE\n    node: another-node\n",
            i % 50,
            i / 250,
            i % 250 + 1
        );
    }
    LocalConfig::parse(&yaml).unwrap().workloads
}

/// `meshwire.istio.xds.apply` of `/config_dump`.
fn apply_view(proxy: &Proxy) -> Value {
    config_dump(proxy)["meshwire"]["istio"]["xds"]["apply"].clone()
}

#[test]
fn a_large_push_to_a_serving_proxy_told_to_pace_is_applied_in_slices_with_rests() {
    for b in binary::all() {
        let mesh = IstioPair::new();
        // The server is told to pace pushes to a quarter of one CPU; the client applies them at
        // once, as by default.
        let server = mesh
            .proxy(&b, lo(2), "ztunnel-b")
            .dedicated("default/server/server")
            .env("MESHWIRE_XDS_CPU_SHARE", "0.25")
            .spawn_listening();
        let client = mesh
            .proxy(&b, lo(1), "ztunnel-a")
            .dedicated("default/client/client")
            .spawn_listening();
        let logs = || format!("{}\n{}", client.describe(), server.describe());
        wait_until_or(
            Duration::from_secs(20),
            "both proxies ready",
            || ready(&client) && ready(&server),
            logs,
        );
        // The first push is applied at once, whatever the share: nothing is served before it.
        let first = apply_view(&server);
        assert_eq!(first["cpuShare"], 0.25, "{first}");
        assert_eq!(first["lastPublished"]["restedMs"], 0.0, "{first}");
        assert_eq!(apply_view(&client)["cpuShare"], 1.0);

        // A push of 3,000 workloads once serving: the server rests between slices of its work.
        let acked = mesh.istiod.answers().len();
        let mut bigger = mesh.config.clone();
        bigger.workloads.extend(bulk_workloads(3000));
        mesh.istiod.serve(&bigger);
        let answers = mesh
            .istiod
            .wait_answers(Duration::from_secs(60), |a| a.len() >= acked + 2);
        assert!(answers.iter().all(|(_, nack)| nack.is_none()), "{answers:?}");
        wait_until_or(
            Duration::from_secs(10),
            "both proxies hold the pushed workloads",
            || {
                [&client, &server]
                    .iter()
                    .all(|p| config_dump(p)["workloads"].as_array().map(Vec::len) == Some(3003))
            },
            logs,
        );
        let paced = apply_view(&server);
        let rested = paced["lastPublished"]["restedMs"].as_f64().unwrap();
        let took = paced["lastPublished"]["tookMs"].as_f64().unwrap();
        assert!(rested > 0.0 && rested < took, "{paced}\n{}", logs());
        let at_once = apply_view(&client);
        assert_eq!(at_once["lastPublished"]["restedMs"], 0.0, "{at_once}");

        // The data path carries traffic as before.
        let stream = net::socks5_connect(client.ports().socks5, &Socks5Target::Addr(mesh.echo.addr()))
            .unwrap_or_else(|e| panic!("{e:?}\n{}", logs()));
        assert!(net::echo_exchange(stream, 16 * 1024).unwrap().intact(), "{}", logs());
    }
}
