"""The README's Python example works as written: on a local store, and on S3 with only the
store's location and S3 settings changed."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import MIB, ROOT, have, make_disk, noise, s3_kwargs


def readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    return text[start : text.index("```", start)]


def run_example(tmp_path: Path, code: str) -> str:
    have("qemu-img")
    raw = make_disk(tmp_path / "src.raw", 16 * MIB, [(0, noise(5 * MIB, 21))])
    for fmt, name in [("vmdk", "vm1.vmdk"), ("vhdx", "vm2.vhdx")]:
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(tmp_path / name)],
            check=True,
        )
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, BLOCKFERRY_STATE_DIR=str(tmp_path / "state"))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    restored = (tmp_path / "vm1-restored.raw").read_bytes()
    assert restored == raw.read_bytes()
    return out.stdout


def test_readme_example_local(tmp_path: Path) -> None:
    code = readme_python().replace('"/backup/store"', repr(str(tmp_path / "store")))
    out = run_example(tmp_path, code)
    assert "ReplicateReport(" in out and "finished" in out


def test_readme_example_s3(tmp_path: Path, s3: dict) -> None:
    url = f"s3://{s3['BF_S3_BUCKET']}/readme-{uuid.uuid4().hex[:12]}"
    settings = ", ".join(f"{k}={v!r}" for k, v in s3_kwargs(s3).items())
    code = readme_python().replace(
        'blockferry.Store.create("/backup/store", passphrase="a long passphrase")',
        f'blockferry.Store.create({url!r}, passphrase="a long passphrase", {settings})',
    )
    assert url in code
    out = run_example(tmp_path, code)
    assert "ReplicateReport(" in out
