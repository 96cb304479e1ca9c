//! Metrics and access logs of the real proxies equal what the test sent: connection counters and
//! byte totals on `/metrics` (reporter `destination` on the server's proxy, `source` on the client's),
//! and one access-log line per connection with its byte counts. The access log is ztunnel's: its
//! layout in text and JSON, `connection complete` and `connection failed` (an inbound TLS handshake
//! that fails included), inbound `dst.addr` the HBONE address, and `/logging?level=access=warn`
//! quieting it alone.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use meshwire_identity::id::TrustDomain;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_testkit::http;
use meshwire_tests::binary;
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
