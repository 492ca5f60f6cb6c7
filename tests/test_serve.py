"""``edgeft serve``: the OpenAI-compatible server, over real HTTP on 127.0.0.1.

The server runs in a background thread (uvicorn on a pre-bound socket, so no port race); requests
go through the official ``openai`` client where it can express them and through httpx where a
test needs a broken body or raw bytes. Every request has a timeout and every loop is bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from click.testing import CliRunner
from helpers import assert_openai_error, make_peft_adapter, running

from edgeft.cli import main
from edgeft.device.decoder import Decoder
from edgeft.device.generate import TextGenerator
from edgeft.device.server import base_model_id, create_app

KEY = "test-key"
ADAPTER = "tuned"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = "Station old mill: fan is noisy. What should the crew do?"
TOO_LONG = "the fan is noisy again " * 60  # well over the 128-token context
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def adapter_dir(factory, tmp_path_factory) -> Path:
    # b_std 0.5: large enough that greedy text differs from the base model's.
    out = tmp_path_factory.mktemp("serve") / "peft"
    return make_peft_adapter(factory.model("llama"), out, targets=LLAMA_TARGETS, b_std=0.5)


@pytest.fixture(scope="module")
def generator(factory, adapter_dir) -> TextGenerator:
    gen = TextGenerator(factory.bundle("llama"), provider="cpu")
    gen.decoder.add_adapter(ADAPTER, adapter_dir)
    return gen


@pytest.fixture(scope="module")
def base_id(generator) -> str:
    return base_model_id(generator)


@pytest.fixture(scope="module")
def server(generator) -> Iterator[str]:
    with running(create_app(generator, api_key=KEY, max_queue=8)) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    # No retries: a test must see the first answer, not a retried one.
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _completion_args(base_id: str) -> dict:
    return {"model": base_id, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}


def _chat_args(base_id: str) -> dict:
    return {"model": base_id, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "temperature": 0}


# ---------------------------------------------------------------------------------------------


def test_health_and_model_list(server, client, base_id):
    assert httpx.get(f"{server}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [base_id, ADAPTER]
    assert all(m.object == "model" for m in models.data)


def test_completion_returns_text_and_usage(client, generator, base_id):
    result = client.completions.create(**_completion_args(base_id))
    choice = result.choices[0]
    assert result.object == "text_completion" and result.model == base_id
    assert choice.text and choice.finish_reason in ("stop", "length")
    usage = result.usage
    assert usage.prompt_tokens == len(generator.encode(PROMPT))
    assert 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_several_prompts_get_one_choice_each(server, client, base_id):
    """OpenAI's batch form: a list of prompts (text or token ids) gets one choice per prompt, in
    order, each what that prompt alone gets (greedy), the usage summed; streamed, it is refused."""
    prompts = [PROMPT, "Station pine hill: valve is failed.", [5, 6, 7, 8]]
    alone = [client.completions.create(**{**_completion_args(base_id), "prompt": p}) for p in prompts]
    batch = client.completions.create(**{**_completion_args(base_id), "prompt": [PROMPT, prompts[1]]})
    ids = client.completions.create(**{**_completion_args(base_id), "prompt": [[5, 6, 7, 8], [5, 6, 7, 8]]})
    assert [c.index for c in batch.choices] == [0, 1] and [c.index for c in ids.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone[:2]]
    assert [c.text for c in ids.choices] == [alone[2].choices[0].text] * 2
    assert batch.usage.total_tokens == sum(a.usage.total_tokens for a in alone[:2])
    streamed = {**_completion_args(base_id), "prompt": [PROMPT, PROMPT], "stream": True}
    error = assert_openai_error(
        httpx.post(f"{server}/v1/completions", json=streamed, headers=_auth(), timeout=TIMEOUT), 400
    )
    assert error["param"] == "prompt"
    empty = {**_completion_args(base_id), "prompt": []}
    assert_openai_error(httpx.post(f"{server}/v1/completions", json=empty, headers=_auth(), timeout=TIMEOUT), 400)


def test_null_fields_mean_defaults(server, base_id):
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": None, "temperature": None, "stop": None}
    response = httpx.post(f"{server}/v1/completions", json=body, headers=_auth(), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    reply = response.json()  # temperature null = 1: sampled, so the first token may end it
    tokens, reason = reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]
    assert tokens == 16 if reason == "length" else reason == "stop" and tokens < 16, reply  # OpenAI's default


def test_chat_completion_returns_text_and_usage(client, base_id):
    result = client.chat.completions.create(**_chat_args(base_id))
    choice = result.choices[0]
    assert result.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < result.usage.completion_tokens <= 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_max_tokens_is_capped_by_the_context(client, base_id):
    # Chat's default is "the rest of the context"; an explicit oversized limit is capped too.
    chat = client.chat.completions.create(model=base_id, messages=[{"role": "user", "content": PROMPT}], temperature=0)
    big = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=10_000, temperature=0)
    for usage, reason in ((chat.usage, chat.choices[0].finish_reason), (big.usage, big.choices[0].finish_reason)):
        assert usage.total_tokens <= 128
        assert reason == "stop" or usage.total_tokens == 128


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streaming_matches_non_streaming(client, base_id, kind):
    if kind == "completion":
        create, args = client.completions.create, _completion_args(base_id)
    else:
        create, args = client.chat.completions.create, _chat_args(base_id)
    full = create(**args)
    chunks = list(create(**args, stream=True, stream_options={"include_usage": True}))
    with_choice = [c for c in chunks if c.choices]
    if kind == "completion":
        text, expected = "".join(c.choices[0].text for c in with_choice), full.choices[0].text
    else:
        text = "".join(c.choices[0].delta.content or "" for c in with_choice)
        expected = full.choices[0].message.content
        assert with_choice[0].choices[0].delta.role == "assistant"
    assert len(with_choice) > 2  # really streamed, not one blob
    assert text == expected
    assert with_choice[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()  # the include_usage chunk
    assert len({c.id for c in chunks}) == 1


def test_stream_is_server_sent_events_ending_with_done(server, base_id):
    body = {**_completion_args(base_id), "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=_auth(), timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string_cuts_the_text(client, base_id):
    text = client.completions.create(**_completion_args(base_id)).choices[0].text
    stop = text[len(text) // 2 :][:3]
    cut = client.completions.create(**_completion_args(base_id), stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_adapter_switch_changes_output_without_new_session(client, base_id):
    sessions = Decoder.sessions_created
    texts = [
        client.completions.create(**{**_completion_args(base_id), "model": model}).choices[0].text
        for model in (base_id, ADAPTER, base_id, ADAPTER)
    ]
    assert texts[0] == texts[2] and texts[1] == texts[3]
    assert texts[0] != texts[1]
    chat = [client.chat.completions.create(**{**_chat_args(base_id), "model": m}) for m in (base_id, ADAPTER)]
    assert chat[0].choices[0].message.content != chat[1].choices[0].message.content
    assert chat[1].model == ADAPTER
    assert Decoder.sessions_created == sessions


BAD_REQUESTS = {
    "unknown model": ("completions", {"model": "nope", "prompt": "hi"}, 404),
    "unknown model, chat": ("chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    "malformed JSON": ("completions", '{"model": "base", "prompt": ', 400),
    "JSON that is not an object": ("completions", "[1, 2]", 400),
    "max_tokens -1": ("completions", {"model": "base", "prompt": "hi", "max_tokens": -1}, 400),
    "max_tokens 0": ("chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    "prompt longer than the context": ("completions", {"model": "base", "prompt": TOO_LONG}, 400),
    "chat longer than the context": ("chat/completions", {"model": "base", "messages": [{"role": "user", "content": TOO_LONG}]}, 400),
    "missing prompt": ("completions", {"model": "base"}, 400),
    "no messages": ("chat/completions", {"model": "base", "messages": []}, 400),
    "bad role": ("chat/completions", {"model": "base", "messages": [{"role": "robot", "content": "hi"}]}, 400),
    "temperature out of range": ("completions", {"model": "base", "prompt": "hi", "temperature": 7}, 400),
    "n > 1": ("completions", {"model": "base", "prompt": "hi", "n": 2}, 400),
    "streamed, prompt too long": ("completions", {"model": "base", "prompt": TOO_LONG, "stream": True}, 400),
    "unknown route": ("embeddings", {"model": "base", "input": "hi"}, 404),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, client, base_id, case):
    path, body, status = BAD_REQUESTS[case]
    url = f"{server}/v1/{path}"
    if isinstance(body, str):
        response = httpx.post(
            url, content=body, headers={**_auth(), "Content-Type": "application/json"}, timeout=TIMEOUT
        )
    else:
        response = httpx.post(url, json=body, headers=_auth(), timeout=TIMEOUT)
    error = assert_openai_error(response, status)
    if case.startswith("unknown model"):
        assert error["code"] == "model_not_found" and error["param"] == "model"
    if case.startswith("max_tokens"):
        assert error["param"] == "max_tokens"
    assert client.completions.create(**_completion_args(base_id)).choices[0].text


def test_openai_client_raises_its_usual_errors(client, base_id):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="hi")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=base_id, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=base_id, messages=[{"role": "user", "content": TOO_LONG}])
    assert client.completions.create(**_completion_args(base_id)).choices[0].text


def test_api_key_is_required(server, base_id):
    assert httpx.get(f"{server}/health", timeout=TIMEOUT).status_code == 200  # exempt
    assert_openai_error(httpx.get(f"{server}/v1/models", timeout=TIMEOUT), 401)
    wrong = {"Authorization": "Bearer nope"}
    assert_openai_error(httpx.get(f"{server}/v1/models", headers=wrong, timeout=TIMEOUT), 401)
    # Checked before the body is even parsed.
    assert_openai_error(httpx.post(f"{server}/v1/completions", content="{", timeout=TIMEOUT), 401)
    stranger = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(**_completion_args(base_id))


def test_full_queue_answers_503_and_loop_stays_responsive(generator, base_id, monkeypatch):
    started, gate = threading.Event(), threading.Event()
    real_step = generator.decoder.step

    def held_step(*args, **kwargs):
        # A slow device: the generation holds the worker until the test opens the gate.
        started.set()
        gate.wait(TIMEOUT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(generator.decoder, "step", held_step)
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with running(create_app(generator, api_key=None, max_queue=1)) as url, ThreadPoolExecutor(3) as pool:
        try:
            futures = [pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=TIMEOUT) for _ in range(3)]
            assert started.wait(TIMEOUT)
            for _ in range(200):  # the two that found the slot taken are answered at once
                if sum(f.done() for f in futures) >= 2:
                    break
                time.sleep(0.05)
            # The generation is still held, yet the event loop answers (a blocked loop would time out).
            assert not all(f.done() for f in futures)
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        finally:
            gate.set()
        responses = [f.result() for f in futures]
        assert sorted(r.status_code for r in responses) == [200, 503, 503]
        busy = next(r for r in responses if r.status_code == 503)
        assert assert_openai_error(busy, 503)["type"] == "server_error"
        # The slot is released once the generation ends: the next request is served.
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT).status_code == 200


def test_dropped_stream_frees_the_worker(generator, base_id, monkeypatch):
    steps = []
    real_step = generator.decoder.step

    def slow_step(*args, **kwargs):
        steps.append(1)
        time.sleep(0.05)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(generator.decoder, "step", slow_step)
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}
    with running(create_app(generator, api_key=None, max_queue=1)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as response:
            lines = response.iter_lines()
            first = [next(lines) for _ in range(3)]  # a few events, then hang up
        assert first[0].startswith("data: ")
        # Generation stops soon after the client leaves instead of running 100 steps, so the
        # single slot frees up and the next request is served (it would get 503 otherwise).
        for _ in range(40):
            follow = httpx.post(
                f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=TIMEOUT
            )
            if follow.status_code != 503:
                break
            time.sleep(0.05)
        assert follow.status_code == 200
    assert len(steps) < 30


def test_cli_serve_wires_bundle_adapters_and_options(factory, adapter_dir, monkeypatch):
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    args = [
        "serve",
        str(factory.bundle("llama")),
        "--adapter",
        f"mine={adapter_dir}",
        "--port",
        "9123",
        "--api-key",
        "k",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (captured["host"], captured["port"]) == ("127.0.0.1", 9123)
    with running(captured["app"]) as url:
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}, timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]][1:] == ["mine"]


@pytest.mark.parametrize("spec", ["nodir", "=dir", "name="])
def test_cli_serve_refuses_bad_adapter_spec(spec):
    result = CliRunner().invoke(main, ["serve", "bundle", "--adapter", spec])
    assert result.exit_code == 2 and "NAME=DIR" in result.output
