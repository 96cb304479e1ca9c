#![no_main]
//! Datagrams of istio-cni's in-pod protocol (ZDS) as the proxy receives them:
//! `meshwire_control::zds::parse_request` over the bytes, a number of file descriptors (stand-ins:
//! their indices) and the kernel's truncation flags.
//!
//! Input: byte 0 is the descriptor count (modulo 16); byte 1 holds flags: bit 0 the bytes were
//! truncated (`MSG_TRUNC`), bit 1 the descriptors were (`MSG_CTRUNC`), bit 2 the namespace check
//! fails (the descriptor is not a network namespace); the rest is the datagram.
//!
//! Invariants: nothing panics; every refusal prints a message; a truncated datagram or one over 1024
//! bytes is never accepted; an accepted `AddWorkload` had exactly one descriptor (the one returned),
//! a non-empty uid and passed the namespace check; any other accepted message had no descriptor, and
//! `KeepWorkload`/`DelWorkload` a non-empty uid; an accepted message re-encodes to a datagram that
//! parses to the same message.
//!
//! Seeds (`corpus/zds_message/`): encoded real messages (Add with and without `WorkloadInfo`, Keep,
//! Del, SnapshotSent) and edge cases (wrong descriptor counts, truncation, 1024 and 1025 bytes, an
//! unknown field), written by `cargo test -p meshwire-control --test zds -- --ignored
//! write_fuzz_seeds`.

use libfuzzer_sys::fuzz_target;
use meshwire_control::zds::{MAX_MESSAGE_SIZE, PodMessage, Truncation, parse_request};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let [count, flags, bytes @ ..] = data else {
        return;
    };
    let count = usize::from(*count % 16);
    let fds: Vec<u32> = (0..count as u32).collect();
    let truncation = if flags & 1 != 0 {
        Truncation::Data {
            size: bytes.len().max(MAX_MESSAGE_SIZE + 1),
        }
    } else if flags & 2 != 0 {
        Truncation::Control
    } else {
        Truncation::None
    };
    let netns_ok = flags & 4 == 0;
    let mut checked = false;
    let result = parse_request(bytes, fds, truncation, |fd| {
        checked = true;
        assert_eq!(*fd, 0, "the namespace check saw another descriptor than the only one");
        if netns_ok {
            Ok(())
        } else {
            Err("it is uts:[4026531838]".to_string())
        }
    });
    let message = match result {
        Ok(message) => message,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "a refusal without a message: {e:?}");
            return;
        }
    };
    assert_eq!(
        truncation,
        Truncation::None,
        "accepted a truncated datagram: {message:?}"
    );
    assert!(bytes.len() <= MAX_MESSAGE_SIZE, "accepted {} bytes", bytes.len());
    match &message {
        PodMessage::Add { uid, netns, .. } => {
            assert_eq!(count, 1, "an AddWorkload accepted with {count} descriptors");
            assert_eq!(*netns, 0);
            assert!(
                checked && netns_ok,
                "an AddWorkload accepted without a network namespace"
            );
            assert!(!uid.is_empty(), "an AddWorkload accepted with an empty uid");
        }
        PodMessage::Keep { uid } | PodMessage::Del { uid } => {
            assert_eq!(count, 0, "{} accepted with {count} descriptors", message.kind());
            assert!(!uid.is_empty(), "{} accepted with an empty uid", message.kind());
        }
        PodMessage::SnapshotSent => assert_eq!(count, 0, "SnapshotSent accepted with {count} descriptors"),
    }
    // Re-encoded (canonical: unknown fields dropped, repeated fields merged), it parses the same.
    let again = message.to_request().encode_to_vec();
    assert!(
        again.len() <= bytes.len(),
        "re-encoding grew {} bytes to {}",
        bytes.len(),
        again.len()
    );
    let fds: Vec<u32> = (0..count as u32).collect();
    let reparsed = parse_request(&again, fds, Truncation::None, |_| Ok(()));
    assert_eq!(reparsed.as_ref(), Ok(&message), "re-encoded as {again:02x?}");
});
