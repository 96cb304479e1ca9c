//! A read-ahead layer under TLS: one large socket read serves many TLS records.
//!
//! rustls asks its transport for at most one record (about 18 KiB) at a time, so a bulk transfer
//! costs a `recv` per record. [`ReadAhead`] reads up to [`crate::Settings::read_ahead`] bytes at once
//! and serves rustls from memory. Its buffer is allocated when data arrives and released as soon as
//! it is drained and the socket has nothing more, so an idle connection holds no buffer. Writes
//! pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Reads ahead of the consumer by up to `size` bytes.
pub(crate) struct ReadAhead<IO> {
    io: IO,
    buf: BytesMut,
    size: usize,
}

impl<IO> ReadAhead<IO> {
    pub(crate) fn new(io: IO, size: usize) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            size,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            // Nothing buffered: a caller asking for as much as we would read goes straight through.
            if this.size == 0 || out.remaining() >= this.size {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf.reserve(this.size);
            let mut window = (&mut this.buf).limit(this.size);
            match poll_read_buf(Pin::new(&mut this.io), cx, &mut window) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: hold no buffer while waiting.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
            if this.buf.is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}
