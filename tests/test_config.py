"""Config schema: recipes load, overrides merge, and bad input fails naming the key path."""

from pathlib import Path

import pytest

from rlhf_engine.config import ConfigError, load_config, parse_override, to_yaml, validate

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {
    "model": {"architecture": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4}},
    "data": {"seq_len": 32},
    "optim": {"lr": 1e-3},
    "trainer": {"max_steps": 3, "micro_batch_size": 2},
}


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates_and_round_trips(recipe, tmp_path):
    cfg = load_config(recipe)
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


def test_dotted_overrides_merge_with_types(tmp_path):
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", ["optim.lr=1e-5", "trainer.max_steps=7",
                                                       "optim.betas=[0.8,0.9]", "optim.grad_clip=null",
                                                       "model.architecture.num_layers=2"])
    assert cfg.optim.lr == 1e-5 and cfg.trainer.max_steps == 7
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.grad_clip is None
    assert cfg.model.architecture.num_layers == 2
    assert cfg.data.seq_len == 256  # untouched keys keep the recipe's value


def test_parse_override_values():
    assert parse_override("a.b=1e-5") == (["a", "b"], 1e-5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=abc") == (["a"], "abc")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("no_equals_sign")


def test_typo_names_full_path_and_closest_key():
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "configs/sft_tiny.yaml", ["optim.lr_warmup=3"])
    assert "unknown key 'optim.lr_warmup'" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "configs/sft_tiny.yaml", ["model.architecture.num_head=4"])
    msg = str(exc.value)
    assert "'model.architecture.num_head'" in msg and "did you mean 'model.architecture.num_heads'" in msg
    assert "sft_tiny.yaml" in msg  # names the recipe


def test_wrong_type_names_key_path():
    with pytest.raises(ConfigError, match=r"invalid value at 'trainer\.max_steps'.*got 1\.5"):
        load_config(ROOT / "configs/sft_tiny.yaml", ["trainer.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"invalid value at 'precision\.dtype'"):
        load_config(ROOT / "configs/sft_tiny.yaml", ["precision.dtype=float16"])
    with pytest.raises(ConfigError, match=r"invalid value at 'optim\.lr'.*'fast'"):
        load_config(ROOT / "configs/sft_tiny.yaml", ["optim.lr=fast"])


def test_missing_required_field_names_key_path():
    tree = {k: dict(v) for k, v in MINIMAL.items()}
    del tree["optim"]["lr"]
    with pytest.raises(ConfigError, match=r"missing required key 'optim\.lr'"):
        validate(tree)
    tree = {k: v for k, v in MINIMAL.items() if k != "trainer"}
    with pytest.raises(ConfigError, match=r"missing required key 'trainer'"):
        validate(tree)


def test_cross_field_rules_are_enforced():
    tree = {**MINIMAL, "model": {"hf_path": "x", **MINIMAL["model"]}}
    with pytest.raises(ConfigError, match=r"'model'.*exactly one of model\.hf_path and model\.architecture"):
        validate(tree)
    bad = {**MINIMAL, "model": {"architecture": {**MINIMAL["model"]["architecture"], "num_kv_heads": 3}}}
    with pytest.raises(ConfigError, match=r"model\.architecture.*multiple of num_kv_heads=3"):
        validate(bad)


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="'optim.lr' is a value, not a section"):
        load_config(ROOT / "configs/sft_tiny.yaml", ["optim.lr.x=1"])


def test_stage_commands_refuse_a_recipe_for_another_algorithm(capsys):
    from rlhf_engine.cli import main

    assert main(["rm", "--config", str(ROOT / "configs/dpo_tiny.yaml")]) == 2
    assert "algorithm.name is 'dpo'; 'rlhf-engine rm' runs rm, sparrow, rules" in capsys.readouterr().err
    assert main(["train", "--config", str(ROOT / "configs/rules_tiny.yaml"), "algorithm.rules.names=[]"]) == 2
    assert "needs algorithm.rules.names" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="label_smoothing > 0 goes with loss_type 'cdpo'"):
        load_config(ROOT / "configs/dpo_tiny.yaml", ["algorithm.dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="unknown key 'algorithm.dpo.betta'; did you mean 'algorithm.dpo.beta'"):
        load_config(ROOT / "configs/dpo_tiny.yaml", ["algorithm.dpo.betta=0.2"])


def test_missing_training_file_names_the_key(tmp_path, capsys):
    from rlhf_engine.cli import main

    assert main(["rm", "--config", str(ROOT / "configs/rm_tiny.yaml"), f"data.train_path={tmp_path}/none.jsonl",
                 f"trainer.out_dir={tmp_path}/run"]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
