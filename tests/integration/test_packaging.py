"""`pip install .` as a new user runs it: the package builds without a warning that dates
it, and what the build leaves in the clone is ignored by git."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

from tests.support.binaries import require_binary

ROOT = Path(__file__).resolve().parents[2]


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [require_binary("git"), *args], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_the_package_builds_without_warnings_and_leaves_only_ignored_files(
    tmp_path: Path,
) -> None:
    # The build runs on this environment's setuptools (no network): it must be one the
    # project asks for, or the check says nothing about what `pip install .` gets.
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    (setuptools,) = [Requirement(r) for r in build_system["requires"]]
    assert setuptools.specifier.contains(version("setuptools")), build_system

    clone = tmp_path / "clone"
    for name in git(ROOT, "ls-files", "-z").split("\0"):
        if name and (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    git(clone, "init", "-q")
    git(clone, "add", "-A")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
         "--disable-pip-version-check", "--wheel-dir", str(tmp_path / "wheels"), "."],
        cwd=clone, capture_output=True, text=True, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "deprecat" not in output.lower(), output
    assert "Warning:" not in output, output  # a Python warning of setuptools' (not pip's)
    assert list((tmp_path / "wheels").glob("mirror-*.whl"))
    untracked = [line for line in git(clone, "status", "--porcelain").splitlines()
                 if line.startswith("??")]  # fmt: skip
    assert untracked == []
