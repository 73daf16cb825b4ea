"""``evergreen check-model`` and the daemon's start-up check of its base model.

Real model directories: the tiny seed (good), and broken copies of it: no tokenizer,
pickle weights, an architecture vLLM lacks, and a tiny GPT-J (vLLM 0.32 implements it
but serves no LoRA on it). The broken ones are checked in one CLI run, so the probe
subprocess (transformers + vLLM's registry: ~15 s of CPU) is paid once for all four.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli import main
from daemon.training import modelcheck
from daemon.training.modelcheck import ModelCheckFailed, file_checks, require_usable
from tests.fixtures_model import make_tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _copy(src: Path, dst: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


def _pickled(seed: Path, dst: Path) -> Path:
    """The seed with its weights as ``pytorch_model.bin`` (a pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    out = _copy(seed, dst, drop=("*.safetensors",))
    torch.save(load_file(str(seed / "model.safetensors")), out / "pytorch_model.bin")
    return out


def _made_up_arch(seed: Path, dst: Path) -> Path:
    out = _copy(seed, dst)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["EvergreenMadeUpForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _gptj(seed: Path, dst: Path) -> Path:
    """A tiny random GPT-J with the seed's tokenizer: vLLM implements it, without LoRA."""
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(
        n_embd=64, n_layer=1, n_head=4, rotary_dim=16, n_positions=128, vocab_size=2048,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    GPTJForCausalLM(cfg).save_pretrained(dst, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(seed / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, tiny_seed_model: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken-models")
    return {
        "notok": _copy(tiny_seed_model, root / "notok", drop=TOKENIZER_FILES),
        "pickle": _pickled(tiny_seed_model, root / "pickle"),
        "madeup": _made_up_arch(tiny_seed_model, root / "madeup"),
        "gptj": _gptj(tiny_seed_model, root / "gptj"),
    }


def _blocks(output: str) -> dict[str, list[str]]:
    """The human report split per model: path line -> its check lines and verdict."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith("/"):
            current = blocks.setdefault(line, [])
        else:
            current.append(line)
    return blocks


def _line(lines: list[str], status: str, check: str) -> str:
    found = [ln for ln in lines if ln.split()[:2] == [status, *check.split()[:1]]]
    assert len(found) == 1, (status, check, lines)
    return found[0]


# --------------------------------------------------------------------------- file checks
def test_file_checks_refuse_what_is_not_a_safetensors_model_dir(tmp_path: Path) -> None:
    missing = file_checks(tmp_path)
    assert [(f.check, f.status) for f in missing] == [("config", "problem")]
    assert "no config.json" in missing[0].detail and missing[0].fix

    (tmp_path / "config.json").write_text("{not json")
    assert "does not parse" in file_checks(tmp_path)[0].detail

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert "names no architectures" in file_checks(tmp_path)[0].detail

    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    weights = file_checks(tmp_path)[1]
    assert (weights.status, weights.detail) == (
        "problem",
        f"no weights in {tmp_path} (no *.safetensors)",
    )

    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    weights = file_checks(tmp_path)[1]
    assert (
        weights.status == "problem" and "pickle weights only (pytorch_model.bin)" in weights.detail
    )
    assert "safe_serialization=True" in weights.fix

    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    weights = file_checks(tmp_path)[1]
    assert weights.status == "ok" and "pickle files ignored: pytorch_model.bin" in weights.detail

    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = file_checks(tmp_path)[1]
    assert weights.status == "problem" and "2 shard(s)" in weights.detail


# --------------------------------------------------------------------------- the command
def test_check_model_passes_the_seed_model(tiny_seed_model: Path) -> None:
    result = CliRunner().invoke(main, ["check-model", "--json", str(tiny_seed_model)])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["ok"] and report["problems"] == 0
    found = {f["check"]: f for f in report["findings"]}
    assert {c: f["status"] for c, f in found.items()} == {
        "config": "ok",
        "tokenizer": "ok",
        "weights": "ok",
        "chat template": "note",
        "vllm": "ok",
        "lora": "ok",
        "targets": "ok",
    }
    assert found["config"]["detail"] == "LlamaForCausalLM (llama, float32)"
    assert found["vllm"]["detail"].endswith("implements LlamaForCausalLM")
    assert found["chat template"]["detail"].startswith("present")
    assert found["targets"]["detail"] == (
        "auto picks q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )


def test_check_model_names_each_problem_and_what_to_do(broken: dict[str, Path]) -> None:
    paths = [str(broken[k]) for k in ("notok", "pickle", "madeup", "gptj")]
    result = CliRunner().invoke(main, ["check-model", *paths])
    assert result.exit_code == 1, result.output
    blocks = _blocks(result.output)
    assert sorted(blocks) == sorted(paths)
    for lines in blocks.values():
        assert lines[-1].startswith("1 problem(s)"), lines  # exactly the one we broke

    notok = blocks[str(broken["notok"])]
    line = _line(notok, "problem", "tokenizer")
    assert f"no tokenizer loads from {broken['notok']}" in line
    assert "-> copy the tokenizer files" in line
    _line(notok, "ok", "lora")  # everything else still checked

    line = _line(blocks[str(broken["pickle"])], "problem", "weights")
    assert "pickle weights only (pytorch_model.bin)" in line and "-> convert them" in line

    line = _line(blocks[str(broken["madeup"])], "problem", "vllm")
    assert "has no model class for EvergreenMadeUpForCausalLM" in line
    assert "-> vLLM cannot serve it" in line

    gptj = blocks[str(broken["gptj"])]
    _line(gptj, "ok", "vllm")
    line = _line(gptj, "problem", "lora")
    assert "cannot serve LoRA adapters on GPTJForCausalLM" in line and "->" in line


def test_check_model_of_a_missing_dir_needs_no_probe(tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = CliRunner().invoke(main, ["check-model", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "is not a directory -> point at the model's directory" in result.output
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- the daemon
def test_daemon_refuses_a_pickle_base_model_with_one_line(
    tmp_path: Path, broken: dict[str, Path]
) -> None:
    cfg = tmp_path / "evergreen.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\nbase_model = "{broken["pickle"]}"\n'
        '[training]\nprewarm = false\n[serving]\nmode = "none"\n[metrics]\nenabled = false\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr  # the daemon logs (to stdout), like its other refusals
    errors = [ln for ln in out.splitlines() if "cannot be used" in ln]
    assert len(errors) == 1, out
    assert (
        f"base model {broken['pickle']} cannot be used: weights: pickle weights only" in errors[0]
    )
    assert f"`evergreen check-model {broken['pickle']}` shows every check" in errors[0]


def test_start_up_check_passes_the_seed_once_then_reads_its_cache(
    tmp_path: Path, tiny_seed_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = tmp_path / "state"
    state.mkdir()
    cfg = make_tiny_cfg(state, tiny_seed_model, serving={"mode": "none"})
    t0 = time.monotonic()
    first = require_usable(cfg, tiny_seed_model)
    cold = time.monotonic() - t0
    assert first.ok and first.seconds > 0
    assert {f.check: f.status for f in first.findings}["vllm"] == "note"  # vLLM not managed
    t0 = time.monotonic()
    again = require_usable(cfg, tiny_seed_model)
    warm = time.monotonic() - t0
    assert again.ok and again.seconds == 0.0  # from the cache: no probe ran
    assert warm < 0.5 < cold
    shared = list((tmp_path / "cache" / "evergreen" / "modelcheck").glob("*.json"))
    assert len(shared) == 1 and (state / "modelcheck.json").is_file()

    # another state dir on the same model reads the user's cache
    other = make_tiny_cfg(tmp_path / "other", tiny_seed_model, serving={"mode": "none"})
    (tmp_path / "other").mkdir()
    assert require_usable(other, tiny_seed_model).seconds == 0.0

    # the verdict is keyed by the model's files and the targets
    key = modelcheck.cache_key(tiny_seed_model, "auto", False)
    assert key != modelcheck.cache_key(tiny_seed_model, ["q_proj"], False)
    assert key != modelcheck.cache_key(tiny_seed_model, "auto", True)


def test_start_up_check_refuses_targets_the_model_lacks(
    tmp_path: Path, tiny_seed_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "state").mkdir()
    cfg = make_tiny_cfg(
        tmp_path / "state",
        tiny_seed_model,
        serving={"mode": "none"},
        training={"target_modules": ["q_proj", "qkv_proj"]},
    )
    with pytest.raises(ModelCheckFailed) as failed:
        require_usable(cfg, tiny_seed_model)
    text = str(failed.value)
    assert "targets: no LoRA targets (configured)" in text and "qkv_proj" in text
    assert "-> set training.target_modules" in text
    assert not (tmp_path / "state" / "modelcheck.json").exists()  # a failure is not cached


def test_a_probe_that_crashes_is_one_problem_line(tmp_path: Path) -> None:
    (found,) = modelcheck.run_probe([tmp_path], "auto")[str(tmp_path)]  # no config.json
    assert (found.check, found.status) == ("check", "problem")
    assert found.detail.startswith("the model check crashed (exit 1: FileNotFoundError")
    assert "modelprobe PATH" in found.fix
