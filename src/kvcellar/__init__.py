"""kvcellar: a local LLM server and library with a tiered, persistent prefix KV cache.

Three lines for a library caller:

    from kvcellar import Engine
    engine = Engine.load("path/to/hf-model-folder")
    print(engine.generate("Once upon a time", max_tokens=32).text)

A chat that reuses the cache turn after turn: `ChatSession(engine).chat("...")`.

Packages, bottom up: `config` / `checks` / `errors` (modules), `cache`
(torch-free core: hashing, match, eviction, the tier protocol, stats),
`tiers` (every medium: memory, disk), `kv` (tensor capture/restore, the
engine's adapter), `engine` (model, prefill, decode), `server` and `session`,
`bench`, `cli`; `models` (offline model folders, GGUF).
"""

from kvcellar.config import CacheConfig, EngineConfig

__version__ = "0.1.0"
__all__ = ["CacheConfig", "ChatSession", "Engine", "EngineConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Import torch-heavy modules lazily so `import kvcellar.cache` stays torch-free and fast.
    if name in ("Engine", "SamplingParams"):
        from kvcellar import engine

        return getattr(engine, name)
    if name == "ChatSession":
        from kvcellar.session import ChatSession

        return ChatSession
    raise AttributeError(name)
