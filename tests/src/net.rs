//! Blocking network helpers: servers on loopback, the testkit's SOCKS5 client with this harness's
//! timeout, raw exchanges, payloads and checksums. Every blocking read has a timeout so a broken
//! proxy fails a test instead of hanging it. (The HTTP/1.1 client is the testkit's
//! [`meshwire_testkit::http`].)

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use meshwire_testkit::socks5;

/// How long a blocking read may wait before the helpers give up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// `127.0.0.<n>`.
pub fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// `count` distinct free TCP ports, free on every address (bound on `0.0.0.0:0`, then released).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// A TCP echo server: every connection gets its bytes back, then a half close after the client's.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

impl EchoServer {
    /// Listens on `ip` (any free port).
    pub fn start(ip: IpAddr) -> EchoServer {
        Self::start_on(SocketAddr::new(ip, 0))
    }

    /// Listens on `addr`.
    pub fn start_on(addr: SocketAddr) -> EchoServer {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("echo server on {addr}: {e}"));
        let addr = listener.local_addr().expect("local address");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let Ok(mut reader) = stream.try_clone() else { return };
                    let _ = io::copy(&mut reader, &mut stream);
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        EchoServer { addr, accepted }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A server that answers each connection with the client's address as text (`ip:port\n`), then
/// echoes: it shows from which address a proxy connected.
pub fn whoami_server(ip: IpAddr) -> SocketAddr {
    whoami_serve(TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind whoami server"))
}

/// [`whoami_server`] on `listener` (bound elsewhere: inside a network namespace, say); its address.
pub fn whoami_serve(listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().expect("local address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                if stream.write_all(format!("{peer}\n").as_bytes()).is_err() {
                    return;
                }
                let Ok(mut reader) = stream.try_clone() else { return };
                let _ = io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Reads the first line a [`whoami_server`] sends, byte by byte (nothing after it is consumed): the
/// address it saw the connection come from.
pub fn whoami_peer(stream: &mut TcpStream) -> io::Result<SocketAddr> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the address line",
                ));
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    String::from_utf8_lossy(&line)
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("address line {line:?}: {e}")))
}

/// Reads the whoami line of `stream`, then sends `len` bytes through it and checks they come back
/// intact; returns the address the whoami server saw.
pub fn whoami_echo(mut stream: TcpStream, len: usize) -> SocketAddr {
    let seen = whoami_peer(&mut stream).expect("the whoami server's address line");
    let echoed = echo_exchange(stream, len).expect("the echo");
    assert!(echoed.intact(), "{echoed:?}");
    assert_eq!(echoed.received, len as u64, "echo length");
    seen
}

/// Whether the peer refused the connection: closed it (reset or end of stream) without sending a
/// byte. Panics on anything else (a read timeout, say).
pub fn refused(mut stream: TcpStream) -> bool {
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("waiting for the refusal: {e}"),
    }
}

/// A deterministic pseudo-random payload of `len` bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes);
    bytes
}

/// CRC-32 of `bytes`.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// What an echo exchange gave back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echoed {
    /// Bytes written.
    pub sent: u64,
    /// Bytes read back before the end of stream.
    pub received: u64,
    /// CRC-32 of what was written.
    pub sent_crc: u32,
    /// CRC-32 of what was read back.
    pub received_crc: u32,
}

impl Echoed {
    /// Whether everything came back unchanged.
    pub fn intact(&self) -> bool {
        self.sent == self.received && self.sent_crc == self.received_crc
    }
}

/// Writes `len` pseudo-random bytes to `stream` (then half-closes it) while reading everything that
/// comes back until end of stream; checksums both streams of bytes without keeping them.
pub fn echo_exchange(stream: TcpStream, len: usize) -> io::Result<Echoed> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> io::Result<(u64, u32)> {
        let mut rng = fastrand::Rng::with_seed(len as u64);
        let mut hasher = crc32fast::Hasher::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            rng.fill(&mut chunk[..n]);
            hasher.update(&chunk[..n]);
            writer.write_all(&chunk[..n])?;
            left -= n;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok((len as u64, hasher.finalize()))
    });
    let mut reader = stream;
    let mut hasher = crc32fast::Hasher::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) => break Err(e),
        }
    };
    let (sent, sent_crc) = sender
        .join()
        .map_err(|_| io::Error::other("the sending thread panicked"))??;
    read_result?;
    Ok(Echoed {
        sent,
        received,
        sent_crc,
        received_crc: hasher.finalize(),
    })
}

/// A SOCKS5 destination (the testkit's client).
pub use meshwire_testkit::socks5::Target as Socks5Target;

/// Why a SOCKS5 CONNECT did not succeed (the testkit's client).
pub use meshwire_testkit::socks5::Failure as Socks5Failure;

/// A SOCKS5 CONNECT through the proxy's SOCKS5 listener at `proxy`. `Ok` with the connected stream
/// (reads time out after [`IO_TIMEOUT`]) on reply 0; `Err` with the reply code otherwise (or an IO
/// error as code 255 with its message).
pub fn socks5_connect(proxy: SocketAddr, target: &Socks5Target) -> Result<TcpStream, Socks5Failure> {
    let tcp = TcpStream::connect(proxy).map_err(|e| Socks5Failure::Io(e.to_string()))?;
    socks5::connect_blocking(tcp, target, IO_TIMEOUT)
}

/// [`socks5_connect`] from the local address `from` (port chosen by the kernel): the address a
/// proxy in shared mode tells workloads apart by.
pub fn socks5_connect_from(from: IpAddr, proxy: SocketAddr, target: &Socks5Target) -> Result<TcpStream, Socks5Failure> {
    let io = |e: io::Error| Socks5Failure::Io(e.to_string());
    let socket = socket2::Socket::new(socket2::Domain::for_address(proxy), socket2::Type::STREAM, None).map_err(io)?;
    socket.bind(&SocketAddr::new(from, 0).into()).map_err(io)?;
    socket.connect(&proxy.into()).map_err(io)?;
    socks5::connect_blocking(socket.into(), target, IO_TIMEOUT)
}

/// Sends raw bytes to `addr`, half-closes, and returns what came back before the peer closed (or
/// before a read waited [`IO_TIMEOUT`]): how a test speaks a broken protocol to a listener.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    tcp.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    tcp.write_all(bytes).unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    // The client is done: the peer sees the end of its input (mid-handshake for short inputs). (A
    // peer that already answered and closed makes this fail with ENOTCONN: nothing to do then.)
    let _ = tcp.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    answer
}
