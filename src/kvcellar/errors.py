"""Exceptions a kvcellar user can see. Each message says what is wrong and what to do."""


class KvcellarError(Exception):
    """Base class of every error kvcellar raises on purpose."""


class ModelLoadError(KvcellarError):
    """A model folder is missing, incomplete, or not a causal language model."""


class InvalidRequestError(KvcellarError, ValueError):
    """A request's inputs are invalid (prompt too long, bad sampling parameters, ...).

    `code` names the rule broken (the HTTP server's error code); `field` the input it concerns
    ("prompt": the prompt, whichever form it came in; "max_tokens"; None: unspecified).
    """

    def __init__(self, message: str, *, code: str = "invalid_request", field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class UnknownTierError(KvcellarError, ValueError):
    """A cache tier was named that this cache does not have (`cache.tier.check_known_tier`)."""
