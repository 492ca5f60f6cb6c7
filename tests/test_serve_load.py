"""``edgeft serve`` hardening: loopback-only by default, request limits, per-request timeouts, and a
bounded load test (16 clients x 500 requests) against a real server process on 127.0.0.1.

Servers run on pre-bound loopback sockets (in a thread) or on a port the OS picks (the subprocess);
every request has a timeout and every loop is bounded in count and time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from helpers import assert_openai_error, make_peft_adapter, running

from edgeft.cli import main
from edgeft.device.generate import TextGenerator
from edgeft.device.server import ServeConfig, base_model_id, create_app, is_loopback, serve
from edgeft.errors import EdgeftError

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = "Station old mill: fan is noisy. What should the crew do?"
TIMEOUT = 30.0


def _load_benchmark():
    """benchmarks/serve_load.py (not a package), imported by path: the test runs the same load."""
    name = "edgeft_benchmark_serve_load"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "serve_load.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def adapters(factory, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-load")
    return {
        name: make_peft_adapter(factory.model("llama"), root / name, targets=LLAMA_TARGETS, seed=seed, b_std=0.5)
        for name, seed in (("tuned-a", 1), ("tuned-b", 2))
    }


@pytest.fixture(scope="module")
def generator(factory) -> TextGenerator:
    return TextGenerator(factory.bundle("llama"), provider="cpu")


@pytest.fixture(scope="module")
def base_id(generator) -> str:
    return base_model_id(generator)


@pytest.fixture
def steps(generator, monkeypatch) -> list[float]:
    """Slow every decoder step down to 50 ms (a small device) and record when each one ran."""
    calls: list[float] = []
    real_step = generator.decoder.step

    def slow_step(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.05)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(generator.decoder, "step", slow_step)
    return calls


def _wait_served(url: str, body: dict) -> httpx.Response:
    """POST ``body`` until it is not refused as busy (the slot frees once the worker lets go)."""
    for _ in range(100):  # about 5 s
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
        if response.status_code != 503:
            return response
        time.sleep(0.05)
    return response


def _sse_events(lines: list[str]) -> list[dict | str]:
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


# ---------------------------------------------------------------------------------------------
# Binding


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1", "example.com", "128.0.0.1"])
def test_non_loopback_hosts(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_cli_refuses_non_loopback_host_without_key(host, monkeypatch):
    monkeypatch.delenv("EDGEFT_API_KEY", raising=False)
    # The host is checked before the bundle is even opened: no bundle is needed to see it refused.
    result = CliRunner().invoke(main, ["serve", "no-such-bundle", "--host", host])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert repr(host) in lines[0] and "--api-key" in lines[0] and "--insecure" in lines[0]


@pytest.mark.parametrize("extra", [["--insecure"], ["--api-key", "k"]])
def test_cli_either_remedy_lets_a_non_loopback_host_through(extra, monkeypatch):
    monkeypatch.delenv("EDGEFT_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", "no-such-bundle", "--host", "0.0.0.0", *extra])
    assert result.exit_code == 2
    assert "no-such-bundle" in result.output and "--host" not in result.output  # got past the host check


def test_api_key_from_env_counts_as_a_key(monkeypatch):
    monkeypatch.setenv("EDGEFT_API_KEY", "from-env")
    result = CliRunner().invoke(main, ["serve", "no-such-bundle", "--host", "0.0.0.0"])
    assert "--host" not in result.output


def test_serve_binds_loopback_by_default_and_passes_limits(factory, adapters, monkeypatch):
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    args = ["serve", str(factory.bundle("llama")), "--adapter", f"a={adapters['tuned-a']}", "--port", "0"]
    limits = ["--max-body-bytes", "300", "--max-prompt-chars", "20", "--request-timeout", "5"]
    result = CliRunner().invoke(main, [*args, *limits])
    assert result.exit_code == 0, result.output
    assert captured["host"] == "127.0.0.1"
    with running(captured["app"]) as url:
        model = httpx.get(f"{url}/v1/models", timeout=TIMEOUT).json()["data"][0]["id"]
        long = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x" * 21}, timeout=TIMEOUT)
        assert_openai_error(long, 400)
        big = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x" * 400}, timeout=TIMEOUT)
        assert_openai_error(big, 413)


def test_serve_with_insecure_binds_the_given_host(factory, monkeypatch):
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(kw))
    serve(ServeConfig(factory.bundle("llama"), host="0.0.0.0", insecure=True))
    assert captured["host"] == "0.0.0.0"
    with pytest.raises(EdgeftError, match="--insecure"):
        serve(ServeConfig(factory.bundle("llama"), host="0.0.0.0"))


@pytest.mark.parametrize(
    "option", [{"max_body_bytes": 0}, {"max_prompt_chars": 0}, {"request_timeout": 0}, {"request_timeout": -1}]
)
def test_bad_limits_are_refused(generator, option):
    with pytest.raises(EdgeftError):
        create_app(generator, **option)


# ---------------------------------------------------------------------------------------------
# Body and prompt limits


@pytest.fixture(scope="module")
def limited(generator) -> Iterator[str]:
    with running(create_app(generator, max_body_bytes=4096, max_prompt_chars=200)) as url:
        yield url


def test_body_over_the_limit_by_content_length_is_413(limited, base_id):
    body = {"model": base_id, "prompt": "x" * 5000, "max_tokens": 1}
    error = assert_openai_error(httpx.post(f"{limited}/v1/completions", json=body, timeout=TIMEOUT), 413)
    assert error["code"] == "request_too_large" and "4096" in error["message"]
    # Judged from the header alone: a huge declared body is refused without being read.
    huge = httpx.post(f"{limited}/v1/chat/completions", content=b"{" * (8 << 20), timeout=TIMEOUT)
    assert_openai_error(huge, 413)


def test_chunked_body_over_the_limit_is_413(limited, base_id):
    def chunks() -> Iterator[bytes]:
        yield json.dumps({"model": base_id, "max_tokens": 1, "prompt": "x"})[:-1].encode()
        yield b', "padding": "'
        for _ in range(8):
            yield b"y" * 1024
        yield b'"}'

    response = httpx.post(
        f"{limited}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert assert_openai_error(response, 413)["code"] == "request_too_large"


def test_chunked_body_under_the_limit_is_served(limited, base_id):
    body = json.dumps({"model": base_id, "max_tokens": 1, "prompt": PROMPT}).encode()
    response = httpx.post(
        f"{limited}/v1/completions",
        content=iter([body[:10], body[10:]]),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text


def test_prompt_over_max_chars_is_400(limited, base_id):
    url = f"{limited}/v1"
    fits = ("word " * 40)[:200]
    ok = httpx.post(f"{url}/completions", json={"model": base_id, "prompt": fits, "max_tokens": 1}, timeout=TIMEOUT)
    assert ok.status_code == 200, ok.text  # exactly 200 characters
    long = {"model": base_id, "prompt": fits + "c"}
    error = assert_openai_error(httpx.post(f"{url}/completions", json=long, timeout=TIMEOUT), 400)
    assert error["code"] == "prompt_too_long" and error["param"] == "prompt" and "201" in error["message"]
    # Chat counts every message's text.
    messages = [{"role": "system", "content": "s" * 150}, {"role": "user", "content": "u" * 51}]
    chat = httpx.post(f"{url}/chat/completions", json={"model": base_id, "messages": messages}, timeout=TIMEOUT)
    assert assert_openai_error(chat, 400)["param"] == "messages"
    streamed = httpx.post(f"{url}/completions", json={**long, "stream": True}, timeout=TIMEOUT)
    assert_openai_error(streamed, 400)


def test_api_key_is_checked_before_the_body_size(generator, base_id):
    with running(create_app(generator, api_key="k", max_body_bytes=100)) as url:
        big = {"model": base_id, "prompt": "x" * 500}
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=big, timeout=TIMEOUT), 401)
        keyed = httpx.post(f"{url}/v1/completions", json=big, headers={"Authorization": "Bearer k"}, timeout=TIMEOUT)
        assert_openai_error(keyed, 413)


# ---------------------------------------------------------------------------------------------
# Per-request timeout


def test_timeout_stops_a_non_streaming_generation_with_504(generator, base_id, steps):
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 100, "temperature": 0}
    with running(create_app(generator, max_queue=1, request_timeout=0.5)) as url:
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
        elapsed = time.monotonic() - start
        error = assert_openai_error(response, 504)
        assert error["code"] == "timeout" and error["type"] == "server_error"
        assert 0.5 <= elapsed < 2.0
        # The worker stopped between two tokens (100 steps would take 5 s) and freed the only slot.
        follow = _wait_served(url, {**body, "max_tokens": 2})
        assert follow.status_code == 200, follow.text
        ran = len(steps)
        time.sleep(0.3)
        assert len(steps) == ran  # nothing still generating in the background
        assert ran < 20


def test_timeout_ends_a_stream_with_length_and_an_error_event(generator, base_id, steps):
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}
    with running(create_app(generator, max_queue=1, request_timeout=0.5)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as response:
            assert response.status_code == 200
            events = _sse_events([line for line in response.iter_lines() if line])
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == "timeout" and error["type"] == "server_error"
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        assert any(e["choices"][0]["text"] for e in events[:-3])  # some text came before the cut
        follow = _wait_served(url, {**body, "stream": False, "max_tokens": 2})
        assert follow.status_code == 200, follow.text
        ran = len(steps)
        time.sleep(0.3)
        assert len(steps) == ran and ran < 20


def test_timeout_of_a_chat_stream_keeps_openai_chunk_shape(generator, base_id, steps):
    body = {"model": base_id, "messages": [{"role": "user", "content": PROMPT}], "stream": True, "temperature": 0}
    app = create_app(generator, max_queue=1, request_timeout=0.4)
    with running(app) as url, httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        events = _sse_events([line for line in r.iter_lines() if line])
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-3]["object"] == "chat.completion.chunk"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"


def test_request_timing_out_in_the_queue_is_answered_on_time_and_never_runs(generator, base_id, monkeypatch):
    started, gate = threading.Event(), threading.Event()
    calls = []
    real_step = generator.decoder.step

    def held_step(*args, **kwargs):
        calls.append(1)
        started.set()
        gate.wait(TIMEOUT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(generator.decoder, "step", held_step)
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 50, "temperature": 0}
    with running(create_app(generator, max_queue=2, request_timeout=0.5)) as url, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=TIMEOUT)
            assert started.wait(TIMEOUT)
            stream_body = {**body, "stream": True}
            queued = pool.submit(httpx.post, f"{url}/v1/completions", json=stream_body, timeout=TIMEOUT)
            # Both are answered at their deadline although the worker is still stuck in a step.
            assert assert_openai_error(first.result(5), 504)["code"] == "timeout"
            assert assert_openai_error(queued.result(5), 504)["code"] == "timeout"
            assert not gate.is_set() and len(calls) == 1
        finally:
            gate.set()
        follow = _wait_served(url, {**body, "max_tokens": 1})
        assert follow.status_code == 200, follow.text
    # The first generation stopped after its held step, and the queued one never ran a step:
    # 1 held step + 1 step for the follow-up request.
    assert len(calls) == 2


def test_fast_requests_are_unaffected_by_the_timeout(generator, base_id):
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    with running(create_app(generator, request_timeout=10)) as url:
        plain = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
        assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] in ("stop", "length")
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
            events = _sse_events([line for line in r.iter_lines() if line])
        assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain.json()["choices"][0]["text"]


# ---------------------------------------------------------------------------------------------
# Load


# Server RSS growth over the 8000 requests, after 320 warm-up requests (README: "under 5 MB").
# Measured on the 2-core dev box, 10 runs: 1.5 to 2.1 MB, and 2.2 MB over 24000 requests (it levels
# off: no per-request leak); a 1 kB leak per request adds about 8 MB and fails this.
RSS_GROWTH_LIMIT_MB = 5.0


def test_load_16_clients_x_500_requests(factory, adapters, tmp_path):
    """16 clients x 500 mixed requests against `python -m edgeft.cli serve` with --max-queue 8:
    only 200s and deliberate 503s, every greedy reply the one its model gives alone, the server
    still healthy, its RSS flat after warm-up."""
    bench = _load_benchmark()
    cfg = bench.LoadConfig(clients=16, requests_per_client=500, max_queue=8, time_limit_s=240)
    results = bench.measure(factory.bundle("llama"), adapters, cfg, tmp_path)
    bench.write_results(results, os.environ.get("EDGEFT_LOAD_RESULTS"))
    keys = ("requests_per_s", "latency_ms", "busy_503", "greedy_checked", "greedy_mismatched", "rss_mb")
    print(json.dumps({k: results[k] for k in keys}))

    assert results["requests"] == 8000, results  # all ran within the time limit
    assert set(results["statuses"]) <= {"200", "503"}, results["statuses"]
    assert results["server_errors_other"] == 0 and results["transport_errors"] == 0
    assert results["problems"] == 0 and results["warmup_problems"] == 0, results["problem_examples"]
    assert results["busy_503"] > 0  # the bounded queue did refuse work...
    assert results["ok"] > 1000  # ...but served plenty
    # Each reply came from the model its request named: under load every greedy reply (of the base
    # model and both adapters) equals the one the same request got alone, and for most of them the
    # other two models reply differently, so a mix-up would change the reply. (Measured: 22 of the
    # mix's 24 greedy requests tell all three apart; the other two ask for one token, which both
    # models decode to the same replacement character.)
    assert results["reference_models"] == sorted(results["models"]) and len(results["models"]) == 3
    assert results["greedy_mismatched"] == 0 and results["warmup_mismatched"] == 0, results["mismatch_examples"]
    assert results["greedy_checked"] > results["ok"] // 2, results
    assert results["greedy_distinct"] > 0.8 * results["greedy_checked"], results
    assert results["health_after"] and results["server_alive"]
    rss = results["rss_mb"]
    assert rss["growth"] < RSS_GROWTH_LIMIT_MB, rss
