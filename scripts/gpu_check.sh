#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (budget: under 8 minutes):
#
#   scripts/gpu_check.sh
#
# 1. builds the extension (CPU + CUDA kernels) with this machine's torch and nvcc, for this
#    GPU's architecture only, as an editable install (a failed build is an error here);
# 2. runs the tests marked `cuda` (kernel vs reference for every launch configuration, opcheck
#    on CUDA, gradients, bad inputs) and the CPU tests of tests/test_ops.py;
# 3. runs benchmarks/batched_cg.py on the GPU and prints its table (markdown).
#
# Environment: PYTHON (default: python3, or .venv/bin/python when present), TORCH_CUDA_ARCH_LIST
# (default: the GPU's compute capability), MAX_JOBS (default: number of CPUs), SKIP_BUILD=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
START=$SECONDS
step() { printf '\n== [%3ds] %s\n' $((SECONDS - START)) "$*"; }
declare -A STATUS

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "-", torch.cuda.get_device_name(0),
      "capability %d.%d" % torch.cuda.get_device_capability(0))
EOF
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
fi
export TORCH_CUDA_ARCH_LIST
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  [[ -f "$CUDA_HOME/include/cuda_runtime_api.h" ]] || CUDA_HOME=/usr/local/cuda
  export CUDA_HOME
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-?}"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  step "build (FORCE_CUDA=1, editable install)"
  export FORCE_CUDA=1 IMPLICIT_TORCH_STRICT_BUILD=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  unset IMPLICIT_TORCH_NO_EXT
  if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -5; then
    echo "pip install -e . failed; building in place instead"
    "$PYTHON" setup.py build_ext --inplace 2>&1 | tail -20
  fi
fi
"$PYTHON" - <<'EOF'
import torch
import implicit_torch.ops as ops
assert ops.extension_available("cuda"), "the CUDA kernel is not loaded (see the build log)"
print("extension loaded; compiled kernels for:", [d for d in ("cpu", "cuda")
                                                  if ops.extension_available(d)])
EOF

step "tests marked cuda"
if timeout 300 "$PYTHON" -m pytest -m cuda tests/ -q -p no:cacheprovider -rfE; then
  STATUS[cuda_tests]=passed
else
  STATUS[cuda_tests]=FAILED
fi

step "CPU tests of the ops, batched_cg and qp_ipm (same build)"
if timeout 120 "$PYTHON" -m pytest tests/test_ops.py tests/test_ops_fuzz.py tests/test_qp_kernel.py -q \
  -p no:cacheprovider \
  -m "not cuda" -rfE; then
  STATUS[cpu_tests]=passed
else
  STATUS[cpu_tests]=FAILED
fi

step "benchmark on the GPU"
if timeout 240 "$PYTHON" benchmarks/batched_cg.py --device cuda --markdown; then
  STATUS[benchmark]=done
else
  STATUS[benchmark]=FAILED
fi

step "summary"
for key in cuda_tests cpu_tests benchmark; do printf '  %-11s %s\n' "$key" "${STATUS[$key]}"; done
[[ "${STATUS[cuda_tests]}" == passed && "${STATUS[cpu_tests]}" == passed &&
  "${STATUS[benchmark]}" == done ]]
