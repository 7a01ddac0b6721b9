#!/usr/bin/env bash
# Build the kdops wheel against a CUDA build of torch (CUDA kernels included), install it into the
# same environment and prove that it loads: the CUDA kernels are registered with the dispatcher and
# the CPU op runs (no GPU needed).
#
# Usage: .ci/build_cuda_wheel.sh [outdir]          (default outdir: <repo>/.whl)
# Environment:
#   KDOPS_PYTHON       python of an environment with a CUDA torch, numpy, scikit-build-core, ninja,
#                      cmake (default: <repo>/.venv-cuda/bin/python, created with torch 2.14.1 if
#                      missing, as CI's fresh clone needs)
#   CUDA_ARCHS         CMAKE_CUDA_ARCHITECTURES (default: 90; "80;90" for both)
#   CUDA_HOME          CUDA toolkit root (default: the first of /usr/local/cuda, /usr/local/cuda-*
#                      with bin/nvcc)
#   KDOPS_PTXAS_VERBOSE=1  add -Xptxas -v (registers, spills, shared memory per kernel) to the
#                      CUDA flags; the report is printed and kept in <outdir>/build.log
#   KDOPS_CLEAN=0      keep the previous build directory (incremental); default: clean build
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-$repo/.whl}"
archs="${CUDA_ARCHS:-90}"
python="${KDOPS_PYTHON:-$repo/.venv-cuda/bin/python}"

if [[ ! -x "$python" ]]; then
  if [[ -n "${KDOPS_PYTHON:-}" ]]; then
    echo "error: KDOPS_PYTHON=$python is not an executable python" >&2
    exit 1
  fi
  echo "creating $repo/.venv-cuda (torch 2.14.1 with CUDA 13; a large download the first time)"
  python3 -m venv "$repo/.venv-cuda"
  "$repo/.venv-cuda/bin/python" -m pip install -q --upgrade pip
  "$repo/.venv-cuda/bin/python" -m pip install -q torch==2.14.1 numpy scikit-build-core ninja cmake
fi
"$python" - <<'PY'
import sys, torch
if not torch.version.cuda:
    sys.exit(f"error: torch {torch.__version__} at {torch.__file__} has no CUDA; CUDA kernels would be skipped")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY

# The toolkit root. nvcc on PATH may be a wrapper script (/usr/local/bin/nvcc here), from which
# torch's FindCUDA would guess the wrong root, so name the root explicitly.
cuda_home="${CUDA_HOME:-}"
if [[ -z "$cuda_home" ]]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [[ -x "$d/bin/nvcc" ]]; then cuda_home="$d"; break; fi
  done
fi
if [[ -z "$cuda_home" || ! -x "$cuda_home/bin/nvcc" ]]; then
  echo "error: no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)" >&2
  exit 1
fi
cuda_home="$(cd "$cuda_home" && pwd -P)"
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDACXX="$cuda_home/bin/nvcc"
export PATH="$cuda_home/bin:$PATH"
echo "CUDA toolkit: $cuda_home ($("$CUDACXX" --version | tail -n 1))"

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
  -C "cmake.define.CMAKE_CUDA_COMPILER=$CUDACXX"
  -C "cmake.define.CUDA_TOOLKIT_ROOT_DIR=$cuda_home"
  -C "build-dir=$build_dir"
  -C "build.verbose=true"
)
if [[ -n "$cuda_flags" ]]; then
  cmake_args+=(-C "cmake.define.CMAKE_CUDA_FLAGS=$cuda_flags")
fi

echo "building for sm ${archs} (log: $log)"
start=$(date +%s)
cd "$repo"
if ! "$python" -m pip wheel -v --no-build-isolation --no-deps -w "$outdir" "${cmake_args[@]}" . >"$log" 2>&1; then
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
# every op with hand-written kernels must have both a CPU and a CUDA registration
for op in ("kd_loss", "topk_kd_loss", "adaspec_token_kl", "select_top_fraction", "sequence_logprob",
           "coactivation_features", "coactivation_features_backward", "relation_kd_loss",
           "relation_kd_loss_backward"):
    keys = [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"kdops::{op}", key)]
    print(f"kdops::{op} kernels registered for:", ", ".join(keys))
    assert keys == ["CPU", "CUDA"], op

s = torch.randn(4, 37, requires_grad=True)
t = torch.randn(4, 37)
loss = kdops.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=1.7)
loss.backward()
ref = kdops.reference.kd_loss(s.detach(), t, divergence="jsd", beta=0.3, temperature=1.7)
print(f"CPU kd_loss: {loss.item():.6f} (reference {float(ref):.6f}), grad norm {s.grad.norm():.6f}")
assert abs(loss.item() - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
print("cuda available on this machine:", torch.cuda.is_available())
PY
