"""DPO, conservative DPO and IPO against TRL's own code: the losses and their gradients on given
log-probs, and 5 training steps of our DPO stage against TRL's DPOTrainer on the same tiny model."""

import json
import os

import pytest
import torch

from rlhf_engine.algorithms.dpo import DPO_LOSSES

trl = pytest.importorskip("trl", reason="TRL is the oracle (installed by the dev extra)")
from trl_oracle import trl_dpo_loss  # noqa: E402


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    lens_c, lens_r = [3, 5, 2, 7], [4, 1, 6, 2]
    pc = [(-torch.rand(n, generator=g) * 3).requires_grad_() for n in lens_c]
    pr = [(-torch.rand(n, generator=g) * 3).requires_grad_() for n in lens_r]
    ref_c = -torch.rand(4, generator=g) * 10
    ref_r = -torch.rand(4, generator=g) * 10
    return pc, pr, ref_c, ref_r


def _ours(pc, pr, ref_c, ref_r, loss_type, beta, eps):
    d_w = torch.stack([x.sum() for x in pc]) - ref_c
    d_l = torch.stack([x.sum() for x in pr]) - ref_r
    n_w = torch.tensor([float(len(x)) for x in pc])
    n_l = torch.tensor([float(len(x)) for x in pr])
    return DPO_LOSSES[loss_type](d_w, d_l, n_w, n_l, beta=beta, label_smoothing=eps).mean()


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.1), ("ipo", 0.5)])
def test_loss_and_gradients_equal_trl(loss_type, beta):
    pc, pr, ref_c, ref_r = _case()
    ours = _ours(pc, pr, ref_c, ref_r, loss_type, beta, 0.0)
    (ours * 3.0).backward()  # upstream gradient != 1
    ours_grads = [x.grad.clone() for x in pc + pr]
    pc2, pr2, _, _ = _case()
    theirs = trl_dpo_loss(pc2, pr2, ref_c, ref_r, beta=beta, loss_type=loss_type)
    (theirs * 3.0).backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    for a, b in zip(ours_grads, [x.grad for x in pc2 + pr2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_conservative_dpo_equals_trl_per_pair():
    """TRL 1.16 ignores label_smoothing for 'sigmoid'; its 'aot' loss reduces to cDPO for one pair."""
    pc, pr, ref_c, ref_r = _case(1)
    eps, beta = 0.15, 0.3
    ours = _ours(pc, pr, ref_c, ref_r, "cdpo", beta, eps)
    per_pair = [trl_dpo_loss([pc[i]], [pr[i]], ref_c[i : i + 1], ref_r[i : i + 1], beta=beta, loss_type="aot",
                             label_smoothing=eps) for i in range(4)]
    assert ours.item() == pytest.approx(torch.stack(per_pair).mean().item(), rel=1e-6)
    d = (torch.stack([x.sum() for x in pc]) - ref_c) - (torch.stack([x.sum() for x in pr]) - ref_r)
    hand = (-(1 - eps) * torch.nn.functional.logsigmoid(beta * d) - eps * torch.nn.functional.logsigmoid(-beta * d))
    assert ours.item() == pytest.approx(hand.mean().item(), rel=1e-6)


def test_label_smoothing_only_with_cdpo():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="cdpo"):
        DPO_LOSSES["sigmoid"](z, z, z + 1, z + 1, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO_LOSSES["cdpo"](z, z, z + 1, z + 1, beta=0.1, label_smoothing=0.0)
    with pytest.raises(KeyError, match="registered: cdpo, ipo, sigmoid"):
        DPO_LOSSES["hinge"]


# ---------------------------------------------------------------------------------------------- trajectory

ROWS = [
    {"prompt": "the cat sat on the", "chosen": " mat and purred", "rejected": " dog"},
    {"prompt": "two plus two is", "chosen": " four", "rejected": " five or maybe six"},
    {"prompt": "the sky is", "chosen": " blue today", "rejected": " green and red"},
    {"prompt": "water is", "chosen": " wet", "rejected": " dry sand"},
]


def _tiny_llama(path):
    """A tiny untied Llama and a word-level tokenizer that adds BOS, saved as an HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([r[k] for r in ROWS for k in ("prompt", "chosen", "rejected")],
                           trainer=trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", add_bos_token=True, add_eos_token=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def _trl_losses(model_dir, tok, out_dir, loss_type, steps):
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Record(TrainerCallback):
        losses: list = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    args = DPOConfig(
        output_dir=str(out_dir), beta=0.1, loss_type=[loss_type], per_device_train_batch_size=len(ROWS),
        max_steps=steps, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        report_to="none", use_cpu=True, seed=0, logging_steps=1, save_strategy="no", eval_strategy="no",
        bf16=False, gradient_checkpointing=False, train_sampling_strategy="sequential", max_length=None,
        disable_dropout=True, dataloader_num_workers=0,
    )
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rec = Record()
    rec.losses = []
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tok, callbacks=[rec])
    trainer.train()
    return rec.losses


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_stage_tracks_trl_dpotrainer_over_5_steps(tmp_path, loss_type):
    """Same model, tokens, batch (all 4 rows per step, so order cannot matter) and hyperparameters: our
    5 losses equal TRL's within 1e-5 relative (fp32; the two differ only in packing vs padding and in
    summation order)."""
    from rlhf_engine.config import load_config
    from rlhf_engine.data.preference import parse_ranking, tokenize_response
    from rlhf_engine.stages.dpo import run_dpo

    os.environ["TQDM_DISABLE"] = "1"
    model_dir = tmp_path / "tiny"
    tok = _tiny_llama(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    theirs = _trl_losses(model_dir, tok, tmp_path / "trl", loss_type, steps=5)

    cfg = load_config(None, [
        f"model.hf_path={model_dir}", f"data.train_path={data}", "data.eval_fraction=0", "data.seq_len=32",
        "algorithm.name=dpo", f"algorithm.dpo.loss_type={loss_type}", "algorithm.dpo.beta=0.1",
        "optim.lr=1e-3", "optim.schedule=linear", "optim.min_lr_ratio=0", "optim.betas=[0.9,0.999]",
        "optim.weight_decay=0", "optim.grad_clip=1.0", "trainer.max_steps=5", f"trainer.micro_batch_size={len(ROWS)}",
        "logging.log_every=1", f"trainer.out_dir={tmp_path / 'ours'}", "logging.tensorboard=false"])
    # Same tokens as TRL's: BOS + prompt | completion + EOS, split at the common prefix.
    ids, n_prompt = tokenize_response(tok, *((r := parse_ranking(ROWS[0])).prompt, r.responses[0]))
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.convert_ids_to_tokens(ids[n_prompt:]) == ["mat", "and", "purred", "</s>"]
    run_dpo(cfg)
    records = [json.loads(x) for x in (tmp_path / "ours/metrics.jsonl").read_text().splitlines()]
    ours = [r["loss"] for r in records if "loss" in r]
    assert len(ours) == len(theirs) == 5
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6)  # policy == reference: ln 2 for sigmoid
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours[-1] < ours[0] - 0.01  # and it moved
