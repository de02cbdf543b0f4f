"""The README's configuration table and config.example.yaml are what users read first: every
setting is in both, with the flag and the environment variable the mirror actually takes and
the default --help shows."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mirror.cli.main import _DEFAULTS, _parser
from mirror.config import _KEYS, ENV_PREFIX
from mirror.storage_settings import S3_ENV_PREFIX

ROOT = Path(__file__).resolve().parents[2]


def _table() -> dict[str, tuple[str, str, str]]:
    """key -> (flag cell, environment cell, default cell), from README's Configuration."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("key", "---"):
            continue
        for key in re.findall(r"`([a-z_]+)`", cells[0]):
            assert key not in rows, f"{key} is in the table twice"
            rows[key] = (cells[1], cells[2], cells[3])
    return rows


def _flags() -> dict[str, str]:
    """Every option any subcommand takes, and the setting (or argument) it sets."""
    commands = next(
        a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    return {
        option: action.dest
        for command in commands.choices.values()
        for action in command._actions
        for option in action.option_strings
    }


def test_the_readme_table_lists_every_setting_with_its_flag_env_and_default() -> None:
    rows, flags = _table(), _flags()
    assert set(rows) == set(_KEYS), "README's table and mirror.config._KEYS differ"
    for key, spec in _KEYS.items():
        flag_cell, env_cell, default_cell = rows[key]
        named_flags = set(re.findall(r"--[a-z][a-z-]*", flag_cell))
        assert named_flags <= set(flags), (key, flag_cell)
        assert any(flags[flag] == key for flag in named_flags) == spec.flag, (key, flag_cell)
        assert named_flags or flag_cell == "(none)", (key, flag_cell)
        own_env = f"{ENV_PREFIX}{key.upper()}"
        named_env = set(re.findall(rf"{ENV_PREFIX}[A-Z0-9_]+", env_cell))
        assert {_setting(name) for name in named_env} <= set(_KEYS)
        assert (own_env in named_env) == spec.env, (key, env_cell)
        assert named_env or env_cell == "(none)", (key, env_cell)
        assert default_cell, key
        if key in _DEFAULTS:
            # --help's default, up to its explanation after a colon, begins the cell.
            shown = _DEFAULTS[key].partition(":")[0]
            assert default_cell.replace("`", "").startswith(shown), (key, default_cell, shown)


def _setting(variable: str) -> str:
    """The setting an environment variable sets: nested ones (``MIRROR_STORAGE_S3_BUCKET``)
    set a key of their mapping."""
    if variable.startswith(S3_ENV_PREFIX):
        return "storage"
    return variable.removeprefix(ENV_PREFIX).lower()


def test_config_example_has_a_line_for_every_setting() -> None:
    text = (ROOT / "config.example.yaml").read_text()
    named = set(re.findall(r"^#? ?([a-z_]+):", text, re.MULTILINE))
    assert set(_KEYS) - named == set()
