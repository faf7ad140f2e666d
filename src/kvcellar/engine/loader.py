"""Load a local causal LM, offline: a Hugging Face model folder, or a GGUF file.

Operations: `resolve_device`, `device_type` (what "auto" means here, for callers
that need it before a model loads: bench), `resolve_dtype`, `converted_gguf`, `load_model` -> `LoadedModel`.
Nothing here reaches a hub: loading sets `local_files_only=True`, so a path
that is not on disk is an error that says so, never a download. A GGUF file
(or a folder holding one) is converted once into a cached model folder
(models/gguf.py) and then loaded like any folder; its fingerprint and served
name come from the file itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcellar.engine import attention, batch_decode
from kvcellar.engine.kernels import load_cpu_kernels
from kvcellar.errors import ModelLoadError

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                 "float32-bf16-weights": torch.float32}  # the compute dtype; the weights: engine/weights.py
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """A model and its tokenizer, on one device. Only the engine's worker thread runs the model."""

    model: torch.nn.Module
    tokenizer: object
    path: Path
    device: torch.device
    dtype: torch.dtype
    context_length: int
    fingerprint: str  # sha256 over config.json and the weight files' names and sizes (see _fingerprint)
    name: str = ""  # the served model id: the folder's name, or a GGUF file's stem
    source: Path | None = None  # the GGUF file a converted folder came from; None for a plain folder
    weight_dtype: torch.dtype | None = None  # bf16 where weights are stored in bf16 (engine/weights.py); None: dtype

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

    @property
    def precision(self) -> str:
        """The dtype as `--dtype` names it: "float32-bf16-weights" when fp32 runs on bf16-stored weights."""
        if self.weight_dtype == torch.bfloat16 and self.dtype == torch.float32:
            return "float32-bf16-weights"
        return _dtype_name(self.dtype)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_type(name: str) -> str:
    """"cpu", "cuda" or "mps": the kind of device `name` ("auto", "cuda:1"...) names, "auto" resolved as
    `resolve_device` does; an explicit device is not checked to exist (that is `resolve_device`'s job)."""
    return _auto_device().type if name == "auto" else torch.device(name).type


def has_only_full_attention(path: str | os.PathLike) -> bool:
    """Whether every layer of the model at `path` is full attention, from its config alone (no weights
    loaded), for the defaults that depend on it before a load (EngineConfig.resolved). A GGUF file or
    a folder whose config transformers cannot read counts as full attention: the engine resolves the
    same defaults from the loaded model, and a block given explicitly is kept."""
    from transformers import AutoConfig

    from kvcellar.kv.layout import inspect_layout

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return True
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception:  # transformers raises many types for a config it cannot read; loading will say why
        return True
    return inspect_layout(config).only_full_attention


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        return _auto_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but this torch build sees no CUDA GPU: use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' was asked for but MPS is not available here: use --device cpu or auto")
    return device


def cpu_has_native_bf16() -> bool:
    """True if this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); without it torch emulates bf16."""
    capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def resolve_dtype(
    name: str, device: torch.device, config_dtype: object, num_parameters: int | None = None
) -> torch.dtype:
    """`auto`: the folder's own dtype on GPUs; fp16 on MPS for fp32 folders; on CPU the faster of bf16 and fp32.

    On a CPU, bf16 is the fastest only where the hardware multiplies it (AVX-512 BF16, AMX): on an
    AVX2-only CPU torch converts every bf16 operand, and a bf16 matmul runs 4-6x slower than fp32
    (docs/benchmarks.md), so there fp32 is chosen, at twice the weight and K/V memory, unless the
    fp32 weights (`num_parameters` x 4 bytes) would take more than half of the machine's memory.
    """
    if name != "auto":
        return _TORCH_DTYPES[name]
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return torch.bfloat16
        memory = _physical_memory_bytes()
        if num_parameters is not None and memory is not None and 4 * num_parameters > memory // 2:
            log.warning("this CPU has no bf16 instructions, so fp32 would be faster, but %.1f GB of fp32 weights "
                        "would take over half of its %.1f GB: running in bf16 (--dtype float32 forces fp32)",
                        4 * num_parameters / 1e9, memory / 1e9)  # fmt: skip
            return torch.bfloat16
        return torch.float32
    if isinstance(config_dtype, torch.dtype):
        return config_dtype
    if isinstance(config_dtype, str) and config_dtype in _TORCH_DTYPES:
        return _TORCH_DTYPES[config_dtype]
    return torch.float16 if device.type == "mps" else torch.bfloat16


def _folder_parameters(folder: Path, config_dtype: object) -> int:
    """Parameters of a folder's weights, from their file sizes and stored dtype (2 bytes each unless fp32)."""
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    stored = sum(file.stat().st_size for file in files)
    return stored // (4 if str(config_dtype).removeprefix("torch.") == "float32" else 2)


def _check_folder(path: Path) -> dict:
    if not path.exists():
        raise ModelLoadError(
            f"model {str(path)!r} does not exist: pass a local Hugging Face model folder or a .gguf file, "
            "or make a folder with `kvcellar make-model --arch qwen3 --size tiny DIR`"
        )
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is neither a model folder nor a .gguf file: pass the folder holding "
                             "config.json, or a GGUF file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json and no .gguf file, so it is not a model folder")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(f"{str(path)!r} has a config.json but no weights (model.safetensors); the folder is incomplete")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON ({exc}); the folder is damaged") from exc


def _fingerprint(path: Path) -> str:
    """Identity of the weights without reading them: config bytes + each weight file's name, size and mtime-free header.

    Reading gigabytes to hash them would make start-up slow; the safetensors
    header (names, shapes, offsets) plus the file size changes whenever the
    weights are re-exported, and the first 1 MiB of tensor data catches
    re-randomized weights of the same shape.
    """
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weight_file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(weight_file.name.encode())
        digest.update(str(weight_file.stat().st_size).encode())
        with weight_file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def _load_weights(folder: Path, torch_dtype: torch.dtype, torch_device: torch.device) -> torch.nn.Module:
    """The model, with `kvcellar_sdpa` attention (engine/attention.py) on CUDA and CPU where the class takes it."""
    from transformers import AutoModelForCausalLM

    if torch_device.type in ("cuda", "cpu"):
        try:
            return AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, local_files_only=True, attn_implementation=attention.register()
            )
        except (ValueError, ImportError) as exc:  # a class without pluggable attention: its default is right too
            log.info("%s keeps its default attention (%s)", folder.name, exc)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)


def _own_memory(model: torch.nn.Module) -> None:
    """Copy the weights out of the checkpoint's file mapping into memory of the process's own.

    transformers leaves CPU weights as views of the safetensors file, mapped privately: clean file
    pages, which the kernel may drop whenever it wants the memory (memory pressure, or proactive
    reclaim such as DAMON's, which pages out what sat idle for seconds). The next request then reads
    the weights back from the page cache or the disk, and an idle server answers its next prompt
    slower (docs/benchmarks.md). Anonymous memory stays resident. One copy at load; the file mapping
    goes once no tensor views it.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.data = tensor.data.clone()


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _TORCH_DTYPES.items() if value == dtype)


def converted_gguf(
    file: Path, device: torch.device, dtype: str, home: Path | None = None
) -> tuple[Path, str, torch.dtype]:
    """(converted folder, fingerprint, dtype) of a GGUF file for `device`: converted once, in the dtype it runs in."""
    from kvcellar.models import gguf
    from kvcellar.models.demo import kvcellar_home

    fingerprint = gguf.gguf_fingerprint(file)
    torch_dtype = resolve_dtype(dtype, device, None, gguf.parameter_count(file))
    folder = gguf.converted_dir(file, _dtype_name(torch_dtype), home or kvcellar_home(), fingerprint=fingerprint)
    return folder, fingerprint, torch_dtype


def load_model(
    path: str | os.PathLike, device: str = "auto", dtype: str = "auto", *, home: Path | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder or GGUF file, or raise ModelLoadError saying what to fix.

    `home` holds GGUF conversions (`<home>/models/gguf`); default `$KVCELLAR_HOME` or ~/.cache/kvcellar.
    """
    from transformers import AutoTokenizer

    from kvcellar.models import gguf

    folder = Path(path).expanduser().resolve()
    torch_device = resolve_device(device)
    if dtype == "float32-bf16-weights" and torch_device.type != "cpu":
        raise ModelLoadError("dtype float32-bf16-weights is for CPUs (it halves a decode step's weight reads "
                             f"where bf16 arithmetic is emulated); on {torch_device.type} use bfloat16 or auto")  # fmt: skip
    gguf_file = gguf.find_gguf(folder)
    source_fingerprint, torch_dtype = None, None
    if gguf_file is not None:
        folder, source_fingerprint, torch_dtype = converted_gguf(gguf_file, torch_device, dtype, home)
    config = _check_folder(folder)
    if torch_device.type == "cpu":
        # Chunked prefill passes a mask, and transformers then copies grouped K/V out to every query head
        # before SDPA. On CPU, torch's masked SDPA handles GQA itself, without that copy, and runs
        # about twice as fast on a chunk against many cached keys. GPUs keep transformers' choice: their
        # masked GQA path would fall back to the slow math kernel. Process-wide; a user's value wins.
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    if torch_dtype is None:
        config_dtype = config.get("torch_dtype") or config.get("dtype")
        torch_dtype = resolve_dtype(dtype, torch_device, config_dtype, _folder_parameters(folder, config_dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types here; the user needs one message
        raise ModelLoadError(f"cannot load a tokenizer from {str(folder)!r}: {exc}") from exc
    try:
        model = _load_weights(folder, torch_dtype, torch_device)
    except ValueError as exc:
        raise ModelLoadError(
            f"{str(folder)!r} is not a causal language model transformers can load "
            f"(model_type {config.get('model_type')!r}): {exc}"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model in {str(folder)!r}: {exc}") from exc
    model.to(torch_device).eval()
    if torch_device.type == "cpu":
        from kvcellar.models.demo import kvcellar_home

        _own_memory(model)
        kernels = load_cpu_kernels(kvcellar_home() / "kernels")
        attention.use_cpu_kernels(kernels)
        batch_decode.use_append_kernel(kernels)
    weight_dtype = _store_weights(model, dtype, torch_device, torch_dtype)
    text_config = model.config.get_text_config(decoder=True)
    context_length = int(getattr(text_config, "max_position_embeddings", 0) or 0) or 2048
    name = gguf_file.stem if gguf_file is not None else folder.name
    loaded = LoadedModel(model, tokenizer, folder, torch_device, torch_dtype, context_length,
                         source_fingerprint or _fingerprint(folder), name=name, source=gguf_file,
                         weight_dtype=weight_dtype)  # fmt: skip
    log.info("loaded %s on %s as %s (context %d)", name, torch_device, loaded.precision, context_length)
    return loaded


def _store_weights(model: torch.nn.Module, dtype: str, device: torch.device, torch_dtype: torch.dtype) -> torch.dtype | None:
    """bf16 storage for fp32 weights (engine/weights.py): asked for, or `auto` on a CPU that computes in fp32.
    A bf16 model on a CPU gets the same one-row kernel for its decode steps (`use_one_row_kernel`)."""
    from kvcellar.engine.weights import store_weights_in_bf16, use_one_row_kernel
    from kvcellar.models.demo import kvcellar_home

    if device.type == "cpu" and torch_dtype == torch.bfloat16:
        log.info("%d linear layers run one-row passes through the built kernel",
                 use_one_row_kernel(model, kvcellar_home() / "kernels"))  # fmt: skip
        return None
    wanted = dtype == "float32-bf16-weights" or (dtype == "auto" and device.type == "cpu" and torch_dtype == torch.float32)
    if not wanted:
        return None
    stored = store_weights_in_bf16(model, kvcellar_home() / "kernels")
    log.info("%d weights stored in bf16 (%.2f GB saved), %d stay in fp32 (not bf16 values)",
             stored.num_bf16, stored.bytes_saved / 1e9, stored.num_fp32)  # fmt: skip
    return torch.bfloat16 if stored.num_bf16 else None
