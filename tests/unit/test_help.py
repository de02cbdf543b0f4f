"""``--help`` is the reference users read: every setting shows its default and its
environment variable, and no text is a code comment."""

import argparse
import subprocess
import sys

from mirror.cli.main import _parser
from mirror.config import FLAG_KEYS


def test_every_setting_shows_its_default_and_environment_name() -> None:
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.dest not in FLAG_KEYS or not action.option_strings:
                continue
            text = str(action.help)
            assert "[default: " in text, (name, action.dest, text)
            assert f"env MIRROR_{action.dest.upper()}]" in text, (name, action.dest, text)
            assert text.count("[default: ") == 1, (name, action.dest, text)
            checked += 1
    assert checked > 40


def test_help_reads_as_a_manual() -> None:
    for args in (["--help"], ["serve", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "mirror", *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0
        assert "Subcommands parse" not in done.stdout  # the module docstring is not help
        assert "MIRROR_" in done.stdout
    serve = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "[default: 0.0.0.0:5000; env MIRROR_LISTEN]" in " ".join(serve.stdout.split())
