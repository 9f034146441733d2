"""Benchmark: shared frozen trunk vs four separate models for PPO's four roles, side by side.

    python benchmarks/bench_roles.py [--trunk-fraction 0.8] [--layers 10] [--hidden 256]

Variants: ``separate`` (trunk_layers = 0: policy, reference, critic and reward are whole models),
``shared_trunk`` (the lower trunk_fraction of the layers frozen and shared; PPO epochs reuse the cached
trunk states), ``shared_trunk_recompute`` (the same model, rerunning the trunk every minibatch), and
``separate_lora`` / ``shared_trunk_lora`` (LoRA, ``--lora-rank``, on the policy and critic heads'
attention and MLP projections; the reference is the policy with its adapters off, so it holds no weights).
Measured in one run:
- param_mb, grad_mb, optim_mb: parameters of all roles, gradients after a PPO backward, AdamW state;
- experience_ms: one experience-making forward of all four roles on the rollout batch (policy log-probs,
  exact KL to the reference, values, rewards);
- ppo_epoch_ms: one PPO epoch over the rollout batch in minibatches (policy + critic loss, backward, step;
  the KL penalty is in the reward, as in InstructGPT, so the reference is not rerun);
- peak_mem_mb: peak memory above the model's during experience making and the epoch.
Writes benchmarks/results/roles_<device>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _bench import PeakMemory, pin_malloc_threshold, write_csv

from rlhf_engine.config.model import LoRAConfig
from rlhf_engine.models import Role, RoleModel, TransformerConfig, TrunkCache
from rlhf_kernels import gae, ppo_policy_loss, value_loss

RESULTS = Path(__file__).resolve().parent / "results"
ROLES = [Role.POLICY, Role.REFERENCE, Role.CRITIC, Role.REWARD]


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def experience(model: RoleModel, ids, targets):
    with torch.no_grad():
        return model(ids, targets=targets, roles=ROLES)


def ppo_epoch(model: RoleModel, opt, ids, targets, rollout, cache, minibatch: int) -> None:
    """InstructGPT's PPO: the per-token KL penalty (k1, from experience making) is in the reward, so an
    epoch runs only the trainable policy and critic heads."""
    mask = (targets != -100).float()
    rewards = -0.05 * (rollout.logp - rollout.ref_logp) * mask
    rewards[:, -2] += rollout.rewards[:, -2]
    adv, ret = gae(rewards, rollout.values, mask.bool())
    for lo in range(0, ids.shape[0], minibatch):
        rows = slice(lo, lo + minibatch)
        states = cache.get(ids.device, rows) if cache is not None else None
        out = model(ids[rows], targets=targets[rows], roles=[Role.POLICY, Role.CRITIC], trunk_states=states)
        loss = ppo_policy_loss(out.logp, rollout.logp[rows], adv[rows], mask[rows]).loss + value_loss(
            out.values, rollout.values[rows], ret[rows], mask[rows]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradient buffers: grad_mb measures them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trunk-fraction", type=float, default=0.8)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        pin_malloc_threshold()
    cfg = TransformerConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                            num_layers=args.layers, num_heads=max(1, args.hidden // 64), tie_word_embeddings=True)
    k = round(args.trunk_fraction * args.layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    targets = torch.roll(ids, -1, 1)
    targets[:, : args.seq // 4] = -100  # the prompt
    targets[:, -1] = -100
    rows = []
    lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    for variant, trunk_layers, cached, adapters in (("separate", 0, False, None), ("shared_trunk", k, True, None),
                                                    ("shared_trunk_recompute", k, False, None),
                                                    ("separate_lora", 0, False, lora), ("shared_trunk_lora", k, True, lora)):
        torch.manual_seed(0)
        model = RoleModel(cfg, trunk_layers, lora=adapters).to(device)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
        times_exp, times_epoch, peak = [], [], 0.0
        for _ in range(args.repeats + 1):  # the first round warms up
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                rollout = experience(model, ids, targets)  # one trunk pass feeds all four heads
                cache = TrunkCache.keep(rollout.trunk_states) if cached else None  # ... and is kept
                t1 = time.perf_counter()
                ppo_epoch(model, opt, ids, targets, rollout, cache, args.minibatch)
                t2 = time.perf_counter()
            times_exp.append((t1 - t0) * 1e3)
            times_epoch.append((t2 - t1) * 1e3)
            peak = max(peak, mem.peak)
        params = list(model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        optim = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
        rows.append(dict(variant=variant, trunk_fraction=round(trunk_layers / args.layers, 2),
                         lora_rank=adapters.rank if adapters else 0,
                         param_mb=round(_mb(params), 1), grad_mb=round(_mb(grads), 1), optim_mb=round(_mb(optim), 1),
                         experience_ms=round(statistics.median(times_exp[1:]), 1),
                         ppo_epoch_ms=round(statistics.median(times_epoch[1:]), 1), peak_mem_mb=round(peak, 1)))
        print(rows[-1], flush=True)
    sep = rows[0]
    for r in rows[1:]:
        state = (r["param_mb"] + r["grad_mb"] + r["optim_mb"]) / (sep["param_mb"] + sep["grad_mb"] + sep["optim_mb"])
        print(f"{r['variant']}: param+grad+optim {state:.2f}x separate, experience "
              f"{r['experience_ms'] / sep['experience_ms']:.2f}x, PPO epoch {r['ppo_epoch_ms'] / sep['ppo_epoch_ms']:.2f}x")
    print(f"PPO epoch with the cache: {rows[1]['ppo_epoch_ms'] / rows[2]['ppo_epoch_ms']:.2f}x without it")
    for full, adapted in ((rows[0], rows[3]), (rows[1], rows[4])):
        print(f"{adapted['variant']}: grad {adapted['grad_mb'] / full['grad_mb']:.3f}x, AdamW state "
              f"{adapted['optim_mb'] / full['optim_mb']:.3f}x, params {adapted['param_mb'] / full['param_mb']:.2f}x, "
              f"PPO epoch {adapted['ppo_epoch_ms'] / full['ppo_epoch_ms']:.2f}x {full['variant']}")
    out = args.out or RESULTS / f"roles_{device}.csv"
    write_csv(rows, out)


if __name__ == "__main__":
    main()
