//! Status codes, the thread-local last-error message, and the boundary every exported function
//! goes through: panics caught, errors turned into a status and a message.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The result of every fallible meshwire function. `MESHWIRE_OK` (0) is success; on any other
/// value, `meshwire_last_error()` describes the failure in words.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, reason = "the variants have the names of the C constants")]
pub enum MeshwireStatus {
    /// Success.
    MESHWIRE_OK = 0,
    /// A required pointer argument was NULL.
    MESHWIRE_ERR_NULL_ARGUMENT = 1,
    /// An argument is malformed: not UTF-8, not an `ip:port`, not a SPIFFE ID, an unknown header,
    /// an out-of-range value.
    MESHWIRE_ERR_INVALID_ARGUMENT = 2,
    /// The context's own identity could not be obtained: the CA directory, the certificate files,
    /// or the issued certificate.
    MESHWIRE_ERR_IDENTITY = 3,
    /// The TCP connection to the peer could not be made.
    MESHWIRE_ERR_CONNECT = 4,
    /// The peer refused the CONNECT (the message names the HTTP status: 400, 401, 503, ...).
    MESHWIRE_ERR_REFUSED = 5,
    /// The TLS handshake failed (untrusted certificate, protocol failure).
    MESHWIRE_ERR_TLS = 6,
    /// The peer's SPIFFE ID is not one of the expected identities.
    MESHWIRE_ERR_PEER_IDENTITY = 7,
    /// The HTTP/2 connection failed.
    MESHWIRE_ERR_PROTOCOL = 8,
    /// The operation did not finish in time.
    MESHWIRE_ERR_TIMEOUT = 9,
    /// A local socket or file operation failed (bind, socket pair).
    MESHWIRE_ERR_IO = 10,
    /// meshwire's runtime could not start or is shutting down, or the function was called where it
    /// must not be (for example freeing a server from its own callback).
    MESHWIRE_ERR_RUNTIME = 11,
    /// An internal error (a panic inside meshwire, caught at the boundary). Please report it.
    MESHWIRE_ERR_PANIC = 12,
}

impl MeshwireStatus {
    /// The name of the status, as in the header.
    pub(crate) fn name(self) -> &'static CStr {
        match self {
            Self::MESHWIRE_OK => c"MESHWIRE_OK",
            Self::MESHWIRE_ERR_NULL_ARGUMENT => c"MESHWIRE_ERR_NULL_ARGUMENT",
            Self::MESHWIRE_ERR_INVALID_ARGUMENT => c"MESHWIRE_ERR_INVALID_ARGUMENT",
            Self::MESHWIRE_ERR_IDENTITY => c"MESHWIRE_ERR_IDENTITY",
            Self::MESHWIRE_ERR_CONNECT => c"MESHWIRE_ERR_CONNECT",
            Self::MESHWIRE_ERR_REFUSED => c"MESHWIRE_ERR_REFUSED",
            Self::MESHWIRE_ERR_TLS => c"MESHWIRE_ERR_TLS",
            Self::MESHWIRE_ERR_PEER_IDENTITY => c"MESHWIRE_ERR_PEER_IDENTITY",
            Self::MESHWIRE_ERR_PROTOCOL => c"MESHWIRE_ERR_PROTOCOL",
            Self::MESHWIRE_ERR_TIMEOUT => c"MESHWIRE_ERR_TIMEOUT",
            Self::MESHWIRE_ERR_IO => c"MESHWIRE_ERR_IO",
            Self::MESHWIRE_ERR_RUNTIME => c"MESHWIRE_ERR_RUNTIME",
            Self::MESHWIRE_ERR_PANIC => c"MESHWIRE_ERR_PANIC",
        }
    }
}

/// A failed call: its status and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) status: MeshwireStatus,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(status: MeshwireStatus, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn null(what: &str) -> Self {
        Self::new(MeshwireStatus::MESHWIRE_ERR_NULL_ARGUMENT, format!("{what} is NULL"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(MeshwireStatus::MESHWIRE_ERR_INVALID_ARGUMENT, message)
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Records `message` as this thread's last error.
pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = Some(c));
}

fn clear_last_error() {
    LAST_ERROR.with(|slot| *slot.borrow_mut() = None);
}

/// The message of this thread's last failed call, or an empty string after a successful one.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|slot| match &*slot.borrow() {
        Some(message) => message.as_ptr(),
        None => c"".as_ptr(),
    })
}

/// Runs the body of an exported function: a panic becomes `MESHWIRE_ERR_PANIC`, a failure its
/// status; the last error is set on failure and cleared on success.
pub(crate) fn boundary(body: impl FnOnce() -> Result<(), Failure>) -> MeshwireStatus {
    let outcome = catch_unwind(AssertUnwindSafe(body));
    match outcome {
        Ok(Ok(())) => {
            clear_last_error();
            MeshwireStatus::MESHWIRE_OK
        }
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            set_last_error(&format!("internal error in meshwire (please report): {what}"));
            MeshwireStatus::MESHWIRE_ERR_PANIC
        }
    }
}

/// Runs the body of a function that returns no status (the free functions): a panic is caught
/// and dropped, since it must not cross the boundary and there is nobody to tell.
pub(crate) fn boundary_void(body: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(body));
}

/// A C string argument as UTF-8: `MESHWIRE_ERR_NULL_ARGUMENT` for NULL, `MESHWIRE_ERR_INVALID_ARGUMENT`
/// for invalid UTF-8.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not NULL, and the caller guarantees a valid NUL-terminated string for 'a.
    let c = unsafe { CStr::from_ptr(ptr) };
    c.to_str()
        .map_err(|e| Failure::invalid(format!("{what} is not valid UTF-8: {e}")))
}

/// An array argument of `len` elements: empty for `len == 0` (the pointer may then be NULL),
/// `MESHWIRE_ERR_NULL_ARGUMENT` for a NULL pointer with a non-zero length.
///
/// # Safety
/// `ptr` is NULL or points to `len` initialised elements valid for `'a`.
pub(crate) unsafe fn slice_arg<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(&format!("{what} (with a length of {len})")));
    }
    // SAFETY: not NULL, and the caller guarantees `len` valid elements for 'a.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Writes an out-parameter.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not NULL, and the caller guarantees it is valid for writes.
    unsafe { out.write(value) };
    Ok(())
}
