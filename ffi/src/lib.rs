//! The C ABI of blockferry (`ffi/include/blockferry.h`, generated from this crate by cbindgen).
//!
//! Conventions (rustls-ffi's, with libcurl's threading of callbacks):
//! - Every fallible function returns a [`bf_result`]; `BF_RESULT_OK` is 0. On failure,
//!   `bf_last_error` copies the calling thread's error message (naming file, structure,
//!   offset) into a caller buffer; a successful call clears it.
//! - Objects are opaque handles made by a `_new`/`_open`/`_create` function and released by
//!   exactly one call of their `_free` (which takes NULL).
//! - Every struct exchanged starts with its size, so that it can grow (`abi.rs`): options
//!   structs are filled by their `_init(opts, sizeof *opts)`, reports get `.size` from the
//!   caller.
//! - Out-parameters are written only on success, unless a function says otherwise.
//! - Every pointer argument is checked for NULL (`BF_RESULT_NULL_PARAMETER`); strings are
//!   NUL-terminated UTF-8; codes a caller passes (`bf_io_engine`, …) are integers checked
//!   against their constants.
//! - A panic never crosses the boundary: it becomes `BF_RESULT_PANIC`.
//! - Long calls block the calling thread; `bf_cancel_request` stops them from any thread.
//!   Progress callbacks run on the calling thread (`observe.rs`).
//!
//! The raw-pointer conversions are in `handle` and `abi`, the callback call in `observe`,
//! each `unsafe` block with its `// SAFETY:` comment.

#![allow(non_camel_case_types)] // C names: bf_store, bf_result…

mod abi;
mod error;
mod handle;
mod observe;
pub mod ops;
pub mod query;
pub mod store;
pub mod sync;

use std::ffi::{CStr, c_char};
use std::sync::Mutex;

use blockferry::CancelToken;

pub use abi::{
    BF_ABI_VERSION, BF_VERSION_MAJOR, BF_VERSION_MINOR, BF_VERSION_PATCH, bf_abi_version,
};
use error::{Fail, boundary, with_last};
pub use error::{bf_result, bf_result_code};
pub use observe::{bf_event, bf_event_kind, bf_phase, bf_progress_cb};

/// One call of a `handle` helper on an export's pointer arguments.
macro_rules! ffi_arg {
    ($e:expr) => {{
        // SAFETY: every export's `# Safety` section requires of its caller what the `handle`
        // and `abi` helpers require of their pointer arguments (NULL or valid, strings
        // NUL-terminated, structs initialised).
        unsafe { $e }
    }};
}
pub(crate) use ffi_arg;

use handle::{free_box, opt_ref_arg, write_opt, write_text};

/// A cancellation flag (opaque). `bf_cancel_request` may be called from any thread while an
/// operation that was given it runs; `bf_cancel_reset` makes it ready for the next one.
#[derive(Debug)]
pub struct bf_cancel {
    /// The token operations started from now on get.
    token: Mutex<CancelToken>,
}

impl bf_cancel {
    /// The token an operation starting now gets.
    fn token(&self) -> CancelToken {
        self.token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The token of an optional `bf_cancel`.
///
/// # Safety
/// `cancel` is NULL or a live flag.
pub(crate) unsafe fn token(cancel: *const bf_cancel) -> CancelToken {
    // SAFETY: forwarded contract.
    unsafe { opt_ref_arg(cancel) }.map_or_else(CancelToken::new, bf_cancel::token)
}

/// The engine's version, e.g. "0.1.0" (static; never NULL); `BF_VERSION_MAJOR`, `_MINOR`
/// and `_PATCH` are the header's.
#[unsafe(no_mangle)]
pub extern "C" fn bf_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// A static description of a result code (never NULL; a value that is no `bf_result` gets
/// "unknown result code").
#[unsafe(no_mangle)]
pub extern "C" fn bf_result_text(result: error::bf_result_code) -> *const c_char {
    error::describe(result).as_ptr()
}

/// Copies the calling thread's last error message into `buf` (`len` bytes, NUL-terminated)
/// and sets `*out_n` (if not NULL) to its length without the NUL. If it does not fit, as
/// much as fits is written and `BF_RESULT_INSUFFICIENT_SIZE` returned. Does not change the
/// last error.
///
/// # Safety
/// `buf` is NULL (with `len` 0) or writable for `len` bytes; `out_n` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error(
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    let message = with_last(|l| l.message.clone());
    // SAFETY: forwarded contract.
    match unsafe { write_text(buf, len, out_n, &message, true) } {
        Ok(()) => bf_result::Ok,
        Err(Fail::Code(code, _)) => code,
        Err(Fail::Engine(_)) => bf_result::Internal,
    }
}

/// The file the calling thread's last error concerns, like `bf_last_error`;
/// `BF_RESULT_NOT_FOUND` (writing nothing) when it names none.
///
/// # Safety
/// As `bf_last_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error_path(
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    let Some(path) = with_last(|l| l.path.clone()) else {
        return bf_result::NotFound;
    };
    // SAFETY: forwarded contract.
    match unsafe { write_text(buf, len, out_n, &path, true) } {
        Ok(()) => bf_result::Ok,
        Err(Fail::Code(code, _)) => code,
        Err(Fail::Engine(_)) => bf_result::Internal,
    }
}

/// Writes a field of the thread's last error to `*out`: `NotFound` when it has none.
///
/// # Safety
/// `out` is NULL or writable.
unsafe fn write_last<T>(
    out: *mut T,
    field: impl FnOnce(&error::LastError) -> Option<T>,
) -> bf_result {
    if out.is_null() {
        return bf_result::NullParameter;
    }
    match with_last(field) {
        Some(v) => {
            // SAFETY: `out` is not NULL and writable (the caller's contract).
            unsafe { write_opt(out, v) };
            bf_result::Ok
        }
        None => bf_result::NotFound,
    }
}

/// The byte offset the calling thread's last error concerns (in a file or on the virtual
/// disk) in `*out`; `BF_RESULT_NOT_FOUND` when it names none.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error_offset(out: *mut u64) -> bf_result {
    // SAFETY: forwarded contract.
    unsafe { write_last(out, |l| l.offset) }
}

/// The multipart upload part the calling thread's last error concerns in `*out`;
/// `BF_RESULT_NOT_FOUND` when it names none.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error_part(out: *mut u32) -> bf_result {
    // SAFETY: forwarded contract.
    unsafe { write_last(out, |l| l.part) }
}

/// Makes a cancellation flag in `*out`; free it with `bf_cancel_free`.
///
/// # Safety
/// `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_cancel_new(out: *mut *mut bf_cancel) -> bf_result {
    boundary(|| {
        let c = bf_cancel {
            token: Mutex::new(CancelToken::new()),
        };
        // SAFETY: forwarded contract.
        unsafe { handle::box_out(out, c, "out") }
    })
}

/// Asks every operation given `cancel` (since its last `bf_cancel_reset`) to stop; they
/// return `BF_RESULT_CANCELLED` soon after. Thread-safe; may be called any number of times.
/// NULL is ignored.
///
/// # Safety
/// `cancel` is NULL or a live flag from `bf_cancel_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_cancel_request(cancel: *const bf_cancel) {
    // SAFETY: forwarded contract.
    if let Some(c) = unsafe { opt_ref_arg(cancel) } {
        c.token().cancel();
    }
}

/// Makes a flag usable again after `bf_cancel_request`: operations given it from now on
/// run; those already cancelled stay cancelled. NULL is ignored.
///
/// # Safety
/// As `bf_cancel_request`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_cancel_reset(cancel: *const bf_cancel) {
    // SAFETY: forwarded contract.
    if let Some(c) = unsafe { opt_ref_arg(cancel) } {
        *c.token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = CancelToken::new();
    }
}

/// Frees a cancellation flag (NULL is ignored). Operations still running with it keep
/// their own reference; no other thread may use this pointer afterwards.
///
/// # Safety
/// `cancel` is NULL or from `bf_cancel_new`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_cancel_free(cancel: *mut bf_cancel) {
    // SAFETY: forwarded contract.
    unsafe { free_box(cancel) };
}
