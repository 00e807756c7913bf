"""The exceptions blockferry raises.

Every engine error is a :class:`Error`, of one subclass per error kind, and each subclass also
derives from the builtin exception a Python caller would expect (``ValueError`` for bad
images, change lists and arguments, ``OSError`` for I/O and store failures,
``PermissionError`` for credentials), so ``except OSError`` keeps working. The context of the
failure is on the instance: ``kind``, ``message``, ``path``, ``object``, ``offset``, ``part``
and the ``causes`` below it.

This module must not import the native module (which imports it).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "Error",
    "SourceIOError",
    "SourceNotFoundError",
    "SourcePermissionError",
    "InvalidImageError",
    "UnsupportedImageError",
    "InvalidChangeListError",
    "CorruptError",
    "NotFoundError",
    "UnsupportedVersionError",
    "CredentialsError",
    "AccessDeniedError",
    "StoreError",
    "VerifyMismatchError",
    "ConfigError",
    "BusyError",
    "CancelledError",
    "InternalError",
    "KINDS",
]


class Error(Exception):
    """Base class of every blockferry error.

    Attributes:
        kind: the engine's error kind (``"invalid_image"``, ``"store"``, …).
        message: what failed, without the context.
        path: the local file concerned (an image, a change list, an output), if any.
        object: the store object concerned (``packs/…``, ``snapshots/…``), if any.
        offset: the byte offset concerned (in the file, or on the virtual disk), if any.
        part: the part of a multipart upload concerned, if any.
        setting: the argument the error is about (``changes``, ``base``, …), if any.
        causes: the underlying errors, outermost first.

    Errors pickle with all of these (and ``errno``, ``strerror``, ``filename`` for the
    ``OSError`` ones), so they survive a process pool.
    """

    kind: str = "internal"
    message: str = ""
    path: Optional[str] = None
    object: Optional[str] = None
    offset: Optional[int] = None
    part: Optional[int] = None
    setting: Optional[str] = None
    causes: List[str] = []

    def __str__(self) -> str:
        # The engine's message names the file, structure and offset; OSError's own format
        # ("[Errno 2] …: 'file'") would hide it.
        return str(self.args[0]) if self.args else super().__str__()

    def __reduce__(self) -> Tuple[Any, ...]:
        state: Dict[str, Any] = dict(self.__dict__)
        if isinstance(self, OSError):
            # Not in __dict__: OSError keeps them in its own slots.
            state.update(errno=self.errno, strerror=self.strerror, filename=self.filename)
        return (type(self), self.args, state)

    def __setstate__(self, state: Optional[Dict[str, Any]]) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)


class SourceIOError(Error, OSError):
    """Reading or writing a local file or device failed (``errno`` and ``filename`` set)."""


class SourceNotFoundError(SourceIOError, FileNotFoundError):
    """A local file (an image, a change list) does not exist (``errno`` ``ENOENT``)."""


class SourcePermissionError(SourceIOError, PermissionError):
    """A local file may not be read or written (``errno`` ``EACCES`` or ``EPERM``)."""


class InvalidImageError(Error, ValueError):
    """A source image is malformed."""


class UnsupportedImageError(Error, ValueError):
    """A source image is well formed but of a kind this version cannot read."""


class InvalidChangeListError(Error, ValueError):
    """A change list (VMware CBT, Hyper-V RCT, extents) is malformed or does not fit the disk."""


class CorruptError(Error, OSError):
    """An object in the store is damaged: truncated, altered, or failed authentication."""


class NotFoundError(Error, FileNotFoundError):
    """Something named does not exist: a snapshot, a job, a store, an image's parent."""


class UnsupportedVersionError(Error, RuntimeError):
    """The store was written by a newer blockferry."""


class CredentialsError(Error, PermissionError):
    """The passphrase does not unlock the store's key, or none was given."""


class AccessDeniedError(Error, PermissionError):
    """The object store refused the credentials or denied the access."""


class StoreError(Error, OSError):
    """The store backend failed (I/O on the store, not on the source)."""


class VerifyMismatchError(Error, ValueError):
    """A restored or stored chunk does not match its source."""


class ConfigError(Error, ValueError):
    """Invalid arguments or configuration."""


class BusyError(Error, OSError):
    """Another process holds what this needs: a running job, or the store during a gc."""


class CancelledError(Error):
    """The operation was cancelled on request (a replication keeps its progress)."""


class InternalError(Error, RuntimeError):
    """A bug in blockferry: an internal invariant broke. Please report it."""


#: The exception class of each engine error kind.
KINDS = {
    "io": SourceIOError,
    "invalid_image": InvalidImageError,
    "unsupported_image": UnsupportedImageError,
    "invalid_change_list": InvalidChangeListError,
    "corrupt": CorruptError,
    "not_found": NotFoundError,
    "unsupported_version": UnsupportedVersionError,
    "credentials": CredentialsError,
    "access_denied": AccessDeniedError,
    "store": StoreError,
    "verify_mismatch": VerifyMismatchError,
    "config": ConfigError,
    "busy": BusyError,
    "cancelled": CancelledError,
    "internal": InternalError,
}
