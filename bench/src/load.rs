//! The load generators: bulk flows, request/response, connection churn, and connections held open.
//! Each takes a [`Route`] (direct or through proxy A) and the server, and has a timeout on every step.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::client::{self, Route, timed};
use crate::server::{CHUNK, Header, Mode, Server, pattern};

/// Size of a request and of its response.
pub(crate) const MESSAGE: usize = 1024;

/// Which way the bytes of a bulk flow go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Client to server (through A, then B).
    Upload,
    /// Server to client (through B, then A).
    Download,
}

impl Direction {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

/// What a set of bulk flows moved.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Moved {
    /// Bytes the senders wrote.
    pub(crate) sent: u64,
    /// Bytes the receivers counted.
    pub(crate) received: u64,
    /// From the start of the data (connections already open) to the end of the last flow.
    pub(crate) elapsed: Duration,
}

impl Moved {
    pub(crate) fn gbps(&self) -> f64 {
        self.received as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

static NEXT_FLOW: AtomicU64 = AtomicU64::new(1);

/// `flows` bulk flows in `direction`, all opened first and then started together, each moving data
/// for `duration`. Fails unless every receiver counted exactly what its sender sent.
pub(crate) async fn bulk(
    route: Route,
    server: &Server,
    direction: Direction,
    flows: usize,
    duration: Duration,
) -> anyhow::Result<Moved> {
    let mut conns = Vec::with_capacity(flows);
    for _ in 0..flows {
        conns.push(client::open(route, server.addr()).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    // A JoinSet: the flows left running are aborted when one fails.
    let mut tasks = JoinSet::new();
    for tcp in conns {
        let server = server.clone();
        let id = NEXT_FLOW.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            match direction {
                Direction::Upload => upload(tcp, id, deadline).await,
                Direction::Download => download(tcp, &server, id, duration).await,
            }
        });
    }
    let mut moved = Moved::default();
    while let Some(task) = tasks.join_next().await {
        let (sent, received) = task.context("a bulk flow task panicked")??;
        if sent != received {
            bail!("{} flow: {sent} bytes sent but {received} received", direction.name());
        }
        moved.sent += sent;
        moved.received += received;
    }
    moved.elapsed = start.elapsed();
    Ok(moved)
}

async fn upload(mut tcp: TcpStream, id: u64, deadline: Instant) -> anyhow::Result<(u64, u64)> {
    let header = Header {
        mode: Mode::Sink,
        id,
        param: 0,
    };
    timed("sending the header", tcp.write_all(&header.encode())).await?;
    let buf = pattern(CHUNK);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        timed("writing a bulk chunk", tcp.write_all(&buf)).await?;
        sent += buf.len() as u64;
    }
    timed("closing the write side", tcp.shutdown()).await?;
    let mut count = [0u8; 8];
    timed("reading the byte count of the sink", tcp.read_exact(&mut count)).await?;
    Ok((sent, u64::from_le_bytes(count)))
}

async fn download(mut tcp: TcpStream, server: &Server, id: u64, duration: Duration) -> anyhow::Result<(u64, u64)> {
    let header = Header {
        mode: Mode::Source,
        id,
        param: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    };
    timed("sending the header", tcp.write_all(&header.encode())).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = timed("reading a bulk chunk", tcp.read(&mut buf)).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    // The server records its count before it closes, so it is there once the end of stream arrived.
    let sent = server
        .sent(id)
        .with_context(|| format!("the server recorded no byte count for download flow {id}"))?;
    Ok((sent, received))
}

/// A latency histogram in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a request/response run gave.
pub(crate) struct Exchanges {
    pub(crate) latency: Histogram<u64>,
    pub(crate) elapsed: Duration,
    /// Each exchange: when its request was written, and its latency in nanoseconds (open-loop runs
    /// only; empty otherwise).
    pub(crate) timeline: Vec<(Instant, u64)>,
}

/// 1 KiB requests on one connection at `rate` per second for `duration`, sent on schedule whatever the
/// responses do (open loop). Latency is from the moment a request is written to the moment its
/// response is read; responses must come back in order, intact in length and sequence number.
pub(crate) async fn request_response_fixed(
    route: Route,
    server: SocketAddr,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<Exchanges> {
    let tcp = echo_connection(route, server).await?;
    let (mut reader, mut writer) = tcp.into_split();
    let count = (u64::from(rate) * duration.as_millis() as u64 / 1000).max(1);
    let interval = Duration::from_secs(1) / rate.max(1);
    let start = Instant::now() + Duration::from_millis(5);
    let epoch = Instant::now();
    let mut sender = JoinSet::new();
    sender.spawn(async move {
        let mut msg = pattern(MESSAGE);
        for i in 0..count {
            tokio::time::sleep_until((start + interval * u32::try_from(i).unwrap_or(u32::MAX)).into()).await;
            msg[..8].copy_from_slice(&i.to_le_bytes());
            msg[8..16].copy_from_slice(&nanos(epoch.elapsed()).to_le_bytes());
            timed("writing a request", writer.write_all(&msg)).await?;
        }
        anyhow::Ok(writer)
    });
    let mut latency = histogram();
    let mut timeline = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut buf = vec![0u8; MESSAGE];
    for i in 0..count {
        timed("reading a response", reader.read_exact(&mut buf)).await?;
        let now = nanos(epoch.elapsed());
        let (seq, sent_at) = words(&buf);
        if seq != i {
            bail!("response {seq} arrived where {i} was expected");
        }
        let took = now.saturating_sub(sent_at).max(1);
        latency.saturating_record(took);
        timeline.push((epoch + Duration::from_nanos(sent_at), took));
    }
    let elapsed = start.elapsed();
    if let Some(task) = sender.join_next().await {
        drop(task.context("the request sender panicked")??);
    }
    Ok(Exchanges {
        latency,
        elapsed,
        timeline,
    })
}

/// 1 KiB requests on one connection, each sent when the previous response arrived, for `duration`.
pub(crate) async fn request_response_closed(
    route: Route,
    server: SocketAddr,
    duration: Duration,
) -> anyhow::Result<Exchanges> {
    let mut tcp = echo_connection(route, server).await?;
    let mut msg = pattern(MESSAGE);
    let mut buf = vec![0u8; MESSAGE];
    let mut latency = histogram();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < duration {
        msg[..8].copy_from_slice(&i.to_le_bytes());
        let t0 = Instant::now();
        timed("writing a request", tcp.write_all(&msg)).await?;
        timed("reading a response", tcp.read_exact(&mut buf)).await?;
        latency.saturating_record(nanos(t0.elapsed()).max(1));
        if words(&buf).0 != i {
            bail!("response {} arrived where {i} was expected", words(&buf).0);
        }
        i += 1;
    }
    Ok(Exchanges {
        latency,
        elapsed: start.elapsed(),
        timeline: Vec::new(),
    })
}

fn words(buf: &[u8]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&buf[..8]);
    b.copy_from_slice(&buf[8..16]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

async fn echo_connection(route: Route, server: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut tcp = client::open(route, server).await?;
    let header = Header {
        mode: Mode::Echo,
        id: 0,
        param: 0,
    };
    timed("sending the header", tcp.write_all(&header.encode())).await?;
    Ok(tcp)
}

/// Opens a connection, has one byte echoed through it (so it reached the server), and returns it.
pub(crate) async fn open_echoed(route: Route, server: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut tcp = client::open(route, server).await?;
    let mut msg = Header {
        mode: Mode::Echo,
        id: 0,
        param: 0,
    }
    .encode()
    .to_vec();
    msg.push(7);
    timed("sending the header", tcp.write_all(&msg)).await?;
    let mut back = [0u8; 1];
    timed("reading the echoed byte", tcp.read_exact(&mut back)).await?;
    if back[0] != 7 {
        bail!("the echoed byte came back as {}", back[0]);
    }
    Ok(tcp)
}

/// What a run of new connections gave.
pub(crate) struct Opened {
    pub(crate) connections: u64,
    pub(crate) elapsed: Duration,
    /// From connect to the echoed byte, per connection.
    pub(crate) latency: Histogram<u64>,
    /// The connections, when they were to be held.
    pub(crate) held: Vec<TcpStream>,
}

/// New connections by `concurrency` workers, each opening one ([`open_echoed`]), then closing it
/// (`hold == false`) or keeping it (`hold == true`), until `limit` connections or `duration` is over.
pub(crate) async fn connections(
    route: Route,
    server: SocketAddr,
    concurrency: usize,
    duration: Duration,
    limit: u64,
    hold: bool,
) -> anyhow::Result<Opened> {
    let started = Arc::new(AtomicU64::new(0));
    let held = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let started = started.clone();
        let held = held.clone();
        tasks.spawn(async move {
            let mut latency = histogram();
            let mut done = 0u64;
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < limit {
                let t0 = Instant::now();
                let tcp = open_echoed(route, server).await?;
                latency.saturating_record(nanos(t0.elapsed()).max(1));
                done += 1;
                if hold {
                    held.lock().unwrap_or_else(PoisonError::into_inner).push(tcp);
                }
            }
            anyhow::Ok((done, latency))
        });
    }
    let mut total = 0;
    let mut latency = histogram();
    while let Some(task) = tasks.join_next().await {
        let (done, hist) = task.context("a connection worker panicked")??;
        total += done;
        latency.add(&hist).context("merging latency histograms")?;
    }
    let elapsed = start.elapsed();
    let held = std::mem::take(&mut *held.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Opened {
        connections: total,
        elapsed,
        latency,
        held,
    })
}

/// Opens `n` connections by `concurrency` workers ([`open_echoed`]) and returns them all, open.
pub(crate) async fn hold_open(
    route: Route,
    server: SocketAddr,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        tasks.spawn(async move {
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                mine.push(open_echoed(route, server).await?);
            }
            anyhow::Ok(mine)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(task) = tasks.join_next().await {
        all.extend(task.context("a connection worker panicked")??);
    }
    Ok(all)
}
