"""The two secrets of the managed vLLM server, both in the state dir (mode 0600).

* the **API key** (``serving.api_key``, else ``<state>/vllm-api-key``): what clients send
  for inference;
* the **admin secret** (``<state>/vllm-admin-secret``, always generated): known only to
  the daemon and the server's plugin, required on top of the key to load, unload or alias
  adapters (see :mod:`daemon.serving.vllm_guard`).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from daemon.config import Config
from daemon.private_files import mkdir_private, write_private

ADMIN_SECRET_FILE = "vllm-admin-secret"


def _load_or_create(cfg: Config, path: Path) -> str:
    if path.exists():
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    mkdir_private(cfg.state_path)
    value = secrets.token_urlsafe(32)
    write_private(path, value)
    return value


def load_or_create_api_key(cfg: Config) -> str:
    """The configured key, else one generated once into ``<state>/vllm-api-key`` (mode 0600)."""
    if cfg.serving.api_key:
        return cfg.serving.api_key
    return _load_or_create(cfg, cfg.api_key_path)


def load_or_create_admin_secret(cfg: Config) -> str:
    """The admin secret, generated once into ``<state>/vllm-admin-secret`` (mode 0600)."""
    return _load_or_create(cfg, admin_secret_path(cfg))


def admin_secret_path(cfg: Config) -> Path:
    return cfg.state_path / ADMIN_SECRET_FILE
