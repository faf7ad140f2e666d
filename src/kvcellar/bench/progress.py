"""The bench's progress: one bar over every measured request of the run, with its ETA.

Operations: `RunProgress(phase_sizes)` with `.phase(mode)`, `.sample(sample)`,
`.finish_phase(mode, num_done)`, `.close()`; `log(message)` (one timestamped
line on stderr, the bench's and the suites' running commentary).

Phase processes report each request (phases.PROGRESS_PREFIX lines), so the
one bar lives in the parent. Without a terminal (a log file, CI) tqdm draws
nothing and a line per scenario row is printed instead.
"""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class RunProgress:
    def __init__(self, phase_sizes: dict[str, int]) -> None:
        from tqdm import tqdm

        self._sizes = phase_sizes
        self._bar = tqdm(total=sum(phase_sizes.values()), unit="req", file=sys.stderr, disable=None,
                         dynamic_ncols=True)  # fmt: skip
        self._mode = ""
        self._label: str | None = None
        self._num_done = 0  # tqdm counts nothing while disabled (no terminal)

    def phase(self, mode: str) -> None:
        self._mode, self._label = mode, None
        self._bar.set_description_str(f"{mode:>13}")

    def sample(self, sample: dict) -> None:
        self._num_done += 1
        self._bar.update(1)
        if self._bar.disable:
            if sample.get("label") != self._label:
                self._label = sample.get("label")
                print(f"  {self._mode}: {self._label} (request {self._num_done} of {self._bar.total})", file=sys.stderr,
                      flush=True)  # fmt: skip
            return
        ttft = sample.get("ttft_s")
        self._bar.set_postfix_str(f"{sample.get('label')} ttft {ttft:.3f}s cached {sample.get('num_cached_tokens')}"
                                  if ttft is not None else str(sample.get("label")))  # fmt: skip

    def finish_phase(self, mode: str, num_done: int) -> None:
        """A phase ended (or was skipped) having sent `num_done` requests: the rest of its share is done too."""
        left = self._sizes.get(mode, 0) - num_done
        if left > 0:
            self._num_done += left
            self._bar.update(left)

    def close(self) -> None:
        self._bar.close()
