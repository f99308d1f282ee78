#!/usr/bin/env bash
# Install distill with its test and benchmark extras into .venv and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,bench
# Several tests start training subprocesses beside pytest; with one intra-op thread each they share
# the cores instead of spinning against each other (oversubscribed OpenMP is many times slower).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest "$@"
