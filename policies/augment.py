"""Augmentation methods: pure rewrites of a chunk into extra study text (issue #11).

Why augment at all: a fact stated once in one context is memorised (its loss falls) but
is not *extractable* (a question phrased differently does not retrieve it). Seeing the
same facts in several orders and phrasings is what makes them extractable: sentence
shuffling and paraphrases (Allen-Zhu & Li, *Physics of Language Models 3.1*), and
model-written rewrites and question/answer pairs (EntiGraph, Active Reading).

A method is a :class:`~policies.params.Params` class registered as kind ``"augment"``
(``augment.method`` names it, ``augment.params`` holds its own parameters), so plugins
add methods exactly as they add policies. Methods are pure, like every policy:

* model-free methods (``uses_model = False``) implement :meth:`expand`: text -> variants,
  deterministic for a given ``rng``;
* model-based methods (``uses_model = True``) describe the requests to send
  (:meth:`requests`) and turn one completion into texts (:meth:`parse`).

The worker :mod:`daemon.augment` does the I/O (an OpenAI-compatible server), the quality
filters, deduplication and storage with lineage.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import Field

from policies.base import register
from policies.params import Params

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and
# whitespace. Deliberately simple: an abbreviation ("e.g. this") splits one sentence in
# two, which permutation tolerates (both halves are kept, only their order changes).
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=\S)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
PERMUTE_TRIES_PER_COPY = 8  # bounded search for k distinct orderings


@dataclass(frozen=True)
class Variant:
    """One piece of synthetic text and the label saying how it was made (``perm2``)."""

    label: str
    text: str


@dataclass(frozen=True)
class Request:
    """One prompt for a model-based method, sampled ``n`` times; ``label`` names the kind."""

    label: str
    prompt: str
    n: int


@runtime_checkable
class AugmentMethod(Protocol):
    """What ``daemon.augment`` calls; :class:`MethodBase` gives the no-op defaults."""

    uses_model: ClassVar[bool]

    def expand(self, text: str, k: int, rng: random.Random) -> list[Variant]: ...

    def requests(self, text: str, k: int, prompts: dict[str, str]) -> list[Request]: ...

    def parse(self, label: str, output: str) -> list[str]: ...


class MethodBase(Params):
    """Defaults for both kinds of method: produce nothing, request nothing."""

    uses_model: ClassVar[bool] = False

    def expand(self, text: str, k: int, rng: random.Random) -> list[Variant]:
        return []

    def requests(self, text: str, k: int, prompts: dict[str, str]) -> list[Request]:
        return []

    def parse(self, label: str, output: str) -> list[str]:
        text = output.strip()
        return [text] if text else []


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, stripped, empty ones dropped."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def sentences(paragraph: str) -> list[str]:
    """The sentences of one prose paragraph (see ``_SENTENCE_END`` for the rule)."""
    return [s for s in _SENTENCE_END.split(paragraph.strip()) if s]


def units(text: str, *, split_sentences: bool = True) -> list[list[str]]:
    """Paragraphs as lists of movable units.

    Only a one-line paragraph is prose that can be cut into sentences; a block with line
    breaks inside (code, a list, a table) stays one unit, so its lines never get mixed.
    """
    out: list[list[str]] = []
    for para in paragraphs(text):
        out.append(sentences(para) if split_sentences and "\n" not in para else [para])
    return out


def render(blocks: list[list[str]]) -> str:
    return "\n\n".join(" ".join(block) for block in blocks)


@register("augment", "none", default=True)
class NoAugment(MethodBase):
    """No synthetic text (the default): training sees the documents as written."""


@register("augment", "permute")
class Permute(MethodBase):
    """k orderings of a chunk: paragraphs reordered, sentences shuffled within paragraphs.

    Each copy keeps every sentence verbatim, so no fact is lost or invented; what changes
    is which facts precede which, so the model cannot rely on one fixed context to recall
    a fact (Physics of LMs 3.1: shuffled copies raise extraction accuracy).
    """

    shuffle_paragraphs: bool = Field(True, description="Also reorder the paragraphs.")
    shuffle_sentences: bool = Field(
        True, description="Shuffle the sentences inside each one-line prose paragraph."
    )

    def expand(self, text: str, k: int, rng: random.Random) -> list[Variant]:
        blocks = units(text, split_sentences=self.shuffle_sentences)
        seen = {render(blocks)}
        out: list[Variant] = []
        for _ in range(k * PERMUTE_TRIES_PER_COPY):
            if len(out) >= k:
                break
            order = list(range(len(blocks)))
            if self.shuffle_paragraphs:
                rng.shuffle(order)
            candidate = render([rng.sample(blocks[i], len(blocks[i])) for i in order])
            if candidate not in seen:
                seen.add(candidate)
                out.append(Variant(f"perm{len(out) + 1}", candidate))
        return out


@register("augment", "sentences")
class Sentences(MethodBase):
    """Each sentence as its own short sample, next to the full chunk (which still trains).

    Inside a long chunk a fact is learnt as a continuation of everything before it; on
    its own it is learnt from a short prefix, which is what a question looks like. With
    ``anchor`` the chunk's first sentence (which usually introduces the subject) precedes
    each sentence, so one that starts with "It" or "She" still says whom it is about.
    """

    anchor: bool = Field(True, description="Prefix each sentence with the chunk's first one.")
    max_samples: int = Field(16, ge=1, le=10_000, description="Samples per chunk at most.")

    def expand(self, text: str, k: int, rng: random.Random) -> list[Variant]:
        sents = [s for block in units(text) for s in block if "\n" not in s]
        if len(sents) < 2:
            return []  # one sentence: the chunk itself already is that sample
        first, rest = sents[0], sents[1:] if self.anchor else sents
        out = [
            Variant(f"sent{i + 1}", f"{first} {s}" if self.anchor else s)
            for i, s in enumerate(rest)
        ]
        return out[: self.max_samples]


_WORD = re.compile(r"\S+")
_EDGE = ".,;:!?\"'()[]"


def _protected(word: str) -> bool:
    """Words an edit must keep: names and figures (capitalised, or holding a digit), which
    are what a fact is about; the words around them are what a question rephrases."""
    core = word.strip(_EDGE)
    return bool(core) and (core[0].isupper() or any(c.isdigit() for c in core))


@register("augment", "edit")
class Edit(MethodBase):
    """k noisy copies of a chunk: random word deletion, swap and insertion around the
    names, sentences shuffled (EDA, Wei & Zou 2019, applied to knowledge text).

    A fact stated once is learnt as one exact context -> answer. A question phrases that
    context differently, so nothing retrieves the answer. Copies in which the words
    between a name and its attribute vary, while the name and the attribute stay, teach
    the attribute as following the *name* rather than one wording, which is what a
    differently phrased question still shares. Names and figures (capitalised words,
    words with digits) are never edited, so no fact is lost or invented; only the filler
    changes. Blocks with line breaks (code, lists, tables) are copied unchanged.
    """

    p_delete: float = Field(0.3, ge=0.0, le=0.9, description="Chance to drop a plain word.")
    p_swap: float = Field(0.1, ge=0.0, le=0.9, description="Chance to swap two neighbours.")
    p_insert: float = Field(
        0.1, ge=0.0, le=0.9, description="Chance to insert a plain word of the chunk."
    )
    shuffle_sentences: bool = Field(True, description="Also shuffle sentence order.")

    def _edit(self, sentence: str, pool: list[str], rng: random.Random) -> str:
        words = _WORD.findall(sentence)
        end = words[-1][-1] if words and words[-1][-1] in ".!?" else ""
        if end:
            words[-1] = words[-1][:-1]
        out: list[str] = []
        for w in words:
            if w and (_protected(w) or rng.random() >= self.p_delete):
                out.append(w)
            if pool and rng.random() < self.p_insert:
                out.append(rng.choice(pool))
        for i in range(len(out) - 1):
            if rng.random() < self.p_swap and not (_protected(out[i]) or _protected(out[i + 1])):
                out[i], out[i + 1] = out[i + 1], out[i]
        return " ".join(out) + end

    def expand(self, text: str, k: int, rng: random.Random) -> list[Variant]:
        blocks = units(text)
        prose = [s for block in blocks for s in block if "\n" not in s]
        # Inserted words come from the chunk's own filler (never a name: that would
        # state a fact the chunk does not), so a copy stays on the chunk's topic.
        plain = {w.strip(_EDGE) for s in prose for w in _WORD.findall(s) if not _protected(w)}
        pool = sorted(plain - {""})
        out: list[Variant] = []
        seen = {render(blocks)}
        for _ in range(k * PERMUTE_TRIES_PER_COPY):
            if len(out) >= k:
                break
            copy = []
            for block in blocks:
                if len(block) == 1 and "\n" in block[0]:
                    copy.append(block)
                    continue
                edited = [self._edit(s, pool, rng) for s in block]
                if self.shuffle_sentences:
                    rng.shuffle(edited)
                copy.append(edited)
            candidate = render(copy)
            if candidate not in seen:
                seen.add(candidate)
                out.append(Variant(f"edit{len(out) + 1}", candidate))
        return out


@register("augment", "self")
class SelfRewrite(MethodBase):
    """The served model rewrites each chunk: every ``augment.prompts`` template, k samples.

    The default templates ask for a paraphrase and for question/answer pairs (Active
    Reading / EntiGraph style); ``{text}`` in a template is replaced by the chunk. The
    worker sends them to the configured OpenAI-compatible server under a token and a
    time budget, only while that server is not busy.
    """

    uses_model: ClassVar[bool] = True

    def requests(self, text: str, k: int, prompts: dict[str, str]) -> list[Request]:
        return [
            Request(label, template.replace("{text}", text), k)
            for label, template in prompts.items()
            if template
        ]
