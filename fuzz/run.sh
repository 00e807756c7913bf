#!/usr/bin/env bash
# Runs one fuzz target for a while (default 600 s), or every target in turn with `all`.
# Usage: fuzz/run.sh TARGET|all [SECONDS]
# cargo-fuzz wants a nightly compiler; on this stable-only toolchain RUSTC_BOOTSTRAP=1 lets
# it pass its -Z flags. Install once: cargo install cargo-fuzz --locked
set -euo pipefail
cd "$(dirname "$0")"
secs=${2:-600}
[ -d corpus ] || bash seed.sh
targets=$1
[ "$targets" = all ] && targets="vhd vhdx vmdk_descriptor vmdk_sparse store_objects ova change_list"
for t in $targets; do
  mkdir -p corpus/"$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" corpus/"$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4194304 2>&1 | tail -n 3
done
