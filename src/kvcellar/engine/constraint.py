"""Constrained decoding: a grammar decides which tokens may come next (structured output, forced tool calls).

Operations: `Grammars(tokenizer, vocab_size, eos_ids)`, `.check(grammar)` (raises InvalidRequestError
with the grammar engine's words), `.matcher(grammar) -> TokenConstraint`; `TokenConstraint.mask(logits)`
(in place: tokens the grammar forbids get -inf), `.accept(token)`, `.finished`.

The grammar engine is llguidance (the Rust library behind vLLM's, SGLang's and llama.cpp's guidance
backends): a grammar is Lark text with `%json {schema}` for JSON Schema parts (chat/grammar.py writes
them). Why llguidance rather than xgrammar: one small abi3 wheel with no torch or compiler pin, masks
computed on the CPU whatever the device (their cost: docs/benchmarks.md), and JSON Schema and Lark in one
grammar (a tool call is fixed text around a schema). A grammar is compiled once and kept (`CACHED_GRAMMARS`
most recent); each request runs a copy of the compiled matcher. When the grammar is complete it allows
only the end-of-sequence tokens, or stops by itself (`finished`): the request then ends with "stop".
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

from kvcellar.errors import InvalidRequestError

log = logging.getLogger(__name__)

CACHED_GRAMMARS = 64


class TokenConstraint:
    """One request's grammar state: which tokens may come next, advanced by each accepted token."""

    def __init__(self, matcher: object, vocab_size: int) -> None:
        import llguidance.torch as ll_torch

        self._matcher = matcher
        self._fill, self._apply = ll_torch.fill_next_token_bitmask, ll_torch.apply_token_bitmask_inplace
        self._bitmask = ll_torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 scores with every token the grammar forbids at -inf (a copy; `logits` [vocab] untouched)."""
        self._fill(self._matcher, self._bitmask, 0)
        scores = logits.to(torch.float32).reshape(1, -1).clone()
        self._apply(scores, self._bitmask.to(scores.device))
        return scores[0]

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and allows nothing more."""
        return self._matcher.is_stopped()


class Grammars:
    """The model's tokenizer as the grammar engine sees it, and the grammars compiled for it."""

    def __init__(self, tokenizer: object, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self._hf_tokenizer, self._vocab_size, self._eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self.num_scores = vocab_size  # the logits' size, what a mask covers
        self._tokenizer = None  # made at the first grammar: most servers never need one
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # requests are prepared on several threads

    def _llg_tokenizer(self) -> object:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size,
                                                           eos_token=self._eos_ids or None)  # fmt: skip
        return self._tokenizer

    def check(self, grammar: str, field: str) -> None:
        """Refuse a grammar the engine cannot compile (a JSON Schema it does not support, say), naming the
        request `field` it came from."""
        self._compile(grammar, field)

    def matcher(self, grammar: str) -> TokenConstraint:
        return TokenConstraint(self._compile(grammar, "grammar").deep_copy(), self._vocab_size)

    def _compile(self, grammar: str, field: str) -> object:
        import llguidance

        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
            matcher = llguidance.LLMatcher(self._llg_tokenizer(), llguidance.grammar_from("lark", grammar))
            error = matcher.get_error()
            if error:
                first = error.splitlines()[0] if error else "unknown error"
                raise InvalidRequestError(f"the grammar engine cannot use this schema: {first}", code="invalid_schema",
                                          field=field)  # fmt: skip
            self._compiled[grammar] = matcher
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
            return matcher

