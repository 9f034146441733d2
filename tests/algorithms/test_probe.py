"""The linear pairwise probe against a logistic regression fitted by hand, the recommended cut, and
``rlhf-engine probe`` / ``model.trunk_layers=auto`` end to end on the example rankings."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_engine.algorithms.probe import fit_pairwise_probe, recommend_cut

ROOT = Path(__file__).resolve().parents[2]


def _hand_fit(d: np.ndarray, l2: float, steps: int = 20000, lr: float = 0.5) -> np.ndarray:
    """Plain gradient descent on mean softplus(-d w) + l2/2 |w|^2, in numpy float64 (no Newton, no torch)."""
    w = np.zeros(d.shape[1])
    for _ in range(steps):
        m = d @ w
        grad = -(d * (1 / (1 + np.exp(m)))[:, None]).mean(0) + l2 * w
        w -= lr * grad
    return w


def test_probe_equals_a_logistic_regression_fitted_by_hand():
    g = torch.Generator().manual_seed(0)
    M, D = 300, 6
    truth = torch.randn(D, generator=g, dtype=torch.float64)
    a, b = torch.randn(M, D, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(M, D, generator=g, dtype=torch.float64)
    flip = ((a - b) @ truth + 0.8 * torch.randn(M, generator=g, dtype=torch.float64)) < 0
    winners, losers = torch.where(flip[:, None], b, a), torch.where(flip[:, None], a, b)
    fit = fit_pairwise_probe(winners, losers, l2=1e-2)
    both = torch.cat([winners, losers]).numpy()
    scale = both.std(0, ddof=1)
    w_hand = _hand_fit((winners - losers).numpy() / scale, 1e-2)
    assert np.abs(fit.weight.numpy() - w_hand).max() < 1e-6
    margins = ((winners - losers).numpy() / scale) @ w_hand
    assert fit.train_accuracy == pytest.approx(float((margins > 0).mean()))
    assert fit.accuracy(winners, losers) == pytest.approx(fit.train_accuracy)  # the same pairs, scored again
    assert 0.75 < fit.train_accuracy < 1.0  # the label noise keeps it below 1


def test_recommended_cut_is_the_deepest_within_tolerance_of_the_best():
    acc = {0: 0.77, 1: 0.60, 2: 0.76, 3: 0.74}
    assert recommend_cut(acc, tolerance=0.02) == 2
    assert recommend_cut(acc, tolerance=0.05) == 3
    assert recommend_cut({0: 0.8, 1: 0.6}, tolerance=0.02) == 0  # no layer keeps it: no shared trunk


@pytest.mark.slow
def test_probe_command_and_trunk_layers_auto(tmp_path):
    """On the example rankings (labelers prefer 'apple', dislike 'stone'), the mean embedding of a response
    already ranks it: the probe reads that at cut 0; ``rm`` with ``trunk_layers=auto`` trains at the
    recommended cut and reports the table."""
    from rlhf_engine.cli import main

    args = ["--config", "configs/rm_tiny.yaml", f"trainer.out_dir={tmp_path / 'probe'}"]
    assert main(["probe", *args]) == 0
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert [r["cut"] for r in result["cuts"]] == [0, 1, 2]
    assert result["cuts"][0]["mean_heldout"] > 0.8  # word content decides the preference
    best = max(result["best_per_cut"].values())
    k = result["recommended_trunk_layers"]
    assert result["best_per_cut"][str(k)] >= best - 0.02 and all(
        acc < best - 0.02 for cut, acc in result["best_per_cut"].items() if int(cut) > k)
    assert (tmp_path / "probe" / "probe.png").exists()
    rm = ["rm", "--config", "configs/rm_tiny.yaml", "model.trunk_layers=auto", "trainer.max_steps=2",
          "trainer.eval_every=0", "trainer.save_every=0", f"trainer.out_dir={tmp_path / 'rm'}",
          f"model.tokenizer_path={tmp_path / 'probe' / 'tokenizer'}"]
    assert main(rm) == 0
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["trunk_layers"] == summary["probe"]["recommended_trunk_layers"] == k
    hf = json.loads((tmp_path / "rm" / "hf" / "config.json").read_text())
    assert hf["trunk_layers"] == k
