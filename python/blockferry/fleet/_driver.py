"""The fleet's driver: submits each disk's replication as a task to a Dask cluster, keeps the
limits, retries, and follows the workers' reports."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional

from .. import _errors
from .._errors import ConfigError
from ._model import Disk, FleetStatus, Inventory, Tracker, load_inventory
from . import _task

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster

    from ._server import StatusServer

log = logging.getLogger("blockferry.fleet")

#: Errors a new attempt cannot fix: the disk fails at once.
PERMANENT = (
    _errors.ConfigError,
    _errors.InvalidImageError,
    _errors.UnsupportedImageError,
    _errors.InvalidChangeListError,
    _errors.CredentialsError,
    _errors.AccessDeniedError,
    _errors.CorruptError,
    _errors.UnsupportedVersionError,
    _errors.VerifyMismatchError,
    _errors.SourceNotFoundError,
    _errors.SourcePermissionError,
)


@dataclass(frozen=True)
class FleetResult:
    """What a fleet run did.

    Attributes:
        status: The final status of every disk, with the totals.
        reports: Per disk name: its last replication report (as plain data: the fields of
            :class:`blockferry.ReplicateReport`), for disks that made a snapshot. In
            continuous mode, the last cycle's.
        errors: Per disk name: the error that failed it after its attempts.
    """

    status: FleetStatus
    reports: Dict[str, Dict[str, Any]]
    errors: Dict[str, str]

    @property
    def ok(self) -> bool:
        """Whether every disk succeeded."""
        return not self.errors and all(
            d.state in ("done", "stopped") for d in self.status.disks
        )


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class FleetRun:
    """A fleet run in progress (see :func:`blockferry.fleet.start_run`)."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        store: str,
        passphrase: Optional[str] = None,
        s3: Optional[Mapping[str, Any]] = None,
        workers: int = 4,
        scheduler: Optional[str] = None,
        client: Optional["Client"] = None,
        per_datastore: int = 2,
        per_worker: int = 2,
        bwlimit_per_worker: Optional[int] = None,
        retries: int = 3,
        backoff: float = 2.0,
        mode: str = "once",
        every: float = 300.0,
        cycles: Optional[int] = None,
        state_dir: Optional[str] = None,
        wait: float = 60.0,
        options: Optional[Mapping[str, Any]] = None,
        status: Optional[str] = None,
    ) -> None:
        if mode not in ("once", "sync"):
            raise ConfigError(f"mode {mode!r}: give 'once' or 'sync'")
        for what, v in (("per_datastore", per_datastore), ("per_worker", per_worker), ("workers", workers)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{what} must be a whole number from 1 up, not {v!r}")
        if retries < 0 or backoff < 0:
            raise ConfigError("retries and backoff must not be negative")
        self.disks: List[Disk] = load_inventory(inventory)
        self.id = uuid.uuid4().hex[:12]
        self.mode = mode
        self.tracker = Tracker(self.id, mode, self.disks)
        self._per_datastore = per_datastore
        self._retries = retries
        self._backoff = backoff
        self._events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._reports: Dict[str, Dict[str, Any]] = {}
        self._errors: Dict[str, str] = {}
        self._failure: Optional[BaseException] = None
        self._cfg: Dict[str, Any] = {
            "topic": f"blockferry-fleet-{self.id}",
            "stop": f"blockferry-fleet-{self.id}-stop",
            "cancel": f"blockferry-fleet-{self.id}-cancel",
            "store": os.fspath(store),
            "passphrase": passphrase,
            "s3": dict(s3 or {}),
            "per_worker": per_worker,
            "bwlimit_per_worker": bwlimit_per_worker,
            "mode": mode,
            "every": every,
            "cycles": cycles,
            "state_dir": os.path.abspath(state_dir) if state_dir else None,
            "wait": wait,
            "options": dict(options or {}),
        }
        self._cluster: Optional["LocalCluster"] = None
        self._own_client = client is None
        self.client = client if client is not None else self._connect(scheduler, workers, per_worker)
        self.server: Optional["StatusServer"] = None
        try:
            self.client.subscribe_topic(self._cfg["topic"], self._on_worker_event)
            if status:
                from ._server import StatusServer

                self.server = StatusServer(self, status)
                self.server.start()
        except BaseException:
            self._close()
            raise
        self._thread = threading.Thread(target=self._main, name=f"fleet-{self.id}", daemon=True)
        self._thread.start()

    def _connect(self, scheduler: Optional[str], workers: int, per_worker: int) -> "Client":
        try:
            from distributed import Client, LocalCluster
        except ImportError as e:
            raise ConfigError(
                "blockferry.fleet runs on Dask: install the fleet extra "
                "(pip install 'blockferry[fleet]', or ./python[fleet] from the source)"
            ) from e

        if scheduler:
            return Client(scheduler)
        self._cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=per_worker,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        return Client(self._cluster)

    @property
    def status_url(self) -> Optional[str]:
        """The status page's address, when one is served."""
        return self.server.url if self.server else None

    # What the caller sees.

    def status(self) -> FleetStatus:
        """Every disk's state, phase, progress, rate, ETA, lag, attempts, last error and
        snapshots, with the fleet's totals (sums over the disks)."""
        return self.tracker.status()

    def events(self, timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """The fleet's events as they come (each a dict with ``disk``, ``kind`` and its
        fields), until the run ends, or ``timeout`` seconds pass without one."""
        while True:
            try:
                ev = self._events.get(timeout=0.2 if timeout is None else min(timeout, 0.2))
            except queue.Empty:
                if self._done.is_set() and self._events.empty():
                    return
                if timeout is not None:
                    timeout -= 0.2
                    if timeout <= 0:
                        return
                continue
            yield ev

    def stop(self) -> None:
        """Stops gracefully: no disk starts any more; in continuous mode each disk stops
        after its current cycle (its newest snapshot complete)."""
        self._stop.set()
        self._set_cluster_event("stop")

    def cancel(self) -> None:
        """Stops now: queued disks are cancelled and running replications cancelled (each
        keeps what it made durable: a new run resumes it). In continuous mode, as
        :meth:`stop`."""
        self._cancel.set()
        self.stop()
        self._set_cluster_event("cancel")

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits for the run's end at most ``timeout`` seconds; whether it ended."""
        return self._done.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> FleetResult:
        """Waits for the end and returns what the run did; closes the cluster it started."""
        if not self._done.wait(timeout):
            raise TimeoutError("the fleet is still running")
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return FleetResult(
            status=self.tracker.status(), reports=dict(self._reports), errors=dict(self._errors)
        )

    def close(self) -> None:
        """Cancels the run if it is still going, and closes what it started (cluster, page)."""
        if not self._done.is_set():
            self.cancel()
            self._done.wait()
        self._thread.join()
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> "FleetRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Inside.

    def _set_cluster_event(self, which: str) -> None:
        try:
            from distributed import Event

            Event(self._cfg[which], client=self.client).set()
        except Exception as e:  # the cluster is gone: nothing runs there any more
            log.debug("could not set the fleet's %s event: %s", which, e)

    def _emit(self, ev: Dict[str, Any]) -> None:
        ev.setdefault("time", time.time())
        self.tracker.apply(ev)
        self._events.put(ev)

    def _on_worker_event(self, event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if isinstance(msg, dict):
            self._emit(dict(msg))

    def _main(self) -> None:
        try:
            self._schedule()
        except BaseException as e:  # the driver itself failed (the cluster went away)
            self._failure = e
            log.error("the fleet's driver failed: %s", e)
        finally:
            self.tracker.end()
            self._close()
            self._done.set()

    def _schedule(self) -> None:
        from distributed import wait as dask_wait
        from distributed import TimeoutError as DaskTimeout

        self.tracker.set_workers(list(self.client.scheduler_info().get("workers", {})))
        order = sorted(range(len(self.disks)), key=lambda i: (self.disks[i].group, i))
        pending: List[Disk] = [self.disks[i] for i in order]
        ready_at: Dict[str, float] = {}
        attempts: Counter[str] = Counter()
        running: Dict["Future[Any]", Disk] = {}
        busy: Counter[str] = Counter()
        last_workers = 0.0
        while pending or running:
            if self._cancel.is_set() or self._stop.is_set():
                for d in pending:
                    self._emit({"disk": d.name, "kind": "cancelled" if self._cancel.is_set() else "stopped"})
                pending = []
            now = time.monotonic()
            for d in list(pending):
                if busy[d.datastore] >= self._per_datastore or ready_at.get(d.name, 0.0) > now:
                    continue
                attempts[d.name] += 1
                fut = self.client.submit(
                    _task.run_disk,
                    dataclasses.asdict(d),
                    self._cfg,
                    key=f"blockferry-{self.id}-{attempts[d.name]}-{d.name}",
                    pure=False,
                    retries=0,
                )
                running[fut] = d
                busy[d.datastore] += 1
                pending.remove(d)
            if not running:
                time.sleep(0.1)
                continue
            try:
                done, _ = dask_wait(list(running), timeout=0.5, return_when="FIRST_COMPLETED")
            except (DaskTimeout, TimeoutError):
                done = set()
            if now - last_workers > 2.0:
                self.tracker.set_workers(list(self.client.scheduler_info().get("workers", {})))
                last_workers = now
            for fut in done:
                d = running.pop(fut)
                busy[d.datastore] -= 1
                retry = self._finished(fut, d, attempts[d.name])
                if retry is not None:
                    ready_at[d.name] = time.monotonic() + retry
                    pending.append(d)

    def _finished(self, fut: "Future[Any]", d: Disk, attempt: int) -> Optional[float]:
        """Takes a task's outcome; returns the delay before a retry, if one is due."""
        if fut.status == "finished":
            out = fut.result()
            if out.get("report"):
                self._reports[d.name] = out["report"]
            if self.mode == "sync":
                self._emit({"disk": d.name, "kind": "stopped"})
            else:
                # (The worker said so already, unless its event was lost: idempotent.)
                self._emit({"disk": d.name, "run": out["run"], "kind": "done", "report": out["report"]})
            return None
        if fut.status == "cancelled":
            self._emit({"disk": d.name, "kind": "cancelled"})
            return None
        exc = fut.exception()
        err = _error_text(exc) if exc is not None else "the task failed"
        if isinstance(exc, _errors.CancelledError) and self._cancel.is_set():
            self._emit({"disk": d.name, "kind": "cancelled", "error": err})
            return None
        permanent = isinstance(exc, PERMANENT)
        if permanent or attempt > self._retries or self._stop.is_set():
            self._errors[d.name] = err
            self._emit({"disk": d.name, "kind": "failed", "error": err, "attempts": attempt})
            return None
        delay = float(self._backoff * 2 ** (attempt - 1))
        self._emit({"disk": d.name, "kind": "retrying", "error": err, "retry_in": delay})
        return delay

    def _close(self) -> None:
        try:
            self.client.unsubscribe_topic(self._cfg["topic"])
        except Exception:
            pass
        if self._own_client:
            try:
                self.client.close()
            except Exception:
                pass
            if self._cluster is not None:
                try:
                    self._cluster.close()
                except Exception:
                    pass


def start_run(inventory: Inventory, **kwargs: Any) -> FleetRun:
    """Starts a fleet run and returns its handle at once: :meth:`FleetRun.status`,
    :meth:`FleetRun.events`, :meth:`FleetRun.stop`, :meth:`FleetRun.cancel`,
    :meth:`FleetRun.result`; use it as a context manager (leaving it cancels a run still
    going and closes the cluster it started).

    Keywords: ``store`` (a folder or ``s3://bucket/prefix``; required), ``passphrase``
    (default: each worker's ``BLOCKFERRY_PASSPHRASE``; given here, it travels to the workers
    with the tasks, so use Dask's TLS on a real cluster), ``s3`` (the S3 settings of
    :meth:`blockferry.Store.open`: ``endpoint``, ``region``, ``access_key``, ...),
    ``workers`` (processes of the default ``LocalCluster``, 4), ``scheduler`` (a scheduler's
    address instead), ``client`` (a ``distributed.Client`` of the caller's), ``per_datastore``
    and ``per_worker`` (disks at once, 2 and 2), ``bwlimit_per_worker`` (bytes per second),
    ``retries`` (3) and ``backoff`` (seconds before the first retry, doubling; 2),
    ``mode`` (``"once"`` or ``"sync"``), ``every`` and ``cycles`` (continuous mode),
    ``state_dir`` (base of the workers' job databases, one folder each), ``wait`` (seconds a
    replication waits for another run of its disk, 60), ``options`` (keywords of
    :meth:`blockferry.Store.replicate` for every disk; a disk's own ``options`` win) and
    ``status`` (``HOST:PORT`` of the status page and ``/metrics``; port 0 picks one, see
    :attr:`FleetRun.status_url`)."""
    return FleetRun(inventory, **kwargs)


def run(inventory: Inventory, **kwargs: Any) -> FleetResult:
    """Runs a fleet to its end and returns what it did (the keywords of :func:`start_run`).
    ``inventory``: image paths, :class:`Disk` entries or their dicts, or the JSON of
    ``blockferry discover --json`` (a file, its text or the parsed object)."""
    with start_run(inventory, **kwargs) as fleet:
        return fleet.result()

