//! DNS messages at the byte level, with no parsing beyond the header and the question section:
//! what the proxy does to packets it does not understand or must not change (forwarded queries and
//! answers), so that they pass byte for byte.
//!
//! ```
//! use meshwire_dataplane::dns::wire;
//!
//! // A query for `a.example` A IN, id 0x1234.
//! let query = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0,
//!     1, b'a', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0, 0, 1, 0, 1];
//! let failed = wire::error_answer(&query, wire::SERVFAIL).expect("a header");
//! assert_eq!(&failed[..2], &[0x12, 0x34]); // the query's id
//! assert_eq!(failed[3] & 0x0f, wire::SERVFAIL);
//! assert_eq!(&failed[12..], &query[12..]); // and its question
//! ```

/// The length of a DNS header.
pub const HEADER_LEN: usize = 12;
/// The largest DNS message (a TCP message's length is 16 bits).
pub const MAX_MESSAGE: usize = 65_535;
/// The UDP size of a client that sends no EDNS (RFC 1035).
pub const CLASSIC_UDP: usize = 512;
/// `FORMERR`: the query could not be read.
pub const FORMERR: u8 = 1;
/// `SERVFAIL`: no upstream answered.
pub const SERVFAIL: u8 = 2;

/// The message's id, if it has a header.
pub fn id(packet: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*packet.first()?, *packet.get(1)?]))
}

/// Whether the message is a response (`QR` set); `None` without a header.
pub fn is_response(packet: &[u8]) -> Option<bool> {
    (packet.len() >= HEADER_LEN).then(|| packet[2] & 0x80 != 0)
}

/// Whether the message is truncated (`TC` set); `false` without a header.
pub fn is_truncated(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN && packet[2] & 0x02 != 0
}

/// The offset just past the question section, if the header and every question are whole. Names
/// may end in a compression pointer (two bytes); labels are not checked beyond their lengths.
pub fn question_end(packet: &[u8]) -> Option<usize> {
    if packet.len() < HEADER_LEN {
        return None;
    }
    let count = u16::from_be_bytes([packet[4], packet[5]]);
    let mut at = HEADER_LEN;
    for _ in 0..count {
        loop {
            let len = *packet.get(at)?;
            match len & 0xc0 {
                0x00 if len == 0 => {
                    at += 1;
                    break;
                }
                0x00 => at += 1 + usize::from(len),
                0xc0 => {
                    packet.get(at + 1)?;
                    at += 2;
                    break;
                }
                // The extended label types (0x40, 0x80) are obsolete.
                _ => return None,
            }
        }
        at += 4;
        if at > packet.len() {
            return None;
        }
    }
    Some(at)
}

/// Whether the name of the first question of `packet` holds a compression pointer. In a query's
/// first question a pointer can only point into the header or back into the name itself: a client
/// never writes one, and an answer would not repeat its question byte for byte.
pub fn first_question_compressed(packet: &[u8]) -> bool {
    let mut at = HEADER_LEN;
    while let Some(&len) = packet.get(at) {
        match len & 0xc0 {
            0x00 if len == 0 => return false,
            0x00 => at += 1 + usize::from(len),
            _ => return true,
        }
    }
    false
}

/// `answer` cut to at most `limit` bytes (at least [`HEADER_LEN`]), unchanged if it fits. A cut
/// answer keeps its header and question, drops every record and has `TC` set, so that the client
/// asks again over TCP (RFC 2181 9: a partial set of records is never given).
pub fn truncate(mut answer: Vec<u8>, limit: usize) -> Vec<u8> {
    if answer.len() <= limit || answer.len() < HEADER_LEN {
        return answer;
    }
    let limit = limit.max(HEADER_LEN);
    match question_end(&answer).filter(|end| *end <= limit) {
        Some(end) => answer.truncate(end),
        None => {
            answer.truncate(HEADER_LEN);
            answer[4..6].fill(0);
        }
    }
    answer[2] |= 0x02;
    answer[6..12].fill(0);
    answer
}

/// An answer to `query` with the response code `rcode` and no records: the query's id, opcode,
/// `RD` and question (when the question section can be read; none otherwise). `None` when the
/// query has no header.
pub fn error_answer(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if query.len() < HEADER_LEN {
        return None;
    }
    let end = question_end(query);
    let mut answer = query[..end.unwrap_or(HEADER_LEN)].to_vec();
    // QR, the opcode and RD kept; AA, TC cleared.
    answer[2] = 0x80 | (query[2] & 0x79);
    // RA; Z, AD, CD cleared; the code.
    answer[3] = 0x80 | (rcode & 0x0f);
    if end.is_none() {
        answer[4..6].fill(0);
    }
    answer[6..12].fill(0);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUERY: [u8; 27] = [
        0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0, 0, 1,
        0, 1,
    ];

    #[test]
    fn the_question_section_is_walked() {
        assert_eq!(question_end(&QUERY), Some(27));
        assert_eq!(question_end(&QUERY[..26]), None);
        assert_eq!(question_end(&QUERY[..11]), None);
        // A compression pointer ends a name.
        let mut pointer = QUERY[..12].to_vec();
        pointer.extend([0xc0, 0x0c, 0, 1, 0, 1]);
        assert_eq!(question_end(&pointer), Some(18));
    }

    #[test]
    fn a_long_answer_is_cut_to_its_question_with_tc() {
        let mut answer = QUERY.to_vec();
        answer[2] |= 0x80;
        answer[7] = 1; // one answer record
        answer.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
        assert_eq!(truncate(answer.clone(), 512), answer);
        let cut = truncate(answer.clone(), 30);
        assert_eq!(cut.len(), 27);
        assert!(is_truncated(&cut));
        assert_eq!(&cut[6..12], &[0; 6]);
        // Not even the question fits: the header alone.
        let cut = truncate(answer, 20);
        assert_eq!(cut.len(), HEADER_LEN);
        assert_eq!(&cut[4..12], &[0; 8]);
        assert!(is_truncated(&cut));
    }

    #[test]
    fn error_answers_keep_id_opcode_and_question() {
        let failed = error_answer(&QUERY, SERVFAIL).unwrap_or_default();
        assert_eq!(failed.len(), QUERY.len());
        assert_eq!(failed[2], 0x81);
        assert_eq!(failed[3], 0x82);
        // An UPDATE (opcode 5) keeps its opcode; an unreadable question is left out.
        let mut update = QUERY[..20].to_vec();
        update[2] = 5 << 3;
        let failed = error_answer(&update, FORMERR).unwrap_or_default();
        assert_eq!(failed.len(), HEADER_LEN);
        assert_eq!(failed[2], 0x80 | 5 << 3);
        assert_eq!(&failed[4..6], &[0, 0]);
        assert_eq!(error_answer(&QUERY[..5], SERVFAIL), None);
    }
}
