"""Tensor side of the prefix cache: how a transformers cache maps onto entries.

Operations: `inspect_layout` (which layer kinds a model has, and whether its
cache can be restored at all), `capture_entry` (the state of a token range as
a flat dict of tensors), `build_cache` (a transformers `DynamicCache` at
position p from a chain of captured entries), `restored_spans` (which
entries a restored cache's K/V were copied from). The cache core (`kvcellar.cache`)
never sees a tensor; it stores these payloads as opaque objects.
"""

from kvcellar.kv.layout import LayerSpec, ModelLayout, inspect_layout
from kvcellar.kv.state import RestoredSpan, StatePayload, build_cache, capture_entry, restored_spans

__all__ = ["LayerSpec", "ModelLayout", "RestoredSpan", "StatePayload", "build_cache", "capture_entry", "inspect_layout",
           "restored_spans"]
