"""Pyflakes' checks over the project's Python (unused imports and variables, undefined names,
shadowed definitions), through ruff with the rules pyproject.toml selects."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                        "neox_jax", "tests", "bench", "launch"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_sees_a_defect(tmp_path):
    """The same command flags an unused import and an undefined name (so a silently empty selection
    or a missing config cannot pass the test above)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                        "--config", str(ROOT / "pyproject.toml"), str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "F401" in r.stdout and "F821" in r.stdout, r.stdout
