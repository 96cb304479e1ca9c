//! HTTP/2 below h2, for the tests and fuzz targets that talk to an HBONE server frame by frame:
//! the constants of RFC 9113, frames written and read by hand, the client preface, and HPACK
//! (RFC 7541) through `loona-hpack`: header blocks of literal fields written exactly as given
//! (malformed ones too), and a decoder for the header blocks a server sends.

/// The client connection preface (RFC 9113 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 6).
/// DATA frame type.
pub const DATA: u8 = 0x0;
/// HEADERS frame type.
pub const HEADERS: u8 = 0x1;
/// PRIORITY frame type (not the flag of the same name).
pub const PRIORITY_FRAME: u8 = 0x2;
/// RST_STREAM frame type.
pub const RST_STREAM: u8 = 0x3;
/// SETTINGS frame type.
pub const SETTINGS: u8 = 0x4;
/// PUSH_PROMISE frame type.
pub const PUSH_PROMISE: u8 = 0x5;
/// PING frame type.
pub const PING: u8 = 0x6;
/// GOAWAY frame type.
pub const GOAWAY: u8 = 0x7;
/// WINDOW_UPDATE frame type.
pub const WINDOW_UPDATE: u8 = 0x8;
/// CONTINUATION frame type.
pub const CONTINUATION: u8 = 0x9;

// Flags.
/// END_STREAM flag (DATA, HEADERS).
pub const END_STREAM: u8 = 0x1;
/// ACK flag (SETTINGS, PING).
pub const ACK: u8 = 0x1;
/// END_HEADERS flag (HEADERS, CONTINUATION).
pub const END_HEADERS: u8 = 0x4;
/// PADDED flag (DATA, HEADERS).
pub const PADDED: u8 = 0x8;
/// PRIORITY flag (HEADERS): the fragment starts with 5 bytes of priority.
pub const PRIORITY: u8 = 0x20;

// Error codes (RFC 9113 7).
/// PROTOCOL_ERROR.
pub const PROTOCOL_ERROR: u32 = 0x1;
/// REFUSED_STREAM.
pub const REFUSED_STREAM: u32 = 0x7;
/// CANCEL.
pub const CANCEL: u32 = 0x8;
/// ENHANCE_YOUR_CALM.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The largest error code RFC 9113 defines (HTTP_1_1_REQUIRED).
pub const MAX_ERROR_CODE: u32 = 0xd;

// Settings (RFC 9113 6.5.2).
/// SETTINGS_HEADER_TABLE_SIZE.
pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
/// SETTINGS_ENABLE_PUSH.
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
/// SETTINGS_MAX_CONCURRENT_STREAMS.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// SETTINGS_INITIAL_WINDOW_SIZE.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
/// SETTINGS_MAX_FRAME_SIZE.
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
/// SETTINGS_MAX_HEADER_LIST_SIZE.
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The largest flow-control window, and the mask of a stream id without its reserved bit.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// The initial flow-control window of a stream and of the connection.
pub const DEFAULT_WINDOW: u32 = 65_535;
/// The initial SETTINGS_HEADER_TABLE_SIZE: the dynamic table size of an HPACK decoder whose
/// client did not set one.
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// The largest SETTINGS_MAX_FRAME_SIZE there is.
pub const MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// One frame, its stream id as it is on the wire (reserved bit included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame type.
    pub kind: u8,
    /// The flags.
    pub flags: u8,
    /// The stream id, reserved bit included.
    pub stream: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame of `kind` on `stream`.
    pub fn new(kind: u8, flags: u8, stream: u32, payload: Vec<u8>) -> Self {
        Self {
            kind,
            flags,
            stream,
            payload,
        }
    }

    /// Appends the frame's bytes to `out`; panics on a payload too long for the 24-bit length.
    pub fn write(&self, out: &mut Vec<u8>) {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|len| *len <= MAX_FRAME_SIZE)
            .unwrap_or_else(|| panic!("a frame payload of {} bytes", self.payload.len()));
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[self.kind, self.flags]);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// The first whole frame at the start of `bytes` and how many bytes it takes, or `None` if
    /// `bytes` holds less than one frame.
    pub fn parse(bytes: &[u8]) -> Option<(Frame, usize)> {
        let head = bytes.get(..9)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let payload = bytes.get(9..9 + len)?.to_vec();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        Some((Frame::new(head[3], head[4], stream, payload), 9 + len))
    }

    /// `bytes` as a sequence of whole frames, if it is one.
    pub fn split(mut bytes: &[u8]) -> Option<Vec<Frame>> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (frame, len) = Frame::parse(bytes)?;
            frames.push(frame);
            bytes = &bytes[len..];
        }
        Some(frames)
    }
}

/// The bytes of one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    Frame::new(kind, flags, stream, payload.to_vec()).write(&mut out);
    out
}

/// A SETTINGS payload of `(identifier, value)` pairs.
pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(6 * pairs.len());
    for (id, value) in pairs {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    payload
}

/// The `(identifier, value)` pairs of a SETTINGS payload (a trailing partial pair is ignored).
pub fn settings_pairs(payload: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    payload.chunks_exact(6).map(|pair| {
        (
            u16::from_be_bytes([pair[0], pair[1]]),
            u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]),
        )
    })
}

/// What a client that never makes the server wait sends first: the preface, SETTINGS with push off
/// and the largest stream windows, and a WINDOW_UPDATE that opens the connection window as wide.
pub fn client_hello() -> Vec<u8> {
    let mut hello = PREFACE.to_vec();
    let ours = settings(&[(SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)]);
    hello.extend(frame(SETTINGS, 0, 0, &ours));
    hello.extend(frame(WINDOW_UPDATE, 0, 0, &(MAX_WINDOW - DEFAULT_WINDOW).to_be_bytes()));
    hello
}

/// The payload of a DATA or HEADERS frame without its padding, or `None` if the padding is longer
/// than the frame.
pub fn unpad(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if flags & PADDED == 0 {
        return Some(payload);
    }
    let pad = usize::from(*payload.first()?);
    payload.get(1..payload.len().checked_sub(pad)?)
}

/// The header block fragment of a HEADERS frame: without padding and priority.
pub fn header_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], &'static str> {
    let fragment = unpad(flags, payload).ok_or("bad HEADERS padding")?;
    if flags & PRIORITY == 0 {
        return Ok(fragment);
    }
    fragment.get(5..).ok_or("HEADERS too short for its priority")
}

// ---------------------------------------------------------------------------------------------
// HPACK
// ---------------------------------------------------------------------------------------------

/// A header block of literal fields without indexing, with literal names and no Huffman coding
/// (RFC 7541 6.2.2): each name and value goes on the wire exactly as given, valid or not, and the
/// block leaves both dynamic tables alone.
pub fn encode<N: AsRef<[u8]>, V: AsRef<[u8]>>(fields: &[(N, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        for string in [name.as_ref(), value.as_ref()] {
            // Writing to a Vec cannot fail.
            let _ = loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, &mut out);
            out.extend_from_slice(string);
        }
    }
    out
}

/// An HPACK decoder for the header blocks a server sends, with its dynamic table. Besides what
/// `loona-hpack` rejects (bad indices, integers, Huffman codes and padding, a table size over the
/// allowed one), it rejects a dynamic table size update after a field (RFC 7541 4.2) and names that
/// or values that are not UTF-8.
pub struct Decoder(loona_hpack::Decoder<'static>);

impl Decoder {
    /// The decoder of a client that allowed dynamic tables of up to `allowed` bytes (its largest
    /// SETTINGS_HEADER_TABLE_SIZE); the table starts at the initial 4096 bytes.
    pub fn new(allowed: usize) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(allowed);
        Self(decoder)
    }

    /// Sets the table size as a SETTINGS_HEADER_TABLE_SIZE of `size` would, without a size update
    /// from the encoder.
    pub fn set_table_size(&mut self, size: usize) {
        self.0.set_max_table_size(size);
    }

    /// The fields of one header block, or what is wrong with it.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, String> {
        check_size_updates(block)?;
        let fields = self.0.decode(block).map_err(|e| e.to_string())?;
        fields
            .into_iter()
            .map(|(name, value)| {
                let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|e| e.to_string());
                Ok((text(name)?, text(value)?))
            })
            .collect()
    }
}

/// Fails on a dynamic table size update after the first field of `block`: one may only start a
/// block. Walks the representations without decoding them.
fn check_size_updates(block: &[u8]) -> Result<(), String> {
    let mut pos = 0;
    let mut fields = false;
    while let Some(&first) = block.get(pos) {
        if first & 0xe0 == 0x20 {
            if fields {
                return Err("dynamic table size update after a field".into());
            }
            integer(block, &mut pos, 5)?;
            continue;
        }
        fields = true;
        if first & 0x80 != 0 {
            integer(block, &mut pos, 7)?;
            continue;
        }
        let prefix = if first & 0x40 != 0 { 6 } else { 4 };
        let strings = if integer(block, &mut pos, prefix)? == 0 { 2 } else { 1 };
        for _ in 0..strings {
            pos += integer(block, &mut pos, 7)?;
        }
    }
    Ok(())
}

/// An HPACK integer with a `prefix`-bit prefix at `pos` (RFC 7541 5.1), `pos` moved past it.
fn integer(buf: &[u8], pos: &mut usize, prefix: u32) -> Result<usize, String> {
    let max = (1usize << prefix) - 1;
    let mut next = || {
        let b = *buf.get(*pos).ok_or("truncated header block")?;
        *pos += 1;
        Ok::<u8, String>(b)
    };
    let mut value = usize::from(next()?) & max;
    if value < max {
        return Ok(value);
    }
    for shift in (0..=28).step_by(7) {
        let b = next()?;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("HPACK integer too large".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_fields_decode_as_they_were_written() {
        let long = "x".repeat(300);
        let fields = [("a", long.as_str()), ("X-Upper", "v"), (":status", "200")];
        let decoded = Decoder::new(DEFAULT_TABLE_SIZE).decode(&encode(&fields)).unwrap();
        let expected: Vec<(String, String)> = fields.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn a_table_size_update_may_only_start_a_block() {
        // 0x20: size update to 0; 0x88: indexed `:status: 200`.
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        assert_eq!(
            d.decode(&[0x20, 0x88]).unwrap(),
            [(":status".to_string(), "200".to_string())]
        );
        let err = Decoder::new(DEFAULT_TABLE_SIZE).decode(&[0x88, 0x20]).unwrap_err();
        assert!(err.contains("after a field"), "{err}");
        // 0x3f 0x80 0x20: a size update to 31 + 32 * 128 = 4127, over what the client allowed.
        assert!(
            Decoder::new(DEFAULT_TABLE_SIZE)
                .decode(&[0x3f, 0x80, 0x20, 0x88])
                .is_err()
        );
        assert!(Decoder::new(8192).decode(&[0x3f, 0x80, 0x20, 0x88]).is_ok());
    }

    #[test]
    fn frames_split_back_into_what_was_written() {
        let mut bytes = client_hello()[PREFACE.len()..].to_vec();
        Frame::new(HEADERS, END_HEADERS | PADDED, 1, vec![2, 0x88, 0, 0]).write(&mut bytes);
        let frames = Frame::split(&bytes).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].kind, SETTINGS);
        assert_eq!(
            settings_pairs(&frames[0].payload).collect::<Vec<_>>(),
            [(SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)]
        );
        assert_eq!(header_fragment(frames[2].flags, &frames[2].payload), Ok(&[0x88][..]));
        assert_eq!(Frame::split(&bytes[..bytes.len() - 1]), None);
    }
}
