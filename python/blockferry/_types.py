"""The typed values blockferry returns: reports, snapshots, images, progress and events.

All are frozen dataclasses built from what the native module returns (the same fields as the
CLI's ``--json`` output). Sizes are in bytes, times in seconds unless a name says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

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
    "ExportReport",
    "Snapshot",
    "SnapshotStats",
    "Started",
    "StoreConfig",
    "VerifyReport",
    "VirtualMachine",
    "Validation",
    "Check",
    "VmDisk",
    "VmSnapshot",
    "Nic",
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
    """Counters of a running operation.

    Attributes:
        phase: ``replicating``, ``committing``, ``restoring``, ``verifying`` or
            ``collecting``.
        bytes_total: Virtual bytes the phase covers.
        bytes_done: Virtual bytes done (read, found zero, skipped as unallocated or
            unchanged).
        bytes_read: Bytes read from the source.
        bytes_zero: Bytes found zero or unallocated.
        bytes_deduplicated: Bytes the store already held.
        bytes_written: Bytes written to the store (replicate) or to the output (restore).
        bytes_skipped: Of ``bytes_done``, bytes counted done without work (durable from an
            earlier run of the job, or unchanged since a delta's base).
        parts_in_flight: Parts being uploaded right now.
        elapsed: Seconds since the phase started.
        rate: Virtual bytes worked through per second, on average.
        eta: Seconds left at that rate, if known.
        io_engine: The read engine (``pread`` or ``io_uring``) of a replication, else empty.
    """

    phase: str
    bytes_total: int
    bytes_done: int
    bytes_read: int
    bytes_zero: int
    bytes_deduplicated: int
    bytes_written: int
    bytes_skipped: int
    parts_in_flight: int
    elapsed: float
    rate: float
    eta: Optional[float]
    io_engine: str

    @property
    def fraction(self) -> float:
        """Share of the phase done, from 0 to 1."""
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass(frozen=True)
class Started:
    """A phase started.

    Attributes:
        phase: The phase (as :attr:`Progress.phase`).
        bytes_total: Virtual bytes it covers.
    """

    phase: str
    bytes_total: int
    type: str = "started"


@dataclass(frozen=True)
class ProgressEvent:
    """Counters moved (rate-limited).

    Attributes:
        progress: The counters now.
    """

    progress: Progress
    type: str = "progress"


@dataclass(frozen=True)
class WarningEvent:
    """Something the user should know that does not stop the operation.

    Attributes:
        phase: The phase it happened in (as :attr:`Progress.phase`).
        message: What happened.
    """

    phase: str
    message: str
    type: str = "warning"


@dataclass(frozen=True)
class NoteEvent:
    """What the operation is doing, worth telling (a cutover's steps and predictions).

    Attributes:
        phase: The phase it happened in (as :attr:`Progress.phase`).
        message: What it did.
    """

    phase: str
    message: str
    type: str = "note"


@dataclass(frozen=True)
class Finished:
    """A phase finished (the operation's result says whether it succeeded).

    Attributes:
        progress: The counters at the end of the phase.
    """

    progress: Progress
    type: str = "finished"


#: What an operation reports while it runs.
Event = Union[Started, ProgressEvent, WarningEvent, NoteEvent, Finished]


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
    if kind == "note":
        return NoteEvent(phase=d["phase"], message=d["message"])
    return Finished(progress=_progress(d))


@dataclass(frozen=True)
class ChangeRecord:
    """How a delta snapshot was made from its base.

    Attributes:
        source: The change list's format (``vmware-cbt``, ``hyperv-rct``, ``extents``,
            ``chain``, ``hash``).
        base_change_id: The change id the list was taken against.
        bytes_listed: Bytes the list named.
        fallback: Why every chunk was compared instead (the list could not be trusted), if
            so.
        sample_chunks: Chunks the list called unchanged that were read to check it.
        sample_mismatches: Of those, how many had changed.
    """

    source: str
    base_change_id: Optional[str]
    bytes_listed: int
    fallback: Optional[str]
    sample_chunks: int
    sample_mismatches: int


@dataclass(frozen=True)
class ReplicateReport:
    """What a replication did.

    Attributes:
        snapshot: The new snapshot's id.
        disk: The disk's name in the store.
        virtual_size: Virtual size of the disk.
        allocated_bytes: Bytes the source reported allocated.
        bytes_read: Bytes read from the source.
        bytes_zero: Bytes recorded as zero (unallocated, or read and found zero).
        bytes_deduplicated: Bytes of chunks the store already held.
        bytes_new: Plaintext bytes of new chunks.
        bytes_stored: Bytes written to the store (packs with their headers).
        bytes_copied: Chunk bytes copied in user space between the read buffers and the
            store writer (a debug statistic of the zero-copy path).
        chunks_total: Chunk positions of the disk.
        chunks_stored: New chunks stored.
        packs_written: Packs written.
        seconds: Wall time in seconds.
        io_engine: The read engine used (``pread`` or ``io_uring``).
        workers: Worker threads used.
        uploads: Threads taking finished packs from the workers (uploaders on a multipart
            store, the one pack writer on a store that takes packs whole).
        bytes_unchanged: Bytes a delta took from its base without reading them.
        base: The base snapshot of a delta.
        changes: How a delta used its change list, for a delta.
        memory_budget: Bytes the pipeline's buffers may use (as given, or the default
            picked).
        memory_planned: Bytes the pipeline's buffers can reach at most.
        job: The job id (None when run without job state).
        resumed: Whether this run resumed an interrupted one.
        bytes_resumed: Bytes an earlier run had made durable (neither read nor sent again).
    """

    snapshot: str
    disk: str
    virtual_size: int
    allocated_bytes: int
    bytes_read: int
    bytes_zero: int
    bytes_deduplicated: int
    bytes_new: int
    bytes_stored: int
    bytes_copied: int
    chunks_total: int
    chunks_stored: int
    packs_written: int
    seconds: float
    io_engine: str
    workers: int
    uploads: int
    bytes_unchanged: int
    base: Optional[str]
    changes: Optional[ChangeRecord]
    memory_budget: int
    memory_planned: int
    job: Optional[str]
    resumed: bool
    bytes_resumed: int

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ReplicateReport":
        c = d.get("changes")
        return _build(cls, d, changes=_build(ChangeRecord, c) if c else None)


@dataclass(frozen=True)
class SyncCycle:
    """One cycle of a continuous replication (:meth:`blockferry.Store.sync`).

    Attributes:
        cycle: Cycles run so far, this one included.
        lag_seconds: The replication lag (RPO): seconds since the view of the disk the
            newest snapshot holds was taken (None before the first).
        last_success_unix_ms: When that view was taken, ms since the Unix epoch.
        report: The cycle's replication; None when it had nothing to do (no list dropped) or
            failed.
        error: Why the cycle failed (the next one tries again), or None.
    """

    cycle: int
    lag_seconds: Optional[float]
    last_success_unix_ms: Optional[int]
    report: Optional[ReplicateReport] = None
    error: Optional[BaseException] = None

    @classmethod
    def _from(cls, d: Mapping[str, Any], error: Optional[BaseException] = None) -> "SyncCycle":
        r = d.get("report")
        return _build(cls, d, report=ReplicateReport._from(r) if r else None, error=error)


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote.

    Attributes:
        snapshot: The id of the snapshot exported.
        disk: The disk of the snapshot exported.
        format: The image format: ``raw``, ``vmdk``, ``vhdx``, ``vhd`` or ``vhd-fixed``.
        output: Where it was written.
        virtual_size: The disk's size in the image (a fixed VHD's is rounded up to a whole
            MiB).
        file_size: The image file's size (sparse: only data and metadata take space).
        bytes_written: Bytes of the disk's data written.
        seconds: Wall time in seconds.
        bytes_sent: To an object: bytes uploaded by this call.
        bytes_copied: To an object: bytes the store copied from the base export.
        bytes_resumed: To an object: bytes of parts an earlier, stopped call had sent.
        parts: To an object: the upload's parts (0 for a file).
        base: To an object: the snapshot of the base export of a delta, if any.
        job: To an object: the job that records the upload until it is done.
        resumed: To an object: whether this call continued a stopped one.
        etag: To an object: the object's ETag.
    """

    snapshot: str
    disk: str
    format: str
    output: str
    virtual_size: int
    file_size: int
    bytes_written: int
    seconds: float
    bytes_sent: int = 0
    bytes_copied: int = 0
    bytes_resumed: int = 0
    parts: int = 0
    base: Optional[str] = None
    job: Optional[str] = None
    resumed: bool = False
    etag: Optional[str] = None

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ExportReport":
        return _build(cls, d)


@dataclass(frozen=True)
class CutoverReport:
    """What a cutover did.

    Attributes:
        outcome: ``completed``, ``rolled-back`` (failed after the pre-hook; the rollback
            hook ran) or ``failed`` (before it; nothing was stopped).
        steps: Every step in order: dicts of ``name``, ``started_unix_ms``,
            ``ended_unix_ms``, ``seconds``, ``ok``, ``detail``.
        cycles: Sync cycles run before the cutover.
        predicted_downtime_seconds: The downtime predicted when it started.
        measured_downtime_seconds: Pre-hook start to post-hook end (or to the failure).
        rpo_seconds: The newest snapshot's age when the cutover started.
        snapshot: The final snapshot.
        final_delta_bytes: Bytes the final delta stored.
        verified_chunks: Chunks read back after the final delta.
        verified: Whether they all were intact.
        target: Where the target is.
        error: Why it failed, if it did.
    """

    outcome: str
    steps: List[Dict[str, Any]]
    cycles: int
    predicted_downtime_seconds: Optional[float]
    measured_downtime_seconds: Optional[float]
    rpo_seconds: Optional[float]
    snapshot: Optional[str]
    final_delta_bytes: int
    verified_chunks: int
    verified: bool
    target: str
    error: Optional[str]

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "CutoverReport":
        return _build(cls, d)


@dataclass(frozen=True)
class RestoreReport:
    """What a restore wrote.

    Attributes:
        snapshot: The id of the snapshot restored.
        output: Where it was written.
        virtual_size: Virtual size of the disk.
        bytes_written: Bytes of data written.
        bytes_zero: Bytes left as holes (or written as zeros on a device). ``bytes_written +
            bytes_zero + bytes_unreadable == virtual_size``.
        block_device: Whether the output is a block device.
        seconds: Wall time in seconds.
        disk: The disk of the snapshot restored.
        bytes_unreadable: Bytes of chunks a salvage could not read (left zero).
        problems_total: Chunks a salvage could not read, counted.
        unreadable: The first 1000 of them, by offset.
    """

    snapshot: str
    output: str
    virtual_size: int
    bytes_written: int
    bytes_zero: int
    block_device: bool
    seconds: float
    disk: str = ""
    bytes_unreadable: int = 0
    problems_total: int = 0
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
    """One thing a verification found wrong.

    Attributes:
        offset: Virtual offset of the chunk (or page) concerned, if known.
        message: What is wrong, with the object concerned.
    """

    offset: Optional[int]
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """What a verification found.

    Attributes:
        snapshot: The id of the snapshot checked.
        virtual_size: Virtual size of the disk.
        chunks_checked: Distinct stored chunks decrypted and checked against their ids.
        bytes_checked: Virtual bytes the check covered.
        image_compared: Whether the source image was compared too.
        problems: The first 1000 problems (``problems_total`` counts them all).
        problems_total: Number of problems found.
        seconds: Wall time in seconds.
        ok: Whether the snapshot checked out (no problems).
        disk: The disk of the snapshot checked.
    """

    snapshot: str
    virtual_size: int
    chunks_checked: int
    bytes_checked: int
    image_compared: bool
    problems: List[Problem]
    problems_total: int
    seconds: float
    ok: bool
    disk: str = ""

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "VerifyReport":
        return _build(cls, d, problems=[_build(Problem, p) for p in d["problems"]])


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote.

    Attributes:
        virtual_size: Virtual size written.
        bytes_read: Bytes read from the source.
        bytes_written: Bytes of data written.
        seconds: Wall time in seconds.
        bytes_zero: Bytes left as holes (zeros on a device): ``bytes_written + bytes_zero ==
            virtual_size``.
    """

    virtual_size: int
    bytes_read: int
    bytes_written: int
    seconds: float
    bytes_zero: int = 0


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection did (or would do, on a dry run).

    Attributes:
        snapshots: Snapshots whose data was kept.
        chunks_live: Distinct chunks they reference.
        chunks_missing: Referenced chunks found in no pack (damage: run verify).
        packs_before: Packs in the store when the gc started.
        packs_deleted: Packs deleted because no snapshot needs any of their chunks.
        packs_repacked: Packs whose live chunks were moved into new packs, then deleted.
        packs_written: New packs written by the repack.
        packs_unreadable: Packs left alone because their chunk list could not be read.
        pages_deleted: Pages (manifest pieces) deleted.
        index_objects_replaced: Index objects replaced by the new index.
        bytes_before: Bytes of packs, pages and index objects when the gc started.
        bytes_after: The same after it (planned, on a dry run).
        bytes_repacked: Bytes of chunk records moved by the repack.
        bytes_unused_left: Bytes no snapshot needs that stay in packs (within
            ``max_unused``).
        waited_ms: Time spent waiting for the store's other users, in ms.
        dry_run: Whether nothing was changed.
    """

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
    """Snapshots a prune kept and forgot.

    Attributes:
        kept: Ids of the snapshots kept.
        forgotten: Ids of the snapshots forgotten (or to forget, on a dry run).
        dry_run: Whether nothing was deleted.
    """

    kept: List[str]
    forgotten: List[str]
    dry_run: bool


@dataclass(frozen=True)
class CleanupReport:
    """Stale multipart uploads a cleanup aborted.

    Attributes:
        aborted: Keys of the packs whose uploads were aborted (or would be, on a dry run).
        kept: Uploads left alone: too young, resumable by a job here, or not blockferry's.
        dry_run: Whether nothing was aborted.
    """

    aborted: List[str]
    kept: int
    dry_run: bool


@dataclass(frozen=True)
class SnapshotStats:
    """Counters of the run that made a snapshot.

    Attributes:
        bytes_read: Bytes read from the source.
        bytes_zero: Bytes recorded as zero (unallocated, or read and found zero).
        bytes_deduplicated: Bytes of chunks the store already held.
        bytes_new: Plaintext bytes of chunks stored by the run.
        bytes_stored: Bytes of packs written to the store by the run (with their headers).
        chunks_stored: Chunks stored by the run.
        bytes_unchanged: Bytes a delta took from its parent snapshot without reading them.
    """

    bytes_read: int
    bytes_zero: int
    bytes_deduplicated: int
    bytes_new: int
    bytes_stored: int
    chunks_stored: int
    bytes_unchanged: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A snapshot in a store.

    Attributes:
        id: The snapshot's id (16 hex digits).
        created_unix_ms: Creation time, ms since the Unix epoch.
        disk: The disk's name.
        source: The image it was read from.
        format: The image's format (``raw``, ``vhdx``, ...).
        virtual_size: Virtual size of the disk.
        chunk_size: Chunk size of its chunk map, in bytes.
        parent: The snapshot it is a delta on, if any.
        change_id: The source's change-tracking id at this snapshot, if any.
        changes: How it was made from its parent, for a delta.
        stats: Counters of the run that made it.
        member: Which disk of a multi-disk image (an OVA member), if any.
        seq: Its place in the disk's history (1 for the disk's first; 0 for a format-1
            snapshot).
        previous: The disk's snapshot before it, if any.
    """

    id: str
    created_unix_ms: int
    disk: str
    source: str
    format: str
    virtual_size: int
    chunk_size: int
    parent: Optional[str]
    change_id: Optional[str]
    changes: Optional[ChangeRecord]
    stats: SnapshotStats
    member: Optional[str] = None
    seq: int = 0
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
    """A store's fixed settings.

    Attributes:
        location: Where the store lives (a folder or ``s3://bucket/prefix``).
        store_id: The store's id, hex.
        chunk_size: Chunk size in bytes.
        encrypted: Whether chunks and metadata are encrypted.
        format_version: Store format version.
        created_unix_ms: Creation time, ms since the Unix epoch.
    """

    location: str
    store_id: str
    chunk_size: int
    encrypted: bool
    format_version: int
    created_unix_ms: int


@dataclass(frozen=True)
class Layer:
    """One file of an image's chain.

    Attributes:
        file: The file's path.
        format: Its format (``raw``, ``vhdx``, ...).
        subformat: Its subformat (``fixed``, ``dynamic``, ``differencing``, ...), empty when
            the format has none.
        virtual_size: Its virtual size.
        notes: Anything unusual about it.
    """

    file: str
    format: str
    subformat: str
    virtual_size: int
    notes: List[str]


@dataclass(frozen=True)
class ImageInfo:
    """What a disk image is.

    Attributes:
        file: The image file as given.
        format: Format of the top file (``raw``, ``vhdx``, ...).
        subformat: Subformat of the top file (``fixed``, ``dynamic``, ``differencing``,
            ...), empty when the format has none.
        virtual_size: Size of the virtual disk.
        logical_sector_size: Logical sector size in bytes.
        physical_sector_size: Physical sector size in bytes.
        allocated_bytes: Bytes that hold (or may hold) data in the image and its parents.
        notes: Anything unusual a user should know (an unclean-shutdown flag, a repaired
            header, ...).
        chain: The chain's files, top first (one when the image has no parent).
        change_id: The identity a child of this image records (a delta ``--changes-from-
            chain`` checks it).
    """

    file: str
    format: str
    subformat: str
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    allocated_bytes: int
    notes: List[str]
    chain: List[Layer]
    change_id: Optional[str]

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ImageInfo":
        return _build(cls, d, chain=[_build(Layer, x) for x in d["chain"]])


@dataclass(frozen=True)
class Extent:
    """A range of the allocation map.

    Attributes:
        start: First virtual byte.
        length: Bytes the range covers.
        kind: ``data``, ``zero`` or ``unallocated``.
        file: For data: the file holding it and the offset there.
        offset: For data: the offset in ``file`` (for a compressed grain, the grain's).
    """

    start: int
    length: int
    kind: str
    file: Optional[str]
    offset: Optional[int]


@dataclass(frozen=True)
class ChangeList:
    """A parsed change list, checked against its disk.

    Attributes:
        format: ``vmware-cbt``, ``hyperv-rct`` or ``extents``.
        base_change_id: The change id the list was taken against (``*``: every allocated
            area).
        new_change_id: The source's change id now, if the list carries it.
        extents: Sorted, disjoint ``(offset, length)`` ranges.
        bytes: Bytes the ranges cover.
    """

    format: str
    base_change_id: Optional[str]
    new_change_id: Optional[str]
    extents: List[Tuple[int, int]]
    bytes: int

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ChangeList":
        return _build(cls, d, extents=[(int(o), int(n)) for o, n in d["extents"]])


@dataclass(frozen=True)
class Job:
    """A replication job of the job database.

    Attributes:
        id: The job's id (16 hex digits).
        store: The store's location as given when the job started.
        store_id: The store's id.
        source: The source image, as an absolute path.
        disk: Which disk of a multi-disk source (an OVA), or empty.
        chunk_size: Chunk size of the store, in bytes.
        state: ``active`` (running, or stopped and resumable) or ``done``.
        snapshot: The snapshot a finished job made.
        runs: Runs so far (the first and every resume).
        bytes_sent: Bytes of parts and packs the store acknowledged, over all runs.
        bytes_resent: Bytes sent again because they were in flight when a run stopped.
        created_unix_ms: When the job started, ms since the Unix epoch.
        updated_unix_ms: When the job database last recorded a change to it, ms since the
            Unix epoch.
        last_error: The error the last run stopped on, if it failed.
        running: Whether a process is running it now.
    """

    id: str
    store: str
    store_id: str
    source: str
    disk: str
    chunk_size: int
    state: str
    snapshot: Optional[str]
    runs: int
    bytes_sent: int
    bytes_resent: int
    created_unix_ms: int
    updated_unix_ms: int
    last_error: Optional[str]
    running: bool


@dataclass(frozen=True)
class DiscoveredImage:
    """An image file found by :func:`blockferry.discover`.

    Attributes:
        path: The file.
        ova_disk: For an OVA: which of its disks.
        role: ``disk`` (replicate it), ``parent`` (of another image's chain), ``extent``
            (data file of a descriptor) or ``unreadable``.
        format: Format of the top file (``vmdk``, ``vhdx``, ...); empty when unreadable.
        subformat: Subformat of the top file.
        virtual_size: Virtual size (0 when unreadable).
        allocated_bytes: Bytes allocated in the whole chain.
        chain: The chain's files, top first.
        error: Why it could not be opened (a :class:`blockferry.Error`), for ``unreadable``.
    """

    path: str
    ova_disk: Optional[int]
    role: str
    format: str
    subformat: str
    virtual_size: int
    allocated_bytes: int
    chain: List[str]
    error: Optional[BaseException] = field(default=None, compare=False)


@dataclass(frozen=True)
class Nic:
    """A VM's network adapter (see :class:`VirtualMachine`).

    Attributes:
        name: Its name in the configuration (``ethernet0``, the OVF item's, Hyper-V's).
        kind: Adapter type (``vmxnet3``, ``e1000e``, ``synthetic``, ``legacy``, ...).
        mac: MAC address as ``aa:bb:cc:dd:ee:ff``, if the configuration has one.
        mac_static: Whether the MAC was set by hand rather than generated.
        network: The network (port group, virtual switch) it connects to.
        connected: Whether it is connected at power on.
    """

    name: str
    kind: Optional[str]
    mac: Optional[str]
    mac_static: Optional[bool]
    network: Optional[str]
    connected: Optional[bool]


@dataclass(frozen=True)
class VmDisk:
    """A disk of a VM: where it is attached and the image chain behind it.

    Attributes:
        controller: The controller (``scsi0``, ``sata0``, ``ide1``, the OVF's name).
        controller_type: Its type (``pvscsi``, ``lsilogic``, ``ahci``, ``ide``, ...).
        slot: The slot (``scsi0:1``).
        configured_path: The file as the configuration names it.
        path: The image file it resolves to under the folder, if found.
        ova_disk: For a disk inside an OVA, its index there.
        capacity: The capacity the configuration states (OVF), if any.
        format: The image's format, when resolved.
        virtual_size: The image's virtual size, when resolved.
        allocated_bytes: Bytes allocated in its chain, when resolved.
        chain: The chain's files, top first.
        problem: Why it could not be resolved or read.
    """

    controller: str
    controller_type: Optional[str]
    slot: str
    configured_path: str
    path: Optional[str]
    ova_disk: Optional[int]
    capacity: Optional[int]
    format: Optional[str]
    virtual_size: Optional[int]
    allocated_bytes: Optional[int]
    chain: List[str]
    problem: Optional[str]


@dataclass(frozen=True)
class VmSnapshot:
    """A snapshot as the VM's configuration records it.

    Attributes:
        id: Its id.
        name: Its display name.
        parent: The id of the snapshot it was taken on.
        current: Whether the VM runs on it.
        disks: The disk files it froze.
    """

    id: str
    name: str
    parent: Optional[str]
    current: bool
    disks: List[str]


@dataclass(frozen=True)
class VirtualMachine:
    """A VM found by :func:`blockferry.discover_vms`.

    Attributes:
        config: The configuration file (``.vmx``, ``.ovf``, ``.ova``, ``.vmcx``).
        kind: ``vmx``, ``ovf``, ``ova`` or ``vmcx``.
        system: For an OVF with several virtual systems, which one.
        name: The VM's name.
        id: Its id or UUID.
        cpus: Virtual CPUs.
        memory_bytes: Memory in bytes.
        firmware: ``bios`` or ``efi``.
        secure_boot: Whether UEFI secure boot is on.
        guest_os: The guest OS as configured.
        encrypted: Whether the configuration says the VM is encrypted.
        nics: Network adapters.
        disks: Disks, each resolved to its image chain.
        snapshots: Snapshots the configuration records.
        warnings: What could be read only in part.
        error: Why the configuration could not be read (a :class:`blockferry.Error`).
    """

    config: str
    kind: Optional[str]
    system: Optional[str]
    name: Optional[str]
    id: Optional[str]
    cpus: Optional[int]
    memory_bytes: Optional[int]
    firmware: Optional[str]
    secure_boot: Optional[bool]
    guest_os: Optional[str]
    encrypted: bool
    nics: List[Nic]
    disks: List[VmDisk]
    snapshots: List[VmSnapshot]
    warnings: List[str]
    error: Optional[BaseException] = field(default=None, compare=False)


@dataclass(frozen=True)
class Check:
    """One readiness check (see :func:`blockferry.validate`).

    Attributes:
        id: Which check (``chain``, ``disk-size``, ``boot``, ``os``, ...).
        subject: What it ran on: the VM, a disk's file, the store.
        status: ``pass``, ``warn`` or ``fail``.
        reason: What was found.
        fix: What to do, when it did not pass.
    """

    id: str
    subject: str
    status: str
    reason: str
    fix: Optional[str]


@dataclass(frozen=True)
class Validation:
    """The result of :func:`blockferry.validate`.

    Attributes:
        subject: What was validated.
        target: ``aws``, ``azure`` or ``generic``.
        checks: Every check, VM checks first, then each disk's.
        passed: No check failed.
        warnings: How many checks warned.
    """

    subject: str
    target: str
    checks: List[Check]
    passed: bool
    warnings: int
