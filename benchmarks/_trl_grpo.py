"""The TRL half of the GRPO side-by-side benchmark: one GRPO optimizer step with TRL's ``GRPOTrainer`` on CPU.

``trl_grpo_steps`` runs ``steps`` timed optimizer steps (after one untimed warm-up step) and returns time per
step, generated completion tokens, peak RSS and mean rewards; ``build_tiny_model`` writes a tiny Llama with an
offline-trained tokenizer that both halves of the benchmark can use. ``python benchmarks/_trl_grpo.py`` is a
smoke run. Nothing is downloaded: the offline switches below are set before transformers/trl are imported
(they are read at import time, so they only take effect if this module is imported first).

Written against trl 1.16 / transformers 5.23 / torch 2.13.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_DISABLED"] = "true"
os.environ["WANDB_MODE"] = "disabled"

import dataclasses
import gc
import re
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE).group(1))


def _ru_maxrss_kib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform == "darwin" else float(rss)  # bytes on macOS, KiB on Linux


class _PeakRss:
    """Resident-set high-water mark above the level at ``reset()``: VmHWM reset through /proc/self/clear_refs
    on Linux; otherwise the process-lifetime ru_maxrss, which cannot be reset (so it may include the peak of
    model loading / the warm-up step, and only the part above the reset level is reported)."""

    def reset(self) -> None:
        gc.collect()
        try:
            _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS
            self.method = "vmhwm_clear_refs"
            self.base_kib = _status_kib("VmRSS")
        except OSError:
            self.method = "getrusage_ru_maxrss (lifetime peak, not resettable)"
            try:
                self.base_kib = _status_kib("VmRSS")
            except (OSError, AttributeError):
                self.base_kib = _ru_maxrss_kib()

    def peak_mb(self) -> float:
        peak_kib = _status_kib("VmHWM") if self.method == "vmhwm_clear_refs" else _ru_maxrss_kib()
        return max(peak_kib - self.base_kib, 0) / 1024


def trl_grpo_steps(model_dir: str, prompts: list[str], *, group: int, max_new_tokens: int, steps: int,
                   beta: float, lr: float, seed: int, target_token: int, work_dir: str,
                   threads: int | None = None, bf16: bool = False, torch_compile: bool = False) -> dict:
    """Runs `steps` (+1 warm-up, not timed) optimizer steps of TRL GRPOTrainer on CPU and returns
    {"step_s": median seconds per timed step, "completion_tokens": mean generated completion tokens per step,
     "tokens_per_s": completion_tokens / step_s, "peak_mem_mb": peak RSS increase in MiB during the timed steps,
     "rewards": list of mean reward per step}

    Every step samples each prompt ``group`` times (one generation batch of ``len(prompts) * group``), scores
    the completions with reward = fraction of completion tokens equal to ``target_token``, and makes one
    optimizer step on that whole batch. Extra keys: ``peak_mem_method``, ``step_s_all`` (timed steps),
    ``warmup_step_s``, ``completion_tokens_per_step``, ``warmup_reward``, ``trl_completion_tokens_per_step``
    (TRL's own ``completions/mean_length`` times the batch, a cross-check), ``trl_step_time_s`` (TRL's own
    ``step_time`` metric: generation + loss + backward, without the optimizer step), ``optimizer``,
    ``has_ref_model``, ``trl_version``, ``threads``. ``bf16``: TRL's default mixed precision (False: fp32).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if group < 2:
        raise ValueError("GRPO needs group >= 2 (TRL rejects num_generations < 2)")
    if threads is not None:
        torch.set_num_threads(threads)

    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    batch = len(prompts) * group
    total_steps = steps + 1  # step 0 is the warm-up

    # One record per reward call; TRL calls each reward function exactly once per generation, and with
    # generation_batch_size == per_device_train_batch_size and num_iterations == 1 it generates once per step.
    rewards_per_call: list[float] = []
    tokens_per_call: list[int] = []
    prompts_ok: list[bool] = []
    expected_prompts = Counter({p: group for p in prompts})

    def target_token_fraction(prompts, completions, completion_ids, **kwargs):
        # TRL 1.16 calls reward_func(prompts=..., completions=..., completion_ids=..., **dataset columns,
        # trainer_state=..., log_extra=..., log_metric=...); completion_ids are lists of ints, cut after the
        # first EOS (EOS included, no padding).
        rewards = [sum(t == target_token for t in ids) / max(len(ids), 1) for ids in completion_ids]
        rewards_per_call.append(sum(rewards) / len(rewards))
        tokens_per_call.append(sum(len(ids) for ids in completion_ids))
        prompts_ok.append(Counter(prompts) == expected_prompts)
        return rewards

    step_times: list[float] = []
    mem = _PeakRss()
    result_mem: dict = {}

    class _StepTimer(TrainerCallback):
        # on_step_begin .. on_step_end spans, inside Trainer's loop: generation + reward scoring (+ ref-model
        # forward when beta > 0) in GRPOTrainer._prepare_inputs, the policy forward/backward, gradient clipping,
        # optimizer.step and the LR-scheduler step. It excludes fetching prompts from the dataloader (trivial)
        # and logging (which runs after on_step_end).
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # first timed step: memory window starts after the warm-up step
                mem.reset()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)
            if state.global_step == total_steps:
                result_mem["peak_mem_mb"] = mem.peak_mb()
                result_mem["peak_mem_method"] = mem.method

    # transformers 5.x renamed gradient_checkpointing -> activation_checkpointing, but TRL's base config still
    # defaults gradient_checkpointing=True; setting both (where the new name exists) turns it off without the
    # FutureWarning the old name alone triggers.
    extra = {}
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(GRPOConfig)}:
        extra["activation_checkpointing"] = False
    config = GRPOConfig(
        output_dir=work_dir,
        # --- batch: every step = all prompts x group completions, one optimizer step, no reuse ---
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        generation_batch_size=batch,  # => steps_per_generation = 1: generate once per optimizer step
        num_generations=group,  # TRL default 8
        num_iterations=1,
        max_steps=total_steps,
        # --- generation (HF generate, no vLLM) ---
        max_completion_length=max_new_tokens,  # TRL default 512
        temperature=1.0,
        top_p=1.0,
        top_k=0,  # TRL 1.16: int, 0 disables top-k (transformers skips TopKLogitsWarper for 0 and None)
        use_vllm=False,
        # --- loss ---
        loss_type="grpo",  # TRL default "dapo"; "grpo" = per-sequence token mean, then mean over sequences
        beta=beta,  # TRL default 0.0 (no reference model); > 0 loads a second copy of the model as reference
        use_bias_correction_kl=False,  # TRL default True (KL term multiplied by the importance ratio)
        epsilon=0.2,
        # scale_rewards left at its default "group" (advantage = (r - group mean) / group std)
        # --- optimizer ---
        learning_rate=lr,  # GRPOConfig default 1e-6
        lr_scheduler_type="constant",  # Trainer default "linear" (decays to 0 over max_steps)
        warmup_steps=0,
        max_grad_norm=1.0,
        # optim left at the Trainer default (adamw_torch_fused for torch >= 2.8; weight_decay 0.0,
        # betas (0.9, 0.999), eps 1e-8)
        # --- precision / device ---
        bf16=bf16,  # GRPOConfig default: True unless fp16 (bf16 autocast over fp32 weights)
        fp16=False,
        gradient_checkpointing=False,  # GRPOConfig default True
        torch_compile=torch_compile,  # Trainer default False: True wraps the training model in torch.compile
        use_cpu=True,
        seed=seed,
        # --- bookkeeping ---
        logging_steps=1,  # GRPOConfig default 10
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Plain-text "prompt" column: TRL tokenizes it with tokenizer(text=prompts) (no chat template).
    dataset = Dataset.from_dict({"prompt": list(prompts)})
    trainer = GRPOTrainer(
        model=model_dir,  # loaded by TRL in float32 (create_model_from_path default dtype)
        reward_funcs=target_token_fraction,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_StepTimer()],
    )
    has_ref_model = trainer.ref_model is not None
    trainer.train()

    if len(step_times) != total_steps or len(tokens_per_call) != total_steps:
        raise RuntimeError(f"expected {total_steps} steps/generations, got {len(step_times)}/{len(tokens_per_call)}")
    if not all(prompts_ok):
        raise RuntimeError("a step did not use every prompt exactly `group` times")

    timed = step_times[1:]
    step_s = statistics.median(timed)
    completion_tokens = statistics.mean(tokens_per_call[1:])
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {
        "step_s": step_s,
        "completion_tokens": completion_tokens,
        "tokens_per_s": completion_tokens / step_s,
        "peak_mem_mb": result_mem["peak_mem_mb"],
        "rewards": rewards_per_call[1:],
        "peak_mem_method": result_mem["peak_mem_method"],
        "step_s_all": timed,
        "warmup_step_s": step_times[0],
        "completion_tokens_per_step": tokens_per_call[1:],
        "warmup_reward": rewards_per_call[0],
        "trl_completion_tokens_per_step": [h["completions/mean_length"] * batch for h in logs[1:]],
        "trl_step_time_s": [h["step_time"] for h in logs[1:] if "step_time" in h],
        "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
        "has_ref_model": has_ref_model,
        "trl_version": trl.__version__,
        "threads": torch.get_num_threads(),
    }


def build_tiny_model(dir: str, seed: int, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2) -> dict:
    """Write a tiny random LlamaForCausalLM (default hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
    untied embeddings) and a byte-level BPE tokenizer trained offline on synthetic words (pad/bos/eos special
    tokens, a simple chat template, no BOS added by the tokenizer) to ``dir``. Returns the special-token ids
    and vocab size."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "ba", "zu", "fe", "gi", "ho", "ja", "we"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]

    specials = ["<pad>", "<bos>", "<eos>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    Path(dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dir)
    tok.save_pretrained(dir)
    return {"vocab_size": len(tok), "pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "tiny-llama")
        info = build_tiny_model(model_dir, seed=0)
        from transformers import AutoTokenizer

        target = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("a")
        print("tiny model:", info, "target token:", target)
        out = trl_grpo_steps(
            model_dir,
            ["kalo mine tu", "ra si po de", "ba zu fe", "gi ho ja we ka"],
            group=4, max_new_tokens=16, steps=2, beta=0.04, lr=1e-5, seed=0, target_token=target,
            work_dir=os.path.join(tmp, "out"), threads=1,
        )
        print(json.dumps(out, indent=1))
