"""Which cache layer kinds a model has, read from the transformers cache it builds.

A layer holds per-token K/V (full or sliding-window attention), a recurrent
state (linear attention, SSM, conv), both (hybrid layers), or nothing. A
prefix of length p is restorable only if every layer can produce its state at
p; `ModelLayout.capabilities` turns the kinds into the rules the torch-free
cache core applies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

from kvcellar.cache import LayoutCapabilities

log = logging.getLogger(__name__)

# Layout of the payload tensors; part of the namespace, so a change here never reads old entries.
LAYOUT_VERSION = 1

# transformers 5.x gets these caches wrong after a restore (TRANSFORMERS_NOTES.md): Jamba's multi-token
# scan ignores the cached SSM state; Bamba's step and chunked paths disagree even in fp64.
_UNCACHEABLE_MODEL_TYPES = {"jamba": "its multi-token scan ignores a restored SSM state", "bamba": "its step and chunked paths disagree"}
_warned: set[str] = set()
_KNOWN_LAYER_CLASSES = {
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "LinearAttentionLayer",
    "LinearAttentionAndFullAttentionLayer",
    "LinearAttentionAndSlidingWindowAttentionLayer",
    "DummyLayer",
}


@dataclass(frozen=True)
class LayerSpec:
    has_kv: bool
    sliding_window: int | None  # tokens; the layer keeps the last sliding_window - 1 of them
    num_recurrent_states: int  # 0 for attention-only layers


@dataclass(frozen=True)
class ModelLayout:
    layers: tuple[LayerSpec, ...]
    uncacheable_reason: str | None = None

    @property
    def is_cacheable(self) -> bool:
        return self.uncacheable_reason is None

    @property
    def has_recurrent(self) -> bool:
        return any(layer.num_recurrent_states for layer in self.layers)

    @property
    def smallest_window(self) -> int | None:
        windows = [layer.sliding_window for layer in self.layers if layer.sliding_window is not None]
        return min(windows) if windows else None

    @property
    def only_full_attention(self) -> bool:
        """Every layer keeps K/V per token: a pass may end anywhere and its blocks be sliced out of it."""
        return self.is_cacheable and not self.has_recurrent and self.smallest_window is None

    def capabilities(self, block_size: int) -> LayoutCapabilities:
        return LayoutCapabilities(block_size=block_size, has_recurrent=self.has_recurrent, sliding_window=self.smallest_window)

    def describe(self) -> str:
        kinds = []
        for layer in self.layers:
            kind = "sliding" if layer.sliding_window else ("attention" if layer.has_kv else "")
            if layer.num_recurrent_states:
                kind = f"{kind}+recurrent" if kind else "recurrent"
            kinds.append(kind or "none")
        return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))


def _layer_spec(layer: object) -> LayerSpec | None:
    """Spec of one transformers cache layer, or None for a class we do not know how to restore.

    Exact class names, not isinstance: a subclass (quantized, static, offloaded)
    stores its state differently and must not be mistaken for its parent.
    """
    name = type(layer).__name__
    if name not in _KNOWN_LAYER_CLASSES:
        return None
    recurrent = layer.number_of_states if isinstance(layer, LinearAttentionCacheLayerMixin) else 0
    window = int(layer.sliding_window) if isinstance(layer, DynamicSlidingWindowLayer) else None
    return LayerSpec(has_kv=isinstance(layer, DynamicLayer), sliding_window=window, num_recurrent_states=recurrent)


def inspect_layout(config: object) -> ModelLayout:
    """Read the layer kinds from the cache transformers builds for `config` (the model's own rules)."""
    model_type = getattr(config, "model_type", "")
    if model_type in _UNCACHEABLE_MODEL_TYPES:
        return _uncacheable(model_type, f"{model_type}: {_UNCACHEABLE_MODEL_TYPES[model_type]} in transformers")
    cache = DynamicCache(config=config)
    specs = []
    for index, layer in enumerate(cache.layers):
        spec = _layer_spec(layer)
        if spec is None:
            return _uncacheable(model_type, f"layer {index} uses {type(layer).__name__}, which kvcellar cannot restore")
        specs.append(spec)
    if not specs or not any(spec.has_kv or spec.num_recurrent_states for spec in specs):
        return _uncacheable(model_type, "the model's cache has no layers kvcellar recognises")
    return ModelLayout(tuple(specs))


def _uncacheable(model_type: str, reason: str) -> ModelLayout:
    if model_type not in _warned:  # one warning per process and model type, not per request
        _warned.add(model_type)
        log.warning("prefix cache disabled for this model: %s", reason)
    return ModelLayout((), uncacheable_reason=reason)
