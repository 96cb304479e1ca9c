//! Network namespaces for tests that need several hosts or traffic capture: namespaces joined by veth
//! pairs, commands run inside them, removed again when the guard drops (also when a test panics).
//!
//! These tests need root and `iptables` (scripts/test.sh installs it). Without them a test fails
//! saying so, unless `MESHWIRE_SKIP_NETNS=1` is set: then [`available`] returns `false` and the test
//! returns early after printing that it was skipped.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Whether namespace tests can run here. Panics with the reason when they cannot, unless
/// `MESHWIRE_SKIP_NETNS=1` is set (then prints the reason and returns `false`).
pub fn available(test: &str) -> bool {
    let problem = if !is_root() {
        Some("needs root (network namespaces, veth, iptables)")
    } else if !has_command("iptables") {
        Some("needs iptables (scripts/test.sh installs it)")
    } else if !has_command("ip") {
        Some("needs ip from iproute2")
    } else {
        None
    };
    match problem {
        None => true,
        Some(problem) if std::env::var_os("MESHWIRE_SKIP_NETNS").is_some_and(|v| v == "1") => {
            eprintln!("{test}: skipped (MESHWIRE_SKIP_NETNS=1): {problem}");
            false
        }
        Some(problem) => panic!("{test} {problem}; set MESHWIRE_SKIP_NETNS=1 to skip such tests"),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `program args`, panicking with its output unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace with its loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// A new namespace named `mw-<tag>-<pid>-<n>` (unique across parallel tests and processes).
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "mw-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `program args` inside the namespace, panicking unless it succeeds.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs `program` inside the namespace (to spawn it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that entered the namespace (`setns`), and returns what it returns:
    /// sockets it opens stay in the namespace and can be used from any thread afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                .unwrap_or_else(|e| panic!("entering the network namespace {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// A TCP connection from inside the namespace to `addr` (5 s to connect).
    pub fn tcp_connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
    }

    /// A [`whoami_serve`](crate::net::whoami_serve) server listening on `addr` inside the namespace.
    pub fn whoami_server(&self, addr: SocketAddr) {
        let listener = self
            .enter(move || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", self.name));
        crate::net::whoami_serve(listener);
    }

    /// A TCP connection from inside the namespace to `addr`; panics unless it connects.
    pub fn connect_or_panic(&self, addr: SocketAddr) -> TcpStream {
        self.tcp_connect(addr)
            .unwrap_or_else(|e| panic!("connecting from {} to {addr}: {e}", self.name))
    }

    /// Joins `self` and `peer` with a veth pair: `self` gets `addr/prefix`, `peer` gets
    /// `peer_addr/prefix`, both ends up.
    pub fn connect(&self, addr: IpAddr, peer: &Netns, peer_addr: IpAddr, prefix: u8) {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (a, b) = (
            format!("mwa{}x{n}", std::process::id() % 100_000),
            format!("mwb{}x{n}", std::process::id() % 100_000),
        );
        run(
            "ip",
            &[
                "link", "add", &a, "netns", &self.name, "type", "veth", "peer", "name", &b, "netns", &peer.name,
            ],
        );
        self.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", &a]);
        self.ip(&["link", "set", &a, "up"]);
        peer.ip(&["addr", "add", &format!("{peer_addr}/{prefix}"), "dev", &b]);
        peer.ip(&["link", "set", &b, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces and the veth ends inside it.
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).output();
    }
}
