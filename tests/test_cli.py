"""Every CLI command and subcommand has help text, and the basics exit with meaning."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from daemon import __version__
from daemon.cli import main


def _walk(group: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    if isinstance(group, click.Group):
        for name, cmd in sorted(group.commands.items()):
            out.extend(_walk(cmd, (*prefix, name)))
    return out


COMMANDS = _walk(main)


def test_the_expected_commands_exist() -> None:
    names = {" ".join(c) for c in COMMANDS}
    for expected in (
        "run",
        "status",
        "ingest",
        "train",
        "adapters",
        "promote",
        "rollback",
        "seed-model",
        "config",
        "config show",
        "config check",
    ):
        assert expected in names, expected


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "evergreen")
def test_every_command_has_help_text(command: tuple[str, ...]) -> None:
    cmd: click.Command = main
    for name in command:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    assert cmd.help and len(cmd.help.strip()) > 10, command
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{' '.join(command)} {param.opts}"
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert cmd.help.strip().split("\n")[0][:30] in " ".join(result.output.split())


def test_version_and_usage_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    assert runner.invoke(main, ["no-such-command"]).exit_code == 2
    assert runner.invoke(main, ["ingest"]).exit_code == 2  # PATH... is required


def test_python_dash_m_daemon_is_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Evergreen" in proc.stdout and "ingest" in proc.stdout
