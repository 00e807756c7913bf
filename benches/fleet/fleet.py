"""The fleet against one CLI process: the same disks replicated by `blockferry.fleet` on a
LocalCluster of 4 worker processes, and one after another by the `blockferry` CLI, into fresh
stores on the same machine, in turns; then the fleet's scheduling overhead per disk, from
empty disks. Run by `cargo bench -p blockferry-benches --bench fleet` (see fleet.rs).

    python fleet.py CLI WORK [--disks 64] [--rounds 2] [--fraction 8]

With BF_S3_ENDPOINT (and BF_S3_BUCKET, BF_S3_ACCESS_KEY, BF_S3_SECRET_KEY) the stores are on
that S3 server, otherwise local folders.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Tuple

import blockferry
from blockferry import fleet

MIB = 1 << 20
PASSPHRASE = "bench passphrase"
FORMATS = ("raw", "vmdk", "vhdx", "vpc")


def make_disks(root: Path, n: int, fraction: int, seed: int) -> List[Dict[str, Any]]:
    """`n` disks of 16–256 MiB in turn raw, VMDK, VHDX and VHD over 8 datastores, a
    `1/fraction` of each written: half random, half text-like."""
    rng = random.Random(seed)
    disks = []
    for i in range(n):
        ds = root / f"ds{i % 8}"
        ds.mkdir(parents=True, exist_ok=True)
        size = rng.randint(16, 256) * MIB
        raw = root / f"raw{i}.img"
        with open(raw, "wb") as f:
            f.truncate(size)
            data = size // fraction
            f.seek(rng.randrange(0, size - data + 1, MIB))
            f.write(rng.randbytes(data // 2))
            f.write((b"the quick brown fox %d jumps over the lazy dog\n" % i) * (data // 2 // 48))
        fmt = FORMATS[i % 4]
        if fmt == "raw":
            image = ds / f"disk{i}.raw"
            os.replace(raw, image)
        else:
            image = ds / f"disk{i}.{'vhd' if fmt == 'vpc' else fmt}"
            subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(image)], check=True)
            raw.unlink()
        disks.append({"path": str(image), "datastore": ds.name, "name": image.name})
    return disks


def empty_disks(root: Path, n: int) -> List[Dict[str, Any]]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"empty{i}.raw"
        with open(p, "wb") as f:
            f.truncate(MIB)
        out.append({"path": str(p), "datastore": f"ds{i % 8}", "name": p.name})
    return out


class Stores:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.s3 = os.environ.get("BF_S3_ENDPOINT")
        self.kw: Dict[str, Any] = {}
        self.cli: List[str] = []
        if self.s3:
            self.kw = {"endpoint": self.s3, "access_key": os.environ["BF_S3_ACCESS_KEY"],
                       "secret_key": os.environ["BF_S3_SECRET_KEY"], "region": "us-east-1"}
            self.cli = ["--endpoint", self.s3, "--region", "us-east-1"]

    def fresh(self, tag: str) -> str:
        if self.s3:
            url = f"s3://{os.environ['BF_S3_BUCKET']}/bench-fleet-{tag}-{uuid.uuid4().hex[:8]}"
        else:
            url = str(self.work / f"store-{tag}")
            shutil.rmtree(url, ignore_errors=True)
        blockferry.Store.create(url, passphrase=PASSPHRASE, state_dir=self.work / "state-init", **self.kw).close()
        return url


def sequential(cli: str, disks: List[Dict[str, Any]], store: str, stores: Stores, state: Path) -> float:
    shutil.rmtree(state, ignore_errors=True)
    env = {**os.environ, "BLOCKFERRY_PASSPHRASE": PASSPHRASE, "BLOCKFERRY_STATE_DIR": str(state)}
    if stores.s3:
        env.update(AWS_ACCESS_KEY_ID=stores.kw["access_key"], AWS_SECRET_ACCESS_KEY=stores.kw["secret_key"])
    t = time.monotonic()
    for d in disks:
        subprocess.run([cli, "replicate", d["path"], "--store", store, "--name", d["name"], *stores.cli],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def on_fleet(disks: List[Dict[str, Any]], store: str, stores: Stores, state: Path) -> Tuple[float, float, Any]:
    """Whole time (cluster start included) and the cluster's start."""
    shutil.rmtree(state, ignore_errors=True)
    os.environ["BLOCKFERRY_PASSPHRASE"] = PASSPHRASE
    t = time.monotonic()
    run = fleet.start_run(disks, store=store, s3=stores.kw, workers=4, per_datastore=2, per_worker=2,
                          state_dir=str(state))
    started = time.monotonic() - t
    with run:
        result = run.result()
    whole = time.monotonic() - t
    assert result.ok, result.errors
    return whole, started, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cli")
    ap.add_argument("work", type=Path)
    ap.add_argument("--disks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fraction", type=int, default=8)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    stores = Stores(a.work)
    data = a.work / "disks"
    shutil.rmtree(data, ignore_errors=True)
    disks = make_disks(data, a.disks, a.fraction, seed=64)
    total = sum(blockferry.image_info(d["path"]).virtual_size for d in disks)
    alloc = sum(blockferry.image_info(d["path"]).allocated_bytes for d in disks)
    print(f"cores: {os.cpu_count()}; stores: {'S3 ' + stores.s3 if stores.s3 else 'local folders'}")
    print(f"job: {a.disks} disks (raw, VMDK, VHDX, VHD; 16-256 MiB, {total / MIB:.0f} MiB in all, "
          f"{alloc / MIB:.0f} MiB allocated) into a fresh encrypted store; {a.rounds} rounds in turns\n")
    seq_t, fleet_t, start_t = [], [], []
    for r in range(a.rounds):
        s = sequential(a.cli, disks, stores.fresh(f"seq{r}"), stores, a.work / "state-seq")
        w, st, result = on_fleet(disks, stores.fresh(f"fleet{r}"), stores, a.work / "state-fleet")
        sent = result.status.totals.bytes_sent
        print(f"round {r + 1}: one CLI after another {s:7.2f} s | fleet of 4 workers {w:7.2f} s "
              f"(cluster start {st:.2f} s), sent {sent / MIB:.0f} MiB")
        seq_t.append(s)
        fleet_t.append(w)
        start_t.append(st)
    s, w = statistics.median(seq_t), statistics.median(fleet_t)
    print(f"\naggregate throughput, fleet / sequential CLI: {s / w:.2f}x "
          f"({alloc / MIB / w:.0f} vs {alloc / MIB / s:.0f} MiB/s of allocated data; medians)")
    # Scheduling overhead: empty disks, where a replication does almost nothing.
    empties = empty_disks(a.work / "empty", a.disks)
    s_e = sequential(a.cli, empties, stores.fresh("seq-empty"), stores, a.work / "state-seq-e")
    w_e, st_e, _ = on_fleet(empties, stores.fresh("fleet-empty"), stores, a.work / "state-fleet-e")
    print(f"empty disks: one CLI after another {s_e / a.disks * 1000:.0f} ms a disk; fleet "
          f"{(w_e - st_e) / a.disks * 1000:.0f} ms a disk after the cluster's start ({st_e:.2f} s); "
          f"fleet / CLI per disk: {(w_e - st_e) / s_e:.2f}x")
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
