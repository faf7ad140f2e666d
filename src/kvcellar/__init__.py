"""kvcellar: a local LLM server and library with a tiered, persistent prefix KV cache.

Three lines for a library caller:

    from kvcellar import Engine
    engine = Engine.load("path/to/hf-model-folder")
    print(engine.generate("Once upon a time", max_tokens=32).text)

Packages: `cache` (torch-free core: hashing, index, eviction, tiers),
`kv` (tensor capture/restore), `engine` (model, prefill, decode),
`models` (offline random-weight model folders), `cli`.
"""

from kvcellar.config import CacheConfig, EngineConfig

__version__ = "0.1.0"
__all__ = ["CacheConfig", "Engine", "EngineConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Import torch-heavy modules lazily so `import kvcellar.cache` stays torch-free and fast.
    if name in ("Engine", "SamplingParams"):
        from kvcellar import engine

        return getattr(engine, name)
    raise AttributeError(name)
