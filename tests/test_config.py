"""kvcellar.config: sizes both ways, keyword-only dataclasses, no torch, 'auto' left to the loader."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvcellar.config import CacheConfig, EngineConfig, ServerSettings, default_block_size, parse_size, size_text


@pytest.mark.parametrize(("num_bytes", "text"), [(2 * 1024**3, "2G"), (8 * 1024**2, "8M"), (1536, "1536"), (0, "0"),
                                                 (3 * 1024, "3K"), (1024**4, "1T")])  # fmt: skip
def test_size_text_is_the_exact_inverse_of_parse_size(num_bytes, text) -> None:
    assert size_text(num_bytes) == text and parse_size(text) == num_bytes


def test_config_dataclasses_take_keywords_only() -> None:
    with pytest.raises(TypeError):
        EngineConfig("model", "cpu")  # type: ignore[misc]
    with pytest.raises(TypeError):
        CacheConfig(True)  # type: ignore[misc]
    with pytest.raises(TypeError):
        ServerSettings("0.0.0.0")  # type: ignore[misc]
    assert EngineConfig("model", device="cpu").device == "cpu"


def test_block_size_and_exact_mode_are_left_to_the_engine_unless_given() -> None:
    config = EngineConfig("model", device="auto")
    assert config.block_size is None and config.cache.exact is None
    cpu = config.resolved("cpu")
    assert (cpu.block_size, cpu.cache.exact) == (256, True)
    # A GPU: near mode, small blocks sliced out of long passes; long blocks where each pass is one block.
    cuda = config.resolved("cuda")
    assert (cuda.block_size, cuda.cache.exact) == (256, False)
    assert config.resolved("cuda", only_full_attention=False).block_size == 2048
    exact = EngineConfig("model", cache=CacheConfig(exact=True)).resolved("cuda")
    assert (exact.block_size, exact.cache.exact) == (2048, True)
    uncached = EngineConfig("model", cache=CacheConfig(enabled=False, exact=True)).resolved("cuda")
    assert uncached.block_size == 256  # no exact-mode cache: nothing needs one-block passes
    assert EngineConfig("model", block_size=64).resolved("cuda").block_size == 64
    assert EngineConfig("model", cache=CacheConfig(exact=False)).resolved("cpu").cache.exact is False
    with pytest.raises(ValueError, match="no default block size for device type 'auto'"):
        default_block_size("auto")
    with pytest.raises(ValueError, match="exact must be True, False or None"):
        CacheConfig(exact="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"multiple of the block size \(16\), got 40"):
        EngineConfig("model", block_size=16, prefill_chunk_size=40)
    with pytest.raises(ValueError, match=r"multiple of the block size \(256\), got 40"):
        EngineConfig("model", prefill_chunk_size=40).resolved("cpu")
    with pytest.raises(ValueError, match="block_size must be between 1 and 65536"):
        EngineConfig("model", block_size=True)


def test_config_imports_no_torch() -> None:
    code = "import sys, kvcellar.config, kvcellar.checks; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
