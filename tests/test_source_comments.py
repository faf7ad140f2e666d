"""No comment or docstring under src/ quotes a run's timing: figures live in docs/benchmarks.md.

A comment states the invariant or the reason a figure supported; the figure
itself, with its command and machine, is on the benchmarks page, where it is
kept current. What is flagged, in comments and docstrings only (code and
help strings are not read):
- a duration or a rate: a number followed by ms, s, seconds, minutes,
  tok/s, MB/s or GB/s ("took 3.0 s", "54 ms", "9 GB/s");
- a run's machine or history: "measured on", a GPU or CPU model name, a date.
`ALLOWED` lists the phrases that are configuration (a limit or a default the
code enforces), not a measurement, with the file they are in.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kvcellar"

NUMBER = r"(?<![\w.])\d+(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?"
# A bare "s" needs a space before it, so that "500s" (HTTP statuses) is not read as seconds.
DURATION = re.compile(NUMBER + r"(?:\s*(?:ms|sec|seconds?|min|minutes?|tok/s|tokens/s|[KMG]B/s|[KMG]iB/s)|\s+s)(?![\w/])")
HISTORY = re.compile(r"\b(?:[Mm]easured on|H100|H200|A100|EPYC|Xeon|Sapphire Rapids|20\d\d-\d\d-\d\d|[Aa] first attempt)\b")

# (file relative to src/kvcellar, phrase): configuration limits and defaults named in a comment, not measurements.
ALLOWED = {
    ("server/__init__.py", "15 minute"): "the windows of the rates the server reports",
    ("server/cache_routes.py", "15 minutes"): "the same windows",
    ("server/rates.py", "15 minutes"): "the same windows",
    ("server/stats.py", "15 minute"): "the same windows",
}


def comment_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring in a module."""
    source = path.read_text()
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]  # fmt: skip
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                first = node.body[0].lineno
                out += [(first + i, line) for i, line in enumerate(doc.splitlines())]
    return out


def offences(path: Path) -> list[str]:
    relative = path.relative_to(SRC).as_posix()
    found = []
    for line, text in comment_texts(path):
        for match in [*DURATION.finditer(text), *HISTORY.finditer(text)]:
            if (relative, match.group(0)) not in ALLOWED:
                found.append(f"{relative}:{line}: {match.group(0)!r} in {text.strip()!r}")
    return found


def test_no_comment_quotes_a_measured_duration():
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in offences(path)]
    assert found == [], "comments and docstrings quote run figures; move them to docs/benchmarks.md:\n" + "\n".join(found)


def test_the_scanner_flags_timings_and_not_limits(tmp_path, monkeypatch):
    module = tmp_path / "kvcellar" / "example.py"
    module.parent.mkdir()
    module.write_text('"""Loads took 3.0-5.7 s on an H100; decode 26.5 tok/s."""\n\n'
                      'LIMIT_S = 30  # holds a file back up to 30 s\n'
                      'x = "5 s in code is not read"  # 54 ms measured\n')  # fmt: skip
    monkeypatch.setattr(__import__(__name__), "SRC", module.parent)
    monkeypatch.setitem(ALLOWED, ("example.py", "30 s"), "a limit")
    hits = offences(module)
    assert [hit.split(": ", 1)[1].split(" in ")[0] for hit in hits] == ["'54 ms'", "'3.0-5.7 s'", "'26.5 tok/s'", "'H100'"]
