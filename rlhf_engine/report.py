"""``report.md`` for a pipeline run: the summary, plots (PNG, matplotlib) and samples before and after RL.

Plots, from the stages' ``metrics.jsonl``:
- ``reward_vs_kl.png``: proxy (RM) and gold reward against KL to the SFT policy during RL, per rollout
  (dots) and per held-out evaluation (lines). Proxy rising while gold falls is over-optimisation.
- ``rm_accuracy.png``: the RM's held-out pairwise accuracy over its steps, with the simulated labelers'
  agreement with each other and with the gold ranking.
- ``losses.png``: the training loss of every stage.
Without matplotlib the report is written without plots (and says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GOLD = "quickstart_gold"


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LOSS_LABELS = {
    "pretrain": "next-token NLL (nats/token)",
    "sft": "NLL on assistant tokens",
    "rm": "-log sigmoid(r_w - r_l), per prompt",
    "rl": "PPO loss: surrogate + value - entropy\n(the surrogate is -advantage-weighted: < 0 is fine)",
    "dpo": "-log sigmoid(beta (log-ratio margin))",
}


def over_optimisation(out: Path) -> str | None:
    """A sentence when the held-out gold reward fell from its best while the proxy kept rising, else None."""
    evals = sorted((r for r in _records(out / "rl" / "metrics.jsonl") if "eval_kl" in r and f"eval_reward_{GOLD}" in r),
                   key=lambda r: r["step"])
    if len(evals) < 2:
        return None
    best = max(evals, key=lambda r: r[f"eval_reward_{GOLD}"])
    last = evals[-1]
    gold_drop = best[f"eval_reward_{GOLD}"] - last[f"eval_reward_{GOLD}"]
    proxy_rise = last["eval_reward_preference"] - best["eval_reward_preference"]
    if last is best or gold_drop <= 0.05 or proxy_rise <= 0:
        return None
    return (f"**Over-optimisation.** The held-out gold reward peaked at {best[f'eval_reward_{GOLD}']:.3f} at step "
            f"{best['step']} (KL {best['eval_kl']:.2f}) and fell to {last[f'eval_reward_{GOLD}']:.3f} by step "
            f"{last['step']} (KL {last['eval_kl']:.2f}), while the proxy rose from {best['eval_reward_preference']:.3f} "
            f"to {last['eval_reward_preference']:.3f}: the policy is exploiting the reward model. Stopping at the "
            "peak, a larger KL coefficient or a better RM would keep the gain.")


def shared_trunk(m: dict[str, Any] | None) -> str:
    """The RL stage's measured savings of one shared frozen trunk (``models.roles.measure_sharing``)."""
    if not m:
        return ""
    text = (f"**Shared trunk.** The RL roles (policy, reference, reward and any critic) ran over one frozen trunk "
            f"of {m['trunk_layers']} of {m['layers']} layers. Measured in this run: weights {m['weights_mb']:.1f} MiB against "
            f"{m['weights_mb_separate']:.1f} MiB for separate models ({m['weights_mb'] / m['weights_mb_separate']:.2f}x)")
    if "train_state_mb" in m:
        text += (f"; gradients and AdamW state {m['train_state_mb']:.1f} MiB against {m['train_state_mb_separate']:.1f} "
                 f"({m['train_state_mb'] / m['train_state_mb_separate']:.2f}x)")
    return text + (f"; one experience forward of every role on the last rollout {m['experience_ms']:.1f} ms against "
                   f"{m['experience_ms_separate']:.1f} ms with a trunk pass per role "
                   f"({m['experience_ms'] / m['experience_ms_separate']:.2f}x).")


def _plots(out: Path, summary: dict[str, Any]) -> list[str]:
    import matplotlib  # lazy: matplotlib is slow to import and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy (see above): after choosing the headless backend

    made = []
    rl = _records(out / "rl" / "metrics.jsonl")
    roll = [r for r in rl if "rollout/kl" in r and f"rollout/reward_{GOLD}" in r]
    evals = sorted((r for r in rl if "eval_kl" in r and f"eval_reward_{GOLD}" in r), key=lambda r: r["step"])
    if roll or evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        if roll:
            ax.scatter([r["rollout/kl"] for r in roll], [r["rollout/reward_preference"] for r in roll], s=8,
                       alpha=0.35, color="tab:orange", label="proxy (RM), rollouts")
            ax.scatter([r["rollout/kl"] for r in roll], [r[f"rollout/reward_{GOLD}"] for r in roll], s=8, alpha=0.35,
                       color="tab:blue", label="gold, rollouts")
        if evals:  # joined in order of KL (steps do not always raise it), each point marked with its step
            by_kl = sorted(evals, key=lambda r: r["eval_kl"])
            ax.plot([r["eval_kl"] for r in by_kl], [r["eval_reward_preference"] for r in by_kl], "o-",
                    color="tab:orange", label="proxy (RM), held-out")
            ax.plot([r["eval_kl"] for r in by_kl], [r[f"eval_reward_{GOLD}"] for r in by_kl], "s-", color="tab:blue",
                    label="gold, held-out")
            for r in by_kl:
                ax.annotate(str(r["step"]), (r["eval_kl"], r[f"eval_reward_{GOLD}"]), fontsize=6,
                            textcoords="offset points", xytext=(2, -8))
        # the table's two rows, from the pipeline's own evaluation (more samples than the RL stage's)
        ax.scatter([0.0, summary["kl_final"]], [summary["gold_reward_sft"], summary["gold_reward_rl"]], marker="*",
                   s=120, color="tab:blue", edgecolor="black", zorder=5, label="gold, report table (SFT, final)")
        ax.scatter([0.0, summary["kl_final"]], [summary["proxy_reward_sft"], summary["proxy_reward_rl"]], marker="*",
                   s=120, color="tab:orange", edgecolor="black", zorder=5, label="proxy, report table (SFT, final)")
        ax.set_xlabel("KL(policy || SFT) per response, nats")
        ax.set_ylabel("reward")
        ax.set_title("Proxy vs gold reward during RL")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "reward_vs_kl.png", dpi=110)
        plt.close(fig)
        made.append("reward_vs_kl.png")
    rm = [r for r in _records(out / "rm" / "metrics.jsonl") if "eval_accuracy" in r]
    if rm:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rm], [r["eval_accuracy"] for r in rm], "o-", label="RM held-out pairwise accuracy")
        ax.axhline(summary["labeler_agreement"], color="gray", ls="--", label="labeler-labeler agreement")
        ax.axhline(summary["labeler_gold_agreement"], color="black", ls=":", label="labeler-gold agreement")
        ax.set_xlabel("RM step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.4, 1.0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "rm_accuracy.png", dpi=110)
        plt.close(fig)
        made.append("rm_accuracy.png")
    stages = [s for s in ("pretrain", "sft", "rm", "rl", "dpo") if (out / s / "metrics.jsonl").exists()]
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.2), squeeze=False)
        for ax, s in zip(axes[0], stages):
            recs = [r for r in _records(out / s / "metrics.jsonl") if "loss" in r and r["loss"] is not None]
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
            ax.set_title(s)
            ax.set_xlabel("step")
            ax.set_ylabel(LOSS_LABELS.get(s, "training loss"), fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "losses.png", dpi=110)
        plt.close(fig)
        made.append("losses.png")
    return made


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| prompt | response | gold | proxy |", "| --- | --- | --- | --- |"]
    for r in rows:
        text = r["response"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['prompt']} | {text} | {r['gold']:.2f} | {r['proxy']:.2f} |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict[str, Any], before: list[dict], after: list[dict]) -> Path:
    try:
        plots = _plots(out, summary)
        note = ""
    except ImportError:
        plots, note = [], "\n_matplotlib is not installed: no plots (pip install matplotlib)._\n"
    s = summary
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    text = f"""# Pipeline report

Policy optimisation: **{s['rl_algorithm']}**, seed {s['seed']}, {s['wall_s']} s in all
({', '.join(f'{k} {v} s' for k, v in s['stage_seconds'].items())}).

| | SFT policy | final policy |
| --- | --- | --- |
| gold reward (hidden scorer) | {fmt(s['gold_reward_sft'])} | {fmt(s['gold_reward_rl'])} |
| proxy reward (the RM) | {fmt(s['proxy_reward_sft'])} | {fmt(s['proxy_reward_rl'])} |
| KL to the SFT policy (nats per response) | 0 | {fmt(s['kl_final'])} |
| response length (tokens) | {fmt(s['response_length_sft'])} | {fmt(s['response_length_rl'])} |

Reward model: held-out pairwise accuracy **{fmt(s['rm_heldout_accuracy'])}**. The simulated labelers agree
with each other on {fmt(s['labeler_agreement'])} of the pairs and with the gold ranking on
{fmt(s['labeler_gold_agreement'])}. An RM that learned the gold scorer exactly would score about the latter
on the labelers' held-out rankings.

**How to read this.** The gold reward is what the task really wants, and no model ever sees it. The
proxy reward is the RM's score, which RL maximises. Learning shows as gold reward above the SFT policy's
at a moderate KL. Over-optimisation shows as a proxy that keeps rising while gold stalls or falls, as
the policy drifts (higher KL) into text the RM was never trained on.
In `reward_vs_kl.png` the stars are this table's rows; the held-out curve is the RL stage's own
evaluation every few steps (its step numbers marked), on fewer samples, so its step-0 point differs from
the table's SFT row by sampling noise.
{over_optimisation(out) or ""}
{shared_trunk(s.get("shared_trunk"))}
{(s.get("sft_start") or {}).get("explanation", "")}
{note}
{chr(10).join(f'![{p}]({p})' for p in plots)}

## Samples before RL (SFT policy)

{_table(before)}

## Samples after {s['rl_algorithm']}

{_table(after)}
"""
    path = out / "report.md"
    path.write_text(text)
    return path
