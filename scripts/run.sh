#!/usr/bin/env bash
# Install distill into .venv and run the main job. Extra arguments go to `distill`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- run; fi
exec .venv/bin/distill "$@"
