"""Linear pairwise probes: how well frozen features separate preferred from rejected responses.

    fit = fit_pairwise_probe(train_w, train_l, l2=1e-3)      # (M, D) features of winners and losers
    acc = fit.accuracy(heldout_w, heldout_l)                  # fraction of pairs ranked right
    k = recommend_cut({0: 0.77, 1: 0.60, 2: 0.61}, tolerance=0.02)

A probe is a reward model whose only trainable part is a linear score on frozen features phi:
r(x, y) = w . z(phi(x, y)), with z the per-feature standardisation fitted on the training responses (so
the probe sees directions, not the residual stream's scale, which grows by orders of magnitude over the
first layers). It is fitted as the ranking RM is, by the Bradley-Terry pairwise loss, plus an L2
penalty (no bias: a shared offset cancels in r_w - r_l):

    L(w) = 1/M sum_m softplus(-w . (z(phi_w,m) - z(phi_l,m))) + l2 / 2 ||w||^2

which is convex; it is minimised in float64 by Newton's method (the Hessian is D x D), to a gradient
norm below ``tol``. If a linear probe at cut k cannot rank the responses, a reward head over a trunk
frozen at k starts from features that hide the preference (Alain & Bengio 2016 on linear probes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairwiseProbe:
    weight: torch.Tensor  # (D,) float64, on standardised features
    mean: torch.Tensor  # (D,) standardisation fitted on the training responses
    scale: torch.Tensor  # (D,)
    train_accuracy: float
    iterations: int

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(R, D) -> (R,) probe scores."""
        return ((features.double() - self.mean) / self.scale) @ self.weight

    def accuracy(self, winners: torch.Tensor, losers: torch.Tensor) -> float:
        """Fraction of pairs whose winner scores higher; a tie counts one half (features that cannot tell
        two responses apart, e.g. both ending in the same end-of-turn token, score chance, not zero)."""
        return pairwise_accuracy(self.score(winners) - self.score(losers))


def fit_pairwise_probe(winners: torch.Tensor, losers: torch.Tensor, *, l2: float = 1e-3, tol: float = 1e-9,
                       max_iter: int = 100) -> PairwiseProbe:
    """Fit the probe (module docstring) on (M, D) features of each pair's winner and loser."""
    if winners.shape != losers.shape or winners.ndim != 2 or winners.shape[0] == 0:
        raise ValueError(f"need (M, D) winner and loser features of the same shape, got {tuple(winners.shape)} "
                         f"and {tuple(losers.shape)}")
    both = torch.cat([winners, losers]).double()
    mean, scale = both.mean(0), both.std(0).clamp(min=1e-12)
    d = (winners.double() - losers.double()) / scale  # (M, D): the mean cancels in a difference
    M, D = d.shape
    w = torch.zeros(D, dtype=torch.float64)
    it = 0
    for it in range(1, max_iter + 1):
        margin = d @ w  # (M,)
        p = torch.sigmoid(-margin)  # d softplus(-m) / dm = -sigmoid(-m)
        grad = -(d * p[:, None]).sum(0) / M + l2 * w
        if grad.norm() < tol:
            break
        h = (d * (p * (1 - p))[:, None]).T @ d / M + l2 * torch.eye(D, dtype=torch.float64)
        step = torch.linalg.solve(h, grad)
        t = 1.0  # backtracking keeps every Newton step a descent step
        loss = F.softplus(-margin).mean() + l2 / 2 * w @ w
        while t > 1e-8:
            trial = w - t * step
            if F.softplus(-(d @ trial)).mean() + l2 / 2 * trial @ trial <= loss:
                break
            t /= 2
        w = w - t * step
    return PairwiseProbe(w, mean, scale, pairwise_accuracy(d @ w), it)


def pairwise_accuracy(margins: torch.Tensor) -> float:
    """Mean of 1 for a positive margin, 1/2 for a tie, 0 otherwise."""
    return float(((margins > 0).double() + 0.5 * (margins == 0).double()).mean())


def recommend_cut(heldout: dict[int, float], tolerance: float = 0.02) -> int:
    """The deepest cut whose held-out accuracy is within ``tolerance`` of the best cut's: the most layers
    that can be frozen and shared without giving up ranking ability a linear head could use."""
    if not heldout:
        raise ValueError("no cut was probed")
    best = max(heldout.values())
    return max(k for k, acc in heldout.items() if acc >= best - tolerance)
