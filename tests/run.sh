#!/usr/bin/env bash
# The whole test suite: the main pytest run, then the Triton kernels under the interpreter
# (TRITON_INTERPRET must be set before triton is imported, hence a second process).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests "$@"
TRITON_INTERPRET=1 python -m pytest -q -m triton_interpret tests "$@"
