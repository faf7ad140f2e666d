"""`kvcellar cluster`: N servers of one model sharing one Redis/Valkey, behind vllm-router, on this machine.

Operations: `ClusterConfig`, `start_cluster(config, processes) -> Cluster`
(the URLs, once everything answers), `run_cluster(config)` (start, print
where to connect, wait for Ctrl-C or SIGTERM, stop everything),
`add_cluster_command(commands)` (the command-line options).

The router is vllm-router from PyPI with the `cache_aware` policy: it keeps
a radix tree of the text each server was sent, so a conversation's next turn
goes to the server that served its previous one (its blocks are in that
server's memory: no network at all), and, as started here
(processes.ROUTER_BALANCE), to the least loaded server whenever loads
differ. The shared tier covers what routing cannot: a new or restarted
server, a conversation moved for balance, a system prompt or document
another server computed first. `round_robin` is available for comparison.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from kvcellar.cluster.processes import Processes, free_port

POLICIES = ("cache_aware", "round_robin", "consistent_hash", "power_of_two", "random")


@dataclass(frozen=True)
class ClusterConfig:
    """`remote_cache` None: a redis-server is started (`redis_maxmemory`, allkeys-lru); "": no shared tier."""

    model: str
    replicas: int = 2
    host: str = "127.0.0.1"
    port: int = 8000  # the router's; servers take the next ports (free ones when those are taken)
    remote_cache: str | None = None
    redis_maxmemory: str = "4gb"
    policy: str = "cache_aware"
    threads_per_server: int | None = None
    server_args: tuple[str, ...] = ()
    folder: str | None = None  # logs and the Redis data folder (default: a new temp folder)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1 (got {self.replicas})")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)} (got {self.policy!r})")


@dataclass
class Cluster:
    router_url: str
    server_urls: list[str]
    remote_cache: str | None


def start_cluster(config: ClusterConfig, processes: Processes) -> Cluster:
    """Start Redis (unless given), the servers and the router, each awaited; the caller stops `processes`."""
    remote = config.remote_cache
    if remote is None:
        remote = processes.redis(free_port(config.host), config.redis_maxmemory)
    args = ["--remote-cache", remote] if remote else []
    if config.threads_per_server is not None:
        args += ["--threads", str(config.threads_per_server)]
    servers = []
    for index in range(config.replicas):
        port = free_port(config.host)
        servers.append(processes.server(f"server-{index}", port, config.model, [*args, *config.server_args]))
    router = processes.router(config.port, servers, config.policy)
    return Cluster(router, servers, remote or None)


def run_cluster(config: ClusterConfig) -> int:
    folder = Path(config.folder or tempfile.mkdtemp(prefix="kvcellar-cluster-"))
    processes = Processes(folder, config.host)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    try:
        cluster = start_cluster(config, processes)
        print(f"router ({config.policy}): {cluster.router_url}/v1", flush=True)
        for url in cluster.server_urls:
            print(f"server: {url} (dashboard {url}/)", flush=True)
        print(f"shared tier: {cluster.remote_cache or 'none'}; logs in {folder}; Ctrl-C stops everything", flush=True)
        while not stop.wait(1.0):
            exited = processes.exited()
            if exited:
                print(f"{', '.join(exited)} exited; stopping the rest (logs in {folder})", flush=True)
                return 1
        return 0
    finally:
        print("stopping: servers drain their queued writes first", flush=True)
        processes.stop()


def _cmd_cluster(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        from kvcellar.models import ensure_demo_model

        model = str(ensure_demo_model())
    return run_cluster(ClusterConfig(
        model=model, replicas=args.replicas, host=args.host, port=args.port, remote_cache=args.remote_cache,
        redis_maxmemory=args.redis_maxmemory, policy=args.policy, threads_per_server=args.threads,
        server_args=tuple(args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args), folder=args.folder,
    ))  # fmt: skip


def add_cluster_command(commands) -> None:
    defaults = ClusterConfig(model="")
    cluster = commands.add_parser(
        "cluster", help="several servers sharing one Redis behind a cache-aware router (vllm-router), on this machine",
        description="Start a redis-server (or use --remote-cache), N `kvcellar serve` processes sharing it, and "
                    "vllm-router in front; Ctrl-C stops them all. Options after -- go to every server.",
    )  # fmt: skip
    cluster.add_argument("--model", help="model folder or .gguf file (default: the demo model)")
    cluster.add_argument("--replicas", type=int, default=defaults.replicas, help=f"servers (default {defaults.replicas})")
    cluster.add_argument("--host", default=defaults.host, help=f"address everything binds (default {defaults.host})")
    cluster.add_argument("--port", type=int, default=defaults.port, help=f"the router's port (default {defaults.port})")
    cluster.add_argument("--remote-cache", help="a running Redis/Valkey to share (default: start a redis-server; "
                                                "'' for no shared tier)")  # fmt: skip
    cluster.add_argument("--redis-maxmemory", default=defaults.redis_maxmemory,
                         help=f"maxmemory of the redis-server started (default {defaults.redis_maxmemory})")
    cluster.add_argument("--policy", choices=POLICIES, default=defaults.policy,
                         help=f"vllm-router's policy (default {defaults.policy}: conversations stay where they are warm)")
    cluster.add_argument("--threads", type=int, help="CPU threads per server (default: the server's own choice)")
    cluster.add_argument("--folder", help="logs and Redis data (default: a new temp folder)")
    cluster.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then options for every `kvcellar serve`")
    cluster.set_defaults(handler=_cmd_cluster)
