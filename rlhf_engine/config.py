"""Typed run configuration: dataclass schema, YAML recipes, dotted command-line overrides.

A run is described by one ``RunConfig``. Recipes in ``configs/*.yaml`` give values, dotted
overrides (``optim.lr=1e-5 model.architecture.num_layers=4``) are merged on top, and the result is
validated against the schema by pydantic at start-up. An unknown key, a value of the wrong type or a
missing required field fails with ``ConfigError`` naming the full key path (and, for a typo, the
closest valid key), before any model is built.

Every field is documented where it is declared; fields without a default are required.

    cfg = load_config("configs/sft_tiny.yaml", ["optim.lr=3e-4", "trainer.max_steps=50"])
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from .models.transformer import TransformerConfig

_STRICT = ConfigDict(extra="forbid")
section = dataclass(kw_only=True, config=_STRICT)


@section
class ModelConfig:
    """Which model to train: a local Hugging Face checkpoint, or an architecture built from scratch."""

    hf_path: str | None = None
    """Local HF checkpoint directory (config.json, safetensors, tokenizer with chat template)."""
    architecture: TransformerConfig | None = None
    """Decoder shape for a model initialised from scratch (exclusive with hf_path)."""
    tokenizer_path: str | None = None
    """Tokenizer directory; default: hf_path, or for a scratch model a byte-level BPE trained on the data."""
    trunk_layers: int = 0
    """RL roles share a frozen trunk of the embedding and this many lower layers (Sparrow: 64 of 80);
    each role owns the layers above. 0: four separate models."""

    def __post_init__(self) -> None:
        if (self.hf_path is None) == (self.architecture is None):
            raise ValueError("set exactly one of model.hf_path and model.architecture")
        if self.trunk_layers < 0:
            raise ValueError("trunk_layers must be >= 0")
        if self.architecture is not None and self.trunk_layers >= self.architecture.num_layers:
            raise ValueError(f"trunk_layers={self.trunk_layers} must be below num_layers={self.architecture.num_layers}: "
                             "every role needs at least one layer of its own")


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
    """Pipeline schedule."""
    pp_stages_per_rank: int = 1
    """Virtual stages per pipeline rank (interleaved_1f1b only)."""
    pp_microbatches: int | None = None
    """Microbatches per pipeline step; None: 2 * pp."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward, keeping only its input."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp_replicate", "pp_stages_per_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ValueError("dp_shard must be >= 1, or -1 to fill the world size")
        if self.pp_stages_per_rank > 1 and self.pp_schedule != "interleaved_1f1b":
            raise ValueError("pp_stages_per_rank > 1 needs pp_schedule='interleaved_1f1b'")


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
    """Parameter and activation dtype. Norms, rotary tables and softmax statistics stay fp32."""
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


@section
class RankingRMConfig:
    """InstructGPT's ranking reward model (algorithm.name = rm)."""

    normalize: bool = True
    """After training, shift the score so the training responses (SFT samples, in InstructGPT) score 0
    on average; RL then starts from rewards centred at 0."""


@section
class PreferenceModelConfig:
    """Sparrow's pick-one-of-N preference model (algorithm.name = sparrow)."""

    extra_negatives: int = 1
    """Distractors per prompt: responses to other prompts, scored in this prompt's context, added as
    options that should lose."""
    bt_weight: float = 1.0
    """Weight of the Bradley-Terry term (chosen against each other option)."""
    reg_weight: float = 0.01
    """Weight of the mean squared score, which centres scores at 0."""

    def __post_init__(self) -> None:
        if self.extra_negatives < 0 or self.bt_weight < 0 or self.reg_weight < 0:
            raise ValueError("extra_negatives, bt_weight and reg_weight must be >= 0")


@section
class RuleModelConfig:
    """Sparrow's rule-violation classifier (algorithm.name = rules)."""

    names: list[str] = dataclasses.field(default_factory=list)
    """The rules, one classifier output each, in this order; data rows label them by name."""

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("rule names must be unique")


@section
class DPOConfig:
    """Direct preference optimisation and relatives (algorithm.name = dpo)."""

    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference."""
    loss_type: Literal["sigmoid", "cdpo", "ipo"] = "sigmoid"
    """sigmoid: DPO; cdpo: conservative DPO with label_smoothing; ipo: IPO (per-token mean log-ratios)."""
    label_smoothing: float = 0.0
    """cdpo: the assumed rate of flipped preference labels, in (0, 0.5)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if (self.loss_type == "cdpo") != (self.label_smoothing > 0):
            raise ValueError("label_smoothing > 0 goes with loss_type 'cdpo' (and only with it)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")


@section
class RLConfig:
    """Online RL (algorithm.name = ppo, grpo, rloo, reinforce_pp or a2c): rollouts, advantages, losses.

    Each rollout samples ``prompts_per_rollout`` prompts (over all data-parallel ranks) ``group`` times;
    its sequences are then split into micro-batches of ``trainer.micro_batch_size`` and trained on for
    ``epochs`` passes, one optimizer step per ``trainer.grad_accum_steps`` micro-batches (a minibatch).
    ``trainer.max_steps`` counts optimizer steps."""

    prompts_per_rollout: int = 16
    """Prompts sampled per rollout, over all data-parallel ranks."""
    group: int = 1
    """Responses sampled per prompt (GRPO/RLOO need >= 2; the group shares the baseline)."""
    epochs: int = 1
    """Passes over each rollout (PPO: several; GRPO/RLOO/REINFORCE++ usually 1)."""
    kl_coef: float = 0.02
    """beta: weight of KL(policy || reference); the initial value when target_kl is set."""
    kl_estimator: Literal["k1", "k2", "k3", "exact"] | None = None
    """Per-token KL estimator (Schulman 2020); exact sums over the vocabulary. Default: k1 in the
    reward (InstructGPT), k3 in the loss (GRPO)."""
    kl_in: Literal["reward", "loss"] | None = None
    """Where the KL penalty goes: subtracted from the per-token reward, or added to the loss.
    Default: reward for ppo, rloo, reinforce_pp and a2c; loss for grpo."""
    target_kl: float | None = None
    """Adaptive KL (Ziegler et al. 2019): steer kl_coef so the rollout KL approaches this value."""
    kl_horizon: int = 10000
    """Adaptive KL: the controller's horizon in sampled sequences."""
    clip_eps: float = 0.2
    """Ratio clip of the surrogate (PPO, GRPO, RLOO, REINFORCE++; A2C does not clip)."""
    clip_eps_high: float | None = None
    """Upper ratio clip when it differs from clip_eps (DAPO's clip-higher)."""
    dual_clip: float | None = None
    """Dual clip c > 1 for negative advantages (Ye et al. 2020)."""
    value_clip: float | None = 0.2
    """Clip of the value update around the values at collection; None disables."""
    value_coef: float = 0.5
    """Weight of the critic's loss."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda (PPO)."""
    n_step: int = 8
    """A2C: n of the n-step returns bootstrapped from the critic."""
    whiten_advantages: bool | None = None
    """Normalise advantages over the rollout (all ranks). Default: on for ppo and a2c."""
    whiten_rewards: bool = False
    """Normalise the rollout's sequence scores (all ranks) before the KL penalty is added."""
    reward_clip: float | None = None
    """Clip sequence scores to [-reward_clip, reward_clip]."""
    dr_grpo: bool = False
    """GRPO: Dr. GRPO (Liu et al. 2025): no std scaling of group advantages and a length-unbiased sum
    over tokens divided by rollout.max_new_tokens."""
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"] | None = None
    """How per-token losses combine (over the optimizer step). Default: token_mean; GRPO
    seq_mean_token_mean; Dr. GRPO token_sum_norm."""
    kl_stop: float | None = None
    """Skip the rest of a rollout's epochs once a step's approx KL(old || new) exceeds this."""
    ptx_coef: float = 0.0
    """PPO-ptx gamma: weight of the next-token loss on data.pretrain_path (InstructGPT: 27.8)."""
    ptx_micro_batch_size: int | None = None
    """Packed pretraining rows per micro-batch (default: trainer.micro_batch_size)."""
    cache_trunk: bool = True
    """Keep the rollout's trunk states for its epochs instead of recomputing the frozen trunk."""
    eval_prompts: int = 16
    """Held-out prompts sampled (with a fixed seed) at each evaluation for reward and KL."""
    init_policy_path: str | None = None
    """Continue from an earlier policy (an RL stage's ``hf`` export over the same frozen trunk): its layers
    above the trunk and LM head start the policy head; the reference stays model.hf_path."""

    def __post_init__(self) -> None:
        if self.prompts_per_rollout < 1 or self.group < 1 or self.epochs < 1 or self.n_step < 1:
            raise ValueError("prompts_per_rollout, group, epochs and n_step must be >= 1")
        if self.kl_coef < 0 or self.ptx_coef < 0 or self.entropy_coef < 0 or self.value_coef < 0:
            raise ValueError("kl_coef, ptx_coef, entropy_coef and value_coef must be >= 0")
        if self.target_kl is not None and (self.target_kl <= 0 or self.kl_coef <= 0):
            raise ValueError("target_kl needs target_kl > 0 and an initial kl_coef > 0")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("need 0 < gamma <= 1 and 0 <= lam <= 1")
        if self.clip_eps <= 0 or (self.dual_clip is not None and self.dual_clip <= 1):
            raise ValueError("clip_eps must be > 0 and dual_clip > 1")


@section
class AlgorithmConfig:
    """What is optimized; the stage is chosen by ``name``, its settings live in the same-named section."""

    name: Literal["sft", "rm", "sparrow", "rules", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "a2c"] = "sft"
    """sft: next-token loss on assistant tokens (and plain text); rm: InstructGPT ranking reward model;
    sparrow: Sparrow preference model; rules: Sparrow rule-violation classifier; dpo: DPO/cDPO/IPO;
    ppo, grpo, rloo, reinforce_pp, a2c: online RL (settings in algorithm.rl)."""
    rm: RankingRMConfig = dataclasses.field(default_factory=RankingRMConfig)
    sparrow: PreferenceModelConfig = dataclasses.field(default_factory=PreferenceModelConfig)
    rules: RuleModelConfig = dataclasses.field(default_factory=RuleModelConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)

    def __post_init__(self) -> None:
        if self.name == "rules" and not self.rules.names:
            raise ValueError("algorithm.name = rules needs algorithm.rules.names")
        if self.name in ("grpo", "rloo") and self.rl.group < 2:
            raise ValueError(f"algorithm.name = {self.name} needs algorithm.rl.group >= 2 (the group is the baseline)")


@section
class RewardConfig:
    """The RL reward (``rewards.py``): weighted learned, rule, length, format and programmatic terms."""

    preference_path: str | None = None
    """Reward/preference model checkpoint (``<rm run>/hf``); its score enters with preference_weight."""
    preference_weight: float = 1.0
    """Weight of the preference score."""
    rules_path: str | None = None
    """Rule-violation model checkpoint; adds rules_weight * sum over rules of P(rule respected)."""
    rules_weight: float = 1.0
    """Weight of the summed rule-compliance probabilities."""
    length_target: int | None = None
    """Response tokens beyond this are penalised: -length_weight * excess / length_target."""
    length_weight: float = 0.0
    """Weight of the length penalty."""
    format: str | None = None
    """Name of a registered 0/1 check (e.g. json_object, single_line) rewarded with format_weight."""
    format_weight: float = 1.0
    """Weight of the format check."""
    functions: dict[str, float] = dataclasses.field(default_factory=dict)
    """Registered programmatic rewards and their weights, e.g. {exact_match: 1.0}."""

    def __post_init__(self) -> None:
        if self.length_target is not None and self.length_target < 1:
            raise ValueError("length_target must be >= 1")


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


@section
class IterateConfig:
    """Iterated RLHF (``rlhf-engine iterate``): rounds of collect comparisons -> retrain RM -> continue RL."""

    rounds: int = 2
    """Collect / retrain / RL rounds."""
    prompts_per_round: int = 32
    """Prompts whose responses are compared in each round."""
    responses_per_prompt: int = 4
    """K responses sampled from the current policy per prompt and ranked by the labeler (4..9)."""
    labeler: Literal["programmatic", "model", "file"] = "programmatic"
    """programmatic: registered reward functions (reward.functions weights) plus noise; model: an AI
    labeler, a causal LM judging each response with a prompt template; file: rankings written by people."""
    label_noise: float = 0.0
    """programmatic: std of Gaussian noise added to each score before ranking (simulated disagreement)."""
    labeler_model_path: str | None = None
    """model: HF causal LM checkpoint of the AI labeler."""
    labeler_template: str = "Question: {prompt}\nAnswer: {response}\nIs this answer good? Answer Yes or No:"
    """model: the judging prompt; score = log p(' Yes') - log p(' No') after it."""
    rm_steps: int = 40
    """RM optimizer steps per round (retrained from model.hf_path on all comparisons so far)."""
    rl_steps: int = 20
    """RL optimizer steps per round (continuing from the previous round's policy)."""
    rl_algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp", "a2c"] = "ppo"
    """The RL algorithm of each round."""

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.prompts_per_round < 2 or self.rm_steps < 1 or self.rl_steps < 1:
            raise ValueError("need rounds >= 1, prompts_per_round >= 2, rm_steps >= 1 and rl_steps >= 1")
        if not 2 <= self.responses_per_prompt <= 9:
            raise ValueError("responses_per_prompt must be in [2, 9]")
        if self.labeler == "model" and self.labeler_model_path is None:
            raise ValueError("labeler 'model' needs labeler_model_path")


@section
class PipelineConfig:
    """The whole InstructGPT pipeline on the built-in task (``rlhf-engine pipeline`` / ``quickstart``):
    pretrain -> SFT -> ranking RM -> RL. Each stage uses the run's sections with its own steps and LR."""

    pretrain_steps: int = 200
    """Next-token steps on the task's plain-text corpus from scratch (skipped with model.hf_path)."""
    pretrain_lr: float = 3.0e-3
    """Peak LR of pretraining."""
    sft_steps: int = 120
    """SFT steps on the task's demonstrations."""
    sft_lr: float = 2.0e-3
    """Peak LR of SFT."""
    rm_steps: int = 120
    """Ranking-RM steps on the simulated labelers' rankings of SFT samples."""
    rm_lr: float = 1.0e-3
    """Peak LR of the RM."""
    rl_steps: int = 100
    """Steps of the RL (or DPO) stage."""
    rl_lr: float = 5.0e-4
    """Peak LR of the RL (or DPO) stage."""
    rl_algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp", "a2c", "dpo"] = "ppo"
    """Policy optimisation against the RM (online), or DPO on the rankings (offline)."""
    ranking_prompts: int = 400
    """Prompts whose SFT samples the labelers rank."""
    responses_per_prompt: int = 4
    """K responses per ranked prompt (InstructGPT: 4..9)."""
    label_noise: float = 0.75
    """Std of the Gaussian noise the simulated labelers add to the gold score."""
    eval_prompts: int = 64
    """Held-out prompts for the gold/proxy/KL evaluation of SFT and final policies."""
    eval_samples: int = 4
    """Responses sampled per held-out prompt in that evaluation (more samples, less sampling noise)."""
    demonstrations: int = 2000
    """SFT conversations generated for the task."""
    pretrain_rows: int = 3000
    """Plain-text rows of the pretraining corpus."""

    def __post_init__(self) -> None:
        if min(self.sft_steps, self.rm_steps, self.rl_steps, self.ranking_prompts, self.eval_prompts) < 1:
            raise ValueError("pipeline steps and prompt counts must be >= 1")
        if not 2 <= self.responses_per_prompt <= 9:
            raise ValueError("responses_per_prompt must be in [2, 9]")


@section
class LoggingConfig:
    """Where metrics go."""

    log_every: int = 10
    """Print and record training metrics every N steps."""
    progress_bar: bool = True
    """Show a progress bar on a terminal."""
    tensorboard: bool = True
    """Write TensorBoard scalars under ``<out_dir>/tb``."""


@section
class RunConfig:
    """A whole run: one section per concern."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    iterate: IterateConfig = dataclasses.field(default_factory=IterateConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation


class ConfigError(ValueError):
    """A recipe or an override does not fit the schema; the message names every bad key path."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-5"`` -> (["optim", "lr"], 1e-05). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string; accept it as the number it means
            value = float(value) if any(c in value for c in "eE") and value[0] in "+-.0123456789" else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge dotted overrides into a nested dict (in place); intermediate sections are created."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(path[: i + 1])}' is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return tree


def _schema_at(path: tuple[str | int, ...]) -> type | None:
    """The dataclass that owns the last key of ``path``, for suggesting a valid key."""
    cls: Any = RunConfig
    for part in path[:-1]:
        if not dataclasses.is_dataclass(cls) or not isinstance(part, str):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = hints[part]
        cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
    return cls if dataclasses.is_dataclass(cls) else None


def _describe(err: dict[str, Any], source: str) -> str:
    path = tuple(err["loc"])
    key = ".".join(str(p) for p in path) or "<root>"
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _schema_at(path)
        valid = [f.name for f in dataclasses.fields(owner)] if owner else []
        close = difflib.get_close_matches(str(path[-1]), valid, n=1)
        parent = ".".join(str(p) for p in path[:-1])
        hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        return f"{source}: unknown key '{key}'{hint} (valid here: {', '.join(valid)})"
    if err["type"] == "missing" or err["type"] == "missing_argument":
        return f"{source}: missing required key '{key}'"
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"{source}: invalid value at '{key}': {err['msg']}{got_text}"


def validate(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict against ``RunConfig``; raises ``ConfigError`` listing every problem."""
    try:
        return TypeAdapter(RunConfig).validate_python(tree)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(recipe: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start empty), merge dotted overrides, validate."""
    tree: dict[str, Any] = {}
    source = "overrides"
    if recipe is not None:
        path = Path(recipe)
        if not path.exists():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        source = str(path)
    apply_overrides(tree, list(overrides or []))
    return validate(tree, source)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain JSON-compatible nested dict (tuples become lists)."""
    return TypeAdapter(RunConfig).dump_python(cfg, mode="json")


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
