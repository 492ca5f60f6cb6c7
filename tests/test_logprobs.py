"""``edgeft serve`` log-probabilities: ``logprobs`` / ``echo`` / ``max_tokens: 0`` on /v1/completions,
``logprobs`` / ``top_logprobs`` on /v1/chat/completions, equal to log-softmax of transformers'
logits with the PEFT adapter; and the limits around them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import assert_openai_error, make_peft_adapter, running, torch_peft_model

from edgeft.device.generate import TextGenerator
from edgeft.device.server import create_app
from edgeft.host.tiny import SPECIALS

ADAPTER = "tuned"
PROMPT = "Station old mill: fan is noisy. What should the crew do?"
TIMEOUT = 30.0
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def adapter_dir(factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logprobs") / "peft"
    return make_peft_adapter(factory.model("llama"), out, targets=["q_proj", "k_proj", "v_proj", "o_proj"], b_std=0.5)


@pytest.fixture(scope="module")
def generator(factory, adapter_dir) -> TextGenerator:
    gen = TextGenerator(factory.bundle("llama"), provider="cpu")
    gen.decoder.add_adapter(ADAPTER, adapter_dir)
    return gen


@pytest.fixture(scope="module")
def server(generator) -> Iterator[str]:
    with running(create_app(generator, max_queue=4)) as url:
        yield url


@pytest.fixture(scope="module")
def reference(factory, adapter_dir):
    """log_softmax of transformers' logits (PEFT adapter) for the prompt and, from a greedy
    continuation of up to 6 tokens (cut before a stop token), every position of prompt + continuation."""
    import torch

    model = torch_peft_model(factory.model("llama"), adapter_dir)
    gen = TextGenerator(factory.bundle("llama"))
    ids = gen.encode(PROMPT)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        full = out[0].tolist()
        logits = model(input_ids=torch.tensor([full])).logits[0].double()
    continuation = full[len(ids) :]
    stops = [i for i, t in enumerate(continuation) if t in gen.stop_ids]
    return ids, continuation[: stops[0] if stops else None], torch.log_softmax(logits, -1).numpy()


def _post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/{path}", json=body, timeout=TIMEOUT)


def test_echo_scores_the_prompt_like_transformers(server, reference):
    ids, _, lp = reference
    body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 5}
    reply = _post(server, "completions", body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["text"] == PROMPT  # echo, nothing generated
    got = choice["logprobs"]
    assert len(got["tokens"]) == len(got["token_logprobs"]) == len(got["top_logprobs"]) == len(ids)
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    want = [lp[i - 1, t] for i, t in enumerate(ids) if i > 0]
    np.testing.assert_allclose(got["token_logprobs"][1:], want, atol=TOLERANCE, rtol=0)
    for i in range(1, len(ids)):
        # The top 5 and the chosen token (OpenAI: up to logprobs + 1 entries, fewer where two of
        # them decode to the same text: the tiny byte-level vocabulary has many partial characters).
        top = got["top_logprobs"][i]
        assert 1 <= len(top) <= 6
        allowed = np.append(np.sort(lp[i - 1])[::-1][:5], lp[i - 1, ids[i]])
        assert abs(max(top.values()) - allowed[0]) <= TOLERANCE
        assert all(np.abs(allowed - v).min() <= TOLERANCE for v in top.values())
    offsets = got["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(PROMPT)
    assert reply.json()["usage"]["completion_tokens"] == 0


def test_generated_tokens_are_scored_like_transformers(server, reference):
    ids, continuation, lp = reference
    body = {"model": ADAPTER, "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    choice = _post(server, "completions", body).json()["choices"][0]
    got = choice["logprobs"]
    n = len(ids)
    assert len(got["tokens"]) == n + len(continuation)  # token-id prompts work too (lm-eval sends them)
    want = [lp[i - 1, t] for i, t in enumerate(ids + continuation) if i > 0]
    np.testing.assert_allclose(got["token_logprobs"][1:], want, atol=TOLERANCE, rtol=0)
    for i in range(n, n + len(continuation)):  # greedy: the chosen token is the most likely one
        assert got["token_logprobs"][i] == max(got["top_logprobs"][i].values())
    assert choice["text"].startswith(got["tokens"][0]) or got["text_offset"][0] == 0


def test_logprobs_without_echo_score_only_the_completion(server, reference):
    ids, continuation, lp = reference
    body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    choice = _post(server, "completions", body).json()["choices"][0]
    got = choice["logprobs"]
    want = [lp[len(ids) + j - 1, t] for j, t in enumerate(continuation)]
    np.testing.assert_allclose(got["token_logprobs"], want, atol=TOLERANCE, rtol=0)
    assert all(len(top) == 1 for top in got["top_logprobs"])  # logprobs 0: the chosen token only
    assert len(got["tokens"]) == len(continuation) and got["text_offset"][0] == 0


def test_max_tokens_zero_without_echo_is_empty(server):
    reply = _post(server, "completions", {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == "" and reply.json()["usage"]["completion_tokens"] == 0


def test_chat_logprobs_and_streaming(server, generator):
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": ADAPTER, "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True}
    whole = _post(server, "chat/completions", {**body, "top_logprobs": 3}).json()["choices"][0]
    content = whole["logprobs"]["content"]
    # tokens are named with special tokens included (a random model may emit <s>); the content skips them
    text = "".join(c["token"] for c in content if c["token"] not in SPECIALS)
    assert len(content) == 5 and text == whole["message"]["content"]
    for c in content:
        assert len(c["top_logprobs"]) == 3 and c["logprob"] == c["top_logprobs"][0]["logprob"]
        assert c["bytes"] == list(c["token"].encode())
    plain = _post(server, "chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in plain] == [c["logprob"] for c in content] and plain[0]["top_logprobs"] == []

    streamed = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "top_logprobs": 3, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                logprobs = json.loads(line[6:])["choices"][0]["logprobs"]
                streamed += logprobs["content"] if logprobs else []
    assert streamed == content


def test_streamed_completion_logprobs_equal_the_whole_reply(server):
    body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    whole = _post(server, "completions", body).json()["choices"][0]
    text, tokens, values = "", [], []
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    values += choice["logprobs"]["token_logprobs"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"] and values == whole["logprobs"]["token_logprobs"]


def test_bundles_without_logits_to_keep_score_token_by_token(generator, reference):
    """A bundle exported before `logits_to_keep` existed: the prompt is scored one step per token."""
    ids, _, lp = reference
    decoder = generator.decoder
    assert decoder.can_keep_logits
    decoder.can_keep_logits = False
    try:
        stream = generator.stream(ids, ADAPTER, _sampling(0), logprobs=1, score_prompt=True)
        list(stream)
    finally:
        decoder.can_keep_logits = True
    got = [s.logprob for s in stream.prompt_scores[1:]]
    np.testing.assert_allclose(got, [lp[i - 1, t] for i, t in enumerate(ids) if i > 0], atol=TOLERANCE, rtol=0)


def _sampling(max_new_tokens: int):
    from edgeft.device.decoder import Sampling

    return Sampling(max_new_tokens=max_new_tokens)


BAD = {
    "logprobs over 5": ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    "negative logprobs": ("completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    "top_logprobs over 20": ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs without logprobs": ("chat/completions", {"top_logprobs": 2}, None),
    "token id outside the vocabulary": ("completions", {"prompt": [1, 10**9]}, None),
    "negative token id": ("completions", {"prompt": [[-3]]}, None),
    "more prompts than the cap": ("completions", {"prompt": [[1, 2]] * 65}, "prompt"),
    "token prompt longer than the context": ("completions", {"prompt": [5] * 200}, None),
    "empty token prompt": ("completions", {"prompt": []}, None),
    "chat max_tokens 0": ("chat/completions", {"max_tokens": 0}, "max_tokens"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_logprob_requests_get_400(server, case):
    path, extra, param = BAD[case]
    body = {"model": ADAPTER, **extra}
    if path.startswith("chat"):
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    error = assert_openai_error(_post(server, path, body), 400)
    if param:
        assert error["param"] == param
