"""A byte-level BPE tokenizer trained in memory, with a ChatML chat template, for scratch models.

Saved and reloaded through transformers (``save_pretrained`` / ``AutoTokenizer``) like any real
checkpoint's tokenizer, so the rest of the engine never distinguishes the two.
"""

from __future__ import annotations

from typing import Iterable

PAD, BOS, EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML. The assistant turn ends with <|im_end|>, which the model learns to emit (it is a stop token).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast`` with the chat template.

    The vocabulary holds the 256 byte symbols, the special tokens and up to ``vocab_size`` in all with
    merges; a small corpus may stop short of ``vocab_size``.
    """
    # lazy: transformers takes seconds to import, and only scratch runs train a tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast  # lazy (see above)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,  # end of an assistant turn: generation stops here
        pad_token=PAD,
        additional_special_tokens=[EOS, IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
