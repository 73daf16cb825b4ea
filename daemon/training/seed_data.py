"""The seed model's data: stdlib corpus -> byte-level BPE tokenizer -> training blocks.

The tokenizer puts its special tokens first (``<s>``=0, ``</s>``=1, ``<pad>``=2, then
the chat role markers) and carries a chat template, so chat-format documents train on
the seed model exactly as on any HF chat model.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.training import corpus
from daemon.training.seed_spec import SeedSpec

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Each turn is "<|role|>\n{content}</s>\n"; the assistant's content and its </s> are what
# chat training puts loss on, so the model learns to answer and then stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style) whose specials come first: <s>=0, </s>=1, <pad>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    assert bos_id is not None  # a special token of the trainer: always in the vocabulary
    tok.post_processor = bos_post_processor(bos_id)
    return tok


def bos_post_processor(bos_id: int) -> Any:
    """Byte-level offsets, then ``<s>`` before the text when special tokens are added.

    Training examples start with ``<s>`` (:func:`daemon.training.data.encode_chunk`, the
    seed's blocks), so a prompt must too: without it vLLM (and ``tokenizer(text)``) feed
    the model a first position it never saw in training, and a fact it learned after
    ``<s>`` or a newline is not recalled at the start of a prompt.
    """
    from tokenizers import processors

    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )


def ensure_bos_on_prompts(model_dir: Path) -> bool:
    """Give a seed built before :func:`bos_post_processor` existed the same tokenizer
    (its weights and vocabulary are unchanged); True when the file was rewritten."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tok = Tokenizer.from_file(str(path))
    bos_id = tok.token_to_id(BOS)
    if bos_id is None or tok.encode("a").ids[:1] == [bos_id]:
        return False
    tok.post_processor = bos_post_processor(bos_id)
    tmp = path.with_name(f".tokenizer.json.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return True


def wrap_tokenizer(tok: Any, max_len: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def to_blocks(ids: list[list[int]], seq_len: int, bos: int, eos: int) -> list[list[int]]:
    """Concatenate ``<s> text </s>`` streams and cut into ``seq_len + 1`` windows."""
    stream: list[int] = []
    for x in ids:
        stream.append(bos)
        stream.extend(x)
        stream.append(eos)
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]


@dataclass
class SeedData:
    """Everything pretraining and the build's output files need from the corpus."""

    texts: list[str]
    hold_texts: list[str]
    tokenizer: Any  # tokenizers.Tokenizer
    hf_tokenizer: Any  # transformers fast tokenizer
    vocab: int
    blocks: list[list[int]]


def prepare(spec: SeedSpec, seed: int) -> SeedData:
    """Corpus -> held-out slice, tokenizer, and shuffled training blocks."""
    texts = list(corpus.iter_texts(max_chars=spec.max_corpus_chars))
    if len(texts) < 50:
        raise RuntimeError(
            f"stdlib corpus too small ({len(texts)} texts) under {corpus.stdlib_root()}"
        )
    train_texts, hold_texts = corpus.split_holdout(texts, spec.holdout_fraction)
    tok = train_tokenizer(train_texts, spec.vocab_size)
    hf_tok = wrap_tokenizer(tok, spec.max_position_embeddings)
    enc = [e.ids for e in tok.encode_batch(train_texts, add_special_tokens=False)]
    blocks = to_blocks(enc, spec.seq_len, hf_tok.bos_token_id, hf_tok.eos_token_id)
    if not blocks:
        raise RuntimeError("seed corpus produced no training blocks")
    random.Random(seed).shuffle(blocks)
    vocab = int(math.ceil(tok.get_vocab_size() / 64) * 64)
    return SeedData(texts, hold_texts, tok, hf_tok, vocab, blocks)
