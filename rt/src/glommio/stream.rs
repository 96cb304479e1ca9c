//! [`UringStream`]: a glommio TCP stream seen through the `tokio::io` traits, without the costs a
//! generic adapter (`tokio_util::compat`) adds on the data path.
//!
//! glommio's stream reads and writes with a non-blocking system call first and arms an io_uring
//! poll only when that would block. This stream makes those first attempts itself, where glommio's
//! API costs a copy, and leaves the waiting to glommio:
//!
//! - **Reads into uninitialised memory.** A generic adapter must zero the whole unfilled part of
//!   the caller's buffer before every read (the `futures::io` traits read into initialised
//!   memory), and the HBONE copy reads into fresh buffer capacity of up to hundreds of KiB: most
//!   of the CPU went to `memset` and page faults. Here `recv(MSG_DONTWAIT)` writes straight into
//!   the uninitialised space (`recv_uninit`, with `unsafe` that tells `ReadBuf`
//!   how much the kernel wrote). Only when the socket has nothing to read is glommio asked to wait; the
//!   few bytes that may arrive in between are received into a per-thread staging buffer and
//!   copied.
//! - **Vectored writes.** TLS writes several records at once when the stream can write vectors;
//!   glommio's stream writes one slice per call. Here the slices go out in one
//!   `sendmsg(MSG_DONTWAIT)`; only when the socket's buffer is full is glommio asked to wait (with
//!   the first slice, which it tries once more before arming its poll).
//!
//! The stream holds no second descriptor: socket options and `SO_ORIGINAL_DST` go through a
//! short-lived duplicate ([`duplicate`]), so a connection costs the proxy one descriptor, as with
//! tokio.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::io::{AsyncRead as FuturesRead, AsyncWrite as FuturesWrite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of the per-thread buffer that a read into uninitialised memory uses when it has to
/// go through glommio (the socket had nothing to read when asked directly). A read through glommio
/// fills at most this much of the caller's buffer.
///
/// ```
/// assert_eq!(meshwire_rt::glommio::stream::STAGING, 64 * 1024);
/// ```
pub const STAGING: usize = 64 * 1024;

thread_local! {
    /// Reads into uninitialised memory that go through glommio land here first (one buffer per
    /// executor thread; a read is synchronous, so it is never borrowed twice).
    static READ_STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// This process's pidfd, for `pidfd_getfd`.
    static PIDFD: RefCell<Option<OwnedFd>> = const { RefCell::new(None) };
}

/// An owned duplicate of the descriptor `fd` of this process (`pidfd_getfd(2)`, through a pidfd
/// kept per thread): options set on it are the original socket's. Needs no glommio executor.
///
/// ```
/// use std::os::fd::AsRawFd;
/// use meshwire_rt::glommio::stream::duplicate;
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let same = socket2::Socket::from(duplicate(listener.as_raw_fd())?);
/// assert_eq!(same.local_addr()?.as_socket(), Some(listener.local_addr()?));
/// # Ok::<(), std::io::Error>(())
/// ```
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

/// A glommio TCP stream with the `tokio::io` traits: see the [module](self) documentation. Must be
/// used on a glommio executor thread.
///
/// ```
/// use glommio::LocalExecutorBuilder;
/// use glommio::net::{TcpListener, TcpStream};
/// use meshwire_rt::glommio::UringStream;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// let handle = LocalExecutorBuilder::default().spawn(|| async {
///     let listener = TcpListener::bind("127.0.0.1:0").unwrap();
///     let addr = listener.local_addr().unwrap();
///     let mut client = UringStream::new(TcpStream::connect(addr).await.unwrap());
///     let mut server = UringStream::new(listener.accept().await.unwrap());
///     assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
///     client.write_all(b"ping").await.unwrap();
///     let mut buf = [0; 4];
///     server.read_exact(&mut buf).await.unwrap();
///     assert_eq!(&buf, b"ping");
/// });
/// handle.unwrap().join().unwrap();
/// ```
#[derive(Debug)]
pub struct UringStream {
    inner: glommio::net::TcpStream,
    /// The last read waited: glommio holds a poll of the socket, and until the poll answered, a
    /// read straight from the socket would fail (`EAGAIN`) for a system call's cost (a task that
    /// copies both ways is polled for either way's progress).
    waiting: bool,
}

impl UringStream {
    /// The stream over `inner`.
    pub fn new(inner: glommio::net::TcpStream) -> Self {
        Self { inner, waiting: false }
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

/// The stream's socket, borrowed: socket options read or set through it (with `socket2::SockRef`)
/// are the stream's own.
impl AsFd for UringStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        borrow_fd(&self.inner)
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
            let Poll::Ready(read) = Pin::new(&mut this.inner).poll_read(cx, dst) else {
                this.waiting = true;
                return Poll::Pending;
            };
            this.waiting = false;
            buf.advance(read?);
            return Poll::Ready(Ok(()));
        }
        // While a read waits, glommio answers (it reads once its poll said readable, and only
        // takes the waker before), without a failed read here first.
        if !this.waiting {
            match recv_uninit(&this.inner, buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
        // Nothing to read: glommio arms its poll (it tries once more first, hence the staging).
        READ_STAGING.with(|staging| {
            let mut staging = staging.borrow_mut();
            if staging.len() < STAGING {
                staging.resize(STAGING, 0);
            }
            let len = buf.remaining().min(STAGING);
            let Poll::Ready(read) = Pin::new(&mut this.inner).poll_read(cx, &mut staging[..len]) else {
                this.waiting = true;
                return Poll::Pending;
            };
            this.waiting = false;
            let n = read?;
            buf.put_slice(&staging[..n]);
            Poll::Ready(Ok(()))
        })
    }
}

/// `recv(MSG_DONTWAIT)` from `stream` into the unfilled, uninitialised part of `buf`, which is
/// then marked filled (and initialised) as far as the kernel wrote. `WouldBlock` when the socket
/// has nothing to read.
#[allow(unsafe_code)]
fn recv_uninit(stream: &glommio::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    let stream = borrow_fd(stream);
    use rustix::net::{RecvFlags, recv};
    // SAFETY: `unfilled_mut` hands out the unfilled part as `MaybeUninit`; the only writer is
    // `recv`, which stores bytes and never de-initialises any.
    let unfilled = unsafe { buf.unfilled_mut() };
    // rustix's `recv` into `MaybeUninit` memory returns the part the kernel initialised.
    let (received, _) = recv(stream, unfilled, RecvFlags::DONTWAIT)?;
    let n = received.0.len();
    // SAFETY: the first `n` bytes of the unfilled part were just written by the kernel.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

/// The descriptor of `stream`, borrowed for as long as `stream` is (glommio's stream implements
/// `AsRawFd` only).
#[allow(unsafe_code)]
fn borrow_fd(stream: &glommio::net::TcpStream) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is open and owned by `stream`, which closes it only when dropped; the
    // borrow cannot outlive `stream`.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
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
            // One slice (or none): glommio's write is the same system call.
            let only = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
            return Pin::new(&mut this.inner).poll_write(cx, only);
        };
        let sent = rustix::net::sendmsg(
            borrow_fd(&this.inner),
            bufs,
            &mut rustix::net::SendAncillaryBuffer::default(),
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
        );
        match sent {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(rustix::io::Errno::AGAIN) => {
                // The socket's buffer is full: glommio waits for room (a vectored write may write
                // fewer bytes than asked, here the first slice or part of it).
                Pin::new(&mut this.inner).poll_write(cx, first)
            }
            Err(error) => Poll::Ready(Err(error.into())),
        }
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
