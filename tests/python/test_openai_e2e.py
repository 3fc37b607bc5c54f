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
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
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


def _metric(worker, name):
    import urllib.request

    req = urllib.request.Request(
        worker.base_url + "/metrics", headers={"Authorization": f"Bearer {worker.token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_n_choices_differ_repeat_and_read_the_prompt_once(client, model, worker):
    # A prompt no earlier test sent, so nothing of it is cached yet.
    messages = [{"role": "user", "content": "Invent a name for a purple dragon who sings opera."}]
    hits_before = _metric(worker, "vllm:prefix_cache_hits_total")
    args = dict(model=model, messages=messages, n=4, max_tokens=12, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**args)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert len(set(texts)) == 4, texts
    # Every choice's tokens are counted, the prompt once.
    assert 4 <= first.usage.completion_tokens <= 4 * 12
    # Choices 1-3 started from a copy of choice 0's prompt (all but the tokens read again: the
    # last one, or the last 64 of a prompt of 80 or more); choice 0 itself reused what earlier
    # requests share with it (the template's system prompt).
    cached = first.usage.prompt_tokens_details.cached_tokens
    prompt = first.usage.prompt_tokens
    reread = 64 if prompt >= 80 else 1
    hits = _metric(worker, "vllm:prefix_cache_hits_total") - hits_before
    assert hits == cached + 3 * (prompt - reread), (hits, cached, prompt)
    again = client.chat.completions.create(**args)
    assert [c.message.content for c in again.choices] == texts


def test_copied_text_is_drafted_and_accepted(client, model, worker):
    code = (
        "fn area(width: u32, height: u32) -> u32 {\n    width * height\n}\n\n"
        "fn perimeter(width: u32, height: u32) -> u32 {\n    2 * (width + height)\n}\n"
    )
    before = _metric(worker, "vllm:spec_decode_num_accepted_tokens_total")
    r = client.completions.create(
        model=model, prompt=f"{code}\n// Again:\n\n{code[:30]}", max_tokens=48, temperature=0
    )
    assert r.choices[0].text
    assert _metric(worker, "vllm:spec_decode_num_accepted_tokens_total") > before
