"""Smoke tests of the learning examples (issue 6): dataset distillation and task-driven
dictionary learning. Each runs in a few seconds, checks its implicit gradient against finite
differences and writes its figure."""

from __future__ import annotations

import pytest
from problems import load_example


def test_dataset_distillation_smoke(tmp_path, capsys):
    result = load_example("dataset_distillation").main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    png = tmp_path / "dataset_distillation.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert result["figure"] == str(png)

    # The implicit hypergradient in the pixels matches central finite differences (float64).
    assert result["check_passed"]
    assert result["grad_check"] < 1e-6
    assert "hypergradient check passed" in printed

    # A few outer steps already lower the real-data loss and lift the accuracy far above chance.
    assert result["loss_final"] < result["loss_initial"]
    assert result["acc_distilled"] > 0.5 > result["acc_initial"]


def test_dictionary_learning_smoke(tmp_path, capsys):
    sklearn = pytest.importorskip("sklearn")
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 8):
        pytest.skip("the example uses LogisticRegressionCV(l1_ratios=...) of scikit-learn 1.8+")
    result = load_example("dictionary_learning").main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    png = tmp_path / "dictionary_learning.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert result["figure"] == str(png)

    # The gradient in the dictionary, through the elastic-net codes, matches finite differences.
    assert result["check_passed"]
    assert result["grad_check"] < 1e-6
    assert "gradient check passed" in printed

    # Training lowers the classification loss; every method separates the classes well.
    assert result["loss_final"] < result["loss_initial"]
    assert all(0.9 < v <= 1.0 for v in result["auc"].values())
