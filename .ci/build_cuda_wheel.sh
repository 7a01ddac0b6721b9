#!/usr/bin/env bash
# Build the kdops wheel against a CUDA build of torch (CUDA kernels included), install it into the
# same environment and prove that it loads: the CUDA kernels are registered with the dispatcher and
# the CPU op runs (no GPU needed).
#
# Usage: .ci/build_cuda_wheel.sh [outdir]
# Environment:
#   KDOPS_PYTHON       python of an environment with a CUDA torch, numpy, scikit-build-core, ninja,
#                      cmake (default: <repo>/.venv-cuda/bin/python)
#   CUDA_ARCHS         CMAKE_CUDA_ARCHITECTURES (default: 90; "80;90" for both)
#   KDOPS_PTXAS_VERBOSE=1  add -Xptxas -v (registers, spills, shared memory per kernel) to the
#                      CUDA flags; the report lands in <outdir>/build.log
#   KDOPS_CLEAN=0      keep the previous build directory (incremental); default: clean build
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-$repo/.whl}"
python="${KDOPS_PYTHON:-$repo/.venv-cuda/bin/python}"
archs="${CUDA_ARCHS:-90}"

if [[ ! -x "$python" ]]; then
  echo "error: no python at $python; create the venv first:" >&2
  echo "  python3 -m venv $repo/.venv-cuda && $repo/.venv-cuda/bin/pip install torch numpy scikit-build-core ninja cmake" >&2
  exit 1
fi
"$python" - <<'PY'
import sys, torch
if not torch.version.cuda:
    sys.exit(f"error: torch {torch.__version__} at {torch.__file__} has no CUDA; CUDA kernels would be skipped")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY

if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [[ -x "$d/nvcc" ]]; then export PATH="$d:$PATH"; break; fi
  done
fi
nvcc --version | tail -n 1
export CUDACXX="${CUDACXX:-$(command -v nvcc)}"

mkdir -p "$outdir"
log="$outdir/build.log"
cuda_flags=""
if [[ "${KDOPS_PTXAS_VERBOSE:-0}" == "1" ]]; then
  cuda_flags="-Xptxas=-v"
fi
build_dir="$repo/build/cuda-wheel"
if [[ "${KDOPS_CLEAN:-1}" == "1" ]]; then
  rm -rf "$build_dir"
fi
rm -f "$outdir"/kdops-*.whl

cmake_args=(
  -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$archs"
  -C "build-dir=$build_dir"
  -C "build.verbose=true"
)
if [[ -n "$cuda_flags" ]]; then
  cmake_args+=(-C "cmake.define.CMAKE_CUDA_FLAGS=$cuda_flags")
fi

echo "building for sm ${archs} (log: $log)"
start=$(date +%s)
cd "$repo"
if ! "$python" -m pip wheel --no-build-isolation --no-deps -w "$outdir" "${cmake_args[@]}" . >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "error: build failed (full log: $log)" >&2
  exit 1
fi
end=$(date +%s)
echo "build took $((end - start)) s"

# Per-file compile times from ninja's log (the CUDA translation unit dominates).
if [[ -f "$build_dir/.ninja_log" ]]; then
  echo "slowest build steps (ms):"
  awk -F'\t' 'NR > 1 { printf "%8d  %s\n", $2 - $1, $4 }' "$build_dir/.ninja_log" | sort -rn | head -n 5
fi
if [[ -n "$cuda_flags" ]]; then
  echo "ptxas report (registers / spills / shared memory per kernel):"
  grep -E "Compiling entry|Function properties|spill|Used [0-9]+ registers" "$log" | sed 's/^ */  /' || true
fi

wheel=$(ls -t "$outdir"/kdops-*.whl | head -n 1)
echo "wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1), $(stat -c %s "$wheel") bytes)"

"$python" -m pip install --no-deps --force-reinstall "$wheel" >/dev/null
cd /  # import the installed package, not the source tree
"$python" - <<'PY'
import torch
import kdops

print("kdops from", kdops.__file__)
has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("kdops::kd_loss", "CUDA")
has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("kdops::kd_loss", "CPU")
print("kdops::kd_loss CUDA kernel registered:", has_cuda)
print("kdops::kd_loss CPU kernel registered:", has_cpu)
assert has_cuda and has_cpu

s = torch.randn(4, 37, requires_grad=True)
t = torch.randn(4, 37)
loss = kdops.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=1.7)
loss.backward()
ref = kdops.reference.kd_loss(s.detach(), t, divergence="jsd", beta=0.3, temperature=1.7)
print(f"CPU kd_loss: {loss.item():.6f} (reference {float(ref):.6f}), grad norm {s.grad.norm():.6f}")
assert abs(loss.item() - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
print("cuda available on this machine:", torch.cuda.is_available())
PY
