#!/usr/bin/env bash
# Create .venv (if needed) and install distill into it with the given extras, torch pinned to the
# CPU build (constraints.txt). Idempotent: a second run only checks that everything is installed.
# Usage: scripts/setup.sh [extras]      e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
# pip's notes about absent local mirrors are noise on machines without them
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e "$spec" \
  2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
