#!/usr/bin/env bash
# The C ABI's tests: C programs (ffi/tests/c) compiled with the system compiler against the
# committed header and the built library, run with AddressSanitizer/UBSan (static library)
# and under valgrind (shared library), as ffi/dist.sh packs them; a caller built against the
# frozen version-1 header; the layout of the published fields; a host with its own SQLite;
# the C++ and README examples. The header's drift test is a cargo test (ffi/tests/header.rs).
#
#   ffi/test.sh            (uses the S3 server of tests/s3-server.sh when BF_S3_ENDPOINT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
cc=${CC:-cc}
cxx=${CXX:-c++}
# The libraries as a host links them (checks their symbols and SONAME too).
lib=$(ffi/dist.sh debug)
out=target/ffi-tests
rm -rf "$out" && mkdir -p "$out"
# The programs' client state (store records, jobs) in the test folder, not under $HOME.
export BLOCKFERRY_STATE_DIR="$PWD/$out/client-state"
libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
warn="-std=c11 -Wall -Wextra -Werror -pedantic"

run() { # NAME ARGS...: prints and runs a test program in a fresh folder
  local name=$1; shift
  echo "-- $name $*"
  "$@"
}

build() { # NAME SOURCE INCLUDE_DIR: the static (ASan, UBSan) and shared builds of a test
  local name=$1 src=$2 inc=$3
  # Static library, AddressSanitizer (leaks included) and UBSan on the C side.
  $cc $warn -g -fsanitize=address,undefined -fno-omit-frame-pointer -I"$inc" \
    -o "$out/$name-asan" "$src" "$lib/libblockferry_ffi.a" $libs
  # Shared library, for valgrind.
  $cc $warn -g -I"$inc" -o "$out/$name" "$src" -L"$lib" -lblockferry_ffi \
    -Wl,-rpath,"$PWD/$lib" -lpthread
}

for t in roundtrip errors cancel sync; do build "$t" "ffi/tests/c/$t.c" ffi/include; done
# A caller built against the frozen version-1 header, run against this library.
build abi_v1 ffi/tests/c/abi_v1.c ffi/tests/abi/v1

# Published fields never move: the layout seen through the version-1 header and through
# the current one is the same.
$cc $warn -Iffi/tests/abi/v1 -o "$out/layout-v1" ffi/tests/c/layout.c
$cc $warn -Iffi/include -o "$out/layout-now" ffi/tests/c/layout.c
"$out/layout-v1" >"$out/layout-v1.txt"
"$out/layout-now" >"$out/layout-now.txt"
diff -u "$out/layout-v1.txt" "$out/layout-now.txt"
echo "-- layout: the $(wc -l <"$out/layout-v1.txt") fields and codes of version 1 are where they were"

# A host with its own SQLite links ours too: each side keeps its own (the static library
# defines no sqlite3_* globally; the host's calls reach the host's library).
cat >"$out/host-sqlite.c" <<'C'
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>
#include "blockferry.h"
int main(void) {
  printf("host SQLite %s (header %s), blockferry %s\n", sqlite3_libversion(), SQLITE_VERSION,
         bf_version());
  return strcmp(sqlite3_libversion(), SQLITE_VERSION) != 0;
}
C
$cc $warn -Iffi/include -o "$out/host-sqlite" "$out/host-sqlite.c" "$lib/libblockferry_ffi.a" \
  -lsqlite3 $libs
run "host SQLite beside ours" "$out/host-sqlite"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
s3_args=()
if [ -n "${BF_S3_ENDPOINT:-}" ]; then
  s3_args=("$BF_S3_ENDPOINT" "$BF_S3_BUCKET" "$BF_S3_ACCESS_KEY" "$BF_S3_SECRET_KEY")
fi
for t in roundtrip errors cancel sync abi_v1; do mkdir -p "$out/run-$t"; done
run roundtrip "$out/roundtrip-asan" "$out/run-roundtrip" 24 "${s3_args[@]}"
run errors "$out/errors-asan" "$out/run-errors"
run cancel "$out/cancel-asan" "$out/run-cancel"
run sync "$out/sync-asan" "$out/run-sync"
run "abi_v1 (version-1 caller)" "$out/abi_v1-asan" "$out/run-abi_v1"

# valgrind: invalid reads/writes and definite leaks fail the run (Rust's thread-locals and
# the S3 runtime stay reachable at exit, which is not a leak).
vg="valgrind -q --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite --show-possibly-lost=no --suppressions=ffi/tests/valgrind.supp"
rm -rf "$out/run-errors" "$out/run-abi_v1" && mkdir -p "$out/run-errors" "$out/vg-roundtrip" "$out/run-abi_v1"
run "roundtrip (valgrind)" $vg "$out/roundtrip" "$out/vg-roundtrip" 4
run "errors (valgrind)" $vg "$out/errors" "$out/run-errors"
run "abi_v1 (valgrind)" $vg "$out/abi_v1" "$out/run-abi_v1"

# The C++ example: RAII wrappers over the C ABI.
$cxx -std=c++17 -Wall -Wextra -Werror -Iffi/include -o "$out/replicate-cpp" \
  ffi/examples/replicate.cpp -L"$lib" -lblockferry_ffi -Wl,-rpath,"$PWD/$lib" -lpthread
mkdir -p "$out/cpp"
head -c $((3 << 20)) /dev/urandom >"$out/cpp/disk.raw"
truncate -s 8M "$out/cpp/disk.raw"
run "C++ example" "$out/replicate-cpp" "$out/cpp/disk.raw" "$out/cpp/store" "$out/cpp/restored.raw"
cmp "$out/cpp/disk.raw" "$out/cpp/restored.raw"
# The README's C example, as written (its store folder moved into the test folder).
mkdir -p "$out/readme"
awk '/^```c$/ {on = 1; next} /^```$/ {on = 0} on' README.md |
  sed "s|/backup/store|$PWD/$out/readme/store|" >"$out/readme/example.c"
$cc $warn -Iffi/include -o "$out/readme/example" "$out/readme/example.c" -L"$lib" \
  -lblockferry_ffi -Wl,-rpath,"$PWD/$lib"
head -c $((5 << 20)) /dev/urandom >"$out/readme/src.raw"
truncate -s 16M "$out/readme/src.raw"
qemu-img convert -f raw -O vmdk "$out/readme/src.raw" "$out/readme/vm1.vmdk"
run "README example" sh -c "cd '$out/readme' && BLOCKFERRY_STATE_DIR=state ./example"
cmp "$out/readme/src.raw" "$out/readme/vm1.raw"

echo "C ABI tests: ok"
