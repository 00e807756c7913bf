"""Replicate several disks in parallel worker processes, one disk per task.

    python parallel_disks.py STORE DISK [DISK ...]

Each worker process opens the store itself (a store handle does not cross processes) and
replicates one disk; job state is per disk, so a failed or killed worker's disk resumes on
the next run, on this host or any other that shares the state folder. The pool uses the
``spawn`` start method: the engine runs threads, which ``fork`` does not carry over.
Set BLOCKFERRY_PASSPHRASE for an encrypted store.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import List, Tuple

import blockferry


def replicate_one(store_location: str, disk: str) -> Tuple[str, str, int]:
    store = blockferry.Store.open(store_location)
    # Two workers per process: the processes share the machine's cores.
    report = store.replicate(disk, workers=2)
    return disk, report.snapshot, report.bytes_new


def main(argv: List[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    store, disks = argv[1], argv[2:]
    failed = 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(4, len(disks)), mp_context=ctx) as pool:
        futures = {pool.submit(replicate_one, store, d): d for d in disks}
        for f in as_completed(futures):
            try:
                disk, snapshot, new = f.result()
                print(f"{disk}: snapshot {snapshot} ({new} new bytes)")
            except blockferry.Error as e:
                failed += 1
                print(f"{futures[f]}: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
