//! Every raw-pointer conversion of the C boundary, in one place.
//!
//! The exported functions take pointers from C and pass them through these helpers only:
//! each checks for NULL and documents what the caller must guarantee (the `# Safety` of the
//! export it serves repeats it for C users).

use std::ffi::{CStr, c_char};

use crate::error::{Fail, FfiResult, bf_result, invalid, null};

/// A required NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    // SAFETY: the caller's contract (above) is exactly this function's.
    unsafe { opt_str_arg(p, what) }?.ok_or_else(|| null(what))
}

/// An optional NUL-terminated UTF-8 string argument (NULL: none).
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: `p` is not NULL, and the caller guarantees a NUL-terminated string living for 'a.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// An optional byte-string argument: `(p, len)`, NULL for none (then `len` must be 0).
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that stay valid for `'a`.
pub(crate) unsafe fn bytes_arg<'a>(
    p: *const u8,
    len: usize,
    what: &str,
) -> FfiResult<Option<&'a [u8]>> {
    if p.is_null() {
        return if len == 0 { Ok(None) } else { Err(null(what)) };
    }
    if isize::try_from(len).is_err() {
        return Err(invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: `p` is not NULL and the caller guarantees `len` readable bytes for 'a; `len`
    // fits in isize.
    Ok(Some(unsafe { std::slice::from_raw_parts(p, len) }))
}

/// A required reference argument.
///
/// # Safety
/// `p` is NULL or points to a valid `T` that no one mutates during `'a`.
pub(crate) unsafe fn ref_arg<'a, T>(p: *const T, what: &str) -> FfiResult<&'a T> {
    // SAFETY: per the caller's contract, a non-NULL `p` points to a valid, unaliased-for-write T.
    unsafe { p.as_ref() }.ok_or_else(|| null(what))
}

/// A required mutable reference argument.
///
/// # Safety
/// `p` is NULL or points to a valid `T` that nothing else reads or writes during `'a`.
pub(crate) unsafe fn mut_arg<'a, T>(p: *mut T, what: &str) -> FfiResult<&'a mut T> {
    // SAFETY: per the caller's contract, a non-NULL `p` points to a valid T used by no one else.
    unsafe { p.as_mut() }.ok_or_else(|| null(what))
}

/// An optional reference argument (NULL: none).
///
/// # Safety
/// As [`ref_arg`].
pub(crate) unsafe fn opt_ref_arg<'a, T>(p: *const T) -> Option<&'a T> {
    // SAFETY: per the caller's contract, a non-NULL `p` points to a valid T.
    unsafe { p.as_ref() }
}

/// Moves `value` into a new heap object and stores its pointer in `*out`.
///
/// # Safety
/// `out` is NULL or valid for writing one pointer.
pub(crate) unsafe fn box_out<T>(out: *mut *mut T, value: T, what: &str) -> FfiResult {
    if out.is_null() {
        return Err(null(what));
    }
    let p = Box::into_raw(Box::new(value));
    // SAFETY: `out` is not NULL and the caller guarantees it is writable.
    unsafe { out.write(p) };
    Ok(())
}

/// Frees an object made by [`box_out`]; NULL is ignored.
///
/// # Safety
/// `p` is NULL or a pointer [`box_out`] produced for this `T` and not yet freed.
pub(crate) unsafe fn free_box<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: `p` came from Box::into_raw for T and is freed once (the caller's contract).
        drop(unsafe { Box::from_raw(p) });
    }
}

/// Writes `value` to an optional out-parameter (NULL: not wanted).
///
/// # Safety
/// `out` is NULL or valid for writing one `T`.
pub(crate) unsafe fn write_opt<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: `out` is not NULL and the caller guarantees it is writable.
        unsafe { out.write(value) };
    }
}

/// Copies `text` and a NUL into the caller's buffer `(buf, len)` and sets `*out_n` to the
/// text's length. If it does not fit: with `truncate`, as much as fits (cut at a character
/// boundary) is written and `InsufficientSize` returned; without, nothing is written and
/// `InsufficientSize` returned. `*out_n` is the full length in both cases.
///
/// # Safety
/// `buf` is NULL or valid for writing `len` bytes; `out_n` is NULL or valid for one `usize`.
pub(crate) unsafe fn write_text(
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
    text: &str,
    truncate: bool,
) -> FfiResult {
    // SAFETY: forwarded contract: `out_n` is NULL or writable.
    unsafe { write_opt(out_n, text.len()) };
    if buf.is_null() {
        return if len == 0 {
            Err(Fail::Code(
                bf_result::InsufficientSize,
                format!("the text needs {} bytes and a NUL", text.len()),
            ))
        } else {
            Err(null("buf"))
        };
    }
    let fits = text.len() < len;
    if !fits && !truncate {
        return Err(Fail::Code(
            bf_result::InsufficientSize,
            format!(
                "the text needs {} bytes and a NUL; the buffer has {len}",
                text.len()
            ),
        ));
    }
    let mut n = text.len().min(len.saturating_sub(1));
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    if len > 0 {
        // SAFETY: `buf` is writable for `len` bytes and `n < len`, so `n` bytes and the NUL fit;
        // `text` does not overlap a buffer the caller lent us for writing.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n) };
        // SAFETY: as above; offset `n` is within the buffer.
        let end = unsafe { buf.add(n) };
        // SAFETY: `end` points into the caller's writable buffer.
        unsafe { end.write(0) };
    }
    if fits {
        Ok(())
    } else {
        Err(Fail::Code(
            bf_result::InsufficientSize,
            format!(
                "the text needs {} bytes and a NUL; the buffer has {len}",
                text.len()
            ),
        ))
    }
}
