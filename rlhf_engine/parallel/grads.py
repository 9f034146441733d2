"""fp32 accumulation of the gradients of low-precision parameters (``main_grad``, as in Megatron-LM).

    track_main_grads(params)   # once, by the optimizer that steps them (optimizer.MasterWeightAdamW)
    grad_of(p)                 # the gradient to read: p.main_grad where one is kept, else p.grad
    set_grad(p, g)             # replace it (the pipeline's tied-weight sum)
    clear_main_grads(params)   # with optimizer.zero_grad

Why: a parameter held in bf16 gets its gradient in bf16, and autograd adds each micro-batch's gradient
into ``p.grad`` in that dtype. Every partial sum is then rounded to 8 bits of mantissa (a relative error of
up to 2^-9 per add), so over N micro-batches the accumulated gradient drifts from the true sum by about
sqrt(N) such roundings, and small micro-batch gradients next to a large sum round away. Mixed-precision
training accumulates in fp32 instead (Micikevicius et al. 2018; Megatron-LM's
``accumulate_allreduce_grads_in_fp32``; FSDP2 does it on its fp32 shards).

How: a post-accumulate-grad hook on each tracked parameter adds the micro-batch's gradient, as soon as
backward has written it, into the fp32 ``p.main_grad`` and frees ``p.grad``. One backward's contributions
to a parameter used twice (a tied embedding) are summed by autograd first, so each micro-batch adds once.
Clipping (``trainer.clip_grad_norm``), the pipeline's tied-weight all-reduce and the optimizer read
``grad_of(p)``; a ``p.grad`` assigned by hand (no backward) is read as it is. Memory per element: 4 bytes
of fp32 gradient in place of 2 of bf16.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _accumulate(p: torch.Tensor) -> None:
    """The hook: p.main_grad += p.grad (in fp32), then p.grad = None."""
    grad = p.grad
    if p.main_grad is None:
        p.main_grad = grad.float()  # a new fp32 tensor of the parameter's shape (a DTensor keeps its layout)
    else:
        p.main_grad.add_(grad)
    p.grad = None


def track_main_grads(params: Iterable[torch.Tensor]) -> int:
    """Accumulate the gradients of the low-precision floating ``params`` that require grad into fp32
    ``main_grad`` (module docstring); returns how many are tracked. Idempotent."""
    n = 0
    for p in params:
        if not (p.requires_grad and p.is_floating_point() and p.element_size() < 4) or hasattr(p, "main_grad"):
            continue
        p.main_grad = None
        p.register_post_accumulate_grad_hook(_accumulate)
        n += 1
    return n


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The accumulated gradient of ``p``: its fp32 ``main_grad`` when one is kept, else ``p.grad``."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def set_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Replace the gradient ``grad_of(p)`` returns."""
    if getattr(p, "main_grad", None) is not None:
        p.main_grad = grad
    else:
        p.grad = grad


def clear_main_grads(params: Iterable[torch.Tensor]) -> None:
    for p in params:
        if getattr(p, "main_grad", None) is not None:
            p.main_grad = None
