//! The C API called from Rust through the rlib: bad arguments, identity failures, refusals and
//! unexpected peers return their status codes and messages; a files-based context; logging.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr;
use std::sync::Mutex;

use meshwire::*;
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::source::local_ca::{LocalCa, ROOT_CERT_FILE};

const SERVER_ID: &str = "spiffe://cluster.local/ns/api/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/api/sa/client";

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn last_error() -> String {
    // SAFETY: meshwire_last_error never returns NULL and the string lives until the next call.
    unsafe { CStr::from_ptr(meshwire_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn expect_error(status: MeshwireStatus, expected: MeshwireStatus, mentions: &str) {
    let message = last_error();
    assert_eq!(status, expected, "{message}");
    assert!(message.contains(mentions), "{message:?} does not mention {mentions:?}");
}

struct Context(*mut MeshwireContext);

impl Context {
    fn local_ca(dir: &std::path::Path, id: &str) -> Self {
        let mut ctx = ptr::null_mut();
        let dir = c(dir.to_str().unwrap());
        let status = unsafe { meshwire_context_new_local_ca(dir.as_ptr(), c(id).as_ptr(), &mut ctx) };
        assert_eq!(status, MeshwireStatus::MESHWIRE_OK, "{}", last_error());
        Self(ctx)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        unsafe { meshwire_context_free(self.0) };
    }
}

/// Accepts and echoes on a thread; refuses authority port 1 with 401 and port 2 with 42 (not an
/// HTTP error status, so 500).
unsafe extern "C" fn echo_accept(_: *mut c_void, _peer: *const c_char, authority: *const c_char, fd: c_int) -> c_int {
    let authority = unsafe { CStr::from_ptr(authority) }.to_str().unwrap();
    if authority.ends_with(":1") {
        return 401;
    }
    if authority.ends_with(":2") {
        return 42;
    }
    let mut stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
    });
    0
}

struct Server(*mut MeshwireServer, u16);

impl Server {
    fn start(ctx: &Context) -> Self {
        let mut server = ptr::null_mut();
        let status = unsafe {
            meshwire_server_start(
                ctx.0,
                c("127.0.0.1:0").as_ptr(),
                Some(echo_accept),
                ptr::null_mut(),
                &mut server,
            )
        };
        assert_eq!(status, MeshwireStatus::MESHWIRE_OK, "{}", last_error());
        let mut port = 0;
        assert_eq!(
            unsafe { meshwire_server_port(server, &mut port) },
            MeshwireStatus::MESHWIRE_OK
        );
        Self(server, port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { meshwire_server_free(self.0) };
    }
}

/// Dials with the given arguments; the fd as a stream on success.
fn dial(
    ctx: &Context,
    peer: &str,
    authority: &str,
    expected: &[&str],
    headers: &[(&str, &str)],
) -> Result<UnixStream, MeshwireStatus> {
    let ids: Vec<CString> = expected.iter().map(|s| c(s)).collect();
    let id_ptrs: Vec<*const c_char> = ids.iter().map(|s| s.as_ptr()).collect();
    let strings: Vec<(CString, CString)> = headers.iter().map(|(n, v)| (c(n), c(v))).collect();
    let headers: Vec<MeshwireHeader> = strings
        .iter()
        .map(|(n, v)| MeshwireHeader {
            name: n.as_ptr(),
            value: v.as_ptr(),
        })
        .collect();
    let mut fd = -1;
    let status = unsafe {
        meshwire_dial(
            ctx.0,
            c(peer).as_ptr(),
            c(authority).as_ptr(),
            id_ptrs.as_ptr(),
            id_ptrs.len(),
            headers.as_ptr(),
            headers.len(),
            &mut fd,
        )
    };
    if status != MeshwireStatus::MESHWIRE_OK {
        assert_eq!(fd, -1, "out_fd written on failure");
        return Err(status);
    }
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn echo_through(mut stream: UnixStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    assert_eq!(back, message);
}

/// The arguments of one `meshwire_dial` call, as C passes them.
#[derive(Clone, Copy)]
struct DialArgs {
    context: *const MeshwireContext,
    peer: *const c_char,
    authority: *const c_char,
    ids: *const *const c_char,
    ids_len: usize,
    metadata: *const MeshwireHeader,
    metadata_len: usize,
    out_fd: *mut c_int,
}

impl DialArgs {
    /// Calls `meshwire_dial` with these arguments.
    ///
    /// # Safety
    ///
    /// Each pointer is NULL or valid for the call, as `meshwire_dial` asks.
    unsafe fn call(self) -> MeshwireStatus {
        unsafe {
            meshwire_dial(
                self.context,
                self.peer,
                self.authority,
                self.ids,
                self.ids_len,
                self.metadata,
                self.metadata_len,
                self.out_fd,
            )
        }
    }
}

#[test]
fn null_arguments_are_errors_naming_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    let ca = c(dir.path().to_str().unwrap());
    let id = c(CLIENT_ID);
    let mut ctx = ptr::null_mut();
    unsafe {
        let s = meshwire_context_new_local_ca(ptr::null(), id.as_ptr(), &mut ctx);
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, "ca_dir is NULL");
        let s = meshwire_context_new_local_ca(ca.as_ptr(), ptr::null(), &mut ctx);
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, "spiffe_id is NULL");
        let s = meshwire_context_new_local_ca(ca.as_ptr(), id.as_ptr(), ptr::null_mut());
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, "out is NULL");
        let s = meshwire_context_new_files(ptr::null(), id.as_ptr(), id.as_ptr(), &mut ctx);
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, "cert_chain_path is NULL");
        assert!(ctx.is_null());
        let mut out: *const c_char = ptr::null();
        expect_error(
            meshwire_context_identity(ptr::null(), &mut out),
            MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT,
            "context",
        );
        let mut port = 0;
        expect_error(
            meshwire_server_port(ptr::null(), &mut port),
            MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT,
            "server",
        );
        let mut fd = -1;
        let no_context = DialArgs {
            context: ptr::null(),
            peer: id.as_ptr(),
            authority: id.as_ptr(),
            ids: ptr::null(),
            ids_len: 0,
            metadata: ptr::null(),
            metadata_len: 0,
            out_fd: &mut fd,
        };
        expect_error(
            no_context.call(),
            MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT,
            "context is NULL",
        );
        meshwire_context_free(ptr::null_mut());
        meshwire_server_free(ptr::null_mut());
    }

    let ctx = Context::local_ca(dir.path(), CLIENT_ID);
    let peer = c("127.0.0.1:15008");
    let authority = c("10.0.0.1:80");
    let expected = [c(SERVER_ID)];
    let ids = [expected[0].as_ptr()];
    let mut fd = -1;
    let null_id = [ptr::null()];
    let header = [MeshwireHeader {
        name: ptr::null(),
        value: peer.as_ptr(),
    }];
    let valid = DialArgs {
        context: ctx.0,
        peer: peer.as_ptr(),
        authority: authority.as_ptr(),
        ids: ids.as_ptr(),
        ids_len: 1,
        metadata: ptr::null(),
        metadata_len: 0,
        out_fd: &mut fd,
    };
    let cases = [
        (
            DialArgs {
                peer: ptr::null(),
                ..valid
            },
            "peer_address is NULL",
        ),
        (
            DialArgs {
                authority: ptr::null(),
                ..valid
            },
            "authority is NULL",
        ),
        (
            DialArgs {
                ids: ptr::null(),
                ..valid
            },
            "peer_identities",
        ),
        (
            DialArgs {
                ids: null_id.as_ptr(),
                ..valid
            },
            "peer_identities[0] is NULL",
        ),
        (
            DialArgs {
                metadata_len: 2,
                ..valid
            },
            "metadata",
        ),
        (
            DialArgs {
                metadata: header.as_ptr(),
                metadata_len: 1,
                ..valid
            },
            "metadata[0].name is NULL",
        ),
        (
            DialArgs {
                out_fd: ptr::null_mut(),
                ..valid
            },
            "out_fd is NULL",
        ),
    ];
    unsafe {
        for (args, mentions) in cases {
            expect_error(args.call(), MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, mentions);
        }
        let s = meshwire_dial_async(
            ctx.0,
            peer.as_ptr(),
            authority.as_ptr(),
            ids.as_ptr(),
            1,
            ptr::null(),
            0,
            None,
            ptr::null_mut(),
        );
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, "callback is NULL");
        let mut server = ptr::null_mut();
        let s = meshwire_server_start(ctx.0, peer.as_ptr(), None, ptr::null_mut(), &mut server);
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, "callback is NULL");
        let s = meshwire_server_start(ctx.0, ptr::null(), Some(echo_accept), ptr::null_mut(), &mut server);
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, "listen_address is NULL");
        assert!(server.is_null());
    }
    assert_eq!(fd, -1);
}

#[test]
fn malformed_arguments_are_invalid_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = ptr::null_mut();
    let ca = c(dir.path().to_str().unwrap());
    unsafe {
        let s = meshwire_context_new_local_ca(ca.as_ptr(), c("web").as_ptr(), &mut ctx);
        expect_error(s, MeshwireStatus::MESHWIRE_ERR_INVALID_ARGUMENT, "\"web\"");
        let not_utf8 = CString::from_vec_with_nul(vec![b's', 0xff, 0]).unwrap();
        let s = meshwire_context_new_local_ca(ca.as_ptr(), not_utf8.as_ptr(), &mut ctx);
        expect_error(
            s,
            MeshwireStatus::MESHWIRE_ERR_INVALID_ARGUMENT,
            "spiffe_id is not valid UTF-8",
        );
        expect_error(
            meshwire_set_log_level(9),
            MeshwireStatus::MESHWIRE_ERR_INVALID_ARGUMENT,
            "log level 9",
        );
    }
    let ctx = Context::local_ca(dir.path(), CLIENT_ID);
    /// Peer, authority, expected identities, metadata headers, and what the message mentions.
    type Case<'a> = (&'a str, &'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (
            "localhost",
            "10.0.0.1:80",
            &[SERVER_ID],
            &[],
            "\"localhost\" is not an ip:port",
        ),
        ("127.0.0.1:99999", "10.0.0.1:80", &[SERVER_ID], &[], "is not an ip:port"),
        (
            "127.0.0.1:15008",
            "10.0.0.1",
            &[SERVER_ID],
            &[],
            "authority \"10.0.0.1\"",
        ),
        ("127.0.0.1:15008", "10.0.0.1:0", &[SERVER_ID], &[], "authority"),
        ("127.0.0.1:15008", "10.0.0.1:80", &[], &[], "no expected peer identity"),
        (
            "127.0.0.1:15008",
            "10.0.0.1:80",
            &["server"],
            &[],
            "expected peer identity",
        ),
        (
            "127.0.0.1:15008",
            "10.0.0.1:80",
            &[SERVER_ID],
            &[("x-custom", "1")],
            "unknown metadata header \"x-custom\"",
        ),
        (
            "127.0.0.1:15008",
            "10.0.0.1:80",
            &[SERVER_ID],
            &[("traceparent", "nonsense")],
            "traceparent",
        ),
        (
            "127.0.0.1:15008",
            "10.0.0.1:80",
            &[SERVER_ID],
            &[("x-forwarded-network", "two words")],
            "x-forwarded-network",
        ),
    ];
    for (peer, authority, expected, headers, mentions) in cases {
        let result = dial(&ctx, peer, authority, expected, headers);
        expect_error(
            result.unwrap_err(),
            MeshwireStatus::MESHWIRE_ERR_INVALID_ARGUMENT,
            mentions,
        );
    }
    let mut server = ptr::null_mut();
    let s = unsafe {
        meshwire_server_start(
            ctx.0,
            c("0.0.0.0").as_ptr(),
            Some(echo_accept),
            ptr::null_mut(),
            &mut server,
        )
    };
    expect_error(
        s,
        MeshwireStatus::MESHWIRE_ERR_INVALID_ARGUMENT,
        "listen address \"0.0.0.0\"",
    );
    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = c(&taken.local_addr().unwrap().to_string());
    let s = unsafe { meshwire_server_start(ctx.0, addr.as_ptr(), Some(echo_accept), ptr::null_mut(), &mut server) };
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_IO, "listen on 127.0.0.1:");
    assert!(server.is_null());
}

#[test]
fn identity_sources_that_cannot_deliver_are_identity_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = c(missing.to_str().unwrap());
    let mut ctx = ptr::null_mut();
    let s = unsafe { meshwire_context_new_files(missing.as_ptr(), missing.as_ptr(), missing.as_ptr(), &mut ctx) };
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_IDENTITY, "missing.pem");
    // A CA directory that is a file.
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let file = c(file.to_str().unwrap());
    let s = unsafe { meshwire_context_new_local_ca(file.as_ptr(), c(CLIENT_ID).as_ptr(), &mut ctx) };
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_IDENTITY, "local CA");
    assert!(ctx.is_null());
}

#[test]
fn refusals_unexpected_peers_and_unreachable_peers_have_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server_ctx = Context::local_ca(dir.path(), SERVER_ID);
    let client_ctx = Context::local_ca(dir.path(), CLIENT_ID);
    let server = Server::start(&server_ctx);
    let peer = server.addr();

    echo_through(
        dial(&client_ctx, &peer, "10.0.0.1:80", &[SERVER_ID], &[]).unwrap(),
        b"ping",
    );

    let s = dial(&client_ctx, &peer, "10.0.0.1:1", &[SERVER_ID], &[]).unwrap_err();
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_REFUSED, "401");
    let s = dial(&client_ctx, &peer, "10.0.0.1:2", &[SERVER_ID], &[]).unwrap_err();
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_REFUSED, "500");

    let unknown = "spiffe://cluster.local/ns/api/sa/unknown";
    let s = dial(&client_ctx, &peer, "10.0.0.1:80", &[unknown], &[]).unwrap_err();
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_PEER_IDENTITY, unknown);

    // A server of another trust domain's CA: its chain is not trusted.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign_ctx = Context::local_ca(foreign_dir.path(), "spiffe://example.org/ns/api/sa/server");
    let foreign = Server::start(&foreign_ctx);
    let s = dial(
        &client_ctx,
        &foreign.addr(),
        "10.0.0.1:80",
        &["spiffe://example.org/ns/api/sa/server"],
        &[],
    )
    .unwrap_err();
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_TLS, "TLS");

    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let s = dial(&client_ctx, &closed.to_string(), "10.0.0.1:80", &[SERVER_ID], &[]).unwrap_err();
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_CONNECT, &closed.to_string());

    // Something that is not HBONE: a TCP server that closes every connection.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_addr = plain.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in plain.incoming().take(1) {
            drop(conn);
        }
    });
    let s = dial(&client_ctx, &plain_addr.to_string(), "10.0.0.1:80", &[SERVER_ID], &[]).unwrap_err();
    expect_error(s, MeshwireStatus::MESHWIRE_ERR_TLS, "TLS");
}

#[test]
fn a_files_context_dials_a_local_ca_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let server_ctx = Context::local_ca(&ca_dir, SERVER_ID);
    let server = Server::start(&server_ctx);

    // Certificate files written by "an agent", from the same root.
    let ca = LocalCa::load_or_create(&ca_dir, TrustDomain::new("cluster.local").unwrap()).unwrap();
    let creds = ca.issue(&SpiffeId::new(CLIENT_ID).unwrap()).unwrap();
    let chain = dir.path().join("chain.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&chain, creds.svid.chain_pem()).unwrap();
    std::fs::write(&key, creds.svid.private_key_pem()).unwrap();
    let bundle = ca_dir.join(ROOT_CERT_FILE);
    let [chain, key, bundle] = [chain, key, bundle].map(|p| c(p.to_str().unwrap()));
    let mut raw = ptr::null_mut();
    let s = unsafe { meshwire_context_new_files(chain.as_ptr(), key.as_ptr(), bundle.as_ptr(), &mut raw) };
    assert_eq!(s, MeshwireStatus::MESHWIRE_OK, "{}", last_error());
    let client_ctx = Context(raw);
    let mut identity: *const c_char = ptr::null();
    assert_eq!(
        unsafe { meshwire_context_identity(client_ctx.0, &mut identity) },
        MeshwireStatus::MESHWIRE_OK
    );
    assert_eq!(unsafe { CStr::from_ptr(identity) }.to_str().unwrap(), CLIENT_ID);

    let message: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    echo_through(
        dial(
            &client_ctx,
            &server.addr(),
            "10.0.0.1:80",
            &[SERVER_ID],
            &[("Forwarded", "for=10.0.0.2")],
        )
        .unwrap(),
        &message,
    );
}

static LOGS: Mutex<Vec<(MeshwireLogLevel, String, String)>> = Mutex::new(Vec::new());

unsafe extern "C" fn collect_log(
    _: *mut c_void,
    level: MeshwireLogLevel,
    target: *const c_char,
    message: *const c_char,
) {
    let target = unsafe { CStr::from_ptr(target) }.to_string_lossy().into_owned();
    let message = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    LOGS.lock().unwrap().push((level, target, message));
}

#[test]
fn log_callback_receives_messages_at_its_level_and_version_and_names_are_static() {
    let version = unsafe { CStr::from_ptr(meshwire_version()) }.to_str().unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let name = |s: c_int| unsafe { CStr::from_ptr(meshwire_status_name(s)) }.to_str().unwrap();
    assert_eq!(name(0), "MESHWIRE_OK");
    assert_eq!(
        name(MeshwireStatus::MESHWIRE_ERR_PEER_IDENTITY as c_int),
        "MESHWIRE_ERR_PEER_IDENTITY"
    );
    assert_eq!(name(-3), "MESHWIRE_UNKNOWN_STATUS");

    let s = unsafe {
        meshwire_set_log_callback(
            Some(collect_log),
            ptr::null_mut(),
            MeshwireLogLevel::MESHWIRE_LOG_INFO as c_int,
        )
    };
    assert_eq!(s, MeshwireStatus::MESHWIRE_OK, "{}", last_error());
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::local_ca(dir.path(), SERVER_ID);
    let server = Server::start(&ctx);
    let port = server.1;
    drop(server);
    assert_eq!(
        unsafe { meshwire_set_log_callback(None, ptr::null_mut(), 0) },
        MeshwireStatus::MESHWIRE_OK
    );
    let logs = LOGS.lock().unwrap();
    let listening = logs
        .iter()
        .find(|(_, _, m)| m.contains("HBONE server listening") && m.contains(&format!("127.0.0.1:{port}")))
        .unwrap_or_else(|| panic!("no listening message in {logs:?}"));
    assert_eq!(listening.0, MeshwireLogLevel::MESHWIRE_LOG_INFO);
    assert!(listening.1.starts_with("meshwire"), "{listening:?}");
    assert!(
        logs.iter()
            .all(|(level, _, _)| *level <= MeshwireLogLevel::MESHWIRE_LOG_INFO),
        "{logs:?}"
    );
}

type DialOutcomes = Mutex<Vec<(MeshwireStatus, c_int, String)>>;

unsafe extern "C" fn record_dial(user_data: *mut c_void, status: MeshwireStatus, fd: c_int, error: *const c_char) {
    let outcomes = unsafe { &*(user_data as *const DialOutcomes) };
    let error = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    outcomes.lock().unwrap().push((status, fd, error));
}

/// Answers after a while, with 503.
unsafe extern "C" fn slow_refusal(_: *mut c_void, _: *const c_char, _: *const c_char, _: c_int) -> c_int {
    std::thread::sleep(std::time::Duration::from_millis(1500));
    503
}

fn dial_async(ctx: &Context, peer: &str, outcomes: &DialOutcomes) -> MeshwireStatus {
    let expected = c(SERVER_ID);
    let ids = [expected.as_ptr()];
    unsafe {
        meshwire_dial_async(
            ctx.0,
            c(peer).as_ptr(),
            c("10.0.0.1:80").as_ptr(),
            ids.as_ptr(),
            1,
            ptr::null(),
            0,
            Some(record_dial),
            outcomes as *const DialOutcomes as *mut c_void,
        )
    }
}

#[test]
fn an_async_dial_completes_once_also_when_its_context_is_freed_first() {
    let dir = tempfile::tempdir().unwrap();
    let server_ctx = Context::local_ca(dir.path(), SERVER_ID);
    let client_ctx = Context::local_ca(dir.path(), CLIENT_ID);

    // Success: the fd is the callback's.
    let echo = Server::start(&server_ctx);
    let outcomes = DialOutcomes::default();
    assert_eq!(
        dial_async(&client_ctx, &echo.addr(), &outcomes),
        MeshwireStatus::MESHWIRE_OK
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while outcomes.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the dial callback was not called");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, fd, error) = outcomes.lock().unwrap().pop().unwrap();
    assert_eq!(status, MeshwireStatus::MESHWIRE_OK, "{error}");
    echo_through(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }), b"async");

    // The context is freed while the server has not answered: the callback reports it, once.
    let mut slow = ptr::null_mut();
    let s = unsafe {
        meshwire_server_start(
            server_ctx.0,
            c("127.0.0.1:0").as_ptr(),
            Some(slow_refusal),
            ptr::null_mut(),
            &mut slow,
        )
    };
    assert_eq!(s, MeshwireStatus::MESHWIRE_OK);
    let slow = Server(slow, {
        let mut port = 0;
        unsafe { meshwire_server_port(slow, &mut port) };
        port
    });
    assert_eq!(
        dial_async(&client_ctx, &slow.addr(), &outcomes),
        MeshwireStatus::MESHWIRE_OK
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(client_ctx);
    let outcomes = outcomes.into_inner().unwrap();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let (status, fd, error) = &outcomes[0];
    assert_eq!(*status, MeshwireStatus::MESHWIRE_ERR_RUNTIME, "{error}");
    assert_eq!(*fd, -1);
    assert!(error.contains("freed"), "{error}");
}
