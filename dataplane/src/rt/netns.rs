//! Sockets made inside another network namespace: the [`SocketFactory`] of a pod in in-pod mode.
//!
//! In in-pod mode (istio-cni hands the proxy a file descriptor of each pod's network namespace)
//! every socket that serves a pod is made inside that pod's namespace: its listeners (15001, 15006,
//! 15008, 15053), and its upstream connections, so that they leave from the pod's own address and
//! routes. A socket belongs to the namespace it was created in for its whole life, whichever thread
//! uses it later, so only the creation needs the namespace: [`NetnsSocketFactory`] enters the pod's
//! namespace on the calling thread (`setns(2)`), lets the inner factory make the socket, and returns
//! the thread to the proxy's own namespace before anything else runs on it. Two `setns` calls per
//! socket, as ztunnel does; no thread ever stays in a pod's namespace.
//!
//! Returning to the proxy's namespace cannot fail in practice (the proxy holds a descriptor of it
//! and the capability it needed to leave). If it ever did, the thread would go on making other
//! pods' sockets in this pod's namespace: the process aborts instead, after logging why.
//!
//! [`is_network_namespace`] tells a network namespace descriptor from any other descriptor (the
//! in-pod protocol checks the descriptor istio-cni sends before using it).

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use socket2::Socket;

use super::socket::{DefaultSocketFactory, SocketFactory, SocketOptions, SourceTransparency};

/// The path of the calling process's network namespace.
pub const OWN_NETNS: &str = "/proc/self/ns/net";

/// Whether `fd` is a network namespace (a `/proc/<pid>/ns/net` file or a bind mount of one, such
/// as `/run/netns/<name>`): [`meshwire_control::zds::check_netns`], which also says what it is
/// instead.
pub fn is_network_namespace(fd: BorrowedFd<'_>) -> bool {
    meshwire_control::zds::check_netns(fd).is_ok()
}

/// A network namespace held open by its descriptor, checked to be one.
#[derive(Debug, Clone)]
pub struct Netns {
    fd: Arc<OwnedFd>,
}

impl Netns {
    /// The namespace `fd` refers to; an error naming the problem if it is not a network namespace.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        if let Err(reason) = meshwire_control::zds::check_netns(fd.as_fd()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the file descriptor is not a network namespace: {reason}"),
            ));
        }
        Ok(Netns { fd: Arc::new(fd) })
    }

    /// The namespace at `path` (`/proc/<pid>/ns/net`, `/run/netns/<name>`, [`OWN_NETNS`]).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file =
            File::open(path).map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
        Self::from_fd(OwnedFd::from(file)).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// The calling process's own network namespace.
    pub fn own() -> io::Result<Self> {
        Self::open(OWN_NETNS)
    }

    /// The namespace's inode: two descriptors of one namespace have the same.
    pub fn inode(&self) -> io::Result<u64> {
        Ok(rustix::fs::fstat(self.fd.as_fd())?.st_ino)
    }

    /// Runs `f` on the calling thread inside this namespace, then moves the thread into `home`.
    /// Entering fails with the error of `setns(2)` (and `f` does not run).
    ///
    /// # Aborts
    ///
    /// When the thread cannot return to `home` (see the module docs).
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
        move_into_link_name_space(self.fd.as_fd(), Some(LinkNameSpaceType::Network)).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("entering a pod's network namespace: {e}"),
            )
        })?;
        let result = f();
        if let Err(e) = move_into_link_name_space(home.fd.as_fd(), Some(LinkNameSpaceType::Network)) {
            tracing::error!(error = %e, "cannot return a thread to the proxy's network namespace: aborting, so that no other pod's socket is made in this pod's namespace");
            std::process::abort();
        }
        Ok(result)
    }
}

/// The [`SocketFactory`] of one pod: every socket made by `inner` inside the pod's network
/// namespace, the calling thread back in the proxy's own namespace afterwards.
#[derive(Debug, Clone)]
pub struct NetnsSocketFactory<F> {
    inner: F,
    pod: Netns,
    home: Netns,
}

impl<F: SocketFactory> NetnsSocketFactory<F> {
    /// A factory making `inner`'s sockets in `pod`, returning threads to `home` (the proxy's own
    /// namespace, [`Netns::own`], opened once at start).
    pub fn new(inner: F, pod: Netns, home: Netns) -> Self {
        NetnsSocketFactory { inner, pod, home }
    }

    /// The pod's namespace.
    pub fn netns(&self) -> &Netns {
        &self.pod
    }
}

impl<F: SocketFactory> SocketFactory for NetnsSocketFactory<F> {
    fn datagram(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        self.pod.run(&self.home, || self.inner.datagram(addr, opts))?
    }

    fn listener(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        self.pod.run(&self.home, || self.inner.listener(addr, opts))?
    }

    fn stream(&self, peer: SocketAddr, local: Option<SocketAddr>, opts: &SocketOptions) -> io::Result<Socket> {
        self.pod.run(&self.home, || self.inner.stream(peer, local, opts))?
    }

    fn stream_from(
        &self,
        peer: SocketAddr,
        source: Option<IpAddr>,
        opts: &SocketOptions,
        transparency: SourceTransparency,
    ) -> io::Result<Socket> {
        self.pod
            .run(&self.home, || self.inner.stream_from(peer, source, opts, transparency))?
    }
}

/// The socket factory of the proxy's runtimes ([`ProxyRuntime`](super::native::ProxyRuntime) and
/// the HBONE pool's [`PoolConnector`](super::native::PoolConnector) by default): the host's, every
/// socket in the proxy's own network namespace, or a pod's in in-pod mode. One type for both, so
/// that a pod's [`Worker`](crate::app::worker::Worker) is the same type as the node's.
#[derive(Debug, Clone, Default)]
pub enum ProxySocketFactory {
    /// Sockets in the proxy's own network namespace ([`DefaultSocketFactory`]).
    #[default]
    Host,
    /// Sockets in a pod's network namespace.
    Pod(NetnsSocketFactory<DefaultSocketFactory>),
}

impl ProxySocketFactory {
    /// The factory of the pod whose namespace is `pod`, threads returning to `home`.
    pub fn pod(pod: Netns, home: Netns) -> Self {
        ProxySocketFactory::Pod(NetnsSocketFactory::new(DefaultSocketFactory, pod, home))
    }
}

impl SocketFactory for ProxySocketFactory {
    fn datagram(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        match self {
            ProxySocketFactory::Host => DefaultSocketFactory.datagram(addr, opts),
            ProxySocketFactory::Pod(pod) => pod.datagram(addr, opts),
        }
    }

    fn listener(&self, addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
        match self {
            ProxySocketFactory::Host => DefaultSocketFactory.listener(addr, opts),
            ProxySocketFactory::Pod(pod) => pod.listener(addr, opts),
        }
    }

    fn stream(&self, peer: SocketAddr, local: Option<SocketAddr>, opts: &SocketOptions) -> io::Result<Socket> {
        match self {
            ProxySocketFactory::Host => DefaultSocketFactory.stream(peer, local, opts),
            ProxySocketFactory::Pod(pod) => pod.stream(peer, local, opts),
        }
    }

    fn stream_from(
        &self,
        peer: SocketAddr,
        source: Option<IpAddr>,
        opts: &SocketOptions,
        transparency: SourceTransparency,
    ) -> io::Result<Socket> {
        match self {
            ProxySocketFactory::Host => DefaultSocketFactory.stream_from(peer, source, opts, transparency),
            ProxySocketFactory::Pod(pod) => pod.stream_from(peer, source, opts, transparency),
        }
    }
}
