//! Shared mode on loopback (no namespaces, no privileges needed): one proxy serves three workloads on
//! 127.0.0.11-13; clients bind their workload's address and go through SOCKS5. Each outbound tunnel
//! presents the identity of the workload it carries (a DENY policy on one principal refuses only that
//! workload), the inbound side serves the destination workload's certificate, and the access log
//! lines carry the identities and the exact bytes. Runs for every binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener};
use std::thread;

use meshwire_tests::binary;
use meshwire_tests::mesh::Mesh;
use meshwire_tests::net::{self, Socks5Failure, Socks5Target, lo};

const ALPHA: &str = "spiffe://cluster.local/ns/default/sa/alpha";
const BETA: &str = "spiffe://cluster.local/ns/default/sa/beta";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const UPLOAD: usize = 70_000;
const REPLY: usize = 5_000;

const CONFIG: &str = r#"
workloads:
- {uid: alpha, name: alpha, namespace: default, serviceAccount: alpha, workloadIps: ["127.0.0.11"], protocol: HBONE}
- {uid: beta, name: beta, namespace: default, serviceAccount: beta, workloadIps: ["127.0.0.12"], protocol: HBONE}
- {uid: server, name: server, namespace: default, serviceAccount: server, workloadIps: ["127.0.0.13"], protocol: HBONE}
policies:
- name: deny-beta
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/beta]
"#;

/// A server on 127.0.0.13 that reads everything, then answers [`REPLY`] bytes and closes: the two
/// directions carry different byte counts.
fn asymmetric_server() -> SocketAddr {
    let listener = TcpListener::bind((lo(13), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink);
                let _ = stream.write_all(&[b'r'; REPLY]);
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn shared_mode_each_workload_goes_out_with_its_own_identity() {
    for binary in binary::all() {
        let mesh = Mesh::new(CONFIG);
        // Listeners on every address (the workloads' are 127.0.0.11-13), SOCKS5 on loopback.
        let mut proxy = mesh
            .proxy(&binary, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            .shared()
            .arg("--ipv6")
            .arg("false")
            .spawn();
        let socks = proxy.ports().socks5;
        let server = asymmetric_server();

        // alpha: allowed; its tunnel presented alpha's identity to the inbound side, which served the
        // server's certificate (the pool accepts only the server's identity).
        let mut tcp = net::socks5_connect_from(lo(11), socks, &Socks5Target::Addr(server))
            .unwrap_or_else(|e| panic!("{binary}: alpha's connection refused: {e:?}\n{}", proxy.describe()));
        let client = tcp.local_addr().unwrap();
        tcp.write_all(&vec![b'a'; UPLOAD]).unwrap();
        tcp.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        tcp.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), REPLY, "{binary}");

        // beta: the same path, refused by the DENY policy on its principal only (reply 2: not
        // allowed by the ruleset).
        let refused = net::socks5_connect_from(lo(12), socks, &Socks5Target::Addr(server));
        assert_eq!(
            refused.err(),
            Some(Socks5Failure::Reply(0x02)),
            "{binary}: beta's connection was not refused as not allowed\n{}",
            proxy.describe()
        );

        let hbone_addr = format!("dst.hbone_addr={server}");
        let alpha_id = format!("src.identity=\"{ALPHA}\"");
        let beta_id = format!("src.identity=\"{BETA}\"");
        let server_id = format!("dst.identity=\"{SERVER}\"");
        proxy.expect_log(
            &["access", "direction=\"inbound\"", &alpha_id, &server_id, &hbone_addr],
            "alpha's inbound access log line",
        );
        proxy.expect_log(
            &["access", "direction=\"inbound\"", &beta_id, &server_id, "error="],
            "beta's refused inbound access log line",
        );
        // The outbound line of alpha's connection: the client's address, and the bytes the client
        // sent and received.
        let src = format!("src.addr={client}");
        let sent = format!("bytes_sent={UPLOAD} ");
        let recv = format!("bytes_recv={REPLY} ");
        proxy.expect_log(
            &[
                "access",
                "direction=\"outbound\"",
                &src,
                &alpha_id,
                &server_id,
                &sent,
                &recv,
            ],
            "alpha's outbound access log line with its bytes",
        );
        proxy.expect_log(
            &["access", "direction=\"outbound\"", &beta_id, "error="],
            "beta's failed outbound access log line",
        );
        assert!(
            proxy.log_lines(&["access", &alpha_id, "error="]).is_empty(),
            "{binary}: an access line of alpha with an error\n{}",
            proxy.describe()
        );
    }
}
