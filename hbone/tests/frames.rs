//! A frame-level HTTP/2 peer against `server::serve` over real mTLS. The peer writes the client preface,
//! SETTINGS, HEADERS, CONTINUATION, DATA, RST_STREAM and WINDOW_UPDATE frames by hand and reads the server's
//! frames back (with a small HPACK decoder), so that each malformed or hostile input can be checked for its
//! exact outcome: a status, a RST_STREAM code or a GOAWAY, and whether the connection keeps serving.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use meshwire_hbone::server::ServeOptions;
use meshwire_identity::tls;
use meshwire_testkit::data::*;
use meshwire_testkit::h2::*;
use meshwire_testkit::net::*;
use meshwire_testkit::pki::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

const LIMIT: Duration = Duration::from_secs(10);
/// The frame size every HTTP/2 endpoint accepts; the peer sends no larger frames.
const FRAME: usize = 16_384;

// ---------------------------------------------------------------------------------------------------------
// The peer
// ---------------------------------------------------------------------------------------------------------

/// What the server sent on one stream.
#[derive(Debug, Default)]
struct Stream {
    /// `:status` of the response.
    status: Option<u16>,
    /// The DATA received.
    data: Vec<u8>,
    /// END_STREAM received.
    ended: bool,
    /// The RST_STREAM error code received.
    reset: Option<u32>,
}

/// The first thing that decided a stream's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    Closed,
}

struct Peer {
    io: TlsStream<TcpStream>,
    input: Vec<u8>,
    output: Vec<u8>,
    hpack: Decoder,
    /// The server's SETTINGS, once received.
    settings: Option<HashMap<u16, u32>>,
    /// The server's receive window for the connection: 65535 plus its WINDOW_UPDATEs on stream 0.
    connection_window: u64,
    streams: HashMap<u32, Stream>,
    /// A header block being assembled from HEADERS and CONTINUATION frames: stream, HEADERS flags, block.
    partial: Option<(u32, u8, Vec<u8>)>,
    /// (last stream id, error code) of a GOAWAY received.
    goaway: Option<(u32, u32)>,
    closed: bool,
    next_id: u32,
}

impl Peer {
    /// Connects over mTLS, exchanges prefaces and waits for the server's SETTINGS and its connection
    /// WINDOW_UPDATE. The peer's own windows are the largest possible, so the server never waits for it.
    async fn connect(pki: &Pki, addr: SocketAddr) -> Peer {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io = tokio_rustls::TlsConnector::from(pki.client_tls.clone())
            .connect(tls::server_name(), tcp)
            .await
            .unwrap();
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut peer = Peer {
            io,
            input: Vec::new(),
            output: Vec::new(),
            hpack: Decoder::new(DEFAULT_TABLE_SIZE),
            settings: None,
            connection_window: DEFAULT_WINDOW.into(),
            streams: HashMap::new(),
            partial: None,
            goaway: None,
            closed: false,
            next_id: 1,
        };
        peer.send(&client_hello()).await;
        peer.wait("the server's SETTINGS and connection WINDOW_UPDATE", |p| {
            p.settings.is_some() && p.connection_window > DEFAULT_WINDOW.into()
        })
        .await;
        peer
    }

    fn setting(&self, id: u16) -> Option<u32> {
        self.settings.as_ref().unwrap().get(&id).copied()
    }

    fn stream(&self, id: u32) -> &Stream {
        &self.streams[&id]
    }

    async fn send(&mut self, bytes: &[u8]) {
        timeout(LIMIT, async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await
        .expect("timed out writing")
        .unwrap();
    }

    /// Reads and handles one frame (answering SETTINGS and PING), or notes that the connection closed.
    async fn read_frame(&mut self) {
        loop {
            if let Some((frame, len)) = Frame::parse(&self.input) {
                self.input.drain(..len);
                self.on_frame(frame.kind, frame.flags, frame.stream & MAX_WINDOW, &frame.payload);
                if !self.output.is_empty() {
                    let out = std::mem::take(&mut self.output);
                    self.send(&out).await;
                }
                return;
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.io.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    self.closed = true;
                    return;
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn on_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        match kind {
            DATA => {
                let rec = self.streams.entry(stream).or_default();
                rec.data
                    .extend_from_slice(unpad(flags, payload).expect("bad DATA padding"));
                rec.ended |= flags & END_STREAM != 0;
            }
            HEADERS => {
                let fragment = header_fragment(flags, payload).unwrap();
                self.partial = Some((stream, flags, fragment.to_vec()));
            }
            CONTINUATION => {
                let partial = self.partial.as_mut().expect("CONTINUATION without HEADERS");
                assert_eq!(partial.0, stream, "CONTINUATION on another stream");
                partial.2.extend_from_slice(payload);
            }
            RST_STREAM => {
                self.streams.entry(stream).or_default().reset = Some(u32::from_be_bytes(payload.try_into().unwrap()));
            }
            SETTINGS if flags & ACK == 0 => {
                self.settings
                    .get_or_insert_with(HashMap::new)
                    .extend(settings_pairs(payload));
                self.output.extend(frame(SETTINGS, ACK, 0, &[]));
            }
            PING if flags & ACK == 0 => self.output.extend(frame(PING, ACK, 0, payload)),
            GOAWAY => {
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap()) & MAX_WINDOW;
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                self.goaway = Some((last, code));
            }
            WINDOW_UPDATE if stream == 0 => {
                self.connection_window += u64::from(u32::from_be_bytes(payload.try_into().unwrap()) & MAX_WINDOW);
            }
            // SETTINGS and PING acknowledgements, stream WINDOW_UPDATEs (the peer sends little), PRIORITY.
            _ => {}
        }
        if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
            let (stream, flags, block) = self.partial.take().unwrap();
            let fields = self
                .hpack
                .decode(&block)
                .unwrap_or_else(|e| panic!("undecodable header block on stream {stream}: {e}"));
            let rec = self.streams.entry(stream).or_default();
            if rec.status.is_none() {
                let status = fields
                    .iter()
                    .find(|(name, _)| name == ":status")
                    .expect("response without :status");
                rec.status = Some(status.1.parse().unwrap());
            }
            rec.ended |= flags & END_STREAM != 0;
        }
    }

    /// Reads frames until `done` holds; fails after [`LIMIT`] or if the connection closes first.
    async fn wait(&mut self, what: &str, done: impl Fn(&Peer) -> bool) {
        let waited = timeout(LIMIT, async {
            while !done(self) && !self.closed {
                self.read_frame().await;
            }
        })
        .await;
        assert!(
            waited.is_ok() && done(self),
            "no {what} ({}); goaway: {:?}; streams: {:?}",
            if self.closed { "connection closed" } else { "timed out" },
            self.goaway,
            self.streams
                .iter()
                .map(|(id, s)| (id, s.status, s.data.len(), s.ended, s.reset))
                .collect::<Vec<_>>(),
        );
    }

    /// Sends a header block as HEADERS and CONTINUATION frames of at most `max_frame` bytes; returns how
    /// many frames that took.
    async fn send_headers(&mut self, id: u32, fields: &[(&str, &str)], end_stream: bool, max_frame: usize) -> usize {
        let block = encode(fields);
        let chunks: Vec<&[u8]> = block.chunks(max_frame).collect();
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut flags = if i + 1 == chunks.len() { END_HEADERS } else { 0 };
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            if i == 0 && end_stream {
                flags |= END_STREAM;
            }
            out.extend(frame(kind, flags, id, chunk));
        }
        self.send(&out).await;
        chunks.len()
    }

    /// The id of the next stream the peer opens.
    fn new_stream(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        self.streams.entry(id).or_default();
        id
    }

    /// Opens a stream with a request whose header block fits in one frame.
    async fn request(&mut self, fields: &[(&str, &str)]) -> u32 {
        let id = self.new_stream();
        self.send_headers(id, fields, false, FRAME).await;
        id
    }

    async fn connect_to(&mut self, authority: &str) -> u32 {
        self.request(&[(":method", "CONNECT"), (":authority", authority)]).await
    }

    /// Waits for the response, the reset of the stream, a GOAWAY or the end of the connection.
    async fn outcome(&mut self, id: u32) -> Outcome {
        self.wait("outcome", |p| {
            let s = p.stream(id);
            s.status.is_some() || s.reset.is_some() || p.goaway.is_some() || p.closed
        })
        .await;
        let s = self.stream(id);
        match (s.status, s.reset, self.goaway) {
            (Some(status), ..) => Outcome::Status(status),
            (None, Some(code), _) => Outcome::Reset(code),
            (None, None, Some((_, code))) => Outcome::GoAway(code),
            (None, None, None) => Outcome::Closed,
        }
    }

    async fn send_data(&mut self, id: u32, data: &[u8], end_stream: bool) {
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(FRAME).collect()
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            out.extend(frame(DATA, if last && end_stream { END_STREAM } else { 0 }, id, chunk));
        }
        self.send(&out).await;
    }

    async fn send_reset(&mut self, id: u32, code: u32) {
        self.send(&frame(RST_STREAM, 0, id, &code.to_be_bytes())).await;
    }

    /// Waits until `len` bytes arrived on `id`.
    async fn wait_data(&mut self, id: u32, len: usize) {
        self.wait("echoed data", |p| p.stream(id).data.len() >= len).await;
    }

    /// Waits for END_STREAM on `id` and returns everything it carried.
    async fn body(&mut self, id: u32) -> Vec<u8> {
        self.wait("END_STREAM", |p| p.stream(id).ended || p.stream(id).reset.is_some())
            .await;
        assert_eq!(self.stream(id).reset, None, "stream {id} was reset");
        self.stream(id).data.clone()
    }

    /// A CONNECT to the echo server on a new stream: 200, data there and back, END_STREAM both ways.
    async fn round_trip(&mut self, echo: SocketAddr) {
        let id = self.connect_to(&echo.to_string()).await;
        assert_eq!(self.outcome(id).await, Outcome::Status(200));
        let message = format!("round trip on stream {id}");
        self.send_data(id, message.as_bytes(), true).await;
        assert_eq!(self.body(id).await, message.as_bytes());
        assert_eq!(self.goaway, None);
    }
}

struct Setup {
    pki: Pki,
    server: HboneServer,
    echo: SocketAddr,
}

impl Setup {
    async fn new() -> Setup {
        let pki = Pki::new();
        let server = hbone_server(&pki, ServeOptions::default()).await;
        let echo = echo_server().await;
        Setup { pki, server, echo }
    }

    async fn peer(&self) -> Peer {
        Peer::connect(&self.pki, self.server.addr).await
    }

    /// Waits until the handler has seen `n` streams end.
    async fn finished(&self, n: u64) {
        let finished = || self.server.handler.finished.load(std::sync::atomic::Ordering::SeqCst);
        timeout(LIMIT, async {
            while finished() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} of {n} streams finished", finished()));
    }
}

// ---------------------------------------------------------------------------------------------------------
// HPACK (RFC 7541): the shared decoder against the RFC's examples
// ---------------------------------------------------------------------------------------------------------

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn hpack_decoder_passes_the_rfc_7541_examples() {
    let fields = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    };
    // C.4.1: indexed fields and a Huffman-coded literal with incremental indexing.
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    assert_eq!(
        d.decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).unwrap(),
        fields(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ])
    );
    // C.6.1 and C.6.2: Huffman-coded responses with a 256-byte table, so the second evicts and reuses.
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    d.set_table_size(256);
    let date = "Mon, 21 Oct 2013 20:13:21 GMT";
    let first = fields(&[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", date),
        ("location", "https://www.example.com"),
    ]);
    let c61 = "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d \
               29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3";
    assert_eq!(d.decode(&hex(c61)).unwrap(), first);
    let mut second = first.clone();
    second[0].1 = "307".into();
    assert_eq!(d.decode(&hex("4883 640e ffc1 c0bf")).unwrap(), second);
    // Our encoder's output, read back; lengths past the 7-bit prefix take continuation bytes.
    let long = "x".repeat(300);
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    assert_eq!(d.decode(&encode(&[("a", &long)])).unwrap(), fields(&[("a", &long)]));
}

// ---------------------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------------------

/// Case 1, and the settings HBONE.md lists.
#[tokio::test]
async fn valid_connect_gets_200_and_echoes_with_end_stream_both_ways() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    assert_eq!(peer.setting(SETTINGS_MAX_CONCURRENT_STREAMS), Some(200));
    assert_eq!(peer.setting(SETTINGS_INITIAL_WINDOW_SIZE), Some(4 << 20));
    assert_eq!(peer.setting(SETTINGS_MAX_FRAME_SIZE), Some(1 << 20));
    assert_eq!(peer.setting(SETTINGS_MAX_HEADER_LIST_SIZE), Some(64 << 10));
    assert_eq!(peer.connection_window, 16 << 20);

    let id = peer.connect_to(&setup.echo.to_string()).await;
    assert_eq!(peer.outcome(id).await, Outcome::Status(200));
    assert!(!peer.stream(id).ended);
    peer.send_data(id, b"hello", false).await;
    peer.wait_data(id, 5).await;
    assert_eq!(peer.stream(id).data, b"hello");
    assert!(
        !peer.stream(id).ended,
        "the server must not end its side before the client does"
    );
    peer.send_data(id, b" world", true).await;
    assert_eq!(peer.body(id).await, b"hello world");

    setup.finished(1).await;
    let reports = setup.server.handler.reports.lock().await;
    assert_eq!(reports[0].status, http::StatusCode::OK);
    assert_eq!((reports[0].to_upstream, reports[0].from_upstream), (11, 11));
    assert!(reports[0].error.is_none(), "{:?}", reports[0].error);
}

/// Case 2.
#[tokio::test]
async fn non_connect_method_gets_400_and_the_connection_keeps_serving() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    let echo = setup.echo.to_string();
    for method in ["GET", "POST"] {
        let id = peer
            .request(&[
                (":method", method),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", &echo),
            ])
            .await;
        assert_eq!(peer.outcome(id).await, Outcome::Status(400), "{method}");
        assert!(peer.stream(id).ended, "a refusal ends the stream");
        peer.round_trip(setup.echo).await;
    }
}

/// Cases 3 and 4: h2 itself resets a plain CONNECT carrying `:scheme` or `:path` (RFC 9113 8.5), while a
/// CONNECT without `:authority` reaches `serve`, which answers 400.
#[tokio::test]
async fn malformed_connect_pseudo_headers_are_refused_and_the_connection_keeps_serving() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    let authority = setup.echo.to_string();
    let echo = authority.as_str();
    let cases = [
        (
            ":scheme and :path",
            vec![
                (":method", "CONNECT"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", echo),
            ],
            Outcome::Reset(PROTOCOL_ERROR),
        ),
        (
            ":scheme only",
            vec![(":method", "CONNECT"), (":scheme", "https"), (":authority", echo)],
            Outcome::Reset(PROTOCOL_ERROR),
        ),
        (
            ":path only",
            vec![(":method", "CONNECT"), (":path", "/"), (":authority", echo)],
            Outcome::Reset(PROTOCOL_ERROR),
        ),
        ("no :authority", vec![(":method", "CONNECT")], Outcome::Status(400)),
    ];
    for (what, fields, expected) in cases {
        let id = peer.request(&fields).await;
        assert_eq!(peer.outcome(id).await, expected, "{what}");
        peer.round_trip(setup.echo).await;
    }
}

/// Case 5: authorities that h2 (through `http::uri::Authority`) cannot parse are reset with PROTOCOL_ERROR
/// before `serve` sees them; those it parses but [`Authority`] refuses get 400.
///
/// [`Authority`]: meshwire_hbone::headers::Authority
#[tokio::test]
async fn malformed_authorities_are_refused_and_the_connection_keeps_serving() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    let cases = [
        ("127.0.0.1", Outcome::Status(400)),
        ("[::1", Outcome::Reset(PROTOCOL_ERROR)),
        ("::1:80", Outcome::Reset(PROTOCOL_ERROR)),
        ("127.0.0.1:0", Outcome::Status(400)),
        ("host name:80", Outcome::Reset(PROTOCOL_ERROR)),
        ("127.0.0.1:99999", Outcome::Status(400)),
        ("", Outcome::Reset(PROTOCOL_ERROR)),
    ];
    for (authority, expected) in cases {
        let id = peer.connect_to(authority).await;
        assert_eq!(peer.outcome(id).await, expected, "{authority:?}");
        peer.round_trip(setup.echo).await;
    }
}

/// The handler's refusals, as h2 encodes them (literal `:status` values, then dynamic-table references).
#[tokio::test]
async fn handler_refusals_arrive_with_their_statuses() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    for _ in 0..2 {
        for (authority, status) in [
            ("127.0.0.1:1".to_string(), 401),
            (closed.to_string(), 503),
            ("localhost:80".to_string(), 400),
        ] {
            let id = peer.connect_to(&authority).await;
            assert_eq!(peer.outcome(id).await, Outcome::Status(status), "{authority}");
            assert!(peer.stream(id).ended);
        }
    }
    peer.round_trip(setup.echo).await;
}

/// Case 6: a header list just under the server's 64 KiB limit is served; one over it gets h2's 431, and
/// the stream is then reset with PROTOCOL_ERROR; the connection keeps serving.
#[tokio::test]
async fn oversized_header_list_gets_431_and_the_connection_keeps_serving() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    let limit = peer.setting(SETTINGS_MAX_HEADER_LIST_SIZE).unwrap() as usize;
    let max_frame = peer.setting(SETTINGS_MAX_FRAME_SIZE).unwrap() as usize;
    assert!(max_frame >= FRAME);
    let echo = setup.echo.to_string();

    // Each field counts its name, value and 32 bytes (RFC 9113 6.5.2).
    let fits = "a".repeat(limit - 1024);
    let id = peer.new_stream();
    let fields = [(":method", "CONNECT"), (":authority", &echo), ("x-large", &fits)];
    assert_eq!(peer.send_headers(id, &fields, false, FRAME).await, 4);
    assert_eq!(peer.outcome(id).await, Outcome::Status(200));
    peer.send_data(id, b"large", true).await;
    assert_eq!(peer.body(id).await, b"large");

    let over = "a".repeat(70 * 1024);
    let id = peer.new_stream();
    let fields = [(":method", "CONNECT"), (":authority", &echo), ("x-oversized", &over)];
    // One HEADERS and four CONTINUATION frames.
    assert_eq!(peer.send_headers(id, &fields, false, FRAME).await, 5);
    assert_eq!(peer.outcome(id).await, Outcome::Status(431));
    assert!(peer.stream(id).ended);
    peer.wait("RST_STREAM after the 431", |p| p.stream(id).reset.is_some())
        .await;
    assert_eq!(peer.stream(id).reset, Some(PROTOCOL_ERROR));
    peer.round_trip(setup.echo).await;
}

/// h2 bounds the CONTINUATION frames of one header block by the header list size over its own max frame
/// size, at least 5 (not counting the last): with 64 KiB and 1 MiB, a block in 7 frames is served, one in 8
/// frames is a connection error, however small the block.
#[tokio::test]
async fn header_block_in_more_than_seven_frames_is_a_connection_error() {
    let setup = Setup::new().await;
    let echo = setup.echo.to_string();
    let value = "a".repeat(7 * 1024);
    let fields = [
        (":method", "CONNECT"),
        (":authority", echo.as_str()),
        ("x-split", value.as_str()),
    ];
    let len = encode(&fields).len();
    let mut peer = setup.peer().await;
    for (frames, expected) in [(7, Outcome::Status(200)), (8, Outcome::GoAway(ENHANCE_YOUR_CALM))] {
        let id = peer.new_stream();
        assert_eq!(
            peer.send_headers(id, &fields, false, len.div_ceil(frames)).await,
            frames
        );
        assert_eq!(peer.outcome(id).await, expected, "{frames} frames");
    }
    peer.wait("the end of the connection", |p| p.closed).await;
}

/// Case 7: while stream A carries a mebibyte through the echo server, its siblings misbehave or are cut
/// short: B is reset by the client mid-transfer, C receives trailers without END_STREAM (a stream error),
/// D is a malformed CONNECT, E sends its data and END_STREAM before the 200. A is unaffected.
#[tokio::test]
async fn a_misbehaving_stream_does_not_affect_its_siblings() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    let echo = setup.echo.to_string();
    let a = peer.connect_to(&echo).await;
    let b = peer.connect_to(&echo).await;
    let c = peer.connect_to(&echo).await;
    for id in [a, b, c] {
        assert_eq!(peer.outcome(id).await, Outcome::Status(200));
    }

    let payload = pattern(1 << 20, 7);
    let mut sent = 0;
    for (i, chunk) in payload.chunks(FRAME).enumerate() {
        peer.send_data(a, chunk, false).await;
        sent += chunk.len();
        match i {
            8 => {
                peer.send_data(b, b"cut short", false).await;
                peer.wait_data(b, 9).await;
                peer.send_reset(b, CANCEL).await;
            }
            16 => {
                peer.send_headers(c, &[("x-trailer", "1")], false, FRAME).await;
                peer.wait("RST_STREAM of C", |p| p.stream(c).reset.is_some()).await;
                assert_eq!(peer.stream(c).reset, Some(PROTOCOL_ERROR));
            }
            24 => {
                let d = peer
                    .request(&[(":method", "CONNECT"), (":path", "/"), (":authority", &echo)])
                    .await;
                assert_eq!(peer.outcome(d).await, Outcome::Reset(PROTOCOL_ERROR));
            }
            32 => {
                let e = peer.connect_to(&echo).await;
                peer.send_data(e, b"early", true).await;
                assert_eq!(peer.outcome(e).await, Outcome::Status(200));
                assert_eq!(peer.body(e).await, b"early");
            }
            _ => {}
        }
        peer.wait_data(a, sent).await;
    }
    peer.send_data(a, &[], true).await;
    assert!(peer.body(a).await == payload, "stream A's echo differs");
    assert_eq!(peer.goaway, None);
    // The server does not answer the client's RST_STREAM with one of its own.
    assert_eq!(peer.stream(b).reset, None);

    // A, B, C and E reached the handler and ended; D never did.
    setup.finished(4).await;
    let reports = setup.server.handler.reports.lock().await;
    let a_report = reports.iter().find(|r| r.to_upstream == 1 << 20).unwrap();
    assert_eq!(a_report.from_upstream, 1 << 20);
    assert!(a_report.error.is_none(), "{:?}", a_report.error);
    assert_eq!(
        reports.iter().filter(|r| r.error.is_some()).count(),
        2,
        "B and C end with errors"
    );
}

/// RFC 9113 6.9 makes a zero WINDOW_UPDATE on a stream a stream error; h2 treats it as a connection error,
/// so the whole connection goes with GOAWAY(PROTOCOL_ERROR). Likewise DATA after the client's END_STREAM
/// (RFC 9113 5.1: a stream error STREAM_CLOSED). Recorded here so a change in h2 is noticed.
#[tokio::test]
async fn h2_turns_some_stream_errors_into_connection_errors() {
    let setup = Setup::new().await;
    let echo = setup.echo.to_string();

    let mut peer = setup.peer().await;
    let a = peer.connect_to(&echo).await;
    let b = peer.connect_to(&echo).await;
    assert_eq!(peer.outcome(a).await, Outcome::Status(200));
    assert_eq!(peer.outcome(b).await, Outcome::Status(200));
    peer.send(&frame(WINDOW_UPDATE, 0, b, &0u32.to_be_bytes())).await;
    peer.wait("GOAWAY", |p| p.goaway.is_some()).await;
    assert_eq!(peer.goaway, Some((b, PROTOCOL_ERROR)));
    peer.wait("the end of the connection", |p| p.closed).await;

    let mut peer = setup.peer().await;
    let a = peer.connect_to(&echo).await;
    let b = peer.connect_to(&echo).await;
    assert_eq!(peer.outcome(a).await, Outcome::Status(200));
    assert_eq!(peer.outcome(b).await, Outcome::Status(200));
    // In one write, so that h2 reads the second frame while the stream is half closed (remote); once the
    // server has closed its side too, the same frame gets RST_STREAM(STREAM_CLOSED) instead.
    let mut frames = frame(DATA, END_STREAM, b, b"done");
    frames.extend(frame(DATA, 0, b, b"and more"));
    peer.send(&frames).await;
    peer.wait("GOAWAY", |p| p.goaway.is_some()).await;
    assert_eq!(peer.goaway, Some((b, PROTOCOL_ERROR)));
    peer.wait("the end of the connection", |p| p.closed).await;

    // The server reports both connections as failed, naming the client.
    let errors = timeout(LIMIT, async {
        loop {
            let errors = setup.server.errors.lock().await.clone();
            if errors.len() >= 2 {
                break errors;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("serve returned an error for each connection");
    for e in &errors {
        assert!(
            e.contains("HTTP/2 connection with spiffe://cluster.local/ns/default/sa/client failed"),
            "{e}"
        );
    }
}

/// Case 8.
#[tokio::test]
async fn plaintext_preface_on_the_tls_port_fails_the_handshake_and_names_the_peer() {
    let setup = Setup::new().await;
    let mut tcp = TcpStream::connect(setup.server.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tcp.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    let read = timeout(LIMIT, tcp.read_to_end(&mut answer)).await.unwrap();
    // rustls answers with a plaintext fatal decode_error alert (type 21, TLS 1.2 record version, level 2,
    // description 50) and closes.
    assert!(read.is_ok(), "{read:?}");
    assert_eq!(answer, [21, 3, 3, 0, 2, 2, 50]);

    let errors = timeout(LIMIT, async {
        loop {
            let errors = setup.server.errors.lock().await.clone();
            if !errors.is_empty() {
                return errors;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!("{local}: TLS handshake failed")),
        "{errors:?}"
    );

    // The listener keeps serving.
    setup.peer().await.round_trip(setup.echo).await;
}

/// Case 9.
#[tokio::test]
async fn streams_beyond_max_concurrent_streams_are_refused() {
    let setup = Setup::new().await;
    let mut peer = setup.peer().await;
    let max = peer.setting(SETTINGS_MAX_CONCURRENT_STREAMS).unwrap() as usize;
    assert_eq!(max, 200);
    let block = encode(&[(":method", "CONNECT"), (":authority", &setup.echo.to_string())]);
    let ids: Vec<u32> = (0..300).map(|i| 1 + 2 * i).collect();
    let mut out = Vec::new();
    for &id in &ids {
        out.extend(frame(HEADERS, END_HEADERS, id, &block));
        peer.streams.entry(id).or_default();
    }
    peer.next_id = ids[ids.len() - 1] + 2;
    peer.send(&out).await;
    peer.wait("an outcome for all 300 streams", |p| {
        ids.iter()
            .all(|id| p.stream(*id).status.is_some() || p.stream(*id).reset.is_some())
    })
    .await;
    for (i, &id) in ids.iter().enumerate() {
        let s = peer.stream(id);
        if i < max {
            assert_eq!((s.status, s.reset), (Some(200), None), "stream {id}");
        } else {
            assert_eq!((s.status, s.reset), (None, Some(REFUSED_STREAM)), "stream {id}");
        }
    }
    assert_eq!(peer.goaway, None);

    // The served streams still work, and once they end new streams are accepted again.
    for &id in &ids[..max] {
        peer.send_data(id, &id.to_be_bytes(), true).await;
    }
    for &id in &ids[..max] {
        assert_eq!(peer.body(id).await, id.to_be_bytes());
    }
    peer.round_trip(setup.echo).await;
}
