"""Megatron indexed datasets: preprocess -> read gives the same tokens; fixed-length samples cover the
corpus; SFT trains with a token budget; PPO-ptx reads an indexed corpus."""

import json

import numpy as np
import pytest

from rlhf_engine.cli import main
from rlhf_engine.data.builtin import demo_conversations
from rlhf_engine.data.chat import parse_sft_row, tokenize_sft_row
from rlhf_engine.data.indexed import indexed_examples, is_indexed, read_documents
from rlhf_engine.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rows = [{"text": " ".join(m["content"] for m in r["messages"])} for r in demo_conversations(120, seed=3)]
    rows += demo_conversations(30, seed=4)  # chat rows are rendered with the template
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer([r["text"] for r in rows[:120]], vocab_size=300)
    tok.save_pretrained(d / "tok")
    # the CLI's preprocessing, once for the module (every test reads its output)
    assert main(["data", "preprocess", "--input", str(d / "rows.jsonl"), "--output-prefix", str(d / "idx/corpus"),
                 "--tokenizer", str(d / "tok")]) == 0
    return d, rows, tok


def test_preprocess_round_trip(corpus):
    d, rows, tok = corpus
    assert is_indexed(d / "idx/corpus") and is_indexed(d / "idx/corpus.bin") and not is_indexed(d / "rows.jsonl")
    docs = read_documents(d / "idx/corpus")
    assert len(docs) == len(rows)
    assert np.fromfile(d / "idx/corpus.bin", dtype=np.uint16).size == sum(len(x) for x in docs)  # 2 bytes a token
    for doc, row in zip(docs, rows):
        ids, _ = tokenize_sft_row(tok, parse_sft_row(row))
        if "text" in row:
            ids = ids + [tok.eos_token_id] if ids[-1:] != [tok.eos_token_id] else ids
        assert doc.tolist() == ids


def test_indexed_examples_are_the_concatenated_stream(corpus):
    d, _, _ = corpus
    docs = read_documents(d / "idx/corpus")
    ex = indexed_examples(d / "idx/corpus", 32, seed=1)
    stream = np.concatenate(docs).tolist()
    assert len(ex) == (len(stream) - 1) // 31 and all(len(e.input_ids) == 32 for e in ex)
    assert all(e.labels[:-1] == e.input_ids[1:] and e.labels[-1] == -100 for e in ex)
    # every sample is a window of one epoch's shuffled document stream; samples tile it with a 1-token overlap
    from rlhf_engine.data.packer import sample_index

    order, starts, shuffle = sample_index([len(x) for x in docs], 31, 1, 1)
    flat = np.concatenate([docs[i] for i in order]).tolist()
    for e, s in zip(ex[:50], shuffle[:50].tolist()):
        assert e.input_ids == flat[s * 31 : s * 31 + 32]
    assert [e.input_ids for e in indexed_examples(d / "idx/corpus", 32, seed=1)][:5] == [e.input_ids for e in ex[:5]]


@pytest.mark.slow
def test_sft_on_an_indexed_corpus_with_a_token_budget(corpus, tmp_path):
    d, _, _ = corpus
    args = ["sft", "--config", "configs/sft_tiny.yaml", f"data.train_path={d / 'idx/corpus'}", "data.seq_len=64",
            f"model.tokenizer_path={d / 'tok'}", "model.architecture.vocab_size=300", "model.architecture.num_layers=2",
            "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128", "trainer.max_steps=6",
            "trainer.token_budget=256", "trainer.grad_accum_steps=2", "trainer.eval_batches=2", "logging.log_every=1",
            "logging.progress_bar=false", f"trainer.out_dir={tmp_path / 'sft'}"]
    import os
    from pathlib import Path

    os.chdir(Path(__file__).resolve().parents[1])
    assert main(args) == 0
    recs = [json.loads(line) for line in (tmp_path / "sft/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "step" in r]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"]
    assert main(args[:-1] + ["trainer.token_budget=32", f"trainer.out_dir={tmp_path / 'bad'}"]) == 2  # < seq_len


def test_token_budget_stream_balances_each_step_across_ranks():
    from rlhf_engine.config import load_config
    from rlhf_engine.data.packing import Example
    from rlhf_engine.data.demonstrations import sft_stream

    rng = np.random.default_rng(0)
    examples = [Example([1] * int(n), [1] * int(n)) for n in rng.integers(4, 64, size=400)]
    cfg = load_config("configs/sft_tiny.yaml", ["data.seq_len=64", "trainer.token_budget=128",
                                                "trainer.grad_accum_steps=3"])
    plans = sft_stream(examples, cfg, 0, dp=4).plan_epoch(0)
    assert len(plans) % 12 == 0
    placed = sorted(i for p in plans for row in p for i in row)
    assert len(placed) == len(set(placed)) and len(placed) > 350
    size = lambda p: sum(len(examples[i].input_ids) for i in p[0])  # noqa: E731
    for s in range(0, len(plans), 12):  # rank r takes positions r, r + 4, r + 8 of the step
        step = plans[s : s + 12]
        loads = [sum(size(step[j]) for j in range(r, 12, 4)) for r in range(4)]
        # no worse than dealing the step's micro-batches largest first round-robin, and within one micro-batch
        by_size = sorted(map(size, step), reverse=True)
        dealt = [sum(by_size[r::4]) for r in range(4)]
        assert max(loads) - min(loads) <= min(max(dealt) - min(dealt), 128)
        assert all(sum(len(examples[i].input_ids) for i in p[0]) <= 128 for p in plans[s : s + 12])


@pytest.mark.slow
def test_ppo_ptx_reads_an_indexed_corpus(corpus, tmp_path):
    from test_rl_stage import _config

    from rlhf_engine.stages.rl import run_rl

    d, _, _ = corpus
    s = run_rl(_config(tmp_path, "ppo", f"data.pretrain_path={d / 'idx/corpus'}", "algorithm.rl.ptx_coef=1.0",
                       f"model.tokenizer_path={d / 'tok'}", "trainer.max_steps=2", "algorithm.rl.ptx_micro_batch_size=2"))
    recs = [json.loads(line) for line in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    assert s["finished"] and all(r["ptx_loss"] > 0 for r in recs if "loss" in r)
