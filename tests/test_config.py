"""Config: strict loading with key paths in errors, help for every key, show/check CLI."""

from __future__ import annotations

import string
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import config as config_mod
from daemon.cli import main
from daemon.config import Config, ConfigError


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "evergreen.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load_without_a_file(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"state_dir": str(tmp_path)})
    assert cfg.inbox_dir == str(tmp_path / "inbox")
    assert cfg.db_path == tmp_path / "evergreen.db"
    assert cfg.ingest.chunk_tokens == 256


@pytest.mark.parametrize(
    ("data", "path", "problem"),
    [
        ({"ingest": {"chunk_tokenz": 10}}, "ingest.chunk_tokenz", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"ingest": {"chunk_tokens": "many"}}, "ingest.chunk_tokens", "expected int"),
        ({"ingest": {"pii_scrub": "yes"}}, "ingest.pii_scrub", "expected bool"),
        ({"ingest": {"batch_size": True}}, "ingest.batch_size", "expected int"),
        ({"ingest": {"holdout_fraction": 0.95}}, "ingest.holdout_fraction", "must be <= 0.9"),
        ({"ingest": {"chunk_tokens": 4}}, "ingest.chunk_tokens", "must be >= 16, got 4"),
        ({"ingest": 5}, "ingest", "must be a table"),
        ({"training": {"lora_rank": 12}}, "training.lora_rank", "must be one of"),
        ({"serving": {"mode": "cloud"}}, "serving.mode", "must be one of"),
        ({"serving": {"port": 70000}}, "serving.port", "must be <= 65535, got 70000"),
        ({"log_level": "loud"}, "log_level", "must be one of"),
        ({"track": "a b"}, "track", "letters"),
        ({"training": {"min_steps": -1}}, "training.min_steps", "must be >= 0, got -1"),
        # every numeric key has a range: these used to pass `evergreen config check`
        ({"training": {"max_steps": -3}}, "training.max_steps", "must be >= 0, got -3"),
        ({"ingest": {"max_file_bytes": -1}}, "ingest.max_file_bytes", "must be >= 1"),
        ({"ingest": {"min_chars": -5}}, "ingest.min_chars", "must be >= 0, got -5"),
        ({"training": {"checkpoint_every": 0}}, "training.checkpoint_every", "must be >= 1"),
        ({"ingest": {"rescan_interval_s": -10}}, "ingest.rescan_interval_s", "must be >= 0"),
        ({"ingest": {"quiet_period_s": float("nan")}}, "ingest.quiet_period_s", "finite"),
        (
            {"training": {"lora_rank": 128}, "serving": {"max_lora_rank": 64}},
            "serving.max_lora_rank",
            "below training.lora_rank 128",
        ),
    ],
)
def test_errors_name_the_key_path(tmp_path: Path, data: dict, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.from_dict({"state_dir": str(tmp_path), **data})
    assert info.value.path == path
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{path}: ")


def test_int_is_accepted_for_float_and_converted(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"state_dir": str(tmp_path), "ingest": {"quiet_period_s": 3}})
    assert cfg.ingest.quiet_period_s == 3.0 and isinstance(cfg.ingest.quiet_period_s, float)


def test_load_reports_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        config_mod.load(write_toml(tmp_path, "ingest = [unclosed"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        config_mod.load(tmp_path / "missing.toml")


def test_env_var_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, f'state_dir = "{tmp_path}"\n[ingest]\nmin_chars = 7\n')
    monkeypatch.setenv(config_mod.CONFIG_ENV, str(path))
    assert config_mod.load().ingest.min_chars == 7
    assert config_mod.load(path, overrides={"track": "docs"}).track == "docs"


def test_every_key_has_help_text() -> None:
    keys = config_mod.iter_help()
    assert len(keys) > 40
    missing = [path for path, _default, help_text in keys if len(help_text.strip()) < 8]
    assert missing == []
    assert len({path for path, _, _ in keys}) == len(keys)
    for name, f in Config.model_fields.items():  # sections carry help too
        assert f.description, name


def test_every_numeric_key_has_a_range() -> None:
    """A number without bounds is how -3 steps used to pass `config check`."""
    from daemon.config import Section

    unbounded = []
    for section in [Config, *Section.__subclasses__()]:
        for name, f in section.model_fields.items():
            if f.annotation in (int, float):
                bounds = {type(m).__name__ for m in f.metadata}
                if not {"Ge", "Le"} <= bounds:
                    unbounded.append(f"{section.__name__}.{name}")
    assert unbounded == []


def test_config_show_is_toml_that_round_trips(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        f'state_dir = "{tmp_path}"\n[ingest]\npii_scrub = true\nchunk_tokens = 128\n'
        '[serving]\nextra_args = ["--enforce-eager"]\n',
    )
    result = CliRunner().invoke(main, ["--config", str(path), "config", "show"])
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.stdout)
    assert data["ingest"]["pii_scrub"] is True and data["ingest"]["chunk_tokens"] == 128
    again = config_mod.from_dict(data)
    assert config_mod.to_dict(again) == config_mod.to_dict(config_mod.load(path))
    assert "# Chunk size in tokens" in result.stdout  # help comments are included

    as_json = CliRunner().invoke(main, ["--config", str(path), "config", "show", "--json"])
    assert as_json.exit_code == 0 and '"pii_scrub": true' in as_json.stdout
    keys = CliRunner().invoke(main, ["config", "show", "--keys"])
    assert keys.exit_code == 0 and "ingest.quiet_period_s" in keys.stdout


def test_config_check_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    good = write_toml(tmp_path, f'state_dir = "{tmp_path}"\n')
    assert runner.invoke(main, ["config", "check", str(good)]).exit_code == 0

    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nquiet_period_s = 'soon'\n")
    result = runner.invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 1
    assert "ingest.quiet_period_s" in result.stderr

    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trainin]\nepochs = 1\n")
    result = runner.invoke(main, ["config", "check", str(unknown)])
    assert result.exit_code == 1 and "trainin" in result.stderr

    assert runner.invoke(main, ["config", "check"]).exit_code == 2  # usage error


def test_bad_config_fails_other_commands_with_exit_1(tmp_path: Path) -> None:
    bad = write_toml(tmp_path, "[ingest]\nmax_file_bytes = -1.5\n")
    result = CliRunner().invoke(main, ["--config", str(bad), "status", "--json"])
    assert result.exit_code == 1
    assert "ingest.max_file_bytes" in result.stderr


toml_scalars = st.one_of(
    st.integers(-(2**31), 2**31), st.booleans(), st.text(max_size=10), st.floats(allow_nan=False)
)


@settings(max_examples=80, deadline=None)
@given(
    section=st.sampled_from(["ingest", "policy", "training", "seed", "serving", "metrics", ""]),
    key=st.text(min_size=1, max_size=20),
    value=toml_scalars,
)
def test_any_key_value_gives_config_or_config_error(section: str, key: str, value: object) -> None:
    data: dict = {section: {key: value}} if section else {key: value}
    data["state_dir"] = "/tmp/evergreen-config-fuzz"
    try:
        config_mod.from_dict(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)  # one line, always
        if section:
            assert exc.path.startswith(f"{section}."), exc
        else:
            assert exc.path == key or exc.path.startswith(f"{key}."), exc


# Any text a user may put in a string key: newlines, quotes, backslashes, control
# characters and unicode (surrogates cannot be encoded as UTF-8, so no TOML file has them).
any_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    texts=st.tuples(any_text, any_text, any_text),
    extra_args=st.lists(any_text, max_size=4),
    ratio=st.floats(0, 100, allow_nan=False),
    drop=st.floats(0, 1e6, allow_nan=False),
)
def test_config_show_always_round_trips(
    texts: tuple[str, str, str], extra_args: list[str], ratio: float, drop: float
) -> None:
    prompt, api_key, base_model = texts
    cfg = config_mod.from_dict(
        {
            "state_dir": "/tmp/evergreen-config-roundtrip",
            "base_model": base_model,
            "serving": {"smoke_prompt": prompt, "api_key": api_key, "extra_args": extra_args},
            "policy": {"replay": {"ratio": ratio}, "promotion": {"max_eval_drop_points": drop}},
        }
    )
    text = config_mod.to_toml(cfg)
    again = config_mod.from_dict(tomllib.loads(text))
    assert again == cfg
    assert again.serving.smoke_prompt == prompt and again.serving.extra_args == extra_args


def test_config_show_quotes_keys_and_escapes_control_characters() -> None:
    from daemon.config_toml import toml_value

    weird = {"a b": 'x\u0000\u001f\u007f\n"\\', "ключ": 1.5e-7, "ok-key_1": [True, 2]}
    assert tomllib.loads(f"v = {toml_value(weird)}\n")["v"] == weird
    assert set(string.printable) <= set(tomllib.loads(f"s = {toml_value(string.printable)}")["s"])
