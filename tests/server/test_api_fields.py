"""Every field of the official clients' request types is known to the server: served, or refused with a 400
that names it, never silently dropped. The field lists come from the installed `openai` and `anthropic`
packages, so a client release that adds a field fails here until the server decides about it."""

from __future__ import annotations

import pytest
import requests
from anthropic.types import message_count_tokens_params, message_create_params
from openai.types import completion_create_params as text_params
from openai.types.chat import completion_create_params as chat_params

from kvcellar.server.anthropic_schemas import CountTokensRequest, MessagesRequest
from kvcellar.server.schemas import ChatCompletionRequest, CompletionRequest


def _fields(typed_dict: type) -> set[str]:
    names: set[str] = set()
    for base in typed_dict.__mro__:
        names |= set(getattr(base, "__annotations__", {}))
    return names


@pytest.mark.parametrize("client_type, model", [
    (chat_params.CompletionCreateParamsBase, ChatCompletionRequest),
    (text_params.CompletionCreateParamsBase, CompletionRequest),
    (message_create_params.MessageCreateParamsBase, MessagesRequest),
    (message_count_tokens_params.MessageCountTokensParams, CountTokensRequest),
])  # fmt: skip
def test_the_server_declares_every_field_the_client_can_send(client_type, model):
    assert _fields(client_type) - set(model.model_fields) == set()


USER = [{"role": "user", "content": "hi"}]
CHAT_REFUSED = {"audio": {"voice": "alloy", "format": "wav"}, "functions": [{"name": "f", "parameters": {}}],
                "function_call": "auto", "prediction": {"type": "content", "content": "x"}, "verbosity": "low",
                "web_search_options": {}, "moderation": {"enabled": True}, "prompt_cache_options": {"x": 1},
                "reasoning_effort": "low", "store": True, "service_tier": "flex", "modalities": ["text", "audio"]}
CHAT_ACCEPTED = {"metadata": {"team": "a"}, "safety_identifier": "u1", "prompt_cache_key": "k", "user": "u1",
                 "prompt_cache_retention": "24h", "service_tier": "auto", "store": False, "modalities": ["text"]}
TEXT_REFUSED = {"echo": True, "suffix": "x", "best_of": 2}


@pytest.mark.parametrize("path, field, value", [("/v1/chat/completions", f, v) for f, v in CHAT_REFUSED.items()] +
                         [("/v1/completions", f, v) for f, v in TEXT_REFUSED.items()])  # fmt: skip
def test_an_openai_field_not_served_is_refused_by_name(server, path, field, value):
    body = {"messages": USER} if path.endswith("chat/completions") else {"prompt": "hi"}
    response = server.post(path, {**body, "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == field


@pytest.mark.parametrize("field, value", list(CHAT_ACCEPTED.items()))
def test_an_openai_field_that_changes_nothing_is_accepted(server, field, value):
    response = server.post("/v1/chat/completions", {"messages": USER, "max_tokens": 2, field: value})
    assert response.status_code == 200, response.text


ANTHROPIC_REFUSED = {"container": "c1", "diagnostics": {"x": 1}, "inference_geo": "us", "speed": "fast",
                     "user_profile_id": "p", "workspace_id": "w", "mcp_servers": [{"type": "url", "url": "x"}],
                     "thinking": {"type": "enabled", "budget_tokens": 1024}, "service_tier": "priority",
                     "output_config": {"effort": "low"}}  # fmt: skip


@pytest.mark.parametrize("field, value", list(ANTHROPIC_REFUSED.items()))
def test_an_anthropic_field_not_served_is_refused_by_name(server, field, value):
    response = requests.post(server.base_url + "/v1/messages", json={"model": server.model, "max_tokens": 2,
                                                                     "messages": USER, field: value},
                             headers={"x-api-key": server.admin_key or "unused"}, timeout=30)  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert field.split(".")[0] in response.json()["error"]["message"]
