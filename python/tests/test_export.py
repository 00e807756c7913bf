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
