"""Tool calls between OpenAI's message shape and a model's own markup.

A chat template that supports tools (Qwen2.5, Qwen3, Hermes and others) renders a call the model
makes as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the assistant's turn, so
that is what the model learns to sample. The endpoint reads such blocks of a sampled reply back
into `tool_calls` (the recorded turn keeps the sampled ids as they are), and hands the
`arguments` of the calls in an agent's history to the template as objects, the shape templates
render, so that the history reads as the model wrote it. A model whose template has no such
markup gets its reply as text.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: A tool call in the markup of templates that tag calls: a JSON object between the tags.
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def template_tags_tool_calls(tokenizer: Any) -> bool:
    """Whether the model's chat template renders tool calls between `<tool_call>` tags."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: {"default": ..., "tool_use": ...}
        template = " ".join(template.values())
    return "<tool_call>" in template


def read_tool_calls(text: str, call_id: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the reply's text outside its tool calls, or None if nothing is left; the calls as OpenAI
    `tool_calls`, with ids `{call_id}-{i}`). A block that is not a JSON object with a string `name`
    is not a call: the reply is then left whole as text, for the agent to read what was sampled."""
    calls = []
    for i, block in enumerate(TOOL_CALL.findall(text)):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, str):  # already a JSON string: as the model wrote it
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": f"{call_id}-{i}", "type": "function", "function": {"name": call["name"], "arguments": arguments}})
    if not calls:
        return text, []
    rest = TOOL_CALL.sub("", text).strip()
    return rest or None, calls


def arguments_as_objects(tool_calls: Any) -> Any:
    """An assistant message's `tool_calls` with each call's `arguments` (a JSON string in
    OpenAI's shape) decoded to the object templates render; anything else is left as sent."""
    if not isinstance(tool_calls, list):
        return tool_calls
    out = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                call = {**call, "function": {**function, "arguments": json.loads(arguments)}}
            except json.JSONDecodeError:
                pass  # the template renders the string as the agent sent it
        out.append(call)
    return out
