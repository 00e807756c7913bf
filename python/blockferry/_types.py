"""The typed values blockferry returns: reports, snapshots, images, progress and events.

All are frozen dataclasses built from what the native module returns (the same fields as the
CLI's ``--json`` output). Sizes are in bytes, times in seconds unless a name says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Tuple, Type, TypeVar, Union

__all__ = [
    "ChangeList",
    "ChangeRecord",
    "CleanupReport",
    "ConvertReport",
    "DiscoveredImage",
    "Event",
    "Extent",
    "Finished",
    "GcReport",
    "ImageInfo",
    "Job",
    "Layer",
    "Problem",
    "Progress",
    "ProgressEvent",
    "PruneReport",
    "ReplicateReport",
    "RestoreReport",
    "Snapshot",
    "SnapshotStats",
    "Started",
    "StoreConfig",
    "VerifyReport",
    "WarningEvent",
]

T = TypeVar("T")


def _build(cls: Type[T], d: Mapping[str, Any], **nested: Any) -> T:
    """``cls`` from the dict ``d``: its fields taken by name (keys it does not know are left
    out, so a newer engine's extra fields do not break an older package), ``nested`` first."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs.update(nested)
    return cls(**kwargs)


@dataclass(frozen=True)
class Progress:
    """Counters of a running operation."""

    #: ``replicating``, ``committing``, ``restoring``, ``verifying`` or ``collecting``.
    phase: str
    #: Virtual bytes the phase covers.
    bytes_total: int
    #: Virtual bytes done (read, found zero, skipped as unallocated or unchanged).
    bytes_done: int
    #: Bytes read from the source.
    bytes_read: int
    #: Bytes found zero or unallocated.
    bytes_zero: int
    #: Bytes the store already held.
    bytes_deduplicated: int
    #: Bytes written to the store (replicate) or to the output (restore).
    bytes_written: int
    #: Of ``bytes_done``, bytes counted done without work (durable from an earlier run of
    #: the job, or unchanged since a delta's base).
    bytes_skipped: int
    #: Parts being uploaded right now.
    parts_in_flight: int
    #: Seconds since the phase started.
    elapsed: float
    #: Virtual bytes worked through per second, on average.
    rate: float
    #: Seconds left at that rate, if known.
    eta: Optional[float]
    #: The read engine (``pread`` or ``io_uring``) of a replication, else empty.
    io_engine: str

    @property
    def fraction(self) -> float:
        """Share of the phase done, from 0 to 1."""
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass(frozen=True)
class Started:
    """A phase started."""

    phase: str
    bytes_total: int
    type: str = "started"


@dataclass(frozen=True)
class ProgressEvent:
    """Counters moved (rate-limited)."""

    progress: Progress
    type: str = "progress"


@dataclass(frozen=True)
class WarningEvent:
    """Something the user should know that does not stop the operation."""

    phase: str
    message: str
    type: str = "warning"


@dataclass(frozen=True)
class Finished:
    """A phase finished (the operation's result says whether it succeeded)."""

    progress: Progress
    type: str = "finished"


#: What an operation reports while it runs.
Event = Union[Started, ProgressEvent, WarningEvent, Finished]


def _progress(d: Mapping[str, Any]) -> Progress:
    return _build(Progress, d)


def _event(d: Mapping[str, Any]) -> Event:
    kind = d["type"]
    if kind == "started":
        return Started(phase=d["phase"], bytes_total=d["bytes_total"])
    if kind == "progress":
        return ProgressEvent(progress=_progress(d))
    if kind == "warning":
        return WarningEvent(phase=d["phase"], message=d["message"])
    return Finished(progress=_progress(d))


@dataclass(frozen=True)
class ChangeRecord:
    """How a delta snapshot was made from its base."""

    #: The change list's format (``vmware-cbt``, ``hyperv-rct``, ``extents``, ``chain``,
    #: ``hash``).
    source: str
    #: The change id the list was taken against.
    base_change_id: Optional[str]
    #: Bytes the list named.
    bytes_listed: int
    #: Why every chunk was compared instead (the list could not be trusted), if so.
    fallback: Optional[str]
    #: Chunks the list called unchanged that were read to check it.
    sample_chunks: int
    #: Of those, how many had changed.
    sample_mismatches: int


@dataclass(frozen=True)
class ReplicateReport:
    """What a replication did."""

    snapshot: str
    disk: str
    virtual_size: int
    allocated_bytes: int
    bytes_read: int
    bytes_zero: int
    bytes_deduplicated: int
    #: Plaintext bytes of new chunks.
    bytes_new: int
    #: Bytes written to the store (packs with their headers).
    bytes_stored: int
    bytes_copied: int
    chunks_total: int
    chunks_stored: int
    packs_written: int
    seconds: float
    io_engine: str
    workers: int
    uploads: int
    #: Bytes a delta took from its base without reading them.
    bytes_unchanged: int
    #: The base snapshot of a delta.
    base: Optional[str]
    changes: Optional[ChangeRecord]
    memory_budget: int
    memory_planned: int
    #: The job id (None when run without job state).
    job: Optional[str]
    #: Whether this run resumed an interrupted one.
    resumed: bool
    #: Bytes an earlier run had made durable (neither read nor sent again).
    bytes_resumed: int

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ReplicateReport":
        c = d.get("changes")
        return _build(cls, d, changes=_build(ChangeRecord, c) if c else None)


@dataclass(frozen=True)
class SyncCycle:
    """One cycle of a continuous replication (:meth:`blockferry.Store.sync`)."""

    #: Cycles run so far, this one included.
    cycle: int
    #: The replication lag (RPO): seconds since the view of the disk the newest snapshot
    #: holds was taken (None before the first).
    lag_seconds: Optional[float]
    #: When that view was taken, ms since the Unix epoch.
    last_success_unix_ms: Optional[int]
    #: The cycle's replication; None when it had nothing to do (no list dropped) or failed.
    report: Optional[ReplicateReport] = None
    #: Why the cycle failed (the next one tries again), or None.
    error: Optional[BaseException] = None

    @classmethod
    def _from(cls, d: Mapping[str, Any], error: Optional[BaseException] = None) -> "SyncCycle":
        r = d.get("report")
        return _build(cls, d, report=ReplicateReport._from(r) if r else None, error=error)


@dataclass(frozen=True)
class RestoreReport:
    """What a restore wrote."""

    snapshot: str
    output: str
    virtual_size: int
    #: Bytes of data written.
    bytes_written: int
    #: Bytes left as holes (or written as zeros on a device). ``bytes_written +
    #: bytes_zero + bytes_unreadable == virtual_size``.
    bytes_zero: int
    block_device: bool
    seconds: float
    #: The disk of the snapshot restored.
    disk: str = ""
    #: Bytes of chunks a salvage could not read (left zero).
    bytes_unreadable: int = 0
    #: Chunks a salvage could not read, counted.
    problems_total: int = 0
    #: The first 1000 of them, by offset.
    unreadable: List["Problem"] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every chunk was restored."""
        return self.problems_total == 0

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "RestoreReport":
        return _build(cls, d, unreadable=[_build(Problem, p) for p in d.get("unreadable", [])])


@dataclass(frozen=True)
class Problem:
    """One thing a verification found wrong."""

    offset: Optional[int]
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """What a verification found."""

    snapshot: str
    virtual_size: int
    chunks_checked: int
    bytes_checked: int
    image_compared: bool
    #: The first 1000 problems (``problems_total`` counts them all).
    problems: List[Problem]
    problems_total: int
    seconds: float
    #: Whether the snapshot checked out (no problems).
    ok: bool
    #: The disk of the snapshot checked.
    disk: str = ""

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "VerifyReport":
        return _build(cls, d, problems=[_build(Problem, p) for p in d["problems"]])


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote."""

    virtual_size: int
    bytes_read: int
    bytes_written: int
    seconds: float
    #: Bytes left as holes (zeros on a device): ``bytes_written + bytes_zero ==
    #: virtual_size``.
    bytes_zero: int = 0


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection did (or would do, on a dry run)."""

    snapshots: int
    chunks_live: int
    chunks_missing: int
    packs_before: int
    packs_deleted: int
    packs_repacked: int
    packs_written: int
    packs_unreadable: int
    pages_deleted: int
    index_objects_replaced: int
    bytes_before: int
    bytes_after: int
    bytes_repacked: int
    bytes_unused_left: int
    waited_ms: int
    dry_run: bool


@dataclass(frozen=True)
class PruneReport:
    """Snapshots a prune kept and forgot."""

    kept: List[str]
    forgotten: List[str]
    dry_run: bool


@dataclass(frozen=True)
class CleanupReport:
    """Stale multipart uploads a cleanup aborted."""

    aborted: List[str]
    kept: int
    dry_run: bool


@dataclass(frozen=True)
class SnapshotStats:
    """Counters of the run that made a snapshot."""

    bytes_read: int
    bytes_zero: int
    bytes_deduplicated: int
    bytes_new: int
    bytes_stored: int
    chunks_stored: int
    bytes_unchanged: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A snapshot in a store."""

    id: str
    created_unix_ms: int
    #: The disk's name.
    disk: str
    #: The image it was read from.
    source: str
    format: str
    virtual_size: int
    chunk_size: int
    #: The snapshot it is a delta on, if any.
    parent: Optional[str]
    change_id: Optional[str]
    changes: Optional[ChangeRecord]
    stats: SnapshotStats
    #: Which disk of a multi-disk image (an OVA member), if any.
    member: Optional[str] = None
    #: Its place in the disk's history (1 for the disk's first; 0 for a format-1 snapshot).
    seq: int = 0
    #: The disk's snapshot before it, if any.
    previous: Optional[str] = None

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "Snapshot":
        c = d.get("changes")
        return _build(
            cls,
            d,
            changes=_build(ChangeRecord, c) if c else None,
            stats=_build(SnapshotStats, d["stats"]),
        )


@dataclass(frozen=True)
class StoreConfig:
    """A store's fixed settings."""

    location: str
    store_id: str
    chunk_size: int
    encrypted: bool
    format_version: int
    created_unix_ms: int


@dataclass(frozen=True)
class Layer:
    """One file of an image's chain."""

    file: str
    format: str
    subformat: str
    virtual_size: int
    notes: List[str]


@dataclass(frozen=True)
class ImageInfo:
    """What a disk image is."""

    #: The image file as given.
    file: str
    format: str
    subformat: str
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    #: Bytes that hold (or may hold) data in the image and its parents.
    allocated_bytes: int
    notes: List[str]
    #: The chain's files, top first (one when the image has no parent).
    chain: List[Layer]
    #: The identity a child of this image records (a delta ``--changes-from-chain`` checks it).
    change_id: Optional[str]

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ImageInfo":
        return _build(cls, d, chain=[_build(Layer, x) for x in d["chain"]])


@dataclass(frozen=True)
class Extent:
    """A range of the allocation map."""

    start: int
    length: int
    #: ``data``, ``zero`` or ``unallocated``.
    kind: str
    #: For data: the file holding it and the offset there.
    file: Optional[str]
    offset: Optional[int]


@dataclass(frozen=True)
class ChangeList:
    """A parsed change list, checked against its disk."""

    #: ``vmware-cbt``, ``hyperv-rct`` or ``extents``.
    format: str
    #: The change id the list was taken against (``*``: every allocated area).
    base_change_id: Optional[str]
    #: The source's change id now, if the list carries it.
    new_change_id: Optional[str]
    #: Sorted, disjoint ``(offset, length)`` ranges.
    extents: List[Tuple[int, int]]
    #: Bytes the ranges cover.
    bytes: int

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ChangeList":
        return _build(cls, d, extents=[(int(o), int(n)) for o, n in d["extents"]])


@dataclass(frozen=True)
class Job:
    """A replication job of the job database."""

    id: str
    store: str
    store_id: str
    source: str
    disk: str
    chunk_size: int
    #: ``active`` (running, or stopped and resumable) or ``done``.
    state: str
    snapshot: Optional[str]
    runs: int
    bytes_sent: int
    bytes_resent: int
    created_unix_ms: int
    updated_unix_ms: int
    last_error: Optional[str]
    #: Whether a process is running it now.
    running: bool


@dataclass(frozen=True)
class DiscoveredImage:
    """An image file found by :func:`blockferry.discover`."""

    path: str
    #: For an OVA: which of its disks.
    ova_disk: Optional[int]
    #: ``disk`` (replicate it), ``parent`` (of another image's chain), ``extent`` (data file
    #: of a descriptor) or ``unreadable``.
    role: str
    format: str
    subformat: str
    virtual_size: int
    allocated_bytes: int
    #: The chain's files, top first.
    chain: List[str]
    #: Why it could not be opened (a :class:`blockferry.Error`), for ``unreadable``.
    error: Optional[BaseException] = field(default=None, compare=False)
