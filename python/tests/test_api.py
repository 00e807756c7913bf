"""The package's surface: errors, version, the worker-pool example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import blockferry
from blockferry import _errors, _native
from conftest import MIB, ROOT, make_disk


def test_every_engine_error_kind_has_its_exception() -> None:
    assert set(_native.error_kinds()) == set(_errors.KINDS)
    builtin = {
        "io": OSError,
        "invalid_image": ValueError,
        "unsupported_image": ValueError,
        "invalid_change_list": ValueError,
        "corrupt": OSError,
        "not_found": FileNotFoundError,
        "unsupported_version": RuntimeError,
        "credentials": PermissionError,
        "access_denied": PermissionError,
        "store": OSError,
        "verify_mismatch": ValueError,
        "config": ValueError,
        "busy": OSError,
        "cancelled": Exception,
        "internal": RuntimeError,
    }
    for kind, cls in _errors.KINDS.items():
        assert issubclass(cls, blockferry.Error) and issubclass(cls, builtin[kind]), kind
        assert getattr(blockferry, cls.__name__) is cls


def test_error_context_attributes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfile" + bytes(1 << 20))
    with pytest.raises(blockferry.InvalidImageError) as e:
        blockferry.image_info(bad)
    err = e.value
    assert err.kind == "invalid_image" and err.path == str(bad)
    assert str(bad) in str(err) and err.message and err.message in str(err)
    assert isinstance(err.causes, list) and err.part is None
    with pytest.raises(blockferry.UnsupportedImageError):
        q = tmp_path / "x.qcow2"
        q.write_bytes(b"QFI\xfb" + bytes(4096))
        blockferry.image_info(q)


def test_bad_arguments_are_config_errors(store: blockferry.Store, tmp_path: Path) -> None:
    img = make_disk(tmp_path / "d.raw", MIB)
    with pytest.raises(blockferry.ConfigError):
        store.replicate(img, io_engine="turbo")
    with pytest.raises(blockferry.ConfigError):
        store.replicate(img, verify_sample=2.0)
    with pytest.raises(blockferry.ConfigError):
        store.start_replicate(img, progress_interval=-1)
    with pytest.raises(blockferry.ConfigError):
        blockferry.Store.open(tmp_path, passphrase="x", access_key="only-one")
    with pytest.raises(TypeError):
        store.replicate(img, no_such_option=1)  # type: ignore[call-arg]
    with pytest.raises(blockferry.NotFoundError):
        store.restore("0123456789abcdef", tmp_path / "o.raw")
    with pytest.raises(blockferry.SourceIOError):
        store.replicate(tmp_path / "missing.raw")


def test_version() -> None:
    assert blockferry.__version__ == blockferry.version() and blockferry.version().count(".") == 2


def test_worker_pool_example_replicates_disks_in_parallel_processes(tmp_path: Path) -> None:
    disks = [
        make_disk(tmp_path / f"vm{i}.raw", 8 * MIB, [(0, os.urandom(4 * MIB))]) for i in range(3)
    ]
    loc = tmp_path / "store"
    blockferry.Store.create(loc, passphrase="pool")
    env = dict(
        os.environ,
        BLOCKFERRY_PASSPHRASE="pool",
        BLOCKFERRY_STATE_DIR=str(tmp_path / "state"),
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "python" / "examples" / "parallel_disks.py"), str(loc)]
        + [str(d) for d in disks],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("snapshot") == 3
    store = blockferry.Store.open(loc, passphrase="pool")
    assert sorted(s.disk for s in store.snapshots()) == ["vm0.raw", "vm1.raw", "vm2.raw"]
    for s in store.snapshots():
        assert store.verify(s.id, image=tmp_path / s.disk).ok


def test_default_state_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BLOCKFERRY_STATE_DIR", str(tmp_path / "jobs"))
    assert blockferry.default_state_dir() == str(tmp_path / "jobs")
    assert blockferry.jobs() == []  # an empty database is made there
    monkeypatch.delenv("BLOCKFERRY_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert blockferry.default_state_dir() == str(tmp_path / "xdg" / "blockferry")
