"""Sampler/trainer log-prob mismatch: measured every rollout (0 for identical numerics, the exact size of a
deliberate perturbation otherwise), and corrected by truncated or masked importance sampling."""

import json
import math

import pytest
import torch

from rlhf_engine.algorithms.mismatch import correction_weights, mismatch_metrics, mismatch_sums
from test_rl_stage import _config, run_rl


def _rollout_records(run, stage):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == stage and "rollout/mismatch_abs_mean" in r]


def _perturbed_sampler(monkeypatch, shift):
    """The sampler reports log-probs off by ``shift(i)`` at the i-th generated token (its tokens unchanged)."""
    import rlhf_engine.rollout.experience as experience

    real = experience.generate

    def generate(*args, **kwargs):
        gen = real(*args, **kwargs)
        gen.logprobs = [[lp + shift(i) for i, lp in enumerate(row)] for row in gen.logprobs]
        return gen

    monkeypatch.setattr(experience, "generate", generate)


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_mismatch_is_zero_for_identical_numerics_and_exact_under_a_perturbed_sampler(tmp_path, monkeypatch, name):
    """GRPO (one step per rollout: the experience pass adds the policy forward) and PPO (epochs)."""
    steps = ["trainer.max_steps=2", "algorithm.rl.epochs=1"]
    run_rl(_config(tmp_path, name, *steps))
    same = _rollout_records(tmp_path / name, name)
    assert same and all(r["rollout/mismatch_abs_max"] <= 1e-5 and abs(r["rollout/mismatch_kl"]) <= 1e-9 for r in same)
    _perturbed_sampler(monkeypatch, lambda i: 0.05 if i % 2 == 0 else -0.02)
    (tmp_path / "perturbed").mkdir()
    run_rl(_config(tmp_path / "perturbed", name, *steps))
    off = _rollout_records(tmp_path / "perturbed" / name, name)
    for r in off:  # trainer - sampler = -0.05 on even tokens, +0.02 on odd ones: means between the two
        assert 0.02 - 1e-4 < r["rollout/mismatch_abs_mean"] < 0.05 + 1e-4
        assert r["rollout/mismatch_abs_max"] == pytest.approx(0.05, abs=1e-4)
        k3 = lambda d: math.expm1(d) - d  # noqa: E731
        assert k3(0.02) - 1e-6 < r["rollout/mismatch_kl"] < k3(-0.05) + 1e-6


def test_mismatch_metrics_and_tis_mis_weights_equal_a_hand_computation():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -0.2, 0.0, 0.0]])
    sampler = torch.tensor([[-1.0, -1.1, -1.5, -3.9], [-0.4, -0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    d = [0.0, -0.9, 1.0, 0.9, -0.6, 0.0]  # trainer - sampler on the six response tokens
    sums = mismatch_sums(trainer, sampler, mask)
    m = mismatch_metrics(sums, sums["max"])
    assert m["mismatch_abs_mean"] == pytest.approx(sum(map(abs, d)) / 6)
    assert m["mismatch_abs_max"] == pytest.approx(1.0)
    assert m["mismatch_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 6)
    rho = torch.tensor([[1.0, math.exp(-0.9), math.exp(1.0), math.exp(0.9)], [math.exp(-0.6), 1.0, 0.0, 0.0]])
    w, keep = correction_weights(trainer, sampler, mask, "tis", 2.0)
    assert keep is None and torch.allclose(w, rho.clamp(max=2.0))  # truncated at C: e and e^0.9 become 2
    w, keep = correction_weights(trainer, sampler, mask, "mis", 2.0)
    want_keep = torch.tensor([[True, False, False, False], [True, True, False, False]])  # 1/2 <= rho <= 2 only
    assert torch.equal(keep, want_keep) and torch.allclose(w, rho * want_keep)
    assert correction_weights(trainer, sampler, mask, "none", 2.0) == (None, None)


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_mismatch_correction_trains_and_masked_tokens_leave_the_count(tmp_path, monkeypatch, mode):
    """A sampler off by +-0.9 nats on alternate tokens (rho = e^-0.9 or e^0.9, both outside [1/2, 2]): tis
    trains on every token with weights min(rho, 2); mis rejects them all, so no token is counted."""
    _perturbed_sampler(monkeypatch, lambda i: 0.9 if i % 2 == 0 else -0.9)
    s = run_rl(_config(tmp_path, "grpo", "trainer.max_steps=2", f"algorithm.rl.is_correction={mode}"))
    assert s["finished"]
    steps = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    if mode == "tis":
        assert all(r["targets"] > 0 and r["grad_norm"] > 0 for r in steps)
    else:
        assert all(r["targets"] == 0 and r["grad_norm"] == 0 for r in steps), steps


def _policy_logprobs(model, rollout):
    """Log-probs of the rollout's response tokens under ``model`` (a RoleModel with a policy head)."""
    from rlhf_engine.models.roles import Role

    with torch.no_grad():
        out = model(rollout.input_ids, document_ids=rollout.document_ids, targets=rollout.targets, roles=(Role.POLICY,))
    return out.logp * rollout.mask


def test_off_policy_update_uses_the_older_behaviour_logprobs(tmp_path, monkeypatch):
    """off_policy_steps=1: rollout r+1 is sampled by a copy of the policy taken when rollout r was collected
    (before any step on r). Its behaviour log-probs are that copy's, and its tis weights the ratio of the
    trainer's log-probs at the weights it is trained with to them. With one step per rollout the loss makes
    those weights from its own forward; here the experience pass is made to compute them (the test below
    shows the two equal), so that they can be read off the rollout."""
    import copy

    from rlhf_engine.rollout.experience import ExperienceMaker

    snapshots, scored = [], []
    real_snapshot, real_score = ExperienceMaker.snapshot, ExperienceMaker.score

    def snapshot(self):
        snap = real_snapshot(self)
        snapshots.append(copy.deepcopy(snap))
        return snap

    def score(self, sampled):
        rollout = real_score(self, sampled)
        if len(sampled.items) == 8 * 4:  # a training rollout (prompts_per_rollout x group), not an evaluation
            scored.append((sampled, rollout, copy.deepcopy(self.model)))
        return rollout

    monkeypatch.setattr(ExperienceMaker, "snapshot", snapshot)
    monkeypatch.setattr(ExperienceMaker, "score", score)
    monkeypatch.setattr(ExperienceMaker, "trainer_logprobs", property(lambda self: True))
    s = run_rl(_config(tmp_path, "grpo", "trainer.max_steps=3", "algorithm.rl.off_policy_steps=1",
                       "algorithm.rl.is_correction=tis", "algorithm.rl.is_threshold=1.5"))
    assert s["finished"] and len(scored) >= 3 and len(snapshots) >= 3
    for r in (1, 2):
        sampled, rollout, trainer = scored[r]
        behaviour = torch.zeros_like(rollout.old_logp)
        P = sampled.gen.prompt_length
        for b, row in enumerate(sampled.gen.logprobs):
            behaviour[b, P - 1 : P - 1 + len(row)] = torch.tensor(row)
        older = _policy_logprobs(snapshots[r - 1], rollout)  # the policy when rollout r - 1 was collected
        current = _policy_logprobs(trainer, rollout)  # the weights this rollout's one step trains
        assert (behaviour - older).abs().max() <= 1e-5  # sampled by the older policy ...
        assert (behaviour - current).abs().max() > 1e-3  # ... not the current one
        assert rollout.on_policy and (rollout.old_logp - behaviour).abs().max() <= 1e-6  # one step: old = own
        want = torch.exp(current - behaviour).clamp(max=1.5) * rollout.mask
        assert torch.allclose(rollout.is_weight, want, atol=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    waits = [r for r in rows if "rollout/generation_wait_s" in r]
    assert len(waits) == 3 and waits[0]["rollout/mismatch_abs_max"] <= 1e-5  # rollout 0: sampled by itself
    assert all(r["rollout/mismatch_abs_mean"] > 1e-3 for r in waits[1:])


def test_off_policy_run_resumes_bit_for_bit_and_refuses_without_a_correction(tmp_path):
    """A run stopped after step 2 keeps the generation of rollout 3 (sampled by weights it no longer has)."""
    off = ["algorithm.rl.off_policy_steps=1", "algorithm.rl.is_correction=mis", "algorithm.rl.is_threshold=3",
           "trainer.max_steps=4"]
    run_rl(_config(tmp_path, "grpo", *off, f"trainer.out_dir={tmp_path / 'full'}"))
    cut = [*off, f"trainer.out_dir={tmp_path / 'cut'}", "trainer.save_every=1"]
    assert not run_rl(_config(tmp_path, "grpo", *cut, "trainer.stop_after=2"))["finished"]
    assert run_rl(_config(tmp_path, "grpo", *cut))["finished"]
    losses = [[(r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text()
               .splitlines()) if "loss" in r] for d in ("full", "cut")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    with pytest.raises(ValueError, match="off_policy_steps=1 samples with the previous policy"):
        _config(tmp_path, "grpo", "algorithm.rl.off_policy_steps=1")


@pytest.mark.slow
def test_off_policy_grpo_learns_the_programmatic_reward(tmp_path):
    """20 GRPO steps one step off-policy (tis) raise the low-id reward as the on-policy run does (measured:
    0.21 -> 0.58 against 0.21 -> 0.56)."""
    on = run_rl(_config(tmp_path, "grpo"))
    (tmp_path / "off").mkdir()
    off = run_rl(_config(tmp_path / "off", "grpo", "algorithm.rl.off_policy_steps=1", "algorithm.rl.is_correction=tis"))
    gain = lambda s: s["eval_reward_final"] - s["eval_reward_initial"]  # noqa: E731
    assert gain(on) > 0.15 and gain(off) >= 0.8 * gain(on), (gain(off), gain(on))


@pytest.mark.parametrize("mode", ["none", "tis", "off_policy_tis"])
def test_mismatch_measured_in_the_loss_equals_the_experience_pass_measurement(tmp_path, monkeypatch, mode):
    """One step per rollout: the loss measures the mismatch and makes the tis weights from the training
    forward, instead of a policy forward in the experience pass. Forcing that forward back gives the same
    metrics, loss and gradient norm, also one step off-policy (the sampler one step behind, on top of the
    perturbation): the experience pass and the step run at the same weights."""
    from rlhf_engine.rollout.experience import ExperienceMaker

    _perturbed_sampler(monkeypatch, lambda i: 0.3 if i % 3 == 0 else -0.1)
    args = ["trainer.max_steps=3", f"algorithm.rl.is_correction={mode.replace('off_policy_', '')}"]
    if mode.startswith("off_policy"):
        args.append("algorithm.rl.off_policy_steps=1")
    (tmp_path / "loss").mkdir()
    run_rl(_config(tmp_path / "loss", "grpo", *args))
    monkeypatch.setattr(ExperienceMaker, "trainer_logprobs", property(lambda self: True))
    (tmp_path / "pass").mkdir()
    run_rl(_config(tmp_path / "pass", "grpo", *args))
    a, b = (_rollout_records(tmp_path / run / "grpo", "grpo") for run in ("loss", "pass"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("rollout/mismatch_abs_mean", "rollout/mismatch_abs_max", "rollout/mismatch_kl", "loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
        if mode.startswith("off_policy") and x is not a[0]:  # the older sampler: more than the perturbation
            assert x["rollout/mismatch_abs_max"] > 0.3 + 1e-3
        else:
            assert x["rollout/mismatch_abs_max"] == pytest.approx(0.3, abs=1e-4)


def test_off_policy_process_sampler_matches_the_thread_sampler(tmp_path):
    """The sampler process decodes with a shared-memory copy refreshed in place each rollout and the same
    seeded generator: at the trainer's thread count its rollouts, hence every step, equal the thread
    sampler's (rollout 0 is sampled in the trainer by both; rollouts 1-3 by the child). With
    ``rollout.decode_mode=compiled`` (the flat step through inductor, in the trainer and in the child) the
    same tokens are sampled and the metrics agree to float rounding."""
    off = ["algorithm.rl.off_policy_steps=1", "algorithm.rl.is_correction=tis", "trainer.max_steps=4"]
    runs = {}
    for mode, decode in (("thread", "eager"), ("process", "eager"), ("process", "compiled")):
        out = tmp_path / f"{mode}_{decode}"
        run_rl(_config(tmp_path, "grpo", *off, f"trainer.out_dir={out}", f"algorithm.rl.off_policy_sampler={mode}",
                       f"algorithm.rl.off_policy_sampler_threads={torch.get_num_threads()}",
                       f"rollout.decode_mode={decode}"))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode, decode] = [(r["loss"], r["grad_norm"], r.get("rollout/reward"), r.get("rollout/mismatch_abs_mean"))
                              for r in rows if "loss" in r]
    want = runs["thread", "eager"]
    assert len(want) == 4 and runs["process", "eager"] == want
    assert all(r[3] > 1e-4 for r in want[1:])  # rollouts 1-3 came from the older policy
    compiled = runs["process", "compiled"]
    assert [r[2] for r in compiled] == [r[2] for r in want]  # the same samples, hence rewards
    assert compiled == [pytest.approx(r, rel=1e-4, abs=1e-6) for r in want]


def test_off_policy_sampler_process_decodes_with_refreshed_weights_and_reports_a_dead_child():
    """The child's generation equals ``generate`` in this process at the weights of each ``submit`` (the
    shared copy is refreshed in place); it outlives the signals a launcher's process group receives, and a
    child that dies is reported, not waited on."""
    import os
    import signal

    from rlhf_engine.data.prompts import PromptItem
    from rlhf_engine.models.transformer import Transformer, TransformerConfig
    from rlhf_engine.rollout import generate
    from rlhf_engine.rollout.sampler_process import SamplerProcess

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    model = Transformer(cfg).eval()
    items = [PromptItem([5 + i, 7, 11 + 2 * i][: 1 + i % 3], "") for i in range(6)]
    kwargs = dict(max_new_tokens=8, stop_ids=[3], pad_id=0, temperature=1.0, top_k=0, top_p=0.9, record_trunk=False,
                  fuse=True)
    threads = torch.get_num_threads()
    sampler = SamplerProcess(threads=threads)
    torch.set_num_threads(threads)  # equal thread counts: equal GEMM results in both processes
    try:
        for seed in (1, 2):
            sampled = sampler.submit(model, items, kwargs, seed).result()
            want = generate(model, [p.ids for p in items], generator=torch.Generator().manual_seed(seed), **kwargs)
            assert sampled.gen.responses == want.responses and sampled.gen.logprobs == want.logprobs
            assert sampled.items == items and sampled.timings["generation_s"] > 0
            with torch.no_grad():  # the trainer's step: the next submit must decode with these weights
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        with pytest.raises(RuntimeError, match="one rollout at a time"):
            sampler.submit(model, items, kwargs, 3)
            sampler.submit(model, items, kwargs, 4)
        sampler.pending.result()
        os.kill(sampler.process.pid, signal.SIGINT)  # Ctrl-C reaches the launcher's process group: ignored
        os.kill(sampler.process.pid, signal.SIGTERM)  # as is a scheduler's SIGTERM; the trainer stops the child
        assert sampler.submit(model, items, kwargs, 6).result().gen.responses
        os.kill(sampler.process.pid, signal.SIGKILL)
        sampler.process.join()
        sampler.pending = None
        with pytest.raises(RuntimeError, match="exited with code -9"):
            sampler.submit(model, items, kwargs, 5).result()
    finally:
        sampler.close()
    assert torch.get_num_threads() == threads


def test_off_policy_sampler_process_outlives_ctrl_c_so_the_run_checkpoints_and_resumes(tmp_path):
    """Ctrl-C reaches the launcher's whole process group, the sampler child included. The child ignores
    it, so the trainer finishes its step, saves the rollout the child was decoding with the checkpoint and
    exits 130; the resumed run then equals an uninterrupted one."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from test_rl_stage import BASE

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    tests = Path(__file__).resolve().parent
    code = ("import sys, test_rl_stage; from rlhf_engine.cli import main; "  # registers the low_ids reward
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")])}

    def cli(out, *extra):
        return [sys.executable, "-c", code, "rl", "--config", str(recipe), "algorithm.name=grpo",
                "algorithm.rl.off_policy_steps=1", "algorithm.rl.is_correction=tis",
                "algorithm.rl.off_policy_sampler=process", "trainer.max_steps=4", f"trainer.out_dir={out}", *extra]

    assert subprocess.run(cli(tmp_path / "full"), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(cli(tmp_path / "cut", "trainer.save_every=1"), env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "step=2 loss=" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=300)
    err = "".join(lines) + rest
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    resumed = subprocess.run(cli(tmp_path / "cut", "trainer.save_every=1"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = [[(r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text()
               .splitlines()) if "loss" in r] for d in ("full", "cut")]
    assert len(losses[0]) == 4 and losses[0] == losses[1] and any(g > 0 for _, g in losses[0])
