"""Write a seeded random-weight Hugging Face model folder (`make_model`).

The folder holds config.json, generation_config.json, model.safetensors and
the tokenizer files (tokenizer.json, tokenizer_config.json,
chat_template.jinja); `AutoModelForCausalLM` / `AutoTokenizer` load it
offline. The same (arch, size, seed, dtype) gives byte-identical weights.

Publishing is atomic: everything is written into a hidden temporary sibling
folder, which is renamed to the requested name only when complete, so an
interrupted run never leaves a folder that looks valid under that name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from kvcellar.errors import InvalidRequestError
from kvcellar.models.configs import build_config
from kvcellar.models.specs import check_arch, check_dtype, size_spec
from kvcellar.models.tokenizer import build_tokenizer

Progress = Callable[[str], None]
# Every finished folder holds these; `make_model` publishes atomically, so their presence means complete.
MADE_FILES: tuple[str, ...] = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
)  # fmt: skip


def _no_progress(message: str) -> None:
    del message


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _exists_message(out: Path) -> str:
    return (
        f"{out} already exists and is not empty; pass overwrite=True (--force on the "
        "command line) to replace it, or choose another folder."
    )


def _check_destination(out: Path, overwrite: bool) -> None:
    """Refuse before the slow build if publishing to `out` would fail or destroy data."""
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"{out} exists and is not a folder; choose another output folder.")
    if not _is_nonempty_dir(out):
        return
    if not overwrite:
        raise InvalidRequestError(_exists_message(out))
    # Overwrite deletes the old folder, so only ever delete something that is
    # a model folder: a typo such as `--out ~ --force` must not wipe a home.
    if not (out / "config.json").is_file():
        raise InvalidRequestError(
            f"refusing to replace {out}: it is not empty and has no config.json, so it does "
            "not look like a model folder; delete it yourself or choose another folder."
        )


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `staging` folder to `out`, replacing `out` only if `overwrite`."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # Windows' rename refuses any existing target, even an empty one.
    if overwrite and out.exists():
        # Move the old folder aside first: the window in which `out` is missing
        # is two renames long, and `out` never holds a mix of old and new files.
        retired = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        # Fails if another process published `out` meanwhile: never clobber it.
        os.rename(staging, out)
    except OSError as exc:
        if _is_nonempty_dir(out):
            raise InvalidRequestError(_exists_message(out)) from exc
        raise


def _write_folder(
    arch: str, size: str, folder: Path, seed: int, dtype: str, progress: Progress, init_device: str = "cpu"
) -> None:
    spec = size_spec(size)
    progress(f"training tokenizer (vocab {spec.tokenizer_vocab_size})")
    tokenizer = build_tokenizer(spec.tokenizer_vocab_size, spec.max_position_embeddings)

    config = build_config(arch, size)
    progress(f"building model ({arch} {size}, {config.num_hidden_layers} layers)")
    # fork_rng keeps the caller's global RNG untouched; seeding right before
    # construction makes the weights a function of `seed` alone.
    # Weights are drawn on `init_device` in the target dtype: an 8B shape fits a GPU in seconds,
    # where a float32 CPU build would need 32 GB and minutes. Same seed + same device => same weights.
    fork_devices = [torch.device(init_device).index or 0] if init_device.startswith("cuda") else []
    with torch.random.fork_rng(devices=fork_devices, device_type=torch.device(init_device).type):
        torch.manual_seed(seed)
        if init_device == "cpu":
            model = AutoModelForCausalLM.from_config(config)
        else:
            with torch.device(init_device):
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.to(getattr(torch, dtype))

    progress("saving weights and tokenizer")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_model(
    arch: str,
    size: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: Progress | None = None,
    init_device: str = "cpu",
) -> Path:
    """Write a random-weight model folder for `arch` at `size` to `out_dir` and return its path.

    Raises InvalidRequestError for an unknown arch, size or dtype, and when
    `out_dir` is a non-empty folder and `overwrite` is False. `progress`, if
    given, receives short messages ("training tokenizer ...", "building model
    ...", "saving ...") as the work advances.
    """
    check_arch(arch)
    size_spec(size)
    check_dtype(dtype)
    out = Path(out_dir).expanduser().absolute()
    _check_destination(out, overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem (and is atomic);
    # hidden, so a killed run's leftover is never mistaken for a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_folder(arch, size, staging, seed, dtype, progress or _no_progress, init_device)
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def is_complete_model_dir(path: Path) -> bool:
    """True if `path` holds every file a finished `make_model` folder has."""
    return all((path / name).is_file() for name in MADE_FILES)


def ensure_model(arch: str, size: str, path: Path, *, progress: Progress | None = None) -> Path:
    """`path`, made by `make_model(arch, size, path)` first unless a complete folder is there (then reused)."""
    if is_complete_model_dir(path):
        return path
    if progress is not None:
        progress(f"making {path} (once)")
    try:
        # Replace only a folder that is already there but incomplete; a missing one is created without
        # overwrite, so a concurrent builder's finished folder is never replaced under a reader.
        return make_model(arch, size, path, overwrite=path.exists(), progress=progress)
    except InvalidRequestError:
        if is_complete_model_dir(path):  # another process published it first
            return path
        raise
