"""blockferry.fleet: many disks replicated as tasks of a Dask LocalCluster against the real S3
server, with a worker killed mid-run, continuous cycles, the status page in a real browser,
and the Prometheus metrics parsed by the client library's parser."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import blockferry
from blockferry import fleet

from conftest import MIB, ROOT, have, make_disk, noise, require_tools, s3_kwargs
from fleet_proxy import CountingProxy

pytestmark = [
    # Dask's own warnings (event loops, sockets closed by a killed worker) are not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:.*:UserWarning"),
]

PASSPHRASE = "fleet passphrase"
FORMATS = ("raw", "vmdk", "vhdx", "vpc")


@pytest.fixture(autouse=True)
def passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers of a LocalCluster inherit the environment: the passphrase travels no wire.
    monkeypatch.setenv("BLOCKFERRY_PASSPHRASE", PASSPHRASE)


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_fleet_disks(
    root: Path, n: int, datastores: int, seed: int, sizes: Tuple[int, int] = (16, 256),
    data: Tuple[int, int] = (2, 6),
) -> List[Tuple[Dict[str, Any], Path]]:
    """``n`` disks across ``datastores`` folders, in turn raw, VMDK, VHDX and VHD, of
    ``sizes`` MiB with a few MiB of data each; returns their inventory entries and the raw
    image each holds as qemu-img reads it (the expected restore)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ds = root / f"ds{i % datastores}"
        ds.mkdir(parents=True, exist_ok=True)
        size = rng.randint(*sizes) * MIB
        regions = []
        for k in range(rng.randint(*data)):
            off = rng.randrange(0, size - MIB, 64 << 10)
            regions.append((off, noise(MIB // 2, seed * 1000 + i * 10 + k) + bytes(64 << 10) + b"text " * 45000))
        raw = make_disk(root / f"raw{i}.img", size, [(o, b[: size - o]) for o, b in regions])
        fmt = FORMATS[i % len(FORMATS)]
        if fmt == "raw":
            image = ds / f"disk{i}.raw"
            shutil.copyfile(raw, image)
        else:
            ext = {"vmdk": "vmdk", "vhdx": "vhdx", "vpc": "vhd"}[fmt]
            image = ds / f"disk{i}.{ext}"
            subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(image)], check=True)
            # The disk as qemu-img reads it back (a VHD's size is rounded to its geometry).
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
        out.append(({"path": str(image), "datastore": ds.name}, raw))
    return out


def s3_store(s3: Dict[str, str], tag: str, endpoint: str = "") -> Tuple[str, Dict[str, Any]]:
    url = f"s3://{s3['BF_S3_BUCKET']}/fleet-{tag}-{uuid.uuid4().hex[:10]}"
    kw = s3_kwargs(s3)
    if endpoint:
        kw["endpoint"] = endpoint
    blockferry.Store.create(url, passphrase=PASSPHRASE, **kw).close()
    return url, kw


def check_restores(url: str, kw: Dict[str, Any], result: fleet.FleetResult, raws: Dict[str, Path], tmp: Path) -> None:
    store = blockferry.Store.open(url, passphrase=PASSPHRASE, **kw)
    with store:
        for name, raw in raws.items():
            report = result.reports[name]
            out = tmp / "restored.raw"
            store.restore(report["snapshot"], out, force=True)
            assert sha(out) == sha(raw), f"{name}: the restore differs"


def max_overlap(intervals: List[Tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def test_inventory_from_discover_paths_and_lists(tmp_path: Path) -> None:
    a = tmp_path / "vm1" / "disk.raw"
    b = tmp_path / "vm2" / "disk.raw"
    for p in (a, b):
        p.parent.mkdir()
        make_disk(p, MIB)
    found = [
        {"path": str(a), "role": "disk", "format": "raw"},
        {"path": str(b), "role": "disk", "format": "raw"},
        {"path": str(tmp_path / "base.vmdk"), "role": "parent", "format": "vmdk"},
    ]
    disks = fleet.load_inventory({"images": found})
    # Parents are not disks; equal file names get the path tail that tells them apart.
    assert [d.name for d in disks] == ["vm1/disk.raw", "vm2/disk.raw"]
    assert [d.datastore for d in disks] == [str(a.parent), str(b.parent)]
    inv = tmp_path / "inventory.json"
    inv.write_text(json.dumps({"disks": [{"path": str(a), "name": "web", "wave": "1", "datastore": "ds1"}]}))
    (d,) = fleet.load_inventory(inv)
    assert (d.name, d.group, d.datastore) == ("web", "1", "ds1")
    assert [d.name for d in fleet.load_inventory([str(a)])] == ["disk.raw"]
    with pytest.raises(blockferry.ConfigError, match="no disk"):
        fleet.load_inventory([])
    with pytest.raises(blockferry.ConfigError, match="unknown keys"):
        fleet.load_inventory([{"path": str(a), "colour": "red"}])
    with pytest.raises(blockferry.ConfigError, match="named 'x'"):
        fleet.load_inventory([{"path": str(a), "name": "x"}, {"path": str(b), "name": "x"}])


def test_a_fleet_of_64_disks_on_four_workers(tmp_path: Path, s3: Dict[str, str]) -> None:
    have("qemu-img")
    made = make_fleet_disks(tmp_path / "dc", 64, datastores=8, seed=64)
    url, kw = s3_store(s3, "64")
    run = fleet.start_run(
        [d for d, _ in made],
        store=url,
        s3=kw,
        workers=4,
        per_datastore=2,
        per_worker=2,
        state_dir=str(tmp_path / "state"),
        status="127.0.0.1:0",
    )
    events: List[Dict[str, Any]] = []
    scraped = b""
    with run:
        for ev in run.events():
            events.append(ev)
            if not scraped and ev["kind"] == "progress" and run.status_url:
                with urllib.request.urlopen(run.status_url + "metrics", timeout=10) as r:
                    scraped = r.read()
        result = run.result()
    assert result.ok, result.errors
    st = result.status
    assert [d.state for d in st.disks] == ["done"] * 64
    raws = {d.name: raw for d, (_, raw) in zip(st.disks, made)}
    check_restores(url, kw, result, raws, tmp_path)
    # Totals are the sums of the disks' figures.
    t = st.totals
    assert t.disks == 64 and t.states["done"] == 64
    assert t.bytes_total == sum(d.bytes_total for d in st.disks) == sum(r["virtual_size"] for r in result.reports.values())
    assert t.bytes_done == sum(d.bytes_done for d in st.disks) == t.bytes_total
    assert t.bytes_sent == sum(d.bytes_sent for d in st.disks) == sum(r["bytes_stored"] for r in result.reports.values())
    assert t.snapshots == 64 == sum(len(d.snapshots) for d in st.disks)
    assert t.attempts == sum(d.attempts for d in st.disks) == 64
    assert all(d.snapshots == [result.reports[d.name]["snapshot"]] for d in st.disks)
    # At most two disks of a datastore ran at once; all four workers took disks.
    spans: Dict[str, List[Tuple[float, float]]] = {}
    started: Dict[str, float] = {}
    for ev in events:
        if ev["kind"] == "started":
            started[ev["disk"]] = ev["time"]
        elif ev["kind"] == "done" and "worker" in ev:  # (the worker's, not the driver's)
            ds = next(d.datastore for d in st.disks if d.name == ev["disk"])
            spans.setdefault(ds, []).append((started[ev["disk"]], ev["time"]))
    assert sum(len(v) for v in spans.values()) == 64
    assert max(max_overlap(v) for v in spans.values()) <= 2
    assert max(max_overlap(v) for v in spans.values()) == 2, "the datastores never ran two disks at once"
    assert len({d.worker for d in st.disks}) == 4
    # The metrics scraped during the run parse with the Prometheus client's parser.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(scraped.decode())}
    assert {"blockferry_bytes_sent", "blockferry_replication_lag_seconds", "blockferry_disk_state"} <= set(families)
    names = {s.labels["disk"] for s in families["blockferry_disk_size_bytes"].samples}
    assert names == {d.name for d in st.disks}


def test_a_worker_killed_mid_run_its_disks_resume_elsewhere(tmp_path: Path, s3: Dict[str, str]) -> None:
    have("qemu-img")
    proxy = CountingProxy(s3["BF_S3_ENDPOINT"])
    try:
        made = make_fleet_disks(tmp_path / "dc", 8, datastores=4, seed=8, sizes=(96, 128), data=(60, 80))
        url, kw = s3_store(s3, "kill", endpoint=proxy.url)
        part = 5 * MIB
        run = fleet.start_run(
            [d for d, _ in made],
            store=url,
            s3=kw,
            workers=4,
            per_datastore=2,
            per_worker=1,
            state_dir=str(tmp_path / "state"),
            # Slow enough that the kill lands in the middle of disks.
            bwlimit_per_worker=40 * MIB,
            options={"part_size": part, "upload_jobs": 2},
        )
        killed = ""
        with run:
            pids = run.client.run(os.getpid)
            deadline = time.monotonic() + 120
            while not killed and time.monotonic() < deadline:
                st = run.status()
                busy = [d for d in st.disks if d.state == "running" and d.bytes_sent >= 3 * part]
                if busy:
                    victim = busy[0].worker
                    os.kill(pids[victim], signal.SIGKILL)
                    killed = victim
                time.sleep(0.05)
            assert killed, "no disk got far enough to be interrupted"
            on_victim = [d.name for d in run.status().disks if d.worker == killed and d.state == "running"]
            result = run.result(timeout=600)
        assert result.ok, result.errors
        st = result.status
        again = [d for d in st.disks if d.name in on_victim]
        assert again, st
        for d in again:
            # Run again elsewhere (or on the restarted worker), resuming the stopped job.
            assert d.attempts >= 2, d
            assert d.resumed and d.bytes_resumed > 0, d
        raws = {d.name: raw for d, (_, raw) in zip(st.disks, made)}
        check_restores(url, kw, result, raws, tmp_path)
        # Re-sent: parts sent that are in no completed upload, or sent twice. At most the
        # parts in flight of each interrupted disk (two uploads each), and the trailer.
        resent = proxy.part_bytes - proxy.completed_part_bytes()
        bound = len(on_victim) * 2 * (part + MIB)
        print(f"killed worker {killed} running {on_victim}: re-sent {resent} bytes (bound {bound})")
        assert resent <= bound
    finally:
        proxy.close()


def test_continuous_mode_keeps_lag_within_two_cycles(tmp_path: Path, s3: Dict[str, str]) -> None:
    disks = []
    for i in range(8):
        ds = tmp_path / f"ds{i % 2}"
        ds.mkdir(exist_ok=True)
        disks.append(make_disk(ds / f"live{i}.raw", 24 * MIB, [(0, noise(4 * MIB, 700 + i))]))
    url, kw = s3_store(s3, "sync")
    every = 3.0
    stop_writing = threading.Event()

    def writer() -> None:
        rng = random.Random(5)
        while not stop_writing.is_set():
            p = rng.choice(disks)
            with open(p, "r+b") as f:
                f.seek(rng.randrange(0, 24 * MIB - MIB, 4096))
                f.write(rng.randbytes(256 << 10))
            time.sleep(0.1)

    run = fleet.start_run(
        [str(p) for p in disks], store=url, s3=kw, workers=4, per_datastore=4, per_worker=2,
        state_dir=str(tmp_path / "state"), mode="sync", every=every,
    )
    w = threading.Thread(target=writer)
    w.start()
    worst: Dict[str, float] = {}
    with run:
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 25:
                for d in run.status().disks:
                    if d.lag_seconds is not None and d.cycles >= 1:
                        worst[d.name] = max(worst.get(d.name, 0.0), d.lag_seconds)
                time.sleep(0.25)
        finally:
            stop_writing.set()
            w.join()
        # Once the writer stopped: every disk runs a cycle that starts after, then the fleet stops.
        quiet = time.time()
        while not all(
            d.last_snapshot_unix is not None and d.last_snapshot_unix > quiet for d in run.status().disks
        ):
            assert time.time() - quiet < 60, run.status()
            time.sleep(0.2)
        run.stop()
        result = run.result(timeout=120)
    st = result.status
    assert [d.state for d in st.disks] == ["stopped"] * 8, st
    assert all(d.cycles >= 4 for d in st.disks), [d.cycles for d in st.disks]
    # Lag within two cycles: a snapshot at least every `every` seconds, each taking its time.
    print(f"worst lag per disk (every {every} s): {sorted(round(v, 2) for v in worst.values())}")
    assert len(worst) == 8
    assert max(worst.values()) <= 2 * every + 1.0, worst
    store = blockferry.Store.open(url, passphrase=PASSPHRASE, **kw)
    with store:
        for d, p in zip(st.disks, disks):
            out = tmp_path / "out.raw"
            store.restore(f"{d.name}@latest", out, force=True)
            assert sha(out) == sha(p), d.name


def test_failures_are_kept_and_busy_disks_retried(tmp_path: Path, s3: Dict[str, str]) -> None:
    url, kw = s3_store(s3, "retry")
    good = make_disk(tmp_path / "good.raw", 16 * MIB, [(0, noise(2 * MIB, 1))])
    busy = make_disk(tmp_path / "busy.raw", 64 * MIB, [(0, noise(24 * MIB, 2))])
    # Another run holds the busy disk for about 8 s: the fleet's first attempt finds it
    # busy, and a later one runs once it is done.
    holder = blockferry.Store.open(url, passphrase=PASSPHRASE, state_dir=tmp_path / "other", **kw)
    op = holder.start_replicate(busy, name="busy.raw", bwlimit=3 * MIB, state_dir=tmp_path / "other")
    while (op.progress() is None or op.progress().bytes_written == 0) and not op.done():
        time.sleep(0.05)
    result = fleet.run(
        [str(good), str(tmp_path / "missing.raw"), str(busy)],
        store=url, s3=kw, workers=2, per_worker=1, retries=5, backoff=1.0, wait=0.0,
        state_dir=str(tmp_path / "state"),
    )
    # The other run went on meanwhile, alone on the disk.
    op.result()
    holder.close()
    by = {d.name: d for d in result.status.disks}
    assert by["good.raw"].state == "done"
    assert by["missing.raw"].state == "failed" and by["missing.raw"].attempts == 1
    assert "missing.raw" in result.errors and "SourceNotFoundError" in result.errors["missing.raw"]
    assert by["busy.raw"].state == "done" and by["busy.raw"].attempts >= 2
    assert not result.ok


def test_status_page_in_headless_chromium(tmp_path: Path, s3: Dict[str, str]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if require_tools():
            pytest.fail("chromium and chromedriver are required (BF_REQUIRE_TOOLS=1)")
        pytest.skip("chromium or chromedriver is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    url, kw = s3_store(s3, "page")
    disks = [make_disk(tmp_path / f"d{i}.raw", 32 * MIB, [(0, noise(16 * MIB, 40 + i))]) for i in range(6)]
    # Paced (8 MiB/s a worker), so that the page shows the run going on for some seconds.
    run = fleet.start_run(
        [str(p) for p in disks], store=url, s3=kw, workers=2, per_worker=1,
        state_dir=str(tmp_path / "state"), bwlimit_per_worker=8 * MIB, status="127.0.0.1:0",
    )
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(a)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    shot = ROOT / "target" / "artifacts" / "fleet-status.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    try:
        with run:
            assert run.status_url
            browser.get(run.status_url)
            rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#disks tbody tr")  # noqa: E731
            deadline = time.monotonic() + 30
            while len(rows()) < 6:
                assert time.monotonic() < deadline, browser.page_source[:2000]
                time.sleep(0.2)
            # Rows update in place (no reload): a running disk's progress moves.
            first = {r.get_attribute("data-disk"): r.get_attribute("data-done") for r in rows()}
            updates = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0)
            moved = False
            while not moved:
                assert time.monotonic() < deadline + 60, first
                time.sleep(0.5)
                now = {r.get_attribute("data-disk"): r.get_attribute("data-done") for r in rows()}
                moved = any(now[k] != v for k, v in first.items())
            assert int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0) > updates
            bars = browser.find_elements(By.CSS_SELECTOR, "#disks .bar > span")
            assert any(b.value_of_css_property("width") not in ("0px", "") for b in bars)
            assert browser.find_element(By.ID, "t-disks").text == "6"
            states = {r.get_attribute("data-state") for r in rows()}
            assert "running" in states, states
            browser.save_screenshot(str(shot))
            result = run.result(timeout=300)
            assert result.ok
            # The page says when the run is over.
            deadline = time.monotonic() + 20
            while browser.find_element(By.TAG_NAME, "body").get_attribute("data-running") != "false":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert browser.find_element(By.ID, "t-done").text == "6"
    finally:
        browser.quit()
    assert shot.stat().st_size > 10_000


def test_the_console_script_prints_json_lines(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    blockferry.Store.create(store_dir, passphrase=PASSPHRASE).close()
    disks = [make_disk(tmp_path / f"c{i}.raw", 8 * MIB, [(0, noise(MIB, 90 + i))]) for i in range(3)]
    inv = tmp_path / "inventory.json"
    inv.write_text(json.dumps([{"path": str(p), "datastore": "ds"} for p in disks]))
    script = Path(sys.executable).parent / "blockferry-fleet"
    out = subprocess.run(
        [str(script), "run", str(inv), "--store", str(store_dir), "--workers", "2",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[-1]["kind"] == "result" and lines[-1]["ok"] is True
    assert {ev["disk"] for ev in lines[:-1] if ev["kind"] == "done"} == {"c0.raw", "c1.raw", "c2.raw"}
    bad = subprocess.run([str(script), "run", str(inv)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--store" in bad.stderr
    from blockferry.fleet._cli import _size

    assert [_size(v) for v in ("50M", "50MiB/s", "1.5g", "4096", "2KiB")] == [
        50 * MIB, 50 * MIB, 3 * (1 << 29), 4096, 2048
    ]
    for v in ("fast", "0", "-5M", "5T"):
        with pytest.raises(Exception, match="is not a size"):
            _size(v)


def test_sync_metrics_parse_with_the_prometheus_parser(tmp_path: Path) -> None:
    binary = ROOT / "target" / "debug" / "blockferry"
    if not binary.exists():
        if require_tools():
            pytest.fail(f"{binary} is required (BF_REQUIRE_TOOLS=1): cargo build first")
        pytest.skip("the blockferry binary is not built")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    store_dir = tmp_path / "store"
    blockferry.Store.create(store_dir, passphrase=PASSPHRASE).close()
    image = make_disk(tmp_path / "vm.raw", 8 * MIB, [(0, noise(2 * MIB, 3))])
    proc = subprocess.Popen(
        [str(binary), "sync", str(image), "--store", str(store_dir), "--changes", "hash",
         "--every", "1s", "--metrics", "127.0.0.1:0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "BLOCKFERRY_STATE_DIR": str(tmp_path / "state")},
    )
    try:
        assert proc.stderr is not None
        url = proc.stderr.readline().strip().removeprefix("metrics: ")
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(url, timeout=10) as r:
                ctype = r.headers["Content-Type"]
                text = r.read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            cycles = families.get("blockferry_sync_cycles")
            if cycles and any(s.value >= 2 for s in cycles.samples if s.labels.get("result") == "ok"):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert ctype.startswith("application/openmetrics-text")
        sent = families["blockferry_bytes_sent"]
        assert sent.type == "counter"
        assert sent.samples[0].labels == {"disk": "vm.raw"} and sent.samples[0].value >= 2 * MIB
        (lag,) = families["blockferry_replication_lag_seconds"].samples
        assert 0 <= lag.value < 30
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
