"""Shared test fixtures.  Tests read ../shared (override with NEOX_JAX_SHARED); nothing is downloaded.

The suite runs on 8 simulated CPU devices.  XLA reads the device count when JAX first initialises a
backend, so it is set here, before any test module imports jax: a bare `pytest` then runs the
sharding tests instead of skipping them (tests that need several devices assert it, never skip)."""

import os
from pathlib import Path

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}=8".strip()

import pytest  # noqa: E402

from neox_jax.data.tokenizer import shared_dir  # noqa: E402


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
