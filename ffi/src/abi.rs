//! How the C ABI grows without breaking compiled callers: every struct a caller and the
//! library exchange starts with its size in bytes, as the caller's header declared it.
//!
//! Fields are only ever appended, each addition bumping [`BF_ABI_VERSION`], and a struct
//! accepts the sizes it was published with ([`Sized::SIZES`]): an older caller's shorter
//! struct gets the defaults for the fields it does not have, and the library writes an older
//! caller's shorter report only up to its size. A newer caller's longer struct is accepted
//! when the fields this library does not know are zero (their defaults), refused otherwise:
//! the library cannot honour a setting it does not have. Any other size is a caller that did
//! not initialise the struct, refused with a message that says how.
//!
//! `ffi/tests/c/abi_v1.c`, compiled against the frozen version-1 header, runs against the
//! library as it is now; `ffi/tests/c/layout.c` fails when a published field moved.

use crate::error::{FfiResult, invalid, null};

/// The version of the C ABI this library implements: incremented by every compatible
/// addition (a field appended to a struct, a new function or constant). A caller built
/// against header version N runs against any library whose `bf_abi_version()` is at least
/// N. An incompatible change would rename the shared library (its SONAME,
/// `libblockferry_ffi.so.1`), never reuse this number. 1: the first; 2:
/// `bf_replicate_options.stall_warning_secs`; 3: `bf_export`.
pub const BF_ABI_VERSION: u32 = 3;

/// The crate version, as numbers (`bf_version()` gives it as text).
pub const BF_VERSION_MAJOR: u32 = 0;
/// See [`BF_VERSION_MAJOR`].
pub const BF_VERSION_MINOR: u32 = 1;
/// See [`BF_VERSION_MAJOR`].
pub const BF_VERSION_PATCH: u32 = 0;

/// The ABI version this library implements (`BF_ABI_VERSION` of its header). A program can
/// check at start that `bf_abi_version() >= BF_ABI_VERSION`, the version it was built with.
#[unsafe(no_mangle)]
pub extern "C" fn bf_abi_version() -> u32 {
    BF_ABI_VERSION
}

/// A C ABI struct whose first field is its size (`size_t size`).
///
/// # Safety
/// Implementors are `#[repr(C)]`, start with a `usize` field holding the size, and are made
/// only of fields for which every value a C caller can store is valid (integers, floats,
/// pointers, and `bool`, which C's `_Bool` keeps to 0 or 1), so that a prefix copied from C
/// memory is a valid value.
pub(crate) unsafe trait Sized: Copy {
    /// The struct's C name, for messages.
    const NAME: &'static str;
    /// The sizes it was published with, oldest first; the last is `size_of::<Self>()`.
    const SIZES: &'static [usize];
    /// The defaults, with `size` set to the current size.
    fn defaults() -> Self;
}

/// How much longer than this library's a newer caller's struct may be: far more than any
/// header revision adds, and small enough that a garbage size (an uninitialised struct) is
/// refused rather than read past.
const NEWER: usize = 1024;

/// Whether `size` is one a caller may give for `T`; `Err` says what is wrong.
fn check_size<T: Sized>(size: usize, what: &str) -> FfiResult {
    if T::SIZES.contains(&size) || (size > size_of::<T>() && size <= size_of::<T>() + NEWER) {
        return Ok(());
    }
    let how = if T::NAME.ends_with("_report") {
        format!("set {what}.size = sizeof *{what} before the call")
    } else {
        format!(
            "initialise it with {}_init({what}, sizeof *{what})",
            T::NAME
        )
    };
    Err(invalid(format!(
        "{what}.size is {size}, not the size of any {name} (the sizes known are {sizes:?}): \
         {how}",
        name = T::NAME,
        sizes = T::SIZES,
    )))
}

/// Reads the size field of the struct at `p`.
///
/// # Safety
/// `p` is not NULL and points to at least a `usize`-sized, aligned, readable field.
unsafe fn size_of_caller<T: Sized>(p: *const T) -> usize {
    // SAFETY: `T` starts with its `usize` size field (the trait's contract) and `p` points
    // to it (the caller's).
    unsafe { p.cast::<usize>().read() }
}

/// Fills the caller's struct at `p`, declared `size` bytes long, with the defaults (and
/// zeroes the part of a longer struct this library does not know). Serves every
/// `bf_*_init` function.
///
/// # Safety
/// `p` is NULL or writable for `size` bytes and aligned for `T`.
pub(crate) unsafe fn init<T: Sized>(p: *mut T, size: usize, what: &str) -> FfiResult {
    if p.is_null() {
        return Err(null(what));
    }
    check_size::<T>(size, what)?;
    let mut value = T::defaults();
    let known = size.min(size_of::<T>());
    // SAFETY: `value` is a `T`, which starts with its `usize` size (the trait's contract).
    unsafe { (&raw mut value).cast::<usize>().write(size) };
    // SAFETY: `p` is writable for `size >= known` bytes (the caller's contract) and `value`
    // is a local `T` of `size_of::<T>() >= known` bytes; they do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping((&raw const value).cast::<u8>(), p.cast::<u8>(), known);
    }
    if size > known {
        // SAFETY: the bytes from `known` to `size` are within the caller's writable struct.
        unsafe {
            p.cast::<u8>()
                .wrapping_add(known)
                .write_bytes(0, size - known);
        };
    }
    Ok(())
}

/// Reads the caller's struct at `p` (NULL: the defaults): the fields its size covers, the
/// defaults for the others.
///
/// # Safety
/// `p` is NULL or points to a struct initialised by its `_init` function (or with a
/// correct `size`), readable for `size` bytes.
pub(crate) unsafe fn read<T: Sized>(p: *const T, what: &str) -> FfiResult<T> {
    let mut value = T::defaults();
    if p.is_null() {
        return Ok(value);
    }
    // SAFETY: `p` is not NULL and points to the struct (the caller's contract).
    let size = unsafe { size_of_caller(p) };
    check_size::<T>(size, what)?;
    if size > size_of::<T>() {
        // SAFETY: the caller's struct is readable for `size` bytes.
        let tail = unsafe {
            std::slice::from_raw_parts(
                p.cast::<u8>().wrapping_add(size_of::<T>()),
                size - size_of::<T>(),
            )
        };
        if let Some(at) = tail.iter().position(|&b| b != 0) {
            return Err(invalid(format!(
                "{what} sets a field at byte {} that this library (C ABI version \
                 {BF_ABI_VERSION}) does not have: it was built against a newer header",
                size_of::<T>() + at
            )));
        }
    }
    let known = size.min(size_of::<T>());
    // SAFETY: `known` bytes are readable at `p` and writable in `value`; `known` is one of
    // the sizes `T` was published with (or all of it), so it ends on a field boundary and
    // the copied prefix is made of whole fields, each valid for any C value (the trait's
    // contract).
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&raw mut value).cast::<u8>(), known);
    }
    // SAFETY: as in `init`.
    unsafe { (&raw mut value).cast::<usize>().write(size_of::<T>()) };
    Ok(value)
}

/// A caller's out-struct (a report), its size checked before the work that fills it.
pub(crate) struct Out<T: Sized> {
    p: *mut T,
    known: usize,
}

/// Checks the caller's report at `p` (NULL: not wanted) before an operation.
///
/// # Safety
/// `p` is NULL or points to a struct whose `size` field the caller set, writable for that
/// many bytes, and stays so until [`Out::write`].
pub(crate) unsafe fn out<T: Sized>(p: *mut T, what: &str) -> FfiResult<Out<T>> {
    if p.is_null() {
        return Ok(Out { p, known: 0 });
    }
    // SAFETY: `p` is not NULL and points to the struct (the caller's contract).
    let size = unsafe { size_of_caller(p.cast_const()) };
    check_size::<T>(size, what)?;
    Ok(Out {
        p,
        known: size.min(size_of::<T>()),
    })
}

impl<T: Sized> Out<T> {
    /// Writes `value` into the fields the caller's struct has (its `size` stays as it was).
    pub(crate) fn write(self, value: &T) {
        if self.p.is_null() {
            return;
        }
        let skip = size_of::<usize>();
        // SAFETY: `Out` was made by `out`, whose contract keeps `p` writable for `known`
        // bytes (a whole-field prefix, past the size field, which is left alone).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&raw const *value).cast::<u8>().wrapping_add(skip),
                self.p.cast::<u8>().wrapping_add(skip),
                self.known - skip,
            );
        }
    }
}

/// Implements [`Sized`] for an ABI struct: `sized!(bf_x, [V1_SIZE, …], defaults)`.
macro_rules! sized {
    ($t:ident, $defaults:expr) => {
        sized!($t, [], $defaults);
    };
    ($t:ident, [$($old:expr),*], $defaults:expr) => {
        // SAFETY: `$t` is `#[repr(C)]`, starts with `size: usize`, and has only integer,
        // float, pointer and bool fields (checked by review of its definition, next to this).
        unsafe impl $crate::abi::Sized for $t {
            const NAME: &'static str = stringify!($t);
            const SIZES: &'static [usize] = &[$($old,)* size_of::<$t>()];
            fn defaults() -> Self {
                $defaults
            }
        }
    };
}
pub(crate) use sized;
