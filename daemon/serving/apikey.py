"""The API key of the managed vLLM server: configured, else generated once (mode 0600)."""

from __future__ import annotations

import os
import secrets

from daemon.config import Config


def load_or_create_api_key(cfg: Config) -> str:
    """The configured key, else one generated once into ``<state>/vllm-api-key`` (mode 0600)."""
    if cfg.serving.api_key:
        return cfg.serving.api_key
    path = cfg.api_key_path
    if path.exists():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key
