"""Batched autoregressive sampling with a KV cache and left-padded prompts.

Prompts of different lengths are left-padded into one (B, P) batch. Padding is a document of its
own (id -1), so the model's causal-and-same-document mask hides it, and positions count only real
tokens: each row decodes exactly as it would alone. Rows stop at their first stop token; the batch
stops when every row has, or after ``max_new_tokens``.
"""

from __future__ import annotations

import torch

from ..models.transformer import KVCache, Transformer


def sample_next(
    logits: torch.Tensor,  # (B, V)
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row (B,): greedy when temperature == 0, else softmax(logits / T) restricted to
    the top_k tokens and to the smallest set whose probability reaches top_p (nucleus, Holtzman 2020)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sampled continuations of each prompt (stop token included when reached)."""
    device = model.output_weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    docs = torch.full((B, P), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        docs[b, P - len(p) :] = 0
    ids, docs = ids.to(device), docs.to(device)
    positions = (docs.eq(0).cumsum(dim=1) - 1).clamp(min=0)  # (B, P): 0 at each prompt's first token
    cache = KVCache(model.config, B, P + max_new_tokens, dtype=model.output_weight.dtype, device=device)

    hidden = model(ids, positions=positions, document_ids=docs, kv_cache=cache)[:, -1]  # (B, D)
    next_pos = positions[:, -1] + 1  # (B,)
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        token = sample_next(model.logits(hidden), temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        hidden = model(token[:, None], positions=next_pos[:, None], document_ids=torch.zeros_like(token)[:, None],
                       kv_cache=cache)[:, -1]
        next_pos = next_pos + 1
    tokens = torch.stack(out, dim=1).tolist()  # (B, T)
    results = []
    for row in tokens:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    return results
