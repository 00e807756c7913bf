"""blockferry: move virtual-machine disks block by block into object storage and back.

Incremental, deduplicated, compressed, encrypted, resumable and verifiable. A sketch::

    import blockferry

    store = blockferry.Store.create("/backups/store", passphrase="secret")
    report = store.replicate("/vmfs/vm1/disk.vmdk", progress=print)
    store.verify(report.snapshot, image="/vmfs/vm1/disk.vmdk")
    store.restore(report.snapshot, "/tmp/disk.raw")

Long calls release the GIL, can be cancelled from another thread (start them with
``start_*`` to get an :class:`Operation`), and turn Ctrl-C into a clean cancel followed by
``KeyboardInterrupt``. Errors are :class:`Error` subclasses that also derive from the
matching builtin (``ValueError``, ``OSError``, ``PermissionError``…).

Processes: the engine runs threads, so a process pool should start its workers with
``spawn`` or ``forkserver`` rather than ``fork`` after blockferry was used.
"""

from ._api import (
    Changes,
    Operation,
    ProgressCallback,
    Store,
    abandon_job,
    convert,
    default_state_dir,
    discover,
    image_info,
    image_map,
    jobs,
    parse_changes,
    start_convert,
    version,
)
from ._errors import (
    AccessDeniedError,
    BusyError,
    CancelledError,
    ConfigError,
    CorruptError,
    CredentialsError,
    Error,
    InternalError,
    InvalidChangeListError,
    InvalidImageError,
    NotFoundError,
    SourceIOError,
    SourceNotFoundError,
    SourcePermissionError,
    StoreError,
    UnsupportedImageError,
    UnsupportedVersionError,
    VerifyMismatchError,
)
from ._types import (
    ChangeList,
    ChangeRecord,
    CleanupReport,
    ConvertReport,
    DiscoveredImage,
    Event,
    CutoverReport,
    ExportReport,
    Extent,
    Finished,
    GcReport,
    ImageInfo,
    Job,
    Layer,
    Problem,
    Progress,
    ProgressEvent,
    PruneReport,
    ReplicateReport,
    RestoreReport,
    Snapshot,
    SnapshotStats,
    Started,
    StoreConfig,
    SyncCycle,
    VerifyReport,
    NoteEvent,
    WarningEvent,
)

__version__ = version()

__all__ = [
    "AccessDeniedError",
    "BusyError",
    "CancelledError",
    "ChangeList",
    "ChangeRecord",
    "Changes",
    "CleanupReport",
    "ConfigError",
    "ConvertReport",
    "CorruptError",
    "CredentialsError",
    "DiscoveredImage",
    "Error",
    "Event",
    "Extent",
    "Finished",
    "GcReport",
    "ImageInfo",
    "InternalError",
    "InvalidChangeListError",
    "InvalidImageError",
    "Job",
    "Layer",
    "NotFoundError",
    "Operation",
    "Problem",
    "Progress",
    "ProgressCallback",
    "ProgressEvent",
    "PruneReport",
    "ReplicateReport",
    "RestoreReport",
    "CutoverReport",
    "ExportReport",
    "Snapshot",
    "SnapshotStats",
    "SourceIOError",
    "SourceNotFoundError",
    "SourcePermissionError",
    "Started",
    "Store",
    "StoreConfig",
    "SyncCycle",
    "StoreError",
    "UnsupportedImageError",
    "UnsupportedVersionError",
    "VerifyMismatchError",
    "VerifyReport",
    "NoteEvent",
    "WarningEvent",
    "abandon_job",
    "convert",
    "default_state_dir",
    "discover",
    "image_info",
    "image_map",
    "jobs",
    "parse_changes",
    "start_convert",
    "version",
]
