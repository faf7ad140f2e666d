"""Fixtures shared by every test package: offline hub, tiny model folders built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers is imported anywhere: tests must pass with no hub at all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
