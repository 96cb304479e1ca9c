//! Where the two nodes of a pair are: both on this host's loopback (the default), or in two network
//! namespaces joined by a veth pair (`--topology veth`), as two nodes of a cluster are joined by a
//! network.
//!
//! With veth, the client node is a namespace this process itself moves into before it starts any
//! thread (so its clients and proxy A, which it starts, are there); the server node is another,
//! where the destination server's sockets are created and proxy B is started. The namespaces and
//! the veth pair are made with `ip` and removed when [`Nodes`] is dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use clap::ValueEnum;
use serde::Serialize;

/// The layout of the two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Topology {
    /// Both nodes on this host's loopback: client 127.0.0.1, server 127.0.0.2.
    Loopback,
    /// Two network namespaces joined by a veth pair: client 10.201.0.1, server 10.201.0.2.
    Veth,
}

/// The client node's address in veth mode.
const VETH_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// The server node's address in veth mode.
const VETH_SERVER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// The nodes of this run, set once by [`Nodes::set_up`] (loopback when never set).
static NODES: OnceLock<Layout> = OnceLock::new();

struct Layout {
    topology: Topology,
    /// The server node's namespace (veth mode).
    server_ns: Option<OwnedFd>,
    /// Its name, for `ip netns exec`.
    server_name: Option<String>,
}

fn layout() -> &'static Layout {
    NODES.get_or_init(|| Layout {
        topology: Topology::Loopback,
        server_ns: None,
        server_name: None,
    })
}

/// The topology of this run.
pub(crate) fn topology() -> Topology {
    layout().topology
}

/// The client workload's address (proxy A's node).
pub(crate) fn client_ip() -> Ipv4Addr {
    match topology() {
        Topology::Loopback => Ipv4Addr::LOCALHOST,
        Topology::Veth => VETH_CLIENT,
    }
}

/// The server workload's address (proxy B's node, where the destination server listens).
pub(crate) fn server_ip() -> Ipv4Addr {
    match topology() {
        Topology::Loopback => Ipv4Addr::new(127, 0, 0, 2),
        Topology::Veth => VETH_SERVER,
    }
}

/// A command that runs `program` on the server node (with veth, through `ip netns exec`, which
/// enters the namespace and execs `program` in the same process; on loopback, `program` itself).
pub(crate) fn server_command(program: impl AsRef<OsStr>) -> Command {
    match &layout().server_name {
        Some(name) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", name]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Runs `make` on a thread of the server node and returns what it made: a socket created there
/// stays there (in veth mode; on loopback, on the calling thread).
pub(crate) fn on_server_thread<T: Send>(make: impl FnOnce() -> std::io::Result<T> + Send) -> anyhow::Result<T> {
    match &layout().server_ns {
        Some(ns) => in_namespace(ns.as_fd(), || Ok(make()?)),
        None => Ok(make()?),
    }
    .context("on the server node")
}

/// Runs `make` on a new thread that first enters the network namespace `ns`.
fn in_namespace<T: Send>(ns: BorrowedFd<'_>, make: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                rustix::thread::move_into_link_name_space(ns, Some(rustix::thread::LinkNameSpaceType::Network))
                    .context("entering the network namespace (setns)")?;
                make()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in a node's namespace panicked"))?
    })
}

/// The namespaces and veth pair of a veth run; removes them when dropped.
pub(crate) struct Nodes {
    namespaces: Vec<String>,
}

impl Nodes {
    /// Sets the topology of this run. For veth: creates the two namespaces and the veth pair, and
    /// moves the calling thread into the client node; call it before any other thread starts, so
    /// that every thread of this process is on the client node.
    pub(crate) fn set_up(topology: Topology) -> anyhow::Result<Nodes> {
        let mut nodes = Nodes { namespaces: Vec::new() };
        let (server_ns, server_name) = match topology {
            Topology::Loopback => (None, None),
            Topology::Veth => {
                let (fd, name) = nodes.create()?;
                (Some(fd), Some(name))
            }
        };
        if NODES
            .set(Layout {
                topology,
                server_ns,
                server_name,
            })
            .is_err()
        {
            bail!("the nodes were set up twice");
        }
        Ok(nodes)
    }

    fn create(&mut self) -> anyhow::Result<(OwnedFd, String)> {
        let id = std::process::id();
        let (client, server) = (format!("mwb-client-{id}"), format!("mwb-server-{id}"));
        // Interface names have at most 15 bytes.
        let (client_if, server_if) = (format!("mwbc{}", id % 100_000_000), format!("mwbs{}", id % 100_000_000));
        for ns in [&client, &server] {
            ip(&["netns", "add", ns])?;
            self.namespaces.push(ns.clone());
        }
        ip(&["link", "add", &client_if, "type", "veth", "peer", "name", &server_if])?;
        for (ns, dev, addr) in [(&client, &client_if, VETH_CLIENT), (&server, &server_if, VETH_SERVER)] {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let open = |ns: &str| -> anyhow::Result<OwnedFd> {
            let path = format!("/run/netns/{ns}");
            Ok(File::open(&path).with_context(|| format!("opening {path}"))?.into())
        };
        let client_fd = open(&client)?;
        rustix::thread::move_into_link_name_space(client_fd.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
            .context("entering the client node's network namespace (setns)")?;
        let server_fd = open(&server)?;
        // A node's connections are reused through TIME_WAIT (Linux reuses them on loopback only by
        // default): the forwarder pair opens a connection between the nodes for each one it carries,
        // and thousands a second would otherwise run out of ports within seconds. `/proc/sys/net`
        // is the namespace of the thread that opens it.
        reuse_time_wait().context("on the client node")?;
        in_namespace(server_fd.as_fd(), reuse_time_wait).context("on the server node")?;
        Ok((server_fd, server))
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Deleting a namespace removes the veth end in it, and with it the pair.
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// `net.ipv4.tcp_tw_reuse = 1` in the calling thread's network namespace.
fn reuse_time_wait() -> anyhow::Result<()> {
    let path = "/proc/sys/net/ipv4/tcp_tw_reuse";
    std::fs::write(path, "1").with_context(|| format!("writing 1 to {path}"))
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {} (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {} (--topology veth needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
