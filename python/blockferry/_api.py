"""The Python face of the engine: stores, operations, images, change lists and jobs."""

from __future__ import annotations

import json
import os
import time
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Generator,
    Generic,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from . import _native

if TYPE_CHECKING:
    import asyncio
from ._native import Store as _NativeStore
from ._native import SyncRun as _NativeSyncRun
from ._errors import CancelledError, ConfigError, Error
from ._types import (
    ChangeList,
    CleanupReport,
    ConvertReport,
    DiscoveredImage,
    Event,
    Extent,
    GcReport,
    ImageInfo,
    Job,
    Progress,
    PruneReport,
    ReplicateReport,
    CutoverReport,
    ExportReport,
    RestoreReport,
    Snapshot,
    StoreConfig,
    SyncCycle,
    VerifyReport,
    VirtualMachine,
    Validation,
    Check,
    VmDisk,
    VmSnapshot,
    Nic,
    _build,
    _event,
    _progress,
)

__all__ = [
    "Operation",
    "Store",
    "abandon_job",
    "convert",
    "default_state_dir",
    "discover",
    "discover_vms",
    "inspect",
    "validate",
    "image_info",
    "image_map",
    "jobs",
    "parse_changes",
    "start_convert",
    "version",
]

R = TypeVar("R")
PathLike = Union[str, "os.PathLike[str]"]
#: A progress callback: called with each :data:`Event` (progress at most every
#: ``progress_interval`` seconds) from a thread of the operation.
ProgressCallback = Callable[[Event], Any]
#: What changed since a delta's base: a change-list file, the ``(offset, length)`` ranges
#: themselves (as pyVmomi's ``QueryChangedDiskAreas`` gives them), a parsed
#: :class:`ChangeList`, ``"hash"`` (compare every chunk) or ``"chain"`` (what the child of a
#: snapshot chain allocates).
Changes = Union[PathLike, Sequence[Tuple[int, int]], ChangeList]


def version() -> str:
    """The engine's version."""
    return _native.version()


class Operation(Generic[R]):
    """A replication, restore, verification, conversion or gc running in the background.

    It runs on threads of its own with the GIL released. Follow it with :meth:`progress`,
    :meth:`events` or a callback given when starting it; stop it with :meth:`cancel` from
    any thread; collect the outcome with :meth:`result` (or ``await`` it in asyncio code).
    Ctrl-C while waiting on it cancels it cleanly and raises ``KeyboardInterrupt``.
    """

    def __init__(self, task: _native.Task, build: Callable[[Any], R]) -> None:
        self._task = task
        self._build = build

    @property
    def kind(self) -> str:
        """``replicate``, ``restore``, ``export``, ``cutover``, ``verify``, ``convert`` or
        ``gc``."""
        return self._task.kind

    def cancel(self) -> None:
        """Asks the operation to stop (thread-safe, idempotent). A cancelled replication
        keeps every part it made durable; running it again resumes."""
        self._task.cancel()

    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._task.cancelled()

    def done(self) -> bool:
        """Whether the operation has finished, successfully or not."""
        return self._task.done()

    def progress(self) -> Optional[Progress]:
        """The latest counters (None before the first)."""
        p = self._task.progress()
        return None if p is None else _progress(p)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits at most ``timeout`` seconds (None: until done); returns :meth:`done`."""
        return self._task.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> R:
        """Waits for the outcome: the report, or the operation's :class:`blockferry.Error`
        (``CancelledError`` after a cancel). Raises ``TimeoutError`` if ``timeout`` passes."""
        if not self._task.wait(timeout):
            raise TimeoutError(f"the {self.kind} is still running")
        return self._build(self._task.result())

    def events(self, timeout: Optional[float] = None) -> Iterator[Event]:
        """The operation's events in order, until it finishes (or ``timeout`` seconds pass
        without one). Progress events coalesce: a slow reader gets the newest counters.
        Events go to the callback instead when the operation was started with one."""
        while True:
            batch = self._task.next_events(timeout)
            if not batch:
                return
            for e in batch:
                yield _event(e)

    def __await__(self) -> Generator[Any, None, R]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> R:
        # Completed by the engine: the event loop watches the task's waker socket; no
        # executor thread, no polling. Cancelling the awaiting coroutine cancels the task.
        async with _Wakeups(self._task) as news:
            try:
                while not self._task.done():
                    await news.next()
            except BaseException:
                self._task.cancel()
                raise
        return self._build(self._task.result())

    async def events_async(self) -> AsyncIterator[Event]:
        """:meth:`events` for asyncio code: ``async for e in op.events_async()``, woken by
        the engine as events come (no thread, no polling), until the operation finishes."""
        async with _Wakeups(self._task) as news:
            while True:
                batch = self._task.next_events(0)
                for e in batch:
                    yield _event(e)
                if not batch:
                    if self._task.done():
                        return
                    await news.next()

    def __repr__(self) -> str:
        return repr(self._task)


class _Wakeups:
    """An asyncio view of a task's waker: :meth:`next` returns once the task has news (an
    event, its end) since the last call. The loop watches the waker's socket."""

    def __init__(self, task: _native.Task) -> None:
        self._task = task

    async def __aenter__(self) -> "_Wakeups":
        import asyncio  # not at the top: it costs 40 ms of every import of blockferry

        self._loop = asyncio.get_running_loop()
        self._waker = self._task.waker()
        self._pending = False
        self._future: Optional["asyncio.Future[None]"] = None
        self._loop.add_reader(self._waker.fileno(), self._ready)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._loop.remove_reader(self._waker.fileno())
        del self._waker  # unregisters it from the task

    def _ready(self) -> None:
        self._waker.drain()
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        else:
            self._pending = True

    async def next(self) -> None:
        if self._pending:
            self._pending = False
            return
        self._future = self._loop.create_future()
        try:
            await self._future
        finally:
            self._future = None


def _deliver(callback: Optional[ProgressCallback]) -> Optional[Callable[[Any], Any]]:
    """The callback the native task calls with event dicts: ``callback`` with typed events."""
    if callback is None:
        return None
    cb = callback
    return lambda d: cb(_event(d))


def _passphrase(passphrase: Union[str, bytes, None]) -> Optional[bytes]:
    if passphrase is None:
        env = os.environb.get(b"BLOCKFERRY_PASSPHRASE")
        return env
    if isinstance(passphrase, str):
        return passphrase.encode()
    return bytes(passphrase)


def _s3(
    endpoint: Optional[str],
    region: Optional[str],
    path_style: Optional[bool],
    access_key: Optional[str],
    secret_key: Optional[str],
    attempt_timeout: Optional[float],
    ca_bundle: Optional[PathLike] = None,
) -> Dict[str, Any]:
    return {
        "endpoint": endpoint,
        "region": region,
        "path_style": path_style,
        "access_key": access_key,
        "secret_key": secret_key,
        "attempt_timeout": attempt_timeout,
        "ca_bundle": _path(ca_bundle),
    }


def _counts(**values: Optional[int]) -> None:
    """Refuses a count or size that is not a non-negative integer, naming it (the native
    module would raise a bare ``OverflowError``)."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} is a count or size from 0 up, not {value!r}")


def _path(p: Optional[PathLike]) -> Optional[str]:
    return None if p is None else os.fspath(p)


class Store:
    """A store of snapshots: a local folder or ``s3://BUCKET/PREFIX``.

    Create one with :meth:`create`, open it with :meth:`open`. S3 settings are keyword
    arguments (``endpoint``, ``region``, ``path_style``, ``access_key``/``secret_key``; by
    default the standard AWS chain: environment, profile, instance role). The passphrase is a
    ``str`` or ``bytes``; when None it comes from ``BLOCKFERRY_PASSPHRASE``, as for the CLI.

    A store is safe to share between threads; several replications may run into it at once.
    It is a context manager: ``with Store.open(...) as store:`` closes it at the end (an
    operation still running keeps what it needs until it ends).
    """

    def __init__(self, native: _NativeStore) -> None:
        self._open: Optional[_NativeStore] = native

    @property
    def _native(self) -> _NativeStore:
        if self._open is None:
            raise ConfigError("this store was closed")
        return self._open

    def close(self) -> None:
        """Lets the store go (idempotent); later calls on it raise ``ConfigError``."""
        self._open = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._open is None

    def __enter__(self) -> "Store":
        self._native  # refuses a closed store
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Store holds an open connection to its storage and cannot be pickled: send "
            "its location (and settings) to the other process and open it there with "
            "Store.open"
        )

    @classmethod
    def create(
        cls,
        location: PathLike,
        *,
        passphrase: Union[str, bytes, None] = None,
        encrypted: bool = True,
        chunk_size: int = 1 << 20,
        endpoint: Optional[str] = None,
        region: Optional[str] = None,
        path_style: Optional[bool] = None,
        access_key: Optional[str] = None,
        secret_key: Optional[str] = None,
        attempt_timeout: Optional[float] = None,
        state_dir: Optional[PathLike] = None,
        ca_bundle: Optional[PathLike] = None,
    ) -> "Store":
        """Creates a store and opens it. It is encrypted (AES-256-GCM, keys from the
        passphrase) unless ``encrypted=False`` is asked for explicitly. ``chunk_size`` is a
        power of two from 64 KiB to 16 MiB. This client records the new store's id and
        encryption in ``state_dir`` (default :func:`default_state_dir`), see :meth:`open`."""
        loc = os.fspath(location)
        s3 = _s3(
            endpoint, region, path_style, access_key, secret_key, attempt_timeout, ca_bundle
        )
        secret = _passphrase(passphrase)
        if encrypted and secret is None:
            raise ConfigError(
                "an encrypted store needs a passphrase (or BLOCKFERRY_PASSPHRASE); "
                "pass encrypted=False for an unencrypted one"
            )
        if not encrypted:
            secret = None
        state = _path(state_dir)
        _native.Store.init(
            loc, passphrase=secret, chunk_size=chunk_size, s3=s3, state_dir=state
        )
        return cls(_native.Store.open(loc, passphrase=secret, s3=s3, state_dir=state))

    @classmethod
    def open(
        cls,
        location: PathLike,
        *,
        passphrase: Union[str, bytes, None] = None,
        endpoint: Optional[str] = None,
        region: Optional[str] = None,
        path_style: Optional[bool] = None,
        access_key: Optional[str] = None,
        secret_key: Optional[str] = None,
        attempt_timeout: Optional[float] = None,
        state_dir: Optional[PathLike] = None,
        ca_bundle: Optional[PathLike] = None,
    ) -> "Store":
        """Opens an existing store (``CredentialsError`` if the passphrase is wrong, or if
        one is given for an unencrypted store). The store is checked against what this
        client recorded of it in ``state_dir`` (default :func:`default_state_dir`): a store
        whose id changed, or that was encrypted and says it no longer is, raises
        ``CorruptError``. Over HTTPS only the authorities in the PEM file ``ca_bundle`` are
        trusted, if given (else ``AWS_CA_BUNDLE``'s, else the system's)."""
        s3 = _s3(
            endpoint, region, path_style, access_key, secret_key, attempt_timeout, ca_bundle
        )
        return cls(
            _native.Store.open(
                os.fspath(location),
                passphrase=_passphrase(passphrase),
                s3=s3,
                state_dir=_path(state_dir),
            )
        )

    @property
    def config(self) -> StoreConfig:
        """The store's fixed settings."""
        return _build(StoreConfig, self._native.config())

    def snapshots(self, *, strict: bool = True) -> List[Snapshot]:
        """The snapshots, oldest first. A snapshot that cannot be read raises its error,
        unless ``strict=False`` (then it is left out)."""
        snaps, errors = self._native.snapshots()
        if strict and errors:
            raise errors[0]
        return [Snapshot._from(s) for s in snaps]

    def inspect(self, spec: str) -> Dict[str, Any]:
        """What a snapshot's disk holds, read from the store (as :func:`blockferry.inspect`
        reads an image): partition table, volumes and file systems, boot mode, OS."""
        result: Dict[str, Any] = self._native.inspect(spec)
        return result

    def snapshot(self, spec: str) -> Snapshot:
        """One snapshot: its id, a unique prefix of it, ``DISK@latest`` (a disk's newest), or
        ``latest`` (the newest of the store's only disk; ``ConfigError`` naming the disks
        when it holds several)."""
        return Snapshot._from(self._native.snapshot(spec))

    def sync(
        self,
        image: PathLike,
        *,
        changes: Optional[str] = None,
        changes_dir: Optional[PathLike] = None,
        changes_source: Optional[Callable[[Dict[str, Any]], Union[bytes, str]]] = None,
        changes_format: Optional[str] = None,
        every: float = 300.0,
        cycles: Optional[int] = None,
        name: Optional[str] = None,
        disk: Optional[str] = None,
        allow_outside_folder: bool = False,
        verify_sample: float = 0.01,
        workers: int = 0,
        memory_budget: int = 0,
        bwlimit: Optional[int] = None,
        state_dir: Optional[PathLike] = None,
        job_state: bool = True,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> Iterator[SyncCycle]:
        """Continuous replication of ``image``, as ``blockferry sync`` runs it: a cycle every
        ``every`` seconds (from the start of one to the next), each a delta on the disk's
        newest snapshot, the first a full copy when the disk has none; yields each cycle's
        :class:`SyncCycle` (a failed cycle carries its ``error`` and the next tries again).
        Stops after ``cycles`` cycles, or when the caller stops iterating; a cycle killed or
        cancelled (Ctrl-C) resumes in the next.

        Changes come from one of: ``changes="hash"`` (compare every chunk), ``"chain"`` (the
        image is a snapshot-chain child), ``changes_dir`` (a folder where lists are dropped:
        each cycle takes those waiting and moves them to ``done/`` once its snapshot is
        written; no list, no cycle), or ``changes_source``, called before each cycle with
        the base (``snapshot``, ``change_id``, ``disk_size``) and returning the list's text.
        """
        _counts(workers=workers, memory_budget=memory_budget, bwlimit=bwlimit, cycles=cycles)
        run = self._native.start_sync(
            os.fspath(image),
            changes=changes,
            changes_dir=_path(changes_dir),
            changes_given=changes_source is not None,
            changes_format=changes_format,
            name=name,
            disk=disk,
            allow_outside_folder=allow_outside_folder,
            verify_sample=verify_sample,
            workers=workers,
            memory_budget=memory_budget,
            bwlimit=bwlimit,
            state_dir=_path(state_dir),
            no_state=not job_state,
        )
        done = 0
        while cycles is None or done < cycles:
            started = time.monotonic()
            yield self._sync_cycle(run, changes_source, progress, progress_interval)
            done += 1
            if cycles is not None and done >= cycles:
                return
            time.sleep(max(0.0, every - (time.monotonic() - started)))

    @staticmethod
    def _sync_cycle(
        run: _NativeSyncRun,
        changes_source: Optional[Callable[[Dict[str, Any]], Union[bytes, str]]],
        progress: Optional[ProgressCallback],
        progress_interval: float,
    ) -> SyncCycle:
        data: Optional[bytes] = None
        if changes_source is not None:
            try:
                text = changes_source(run.base())
            except Exception as e:  # the caller's source failed: this cycle fails
                return SyncCycle._from(run.fail_cycle(), error=e)
            data = text.encode() if isinstance(text, str) else bytes(text)
        op = Operation(
            run.start_cycle(data, progress=_deliver(progress), progress_interval=progress_interval),
            SyncCycle._from,
        )
        try:
            return op.result()
        except CancelledError:
            raise
        except Error as e:
            return SyncCycle._from(run.status(), error=e)

    def start_replicate(
        self,
        image: PathLike,
        *,
        disk: Optional[str] = None,
        name: Optional[str] = None,
        same_disk: bool = False,
        wait: float = 0.0,
        base: Optional[str] = None,
        changes: Optional[Changes] = None,
        changes_format: Optional[str] = None,
        change_id: Optional[str] = None,
        base_change_id: Optional[str] = None,
        verify_sample: float = 0.01,
        workers: int = 0,
        compression: bool = True,
        memory_budget: int = 0,
        io_engine: str = "pread",
        io_depth: int = 0,
        direct: bool = False,
        upload_jobs: int = 0,
        part_size: int = 0,
        bwlimit: Optional[int] = None,
        state_dir: Optional[PathLike] = None,
        job_state: bool = True,
        restart: bool = False,
        allow_outside_folder: bool = False,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> Operation[ReplicateReport]:
        """Starts copying ``image`` into the store as a new snapshot; the options are those
        of :meth:`replicate`."""
        _counts(
            workers=workers,
            memory_budget=memory_budget,
            io_depth=io_depth,
            upload_jobs=upload_jobs,
            part_size=part_size,
            bwlimit=bwlimit,
        )
        kw: Dict[str, Any] = {}
        if isinstance(changes, ChangeList):
            # As an extents document that keeps the list's change ids, so that the engine
            # still checks it against the base snapshot's.
            doc: Dict[str, Any] = {
                "changeId": changes.base_change_id,
                "newChangeId": changes.new_change_id,
                "extents": changes.extents,
            }
            kw["changes_data"] = json.dumps(doc).encode()
            kw["changes_format"] = "extents"
        elif isinstance(changes, (str, os.PathLike)):
            c = os.fspath(changes)
            if c == "hash":
                kw["changes_hash"] = True
            elif c == "chain":
                kw["changes_from_chain"] = True
            else:
                kw["changes"] = c
                kw["changes_format"] = changes_format
        elif changes is not None:
            # As an extents document naming the change id the ranges were taken against, so
            # that the engine checks it against the base snapshot's.
            ranges = []
            for i, r in enumerate(changes):
                if len(r) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in r
                ):
                    raise ConfigError(
                        f"changes[{i}] is {r!r}: give (offset, length) pairs of integers "
                        "from 0 up"
                    )
                ranges.append([r[0], r[1]])
            doc = {
                "changeId": base_change_id,
                "newChangeId": change_id,
                "extents": ranges,
            }
            kw["changes_data"] = json.dumps(doc).encode()
            kw["changes_format"] = "extents"
        if base_change_id is not None and (
            changes is None or isinstance(changes, (str, os.PathLike, ChangeList))
        ):
            raise ConfigError(
                "base_change_id names what (offset, length) ranges were taken against; a "
                "change list carries its own"
            )
        task = self._native.start_replicate(
            os.fspath(image),
            disk=disk,
            name=name,
            same_disk=same_disk,
            wait=wait,
            allow_outside_folder=allow_outside_folder,
            workers=workers,
            compression=compression,
            memory_budget=memory_budget,
            io_engine=io_engine,
            io_depth=io_depth,
            direct=direct,
            upload_jobs=upload_jobs,
            part_size=part_size,
            bwlimit=bwlimit,
            base=base,
            change_id=change_id,
            verify_sample=verify_sample,
            state_dir=_path(state_dir),
            no_state=not job_state,
            restart=restart,
            progress=_deliver(progress),
            progress_interval=progress_interval,
            **kw,
        )
        return Operation(task, ReplicateReport._from)

    def replicate(
        self,
        image: PathLike,
        *,
        disk: Optional[str] = None,
        name: Optional[str] = None,
        same_disk: bool = False,
        wait: float = 0.0,
        base: Optional[str] = None,
        changes: Optional[Changes] = None,
        changes_format: Optional[str] = None,
        change_id: Optional[str] = None,
        base_change_id: Optional[str] = None,
        verify_sample: float = 0.01,
        workers: int = 0,
        compression: bool = True,
        memory_budget: int = 0,
        io_engine: str = "pread",
        io_depth: int = 0,
        direct: bool = False,
        upload_jobs: int = 0,
        part_size: int = 0,
        bwlimit: Optional[int] = None,
        state_dir: Optional[PathLike] = None,
        job_state: bool = True,
        restart: bool = False,
        allow_outside_folder: bool = False,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> ReplicateReport:
        """Copies ``image`` (raw, VMDK, VHDX, VHD or OVA; format detected) into the store as
        a new snapshot, and returns what it did.

        Only allocated, non-zero chunks the store does not hold yet are read, compressed
        (``compression``), encrypted and uploaded. With ``base`` (a snapshot id, prefix or
        ``latest``) and ``changes`` (see :data:`Changes`; ``changes_format`` to name a
        list's format) it is a delta that reads only what changed, checking a
        ``verify_sample`` share of what the list calls unchanged; ``change_id`` is the
        source's change-tracking id now, recorded for the next delta. Ranges given as
        ``(offset, length)`` pairs name the change id they were taken against with
        ``base_change_id`` (pyVmomi's ``changeId`` argument), which is checked against the
        base snapshot's as a list file's would be.

        The run is a job (state in ``state_dir``, default :func:`default_state_dir`): if it
        is killed or cancelled, the next call with the same image and store resumes it
        (``restart=True`` starts over; ``job_state=False`` records nothing).

        ``disk`` picks a disk of an OVA. ``name`` is the disk's name in the store: by
        default the image's file name, or, if another source has that name, the shortest
        path ending in it that none has (``vm1/disk.vmdk``); a name another source has is
        refused unless ``same_disk`` (the disk moved, or this is a copy or export of it).
        One run at a time replicates a disk (on any host): another raises ``BusyError``, or
        waits up to ``wait`` seconds for it. Tuning:
        ``workers``, ``memory_budget`` (bytes), ``io_engine`` (``pread``, ``auto``,
        ``uring``), ``io_depth``, ``direct`` (O_DIRECT with io_uring), ``upload_jobs``,
        ``part_size`` and ``bwlimit`` (bytes per second) on S3. ``progress`` is called with
        each event, progress at most every ``progress_interval`` seconds.
        """
        return self.start_replicate(
            image,
            disk=disk,
            name=name,
            same_disk=same_disk,
            wait=wait,
            base=base,
            changes=changes,
            changes_format=changes_format,
            change_id=change_id,
            base_change_id=base_change_id,
            verify_sample=verify_sample,
            workers=workers,
            compression=compression,
            memory_budget=memory_budget,
            io_engine=io_engine,
            io_depth=io_depth,
            direct=direct,
            upload_jobs=upload_jobs,
            part_size=part_size,
            bwlimit=bwlimit,
            state_dir=state_dir,
            job_state=job_state,
            restart=restart,
            allow_outside_folder=allow_outside_folder,
            progress=progress,
            progress_interval=progress_interval,
        ).result()

    def start_restore(
        self,
        snapshot: str,
        out: PathLike,
        *,
        force: bool = False,
        salvage: bool = False,
        workers: int = 0,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> Operation[RestoreReport]:
        """Starts writing a snapshot out; see :meth:`restore`."""
        _counts(workers=workers)
        task = self._native.start_restore(
            snapshot,
            os.fspath(out),
            force=force,
            salvage=salvage,
            workers=workers,
            progress=_deliver(progress),
            progress_interval=progress_interval,
        )
        return Operation(task, RestoreReport._from)

    def restore(
        self,
        snapshot: str,
        out: PathLike,
        *,
        force: bool = False,
        salvage: bool = False,
        workers: int = 0,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> RestoreReport:
        """Writes snapshot ``snapshot`` (id, prefix or ``latest``) to ``out``: a raw file,
        created sparse, that appears under its name only once whole (``force`` to replace
        one), or a block device (only with ``force``: what it holds is overwritten).
        ``salvage`` restores every chunk that can be read, leaves the others zero and lists
        them in :attr:`RestoreReport.unreadable` instead of raising at the first."""
        return self.start_restore(
            snapshot,
            out,
            force=force,
            salvage=salvage,
            workers=workers,
            progress=progress,
            progress_interval=progress_interval,
        ).result()

    def start_export(
        self,
        snapshot: str,
        out: PathLike,
        *,
        format: str,
        force: bool = False,
        workers: int = 0,
        memory_budget: int = 0,
        jobs: int = 0,
        part_size: int = 0,
        base_export: Optional[str] = None,
        incremental: bool = False,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> Operation[ExportReport]:
        """Starts writing a snapshot out as an image; see :meth:`export`."""
        _counts(workers=workers, memory_budget=memory_budget, jobs=jobs, part_size=part_size)
        task = self._native.start_export(
            snapshot,
            os.fspath(out),
            format=format,
            force=force,
            workers=workers,
            memory_budget=memory_budget,
            jobs=jobs,
            part_size=part_size,
            base_export=base_export,
            incremental=incremental,
            progress=_deliver(progress),
            progress_interval=progress_interval,
        )
        return Operation(task, ExportReport._from)

    def export(
        self,
        snapshot: str,
        out: PathLike,
        *,
        format: str,
        force: bool = False,
        workers: int = 0,
        memory_budget: int = 0,
        jobs: int = 0,
        part_size: int = 0,
        base_export: Optional[str] = None,
        incremental: bool = False,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> ExportReport:
        """Writes snapshot ``snapshot`` (id, prefix or ``latest``) to ``out`` as an image a
        platform imports: ``format`` is ``raw``, ``vmdk`` (streamOptimized, as AWS VM Import
        and vSphere take), ``vhdx`` (dynamic), ``vhd`` (dynamic) or ``vhd-fixed`` (a whole
        number of MiB, as Azure takes). Only data is written; the file
        appears under its name only once whole (``force`` to replace one).

        ``out`` may be an object, ``s3://BUCKET/KEY`` (reached as the store is, when it is
        on S3): one multipart upload of ``jobs`` parts at once of ``part_size`` bytes within
        ``memory_budget``, which a later call continues if this one stops. For ``raw`` and
        ``vhd-fixed``, ``base_export`` (``s3://BUCKET/KEY@SNAPSHOT``) or ``incremental`` (the
        object replaced is the base, if it is an export of an earlier snapshot) make a delta:
        unchanged parts are copied by the store, only changed ones sent; a base that cannot
        be trusted means a full upload, with a warning."""
        return self.start_export(
            snapshot,
            out,
            format=format,
            force=force,
            workers=workers,
            memory_budget=memory_budget,
            jobs=jobs,
            part_size=part_size,
            base_export=base_export,
            incremental=incremental,
            progress=progress,
            progress_interval=progress_interval,
        ).result()

    def start_cutover(
        self,
        image: PathLike,
        *,
        to: str,
        max_downtime: float,
        format: str = "raw",
        now: bool = False,
        interval: float = 5.0,
        max_cycles: int = 100,
        pre_hook: Optional[str] = None,
        post_hook: Optional[str] = None,
        rollback_hook: Optional[str] = None,
        hook_timeout: float = 120.0,
        changes: str = "hash",
        name: Optional[str] = None,
        verify_sample: float = 0.01,
        state_dir: Optional[PathLike] = None,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> Operation[CutoverReport]:
        """Starts a cutover; see :meth:`cutover`."""
        _counts(max_cycles=max_cycles)
        task = self._native.start_cutover(
            os.fspath(image),
            to=to,
            max_downtime=max_downtime,
            format=format,
            now=now,
            interval=interval,
            max_cycles=max_cycles,
            pre_hook=pre_hook,
            post_hook=post_hook,
            rollback_hook=rollback_hook,
            hook_timeout=hook_timeout,
            changes=changes,
            name=name,
            verify_sample=verify_sample,
            state_dir=_path(state_dir),
            progress=_deliver(progress),
            progress_interval=progress_interval,
        )
        return Operation(task, CutoverReport._from)

    def cutover(
        self,
        image: PathLike,
        *,
        to: str,
        max_downtime: float,
        format: str = "raw",
        now: bool = False,
        interval: float = 5.0,
        max_cycles: int = 100,
        pre_hook: Optional[str] = None,
        post_hook: Optional[str] = None,
        rollback_hook: Optional[str] = None,
        hook_timeout: float = 120.0,
        changes: str = "hash",
        name: Optional[str] = None,
        verify_sample: float = 0.01,
        state_dir: Optional[PathLike] = None,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> CutoverReport:
        """The end of a migration: syncs ``image`` (a live source, its changes found by
        ``changes``: ``hash`` or ``chain``) until the downtime predicted is within
        ``max_downtime`` seconds (or at once with ``now``), then runs ``pre_hook`` (a shell
        command that stops the source), takes the final delta, reads back what it wrote,
        brings ``to`` (a raw file, or ``s3://BUCKET/KEY``) up to date and runs ``post_hook``
        (with ``BLOCKFERRY_SNAPSHOT``, ``BLOCKFERRY_TARGET`` … in its environment). A failure
        after the pre-hook runs ``rollback_hook``; the report's ``outcome`` says which
        (``completed``, ``rolled-back``, ``failed``). Each step arrives as a
        :class:`NoteEvent` while it runs."""
        return self.start_cutover(
            image,
            to=to,
            max_downtime=max_downtime,
            format=format,
            now=now,
            interval=interval,
            max_cycles=max_cycles,
            pre_hook=pre_hook,
            post_hook=post_hook,
            rollback_hook=rollback_hook,
            hook_timeout=hook_timeout,
            changes=changes,
            name=name,
            verify_sample=verify_sample,
            state_dir=state_dir,
            progress=progress,
            progress_interval=progress_interval,
        ).result()

    def start_verify(
        self,
        snapshot: str,
        *,
        image: Optional[PathLike] = None,
        disk: Optional[str] = None,
        allow_outside_folder: bool = False,
        workers: int = 0,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> Operation[VerifyReport]:
        """Starts a verification; see :meth:`verify`."""
        _counts(workers=workers)
        task = self._native.start_verify(
            snapshot,
            image=_path(image),
            disk=disk,
            allow_outside_folder=allow_outside_folder,
            workers=workers,
            progress=_deliver(progress),
            progress_interval=progress_interval,
        )
        return Operation(task, VerifyReport._from)

    def verify(
        self,
        snapshot: str,
        *,
        image: Optional[PathLike] = None,
        disk: Optional[str] = None,
        allow_outside_folder: bool = False,
        workers: int = 0,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> VerifyReport:
        """Checks that every chunk of a snapshot is intact and, with ``image``, equal to
        that image. Problems are in the report (``ok`` is False); only failures to check
        at all raise."""
        return self.start_verify(
            snapshot,
            image=image,
            disk=disk,
            allow_outside_folder=allow_outside_folder,
            workers=workers,
            progress=progress,
            progress_interval=progress_interval,
        ).result()

    def prune(
        self,
        *,
        keep_last: int = 0,
        keep_daily: int = 0,
        keep_weekly: int = 0,
        keep_monthly: int = 0,
        disk: Optional[str] = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Forgets the snapshots a retention policy does not keep, per disk (space comes
        back with :meth:`gc`)."""
        r = self._native.prune(
            keep_last=keep_last,
            keep_daily=keep_daily,
            keep_weekly=keep_weekly,
            keep_monthly=keep_monthly,
            disk=disk,
            dry_run=dry_run,
        )
        return _build(PruneReport, r)

    def start_gc(
        self,
        *,
        max_unused: float = 0.05,
        wait: float = 1800.0,
        dry_run: bool = False,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> Operation[GcReport]:
        """Starts a garbage collection; see :meth:`gc`."""
        task = self._native.start_gc(
            max_unused=max_unused,
            wait=wait,
            dry_run=dry_run,
            progress=_deliver(progress),
            progress_interval=progress_interval,
        )
        return Operation(task, lambda d: _build(GcReport, d))

    def gc(
        self,
        *,
        max_unused: float = 0.05,
        wait: float = 1800.0,
        dry_run: bool = False,
        progress: Optional[ProgressCallback] = None,
        progress_interval: float = 0.5,
    ) -> GcReport:
        """Deletes what no snapshot references, repacking packs until at most
        ``max_unused`` (a share) of live bytes is unused; waits up to ``wait`` seconds for
        running replications. Safe beside running replications."""
        return self.start_gc(
            max_unused=max_unused,
            wait=wait,
            dry_run=dry_run,
            progress=progress,
            progress_interval=progress_interval,
        ).result()

    def cleanup(
        self,
        *,
        older_than: float = 86400.0,
        dry_run: bool = False,
        state_dir: Optional[PathLike] = None,
        include_stopped_jobs: bool = False,
    ) -> CleanupReport:
        """Aborts the multipart uploads stopped jobs left in the store, if started more than
        ``older_than`` seconds ago and not resumable by a job in ``state_dir``. Uploads of
        jobs the store records as under way (on any host) are kept unless
        ``include_stopped_jobs``."""
        r = self._native.cleanup(
            older_than=older_than,
            dry_run=dry_run,
            state_dir=_path(state_dir),
            include_stopped_jobs=include_stopped_jobs,
        )
        return _build(CleanupReport, r)

    def __repr__(self) -> str:
        return f"Store({self.config.location!r})"


def image_info(
    path: PathLike, *, disk: Optional[str] = None, allow_outside_folder: bool = False
) -> ImageInfo:
    """What a disk image is: format, sizes, allocation and its chain of files.

    Paths recorded in an image (parents, extents) must stay in its folder unless
    ``allow_outside_folder``; ``disk`` picks a disk of an OVA."""
    return ImageInfo._from(
        _native.image_info(
            os.fspath(path), disk=disk, allow_outside_folder=allow_outside_folder
        )
    )


def image_map(
    path: PathLike, *, disk: Optional[str] = None, allow_outside_folder: bool = False
) -> List[Extent]:
    """The image's allocation map (like ``qemu-img map``): data, zero and unallocated
    ranges in order, covering the whole virtual disk."""
    rows = _native.image_map(
        os.fspath(path), disk=disk, allow_outside_folder=allow_outside_folder
    )
    return [Extent(*r) for r in rows]


def parse_changes(
    source: Union[PathLike, bytes],
    disk_size: int,
    *,
    format: Optional[str] = None,
) -> ChangeList:
    """Reads a change list, a file or its ``bytes``: VMware CBT (``QueryChangedDiskAreas``
    as JSON), Hyper-V RCT, or extents (``offset,length`` lines or a JSON array); ``format``
    (``vmware-cbt``, ``hyperv-rct``, ``extents``) instead of detecting it. Checked against
    a disk of ``disk_size`` bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        d = _native.parse_changes(disk_size, data=bytes(source), format=format)
    else:
        d = _native.parse_changes(disk_size, path=os.fspath(source), format=format)
    return ChangeList._from(d)


def discover(
    folder: PathLike, *, allow_outside_folder: bool = False
) -> List[DiscoveredImage]:
    """The disk images under ``folder`` (a datastore, a VM folder, an export), sorted by
    path; the ones to replicate have ``role == "disk"``."""
    found = _native.discover(os.fspath(folder), allow_outside_folder=allow_outside_folder)
    return [_build(DiscoveredImage, d) for d in found]


def discover_vms(
    folder: PathLike, *, allow_outside_folder: bool = False
) -> List[VirtualMachine]:
    """The virtual machines under ``folder``: VMware ``.vmx`` (with their ``.vmsd``
    snapshots), OVF and OVA, Hyper-V ``.vmcx``; each disk resolved to the image chain
    :func:`discover` finds. An unreadable configuration is an entry with its ``error``."""
    found = _native.discover_vms(os.fspath(folder), allow_outside_folder=allow_outside_folder)
    return [
        _build(
            VirtualMachine,
            d,
            nics=[_build(Nic, n) for n in d["nics"]],
            disks=[_build(VmDisk, x) for x in d["disks"]],
            snapshots=[_build(VmSnapshot, s) for s in d["snapshots"]],
        )
        for d in found
    ]


def inspect(
    image: PathLike, *, disk: Optional[str] = None, allow_outside_folder: bool = False
) -> Dict[str, Any]:
    """What a disk holds, read-only through the image readers (any format, an OVA's
    ``disk``): ``table`` (scheme, partitions with type, start, size, alignment; problems),
    ``volumes`` (each partition's file system: kind, label, uuid, encrypted, os), ``boot``
    (``mode``: uefi, bios, both or none, and the evidence) and ``os`` (the systems found) -
    the shape of ``blockferry inspect --json``."""
    result: Dict[str, Any] = _native.inspect_image(
        os.fspath(image), disk=disk, allow_outside_folder=allow_outside_folder
    )
    return result


def validate(
    path: PathLike,
    *,
    target: str = "generic",
    store: Optional[Store] = None,
    allow_outside_folder: bool = False,
) -> Validation:
    """Readiness of a VM (``.vmx``, ``.ovf``, ``.ova``, ``.vmcx``) or a disk image for
    ``target`` (``aws``, ``azure`` or ``generic``): every check with its status, reason and
    fix (docs/VALIDATION.md); with ``store``, its free space too. ``passed`` is False when a
    check failed (the CLI then exits 3)."""
    v = _native.validate(
        os.fspath(path),
        target=target,
        store=store._native if store is not None else None,
        allow_outside_folder=allow_outside_folder,
    )
    return _build(Validation, v, checks=[_build(Check, c) for c in v["checks"]])


def default_state_dir() -> str:
    """The job database's default folder: ``BLOCKFERRY_STATE_DIR``, else
    ``$XDG_STATE_HOME/blockferry``, else ``~/.local/state/blockferry``."""
    return os.fspath(_native.default_state_dir())


def jobs(*, state_dir: Optional[PathLike] = None) -> List[Job]:
    """The replication jobs recorded in the job database (finished, and unfinished ones a
    new run resumes)."""
    return [_build(Job, j) for j in _native.jobs(state_dir=_path(state_dir))]


def abandon_job(
    job: str,
    *,
    state_dir: Optional[PathLike] = None,
    endpoint: Optional[str] = None,
    region: Optional[str] = None,
    path_style: Optional[bool] = None,
    access_key: Optional[str] = None,
    secret_key: Optional[str] = None,
) -> Job:
    """Aborts an unfinished job's uploads in its store and forgets it (a finished job is
    just forgotten); ``job`` is its id or a unique prefix. Returns the job as it was."""
    s3 = _s3(endpoint, region, path_style, access_key, secret_key, None)
    return _build(Job, _native.abandon_job(job, state_dir=_path(state_dir), s3=s3))


def start_convert(
    image: PathLike,
    out: PathLike,
    *,
    disk: Optional[str] = None,
    allow_outside_folder: bool = False,
    force: bool = False,
    workers: int = 0,
    progress: Optional[ProgressCallback] = None,
    progress_interval: float = 0.5,
) -> Operation[ConvertReport]:
    """Starts a conversion; see :func:`convert`."""
    _counts(workers=workers)
    task = _native.start_convert(
        os.fspath(image),
        os.fspath(out),
        disk=disk,
        allow_outside_folder=allow_outside_folder,
        force=force,
        workers=workers,
        progress=_deliver(progress),
        progress_interval=progress_interval,
    )
    return Operation(task, lambda d: _build(ConvertReport, d))


def convert(
    image: PathLike,
    out: PathLike,
    *,
    disk: Optional[str] = None,
    allow_outside_folder: bool = False,
    force: bool = False,
    workers: int = 0,
    progress: Optional[ProgressCallback] = None,
    progress_interval: float = 0.5,
) -> ConvertReport:
    """Writes an image's virtual disk to ``out`` as a sparse raw file (or onto a device)."""
    return start_convert(
        image,
        out,
        disk=disk,
        allow_outside_folder=allow_outside_folder,
        force=force,
        workers=workers,
        progress=progress,
        progress_interval=progress_interval,
    ).result()
