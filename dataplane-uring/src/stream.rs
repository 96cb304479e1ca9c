//! [`UringStream`]: a glommio TCP stream seen through the `tokio::io` traits, without the costs a
//! generic adapter (`tokio_util::compat`) adds on the data path, and without `unsafe`.
//!
//! - **Reads into uninitialised memory.** A generic adapter must zero the whole unfilled part of
//!   the caller's buffer before every read (the `futures::io` traits read into initialised
//!   memory), and the HBONE copy reads into fresh buffer capacity of up to hundreds of KiB: most
//!   of the CPU went to `memset` and page faults. Here, a read into initialised space goes straight
//!   to the socket; a read into uninitialised space is received into a per-thread staging buffer
//!   (initialised once) and copied, so only the bytes received are written.
//! - **Vectored writes.** TLS writes several records at once when the stream can write vectors;
//!   glommio's stream writes one slice per call. Here `sendmsg(2)` sends them in one call.
//! - **Readiness stays glommio's.** Every read and write is first tried on the socket
//!   (non-blocking); only when it would block is glommio's stream polled, which retries and, if
//!   the socket is still not ready, arms the io_uring poll that wakes the task.
//!
//! The socket is reached through an owned duplicate of the stream's descriptor (made once per
//! stream: by `dup` for a socket the proxy connected, by `pidfd_getfd(2)` for an accepted one),
//! so every operation is a safe call on an `OwnedFd`.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::io::{AsyncRead as FuturesRead, AsyncWrite as FuturesWrite};
use rustix::net::{RecvFlags, SendAncillaryBuffer, SendFlags, Shutdown};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of the per-thread buffer reads into uninitialised memory are received into.
pub const STAGING: usize = 256 * 1024;

thread_local! {
    /// Reads into uninitialised memory land here first (one buffer per executor thread; a read
    /// is synchronous, so it is never borrowed twice).
    static STAGING_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// This process's pidfd, for `pidfd_getfd`.
    static PIDFD: RefCell<Option<OwnedFd>> = const { RefCell::new(None) };
}

/// An owned duplicate of the descriptor `fd` of this process (`pidfd_getfd(2)`, through a pidfd
/// kept per thread): options set and IO done on it are the original socket's.
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
    fd: OwnedFd,
}

impl UringStream {
    /// The stream over `inner`, with `fd` an owned duplicate of its descriptor.
    pub fn new(inner: glommio::net::TcpStream, fd: OwnedFd) -> Self {
        Self { inner, fd }
    }

    /// The stream over an accepted (or otherwise made) glommio stream: its descriptor is
    /// duplicated with [`duplicate`].
    pub fn from_glommio(inner: glommio::net::TcpStream) -> io::Result<Self> {
        let fd = duplicate(inner.as_raw_fd())?;
        Ok(Self { inner, fd })
    }

    /// The glommio stream.
    pub fn get_ref(&self) -> &glommio::net::TcpStream {
        &self.inner
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr().map_err(io::Error::from)
    }

    /// The peer address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr().map_err(io::Error::from)
    }

    /// Reads into `dst` (initialised memory): the socket first, glommio's readiness if it would block.
    fn poll_read_slice(&mut self, cx: &mut Context<'_>, dst: &mut [u8]) -> Poll<io::Result<usize>> {
        match rustix::net::recv(&self.fd, &mut *dst, RecvFlags::DONTWAIT) {
            Ok((_, n)) => Poll::Ready(Ok(n.min(dst.len()))),
            Err(rustix::io::Errno::AGAIN) => Pin::new(&mut self.inner).poll_read(cx, dst),
            Err(rustix::io::Errno::INTR) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

impl AsFd for UringStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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
            let n = ready!(this.poll_read_slice(cx, dst))?;
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        STAGING_BUFFER.with(|staging| {
            let mut staging = staging.borrow_mut();
            if staging.len() < STAGING {
                staging.resize(STAGING, 0);
            }
            let len = buf.remaining().min(STAGING);
            let n = ready!(this.poll_read_slice(cx, &mut staging[..len]))?;
            buf.put_slice(&staging[..n]);
            Poll::Ready(Ok(()))
        })
    }
}

impl AsyncWrite for UringStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match rustix::net::send(&this.fd, buf, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(rustix::io::Errno::AGAIN) => Pin::new(&mut this.inner).poll_write(cx, buf),
            Err(rustix::io::Errno::INTR) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut control = SendAncillaryBuffer::default();
        match rustix::net::sendmsg(&this.fd, bufs, &mut control, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(rustix::io::Errno::AGAIN) => {
                // Not writable: glommio's stream waits for it (and writes the first slice if it
                // became writable meanwhile).
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
                Pin::new(&mut this.inner).poll_write(cx, first)
            }
            Err(rustix::io::Errno::INTR) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(rustix::net::shutdown(&self.fd, Shutdown::Write).map_err(io::Error::from))
    }
}
