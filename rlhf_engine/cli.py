"""Command line: ``rlhf-engine <command> ...`` (also ``python -m rlhf_engine``).

    rlhf-engine config show configs/sft_tiny.yaml optim.lr=1e-4   # merged, validated config as YAML
    rlhf-engine sft --config configs/sft_tiny.yaml trainer.max_steps=20
    rlhf-engine rm --config configs/rm_tiny.yaml data.train_path=rankings.jsonl
    rlhf-engine dpo --config configs/dpo_tiny.yaml model.hf_path=runs/sft/hf
    rlhf-engine rl --config configs/ppo_tiny.yaml model.hf_path=runs/sft/hf reward.preference_path=runs/rm/hf
    rlhf-engine train --config RECIPE        # the stage algorithm.name names (sft, rm, ..., dpo, ppo, grpo, ...)
    rlhf-engine quickstart [--out DIR]                          # pretrain -> SFT -> RM -> PPO -> report
    rlhf-engine pipeline --config configs/quickstart.yaml pipeline.rl_algorithm=grpo
    rlhf-engine iterate --config configs/iterate_tiny.yaml     # collect -> RM -> RL, repeated
    rlhf-engine cai --config configs/cai_tiny.yaml             # critique -> revise -> SFT (Constitutional AI)
    rlhf-engine rlaif --config configs/rlaif_tiny.yaml         # AI-labelled rankings with soft labels
    rlhf-engine data preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer runs/sft/hf
    rlhf-engine plan --config configs/gpt3_175b_ppo.yaml --world-size 1024 --json

Every training command takes ``--config RECIPE`` plus dotted ``key=value`` overrides; a bad key or
value stops the command before any work, naming the key path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .catalog import commands
from .config import ConfigError, load_config, to_yaml
from .data.reader import DataError
from .faults import (
    EXIT_INTERRUPTED,
    EXIT_TRAINING_ERROR,
    CheckpointError,
    LayoutError,
    Stopped,
    TrainingError,
)
from .stages import runner


def _config_show(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.recipe, args.overrides)), end="")
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command != "train":  # a stage subcommand: the recipe's algorithm must be one it runs
        allowed = commands()[args.command]
        if cfg.algorithm.name not in allowed:
            if cfg.algorithm.name != "sft":
                raise ConfigError(f"{args.config}: algorithm.name is {cfg.algorithm.name!r}; "
                                  f"'rlhf-engine {args.command}' runs {', '.join(allowed)} (use 'rlhf-engine train')")
            cfg = load_config(args.config, [f"algorithm.name={allowed[0]}", *args.overrides])
    summary = runner(cfg.algorithm.name)(cfg)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun, not once per process
        print(json.dumps(summary, indent=2))
    return 0


def _iterate(args: argparse.Namespace) -> int:
    # lazy: each command imports only what it runs, so --help and config show start without torch
    from .labelers import LabelsPending
    from .stages.iterate import run_iterated  # lazy (see _iterate)

    try:
        summary = run_iterated(load_config(args.config, args.overrides))
    except LabelsPending as exc:
        print(f"waiting for labels: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from .stages.pipeline import quickstart_config, run_pipeline  # lazy: see _iterate

    if args.command == "quickstart":
        cfg = quickstart_config([f"trainer.out_dir={args.out}", *args.overrides])
    else:
        cfg = load_config(args.config, args.overrides)
    summary = run_pipeline(cfg)
    keys = ("rm_heldout_accuracy", "labeler_agreement", "gold_reward_sft", "gold_reward_rl", "proxy_reward_rl",
            "kl_final", "wall_s")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"report: {cfg.trainer.out_dir}/report.md", file=sys.stderr)
    return 0


def _constitutional(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "cai":
        from .stages.cai import run_cai  # lazy: see _iterate

        summary = run_cai(cfg)
    else:
        from .stages.rlaif import run_rlaif  # lazy: see _iterate

        summary = run_rlaif(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from .data.indexed import preprocess  # lazy: see _iterate
    from .models import load_tokenizer  # lazy: see _iterate

    n = preprocess(args.input, args.output_prefix, load_tokenizer(args.tokenizer))
    print(f"wrote {n} documents to {args.output_prefix}.bin / .idx")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .parallel.plan import format_plan, plan  # lazy: see _iterate

    result = plan(load_config(args.config, args.overrides), args.world_size, args.gpu_memory_gb)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from .stages.probe import run_probe  # lazy: see _iterate

    run_probe(load_config(args.config, args.overrides), tolerance=args.tolerance, l2=args.l2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-engine",
        description="Megatron-style RLHF training engine: SFT, reward models, PPO and relatives.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors (or set RLHF_ENGINE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="inspect run configurations")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print a recipe merged with overrides, validated, as YAML")
    show.add_argument("recipe", help="YAML recipe, e.g. configs/sft_tiny.yaml")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-5")
    show.set_defaults(func=_config_show)

    rl_names = commands()["rl"]
    stage_help = {
        "sft": "supervised fine-tuning on chat demonstrations (assistant tokens only) or plain text",
        "rm": "reward model: InstructGPT ranking RM (or algorithm.name=sparrow / rules)",
        "dpo": "offline preference optimisation: DPO, conservative DPO, IPO",
        "rl": f"online RL: {', '.join(rl_names)} (algorithm.name; default {rl_names[0]})",
    }
    stages = {"train": "run the stage that the recipe's algorithm.name names",
              **{c: stage_help.get(c, f"train {', '.join(names)}") for c, names in commands().items()}}
    for command, text in stages.items():
        stage = sub.add_parser(command, help=text)
        stage.add_argument("--config", required=True, help="YAML recipe, e.g. configs/sft_tiny.yaml")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=20")
        stage.set_defaults(func=_train)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser("preprocess", help="JSONL/Parquet rows -> a Megatron indexed dataset (.bin/.idx)")
    prep.add_argument("--input", required=True, help="rows: {\"text\": ...} or chat {\"messages\": [...]}")
    prep.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. an HF checkpoint)")
    prep.set_defaults(func=_preprocess)

    quick = sub.add_parser("quickstart", help="the whole pipeline on the built-in task on a CPU, with a report")
    quick.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    quick.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. pipeline.rl_steps=50")
    quick.set_defaults(func=_pipeline)
    for name, text, recipe, example, func in (
        ("pipeline", "pretrain -> SFT -> RM -> RL (or DPO) on the built-in task, from a recipe",
         "YAML recipe, e.g. configs/quickstart.yaml", "pipeline.rl_algorithm=grpo", _pipeline),
        ("iterate", "iterated RLHF: rounds of collect comparisons -> retrain RM -> continue RL",
         "YAML recipe with an iterate: section", "iterate.rounds=3", _iterate),
        ("cai", "Constitutional AI: critique-revision data from a constitution, then SFT on it",
         "YAML recipe with a cai: section, e.g. configs/cai_tiny.yaml", "cai.rounds=2", _constitutional),
        ("rlaif", "RLAIF: an AI judge ranks responses under a constitution (soft labels for rm)",
         "YAML recipe with an rlaif: section, e.g. configs/rlaif_tiny.yaml", "rlaif.comparison=kwise", _constitutional),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--config", required=True, help=recipe)
        command.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
        command.set_defaults(func=func)

    plan = sub.add_parser("plan", help="dry run: per-rank memory of a layout on a fake mesh (no GPUs, no allocation)")
    plan.add_argument("--config", required=True, help="YAML recipe, e.g. configs/gpt3_175b_ppo.yaml")
    plan.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs) to plan for")
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU (default 80, an H100)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tp=4")
    plan.set_defaults(func=_plan)

    probe = sub.add_parser("probe", help="held-out accuracy of linear preference probes at every trunk cut; "
                                         "recommends model.trunk_layers")
    probe.add_argument("--config", required=True, help="YAML recipe with the SFT model and preference rows, "
                                                       "e.g. configs/rm_tiny.yaml model.hf_path=runs/sft_tiny/hf")
    probe.add_argument("--tolerance", type=float, default=0.02,
                       help="recommend the deepest cut within this much held-out accuracy of the best (default 0.02)")
    probe.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the probe (default 1e-3)")
    probe.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    probe.set_defaults(func=_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("RLHF_ENGINE_DEBUG") not in (None, "", "0")
    try:
        return args.func(args)
    except (ConfigError, DataError, LayoutError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # a stop signal was honoured: one line, a distinct code (75 preempted, 130 Ctrl-C)
        print(f"stopped: {exc}", file=sys.stderr)
        marker = os.environ.get("RLHF_ENGINE_STOP_MARKER")  # torchrun hides exit codes: tell the sbatch script
        if marker:
            with open(marker, "w") as f:
                f.write(f"{exc}\n")
        return exc.exit_code
    except (TrainingError, CheckpointError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRAINING_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        runtime = sys.modules.get("rlhf_engine.parallel.runtime")  # loaded only by commands that ran a stage
        if runtime is not None:
            runtime.shutdown_runtime()


if __name__ == "__main__":
    sys.exit(main())
