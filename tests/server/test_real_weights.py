"""`kvcellar serve` on real weights (the demo model's GGUF file), through the official `openai` client.

Factual answers must be right cold, from the memory tier, from the disk tier after a restart
and on a chat's next turn, and the cached answers must be the cold ones token for token
(exact mode, the server's default). The server is started as a user would: `--model FILE.gguf`.
"""

from __future__ import annotations

import pytest

from .support import ServerProcess

QUESTION = "What is the capital of France? Answer in one word."
DOCUMENT = "You answer questions about European geography. Reference notes follow. " + " ".join(
    f"Note {i}: France borders Spain, Italy, Germany and Belgium; its capital is Paris." for i in range(10)
)


@pytest.fixture(scope="module")
def start_real(smollm2_gguf, real_home, tmp_path_factory):
    del real_home  # servers inherit KVCELLAR_HOME and reuse the session's conversion
    started: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("real-server-logs")

    def start(*args: str) -> ServerProcess:
        process = ServerProcess(smollm2_gguf, logs / f"server-{len(started)}.log", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def _ask(server: ServerProcess, messages: list[dict], max_tokens: int = 24):
    reply = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0)
    return reply.choices[0], reply.usage


def test_right_answers_cold_from_memory_from_disk_after_a_restart_and_on_the_next_turn(start_real, tmp_path) -> None:
    cache_dir = str(tmp_path / "kv-cache")
    first = start_real("--cache-dir", cache_dir, "--no-cost-model")  # every hit restored, whatever the machine's load
    assert [m.id for m in first.client().models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
    messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": QUESTION}]

    cold, cold_usage = _ask(first, messages)
    assert "Paris" in cold.message.content and cold.finish_reason == "stop"
    assert cold_usage.prompt_tokens_details.cached_tokens == 0

    memory, memory_usage = _ask(first, messages)
    assert memory.message.content == cold.message.content
    assert memory_usage.prompt_tokens_details.cached_tokens >= memory_usage.prompt_tokens // 16 * 16 > 0

    turn = messages + [{"role": "assistant", "content": cold.message.content},
                       {"role": "user", "content": "And what is the capital of Germany? Answer in one word."}]  # fmt: skip
    second_turn, turn_usage = _ask(first, turn)
    assert "Berlin" in second_turn.message.content
    assert turn_usage.prompt_tokens_details.cached_tokens >= cold_usage.prompt_tokens // 16 * 16
    first.stop()  # SIGTERM: the engine drains its disk writes before the exit

    restarted = start_real("--cache-dir", cache_dir, "--no-cost-model")  # restore every hit, whatever it costs
    from_disk, disk_usage = _ask(restarted, messages)
    assert from_disk.message.content == cold.message.content
    assert disk_usage.prompt_tokens_details.model_extra["cached_tokens_by_tier"].get("disk", 0) > 0
    again, _ = _ask(restarted, turn)
    assert again.message.content == second_turn.message.content
    restarted.stop()


def test_streamed_chat_stops_at_the_end_of_turn_without_showing_it(start_real) -> None:
    server = start_real()
    stream = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
