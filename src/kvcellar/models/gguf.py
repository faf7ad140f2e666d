"""GGUF files as model input: found, identified, checked, and converted once into a cached model folder.

Operations: `find_gguf(path)` (a `.gguf` file, or a folder holding exactly one and no
config.json), `read_architecture(file)`, `parameter_count(file)`, `check_supported(file)`,
`gguf_fingerprint(file)`, `converted_dir(file, dtype)` -> the folder `load_model` then loads
like any other.

Why convert: transformers' GGUF loader rebuilds the tokenizer from the file's vocabulary and
dequantizes every tensor on each load, which takes longer than loading the converted weights.
Weights stay packed only when transformers can fetch GGUF matmul kernels through the `kernels`
package (from the Hub, which offline machines cannot reach); otherwise it dequantizes anyway.
kvcellar always dequantizes, to the engine's dtype, and writes the result (config, tokenizer with
the file's chat template, generation config, safetensors weights) to
`<home>/models/gguf/<stem>-<fingerprint>-<dtype>/`, so a restart loads that folder directly.

Invariants: the cached folder is named by the file's fingerprint, so a different file under the
same name never reuses it; it is published by an atomic rename of a complete staging folder, so
a folder that exists is complete; `source.json` in it records which file it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from kvcellar.errors import ModelLoadError
from kvcellar.models.gguf_header import read_header

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
_HEAD_BYTES = 8 << 20  # the header (metadata, vocabulary, tensor table) and the first tensors
_TAIL_BYTES = 1 << 20
# Architectures transformers' GGUF tables know but kvcellar cannot serve (not decoder-only causal LMs).
_NOT_CAUSAL = frozenset({"t5", "umt5", "t5encoder"})


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one `.gguf` in a folder without config.json; else None."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ModelLoadError(f"{str(path)!r} holds several GGUF files ({names}): pass the one to serve as --model FILE.gguf")
    return files[0] if files else None


def read_architecture(file: Path) -> str:
    """The file's `general.architecture`, or ModelLoadError if it is not a readable model GGUF."""
    architecture = read_header(file).architecture
    if architecture is None:
        raise ModelLoadError(f"{str(file)!r} has no general.architecture in its metadata, so it is not a model GGUF")
    return architecture


def parameter_count(file: Path) -> int:
    """Elements over all of the file's tensors (what the dequantized model will hold)."""
    return read_header(file).num_parameters


def _transformers_architectures() -> frozenset[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:  # the newer loader path keeps its own table
        from transformers.integrations.gguf.utils import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return frozenset(names)


def check_supported(file: Path) -> str:
    """The architecture, if transformers can load it as a causal LM; else ModelLoadError naming it."""
    arch = read_architecture(file)
    known = _transformers_architectures()
    spelled = {arch, arch.replace("moe", "_moe")}  # transformers writes qwen2moe as qwen2_moe
    if arch in _NOT_CAUSAL or not spelled & known:
        supported = ", ".join(sorted(known - _NOT_CAUSAL))
        raise ModelLoadError(
            f"{file.name} is a GGUF of architecture {arch!r}, which the installed transformers cannot load as a "
            f"causal LM (it loads GGUF files of: {supported}); convert it to a Hugging Face folder, or pick another file"
        )
    return arch


def gguf_fingerprint(file: Path) -> str:
    """sha256 over the file's size, its first 8 MiB (metadata and tensor table) and its last 1 MiB.

    Hashing gigabytes would make every start slow; a re-quantized or re-exported file
    changes its size, header or tensor bytes, and these reads see it.
    """
    size = file.stat().st_size
    digest = hashlib.sha256(f"gguf:{size}:".encode())
    with file.open("rb") as handle:
        digest.update(handle.read(_HEAD_BYTES))
        if size > _HEAD_BYTES:
            handle.seek(max(_HEAD_BYTES, size - _TAIL_BYTES))
            digest.update(handle.read())
    return digest.hexdigest()


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def converted_dir(
    file: Path, dtype: str, home: Path, *, fingerprint: str | None = None, progress: Callable[[str], None] = log.warning
) -> Path:
    """The converted folder of `file` in `dtype` ("bfloat16", "float16", "float32"), converting it first if absent.

    Progress goes to a warning by default: the one-time conversion takes a while (dequantizing
    every tensor), and a server's default log level must show why.
    """
    fingerprint = fingerprint or gguf_fingerprint(file)
    out = home / "models" / "gguf" / f"{file.stem}-{fingerprint[:16]}-{dtype}"
    if _is_complete(out):
        return out
    arch = check_supported(file)
    progress(f"converting {file.name} ({arch}, {file.stat().st_size / 2**20:.0f} MiB) to {dtype} into {out} (once)")
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        _convert(file, dtype, staging)
        (staging / SOURCE_FILE).write_text(json.dumps(
            {"gguf": str(file), "size": file.stat().st_size, "fingerprint": fingerprint, "architecture": arch,
             "dtype": dtype}, indent=2))  # fmt: skip
        try:
            os.rename(staging, out)
        except OSError:
            if not _is_complete(out):  # another process did not publish it first: a real failure
                raise
    except OSError as exc:  # an unwritable or full home
        raise ModelLoadError(f"cannot write the converted {file.name} under {out.parent} ({exc}): free space there, "
                             "or point KVCELLAR_HOME at a writable folder") from exc  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"converted {file.name}; later starts load {out}")
    return out


def _convert(file: Path, dtype: str, staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging.mkdir(parents=True)
    kwargs = {"gguf_file": file.name, "local_files_only": True}
    packing = {}
    try:  # a transformers that can keep GGUF blocks packed is told not to; older ones always dequantize
        from transformers import GgufConfig

        packing = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(file.parent, dtype=getattr(torch, dtype), **kwargs, **packing)
    except ImportError as exc:
        raise ModelLoadError(f"loading {file.name} needs the gguf and accelerate packages: {exc}") from exc
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(f"transformers cannot load {file.name} ({exc})") from exc
    # The folder is a plain dense model: drop the GGUF quantization marker so it loads as one.
    for config in (model.config, model.config.get_text_config(decoder=True)):
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
