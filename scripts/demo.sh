#!/usr/bin/env bash
# The main job on the embedded default, offline: set up .venv (if needed), then run the recipe
# examples/demo.yaml with mops-run: prune SmolLM2-135M-Instruct to 2:4 with SparseGPT, recover it
# with a Mixture of Prompts, score dense, pruned and recovered (WikiText-2, held-out response
# perplexity with intervals, lm-eval tasks), print the table and write report.{md,html}.
# OUT=folder moves the outputs (default runs/demo); a rerun reuses every finished stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/mops-run examples/demo.yaml --out "${OUT:-runs/demo}" --quiet
