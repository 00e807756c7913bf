"""Export from Python: the images qemu-img reads back as the restore's bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import blockferry
from conftest import MIB, have, make_disk


@pytest.mark.parametrize(
    "fmt,qemu_fmt", [("vmdk", "vmdk"), ("vhdx", "vhdx"), ("vhd", "vpc"), ("vhd-fixed", "vpc")]
)
def test_export_reads_back_as_the_disk(
    store: blockferry.Store, tmp_path: Path, fmt: str, qemu_fmt: str
) -> None:
    have("qemu-img")
    disk = make_disk(tmp_path / "d.raw", 9 * MIB - 512, [(MIB, os.urandom(3 * MIB)), (8 * MIB, os.urandom(4096))])
    snap = store.replicate(disk, job_state=False).snapshot
    events = []
    op = store.start_export(snap, tmp_path / f"d.{fmt}", format=fmt, progress=events.append)
    assert op.kind == "export"
    r = op.result()
    assert isinstance(r, blockferry.ExportReport) and r.format == fmt and r.bytes_written > 0
    assert r.virtual_size == (9 * MIB if fmt == "vhd-fixed" else 9 * MIB - 512)
    assert events and events[-1].type == "finished"
    back = tmp_path / "back.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", qemu_fmt, "-O", "raw", str(tmp_path / f"d.{fmt}"), str(back)],
        check=True,
    )
    data = back.read_bytes()
    want = disk.read_bytes()
    assert data[: len(want)] == want and not any(data[len(want) :])


def test_an_unknown_format_names_the_argument(store: blockferry.Store, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", MIB, [(0, b"x" * 4096)])
    snap = store.replicate(disk, job_state=False).snapshot
    with pytest.raises(blockferry.ConfigError) as e:
        store.export(snap, tmp_path / "d.qcow2", format="qcow2")
    assert e.value.setting == "format" and "vhd-fixed" in str(e.value)
    assert not (tmp_path / "d.qcow2").exists()


def test_export_to_s3_and_a_delta_on_it(s3: dict, tmp_path: Path, state: Path) -> None:
    """An object as the output: reached with the store's S3 settings; a second export of a
    snapshot with one changed chunk copies the rest from the first."""
    import uuid

    from conftest import s3_kwargs

    prefix = f"py-export-{uuid.uuid4().hex[:12]}"
    url = f"s3://{s3['BF_S3_BUCKET']}/{prefix}"
    store = blockferry.Store.create(url + "/store", passphrase="pw", state_dir=state, **s3_kwargs(s3))
    disk = make_disk(tmp_path / "d.raw", 24 * MIB, [(0, os.urandom(24 * MIB))])
    first = store.replicate(disk, state_dir=state).snapshot
    target = f"{url}/vm.raw"
    full = store.export(first, target, format="raw")
    assert full.output == target and full.parts >= 2 and full.bytes_sent == 24 * MIB
    assert full.bytes_copied == 0 and full.base is None and full.job and full.etag
    with open(disk, "r+b") as f:
        f.seek(10 * MIB)
        f.write(os.urandom(MIB))
    second = store.replicate(disk, state_dir=state).snapshot
    delta = store.export(second, target, format="raw", incremental=True)
    assert delta.base == first
    # Only the changed MiB is sent: the unchanged bytes before it are staged server-side.
    assert delta.bytes_sent == MIB and delta.bytes_copied == 23 * MIB, delta
    back = tmp_path / "back.raw"
    store.export(second, back, format="raw")
    # The object holds the second snapshot's export: one elsewhere on it copies everything.
    again = blockferry.Store.open(url + "/store", passphrase="pw", state_dir=state, **s3_kwargs(s3))
    copy = again.export(second, f"{url}/copy.raw", format="raw", base_export=f"{target}@{second}")
    assert copy.bytes_sent == 0 and copy.bytes_copied == 24 * MIB
    with pytest.raises(blockferry.ConfigError) as e:
        store.export(second, tmp_path / "x.raw", format="raw", incremental=True)
    assert e.value.setting == "base_export"
    assert back.read_bytes() == disk.read_bytes()


def test_a_cutover_from_python_with_its_steps_as_events(
    store: blockferry.Store, tmp_path: Path, state: Path
) -> None:
    """A source that is not written to, cut over at once to a raw file: every step arrives
    as a note while it runs, and the target is the source."""
    disk = make_disk(tmp_path / "src.raw", 12 * MIB, [(0, os.urandom(5 * MIB)), (9 * MIB, os.urandom(MIB))])
    target = tmp_path / "target.raw"
    marker = tmp_path / "post.txt"
    events: list = []
    r = store.cutover(
        disk,
        to=str(target),
        max_downtime=30,
        now=True,
        pre_hook="true",
        post_hook=f'echo "$BLOCKFERRY_SNAPSHOT" > {marker}',
        state_dir=state,
        progress=events.append,
    )
    assert isinstance(r, blockferry.CutoverReport)
    assert r.outcome == "completed" and r.verified and r.snapshot
    assert [s["name"] for s in r.steps if s["name"] != "sync"] == [
        "pre-hook",
        "final-delta",
        "verify",
        "export",
        "post-hook",
    ]
    assert target.read_bytes() == disk.read_bytes()
    assert marker.read_text().strip() == r.snapshot
    notes = [e.message for e in events if isinstance(e, blockferry.NoteEvent)]
    assert any("post-hook" in n for n in notes), notes
    # A pre-hook that fails rolls back.
    failed = store.cutover(
        disk, to=str(target), max_downtime=30, now=True, pre_hook="false",
        rollback_hook=f"touch {tmp_path / 'rolled'}", state_dir=state,
    )
    assert failed.outcome == "rolled-back" and failed.error
    assert (tmp_path / "rolled").exists()
