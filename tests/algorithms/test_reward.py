"""Reward, preference and rule-model losses against hand computations, the one-forward-per-response
layout, and the stages learning synthetic preferences (held-out accuracy)."""

import json
import math

import pytest
import torch

from rlhf_engine.data.streams import StepTotals
from rlhf_engine.algorithms.reward import choice_loss, pairwise_loss, ranking_objective, rule_loss
from rlhf_engine.config import load_config
from rlhf_engine.data.preference import Ranking, pair_batch, parse_ranking, tokenize_response
from rlhf_engine.data.tokenizer import train_bpe_tokenizer
from rlhf_engine.models import Transformer, TransformerConfig
from rlhf_engine.models.score import ScoreModel
from rlhf_engine.stages.reward import run_reward_model
from synthetic import choices, hidden_score, rankings, rule_rows, write_jsonl

ARCH = ["model.architecture.vocab_size=320", "model.architecture.hidden_size=64",
        "model.architecture.intermediate_size=128", "model.architecture.num_layers=2",
        "model.architecture.num_heads=4", "model.architecture.num_kv_heads=2",
        "model.architecture.max_position_embeddings=128"]
BASE = ARCH + ["data.seq_len=128", "optim.lr=2e-3", "trainer.micro_batch_size=8", "logging.log_every=10",
               "trainer.eval_batches=8", "data.eval_fraction=0.15", "logging.tensorboard=false"]


def test_pairs_are_all_untied_pairs_winner_first():
    r = Ranking("p", ("a", "b", "c", "d"), (2, 1, 3, 1))
    assert sorted(r.pairs()) == sorted([(1, 0), (0, 2), (3, 0), (1, 2), (3, 2)])  # (b, d) tied: dropped
    assert len(Ranking("p", tuple("abcdefghi"), tuple(range(1, 10))).pairs()) == math.comb(9, 2)


def test_choice_loss_by_hand():
    scores = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.7, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    chosen = torch.tensor([2, 0])
    got = choice_loss(scores, valid, chosen, bt_weight=0.5, reg_weight=0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    p0 = -math.log(math.exp(2.0) / (math.exp(1.0) + math.exp(-0.5) + math.exp(2.0)))
    bt0 = (-math.log(sig(2.0 - 1.0)) - math.log(sig(2.0 + 0.5))) / 2
    reg0 = (1.0 + 0.25 + 4.0) / 3
    p1 = -math.log(math.exp(0.3) / (math.exp(0.3) + math.exp(0.7)))  # the invalid third option is ignored
    bt1 = -math.log(sig(0.3 - 0.7))
    reg1 = (0.09 + 0.49) / 2
    expected = torch.tensor([p0 + 0.5 * bt0 + 0.1 * reg0, p1 + 0.5 * bt1 + 0.1 * reg1])
    torch.testing.assert_close(got, expected)


def test_rule_loss_masks_unlabeled_entries():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    got = rule_loss(logits, labels, mask)
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))  # noqa: E731
    expected = torch.tensor([[bce(2.0, 1.0), 0.0], [bce(0.5, 0.0), bce(3.0, 1.0)]])
    torch.testing.assert_close(got, expected)


class _LastTokenScore(torch.nn.Module):
    """A stand-in score model: the score at a position is its token id / 10 (a response's score is set by
    its last token)."""

    def forward(self, input_ids, document_ids=None):
        return (input_ids.float() / 10)[..., None]  # (B, S, 1)


def test_ranking_weighting_mixed_k_before_and_after():
    """A K=4 and a K=9 prompt in one batch. 'pair' (the old default) pools the 6 + 36 pairs, so the K=9
    prompt carries 36/42 of the loss; 'prompt' (InstructGPT, the default now) weights each prompt's pairs
    1/C(K, 2) and averages over the 2 prompts. Both by hand."""
    small = [9, 7, 4, 0]  # scores x10 of the K=4 prompt's responses, ranked as listed (1 = best): agrees
    large = [1, 8, 2, 6, 4, 9, 3, 7, 5]  # the K=9 prompt's: mostly disagrees
    rows = []
    for scores in (small, large):
        responses = [([0, 0, s], 2) for s in scores]  # (ids, prompt length): the last token sets the score
        ranks = list(range(1, len(scores) + 1))
        pairs = [(i, j) for i in range(len(scores)) for j in range(i + 1, len(scores)) if ranks[i] < ranks[j]]
        rows.append((responses, pairs))
    batch = pair_batch(rows, seq_len=64, pad_id=0)
    assert batch.counts() == {"tokens": 39, "pairs": 42, "prompts": 2}
    per_pair = lambda sc: [-math.log(1 / (1 + math.exp(-(sc[i] - sc[j]) / 10)))  # noqa: E731
                           for i in range(len(sc)) for j in range(i + 1, len(sc))]
    a, b = per_pair(small), per_pair(large)
    pooled = (sum(a) + sum(b)) / 42
    per_prompt = (sum(a) / 6 + sum(b) / 36) / 2
    totals = StepTotals.of([batch])
    got_pooled, _ = ranking_objective("pair")(_LastTokenScore(), batch, totals)
    got_prompt, stats = ranking_objective("prompt")(_LastTokenScore(), batch, totals)
    assert got_pooled.item() == pytest.approx(pooled, rel=1e-6)
    assert got_prompt.item() == pytest.approx(per_prompt, rel=1e-6)
    assert per_prompt < pooled - 0.05  # pooled, the K=9 prompt's 36 pairs dominate
    correct = sum(x < math.log(2) for x in a + b)  # pairs ordered right: loss below -log(1/2)
    assert stats["accuracy"] == correct  # accuracy stays a sum over pairs (reported per pair)
    assert ranking_objective("prompt").target == "prompts" and ranking_objective("pair").target == "pairs"


def test_ranking_loss_is_mean_of_pairwise_losses_and_each_response_forwards_once():
    rows = [parse_ranking(r) for r in rankings(3, seed=4)]
    tok = train_bpe_tokenizer([y for r in rankings(50) for y in r["responses"]], vocab_size=300)
    cfg = TransformerConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=128)
    lm = Transformer(cfg)
    lm.reset_parameters(torch.Generator().manual_seed(0))
    model = ScoreModel.from_lm(lm, trunk_layers=1, generator=torch.Generator().manual_seed(1))
    tokenized = [([tokenize_response(tok, r.prompt, y) for y in r.responses], r.pairs()) for r in rows]
    batch = pair_batch(tokenized, seq_len=128, pad_id=tok.pad_token_id)

    forwarded = []  # tokens of documents entering the model, per call
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: forwarded.append(int((kw["document_ids"] >= 0).sum())), with_kwargs=True)
    loss, stats = ranking_objective("pair")(model, batch, StepTotals.of([batch]))
    hook.remove()
    K = sum(len(r.responses) for r in rows)
    assert len(forwarded) == 1 and batch.seqs.num_sequences == K  # one forward, each response once
    assert forwarded[0] == sum(len(ids) for t in tokenized for ids, _ in t[0])
    assert batch.counts()["pairs"] == sum(len(r.pairs()) for r in rows)

    # Oracle: score each response alone (unpacked), then average the pairwise losses by hand.
    with torch.no_grad():
        alone = [[model(torch.tensor([ids]))[0, -1, 0] for ids, _ in t[0]] for t in tokenized]
    pair_losses = [pairwise_loss(s[w], s[lo]) for s, r in zip(alone, rows) for w, lo in r.pairs()]
    assert loss.item() == pytest.approx(torch.stack(pair_losses).mean().item(), rel=1e-5)
    correct = sum(float(s[w] > s[lo]) for s, r in zip(alone, rows) for w, lo in r.pairs())
    assert stats["accuracy"] == correct

    # algorithm.rm.pooling=mean: a response's score is the mean of its response tokens' scores
    loss, _ = ranking_objective("pair", "mean")(model, batch, StepTotals.of([batch]))
    with torch.no_grad():
        pooled = [[model(torch.tensor([ids]))[0, n:, 0].mean() for ids, n in t[0]] for t in tokenized]
    pair_losses = [pairwise_loss(s[w], s[lo]) for s, r in zip(pooled, rows) for w, lo in r.pairs()]
    assert loss.item() == pytest.approx(torch.stack(pair_losses).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_ranking_rm_learns_hidden_scorer_in_60_steps(tmp_path):
    data = write_jsonl(tmp_path / "rankings.jsonl", rankings(500, noise=0.5))
    summary = run_reward_model(load_config(None, BASE + [
        "algorithm.name=rm", f"data.train_path={data}", "trainer.max_steps=60", f"trainer.out_dir={tmp_path / 'rm'}"]))
    assert summary["heldout_accuracy"] > 0.8, summary  # chance is 0.5; the labelers agree with the scorer ~0.85
    assert summary["heldout_accuracy"] > summary["heldout_accuracy_initial"] + 0.1
    # Normalised: the training responses score 0 on average; the export loads in transformers.
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm/hf")
    assert hf.config.reward_bias[0] == pytest.approx(-summary["normalization_shift"])


@pytest.mark.slow
def test_sparrow_preference_and_rule_models_learn(tmp_path):
    pm = run_reward_model(load_config(None, BASE + [
        "algorithm.name=sparrow", f"data.train_path={write_jsonl(tmp_path / 'c.jsonl', choices(400))}",
        "trainer.max_steps=60", f"trainer.out_dir={tmp_path / 'pm'}"]))
    assert pm["heldout_accuracy"] > pm["heldout_accuracy_initial"] + 0.2, pm
    rules = run_reward_model(load_config(None, BASE + [
        "algorithm.name=rules", "algorithm.rules.names=[no_stone,short]",
        f"data.train_path={write_jsonl(tmp_path / 'r.jsonl', rule_rows(400))}", "trainer.max_steps=60",
        f"trainer.out_dir={tmp_path / 'rules'}"]))
    assert rules["heldout_accuracy"] > 0.85, rules
    config = json.loads((tmp_path / "rules/hf/config.json").read_text())
    assert config["id2label"] == {"0": "no_stone", "1": "short"}


def test_sparrow_resume_is_bit_for_bit(tmp_path):
    """The distractors are drawn from the data position, so a resumed run sees the same batches."""
    data = write_jsonl(tmp_path / "c.jsonl", choices(60))
    common = BASE + ["algorithm.name=sparrow", f"data.train_path={data}", "trainer.max_steps=6",
                     "trainer.micro_batch_size=4", "logging.log_every=1", "algorithm.sparrow.extra_negatives=2"]
    run_reward_model(load_config(None, common + [f"trainer.out_dir={tmp_path / 'a'}"]))
    cut = common + [f"trainer.out_dir={tmp_path / 'b'}", "trainer.save_every=3"]
    run_reward_model(load_config(None, cut + ["trainer.stop_after=3"]))
    run_reward_model(load_config(None, cut))
    losses = {}
    for run in ("a", "b"):
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        losses[run] = [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]
    assert losses["a"] == losses["b"] and len(losses["a"]) == 6


def test_hidden_scorer_is_what_the_rankings_encode():
    """Sanity of the synthetic data itself: noisy rankings agree with the hidden scorer mostly."""
    agree = total = 0
    for row in rankings(200, noise=0.5):
        r = parse_ranking(row)
        for w, lo in r.pairs():
            total += 1
            agree += hidden_score(r.responses[w]) > hidden_score(r.responses[lo])
    assert 0.75 < agree / total < 1.0
