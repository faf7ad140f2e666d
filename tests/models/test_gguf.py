"""GGUF input (kvcellar.models.gguf): which path is a GGUF, refusals a user reads, the conversion cache.

The conversion itself runs on the real demo model in tests/engine/test_real_weights.py; here
`_convert` is replaced where a test is about naming, reuse and publishing, so it runs in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvcellar.engine.loader import load_model
from kvcellar.errors import ModelLoadError
from kvcellar.models import gguf


def _write_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_find_gguf_takes_a_file_or_a_folder_holding_one(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    file = _write_gguf(tmp_path / "one" / "m.gguf", "llama")
    assert gguf.find_gguf(file) == file
    assert gguf.find_gguf(tmp_path / "one") == file
    (tmp_path / "one" / "config.json").write_text("{}")
    assert gguf.find_gguf(tmp_path / "one") is None  # a Hugging Face folder that also holds a GGUF stays a folder
    (tmp_path / "notes.txt").write_text("x")
    assert gguf.find_gguf(tmp_path / "notes.txt") is None


def test_a_folder_with_two_gguf_files_asks_which(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "a.gguf", "llama")
    _write_gguf(tmp_path / "b.gguf", "llama")
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(a.gguf, b.gguf\): pass the one"):
        gguf.find_gguf(tmp_path)


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_an_architecture_transformers_cannot_serve_is_refused_by_name(tmp_path: Path, arch: str) -> None:
    file = _write_gguf(tmp_path / f"{arch}-model.gguf", arch)
    with pytest.raises(ModelLoadError, match=rf"architecture '{arch}', which the installed transformers cannot load") as caught:
        load_model(file, device="cpu", home=tmp_path / "home")
    assert "llama" in str(caught.value)  # the message lists what is supported
    assert not (tmp_path / "home").exists()  # refused before any conversion began


def test_a_damaged_file_is_not_a_readable_gguf(tmp_path: Path) -> None:
    file = tmp_path / "broken.gguf"
    file.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="is not a readable GGUF file"):
        load_model(file, device="cpu", home=tmp_path)


def test_fingerprint_follows_the_bytes_not_the_name(tmp_path: Path) -> None:
    a = _write_gguf(tmp_path / "a.gguf", "llama")
    b = tmp_path / "b.gguf"
    b.write_bytes(a.read_bytes())
    assert gguf.gguf_fingerprint(a) == gguf.gguf_fingerprint(b)
    data = bytearray(a.read_bytes())
    data[-1] ^= 1  # one tensor byte
    b.write_bytes(bytes(data))
    assert gguf.gguf_fingerprint(a) != gguf.gguf_fingerprint(b)


def test_the_conversion_is_made_once_per_file_and_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_convert(file: Path, dtype: str, staging: Path) -> None:
        calls.append((file.name, dtype))
        staging.mkdir(parents=True)
        (staging / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    file = _write_gguf(tmp_path / "m.gguf", "llama")
    home = tmp_path / "home"
    first = gguf.converted_dir(file, "bfloat16", home)
    assert gguf.converted_dir(file, "bfloat16", home) == first
    assert calls == [("m.gguf", "bfloat16")]
    assert first.parent == home / "models" / "gguf" and first.name.startswith("m-") and first.name.endswith("-bfloat16")
    source = json.loads((first / gguf.SOURCE_FILE).read_text())
    assert (source["gguf"], source["architecture"], source["fingerprint"]) == (str(file), "llama", gguf.gguf_fingerprint(file))
    assert gguf.converted_dir(file, "float32", home) != first  # another dtype is another folder
    with file.open("ab") as handle:
        handle.write(b"\0" * 64)  # the same name, other bytes
    assert gguf.converted_dir(file, "bfloat16", home) != first
    assert len(calls) == 3
    assert sorted(p.name.startswith(".") for p in (home / "models" / "gguf").iterdir()) == [False] * 3  # no staging left


def test_a_failed_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(file: Path, dtype: str, staging: Path) -> None:
        staging.mkdir(parents=True)
        (staging / "config.json").write_text("{}")
        raise ModelLoadError("transformers cannot load m.gguf (simulated)")

    monkeypatch.setattr(gguf, "_convert", failing)
    file = _write_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(ModelLoadError, match="simulated"):
        gguf.converted_dir(file, "bfloat16", tmp_path / "home")
    assert not any((tmp_path / "home" / "models" / "gguf").iterdir())


def test_a_qwen2_gguf_runs_exactly_as_its_hugging_face_folder(tmp_path: Path, tiny_model_dirs, monkeypatch) -> None:
    """Another architecture than the demo's llama: same tokens, same template, bit-identical logits, same greedy text."""
    import torch

    from kvcellar import CacheConfig, Engine

    from .gguf_files import make_qwen2_pair

    folder, file = make_qwen2_pair(tiny_model_dirs["qwen3"], tmp_path)
    monkeypatch.setenv("KVCELLAR_HOME", str(tmp_path / "home"))
    options = {"device": "cpu", "dtype": "float32", "block_size": 16, "cache": CacheConfig(use_disk_tier=False)}
    from_file, from_folder = Engine.load(str(file), **options), Engine.load(str(folder), **options)
    try:
        assert from_file.model_name == "tiny-qwen2" and type(from_file.loaded.model).__name__ == "Qwen2ForCausalLM"
        messages = [{"role": "user", "content": "the cache of a prefix"}]
        assert from_file.encode(messages=messages)[0] == from_folder.encode(messages=messages)[0]
        ids = torch.tensor([list(range(100, 160))])
        with torch.inference_mode():
            assert torch.equal(from_file.loaded.model(ids).logits, from_folder.loaded.model(ids).logits)
        answers = [engine.generate(messages=messages, max_tokens=12, temperature=0).token_ids
                   for engine in (from_file, from_folder)]  # fmt: skip
        assert answers[0] == answers[1]
    finally:
        from_file.close()
        from_folder.close()


def test_an_unwritable_home_is_a_clear_error(tmp_path: Path) -> None:
    file = _write_gguf(tmp_path / "m.gguf", "llama")
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").write_text("a file where the models folder should be")
    with pytest.raises(ModelLoadError, match="cannot write the converted m.gguf under .*point KVCELLAR_HOME at a writable"):
        gguf.converted_dir(file, "float32", home)


def test_the_header_reader_agrees_with_ggufs_own_reader(tmp_path: Path) -> None:
    """Scalars, strings and arrays (of strings, of ints) of every kind the writer emits, then the tensor table."""
    from gguf import GGUFReader, GGUFWriter

    from kvcellar.models.gguf_header import read_header

    file = tmp_path / "m.gguf"
    writer = GGUFWriter(str(file), "qwen2")
    writer.add_block_count(3)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list(["a", "bé", "<|im_end|>"])
    writer.add_token_types([1, 1, 3])
    writer.add_bool("custom.flag", True)
    writer.add_string("general.name", "tiny")
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_header(file)
    reference = GGUFReader(str(file))
    assert header.architecture == "qwen2" and header.metadata["qwen2.block_count"] == 3
    assert header.metadata["general.name"] == "tiny" and header.metadata["custom.flag"] is True
    assert header.metadata["tokenizer.ggml.tokens"] == 3  # arrays are stepped over: their length
    assert header.tensor_elements == {t.name: int(t.n_elements) for t in reference.tensors} == {
        "token_embd.weight": 24, "blk.0.attn_q.weight": 64}
    assert gguf.parameter_count(file) == 88

    file.write_bytes(file.read_bytes()[:200])  # cut inside the metadata
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        read_header(file)
