"""The OpenAI-compatible API driven by the official `openai` package against the real worker on
the default model. Outputs stay short (a few tokens) to keep the suite fast on a CPU."""

import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


def test_models_list_exactly_the_served_model(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert models[0].object == "model"
    assert client.models.retrieve(model).id == model


def test_chat_completion(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == model
    assert r.system_fingerprint.startswith("fp_")
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_gives_length(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_completion_tokens=3, temperature=0
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_chat_stream_matches_the_json_answer(client, model):
    whole = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completions_json_and_stream(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    text = r.choices[0].text
    assert text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 5
    streamed = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert streamed[-1].choices == [] and streamed[-1].usage.prompt_tokens == 5


def test_stop_sequence(client, model):
    base = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert len(text) >= 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_same_seed_same_text(client, model):
    def run(seed):
        r = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=10, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content

    assert run(1234) == run(1234)


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content


def test_completion_logprobs(client, model):
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert len(lp.text_offset) == 4 and lp.text_offset[0] == 0
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_unsupported_features_are_400s_naming_them(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1, **extra)
    assert e.value.body["param"] == param
    assert param in e.value.message


def test_no_or_wrong_token_is_401(worker, model):
    for key in ["", "wrong"]:
        c = openai.OpenAI(base_url=worker.base_url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            c = c.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model=model, messages=QUESTION, max_tokens=1)
