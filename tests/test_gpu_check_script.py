"""scripts/gpu_check.sh in its dry-run mode (GPU_CHECK_DRY_RUN=1), which runs on any machine
every step up to the first use of a GPU: environment detection, the build command, test
selection and collection, the benchmarks' argument parsing, and the summary table."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = [
    pytest.mark.slow,  # about 15 s: five Python processes importing torch
    pytest.mark.skipif(
        shutil.which("bash") is None or shutil.which("timeout") is None or not SCRIPT.exists(),
        reason="needs bash, coreutils' timeout and a source checkout",
    ),
]


def test_dry_run_exercises_every_step_and_summarises():
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, GPU_CHECK_BUDGET="120")
    env.pop("IMPLICIT_TORCH_NO_EXT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = out[out.index("summary of a dry run") :]
    for step in ("env", "build", "cuda-tests", "variants", "benchmark", "cpu-tests"):
        line = next(row for row in summary.splitlines() if row.split()[:1] == [step])
        assert "ok (dry run)" in line, line
    assert "skipped (dry run)" in summary  # loading the CUDA kernel needs the GPU
    # the build command is assembled for the CUDA extension
    assert "FORCE_CUDA=1" in out and "pip install --no-build-isolation --no-deps -e ." in out
    # only the modules with tests marked cuda are collected, and some tests were
    selected = out[out.index("tests marked cuda:") :].splitlines()[0]
    assert "tests/test_ops.py" in selected and "tests/test_ops_fuzz.py" not in selected
    assert re.search(r"tests/test_ops.py: \d+", out)  # pytest -qq --collect-only counts
    # the benchmarks parsed their arguments: the variants and the baseline comparison
    assert "dry run: variants auto, global" in out and "dry run: fused kernel vs baselines" in out
