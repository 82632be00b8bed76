#!/usr/bin/env bash
# Compile-and-link check of the CUDA extension on a machine without a GPU.
#
#   scripts/check_cuda_build.sh
#
# 1. nvcc compiles the pure kernel file alone (no torch headers): csrc/cuda/batched_cg_kernels.cu.
# 2. A CUDA build of torch (in a venv, default /tmp/it-cuda-venv, created on first use with
#    `pip install torch==2.14.1`, ~5 GB from the local wheel cache) builds the whole extension
#    with FORCE_CUDA=1 into a temporary directory: the repository's in-place build (the CPU
#    extension of .venv) is left alone.
#    The CUDA glue must not include cuBLAS/cuSPARSE/cuSOLVER headers (no include-path
#    workaround: the toolkit need not have them).
# 3. The produced .so is checked: its libraries resolve (ldd), it defines the CUDA kernel glue
#    and the kernels, and importing it with that torch registers a CUDA kernel for
#    implicit_torch::batched_cg (importing works without a GPU).
#
# Environment: CUDA_VENV (venv path), TORCH_CUDA_ARCH_LIST (default 9.0), NVCC (default: nvcc
# on PATH), KEEP=1 keeps the build directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_VENV="${CUDA_VENV:-/tmp/it-cuda-venv}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
ARCH="sm_${TORCH_CUDA_ARCH_LIST//./}"
ARCH="${ARCH%%[^0-9a-z_]*}"

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

[[ -n "$NVCC" ]] || fail "nvcc not found (set NVCC or put it on PATH)"
# CUDA_HOME: the toolkit whose include/ has the runtime headers. `nvcc` on PATH may be a wrapper
# script (here /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so its parent's parent is
# only the first guess.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for guess in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [[ -f "$guess/include/cuda_runtime_api.h" && -x "$guess/bin/nvcc" ]]; then
      CUDA_HOME="$guess"
      break
    fi
  done
fi
[[ -n "${CUDA_HOME:-}" ]] || fail "no CUDA toolkit with include/cuda_runtime_api.h found; set CUDA_HOME"
export CUDA_HOME
step "nvcc: $("$NVCC" --version | tail -1); CUDA_HOME=$CUDA_HOME; arch $ARCH"

WORK="$(mktemp -d /tmp/it-cuda-build.XXXXXX)"
if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi

step "1/3 nvcc alone: csrc/cuda/batched_cg_kernels.cu (no torch headers)"
"$NVCC" -c -std=c++17 -O3 -arch="$ARCH" -Xptxas -warn-spills -Werror all-warnings \
  -I"$ROOT/csrc" "$ROOT/csrc/cuda/batched_cg_kernels.cu" -o "$WORK/batched_cg_kernels.o"
SYMBOLS="$(nm -C "$WORK/batched_cg_kernels.o")"  # (grep -q on a pipe would trip pipefail)
for T in float double; do
  grep -q "launch_batched_cg<$T>" <<<"$SYMBOLS" || fail "launch_batched_cg<$T> missing from the object"
done
# (-warn-spills with -Werror above: no kernel, the multiblock variant included, spills registers)
echo "ok: kernels compile alone for $ARCH"

step "2/3 CUDA build of torch in $CUDA_VENV"
if [[ ! -x "$CUDA_VENV/bin/python" ]] || ! "$CUDA_VENV/bin/python" -c \
  "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  df -h /tmp | tail -1 | awk '{ print "free space on /tmp: " $4 }'
  python3 -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/python" -m pip install -q torch==2.14.1
fi
"$CUDA_VENV/bin/python" -m pip install -q setuptools wheel ninja 2>/dev/null ||
  "$CUDA_VENV/bin/python" -m pip install -q setuptools wheel
SITE="$("$CUDA_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$CUDA_VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>/dev/null
# No include-path workaround: the glue includes only c10's CUDA headers, so a toolkit without
# the cuBLAS/cuSPARSE/cuSOLVER headers (like this one, possibly) builds it. Check that it stays so.
unset CPATH
INCLUDES="$("$CUDA_VENV/bin/python" -c '
import sysconfig
from torch.utils import cpp_extension
paths = cpp_extension.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
print(" ".join("-I" + p for p in paths))')"
# shellcheck disable=SC2086  # INCLUDES is a list of flags
DEPS="$(c++ -std=c++20 -M -I"$ROOT/csrc" -I"$CUDA_HOME/include" $INCLUDES \
  "$ROOT/csrc/cuda/batched_cg_cuda.cpp")" || fail "preprocessing batched_cg_cuda.cpp failed"
if grep -q -E "cublas|cusparse|cusolver" <<<"$DEPS"; then
  grep -o -E "[^ ]*(cublas|cusparse|cusolver)[^ ]*" <<<"$DEPS" | sort -u | head
  fail "batched_cg_cuda.cpp pulls in cuBLAS/cuSPARSE/cuSOLVER headers"
fi
echo "ok: the CUDA glue includes no cuBLAS/cuSPARSE/cuSOLVER header"

step "3/3 building the CUDA extension (FORCE_CUDA=1) into $WORK"
SRC="$WORK/src"
mkdir -p "$SRC"
# A copy of the sources, so that setuptools' egg-info and build files stay out of the repository.
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/csrc" "$ROOT/implicit_torch" "$SRC/"
[[ -f "$ROOT/README.md" ]] && cp "$ROOT/README.md" "$SRC/"
rm -f "$SRC"/implicit_torch/_C*.so
(cd "$SRC" && FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" "$CUDA_VENV/bin/python" setup.py -q build_ext \
  --build-temp "$WORK/temp" --build-lib "$WORK/lib" 2>&1 | grep -v -E "SetuptoolsDeprecationWarning|^\s*$" \
  | tail -40)
SO="$(ls "$WORK"/lib/implicit_torch/_C*.so 2>/dev/null | head -1 || true)"
[[ -n "$SO" ]] || fail "no extension was produced (see the build log above)"
echo "built: $SO ($(du -h "$SO" | cut -f1))"

TORCH_LIB="$SITE/torch/lib"
if LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$SO" | grep -q "not found"; then
  LD_LIBRARY_PATH="$TORCH_LIB" ldd "$SO" | grep "not found"
  fail "unresolved libraries"
fi
grep -q " T PyInit__C" <<<"$(nm -D "$SO")" || fail "PyInit__C is not exported"
SYMBOLS="$(nm -C "$SO")"
for K in cg_block_kernel cg_warp_kernel cg_multiblock_kernel batched_cg_cuda batched_cg_cpu qp_ipm_cpu; do
  grep -q "$K" <<<"$SYMBOLS" || fail "$K is not in the .so"
done
if [[ -x "$CUDA_HOME/bin/cuobjdump" ]]; then
  echo "device code in the .so:"; "$CUDA_HOME/bin/cuobjdump" --list-elf "$SO" | sed 's/^/  /'
fi

# Import it with the CUDA torch (no GPU needed) and check that the dispatcher has both kernels.
cp -r "$WORK/lib/implicit_torch/_C"*.so "$SRC/implicit_torch/"
(cd "$SRC" && IMPLICIT_TORCH_NO_EXT= "$CUDA_VENV/bin/python" - <<'EOF'
import warnings
import torch
with warnings.catch_warnings(record=True) as caught:  # a failed load only warns: make it fatal
    warnings.simplefilter("always")
    import implicit_torch.ops as ops
ours = [str(w.message) for w in caught if "implicit_torch" in str(w.message)]
assert not ours, ours

import implicit_torch._C as ext

name = "implicit_torch::batched_cg"
# (the dispatcher's own view, as an independent check of the extension's list)
has = {k: torch._C._dispatch_has_kernel_for_dispatch_key(name, k) for k in ("CPU", "CUDA")}
assert ops.extension_available(), "the extension did not load"
assert has["CPU"] and has["CUDA"], f"kernels registered: {has}"
assert set(ext.KERNELS) == {("batched_cg", "CPU"), ("batched_cg", "CUDA"), ("qp_ipm", "CPU")}, ext.KERNELS
assert ops.extension_available("cuda") and ops.extension_available("cpu")
A = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 2
x, info = ops.batched_cg(A, torch.ones(2, 3, dtype=torch.float64))
assert torch.allclose(x, torch.full((2, 3), 0.5, dtype=torch.float64)), x
print("ok: import with torch", torch.__version__, "- kernels registered:", has,
      "- GPU present:", torch.cuda.is_available())
EOF
)
step "CUDA build check passed"
