"""Shared test fixtures.  Tests read ../shared (override with NEOX_JAX_SHARED); nothing is downloaded."""

import os
from pathlib import Path

import pytest

from neox_jax.data.tokenizer import shared_dir


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_dir()
    assert (d / "data" / "20B_tokenizer.json").exists(), f"shared data not found at {d} (set NEOX_JAX_SHARED)"
    return d


@pytest.fixture(scope="session")
def neox_tokenizer_path(shared) -> Path:
    return shared / "data" / "20B_tokenizer.json"


@pytest.fixture(scope="session")
def shakespeare(shared) -> str:
    return (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")


def pytest_terminal_summary(terminalreporter):
    """Print every measurement tests recorded with `record_property("measured", ...)`."""
    lines = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) != "call":
                continue
            for key, value in getattr(rep, "user_properties", []):
                if key == "measured":
                    lines.append(f"{rep.nodeid}: {value}")
    if lines:
        terminalreporter.write_sep("-", "measured")
        for line in sorted(lines):
            terminalreporter.write_line(line)
