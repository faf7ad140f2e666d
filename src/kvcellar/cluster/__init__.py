"""Several kvcellar servers on one machine sharing one Redis/Valkey, behind a cache-aware router.

Modules: `processes` (start and stop the parts: redis-server, `kvcellar
serve`, vllm-router; wait until each answers), `launch` (`ClusterConfig`,
`run_cluster`: what `kvcellar cluster` starts, and stops on Ctrl-C).
docs/deployment.md describes the same deployment across machines.
"""
