//! The SOCKS5 handshake over real loopback TCP sockets and over `tokio::io::duplex` (which fragments
//! writes), plus property tests of the incremental parser.

#![allow(clippy::unwrap_used, missing_docs)]

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use meshwire_dataplane::socks5::{self, DomainError, Handshake, Phase, Progress, Reply, Request, Socks5Error, Target};
use meshwire_tests::fixtures::socks5_request;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A connected pair of loopback TCP sockets: (client, proxy side).
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

/// Fails the test instead of hanging when a future does not finish.
async fn bounded<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("the handshake hung")
}

const GREETING: [u8; 3] = [5, 1, 0];
const METHOD_SELECTED: [u8; 2] = [5, 0];

/// The failure reply with REP `code` and BND 0.0.0.0:0.
fn failure(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

fn domain(name: &str, port: u16) -> Target {
    Target::Domain {
        name: name.to_owned(),
        port,
    }
}

/// Sends the greeting and the request as a client over TCP, and returns what `accept` made of it and the
/// bytes the client received (until the proxy side closed).
async fn exchange_tcp(client_bytes: &[u8]) -> (Result<Request, Socks5Error>, Vec<u8>) {
    let (mut client, mut proxy) = tcp_pair().await;
    client.write_all(client_bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let result = bounded(socks5::accept(&mut proxy)).await;
    drop(proxy);
    let mut received = Vec::new();
    match bounded(client.read_to_end(&mut received)).await {
        Ok(_) => {}
        // The proxy closed with bytes of the client unread (it stops reading at the first bad byte): the
        // kernel resets the connection. Whatever was received before is in `received`.
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(error) => panic!("reading what the proxy sent: {error}"),
    }
    (result, received)
}

async fn connect_over_tcp(target: Target) {
    let (mut client, mut proxy) = tcp_pair().await;
    client.write_all(&GREETING).await.unwrap();
    let mut selected = [0; 2];
    let proxy_side = async {
        let request = socks5::accept(&mut proxy).await.unwrap();
        socks5::reply(
            &mut proxy,
            Reply::Succeeded {
                bound: "127.0.0.1:4242".parse().unwrap(),
            },
        )
        .await
        .unwrap();
        request
    };
    let client_side = async {
        // The client waits for the method selection before sending its request, as real clients do.
        client.read_exact(&mut selected).await.unwrap();
        client.write_all(&socks5_request(1, &target)).await.unwrap();
        let mut reply = [0; 10];
        client.read_exact(&mut reply).await.unwrap();
        reply
    };
    let (request, reply) = bounded(async { tokio::join!(proxy_side, client_side) }).await;
    assert_eq!(selected, METHOD_SELECTED);
    assert_eq!(request.target, target);
    assert_eq!(reply, [5, 0, 0, 1, 127, 0, 0, 1, 0x10, 0x92]);
}

#[tokio::test]
async fn connect_ipv4() {
    connect_over_tcp(Target::Addr("10.1.2.3:8080".parse().unwrap())).await;
}

#[tokio::test]
async fn connect_ipv6() {
    connect_over_tcp(Target::Addr("[2001:db8::7]:443".parse().unwrap())).await;
}

#[tokio::test]
async fn connect_domain() {
    connect_over_tcp(domain("reviews.bookinfo.svc.cluster.local", 9080)).await;
}

#[tokio::test]
async fn connect_domain_with_trailing_dot_and_mixed_case() {
    connect_over_tcp(domain("Reviews.Bookinfo.svc.cluster.local.", 9080)).await;
}

#[tokio::test]
async fn ip_literal_in_domain_field_becomes_an_address() {
    let cases = [
        ("10.0.0.7", "10.0.0.7:80"),
        ("::1", "[::1]:80"),
        ("2001:db8::1", "[2001:db8::1]:80"),
    ];
    for (name, expected) in cases {
        let mut bytes = GREETING.to_vec();
        bytes.extend(socks5_request(1, &domain(name, 80)));
        let (result, received) = exchange_tcp(&bytes).await;
        assert_eq!(
            result.unwrap().target,
            Target::Addr(expected.parse().unwrap()),
            "{name}"
        );
        assert_eq!(received, METHOD_SELECTED);
    }
}

#[tokio::test]
async fn greeting_with_several_methods_including_no_auth() {
    let mut bytes = vec![5, 4, 0x02, 0x01, 0x80, 0x00];
    bytes.extend(socks5_request(1, &Target::Addr("1.2.3.4:5".parse().unwrap())));
    let (result, received) = exchange_tcp(&bytes).await;
    assert_eq!(result.unwrap().target, Target::Addr("1.2.3.4:5".parse().unwrap()));
    assert_eq!(received, METHOD_SELECTED);
}

#[tokio::test]
async fn greeting_without_no_auth_gets_0xff() {
    let (result, received) = exchange_tcp(&[5, 2, 0x02, 0x01]).await;
    assert_eq!(received, [5, 0xFF]);
    let error = result.unwrap_err();
    assert!(
        matches!(&error, Socks5Error::NoAcceptableMethod { offered } if offered == &[2, 1]),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "no acceptable authentication method: the client offered [0x02, 0x01], \
         the proxy accepts only 0x00 (no authentication)"
    );
}

#[tokio::test]
async fn greeting_with_no_methods_gets_0xff() {
    let (result, received) = exchange_tcp(&[5, 0]).await;
    assert_eq!(received, [5, 0xFF]);
    assert!(matches!(result, Err(Socks5Error::NoAcceptableMethod { offered }) if offered.is_empty()));
}

#[tokio::test]
async fn socks4_greeting_fails_without_reply() {
    // A SOCKS4 CONNECT to 1.2.3.4:80 with an empty user id.
    let (result, received) = exchange_tcp(&[4, 1, 0, 80, 1, 2, 3, 4, 0]).await;
    assert!(received.is_empty(), "sent {received:?}");
    let error = result.unwrap_err();
    assert!(matches!(
        error,
        Socks5Error::UnsupportedVersion {
            phase: Phase::Greeting,
            version: 4
        }
    ));
    assert!(
        error.to_string().starts_with("SOCKS version 4 is not supported"),
        "{error}"
    );
}

#[tokio::test]
async fn http_client_fails_without_reply() {
    let (result, received) = exchange_tcp(b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(received.is_empty());
    assert!(matches!(
        result,
        Err(Socks5Error::UnsupportedVersion { version: b'G', .. })
    ));
}

#[tokio::test]
async fn wrong_version_in_request_fails_without_reply() {
    let mut bytes = GREETING.to_vec();
    bytes.extend([4, 1, 0, 1, 1, 2, 3, 4, 0, 80]);
    let (result, received) = exchange_tcp(&bytes).await;
    assert_eq!(received, METHOD_SELECTED);
    assert!(matches!(
        result,
        Err(Socks5Error::UnsupportedVersion {
            phase: Phase::Request,
            version: 4
        })
    ));
}

#[tokio::test]
async fn bind_gets_command_not_supported() {
    let mut bytes = GREETING.to_vec();
    bytes.extend(socks5_request(2, &Target::Addr("1.2.3.4:80".parse().unwrap())));
    let (result, received) = exchange_tcp(&bytes).await;
    assert_eq!(received, [&METHOD_SELECTED[..], &failure(0x07)].concat());
    let error = result.unwrap_err();
    assert!(matches!(error, Socks5Error::UnsupportedCommand { command: 2 }));
    assert_eq!(
        error.to_string(),
        "request command 2 (BIND) is not supported, only 1 (CONNECT) is"
    );
}

#[tokio::test]
async fn udp_associate_gets_command_not_supported() {
    for target in [Target::Addr("[::]:0".parse().unwrap()), domain("example.com", 53)] {
        let mut bytes = GREETING.to_vec();
        bytes.extend(socks5_request(3, &target));
        let (result, received) = exchange_tcp(&bytes).await;
        assert_eq!(received, [&METHOD_SELECTED[..], &failure(0x07)].concat());
        let error = result.unwrap_err();
        assert!(matches!(error, Socks5Error::UnsupportedCommand { command: 3 }));
        assert!(
            error
                .to_string()
                .contains("request command 3 (UDP ASSOCIATE) is not supported")
        );
    }
}

#[tokio::test]
async fn unsupported_command_reads_the_whole_request_first() {
    // The 0x07 reply comes after the whole request is read: nothing of the request is left in the stream.
    let (mut client, mut proxy) = tokio::io::duplex(64);
    let mut bytes = GREETING.to_vec();
    bytes.extend(socks5_request(2, &domain("example.com", 80)));
    bytes.extend(b"after");
    client.write_all(&bytes).await.unwrap();
    let error = bounded(socks5::accept(&mut proxy)).await.unwrap_err();
    assert!(matches!(error, Socks5Error::UnsupportedCommand { command: 2 }));
    let mut rest = [0; 5];
    proxy.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"after");
}

#[tokio::test]
async fn unknown_address_type_gets_address_type_not_supported() {
    let mut bytes = GREETING.to_vec();
    bytes.extend([5, 1, 0, 5]);
    let (result, received) = exchange_tcp(&bytes).await;
    assert_eq!(received, [&METHOD_SELECTED[..], &failure(0x08)].concat());
    let error = result.unwrap_err();
    assert!(matches!(error, Socks5Error::UnsupportedAddressType { atyp: 5 }));
    assert!(error.to_string().contains("address type 5 is not supported"));
}

/// RSV must be 0 (RFC 1928 section 4): a request with another value gets 0x01 and is not served, for
/// every address type, after the whole request was read.
#[tokio::test]
async fn non_zero_reserved_byte_gets_general_failure() {
    for target in [
        Target::Addr("1.2.3.4:80".parse().unwrap()),
        Target::Addr("[2001:db8::1]:443".parse().unwrap()),
        domain("example.com", 80),
    ] {
        for reserved in [1, 0x80, 0xff] {
            let mut request = socks5_request(1, &target);
            request[2] = reserved;
            let bytes = [&GREETING[..], &request].concat();
            let (result, received) = exchange_tcp(&bytes).await;
            assert_eq!(
                received,
                [&METHOD_SELECTED[..], &failure(0x01)].concat(),
                "{target} RSV {reserved}"
            );
            let error = result.unwrap_err();
            assert!(
                matches!(error, Socks5Error::NonZeroReserved { reserved: r } if r == reserved),
                "{target}: {error:?}"
            );
            assert!(
                error.to_string().contains("reserved byte (RSV)") && error.to_string().contains("0x00"),
                "{error}"
            );

            // The pure machine says the same, and consumes the whole request.
            let mut handshake = Handshake::new();
            assert!(matches!(
                handshake.feed(&bytes),
                Err(Socks5Error::NonZeroReserved { .. })
            ));
            assert_eq!(handshake.bytes_wanted(), 0);
        }
    }
}

/// Field order: an unsupported command is reported before a non-zero RSV, and a non-zero RSV before
/// an unknown address type.
#[tokio::test]
async fn non_zero_reserved_byte_is_reported_in_field_order() {
    let (result, received) = exchange_tcp(&[5, 1, 0, 5, 2, 1, 1, 1, 2, 3, 4, 0, 80]).await;
    assert_eq!(received, [&METHOD_SELECTED[..], &failure(0x07)].concat());
    assert!(matches!(result, Err(Socks5Error::UnsupportedCommand { command: 2 })));
    let (result, received) = exchange_tcp(&[5, 1, 0, 5, 1, 1, 9]).await;
    assert_eq!(received, [&METHOD_SELECTED[..], &failure(0x01)].concat());
    assert!(matches!(result, Err(Socks5Error::NonZeroReserved { reserved: 1 })));
}

#[tokio::test]
async fn unknown_address_type_with_unsupported_command_gets_command_not_supported() {
    let mut bytes = GREETING.to_vec();
    bytes.extend([5, 2, 0, 9]);
    let (result, received) = exchange_tcp(&bytes).await;
    assert_eq!(received, [&METHOD_SELECTED[..], &failure(0x07)].concat());
    assert!(matches!(result, Err(Socks5Error::UnsupportedCommand { command: 2 })));
}

#[tokio::test]
async fn invalid_domain_names_get_host_unreachable() {
    let long_label = "a".repeat(64);
    let long_name = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62)].join(".");
    assert_eq!(long_name.len(), 254);
    let cases: [(&[u8], DomainError); 12] = [
        (b"", DomainError::Empty),
        (b".", DomainError::Empty),
        (b"a..b", DomainError::EmptyLabel),
        (b".example.com", DomainError::EmptyLabel),
        (b"example.com..", DomainError::EmptyLabel),
        (long_label.as_bytes(), DomainError::LabelTooLong { len: 64 }),
        (long_name.as_bytes(), DomainError::TooLong { len: 254 }),
        (b"_http._tcp.example.com", DomainError::InvalidCharacter { byte: b'_' }),
        (b"exa mple.com", DomainError::InvalidCharacter { byte: b' ' }),
        (b"caf\xc3\xa9.example", DomainError::InvalidCharacter { byte: 0xc3 }),
        (b"-bad.example", DomainError::HyphenAtLabelEdge),
        (b"127.1", DomainError::EndsInNumber),
    ];
    for (name, reason) in cases {
        let mut bytes = GREETING.to_vec();
        bytes.extend([5, 1, 0, 3, u8::try_from(name.len()).unwrap()]);
        bytes.extend(name);
        bytes.extend([0, 80]);
        let (result, received) = exchange_tcp(&bytes).await;
        assert_eq!(received, [&METHOD_SELECTED[..], &failure(0x04)].concat(), "{name:?}");
        match result {
            Err(Socks5Error::InvalidDomain { reason: got, .. }) => assert_eq!(got, reason, "{name:?}"),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    for (name, reason) in [
        ("0x7f.0x1", DomainError::EndsInNumber),
        ("bad-.example", DomainError::HyphenAtLabelEdge),
    ] {
        let mut handshake = Handshake::new();
        let mut bytes = GREETING.to_vec();
        bytes.extend(socks5_request(1, &domain(name, 80)));
        let error = handshake.feed(&bytes).unwrap_err();
        assert!(
            matches!(error, Socks5Error::InvalidDomain { reason: got, .. } if got == reason),
            "{name}"
        );
    }
}

#[tokio::test]
async fn invalid_domain_error_names_the_domain() {
    let mut bytes = GREETING.to_vec();
    bytes.extend(socks5_request(1, &domain("bad_name.example", 80)));
    let (result, _) = exchange_tcp(&bytes).await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "invalid domain name \"bad_name.example\" in the request: byte 0x5f is not a letter, digit, hyphen or dot"
    );
}

#[tokio::test]
async fn longest_valid_domain_is_accepted() {
    let name = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
    assert_eq!(name.len(), 253);
    for name in [name.clone(), format!("{name}.")] {
        let mut bytes = GREETING.to_vec();
        bytes.extend(socks5_request(1, &domain(&name, 443)));
        let (result, _) = exchange_tcp(&bytes).await;
        assert_eq!(result.unwrap().target, domain(&name, 443));
    }
}

#[tokio::test]
async fn peer_closing_mid_greeting_is_unexpected_eof() {
    for (bytes, received, missing) in [(&[][..], 0, 2), (&[5][..], 1, 1), (&[5, 3, 0][..], 3, 2)] {
        let (result, sent) = exchange_tcp(bytes).await;
        assert!(sent.is_empty());
        let error = result.unwrap_err();
        assert!(
            matches!(error, Socks5Error::UnexpectedEof { phase: Phase::Greeting, received: r, missing: m }
                if r == received && m == missing),
            "{bytes:?}: {error:?}"
        );
    }
}

#[tokio::test]
async fn peer_closing_mid_request_is_unexpected_eof() {
    let full = socks5_request(1, &domain("example.com", 80));
    for cut in 0..full.len() {
        let mut bytes = GREETING.to_vec();
        bytes.extend(&full[..cut]);
        let (result, sent) = exchange_tcp(&bytes).await;
        assert_eq!(sent, METHOD_SELECTED);
        let error = result.unwrap_err();
        assert!(
            matches!(error, Socks5Error::UnexpectedEof { phase: Phase::Request, received, missing }
                if received == cut && missing >= 1 && received + missing <= full.len()),
            "cut at {cut}: {error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("the client closed the connection during the SOCKS5 request")
        );
    }
}

#[tokio::test]
async fn peer_dropping_the_socket_mid_request_does_not_hang() {
    let (mut client, mut proxy) = tcp_pair().await;
    client.write_all(&[5, 1, 0, 5, 1, 0, 4, 0x20, 0x01]).await.unwrap();
    let proxy_side = socks5::accept(&mut proxy);
    let client_side = async {
        let mut selected = [0; 2];
        client.read_exact(&mut selected).await.unwrap();
        drop(client);
    };
    let (result, ()) = bounded(async { tokio::join!(proxy_side, client_side) }).await;
    assert!(matches!(
        result,
        Err(Socks5Error::UnexpectedEof {
            phase: Phase::Request,
            received: 6,
            missing: 16
        })
    ));
}

/// Runs `accept` against a client writing `bytes` through a duplex pipe of capacity `capacity` (each
/// write of the client is cut into pieces of at most that size), one write per `chunk` bytes, then
/// closing. Returns the request and everything the proxy side could read after it.
async fn accept_fragmented(bytes: &[u8], capacity: usize, chunk: usize) -> (Request, Vec<u8>) {
    let (client, mut proxy) = tokio::io::duplex(capacity);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let proxy_side = async {
        let request = socks5::accept(&mut proxy).await.unwrap();
        let mut rest = Vec::new();
        proxy.read_to_end(&mut rest).await.unwrap();
        (request, rest)
    };
    let writer = async {
        for piece in bytes.chunks(chunk) {
            client_write.write_all(piece).await.unwrap();
            client_write.flush().await.unwrap();
        }
        client_write.shutdown().await.unwrap();
    };
    let reader = async {
        let mut selected = [0; 2];
        client_read.read_exact(&mut selected).await.unwrap();
        assert_eq!(selected, METHOD_SELECTED);
    };
    let ((request, rest), (), ()) = bounded(async { tokio::join!(proxy_side, writer, reader) }).await;
    (request, rest)
}

#[tokio::test]
async fn request_split_byte_by_byte_still_parses() {
    let targets = [
        Target::Addr("192.0.2.1:1".parse().unwrap()),
        Target::Addr("[fe80::1:2:3:4]:65535".parse().unwrap()),
        domain("a-b.c-d.example.org", 8443),
    ];
    for target in targets {
        let mut bytes = vec![5, 3, 0x01, 0x00, 0x02];
        bytes.extend(socks5_request(1, &target));
        // One-byte writes through a one-byte pipe: every read of the proxy gets a single byte.
        let (request, _) = accept_fragmented(&bytes, 1, 1).await;
        assert_eq!(request.target, target);
        // Larger, uneven pieces.
        let (request, _) = accept_fragmented(&bytes, 3, 5).await;
        assert_eq!(request.target, target);
    }
}

#[tokio::test]
async fn request_split_over_tcp_writes_still_parses() {
    let (mut client, mut proxy) = tcp_pair().await;
    client.set_nodelay(true).unwrap();
    let target = domain("example.com", 80);
    let mut bytes = GREETING.to_vec();
    bytes.extend(socks5_request(1, &target));
    let client_side = async {
        for byte in &bytes {
            client.write_all(std::slice::from_ref(byte)).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut selected = [0; 2];
        client.read_exact(&mut selected).await.unwrap();
        selected
    };
    let (request, selected) = bounded(async { tokio::join!(socks5::accept(&mut proxy), client_side) }).await;
    assert_eq!(request.unwrap().target, target);
    assert_eq!(selected, METHOD_SELECTED);
}

#[tokio::test]
async fn pipelined_payload_is_not_lost_over_tcp() {
    let (mut client, mut proxy) = tcp_pair().await;
    let payload: Vec<u8> = (0..=255).cycle().take(4000).collect();
    for target in [Target::Addr("10.0.0.1:80".parse().unwrap()), domain("example.com", 80)] {
        let mut bytes = GREETING.to_vec();
        bytes.extend(socks5_request(1, &target));
        bytes.extend(&payload);
        // Greeting, request and payload in one write, before the proxy reads anything.
        client.write_all(&bytes).await.unwrap();
        let request = bounded(socks5::accept(&mut proxy)).await.unwrap();
        assert_eq!(request.target, target);
        socks5::reply(
            &mut proxy,
            Reply::Succeeded {
                bound: "0.0.0.0:0".parse().unwrap(),
            },
        )
        .await
        .unwrap();
        let mut forwarded = vec![0; payload.len()];
        bounded(proxy.read_exact(&mut forwarded)).await.unwrap();
        assert_eq!(forwarded, payload);
        let mut answers = [0; 12];
        client.read_exact(&mut answers).await.unwrap();
        assert_eq!(answers, [5, 0, 5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    }
}

#[tokio::test]
async fn pipelined_payload_is_not_lost_over_fragmenting_pipe() {
    let mut bytes = GREETING.to_vec();
    bytes.extend(socks5_request(1, &Target::Addr("[::1]:80".parse().unwrap())));
    bytes.extend(b"hello, upstream");
    let (request, rest) = accept_fragmented(&bytes, 4, 7).await;
    assert_eq!(request.target, Target::Addr("[::1]:80".parse().unwrap()));
    assert_eq!(rest, b"hello, upstream");
}

#[tokio::test]
async fn replies_have_the_rfc_bytes() {
    let cases: [(Reply, &[u8]); 10] = [
        (
            Reply::Succeeded {
                bound: "192.0.2.9:8080".parse().unwrap(),
            },
            &[5, 0, 0, 1, 192, 0, 2, 9, 0x1f, 0x90],
        ),
        (
            Reply::Succeeded {
                bound: "[2001:db8::1]:443".parse().unwrap(),
            },
            &[
                5, 0, 0, 4, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x01, 0xbb,
            ],
        ),
        (Reply::GeneralFailure, &failure(1)),
        (Reply::NotAllowed, &failure(2)),
        (Reply::NetworkUnreachable, &failure(3)),
        (Reply::HostUnreachable, &failure(4)),
        (Reply::ConnectionRefused, &failure(5)),
        (Reply::TtlExpired, &failure(6)),
        (Reply::CommandNotSupported, &failure(7)),
        (Reply::AddressTypeNotSupported, &failure(8)),
    ];
    for (outcome, expected) in cases {
        assert_eq!(outcome.encode().as_bytes(), expected, "{outcome}");
        assert_eq!(outcome.code(), expected[1]);
        let (mut client, mut proxy) = tcp_pair().await;
        socks5::reply(&mut proxy, outcome).await.unwrap();
        drop(proxy);
        let mut received = Vec::new();
        bounded(client.read_to_end(&mut received)).await.unwrap();
        assert_eq!(received, expected, "{outcome}");
    }
}

#[test]
fn connect_errors_map_to_reply_codes() {
    use std::io::{Error, ErrorKind};
    let cases = [
        (ErrorKind::ConnectionRefused, Reply::ConnectionRefused),
        (ErrorKind::HostUnreachable, Reply::HostUnreachable),
        (ErrorKind::TimedOut, Reply::HostUnreachable),
        (ErrorKind::NetworkUnreachable, Reply::NetworkUnreachable),
        (ErrorKind::PermissionDenied, Reply::GeneralFailure),
        (ErrorKind::Other, Reply::GeneralFailure),
    ];
    for (kind, reply) in cases {
        assert_eq!(Reply::for_connect_error(&Error::from(kind)), reply, "{kind:?}");
    }
}

#[test]
fn handshake_consumes_only_the_handshake() {
    let mut handshake = Handshake::new();
    assert_eq!(handshake.bytes_wanted(), 2);
    let mut bytes = vec![5, 2, 1, 0];
    bytes.extend(socks5_request(1, &Target::Addr("[::1]:9".parse().unwrap())));
    let handshake_len = bytes.len();
    bytes.extend(b"payload");
    let feed = handshake.feed(&bytes).unwrap();
    assert_eq!(feed.consumed, handshake_len);
    assert_eq!(feed.progress, Progress::Complete(handshake.end_of_input().unwrap()));
    assert_eq!(handshake.pending_output(), METHOD_SELECTED);
    handshake.consume_output(1);
    assert_eq!(handshake.pending_output(), [0]);
    handshake.consume_output(5);
    assert!(handshake.pending_output().is_empty());
    // Once complete, nothing more is consumed.
    let again = handshake.feed(b"more").unwrap();
    assert_eq!(again.consumed, 0);
    assert_eq!(handshake.bytes_wanted(), 0);
}

#[test]
fn handshake_reports_exact_wants() {
    let mut handshake = Handshake::new();
    let steps: [(&[u8], usize); 6] = [
        (&[5], 1),
        (&[3], 3),
        (&[0, 1, 2], 4),
        (&[5, 1, 0, 3], 1),
        (&[11], 13),
        (b"example.com", 2),
    ];
    for (bytes, wanted_after) in steps {
        let feed = handshake.feed(bytes).unwrap();
        assert_eq!(feed.consumed, bytes.len());
        assert_eq!(feed.progress, Progress::NeedMore(wanted_after));
        assert_eq!(handshake.bytes_wanted(), wanted_after);
    }
    let feed = handshake.feed(&[0, 80]).unwrap();
    assert_eq!(feed.progress, Progress::Complete(handshake.end_of_input().unwrap()));
}

#[test]
fn failed_handshake_keeps_failing() {
    let mut handshake = Handshake::new();
    let first = handshake.feed(&[5, 1, 2]).unwrap_err();
    assert_eq!(handshake.pending_output(), [5, 0xFF]);
    let second = handshake.feed(&[5, 1, 0]).unwrap_err();
    assert_eq!(first.to_string(), second.to_string());
    assert_eq!(handshake.end_of_input().unwrap_err().to_string(), first.to_string());
    assert_eq!(handshake.bytes_wanted(), 0);
}

// Property tests.

fn host_name() -> impl Strategy<Value = String> {
    let label = "[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?";
    (prop::collection::vec(label, 1..5), any::<bool>())
        .prop_map(|(labels, dot)| labels.join(".") + if dot { "." } else { "" })
        .prop_filter("at most 253 characters", |name| name.trim_end_matches('.').len() <= 253)
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (any::<Ipv4Addr>(), any::<u16>()).prop_map(|(ip, port)| Target::Addr(SocketAddr::new(ip.into(), port))),
        (any::<Ipv6Addr>(), any::<u16>()).prop_map(|(ip, port)| Target::Addr(SocketAddr::new(ip.into(), port))),
        (host_name(), any::<u16>()).prop_map(|(name, port)| Target::Domain { name, port }),
    ]
}

/// A greeting offering 0x00 among other methods, in any order.
fn greeting() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(1u8..=255, 0..20), any::<prop::sample::Index>()).prop_map(|(mut methods, at)| {
        methods.insert(at.index(methods.len() + 1), 0);
        let mut greeting = vec![5, u8::try_from(methods.len()).unwrap()];
        greeting.extend(methods);
        greeting
    })
}

/// Feeds `bytes` cut at `cuts` (indices into `bytes`, any order, possibly out of range); returns the
/// outcome, the total consumed and the output queued, checking the invariants of every call.
fn feed_in_pieces(bytes: &[u8], cuts: &[usize]) -> (Result<Progress, String>, usize, Vec<u8>) {
    let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let mut handshake = Handshake::new();
    let mut output = Vec::new();
    let mut consumed = 0;
    let mut start = 0;
    let mut outcome = Ok(Progress::NeedMore(handshake.bytes_wanted()));
    for end in cuts {
        let piece = &bytes[start..end];
        start = end;
        let wanted = handshake.bytes_wanted();
        outcome = match handshake.feed(piece) {
            Ok(feed) => {
                assert!(feed.consumed <= piece.len());
                if let Progress::NeedMore(n) = feed.progress {
                    assert!(n >= 1);
                    assert_eq!(
                        feed.consumed,
                        piece.len(),
                        "an incomplete handshake consumes everything"
                    );
                    assert_eq!(n, handshake.bytes_wanted());
                }
                if !piece.is_empty() {
                    assert!(
                        feed.consumed >= 1,
                        "a handshake that wants {wanted} bytes takes at least one"
                    );
                }
                consumed += feed.consumed;
                Ok(feed.progress)
            }
            Err(error) => Err(error.to_string()),
        };
        output.extend_from_slice(handshake.pending_output());
        let pending = handshake.pending_output().len();
        handshake.consume_output(pending);
        if outcome.is_err() || matches!(outcome, Ok(Progress::Complete(_))) {
            break;
        }
    }
    (outcome, consumed, output)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (outcome, consumed, output) = feed_in_pieces(&bytes, &cuts);
        prop_assert!(consumed <= bytes.len());
        prop_assert!(output.len() <= 12);
        // Fragmentation changes nothing: one piece gives the same outcome.
        let (whole, _, whole_output) = feed_in_pieces(&bytes, &[]);
        prop_assert_eq!(outcome, whole);
        prop_assert_eq!(output, whole_output);
    }

    #[test]
    fn parser_never_panics_after_a_valid_greeting(
        greeting in greeting(),
        request in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let bytes = [greeting, request].concat();
        let (outcome, _, output) = feed_in_pieces(&bytes, &cuts);
        prop_assert_eq!(&output[..2], &METHOD_SELECTED[..]);
        if let Err(message) = outcome {
            prop_assert!(!message.is_empty());
        }
    }

    #[test]
    fn parser_never_panics_on_mutated_requests(
        greeting in greeting(),
        target in target(),
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut request = socks5_request(1, &target);
        for (at, byte) in mutations {
            *at.get_mut(&mut request) = byte;
        }
        let bytes = [greeting, request].concat();
        let (outcome, consumed, _) = feed_in_pieces(&bytes, &cuts);
        prop_assert!(consumed <= bytes.len());
        let (whole, _, _) = feed_in_pieces(&bytes, &[]);
        prop_assert_eq!(outcome, whole);
    }

    #[test]
    fn every_valid_request_round_trips(
        greeting in greeting(),
        target in target(),
        trailing in prop::collection::vec(any::<u8>(), 0..32),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let handshake_len = greeting.len() + socks5_request(1, &target).len();
        let bytes = [greeting, socks5_request(1, &target), trailing].concat();
        let (outcome, consumed, output) = feed_in_pieces(&bytes, &cuts);
        match outcome {
            Ok(Progress::Complete(request)) => prop_assert_eq!(request.target, target),
            other => prop_assert!(false, "{:?}", other),
        }
        prop_assert_eq!(consumed, handshake_len);
        prop_assert_eq!(output, METHOD_SELECTED.to_vec());
    }

    #[test]
    fn a_request_with_a_non_zero_reserved_byte_is_never_served(
        greeting in greeting(),
        target in target(),
        reserved in 1u8..=255,
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut request = socks5_request(1, &target);
        request[2] = reserved;
        let bytes = [greeting, request].concat();
        let (outcome, _, output) = feed_in_pieces(&bytes, &cuts);
        prop_assert!(outcome.is_err(), "{:?}", outcome);
        prop_assert_eq!(output, [&METHOD_SELECTED[..], &failure(0x01)].concat());
    }
}
