//! A fake upstream DNS server on real sockets (UDP and TCP on one port of 127.0.0.1), answering
//! with a script and recording what it received, and the few DNS helpers the tests share: queries
//! built and answers parsed with `hickory-proto`, a UDP and a TCP client.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, Record, RecordType};

/// What the fake upstream received: a query and how it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// `udp` or `tcp`.
    pub transport: &'static str,
    /// The query, as received.
    pub query: Vec<u8>,
    /// The answer sent, if any.
    pub answer: Option<Vec<u8>>,
}

/// The answer to a query (its bytes), or none (the query goes unanswered).
pub type Script = dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync;

/// A fake upstream resolver: UDP and TCP on the same port of 127.0.0.1, each on a thread, until
/// dropped.
pub struct FakeDns {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for FakeDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDns")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeDns {
    /// Starts the server on a free port, answering every query with `script`.
    pub fn start(script: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync + 'static) -> io::Result<FakeDns> {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = tcp.local_addr()?;
        let udp = UdpSocket::bind(addr)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        tcp.set_nonblocking(true)?;
        let script: Arc<Script> = Arc::new(script);
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (script, received, stop) = (script.clone(), received.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = vec![0; 65_535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    let query = buf[..len].to_vec();
                    let answer = script(&query);
                    // Recorded before it is sent: a client that has the answer finds it recorded.
                    record(&received, "udp", query, answer.clone());
                    if let Some(answer) = &answer {
                        let _ = udp.send_to(answer, peer);
                    }
                }
            });
        }
        {
            let (script, received, stop) = (script, received.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((stream, _)) => {
                            let (script, received) = (script.clone(), received.clone());
                            thread::spawn(move || serve_tcp(stream, &*script, &received));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        Ok(FakeDns { addr, received, stop })
    }

    /// Its address (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn record(received: &Mutex<Vec<Received>>, transport: &'static str, query: Vec<u8>, answer: Option<Vec<u8>>) {
    if let Ok(mut received) = received.lock() {
        received.push(Received {
            transport,
            query,
            answer,
        });
    }
}

fn serve_tcp(mut stream: TcpStream, script: &Script, received: &Mutex<Vec<Received>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    while let Ok(query) = read_tcp_message(&mut stream) {
        let answer = script(&query);
        record(received, "tcp", query, answer.clone());
        if let Some(answer) = &answer {
            let Ok(len) = u16::try_from(answer.len()) else { return };
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend(answer);
            if stream.write_all(&framed).is_err() {
                return;
            }
        }
    }
}

fn read_tcp_message(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0; 2];
    stream.read_exact(&mut len)?;
    let mut message = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message)?;
    Ok(message)
}

/// A query for `name` of type `record_type` with `id`, recursion desired, with EDNS announcing
/// `edns` bytes if given.
pub fn query(id: u16, name: &str, record_type: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    message.add_query(Query::query(Name::from_ascii(name).unwrap_or_default(), record_type));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        message.set_edns(e);
    }
    message.to_vec().unwrap_or_default()
}

/// The answer to `query` (bytes) with `records` in its answer section: its id and question, `RD`
/// copied, `RA` set. Empty if the query does not parse.
pub fn answer(query: &[u8], records: Vec<Record>) -> Vec<u8> {
    let Ok(query) = Message::from_vec(query) else {
        return Vec::new();
    };
    let mut message = Message::new();
    message
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .add_queries(query.queries().to_vec())
        .add_answers(records);
    message.to_vec().unwrap_or_default()
}

/// Sends `query` over UDP to `server` and waits up to 5 s for one answer.
pub fn udp_exchange(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(query, server)?;
    let mut buf = vec![0; 65_535];
    let (len, _) = socket.recv_from(&mut buf)?;
    buf.truncate(len);
    Ok(buf)
}

/// Sends `query` over a new TCP connection to `server` and reads one answer (5 s at most).
pub fn tcp_exchange(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend(query);
    stream.write_all(&framed)?;
    read_tcp_message(&mut stream)
}

/// Parses an answer; panics with the bytes if it does not parse.
pub fn parse(answer: &[u8]) -> Message {
    Message::from_vec(answer).unwrap_or_else(|e| panic!("not a DNS message ({e}): {answer:?}"))
}
