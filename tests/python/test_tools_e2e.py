"""Tool calling through the official `openai` client on the default model (SmolLM2, whose
template has no tool support: the worker's generic format). Forced calls are constrained by the
tools' schemas, so they always parse."""

import json

import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def check_calls(message):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_") or call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_returns_valid_calls(client, model, seed):
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0.8,
        seed=seed,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message)


def test_a_named_tool_is_the_one_called(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    check_calls(r.choices[0].message)


def test_streamed_tool_calls_reassemble_to_the_whole_answer(client, model):
    args = dict(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    whole = client.chat.completions.create(**args).choices[0].message
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ]
    # The raw chunks: the first piece of each call carries its id and name.
    chunks = list(client.chat.completions.create(stream=True, **args))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert all(p.index == 0 for p in pieces)


def test_a_tool_result_round_trip_is_answered(client, model):
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120,
        temperature=0,
    ).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    r = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], max_tokens=16, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 0


def test_auto_without_a_call_is_plain_content(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_broken_tools_are_400s_naming_the_field(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=5, **extra)
    assert e.value.body["param"] == param, e.value.body
