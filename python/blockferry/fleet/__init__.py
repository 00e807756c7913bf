"""Fleet replication: many disks, replicated as tasks of a Dask cluster.

A fleet run takes an inventory (image paths, :class:`Disk` entries, or the JSON of
``blockferry discover --json``), a store, and a cluster (a ``distributed`` scheduler's
address, or by default a ``LocalCluster`` of ``workers`` processes), and replicates every disk
as a task: once (``mode="once"``: a whole copy, or a delta on the disk's newest snapshot when
the disk names a ``changes`` source), or in continuous cycles until stopped
(``mode="sync"``). Needs the ``fleet`` extra: ``pip install ./python[fleet]``.

- **Limits**: at most ``per_datastore`` disks of one datastore at once, at most
  ``per_worker`` per worker process (its threads, and a slot count in the process), and
  ``bwlimit_per_worker`` bytes per second per worker, shared by its disks.
- **Failures**: a disk whose replication fails with an error a new attempt may fix (the store
  or the network, a busy disk, a worker gone) is tried again after ``backoff`` seconds,
  doubling, up to ``retries`` more times; then it fails with its error kept. A task whose
  worker died is run again by the scheduler on another worker. Either way the replication
  resumes where the stopped one was: each worker keeps its own job database (as a separate
  host would), and jobs resume on any worker through the store's journal of the job.
- **Status**: :meth:`FleetRun.status` (per disk: state, phase, bytes done and total, rate,
  ETA, lag, attempts, last error, snapshots; and the totals), :meth:`FleetRun.events` (as they
  come), a status page and Prometheus metrics (``status="127.0.0.1:8765"``).

A sketch::

    from blockferry import fleet

    result = fleet.run(["/vmfs/ds1/a.vmdk", "/vmfs/ds2/b.vhdx"], store="s3://bucket/prefix",
                       workers=4, per_datastore=2)
    print(result.status.totals)
"""

from ._driver import FleetResult, FleetRun, run, start_run
from ._model import (
    Disk,
    DiskStatus,
    FleetStatus,
    FleetTotals,
    Inventory,
    load_inventory,
)
from ._server import metrics_text

__all__ = [
    "Disk",
    "DiskStatus",
    "FleetResult",
    "FleetRun",
    "FleetStatus",
    "FleetTotals",
    "Inventory",
    "load_inventory",
    "metrics_text",
    "run",
    "start_run",
]
