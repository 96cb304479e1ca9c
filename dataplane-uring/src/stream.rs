//! [`UringStream`]: a glommio TCP stream seen through the `tokio::io` traits, without the costs a
//! generic adapter (`tokio_util::compat`) adds on the data path, and without `unsafe`.
//!
//! - **Reads into uninitialised memory.** A generic adapter must zero the whole unfilled part of
//!   the caller's buffer before every read (the `futures::io` traits read into initialised
//!   memory), and the HBONE copy reads into fresh buffer capacity of up to hundreds of KiB: most
//!   of the CPU went to `memset` and page faults. Here, a read into initialised space goes straight
//!   to glommio's stream; a read into uninitialised space is received into a per-thread staging
//!   buffer (initialised once) and copied, so only the bytes received are written.
//! - **Vectored writes.** TLS writes several records at once when the stream can write vectors;
//!   glommio's stream writes one slice per call. Here several slices are gathered into a
//!   per-thread staging buffer and sent in one call (a copy costs less than a system call per
//!   16 KiB record).
//!
//! The stream holds no second descriptor: socket options and `SO_ORIGINAL_DST` go through a
//! short-lived duplicate ([`duplicate`]), so a connection costs the proxy one descriptor, as with
//! tokio.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::io::{AsyncRead as FuturesRead, AsyncWrite as FuturesWrite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of the per-thread buffers reads into uninitialised memory are received into, and
/// vectored writes are gathered into.
pub const STAGING: usize = 256 * 1024;

thread_local! {
    /// Reads into uninitialised memory land here first (one buffer per executor thread; a read
    /// is synchronous, so it is never borrowed twice).
    static READ_STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Vectored writes are gathered here.
    static WRITE_STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// This process's pidfd, for `pidfd_getfd`.
    static PIDFD: RefCell<Option<OwnedFd>> = const { RefCell::new(None) };
}

/// An owned duplicate of the descriptor `fd` of this process (`pidfd_getfd(2)`, through a pidfd
/// kept per thread): options set on it are the original socket's.
pub fn duplicate(fd: RawFd) -> io::Result<OwnedFd> {
    PIDFD.with(|cell| {
        let mut pidfd = cell.borrow_mut();
        if pidfd.is_none() {
            let own = rustix::process::pidfd_open(rustix::process::getpid(), rustix::process::PidfdFlags::empty())?;
            *pidfd = Some(own);
        }
        let Some(pidfd) = pidfd.as_ref() else {
            return Err(io::Error::other("no pidfd"));
        };
        Ok(rustix::process::pidfd_getfd(
            pidfd,
            fd,
            rustix::process::PidfdGetfdFlags::empty(),
        )?)
    })
}

/// A glommio TCP stream with the `tokio::io` traits: see the [module](self) documentation.
#[derive(Debug)]
pub struct UringStream {
    inner: glommio::net::TcpStream,
}

impl UringStream {
    /// The stream over `inner`.
    pub fn new(inner: glommio::net::TcpStream) -> Self {
        Self { inner }
    }

    /// The glommio stream.
    pub fn get_ref(&self) -> &glommio::net::TcpStream {
        &self.inner
    }

    /// The glommio stream, mutably.
    pub fn get_mut(&mut self) -> &mut glommio::net::TcpStream {
        &mut self.inner
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr().map_err(io::Error::from)
    }

    /// The peer address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr().map_err(io::Error::from)
    }

    /// A short-lived duplicate of the socket, for socket options ([`duplicate`]).
    pub fn socket(&self) -> io::Result<socket2::Socket> {
        duplicate(self.inner.as_raw_fd()).map(socket2::Socket::from)
    }
}

impl AsyncRead for UringStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let initialized = buf.initialized().len() - buf.filled().len();
        if initialized > 0 {
            // Initialised space (a TLS record buffer): straight from the socket.
            let dst = buf.initialize_unfilled_to(initialized);
            let n = ready!(Pin::new(&mut this.inner).poll_read(cx, dst))?;
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        READ_STAGING.with(|staging| {
            let mut staging = staging.borrow_mut();
            if staging.len() < STAGING {
                staging.resize(STAGING, 0);
            }
            let len = buf.remaining().min(STAGING);
            let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut staging[..len]))?;
            buf.put_slice(&staging[..n]);
            Poll::Ready(Ok(()))
        })
    }
}

impl AsyncWrite for UringStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        let (Some(first), Some(_)) = (nonempty.next(), nonempty.next()) else {
            // One slice (or none): no gathering needed.
            let only = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
            return Pin::new(&mut this.inner).poll_write(cx, only);
        };
        if first.len() >= STAGING {
            return Pin::new(&mut this.inner).poll_write(cx, first);
        }
        WRITE_STAGING.with(|staging| {
            let mut staging = staging.borrow_mut();
            staging.clear();
            for b in bufs {
                let room = STAGING - staging.len();
                if room == 0 {
                    break;
                }
                staging.extend_from_slice(&b[..b.len().min(room)]);
            }
            // What is written is the first `n` bytes of `bufs` in order, as a vectored write's is.
            Pin::new(&mut this.inner).poll_write(cx, &staging)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
