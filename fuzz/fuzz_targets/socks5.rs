#![no_main]
//! The SOCKS5 handshake of the outbound listener: the pure state machine (`Handshake`) and the
//! stream driver (`accept`, then `reply`) fed the same arbitrary client bytes.
//!
//! The first input byte picks up to 8 cut points (its bits, as positions modulo the length, mixed with
//! the second byte); the rest is what the client sends, fed to the state machine in those pieces and
//! to `accept` over an in-memory stream the client closes after writing.
//!
//! Invariants: nothing panics; the outcome does not depend on fragmentation; the machine never consumes
//! more than it was given, never queues more than 12 bytes, and an incomplete handshake wants at least
//! one more byte; `accept` agrees with the machine, writes what the machine queued, and leaves every
//! byte after the request unread in the stream (no data the client sent after its request is lost);
//! an accepted request re-encoded parses back to the same target; every reply encodes to a valid
//! SOCKS5 reply of its code.
//!
//! Seeds (`corpus/socks5/`): the requests curl and the meshwire tests send (IPv4, IPv6, domain names,
//! IP literals as names, a BIND, a greeting without "no authentication", a request whose reserved byte is
//! not 0).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshwire_dataplane::socks5::{Handshake, Progress, Reply, Request, Target, accept, reply};
use meshwire_tests::fixtures;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
});

/// What feeding a whole input gave: the outcome (error as text), bytes consumed, output queued.
type Outcome = (Result<Request, String>, usize, Vec<u8>);

fuzz_target!(|data: &[u8]| {
    let [cut_bits, cut_mix, input @ ..] = data else {
        return;
    };
    let cuts: Vec<usize> = (0..8)
        .filter(|bit| cut_bits & (1 << bit) != 0)
        .map(|bit| usize::from(cut_mix.rotate_left(bit)) * 7 + bit as usize)
        .collect();
    let (outcome, consumed, output) = feed(input, &cuts);
    let whole = feed(input, &[]);
    // Fragmentation changes nothing (the count of consumed bytes means something only on success).
    assert_eq!(
        (&outcome, &output),
        (&whole.0, &whole.2),
        "fragmentation changed the outcome"
    );
    if outcome.is_ok() {
        assert_eq!(consumed, whole.1, "fragmentation changed the length of the handshake");
    }

    let (driven, written, unread) = RUNTIME.block_on(drive(input));
    match (&outcome, &driven) {
        (Ok(expected), Ok(request)) => {
            assert_eq!(expected, request);
            assert_eq!(
                unread,
                &input[consumed..],
                "bytes after the request were lost or reordered"
            );
            check_request(request, &input[..consumed]);
        }
        (Err(_), Err(_)) => {}
        // The machine needs more than the input holds: `accept` sees the end of the stream.
        (Err(_), Ok(_)) | (Ok(_), Err(_)) => panic!("machine {outcome:?} but accept {driven:?}"),
    }
    assert_eq!(
        written, output,
        "accept wrote something other than what the handshake queued"
    );
});

/// Feeds `input` to a handshake in pieces cut at `cuts`, then reports the end of input.
fn feed(input: &[u8], cuts: &[usize]) -> Outcome {
    let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort_unstable();
    let mut handshake = Handshake::new();
    let (mut consumed, mut start, mut output) = (0, 0, Vec::new());
    let mut done = None;
    for end in cuts {
        let piece = &input[start..end];
        start = end;
        match handshake.feed(piece) {
            Ok(fed) => {
                assert!(fed.consumed <= piece.len());
                consumed += fed.consumed;
                match fed.progress {
                    Progress::NeedMore(wanted) => {
                        assert!(wanted >= 1);
                        assert_eq!(fed.consumed, piece.len(), "an incomplete handshake consumes everything");
                        assert_eq!(wanted, handshake.bytes_wanted());
                    }
                    Progress::Complete(request) => done = Some(Ok(request)),
                }
            }
            Err(error) => done = Some(Err(error.to_string())),
        }
        let pending = handshake.pending_output();
        assert!(pending.len() <= 12);
        output.extend_from_slice(pending);
        let n = pending.len();
        handshake.consume_output(n);
        if done.is_some() {
            break;
        }
    }
    let outcome = match done {
        Some(outcome) => outcome,
        None => handshake.end_of_input().map_err(|e| e.to_string()),
    };
    if let Err(message) = &outcome {
        assert!(!message.is_empty());
    }
    output.extend_from_slice(handshake.pending_output());
    (outcome, consumed, output)
}

/// Runs `accept` over an in-memory stream holding `input` (closed after it): its result, what it
/// wrote, and what it left unread.
async fn drive(input: &[u8]) -> (Result<Request, String>, Vec<u8>, Vec<u8>) {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    client
        .write_all(input)
        .await
        .expect("the input fits the in-memory stream");
    client.shutdown().await.expect("closing the client's write side");
    let result = accept(&mut server).await.map_err(|e| e.to_string());
    let mut unread = Vec::new();
    if result.is_ok() {
        server
            .read_to_end(&mut unread)
            .await
            .expect("reading the rest of the stream");
        reply(&mut server, Reply::ConnectionRefused)
            .await
            .expect("writing a reply");
    }
    drop(server);
    let mut written = Vec::new();
    client
        .read_to_end(&mut written)
        .await
        .expect("reading what the server wrote");
    if result.is_ok() {
        let reply_len = Reply::ConnectionRefused.encode().as_bytes().len();
        assert!(written.len() >= reply_len);
        written.truncate(written.len() - reply_len);
    }
    (result, written, unread)
}

/// An accepted request: its target re-encoded after a plain greeting parses back the same.
fn check_request(request: &Request, handshake: &[u8]) {
    assert!(!handshake.is_empty());
    if let Target::Domain { name, .. } = &request.target {
        assert!(!name.is_empty() && name.len() <= 254, "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
            "{name:?}"
        );
        assert!(name.parse::<IpAddr>().is_err(), "an IP literal {name:?} left as a name");
    }
    let mut bytes = vec![5, 1, 0];
    bytes.extend(fixtures::socks5_request(1, &request.target));
    let (again, consumed, _) = feed(&bytes, &[]);
    assert_eq!(again.as_ref(), Ok(request), "re-encoded as {bytes:?}");
    assert_eq!(consumed, bytes.len());
    // Every reply encodes to VER REP RSV ATYP ADDR PORT.
    let bound = match &request.target {
        Target::Addr(addr) => *addr,
        Target::Domain { port, .. } => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), *port),
    };
    for outcome in [
        Reply::Succeeded { bound },
        Reply::GeneralFailure,
        Reply::NotAllowed,
        Reply::HostUnreachable,
        Reply::CommandNotSupported,
    ] {
        let encoded = outcome.encode();
        let bytes = encoded.as_bytes();
        assert_eq!(bytes[0], 5);
        assert_eq!(bytes[1], outcome.code());
        assert_eq!(bytes[2], 0);
        match bytes[3] {
            1 => assert_eq!(bytes.len(), 10),
            4 => assert_eq!(bytes.len(), 22),
            other => panic!("reply address type {other}"),
        }
    }
}
