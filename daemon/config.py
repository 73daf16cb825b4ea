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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon.config_toml import render_toml, toml_value
from policies import base as policy_base
from policies.params import ParamError, explain
from policies.trigger_tree import DEFAULT_TREE, normalize_tree

__all__ = [
    "Config",
    "ConfigError",
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
MAX_STEPS = 10_000_000
DAY_S = 86400.0


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


def num(default: float, lo: float, hi: float, help: str) -> Any:
    """A numeric key: its default, its inclusive range and its help text."""
    return Field(default, ge=lo, le=hi, description=help)


def opt(default: Any, help: str) -> Any:
    """A non-numeric key: its default (lists are copied per instance) and its help text."""
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), description=help)
    return Field(default, description=help)


class Section(BaseModel):
    """Strict TOML types (no "3" for 3, no true for 1; ints are fine for floats)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class IngestConfig(Section):
    quiet_period_s: float = num(
        2.0, 0, 3600, "A file is read once unchanged for this long (or on close-write)."
    )
    rescan_interval_s: float = num(
        300.0, 0, 7 * DAY_S, "Full rescan of the inbox every N seconds (0 = startup only)."
    )
    max_file_bytes: int = num(50_000_000, 1, 2**40, "Files larger than this are quarantined.")
    min_chars: int = num(
        20, 0, 10_000_000, "Documents shorter than this after normalisation are quarantined."
    )
    max_garbage_ratio: float = num(
        0.3, 0, 1, "Quarantine text whose share of control/replacement characters exceeds this."
    )
    pii_scrub: bool = opt(False, "Replace e-mail addresses and phone numbers with placeholders.")
    chunk_tokens: int = num(256, 16, 65536, "Chunk size in tokens of the base model's tokenizer.")
    holdout_fraction: float = num(0.1, 0, 0.9, "Share of chunks held out (by hash) for evaluation.")
    batch_size: int = num(
        256, 1, 100_000, "Files committed per SQLite transaction during bulk ingest."
    )
    follow_symlinks: bool = opt(True, "Follow symlinks that stay inside the inbox.")


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


class TrainingConfig(Section):
    # Defaults below are the continual benchmark's recipe (benchmarks/continual.py).
    lora_rank: Literal[8, 16, 32, 64, 128, 256] = opt(
        64, "LoRA rank (serving.max_lora_rank must be >= this)."
    )
    lora_alpha: int = num(32, 1, 4096, "LoRA alpha.")
    lora_dropout: float = num(0.0, 0, 0.9, "LoRA dropout.")
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Modules that get LoRA weights (attention and MLP by default).",
    )
    learning_rate: float = num(4e-3, 1e-7, 1.0, "Peak learning rate (warmup then cosine).")
    warmup_ratio: float = num(0.05, 0, 0.5, "Share of steps used for LR warmup.")
    epochs: float = num(8.0, 0.01, 1000, "Passes over the stage's data mix.")
    batch_tokens: int = num(512, 64, 10_000_000, "Tokens per micro-batch (packed, never padded).")
    grad_accum: int = num(1, 1, 1024, "Micro-batches per optimizer step.")
    max_seq_len: int = num(512, 16, 1_000_000, "Longest packed sequence.")
    weight_decay: float = num(0.0, 0, 1, "AdamW weight decay.")
    early_stopping_patience: int = num(
        3, 0, 10_000, "Evaluations without holdout improvement before stopping."
    )
    eval_every: int = num(20, 1, MAX_STEPS, "Steps between holdout evaluations (early stopping).")
    checkpoint_every: int = num(20, 1, MAX_STEPS, "Steps between resumable checkpoints.")
    max_steps: int = num(0, 0, MAX_STEPS, "Hard cap on optimizer steps per stage (0 = no cap).")
    min_steps: int = num(
        1000,
        0,
        MAX_STEPS,
        "Optimizer steps a stage takes at least, repeating its data beyond `epochs` when "
        "it is small (a few facts need hundreds of steps to stick).",
    )
    seed: int = num(0, 0, 2**32 - 1, "Random seed for data order and LoRA init.")
    base_adapter: str = opt("", "Start the first stage from this existing PEFT adapter dir.")
    eval_sets: list[str] = opt([], "User eval sets: JSONL files of {prompt, answer}.")
    eval_match: Literal["exact", "contains"] = opt(
        "contains", "How eval answers are scored: 'exact' or 'contains'."
    )
    general_eval: str = opt("", "General anchor text file (default: seed corpus holdout).")
    general_mix: float = num(
        0.25,
        0,
        100,
        "General-text tokens mixed into each stage per new token, to anchor the base "
        "distribution (0 = off).",
    )
    general_replay: str = opt(
        "", "General text to mix in (default: the seed model's general_train.txt)."
    )
    replay_buffer_size: int = num(20_000, 1, 100_000_000, "Reservoir capacity in chunks.")
    prewarm: bool = opt(
        True,
        "Keep one stage process started with torch/transformers/peft imported, waiting for "
        "the next stage: saves 3-6 s of start-up per stage for ~300 MB of idle RAM.",
    )
    stage_timeout_s: float = num(
        3600.0, 1, 7 * DAY_S, "A stage running longer than this is stopped and failed."
    )


class SeedConfig(Section):
    size: Literal["default", "small", "tiny"] = opt(
        "default", "Seed model size: 'default' (~14M params), 'small' (~4M) or 'tiny' (tests)."
    )
    time_budget_s: float = num(300.0, 1, DAY_S, "Pretraining time budget for the seed model.")
    seed: int = num(0, 0, 2**32 - 1, "Random seed; the build is deterministic for a given seed.")
    steps: int = num(
        0,
        0,
        MAX_STEPS,
        "Pretraining steps (0 = the size's default); fixed, so a build is reproducible.",
    )


class ServingConfig(Section):
    mode: Literal["managed", "external", "none"] = opt(
        "managed", "'managed' (start vLLM as a child), 'external' or 'none'."
    )
    model_name: str = opt("evergreen", "Stable model name clients use; always the newest adapter.")
    host: str = opt("127.0.0.1", "Managed vLLM bind address (non-loopback needs api_key).")
    port: int = num(8000, 1, 65535, "Managed vLLM port.")
    endpoints: list[str] = opt([], "External mode: vLLM base URLs, e.g. http://10.0.0.5:8000.")
    api_key: str = opt("", "API key for vLLM; generated into the state dir if empty.")
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = opt(
        64, "vLLM --max-lora-rank (8, 16, 32, 64, ...)."
    )
    max_loras: int = num(4, 1, 1024, "vLLM --max-loras: adapters resident at once.")
    max_cpu_loras: int = num(
        8, 1, 4096, "vLLM --max-cpu-loras: adapters cached in memory (>= max_loras); others reload."
    )
    smoke_prompt: str = opt(
        "The", "Prompt of the smoke/verify completion run on every swap (greedy)."
    )
    smoke_max_tokens: int = num(8, 1, 256, "Tokens generated by the smoke/verify completion.")
    max_model_len: int = num(1024, 16, 10_000_000, "vLLM --max-model-len.")
    extra_args: list[str] = opt([], "Extra command-line arguments for the managed vLLM.")
    kvcache_space_gib: int = num(1, 1, 4096, "VLLM_CPU_KVCACHE_SPACE for the managed CPU server.")
    startup_timeout_s: float = num(300.0, 1, DAY_S, "Wait this long for vLLM /health at start.")
    reconcile_interval_s: float = num(
        15.0, 0.1, DAY_S, "How often endpoints are compared with the store."
    )
    request_timeout_s: float = num(60.0, 0.1, 3600, "HTTP timeout for calls to vLLM.")

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not value or "/" in value:
            raise ValueError("must be a non-empty name without '/'")
        return value


class MetricsConfig(Section):
    enabled: bool = opt(True, "Serve /metrics, /healthz and /status over HTTP.")
    host: str = opt("127.0.0.1", "Address of the metrics HTTP server.")
    port: int = num(9464, 1, 65535, "Port of the metrics HTTP server.")


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
