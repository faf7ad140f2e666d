"""The run's progress without a terminal: one line per scenario row, counting every request of the run."""

from __future__ import annotations

from kvcellar.bench.progress import RunProgress


def test_without_a_terminal_each_row_is_a_line_with_its_place_in_the_run(capsys):
    progress = RunProgress({"no-cache": 3, "kvcellar": 2})
    progress.phase("no-cache")
    for label in ("cold@1K", "cold@1K", "exact@1K"):
        progress.sample({"label": label, "ttft_s": 0.5, "num_cached_tokens": 0})
    progress.finish_phase("no-cache", 3)
    progress.phase("kvcellar")
    progress.finish_phase("kvcellar", 0)  # skipped: its share counts as done
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["  no-cache: cold@1K (request 1 of 5)", "  no-cache: exact@1K (request 3 of 5)"]
