"""The remote tier: a Redis or Valkey shared by several servers (docs/deployment.md).

Modules, in the order a request meets them: `tier` (`RemoteTier`: the Tier
protocol and `ChainLookup`), `records` (key names, the metadata record of an
entry), `link` (the connection: up, or down with a reconnect loop; faults
as misses), `writer` (stores and deletions behind the request path),
`address` (the URL, checked, shown without its password).

Entries are tiers/blob.py's bytes, the disk tier's file format. Torch-free;
redis-py is imported only where a remote tier is configured.
"""
