"""One TOML file -> a validated, typed :class:`Config`.

Every key is a dataclass field with a default and a ``help`` text, so the config file,
``evergreen config show`` and the docs all come from one place. Loading is strict: an
unknown key or a wrong type is an error that names the key path (``training.lora_rank``),
because a typo that is silently ignored is the worst kind of config bug in a daemon.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import EvergreenError

CONFIG_ENV = "EVERGREEN_CONFIG"
STATE_DIR_ENV = "EVERGREEN_STATE_DIR"


class ConfigError(EvergreenError, ValueError):
    """A config problem; the message always starts with the key path."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path or '<root>'}: {problem}")


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field: a default plus the help text shown by ``config show --help-keys``."""
    meta = {"help": help, **extra}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_state_dir() -> str:
    """systemd's ``StateDirectory=`` sets $STATE_DIRECTORY; else a per-user XDG data dir."""
    if os.environ.get(STATE_DIR_ENV):
        return os.environ[STATE_DIR_ENV]
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(xdg) / "evergreen")


@dataclass
class IngestConfig:
    quiet_period_s: float = opt(
        2.0, "A file is read once unchanged for this long (or on close-write)."
    )
    rescan_interval_s: float = opt(
        300.0, "Full rescan of the inbox every N seconds (0 = startup only)."
    )
    max_file_bytes: int = opt(50_000_000, "Files larger than this are quarantined.")
    min_chars: int = opt(20, "Documents shorter than this after normalisation are quarantined.")
    max_garbage_ratio: float = opt(
        0.3, "Quarantine text whose share of control/replacement characters exceeds this."
    )
    pii_scrub: bool = opt(False, "Replace e-mail addresses and phone numbers with placeholders.")
    chunk_tokens: int = opt(256, "Chunk size in tokens of the base model's tokenizer.")
    holdout_fraction: float = opt(0.1, "Share of chunks held out (by hash) for evaluation.")
    batch_size: int = opt(256, "Files committed per SQLite transaction during bulk ingest.")
    follow_symlinks: bool = opt(True, "Follow symlinks that stay inside the inbox.")

    def __post_init__(self) -> None:
        _check_range("quiet_period_s", self.quiet_period_s, 0, 3600)
        _check_range("holdout_fraction", self.holdout_fraction, 0, 0.9)
        _check_range("chunk_tokens", self.chunk_tokens, 16, 65536)
        _check_range("max_garbage_ratio", self.max_garbage_ratio, 0, 1)
        _check_range("batch_size", self.batch_size, 1, 100_000)


@dataclass
class PolicyConfig:
    interval_s: float = opt(30.0, "How often the scheduler evaluates the trigger policy.")
    trigger: dict = opt(
        {
            "all": [
                {"name": "cooldown", "duration": "5m"},
                {
                    "any": [
                        {"name": "min_new_tokens", "n": 2000},
                        {"name": "max_staleness", "duration": "1h"},
                    ]
                },
            ]
        },
        "Trigger policy tree: {name=..., params...} leaves combined with all=[...] / any=[...]."
        " Leaves: min_new_tokens(n), max_staleness(duration), cooldown(duration),"
        " window(cron, duration, timezone, catch_up), surprise(ratio, min_scored, unscored),"
        " serving_load(max_running, unreachable), resources(min_free_memory)."
        " See policies/README.md.",
    )
    replay: dict = opt(
        {"name": "uniform", "ratio": 0.5},
        "Replay policy: uniform, recency(half_life), most_forgotten(explore) or balanced(by);"
        " each takes ratio = replay tokens per new token.",
    )
    promotion: dict = opt(
        {
            "name": "gate",
            "min_new_improvement": 0.01,
            "max_retention_regression": 0.05,
            "max_general_regression": 0.05,
            "max_eval_drop_points": 5.0,
        },
        "Promotion gate: name plus thresholds (relative loss changes; eval drops in points).",
    )
    selection: dict = opt(
        {"name": "highest_loss", "token_budget": 200_000},
        "Which pending chunks a stage trains on first, under token_budget (0 = all):"
        " highest_loss (active learning; FIFO while unscored) or fifo.",
    )
    on_reject: str = opt(
        "retry", "What happens to a rejected stage's new data: 'retry' (stays pending) or 'drop'."
    )
    max_retries: int = opt(2, "Times a rejected chunk is retried before it is set aside.")

    def __post_init__(self) -> None:
        _check_choice("on_reject", self.on_reject, ("retry", "drop"))
        _check_range("interval_s", self.interval_s, 0.05, 86400)


@dataclass
class TrainingConfig:
    # Defaults below are the continual benchmark's recipe (benchmarks/continual.py).
    lora_rank: int = opt(64, "LoRA rank (serving.max_lora_rank must be >= this).")
    lora_alpha: int = opt(32, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    target_modules: list = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Modules that get LoRA weights (attention and MLP by default).",
    )
    learning_rate: float = opt(4e-3, "Peak learning rate (warmup then cosine).")
    warmup_ratio: float = opt(0.05, "Share of steps used for LR warmup.")
    epochs: float = opt(8.0, "Passes over the stage's data mix.")
    batch_tokens: int = opt(512, "Tokens per micro-batch (packed, never padded).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    max_seq_len: int = opt(512, "Longest packed sequence.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    early_stopping_patience: int = opt(
        3, "Evaluations without holdout improvement before stopping."
    )
    eval_every: int = opt(20, "Steps between holdout evaluations (early stopping).")
    checkpoint_every: int = opt(20, "Steps between resumable checkpoints.")
    max_steps: int = opt(0, "Hard cap on optimizer steps per stage (0 = no cap).")
    min_steps: int = opt(
        1000,
        "Optimizer steps a stage takes at least, repeating its data beyond `epochs` when "
        "it is small (a few facts need hundreds of steps to stick).",
    )
    seed: int = opt(0, "Random seed for data order and LoRA init.")
    base_adapter: str = opt("", "Start the first stage from this existing PEFT adapter dir.")
    eval_sets: list = opt([], "User eval sets: JSONL files of {prompt, answer}.")
    eval_match: str = opt("contains", "How eval answers are scored: 'exact' or 'contains'.")
    general_eval: str = opt("", "General anchor text file (default: seed corpus holdout).")
    general_mix: float = opt(
        0.25,
        "General-text tokens mixed into each stage per new token, to anchor the base "
        "distribution (0 = off).",
    )
    general_replay: str = opt(
        "", "General text to mix in (default: the seed model's general_train.txt)."
    )
    replay_buffer_size: int = opt(20_000, "Reservoir capacity in chunks.")
    prewarm: bool = opt(
        True,
        "Keep one stage process started with torch/transformers/peft imported, waiting for "
        "the next stage: saves 3-6 s of start-up per stage for ~300 MB of idle RAM.",
    )
    stage_timeout_s: float = opt(3600.0, "A stage running longer than this is stopped and failed.")

    def __post_init__(self) -> None:
        if self.lora_rank not in (8, 16, 32, 64, 128, 256):
            raise ConfigError("lora_rank", "must be one of 8, 16, 32, 64, 128, 256 (vLLM limit)")
        _check_range("learning_rate", self.learning_rate, 1e-7, 1.0)
        _check_range("lora_dropout", self.lora_dropout, 0, 0.9)
        _check_range("warmup_ratio", self.warmup_ratio, 0, 0.5)
        _check_range("epochs", self.epochs, 0.01, 1000)
        _check_range("batch_tokens", self.batch_tokens, 64, 10_000_000)
        _check_range("grad_accum", self.grad_accum, 1, 1024)
        _check_range("min_steps", self.min_steps, 0, 10_000_000)
        _check_range("max_seq_len", self.max_seq_len, 16, 1_000_000)
        _check_choice("eval_match", self.eval_match, ("exact", "contains"))
        _check_range("general_mix", self.general_mix, 0, 100)


@dataclass
class SeedConfig:
    size: str = opt(
        "default", "Seed model size: 'default' (~14M params), 'small' (~4M) or 'tiny' (tests)."
    )
    time_budget_s: float = opt(300.0, "Pretraining time budget for the seed model.")
    seed: int = opt(0, "Random seed; the build is deterministic for a given seed.")
    steps: int = opt(
        0, "Pretraining steps (0 = the size's default); fixed, so a build is reproducible."
    )

    def __post_init__(self) -> None:
        _check_choice("size", self.size, ("default", "small", "tiny"))
        _check_range("time_budget_s", self.time_budget_s, 1, 86400)
        _check_range("steps", self.steps, 0, 10_000_000)


@dataclass
class ServingConfig:
    mode: str = opt("managed", "'managed' (start vLLM as a child), 'external' or 'none'.")
    model_name: str = opt("evergreen", "Stable model name clients use; always the newest adapter.")
    host: str = opt("127.0.0.1", "Managed vLLM bind address (non-loopback needs api_key).")
    port: int = opt(8000, "Managed vLLM port.")
    endpoints: list = opt([], "External mode: vLLM base URLs, e.g. http://10.0.0.5:8000.")
    api_key: str = opt("", "API key for vLLM; generated into the state dir if empty.")
    max_lora_rank: int = opt(64, "vLLM --max-lora-rank (8, 16, 32, 64, ...).")
    max_loras: int = opt(4, "vLLM --max-loras: adapters resident at once.")
    max_cpu_loras: int = opt(
        8, "vLLM --max-cpu-loras: adapters cached in memory (>= max_loras); others reload."
    )
    smoke_prompt: str = opt(
        "The", "Prompt of the smoke/verify completion run on every swap (greedy)."
    )
    smoke_max_tokens: int = opt(8, "Tokens generated by the smoke/verify completion.")
    max_model_len: int = opt(1024, "vLLM --max-model-len.")
    extra_args: list = opt([], "Extra command-line arguments for the managed vLLM.")
    kvcache_space_gib: int = opt(1, "VLLM_CPU_KVCACHE_SPACE for the managed CPU server.")
    startup_timeout_s: float = opt(300.0, "Wait this long for vLLM /health at start.")
    reconcile_interval_s: float = opt(15.0, "How often endpoints are compared with the store.")
    request_timeout_s: float = opt(60.0, "HTTP timeout for calls to vLLM.")

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ("managed", "external", "none"))
        if self.max_lora_rank not in (8, 16, 32, 64, 128, 256, 320, 512):
            raise ConfigError("max_lora_rank", "must be one of 8, 16, 32, 64, 128, 256, 320, 512")
        _check_range("port", self.port, 1, 65535)
        _check_range("max_loras", self.max_loras, 1, 1024)
        _check_range("max_cpu_loras", self.max_cpu_loras, 1, 4096)
        _check_range("smoke_max_tokens", self.smoke_max_tokens, 1, 256)
        if not self.model_name or "/" in self.model_name:
            raise ConfigError("model_name", "must be a non-empty name without '/'")


@dataclass
class MetricsConfig:
    enabled: bool = opt(True, "Serve /metrics, /healthz and /status over HTTP.")
    host: str = opt("127.0.0.1", "Address of the metrics HTTP server.")
    port: int = opt(9464, "Port of the metrics HTTP server.")

    def __post_init__(self) -> None:
        _check_range("port", self.port, 1, 65535)


@dataclass
class Config:
    state_dir: str = opt("", "Where the store, models and adapters live (default: XDG data dir).")
    inbox_dir: str = opt("", "Watched directory for new documents (default: <state_dir>/inbox).")
    base_model: str = opt("", "HF causal-LM directory; empty = build and use the seed model.")
    track: str = opt("default", "Name of the track (domain) this daemon trains.")
    log_format: str = opt("plain", "'plain' lines or 'json' lines on stdout.")
    log_level: str = opt("info", "debug, info, warning or error.")
    stop_grace_s: float = opt(
        60.0, "On SIGTERM, wait this long for a running stage to checkpoint (< TimeoutStopSec)."
    )
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={"help": "Ingestion."})
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "Policies."})
    training: TrainingConfig = field(
        default_factory=TrainingConfig, metadata={"help": "LoRA stages."}
    )
    seed: SeedConfig = field(default_factory=SeedConfig, metadata={"help": "Seed model."})
    serving: ServingConfig = field(default_factory=ServingConfig, metadata={"help": "vLLM."})
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata={"help": "HTTP."})

    def __post_init__(self) -> None:
        if not self.state_dir:
            self.state_dir = default_state_dir()
        self.state_dir = str(Path(self.state_dir).expanduser().absolute())
        if not self.inbox_dir:
            self.inbox_dir = str(Path(self.state_dir) / "inbox")
        self.inbox_dir = str(Path(self.inbox_dir).expanduser().absolute())
        _check_choice("log_format", self.log_format, ("plain", "json"))
        _check_choice("log_level", self.log_level, ("debug", "info", "warning", "error"))
        if not self.track.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("track", "must be letters, digits, '-' or '_'")

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
        return (
            Path(self.base_model).expanduser().absolute()
            if self.base_model
            else (self.seed_model_dir)
        )


# Validators used by the section dataclasses; ConfigError paths are prefixed by the loader.
# Also used by policy parameter validation, hence public-ish names without underscore below.


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be between {lo} and {hi}, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {value!r}")


# Hooks that validate free-form sections (policy trees) against registries that live
# outside this module; policies/ registers one so config load fails on unknown names.
SectionValidator = Callable[["Config"], None]
_validators: list[SectionValidator] = []


def register_validator(fn: SectionValidator) -> SectionValidator:
    _validators.append(fn)
    return fn


@register_validator
def _check_lora_rank_fits_serving(cfg: Config) -> None:
    """vLLM refuses an adapter above its --max-lora-rank: catch that at load, not at swap."""
    if cfg.serving.mode != "none" and cfg.training.lora_rank > cfg.serving.max_lora_rank:
        raise ConfigError(
            "serving.max_lora_rank",
            f"is {cfg.serving.max_lora_rank}, below training.lora_rank"
            f" {cfg.training.lora_rank}: vLLM would refuse every adapter",
        )


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    if tp is list or origin is list:
        return isinstance(value, list)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def build_section(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(path, f"unknown key (known keys: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_section(tp, value, path)  # type: ignore[arg-type]
            continue
        if not _type_ok(value, tp):
            raise ConfigError(
                path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
            )
        kwargs[key] = float(value) if tp is float else value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        full = f"{prefix}.{exc.path}" if prefix and exc.path else (prefix or exc.path)
        raise ConfigError(full, exc.problem) from None


def from_dict(data: Mapping[str, Any]) -> Config:
    cfg: Config = build_section(Config, data, "")
    # Lazy: policies/ imports this module; importing it registers the policy validator.
    import policies.spec  # noqa: F401

    for validate in _validators:
        validate(cfg)
    return cfg


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


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Render the effective config as TOML, each key preceded by its help text."""
    lines: list[str] = []
    _render(cfg, "", lines)
    return "\n".join(lines).strip() + "\n"


def _render(obj: Any, prefix: str, lines: list[str]) -> None:
    sections = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f, value))
            continue
        lines.append(f"# {f.metadata.get('help', '')}")
        lines.append(f"{f.name} = {_toml_value(value)}")
    for f, value in sections:
        name = f"{prefix}.{f.name}" if prefix else f.name
        lines.append("")
        lines.append(f"[{name}]")
        _render(value, name, lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot render {value!r} as TOML")


def iter_help(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key path, default, help) for every key: drives docs and the 'every key has help' test."""
    out: list[tuple[str, Any, str]] = []
    inst = cls()
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(iter_help(type(value), path))
        else:
            out.append((path, value, f.metadata.get("help", "")))
    return out
