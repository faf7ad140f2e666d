"""A suite phase in a fresh Python process: its memory peaks and thread pools are its own.

Operations: `run_in_fresh_process(phase, spec) -> dict` (parent: runs
`phase(spec)` in a child and returns the dict it returned), `main(argv)` (the
child: `MODULE:FUNCTION SPEC.json OUT.json PARENT_PID`).

The child is reaped whatever happens to the parent (`children.run_child`,
`children.end_with_parent`); its printed lines pass through to the parent's
stdout. Only functions of `kvcellar.bench.suites` modules can be named.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvcellar.bench.children import child_env, end_with_parent, run_child

_PACKAGE = "kvcellar.bench.suites."
_CHILD = "import sys; from kvcellar.bench.suites.fresh_process import main; sys.exit(main(sys.argv[1:]))"


def run_in_fresh_process(phase: Callable[[dict], dict], spec: dict) -> dict:
    """`phase(spec)` in a new interpreter; RuntimeError if it fails (its traceback is on stderr)."""
    name = f"{phase.__module__}:{phase.__qualname__}"
    if not phase.__module__.startswith(_PACKAGE):
        raise ValueError(f"{name} is not a suite phase (a function of a {_PACKAGE}* module)")
    with tempfile.TemporaryDirectory(prefix="kvcellar-suite-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "phase.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-c", _CHILD, name, str(spec_path), str(out_path), str(os.getpid())]
        code = run_child(command, child_env(), lambda line: print(line, flush=True))
        if code != 0 or not out_path.exists():
            raise RuntimeError(f"the phase {name} failed in its process (exit code {code}; its error is above)")
        return json.loads(out_path.read_text())


def main(argv: list[str]) -> int:
    name, spec_path, out_path, parent_pid = argv
    end_with_parent(int(parent_pid))
    module, function = name.split(":")
    if not module.startswith(_PACKAGE):
        raise ValueError(f"{name} is not a suite phase")
    phase = getattr(importlib.import_module(module), function)
    Path(out_path).write_text(json.dumps(phase(json.loads(Path(spec_path).read_text()))))
    return 0
