"""Where the shared tier lives: a Redis or Valkey URL, checked once, shown without its password.

Operations: `RemoteAddress.parse(url)`, `.display` (for logs, errors and
/health), `.client(timeout_s)` (a redis-py client that never retries:
a fault is a miss, decided by the caller, never a wait).

Accepted: `redis://[user:password@]host:port[/db]`, `rediss://` (TLS) and
`unix:///path/to/socket[?db=N]`, the forms redis-py's `from_url` reads;
valkey-server speaks the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RemoteAddress:
    url: str

    @classmethod
    def parse(cls, url: str) -> RemoteAddress:
        """ValueError naming the accepted forms unless `url` is one of them."""
        if not isinstance(url, str) or not url.strip():
            raise ValueError("the remote cache needs a URL such as redis://127.0.0.1:6379/0")
        parts = urlsplit(url.strip())
        if parts.scheme not in SCHEMES:
            raise ValueError(
                f"remote cache URL {cls(url).display!r} must start with redis://, rediss:// or unix:// "
                "(e.g. redis://127.0.0.1:6379/0, rediss://user:pass@host:6380/0, unix:///run/redis.sock?db=0)"
            )
        if parts.scheme == "unix" and not parts.path:
            raise ValueError(f"remote cache URL {cls(url).display!r} names no socket path (unix:///path/to/redis.sock)")
        if parts.scheme != "unix":
            if not parts.hostname:
                raise ValueError(f"remote cache URL {cls(url).display!r} names no host")
            try:
                parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
            except ValueError:
                raise ValueError(f"remote cache URL {cls(url).display!r} has an invalid port") from None
            db = parts.path.strip("/")
            if db and not db.isdigit():
                raise ValueError(f"remote cache URL {cls(url).display!r}: the path must be a database number (/0)")
        return cls(url.strip())

    @property
    def display(self) -> str:
        """The URL with any password replaced by ***."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def client(self, timeout_s: float):
        """A redis-py client whose every command gives up after `timeout_s` and is never retried."""
        import redis  # the remote tier's one dependency, imported only where one is configured
        from redis.retry import Retry
        from redis.backoff import NoBackoff

        return redis.Redis.from_url(
            self.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )  # fmt: skip
