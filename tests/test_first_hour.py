"""What a new user meets first: one-line errors with exit code 2 for a wrong model or tokenizer path and for
duplicated responses, one summary under torchrun, and no DCP warning on every single-process save."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_missing_or_broken_checkpoint_directories_are_one_line_errors(tmp_path, capsys):
    for path, words in ((tmp_path / "nonexistent", "no such tokenizer directory"),
                        (tmp_path, "cannot load its tokenizer")):
        rc = main(["sft", "--config", "configs/sft_tiny.yaml", "model.architecture=null", f"model.hf_path={path}",
                   f"trainer.out_dir={tmp_path / 'run'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {path}") and words in err[0], err
    from rlhf_engine.data.reader import DataError
    from rlhf_engine.models.hf import load_hf_model

    with pytest.raises(DataError, match="no config.json"):
        load_hf_model(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0"}')  # no 'added_tokens', no model
    from rlhf_engine.models.hf import load_tokenizer

    with pytest.raises(DataError, match="cannot load its tokenizer"):
        load_tokenizer(broken)


def test_duplicate_responses_in_a_comparison_name_file_and_line(tmp_path, capsys):
    rows = [{"prompt": "Say hi.", "responses": ["hi", "hello", "hi "], "ranking": [1, 2, 3]}]
    path = tmp_path / "rankings.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = main(["rm", "--config", "configs/rm_tiny.yaml", f"data.train_path={path}", f"trainer.out_dir={tmp_path / 'rm'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"{path}:1:" in err[0] and "'responses'[0] and 'responses'[2] are the same response" in err[0]
    from rlhf_engine.data.preference import parse_ranking

    with pytest.raises(ValueError, match="'chosen' and 'rejected' are the same response"):
        parse_ranking({"prompt": "p", "chosen": "same", "rejected": "same"})


def test_single_process_checkpoints_do_not_warn(tmp_path):
    from rlhf_engine.parallel.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # past the test suite's own filters
        path = save_checkpoint(tmp_path, 1, model)
        load_checkpoint(path, model)
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


def test_report_states_over_optimisation_with_its_numbers(tmp_path):
    from rlhf_engine.report import over_optimisation

    def write(rows):
        (tmp_path / "rl").mkdir(exist_ok=True)
        (tmp_path / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    ev = lambda step, kl, gold, proxy: {"stage": "rl", "step": step, "eval_kl": kl,  # noqa: E731
                                        "eval_reward_quickstart_gold": gold, "eval_reward_preference": proxy}
    write([ev(0, 0.0, 0.1, 0.2), ev(20, 2.0, 0.9, 1.0), ev(40, 6.0, 0.4, 1.8)])
    text = over_optimisation(tmp_path)
    assert text and "peaked at 0.900 at step 20" in text and "fell to 0.400 by step 40" in text
    assert "proxy rose from 1.000 to 1.800" in text
    write([ev(0, 0.0, 0.1, 0.2), ev(20, 2.0, 0.9, 1.0), ev(40, 6.0, 1.1, 1.8)])  # gold still rising
    assert over_optimisation(tmp_path) is None


def test_progress_lines_say_step_of_total_and_eta_without_a_terminal(tmp_path, capsys):
    tiny = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
            "model.architecture.num_layers=2", "data.builtin_rows=300", "data.seq_len=128",
            "trainer.micro_batch_size=2", "trainer.max_steps=4", "trainer.eval_every=0", "logging.log_every=2",
            "logging.tensorboard=false", f"trainer.out_dir={tmp_path}"]
    assert main(["sft", "--config", "configs/sft_tiny.yaml", *tiny]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "stage=sft" in line]
    assert lines[0].startswith("[sft 0/4] ") and "eval_loss=" in lines[0]
    assert lines[1].startswith("[sft 2/4, ETA ") and "loss=" in lines[1]
    assert lines[-1].startswith("[sft 4/4] ")


def test_generation_progress_lines_name_token_rows_and_eta(tmp_path):
    import io

    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_engine.models import load_hf_model
    from rlhf_engine.rollout.sampling import GenerationProgress, generate

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    model = load_hf_model(tmp_path).eval()
    prompts = [[5, 6, 7], [8, 9]]
    quiet = generate(model, prompts, max_new_tokens=6, stop_ids=[], pad_id=0, temperature=0.0)
    stream = io.StringIO()
    with GenerationProgress("test: 2 prompts", every_s=0.0, stream=stream):
        gen = generate(model, prompts, max_new_tokens=6, stop_ids=[], pad_id=0, temperature=0.0)
    lines = stream.getvalue().splitlines()
    assert gen.responses == quiet.responses  # reporting changes nothing
    # one line per decode step before the last, then the summary of the call (no stop id: every row runs 6)
    assert [line.split(",")[0] for line in lines[:-1]] == [f"[generate test: 2 prompts: token {t}/6" for t in range(1, 6)]
    assert all(", 0/2 rows finished, ETA <= " in line for line in lines[:-1])
    assert lines[-1].startswith("[generate test: 2 prompts: 2 rows, 12 tokens in ")
    stream = io.StringIO()
    generate(model, prompts, max_new_tokens=6, stop_ids=[], pad_id=0, temperature=0.0)  # outside: silent
    assert stream.getvalue() == ""


def test_sft_start_splits_the_pretrained_models_loss_on_demonstrations(tmp_path):
    """The measured explanation of SFT's high first loss: the parts add up to an independent masked
    cross entropy over the assistant tokens, and the template's two boundary tokens are told apart."""
    from rlhf_engine.data.chat import parse_conversation, tokenize_conversation
    from rlhf_engine.models import load_hf_model, load_tokenizer
    from rlhf_engine.stages.pipeline import explain_sft_start, sft_start

    assert main(["sft", "--config", "configs/sft_tiny.yaml", "model.architecture.num_layers=1", "trainer.max_steps=1",
                 "trainer.eval_every=0", "logging.tensorboard=false", f"trainer.out_dir={tmp_path}"]) == 0
    base = str(tmp_path / "hf")
    rows = [{"messages": [{"role": "user", "content": f"Describe the {o}."},
                          {"role": "assistant", "content": f"The {o} is bright."}]} for o in ("lemon", "river", "stone")]
    m = sft_start(base, rows)
    model, tok = load_hf_model(base).eval(), load_tokenizer(base)
    total, n, starts = 0.0, 0, 0
    for row in rows:
        ids, mask = tokenize_conversation(tok, parse_conversation(row))
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model.logits(model(x))[0, :-1].float()
        target = torch.where(torch.tensor(mask[1:]), x[0, 1:], -100)
        total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
        n += sum(mask[1:])
        starts += sum(1 for t in range(1, len(ids)) if mask[t] and not mask[t - 1])
    assert m["loss"] == pytest.approx(total / n, rel=1e-5)
    assert m["turn_start_share"] + m["after_turn_end_share"] + m["content_share"] == pytest.approx(1.0)
    assert starts == len(rows)
    text = explain_sft_start(m, 1.5, [(0, m["loss"]), (20, 1.2)])
    assert f"loss {m['loss']:.2f} on assistant tokens" in text and "by step 20" in text
