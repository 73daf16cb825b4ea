"""The seed model: a real tiny build that transformers loads and generates with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import config as config_mod
from daemon.training import corpus
from daemon.training.seed import GENERAL_HOLDOUT, MANIFEST, SPECS, ensure_seed_model


def test_corpus_is_stdlib_docs_only() -> None:
    files = corpus.stdlib_files()
    assert files == sorted(files)
    assert not any("site-packages" in f.parts for f in files)
    texts = list(corpus.iter_texts(max_chars=20_000))
    assert len(texts) > 5
    assert all(len(t) >= 20 for t in texts)
    assert texts == list(corpus.iter_texts(max_chars=20_000))


def test_holdout_split_is_deterministic_and_disjoint() -> None:
    texts = [f"text number {i} about something" for i in range(500)]
    train, hold = corpus.split_holdout(texts, 0.1)
    assert (train, hold) == corpus.split_holdout(texts, 0.1)
    assert not set(train) & set(hold)
    assert 20 < len(hold) < 90


@pytest.mark.slow
def test_tiny_seed_loads_and_generates(tiny_seed_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((tiny_seed_model / MANIFEST).read_text())
    assert manifest["steps_done"] == SPECS["tiny"].steps
    assert 0.3e6 < manifest["n_params"] < 2e6
    assert (tiny_seed_model / "model.safetensors").is_file()
    assert (tiny_seed_model / "tokenizer.json").is_file()
    assert (tiny_seed_model / GENERAL_HOLDOUT).read_text().strip()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tiny_seed_model.iterdir())

    tok = AutoTokenizer.from_pretrained(tiny_seed_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_seed_model)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.vocab_size % 64 == 0 and cfg.head_dim in (32, 64)
    assert cfg.max_position_embeddings >= 1024
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What does os.path.join do?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<s><|user|>\n") and prompt.endswith("<|assistant|>\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    text = tok.decode(out[0], skip_special_tokens=True)
    assert isinstance(text, str)
    # byte-level BPE round-trips arbitrary text
    sample = "naïve café → ∑ 123\n\tindent"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample


@pytest.mark.slow
def test_seed_build_is_deterministic_and_cached(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    paths = []
    for name in ("a", "b"):
        cfg = config_mod.from_dict({"state_dir": str(tmp_path / name), "seed": {"size": "tiny"}})
        paths.append(ensure_seed_model(cfg))
    wa = load_file(str(paths[0] / "model.safetensors"))
    wb = load_file(str(paths[1] / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)
    assert (paths[0] / "tokenizer.json").read_bytes() == (paths[1] / "tokenizer.json").read_bytes()

    # cached: a second call does not rebuild (the manifest file is untouched)
    cfg = config_mod.from_dict({"state_dir": str(tmp_path / "a"), "seed": {"size": "tiny"}})
    before = (paths[0] / MANIFEST).stat().st_mtime_ns
    assert ensure_seed_model(cfg) == paths[0]
    assert (paths[0] / MANIFEST).stat().st_mtime_ns == before
    # no temp dirs left behind
    assert [p.name for p in paths[0].parent.iterdir() if ".tmp-" in p.name] == []


def test_prompts_start_with_bos_like_training(tiny_seed_model: Path, tmp_path: Path) -> None:
    """A prompt is tokenized as training examples are (``<s>`` first), once, and a seed
    built before that rule gets the same tokenizer on its next use."""
    import shutil

    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    from daemon.training import seed_data

    tok = AutoTokenizer.from_pretrained(tiny_seed_model)
    bos = tok.bos_token_id
    ids = tok("The harbour")["input_ids"]
    assert ids[0] == bos and ids[1:] == tok("The harbour", add_special_tokens=False)["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    chat_ids = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert list(chat_ids).count(bos) == 1

    old = tmp_path / "old-seed"
    shutil.copytree(tiny_seed_model, old)
    raw = Tokenizer.from_file(str(old / "tokenizer.json"))
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    raw.save(str(old / "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(old)("The harbour")["input_ids"][0] != bos
    assert seed_data.ensure_bos_on_prompts(old) is True
    assert seed_data.ensure_bos_on_prompts(old) is False  # idempotent
    assert AutoTokenizer.from_pretrained(old)("The harbour")["input_ids"] == ids
