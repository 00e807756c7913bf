"""Shared fixtures: sample disks, a local store, and the real S3 server on loopback."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterable, Iterator, Tuple

import pytest

import blockferry

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def require_tools() -> bool:
    return os.environ.get("BF_REQUIRE_TOOLS") == "1"


def pytest_configure(config: pytest.Config) -> None:
    # The tests are of the installed extension, never of the source folder.
    assert "site-packages" in blockferry.__file__, blockferry.__file__


def make_disk(path: Path, size: int, data: Iterable[Tuple[int, bytes]] = ()) -> Path:
    """A sparse raw disk of ``size`` bytes with ``data`` written at its offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in data:
            f.seek(off)
            f.write(b)
    return path


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(autouse=True)
def client_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own client state (job database, store records), not the home folder's."""
    d = tmp_path / "client-state"
    monkeypatch.setenv("BLOCKFERRY_STATE_DIR", str(d))
    return d


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A 24 MiB disk: 8 MiB of data, a zero hole, 4 MiB more data."""
    return make_disk(
        tmp_path / "disk.raw",
        24 * MIB,
        [(0, noise(8 * MIB, 1)), (16 * MIB, noise(4 * MIB, 2))],
    )


@pytest.fixture
def store(tmp_path: Path) -> blockferry.Store:
    return blockferry.Store.create(tmp_path / "store", passphrase="correct horse")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def have(tool: str) -> bool:
    if shutil.which(tool):
        return True
    if require_tools():
        pytest.fail(f"{tool} is required (BF_REQUIRE_TOOLS=1)")
    pytest.skip(f"{tool} is not installed")
    return False


@pytest.fixture(scope="session")
def s3() -> Iterator[Dict[str, str]]:
    """The SeaweedFS S3 server of tests/s3-server.sh on 127.0.0.1 (started if needed)."""
    try:
        out = subprocess.run(
            [str(ROOT / "tests" / "s3-server.sh"), "start", str(ROOT / "target" / "s3")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        if require_tools():
            raise
        pytest.skip(f"no S3 server: {e}")
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    yield env


def s3_kwargs(env: Dict[str, str]) -> Dict[str, str]:
    return {
        "endpoint": env["BF_S3_ENDPOINT"],
        "access_key": env["BF_S3_ACCESS_KEY"],
        "secret_key": env["BF_S3_SECRET_KEY"],
        "region": "us-east-1",
    }
