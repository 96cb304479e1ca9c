//! The `ztunnel` binary end to end: started on the example configuration with free ports, it answers
//! ready on the readiness listener, carries 1 MiB through SOCKS5 -> HBONE (mTLS, to its own inbound
//! listener) -> a TCP echo server, counts the bytes in its metrics, keeps its local CA in the state
//! directory, and exits 0 on SIGTERM or `POST /quitquitquit` within the drain deadline. An invalid
//! local configuration makes it exit non-zero, naming the field and line.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/localhost.yaml");
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);
const PAYLOAD: usize = 1024 * 1024;

/// Distinct free loopback ports (bound, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

fn ztunnel() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    for var in [
        "RUST_LOG",
        "LOCAL_XDS_PATH",
        "LOCAL_XDS",
        "PROXY_MODE",
        "PROXY_WORKLOAD_INFO",
        "MESHWIRE_STATE_DIR",
        "STATE_DIRECTORY",
        "LOG_FORMAT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The child's stderr, collected by a thread, for failure messages.
fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
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
    log
}

/// Kills the child if the test fails before it exits.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_for_port(port: u16, deadline: Instant, child: &mut Child, log: &Mutex<String>) {
    loop {
        if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "ztunnel exited with {status} before listening:\n{}",
                log.lock().unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "port {port} not accepting in time:\n{}",
            log.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// A SOCKS5 CONNECT to an IPv4 `target` through `proxy`, by hand; panics unless it succeeds.
fn socks5_connect(proxy: u16, target: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0], "no-authentication method refused");
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 target expected")
    };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&request).unwrap();
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).unwrap();
    assert_eq!(head[..2], [5, 0], "SOCKS5 CONNECT failed with reply {}", head[1]);
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            tcp.read_exact(&mut len).unwrap();
            usize::from(len[0]) + 2
        }
        other => panic!("bad address type {other}"),
    };
    let mut bound = vec![0u8; rest];
    tcp.read_exact(&mut bound).unwrap();
    tcp
}

/// One HTTP/1.1 request (`Connection: close`) to 127.0.0.1:`port`, by hand: the status and body.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Polls the readiness endpoint until it answers 200.
fn wait_ready(port: u16, deadline: Instant, child: &mut Child, log: &Mutex<String>) {
    loop {
        let answer = http(port, "GET", "/healthz/ready");
        if let Ok((200, body)) = &answer {
            assert_eq!(body, "ready\n");
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ztunnel exited with {status} before ready:\n{}", log.lock().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "not ready in time (last answer {answer:?}):\n{}",
            log.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the sample of `family` reported by the destination (the inbound side).
fn destination_sample(metrics: &str, family: &str) -> Option<u64> {
    let prefix = format!("{family}{{reporter=\"destination\",");
    metrics
        .lines()
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// FNV-1a, as a checksum.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn socks5_through_hbone_to_echo_then_sigterm_drains() {
    let state = tempfile::tempdir().unwrap();
    let [inbound, socks, readiness, admin, metrics, outbound, plaintext] = free_ports::<7>();
    let mut child = ztunnel()
        .args(["--config", EXAMPLE, "--state-dir"])
        .arg(state.path())
        .args(["--mode", "dedicated", "--workload", "default/local/default"])
        .args(["--bind-address", "127.0.0.1", "--socks5-address", "127.0.0.1"])
        .args([
            "--inbound-port",
            &inbound.to_string(),
            "--socks5-port",
            &socks.to_string(),
            "--outbound-port",
            &outbound.to_string(),
            "--inbound-plaintext-port",
            &plaintext.to_string(),
        ])
        .args(control_ports(readiness, admin, metrics))
        .args(["--drain-deadline", "2s", "--worker-threads", "2", "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = capture_stderr(&mut child);
    let mut guard = Guard(Some(child));
    let child = guard.0.as_mut().unwrap();

    let ready_by = Instant::now() + Duration::from_secs(30);
    wait_for_port(socks, ready_by, child, &log);
    wait_for_port(inbound, ready_by, child, &log);
    wait_ready(readiness, ready_by, child, &log);

    // 1 MiB through SOCKS5 -> HBONE -> inbound -> echo.
    let echo = echo_server();
    let tcp = socks5_connect(socks, echo);
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 31 % 251) as u8).collect();
    let expected = checksum(&payload);
    let mut writer = tcp.try_clone().unwrap();
    let sender = thread::spawn(move || {
        writer.write_all(&payload).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut received = Vec::with_capacity(PAYLOAD);
    let mut reader = tcp;
    reader
        .read_to_end(&mut received)
        .unwrap_or_else(|e| panic!("reading the echo: {e}\n{}", log.lock().unwrap()));
    sender.join().unwrap();
    assert_eq!(received.len(), PAYLOAD, "echo length\n{}", log.lock().unwrap());
    assert_eq!(checksum(&received), expected, "echo checksum");

    // The inbound side counted the connection and every byte, both ways (recorded as they flow, so
    // poll until the last write is counted).
    let counted_by = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = http(metrics, "GET", "/metrics").unwrap();
        assert_eq!(status, 200, "{text}");
        let samples = [
            "istio_tcp_connections_opened_total",
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
        ]
        .map(|family| destination_sample(&text, family));
        if samples == [Some(1), Some(PAYLOAD as u64), Some(PAYLOAD as u64)] {
            break;
        }
        assert!(
            Instant::now() < counted_by,
            "metrics {samples:?}, expected 1 connection and {PAYLOAD} bytes each way:\n{text}"
        );
        thread::sleep(Duration::from_millis(20));
    }

    assert!(
        state.path().join("ca").join("ca.pem").is_file(),
        "the local CA is kept in the state directory"
    );

    // SIGTERM: drain and exit 0 within the deadline (plus a margin).
    let pid = child.id().to_string();
    let killed = Command::new("kill").arg("-TERM").arg(&pid).status().unwrap();
    assert!(killed.success());
    let status = wait_exit(child, DRAIN_DEADLINE + Duration::from_secs(5))
        .unwrap_or_else(|| panic!("ztunnel still running after SIGTERM:\n{}", log.lock().unwrap()));
    guard.0 = None;
    assert_eq!(status.code(), Some(0), "exit status\n{}", log.lock().unwrap());
    let log = log.lock().unwrap();
    assert!(log.contains("listening"), "{log}");
    // The connection went through the inbound HBONE listener, which logs it.
    assert!(log.contains("direction=\"inbound\""), "{log}");
}

/// The flags that move the readiness, admin and metrics listeners.
fn control_ports(readiness: u16, admin: u16, metrics: u16) -> Vec<String> {
    [
        ("--readiness-port", readiness),
        ("--admin-port", admin),
        ("--metrics-port", metrics),
    ]
    .into_iter()
    .flat_map(|(flag, port)| [flag.to_owned(), port.to_string()])
    .collect()
}

#[test]
fn quitquitquit_drains_and_exits_0() {
    let state = tempfile::tempdir().unwrap();
    let [inbound, socks, readiness, admin, metrics, outbound, plaintext] = free_ports::<7>();
    let mut child = ztunnel()
        .args(["--config", EXAMPLE, "--state-dir"])
        .arg(state.path())
        .args(["--mode", "dedicated", "--workload", "default/local/default"])
        .args(["--bind-address", "127.0.0.1"])
        .args([
            "--inbound-port",
            &inbound.to_string(),
            "--socks5-port",
            &socks.to_string(),
            "--outbound-port",
            &outbound.to_string(),
            "--inbound-plaintext-port",
            &plaintext.to_string(),
        ])
        .args(control_ports(readiness, admin, metrics))
        .args(["--drain-deadline", "2s", "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = capture_stderr(&mut child);
    let mut guard = Guard(Some(child));
    let child = guard.0.as_mut().unwrap();
    wait_ready(readiness, Instant::now() + Duration::from_secs(30), child, &log);

    // The admin listener is on loopback and answers; GET does not shut down.
    let (status, dump) = http(admin, "GET", "/config_dump").unwrap();
    assert_eq!(status, 200);
    assert!(
        dump.contains("\"spiffe://cluster.local/ns/default/sa/default\""),
        "{dump}"
    );
    assert_eq!(http(admin, "GET", "/quitquitquit").unwrap().0, 405);
    assert!(child.try_wait().unwrap().is_none());

    let (status, _) = http(admin, "POST", "/quitquitquit").unwrap();
    assert_eq!(status, 200);
    let status = wait_exit(child, DRAIN_DEADLINE + Duration::from_secs(5))
        .unwrap_or_else(|| panic!("ztunnel still running after /quitquitquit:\n{}", log.lock().unwrap()));
    guard.0 = None;
    assert_eq!(status.code(), Some(0), "exit status\n{}", log.lock().unwrap());
    assert!(log.lock().unwrap().contains("/quitquitquit"), "{}", log.lock().unwrap());
}

#[test]
fn an_occupied_admin_port_exits_1_naming_the_listener_and_address() {
    let state = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().port();
    let [inbound, socks, readiness, metrics, outbound, plaintext] = free_ports::<6>();
    let output = ztunnel()
        .args(["--config", EXAMPLE, "--state-dir"])
        .arg(state.path())
        .args(["--bind-address", "127.0.0.1"])
        .args([
            "--inbound-port",
            &inbound.to_string(),
            "--socks5-port",
            &socks.to_string(),
            "--outbound-port",
            &outbound.to_string(),
            "--inbound-plaintext-port",
            &plaintext.to_string(),
        ])
        .args(control_ports(readiness, admin, metrics))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen for admin on 127.0.0.1:{admin}")),
        "{stderr}"
    );
}

#[test]
fn invalid_local_config_exits_non_zero_naming_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(
        &config,
        "workloads:\n- name: a\n  workloadIps: [\"10.0.0.1\"]\n- name: b\n  workloadIps: [\"10.0.0.x\"]\n",
    )
    .unwrap();
    let [inbound, socks] = free_ports::<2>();
    let output = ztunnel()
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--bind-address", "127.0.0.1"])
        .args([
            "--inbound-port",
            &inbound.to_string(),
            "--socks5-port",
            &socks.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("workloads[1].workloadIps[0]"), "{stderr}");
    assert!(stderr.contains("line 5"), "{stderr}");
}

#[test]
fn invalid_flag_exits_2() {
    let output = ztunnel().args(["--inbound-port", "nope"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--inbound-port"));
}
