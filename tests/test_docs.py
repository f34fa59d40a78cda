"""The README and the docs stay true: their code runs, the files they name exist, the
modules they run exist, and they speak only of the project."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path in the tree: under a top-level directory, or a top-level file.
PATH = re.compile(
    r"\b((?:recsys|mesh|pallas_kernels|examples|benchmarks|docs|tests)/[\w./-]*\w|setup\.py|pyproject\.toml)"
)
MODULE = re.compile(r"python -m ([\w.]+)")


def _text(doc: Path) -> str:
    return doc.read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_and_modules_exist(doc):
    text = _text(doc)
    missing = sorted({p for p in PATH.findall(text) if not (ROOT / p).exists()})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
    modules = sorted({m for m in MODULE.findall(text) if m not in ("pytest", "pip")})
    unknown = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not unknown, f"{doc.name} runs modules that do not exist: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_only_of_the_project(doc):
    words = re.findall(r"\b(sessions?|previous(?:ly)?|earlier attempts?)\b", _text(doc), re.I)
    assert not words, f"{doc.name}: {words}"


def test_the_readme_is_a_users_readme():
    lines = _text(ROOT / "README.md").splitlines()
    assert len(lines) <= 200, len(lines)
    commands = [line for line in lines if line.startswith("pip install")]
    assert commands[0].startswith("pip install -e . && recsys-train"), commands
    assert "python -m pytest -q -n 2 --dist loadfile" in commands[1], commands


@pytest.mark.slow
def test_the_readme_quickstart_runs():
    code = re.search(r"```python\n(.*?)```", _text(ROOT / "README.md"), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the code asks for its devices
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
