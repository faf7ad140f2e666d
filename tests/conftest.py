"""Fixtures shared by every test package: offline hub, tiny model folders built once per session."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# Set before transformers is imported anywhere: tests must pass with no hub at all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _wait_for(condition, what: str, timeout_s: float):
    """`condition()`'s first truthy value, polled; AssertionError after `timeout_s`, which only bounds a hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting ({timeout_s:.0f} s) for {what}")


@pytest.fixture(scope="session")
def wait_for():
    """wait_for(condition, what, timeout_s): wait on a condition, never on a duration (tests run on loaded machines)."""
    return _wait_for


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder of its tiny model (seed 0, bfloat16). Tests must not modify these."""
    from kvcellar.models import ARCHS, make_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_model(arch, "tiny", root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_fp32_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Float32 tiny models, for comparisons that need a numeric tolerance rather than bit equality."""
    from kvcellar.models import ARCHS, make_model

    root = tmp_path_factory.mktemp("tiny-models-fp32")
    return {arch: make_model(arch, "tiny", root / arch, dtype="float32") for arch in ARCHS}
