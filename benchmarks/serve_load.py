"""Load test for ``edgeft serve``: many concurrent clients on loopback, a bounded request count.

Starts ``python -m edgeft.cli serve`` in a subprocess (so its memory is its own), warms it up, then
runs CLIENTS threads x REQUESTS requests, each thread with its own httpx connection pool. The mix
cycles through the base model and every adapter, completions and chat completions, streaming and
not, greedy and sampled, with max_tokens 1-4. ``--max-queue`` below the client count makes the
server refuse some requests with 503 on purpose; they are counted, not retried. Prints the figures
as JSON (and writes them to --out or $EDGEFT_LOAD_RESULTS): requests/s, latency p50/p95, 503s,
server RSS after warm-up and at the end.

Every greedy request of the mix is first sent alone, one at a time: greedy decoding is
deterministic, so under load each greedy 200 must carry exactly that reply (text and finish
reason). A reply generated with another request's adapter, or from a KV cache another request
touched, differs: it is counted as ``greedy_mismatched``. ``greedy_distinct`` says how many checked
replies no other model would have given to the same request, i.e. how many a mix-up would change.

    python benchmarks/serve_load.py                      # builds the tiny test model (needs torch)
    python benchmarks/serve_load.py --bundle B --adapter a=DIR --adapter b=DIR --out load.json

tests/test_serve_load.py runs the same load and asserts on these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Station old mill: fan is noisy. What should the crew do?",
    "Summarize the last inspection report in one line.",
    "hi",
    "List three checks before restarting the pump at the river station.",
]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class LoadConfig:
    clients: int = 16
    requests_per_client: int = 500
    max_queue: int = 8  # below ``clients``, so some requests get 503 on purpose
    warmup_per_client: int = 20
    request_timeout_s: float = 30.0  # client side, per request
    time_limit_s: float = 300.0  # the whole load; threads stop starting requests after it
    server_args: list[str] = field(default_factory=list)  # extra `edgeft serve` options


# ---------------------------------------------------------------------------------------------
# The server process


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


_LISTENING = re.compile(r"Uvicorn running on (http://\S+)")


@contextmanager
def server_process(
    bundle: Path, adapters: dict[str, Path], max_queue: int, log: Path, extra: list[str] | None = None
) -> Iterator[ServerProcess]:
    """``edgeft serve`` on 127.0.0.1 and a port the OS picks (read back from uvicorn's log)."""
    cmd = [sys.executable, "-m", "edgeft.cli", "serve", str(bundle), "--port", "0", "--max-queue", str(max_queue)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    cmd += extra or []
    env = {k: v for k, v in os.environ.items() if k != "EDGEFT_API_KEY"}
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        url = _wait_listening(process, log, timeout=120)
        yield ServerProcess(process, url, log)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


def _wait_listening(process: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_text(errors="replace"))
        if match:
            return match.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"edgeft serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    raise TimeoutError(f"edgeft serve did not start in {timeout:.0f} s:\n{log.read_text(errors='replace')}")


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set size now (VmRSS) and at its peak so far (VmHWM), in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    return fields


# ---------------------------------------------------------------------------------------------
# The load


def request_for(client: int, i: int, models: list[str]) -> tuple[str, dict]:
    """The ``i``-th request of client ``client``: a fixed, varied mix (path, JSON body)."""
    model = models[(client + i) % len(models)]
    chat = (i // len(models)) % 2 == 1
    stream = (client + i // 2) % 2 == 1
    body: dict = {"model": model, "max_tokens": 1 + (client + i) % 4, "stream": stream}
    if (client + i // len(models)) % 3 == 0:  # a third sampled, for every model alike
        body.update(temperature=0.8, top_p=0.9, seed=client * 100_000 + i)
    else:
        body["temperature"] = 0
    prompt = PROMPTS[(client + i) % len(PROMPTS)]
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def greedy_key(path: str, body: dict) -> tuple | None:
    """What a greedy reply depends on (None for a sampled request): the same key, the same reply."""
    if body.get("temperature") != 0:
        return None
    prompt = body["messages"][0]["content"] if "messages" in body else body["prompt"]
    return path, body["model"], prompt, body["max_tokens"]


Reply = tuple[str, str]  # (text, finish_reason)


@dataclass
class Outcome:
    status: int  # HTTP status, or 0 for a transport error
    seconds: float
    problem: str | None = None  # set when a 200 did not carry a well-formed answer
    key: tuple | None = None  # greedy_key of a greedy 200 whose reply was compared
    mismatch: str | None = None  # set when that reply differs from the same request sent alone


def one_request(http: httpx.Client, path: str, body: dict, expected: dict[tuple, Reply] | None = None) -> Outcome:
    start = time.perf_counter()
    reply = None
    try:
        if body["stream"]:
            with http.stream("POST", path, json=body) as response:
                if response.status_code == 200:
                    lines = [line for line in response.iter_lines() if line]
                    problem = _check_stream(lines)
                    reply = None if problem else _stream_reply(lines)
                else:
                    response.read()  # the error body, for the report
                    problem = None
        else:
            response = http.post(path, json=body)
            problem = _check_body(response) if response.status_code == 200 else None
            reply = _body_reply(response) if response.status_code == 200 and not problem else None
    except httpx.HTTPError as e:
        return Outcome(0, time.perf_counter() - start, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - start
    if response.status_code not in (200, 503):
        problem = f"{response.status_code}: {response.text[:300]}"
    outcome = Outcome(response.status_code, seconds, problem)
    key = greedy_key(path, body)
    if reply is not None and expected is not None and key in expected:
        outcome.key = key
        if reply != expected[key]:
            outcome.mismatch = f"{key}: got {reply!r}, alone it is {expected[key]!r}"
    return outcome


def _body_reply(response: httpx.Response) -> Reply:
    choice = response.json()["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"]


def _stream_reply(lines: list[str]) -> Reply:
    events = [json.loads(line[6:]) for line in lines[:-1]]
    choices = [c for e in events for c in e.get("choices", [])]
    text = "".join((c["delta"].get("content") if "delta" in c else c.get("text")) or "" for c in choices)
    return text, next(c["finish_reason"] for c in choices if c.get("finish_reason"))


def reference_replies(url: str, models: list[str], cfg: LoadConfig) -> dict[tuple, Reply]:
    """Every distinct greedy request of the load, sent alone and not streamed, one after another."""
    requests = {}
    for c in range(cfg.clients):
        for i in range(cfg.requests_per_client):
            path, body = request_for(c, i, models)
            key = greedy_key(path, body)
            if key is not None and key not in requests:
                requests[key] = (path, {**body, "stream": False})
    replies = {}
    with httpx.Client(base_url=url, timeout=cfg.request_timeout_s) as http:
        for key, (path, body) in sorted(requests.items()):
            response = http.post(path, json=body)
            if response.status_code != 200 or _check_body(response):
                raise RuntimeError(f"reference request {key} failed: {response.status_code} {response.text[:300]}")
            replies[key] = _body_reply(response)
    return replies


def distinct_keys(replies: dict[tuple, Reply]) -> set[tuple]:
    """Keys whose reply no other model gives to the same request (path, prompt, max_tokens)."""
    return {
        key
        for key, reply in replies.items()
        if not any(k[0] == key[0] and k[2:] == key[2:] and k[1] != key[1] and r == reply for k, r in replies.items())
    }


def _check_body(response: httpx.Response) -> str | None:
    data = response.json()
    choices = data.get("choices") or []
    if len(choices) != 1 or choices[0].get("finish_reason") not in ("stop", "length"):
        return f"bad body: {response.text[:300]}"
    return None


def _check_stream(lines: list[str]) -> str | None:
    if not lines or lines[-1] != "data: [DONE]":
        return f"stream did not end with [DONE]: {lines[-3:]}"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    if any("error" in e for e in events):
        return f"error event: {[e for e in events if 'error' in e][0]}"
    reasons = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    if reasons not in (["stop"], ["length"]):
        return f"finish reasons {reasons}"
    return None


def run_clients(
    url: str,
    models: list[str],
    clients: int,
    per_client: int,
    cfg: LoadConfig,
    expected: dict[tuple, Reply] | None = None,
) -> list[Outcome]:
    """``clients`` threads, each with its own connection pool, ``per_client`` requests each; greedy
    replies are compared with ``expected`` (see reference_replies)."""
    stop_at = time.monotonic() + cfg.time_limit_s

    def client(c: int) -> list[Outcome]:
        outcomes = []
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        with httpx.Client(base_url=url, timeout=cfg.request_timeout_s, limits=limits) as http:
            for i in range(per_client):
                if time.monotonic() > stop_at:
                    break
                outcomes.append(one_request(http, *request_for(c, i, models), expected))
        return outcomes

    with ThreadPoolExecutor(clients, thread_name_prefix="load-client") as pool:
        results = list(pool.map(client, range(clients)))
    return [o for per in results for o in per]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(outcomes: list[Outcome], seconds: float, cfg: LoadConfig, distinct: set[tuple] | None = None) -> dict:
    statuses = Counter(o.status for o in outcomes)
    ok = [o.seconds for o in outcomes if o.status == 200 and o.problem is None]
    problems = [o.problem for o in outcomes if o.problem]
    checked = [o for o in outcomes if o.key is not None]
    mismatches = [o.mismatch for o in checked if o.mismatch]
    return {
        "clients": cfg.clients,
        "requests_per_client": cfg.requests_per_client,
        "max_queue": cfg.max_queue,
        "requests": len(outcomes),
        "planned": cfg.clients * cfg.requests_per_client,
        "ok": len(ok),
        "busy_503": statuses.get(503, 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors_other": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "transport_errors": statuses.get(0, 0),
        "problems": len(problems),
        "problem_examples": problems[:5],
        "greedy_checked": len(checked),
        "greedy_distinct": sum(1 for o in checked if o.key in (distinct or ())),
        "greedy_mismatched": len(mismatches),
        "mismatch_examples": mismatches[:5],
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(outcomes) / seconds, 1) if seconds else None,
        "ok_per_s": round(len(ok) / seconds, 1) if seconds else None,
        "latency_ms": _latency([o.seconds for o in outcomes]),
        "latency_ok_ms": _latency(ok),
    }


def _latency(values: list[float]) -> dict:
    return {
        name: None if (v := _percentile(values, q)) is None else round(v * 1000, 2)
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
    }


def measure(bundle: Path, adapters: dict[str, Path], cfg: LoadConfig, workdir: Path) -> dict:
    """Start the server, warm it up, run the load; the figures (see module docstring)."""
    with server_process(bundle, adapters, cfg.max_queue, workdir / "serve.log", cfg.server_args) as server:
        with httpx.Client(base_url=server.url, timeout=cfg.request_timeout_s) as http:
            models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        expected = reference_replies(server.url, models, cfg)
        warm = run_clients(server.url, models, cfg.clients, cfg.warmup_per_client, cfg, expected)
        before = memory_mb(server.pid)
        start = time.perf_counter()
        outcomes = run_clients(server.url, models, cfg.clients, cfg.requests_per_client, cfg, expected)
        seconds = time.perf_counter() - start
        after = memory_mb(server.pid)
        try:
            health = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            health = False
        alive = server.process.poll() is None
    distinct = distinct_keys(expected)
    results = summarize(outcomes, seconds, cfg, distinct)
    growth = after["VmRSS"] - before["VmRSS"]
    results.update(
        models=models,
        warmup_requests=len(warm),
        warmup_problems=sum(1 for o in warm if o.problem),
        warmup_mismatched=sum(1 for o in warm if o.mismatch),
        reference_requests=len(expected),
        reference_models=sorted({key[1] for key in expected}),
        reference_distinct=len(distinct),
        rss_mb={
            "start": round(before["VmRSS"], 1),
            "end": round(after["VmRSS"], 1),
            "growth": round(growth, 1),
            "growth_pct": round(100 * growth / before["VmRSS"], 2),
            "peak": round(after["VmHWM"], 1),
        },
        health_after=health,
        server_alive=alive,
        machine={"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        config=asdict(cfg),
    )
    return results


def write_results(results: dict, path: str | Path | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Standalone


def tiny_bundle(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """The tests' tiny llama bundle and two PEFT adapters, built in ``workdir`` (needs torch)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_peft_adapter

    from edgeft.host.export import ExportConfig, export_bundle
    from edgeft.host.tiny import make_tiny_model

    model = make_tiny_model("llama", workdir / "model-llama", size="tiny")
    bundle = export_bundle(ExportConfig(model, workdir / "bundle-llama", max_seq_len=128))
    adapters = {
        name: make_peft_adapter(model, workdir / name, targets=LLAMA_TARGETS, seed=seed, b_std=0.5)
        for name, seed in (("tuned-a", 1), ("tuned-b", 2))
    }
    return bundle, adapters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="Bundle to serve (default: build the tiny test model).")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="Requests per client.")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20, help="Warm-up requests per client.")
    parser.add_argument("--time-limit", type=float, default=300.0, help="Seconds; stop starting requests after.")
    parser.add_argument("--threads", type=int, help="Pass --threads to edgeft serve.")
    parser.add_argument("--out", default=os.environ.get("EDGEFT_LOAD_RESULTS"), help="Write the JSON here.")
    args = parser.parse_args(argv)
    cfg = LoadConfig(args.clients, args.requests, args.max_queue, args.warmup, time_limit_s=args.time_limit)
    if args.threads:
        cfg.server_args += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="edgeft-load-") as tmp:
        workdir = Path(tmp)
        if args.bundle:
            bundle = args.bundle
            adapters = {n: Path(p) for n, _, p in (spec.partition("=") for spec in args.adapter)}
        else:
            print("building the tiny llama bundle and two adapters...", file=sys.stderr)
            bundle, adapters = tiny_bundle(workdir)
        results = measure(bundle, adapters, cfg, workdir)
    write_results(results, args.out)
    print(json.dumps(results, indent=2))
    failed = results["server_errors_other"] or results["transport_errors"] or results["problems"]
    failed = failed or results["greedy_mismatched"] or results["warmup_mismatched"]
    return 1 if failed or not results["health_after"] else 0


if __name__ == "__main__":
    sys.exit(main())
