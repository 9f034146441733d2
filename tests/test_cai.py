"""Constitutional AI and RLAIF: the constitution file, the exact critique / revision / comparison prompts,
the critique-revision loop's rows, the AI labeler's soft labels against probabilities normalised by hand
from transformers' logits, both-order averaging, the soft-label RM loss, and cai -> sft end to end."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.config import load_config
from rlhf_engine.data.builtin import demo_conversations
from rlhf_engine.data.chat import Message
from rlhf_engine.data.constitution import (
    ANSWER_PREFIX,
    ConstitutionError,
    comparison_prompt,
    critique_messages,
    load_constitution,
    parse_constitution,
    revision_messages,
)
from rlhf_engine.data.prompts import PromptRow
from rlhf_engine.data.reader import DataError, read_rows
from rlhf_engine.data.tokenizer import train_bpe_tokenizer
from rlhf_engine.models import Transformer, TransformerConfig, save_hf_model

CONSTITUTION = """\
principles:
  - name: kind
    critique: Say how the answer could be kinder.
    revision: Rewrite the answer to be kinder.
    comparison: Which answer is kinder?
  - name: brief
    critique: Say what in the answer is not needed.
    revision: Rewrite the answer in fewer words.
    comparison: Which answer is briefer?
examples:
  - prompt: Describe the stone.
    response: Stone stone stone.
    principle: brief
    critique: It repeats one word.
    revision: A hard grey rock.
"""


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A tiny causal LM with a ChatML tokenizer, saved as a Hugging Face checkpoint."""
    path = tmp_path_factory.mktemp("judge")
    texts = [m["content"] for r in demo_conversations(300) for m in r["messages"]]
    tok = train_bpe_tokenizer(texts + ["(A) (B) (C) The answer is: ("], vocab_size=384)
    cfg = TransformerConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=512)
    model = Transformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    save_hf_model(model, path, tokenizer=tok)
    (path / "constitution.yaml").write_text(CONSTITUTION)
    return path


# ------------------------------------------------------------------------------------------ constitution


def test_constitution_parses_principles_and_few_shot_examples(tmp_path):
    c = parse_constitution(CONSTITUTION, "c.yaml")
    assert [p.name for p in c.principles] == ["kind", "brief"]
    assert c.principles[1].revision == "Rewrite the answer in fewer words." and c.principles[1].line == 6
    assert c.examples[0].revision == "A hard grey rock."
    shipped = load_constitution("configs/examples/constitution.yaml")  # the example the configs use
    shipped.require("critique", "revision", "comparison", use="test")


@pytest.mark.parametrize("text,where,message", [
    ("principles:\n  - name: a\n    critique: c\n", 2, "critique and revision requests come together"),
    ("principles:\n  - name: a\n    comparison: q\n    critque: c\n", 4, "unknown key 'critque'"),
    ("principles:\n  - name: a\n    comparison: q\n  - name: a\n    comparison: r\n", 4, "used twice"),
    ("principles:\n  - comparison: q\n", 2, "has no 'name'"),
    ("principles:\n  - name: a\n    comparison: 3\n", 3, "must be a non-empty string"),
    ("principles:\n  - name: a\n    comparison: q\nexamples:\n  - prompt: p\n    response: r\n    principle: b\n"
     "    critique: c\n    revision: v\n", 7, "'b' is not a principle"),
    ("principles: [\n  {name: a\n", 3, "not valid YAML"),
    ("rules:\n  - name: a\n", 1, "unknown key 'rules'"),
])
def test_constitution_errors_name_the_file_and_line(tmp_path, text, where, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError, match=rf"bad\.yaml:{where}: .*{message}"):
        load_constitution(path)


def test_constitution_missing_requests_are_refused_for_the_use_that_needs_them():
    c = parse_constitution("principles:\n  - name: a\n    comparison: q\n", "judge_only.yaml")
    with pytest.raises(ConstitutionError, match=r"judge_only\.yaml:2: principle 'a' has no critique, revision"):
        c.require("critique", "revision", use="the critique-revision loop")


# ------------------------------------------------------------------------------------------ the prompts


def test_cai_critique_and_revision_prompts_render_exactly(judge):
    from transformers import AutoTokenizer

    c = parse_constitution(CONSTITUTION)
    prompt = [Message("system", "Be brief."), Message("user", "Describe the lemon.")]
    ask = critique_messages(prompt, "Lemon lemon.", c.principles[0], c)
    assert ask == [Message("system", "Be brief."),
                   Message("user", "Describe the stone."), Message("assistant", "Stone stone stone."),
                   Message("user", "Say what in the answer is not needed."), Message("assistant", "It repeats one word."),
                   Message("user", "Rewrite the answer in fewer words."), Message("assistant", "A hard grey rock."),
                   Message("user", "Describe the lemon."), Message("assistant", "Lemon lemon."),
                   Message("user", "Say how the answer could be kinder.")]
    revise = revision_messages(ask, "It is curt.", c.principles[0])
    assert revise[-2:] == [Message("assistant", "It is curt."), Message("user", "Rewrite the answer to be kinder.")]
    tok = AutoTokenizer.from_pretrained(judge)
    text = tok.apply_chat_template([m.__dict__ for m in revise[-4:]], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>assistant\nLemon lemon.<|im_end|>\n<|im_start|>user\nSay how the answer could be "
                    "kinder.<|im_end|>\n<|im_start|>assistant\nIt is curt.<|im_end|>\n<|im_start|>user\nRewrite the "
                    "answer to be kinder.<|im_end|>\n<|im_start|>assistant\n")
    plain = critique_messages("Describe the lemon.", "Sour.", c.principles[1], parse_constitution(
        "principles:\n  - name: brief\n    critique: C?\n    revision: R!\n"))
    assert plain == [Message("user", "Describe the lemon."), Message("assistant", "Sour."),
                     Message("user", "Say what in the answer is not needed.")]


def test_rlaif_comparison_prompt_renders_exactly(judge):
    from transformers import AutoTokenizer

    from rlhf_engine.labelers import judge_input_ids

    c = parse_constitution(CONSTITUTION)
    text = comparison_prompt([Message("user", "Describe the lemon.")], ["Sour fruit.", "A rock."], c.principles[0])
    assert text == ("Consider the following conversation between a human and an assistant:\nHuman: Describe the lemon.\n\n"
                    "Which answer is kinder?\nOptions:\n(A) Sour fruit.\n(B) A rock.\n")
    tok = AutoTokenizer.from_pretrained(judge)
    ids = judge_input_ids(tok, text)
    assert tok.decode(ids) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n{ANSWER_PREFIX}"
    with pytest.raises(ValueError, match="2..9"):
        comparison_prompt("x", ["only one"], c.principles[0])


# ------------------------------------------------------------------------------------------ the loop


class ScriptedSampler:
    """Stands in for the policy / reviser: answers are functions of the conversation, so rows are known."""

    def __init__(self, path, cfg, device):
        self.path = path

    def answer(self, conversations, generator, what):
        out = []
        for conv in conversations:
            if conv is None:
                out.append(None)
            elif conv[-1].content.startswith("Say"):  # a critique request: [..., answer, request]
                out.append(f"critique of [{conv[-2].content}]")
            elif conv[-1].content.startswith("Rewrite"):  # [..., prompt, answer, critique request, critique, request]
                prompt, answer, critique = conv[-5].content, conv[-4].content, conv[-2].content
                second = not answer.startswith("first answer")
                out.append("" if "garden" in prompt and second else f"{'v2' if second else 'v1'}({critique})")
            else:
                out.append(f"first answer to {conv[-1].content}")
        return out


def test_cai_loop_writes_a_revision_row_per_prompt_and_round_with_provenance(tmp_path, monkeypatch):
    from rlhf_engine.stages import cai

    monkeypatch.setattr(cai, "ChatSampler", ScriptedSampler)
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    prompts = ["Describe the lemon.", "Describe the garden.", "Describe the piano."]
    cfg = load_config("configs/cai_tiny.yaml", [f"cai.constitution_path={tmp_path / 'c.yaml'}", "cai.rounds=2",
                                                "trainer.seed=3", f"model.hf_path={tmp_path}"])
    rows, counts = cai.critique_and_revise(cfg, [PromptRow([Message("user", p)]) for p in prompts], "cpu")
    rng = random.Random(3)
    drawn = [[rng.choice(["kind", "brief"]) for _ in prompts] for _ in range(2)]  # per round, per prompt
    # the garden's second revision comes back empty: no row, counted, its first revision stands
    assert counts == {"prompts": 3, "rows": 5, "empty_revisions": 1, "too_long": 0}
    expected = []
    for i, p in enumerate(prompts):
        answer = f"first answer to {p}"
        for rnd in (1, 2):
            if p == "Describe the garden." and rnd == 2:
                continue
            revision = f"v{rnd}(critique of [{answer}])"
            expected.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": revision}],
                             "provenance": {"principle": drawn[rnd - 1][i], "round": rnd,
                                            "critique": f"critique of [{answer}]", "revised": answer}})
            answer = revision
    assert rows == expected
    final = load_config("configs/cai_tiny.yaml", [f"cai.constitution_path={tmp_path / 'c.yaml'}", "cai.rounds=2",
                                                  "trainer.seed=3", f"model.hf_path={tmp_path}", "cai.keep=final"])
    rows, counts = cai.critique_and_revise(final, [PromptRow([Message("user", p)]) for p in prompts], "cpu")
    assert [r["provenance"]["round"] for r in rows] == [2, 2] and counts["rows"] == 2


@pytest.mark.slow
def test_cai_then_sft_runs_end_to_end_on_a_tiny_local_model(judge, tmp_path):
    from rlhf_engine.data.chat import parse_sft_row
    from rlhf_engine.stages.cai import run_cai

    cfg = load_config("configs/cai_tiny.yaml", [
        f"model.hf_path={judge}", f"cai.constitution_path={judge / 'constitution.yaml'}", "cai.rounds=2",
        "cai.max_prompts=6", "rollout.max_new_tokens=12", "trainer.max_steps=4", "trainer.micro_batch_size=2",
        f"trainer.out_dir={tmp_path / 'cai'}"])
    summary = run_cai(cfg)
    rows = read_rows(tmp_path / "cai" / "revisions.jsonl", lambda r: r)
    assert summary["rows"] == len(rows) == 12 - summary["empty_revisions"] and len(rows) >= 6
    for row in rows:
        assert parse_sft_row(row)[-1].role == "assistant" and row["provenance"]["round"] in (1, 2)
        assert row["provenance"]["principle"] in ("kind", "brief") and row["provenance"]["critique"] is not None
    assert math.isfinite(summary["sft_eval_loss_final"]) and (tmp_path / "cai" / "sft" / "hf" / "config.json").exists()


# ------------------------------------------------------------------------------------------ the AI labeler


def _hand_letter_probs(judge_path, prompt, options, question, letters):
    """The judge's next-token probabilities of the shown letters, normalised over them, from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(judge_path)
    model = AutoModelForCausalLM.from_pretrained(judge_path).eval()
    body = ("Consider the following conversation between a human and an assistant:\nHuman: " + prompt + "\n\n"
            + question + "\nOptions:\n" + "".join(f"({letters[i]}) {y}\n" for i, y in enumerate(options)))
    text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"] + tok("The answer is: (", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    letter_ids = [tok.convert_tokens_to_ids(x) for x in letters[: len(options)]]
    p = logits.softmax(-1)
    shown = p[letter_ids]
    return shown / shown.sum(), int(p.argmax()) in letter_ids


def _labeler(judge, **overrides):
    from rlhf_engine.labelers import AILabeler

    cfg = load_config("configs/rlaif_tiny.yaml", [f"rlaif.judge_path={judge}",
                                                  f"rlaif.constitution_path={judge / 'constitution.yaml'}",
                                                  "rlaif.principles_per_comparison=1",
                                                  *[f"rlaif.{k}={v}" for k, v in overrides.items()]])
    return AILabeler(cfg.rlaif, seed=0)


def test_rlaif_soft_labels_equal_probabilities_normalised_by_hand_over_both_orders(judge):
    lab = _labeler(judge)
    ys = ["Sour yellow fruit.", "A rock.", "Lemon lemon lemon."]
    rows = [PromptRow([Message("user", "Describe the lemon.")])]
    rng = random.Random(0)  # the labeler's principle draws, one per pair, in pair order
    soft = lab.soft_labels(rows, [ys])[0]
    off = 0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        question = {"kind": "Which answer is kinder?", "brief": "Which answer is briefer?"}[
            rng.sample(["kind", "brief"], 1)[0]]
        forward, f_off = _hand_letter_probs(judge, "Describe the lemon.", [ys[i], ys[j]], question, "AB")
        backward, b_off = _hand_letter_probs(judge, "Describe the lemon.", [ys[j], ys[i]], question, "AB")
        want = (float(forward[0]) + float(backward[1])) / 2  # P(i preferred): A first, B when shown second
        assert soft[(i, j)] == pytest.approx(want, abs=2e-5)
        assert abs(float(forward[0]) - float(backward[1])) > 1e-4  # position bias exists, so averaging matters
        off += (not f_off) + (not b_off)
    report = lab.report()
    assert report["questions"] == 6 and report["off_choice"] == off  # the judge's argmax, counted
    assert 0 < report["choice_mass_mean"] < 1


def test_rlaif_one_order_and_kwise_labels(judge):
    ys = ["Sour yellow fruit.", "A rock.", "Lemon lemon lemon."]
    rows = [PromptRow([Message("user", "Describe the lemon.")])]
    one = _labeler(judge, both_orders="false").soft_labels(rows, [ys])[0]
    rng = random.Random(0)
    question = {"kind": "Which answer is kinder?", "brief": "Which answer is briefer?"}[rng.sample(["kind", "brief"], 1)[0]]
    forward, _ = _hand_letter_probs(judge, "Describe the lemon.", ys[:2], question, "AB")
    assert one[(0, 1)] == pytest.approx(float(forward[0]), abs=2e-5)
    kwise = _labeler(judge, comparison="kwise").soft_labels(rows, [ys])[0]
    rng = random.Random(0)
    question = {"kind": "Which answer is kinder?", "brief": "Which answer is briefer?"}[rng.sample(["kind", "brief"], 1)[0]]
    q1, _ = _hand_letter_probs(judge, "Describe the lemon.", ys, question, "ABC")
    q2, _ = _hand_letter_probs(judge, "Describe the lemon.", ys[::-1], question, "ABC")
    q = [(float(q1[k]) + float(q2[2 - k])) / 2 for k in range(3)]
    for (i, j), p in kwise.items():
        assert p == pytest.approx(q[i] / (q[i] + q[j]), abs=2e-5)


def test_rlaif_rows_carry_soft_labels_and_a_ranking_by_soft_win_rate(judge):
    from rlhf_engine.data.preference import parse_ranking

    lab = _labeler(judge, principles_per_comparison=2)
    ys = [["Sour yellow fruit.", "A rock.", "Lemon lemon lemon."], ["Water.", "A river runs to the sea."]]
    rows = [PromptRow([Message("user", "Describe the lemon.")]), PromptRow("Describe the river.")]
    labels = lab.label_all(rows, ys)
    for row, y, got in zip(rows, ys, labels):
        soft = {(i, j): p for i, j, p in got["soft_labels"]}
        rate = [sum(soft[(min(k, o), max(k, o))] if k < o else 1 - soft[(o, k)] for o in range(len(y)) if o != k)
                / (len(y) - 1) for k in range(len(y))]
        assert got["ranking"] == [sorted(set(round(r, 6) for r in rate), reverse=True).index(round(r, 6)) + 1 for r in rate]
        prompt = row.prompt if isinstance(row.prompt, str) else [m.__dict__ for m in row.prompt]
        parsed = parse_ranking({"prompt": prompt, "responses": y, **got})
        assert parsed.soft is not None and len(parsed.labelled_pairs()) == len(y) * (len(y) - 1) // 2


def test_rlaif_reward_model_judge_gives_sigmoid_of_score_differences(judge, tmp_path):
    from rlhf_engine.data.preference import tokenize_response
    from rlhf_engine.labelers import AILabeler
    from rlhf_engine.models import load_hf_model, load_tokenizer
    from rlhf_engine.models.score import ScoreModel, save_score_model

    tok = load_tokenizer(judge)
    rm = ScoreModel.from_lm(load_hf_model(judge), 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rm.head.score.weight.mul_(30.0)
    save_score_model(rm, tmp_path / "rm", tokenizer=tok)
    cfg = load_config("configs/rlaif_tiny.yaml", [f"rlaif.judge_path={tmp_path / 'rm'}"])
    ys = ["Sour yellow fruit.", "A rock.", "Lemon lemon lemon."]
    row = PromptRow([Message("user", "Describe the lemon.")])
    soft = AILabeler(cfg.rlaif).soft_labels([row], [ys])[0]
    with torch.no_grad():
        r = [float(rm(torch.tensor([tokenize_response(tok, row.prompt, y)[0]]))[0, -1, 0]) for y in ys]
    for (i, j), p in soft.items():
        assert p == pytest.approx(1 / (1 + math.exp(r[j] - r[i])), abs=1e-5)


def test_rlaif_judge_without_single_token_choice_letters_is_refused(judge, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_engine.labelers import AILabeler
    from rlhf_engine.models import load_hf_model

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="world", pad_token="[UNK]")
    save_hf_model(load_hf_model(judge), tmp_path / "wordy", tokenizer=tok)
    cfg = load_config("configs/rlaif_tiny.yaml", [f"rlaif.judge_path={tmp_path / 'wordy'}",
                                                  f"rlaif.constitution_path={judge / 'constitution.yaml'}"])
    with pytest.raises(ValueError, match="no single token for the choice letter 'A'"):
        AILabeler(cfg.rlaif)


def test_rlaif_labels_drop_questions_below_the_choice_mass_floor(judge):
    lab = _labeler(judge, min_choice_mass=0.999)  # a random judge puts far less on two letters
    labels = lab.label_all([PromptRow("Describe the lemon.")], [["Sour.", "A rock."]])
    assert labels == [None]
    assert lab.report()["dropped_low_mass"] == 2 and lab.report()["unlabelled_prompts"] == 1


def test_rlaif_stage_writes_rankings_the_rm_reads(judge, tmp_path):
    from rlhf_engine.data.preference import parse_ranking
    from rlhf_engine.stages.rlaif import run_rlaif

    cfg = load_config("configs/rlaif_tiny.yaml", [
        f"model.hf_path={judge}", f"rlaif.judge_path={judge}", f"rlaif.constitution_path={judge / 'constitution.yaml'}",
        "rlaif.responses_per_prompt=3", "rollout.max_new_tokens=8", f"trainer.out_dir={tmp_path / 'rlaif'}"])
    summary = run_rlaif(cfg)
    ranked = read_rows(tmp_path / "rlaif" / "rankings.jsonl", parse_ranking)
    assert summary["labelled"] == len(ranked) >= 3 and all(r.soft is not None for r in ranked)
    assert summary["questions"] == 2 * 2 * sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in ranked)
    from rlhf_engine.stages.reward import run_reward_model

    rm = run_reward_model(load_config("configs/rm_tiny.yaml", [  # the RM trains on those soft-labelled rows
        f"model.hf_path={judge}", "model.architecture=null", f"data.train_path={tmp_path / 'rlaif' / 'rankings.jsonl'}",
        f"data.eval_path={tmp_path / 'rlaif' / 'rankings.jsonl'}", "trainer.max_steps=2", "trainer.micro_batch_size=2",
        "trainer.save_every=0", f"trainer.out_dir={tmp_path / 'rm'}"]))
    assert math.isfinite(rm["heldout_loss"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "responses": ["a", "b"]}\n{"prompt": "y", "responses": ["a", "a"]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*repeats a response"):
        run_rlaif(load_config("configs/rlaif_tiny.yaml", [f"data.train_path={bad}", f"trainer.out_dir={tmp_path / 'b'}"]))


@pytest.mark.slow
def test_rlaif_labeler_in_iterate_writes_soft_labels_and_retrains_the_rm(judge, tmp_path):
    import yaml

    from rlhf_engine.data.preference import parse_ranking
    from rlhf_engine.stages.iterate import run_iterated

    recipe = {
        "model": {"hf_path": str(judge), "trunk_layers": 1},
        "data": {"seq_len": 96, "builtin_rows": 200, "eval_fraction": 0.05},
        "optim": {"lr": 2.0e-3, "schedule": "constant"},
        "algorithm": {"rl": {"prompts_per_rollout": 8, "group": 2, "kl_coef": 0.02, "eval_prompts": 8}},
        "rollout": {"max_new_tokens": 8},
        "iterate": {"rounds": 1, "prompts_per_round": 8, "responses_per_prompt": 3, "labeler": "ai",
                    "rm_steps": 4, "rl_steps": 2},
        "rlaif": {"judge_path": str(judge), "constitution_path": str(judge / "constitution.yaml")},
        "trainer": {"max_steps": 1, "micro_batch_size": 4, "out_dir": str(tmp_path / "run")},
        "logging": {"log_every": 5, "progress_bar": False, "tensorboard": False},
    }
    (tmp_path / "it.yaml").write_text(yaml.safe_dump(recipe))
    summary = run_iterated(load_config(tmp_path / "it.yaml"))
    rows = read_rows(tmp_path / "run/round_0/rankings.jsonl", parse_ranking)
    assert rows and all(r.soft is not None for r in rows)
    labeler = summary["rounds"][0]["labeler"]
    assert labeler["questions"] == 2 * sum(len(r.soft) for r in rows)  # both orders of every labelled pair
    assert summary["rounds"][0]["rm_heldout_accuracy"] is not None


def test_iterate_accepts_the_ai_labeler(judge, tmp_path):
    from rlhf_engine.labelers import AILabeler, build_labeler

    cfg = load_config("configs/iterate_tiny.yaml", [
        "iterate.labeler=ai", f"rlaif.judge_path={judge}", f"rlaif.constitution_path={judge / 'constitution.yaml'}"])
    labeler = build_labeler(cfg, tmp_path, 0)
    assert isinstance(labeler, AILabeler)
    assert labeler.rank_all([PromptRow("Describe the lemon.")], [["Sour.", "A rock."]])[0] in ([1, 2], [2, 1], [1, 1])


# ------------------------------------------------------------------------------------------ soft-label RM


def test_rlaif_soft_label_ranking_rows_parse_and_bad_ones_name_file_and_line(tmp_path):
    from rlhf_engine.data.preference import parse_ranking

    ok = parse_ranking({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 1, 1],
                        "soft_labels": [[0, 1, 0.25], [2, 1, 0.5]]})
    assert ok.labelled_pairs() == [(1, 0, 0.75), (2, 1, 0.5)] and ok.labelled_pairs(soft=False) == []
    pair = parse_ranking({"prompt": "p", "chosen": "a", "rejected": "b", "soft_label": 0.8})
    assert pair.labelled_pairs() == [(0, 1, 0.8)]
    path = tmp_path / "r.jsonl"
    for row, message in [({"soft_labels": [[0, 0, 0.5]]}, "i != j"), ({"soft_labels": [[0, 1, 1.5]]}, r"\[0, 1\]"),
                         ({"soft_labels": [[0, 1, 0.5], [1, 0, 0.5]]}, "labelled twice"), ({"soft_labels": []}, "non-empty")]:
        path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}) + "\n"
                        + json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2], **row}) + "\n")
        with pytest.raises(DataError, match=rf"r\.jsonl:2: .*{message}"):
            read_rows(path, parse_ranking)


def test_rlaif_rm_loss_on_soft_labels_equals_the_hand_computed_cross_entropy():
    from rlhf_engine.algorithms.reward import ranking_objective
    from rlhf_engine.data.preference import pair_batch, parse_ranking
    from rlhf_engine.data.streams import StepTotals

    rows = [parse_ranking({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 3],
                           "soft_labels": [[0, 1, 0.9], [0, 2, 0.3], [1, 2, 0.5]]}),
            parse_ranking({"prompt": "q", "chosen": "d", "rejected": "e", "soft_label": 0.7}),
            parse_ranking({"prompt": "r", "responses": ["f", "g"], "ranking": [2, 1]})]  # a hard row among them
    seqs = [[([1, 2, 3 + k], 2) for k in range(len(r.responses))] for r in rows]
    batch = pair_batch([(s, r.labelled_pairs()) for s, r in zip(seqs, rows)], 16, 0)
    scores = torch.tensor([0.4, -0.2, 1.1, 0.3, 0.9, -0.5, 0.25])  # a, b, c, d, e, f, g
    out = torch.zeros(batch.seqs.input_ids.shape + (1,))
    out.view(-1, 1)[batch.seqs.last, 0] = scores
    objective = ranking_objective("prompt")
    totals = StepTotals({"prompts": 3, "pairs": 5, "tokens": 1})
    loss, stats = objective.passes(batch)[0].loss(out, totals)

    def ce(rw, rl, t):  # soft cross entropy, by hand
        return -(t * math.log(1 / (1 + math.exp(rl - rw))) + (1 - t) * math.log(1 / (1 + math.exp(rw - rl))))

    a, b, c, d, e, f, g = scores.tolist()
    want = ((ce(a, b, 0.9) + ce(c, a, 0.7) + ce(b, c, 0.5)) / 3 + ce(d, e, 0.7) + ce(g, f, 1.0)) / 3
    assert float(loss) == pytest.approx(want, rel=1e-6)
    hard = F.logsigmoid(torch.tensor(g - f))  # t = 1 is InstructGPT's -log sigmoid exactly
    assert ce(g, f, 1.0) == pytest.approx(-float(hard), rel=1e-6)


def test_cai_command_line_reports_a_bad_constitution_in_one_line(judge, tmp_path, capsys):
    from rlhf_engine.cli import main

    bad = tmp_path / "constitution.yaml"
    bad.write_text("principles:\n  - name: kind\n    critique: Be kinder?\n")
    code = main(["cai", "--config", "configs/cai_tiny.yaml", f"model.hf_path={judge}", f"cai.constitution_path={bad}",
                 f"trainer.out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: {bad}:2: principles[0] ('kind'): critique and revision requests come together")
