#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite, offline.
# Two pytest-xdist workers, one torch thread each: alone, the suite keeps only ~1.1 of 2 cores busy
# (much of it is subprocesses starting and Ray waiting). worksteal hands an idle worker the other's
# queued tests, so no long module is left running alone at the end. Later flags win: `-n 0` is serial.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
# --durations: the slowest tests at the end, so a fresh clone's run says where the time goes.
exec .venv/bin/python -m pytest -n "${MOPS_TEST_WORKERS:-2}" --dist worksteal --durations=15 "$@"
