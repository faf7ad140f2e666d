"""docs/agents.md's Python snippets run as written, in order in one interpreter, against a served test model
(only the port in their text is changed): a tool loop with the `openai` client whose later steps come from
the cache, then the same with `anthropic`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .support import SRC

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def test_the_agent_guide_runs_against_the_server(server, tmp_path):
    snippets = re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(), re.MULTILINE | re.DOTALL)
    assert len(snippets) == 2
    code = "\n".join(snippets).replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    code = code.replace('api_key="unused"', f'api_key="{server.admin_key or "unused"}"')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    steps = [(int(a), int(b)) for a, b in re.findall(r"^step \d+: (\d+) prompt tokens, (\d+) from the cache$",
                                                     done.stdout, re.MULTILINE)]  # fmt: skip
    assert len(steps) >= 2 and steps[0][1] == 0  # the first step is new to the server...
    assert steps[1][1] >= steps[0][0] // 16 * 16 > 0  # ...the second reuses it, whole blocks of 16
    read = re.search(r"^(\d+) prompt tokens read from the cache$", done.stdout, re.MULTILINE)
    assert read and int(read.group(1)) > 0, done.stdout
