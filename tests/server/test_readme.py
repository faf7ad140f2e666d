"""The README's Python snippets run as written.

Snippets that talk to `127.0.0.1:8000` run against a real `kvcellar serve` there (when port 8000
is taken, against one on a free port: only the port in the snippet's text is changed); every
other snippet runs, in the README's order, in one fresh interpreter (later ones use earlier ones'
names), with KVCELLAR_MODEL set to the tiny test model, as the README's comment offers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .support import SRC, ServerProcess, free_port, port_is_free

README = Path(__file__).resolve().parents[2] / "README.md"
README_PORT = 8000
RUN_TIMEOUT_S = 300.0  # bounds a hang only


def python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)


def _is_server_snippet(code: str) -> bool:
    return f"127.0.0.1:{README_PORT}" in code


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env,
                          cwd=cwd)  # fmt: skip


def _owns_its_port(server: ServerProcess) -> bool:
    """Whether this process itself listens (uvicorn logs it once bound), not another server on that port."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if "Uvicorn running on" in server.log_text():
            return True
        if server.process.poll() is not None:
            return False
        time.sleep(0.1)
    raise AssertionError(f"the server neither bound its port nor exited:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def readme_server(tiny_model_dirs, tmp_path_factory):
    """`kvcellar serve` on 127.0.0.1:8000 when that port is free, else on a free port."""
    logs = tmp_path_factory.mktemp("readme-server")
    server = None
    if port_is_free(README_PORT):
        try:
            server = ServerProcess(tiny_model_dirs["qwen3"], logs / "8000.log", port=README_PORT)
        except RuntimeError:  # taken between the check and the start
            server = None
        if server is not None and not _owns_its_port(server):
            server.stop()
            server = None
    if server is None:
        server = ServerProcess(tiny_model_dirs["qwen3"], logs / "free.log", port=free_port())
    yield server
    server.stop()


def test_the_readme_has_server_and_library_snippets():
    snippets = python_snippets()
    assert any(_is_server_snippet(code) for code in snippets)
    assert any(not _is_server_snippet(code) for code in snippets)


def test_the_server_snippets_run_as_written(readme_server, tmp_path):
    for code in filter(_is_server_snippet, python_snippets()):
        code = code.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{readme_server.port}")
        done = _run(code, {}, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "0\n"  # the snippet's "Hi" was new to this server: no token came from the cache
    records = readme_server.get("/v1/requests/recent").json()["data"]
    assert [(r["endpoint"], r["finish_reason"] in ("stop", "length")) for r in records] == [("chat.completions", True)]


def test_the_library_snippets_run_as_written(tiny_model_dirs, tmp_path):
    code = "\n".join(code for code in python_snippets() if not _is_server_snippet(code))
    done = _run(code, {"KVCELLAR_MODEL": str(tiny_model_dirs["qwen3"]), "KVCELLAR_HOME": str(tmp_path / "home")}, tmp_path)
    assert done.returncode == 0, done.stderr
    cached = re.search(r"^(\d+) of (\d+) prompt tokens came from the cache\nTrue$", done.stdout, re.MULTILINE)
    assert cached, done.stdout  # and the regenerated answer's prompt came whole from the cache
    num_cached, num_prompt = int(cached.group(1)), int(cached.group(2))
    assert num_cached <= num_prompt and (num_prompt >= 256 or num_cached == 0)  # whole 256-token blocks only (CPU)
    assert not (tmp_path / "home" / "models").exists()  # the env var was used: no demo model was built
