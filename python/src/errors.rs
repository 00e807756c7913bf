//! Engine errors as Python exceptions: one exhaustive match over [`ErrorKind`].
//!
//! The classes live in `blockferry/_errors.py` (so that each can also subclass the builtin a
//! Python caller expects: `ValueError`, `OSError`, `PermissionError`…) and are imported here.

use blockferry::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::{PyErr, Python};

mod classes {
    #![allow(missing_debug_implementations)] // types the macro declares
    pyo3::import_exception!(blockferry._errors, SourceIOError);
    pyo3::import_exception!(blockferry._errors, SourceNotFoundError);
    pyo3::import_exception!(blockferry._errors, SourcePermissionError);
    pyo3::import_exception!(blockferry._errors, InvalidImageError);
    pyo3::import_exception!(blockferry._errors, UnsupportedImageError);
    pyo3::import_exception!(blockferry._errors, InvalidChangeListError);
    pyo3::import_exception!(blockferry._errors, CorruptError);
    pyo3::import_exception!(blockferry._errors, NotFoundError);
    pyo3::import_exception!(blockferry._errors, UnsupportedVersionError);
    pyo3::import_exception!(blockferry._errors, CredentialsError);
    pyo3::import_exception!(blockferry._errors, AccessDeniedError);
    pyo3::import_exception!(blockferry._errors, StoreError);
    pyo3::import_exception!(blockferry._errors, VerifyMismatchError);
    pyo3::import_exception!(blockferry._errors, ConfigError);
    pyo3::import_exception!(blockferry._errors, BusyError);
    pyo3::import_exception!(blockferry._errors, CancelledError);
    pyo3::import_exception!(blockferry._errors, InternalError);
}
use classes::{
    AccessDeniedError, BusyError, CancelledError, ConfigError, CorruptError, CredentialsError,
    InternalError, InvalidChangeListError, InvalidImageError, NotFoundError, SourceIOError,
    SourceNotFoundError, SourcePermissionError, StoreError, UnsupportedImageError,
    UnsupportedVersionError, VerifyMismatchError,
};

/// The name of the kind, as the exceptions' `kind` attribute and the C result codes say it.
pub(crate) fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Io => "io",
        ErrorKind::InvalidImage => "invalid_image",
        ErrorKind::UnsupportedImage => "unsupported_image",
        ErrorKind::InvalidChangeList => "invalid_change_list",
        ErrorKind::Corrupt => "corrupt",
        ErrorKind::NotFound => "not_found",
        ErrorKind::UnsupportedVersion => "unsupported_version",
        ErrorKind::Credentials => "credentials",
        ErrorKind::AccessDenied => "access_denied",
        ErrorKind::Store => "store",
        ErrorKind::VerifyMismatch => "verify_mismatch",
        ErrorKind::Config => "config",
        ErrorKind::Busy => "busy",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Internal => "internal",
    }
}

/// The Python exception for an engine error, with `kind`, `message`, `path`, `object`,
/// `offset`, `part` and `causes` set (and `errno`/`filename` for the `OSError` kinds).
pub(crate) fn to_py(py: Python<'_>, e: &Error) -> PyErr {
    let mut text = e.to_string();
    // An I/O error says what the system said ("No such file or directory").
    if let Some(reason) = os_error(e) {
        text = format!("{text}: {reason}");
    }
    // The engine names the setting an error is about; here it is a keyword argument.
    if let Some(setting) = e.setting() {
        text = format!("{text} [argument {setting}]");
    }
    let err = match e.kind() {
        // As the builtin `open` would raise, for the errors callers catch by class.
        ErrorKind::Io => match os_errno(e) {
            Some(ENOENT) => SourceNotFoundError::new_err(text),
            Some(EACCES | EPERM) => SourcePermissionError::new_err(text),
            _ => SourceIOError::new_err(text),
        },
        ErrorKind::InvalidImage => InvalidImageError::new_err(text),
        ErrorKind::UnsupportedImage => UnsupportedImageError::new_err(text),
        ErrorKind::InvalidChangeList => InvalidChangeListError::new_err(text),
        ErrorKind::Corrupt => CorruptError::new_err(text),
        ErrorKind::NotFound => NotFoundError::new_err(text),
        ErrorKind::UnsupportedVersion => UnsupportedVersionError::new_err(text),
        ErrorKind::Credentials => CredentialsError::new_err(text),
        ErrorKind::AccessDenied => AccessDeniedError::new_err(text),
        ErrorKind::Store => StoreError::new_err(text),
        ErrorKind::VerifyMismatch => VerifyMismatchError::new_err(text),
        ErrorKind::Config => ConfigError::new_err(text),
        ErrorKind::Busy => BusyError::new_err(text),
        ErrorKind::Cancelled => CancelledError::new_err(text),
        ErrorKind::Internal => InternalError::new_err(text),
    };
    if let Err(failed) = annotate(py, &err, e) {
        return failed;
    }
    err
}

/// Sets the context attributes on the exception instance.
fn annotate(py: Python<'_>, err: &PyErr, e: &Error) -> PyResult<()> {
    let value = err.value(py);
    value.setattr("kind", kind_name(e.kind()))?;
    value.setattr("message", e.message())?;
    value.setattr("path", e.path().map(|p| p.to_string_lossy().into_owned()))?;
    value.setattr("object", e.object())?;
    value.setattr("offset", e.offset())?;
    value.setattr("part", e.part())?;
    value.setattr("setting", e.setting())?;
    let detail: Vec<String> = causes(e);
    value.setattr("causes", detail)?;
    if value.is_instance_of::<pyo3::exceptions::PyOSError>() {
        if let Some(p) = e.path() {
            value.setattr("filename", p.to_string_lossy().into_owned())?;
        }
        if let Some(errno) = os_errno(e) {
            value.setattr("errno", errno)?;
            // As Python words it: the system's reason, without Rust's "(os error N)".
            let reason = os_error(e).unwrap_or_default();
            let reason = reason.split(" (os error").next().unwrap_or_default();
            value.setattr("strerror", reason)?;
        }
    }
    Ok(())
}

/// The `source()` chain below the error, outermost first.
fn causes(e: &Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        out.push(c.to_string());
        cur = c.source();
    }
    out
}

// The errno values the classes above follow (the same on every Unix this builds for).
const ENOENT: i32 = 2;
const EPERM: i32 = 1;
const EACCES: i32 = 13;

/// The OS error in the error's cause chain, if there is one, as the system words it.
fn os_error(e: &Error) -> Option<String> {
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.to_string());
        }
        cur = c.source();
    }
    None
}

/// The OS error number in the error's cause chain, if there is one.
fn os_errno(e: &Error) -> Option<i32> {
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Some(n);
        }
        cur = c.source();
    }
    None
}

/// `Result<T, Error>` → `PyResult<T>`.
pub(crate) trait ToPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> ToPyResult<T> for Result<T, Error> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, &e))
    }
}

/// A bad argument the binding itself found (before the engine ran).
pub(crate) fn config_error(message: impl Into<String>) -> PyErr {
    Python::attach(|py| to_py(py, &Error::config(message)))
}
