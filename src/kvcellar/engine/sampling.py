"""Sampling: per-request sampling parameters and the next-token sampler.

Operations:
- `SamplingParams`: validated, immutable sampling settings of one request
  (`SamplingParams.from_request(**fields)` builds one from loose API fields).
- `Sampler(params).sample(logits) -> int`: pick the next token id.
- `apply_temperature`, `apply_top_k`, `apply_top_p`, `apply_min_p`: the
  filters `Sampler` chains, in that order; each takes and returns 1-D logits
  and masks dropped tokens with -inf. Before them, the request's logit bias
  and penalties (engine/logits.py) shift the scores, greedy requests too.

Every filter keeps the most likely token, so sampling always has a candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from kvcellar.checks import is_int, is_number
from kvcellar.engine.logits import ScoreShaper
from kvcellar.errors import InvalidRequestError

if TYPE_CHECKING:
    from kvcellar.engine.constraint import TokenConstraint

MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 16
# torch.Generator.manual_seed takes an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1
MAX_PENALTY = 2.0  # presence / frequency penalties, as OpenAI bounds them
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # as OpenAI: +-100 bans or forces a token
MAX_TOP_LOGPROBS = 20
# float32 cumulative sums drift by ~1e-7; a token whose preceding mass is
# "exactly" top_p must not be kept or dropped by rounding noise.
_TOP_P_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. `temperature == 0` means greedy.

    `top_k == 0`, `top_p == 1` and `min_p == 0` switch those filters off.
    `stop` may be given as one string or any sequence of strings; it is stored
    as a tuple. Generation ends before the first stop string, which is not
    part of the output.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) scores of prompt and generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its score), sorted by id
    stop_token_ids: tuple[int, ...] = ()  # ending generation as the model's end-of-sequence ids do
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) the answer must follow (engine/constraint.py)

    def __post_init__(self) -> None:
        self._normalize_stop()
        self._check_counts()
        self._check_probabilities()
        self._check_shaping()
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(
                f"ignore_eos must be true or false (got {self.ignore_eos!r})"
            )

    def _normalize_stop(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif stop is None:
            stop = ()
        try:
            stop = tuple(stop)
        except TypeError:
            raise InvalidRequestError(
                f"stop must be a string or a list of strings (got {self.stop!r})"
            ) from None
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop may hold at most {MAX_STOP_STRINGS} strings (got {len(stop)}); "
                "drop some stop strings"
            )
        for item in stop:
            if not isinstance(item, str) or not item:
                raise InvalidRequestError(
                    f"stop strings must be non-empty strings (got {item!r}); "
                    "remove empty or non-string entries"
                )
        # Frozen dataclass: the only way to store the normalized value.
        object.__setattr__(self, "stop", stop)

    def _check_counts(self) -> None:
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})"
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be an integer >= 0, 0 switches it off (got {self.top_k!r})"
            )
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer in [0, 2**64 - 1] or null (got {self.seed!r})"
            )

    def _check_probabilities(self) -> None:
        # Written as `not (lo <= x <= hi)` so NaN is rejected too.
        t = self.temperature
        if not is_number(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise InvalidRequestError(
                f"temperature must be in [0, {MAX_TEMPERATURE}], 0 means greedy (got {t!r})"
            )
        if not is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(
                f"top_p must be in (0, 1], 1 switches it off (got {self.top_p!r})"
            )
        if not is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(
                f"min_p must be in [0, 1], 0 switches it off (got {self.min_p!r})"
            )

    def _check_shaping(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequestError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], 0 switches it off "
                                          f"(got {value!r})")  # fmt: skip
        value = self.repetition_penalty
        if not is_number(value) or not 0.0 < value <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], 1 switches it off "
                                      f"(got {value!r})")  # fmt: skip
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        cleaned = {}
        for token, shift in bias:
            token = int(token) if isinstance(token, str) and token.isdigit() else token
            if not is_int(token) or token < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids (got {token!r})")
            if not is_number(shift) or not -MAX_LOGIT_BIAS <= shift <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}] "
                                          f"(got {shift!r} for token {token})")  # fmt: skip
            cleaned[token] = float(shift)
        object.__setattr__(self, "logit_bias", tuple(sorted(cleaned.items())))
        ids = tuple(self.stop_token_ids or ())
        if not all(is_int(token) and token >= 0 for token in ids):
            raise InvalidRequestError(f"stop_token_ids must be token ids (got {list(ids)!r})")
        object.__setattr__(self, "stop_token_ids", ids)
        top = self.logprobs
        if top is not None and (not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
            raise InvalidRequestError(f"logprobs (the alternatives per token; top_logprobs in chat) must be an "
                                      f"integer in [0, {MAX_TOP_LOGPROBS}] (got {top!r})")  # fmt: skip

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def shapes_scores(self) -> bool:
        """Whether bias or penalties change the scores before the pick."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def token_ids(self) -> dict[str, list[int]]:
        """The token ids the parameters name, by field (the engine checks them against the vocabulary)."""
        return {"logit_bias": [token for token, _ in self.logit_bias], "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_request(cls, **request_fields: Any) -> SamplingParams:
        """Build from API fields: a `None` value means "use the default".

        Unknown field names raise InvalidRequestError instead of TypeError so
        the HTTP edge can answer 400 with the offending name.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(request_fields) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {unknown}; supported: {sorted(known)}"
            )
        return cls(**{k: v for k, v in request_fields.items() if v is not None})


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Scale logits by 1/temperature (temperature > 0; 0 is handled as greedy)."""
    if temperature <= 0.0:
        raise ValueError(
            f"apply_temperature needs temperature > 0 (got {temperature}); "
            "temperature 0 is greedy decoding, use argmax instead"
        )
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest logits (0 = off). Tokens tied with the k-th are kept too."""
    if top_k <= 0 or top_k >= logits.numel():
        return logits
    kth_value = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth_value, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest most-likely set whose mass reaches `top_p`.

    A token is kept when the mass of the tokens ranked above it is below
    `top_p`, so the most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p - _TOP_P_TOLERANCE
    keep_sorted[0] = True
    keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times the top probability."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max() * min_p
    return logits.masked_fill(probs < threshold, -math.inf)


class Sampler:
    """Picks next tokens for one request.

    Owns a CPU `torch.Generator`: each request draws from its own stream, so a
    seeded request reproduces the same tokens whatever else runs beside it.
    Not thread-safe; one sampler belongs to one request.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (),
                 constraint: TokenConstraint | None = None) -> None:  # fmt: skip
        """`constraint`: the grammar state of a request with `params.grammar` (engine/constraint.py)."""
        self.params = params
        self._shaper = ScoreShaper(params, prompt_ids) if params.shapes_scores else None
        self.constraint = constraint
        self._generator = torch.Generator(device="cpu")
        if params.seed is None:
            self._generator.seed()  # fresh nondeterministic seed
        else:
            self._generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Return the next token id. logits: [vocab_size], any float dtype, any device."""
        if logits.dim() != 1 or logits.numel() == 0:
            raise ValueError(
                f"Sampler.sample needs 1-D next-token logits of shape [vocab_size] "
                f"(got shape {tuple(logits.shape)}); select the last position first"
            )
        scores = logits if self._shaper is None else self._shaper.shape(logits)
        if self.constraint is not None:
            scores = self.constraint.mask(scores)
        token = self._pick(scores)
        if self._shaper is not None:
            self._shaper.generated(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        return token

    def _pick(self, logits: torch.Tensor) -> int:
        if self.params.is_greedy:
            # torch.argmax returns the first maximal index, so ties are deterministic.
            return int(torch.argmax(logits).item())
        scores = logits.to(torch.float32)
        scores = apply_temperature(scores, self.params.temperature)
        scores = apply_top_k(scores, self.params.top_k)
        scores = apply_top_p(scores, self.params.top_p)
        scores = apply_min_p(scores, self.params.min_p)
        # The generator lives on CPU, so the draw happens there: one small
        # [vocab_size] copy per token.
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
