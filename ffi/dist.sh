#!/usr/bin/env bash
# The C library as a host program links it: builds blockferry-ffi and packs, under
# target/ffi/PROFILE, include/blockferry.h and lib/ with
#   libblockferry_ffi.a       one relocatable object whose only global definitions are the
#                             bf_* functions: the Rust standard library, SQLite and the other
#                             code inside are local to it, so a host that links its own SQLite
#                             (or anything else) neither clashes with ours nor gets ours;
#   libblockferry_ffi.so.1    linked from that object, SONAME libblockferry_ffi.so.1,
#                             exporting only bf_* (versioned BLOCKFERRY_1), with the
#                             libblockferry_ffi.so development link.
# and fails if either exposes another symbol.
#
#   ffi/dist.sh [debug|release]      (default debug; prints the lib folder)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-debug}
case $profile in
  # The whole workspace: a `-p` selection would resolve the dependencies' features
  # differently and rebuild them (the tests build the workspace anyway).
  debug) cargo build --quiet --locked --workspace ;;
  release) cargo build --quiet --locked --release -p blockferry-ffi ;;
  *) echo "usage: $0 [debug|release]" >&2; exit 2 ;;
esac
built=target/$profile
out=target/ffi/$profile
rm -rf "$out" && mkdir -p "$out/lib" "$out/include"
cp ffi/include/blockferry.h "$out/include/"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One object from every member of cargo's archive, then every global definition but bf_*
# made local (references inside the object stay resolved; undefined ones, to libc and
# friends, stay undefined for the final link). The LLVM bitcode rustc embeds for LTO goes:
# no C linker uses it, and ar's LTO plugin aborts on it.
ld -r --whole-archive "$built/libblockferry_ffi.a" -o "$work/blockferry.o"
objcopy --wildcard --keep-global-symbol='bf_*' --remove-section=.llvmbc --remove-section=.llvmcmd \
  "$work/blockferry.o"
ar rcs "$out/lib/libblockferry_ffi.a" "$work/blockferry.o"

libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
# shellcheck disable=SC2086 # $libs is a list of flags
cc -shared -o "$out/lib/libblockferry_ffi.so.1" -Wl,--whole-archive "$out/lib/libblockferry_ffi.a" \
  -Wl,--no-whole-archive -Wl,-soname,libblockferry_ffi.so.1 \
  -Wl,--version-script=ffi/blockferry.map -Wl,-z,defs $libs
ln -s libblockferry_ffi.so.1 "$out/lib/libblockferry_ffi.so"

# Symbol hygiene: what either library defines globally is bf_* (and the version node).
leaks=$( {
  nm -g --defined-only "$out/lib/libblockferry_ffi.a" | awk 'NF == 3 { print $3 }'
  nm -D --defined-only "$out/lib/libblockferry_ffi.so.1" | awk 'NF == 3 { print $3 }'
} | grep -v -e '^bf_' -e '^BLOCKFERRY_1$' | sort -u || true)
if [ -n "$leaks" ]; then
  echo "ffi/dist.sh: symbols other than bf_* are exposed:" >&2
  echo "$leaks" | head -20 >&2
  exit 1
fi
readelf -d "$out/lib/libblockferry_ffi.so.1" | grep -q 'SONAME.*\[libblockferry_ffi\.so\.1\]'
echo "$out/lib"
