#!/usr/bin/env bash
# An S3 emulator on loopback that takes parts of any size: moto's server (PyPI moto[server],
# Apache-2.0) with S3_UPLOAD_PART_MIN_SIZE=0, for the 10,000-part memory test (SeaweedFS,
# like AWS, refuses parts under 5 MiB when an upload is completed). It accepts any
# credentials; everything else runs against SeaweedFS (tests/s3-server.sh).
#
#   tests/moto-server.sh start DIR   installs if needed, starts, makes the bucket, prints BF_MOTO_*
#   tests/moto-server.sh stop DIR
set -euo pipefail
cmd=${1:?usage: moto-server.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: moto-server.sh start|stop DIR}" && cd "$2" && pwd)
port=${BF_MOTO_PORT:-8334}
bucket=bfmoto

stop() {
  if [ -f "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
}
answers() { curl -sf -o /dev/null "http://127.0.0.1:$port/$bucket" 2>/dev/null; }

case $cmd in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac

if [ ! -x "$dir/venv/bin/moto_server" ]; then
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.1.*' >&2
fi
if ! { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null && answers; }; then
  stop
  # Objects of up to 16 MiB are kept in memory: moto's default buffer follows its smallest
  # part size (here 0), and past it every object and part holds a temporary file open, which
  # the tests' ten thousand small parts (with their jobs' journal records) would exhaust.
  MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=$((16 << 20)) S3_UPLOAD_PART_MIN_SIZE=0 setsid "$dir/venv/bin/moto_server" -H 127.0.0.1 -p "$port" \
    >"$dir/moto.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  for _ in $(seq 300); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/moto.log" >&2; exit 1; }
    sleep 0.1
  done
  curl -sf -o /dev/null -X PUT "http://127.0.0.1:$port/$bucket"
  answers || { echo "moto did not answer on port $port" >&2; tail -20 "$dir/moto.log" >&2; exit 1; }
fi
echo "BF_MOTO_ENDPOINT=http://127.0.0.1:$port"
echo "BF_MOTO_BUCKET=$bucket"
