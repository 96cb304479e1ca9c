//! A mesh on loopback: one state directory (so every proxy and the tests share one local CA), one
//! local configuration file that tests rewrite to change policies live, and proxy processes.
//!
//! Every proxy of a mesh listens for HBONE on the same port (routing assumes one HBONE port on every
//! node) on its own loopback address, and on free ports for everything else.

use std::fmt::Write as _;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use meshwire_identity::id::TrustDomain;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_testkit::http;

use crate::binary::{self, Binary};
use crate::net;

/// How long a proxy may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a proxy on free ports is started when another process took one of them.
pub const PORT_ATTEMPTS: u32 = 3;

/// What a proxy logs when it exits because a port it was given is in use.
const PORT_IN_USE: &str = "the port is in use by another process";

/// The proxy process exited while the harness waited for it.
#[derive(Debug)]
struct Exited;

/// A state directory, a configuration file and an HBONE port shared by the proxies of a test.
#[derive(Debug)]
pub struct Mesh {
    dir: tempfile::TempDir,
    hbone_port: u16,
    ca: Arc<LocalCa>,
}

impl Mesh {
    /// A mesh whose configuration is `yaml` (ztunnel's `LOCAL_XDS_PATH` format). The local CA is
    /// created here, before any proxy starts, so that every proxy loads the same one.
    pub fn new(yaml: &str) -> Mesh {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = LocalCa::load_or_create(
            &dir.path().join("state").join("ca"),
            TrustDomain::new("cluster.local").expect("trust domain"),
        )
        .expect("local CA");
        let mesh = Mesh {
            dir,
            hbone_port: net::free_ports(1)[0],
            ca: Arc::new(ca),
        };
        mesh.write_config(yaml);
        mesh
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    /// Replaces the configuration file (atomically: written aside, then renamed), as an operator or
    /// a control plane would; running proxies pick it up within their poll interval.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    /// The state directory the proxies share (its `ca/` holds the CA).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The mesh's CA.
    pub fn ca(&self) -> &Arc<LocalCa> {
        &self.ca
    }

    /// The HBONE port of every proxy.
    pub fn hbone_port(&self) -> u16 {
        self.hbone_port
    }

    /// A proxy of `binary` listening on `ip` (its inbound HBONE, outbound, plaintext, readiness and
    /// metrics listeners; SOCKS5 and admin stay on 127.0.0.1).
    pub fn proxy(&self, binary: &Binary, ip: IpAddr) -> ProxyBuilder {
        ProxyBuilder {
            binary: binary.clone(),
            ip,
            config: Some(self.config_path()),
            state_dir: self.state_dir(),
            hbone_port: self.hbone_port,
            mode: Mode::Shared,
            args: Vec::new(),
            env: Vec::new(),
            drain_deadline: Duration::from_secs(2),
            log_level: "info".to_owned(),
            netns: None,
            ports: None,
            dns: None,
        }
    }
}

#[derive(Debug, Clone)]
enum Mode {
    Shared,
    Dedicated(String),
}

/// How to start one proxy process.
#[derive(Debug, Clone)]
pub struct ProxyBuilder {
    binary: Binary,
    ip: IpAddr,
    /// The local configuration file; `None` for a proxy configured by istiod.
    config: Option<PathBuf>,
    state_dir: PathBuf,
    hbone_port: u16,
    mode: Mode,
    args: Vec<String>,
    env: Vec<(String, String)>,
    drain_deadline: Duration,
    log_level: String,
    netns: Option<String>,
    ports: Option<Ports>,
    /// The DNS proxy's address and `resolv.conf`, when it is on.
    dns: Option<(SocketAddr, PathBuf)>,
}

impl ProxyBuilder {
    /// Runs the DNS proxy on `addr` (UDP and TCP), forwarding to the resolvers of `resolv_conf`
    /// (it is off otherwise).
    pub fn dns(mut self, addr: SocketAddr, resolv_conf: &Path) -> Self {
        self.dns = Some((addr, resolv_conf.to_path_buf()));
        self
    }

    /// Starts the proxy without the mesh's local configuration file (for a proxy that istiod
    /// configures: set `XDS_ADDRESS` and the rest with [`ProxyBuilder::env`]).
    pub fn without_local_config(mut self) -> Self {
        self.config = None;
        self
    }

    /// Runs the proxy inside the network namespace `netns` (`ip netns exec`).
    pub fn in_netns(mut self, netns: &crate::netns::Netns) -> Self {
        self.netns = Some(netns.name().to_owned());
        self
    }

    /// Listens on `ports` instead of fresh free ports (for example [`Ports::ztunnel_defaults`] inside
    /// a namespace, where the redirect rules expect them).
    pub fn with_ports(mut self, ports: Ports) -> Self {
        self.ports = Some(ports);
        self
    }

    /// Listens for inbound HBONE on `port` (in-pod mode's 15008, say); the other ports are still
    /// fresh free ones, picked again if another process takes one before the proxy binds it.
    pub fn hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    /// Listens on these addresses instead of fresh ones (a second instance on the ports of a first:
    /// it fails at start, unless it takes over with `--handover`).
    pub fn same_ports_as(mut self, other: &Proxy) -> Self {
        self.ports = Some(*other.ports());
        self
    }

    /// Keeps its state (its local CA) in `dir` instead of the mesh's state directory: the proxy
    /// creates a CA of its own there.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = dir.to_path_buf();
        self
    }

    /// Dedicated mode for the workload `namespace/name/service-account`.
    pub fn dedicated(mut self, workload: &str) -> Self {
        self.mode = Mode::Dedicated(workload.to_owned());
        self
    }

    /// Shared (node) mode, serving every workload of the configuration (the default).
    pub fn shared(mut self) -> Self {
        self.mode = Mode::Shared;
        self
    }

    /// The drain deadline (default 2 s).
    pub fn drain_deadline(mut self, deadline: Duration) -> Self {
        self.drain_deadline = deadline;
        self
    }

    /// Takes over from an instance on the same ports (`--handover`, waiting up to `within`, in
    /// whole seconds, for it to release the control ports).
    pub fn handover(self, within: Duration) -> Self {
        self.arg("--handover").arg(format!("{}s", within.as_secs()))
    }

    /// The log filter (default `info`, which includes the access log).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_owned();
        self
    }

    /// An extra command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// An environment variable.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts the process and waits until it is ready (`/healthz/ready` answers 200; inside a
    /// namespace: until it logs that it listens); panics with its log if it exits or is not ready
    /// within [`START_TIMEOUT`].
    pub fn spawn(self) -> Proxy {
        self.start_until("before it was ready", Proxy::wait_ready)
    }

    /// Starts the process and waits only until it logs that its listeners are bound (it may not be
    /// ready: a certificate it cannot obtain, say).
    pub fn spawn_listening(self) -> Proxy {
        self.start_until("before listening", Proxy::wait_logged_listening)
    }

    /// Starts the process and waits until it logs a line containing every one of `needles` (a
    /// proxy taking over from another, say, which is not ready before the other one has drained).
    pub fn spawn_until_log(self, needles: &[&str]) -> Proxy {
        let what = needles.join(" ");
        self.start_until(&format!("while waiting for {what}"), |proxy| {
            proxy.wait_log(needles, &what).map(drop)
        })
    }

    /// Starts the process and waits up to `within` for it to exit, for a proxy expected to fail at
    /// start: its exit status, and the proxy for its log. Panics with the log if it is still running.
    pub fn spawn_to_exit(self, within: Duration) -> (ExitStatus, Proxy) {
        let mut proxy = self.start();
        match proxy.wait_exit(within) {
            Some(status) => (status, proxy),
            None => panic!("the proxy still runs after {within:?}:\n{}", proxy.describe()),
        }
    }

    /// Starts the process and `wait`s for it; panics with its log, saying it exited `when`, if it
    /// exits first. Free ports are picked before the proxy binds them, so another process may take
    /// one in between: when the proxy exits because a port it was given is in use, it starts again
    /// on other free ports (up to [`PORT_ATTEMPTS`] times), unless the test chose its ports.
    fn start_until(self, when: &str, wait: impl Fn(&mut Proxy) -> Result<(), Exited>) -> Proxy {
        let mut attempt = 1;
        loop {
            let mut proxy = self.start();
            let Err(Exited) = wait(&mut proxy) else {
                return proxy;
            };
            let port_taken = proxy.log().contains(PORT_IN_USE);
            if self.ports.is_none() && port_taken && attempt < PORT_ATTEMPTS {
                eprintln!(
                    "{}: another process took a free port before the proxy bound it; starting it again on \
                     other ports\n{}",
                    self.binary,
                    proxy.describe()
                );
                attempt += 1;
                continue;
            }
            panic!("the proxy exited {when}:\n{}", proxy.describe());
        }
    }

    fn start(&self) -> Proxy {
        let ports = self.ports.unwrap_or_else(|| Ports::free(self.ip, self.hbone_port));
        let mut cmd = match &self.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(self.binary.path());
                cmd
            }
            None => Command::new(self.binary.path()),
        };
        binary::clear_env(&mut cmd);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg("--state-dir").arg(&self.state_dir);
        match &self.mode {
            Mode::Shared => cmd.args(["--mode", "shared"]),
            Mode::Dedicated(workload) => cmd.args(["--mode", "dedicated", "--workload", workload]),
        };
        let port = |p: u16| p.to_string();
        cmd.args(["--bind-address", &self.ip.to_string()])
            .args([
                "--socks5",
                "true",
                "--socks5-address",
                "127.0.0.1",
                "--admin-address",
                "127.0.0.1",
            ])
            .args(["--inbound-port", &port(ports.inbound.port())])
            .args(["--inbound-plaintext-port", &port(ports.inbound_plaintext.port())])
            .args(["--outbound-port", &port(ports.outbound.port())])
            .args(["--socks5-port", &port(ports.socks5.port())])
            .args(["--readiness-port", &port(ports.readiness.port())])
            .args(["--admin-port", &port(ports.admin.port())])
            .args(["--metrics-port", &port(ports.metrics.port())])
            .args(match &self.dns {
                Some((addr, resolv_conf)) => vec![
                    "--dns-proxy".to_owned(),
                    "true".to_owned(),
                    "--dns-address".to_owned(),
                    addr.ip().to_string(),
                    "--dns-port".to_owned(),
                    addr.port().to_string(),
                    "--dns-resolv-conf".to_owned(),
                    resolv_conf.display().to_string(),
                    "--dns-upstream-timeout".to_owned(),
                    "500ms".to_owned(),
                ],
                None => vec!["--dns-proxy".to_owned(), "false".to_owned()],
            })
            .args(["--drain-deadline", &format!("{}ms", self.drain_deadline.as_millis())])
            .args(["--worker-threads", "2", "--log-level", &self.log_level])
            .args(&self.args);
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        let command_line = format!("{cmd:?}");
        // Logs go to stdout (as ztunnel's), errors that stop the start to stderr: one pipe takes
        // both, in the order they were written.
        let (mut output, writer) = std::io::pipe().expect("a pipe");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("a pipe"))
            .stderr(writer)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.path().display()));
        // The child holds the pipe's write ends now: ours went with `cmd`.
        drop(cmd);
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = output.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Proxy {
            name: self.binary.name(),
            child: Some(child),
            log,
            log_reader: Some(reader),
            ports,
            command_line,
            in_netns: self.netns.is_some(),
        }
    }
}

/// The listener addresses of a proxy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Inbound HBONE.
    pub inbound: SocketAddr,
    /// Inbound plaintext capture.
    pub inbound_plaintext: SocketAddr,
    /// Outbound capture.
    pub outbound: SocketAddr,
    /// SOCKS5 (on 127.0.0.1).
    pub socks5: SocketAddr,
    /// Readiness.
    pub readiness: SocketAddr,
    /// Admin (on 127.0.0.1).
    pub admin: SocketAddr,
    /// Metrics.
    pub metrics: SocketAddr,
}

impl Ports {
    /// ztunnel's ports on `ip` (SOCKS5 and admin on 127.0.0.1).
    pub fn ztunnel_defaults(ip: IpAddr) -> Ports {
        let lo1 = net::lo(1);
        Ports {
            inbound: SocketAddr::new(ip, 15008),
            inbound_plaintext: SocketAddr::new(ip, 15006),
            outbound: SocketAddr::new(ip, 15001),
            socks5: SocketAddr::new(lo1, 15080),
            readiness: SocketAddr::new(ip, 15021),
            admin: SocketAddr::new(lo1, 15000),
            metrics: SocketAddr::new(ip, 15020),
        }
    }

    /// Free ports on `ip` (SOCKS5 and admin on 127.0.0.1), inbound HBONE on `hbone_port`.
    pub fn free(ip: IpAddr, hbone_port: u16) -> Ports {
        let mut free = net::free_ports(6);
        while free.contains(&hbone_port) {
            free = net::free_ports(6);
        }
        let lo1 = net::lo(1);
        Ports {
            inbound: SocketAddr::new(ip, hbone_port),
            inbound_plaintext: SocketAddr::new(ip, free[0]),
            outbound: SocketAddr::new(ip, free[1]),
            socks5: SocketAddr::new(lo1, free[2]),
            readiness: SocketAddr::new(ip, free[3]),
            admin: SocketAddr::new(lo1, free[4]),
            metrics: SocketAddr::new(ip, free[5]),
        }
    }
}

/// A running proxy process; killed when dropped (unless it exited).
#[derive(Debug)]
pub struct Proxy {
    name: &'static str,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    log_reader: Option<thread::JoinHandle<()>>,
    ports: Ports,
    command_line: String,
    in_netns: bool,
}

impl Proxy {
    /// Its listeners.
    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Everything it wrote to stdout and stderr so far (logs, access logs, errors).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// A description for failure messages: binary, command line and log.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "--- {} ({})", self.name, self.command_line);
        out.push_str(&self.log());
        out
    }

    /// The log lines containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until a log line contains every one of `needles`; returns it, or `None` after `within`.
    pub fn wait_for_log(&self, needles: &[&str], within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.log_lines(needles).into_iter().next() {
                return Some(line);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to 20 s until a log line contains every one of `needles`; panics naming `what`, with
    /// the log, if none does (or the proxy exits first).
    pub fn expect_log(&mut self, needles: &[&str], what: &str) -> String {
        self.wait_log(needles, what)
            .unwrap_or_else(|Exited| panic!("the proxy exited while waiting for {what}:\n{}", self.describe()))
    }

    /// [`Proxy::expect_log`], with `Err` when the proxy exits first.
    fn wait_log(&mut self, needles: &[&str], what: &str) -> Result<String, Exited> {
        self.poll(Duration::from_secs(20), |proxy| {
            proxy
                .log_lines(needles)
                .into_iter()
                .next()
                .ok_or_else(|| format!("no {what} in time"))
        })
    }

    /// Calls `check` every 20 ms until it gives a value; `Err` when the process exits first. Panics
    /// with the message of `check`'s last `Err` and the log after `within`.
    fn poll<T>(&mut self, within: Duration, mut check: impl FnMut(&Self) -> Result<T, String>) -> Result<T, Exited> {
        let deadline = Instant::now() + within;
        loop {
            let missing = match check(self) {
                Ok(value) => return Ok(value),
                Err(missing) => missing,
            };
            if !self.is_running() {
                return Err(Exited);
            }
            assert!(Instant::now() < deadline, "{missing}:\n{}", self.describe());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits up to `within` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                // The output thread collects the last lines until the end of the pipe.
                if let Some(reader) = self.log_reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The resident memory of the process in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Waits until the proxy logs that it listens (once every listener is bound).
    fn wait_logged_listening(&mut self) -> Result<(), Exited> {
        let inbound = self.ports.inbound.to_string();
        self.poll(START_TIMEOUT, |proxy| {
            if proxy.log_lines(&["listener established", &inbound]).is_empty() {
                Err(format!("the proxy does not listen after {START_TIMEOUT:?}"))
            } else {
                Ok(())
            }
        })
    }

    /// Waits until the proxy is ready: listeners bound, configuration loaded, the workload's
    /// certificate obtained.
    fn wait_ready(&mut self) -> Result<(), Exited> {
        if self.in_netns {
            // Its addresses are not reachable from here.
            return self.wait_logged_listening();
        }
        let readiness = self.ports.readiness;
        self.poll(START_TIMEOUT, |_| {
            match http::request_blocking(readiness, "GET", "/healthz/ready") {
                Ok(answer) if answer.status == 200 => Ok(()),
                answer => Err(format!(
                    "the proxy is not ready after {START_TIMEOUT:?} (last answer {answer:?})"
                )),
            }
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A path relative to the repository root (for example `dataplane/scripts/redirect.sh`).
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(relative), |root| root.join(relative))
}

/// A text access-log line, in ztunnel's layout:
/// `<time>\t<level>\taccess\t<message>\t<key=value fields>` (strings quoted as Rust's `Debug`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessLine {
    time: String,
    level: String,
    message: String,
    fields: Vec<(String, String)>,
}

impl AccessLine {
    /// Parses a log line of target `access`; `None` for any other line, or one that does not read
    /// as five tab-separated columns whose last is `key=value` pairs.
    pub fn parse(line: &str) -> Option<AccessLine> {
        let mut columns = line.trim_end_matches('\n').split('\t');
        let (time, level, target, message, fields) = (
            columns.next()?,
            columns.next()?,
            columns.next()?,
            columns.next()?,
            columns.next()?,
        );
        if target != "access" || columns.next().is_some() {
            return None;
        }
        Some(AccessLine {
            time: time.to_owned(),
            level: level.to_owned(),
            message: message.to_owned(),
            fields: parse_fields(fields)?,
        })
    }

    /// The time stamp column (`2025-01-23T05:07:25.806642Z`).
    pub fn time(&self) -> &str {
        &self.time
    }

    /// The level column (`info`, `warn`, `error`).
    pub fn level(&self) -> &str {
        &self.level
    }

    /// The message column: `connection complete` or `connection failed`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The fields' keys, in the order of the line.
    pub fn keys(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The value of `key` (`src.identity`, `bytes_sent`), unquoted and unescaped.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The value of `key` as a number.
    pub fn number(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }
}

/// The `key=value` pairs of an access line's last column: quoted values unescaped as Rust's `Debug`
/// escapes them (`\"`, `\\`, `\n`, `\u{2028}`, ...), bare ones up to the next space.
fn parse_fields(column: &str) -> Option<Vec<(String, String)>> {
    let mut fields = Vec::new();
    let mut rest = column;
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        'r' => value.push('\r'),
                        't' => value.push('\t'),
                        '0' => value.push('\0'),
                        'u' => {
                            chars.next().filter(|(_, c)| *c == '{')?;
                            let hex: String = chars.by_ref().map(|(_, c)| c).take_while(|c| *c != '}').collect();
                            value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                        }
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        fields.push((key.to_owned(), value));
        rest = next.strip_prefix(' ').unwrap_or(next);
    }
    Some(fields)
}

impl Proxy {
    /// The access-log lines with `direction` (`inbound`/`outbound`) logged so far, `connection
    /// complete` and `connection failed` alike.
    pub fn access_lines(&self, direction: &str) -> Vec<AccessLine> {
        self.all_access_lines()
            .into_iter()
            .filter(|l| l.get("direction") == Some(direction))
            .collect()
    }

    /// Every access-log line logged so far.
    pub fn all_access_lines(&self) -> Vec<AccessLine> {
        self.log().lines().filter_map(AccessLine::parse).collect()
    }

    /// Waits until at least `count` access-log lines with `direction` were logged; returns them all.
    pub fn wait_access_lines(&self, direction: &str, count: usize, within: Duration) -> Vec<AccessLine> {
        self.wait_lines(direction, count, within, |_| true)
    }

    /// Waits until at least `count` `connection complete` lines with `direction` were logged (those of
    /// connections that reached their destination, or failed once it was known); returns them all,
    /// without the `connection failed` lines of connections refused before (a probe of the HBONE
    /// port that never finishes its TLS handshake, say).
    pub fn wait_complete_lines(&self, direction: &str, count: usize, within: Duration) -> Vec<AccessLine> {
        self.wait_lines(direction, count, within, |line| line.message() == "connection complete")
    }

    fn wait_lines(
        &self,
        direction: &str,
        count: usize,
        within: Duration,
        keep: impl Fn(&AccessLine) -> bool,
    ) -> Vec<AccessLine> {
        let deadline = Instant::now() + within;
        loop {
            let lines: Vec<AccessLine> = self.access_lines(direction).into_iter().filter(&keep).collect();
            if lines.len() >= count || Instant::now() >= deadline {
                return lines;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The text of its `/metrics` endpoint; panics with its log unless it answers 200.
    pub fn metrics(&self) -> String {
        let response = http::request_blocking(self.ports.metrics, "GET", "/metrics")
            .unwrap_or_else(|e| panic!("scraping {}: {e}\n{}", self.ports.metrics, self.describe()));
        assert_eq!(response.status, 200, "{}", response.body);
        response.body
    }

    /// Scrapes until the [`metric_sum`] of `metric` with `labels` is `expected` (counters are
    /// updated as bytes flow and connections end); returns the last text, also after 10 s without.
    pub fn wait_metric(&self, metric: &str, labels: &[&str], expected: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics();
            if metric_sum(&text, metric, labels) == expected || Instant::now() >= deadline {
                return text;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The sum of the samples of `metric` in the Prometheus `text` whose labels contain every one of
/// `labels` (`key="value"`).
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
