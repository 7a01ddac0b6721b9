#!/usr/bin/env bash
# The whole test suite: the main pytest run, then the Triton kernels under the interpreter
# (TRITON_INTERPRET must be set before triton is imported, hence a second process).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests "$@"
# the narrower CPU kernel builds too (the run above takes the widest one this CPU has)
KDOPS_CPU_ISA=baseline python -m pytest -q tests/test_divergence.py tests/test_topk.py tests/test_adaspec.py tests/test_relation.py -k matches_reference "$@"
if grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw f16c /proc/cpuinfo; then
  KDOPS_CPU_ISA=avx2 python -m pytest -q tests/test_divergence.py tests/test_topk.py tests/test_adaspec.py tests/test_relation.py -k matches_reference "$@"
fi
TRITON_INTERPRET=1 python -m pytest -q -m triton_interpret tests "$@"
