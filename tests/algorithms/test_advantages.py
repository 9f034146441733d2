"""Advantage estimators, reward shaping and the KL controller against hand computations; the GRPO loss
(our objective on a real role model) against TRL's own GRPO loss code."""

import math

import pytest
import torch
from rlhf_kernels import gae

from rlhf_engine.algorithms.advantages import (
    KLController,
    discounted_returns,
    group_advantages,
    last_token_mask,
    masked_whiten,
    nstep_advantages,
    rloo_advantages,
    shaped_rewards,
)
from rlhf_engine.algorithms.rl import advantages, resolve, rl_objective, step_weights
from rlhf_engine.data.streams import StepTotals
from rlhf_engine.config import RLConfig

# two left-padded rows: response tokens at positions 1..3 (row 0) and 2..3 (row 1)
MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)


def test_shaped_rewards_put_the_score_on_the_last_token_and_kl_on_every_token():
    kl = torch.tensor([[9.0, 0.1, 0.2, 0.3], [9.0, 9.0, 0.4, 0.5]])
    r = shaped_rewards(torch.tensor([1.0, -2.0]), kl, MASK, kl_coef=0.5)
    expected = torch.tensor([[0.0, -0.05, -0.1, -0.15 + 1.0], [0.0, 0.0, -0.2, -0.25 - 2.0]])
    torch.testing.assert_close(r, expected)
    assert last_token_mask(MASK).tolist() == [[False, False, False, True], [False, False, False, True]]


def test_group_advantages_are_grpo_and_dr_grpo():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    adv = group_advantages(s, 4)
    g1, g2 = s[:4], s[4:]
    expected = torch.cat([(g1 - g1.mean()) / (g1.std() + 1e-4), (g2 - g2.mean()) / (g2.std() + 1e-4)])
    torch.testing.assert_close(adv, expected)
    assert adv[:4].tolist() == pytest.approx([(x - 3.0) / (math.sqrt(14 / 3) + 1e-4) for x in (1, 2, 3, 6)], rel=1e-6)
    torch.testing.assert_close(group_advantages(s, 4, scale=False), torch.tensor([-2.0, -1, 0, 3, -1, -1, -1, 3]))
    # a group whose members all scored the same carries no signal
    assert group_advantages(torch.ones(4), 4).abs().max() == 0


def test_rloo_baseline_leaves_one_out():
    s = torch.tensor([1.0, 2.0, 6.0])
    # 1 - (2 + 6)/2 = -3,  2 - (1 + 6)/2 = -1.5,  6 - (1 + 2)/2 = 4.5
    torch.testing.assert_close(rloo_advantages(s, 3), torch.tensor([-3.0, -1.5, 4.5]))
    # RLOO equals G/(G-1) times the mean-centred score
    s = torch.randn(12)
    torch.testing.assert_close(rloo_advantages(s, 4), group_advantages(s, 4, scale=False) * 4 / 3)


def test_discounted_returns_skip_masked_positions():
    r = torch.tensor([[5.0, 1.0, 2.0, 3.0], [7.0, 7.0, 1.0, 1.0]])
    g = discounted_returns(r, MASK, gamma=0.5)
    # row 0: G3 = 3, G2 = 2 + 1.5 = 3.5, G1 = 1 + 1.75 = 2.75; row 1: G3 = 1, G2 = 1.5
    torch.testing.assert_close(g, torch.tensor([[0.0, 2.75, 3.5, 3.0], [0.0, 0.0, 1.5, 1.0]]))


def test_nstep_advantages_bootstrap_from_the_critic():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    v = torch.tensor([[0.0, 10.0, 20.0, 30.0]])
    m = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    adv, ret = nstep_advantages(r, v, m, gamma=0.9, n=1)
    # n = 1: R_t = r_t + 0.9 V_{t+1}; the last token has no successor (V = 0)
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1 + 18.0, 2 + 27.0, 3.0]]))
    torch.testing.assert_close(adv, ret - v * m)
    _, ret2 = nstep_advantages(r, v, m, gamma=0.9, n=2)
    torch.testing.assert_close(ret2, torch.tensor([[0.0, 1 + 0.9 * 2 + 0.81 * 30, 2 + 0.9 * 3, 3.0]]))
    # n >= length: the Monte-Carlo return, which GAE with lambda = 1 also gives
    a_mc, _ = nstep_advantages(r, v, m, gamma=0.9, n=99)
    a_gae, _ = gae(r, v, m, gamma=0.9, lam=1.0, backend="torch")
    torch.testing.assert_close(a_mc, a_gae)


def test_masked_whiten_uses_only_masked_entries_and_the_reduced_statistics():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0], [-50.0, 7.0, 4.0, 5.0]])
    w = masked_whiten(x, MASK)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (vals - vals.mean()) / vals.std()
    assert w[MASK].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert w[~MASK].abs().max() == 0
    # two "ranks" holding halves of the data whiten exactly as one process over all of it
    halves = [(x[:1], MASK[:1]), (x[1:], MASK[1:])]
    total = sum(torch.stack([m.float().sum(), (a * m).sum(), (a * a * m).sum()]).double() for a, m in halves)
    merged = torch.cat([masked_whiten(a, m, reduce=lambda _: total) for a, m in halves])
    torch.testing.assert_close(merged, w)


def test_kl_controller_follows_ziegler():
    c = KLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 100)  # error = clip(0.5, -0.2, 0.2) = 0.2 -> beta *= 1 + 0.2 * 100 / 10000
    assert c.value == pytest.approx(0.1 * 1.002)
    c.update(5.4, 500)  # error = -0.1
    assert c.value == pytest.approx(0.1 * 1.002 * (1 - 0.1 * 0.05))
    fixed = KLController(0.1)
    assert fixed.update(100.0, 1000) == 0.1


def test_ppo_advantages_are_whitened_gae_of_the_shaped_rewards():
    s = resolve("ppo", RLConfig(gamma=0.9, lam=0.8), max_new_tokens=3)
    scores = torch.tensor([1.0, -1.0])
    kl = torch.rand(2, 4)
    values = torch.randn(2, 4)
    adv, ret = advantages(s, scores, kl, MASK, values, 0.05, lambda t: t)
    raw, expected_ret = gae(shaped_rewards(scores, kl, MASK, 0.05), values, MASK, 0.9, 0.8, backend="torch")
    torch.testing.assert_close(ret, expected_ret)
    torch.testing.assert_close(adv, masked_whiten(raw, MASK))


def test_rloo_puts_the_summed_kl_into_the_sequence_reward():
    s = resolve("rloo", RLConfig(group=2), max_new_tokens=3)
    kl = torch.tensor([[0.0, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5]])
    adv, ret = advantages(s, torch.tensor([1.0, 1.0]), kl, MASK, None, 0.1, lambda t: t)
    # penalised scores 1 - 0.03 and 1 - 0.1; leave-one-out with G = 2 is the difference
    assert ret is None
    assert adv[0, 1:].tolist() == pytest.approx([0.07] * 3, abs=1e-6)
    assert adv[1, 2:].tolist() == pytest.approx([-0.07] * 2, abs=1e-6)


# ---------------------------------------------------------------------------------------------- TRL's GRPO loss


def _role_model():
    from rlhf_engine.models.roles import Role, RoleModel
    from rlhf_engine.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    sft = Transformer(cfg)
    sft.reset_parameters(torch.Generator().manual_seed(0))
    return RoleModel.from_sft(sft, 1, roles=(Role.POLICY, Role.REFERENCE))


@pytest.mark.parametrize("loss_type,dr_grpo", [("grpo", False), ("bnpo", False), ("dr_grpo", True)])
def test_grpo_objective_equals_trl_grpo_loss(loss_type, dr_grpo):
    from rlhf_engine.rollout.experience import ExperienceBatch

    from trl_oracle import trl_grpo_loss

    torch.manual_seed(0)
    model = _role_model()
    B, P, T = 6, 3, 5
    ids = torch.randint(0, 64, (B, P + T))
    docs = torch.zeros(B, P + T, dtype=torch.long)
    lengths = [5, 3, 4, 5, 1, 2]  # responses end early: padding after them
    targets = torch.full((B, P + T), -100)
    for b, n in enumerate(lengths):
        docs[b, P + n :] = -1
        targets[b, P - 1 : P - 1 + n] = ids[b, P : P + n]
    mask = targets.ne(-100)
    with torch.no_grad():
        out = model(ids, document_ids=docs, targets=targets)
    old = (out.logp + 0.3 * torch.randn(B, P + T)) * mask  # off-policy: ratios away from 1, some clipped
    ref = out.ref_logp * mask + 0.2 * torch.randn(B, P + T) * mask
    seq_adv = torch.randn(B)
    agg = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "token_sum_norm"}[loss_type]
    s = resolve("grpo", RLConfig(group=2, kl_coef=0.04, dr_grpo=dr_grpo, aggregation=agg), max_new_tokens=T)
    batch = ExperienceBatch(ids, docs, targets, mask, old, ref, seq_adv[:, None] * mask, None, None, None, kl_coef=0.04)
    ours, _ = rl_objective(s)(model, batch, StepTotals.of([batch]))
    ours.backward()
    ours_grad = model.head(next(iter(s.train_roles))).lm_head.weight.grad.clone()
    model.zero_grad()

    out = model(ids, document_ids=docs, targets=targets, roles=s.train_roles)
    window = slice(P - 1, P - 1 + T)  # completion positions, TRL's (B, T) layout
    theirs = trl_grpo_loss(out.logp[:, window], old[:, window], ref[:, window], seq_adv, mask[:, window],
                           beta=0.04, loss_type=loss_type, max_completion_length=T)
    theirs.backward()
    their_grad = model.head(next(iter(s.train_roles))).lm_head.weight.grad
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-7)
    assert ours_grad.abs().sum() > 0


def test_step_weights_normalise_by_step_totals():
    m = MASK.float()
    totals = lambda tokens: StepTotals({"response_tokens": tokens, "sequences": 4.0})  # noqa: E731
    w = step_weights(MASK, "seq_mean_token_mean", totals(5.0), 3)
    # two local sequences of a step with 4: each row's tokens share 1 / (len * 4)
    torch.testing.assert_close(w, m / torch.tensor([[3.0], [2.0]]) / 4)
    torch.testing.assert_close(step_weights(MASK, "token_mean", totals(10.0), 3), m / 10)
    torch.testing.assert_close(step_weights(MASK, "token_sum_norm", totals(10.0), 3), m / 12)
