//! The destination workload: one TCP server in the bench process, on `127.0.0.2`, that sinks, sources
//! or echoes bytes as the first bytes of each connection ask.
//!
//! Every connection starts with a [`Header`] of [`HEADER_LEN`] bytes: a mode, a flow id and a parameter.
//! - [`Mode::Sink`]: reads until end of stream and answers with the byte count (u64 LE), then closes.
//! - [`Mode::Source`]: writes for `param` milliseconds, records the byte count under the flow id
//!   ([`Server::sent`]), then closes its write side.
//! - [`Mode::Echo`]: writes back everything it reads until end of stream.
//!
//! Payloads are not checksummed: counts are checked end to end instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Bytes of the header every connection starts with.
pub(crate) const HEADER_LEN: usize = 24;
/// Size of the buffers bulk flows read and write.
pub(crate) const CHUNK: usize = 256 * 1024;
/// How long the server waits for a header or for any one read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What a connection asks the server to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Read everything, answer with the count.
    Sink,
    /// Write for `param` milliseconds.
    Source,
    /// Echo.
    Echo,
}

impl Mode {
    fn byte(self) -> u8 {
        match self {
            Mode::Sink => b'U',
            Mode::Source => b'D',
            Mode::Echo => b'E',
        }
    }

    fn from_byte(b: u8) -> Option<Mode> {
        match b {
            b'U' => Some(Mode::Sink),
            b'D' => Some(Mode::Source),
            b'E' => Some(Mode::Echo),
            _ => None,
        }
    }
}

/// The first [`HEADER_LEN`] bytes of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) mode: Mode,
    pub(crate) id: u64,
    pub(crate) param: u64,
}

impl Header {
    pub(crate) fn encode(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.mode.byte();
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.param.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HEADER_LEN]) -> Option<Header> {
        let word = |range: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[range]);
            u64::from_le_bytes(w)
        };
        Some(Header {
            mode: Mode::from_byte(bytes[0])?,
            id: word(8..16),
            param: word(16..24),
        })
    }
}

/// The running server.
#[derive(Clone)]
pub(crate) struct Server {
    addr: SocketAddr,
    sent: Arc<Mutex<HashMap<u64, u64>>>,
}

impl Server {
    /// Binds `<server_ip>:0` (127.0.0.2, or with veth the server node's address, in its namespace)
    /// and serves in the background of the current runtime.
    pub(crate) fn start(server_ip: std::net::Ipv4Addr) -> anyhow::Result<Server> {
        // The socket is made on the server node: it stays there.
        let socket = crate::nodes::on_server_thread(|| {
            let fd = rustix::net::socket_with(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
                None,
            )?;
            Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
        })
        .context("creating the server socket")?;
        socket
            .set_reuseaddr(true)
            .context("SO_REUSEADDR on the server socket")?;
        socket
            .bind(SocketAddr::new(server_ip.into(), 0))
            .with_context(|| format!("binding the destination server on {server_ip}:0 (is 127.0.0.0/8 on lo?)"))?;
        let listener = socket.listen(8192).context("listening on the server socket")?;
        let addr = listener.local_addr().context("server address")?;
        let server = Server {
            addr,
            sent: Arc::default(),
        };
        let shared = server.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            // A failing connection is the client's to notice (its counts will not match).
                            let _ = shared.serve(tcp).await;
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Ok(server)
    }

    /// The server's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bytes a [`Mode::Source`] connection with flow id `id` wrote, once it has finished; taken
    /// out of the record.
    pub(crate) fn sent(&self, id: u64) -> Option<u64> {
        self.sent.lock().unwrap_or_else(PoisonError::into_inner).remove(&id)
    }

    async fn serve(&self, mut tcp: TcpStream) -> anyhow::Result<()> {
        tcp.set_nodelay(true)?;
        let mut head = [0u8; HEADER_LEN];
        tokio::time::timeout(IO_TIMEOUT, tcp.read_exact(&mut head)).await??;
        let header = Header::decode(&head).context("bad header")?;
        match header.mode {
            Mode::Sink => {
                let total = tokio::time::timeout(IO_TIMEOUT, discard_to_end(&tcp)).await??;
                tokio::time::timeout(IO_TIMEOUT, tcp.write_all(&total.to_le_bytes())).await??;
                tokio::time::timeout(IO_TIMEOUT, tcp.shutdown()).await??;
            }
            Mode::Source => {
                let buf = pattern(CHUNK);
                let until = Instant::now() + Duration::from_millis(header.param);
                let mut total = 0u64;
                while Instant::now() < until {
                    tokio::time::timeout(IO_TIMEOUT, tcp.write_all(&buf)).await??;
                    total += buf.len() as u64;
                }
                self.sent
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(header.id, total);
                tokio::time::timeout(IO_TIMEOUT, tcp.shutdown()).await??;
            }
            Mode::Echo => {
                // No timeout here: echo connections are held idle on purpose; the client ends them.
                let (mut r, mut w) = tcp.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
            }
        }
        Ok(())
    }
}

/// Reads `tcp` to its end without copying what it reads: `recv(MSG_TRUNC)` on a TCP socket discards
/// up to the given length from the receive queue. The sink costs the bench little CPU this way, so
/// that the proxies, not the load generator, get the CPUs they share with it. Returns the byte count.
async fn discard_to_end(tcp: &TcpStream) -> std::io::Result<u64> {
    use rustix::net::{RecvFlags, recv};
    // The length says how much may be discarded at once; the kernel writes nothing into it.
    let mut scratch = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        tcp.readable().await?;
        // With TRUNC the kernel copies nothing; the second figure is what it discarded (up to CHUNK).
        let discarded = tcp.try_io(tokio::io::Interest::READABLE, || {
            recv(tcp, &mut scratch[..], RecvFlags::TRUNC | RecvFlags::DONTWAIT)
                .map(|(_, full)| full)
                .map_err(std::io::Error::from)
        });
        match discarded {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
}

/// `len` bytes of a fixed, non-constant pattern.
pub(crate) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

/// The flag that makes the bench executable run only the server, in a process of its own (see
/// [`ServerProcess`]).
pub(crate) const SERVE_FLAG: &str = "--serve-internal";

/// Runs the server in this process until standard input closes (the parent bench went away): prints
/// `listening <addr>` on standard output once it accepts. Used by [`ServerProcess`], which starts it
/// on the server node with the address to listen on as its argument.
pub(crate) fn serve_until_stdin_closes(server_ip: Option<&str>) -> anyhow::Result<()> {
    let server_ip = match server_ip {
        Some(ip) => ip.parse().with_context(|| format!("server address {ip:?}"))?,
        None => crate::nodes::server_ip(),
    };
    use std::io::{Read, Write};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let server = runtime.block_on(async { Server::start(server_ip) })?;
    let mut out = std::io::stdout();
    writeln!(out, "listening {}", server.addr())?;
    out.flush()?;
    let mut sink = [0u8; 64];
    while std::io::stdin().read(&mut sink).unwrap_or(0) > 0 {}
    drop(runtime);
    Ok(())
}

/// The server run as a child process of the bench (the bench executable with [`SERVE_FLAG`]), so that
/// the server's ends of many idle connections do not count against the bench's open-file limit.
/// Killed when dropped; it also ends by itself when the bench's end of its standard input closes.
pub(crate) struct ServerProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ServerProcess {
    /// Starts it and waits (up to 10 s) for its address.
    pub(crate) async fn start() -> anyhow::Result<ServerProcess> {
        use std::io::BufRead;
        use std::process::Stdio;
        let exe = std::env::current_exe().context("locating the bench executable")?;
        let mut command = crate::nodes::server_command(&exe);
        let mut child = command
            .arg(SERVE_FLAG)
            .arg(crate::nodes::server_ip().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the server process {} {SERVE_FLAG}", exe.display()))?;
        let stdout = child.stdout.take().context("the server process has no stdout")?;
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let mut process = ServerProcess {
            child,
            addr: SocketAddr::from((crate::nodes::server_ip(), 0)),
        };
        let line = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(Ok(line))) => line,
            Ok(Ok(Err(err))) => return Err(err).context("reading the server process's address"),
            Ok(Err(err)) => return Err(err).context("reading the server process's address"),
            Err(_) => anyhow::bail!("the server process did not say its address within 10 s"),
        };
        process.addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the server process said {line:?} instead of `listening <addr>`"))?;
        Ok(process)
    }

    /// Its address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
