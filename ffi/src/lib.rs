//! `libmeshwire`: a C API for opening and accepting HBONE tunnels (HTTP/2 CONNECT over SPIFFE
//! mutual TLS).
//!
//! The C header is `ffi/include/meshwire.h`, generated from this crate by cbindgen (see
//! `ffi/README.md`). A C program creates a context (meshwire's own runtime threads and one SPIFFE
//! identity), then dials destinations through HBONE and gets back a connected file descriptor, or
//! starts a server whose callback receives each accepted tunnel as a file descriptor. The file
//! descriptor is one end of a Unix socket pair whose other end meshwire copies to and from the
//! tunnel, so C code uses its own event loop, blocking IO, or hands the descriptor to another language.
//!
//! Every exported function catches panics and reports failures through a [`MeshwireStatus`] and a
//! thread-local message ([`meshwire_last_error`]); NULL and malformed arguments are errors.
//!
//! The Rust functions are the C functions; the Rust integration tests call them directly.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::IntoRawFd;
use std::sync::Arc;

mod client;
mod context;
mod error;
mod log;
mod server;

pub use context::MeshwireContext;
pub use error::MeshwireStatus;
pub use log::{MeshwireLogCallback, MeshwireLogLevel};
pub use server::{MeshwireAcceptCallback, MeshwireServer};

use error::{Failure, boundary, boundary_void, slice_arg, str_arg, write_out};

/// A CONNECT metadata header for `meshwire_dial`: `name` is one of `forwarded`, `baggage`,
/// `traceparent`, `x-forwarded-network` (any case); `value` its value as sent on the wire.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MeshwireHeader {
    /// The header name (NUL-terminated).
    pub name: *const c_char,
    /// The header value (NUL-terminated).
    pub value: *const c_char,
}

/// The completion callback of `meshwire_dial_async`, called exactly once on one of meshwire's
/// threads. On success `status` is `MESHWIRE_OK` and `fd` the connected file descriptor, which the
/// callback now owns (close it when done). On failure `fd` is -1 and `error_message` (valid during
/// the call only) says why.
pub type MeshwireDialCallback = Option<
    unsafe extern "C" fn(user_data: *mut c_void, status: MeshwireStatus, fd: c_int, error_message: *const c_char),
>;

/// The version of libmeshwire, such as "0.1.0".
///
/// Thread-safety: callable from any thread. The string is static: never free it.
#[unsafe(no_mangle)]
pub extern "C" fn meshwire_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The name of a status code, such as "MESHWIRE_ERR_REFUSED", or "MESHWIRE_UNKNOWN_STATUS" for a
/// value that is not one.
///
/// Thread-safety: callable from any thread. The string is static: never free it.
#[unsafe(no_mangle)]
pub extern "C" fn meshwire_status_name(status: c_int) -> *const c_char {
    use MeshwireStatus::*;
    const ALL: [MeshwireStatus; 13] = [
        MESHWIRE_OK,
        MESHWIRE_ERR_NULL_ARGUMENT,
        MESHWIRE_ERR_INVALID_ARGUMENT,
        MESHWIRE_ERR_IDENTITY,
        MESHWIRE_ERR_CONNECT,
        MESHWIRE_ERR_REFUSED,
        MESHWIRE_ERR_TLS,
        MESHWIRE_ERR_PEER_IDENTITY,
        MESHWIRE_ERR_PROTOCOL,
        MESHWIRE_ERR_TIMEOUT,
        MESHWIRE_ERR_IO,
        MESHWIRE_ERR_RUNTIME,
        MESHWIRE_ERR_PANIC,
    ];
    ALL.iter()
        .find(|s| **s as c_int == status)
        .map_or(c"MESHWIRE_UNKNOWN_STATUS".as_ptr(), |s| s.name().as_ptr())
}

/// The message describing the last failed meshwire call on the calling thread, or "" if the last
/// call succeeded. Never NULL.
///
/// Thread-safety: callable from any thread; each thread has its own last error. The pointer stays
/// valid until the next meshwire call on the same thread: copy the message to keep it. Never free it.
#[unsafe(no_mangle)]
pub extern "C" fn meshwire_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// Sends meshwire's log messages at `level` and below (a `meshwire_log_level`) to `callback`;
/// a NULL `callback` turns logging off. The callback runs on whichever thread logged, meshwire's or
/// the caller's, possibly on several at once; `user_data` is passed back unchanged.
///
/// Installs meshwire's log forwarding as the process's global Rust `tracing` subscriber on first
/// use (`MESHWIRE_ERR_RUNTIME` if the process already has one). Returns once no call to the previous
/// callback is running, so its `user_data` may then be freed.
///
/// Thread-safety: callable from any thread, but not from inside the log callback (`MESHWIRE_ERR_RUNTIME`).
///
/// # Safety
/// `callback` and `user_data` stay valid until the callback is replaced; `user_data` may be used
/// from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_set_log_callback(
    callback: MeshwireLogCallback,
    user_data: *mut c_void,
    level: c_int,
) -> MeshwireStatus {
    boundary(|| {
        let level = MeshwireLogLevel::from_c(level)?;
        log::set_callback(callback.map(|f| (f, user_data)), level)
    })
}

/// Changes the log level (a `meshwire_log_level`) of the installed log callback.
///
/// Thread-safety: callable from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn meshwire_set_log_level(level: c_int) -> MeshwireStatus {
    boundary(|| {
        log::set_level(MeshwireLogLevel::from_c(level)?);
        Ok(())
    })
}

/// Creates a context whose identity `spiffe_id` (such as
/// "spiffe://cluster.local/ns/default/sa/web") is issued by meshwire's built-in local CA, whose root
/// is kept in the directory `ca_dir` (created, with a new root for the SPIFFE ID's trust domain, if
/// it holds none). Contexts sharing a CA directory trust each other. The certificate is renewed
/// before it expires for as long as the context lives.
///
/// On success `*out` is the new context; free it with `meshwire_context_free`. On failure `*out` is
/// left unchanged.
///
/// Thread-safety: callable from any thread, but not from a meshwire callback.
///
/// # Safety
/// The strings are NULL or NUL-terminated; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_context_new_local_ca(
    ca_dir: *const c_char,
    spiffe_id: *const c_char,
    out: *mut *mut MeshwireContext,
) -> MeshwireStatus {
    boundary(|| {
        // SAFETY: the caller guarantees NULL or NUL-terminated strings.
        let ca_dir = unsafe { str_arg(ca_dir, "ca_dir") }?;
        // SAFETY: as above.
        let spiffe_id = unsafe { str_arg(spiffe_id, "spiffe_id") }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let context = MeshwireContext::local_ca(ca_dir, spiffe_id)?;
        // SAFETY: `out` is not NULL and the caller guarantees it is valid for writes.
        unsafe { write_out(out, Box::into_raw(Box::new(context)), "out") }
    })
}

/// Creates a context whose identity is the X.509-SVID in `cert_chain_path` (PEM, leaf first) with
/// its key in `private_key_path` (PEM), verified against the roots in `trust_bundle_path` (PEM).
/// The files are read again every few seconds: a valid change replaces the certificate, an invalid
/// one is logged and ignored.
///
/// On success `*out` is the new context; free it with `meshwire_context_free`.
///
/// Thread-safety: callable from any thread, but not from a meshwire callback.
///
/// # Safety
/// The strings are NULL or NUL-terminated; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_context_new_files(
    cert_chain_path: *const c_char,
    private_key_path: *const c_char,
    trust_bundle_path: *const c_char,
    out: *mut *mut MeshwireContext,
) -> MeshwireStatus {
    boundary(|| {
        // SAFETY: the caller guarantees NULL or NUL-terminated strings.
        let chain = unsafe { str_arg(cert_chain_path, "cert_chain_path") }?;
        // SAFETY: as above.
        let key = unsafe { str_arg(private_key_path, "private_key_path") }?;
        // SAFETY: as above.
        let bundle = unsafe { str_arg(trust_bundle_path, "trust_bundle_path") }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let context = MeshwireContext::files(chain, key, bundle)?;
        // SAFETY: `out` is not NULL and the caller guarantees it is valid for writes.
        unsafe { write_out(out, Box::into_raw(Box::new(context)), "out") }
    })
}

/// Sets `*out` to the SPIFFE ID of the context's identity. The string belongs to the context:
/// valid until `meshwire_context_free`, never free it.
///
/// Thread-safety: callable from any thread.
///
/// # Safety
/// `context` is NULL or a live context; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_context_identity(
    context: *const MeshwireContext,
    out: *mut *const c_char,
) -> MeshwireStatus {
    boundary(|| {
        // SAFETY: the caller guarantees NULL or a live context.
        let context = unsafe { context.as_ref() }.ok_or_else(|| Failure::null("context"))?;
        // SAFETY: the caller guarantees NULL or a valid pointer.
        unsafe { write_out(out, context.identity.as_ptr(), "out") }
    })
}

/// Frees a context: stops meshwire's threads, and with them every tunnel, server and pending dial
/// of the context (pending `meshwire_dial_async` callbacks are called with `MESHWIRE_ERR_RUNTIME`).
/// Waits up to 5 seconds for running callbacks to return. Free the context's servers first.
/// NULL is ignored.
///
/// Thread-safety: callable from any thread, once per context, when no other thread uses the context.
/// Do not call it from a meshwire callback (it then cannot wait for meshwire's threads).
///
/// # Safety
/// `context` is NULL or a context from `meshwire_context_new_*`, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_context_free(context: *mut MeshwireContext) {
    boundary_void(|| {
        if context.is_null() {
            return;
        }
        // SAFETY: not NULL; the caller guarantees it came from Box::into_raw in meshwire_context_new_*
        // and is freed once.
        let context = unsafe { Box::from_raw(context) };
        context.shutdown();
    });
}

/// The validated arguments of a dial.
///
/// # Safety
/// As for `meshwire_dial`.
unsafe fn dial_args(
    peer_address: *const c_char,
    authority: *const c_char,
    peer_identities: *const *const c_char,
    peer_identities_len: usize,
    metadata: *const MeshwireHeader,
    metadata_len: usize,
) -> Result<client::Dial, Failure> {
    // SAFETY: the caller guarantees NULL or NUL-terminated strings.
    let peer = unsafe { str_arg(peer_address, "peer_address") }?;
    // SAFETY: as above.
    let authority = unsafe { str_arg(authority, "authority") }?;
    // SAFETY: the caller guarantees `peer_identities_len` valid elements.
    let ids = unsafe { slice_arg(peer_identities, peer_identities_len, "peer_identities") }?;
    let ids = ids
        .iter()
        .enumerate()
        // SAFETY: each element is NULL or a NUL-terminated string.
        .map(|(i, id)| unsafe { str_arg(*id, &format!("peer_identities[{i}]")) })
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: the caller guarantees `metadata_len` valid elements.
    let headers = unsafe { slice_arg(metadata, metadata_len, "metadata") }?;
    let headers = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            // SAFETY: each name and value is NULL or a NUL-terminated string.
            let name = unsafe { str_arg(h.name, &format!("metadata[{i}].name")) }?;
            // SAFETY: as above.
            let value = unsafe { str_arg(h.value, &format!("metadata[{i}].value")) }?;
            Ok((name, value))
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    client::Dial::parse(peer, authority, &ids, &headers)
}

/// Dials `authority` (the destination, `ip:port` or `hostname:port`) through the HBONE peer at
/// `peer_address` (`ip:port`, usually port 15008), requiring the peer's SPIFFE ID to be one of the
/// `peer_identities_len` strings of `peer_identities`, and sending the `metadata_len` headers of
/// `metadata` (may be NULL when `metadata_len` is 0) with the CONNECT. Blocks until the tunnel is
/// open, refused, or failed (at most 30 seconds).
///
/// On success `*out_fd` is a connected stream socket (blocking, close-on-exec), one end of a socket
/// pair that meshwire copies to and from the tunnel. The caller owns it and closes it when done;
/// `shutdown(fd, SHUT_WR)` ends the tunnel's sending direction (END_STREAM) and end of file from
/// `read` means the peer finished sending. On failure `*out_fd` is left unchanged:
/// `MESHWIRE_ERR_CONNECT` (TCP), `MESHWIRE_ERR_TLS`, `MESHWIRE_ERR_PEER_IDENTITY` (the peer is not
/// one of the expected identities), `MESHWIRE_ERR_REFUSED` (the peer answered 400, 401, 503, ...;
/// the message names the status), `MESHWIRE_ERR_TIMEOUT`, `MESHWIRE_ERR_INVALID_ARGUMENT`, ...
///
/// Every dial makes its own TLS connection, which closes when the tunnel ends.
///
/// Thread-safety: callable from any thread, concurrently, on the same context.
///
/// # Safety
/// `context` is NULL or a live context; the strings are NULL or NUL-terminated; the arrays are NULL
/// or hold their stated number of elements; `out_fd` is NULL or valid for writing an int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_dial(
    context: *const MeshwireContext,
    peer_address: *const c_char,
    authority: *const c_char,
    peer_identities: *const *const c_char,
    peer_identities_len: usize,
    metadata: *const MeshwireHeader,
    metadata_len: usize,
    out_fd: *mut c_int,
) -> MeshwireStatus {
    boundary(|| {
        // SAFETY: the caller guarantees NULL or a live context.
        let context = unsafe { context.as_ref() }.ok_or_else(|| Failure::null("context"))?;
        // SAFETY: the caller's guarantees are those of dial_args.
        let dial = unsafe {
            dial_args(
                peer_address,
                authority,
                peer_identities,
                peer_identities_len,
                metadata,
                metadata_len,
            )
        }?;
        if out_fd.is_null() {
            return Err(Failure::null("out_fd"));
        }
        let shared = context.shared.clone();
        let fd = context.shared.wait(client::dial(shared, dial))??;
        // SAFETY: `out_fd` is not NULL and the caller guarantees it is valid for writes.
        unsafe { write_out(out_fd, fd.into_raw_fd(), "out_fd") }
    })
}

/// Calls a dial callback once: with the outcome, or with `MESHWIRE_ERR_RUNTIME` when dropped
/// unused (the context was freed before the dial finished).
struct Completion {
    callback: unsafe extern "C" fn(*mut c_void, MeshwireStatus, c_int, *const c_char),
    user_data: server::UserData,
    done: bool,
}

impl Completion {
    fn call(&mut self, status: MeshwireStatus, fd: c_int, message: &str) {
        self.done = true;
        let message = std::ffi::CString::new(message.replace('\0', "\\0")).unwrap_or_default();
        // SAFETY: the caller of meshwire_dial_async guarantees the callback and user_data stay valid
        // until the callback was called; the message outlives the call.
        unsafe { (self.callback)(self.user_data.0, status, fd, message.as_ptr()) };
    }

    fn complete(mut self, result: Result<std::os::fd::OwnedFd, Failure>) {
        match result {
            Ok(fd) => self.call(MeshwireStatus::MESHWIRE_OK, fd.into_raw_fd(), ""),
            Err(e) => self.call(e.status, -1, &e.message),
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.done {
            self.call(
                MeshwireStatus::MESHWIRE_ERR_RUNTIME,
                -1,
                "the meshwire context was freed before the dial finished",
            );
        }
    }
}

/// Dials like `meshwire_dial` without blocking: returns at once, and `callback` is called exactly
/// once with the outcome, on one of meshwire's threads (where it may block, and may call any
/// meshwire function but `meshwire_context_free` of this context). The arguments are checked
/// before returning: if this returns an error, the callback is never called. The strings and
/// arrays may be freed as soon as this returns.
///
/// Thread-safety: callable from any thread, concurrently, on the same context, and from callbacks.
///
/// # Safety
/// As for `meshwire_dial`; `callback` and `user_data` stay valid until the callback was called, and
/// `user_data` may be used from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_dial_async(
    context: *const MeshwireContext,
    peer_address: *const c_char,
    authority: *const c_char,
    peer_identities: *const *const c_char,
    peer_identities_len: usize,
    metadata: *const MeshwireHeader,
    metadata_len: usize,
    callback: MeshwireDialCallback,
    user_data: *mut c_void,
) -> MeshwireStatus {
    boundary(|| {
        // SAFETY: the caller guarantees NULL or a live context.
        let context = unsafe { context.as_ref() }.ok_or_else(|| Failure::null("context"))?;
        // SAFETY: the caller's guarantees are those of dial_args.
        let dial = unsafe {
            dial_args(
                peer_address,
                authority,
                peer_identities,
                peer_identities_len,
                metadata,
                metadata_len,
            )
        }?;
        let callback = callback.ok_or_else(|| Failure::null("callback"))?;
        let completion = Completion {
            callback,
            user_data: server::UserData(user_data),
            done: false,
        };
        let shared: Arc<context::Shared> = context.shared.clone();
        context.shared.handle.spawn(async move {
            let result = client::dial(shared, dial).await;
            // On a blocking thread: the callback may block without stalling meshwire's workers.
            let _ = tokio::task::spawn_blocking(move || completion.complete(result)).await;
        });
        Ok(())
    })
}

/// Starts an HBONE server on `listen_address` (`ip:port`; port 0 picks a free port, see
/// `meshwire_server_port`). It presents the context's identity, accepts clients of the same trust
/// domain, and calls `callback` for each CONNECT with the client's verified SPIFFE ID, the
/// authority it asked for, and a file descriptor bridged to the tunnel. The callback returns 0 to
/// accept (it then owns the fd and closes it when done), or an HTTP status from 400 to 599 to
/// refuse with (meshwire then closes the fd); any other value refuses with 500.
///
/// Callbacks run on meshwire's threads, several at once for concurrent tunnels, and may block
/// (each on its own thread) though the client waits for the answer. A callback must not read from
/// the fd before returning (the tunnel is connected only once it accepted): hand the fd to another
/// thread or an event loop.
///
/// On success `*out` is the server; stop and free it with `meshwire_server_free`.
///
/// Thread-safety: callable from any thread.
///
/// # Safety
/// `context` is NULL or a live context that outlives the server; `listen_address` NULL or
/// NUL-terminated; `callback` and `user_data` valid until `meshwire_server_free` returned, and
/// `user_data` usable from any thread; `out` NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_server_start(
    context: *const MeshwireContext,
    listen_address: *const c_char,
    callback: MeshwireAcceptCallback,
    user_data: *mut c_void,
    out: *mut *mut MeshwireServer,
) -> MeshwireStatus {
    boundary(|| {
        // SAFETY: the caller guarantees NULL or a live context.
        let context = unsafe { context.as_ref() }.ok_or_else(|| Failure::null("context"))?;
        // SAFETY: the caller guarantees NULL or a NUL-terminated string.
        let listen = unsafe { str_arg(listen_address, "listen_address") }?;
        let callback = callback.ok_or_else(|| Failure::null("callback"))?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let server = MeshwireServer::start(&context.shared, listen, callback, user_data)?;
        // SAFETY: `out` is not NULL and the caller guarantees it is valid for writes.
        unsafe { write_out(out, Box::into_raw(Box::new(server)), "out") }
    })
}

/// Sets `*out_port` to the TCP port the server listens on (the one chosen for port 0).
///
/// Thread-safety: callable from any thread.
///
/// # Safety
/// `server` is NULL or a live server; `out_port` NULL or valid for writing a uint16_t.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_server_port(server: *const MeshwireServer, out_port: *mut u16) -> MeshwireStatus {
    boundary(|| {
        // SAFETY: the caller guarantees NULL or a live server.
        let server = unsafe { server.as_ref() }.ok_or_else(|| Failure::null("server"))?;
        // SAFETY: the caller guarantees NULL or a valid pointer.
        unsafe { write_out(out_port, server.local_addr.port(), "out_port") }
    })
}

/// Stops and frees a server: it stops listening and accepting tunnels, and once this returns its
/// callback is never called again (it waits for running calls, unless called from the callback
/// itself). Tunnels already accepted go on until they end (or until the context is freed).
/// NULL is ignored.
///
/// Thread-safety: callable from any thread, once per server.
///
/// # Safety
/// `server` is NULL or a server from `meshwire_server_start`, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meshwire_server_free(server: *mut MeshwireServer) {
    boundary_void(|| {
        if server.is_null() {
            return;
        }
        // SAFETY: not NULL; the caller guarantees it came from Box::into_raw in meshwire_server_start
        // and is freed once.
        let server = unsafe { Box::from_raw(server) };
        server.stop();
    });
}
