"""The baseline a transformers user writes by hand: keep prefilled caches, deepcopy one, run the suffix.

Operations: `HandWrittenTarget.send` (the `Sample` protocol of targets.py),
`cache_bytes(cache)`.

What it does, per the transformers docs ("re-use a prompt cache"): after
each request the prefilled `DynamicCache` is kept, keyed by its token ids;
a new prompt takes the kept cache with the longest common prefix, deep-copies
it (so the kept one stays valid), crops it to that prefix (leaving at least
one token to run, which yields the logits), and calls `model(...)` once on
the rest: one unchunked forward, no blocks, no tiers. Kept caches are
evicted least recently used past `budget_bytes` (the newest always stays).
A cache that cannot be cropped (sliding-window or recurrent layers) is only
reused when it is a strict prefix of the prompt.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import numpy as np
import torch

from kvcellar.bench.scenarios import BenchRequest
from kvcellar.bench.targets import Sample
from kvcellar.engine.prefill import cache_argument


def cache_bytes(cache: object) -> int:
    """Bytes of the tensors a DynamicCache holds (keys / values of its layers)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    equal = a[:m] == b[:m]
    return m if equal.all() else int(np.argmin(equal))


class HandWrittenTarget:
    """Owns the model (no engine): every call runs on the caller's thread."""

    def __init__(self, loaded: object, max_tokens: int, budget_bytes: int) -> None:
        self._model = loaded.model
        self._device = loaded.device
        self._max_tokens = max_tokens
        self._budget_bytes = budget_bytes
        # (salt, token ids) -> (ids as an array, the prefilled cache, its bytes); least recently used first
        self._kept: OrderedDict[tuple, tuple[np.ndarray, object, int]] = OrderedDict()

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _best(self, ids: np.ndarray, salt: str) -> tuple[tuple | None, int]:
        best, best_len = None, 0
        for key, (kept_ids, _, _) in self._kept.items():
            if key[0] != salt:
                continue
            n = min(_common_prefix(ids, kept_ids), len(ids) - 1)
            if n > best_len:
                best, best_len = key, n
        return best, best_len

    def _restore(self, key: tuple | None, n: int) -> tuple[object, int]:
        from transformers import DynamicCache

        if key is not None:
            self._kept.move_to_end(key)
            cache = copy.deepcopy(self._kept[key][1])
            surplus = cache.get_seq_length() - n
            try:
                if surplus > 0:
                    cache.crop(-surplus)
                return cache, n
            except (RuntimeError, ValueError, NotImplementedError, AttributeError):
                pass  # not croppable: fall through to a cold prefill
        return DynamicCache(config=self._model.config), 0

    @torch.inference_mode()
    def send(self, request: BenchRequest, salt: str) -> Sample:
        ids = np.asarray(request.ids, dtype=np.int64)
        self._sync()
        started = time.perf_counter()
        key, n = self._best(ids, salt)
        looked_up = time.perf_counter()
        cache, n = self._restore(key, n)
        self._sync()
        restored = time.perf_counter()
        suffix = torch.tensor([request.ids[n:]], device=self._device)
        out = self._model(input_ids=suffix, **cache_argument(self._model, cache), use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())  # .item() waits for the GPU
        ttft = time.perf_counter()
        self._keep((salt, request.ids), ids, cache)
        if self._max_tokens > 1:
            self._decode(copy.deepcopy(cache), token)
        total = time.perf_counter()
        return Sample(request.label, request.kind, len(ids), n, ttft - started, total - started,
                      looked_up - started, restored - looked_up, ttft - restored, len(ids) - n,
                      {"hf-deepcopy": n} if n else {})  # fmt: skip

    def _decode(self, cache: object, token: int) -> None:
        for _ in range(self._max_tokens - 1):
            out = self._model(input_ids=torch.tensor([[token]], device=self._device), **cache_argument(self._model, cache),
                              use_cache=True)
            token = int(out.logits[0, -1].argmax())

    def _keep(self, key: tuple, ids: np.ndarray, cache: object) -> None:
        self._kept[key] = (ids, cache, cache_bytes(cache))
        self._kept.move_to_end(key)
        while len(self._kept) > 1 and sum(entry[2] for entry in self._kept.values()) > self._budget_bytes:
            self._kept.popitem(last=False)

    def close(self) -> None:
        self._kept.clear()
