"""GPU readiness we can check without a GPU: device/dtype selection with a faked device
query, the managed vLLM's --dtype, and adapters trained in bf16 saved as float32."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import sqlite_utils

from daemon.config import Config
from daemon.devices import Accelerator, placement, query_nvidia_smi, serving_dtype
from daemon.serving import dtype as serving_dtype_mod
from daemon.serving.dtype import dtype_args
from daemon.serving.vllm import ManagedVLLM

BF16_GPU = Accelerator(cuda=True, bf16=True, name="H100")
OLD_GPU = Accelerator(cuda=True, bf16=False, name="T4")
NO_GPU = Accelerator(cuda=False)


@pytest.mark.parametrize(
    ("acc", "device", "dtype", "served"),
    [
        (BF16_GPU, "cuda", "bfloat16", "bfloat16"),
        (OLD_GPU, "cuda", "float32", "float16"),
        (NO_GPU, "cpu", "float32", "float32"),
    ],
)
def test_placement_and_serving_dtype(
    acc: Accelerator, device: str, dtype: str, served: str
) -> None:
    assert placement(acc).device == device
    assert placement(acc).dtype == dtype
    assert serving_dtype(acc) == served


@pytest.mark.parametrize(
    ("acc", "expected"),
    [(BF16_GPU, "cuda+bfloat16"), (OLD_GPU, "cuda+float32"), (NO_GPU, "cpu+float32")],
)
def test_pick_maps_the_query_to_torch_device_and_dtype(acc: Accelerator, expected: str) -> None:
    import torch

    from daemon.training.device import pick

    dev = pick(lambda: acc)
    assert dev.name == expected
    assert dev.device.type == expected.split("+", maxsplit=1)[0]
    assert dev.dtype == getattr(torch, expected.split("+")[1])


def test_pick_without_a_fake_asks_torch() -> None:
    import torch

    from daemon.training.device import pick

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick().device.type == expected


SMI = "0, GPU-aaaa-1111, Tesla T4, 7.5\n1, GPU-bbbb-2222, NVIDIA H100 80GB HBM3, 9.0\n"


def _smi(out: str = SMI):
    calls: list[list[str]] = []

    def run(args: list[str]) -> str:
        calls.append(args)
        return out

    return run, calls


def test_nvidia_smi_query_follows_cuda_visible_devices() -> None:
    run, calls = _smi()
    assert query_nvidia_smi(run, visible="0") == Accelerator(True, False, "Tesla T4")
    assert query_nvidia_smi(run, visible="1,0") == Accelerator(True, True, "NVIDIA H100 80GB HBM3")
    assert query_nvidia_smi(run, visible="GPU-bbbb") == Accelerator(
        True, True, "NVIDIA H100 80GB HBM3"
    )
    assert calls and "--format=csv,noheader" in calls[0]
    n = len(calls)
    assert query_nvidia_smi(run, visible="") == NO_GPU
    assert query_nvidia_smi(run, visible="-1") == NO_GPU
    assert len(calls) == n  # hidden GPUs are not even asked about
    assert query_nvidia_smi(run, visible="7") == NO_GPU  # no such GPU
    mig = query_nvidia_smi(run, visible="MIG-0b7a2c3d-aaaa")  # a MIG slice of a listed GPU
    assert mig == Accelerator(True, False, "Tesla T4")


def test_nvidia_smi_query_reads_cuda_visible_devices_from_the_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, _ = _smi()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert query_nvidia_smi(run).name == "NVIDIA H100 80GB HBM3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert query_nvidia_smi(run).name == "Tesla T4"  # none set: CUDA's first GPU


def test_nvidia_smi_missing_or_failing_means_no_gpu() -> None:
    def missing(args: list[str]) -> str:
        raise FileNotFoundError("nvidia-smi")

    def failing(args: list[str]) -> str:
        raise subprocess.CalledProcessError(9, "nvidia-smi")

    assert query_nvidia_smi(missing, visible="0") == NO_GPU
    assert query_nvidia_smi(failing, visible="0") == NO_GPU
    assert query_nvidia_smi(_smi("garbage\n")[0], visible="0") == NO_GPU


@pytest.mark.parametrize(
    ("acc", "expected"), [(BF16_GPU, "bfloat16"), (OLD_GPU, "float16"), (NO_GPU, "float32")]
)
def test_managed_vllm_dtype_follows_the_device(
    cfg: Config, acc: Accelerator, expected: str
) -> None:
    seen: list[str | None] = []

    def query(visible: str | None) -> Accelerator:
        seen.append(visible)
        return acc

    args = dtype_args(cfg.serving, {"CUDA_VISIBLE_DEVICES": "1"}, query)
    assert args == ["--dtype", expected]
    assert seen == ["1"]  # the GPU the child will see is the one asked about


def test_managed_vllm_dtype_configured_or_in_extra_args_wins(cfg: Config) -> None:
    pinned = cfg.serving.model_copy(update={"dtype": "float16"})
    assert dtype_args(pinned, {}, lambda _v: BF16_GPU) == ["--dtype", "float16"]
    for extra in (["--dtype", "half"], ["--dtype=half"]):
        sc = cfg.serving.model_copy(update={"extra_args": extra})
        assert dtype_args(sc, {}, lambda _v: BF16_GPU) == []


def test_managed_vllm_command_carries_the_dtype(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving_dtype_mod, "query_nvidia_smi", lambda visible=None: BF16_GPU)
    cmd = ManagedVLLM(cfg).command()
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd.count("--dtype") == 1
    monkeypatch.setattr(serving_dtype_mod, "query_nvidia_smi", lambda visible=None: NO_GPU)
    cmd = ManagedVLLM(cfg).command()
    assert cmd[cmd.index("--dtype") + 1] == "float32"


def _bf16_lora(base: Path, cfg: Config, *, adapter_bf16: bool):
    """The tiny seed loaded in bf16 on CPU (as a stage on a bf16 GPU loads it), with a new
    LoRA on it, trained for a few steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from daemon.training.lora import with_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = with_lora(model, "", cfg.training)
    if adapter_bf16:  # what an older peft, or a cast somewhere, would leave
        peft_model.to(torch.bfloat16)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert params and all(p.device.type == "cpu" for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 2000, (2, 32))
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model


@pytest.mark.parametrize("adapter_bf16", [False, True])
def test_adapter_trained_in_bf16_is_published_as_float32(
    tiny_cfg: Config, fresh_db: sqlite_utils.Database, adapter_bf16: bool
) -> None:
    import json

    import torch
    from safetensors import safe_open

    from daemon.training.publish import ADAPTER_WEIGHTS, publish
    from store.contracts import StagePlan

    base = tiny_cfg.resolved_base_model()
    model = _bf16_lora(base, tiny_cfg, adapter_bf16=adapter_bf16)
    if adapter_bf16:
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    out = tiny_cfg.adapters_dir / "v0001"
    plan = StagePlan(base_model=str(base), output_version="v0001", output_dir=str(out))
    publish(fresh_db, model, plan, 1, data_stats={}, train_stats={}, metrics={})
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        n_tensors = len(list(f.keys()))
    assert dtypes == {"F32"}
    assert n_tensors == 2 * 2 * 7  # A and B, 2 layers, 7 auto targets (attention + MLP)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(base)

    # It loads back onto the base in float32 (what vLLM on a CPU and a warm start do).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    loaded = {n: p for n, p in again.named_parameters() if "lora_B" in n}
    assert trained.keys() == loaded.keys()
    for name, p in trained.items():
        assert float(p.detach().float().abs().max()) > 0  # trained: B moved off zero
        torch.testing.assert_close(loaded[name].float(), p.detach().float())
