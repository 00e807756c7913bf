#!/usr/bin/env bash
# The Python package's tests: builds and installs it the way a user does (`pip install
# ./python`), checks the stubs against the built module (mypy stubtest) and the package with
# mypy --strict, runs the pytest suite against the installed extension, and imports the same
# abi3 wheel on the oldest supported Python (3.9) when one is installed.
#
#   python/test.sh [VENV_DIR]      (default target/py)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-target/py}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "pytest>=8" "mypy>=1.10"
# Built by maturin through pip (PEP 517), into target/ like every cargo build. The tests
# take the dev profile (set BF_PY_PROFILE=release for a release build, as a user's pip makes):
# its dependencies are the ones `cargo test` already built, which saves minutes on 2 cores.
export MATURIN_PEP517_ARGS="--profile ${BF_PY_PROFILE:-dev}"
"$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./python
wheel=$(ls -t target/wheels/blockferry-*-abi3-*.whl | head -n 1)
echo "built $wheel"
# The `fleet` extra's dependencies (Dask distributed, prometheus_client), as
# `pip install ./python[fleet]` brings them, and the browser tests' WebDriver client.
"$venv/bin/pip" install --quiet --disable-pip-version-check "${wheel}[fleet]" "selenium>=4.20"

# Type checks from outside the source folder, so that the installed package is checked.
(cd target && "../$venv/bin/python" -m mypy.stubtest blockferry --mypy-config-file ../python/pyproject.toml)
(cd target && "../$venv/bin/python" -m mypy --strict --config-file ../python/pyproject.toml -p blockferry)

"$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir python python/tests

# The same wheel on Python 3.9, the oldest the abi3 tag promises.
py39=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python 2>/dev/null | head -n 1 || true)
[ -n "$py39" ] || py39=$(command -v python3.9 2>/dev/null || true)
if [ -n "$py39" ] && "$py39" --version >/dev/null 2>&1; then
  [ -x target/py39/bin/python ] || "$py39" -m venv target/py39
  target/py39/bin/pip install --quiet --disable-pip-version-check "pytest>=8"
  target/py39/bin/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"
  target/py39/bin/python -m pytest -q -p no:cacheprovider --rootdir python \
    python/tests/test_store.py::test_full_round_trip_local python/tests/test_api.py
else
  echo "no Python 3.9 here: the abi3 floor is not exercised" >&2
fi
