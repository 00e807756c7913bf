"""Long operations: background handles, progress, events, cancel, resume, Ctrl-C, threads,
asyncio."""

from __future__ import annotations

import _thread
import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import blockferry
from conftest import MIB, make_disk

# A bandwidth cap makes a replication last long enough to act on it mid-way.
SLOW = 24 * MIB  # bytes per second
# The cap lets a pack go at once, and with the default budget a pack is a fifth of the
# 96 MiB disk: a small budget makes small packs, so that the cap holds from the start.
SMALL_PACKS = 32 * MIB


@pytest.fixture
def big(tmp_path: Path) -> Path:
    """96 MiB of incompressible data."""
    return make_disk(tmp_path / "big.raw", 96 * MIB, [(0, os.urandom(96 * MIB))])


def wait_for(cond, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_handle_progress_events_and_result(store: blockferry.Store, big: Path, state: Path) -> None:
    op = store.start_replicate(big, state_dir=state, bwlimit=SLOW, memory_budget=SMALL_PACKS, progress_interval=0)
    assert op.kind == "replicate" and not op.done()
    assert op.wait(0.05) is False
    wait_for(lambda: (op.progress() or blockferry.Progress("", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None, "")).bytes_done > 0)
    p = op.progress()
    assert p is not None and p.phase == "replicating" and p.bytes_total == 96 * MIB
    assert 0 < p.fraction <= 1 and p.io_engine == "pread"
    events = list(op.events())
    assert op.done()
    types = [e.type for e in events]
    assert types[0] in ("started", "progress") and types[-1] == "finished", types
    done = [e.progress.bytes_done for e in events if isinstance(e, blockferry.ProgressEvent)]
    assert done == sorted(done)
    r = op.result()
    assert r.bytes_new == 96 * MIB
    assert op.result(timeout=0) == r  # the outcome stays


def test_callback_is_rate_limited(store: blockferry.Store, big: Path) -> None:
    calls = []
    store.replicate(
        big, job_state=False, bwlimit=48 * MIB, progress=calls.append, progress_interval=0.5
    )
    progress = [e for e in calls if e.type == "progress"]
    # About 2 s of work: a progress event at most every 0.5 s.
    assert 1 <= len(progress) <= 6, len(progress)
    assert calls[-1].type == "finished"


def test_cancel_from_another_thread_then_resume(store: blockferry.Store, big: Path, state: Path) -> None:
    op = store.start_replicate(big, state_dir=state, bwlimit=SLOW, memory_budget=SMALL_PACKS)
    wait_for(lambda: (op.progress() is not None and op.progress().bytes_written >= 32 * MIB))  # type: ignore[union-attr]
    threading.Thread(target=op.cancel).start()
    with pytest.raises(blockferry.CancelledError) as e:
        op.result()
    assert e.value.kind == "cancelled" and op.cancelled()
    assert store.snapshots() == []
    [job] = blockferry.jobs(state_dir=state)
    assert job.state == "active" and not job.running
    r = store.replicate(big, state_dir=state)
    assert r.resumed
    assert r.bytes_resumed + r.bytes_deduplicated >= 32 * MIB, r
    assert store.verify(r.snapshot, image=big).ok


def test_ctrl_c_cancels_cleanly_and_keeps_resume_state(store: blockferry.Store, big: Path, state: Path) -> None:
    assert threading.current_thread() is threading.main_thread()
    # Python maps SIGINT to KeyboardInterrupt only when SIGINT was not ignored at its start,
    # and a background job (CI scripts run so) starts with it ignored: then interrupt_main
    # does nothing. An interactive Python, which this test stands for, has the handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_a_replication(store, big, state)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_a_replication(store: blockferry.Store, big: Path, state: Path) -> None:
    timer = threading.Timer(1.5, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        store.replicate(big, state_dir=state, bwlimit=SLOW, memory_budget=SMALL_PACKS)
    timer.join()
    assert time.monotonic() - started < 3.5  # stopped promptly, not after the whole copy
    [job] = blockferry.jobs(state_dir=state)
    assert job.state == "active" and not job.running
    r = store.replicate(big, state_dir=state)
    assert r.resumed and r.bytes_resumed + r.bytes_deduplicated > 0


def test_callback_exception_stops_the_operation(store: blockferry.Store, big: Path) -> None:
    def boom(e: blockferry.Event) -> None:
        if e.type == "progress":
            raise RuntimeError("observer failed")

    op = store.start_replicate(big, job_state=False, bwlimit=SLOW, memory_budget=SMALL_PACKS, progress=boom, progress_interval=0)
    with pytest.raises(RuntimeError, match="observer failed"):
        op.result()
    assert op.cancelled()


def test_several_replications_at_once_from_threads(store: blockferry.Store, tmp_path: Path, state: Path) -> None:
    disks = [
        make_disk(tmp_path / f"d{i}.raw", 16 * MIB, [(0, os.urandom(16 * MIB))]) for i in range(3)
    ]
    # Small packs, so that the cap holds from the first (a pack goes at once): 2 s each.
    ops = [
        store.start_replicate(d, state_dir=state, bwlimit=8 * MIB, memory_budget=32 * MIB)
        for d in disks
    ]
    # All three under way together: each has read something while none is done.
    wait_for(lambda: all((op.progress() or blockferry.Progress("", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None, "")).bytes_done > 0 for op in ops))
    assert sum(not op.done() for op in ops) == 3
    reports = [op.result() for op in ops]
    assert len({r.snapshot for r in reports}) == 3
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda r: store.verify(r.snapshot).ok, reports))
    assert outs == [True] * 3
    assert len(store.snapshots()) == 3


def count_for(seconds: float, during=None) -> int:
    """Increments a counter on a Python thread for `seconds` and returns the count, while the
    calling thread runs `during` (or sleeps)."""
    stop = threading.Event()
    count = [0]

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    started = time.monotonic()
    if during is not None:
        during()
    rest = seconds - (time.monotonic() - started)
    if rest > 0:
        time.sleep(rest)
    stop.set()
    t.join()
    return count[0]


def test_a_blocking_call_releases_the_gil(store: blockferry.Store, big: Path) -> None:
    # A Python thread's progress while this thread sits in a blocking call, against its
    # progress while this thread sleeps (which releases the GIL): a call that held the GIL
    # would stop the counter for as long as it runs.
    idle = count_for(1.0)
    seconds = [0.0]

    def replicate() -> None:
        t0 = time.monotonic()
        store.replicate(big, job_state=False, bwlimit=96 * MIB)  # about a second
        seconds[0] = time.monotonic() - t0

    busy = count_for(0.0, replicate)
    assert seconds[0] > 0.5, seconds
    # Per second, at least a third of the idle rate (two cores share the work here).
    assert busy / seconds[0] > idle / 3, (busy, seconds[0], idle)


def test_asyncio_await_and_cancel(store: blockferry.Store, big: Path, tmp_path: Path) -> None:
    small = make_disk(tmp_path / "small.raw", 4 * MIB, [(0, os.urandom(4 * MIB))])

    async def main() -> None:
        r = await store.start_replicate(small, job_state=False)
        assert r.bytes_new == 4 * MIB
        op = store.start_replicate(big, job_state=False, bwlimit=SLOW, memory_budget=SMALL_PACKS)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(op, timeout=0.5)
        assert op.cancelled()
        with pytest.raises(blockferry.CancelledError):
            op.result(timeout=30)

    asyncio.run(main())


class _NoExecutor(ThreadPoolExecutor):
    """A default executor that fails the test if anything is run on it."""

    def submit(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def, override]
        raise AssertionError("an awaited operation used the event loop's executor")


def test_asyncio_completes_from_the_engine_without_an_executor(
    store: blockferry.Store, tmp_path: Path
) -> None:
    """``await op`` and ``async for e in op.events_async()`` are woken by the engine (the
    loop watches a socket the task writes to): no executor thread, no polling. Before, every
    await went through the default executor, 0.2 s at a time."""
    disks = [make_disk(tmp_path / f"s{i}.raw", 4 * MIB, [(0, os.urandom(2 * MIB))]) for i in range(3)]

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(_NoExecutor())
        # Several awaited at once, each by its own coroutine, and one awaited twice.
        ops = [store.start_replicate(d, job_state=False) for d in disks]
        reports = await asyncio.gather(*ops, ops[0])
        assert [r.bytes_new for r in reports] == [2 * MIB] * 4
        assert reports[0].snapshot == reports[3].snapshot
        # Events as they come, in order, ending with the end of the operation.
        op = store.start_verify(reports[1].snapshot, image=disks[1])
        kinds = [e.type async for e in op.events_async()]
        assert kinds[0] == "started" and kinds[-1] == "finished", kinds
        assert (await op).ok

    asyncio.run(main())


def test_restore_verify_convert_handles(store: blockferry.Store, tmp_path: Path, big: Path) -> None:
    img = make_disk(tmp_path / "x.raw", 8 * MIB, [(MIB, os.urandom(2 * MIB))])
    snap = store.replicate(img, job_state=False).snapshot
    op = store.start_restore(snap, tmp_path / "x.out")
    assert op.kind == "restore" and op.result().bytes_written == 2 * MIB
    v = store.start_verify(snap, image=img)
    assert [e.type for e in v.events()][-1] == "finished" and v.result().ok
    c = blockferry.start_convert(img, tmp_path / "x.conv")
    assert c.result().virtual_size == 8 * MIB
    assert (tmp_path / "x.conv").read_bytes() == img.read_bytes()
    g = store.start_gc(dry_run=True)
    assert g.result().dry_run
    slow = store.start_replicate(big, job_state=False, bwlimit=SLOW, memory_budget=SMALL_PACKS)
    with pytest.raises(TimeoutError):
        slow.result(timeout=0.05)
    slow.cancel()
    with pytest.raises(blockferry.CancelledError):
        slow.result()
