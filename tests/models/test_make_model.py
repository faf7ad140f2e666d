"""Tests for kvcellar.models.make_model: loadable folders, determinism, errors, atomicity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kvcellar.errors import InvalidRequestError
from kvcellar.models import ARCHS, DTYPES, SIZES, make_model

MODEL_CLASSES = {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM"}
LAYER_KINDS = {
    "qwen3": {"full_attention"},
    "gemma3": {"sliding_attention", "full_attention"},
    "qwen3_5": {"linear_attention", "full_attention"},
}
FOLDER_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_folder_loads_offline_and_runs(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    folder = tiny_model_dirs[arch]
    assert {p.name for p in folder.iterdir()} == FOLDER_FILES
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == MODEL_CLASSES[arch]
    assert model.dtype == torch.bfloat16
    assert set(model.config.layer_types) == LAYER_KINDS[arch]
    input_ids = torch.arange(5, 105).unsqueeze(0)  # 100 tokens: past gemma3's 24-token window
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, 100, 2048)
    assert torch.isfinite(logits).all()
    # Not a constant function: the prediction depends on the context.
    assert logits[0].argmax(-1).unique().numel() > 10


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_identical_bytes(arch: str, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    again = make_model(arch, "tiny", tmp_path / "again", seed=0)
    other_seed = make_model(arch, "tiny", tmp_path / "seed1", seed=1)
    original = tiny_model_dirs[arch]
    for name in FOLDER_FILES:
        assert sha256(again / name) == sha256(original / name), name
    assert sha256(other_seed / "model.safetensors") != sha256(original / "model.safetensors")
    assert sha256(other_seed / "tokenizer.json") == sha256(original / "tokenizer.json")


def test_float32_is_the_unrounded_bfloat16_model(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = make_model("qwen3", "tiny", tmp_path / "fp32", dtype="float32")
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.float32
    full = load_file(folder / "model.safetensors")
    rounded = load_file(tiny_model_dirs["qwen3"] / "model.safetensors")
    assert full.keys() == rounded.keys()
    for name, tensor in full.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor.to(torch.bfloat16), rounded[name]), name


def test_callers_rng_is_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    make_model("qwen3", "tiny", tmp_path / "model", seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_progress_messages(tmp_path: Path) -> None:
    messages: list[str] = []
    make_model("gemma3", "tiny", tmp_path / "model", progress=messages.append)
    assert [m.split(" (")[0] for m in messages] == ["training tokenizer", "building model", "saving weights and tokenizer"]


@pytest.mark.parametrize(
    ("kwargs", "choices"),
    [
        (dict(arch="llama", size="tiny"), ARCHS),
        (dict(arch="qwen3", size="7b"), SIZES),
        (dict(arch="qwen3", size="tiny", dtype="float8"), DTYPES),
    ],
)
def test_unknown_choices_list_the_valid_ones(kwargs: dict, choices: tuple[str, ...], tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as info:
        make_model(out_dir=tmp_path / "model", **kwargs)
    assert all(choice in str(info.value) for choice in choices)
    assert not (tmp_path / "model").exists()


def test_non_empty_folder_needs_overwrite(tmp_path: Path) -> None:
    folder = make_model("qwen3", "tiny", tmp_path / "model", seed=0)
    weights = sha256(folder / "model.safetensors")
    with pytest.raises(InvalidRequestError, match=r"overwrite=True \(--force"):
        make_model("qwen3", "tiny", folder, seed=1)
    assert sha256(folder / "model.safetensors") == weights

    assert make_model("qwen3", "tiny", folder, seed=1, overwrite=True) == folder
    assert sha256(folder / "model.safetensors") != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # old copy removed


def test_empty_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    folder = make_model("qwen3", "tiny", tmp_path / "model")
    assert {p.name for p in folder.iterdir()} == FOLDER_FILES


def test_overwrite_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(InvalidRequestError, match="does not look like a model folder"):
        make_model("qwen3", "tiny", tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").write_text("")
    with pytest.raises(InvalidRequestError, match="not a folder"):
        make_model("qwen3", "tiny", tmp_path / "model", overwrite=True)


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # after model.safetensors was written

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_model("qwen3", "tiny", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_ensure_model_makes_once_then_reuses(tmp_path, monkeypatch) -> None:
    from kvcellar.models import factory

    path = factory.ensure_model("qwen3", "tiny", tmp_path / "m")
    assert factory.is_complete_model_dir(path)
    mtime_ns = (path / "model.safetensors").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt although a complete folder exists")

    monkeypatch.setattr(factory, "make_model", refuse)
    assert factory.ensure_model("qwen3", "tiny", path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime_ns


def test_ensure_model_rebuilds_an_incomplete_folder(tmp_path) -> None:
    from kvcellar.models import factory

    path = factory.ensure_model("qwen3", "tiny", tmp_path / "m")
    (path / "model.safetensors").unlink()
    assert factory.ensure_model("qwen3", "tiny", path) == path
    assert factory.is_complete_model_dir(path)


def test_ensure_model_accepts_a_folder_another_process_published(tmp_path, monkeypatch) -> None:
    from kvcellar.errors import InvalidRequestError
    from kvcellar.models import factory

    real_make = factory.make_model

    def lose_the_race(arch, size, out_dir, **kwargs):
        real_make(arch, size, out_dir)  # the other process wins ...
        raise InvalidRequestError(f"{out_dir} already exists and is not empty")  # ... so our rename fails

    monkeypatch.setattr(factory, "make_model", lose_the_race)
    path = tmp_path / "m"
    assert factory.ensure_model("qwen3", "tiny", path) == path
    assert factory.is_complete_model_dir(path)
