"""`--dtype auto` per device (engine/loader.resolve_dtype): CPU capabilities and memory are replaced, nothing loads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvcellar.engine import loader

CPU = torch.device("cpu")
GIB = 1 << 30


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    def set_cpu(native_bf16: bool, memory_bytes: int | None = 24 * GIB) -> None:
        monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native_bf16)
        monkeypatch.setattr(loader, "_physical_memory_bytes", lambda: memory_bytes)

    return set_cpu


def test_a_cpu_with_bf16_instructions_runs_bf16(cpu) -> None:
    cpu(native_bf16=True)
    assert loader.resolve_dtype("auto", CPU, "float32", num_parameters=135_000_000) == torch.bfloat16


def test_a_cpu_without_them_runs_fp32_while_the_weights_fit(cpu) -> None:
    cpu(native_bf16=False)
    assert loader.resolve_dtype("auto", CPU, "bfloat16", num_parameters=135_000_000) == torch.float32
    assert loader.resolve_dtype("auto", CPU, "bfloat16", num_parameters=3 * GIB // 4) == torch.float32  # 3 GiB of 24
    assert loader.resolve_dtype("auto", CPU, "bfloat16") == torch.float32  # size unknown


def test_fp32_weights_over_half_the_memory_fall_back_to_bf16_and_say_why(cpu, caplog) -> None:
    cpu(native_bf16=False, memory_bytes=24 * GIB)
    with caplog.at_level(logging.WARNING, logger="kvcellar.engine.loader"):
        assert loader.resolve_dtype("auto", CPU, "bfloat16", num_parameters=8_000_000_000) == torch.bfloat16
    assert "32.0 GB of fp32 weights would take over half" in caplog.text and "--dtype float32" in caplog.text


def test_an_explicit_dtype_and_gpu_folders_keep_their_choice(cpu) -> None:
    cpu(native_bf16=False)
    assert loader.resolve_dtype("bfloat16", CPU, "float32", num_parameters=10) == torch.bfloat16
    assert loader.resolve_dtype("auto", torch.device("cuda"), "float16") == torch.float16
    assert loader.resolve_dtype("auto", torch.device("cuda"), None) == torch.bfloat16
    assert loader.resolve_dtype("auto", torch.device("mps"), None) == torch.float16


def test_a_folders_parameters_come_from_its_weight_bytes(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4000)
    assert loader._folder_parameters(tmp_path, "bfloat16") == 2000
    assert loader._folder_parameters(tmp_path, "float32") == 1000


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_cpu_weights_live_in_the_process_memory_not_in_the_checkpoint_file(tiny_model_dirs) -> None:
    """Clean file pages may be dropped by the kernel at any time; the weights must not come back from disk."""
    import gc

    from kvcellar.engine.loader import load_model

    folder = Path(tiny_model_dirs["gemma3"]).resolve()  # tied embeddings: the tie must survive the copy
    loaded = load_model(folder, "cpu", "auto")
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = [line.split()[-1] for line in maps if str(folder) in line]
    assert mapped == []
    model = loaded.model
    if model.config.get_text_config().tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
