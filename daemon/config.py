"""One TOML file -> a validated, typed :class:`Config` (pydantic v2 models).

Every key is a model field with a default, a range where it is a number, and a help
text (``Field(description=...)``), so the config file, ``evergreen config show`` and the
docs all come from one place. Loading is strict (``extra="forbid"``, strict types): an
unknown key, a wrong type or a value out of range is a one-line :class:`ConfigError` that
starts with the key path (``training.max_steps: must be >= 0, got -3``), because a typo
that is silently ignored is the worst kind of config bug in a daemon.

The ``[policy]`` tables are checked by the policies' own parameter models
(:mod:`policies.base`): the defaults shown for them are the policy classes' defaults.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from daemon.config_augment import AugmentConfig
from daemon.config_placement import PlacementConfig
from daemon.config_sections import (
    DAY_S,
    IngestConfig,
    MetricsConfig,
    Section,
    SeedConfig,
    ServingConfig,
    TrainingConfig,
    num,
    opt,
)
from daemon.config_toml import render_toml, toml_value
from policies import base as policy_base
from policies.params import ParamError, explain
from policies.trigger_tree import DEFAULT_TREE, normalize_tree

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "IngestConfig",
    "MetricsConfig",
    "PlacementConfig",
    "PolicyConfig",
    "Section",
    "SeedConfig",
    "ServingConfig",
    "TrainingConfig",
    "config_path",
    "default_state_dir",
    "from_dict",
    "iter_help",
    "load",
    "to_dict",
    "to_toml",
    "toml_value",
]

CONFIG_ENV = "EVERGREEN_CONFIG"
STATE_DIR_ENV = "EVERGREEN_STATE_DIR"


class ConfigError(ParamError):
    """A config problem; the message always starts with the key path."""


def default_state_dir() -> str:
    """systemd's ``StateDirectory=`` sets $STATE_DIRECTORY; else a per-user XDG data dir."""
    if os.environ.get(STATE_DIR_ENV):
        return os.environ[STATE_DIR_ENV]
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(xdg) / "evergreen")


def _names_help(kind: str) -> str:
    return ", ".join(policy_base.names(kind))


class PolicyConfig(Section):
    """Policy tables are stored as their effective tables (name and every parameter), so
    ``config show`` prints the policy classes' defaults and a round trip is exact."""

    interval_s: float = num(
        30.0, 0.05, DAY_S, "How often the scheduler evaluates the trigger policy."
    )
    trigger: dict[str, Any] = Field(
        default_factory=lambda: DEFAULT_TREE,
        validate_default=True,
        description="Trigger policy tree: {name=..., params...} leaves combined with all=[...]"
        f" / any=[...]. Leaves: {_names_help('trigger')}. See policies/README.md.",
    )
    replay: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description=f"Replay policy ({_names_help('replay')}; no name ="
        f" {policy_base.default_name('replay')}); ratio = replay tokens per new token.",
    )
    promotion: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="Promotion gate: name plus thresholds (relative loss changes; eval drops"
        " in points).",
    )
    selection: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="Which pending chunks a stage trains on first, under token_budget"
        f" (0 = all): {_names_help('selection')} (highest_loss: active learning, FIFO while"
        " unscored).",
    )
    on_reject: Literal["retry", "drop"] = opt(
        "retry", "What happens to a rejected stage's new data: 'retry' (stays pending) or 'drop'."
    )
    max_retries: int = num(2, 0, 1000, "Times a rejected chunk is retried before it is set aside.")

    @field_validator("trigger", mode="before")
    @classmethod
    def _trigger(cls, value: Any) -> dict[str, Any]:
        return normalize_tree(value)

    @field_validator("replay", "promotion", "selection", mode="before")
    @classmethod
    def _policy(cls, value: Any, info: Any) -> dict[str, Any]:
        return policy_base.with_defaults(str(info.field_name), value)


class Config(Section):
    state_dir: str = opt("", "Where the store, models and adapters live (default: XDG data dir).")
    inbox_dir: str = opt("", "Watched directory for new documents (default: <state_dir>/inbox).")
    base_model: str = opt("", "HF causal-LM directory; empty = build and use the seed model.")
    track: str = opt("default", "Name of the track (domain) this daemon trains.")
    log_format: Literal["plain", "json"] = opt("plain", "'plain' lines or 'json' lines on stdout.")
    log_level: Literal["debug", "info", "warning", "error"] = opt(
        "info", "debug, info, warning or error."
    )
    stop_grace_s: float = num(
        60.0,
        0,
        3600,
        "On SIGTERM, wait this long for a running stage to checkpoint (< TimeoutStopSec).",
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Ingestion.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Policies.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="LoRA stages.")
    seed: SeedConfig = Field(default_factory=SeedConfig, description="Seed model.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="vLLM.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="HTTP.")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Synthetic study text (augmentation)."
    )
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig,
        description="How serving and training share this machine (cores, threads, GPUs).",
    )

    @field_validator("track")
    @classmethod
    def _track(cls, value: str) -> str:
        if not value.replace("-", "").replace("_", "").isalnum():
            raise ValueError("must be letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _derived(self) -> Config:
        """Absolute state and inbox dirs (the inbox follows an overridden state dir)."""
        self.state_dir = str(Path(self.state_dir or default_state_dir()).expanduser().absolute())
        inbox = self.inbox_dir or str(Path(self.state_dir) / "inbox")
        self.inbox_dir = str(Path(inbox).expanduser().absolute())
        return self

    @model_validator(mode="after")
    def _lora_rank_fits_serving(self) -> Config:
        """vLLM refuses an adapter above its --max-lora-rank: catch that at load, not at swap."""
        if self.serving.mode != "none" and self.training.lora_rank > self.serving.max_lora_rank:
            raise ConfigError(
                "serving.max_lora_rank",
                f"is {self.serving.max_lora_rank}, below training.lora_rank"
                f" {self.training.lora_rank}: vLLM would refuse every adapter",
            )
        return self

    # Paths the daemon builds itself; nothing else names files under the state dir.
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def db_path(self) -> Path:
        return self.state_path / "evergreen.db"

    @property
    def seed_model_dir(self) -> Path:
        return self.state_path / "models" / f"seed-{self.seed.size}-{self.seed.seed}"

    @property
    def adapters_dir(self) -> Path:
        return self.state_path / "adapters"

    @property
    def serving_dir(self) -> Path:
        return self.state_path / "serving"

    @property
    def stages_dir(self) -> Path:
        return self.state_path / "stages"

    @property
    def quarantine_dir(self) -> Path:
        return self.state_path / "quarantine"

    @property
    def api_key_path(self) -> Path:
        """The generated client key of the managed vLLM (when serving.api_key is empty)."""
        return self.state_path / "vllm-api-key"

    @property
    def logs_dir(self) -> Path:
        return self.state_path / "logs"

    def resolved_base_model(self) -> Path:
        """The base model dir: the configured one, else the (possibly not yet built) seed."""
        if self.base_model:
            return Path(self.base_model).expanduser().absolute()
        return self.seed_model_dir


def from_dict(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document; the first problem raises a one-line ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"must be a table, got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(*explain(exc, Config)) from None


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """``--config`` beats $EVERGREEN_CONFIG beats ``<default state dir>/evergreen.toml``."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(default_state_dir()) / "evergreen.toml"
    return default if default.exists() else None


def load(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Load and validate the config; no file at all means embedded defaults.

    ``overrides`` (top-level keys, e.g. from CLI flags) replace file values before
    validation, so derived defaults such as ``inbox_dir`` follow an overridden state dir.
    """
    resolved = config_path(path)
    if resolved is None:
        return from_dict(dict(overrides or {}))
    try:
        text = Path(resolved).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {resolved}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {resolved} is not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML in {resolved}: {exc}") from None
    return from_dict({**data, **(overrides or {})})


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The effective config (or one section) as plain data, e.g. for ``--json``."""
    return cfg.model_dump()


def to_toml(cfg: Config) -> str:
    """The effective config as TOML, each key preceded by its help text; always loads."""
    return render_toml(cfg)


def iter_help(cls: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key path, default, help) for every key: drives docs and the 'every key has help' test."""
    out: list[tuple[str, Any, str]] = []
    inst = cls()
    for name, f in cls.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        value = getattr(inst, name)
        if isinstance(value, BaseModel):
            out.extend(iter_help(type(value), path))
        else:
            out.append((path, value, f.description or ""))
    return out
