//! Metrics and access logs of the real proxies equal what the test sent: connection counters and
//! byte totals on `/metrics` (reporter `destination` on the server's proxy, `source` on the client's),
//! and one access-log line per connection with its byte counts.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use meshwire_tests::binary;
use meshwire_tests::mesh::metric_sum as sum;
use meshwire_tests::net;
use meshwire_tests::pair::Pair;

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
        let text = server.wait_metric("istio_tcp_connections_closed_total", &dst, count);
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
        let text = client.wait_metric("istio_tcp_connections_closed_total", &src, count);
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
