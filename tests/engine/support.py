"""Helpers the engine tests share."""

from __future__ import annotations

from kvcellar.engine import runner


def cancel_during_pass(monkeypatch, streams: list, number: int = 1) -> list[tuple[int, int]]:
    """Cancel `streams[0]` while the runner runs its `number`th prefill pass (the scheduler sees it at its next
    step); returns the (start, end) of every pass run, filled as they run. Isolates the cancel's timing."""
    passes: list[tuple[int, int]] = []
    run_chunk = runner.run_chunk

    def counting(model, cache, token_ids, start, end):
        passes.append((start, end))
        if len(passes) == number:
            streams[0].cancel()
        return run_chunk(model, cache, token_ids, start, end)

    monkeypatch.setattr(runner, "run_chunk", counting)
    return passes
