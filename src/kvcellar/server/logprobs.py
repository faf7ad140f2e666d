"""Log-probabilities in OpenAI's two shapes: chat (`logprobs.content`) and completions (parallel lists).

Operations: `chat_logprobs(entries, token_text)`, `completion_logprobs(entries, token_text, offset)`.
`token_text(id)` is the token decoded alone (a piece of a multi-byte character decodes to U+FFFD, as
in OpenAI's and vLLM's answers; `bytes` then still holds that piece's UTF-8 text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvcellar.engine.logits import TokenLogprob

TokenText = Callable[[int], str]


def _chat_entry(token_id: int, logprob: float, token_text: TokenText) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    content = []
    for entry in entries:
        item = _chat_entry(entry.token_id, entry.logprob, token_text)
        item["top_logprobs"] = [_chat_entry(token, logprob, token_text) for token, logprob in entry.top]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict:
    """`offset`: the text offset of the first entry's token (a stream chunk's position in the answer)."""
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        tokens.append(token_text(entry.token_id))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{token_text(token): logprob for token, logprob in entry.top} for entry in entries],
        "text_offset": offsets,
    }
