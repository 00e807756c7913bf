"""The fleet's inventory and its status: what a run replicates and where each disk stands."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from .._errors import ConfigError

#: Disk states, in the order the status page sorts them.
STATES = ("running", "syncing", "retrying", "queued", "failed", "done", "stopped", "cancelled")


@dataclass(frozen=True)
class Disk:
    """One disk of the fleet's inventory.

    Attributes:
        path: The image (raw, VMDK, VHDX, VHD or OVA; format detected).
        name: The disk's name in the store (unique in the fleet; by default the shortest
            tail of its path no other disk of the inventory shares).
        datastore: Where the image lives: at most ``per_datastore`` disks of one datastore
            are replicated at once (by default the image's folder).
        group: A group or wave (for planning and the status page; disks of a lower group
            start first).
        changes: How deltas find what changed when the disk already has a snapshot:
            ``"hash"``, ``"chain"``, or a change-list file; None replicates it whole (chunks
            the store holds are still not sent).
        options: More keyword arguments of :meth:`blockferry.Store.replicate` (``workers``,
            ``part_size``, ``upload_jobs``, ``bwlimit``, ``disk`` of an OVA, …).
    """

    path: str
    name: str = ""
    datastore: str = ""
    group: str = ""
    changes: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)


#: An inventory: image paths, :class:`Disk` objects or their dicts, the JSON of ``blockferry
#: discover --json`` (as text, a dict, or a file holding it), or a file holding a list.
Inventory = Union[
    str,
    "os.PathLike[str]",
    Mapping[str, Any],
    Sequence[Union[str, "os.PathLike[str]", Disk, Mapping[str, Any]]],
]

_DISK_KEYS = {"path", "name", "datastore", "group", "wave", "changes", "options"}


def _disk(item: Any, where: str) -> Optional[Disk]:
    """The disk ``item`` describes; None for an image of discover's output that is not one
    (a parent or an extent)."""
    if isinstance(item, Disk):
        return item
    if isinstance(item, (str, os.PathLike)):
        return Disk(path=os.fspath(item))
    if isinstance(item, Mapping):
        if "role" in item and item.get("role") != "disk":
            return None
        unknown = set(item) - _DISK_KEYS - {
            "role", "format", "subformat", "virtual_size", "allocated_bytes", "chain",
            "error", "ova_disk",
        }
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise ConfigError(f"{where}: a disk needs a path")
        options = dict(item.get("options") or {})
        if item.get("ova_disk") is not None:
            options.setdefault("disk", str(item["ova_disk"]))
        return Disk(
            path=item["path"],
            name=str(item.get("name") or ""),
            datastore=str(item.get("datastore") or ""),
            group=str(item.get("group") or item.get("wave") or ""),
            changes=item.get("changes"),
            options=options,
        )
    raise ConfigError(f"{where}: {type(item).__name__} is not a disk (a path or a mapping)")


def load_inventory(inventory: Inventory) -> List[Disk]:
    """The disks of ``inventory`` with names and datastores filled in (see :data:`Inventory`).
    Of ``blockferry discover`` output only images with role ``disk`` are taken; relative
    paths are taken from the current folder, as ``discover`` printed them."""
    data: Any = inventory
    if isinstance(data, (str, os.PathLike)) and not str(data).lstrip().startswith(("{", "[")):
        p = Path(data)
        if p.suffix.lower() == ".json" or (
            p.is_file() and p.stat().st_size < (64 << 20) and p.read_bytes()[:1] in (b"{", b"[")
        ):
            data = json.loads(p.read_text())
        else:
            data = [os.fspath(p)]
    elif isinstance(data, str):
        data = json.loads(data)
    items: Iterable[Any]
    if isinstance(data, Mapping):
        images = data.get("images", data.get("disks"))
        if not isinstance(images, list):
            raise ConfigError("an inventory object needs an `images` (discover) or `disks` list")
        items = images
    else:
        items = data
    disks: List[Disk] = []
    for i, item in enumerate(items):
        d = _disk(item, f"inventory[{i}]")
        if d is not None:
            disks.append(d)
    if not disks:
        raise ConfigError("the inventory holds no disk")
    return _fill(disks)


def _fill(disks: List[Disk]) -> List[Disk]:
    """Names (unique: the shortest path tails no other disk shares) and datastores."""
    paths = [Path(os.path.abspath(d.path)) for d in disks]
    names: List[str] = []
    for d, p in zip(disks, paths):
        if d.name:
            names.append(d.name)
            continue
        member = d.options.get("disk")
        depth = 1
        while True:
            tail = "/".join(p.parts[-depth:])
            clash = any(
                q != p and "/".join(q.parts[-depth:]) == tail and not o.name
                for o, q in zip(disks, paths)
            )
            if not clash or depth >= len(p.parts):
                break
            depth += 1
        names.append(f"{tail}#{member}" if member is not None else tail)
    seen: Dict[str, str] = {}
    for n, d in zip(names, disks):
        if n in seen and seen[n] != d.path:
            raise ConfigError(f"two disks of the inventory are named {n!r}: {seen[n]} and {d.path}")
        seen[n] = d.path
    return [
        replace(d, name=n, datastore=d.datastore or str(p.parent))
        for d, n, p in zip(disks, names, paths)
    ]


@dataclass(frozen=True)
class DiskStatus:
    """Where one disk of a fleet run stands.

    Attributes:
        name: The disk's name in the store.
        path: The image.
        datastore: Its datastore.
        group: Its group or wave.
        state: ``queued``, ``running``, ``syncing`` (continuous mode, between cycles),
            ``retrying`` (waiting to try again), ``done``, ``failed``, ``stopped``
            (continuous mode, stopped on request) or ``cancelled``.
        phase: What the running replication does (``replicating``, ``committing``), or "".
        bytes_done: Virtual bytes worked through by the current (or last) replication.
        bytes_total: The disk's virtual size.
        bytes_sent: Bytes uploaded for this disk by every attempt and cycle.
        bytes_resumed: Bytes an earlier, stopped attempt had made durable (last report).
        rate: Virtual bytes per second of the current replication.
        eta: Seconds left at that rate, if known.
        lag_seconds: The replication lag (RPO): seconds since the view of the disk its
            newest snapshot holds was taken; None before the first snapshot.
        attempts: Replications started (a task rescheduled after its worker died counts).
        cycles: Continuous mode: cycles run.
        resumed: Whether a replication took up a stopped one's job.
        last_error: The last error, if any.
        snapshots: Snapshot ids written, oldest first.
        worker: The worker running it (or that ran it last).
        started_unix: When the first attempt started (seconds since the epoch).
        finished_unix: When it reached ``done``, ``failed`` or ``stopped``.
        last_snapshot_unix: When the view of the disk its newest snapshot holds was taken.
    """

    name: str
    path: str
    datastore: str
    group: str
    state: str = "queued"
    phase: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0
    bytes_resumed: int = 0
    rate: float = 0.0
    eta: Optional[float] = None
    lag_seconds: Optional[float] = None
    attempts: int = 0
    cycles: int = 0
    resumed: bool = False
    last_error: Optional[str] = None
    snapshots: List[str] = field(default_factory=list)
    worker: str = ""
    started_unix: Optional[float] = None
    finished_unix: Optional[float] = None
    last_snapshot_unix: Optional[float] = None


@dataclass(frozen=True)
class FleetTotals:
    """The fleet's totals: sums over the disks.

    Attributes:
        disks: Disks in the fleet.
        states: How many disks are in each state.
        bytes_done: Sum of the disks' ``bytes_done``.
        bytes_total: Sum of their ``bytes_total``.
        bytes_sent: Sum of their ``bytes_sent``.
        rate: Sum of the running disks' rates.
        snapshots: Snapshots written.
        attempts: Replications started.
        max_lag_seconds: The largest lag of a disk with a snapshot, if any has one.
    """

    disks: int
    states: Dict[str, int]
    bytes_done: int
    bytes_total: int
    bytes_sent: int
    rate: float
    snapshots: int
    attempts: int
    max_lag_seconds: Optional[float]


@dataclass(frozen=True)
class FleetStatus:
    """A fleet run's status: every disk, and the totals.

    Attributes:
        fleet: The run's id.
        mode: ``once`` or ``sync``.
        disks: Per disk, in inventory order.
        totals: Sums over ``disks``.
        workers: Workers of the cluster (addresses).
        running: Whether the run is still going.
        started_unix: When it started.
        elapsed: Seconds since it started (to its end once over).
        throughput: Recent samples ``(seconds since start, bytes sent per second)`` for the
            status page's chart.
    """

    fleet: str
    mode: str
    disks: List[DiskStatus]
    totals: FleetTotals
    workers: List[str]
    running: bool
    started_unix: float
    elapsed: float
    throughput: List[List[float]]

    def to_dict(self) -> Dict[str, Any]:
        """The status as plain data (JSON-ready)."""
        return asdict(self)


def totals_of(disks: Sequence[DiskStatus]) -> FleetTotals:
    states: Dict[str, int] = {s: 0 for s in STATES}
    for d in disks:
        states[d.state] = states.get(d.state, 0) + 1
    lags = [d.lag_seconds for d in disks if d.lag_seconds is not None]
    return FleetTotals(
        disks=len(disks),
        states=states,
        bytes_done=sum(d.bytes_done for d in disks),
        bytes_total=sum(d.bytes_total for d in disks),
        bytes_sent=sum(d.bytes_sent for d in disks),
        rate=sum(d.rate for d in disks if d.state == "running"),
        snapshots=sum(len(d.snapshots) for d in disks),
        attempts=sum(d.attempts for d in disks),
        max_lag_seconds=max(lags) if lags else None,
    )


def _virtual_size(d: Disk) -> int:
    """The disk's virtual size, when its image can be read from here (the driver's host may
    not see the datastores: the size is then known once a worker opens it)."""
    from .._api import image_info

    try:
        member = d.options.get("disk")
        return image_info(d.path, disk=None if member is None else str(member)).virtual_size
    except Exception:
        return 0


class Tracker:
    """The status of every disk, moved by events from the workers and the driver.

    Thread-safe. Events are dicts with ``disk``, ``kind`` and the kind's fields (see
    ``_task``); each execution of a task has its own ``run`` id, so that a task the scheduler
    ran again after its worker died counts as another attempt, and the bytes the dead one
    sent still count."""

    def __init__(self, fleet: str, mode: str, disks: Sequence[Disk]) -> None:
        self.fleet = fleet
        self.mode = mode
        self._lock = threading.Lock()
        self._disks: Dict[str, DiskStatus] = {
            d.name: DiskStatus(
                name=d.name,
                path=d.path,
                datastore=d.datastore,
                group=d.group,
                bytes_total=_virtual_size(d),
            )
            for d in disks
        }
        # Per disk: bytes sent by each execution (run id → bytes).
        self._sent: Dict[str, Dict[str, int]] = {d.name: {} for d in disks}
        # Continuous mode, per execution: bytes its finished cycles sent.
        self._cycle_base: Dict[str, int] = {}
        self._started = time.time()
        self._ended: Optional[float] = None
        self._workers: List[str] = []
        self._samples: List[List[float]] = []
        self._last_sample = (0.0, 0)

    def set_workers(self, workers: List[str]) -> None:
        with self._lock:
            self._workers = sorted(workers)

    def end(self) -> None:
        with self._lock:
            self._ended = time.time()

    def apply(self, ev: Mapping[str, Any]) -> None:
        """Moves the status of ``ev["disk"]`` by the event."""
        name = ev.get("disk")
        with self._lock:
            d = self._disks.get(str(name))
            if d is None:
                return
            kind = ev.get("kind")
            now = float(ev.get("time") or time.time())
            upd: Dict[str, Any] = {}
            run = str(ev.get("run") or "")
            sent = self._sent[d.name]
            if kind == "started":
                upd.update(
                    state="running",
                    attempts=d.attempts + 1,
                    worker=str(ev.get("worker") or ""),
                    phase="",
                    bytes_done=0,
                    rate=0.0,
                    eta=None,
                    started_unix=d.started_unix or now,
                    finished_unix=None,
                )
                sent.setdefault(run, 0)
            elif kind == "progress":
                if run:
                    base = self._cycle_base.get(run, 0)
                    sent[run] = max(sent.get(run, 0), base + int(ev.get("bytes_written") or 0))
                upd.update(state="running", phase=str(ev.get("phase") or ""))
                if ev.get("phase") == "replicating":
                    # (The commit's few small writes have counters of their own.)
                    upd.update(
                        bytes_done=int(ev.get("bytes_done") or 0),
                        bytes_total=int(ev.get("bytes_total") or d.bytes_total),
                        rate=float(ev.get("rate") or 0.0),
                        eta=ev.get("eta"),
                    )
            elif kind in ("done", "cycle"):
                report = ev.get("report") or {}
                snaps = list(d.snapshots)
                if report.get("snapshot") and report["snapshot"] not in snaps:
                    snaps.append(report["snapshot"])
                if run and report:
                    base = self._cycle_base.get(run, 0)
                    sent[run] = max(sent.get(run, 0), base + int(report.get("bytes_stored") or 0))
                    if kind == "cycle":
                        self._cycle_base[run] = sent[run]
                lag = ev.get("lag_seconds")
                upd.update(
                    snapshots=snaps,
                    phase="",
                    rate=0.0,
                    eta=None,
                    last_error=ev.get("error") or (None if kind == "done" else d.last_error),
                )
                if report:
                    upd.update(
                        bytes_total=int(report.get("virtual_size") or d.bytes_total),
                        bytes_done=int(report.get("virtual_size") or d.bytes_done),
                        resumed=d.resumed or bool(report.get("resumed")),
                        bytes_resumed=int(report.get("bytes_resumed") or 0) or d.bytes_resumed,
                    )
                if ev.get("snapshot_unix") is not None:
                    upd["last_snapshot_unix"] = float(ev["snapshot_unix"])
                if lag is not None:
                    upd["lag_seconds"] = float(lag)
                if kind == "done":
                    upd.update(state="done", finished_unix=now, lag_seconds=lag if lag is not None else 0.0)
                else:
                    upd.update(state="syncing", cycles=int(ev.get("cycle") or d.cycles + 1))
            elif kind in ("queued", "retrying", "failed", "stopped", "cancelled"):
                upd.update(state=kind, phase="", rate=0.0, eta=None)
                if ev.get("error"):
                    upd["last_error"] = str(ev["error"])
                if kind in ("failed", "stopped", "cancelled"):
                    upd["finished_unix"] = now
            upd["bytes_sent"] = sum(sent.values())
            self._disks[d.name] = replace(d, **upd)

    def _refresh_lag(self, d: DiskStatus, now: float) -> DiskStatus:
        if self.mode == "sync" and d.last_snapshot_unix is not None and d.state in ("running", "syncing"):
            return replace(d, lag_seconds=max(0.0, now - d.last_snapshot_unix))
        return d

    def status(self) -> FleetStatus:
        """A consistent copy of the status."""
        with self._lock:
            now = time.time()
            disks = [self._refresh_lag(d, now) for d in self._disks.values()]
            totals = totals_of(disks)
            elapsed = (self._ended or now) - self._started
            # A throughput sample at most every half second, the last 10 minutes of them.
            t, sent = self._last_sample
            if elapsed - t >= 0.5 or not self._samples:
                rate = (totals.bytes_sent - sent) / (elapsed - t) if elapsed > t else 0.0
                self._samples.append([round(elapsed, 2), max(0.0, rate)])
                self._samples = self._samples[-1200:]
                self._last_sample = (elapsed, totals.bytes_sent)
            return FleetStatus(
                fleet=self.fleet,
                mode=self.mode,
                disks=disks,
                totals=totals,
                workers=list(self._workers),
                running=self._ended is None,
                started_unix=self._started,
                elapsed=elapsed,
                throughput=[list(s) for s in self._samples],
            )

    def state_of(self, name: str) -> str:
        with self._lock:
            return self._disks[name].state
