"""The library (Engine) and the HTTP server accept and refuse exactly the same prompts, in the same words.

The model's embedding has 64 rows more than its tokenizer has ids (as padded embeddings do): an id in
between is one the model runs, so both accept it. The app runs in-process (ASGI) on the engine the
library calls go to, so the hashing and template counts below see the server's own work.
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
from fastapi.testclient import TestClient

import kvcellar.cache.hashing
from kvcellar.errors import InvalidRequestError
from kvcellar.server import ServerSettings, create_app

NUM_PADDING_ROWS = 64


@pytest.fixture(scope="module")
def padded_model_dir(server_model_dir, tmp_path_factory):
    """The server's tiny model with NUM_PADDING_ROWS embedding rows past its tokenizer's ids."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("padded-embedding")
    for path in server_model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    model = AutoModelForCausalLM.from_pretrained(server_model_dir)
    model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + NUM_PADDING_ROWS)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def library_and_server(padded_model_dir):
    from kvcellar.engine import Engine

    engine = Engine.load(str(padded_model_dir), block_size=16, num_threads=1)
    with TestClient(create_app(engine, ServerSettings())) as client:
        yield engine, client
    engine.close()


def _cases(engine) -> list[tuple[str, list, int | None]]:
    vocab, num_tokenizer_ids, context = engine.limits.vocab_size, len(engine.tokenizer), engine.context_length
    assert vocab == num_tokenizer_ids + NUM_PADDING_ROWS
    short = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    return [
        ("empty prompt", [], None),
        ("id -1", [5, -1, 6], None),
        ("id vocab - 1", [5, vocab - 1], None),
        ("id vocab", [5, vocab], None),
        ("id past the tokenizer, inside the embedding", [5, num_tokenizer_ids + 3], None),
        ("prompt of context - 1 tokens", [7] * (context - 1), None),
        ("prompt of context tokens", [7] * context, None),
        ("prompt past the context", [7] * (context + 5), None),
        ("max_tokens filling the context", [7] * (context - 3), 3),
        ("max_tokens past the context", [7] * (context - 3), 4),
        ("max_tokens 0", short, 0),
    ]


def _library(engine, ids: list, max_tokens: int | None) -> str | None:
    """None when the library runs the request, else its error text."""
    options = {} if max_tokens is None else {"max_tokens": max_tokens}
    try:
        engine.generate(prompt_ids=ids, **({"max_tokens": 1} | options))
    except InvalidRequestError as exc:
        return str(exc)
    return None


def _server(client, ids: list, max_tokens: int | None) -> str | None:
    body = {"prompt": ids, "max_tokens": 1 if max_tokens is None else max_tokens}
    response = client.post("/v1/completions", json=body)
    if response.status_code == 200:
        return None
    assert response.status_code == 400, response.text
    return response.json()["error"]["message"]


def test_library_and_server_accept_and_refuse_the_same_prompts(library_and_server):
    engine, client = library_and_server
    verdicts = {name: (_library(engine, ids, max_tokens), _server(client, ids, max_tokens))
                for name, ids, max_tokens in _cases(engine)}  # fmt: skip
    accepted = {name for name, (library, server) in verdicts.items() if library is None and server is None}
    assert accepted == {"id vocab - 1", "id past the tokenizer, inside the embedding", "prompt of context - 1 tokens",
                        "max_tokens filling the context"}  # fmt: skip
    for name, (library, server) in verdicts.items():
        assert library == server, name  # refused by both, with the same words (or accepted by both)


def test_a_bool_is_no_token_id_for_either(library_and_server):
    engine, client = library_and_server
    # JSON `true` fails the server's strict schema before the engine sees it; the library refuses it itself.
    last_id = engine.limits.vocab_size - 1
    assert _library(engine, [5, True], None) == f"token id True is outside the model's vocabulary (0..{last_id})"
    response = client.post("/v1/completions", json={"prompt": [5, True], "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_a_refusal_names_its_rule_and_field(library_and_server):
    engine, client = library_and_server
    expected = {(): ("prompt", "empty_prompt"), (5, engine.limits.vocab_size): ("prompt", "invalid_token")}
    for ids, (param, code) in expected.items():
        error = client.post("/v1/completions", json={"prompt": list(ids)}).json()["error"]
        assert (error["param"], error["code"]) == (param, code)
    error = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 10**6}).json()["error"]  # fmt: skip
    assert (error["param"], error["code"]) == ("max_tokens", "max_tokens_out_of_range")


def test_a_chat_request_hashes_its_chain_once_and_renders_each_prefix_once(library_and_server, monkeypatch):
    engine, client = library_and_server
    chains, renders = [], []
    hash_blocks, render = kvcellar.cache.hashing.hash_blocks, type(engine.tokenizer).apply_chat_template

    def counted_hash_blocks(*args, **kwargs):
        chains.append(1)
        return hash_blocks(*args, **kwargs)

    def counted_render(self, conversation, **options):
        renders.append((len(conversation), options["add_generation_prompt"]))
        return render(self, conversation, **options)

    monkeypatch.setattr(kvcellar.cache.hashing, "hash_blocks", counted_hash_blocks)
    monkeypatch.setattr(type(engine.tokenizer), "apply_chat_template", counted_render)
    messages = [{"role": "system", "content": "Answer briefly. " * 8}, {"role": "user", "content": "Which one? " * 8}]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert len(chains) == 1
    assert Counter(renders) == {(2, True): 1, (1, False): 1, (2, False): 1}  # no prefix rendered twice
