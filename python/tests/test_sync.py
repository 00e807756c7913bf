"""Continuous replication from Python: ``Store.sync``, the engine's sync cycles."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest

import blockferry
from conftest import MIB, make_disk


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def restored(store: blockferry.Store, snapshot: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{snapshot}.raw"
    store.restore(snapshot, out)
    return out.read_bytes()


def test_hash_cycles_chain_deltas_and_each_snapshot_restores(
    store: blockferry.Store, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "vm.raw", 8 * MIB, [(0, os.urandom(4 * MIB))])
    states: List[bytes] = []
    cycles: List[blockferry.SyncCycle] = []
    for c in store.sync(disk, changes="hash", every=0, cycles=3, state_dir=state):
        cycles.append(c)
        states.append(disk.read_bytes())
        write_at(disk, (len(cycles) + 1) * MIB, os.urandom(MIB))  # changes for the next
    assert [c.cycle for c in cycles] == [1, 2, 3]
    reports = [c.report for c in cycles]
    assert all(r is not None for r in reports) and all(c.error is None for c in cycles)
    first, second, third = [r for r in reports if r is not None]
    assert first.base is None and first.bytes_new == 4 * MIB
    # Each later cycle is a delta on the one before, sending about the MiB that changed.
    assert second.base == first.snapshot and third.base == second.snapshot
    assert second.bytes_new == MIB and third.bytes_new == MIB
    assert all(c.lag_seconds is not None and c.lag_seconds >= 0 for c in cycles)
    for r, want in zip((first, second, third), states):
        assert restored(store, r.snapshot, tmp_path) == want


def extents_doc(base: Any, new: str, extents: List[List[int]]) -> str:
    return json.dumps({"changeId": base, "newChangeId": new, "extents": extents})


def test_a_drop_folder_takes_waiting_lists_together_and_files_them(
    store: blockferry.Store, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "vm.raw", 8 * MIB, [(0, os.urandom(8 * MIB))])
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "001.json").write_text(extents_doc("*", "cid-1", [[0, 8 * MIB]]))
    run = store.sync(disk, changes_dir=drop, every=0, state_dir=state)
    full = next(run)
    assert full.report is not None and full.report.base is None
    assert sorted(p.name for p in (drop / "done").iterdir()) == ["001.json"]
    # No list dropped: nothing to do.
    idle = next(run)
    assert idle.report is None and idle.error is None and idle.cycle == 2
    # Two lists waiting: taken as one delta, both filed.
    write_at(disk, 0, os.urandom(MIB))
    write_at(disk, 5 * MIB, os.urandom(MIB))
    (drop / "002.json").write_text(extents_doc("cid-1", "cid-2", [[0, MIB]]))
    (drop / "003.json").write_text(extents_doc("cid-2", "cid-3", [[5 * MIB, MIB]]))
    delta = next(run)
    run.close()
    assert delta.report is not None and delta.report.base == full.report.snapshot
    assert delta.report.bytes_read == 2 * MIB + delta.report.changes.sample_chunks * MIB  # type: ignore[union-attr]
    assert sorted(p.name for p in (drop / "done").iterdir()) == ["001.json", "002.json", "003.json"]
    assert store.snapshot(delta.report.snapshot).change_id == "cid-3"
    assert restored(store, delta.report.snapshot, tmp_path) == disk.read_bytes()


def test_a_changes_source_gets_the_base_and_a_failing_one_fails_only_its_cycle(
    store: blockferry.Store, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "vm.raw", 4 * MIB, [(0, os.urandom(4 * MIB))])
    bases: List[Dict[str, Any]] = []
    calls = [0]

    def source(base: Dict[str, Any]) -> str:
        bases.append(base)
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("the tracking service is down")
        if base["snapshot"] is None:
            return extents_doc("*", "c1", [[0, 4 * MIB]])
        write_at(disk, MIB, os.urandom(4096))
        return extents_doc(base["change_id"], "c2", [[MIB, 4096]])

    cycles = list(store.sync(disk, changes_source=source, every=0, cycles=3, state_dir=state))
    assert [c.cycle for c in cycles] == [1, 2, 3]
    assert cycles[0].report is not None and cycles[0].error is None
    assert isinstance(cycles[1].error, RuntimeError) and cycles[1].report is None
    last = cycles[2].report
    assert last is not None and last.base == cycles[0].report.snapshot
    assert bases[0] == {"snapshot": None, "change_id": None, "disk_size": 4 * MIB}
    assert bases[2]["snapshot"] == cycles[0].report.snapshot and bases[2]["change_id"] == "c1"
    assert restored(store, last.snapshot, tmp_path) == disk.read_bytes()


def test_a_sync_takes_exactly_one_source_of_changes(store: blockferry.Store, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "vm.raw", MIB, [])
    with pytest.raises(blockferry.ConfigError, match="one source of changes"):
        next(store.sync(disk, changes="hash", changes_dir=tmp_path))
    with pytest.raises(blockferry.ConfigError, match="one source of changes"):
        next(store.sync(disk))
    with pytest.raises(blockferry.ConfigError, match="verify sample"):
        next(store.sync(disk, changes="hash", verify_sample=2.0))
