"""Schema of how a run trains: layout, precision, data, optimizer, loop, sampling and logging."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from .model import section



@section
class ParallelConfig:
    """Process layout: world size = dp_replicate * dp_shard * pp * tp."""

    tp: int = 1
    """Tensor-parallel degree (Megatron layout, within a node)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    dp_shard: int = 1
    """Fully sharded data-parallel degree (FSDP2, ZeRO-3 style)."""
    dp_replicate: int = 1
    """Replicated data-parallel degree (HSDP's outer dimension)."""
    sequence_parallel: bool = False
    """Split norms and residual adds along the sequence across the tp ranks (Korthikanti et al. 2022)."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule; its micro-batches are the trainer's (trainer.grad_accum_steps per step, each
    model pass of one, e.g. PPO-ptx's, counted)."""
    pp_stages_per_rank: int = 1
    """Virtual stages per pipeline rank (interleaved_1f1b; gpipe also runs them)."""
    pp_first_stage_layers: int | None = None
    """Layers of the first pipeline stage; None: balanced by cost (docs/architecture.md)."""
    pp_last_stage_layers: int | None = None
    """Layers of the last pipeline stage; None: balanced by cost."""
    timeout_s: float = 600.0
    """Collective timeout: a rank that stops answering (dead, stopped, deadlocked) makes every other rank
    fail within this many seconds instead of waiting torch's default 30 minutes."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward, keeping only its input."""
    compile_layers: bool | None = None
    """``torch.compile`` each decoder layer (``parallel/compile.py``). None: on for torchao FP8 on a CUDA
    device, where it makes FP8 faster than bf16 instead of 0.43x its speed (measured on an H200), else off."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp_replicate", "pp_stages_per_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ValueError("dp_shard must be >= 1, or -1 to fill the world size")
        if self.pp_stages_per_rank > 1 and self.pp_schedule == "1f1b":
            raise ValueError("pp_stages_per_rank > 1 needs pp_schedule='interleaved_1f1b' (or 'gpipe')")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"parallel.timeout_s={self.timeout_s} must be a finite number > 0")
        for name in ("pp_first_stage_layers", "pp_last_stage_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null: balanced by cost)")


TE_RECIPES = ("delayed", "current", "block")
TORCHAO_RECIPES = ("tensorwise", "rowwise")


@section
class FP8Config:
    """FP8 matmuls for the linear layers (``parallel/fp8.py``)."""

    backend: Literal["torchao", "te"] = "torchao"
    """torchao: ``convert_to_float8_training`` (PyTorch-native, runs everywhere torch._scaled_mm does);
    te: NVIDIA Transformer Engine modules under its FP8 autocast (H100 and later; pip install .[fp8])."""
    recipe: str | None = None
    """torchao: tensorwise (default) | rowwise; te: delayed (default) | current | block (delayed scaling
    with an amax history, current per-tensor scaling, MXFP8-style block scaling)."""
    exclude: list[str] = dataclasses.field(default_factory=lambda: ["lm_head", "score"])
    """Linear layers whose qualified name contains one of these stay in the compute dtype: by default the
    LM head and the value/reward heads."""
    keep_first_last: bool = False
    """Also keep the first and the last decoder layer in the compute dtype."""
    roles: list[str] | None = None
    """RL/DPO role models: the roles whose heads use FP8 (e.g. [policy, critic]); the frozen trunk too
    unless 'trunk' is left out. None: everything not excluded."""
    amax_history: int = 16
    """te delayed scaling: length of the amax history."""
    float8_all_gather: bool = False
    """torchao with FSDP2: all-gather the sharded weights in float8 (halves the gather's bytes)."""

    def __post_init__(self) -> None:
        valid = TE_RECIPES if self.backend == "te" else TORCHAO_RECIPES
        if self.recipe is None:
            self.recipe = valid[0]
        if self.recipe not in valid:
            raise ValueError(f"recipe {self.recipe!r} is not a {self.backend} recipe; choose one of {', '.join(valid)}")
        if self.float8_all_gather and (self.backend != "torchao" or self.recipe != "tensorwise"):
            raise ValueError("float8_all_gather needs backend torchao with the tensorwise recipe")
        if self.amax_history < 1:
            raise ValueError("amax_history must be >= 1")


@section
class PrecisionConfig:
    """Numeric formats."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype. Norms, rotary tables and softmax statistics stay fp32, and weights are updated in
    fp32: under FSDP the sharded parameters are fp32, otherwise the optimizer keeps fp32 master copies of
    the bf16 parameters (``rlhf_engine/optimizer.py``)."""
    fp8: FP8Config | None = None
    """FP8 training of the linear layers (None: off)."""


@section
class DataConfig:
    """Training data."""

    train_path: str | None = None
    """JSONL or Parquet rows in the algorithm's format (docs/data.md); None: the built-in demo set (sft)."""
    eval_path: str | None = None
    """Held-out rows, same format; None: hold out eval_fraction of the training rows."""
    eval_fraction: float = 0.05
    """Share of training rows held out for evaluation when eval_path is None."""
    builtin_rows: int = 2000
    """Number of conversations generated for the built-in demo set."""
    seq_len: int
    """Tokens per packed row; a longer sequence (conversation, prompt + response) is truncated."""
    pretrain_path: str | None = None
    """PPO-ptx: plain-text ({"text": ...}) or chat rows whose next-token loss is mixed into the policy
    update (algorithm.rl.ptx_coef > 0); packed into rows of seq_len."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")


@section
class OptimConfig:
    """AdamW with warmup and decay."""

    lr: float
    """Peak learning rate."""
    critic_lr: float | None = None
    """RL: peak learning rate of the critic head (default: lr); follows the same schedule."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear schedules)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment coefficients."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to parameters with ndim >= 2 (not to norms or biases)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""

    def __post_init__(self) -> None:
        def positive(name: str, value: float | None, *, zero: bool = False) -> None:
            if value is not None and not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
                raise ValueError(f"optim.{name}={value} must be a finite number {'>= 0' if zero else '> 0'}")

        for name in ("lr", "critic_lr", "eps", "grad_clip"):
            positive(name, getattr(self, name))
        positive("weight_decay", self.weight_decay, zero=True)
        if not (math.isfinite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must each be in [0, 1)")


@section
class RolloutConfig:
    """Sampling from the policy."""

    max_new_tokens: int = 64
    """Longest response sampled."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Sample within the smallest set of tokens whose mass reaches top_p; 1 disables."""
    fuse_projections: bool = True
    """Decode with q/k/v and gate/up as one GEMM each, over concatenated copies of those weights made for
    the generation (about 3/4 of the decoder's weights again, while generating; tensor-parallel and FSDP
    shards, LoRA and FP8 layers are never fused), and the eager/static one-token steps through the flat
    decode step (``models/decode.py``), which on a CPU also copies o, down and the LM head (transposed, as
    are all the copies there). False decodes through the modules with the separate projections."""
    decode_mode: Literal["eager", "static", "compiled"] = "eager"
    """How decode steps run (``rollout.sampling.generate``). eager: the KV cache grows with the text.
    static: a KV cache of fixed shape (its length rounded up to a multiple of 64), written at device-side
    slots, so every step has the same shapes and reads nothing on the host; attention then reads every
    slot under the causal mask (equal up to the order of its reductions). compiled: static, with the
    one-token step through ``torch.compile``: on a CPU the flat decode step through inductor (the fastest
    CPU mode, README), on CUDA the module step in mode ``reduce-overhead``, which captures CUDA graphs. It
    compiles once per process, batch size and cache size (a few seconds on a CPU), then reuses the code
    across prompt lengths within a cache size and across weight updates."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


@section
class TrainerConfig:
    """The training loop."""

    max_steps: int
    """Optimizer steps to run."""
    micro_batch_size: int
    """Per forward/backward: packed rows (sft), or prompts with all their responses (rm, sparrow, dpo
    pairs), or dialogues (rules)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    token_budget: int | None = None
    """SFT: dynamic batching. Each micro-batch holds as many examples as fit in this many tokens (one
    packed row; C++ first-fit decreasing), balanced by tokens across data-parallel ranks; replaces
    micro_batch_size. Must be >= data.seq_len."""
    eval_every: int = 0
    """Evaluate on held-out data every N steps (and at the end); 0: only at the end."""
    eval_batches: int = 8
    """Micro-batches per evaluation."""
    seed: int = 0
    """Seeds initialisation, data order and sampling."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    out_dir: str = "runs/default"
    """Run directory: metrics, resolved config, checkpoints, exported model."""
    save_every: int = 0
    """Write an atomic checkpoint every N steps (and at the last step run); 0: no checkpoints."""
    max_bad_steps: int = 5
    """Steps with a non-finite loss or gradient norm are skipped (no update); this many in a row stop the
    run, the last good checkpoint intact."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints of a stage; 0 keeps all."""
    resume: str = "auto"
    """'auto': continue from the stage's latest checkpoint under out_dir when there is one; 'never':
    start fresh; or the path of a checkpoint directory (``<out_dir>/checkpoints/<stage>/step_N``)."""
    stop_after: int | None = None
    """Stop (after checkpointing) at this step although the schedule runs to max_steps, e.g. to fit a
    cluster's time limit; the next run with resume='auto' continues from here."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("max_steps, micro_batch_size and grad_accum_steps must be >= 1")
        if self.save_every < 0 or self.keep_checkpoints < 0 or self.eval_every < 0:
            raise ValueError("save_every, keep_checkpoints and eval_every must be >= 0")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError("stop_after must be >= 1")
        if self.token_budget is not None and self.token_budget < 2:
            raise ValueError("token_budget must be >= 2")
        if self.max_bad_steps < 1:
            raise ValueError(f"trainer.max_bad_steps={self.max_bad_steps} must be >= 1")


@section
class LoggingConfig:
    """Where metrics go."""

    log_every: int = 10
    """Print and record training metrics every N steps."""
    progress_bar: bool = True
    """Show a progress bar on a terminal."""
    tensorboard: bool = True
    """Write TensorBoard scalars under ``<out_dir>/tb``."""
