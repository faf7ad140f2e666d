"""KV-cache events for routers and schedulers outside the process, in vLLM's KV-event format.

Modules: `format` (the events and their msgpack encoding, as vLLM's
`KVEventBatch` reads), `publisher` (`EventPublisher`: a ZMQ PUB socket fed
by a thread, never blocking the cache), `observer` (`KVEventObserver`: the
cache's stores, evictions and clears as events).

Torch-free; pyzmq is imported only where an endpoint is configured.
"""
