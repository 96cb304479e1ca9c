//! Metrics and access logs of the real proxies equal what the test sent: connection counters and
//! byte totals on `/metrics` (reporter `destination` on the server's proxy, `source` on the client's),
//! and one access-log line per connection with its byte counts.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use meshwire_tests::binary;
use meshwire_tests::mesh::{Proxy, metric_sum as sum};
use meshwire_tests::net;
use meshwire_tests::pair::Pair;

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
