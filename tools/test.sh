#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test-suite. On a machine without a GPU the Triton
# kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), and the run
# fails if the compiled CPU backend or the Triton backend is missing rather than skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
export SAM_KERNELS_EXPECT_BACKENDS="${SAM_KERNELS_EXPECT_BACKENDS:-reference,cpu,triton}"
python -m pytest "$@"
