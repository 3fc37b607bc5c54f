#!/usr/bin/env python3
"""Render the real chat templates in tests/data/chat_templates/ with the
reference implementation and write tests/data/chat_templates/cases.json.

The reference is Hugging Face transformers' `render_jinja_template` (what
`apply_chat_template(..., tokenize=False)` calls). Without transformers the
script falls back to a copy of transformers' Jinja environment built on
jinja2 alone; with both installed it renders every case both ways and fails
if they disagree.

    pip install jinja2            # required (>= 3.1.6)
    pip install transformers      # optional, the exact reference; no hub access needed
    python3 scripts/gen-chat-template-fixtures.py

`strftime_now` is pinned to FIXED_NOW so that Llama 3.2's date line is
reproducible; the Rust test pins its clock to the same instant.
"""

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "chat_templates"

# 2024-09-15 10:20:30, read as a naive local time by Python and as UTC by Rust.
FIXED_NOW = dt.datetime(2024, 9, 15, 10, 20, 30)
FIXED_NOW_UNIX = int(FIXED_NOW.replace(tzinfo=dt.timezone.utc).timestamp())

# name -> (file, bos_token, eos_token, features). Tokens are the model's
# tokenizer_config.json values (null -> ""); see SOURCES.md.
TEMPLATES = {
    "smollm2-135m-instruct": ("smollm2-135m-instruct.jinja", "<|im_start|>", "<|im_end|>", set()),
    "llama-3.1-8b-instruct": ("llama-3.1-8b-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", {"tools", "llama"}),
    "llama-3.2-3b-instruct": ("llama-3.2-3b-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", {"tools", "llama"}),
    "qwen2.5-7b-instruct": ("qwen2.5-7b-instruct.jinja", "", "<|im_end|>", {"tools", "qwen"}),
    "mistral-7b-instruct-v0.2": ("mistral-7b-instruct-v0.2.jinja", "<s>", "</s>", set()),
    "phi-3-mini-4k-instruct": ("phi-3-mini-4k-instruct.jinja", "<s>", "<|endoftext|>", set()),
    "phi-3.5-mini-instruct": ("phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>", set()),
    "qwen3-0.6b": ("qwen3-0.6b.jinja", "", "<|im_end|>", {"tools", "qwen", "qwen3"}),
    "mistral-nemo-instruct-2407": ("mistral-nemo-instruct-2407.jinja", "<s>", "</s>", {"tools", "mistral_tools"}),
}


def msg(role, content, **extra):
    # Same key order as the Rust ChatMessage: role, content, name, tool_calls, tool_call_id.
    m = {"role": role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if key in extra:
            m[key] = extra[key]
    return m


SYSTEM = msg("system", "You are a helpful assistant.")
USER_1 = msg("user", "What is the capital of France?")
ASSISTANT_1 = msg("assistant", "The capital of France is Paris.")
USER_2 = msg("user", "And of Germany?")

# Key order deliberately not alphabetical: tojson must keep it.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}},
}
TOOL_CALL_2 = {
    "id": "call_2",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"location": "Berlin", "unit": "celsius"}},
}

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "IANA name, e.g. Europe/Paris"}},
            "required": ["timezone"],
        },
    },
}
TIME_CALL = {
    "id": "call_3",
    "type": "function",
    "function": {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}},
}

# Nested schema with booleans, numbers and null defaults, for tojson.
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the catalogue (« ünïcode »).",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "default": 10},
                "threshold": {"type": "number", "default": 0.25},
                "exact": {"type": "boolean", "default": False},
                "filters": {"type": ["object", "null"], "default": None},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}

def with_id(call, call_id):
    # Mistral's tool-aware templates insist on 9-character alphanumeric ids.
    return {**call, "id": call_id}


# (name, messages, extra template kwargs, which templates: None = all, else a feature)
CONVERSATIONS = [
    ("single_user", [msg("user", "Hello!")], {}, None),
    ("system_user", [SYSTEM, USER_1], {}, None),
    ("multi_turn", [USER_1, ASSISTANT_1, USER_2], {}, None),
    ("system_multi_turn", [SYSTEM, USER_1, ASSISTANT_1, USER_2], {}, None),
    ("ends_with_assistant", [SYSTEM, USER_1, ASSISTANT_1], {}, None),
    (
        "whitespace_and_unicode",
        [
            msg("system", "  Réponds en français.  \n"),
            msg("user", '\n  Ça va? 👋 "quoted" & <b>tags</b>\ttab  \n\n'),
            msg("assistant", "  Très bien, merci !  "),
            msg("user", "日本語も話せますか？"),
        ],
        {},
        None,
    ),
    ("empty_content", [msg("user", "")], {}, None),
    ("assistant_first", [msg("assistant", "Hi, I am your assistant."), msg("user", "Hello!")], {}, None),
    ("two_users_in_a_row", [msg("user", "Hello!"), msg("user", "Anyone there?")], {}, None),
    ("empty_conversation", [], {}, None),
    (
        "tool_round_trip",
        [
            msg("user", "What's the weather in Paris?"),
            msg("assistant", "", tool_calls=[TOOL_CALL]),
            msg("tool", "22 degrees and sunny", tool_call_id="call_1"),
        ],
        {"tools": [WEATHER_TOOL]},
        None,
    ),
    (
        "tool_round_trip_with_system",
        [
            SYSTEM,
            msg("user", "What's the weather in Paris?"),
            msg("assistant", "", tool_calls=[TOOL_CALL]),
            msg("tool", "22 degrees and sunny", tool_call_id="call_1"),
            msg("assistant", "It is 22 degrees and sunny in Paris."),
            msg("user", "Thanks!"),
        ],
        {"tools": [WEATHER_TOOL]},
        "tools",
    ),
    ("tools_offered", [SYSTEM, msg("user", "What's the weather in Paris?")], {"tools": [WEATHER_TOOL]}, "tools"),
    (
        "tools_in_system_prompt",
        [SYSTEM, msg("user", "What's the weather in Paris?")],
        {"tools": [WEATHER_TOOL], "tools_in_user_message": False},
        "llama",
    ),
    ("date_string_given", [SYSTEM, USER_1], {"date_string": "01 Jan 2025"}, "llama"),
    (
        "parallel_tool_calls",
        [
            msg("user", "Weather in Paris and Berlin?"),
            msg("assistant", "Let me check.", tool_calls=[TOOL_CALL, TOOL_CALL_2]),
            msg("tool", "22 degrees", tool_call_id="call_1"),
            msg("tool", "18 degrees", tool_call_id="call_2"),
        ],
        {"tools": [WEATHER_TOOL]},
        "tools",
    ),
    (
        "tools_without_user_message",
        [SYSTEM],
        {"tools": [WEATHER_TOOL]},
        "llama",
    ),
    # What /v1/chat/completions hands over when a request carries `tools`:
    # tool objects as sent, `arguments` decoded to objects, tool results as
    # `tool` messages with `tool_call_id` (and sometimes `name`). On every
    # template, so that those without tool support record what they do
    # (ignore the tools, or raise).
    (
        "two_tools_user_question",
        [msg("user", "What's the weather and the time in Paris?")],
        {"tools": [WEATHER_TOOL, TIME_TOOL]},
        None,
    ),
    (
        "two_tools_full_round_trip",
        [
            SYSTEM,
            msg("user", "What's the weather in Paris?"),
            msg("assistant", "", tool_calls=[TOOL_CALL]),
            msg("tool", "22 degrees and sunny", name="get_weather", tool_call_id="call_1"),
        ],
        {"tools": [WEATHER_TOOL, TIME_TOOL]},
        None,
    ),
    (
        "two_tools_parallel_calls",
        [
            SYSTEM,
            msg("user", "What's the weather and the time in Paris?"),
            msg("assistant", "", tool_calls=[TOOL_CALL, TIME_CALL]),
            msg("tool", "22 degrees and sunny", name="get_weather", tool_call_id="call_1"),
            msg("tool", "10:20", name="get_time", tool_call_id="call_3"),
        ],
        {"tools": [WEATHER_TOOL, TIME_TOOL]},
        None,
    ),
    (
        "tool_call_rich_arguments",
        [
            msg("user", "Search for it."),
            msg(
                "assistant",
                "",
                tool_calls=[
                    {
                        "id": "r1C2h3A4r",
                        "type": "function",
                        "function": {
                            "name": "search",
                            "arguments": {
                                "query": 'café "naïve" 日本 \\ / \t',
                                "limit": 3,
                                "threshold": 0.5,
                                "exact": True,
                                "filters": None,
                                "tags": ["a", "b"],
                                "nested": {"small": 1e-7, "big": 1e20, "neg": -2},
                            },
                        },
                    }
                ],
            ),
            msg("tool", '{"results": [], "total": 0}', name="search", tool_call_id="r1C2h3A4r"),
        ],
        {"tools": [SEARCH_TOOL]},
        None,
    ),
    (
        "two_tools_full_round_trip_mistral_ids",
        [
            SYSTEM,
            msg("user", "What's the weather in Paris?"),
            msg("assistant", "", tool_calls=[with_id(TOOL_CALL, "a1B2c3D4e")]),
            msg("tool", "22 degrees and sunny", name="get_weather", tool_call_id="a1B2c3D4e"),
        ],
        {"tools": [WEATHER_TOOL, TIME_TOOL]},
        "mistral_tools",
    ),
    (
        "two_tools_parallel_calls_mistral_ids",
        [
            SYSTEM,
            msg("user", "What's the weather and the time in Paris?"),
            msg("assistant", "", tool_calls=[with_id(TOOL_CALL, "a1B2c3D4e"), with_id(TIME_CALL, "Z9y8X7w6V")]),
            msg("tool", "22 degrees and sunny", name="get_weather", tool_call_id="a1B2c3D4e"),
            msg("tool", "10:20", name="get_time", tool_call_id="Z9y8X7w6V"),
            msg("assistant", "It is 22 degrees and sunny, and 10:20 in Paris."),
            msg("user", "Thanks!"),
        ],
        {"tools": [WEATHER_TOOL, TIME_TOOL]},
        "mistral_tools",
    ),
    # Qwen3: thinking switch and <think> blocks in earlier assistant turns.
    ("thinking_disabled", [SYSTEM, USER_1], {"enable_thinking": False}, "qwen3"),
    ("thinking_enabled", [SYSTEM, USER_1], {"enable_thinking": True}, "qwen3"),
    (
        "assistant_with_think_block",
        [
            USER_1,
            msg("assistant", "<think>\nThe user asks about France.\n</think>\n\nThe capital of France is Paris."),
            USER_2,
        ],
        {},
        "qwen3",
    ),
    (
        "think_block_after_tool_result",
        [
            msg("user", "What's the weather in Paris?"),
            msg("assistant", "<think>\nI should call the tool.\n</think>\n\n", tool_calls=[TOOL_CALL]),
            msg("tool", "22 degrees and sunny", tool_call_id="call_1"),
            msg("assistant", "<think>\nGot it.\n</think>\n\nIt is 22 degrees and sunny in Paris."),
        ],
        {"tools": [WEATHER_TOOL]},
        "qwen3",
    ),
]


def replica_environment():
    """transformers' `_compile_jinja_template` environment, on jinja2 alone."""

    class AssistantTracker(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        def _generation_support(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return FIXED_NOW.strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = jinja2.utils.Namespace
    return env


def render_replica(source, messages, add_generation_prompt, bos, eos, extra):
    kwargs = {"bos_token": bos, "eos_token": eos}
    kwargs.update(extra)
    tools = kwargs.pop("tools", None)
    documents = kwargs.pop("documents", None)
    template = replica_environment().from_string(source)
    return template.render(
        messages=json.loads(json.dumps(messages)),
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


def transformers_renderer():
    try:
        import transformers
        from transformers.utils import chat_template_utils as ctu
    except ImportError:
        return None, None

    class FixedDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED_NOW

    # `strftime_now` calls `datetime.now()` from this module.
    ctu.datetime = FixedDatetime

    def render(source, messages, add_generation_prompt, bos, eos, extra):
        kwargs = {"bos_token": bos, "eos_token": eos}
        kwargs.update(extra)
        rendered, _ = ctu.render_jinja_template(
            conversations=[json.loads(json.dumps(messages))],
            chat_template=source,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        return rendered[0]

    return render, f"transformers {transformers.__version__} render_jinja_template"


def outcome(render, *args):
    try:
        return {"expected": render(*args)}
    except jinja2.exceptions.TemplateSyntaxError as e:
        return {"expected_error": {"kind": "syntax", "message": str(e)}}
    except jinja2.exceptions.TemplateError as e:
        # raise_exception raises the base TemplateError; the engine raises subclasses.
        kind = "raised" if type(e) is jinja2.exceptions.TemplateError else "render"
        return {"expected_error": {"kind": kind, "message": str(e)}}
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        return {"expected_error": {"kind": "render", "message": f"{type(e).__name__}: {e}"}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", choices=["auto", "transformers", "jinja2"], default="auto")
    parser.add_argument("--out", type=Path, default=DATA / "cases.json")
    args = parser.parse_args()

    hf_render, hf_name = (None, None) if args.reference == "jinja2" else transformers_renderer()
    if args.reference == "transformers" and hf_render is None:
        sys.exit("transformers is not installed")
    replica_name = f"jinja2 {jinja2.__version__} copy of transformers' chat template environment"
    render, reference = (hf_render, hf_name) if hf_render else (render_replica, replica_name)

    cases = []
    for tname, (file, bos, eos, features) in TEMPLATES.items():
        source = (DATA / file).read_text(encoding="utf-8")
        for cname, messages, extra, needs in CONVERSATIONS:
            if needs is not None and needs not in features:
                continue
            for agp in (True, False):
                args_ = (source, messages, agp, bos, eos, extra)
                result = outcome(render, *args_)
                if hf_render:
                    check = outcome(render_replica, *args_)
                    if check != result:
                        sys.exit(f"replica and transformers disagree on {tname}/{cname}: {check} vs {result}")
                case = {
                    "name": f"{tname}/{cname}/{'gen' if agp else 'nogen'}",
                    "template": tname,
                    "messages": messages,
                    "add_generation_prompt": agp,
                    "bos_token": bos,
                    "eos_token": eos,
                }
                if extra:
                    case["extra_context"] = extra
                case.update(result)
                cases.append(case)

    fixtures = {
        "generator": "scripts/gen-chat-template-fixtures.py",
        "reference": reference,
        "jinja2": jinja2.__version__,
        "fixed_now": FIXED_NOW.isoformat(),
        "fixed_now_unix": FIXED_NOW_UNIX,
        "templates": {
            name: {"file": file, "bos_token": bos, "eos_token": eos}
            for name, (file, bos, eos, _) in TEMPLATES.items()
        },
        "cases": cases,
    }
    args.out.write_text(json.dumps(fixtures, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    errors = sum(1 for c in cases if "expected_error" in c)
    print(f"{len(cases)} cases ({errors} expected errors) from {reference} -> {args.out}")


if __name__ == "__main__":
    main()
