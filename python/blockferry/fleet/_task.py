"""What runs on a Dask worker: one disk's replication, or its continuous cycles, reporting to
the fleet's driver as it goes (``Worker.log_event`` on the fleet's topic)."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import uuid
from typing import Any, Callable, Dict, Optional

import blockferry

# Per worker process: at most `per_worker` disks at once, whatever the worker's threads.
_slots_lock = threading.Lock()
_slots: Dict[int, threading.BoundedSemaphore] = {}

#: Options of :meth:`blockferry.Store.sync` a disk's options may carry.
SYNC_OPTIONS = ("workers", "memory_budget", "verify_sample", "disk", "allow_outside_folder")


def _slot(n: int) -> threading.BoundedSemaphore:
    with _slots_lock:
        return _slots.setdefault(n, threading.BoundedSemaphore(n))


def worker_state_dir(base: Optional[str], worker: str) -> str:
    """The job database folder of one worker: a folder of its own under ``base``, as a
    separate host would have (jobs resume on any worker through the store)."""
    root = base or os.path.join(blockferry.default_state_dir(), "fleet")
    return os.path.join(root, "worker-" + re.sub(r"[^A-Za-z0-9_.-]", "_", worker))


def run_disk(disk: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Replicates one disk (``cfg["mode"] == "once"``) or keeps it in sync until the fleet's
    stop event is set (``"sync"``); returns the execution's id (``run``) and its last report
    as plain data (``report``; in continuous mode with ``cycles`` and ``lag_seconds``)."""
    from distributed import Event, get_worker

    worker = get_worker()
    run = uuid.uuid4().hex[:12]
    topic = cfg["topic"]
    name = disk["name"]

    def emit(kind: str, **fields: Any) -> None:
        worker.log_event(
            topic,
            {"disk": name, "run": run, "kind": kind, "worker": str(worker.address),
             "time": time.time(), **fields},
        )

    def progress(ev: blockferry.Event) -> None:
        if isinstance(ev, (blockferry.ProgressEvent, blockferry.Finished)):
            p = ev.progress
            if p.phase in ("replicating", "committing"):
                emit(
                    "progress",
                    phase=p.phase,
                    bytes_done=p.bytes_done,
                    bytes_total=p.bytes_total,
                    bytes_written=p.bytes_written,
                    rate=p.rate,
                    eta=p.eta,
                )
        elif isinstance(ev, (blockferry.WarningEvent, blockferry.NoteEvent)):
            emit(ev.type, message=ev.message)

    per_worker = int(cfg.get("per_worker") or 1)
    with _slot(per_worker):
        emit("started")
        state_dir = worker_state_dir(cfg.get("state_dir"), str(worker.name))
        bwlimit = cfg.get("bwlimit_per_worker")
        opts: Dict[str, Any] = dict(cfg.get("options") or {})
        opts.update(disk.get("options") or {})
        if bwlimit:
            # The worker's cap, shared evenly by the disks it may run at once.
            opts["bwlimit"] = min(int(opts.get("bwlimit") or bwlimit), max(1, int(bwlimit) // per_worker))
        store = blockferry.Store.open(
            cfg["store"],
            passphrase=cfg.get("passphrase"),
            state_dir=state_dir,
            **(cfg.get("s3") or {}),
        )
        with store:
            if cfg["mode"] == "sync":
                stop = Event(cfg["stop"])
                out = _sync(store, disk, cfg, opts, state_dir, stop.wait, emit, progress)
            else:
                cancel = Event(cfg["cancel"])
                out = {"report": _once(store, disk, cfg, opts, state_dir, cancel.is_set, emit, progress)}
            return {"run": run, **out}


def _once(
    store: blockferry.Store,
    disk: Dict[str, Any],
    cfg: Dict[str, Any],
    opts: Dict[str, Any],
    state_dir: str,
    cancelled: Callable[[], bool],
    emit: Callable[..., None],
    progress: Callable[[blockferry.Event], None],
) -> Dict[str, Any]:
    name = disk["name"]
    if disk.get("changes"):
        # A delta on the disk's newest snapshot when it has one; a whole copy otherwise.
        try:
            store.snapshot(f"{name}@latest")
            opts.setdefault("base", f"{name}@latest")
            opts.setdefault("changes", disk["changes"])
        except blockferry.NotFoundError:
            pass
    started = time.time()
    op = store.start_replicate(
        disk["path"],
        name=name,
        wait=float(cfg.get("wait") or 0.0),
        state_dir=state_dir,
        progress=progress,
        progress_interval=0.5,
        **opts,
    )
    # A cancelled fleet cancels the replication (it keeps what it made durable).
    while not op.wait(0.5):
        if cancelled():
            op.cancel()
    report = op.result()
    out = dataclasses.asdict(report)
    emit("done", report=out, snapshot_unix=started, lag_seconds=0.0)
    return out


def _sync(
    store: blockferry.Store,
    disk: Dict[str, Any],
    cfg: Dict[str, Any],
    opts: Dict[str, Any],
    state_dir: str,
    stop_wait: Callable[[float], bool],
    emit: Callable[..., None],
    progress: Callable[[blockferry.Event], None],
) -> Dict[str, Any]:
    every = float(cfg.get("every") or 60.0)
    cycles = cfg.get("cycles")
    last: Dict[str, Any] = {}
    kw = {k: v for k, v in opts.items() if k in SYNC_OPTIONS}
    cycle_start = time.monotonic()
    for cyc in store.sync(
        disk["path"],
        changes=disk.get("changes") or "hash",
        every=0.0,
        name=disk["name"],
        state_dir=state_dir,
        bwlimit=opts.get("bwlimit"),
        progress=progress,
        progress_interval=0.5,
        **kw,
    ):
        report = dataclasses.asdict(cyc.report) if cyc.report else None
        emit(
            "cycle",
            cycle=cyc.cycle,
            lag_seconds=cyc.lag_seconds,
            snapshot_unix=(cyc.last_success_unix_ms / 1000.0) if cyc.last_success_unix_ms else None,
            report=report,
            error=str(cyc.error) if cyc.error else None,
        )
        last = {"cycles": cyc.cycle, "report": report, "lag_seconds": cyc.lag_seconds}
        if cycles is not None and cyc.cycle >= int(cycles):
            break
        # The next cycle starts `every` seconds after this one did, unless the fleet stops.
        if stop_wait(max(0.0, every - (time.monotonic() - cycle_start))):
            break
        cycle_start = time.monotonic()
    emit("stopped")
    return last
