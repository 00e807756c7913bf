"""One full replication through the Python bindings (benches/bindings.rs times this process).

    python replicate.py IMAGE STORE STATE_DIR
"""

import sys

import blockferry

image, store, state = sys.argv[1:4]
events = 0


def progress(event: blockferry.Event) -> None:
    global events
    events += 1


report = blockferry.Store.open(store).replicate(image, state_dir=state, progress=progress)
print(report.snapshot, report.bytes_new, events)
