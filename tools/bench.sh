#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the benchmark (CPU by default; pass --device cuda on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
python bench/run.py "$@"
