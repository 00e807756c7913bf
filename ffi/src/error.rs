//! Result codes, the calling thread's last error, and the panic boundary.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};

use blockferry::{Error, ErrorKind};

/// The result of every fallible call. The numbers are stable: a code is never renumbered or
/// reused. Codes from 100 are the engine's error kinds; below 100, the C boundary's own.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum bf_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullParameter = 1,
    /// An argument is not valid (a string that is not UTF-8, a code out of range).
    InvalidParameter = 2,
    /// The caller's buffer is too small; `*out_n` says how many bytes are needed.
    InsufficientSize = 3,
    /// blockferry panicked (a bug); the call had no effect beyond what it had done so far.
    Panic = 4,
    /// Reading or writing a local file or device failed.
    Io = 100,
    /// A source image is malformed.
    InvalidImage = 101,
    /// A source image is well formed but of a kind this version cannot read.
    UnsupportedImage = 102,
    /// A change list is malformed or does not fit the disk.
    InvalidChangeList = 103,
    /// An object in the store is damaged.
    Corrupt = 104,
    /// Something named does not exist: a snapshot, a job, a store, an image's parent.
    NotFound = 105,
    /// The store was written by a newer blockferry.
    UnsupportedVersion = 106,
    /// The passphrase does not unlock the store, or none was given.
    Credentials = 107,
    /// The object store refused the credentials or denied the access.
    AccessDenied = 108,
    /// The store backend failed.
    Store = 109,
    /// A snapshot does not match its source, or a stored chunk its id.
    VerifyMismatch = 110,
    /// Invalid arguments or configuration.
    Config = 111,
    /// Another process holds what this needs (a running job, a gc).
    Busy = 112,
    /// The operation was cancelled (`bf_cancel_request`); a replication keeps its progress.
    Cancelled = 113,
    /// An internal invariant broke (a bug).
    Internal = 114,
}

/// A `bf_result` as a C caller passes it back (to `bf_result_text`): any integer, since C
/// lets an enum variable hold any value of its type. The header calls it `bf_result`
/// (cbindgen.toml renames it and leaves out its typedef); Rust reads it as the integer it
/// is, so that no value is undefined behaviour.
pub type bf_result_code = u32;

/// The code of an engine error kind: the one exhaustive mapping.
pub(crate) fn code(kind: ErrorKind) -> bf_result {
    match kind {
        ErrorKind::Io => bf_result::Io,
        ErrorKind::InvalidImage => bf_result::InvalidImage,
        ErrorKind::UnsupportedImage => bf_result::UnsupportedImage,
        ErrorKind::InvalidChangeList => bf_result::InvalidChangeList,
        ErrorKind::Corrupt => bf_result::Corrupt,
        ErrorKind::NotFound => bf_result::NotFound,
        ErrorKind::UnsupportedVersion => bf_result::UnsupportedVersion,
        ErrorKind::Credentials => bf_result::Credentials,
        ErrorKind::AccessDenied => bf_result::AccessDenied,
        ErrorKind::Store => bf_result::Store,
        ErrorKind::VerifyMismatch => bf_result::VerifyMismatch,
        ErrorKind::Config => bf_result::Config,
        ErrorKind::Busy => bf_result::Busy,
        ErrorKind::Cancelled => bf_result::Cancelled,
        ErrorKind::Internal => bf_result::Internal,
    }
}

/// A short, static description of a result code.
pub(crate) fn describe(code: u32) -> &'static std::ffi::CStr {
    match code {
        0 => c"success",
        1 => c"a required argument was NULL",
        2 => c"an argument is not valid",
        3 => c"the buffer is too small",
        4 => c"blockferry panicked (a bug)",
        100 => c"reading or writing a local file or device failed",
        101 => c"the image is malformed",
        102 => c"the image is of a kind this version cannot read",
        103 => c"the change list is malformed or does not fit the disk",
        104 => c"an object in the store is damaged",
        105 => c"not found",
        106 => c"the store was written by a newer blockferry",
        107 => c"the passphrase does not unlock the store",
        108 => c"the object store denied access",
        109 => c"the store backend failed",
        110 => c"verification found a mismatch",
        111 => c"invalid arguments or configuration",
        112 => c"busy: another process holds what this needs",
        113 => c"cancelled",
        114 => c"internal error (a bug)",
        _ => c"unknown result code",
    }
}

/// The last failure on this thread.
#[derive(Debug, Default)]
pub(crate) struct LastError {
    pub(crate) message: String,
    pub(crate) path: Option<String>,
    pub(crate) offset: Option<u64>,
    pub(crate) part: Option<u32>,
}

thread_local! {
    static LAST: RefCell<LastError> = RefCell::new(LastError::default());
}

/// Reads the calling thread's last error.
pub(crate) fn with_last<R>(f: impl FnOnce(&LastError) -> R) -> R {
    LAST.with(|l| f(&l.borrow()))
}

fn set_last(e: LastError) {
    LAST.with(|l| *l.borrow_mut() = e);
}

/// Why a call failed: a boundary code with its message, or an engine error.
#[derive(Debug)]
pub(crate) enum Fail {
    Code(bf_result, String),
    Engine(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Engine(e)
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, Fail>;

/// Runs the body of an exported call: a panic becomes `Panic`, a failure sets the thread's
/// last error and returns its code, a success clears it.
pub(crate) fn boundary(f: impl FnOnce() -> FfiResult) -> bf_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last(LastError::default());
            bf_result::Ok
        }
        Ok(Err(fail)) => record(fail),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            set_last(LastError {
                message: format!("blockferry panicked (a bug): {what}"),
                ..LastError::default()
            });
            bf_result::Panic
        }
    }
}

/// Records a failure as the thread's last error; returns its code.
pub(crate) fn record(fail: Fail) -> bf_result {
    match fail {
        Fail::Code(code, message) => {
            set_last(LastError {
                message,
                ..LastError::default()
            });
            code
        }
        Fail::Engine(e) => {
            let mut message = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                message.push_str(": ");
                message.push_str(&c.to_string());
                cause = c.source();
            }
            // The engine names the setting an error is about; here it is an option field.
            if let Some(setting) = e.setting() {
                message = format!("{message} [option {setting}]");
            }
            set_last(LastError {
                message,
                path: e.path().map(|p| p.to_string_lossy().into_owned()),
                offset: e.offset(),
                part: e.part(),
            });
            code(e.kind())
        }
    }
}

/// A NULL argument.
pub(crate) fn null(what: &str) -> Fail {
    Fail::Code(bf_result::NullParameter, format!("{what} is NULL"))
}

/// An argument that is not valid.
pub(crate) fn invalid(message: impl Into<String>) -> Fail {
    Fail::Code(bf_result::InvalidParameter, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_its_own_code_from_100() {
        let mut codes: Vec<u32> = ErrorKind::ALL.iter().map(|k| code(*k) as u32).collect();
        assert!(codes.iter().all(|c| (100..200).contains(c)));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
        for c in codes {
            assert_ne!(describe(c), c"unknown result code");
        }
    }

    #[test]
    fn panics_stop_at_the_boundary() {
        let r = boundary(|| panic!("boom"));
        assert_eq!(r, bf_result::Panic);
        with_last(|l| assert!(l.message.contains("boom"), "{}", l.message));
        let r = boundary(|| Err(Fail::Engine(Error::config("bad option"))));
        assert_eq!(r, bf_result::Config);
        with_last(|l| assert_eq!(l.message, "bad option"));
        assert_eq!(boundary(|| Ok(())), bf_result::Ok);
        with_last(|l| assert!(l.message.is_empty() && l.path.is_none()));
    }
}
