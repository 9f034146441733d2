"""``rlhf-engine probe``: which trunk cut keeps the preference readable, measured with linear probes.

    rlhf-engine probe --config configs/rm_tiny.yaml model.hf_path=runs/sft_tiny/hf model.architecture=null
    # -> <out_dir>/probe.json, probe.png and a table; model.trunk_layers=auto in rm / rl uses the result

For the SFT model and the preference rows of ``data.train_path`` (rankings or chosen/rejected pairs,
split by ``data.eval_fraction``), every response is forwarded once and the residual stream is read
after k layers, for every cut k = 0 .. L-1 (k = 0: the token embeddings), two ways: at the response's
last token (where a reward head reads its score) and averaged over the response's tokens. A linear
pairwise probe (``algorithms/probe.py``) is fitted on the training pairs of each (cut, pooling) and
scored on the held-out pairs. The recommended cut is the deepest whose best held-out accuracy is within
``tolerance`` of the best cut's: the most layers that can be frozen and shared by the four RL roles
without hiding what a linear reward head would need.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..algorithms.probe import fit_pairwise_probe, recommend_cut
from ..config import RunConfig
from ..data.chat import pad_id
from ..data.comparisons import texts_of
from ..data.preference import Ranking, Sequences, pack_sequences, parse_ranking, tokenize_response
from ..data.streams import load_split
from ..models.transformer import Transformer
from ..parallel.runtime import init_runtime
from .common import StageContext, base_model, open_run

POOLINGS = ("last", "mean")


@torch.no_grad()
def cut_features(model: Transformer, seqs: Sequences) -> list[dict[str, torch.Tensor]]:
    """Per cut k = 0 .. L-1: {"last": (R, D), "mean": (R, D)} of the residual stream after k layers."""
    model.eval()
    x = model.embed(seqs.input_ids)  # (B, S, D)
    ctx = model.layer_context(x, document_ids=seqs.document_ids)
    weight = seqs.response_positions().float()  # (B, S) response tokens
    counts = seqs.sum_per_sequence(weight).clamp(min=1)[:, None]  # (R, 1)
    idx, keep = seqs.seq_index.flatten(), seqs.seq_index.flatten() >= 0
    out = []
    for k in range(model.config.num_layers):
        if k:
            x = model.run_layers(x, ctx, [k - 1])
        flat = (x.float() * weight[..., None]).flatten(0, 1)  # (B*S, D)
        summed = flat.new_zeros(seqs.num_sequences, x.shape[-1]).index_add(0, idx[keep], flat[keep])
        out.append({"last": seqs.read_last(x.float()), "mean": summed / counts})
    return out


def response_features(model: Transformer, tokenized: Sequence[tuple[list[int], int]], seq_len: int, pad: int,
                      chunk: int = 64) -> list[dict[str, torch.Tensor]]:
    """``cut_features`` of many responses, packed ``chunk`` at a time."""
    parts = [cut_features(model, pack_sequences(tokenized[i:i + chunk], seq_len, pad))
             for i in range(0, len(tokenized), chunk)]
    return [{p: torch.cat([part[k][p] for part in parts]) for p in POOLINGS} for k in range(len(parts[0]))]


def _pairs(tokenizer, rows: Sequence[Ranking]) -> tuple[list[tuple[list[int], int]], list[tuple[int, int]]]:
    seqs, pairs = [], []
    for r in rows:
        base = len(seqs)
        seqs += [tokenize_response(tokenizer, r.prompt, y) for y in r.responses]
        pairs += [(base + w, base + lo) for w, lo in r.pairs()]
    return seqs, pairs


def probe_cuts(model: Transformer, tokenizer, train_rows: Sequence[Ranking], eval_rows: Sequence[Ranking], *,
               seq_len: int, tolerance: float = 0.02, l2: float = 1e-3) -> dict[str, Any]:
    """Held-out pairwise accuracy of a linear probe per cut and pooling, and the recommended cut."""
    if not eval_rows:
        raise ValueError("the probe needs held-out preference rows: set data.eval_fraction > 0 or data.eval_path")
    pad = pad_id(tokenizer)
    table = []
    split = {}
    for name, rows in (("train", train_rows), ("heldout", eval_rows)):
        seqs, pairs = _pairs(tokenizer, rows)
        if not pairs:
            raise ValueError(f"no {name} preference pairs (all ties?)")
        split[name] = (response_features(model, seqs, seq_len, pad), torch.tensor(pairs))
    (train_f, train_p), (held_f, held_p) = split["train"], split["heldout"]
    for k in range(len(train_f)):
        row: dict[str, Any] = {"cut": k}
        for pooling in POOLINGS:
            f, h = train_f[k][pooling], held_f[k][pooling]
            fit = fit_pairwise_probe(f[train_p[:, 0]], f[train_p[:, 1]], l2=l2)
            row[f"{pooling}_train"] = fit.train_accuracy
            row[f"{pooling}_heldout"] = fit.accuracy(h[held_p[:, 0]], h[held_p[:, 1]])
        table.append(row)
    best = {row["cut"]: max(row[f"{p}_heldout"] for p in POOLINGS) for row in table}
    return {"cuts": table, "best_per_cut": best, "tolerance": tolerance, "l2": l2,
            "recommended_trunk_layers": recommend_cut(best, tolerance),
            "train_pairs": int(len(train_p)), "heldout_pairs": int(len(held_p))}


def format_probe(result: dict[str, Any]) -> str:
    lines = [f"{'cut':>4} {'last (train)':>13} {'last':>6} {'mean (train)':>13} {'mean':>6}"]
    for r in result["cuts"]:
        lines.append(f"{r['cut']:>4} {r['last_train']:>13.3f} {r['last_heldout']:>6.3f} {r['mean_train']:>13.3f} "
                     f"{r['mean_heldout']:>6.3f}")
    lines.append(f"held-out accuracy of a linear pairwise probe on frozen features after k layers "
                 f"({result['train_pairs']} train / {result['heldout_pairs']} held-out pairs); recommended "
                 f"model.trunk_layers={result['recommended_trunk_layers']} (the deepest cut within "
                 f"{result['tolerance']:.2f} of the best)")
    return "\n".join(lines)


def plot_probe(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib  # optional: the table and JSON do not need it
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # optional, as above

    cuts = [r["cut"] for r in result["cuts"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for pooling, marker in (("last", "o"), ("mean", "s")):
        ax.plot(cuts, [r[f"{pooling}_heldout"] for r in result["cuts"]], marker=marker, label=f"{pooling} token(s)")
    ax.axvline(result["recommended_trunk_layers"], color="grey", linestyle=":", label="recommended cut")
    ax.axhline(0.5, color="lightgrey", linewidth=0.8)
    ax.set_xlabel("frozen layers k (0: embeddings)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_xticks(cuts)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def resolve_trunk_layers(cfg: RunConfig, model: Transformer, tokenizer, train_rows, eval_rows) -> tuple[int, dict]:
    """``model.trunk_layers``, or the probe's recommendation when it is ``auto``."""
    if cfg.model.trunk_layers != "auto":
        return int(cfg.model.trunk_layers), {}
    result = probe_cuts(model, tokenizer, train_rows, eval_rows, seq_len=cfg.data.seq_len)
    print(format_probe(result), file=sys.stderr)
    return result["recommended_trunk_layers"], result


def run_probe(cfg: RunConfig, *, tolerance: float = 0.02, l2: float = 1e-3) -> dict[str, Any]:
    """The command: probe every cut, write ``probe.json`` and ``probe.png`` under ``trainer.out_dir``."""
    rt = init_runtime(cfg)
    out = open_run(cfg, rt)
    ctx = StageContext(cfg, rt, out)
    train_rows, eval_rows = load_split(cfg, parse_ranking)
    tokenizer = ctx.tokenizer(texts_of(train_rows))
    model = base_model(cfg, tokenizer)
    result = probe_cuts(model, tokenizer, train_rows, eval_rows, seq_len=cfg.data.seq_len, tolerance=tolerance, l2=l2)
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    result["plot"] = str(out / "probe.png") if plot_probe(result, out / "probe.png") else None
    print(format_probe(result))
    return result
