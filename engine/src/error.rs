//! The engine's one public error type.
//!
//! Callers branch on [`Error::kind`]; people read `Display`, which names what failed and where
//! (file, object, offset), followed by the `source()` chain.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::Path;

/// What kind of failure an [`Error`] is. Small and stable: bindings map it exhaustively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Reading or writing a local file or device failed.
    Io,
    /// A source image is malformed.
    InvalidImage,
    /// A source image is well formed but of a kind this version cannot read.
    UnsupportedImage,
    /// A change list (VMware CBT, Hyper-V RCT, extents) is malformed or does not fit the disk.
    InvalidChangeList,
    /// An object in the store is damaged: truncated, bit-flipped, or failed authentication.
    Corrupt,
    /// An object the store should hold is missing (a snapshot, a pack, an index).
    NotFound,
    /// The store was written by a newer blockferry (format version above ours).
    UnsupportedVersion,
    /// The passphrase does not unlock the store's key, or none was given.
    Credentials,
    /// The object store refused the credentials (unknown key, bad signature, expired token)
    /// or denied the access they asked for.
    AccessDenied,
    /// The store backend failed (I/O on the store, not on the source).
    Store,
    /// A restored or stored chunk does not match its source.
    VerifyMismatch,
    /// Invalid arguments or configuration.
    Config,
    /// Another process holds what this operation needs: a running job, or the store while a
    /// garbage collection runs.
    Busy,
    /// The operation was cancelled on request.
    Cancelled,
    /// A bug: an internal invariant broke or a worker panicked.
    Internal,
}

impl ErrorKind {
    /// Every kind, for exhaustive mapping tests in the bindings.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::Io,
        ErrorKind::InvalidImage,
        ErrorKind::UnsupportedImage,
        ErrorKind::InvalidChangeList,
        ErrorKind::Corrupt,
        ErrorKind::NotFound,
        ErrorKind::UnsupportedVersion,
        ErrorKind::Credentials,
        ErrorKind::AccessDenied,
        ErrorKind::Store,
        ErrorKind::VerifyMismatch,
        ErrorKind::Config,
        ErrorKind::Busy,
        ErrorKind::Cancelled,
        ErrorKind::Internal,
    ];
}

/// An engine error: a kind, a message, where it happened, and the underlying cause.
pub struct Error {
    kind: ErrorKind,
    message: String,
    // Boxed (not `PathBuf`, `String`): an error stays within 128 bytes, so a `Result` of one
    // is cheap to return.
    path: Option<Box<Path>>,
    object: Option<Box<str>>,
    offset: Option<u64>,
    part: Option<u32>,
    setting: Option<&'static str>,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a lowercase message that has no trailing period.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            path: None,
            object: None,
            offset: None,
            part: None,
            setting: None,
            source: None,
        }
    }

    /// An I/O error on a local file: the kind follows the I/O error (missing file, refused
    /// permission and so on still read as I/O), the message says what was being done.
    pub fn io(message: impl Into<String>, path: &Path, source: io::Error) -> Error {
        Error::new(ErrorKind::Io, message)
            .with_path(path)
            .with_source(source)
    }

    /// Shorthand for an [`ErrorKind::Corrupt`] error about a store object.
    pub fn corrupt(object: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, message).with_object(object)
    }

    /// Shorthand for an [`ErrorKind::Config`] error.
    pub fn config(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Config, message)
    }

    /// Shorthand for an [`ErrorKind::Internal`] error.
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }

    /// Attaches the file the error is about.
    #[must_use]
    pub fn with_path(mut self, path: &Path) -> Error {
        self.path = Some(path.into());
        self
    }

    /// Attaches the store object (key) the error is about.
    #[must_use]
    pub fn with_object(mut self, object: &str) -> Error {
        self.object = Some(object.into());
        self
    }

    /// Attaches the part (of a multipart upload) the error is about.
    #[must_use]
    pub fn with_part(mut self, part: u32) -> Error {
        self.part = Some(part);
        self
    }

    /// Attaches the byte offset (in the file, object or virtual disk) the error is about.
    #[must_use]
    pub fn with_offset(mut self, offset: u64) -> Error {
        self.offset = Some(offset);
        self
    }

    /// Says at which offset of the virtual disk the error happened. An error about a store
    /// object keeps its offset in that object (where the damage is) and names the disk offset
    /// in its message; any other gets the disk offset as its offset.
    #[must_use]
    pub fn at_disk_offset(mut self, disk_offset: u64) -> Error {
        if self.object.is_some() {
            self.message = format!("{} (at disk offset {disk_offset})", self.message);
            self
        } else {
            self.with_offset(disk_offset)
        }
    }

    /// Names the setting of the request that the error is about (`changes`, `base`,
    /// `verify_sample`, `restart`, …: the field names of the engine's request types). The
    /// message stays in the engine's terms; each front end names the setting its own way
    /// (a CLI flag, a keyword argument, a C option field).
    #[must_use]
    pub fn with_setting(mut self, setting: &'static str) -> Error {
        self.setting = Some(setting);
        self
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Error {
        self.source = Some(source.into());
        self
    }

    /// The kind, for callers that branch on failures.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The local file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The store object the error is about, if any.
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }

    /// The multipart upload part the error is about, if any.
    pub fn part(&self) -> Option<u32> {
        self.part
    }

    /// The byte offset the error is about, if any.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The request setting the error is about, if any (see [`Error::with_setting`]).
    pub fn setting(&self) -> Option<&'static str> {
        self.setting
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        let mut sep = " (";
        if let Some(path) = &self.path {
            write!(f, "{sep}file {}", path.display())?;
            sep = ", ";
        }
        if let Some(object) = &self.object {
            write!(f, "{sep}object {object}")?;
            sep = ", ";
        }
        if let Some(part) = self.part {
            write!(f, "{sep}part {part}")?;
            sep = ", ";
        }
        if let Some(offset) = self.offset {
            write!(f, "{sep}offset {offset}")?;
            sep = ", ";
        }
        if sep == ", " {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("path", &self.path)
            .field("object", &self.object)
            .field("offset", &self.offset)
            .field("part", &self.part)
            .field("setting", &self.setting)
            .field("source", &self.source)
            .finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_context() {
        let e = Error::corrupt("packs/ab/abcd", "authentication failed").with_offset(4096);
        assert_eq!(
            e.to_string(),
            "authentication failed (object packs/ab/abcd, offset 4096)"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let part = Error::new(ErrorKind::Store, "uploading part 7 failed")
            .with_object("packs/ab/abcd")
            .with_part(7);
        assert_eq!(part.part(), Some(7));
        assert_eq!(
            part.to_string(),
            "uploading part 7 failed (object packs/ab/abcd, part 7)"
        );
        let plain = Error::config("chunk size must be a power of two");
        assert_eq!(plain.to_string(), "chunk size must be a power of two");
    }
}
