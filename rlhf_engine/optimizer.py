"""AdamW with fp32 master weights for parameters held in bf16 or fp16 (``precision.dtype=bfloat16`` without
FSDP: one process, or tensor parallelism alone).

Why. AdamW moves a weight by about ``lr`` per step. A bf16 weight of magnitude 0.02 has a spacing of
1.2e-4, so at ``lr = 1e-5`` the update rounds away: after 10 steps of ``torch.optim.AdamW`` on such bf16
weights only 15% of them had changed at all. Mixed-precision training therefore keeps an fp32 master copy
of every low-precision weight, updates it, and rounds it back into the weight the model computes with
(Micikevicius et al. 2018, "Mixed Precision Training"; Megatron-LM's ``Float16OptimizerWithFloat16Params``).
FSDP runs need none of this: their sharded parameters are the fp32 masters and FSDP casts them to bf16 for
each forward (``parallel/fsdp.py``).

The update, per parameter p with gradient g (upcast to fp32) at step t, in fp32 (Loshchilov & Hutter 2019),
through the fused kernel of ``torch.optim.AdamW(fused=True)``:

    w <- w * (1 - lr * weight_decay)
    m <- beta1 m + (1 - beta1) g                   v <- beta2 v + (1 - beta2) g^2
    w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    p <- round(w)                                  (w is p itself for an fp32 parameter)

State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (fp32) and, for a low-precision one, ``master``
(fp32). The state is keyed by the model's own parameters, so distributed checkpoints save and restore the
masters with the moments and a resumed run continues from the fp32 values, not from their rounding.
Gradients of the low-precision parameters accumulate over micro-batches in fp32 (``parallel/grads.py``:
each backward's bf16 gradient is added into an fp32 ``main_grad``), and are clipped and used there, as
FSDP does on its fp32 shards. Memory per low-precision element: 2 (weight) + 4 (gradient) + 4 (master) + 8
(moments).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .parallel.grads import clear_main_grads, grad_of, track_main_grads

FP32_STATE = ("master", "exp_avg", "exp_avg_sq")  # held in fp32 whatever the parameter's dtype


def has_low_precision(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``params`` is held in a floating dtype narrower than fp32."""
    return any(p.is_floating_point() and p.element_size() < 4 for p in params)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over fp32 masters of the low-precision parameters (module docstring); fp32 parameters are
    updated in place as ``torch.optim.AdamW(fused=True)`` does, to the same values."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        track_main_grads(p for group in self.param_groups for p in group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        clear_main_grads(p for group in self.param_groups for p in group["params"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, which casts floating state to each parameter's dtype, then the
        fp32 state (masters, moments) put back as saved and the step counts on the parameters' device (the
        fused kernel reads them there). Saved and current parameters pair up in group order, as in the base
        class (ids or, through distributed checkpoints, names)."""
        fp32 = {key: {k: v for k, v in entry.items() if k in FP32_STATE} for key, entry in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved = (key for group in state_dict["param_groups"] for key in group["params"])
        for key, p in zip(saved, (p for group in self.param_groups for p in group["params"])):
            for k, v in fp32.get(key, {}).items():
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32)
            if "step" in self.state[p]:
                self.state[p]["step"] = torch.as_tensor(self.state[p]["step"], dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if grad_of(p) is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().float()
            # torch's fused AdamW kernel (that of torch.optim.AdamW(fused=True)) over the fp32 weights, per
            # device and tensor type (plain or DTensor shards); about 3x faster than a loop of tensor ops
            batches: dict[tuple, list[torch.Tensor]] = {}
            for p in params:
                batches.setdefault((p.device, type(p)), []).append(p)
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for batch in batches.values():
                states = [self.state[p] for p in batch]
                masters = [st.get("master", p) for st, p in zip(states, batch)]
                steps = [st["step"] for st in states]
                torch._foreach_add_(steps, 1)
                grads = [g if g.dtype == torch.float32 else g.float() for g in map(grad_of, batch)]
                moments = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
                torch._fused_adamw_(masters, grads, *moments, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
                for p, m in zip(batch, masters):
                    if m is not p:
                        p.copy_(m)  # round into the parameter's dtype (a loop: DTensor has no _foreach_copy_)
        return loss
