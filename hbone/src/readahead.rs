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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_small_reads_from_one_large_read_and_holds_nothing_when_idle() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut ra = ReadAhead::new(rx, 64 * 1024);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        tx.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        for chunk in got.chunks_mut(4096) {
            ra.read_exact(chunk).await.unwrap();
        }
        assert_eq!(got, data);
        // Drained; the next read waits: the buffer is released.
        let mut one = [0u8; 1];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), ra.read(&mut one))
                .await
                .is_err()
        );
        assert_eq!(ra.buf.capacity(), 0, "no buffer held while idle");
        tx.write_all(b"z").await.unwrap();
        drop(tx);
        assert_eq!(ra.read(&mut one).await.unwrap(), 1);
        assert_eq!(ra.read(&mut one).await.unwrap(), 0, "end of stream passes through");
    }

    #[tokio::test]
    async fn zero_size_reads_straight_through() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut ra = ReadAhead::new(rx, 0);
        tx.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 2];
        ra.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ab");
        assert_eq!(ra.buf.capacity(), 0);
    }
}
