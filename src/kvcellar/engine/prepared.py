"""One request's prompt, prepared once, and the one rule for what prompt the engine accepts.

Operations: `PreparedPrompt` (ids, message boundaries, cache salt and the
block-key chain, computed once per request and handed to every step after:
probe, restore, capture, the CPU buffer hand-over), `PromptLimits` (the
model's context and vocabulary) and its `check_prompt` / `check_max_tokens`
(`Engine.prepare` runs them: the library and the HTTP
server refuse exactly the same inputs with the same words, `InvalidRequestError`
carrying the `code` and the `field` the server reports).

Vocabulary: a token id is valid when the model's input embedding has a row
for it (0 <= id < rows). The tokenizer may know fewer ids (embeddings are
often padded to a multiple of 64); those extra rows are still ids the model runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvcellar.cache.hashing import BlockHash
from kvcellar.cache.segments import PromptSegments
from kvcellar.errors import InvalidRequestError


@dataclass(frozen=True)
class PreparedPrompt:
    """A checked prompt: its ids, where its system prompt and last user message end, its cache salt,
    and the keys of its full blocks in that salt's namespace (empty when the cache is off)."""

    ids: tuple[int, ...]
    segments: PromptSegments
    salt: str
    block_keys: tuple[BlockHash, ...]


@dataclass(frozen=True)
class PromptLimits:
    """What the model can run: prompts shorter than `context_length`, ids below `vocab_size` (embedding rows),
    and a prompt whose K/V, with room for one token more, fits the running requests' `kv_budget_tokens`."""

    context_length: int
    vocab_size: int
    kv_budget_tokens: int | None = None

    def check_prompt(self, ids: Sequence[object]) -> None:
        """Refuse an empty prompt, an id the embedding has no row for, and a prompt that leaves no room to answer."""
        num_prompt = len(ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty: send at least one token of text",
                                      code="empty_prompt", field="prompt")  # fmt: skip
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise InvalidRequestError(f"token id {token!r} is outside the model's vocabulary (0..{self.vocab_size - 1})",
                                          code="invalid_token", field="prompt")  # fmt: skip
        context = self.context_length
        if num_prompt >= context:
            raise InvalidRequestError(f"the prompt has {num_prompt} tokens but the model's context is {context} tokens: "
                                      "shorten the prompt and leave room for the answer",
                                      code="context_length_exceeded", field="prompt")  # fmt: skip
        budget = self.kv_budget_tokens
        if budget is not None and num_prompt + 1 > budget:
            raise InvalidRequestError(f"the prompt has {num_prompt} tokens but the server's K/V budget for running "
                                      f"requests holds {budget} tokens: shorten the prompt, or start the server with a "
                                      "larger --kv-budget", code="kv_budget_exceeded", field="prompt")  # fmt: skip

    def check_sampling_ids(self, ids_by_field: dict[str, list[int]]) -> None:
        """Refuse a token id of a sampling field (logit_bias, stop_token_ids) that the model has no score for."""
        for name, ids in ids_by_field.items():
            for token in ids:
                if not 0 <= token < self.vocab_size:
                    raise InvalidRequestError(f"token id {token} in {name} is outside the model's vocabulary "
                                              f"(0..{self.vocab_size - 1})", code="invalid_token", field=name)  # fmt: skip

    def check_max_tokens(self, num_prompt: int, max_tokens: object) -> None:
        """Refuse an integer `max_tokens` outside 1..(context - prompt); None: the caller picks one that fits."""
        context = self.context_length
        is_int = isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
        if is_int and not 1 <= max_tokens <= context - num_prompt:  # other types: SamplingParams says what it takes
            raise InvalidRequestError(f"max_tokens must be between 1 and {context - num_prompt} for this prompt "
                                      f"({num_prompt} prompt tokens, {context} tokens of context), got {max_tokens}",
                                      code="max_tokens_out_of_range", field="max_tokens")  # fmt: skip
