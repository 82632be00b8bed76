"""Smoke tests of the paper's theory examples: Jacobian precision (Theorem 1) and the
soft-sphere packing sensitivity (molecular dynamics)."""

from __future__ import annotations

from problems import load_example


def test_jacobian_precision_smoke(tmp_path, capsys):
    result = load_example("jacobian_precision").main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    png = tmp_path / "jacobian_precision.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert result["figure"] == str(png)
    assert result["check_passed"] and "Jacobian precision check passed" in printed
    # The implicit Jacobian is exact at x* and obeys J(x_t) − J* = −A⁻¹(x_t − x*) along the way.
    assert result["err_at_solution"] < 1e-10
    assert result["identity_dev"] < 1e-10
    # Theorem 1: the error never exceeds C‖x_t − x*‖ and, for gradient descent on ridge,
    # reaches the bound (slope 1 in log-log); unrolling is less precise.
    assert result["bound_ratio"] <= 1 + 1e-9
    assert 0.99 < result["bound_tightness"] <= 1 + 1e-9
    assert abs(result["slope_implicit"] - 1) < 0.05
    assert result["unrolled_over_implicit"] > 5


def test_molecular_dynamics_smoke(tmp_path, capsys):
    result = load_example("molecular_dynamics").main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    png = tmp_path / "molecular_dynamics.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert result["figure"] == str(png)
    assert result["check_passed"] and "molecular dynamics check passed" in printed
    # Deflating the zero modes leaves a positive definite system (CG applies) ...
    assert result["lambda_min"] > 0
    # ... whose solution is the dense minimum-norm one and matches finite differences of FIRE.
    assert result["err_dense"] < 1e-7
    assert result["err_fd"] < 1e-4
