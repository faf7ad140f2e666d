"""Tool definitions, tool_choice and how tools reach a chat template (chat/tools.py), and the grammars that
force calls and JSON (chat/grammar.py)."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from kvcellar.chat.grammar import json_grammar, response_format_grammar, tool_call_grammar
from kvcellar.chat.tools import ToolChoice, has_native_tools, parse_tool_choice, parse_tools, template_inputs
from kvcellar.engine.prompt import encode_chat
from kvcellar.errors import InvalidRequestError

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "time?"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
                {"role": "tool", "content": "13:00", "tool_call_id": "call_2"}]  # fmt: skip


@pytest.mark.parametrize("raw, message", [
    ([{"type": "function"}], "must be"), ([{"type": "function", "function": {"name": "a b"}}], "letters"),
    ([TOOL, TOOL], "unique"), ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "object"),
])  # fmt: skip
def test_bad_tools_are_refused_with_what_is_wrong(raw, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_tools(raw)


def test_tool_choice_modes():
    tools = parse_tools([TOOL])
    assert parse_tool_choice(None, tools, None) == ToolChoice("auto")
    assert parse_tool_choice(None, (), None) == ToolChoice("none")
    assert parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools, False) == ToolChoice(
        "function", "get_time", parallel=False)
    with pytest.raises(InvalidRequestError, match="not among"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, tools, None)
    with pytest.raises(InvalidRequestError, match="needs tools"):
        parse_tool_choice("required", (), None)


def test_generic_rendering_puts_tools_in_the_system_prompt_and_results_in_one_user_turn():
    messages, template_tools = template_inputs(CONVERSATION, parse_tools([TOOL]), native=False)
    assert template_tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get_time"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert messages[3]["content"] == "<tool_response>\n12:00\n</tool_response>\n<tool_response>\n13:00\n</tool_response>"


NATIVE_TEMPLATE = ("{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
                   "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                   "{% for c in m.tool_calls or [] %}[{{ c.function.name }}({{ c.function.arguments.zone }})]{% endfor %}\n"
                   "{% endfor %}")  # fmt: skip


def test_a_template_that_reads_tools_gets_them_natively(tiny_model_dirs):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dirs["qwen3"])
    assert not has_native_tools(tokenizer.chat_template)  # the made models' template: the generic form
    generic_ids, _ = encode_chat(tokenizer, CONVERSATION, parse_tools([TOOL]))
    assert "# Tools" in tokenizer.decode(generic_ids)
    tokenizer.chat_template = NATIVE_TEMPLATE
    assert has_native_tools(NATIVE_TEMPLATE)
    ids, _ = encode_chat(tokenizer, CONVERSATION, parse_tools([TOOL]))
    text = tokenizer.decode(ids)
    assert text.startswith("TOOLS:get_time\nsystem:Be brief.") and "assistant:[get_time(UTC)]" in text  # arguments as an object
    assert "tool:12:00" in text


def test_grammars_are_compact_json_and_named_calls():
    assert json.loads(json_grammar({"type": "object"}).split("%json ", 1)[1]) == {
        "type": "object", "x-guidance": {"whitespace_flexible": False}}
    grammar = tool_call_grammar(parse_tools([TOOL]), "get_time", parallel=False)
    assert grammar.startswith("start: call\n") and '"const": "get_time"' in grammar
    assert response_format_grammar({"type": "text"}) is None
    with pytest.raises(InvalidRequestError, match="json_schema"):
        response_format_grammar({"type": "json_schema"})
