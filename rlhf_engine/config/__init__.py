"""Typed run configuration: dataclass schema, YAML recipes, dotted command-line overrides.

A run is described by one ``RunConfig``. Recipes in ``configs/*.yaml`` give values, dotted
overrides (``optim.lr=1e-5 model.architecture.num_layers=4``) are merged on top, and the result is
validated against the schema by pydantic at start-up. An unknown key, a value of the wrong type or a
missing required field fails with ``ConfigError`` naming the full key path (and, for a typo, the
closest valid key), before any model is built.

Every field is documented where it is declared; fields without a default are required.

    cfg = load_config("configs/sft_tiny.yaml", ["optim.lr=3e-4", "trainer.max_steps=50"])

Modules: ``model`` (the decoder's shape, which model to start from), ``training`` (layout, precision,
data, optimizer, loop, sampling, logging), ``algorithm`` (algorithm sections, reward, iterate, pipeline,
cai, rlaif)
and ``run`` (``RunConfig`` and loading). None imports torch.
"""

from .algorithm import (
    AILabelerConfig,
    AlgorithmConfig,
    ConstitutionalConfig,
    DPOConfig,
    IterateConfig,
    PipelineConfig,
    PreferenceModelConfig,
    RankingRMConfig,
    RewardConfig,
    RLConfig,
    RuleModelConfig,
)
from .model import LoRAConfig, ModelConfig, RopeScaling, TransformerConfig
from .run import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
    validate,
)
from .training import (
    TE_RECIPES,
    TORCHAO_RECIPES,
    DataConfig,
    FP8Config,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "AILabelerConfig", "AlgorithmConfig", "ConfigError", "ConstitutionalConfig", "DPOConfig", "DataConfig", "FP8Config", "IterateConfig", "LoggingConfig",
    "LoRAConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PipelineConfig", "PrecisionConfig", "PreferenceModelConfig",
    "RLConfig", "RankingRMConfig", "RewardConfig", "RolloutConfig", "RopeScaling", "RuleModelConfig", "RunConfig",
    "TE_RECIPES", "TORCHAO_RECIPES", "TrainerConfig", "TransformerConfig", "apply_overrides", "load_config",
    "parse_override", "to_dict", "to_yaml", "validate",
]
