//! Small network tools the namespace tests run inside network namespaces (`ip netns exec`):
//!
//! - `mw-testkit echo <ip:port>`: a TCP echo server; prints `listening <addr>` once bound, then serves
//!   until killed. Each connection first receives the client's address as a line (`<ip:port>\n`), then
//!   its bytes back.
//! - `mw-testkit exchange <ip:port> <bytes>`: connects, reads the first line (the address the server
//!   saw), sends `<bytes>` pseudo-random bytes, half-closes, reads the echo to the end; prints
//!   `peer=<addr> sent=<n> received=<n> intact=<true|false>` and exits 0, or prints the error and
//!   exits 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["echo", addr] => echo(addr),
        ["exchange", addr, bytes] => exchange(addr, bytes),
        _ => Err("usage: mw-testkit echo <ip:port> | mw-testkit exchange <ip:port> <bytes>".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            println!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse_addr(addr: &str) -> Result<SocketAddr, String> {
    addr.parse().map_err(|e| format!("bad address {addr:?}: {e}"))
}

fn echo(addr: &str) -> Result<(), String> {
    let addr = parse_addr(addr)?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening {}", listener.local_addr().map_err(|e| e.to_string())?);
    let _ = std::io::stdout().flush();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if stream.write_all(format!("{peer}\n").as_bytes()).is_err() {
                return;
            }
            let Ok(mut reader) = stream.try_clone() else { return };
            let _ = std::io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
    Ok(())
}

fn exchange(addr: &str, bytes: &str) -> Result<(), String> {
    let addr = parse_addr(addr)?;
    let len: usize = bytes.parse().map_err(|e| format!("bad byte count {bytes:?}: {e}"))?;
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut peer = String::new();
    reader
        .read_line(&mut peer)
        .map_err(|e| format!("reading the server's first line: {e}"))?;
    let payload = meshwire_tests::net::payload(len, 7);
    let mut writer = stream;
    let sent = payload.clone();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&sent)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut received = Vec::with_capacity(len);
    let read = reader.read_to_end(&mut received);
    sender
        .join()
        .map_err(|_| "the sender panicked".to_owned())?
        .map_err(|e| format!("sending: {e}"))?;
    read.map_err(|e| format!("reading the echo: {e}"))?;
    println!(
        "peer={} sent={} received={} intact={}",
        peer.trim(),
        payload.len(),
        received.len(),
        received == payload
    );
    Ok(())
}
