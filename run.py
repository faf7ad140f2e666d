#!/usr/bin/env python3
"""Quickstart for a fresh machine that has only python3.

    python3 run.py serve   # set up, fetch the demo model once (SmolLM2-135M-Instruct), serve it on http://127.0.0.1:8000
    python3 run.py test    # set up, run the test suite

Also: `python3 run.py demo` streams one answer from the demo model in the terminal.
Set-up is idempotent: a virtual environment in .venv, torch (the pinned build
below), then kvcellar itself in editable mode with its test extras. A stamp
file skips the install when nothing changed. Extra arguments after the
command go to `kvcellar serve`, `kvcellar generate` or pytest, which then
replaces this process (exec): signals reach it directly, nothing is orphaned.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# The CPU build of this version is on local disk in our dev/CI machines; elsewhere pip fetches it.
TORCH_SPEC = os.environ.get("KVCELLAR_TORCH_SPEC", "torch==2.13.0")


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _setup() -> None:
    stamp = VENV / ".kvcellar-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH_SPEC.encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted and _python().exists():
        return
    if not _python().exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(f"installing {TORCH_SPEC} (first run only)", flush=True)
    subprocess.run(pip + [TORCH_SPEC], check=True)
    print("installing kvcellar and its test tools", flush=True)
    subprocess.run(pip + ["-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(wanted)


def _become(command: list[str]) -> int:
    """Replace this process by `command` (run from the checkout), so a signal to it reaches the real program.

    With a child instead, SIGTERM to `run.py` would end only the wrapper and leave the server running,
    holding its port. Windows has no exec that keeps the process: there the child is waited for.
    """
    os.chdir(ROOT)
    if os.name == "nt":  # pragma: no cover
        return subprocess.call(command)
    os.execv(command[0], command)
    raise AssertionError("unreachable: execv returns only by raising")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "demo", "test"):
        print(__doc__)
        return 2
    _setup()
    command, rest = argv[0], argv[1:]
    python = str(_python())
    if command == "test":
        return _become([python, "-m", "pytest", "-q", *rest])
    if command == "serve":
        return _become([python, "-m", "kvcellar.cli", "serve", *rest])
    prompt = ["--prompt", "Explain what a prefix cache does."] if "--prompt" not in rest else []
    return _become([python, "-m", "kvcellar.cli", "generate", "--chat", *prompt, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
