//! Shared mode of the `ztunnel` binary on loopback (no namespaces, no privileges needed): one proxy
//! serves three workloads on 127.0.0.11-13; clients bind their workload's address and go through
//! SOCKS5. Each outbound tunnel presents the identity of the workload it carries (a DENY policy on
//! one principal refuses only that workload), the inbound side serves the destination workload's
//! certificate, and the access log lines carry the identities and the exact bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

const ALPHA: &str = "spiffe://cluster.local/ns/default/sa/alpha";
const BETA: &str = "spiffe://cluster.local/ns/default/sa/beta";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const UPLOAD: usize = 70_000;
const REPLY: usize = 5_000;

/// Distinct free loopback ports (bound, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// A server on 127.0.0.13 that reads everything, then answers [`REPLY`] bytes and closes.
fn asymmetric_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.13:0").unwrap();
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

/// A SOCKS5 CONNECT to `target` through `proxy` from the source address `from`: the reply code and
/// the stream.
fn socks5_from(from: &str, proxy: u16, target: SocketAddr) -> (u8, TcpStream) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(from.parse().unwrap(), 0).into()).unwrap();
    socket
        .connect(&SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), proxy).into())
        .unwrap();
    let mut tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0]);
    let SocketAddr::V4(v4) = target else { panic!("IPv4") };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&request).unwrap();
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).unwrap();
    (reply[1], tcp)
}

struct Ztunnel {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ztunnel {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_for(&mut self, check: impl Fn(&str) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if check(&self.log()) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ztunnel exited with {status} while waiting for {what}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no {what} in time:\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for an access log line holding every one of `needles`.
    fn wait_for_access(&mut self, needles: &[&str], what: &str) {
        self.wait_for(
            |log| {
                log.lines()
                    .any(|l| l.contains("access") && needles.iter().all(|n| l.contains(n)))
            },
            what,
        );
    }
}

#[test]
fn shared_mode_each_workload_goes_out_with_its_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shared.yaml");
    std::fs::write(
        &config,
        r#"
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
"#,
    )
    .unwrap();
    let [inbound, plaintext, outbound, socks, readiness, admin, metrics] = free_ports::<7>();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    for var in [
        "RUST_LOG",
        "LOCAL_XDS_PATH",
        "LOCAL_XDS",
        "PROXY_MODE",
        "PROXY_WORKLOAD_INFO",
        "PACKET_MARK",
    ] {
        cmd.env_remove(var);
    }
    // Listeners on every address (the workloads' are 127.0.0.11-13), SOCKS5 on loopback.
    cmd.arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--mode", "shared", "--bind-address", "0.0.0.0", "--ipv6", "false"])
        .args(["--socks5-address", "127.0.0.1", "--dns-proxy", "false"])
        .args(["--inbound-port", &inbound.to_string()])
        .args(["--inbound-plaintext-port", &plaintext.to_string()])
        .args(["--outbound-port", &outbound.to_string()])
        .args(["--socks5-port", &socks.to_string()])
        .args(["--readiness-port", &readiness.to_string()])
        .args(["--admin-port", &admin.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--worker-threads", "2", "--drain-deadline", "1s", "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut proxy = Ztunnel { child, log };
    proxy.wait_for(|log| log.matches("listening").count() >= 4, "the listeners");

    let server = asymmetric_server();

    // alpha: allowed; its tunnel presented alpha's identity to the inbound side, which served the
    // server's certificate (the pool accepts only the server's identity).
    let (code, mut tcp) = socks5_from("127.0.0.11", socks, server);
    assert_eq!(code, 0, "alpha's connection refused:\n{}", proxy.log());
    let client = tcp.local_addr().unwrap();
    tcp.write_all(&vec![b'a'; UPLOAD]).unwrap();
    tcp.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), REPLY);

    // beta: the same path, refused by the DENY policy on its principal only.
    let (code, _tcp) = socks5_from("127.0.0.12", socks, server);
    assert_eq!(
        code,
        0x02,
        "beta's connection was not refused as not allowed:\n{}",
        proxy.log()
    );

    let hbone_addr = format!("dst.hbone_addr={server}");
    let alpha_id = format!("src.identity=\"{ALPHA}\"");
    let beta_id = format!("src.identity=\"{BETA}\"");
    let server_id = format!("dst.identity=\"{SERVER}\"");
    proxy.wait_for_access(
        &["direction=\"inbound\"", &alpha_id, &server_id, &hbone_addr],
        "alpha's inbound access log line",
    );
    proxy.wait_for_access(
        &["direction=\"inbound\"", &beta_id, &server_id, "error="],
        "beta's refused inbound access log line",
    );
    // The outbound line of alpha's connection: the client's address, and the bytes the client sent
    // and received.
    let src = format!("src.addr={client}");
    let sent = format!("bytes_sent={UPLOAD} ");
    let recv = format!("bytes_recv={REPLY} ");
    proxy.wait_for_access(
        &["direction=\"outbound\"", &src, &alpha_id, &server_id, &sent, &recv],
        "alpha's outbound access log line with its bytes",
    );
    proxy.wait_for_access(
        &["direction=\"outbound\"", &beta_id, "error="],
        "beta's failed outbound access log line",
    );
    let log = proxy.log();
    let alpha_inbound_errors = log
        .lines()
        .filter(|l| l.contains("access") && l.contains(&alpha_id) && l.contains("error="))
        .count();
    assert_eq!(alpha_inbound_errors, 0, "{log}");
}
