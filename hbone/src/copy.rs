//! Bidirectional copy between two byte streams (a tunnel and a TCP connection), in one future.
//!
//! Each direction has its own buffer. It is allocated when data is about to be read, starts at
//! [`CopyConfig::initial_buffer`], doubles each time a read fills it (up to
//! [`CopyConfig::max_buffer`]), and is released when the direction is idle, so an idle connection
//! holds no copy buffer. End of input on one side becomes a half close (`shutdown`) of the other;
//! the copy ends when both directions are done. Bytes are counted each way, also when the copy
//! fails, so metrics stay exact.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

/// Bytes one direction moves in one poll before it yields to the executor. tokio budgets its own
/// IO; glommio and other executors do not, and a busy flow must not starve its neighbours.
pub(crate) const POLL_BUDGET: usize = 1024 * 1024;

/// Buffer sizes of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyConfig {
    /// Size of a buffer when a direction wakes up (default 16 KiB).
    pub initial_buffer: usize,
    /// Largest buffer a busy direction grows to (default 256 KiB).
    pub max_buffer: usize,
}

impl Default for CopyConfig {
    fn default() -> Self {
        Self {
            initial_buffer: 16 * 1024,
            max_buffer: 256 * 1024,
        }
    }
}

/// How a copy ended.
#[derive(Debug)]
pub struct CopyOutcome {
    /// Bytes copied from the first stream to the second.
    pub a_to_b: u64,
    /// Bytes copied from the second stream to the first.
    pub b_to_a: u64,
    /// The first error, if the copy did not end with both directions closed cleanly.
    pub error: Option<io::Error>,
}

struct Half {
    /// Bytes read and not yet written start at `written`; the capacity is the read size.
    buf: BytesMut,
    written: usize,
    size: usize,
    read_done: bool,
    shut_down: bool,
    count: u64,
}

impl Half {
    fn new(config: &CopyConfig) -> Self {
        Self {
            buf: BytesMut::new(),
            written: 0,
            size: config.initial_buffer.max(1),
            read_done: false,
            shut_down: false,
            count: 0,
        }
    }

    fn done(&self) -> bool {
        self.shut_down
    }

    /// Moves bytes from `r` to `w` until `r` would block with nothing buffered, or both are done.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        max: usize,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let mut budget = POLL_BUDGET;
        loop {
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.written < self.buf.len() {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::WriteZero, "peer accepted no bytes")));
                }
                self.written += n;
                self.count += n as u64;
                budget = budget.saturating_sub(n);
                continue;
            }
            if self.read_done {
                if !self.shut_down {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            // Everything read was written: read more, into a bigger buffer if the last read filled it.
            if self.buf.len() == self.size && self.size < max {
                self.size = (self.size * 2).min(max);
            }
            self.buf.clear();
            self.written = 0;
            if self.buf.capacity() < self.size {
                self.buf.reserve(self.size);
            }
            // Read at most `size` bytes, without zeroing the buffer first.
            let mut window = (&mut self.buf).limit(self.size);
            match poll_read_buf(r.as_mut(), cx, &mut window) {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: flush what was written, and give the buffer back.
                    ready!(w.as_mut().poll_flush(cx))?;
                    self.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions reached end of input (each half-closed
/// on the other side) or one fails.
///
/// # Example
///
/// ```
/// use meshwire_hbone::copy::{self, CopyConfig};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A client's connection and the upstream it is proxied to (here in-memory pipes).
/// let (mut client, mut from_client) = tokio::io::duplex(1024);
/// let (mut to_upstream, mut upstream) = tokio::io::duplex(1024);
/// let proxy = tokio::spawn(async move {
///     copy::bidirectional(&mut from_client, &mut to_upstream, CopyConfig::default()).await
/// });
/// client.write_all(b"ping").await?;
/// client.shutdown().await?; // a half close: the upstream reads the end, and can still answer
/// let mut request = Vec::new();
/// upstream.read_to_end(&mut request).await?;
/// upstream.write_all(b"pong!").await?;
/// upstream.shutdown().await?;
/// let mut answer = Vec::new();
/// client.read_to_end(&mut answer).await?;
/// let outcome = proxy.await?;
/// assert_eq!((request.as_slice(), answer.as_slice()), (&b"ping"[..], &b"pong!"[..]));
/// assert_eq!((outcome.a_to_b, outcome.b_to_a, outcome.error.is_none()), (4, 5, true));
/// # Ok(())
/// # }
/// ```
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B, config: CopyConfig) -> CopyOutcome
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Half::new(&config);
    let mut ba = Half::new(&config);
    let max = config.max_buffer.max(config.initial_buffer).max(1);
    let result = poll_fn(|cx| {
        if !ab.done()
            && let Poll::Ready(Err(e)) = ab.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), max)
        {
            return Poll::Ready(Err(e));
        }
        if !ba.done()
            && let Poll::Ready(Err(e)) = ba.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), max)
        {
            return Poll::Ready(Err(e));
        }
        if ab.done() && ba.done() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    CopyOutcome {
        a_to_b: ab.count,
        b_to_a: ba.count,
        error: result.err(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (mut a, mut a_peer) = tokio::io::duplex(64 * 1024);
        let (mut b, mut b_peer) = tokio::io::duplex(64 * 1024);
        let copier = tokio::spawn(async move {
            bidirectional(
                &mut a,
                &mut b,
                CopyConfig {
                    initial_buffer: 8,
                    max_buffer: 1024,
                },
            )
            .await
        });
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let send = data.clone();
        let writer = tokio::spawn(async move {
            a_peer.write_all(&send).await.unwrap();
            a_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            a_peer.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data, "a -> b delivered everything, then end of stream");
        b_peer.write_all(b"reply after half close").await.unwrap();
        b_peer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half close");
        let outcome = copier.await.unwrap();
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.a_to_b, data.len() as u64);
        assert_eq!(outcome.b_to_a, 22);
    }

    /// Always ready: endless bytes to read, endless room to write.
    struct Endless;

    impl AsyncRead for Endless {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = buf.remaining();
            buf.put_slice(&vec![7u8; n]);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Endless {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_busy_copy_yields_to_other_tasks_on_an_executor_without_budgets() {
        let (tx, rx) = std::sync::mpsc::channel();
        // On its own thread, so that a copy that never yields fails the test instead of hanging it.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                // `unconstrained` turns tokio's own cooperative budget off, as on glommio.
                tokio::task::spawn_local(tokio::task::unconstrained(async {
                    let (mut a, mut b) = (Endless, Endless);
                    bidirectional(&mut a, &mut b, CopyConfig::default()).await
                }));
                tokio::task::spawn_local(async move {
                    tx.send(()).unwrap();
                })
                .await
                .unwrap();
            });
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the other task ran beside the busy copy");
    }

    #[tokio::test]
    async fn an_error_keeps_the_counts() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, b_peer) = tokio::io::duplex(1024);
        let copier = tokio::spawn(async move { bidirectional(&mut a, &mut b, CopyConfig::default()).await });
        a_peer.write_all(b"12345").await.unwrap();
        drop(b_peer); // writes to b now fail
        a_peer.write_all(b"678").await.ok();
        let outcome = copier.await.unwrap();
        assert!(outcome.error.is_some());
        assert!(outcome.a_to_b <= 8);
    }
}
