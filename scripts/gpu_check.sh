#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (budget: under 8 minutes in all):
#
#   scripts/gpu_check.sh
#
# Steps, each under its own timeout and the remaining budget; a step that fails is reported and
# the next one runs anyway; a summary table comes at the end (exit status 1 if a step failed
# or timed out):
#   env         the GPU, torch, CUDA, nvcc; the architecture to build for
#   build       the extension (CPU + CUDA kernels) for this GPU only, as an editable install
#   extension   the CUDA kernel is loaded
#   cuda-tests  the tests marked `cuda`, in the test modules that hold some (found by grep, so
#               modules that need packages this machine lacks are not even imported; collection
#               errors are not fatal either)
#   variants    benchmarks/batched_cg.py --variants: the CUDA launch variants side by side
#   benchmark   benchmarks/batched_cg.py on the GPU (fused kernel vs torch baselines)
#   cpu-tests   the CPU tests of the ops (same build)
#   overhead    benchmarks/engine_overhead.py on the GPU (custom_root vs hand-written)
#
# GPU_CHECK_DRY_RUN=1 runs every step up to the first use of a GPU, on any machine: env
# detection (without asserting a GPU), the build command (printed, not run), test selection
# and collection (pytest --collect-only), the benchmarks' argument parsing (--dry-run).
#
# Environment: PYTHON (default: .venv/bin/python when present, else python3),
# TORCH_CUDA_ARCH_LIST (default: the GPU's compute capability), MAX_JOBS (default: number of
# CPUs), SKIP_BUILD=1, GPU_CHECK_BUDGET (seconds, default 470).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DRY=0
[[ "${GPU_CHECK_DRY_RUN:-0}" != 0 ]] && DRY=1
BUDGET="${GPU_CHECK_BUDGET:-470}"
MIN_STEP=15 # a step is skipped when less than this is left
START=$SECONDS
STEPS=()
declare -A STATUS SECS

# run_step NAME MAX_SECONDS COMMAND...: runs COMMAND under min(MAX_SECONDS, what is left of the
# budget), prints its output, records its status and duration. Never exits the script.
run_step() {
  local name="$1" max="$2"
  shift 2
  STEPS+=("$name")
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  printf '\n== [%3ds] %s (timeout %ss)\n' $((SECONDS - START)) "$name" "$limit"
  if ((limit < MIN_STEP)); then
    STATUS[$name]="skipped (budget)"
    SECS[$name]=0
    return 0
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
  rc=${PIPESTATUS[0]}
  SECS[$name]=$((SECONDS - t0))
  if ((rc == 0)); then
    STATUS[$name]=$([[ $DRY == 1 ]] && echo "ok (dry run)" || echo ok)
  elif ((rc == 124 || rc == 137)); then
    STATUS[$name]="TIMEOUT"
  else
    STATUS[$name]="FAILED (rc $rc)"
  fi
}

skip_step() { # skip_step NAME REASON
  STEPS+=("$1")
  STATUS[$1]="skipped ($2)"
  SECS[$1]=0
  printf '\n== [%3ds] %s: skipped (%s)\n' $((SECONDS - START)) "$1" "$2"
}

# ---------------------------------------------------------------------------------------
# Steps that are shell functions run as `scripts/gpu_check.sh --step NAME` (so that `timeout`
# can bound them).
# ---------------------------------------------------------------------------------------
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
BUILD=(env FORCE_CUDA=1 IMPLICIT_TORCH_STRICT_BUILD=1 IMPLICIT_TORCH_NO_EXT= MAX_JOBS="$MAX_JOBS"
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e .)
FALLBACK=(env FORCE_CUDA=1 IMPLICIT_TORCH_STRICT_BUILD=1 IMPLICIT_TORCH_NO_EXT= MAX_JOBS="$MAX_JOBS"
  "$PYTHON" setup.py build_ext --inplace)

detect_env() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found"
  "$PYTHON" - "$DRY" "$LOG/capability" <<'EOF'
import sys
import torch
gpu = torch.cuda.is_available()
print("python", sys.version.split()[0], "- torch", torch.__version__, "- CUDA", torch.version.cuda)
if gpu:
    capability = "%d.%d" % torch.cuda.get_device_capability(0)
    print("GPU:", torch.cuda.get_device_name(0), "capability", capability)
    with open(sys.argv[2], "w") as f:  # the architecture to build for
        f.write(capability)
elif sys.argv[1] == "1":
    print("no GPU visible to torch (dry run: going on)")
else:
    sys.exit("no CUDA GPU visible to torch")
import importlib.util
have = {name: importlib.util.find_spec(name) is not None
        for name in ("pytest", "ninja", "scipy", "hypothesis", "sklearn")}
print("packages:", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items()))
EOF
}

build() {
  echo "+ ${BUILD[*]}"
  if [[ $DRY == 1 ]]; then
    echo "(dry run: not building; fallback: ${FALLBACK[*]})"
    return 0
  fi
  "${BUILD[@]}" 2>&1 | tail -5
  ((PIPESTATUS[0] == 0)) && return 0
  echo "pip install -e . failed; building in place instead: ${FALLBACK[*]}"
  "${FALLBACK[@]}" 2>&1 | tail -20
  return "${PIPESTATUS[0]}"
}

if [[ "${1:-}" == --step ]]; then
  "$2"
  exit $?
fi
SELF="$ROOT/scripts/gpu_check.sh"
LOG="$(mktemp -d /tmp/gpu_check.XXXXXX)"
export LOG

# ---------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------
run_step env 60 bash "$SELF" --step detect_env

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$(cat "$LOG/capability" 2>/dev/null || true)"
  if [[ -z "$TORCH_CUDA_ARCH_LIST" ]]; then
    TORCH_CUDA_ARCH_LIST=9.0
    echo "(no GPU: TORCH_CUDA_ARCH_LIST defaults to $TORCH_CUDA_ARCH_LIST)"
  fi
fi
export TORCH_CUDA_ARCH_LIST
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  [[ -f "$CUDA_HOME/include/cuda_runtime_api.h" ]] || CUDA_HOME=/usr/local/cuda
  export CUDA_HOME
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-?}"

# ---------------------------------------------------------------------------------------
# build and load
# ---------------------------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  skip_step build "SKIP_BUILD=1"
else
  run_step build 240 bash "$SELF" --step build
fi
unset IMPLICIT_TORCH_NO_EXT

CHECK_EXTENSION='
import implicit_torch.ops as ops
assert ops.extension_available("cuda"), "the CUDA kernel is not loaded (see the build log)"
print("extension loaded; compiled kernels:", sorted(ops._registration.compiled_kernels))
'
if [[ $DRY == 1 ]]; then
  skip_step extension "dry run"
else
  run_step extension 60 "$PYTHON" -c "$CHECK_EXTENSION"
fi

# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
mapfile -t CUDA_MODULES < <(grep -l -E 'pytest\.mark\.cuda' tests/test_*.py)
echo
echo "test modules with tests marked cuda: ${CUDA_MODULES[*]:-none}"
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rfE --continue-on-collection-errors)
if ((${#CUDA_MODULES[@]} == 0)); then
  skip_step cuda-tests "no module has tests marked cuda"
elif [[ $DRY == 1 ]]; then
  run_step cuda-tests 90 "${PYTEST[@]}" -q --collect-only -m cuda "${CUDA_MODULES[@]}"
else
  run_step cuda-tests 150 "${PYTEST[@]}" -m cuda "${CUDA_MODULES[@]}"
fi

# ---------------------------------------------------------------------------------------
# benchmarks (the variants first: they are what a GPU run is needed for)
# ---------------------------------------------------------------------------------------
BENCH_DRY=()
[[ $DRY == 1 ]] && BENCH_DRY=(--dry-run)
run_step variants 150 "$PYTHON" benchmarks/batched_cg.py --variants --markdown "${BENCH_DRY[@]}"
run_step benchmark 90 "$PYTHON" benchmarks/batched_cg.py --device cuda --markdown "${BENCH_DRY[@]}"

CPU_TESTS=(tests/test_ops.py tests/test_ops_fuzz.py tests/test_qp_kernel.py)
if [[ $DRY == 1 ]]; then
  run_step cpu-tests 60 "${PYTEST[@]}" -q --collect-only -m "not cuda" "${CPU_TESTS[@]}"
else
  run_step cpu-tests 90 "${PYTEST[@]}" -m "not cuda" "${CPU_TESTS[@]}"
fi

# The overhead benchmark's small problems on the GPU (per-call cost of custom_root, eager).
if [[ $DRY == 1 ]]; then
  run_step overhead 30 "$PYTHON" benchmarks/engine_overhead.py --device cuda --dry-run
else
  run_step overhead 60 "$PYTHON" benchmarks/engine_overhead.py --device cuda --min-time 0.2
fi

# ---------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------
printf '\n== [%3ds] summary%s (logs in %s)\n' $((SECONDS - START)) \
  "$([[ $DRY == 1 ]] && echo ' of a dry run')" "$LOG"
printf '  %-11s %-58s %6s\n' step status seconds
FAILED=0
for name in "${STEPS[@]}"; do
  printf '  %-11s %-58s %6s\n' "$name" "${STATUS[$name]}" "${SECS[$name]}"
  [[ "${STATUS[$name]}" == FAILED* || "${STATUS[$name]}" == TIMEOUT ]] && FAILED=1
done
printf '  %-11s %-58s %6s\n' total "" $((SECONDS - START))
exit $FAILED
