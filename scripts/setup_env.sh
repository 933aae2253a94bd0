#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with runtime + test requirements.
# The venv is reused while the requirements files are unchanged (a hash stamp records them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LDM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
hash=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
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
