#!/usr/bin/env bash
# The main job on the embedded default, offline: set up .venv (if needed), prune
# SmolLM2-135M-Instruct to 2:4 with SparseGPT (dense vs pruned perplexity), then recover
# it with a Mixture of Prompts (pruned vs recovered held-out response perplexity), and
# compare dense, pruned and recovered through lm-evaluation-harness (mops-eval).
# About 14 minutes on 2 CPU cores after the install; OUT=folder moves the outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-runs/demo}
.venv/bin/prune --model smollm2-135m --method sparsegpt --pattern 2:4 \
    --calib dolly --calib-samples 64 --seq-len 256 \
    --eval --eval-seq-len 512 --eval-windows 16 --eval-examples 160 \
    --out "$out/sparsegpt-2of4" --force --quiet
.venv/bin/mops-recover --base "$out/sparsegpt-2of4" --data dolly --data natural-instructions \
    --experts 4 --prompt-len 10 --gate mops --combine interpolate \
    --steps 40 --eval-every 20 --eval-examples 32 --test-examples 160 \
    --out "$out/mops" --force --quiet
.venv/bin/mops-eval --model dense=smollm2-135m --model pruned="$out/sparsegpt-2of4" \
    --model recovered="$out/sparsegpt-2of4,adapter=$out/mops" \
    --tasks mops_ni_mc:8,mops_mmlu:1 --out "$out/eval" --force --quiet
