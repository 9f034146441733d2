"""Pipeline parallelism in every training stage, against one process.

Under torchrun (gloo, fp32), for SFT (tied embeddings, PPO-ptx-style LM loss), the ranking RM, the
Sparrow preference model, the rule model, DPO (policy and reference heads) and the RL update (policy and
critic heads from cached trunk states, plus a PPO-ptx pass): the engine's own layout (``Runtime.parallelize``
with pp > 1, alone and with TP + SP and FSDP2) and the trainer's forward-backward give, over 3 optimizer
steps, the losses, stats, every gradient, the clipped global norm and the final weights of a plain
single-process run of the same objective over the same micro-batches (the oracle), to 1e-5. GPipe,
1F1B and interleaved 1F1B are each covered; the schedules are checked for deadlocks without processes.
"""

import copy
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from torchrun_helper import torchrun

ARCH = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
            max_position_embeddings=64)
SEQ = 16


def _rows(g, n, vocab=ARCH["vocab_size"]):
    return [torch.randint(3, vocab, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _micro_batches(kind, count, seed):
    """``count`` micro-batches of ``kind`` (different lengths, packed rows, padding)."""
    from rlhf_engine.data.packing import PackedBatch
    from rlhf_engine.data.preference import RuleLabels, choice_batch, pair_batch, rule_batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        if kind == "sft":
            ids = torch.randint(0, ARCH["vocab_size"], (2, SEQ), generator=g)
            docs = torch.tensor([[0] * 9 + [1] * 7, [0] * 12 + [-1] * 4])
            labels = torch.roll(ids, -1, dims=1)
            labels[:, -1] = -100
            labels[1, 11:] = -100
            labels[0, :3] = -100  # prompt tokens carry no loss
            out.append(PackedBatch(ids, labels, docs))
        elif kind in ("rm", "dpo"):
            prompts = []
            for K in (4, 3):  # mixed K: InstructGPT's per-prompt 1 / C(K, 2) weighting
                responses = [(r, 3) for r in _rows(g, K)]
                prompts.append((responses, [(w, lo) for w in range(K) for lo in range(w + 1, K)]))
            out.append(pair_batch(prompts, seq_len=SEQ * 2, pad_id=0))
        elif kind == "choice":
            out.append(choice_batch([[(r, 3) for r in _rows(g, 3)], [(r, 3) for r in _rows(g, 2)]], [1, 0],
                                    seq_len=SEQ * 2, pad_id=0))
        elif kind == "rules":
            flips = torch.randint(0, 3, (3, 2), generator=g).tolist()  # 2: no label for that rule
            labels = [RuleLabels((), tuple((rule, bool(f)) for rule, f in zip("ab", row) if f < 2)) for row in flips]
            out.append(rule_batch(_rows(g, 3), labels, ["a", "b"], seq_len=SEQ * 2, pad_id=0))
    return out


def _experience(model, count, seed):
    """RL update micro-batches: rollouts with cached trunk states, advantages, values, and PPO-ptx rows."""
    from rlhf_engine.rollout.experience import ExperienceBatch

    g = torch.Generator().manual_seed(seed)
    ptx = _micro_batches("sft", count, seed + 1)
    out = []
    for i in range(count):
        ids = torch.randint(0, ARCH["vocab_size"], (3, SEQ), generator=g)
        docs = torch.zeros(3, SEQ, dtype=torch.long)
        docs[2, :4] = -1  # left padding
        targets = torch.roll(ids, -1, dims=1)
        mask = torch.zeros(3, SEQ, dtype=torch.bool)
        mask[:, 6:-1] = True
        targets[~mask] = -100
        with torch.no_grad():
            states = model.encode_trunk(ids, document_ids=docs).states
            out_ = model(ids, document_ids=docs, targets=targets, trunk_states=states)
        noise = lambda: 0.05 * torch.randn(3, SEQ, generator=g)  # noqa: E731
        out.append(ExperienceBatch(ids, docs, targets, mask, (out_.logp + noise()) * mask, (out_.ref_logp + noise()) * mask,
                                   torch.randn(3, SEQ, generator=g) * mask, out_.values + noise(),
                                   out_.values + 0.5 * torch.randn(3, SEQ, generator=g), states, kl_coef=0.05, ptx=ptx[i]))
    return out


def _case(kind, layers=None, trunk=2):
    """(model, objective, micro-batch maker, extra parallel keys) of one training stage."""
    from rlhf_engine.algorithms.dpo import dpo_objective
    from rlhf_engine.algorithms.reward import RULES, choice_objective, ranking_objective
    from rlhf_engine.algorithms.rl import resolve, rl_objective
    from rlhf_engine.algorithms.sft import SFT
    from rlhf_engine.config import RLConfig
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.models.roles import Role, RoleModel
    from rlhf_engine.models.score import ScoreModel

    layers = layers or {"sft": 4, "rm": 3, "choice": 3, "rules": 3, "dpo": 3, "rl": 4}[kind]
    lm = Transformer(TransformerConfig(**ARCH, num_layers=layers, tie_word_embeddings=kind == "sft"))
    lm.reset_parameters(torch.Generator().manual_seed(0))
    if kind == "sft":
        return lm, SFT, lambda n, seed, oracle: _micro_batches("sft", n, seed), {}
    if kind in ("rm", "choice", "rules"):
        model = ScoreModel.from_lm(lm, 1, 2 if kind == "rules" else 1, generator=torch.Generator().manual_seed(1))
        objective = {"rm": ranking_objective("prompt"), "choice": choice_objective(0.5, 0.01), "rules": RULES}[kind]
        return model, objective, lambda n, seed, oracle: _micro_batches(kind, n, seed), {}
    if kind == "dpo":
        model = RoleModel.from_sft(lm, 1, roles=(Role.POLICY, Role.REFERENCE))
        return model, dpo_objective("sigmoid", 0.1), lambda n, seed, oracle: _micro_batches("dpo", n, seed), {}
    model = RoleModel.from_sft(lm, trunk)
    with torch.no_grad():  # reward and critic heads of small scores (values ~ 1: a well-conditioned critic)
        for role in (Role.REWARD, Role.CRITIC):
            model.head(role).score.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    settings = resolve("ppo", RLConfig(ptx_coef=0.5), max_new_tokens=8, temperature=0.9)
    # the first stage holds the trunk only: a pass from cached trunk states skips it
    return model, rl_objective(settings), lambda n, seed, oracle: _experience(oracle, n, seed), {"pp_first_stage_layers": 2}


def _config(model=None, parallel=None, trainer=None, optim=None, dtype="float32"):
    from rlhf_engine.config import validate

    return validate({"model": model or {"architecture": {**ARCH, "num_layers": 3}}, "parallel": parallel or {},
                     "precision": {"dtype": dtype},
                     "trainer": {"max_steps": 3, "micro_batch_size": 1, **(trainer or {})}, "data": {"seq_len": SEQ},
                     "optim": {"lr": 1e-2, **(optim or {})}}, "test")


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _layout_body():
    from rlhf_engine.data.streams import StepTotals
    from rlhf_engine.parallel.grads import grad_of
    from rlhf_engine.parallel.runtime import init_runtime
    from rlhf_engine.trainer import build_optimizer, clip_model_grads, forward_backward

    tp, pp, dp, chunks = (int(os.environ[k]) for k in ("TP", "PP", "DP", "CHUNKS"))
    schedule, M, dtype = os.environ["SCHEDULE"], int(os.environ["MICRO"]), os.environ.get("DTYPE", "float32")
    # bf16 without FSDP: bf16 weights, fp32 masters and fp32 main_grads (optimizer.py, parallel/grads.py), against
    # one bf16 process with the same optimizer; the pipeline sums a tied weight's two bf16 gradients in fp32
    # where one process sums them in bf16, so gradients agree to bf16 rounding
    rel = 1e-5 if dtype == "float32" else 1e-2
    for kind in os.environ["KINDS"].split(","):
        torch.manual_seed(0)
        model, objective, make, extra = _case(kind, 8 if chunks > 1 else None)  # every virtual stage a layer
        oracle = copy.deepcopy(model).to(getattr(torch, dtype))
        cfg = _config({"architecture": {**ARCH, "num_layers": model.config.num_layers}},
                      {"tp": tp, "pp": pp, "dp_shard": dp, "sequence_parallel": tp > 1, "pp_schedule": schedule,
                       "pp_stages_per_rank": chunks, **extra},
                      {"grad_accum_steps": M}, {"eps": 1e-3, "grad_clip": 0.05, "warmup_steps": 0}, dtype)
        rt = init_runtime(cfg)
        model = rt.parallelize(model, cfg)
        opt, opt_ref = build_optimizer(model, cfg.optim), build_optimizer(oracle, cfg.optim)
        want_params = dict(oracle.named_parameters())
        for step in range(3):
            every = make(M * dp, 100 * step + 7, oracle)  # the global step: dp ranks x M micro-batches
            totals = StepTotals.of(every)
            mine = every[rt.dp_rank * M:(rt.dp_rank + 1) * M]
            if kind == "rl" and tp > 1:  # sequence parallel: each tensor rank caches its share of the trunk states
                shard = rt.mesh["tp"].get_local_rank()
                mine = [dataclasses.replace(b, trunk_states=b.trunk_states.chunk(tp, dim=1)[shard]) for b in mine]
            if step == 0:  # evaluation through the pipeline, forward only
                with torch.no_grad():
                    unit = StepTotals.unit(totals)
                    got_eval, _ = forward_backward(model, objective, mine, unit, train=False)
                    want_eval = sum(float(objective(oracle, b, unit)[0]) for b in every)
                got_eval = rt.sum_over_dp({"v": got_eval})["v"]
                assert abs(got_eval - want_eval) <= rel * max(1, abs(want_eval)), (kind, got_eval, want_eval)
            loss, stats = forward_backward(model, objective, mine, totals, train=True, loss_scale=rt.loss_scale)
            got = rt.sum_over_dp({"loss": loss, **stats})
            want_loss, want_stats = 0.0, {}
            for b in every:
                value, st = objective(oracle, b, totals)
                value.backward()
                want_loss += float(value)
                for k, v in st.items():
                    want_stats[k] = want_stats.get(k, 0.0) + v
            assert abs(got["loss"] - want_loss) <= rel * max(1, abs(want_loss)), (kind, step, got["loss"], want_loss)
            for k, v in want_stats.items():
                # clip fractions count tokens past a threshold (summed as counts here): a token at the
                # threshold may fall either side between layouts whose weights agree to 1e-5
                tol = 1.0 + 1e-4 * abs(v) if k.endswith("clip_fraction") else max(1e-4, rel) * max(1, abs(v))
                assert abs(got[k] - v) <= tol, (kind, step, k, got[k], v)
            with_grad = set()
            for name, p in model.named_parameters():
                want = grad_of(want_params[name])
                if grad_of(p) is None:
                    assert want is None or not want.any(), (kind, step, name, "no gradient under pp")
                    continue
                with_grad.add(name)
                if dtype != "float32":
                    assert p.grad is None and grad_of(p).dtype == torch.float32, (kind, name)  # fp32 main_grad
                diff = (_full(grad_of(p)).float() - want.float()).abs().max().item()
                assert diff <= rel * max(1.0, want.abs().max().item()), (kind, step, name, diff, want.abs().max().item())
            every_rank = [None] * dist.get_world_size()
            dist.all_gather_object(every_rank, with_grad)
            assert set().union(*every_rank) == {n for n, p in want_params.items() if grad_of(p) is not None}, kind
            norm, want_norm = clip_model_grads(model, cfg.optim.grad_clip), clip_model_grads(oracle, cfg.optim.grad_clip)
            assert abs(norm - want_norm) <= rel * max(1, want_norm), (kind, step, norm, want_norm)
            assert want_norm > cfg.optim.grad_clip  # clipping is exercised
            opt.step(), opt_ref.step()
            opt.zero_grad(set_to_none=True), opt_ref.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            diff = (_full(p.detach()).float() - want_params[name].detach().float()).abs().max().item()
            assert diff <= (1e-5 if dtype == "float32" else 1e-2), (kind, "final weights", name, diff)


ALL = "rl,sft,rm,choice,rules,dpo"
LAYOUTS = {  # name: (nproc, TP, PP, DP, stages per rank, schedule, micro-batches, stages checked)
    "pp2_1f1b": (2, 1, 2, 1, 1, "1f1b", 3, ALL),
    "pp2_gpipe": (2, 1, 2, 1, 1, "gpipe", 2, "sft,rl"),
    "pp2_interleaved": (2, 1, 2, 1, 2, "interleaved_1f1b", 4, "sft,dpo"),
    "tp2_pp2_sp": (4, 2, 2, 1, 1, "1f1b", 2, "sft,rm,dpo,rl"),
    "pp2_fsdp2": (4, 1, 2, 2, 1, "1f1b", 2, "sft,rm,dpo,rl"),
    "tp2_pp2_fsdp2_sp_interleaved": (8, 2, 2, 2, 2, "interleaved_1f1b", 2, "sft,dpo,rl"),
    "pp2_1f1b_bf16": (2, 1, 2, 1, 1, "1f1b", 3, "sft,dpo"),  # bf16 weights: fp32 masters and main_grads
    "tp2_pp2_sp_bf16": (4, 2, 2, 1, 1, "1f1b", 2, "sft"),  # the same on DTensor shards, a tied weight's too
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow) if LAYOUTS[name][0] == 8 else name
                                    for name in LAYOUTS])  # 8 ranks on 2 cores: the full suite only
def test_every_stage_under_pipeline_parallelism_matches_one_process(layout):
    nproc, tp, pp, dp, chunks, schedule, micro, kinds = LAYOUTS[layout]
    torchrun(_layout_body, nproc=nproc, timeout=600, env={
        "TP": str(tp), "PP": str(pp), "DP": str(dp), "CHUNKS": str(chunks), "SCHEDULE": schedule,
        "MICRO": str(micro), "KINDS": kinds, "DTYPE": "bfloat16" if layout.endswith("_bf16") else "float32"})


# ---------------------------------------------------------------------------------------------- no processes


@pytest.mark.parametrize("schedule,chunks", [("gpipe", 1), ("gpipe", 2), ("1f1b", 1), ("interleaved_1f1b", 2),
                                             ("interleaved_1f1b", 3)])
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_schedules_run_every_action_once_without_deadlock(schedule, chunks, pp):
    from rlhf_engine.parallel.schedules import simulate

    for M in (pp, 2 * pp, 3 * pp) if schedule == "interleaved_1f1b" else (1, 2, pp + 1, 2 * pp):
        simulate(schedule, pp=pp, chunks=chunks, microbatches=M)


def test_1f1b_keeps_at_most_pp_micro_batches_in_flight_and_gpipe_keeps_all():
    from rlhf_engine.parallel.schedules import schedule_actions

    def peak(actions):
        live = top = 0
        for a in actions:
            live += 1 if a.kind == "F" else -1
            top = max(top, live)
        return top

    for r in range(4):
        assert peak(schedule_actions("1f1b", rank=r, pp=4, chunks=1, microbatches=8)) == 4 - r
        assert peak(schedule_actions("gpipe", rank=r, pp=4, chunks=1, microbatches=8)) == 8


def test_layouts_that_cannot_run_are_refused_before_anything_is_built():
    from rlhf_engine.parallel.dims import LayoutError, ParallelDims
    from rlhf_engine.parallel.runtime import check_layout

    def refuse(parallel, trainer=None, layers=3):
        cfg = _config({"architecture": {**ARCH, "num_layers": layers}}, parallel, trainer)
        with pytest.raises(LayoutError) as err:
            check_layout(cfg, ParallelDims.from_config(cfg.parallel, 4))
        return str(err.value)

    msg = refuse({"pp": 4, "dp_shard": 1})
    assert "num_layers=3" in msg and "4 pipeline stages" in msg
    msg = refuse({"pp": 2, "dp_shard": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2},
                 {"grad_accum_steps": 3}, layers=8)
    assert "3 micro-batches" in msg and "pp=2" in msg and "grad_accum_steps" in msg
    msg = refuse({"pp": 2, "dp_shard": 2, "pp_stages_per_rank": 2, "pp_schedule": "interleaved_1f1b"},
                 {"grad_accum_steps": 2}, layers=3)
    assert "fewer than the 4 pipeline stages" in msg


def test_balanced_split_follows_the_cost_rule():
    from rlhf_engine.config.model import TransformerConfig
    from rlhf_engine.parallel.dims import LayoutError
    from rlhf_engine.parallel.stage_split import Head, balanced_split, layer_costs, layer_flops, stage_costs

    cfg = TransformerConfig(**{**ARCH, "num_layers": 8})
    f = layer_flops(cfg, SEQ)
    roles = [Head("lm", True), Head("lm", False), Head("scalar", True), Head("scalar", False)]
    costs, output = layer_costs(cfg, trunk_layers=6, heads=roles, seq_len=SEQ)
    assert costs[:6] == [f] * 6 and costs[6:] == [8 * f] * 2  # frozen trunk 1x, four heads 3+1+3+1
    split = balanced_split(costs, 2, output_cost=output)
    assert split == [(0, 7), (7, 8)]  # the trunk stage takes many more layers
    got = stage_costs(split, costs, output)
    for lo in range(1, 8):  # no other contiguous split has a smaller maximum
        assert max(got) <= max(stage_costs([(0, lo), (lo, 8)], costs, output)) + 1e-6
    uniform, _ = layer_costs(TransformerConfig(**{**ARCH, "num_layers": 3}), trunk_layers=0, heads=[Head("lm", True)],
                             seq_len=SEQ)
    assert balanced_split(uniform, 2) == [(0, 2), (2, 3)]  # 3 layers on 2 stages: uneven
    assert balanced_split(costs, 3, first=1, last=2) == [(0, 1), (1, 6), (6, 8)]
    with pytest.raises(LayoutError, match="leave 0 layers for 1 middle stages"):
        balanced_split(costs, 3, first=4, last=4)


# ---------------------------------------------------------------------------------------------- checkpoints


def _roles_run(pp, out, *, save_after=None, load=None):
    """DPO on a RoleModel (trunk 1 of 4 layers) at pp = ``pp``: load a checkpoint if given, train the
    steps after it, save after ``save_after`` steps; returns the full state after the last step (rank 0)."""
    from rlhf_engine.algorithms.dpo import dpo_objective
    from rlhf_engine.data.streams import StepTotals
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.models.roles import Role, RoleModel
    from rlhf_engine.parallel.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
    from rlhf_engine.parallel.runtime import init_runtime
    from rlhf_engine.trainer import build_optimizer, build_scheduler, train_step

    lm = Transformer(TransformerConfig(**ARCH, num_layers=4))
    lm.reset_parameters(torch.Generator().manual_seed(0 if load is None else 5))  # a load must overwrite it
    cfg = _config({"architecture": {**ARCH, "num_layers": 4}, "trunk_layers": 1}, {"pp": pp},
                  {"grad_accum_steps": 2}, {"eps": 1e-3, "warmup_steps": 0, "schedule": "constant"})
    rt = init_runtime(cfg)
    model = rt.parallelize(RoleModel.from_sft(lm, 1, roles=(Role.POLICY, Role.REFERENCE)), cfg)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    first = 0
    if load is not None:
        first = load_checkpoint(load, model, opt)["step"]  # (a constant learning rate: no schedule to restore)
    objective = dpo_objective("sigmoid", 0.1)
    for step in range(first, 3):
        batches = _micro_batches("dpo", 2, 300 + step)
        train_step(model, opt, sched, batches, objective, 1.0, totals=StepTotals.of(batches))
        if step + 1 == save_after:
            save_checkpoint(out, step + 1, model, opt)
    return full_state_dict(model)


def _pp2_roles_body():
    out = os.environ["OUT"]
    if os.environ["MODE"] == "save":
        state = _roles_run(2, out + "/pp2", save_after=1)
    else:
        from rlhf_engine.parallel.checkpoint import latest_checkpoint

        state = _roles_run(2, None, load=latest_checkpoint(out + "/pp1"))
    if dist.get_rank() == 0:
        torch.save(state, out + f"/final_pp2_{os.environ['MODE']}.pt")


@pytest.mark.dist
def test_role_model_checkpoints_move_between_pp2_and_pp1(tmp_path):
    """Model and optimizer state saved at pp=2 resume at pp=1 and the reverse: the remaining steps land on
    the weights of a run that never stopped."""
    from rlhf_engine.parallel.checkpoint import latest_checkpoint

    straight = _roles_run(1, str(tmp_path / "pp1"), save_after=1)  # one process, saves after step 1
    torchrun(_pp2_roles_body, nproc=2, env={"OUT": str(tmp_path), "MODE": "save"})
    pp2_straight = torch.load(tmp_path / "final_pp2_save.pt")
    torchrun(_pp2_roles_body, nproc=2, env={"OUT": str(tmp_path), "MODE": "load"})  # pp1 -> pp2
    pp1_to_pp2 = torch.load(tmp_path / "final_pp2_load.pt")
    pp2_to_pp1 = _roles_run(1, None, load=latest_checkpoint(tmp_path / "pp2"))
    assert set(straight) == set(pp2_straight) == set(pp1_to_pp2) == set(pp2_to_pp1)
    for name, want in straight.items():
        for got in (pp2_straight, pp1_to_pp2, pp2_to_pp1):
            assert (got[name] - want).abs().max() <= 1e-5, name
    assert any((straight[n] != _roles_initial()[n]).any() for n in straight if ".policy." in n)  # it trained


def _roles_initial():
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.models.roles import Role, RoleModel

    lm = Transformer(TransformerConfig(**ARCH, num_layers=4))
    lm.reset_parameters(torch.Generator().manual_seed(0))
    return RoleModel.from_sft(lm, 1, roles=(Role.POLICY, Role.REFERENCE)).state_dict()
