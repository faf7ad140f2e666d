"""Tests for kvcellar.models.demo: location, first-use build, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvcellar.models.demo as demo
from kvcellar.errors import InvalidRequestError
from kvcellar.models import ensure_demo_model, make_model


def refuse_to_build(*args, **kwargs):
    raise AssertionError("the demo model was rebuilt although a complete one exists")


def test_first_call_builds_qwen3_small_and_second_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_demo_model(cache_root=tmp_path)
    assert path == tmp_path / "models" / "demo-qwen3-small"
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("qwen3", 256, 6)
    weights = path / "model.safetensors"
    mtime_ns = weights.stat().st_mtime_ns

    monkeypatch.setattr(demo, "make_model", refuse_to_build)
    assert ensure_demo_model(cache_root=tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime_ns


def test_location_follows_kvcellar_home_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCELLAR_HOME", str(tmp_path / "kv"))
    assert demo.demo_model_dir() == tmp_path / "kv" / "models" / "demo-qwen3-small"
    assert demo.demo_model_dir(tmp_path / "root") == tmp_path / "root" / "models" / "demo-qwen3-small"
    monkeypatch.delenv("KVCELLAR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert demo.demo_model_dir() == tmp_path / "user" / ".cache" / "kvcellar" / "models" / "demo-qwen3-small"


def test_incomplete_folder_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "DEMO_SIZE", "tiny")  # same code path, a fraction of the time
    path = demo.demo_model_dir(tmp_path)
    make_model("qwen3", "tiny", path)
    (path / "model.safetensors").unlink()
    assert ensure_demo_model(cache_root=tmp_path) == path
    assert demo.is_complete_model_dir(path)


def test_folder_published_by_another_process_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = demo.demo_model_dir(tmp_path)

    def lose_the_race(arch, size, out_dir, **kwargs):
        make_model(arch, "tiny", out_dir)  # the other process wins ...
        raise InvalidRequestError(f"{out_dir} already exists and is not empty")  # ... so our rename fails

    monkeypatch.setattr(demo, "make_model", lose_the_race)
    assert ensure_demo_model(cache_root=tmp_path) == path
    assert demo.is_complete_model_dir(path)
