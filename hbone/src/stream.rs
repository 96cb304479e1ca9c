//! `AsyncRead` + `AsyncWrite` over one HTTP/2 stream: DATA frames carry the bytes, END_STREAM is a
//! half close, and dropping the stream before both directions ended resets it (RST_STREAM CANCEL).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes};
use futures_util::task::AtomicWaker;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use crate::budget::Lease;
use crate::copy::{CopyConfig, CopyOutcome, POLL_BUDGET};

/// Maps an HTTP/2 error to the `io::Error` a byte stream reports.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// One HTTP/2 stream as a byte stream.
pub(crate) struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read.
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
}

impl H2Io {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
        }
    }
}

impl H2Io {
    /// Resets the stream with `reason` (RST_STREAM), unless it already ended.
    pub(crate) fn reset(&mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }
}

impl AsyncRead for H2Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Give the window back as the reader consumes, so a slow reader slows the sender.
                this.recv.flow_control().release_capacity(n).map_err(h2_to_io)?;
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.send_done {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            // Capacity already assigned is used at once; `poll_capacity` only reports increases.
            let available = match this.send.capacity() {
                0 => ready!(this.send.poll_capacity(cx)),
                n => Some(Ok(n)),
            };
            match available {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    // The stream can no longer send: tell why if the peer reset it.
                    let err = match this.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by peer: {reason}"),
                        ),
                        Poll::Ready(Err(e)) => h2_to_io(e),
                        Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
                    };
                    return Poll::Ready(Err(err));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.send_done {
            this.send_done = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// One direction of a splice: upstream bytes handed to h2 without a copy.
struct ToH2<'a> {
    /// What the direction holds of its budgets: taken before it reads from the upstream, given
    /// back once the upstream has nothing more to send and HTTP/2 has let go of every byte read
    /// (or on drop, when the splice ends).
    lease: Option<Lease<'a>>,
    /// Read buffer; a read that fills most of it is given to h2 as it is.
    buf: Vec<u8>,
    /// Bytes read and not yet accepted by h2 (waiting for flow-control capacity).
    pending: Bytes,
    /// The chunks h2 still holds (in its send queue or being written to the connection).
    flight: Arc<InFlight>,
    size: usize,
    read_done: bool,
    /// END_STREAM was queued; the direction ends once h2 holds none of its bytes.
    eos_sent: bool,
    shut_down: bool,
    count: u64,
}

impl ToH2<'_> {
    /// The bytes just read, as a chunk h2 can hold: a read that filled at least half of the buffer
    /// takes the buffer (its unused tail given back), a smaller one is copied out so that the buffer
    /// serves the next read and h2 never pins a large allocation for a few bytes.
    fn take_read(&mut self) -> Bytes {
        let data = if self.buf.len() * 2 >= self.buf.capacity() {
            let mut data = std::mem::take(&mut self.buf);
            data.shrink_to_fit();
            data
        } else {
            let data = self.buf.clone();
            self.buf.clear();
            data
        };
        self.flight.chunk(data)
    }
}

/// Counts the chunks of one direction that HTTP/2 still holds, and wakes the direction when it lets
/// go of the last: h2 keeps up to a send buffer of a stream's bytes queued while its connection
/// cannot write (a peer that does not read), and those bytes stay under the stream's lease.
#[derive(Debug, Default)]
struct InFlight {
    chunks: AtomicUsize,
    drained: AtomicWaker,
}

impl InFlight {
    /// Ready once h2 holds no chunk of this direction; otherwise the task is woken when it does.
    fn poll_drained(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.chunks.load(Ordering::Acquire) == 0 {
            return Poll::Ready(());
        }
        self.drained.register(cx.waker());
        // The last chunk may have gone between the load and the registration.
        if self.chunks.load(Ordering::Acquire) == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Wraps `data` so that dropping its last reference (h2 wrote or discarded it) counts it out.
    fn chunk(self: &Arc<Self>, data: Vec<u8>) -> Bytes {
        self.chunks.fetch_add(1, Ordering::AcqRel);
        Bytes::from_owner(Chunk {
            data,
            flight: self.clone(),
        })
    }
}

/// Bytes read from an upstream, as h2 holds them.
struct Chunk {
    data: Vec<u8>,
    flight: Arc<InFlight>,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if self.flight.chunks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.flight.drained.wake();
        }
    }
}

/// The other direction: DATA received from h2 written to the upstream straight from h2's buffers.
struct FromH2 {
    chunk: Bytes,
    recv_done: bool,
    shut_down: bool,
    count: u64,
}

impl H2Io {
    /// Copies between this stream and `upstream` until both directions ended, like
    /// [`crate::copy::bidirectional`] but without copying through an intermediate buffer: bytes read
    /// from the upstream are handed to HTTP/2 as they are, and received DATA is written to the
    /// upstream from HTTP/2's own buffers. Flow-control capacity is given back only once the
    /// upstream took the bytes, so a slow upstream slows the peer.
    ///
    /// With a `lease`, the upstream is read only while the lease is held: it is taken when the
    /// upstream has bytes to send and given back when it has no more (see [`crate::budget`]).
    pub(crate) async fn splice<U>(
        &mut self,
        upstream: &mut U,
        config: CopyConfig,
        lease: Option<Lease<'_>>,
    ) -> CopyOutcome
    where
        U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let max = config.max_buffer.max(config.initial_buffer).max(1);
        let mut out = ToH2 {
            lease,
            buf: Vec::new(),
            pending: Bytes::new(),
            flight: Arc::default(),
            size: config.initial_buffer.max(1),
            read_done: false,
            eos_sent: false,
            shut_down: self.send_done,
            count: 0,
        };
        let mut inc = FromH2 {
            chunk: std::mem::take(&mut self.pending),
            recv_done: self.recv_done,
            shut_down: false,
            count: 0,
        };
        let result = poll_fn(|cx| {
            if !out.shut_down
                && let Poll::Ready(Err(e)) = self.poll_to_h2(&mut out, cx, Pin::new(&mut *upstream), max)
            {
                return Poll::Ready(Err(e));
            }
            if !inc.shut_down
                && let Poll::Ready(Err(e)) = self.poll_from_h2(&mut inc, cx, Pin::new(&mut *upstream))
            {
                return Poll::Ready(Err(e));
            }
            if out.shut_down && inc.shut_down {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await;
        self.send_done = out.shut_down;
        self.recv_done = inc.recv_done;
        CopyOutcome {
            a_to_b: inc.count,
            b_to_a: out.count,
            error: result.err(),
        }
    }

    fn poll_to_h2<U: AsyncRead + ?Sized>(
        &mut self,
        st: &mut ToH2<'_>,
        cx: &mut Context<'_>,
        mut upstream: Pin<&mut U>,
        max: usize,
    ) -> Poll<io::Result<()>> {
        let mut budget = POLL_BUDGET;
        loop {
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !st.pending.is_empty() {
                self.send.reserve_capacity(st.pending.len());
                let available = match self.send.capacity() {
                    0 => ready!(self.send.poll_capacity(cx)),
                    n => Some(Ok(n)),
                };
                match available {
                    Some(Ok(0)) => continue,
                    Some(Ok(n)) => {
                        let chunk = st.pending.split_to(n.min(st.pending.len()));
                        st.count += chunk.len() as u64;
                        budget = budget.saturating_sub(chunk.len());
                        self.send.send_data(chunk, false).map_err(h2_to_io)?;
                        continue;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                    None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))),
                }
            }
            if st.read_done {
                if !st.eos_sent {
                    self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                    st.eos_sent = true;
                }
                // The lease covers what h2 still holds of the stream's bytes: the direction ends
                // once h2 let go of them (written, or discarded when the stream or connection ends).
                if let Some(lease) = st.lease.as_mut() {
                    ready!(st.flight.poll_drained(cx));
                    lease.release();
                }
                st.shut_down = true;
                return Poll::Ready(Ok(()));
            }
            // Hold the lease before reading: a spent budget stops the reads, and TCP pushes back
            // on the upstream.
            if let Some(lease) = st.lease.as_mut()
                && !lease.held()
            {
                ready!(lease.poll_acquire(cx));
            }
            st.buf.reserve(st.size);
            let mut window = (&mut st.buf).limit(st.size);
            match poll_read_buf(upstream.as_mut(), cx, &mut window) {
                Poll::Ready(Ok(0)) => st.read_done = true,
                Poll::Ready(Ok(n)) => {
                    // Grow the reads while they fill the buffer.
                    if n == st.size && st.size < max {
                        st.size = (st.size * 2).min(max);
                    }
                    st.pending = st.take_read();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: give the buffer back, and the lease once h2 holds none of the bytes.
                    st.buf = Vec::new();
                    if let Some(lease) = st.lease.as_mut()
                        && st.flight.poll_drained(cx).is_ready()
                    {
                        lease.release();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn poll_from_h2<U: AsyncWrite + ?Sized>(
        &mut self,
        st: &mut FromH2,
        cx: &mut Context<'_>,
        mut upstream: Pin<&mut U>,
    ) -> Poll<io::Result<()>> {
        let mut budget = POLL_BUDGET;
        loop {
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !st.chunk.is_empty() {
                let Poll::Ready(written) = upstream.as_mut().poll_write(cx, &st.chunk) else {
                    // The upstream takes nothing now. Should the peer reset the stream or the
                    // connection go, end the splice rather than hold the peer's bytes (and its
                    // connection) until the upstream reads.
                    return match self.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by peer: {reason}"),
                        ))),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
                        Poll::Pending => Poll::Pending,
                    };
                };
                let n = written?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "upstream accepted no bytes",
                    )));
                }
                st.chunk.advance(n);
                st.count += n as u64;
                budget = budget.saturating_sub(n);
                self.recv.flow_control().release_capacity(n).map_err(h2_to_io)?;
                continue;
            }
            if st.recv_done {
                ready!(upstream.as_mut().poll_shutdown(cx))?;
                st.shut_down = true;
                return Poll::Ready(Ok(()));
            }
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => st.chunk = data,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                Poll::Ready(None) => st.recv_done = true,
                Poll::Pending => {
                    ready!(upstream.as_mut().poll_flush(cx))?;
                    return Poll::Pending;
                }
            }
        }
    }
}
