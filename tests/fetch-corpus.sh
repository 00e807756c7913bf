#!/usr/bin/env bash
# Fetches the real-world disk images of ../shared/corpus/README.md (made by Hyper-V and ESXi,
# shipped in the source distribution of dissect.hypervisor 3.8 on PyPI) into a folder,
# gunzipped, and prints that folder. Idempotent; nothing of it is committed (AGPL data).
set -euo pipefail
dest=${1:-target/corpus}
mkdir -p "$dest"
# .done2: the set now holds the VM configurations too (a folder fetched before is fetched again).
if [ ! -f "$dest/.done2" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --no-binary :all: dissect.hypervisor==3.8 -d "$tmp" >&2
  tar xzf "$tmp"/dissect.hypervisor-3.8.tar.gz -C "$tmp"
  for f in fixed.vhdx dynamic.vhdx fixed.vhd dynamic.vhd sesparse.vmdk differencing.avhdx; do
    gunzip -c "$tmp/dissect.hypervisor-3.8/tests/data/$f.gz" > "$dest/$f"
  done
  for f in test.vmcx encrypted.vmx; do
    cp "$tmp/dissect.hypervisor-3.8/tests/data/$f" "$dest/$f"
  done
  rm -rf "$tmp"
  touch "$dest/.done" "$dest/.done2"
fi
cd "$dest" && pwd
