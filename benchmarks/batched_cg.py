"""Fused batched CG (implicit_torch::batched_cg) against pure-torch baselines, in one run.

For each (B, n) and dtype: B SPD systems with condition number ~100 (eigenvalues log-spaced in
[1, 100]), rtol = 1e-6, solved by

* fused    - torch.ops.implicit_torch.batched_cg (the compiled kernel when built; the table
             says "python" when the pure-torch fallback serves the op instead);
* torch CG - the same masked CG written with batched torch ops (bmm per iteration;
             implicit_torch.ops.batched_cg_reference);
* solve    - torch.linalg.solve (LU);
* cholesky - torch.linalg.cholesky + torch.cholesky_solve;
* auto     - implicit_torch.linear.solve_formed, the choice solve="auto" makes for formed
             blocks (symmetry check, then fused CG with an iteration budget, or Cholesky).

Times are medians after a warm-up call; the ratios are baseline time / fused time (> 1: the
fused kernel is faster), and auto/best is auto's time over the fastest of the other four.
On CUDA the table also gives the memory-bandwidth floor of the fused solve, the time to read
every matrix once per iteration of its system when it is streamed (or once in all when it
fits in shared memory) at the measured device-to-device copy bandwidth, and the fraction of it
that was reached.

Batched LU on the CPU with more than one thread is broken in recent torch for n >= 160
(pytorch issue 142815: "Pivots given to lu_solve must all be greater or equal to 1", or a
hang), so there torch.linalg.solve runs on one thread (marked "1T").

--variants (CUDA) times the launch variants of the CUDA kernel side by side instead, on sizes
that favour them (large n, small B) and the usual ones: `auto` (the default launch), `global`
(the matrix streamed, never in shared memory), `smem-X` (a cap on shared memory per block:
more blocks per SM), `multiblock` (several blocks per system, one cooperative launch) with the
default or a fixed number of blocks per system. They are chosen by the IMPLICIT_TORCH_CG_*
environment variables (csrc/cuda/batched_cg_cuda.cpp), read at every call. The table gives
each variant's time, auto's time over it (> 1: the variant is faster), the launch actually
used (a variant that does not apply falls back to auto's) and its largest relative
difference from auto's solution.

    python benchmarks/batched_cg.py                    # CPU, and CUDA when available
    python benchmarks/batched_cg.py --device cuda --markdown
    python benchmarks/batched_cg.py --variants --markdown            # every variant
    python benchmarks/batched_cg.py --variants auto,multiblock --sizes 1x4096
    python benchmarks/batched_cg.py --variants --dry-run   # parse, print the plan, no GPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
import warnings

import torch

SIZES = [(4096, 16), (4096, 32), (1024, 64), (256, 256), (64, 1024)]
# Large n and small B (multiblock), matrices that fit in shared memory only without a cap
# (n = 128 and 224: the smem caps), and small systems (auto's warp/block kernels).
VARIANT_SIZES = [(1, 1024), (1, 4096), (4, 2048), (16, 1024), (256, 128), (256, 224), (1024, 64)]
# name -> environment of the CUDA launch (csrc/cuda/batched_cg_cuda.cpp)
VARIANTS = {
    "auto": {},
    "global": {"IMPLICIT_TORCH_CG_STRATEGY": "global"},
    "smem-48K": {"IMPLICIT_TORCH_CG_SMEM_CAP_BYTES": str(48 * 1024)},
    "smem-100K": {"IMPLICIT_TORCH_CG_SMEM_CAP_BYTES": str(100 * 1024)},
    "multiblock": {"IMPLICIT_TORCH_CG_STRATEGY": "multiblock"},
    "multiblock-8": {
        "IMPLICIT_TORCH_CG_STRATEGY": "multiblock",
        "IMPLICIT_TORCH_CG_BLOCKS_PER_SYSTEM": "8",
    },
    "multiblock-32": {
        "IMPLICIT_TORCH_CG_STRATEGY": "multiblock",
        "IMPLICIT_TORCH_CG_BLOCKS_PER_SYSTEM": "32",
    },
}
_VARIANT_KEYS = ("STRATEGY", "SMEM_CAP_BYTES", "BLOCKS_PER_SYSTEM", "LOG_PLAN")
COND = 100.0
RTOL = 1e-6
LU_SAFE_N = 160  # pytorch issue 142815


def spd_batch(B, n, dtype, device, distinct=8, seed=0):
    """B SPD matrices, eigenvalues log-spaced in [1, COND]. To keep set-up cheap at large n,
    min(B, distinct) different matrices are built and tiled (as separate copies) over the
    batch; every system still has its own right-hand side and its own memory."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(B, distinct))
    Q, _ = torch.linalg.qr(torch.randn(k, n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(COND)).item(), n, dtype=torch.float64)
    A = Q @ torch.diag_embed(eig.expand(k, n)) @ Q.transpose(1, 2)
    A = 0.5 * (A + A.transpose(1, 2))
    reps = -(-B // k)
    A = A.to(dtype=dtype, device=device).repeat(reps, 1, 1)[:B].contiguous()
    b = torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return A, b


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, min_time=0.5, max_reps=25):
    """Median wall time (s) of fn() after one warm-up call."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    reps = 2 if first > 1.0 else max(3, min(max_reps, int(min_time / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def num_threads(k):
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_bandwidth(device, override):
    """Device memory bandwidth in GB/s: ``override``, else measured on CUDA as the bytes read
    and written by cloning a 1 GiB tensor over its median time (None on the CPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    t = measure(lambda: x.clone(), device, min_time=0.3)
    return 2 * x.numel() * x.element_size() / t / 1e9


def run_case(B, n, dtype, device, peak_bw):
    from implicit_torch.linear import solve_formed
    from implicit_torch.ops import batched_cg_reference

    A, b = spd_batch(B, n, dtype, device)
    maxiter = 10 * n
    fused = lambda: torch.ops.implicit_torch.batched_cg(A, b, None, RTOL, 0.0, maxiter)  # noqa: E731
    x, iters, _ = fused()
    torch_cg = lambda: batched_cg_reference(A, b, None, RTOL, 0.0, maxiter)  # noqa: E731

    def solve():
        return torch.linalg.solve(A, b)

    def cholesky():
        return torch.cholesky_solve(b.unsqueeze(-1), torch.linalg.cholesky(A)).squeeze(-1)

    row = {"B": B, "n": n, "dtype": str(dtype).removeprefix("torch."), "device": device.type}
    row["iters"] = float(iters.double().mean())
    row["iters_max"] = int(iters.max())
    # accuracy as the relative true residual (an LU reference would meet issue 142815 here)
    res64 = b.double() - (A.double() @ x.double().unsqueeze(-1)).squeeze(-1)
    row["rel_res"] = float((res64.norm(dim=-1) / b.double().norm(dim=-1)).max())
    row["fused"] = measure(fused, device)
    row["torch_cg"] = measure(torch_cg, device, min_time=0.3)
    lu_single = device.type == "cpu" and n >= LU_SAFE_N and torch.get_num_threads() > 1
    with num_threads(1) if lu_single else contextlib.nullcontext():
        row["solve"] = measure(solve, device, min_time=0.3)
    row["solve_note"] = "1T" if lu_single else ""
    row["cholesky"] = measure(cholesky, device, min_time=0.3)
    _x_auto, row["auto_method"] = solve_formed(A, b, tol=RTOL)
    row["auto"] = measure(lambda: solve_formed(A, b, tol=RTOL), device, min_time=0.3)
    if peak_bw:
        elem = torch.finfo(dtype).bits // 8
        matrix_bytes = n * n * elem
        in_smem = matrix_bytes + 6 * n * elem < 220 * 1024  # see plan_batched_cg
        passes = 2 if in_smem else row["iters_max"] + 2  # + the start and the final residual
        floor = B * matrix_bytes * passes / (peak_bw * 1e9)
        row["bw_floor"] = floor
    return row


@contextlib.contextmanager
def variant_env(env):
    """The IMPLICIT_TORCH_CG_* environment of one launch variant, restored afterwards."""
    keys = [f"IMPLICIT_TORCH_CG_{k}" for k in _VARIANT_KEYS]
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ.update(env)
    try:
        yield
    finally:
        for k in keys:
            os.environ.pop(k, None)
            if saved[k] is not None:
                os.environ[k] = saved[k]


def launch_of(call):
    """A short description of the CUDA launch that ``call()`` uses (IMPLICIT_TORCH_CG_LOG_PLAN)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.environ["IMPLICIT_TORCH_CG_LOG_PLAN"] = "1"
        try:
            call()
        finally:
            del os.environ["IMPLICIT_TORCH_CG_LOG_PLAN"]
    plans = [str(w.message) for w in caught if "batched_cg CUDA launch" in str(w.message)]
    if not plans:
        return "?"
    plan = plans[-1]
    if "multiblock" in plan:
        return "multiblock x" + re.search(r"blocks_per_system=(\d+)", plan).group(1)
    if "warp per system" in plan:
        return "warp"
    smem = int(re.search(r"smem_bytes=(\d+)", plan).group(1))
    where = "A in smem" if "matrix_in_smem=1" in plan else "A streamed"
    return f"block, {where}, {smem // 1024} KB"


def run_variants(B, n, dtype, device, names):
    """One row per variant: time, launch, and agreement with auto's solution."""
    A, b = spd_batch(B, n, dtype, device)
    maxiter = 10 * n

    def fused():
        return torch.ops.implicit_torch.batched_cg(A, b, None, RTOL, 0.0, maxiter)

    rows, reference = [], None
    for name in names:
        with variant_env(VARIANTS[name]):
            launch = launch_of(fused)
            x, iters, _ = fused()
            if reference is None:
                reference = x.double()
            diff = (x.double() - reference).norm(dim=-1) / reference.norm(dim=-1)
            rows.append(
                {
                    "B": B,
                    "n": n,
                    "dtype": str(dtype).removeprefix("torch."),
                    "variant": name,
                    "launch": launch,
                    "iters": float(iters.double().mean()),
                    "diff": float(diff.max()),
                    "time": measure(fused, device, min_time=0.2),
                }
            )
            r = rows[-1]
            print(
                f"  B={B} n={n} {r['dtype']} {name}: {r['time'] * 1e3:.3f} ms ({launch}), "
                f"iters {r['iters']:.1f}, rel diff {r['diff']:.1e}",
                file=sys.stderr,
                flush=True,
            )
    auto = next((r["time"] for r in rows if r["variant"] == "auto"), rows[0]["time"])
    for r in rows:
        r["speedup"] = auto / r["time"]
    return rows


def print_variants(rows, markdown):
    head = ["B", "n", "dtype", "variant", "launch", "iters", "ms", "auto/this", "max rel diff"]
    lines = [
        [
            str(r["B"]),
            str(r["n"]),
            r["dtype"],
            r["variant"],
            r["launch"],
            f"{r['iters']:.1f}",
            fmt_ms(r["time"]),
            f"{r['speedup']:.2f}x",
            f"{r['diff']:.1e}",
        ]
        for r in rows
    ]
    print_rows(head, lines, markdown)


def fmt_ms(t):
    return f"{t * 1e3:9.2f}"


def print_table(rows, markdown, kind):
    head = [
        "B",
        "n",
        "dtype",
        "iters",
        f"fused[{kind}] ms",
        "torch CG ms",
        "solve ms",
        "cholesky ms",
        "CG/fused",
        "solve/fused",
        "chol/fused",
        "auto ms (choice)",
        "auto/best",
    ]
    gpu = any("bw_floor" in r for r in rows)
    if gpu:
        head += ["BW floor ms", "floor/fused"]
    lines = []
    for r in rows:
        cells = [
            str(r["B"]),
            str(r["n"]),
            r["dtype"],
            f"{r['iters']:.1f}",
            fmt_ms(r["fused"]),
            fmt_ms(r["torch_cg"]),
            fmt_ms(r["solve"]) + (f" ({r['solve_note']})" if r["solve_note"] else ""),
            fmt_ms(r["cholesky"]),
            f"{r['torch_cg'] / r['fused']:.1f}x",
            f"{r['solve'] / r['fused']:.2f}x",
            f"{r['cholesky'] / r['fused']:.2f}x",
            fmt_ms(r["auto"]) + f" ({r['auto_method']})",
            f"{r['auto'] / min(r[k] for k in ('fused', 'torch_cg', 'solve', 'cholesky')):.2f}x",
        ]
        if gpu:
            floor = r.get("bw_floor")
            cells += [
                fmt_ms(floor) if floor else "-",
                f"{floor / r['fused']:.2f}" if floor else "-",
            ]
        lines.append(cells)
    print_rows(head, lines, markdown)


def print_rows(head, lines, markdown):
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---:" for _ in head) + "|")
        for cells in lines:
            print("| " + " | ".join(c.strip() for c in cells) + " |")
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for cells in lines:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (both if possible)")
    parser.add_argument("--dtype", default="float32,float64")
    parser.add_argument("--sizes", default=None, help="e.g. 4096x32,256x256 (default: the set)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--peak-bw", type=float, default=None, help="GPU GB/s (else measured)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument(
        "--variants",
        nargs="?",
        const="all",
        default=None,
        help=f"time the CUDA launch variants instead (all, or some of: {', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the arguments, print the plan, run nothing"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = None
    if args.variants:
        names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.device == "auto":
        devices = ["cuda"] if names else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.device.split(",")
    if names and devices != ["cuda"]:
        parser.error("--variants times the CUDA kernel: use --device cuda (or auto)")
    sizes = VARIANT_SIZES if names else SIZES
    try:
        if args.sizes:
            sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    except (ValueError, AttributeError) as exc:
        parser.error(f"bad --sizes or --dtype: {exc}")
    if any(d not in (torch.float32, torch.float64) for d in dtypes) or any(
        len(size) != 2 for size in sizes
    ):
        parser.error("--dtype takes float32/float64, --sizes BxN pairs")
    if args.dry_run:  # (implicit_torch is not even imported)
        what = f"variants {', '.join(names)}" if names else "fused kernel vs baselines"
        sizes_text = ", ".join(f"{B}x{n}" for B, n in sizes)
        dtypes_text = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        print(f"dry run: {what} on {', '.join(devices)}; sizes {sizes_text}; {dtypes_text}")
        return
    import implicit_torch.ops as ops  # loads the operators

    if names:
        if not torch.cuda.is_available():
            parser.error("--variants needs a CUDA GPU")
        device = torch.device("cuda")
        print(
            f"{torch.cuda.get_device_name(device)}: CUDA launch variants, cond {COND:g}, "
            f"rtol {RTOL:g}; CUDA kernel compiled: {ops.extension_available(device)}"
        )
        rows = []
        for dtype in dtypes:
            for B, n in sizes:
                rows += run_variants(B, n, dtype, device, names)
        print_variants(rows, args.markdown)
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cond {COND:g}, "
        f"rtol {RTOL:g}; implicit_torch extension: {ops.extension_available()}"
    )
    for dev_name in devices:
        device = torch.device(dev_name)
        kind = "compiled" if ops.extension_available(device) else "python"
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{label} (fused kernel: {kind})", flush=True)
        bw = copy_bandwidth(device, args.peak_bw)
        rows = []
        for dtype in dtypes:
            for B, n in sizes:
                rows.append(run_case(B, n, dtype, device, bw))
                r = rows[-1]
                print(
                    f"  done B={B} n={n} {r['dtype']}: fused {r['fused'] * 1e3:.2f} ms, "
                    f"max ||b - Ax|| / ||b|| {r['rel_res']:.1e}",
                    file=sys.stderr,
                    flush=True,
                )
        print_table(rows, args.markdown, kind)
        if device.type == "cpu" and any(r["solve_note"] for r in rows):
            print(
                "(1T: torch.linalg.solve on one thread; batched CPU LU with several threads is "
                "broken for n >= 160, pytorch issue 142815)"
            )
        if bw:
            print(
                f"(BW floor: matrix bytes read per solve / {bw:.0f} GB/s measured copy bandwidth)"
            )


if __name__ == "__main__":
    main()
