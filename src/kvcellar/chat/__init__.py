"""What a chat request means beyond its text: tools, the tool calls in an answer, structured output.

Plain Python (no torch): `tools` (OpenAI tool definitions and tool_choice, rendered for the model's
chat template), `tool_calls` (calls parsed out of an answer, whole or while it streams), `grammar`
(the Lark grammars that force JSON answers and tool calls, for engine/constraint.py), `reasoning`
(the reasoning block split from the reply), `partial` (text held back while it may become a marker).
"""
