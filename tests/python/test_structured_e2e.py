"""Structured output through the official `openai` client on the default model: the output is
constrained, so it parses whatever the (small) model would rather have written."""

import enum
import json
import re
from typing import List, Optional, Union

import jsonschema
import pydantic
import pytest

ASK = [{"role": "user", "content": "Describe a person called Ada who is 36 years old."}]


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)
    zip_code: str = pydantic.Field(pattern=r"^[0-9]{5}$")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    age: int = pydantic.Field(ge=0, le=120)
    favourite: Colour
    address: Address
    tags: List[str] = pydantic.Field(max_length=3)
    score: float = pydantic.Field(ge=0, le=1)
    nickname: Optional[str] = pydantic.Field(max_length=16)
    pet: Union[int, bool]


class Flag(pydantic.BaseModel):
    ok: bool


class Numbers(pydantic.BaseModel):
    values: List[int] = pydantic.Field(min_length=2, max_length=4)


@pytest.mark.parametrize("schema", [Flag, Numbers, Address, Person])
def test_parse_returns_the_schema_object(client, model, schema):
    r = client.chat.completions.parse(
        model=model, messages=ASK, response_format=schema, max_tokens=300, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    parsed = choice.message.parsed
    assert isinstance(parsed, schema), choice.message.content
    # The raw text is the same object, and it validates against the schema the client sent.
    assert schema.model_validate_json(choice.message.content) == parsed


def test_json_object_mode_gives_an_object(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0.7,
        seed=3,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        # Cut by max_tokens: the partial text is still a prefix of a JSON object.
        assert r.choices[0].message.content.startswith("{")


def test_sampled_json_schema_output_always_validates(client, model):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "maybe"]},
            "confidence": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    for seed in range(4):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Is the sky green?"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": schema, "strict": True},
            },
            max_tokens=60,
            temperature=1.0,
            seed=seed,
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_regex_and_choice_produce_only_matching_text(client, model):
    for seed in range(3):
        r = client.completions.create(
            model=model,
            prompt="A phone number:",
            max_tokens=30,
            temperature=1.0,
            seed=seed,
            extra_body={"structured_outputs": {"regex": r"\+1-[0-9]{3}-[0-9]{4}"}},
        )
        assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", r.choices[0].text), r.choices[0].text
        assert r.choices[0].finish_reason == "stop"
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Pick a fruit."}],
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            extra_body={"structured_outputs": {"choice": ["apple pie", "banana", "cherry"]}},
        )
        assert r.choices[0].message.content in ("apple pie", "banana", "cherry")


def test_gbnf_grammar_through_completions(client, model):
    grammar = r'''
root   ::= "The answer is " number "." 
number ::= [1-9] [0-9]{0,2}
'''
    r = client.completions.create(
        model=model,
        prompt="Q: How many legs does a spider have?\nA:",
        max_tokens=20,
        temperature=0.8,
        seed=1,
        extra_body={"grammar": grammar},
    )
    assert re.fullmatch(r"The answer is [1-9][0-9]{0,2}\.", r.choices[0].text), r.choices[0].text


def test_streamed_constrained_output_matches_the_whole_answer(client, model):
    args = dict(
        model=model,
        messages=ASK,
        max_tokens=120,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "flag", "schema": Flag.model_json_schema()},
        },
    )
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    Flag.model_validate_json(text)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
        ({"grammar": "root ::= undefined-rule"}, "grammar"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"grammar": "root ::= \"a\"", "json_schema": {"type": "object"}}, "grammar"),
    ],
)
def test_a_constraint_that_cannot_be_used_is_a_400_naming_it(client, model, extra, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=ASK, max_tokens=5, extra_body=extra
        )
    assert e.value.body["param"] == param, e.value.body
