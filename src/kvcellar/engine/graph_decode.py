"""Decode steps replayed from CUDA graphs.

An eager decode step of a large model on a GPU is bound by the CPU: a few
thousand kernel launches from Python (transformers' layers, rotary, norms),
several times the time the GPU needs to read the weights once
(docs/benchmarks.md). A CUDA graph records one step's kernels and replays
them with one launch.

A graph reads and writes fixed addresses and shapes, so:
- the step's token and position live in device tensors that the graph reads
  (`_ids`, `_position`), set before each replay;
- each full-attention layer writes its new K/V at that position in place
  (`GrowingLayer.update` in graph mode) and attends to a fixed number of
  keys, the step's bucket (`rounded_capacity` of the keys it sees), under a
  mask built inside the graph from the position. One graph per bucket, made
  on first use (a capture is about one eager step's time) and kept;
- the graphs read the cache's K/V buffers, so the runner keeps one
  request's buffers for the next on CUDA too (kv/buffer_pool.py); buffers
  rounded to the same buckets hold every step's bucket. When the buffers
  change (a longer request), the graphs are dropped and made again.

Steps the graphs do not cover run eagerly, as before: caches with sliding-window
or recurrent layers, a batch of more than one, a failed capture (one
warning, then eager for the process). Exact mode (opt-in on CUDA) keeps its
promise: whether a step replays a graph, and which, depends only on the
cache's layer kinds and the step's position, the same with and without a
restored prefix.

Operations: `GraphDecoder(model, device)`, `.step(token, cache) -> logits | None`.
"""

from __future__ import annotations

import logging

import torch

from kvcellar.engine import attention
from kvcellar.engine.prefill import cache_argument
from kvcellar.kv.buffer_pool import rounded_capacity
from kvcellar.kv.growing_layer import GrowingLayer

log = logging.getLogger(__name__)


class GraphDecoder:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self._ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> graph, its logits
        self._buffers: tuple[int, ...] = ()  # the K/V buffer addresses the graphs were captured on
        self._pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at once
        self.failed = False
        self.num_captured = 0

    @torch.inference_mode()
    def step(self, token: int, cache: object) -> torch.Tensor | None:
        """Feed `token` at the cache's position and return the next-token logits [vocab]; None: run it eagerly."""
        layers = getattr(cache, "layers", ())
        if self.failed or not layers or not all(type(layer) is GrowingLayer and layer.is_initialized for layer in layers):
            return None
        if layers[0].keys.shape[0] != 1:
            return None
        position = layers[0].length
        bucket = rounded_capacity(position + 1)
        if any(layer.length != position or layer.buffer_tokens() < bucket for layer in layers):
            return None
        buffers = tuple(pointer for layer in layers for pointer in layer.buffer_pointers())
        if buffers != self._buffers:
            self._graphs.clear()
            # A pool whose graphs are all gone is released; capturing into its handle again trips the allocator.
            self._pool = torch.cuda.graph_pool_handle()
            self._buffers = buffers
        self._ids.fill_(token)
        self._position.fill_(position)
        captured = self._graphs.get(bucket)
        if captured is None:
            captured = self._capture(bucket, layers, cache)
            if captured is None:
                return None
            self._graphs[bucket] = captured
        graph, logits = captured
        graph.replay()
        for layer in layers:
            layer.advance(1)
        return logits[0, -1].clone()  # the graph overwrites its output at the next replay

    def _capture(self, bucket: int, layers: list[GrowingLayer], cache: object) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Record this step for `bucket` keys. It also runs once eagerly first (on a side stream, as CUDA graphs
        want), writing the same K/V at the same position as the replay that follows."""
        for layer in layers:
            layer.graph_position, layer.graph_keys = self._position, bucket
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(bucket, cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(bucket, cache)
        except Exception as exc:  # any op the capture refuses: decode eagerly from now on
            self.failed = True
            self._graphs.clear()
            log.warning("capturing a decode step in a CUDA graph failed, decode steps run eagerly (slower): %s",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)  # fmt: skip
            return None
        finally:
            attention.use_graph_mask(None)
            for layer in layers:
                layer.graph_position = None
        self.num_captured += 1
        return graph, logits

    def _forward(self, bucket: int, cache: object) -> torch.Tensor:
        attention.use_graph_mask((torch.arange(bucket, device=self.device) <= self._position).view(1, 1, 1, bucket))
        output = self.model(input_ids=self._ids, position_ids=self._position.view(1, 1), cache_position=self._position,
                            use_cache=True, **cache_argument(self.model, cache))  # fmt: skip
        return output.logits
