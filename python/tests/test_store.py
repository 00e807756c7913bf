"""Stores: create/open, replicate, snapshots, verify, restore, deltas, prune, gc, jobs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import blockferry
from conftest import MIB, make_disk, noise, s3_kwargs


def same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_full_round_trip_local(store: blockferry.Store, disk: Path, state: Path, tmp_path: Path) -> None:
    seen = []
    r = store.replicate(disk, state_dir=state, progress=seen.append, progress_interval=0)
    assert isinstance(r, blockferry.ReplicateReport)
    assert r.virtual_size == 24 * MIB
    assert r.bytes_new == 12 * MIB and r.chunks_stored == 12
    assert r.bytes_zero == 12 * MIB
    assert r.job is not None and not r.resumed
    kinds = [e.type for e in seen]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    # Each phase ends with its own "finished": the replication's carries its figures, and
    # committing's (a few small writes) ends the stream.
    finished = [e for e in seen if isinstance(e, blockferry.Finished)]
    assert [e.progress.phase for e in finished] == ["replicating", "committing"], finished
    assert finished[0].progress.bytes_done == 24 * MIB

    snaps = store.snapshots()
    assert [s.id for s in snaps] == [r.snapshot]
    assert snaps[0].disk == "disk.raw" and snaps[0].stats.bytes_new == 12 * MIB
    assert store.snapshot("latest").id == r.snapshot
    assert store.snapshot(r.snapshot[:6]).id == r.snapshot

    v = store.verify(r.snapshot, image=disk)
    assert v.ok and v.image_compared and v.chunks_checked == 12

    out = tmp_path / "out.raw"
    rr = store.restore(r.snapshot, out)
    assert rr.bytes_written == 12 * MIB
    assert same(out, disk)
    with pytest.raises(blockferry.ConfigError):
        store.restore(r.snapshot, out)  # exists, no force
    store.restore(r.snapshot, out, force=True)

    again = store.replicate(disk, state_dir=state)
    assert again.bytes_new == 0 and again.bytes_deduplicated == 12 * MIB


def test_store_settings_and_passphrases(tmp_path: Path, disk: Path) -> None:
    loc = tmp_path / "enc"
    s = blockferry.Store.create(loc, passphrase=b"pw", chunk_size=256 * 1024)
    c = s.config
    assert c.encrypted and c.chunk_size == 256 * 1024 and c.format_version == 2
    with pytest.raises(blockferry.CredentialsError) as e:
        blockferry.Store.open(loc, passphrase="wrong")
    assert isinstance(e.value, PermissionError) and e.value.kind == "credentials"
    with pytest.raises(blockferry.CredentialsError):
        blockferry.Store.open(loc)
    assert blockferry.Store.open(loc, passphrase="pw").config.store_id == c.store_id
    with pytest.raises(blockferry.ConfigError):
        blockferry.Store.create(tmp_path / "x")  # encrypted needs a passphrase
    plain = blockferry.Store.create(tmp_path / "plain", encrypted=False)
    assert not plain.config.encrypted
    with pytest.raises(blockferry.ConfigError) as ce:
        blockferry.Store.create(tmp_path / "odd", encrypted=False, chunk_size=3000)
    assert isinstance(ce.value, ValueError)
    with pytest.raises(blockferry.NotFoundError):
        blockferry.Store.open(tmp_path / "nothing here", passphrase="pw")
    # A passphrase for an unencrypted store: refused (its config may have been swapped).
    with pytest.raises(blockferry.CredentialsError):
        blockferry.Store.open(tmp_path / "plain", passphrase="pw")
    # Another store put in the place of one this client knows: refused.
    (loc / "config").write_bytes((tmp_path / "plain" / "config").read_bytes())
    with pytest.raises(blockferry.CorruptError) as swapped:
        blockferry.Store.open(loc)
    assert "is not the store this client used there" in str(swapped.value)


def test_deltas_from_ranges_lists_hash_and_chain(store: blockferry.Store, tmp_path: Path, state: Path) -> None:
    img = make_disk(tmp_path / "vm.raw", 16 * MIB, [(0, noise(16 * MIB, 3))])
    full = store.replicate(img, state_dir=state)
    with open(img, "r+b") as f:
        f.seek(5 * MIB)
        f.write(noise(100_000, 4))
    # The ranges themselves, as pyVmomi's QueryChangedDiskAreas gives them.
    d1 = store.replicate(
        img, base="latest", changes=[(5 * MIB, 100_000)], verify_sample=0, state_dir=state
    )
    assert d1.base == full.snapshot and d1.bytes_read == MIB and d1.bytes_new == MIB
    assert d1.changes is not None and d1.changes.source == "extents"
    # A parsed change list, and a VMware CBT file.
    cbt = tmp_path / "cbt.json"
    cbt.write_text(
        '{"startOffset": 0, "length": %d, "changedArea": [{"start": %d, "length": 4096}]}'
        % (16 * MIB, 9 * MIB)
    )
    cl = blockferry.parse_changes(cbt, 16 * MIB)
    assert cl.format == "vmware-cbt" and cl.extents == [(9 * MIB, 4096)] and cl.bytes == 4096
    d2 = store.replicate(img, base="latest", changes=cl, verify_sample=0, state_dir=state)
    assert d2.bytes_read == MIB
    # A parsed list keeps its change ids: one taken against another base is not trusted.
    stale = blockferry.ChangeList("vmware-cbt", "52 aa/1", "52 aa/2", [(0, 4096)], 4096)
    d2b = store.replicate(img, base="latest", changes=stale, verify_sample=0, state_dir=state)
    assert d2b.changes is not None and d2b.changes.fallback, d2b.changes
    assert d2b.bytes_read == 16 * MIB
    d3 = store.replicate(img, base="latest", changes=cbt, verify_sample=0, state_dir=state)
    assert d3.changes is not None and d3.changes.source == "vmware-cbt"
    d4 = store.replicate(img, base="latest", changes="hash", state_dir=state)
    assert d4.bytes_new == 0 and d4.bytes_read == 16 * MIB
    out = tmp_path / "out.raw"
    store.restore("latest", out)
    assert same(out, img)
    with pytest.raises(blockferry.ConfigError):
        store.replicate(img, changes="hash")  # no base
    with pytest.raises(blockferry.ConfigError):
        store.replicate(img, base="latest")  # no changes
    with pytest.raises(blockferry.InvalidChangeListError) as e:
        store.replicate(img, base="latest", changes=[(15 * MIB, 2 * MIB)], state_dir=state)
    assert isinstance(e.value, ValueError)
    with pytest.raises(blockferry.InvalidChangeListError):
        store.replicate(img, base="latest", changes="chain", state_dir=state)  # not a chain


def test_prune_gc_cleanup_and_jobs(store: blockferry.Store, tmp_path: Path, state: Path) -> None:
    ids = []
    img = tmp_path / "d.raw"
    for i in range(3):
        make_disk(img, 4 * MIB, [(0, noise(4 * MIB, 10 + i))])
        ids.append(store.replicate(img, state_dir=state).snapshot)
    dry = store.prune(keep_last=1, dry_run=True)
    assert dry.dry_run and sorted(dry.forgotten) == sorted(ids[:2])
    assert len(store.snapshots()) == 3
    p = store.prune(keep_last=1)
    assert p.kept == [ids[2]]
    with pytest.raises(blockferry.ConfigError):
        store.prune()  # a policy that keeps nothing
    g = store.gc(max_unused=0.0)
    assert g.snapshots == 1 and g.chunks_missing == 0 and g.bytes_after < g.bytes_before
    assert store.verify("latest").ok
    c = store.cleanup(older_than=0, state_dir=state)
    assert c.aborted == [] and not c.dry_run

    # One job per state of the source (each run saw other contents).
    jobs = blockferry.jobs(state_dir=state)
    assert len(jobs) == 3 and {j.state for j in jobs} == {"done"}
    assert {j.snapshot for j in jobs} == set(ids)
    gone = blockferry.abandon_job(jobs[0].id[:10], state_dir=state)
    assert gone.id == jobs[0].id
    assert [j.id for j in blockferry.jobs(state_dir=state)] == [j.id for j in jobs[1:]]
    with pytest.raises(blockferry.NotFoundError):
        blockferry.abandon_job("ffffffff", state_dir=state)


def test_s3_round_trip(s3: dict, disk: Path, tmp_path: Path, state: Path) -> None:
    url = f"s3://{s3['BF_S3_BUCKET']}/py-{uuid.uuid4().hex[:12]}"
    kw = s3_kwargs(s3)
    store = blockferry.Store.create(url, passphrase="pw", **kw)
    events = []
    r = store.replicate(disk, state_dir=state, progress=events.append, progress_interval=0)
    assert r.bytes_new == 12 * MIB and r.uploads >= 1
    assert events and events[-1].type == "finished"
    reopened = blockferry.Store.open(url, passphrase="pw", **kw)
    assert [s.id for s in reopened.snapshots()] == [r.snapshot]
    assert reopened.verify(r.snapshot, image=disk).ok
    out = tmp_path / "from-s3.raw"
    reopened.restore(r.snapshot, out)
    assert same(out, disk)
    # Credentials the server refuses are an access error, and a PermissionError.
    bad = dict(kw, secret_key="not-the-secret")
    with pytest.raises(blockferry.AccessDeniedError) as e:
        blockferry.Store.open(url, passphrase="pw", **bad)
    assert isinstance(e.value, PermissionError)
    assert reopened.prune(keep_last=1).forgotten == []
    assert reopened.gc().chunks_missing == 0
