"""TRL's own DPO loss code, called without a trainer (TRL 1.16 computes the loss inline in
``DPOTrainer._compute_loss``): a minimal stand-in for the trainer and a model returning given per-token
log-probs, with the reference log-probs passed precomputed."""

import os
from collections import defaultdict
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch


class _OneProcess:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def trl_dpo_loss(chosen_token_logps, rejected_token_logps, ref_chosen, ref_rejected, *, beta, loss_type,
                 label_smoothing=0.0, prompt_len=2):
    """TRL's DPO loss over pairs. ``*_token_logps``: lists of 1-D per-token policy log-probs over each
    completion (leaf tensors whose .grad TRL's backward fills); ``ref_*``: (B,) summed reference log-probs."""
    from trl import DPOTrainer

    B = len(chosen_token_logps)
    seqs = list(chosen_token_logps) + list(rejected_token_logps)  # TRL's batch: all chosen, then all rejected
    L = prompt_len + max(len(s) for s in seqs)
    completion_mask = torch.zeros(2 * B, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        completion_mask[i, prompt_len : prompt_len + len(s)] = 1
    rows = []
    for i, s in enumerate(seqs):  # log-probs aligned with next-token positions (L - 1 of them)
        pad_front, pad_back = prompt_len - 1, L - 1 - (prompt_len - 1) - len(s)
        rows.append(torch.cat([torch.zeros(pad_front), s, torch.zeros(pad_back)]))
    per_token = torch.stack(rows)
    attention_mask = ((torch.arange(L) < prompt_len) | completion_mask.bool()).long()
    inputs = {
        "input_ids": torch.zeros(2 * B, L, dtype=torch.long), "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.as_tensor(ref_chosen, dtype=torch.float32),
        "ref_rejected_logps": torch.as_tensor(ref_rejected, dtype=torch.float32),
    }

    def model(**kwargs):
        z = torch.zeros_like(per_token.detach())
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcess(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def trl_grpo_loss(per_token_logps, old_logps, ref_logps, advantages, completion_mask, *, beta, loss_type,
                  epsilon=0.2, max_completion_length=None):
    """TRL's GRPO loss (``GRPOTrainer._compute_loss``) on given per-token log-probs over completions:
    (B, T) tensors, ``per_token_logps`` differentiable, ``advantages`` (B,). The textbook k3 KL
    (``use_bias_correction_kl=False``), one process, no gradient accumulation."""
    from trl import GRPOTrainer

    B, T = per_token_logps.shape
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None)
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=args, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=_Reduce(), _metrics=defaultdict(lambda: defaultdict(list)),
        max_completion_length=max_completion_length or T,
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
    )
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": completion_mask.long(),
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": completion_mask.sum()}
    return GRPOTrainer._compute_loss(fake, None, inputs)


class _Reduce(_OneProcess):
    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x
