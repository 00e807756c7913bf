#!/usr/bin/env bash
# The C ABI's tests: C programs (ffi/tests/c) compiled with the system compiler against the
# committed header and the built library, run with AddressSanitizer/UBSan (static library)
# and under valgrind (shared library); the C++ example, built and run. The header's drift
# test is a cargo test (ffi/tests/header.rs).
#
#   ffi/test.sh            (uses the S3 server of tests/s3-server.sh when BF_S3_ENDPOINT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
cc=${CC:-cc}
cxx=${CXX:-c++}
# The whole workspace (a no-op after `cargo build --workspace`): a `-p` selection would
# resolve the dependencies' features otherwise and rebuild them.
cargo build --quiet --locked --workspace
lib=target/debug
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

for t in roundtrip errors cancel sync; do
  # Static library, AddressSanitizer (leaks included) and UBSan on the C side.
  $cc $warn -g -fsanitize=address,undefined -fno-omit-frame-pointer -Iffi/include \
    -o "$out/$t-asan" "ffi/tests/c/$t.c" "$lib/libblockferry_ffi.a" $libs
  # Shared library, for valgrind.
  $cc $warn -g -Iffi/include -o "$out/$t" "ffi/tests/c/$t.c" -L"$lib" -lblockferry_ffi \
    -Wl,-rpath,"$PWD/$lib" -lpthread
done

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
s3_args=()
if [ -n "${BF_S3_ENDPOINT:-}" ]; then
  s3_args=("$BF_S3_ENDPOINT" "$BF_S3_BUCKET" "$BF_S3_ACCESS_KEY" "$BF_S3_SECRET_KEY")
fi
for t in roundtrip errors cancel sync; do mkdir -p "$out/run-$t"; done
run roundtrip "$out/roundtrip-asan" "$out/run-roundtrip" 24 "${s3_args[@]}"
run errors "$out/errors-asan" "$out/run-errors"
run cancel "$out/cancel-asan" "$out/run-cancel"
run sync "$out/sync-asan" "$out/run-sync"

# valgrind: invalid reads/writes and definite leaks fail the run (Rust's thread-locals and
# the S3 runtime stay reachable at exit, which is not a leak).
vg="valgrind -q --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite --show-possibly-lost=no --suppressions=ffi/tests/valgrind.supp"
rm -rf "$out/run-errors" && mkdir -p "$out/run-errors" "$out/vg-roundtrip"
run "roundtrip (valgrind)" $vg "$out/roundtrip" "$out/vg-roundtrip" 4
run "errors (valgrind)" $vg "$out/errors" "$out/run-errors"

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
