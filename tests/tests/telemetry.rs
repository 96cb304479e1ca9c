//! Metrics and access logs of the real proxies equal what the test sent: connection counters and
//! byte totals on `/metrics` (reporter `destination` on the server's proxy, `source` on the client's),
//! and one access-log line per connection with its byte counts. The access log is ztunnel's: its
//! layout in text and JSON, `connection complete` and `connection failed` (an inbound TLS handshake
//! that fails included), inbound `dst.addr` the HBONE address, and `/logging?level=access=warn`
//! quieting it alone. ztunnel's other metrics: `istio_tcp_sockets_open` back to its value once a
//! connection closes (refused ones included), the process's metrics, the locality labels, and every
//! metric and label of Istio's ztunnel dashboard on the page (`tests/fixtures/ztunnel-dashboard-queries.txt`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use hickory_proto::rr::RecordType;
use meshwire_identity::id::TrustDomain;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_testkit::http;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::hbone::{HboneClient, spiffe};
use meshwire_tests::mesh::{AccessLine, Proxy, metric_sum as sum};
use meshwire_tests::net;
use meshwire_tests::pair::Pair;

const WITHIN: Duration = Duration::from_secs(10);

/// Waits until `proxy` counts `count` closed connections with `labels`, then checks that it counts
/// as many opened, and `total` bytes each way.
fn assert_totals(proxy: &Proxy, labels: &[&str], count: u64, total: u64, context: &str) {
    let text = proxy.wait_metric("istio_tcp_connections_closed_total", labels, count);
    let context = format!("{context}\n{text}\n{}", proxy.describe());
    for (metric, expected) in [
        ("istio_tcp_connections_opened_total", count),
        ("istio_tcp_connections_closed_total", count),
        ("istio_tcp_received_bytes_total", total),
        ("istio_tcp_sent_bytes_total", total),
    ] {
        assert_eq!(sum(&text, metric, labels), expected, "{metric}: {context}");
    }
}

#[test]
fn counters_and_byte_totals_equal_what_was_sent() {
    for (a, b) in binary::pairs() {
        let pair = Pair::start(&a, &b);
        let (client, server) = (&pair.client, &pair.server);

        let sizes = [1usize, 10_000, 1_000_000];
        for size in sizes {
            let stream = pair.socks5_to_echo();
            assert!(net::echo_exchange(stream, size).unwrap().intact());
        }
        let total: u64 = sizes.iter().map(|&s| s as u64).sum();
        let count = sizes.len() as u64;

        let dst = [
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
            "destination_workload=\"server\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert_totals(server, &dst, count, total, &format!("{a} -> {b}"));

        let src = ["reporter=\"source\"", "destination_workload=\"server\""];
        assert_totals(client, &src, count, total, &format!("{a} -> {b}"));

        // One access-log line per connection on each side, with the bytes of that connection.
        for (proxy, direction) in [(server, "inbound"), (client, "outbound")] {
            let lines = proxy.wait_access_lines(direction, sizes.len(), Duration::from_secs(10));
            assert_eq!(lines.len(), sizes.len(), "{direction}\n{}", proxy.describe());
            let mut seen: Vec<u64> = lines.iter().map(|l| l.number("bytes_recv").unwrap_or(0)).collect();
            let mut sent: Vec<u64> = lines.iter().map(|l| l.number("bytes_sent").unwrap_or(0)).collect();
            seen.sort_unstable();
            sent.sort_unstable();
            let expected: Vec<u64> = sizes.iter().map(|&s| s as u64).collect();
            assert_eq!(seen, expected, "{direction} bytes_recv\n{}", proxy.describe());
            assert_eq!(sent, expected, "{direction} bytes_sent\n{}", proxy.describe());
        }
    }
}

/// Whether `time` reads as ztunnel's time stamps: RFC 3339 in UTC with microseconds,
/// `2025-01-23T05:07:25.806642Z`.
fn is_ztunnel_time(time: &str) -> bool {
    let digits = |range: std::ops::Range<usize>| time.get(range).is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()));
    time.len() == 27
        && digits(0..4)
        && digits(5..7)
        && digits(8..10)
        && digits(11..13)
        && digits(14..16)
        && digits(17..19)
        && digits(20..26)
        && time.as_bytes()[4] == b'-'
        && time.as_bytes()[7] == b'-'
        && time.as_bytes()[10] == b'T'
        && time.as_bytes()[13] == b':'
        && time.as_bytes()[16] == b':'
        && time.as_bytes()[19] == b'.'
        && time.ends_with('Z')
}

/// Speaks plaintext HTTP to the inbound HBONE port `hbone` (a TLS port): the handshake fails.
/// Returns the client's address.
fn plaintext_to(hbone: SocketAddr) -> SocketAddr {
    let mut tcp = TcpStream::connect(hbone).unwrap();
    tcp.set_read_timeout(Some(WITHIN)).unwrap();
    let local = tcp.local_addr().unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: server\r\n\r\n").unwrap();
    let _ = tcp.read_to_end(&mut Vec::new());
    local
}

/// Opens a tunnel to `hbone` with a certificate of a CA the mesh does not trust (the client trusts
/// the server, so it gets as far as presenting it): the server's TLS handshake fails.
fn untrusted_client_to(pair: &Pair, hbone: SocketAddr) {
    let foreign = LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap();
    let mut credentials = foreign.issue(&spiffe("default", "client")).unwrap();
    credentials.bundles = pair.mesh.ca().bundle_set().clone();
    let client = HboneClient::with_credentials(&credentials, &[spiffe("default", "server")]);
    assert!(
        client.open(hbone, pair.echo.addr()).is_err(),
        "an untrusted client was let in"
    );
}

/// The access lines of `proxy` with `message` whose field `key` is `value`, once there is one.
fn wait_line(proxy: &Proxy, message: &str, key: &str, value: &str) -> AccessLine {
    proxy
        .wait_for_log(&["\taccess\t", message, &format!("{key}={value}")], WITHIN)
        .and_then(|raw| AccessLine::parse(&raw))
        .unwrap_or_else(|| panic!("no `{message}` line with {key}={value}\n{}", proxy.describe()))
}

/// The raw text line (five tab-separated columns) of `proxy` holding every one of `needles`.
fn raw_line(proxy: &Proxy, needles: &[&str]) -> String {
    proxy
        .wait_for_log(needles, WITHIN)
        .unwrap_or_else(|| panic!("no line with {needles:?}\n{}", proxy.describe()))
}

#[test]
fn access_lines_have_ztunnel_layout_and_inbound_dst_addr_is_the_hbone_address() {
    for binary in binary::all() {
        let pair = Pair::start(&binary, &binary);
        let hbone = pair.server.ports().inbound;
        let echo = pair.echo.addr();
        assert!(net::echo_exchange(pair.socks5_to_echo(), 1000).unwrap().intact());

        // A complete line: `<time>\tinfo\taccess\tconnection complete\t<fields>`, ztunnel's fields in
        // ztunnel's order; inbound, `dst.addr` is the HBONE address the connection arrived on and
        // `dst.hbone_addr` the CONNECT target, both bare; `dst.service` the service whose target port
        // the CONNECT named, as ztunnel guesses it; strings quoted.
        let raw = raw_line(&pair.server, &["\tconnection complete\t", "direction=\"inbound\""]);
        let columns: Vec<&str> = raw.split('\t').collect();
        assert_eq!(columns.len(), 5, "{binary}: {raw:?}");
        assert!(is_ztunnel_time(columns[0]), "{binary}: {raw:?}");
        assert_eq!(
            columns[1..4],
            ["info", "access", "connection complete"],
            "{binary}: {raw:?}"
        );
        let fields = columns[4];
        assert!(fields.starts_with("src.addr=127.0.0.1:"), "{binary}: {fields}");
        assert!(
            fields.contains(&format!(
                r#" src.workload="client" src.namespace="default" src.identity="spiffe://cluster.local/ns/default/sa/client" dst.addr={hbone} dst.hbone_addr={echo} dst.service="echo.default.svc.cluster.local" dst.workload="server" dst.namespace="default" dst.identity="spiffe://cluster.local/ns/default/sa/server" direction="inbound" bytes_sent=1000 bytes_recv=1000 duration=""#
            )),
            "{binary}: {fields}"
        );
        assert!(fields.ends_with("ms\""), "{binary}: {fields}");
        // The metrics name the same service.
        let text = pair.server.metrics();
        assert_eq!(
            sum(
                &text,
                "istio_tcp_connections_opened_total",
                &[
                    "reporter=\"destination\"",
                    "destination_service=\"echo.default.svc.cluster.local\""
                ]
            ),
            1,
            "{binary}: {text}"
        );
        let line = AccessLine::parse(&raw).unwrap();
        assert_eq!(
            line.keys(),
            [
                "src.addr",
                "src.workload",
                "src.namespace",
                "src.identity",
                "dst.addr",
                "dst.hbone_addr",
                "dst.service",
                "dst.workload",
                "dst.namespace",
                "dst.identity",
                "direction",
                "bytes_sent",
                "bytes_recv",
                "duration"
            ],
            "{binary}: {raw:?}"
        );

        // The client's proxy: `dst.addr` is where it connected (the server's HBONE address) too.
        let outbound = pair.client.wait_access_lines("outbound", 1, WITHIN);
        let out = outbound
            .first()
            .unwrap_or_else(|| panic!("{binary}: no outbound line\n{}", pair.logs()));
        assert_eq!((out.level(), out.message()), ("info", "connection complete"), "{out:?}");
        assert_eq!(out.get("dst.addr"), Some(hbone.to_string().as_str()), "{out:?}");
        assert_eq!(out.get("dst.hbone_addr"), Some(echo.to_string().as_str()), "{out:?}");

        // A failed line: plaintext on the HBONE port fails the TLS handshake, and it is logged as
        // `<time>\twarn\taccess\tconnection failed\tsrc.addr=.. dst.addr=.. direction="inbound" error=".."`.
        let client = plaintext_to(hbone);
        let raw = raw_line(&pair.server, &["\tconnection failed\t", &format!("src.addr={client} ")]);
        let columns: Vec<&str> = raw.split('\t').collect();
        assert_eq!(columns.len(), 5, "{binary}: {raw:?}");
        assert!(is_ztunnel_time(columns[0]), "{binary}: {raw:?}");
        assert_eq!(
            columns[1..4],
            ["warn", "access", "connection failed"],
            "{binary}: {raw:?}"
        );
        assert!(
            columns[4].starts_with(&format!(
                r#"src.addr={client} dst.addr={hbone} direction="inbound" error="TLS handshake failed: "#
            )),
            "{binary}: {raw:?}"
        );
        let failed = AccessLine::parse(&raw).unwrap();
        assert_eq!(
            failed.keys(),
            ["src.addr", "dst.addr", "direction", "error"],
            "{failed:?}"
        );

        // A client presenting a certificate the mesh does not trust: a failed line naming the
        // certificate problem.
        untrusted_client_to(&pair, hbone);
        let deadline = std::time::Instant::now() + WITHIN;
        let untrusted = loop {
            let lines: Vec<AccessLine> = pair
                .server
                .access_lines("inbound")
                .into_iter()
                .filter(|l| l.message() == "connection failed" && l.get("src.addr") != Some(&client.to_string()))
                .collect();
            if let Some(line) = lines.into_iter().next() {
                break line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{binary}: no failed line for the untrusted client\n{}",
                pair.server.describe()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(untrusted.level(), "warn", "{untrusted:?}");
        assert_eq!(
            untrusted.get("dst.addr"),
            Some(hbone.to_string().as_str()),
            "{untrusted:?}"
        );
        let error = untrusted.get("error").unwrap_or_default();
        assert!(
            error.starts_with("TLS handshake failed: ") && error.contains("certificate"),
            "{binary}: {untrusted:?}"
        );
        // A CONNECT refused before any policy applies (its authority is not the address the
        // connection arrived on): `connection failed` too, as ztunnel logs an early denial.
        let mesh_client = HboneClient::new(
            pair.mesh.ca(),
            &spiffe("default", "client"),
            &[spiffe("default", "server")],
        );
        assert!(mesh_client.open(hbone, SocketAddr::new(net::lo(9), 80)).is_err());
        let refused = raw_line(
            &pair.server,
            &["\tconnection failed\t", "is not the address the connection arrived on"],
        );
        let refused = AccessLine::parse(&refused).unwrap();
        assert_eq!(refused.level(), "warn", "{refused:?}");
        assert_eq!(
            refused.keys(),
            ["src.addr", "dst.addr", "direction", "error"],
            "{refused:?}"
        );
        assert_eq!(refused.get("dst.addr"), Some(hbone.to_string().as_str()), "{refused:?}");

        // The proxy still serves.
        pair.still_serves("after failed handshakes", 1024);
    }
}

/// The keys of the JSON object `line`, in the order of the line (at the top level only).
fn json_keys(line: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0usize);
    for (i, c) in line.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    in_string = false;
                    if depth == 1 && line[i + 1..].starts_with(':') {
                        keys.push(serde_json::from_str(&line[start..=i]).unwrap());
                    }
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                start = i;
            }
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ => {}
        }
    }
    keys
}

#[test]
fn json_log_has_ztunnel_keys() {
    for binary in binary::all() {
        let pair = Pair::start_with(&binary, &binary, "", |proxy| proxy.env("LOG_FORMAT", "json"));
        let hbone = pair.server.ports().inbound;
        assert!(net::echo_exchange(pair.socks5_to_echo(), 1000).unwrap().intact());
        let client = plaintext_to(hbone);
        let complete = raw_line(
            &pair.server,
            &["\"message\":\"connection complete\"", "\"direction\":\"inbound\""],
        );
        let failed = raw_line(
            &pair.server,
            &[
                "\"message\":\"connection failed\"",
                &format!("\"src.addr\":\"{client}\""),
            ],
        );

        // Every line the process writes is a JSON object with ztunnel's keys first.
        for proxy in [&pair.client, &pair.server] {
            for line in proxy.log().lines() {
                let json: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{binary}: {e}: {line:?}"));
                assert!(json["time"].as_str().is_some_and(is_ztunnel_time), "{binary}: {line}");
                assert_eq!(json_keys(line)[..3], ["level", "time", "scope"], "{binary}: {line}");
                assert!(
                    ["error", "warn", "info", "debug", "trace"].contains(&json["level"].as_str().unwrap_or_default()),
                    "{binary}: {line}"
                );
            }
        }

        let json: serde_json::Value = serde_json::from_str(&complete).unwrap();
        assert_eq!(
            json_keys(&complete),
            [
                "level",
                "time",
                "scope",
                "message",
                "src.addr",
                "src.workload",
                "src.namespace",
                "src.identity",
                "dst.addr",
                "dst.hbone_addr",
                "dst.service",
                "dst.workload",
                "dst.namespace",
                "dst.identity",
                "direction",
                "bytes_sent",
                "bytes_recv",
                "duration"
            ],
            "{binary}: {complete}"
        );
        assert_eq!(json["level"], "info", "{complete}");
        assert_eq!(json["scope"], "access", "{complete}");
        assert_eq!(json["dst.addr"], hbone.to_string(), "{complete}");
        assert_eq!(json["dst.hbone_addr"], pair.echo.addr().to_string(), "{complete}");
        assert_eq!(json["dst.service"], "echo.default.svc.cluster.local", "{complete}");
        assert_eq!(
            json["src.identity"], "spiffe://cluster.local/ns/default/sa/client",
            "{complete}"
        );
        assert_eq!(json["bytes_sent"], 1000, "numbers are JSON numbers: {complete}");
        assert_eq!(json["bytes_recv"], 1000, "{complete}");
        assert!(
            json["duration"].as_str().is_some_and(|d| d.ends_with("ms")),
            "{complete}"
        );

        let json: serde_json::Value = serde_json::from_str(&failed).unwrap();
        assert_eq!(
            json_keys(&failed),
            [
                "level",
                "time",
                "scope",
                "message",
                "src.addr",
                "dst.addr",
                "direction",
                "error"
            ],
            "{binary}: {failed}"
        );
        assert_eq!(json["level"], "warn", "{failed}");
        assert_eq!(json["scope"], "access", "{failed}");
        assert_eq!(json["dst.addr"], hbone.to_string(), "{failed}");
        assert_eq!(json["direction"], "inbound", "{failed}");
        assert!(
            json["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("TLS handshake failed: ")),
            "{failed}"
        );
    }
}

#[test]
fn logging_access_warn_quiets_complete_lines_only() {
    for binary in binary::all() {
        let pair = Pair::start(&binary, &binary);
        let (server, hbone) = (&pair.server, pair.server.ports().inbound);
        assert!(net::echo_exchange(pair.socks5_to_echo(), 100).unwrap().intact());
        wait_line(server, "\tconnection complete\t", "direction", "\"inbound\"");

        let answer = http::request_blocking(server.ports().admin, "POST", "/logging?level=access=warn").unwrap();
        assert_eq!(answer.status, 200, "{binary}: {}", answer.body);
        // Other targets still log at info: the change itself is logged.
        assert!(
            server
                .wait_for_log(&["\tinfo\t", "log filter changed", "access=warn"], WITHIN)
                .is_some(),
            "{binary}\n{}",
            server.describe()
        );

        // A second connection: counted, but its info line is filtered out ...
        assert!(net::echo_exchange(pair.socks5_to_echo(), 100).unwrap().intact());
        server.wait_metric("istio_tcp_connections_closed_total", &["reporter=\"destination\""], 2);
        // ... while warn lines of the access target still come (merged into the filter, not replacing
        // it): a failed handshake, logged after that connection ended.
        let client = plaintext_to(hbone);
        wait_line(server, "\tconnection failed\t", "src.addr", &client.to_string());
        let complete: Vec<AccessLine> = server
            .access_lines("inbound")
            .into_iter()
            .filter(|l| l.message() == "connection complete")
            .collect();
        assert_eq!(complete.len(), 1, "{binary}: {complete:?}\n{}", server.describe());
        // The client's proxy was not told anything: it still logs every connection.
        assert_eq!(
            pair.client.wait_access_lines("outbound", 2, WITHIN).len(),
            2,
            "{binary}"
        );
    }
}

/// The value of the sample of `metric` whose labels contain every one of `labels`, when there is
/// exactly one such sample.
fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    match values[..] {
        [value] => Some(value),
        _ => None,
    }
}

/// Scrapes `proxy` until its `istio_tcp_sockets_open` for `reporter` is `expected`; returns the
/// last value seen (also after 10 s without).
fn wait_sockets(proxy: &Proxy, reporter: &str, expected: f64) -> Option<f64> {
    let labels = [format!("reporter=\"{reporter}\"")];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let seen = sample(&proxy.metrics(), "istio_tcp_sockets_open", &labels);
        if seen == Some(expected) || std::time::Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sockets_open_rises_with_an_open_connection_and_returns_after_it_closes() {
    for binary in binary::all() {
        let pair = Pair::start(&binary, &binary);
        let (client, server) = (&pair.client, &pair.server);
        // A first connection sets up the pooled HBONE connection between the proxies; once it is
        // closed, the client's proxy has no accepted socket open.
        assert!(net::echo_exchange(pair.socks5_to_echo(), 100).unwrap().intact());
        assert_eq!(
            wait_sockets(client, "source", 0.0),
            Some(0.0),
            "{binary}\n{}",
            pair.logs()
        );

        // Outbound: a SOCKS5 connection held open counts on the client's proxy, as `source`.
        let mut held = pair.socks5_to_echo();
        held.write_all(b"ping").unwrap();
        let mut echoed = [0u8; 4];
        held.read_exact(&mut echoed).unwrap();
        assert_eq!(
            wait_sockets(client, "source", 1.0),
            Some(1.0),
            "{binary}\n{}",
            client.metrics()
        );
        drop(held);
        assert_eq!(
            wait_sockets(client, "source", 0.0),
            Some(0.0),
            "{binary}\n{}",
            client.metrics()
        );

        // Inbound: a tunnel of its own to the server's HBONE port counts there, as `destination`,
        // until it is closed. The pooled HBONE connections from the client's proxy count too (one
        // per core that served a connection, in the io_uring build): measured once they are up.
        let server_before = sample(
            &server.metrics(),
            "istio_tcp_sockets_open",
            &["reporter=\"destination\""],
        )
        .unwrap_or_else(|| panic!("{binary}: no gauge\n{}", server.metrics()));
        assert!(
            server_before >= 1.0,
            "{binary}: the pooled connection\n{}",
            server.metrics()
        );
        let mesh_client = HboneClient::new(
            pair.mesh.ca(),
            &spiffe("default", "client"),
            &[spiffe("default", "server")],
        );
        let tunnel = mesh_client.open(server.ports().inbound, pair.echo.addr()).unwrap();
        assert_eq!(
            wait_sockets(server, "destination", server_before + 1.0),
            Some(server_before + 1.0),
            "{binary}\n{}",
            server.metrics()
        );
        // The tunnel's connection lives until the stream and the client are both gone.
        drop((tunnel, mesh_client));
        assert_eq!(
            wait_sockets(server, "destination", server_before),
            Some(server_before),
            "{binary}\n{}",
            server.metrics()
        );

        // Error paths: a failed TLS handshake on the HBONE port, a failed SOCKS5 handshake; each
        // counted while open, and no longer once refused.
        plaintext_to(server.ports().inbound);
        let mut garbage = TcpStream::connect(client.ports().socks5).unwrap();
        garbage.set_read_timeout(Some(WITHIN)).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let _ = garbage.read_to_end(&mut Vec::new());
        assert_eq!(
            wait_sockets(server, "destination", server_before),
            Some(server_before),
            "{binary}\n{}",
            server.metrics()
        );
        assert_eq!(
            wait_sockets(client, "source", 0.0),
            Some(0.0),
            "{binary}\n{}",
            client.metrics()
        );
    }
}

#[test]
fn process_metrics_are_on_the_page_with_sane_values() {
    for binary in binary::all() {
        let pair = Pair::start(&binary, &binary);
        let text = pair.server.metrics();
        let value = |name: &str| {
            sample(&text, name, &[]).unwrap_or_else(|| panic!("{binary}: no single {name} sample\n{text}"))
        };
        let (open, max) = (value("process_open_fds"), value("process_max_fds"));
        // A running proxy holds its listeners' sockets at least.
        assert!(open >= 4.0 && open <= max, "{binary}: {open} open of {max}");
        assert!(value("process_threads") >= 1.0, "{binary}");
        assert!(value("process_resident_memory_bytes") > 0.0, "{binary}");
        assert!(
            value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"),
            "{binary}"
        );
        assert!(value("process_cpu_seconds_total") >= 0.0, "{binary}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started > 1.0e9 && started <= now + 1.0, "{binary}: {started}");
        // Holding more sockets open raises the count the proxy reports.
        let held: Vec<TcpStream> = (0..20)
            .map(|_| TcpStream::connect(pair.server.ports().inbound).unwrap())
            .collect();
        let deadline = std::time::Instant::now() + WITHIN;
        let mut now_open = open;
        while now_open < open + 20.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            now_open = sample(&pair.server.metrics(), "process_open_fds", &[]).unwrap_or(0.0);
        }
        assert!(
            now_open >= open + 20.0,
            "{binary}: {open} then {now_open} with 20 more connections"
        );
        drop(held);
        // The tokio binary also reports its data runtime, as ztunnel.
        if binary.name() == "ztunnel" {
            assert!(value("tokio_num_workers") >= 1.0, "{binary}\n{text}");
        }
    }
}

/// The pair scenario, with `locality` added to the client workload (a region only) and the server
/// workload (region and zone).
fn pair_with_locality(binary: &Binary) -> Pair {
    let echo = net::EchoServer::start(net::lo(2));
    let yaml = meshwire_tests::pair::config(echo.addr().port(), "")
        .replacen(
            "    node: node-a\n",
            "    node: node-a\n    locality: {region: eu-west}\n",
            1,
        )
        .replacen(
            "    node: node-b\n",
            "    node: node-b\n    locality: {region: us-east, zone: us-east-1b, subzone: rack-7}\n",
            1,
        );
    assert_eq!(
        yaml.matches("locality").count(),
        2,
        "the pair's configuration changed: {yaml}"
    );
    let mesh = meshwire_tests::mesh::Mesh::new(&yaml);
    let server = meshwire_tests::pair::server_proxy(&mesh, binary).spawn();
    let client = mesh
        .proxy(binary, net::lo(1))
        .dedicated("default/client/client")
        .spawn();
    Pair {
        mesh,
        client,
        server,
        echo,
    }
}

#[test]
fn locality_labels_carry_the_workloads_region_and_zone() {
    for binary in binary::all() {
        let pair = pair_with_locality(&binary);
        assert!(net::echo_exchange(pair.socks5_to_echo(), 100).unwrap().intact());
        // ztunnel's order: the four locality labels last; a zone not configured is `unknown`.
        let locality = r#"connection_security_policy="mutual_tls",source_region="eu-west",source_zone="unknown",destination_region="us-east",destination_zone="us-east-1b"}"#;
        for (proxy, reporter) in [(&pair.server, "destination"), (&pair.client, "source")] {
            let reporter = format!("reporter=\"{reporter}\"");
            let text = proxy.wait_metric("istio_tcp_connections_closed_total", &[&reporter], 1);
            for metric in [
                "istio_tcp_connections_opened_total",
                "istio_tcp_connections_closed_total",
                "istio_tcp_received_bytes_total",
                "istio_tcp_sent_bytes_total",
            ] {
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with(&format!("{metric}{{{reporter},")))
                    .collect();
                assert!(!lines.is_empty(), "{binary}: no {metric}\n{text}");
                assert!(
                    lines.iter().all(|l| l.contains(locality)),
                    "{binary}: {metric} without the locality labels {locality}\n{lines:#?}"
                );
            }
        }
    }
}

/// The labels Prometheus attaches to every series of a scrape target (from the pod, by the scrape
/// configuration's relabelling): the dashboard selects and groups by them, no proxy writes them.
const TARGET_LABELS: [&str; 4] = ["pod", "container", "cluster", "app"];

/// The dashboard's metrics that do not come from the proxy: cAdvisor's (the kubelet's) per
/// container memory and CPU, as for ztunnel.
const CADVISOR_METRICS: [&str; 2] = [
    "container_memory_working_set_bytes",
    "container_cpu_usage_seconds_total",
];

/// PromQL's words that are not metric names: the functions and keywords the dashboard uses.
const PROMQL_WORDS: [&str; 6] = ["sum", "by", "rate", "irate", "without", "on"];

/// The metric names of `expr` and, for each expression, the label names it uses (in selectors and
/// in `by (...)`). A small PromQL reader, enough for the dashboard's expressions: identifiers,
/// `{label op "value"}` selectors, `by (labels)`, `[range]` and `$variables`.
fn promql_names(expr: &str) -> (Vec<String>, Vec<String>) {
    let (mut metrics, mut labels) = (Vec::new(), Vec::new());
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut in_selector, mut in_by, mut last_word) = (0, false, false, String::new());
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if in_selector || in_by {
                labels.push(word.clone());
            } else if !PROMQL_WORDS.contains(&word.as_str()) {
                metrics.push(word.clone());
            }
            last_word = word;
            continue;
        }
        match c {
            '{' => in_selector = true,
            '}' => in_selector = false,
            '(' if last_word == "by" => in_by = true,
            ')' if in_by => in_by = false,
            _ => {}
        }
        if !c.is_whitespace() {
            last_word.clear();
        }
        i += 1;
    }
    (metrics, labels)
}

/// The dashboard's expressions (the fixture's non-comment lines).
fn dashboard_queries() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ztunnel-dashboard-queries.txt");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Every (metric, labels) pair of the dashboard the proxy must serve: the metric with the labels its
/// expression uses, less the target labels; cAdvisor's metrics left out.
fn dashboard_needs() -> Vec<(String, Vec<String>)> {
    let mut needs = Vec::new();
    let (mut seen_target, mut seen_cadvisor) = (Vec::new(), Vec::new());
    for expr in dashboard_queries() {
        let (metrics, labels) = promql_names(&expr);
        assert!(!metrics.is_empty(), "no metric read in {expr}");
        seen_target.extend(labels.iter().filter(|l| TARGET_LABELS.contains(&l.as_str())).cloned());
        let labels: Vec<String> = labels
            .into_iter()
            .filter(|l| !TARGET_LABELS.contains(&l.as_str()))
            .collect();
        for metric in metrics {
            if CADVISOR_METRICS.contains(&metric.as_str()) {
                seen_cadvisor.push(metric);
            } else {
                needs.push((metric, labels.clone()));
            }
        }
    }
    // The lists of names left out hold only names the dashboard uses.
    for name in TARGET_LABELS {
        assert!(seen_target.iter().any(|l| l == name), "{name} is not in the dashboard");
    }
    for name in CADVISOR_METRICS {
        assert!(
            seen_cadvisor.iter().any(|m| m == name),
            "{name} is not in the dashboard"
        );
    }
    needs
}

/// The metric names of `needs` without a sample line on the metrics `page`, and the labels
/// missing from every sample line of their metric.
fn missing(page: &str, needs: &[(String, Vec<String>)]) -> Vec<String> {
    let mut missing = Vec::new();
    for (metric, labels) in needs {
        let samples: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
            .collect();
        if samples.is_empty() {
            missing.push(metric.clone());
        }
        for label in labels {
            if !samples
                .iter()
                .any(|l| l.contains(&format!("{{{label}=\"")) || l.contains(&format!(",{label}=\"")))
            {
                missing.push(format!("{metric} label {label}"));
            }
        }
    }
    missing
}

#[test]
fn the_dashboard_fixture_reads_as_expected() {
    let needs = dashboard_needs();
    let names: Vec<&str> = needs.iter().map(|(m, _)| m.as_str()).collect();
    for name in [
        "istio_build",
        "istio_tcp_connections_opened_total",
        "istio_dns_requests_total",
        "process_open_fds",
        "istio_tcp_sockets_open",
        "istio_xds_connection_terminations_total",
        "workload_manager_pending_proxy_count",
    ] {
        assert!(names.contains(&name), "{name} not read from the fixture: {names:?}");
    }
    let build = needs.iter().find(|(m, _)| m == "istio_build").unwrap();
    assert_eq!(build.1, ["component", "tag"]);
    let (metrics, labels) = promql_names(r#"sum by (pod) (rate(a_total{x=~"y.*", z!="}"}[$__rate_interval])) - b"#);
    assert_eq!(
        (metrics, labels),
        (
            vec!["a_total".to_owned(), "b".to_owned()],
            vec!["pod".to_owned(), "x".to_owned(), "z".to_owned()]
        )
    );
}

#[test]
fn every_metric_and_label_of_istios_ztunnel_dashboard_is_on_the_metrics_page() {
    let needs = dashboard_needs();
    let (inpod, dedicated): (Vec<_>, Vec<_>) = needs
        .into_iter()
        .partition(|(metric, _)| metric.starts_with("workload_manager_"));
    assert!(!inpod.is_empty());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for binary in binary::all() {
        // Dedicated proxies configured by istiod (for the xDS metrics), traffic through them and a
        // DNS query: every metric but the in-pod workload manager's.
        let echo = net::EchoServer::start(net::lo(2));
        let yaml = meshwire_tests::pair::config(echo.addr().port(), "");
        let config = meshwire_dataplane::xds::LocalConfig::parse(&yaml).unwrap();
        let mesh = meshwire_tests::mesh::Mesh::new(&yaml);
        let istiod = meshwire_tests::istio::Istiod::start(&config);
        let dir = tempfile::tempdir().unwrap();
        let resolv_conf = dir.path().join("resolv.conf");
        std::fs::write(&resolv_conf, "nameserver 127.0.0.1:9\n").unwrap();
        let dns = SocketAddr::new(net::lo(1), net::free_ports(1)[0]);
        let istio_proxy = |ip, pod: &str| {
            let mut builder = mesh.proxy(&binary, ip).without_local_config();
            for (name, value) in istiod.env(pod, ip) {
                builder = builder.env(&name, &value);
            }
            builder
        };
        let server = istio_proxy(net::lo(2), "ztunnel-b")
            .dedicated("default/server/server")
            .spawn();
        let client = istio_proxy(net::lo(1), "ztunnel-a")
            .dedicated("default/client/client")
            .dns(dns, &resolv_conf)
            .spawn();
        let stream = net::socks5_connect(client.ports().socks5, &net::Socks5Target::Addr(echo.addr()))
            .unwrap_or_else(|e| panic!("{binary}: {e:?}\n{}", client.describe()));
        assert!(net::echo_exchange(stream, 1000).unwrap().intact());
        let query = meshwire_testkit::dns::query(1, "echo.default.svc.cluster.local.", RecordType::A, None);
        meshwire_testkit::dns::udp_exchange(dns, &query).unwrap_or_else(|e| panic!("{binary}: {e}"));
        let page = client.wait_metric("istio_tcp_connections_closed_total", &["reporter=\"source\""], 1);
        let page = format!("{page}\n{}", client.wait_metric("istio_dns_requests_total", &[], 1));
        let missing_here = missing(&page, &dedicated);
        assert!(missing_here.is_empty(), "{binary}: missing {missing_here:?}\n{page}");
        drop((client, server));

        // A node proxy in in-pod mode (istio-cni's socket; no pod is needed): the workload manager's.
        let page = runtime.block_on(async {
            let cni = meshwire_testkit::cni::FakeCni::start();
            let proxy =
                meshwire_tests::inpod::start(meshwire_tests::inpod::inpod_proxy(&mesh, &binary, "node-a", cni.path()))
                    .await;
            let page = meshwire_tests::inpod::blocking(move || {
                let page = proxy.metrics();
                drop(proxy);
                page
            })
            .await;
            drop(cni);
            page
        });
        let missing_here = missing(&page, &inpod);
        assert!(
            missing_here.is_empty(),
            "{binary} in-pod: missing {missing_here:?}\n{page}"
        );
        assert_eq!(
            sample(&page, "workload_manager_active_proxy_count", &[]),
            Some(0.0),
            "{page}"
        );
    }
}
