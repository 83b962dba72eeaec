#!/usr/bin/env bash
# The main job on the embedded default, offline: set up .venv (if needed), prune
# SmolLM2-135M-Instruct to 2:4 with SparseGPT and print dense vs pruned perplexity.
# Extra arguments go to `prune` (e.g. --eval-windows 140 for all of WikiText-2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-runs/demo}
.venv/bin/prune --model smollm2-135m --method sparsegpt --pattern 2:4 \
    --calib dolly --calib-samples 128 --seq-len 512 \
    --eval --eval-windows 32 --eval-examples 160 \
    --out "$out/sparsegpt-2of4" --force --quiet "$@"
