"""Shared trunk with role heads: exact equality with the full SFT model for several cuts, frozen parts get
no gradients or optimizer state, cached trunk states give identical PPO losses, checkpoints and export."""

import pytest
import torch
from transformers import LlamaForCausalLM

from rlhf_engine.models import Role, RoleModel, Transformer, TransformerConfig, load_roles, save_hf_model, save_roles
from rlhf_kernels import gae, ppo_policy_loss, value_loss

CFG = TransformerConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=4, num_heads=4,
                        num_kv_heads=2, tie_word_embeddings=True)


def _sft(seed=0):
    model = Transformer(CFG)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 14), generator=g)
    docs = torch.tensor([[0] * 14, [0] * 6 + [1] * 8, [-1] * 4 + [0] * 10])
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    return ids, docs, targets


@pytest.mark.parametrize("k", [0, 1, 3])
def test_role_heads_reproduce_the_full_model_exactly(k):
    sft, rm = _sft(0), _sft(1)
    score = torch.randn(1, 48, generator=torch.Generator().manual_seed(2))
    roles = RoleModel.from_sft(sft, k, reward=rm, reward_score=score)
    ids, docs, targets = _batch()
    # The reward head sits on the shared trunk: oracle = SFT embedding and lower k layers + RM upper layers.
    hybrid = Transformer(CFG)
    def from_rm(n):  # k = 0: the reward head is the whole RM, embedding included
        return n.startswith("norm") or k == 0 or (n.startswith("layers.") and int(n.split(".")[1]) >= k)

    hybrid.load_state_dict({n: (rm if from_rm(n) else sft).state_dict()[n] for n in sft.state_dict()})
    with torch.no_grad():
        want = sft(ids, document_ids=docs, targets=targets)
        out = roles(ids, document_ids=docs, targets=targets)
        rm_hidden = hybrid(ids, document_ids=docs)
    assert torch.equal(out.logp, want.logp) and torch.equal(out.entropy, want.entropy)
    assert torch.equal(out.ref_logp, want.logp)  # the reference starts as the policy
    assert out.kl.abs().max() <= 1e-6  # KL(policy || itself)
    assert torch.equal(out.rewards, (rm_hidden @ score.T).squeeze(-1))
    assert torch.equal(out.values, out.rewards)  # the critic starts as the reward head
    assert (out.trunk_states is None) == (k == 0)


def test_trunk_and_frozen_heads_get_no_gradients_or_optimizer_state():
    roles = RoleModel.from_sft(_sft(), 2)
    opt = torch.optim.AdamW(roles.trainable_parameters(), lr=1e-3)
    ids, docs, targets = _batch()
    out = roles(ids, document_ids=docs, targets=targets, roles=[Role.POLICY, Role.REFERENCE, Role.CRITIC])
    (-(out.logp.sum()) + out.kl.sum() + out.values.pow(2).sum()).backward()
    opt.step()
    for name, p in roles.named_parameters():
        trainable = name.startswith(("heads.policy.", "heads.critic."))
        assert p.requires_grad == trainable and (p.grad is not None) == trainable, name
    held = {id(p) for p in opt.state}
    assert held == {id(p) for p in roles.trainable_parameters()}
    assert not any(id(p) in held for p in roles.trunk.parameters())


def _ppo_losses(roles, batch, cache=None):
    ids, docs, targets = batch
    out = roles(ids, document_ids=docs, targets=targets, roles=[Role.POLICY, Role.REFERENCE, Role.CRITIC],
                trunk_states=None if cache is None else cache.get("cpu"))
    mask = (targets != -100).float()
    rewards = torch.zeros_like(mask)
    rewards[:, -2] = 1.0
    adv, ret = gae(rewards - 0.05 * out.kl.detach(), out.values.detach(), mask.bool())
    pg = ppo_policy_loss(out.logp, out.logp.detach() - 0.01, adv, mask, kl=out.kl, kl_estimator="exact",
                         kl_coef=0.1, entropy=out.entropy, entropy_coef=0.01).loss
    vf = value_loss(out.values, out.values.detach() + 0.1, ret, mask).loss
    return pg + vf


def test_cached_and_recomputed_trunk_states_give_identical_ppo_losses():
    roles = RoleModel.from_sft(_sft(), 3)
    batch = _batch()
    cache = roles.encode_trunk(batch[0], document_ids=batch[1])
    recomputed, cached = _ppo_losses(roles, batch), _ppo_losses(roles, batch, cache)
    assert torch.equal(recomputed, cached)
    bf16 = roles.encode_trunk(batch[0], document_ids=batch[1], store_dtype=torch.bfloat16, offload=True)
    assert bf16.nbytes == cache.nbytes // 2 and bf16.states.device.type == "cpu"
    assert abs(_ppo_losses(roles, batch, bf16).item() - recomputed.item()) < 5e-3


def test_checkpoint_stores_trunk_once_and_reloads_identically(tmp_path):
    roles = RoleModel.from_sft(_sft(), 2)
    with torch.no_grad():
        roles.head(Role.CRITIC).score.weight.normal_()
    path = save_roles(roles, tmp_path / "roles")
    assert sorted(p.name for p in (path / "heads").iterdir()) == [f"{r.value}.safetensors" for r in sorted(Role, key=lambda r: r.value)]
    assert (path / "trunk.safetensors").exists()
    again = load_roles(path)
    ids, docs, targets = _batch()
    with torch.no_grad():
        a, b = roles(ids, document_ids=docs, targets=targets), again(ids, document_ids=docs, targets=targets)
    saved, loaded = roles.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    for name, x, y in zip(a._fields, a, b):  # outputs: equal up to BLAS paths taken for other alignments
        assert (x is None and y is None) or torch.allclose(x.float(), y.float(), rtol=1e-6, atol=1e-6), name
    assert not any(p.requires_grad for p in again.trunk.parameters())


def test_policy_exports_as_a_model_transformers_loads(tmp_path):
    roles = RoleModel.from_sft(_sft(), 2)
    with torch.no_grad():  # the policy has trained: its head differs from the SFT model's
        roles.head(Role.POLICY).lm_head.weight.add_(0.01)
    out = save_hf_model(roles.policy_model(), tmp_path / "policy")
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids, _, targets = _batch()
    with torch.no_grad():
        want = roles(ids, targets=targets, roles=[Role.POLICY]).logp
        logits = hf(ids).logits
    got = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    assert (got - want).abs().max() <= 1e-5


def _tp_roles_body():
    import torch.distributed as dist

    from rlhf_engine.parallel import ParallelDims, apply_tensor_parallel

    cfg = TransformerConfig(**{**CFG.__dict__, "vocab_size": 96})
    sft = Transformer(cfg)
    sft.reset_parameters(torch.Generator().manual_seed(0))
    score = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = RoleModel.from_sft(sft, 2, reward_score=score)
    sharded = RoleModel.from_sft(sft, 2, reward_score=score)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, pp=1, tp=dist.get_world_size(), world_size=dist.get_world_size())
    dims.check_model(cfg)
    apply_tensor_parallel(sharded, dims.build_mesh("cpu")["tp"], sequence_parallel=True)
    ids, docs, targets = _batch()
    ids = ids % 96
    targets = torch.where(targets == -100, targets, targets % 96)
    with torch.no_grad():
        a, b = plain(ids, document_ids=docs, targets=targets), sharded(ids, document_ids=docs, targets=targets)
    for name in ("logp", "entropy", "ref_logp", "kl", "values", "rewards"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() <= 1e-5, name


@pytest.mark.dist
def test_trunk_and_heads_under_tp2_equal_one_process():
    from torchrun_helper import torchrun

    torchrun(_tp_roles_body, nproc=2)


@pytest.mark.parametrize("tie,critic", [(True, True), (False, True), (True, False)])
def test_measured_sharing_equals_the_memory_of_separate_models_built_and_stepped(tie, critic):
    """``measure_sharing``'s memory against an oracle that builds both layouts and counts their tensors:
    k = 0 (whole models) against a trunk of 2, each after one AdamW step of the trainable roles (policy
    and critic; GRPO's roles have no critic)."""
    from rlhf_engine.models.roles import measure_sharing

    cfg = TransformerConfig(**{**CFG.__dict__, "tie_word_embeddings": tie})
    sft, rm = Transformer(cfg), Transformer(cfg)
    sft.reset_parameters(torch.Generator().manual_seed(0))
    rm.reset_parameters(torch.Generator().manual_seed(1))
    ids, docs, targets = _batch()

    roles = [Role.POLICY, Role.REFERENCE, Role.REWARD] + ([Role.CRITIC] if critic else [])
    trained = [Role.POLICY] + ([Role.CRITIC] if critic else [])

    def held(model):  # MiB of weights, and of gradients + AdamW moments after one step
        opt = torch.optim.AdamW(model.trainable_parameters(trained), lr=1e-3)
        out = model(ids, document_ids=docs, targets=targets, roles=trained)
        (out.logp.sum() + (out.values.sum() if critic else 0)).backward()
        opt.step()
        mib = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
        state = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
        return mib(model.parameters()), mib([p.grad for p in model.parameters() if p.grad is not None]) + mib(state)

    shared = RoleModel.from_sft(sft, 2, reward=rm, roles=roles)
    m = measure_sharing(shared, ids, document_ids=docs, targets=targets, repeats=1)
    weights, train_state = held(shared)
    weights_separate, train_state_separate = held(RoleModel.from_sft(sft, 0, reward=rm, roles=roles))
    assert m["weights_mb"] == pytest.approx(weights, abs=0.006)  # rounded to 0.01 MiB
    assert m["weights_mb_separate"] == pytest.approx(weights_separate, abs=0.006)
    assert m["train_state_mb"] == pytest.approx(train_state, abs=0.006)
    assert m["train_state_mb_separate"] == pytest.approx(train_state_separate, abs=0.006)
    assert {"experience_ms", "experience_ms_separate"} <= set(m) and (m["trunk_layers"], m["layers"]) == (2, 4)
