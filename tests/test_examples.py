"""Smoke test of the main example (``make demo``): it runs, checks its hypergradient and
writes its figure."""

from __future__ import annotations

from problems import load_example, load_script


def test_ridge_hypergradient_smoke(tmp_path, capsys):
    example = load_example("ridge_hypergradient")
    result = example.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    png = tmp_path / "ridge_hypergradient.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert result["figure"] == str(png)

    # The implicit hypergradient matches autograd through a dense closed-form solve.
    assert result["check_passed"]
    assert result["err_closed"] < 1e-6
    assert "hypergradient check passed" in printed

    # A few Adam steps on the penalties lower the loss they minimise.
    assert result["val_final"] < result["val_initial"]


def test_deq_digits_smoke(tmp_path):
    result = load_example("deq_digits").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "deq_digits.png").stat().st_size > 10_000
    # implicit gradient = backprop through 300 (converged) iterations, to float32 precision
    assert result["grad_check"] < 1e-4
    # two epochs on 300 images already beat chance (10 %) by far
    assert result["acc_final"] > 0.5 > result["acc_initial"]


def test_imaml_sinusoid_smoke(tmp_path):
    result = load_example("imaml_sinusoid").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "imaml_sinusoid.png").stat().st_size > 10_000
    # implicit meta-gradient = autograd through the closed-form inner solution
    assert result["grad_check"] < 1e-8
    # adapting to 10 shots helps even after a few meta-steps
    assert result["mse_adapted"] < result["mse_unadapted"]


def test_optnet_polytope_smoke(tmp_path):
    result = load_example("optnet_polytope").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "optnet_polytope.png").stat().st_size > 10_000
    assert result["grad_check"] < 1e-5  # the QP layer's gradient vs finite differences
    assert result["loss_final"] < result["loss_initial"]


def test_svm_hpo_smoke(tmp_path):
    # benchmarks/svm_hpo.py is the paper's SVM experiment (issue 6, example 2); its correctness
    # checks live in tests/test_solvers_composite.py, this runs it end to end.
    result = load_script("benchmarks/svm_hpo.py").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "svm_hpo_smoke.png").stat().st_size > 10_000
    assert {r["solver"] for r in result["rows"]} == {"md", "pg", "bcd"}
    for row in result["rows"]:
        assert row["implicit_s"] > 0 and row["unrolled_s"] > 0
        assert abs(row["grad_implicit"]) < float("inf") and abs(row["grad_unrolled"]) < float("inf")
