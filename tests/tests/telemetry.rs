//! Metrics and access logs of the real proxies equal what the test sent: connection counters and
//! byte totals on `/metrics` (reporter `destination` on the server's proxy, `source` on the client's),
//! and one access-log line per connection with its byte counts.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use meshwire_tests::binary;
use meshwire_tests::mesh::Proxy;
use meshwire_tests::net;
use meshwire_tests::pair::Pair;

/// The sum of the samples of `metric` whose labels contain every one of `labels` (`key="value"`).
fn sum(text: &str, metric: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn scrape(proxy: &Proxy) -> String {
    let response = net::http(proxy.ports().metrics, "GET", "/metrics")
        .unwrap_or_else(|e| panic!("scraping {}: {e}\n{}", proxy.ports().metrics, proxy.describe()));
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

/// Scrapes until `metric` with `labels` reaches `expected` (counters are updated as connections
/// end), or returns the last text after 10 s.
fn wait_for(proxy: &Proxy, metric: &str, labels: &[&str], expected: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(proxy);
        if sum(&text, metric, labels) == expected || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
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
        let text = wait_for(server, "istio_tcp_connections_closed_total", &dst, count);
        let context = format!("{a} -> {b}\n{text}\n{}", server.describe());
        assert_eq!(
            sum(&text, "istio_tcp_connections_opened_total", &dst),
            count,
            "{context}"
        );
        assert_eq!(
            sum(&text, "istio_tcp_connections_closed_total", &dst),
            count,
            "{context}"
        );
        assert_eq!(sum(&text, "istio_tcp_received_bytes_total", &dst), total, "{context}");
        assert_eq!(sum(&text, "istio_tcp_sent_bytes_total", &dst), total, "{context}");

        let src = ["reporter=\"source\"", "destination_workload=\"server\""];
        let text = wait_for(client, "istio_tcp_connections_closed_total", &src, count);
        let context = format!("{a} -> {b}\n{text}\n{}", client.describe());
        assert_eq!(
            sum(&text, "istio_tcp_connections_opened_total", &src),
            count,
            "{context}"
        );
        assert_eq!(
            sum(&text, "istio_tcp_connections_closed_total", &src),
            count,
            "{context}"
        );
        assert_eq!(sum(&text, "istio_tcp_sent_bytes_total", &src), total, "{context}");
        assert_eq!(sum(&text, "istio_tcp_received_bytes_total", &src), total, "{context}");

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
