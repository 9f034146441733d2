"""PPO policy and value losses: hand-computed cases, the per-token oracle, Triton vs torch, and the full
chain (fused log-probs -> PPO loss with exact KL -> gradients) against a materialized autograd oracle."""

import math

import pytest
import torch

from rlhf_kernels import aggregation_weights, kl_estimate, linear_logprob, ppo_policy_loss, value_loss
from rlhf_kernels.reference import linear_logprob_reference, ppo_token_terms_reference


def _one(ratio, adv, **kw):
    logp = torch.tensor([[math.log(ratio)]])
    return ppo_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), backend="torch", **kw)


def test_clipped_surrogate_hand_cases():
    assert _one(1.5, 1.0).loss.item() == pytest.approx(-1.2)  # clipped at 1 + eps
    assert _one(0.5, 1.0).loss.item() == pytest.approx(-0.5)  # pessimistic: unclipped
    assert _one(0.5, -1.0).loss.item() == pytest.approx(0.8)  # clipped at 1 - eps
    assert _one(1.5, 1.0, clip_eps_high=0.28).loss.item() == pytest.approx(-1.28)  # asymmetric (clip-higher)
    assert _one(5.0, -1.0).loss.item() == pytest.approx(5.0)
    assert _one(5.0, -1.0, dual_clip=3.0).loss.item() == pytest.approx(3.0)  # dual clip bounds it
    assert _one(1.5, 1.0).metrics["clip_fraction"].item() == 1.0
    assert _one(1.1, 1.0).metrics["clip_fraction"].item() == 0.0


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # d = 0.5
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)


def test_aggregation_weights():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.allclose(aggregation_weights(mask, "token_mean"), mask / 4)
    assert torch.allclose(aggregation_weights(mask, "seq_mean_token_mean"),
                          torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]]))
    assert torch.allclose(aggregation_weights(mask, "seq_mean_token_sum"), mask / 2)
    assert torch.allclose(aggregation_weights(mask, "token_sum_norm"), mask / (2 * 4))
    assert torch.allclose(aggregation_weights(mask, "token_mean", normalizer=10.0), mask / 10)


def _batch(seed=0, B=5, T=23):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.4).clamp(max=0).requires_grad_()
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    ref = -torch.rand(B, T, generator=g) * 3
    ent = (torch.rand(B, T, generator=g) * 2).requires_grad_()
    kl = (torch.rand(B, T, generator=g) * 0.3).requires_grad_()
    return logp, old, adv, mask, ref, ent, kl


def test_torch_loss_equals_per_token_oracle():
    logp, old, adv, mask, *_ = _batch()
    for dual in (None, 2.5):
        out = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.3, dual_clip=dual, backend="torch")
        terms = ppo_token_terms_reference(logp.detach(), old, adv, clip_low=0.2, clip_high=0.3, dual_clip=dual)
        assert out.loss.item() == pytest.approx((terms * mask).sum().item() / mask.sum().item(), rel=1e-6)


CASES = [
    dict(kl_estimator="k1", kl_coef=0.1),
    dict(kl_estimator="k2", kl_coef=0.1, entropy_coef=0.01, aggregation="seq_mean_token_mean"),
    dict(kl_estimator="k3", kl_coef=0.05, dual_clip=3.0, aggregation="seq_mean_token_sum"),
    dict(kl_estimator="exact", kl_coef=0.2, entropy_coef=0.02, aggregation="token_sum_norm", clip_eps_high=0.28),
    dict(kl_coef=0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.get('kl_estimator', 'none')}-{c.get('aggregation', 'token_mean')}")
def test_triton_equals_torch(case):
    logp, old, adv, mask, ref, ent, kl = _batch(seed=1)
    results = []
    for backend in ("torch", "triton"):
        for t in (logp, ent, kl):
            t.grad = None
        out = ppo_policy_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, kl=kl, backend=backend, **case)
        (out.loss * 1.7).backward()  # grad_output != 1
        grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in (logp, ent, kl)]
        results.append((out, grads))
    (o_t, g_t), (o_k, g_k) = results
    assert o_k.loss.item() == pytest.approx(o_t.loss.item(), rel=1e-5, abs=1e-7)
    for a, b in zip(g_t, g_k):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    for key in o_t.metrics:
        assert o_k.metrics[key].item() == pytest.approx(o_t.metrics[key].item(), rel=1e-5, abs=1e-7), key


def test_value_loss_clipping_hand_case():
    values = torch.tensor([[1.0, 0.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 2.0]])
    out = value_loss(values, old, ret, torch.ones(1, 3), clip_eps=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped 0.7^2 = .49 -> 1; token 1: 1 vs 1 -> 1; token 2: 0 vs (0.2-2)^2 = 3.24
    assert out.loss.item() == pytest.approx(0.5 * (1 + 1 + 3.24) / 3)
    assert out.metrics["value_clip_fraction"].item() == pytest.approx(1 / 3)
    out.loss.backward()
    assert values.grad[0, 2].item() == 0.0  # the clipped branch does not depend on V


def test_full_chain_with_exact_kl_matches_materialized_autograd():
    g = torch.Generator().manual_seed(7)
    N, H, V = 29, 24, 211
    x = torch.randn(N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    xq, wq = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    old = linear_logprob_reference(x.detach(), w.detach(), y).logp + torch.randn(N, generator=g) * 0.1
    adv, mask = torch.randn(N, generator=g), torch.ones(N)
    grads = []
    for fn in (linear_logprob_reference, linear_logprob):
        x.grad = w.grad = None
        o = fn(x, w, y, ref_hidden=xq, ref_weight=wq, temperature=0.9)
        loss = ppo_policy_loss(o.logp, old, adv, mask, entropy=o.entropy, entropy_coef=0.01, kl=o.kl,
                               kl_coef=0.1, kl_estimator="exact", backend="torch").loss
        loss.backward()
        grads.append((x.grad.clone(), w.grad.clone()))
    (dx_ref, dw_ref), (dx, dw) = grads
    assert torch.allclose(dx, dx_ref, atol=1e-6, rtol=1e-4) and torch.allclose(dw, dw_ref, atol=1e-6, rtol=1e-4)


def test_kl_clamps_by_hand_and_off_by_default():
    logp, ref = torch.tensor([-1.0, -30.0, -2.0]), torch.tensor([-1.5, -1.0, -40.0])  # d = 0.5, -29, 38
    d = logp - ref
    assert torch.equal(kl_estimate(logp, ref, "k3"), torch.expm1(-d) + d)  # unclamped: k3 of -29 is huge
    got = kl_estimate(logp, ref, "k3", clamp=10.0, log_ratio_clamp=20.0)
    dc = d.clamp(-20, 20)
    assert got.tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, 10.0, 10.0])  # e^29 - 30 and e^-20 + 19 cut
    torch.testing.assert_close(got, (torch.expm1(-dc) + dc).clamp(-10, 10))
    assert kl_estimate(logp, ref, "k1", clamp=10.0).tolist() == pytest.approx([0.5, -10.0, 10.0])
    # a clamped token passes no gradient
    lp = logp.clone().requires_grad_()
    kl_estimate(lp, ref, "k1", clamp=10.0).sum().backward()
    assert lp.grad.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_triton_equals_torch_with_kl_clamps(est):
    logp, old, adv, mask, ref, ent, kl = _batch(seed=2)
    with torch.no_grad():
        ref.copy_(ref - 6 * torch.rand_like(ref) * (torch.rand_like(ref) > 0.7))  # some log-ratios beyond the clamps
    results = []
    for backend in ("torch", "triton"):
        logp.grad = None
        out = ppo_policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator=est, kl_clamp=1.5,
                              log_ratio_clamp=3.0, backend=backend)
        out.loss.backward()
        results.append((out.loss.item(), logp.grad.clone()))
    (l_t, g_t), (l_k, g_k) = results
    assert l_k == pytest.approx(l_t, rel=1e-5)
    torch.testing.assert_close(g_k, g_t, atol=1e-6, rtol=1e-5)
