"""Turn a validated request body into what the engine runs: a prepared prompt, sampling, salt.

Operations: `check_model`, `prepare_generation(engine, body, tenant, settings) -> Prepared`,
`encode_input(engine, messages=..., prompt=...)` (refuses text too long to
fit the context before tokenizing all of it: `max_chars_per_token` and a
bounded leading sample),
`encode_chat` (ids and message boundaries), `prepare_prompt` (the engine's own
check, `Engine.prepare`, its refusal turned into a 400 with the engine's words:
the server accepts exactly the prompts the library does). Runs in a worker
thread (tokenizing a long prompt must not stall the event loop); raises
APIError or InvalidRequestError, which the error handlers turn into 4xx answers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from kvcellar.chat.grammar import response_format_grammar, tool_call_grammar
from kvcellar.chat.reasoning import ReasoningSplit, marks_reasoning, opens_in_reasoning
from kvcellar.chat.tools import Tool, ToolChoice, parse_tool_choice, parse_tools
from kvcellar.engine import PreparedPrompt, PromptSegments, SamplingParams
from kvcellar.errors import InvalidRequestError
from kvcellar.server.auth import Tenant
from kvcellar.server.errors import APIError
from kvcellar.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from kvcellar.config import ServerSettings
from kvcellar.engine.serving import ServingEngine


@dataclass(frozen=True)
class Prepared:
    prompt: PreparedPrompt  # ids, segments, salt and block keys, computed once
    params: SamplingParams
    tenant: Tenant
    tool_choice: ToolChoice = ToolChoice("none")  # whether the answer's tool calls are parsed out
    reasoning: ReasoningSplit | None = None  # set: the answer's reasoning comes back as reasoning_content

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.prompt.ids

    @property
    def cache_salt(self) -> str:
        return self.prompt.salt


def check_model(engine: ServingEngine, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise APIError(404, f"the model {model!r} does not exist on this server; it serves {engine.model_name!r} "
                            "(see GET /v1/models)", param="model", code="model_not_found")  # fmt: skip


REASONING_TAIL_TOKENS = 8  # the prompt's last tokens, decoded: does the generation prompt open a reasoning block?

# NFC, the normalizer most tokenizers apply first, composes at most 4 code points into one (Greek "ᾄ").
_MAX_CODE_POINTS_COMPOSED = 4


@functools.lru_cache(maxsize=8)
def max_chars_per_token(tokenizer: object) -> int:
    """An upper bound on the characters one token can stand for: the longest vocabulary entry, times NFC's most.

    Vocabulary entries are written one character per byte (byte-level BPE) or
    per character (SentencePiece), never fewer characters than the text they
    match, so a text longer than `context_length * max_chars_per_token`
    cannot fit the context, whatever its tokens turn out to be.
    """
    return _MAX_CODE_POINTS_COMPOSED * max((len(piece) for piece in tokenizer.get_vocab()), default=1)


def _texts(messages: list[ChatMessage] | None, prompt: object) -> Iterator[str]:
    if messages is not None:
        for message in messages:
            content = message.content
            if isinstance(content, str):
                yield content
            elif content is not None:
                yield from (part.text for part in content)
    elif isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        yield prompt[0]


# A sample of text beyond this many characters per context token is tokenized on its own first (below).
SAMPLE_CHARS_PER_TOKEN = 16
# Tokens a text's prefix may have beyond the whole text's: its last word can merge with what follows it.
PREFIX_MARGIN_TOKENS = 64


def _check_text_size(engine: ServingEngine, messages: list[ChatMessage] | None, prompt: object) -> None:
    """Refuse text that cannot fit the context before tokenizing all of it.

    Two bounds: more characters than any tokenization could fit (refused untokenized); or, for text
    longer than SAMPLE_CHARS_PER_TOKEN characters per context token, a leading sample of that size
    that alone has more tokens than the context (the whole text has at least about as many as any
    prefix of it). A long prompt then costs one bounded tokenization before its 400, not a whole one.
    """
    texts = list(_texts(messages, prompt))
    num_chars = sum(len(text) for text in texts)
    per_token = max_chars_per_token(engine.tokenizer)
    context = engine.context_length
    param = "messages" if messages is not None else "prompt"
    if num_chars > context * per_token:
        raise APIError(400, f"the prompt has {num_chars} characters; no token of this model stands for more than "
                            f"{per_token}, so it cannot fit the model's context of {context} tokens: shorten it",
                       param=param, code="context_length_exceeded")  # fmt: skip
    sample_chars = context * SAMPLE_CHARS_PER_TOKEN
    if num_chars > sample_chars:
        sample = "".join(texts)[:sample_chars]
        num_tokens = len(engine.tokenizer.encode(sample, add_special_tokens=False))
        if num_tokens > context + PREFIX_MARGIN_TOKENS:
            raise APIError(400, f"the prompt has {num_chars} characters and its first {sample_chars} alone are "
                                f"{num_tokens} tokens, more than the model's context of {context} tokens: shorten it",
                           param=param, code="context_length_exceeded")  # fmt: skip


def encode_chat(engine: ServingEngine, messages: list[ChatMessage], tools: tuple[Tool, ...] = (),
                keep_through: int | None = None) -> tuple[list[int], PromptSegments]:  # fmt: skip
    """Token ids of chat messages (and the tools shown with them), and where their system prompt and last user
    message end (or `keep_through`'s, a cache breakpoint's message, where later)."""
    _check_text_size(engine, messages, None)
    return engine.encode(messages=[message.as_engine_message() for message in messages], tools=tools,
                         keep_through=keep_through)  # fmt: skip


def tools_and_grammar(body: ChatCompletionRequest) -> tuple[tuple[Tool, ...], ToolChoice, str | None]:
    """The request's tools, its tool_choice, and the grammar its answer must follow (None: free text)."""
    try:
        tools = parse_tools(body.tools or [])
        choice = parse_tool_choice(body.tool_choice, tools, body.parallel_tool_calls)
        grammar = response_format_grammar(body.response_format)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=exc.field, code=exc.code) from None
    if choice.forces_calls:
        if grammar is not None:
            raise APIError(400, "response_format cannot be combined with a tool_choice that forces tool calls: the "
                                "answer is the calls", param="response_format", code="unsupported_parameter")  # fmt: skip
        grammar = tool_call_grammar(tools, choice.name, choice.parallel)
    elif grammar is not None and choice.mode == "auto":
        raise APIError(400, 'response_format with tools needs tool_choice "none" (a JSON answer) or a forced call: '
                            "an answer that may be either is not supported", param="response_format",
                       code="unsupported_parameter")  # fmt: skip
    return tools, choice, grammar


def encode_input(engine: ServingEngine, *, messages: list[ChatMessage] | None = None, prompt: object = None) -> list[int]:
    """Token ids of chat messages, a text prompt, a list of one text, or a list of token ids."""
    if messages is not None:
        return encode_chat(engine, messages)[0]
    _check_text_size(engine, None, prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.encode(prompt=prompt)[0]
    return list(prompt)  # token ids: the engine's check judges them (prepare_prompt)


def prepare_prompt(
    engine: ServingEngine, prompt_param: str, prompt_ids: list[int], segments: PromptSegments | None = None,
    cache_salt: str = "", max_tokens: int | None = None,
) -> PreparedPrompt:
    """`engine.prepare` of these ids; its refusal as a 400 with the engine's message and code.

    `prompt_param`: the body field the prompt came in ("messages" or "prompt"), named in the error.
    """
    try:
        return engine.prepare(prompt_ids=prompt_ids, segments=segments, cache_salt=cache_salt, max_tokens=max_tokens)
    except InvalidRequestError as exc:
        param = prompt_param if exc.field == "prompt" else exc.field
        raise APIError(400, str(exc), param=param, code=exc.code) from None


def prepare_generation(
    engine: ServingEngine, body: ChatCompletionRequest | CompletionRequest, tenant: Tenant, settings: ServerSettings,
    keep_through: int | None = None,
) -> Prepared:
    """`keep_through`: a chat message marked as a cache breakpoint (Anthropic's cache_control)."""
    check_model(engine, body.model)
    unsupported = body.unsupported_fields()
    if unsupported:
        raise APIError(400, f"not supported by this server: {', '.join(unsupported)}; drop the field(s)",
                       param=unsupported[0].split(" ")[0], code="unsupported_parameter")  # fmt: skip
    fields = body.sampling()
    segments = PromptSegments()
    choice = ToolChoice("none")
    if isinstance(body, ChatCompletionRequest):
        tools, choice, fields["grammar"] = tools_and_grammar(body)
        (ids, segments), prompt_param = encode_chat(engine, body.messages, tools, keep_through), "messages"
    else:
        ids, prompt_param = encode_input(engine, prompt=body.prompt), "prompt"
    salt = tenant.salt_for(body.cache_salt)
    prompt = prepare_prompt(engine, prompt_param, ids, segments, salt, fields["max_tokens"])
    if fields["max_tokens"] is None:
        fields["max_tokens"] = min(settings.default_max_tokens, engine.context_length - len(ids))
    try:
        params = SamplingParams.from_request(**fields)
    except InvalidRequestError as exc:  # its message starts with the field's name
        name = str(exc).split(" ", 1)[0]
        raise APIError(400, str(exc), param=name if name in fields else None, code="invalid_sampling") from None
    if params.grammar is not None:
        try:
            engine.grammars.check(params.grammar, "tools" if choice.forces_calls else "response_format")
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=exc.field, code=exc.code) from None
    reasoning = None
    if isinstance(body, ChatCompletionRequest) and marks_reasoning(getattr(engine.tokenizer, "chat_template", None)):
        reasoning = ReasoningSplit(opens_in_reasoning(engine.tokenizer.decode(ids[-REASONING_TAIL_TOKENS:])))
    return Prepared(prompt, params, tenant, choice, reasoning)
