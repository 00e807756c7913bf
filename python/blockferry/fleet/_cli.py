"""``blockferry-fleet``: a fleet run from the command line.

    blockferry-fleet run INVENTORY --store S [--scheduler ADDR] [--workers N] [--status HOST:PORT]

The passphrase comes from ``BLOCKFERRY_PASSPHRASE`` (in the workers' environment too: a
``LocalCluster``'s workers inherit it). On a terminal a summary is redrawn every second;
otherwise (or with ``--json``) every event is printed as a JSON line, then the result.
Exit status: 0 when every disk succeeded, 1 when one failed, 2 on bad arguments, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from .._errors import Error
from ._model import FleetStatus


def _size(s: str) -> int:
    """Bytes (per second) from ``50M``, ``50MiB``, ``50MiB/s``, ``1.5G`` or ``1048576``."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = s.strip().lower().removesuffix("/s").removesuffix("ib").removesuffix("b")
    num = t.rstrip("kmg")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size (such as 50M or 50MiB/s)")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _summary(st: FleetStatus) -> str:
    t = st.totals
    states = ", ".join(f"{n} {s}" for s, n in t.states.items() if n)
    pct = 100.0 * t.bytes_done / t.bytes_total if t.bytes_total else 0.0
    lines = [
        f"fleet {st.fleet} ({st.mode}, {len(st.workers)} workers): {t.disks} disks: {states}",
        f"  {pct:5.1f}% of {_human(t.bytes_total)}, sent {_human(t.bytes_sent)}, "
        f"{_human(t.rate)}/s, {st.elapsed:.0f} s",
    ]
    for d in st.disks:
        if d.state in ("running", "retrying", "failed"):
            frac = d.bytes_done / d.bytes_total if d.bytes_total else 0.0
            extra = f" {d.last_error}" if d.state != "running" and d.last_error else ""
            lines.append(f"  {d.name:<32} {d.state:<9} {100 * frac:5.1f}% {_human(d.rate)}/s{extra}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockferry-fleet", description="Replicate a fleet of disks on Dask.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="replicate every disk of an inventory")
    r.add_argument("inventory", help="JSON of `blockferry discover --json`, a JSON list of disks, or an image")
    r.add_argument("--store", required=True, help="the store: a folder or s3://BUCKET/PREFIX")
    r.add_argument("--scheduler", help="a Dask scheduler's address (default: a local cluster)")
    r.add_argument("--workers", type=int, default=4, help="worker processes of the local cluster")
    r.add_argument("--per-datastore", type=int, default=2, help="disks of one datastore at once")
    r.add_argument("--per-worker", type=int, default=2, help="disks of one worker at once")
    r.add_argument("--bwlimit-per-worker", type=_size, help="bytes per second per worker (50M)")
    r.add_argument("--retries", type=int, default=3, help="attempts after the first")
    r.add_argument("--mode", choices=("once", "sync"), default="once")
    r.add_argument("--every", type=float, default=300.0, help="sync: seconds between cycles")
    r.add_argument("--cycles", type=int, help="sync: stop after this many cycles")
    r.add_argument("--state-dir", help="base of the workers' job databases")
    r.add_argument("--status", metavar="HOST:PORT", help="serve the status page and /metrics here")
    r.add_argument("--endpoint", help="S3 endpoint URL")
    r.add_argument("--region", help="S3 region")
    r.add_argument("--json", action="store_true", help="JSON lines, even on a terminal")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from ._driver import start_run

    s3: Dict[str, Any] = {}
    if args.endpoint:
        s3["endpoint"] = args.endpoint
    if args.region:
        s3["region"] = args.region
    live = sys.stdout.isatty() and not args.json
    try:
        fleet = start_run(
            args.inventory,
            store=args.store,
            s3=s3,
            workers=args.workers,
            scheduler=args.scheduler,
            per_datastore=args.per_datastore,
            per_worker=args.per_worker,
            bwlimit_per_worker=args.bwlimit_per_worker,
            retries=args.retries,
            mode=args.mode,
            every=args.every,
            cycles=args.cycles,
            state_dir=args.state_dir,
            status=args.status,
        )
    except (Error, OSError) as e:
        print(f"blockferry-fleet: {e}", file=sys.stderr)
        return 2
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if interrupted.is_set():
            fleet.cancel()
        interrupted.set()
        fleet.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with fleet:
        if fleet.status_url:
            print(f"status page: {fleet.status_url} (metrics: {fleet.status_url}metrics)", file=sys.stderr)
        if live:
            while not fleet.wait(1.0):
                sys.stdout.write("\x1b[H\x1b[J" + _summary(fleet.status()) + "\n")
                sys.stdout.flush()
        else:
            for ev in fleet.events():
                print(json.dumps(ev, default=str), flush=True)
        result = fleet.result()
    if live:
        print(_summary(result.status))
    else:
        print(json.dumps({"kind": "result", "ok": result.ok, "status": result.status.to_dict(),
                          "errors": result.errors}, default=str), flush=True)
    if interrupted.is_set():
        return 130
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
