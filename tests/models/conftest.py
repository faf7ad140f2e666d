"""Shared fixtures for kvcellar.models tests: one tiny folder per architecture per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcellar.models import ARCHS, make_model


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load must work with the Hub unreachable, as on a user's offline machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder of its tiny model (seed 0, bfloat16). Tests must not modify these.

    tests/conftest.py has a fixture of the same name for the other packages;
    this one shadows it so the models tests do not depend on that file.
    """
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_model(arch, "tiny", root / arch) for arch in ARCHS}
