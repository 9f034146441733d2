"""Schema of what a run optimises: the algorithm sections, the RL reward, iterated RLHF and the pipeline.

Algorithm names are checked against ``rlhf_engine.catalog`` (the registry the CLI and the stages read
too), so a registered algorithm is valid here without editing this file.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import field_validator

from ..catalog import RL_ALGORITHMS, algorithm_names
from .model import section


def _known(name: str, valid: list[str]) -> str:
    if name not in valid:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(valid)}")
    return name



@section
class RankingRMConfig:
    """InstructGPT's ranking reward model (algorithm.name = rm)."""

    normalize: bool = True
    """After training, shift the score so the training responses (SFT samples, in InstructGPT) score 0
    on average; RL then starts from rewards centred at 0."""
    weighting: Literal["prompt", "pair"] = "prompt"
    """prompt: each prompt's C(K, 2) comparisons are one batch element, every pair weighted 1/C(K, 2)
    (InstructGPT, eq. 1), so prompts count equally whatever their K; pair: the plain mean over every
    pair pooled (a K = 9 prompt then weighs 6x a K = 4 prompt)."""
    pooling: Literal["last", "mean"] = "last"
    """Where a response's score is read: at its last token (InstructGPT, Hugging Face's sequence
    classifiers) or as the mean of the per-token scores over the response tokens. Mean pooling reads the
    words a frozen trunk passes up even where the last token's state does not gather them (README's
    design note, ``rlhf-engine probe``'s 'mean' column); it is saved with the export and used wherever
    the RM scores (RL's reward, evaluation, iterate)."""
    head_attention: Literal["copy", "uniform"] = "copy"
    """How the first trainable layer above the trunk cut starts its attention. copy: as the SFT model's.
    uniform: its query projection starts at zero, so every position attends equally to everything it
    can see and the score token starts from the mean of the trunk's states (the probe's 'mean' readout);
    training sharpens the attention from there. Measured on the quickstart task with a frozen trunk (README
    design note): an RM that stayed at chance on one seed of three reaches the labelers' agreement on all
    three. The weights keep their shapes: the export is a plain Hugging Face sequence classifier."""
    soft_labels: bool = True
    """Rows with soft labels (an AI labeler's probabilities, docs/data.md) train on them: each labelled
    pair (i, j, p) costs -(p log sigmoid(r_i - r_j) + (1 - p) log sigmoid(r_j - r_i)), the cross entropy
    against the soft target (Bai et al. 2022); false trains on their hard ranking instead."""


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
    kl_clamp: float | None = None
    """Clamp each sampled per-token KL estimate (k1, k2, k3) to [-kl_clamp, kl_clamp]; None (default):
    unclamped. verl and OpenRLHF use 10."""
    log_ratio_clamp: float | None = None
    """Clamp log pi - log ref to [-c, c] before the estimator (keeps k3's exp finite); None (default):
    unclamped. verl uses 20."""
    is_correction: Literal["none", "tis", "mis"] = "none"
    """Correct the sampler/trainer log-prob mismatch (``algorithms/mismatch.py``): tis weights each token's
    policy-gradient term by min(rho, is_threshold), rho = pi_trainer / pi_sampler at the sampled token
    (Yao et al. 2025); mis (masked IS, IcePop) keeps tokens with 1/is_threshold <= rho <= is_threshold,
    weighted by rho, and drops the others from the loss and its token count."""
    is_threshold: float = 2.0
    """C of tis and mis (verl and ms-swift default to 2)."""
    off_policy_steps: Literal[0, 1] = 0
    """1: rollout t+1 is sampled by the policy as it was before training on rollout t, while the trainer
    runs rollout t's experience pass and training (in a background thread or a sampler process:
    ``off_policy_sampler``; on several ranks, each rank gathers trunk + policy head whole and samples its
    share with that copy); the trainer's log-probs at the current weights are the PPO ratio's old ones
    (from the experience pass, or with one step per rollout from that step's own forward) and
    is_correction (required) weights each token by the trainer/sampler ratio. 0: every rollout is sampled
    by the current policy."""
    off_policy_sampler: Literal["thread", "process"] = "thread"
    """Where off_policy_steps=1 samples: ``thread``, a background thread of the trainer's process (it
    shares the interpreter lock with the training step); ``process``, a child process per rank with a
    shared-memory copy of trunk + policy head, whose weights are refreshed in place before each rollout
    (``rollout/sampler_process.py``)."""
    off_policy_sampler_threads: int = 1
    """Intra-op threads of the sampler process (``torch.set_num_threads``), taken from the trainer's while
    the sampler runs (the trainer keeps at least one)."""
    log_mismatch: bool = True
    """Log rollout/mismatch_abs_mean, _abs_max and _kl every rollout. Runs with several steps per rollout
    (PPO) have the trainer's log-probs from the experience pass; one-step runs (GRPO) measure them in the
    loss, from the training forward at the sampling weights, at no extra cost."""
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
        if (self.kl_clamp is not None and self.kl_clamp <= 0) or (self.log_ratio_clamp is not None
                                                                 and self.log_ratio_clamp <= 0):
            raise ValueError("kl_clamp and log_ratio_clamp must be > 0 (or null: no clamp)")
        if self.clip_eps <= 0 or (self.dual_clip is not None and self.dual_clip <= 1):
            raise ValueError("clip_eps must be > 0 and dual_clip > 1")
        if self.is_threshold <= 1:
            raise ValueError("is_threshold must be > 1")
        if self.off_policy_steps and self.is_correction == "none":
            raise ValueError("off_policy_steps=1 samples with the previous policy: set is_correction=tis or mis")
        if self.off_policy_sampler_threads < 1:
            raise ValueError("off_policy_sampler_threads must be >= 1")


@section
class AlgorithmConfig:
    """What is optimized; the stage is chosen by ``name``, its settings live in the same-named section."""

    name: str = "sft"
    """sft: next-token loss on assistant tokens (and plain text); rm: InstructGPT ranking reward model;
    sparrow: Sparrow preference model; rules: Sparrow rule-violation classifier; dpo: DPO/cDPO/IPO;
    ppo, grpo, rloo, reinforce_pp, a2c, or any registered RL algorithm: online RL (settings in
    algorithm.rl). Valid names come from ``rlhf_engine.catalog``."""
    rm: RankingRMConfig = dataclasses.field(default_factory=RankingRMConfig)
    sparrow: PreferenceModelConfig = dataclasses.field(default_factory=PreferenceModelConfig)
    rules: RuleModelConfig = dataclasses.field(default_factory=RuleModelConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)

    @field_validator("name")
    @classmethod
    def _name_known(cls, name: str) -> str:
        return _known(name, algorithm_names())

    def __post_init__(self) -> None:
        if self.name == "rules" and not self.rules.names:
            raise ValueError("algorithm.name = rules needs algorithm.rules.names")
        if self.name in RL_ALGORITHMS and RL_ALGORITHMS[self.name].needs_group and self.rl.group < 2:
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
class IterateConfig:
    """Iterated RLHF (``rlhf-engine iterate``): rounds of collect comparisons -> retrain RM -> continue RL."""

    rounds: int = 2
    """Collect / retrain / RL rounds."""
    prompts_per_round: int = 32
    """Prompts whose responses are compared in each round."""
    responses_per_prompt: int = 4
    """K responses sampled from the current policy per prompt and ranked by the labeler (4..9)."""
    labeler: Literal["programmatic", "model", "ai", "file"] = "programmatic"
    """programmatic: registered reward functions (reward.functions weights) plus noise; model: a causal LM
    judging each response alone with a prompt template; ai: the constitution-guided AI labeler of the
    rlaif section (soft labels); file: rankings written by people."""
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
    rl_algorithm: str = "ppo"
    """The RL algorithm of each round (a name in ``catalog.RL_ALGORITHMS``)."""

    @field_validator("rl_algorithm")
    @classmethod
    def _rl_known(cls, name: str) -> str:
        return _known(name, list(RL_ALGORITHMS))

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.prompts_per_round < 2 or self.rm_steps < 1 or self.rl_steps < 1:
            raise ValueError("need rounds >= 1, prompts_per_round >= 2, rm_steps >= 1 and rl_steps >= 1")
        if not 2 <= self.responses_per_prompt <= 9:
            raise ValueError("responses_per_prompt must be in [2, 9]")
        if self.labeler == "model" and self.labeler_model_path is None:
            raise ValueError("labeler 'model' needs labeler_model_path")


@section
class ConstitutionalConfig:
    """Constitutional AI's supervised stage (``rlhf-engine cai``, Bai et al. 2022): the policy answers each
    prompt, the reviser critiques the answer under a sampled principle and revises it, for ``rounds``
    rounds; the revisions become SFT rows, and SFT of model.hf_path on them follows."""

    constitution_path: str | None = None
    """YAML constitution: principles with critique and revision requests, optional few-shot examples
    (data/constitution.py)."""
    reviser_path: str | None = None
    """HF causal LM that writes critiques and revisions (usually larger than the policy); None: the
    policy itself (model.hf_path), as in the paper."""
    rounds: int = 1
    """Critique-revision rounds per prompt; each samples one principle, and revises the last revision."""
    keep: Literal["all", "final"] = "all"
    """SFT rows from every round's revision (the paper trains on all revision steps) or the last only."""
    max_prompts: int | None = None
    """Use the first this many prompts of data.train_path (None: all)."""
    sft: bool = True
    """Run SFT on the revisions after writing them (trainer.max_steps, optim.*)."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError("max_prompts must be >= 1 (or null for all)")


@section
class AILabelerConfig:
    """The AI labeler (RLAIF, Bai et al. 2022; ``rlhf-engine rlaif``, ``iterate.labeler: ai``): a judge
    compares the responses under the constitution's principles, and its normalised probabilities of the
    choice letters are kept as soft labels."""

    judge_path: str | None = None
    """HF causal LM asked the constitution's comparison questions, or a reward-model export (then
    P(i preferred to j) = sigmoid(r_i - r_j) and principles are not used)."""
    constitution_path: str | None = None
    """YAML constitution whose principles carry a comparison question (causal-LM judges)."""
    comparison: Literal["pairwise", "kwise"] = "pairwise"
    """pairwise: every pair of a prompt's K responses is one question with options (A), (B); kwise: all
    K are options of one question and P(i preferred to j) = q_i / (q_i + q_j) from its choice distribution q."""
    principles_per_comparison: int = 1
    """Principles sampled (without replacement) for each question; their probabilities are averaged
    (the paper's ensemble over principles)."""
    both_orders: bool = True
    """Ask each question with the options in order and reversed, and average (against position bias)."""
    min_choice_mass: float = 0.0
    """Drop a question whose judge puts less than this probability, in all, on the choice letters."""
    responses_per_prompt: int = 4
    """rlaif on prompt-only rows: K responses sampled from model.hf_path per prompt (2..9)."""

    def __post_init__(self) -> None:
        if self.principles_per_comparison < 1:
            raise ValueError("principles_per_comparison must be >= 1")
        if not 0.0 <= self.min_choice_mass < 1.0:
            raise ValueError("min_choice_mass must be in [0, 1)")
        if not 2 <= self.responses_per_prompt <= 9:
            raise ValueError("responses_per_prompt must be in [2, 9]")


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
    rl_algorithm: str = "ppo"
    """Policy optimisation against the RM (online: a name in ``catalog.RL_ALGORITHMS``), or dpo on the
    rankings (offline)."""
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

    @field_validator("rl_algorithm")
    @classmethod
    def _rl_known(cls, name: str) -> str:
        return _known(name, [*RL_ALGORITHMS, "dpo"])

    def __post_init__(self) -> None:
        if min(self.sft_steps, self.rm_steps, self.rl_steps, self.ranking_prompts, self.eval_prompts) < 1:
            raise ValueError("pipeline steps and prompt counts must be >= 1")
        if not 2 <= self.responses_per_prompt <= 9:
            raise ValueError("responses_per_prompt must be in [2, 9]")
