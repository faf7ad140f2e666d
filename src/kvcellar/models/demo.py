"""The built-in demo model, made on first use and reused afterwards.

Location: `<home>/models/demo-qwen3-small`, where `<home>` is `cache_root`
if given, else `$KVCELLAR_HOME`, else `~/.cache/kvcellar`. A folder counts
as made when every file in `REQUIRED_FILES` is present; `make_model`
publishes atomically, so a present folder is a complete one unless someone
deleted files from it by hand (then it is rebuilt).
"""

from __future__ import annotations

import os
from pathlib import Path

from kvcellar.errors import InvalidRequestError
from kvcellar.models.factory import Progress, make_model

DEMO_ARCH = "qwen3"
DEMO_SIZE = "small"
DEMO_MODEL_NAME = f"demo-{DEMO_ARCH}-{DEMO_SIZE}"
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def kvcellar_home() -> Path:
    """`$KVCELLAR_HOME` if set and non-empty, else `~/.cache/kvcellar`."""
    configured = os.environ.get("KVCELLAR_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kvcellar"


def demo_model_dir(cache_root: Path | None = None) -> Path:
    """Where the demo model lives (it may not exist yet)."""
    home = Path(cache_root).expanduser() if cache_root is not None else kvcellar_home()
    return home / "models" / DEMO_MODEL_NAME


def is_complete_model_dir(path: Path) -> bool:
    """True if `path` holds every file a finished `make_model` folder has."""
    return all((path / name).is_file() for name in REQUIRED_FILES)


def ensure_demo_model(cache_root: Path | None = None, *, progress: Progress | None = None) -> Path:
    """Path of the demo model folder, building it first if it is missing or incomplete."""
    path = demo_model_dir(cache_root)
    if is_complete_model_dir(path):
        return path
    try:
        # Replace only a folder that is already there but incomplete; a missing
        # one is created without overwrite so a concurrent builder's finished
        # folder is never replaced under a process that is reading it.
        return make_model(DEMO_ARCH, DEMO_SIZE, path, overwrite=path.exists(), progress=progress)
    except InvalidRequestError:
        if is_complete_model_dir(path):  # another process published it first
            return path
        raise
