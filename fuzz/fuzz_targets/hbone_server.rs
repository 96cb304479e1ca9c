#![no_main]
//! The server side of HBONE fed raw HTTP/2 frames after the TLS layer: `server::serve_established`
//! on one end of an in-memory pipe, a frame-level client on the other, on a tokio current-thread
//! runtime with paused time (timeouts elapse as soon as everything waits, and runs are deterministic).
//!
//! The client writes the preface, SETTINGS, a good stream 1 (a CONNECT to an echo authority with
//! ztunnel's metadata headers, and `ping` with END_STREAM), then the fuzzed frames (structured
//! requests, DATA, RST_STREAM, WINDOW_UPDATE, SETTINGS, PING, GOAWAY, PRIORITY, raw frames of any
//! type; or raw bytes), then a second good stream with an id above every id the fuzzed frames used.
//! It reads every server frame until all it asked for is answered, the connection ends, or a
//! (virtual) deadline; then closes. The handler echoes in memory, except for some ports: 1 refuses
//! with 401, 2 with 503, 3 with 400, 4 answers after a (virtual) second, 5 is an upstream that ends at
//! once, 6 one whose reads fail.
//!
//! Invariants (a failed `assert!` is a crash):
//! - nothing panics;
//! - the server's output is a well-formed HTTP/2 frame sequence: SETTINGS first, frame sizes within
//!   what the client allows, payload sizes each frame type requires, defined error codes, header blocks
//!   not interleaved, DATA only after a 200 and never after END_STREAM, no push, no stream the client
//!   did not open;
//! - every header block decodes with HPACK and is one response: a single `:status` (200, or one of the
//!   refusals 400, 401, 431, 503, which end the stream), no other pseudo-header;
//! - a closed connection was announced with GOAWAY (unless the client sent GOAWAY), a GOAWAY with an
//!   error is followed by the close, and `serve_established` returns once the client has closed;
//! - every stream the fuzzed frames opened with a complete header block (HEADERS, then CONTINUATIONs
//!   up to END_HEADERS, on a new odd id) gets a status or a RST_STREAM, unless the client reset it, the
//!   client sent GOAWAY, or the server sent GOAWAY with an error code (a connection error ends every
//!   stream, RFC 9113 5.4.1) or with a last stream id below it;
//! - isolation: when the fuzzed frames are all stream-level (none on stream 0, none on a good stream,
//!   no SETTINGS) and open fewer streams than the concurrency limit leaves room for, and the server
//!   sent no GOAWAY with an error, both good streams get 200 and their echo with END_STREAM.
//!
//! Seeds (`corpus/hbone_server/`): written by the target itself (the `seeds` module below) when
//! `HBONE_SERVER_WRITE_SEEDS` names a directory: from `fuzz/`, `HBONE_SERVER_WRITE_SEEDS=corpus/hbone_server
//! cargo fuzz run -s none hbone_server -- -runs=0`. They are HTTP/2 frames of real requests: a CONNECT
//! with ztunnel's metadata headers, a refused method, bad authorities, authorities not in canonical
//! form (`:08080`), each refusal port, a reset, a
//! header block split over CONTINUATIONs, a WINDOW_UPDATE that overflows a stream's send window (the
//! client's window is the largest there is) and a PING.
//!
//! Input: an odd first byte makes the rest raw bytes, written as they are; they are checked like
//! structured input when they split into whole frames. An even first byte makes the rest a list of
//! `Op`s (`arbitrary`). `HBONE_SERVER_DEBUG=1` prints the input and what the client saw, to look into
//! one input.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshwire_hbone::Settings;
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions, StreamReport};
use meshwire_identity::id::SpiffeId;
use meshwire_rt::TokioTimer;
use meshwire_testkit::h2::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

const PEER: &str = "spiffe://cluster.local/ns/default/sa/client";
/// How long the client waits for answers, in virtual time.
const DEADLINE: Duration = Duration::from_secs(30);
/// The server's concurrency limit: small, so that REFUSED_STREAM is reachable.
const MAX_STREAMS: u32 = 8;

// ---------------------------------------------------------------------------------------------------------
// The input
// ---------------------------------------------------------------------------------------------------------

/// The first byte picks the mode: odd, raw bytes; even, `arbitrary` ops from the rest.
#[derive(Debug)]
enum Input {
    Frames(Vec<Op>),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Id {
    S3,
    S5,
    S7,
    S9,
    S11,
    Zero,
    /// The first good stream.
    Good,
    Even(u8),
    /// Any 32 bits, reserved bit included.
    Raw(u32),
}

impl Id {
    fn wire(self) -> u32 {
        match self {
            Id::S3 => 3,
            Id::S5 => 5,
            Id::S7 => 7,
            Id::S9 => 9,
            Id::S11 => 11,
            Id::Zero => 0,
            Id::Good => 1,
            Id::Even(n) => 2 * (u32::from(n) + 1),
            Id::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A request header block, in one HEADERS or split into HEADERS and a CONTINUATION.
    Request {
        id: Id,
        request: Request,
        end_stream: bool,
        split: Option<u8>,
        priority: Option<[u8; 5]>,
        pad: Option<u8>,
    },
    Data {
        id: Id,
        data: Vec<u8>,
        end_stream: bool,
        pad: Option<u8>,
    },
    Reset {
        id: Id,
        code: u32,
    },
    WindowUpdate {
        id: Id,
        increment: u32,
    },
    Settings {
        ack: bool,
        params: Vec<(Setting, u32)>,
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last: u32,
        code: u32,
    },
    Priority {
        id: Id,
        dependency: u32,
        weight: u8,
    },
    Frame {
        kind: Kind,
        flags: u8,
        id: Id,
        payload: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    Data,
    Headers,
    Priority,
    RstStream,
    Settings,
    PushPromise,
    Ping,
    GoAway,
    WindowUpdate,
    Continuation,
    Other(u8),
}

impl Kind {
    fn wire(self) -> u8 {
        match self {
            Kind::Data => DATA,
            Kind::Headers => HEADERS,
            Kind::Priority => PRIORITY_FRAME,
            Kind::RstStream => RST_STREAM,
            Kind::Settings => SETTINGS,
            Kind::PushPromise => PUSH_PROMISE,
            Kind::Ping => PING,
            Kind::GoAway => GOAWAY,
            Kind::WindowUpdate => WINDOW_UPDATE,
            Kind::Continuation => CONTINUATION,
            Kind::Other(t) => t,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Setting {
    HeaderTableSize,
    EnablePush,
    MaxConcurrentStreams,
    InitialWindowSize,
    MaxFrameSize,
    MaxHeaderListSize,
    Other(u16),
}

impl Setting {
    fn wire(self) -> u16 {
        match self {
            Setting::HeaderTableSize => 1,
            Setting::EnablePush => 2,
            Setting::MaxConcurrentStreams => 3,
            Setting::InitialWindowSize => 4,
            Setting::MaxFrameSize => 5,
            Setting::MaxHeaderListSize => 6,
            Setting::Other(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Request {
    method: Method,
    authority: Option<Target>,
    scheme: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    headers: Vec<(Name, Vec<u8>)>,
}

#[derive(Arbitrary, Debug)]
enum Method {
    Connect,
    Get,
    Post,
    Other(Vec<u8>),
}

/// What the handler does with a request follows from the authority's port.
#[derive(Arbitrary, Debug)]
enum Target {
    Echo,
    EchoHost,
    EchoV6,
    Delayed,
    Unauthorized,
    Unavailable,
    BadRequest,
    UpstreamEnds,
    UpstreamFails,
    PortZero,
    Raw(Vec<u8>),
}

impl Target {
    fn wire(&self) -> Vec<u8> {
        let s = match self {
            Target::Echo => "10.0.0.1:8080",
            Target::EchoHost => "echo.default.svc.cluster.local:8080",
            Target::EchoV6 => "[fd00::1]:8080",
            Target::Delayed => "10.0.0.1:4",
            Target::Unauthorized => "10.0.0.1:1",
            Target::Unavailable => "10.0.0.1:2",
            Target::BadRequest => "10.0.0.1:3",
            Target::UpstreamEnds => "10.0.0.1:5",
            Target::UpstreamFails => "10.0.0.1:6",
            Target::PortZero => "10.0.0.1:0",
            Target::Raw(raw) => return raw.clone(),
        };
        s.as_bytes().to_vec()
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    Forwarded,
    Baggage,
    TraceParent,
    XForwardedNetwork,
    Raw(Vec<u8>),
}

impl Name {
    fn wire(&self) -> &[u8] {
        match self {
            Name::Forwarded => b"forwarded",
            Name::Baggage => b"baggage",
            Name::TraceParent => b"traceparent",
            Name::XForwardedNetwork => b"x-forwarded-network",
            Name::Raw(raw) => raw,
        }
    }
}

impl Request {
    fn fields(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let method = match &self.method {
            Method::Connect => b"CONNECT".to_vec(),
            Method::Get => b"GET".to_vec(),
            Method::Post => b"POST".to_vec(),
            Method::Other(m) => m.clone(),
        };
        let mut fields = vec![(b":method".to_vec(), method)];
        if let Some(scheme) = &self.scheme {
            fields.push((b":scheme".to_vec(), scheme.clone()));
        }
        if let Some(path) = &self.path {
            fields.push((b":path".to_vec(), path.clone()));
        }
        if let Some(authority) = &self.authority {
            fields.push((b":authority".to_vec(), authority.wire()));
        }
        for (name, value) in &self.headers {
            fields.push((name.wire().to_vec(), value.clone()));
        }
        fields
    }
}

// ---------------------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------------------

fn padded(pad: Option<u8>, flags: &mut u8, body: Vec<u8>) -> Vec<u8> {
    let Some(pad) = pad else { return body };
    *flags |= PADDED;
    let mut out = vec![pad];
    out.extend(body);
    out.extend(std::iter::repeat_n(0, usize::from(pad)));
    out
}

impl Op {
    fn frames(&self, out: &mut Vec<Frame>) {
        match self {
            Op::Request {
                id,
                request,
                end_stream,
                split,
                priority,
                pad,
            } => {
                let block = encode(&request.fields());
                let at = split.map_or(block.len(), |at| usize::from(at).min(block.len()));
                let mut flags = if *end_stream { END_STREAM } else { 0 };
                let mut first = Vec::new();
                if let Some(p) = priority {
                    flags |= PRIORITY;
                    first.extend_from_slice(p);
                }
                first.extend_from_slice(&block[..at]);
                if at == block.len() {
                    flags |= END_HEADERS;
                }
                let first = padded(*pad, &mut flags, first);
                out.push(Frame::new(HEADERS, flags, id.wire(), first));
                if at < block.len() {
                    out.push(Frame::new(CONTINUATION, END_HEADERS, id.wire(), block[at..].to_vec()));
                }
            }
            Op::Data {
                id,
                data,
                end_stream,
                pad,
            } => {
                let mut flags = if *end_stream { END_STREAM } else { 0 };
                let payload = padded(*pad, &mut flags, data.clone());
                out.push(Frame::new(DATA, flags, id.wire(), payload));
            }
            Op::Reset { id, code } => out.push(Frame::new(RST_STREAM, 0, id.wire(), code.to_be_bytes().to_vec())),
            Op::WindowUpdate { id, increment } => out.push(Frame::new(
                WINDOW_UPDATE,
                0,
                id.wire(),
                increment.to_be_bytes().to_vec(),
            )),
            Op::Settings { ack, params } => {
                let mut payload = Vec::new();
                for (setting, value) in params {
                    payload.extend_from_slice(&setting.wire().to_be_bytes());
                    payload.extend_from_slice(&value.to_be_bytes());
                }
                out.push(Frame::new(SETTINGS, if *ack { ACK } else { 0 }, 0, payload));
            }
            Op::Ping { ack, data } => out.push(Frame::new(PING, if *ack { ACK } else { 0 }, 0, data.to_vec())),
            Op::GoAway { last, code } => {
                let mut payload = last.to_be_bytes().to_vec();
                payload.extend_from_slice(&code.to_be_bytes());
                out.push(Frame::new(GOAWAY, 0, 0, payload));
            }
            Op::Priority { id, dependency, weight } => {
                let mut payload = dependency.to_be_bytes().to_vec();
                payload.push(*weight);
                out.push(Frame::new(PRIORITY_FRAME, 0, id.wire(), payload));
            }
            Op::Frame {
                kind,
                flags,
                id,
                payload,
            } => out.push(Frame::new(kind.wire(), *flags, id.wire(), payload.clone())),
        }
    }
}

/// The request of a good stream, as ztunnel writes it.
fn good_request(id: u32, ping: &[u8]) -> Vec<u8> {
    let fields = [
        (":method", "CONNECT"),
        (":authority", "10.0.0.1:8080"),
        ("forwarded", "for=\"10.0.0.2:41234\""),
        (
            "baggage",
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,\
             service.name=sleep,service.version=v1",
        ),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ];
    let mut out = Vec::new();
    Frame::new(HEADERS, END_HEADERS, id, encode(&fields)).write(&mut out);
    Frame::new(DATA, END_STREAM, id, ping.to_vec()).write(&mut out);
    out
}

/// What the fuzzed frames do, as far as the invariants care.
#[derive(Default)]
struct Plan {
    /// Streams opened by a complete header block.
    requests: Vec<u32>,
    /// Streams the client reset.
    reset: HashSet<u32>,
    client_goaway: bool,
    /// Only stream-level frames, none on the first good stream.
    stream_level: bool,
    /// The largest stream id any frame used.
    max_id: u32,
    /// The largest SETTINGS_HEADER_TABLE_SIZE and SETTINGS_MAX_FRAME_SIZE the client advertised.
    header_table: u32,
    max_frame: u32,
}

impl Plan {
    fn of(frames: &[Frame]) -> Plan {
        let mut plan = Plan {
            stream_level: true,
            max_id: 1,
            header_table: 4096,
            max_frame: 16_384,
            ..Plan::default()
        };
        let mut opened = 1; // the first good stream
        let mut block: Option<u32> = None;
        let mut complete = |plan: &mut Plan, id: u32| {
            if id % 2 == 1 && id > opened {
                opened = id;
                plan.requests.push(id);
            }
        };
        for f in frames {
            let id = f.stream & MAX_WINDOW;
            plan.max_id = plan.max_id.max(id);
            if id == 0 || id == 1 || matches!(f.kind, SETTINGS) {
                plan.stream_level = false;
            }
            match f.kind {
                RST_STREAM => {
                    plan.reset.insert(id);
                }
                GOAWAY => plan.client_goaway = true,
                SETTINGS if f.flags & ACK == 0 && id == 0 => {
                    for (setting, value) in settings_pairs(&f.payload) {
                        match setting {
                            SETTINGS_HEADER_TABLE_SIZE => plan.header_table = plan.header_table.max(value),
                            SETTINGS_MAX_FRAME_SIZE => plan.max_frame = plan.max_frame.max(value),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
            // A header block: HEADERS, then CONTINUATIONs on the same stream up to END_HEADERS.
            match (block, f.kind) {
                (Some(open), CONTINUATION) if open == f.stream => {
                    if f.flags & END_HEADERS != 0 {
                        block = None;
                        complete(&mut plan, id);
                    }
                }
                (_, HEADERS) => {
                    block = None;
                    if f.flags & END_HEADERS != 0 {
                        complete(&mut plan, id);
                    } else {
                        block = Some(f.stream);
                    }
                }
                _ => block = None,
            }
        }
        plan
    }
}

// ---------------------------------------------------------------------------------------------------------
// The server's handler and upstreams
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Echo,
    /// Reads end at once; writes are discarded.
    Ends,
    /// Reads fail.
    Fails,
}

/// An in-memory upstream: an echo with a small buffer, or one that ends or fails.
struct Upstream {
    mode: Mode,
    buf: VecDeque<u8>,
    shut: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

const UPSTREAM_BUFFER: usize = 4096;

impl Upstream {
    fn new(mode: Mode) -> Self {
        Self {
            mode,
            buf: VecDeque::new(),
            shut: false,
            reader: None,
            writer: None,
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.mode {
            Mode::Ends => return Poll::Ready(Ok(())),
            Mode::Fails => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            Mode::Echo => {}
        }
        if self.buf.is_empty() {
            if self.shut {
                return Poll::Ready(Ok(()));
            }
            self.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.remaining().min(self.buf.len());
        let (a, b) = self.buf.as_slices();
        let from_a = n.min(a.len());
        out.put_slice(&a[..from_a]);
        out.put_slice(&b[..n - from_a]);
        self.buf.drain(..n);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.mode != Mode::Echo {
            return Poll::Ready(Ok(data.len()));
        }
        let room = UPSTREAM_BUFFER - self.buf.len();
        if room == 0 {
            self.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        self.buf.extend(&data[..n]);
        if let Some(r) = self.reader.take() {
            r.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut = true;
        if let Some(r) = self.reader.take() {
            r.wake();
        }
        Poll::Ready(Ok(()))
    }
}

struct FuzzHandler {
    peer: SpiffeId,
    reports: RefCell<Vec<StreamReport>>,
}

impl Handler for FuzzHandler {
    type Upstream = Upstream;

    async fn connect(&self, request: &InboundRequest) -> Result<Connected<Upstream>, Refusal> {
        assert_eq!(
            request.peer, self.peer,
            "the handler sees the identity given to serve_established"
        );
        let mode = match request.authority.port() {
            1 => return Err(Refusal::unauthorized("port 1 is denied")),
            2 => return Err(Refusal::unavailable("port 2 is unreachable")),
            3 => return Err(Refusal::bad_request("port 3 is refused")),
            4 => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Mode::Echo
            }
            5 => Mode::Ends,
            6 => Mode::Fails,
            _ => Mode::Echo,
        };
        let mut connected = Connected::from(Upstream::new(mode));
        connected.response_headers.insert(
            "baggage",
            http::HeaderValue::from_static("k8s.namespace.name=default,service.name=echo"),
        );
        Ok(connected)
    }

    fn finished(&self, report: StreamReport) {
        self.reports.borrow_mut().push(report);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The client: what the server sent, checked frame by frame
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Seen {
    status: Option<u16>,
    data: Vec<u8>,
    ended: bool,
    reset: Option<u32>,
}

struct Client {
    input: Vec<u8>,
    frames: usize,
    /// Decodes with the largest table size the client allowed.
    hpack: Decoder,
    /// The largest frame the client allows.
    max_frame: usize,
    /// The largest stream id the client used.
    max_client_id: u32,
    partial: Option<(u32, u8, Vec<u8>)>,
    streams: HashMap<u32, Seen>,
    goaway: Option<(u32, u32)>,
    settings: bool,
    eof: bool,
}

/// Statuses the server answers with: 200, the handler's refusals and the server's own 400, and h2's
/// 431 for a header list over the limit.
const STATUSES: [u16; 5] = [200, 400, 401, 431, 503];

impl Client {
    fn stream(&mut self, id: u32) -> &mut Seen {
        self.streams.entry(id).or_default()
    }

    /// Parses what arrived, checking each frame.
    fn parse(&mut self) {
        let mut at = 0;
        while let Some((frame, len)) = Frame::parse(&self.input[at..]) {
            at += len;
            let len = frame.payload.len();
            assert!(
                len <= self.max_frame,
                "server frame of {len} bytes over the client's max {}",
                self.max_frame
            );
            assert_eq!(
                frame.stream & !MAX_WINDOW,
                0,
                "server set the reserved bit of the stream id"
            );
            self.on_frame(frame.kind, frame.flags, frame.stream, &frame.payload);
        }
        self.input.drain(..at);
    }

    fn on_frame(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8]) {
        if self.frames == 0 {
            assert!(
                kind == SETTINGS && flags & ACK == 0,
                "the server's first frame is type {kind} flags {flags:#x}, not SETTINGS"
            );
        }
        self.frames += 1;
        if let Some((open, _, _)) = &self.partial {
            assert!(
                kind == CONTINUATION && id == *open,
                "frame type {kind} on stream {id} inside a header block of stream {open}"
            );
        }
        let max_client_id = self.max_client_id;
        let client_stream = |id: u32| id % 2 == 1 && id <= max_client_id;
        match kind {
            DATA => {
                assert!(client_stream(id), "DATA on stream {id}, not one the client opened");
                let body = unpad(flags, payload).expect("bad DATA padding");
                let s = self.stream(id);
                assert_eq!(s.status, Some(200), "DATA on stream {id} without a 200 first");
                assert!(!s.ended, "DATA on stream {id} after END_STREAM");
                assert!(s.reset.is_none(), "DATA on stream {id} after RST_STREAM");
                s.data.extend_from_slice(body);
                s.ended |= flags & END_STREAM != 0;
            }
            HEADERS => {
                assert!(client_stream(id), "HEADERS on stream {id}, not one the client opened");
                let s = self.stream(id);
                assert!(s.status.is_none(), "a second header block on stream {id}");
                assert!(!s.ended && s.reset.is_none(), "HEADERS on closed stream {id}");
                let fragment = header_fragment(flags, payload).unwrap_or_else(|e| panic!("{e} on stream {id}"));
                self.partial = Some((id, flags, fragment.to_vec()));
            }
            PRIORITY_FRAME => assert!(id != 0 && payload.len() == 5, "bad PRIORITY"),
            RST_STREAM => {
                // Also on a stream the client only named (a frame on an idle or even id).
                assert!(
                    id != 0 && id <= max_client_id,
                    "RST_STREAM on stream {id}, beyond the client's"
                );
                assert_eq!(payload.len(), 4, "RST_STREAM of {} bytes", payload.len());
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                assert!(code <= MAX_ERROR_CODE, "RST_STREAM with undefined code {code:#x}");
                // A second one is allowed: an answer to frames that arrive after the first (RFC 9113 5.1).
                self.stream(id).reset.get_or_insert(code);
            }
            SETTINGS => {
                assert_eq!(id, 0, "SETTINGS on stream {id}");
                if flags & ACK != 0 {
                    assert!(payload.is_empty(), "SETTINGS ACK with a payload");
                } else {
                    assert_eq!(payload.len() % 6, 0, "SETTINGS of {} bytes", payload.len());
                    for (setting, value) in settings_pairs(payload) {
                        match setting {
                            SETTINGS_ENABLE_PUSH => assert!(value <= 1),
                            SETTINGS_INITIAL_WINDOW_SIZE => assert!(value <= MAX_WINDOW),
                            SETTINGS_MAX_FRAME_SIZE => assert!((16_384..=MAX_FRAME_SIZE).contains(&value)),
                            _ => {}
                        }
                    }
                    self.settings = true;
                }
            }
            PING => assert!(id == 0 && payload.len() == 8, "bad PING"),
            GOAWAY => {
                assert_eq!(id, 0, "GOAWAY on stream {id}");
                assert!(payload.len() >= 8, "GOAWAY of {} bytes", payload.len());
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & MAX_WINDOW;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                assert!(code <= MAX_ERROR_CODE, "GOAWAY with undefined code {code:#x}");
                if let Some((before, _)) = self.goaway {
                    assert!(last <= before, "GOAWAY last stream id grew from {before} to {last}");
                }
                self.goaway = Some((last, code));
            }
            WINDOW_UPDATE => {
                assert_eq!(payload.len(), 4, "WINDOW_UPDATE of {} bytes", payload.len());
                let increment = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & MAX_WINDOW;
                assert!(increment > 0, "WINDOW_UPDATE of 0 on stream {id}");
            }
            CONTINUATION => {
                let partial = self.partial.as_mut().expect("CONTINUATION outside a header block");
                partial.2.extend_from_slice(payload);
            }
            other => panic!("the server sent frame type {other} (PUSH_PROMISE or unknown)"),
        }
        if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
            let Some((id, flags, block)) = self.partial.take() else {
                unreachable!()
            };
            let fields = self
                .hpack
                .decode(&block)
                .unwrap_or_else(|e| panic!("undecodable header block on stream {id}: {e}"));
            let pseudo: Vec<&(String, String)> = fields.iter().filter(|(n, _)| n.starts_with(':')).collect();
            assert!(
                pseudo.len() == 1 && pseudo[0].0 == ":status" && fields[0].0 == ":status",
                "response on stream {id} without exactly one leading :status: {fields:?}"
            );
            let status: u16 = pseudo[0].1.parse().expect("numeric :status");
            assert!(STATUSES.contains(&status), "stream {id} answered with status {status}");
            if status != 200 {
                assert!(
                    flags & END_STREAM != 0,
                    "refusal {status} on stream {id} does not end it"
                );
            }
            let s = self.stream(id);
            s.status = Some(status);
            s.ended |= flags & END_STREAM != 0;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------------------------

/// `HBONE_SERVER_DEBUG=1` prints what each run saw (to look at a single input).
fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("HBONE_SERVER_DEBUG").is_some())
}

fn runtime() -> &'static tokio::runtime::Runtime {
    thread_local! {
        static RT: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a tokio runtime"),
        ));
    }
    RT.with(|rt| *rt)
}

fn options() -> ServeOptions {
    ServeOptions {
        settings: Settings::builder()
            .max_concurrent_streams(MAX_STREAMS)
            .server_max_header_list_size(2048)
            .build()
            .expect("valid settings"),
        copy: CopyConfig {
            initial_buffer: 512,
            max_buffer: 4096,
        },
        ..ServeOptions::default()
    }
}

const PING1: &[u8] = b"ping on the first good stream";
const PING2: &[u8] = b"ping on the second good stream";

fn run(input: Input) {
    if debug() {
        eprintln!("input: {input:?}");
    }
    let (fuzzed, plan) = match &input {
        Input::Frames(ops) => {
            let mut frames = Vec::new();
            for op in ops {
                op.frames(&mut frames);
            }
            let plan = Plan::of(&frames);
            let mut bytes = Vec::new();
            for f in &frames {
                f.write(&mut bytes);
            }
            (bytes, Some(plan))
        }
        // Raw bytes that split exactly into frames are checked like structured ones.
        Input::Raw(bytes) => (bytes.clone(), Frame::split(bytes).map(|frames| Plan::of(&frames))),
    };
    // The second good stream: above every id the fuzzed frames used (raw bytes: the largest id).
    let good2 = match &plan {
        Some(plan) => Some(plan.max_id + 1 + plan.max_id % 2).filter(|id| *id <= MAX_WINDOW),
        None => Some(MAX_WINDOW),
    };
    let max_client_id = good2.unwrap_or(MAX_WINDOW).max(plan.as_ref().map_or(0, |p| p.max_id));

    let peer = SpiffeId::new(PEER).expect("a valid SPIFFE ID");
    let handler = FuzzHandler {
        peer: peer.clone(),
        reports: RefCell::new(Vec::new()),
    };
    let options = options();
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (mut rd, mut wr) = tokio::io::split(client_io);
    let client = RefCell::new(Client {
        input: Vec::new(),
        frames: 0,
        hpack: Decoder::new(plan.as_ref().map_or(u32::MAX, |p| p.header_table) as usize),
        max_frame: plan
            .as_ref()
            .map_or(MAX_FRAME_SIZE, |p| p.max_frame.min(MAX_FRAME_SIZE)) as usize,
        max_client_id,
        partial: None,
        streams: HashMap::new(),
        goaway: None,
        settings: false,
        eof: false,
    });
    let changed = Notify::new();
    let reader_done = Cell::new(false);
    let timed_out = Cell::new(false);

    let outcome = runtime().block_on(async {
        let server = tokio::time::timeout(
            4 * DEADLINE,
            server::serve_established(
                server_io,
                peer.clone(),
                &options,
                &handler,
                &TokioTimer,
                std::future::pending(),
            ),
        );
        let writer = async {
            let mut hello = client_hello();
            hello.extend(good_request(1, PING1));
            if wr.write_all(&hello).await.is_ok() {
                while !client.borrow().settings && !reader_done.get() {
                    changed.notified().await;
                }
                let mut rest = Vec::new();
                Frame::new(SETTINGS, ACK, 0, Vec::new()).write(&mut rest);
                rest.extend_from_slice(&fuzzed);
                if let Some(id) = good2 {
                    rest.extend(good_request(id, PING2));
                }
                // The server may have closed already; the reader records that.
                let _ = wr.write_all(&rest).await;
            }
            while !reader_done.get() {
                changed.notified().await;
            }
            let _ = wr.shutdown().await;
        };
        let reader = async {
            let answered = |c: &Client| {
                let echoed = |id: u32, ping: &[u8]| {
                    c.streams
                        .get(&id)
                        .is_some_and(|s| s.reset.is_some() || (s.ended && s.data.len() >= ping.len()))
                };
                let requests = plan.as_ref().is_none_or(|p| {
                    p.requests.iter().all(|id| {
                        p.reset.contains(id)
                            || c.streams
                                .get(id)
                                .is_some_and(|s| s.status.is_some() || s.reset.is_some())
                    })
                });
                c.goaway.is_none() && echoed(1, PING1) && good2.is_none_or(|id| echoed(id, PING2)) && requests
            };
            let read = async {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            client.borrow_mut().eof = true;
                            return;
                        }
                        Ok(n) => {
                            let mut c = client.borrow_mut();
                            c.input.extend_from_slice(&buf[..n]);
                            c.parse();
                            if answered(&c) {
                                return;
                            }
                        }
                    }
                    changed.notify_one();
                }
            };
            if tokio::time::timeout(DEADLINE, read).await.is_err() {
                timed_out.set(true);
            }
            reader_done.set(true);
            changed.notify_one();
        };
        let (served, (), ()) = tokio::join!(server, writer, reader);
        served
    });

    let c = client.into_inner();
    if debug() {
        let mut streams: Vec<_> = c.streams.iter().collect();
        streams.sort_by_key(|(id, _)| **id);
        eprintln!(
            "served: {outcome:?}\nrequests: {:?}, good2: {good2:?}\nstreams: {streams:?}\ngoaway: {:?}, eof: {}, timed out: {}\nreports: {:?}",
            plan.as_ref().map(|p| &p.requests),
            c.goaway,
            c.eof,
            timed_out.get(),
            handler
                .reports
                .borrow()
                .iter()
                .map(|r| (
                    r.authority.as_ref().map(|a| a.to_string()),
                    r.status,
                    r.to_upstream,
                    r.from_upstream,
                    r.error.as_ref().map(|e| e.to_string())
                ))
                .collect::<Vec<_>>()
        );
    }
    let served = outcome.expect("serve_established did not return after the client closed");
    if let Ok(summary) = &served {
        assert_eq!(summary.peer, peer);
        assert_eq!(
            summary.streams,
            handler.reports.borrow().len() as u64,
            "every stream served is reported once"
        );
    }
    let error_goaway = c.goaway.is_some_and(|(_, code)| code != 0);
    if error_goaway {
        assert!(c.eof, "no close after GOAWAY {:?}", c.goaway);
    }
    let Some(plan) = plan else { return };
    if c.eof && c.goaway.is_none() {
        assert!(plan.client_goaway, "the server closed the connection without GOAWAY");
    }

    // Every complete request gets an answer, unless the connection failed or the client went away.
    if !error_goaway && !plan.client_goaway {
        for id in &plan.requests {
            if plan.reset.contains(id) || c.goaway.is_some_and(|(last, _)| *id > last) {
                continue;
            }
            let s = c.streams.get(id);
            assert!(
                s.is_some_and(|s| s.status.is_some() || s.reset.is_some()),
                "stream {id} got neither a status nor RST_STREAM: {s:?}; goaway {:?}, eof {}",
                c.goaway,
                c.eof
            );
        }
    }

    // Isolation.
    if plan.stream_level && !error_goaway && plan.requests.len() + 2 <= MAX_STREAMS as usize {
        for (id, ping) in [(Some(1), PING1), (good2, PING2)] {
            let Some(id) = id else { continue };
            let s = c.streams.get(&id);
            assert!(
                s.is_some_and(|s| s.status == Some(200) && s.ended && s.data == ping && s.reset.is_none()),
                "good stream {id} was affected by stream-level frames: {s:?}; goaway {:?}, eof {}, timed out {}",
                c.goaway,
                c.eof,
                timed_out.get()
            );
        }
    }
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("HBONE_SERVER_WRITE_SEEDS") {
            seeds::write(std::path::Path::new(&dir));
        }
    },
    |data: &[u8]| {
        let input = match data.split_first() {
            Some((mode, rest)) if mode & 1 == 1 => Input::Raw(rest.to_vec()),
            Some((_, rest)) => match Vec::<Op>::arbitrary_take_rest(arbitrary::Unstructured::new(rest)) {
                Ok(ops) => Input::Frames(ops),
                Err(_) => return,
            },
            None => return,
        };
        run(input)
    }
);

/// The seed corpus.
mod seeds {
    use super::*;

    /// The seeds are HTTP/2 frames as bytes (`Input::Raw`, checked like structured input since they split
    /// into whole frames): writing ops in `arbitrary`'s format by hand would be brittle, and the fuzzer
    /// reaches the structured form as it mutates.
    fn raw(frames: &[Frame]) -> Vec<u8> {
        let mut out = vec![1];
        for f in frames {
            f.write(&mut out);
        }
        out
    }

    fn headers(id: u32, flags: u8, fields: &[(&str, &str)]) -> Frame {
        Frame::new(HEADERS, flags, id, encode(fields))
    }

    pub(super) fn write(dir: &std::path::Path) {
        std::fs::create_dir_all(dir).expect("the seed directory");
        let ztunnel = [
            (":method", "CONNECT"),
            (":authority", "10.0.0.1:8080"),
            (
                "forwarded",
                "for=\"10.0.0.2:41234\";host=echo.default.svc.cluster.local",
            ),
            (
                "baggage",
                "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,service.name=sleep",
            ),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ];
        let block = encode(&ztunnel);
        let seeds: Vec<(&str, Vec<Frame>)> = vec![
            (
                "connect-ztunnel-metadata",
                vec![
                    headers(3, END_HEADERS, &ztunnel),
                    Frame::new(DATA, END_STREAM, 3, b"hello".to_vec()),
                ],
            ),
            (
                "refused-method",
                vec![headers(
                    3,
                    END_HEADERS,
                    &[
                        (":method", "GET"),
                        (":scheme", "https"),
                        (":path", "/"),
                        (":authority", "10.0.0.1:8080"),
                    ],
                )],
            ),
            (
                "bad-authority",
                vec![
                    headers(3, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1")]),
                    headers(5, END_HEADERS, &[(":method", "CONNECT"), (":authority", "[::1")]),
                    headers(7, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:0")]),
                ],
            ),
            (
                "non-canonical-authority",
                vec![
                    headers(
                        3,
                        END_HEADERS,
                        &[(":method", "CONNECT"), (":authority", "10.0.0.1:08080")],
                    ),
                    headers(
                        5,
                        END_HEADERS,
                        &[(":method", "CONNECT"), (":authority", "[::0001]:8080")],
                    ),
                    headers(7, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:01")]),
                ],
            ),
            (
                "refusal-ports",
                vec![
                    headers(3, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:1")]),
                    headers(5, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:2")]),
                    headers(7, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:3")]),
                    headers(9, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:4")]),
                    headers(11, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:5")]),
                    headers(13, END_HEADERS, &[(":method", "CONNECT"), (":authority", "10.0.0.1:6")]),
                ],
            ),
            (
                "reset",
                vec![
                    headers(3, END_HEADERS, &ztunnel),
                    Frame::new(DATA, 0, 3, b"cut".to_vec()),
                    Frame::new(RST_STREAM, 0, 3, 8u32.to_be_bytes().to_vec()),
                ],
            ),
            (
                "continuation-split",
                vec![
                    Frame::new(HEADERS, 0, 3, block[..20].to_vec()),
                    Frame::new(CONTINUATION, 0, 3, block[20..60].to_vec()),
                    Frame::new(CONTINUATION, END_HEADERS, 3, block[60..].to_vec()),
                    Frame::new(DATA, END_STREAM, 3, b"split".to_vec()),
                ],
            ),
            (
                "window-overflow-and-ping",
                vec![
                    headers(3, END_HEADERS, &ztunnel),
                    Frame::new(WINDOW_UPDATE, 0, 3, 1024u32.to_be_bytes().to_vec()),
                    Frame::new(PING, 0, 0, b"12345678".to_vec()),
                    Frame::new(DATA, END_STREAM, 3, b"x".to_vec()),
                ],
            ),
        ];
        for (name, frames) in seeds {
            std::fs::write(dir.join(name), raw(&frames)).expect("a seed file");
        }
    }
}
