//! The far side of a tunnel, for tests that watch what reaches it: a reader that counts bytes to the
//! end, and an HBONE handler whose upstreams never read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshwire_hbone::server::{Connected, Handler, InboundRequest, Refusal, StreamReport};
use tokio::io::{AsyncRead, AsyncReadExt, DuplexStream};

/// Reads `r` until its end or an error; how many bytes came before.
pub async fn count_to_end<R: AsyncRead + Unpin>(r: &mut R) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// A handler whose upstreams never read: each is one end of an in-memory pipe of `pipe` bytes whose
/// other end is kept, unread, for as long as the handler lives. Once the pipe is full, the stream's
/// data stays in the server.
pub struct NeverRead {
    pipe: usize,
    kept: Mutex<Vec<DuplexStream>>,
    /// Streams connected so far (shared, so a test can watch it after handing the handler over).
    pub accepted: Arc<AtomicU64>,
    /// Streams finished so far.
    pub finished: AtomicU64,
}

impl NeverRead {
    /// A handler whose upstream pipes hold `pipe` bytes.
    pub fn new(pipe: usize) -> Self {
        Self {
            pipe,
            kept: Mutex::new(Vec::new()),
            accepted: Arc::default(),
            finished: AtomicU64::new(0),
        }
    }
}

impl Handler for NeverRead {
    type Upstream = DuplexStream;

    async fn connect(&self, _: &InboundRequest) -> Result<Connected<DuplexStream>, Refusal> {
        let (near, far) = tokio::io::duplex(self.pipe);
        self.kept
            .lock()
            .unwrap_or_else(|e| panic!("NeverRead's pipes: {e}"))
            .push(far);
        self.accepted.fetch_add(1, Ordering::SeqCst);
        Ok(near.into())
    }

    fn finished(&self, _: StreamReport) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}
