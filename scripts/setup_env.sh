#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with runtime + test requirements.
# The venv is reused while the requirements files are unchanged (a hash stamp records them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LDM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# tests/test_webui.py drives a headless Chromium: Debian's chromium + chromium-driver, installed here when missing.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (apt-get) for the web UI's browser test..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } \
      || echo "warning: could not install chromium; the web UI's browser test will be skipped" >&2
  else
    echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver as root); the web UI's browser test will be skipped" >&2
  fi
fi
hash=$(cat requirements.txt requirements-dev.txt requirements-webui.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.requirements-hash" 2>/dev/null)" = "$hash" ]; then
  exit 0
fi
echo "setting up $VENV (requirements hash $hash)..." >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
# The package itself, editable: `import ldm` from anywhere and the ldm-* console commands.
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "$hash" > "$VENV/.requirements-hash"
