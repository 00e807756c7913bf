"""What a Python user expects of the bindings: exceptions as the builtins raise them, errors
that survive pickling, typed argument errors, a store that closes, in-memory change ranges
checked like lists."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import blockferry
from conftest import MIB, make_disk


def test_a_missing_image_is_a_file_not_found_error_with_the_reason(
    store: blockferry.Store, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.raw"
    with pytest.raises(FileNotFoundError) as e:
        store.replicate(missing, job_state=False)
    err = e.value
    assert isinstance(err, blockferry.SourceIOError) and isinstance(err, blockferry.Error)
    assert err.errno == errno.ENOENT and err.strerror == os.strerror(errno.ENOENT)
    assert "No such file or directory" in str(err) and str(missing) in str(err)
    assert err.filename == str(missing)


def test_an_unreadable_image_is_a_permission_error(
    store: blockferry.Store, tmp_path: Path
) -> None:
    img = make_disk(tmp_path / "locked.raw", MIB)
    img.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(PermissionError) as e:
            store.replicate(img, job_state=False)
        assert e.value.errno == errno.EACCES
        return
    # Root reads any file: the same call in a child whose root lacks the capabilities that
    # override file permissions (setpriv, util-linux), as an unprivileged user is.
    child = textwrap.dedent(
        f"""
        import errno, blockferry
        store = blockferry.Store.open({store.config.location!r}, passphrase="correct horse")
        try:
            store.replicate({str(img)!r}, job_state=False)
        except PermissionError as e:
            assert isinstance(e, blockferry.SourcePermissionError), type(e)
            assert e.errno == errno.EACCES and "Permission denied" in str(e), e
            print("PermissionError")
        """
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", child],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "PermissionError", out


def test_errors_pickle_with_their_context(store: blockferry.Store, tmp_path: Path) -> None:
    with pytest.raises(blockferry.Error) as e:
        store.replicate(tmp_path / "nope.raw", job_state=False)
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is type(e.value)
    assert str(back) == str(e.value)
    assert (back.errno, back.strerror, back.filename) == (
        e.value.errno,
        e.value.strerror,
        e.value.filename,
    )
    assert back.errno == errno.ENOENT
    assert (back.kind, back.message, back.path) == (e.value.kind, e.value.message, e.value.path)
    # One that is not an OSError keeps its context too.
    img = make_disk(tmp_path / "d.raw", MIB)
    with pytest.raises(blockferry.ConfigError) as c:
        store.replicate(img, base="latest", job_state=False)
    back = pickle.loads(pickle.dumps(c.value))
    assert back.setting == c.value.setting and str(back) == str(c.value)


def test_engine_errors_name_the_argument_not_a_flag(store: blockferry.Store, tmp_path: Path) -> None:
    img = make_disk(tmp_path / "d.raw", MIB, [(0, os.urandom(MIB))])
    with pytest.raises(blockferry.ConfigError) as e:
        store.replicate(img, base="latest", job_state=False)
    assert e.value.setting == "changes" and "[argument changes]" in str(e.value)
    assert "--" not in str(e.value)


def test_counts_are_checked_with_a_typed_error(store: blockferry.Store, tmp_path: Path) -> None:
    img = make_disk(tmp_path / "d.raw", MIB)
    for kw in ({"workers": -1}, {"memory_budget": -5}, {"bwlimit": -1}, {"part_size": 1.5}):
        with pytest.raises(blockferry.ConfigError, match=next(iter(kw))):
            store.replicate(img, job_state=False, **kw)  # type: ignore[arg-type]
    with pytest.raises(blockferry.ConfigError, match="workers"):
        store.restore("latest", tmp_path / "o.raw", workers=-1)
    with pytest.raises(blockferry.ConfigError, match=r"changes\[1\]"):
        store.replicate(img, base="latest", changes=[(0, 4096), (0, -1)], job_state=False)


def test_a_store_is_a_context_manager_and_refuses_pickling(tmp_path: Path) -> None:
    with blockferry.Store.create(tmp_path / "s", passphrase="pw") as store:
        assert not store.closed
        store.snapshots()
        with pytest.raises(TypeError, match="Store.open"):
            pickle.dumps(store)
    assert store.closed
    with pytest.raises(blockferry.ConfigError, match="closed"):
        store.snapshots()
    store.close()  # idempotent


def test_ranges_name_the_change_id_they_were_taken_against(
    store: blockferry.Store, tmp_path: Path
) -> None:
    img = make_disk(tmp_path / "d.raw", 4 * MIB, [(0, os.urandom(4 * MIB))])
    full = store.replicate(img, change_id="52 aa/1", job_state=False)
    assert store.snapshot(full.snapshot).change_id == "52 aa/1"
    with open(img, "r+b") as f:
        f.seek(MIB)
        f.write(os.urandom(4096))
    # Taken against another change id: not trusted, every chunk is compared.
    other = store.replicate(
        img, base="latest", changes=[(MIB, 4096)], base_change_id="52 aa/0", job_state=False
    )
    assert other.changes is not None and other.changes.fallback is not None
    assert other.changes.base_change_id == "52 aa/0"
    # Taken against the base's: trusted, only the range is read (and the sample).
    with open(img, "r+b") as f:
        f.seek(2 * MIB)
        f.write(os.urandom(4096))
    store.replicate(img, change_id="52 aa/2", job_state=False)
    good = store.replicate(
        img,
        base="latest",
        changes=[(2 * MIB, 4096)],
        base_change_id="52 aa/2",
        change_id="52 aa/3",
        job_state=False,
    )
    assert good.changes is not None and good.changes.fallback is None
    assert store.snapshot(good.snapshot).change_id == "52 aa/3"
    with pytest.raises(blockferry.ConfigError, match="base_change_id"):
        store.replicate(img, base="latest", changes="hash", base_change_id="x", job_state=False)


def test_report_fields_are_documented_where_help_shows_them() -> None:
    """help() shows every field of every result type with what it means (they were ``#:``
    comments, which only Sphinx reads)."""
    import dataclasses
    import pydoc

    text = " ".join(pydoc.render_doc(blockferry.ReplicateReport, renderer=pydoc.plaintext).split())
    assert "bytes_resumed: Bytes an earlier run had made durable" in text
    classes = [
        c for c in vars(blockferry).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
    ]
    assert len(classes) >= 15
    for cls in classes:
        doc = cls.__doc__ or ""
        missing = [f.name for f in dataclasses.fields(cls) if f.name != "type" and f"{f.name}:" not in doc]
        assert not missing, (cls.__name__, missing)
