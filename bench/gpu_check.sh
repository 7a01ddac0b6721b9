#!/usr/bin/env bash
# Every GPU claim of kdops in one command, for a lent H100/H200 (torch + CUDA from the machine's
# own image, no network). Builds kdops against that torch for sm_90, runs the GPU-marked tests of
# every op family (CUDA and Triton backends against the float64 reference, N*V above 2^31, the CUDA
# tests again on the plain one-block-per-row kernels), then the benchmark suite (kd_loss,
# topk_kd_loss, fused_linear_kd_loss, adaspec_loss, select_top_fraction, sequence_logprob) against
# torch eager, torch.compile and Liger-Kernel (its wheel travels in .device_wheels/, carried).
#
# Usage: bash bench/gpu_check.sh [STAGES]     STAGES: comma list of build, tests, bench
#                                              (default build,tests,bench)
# One device call may run 10 minutes: the whole check fits one call on a fast machine, and split as
# `build,tests` then `build,bench` (the second build is incremental, seconds) it always fits two.
# Each stage has its own time limit so that a slow stage cannot eat the others.
#
# Liger's wheel, once, on a machine with PyPI: python3 -m pip download --no-deps --only-binary=:all:
#   --python-version 3.12 --platform any -d .device_wheels liger-kernel==0.8.5
# then run this with .device_wheels carried to the GPU machine.
#
# Everything is written to $RES; on exit it is packed into one archive under $OUT (the device tool
# returns at most 8 files) beside the markdown tables of the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=",${1:-build,tests,bench},"
OUT=${OUT:-bench/results/gpu_check_local}
RES=$(mktemp -d /tmp/kdops_gpu_check.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stage() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
wanted() { [[ "$STAGES" == *",$1,"* ]]; }
BENCHES="relation coactivation sequence selection adaspec fused_linear topk divergence"  # the headline table last
status=0

finish() {
  stage "done (status $status)"
  tar czf "$OUT/gpu_check.tar.gz" -C "$RES" .
  for name in $BENCHES; do
    cp "$RES/${name}_cuda.md" "$OUT"/ 2>/dev/null
    [ -f "$RES/${name}_cuda.md" ] && tail -n +3 "$RES/${name}_cuda.md" || tail -8 "$RES/bench_${name}.log" 2>/dev/null
  done
  tail -3 "$RES/tests_gpu.log" 2>/dev/null
}
trap finish EXIT

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$RES/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$RES/gpu.txt"
if compgen -G ".device_wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device_wheels/*.whl && export PYTHONPATH=/tmp/site
fi

if wanted build; then
  stage "build kdops (sm_90) against the machine's torch"
  # Name the toolkit root: an nvcc on PATH may be a wrapper from which CMake guesses a wrong root.
  if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda /usr/local/cuda-* "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
      if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
    done
  fi
  export CUDACXX="$CUDA_HOME/bin/nvcc" PATH="$CUDA_HOME/bin:$PATH" CMAKE_BUILD_PARALLEL_LEVEL=16
  echo "CUDA_HOME=$CUDA_HOME ($("$CUDACXX" --version | tail -1))"
  if ! timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . \
        -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 > "$RES/build.log" 2>&1; then
    tail -60 "$RES/build.log"; echo "BUILD FAILED"; status=1; exit 1
  fi
  python3 -c "import kdops, torch; print('backends for cuda:', {op: kdops.available_backends(op, torch.device('cuda')) for op in ('kd_loss', 'topk_kd_loss', 'adaspec_token_kl', 'select_top_fraction', 'sequence_logprob', 'coactivation_features', 'relation_kd_loss')})"
fi

if wanted tests; then
  stage "GPU tests"
  # -m gpu covers every test file: cuda and triton against the reference for every op family,
  # N*V above 2^31, the 8192 x 128256 headline shape, torch.compile on CUDA, no host sync in
  # fused_linear_kd_loss.
  timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$RES/tests_gpu.xml" \
    > "$RES/tests_gpu.log" 2>&1 || status=1
  tail -15 "$RES/tests_gpu.log"
  # the CUDA tests again on the plain one-block-per-row kernels (the flag is read once per process)
  KDOPS_CUDA_NO_CLUSTER=1 timeout 90 python3 -m pytest -q -m gpu tests -k "cuda and not compile and not relation" \
    -p no:cacheprovider > "$RES/tests_gpu_nocluster.log" 2>&1 || status=1
  tail -3 "$RES/tests_gpu_nocluster.log"
fi

if wanted bench; then
  stage "benchmarks"
  timeout 140 python3 bench/bench_divergence.py --device cuda --deadline 120 --no-plot \
    --out "$RES/divergence_cuda.json" > "$RES/bench_divergence.log" 2>&1 || status=1
  timeout 90 python3 bench/bench_topk.py --device cuda --no-plot --worker-timeout 20 \
    --out "$RES/topk_cuda.json" > "$RES/bench_topk.log" 2>&1 || status=1
  timeout 150 python3 bench/bench_fused_linear.py --device cuda --no-plot --worker-timeout 30 \
    --divergences jsd --providers kdops,eager,liger \
    --out "$RES/fused_linear_cuda.json" > "$RES/bench_fused_linear.log" 2>&1 || status=1
  timeout 90 python3 bench/bench_adaspec.py --device cuda --no-plot --worker-timeout 20 \
    --out "$RES/adaspec_cuda.json" > "$RES/bench_adaspec.log" 2>&1 || status=1
  timeout 60 python3 bench/bench_selection.py --device cuda \
    --out "$RES/selection_cuda.json" > "$RES/bench_selection.log" 2>&1 || status=1
  timeout 60 python3 bench/bench_sequence.py --device cuda --no-plot --worker-timeout 15 \
    --out "$RES/sequence_cuda.json" > "$RES/bench_sequence.log" 2>&1 || status=1
  timeout 90 python3 bench/bench_coactivation.py --device cuda --no-plot --worker-timeout 30 \
    --out "$RES/coactivation_cuda.json" > "$RES/bench_coactivation.log" 2>&1 || status=1
  timeout 120 python3 bench/bench_relation.py --device cuda --no-plot --worker-timeout 40 \
    --providers kdops,kdops:triton,eager,compile \
    --out "$RES/relation_cuda.json" > "$RES/bench_relation.log" 2>&1 || status=1
fi
